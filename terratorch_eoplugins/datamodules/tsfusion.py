"""Image + daily-weather pairs for TS-fusion pretraining, cut from the CropNet tree (synthetic or real).

The paper (section 4, "Data") pairs every image with the weather around its acquisition: "for the 29
days prior and 10 days after acquisition, we compute daily minimum, maximum, and mean temperature as
well as [...] precipitation". Here every (county, grid, date) of CropNet gives one pair: the grid's
Sentinel-2 image and the grid's daily WRF-HRRR series of ``weather_variables`` over the window
``[date - before, date + after]`` (default 29 + 1 + 10 = 40 days). CropNet's daily weather only
covers the months of ``months``; a window that would leave them is shifted inside (the acquisition
day then sits elsewhere in the window; ``offset`` records its position).

Data handling (the CropNet reader does the file-level work, see
:mod:`terratorch_eoplugins.datasets.cropnet`):

* weather CSV rows with missing cells or missing day rows are interpolated by the reader and
  flagged in ``weather_short_mask``; a pair whose window has fewer than ``min_observed`` observed
  days is dropped (counted in :attr:`TSFusionPretrainDataModule.skipped`);
* an image without weather (a county-year with no daily weather) is skipped by the reader;
  :func:`extract_pairs` additionally raises :class:`EODataError` for a sample whose weather does not
  cover its grids or is not finite;
* a county with no grids (``G = 0``) raises :class:`EODataError` in :func:`extract_pairs`; the reader
  already skips county-years without image groups.
"""

from __future__ import annotations

import calendar
import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from terratorch_eoplugins.errors import EODataError

from terratorch_eoplugins.datasets.common import logger
from terratorch_eoplugins.datasets.cropnet import CROPS, CropNet

__all__ = ["TSFUSION_WEATHER", "TSFusionPretrainDataModule", "PairDataset", "extract_pairs", "weather_windows"]

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


class TSFusionPretrainDataModule(pl.LightningDataModule):
    """(image, daily weather) pairs of the CropNet tree for correlation pretraining.

    Batches: ``image [B, C, H, W]`` (``/255``, no standardisation: the image tokenizer sees raw
    reflectance-like values), ``weather [B, V, L]`` in physical units (the weather tokenizer is fitted on
    them), ``coords [B, 2]`` grid centre (lat, lon), ``observed``, ``offset``, ``doy``.

    Args:
        root: the ``CropNet`` folder.
        crops: crops whose USDA county lists define the county-years (pairs are deduplicated by county-year;
            no yield is used).
        split_years: years of ``train``/``val``/``test`` pairs (default: pretrain on 2021 + 2022, validate on 2020).
        months: months of daily weather and images.
        weather: short weather names (:data:`TSFUSION_WEATHER`).
        before, after: window around the acquisition day.
        image_size: resize grid images to this side.
        min_observed: minimum fraction of observed (not interpolated) days in a window.
        max_pairs: keep at most this many pairs per split (random, seeded).
        batch_size, num_workers: loader settings.
        seed: seed of the subsampling.
    """

    def __init__(self, root: str = "data/demo/CropNet", crops: Sequence[str] = CROPS,
                 split_years: Mapping[str, Sequence[int]] | None = None, months: Sequence[int] = (4, 5, 6, 7, 8, 9),
                 weather: Sequence[str] = ("tavg", "tmax", "tmin", "precip"), before: int = 29, after: int = 10,
                 image_size: int | None = 32, min_observed: float = 0.5, max_pairs: int | None = None,
                 batch_size: int = 32, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.root = Path(root)
        self.crops = [CropNet._canonical_crop(c) for c in crops]
        if not self.crops:
            raise ValueError("crops must not be empty")
        self.split_years = {k: tuple(int(y) for y in v)
                            for k, v in (split_years or {"train": (2021, 2022), "val": (2020,), "test": (2020,)}).items()}
        for s in ("train", "val"):
            if s not in self.split_years:
                raise ValueError(f"split_years must define 'train' and 'val', got {sorted(self.split_years)}")
        self.months = tuple(int(m) for m in months)
        self.weather = tuple(weather)
        self.columns = hrrr_columns(self.weather)
        if before < 0 or after < 0:
            raise ValueError(f"before and after must be >= 0, got {before}, {after}")
        self.before, self.after = int(before), int(after)
        if not 0 <= min_observed <= 1:
            raise ValueError(f"min_observed must be in [0, 1], got {min_observed}")
        self.min_observed = float(min_observed)
        self.image_size = image_size
        self.max_pairs = max_pairs
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.skipped: dict[str, int] = {"few_observed_days": 0}
        self._pairs: dict[str, PairDataset] = {}

    @property
    def window(self) -> int:
        """Days per weather window ``L``."""
        return self.before + 1 + self.after

    def pairs(self, split: str) -> PairDataset:
        """The pairs of ``split`` (built on first use)."""
        if split not in self._pairs:
            self._pairs[split] = self._build(split)
        return self._pairs[split]

    def _build(self, split: str) -> PairDataset:
        if split not in self.split_years:
            raise ValueError(f"unknown split {split!r}; split_years has {sorted(self.split_years)}")
        years = self.split_years[split]
        seen: set[tuple[str, int]] = set()
        parts: list[dict[str, Tensor]] = []
        errors = []
        for crop in self.crops:
            try:
                ds = CropNet(self.root, crop=crop, years=years, months=self.months, long_term_years=0,
                             weather_variables=self.columns, image_size=self.image_size, days_per_month=31)
            except EODataError as err:  # e.g. a crop not grown in these years
                errors.append(str(err))
                continue
            for i, rec in enumerate(ds.records):
                key = (rec["fips"], rec["year"])
                if key in seen:
                    continue
                seen.add(key)
                p = extract_pairs(ds[i], self.months, None, self.before, self.after)
                keep = p["observed"] >= self.min_observed
                self.skipped["few_observed_days"] += int((~keep).sum())
                parts.append({k: v[keep] for k, v in p.items()})
        if not parts or sum(len(p["image"]) for p in parts) == 0:
            raise EODataError(f"TS-fusion pairs of split {split!r} (years {list(years)}, crops {self.crops}) under "
                              f"{self.root} are empty: {errors or self.skipped}")
        if self.skipped["few_observed_days"]:
            logger.warning("TS-fusion %s: dropped %d pairs with < %.0f%% observed weather days", split,
                           self.skipped["few_observed_days"], 100 * self.min_observed)
        shapes = {tuple(p["image"].shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise EODataError(f"grid images of different sizes {sorted(shapes)}: set image_size")
        tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if self.max_pairs is not None and len(tensors["image"]) > self.max_pairs:
            gen = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(len(tensors["image"]), generator=gen)[: self.max_pairs].sort().values
            tensors = {k: v[idx] for k, v in tensors.items()}
        return PairDataset(tensors)

    def setup(self, stage: str) -> None:
        """Build the pair datasets ``stage`` needs."""
        if stage == "fit":
            self.pairs("train")
        if stage in ("fit", "validate"):
            self.pairs("val")
        if stage in ("test", "predict"):
            self.pairs("test" if "test" in self.split_years else "val")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.pairs(split), batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed)
                          if shuffle else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.split_years else "val", False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

