"""Daily weather windows around image dates: the calendar view of CropNet's daily weather used by TS fusion.

The TS-fusion paper (Basile et al., 2025, section 4, "Data") pairs every image with the weather around its
acquisition: "for the 29 days prior and 10 days after acquisition, we compute daily minimum, maximum, and mean
temperature as well as [...] precipitation". :func:`weather_windows` cuts these windows out of CropNet's daily
weather (``months x 31`` calendar slots); CropNet's daily weather only covers the months of ``months``, so a window
that would leave them is shifted inside (the acquisition day then sits elsewhere in the window; ``offset`` records
its position). :data:`TSFUSION_WEATHER` names the weather variables briefly (``tavg``, ``precip``...).
"""

from __future__ import annotations

import calendar
import datetime as dt
from collections.abc import Sequence

import torch
from torch import Tensor

from terratorch_eoplugins.errors import EODataError

__all__ = ["TSFUSION_WEATHER", "hrrr_columns", "weather_windows"]

#: Short names of the daily weather modalities (paper's daily dataset: mean, max, min temperature, precipitation).
TSFUSION_WEATHER: dict[str, str] = {
    "tavg": "Avg Temperature (K)",
    "tmax": "Max Temperature (K)",
    "tmin": "Min Temperature (K)",
    "precip": "Precipitation (kg m**-2)",
    "rh": "Relative Humidity (%)",
    "vpd": "Vapor Pressure Deficit (kPa)",
    "srad": "Downward Shortwave Radiation Flux (W m**-2)",
}


def hrrr_columns(short_names: Sequence[str]) -> tuple[str, ...]:
    """WRF-HRRR column names of the short weather names (see :data:`TSFUSION_WEATHER`)."""
    bad = [v for v in short_names if v not in TSFUSION_WEATHER]
    if bad or not short_names:
        raise ValueError(f"weather variables {bad or list(short_names)} unknown; expected a non-empty subset of "
                         f"{list(TSFUSION_WEATHER)}")
    return tuple(TSFUSION_WEATHER[v] for v in short_names)


def weather_windows(weather_short: Tensor, weather_mask: Tensor, dates: Sequence[str], months: Sequence[int],
                    before: int = 29, after: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """Daily windows around every image date.

    Args:
        weather_short: ``[M, D, G, V]`` daily weather of one county-year (``D = 31`` calendar slots).
        weather_mask: ``[M, D]`` observed days (``False``: interpolated or not a calendar day).
        dates: ``T`` ISO dates of the images.
        months: the ``M`` months of ``weather_short``.
        before, after: days before / after the acquisition day.

    Returns:
        ``(windows [T, G, V, L], observed_fraction [T], offset [T])`` with ``L = before + 1 + after``;
        ``offset`` is the acquisition day's index in the window.
    """
    if weather_short.ndim != 4 or weather_short.shape[:2] != weather_mask.shape:
        raise EODataError(f"weather_short must be [M, D, G, V] with weather_short_mask [M, D], got "
                          f"{tuple(weather_short.shape)} and {tuple(weather_mask.shape)}")
    if len(months) != weather_short.shape[0]:
        raise EODataError(f"weather_short has {weather_short.shape[0]} months but months={list(months)}")
    if before < 0 or after < 0:
        raise ValueError(f"before and after must be >= 0, got {before}, {after}")
    if not dates:
        raise EODataError("a CropNet sample without image dates has no (image, weather) pair")
    year = dt.date.fromisoformat(dates[0]).year
    slots, start = [], {}
    for mi, m in enumerate(months):
        n = calendar.monthrange(year, m)[1]
        if weather_short.shape[1] < n:
            raise EODataError(f"weather_short keeps {weather_short.shape[1]} days per month; windows need all "
                              f"calendar days (days_per_month=31)")
        start[m] = len(slots)
        slots += [(mi, d) for d in range(n)]
    mi_idx = torch.tensor([s[0] for s in slots])
    d_idx = torch.tensor([s[1] for s in slots])
    seq = weather_short[mi_idx, d_idx]  # [N, G, V] consecutive days
    obs = weather_mask[mi_idx, d_idx]
    length = before + 1 + after
    if len(slots) < length:
        raise EODataError(f"daily weather covers {len(slots)} days (months {list(months)}) but a window needs "
                          f"{length} (before={before}, after={after})")
    wins, frac, offs = [], [], []
    for d in dates:
        day = dt.date.fromisoformat(d)
        if day.month not in start:
            raise EODataError(f"image date {d} lies outside the weather months {list(months)}")
        pos = start[day.month] + day.day - 1
        s = min(max(pos - before, 0), len(slots) - length)
        wins.append(seq[s:s + length].permute(1, 2, 0))  # [G, V, L]
        frac.append(obs[s:s + length].float().mean())
        offs.append(pos - s)
    return torch.stack(wins), torch.stack(frac), torch.tensor(offs)
