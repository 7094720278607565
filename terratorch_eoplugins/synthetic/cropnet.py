"""Synthetic CropNet: Sentinel-2 HDF5, WRF-HRRR CSV and USDA CSV trees in the Hugging Face layout.

:func:`write_cropnet` writes ``out_dir/CropNet/`` with the three trees of the real dataset
(``CropNet/CropNet`` on Hugging Face)::

    Sentinel-2 Imagery/data/AG/{YYYY}/{ST}/Agriculture_{stateFIPS}_{ST}_{YYYY}-{MM}-01_{YYYY}-{MM}-{DD}.h5
        (one file per quarter with images; groups /{FIPS}/{YYYY-MM-DD}/ data, state, county, coordinates)
    WRF-HRRR Computed Dataset/data/{YYYY}/{ST}/HRRR_{stateFIPS}_{ST}_{YYYY}-{MM}.csv
    USDA Crop Dataset/{Corn|Cotton|Soybeans|WinterWheat}/{YYYY}/USDA_{Crop}_County_{YYYY}.csv

The content has known, learnable structure. Every county has a latent soil quality and daily
weather (state climate + state-year and county-year anomalies + regional daily noise). For each
crop the growing-season (crop-specific months) means of temperature, precipitation and vapour
pressure deficit give a weather effect ``w = -0.012 (T - T_opt)^2 + 0.10 log(P / P_ref)
- 0.10 (VPD - VPD_ref)`` (log units) and a crop vigour ``z = quality + w / 0.08``. In the images
(land cover and parcels from the shared :class:`~terratorch_eoplugins.synthetic.world.World`),
each cropland parcel grows one of the county's crops (in proportion to their acres) and greens up
along that crop's calendar with a peak set by its vigour, and

    log(yield) = log(base yield of the crop) + 0.08 z + N(0, 0.025),

so yields follow weather and vegetation, and images and weather are coherent. Production is
yield times harvested acres (county-specific). Not every county grows every crop; a few
county-years have a withheld (empty) yield; one county has no imagery in the last sample year;
a few daily weather cells are empty and a few daily rows are missing, as in real downloads.
Sample years are 2020-2022 (images of April-September, daily weather of April-September); the
HRRR tree holds monthly rows for 2015-2022, enough for 5 years of long-term weather.

Monthly rows of the HRRR CSVs are the means of the daily values of the month (precipitation
included, i.e. mean daily precipitation).
"""

from __future__ import annotations

import calendar
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from terratorch_eoplugins.synthetic.world import (
    _SOIL,
    _VEG,
    CROPLAND,
    GRASSLAND,
    URBAN,
    WATER,
    World,
    _double_logistic,
    _rng,
    make_world,
    smooth_noise,
)

__all__ = ["HRRR_COLUMNS", "USDA_COLUMNS", "CROP_SPECS", "write_cropnet"]

#: The 23 columns of a WRF-HRRR Computed Dataset CSV, in file order.
HRRR_COLUMNS: tuple[str, ...] = (
    "Year", "Month", "Day", "Daily/Monthly", "State", "County", "FIPS Code", "Grid Index",
    "Lat (llcrnr)", "Lon (llcrnr)", "Lat (urcrnr)", "Lon (urcrnr)",
    "Avg Temperature (K)", "Max Temperature (K)", "Min Temperature (K)", "Precipitation (kg m**-2)",
    "Relative Humidity (%)", "Wind Gust (m s**-1)", "Wind Speed (m s**-1)",
    "U Component of Wind (m s**-1)", "V Component of Wind (m s**-1)",
    "Downward Shortwave Radiation Flux (W m**-2)", "Vapor Pressure Deficit (kPa)",
)
_HRRR_VARS = HRRR_COLUMNS[12:]
#: Leading columns of a USDA Crop Dataset CSV (the production and yield columns follow).
USDA_COLUMNS: tuple[str, ...] = (
    "commodity_desc", "reference_period_desc", "year", "state_ansi", "state_name", "county_ansi",
    "county_name", "asd_code", "asd_desc", "domain_desc", "source_desc", "agg_level_desc",
)


