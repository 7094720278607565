"""Views of the CropNet tree for TS fusion (Basile et al., 2025): (image, daily weather window) pairs and
tokenizer training data.

Every (county, grid, date) of CropNet gives one pair: the grid's Sentinel-2 image and the grid's daily WRF-HRRR
series of the chosen weather variables over the window ``[date - before, date + after]`` (default 29 + 1 + 10 = 40
days, :func:`~terratorch_eoplugins.datasets.weather_windows.weather_windows`).

Data handling (the CropNet reader does the file-level work, see :mod:`terratorch_eoplugins.datasets.cropnet`):

* weather CSV rows with missing cells or missing day rows are interpolated by the reader and flagged in
  ``weather_short_mask``; :func:`cropnet_pairs` drops a pair whose window has fewer than ``min_observed``
  observed days (and counts them);
* an image without weather (a county-year with no daily weather) is skipped by the reader;
  :func:`extract_pairs` additionally raises :class:`EODataError` for a sample whose weather does not cover its
  grids or is not finite;
* a county with no grids (``G = 0``) raises :class:`EODataError` in :func:`extract_pairs`; the reader already
  skips county-years without image groups.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from terratorch_eoplugins.datasets.common import logger
from terratorch_eoplugins.datasets.cropnet import CROPNET_SPLIT_YEARS, CROPS, WEATHER_VARIABLES, CropNet
from terratorch_eoplugins.datasets.weather_windows import hrrr_columns, weather_windows
from terratorch_eoplugins.errors import EODataError

__all__ = ["PairDataset", "cropnet_pairs", "extract_pairs", "load_cropnet_tokenizer_data"]


def extract_pairs(sample: Mapping[str, Any], months: Sequence[int], variables: Sequence[int] | None = None,
                  before: int = 29, after: int = 10) -> dict[str, Tensor]:
    """All (image, weather window) pairs of one CropNet sample (``grid_aggregation="none"``).

    Args:
        sample: a :class:`~terratorch_eoplugins.datasets.cropnet.CropNet` sample.
        months: the dataset's weather months.
        variables: indices into the sample's weather variables (default: all).
        before, after: window around the acquisition day.

    Returns:
        ``image [T*G, C, H, W]``, ``weather [T*G, V, L]``, ``coords [T*G, 2]`` (grid centre lat, lon),
        ``observed [T*G]`` (fraction of observed days in the window), ``offset [T*G]``, ``doy [T*G]``;
        pairs are ordered date-major (``t * G + g``).
    """
    image = sample["image"]
    if image.ndim != 5:
        raise EODataError(f"sample image must be T x G x C x H x W (grid_aggregation='none'), got "
                          f"{tuple(image.shape)}")
    t, g = image.shape[:2]
    where = f"county {sample.get('fips', '?')} year {sample.get('year', '?')}"
    if g == 0 or int(sample.get("n_grids", g)) == 0:
        raise EODataError(f"{where}: the county has no grids (no image grid group); it cannot give (image, "
                          "weather) pairs")
    if t == 0:
        raise EODataError(f"{where}: no image date")
    ws = sample["weather_short"]
    if ws.ndim != 4 or ws.shape[2] != g:
        raise EODataError(f"{where}: daily weather covers {ws.shape[2] if ws.ndim == 4 else '?'} grids but the "
                          f"images have {g} (every image grid needs its weather)")
    if not bool(torch.isfinite(ws).all()):
        raise EODataError(f"{where}: daily weather has non-finite values")
    wins, frac, offs = weather_windows(ws, sample["weather_short_mask"], sample["dates"], months, before, after)
    if variables is not None:
        wins = wins[:, :, list(variables)]
    coords = sample["grid_coords"].float().mean(1)  # [G, 2] (lat, lon) centre
    doy = torch.tensor([dt.date.fromisoformat(d).timetuple().tm_yday for d in sample["dates"]], dtype=torch.float32)
    return {
        "image": image.reshape(t * g, *image.shape[2:]),
        "weather": wins.reshape(t * g, *wins.shape[2:]).float(),
        "coords": coords[None].expand(t, -1, -1).reshape(t * g, 2),
        "observed": frac[:, None].expand(-1, g).reshape(-1),
        "offset": offs[:, None].expand(-1, g).reshape(-1),
        "doy": doy[:, None].expand(-1, g).reshape(-1),
    }


class PairDataset(Dataset):
    """In-memory (image, weather window) pairs: a dict of equally long tensors."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        n = {len(v) for v in tensors.values()}
        if len(n) != 1:
            raise ValueError(f"pair tensors must have equal length, got { {k: len(v) for k, v in tensors.items()} }")
        self.tensors = dict(tensors)

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def _county_years(crops: Sequence[str], open_crop: Callable[[str], CropNet],
                  on_skip: Callable[[str, EODataError], None],
                  seen: set[tuple[str, int]]) -> Iterator[tuple[CropNet, int]]:
    """``(dataset, index)`` of each county-year once over ``crops``: a county-year has the same images and weather
    for every crop. ``open_crop`` builds a crop's dataset; a crop whose dataset cannot be built (e.g. not grown in
    these years) goes to ``on_skip``. Yielded ``(fips, year)`` keys are added to ``seen``."""
    for crop in crops:
        try:
            ds = open_crop(crop)
        except EODataError as err:
            on_skip(crop, err)
            continue
        for i, rec in enumerate(ds.records):
            key = (rec["fips"], rec["year"])
            if key not in seen:
                seen.add(key)
                yield ds, i


