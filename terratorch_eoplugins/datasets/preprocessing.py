"""Image preprocessing of DUNIA's appendix F: S1 incidence-angle normalisation, S2 20 m -> 10 m, calendar mosaics.

* :func:`normalise_incidence`: eq. 15, ``sigma0_ref = sigma0_theta * cos^2(theta_ref) / cos^2(theta)`` on
  **linear** backscatter (dB inputs are converted to linear, normalised and converted back), ``theta_ref = 40``
  degrees in the paper. The incidence angle is the GEE ``COPERNICUS/S1_GRD`` convention: a band named ``angle``
  (degrees from the ellipsoid) after VV and VH.
* :func:`upsample_20m`: the six 20 m S2 bands (:data:`S2_20M_BANDS`) brought to 10 m by bicubic convolution
  (Keys, ``a = -0.75``, pixel-area geometry: a 10 m pixel's centre is at ``(j + 0.5) / 2 - 0.5`` in 20 m pixels,
  edge pixels replicated; ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``), or by
  pixel replication (``"nearest"``).
* :func:`calendar_periods`: the three four-month windows Oct-Jan, Feb-May, Jun-Sep of the 12 months ending
  in September of ``year`` (the paper: October 2019 - September 2020).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["S2_20M_BANDS", "UPSAMPLE_MODES", "calendar_periods", "calendar_year", "normalise_incidence",
           "upsample_20m"]

#: Sentinel-2 bands with a native 20 m resolution (red edge 1-3, narrow NIR, SWIR 1-2).
S2_20M_BANDS: tuple[str, ...] = ("B05", "B06", "B07", "B8A", "B11", "B12")
UPSAMPLE_MODES: tuple[str, ...] = ("cubic", "nearest", "none")


def normalise_incidence(backscatter: np.ndarray, angle_deg: np.ndarray, ref_deg: float = 40.0,
                        db: bool = True) -> np.ndarray:
    """Cosine-squared incidence normalisation (DUNIA eq. 15) of ``backscatter`` acquired at ``angle_deg``.

    Args:
        backscatter: ``[..., H, W]`` sigma0, in dB when ``db`` (converted to linear and back) else linear.
        angle_deg: Incidence angle in degrees, broadcastable to ``backscatter``.
        ref_deg: Reference incidence angle (paper: 40 degrees).
        db: Whether ``backscatter`` (and the result) are in dB.
    """
    theta = np.deg2rad(np.asarray(angle_deg, np.float64))
    factor = np.cos(np.deg2rad(float(ref_deg))) ** 2 / np.cos(theta) ** 2
    x = np.asarray(backscatter, np.float64)
    if not db:
        return (x * factor).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (10.0 * np.log10(10.0 ** (x / 10.0) * factor)).astype(np.float32)


def upsample_20m(x: np.ndarray, mode: str = "cubic") -> np.ndarray:
    """``[C, h, w]`` 20 m bands -> ``[C, 2h, 2w]`` at 10 m (``mode`` ``"cubic"`` or ``"nearest"``), float32."""
    if mode == "nearest":
        return np.repeat(np.repeat(np.asarray(x, np.float32), 2, axis=-2), 2, axis=-1)
    if mode != "cubic":
        raise ValueError(f"upsample_20m must be 'cubic' or 'nearest' here, got {mode!r}")
    t = torch.from_numpy(np.ascontiguousarray(x, np.float64))[None]
    out = F.interpolate(t, scale_factor=2, mode="bicubic", align_corners=False)
    return out[0].numpy().astype(np.float32)


def calendar_periods(year: int) -> list[dt.datetime]:
    """Edges of the DUNIA mosaics ending in ``year``: Oct 1 ``year-1``, Feb 1, Jun 1 and Oct 1 ``year``."""
    return [dt.datetime(year - 1, 10, 1), dt.datetime(year, 2, 1), dt.datetime(year, 6, 1), dt.datetime(year, 10, 1)]


def calendar_year(times: Sequence[dt.datetime]) -> int:
    """The ``year`` whose October-September span (:func:`calendar_periods`) holds most ``times`` (latest on ties)."""
    if not times:
        raise ValueError("calendar_year needs at least one acquisition time")
    counts: dict[int, int] = {}
    for t in times:
        y = t.year + 1 if t.month >= 10 else t.year
        counts[y] = counts.get(y, 0) + 1
    return max(counts, key=lambda y: (counts[y], y))