@dataclass(frozen=True)
class _CropSpec:
    commodity: str          # USDA commodity_desc
    production_col: str
    yield_col: str
    base_yield: float       # county yield of an average county-year (column units)
    season: tuple[int, ...]  # months whose weather drives the yield
    t_opt: float            # optimal growing-season mean temperature (K)
    p_ref: float            # reference mean daily precipitation (kg m-2 = mm)
    vpd_ref: float          # reference mean VPD (kPa)
    acres: float            # typical harvested acres per county
    unit_per_prod: float    # production = yield * acres / unit_per_prod


#: Crop parameters of the synthetic yield model, keyed by the USDA folder name.
CROP_SPECS: dict[str, _CropSpec] = {
    "Corn": _CropSpec("CORN", "PRODUCTION, MEASURED IN BU", "YIELD, MEASURED IN BU / ACRE", 180.0, (6, 7, 8),
                      296.0, 3.0, 1.2, 120_000.0, 1.0),
    "Soybeans": _CropSpec("SOYBEANS", "PRODUCTION, MEASURED IN BU", "YIELD, MEASURED IN BU / ACRE", 55.0, (6, 7, 8),
                          296.5, 3.0, 1.2, 100_000.0, 1.0),
    "Cotton": _CropSpec("COTTON", "PRODUCTION, MEASURED IN 480 LB BALES", "YIELD, MEASURED IN LB / ACRE", 850.0,
                        (6, 7, 8), 301.0, 2.0, 2.0, 50_000.0, 480.0),
    "WinterWheat": _CropSpec("WHEAT", "PRODUCTION, MEASURED IN BU", "YIELD, MEASURED IN BU / ACRE", 55.0, (4, 5, 6),
                             289.0, 2.4, 0.9, 40_000.0, 1.0),
}


@dataclass(frozen=True)
class _State:
    fips: str
    abbrev: str
    name: str
    lat: tuple[float, float]
    lon: tuple[float, float]
    t_july: float      # July mean temperature (K)
    t_amp: float       # seasonal amplitude (K)
    precip: float      # mean daily precipitation (mm)
    rh: float          # mean relative humidity (%)
    wind: float        # mean wind speed (m/s)
    crops: dict[str, float]  # crop -> probability that a county grows it
    counties: tuple[tuple[str, str, str, str], ...]  # (county_ansi, name, asd_code, asd_desc)


# Real state FIPS codes, abbreviations and (alphabetical, odd-numbered) county FIPS codes and names.
_STATES: tuple[_State, ...] = (
    _State("19", "IA", "IOWA", (40.6, 43.4), (-96.0, -91.3), 297.0, 15.5, 2.7, 72.0, 4.6,
           {"Corn": 1.0, "Soybeans": 0.9},
           (("001", "ADAIR", "70", "SOUTHWEST"), ("003", "ADAMS", "70", "SOUTHWEST"),
            ("005", "ALLAMAKEE", "30", "NORTHEAST"), ("007", "APPANOOSE", "90", "SOUTHEAST"),
            ("009", "AUDUBON", "40", "WEST CENTRAL"), ("011", "BENTON", "50", "CENTRAL"),
            ("013", "BLACK HAWK", "30", "NORTHEAST"), ("015", "BOONE", "50", "CENTRAL"),
            ("017", "BREMER", "30", "NORTHEAST"), ("019", "BUCHANAN", "30", "NORTHEAST"),
            ("021", "BUENA VISTA", "10", "NORTHWEST"), ("023", "BUTLER", "20", "NORTH CENTRAL"))),
    _State("17", "IL", "ILLINOIS", (37.4, 42.3), (-90.9, -87.7), 298.0, 14.0, 2.9, 70.0, 4.4,
           {"Corn": 1.0, "Soybeans": 1.0, "WinterWheat": 0.6},
           (("001", "ADAMS", "30", "WEST"), ("003", "ALEXANDER", "90", "SOUTHEAST"),
            ("005", "BOND", "80", "SOUTHWEST"), ("007", "BOONE", "20", "NORTHEAST"),
            ("009", "BROWN", "30", "WEST"), ("011", "BUREAU", "10", "NORTHWEST"),
            ("013", "CALHOUN", "70", "WEST SOUTHWEST"), ("015", "CARROLL", "10", "NORTHWEST"),
            ("017", "CASS", "30", "WEST"), ("019", "CHAMPAIGN", "50", "EAST"))),
    _State("48", "TX", "TEXAS", (29.2, 35.3), (-102.8, -95.2), 301.5, 11.0, 1.9, 60.0, 5.2,
           {"Cotton": 0.9, "WinterWheat": 0.8, "Corn": 0.5},
           (("001", "ANDERSON", "51", "EAST TEXAS NORTH"), ("003", "ANDREWS", "11", "NORTHERN HIGH PLAINS"),
            ("005", "ANGELINA", "52", "EAST TEXAS SOUTH"), ("007", "ARANSAS", "81", "COASTAL BEND"),
            ("009", "ARCHER", "22", "NORTHERN LOW PLAINS"), ("011", "ARMSTRONG", "12", "SOUTHERN HIGH PLAINS"),
            ("013", "ATASCOSA", "82", "SOUTH CENTRAL"), ("015", "AUSTIN", "71", "UPPER COAST"))),
)

