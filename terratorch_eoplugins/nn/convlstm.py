"""ConvLSTM (Shi et al., 2015) and DUNIA's multi-temporal ConvLSTM U-Net autoencoder (paper section 3.3, appendix A.3).

* :class:`ConvLSTMCell`: ``i, f, o, g = conv([x_t, h_{t-1}])`` (one 3x3 convolution producing the four gates),
  ``c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)``, ``h_t = sigmoid(o) * tanh(c_t)``; zero initial state.
* :class:`ConvLSTM`: stacked cells run over ``[B, C, T, H, W]``; returns the last layer's hidden states
  for every date ``[B, hidden, T, H, W]`` (batch-first, no "permute result never assigned" pitfall).
* :class:`ConvLSTMBlock`: the paper's replacement of a U-Net double conv: a two-layer ConvLSTM followed by
  BatchNorm and ReLU.
* :class:`MultiTemporalAE`: four stages (``D_p, 2 D_p, 4 D_p, 8 D_p`` channels at ``H, H/2, H/4, H/8``);
  down-sampling by a strided ``Conv3d`` (kernel ``1x3x3``, stride ``1x2x2``: spatial only), up-sampling by
  trilinear interpolation (x2 in space, time untouched) followed by a ``Conv3d`` (kernel ``1x3x3``), skip
  concatenation and a ConvLSTM block. Decoder stage ``d`` gives ``X_d`` ``[B, D_p 2^(d-1), T, H/2^(d-1), W/2^(d-1)]``
  (``X_4`` the bottleneck); a final ``Conv3d`` (``1x3x3``) reconstructs ``M_hat [B, C, T, H, W]``; the
  temporal average of ``X_d`` is ``O^T_d``. ``X_d`` has ``D_p 2^(d-1)`` channels (the widths of the U-Net
  stage), matching the channels of the pre-trained model's decoder level ``O^H_d`` it is aligned with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvLSTM", "ConvLSTMBlock", "ConvLSTMCell", "MultiTemporalAE"]


class ConvLSTMCell(nn.Module):
    """One ConvLSTM cell with a ``kernel_size`` convolution on ``[x_t, h_{t-1}]`` producing the 4 gates."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"ConvLSTMCell: kernel_size must be odd (same padding), got {kernel_size}")
        self.hidden_channels = hidden_channels
        self.gates = nn.Conv2d(
            in_channels + hidden_channels, 4 * hidden_channels, kernel_size, padding=kernel_size // 2
        )

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """``x [B, C, H, W]``, ``(h, c)`` -> new ``(h, c)``."""
        if state is None:
            z = x.new_zeros(x.shape[0], self.hidden_channels, *x.shape[-2:])
            state = (z, z)
        h, c = state
        i, f, o, g = self.gates(torch.cat([x, h], 1)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class ConvLSTM(nn.Module):
    """Stacked ConvLSTM over ``[B, C, T, H, W]`` -> last layer's hidden states ``[B, hidden, T, H, W]``."""

    def __init__(self, in_channels: int, hidden_channels: int, num_layers: int = 2, kernel_size: int = 3) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"ConvLSTM: num_layers must be >= 1, got {num_layers}")
        self.cells = nn.ModuleList(
            [
                ConvLSTMCell(in_channels if i == 0 else hidden_channels, hidden_channels, kernel_size)
                for i in range(num_layers)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 5:
            raise ValueError(f"ConvLSTM expects [B, C, T, H, W], got shape {tuple(x.shape)}")
        if x.shape[2] < 1:
            raise ValueError("ConvLSTM got an empty sequence (T = 0)")
        seq = list(x.unbind(2))
        for cell in self.cells:
            state = None
            out = []
            for xt in seq:
                state = cell(xt, state)
                out.append(state[0])
            seq = out
        return torch.stack(seq, 2)


class ConvLSTMBlock(nn.Module):
    """Two-layer ConvLSTM + BatchNorm3d + ReLU (appendix A.3)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int = 2, kernel_size: int = 3) -> None:
        super().__init__()
        self.lstm = ConvLSTM(in_channels, out_channels, num_layers, kernel_size)
        self.norm = nn.BatchNorm3d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(self.lstm(x)))


class MultiTemporalAE(nn.Module):
    """DUNIA's multi-temporal image autoencoder: ConvLSTM U-Net over ``M [B, C, T, H, W]`` (appendix A.3).

    Args:
        in_channels: ``C`` (paper: 14, S1 + S2).
        out_dim: ``D_p`` (channels of ``X_1``; stage ``d`` has ``D_p * 2^(d-1)``).
        num_levels: U-Net stages (paper: 4). ``H`` and ``W`` must be divisible by ``2^(num_levels-1)``.
        lstm_layers: ConvLSTM layers per block (paper: 2).
    """

    def __init__(self, in_channels: int = 14, out_dim: int = 64, num_levels: int = 4, lstm_layers: int = 2) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"MultiTemporalAE: num_levels must be >= 1, got {num_levels}")
        self.in_channels, self.num_levels = in_channels, num_levels
        self.widths = [out_dim * 2 ** d for d in range(num_levels)]
        w = self.widths
        self.enc = nn.ModuleList([ConvLSTMBlock(in_channels if d == 0 else w[d], w[d], lstm_layers)
                                  for d in range(num_levels)])
        # down[d]: level d -> level d+1 resolution and width (strided Conv3d on space)
        self.down = nn.ModuleList([nn.Conv3d(w[d], w[d + 1], (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
                                   for d in range(num_levels - 1)])
        # up[d]: level d+1 -> level d (trilinear x2 in space + Conv3d), then block on [up, skip]
        self.up = nn.ModuleList(
            [nn.Conv3d(w[d + 1], w[d], (1, 3, 3), padding=(0, 1, 1)) for d in range(num_levels - 1)]
        )
        self.dec = nn.ModuleList([ConvLSTMBlock(2 * w[d], w[d], lstm_layers) for d in range(num_levels - 1)])
        self.out = nn.Conv3d(w[0], in_channels, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, m: Tensor) -> dict[str, Tensor | list[Tensor]]:
        """``M [B, C, T, H, W]`` -> ``{"recon": M_hat, "features": [X_1..X_L], "pooled": [O^T_1..O^T_L]}``."""
        if m.ndim != 5 or m.shape[1] != self.in_channels:
            raise ValueError(f"MultiTemporalAE expects [B, {self.in_channels}, T, H, W], got shape {tuple(m.shape)}")
        f = 2 ** (self.num_levels - 1)
        if m.shape[-2] % f or m.shape[-1] % f:
            raise ValueError(f"MultiTemporalAE: H and W must be divisible by {f}, got {tuple(m.shape[-2:])}")
        skips = []
        x = m
        for d in range(self.num_levels):
            x = self.enc[d](x)
            skips.append(x)
            if d < self.num_levels - 1:
                x = self.down[d](x)
        feats: list[Tensor] = [None] * self.num_levels  # type: ignore[list-item]
        feats[-1] = x
        for d in range(self.num_levels - 2, -1, -1):
            t, h, w = skips[d].shape[2:]
            up = self.up[d](F.interpolate(x, size=(t, h, w), mode="trilinear", align_corners=False))
            x = self.dec[d](torch.cat([up, skips[d]], 1))
            feats[d] = x
        return {"recon": self.out(feats[0]), "features": feats, "pooled": [x_d.mean(2) for x_d in feats]}
