"""DUNIA zero-shot retrieval as the paper (section 4.1.2): O^W waveform keys, weighted F1, windows, database size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from terratorch_eoplugins.tasks.dunia_knn import DUNIAZeroShotKNNTask, paper_keys

#: a micro image model and waveform AE: a short pretraining fits in seconds on one CPU thread
MICRO = dict(embed_dim=32, ffn_dim=64, num_heads=2, out_dim=16, na_kernel=5, na_heads=1)
WAVE = dict(codebook_size=16, num_quantizers=2)
LENGTH = 64


@pytest.fixture(autouse=True)
def _setup(one_torch_thread: None, quiet_lightning: None) -> None:
    torch.manual_seed(0)


class Spectral(nn.Module):
    """Every pixel embedded by its own bands: informative, no training."""

    patch_size = 1
    out_dim = 14

    def forward_embeddings(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"vertical": image, "horizontal": image}


def _short_pretraining(batch: dict, path: Path, steps: int = 40) -> None:
    """Pixel-waveform alignment (Zero-CL, eq. 3-6) + waveform reconstruction of a micro DUNIA on one batch of
    tiny-world chips, written as a DUNIA pretraining checkpoint (``model.*`` keys + hyper-parameters)."""
    from terratorch_eoplugins.losses import zero_cl_loss
    from terratorch_eoplugins.models.dunia import DUNIAPretrainModel
    from terratorch_eoplugins.tasks.dunia_pretrain import gather_footprints

    model = DUNIAPretrainModel("tiny", MICRO, lstm_layers=1, waveform_length=LENGTH, waveform_kwargs=WAVE)
    for mod in model.modules():
        if hasattr(mod, "backend"):
            mod.backend = "torch"
    opt = torch.optim.AdamW([*model.image.parameters(), *model.waveform.parameters()], lr=2e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        z, b_idx, k_idx = gather_footprints(model.image.forward_embeddings(batch["image"])["vertical"],
                                            batch["footprints"], batch["footprint_mask"])
        w = batch["waveform"][b_idx, k_idx]
        wo = model.waveform(w)
        loss = zero_cl_loss(z, wo["embedding"]) + model.waveform.reconstruction_loss(w, wo["recon"]) + wo["commit_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    hp = {"variant": "tiny", "image_kwargs": MICRO, "lstm_layers": 1, "waveform_length": LENGTH,
          "waveform_kwargs": WAVE}
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": hp}, path)


def test_vertical_database_keys_are_waveform_embeddings_and_retrieve_the_aligned_footprint(
        tiny_world_dir: Path, tmp_path: Path) -> None:
    """Keys = L2-normalised O^W of the footprints' waveforms (recomputed here from the checkpoint's weights in a
    fresh autoencoder); after a short pretraining a footprint pixel's O^V retrieves its own footprint far more
    often than chance (1/N) and ranks it far above the chance mean rank."""
    from terratorch_eoplugins.datamodules.gedi import GEDIDataModule
    from terratorch_eoplugins.nn.waveform import WaveformAutoencoder

    dm = GEDIDataModule(root=str(tiny_world_dir / "GEDI"), chip_size=32, waveform_length=LENGTH,
                        waveform_mode="resample", batch_size=4, targets=["rh98", "cover", "pai"],
                        batch_keys=["footprints", "footprint_mask", "waveform", "rh98", "cover", "pai"])
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    ckpt = tmp_path / "pretrain.ckpt"
    _short_pretraining(batch, ckpt)

    task = DUNIAZeroShotKNNTask(backbone_ckpt_path=str(ckpt), dunia_variant="tiny",
                                target_names=["rh98", "cover", "pai"], k_values=[1], k=1, na_backend="torch")
    assert task.key_embedding == "waveform" == paper_keys("vertical")
    db = task.build_database([batch])
    fmask = batch["footprint_mask"].bool()
    b_idx, k_idx = torch.nonzero(fmask, as_tuple=True)
    n = len(b_idx)
    assert len(db) == n > 20  # one entry per footprint (all targets valid on this batch)

    # independent O^W: a fresh autoencoder filled with the checkpoint's weights
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    ae = WaveformAutoencoder(length=LENGTH, embed_dim=MICRO["out_dim"], **WAVE)
    ae.load_state_dict({k.removeprefix("model.waveform."): v for k, v in state.items()
                        if k.startswith("model.waveform.")})
    ae.eval()
    w = batch["waveform"][b_idx, k_idx]
    with torch.no_grad():
        o_w = F.normalize(ae.embed(ae.encode(w)), dim=1)
    torch.testing.assert_close(db.keys, o_w, rtol=1e-5, atol=1e-5)
    # one database holds all vertical targets (the footprints' own values) and the waveforms
    own = torch.stack([batch[t][b_idx, k_idx] for t in ("rh98", "cover", "pai")], 1)
    torch.testing.assert_close(db.labels, own.float())
    torch.testing.assert_close(task.waveforms(), w.float())

    # queries: O^V at each footprint pixel; keys are not pixel embeddings
    emb = task.embed(batch["image"])
    q = emb[b_idx, :, batch["footprints"][b_idx, k_idx, 0], batch["footprints"][b_idx, k_idx, 1]]
    assert not torch.allclose(F.normalize(q, dim=1), db.keys, atol=1e-2)
    _, idx = db.search(q, n)
    rank = (idx == torch.arange(n)[:, None]).float().argmax(1).float()
    top1 = float((rank == 0).float().mean())
    assert top1 >= 3.0 / n, (top1, 1.0 / n)  # measured: 5 of 45 (chance: 1 of 45)
    assert float(rank.mean()) < 0.5 * (n - 1) / 2, (float(rank.mean()), (n - 1) / 2)  # measured: 8.6 vs 22
    # waveform retrieval: the same database, top-1 key's waveform
    torch.testing.assert_close(task.retrieve_waveforms(q), w.float()[idx[:, 0]])

    # self-contained checkpoint: image model, waveform encoder and database come back without the pretraining file
    import lightning.pytorch as pl

    saved = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
             "pytorch-lightning_version": pl.__version__}
    task.on_save_checkpoint(saved)
    torch.save(saved, tmp_path / "knn.ckpt")
    ckpt.unlink()
    restored = DUNIAZeroShotKNNTask.load_from_checkpoint(tmp_path / "knn.ckpt")
    assert restored.fingerprint == task.fingerprint and torch.equal(restored.waveforms(), task.waveforms())
    torch.testing.assert_close(restored.embed_waveforms(w), o_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(restored.database.keys, db.keys)


def test_paper_key_defaults_and_errors() -> None:
    assert paper_keys("vertical") == "waveform" and paper_keys("horizontal") == "horizontal"
    assert paper_keys("vertical", "classification") == "vertical"
    assert DUNIAZeroShotKNNTask(embedder=Spectral(), embedding="horizontal").key_embedding == "horizontal"
    pixel = DUNIAZeroShotKNNTask(embedder=Spectral(), keys="vertical")
    assert pixel.key_embedding == "vertical" and pixel.waveform_model is None
    with pytest.raises(ValueError, match="keys must be one of"):
        DUNIAZeroShotKNNTask(embedder=Spectral(), keys="both")
    with pytest.raises(ValueError, match="classification databases use pixel keys"):
        DUNIAZeroShotKNNTask(embedder=Spectral(), task="classification", num_classes=3, keys="waveform")
    with pytest.raises(ValueError, match="embedding_window"):
        DUNIAZeroShotKNNTask(embedder=Spectral(), keys="vertical", embedding_window=4)
    with pytest.raises(ValueError, match="database_fraction"):
        DUNIAZeroShotKNNTask(embedder=Spectral(), keys="vertical", database_fraction=0.0)
    task = DUNIAZeroShotKNNTask(embedder=Spectral(), waveform_length=64, waveform_kwargs=WAVE)
    assert task.key_embedding == "waveform"
    with pytest.raises(ValueError, match="batch lacks"):
        task.add_batch({"image": torch.randn(1, 14, 4, 4), "mask": torch.full((1, 4, 4), -1.0)})


def _class_batch(seed: int, b: int = 2, size: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 14, size, size, generator=g)
    mask = (image[:, 0] > 0.5).long() + (image[:, 1] > 0.0).long()  # classes 0..2 from two bands
    return {"image": image, "mask": mask}


def _weighted_f1(pred: np.ndarray, target: np.ndarray, c: int) -> float:
    """Independent weighted F1: per-class F1 = 2 TP / (2 TP + FP + FN), weighted by the class's target support."""
    total = 0.0
    for k in range(c):
        tp = np.sum((pred == k) & (target == k))
        fp = np.sum((pred == k) & (target != k))
        fn = np.sum((pred != k) & (target == k))
        support = np.sum(target == k)
        if support:
            total += support * (2 * tp / (2 * tp + fp + fn))
    return total / target.size


