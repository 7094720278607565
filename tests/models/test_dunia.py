"""DUNIA: image model, terratorch registration, low-shot freezing, checkpoints, pretraining task."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from terratorch_eoplugins.metrics import alignment_similarities
from terratorch_eoplugins.models.dunia import (
    DUNIA,
    DUNIA_VARIANTS,
    DUNIAPretrainModel,
    build_dunia,
    load_dunia_checkpoint,
    load_dunia_pretrain_model,
)
from terratorch_eoplugins.tasks.dunia_pretrain import (
    DUNIAPretrainTask,
    gather_footprints,
)
from terratorch_eoplugins.tasks.optimization import warmup_cosine_factor as warmup_cosine

#: an even smaller image model for task tests (NA head dim 8 = out_dim / na_heads)
MICRO = dict(embed_dim=32, ffn_dim=64, num_heads=2, out_dim=8, na_kernel=5, na_heads=1)
WAVE = dict(codebook_size=16, num_quantizers=2)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    torch.manual_seed(0)


def test_paper_configuration() -> None:
    cfg = DUNIA_VARIANTS["base"]
    assert (cfg["patch_size"], cfg["embed_dim"], cfg["depth"], cfg["num_blocks"], cfg["num_heads"], cfg["ffn_dim"],
            cfg["dropout"], cfg["out_dim"], cfg["na_kernel"], cfg["in_channels"]) == (8, 512, 16, 4, 8, 2048, 0.1, 64,
                                                                                      19, 14)


def test_embeddings_any_size_divisible_by_patch() -> None:
    model = build_dunia("tiny", **MICRO).eval()
    out = model.forward_embeddings(torch.randn(2, 14, 16, 40))
    assert out["vertical"].shape == out["horizontal"].shape == (2, 8, 16, 40)
    for d, (v, h) in enumerate(zip(out["vertical_levels"], out["horizontal_levels"])):
        assert v.shape == h.shape == (2, 8 * 2**d, 16 // 2**d, 40 // 2**d)
    assert not torch.allclose(out["vertical"], out["horizontal"])  # two independent decoders
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        model.forward_embeddings(torch.randn(1, 14, 20, 16))
    with pytest.raises(ValueError, match="14 input channels"):
        model.forward_embeddings(torch.randn(1, 12, 16, 16))
    with pytest.raises(ValueError, match="depth"):
        DUNIA(depth=6, num_blocks=4)


def test_registered_backbone_and_lowshot_head_through_terratorch() -> None:
    from terratorch.models import EncoderDecoderFactory
    from terratorch.registry import BACKBONE_REGISTRY

    from terratorch_eoplugins.models.dunia import DUNIABackbone, dunia_tiny

    bb = BACKBONE_REGISTRY.build("dunia_tiny", **MICRO)
    assert bb.out_channels == [8, 8]
    # timm's pattern: the module-level factory is the registered one and returns what the registry returns
    assert isinstance(bb, DUNIABackbone) and isinstance(dunia_tiny(**MICRO), DUNIABackbone)
    feats = bb(torch.randn(1, 14, 16, 16), dates=None)
    assert [tuple(f.shape) for f in feats] == [(1, 8, 16, 16), (1, 8, 16, 16)]
    with pytest.raises(ValueError, match="ckpt_path"):
        BACKBONE_REGISTRY.build("dunia_tiny", pretrained=True)
    model = EncoderDecoderFactory().build_model(
        task="segmentation", backbone="dunia_tiny", backbone_lowshot=True, decoder="dunia_lowshot_head",
        decoder_embedding="horizontal", num_classes=5, **{f"backbone_{k}": v for k, v in MICRO.items()})
    out = model(torch.randn(2, 14, 16, 16)).output
    assert out.shape == (2, 5, 16, 16)


@pytest.mark.parametrize(("embedding", "updated"), [("vertical", {"decoder_v"}), ("horizontal", {"decoder_h"}),
                                                    ("both", {"decoder_v", "decoder_h"})])
def test_lowshot_trains_only_last_na_layers_and_head(embedding: str, updated: set[str]) -> None:
    from terratorch_eoplugins.models.dunia import DUNIABackbone, DUNIALowShotHead

    bb = DUNIABackbone("tiny", lowshot=True, **MICRO)
    head = DUNIALowShotHead(bb.out_channels, embedding)
    # the first 1x1 conv halves the channels it reads: D_p (one embedding) or 2 D_p (O^V and O^H concatenated)
    assert (
        head.conv[0].in_channels == (16 if embedding == "both" else 8)
        and head.out_channels == head.conv[0].in_channels // 2
    )
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.decoder_v.na.1.", "model.decoder_h.na.1.")) for n in trainable)
    bb.train()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    opt = torch.optim.SGD([p for p in bb.parameters() if p.requires_grad] + list(head.parameters()), lr=0.1)
    loss = head(bb(torch.randn(2, 14, 16, 16))).square().mean()
    loss.backward()
    opt.step()
    after = bb.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".na.1." in k for k in changed)  # BatchNorm statistics of frozen parts untouched too
    # only the NA layer(s) of the decoder(s) whose embedding the head reads get a gradient
    assert {k.split(".")[1] for k in changed} == updated


def test_band_mapping_temporal_median_and_modalities() -> None:
    from terratorch_eoplugins.models.dunia import DUNIABackbone

    bb = DUNIABackbone("tiny", temporal_reduce="median", modalities=["S2", "S1A"],
                       band_indices=[None, 0, 1, 2, 3, 4, 5, 6, 7, None, 8, 9, 10, 11], **MICRO)
    s2, s1 = torch.randn(1, 10, 5, 16, 16), torch.randn(1, 3, 4, 16, 16)
    x = bb.prepare_input({"S2": s2, "S1A": s1})
    assert x.shape == (1, 14, 16, 16)
    assert torch.equal(x[:, 0], torch.zeros(1, 16, 16)) and torch.equal(x[:, 9], torch.zeros(1, 16, 16))
    assert torch.equal(x[:, 1], s2.median(2).values[:, 0]) and torch.equal(x[:, 13], s1.median(2).values[:, 1])
    with pytest.raises(ValueError, match="lacks modalities"):
        bb.prepare_input({"S2": s2})
    with pytest.raises(ValueError, match="temporal_reduce"):
        DUNIABackbone("tiny", **MICRO)(torch.randn(1, 14, 3, 16, 16))
    with pytest.raises(ValueError, match="14 DUNIA bands"):
        DUNIABackbone("tiny", band_indices=[0, 1], **MICRO)


def _save_pretrain_checkpoint(path: Path, variant: str = "tiny") -> DUNIAPretrainModel:
    model = DUNIAPretrainModel(variant, MICRO, lstm_layers=1, waveform_length=64, waveform_kwargs=WAVE)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"variant": variant, "image_kwargs": MICRO,
                                                          "lstm_layers": 1, "waveform_length": 64,
                                                          "waveform_kwargs": WAVE}}, path)
    return model


def test_checkpoint_roundtrip_and_variant_errors(tmp_path: Path) -> None:
    from terratorch.registry import BACKBONE_REGISTRY

    ckpt = tmp_path / "dunia.ckpt"
    ref = _save_pretrain_checkpoint(ckpt).image.eval()
    x = torch.randn(1, 14, 16, 16)
    loaded = load_dunia_checkpoint(ckpt, variant="tiny").eval()
    assert loaded.projection_heads is None  # pretraining heads dropped
    with torch.no_grad():
        assert torch.allclose(loaded.forward_embeddings(x)["vertical"], ref.forward_embeddings(x)["vertical"])
        bb = BACKBONE_REGISTRY.build("dunia_tiny", pretrained=True, ckpt_path=str(ckpt)).eval()
        assert torch.allclose(bb(x)[1], ref.forward_embeddings(x)["horizontal"])
    with pytest.raises(ValueError, match="variant 'tiny'.*variant='base'"):
        load_dunia_checkpoint(ckpt, variant="base")
    # plain state dict of the image model (no variant recorded): a shape mismatch names the variant
    plain = tmp_path / "plain.pt"
    torch.save(ref.state_dict(), plain)
    assert isinstance(load_dunia_checkpoint(plain, variant="tiny", **MICRO), DUNIA)
    with pytest.raises(ValueError, match="another variant"):
        load_dunia_checkpoint(plain, variant="tiny")
    with pytest.raises(FileNotFoundError):
        load_dunia_checkpoint(tmp_path / "missing.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        load_dunia_checkpoint(junk, variant="tiny")
    full = load_dunia_pretrain_model(ckpt, variant="tiny")
    w = torch.rand(3, 64)
    assert full.waveform.embed(full.waveform.encode(w)).shape == (3, 8)


def _batch(b: int = 2, size: int = 16, k: int = 6, footprints: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    foot = torch.randint(0, size, (b, k, 2), generator=g)
    fmask = torch.ones(b, k, dtype=torch.bool) if footprints else torch.zeros(b, k, dtype=torch.bool)
    if not footprints:
        foot[:] = -1
    return {"image": torch.randn(b, 14, size, size, generator=g),
            "series": torch.randn(b, 14, 2, size, size, generator=g),
            "footprints": foot, "footprint_mask": fmask, "waveform": torch.rand(b, k, 64, generator=g) / 64}


def _task(**kw: object) -> DUNIAPretrainTask:
    return DUNIAPretrainTask(variant="tiny", image_kwargs=MICRO, lstm_layers=1, waveform_length=64,
                             waveform_kwargs=WAVE, optimizer="AdamW", lr=2e-3, optimizer_hparams={"weight_decay": 0.0},
                             scheduler_hparams={"warmup": 2, "total": 100}, vicreg_pixels=256, **kw)


def test_gather_footprints_and_similarities() -> None:
    emb = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    foot = torch.tensor([[[1, 2], [-1, -1]], [[3, 0], [0, 3]]])
    mask = torch.tensor([[True, False], [True, True]])
    z, b_idx, k_idx = gather_footprints(emb, foot, mask)
    assert torch.equal(z, torch.stack([emb[0, :, 1, 2], emb[1, :, 3, 0], emb[1, :, 0, 3]]))
    assert b_idx.tolist() == [0, 1, 1] and k_idx.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="outside"):
        gather_footprints(emb, torch.tensor([[[4, 0]]]), torch.tensor([[True]]))
    a = torch.eye(4)
    sims = alignment_similarities(a, a)
    assert sims == {"positive": pytest.approx(1.0), "negative": pytest.approx(0.0)}


def test_warmup_cosine_schedule() -> None:
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(110, 10, 110) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(35, 10, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_batch_without_footprints_skips_alignment_or_raises() -> None:
    task = _task()
    parts = task.compute_losses(_batch(footprints=False))
    assert float(parts["zero_cl"]) == 0.0 and float(parts["rec_waveform"]) == 0.0 and float(parts["footprints"]) == 0
    assert torch.isfinite(parts["loss"]) and float(parts["vicreg"].detach()) > 0
    parts["loss"].backward()  # the pixel-pixel and reconstruction terms still train
    assert task.model.image.decoder_h.merge[0].weight.grad is not None
    with pytest.raises(ValueError, match="GEDI footprint"):
        _task(on_missing_footprints="error").compute_losses(_batch(footprints=False))
    with pytest.raises(ValueError, match="lacks"):
        task.compute_losses({"image": torch.randn(1, 14, 16, 16)})


def test_short_pretraining_lowers_every_loss() -> None:
    """Fixed batch, 30 AdamW steps: total, Zero-CL, VICReg and reconstruction losses all decrease (eval mode; the
    standardised Zero-CL needs ~30 steps before the BatchNorm running statistics of the waveform AE catch up)."""
    task = _task(sema_every=0)
    opt = task.configure_optimizers()["optimizer"]
    batch = _batch(b=2, size=16, k=8)
    task.eval()  # deterministic evaluation (dropout/BatchNorm eval) before and after
    with torch.no_grad():
        first = task.compute_losses(batch)
    task.train()
    for _ in range(30):
        parts = task.compute_losses(batch)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
    task.eval()
    with torch.no_grad():
        last = task.compute_losses(batch, similarities=True)
    for key in ("loss", "zero_cl", "vicreg", "rec_series", "rec_image"):
        assert float(last[key]) < float(first[key]), key
    assert last["sim_pw"]["positive"] > last["sim_pw"]["negative"]
    assert last["sim_pp"]["positive"] > last["sim_pp"]["negative"]


def test_switch_ema_updates_and_switches() -> None:
    task = _task(sema_every=1, sema_decay=0.5, sema_switch_every=2, sema_coefficient=1.0)
    p = next(task.model.parameters())
    with torch.no_grad():
        p0 = p.clone()
        task.sema_update()  # step 1: EMA initialised to p0, then 0.5 p0 + 0.5 p0
        p.add_(1.0)
        task.sema_update()  # step 2: EMA = 0.5 p0 + 0.5 (p0 + 1) = p0 + 0.5; switch: p <- EMA
    assert torch.allclose(p, p0 + 0.5)
    ckpt: dict = {}
    task.on_save_checkpoint(ckpt)
    other = _task()
    other.on_load_checkpoint(ckpt)
    assert other._sema.steps == 2 and torch.allclose(other._sema.ema[next(iter(other._sema.ema))], p0 + 0.5)


def test_lightning_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    """A checkpoint written by Lightning from DUNIAPretrainTask loads into the image model and the backbone."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    task = _task(sema_every=1, sema_switch_every=0)
    batch = _batch(b=1, size=16, k=4)
    loader = DataLoader([{k: v[0] for k, v in batch.items()}], batch_size=1)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(task, train_dataloaders=loader)
    path = tmp_path / "pretrain.ckpt"
    trainer.save_checkpoint(path)
    model = load_dunia_checkpoint(path, variant="tiny").eval()
    task.eval()
    x = torch.randn(1, 14, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.forward_embeddings(x)["vertical"],
                              task.model.image.forward_embeddings(x)["vertical"], atol=1e-6)
    with pytest.raises(ValueError, match="variant"):
        load_dunia_checkpoint(path, variant="base")


