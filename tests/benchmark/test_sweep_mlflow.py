"""``eoplugins sweep --mlflow``, ``--retries`` with the local engine, the composed run config and its
terratorch-iterate export.

The terratorch runs are replaced by a fake :meth:`SweepRunner.execute` that writes ``run.yaml`` and records a row
the way the real one does (through ``_finish``), so these tests need no subprocess; the Ray engine's real runs
are tracked in ``test_sweep_ray.py``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from terratorch_eoplugins.benchmark import runner as runner_mod
from terratorch_eoplugins.benchmark.compose import (
    ITERATE_MARKER,
    ComposeError,
    apply_override,
    compose_run_config,
    iterate_config,
    parse_overrides,
)
from terratorch_eoplugins.benchmark.runner import SweepRunner, append_row, read_rows
from terratorch_eoplugins.benchmark.spec import load_sweep
from terratorch_eoplugins.cli import main

pytest.importorskip("mlflow", reason="mlflow-skinny is in the test extra")

REPO = Path(__file__).resolve().parents[2]
MICRO = "configs/models/pastis/micro_unet.yaml"
A, B = "micro__pastis__full__lf100__s0", "micro__pastis__full__lf050__s0"


def _sweep(tmp: Path) -> Path:
    spec = {"name": "t", "trainer": "configs/trainer/cpu.yaml", "overrides": ["--trainer.max_epochs=1"],
            "label_fractions": [1.0, 0.5], "settings": {"full": {"label": "Full", "model": {"freeze_backbone": False}}},
            "tasks": {"pastis": {"label": "PASTIS", "data": "configs/data/pastis.yaml"}},
            "models": [{"name": "micro", "label": "Micro UNet", "tasks": {"pastis": {"model": MICRO}}}]}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def fake_runs(monkeypatch: pytest.MonkeyPatch) -> dict:
    """``execute`` writes run.yaml and records a row: ``ok`` unless the run id's queue of outcomes says otherwise."""
    plan: dict = {"executed": []}

    def execute(self: SweepRunner, run) -> dict:  # noqa: ANN001
        plan["executed"].append(run.run_id)
        self.run_args(run)  # writes <run dir>/run.yaml as the real execute does
        queue = plan.get(run.run_id) or ["ok"]
        status = queue.pop(0) if len(queue) > 1 else queue[0]
        row = {k: getattr(run, k) for k in ("sweep", "model", "model_label", "pretrained", "task", "task_label",
                                            "kind", "setting", "setting_label", "label_fraction", "seed")}
        m = 0.25 + run.label_fraction / 4
        row.update(run_id=run.run_id, status=status, m1=m, m2=0.6, m3=0.7, metric_names="IoU/Acc/F1",
                   tunable_params=510_000, total_params=520_000, train_s=1.5, test_s=0.5, peak_rss_mb=100.0,
                   resumed=False, command="terratorch fit -c x",
                   metrics=json.dumps({"test/mIoU": m, "test/F1_Score": 0.7, "test/IoU_Fruits, vegetables": 0.1}))
        return self._finish(row, self.runs_dir / run.run_id, "" if status == "ok" else "fit: boom")

    monkeypatch.setattr(runner_mod.SweepRunner, "execute", execute)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return plan


def _args(path: Path, tmp: Path, *more: str) -> list[str]:
    return ["sweep", str(path), "--repo", str(REPO), "--runs-dir", str(tmp / "runs"), "--world", str(tmp), *more]


def _store(tmp: Path):  # noqa: ANN202
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp / "runs" / "t" / "mlruns").as_uri())
    exp = client.get_experiment_by_name("t")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("eoplugins_role") == "sweep"]
    children = {r.data.tags["eoplugins_run_id"]: r for r in runs if r.data.tags.get("eoplugins_role") == "run"}
    return client, parent, children, runs


