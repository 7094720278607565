"""Time-series tokenizers of the TerraMind time-series fusion paper (Basile et al., 2025, section 3.1).

Three strategies with one API (``fit`` -> ``encode`` -> ``decode``, ``vocab_size``, fitted statistics
stored as buffers so that a tokenizer loads from a checkpoint's ``state_dict``):

* :class:`UniformTokenizer` (section 3.1.1, "Uniform"): ``B`` equal-width bins between the global
  minimum and maximum, edges ``t_j = x_min + j/B (x_max - x_min)``, ``j = 0..B``;
  token ``tau = j - 1`` for ``t_{j-1} <= x < t_j`` (0-based; ``x_max`` goes to the last bin).
* :class:`QuantileTokenizer` (section 3.1.1, "Quantile"): edges at the empirical quantiles
  ``t_j = F^-1(j/B)`` (generalised inverse of the empirical CDF, ``numpy`` method ``inverted_cdf``);
  duplicate edges (e.g. zero-inflated precipitation) are merged, so a variable can have fewer
  than ``B`` bins.
* :class:`FSQTokenizer` (section 3.1.2): a 1-D convolutional encoder with residual, dilated blocks
  maps ``x in R^L`` to ``Z_e in R^{L' x D}``; finite scalar quantization rounds every latent
  dimension to ``L_d`` levels ``c_{d,j} = -1 + 2j/(L_d - 1)``; the level indices become one token by
  the mixed-radix code of eq. (1), ``tau = sum_d i_d prod_{m>d} L_m``; a mirrored decoder
  reconstructs ``x``; the loss is eq. (2), ``||x - x_hat||^2 + lambda_FSQ ||Z_e - sg(Z_q)||^2``.
  Defaults follow appendix A.1 / C.3: levels ``8-8-8-8`` (code dimension 4, 4096 codes, the
  best row of table 4 and the FSQ row of table 1), ``lambda_FSQ = 0.1``, AdamW + cosine schedule +
  gradient clipping (:func:`train_fsq_tokenizer`).

Token layout (appendix A.1 special tokens): data tokens ``0 .. codebook_size - 1`` followed by
``[PAD]``, ``[EOS]``, ``[NULL]`` and ``[ZERO]``; ``vocab_size = codebook_size + 4``. ``[NULL]`` marks
missing values (NaN input with ``missing="null"``; the default ``missing="error"`` rejects NaN), and
``[ZERO]`` marks exact zeros when ``zero_token=True`` (degenerate, zero-inflated variables such as
precipitation). Decoding gives NaN for ``[PAD]``, ``[EOS]`` and ``[NULL]`` and ``0`` for ``[ZERO]``.

Shapes: ``encode`` takes ``[..., L]`` (any leading dimensions); with ``num_variables=V`` the
statistics are fitted per variable along dimension ``-2`` (``[..., V, L]``, e.g. ``[N, V, L]``), as the
paper quantizes "over the empirical range of each weather variable" (appendix A.1). The bin
tokenizers return ``[..., L]`` tokens, the FSQ tokenizer ``[..., L / downsample]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SPECIAL_TOKENS",
    "TS_TOKENIZERS",
    "FSQTokenizer",
    "QuantileTokenizer",
    "TimeSeriesTokenizer",
    "UniformTokenizer",
    "build_ts_tokenizer",
    "fsq_index_to_levels",
    "fsq_levels_to_index",
    "load_ts_tokenizer",
    "save_ts_tokenizer",
    "train_fsq_tokenizer",
]

#: Special tokens of appendix A.1, appended after the data tokens in this order.
SPECIAL_TOKENS = ("[PAD]", "[EOS]", "[NULL]", "[ZERO]")
_MISSING = ("error", "null")


def _as_tensor(x: Tensor | np.ndarray | Sequence[float], name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if not (x.is_floating_point() or x.dtype in (torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"{name}: expected a real-valued tensor or array, got dtype {x.dtype}")
    return x


class TimeSeriesTokenizer(nn.Module):
    """Common base: special tokens, missing-value policy, per-variable layout and fitted flag.

    Args:
        num_variables: ``None`` for one set of statistics over all values, or ``V`` for statistics per
            variable along dimension ``-2`` of the input (``[..., V, L]``).
        missing: ``"error"`` (NaN input raises) or ``"null"`` (NaN becomes ``[NULL]``).
        zero_token: encode exact zeros as ``[ZERO]`` (decoded to exactly 0).
    """

    kind = "base"

    def __init__(self, num_variables: int | None = None, missing: str = "error", zero_token: bool = False) -> None:
        super().__init__()
        if num_variables is not None and (not isinstance(num_variables, int) or num_variables < 1):
            raise ValueError(f"num_variables: expected None or a positive int, got {num_variables!r}")
        if missing not in _MISSING:
            raise ValueError(f"missing: expected one of {_MISSING}, got {missing!r}")
        self.num_variables = num_variables
        self.missing = missing
        self.zero_token = bool(zero_token)
        self.register_buffer("fitted", torch.tensor(False))
        self.config: dict[str, Any] = {"num_variables": num_variables, "missing": missing, "zero_token": zero_token}

    # -- vocabulary -------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        """Number of data tokens (bins or FSQ codes)."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Data tokens plus the four special tokens."""
        return self.codebook_size + len(SPECIAL_TOKENS)

    @property
    def pad_id(self) -> int:
        return self.codebook_size

    @property
    def eos_id(self) -> int:
        return self.codebook_size + 1

    @property
    def null_id(self) -> int:
        return self.codebook_size + 2

    @property
    def zero_id(self) -> int:
        return self.codebook_size + 3

    @property
    def special_ids(self) -> dict[str, int]:
        return {name: self.codebook_size + i for i, name in enumerate(SPECIAL_TOKENS)}

    @property
    def num_stat_rows(self) -> int:
        return self.num_variables or 1

    # -- checks -----------------------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if not bool(self.fitted):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(x) on training series first "
                               "(or load a fitted state_dict)")

    def _to_rows(self, x: Tensor, name: str) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """Reshape ``[..., L]`` (or ``[..., V, L]``) to ``[V', N, L]`` and return the inverse reshape."""
        if x.ndim < 1 or x.shape[-1] == 0:
            raise ValueError(f"{name}: expected a series tensor [..., L] with L >= 1, got shape {tuple(x.shape)}")
        if self.num_variables is None:
            shape = x.shape
            rows = x.reshape(1, -1, shape[-1])
            return rows, lambda y: y.reshape(*shape[:-1], y.shape[-1])
        v = self.num_variables
        if x.ndim < 2 or x.shape[-2] != v:
            raise ValueError(f"{name}: expected [..., V={v}, L] (num_variables={v}), got shape {tuple(x.shape)}")
        shape = x.shape
        rows = x.reshape(-1, v, shape[-1]).transpose(0, 1)  # [V, N, L]

        def back(y: Tensor) -> Tensor:
            return y.transpose(0, 1).reshape(*shape[:-1], y.shape[-1])

        return rows, back

    def _check_values(self, x: Tensor, name: str) -> Tensor:
        """Float copy of ``x``; raise on +-inf, and on NaN unless ``missing="null"``."""
        x = x.to(torch.float64) if x.dtype == torch.float64 else x.float()
        if torch.isinf(x).any():
            raise ValueError(f"{name}: input contains +-inf; expected finite values (NaN only with missing='null')")
        if self.missing == "error" and torch.isnan(x).any():
            raise ValueError(f"{name}: input contains NaN; clean the series or build the tokenizer with "
                             "missing='null' to encode missing values as [NULL]")
        return x

    def _check_tokens(self, tokens: Tensor | np.ndarray) -> Tensor:
        tokens = _as_tensor(tokens, "decode(tokens)")
        if tokens.is_floating_point():
            raise TypeError(f"decode(tokens): expected integer token ids, got dtype {tokens.dtype}")
        tokens = tokens.long()
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"decode(tokens): ids must lie in [0, {self.vocab_size}) (vocab_size), got range "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        return tokens

    def _apply_specials(self, tokens: Tensor, values: Tensor) -> Tensor:
        """Decoded values at special tokens: NaN for [PAD]/[EOS]/[NULL], 0 for [ZERO]."""
        values = torch.where(tokens >= self.codebook_size, torch.full_like(values, float("nan")), values)
        return torch.where(tokens == self.zero_id, torch.zeros_like(values), values)

    def encode(self, x: Tensor | np.ndarray) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, tokens: Tensor | np.ndarray) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.encode(x)

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, vocab_size={self.vocab_size}, num_variables={self.num_variables}"