_SIZES = {
    # counties per state (IA, IL, TX), image side, image days of month, max grids per county
    "tiny": ((4, 4, 4), 32, (1,), 6),
    "demo": ((12, 10, 8), 64, (1, 15), 6),
}
_SAMPLE_YEARS = (2020, 2021, 2022)
_WEATHER_YEARS = tuple(range(2015, 2023))
_IMAGE_MONTHS = (4, 5, 6, 7, 8, 9)
_GRID_DEG = 0.08  # grid cell side in degrees (~9 km)
#: Green-up and senescence days of year of each crop (winter wheat: sown in autumn, harvested in June).
_CALENDAR: dict[str, tuple[float, float]] = {"Corn": (135, 265), "Soybeans": (145, 265), "Cotton": (130, 275),
                                             "WinterWheat": (285, 170)}


@dataclass
class _County:
    state: _State
    ansi: str
    name: str
    asd_code: str
    asd_desc: str
    n_grids: int
    coords: np.ndarray       # (G, 2, 2) [[ll lat, ll lon], [ur lat, ur lon]]
    quality: float
    windows: list[tuple[int, int]]  # top-left pixel of each grid's window in the world
    crops: set[str]
    acres: dict[str, float]

    @property
    def fips(self) -> str:
        return self.state.fips + self.ansi


