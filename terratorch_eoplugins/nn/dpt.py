"""DPT-style hierarchical decoder of DUNIA (paper section 3.1, appendix A.1; after Ranftl et al., 2021).

The decoder turns the token maps tapped after each of the encoder's four transformer blocks (``[B, D, H/P, W/P]``)
into four feature maps ``O_d`` (``d = 1..4``, ``d = 1`` the last decoder stage) of shape
``[B, D_p * 2^(d-1), H / 2^(d-1), W / 2^(d-1)]``, then two neighborhood-attention layers refine ``O_1``:

* **Reassemble** (per level): a 1x1 convolution ``D -> D_p * 2^(d-1)``, then a resampling from ``H/P`` to
  ``H/2^(d-1)``: a transposed convolution (kernel = stride = ``P / 2^(d-1)``) when ``2^(d-1) < P``, a strided
  3x3 convolution (stride ``2^(d-1) / P``) when ``2^(d-1) > P``, a 3x3 convolution when equal. Shallow
  encoder blocks feed the high-resolution levels, as in DPT: level ``d`` reads transformer block ``d``.
* **Fusion** (deep to shallow): ``O_4 = R_4``; for ``d = 3, 2, 1``: ``O_{d+1}`` is upsampled bilinearly x2 and
  refined by two 3x3 Conv-BatchNorm-ReLU to ``D_p * 2^(d-1)`` channels, concatenated with ``R_d`` and merged
  by a 1x1 convolution ("a final 1x1 convolution ensures that the output dimension matches D_p").
* **Neighborhood attention**: two :class:`~terratorch_eoplugins.nn.neighborhood_attention.NeighborhoodAttention2D`
  layers (window 19, clamped to the map size) on ``O_1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from terratorch_eoplugins.nn.neighborhood_attention import NeighborhoodAttention2D

__all__ = ["ConvBNReLU", "DPTDecoder", "Reassemble"]


class ConvBNReLU(nn.Sequential):
    """3x3 convolution + BatchNorm + ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Reassemble(nn.Module):
    """1x1 projection of a token map to ``out_channels`` and resampling by ``scale`` (a power of two, or 1/2^k)."""

    def __init__(self, dim: int, out_channels: int, patch_size: int, level: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, out_channels, 1)
        stride = 2 ** (level - 1)
        if stride < patch_size:
            f = patch_size // stride
            self.resample: nn.Module = nn.ConvTranspose2d(out_channels, out_channels, f, stride=f)
        elif stride > patch_size:
            f = stride // patch_size
            self.resample = nn.Conv2d(out_channels, out_channels, 3, stride=f, padding=1)
        else:
            self.resample = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.resample(self.proj(x))


class DPTDecoder(nn.Module):
    """Four-level DPT-style decoder + two NA layers: token maps -> ``[O_1, O_2, O_3, O_4]``.

    Args:
        dim: encoder token dimension ``D``.
        out_dim: ``D_p`` (channels of ``O_1``; level ``d`` has ``D_p * 2^(d-1)``).
        patch_size: ``P`` (a power of two >= 1).
        num_levels: decoder levels (paper: 4; as many encoder taps are needed).
        na_layers: neighborhood-attention layers on ``O_1`` (paper: 2).
        na_kernel: NA window (paper: 19; clamped to the map size).
        na_heads: NA heads.
        dropout: dropout inside the NA layers.
    """

    def __init__(self, dim: int, out_dim: int = 64, patch_size: int = 8, num_levels: int = 4, na_layers: int = 2,
                 na_kernel: int = 19, na_heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if patch_size < 1 or patch_size & (patch_size - 1):
            raise ValueError(f"DPTDecoder: patch_size must be a power of two, got {patch_size}")
        if num_levels < 1:
            raise ValueError(f"DPTDecoder: num_levels must be >= 1, got {num_levels}")
        self.num_levels, self.out_dim = num_levels, out_dim
        self.channels = [out_dim * 2 ** (d - 1) for d in range(1, num_levels + 1)]  # level 1..L
        self.reassemble = nn.ModuleList([Reassemble(dim, c, patch_size, d + 1) for d, c in enumerate(self.channels)])
        # refine[d] upsamples level d+2 -> level d+1 (0-based index d for level d+1)
        self.refine = nn.ModuleList([nn.Sequential(ConvBNReLU(self.channels[d + 1], self.channels[d]),
                                                   ConvBNReLU(self.channels[d], self.channels[d]))
                                     for d in range(num_levels - 1)])
        self.merge = nn.ModuleList(
            [nn.Conv2d(2 * self.channels[d], self.channels[d], 1) for d in range(num_levels - 1)]
        )
        self.na = nn.ModuleList([NeighborhoodAttention2D(out_dim, na_heads, na_kernel, dropout=dropout)
                                 for _ in range(na_layers)])

    def forward(self, taps: Sequence[Tensor]) -> list[Tensor]:
        """Encoder taps (shallow to deep, ``[B, D, H/P, W/P]`` each) -> ``[O_1, ..., O_L]`` (full resolution first)."""
        if len(taps) != self.num_levels:
            raise ValueError(f"DPTDecoder expects {self.num_levels} encoder taps, got {len(taps)}")
        # level d (1-based) reads tap d (shallow taps -> high resolution)
        r = [self.reassemble[d](taps[d]) for d in range(self.num_levels)]
        out: list[Tensor] = [None] * self.num_levels  # type: ignore[list-item]
        out[-1] = r[-1]
        for d in range(self.num_levels - 2, -1, -1):
            up = F.interpolate(out[d + 1], size=r[d].shape[-2:], mode="bilinear", align_corners=False)
            out[d] = self.merge[d](torch.cat([self.refine[d](up), r[d]], 1))
        o1 = out[0]
        for layer in self.na:
            o1 = layer(o1)
        out[0] = o1
        return out