def test_pretraining_chips_series_from_georeferenced_tiles(tiny_world_dir: Path) -> None:
    """Each chip gets a [14, T, H, W] series read from S2_TILES/S1_TILES at the chip's georeferenced window."""
    import numpy as np
    import rasterio
    from rasterio.windows import Window

    from terratorch_eoplugins.datasets.dunia_chips import DUNIAPretrainChips

    ds = DUNIAPretrainChips(tiny_world_dir / "GEDI", split="test", chip_size=64)
    sample = ds[0]
    series, image = sample["series"], sample["image"]
    assert series.shape == (14, 3, 64, 64) and sample["waveform"].shape[-1] == 256
    # independent check of one band/period: median of the cloud-free B04 DN of period 1, standardised
    row, col = ds.chips[0]
    tile = ds.region.tiles[0]
    vals = []
    for when, path in tile.files:
        if ds.period_edges[0] <= when < ds.period_edges[1]:
            with rasterio.open(path) as src:
                dn = src.read(4, window=Window(col, row, 64, 64)).astype(np.float64)
            with rasterio.open(path.parent / "MSK_CLDPRB" / path.name) as src:
                clear = src.read(1, window=Window(col, row, 64, 64)) < 50
            vals.append(np.where(clear, (dn - 1000) / 10000, np.nan))
    med = np.nanmedian(np.stack(vals), 0)
    ok = np.isfinite(med)
    ref = (med - ds.means[3]) / ds.stds[3]
    assert ok.mean() > 0.5 and np.allclose(series[3, 0].numpy()[ok], ref[ok], atol=1e-4)
    # the leaf-on composite resembles the series' temporal mean (same place, same bands)
    corr = np.corrcoef(series.mean(1).flatten().numpy(), image.flatten().numpy())[0, 1]
    assert corr > 0.7


