"""Weighted F1 (DUNIA's classification metric, section 4.1.2) for terratorch's segmentation fine-tuning.

terratorch's ``SemanticSegmentationTask`` logs macro F1, mIoU and accuracies; the DUNIA paper reports the
*weighted* F1 (per-class F1 weighted by the class's support in the target) for its classification products.
:class:`WeightedF1` adds ``val/wF1`` and ``test/wF1`` (torchmetrics ``MulticlassF1Score(average="weighted")``, the
task's ``ignore_index`` left out) to any run of such a task:

    terratorch fit -c configs/dunia_pastis.yaml \\
        --trainer.callbacks+=terratorch_eoplugins.tasks.dunia_metrics.WeightedF1

It predicts each validation/test batch once more (``handle_full_or_tiled_inference`` with the batch's other keys,
as the task's own step does, in ``no_grad``) and takes the arg-max class. The zero-shot KNN task
(:mod:`terratorch_eoplugins.tasks.dunia_knn`) logs ``wF1`` itself.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torchmetrics.classification import MulticlassF1Score

__all__ = ["WeightedF1"]


class WeightedF1(Callback):
    """Logs ``{stage}/wF1`` of a terratorch segmentation task (see the module docstring).

    Args:
        num_classes: classes; ``None``: the task's ``model_args.num_classes``.
        ignore_index: label left out; ``None``: the task's ``ignore_index``.
    """

    def __init__(self, num_classes: int | None = None, ignore_index: int | None = None) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self._metric: MulticlassF1Score | None = None

    def _make(self, pl_module: LightningModule) -> None:
        hp = getattr(pl_module, "hparams", {})
        c = self.num_classes or (hp.get("model_args") or {}).get("num_classes")
        if c is None or int(c) < 2:
            raise ValueError("WeightedF1: set num_classes (the task's model_args has no num_classes >= 2)")
        ign = self.ignore_index if self.ignore_index is not None else hp.get("ignore_index")
        self._metric = MulticlassF1Score(int(c), average="weighted", ignore_index=ign,
                                         validate_args=False).to(pl_module.device)

    def _update(self, pl_module: LightningModule, batch: Any) -> None:
        if not isinstance(batch, dict) or "image" not in batch or "mask" not in batch:
            raise ValueError("WeightedF1 expects batches with 'image' and 'mask'")
        rest = {k: v for k, v in batch.items() if k not in ("image", "mask", "filename")}
        with torch.no_grad():
            if hasattr(pl_module, "handle_full_or_tiled_inference"):
                out = pl_module.handle_full_or_tiled_inference(batch["image"], None, **rest)
            else:
                out = pl_module(batch["image"], **rest)
        logits = getattr(out, "output", out)
        y = batch["mask"]
        y = y.squeeze(1) if y.ndim == 4 and y.shape[1] == 1 else y
        self._metric.update(logits.argmax(1), y.long())

    def _log(self, pl_module: LightningModule, stage: str) -> None:
        if self._metric is not None and self._metric.update_count:
            pl_module.log(f"{stage}/wF1", self._metric.compute(), sync_dist=False)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._make(pl_module)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._make(pl_module)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(pl_module, batch)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update(pl_module, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(pl_module, "test")