class _BinTokenizer(TimeSeriesTokenizer):
    """Deterministic binning: per-variable sorted edges ``[V, B+1]`` (merged bins padded with +inf)."""

    def __init__(self, num_bins: int, num_variables: int | None = None, missing: str = "error",
                 zero_token: bool = False) -> None:
        super().__init__(num_variables, missing, zero_token)
        if not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"num_bins: expected a positive int, got {num_bins!r}")
        self.num_bins = num_bins
        self.config["num_bins"] = num_bins
        v = self.num_stat_rows
        self.register_buffer("edges", torch.full((v, num_bins + 1), float("inf"), dtype=torch.float64))
        self.register_buffer("centers", torch.zeros(v, num_bins, dtype=torch.float64))
        self.register_buffer("n_bins", torch.full((v,), num_bins, dtype=torch.long))

    @property
    def codebook_size(self) -> int:
        return self.num_bins

    def _fit_values(self, rows: Tensor) -> list[np.ndarray]:
        vals = []
        for i in range(rows.shape[0]):
            r = rows[i].reshape(-1)
            r = r[~torch.isnan(r)]
            if self.zero_token:
                r = r[r != 0]
            if r.numel() == 0:
                raise ValueError(f"fit(x): variable {i} has no finite{' non-zero' if self.zero_token else ''} values")
            vals.append(r.double().cpu().numpy())
        return vals

    def fit(self, x: Tensor | np.ndarray) -> "_BinTokenizer":
        """Fit the bin edges on training series ``[..., L]`` (``[..., V, L]`` per variable); returns ``self``."""
        x = self._check_values(_as_tensor(x, "fit(x)"), "fit(x)")
        rows, _ = self._to_rows(x, "fit(x)")
        edges = torch.full_like(self.edges, float("inf"))
        n_bins = torch.empty_like(self.n_bins)
        for i, vals in enumerate(self._fit_values(rows)):
            e = self._edges_for(vals)
            edges[i, : len(e)] = torch.from_numpy(e)
            n_bins[i] = max(len(e) - 1, 1)
            if len(e) == 1:  # constant variable: one zero-width bin
                edges[i, 1] = e[0]
        self.edges.copy_(edges)
        self.n_bins.copy_(n_bins)
        self.centers.copy_(self._centers_for(rows))
        self.fitted.fill_(True)
        return self

    def _edges_for(self, vals: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _centers_for(self, rows: Tensor) -> Tensor:
        """Bin midpoints ``(t_{j-1} + t_j) / 2`` (unused padded bins repeat the last valid centre)."""
        c = torch.zeros_like(self.centers)
        for i in range(c.shape[0]):
            k = int(self.n_bins[i])
            e = self.edges[i, : k + 1]
            c[i, :k] = (e[:-1] + e[1:]) / 2
            c[i, k:] = c[i, k - 1]
        return c

    def bin_widths(self) -> Tensor:
        """``[V, B]`` widths ``t_j - t_{j-1}`` (0 for merged/padded bins)."""
        self._require_fitted()
        w = torch.zeros_like(self.centers)
        for i in range(w.shape[0]):
            k = int(self.n_bins[i])
            w[i, :k] = self.edges[i, 1 : k + 1] - self.edges[i, :k]
        return w

    def encode(self, x: Tensor | np.ndarray) -> Tensor:
        """Tokens (``torch.long``, same shape as ``x``): ``tau = j - 1`` for ``t_{j-1} <= x < t_j``.

        Values below ``t_0`` (above ``t_B``) go to the first (last) bin.
        """
        self._require_fitted()
        x = self._check_values(_as_tensor(x, "encode(x)"), "encode(x)")
        rows, back = self._to_rows(x, "encode(x)")
        v, n, length = rows.shape
        flat = rows.reshape(v, n * length).to(self.edges.device, torch.float64)
        nan = torch.isnan(flat)
        safe = torch.where(nan, torch.zeros_like(flat), flat)
        # number of edges t_1..t_B that are <= x  ==  index of the bin [t_{j-1}, t_j) holding x
        tok = torch.searchsorted(self.edges[:, 1:].contiguous(), safe.contiguous(), right=True)
        tok = torch.minimum(tok, (self.n_bins - 1).unsqueeze(1))
        if self.zero_token:
            tok = torch.where(flat == 0, torch.full_like(tok, self.zero_id), tok)
        tok = torch.where(nan, torch.full_like(tok, self.null_id), tok)
        return back(tok.reshape(v, n, length)).to(x.device)

    def decode(self, tokens: Tensor | np.ndarray) -> Tensor:
        """Values (float32) at the bin centres; specials as described in the module docstring."""
        self._require_fitted()
        tokens = self._check_tokens(tokens)
        rows, back = self._to_rows(tokens, "decode(tokens)")
        v, n, length = rows.shape
        flat = rows.reshape(v, n * length).to(self.centers.device)
        data = flat.clamp(max=self.num_bins - 1)
        vals = torch.gather(self.centers, 1, data)
        vals = self._apply_specials(flat, vals)
        return back(vals.reshape(v, n, length)).to(device=tokens.device, dtype=torch.float32)


class UniformTokenizer(_BinTokenizer):
    """Uniform quantization (section 3.1.1): ``B`` equal bins over ``[x_min, x_max]`` of the training data.

    For ``x`` in ``[x_min, x_max]`` decoding to the bin midpoint gives ``|x - x_hat| <= (x_max - x_min) / (2B)``.
    """

    kind = "uniform"

    def _edges_for(self, vals: np.ndarray) -> np.ndarray:
        lo, hi = float(vals.min()), float(vals.max())
        if hi == lo:
            return np.array([lo])
        j = np.arange(self.num_bins + 1, dtype=np.float64)
        e = lo + j / self.num_bins * (hi - lo)
        e[-1] = hi
        return e


class QuantileTokenizer(_BinTokenizer):
    """Quantile quantization (section 3.1.1): edges ``t_j = F^-1(j/B)`` of the empirical CDF, duplicates merged.

    Args:
        num_bins: ``B`` (upper bound on the number of bins; merged edges give fewer).
        reconstruction: ``"midpoint"`` decodes to ``(t_{j-1}+t_j)/2`` (error <= half the bin width);
            ``"mean"`` to the mean of the training values in the bin (lower MSE on skewed data, error <= the
            bin width).
        max_fit_samples: quantiles are computed on at most this many values per variable (random subset,
            ``seed``), since exact quantiles over huge arrays are slow.
    """

    kind = "quantile"

    def __init__(self, num_bins: int, num_variables: int | None = None, missing: str = "error",
                 zero_token: bool = False, reconstruction: str = "midpoint", max_fit_samples: int = 4_000_000,
                 seed: int = 0) -> None:
        super().__init__(num_bins, num_variables, missing, zero_token)
        if reconstruction not in ("midpoint", "mean"):
            raise ValueError(f"reconstruction: expected 'midpoint' or 'mean', got {reconstruction!r}")
        if max_fit_samples < 2:
            raise ValueError(f"max_fit_samples: expected >= 2, got {max_fit_samples}")
        self.reconstruction = reconstruction
        self.max_fit_samples = int(max_fit_samples)
        self.seed = seed
        self.config.update(reconstruction=reconstruction, max_fit_samples=max_fit_samples, seed=seed)

    def _fit_values(self, rows: Tensor) -> list[np.ndarray]:
        vals = super()._fit_values(rows)
        rng = np.random.default_rng(self.seed)
        return [v if len(v) <= self.max_fit_samples else rng.choice(v, self.max_fit_samples, replace=False)
                for v in vals]

    def _edges_for(self, vals: np.ndarray) -> np.ndarray:
        q = np.quantile(vals, np.arange(self.num_bins + 1) / self.num_bins, method="inverted_cdf")
        q[0] = vals.min()
        return np.unique(q)  # sorted, duplicate edges merged

    def _centers_for(self, rows: Tensor) -> Tensor:
        c = super()._centers_for(rows)
        if self.reconstruction == "midpoint":
            return c
        for i, vals in enumerate(self._fit_values(rows)):
            t = torch.from_numpy(vals)
            k = int(self.n_bins[i])
            idx = torch.searchsorted(self.edges[i, 1 : k + 1].contiguous(), t, right=True).clamp(max=k - 1)
            sums = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, t)
            counts = torch.bincount(idx, minlength=k).double()
            c[i, :k] = torch.where(counts > 0, sums / counts.clamp(min=1), c[i, :k])
            c[i, k:] = c[i, k - 1]
        return c