def test_mlflow_tracks_every_run_and_the_leaderboard_and_retries_keep_one_run_each(
        tmp_path: Path, fake_runs: dict, capsys: pytest.CaptureFixture) -> None:
    path = _sweep(tmp_path)
    fake_runs[B] = ["failed", "ok"]  # fails once, then succeeds on the retry of the same invocation
    assert main([*_args(path, tmp_path), "--retries", "1"]) == 0  # tracked by default: the client is installed
    assert fake_runs["executed"] == [A, B, B]
    csv = tmp_path / "runs" / "t" / "results" / "t.csv"
    assert [(r["run_id"], r["status"]) for r in read_rows(csv)] == [(A, "ok"), (B, "failed"), (B, "ok")]

    client, parent, children, runs = _store(tmp_path)
    assert len(parent) == 1 and set(children) == {A, B} and len(runs) == 3
    a = children[A]
    assert a.data.tags["mlflow.parentRunId"] == parent[0].info.run_id and a.info.status == "FINISHED"
    params = a.data.params
    assert (params["model"], params["task"], params["setting"], params["label_fraction"], params["seed"]) == \
        ("micro", "pastis", "full", "1.0", "0")
    assert json.loads(params["overrides"]) == ["--trainer.max_epochs=1"]
    assert json.loads(params["model_patch"]) == {"freeze_backbone": False} and params["model_piece"] == MICRO
    m = a.data.metrics
    assert m["test/mIoU"] == m["leaderboard/IoU"] == 0.5 and m["leaderboard/F1"] == 0.7
    assert m["test/IoU_Fruits_ vegetables"] == 0.1  # a class name's comma: refused by MLflow in a metric name
    assert (m["tunable_params"], m["total_params"], m["train_s"], m["test_s"]) == (510_000, 520_000, 1.5, 0.5)
    assert {f.path for f in client.list_artifacts(a.info.run_id)} == {"run.yaml", "config.yaml", "command.txt"}
    local = Path(client.download_artifacts(a.info.run_id, "run.yaml", str(tmp_path)))
    assert local.read_text() == (tmp_path / "runs" / "t" / A / "run.yaml").read_text()
    composed = yaml.safe_load(Path(client.download_artifacts(a.info.run_id, "config.yaml", str(tmp_path))).read_text())
    assert composed["trainer"]["max_epochs"] == 1 and composed["model"]["init_args"]["freeze_backbone"] is False
    # the retried run: one MLflow run, both records as steps, the last status wins
    b = children[B]
    assert b.info.status == "FINISHED" and b.data.tags["status"] == "ok" and b.data.tags["eoplugins_records"] == "2"
    assert [x.step for x in client.get_metric_history(b.info.run_id, "test/mIoU")] == [0, 1]
    assert {f.path for f in client.list_artifacts(parent[0].info.run_id, "results")} == \
        {"results/t.csv", "results/t.md", "results/t.png"}
    assert parent[0].info.status == "FINISHED" and parent[0].data.tags["engine"] == "local"

    # nothing to do: no new MLflow run and no new record; a row the store lacks (another shard's) is logged
    assert main([*_args(path, tmp_path), "--mlflow"]) == 0
    assert len(_store(tmp_path)[3]) == 3
    row = dict(read_rows(csv)[0], m1=0.9, finished_at="2099-01-01T00:00:00", metrics=json.dumps({"test/mIoU": 0.9}))
    append_row(csv, row)
    assert main([*_args(path, tmp_path), "--mlflow", "--render"]) == 0
    client, parent, children, runs = _store(tmp_path)
    assert len(runs) == 3 and children[A].data.metrics["test/mIoU"] == 0.9
    assert children[A].data.tags["finished_at"] == "2099-01-01T00:00:00"