def test_target_mean_bias_init_sets_head_bias_to_labelled_mean() -> None:
    from types import SimpleNamespace

    from terratorch.models.heads.regression_head import RegressionHead

    from terratorch_eoplugins.tasks.preparation import TargetMeanBiasInit

    g = torch.Generator().manual_seed(0)
    masks = [torch.full((2, 8, 8), -1.0) for _ in range(3)]
    for m in masks:
        m.view(-1)[torch.randperm(128, generator=g)[:10]] = torch.rand(10, generator=g) * 30
    batches = [{"image": torch.zeros(2, 14, 8, 8), "mask": m} for m in masks]
    trainer = SimpleNamespace(datamodule=SimpleNamespace(train_dataloader=lambda: iter(batches)))
    module = SimpleNamespace(model=SimpleNamespace(head=RegressionHead(4)), hparams={"ignore_index": -1})
    TargetMeanBiasInit().on_fit_start(trainer, module)
    labelled = np.concatenate([m.numpy()[m.numpy() != -1] for m in masks])
    assert module.model.head.head[-1].bias.item() == pytest.approx(labelled.mean(), rel=1e-6)
    TargetMeanBiasInit(max_batches=1).on_fit_start(trainer, module)
    assert module.model.head.head[-1].bias.item() == pytest.approx(masks[0][masks[0] != -1].mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="no labelled pixel"):
        empty = SimpleNamespace(
            datamodule=SimpleNamespace(train_dataloader=lambda: iter([{"mask": -torch.ones(1, 4, 4)}]))
        )
        TargetMeanBiasInit().on_fit_start(empty, module)
    with pytest.raises(ValueError, match="no head ending in a Conv2d"):
        TargetMeanBiasInit().on_fit_start(trainer, SimpleNamespace(model=SimpleNamespace(), hparams={}))
