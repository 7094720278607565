"""DUNIA waveform-generation task: footprint gathering of O^V, bad batches, autoencoder checkpoint loading,
Pearson r, a predict run writing HDF5 with shot numbers (tiny settings; the learning figure is measured by
``benchmarks/dunia_waveform_generation.py``)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from terratorch_eoplugins.metrics import aligned_pearson_r, pearson_r
from terratorch_eoplugins.tasks.dunia_diffusion import DUNIAWaveformDiffusionTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(waveform_length=64, autoencoder_kwargs={"num_quantizers": 2, "codebook_size": 32},
            unet_kwargs={"model_channels": 16, "channel_mult": [1, 2], "context_tokens": 2, "num_heads": 2},
            num_steps=2, autoencoder_steps=1)


def _datamodule(world: Path, **kw):
    from terratorch_eoplugins.datamodules.gedi import GEDIDataModule

    return GEDIDataModule(root=str(world / "GEDI"), waveform_length=64, waveform_mode="resample", batch_size=2,
                          batch_keys=["footprints", "footprint_mask", "waveform", "shot_number"], **kw)


@pytest.fixture(scope="module")
def batch(tiny_world_dir: Path):
    dm = _datamodule(tiny_world_dir)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_pearson_r_matches_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(5, 30, generator=g), torch.rand(5, 30, generator=g)
    expected = [np.corrcoef(a[i].numpy(), b[i].numpy())[0, 1] for i in range(5)]
    np.testing.assert_allclose(pearson_r(a, b).numpy(), expected, rtol=1e-5)
    assert torch.isnan(pearson_r(torch.ones(1, 4), torch.rand(1, 4))).all()


def test_aligned_pearson_r_matches_a_brute_force_over_lags() -> None:
    """Independent: every lag d in [-S, S], the prediction shifted by d with zeros moved in, numpy's corrcoef; the
    maximum per row and its lag."""
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(6, 40, generator=g)
    pred = torch.roll(ref, -3, dims=1) + 0.1 * torch.rand(6, 40, generator=g)  # ref shifted 3 samples earlier
    pred[1] = torch.rand(40, generator=g)
    r, lag = aligned_pearson_r(pred, ref, 5)
    for i in range(6):
        best, best_d = -np.inf, 0
        for d in range(-5, 6):
            x = np.zeros(40)
            src = pred[i].numpy().astype(np.float64)
            if d >= 0:
                x[d:] = src[:40 - d]
            else:
                x[:d] = src[-d:]
            c = np.corrcoef(x, ref[i].numpy())[0, 1]
            if c > best:
                best, best_d = c, d
        assert r[i].item() == pytest.approx(best, abs=1e-5) and lag[i].item() == best_d
    assert (lag[[0, 2, 3, 4, 5]] == 3).all()  # the shift that undoes the roll
    torch.testing.assert_close(aligned_pearson_r(pred, ref, 0)[0], pearson_r(pred, ref))
    assert (r >= pearson_r(pred, ref) - 1e-6).all()
    assert torch.isnan(aligned_pearson_r(torch.zeros(1, 8), torch.rand(1, 8), 2)[0]).all()  # constant at every lag
    with pytest.raises(ValueError, match="max_shift"):
        aligned_pearson_r(pred, ref, -1)


def test_condition_is_dunia_vertical_embedding_at_footprint_pixels(batch) -> None:
    torch.manual_seed(0)
    task = DUNIAWaveformDiffusionTask(**TINY)
    s = task.footprint_samples(batch)
    n_valid = int(batch["footprint_mask"].sum())
    assert len(s["waveform"]) == len(s["cond"]) == n_valid > 0
    with torch.no_grad():
        ov = task.dunia.forward_embeddings(batch["image"])["vertical"]
    j = 3
    b, r, c = int(s["chip"][j]), int(s["row"][j]), int(s["col"][j])
    expected = torch.nn.functional.normalize(ov[b, :, r, c], dim=0)
    torch.testing.assert_close(s["cond"][j], expected)
    assert s["cond"].shape[1] == task.dunia.out_dim == task.cond_dim
    k = int(torch.nonzero(batch["footprint_mask"][b])[0])
    assert int(s["shot_number"][0]) == int(batch["shot_number"][0, 0]) and k == 0


def test_bad_batches(batch) -> None:
    task = DUNIAWaveformDiffusionTask(**TINY)
    empty = dict(batch)
    empty["footprint_mask"] = torch.zeros_like(batch["footprint_mask"])
    assert task.training_step(empty, 0) is None
    assert task.predict_step(empty, 0) is None
    with pytest.raises(KeyError, match="batch_keys"):
        task.footprint_samples({"image": batch["image"]})
    longer = dict(batch)
    longer["waveform"] = torch.zeros(*batch["waveform"].shape[:2], 256)
    with pytest.raises(ValueError, match="waveform_length=64"):
        task.footprint_samples(longer)
    with pytest.raises(ValueError, match="p_uncond"):
        DUNIAWaveformDiffusionTask(p_uncond=2.0, **TINY)


def test_autoencoder_phase_then_frozen_and_reloaded(batch, tmp_path: Path) -> None:
    torch.manual_seed(0)
    task = DUNIAWaveformDiffusionTask(**TINY)
    assert not bool(task.ae_ready)
    task._trainer = None
    loss = task.training_step(batch, 0)  # global_step 0 < autoencoder_steps: autoencoder phase
    assert loss.requires_grad and not bool(task.ae_ready)
    task.hparams["autoencoder_steps"] = 0
    loss = task.training_step(batch, 1)  # diffusion phase: autoencoder frozen, latent statistics recorded
    assert bool(task.ae_ready) and bool(task.stats_ready)
    assert not any(p.requires_grad for p in task.autoencoder.parameters())
    ckpt = tmp_path / "task.ckpt"
    torch.save({"state_dict": task.state_dict()}, ckpt)
    other = DUNIAWaveformDiffusionTask(autoencoder_ckpt_path=str(ckpt), **TINY)
    assert bool(other.ae_ready)
    for k, v in task.autoencoder.state_dict().items():
        assert torch.equal(other.autoencoder.state_dict()[k], v)
    wrong = tmp_path / "wrong.ckpt"
    torch.save({"state_dict": {"x.weight": torch.zeros(1)}}, wrong)
    with pytest.raises(ValueError, match="no WaveformAutoencoder weights"):
        DUNIAWaveformDiffusionTask(autoencoder_ckpt_path=str(wrong), **TINY)


def test_predict_writes_generated_waveforms_with_shot_numbers(tiny_world_dir: Path, tmp_path: Path) -> None:
    from lightning.pytorch import Trainer

    torch.manual_seed(0)
    out = tmp_path / "pred.h5"
    task = DUNIAWaveformDiffusionTask(predict_output=str(out), sema_every=1, **TINY)
    dm = _datamodule(tiny_world_dir)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=1,
        limit_test_batches=1,
        limit_predict_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(task, datamodule=dm)
    # Switch EMA averages the diffusion model alone, once per optimiser step of the diffusion phase
    assert set(task._sema.ema) == {n for n, _ in task.diffusion.named_parameters()}
    assert task._sema.steps == trainer.global_step - TINY["autoencoder_steps"] >= 1
    metrics = trainer.test(task, datamodule=dm, verbose=False)[0]
    assert {"test/loss", "test/r_generated", "test/r_retrieved", "test/r_random", "test/r_generated_unaligned"} <= set(
        metrics)
    assert metrics["test/r_generated"] >= metrics["test/r_generated_unaligned"] - 1e-6  # the best shift includes 0
    trainer.predict(task, datamodule=dm, return_predictions=False)
    with h5py.File(out) as f:
        n = len(f["shot_number"])
        assert n > 0 and f["generated"].shape == (n, 64) == f["reference"].shape == f["retrieved"].shape
        assert np.isfinite(f["generated"][()]).all() and f.attrs["num_steps"] == 2
        ds = dm.predict_dataset
        shots = set(ds.shots_ds.shots["shot_number"][ds.shot_ids].tolist())
        assert set(f["shot_number"][()].tolist()) <= shots


def test_latent_statistics_pool_all_footprints_of_the_given_batches(batch) -> None:
    """fit_latent_stats: per-channel mean/std over every valid footprint of several batches (not only the first),
    equal to the statistics of the concatenated latents."""
    torch.manual_seed(0)
    task = DUNIAWaveformDiffusionTask(**TINY)
    second = dict(batch)
    second["waveform"] = batch["waveform"] * 3.0 + 0.01
    chunks = [b["waveform"][b["footprint_mask"].bool()] for b in (batch, second)]
    n = task.fit_latent_stats(iter(chunks))
    waves = torch.cat(chunks).float()
    assert n == len(waves) and bool(task.stats_ready)
    with torch.no_grad():
        zq, _, _ = task.autoencoder.quantize(task.autoencoder.encode(waves))
    z = zq.double().transpose(0, 1).reshape(zq.shape[1], -1).numpy()
    np.testing.assert_allclose(task.latent_mean.numpy(), z.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(task.latent_std.numpy(), np.maximum(z.std(1, ddof=1), 1e-6), rtol=1e-4, atol=1e-6)
    empty = dict(batch)
    empty["footprint_mask"] = torch.zeros_like(batch["footprint_mask"])
    with pytest.raises(ValueError, match="no GEDI footprint"):
        DUNIAWaveformDiffusionTask(**TINY).fit_latent_stats([empty["waveform"][empty["footprint_mask"].bool()]])
    with pytest.raises(ValueError, match="latent_stats_batches"):
        DUNIAWaveformDiffusionTask(latent_stats_batches=-1, **TINY)


def test_pretraining_checkpoint_gives_conditioning_model_and_autoencoder(tmp_path: Path) -> None:
    """A DUNIA pretraining checkpoint whose D_p is not the autoencoder default (64) provides both the conditioning
    image model and the waveform autoencoder (O^W has the checkpoint's D_p)."""
    from terratorch_eoplugins.models.dunia import DUNIAPretrainModel

    micro = dict(embed_dim=32, ffn_dim=64, num_heads=2, out_dim=8, na_kernel=5, na_heads=1)
    wave = {"num_quantizers": 2, "codebook_size": 32}
    torch.manual_seed(0)
    model = DUNIAPretrainModel("tiny", micro, lstm_layers=1, waveform_length=64, waveform_kwargs=wave)
    ckpt = tmp_path / "dunia_pretrain.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"variant": "tiny", "image_kwargs": micro, "lstm_layers": 1, "waveform_length": 64,
                                     "waveform_kwargs": wave}}, ckpt)
    task = DUNIAWaveformDiffusionTask(backbone_ckpt_path=str(ckpt), dunia_kwargs=micro,
                                      **{k: v for k, v in TINY.items() if k != "autoencoder_steps"})
    assert bool(task.ae_ready) and task.cond_dim == 8 and task.autoencoder.to_embedding.out_features == 8
    for k, v in model.waveform.state_dict().items():
        assert torch.equal(task.autoencoder.state_dict()[k], v)
    loaded = task.dunia.state_dict()  # pretraining heads (projection, reconstruction) are not loaded
    assert loaded and all(torch.equal(v, model.image.state_dict()[k]) for k, v in loaded.items())
