"""S4 pretraining samples: PASTIS-R radar/optical series paired by nearest-timestamp interpolation.

S4 (section 4, "Time Series Interpolation") keeps the modality with fewer dates unchanged and, for each
of its dates, takes the other modality's acquisition closest in time, so both series have ``T_min``
coarsely aligned dates. :func:`align_nearest_timestamps` implements it; :class:`S4PASTIS` applies it to a
PASTIS-R patch (read unchanged by :class:`~terratorch_eoplugins.datasets.pastis.PASTIS`);
:class:`~terratorch_eoplugins.datamodules.s4.S4PASTISDataModule` serves the pairs.

Explicit rules: equal lengths keep the *first* series (S4PASTIS passes radar first, as the paper sets
``x_min := x_r`` when ``T_min = T_1``); equally close candidates resolve to the *earlier* acquisition;
missing dates (NaN) are never matched and, in the kept series, dropped with a warning; a series with no
date, or two series whose matches are all farther apart than ``max_gap_days`` (or whose time spans do
not overlap), is an error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from matplotlib.figure import Figure

from terratorch_eoplugins.datasets.common import logger, plot_panels
from terratorch_eoplugins.datasets.pastis import PASTIS
from terratorch_eoplugins.errors import EODataError

__all__ = ["S4PASTIS", "align_nearest_timestamps"]

_OPTICAL = ("S2",)
_RADAR = ("S1A", "S1D")


def align_nearest_timestamps(dates_a: Sequence[float] | np.ndarray, dates_b: Sequence[float] | np.ndarray,
                             max_gap_days: float | None = None,
                             names: tuple[str, str] = ("a", "b")) -> tuple[np.ndarray, np.ndarray]:
    """Pair two acquisition-date series by nearest timestamp (S4's interpolation).

    Args:
        dates_a: acquisition times of series a (days, any origin; NaN = missing).
        dates_b: acquisition times of series b, same unit and origin.
        max_gap_days: drop pairs farther apart than this (``None``: no limit, but the two series' time
            spans must overlap).
        names: names of the two series for error messages.

    Returns:
        ``(idx_a, idx_b)``, int64 arrays of equal length ``T_min``: the shorter series' indices (all its
        non-missing dates, in order) and, for each, the index of the nearest date of the other series.
    """
    a = np.asarray(dates_a, dtype=np.float64).reshape(-1) if np.ndim(dates_a) <= 1 else None
    b = np.asarray(dates_b, dtype=np.float64).reshape(-1) if np.ndim(dates_b) <= 1 else None
    if a is None or b is None:
        raise ValueError(f"dates must be 1-D sequences, got shapes {np.shape(dates_a)} and {np.shape(dates_b)}")
    for arr, name in ((a, names[0]), (b, names[1])):
        if arr.size == 0 or not np.isfinite(arr).any():
            raise EODataError(f"{name}: no acquisition date (T = 0); both modalities need at least one date")
    keep_a = a.size <= b.size  # ties in length keep the first series
    short, long_ = (a, b) if keep_a else (b, a)
    sname, lname = (names[0], names[1]) if keep_a else (names[1], names[0])
    missing = ~np.isfinite(short)
    if missing.any():
        logger.warning("%s: %d missing date(s) dropped before nearest-timestamp pairing", sname, int(missing.sum()))
    idx_short = np.flatnonzero(~missing)
    valid_long = np.flatnonzero(np.isfinite(long_))
    if max_gap_days is None:
        lo, hi = long_[valid_long].min(), long_[valid_long].max()
        if short[idx_short].max() < lo or short[idx_short].min() > hi:
            raise EODataError(f"{sname} and {lname} have no overlapping dates: {sname} spans "
                              f"[{short[idx_short].min():g}, {short[idx_short].max():g}], {lname} [{lo:g}, {hi:g}]")
    # nearest candidate; on equal distance the earlier acquisition (then the lower index) wins
    cand = long_[valid_long]
    dist = np.abs(short[idx_short, None] - cand[None, :])
    best = np.empty(len(idx_short), dtype=np.int64)
    for k in range(len(idx_short)):
        d = dist[k]
        ties = np.flatnonzero(d == d.min())
        best[k] = valid_long[ties[np.argmin(cand[ties])]] if len(ties) > 1 else valid_long[ties[0]]
    gap = np.abs(short[idx_short] - long_[best])
    if max_gap_days is not None:
        ok = gap <= max_gap_days
        if not ok.any():
            raise EODataError(f"{sname} and {lname} have no overlapping dates: the closest pair is "
                              f"{gap.min():g} days apart (max_gap_days={max_gap_days:g})")
        if not ok.all():
            logger.warning("%s: %d date(s) without a %s acquisition within %g days dropped",
                           sname, int((~ok).sum()), lname, max_gap_days)
        idx_short, best = idx_short[ok], best[ok]
    idx_short = idx_short.astype(np.int64)
    return (idx_short, best) if keep_a else (best, idx_short)


class S4PASTIS(PASTIS):
    """PASTIS-R optical + radar series of one patch, aligned by nearest timestamp, for S4 pretraining.

    Samples: ``image = {"optical": C_o x T x H x W, "radar": C_r x T x H x W}`` with the same ``T``
    (the aligned series, then ``num_dates`` of them by ``linspace``), ``dates`` (days since the
    reference date, per modality), ``temporal_coords`` (optical), ``cloud_cover`` of the optical dates
    when the metadata has it, ``mask`` and the usual PASTIS metadata keys.

    Args:
        root, split, folds, protocol, fold_rotation, void_label, normalize, norm_folds, reference_date,
        label_fraction, seed: as :class:`PASTIS`.
        optical: optical modality (``"S2"``).
        radar: radar modality (``"S1A"`` or ``"S1D"``).
        num_dates: dates kept after alignment (``round(linspace)``); ``None`` keeps all ``T_min``.
        max_gap_days: see :func:`align_nearest_timestamps`.
        crop_size: random ``crop_size`` x ``crop_size`` crop (same window for both modalities and the
            mask), a compute saver for CPU pretraining; ``None`` keeps the full patch.
        transforms: callable applied to the aligned sample.
    """

    def __init__(self, root: str | Path = "data/PASTIS-R", split: Literal["train", "val", "test"] | None = None,
                 folds: Sequence[int] | None = None, protocol: Literal["pangaea", "official"] = "pangaea",
                 fold_rotation: int = 0, optical: str = "S2", radar: str = "S1A", num_dates: int | None = 6,
                 max_gap_days: float | None = None, crop_size: int | None = None, void_label: int | None = -1,
                 normalize: bool = True, norm_folds: Sequence[int] | None = None, reference_date: str = "2018-09-01",
                 label_fraction: float = 1.0, seed: int = 0,
                 transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        if optical not in _OPTICAL:
            raise ValueError(f"optical must be one of {list(_OPTICAL)}, got {optical!r}")
        if radar not in _RADAR:
            raise ValueError(f"radar must be one of {list(_RADAR)}, got {radar!r}")
        if num_dates is not None and (not isinstance(num_dates, (int, np.integer)) or num_dates < 1):
            raise ValueError(f"num_dates must be a positive int or None, got {num_dates!r}")
        if crop_size is not None and not 1 <= crop_size <= self.patch_size:
            raise ValueError(f"crop_size must be in 1..{self.patch_size} or None, got {crop_size!r}")
        super().__init__(root, split, folds, protocol, fold_rotation, modalities=(optical, radar), num_dates=None,
                         void_label=void_label, normalize=normalize, norm_folds=norm_folds,
                         reference_date=reference_date, label_fraction=label_fraction, seed=seed, transforms=None)
        self.optical, self.radar = optical, radar
        self.pair_num_dates = None if num_dates is None else int(num_dates)
        self.max_gap_days = max_gap_days
        self.crop_size = crop_size
        self.pair_transforms = transforms

    def aligned_indices(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Optical and radar date indices of patch ``index`` after alignment and ``num_dates`` selection."""
        patch = self.patches[index]
        days = {m: np.array([(d - self.reference_date).days for d in patch["dates"][m]], np.float64)
                for m in (self.optical, self.radar)}
        pid = patch["id_patch"]
        names = (f"{self.radar} of patch {pid}", f"{self.optical} of patch {pid}")
        idx_r, idx_o = align_nearest_timestamps(days[self.radar], days[self.optical], self.max_gap_days, names=names)
        if self.pair_num_dates is not None:
            pick = np.round(np.linspace(0, len(idx_o) - 1, self.pair_num_dates)).astype(np.int64)
            idx_o, idx_r = idx_o[pick], idx_r[pick]
        return idx_o, idx_r

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Aligned optical/radar sample ``index`` (see the class docstring)."""
        sample = super().__getitem__(index)
        idx_o, idx_r = self.aligned_indices(index)
        to = torch.from_numpy
        image = {"optical": sample["image"][self.optical][:, to(idx_o)],
                 "radar": sample["image"][self.radar][:, to(idx_r)]}
        sample["image"] = image
        sample["dates"] = {"optical": sample["dates"][self.optical][to(idx_o)],
                           "radar": sample["dates"][self.radar][to(idx_r)]}
        sample["temporal_coords"] = sample["temporal_coords"][to(idx_o)]
        if "cloud_cover" in sample:
            sample["cloud_cover"] = sample["cloud_cover"][to(idx_o)]
        if self.crop_size is not None and self.crop_size < self.patch_size:
            c = self.crop_size
            y0, x0 = (int(v) for v in torch.randint(0, self.patch_size - c + 1, (2,)))
            sample["image"] = {k: v[..., y0:y0 + c, x0:x0 + c].contiguous() for k, v in image.items()}
            sample["mask"] = sample["mask"][y0:y0 + c, x0:x0 + c].contiguous()
        if self.pair_transforms is not None:
            sample = self.pair_transforms(sample)
        return sample

    def plot(self, sample: dict[str, Any], show_titles: bool = True, suptitle: str | None = None,
             date_index: int | None = None) -> Figure:
        """Plot one aligned date: optical RGB, radar VV/VH/VV-VH (with their dates) and the mask."""
        opt = np.asarray(sample["image"]["optical"], np.float32)
        rad = np.asarray(sample["image"]["radar"], np.float32)
        t = opt.shape[1]
        di = t // 2 if date_index is None else date_index
        if not -t <= di < t:
            raise ValueError(f"date_index={date_index} out of range for {t} aligned dates")
        panels = [(self._stretch(opt[[2, 1, 0], di].transpose(1, 2, 0)), "optical RGB"),
                  (self._stretch(rad[[0, 1, 2], di].transpose(1, 2, 0)), "radar VV/VH/ratio")]
        dates = sample.get("dates")
        if isinstance(dates, dict):
            panels = [(img, f"{title} day {int(dates[m][di])}")
                      for (img, title), m in zip(panels, ("optical", "radar"))]
        if "mask" in sample:
            panels.append((self._colorize(np.asarray(sample["mask"])), "Mask"))
        return plot_panels(panels, show_titles, suptitle)
