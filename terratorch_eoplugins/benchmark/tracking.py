"""MLflow tracking of a sweep (``eoplugins sweep FILE --mlflow`` / ``--mlflow-uri URI``).

The sweep is an MLflow experiment named after it, holding one parent run (tag ``eoplugins_role=sweep``) and one
nested run per sweep run (tag ``eoplugins_role=run``, ``eoplugins_run_id=<run_id>``, ``mlflow.parentRunId``):

- params: sweep file, model, task, kind, setting, label fraction, seed, pretrained flag, trainer / data / model
  pieces, the setting's model patch, the overrides and the command line's extra arguments, the world and the
  pretraining stage (config, checkpoint argument, overrides, shared id);
- metrics: the logged test metrics (``test/mIoU``, ...; characters MLflow refuses in a name become ``_``), the
  leaderboard's three columns (``leaderboard/IoU``, ...), ``tunable_params`` / ``total_params`` and the timings
  and peak memory of the row;
- tags: status, error, finished_at, resumed; the MLflow status is FINISHED for ``ok`` and FAILED otherwise;
- artifacts: ``run.yaml`` (what ``terratorch fit -c`` read), ``config.yaml`` (the composed config,
  :func:`~terratorch_eoplugins.benchmark.compose.compose_run_config`) and ``command.txt``.

The parent run gets the results CSV, the leaderboard and its plot as artifacts. Rows are logged as they are
recorded (by the driver only, never by Ray tasks), and :meth:`SweepTracker.sync` logs every row of the results
CSV that the store does not hold yet (a sweep killed between a row and its logging, runs of other shards, a CSV
written before tracking was turned on). A run that is recorded again (a retry) updates its MLflow run: new
metric values at the next step, new status; a run whose params changed (an edited sweep file) gets a new MLflow
run. The default store is ``file:<runs-dir>/<sweep>/mlruns`` (browse it with
``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri <runs-dir>/<sweep>/mlruns``).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from terratorch_eoplugins.benchmark.runner import SweepRunner
from terratorch_eoplugins.benchmark.spec import RunSpec

#: row columns logged as metrics (numbers; empty cells are skipped)
ROW_METRICS = ("tunable_params", "total_params", "train_s", "train_loop_s", "pretrain_s", "test_s", "peak_rss_mb",
               "cuda_peak_mb", "world_size")
MAX_PARAM = 6000  # MLflow's limit on a param value
MAX_TAG = 5000


class TrackingError(RuntimeError):
    """MLflow tracking cannot start (mlflow missing, an unusable tracking URI); the message says which and why."""


def default_uri(runner: SweepRunner) -> str:
    """``file:<runs-dir>/<sweep>/mlruns``: the local file store next to the sweep's run folders."""
    return (runner.runs_dir / "mlruns").as_uri()


def normalise_uri(uri: str) -> str:
    """A plain path becomes a ``file:`` URI (absolute); URIs with a scheme are kept."""
    if "://" in uri or uri.startswith("file:"):
        return uri
    return Path(uri).resolve().as_uri()


def metric_key(name: str) -> str:
    """``name`` with the characters MLflow refuses in a metric name (``,`` of a class name, ...) replaced by ``_``."""
    return re.sub(r"[^\w\-. :/]", "_", name)


def _num(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) or math.isinf(x) else x


def run_params(runner: SweepRunner, run: RunSpec) -> dict[str, str]:
    """The MLflow params of a sweep run (strings, each at most MLflow's length limit)."""
    params: dict[str, Any] = {
        "sweep_file": str(runner.sweep.path), "model": run.model, "model_label": run.model_label,
        "pretrained": run.pretrained, "task": run.task, "kind": run.kind, "setting": run.setting,
        "label_fraction": run.label_fraction, "seed": run.seed, "trainer": run.trainer, "data": run.data,
        "model_piece": run.model_piece, "model_patch": json.dumps(run.model_patch, sort_keys=True),
        "overrides": json.dumps(list(run.overrides)), "extra": json.dumps(runner.extra), "world": runner.world,
        "profile": run.profile or "", "fold": "" if run.fold is None else run.fold,
    }
    if run.pretrain is not None:
        params.update(pretrain_config=run.pretrain.config, pretrain_ckpt_arg=run.pretrain.ckpt_arg,
                      pretrain_overrides=json.dumps(list(run.pretrain.overrides)), pretrain_id=run.pretrain_id,
                      pretrain_profile=run.pretrain.profile or "")
    out = {}
    for k, v in params.items():
        text = str(v).lower() if isinstance(v, bool) else str(v)
        out[k] = text if len(text) <= MAX_PARAM else text[:MAX_PARAM - 20] + " ...[truncated]"
    return out


