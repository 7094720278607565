"""Run a sweep through the real terratorch CLI: one ``terratorch fit`` + ``terratorch test`` subprocess pair per run.

Each run lives in ``<runs>/<sweep>/<run_id>/`` (``fit/`` and ``test/`` CSV-logger folders, ``fit.log``/``test.log``,
``fit_stats.json``/``test_stats.json`` from :class:`~terratorch_eoplugins.benchmark.callbacks.BenchmarkStats`,
``attempts.jsonl``) and ends as one row appended to ``<results>/<sweep>.csv``.

Resume semantics (re-running the same command):

- a run with a row in the CSV is finished and skipped (``ok``; ``failed`` too unless ``retry_failed``);
- a run without a row is unfinished: if its ``fit.done`` marker exists, fitting completed and only the test runs;
  else if ``fit/checkpoints/last.ckpt`` exists (written at every epoch end), ``terratorch fit`` continues from it
  with ``--ckpt_path`` (Lightning restores weights, optimizer, epoch and loop state); else the fit starts over;
- ``train_s`` is the sum of the fit subprocesses' wall times over all attempts (``attempts.jsonl``), so a resumed
  run reports the total time it cost; ``resumed`` says whether it was continued.

Rows are appended atomically (one ``write`` of the whole line under an exclusive ``flock``), so several sweep
processes or Ray tasks (:mod:`~terratorch_eoplugins.benchmark.engine`; ``--shard i/n`` on several machines with a
shared results folder) can write to the same CSV.
Peak memory: ``ru_maxrss`` of the fit process from ``os.wait4`` (the largest resident set of that process and of
any descendants it waited for, e.g. DDP workers), and ``torch.cuda.max_memory_allocated`` of rank 0 on GPU.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from terratorch_eoplugins.benchmark.callbacks import STATS_ENV
from terratorch_eoplugins.benchmark.spec import (
    RunSpec,
    Sweep,
    data_root_overrides,
    model_overrides,
    top_level_data_piece,
)
from terratorch_eoplugins.runtime import ProcResult, read_last_metrics, run_process, terratorch_command

CALLBACK = "terratorch_eoplugins.benchmark.callbacks.BenchmarkStats"

#: leaderboard metrics per task kind: (column, source key in the test metrics / stats, higher is better)
METRICS: dict[str, list[tuple[str, str, bool]]] = {
    "segmentation": [("IoU", "test/mIoU", True), ("Acc", "test/Accuracy", True), ("F1", "test/F1_Score", True)],
    "regression": [("RMSE", "test/RMSE", False), ("MAE", "test/MAE", False), ("r", "pearson_r", True)],
}

COLUMNS = ["run_id", "sweep", "model", "model_label", "pretrained", "task", "task_label", "kind", "setting",
           "setting_label", "label_fraction", "seed", "status", "m1", "m2", "m3", "metric_names",
           "tunable_params", "total_params", "train_s", "train_loop_s", "pretrain_s", "test_s", "test_samples",
           "test_pixels", "peak_rss_mb", "cuda_peak_mb", "world_size", "resumed", "finished_at", "command", "error",
           "metrics"]
#: the header of results CSVs written before ``test_samples`` / ``test_pixels`` existed: a sweep resumed on such a
#: file appends its rows with this header's columns (the new ones are then only in the runs' ``test_stats.json``)
LEGACY_COLUMNS = [c for c in COLUMNS if c not in ("test_samples", "test_pixels")]


def select_metrics(kind: str, metrics: dict[str, float], keys: dict[str, str] | None = None) -> list[float]:
    """The three leaderboard values of a task kind (NaN where the run did not log one).

    ``keys`` maps a column (``IoU``, ``r``, ...) to another logged key, for tasks with their own metric names.
    """
    if kind not in METRICS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {sorted(METRICS)}")
    keys = keys or {}
    unknown = set(keys) - {c for c, _, _ in METRICS[kind]}
    if unknown:
        raise ValueError(f"metric column(s) {sorted(unknown)} do not exist for {kind}; "
                         f"expected some of {[c for c, _, _ in METRICS[kind]]}")
    return [float(metrics.get(keys.get(col, key), math.nan)) for col, key, _ in METRICS[kind]]


class SweepOutputError(FileExistsError):
    """A sweep output path holds a file that the sweep did not write; the message names it."""


def _header_line(columns: list[str] = COLUMNS) -> bytes:
    head = io.StringIO()
    csv.writer(head).writerow(columns)
    return head.getvalue().encode()


def check_results_csv(path: Path) -> list[str]:
    """The columns rows are appended with: :data:`COLUMNS` for a new or empty file, the file's own header
    (:data:`COLUMNS` or :data:`LEGACY_COLUMNS`) otherwise. Raise :class:`SweepOutputError` when ``path`` exists, is not
    empty and is not a results CSV of a sweep: rows are only ever appended to files the sweep created."""
    if not path.exists():
        return COLUMNS
    if not path.is_file():
        raise SweepOutputError(f"{path}: exists and is not a file; the sweep writes its results CSV there")
    with open(path, "rb") as f:
        first = f.readline(1 << 16)
    if not first:  # empty file
        return COLUMNS
    for columns in (COLUMNS, LEGACY_COLUMNS):
        if first.rstrip(b"\r\n") == _header_line(columns).rstrip(b"\r\n"):
            return columns
    raise SweepOutputError(f"{path}: not a results CSV written by `eoplugins sweep` (its header is not the sweep's "
                           f"{len(COLUMNS)} columns run_id,sweep,...,metrics); refusing to append to it: move it "
                           "away or choose another --results-dir")


def append_row(path: Path, row: dict) -> None:
    """Append one CSV row atomically (header first if the file is new), under an exclusive lock.

    Raises :class:`SweepOutputError` (nothing written) when the file exists with another header.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"results row has unknown column(s) {sorted(unknown)}")

    def line(columns: list[str]) -> bytes:
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=columns).writerow({k: row.get(k, "") for k in columns})
        return buf.getvalue().encode()

    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_size == 0:
            data = _header_line() + line(COLUMNS)
        else:
            data = line(check_results_csv(path))
        os.write(fd, data)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_rows(path: Path) -> list[dict]:
    """Rows of a results CSV (empty if absent)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def latest_rows(path: Path) -> dict[str, dict]:
    """The last row per run_id (a retried run's new row wins)."""
    return {r["run_id"]: r for r in read_rows(path)}


def run_logged(cmd: list[str], log: Path, env: dict[str, str], cwd: Path, timeout: float | None) -> ProcResult:
    """Run ``cmd`` with stdout+stderr to ``log`` (:func:`terratorch_eoplugins.runtime.run_process`)."""
    return run_process(cmd, env=env, cwd=cwd, log=log, timeout=timeout)


def error_tail(text: str, n: int = 1200) -> str:
    """The informative end of a failed log: from the last traceback (or the last ``n`` characters)."""
    i = text.rfind("Traceback (most recent call last)")
    tail = text[i:] if i >= 0 else text
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    err = [ln for ln in lines if re.match(r"^\w*(Error|Exception|TIMEOUT)\b|^\S+Error:", ln.strip())]
    head = (err[-1].strip()[:300] + " | ") if err else ""
    return head + " / ".join(lines)[-(n - len(head)):]


class SweepRunner:
    """Execute (or resume) the runs of a :class:`~terratorch_eoplugins.benchmark.spec.Sweep`.

    Args:
        sweep: the parsed sweep.
        repo: folder the config pieces are relative to (and the subprocesses' working directory).
        runs_dir: parent of the per-run folders (``<runs_dir>/<sweep>/<run_id>``).
        results_dir: where ``<sweep>.csv`` (and the leaderboard) go; default ``<runs_dir>/<sweep>/results`` (the
            committed ``benchmarks/results`` is read and appended to only when given explicitly).
        world: data world replacing the pieces' ``data/demo/`` roots (default: the sweep's ``world``).
        extra: overrides appended to every terratorch call (e.g. ``--trainer.devices=2``).
        keep_checkpoints: keep the fine-tuning checkpoints after a successful test (default: delete them).
        retry_failed: run again the runs recorded as failed.
        timeout: per-subprocess time limit in seconds.
        env: environment of the subprocesses (default: this one, ``HF_HUB_OFFLINE=1``).
        log: progress printer.
    """

    def __init__(self, sweep: Sweep, repo: str | Path = ".", runs_dir: str | Path = "runs/sweeps",
                 results_dir: str | Path | None = None, world: str | None = None,
                 extra: Iterable[str] = (), keep_checkpoints: bool = False, retry_failed: bool = False,
                 timeout: float | None = None, env: dict[str, str] | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.sweep = sweep
        self.repo = Path(repo).resolve()
        self.runs_dir = Path(runs_dir).resolve() / sweep.name
        self.results_dir = (self.runs_dir / "results" if results_dir is None else Path(results_dir)).resolve()
        self.world = world or sweep.world
        self.extra = list(extra)
        self.keep_checkpoints = keep_checkpoints
        self.retry_failed = retry_failed
        self.timeout = timeout
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.log = log

    @property
    def csv_path(self) -> Path:
        return self.results_dir / f"{self.sweep.name}.csv"

    # ---- command lines ----
    def _world(self, data_piece: str) -> list[str]:
        return data_root_overrides(self.repo / data_piece, self.world)

    def write_run_config(self, run: RunSpec) -> Path:
        """``<run dir>/run.yaml``: the pieces composed like a top-level config (terratorch needs a ``-c`` file)."""
        path = self.runs_dir / run.run_id / "run.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# eoplugins sweep {self.sweep.path}: run {run.run_id}\n"
                        f"seed_everything: {run.seed}\n"
                        f"trainer: {self.repo / run.trainer}\n"
                        f"data: {self.repo / run.data}\n"
                        f"model: {self.repo / run.model_piece}\n")
        return path

    def run_args(self, run: RunSpec, pretrain_ckpt: Path | None = None) -> list[str]:
        """Everything after the subcommand, shared by ``fit`` and ``test`` (logger/ckpt options excluded)."""
        profile = ["-c", str(self.repo / run.profile)] if run.profile else []
        return ["-c", str(self.write_run_config(run)), *profile, *self.override_args(run, pretrain_ckpt)]

    def override_args(self, run: RunSpec, pretrain_ckpt: Path | None = None) -> list[str]:
        """The overrides after ``-c run.yaml``: world roots, label fraction, model patch, pretrained checkpoint,
        the run's overrides and the sweep-wide extra arguments (nothing is written)."""
        args = self._world(run.data)
        if run.label_fraction != 1.0:
            args.append(f"--data.init_args.label_fraction={run.label_fraction}")
        if run.fold is not None:
            args.append(f"--data.init_args.{run.fold_arg}={run.fold}")
        args += model_overrides(self.repo / run.model_piece, run.model_patch,
                                self.repo / run.profile if run.profile else None)
        if run.pretrain is not None and pretrain_ckpt is not None:
            args.append(f"--{run.pretrain.ckpt_arg}={pretrain_ckpt}")
        return [*args, *run.overrides, *self.extra]

    def pretrain_ckpt(self, run: RunSpec) -> Path | None:
        """The checkpoint of ``run``'s finished pretraining stage (``None``: none, or not finished yet)."""
        if run.pretrain is None:
            return None
        done = self.runs_dir / "_pretrain" / run.pretrain_id / "pretrain.done"
        return Path(json.loads(done.read_text())["ckpt"]) if done.is_file() else None

    def _logger_args(self, save_dir: Path, name: str, version: str) -> list[str]:
        return [f"--trainer.default_root_dir={save_dir}", f"--trainer.logger.init_args.save_dir={save_dir}",
                f"--trainer.logger.init_args.name={name}", f"--trainer.logger.init_args.version={version}",
                f"--trainer.callbacks+={CALLBACK}"]

    def _env(self, stats: Path) -> dict[str, str]:
        return {**self.env, STATS_ENV: str(stats)}

    # ---- stages ----
    def _pretrain(self, run: RunSpec) -> tuple[Path | None, float, str]:
        """Run (or reuse) the model x task x seed pretraining; ``(ckpt, seconds, error)``."""
        pre = run.pretrain
        assert pre is not None
        pdir = self.runs_dir / "_pretrain" / run.pretrain_id
        done = pdir / "pretrain.done"
        if done.is_file():  # finished earlier (a resumed sweep, or another model entry sharing it): its own time
            info = json.loads(done.read_text())
            return Path(info["ckpt"]), float(info.get("wall_s", 0.0)), ""
        config = self.repo / pre.config
        profile = ["-c", str(self.repo / pre.profile)] if pre.profile else []
        args = ["fit", "-c", pre.config, *profile, f"--seed_everything={run.seed}",
                *data_root_overrides(top_level_data_piece(config), self.world), *pre.overrides, *self.extra,
                *self._logger_args(pdir.parent, pdir.name, "fit")]
        last = pdir / "fit" / "checkpoints" / "last.ckpt"
        if last.is_file():
            args.append(f"--ckpt_path={last}")
        self.log(f"  pretrain {run.pretrain_id}")
        res = run_logged([*terratorch_command(), *args], pdir / "pretrain.log", self._env(pdir / "pretrain_stats.json"),
                         self.repo, self.timeout)
        if res.returncode != 0:
            return None, res.wall_s, "pretrain: " + _failure(res)
        ckpt = _pick_ckpt(pdir / "fit" / "checkpoints", prefer=pre.ckpt)
        if ckpt is None:
            return None, res.wall_s, f"pretrain: no checkpoint under {pdir / 'fit' / 'checkpoints'}"
        done.write_text(json.dumps({"ckpt": str(ckpt), "wall_s": res.wall_s}))
        return ckpt, res.wall_s, ""

    def execute(self, run: RunSpec, pretrained: tuple[Path | None, float, str] | None = None) -> dict:
        """Fit (resuming if possible) and test one run; returns the result row (also appended to the CSV).

        ``pretrained``: the ``(ckpt, seconds, error)`` of the run's pretraining stage when it already ran (the Ray
        engine runs each pretraining once, as a task the fine-tuning tasks depend on); ``None``: run or reuse it here.
        """
        rdir = self.runs_dir / run.run_id
        rdir.mkdir(parents=True, exist_ok=True)
        row: dict = {k: getattr(run, k) for k in ("sweep", "model", "model_label", "pretrained", "task", "task_label",
                                                  "kind", "setting", "setting_label", "label_fraction", "seed")}
        row.update(run_id=run.run_id, status="failed", resumed=False,
                   metric_names="/".join(c for c, _, _ in METRICS[run.kind]))
        pre_ckpt, pre_s, err = None, 0.0, ""
        if run.pretrain is not None:
            pre_ckpt, pre_s, err = self._pretrain(run) if pretrained is None else pretrained
        row["pretrain_s"] = round(pre_s, 2)
        base = self.run_args(run, pre_ckpt)
        fit_cmd = [*terratorch_command(), "fit", *base, *self._logger_args(rdir.parent, rdir.name, "fit")]
        row["command"] = " ".join(["terratorch", "fit", *base])
        if err:
            return self._finish(row, rdir, err)

        done = rdir / "fit.done"
        attempts = rdir / "attempts.jsonl"
        if not done.is_file():
            last = rdir / "fit" / "checkpoints" / "last.ckpt"
            if last.is_file():
                fit_cmd.append(f"--ckpt_path={last}")
                row["resumed"] = True
                self.log(f"  resuming from {last}")
            elif (rdir / "fit").exists():
                shutil.rmtree(rdir / "fit")
            res = run_logged(fit_cmd, rdir / "fit.log", self._env(rdir / "fit_stats.json"), self.repo, self.timeout)
            with open(attempts, "a") as f:
                f.write(json.dumps({"wall_s": res.wall_s, "rc": res.returncode, "maxrss_mb": res.maxrss_mb,
                                    "resumed": row["resumed"]}) + "\n")
            if res.returncode != 0:
                row.update(train_s=round(res.wall_s, 2), peak_rss_mb=round(res.maxrss_mb, 1))
                return self._finish(row, rdir, "fit: " + _failure(res))
            done.write_text(json.dumps({"maxrss_mb": res.maxrss_mb}))
        else:
            row["resumed"] = True
        tries = [json.loads(ln) for ln in attempts.read_text().splitlines() if ln.strip()] if attempts.is_file() else []
        row["train_s"] = round(sum(t["wall_s"] for t in tries), 2)
        row["peak_rss_mb"] = round(max((t["maxrss_mb"] for t in tries), default=math.nan), 1)
        stats = _read_json(rdir / "fit_stats.json")
        for k in ("tunable_params", "total_params", "world_size"):
            row[k] = stats.get(k, "")
        row["train_loop_s"] = round(stats["train_s"], 2) if "train_s" in stats else ""
        row["cuda_peak_mb"] = round(stats["cuda_peak_mb"], 1) if "cuda_peak_mb" in stats else ""

        ckpt = _pick_ckpt(rdir / "fit" / "checkpoints", prefer="best")
        if ckpt is None:
            return self._finish(row, rdir, f"fit: no checkpoint under {rdir / 'fit' / 'checkpoints'}")
        if (rdir / "test").exists():
            shutil.rmtree(rdir / "test")
        test_cmd = [*terratorch_command(), "test", *base, *self._logger_args(rdir.parent, rdir.name, "test"),
                    f"--ckpt_path={ckpt}"]
        res = run_logged(test_cmd, rdir / "test.log", self._env(rdir / "test_stats.json"), self.repo, self.timeout)
        if res.returncode != 0:
            return self._finish(row, rdir, "test: " + _failure(res))
        metrics = read_last_metrics(rdir / "test" / "metrics.csv") if (rdir / "test" / "metrics.csv").is_file() else {}
        tstats = _read_json(rdir / "test_stats.json")
        if "pearson_r" in tstats:
            metrics["pearson_r"] = tstats["pearson_r"]
        vals = select_metrics(run.kind, metrics, run.metric_keys)
        if all(math.isnan(v) for v in vals):
            return self._finish(row, rdir, f"test: none of {[k for _, k, _ in METRICS[run.kind]]} was logged "
                                           f"(got {sorted(metrics)})")
        row.update(m1=vals[0], m2=vals[1], m3=vals[2], test_s=round(res.wall_s, 2), status="ok",
                   test_samples=tstats.get("test_samples", ""), test_pixels=tstats.get("test_pixels", ""),
                   metrics=json.dumps({k: v for k, v in metrics.items() if k.startswith("test/") or k == "pearson_r"}))
        if not row.get("tunable_params"):
            row["tunable_params"] = tstats.get("tunable_params", "")
            row["total_params"] = tstats.get("total_params", "")
        if not self.keep_checkpoints:
            shutil.rmtree(rdir / "fit" / "checkpoints", ignore_errors=True)
        return self._finish(row, rdir, "")

    def _finish(self, row: dict, rdir: Path, error: str) -> dict:
        row["error"] = error
        row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        append_row(self.csv_path, row)
        self.log(row_message(row, rdir))
        return row

    def record_failure(self, run: RunSpec, error: str) -> dict:
        """Append a ``failed`` row for ``run`` whose execution raised (``error`` names where and why); returns it."""
        row = {k: getattr(run, k) for k in ("sweep", "model", "model_label", "pretrained", "task", "task_label",
                                            "kind", "setting", "setting_label", "label_fraction", "seed")}
        row.update(run_id=run.run_id, status="failed")
        return self._finish(row, self.runs_dir / run.run_id, error)

    def execute_recorded(self, run: RunSpec, pretrained: tuple[Path | None, float, str] | None = None) -> dict:
        """:meth:`execute`, with an exception in the run's setup recorded as a ``failed`` row instead of raised."""
        try:
            return self.execute(run) if pretrained is None else self.execute(run, pretrained)
        except Exception as e:  # a bug in one run's setup (bad piece, unreadable YAML) must not stop the sweep
            return self.record_failure(run, f"runner: {type(e).__name__}: {e}")

    def pending(self, runs: Iterable[RunSpec] | None = None) -> list[RunSpec]:
        """Runs without a final row (failed ones too with ``retry_failed``)."""
        done = latest_rows(self.csv_path)
        out = []
        for r in (self.sweep.runs if runs is None else runs):
            prev = done.get(r.run_id)
            if prev is None or (self.retry_failed and prev["status"] != "ok"):
                out.append(r)
        return out

    def run(self, runs: Iterable[RunSpec] | None = None, retries: int = 0,
            on_row: Callable[[dict], None] | None = None) -> list[dict]:
        """Execute every pending run, one after the other (the local engine); never stops on a failed one.

        Args:
            runs: the runs to consider (default: the sweep's); those with a final row are skipped (:meth:`pending`).
            retries: run a run that failed in this call again, up to this many times (each attempt leaves a row;
                the last one counts, and a retry resumes from what the failed attempt left, as a re-run does).
            on_row: called with every row as it is recorded (e.g. MLflow tracking).
        """
        todo = self.pending(runs)
        self.log(f"sweep {self.sweep.name}: {len(todo)} run(s) to do -> {self.csv_path}")
        rows = []
        for i, r in enumerate(todo, 1):
            for attempt in range(retries + 1):
                self.log(f"[{i}/{len(todo)}] {r.run_id}" + (f" (retry {attempt}/{retries})" if attempt else ""))
                row = self.execute_recorded(r)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
                if row.get("status") == "ok":
                    break
        return rows


def row_message(row: dict, rdir: Path) -> str:
    """The progress line of a recorded row (status, run id, metrics or the error and the run folder)."""
    msg = f"{row['status']:6s} {row['run_id']}"
    if row["status"] == "ok":
        msg += f"  {row['metric_names']} = " + "/".join(f"{row[k]:.3f}" for k in ("m1", "m2", "m3"))
        msg += f"  tunable {row.get('tunable_params')}  train {row.get('train_s')} s"
    else:
        msg += f"  {str(row.get('error', ''))[:300]}  (log: {rdir})"
    return msg


def _failure(res: ProcResult) -> str:
    """Error text of a failed subprocess; a negative return code is a signal (9: out of memory or timeout)."""
    sig = f"killed by signal {-res.returncode} (peak RSS {res.maxrss_mb:.0f} MB) | " if res.returncode < 0 else ""
    return sig + error_tail(res.tail)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _pick_ckpt(folder: Path, prefer: str = "best") -> Path | None:
    """The newest ``best-*.ckpt`` (``prefer='best'``) or ``last.ckpt``, falling back to the other."""
    if not folder.is_dir():
        return None
    best = sorted(folder.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
    last = folder / "last.ckpt"
    others = sorted((p for p in folder.glob("*.ckpt") if p != last and p not in best), key=lambda p: p.stat().st_mtime)
    order = ([best[-1]] if best else []) + ([last] if last.is_file() else []) if prefer == "best" else \
        ([last] if last.is_file() else []) + ([best[-1]] if best else [])
    order += others[-1:]
    return order[0] if order else None
