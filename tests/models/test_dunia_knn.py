"""DUNIA zero-shot KNN task: input preparation, metrics against independent formulas, bad input, tiny-world runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from terratorch_eoplugins.models.dunia import prepare_dunia_input
from terratorch_eoplugins.nn.knn import KNNDatabase
from terratorch_eoplugins.tasks.dunia_knn import DUNIAZeroShotKNNTask


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


class Spectral(nn.Module):
    """Embeds every pixel by its own standardised bands (a 'spectral KNN'): informative, no training, fast."""

    patch_size = 1

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(scale))

    def forward_embeddings(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"vertical": image * self.scale, "horizontal": image * self.scale}


def _trainer():
    import lightning.pytorch as pl

    return pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")


@pytest.fixture(autouse=True)
def _quiet(quiet_lightning: None) -> None:
    """Every test of this file runs with Lightning quiet (:func:`quiet_lightning`)."""


# ----------------------------------------------------------------------------------------- input preparation
def test_prepare_input_median_composite_modalities_and_zero_channels() -> None:
    g = torch.Generator().manual_seed(0)
    s2 = torch.randn(2, 3, 5, 4, 4, generator=g)  # [B, C, T, H, W]
    s1 = torch.randn(2, 2, 4, 4, 4, generator=g)
    x = prepare_dunia_input({"S2": s2, "S1A": s1}, "median", ["S2", "S1A"], [-1, 0, 1, 2, -1, 3, 4])
    assert x.shape == (2, 7, 4, 4)
    torch.testing.assert_close(x[:, 1:4], s2.median(dim=2).values)
    torch.testing.assert_close(x[:, 5:7], s1.median(dim=2).values)
    assert x[:, 0].abs().sum() == 0 and x[:, 4].abs().sum() == 0
    torch.testing.assert_close(prepare_dunia_input(s2, "mean"), s2.mean(2))
    with pytest.raises(ValueError, match="out of range"):
        prepare_dunia_input(s2, "median", input_channels=[0, 3])
    with pytest.raises(ValueError, match="lacks modalities"):
        prepare_dunia_input({"S2": s2}, "median", ["S2", "S1A"])
    with pytest.raises(ValueError, match="temporal_reduce"):
        prepare_dunia_input(s2, "max")


# ----------------------------------------------------------------------------------------- metric formulas
def test_regression_and_classification_scores_match_independent_formulas() -> None:
    rng = np.random.default_rng(0)
    y, p = rng.normal(10, 3, 500), rng.normal(10, 3, 500)
    p = 0.7 * y + 0.3 * p
    sums = torch.tensor(np.stack([y.sum(), p.sum(), (y * y).sum(), (p * p).sum(), (y * p).sum(),
                                  ((y - p) ** 2).sum()])[:, None])
    rmse, r = DUNIAZeroShotKNNTask.regression_scores(sums, 500.0)
    assert float(rmse) == pytest.approx(np.sqrt(np.mean((y - p) ** 2)), rel=1e-9)
    assert float(r) == pytest.approx(np.corrcoef(y, p)[0, 1], rel=1e-9)
    t, q = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    q[:150] = t[:150]
    cm = torch.zeros(5, 5, dtype=torch.long)  # class 4 never occurs: excluded from the mean IoU
    for a, b in zip(t, q):
        cm[a, b] += 1
    acc, miou = DUNIAZeroShotKNNTask.classification_scores(cm)
    ious = [np.sum((t == c) & (q == c)) / np.sum((t == c) | (q == c)) for c in range(4)]
    assert acc == pytest.approx(np.mean(t == q))
    assert miou == pytest.approx(np.mean(ious))


# ----------------------------------------------------------------------------------------- task on batches
def _batch(seed: int, h: int = 16, classes: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 14, h, h, generator=g)
    if classes:
        mask = (image[:, 0] > 0).long() + (image[:, 1] > 0).long()  # 3 classes from the bands
        mask[:, 0] = -1
    else:
        mask = torch.full((2, h, h), -1.0)
        mask[:, ::3, ::3] = 20 + 5 * image[:, 0, ::3, ::3]  # "footprints" whose RH98 follows band 0
    return {"image": image, "mask": mask}


def test_task_with_real_dunia_tiny_builds_database_and_predicts() -> None:
    task = DUNIAZeroShotKNNTask(keys="vertical", dunia_variant="tiny", k_values=[1, 5], k=5)
    assert not any(p.requires_grad for p in task.model.parameters())
    task.train()
    assert not task.model.training  # the embedding model stays in eval mode (no dropout) during fit
    n = task.add_batch(_batch(0))
    assert n == len(task.database) == 2 * 6 * 6
    assert task.database.dim == task.model.out_dim
    task._reset_metrics()
    task._eval_batch(_batch(1))
    out = task._log_metrics("val")
    assert out["val/num_pixels"] == 72
    assert np.isfinite(out["val/rmse_k5"] if "val/rmse_k5" in out else out["val/rh98_rmse_k5"])
    # a different model (another random init) must not query this database
    other = DUNIAZeroShotKNNTask(keys="vertical", dunia_variant="tiny", k_values=[1, 5], k=5)
    other.database = task.database
    with pytest.raises(ValueError, match="different model"):
        other._eval_batch(_batch(1))
    # same model, other branch: another embedding space, rejected too
    horiz = DUNIAZeroShotKNNTask(embedder=task.model, embedding="horizontal", k_values=[1, 5], k=5)
    horiz.database = task.database
    with pytest.raises(ValueError, match="different model"):
        horiz._eval_batch(_batch(1))


def test_bad_inputs() -> None:
    task = DUNIAZeroShotKNNTask(keys="vertical", embedder=Spectral(), k_values=[1], k=1)
    empty = _batch(0)
    empty["mask"][:] = -1  # a batch with no GEDI footprint: nothing to add, nothing to score
    assert task.add_batch(empty) == 0
    task._eval_batch(empty)
    with pytest.raises(ValueError, match="database is empty"):
        task._eval_batch(_batch(1))
    nan = _batch(0)
    nan["image"][0, 3, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        task.add_batch(nan)

    class NaNEmbedder(Spectral):
        def forward_embeddings(self, image):
            out = image.clone()
            out[0, :, 0, 0] = float("nan")
            return {"vertical": out, "horizontal": out}

    with pytest.raises(ValueError, match="NaN"):
        DUNIAZeroShotKNNTask(keys="vertical", embedder=NaNEmbedder()).add_batch(_batch(0))
    with pytest.raises(ValueError, match="mask"):
        task.add_batch({"image": _batch(0)["image"]})
    with pytest.raises(ValueError, match="k=7 must be one of"):
        DUNIAZeroShotKNNTask(keys="vertical", embedder=Spectral(), k_values=[1, 5], k=7)
    with pytest.raises(ValueError, match="num_classes"):
        DUNIAZeroShotKNNTask(embedder=Spectral(), task="classification")
    with pytest.raises(ValueError, match="embedding"):
        DUNIAZeroShotKNNTask(embedder=Spectral(), embedding="both")


def test_database_path_and_checkpoint_round_trip(tmp_path: Path) -> None:
    task = DUNIAZeroShotKNNTask(embedder=Spectral(), task="classification", num_classes=3,
                                database_path=str(tmp_path / "db.npz"), k_values=[1, 5], k=5)
    task.add_batch(_batch(0, classes=True))
    task.on_fit_end()
    assert (tmp_path / "db.npz").is_file()
    ckpt: dict = {}
    task.on_save_checkpoint(ckpt)
    restored = DUNIAZeroShotKNNTask(embedder=Spectral(), task="classification", num_classes=3, k_values=[1, 5], k=5)
    restored.on_load_checkpoint(ckpt)
    emb = task.embed(_batch(1)["image"])
    torch.testing.assert_close(restored.database.predict_map(emb, 5, restored.fingerprint),
                               task.database.predict_map(emb, 5, task.fingerprint))
    # database_path is loaded when the database is empty, with the model check
    loaded = DUNIAZeroShotKNNTask(embedder=Spectral(), task="classification", num_classes=3,
                                  database_path=str(tmp_path / "db.npz"), k_values=[1, 5], k=5)
    loaded._ensure_database()
    assert len(loaded.database) == len(task.database)
    wrong = DUNIAZeroShotKNNTask(embedder=Spectral(scale=2.0), task="classification", num_classes=3,
                                 database_path=str(tmp_path / "db.npz"), k_values=[1, 5], k=5)
    with pytest.raises(ValueError, match="different model"):
        wrong._ensure_database()
    assert isinstance(KNNDatabase.load(tmp_path / "db.npz"), KNNDatabase)


def test_classification_beats_majority_on_band_defined_classes() -> None:
    task = DUNIAZeroShotKNNTask(embedder=Spectral(), task="classification", num_classes=3, k_values=[1, 5, 50],
                                k=50)
    for s in range(3):
        task.add_batch(_batch(s, classes=True))
    task._reset_metrics()
    task._eval_batch(_batch(10, classes=True))
    m = task._log_metrics("test")
    assert m["test/accuracy_k50"] > m["test/accuracy_majority"] + 0.2
    assert m["test/mIoU_k50"] > m["test/mIoU_majority"] + 0.3


def test_logged_regression_metrics_match_numpy_over_batches() -> None:
    """RMSE, MAE and r at every K, accumulated batch by batch, equal the formulas on all pixels at once."""
    rng = np.random.default_rng(1)
    task = DUNIAZeroShotKNNTask(keys="vertical", embedder=Spectral(), k_values=[1, 5], k=5)
    task.database = KNNDatabase(3, "regression")
    task.database.add(torch.randn(20, 3), torch.from_numpy(rng.normal(10, 2, (20, 1))).float())
    y = rng.normal(10, 3, 300)
    preds = {1: 0.5 * y + rng.normal(5, 1, 300), 5: 0.8 * y + rng.normal(2, 1, 300)}
    for chunk in np.array_split(np.arange(300), 4):
        task._acc_regression({kk: torch.from_numpy(p[chunk])[:, None] for kk, p in preds.items()},
                             torch.from_numpy(y[chunk])[:, None])
    out = task._log_metrics("test")
    for kk, p in preds.items():
        assert out[f"test/rh98_rmse_k{kk}"] == pytest.approx(np.sqrt(np.mean((y - p) ** 2)), rel=1e-6)
        assert out[f"test/rh98_mae_k{kk}"] == pytest.approx(np.mean(np.abs(y - p)), rel=1e-6)
        assert out[f"test/rh98_r_k{kk}"] == pytest.approx(np.corrcoef(y, p)[0, 1], rel=1e-6)
    assert (out["test/rmse"], out["test/mae"], out["test/r"]) == (
        out["test/rh98_rmse_k5"], out["test/rh98_mae_k5"], out["test/rh98_r_k5"])
    mean = float(task.database.label_mean())
    assert out["test/rmse_mean_predictor"] == pytest.approx(np.sqrt(np.mean((y - mean) ** 2)), rel=1e-6)


# ----------------------------------------------------------------------------------------- tiny world, Lightning
def test_zero_shot_rh98_on_the_tiny_world_beats_the_mean_predictor(tiny_world_dir: Path) -> None:
    """fit (database from the train chips, no gradient step) then validate through Lightning on the GEDI world.

    With informative embeddings (the pixels' own bands), retrieval must clearly beat the mean predictor; this
    checks the database, footprint selection, weighting and metric pipeline end to end (a *pretrained* DUNIA is
    what the paper evaluates; see the report for its figures).
    """
    from terratorch_eoplugins.datamodules.gedi import GEDIDataModule

    task = DUNIAZeroShotKNNTask(keys="vertical", embedder=Spectral())
    dm = GEDIDataModule(root=str(tiny_world_dir / "GEDI"), batch_size=8)
    before = [p.clone() for p in task.parameters()]
    trainer = _trainer()
    trainer.fit(task, dm)
    dm.setup("fit")
    n_labelled = sum(int((b["mask"] != -1).sum()) for b in dm.train_dataloader())
    assert len(task.database) == n_labelled > 0
    assert all(torch.equal(a, b) for a, b in zip(before, task.parameters()))
    m = task.last_metrics
    assert m["val/rh98_r_k50"] > 0.6
    assert m["val/rh98_rmse_k50"] < 0.6 * m["val/rh98_rmse_mean_predictor"]
    # `test` after fit reuses the database; on its own (new task) it rebuilds the same one from the train split
    fresh = DUNIAZeroShotKNNTask(keys="vertical", embedder=Spectral())
    _trainer().validate(fresh, dm, verbose=False)
    assert len(fresh.database) == len(task.database)
    assert fresh.last_metrics["val/rh98_rmse_k5"] == pytest.approx(m["val/rh98_rmse_k5"], rel=1e-6)


def test_pastis_zero_shot_with_dunia_tiny_runs_through_lightning(tiny_world_dir: Path) -> None:
    """The PASTIS configuration (S2 + S1A temporal medians mapped to DUNIA's 14 bands) with the real DUNIA-tiny."""
    from terratorch_eoplugins.datamodules.pastis import PASTISDataModule

    task = DUNIAZeroShotKNNTask(task="classification", num_classes=19, embedding="horizontal",
                                input_modalities=["S2", "S1A"],
                                input_channels=[-1, 0, 1, 2, 3, 4, 5, 6, 7, -1, 8, 9, 10, 11], pixels_per_image=256)
    dm = PASTISDataModule(root=str(tiny_world_dir / "PASTIS-R"), modalities=["S2", "S1A"], batch_size=4)
    trainer = _trainer()
    trainer.fit(task, dm)
    assert 0 < len(task.database) <= 256 * len(dm.train_dataset)
    trainer.test(task, dm, verbose=False)
    m = task.last_metrics
    for key in ("test/accuracy_k1", "test/accuracy_k50", "test/mIoU_k5", "test/accuracy_majority"):
        assert 0.0 <= m[key] <= 1.0


def _ddp_rank_metrics(rank: int, world: int, port: int, y: np.ndarray, p: np.ndarray, out: Any) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        task = DUNIAZeroShotKNNTask(keys="vertical", embedder=Spectral(), k_values=[5], k=5)
        task.database = KNNDatabase(3, "regression")
        task.database.add(torch.eye(3)[:2], torch.tensor([[9.0], [11.0]]))
        task._reset_metrics()
        part = np.array_split(np.arange(len(y)), world)[rank]
        if rank == 0:  # rank 0 sees two batches, rank 1 one: sums, not per-rank means, must be combined
            for chunk in np.array_split(part, 2):
                task._acc_regression({5: torch.from_numpy(p[chunk])[:, None]}, torch.from_numpy(y[chunk])[:, None])
        else:
            task._acc_regression({5: torch.from_numpy(p[part])[:, None]}, torch.from_numpy(y[part])[:, None])
        out[rank] = task._log_metrics("test")
    finally:
        dist.destroy_process_group()


def test_regression_metrics_are_combined_over_ddp_ranks() -> None:
    """Two gloo processes holding different shares of the pixels log the metrics of all pixels."""
    import socket

    import torch.multiprocessing as tmp

    rng = np.random.default_rng(4)
    y = rng.normal(10, 3, 301)
    p = 0.6 * y + rng.normal(4, 1, 301)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp.Manager().dict()
    tmp.spawn(_ddp_rank_metrics, args=(2, port, y, p, out), nprocs=2, join=True)
    for rank in (0, 1):
        m = out[rank]
        assert m["test/num_pixels"] == 301
        assert m["test/rmse"] == pytest.approx(np.sqrt(np.mean((y - p) ** 2)), rel=1e-9)
        assert m["test/mae"] == pytest.approx(np.mean(np.abs(y - p)), rel=1e-9)
        assert m["test/r"] == pytest.approx(np.corrcoef(y, p)[0, 1], rel=1e-9)
        assert m["test/rmse_mean_predictor"] == pytest.approx(np.sqrt(np.mean((y - 10.0) ** 2)), rel=1e-9)