# --------------------------------------------------------------------------------------------------
# Learned FSQ tokenizer (section 3.1.2)
# --------------------------------------------------------------------------------------------------
def fsq_levels_to_index(level_idx: Tensor, levels: Sequence[int]) -> Tensor:
    """Mixed-radix token of eq. (1): ``tau = sum_d i_d prod_{m>d} L_m`` for level indices ``[..., D]``."""
    lv = torch.as_tensor(list(levels), dtype=torch.long, device=level_idx.device)
    if level_idx.shape[-1] != len(lv):
        raise ValueError(f"level indices: expected last dimension {len(lv)} (len(levels)), got {level_idx.shape[-1]}")
    # radix of dimension d is prod_{m>d} L_m (the last dimension is the least significant)
    radix = torch.ones_like(lv)
    if len(lv) > 1:
        radix[:-1] = torch.flip(torch.cumprod(torch.flip(lv[1:], [0]), 0), [0])
    return (level_idx.long() * radix).sum(-1)


def fsq_index_to_levels(tokens: Tensor, levels: Sequence[int]) -> Tensor:
    """Inverse of :func:`fsq_levels_to_index`: tokens ``[...]`` -> level indices ``[..., D]``."""
    lv = torch.as_tensor(list(levels), dtype=torch.long, device=tokens.device)
    out = []
    rest = tokens.long()
    for d in range(len(lv) - 1, -1, -1):
        out.append(rest % lv[d])
        rest = torch.div(rest, lv[d], rounding_mode="floor")
    return torch.stack(out[::-1], -1)


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
    def fit(self, x: Tensor | np.ndarray) -> "FSQTokenizer":
        """Fit the standardisation statistics (mean, std per variable) on training series; returns ``self``.

        The network itself is trained with :meth:`loss` / :func:`train_fsq_tokenizer`.
        """
        x = self._check_values(_as_tensor(x, "fit(x)"), "fit(x)")
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
        x = self._check_values(_as_tensor(x, name), name)
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
        raw = _as_tensor(x, "encode(x)")
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


