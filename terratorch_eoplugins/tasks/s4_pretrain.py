"""S4 self-supervised pretraining task (Lightning): ``L = w_c * L_c + lambda * L_r`` (paper Eq. 1).

* ``L_c``: pixel-wise multi-modal space-time InfoNCE (:func:`~terratorch_eoplugins.losses.s4_pixel_infonce`,
  temperature 0.5) between the projected bottleneck features of the radar and optical encoders, over *every*
  space-time position of the bottleneck (paper), computed in chunks of anchor rows so memory stays bounded;
  ``num_pixels: 256`` samples positions instead (the project's earlier default).
* ``L_r``: cross-modal reconstruction (:func:`~terratorch_eoplugins.losses.s4_reconstruction_l1`), the mean
  L1 between the other modality's series and ``h(f_in(x_in))``, averaged over the reconstruction
  directions (``reconstruct_from``: both by default, so both encoders get a decoder to fine-tune).

Ablations of the paper (section 5.5), all from the config:

* ``L_c`` only: ``reconstruction_weight: 0``; ``L_r`` only: ``contrastive_weight: 0``; both: the default.
* single-modal contrastive: ``mode: single_modal`` (with ``reconstruction_weight: 0``): the contrastive
  loss compares two randomly augmented views of the same ``single_modal_modality`` series (per-channel
  gain/offset jitter, Gaussian noise, random space-time erasing: photometric augmentations that keep
  the pixel correspondence the loss relies on) instead of radar vs optical.

Batches come from :class:`~terratorch_eoplugins.datamodules.s4.S4PASTISDataModule`:
``image = {"optical": [B, C_o, T, H, W], "radar": [B, C_r, T, H, W]}`` with equal T, H, W (every aligned date,
RGB optical by default) and ``date_mask`` ``[B, T]`` when the series of the batch have different lengths: the
padded dates are excluded from ``L_c`` (a bottleneck time cell counts when it pools a real date; it is neither
anchor nor negative otherwise) and from ``L_r`` (the mean runs over the real dates).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torchgeo.trainers import BaseTask

from terratorch_eoplugins.losses import S4_INFONCE_CHUNK, s4_pixel_infonce, s4_reconstruction_l1
from terratorch_eoplugins.models.s4 import DEFAULT_WIDTHS, S4Model
from terratorch_eoplugins.tasks.optimization import OptimizerDefaults

__all__ = ["OPTIMIZATION", "S4PretrainTask", "augment_series"]

#: Adam without weight decay and a constant rate (the paper gives no optimizer details in the main text)
OPTIMIZATION = OptimizerDefaults("Adam", {"weight_decay": 0.0}, None)


def augment_series(x: Tensor, gain_std: float = 0.1, offset_std: float = 0.1, noise_std: float = 0.1,
                   erase_prob: float = 0.5, erase_frac: float = 0.25,
                   generator: torch.Generator | None = None) -> Tensor:
    """Pixel-aligned random view of standardised ``[B, C, T, H, W]`` series (single-modal ablation).

    Per sample and channel a gain ``1 + N(0, gain_std)`` and an offset ``N(0, offset_std)``; additive
    Gaussian noise ``noise_std``; with probability ``erase_prob`` one random box of ``erase_frac`` of each
    dimension (T, H, W) set to 0 (the mean after standardisation), like a cloud.
    """
    b, c = x.shape[:2]
    dev, dt = x.device, x.dtype

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=dt).to(dev)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator, dtype=dt).to(dev)

    out = x * (1 + gain_std * randn(b, c, 1, 1, 1)) + offset_std * randn(b, c, 1, 1, 1)
    out = out + noise_std * randn(*x.shape)
    if erase_prob > 0:
        t, h, w = x.shape[-3:]
        keep = torch.ones_like(out)
        for i in range(b):
            if float(rand(1)) >= erase_prob:
                continue
            size = [max(1, int(round(erase_frac * s))) for s in (t, h, w)]
            start = [int(float(rand(1)) * (s - z + 1)) for s, z in zip((t, h, w), size)]
            keep[i, :, start[0]:start[0] + size[0], start[1]:start[1] + size[1], start[2]:start[2] + size[2]] = 0
        out = out * keep
    return out


class S4PretrainTask(BaseTask):
    """S4 pretraining on aligned radar/optical series (multi-modal contrastive + cross-modal reconstruction).

    Args:
        optical_channels: optical input channels (after ``optical_bands``; default 3, the RGB the data serves).
        radar_channels: radar input channels.
        optical_bands: optical channels to keep from the batch (e.g. ``[2, 1, 0]``: RGB out of 10 PASTIS S2 bands
            when the data serves all of them); ``None`` keeps what the data serves (RGB by default).
        widths: 3-D U-Net level widths.
        n_specific: modality-specific encoder levels (paper: first two of four).
        pool_time: pool the time axis in the U-Net too (default, paper); ``False``: space only.
        proj_dim: projection head output dimension.
        temperature: InfoNCE temperature (paper: 0.5).
        num_pixels: space-time positions sampled per sample for InfoNCE; ``None`` (default, paper): all.
        infonce_chunk_size: anchor rows per chunk of the InfoNCE logits (memory bound; the value is exact).
        contrastive_weight: weight of ``L_c`` (0 for the "L_r only" ablation).
        reconstruction_weight: ``lambda`` of Eq. 1 (0 for the "L_c only" ablation).
        reconstruct_from: input modalities whose decoder ``h`` reconstructs the other modality.
        mode: ``"multimodal"`` (S4) or ``"single_modal"`` (augmentation-based ablation).
        single_modal_modality: modality used when ``mode="single_modal"``.
        augment: keyword arguments of :func:`augment_series` (single-modal mode).
        lr, optimizer, optimizer_hparams, scheduler, scheduler_hparams: as in terratorch's tasks
            (:mod:`~terratorch_eoplugins.tasks.optimization`); defaults: ``Adam`` with ``{weight_decay: 0}``, no
            scheduler (the paper gives no optimizer details in the main text).
    """

    monitor = "val/loss"

    def __init__(self, optical_channels: int = 3, radar_channels: int = 3, optical_bands: Sequence[int] | None = None,
                 widths: Sequence[int] = DEFAULT_WIDTHS, n_specific: int = 2, pool_time: bool = True,
                 proj_dim: int = 64, temperature: float = 0.5, num_pixels: int | None = None,
                 infonce_chunk_size: int | None = S4_INFONCE_CHUNK,
                 contrastive_weight: float = 1.0, reconstruction_weight: float = 1.0,
                 reconstruct_from: Sequence[str] = ("optical", "radar"),
                 mode: Literal["multimodal", "single_modal"] = "multimodal",
                 single_modal_modality: Literal["optical", "radar"] = "optical",
                 augment: Mapping[str, float] | None = None, lr: float = 1e-3, optimizer: str = OPTIMIZATION.optimizer,
                 optimizer_hparams: dict[str, Any] | None = None, scheduler: str | None = OPTIMIZATION.scheduler,
                 scheduler_hparams: dict[str, Any] | None = None) -> None:
        if mode not in ("multimodal", "single_modal"):
            raise ValueError(f"mode must be 'multimodal' or 'single_modal', got {mode!r}")
        if contrastive_weight < 0 or reconstruction_weight < 0 or contrastive_weight + reconstruction_weight == 0:
            raise ValueError("contrastive_weight and reconstruction_weight must be >= 0 and not both 0, got "
                             f"{contrastive_weight} and {reconstruction_weight}")
        if mode == "single_modal" and reconstruction_weight > 0:
            raise ValueError("mode='single_modal' uses one modality only, so there is nothing to reconstruct "
                             "cross-modally: set reconstruction_weight: 0")
        if mode == "single_modal" and contrastive_weight == 0:
            raise ValueError("mode='single_modal' trains the contrastive loss only: contrastive_weight must be > 0")
        if optical_bands is not None and len(optical_bands) != optical_channels:
            raise ValueError(f"optical_bands keeps {len(optical_bands)} channels but "
                             f"optical_channels={optical_channels}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if infonce_chunk_size is not None and infonce_chunk_size < 1:
            raise ValueError(f"infonce_chunk_size must be a positive int or None, got {infonce_chunk_size}")
        OPTIMIZATION.check(optimizer, optimizer_hparams, scheduler, scheduler_hparams)
        super().__init__()
        self.augment_kwargs = dict(augment or {})

    def configure_models(self) -> None:
        """Build :class:`~terratorch_eoplugins.models.s4.S4Model`."""
        hp = self.hparams
        recon = list(hp["reconstruct_from"]) if hp["reconstruction_weight"] > 0 else []
        self.model = S4Model({"optical": hp["optical_channels"], "radar": hp["radar_channels"]}, hp["widths"],
                             hp["n_specific"], hp["proj_dim"], recon, hp["pool_time"])

    def configure_optimizers(self) -> dict[str, Any]:
        """The ``optimizer`` and ``scheduler`` arguments (default: Adam, constant rate)."""
        return OPTIMIZATION.configure(self, self.parameters())

    # ------------------------------------------------------------------ inputs
    def _date_mask(self, batch: Mapping[str, Any], x: Mapping[str, Tensor]) -> Tensor | None:
        """``[B, T]`` real-date flags of the batch (``None``: every date real)."""
        mask = batch.get("date_mask")
        if mask is None:
            return None
        v = next(iter(x.values()))
        mask = torch.as_tensor(mask, dtype=torch.bool, device=v.device)
        if mask.shape != (v.shape[0], v.shape[2]):
            raise ValueError(f"batch['date_mask'] must be [B, T] = {(v.shape[0], v.shape[2])}, got {tuple(mask.shape)}")
        if bool((~mask).all(1).any()):
            raise ValueError("batch['date_mask'] has a sample without any real date")
        return None if bool(mask.all()) else mask

    def _inputs(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        image = batch.get("image")
        if not isinstance(image, Mapping):
            raise ValueError("S4PretrainTask expects batch['image'] = {'optical': ..., 'radar': ...} "
                             f"(S4PASTISDataModule), got {type(image).__name__}")
        multimodal = self.hparams["mode"] == "multimodal"
        needed = ["optical", "radar"] if multimodal else [self.hparams["single_modal_modality"]]
        missing = [m for m in needed if m not in image]
        if missing:
            raise ValueError(f"batch['image'] lacks modality {missing}; got {list(image)}")
        x = {m: image[m] for m in needed}
        for m, v in x.items():
            if not isinstance(v, Tensor) or v.ndim != 5:
                raise ValueError(f"batch['image'][{m!r}] must be a [B, C, T, H, W] tensor, got "
                                 f"{getattr(v, 'shape', type(v).__name__)}")
            if v.shape[2] == 0:
                raise ValueError(f"batch['image'][{m!r}] has T = 0 dates")
        if "optical" in x and self.hparams["optical_bands"] is not None:
            bands = list(self.hparams["optical_bands"])
            if max(bands) >= x["optical"].shape[1]:
                raise ValueError(f"optical_bands {bands} out of range for {x['optical'].shape[1]} optical channels")
            x["optical"] = x["optical"][:, bands]
        if len(x) == 2:
            so, sr = x["optical"].shape, x["radar"].shape
            if so[0] != sr[0] or so[2:] != sr[2:]:
                raise ValueError(f"optical {tuple(so)} and radar {tuple(sr)} series must share B, T, H and W "
                                 "(align dates by nearest timestamp and co-register the patches)")
        return x

    # ------------------------------------------------------------------ losses
    def compute_losses(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """``loss`` (total), ``loss_c`` and ``loss_r`` of one batch."""
        hp = self.hparams
        x = self._inputs(batch)
        mask = self._date_mask(batch, x)
        zero = next(iter(x.values())).new_zeros(())
        out = {"loss_c": zero, "loss_r": zero}
        chunk = hp.get("infonce_chunk_size", S4_INFONCE_CHUNK)
        if hp["mode"] == "single_modal":
            m = hp["single_modal_modality"]
            views = [augment_series(x[m], **self.augment_kwargs) for _ in range(2)]
            z = []
            for v in views:
                feats, size = self.model.encode(v, m)
                z.append(self.model.project(feats, size))
            valid = self.model.bottleneck_valid(mask, size)
            out["loss_c"] = s4_pixel_infonce(z[0], z[1], hp["temperature"], hp["num_pixels"], valid=valid,
                                             chunk_size=chunk)
            out["loss"] = hp["contrastive_weight"] * out["loss_c"]
            return out
        enc = {m: self.model.encode(v, m) for m, v in x.items()}
        if hp["contrastive_weight"] > 0:
            z_r = self.model.project(*enc["radar"])
            z_o = self.model.project(*enc["optical"])
            valid = self.model.bottleneck_valid(mask, enc["radar"][1])
            out["loss_c"] = s4_pixel_infonce(z_r, z_o, hp["temperature"], hp["num_pixels"], valid=valid,
                                             chunk_size=chunk)
        if hp["reconstruction_weight"] > 0:
            losses = []
            for m in self.model.decoders:
                other = "radar" if m == "optical" else "optical"
                feats, size = enc[m]
                rmask = None if mask is None else mask[:, None, :, None, None]
                losses.append(s4_reconstruction_l1(self.model.reconstruct(feats, m, size), x[other], rmask))
            out["loss_r"] = torch.stack(losses).mean()
        out["loss"] = hp["contrastive_weight"] * out["loss_c"] + hp["reconstruction_weight"] * out["loss_r"]
        return out

    def _step(self, batch: Mapping[str, Any], stage: str) -> Tensor:
        out = self.compute_losses(batch)
        bsz = next(iter(self._batch_image(batch).values())).shape[0]
        self.log(f"{stage}/loss", out["loss"], batch_size=bsz, prog_bar=stage == "train", on_epoch=True,
                 on_step=stage == "train")
        self.log(f"{stage}/loss_c", out["loss_c"], batch_size=bsz, on_epoch=True, on_step=False)
        self.log(f"{stage}/loss_r", out["loss_r"], batch_size=bsz, on_epoch=True, on_step=False)
        return out["loss"]

    @staticmethod
    def _batch_image(batch: Mapping[str, Any]) -> Mapping[str, Tensor]:
        image = batch["image"]
        return image if isinstance(image, Mapping) else {"x": image}

    def training_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Total S4 loss of a training batch."""
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Log the validation losses."""
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Log the test losses."""
        self._step(batch, "test")
