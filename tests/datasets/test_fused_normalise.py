"""The fused read kernel equals numpy's ``(float32(x) - mean) / std`` bit for bit and finds numpy's value range."""

from __future__ import annotations

import numpy as np
import pytest

from terratorch_eoplugins.datasets import _fused

DTYPES = [np.int16, np.uint16, np.int32, np.uint8, np.int8, np.float16, np.float32, np.float64]


def test_kernel_is_compiled():
    """numba is a dependency: the readers must not silently run the slower numpy fallback."""
    assert _fused.numba is not None and _fused._kernel is not None


def _source(dtype, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    if np.dtype(dtype).kind == "f":
        return rng.normal(0, 3000 if dtype != np.float16 else 300, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -30000), min(info.max, 30000), shape, endpoint=True).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("normalise", [True, False])
def test_convert_dates_matches_numpy(dtype, fused, normalise):
    rng = np.random.default_rng(0)
    n, c, p, t, j0 = 3, 4, 257, 6, 2
    src = _source(dtype, rng, (n, c, p))
    mean = rng.normal(500, 300, c).astype(np.float32)
    std = rng.uniform(0.3, 900, c).astype(np.float32)
    out = np.full((c, t, p), np.nan, np.float32)
    lo, hi = _fused.convert_dates(src, out, j0, (mean, std) if normalise else None, True, fused=fused)
    # independent: per element, float32 cast, then float32 subtraction and float32 division
    want = np.empty((c, n, p), np.float32)
    for ch in range(c):
        x = src[:, ch].astype(np.float32)
        want[ch] = np.divide(np.subtract(x, mean[ch], dtype=np.float32), std[ch], dtype=np.float32) if normalise else x
    assert want.tobytes() == out[:, j0:j0 + n].tobytes()
    assert np.isnan(out[:, :j0]).all() and np.isnan(out[:, j0 + n:]).all()
    assert (lo, hi) == (np.float32(src.min()), np.float32(src.max()))
    assert _fused.convert_dates(src, out, j0, None, False, fused=fused) is None


@pytest.mark.parametrize("fused", [True, False])
def test_float32_range_edge_values(fused):
    """Negative values, signed zeros and subnormals order as values; NaN or +-inf anywhere gives a NaN range."""
    vals = np.array([-0.0, 0.0, -1e-45, 1e-45, -3.5, 2.25, -1e30, 7e29], np.float32)
    src = np.tile(vals, (2, 1, 1))
    out = np.empty((1, 2, vals.size), np.float32)
    lo, hi = _fused.convert_dates(src, out, 0, None, True, fused=fused)
    assert (lo, hi) == (np.float32(-1e30), np.float32(7e29))
    only_neg = -np.abs(src) - 1
    assert _fused.convert_dates(only_neg, out, 0, None, True, fused=fused) == (np.float32(-1e30 - 1),
                                                                               np.float32(-1))
    for bad in (np.nan, np.inf, -np.inf):
        s = src.copy()
        s[1, 0, 3] = bad
        lo, hi = _fused.convert_dates(s, out, 0, None, True, fused=fused)
        assert np.isnan(lo) and np.isnan(hi)
