"""S4 (Shenoy et al., 2024): radar/optical self-supervised pretraining of 3-D U-Nets for image time series.

Pieces (paper section 4):

* **Encoders** ``f_r = y_c o y_r`` and ``f_o = y_c o y_o``: a 3-D U-Net encoder of four layers (each a
  double ``Conv3d + BatchNorm + LeakyReLU``, max-pooling between them) whose first two layers are
  modality-specific (``y_r``, ``y_o``) and last two shared (``y_c``)
  (:class:`~terratorch_eoplugins.nn.unet3d.UNet3DEncoder`).
* **Projection head** ``g`` (:class:`S4ProjectionHead`): two 1x1x1 ``Conv3d`` with BatchNorm and LeakyReLU,
  applied to the bottleneck (compressed space-time) features, used only by the contrastive loss.
* **Reconstruction decoder** ``h`` (one per input modality): the U-Net up path (transposed convolutions
  + skips) ending in a 1x1x1 convolution to the *other* modality's channels per date.
* **Fine-tuning** (:func:`s4_unet3d`, registered terratorch backbone): encoder ``f_in`` + decoder ``h`` of
  the inference modality without its last convolution; the decoder features are averaged over time and
  terratorch's segmentation head plays the part of the replaced final convolution
  (``decoder: IdentityDecoder``). ``output="pyramid"`` instead returns the four encoder levels, each
  averaged over time (full resolution, /2, /4, /8), for terratorch decoders such as ``UNetDecoder``.

Paper defaults: RGB optical input (3 channels, "we train using only the RGB channels"; 10 S2 bands with
``in_channels={"optical": 10, ...}``), max-pooling over space *and* time ("the 3D operations are applied along
both the temporal dimension and the spatial dimensions"; ``pool_time=False`` pools space only, the project's
earlier choice). Series of any length are replicate-padded at the end to the pooling factor and cropped back;
batches of series of different lengths carry a ``date_mask`` ``[B, T]`` (True = real date,
:func:`~terratorch_eoplugins.datasets.s4.collate_s4`) and the padded dates are left out of the temporal mean
(fine-tuning) and of the losses (pretraining).

Choices where the paper is silent (documented, configurable): widths ``(16, 32, 64, 128)``; projection
``widths[-1] -> widths[-1] -> 64`` with the activation between the two convolutions and none after the
last one (as in SimCLR-style heads, so that cosine similarities can be negative); temporal mean pooling
before the segmentation head.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from terratorch.registry import TERRATORCH_BACKBONE_REGISTRY
from torch import Tensor, nn

from terratorch_eoplugins.errors import check_model_input
from terratorch_eoplugins.models._checkpoint import read_state_dict
from terratorch_eoplugins.models.pretrained import (
    PRETRAINED_FLAG,
    check_builder_kwargs,
    log_restored,
    resolve_source,
    warn_no_pretrained,
)
from terratorch_eoplugins.nn.unet3d import (
    UNet3DDecoder,
    UNet3DEncoder,
    crop_to,
    masked_time_max,
    masked_time_mean,
    pad_to_multiple,
    pooled_date_mask,
)

__all__ = ["S4Model", "S4ProjectionHead", "S4UNet3DBackbone", "s4_unet3d", "load_s4_pretrained", "S4_MODALITIES"]

logger = logging.getLogger("terratorch_eoplugins.models.s4")

REGISTERED = {"backbone": ["s4_unet3d"]}

#: the two S4 modalities and their default channel counts on PASTIS-R: optical RGB (the paper's experiments; the
#: data serves S2 B4, B3, B2), radar S1 VV, VH, VV-VH
S4_MODALITIES: dict[str, int] = {"optical": 3, "radar": 3}
DEFAULT_WIDTHS: tuple[int, ...] = (16, 32, 64, 128)


def _other(modality: str) -> str:
    return "radar" if modality == "optical" else "optical"


def _check_modality(modality: str) -> str:
    if modality not in S4_MODALITIES:
        raise ValueError(f"modality must be one of {list(S4_MODALITIES)}, got {modality!r}")
    return modality


class S4ProjectionHead(nn.Sequential):
    """``g``: ``Conv3d 1x1x1 -> BatchNorm3d -> LeakyReLU -> Conv3d 1x1x1`` (optionally BN + LeakyReLU after)."""

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int, negative_slope: float = 0.01,
                 final_activation: bool = False) -> None:
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, hidden_channels, 1, bias=False), nn.BatchNorm3d(hidden_channels),
            nn.LeakyReLU(negative_slope, inplace=True), nn.Conv3d(hidden_channels, out_channels, 1),
        ]
        if final_activation:
            layers += [nn.BatchNorm3d(out_channels), nn.LeakyReLU(negative_slope, inplace=True)]
        super().__init__(*layers)


class S4Model(nn.Module):
    """The S4 pretraining network: both encoders, the projection head and the reconstruction decoders.

    Args:
        in_channels: channels per modality (``{"optical": C_o, "radar": C_r}``).
        widths: U-Net level widths (4 levels = the paper's four encoder layers).
        n_specific: leading modality-specific levels (paper: 2).
        proj_dim: output dimension of the projection head.
        reconstruct_from: input modalities that get a decoder ``h`` reconstructing the other modality.
        pool_time: pool the time axis too (default, paper); ``False``: space only.
        negative_slope: LeakyReLU slope.
    """

    def __init__(self, in_channels: Mapping[str, int] | None = None, widths: Sequence[int] = DEFAULT_WIDTHS,
                 n_specific: int = 2, proj_dim: int = 64, reconstruct_from: Sequence[str] = ("optical", "radar"),
                 pool_time: bool = True, negative_slope: float = 0.01) -> None:
        super().__init__()
        chans = dict(S4_MODALITIES if in_channels is None else in_channels)
        for m in chans:
            _check_modality(m)
        for m in reconstruct_from:
            if _check_modality(m) not in chans or _other(m) not in chans:
                raise ValueError(f"reconstructing from {m!r} needs both modalities in in_channels, got {list(chans)}")
        self.in_channels = chans
        self.widths = [int(w) for w in widths]
        self.encoder = UNet3DEncoder(chans, self.widths, n_specific, pool_time, negative_slope)
        self.projection = S4ProjectionHead(self.widths[-1], self.widths[-1], proj_dim, negative_slope)
        self.decoders = nn.ModuleDict({m: UNet3DDecoder(self.widths, chans[_other(m)], pool_time, negative_slope)
                                       for m in reconstruct_from})

    def encode(self, x: Tensor, modality: str) -> tuple[list[Tensor], tuple[int, int, int]]:
        """Encoder level outputs of a (padded) ``[B, C, T, H, W]`` series and its original ``(T, H, W)``."""
        if x.ndim != 5:
            raise ValueError(f"S4 expects [B, C, T, H, W] series, got shape {tuple(x.shape)} for {modality}")
        if x.shape[2] < 1:
            raise ValueError(f"S4 got an empty {modality} time series (T = 0)")
        check_model_input(x, f"S4 {modality} encoder")  # any size is padded to the pooling factors
        x, size = pad_to_multiple(x, self.encoder.spatial_factor, self.encoder.temporal_factor)
        return self.encoder(x, modality), size

    def bottleneck_size(self, size: tuple[int, int, int]) -> tuple[int, int, int]:
        """Bottleneck ``(T, H, W)`` covering the unpadded input (ceil division by the pooling factors)."""
        f, ft = self.encoder.spatial_factor, self.encoder.temporal_factor
        t, h, w = size
        return -(-t // ft), -(-h // f), -(-w // f)

    def project(self, feats: Sequence[Tensor], size: tuple[int, int, int]) -> Tensor:
        """``g`` on the bottleneck, cropped to the part that covers the unpadded input."""
        return crop_to(self.projection(feats[-1]), self.bottleneck_size(size))

    def bottleneck_valid(self, date_mask: Tensor | None, size: tuple[int, int, int]) -> Tensor | None:
        """``[B, T_b, H_b, W_b]`` validity of the projected bottleneck positions (``None`` without ``date_mask``):
        a time cell is valid when it pools at least one real date."""
        if date_mask is None:
            return None
        t, h, w = self.bottleneck_size(size)
        cells = pooled_date_mask(date_mask, self.encoder.temporal_factor, t)
        return cells[:, :, None, None].expand(-1, -1, h, w)

    def reconstruct(self, feats: Sequence[Tensor], modality: str, size: tuple[int, int, int]) -> Tensor:
        """``h(f_in(x_in))``: the other modality's series predicted from ``modality``'s encoder features."""
        if modality not in self.decoders:
            raise ValueError(f"no reconstruction decoder from {modality!r}; built for {list(self.decoders)}")
        return crop_to(self.decoders[modality](feats), size)


class S4UNet3DBackbone(nn.Module):
    """Single-modality S4 network for fine-tuning and inference, as a terratorch backbone.

    Args:
        modality: ``"optical"`` or ``"radar"`` (which pretrained encoder/decoder to use).
        in_channels: input channels (default 3 for both: optical RGB as in the paper, radar VV/VH/VV-VH), after
            ``band_indices``; 10 for all S2 bands.
        widths: U-Net level widths (must match the pretraining run).
        n_specific: modality-specific levels (must match the pretraining run).
        pool_time: pool the time axis too (default, paper; must match the pretraining run).
        output: ``"decoder"`` (encoder + decoder ``h``, one full-resolution map; pair with
            ``IdentityDecoder``) or ``"pyramid"`` (the encoder's levels, for ``UNetDecoder`` & co.).
        temporal_pooling: ``"mean"`` or ``"max"`` over time of the returned maps (over the real dates only when
            the batch carries a ``date_mask``).
        band_indices: input channels to keep (e.g. ``[2, 1, 0]`` for RGB out of 10 PASTIS S2 bands when the data
            serves all bands; the S4 data pieces already serve RGB).
        ckpt_path: S4 pretraining checkpoint (Lightning ``.ckpt`` of
            :class:`~terratorch_eoplugins.tasks.s4_pretrain.S4PretrainTask` or a state dict with the same keys);
            ``None`` trains from scratch (a warning is logged unless ``pretrained_from`` is set).
        pretrained_from: written by self-contained checkpoints (:mod:`terratorch_eoplugins.models.pretrained`):
            the file the weights came from, never read (they come from the checkpoint being restored).
    """

    def __init__(self, modality: str = "optical", in_channels: int | None = None,
                 widths: Sequence[int] = DEFAULT_WIDTHS, n_specific: int = 2, pool_time: bool = True,
                 output: Literal["decoder", "pyramid"] = "decoder",
                 temporal_pooling: Literal["mean", "max"] = "mean", band_indices: Sequence[int] | None = None,
                 ckpt_path: str | Path | None = None, negative_slope: float = 0.01,
                 pretrained_from: str | None = None) -> None:
        super().__init__()
        self.modality = _check_modality(modality)
        if band_indices is not None:
            band_indices = [int(i) for i in band_indices]
            if not band_indices or min(band_indices) < 0:
                raise ValueError(f"band_indices must be non-negative channel indices, got {band_indices}")
        self.band_indices = band_indices
        cin = in_channels if in_channels is not None else (
            len(band_indices) if band_indices is not None else S4_MODALITIES[modality])
        if band_indices is not None and cin != len(band_indices):
            raise ValueError(f"in_channels={in_channels} but band_indices keeps {len(band_indices)} channels")
        if output not in ("decoder", "pyramid"):
            raise ValueError(f"output must be 'decoder' or 'pyramid', got {output!r}")
        if temporal_pooling not in ("mean", "max"):
            raise ValueError(f"temporal_pooling must be 'mean' or 'max', got {temporal_pooling!r}")
        self.in_channels = int(cin)
        self.widths = [int(w) for w in widths]
        self.n_specific, self.pool_time = n_specific, pool_time
        self.output, self.temporal_pooling = output, temporal_pooling
        self.encoder = UNet3DEncoder({modality: self.in_channels}, self.widths, n_specific, pool_time, negative_slope)
        self.decoder = UNet3DDecoder(self.widths, None, pool_time, negative_slope) if output == "decoder" else None
        self.out_channels: list[int] = [self.widths[0]] if output == "decoder" else list(self.widths)
        #: absolute path of the pretraining checkpoint the weights came from (``None``: from scratch)
        self.pretrained_source: str | None = pretrained_from
        if ckpt_path is not None:
            load_s4_pretrained(self, ckpt_path)
            self.pretrained_source = resolve_source(ckpt_path)
        elif pretrained_from:
            log_restored(f"s4_unet3d ({modality})", pretrained_from)
        else:
            warn_no_pretrained(f"S4 ({modality})", f"model_args.{PRETRAINED_FLAG}",
                               "the encoder and decoder start from a random initialisation (from scratch)",
                               "pass an S4 pretraining checkpoint (configs/s4_pretrain_pastis.yaml) as "
                               f"--model.init_args.model_args.{PRETRAINED_FLAG}")

    def self_contained_args(self) -> dict[str, Any]:
        """Builder arguments that rebuild this backbone without its pretraining file (the architecture is given by
        the builder's own arguments, checked against the file when it was read); ``{}`` when none was read."""
        if self.pretrained_source is None:
            return {}
        return {"ckpt_path": None, "pretrained_from": self.pretrained_source}

    def _pool_time(self, x: Tensor, valid: Tensor | None) -> Tensor:
        return masked_time_mean(x, valid) if self.temporal_pooling == "mean" else masked_time_max(x, valid)

    def forward(self, x: Tensor, date_mask: Tensor | None = None, **kwargs: Any) -> list[Tensor]:
        """``[B, C, T, H, W]`` (or ``[B, C, H, W]`` as T = 1) -> list of ``[B, C_i, H_i, W_i]`` maps.

        ``date_mask`` (``[B, T]``, True = real date; from :func:`~terratorch_eoplugins.datasets.s4.collate_s4`)
        restricts the temporal pooling to the real dates of each series. Other batch keys (dates,
        georeferencing) arrive as ``kwargs`` and are ignored.
        """
        if isinstance(x, Mapping):
            raise ValueError(f"s4_unet3d takes one modality's tensor, got a dict with {list(x)}; "
                             "fine-tune with a single modality (S4 inference is single-modal)")
        if x.ndim == 4:
            x = x.unsqueeze(2)
        if x.ndim != 5:
            raise ValueError(f"s4_unet3d expects [B, C, T, H, W] or [B, C, H, W], got shape {tuple(x.shape)}")
        if self.band_indices is not None:
            if max(self.band_indices) >= x.shape[1]:
                raise ValueError(f"band_indices {self.band_indices} out of range for {x.shape[1]} input channels")
            x = x[:, self.band_indices]
        if x.shape[2] < 1:
            raise ValueError("s4_unet3d got an empty time series (T = 0)")
        if date_mask is not None:
            date_mask = torch.as_tensor(date_mask, dtype=torch.bool, device=x.device)
            if date_mask.shape != (x.shape[0], x.shape[2]):
                raise ValueError(f"date_mask must be [B, T] = {(x.shape[0], x.shape[2])} for input "
                                 f"{tuple(x.shape)}, got {tuple(date_mask.shape)}")
        x, size = pad_to_multiple(x, self.encoder.spatial_factor, self.encoder.temporal_factor)
        feats = self.encoder(x, self.modality)
        if self.decoder is not None:
            return [self._pool_time(crop_to(self.decoder(feats), size), date_mask)]
        t, h, w = size
        if date_mask is None:  # the pooled levels must not average the dates padded to the pooling factor
            date_mask = torch.ones(x.shape[0], t, dtype=torch.bool, device=x.device)
        out = []
        for i, f in enumerate(feats):
            s = 2**i
            ft = s if self.pool_time else 1
            valid = None if date_mask is None else pooled_date_mask(date_mask, ft, f.shape[2])
            out.append(self._pool_time(f, valid)[..., : -(-h // s), : -(-w // s)])
        return out


def _read_state_dict(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    state, hparams = read_state_dict(path, "S4")
    return {k.removeprefix("model."): v for k, v in state.items()}, hparams


def load_s4_pretrained(backbone: S4UNet3DBackbone, path: str | Path) -> None:
    """Load the encoder ``f_in`` (specific + shared levels) and decoder ``h`` of ``backbone.modality``.

    The decoder's final convolution (which reconstructed the other modality) is not loaded: fine-tuning
    replaces it with the segmentation head. Raises ``ValueError`` naming the file when the checkpoint
    lacks the modality or was pretrained with another architecture.
    """
    state, hparams = _read_state_dict(path)
    for key in ("widths", "n_specific", "pool_time"):
        if key in hparams:
            mine = getattr(backbone, key)
            theirs = list(hparams[key]) if key == "widths" else hparams[key]
            if theirs != mine:
                raise ValueError(f"{path}: pretrained with {key}={theirs}, but the backbone has {key}={mine}")
    m = backbone.modality
    mapping = {f"encoder.specific.{m}.": "encoder.specific." + m + ".", "encoder.shared.": "encoder.shared."}
    if backbone.decoder is not None:
        mapping[f"decoders.{m}."] = "decoder."
    own = backbone.state_dict()
    loaded: dict[str, Tensor] = {}
    for key, value in state.items():
        for src, dst in mapping.items():
            if key.startswith(src):
                target = dst + key[len(src):]
                if target.startswith("decoder.final."):
                    break
                if target not in own:
                    break
                if own[target].shape != value.shape:
                    raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the backbone expects "
                                     f"{tuple(own[target].shape)} (different in_channels/band_indices or widths?)")
                loaded[target] = value
                break
    missing = [k for k in own if k not in loaded]
    if not any(k.startswith(f"encoder.specific.{m}.") for k in loaded) and backbone.n_specific > 0:
        raise ValueError(f"{path}: no S4 encoder weights for modality {m!r} (expected keys 'encoder.specific.{m}.*')")
    if missing:
        raise ValueError(f"{path}: missing {len(missing)} weight(s) for the {m} backbone, e.g. {missing[:3]} "
                         "(was the decoder trained with reconstruct_from including this modality?)")
    backbone.load_state_dict(loaded, strict=True)
    logger.info("s4_unet3d (%s): loaded %d pretrained tensors from %s", m, len(loaded), path)


@TERRATORCH_BACKBONE_REGISTRY.register
def s4_unet3d(modality: str = "optical", in_channels: int | None = None, widths: Sequence[int] = DEFAULT_WIDTHS,
              n_specific: int = 2, pool_time: bool = True, output: Literal["decoder", "pyramid"] = "decoder",
              temporal_pooling: Literal["mean", "max"] = "mean", band_indices: Sequence[int] | None = None,
              ckpt_path: str | None = None, pretrained: bool = False, negative_slope: float = 0.01,
              pretrained_from: str | None = None, **kwargs: Any) -> S4UNet3DBackbone:
    """S4 3-D U-Net backbone for one modality; ``ckpt_path`` = S4 pretraining checkpoint (``None``: scratch).

    ``pretrained=True`` without ``ckpt_path`` is an error (no weights can be downloaded); other keyword arguments
    are errors. ``pretrained_from``: see :class:`S4UNet3DBackbone`.
    """
    if pretrained and ckpt_path is None and not pretrained_from:
        raise ValueError("s4_unet3d: pretrained=True needs ckpt_path (an S4 pretraining checkpoint); no weights "
                         "are downloadable")
    check_builder_kwargs("s4_unet3d", kwargs, ("modality", "in_channels", "widths", "n_specific", "pool_time",
                                               "output", "temporal_pooling", "band_indices", "ckpt_path",
                                               "pretrained", "negative_slope", "pretrained_from"))
    return S4UNet3DBackbone(modality, in_channels, widths, n_specific, pool_time, output, temporal_pooling,
                            band_indices, ckpt_path, negative_slope, pretrained_from)
