"""LIANet's own downstream tasks end to end: every task's config (with its CPU overlay) runs ``fit`` + ``test`` through
terratorch's CLI on the tiny world, and a short training beats the trivial baseline (majority class / mean predictor)
on the validation region for one classification and one regression task."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from terratorch_eoplugins.datamodules.lianet_downstream import LIANetRegionDataModule

REPO = Path(__file__).resolve().parents[2]
#: one config per task (LIANet), plus the U-Net on the 2.5 m footprints (its x4 head)
CONFIGS = ["lianet_dynamicworld", "lianet_canopyheight", "lianet_leaftype", "lianet_buildingcover",
           "lianet_buildings", "unet_buildings"]

RUN = r"""
import contextlib, io, json, sys, traceback, warnings
warnings.filterwarnings("ignore")
from terratorch.cli_tools import build_lightning_cli
out = {}
for name, args in json.loads(sys.argv[1]):
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            for sub in ("fit", "test"):
                build_lightning_cli([sub, *args])
        out[name] = None
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            out[name] = None
        else:
            out[name] = log.getvalue()[-2000:] + traceback.format_exc()[-3000:]
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_every_task_config_fits_and_tests_through_the_cli(tiny_world_dir: Path, tmp_path: Path,
                                                          cli_env: dict[str, str]) -> None:
    jobs = []
    for name in CONFIGS:
        jobs.append((name, ["-c", str(REPO / "configs" / f"{name}.yaml"),
                            "-c", str(REPO / "configs" / "profiles" / "cpu" / f"{name}.yaml"),
                            f"--data.init_args.root={tiny_world_dir / 'LIANET_LABELS' / 'T31TFJ'}",
                            f"--data.init_args.tiles_root={tiny_world_dir / 'S2_TILES'}",
                            "--data.init_args.train_box_origin=[0, 0]", "--data.init_args.train_area_km2=1.0",
                            "--data.init_args.num_dates=1", "--trainer.fast_dev_run=true", "--trainer.callbacks=[]",
                            "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path / name}",
                            f"--trainer.logger.init_args.save_dir={tmp_path / name}"]))
    proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(jobs)], cwd=REPO, env=cli_env, capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-4000:]
    failures = {k: v for k, v in json.loads(lines[-1][7:]).items() if v}
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())


def _unet_task(kind: str, epochs: int):
    """A small U-Net task with the protocol's cosine schedule over ``epochs`` (without it, AdamW's last steps move the
    weights faster than BatchNorm's running statistics follow, and the eval-mode MAE of some seeds is 3x the
    train-mode one)."""
    from terratorch.tasks import PixelwiseRegressionTask, SemanticSegmentationTask

    args = {"backbone": "unet_classic", "backbone_in_channels": 12, "backbone_width": 16, "backbone_depth": 3,
            "decoder": "IdentityDecoder"}
    common = {"model_factory": "EncoderDecoderFactory", "lr": 3e-3, "optimizer": "AdamW",
              "scheduler": "CosineAnnealingLR", "scheduler_hparams": {"T_max": epochs}}
    if kind == "segmentation":
        return SemanticSegmentationTask(model_args={**args, "num_classes": 6}, loss="ce", ignore_index=255, **common)
    return PixelwiseRegressionTask(model_args={**args, "num_outputs": 1}, loss="mae", ignore_index=-1, **common)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["dynamic_world", "canopy_height"])
def test_short_training_beats_the_trivial_baseline(task: str, tiny_world_dir: Path, tmp_path: Path) -> None:
    """U-Net on the S2 windows of the training box (2 km2 of the 9.8 km2 tiny region for Dynamic World, 4 km2 for
    canopy height, as the 2 km2 box's forest share is over three times the rest's), scored on the patches outside
    it: macro IoU above the majority class (Dynamic World), MAE below the training mean's (canopy height / 30; on
    this tiny region the MAE is about that of predicting 0 everywhere, the L1 optimum where 85 % is not forest)."""
    pl.seed_everything(0)
    kind = "segmentation" if task == "dynamic_world" else "regression"
    dm = LIANetRegionDataModule(root=str(tiny_world_dir / "LIANET_LABELS" / "T31TFJ"), task=task,
                                tiles_root=str(tiny_world_dir / "S2_TILES"), patch_size=64,
                                train_area_km2=2.0 if kind == "segmentation" else 4.0,
                                image="s2", num_dates=4, batch_size=4, batch_keys=[])
    epochs = 15
    module = _unet_task(kind, epochs)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    metrics = trainer.test(module, datamodule=dm, verbose=False)[0]
    train = torch.stack([s["mask"] for s in dm.train_dataset])
    test = torch.stack([s["mask"] for s in dm.test_dataset])
    if kind == "segmentation":
        valid = train[train != 255]
        majority = int(torch.bincount(valid, minlength=6).argmax())
        jac = MulticlassJaccardIndex(num_classes=6, ignore_index=255, average="macro")
        baseline = float(jac(torch.full_like(test, majority), test))
        assert metrics["test/mIoU"] > baseline + 0.1, (metrics["test/mIoU"], baseline)
    else:
        mean = float(train[train != -1].mean())
        ok = test != -1
        baseline = float((test[ok] - mean).abs().mean())
        assert metrics["test/MAE"] < 0.8 * baseline, (metrics["test/MAE"], baseline)
