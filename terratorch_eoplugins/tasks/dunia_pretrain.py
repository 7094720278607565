"""DUNIA pretraining task (Lightning): pixel-waveform + pixel-pixel alignment and three reconstructions (section 3.4).

``L = w_zcl * ZeroCL(O^V@footprints, O^W) + w_vic * sum_d VICReg(proj O^H_d, proj O^T_d) + MSE(W, W_hat)
+ MSE(M, M_hat) + MSE(I, I_hat) + w_commit * RVQ commitment`` (``w_commit = 0`` by default: Eq. 2 has no
commitment term)

**Ablations** (appendix H; each a piece ``configs/models/pretrain/dunia_<ablation>.yaml``): NA layers 0 / 1 / 2 on
the decoder outputs (``image_kwargs.na_layers``; 0 = a convolutional output layer, H.4), a shared decoder
(``image_kwargs.shared_decoder``, H.2), single-level VICReg (``vicreg_levels: single``, H.3), the literal Zero-CL
equations (``zero_cl_form: literal``), the RVQ commitment term (``commit_weight: 1``).

* **Pixel-waveform** (:func:`~terratorch_eoplugins.losses.zero_cl_loss`): ``O^V`` is gathered at the GEDI
  footprint pixels of the whole mini-batch (``G`` footprints) and aligned with the waveform embeddings ``O^W``
  of the same shots (channel mean of the waveform latent ``z_e`` + linear layer).
* **Pixel-pixel** (:func:`~terratorch_eoplugins.losses.hierarchical_vicreg`, Eq. 1): the projected
  ``O^H_d`` of the image model against the projected, temporally averaged ``O^T_d`` of the multi-temporal
  ConvLSTM autoencoder, at the four decoder levels (weights 25/25/1).
* **Reconstructions** (Eq. 2): waveform AE, multi-temporal AE, and ``I`` from ``O^H`` (regularisation).

**Batches without GEDI footprints.** Zero-CL is defined over the ``G`` footprints of a mini-batch and needs
``G >= 2`` (its whitening of a single sample is undefined). With ``on_missing_footprints="skip"`` (default)
a batch with fewer than ``min_footprints`` footprints contributes no pixel-waveform alignment and no waveform
reconstruction (those terms are 0 and ``footprints`` is logged as 0); the pixel-pixel alignment and the image
reconstructions are still trained, as the paper's objective implies (the waveform terms only exist where
waveforms do). ``on_missing_footprints="error"`` raises a ``ValueError`` instead.

**Optimiser** (documented choice; terratorch's ``optimizer`` / ``optimizer_hparams`` / ``scheduler`` /
``scheduler_hparams`` arguments, :mod:`~terratorch_eoplugins.tasks.optimization`): the defaults are the paper's
(appendix E.2: ``optimizer: timm.optim.Lion``, lr 5e-5, weight decay 0.4; ``scheduler: WarmupCosine`` with 5K
warmup steps, cosine to 0 at ``scheduler_hparams.total``, default the trainer's estimated number of steps). The
CPU configs on the synthetic world use ``optimizer: AdamW`` (lr 1e-3, weight decay 0.05): Lion's sign updates
need the paper's small learning rate and long schedule, while a few hundred AdamW steps suffice to see the
losses fall on the tiny world.

**Switch EMA** (appendix E.2; Li et al., 2024): every ``sema_every`` (5) optimiser steps the EMA of the
parameters is updated with decay ``sema_decay`` (0.9); every ``sema_switch_every`` (1000) steps the online
parameters are replaced by ``c * EMA + (1 - c) * online`` with ``c = sema_coefficient`` (0.9; 1.0 = a pure
switch). Buffers (BatchNorm statistics, codebooks) are not averaged. The EMA is saved in checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor
from torchgeo.trainers import BaseTask

from terratorch_eoplugins.losses import dunia_reconstruction_losses, hierarchical_vicreg, zero_cl_loss
from terratorch_eoplugins.metrics import alignment_similarities
from terratorch_eoplugins.models.dunia import DUNIA_VARIANTS, DUNIAPretrainModel
from terratorch_eoplugins.tasks.ema import SwitchEMA
from terratorch_eoplugins.tasks.optimization import OptimizerDefaults

__all__ = ["OPTIMIZATION", "DUNIAPretrainTask", "gather_footprints"]

#: the paper's optimiser and schedule (appendix E.2): Lion, weight decay 0.4, 5K warmup steps + cosine, per step
OPTIMIZATION = OptimizerDefaults("timm.optim.Lion", {"weight_decay": 0.4}, "WarmupCosine",
                                 {"warmup": 5000, "interval": "step"})


def gather_footprints(embedding: Tensor, footprints: Tensor, footprint_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Pixel embeddings at the valid footprints: ``([G, D], batch index [G], slot index [G])``.

    ``embedding [B, D, H, W]``, ``footprints [B, K, 2]`` (row, column; -1 padding), ``footprint_mask [B, K]``.
    """
    if footprints.ndim != 3 or footprints.shape[-1] != 2 or footprint_mask.shape != footprints.shape[:2]:
        raise ValueError(f"footprints must be [B, K, 2] with footprint_mask [B, K], got {tuple(footprints.shape)} and "
                         f"{tuple(footprint_mask.shape)}")
    b_idx, k_idx = footprint_mask.bool().nonzero(as_tuple=True)
    rc = footprints[b_idx, k_idx].long()
    h, w = embedding.shape[-2:]
    if rc.numel() and (rc.min() < 0 or (rc[:, 0] >= h).any() or (rc[:, 1] >= w).any()):
        raise ValueError(f"footprint pixel positions fall outside the {h} x {w} chip")
    return embedding[b_idx, :, rc[:, 0], rc[:, 1]], b_idx, k_idx


