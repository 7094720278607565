"""CropNet: county-level crop yield from Sentinel-2, WRF-HRRR weather and USDA statistics (Lin et al., 2024).

Reads the real CropNet release (``CropNet/CropNet`` on Hugging Face) unchanged. Default layout
(every root and the crop folder names are configurable, since releases and tutorials differ)::

    {root}/Sentinel-2 Imagery/data/{AG|NDVI}/{YYYY}/{ST}/{Agriculture|NDVI}_{stateFIPS}_{ST}_{start}_{end}.h5
        /{5-digit FIPS}/{YYYY-MM-DD}/data          G x H x W x C (uint8; 224 x 224 x 3 in the release)
                                    /coordinates   G x 2 x 2  [[lower-left lat, lon], [upper-right lat, lon]]
                                    /state, /county  byte strings
    {root}/WRF-HRRR Computed Dataset/data/{YYYY}/{ST}/HRRR_{stateFIPS}_{ST}_{YYYY}-{MM}.csv   (23 columns)
    {root}/USDA Crop Dataset/{Corn|Cotton|Soybeans|WinterWheat}/{YYYY}/USDA_{Crop}_County_{YYYY}.csv

One sample per county-year of a crop (MMST-ViT protocol, see ``../shared/reference/datasets.md`` section 3):

* ``image``: ``T x G x C x H x W`` float32, the county's ``G`` grid images (~9 x 9 km each) on the
  ``T`` dates of ``image_months`` (``/255``, then ``(x - image_mean) / image_std`` if given);
  with ``grid_aggregation="mean"``: ``C x T x H x W`` averaged over grids.
* ``grid_coords``: ``G x 2 x 2`` grid corners (lat, lon); ``location_coords``: ``(lat, lon)`` of the
  county (mean grid centre); ``temporal_coords``: ``T x 2`` (year, day of year); ``dates``: ISO strings.
* ``weather_short``: ``months x days_per_month x G x V`` daily weather of the sample year and
  ``weather_short_mask`` (``months x days_per_month`` bool).
* ``weather_long``: ``long_term_years x 12 x G x V`` monthly weather of the preceding years and
  ``weather_long_mask`` (``long_term_years x 12`` bool). With ``grid_aggregation="mean"`` the ``G``
  axis of both weather tensors is averaged away.
* ``target``: ``[log(production), log(yield)]`` float32; ``label``: the selected regression target
  (``target="yield"``: ``[log yield]``, ``"production"``: ``[log production]``, ``"both"``: both), the
  key terratorch's ``ScalarRegressionTask`` reads.
* ``fips`` (5-digit str), ``year`` (int), ``state``, ``county`` (str), ``n_grids`` (int).
* with ``window_weather`` (TS fusion): ``weather_windows``, ``T x G x V' x L`` daily weather of those variables
  in the window of ``L = window_before + 1 + window_after`` days around every image date
  (:func:`~terratorch_eoplugins.datasets.weather_windows.weather_windows`).

Weather grids are matched to image grids by nearest grid centre (the two come from the same
county partition in the release, so this is the identity up to order).

Missing weather is handled explicitly and never produces a NaN:

* daily values missing in a row (empty cell) or whole missing day rows are linearly interpolated
  in time over the season per grid and variable (nearest observed value at the season's edges);
  a grid without any value of a variable takes the mean of the county's other grids;
  ``weather_short_mask`` is ``False`` on such days and on calendar days that do not exist
  (e.g. June 31; those repeat the month's last day);
* long-term monthly values that are missing (file, county or cell) are filled with the mean of
  the same month over the available years, else the county's mean, and masked in
  ``weather_long_mask``.

County-years are skipped, with a logged count per reason (see :attr:`CropNet.skipped`), when the
USDA row has no county code, no (or a withheld) yield or production, when no image group of the
county exists for the sample year (no grids), or when the daily weather of a short-term month or
of a whole variable is missing. A split that ends empty raises :class:`EODataError`.

Evaluation (:func:`terratorch_eoplugins.metrics.cropnet_metrics`): RMSE, MAE, Pearson ``r``, ``r2_pearson`` =
squared Pearson correlation (what MMST-ViT's ``util/metrics.py`` and the papers call R^2) and ``R2`` = the
coefficient of determination, all on ``exp`` of the predicted and true log yields, pooled over counties.
"""

from __future__ import annotations

import calendar
import datetime as dt
import re
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h5py
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor
from torchgeo.datasets import NonGeoDataset

from terratorch_eoplugins.datasets.common import collate_samples, logger
from terratorch_eoplugins.datasets.weather_windows import hrrr_columns, weather_windows
from terratorch_eoplugins.errors import EODataError, EODatasetNotFoundError, check_array, require_dir

__all__ = [
    "CROPS",
    "CROPNET_SPLIT_YEARS",
    "PAPER_STATES",
    "US_STATES",
    "resolve_states",
    "HRRR_VARIABLES",
    "WEATHER_VARIABLES",
    "CropNet",
    "cropnet_collate",
]

#: Crop names (the USDA folder names of the Hugging Face release).
CROPS: tuple[str, ...] = ("Corn", "Cotton", "Soybeans", "WinterWheat")
#: Default years of each split (MMST-ViT: train 2021, evaluate 2022; 2020 held out as test).
CROPNET_SPLIT_YEARS: dict[str, tuple[int, ...]] = {"train": (2021,), "val": (2022,), "test": (2020,)}

#: US states (and DC): name -> (FIPS code, USPS abbreviation), to select CropNet counties by state
US_STATES: dict[str, tuple[str, str]] = {
    "Alabama": ("01", "AL"), "Alaska": ("02", "AK"), "Arizona": ("04", "AZ"), "Arkansas": ("05", "AR"),
    "California": ("06", "CA"), "Colorado": ("08", "CO"), "Connecticut": ("09", "CT"), "Delaware": ("10", "DE"),
    "District of Columbia": ("11", "DC"), "Florida": ("12", "FL"), "Georgia": ("13", "GA"), "Hawaii": ("15", "HI"),
    "Idaho": ("16", "ID"), "Illinois": ("17", "IL"), "Indiana": ("18", "IN"), "Iowa": ("19", "IA"),
    "Kansas": ("20", "KS"), "Kentucky": ("21", "KY"), "Louisiana": ("22", "LA"), "Maine": ("23", "ME"),
    "Maryland": ("24", "MD"), "Massachusetts": ("25", "MA"), "Michigan": ("26", "MI"), "Minnesota": ("27", "MN"),
    "Mississippi": ("28", "MS"), "Missouri": ("29", "MO"), "Montana": ("30", "MT"), "Nebraska": ("31", "NE"),
    "Nevada": ("32", "NV"), "New Hampshire": ("33", "NH"), "New Jersey": ("34", "NJ"), "New Mexico": ("35", "NM"),
    "New York": ("36", "NY"), "North Carolina": ("37", "NC"), "North Dakota": ("38", "ND"), "Ohio": ("39", "OH"),
    "Oklahoma": ("40", "OK"), "Oregon": ("41", "OR"), "Pennsylvania": ("42", "PA"), "Rhode Island": ("44", "RI"),
    "South Carolina": ("45", "SC"), "South Dakota": ("46", "SD"), "Tennessee": ("47", "TN"), "Texas": ("48", "TX"),
    "Utah": ("49", "UT"), "Vermont": ("50", "VT"), "Virginia": ("51", "VA"), "Washington": ("53", "WA"),
    "West Virginia": ("54", "WV"), "Wisconsin": ("55", "WI"), "Wyoming": ("56", "WY"),
}

