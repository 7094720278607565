"""3-D U-Net layers for satellite image time series (``[B, C, T, H, W]``).

The building block is the 3-D U-Net of Cicek et al. as used for SITS by Rustowicz et al. and S4: each
"layer" is a :class:`ConvBlock3d` (two ``Conv3d 3x3x3 + BatchNorm3d + LeakyReLU``), levels are separated by
max-pooling, and the decoder upsamples with transposed convolutions and concatenates the encoder skips.

* :class:`UNet3DEncoder` is split into *modality-specific* stages (one copy per input modality) followed
  by *shared* stages, as S4 prescribes (first two layers per modality, last two shared). With one
  modality it is a plain 3-D U-Net encoder.
* :class:`UNet3DDecoder` is the up path (transposed convolutions + skips), optionally ending in a
  1x1x1 convolution to ``out_channels`` per date.
* :class:`UNet3D` composes both for one modality and handles any ``T >= 1`` and any ``H, W``: inputs are
  replicate-padded to the pooling factor and the output is cropped back.

Pooling is over space *and* time by default (kernel ``2x2x2``, as in Cicek et al., Rustowicz et al. and S4:
"the 3D operations are applied along both the temporal dimension and the spatial dimensions"): T is halved at
each level, so a series of any length ``T >= 1`` (odd or not a power of two included) is replicate-padded at
its end to a multiple of the total pooling factor ``2**(levels - 1)`` (the last date repeated) and the output
is cropped back to T. The transposed convolutions (stride 2, output padding 1) exactly double every pooled
axis, so padded and cropped shapes always match. ``pool_time=False`` (kernel ``1x2x2``, the project's
earlier choice) keeps the time axis at full length at every level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvBlock3d", "UNet3DEncoder", "UNet3DDecoder", "UNet3D", "pad_to_multiple", "crop_to", "pooled_date_mask",
           "masked_time_mean", "masked_time_max"]


class ConvBlock3d(nn.Sequential):
    """Two ``Conv3d(3x3x3) + BatchNorm3d + LeakyReLU`` layers (one U-Net "layer")."""

    def __init__(self, in_channels: int, out_channels: int, negative_slope: float = 0.01) -> None:
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
            nn.LeakyReLU(negative_slope, inplace=True),
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
            nn.LeakyReLU(negative_slope, inplace=True),
        )


def _check_5d(x: Tensor, what: str) -> None:
    if x.ndim != 5:
        raise ValueError(f"{what} expects a [B, C, T, H, W] tensor, got shape {tuple(x.shape)}")
    if x.shape[2] < 1:
        raise ValueError(f"{what} got an empty time series (T = 0) in input of shape {tuple(x.shape)}")


def pad_to_multiple(x: Tensor, spatial: int, temporal: int = 1) -> tuple[Tensor, tuple[int, int, int]]:
    """Replicate-pad ``[B, C, T, H, W]`` at the end of T, H and W up to multiples of the given factors.

    Returns the padded tensor and the original ``(T, H, W)`` for :func:`crop_to`.
    """
    t, h, w = x.shape[-3:]
    pt, ph, pw = (-t) % temporal, (-h) % spatial, (-w) % spatial
    if pt or ph or pw:
        x = F.pad(x, (0, pw, 0, ph, 0, pt), mode="replicate")
    return x, (t, h, w)


def crop_to(x: Tensor, size: tuple[int, int, int]) -> Tensor:
    """Crop the last three dimensions of ``x`` to ``size`` = (T, H, W)."""
    t, h, w = size
    return x[..., :t, :h, :w]


class UNet3DEncoder(nn.Module):
    """3-D U-Net encoder whose first ``n_specific`` levels exist once per modality and the rest are shared.

    Args:
        in_channels: input channels per modality name (e.g. ``{"optical": 10, "radar": 3}``).
        widths: output channels of each level; a max-pooling separates consecutive levels.
        n_specific: number of leading levels that are modality-specific (S4: 2 of 4).
        pool_time: also pool (halve) the time axis between levels (default, as in the paper); ``False``: space only.
        negative_slope: LeakyReLU slope.

    ``forward(x, modality)`` returns the list of level outputs, full resolution first and the bottleneck
    last (level ``i`` is downsampled by ``2**i`` in H and W, and in T when ``pool_time``).
    """

    def __init__(self, in_channels: Mapping[str, int], widths: Sequence[int] = (16, 32, 64, 128), n_specific: int = 2,
                 pool_time: bool = True, negative_slope: float = 0.01) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if not in_channels or any(int(c) < 1 for c in in_channels.values()):
            raise ValueError(f"in_channels must map each modality to a positive channel count, got {dict(in_channels)}")
        if len(widths) < 1 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty list of positive ints, got {widths}")
        if not 0 <= n_specific <= len(widths):
            raise ValueError(f"n_specific must be in 0..{len(widths)} (number of levels), got {n_specific}")
        if n_specific == 0 and len(set(in_channels.values())) > 1:
            raise ValueError("n_specific=0 shares every level, which needs the same in_channels for every modality, "
                             f"got {dict(in_channels)}")
        self.in_channels = {str(k): int(v) for k, v in in_channels.items()}
        self.widths = widths
        self.n_specific = n_specific
        self.pool_time = pool_time
        kernel = (2, 2, 2) if pool_time else (1, 2, 2)
        self.pool = nn.MaxPool3d(kernel, kernel)

        def stages(cin: int, levels: range) -> nn.ModuleList:
            mods = nn.ModuleList()
            for i in levels:
                prev = cin if i == 0 else widths[i - 1]
                mods.append(ConvBlock3d(prev, widths[i], negative_slope))
            return mods

        self.specific = nn.ModuleDict({m: stages(c, range(n_specific)) for m, c in self.in_channels.items()})
        shared_in = next(iter(self.in_channels.values()))
        self.shared = stages(shared_in, range(n_specific, len(widths)))

    @property
    def modalities(self) -> list[str]:
        """Modality names with their own first levels."""
        return list(self.in_channels)

    @property
    def spatial_factor(self) -> int:
        """Total downsampling of H and W at the bottleneck."""
        return 2 ** (len(self.widths) - 1)

    @property
    def temporal_factor(self) -> int:
        """Total downsampling of T at the bottleneck (1 unless ``pool_time``)."""
        return self.spatial_factor if self.pool_time else 1

    def forward(self, x: Tensor, modality: str) -> list[Tensor]:
        """Level outputs ``[B, widths[i], T_i, H_i, W_i]`` for input ``x`` of ``modality``."""
        if modality not in self.specific:
            raise ValueError(f"unknown modality {modality!r}; this encoder has {self.modalities}")
        _check_5d(x, "UNet3DEncoder")
        cin = self.in_channels[modality]
        if x.shape[1] != cin:
            raise ValueError(f"modality {modality!r} expects {cin} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        f, ft = self.spatial_factor, self.temporal_factor
        if x.shape[-1] % f or x.shape[-2] % f or x.shape[-3] % ft:
            raise ValueError(f"UNet3DEncoder needs H, W divisible by {f} and T by {ft}, got {tuple(x.shape[-3:])}; "
                             "use UNet3D or pad_to_multiple")
        feats: list[Tensor] = []
        blocks = list(self.specific[modality]) + list(self.shared)
        for i, block in enumerate(blocks):
            x = block(x if i == 0 else self.pool(x))
            feats.append(x)
        return feats


class UNet3DDecoder(nn.Module):
    """Up path of a 3-D U-Net: transposed convolution (x2), skip concatenation, :class:`ConvBlock3d`.

    Args:
        widths: the encoder's level widths (full resolution first).
        out_channels: channels of a final 1x1x1 convolution per date; ``None`` returns the last
            ``widths[0]``-channel feature map instead.
        pool_time: the encoder pooled time too (default; the transposed convolutions then double T as well).
        negative_slope: LeakyReLU slope.
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 128), out_channels: int | None = None,
                 pool_time: bool = True, negative_slope: float = 0.01) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 1:
            raise ValueError("widths must be non-empty")
        stride = (2, 2, 2) if pool_time else (1, 2, 2)
        out_pad = (1, 1, 1) if pool_time else (0, 1, 1)
        self.widths = widths
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for i in range(len(widths) - 1, 0, -1):
            self.ups.append(nn.ConvTranspose3d(widths[i], widths[i - 1], 3, stride=stride, padding=1,
                                               output_padding=out_pad))
            self.blocks.append(ConvBlock3d(2 * widths[i - 1], widths[i - 1], negative_slope))
        self.out_channels = widths[0] if out_channels is None else int(out_channels)
        self.final = None if out_channels is None else nn.Conv3d(widths[0], int(out_channels), 1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Decode encoder level outputs (full resolution first) to ``[B, out_channels, T, H, W]``."""
        if len(feats) != len(self.widths):
            raise ValueError(f"UNet3DDecoder expects {len(self.widths)} feature maps, got {len(feats)}")
        y = feats[-1]
        for up, block, skip in zip(self.ups, self.blocks, reversed(feats[:-1])):
            y = block(torch.cat([skip, up(y)], dim=1))
        return y if self.final is None else self.final(y)


class UNet3D(nn.Module):
    """Single-modality 3-D U-Net for ``[B, C, T, H, W]`` series with padding to the pooling factor.

    Args:
        in_channels: input channels.
        out_channels: output channels per date (``None``: return ``widths[0]`` features).
        widths: level widths.
        pool_time: pool the time axis too (default; ``False``: space only).
        negative_slope: LeakyReLU slope.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, widths: Sequence[int] = (16, 32, 64, 128),
                 pool_time: bool = True, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.encoder = UNet3DEncoder({"x": in_channels}, widths, n_specific=0, pool_time=pool_time,
                                     negative_slope=negative_slope)
        self.decoder = UNet3DDecoder(widths, out_channels, pool_time, negative_slope)
        self.out_channels = self.decoder.out_channels

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, T, H, W]`` -> ``[B, out_channels, T, H, W]`` (same T, H, W as the input)."""
        _check_5d(x, "UNet3D")
        x, size = pad_to_multiple(x, self.encoder.spatial_factor, self.encoder.temporal_factor)
        return crop_to(self.decoder(self.encoder(x, "x")), size)


def pooled_date_mask(date_mask: Tensor, factor: int, length: int | None = None) -> Tensor:
    """Validity of the time cells of a map pooled by ``factor`` along T (a cell is valid if it covers a real date).

    Args:
        date_mask: ``[B, T]`` boolean, ``True`` for real dates (``False`` for padding appended at the end).
        factor: temporal pooling factor of the map (1: unpooled).
        length: number of time cells of the map (default ``ceil(T / factor)``); cells beyond the input are invalid.

    Returns:
        ``[B, length]`` boolean: cell ``k`` is valid when any of the dates ``k * factor .. (k + 1) * factor - 1``
        is real.
    """
    if date_mask.ndim != 2:
        raise ValueError(f"date_mask must be [B, T], got shape {tuple(date_mask.shape)}")
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    m = date_mask.bool()
    t = m.shape[1]
    cells = -(-t // factor)
    pad = cells * factor - t
    if pad:
        m = torch.cat([m, m.new_zeros(m.shape[0], pad)], dim=1)
    out = m.view(m.shape[0], cells, factor).any(2)
    if length is not None:
        if length >= cells:
            out = torch.cat([out, out.new_zeros(out.shape[0], length - cells)], dim=1)
        else:
            out = out[:, :length]
    return out


def masked_time_mean(x: Tensor, valid: Tensor | None) -> Tensor:
    """Mean over T of ``[B, C, T, H, W]`` restricted to the valid time cells ``[B, T]`` (``None``: all)."""
    if valid is None:
        return x.mean(2)
    if valid.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"time mask of shape {tuple(valid.shape)} does not match [B, T] = {(x.shape[0], x.shape[2])}")
    w = valid.to(x.dtype)
    if bool((w.sum(1) == 0).any()):
        raise ValueError("a sample has no valid date (all-False date_mask)")
    return (x * w[:, None, :, None, None]).sum(2) / w.sum(1)[:, None, None, None]


def masked_time_max(x: Tensor, valid: Tensor | None) -> Tensor:
    """Maximum over T of ``[B, C, T, H, W]`` restricted to the valid time cells ``[B, T]`` (``None``: all)."""
    if valid is None:
        return x.amax(2)
    if valid.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"time mask of shape {tuple(valid.shape)} does not match [B, T] = {(x.shape[0], x.shape[2])}")
    if bool((~valid.bool()).all(1).any()):
        raise ValueError("a sample has no valid date (all-False date_mask)")
    return x.masked_fill(~valid.bool()[:, None, :, None, None], float("-inf")).amax(2)