def test_classification_logs_weighted_f1_matching_an_independent_computation() -> None:
    task = DUNIAZeroShotKNNTask(embedder=Spectral(), task="classification", num_classes=3, embedding="horizontal",
                                k_values=[1, 5], k=5)
    task.build_database([_class_batch(0), _class_batch(1)])
    task._reset_metrics()
    tests = [_class_batch(2), _class_batch(3)]
    preds, targets = {1: [], 5: []}, []
    for b in tests:
        task._eval_batch(b)
        emb = task.embed(b["image"]).permute(0, 2, 3, 1).reshape(-1, 14)
        p = task.database.predict(emb, [1, 5])
        for kk in (1, 5):
            preds[kk].append(p[kk].numpy())
        targets.append(b["mask"].reshape(-1).numpy())
    out = task._log_metrics("test")
    y = np.concatenate(targets)
    for kk in (1, 5):
        assert out[f"test/wF1_k{kk}"] == pytest.approx(_weighted_f1(np.concatenate(preds[kk]), y, 3), abs=1e-6)
    assert out["test/wF1"] == out["test/wF1_k5"]
    maj = task.database.majority_class()
    assert out["test/wF1_majority"] == pytest.approx(_weighted_f1(np.full_like(y, maj), y, 3), abs=1e-6)


