"""Learned FSQ time-series tokenizer (section 3.1.2, eqs. 1-2; appendix A.1)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from terratorch_eoplugins.nn.fsq_index import fsq_index_to_levels, fsq_levels_to_index
from terratorch_eoplugins.nn.ts_tokenizers.base import TimeSeriesTokenizer, as_real_tensor

__all__ = ["FSQTokenizer"]


class _ResidualDilatedBlock(nn.Module):
    """``x + Conv1x1(GELU(Conv3_dilated(GELU(x))))``: residual block with a dilated temporal convolution."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.proj = nn.Conv1d(channels, channels, 1)
        self.norm = nn.GroupNorm(1, channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj(F.gelu(self.conv(F.gelu(self.norm(x)))))


class FSQTokenizer(TimeSeriesTokenizer):
    """Learned FSQ tokenizer for univariate series (section 3.1.2, eqs. 1-2; appendix A.1).

    The series is standardised with fitted statistics (mean/std, per variable with ``num_variables``),
    encoded by ``E_theta`` (1-D convs: stem, ``log2(downsample)`` stride-2 stages, each followed by residual
    blocks with ``dilations``) to ``D = len(levels)`` channels at ``L' = L / downsample`` steps, bounded
    by ``tanh`` and rounded to the levels ``c_{d,j} = -1 + 2j/(L_d-1)`` (vector-quantize-pytorch ``FSQ``
    with ``preserve_symmetry=True``, whose levels are exactly these), and decoded by the mirrored
    ``D_phi``. Tokens follow eq. (1), most significant dimension first.

    Args:
        levels: FSQ levels per latent dimension (default ``8-8-8-8``: appendix A.1 "four eight-dimensional
            hypercubes", table 4 best row, table 1 FSQ row).
        hidden_dim: channels of the convolutional encoder/decoder.
        downsample: temporal compression ``L / L'`` (a power of two; 1 = one token per time step).
        dilations: dilation of each residual block per stage (multi-scale temporal context).
        commitment_weight: ``lambda_FSQ`` of eq. (2) (0.1 for time series, appendix A.1).
    """

    kind = "fsq"

    def __init__(self, levels: Sequence[int] = (8, 8, 8, 8), hidden_dim: int = 64, downsample: int = 4,
                 dilations: Sequence[int] = (1, 2, 4), commitment_weight: float = 0.1,
                 num_variables: int | None = None, missing: str = "error", zero_token: bool = False) -> None:
        super().__init__(num_variables, missing, zero_token)
        from vector_quantize_pytorch import FSQ

        levels = [int(v) for v in levels]
        if not levels or any(v < 2 for v in levels):
            raise ValueError(f"levels: expected a non-empty sequence of ints >= 2, got {levels!r}")
        if downsample < 1 or downsample & (downsample - 1):
            raise ValueError(f"downsample: expected a power of two >= 1, got {downsample!r}")
        if hidden_dim < 1 or not dilations or any(d < 1 for d in dilations):
            raise ValueError(f"hidden_dim/dilations: expected positive values, got {hidden_dim!r}, {dilations!r}")
        if commitment_weight < 0:
            raise ValueError(f"commitment_weight: expected >= 0, got {commitment_weight!r}")
        self.levels = levels
        self.downsample = int(downsample)
        self.commitment_weight = float(commitment_weight)
        self.config.update(levels=list(levels), hidden_dim=hidden_dim, downsample=downsample,
                           dilations=list(dilations), commitment_weight=commitment_weight)
        d, h = len(levels), hidden_dim
        stages = int(math.log2(self.downsample))
        enc: list[nn.Module] = [nn.Conv1d(1, h, 5, padding=2)]
        for _ in range(stages):
            enc.append(nn.Conv1d(h, h, 4, stride=2, padding=1))
            enc += [_ResidualDilatedBlock(h, r) for r in dilations]
        if stages == 0:
            enc += [_ResidualDilatedBlock(h, r) for r in dilations]
        enc += [nn.GELU(), nn.Conv1d(h, d, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv1d(d, h, 3, padding=1)]
        if stages == 0:
            dec += [_ResidualDilatedBlock(h, r) for r in dilations]
        for _ in range(stages):
            dec += [_ResidualDilatedBlock(h, r) for r in dilations]
            dec.append(nn.ConvTranspose1d(h, h, 4, stride=2, padding=1))
        dec += [nn.GELU(), nn.Conv1d(h, 1, 5, padding=2)]
        self.decoder = nn.Sequential(*dec)
        self.fsq = FSQ(levels=levels, preserve_symmetry=True)
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        v = self.num_stat_rows
        self.register_buffer("mean", torch.zeros(v))
        self.register_buffer("std", torch.ones(v))

    @property
    def codebook_size(self) -> int:
        return int(np.prod(self.levels))

    # -- statistics -------------------------------------------------------------------------------
    def fit(self, x: Tensor | np.ndarray) -> FSQTokenizer:
        """Fit the standardisation statistics (mean, std per variable) on training series; returns ``self``.

        The network itself is trained with :meth:`loss` /
        :func:`~terratorch_eoplugins.nn.ts_tokenizers.training.train_fsq_tokenizer`.
        """
        x = self._check_values(as_real_tensor(x, "fit(x)"), "fit(x)")
        rows, _ = self._to_rows(x, "fit(x)")
        for i in range(rows.shape[0]):
            r = rows[i].reshape(-1).double()
            r = r[~torch.isnan(r)]
            if self.zero_token:
                r = r[r != 0]
            if r.numel() == 0:
                raise ValueError(f"fit(x): variable {i} has no finite values")
            self.mean[i] = r.mean().float()
            self.std[i] = r.std(unbiased=False).clamp(min=1e-6).float() if r.numel() > 1 else 1.0
        self.fitted.fill_(True)
        return self

    def _prepare(self, x: Tensor | np.ndarray, name: str) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
        """Standardised series ``[N*, 1, L]`` (NaN -> 0), its NaN mask and the inverse reshape."""
        self._require_fitted()
        x = self._check_values(as_real_tensor(x, name), name)
        rows, back = self._to_rows(x, name)
        v, n, length = rows.shape
        if length % self.downsample:
            raise ValueError(f"{name}: series length L={length} must be divisible by downsample={self.downsample}")
        rows = rows.to(self.mean.device, torch.float32)
        z = (rows - self.mean.view(-1, 1, 1)) / self.std.view(-1, 1, 1)
        nan = torch.isnan(z)
        z = torch.where(nan, torch.zeros_like(z), z)
        return z.reshape(v * n, 1, length), nan.reshape(v * n, length), back

    def _destandardise(self, y: Tensor, v_rows: int) -> Tensor:
        y = y.reshape(v_rows, -1, y.shape[-1])
        return y * self.std.view(-1, 1, 1) + self.mean.view(-1, 1, 1)

    # -- quantization -----------------------------------------------------------------------------
    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encode standardised ``[N, 1, L]`` -> ``(Z_e, Z_q, tokens)``; ``Z_e = tanh(E_theta(z))`` ``[N, D, L']``.

        ``Z_q`` carries straight-through gradients; ``tokens`` ``[N, L']`` by eq. (1).
        """
        h = self.encoder(z)  # [N, D, L']
        z_e = torch.tanh(h)
        # FSQ(preserve_symmetry) applies tanh itself and rounds to c_{d,j}: pass the pre-tanh latent
        z_q, _ = self.fsq(h.transpose(1, 2))
        z_q = z_q.transpose(1, 2)
        lv = self._levels.view(1, -1, 1).to(z_q.device)
        level_idx = torch.round((z_q.detach() + 1) * (lv - 1) / 2).long()
        tokens = fsq_levels_to_index(level_idx.transpose(1, 2), self.levels)
        return z_e, z_q, tokens

    def codes_from_tokens(self, tokens: Tensor) -> Tensor:
        """Quantized latents ``[..., D, L']`` for data tokens ``[..., L']`` (inverse of eq. 1)."""
        lv = self._levels.to(tokens.device)
        idx = fsq_index_to_levels(tokens, self.levels)  # [..., L', D]
        codes = -1 + 2 * idx.float() / (lv - 1).float()
        return codes.transpose(-1, -2)

    def encode(self, x: Tensor | np.ndarray) -> Tensor:
        """Tokens ``[..., L / downsample]`` (long). With ``missing="null"`` a token whose window holds a NaN is
        ``[NULL]``; with ``zero_token`` a window of exact zeros is ``[ZERO]``."""
        z, nan, back = self._prepare(x, "encode(x)")
        raw = as_real_tensor(x, "encode(x)")
        with torch.no_grad():
            _, _, tokens = self.quantize(z)
        n, length = nan.shape
        win = nan.reshape(n, length // self.downsample, self.downsample)
        if self.zero_token:
            rows, _ = self._to_rows(raw.float(), "encode(x)")
            zero = (rows.reshape(n, -1, self.downsample) == 0).all(-1).to(tokens.device)
            tokens = torch.where(zero, torch.full_like(tokens, self.zero_id), tokens)
        tokens = torch.where(win.any(-1), torch.full_like(tokens, self.null_id), tokens)
        v = self.num_stat_rows
        return back(tokens.reshape(v, -1, tokens.shape[-1])).to(raw.device)

    def decode(self, tokens: Tensor | np.ndarray) -> Tensor:
        """Series ``[..., L' * downsample]`` (float32) from tokens ``[..., L']``; specials as in the module docs."""
        self._require_fitted()
        tokens = self._check_tokens(tokens)
        rows, back = self._to_rows(tokens, "decode(tokens)")
        v, n, lq = rows.shape
        flat = rows.reshape(v * n, lq).to(self.mean.device)
        special = flat >= self.codebook_size
        codes = self.codes_from_tokens(flat.clamp(max=self.codebook_size - 1))
        codes = torch.where(special.unsqueeze(1), torch.zeros_like(codes), codes)
        with torch.no_grad():
            y = self.decoder(codes).squeeze(1)  # [N, L]
        y = self._destandardise(y, v).reshape(v * n, -1)
        tok_full = flat.repeat_interleave(self.downsample, dim=1)
        y = self._apply_specials(tok_full, y)
        return back(y.reshape(v, n, -1)).to(tokens.device)

    def loss(self, x: Tensor | np.ndarray) -> dict[str, Tensor]:
        """Eq. (2) on standardised series: ``recon = mean (x - x_hat)^2``, ``commit = mean (Z_e - sg(Z_q))^2``,
        ``loss = recon + lambda_FSQ * commit`` (squared norms averaged per element). Missing values are
        excluded from the reconstruction term."""
        z, nan, _ = self._prepare(x, "loss(x)")
        z_e, z_q, _ = self.quantize(z)
        x_hat = self.decoder(z_q).squeeze(1)
        valid = (~nan).float()
        recon = ((x_hat - z.squeeze(1)) ** 2 * valid).sum() / valid.sum().clamp(min=1)
        commit = F.mse_loss(z_e, z_q.detach())
        return {"loss": recon + self.commitment_weight * commit, "recon": recon, "commit": commit}
