"""Sweeps through the real ``terratorch`` CLI on the tiny world: failures, skipping, resuming, 2-process CPU DDP."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from terratorch_eoplugins.benchmark.runner import SweepRunner, read_rows
from terratorch_eoplugins.benchmark.spec import load_sweep

REPO = Path(__file__).resolve().parents[2]
SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
         "--trainer.log_every_n_steps=1"]


def _sweep(tmp: Path, models: list, trainer: str = "configs/trainer/cpu.yaml") -> Path:
    spec = {"name": "t", "trainer": trainer, "overrides": SHORT,
            "settings": {"full": {"label": "Full", "model": {"freeze_backbone": False}}},
            "tasks": {"pastis": {"label": "PASTIS", "data": "configs/data/pastis.yaml"}}, "models": models}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


MICRO = {"name": "micro", "label": "Micro UNet",
         "tasks": {"pastis": {"model": "configs/models/pastis/micro_unet.yaml"}}}
BROKEN = {"name": "broken", "tasks": {"pastis": {"model": "configs/models/pastis/micro_unet.yaml"}},
          "settings": ["full"]}


def _runner(path: Path, tmp: Path, world: Path, env: dict, **kw) -> SweepRunner:
    return SweepRunner(load_sweep(path, repo=REPO), repo=REPO, runs_dir=tmp / "runs", results_dir=tmp / "results",
                       world=str(world), env=env, keep_checkpoints=True, log=lambda s: None, **kw)


@pytest.mark.slow
def test_failed_run_is_recorded_and_rerun_skips_and_resumes(tiny_world_dir: Path, tmp_path: Path,
                                                           cli_env: dict[str, str]) -> None:
    broken = dict(BROKEN)
    path = _sweep(tmp_path, [MICRO, broken])
    # the broken entry's setting patch names a backbone that no registry has: `terratorch fit` raises
    spec = yaml.safe_load(path.read_text())
    spec["settings"]["bad"] = {"model": {"model_args": {"backbone": "no_such_backbone"}}}
    spec["models"][1]["settings"] = ["bad"]
    path.write_text(yaml.safe_dump(spec))

    runner = _runner(path, tmp_path, tiny_world_dir, cli_env)
    rows = {r["run_id"]: r for r in runner.run()}
    ok, bad = rows["micro__pastis__full__lf100__s0"], rows["broken__pastis__bad__lf100__s0"]
    assert bad["status"] == "failed" and bad["error"].startswith("fit:") and "no_such_backbone" in bad["error"]
    assert ok["status"] == "ok", ok["error"]
    assert all(0.0 <= ok[k] <= 1.0 for k in ("m1", "m2", "m3"))  # IoU / macro Acc / F1
    assert ok["tunable_params"] == ok["total_params"] > 400_000  # micro_unet, nothing frozen
    assert ok["peak_rss_mb"] > 100 and ok["train_s"] > 0 and ok["resumed"] is False
    metrics = json.loads(ok["metrics"])
    assert metrics["test/mIoU"] == ok["m1"]

    # re-running: both runs are finished (ok and failed): nothing is executed, no row added
    csv_path = runner.csv_path
    assert _runner(path, tmp_path, tiny_world_dir, cli_env).run() == []
    assert len(read_rows(csv_path)) == 2
    assert [r.run_id for r in _runner(path, tmp_path, tiny_world_dir, cli_env, retry_failed=True).pending()] == \
        ["broken__pastis__bad__lf100__s0"]

    # an unfinished run (killed after its first epoch: last.ckpt written, no fit.done, no row) is resumed from
    # last.ckpt with --ckpt_path: the second process trains only the missing epoch
    rdir = tmp_path / "runs" / "t" / "micro__pastis__full__lf100__s0"
    (rdir / "fit.done").unlink()
    keep = [r for r in read_rows(csv_path) if r["run_id"] != ok["run_id"]]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(keep[0]))
        w.writeheader()
        w.writerows(keep)
    first_samples = json.loads((rdir / "fit_stats.json").read_text())["train_samples"]
    resumed = _runner(path, tmp_path, tiny_world_dir, cli_env, extra=["--trainer.max_epochs=2"]).run()
    assert [r["run_id"] for r in resumed] == [ok["run_id"]]
    row = resumed[0]
    assert row["status"] == "ok" and row["resumed"] is True, row["error"]
    assert "--ckpt_path=" in (rdir / "fit.log").read_text().splitlines()[0]
    stats = json.loads((rdir / "fit_stats.json").read_text())
    assert stats["global_step"] == 2 and stats["train_samples"] == first_samples  # one epoch in this process
    attempts = [json.loads(x) for x in (rdir / "attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == 2 and row["train_s"] == pytest.approx(sum(a["wall_s"] for a in attempts), abs=0.02)
    assert {r["run_id"]: r["status"] for r in read_rows(csv_path)} == {ok["run_id"]: "ok", bad["run_id"]: "failed"}
    md = (tmp_path / "results" / "t.md")
    from terratorch_eoplugins.benchmark.leaderboard import render_markdown

    md.write_text(render_markdown(csv_path))
    assert "| PASTIS | Micro UNet† | 0.511 |" in md.read_text() and "### Failed runs (1)" in md.read_text()


@pytest.mark.slow
def test_two_process_cpu_ddp_splits_data_and_syncs_metrics(tiny_world_dir: Path, tmp_path: Path,
                                                           cli_env: dict[str, str]) -> None:
    from terratorch_eoplugins.datamodules.pastis import PASTISDataModule

    path = _sweep(tmp_path, [MICRO], trainer="configs/trainer/cpu_ddp.yaml")
    env = {**cli_env, "OMP_NUM_THREADS": "1"}
    row = _runner(path, tmp_path, tiny_world_dir, env).run()[0]
    assert row["status"] == "ok", row["error"]
    rdir = tmp_path / "runs" / "t" / row["run_id"]
    fit, test = (json.loads((rdir / f"{s}_stats.json").read_text()) for s in ("fit", "test"))
    assert fit["world_size"] == test["world_size"] == row["world_size"] == 2
    assert fit["strategy"] == "DDPStrategy" and fit["accelerator"] == "CPUAccelerator"

    cfg = yaml.safe_load((REPO / "configs" / "data" / "pastis.yaml").read_text())["init_args"]
    cfg["root"] = str(tiny_world_dir / "PASTIS-R")
    dm = PASTISDataModule(**cfg)
    dm.setup("fit")
    dm.setup("test")
    n_train, n_test = len(dm.train_dataset), len(dm.test_dataset)
    # DistributedSampler: each rank gets ceil(n / 2) samples (padded), one batch of them per rank here
    assert fit["train_samples"] == 2 * min(cfg["batch_size"], math.ceil(n_train / 2))
    assert test["test_samples"] == 2 * math.ceil(n_test / 2)
    assert row["test_samples"] == test["test_samples"] and row["test_pixels"] == test["test_pixels"] > 0
    # metrics were computed over the synced states: the logged values are valid macro metrics
    assert all(0.0 <= row[k] <= 1.0 for k in ("m1", "m2", "m3"))
