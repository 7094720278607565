"""``eoplugins sweep --engine ray`` on a local 2-CPU Ray instance (started once for this module).

- real runs (``terratorch fit`` + ``test`` of the micro U-Net on the tiny world, 1 batch each): a 2-run sweep with
  MLflow tracking, and a sweep interrupted after its first finished run, then resumed;
- a fake runner (shipped to the Ray workers by value): shared pretraining as a dependency, failures and task
  crashes recorded as rows and retried with ``--retries``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import yaml

from terratorch_eoplugins.benchmark import cli as sweep_cli
from terratorch_eoplugins.benchmark.engine import run_ray
from terratorch_eoplugins.benchmark.runner import SweepRunner, latest_rows, read_rows
from terratorch_eoplugins.benchmark.spec import RunSpec, load_sweep
from terratorch_eoplugins.cli import main

ray = pytest.importorskip("ray", reason="ray is in the test extra")

REPO = Path(__file__).resolve().parents[2]
MICRO = "configs/models/pastis/micro_unet.yaml"
SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
         "--trainer.limit_test_batches=1", "--trainer.log_every_n_steps=1"]
S0, S1 = "micro__pastis__full__lf100__s0", "micro__pastis__full__lf100__s1"
#: columns that do not depend on when or how often a run was executed
STABLE = ["run_id", "model", "task", "setting", "label_fraction", "seed", "status", "m1", "m2", "m3", "metric_names",
          "metrics", "tunable_params", "total_params", "world_size", "error"]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance of 2 CPUs for the module (the engine uses an initialised Ray as it is)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def real_env(cli_env: dict[str, str]):
    """The terratorch subprocesses' environment (the runner copies ``os.environ``): offline, quiet, 1 thread."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**cli_env, "OMP_NUM_THREADS": "1", "MLFLOW_ALLOW_FILE_STORE": "true"}.items():
            mp.setenv(k, v)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield dict(os.environ)


def _real_sweep(tmp: Path) -> Path:
    spec = {"name": "t", "trainer": "configs/trainer/cpu.yaml", "overrides": SHORT, "seeds": [0, 1],
            "settings": {"full": {"label": "Full", "model": {"freeze_backbone": False}}},
            "tasks": {"pastis": {"label": "PASTIS", "data": "configs/data/pastis.yaml"}},
            "models": [{"name": "micro", "label": "Micro UNet", "tasks": {"pastis": {"model": MICRO}}}]}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _cli(path: Path, tmp: Path, world: Path, *more: str) -> list[str]:
    return ["sweep", str(path), "--repo", str(REPO), "--runs-dir", str(tmp / "runs"), "--world", str(world),
            "--engine", "ray", *more]