def test_embedding_window_averages_pixel_embeddings() -> None:
    task = DUNIAZeroShotKNNTask(embedder=Spectral(), keys="vertical", embedding_window=5)
    image = torch.randn(1, 14, 9, 9)
    emb = task.embed(image)
    # at (4, 4) the full 5 x 5 window; at the corner (0, 0) the 3 x 3 part inside the image
    torch.testing.assert_close(emb[0, :, 4, 4], image[0, :, 2:7, 2:7].mean((1, 2)))
    torch.testing.assert_close(emb[0, :, 0, 0], image[0, :, :3, :3].mean((1, 2)))


def test_database_fraction_keeps_a_seeded_subset_with_its_waveforms() -> None:
    g = torch.Generator().manual_seed(0)
    size = 8
    foot = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1).reshape(1, -1, 2)
    wave = torch.rand(1, size * size, 64, generator=g)
    wave = wave / wave.sum(-1, keepdim=True)
    mask = torch.rand(1, size, size, generator=g) * 30
    batch = {"image": torch.randn(1, 14, size, size, generator=g), "mask": mask, "footprints": foot,
             "footprint_mask": torch.ones(1, size * size, dtype=torch.bool), "waveform": wave}
    full = DUNIAZeroShotKNNTask(embedder=Spectral(), waveform_length=64, waveform_kwargs=WAVE, seed=3)
    full.build_database([batch])
    assert len(full.database) == size * size
    torch.testing.assert_close(full.database.labels[:, 0], mask.reshape(-1))  # mask at each footprint's pixel
    part = DUNIAZeroShotKNNTask(embedder=Spectral(), waveform_embedder=full.waveform_model, database_fraction=0.1,
                                seed=3)
    part.build_database([batch])
    assert len(part.database) == round(0.1 * size * size)
    rows = [int(torch.nonzero((full.database.keys == k).all(1))[0]) for k in part.database.keys]
    assert rows == sorted(rows) and len(set(rows)) == len(rows)
    torch.testing.assert_close(part.waveforms(), full.waveforms()[rows])
    torch.testing.assert_close(part.database.labels, full.database.labels[rows])


