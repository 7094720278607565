"""Trivial baselines of a dense task, run through the same CLI, data pieces and metrics as the models they bound.

:class:`TrivialBaselineTask` has no parameters and ignores the image: before its first step of any stage it reads
the training split's targets once (:class:`~terratorch_eoplugins.tasks.preparation.TrainSplitPreparation`) and keeps
their statistic in a buffer (so checkpoints hold it): the majority class of a segmentation task, the mean of a
regression target, over the pixels that are not ``ignore_index``. ``validate`` / ``test`` predict that constant for
every pixel and log what terratorch's ``SemanticSegmentationTask`` / ``PixelwiseRegressionTask`` log, under the
same names (``test/mIoU``, ``test/Accuracy``, ``test/F1_Score``, ... / ``test/RMSE``, ``test/MAE``, ...), so a sweep
row of this task sits beside the models' rows on the same test pixels. "Learns above the trivial baseline" is then
a comparison of two leaderboard rows::

    terratorch fit -c configs/trainer/lianet_finetune_cpu.yaml --data configs/data/lianetregion_dynamicworld.yaml \\
        --model configs/models/dynamicworld/trivial.yaml --trainer.max_epochs=1
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torchgeo.trainers import BaseTask
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex

from terratorch_eoplugins.tasks.preparation import TrainSplitPreparation

__all__ = ["TrivialBaselineTask"]

#: regression losses of terratorch's PixelwiseRegressionTask that val/loss reports for the constant prediction
_REGRESSION_LOSSES = ("mae", "mse", "rmse", "huber")


class TrivialBaselineTask(TrainSplitPreparation, BaseTask):
    """Majority-class (segmentation) or training-mean (regression) predictor of a dense task.

    Args:
        kind: ``"segmentation"`` (predicts the most frequent training class; ties: the lowest index) or
            ``"regression"`` (predicts the mean training target).
        num_classes: classes of a segmentation task.
        ignore_index: target value excluded from the statistic and the metrics (terratorch's ``ignore_index``).
        loss: what ``val/loss`` reports for the constant prediction (so the model-checkpoint callbacks of the
            shipped trainer pieces work unchanged): ``ce`` for segmentation (the cross-entropy of the training class
            frequencies as logits), ``mae`` / ``mse`` / ``rmse`` / ``huber`` for regression, as terratorch names them.
        target_key: batch key of the target (terratorch's ``mask``).
    """

    def __init__(self, kind: str = "segmentation", num_classes: int | None = None, ignore_index: float | None = None,
                 loss: str | None = None, target_key: str = "mask") -> None:
        if kind not in ("segmentation", "regression"):
            raise ValueError(f"kind must be 'segmentation' or 'regression', got {kind!r}")
        if kind == "segmentation" and (num_classes is None or int(num_classes) < 2):
            raise ValueError(f"num_classes must be an integer >= 2 for a segmentation task, got {num_classes!r}")
        loss = loss if loss is not None else ("ce" if kind == "segmentation" else "mse")
        allowed = ("ce",) if kind == "segmentation" else _REGRESSION_LOSSES
        if loss not in allowed:
            raise ValueError(f"loss must be one of {allowed} for a {kind} task, got {loss!r}")
        super().__init__()  # saves the hyper-parameters, calls configure_models / configure_metrics
        self.automatic_optimization = False
        self.kind, self.loss_name, self.target_key, self.ignore_index = kind, loss, target_key, ignore_index
        self.monitor, self.mode = ("val/mIoU", "max") if kind == "segmentation" else ("val/loss", "min")

    def configure_models(self) -> None:
        """No model: the statistic buffer (segmentation: pixels per class; regression: count and sum of the valid
        targets; float64 so that a large region's statistic does not depend on the summation order)."""
        size = int(self.hparams["num_classes"]) if self.hparams["kind"] == "segmentation" else 2
        self.register_buffer("counts", torch.zeros(size, dtype=torch.float64))

    def configure_metrics(self) -> None:
        """terratorch's metric names: mIoU, mIoU_Micro, F1_Score, Accuracy, Pixel_Accuracy / RMSE, MSE, MAE."""
        if self.hparams["kind"] == "segmentation":
            n, ii = int(self.hparams["num_classes"]), self.hparams["ignore_index"]
            ii = None if ii is None else int(ii)
            metrics = MetricCollection({
                "mIoU": MulticlassJaccardIndex(num_classes=n, ignore_index=ii, average="macro"),
                "mIoU_Micro": MulticlassJaccardIndex(num_classes=n, ignore_index=ii, average="micro"),
                "F1_Score": MulticlassF1Score(num_classes=n, ignore_index=ii, average="macro"),
                "Accuracy": MulticlassAccuracy(num_classes=n, ignore_index=ii, average="macro"),
                "Pixel_Accuracy": MulticlassAccuracy(num_classes=n, ignore_index=ii, average="micro"),
            })
        else:
            metrics = MetricCollection({"RMSE": MeanSquaredError(squared=False), "MSE": MeanSquaredError(),
                                        "MAE": MeanAbsoluteError()})
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def configure_optimizers(self) -> None:
        """No parameters, no optimizer."""
        return None

    # ---- the statistic ----
    def _valid(self, y: torch.Tensor) -> torch.Tensor:
        valid = torch.isfinite(y) if y.is_floating_point() else torch.ones_like(y, dtype=torch.bool)
        if self.ignore_index is not None:
            valid &= y != self.ignore_index
        return valid

    def _target(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if not isinstance(batch, Mapping) or self.target_key not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise KeyError(f"TrivialBaselineTask: the batch has no target {self.target_key!r} (got {keys})")
        y = batch[self.target_key]
        if self.kind == "regression" and y.ndim == 4 and y.shape[1] == 1:
            y = y[:, 0]
        return y

    @property
    def fitted(self) -> bool:
        """Whether the statistic holds at least one valid training target."""
        return bool(self.counts.sum() > 0) if self.kind == "segmentation" else bool(self.counts[0] > 0)

    def needs_preparation(self) -> bool:
        return not self.fitted

    def prepare_from_train_split(self, batches: Iterable[Mapping[str, Any]]) -> None:
        """Count the training split's valid targets into ``counts``."""
        counts = torch.zeros_like(self.counts, device="cpu")
        for batch in batches:
            y = self._target(batch)
            v = y[self._valid(y)].cpu()
            if self.kind == "segmentation":
                counts += torch.bincount(v.long().flatten(), minlength=counts.numel()).double()
            else:
                v = v.double()
                counts += torch.stack([torch.tensor(float(v.numel()), dtype=torch.float64), v.sum()])
        self.counts.copy_(counts)
        if not self.fitted:
            raise RuntimeError(f"TrivialBaselineTask: the training split has no valid {self.target_key!r} values "
                               f"(all equal ignore_index={self.ignore_index} or non-finite)")

    @property
    def constant(self) -> float:
        """The predicted value: the majority class index or the mean target."""
        if not self.fitted:
            raise RuntimeError("TrivialBaselineTask: no training targets counted yet")
        if self.kind == "segmentation":
            return float(int(torch.argmax(self.counts)))  # argmax returns the first of tied maxima
        return float(self.counts[1] / self.counts[0])

    def _loss(self, y: torch.Tensor) -> torch.Tensor:
        valid = self._valid(y)
        if self.kind == "segmentation":
            freq = (self.counts / self.counts.sum()).clamp_min(1e-12)
            return -torch.log(freq)[y[valid].long()].mean().float()
        err = y[valid].double() - self.constant
        if self.loss_name == "mae":
            return err.abs().mean().float()
        if self.loss_name == "mse":
            return (err ** 2).mean().float()
        if self.loss_name == "rmse":
            return (err ** 2).mean().sqrt().float()
        a = err.abs()  # Huber with delta 1 (torch.nn.HuberLoss's default, terratorch's "huber")
        return torch.where(a < 1.0, 0.5 * a ** 2, a - 0.5).mean().float()

    def forward(self, image: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The constant prediction for a batch ``image`` (B, C, H, W): the training class frequencies' log as
        logits ``[B, num_classes, H, W]``, or the mean ``[B, 1, H, W]``."""
        b, h, w = image.shape[0], image.shape[-2], image.shape[-1]
        if self.kind == "segmentation":
            logits = torch.log((self.counts / self.counts.sum()).clamp_min(1e-12)).float().to(image.device)
            return logits[None, :, None, None].expand(b, -1, h, w)
        return torch.full((b, 1, h, w), self.constant, dtype=torch.float32, device=image.device)

    # ---- steps ----
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Nothing to learn: the statistic was counted before the first step."""
        return None

    def _eval_step(self, batch: Mapping[str, Any], metrics: MetricCollection, stage: str) -> None:
        y = self._target(batch)
        valid = self._valid(y)
        if self.kind == "segmentation":
            metrics.update(torch.full_like(y, int(self.constant), dtype=torch.long), y.long())
        else:
            metrics.update(torch.full((int(valid.sum()),), self.constant, device=y.device), y[valid].float())
        if valid.any():
            self.log(f"{stage}/loss", self._loss(y), batch_size=y.shape[0], on_epoch=True, on_step=False,
                     sync_dist=True)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), sync_dist=True)
        self.val_metrics.reset()

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute(), sync_dist=True)
        self.test_metrics.reset()
