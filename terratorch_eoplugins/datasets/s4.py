"""S4 pretraining samples: PASTIS-R radar/optical series paired by nearest-timestamp interpolation.

S4 (section 4, "Time Series Interpolation") keeps the modality with fewer dates unchanged and, for each
of its dates, takes the other modality's acquisition closest in time, so both series have ``T_min``
coarsely aligned dates. :func:`align_nearest_timestamps` implements it; :class:`S4PASTIS` applies it to a
PASTIS-R patch (read unchanged by :class:`~terratorch_eoplugins.datasets.pastis.PASTIS`);
:class:`~terratorch_eoplugins.datamodules.s4.S4PASTISDataModule` serves the pairs.

Paper defaults (section 4 and 5): *every* aligned date (``num_dates=None``; the project's earlier 6 dates by
``linspace`` stay available as ``num_dates=6``) and RGB optical input (``optical_bands=(2, 1, 0)``: S2 B4, B3,
B2 of PASTIS-R's B2, B3, B4, B5, B6, B7, B8, B8A, B11, B12; ``None`` keeps the 10 bands).

Batching rule for series of different lengths (:func:`collate_s4`): each series is padded at its end to the
longest of the batch by repeating its last date (the same replicate padding the 3-D U-Net applies up to its
pooling factor) and the batch gets ``date_mask`` ``[B, T]`` (True = real date). The padded dates never count:
S4's losses mask them out and the fine-tuning backbone averages over the real dates only. In eval mode a
series' output does not depend on its batch as long as the batch's longest series pads to the same multiple of
the U-Net's temporal pooling factor (8 with four levels).

Cloud cover (for the cloud-robustness analysis, :mod:`terratorch_eoplugins.analysis.s4_clouds`): the synthetic
world writes a ``cloudcover-S2`` metadata field; the real PASTIS-R release has none. ``cloud_source="auto"``
(default) uses the field when present and otherwise *estimates* it from the S2 bands
(:func:`estimate_cloud_cover`: a pixel is cloudy when its blue B2 reflectance exceeds ``cloud_threshold``, 0.2 by
default); ``"estimate"`` always estimates, ``"metadata"`` requires the field, and a path to a JSON file
``{"<ID_PATCH>": [fraction per S2 date, ...]}`` supplies it (e.g. from s2cloudless masks).

Explicit rules: equal lengths keep the *first* series (S4PASTIS passes radar first, as the paper sets
``x_min := x_r`` when ``T_min = T_1``); equally close candidates resolve to the *earlier* acquisition;
missing dates (NaN) are never matched and, in the kept series, dropped with a warning; a series with no
date, or two series whose matches are all farther apart than ``max_gap_days`` (or whose time spans do
not overlap), is an error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from matplotlib.figure import Figure

from terratorch_eoplugins.datasets.common import logger, plot_panels
from terratorch_eoplugins.datasets.pastis import PASTIS
from terratorch_eoplugins.errors import EODataError

__all__ = ["S4PASTIS", "align_nearest_timestamps", "collate_s4", "estimate_cloud_cover", "pad_series",
           "S4_RGB_BANDS", "CLOUD_BLUE_THRESHOLD"]

_OPTICAL = ("S2",)
_RADAR = ("S1A", "S1D")

#: PASTIS-R S2 band order is B2, B3, B4, B5, B6, B7, B8, B8A, B11, B12: RGB = B4, B3, B2 (the paper's optical input)
S4_RGB_BANDS: tuple[int, ...] = (2, 1, 0)
#: blue (B2) surface reflectance above which a pixel counts as cloudy in :func:`estimate_cloud_cover`. Clouds are
#: bright and white in the visible (reflectance ~0.3-0.8), while vegetation, water, soil and most built surfaces stay
#: below ~0.15 in blue; snow and very bright roofs are the known false positives of such a brightness test.
CLOUD_BLUE_THRESHOLD = 0.2
#: PASTIS-R stores S2 L2A reflectance as int16 digital numbers = reflectance x 10 000
S2_REFLECTANCE_SCALE = 10000.0


def estimate_cloud_cover(s2: np.ndarray | torch.Tensor, threshold: float = CLOUD_BLUE_THRESHOLD,
                         blue_band: int = 0, scale: float = S2_REFLECTANCE_SCALE) -> np.ndarray:
    """Per-date cloud fraction of an S2 series from a blue-reflectance brightness test.

    Args:
        s2: ``C x T x H x W`` S2 values in the release's units (digital numbers, not standardised).
        threshold: blue reflectance above which a pixel is cloudy (default :data:`CLOUD_BLUE_THRESHOLD`).
        blue_band: channel of B2 (0 in PASTIS-R).
        scale: digital number of reflectance 1 (PASTIS-R: 10 000).

    Returns:
        float32 ``[T]`` fractions in [0, 1]: share of pixels with ``B2 / scale > threshold`` per date.
    """
    x = np.asarray(s2.detach().cpu() if isinstance(s2, torch.Tensor) else s2, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"estimate_cloud_cover expects a C x T x H x W S2 series, got shape {x.shape}")
    if not 0 <= blue_band < x.shape[0]:
        raise ValueError(f"blue_band={blue_band} out of range for {x.shape[0]} channels")
    if not (threshold > 0 and scale > 0):
        raise ValueError(f"threshold and scale must be > 0, got {threshold} and {scale}")
    return (x[blue_band] / scale > threshold).mean(axis=(1, 2)).astype(np.float32)


def pad_series(x: torch.Tensor, length: int) -> torch.Tensor:
    """Pad ``C x T x H x W`` at the end of T to ``length`` dates by repeating the last date."""
    t = x.shape[1]
    if length < t:
        raise ValueError(f"cannot pad a series of {t} dates to {length}")
    if length == t:
        return x
    return torch.cat([x, x[:, -1:].expand(-1, length - t, -1, -1)], dim=1)


def collate_s4(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate S4 samples whose series may have different numbers of dates (the batching rule of this module).

    Each ``image`` series (a tensor or every modality of a dict, ``C x T x H x W``) is padded at its end to the
    batch's longest ``T`` by repeating its last date; ``date_mask`` (bool ``[B, T]``, True = real date) is added.
    ``cloud_cover`` is padded with NaN. Other keys are collated as usual (equal shapes stacked, else lists).
    """
    from terratorch_eoplugins.datasets.common import collate_samples

    if not samples:
        raise ValueError("collate_s4 got an empty batch")

    def length(img: Any) -> int:
        return int(next(iter(img.values())).shape[1]) if isinstance(img, dict) else int(img.shape[1])

    lengths = [length(s["image"]) for s in samples]
    t_max = max(lengths)
    out = []
    for s, t in zip(samples, lengths):
        s = dict(s)
        img = s["image"]
        s["image"] = ({k: pad_series(v, t_max) for k, v in img.items()} if isinstance(img, dict)
                      else pad_series(img, t_max))
        s["date_mask"] = torch.arange(t_max) < t
        if isinstance(s.get("cloud_cover"), torch.Tensor) and s["cloud_cover"].shape[0] == t < t_max:
            s["cloud_cover"] = torch.cat([s["cloud_cover"], s["cloud_cover"].new_full((t_max - t,), float("nan"))])
        out.append(s)
    return collate_samples(out)


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
    """PASTIS-R optical + radar series of one patch, aligned by nearest timestamp, for S4 pretraining and fine-tuning.

    Samples: ``image = {"optical": C_o x T x H x W, "radar": C_r x T x H x W}`` with the same ``T``
    (every aligned date by default; ``num_dates`` of them by ``linspace`` as an option), or with
    ``inference_modality`` set, ``image`` = that modality's aligned series alone (S4 fine-tuning and inference are
    single-modal); ``dates`` (days since the reference date, per modality), ``temporal_coords`` (optical),
    ``cloud_cover`` of the optical dates (see ``cloud_source``), ``mask`` and the usual PASTIS metadata keys.
    Batch them with :func:`collate_s4` when ``T`` varies.

    Args:
        root, split, folds, protocol, fold_rotation, void_label, normalize, norm_folds, reference_date,
        label_fraction, seed: as :class:`PASTIS`.
        optical: optical modality (``"S2"``).
        radar: radar modality (``"S1A"`` or ``"S1D"``).
        num_dates: dates kept after alignment (``round(linspace)``); ``None`` (default, paper) keeps all ``T_min``.
        max_gap_days: see :func:`align_nearest_timestamps`.
        crop_size: random ``crop_size`` x ``crop_size`` crop (same window for both modalities and the
            mask), a compute saver for CPU pretraining; ``None`` keeps the full patch.
        optical_bands: S2 channels served as ``optical`` (default RGB = B4, B3, B2 as in the paper); ``None``: all 10.
        inference_modality: ``"optical"`` or ``"radar"``: serve only that modality's aligned series as ``image``
            (fine-tuning); ``None`` (default): both (pretraining).
        cloud_source: ``"auto"``, ``"metadata"``, ``"estimate"`` or a JSON file (see the module docstring).
        cloud_threshold: blue reflectance threshold of the estimate.
        transforms: callable applied to the aligned sample.
    """

    def __init__(self, root: str | Path = "data/PASTIS-R", split: Literal["train", "val", "test"] | None = None,
                 folds: Sequence[int] | None = None, protocol: Literal["pangaea", "official"] = "pangaea",
                 fold_rotation: int = 0, optical: str = "S2", radar: str = "S1A", num_dates: int | None = None,
                 max_gap_days: float | None = None, crop_size: int | None = None, void_label: int | None = -1,
                 normalize: bool = True, norm_folds: Sequence[int] | None = None, reference_date: str = "2018-09-01",
                 label_fraction: float = 1.0, seed: int = 0, optical_bands: Sequence[int] | None = S4_RGB_BANDS,
                 inference_modality: Literal["optical", "radar"] | None = None, cloud_source: str = "auto",
                 cloud_threshold: float = CLOUD_BLUE_THRESHOLD,
                 transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        if optical not in _OPTICAL:
            raise ValueError(f"optical must be one of {list(_OPTICAL)}, got {optical!r}")
        if radar not in _RADAR:
            raise ValueError(f"radar must be one of {list(_RADAR)}, got {radar!r}")
        if num_dates is not None and (not isinstance(num_dates, (int, np.integer)) or num_dates < 1):
            raise ValueError(f"num_dates must be a positive int or None, got {num_dates!r}")
        if crop_size is not None and not 1 <= crop_size <= self.patch_size:
            raise ValueError(f"crop_size must be in 1..{self.patch_size} or None, got {crop_size!r}")
        if optical_bands is not None:
            optical_bands = [int(b) for b in optical_bands]
            if not optical_bands or min(optical_bands) < 0 or max(optical_bands) >= len(self.modality_bands[optical]):
                raise ValueError(f"optical_bands must be indices of the {len(self.modality_bands[optical])} "
                                 f"{optical} bands, got {optical_bands}")
        if inference_modality not in (None, "optical", "radar"):
            raise ValueError(f"inference_modality must be 'optical', 'radar' or None, got {inference_modality!r}")
        if not cloud_threshold > 0:
            raise ValueError(f"cloud_threshold must be > 0, got {cloud_threshold}")
        self.cloud_file: dict[str, list[float]] | None = None
        if cloud_source not in ("auto", "metadata", "estimate"):
            path = Path(cloud_source)
            if not path.is_file():
                raise ValueError(f"cloud_source must be 'auto', 'metadata', 'estimate' or an existing JSON file "
                                 f"{{ID_PATCH: [fraction per S2 date]}}, got {cloud_source!r}")
            try:
                self.cloud_file = {str(k): v for k, v in json.loads(path.read_text()).items()}
            except (ValueError, AttributeError) as err:
                raise EODataError(f"{path}: not a JSON object {{ID_PATCH: [fraction per S2 date]}} ({err})") from None
        super().__init__(root, split, folds, protocol, fold_rotation, modalities=(optical, radar), num_dates=None,
                         void_label=void_label, normalize=normalize, norm_folds=norm_folds,
                         reference_date=reference_date, label_fraction=label_fraction, seed=seed, transforms=None)
        self.optical, self.radar = optical, radar
        self.pair_num_dates = None if num_dates is None else int(num_dates)
        self.max_gap_days = max_gap_days
        self.crop_size = crop_size
        self.pair_transforms = transforms
        self.optical_bands = optical_bands
        self.inference_modality = inference_modality
        self.cloud_source, self.cloud_threshold = cloud_source, float(cloud_threshold)
        if cloud_source == "metadata":
            lacking = [p["id_patch"] for p in self.patches
                       if "cloud_cover" not in p or not np.all(np.isfinite(p["cloud_cover"]))]
            if lacking:
                raise EODataError(f"{self.metadata_path}: cloud_source='metadata' but {len(lacking)} patch(es) have no "
                                  f"complete 'cloudcover-S2' field (e.g. ID_PATCH {lacking[0]}); the real PASTIS-R "
                                  "release has none: use cloud_source='auto'/'estimate' or a JSON file")

    def _cloud_cover(self, index: int, s2: torch.Tensor, idx_o: np.ndarray) -> torch.Tensor:
        """Per-date cloud fraction of the aligned optical dates ``idx_o`` (``s2``: their normalised 10 bands)."""
        patch = self.patches[index]
        if self.cloud_file is not None:
            key = str(patch["id_patch"])
            if key not in self.cloud_file:
                raise EODataError(f"{self.cloud_source}: no cloud cover for ID_PATCH {key}")
            cc = np.asarray(self.cloud_file[key], dtype=np.float32)
            if cc.shape != (len(patch["dates"][self.optical]),):
                raise EODataError(f"{self.cloud_source}: ID_PATCH {key} has {cc.size} cloud fractions, expected one "
                                  f"per {self.optical} date ({len(patch['dates'][self.optical])})")
            return torch.from_numpy(cc[idx_o])
        meta = patch.get("cloud_cover")
        if self.cloud_source != "estimate" and meta is not None and np.all(np.isfinite(meta[idx_o])):
            return torch.from_numpy(np.asarray(meta[idx_o], np.float32))
        raw = s2.numpy()
        if self.normalize:  # back to the release's digital numbers
            mean, std = self.norm_stats[self.optical]
            raw = raw * std[:, None, None, None] + mean[:, None, None, None]
        return torch.from_numpy(estimate_cloud_cover(raw, self.cloud_threshold))

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
        s2 = sample["image"][self.optical][:, to(idx_o)]
        sample["cloud_cover"] = self._cloud_cover(index, s2, idx_o)
        image = {"optical": s2 if self.optical_bands is None else s2[self.optical_bands].contiguous(),
                 "radar": sample["image"][self.radar][:, to(idx_r)]}
        sample["image"] = image
        sample["dates"] = {"optical": sample["dates"][self.optical][to(idx_o)],
                           "radar": sample["dates"][self.radar][to(idx_r)]}
        sample["temporal_coords"] = sample["temporal_coords"][to(idx_o)]
        if self.crop_size is not None and self.crop_size < self.patch_size:
            c = self.crop_size
            y0, x0 = (int(v) for v in torch.randint(0, self.patch_size - c + 1, (2,)))
            sample["image"] = {k: v[..., y0:y0 + c, x0:x0 + c].contiguous() for k, v in image.items()}
            sample["mask"] = sample["mask"][y0:y0 + c, x0:x0 + c].contiguous()
        if self.inference_modality is not None:
            sample["image"] = sample["image"][self.inference_modality]
            sample["dates"] = sample["dates"][self.inference_modality]
        if self.pair_transforms is not None:
            sample = self.pair_transforms(sample)
        return sample

    def plot(self, sample: dict[str, Any], show_titles: bool = True, suptitle: str | None = None,
             date_index: int | None = None) -> Figure:
        """Plot one aligned date: optical RGB, radar VV/VH/VV-VH (with their dates) and the mask."""
        if not isinstance(sample["image"], dict):
            raise ValueError("plot needs both modalities (a sample of S4PASTIS with inference_modality=None)")
        opt = np.asarray(sample["image"]["optical"], np.float32)
        rad = np.asarray(sample["image"]["radar"], np.float32)
        rgb = [0, 1, 2] if opt.shape[0] == 3 else [2, 1, 0]  # RGB-served optical is already B4, B3, B2
        t = opt.shape[1]
        di = t // 2 if date_index is None else date_index
        if not -t <= di < t:
            raise ValueError(f"date_index={date_index} out of range for {t} aligned dates")
        panels = [(self._stretch(opt[rgb, di].transpose(1, 2, 0)), "optical RGB"),
                  (self._stretch(rad[[0, 1, 2], di].transpose(1, 2, 0)), "radar VV/VH/ratio")]
        dates = sample.get("dates")
        if isinstance(dates, dict):
            panels = [(img, f"{title} day {int(dates[m][di])}")
                      for (img, title), m in zip(panels, ("optical", "radar"))]
        if "mask" in sample:
            panels.append((self._colorize(np.asarray(sample["mask"])), "Mask"))
        return plot_panels(panels, show_titles, suptitle)
