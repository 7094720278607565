"""TrivialBaselineTask: the majority class / training mean of the training split, scored with terratorch's metric
names, against statistics computed here with numpy; kept in checkpoints; reached through terratorch's CLI."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from terratorch_eoplugins.datamodules.lianet_downstream import LIANetRegionDataModule
from terratorch_eoplugins.runtime import terratorch_command
from terratorch_eoplugins.tasks.trivial import TrivialBaselineTask

REPO = Path(__file__).resolve().parents[2]


class _Masks(Dataset):
    def __init__(self, masks: np.ndarray) -> None:
        self.masks = masks

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        m = torch.from_numpy(self.masks[i])
        return {"image": torch.zeros(3, *m.shape), "mask": m}


class _DM(pl.LightningDataModule):
    def __init__(self, train: np.ndarray, test: np.ndarray) -> None:
        super().__init__()
        self.train_dataset, self.test_dataset = _Masks(train), _Masks(test)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=3, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_dataset, batch_size=3)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_dataset, batch_size=3)


def _trainer(tmp_path: Path, **kw) -> pl.Trainer:
    return pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, **kw)


def test_segmentation_predicts_the_training_majority_and_scores_it_like_terratorch(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train = rng.choice([0, 1, 2, 3, 255], size=(7, 8, 8), p=[0.2, 0.1, 0.3, 0.15, 0.25]).astype(np.int64)
    train[0, :4] = 255  # ignored pixels never count, even where they are the most frequent value
    test = rng.choice([0, 1, 2, 3, 255], size=(5, 8, 8), p=[0.4, 0.2, 0.2, 0.1, 0.1]).astype(np.int64)
    task = TrivialBaselineTask(kind="segmentation", num_classes=4, ignore_index=255, loss="ce")
    trainer = _trainer(tmp_path)
    trainer.fit(task, datamodule=_DM(train, test))
    counts = np.bincount(train[train != 255], minlength=4)
    majority = int(counts.argmax())
    assert task.constant == majority
    assert task.counts.tolist() == counts.tolist()
    out = trainer.test(task, datamodule=_DM(train, test), verbose=False)[0]
    y = test[test != 255]
    present = [c for c in range(4) if (y == c).any()]  # torchmetrics' macro average skips absent classes
    iou = {c: float((y == c).sum() / len(y)) if c == majority else 0.0 for c in present}
    recall = {c: 1.0 if c == majority else 0.0 for c in present}
    assert out["test/mIoU"] == pytest.approx(np.mean(list(iou.values())), abs=1e-6)
    assert out["test/Accuracy"] == pytest.approx(np.mean(list(recall.values())), abs=1e-6)
    assert out["test/Pixel_Accuracy"] == pytest.approx(float((y == majority).mean()), abs=1e-6)
    freq = counts / counts.sum()
    # val/test loss as terratorch's tasks log it: each batch's mean over its valid pixels, weighted by batch size
    batches = [test[i:i + 3] for i in range(0, len(test), 3)]
    per_batch = [(-np.log(freq[b[b != 255]])).mean() for b in batches]
    expected = np.average(per_batch, weights=[len(b) for b in batches])
    assert out["test/loss"] == pytest.approx(float(expected), rel=1e-5)
    logits = task(torch.zeros(2, 3, 5, 6))
    assert logits.shape == (2, 4, 5, 6) and int(logits[0, :, 0, 0].argmax()) == majority


def test_regression_predicts_the_training_mean_and_the_checkpoint_keeps_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train = rng.gamma(2.0, 0.2, size=(6, 8, 8)).astype(np.float32)
    train[rng.random(train.shape) < 0.3] = -1.0  # no-data
    test = rng.gamma(2.0, 0.25, size=(4, 8, 8)).astype(np.float32)
    test[0, 0] = -1.0
    task = TrivialBaselineTask(kind="regression", ignore_index=-1, loss="huber")
    trainer = _trainer(tmp_path)
    trainer.fit(task, datamodule=_DM(train, test))
    mean = float(train[train != -1].astype(np.float64).mean())
    assert task.constant == pytest.approx(mean, rel=1e-12)
    y = test[test != -1].astype(np.float64)
    out = trainer.test(task, datamodule=_DM(train, test), verbose=False)[0]
    assert out["test/RMSE"] == pytest.approx(float(np.sqrt(np.mean((y - mean) ** 2))), rel=1e-5)
    assert out["test/MAE"] == pytest.approx(float(np.mean(np.abs(y - mean))), rel=1e-5)
    batches = [test[i:i + 3] for i in range(0, len(test), 3)]
    per_batch = []
    for b in batches:
        a = np.abs(b[b != -1].astype(np.float64) - mean)
        per_batch.append(np.mean(np.where(a < 1, 0.5 * a * a, a - 0.5)))  # Huber, delta 1
    expected = np.average(per_batch, weights=[len(b) for b in batches])
    assert out["test/loss"] == pytest.approx(float(expected), rel=1e-5)

    # a restored task holds the statistic: testing on other training data does not recount it
    ckpt = tmp_path / "trivial.ckpt"
    trainer.save_checkpoint(ckpt)
    restored = TrivialBaselineTask.load_from_checkpoint(ckpt)
    assert restored.constant == pytest.approx(mean, rel=1e-12)
    out2 = _trainer(tmp_path).test(restored, datamodule=_DM(np.full_like(train, 5.0), test), verbose=False)[0]
    assert out2["test/RMSE"] == pytest.approx(out["test/RMSE"], rel=1e-7)


def test_test_without_fit_counts_the_training_split_first(tmp_path: Path) -> None:
    train = np.array([[[2, 2], [1, 0]], [[2, 1], [255, 255]]], dtype=np.int64)
    task = TrivialBaselineTask(kind="segmentation", num_classes=3, ignore_index=255)
    out = _trainer(tmp_path).test(task, datamodule=_DM(train, train), verbose=False)[0]
    assert task.constant == 2
    assert out["test/Pixel_Accuracy"] == pytest.approx(3 / 6)


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "detection"}, "kind must be"),
    ({"kind": "segmentation", "num_classes": None}, "num_classes"),
    ({"kind": "segmentation", "num_classes": 3, "loss": "mae"}, "loss must be one of"),
    ({"kind": "regression", "loss": "ce"}, "loss must be one of"),
])
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrivialBaselineTask(**kwargs)


def test_a_split_without_valid_targets_is_an_error(tmp_path: Path) -> None:
    train = np.full((2, 4, 4), -1.0, dtype=np.float32)
    task = TrivialBaselineTask(kind="regression", ignore_index=-1)
    with pytest.raises(RuntimeError, match="no valid 'mask' values"):
        _trainer(tmp_path).fit(task, datamodule=_DM(train, train))


@pytest.mark.slow
@pytest.mark.compat  # also in CI's Python 3.12 leg (.ci/run)
def test_fit_and_test_through_the_terratorch_cli(tiny_world_dir: Path, tmp_path: Path,
                                                 cli_env: dict[str, str]) -> None:
    """The shipped model piece with the LIANet region data piece, as the lianet_tasks sweeps run it."""
    cfg = {"seed_everything": 0,
           "trainer": str(REPO / "configs" / "trainer" / "lianet_finetune_regression_cpu.yaml"),
           "data": str(REPO / "configs" / "data" / "lianetregion_canopyheight.yaml"),
           "model": str(REPO / "configs" / "models" / "canopyheight" / "trivial.yaml")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = ["-c", str(path), f"--data.init_args.root={tiny_world_dir / 'LIANET_LABELS' / 'T31TFJ'}",
            f"--data.init_args.tiles_root={tiny_world_dir / 'S2_TILES'}", "--data.init_args.patch_size=64",
            "--data.init_args.train_area_km2=2.0", "--data.init_args.num_dates=1", "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.logger.init_args.name=trivial"]
    for sub in ("fit", "test"):
        extra = [f"--ckpt_path={next((tmp_path / 'trivial').rglob('last.ckpt'))}"] if sub == "test" else []
        proc = subprocess.run([*terratorch_command(cli_env), sub, *args, *extra], cwd=REPO, env=cli_env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    logged = {}
    for p in (tmp_path / "trivial").rglob("metrics.csv"):
        for row in csv.DictReader(p.open()):
            logged.update({k: float(v) for k, v in row.items() if k.startswith("test/") and v})

    # independent: the same split's canopy-height targets read through the datamodule, their mean and RMSE
    dm = LIANetRegionDataModule(root=str(tiny_world_dir / "LIANET_LABELS" / "T31TFJ"), task="canopy_height",
                                tiles_root=str(tiny_world_dir / "S2_TILES"), patch_size=64, train_area_km2=2.0,
                                num_dates=1, batch_keys=[])
    dm.setup("fit")
    dm.setup("test")
    train = torch.cat([s["mask"].flatten() for s in dm.train_dataset]).double()
    test = torch.cat([s["mask"].flatten() for s in dm.test_dataset]).double()
    mean = float(train[train != -1].mean())
    y = test[test != -1]
    assert logged["test/RMSE"] == pytest.approx(float(((y - mean) ** 2).mean().sqrt()), rel=1e-5)
    assert logged["test/MAE"] == pytest.approx(float((y - mean).abs().mean()), rel=1e-5)