class DUNIAPretrainTask(BaseTask):
    """DUNIA pretraining on :class:`~terratorch_eoplugins.datamodules.dunia.DUNIAPretrainDataModule` batches.

    Args:
        variant: image-model variant (:data:`~terratorch_eoplugins.models.dunia.DUNIA_VARIANTS`).
        image_kwargs: architecture overrides of the image model (recorded in the checkpoint).
        temporal_channels: channels of the multi-temporal input (14).
        lstm_layers: ConvLSTM layers per block (2).
        waveform_length: waveform samples (256; the datamodule must resample to it).
        waveform_kwargs: extra waveform-AE arguments (e.g. smaller codebooks).
        zero_cl_weight, vicreg_weight, reconstruction_weight, commit_weight: loss weights. ``commit_weight``
            weighs the RVQ commitment term of the waveform AE, which Eq. 2 does not have: ``0`` (default) is the
            paper's objective; ``1`` adds it (the former default; an ablation piece,
            ``configs/models/pretrain/dunia_commit.yaml``). The codebooks learn by EMA either way.
        zero_cl_shrinkage: covariance shrinkage of Zero-CL's whitening.
        zero_cl_form: ``"standardized"`` (default: the official Zero-CL code's standardisation, shrinkage and
            scaled inner products) or ``"literal"`` (appendix B's Eqs. 3-6 as printed; an ablation),
            :func:`~terratorch_eoplugins.losses.zero_cl_loss`.
        vicreg_levels: ``"hierarchical"`` (Eq. 1, every decoder level; the paper's) or ``"single"`` (one VICReg on
            the last decoder level ``O^H_1`` only, appendix H.3's ``VICReg_s`` ablation).
        vicreg_pixels: pixels sampled per level for VICReg (``None``: all).
        min_footprints: fewest footprints per batch for the pixel-waveform terms (>= 2).
        on_missing_footprints: ``"skip"`` or ``"error"`` (see the module docstring).
        lr, optimizer, optimizer_hparams, scheduler, scheduler_hparams: as in terratorch's tasks (module
            docstring); defaults: ``timm.optim.Lion`` with ``{weight_decay: 0.4}``, ``WarmupCosine`` with
            ``{warmup: 5000, interval: step}`` (``total``: the trainer's estimated steps).
        sema_decay, sema_every, sema_switch_every, sema_coefficient: Switch EMA (``sema_every=0`` disables).
    """

    monitor = "val/loss"

    def __init__(self, variant: str = "tiny", image_kwargs: Mapping[str, Any] | None = None,
                 temporal_channels: int = 14, lstm_layers: int = 2, waveform_length: int = 256,
                 waveform_kwargs: Mapping[str, Any] | None = None, zero_cl_weight: float = 1.0,
                 vicreg_weight: float = 1.0, reconstruction_weight: float = 1.0, commit_weight: float = 0.0,
                 zero_cl_shrinkage: float = 0.1, zero_cl_form: Literal["standardized", "literal"] = "standardized",
                 vicreg_levels: Literal["hierarchical", "single"] = "hierarchical",
                 vicreg_pixels: int | None = 4096, min_footprints: int = 2,
                 on_missing_footprints: Literal["skip", "error"] = "skip",
                 lr: float = 5e-5, optimizer: str = OPTIMIZATION.optimizer,
                 optimizer_hparams: dict[str, Any] | None = None, scheduler: str | None = OPTIMIZATION.scheduler,
                 scheduler_hparams: dict[str, Any] | None = None, sema_decay: float = 0.9, sema_every: int = 5,
                 sema_switch_every: int = 1000, sema_coefficient: float = 0.9) -> None:
        if variant not in DUNIA_VARIANTS:
            raise ValueError(f"unknown DUNIA variant {variant!r}: expected one of {list(DUNIA_VARIANTS)}")
        OPTIMIZATION.check(optimizer, optimizer_hparams, scheduler, scheduler_hparams)
        if zero_cl_form not in ("standardized", "literal"):
            raise ValueError(f"zero_cl_form must be 'standardized' or 'literal', got {zero_cl_form!r}")
        if vicreg_levels not in ("hierarchical", "single"):
            raise ValueError(f"vicreg_levels must be 'hierarchical' or 'single', got {vicreg_levels!r}")
        if on_missing_footprints not in ("skip", "error"):
            raise ValueError(f"on_missing_footprints must be 'skip' or 'error', got {on_missing_footprints!r}")
        if min_footprints < 2:
            raise ValueError(f"min_footprints must be >= 2 (Zero-CL whitens over the batch's footprints), got "
                             f"{min_footprints}")
        self._sema = SwitchEMA(sema_decay, sema_every, sema_switch_every, sema_coefficient)  # checks the arguments
        super().__init__()

    def configure_models(self) -> None:
        """Build :class:`~terratorch_eoplugins.models.dunia.DUNIAPretrainModel`."""
        hp = self.hparams
        self.model = DUNIAPretrainModel(hp["variant"], hp["image_kwargs"], hp["temporal_channels"], hp["lstm_layers"],
                                        hp["waveform_length"], hp["waveform_kwargs"])

    def configure_optimizers(self) -> dict[str, Any]:
        """The ``optimizer`` and ``scheduler`` arguments (default: Lion, linear warmup + cosine, per step)."""
        return OPTIMIZATION.configure(self, [p for p in self.parameters() if p.requires_grad])

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _inputs(batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        need = ["image", "series", "footprints", "footprint_mask", "waveform"]
        missing = [k for k in need if k not in batch]
        if missing:
            raise ValueError(f"DUNIAPretrainTask: batch lacks {missing} (use DUNIAPretrainDataModule with batch_keys "
                             f"including series, footprints, footprint_mask, waveform); got keys {sorted(batch)}")
        image, series = batch["image"], batch["series"]
        if not isinstance(image, Tensor) or image.ndim != 4:
            raise ValueError(f"batch['image'] must be [B, C, H, W], got "
                             f"{getattr(image, 'shape', type(image).__name__)}")
        if not isinstance(series, Tensor) or series.ndim != 5 or series.shape[0] != image.shape[0] \
                or series.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"batch['series'] must be [B, C, T, H, W] on the image's grid {tuple(image.shape)}, got "
                             f"{getattr(series, 'shape', None)}")
        return image, series, batch["footprints"], batch["footprint_mask"], batch["waveform"]

    # ------------------------------------------------------------------ losses
    def compute_losses(self, batch: Mapping[str, Any], similarities: bool = False) -> dict[str, Any]:
        """Total loss and its parts for one batch (``similarities``: also table-H1 cosine similarities)."""
        hp = self.hparams
        image, series, foot, fmask, waves = self._inputs(batch)
        out = self.model.image.forward_embeddings(image)
        proj_h = self.model.image.project_horizontal(out["horizontal_levels"])
        temporal = self.model.temporal_embeddings(series)
        zero = image.new_zeros(())
        parts: dict[str, Any] = {}
        levels = len(proj_h) if hp.get("vicreg_levels", "hierarchical") == "hierarchical" else 1
        parts["vicreg"] = hierarchical_vicreg(proj_h[:levels], temporal["projected"][:levels],
                                              num_pixels=hp["vicreg_pixels"])
        rec = dunia_reconstruction_losses(series=series, series_hat=temporal["recon"], image=image,
                                          image_hat=self.model.image.reconstruct(out["horizontal"]))
        parts["rec_series"], parts["rec_image"] = rec["series"], rec["image"]
        z_pix, b_idx, k_idx = gather_footprints(out["vertical"], foot, fmask)
        g = z_pix.shape[0]
        parts["footprints"] = torch.tensor(float(g))
        if g >= hp["min_footprints"]:
            w = waves[b_idx, k_idx]
            wo = self.model.waveform(w)
            parts["zero_cl"] = zero_cl_loss(z_pix, wo["embedding"], shrinkage=hp["zero_cl_shrinkage"],
                                            form=hp.get("zero_cl_form", "standardized"))
            parts["rec_waveform"] = self.model.waveform.reconstruction_loss(w, wo["recon"])
            parts["commit"] = wo["commit_loss"]
            if similarities:
                parts["sim_pw"] = alignment_similarities(z_pix, wo["embedding"])
        elif hp["on_missing_footprints"] == "error":
            raise ValueError(f"DUNIAPretrainTask: the batch holds {g} GEDI footprint(s); the pixel-waveform Zero-CL "
                             f"alignment needs at least min_footprints={hp['min_footprints']} (set "
                             "on_missing_footprints='skip' to train the other terms on such batches)")
        else:
            parts["zero_cl"] = parts["rec_waveform"] = parts["commit"] = zero
        if similarities:
            a, b = proj_h[0], temporal["projected"][0]
            parts["sim_pp"] = alignment_similarities(a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]),
                                                     b.permute(0, 2, 3, 1).reshape(-1, b.shape[1]))
        parts["loss"] = (hp["zero_cl_weight"] * parts["zero_cl"] + hp["vicreg_weight"] * parts["vicreg"]
                         + hp["reconstruction_weight"] * (parts["rec_series"] + parts["rec_image"]
                                                          + parts["rec_waveform"])
                         + hp["commit_weight"] * parts["commit"])
        return parts

    def _step(self, batch: Mapping[str, Any], stage: str) -> Tensor:
        parts = self.compute_losses(batch, similarities=stage != "train")
        bsz = batch["image"].shape[0]
        for k, v in parts.items():
            if isinstance(v, dict):
                for kk, vv in v.items():
                    self.log(f"{stage}/cs_{kk}_{k[4:]}", vv, batch_size=bsz, on_epoch=True, on_step=False)
            else:
                self.log(f"{stage}/{k}", v.detach() if isinstance(v, Tensor) else v, batch_size=bsz, on_epoch=True,
                         on_step=stage == "train" and k == "loss", prog_bar=k == "loss")
        return parts["loss"]

    def training_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Total DUNIA loss of a training batch."""
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Validation losses and table-H1 similarities."""
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Test losses and table-H1 similarities."""
        self._step(batch, "test")

    # ------------------------------------------------------------------ Switch EMA
    def sema_update(self) -> None:
        """One optimiser step of Switch EMA bookkeeping (called after every training batch)."""
        self._sema.step(self.model.named_parameters())

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Switch EMA update."""
        self.sema_update()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the Switch-EMA state."""
        state = self._sema.state_dict()
        if state is not None:
            checkpoint["dunia_sema"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the Switch-EMA state."""
        state = checkpoint.get("dunia_sema")
        if state is not None:
            self._sema.load_state_dict(state)