@pytest.fixture(scope="module")
def uninterrupted(local_ray, real_env, tiny_world_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2-run sweep run through the CLI in one go (both runs at once, 1 CPU each), tracked in MLflow."""
    tmp = tmp_path_factory.mktemp("ray_uninterrupted")
    assert main(_cli(_real_sweep(tmp), tmp, tiny_world_dir, "--cpus-per-run", "1", "--mlflow")) == 0
    return tmp


@pytest.mark.slow
def test_two_runs_as_ray_tasks_are_tracked_in_mlflow(uninterrupted: Path) -> None:
    from mlflow.tracking import MlflowClient

    rows = read_rows(uninterrupted / "runs" / "t" / "results" / "t.csv")
    assert sorted(r["run_id"] for r in rows) == [S0, S1] and all(r["status"] == "ok" for r in rows), rows
    client = MlflowClient(tracking_uri=(uninterrupted / "runs" / "t" / "mlruns").as_uri())
    exp = client.get_experiment_by_name("t")
    runs = client.search_runs([exp.experiment_id])
    children = {r.data.tags["eoplugins_run_id"]: r for r in runs if r.data.tags.get("eoplugins_role") == "run"}
    (parent,) = [r for r in runs if r.data.tags.get("eoplugins_role") == "sweep"]
    assert set(children) == {S0, S1} and parent.data.tags["engine"] == "ray" and parent.info.status == "FINISHED"
    for row in rows:
        mr = children[row["run_id"]]
        assert mr.info.status == "FINISHED" and mr.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert mr.data.params["seed"] == str(row["seed"]) and json.loads(mr.data.params["overrides"]) == SHORT
        assert mr.data.metrics["test/mIoU"] == pytest.approx(float(row["m1"]))
        assert mr.data.metrics["tunable_params"] == float(row["tunable_params"]) > 400_000
        assert mr.data.metrics["train_s"] == pytest.approx(float(row["train_s"]))
        assert {"run.yaml", "config.yaml"} <= {f.path for f in client.list_artifacts(mr.info.run_id)}
    assert {"results/t.csv", "results/t.md", "results/t.png"} == \
        {f.path for f in client.list_artifacts(parent.info.run_id, "results")}


def _running_in(folder: Path) -> list[int]:
    """Processes whose command line names ``folder`` (a terratorch run of it still going)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if str(folder) in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


@pytest.mark.slow
def test_interrupted_sweep_resumed_through_ray_ends_as_an_uninterrupted_one(
        uninterrupted: Path, real_env: dict, tiny_world_dir: Path, tmp_path: Path) -> None:
    path = _real_sweep(tmp_path)
    finished: list[str] = []

    def log(msg: str) -> None:  # Ctrl-C in the driver as soon as the first run has its row
        if msg.startswith("ok "):
            finished.append(msg.split()[1])
            raise KeyboardInterrupt

    runner = SweepRunner(load_sweep(path, repo=REPO), repo=REPO, runs_dir=tmp_path / "runs",
                         world=str(tiny_world_dir), env=real_env, log=log)
    with pytest.raises(KeyboardInterrupt):  # 2 CPUs per run: one run at a time, the other is cancelled
        run_ray(runner, cpus_per_run=2)
    (first,) = finished
    other = S1 if first == S0 else S0
    assert [r["run_id"] for r in read_rows(runner.csv_path)] == [first]
    runs = tmp_path / "runs" / "t"
    deadline = time.monotonic() + 60  # the engine itself waits up to 60 s for cancellations (a loaded machine)
    while _running_in(runs / other) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _running_in(runs / other) == []  # the cancelled run's terratorch process was killed
    assert not (runs / other / "fit.done").exists()
    first_log = (runs / first / "fit.log").stat().st_mtime_ns

    assert main(_cli(path, tmp_path, tiny_world_dir)) == 0  # resume: only the unfinished run executes
    rows = read_rows(runner.csv_path)
    assert [r["run_id"] for r in rows] == [first, other]
    assert (runs / first / "fit.log").stat().st_mtime_ns == first_log
    assert len((runs / first / "attempts.jsonl").read_text().splitlines()) == 1
    reference = latest_rows(uninterrupted / "runs" / "t" / "results" / "t.csv")
    final = latest_rows(runner.csv_path)
    assert {k: [final[k][c] for c in STABLE] for k in final} == \
        {k: [reference[k][c] for c in STABLE] for k in reference}


class FakeRunner(SweepRunner):
    """Runs nothing: pretraining and runs log their start to files and follow the outcomes in ``plan.json``
    (per run id or pretrain id, one outcome per attempt: ``ok``, ``failed`` or ``crash`` = the Ray worker dies)."""

    def _events(self, name: str, what: str) -> int:
        log = self.runs_dir / "events.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(json.dumps({"name": name, "what": what, "t": time.time()}) + "\n")
        return sum(json.loads(ln)["name"] == name and json.loads(ln)["what"] == what
                   for ln in log.read_text().splitlines())

    def _outcome(self, name: str, attempt: int) -> str:
        plan = json.loads((self.runs_dir / "plan.json").read_text()).get(name, ["ok"])
        return plan[min(attempt, len(plan)) - 1]

    def _pretrain(self, run: RunSpec):  # noqa: ANN202
        n = self._events(run.pretrain_id, "pretrain start")
        time.sleep(0.5)
        self._events(run.pretrain_id, "pretrain end")
        ok = self._outcome(run.pretrain_id, n) == "ok"
        return (self.runs_dir / f"{run.pretrain_id}.ckpt", 0.5, "") if ok else (None, 0.5, "pretrain: boom")

    def execute(self, run: RunSpec, pretrained=None) -> dict:  # noqa: ANN001
        n = self._events(run.run_id, "start" + (f" after {pretrained[0].name}" if pretrained and pretrained[0]
                                                else ""))
        outcome = self._outcome(run.run_id, n)
        if outcome == "crash":
            os._exit(1)
        if run.pretrain is not None and (pretrained is None or pretrained[2]):
            return self.record_failure(run, pretrained[2] if pretrained else "no pretraining")
        row = {k: getattr(run, k) for k in ("sweep", "model", "model_label", "pretrained", "task", "task_label",
                                            "kind", "setting", "setting_label", "label_fraction", "seed")}
        row.update(run_id=run.run_id, status=outcome, m1=0.5, m2=0.5, m3=0.5, metric_names="IoU/Acc/F1",
                   tunable_params=1000, total_params=1000)
        return self._finish(row, self.runs_dir / run.run_id, "" if outcome == "ok" else "fit: boom")


@pytest.mark.slow
def test_pretraining_is_a_dependency_and_failures_are_rows_retried(
        local_ray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    pre = {"config": "configs/lianet_pretrain_pastis.yaml", "share": "p",
           "ckpt_arg": "model.init_args.model_args.backbone_ckpt_path"}
    spec = {"name": "t", "trainer": "configs/trainer/cpu.yaml", "settings": {"full": {"model": {}}},
            "tasks": {"pastis": {"data": "configs/data/pastis.yaml"}},
            "models": [{"name": n, "tasks": {"pastis": {"model": MICRO, "pretrain": pre}}} for n in ("a1", "a2")]
            + [{"name": n, "tasks": {"pastis": {"model": MICRO}}} for n in ("b", "c")]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    runs = tmp_path / "runs" / "t"
    runs.mkdir(parents=True)
    ids = {m: f"{m}__pastis__full__lf100__s0" for m in ("a1", "a2", "b", "c")}
    # the shared pretraining fails once (both its runs fail, one new pretraining for both retries), b fails once,
    # c's worker dies once
    (runs / "plan.json").write_text(json.dumps({"p__pastis__s0": ["failed", "ok"], ids["b"]: ["failed", "ok"],
                                                ids["c"]: ["crash", "ok"]}))
    monkeypatch.setattr(sweep_cli, "SweepRunner", FakeRunner)
    args = _cli(path, tmp_path, tmp_path, "--cpus-per-run", "1")
    assert main([*args, "--retries", "1"]) == 0
    rows = read_rows(runs / "results" / "t.csv")
    status = {rid: [r["status"] for r in rows if r["run_id"] == rid] for rid in ids.values()}
    assert status == {rid: ["failed", "ok"] for rid in ids.values()}
    errors = {r["run_id"]: r["error"] for r in rows if r["status"] == "failed"}
    assert errors[ids["a1"]] == errors[ids["a2"]] == "pretrain: boom" and errors[ids["b"]] == "fit: boom"
    assert errors[ids["c"]].startswith("runner: ray: ")
    events = [json.loads(ln) for ln in (runs / "events.jsonl").read_text().splitlines()]
    pre_ends = [e["t"] for e in events if e["what"] == "pretrain end"]
    assert len(pre_ends) == 2  # once per attempt, not once per run
    for rid in (ids["a1"], ids["a2"]):
        starts = [e for e in events if e["name"] == rid]
        assert len(starts) == 2 and all(s["t"] >= pre_ends[i] for i, s in enumerate(starts))
        assert starts[1]["what"] == "start after p__pastis__s0.ckpt"
    assert "retry 1/1: " + ids["c"] in capsys.readouterr().out

    # everything finished: nothing is submitted again
    assert main(args) == 0
    assert len(read_rows(runs / "results" / "t.csv")) == 8
    # a request no node of the local instance can meet is a usage error, before anything is submitted
    capsys.readouterr()
    assert main([*_cli(path, tmp_path, tmp_path, "--cpus-per-run", "4", "--runs-dir", str(tmp_path / "other"))]) == 2
    assert "--cpus-per-run 4 --gpus-per-run 0: no node of the Ray local instance has that much" in \
        capsys.readouterr().err