def test_no_mlflow_leaves_no_store_and_a_missing_client_is_said(
        tmp_path: Path, fake_runs: dict, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    path = _sweep(tmp_path)
    assert main([*_args(path, tmp_path), "--no-mlflow"]) == 0
    assert not (tmp_path / "runs" / "t" / "mlruns").exists()
    assert main([*_args(path, tmp_path), "--no-mlflow", "--mlflow-uri", str(tmp_path / "s")]) == 2
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    capsys.readouterr()
    assert main([*_args(path, tmp_path), "--render"]) == 0
    assert "MLflow: not installed, this sweep is not tracked" in capsys.readouterr().out
    assert not (tmp_path / "runs" / "t" / "mlruns").exists()


def test_failed_retries_exit_1_and_a_bad_tracking_uri_stops_before_running(
        tmp_path: Path, fake_runs: dict, capsys: pytest.CaptureFixture) -> None:
    path = _sweep(tmp_path)
    fake_runs[B] = ["failed"]
    assert main([*_args(path, tmp_path), "--retries", "2"]) == 1
    assert fake_runs["executed"] == [A, B, B, B]
    assert "1 run(s) failed: " + B in capsys.readouterr().err
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("mine\n")
    fake_runs["executed"].clear()
    assert main([*_args(path, tmp_path), "--retry-failed", "--mlflow-uri", str(not_a_dir / "mlruns")]) == 2
    assert "MLflow tracking URI" in capsys.readouterr().err and fake_runs["executed"] == []
    assert not_a_dir.read_text() == "mine\n"


def test_engine_flags_are_checked(tmp_path: Path, fake_runs: dict, capsys: pytest.CaptureFixture) -> None:
    path = _sweep(tmp_path)
    assert main([*_args(path, tmp_path), "--gpus-per-run", "1"]) == 2
    assert "--gpus-per-run: only with --engine ray" in capsys.readouterr().err
    assert main([*_args(path, tmp_path), "--engine", "ray", "--shard", "0/2"]) == 2
    assert "--shard: only with --engine local" in capsys.readouterr().err
    assert main([*_args(path, tmp_path), "--retries", "-1"]) == 2
    assert fake_runs["executed"] == []


def test_overrides_compose_as_jsonargparse_reads_them(tmp_path: Path) -> None:
    cfg = {"trainer": {"callbacks": [{"class_path": "x.A"}], "logger": {"class_path": "x.L", "init_args": {}}},
           "data": {"class_path": "x.D", "init_args": {"root": "data/demo/P"}}}
    for path, value, append in parse_overrides(["--trainer.max_epochs=2", "--trainer.callbacks+=pkg.Stats",
                                                "--data.root", "/w/P", "--trainer.logger.init_args.save_dir=/s",
                                                "--data.init_args.bands=[B2, B3]"]):
        apply_override(cfg, path, value, append)
    assert cfg["trainer"]["max_epochs"] == 2
    assert cfg["trainer"]["callbacks"] == [{"class_path": "x.A"}, {"class_path": "pkg.Stats"}]
    assert cfg["data"]["init_args"] == {"root": "/w/P", "bands": ["B2", "B3"]}  # under class_path: into init_args
    assert cfg["trainer"]["logger"]["init_args"]["save_dir"] == "/s"
    with pytest.raises(ComposeError, match="override '-c'"):
        parse_overrides(["-c", "x.yaml"])
    with pytest.raises(ComposeError, match=r"--trainer.max_epochs.x: trainer.max_epochs is int"):
        apply_override(cfg, ["trainer", "max_epochs", "x"], 1)

    # a sweep run: pieces inlined, world roots, label fraction, the setting's patch, overrides and extra arguments
    sweep = load_sweep(_sweep(tmp_path), repo=REPO)
    runner = SweepRunner(sweep, repo=REPO, runs_dir=tmp_path / "runs", world="/w", extra=["--trainer.devices=2"])
    run = next(r for r in sweep.runs if r.run_id == B)
    c = compose_run_config(runner, run)
    assert c["seed_everything"] == 0 and c["trainer"]["max_epochs"] == 1 and c["trainer"]["devices"] == 2
    assert c["trainer"]["logger"]["class_path"].endswith("ConfigNamedCSVLogger")  # logger/csv.yaml inlined
    assert isinstance(c["trainer"]["callbacks"], list)
    assert c["data"]["init_args"]["root"] == "/w/PASTIS-R" and c["data"]["init_args"]["label_fraction"] == 0.5
    assert c["model"]["init_args"]["freeze_backbone"] is False
    assert c["model"]["init_args"]["model_args"]["backbone"] == "micro_unet"
    assert not (tmp_path / "runs").exists()  # composing writes nothing


def test_export_iterate_writes_a_config_terratorch_iterate_builds(
        tmp_path: Path, fake_runs: dict, capsys: pytest.CaptureFixture) -> None:
    from terratorch.tasks import SemanticSegmentationTask

    from terratorch_eoplugins.datamodules.pastis import PASTISDataModule

    path = _sweep(tmp_path)
    out = tmp_path / "it.yaml"
    assert main([*_args(path, tmp_path), "--export-iterate", B, str(out)]) == 0
    text = out.read_text()
    assert text.splitlines()[0] == ITERATE_MARKER and "# note: seed_everything 0" in text
    cfg = yaml.safe_load(text)
    assert (cfg["experiment_name"], cfg["run_name"], cfg["n_trials"], cfg["optimization_space"]) == ("t", B, 1, {})
    assert cfg["defaults"]["trainer_args"]["max_epochs"] == 1
    assert not {"logger", "callbacks", "default_root_dir"} & set(cfg["defaults"]["trainer_args"])
    (task,) = cfg["tasks"]
    assert (task["name"], task["type"], task["metric"], task["direction"]) == ("pastis", "segmentation", "val/mIoU",
                                                                                "max")
    assert task["datamodule"]["init_args"]["label_fraction"] == 0.5
    assert task["datamodule"]["init_args"]["root"] == str(tmp_path / "PASTIS-R")
    # what terratorch-iterate does with it: Task(**terratorch_task), the datamodule from class_path/init_args
    model = SemanticSegmentationTask(**task["terratorch_task"])
    assert sum(p.numel() for p in model.parameters()) > 400_000
    assert task["datamodule"]["class_path"] == "terratorch_eoplugins.datamodules.pastis.PASTISDataModule"
    PASTISDataModule(**task["datamodule"]["init_args"])
    assert fake_runs["executed"] == [] and not (tmp_path / "runs").exists()

    # its own export is replaced; a file it did not write is not; an unknown run is a usage error
    assert main([*_args(path, tmp_path), "--export-iterate", A, str(out)]) == 0
    assert yaml.safe_load(out.read_text())["run_name"] == A
    mine = tmp_path / "mine.yaml"
    mine.write_text("experiment_name: mine\n")
    assert main([*_args(path, tmp_path), "--export-iterate", A, str(mine)]) == 2
    assert "refusing to replace it" in capsys.readouterr().err and mine.read_text() == "experiment_name: mine\n"
    assert main([*_args(path, tmp_path), "--export-iterate", "nope", str(tmp_path / "x.yaml")]) == 2
    assert "no such run" in capsys.readouterr().err and not (tmp_path / "x.yaml").exists()
    # a model terratorch-iterate cannot build (not a terratorch task class) is refused, naming the class
    sweep = load_sweep(path, repo=REPO)
    run = dataclasses.replace(sweep.runs[0], model_piece="configs/models/gedi/dunia_zeroshot.yaml")
    with pytest.raises(ComposeError, match=r"dunia_zeroshot.yaml is terratorch_eoplugins.tasks.dunia_knn.*builds only"):
        iterate_config(SweepRunner(sweep, repo=REPO, runs_dir=tmp_path / "runs"), run)
