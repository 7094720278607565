"""DUNIA pretraining chips: composite S1+S2 chips, a multi-temporal series of the same chips, GEDI footprints.

:class:`DUNIAPretrainChips` wraps :class:`~terratorch_eoplugins.datasets.gedi_chips.GEDIChips` (the 14-band
leaf-on composite ``I``, GEDI footprints with pixel positions, waveforms and RH98) and adds, for each chip,
the multi-temporal input ``M`` of DUNIA's temporal autoencoder (section 4.1.1: "three four-month mosaics"):

* the Sentinel-2 L2A acquisitions of the same region (``S2_TILES/{TILE}/{stamp}.tif``, optional
  ``MSK_CLDPRB``) and the Sentinel-1 VV/VH acquisitions (``S1_TILES/{TILE}/{ASC|DESC}/{stamp}.tif``) are
  cut into periods: ``mosaic_periods="calendar"`` (default, the paper's "three four-month mosaics ... from
  October 2019 until September 2020") uses October-January, February-May and June-September of the 12 months
  ending in September of ``mosaic_year`` (default: the year whose October-September span holds the most S2
  dates; :func:`~terratorch_eoplugins.datasets.preprocessing.calendar_periods`); ``"equal"`` cuts the S2 date
  span into ``num_periods`` equal parts (the behaviour before the calendar windows);
* Sentinel-1 is normalised to the reference incidence angle ``s1_incidence_ref`` (default 40 degrees, eq. 15 on
  linear backscatter, per acquisition before the median) with the acquisition's ``angle`` band (GEE
  ``COPERNICUS/S1_GRD`` convention: bands VV, VH, angle); ``None`` keeps the backscatter as stored (2-band
  VV/VH files are then accepted);
* per period, the per-pixel median of the cloud-free S2 observations (cloud probability < ``max_cloud``;
  pixels never clear in the period fall back to the median of all the period's observations) and the
  median of the S1 observations of both orbits (no S1 in the period: median of all S1 dates);
* the chip window is located in the tiles from the chip's **georeferencing** (CRS and affine transform of
  the composite, ``bounds`` of the chip): the tiles must share the composite's CRS and pixel size and be
  aligned with its grid, otherwise an :class:`~terratorch_eoplugins.errors.EODataError` is raised;
* S2 DN become reflectance (``(DN - 1000) / 10000``, L2A baseline >= 04.00) and the 14 bands are
  standardised with the composite's statistics (the same scaling as ``I``).

Sample keys: ``image [14, H, W]``, ``series [14, T, H, W]``, ``footprints [K, 2]``, ``footprint_mask [K]``,
``waveform [K, L]``, ``rh98 [K]``, ``mask [H, W]`` (sparse RH98) and the chip georeferencing. In the synthetic
world, ``GEDI/``, ``S2_TILES/`` and ``S1_TILES/`` cover the same UTM grid.
"""

from __future__ import annotations

import datetime as dt
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

from terratorch_eoplugins.datasets.gedi_chips import GEDIChips
from terratorch_eoplugins.datasets.gedi_shots import LEAF_ON_MONTHS
from terratorch_eoplugins.datasets.preprocessing import calendar_periods, calendar_year, normalise_incidence
from terratorch_eoplugins.datasets.s2_tiles import acquisition_time, scan_region
from terratorch_eoplugins.errors import EODataError, EODatasetNotFoundError, require_dir

__all__ = ["DUNIAPretrainChips"]


