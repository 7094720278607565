"""Fused read kernel of the array readers: cast to float32, standardise and find the raw value range in one pass.

With numpy, a normalised PASTIS sample needs a buffered cast inside a subtraction, a division, and a minimum and a
maximum pass for the value checks: four passes over the data where torchgeo's reader makes one (its cast). The
numba kernel does all of it per row of pixels while the row is in cache, with the same IEEE float32 operations in
the same order as numpy (no fast-math), so its values are bit-identical. The range is found on integer keys (the
values themselves for integer dtypes; for float32 the bit patterns mapped to order-preserving integers), which
vectorise without fast-math and show NaN/inf through the exponent bits. Without numba, or for dtypes the kernel
does not take (float16, float64), numpy's passes run. ``benchmarks/loader_throughput.py`` measures the effect
against torchgeo's reader.
"""

from __future__ import annotations

import numpy as np

try:  # numba is a dependency; the fallback keeps the readers working where it cannot be imported
    import numba
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None

#: integer source dtypes the kernel takes (their values are their own range keys)
_INT_DTYPES = frozenset(np.dtype(d) for d in (np.int16, np.uint16, np.int32, np.uint8, np.int8))  # fit int32
_F32 = np.dtype(np.float32)
#: float32 bit patterns: flipping the 31 low bits of negative patterns (as int32) orders them like the values
_F32_FLIP = 0x7FFFFFFF
_F32_EXP = 0x7F800000


def _convert_loop(src, keys, dates, out, j0, mean, std, scale, want_range, flip, exp_mask, rng):  # pragma: no cover
    # compiled by numba (covered through it); see convert_dates for the arguments. The range keys stay int32 (every
    # step cast back: numba widens int32 arithmetic to int64, which halves the vector width)
    c = src.shape[1]
    hw = src.shape[2]
    kmin = np.int32(rng[0])
    kmax = np.int32(rng[1])
    emax = np.int32(rng[2])
    shift = np.int32(31)
    for t in range(dates.size):
        d = dates[t]
        for ch in range(c):
            x = src[d, ch]
            o = out[ch, j0 + t]
            if scale:
                m = mean[ch]
                s = std[ch]
                for p in range(hw):
                    o[p] = (np.float32(x[p]) - m) / s
            else:
                for p in range(hw):
                    o[p] = np.float32(x[p])
            if want_range:
                kk = keys[d, ch]
                for p in range(hw):
                    b = np.int32(kk[p])
                    k = np.int32(b ^ np.int32(np.int32(b >> shift) & flip))
                    kmin = k if k < kmin else kmin
                    kmax = k if k > kmax else kmax
                    e = np.int32(b & exp_mask)
                    emax = e if e > emax else emax
    rng[0] = kmin
    rng[1] = kmax
    rng[2] = emax


_kernel = numba.njit(cache=True, nogil=True, boundscheck=False)(_convert_loop) if numba is not None else None


def _from_key(k: int, dtype: np.dtype) -> np.float32:
    if dtype == _F32:
        bits = k ^ (_F32_FLIP if k < 0 else 0)
        return np.array([bits], np.int32).view(np.float32)[0]
    return np.float32(k)


def convert_dates(src: np.ndarray, out: np.ndarray, j0: int, norm: tuple[np.ndarray, np.ndarray] | None,
                  want_range: bool, fused: bool = True,
                  dates: np.ndarray | None = None) -> tuple[np.float32, np.float32] | None:
    """Write ``float32(src[d, c])`` (standardised: ``(float32(src[d, c]) - mean[c]) / std[c]``) to ``out[c, j0+t]``
    for the ``t``-th date ``d`` of ``dates`` (default: every date of ``src``).

    Args:
        src: ``T' x C x P`` raw values (rows of ``P`` pixels), any real dtype.
        out: float32 C-contiguous ``C x T x P`` output, ``T >= j0 + len(dates)``.
        j0: first output date.
        norm: float32 per-channel ``(mean, std)``, or ``None`` for the plain cast.
        want_range: also return the raw minimum and maximum as float32 (NaN when ``src`` holds NaN or inf).
        fused: use the numba kernel when it is available and takes ``src``'s dtype (else numpy's passes).
        dates: int64 indices into ``src``'s first axis (the range covers only these dates).

    Returns:
        ``(minimum, maximum)`` when ``want_range``, else ``None``.
    """
    dtype = src.dtype
    kernel_ok = dtype in _INT_DTYPES or dtype == _F32
    if (fused and _kernel is not None and kernel_ok and src.flags.c_contiguous and out.flags.c_contiguous
            and out.dtype == _F32):
        keys = src.view(np.int32) if dtype == _F32 else src
        flip, exp_mask = (np.int32(_F32_FLIP), np.int32(_F32_EXP)) if dtype == _F32 else (np.int32(0), np.int32(0))
        rng = np.array([np.iinfo(np.int32).max, np.iinfo(np.int32).min, 0], np.int64)
        mean, std = norm if norm is not None else (np.zeros(1, np.float32), np.ones(1, np.float32))
        sel = np.arange(src.shape[0], dtype=np.int64) if dates is None else np.asarray(dates, np.int64)
        _kernel(src, keys, sel, out, j0, mean, std, norm is not None, want_range, flip, exp_mask, rng)
        if not want_range:
            return None
        if exp_mask and rng[2] == exp_mask:  # an all-ones exponent: NaN or inf
            return np.float32(np.nan), np.float32(np.nan)
        return _from_key(int(rng[0]), dtype), _from_key(int(rng[1]), dtype)
    if dates is not None:
        src = src[np.asarray(dates, np.int64)]
    block = out[:, j0:j0 + src.shape[0]]
    x = src.transpose(1, 0, 2)
    result = (np.float32(x.min()), np.float32(x.max())) if want_range else None
    if result is not None and not (np.isfinite(result[0]) and np.isfinite(result[1])):
        result = np.float32(np.nan), np.float32(np.nan)
    if norm is None:
        np.copyto(block, x, casting="unsafe")
    else:
        np.subtract(x, norm[0][:, None, None], out=block, dtype=np.float32)
        np.divide(block, norm[1][:, None, None], out=block)
    return result
