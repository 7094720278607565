"""LIANet: parameter budgets, generator checks, checkpoints, pretraining learns (samples: tests/datasets)."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from terratorch.registry import BACKBONE_REGISTRY, DECODER_REGISTRY

import terratorch_eoplugins  # noqa: F401
from terratorch_eoplugins.datamodules.lianet import LIANetPretrainDataModule
from terratorch_eoplugins.models.lianet import (
    LEGACY_DEFAULTS,
    LIANetBackbone,
    LIANetGenerator,
    LIANetHead,
    load_generator,
    parameter_counts,
    save_generator,
)
from terratorch_eoplugins.tasks.lianet_pretrain import LIANetPretrainTask
from terratorch_eoplugins.tasks.optimization import warmup_cosine_factor as warmup_cosine
from terratorch_eoplugins.tasks.preparation import train_split_info

SMALL = dict(levels=6, features_per_level=4, log2_table_size=12, base_resolution=8, growth=2.0, preproj_channels=16,
             trunk_hidden=16, trunk_blocks=1, trunk_out=16)


def test_parameter_counts_match_the_reference() -> None:
    """Base/Large: the reference config's F = 4 (tables 11 x 2**17 x 4; 74.8M for Base); Modified: 71.0M (the
    supplement). The exact per-key layout is checked in test_lianet_convert.py."""
    base, large, mod = (parameter_counts(variant=v) for v in ("base", "large", "modified"))
    assert base["hash_tables"] == large["hash_tables"] == 11 * 2**17 * 4
    assert round(base["total"] / 1e6, 1) == 74.8
    assert round(mod["hash_tables"] / 1e6, 1) == 67.1 and round(mod["without_tables"] / 1e6, 2) == 3.93
    assert round(mod["total"] / 1e6, 1) == 71.0
    head = DECODER_REGISTRY.build("lianet_head", [128])
    tunable = sum(p.numel() for p in head.parameters()) + 32 * 19 + 19  # + terratorch's 1x1 classifier
    assert 0.75e6 < tunable < 1e6 and head.out_channels == 32
    full = DECODER_REGISTRY.build("eoplugins_lianet_classifier_head", [128], num_classes=19)
    last = full.net[-1]
    assert isinstance(last, torch.nn.Conv2d) and last.kernel_size == (3, 3) and full.out_channels == 19
    assert sum(p.numel() for p in full.parameters()) == tunable - 32 * 19 - 19 + 32 * 19 * 9 + 19


def test_the_factory_builds_the_reference_head_with_its_3x3_classifier() -> None:
    """decoder eoplugins_lianet_classifier_head: terratorch adds no head; the decoder ends in a 3x3 classifier."""
    from terratorch.models import EncoderDecoderFactory

    model = EncoderDecoderFactory().build_model(
        task="segmentation", backbone="lianet_modified", backbone_generator_args={**SMALL, "region_size": 64.0},
        decoder="eoplugins_lianet_classifier_head", decoder_channels=[8, 8], decoder_classifier_kernel=3,
        num_classes=5)
    assert isinstance(model.head, torch.nn.Identity)
    clf = model.decoder.net[-1]
    assert clf.kernel_size == (3, 3) and clf.in_channels == 8 and clf.out_channels == 5
    out = model(torch.zeros(1, 1, 16, 16), origin_px=torch.tensor([[0.0, 0.0]]), time_days=torch.tensor([15.0]))
    assert out.output.shape == (1, 5, 16, 16)


def test_x4_head_upsamples_between_width_stages_as_the_reference() -> None:
    """upsample 4 with the paper's channels: [conv-GN-ReLU] x 4 at 10 m, x2, x 4 at 5 m, x2, x 2 at 2.5 m, 3x3
    classifier (the reference's replace_final_block_4x); a single-width head and upsample_after [n-1, n-1] keep both
    x2 after the blocks; a bad upsample_after is refused by name."""
    head = DECODER_REGISTRY.build("eoplugins_lianet_classifier_head", [128], num_classes=2, upsample=4)
    kinds = ["up" if isinstance(m, torch.nn.Upsample) else type(m).__name__ for m in head.net]
    block = ["Conv2d", "GroupNorm", "ReLU"]
    assert kinds == block * 4 + ["up"] + block * 4 + ["up"] + block * 2 + ["Conv2d"]
    sizes: list[tuple[int, int]] = []  # (output channels, output width) of each conv, in call order
    for m in head.net:
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: sizes.append((mod.out_channels, out.shape[-1])) and None)
    out = head([torch.zeros(1, 128, 8, 8)])
    assert out.shape == (1, 2, 32, 32)
    assert sizes == [(128, 8)] * 4 + [(64, 16)] * 4 + [(32, 32)] * 2 + [(2, 32)]
    small = DECODER_REGISTRY.build("eoplugins_lianet_classifier_head", [16], channels=[8, 8], num_classes=2, upsample=4)
    assert small.upsample_after == [1, 1]
    assert [type(m).__name__ for m in small.net][-3:] == ["Upsample", "Upsample", "Conv2d"]
    legacy = DECODER_REGISTRY.build("eoplugins_lianet_classifier_head", [128], num_classes=2, upsample=4,
                                    upsample_after=[9, 9])
    assert [type(m).__name__ for m in legacy.net][30:] == ["Upsample", "Upsample", "Conv2d"]
    assert DECODER_REGISTRY.build("lianet_head", [128], upsample=2).upsample_after == [3]
    with pytest.raises(ValueError, match="upsample_after must list 2"):
        DECODER_REGISTRY.build("lianet_head", [128], upsample=4, upsample_after=[3])
    with pytest.raises(ValueError, match="upsample_after"):
        DECODER_REGISTRY.build("lianet_head", [128], upsample=4, upsample_after=[7, 3])


def test_classifier_init_zero_starts_at_zero_and_still_learns() -> None:
    """decoder_classifier_init: the default keeps the reference's Kaiming fan-out classifier (weight std
    sqrt(2 / fan_out)); "zero" starts the model's output at exactly 0 and the first optimiser step moves it; the
    option is refused by name where the head has no classifier of its own or with an unknown value."""
    from terratorch.models import EncoderDecoderFactory

    torch.manual_seed(0)
    ref = DECODER_REGISTRY.build("eoplugins_lianet_classifier_head", [64], channels=[64, 64], num_classes=32)
    w = ref.net[-1].weight
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    assert abs(float(w.detach().std()) / (2.0 / fan_out) ** 0.5 - 1) < 0.05 and ref.classifier_init == "kaiming"
    model = EncoderDecoderFactory().build_model(
        task="regression", backbone="lianet_modified", backbone_generator_args={**SMALL, "region_size": 64.0},
        decoder="eoplugins_lianet_classifier_head", decoder_channels=[8, 8], decoder_classifier_init="zero")
    batch = {"origin_px": torch.tensor([[0.0, 0.0], [8.0, 4.0]]), "time_days": torch.tensor([15.0, 40.0])}
    out = model(torch.zeros(2, 1, 16, 16), **batch).output
    assert out.shape == (2, 16, 16) and torch.count_nonzero(out) == 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ((out - 0.5) ** 2).mean().backward()
    opt.step()
    assert torch.count_nonzero(model(torch.zeros(2, 1, 16, 16), **batch).output) > 0
    with pytest.raises(ValueError, match="classifier_init must be one of"):
        DECODER_REGISTRY.build("eoplugins_lianet_classifier_head", [16], channels=[8], classifier_init="xavier")
    with pytest.raises(ValueError, match="needs num_classes"):
        LIANetHead([16], [8], classifier_init="zero")
    with pytest.raises(ValueError, match="classifier_init"):  # terratorch's own 1x1 classifier: not this head's
        DECODER_REGISTRY.build("lianet_head", [16], channels=[8], classifier_init="zero")


def test_reference_coordinates_features_decoder_and_legacy_options(tmp_path: Path) -> None:
    from terratorch_eoplugins.nn.hash_encoding import level_seeds, naive_hash_grid

    origin, size = torch.tensor([[5.0, 7.0], [40.0, 2.0]]), (8, 8)
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    pix = torch.stack([xs, ys], -1).reshape(1, 64, 2) + origin[:, None]  # pixel corners x0 ... x0 + 7
    for variant, offset in (("base", 0.5), ("modified", 0.0)):  # v1.0.0 samples pixel centres, release/v1.0.1 corners
        g = LIANetGenerator(variant, **{**SMALL, "trunk": "lite"}, region_size=100.0)
        enc = g.encoder
        expected = naive_hash_grid((pix + offset).reshape(-1, 2), enc.table, enc.resolutions, 100.0,
                                   level_seeds(enc.levels)).reshape(2, 8, 8, -1).permute(0, 3, 1, 2)
        t = torch.tensor([0, 1]) if variant == "base" else torch.tensor([10.0, 20.0])
        expected = expected + g.time_encoder(t)[:, :, None, None]
        torch.testing.assert_close(g.encode(origin, t, size), expected, rtol=0, atol=1e-6)
    # Base/Large: the reference ResUNet decoder (biased fuse and up-convs, no GroupNorm after the up-conv)
    with torch.device("meta"):  # structure only
        ref = LIANetGenerator("base", **{**SMALL, "decoder_widths": [16, 16, 16, 16]}).trunk
        old = LIANetGenerator("base", **{**SMALL, "decoder_widths": [16, 16, 16, 16],
                                         "resunet_decoder": "groupnorm"}).trunk
    assert all(st[0][0].bias is not None for st in ref.stages) and ref.head[0][0].bias is not None
    assert isinstance(ref.head[0][1], torch.nn.Identity) and isinstance(old.head[0][1], torch.nn.GroupNorm)
    assert all(st[0][0].bias is None for st in old.stages)
    # fine-tuning features pass the output activation (ReLU for Base/Large), as the reference's
    g = LIANetGenerator("base", **{**SMALL, "trunk": "lite"}, region_size=100.0).eval()
    bb = LIANetBackbone(g)
    o, ti = torch.tensor([[1.0, 2.0]]), torch.tensor([3])
    torch.testing.assert_close(bb(torch.zeros(1, 1, 8, 8), origin_px=o, time_index=ti)[0],
                               torch.relu(g.features(o, ti, 8)))
    raw = LIANetBackbone(LIANetGenerator("base", **{**SMALL, "trunk": "lite"}, region_size=100.0,
                                         activate_features=False))
    assert float(raw(torch.zeros(1, 1, 8, 8), origin_px=o, time_index=ti)[0].min()) < 0
    # frozen batch norm: eval by default, the reference's train-mode drift with freeze_eval=False
    assert not bb.train().generator.training and LIANetBackbone(g, freeze_eval=False).train().generator.training
    # a checkpoint written before the options existed loads with the behaviour it was trained with
    legacy = LIANetGenerator("base", **{**SMALL, "trunk": "lite"}, region_size=100.0, pixel_centers=False,
                             resunet_decoder="groupnorm", activate_features=False, mlp_phase="year_fraction")
    path = save_generator(legacy, tmp_path / "old.pt")
    ck = torch.load(path, weights_only=True)
    for k in ("pixel_centers", "resunet_decoder", "activate_features", "mlp_phase", "time_init_std"):
        del ck["lianet"]["config"][k]
    torch.save(ck, path)
    loaded = load_generator(path, variant="base").eval()
    assert {k: loaded.config[k] for k in LEGACY_DEFAULTS} == LEGACY_DEFAULTS
    torch.testing.assert_close(loaded(o, ti, 8), legacy.eval()(o, ti, 8))


def test_generator_shapes_and_range_checks() -> None:
    g = LIANetGenerator("modified", **SMALL, region_size=200, region_shape=[200, 150], acquisitions=[1500.4, 1600.4])
    out = g(torch.tensor([[0.0, 0.0], [100.0, 150.0]]), torch.tensor([1500.4, 1600.4]), (32, 48))
    assert out.shape == (2, 12, 32, 48) and out.is_contiguous()
    with pytest.raises(ValueError, match="outside the pretrained region"):
        g(torch.tensor([[120.0, 0.0]]), torch.tensor([1500.4]), 32)  # 120 + 32 > 150 columns
    with pytest.raises(ValueError, match=r"shape \[B, 2\]"):
        g(torch.tensor([1.0, 2.0]), torch.tensor([1500.4]), 8)
    with pytest.raises(ValueError, match="outside the pretrained period"):
        g.resolve_time(torch.tensor([1700.0]))
    gi = LIANetGenerator("modified", **{**SMALL, "time_mode": "index"}, acquisitions=[10.5, 20.5, 30.5])
    assert gi.resolve_time(torch.tensor([20.4, 30.5])).tolist() == [1, 2]
    with pytest.raises(ValueError, match="no pretraining acquisition"):
        gi.resolve_time(torch.tensor([25.0]))


def test_resunet_trunk_runs() -> None:
    g = LIANetGenerator("base", **{**SMALL, "trunk": "resnet50", "decoder_widths": [16, 16, 16, 16]}).eval()
    assert g(torch.zeros(1, 2), torch.tensor([0]), 32).shape == (1, 12, 32, 32)
    assert g(torch.zeros(2, 2), torch.tensor([0, 3]), 64).shape == (2, 12, 64, 64)
    with pytest.raises(ValueError, match="multiples of 32"):
        g(torch.zeros(1, 2), torch.tensor([0]), 40)


def test_checkpoint_roundtrip_and_mismatches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    g = LIANetGenerator("modified", **SMALL, region_size=300)
    path = save_generator(g, tmp_path / "gen.pt")
    bb = BACKBONE_REGISTRY.build("lianet_modified", ckpt_path=str(path), generator_args=SMALL)
    assert bb.out_channels == [16] and not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.generator.training  # frozen generator stays in eval mode
    origin, t = torch.tensor([[5.0, 7.0]]), torch.tensor([1234.5])
    x = torch.zeros(1, 1, 24, 24)
    torch.testing.assert_close(bb(x, origin_px=origin, time_days=t)[0], g.features(origin, t, 24))
    torch.testing.assert_close(bb.reconstruct(origin, t, size=24), g(origin, t, 24))
    with pytest.raises(ValueError, match="LIANet-modified generator, not LIANet-base"):
        BACKBONE_REGISTRY.build("lianet_base", ckpt_path=str(path))
    with pytest.raises(ValueError, match="levels=7 differs"):
        load_generator(path, variant="modified", levels=7)
    with pytest.raises(ValueError, match="origin_px"):
        bb(x)
    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"lianet": {"config": object()}}))
    with pytest.raises(ValueError, match="cannot be read as a PyTorch checkpoint.*never loaded"):
        load_generator(bad)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a LIANet checkpoint"):
        load_generator(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="needs ckpt_path"):
        BACKBONE_REGISTRY.build("lianet_modified", pretrained=True, generator_args=SMALL)


def test_warmup_cosine_schedule() -> None:
    f = [warmup_cosine(s, 5, 20) for s in range(21)]
    assert f[:5] == [0.2, 0.4, 0.6, 0.8, 1.0] and f[5] == 1.0 and f[20] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(f[5:], f[6:]))


def test_registered_factories_are_the_variants_builders() -> None:
    """timm's pattern: the registry holds each variant's factory itself, so both build the same module."""
    from terratorch.registry import TERRATORCH_BACKBONE_REGISTRY, TERRATORCH_DECODER_REGISTRY

    from terratorch_eoplugins.models import lianet

    for name in lianet.REGISTERED["backbone"]:
        assert TERRATORCH_BACKBONE_REGISTRY[name] is getattr(lianet, name)
        torch.manual_seed(0)
        direct = getattr(lianet, name)(generator_args={**SMALL, "trunk": "lite"})
        torch.manual_seed(0)
        built = BACKBONE_REGISTRY.build(name, generator_args={**SMALL, "trunk": "lite"})
        assert type(built) is type(direct) is LIANetBackbone
        assert built.generator.config == direct.generator.config == {**direct.generator.config, "variant": name[7:]}
    assert TERRATORCH_DECODER_REGISTRY["lianet_head"] is lianet.lianet_head


def test_the_task_reads_the_region_the_datamodule_publishes(tiny_world_dir: Path) -> None:
    dm = LIANetPretrainDataModule(root=str(tiny_world_dir / "S2_TILES"), patch_size=24)
    region = train_split_info(SimpleNamespace(datamodule=dm), "region")
    assert region["shape"] == list(dm.region.shape) and region["size"] == dm.region.size
    assert region["acquisitions"] == dm.region.acquisition_days and region["crs"] == dm.region.crs.to_string()
    assert train_split_info(SimpleNamespace(datamodule=dm), "plot_sample") is None  # no val split before setup
    dm.setup("validate")
    assert train_split_info(SimpleNamespace(datamodule=dm), "plot_sample") == dm.val_dataset.plot
    assert train_split_info(None, "region", {}) == {} and train_split_info(SimpleNamespace(), "region") is None
    task = LIANetPretrainTask("modified", SMALL)
    task.trainer = SimpleNamespace(datamodule=dm)
    task.setup("fit")
    assert task.generator.config["region_shape"] == list(dm.region.shape)
    assert task.generator.config["region_transform"] == list(tuple(dm.region.transform)[:6])
    assert task.generator.config["region_crs"] == dm.region.crs.to_string()


def test_pretraining_psnr_rises(tiny_world_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    dm = LIANetPretrainDataModule(root=str(tiny_world_dir / "S2_TILES"), patch_size=24, samples_per_epoch=480,
                                  val_samples=32, batch_size=16)
    task = LIANetPretrainTask("modified", SMALL, lr=1e-2, scheduler_hparams={"warmup": 0, "interval": "step"},
                              plot_every_n_epochs=1)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, gradient_clip_val=1.0,
                         inference_mode=False)
    before = trainer.validate(task, dm, verbose=False)[0]["val/PSNR"]
    trainer.fit(task, dm)
    metrics = trainer.validate(task, dm, verbose=False)[0]
    after = metrics["val/PSNR"]
    assert after > before + 4.0, (before, after)
    assert np.isfinite(metrics["val/PSNR_eq3"])  # supplement eq. 3 beside the data-range PSNR
    gen = task.generator
    assert gen.config["region_shape"] == [384, 256] and len(gen.config["acquisitions"]) == 10
    assert (tmp_path / "lianet_generator.pt").is_file() and (tmp_path / "reconstructions").is_dir()
    loaded = load_generator(tmp_path / "lianet_generator.pt", variant="modified")
    o, t = torch.tensor([[3.0, 4.0]]), torch.tensor(gen.config["acquisitions"][:1])
    torch.testing.assert_close(loaded.eval()(o, t, 16), gen.eval()(o, t, 16))


def test_compression_formulas_and_report(tiny_world_dir: Path, tmp_path: Path) -> None:
    from terratorch_eoplugins.analysis.compression import bits_per_pixel, compression_report, psnr, rate_distortion_plot

    # eq. 2: 1/bpp = Q / (8 B) * sum_c P_c
    assert bits_per_pixel(1000, 4, [500] * 12) == pytest.approx(1 / (4 / 8000 * 6000))
    i = np.array([[0.5, 0.2], [0.1, 0.4]])
    s = i + np.array([[0.1, -0.1], [0.0, 0.0]])
    assert psnr(i, s) == pytest.approx(10 * np.log10(0.25 / 0.005))  # eq. 3 with max(I) = 0.5
    assert psnr(i, i) == np.inf and psnr(np.zeros(3), np.ones(3)) == -np.inf
    # per sample (the pretraining task's val/PSNR_eq3): eq. 3 of each patch, the peak of that generated patch
    from terratorch_eoplugins.metrics import peak_psnr

    batch = torch.stack([torch.as_tensor(i), torch.as_tensor(2 * i)])
    ref = torch.stack([torch.as_tensor(s), torch.as_tensor(s)])
    mse2 = float(np.mean((2 * i - s) ** 2))
    torch.testing.assert_close(peak_psnr(batch, ref, per_sample=True),
                               torch.tensor([10 * np.log10(0.25 / 0.005), 10 * np.log10(1.0 / mse2)],
                                            dtype=torch.float64))
    with pytest.raises(ValueError, match="shapes differ"):
        peak_psnr(batch, ref[:1])
    gen = LIANetGenerator("modified", **SMALL, region_size=384, region_shape=[384, 256])
    rep = compression_report(gen, tiny_world_dir / "S2_TILES", n_patches=3, patch_size=32)
    n_bytes = sum(p.numel() * 4 for p in gen.parameters())
    assert rep["bpp"] == pytest.approx(8 * n_bytes / (10 * 12 * 384 * 256))
    assert len(rep["psnr_rgb_values"]) == 3 and np.isfinite(rep["psnr_all"]["median"])
    assert rate_distortion_plot([rep], tmp_path / "rd.png").is_file()