def _make_counties(size: str, seed: int) -> list[_County]:
    n_per_state, img, _, max_g = _SIZES[size]
    counties: list[_County] = []
    for state, n in zip(_STATES, n_per_state):
        for k, (ansi, name, asd, asd_desc) in enumerate(state.counties[:n]):
            rng = _rng(seed, "cropnet", "county", state.fips, ansi)
            g = int(rng.integers(1, max_g + 1))
            lat0 = rng.uniform(state.lat[0], state.lat[1] - 2 * _GRID_DEG)
            lon0 = rng.uniform(state.lon[0], state.lon[1] - 3 * _GRID_DEG)
            coords = np.zeros((g, 2, 2), np.float64)
            for i in range(g):  # grids laid out 3 per row, rows going north
                la, lo = lat0 + (i // 3) * _GRID_DEG, lon0 + (i % 3) * _GRID_DEG
                coords[i] = [[la, lo], [la + _GRID_DEG, lo + _GRID_DEG]]
            crops = {c for c, p in state.crops.items() if k < 2 or rng.uniform() < p}
            acres = {c: CROP_SPECS[c].acres * float(np.exp(rng.normal(0, 0.4))) for c in CROP_SPECS}
            counties.append(_County(state, ansi, name, asd, asd_desc, g, np.round(coords, 5),
                                    float(rng.normal()), [], crops, acres))
    return counties


# ------------------------------------------------------------------------------------------ weather
def _daily_index() -> pd.DatetimeIndex:
    return pd.date_range(f"{_WEATHER_YEARS[0]}-01-01", f"{_WEATHER_YEARS[-1]}-12-31", freq="D")


def _ar1(rng: np.random.Generator, n: int, rho: float, shape: tuple[int, ...] = ()) -> np.ndarray:
    """Unit-variance AR(1) series along the first axis."""
    e = rng.standard_normal((n, *shape))
    out = np.empty_like(e)
    out[0] = e[0]
    s = np.sqrt(1 - rho**2)
    for i in range(1, n):
        out[i] = rho * out[i - 1] + s * e[i]
    return out


def _county_weather(county: _County, days: pd.DatetimeIndex, seed: int,
                    state_daily: dict[str, np.ndarray]) -> np.ndarray:
    """Daily weather ``(n_days, G, 11)`` of a county, variables in :data:`HRRR_COLUMNS` order."""
    st = county.state
    n, g = len(days), county.n_grids
    doy = days.dayofyear.to_numpy().astype(np.float64)
    years = days.year.to_numpy()
    yi = years - _WEATHER_YEARS[0]
    rng = _rng(seed, "cropnet", "weather", county.fips)
    srng = _rng(seed, "cropnet", "state-years", st.fips)
    ny = len(_WEATHER_YEARS)
    state_t_anom = srng.normal(0, 1.0, ny)
    state_p_anom = srng.normal(0, 0.25, ny)
    county_t_off = rng.normal(0, 0.8)
    county_p_off = rng.normal(0, 0.2)
    cy_t = rng.normal(0, 0.5, ny)
    cy_p = rng.normal(0, 0.15, ny)
    grid_t = rng.normal(0, 0.15, g)
    grid_p = rng.normal(0, 0.08, g)

    season = np.cos(2 * np.pi * (doy - 200) / 365.25)
    t_clim = st.t_july - st.t_amp + st.t_amp * season
    noise_t = 0.85 * state_daily["t"] + 0.5 * _ar1(rng, n, 0.6)
    t_avg = (t_clim + state_t_anom[yi] + county_t_off + cy_t[yi] + 2.4 * noise_t)[:, None] + grid_t[None]

    p_mean = st.precip * (1 + 0.25 * season) * np.exp(state_p_anom[yi] + county_p_off + cy_p[yi])
    wet_u = 0.8 * state_daily["wet"] + 0.6 * rng.standard_normal(n)
    wet = wet_u[:, None] + 0.3 * rng.standard_normal((n, g)) > 0.45  # ~35 % wet days
    amount = rng.gamma(0.8, 1.0, (n, g)) / 0.8
    precip = np.where(wet, amount * (p_mean / 0.35)[:, None] * np.exp(grid_p)[None], 0.0)

    dtr = 11.0 - 3.0 * wet + 0.8 * rng.standard_normal((n, g))
    t_max = t_avg + dtr / 2
    t_min = t_avg - dtr / 2
    rh = st.rh - 1.5 * (t_avg - t_clim[:, None]) + 12.0 * wet + 4.0 * rng.standard_normal((n, g))
    rh = np.clip(rh, 15, 100)
    tc = t_avg - 273.15
    es = 0.6108 * np.exp(17.27 * tc / (tc + 237.3))
    vpd = es * (1 - rh / 100)
    speed = st.wind * rng.gamma(6.0, 1 / 6.0, (n, 1)) * (1 + 0.05 * rng.standard_normal((n, g)))
    direction = rng.uniform(0, 2 * np.pi, (n, 1)) + 0.1 * rng.standard_normal((n, g))
    u, v = -speed * np.sin(direction), -speed * np.cos(direction)
    gust = 1.5 * speed + 2.0 + 0.8 * np.abs(rng.standard_normal((n, g)))
    clear = 185 + 135 * np.cos(2 * np.pi * (doy - 172) / 365.25)
    sw = clear[:, None] * (1 - 0.45 * wet) * (1 + 0.05 * rng.standard_normal((n, g)))
    out = np.stack([t_avg, t_max, t_min, precip, rh, gust, speed, u, v, sw, vpd], axis=-1)
    return out.astype(np.float64)


def _season_means(daily: np.ndarray, days: pd.DatetimeIndex, year: int,
                  months: tuple[int, ...]) -> tuple[float, float, float]:
    """County (grid-mean) means of avg temperature, precipitation and VPD over ``months`` of ``year``."""
    sel = (days.year == year) & np.isin(days.month, months)
    d = daily[sel].mean(axis=(0, 1))
    return float(d[0]), float(d[3]), float(d[10])


def _weather_effect(spec: _CropSpec, t: float, p: float, vpd: float) -> float:
    return -0.012 * (t - spec.t_opt) ** 2 + 0.10 * np.log(max(p, 1e-3) / spec.p_ref) - 0.10 * (vpd - spec.vpd_ref)


# ------------------------------------------------------------------------------------------- images
def _render(world: World, county: _County, grid: int, date: dt.date, vigour: dict[str, float], size: int,
            seed: int) -> np.ndarray:
    """Agriculture composite (B11, B08, B02 as R, G, B) ``(size, size, 3)`` uint8 of one grid on ``date``.

    Parcels and land cover come from the shared world. Each parcel grows one of the county's
    crops (drawn in proportion to their acres) and greens up along that crop's calendar, with a
    peak set by the crop's vigour in the county-year (``vigour``: crop -> vigour).
    """
    r0, c0 = county.windows[grid]
    win = (slice(r0, r0 + size), slice(c0, c0 + size))
    world_date = dt.date(2019, date.month, date.day)  # the world's phenology is defined on its own year
    g = world.green_fraction(world_date, win)
    lc = world.landcover[win]
    pid = world.parcel_id[win]
    crops = sorted(vigour)
    share = np.cumsum([county.acres[c] for c in crops])
    share /= share[-1]
    u = (pid * 0.6180339887 + int(county.fips) * 0.137) % 1.0
    which = np.searchsorted(share, u, side="right").clip(0, len(crops) - 1)
    texture = 0.85 + 0.3 * ((pid * 0.7548776662) % 1.0)  # parcel-to-parcel management differences
    doy = np.float32(date.timetuple().tm_yday)
    crop_g = np.zeros_like(g)
    for k, crop in enumerate(crops):
        sos, eos = _CALENDAR[crop]
        curve = float(_double_logistic(doy, np.array([sos], np.float32), np.array([eos], np.float32))[0])
        peak = 0.25 + 0.7 / (1 + np.exp(-vigour[crop]))
        crop_g = np.where(which == k, 0.03 + peak * curve * texture, crop_g)
    mean_v = float(np.mean([vigour[c] for c in crops]))
    g = np.where(lc == CROPLAND, np.clip(crop_g, 0, 1), g)
    g = np.where(lc == GRASSLAND, g * (0.55 + 0.5 / (1 + np.exp(-mean_v))), g)
    rng = _rng(seed, "cropnet", "img", county.fips, grid, date.isoformat())
    bands = [10, 7, 1]  # B11, B08, B02
    soil = _SOIL[bands][:, None, None] * (1 + 0.08 * smooth_noise((size, size), 4.0, rng))[None]
    refl = (1 - g)[None] * soil + g[None] * _VEG[bands][:, None, None]
    refl = np.where((lc == WATER)[None], np.array([0.005, 0.01, 0.06])[:, None, None], refl)
    refl = np.where((lc == URBAN)[None], np.array([0.26, 0.21, 0.13])[:, None, None], refl)
    refl = refl + rng.normal(0, 0.006, refl.shape)
    if rng.uniform() < 0.12:  # thin haze (the real archive keeps scenes with <= 20 % clouds)
        haze = np.clip(smooth_noise((size, size), size / 4.0, rng) - 0.8, 0, 1) * 0.4
        refl = (1 - haze)[None] * refl + haze[None] * 0.55
    img = np.clip(refl * 2.5 * 255.0, 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(img.transpose(1, 2, 0))


def _quarters(year: int, months: tuple[int, ...]) -> list[tuple[dt.date, dt.date]]:
    out = []
    for q in range(4):
        m0 = 3 * q + 1
        if any(m0 <= m < m0 + 3 for m in months):
            last = calendar.monthrange(year, m0 + 2)[1]
            out.append((dt.date(year, m0, 1), dt.date(year, m0 + 2, last)))
    return out


# ------------------------------------------------------------------------------------------- writer
def write_cropnet(out_dir: str | Path, size: str = "tiny", seed: int = 0, image_size: int | None = None) -> Path:
    """Write a synthetic CropNet tree (HF layout) under ``out_dir/CropNet`` and return that path.

    Args:
        out_dir: Parent folder; ``CropNet/`` is created inside it.
        size: ``"tiny"`` (12 counties, 32 px images, 6 dates a year: unit tests, ~1-2 s) or
            ``"demo"`` (30 counties, 64 px images, 12 dates a year).
        seed: Seed of every random choice (same seed, same bytes).
        image_size: Override of the image side (the real archive has 224).
    """
    if size not in _SIZES:
        raise ValueError(f"unknown CropNet size {size!r}: expected one of {sorted(_SIZES)}")
    _, img_default, image_days, _ = _SIZES[size]
    img = int(image_size or img_default)
    root = Path(out_dir) / "CropNet"
    world = make_world("tiny" if img <= 128 else "demo", seed)
    h, w = world.shape
    if img > min(h, w):
        raise ValueError(f"image_size {img} exceeds the synthetic world ({h}x{w} px)")

    counties = _make_counties(size, seed)
    for c in counties:
        rng = _rng(seed, "cropnet", "windows", c.fips)
        c.windows = [(int(rng.integers(0, h - img + 1)), int(rng.integers(0, w - img + 1))) for _ in range(c.n_grids)]

    days = _daily_index()
    state_daily = {}
    for st in _STATES:
        srng = _rng(seed, "cropnet", "state-daily", st.fips)
        state_daily[st.fips] = {"t": _ar1(srng, len(days), 0.7), "wet": srng.standard_normal(len(days))}
    weather = {c.fips: _county_weather(c, days, seed, state_daily[c.state.fips]) for c in counties}

    # Yields and vigour per (county, year, crop); parcels of each crop in the images green up with its vigour.
    records: list[dict] = []
    vigour: dict[tuple[str, int], dict[str, float]] = {}
    for c in counties:
        for year in _SAMPLE_YEARS:
            effects = {}
            for crop, spec in CROP_SPECS.items():
                t, p, v = _season_means(weather[c.fips], days, year, spec.season)
                effects[crop] = _weather_effect(spec, t, p, v)
            vigour[(c.fips, year)] = {k: c.quality + effects[k] / 0.08 for k in c.crops}
            for crop in sorted(c.crops):
                spec = CROP_SPECS[crop]
                rng = _rng(seed, "cropnet", "yield", c.fips, year, crop)
                z = c.quality + effects[crop] / 0.08
                log_y = np.log(spec.base_yield) + 0.08 * z + rng.normal(0, 0.025)
                yld = float(np.exp(log_y))
                acres = c.acres[crop] * float(np.exp(rng.normal(0, 0.05)))
                withheld = rng.uniform() < 0.08
                records.append(dict(crop=crop, year=year, county=c, yld=None if withheld else round(yld, 1),
                                    prod=round(yld * acres / spec.unit_per_prod)))

    _write_usda(root / "USDA Crop Dataset", records)
    _write_hrrr(root / "WRF-HRRR Computed Dataset" / "data", counties, days, weather, seed)
    # One county of the last state misses its imagery in the last sample year (e.g. always cloudy).
    no_image = {(counties[-1].fips, _SAMPLE_YEARS[-1])}
    _write_s2(root / "Sentinel-2 Imagery" / "data" / "AG", counties, world, vigour, img, image_days, no_image, seed)
    return root


def _write_usda(base: Path, records: list[dict]) -> None:
    for crop, spec in CROP_SPECS.items():
        for year in _SAMPLE_YEARS:
            rows = []
            for r in records:
                if r["crop"] != crop or r["year"] != year:
                    continue
                c: _County = r["county"]
                rows.append({
                    "commodity_desc": spec.commodity, "reference_period_desc": "YEAR", "year": year,
                    "state_ansi": int(c.state.fips), "state_name": c.state.name, "county_ansi": int(c.ansi),
                    "county_name": c.name, "asd_code": int(c.asd_code), "asd_desc": c.asd_desc,
                    "domain_desc": "TOTAL", "source_desc": "SURVEY", "agg_level_desc": "COUNTY",
                    spec.production_col: r["prod"], spec.yield_col: r["yld"],
                })
            path = base / crop / str(year) / f"USDA_{crop}_County_{year}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            cols = [*USDA_COLUMNS, spec.production_col, spec.yield_col]
            pd.DataFrame(rows, columns=cols).to_csv(path, index=False)


def _write_hrrr(base: Path, counties: list[_County], days: pd.DatetimeIndex, weather: dict[str, np.ndarray],
                seed: int) -> None:
    months = days.month.to_numpy()
    years = days.year.to_numpy()
    dom = days.day.to_numpy()
    for st in _STATES:
        sc = [c for c in counties if c.state is st]
        for year in _WEATHER_YEARS:
            for month in range(1, 13):
                sel = np.flatnonzero((years == year) & (months == month))
                daily_rows, monthly_rows = [], []
                rng = _rng(seed, "cropnet", "hrrr-gaps", st.fips, year, month)
                for c in sc:
                    vals = weather[c.fips][sel]  # (D, G, 11)
                    meta = [st.abbrev, c.name.title(), int(c.fips)]
                    for gi in range(c.n_grids):
                        (la0, lo0), (la1, lo1) = c.coords[gi]
                        geo = [gi, la0, lo0, la1, lo1]
                        if year in _SAMPLE_YEARS and month in _IMAGE_MONTHS:
                            for k, d in enumerate(sel):
                                if rng.uniform() < 0.003:  # a missing daily row
                                    continue
                                v = vals[k, gi].tolist()
                                if rng.uniform() < 0.004:  # an empty cell
                                    v[int(rng.integers(0, len(v)))] = np.nan
                                daily_rows.append([year, month, int(dom[d]), "Daily", *meta, *geo, *v])
                        monthly = vals[:, gi].mean(0).tolist()
                        monthly_rows.append([year, month, np.nan, "Monthly", *meta, *geo, *monthly])
                df = pd.DataFrame(daily_rows + monthly_rows, columns=list(HRRR_COLUMNS))
                df["Day"] = df["Day"].astype("Int64")  # empty on Monthly rows
                df[list(HRRR_COLUMNS[8:])] = df[list(HRRR_COLUMNS[8:])].round(4)
                path = base / str(year) / st.abbrev / f"HRRR_{st.fips}_{st.abbrev}_{year}-{month:02d}.csv"
                path.parent.mkdir(parents=True, exist_ok=True)
                df.to_csv(path, index=False)


def _write_s2(base: Path, counties: list[_County], world: World, vigour: dict[tuple[str, int], dict[str, float]],
              img: int, image_days: tuple[int, ...], no_image: set[tuple[str, int]], seed: int) -> None:
    for st in _STATES:
        sc = [c for c in counties if c.state is st]
        for year in _SAMPLE_YEARS:
            for q0, q1 in _quarters(year, _IMAGE_MONTHS):
                folder = base / str(year) / st.abbrev
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"Agriculture_{st.fips}_{st.abbrev}_{q0.isoformat()}_{q1.isoformat()}.h5"
                with h5py.File(path, "w") as f:
                    for c in sc:
                        if (c.fips, year) in no_image:
                            continue
                        grp = f.create_group(c.fips)
                        for month in range(q0.month, q1.month + 1):
                            if month not in _IMAGE_MONTHS:
                                continue
                            for day in image_days:
                                date = dt.date(year, month, day)
                                data = np.stack([_render(world, c, gi, date, vigour[(c.fips, year)], img, seed)
                                                 for gi in range(c.n_grids)])
                                dg = grp.create_group(date.isoformat())
                                dg.create_dataset("data", data=data, compression="gzip", compression_opts=4,
                                                  chunks=(1, img, img, 3))
                                dg.create_dataset("state", data=np.array([st.name.encode()] * c.n_grids))
                                dg.create_dataset("county", data=np.array([c.name.encode()] * c.n_grids))
                                dg.create_dataset("coordinates", data=c.coords)
