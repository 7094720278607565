"""S4: pretraining task (losses, ablations, errors), checkpoint -> registered ``s4_unet3d`` backbone, terratorch
decoders on it, cloud-robustness evaluation (the aligned radar/optical samples: tests/datasets/test_s4.py)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from terratorch.registry import BACKBONE_REGISTRY, TERRATORCH_BACKBONE_REGISTRY

import terratorch_eoplugins  # noqa: F401
from terratorch_eoplugins.analysis.s4_clouds import (
    cloud_robustness,
    confusion_matrix,
    load_segmentation_checkpoint,
    mean_iou,
    series_cloud_ratio,
)
from terratorch_eoplugins.datamodules.s4 import S4PASTISDataModule
from terratorch_eoplugins.datasets.s4 import S4PASTIS, collate_s4
from terratorch_eoplugins.errors import EODataError
from terratorch_eoplugins.models.s4 import S4Model, S4UNet3DBackbone, s4_unet3d
from terratorch_eoplugins.nn.unet3d import UNet3D, pooled_date_mask
from terratorch_eoplugins.tasks.s4_pretrain import S4PretrainTask, augment_series

SMALL = [4, 8, 8, 16]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- pretraining task
def _batch(tiny_world_dir: Path, crop: int = 32, num_dates: int = 3) -> dict:
    dm = S4PASTISDataModule(str(tiny_world_dir / "PASTIS-R"), num_dates=num_dates, crop_size=crop, batch_size=2)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_pretraining_losses_decrease_on_the_synthetic_world(tiny_world_dir: Path) -> None:
    torch.manual_seed(0)
    batch = _batch(tiny_world_dir, crop=16)
    assert set(batch) == {"image", "mask", "filename", "date_mask"} and set(batch["image"]) == {"optical", "radar"}
    assert batch["image"]["optical"].shape[1] == 3  # RGB by default
    task = S4PretrainTask(widths=SMALL, num_pixels=64, lr=3e-3)
    opt = task.configure_optimizers()["optimizer"]
    first = {k: v.item() for k, v in task.compute_losses(batch).items()}
    assert first["loss"] == pytest.approx(first["loss_c"] + first["loss_r"], rel=1e-6)
    # untrained: about log(number of candidates) = log(1 pooled time cell x 2 x 2 bottleneck positions)
    assert 0.3 < first["loss_c"] < np.log(1 * 2 * 2) + 0.5
    for _ in range(20):
        out = task.compute_losses(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    last = {k: v.item() for k, v in task.compute_losses(batch).items()}
    assert last["loss_c"] < first["loss_c"] - 0.2 and last["loss_r"] < first["loss_r"] - 0.05


def test_ablation_modes_select_the_losses(tiny_world_dir: Path) -> None:
    batch = _batch(tiny_world_dir, crop=16, num_dates=2)
    lc = S4PretrainTask(widths=SMALL, reconstruction_weight=0.0).compute_losses(batch)
    assert lc["loss_r"].item() == 0 and lc["loss"].item() == pytest.approx(lc["loss_c"].item())
    lr = S4PretrainTask(widths=SMALL, contrastive_weight=0.0, lr=1e-3)
    assert len(lr.model.decoders) == 2
    out = lr.compute_losses(batch)
    assert out["loss_c"].item() == 0 and out["loss"].item() == pytest.approx(out["loss_r"].item())
    one_way = S4PretrainTask(widths=SMALL, reconstruct_from=["radar"])
    assert list(one_way.model.decoders) == ["radar"]
    sm = S4PretrainTask(widths=SMALL, mode="single_modal", reconstruction_weight=0.0,
                        augment={"noise_std": 0.2, "erase_prob": 1.0})
    radarless = {"image": {"optical": batch["image"]["optical"]}}
    out = sm.compute_losses(radarless)  # needs no radar at all
    assert out["loss_c"].item() > 0 and out["loss_r"].item() == 0
    with pytest.raises(ValueError, match="reconstruction_weight: 0"):
        S4PretrainTask(widths=SMALL, mode="single_modal")
    with pytest.raises(ValueError, match="not both 0"):
        S4PretrainTask(widths=SMALL, contrastive_weight=0, reconstruction_weight=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 8, 8)
    v = augment_series(x, gain_std=0, offset_std=0, noise_std=0, erase_prob=1.0, erase_frac=0.5, generator=g)
    assert (v == 0).sum() == 2 * 3 * 2 * 4 * 4 and torch.equal(v[v != 0], x[v != 0])


def test_pretraining_bad_input(tiny_world_dir: Path) -> None:
    task = S4PretrainTask(widths=SMALL)
    opt, rad = torch.randn(2, 3, 3, 16, 16), torch.randn(2, 3, 3, 16, 16)
    with pytest.raises(ValueError, match="share B, T, H and W"):
        task.compute_losses({"image": {"optical": opt, "radar": rad[..., :12]}})  # mismatched H x W
    with pytest.raises(ValueError, match="share B, T, H and W"):
        task.compute_losses({"image": {"optical": opt, "radar": rad[:, :, :2]}})  # dates not aligned
    with pytest.raises(ValueError, match="T = 0"):
        task.compute_losses({"image": {"optical": opt[:, :, :0], "radar": rad[:, :, :0]}})
    with pytest.raises(ValueError, match="lacks modality \\['radar'\\]"):
        task.compute_losses({"image": {"optical": opt}})
    with pytest.raises(ValueError, match="expects batch\\['image'\\]"):
        task.compute_losses({"image": opt})
    with pytest.raises(ValueError, match="expects 3 channels, got 10"):
        task.compute_losses({"image": {"optical": torch.randn(2, 10, 3, 16, 16), "radar": rad}})
    with pytest.raises(ValueError, match="date_mask"):
        task.compute_losses({"image": {"optical": opt, "radar": rad}, "date_mask": torch.ones(2, 4, dtype=torch.bool)})


# ----------------------------------------------------------------------------- checkpoint -> backbone -> fine-tuning
@pytest.fixture(scope="module")
def pretrained_ckpt(tiny_world_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, S4PretrainTask]:
    pl.seed_everything(0)
    dm = S4PASTISDataModule(str(tiny_world_dir / "PASTIS-R"), num_dates=2, crop_size=16, batch_size=2)
    task = S4PretrainTask(widths=SMALL, num_pixels=32)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, accelerator="cpu")
    trainer.fit(task, datamodule=dm)
    assert np.isfinite(trainer.callback_metrics["val/loss"].item())
    path = tmp_path_factory.mktemp("s4") / "pretrain.ckpt"
    trainer.save_checkpoint(path)
    return path, task


def test_backbone_loads_the_pretrained_encoder_and_decoder(pretrained_ckpt: tuple[Path, S4PretrainTask]) -> None:
    path, task = pretrained_ckpt
    for modality, cin in (("optical", 3), ("radar", 3)):
        bb = BACKBONE_REGISTRY.build("s4_unet3d", modality=modality, widths=SMALL, ckpt_path=str(path))
        src = task.model
        assert torch.equal(bb.encoder.specific[modality][0][0].weight, src.encoder.specific[modality][0][0].weight)
        assert torch.equal(bb.encoder.shared[1][3].weight, src.encoder.shared[1][3].weight)
        assert torch.equal(bb.decoder.ups[0].weight, src.decoders[modality].ups[0].weight)
        assert bb.decoder.final is None  # the reconstruction conv is replaced by the segmentation head
        scratch = BACKBONE_REGISTRY.build("s4_unet3d", modality=modality, widths=SMALL)
        assert not torch.equal(scratch.encoder.shared[0][0].weight, src.encoder.shared[0][0].weight)
        out = bb.eval()(torch.randn(1, cin, 3, 20, 20), temporal_coords=torch.zeros(1, 3, 2))
        assert len(out) == 1 and out[0].shape == (1, SMALL[0], 20, 20)
    with pytest.raises(ValueError, match="widths"):
        S4UNet3DBackbone("optical", widths=[8, 16, 32, 64], ckpt_path=path)
    with pytest.raises(ValueError, match="different in_channels"):
        S4UNet3DBackbone("optical", widths=SMALL, band_indices=[2, 1], ckpt_path=path)
    with pytest.raises(FileNotFoundError, match="S4 checkpoint not found"):
        S4UNet3DBackbone("optical", widths=SMALL, ckpt_path=path.parent / "nope.ckpt")
    with pytest.raises(ValueError, match="pretrained=True needs ckpt_path"):
        BACKBONE_REGISTRY.build("s4_unet3d", pretrained=True)


def test_fine_tuning_task_holds_exactly_the_pretrained_tensors(pretrained_ckpt: tuple[Path, S4PretrainTask]) -> None:
    """Through terratorch's SemanticSegmentationTask (the fine-tuning path of the label-efficiency benchmark),
    every backbone tensor (weights and BatchNorm running statistics) equals the checkpoint's encoder f_in /
    decoder h tensor; the projection head g and the reconstruction conv are not carried over."""
    from terratorch.tasks import SemanticSegmentationTask

    path, _ = pretrained_ckpt
    ckpt = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    for modality, cin in (("optical", 3), ("radar", 3)):
        task = SemanticSegmentationTask(
            model_factory="EncoderDecoderFactory",
            model_args={"backbone": "s4_unet3d", "backbone_modality": modality, "backbone_in_channels": cin,
                        "backbone_widths": SMALL, "backbone_ckpt_path": str(path), "decoder": "IdentityDecoder",
                        "num_classes": 19}, loss="ce", ignore_index=-1)
        backbone = {k.removeprefix("encoder."): v for k, v in task.model.state_dict().items()
                    if k.startswith("encoder.")}
        assert any("running_mean" in k for k in backbone)
        for key, value in backbone.items():
            src = (f"model.decoders.{modality}." + key.removeprefix("decoder.") if key.startswith("decoder.")
                   else "model." + key)
            assert torch.equal(value, ckpt[src]), key
        assert not any(k.startswith("decoder.final") or "projection" in k for k in backbone)
        other = "radar" if modality == "optical" else "optical"
        assert not any(f"specific.{other}" in k for k in backbone)


def test_terratorch_decoders_work_on_the_backbone() -> None:
    from terratorch.models import EncoderDecoderFactory

    factory = EncoderDecoderFactory()
    for extra in ({"decoder": "IdentityDecoder"},
                  {"backbone_output": "pyramid", "decoder": "UNetDecoder", "decoder_channels": [32, 16, 8, 8]}):
        model = factory.build_model("segmentation", backbone="s4_unet3d", backbone_modality="radar",
                                    backbone_widths=SMALL, num_classes=5, **extra).eval()
        out = model(torch.randn(2, 3, 4, 24, 24), dates=torch.zeros(2, 4)).output
        assert out.shape == (2, 5, 24, 24)
    bb = BACKBONE_REGISTRY.build("s4_unet3d", widths=SMALL, output="pyramid").eval()
    assert bb.out_channels == SMALL
    assert [tuple(f.shape[-2:]) for f in bb(torch.randn(1, 3, 1, 20, 20))] == [(20, 20), (10, 10), (5, 5), (3, 3)]
    assert TERRATORCH_BACKBONE_REGISTRY["s4_unet3d"] is s4_unet3d  # the factory itself, as timm registers
    assert type(s4_unet3d(widths=SMALL, output="pyramid")) is type(bb) is S4UNet3DBackbone
    rgb = BACKBONE_REGISTRY.build("s4_unet3d", widths=SMALL, band_indices=[2, 1, 0]).eval()
    assert rgb.in_channels == 3 and rgb(torch.randn(1, 10, 2, 8, 8))[0].shape == (1, SMALL[0], 8, 8)
    with pytest.raises(ValueError, match="single modality"):
        bb({"S2": torch.randn(1, 3, 1, 8, 8)})
    with pytest.raises(ValueError, match="T = 0"):
        bb(torch.randn(1, 3, 0, 8, 8))


def test_fine_tuning_from_the_checkpoint_and_cloud_robustness(pretrained_ckpt: tuple[Path, S4PretrainTask],
                                                              tiny_world_dir: Path, tmp_path: Path) -> None:
    from terratorch.tasks import SemanticSegmentationTask

    path, _ = pretrained_ckpt
    pl.seed_everything(0)
    task = SemanticSegmentationTask(
        model_factory="EncoderDecoderFactory",
        model_args={"backbone": "s4_unet3d", "backbone_modality": "optical", "backbone_widths": SMALL,
                    "backbone_ckpt_path": str(path), "decoder": "IdentityDecoder", "num_classes": 19},
        loss="ce", ignore_index=-1, lr=1e-2, optimizer="AdamW")
    # S4 fine-tuning data: every aligned date, padded batches whose date_mask reaches the backbone through terratorch
    dm = S4PASTISDataModule(str(tiny_world_dir / "PASTIS-R"), inference_modality="optical", batch_size=2)
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu")
    trainer.fit(task, datamodule=dm)
    ft = tmp_path / "ft.ckpt"
    trainer.save_checkpoint(ft)
    path.rename(path.with_suffix(".moved"))  # the fine-tuned checkpoint must not need the pretraining file
    try:
        model = load_segmentation_checkpoint(ft)
    finally:
        path.with_suffix(".moved").rename(path)
    scratch = SemanticSegmentationTask(
        model_factory="EncoderDecoderFactory",
        model_args={"backbone": "s4_unet3d", "backbone_modality": "optical", "backbone_widths": SMALL,
                    "decoder": "IdentityDecoder", "num_classes": 19}, loss="ce", ignore_index=-1).eval()
    test = S4PASTIS(tiny_world_dir / "PASTIS-R", folds=(1, 2, 3, 4, 5))
    table = cloud_robustness({"s4": (model, "optical"), "scratch": (scratch, "optical")}, test,
                             bins=(0, 0.05, 0.25, 1))
    assert list(table["bin"]) == ["[0.00, 0.05)", "[0.05, 0.25)", "[0.25, 1.00]", "all"]
    assert table["n_series"].iloc[:-1].sum() == table["n_series"].iloc[-1] == len(test)
    ratios = sorted(series_cloud_ratio(test[i]["cloud_cover"]) for i in range(len(test)))
    assert table["cloud_ratio_mean"].iloc[-1] == pytest.approx(np.mean(ratios))
    row = table.iloc[-1]
    assert row["gain_s4_vs_scratch"] == pytest.approx(row["mIoU_s4"] - row["mIoU_scratch"])
    assert 0 <= row["mIoU_s4"] <= 100


def test_miou_and_cloud_ratio_helpers() -> None:
    cm = confusion_matrix(np.array([0, 1, 1, 2, -5]), np.array([0, 1, 2, 2, -1]), 4)
    assert cm.sum() == 4 and cm[2, 1] == 1 and cm[2, 2] == 1
    # IoU: class0 1/1, class1 1/2, class2 1/2, class3 absent (excluded)
    assert mean_iou(cm) == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert series_cloud_ratio(torch.tensor([0.0, 0.5, 0.25, 0.25])) == pytest.approx(0.25)
    with pytest.raises(EODataError, match="cloudcover-S2"):
        series_cloud_ratio(None)
    with pytest.raises(EODataError, match="fractions in \\[0, 1\\]"):
        series_cloud_ratio([0.2, float("nan")])
    with pytest.raises(ValueError, match="labels must be in 0..3"):
        confusion_matrix(np.array([4]), np.array([0]), 4)


# ----------------------------------------------------------------------------- label-efficiency benchmark protocol
def _benchmark_module():  # benchmarks/ is not a package: load the script by path
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "s4_label_efficiency.py"
    spec = importlib.util.spec_from_file_location("s4_label_efficiency", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_benchmark_arms_differ_only_in_the_backbone_init(tiny_world_dir: Path, tmp_path: Path) -> None:
    """Fairness of the pretrained-vs-scratch comparison: same seeded crops, same head init, same recipe; the
    pretrained arm's backbone starts from the S4 checkpoint written by the benchmark's own pretraining."""
    import argparse

    bench = _benchmark_module()
    sample = {"image": torch.arange(2 * 3 * 8 * 8.0).view(2, 3, 8, 8), "mask": torch.arange(64).view(8, 8)}
    a = bench.random_crop(sample, 4, torch.Generator().manual_seed(3))
    b = bench.random_crop(sample, 4, torch.Generator().manual_seed(3))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    y, x = divmod(int(a["mask"][0, 0]), 8)
    assert torch.equal(a["image"], sample["image"][..., y:y + 4, x:x + 4])

    args = argparse.Namespace(root=str(tiny_world_dir / "PASTIS-R"), widths=SMALL, num_dates=2, label_fraction=1.0,
                              pretrain_folds=[1, 2, 3, 4, 5], pretrain_crop_size=16, pretrain_batch_size=2,
                              pretrain_steps=2, pretrain_lr=1e-3, num_pixels=None, temperature=0.5, lambda_r=1.0,
                              optical_bands=[2, 1, 0], pool_time=True, cloud_source="auto",
                              finetune_steps=0, finetune_batch_size=2, finetune_crop_size=16, finetune_lr=1e-3,
                              finetune_warmup=2)
    ckpt, losses = bench.pretrain(args, tmp_path)
    assert losses[-1]["step"] == 2 and np.isfinite(losses[-1]["loss"])
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    pre = bench.finetune(args, "radar", 1, str(ckpt))
    scratch = bench.finetune(args, "radar", 1, None)
    assert torch.equal(pre.encoder.encoder.shared[0][0].weight, state["model.encoder.shared.0.0.weight"])
    assert not torch.equal(scratch.encoder.encoder.shared[0][0].weight, state["model.encoder.shared.0.0.weight"])
    for p, s in zip(pre.head.parameters(), scratch.head.parameters()):
        assert torch.equal(p, s)  # same seed -> same segmentation-head init in both arms
    args.finetune_steps = 2
    model = bench.finetune(args, "radar", 1, str(ckpt))
    assert not model.training
    assert not torch.equal(model.encoder.encoder.shared[0][0].weight, state["model.encoder.shared.0.0.weight"])


# ----------------------------------------------------------------------------- space-time pooling, padded series
def test_space_time_pooling_handles_any_series_length() -> None:
    torch.manual_seed(0)
    net = UNet3D(2, 4, widths=[4, 4, 8, 8]).eval()  # pools T by default: factor 8 at the bottleneck
    assert net.encoder.pool_time and net.encoder.temporal_factor == 8
    for t in (1, 2, 3, 5, 7, 8, 9, 17, 38, 61):
        assert net(torch.randn(1, 2, t, 12, 10)).shape == (1, 4, t, 12, 10)
    enc = S4Model(widths=[4, 4, 8, 8]).encoder
    feats = enc(torch.randn(1, 3, 24, 16, 16), "optical")
    assert [f.shape[2] for f in feats] == [24, 12, 6, 3]  # T halved at every level
    assert [f.shape[2] for f in S4Model(widths=[4, 4, 8, 8], pool_time=False).encoder(
        torch.randn(1, 3, 5, 16, 16), "optical")] == [5, 5, 5, 5]  # the earlier space-only option
    # pooled validity: a cell counts when it covers a real date
    m = torch.tensor([[True] * 17 + [False] * 7, [True] * 24])
    assert pooled_date_mask(m, 8).tolist() == [[True, True, True], [True, True, True]]
    assert pooled_date_mask(m[:, :20], 4, 6).tolist() == [[True] * 5 + [False], [True] * 5 + [False]]
    assert pooled_date_mask(torch.tensor([[True] * 9 + [False] * 7]), 8).tolist() == [[True, True]]
    assert pooled_date_mask(torch.tensor([[True] * 8 + [False] * 8]), 8).tolist() == [[True, False]]


def test_padded_series_with_date_mask_give_the_unpadded_outputs() -> None:
    """Eval mode: a series padded with its last date inside a batch (collate_s4) gives the same segmentation
    features and the same S4 losses as the series alone, as long as both pad to the same multiple of 8 dates."""
    torch.manual_seed(0)
    a = {"image": torch.randn(3, 10, 16, 16, dtype=torch.float64), "mask": torch.zeros(16, 16, dtype=torch.long)}
    b = {"image": torch.randn(3, 14, 16, 16, dtype=torch.float64), "mask": torch.zeros(16, 16, dtype=torch.long)}
    batch = collate_s4([a, b])
    for output in ("decoder", "pyramid"):
        bb = S4UNet3DBackbone("radar", widths=SMALL, output=output).double().eval()  # float64: no bf16 convolutions
        with torch.no_grad():
            both = bb(batch["image"], date_mask=batch["date_mask"])
            alone = bb(a["image"][None])
        for f, g in zip(both, alone):
            assert torch.allclose(f[:1], g, rtol=1e-9, atol=1e-12)
        with torch.no_grad():  # without the mask the padded dates would enter the mean
            assert not torch.allclose(bb(batch["image"])[0][:1], alone[0], rtol=1e-6)
    task = S4PretrainTask(widths=SMALL).double().eval()
    pair = collate_s4([{"image": {m: torch.randn(3, t, 16, 16, dtype=torch.float64) for m in ("optical", "radar")}}
                       for t in (10, 14)])
    with torch.no_grad():
        together = task.compute_losses(pair)
        single = [task.compute_losses({"image": {k: v[i:i + 1, :, :t] for k, v in pair["image"].items()}})
                  for i, t in enumerate((10, 14))]
    for key in ("loss_c", "loss_r", "loss"):
        assert together[key].item() == pytest.approx((single[0][key].item() + single[1][key].item()) / 2, rel=1e-9)