#: TS fusion's per-crop state subsets (Basile et al. 2025, appendix A.2: "select the following states per crop type
#: to ensure sufficient sample sizes"): cotton 17 states, winter wheat 5, soybeans and corn 4 (the same 4)
PAPER_STATES: dict[str, tuple[str, ...]] = {
    "Cotton": ("Alabama", "Arizona", "Arkansas", "California", "Florida", "Georgia", "Kansas", "Louisiana",
               "Mississippi", "Missouri", "New Mexico", "North Carolina", "Oklahoma", "South Carolina", "Tennessee",
               "Texas", "Virginia"),
    "WinterWheat": ("Illinois", "Indiana", "Kansas", "Kentucky", "Mississippi"),
    "Soybeans": ("Illinois", "Iowa", "Louisiana", "Mississippi"),
    "Corn": ("Illinois", "Iowa", "Louisiana", "Mississippi"),
}


def resolve_states(states: str | Sequence[str] | None, crop: str) -> frozenset[str] | None:
    """State FIPS codes of a state selection: ``None`` (all states), ``"paper"`` (:data:`PAPER_STATES` of ``crop``)
    or a list of state names (``Iowa``), USPS abbreviations (``IA``) or 2-digit FIPS codes (``19``), any case.

    Raises:
        ValueError: naming every unknown state, or for an empty list.
    """
    if states is None:
        return None
    if isinstance(states, str):
        if states.strip().lower() != "paper":
            raise ValueError(f"states: expected null, 'paper' or a list of US state names, got the string {states!r} "
                             "(write a single state as a one-item list)")
        if crop not in PAPER_STATES:
            raise ValueError(f"states: 'paper' has no state list for crop {crop!r}; known: {list(PAPER_STATES)}")
        states = PAPER_STATES[crop]
    states = list(states)
    if not states:
        raise ValueError("states: expected a non-empty list of US states (or null for all states)")
    lookup: dict[str, str] = {}
    for name, (fips, abbr) in US_STATES.items():
        lookup[name.lower()] = lookup[abbr.lower()] = lookup[fips] = fips
    out, unknown = set(), []
    for s in states:
        key = str(s).strip().lower()
        key = key.zfill(2) if key.isdigit() else key
        if key in lookup:
            out.add(lookup[key])
        else:
            unknown.append(s)
    if unknown:
        raise ValueError(f"states: unknown US state(s) {unknown}; expected names such as 'Iowa', USPS codes such as "
                         "'IA' or 2-digit FIPS codes such as '19'")
    return frozenset(out)
#: The 11 meteorological columns of a WRF-HRRR CSV.
HRRR_VARIABLES: tuple[str, ...] = (
    "Avg Temperature (K)", "Max Temperature (K)", "Min Temperature (K)", "Precipitation (kg m**-2)",
    "Relative Humidity (%)", "Wind Gust (m s**-1)", "Wind Speed (m s**-1)", "U Component of Wind (m s**-1)",
    "V Component of Wind (m s**-1)", "Downward Shortwave Radiation Flux (W m**-2)", "Vapor Pressure Deficit (kPa)",
)
#: The 9 variables used by default (CropNet package / MMST-ViT).
WEATHER_VARIABLES: tuple[str, ...] = (
    "Avg Temperature (K)", "Max Temperature (K)", "Min Temperature (K)", "Precipitation (kg m**-2)",
    "Relative Humidity (%)", "Wind Gust (m s**-1)", "Wind Speed (m s**-1)",
    "Downward Shortwave Radiation Flux (W m**-2)", "Vapor Pressure Deficit (kPa)",
)
_HRRR_KEYS = ("Daily/Monthly", "FIPS Code", "Grid Index", "Month", "Day",
              "Lat (llcrnr)", "Lon (llcrnr)", "Lat (urcrnr)", "Lon (urcrnr)")
_S2_PREFIX = {"AG": "Agriculture", "NDVI": "NDVI"}
_S2_NAME = re.compile(r"^(?P<prefix>[A-Za-z]+)_(?P<sf>\d{1,2})_(?P<st>[A-Za-z]{2})_"
                      r"(?P<d0>\d{4}-\d{2}-\d{2})_(?P<d1>\d{4}-\d{2}-\d{2})\.h5$")
_PRODUCTION_PREFIX = "PRODUCTION, MEASURED IN"
_YIELD_PREFIX = "YIELD, MEASURED IN"
_HRRR_CACHE_FILES = 48


# ------------------------------------------------------------------------------------ file parsing
@dataclass
class _CountyHRRR:
    """One county's rows of one HRRR CSV."""

    grids: dict[int, tuple[float, float, float, float]]  # grid index -> ll lat, ll lon, ur lat, ur lon
    daily_grid: np.ndarray
    daily_day: np.ndarray
    daily_values: np.ndarray  # (n, V)
    monthly_grid: np.ndarray
    monthly_values: np.ndarray  # (m, V)


def _numeric(series: pd.Series) -> np.ndarray:
    """Parse a CSV column to float64: thousands separators removed, non-numbers (``(D)``, empty) -> NaN."""
    if pd.api.types.is_numeric_dtype(series):
        return series.to_numpy(np.float64, na_value=np.nan)
    text = series.astype(str).str.replace(",", "", regex=False).str.strip()
    return pd.to_numeric(text, errors="coerce").to_numpy(np.float64, na_value=np.nan)