class SweepTracker:
    """Log a sweep's rows to MLflow (see the module docstring).

    Args:
        runner: the sweep's runner (its runs folder, results CSV, pieces).
        uri: tracking URI or path (default: :func:`default_uri`).
        experiment: experiment name (default: the sweep's name).
        tags: tags of the parent run (e.g. the engine), updated at every start.
    """

    def __init__(self, runner: SweepRunner, uri: str | None = None, experiment: str | None = None,
                 tags: dict[str, str] | None = None) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise TrackingError('MLflow tracking needs the MLflow client: pip install "terratorch-eoplugins[mlflow]" '
                                "(mlflow-skinny is enough)") from err
        self.runner = runner
        self.uri = normalise_uri(uri) if uri else default_uri(runner)
        if self.uri.startswith("file:"):
            # MLflow >= 3.7 refuses a file store unless this is set; the sweep's default store is one
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.experiment_name = experiment or runner.sweep.name
        self._runs = {r.run_id: r for r in runner.sweep.runs}
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(self.experiment_name)
            self.experiment_id = exp.experiment_id if exp is not None else \
                self.client.create_experiment(self.experiment_name)
            self.parent_id = self._parent(tags or {})
            self._children = self._load_children()
        except Exception as err:  # noqa: BLE001 - MLflow raises its own and OS errors: all mean "cannot track"
            raise TrackingError(f"MLflow tracking URI {self.uri}: {type(err).__name__}: {err}") from err
        self._warned = False

    # ---- lookup ----
    def _search(self, filter_string: str) -> list:
        out, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1000,
                                           page_token=token)
            out += list(page)
            token = page.token
            if not token:
                return out

    def _parent(self, tags: dict[str, str]) -> str:
        sweep_tag = str(self.runner.sweep.path.resolve())
        found = [r for r in self._search("tags.eoplugins_role = 'sweep'")
                 if r.data.tags.get("eoplugins_sweep_file") == sweep_tag]
        if found:
            run_id = sorted(found, key=lambda r: r.info.start_time)[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=self.runner.sweep.name, tags={
                "eoplugins_role": "sweep", "eoplugins_sweep_file": sweep_tag}).info.run_id
        for k, v in {**tags, "results_csv": str(self.runner.csv_path)}.items():
            self.client.set_tag(run_id, k, str(v)[:MAX_TAG])
        return run_id

    def _load_children(self) -> dict[str, list]:
        children: dict[str, list] = {}
        for r in self._search(f"tags.eoplugins_role = 'run' and tags.`mlflow.parentRunId` = '{self.parent_id}'"):
            children.setdefault(r.data.tags.get("eoplugins_run_id", ""), []).append(r)
        for runs in children.values():
            runs.sort(key=lambda r: r.info.start_time, reverse=True)
        return children

    def mlflow_run_id(self, run_id: str) -> str | None:
        """The MLflow run id of a sweep run (the newest one), ``None`` when it was never logged."""
        runs = self._children.get(run_id)
        return runs[0].info.run_id if runs else None

    # ---- logging ----
    def _child(self, run_id: str, params: dict[str, str]) -> tuple[str, int]:
        """``(mlflow run id, step)`` for the next record of ``run_id``: the run with the same params, or a new one."""
        for r in self._children.get(run_id, []):
            if all(r.data.params.get(k) == v for k, v in params.items()):
                step = int(r.data.tags.get("eoplugins_records", "0"))
                return r.info.run_id, step
        created = self.client.create_run(self.experiment_id, run_name=run_id, tags={
            "eoplugins_role": "run", "eoplugins_run_id": run_id, "mlflow.parentRunId": self.parent_id})
        from mlflow.entities import Param

        for i in range(0, len(params), 100):
            chunk = list(params.items())[i:i + 100]
            self.client.log_batch(created.info.run_id, params=[Param(k, v) for k, v in chunk])
        return created.info.run_id, 0

    def log_row(self, row: dict) -> str:
        """Log one results row (see the module docstring); returns its MLflow run id."""
        from mlflow.entities import Metric, RunTag

        run_id = str(row["run_id"])
        run = self._runs.get(run_id)
        params = run_params(self.runner, run) if run is not None else \
            {k: str(row.get(k, "")) for k in ("model", "task", "setting", "label_fraction", "seed")}
        mlflow_id, step = self._child(run_id, params)
        ts = int(time.time() * 1000)
        metrics: dict[str, float] = {}
        text = row.get("metrics") or "{}"
        for k, v in (json.loads(text) if isinstance(text, str) else dict(text)).items():
            if _num(v) is not None:
                metrics[metric_key(k)] = _num(v)
        names = str(row.get("metric_names") or "").split("/")
        for name, col in zip(names, ("m1", "m2", "m3")):
            if name and _num(row.get(col)) is not None:
                metrics[f"leaderboard/{name}"] = _num(row.get(col))
        for k in ROW_METRICS:
            if _num(row.get(k)) is not None:
                metrics[k] = _num(row.get(k))
        status = str(row.get("status", ""))
        tags = {"status": status, "error": str(row.get("error") or "")[:MAX_TAG],
                "finished_at": str(row.get("finished_at") or ""), "resumed": str(row.get("resumed", "")),
                "eoplugins_records": str(step + 1)}
        self.client.log_batch(mlflow_id, metrics=[Metric(k, v, ts, step) for k, v in metrics.items()],
                              tags=[RunTag(k, v) for k, v in tags.items()])
        self._log_run_files(mlflow_id, run, row)
        self.client.set_terminated(mlflow_id, "FINISHED" if status == "ok" else "FAILED")
        latest = self.client.get_run(mlflow_id)
        others = [r for r in self._children.get(run_id, []) if r.info.run_id != mlflow_id]
        self._children[run_id] = [latest, *others]
        return mlflow_id

    def _log_run_files(self, mlflow_id: str, run: RunSpec | None, row: dict) -> None:
        rdir = self.runner.runs_dir / str(row["run_id"])
        if (rdir / "run.yaml").is_file():
            self.client.log_artifact(mlflow_id, str(rdir / "run.yaml"))
        with tempfile.TemporaryDirectory(prefix="eoplugins-mlflow-") as tmp:
            if row.get("command"):
                (Path(tmp) / "command.txt").write_text(str(row["command"]) + "\n")
                self.client.log_artifact(mlflow_id, str(Path(tmp) / "command.txt"))
            if run is not None:
                from terratorch_eoplugins.benchmark.compose import compose_run_config

                try:
                    composed = compose_run_config(self.runner, run)
                except Exception as err:  # noqa: BLE001 - a piece edited since: the row is still worth logging
                    self.client.set_tag(mlflow_id, "config_error", f"{type(err).__name__}: {err}"[:MAX_TAG])
                else:
                    (Path(tmp) / "config.yaml").write_text(
                        f"# {run.run_id}: composed config (pieces + overrides) of sweep {self.runner.sweep.path}\n"
                        + yaml.safe_dump(composed, sort_keys=False))
                    self.client.log_artifact(mlflow_id, str(Path(tmp) / "config.yaml"))

    def on_row(self, row: dict) -> None:
        """:meth:`log_row` that never stops the sweep: a failure is reported once on stderr (``sync`` retries)."""
        try:
            self.log_row(row)
        except Exception as err:  # noqa: BLE001
            if not self._warned:
                print(f"eoplugins sweep: MLflow ({self.uri}): could not log {row.get('run_id')}: "
                      f"{type(err).__name__}: {err} (logged again at the end of the sweep)", file=sys.stderr)
                self._warned = True

    def sync(self, rows: Iterable[dict]) -> int:
        """Log every row whose sweep run's MLflow run does not hold it yet (by ``finished_at``); returns how many."""
        n = 0
        for row in rows:
            runs = self._children.get(str(row["run_id"]), [])
            if runs and runs[0].data.tags.get("finished_at") == str(row.get("finished_at") or ""):
                continue
            self.log_row(row)
            n += 1
        return n

    def finish(self, files: Iterable[Path], failed: bool) -> None:
        """Attach the results files (CSV, leaderboard, plot) to the parent run and end it."""
        for f in files:
            if Path(f).is_file():
                self.client.log_artifact(self.parent_id, str(f), artifact_path="results")
        self.client.set_terminated(self.parent_id, "FAILED" if failed else "FINISHED")