# --------------------------------------------------------------------------------------------------
# Metrics, training, factory and (de)serialisation
# --------------------------------------------------------------------------------------------------
def train_fsq_tokenizer(tokenizer: FSQTokenizer, series: Tensor | np.ndarray, steps: int = 500,
                        batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 0.01, grad_clip: float = 1.0,
                        warmup_steps: int = 0, seed: int = 0, log_every: int = 0) -> list[float]:
    """Train an FSQ tokenizer on series ``[N, L]`` (``[N, V, L]`` with ``num_variables``) with AdamW, a cosine
    schedule and gradient clipping (appendix A.1). Fits the statistics first if needed; returns the loss per step."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    series = _as_tensor(series, "series").float()
    if series.ndim < 2:
        raise ValueError(f"series: expected [N, L] or [N, V, L], got shape {tuple(series.shape)}")
    if not bool(tokenizer.fitted):
        tokenizer.fit(series)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(tokenizer.parameters(), lr=lr, weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    tokenizer.train()
    history = []
    for step in range(steps):
        idx = torch.randint(0, series.shape[0], (min(batch_size, series.shape[0]),), generator=gen)
        out = tokenizer.loss(series[idx])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        nn.utils.clip_grad_norm_(tokenizer.parameters(), grad_clip)
        opt.step()
        sched.step()
        history.append(float(out["loss"].detach()))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {history[-1]:.5f}  recon {float(out['recon'].detach()):.5f}  "
                  f"commit {float(out['commit'].detach()):.5f}")
    tokenizer.eval()
    return history


TS_TOKENIZERS: dict[str, type[TimeSeriesTokenizer]] = {
    "uniform": UniformTokenizer,
    "quantile": QuantileTokenizer,
    "fsq": FSQTokenizer,
}


def build_ts_tokenizer(kind: str, **kwargs: Any) -> TimeSeriesTokenizer:
    """Build an (unfitted) tokenizer: ``kind`` in ``uniform`` / ``quantile`` (``num_bins=...``) or ``fsq``."""
    if kind not in TS_TOKENIZERS:
        raise ValueError(f"build_ts_tokenizer: unknown kind {kind!r}; expected one of {sorted(TS_TOKENIZERS)}")
    if kind in ("uniform", "quantile") and "num_bins" not in kwargs:
        raise ValueError(f"build_ts_tokenizer({kind!r}): num_bins is required")
    return TS_TOKENIZERS[kind](**kwargs)


def save_ts_tokenizer(tokenizer: TimeSeriesTokenizer, path: str | Path) -> Path:
    """Save ``{"kind", "config", "state_dict"}`` so that :func:`load_ts_tokenizer` rebuilds the tokenizer."""
    if not bool(tokenizer.fitted):
        raise RuntimeError(f"save_ts_tokenizer: {type(tokenizer).__name__} is not fitted")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"kind": tokenizer.kind, "config": dict(tokenizer.config), "state_dict": tokenizer.state_dict()}, path)
    return path


def load_ts_tokenizer(path: str | Path, map_location: str | torch.device = "cpu") -> TimeSeriesTokenizer:
    """Load a tokenizer written by :func:`save_ts_tokenizer` (evaluation mode)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"time-series tokenizer checkpoint not found: {str(path)!r}; train one with "
                                "`python -m terratorch_eoplugins.tasks.tsfusion_tokenizers` or fit a deterministic one")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)  # plain dict of tensors + config
    if not isinstance(ckpt, dict) or not {"kind", "config", "state_dict"} <= set(ckpt):
        raise ValueError(f"{str(path)!r}: expected a dict with keys kind/config/state_dict (save_ts_tokenizer)")
    tok = build_ts_tokenizer(ckpt["kind"], **ckpt["config"])
    tok.load_state_dict(ckpt["state_dict"])
    return tok.eval()