class DUNIAPretrainChips(GEDIChips):
    """:class:`GEDIChips` + the chip's multi-temporal S2+S1 series (see the module docstring).

    Args:
        s2_root: folder of Sentinel-2 tile folders (default ``<root>/../S2_TILES``).
        s1_root: folder of Sentinel-1 tile folders (default ``<root>/../S1_TILES``).
        num_periods: ``T`` (paper: 3 four-month mosaics).
        max_cloud: cloud probability (0-100) at or above which an S2 pixel is discarded.
        cache_series: keep computed series in memory (chips are re-read every epoch otherwise).
        mosaic_periods: ``"calendar"`` (paper: Oct-Jan, Feb-May, Jun-Sep; needs ``num_periods=3``) or ``"equal"``.
        mosaic_year: year of the calendar mosaics' September (None: chosen from the S2 dates, see above).
        s1_incidence_ref: reference incidence angle in degrees (paper: 40) or None (no normalisation).
        **kwargs: :class:`GEDIChips` arguments (defaults here, DUNIA's: ``waveform_length=256``,
            ``waveform_mode="resample"``, ``waveform_window="signal"``, ``leaf_on_months=(4, ..., 9)``,
            ``require_footprints=False``, ``composite_20m="auto"`` (``<root>/S2L2A_20m.tif`` when that file
            exists), ``upsample_20m="cubic"``).
    """

    def __init__(self, root: str | Path = "data/demo/GEDI", s2_root: str | Path | None = None,
                 s1_root: str | Path | None = None, num_periods: int = 3, max_cloud: float = 50.0,
                 cache_series: bool = True, mosaic_periods: str = "calendar", mosaic_year: int | None = None,
                 s1_incidence_ref: float | None = 40.0, **kwargs: Any) -> None:
        kwargs.setdefault("waveform_length", 256)
        kwargs.setdefault("waveform_mode", "resample")
        kwargs.setdefault("waveform_window", "signal")
        kwargs.setdefault("leaf_on_months", LEAF_ON_MONTHS)
        kwargs.setdefault("require_footprints", False)
        kwargs.setdefault("composite_20m", "auto")
        if num_periods < 1:
            raise ValueError(f"num_periods must be >= 1, got {num_periods}")
        if mosaic_periods not in ("calendar", "equal"):
            raise ValueError(f"mosaic_periods must be 'calendar' or 'equal', got {mosaic_periods!r}")
        if mosaic_periods == "calendar" and num_periods != 3:
            raise ValueError(f"mosaic_periods='calendar' makes 3 four-month mosaics; got num_periods={num_periods} "
                             "(use mosaic_periods='equal' for another number)")
        if s1_incidence_ref is not None and not 0 <= float(s1_incidence_ref) < 90:
            raise ValueError(f"s1_incidence_ref must be None or an angle in [0, 90) degrees, got {s1_incidence_ref!r}")
        super().__init__(root, **kwargs)
        base = Path(root).parent if isinstance(root, (str, Path)) else Path(".")
        self.s2_root = require_dir(s2_root or base / "S2_TILES", "Sentinel-2 tiles folder (S2_TILES)")
        self.s1_root = require_dir(s1_root or base / "S1_TILES", "Sentinel-1 tiles folder (S1_TILES)")
        self.num_periods, self.max_cloud, self.cache_series = int(num_periods), float(max_cloud), cache_series
        self.mosaic_periods = mosaic_periods
        self.s1_incidence_ref = None if s1_incidence_ref is None else float(s1_incidence_ref)
        self._cache: dict[int, np.ndarray] = {}
        self.region = scan_region(self.s2_root)
        self._check_grid()
        self.s1_files = self._scan_s1()
        times = self.region.times
        if mosaic_periods == "calendar":
            self.mosaic_year = int(mosaic_year) if mosaic_year is not None else calendar_year(times)
            self.period_edges = calendar_periods(self.mosaic_year)
        else:
            t0, t1 = times[0], times[-1] + dt.timedelta(seconds=1)
            self.mosaic_year = None
            self.period_edges = [t0 + (t1 - t0) * i / self.num_periods for i in range(self.num_periods + 1)]

    # ------------------------------------------------------------------------------------ indexing
    def _check_grid(self) -> None:
        reg, t = self.region, self.transform
        if not reg.crs.to_string() == self.crs_str and reg.crs != rasterio.crs.CRS.from_string(self.crs_str):
            raise EODataError(f"{self.s2_root}: S2 tiles CRS {reg.crs} differs from the composite {self.composite} "
                              f"CRS {self.crs_str}; reproject one of them")
        if abs(reg.transform.a - t.a) > 1e-6 or abs(reg.transform.e - t.e) > 1e-6:
            raise EODataError(f"{self.s2_root}: S2 pixel size {reg.transform.a} differs from the composite's {t.a}")
        col = (t.c - reg.transform.c) / t.a
        row = (t.f - reg.transform.f) / t.e
        if abs(col - round(col)) > 1e-3 or abs(row - round(row)) > 1e-3:
            raise EODataError(f"{self.s2_root}: S2 grid is not aligned with the composite grid "
                              f"(offset {col:.3f}, {row:.3f} px)")
        self._offset = (int(round(col)), int(round(row)))  # composite (0, 0) in region pixels

    def _scan_s1(self) -> dict[str, list[tuple[dt.datetime, Path]]]:
        out: dict[str, list[tuple[dt.datetime, Path]]] = {}
        for tile in self.region.tiles:
            folder = self.s1_root / tile.name
            files = (sorted((w, p) for p in folder.rglob("*.tif") if (w := acquisition_time(p.name)) is not None)
                     if folder.is_dir() else [])
            if not files:
                raise EODatasetNotFoundError(folder, f"Sentinel-1 acquisitions of tile {tile.name} "
                                             "({ASC|DESC}/YYYYMMDDTHHMMSS.tif)")
            out[tile.name] = files
        return out

    def _tile_window(self, row: int, col: int) -> tuple[Any, int, int]:
        cs = self.chip_size
        rc, rr = col + self._offset[0], row + self._offset[1]
        for tile in self.region.tiles:
            tc, tr = rc - tile.offset[0], rr - tile.offset[1]
            if 0 <= tc and 0 <= tr and tc + cs <= tile.shape[1] and tr + cs <= tile.shape[0]:
                return tile, tc, tr
        raise EODataError(f"chip at composite row {row}, column {col} is not covered by one S2 tile of {self.s2_root}")

    # ------------------------------------------------------------------------------------ series
    def _read_s1(self, path: Path, win: Window) -> np.ndarray:
        """VV, VH (dB) of one S1 acquisition in ``win``, normalised to ``s1_incidence_ref`` when set.

        Bands are found by description (``VV``, ``VH``, ``angle``, case-insensitive) or, without descriptions,
        in the order VV, VH[, angle].
        """
        with rasterio.open(path) as src:
            desc = [d.strip().upper() if d else None for d in src.descriptions]
            if all(d is None for d in desc):
                names = ["VV", "VH", "ANGLE"][: src.count] if src.count in (2, 3) else []
            else:
                names = desc
            if "VV" not in names or "VH" not in names:
                raise EODataError(f"{path}: expected Sentinel-1 bands VV, VH (dB)[, angle (degrees)], got "
                                  f"{src.count} bands described {src.descriptions}")
            idx = [names.index("VV") + 1, names.index("VH") + 1]
            x = src.read(idx, window=win).astype(np.float32)
            if self.s1_incidence_ref is None:
                return x
            if "ANGLE" not in names:
                raise EODataError(f"{path}: no 'angle' band (incidence angle, degrees, as GEE COPERNICUS/S1_GRD "
                                  f"exports it after VV and VH) for s1_incidence_ref={self.s1_incidence_ref}; "
                                  "write it or set s1_incidence_ref: null")
            angle = src.read(names.index("ANGLE") + 1, window=win).astype(np.float32)
        bad = ~np.isfinite(angle) | (angle <= 0) | (angle >= 90)
        if bad.all():
            raise EODataError(f"{path}: angle band has no valid incidence angle (0-90 degrees) in the chip window")
        return np.where(bad[None], np.nan, normalise_incidence(x, angle[None], self.s1_incidence_ref, db=True))

    def _period(self, when: dt.datetime) -> int:
        for i in range(self.num_periods):
            if self.period_edges[i] <= when < self.period_edges[i + 1]:
                return i
        return -1

    def series(self, index: int) -> np.ndarray:
        """Standardised multi-temporal series ``[14, T, H, W]`` (float32) of chip ``index``."""
        if index in self._cache:
            return self._cache[index]
        row, col = self.chips[index]
        cs, tp = self.chip_size, self.num_periods
        tile, tc, tr = self._tile_window(row, col)
        win = Window(tc, tr, cs, cs)
        s2: list[list[np.ndarray]] = [[] for _ in range(tp)]
        clear: list[list[np.ndarray]] = [[] for _ in range(tp)]
        for when, path in tile.files:
            p = self._period(when)
            if p < 0:
                continue
            with rasterio.open(path) as src:
                dn = src.read(window=win).astype(np.float32)
            refl = (dn - 1000.0) / 10000.0
            refl[:, (dn == 0).all(0)] = np.nan
            cloud = path.parent / "MSK_CLDPRB" / path.name
            ok = np.ones((cs, cs), bool)
            if cloud.is_file():
                with rasterio.open(cloud) as src:
                    ok = src.read(1, window=win) < self.max_cloud
            s2[p].append(refl)
            clear[p].append(np.where(ok[None], refl, np.nan))
        s1_all = []
        s1: list[list[np.ndarray]] = [[] for _ in range(tp)]
        for when, path in self.s1_files[tile.name]:
            x = self._read_s1(path, win)
            s1_all.append(x)
            p = self._period(when)
            if p >= 0:
                s1[p].append(x)
        out = np.zeros((14, tp, cs, cs), np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN, filled below
            for p in range(tp):
                if not s2[p]:
                    raise EODataError(f"{self.s2_root}: no Sentinel-2 acquisition in period {p + 1} of {tp} "
                                      f"({self.period_edges[p]:%Y-%m-%d} - {self.period_edges[p + 1]:%Y-%m-%d}, "
                                      f"mosaic_periods={self.mosaic_periods!r}); use another mosaic_year or "
                                      "fewer num_periods with mosaic_periods='equal'")
                med_clear = np.nanmedian(np.stack(clear[p]), 0)
                med_all = np.nanmedian(np.stack(s2[p]), 0)
                out[:12, p] = np.where(np.isfinite(med_clear), med_clear, med_all)
                out[12:, p] = np.nanmedian(np.stack(s1[p] or s1_all), 0)
        out = (out - self.means[:, None, None, None]) / self.stds[:, None, None, None]
        out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
        if self.cache_series:
            self._cache[index] = out
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        sample["series"] = torch.from_numpy(self.series(index))
        return sample
