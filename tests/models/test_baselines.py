"""U-Net baselines: parameter budgets of the LIANet supplement, shapes, errors, and learning PASTIS."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from terratorch.registry import BACKBONE_REGISTRY
from torchmetrics.classification import MulticlassJaccardIndex

import terratorch_eoplugins  # noqa: F401
from terratorch_eoplugins.datamodules.pastis import PASTISDataModule


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_parameter_budgets_match_the_supplement() -> None:
    """U-Net 17.3M and Micro U-Net 0.49M (here 0.51M) at 12 Sentinel-2 bands."""
    assert round(_n_params(BACKBONE_REGISTRY.build("unet_classic", in_channels=12)) / 1e6, 1) == 17.3
    assert 0.45e6 < _n_params(BACKBONE_REGISTRY.build("micro_unet", in_channels=12)) < 0.53e6


def test_forward_keeps_resolution_for_odd_sizes_and_folds_time() -> None:
    m = BACKBONE_REGISTRY.build("micro_unet", in_channels=10 * 3, time_to_channels=True).eval()
    out = m(torch.randn(2, 10, 3, 50, 37))
    assert m.out_channels == [22] and out[0].shape == (2, 22, 50, 37)
    # time folding is channel-major: C x T -> (C*T), the same as reshaping by hand
    x = torch.randn(1, 10, 3, 16, 16)
    assert torch.allclose(m(x)[0], m(x.reshape(1, 30, 16, 16))[0])


def test_bad_inputs_raise_clear_errors() -> None:
    m = BACKBONE_REGISTRY.build("micro_unet", in_channels=10)
    with pytest.raises(ValueError, match="expects 10 input channels, got 12"):
        m(torch.randn(1, 12, 32, 32))
    with pytest.raises(ValueError, match="time_to_channels"):
        m(torch.randn(1, 10, 2, 32, 32))
    with pytest.raises(ValueError, match="no pretrained weights"):
        BACKBONE_REGISTRY.build("unet_classic", pretrained=True)


@pytest.mark.slow
def test_micro_unet_learns_pastis_phenology_beyond_majority(tiny_world_dir: Path, tmp_path: Path) -> None:
    """A short training on the tiny world beats the majority class on the validation fold."""
    from terratorch.tasks import SemanticSegmentationTask

    pl.seed_everything(0)
    dm = PASTISDataModule(root=str(tiny_world_dir / "PASTIS-R"), batch_size=2, num_dates=6)
    task = SemanticSegmentationTask(
        model_factory="EncoderDecoderFactory",
        model_args={"backbone": "micro_unet", "backbone_in_channels": 10, "backbone_use_temporal": True,
                    "backbone_temporal_pooling": "concat", "backbone_temporal_n_timestamps": 6,
                    "decoder": "IdentityDecoder", "num_classes": dm.num_classes},
        loss="ce", ignore_index=dm.ignore_index, lr=3e-3, optimizer="AdamW", plot_on_val=False,
    )
    trainer = pl.Trainer(max_epochs=25, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    trainer.fit(task, datamodule=dm)

    dm.setup("fit")
    counts = torch.zeros(dm.num_classes)
    for i in range(len(dm.train_dataset)):
        m = dm.train_dataset[i]["mask"]
        counts += torch.bincount(m[m >= 0], minlength=dm.num_classes).float()
    majority = int(counts.argmax())
    task.eval()
    model_iou = MulticlassJaccardIndex(dm.num_classes, ignore_index=dm.ignore_index, average="macro")
    base_iou = MulticlassJaccardIndex(dm.num_classes, ignore_index=dm.ignore_index, average="macro")
    correct = total = 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            pred = task(batch["image"]).output.argmax(1)
            model_iou.update(pred, batch["mask"])
            base_iou.update(torch.full_like(batch["mask"], majority), batch["mask"])
            valid = batch["mask"] >= 0
            correct += (pred[valid] == batch["mask"][valid]).sum().item()
            total += valid.sum().item()
    miou, base = float(model_iou.compute()), float(base_iou.compute())
    print(f"\nPASTIS tiny val mIoU {miou:.3f} vs majority {base:.3f}; pixel accuracy {correct / total:.3f}")
    assert miou > base + 0.1, (miou, base)
    assert correct / total > 0.5