def cropnet_pairs(root: str | Path, crops: Sequence[str], years: Sequence[int], months: Sequence[int],
                  weather: Sequence[str], before: int = 29, after: int = 10, image_size: int | None = 32,
                  min_observed: float = 0.5, max_pairs: int | None = None, seed: int = 0,
                  split: str = "train") -> tuple[PairDataset, int]:
    """The (image, weather window) pairs of the county-years of ``years`` in the CropNet tree ``root``.

    Args:
        root: the ``CropNet`` folder.
        crops: crops whose USDA county lists define the county-years (pairs are deduplicated by county-year;
            no yield is used).
        years: sample years.
        months: months of daily weather and images.
        weather: short weather names (:data:`~terratorch_eoplugins.datasets.weather_windows.TSFUSION_WEATHER`).
        before, after: window around the acquisition day.
        image_size: resize grid images to this side.
        min_observed: minimum fraction of observed (not interpolated) days in a window.
        max_pairs: keep at most this many pairs (random, seeded by ``seed``; dataset order is kept).
        seed: seed of the subsampling.
        split: named in the error of an empty result.

    Returns:
        The pairs (:func:`extract_pairs` keys, concatenated in county-year order) and the number of pairs dropped
        for having fewer than ``min_observed`` observed weather days.
    """
    columns = hrrr_columns(weather)
    parts: list[dict[str, Tensor]] = []
    errors: list[str] = []
    dropped = 0

    def open_crop(crop: str) -> CropNet:
        return CropNet(root, crop=crop, years=years, months=months, long_term_years=0, weather_variables=columns,
                       image_size=image_size, days_per_month=31)

    for ds, i in _county_years(crops, open_crop, lambda crop, err: errors.append(str(err)), set()):
        p = extract_pairs(ds[i], months, None, before, after)
        keep = p["observed"] >= min_observed
        dropped += int((~keep).sum())
        parts.append({k: v[keep] for k, v in p.items()})
    if not parts or sum(len(p["image"]) for p in parts) == 0:
        raise EODataError(f"TS-fusion pairs of split {split!r} (years {list(years)}, crops {list(crops)}) under "
                          f"{root} are empty: {errors or {'few_observed_days': dropped}}")
    shapes = {tuple(p["image"].shape[1:]) for p in parts}
    if len(shapes) > 1:
        raise EODataError(f"grid images of different sizes {sorted(shapes)}: set image_size")
    tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if max_pairs is not None and len(tensors["image"]) > max_pairs:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(tensors["image"]), generator=gen)[:max_pairs].sort().values
        tensors = {k: v[idx] for k, v in tensors.items()}
    return PairDataset(tensors), dropped


def load_cropnet_tokenizer_data(root: str | Path, split: str = "train", days_per_month: int = 28,
                                weather_variables: Sequence[str] = WEATHER_VARIABLES, image_size: int | None = None,
                                max_samples: int | None = None, crops: Sequence[str] = CROPS) -> dict[str, Any]:
    """Images ``[N, C, H, W]`` (``/255``) and daily weather series ``[M, V, days_per_month]`` (raw units) of the
    county-years of ``split``, de-duplicated over ``crops`` (one county-year has the same inputs for all crops)."""
    images: list[Tensor] = []
    series: list[Tensor] = []
    seen: set[tuple[str, int]] = set()
    if split not in CROPNET_SPLIT_YEARS:
        raise ValueError(f"split: expected one of {sorted(CROPNET_SPLIT_YEARS)}, got {split!r}")

    def open_crop(crop: str) -> CropNet:
        return CropNet(root, crop=crop, split=split, days_per_month=days_per_month, long_term_years=0,
                       weather_variables=weather_variables, image_size=image_size)

    def skip(crop: str, err: EODataError) -> None:  # e.g. a crop with no county-year in this split
        logger.info("TS-fusion tokenizer data: skipping %s/%s: %s", crop, split, err)

    for ds, i in _county_years(crops, open_crop, skip, seen):
        s = ds[i]
        img = s["image"]  # T G C H W
        images.append(img.reshape(-1, *img.shape[2:]))
        w = s["weather_short"]  # months x days x G x V
        series.append(w.permute(0, 2, 3, 1).reshape(-1, w.shape[-1], w.shape[1]))  # (months*G) x V x days
        if max_samples is not None and len(seen) >= max_samples:
            break
    if not images:
        raise EODataError(f"{str(root)!r}: no county-year with images and weather in split {split!r}")
    return {"images": torch.cat(images), "weather": torch.cat(series), "variables": list(weather_variables),
            "county_years": sorted(seen)}
