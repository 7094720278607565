"""LIANet pretraining: regress Sentinel-2 patches from (patch origin, time) alone.

L1 loss on ``clip((DN - 1000) / 10000, 0, 1)``, AdamW (lr 5e-4, no weight decay) with linear warmup and
cosine decay (stepped per epoch by default, 5 warmup epochs, as in the reference; the defaults of the
``optimizer`` / ``scheduler`` arguments, :mod:`~terratorch_eoplugins.tasks.optimization`), gradient clipping
through the trainer (``gradient_clip_val: 1.0``) and mixed precision through ``trainer.precision``
where a GPU is available. Validation logs MAE, PSNR and SSIM (data range 1), ``PSNR_eq3`` (the supplement's eq. 3,
:func:`~terratorch_eoplugins.metrics.peak_psnr`: peak = max of the generated patch, mean over patches) and saves
reconstruction plots. The generator's region (grid shape, acquisitions, CRS) is what the datamodule publishes as
``"region"`` (:class:`~terratorch_eoplugins.datamodules.lianet.LIANetPretrainDataModule`), read at ``setup``
through :func:`~terratorch_eoplugins.tasks.preparation.train_split_info`; it is stored
with the weights under the checkpoint key ``"lianet"``, so fine-tuning rebuilds the same generator
with ``torch.load(..., weights_only=True)``. At the end of ``fit`` the generator is also exported to
``<log_dir>/lianet_generator.pt``. An authors' checkpoint converted by ``eoplugins lianet-convert`` is a weights-only
checkpoint of this task (``hyper_parameters``, ``state_dict`` with ``generator.`` keys and the ``"lianet"`` config):
``LIANetPretrainTask.load_from_checkpoint`` rebuilds the generator from it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib
from torch import Tensor
from torch.nn import functional as F
from torchgeo.trainers import BaseTask
from torchmetrics import MeanAbsoluteError
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from terratorch_eoplugins.metrics import peak_psnr
from terratorch_eoplugins.models.lianet import (
    CKPT_KEY,
    LIANetGenerator,
    generator_config,
    save_generator,
    with_legacy_defaults,
)
from terratorch_eoplugins.tasks.optimization import OptimizerDefaults
from terratorch_eoplugins.tasks.preparation import train_split_info

__all__ = ["OPTIMIZATION", "LIANetPretrainTask"]

#: the reference's optimiser and schedule: AdamW without weight decay, 5 warmup epochs + cosine, per epoch
OPTIMIZATION = OptimizerDefaults("AdamW", {"weight_decay": 0.0}, "WarmupCosine",
                                 {"warmup": 5, "min_lr_ratio": 0.0, "interval": "epoch"})


class LIANetPretrainTask(BaseTask):
    """torchgeo/Lightning task pretraining a :class:`~terratorch_eoplugins.models.lianet.LIANetGenerator`.

    Args:
        variant: ``"base"``, ``"large"`` or ``"modified"``.
        generator_args: overrides of the variant's hyper-parameters (see :class:`LIANetGenerator`); region
            entries (``region_size``, ``region_shape``, ``acquisitions``, ``region_crs``, ``region_transform``)
            are filled from the datamodule when absent.
        lr: base learning rate.
        optimizer, optimizer_hparams, scheduler, scheduler_hparams: as in terratorch's tasks
            (:mod:`~terratorch_eoplugins.tasks.optimization`); defaults: ``AdamW`` with ``{weight_decay: 0}``,
            ``WarmupCosine`` with ``{warmup: 5, min_lr_ratio: 0, interval: epoch}`` (given hparams of the default
            class are merged over these).
        plot_every_n_epochs: reconstruction plots of the first validation batch (0 = never).
        export_generator: write ``lianet_generator.pt`` into the log directory at the end of ``fit``.
        table_lr: base learning rate of the hash tables (``None``: ``lr``, as the reference). Adam moves a
            table row by at most about ``lr`` per update and a fine-level row is only updated when a sampled
            patch touches it, so short CPU runs use a larger table rate (Instant-NGP trains its hash tables at
            1e-2); warmup and cosine decay apply to both groups.
    """

    def __init__(self, variant: str = "modified", generator_args: Mapping[str, Any] | None = None, lr: float = 5e-4,
                 optimizer: str = OPTIMIZATION.optimizer, optimizer_hparams: dict[str, Any] | None = None,
                 scheduler: str | None = OPTIMIZATION.scheduler, scheduler_hparams: dict[str, Any] | None = None,
                 plot_every_n_epochs: int = 1, export_generator: bool = True,
                 table_lr: float | None = None) -> None:
        if table_lr is not None and not table_lr > 0:
            raise ValueError(f"table_lr must be a positive learning rate or None, got {table_lr!r}")
        OPTIMIZATION.check(optimizer, optimizer_hparams, scheduler, scheduler_hparams)
        generator_config(variant, **dict(generator_args or {}))  # validate early
        self.variant = variant
        self.generator_args = dict(generator_args or {})
        self._plot_batch: dict[str, Any] | None = None
        super().__init__()  # torchgeo BaseTask: saves hyper-parameters, configure_models/metrics
        self.generator: LIANetGenerator | None = None

    monitor = "val/loss"

    def configure_models(self) -> None:
        """The generator is built in :meth:`setup`, once the datamodule's region is known."""

    def configure_metrics(self) -> None:
        self.val_mae = MeanAbsoluteError()
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.test_mae = MeanAbsoluteError()
        self.test_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.test_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    # ------------------------------------------------------------------------------- building
    def _region_args(self) -> dict[str, Any]:
        """Generator region arguments from the region the datamodule publishes (none without a datamodule)."""
        region = train_split_info(self._trainer, "region")
        if region is None:
            return {}
        return {"region_size": float(region["size"]), "region_shape": list(region["shape"]),
                "acquisitions": region["acquisitions"], "region_crs": region["crs"],
                "region_transform": list(region["transform"])}

    def build_generator(self, extra: Mapping[str, Any] | None = None) -> LIANetGenerator:
        args = {**(extra or {}), **self.generator_args}
        return LIANetGenerator(self.variant, **args)

    def setup(self, stage: str) -> None:
        if self.generator is None:
            self.generator = self.build_generator(self._region_args())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        assert self.generator is not None
        checkpoint[CKPT_KEY] = {"config": copy.deepcopy(self.generator.config)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cfg = dict(checkpoint.get(CKPT_KEY, {}).get("config", {}))
        if cfg:
            cfg = with_legacy_defaults(cfg)  # options added later: the behaviour the checkpoint was trained with
            variant = cfg.pop("variant", self.variant)
            if variant != self.variant:
                raise ValueError(f"checkpoint holds a LIANet-{variant} generator, this task trains "
                                 f"LIANet-{self.variant}")
            self.generator = LIANetGenerator(variant, **cfg)

    # -------------------------------------------------------------------------------- steps
    def forward(self, origin_px: Tensor, time_days: Tensor | None = None, time_index: Tensor | None = None,
                size: int | tuple[int, int] = 128) -> Tensor:
        assert self.generator is not None, "call setup() (or fit) first"
        return self.generator(origin_px, self.generator.resolve_time(time_days, time_index), size)

    def _predict(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        target = batch["image"]
        pred = self(batch["origin_px"], batch.get("time_days"), batch.get("time_index"), tuple(target.shape[-2:]))
        return pred, target

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        pred, target = self._predict(batch)
        loss = F.l1_loss(pred.float(), target)
        self.log("train/loss", loss, prog_bar=True, batch_size=target.shape[0])
        return loss

    def _eval_step(self, batch: Mapping[str, Any], prefix: str) -> Tensor:
        pred, target = self._predict(batch)
        pred = pred.float()
        loss = F.l1_loss(pred, target)
        mae, psnr, ssim = (getattr(self, f"{prefix}_{m}") for m in ("mae", "psnr", "ssim"))
        clipped = pred.clamp(0, 1)
        mae.update(pred, target)
        psnr.update(clipped, target)
        ssim.update(clipped, target)
        n = target.shape[0]
        self.log(f"{prefix}/loss", loss, batch_size=n)
        self.log(f"{prefix}/MAE", mae, batch_size=n)
        self.log(f"{prefix}/PSNR", psnr, prog_bar=True, batch_size=n)
        self.log(f"{prefix}/SSIM", ssim, batch_size=n)
        # supplement eq. 3 (peak = max of the generated patch, not the data range), mean over the patches
        self.log(f"{prefix}/PSNR_eq3", peak_psnr(pred, target, per_sample=True).mean(), batch_size=n)
        return pred

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        pred = self._eval_step(batch, "val")
        if batch_idx == 0:
            self._plot_batch = {"image": batch["image"][:4].detach().cpu(), "prediction": pred[:4].detach().cpu(),
                                "date": list(batch.get("date", [""] * 4))[:4],
                                "origin_px": batch["origin_px"][:4].detach().cpu()}

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        every = self.hparams.plot_every_n_epochs
        if not every or self._plot_batch is None or self.trainer.sanity_checking or self.current_epoch % every:
            return
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        b = self._plot_batch
        plot = train_split_info(self._trainer, "plot_sample")
        if plot is None:
            return
        sample = {"image": b["image"][0], "prediction": b["prediction"][0], "date": b["date"][0],
                  "origin_px": b["origin_px"][0], "tile": ""}
        fig = plot(sample, suptitle=f"epoch {self.current_epoch}: {b['date'][0]}")
        logger = self.logger
        if logger is not None and hasattr(getattr(logger, "experiment", None), "add_figure"):
            logger.experiment.add_figure("val/reconstruction", fig, global_step=self.global_step)
        else:
            out = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "reconstructions"
            out.mkdir(parents=True, exist_ok=True)
            fig.savefig(out / f"epoch_{self.current_epoch:04d}.png", dpi=80)
        plt.close(fig)

    def on_fit_end(self) -> None:
        if self.hparams.export_generator and self.generator is not None and self.trainer.is_global_zero:
            out = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "lianet_generator.pt"
            save_generator(self.generator, out)

    # ---------------------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        assert self.generator is not None
        lr, table_lr = self.hparams.lr, self.hparams.get("table_lr")
        if table_lr is None or table_lr == lr:
            groups: list[dict[str, Any]] = [{"params": list(self.generator.parameters())}]
        else:
            tables = [p for n, p in self.generator.named_parameters() if n.startswith("encoder.")]
            rest = [p for n, p in self.generator.named_parameters() if not n.startswith("encoder.")]
            groups = [{"params": rest}, {"params": tables, "lr": float(table_lr)}]
        return OPTIMIZATION.configure(self, groups)
