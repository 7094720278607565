"""Deterministic bin tokenizers (section 3.1.1): uniform and quantile bins, fitted per variable."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from terratorch_eoplugins.nn.ts_tokenizers.base import TimeSeriesTokenizer, as_real_tensor

__all__ = ["QuantileTokenizer", "UniformTokenizer"]


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

    def fit(self, x: Tensor | np.ndarray) -> _BinTokenizer:
        """Fit the bin edges on training series ``[..., L]`` (``[..., V, L]`` per variable); returns ``self``."""
        x = self._check_values(as_real_tensor(x, "fit(x)"), "fit(x)")
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
        x = self._check_values(as_real_tensor(x, "encode(x)"), "encode(x)")
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
        e = np.unique(q)  # sorted, duplicate edges merged
        if len(e) >= 2 and (q == e[-1]).sum() >= 2:
            # An atom at the maximum (>= 1/B of the values, e.g. relative humidity capped at 100 %): the merged top
            # edges would leave one closed last bin [t_{B-2}, x_max] holding the atom together with the values
            # below it, decoded to neither. Bins are half-open [t_{j-1}, t_j), so the atom gets its own zero-width
            # last bin [x_max, x_max] (decoded exactly), as an atom at the minimum gets the first bin.
            e = np.append(e, e[-1])
        return e

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