def _read_hrrr(path: Path, variables: Sequence[str]) -> dict[str, _CountyHRRR]:
    """Parse a WRF-HRRR CSV into per-county arrays of the requested variables."""
    try:
        df = pd.read_csv(path, low_memory=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise EODataError(f"{path}: cannot parse WRF-HRRR CSV ({err})") from err
    df.columns = [str(c).strip() for c in df.columns]
    for col in (*_HRRR_KEYS, *variables):
        if col not in df.columns:
            raise EODataError(f"{path}: missing column {col!r} (a WRF-HRRR CSV has the 23 columns Year, Month, Day, "
                              f"Daily/Monthly, ..., {', '.join(HRRR_VARIABLES)})")
    fips_num = _numeric(df["FIPS Code"])
    grid = _numeric(df["Grid Index"])
    ok = np.isfinite(fips_num) & np.isfinite(grid)
    if not ok.all():
        logger.warning("%s: ignored %d rows without FIPS Code or Grid Index", path, int((~ok).sum()))
    kind = df["Daily/Monthly"].astype(str).str.strip().str.lower().to_numpy()
    day = _numeric(df["Day"])
    coords = np.stack([_numeric(df[c]) for c in _HRRR_KEYS[5:]], axis=1)
    values = np.stack([_numeric(df[c]) for c in variables], axis=1) if variables else np.zeros((len(df), 0))
    fips = np.array([f"{int(v):05d}" if np.isfinite(v) else "" for v in fips_num])
    out: dict[str, _CountyHRRR] = {}
    order = np.argsort(fips, kind="stable")
    uniq, starts = np.unique(fips[order], return_index=True)
    bounds = [*starts[1:], len(order)]
    for f, s, e in zip(uniq, starts, bounds):
        if not f:
            continue
        rows = order[s:e]
        rows = rows[ok[rows]]
        g = grid[rows].astype(np.int64)
        grids: dict[int, tuple[float, float, float, float]] = {}
        good = np.isfinite(coords[rows]).all(axis=1)
        ug, first = np.unique(g[good], return_index=True)
        for gi, c in zip(ug, coords[rows][good][first]):
            grids[int(gi)] = (float(c[0]), float(c[1]), float(c[2]), float(c[3]))
        d = kind[rows] == "daily"
        m = kind[rows] == "monthly"
        out[f] = _CountyHRRR(grids, g[d], day[rows][d], values[rows][d], g[m], values[rows][m])
    return out


def _read_usda(path: Path, year: int) -> tuple[pd.DataFrame, str, str]:
    """Read a USDA county CSV; return the frame and its production and yield column names."""
    try:
        df = pd.read_csv(path, dtype=str, low_memory=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise EODataError(f"{path}: cannot parse USDA CSV ({err})") from err
    df.columns = [str(c).strip() for c in df.columns]
    for col in ("state_ansi", "county_ansi"):
        if col not in df.columns:
            raise EODataError(f"{path}: missing column {col!r} (expected the USDA Quick Stats county columns "
                              "commodity_desc, year, state_ansi, state_name, county_ansi, county_name, ...)")
    prod = [c for c in df.columns if c.upper().startswith(_PRODUCTION_PREFIX)]
    yld = [c for c in df.columns if c.upper().startswith(_YIELD_PREFIX)]
    if not prod:
        raise EODataError(f"{path}: missing column 'PRODUCTION, MEASURED IN ...' (e.g. 'PRODUCTION, MEASURED IN BU')")
    if not yld:
        raise EODataError(f"{path}: missing column 'YIELD, MEASURED IN ...' (e.g. 'YIELD, MEASURED IN BU / ACRE')")
    if "year" in df.columns:
        years = _numeric(df["year"])
        df = df[(years == year) | ~np.isfinite(years)]
    if "reference_period_desc" in df.columns:
        ref = df["reference_period_desc"].astype(str).str.strip().str.upper()
        if (ref == "YEAR").any():
            df = df[ref == "YEAR"]
    return df, prod[0], yld[0]


def _decode(value: Any) -> str:
    arr = np.asarray(value).ravel()
    if arr.size == 0:
        return ""
    v = arr[0]
    return v.decode("utf-8", "replace").strip() if isinstance(v, bytes) else str(v).strip()


# ----------------------------------------------------------------------------------------- dataset
@dataclass
class _Entry:
    fips: str
    year: int
    state_fips: str
    st: str
    state: str
    county: str
    log_production: float
    log_yield: float
    s2: list[tuple[Path, list[str]]] = field(default_factory=list)  # (file, dates of the county in it)


class CropNet(NonGeoDataset):
    """County-year crop yield samples of CropNet (Sentinel-2 HDF5 + WRF-HRRR CSV + USDA CSV).

    See the module docstring for the layout, the sample keys and the missing-data policy.
    """

    def __init__(
        self,
        root: str | Path = "data/CropNet",
        crop: str = "Soybeans",
        split: str = "train",
        years: Sequence[int] | None = None,
        split_years: Mapping[str, Sequence[int]] | None = None,
        months: Sequence[int] = (4, 5, 6, 7, 8, 9),
        image_months: Sequence[int] | None = None,
        long_term_years: int = 5,
        days_per_month: int = 31,
        image_size: int | None = None,
        max_dates: int | None = None,
        weather_variables: Sequence[str] = WEATHER_VARIABLES,
        target: Literal["yield", "production", "both"] = "yield",
        grid_aggregation: Literal["none", "mean"] = "none",
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        weather_mean: Sequence[float] | None = None,
        weather_std: Sequence[float] | None = None,
        weather_long_mean: Sequence[float] | None = None,
        weather_long_std: Sequence[float] | None = None,
        s2_root: str = "Sentinel-2 Imagery/data",
        s2_product: Literal["AG", "NDVI"] = "AG",
        hrrr_root: str = "WRF-HRRR Computed Dataset/data",
        usda_root: str = "USDA Crop Dataset",
        crop_dirs: Mapping[str, str] | None = None,
        window_weather: Sequence[str] | None = None,
        window_before: int = 29,
        window_after: int = 10,
        states: str | Sequence[str] | None = None,
    ) -> None:
        """Index the county-years of ``crop`` in the years of ``split`` (or ``years``).

        Args:
            root: CropNet root folder (the three sub-roots below are relative to it, or absolute).
            crop: ``Corn``, ``Cotton``, ``Soybeans`` or ``WinterWheat``.
            split: ``train``, ``val`` or ``test`` (a key of ``split_years``); ignored when ``years`` is given.
            years: Explicit sample years.
            split_years: Years of each split (default :data:`CROPNET_SPLIT_YEARS`).
            months: Months of the daily (short-term) weather.
            image_months: Months of the images (default: ``months``).
            long_term_years: Number of preceding years of monthly (long-term) weather.
            days_per_month: Days kept per month of daily weather (31 keeps all with a mask; MMST-ViT uses 28).
            image_size: Resize grid images to this side (bilinear, antialiased); ``None`` keeps the file's size.
            max_dates: Keep at most this many image dates, evenly spaced.
            weather_variables: HRRR columns to read (default: the 9 CropNet variables).
            target: Regression target exposed as ``label``.
            grid_aggregation: ``none`` keeps grids (``T x G x C x H x W``); ``mean`` averages them (``C x T x H x W``).
            image_mean, image_std: Per-channel statistics applied after ``/255``.
            weather_mean, weather_std: Per-variable statistics of the daily weather.
            weather_long_mean, weather_long_std: Per-variable statistics of the monthly weather.
            s2_root, s2_product, hrrr_root, usda_root: Sub-roots of the three modalities.
            crop_dirs: Folder name of each crop under ``usda_root`` (e.g. ``{"Soybeans": "Soybean"}``).
            window_weather: Short names (``tavg``, ``precip``..., see
                :data:`~terratorch_eoplugins.datasets.weather_windows.TSFUSION_WEATHER`) of the variables of
                ``weather_windows``, TS fusion's daily weather around every image date (they must be among
                ``weather_variables``; needs ``grid_aggregation="none"`` and ``days_per_month=31``); ``None``: no
                windows.
            window_before, window_after: Days before / after the acquisition day in ``weather_windows``.
            states: Keep only the counties of these states (:func:`resolve_states`: names, USPS codes or FIPS codes;
                ``"paper"``: TS fusion's per-crop subset, :data:`PAPER_STATES`); ``None`` keeps every state.
        """
        self.root = Path(root)
        self.crop = self._canonical_crop(crop)
        self.state_fips = resolve_states(states, self.crop)
        splits = {k: tuple(int(y) for y in v) for k, v in (split_years or CROPNET_SPLIT_YEARS).items()}
        if years is None:
            if split not in splits:
                raise ValueError(f"split must be one of {sorted(splits)}, got {split!r}")
            years = splits[split]
        self.split = split
        self.years = tuple(int(y) for y in years)
        if not self.years:
            raise ValueError("years must not be empty")
        self.months = self._check_months(months, "months")
        self.image_months = self._check_months(image_months if image_months is not None else months, "image_months")
        if long_term_years < 0:
            raise ValueError(f"long_term_years must be >= 0, got {long_term_years}")
        self.long_term_years = int(long_term_years)
        if not 1 <= days_per_month <= 31:
            raise ValueError(f"days_per_month must be in 1..31, got {days_per_month}")
        self.days_per_month = int(days_per_month)
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size}")
        self.image_size = image_size
        if max_dates is not None and max_dates < 1:
            raise ValueError(f"max_dates must be >= 1, got {max_dates}")
        self.max_dates = max_dates
        unknown = [v for v in weather_variables if v not in HRRR_VARIABLES]
        if unknown or not weather_variables:
            raise ValueError(f"weather_variables {unknown or list(weather_variables)} are not WRF-HRRR columns; "
                             f"expected a non-empty subset of {list(HRRR_VARIABLES)}")
        self.weather_variables = tuple(weather_variables)
        if target not in ("yield", "production", "both"):
            raise ValueError(f"target must be 'yield', 'production' or 'both', got {target!r}")
        self.target = target
        if grid_aggregation not in ("none", "mean"):
            raise ValueError(f"grid_aggregation must be 'none' or 'mean', got {grid_aggregation!r}")
        self.grid_aggregation = grid_aggregation
        self._set_windows(window_weather, window_before, window_after)
        self.set_statistics(image_mean, image_std, weather_mean, weather_std, weather_long_mean, weather_long_std)
        if s2_product not in _S2_PREFIX:
            raise ValueError(f"s2_product must be 'AG' or 'NDVI', got {s2_product!r}")
        self.s2_product = s2_product
        dirs = {c: c for c in CROPS}
        dirs.update({self._canonical_crop(k): str(v) for k, v in (crop_dirs or {}).items()})
        self.crop_dir = dirs[self.crop]

        require_dir(self.root, "CropNet root folder")
        self.s2_dir = require_dir(self.root / s2_root / s2_product, "CropNet Sentinel-2 imagery folder")
        self.hrrr_dir = require_dir(self.root / hrrr_root, "CropNet WRF-HRRR folder")
        self.usda_dir = require_dir(self.root / usda_root / self.crop_dir, f"CropNet USDA folder of {self.crop}")

        self._hrrr_cache: OrderedDict[Path, dict[str, _CountyHRRR]] = OrderedDict()
        self._monthly_cache: dict[Path, dict[str, tuple[np.ndarray, np.ndarray, dict]] | None] = {}
        self.skipped: dict[str, int] = {"no_county_code": 0, "no_yield": 0, "no_images": 0, "no_weather": 0,
                                        "other_state": 0}
        self._entries: list[_Entry] = []
        for year in self.years:
            self._entries.extend(self._index_year(year))
        self._report()

    def set_statistics(self, image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None,
                       weather_mean: Sequence[float] | None = None, weather_std: Sequence[float] | None = None,
                       weather_long_mean: Sequence[float] | None = None,
                       weather_long_std: Sequence[float] | None = None) -> None:
        """Set (or clear, with ``None``) the normalisation statistics applied by :meth:`__getitem__`."""
        nv = len(self.weather_variables)
        self.image_mean, self.image_std = self._stats(image_mean, image_std, None, "image_mean/image_std")
        self.weather_mean, self.weather_std = self._stats(weather_mean, weather_std, nv, "weather_mean/weather_std")
        self.weather_long_mean, self.weather_long_std = self._stats(weather_long_mean, weather_long_std, nv,
                                                                    "weather_long_mean/weather_long_std")

    def _set_windows(self, weather: Sequence[str] | None, before: int, after: int) -> None:
        """Check and keep the settings of the ``weather_windows`` key."""
        self.window_weather = None if weather is None else tuple(weather)
        self.window_before, self.window_after = int(before), int(after)
        self._window_idx: list[int] = []
        if self.window_weather is None:
            return
        columns = hrrr_columns(self.window_weather)
        missing = [f"{v} ({c})" for v, c in zip(self.window_weather, columns) if c not in self.weather_variables]
        if missing:
            raise ValueError(f"window_weather {missing} are not among weather_variables {list(self.weather_variables)}")
        if self.grid_aggregation != "none" or self.days_per_month != 31:
            raise ValueError("window_weather needs the grids and every calendar day: grid_aggregation='none' and "
                             f"days_per_month=31, got {self.grid_aggregation!r} and {self.days_per_month}")
        if before < 0 or after < 0:
            raise ValueError(f"window_before and window_after must be >= 0, got {before}, {after}")
        self._window_idx = [self.weather_variables.index(c) for c in columns]

    # ------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _canonical_crop(crop: str) -> str:
        key = str(crop).replace(" ", "").replace("_", "").lower()
        aliases = {c.lower(): c for c in CROPS} | {"soybean": "Soybeans", "wheat": "WinterWheat"}
        if key not in aliases:
            raise ValueError(f"unknown crop {crop!r}: expected one of {list(CROPS)}")
        return aliases[key]

    @staticmethod
    def _check_months(months: Sequence[int], name: str) -> tuple[int, ...]:
        out = tuple(int(m) for m in months)
        if not out or any(not 1 <= m <= 12 for m in out) or len(set(out)) != len(out):
            raise ValueError(f"{name} must be distinct months in 1..12, got {list(months)}")
        return out

    @staticmethod
    def _stats(mean: Sequence[float] | None, std: Sequence[float] | None, n: int | None,
               what: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        if mean is None and std is None:
            return None, None
        if mean is None or std is None:
            raise ValueError(f"{what}: give both mean and std, or neither")
        m, s = np.asarray(mean, np.float32).ravel(), np.asarray(std, np.float32).ravel()
        if m.shape != s.shape or (n is not None and m.size != n):
            raise ValueError(f"{what}: expected {n if n is not None else 'matching'} values, got {m.size} and {s.size}")
        if not (np.isfinite(m).all() and np.isfinite(s).all() and (s > 0).all()):
            raise ValueError(f"{what}: statistics must be finite with std > 0, got mean={m.tolist()} std={s.tolist()}")
        return m, s

    def _hrrr_path(self, year: int, state_fips: str, st: str, month: int) -> Path:
        return self.hrrr_dir / str(year) / st / f"HRRR_{state_fips}_{st}_{year}-{month:02d}.csv"

    def _hrrr(self, path: Path) -> dict[str, _CountyHRRR]:
        """Parsed HRRR file (LRU cache of the daily part; the small monthly part is kept for good)."""
        if path in self._hrrr_cache:
            self._hrrr_cache.move_to_end(path)
            return self._hrrr_cache[path]
        data = _read_hrrr(path, self.weather_variables)
        self._hrrr_cache[path] = data
        if len(self._hrrr_cache) > _HRRR_CACHE_FILES:
            self._hrrr_cache.popitem(last=False)
        self._monthly_cache[path] = {f: (c.monthly_grid, c.monthly_values, c.grids) for f, c in data.items()}
        return data

    def _monthly(self, path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, dict]] | None:
        if path not in self._monthly_cache:
            if not path.is_file():
                self._monthly_cache[path] = None
            else:
                self._hrrr(path)
        return self._monthly_cache[path]

    def _usda_path(self, year: int) -> Path:
        folder = self.usda_dir / str(year)
        path = folder / f"USDA_{self.crop_dir}_County_{year}.csv"
        if path.is_file():
            return path
        found = sorted(folder.glob(f"USDA_*_County_{year}.csv")) if folder.is_dir() else []
        if len(found) == 1:
            return found[0]
        raise EODatasetNotFoundError(path, f"CropNet USDA {self.crop} file of {year}")

    def _s2_files(self, year: int) -> dict[str, list[tuple[Path, str]]]:
        """State FIPS -> [(h5 file, state abbreviation)] of ``year`` overlapping :attr:`image_months`."""
        out: dict[str, list[tuple[Path, str]]] = {}
        folder = self.s2_dir / str(year)
        if not folder.is_dir():
            return out
        prefix = _S2_PREFIX[self.s2_product]
        for path in sorted(folder.glob("*/*.h5")):
            m = _S2_NAME.match(path.name)
            if m is None or m["prefix"] != prefix:
                logger.debug("CropNet: ignoring %s (not a %s_{FIPS}_{ST}_{start}_{end}.h5 file)", path, prefix)
                continue
            d0, d1 = dt.date.fromisoformat(m["d0"]), dt.date.fromisoformat(m["d1"])
            months = {(d0.year, d0.month)}
            cur = d0
            while (cur.year, cur.month) < (d1.year, d1.month):
                cur = dt.date(cur.year + cur.month // 12, cur.month % 12 + 1, 1)
                months.add((cur.year, cur.month))
            if any(y == year and mo in self.image_months for y, mo in months):
                out.setdefault(m["sf"].zfill(2), []).append((path, m["st"].upper()))
        return out

    def _date_ok(self, key: str, year: int) -> bool:
        try:
            d = dt.date.fromisoformat(key)
        except ValueError:
            return False
        return d.year == year and d.month in self.image_months

    # -------------------------------------------------------------------------------------- index
    def _index_year(self, year: int) -> list[_Entry]:
        path = self._usda_path(year)
        df, prod_col, yld_col = _read_usda(path, year)
        state = _numeric(df["state_ansi"])
        county = _numeric(df["county_ansi"])
        prod = _numeric(df[prod_col])
        yld = _numeric(df[yld_col])
        names_s = df["state_name"].astype(str).str.strip().tolist() if "state_name" in df.columns else [""] * len(df)
        names_c = df["county_name"].astype(str).str.strip().tolist() if "county_name" in df.columns else [""] * len(df)

        s2 = self._s2_files(year)
        county_dates: dict[str, list[tuple[Path, list[str]]]] = {}
        for _sf, files in s2.items():
            for f, _ in files:
                try:
                    with h5py.File(f, "r") as h5:
                        for fips in h5.keys():
                            grp = h5[fips]
                            if not isinstance(grp, h5py.Group):
                                continue
                            dates = sorted(k for k in grp.keys() if self._date_ok(k, year))
                            if dates:
                                county_dates.setdefault(str(fips), []).append((f, dates))
                except OSError as err:
                    raise EODataError(f"{f}: cannot open Sentinel-2 HDF5 file ({err})") from err

        st_of = {sf: files[0][1] for sf, files in s2.items()}
        file_st = {f: st for files in s2.values() for f, st in files}
        entries: list[_Entry] = []
        seen: set[str] = set()
        duplicates = 0
        for i in range(len(df)):
            if not (np.isfinite(state[i]) and np.isfinite(county[i])):
                self.skipped["no_county_code"] += 1
                continue
            sf, fips = f"{int(state[i]):02d}", f"{int(state[i]):02d}{int(county[i]):03d}"
            if self.state_fips is not None and sf not in self.state_fips:
                self.skipped["other_state"] += 1
                continue
            if fips in seen:
                duplicates += 1
                continue
            seen.add(fips)
            if not (np.isfinite(yld[i]) and yld[i] > 0 and np.isfinite(prod[i]) and prod[i] > 0):
                self.skipped["no_yield"] += 1
                continue
            if fips not in county_dates:
                self.skipped["no_images"] += 1
                continue
            st = st_of.get(sf) or file_st[county_dates[fips][0][0]]
            if not self._has_weather(fips, year, sf, st):
                self.skipped["no_weather"] += 1
                continue
            entries.append(_Entry(fips, year, sf, st, names_s[i], names_c[i], float(np.log(prod[i])),
                                  float(np.log(yld[i])), county_dates[fips]))
        if duplicates:
            logger.warning("%s: ignored %d duplicate county rows (kept the first of each FIPS)", path, duplicates)
        return entries

    def _has_weather(self, fips: str, year: int, sf: str, st: str) -> bool:
        observed = np.zeros(len(self.weather_variables), bool)
        for month in self.months:
            path = self._hrrr_path(year, sf, st, month)
            if not path.is_file():
                return False
            c = self._hrrr(path).get(fips)
            if c is None or len(c.daily_day) == 0:
                return False
            observed |= np.isfinite(c.daily_values).any(axis=0)
        return bool(observed.all())

    def _report(self) -> None:
        what = {"no_county_code": "without county code", "no_yield": "without USDA yield/production",
                "no_images": "without Sentinel-2 images (no grid group)", "no_weather": "without daily weather"}
        if self.skipped["other_state"]:
            logger.info("CropNet %s %s: left out %d county-years outside the selected states", self.crop,
                        list(self.years), self.skipped["other_state"])
        for key, n in self.skipped.items():
            if n and key in what:
                logger.warning("CropNet %s %s: skipped %d county-years %s", self.crop, list(self.years), n, what[key])
        if not self._entries:
            raise EODataError(
                f"CropNet {self.crop} split {self.split!r} (years {list(self.years)}) is empty: no county-year has a "
                f"USDA yield, images under {self.s2_dir} and daily weather under {self.hrrr_dir}"
                f"{'' if self.state_fips is None else ' in the selected states ' + str(sorted(self.state_fips))} "
                f"(skipped: {self.skipped})")
        if self.long_term_years:
            missing = total = 0
            for key in {(e.year, e.state_fips, e.st) for e in self._entries}:
                year, sf, st = key
                for y in range(year - self.long_term_years, year):
                    for m in range(1, 13):
                        total += 1
                        missing += not self._hrrr_path(y, sf, st, m).is_file()
            if missing:
                logger.warning("CropNet %s: %d of %d long-term monthly HRRR files are missing (filled and masked "
                               "in weather_long_mask)", self.crop, missing, total)

    # ------------------------------------------------------------------------------------ records
    def __len__(self) -> int:
        return len(self._entries)

    @property
    def records(self) -> list[dict[str, Any]]:
        """Metadata and targets of every sample, in index order (no file is read)."""
        return [dict(fips=e.fips, year=e.year, state=e.state, county=e.county, log_production=e.log_production,
                     log_yield=e.log_yield) for e in self._entries]

    # ----------------------------------------------------------------------------------- reading
    def _load_images(self, e: _Entry) -> tuple[np.ndarray, np.ndarray, list[str], str, str]:
        """Raw images ``T x G x H x W x C``, grid corners ``G x 2 x 2``, dates, state and county names."""
        frames: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        state = county = ""
        for path, dates in e.s2:
            with h5py.File(path, "r") as h5:
                grp = h5[e.fips]
                for key in dates:
                    where = f"{path}:/{e.fips}/{key}"
                    g = grp[key]
                    for name in ("data", "coordinates"):
                        if name not in g:
                            raise EODataError(f"{where}: missing dataset {name!r}")
                    data = check_array(np.asarray(g["data"][()]), f"{where}/data", ndim=4,
                                       dtypes=(np.uint8, np.float32, np.float64))
                    coords = check_array(np.asarray(g["coordinates"][()], np.float64), f"{where}/coordinates",
                                         shape=(data.shape[0], 2, 2))
                    if data.shape[0] == 0:
                        raise EODataError(f"{where}/data: no grid images (shape {data.shape})")
                    if not state and "state" in g:
                        state = _decode(g["state"][()])
                    if not county and "county" in g:
                        county = _decode(g["county"][()])
                    frames[key] = (data, coords)
        keys = sorted(frames)
        # reference: the grid set (and image shape) most dates share, the earliest on ties, not the first date's;
        # dates of another grid set are skipped, logged and counted in ``dropped_dates`` (real CropNet has them)
        groups: list[list[str]] = []
        for k in keys:
            same = next((g for g in groups if frames[k][0].shape == frames[g[0]][0].shape
                         and np.allclose(frames[k][1], frames[g[0]][1], atol=1e-4)), None)
            if same is None:
                groups.append([k])
            else:
                same.append(k)
        kept = max(groups, key=len)
        ref_coords = frames[kept[0]][1]
        if len(kept) < len(keys):
            dropped = [k for k in keys if k not in kept]
            self.dropped_dates = getattr(self, "dropped_dates", 0) + len(dropped)
            logger.warning("CropNet %s/%d: dropped %d of %d dates whose grids or image shape differ from the %d "
                           "dates sharing one grid set (from %s): %s", e.fips, e.year, len(dropped), len(keys),
                           len(kept), kept[0], ", ".join(dropped))
        if self.max_dates is not None and len(kept) > self.max_dates:
            idx = np.unique(np.round(np.linspace(0, len(kept) - 1, self.max_dates)).astype(int))
            kept = [kept[i] for i in idx]
        images = np.stack([frames[k][0] for k in kept])
        return images, ref_coords, kept, state or e.state, county or e.county

    def _weather_grids(self, e: _Entry) -> tuple[list[int], np.ndarray]:
        """HRRR grid indices of the county (sorted) and their corners ``Gw x 4``."""
        grids: dict[int, tuple[float, float, float, float]] = {}
        for month in self.months:
            c = self._hrrr(self._hrrr_path(e.year, e.state_fips, e.st, month)).get(e.fips)
            if c is not None:
                for k, v in c.grids.items():
                    grids.setdefault(k, v)
        keys = sorted(grids)
        return keys, np.array([grids[k] for k in keys], np.float64).reshape(-1, 4)

    @staticmethod
    def _match_grids(image_coords: np.ndarray, weather_coords: np.ndarray) -> np.ndarray:
        """For each image grid, the index of the weather grid with the nearest centre."""
        ic = image_coords.mean(axis=1)  # G x (lat, lon)
        wc = np.stack([(weather_coords[:, 0] + weather_coords[:, 2]) / 2,
                       (weather_coords[:, 1] + weather_coords[:, 3]) / 2], axis=1)
        coslat = np.cos(np.deg2rad(ic[:, :1]))
        d = (ic[:, None, 0] - wc[None, :, 0]) ** 2 + ((ic[:, None, 1] - wc[None, :, 1]) * coslat) ** 2
        return d.argmin(axis=1)

    def _short_weather(self, e: _Entry, grid_keys: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Daily weather ``M x D x Gw x V`` (NaN-free) and its mask ``M x D``."""
        pos = {k: i for i, k in enumerate(grid_keys)}
        m_, g_, v_ = len(self.months), len(grid_keys), len(self.weather_variables)
        arr = np.full((m_, 31, g_, v_), np.nan)  # full calendar; truncated to days_per_month at the end
        calendar_ok = np.zeros((m_, 31), bool)
        for mi, month in enumerate(self.months):
            ndays = calendar.monthrange(e.year, month)[1]
            calendar_ok[mi, :ndays] = True
            c = self._hrrr(self._hrrr_path(e.year, e.state_fips, e.st, month)).get(e.fips)
            if c is None:
                continue
            day = c.daily_day
            ok = np.isfinite(day) & (day >= 1) & (day <= ndays) & np.isin(c.daily_grid, grid_keys)
            di = day[ok].astype(int) - 1
            gi = np.array([pos[int(g)] for g in c.daily_grid[ok]], int)
            arr[mi, di, gi] = c.daily_values[ok]
        observed = calendar_ok & np.isfinite(arr).all(axis=(2, 3))
        seq = arr[calendar_ok]  # N x Gw x V, consecutive calendar days
        t = np.arange(len(seq))
        for g in range(g_):
            for v in range(v_):
                col = seq[:, g, v]
                fin = np.isfinite(col)
                if fin.all() or not fin.any():
                    continue
                col[~fin] = np.interp(t[~fin], t[fin], col[fin])
        if np.isnan(seq).any():  # grids without any value of a variable: mean of the other grids
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                fill = np.nanmean(seq, axis=1, keepdims=True)
            seq = np.where(np.isnan(seq), np.broadcast_to(fill, seq.shape), seq)
        if np.isnan(seq).any():
            bad = [self.weather_variables[v] for v in range(v_) if np.isnan(seq[..., v]).any()]
            raise EODataError(f"{self._hrrr_path(e.year, e.state_fips, e.st, self.months[0]).parent}: county "
                              f"{e.fips} has no daily value of {bad} in {e.year}")
        arr[calendar_ok] = seq
        for mi, month in enumerate(self.months):  # non-existent calendar days repeat the month's last day
            ndays = calendar.monthrange(e.year, month)[1]
            arr[mi, ndays:] = arr[mi, ndays - 1]
        d_ = self.days_per_month
        return arr[:, :d_], observed[:, :d_]

    def _long_weather(self, e: _Entry, grid_keys: list[int], short: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Monthly weather ``Y x 12 x Gw x V`` of the preceding years (NaN-free) and its mask ``Y x 12``."""
        pos = {k: i for i, k in enumerate(grid_keys)}
        y_, g_, v_ = self.long_term_years, len(grid_keys), len(self.weather_variables)
        arr = np.full((y_, 12, g_, v_), np.nan)
        for yi, year in enumerate(range(e.year - y_, e.year)):
            for month in range(1, 13):
                data = self._monthly(self._hrrr_path(year, e.state_fips, e.st, month))
                if data is None or e.fips not in data:
                    continue
                grid, values, _ = data[e.fips]
                for g, val in zip(grid, values):
                    if int(g) in pos:
                        arr[yi, month - 1, pos[int(g)]] = val
        mask = np.isfinite(arr).all(axis=(2, 3))
        if y_ and np.isnan(arr).any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # "Mean of empty slice" on fully missing gaps
                clim = np.nanmean(arr, axis=0, keepdims=True)  # same month, other years
                arr = np.where(np.isnan(arr), np.broadcast_to(clim, arr.shape), arr)
                overall = np.nanmean(arr, axis=(0, 1), keepdims=True)
                arr = np.where(np.isnan(arr), np.broadcast_to(overall, arr.shape), arr)
                county = np.nanmean(arr, axis=(0, 1, 2), keepdims=True)
                arr = np.where(np.isnan(arr), np.broadcast_to(county, arr.shape), arr)
            season = short.mean(axis=(0, 1))[None, None]  # no monthly value at all: the season's daily mean
            arr = np.where(np.isnan(arr), np.broadcast_to(season, arr.shape), arr)
        return arr, mask

    def _raw_sample(self, index: int) -> dict[str, Any]:
        e = self._entries[index]
        images, coords, dates, state, county = self._load_images(e)
        keys, wcoords = self._weather_grids(e)
        short, short_mask = self._short_weather(e, keys)
        long, long_mask = self._long_weather(e, keys, short)
        match = self._match_grids(coords, wcoords)
        return dict(entry=e, images=images, coords=coords, dates=dates, state=state, county=county,
                    short=short[:, :, match], short_mask=short_mask, long=long[:, :, match], long_mask=long_mask)

    # ---------------------------------------------------------------------------------- sample
    def __getitem__(self, index: int) -> dict[str, Any]:
        """Return the sample of county-year ``index`` (see the module docstring for the keys)."""
        raw = self._raw_sample(index)
        e: _Entry = raw["entry"]
        img = torch.from_numpy(raw["images"].astype(np.float32)).permute(0, 1, 4, 2, 3)  # T G C H W
        t, g, c, h, w = img.shape
        if self.image_size is not None and (h, w) != (self.image_size, self.image_size):
            img = F.interpolate(img.reshape(t * g, c, h, w), size=(self.image_size, self.image_size),
                                mode="bilinear", align_corners=False, antialias=True)
            img = img.clamp(0.0, 255.0).reshape(t, g, c, self.image_size, self.image_size)
        img = img / 255.0
        if self.image_mean is not None:
            if self.image_mean.size != c:
                raise EODataError(f"image_mean/image_std have {self.image_mean.size} values but the images of "
                                  f"{e.fips}/{e.year} have {c} channels")
            mean = torch.from_numpy(self.image_mean)[:, None, None]
            img = (img - mean) / torch.from_numpy(self.image_std)[:, None, None]
        short = raw["short"]
        long = raw["long"]
        if self.weather_mean is not None:
            short = (short - self.weather_mean) / self.weather_std
        if self.weather_long_mean is not None:
            long = (long - self.weather_long_mean) / self.weather_long_std
        short_t = torch.from_numpy(short.astype(np.float32))
        long_t = torch.from_numpy(long.astype(np.float32))
        if self.grid_aggregation == "mean":
            img = img.mean(dim=1).permute(1, 0, 2, 3).contiguous()  # C T H W
            short_t, long_t = short_t.mean(dim=2), long_t.mean(dim=2)
        coords = raw["coords"]
        dates = [dt.date.fromisoformat(d) for d in raw["dates"]]
        target = torch.tensor([e.log_production, e.log_yield], dtype=torch.float32)
        label = {"yield": target[1:], "production": target[:1], "both": target}[self.target].clone()
        centre = coords.mean(axis=(0, 1))
        sample = {
            "image": img.float(),
            "grid_coords": torch.from_numpy(coords.astype(np.float32)),
            "weather_short": short_t,
            "weather_short_mask": torch.from_numpy(raw["short_mask"]),
            "weather_long": long_t,
            "weather_long_mask": torch.from_numpy(raw["long_mask"]),
            "target": target,
            "label": label,
            "temporal_coords": torch.tensor([[d.year, d.timetuple().tm_yday] for d in dates], dtype=torch.float32),
            "location_coords": torch.tensor(centre, dtype=torch.float32),
            "dates": [d.isoformat() for d in dates],
            "fips": e.fips,
            "year": e.year,
            "state": raw["state"],
            "county": raw["county"],
            "n_grids": int(coords.shape[0]),
        }
        if self.window_weather is not None:
            wins, _, _ = weather_windows(short_t, sample["weather_short_mask"], sample["dates"], self.months,
                                         self.window_before, self.window_after)
            sample["weather_windows"] = wins[:, :, self._window_idx]
        return sample

    # ------------------------------------------------------------------------------ statistics
    def _subset(self, max_samples: int | None, seed: int) -> list[int]:
        n = len(self)
        if max_samples is None or max_samples >= n:
            return list(range(n))
        return sorted(np.random.default_rng(seed).choice(n, size=max_samples, replace=False).tolist())

    def image_statistics(self, max_samples: int | None = 16, seed: int = 0) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the ``/255`` images of up to ``max_samples`` county-years."""
        s = s2 = None
        n = 0
        for i in self._subset(max_samples, seed):
            x = self._load_images(self._entries[i])[0].astype(np.float64) / 255.0
            x = x.reshape(-1, x.shape[-1])
            s = x.sum(0) + (0 if s is None else s)
            s2 = (x**2).sum(0) + (0 if s2 is None else s2)
            n += len(x)
        mean = s / n
        std = np.sqrt(np.maximum(s2 / n - mean**2, 1e-12))
        return mean.tolist(), std.tolist()

    def weather_statistics(self, max_samples: int | None = 64, seed: int = 0) -> dict[str, list[float]]:
        """Per-variable mean/std of observed daily (``weather_mean``/``weather_std``) and monthly
        (``weather_long_mean``/``weather_long_std``) weather of up to ``max_samples`` county-years."""
        short_vals, long_vals = [], []
        for i in self._subset(max_samples, seed):
            e = self._entries[i]
            keys, _ = self._weather_grids(e)
            short, mask = self._short_weather(e, keys)
            short_vals.append(short[mask].reshape(-1, short.shape[-1]))
            if self.long_term_years:
                long, lmask = self._long_weather(e, keys, short)
                long_vals.append(long[lmask].reshape(-1, long.shape[-1]))
        out: dict[str, list[float]] = {}
        for name, vals in (("weather", short_vals), ("weather_long", long_vals)):
            x = np.concatenate(vals) if vals else np.zeros((0, len(self.weather_variables)))
            if len(x) == 0:  # e.g. no long-term file: fall back on the daily statistics
                x = np.concatenate(short_vals)
            out[f"{name}_mean"] = x.mean(0).tolist()
            out[f"{name}_std"] = np.maximum(x.std(0), 1e-6).tolist()
        return out

    # ------------------------------------------------------------------------------------- plot
    def plot(self, sample: Mapping[str, Any], show_titles: bool = True, suptitle: str | None = None,
             max_grids: int = 3, max_dates: int = 4) -> Figure:
        """Plot a few grid images over time, the daily weather curves and the yield.

        Args:
            sample: a sample from :meth:`__getitem__`, optionally with ``prediction`` (log yield).
            show_titles: add panel titles.
            suptitle: optional figure title.
            max_grids: number of grids (rows) shown.
            max_dates: number of dates (columns) shown.
        """
        img = np.asarray(_np(sample["image"]), np.float32)
        if img.ndim == 4:  # C T H W (grid mean)
            img = img.transpose(1, 0, 2, 3)[:, None]
        t, g, c = img.shape[:3]
        if self.image_mean is not None and self.image_mean.size == c:
            img = img * self.image_std[None, None, :, None, None] + self.image_mean[None, None, :, None, None]
        rows, cols = min(g, max_grids), max(2, min(t, max_dates))
        d_idx = np.unique(np.round(np.linspace(0, t - 1, min(t, max_dates))).astype(int))
        dates = list(sample.get("dates", []))
        fig = plt.figure(figsize=(2.6 * cols, 2.4 * rows + 2.8))
        gs = fig.add_gridspec(rows + 1, cols, height_ratios=[1] * rows + [1.2])
        for r in range(rows):
            for k in range(cols):
                ax = fig.add_subplot(gs[r, k])
                ax.axis("off")
                if k >= len(d_idx):
                    continue
                x = img[d_idx[k], r]
                x = x[:3].transpose(1, 2, 0) if c >= 3 else np.repeat(x[:1].transpose(1, 2, 0), 3, axis=2)
                ax.imshow(np.clip(x, 0, 1))
                if show_titles:
                    when = dates[d_idx[k]] if d_idx[k] < len(dates) else f"t={d_idx[k]}"
                    ax.set_title(f"grid {r} {when}" if g > 1 or self.grid_aggregation == "none" else f"mean {when}",
                                 fontsize=8)
        ax_w = fig.add_subplot(gs[rows, : cols - 1])
        ws = np.asarray(_np(sample["weather_short"]), np.float32)
        if ws.ndim == 4:
            ws = ws.mean(axis=2)
        if self.weather_mean is not None:
            ws = ws * self.weather_std + self.weather_mean
        mask = np.asarray(_np(sample.get("weather_short_mask", np.ones(ws.shape[:2], bool))), bool)
        series = ws.reshape(-1, ws.shape[-1])
        keep = mask.reshape(-1)
        days = np.arange(len(series))
        for name in ("Avg Temperature (K)", "Precipitation (kg m**-2)"):
            if name in self.weather_variables:
                v = self.weather_variables.index(name)
                ax = ax_w if name.startswith("Avg") else ax_w.twinx()
                ax.plot(days[keep], series[keep, v], lw=0.8, color="tab:red" if name.startswith("Avg") else "tab:blue")
                ax.set_ylabel(name, fontsize=7)
        ax_w.set_xlabel(f"day of months {list(self.months)}", fontsize=7)
        if show_titles:
            ax_w.set_title("daily weather (mean over grids)", fontsize=8)
        ax_y = fig.add_subplot(gs[rows, cols - 1])
        target = np.asarray(_np(sample["target"]), np.float64).ravel()
        bars, labels = [float(np.exp(target[-1]))], ["true"]
        if "prediction" in sample:
            pred = np.asarray(_np(sample["prediction"]), np.float64).ravel()
            bars.append(float(np.exp(pred[-1])))
            labels.append("predicted")
        ax_y.bar(labels, bars, color=["tab:green", "tab:orange"][: len(bars)])
        if show_titles:
            ax_y.set_title(f"{self.crop} yield", fontsize=8)
        if suptitle is None and show_titles:
            suptitle = f"{sample.get('county', '')} ({sample.get('fips', '')}) {sample.get('year', '')}"
        if suptitle:
            fig.suptitle(suptitle)
        fig.tight_layout()
        return fig


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


# ------------------------------------------------------------------------------------- collation
def _pad_dim(x: Tensor, dim: int, size: int) -> Tensor:
    if x.shape[dim] == size:
        return x
    shape = list(x.shape)
    shape[dim] = size - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def cropnet_collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Collate CropNet samples, zero-padding grids and dates to the batch maximum.

    Adds ``grid_mask`` (``B x G_max`` bool, ``True`` on real grids) and ``time_mask`` (``B x T_max``);
    no grid and no date is dropped. Works for both ``grid_aggregation`` modes.
    """
    samples = [dict(s) for s in samples]
    if not samples:
        raise ValueError("cannot collate an empty list of CropNet samples")
    n_g = [int(s["grid_coords"].shape[0]) for s in samples]
    grid_mode = samples[0]["image"].ndim == 5  # T G C H W
    n_t = [int(s["image"].shape[0] if grid_mode else s["image"].shape[1]) for s in samples]
    g_max, t_max = max(n_g), max(n_t)
    for s in samples:
        s["grid_coords"] = _pad_dim(s["grid_coords"], 0, g_max)
        if grid_mode:
            s["image"] = _pad_dim(_pad_dim(s["image"], 1, g_max), 0, t_max)
            if "weather_windows" in s:
                s["weather_windows"] = _pad_dim(_pad_dim(s["weather_windows"], 1, g_max), 0, t_max)
            s["weather_short"] = _pad_dim(s["weather_short"], 2, g_max)
            s["weather_long"] = _pad_dim(s["weather_long"], 2, g_max)
        else:
            s["image"] = _pad_dim(s["image"], 1, t_max)
        if "temporal_coords" in s:
            s["temporal_coords"] = _pad_dim(s["temporal_coords"], 0, t_max)
    batch = collate_samples(samples)
    batch["grid_mask"] = torch.arange(g_max)[None] < torch.tensor(n_g)[:, None]
    batch["time_mask"] = torch.arange(t_max)[None] < torch.tensor(n_t)[:, None]
    return batch


# --------------------------------------------------------------------------------------- metrics
