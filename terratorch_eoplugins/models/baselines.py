"""Convolutional baselines of the LIANet supplement's tables: U-Net (17.3M) and Micro U-Net (0.49M).

Both are the classic U-Net of Ronneberger et al. (double 3x3 conv + BatchNorm + ReLU blocks, max-pool
down, bilinear up + skip concatenation), differing in width and depth. ``unet_classic`` (width 64,
4 poolings, bilinear) has 17.3M parameters for 12 input bands, the size the supplement reports for its
U-Net; ``micro_unet`` (width 22, 3 poolings) has 0.51M, the closest integer width to its 0.49M Micro
U-Net budget (the supplement gives only the parameter count, so depth and width were chosen to meet it).

Registered as terratorch backbones: ``forward(x)`` returns one full-resolution feature map, so the
usual pairing is ``decoder: IdentityDecoder`` plus terratorch's segmentation or regression head.
Multi-temporal input ``[B, C, T, H, W]`` is accepted with ``backbone_use_temporal: true`` (terratorch's
``TemporalWrapper``) or with ``time_to_channels=True``, which folds T into the channels.
"""

from __future__ import annotations

from typing import Any

import torch
from terratorch.registry import TERRATORCH_BACKBONE_REGISTRY
from torch import Tensor, nn

from terratorch_eoplugins.errors import check_model_input
from terratorch_eoplugins.models.pretrained import check_builder_kwargs

REGISTERED = {"backbone": ["unet_classic", "micro_unet"]}


class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, mid: int | None = None) -> None:
        mid = mid or cout
        super().__init__(
            nn.Conv2d(cin, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = _DoubleConv(cin, cout, cin // 2)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up(x)
        dy, dx = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        x = nn.functional.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class EOUNet(nn.Module):
    """Classic bilinear U-Net returning its last decoder feature map.

    Args:
        in_channels: Input bands (times T when ``time_to_channels``).
        width: Channels of the first stage; stage ``i`` has ``width * 2**i``.
        depth: Number of 2x poolings (input H, W need not be divisible: skips are padded).
        time_to_channels: Accept ``[B, C, T, H, W]`` and fold time into channels.
    """

    def __init__(self, in_channels: int = 12, width: int = 64, depth: int = 4, time_to_channels: bool = False) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.in_channels = in_channels
        self.time_to_channels = time_to_channels
        widths = [width * 2**i for i in range(depth + 1)]
        self.inc = _DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList()
        for i in range(1, depth + 1):
            cout = widths[i] // 2 if i == depth else widths[i]  # bilinear variant halves the bottleneck
            self.downs.append(nn.Sequential(nn.MaxPool2d(2), _DoubleConv(widths[i - 1], cout)))
        self.ups = nn.ModuleList()
        for i in range(depth, 0, -1):
            cout = widths[i - 1] // 2 if i > 1 else widths[0]
            self.ups.append(_Up(widths[i], cout))
        self.out_channels = [widths[0]]
        #: the smallest height and width the network takes: each of the ``depth`` poolings halves the map
        self.min_input_size = 2**depth

    def forward(self, x: Tensor, **kwargs: Any) -> list[Tensor]:
        if x.ndim == 5:
            if not self.time_to_channels:
                raise ValueError(f"EOUNet got a 5-D input {tuple(x.shape)}; set time_to_channels=True or use_temporal")
            b, c, t, h, w = x.shape
            x = x.reshape(b, c * t, h, w)
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"EOUNet expects {self.in_channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        check_model_input(x, f"EOUNet (depth {len(self.downs)})", min_size=self.min_input_size)
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return [y]


#: keyword arguments of the U-Net baseline builders (others are errors)
_BUILDER_ARGS = ("in_channels", "width", "depth", "time_to_channels", "pretrained")


@TERRATORCH_BACKBONE_REGISTRY.register
def unet_classic(in_channels: int = 12, width: int = 64, depth: int = 4, time_to_channels: bool = False,
                 pretrained: bool = False, **kwargs: Any) -> EOUNet:
    """U-Net baseline (17.3M parameters at 12 bands): width 64, 4 poolings. Trained from scratch only."""
    if pretrained:
        raise ValueError("unet_classic has no pretrained weights; set pretrained=False")
    check_builder_kwargs("unet_classic", kwargs, _BUILDER_ARGS)
    return EOUNet(in_channels, width, depth, time_to_channels)


@TERRATORCH_BACKBONE_REGISTRY.register
def micro_unet(in_channels: int = 12, width: int = 22, depth: int = 3, time_to_channels: bool = False,
               pretrained: bool = False, **kwargs: Any) -> EOUNet:
    """Micro U-Net baseline (0.51M parameters at 12 bands, the paper's 0.49M budget): width 22, 3 poolings."""
    if pretrained:
        raise ValueError("micro_unet has no pretrained weights; set pretrained=False")
    check_builder_kwargs("micro_unet", kwargs, _BUILDER_ARGS)
    return EOUNet(in_channels, width, depth, time_to_channels)