@pytest.mark.parametrize("keys", ["waveform", "vertical"])
def test_waveform_retrieval_baseline_uses_o_w_keys(tiny_world_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                   keys: str) -> None:
    """The generation task's retrieval baseline: the training footprints' O^W (default) or O^V as keys, queried with
    the footprint pixel's O^V, returning the nearest key's waveform."""
    import terratorch_eoplugins.tasks.dunia_diffusion as diffusion
    from terratorch_eoplugins.datamodules.gedi import GEDIDataModule

    dm = GEDIDataModule(root=str(tiny_world_dir / "GEDI"), chip_size=32, waveform_length=64, waveform_mode="resample",
                        batch_size=4, batch_keys=["footprints", "footprint_mask", "waveform", "shot_number"])
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    task = diffusion.DUNIAWaveformDiffusionTask(
        waveform_length=64, autoencoder_kwargs=WAVE, dunia_kwargs=MICRO, retrieval_keys=keys,
        unet_kwargs={"model_channels": 16, "channel_mult": [1, 2], "context_tokens": 2, "num_heads": 2})
    monkeypatch.setattr(diffusion, "train_split_batches", lambda *a, **k: [batch])
    task._trainer = object()  # build_database only needs "a trainer" to read the (patched) training split
    try:
        db = task.build_database()
    finally:
        task._trainer = None
    s = task.footprint_samples(batch)
    ae = task.autoencoder.eval()
    with torch.no_grad():
        expected = (F.normalize(ae.embed(ae.encode(s["waveform"])), dim=1) if keys == "waveform"
                    else F.normalize(s["cond"], dim=1))
    torch.testing.assert_close(db["keys"], expected)
    nearest = (F.normalize(s["cond"], dim=1) @ expected.T).argmax(1)
    torch.testing.assert_close(task.retrieve(s["cond"]), s["waveform"][nearest])
    with pytest.raises(ValueError, match="retrieval_keys"):
        diffusion.DUNIAWaveformDiffusionTask(retrieval_keys="horizontal")


def test_weighted_f1_callback_logs_the_support_weighted_f1_of_a_segmentation_task() -> None:
    """The callback for terratorch's fine-tuning tasks: val/test wF1 of the arg-max prediction, ignore_index out."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from terratorch_eoplugins.tasks.dunia_metrics import WeightedF1

    class Seg(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.save_hyperparameters({"model_args": {"num_classes": 3}, "ignore_index": -1})
            self.w = nn.Parameter(torch.randn(3, 14, generator=torch.Generator().manual_seed(1)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("cb,nbhw->nchw", self.w, x)

        def test_step(self, batch: dict, batch_idx: int) -> None:
            return None

    batches = [_class_batch(s) for s in (5, 6, 7)]
    for b in batches:
        b["mask"][:, 0, :] = -1  # unlabelled row
    loader = DataLoader(batches, batch_size=None)
    model = Seg()
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[WeightedF1()])
    out = trainer.test(model, loader, verbose=False)[0]
    with torch.no_grad():
        pred = np.concatenate([model(b["image"]).argmax(1).reshape(-1).numpy() for b in batches])
    y = np.concatenate([b["mask"].reshape(-1).numpy() for b in batches])
    keep = y != -1
    assert out["test/wF1"] == pytest.approx(_weighted_f1(pred[keep], y[keep], 3), abs=1e-6)
