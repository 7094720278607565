"""GEDI-collocated Sentinel-1/2 image chips (DUNIA's downstream data): :class:`GEDIChips`.

Chips of a 14-band Sentinel-2 + Sentinel-1 composite GeoTIFF (a torchgeo
:class:`~torchgeo.datasets.NonGeoDataset`) with every filtered GEDI footprint inside
(:class:`~terratorch_eoplugins.datasets.gedi_shots.GEDIShots`), as padded per-footprint tensors and as a
sparse pixel-wise target map for terratorch's ``PixelwiseRegressionTask``; optionally a dense target map read
from a GEDI-derived 10 m product GeoTIFF (e.g. a canopy-height map) instead of the footprints.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import rasterio
import torch
from matplotlib.figure import Figure
from pyproj import CRS as ProjCRS
from pyproj import Transformer
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window
from torch import Tensor
from torchgeo.datasets import NonGeoDataset

from terratorch_eoplugins.datasets.common import logger, split_indices, subsample_fraction
from terratorch_eoplugins.datasets.gedi_shots import TARGETS, GEDIShots
from terratorch_eoplugins.datasets.preprocessing import S2_20M_BANDS, UPSAMPLE_MODES, upsample_20m
from terratorch_eoplugins.errors import EODataError, require_file

__all__ = ["CANOPY_HEIGHT_NAME", "COMPOSITE_20M_NAME", "COMPOSITE_BANDS", "COMPOSITE_NAME", "GEDIChips"]

#: Bands of the collocated composite, in the order of the returned ``image``.
COMPOSITE_BANDS: tuple[str, ...] = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11",
                                    "B12", "VV", "VH")
#: File name of the composite inside the GEDI root (as written by :mod:`terratorch_eoplugins.synthetic.gedi`).
COMPOSITE_NAME = "S2L2A_S1GRD_composite.tif"
#: File name of the 20 m S2 bands (:data:`S2_20M_BANDS`, native resolution) beside the composite.
COMPOSITE_20M_NAME = "S2L2A_20m.tif"
#: File name of the synthetic world's dense 10 m RH98 map (a stand-in for a GEDI-derived canopy-height product).
CANOPY_HEIGHT_NAME = "canopy_height_rh98_10m.tif"


def _affine_apply(t: Any, cols: Any, rows: Any) -> tuple[Any, Any]:
    """Map (col, row) through the affine ``t`` (works on scalars and arrays)."""
    return t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f


class _RasterCache:
    def __init__(self, path: str) -> None:
        self.path, self._pid, self._src = path, None, None

    def get(self) -> rasterio.io.DatasetReader:
        if self._src is None or self._pid != os.getpid():
            self._src, self._pid = rasterio.open(self.path), os.getpid()
        return self._src

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])


class GEDIChips(NonGeoDataset):
    """Chips of a Sentinel-2 + Sentinel-1 composite collocated with filtered GEDI footprints.

    The composite is one GeoTIFF with 14 bands: Sentinel-2 L2A B01..B12 (with B8A, no B10) as
    BOA reflectance or as L2A digital numbers (``DN = 10000 * reflectance + s2_offset``;
    ``s2_units="auto"`` picks DN when the S2 median exceeds 2), followed by Sentinel-1 VV and VH
    in dB. Band descriptions, when present, must name these bands (any order; they are
    reordered to :data:`COMPOSITE_BANDS`); without descriptions the documented order is assumed.
    S2 is converted to reflectance, then every band is standardised with the per-band mean and
    standard deviation of the whole composite (or ``means``/``stds``); no-data becomes 0.

    Shots (filtered as in :class:`GEDIShots`) are projected from WGS84 (``lat/lon_lowestmode``)
    into the composite CRS with pyproj and assigned to the pixel that contains them. The
    composite is tiled into non-overlapping ``chip_size`` chips (partial edge chips dropped).

    Splits are spatial: chips are grouped into square blocks of ``block_chips`` x ``block_chips``
    chips; blocks are shuffled with ``seed`` and cut by ``split_fractions`` into train/val/test
    (:func:`split_indices`), so neighbouring chips share a split and the assignment does not
    depend on the quality filters. Chips without footprints are dropped unless
    ``require_footprints=False``. ``label_fraction`` subsamples the training chips.

    Dense targets (``dense_target``): a single-band GeoTIFF of a wall-to-wall product derived from
    GEDI (a 10 m canopy-height map for ``targets=("rh98",)``, as the densely annotated images DUNIA
    fine-tunes on) replaces the footprint values in ``mask``: every pixel of the chip gets the
    product's value, and its no-data value, NaN and infinities become ``ignore_value``. A product on
    the composite's grid is read window by window; one in another CRS, resolution or extent is
    warped onto the composite's grid on the fly (``dense_resampling``, bilinear by default). Chips
    without any valid product pixel are dropped; ``require_footprints`` still applies on top.

    Sample: ``image`` float32 ``14 x H x W``; ``mask`` float32 ``H x W`` (one target) or
    ``n_targets x H x W`` with each footprint's value at its pixel (mean when several share a
    pixel) and ``ignore_value`` elsewhere (with ``dense_target``: the product's values);
    ``footprints`` long ``K x 2`` (row, col in the chip), ``footprint_mask`` bool ``K``, ``waveform``
    float32 ``K x L``, ``rh98``/``cover``/``pai`` float32 ``K`` and ``shot_number`` long ``K``, padded
    to ``K = max_footprints`` (default: the most footprints of any chip of the composite) with
    -1 / 0 / ``ignore_value``; ``crs`` (str),
    ``transform`` (6 affine coefficients a, b, c, d, e, f) and ``bounds`` (left, bottom, right,
    top) float64, ``location_coords`` (lat, lon) of the chip centre, ``filename``
    (``<composite>_r<row>_c<col>``, the chip's window in the composite).

    20 m bands (``composite_20m``): a GeoTIFF holding the six native 20 m S2 bands (band descriptions B05, B06,
    B07, B8A, B11, B12; same CRS and units as the composite, pixel size twice the composite's, its grid aligned
    with the composite's on 10 m pixel edges and covering it) replaces those bands of the composite, upsampled
    to 10 m as ``upsample_20m`` says (:func:`~terratorch_eoplugins.datasets.preprocessing.upsample_20m`:
    ``"cubic"``, DUNIA's choice, or ``"nearest"``; ``"none"`` ignores the file and keeps the composite's own
    bands). Without ``composite_20m`` the composite's bands are used as they are.
    """

    def __init__(self, root: str | Path | Sequence[str | Path] = "data/demo/GEDI", composite: str | Path | None = None,
                 split: str = "train", chip_size: int = 64, targets: Sequence[str] = ("rh98",),
                 ignore_value: float = -1.0, require_footprints: bool = True, max_footprints: int | None = None,
                 waveform_length: int = 1420, waveform_mode: str = "pad", filter_quality: bool = True,
                 filter_degrade: bool = True, min_sensitivity: float | None = 0.9, filter_l2b_quality: bool = True,
                 power_beams_only: bool = False, night_only: bool = False, beams: Sequence[str] | None = None,
                 block_chips: int = 2, split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
                 label_fraction: float = 1.0, seed: int = 0, s2_units: str = "auto", s2_offset: float = 1000.0,
                 means: Sequence[float] | None = None, stds: Sequence[float] | None = None,
                 crs: str | None = None, dense_target: str | Path | None = None, dense_band: int = 1,
                 dense_resampling: str = "bilinear", leaf_on_months: Sequence[int] | None = None,
                 waveform_window: str = "full", composite_20m: str | Path | None = None,
                 upsample_20m: str = "cubic") -> None:
        """Index shots and chips.

        Args:
            root: GEDI granule folder (or list of granule files).
            composite: The 14-band GeoTIFF; default ``root/S2L2A_S1GRD_composite.tif``.
            split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
            chip_size: Chip side in pixels (positive, divisible by 8).
            targets: Subset of ``("rh98", "cover", "pai")`` written into ``mask``.
            ignore_value: ``mask`` value away from footprints (use as the task's ``ignore_index``).
            require_footprints: Drop chips without any footprint.
            max_footprints: Padding size K; chips with more footprints keep a seeded subset.
            waveform_length, waveform_mode, filter_quality, filter_degrade, min_sensitivity,
                filter_l2b_quality, power_beams_only, night_only, beams: as in :class:`GEDIShots`.
            block_chips: Side of the spatial split blocks, in chips.
            split_fractions: Train/val/test fractions of the blocks.
            label_fraction: Fraction of training chips kept (seeded).
            seed: Seed of the split, label subsampling and footprint subsets.
            s2_units: ``"auto"``, ``"reflectance"`` or ``"dn"`` for the S2 bands.
            s2_offset: L2A radiometric offset subtracted from DN (1000 for baseline >= 04.00, else 0).
            means, stds: Per-band statistics (14 each) after S2 conversion; default from the composite.
            crs: Expected CRS of the composite (e.g. ``"EPSG:32631"``); a different one is an error.
            dense_target: GeoTIFF of a dense product of the (single) target, e.g. ``root/canopy_height_rh98_10m.tif``;
                ``mask`` then holds its values instead of the footprints' (see above).
            dense_band: 1-based band of ``dense_target`` to read.
            dense_resampling: rasterio resampling name used when the product is not on the composite's grid.
            leaf_on_months, waveform_window: as in :class:`GEDIShots` (DUNIA: April-September, ``"signal"``).
            composite_20m: GeoTIFF of the 20 m S2 bands (see above), e.g. ``root/S2L2A_20m.tif``; ``"auto"``: that
                file when it exists (none otherwise); None: not used.
            upsample_20m: ``"cubic"`` (default, DUNIA), ``"nearest"`` or ``"none"`` (ignore ``composite_20m``).
        """
        if split not in ("all", "train", "val", "test"):
            raise ValueError(f"split must be 'all', 'train', 'val' or 'test', got {split!r}")
        if not isinstance(chip_size, int) or chip_size <= 0 or chip_size % 8:
            raise ValueError(f"chip_size must be a positive multiple of 8, got {chip_size!r}")
        if block_chips < 1:
            raise ValueError(f"block_chips must be >= 1, got {block_chips}")
        if s2_units not in ("auto", "reflectance", "dn"):
            raise ValueError(f"s2_units must be 'auto', 'reflectance' or 'dn', got {s2_units!r}")
        if upsample_20m not in UPSAMPLE_MODES:
            raise ValueError(f"upsample_20m must be one of {UPSAMPLE_MODES}, got {upsample_20m!r}")
        if max_footprints is not None and max_footprints < 1:
            raise ValueError(f"max_footprints must be >= 1, got {max_footprints}")
        self.split, self.chip_size, self.ignore_value = split, chip_size, float(ignore_value)
        self.targets = tuple(targets)
        self.shots_ds = GEDIShots(root, split="all", waveform_length=waveform_length, waveform_mode=waveform_mode,
                                  targets=targets, filter_quality=filter_quality, filter_degrade=filter_degrade,
                                  min_sensitivity=min_sensitivity, filter_l2b_quality=filter_l2b_quality,
                                  power_beams_only=power_beams_only, night_only=night_only, beams=beams,
                                  leaf_on_months=leaf_on_months, waveform_window=waveform_window)
        if composite is None:
            if not isinstance(root, (str, Path)):
                raise ValueError("composite must be given when root is a list of granule files")
            composite = Path(root) / COMPOSITE_NAME
        self.composite = require_file(composite, "Sentinel-1/2 composite GeoTIFF",
                                      "Give `composite=` or write the synthetic world with "
                                      "`eoplugins synth --out DIR`.")
        self._raster = _RasterCache(str(self.composite))
        self._open_composite(crs, s2_units, s2_offset, means, stds)
        if composite_20m == "auto":
            found = Path(root) / COMPOSITE_20M_NAME if isinstance(root, (str, Path)) else None
            composite_20m = found if found is not None and found.is_file() else None
            if composite_20m is None and upsample_20m != "none":
                logger.info("GEDI: no %s beside the granules; the composite's own 20 m bands are used",
                            COMPOSITE_20M_NAME)
        self._open_20m(composite_20m, upsample_20m)
        self._open_dense(dense_target, dense_band, dense_resampling)
        self._collocate()
        self._make_chips(split, block_chips, split_fractions, require_footprints, label_fraction, seed)
        self._set_padding(max_footprints, seed)

    # ------------------------------------------------------------------------------ composite
    def _open_composite(self, crs: str | None, s2_units: str, s2_offset: float,
                        means: Sequence[float] | None, stds: Sequence[float] | None) -> None:
        path = self.composite
        with rasterio.open(path) as src:
            if src.count != len(COMPOSITE_BANDS):
                raise EODataError(f"{path}: composite has {src.count} bands; expected {len(COMPOSITE_BANDS)} "
                                  f"({', '.join(COMPOSITE_BANDS)}: S2 L2A 12 bands then S1 VV, VH dB)")
            if src.crs is None:
                raise EODataError(f"{path}: composite has no (unknown) CRS; expected a georeferenced GeoTIFF "
                                  "(e.g. UTM EPSG:326xx)")
            try:
                self.crs_obj = ProjCRS.from_user_input(src.crs.to_wkt())
            except Exception as err:  # pyproj cannot interpret the CRS
                raise EODataError(f"{path}: unknown CRS {src.crs!r}: {err}") from err
            if crs is not None:
                try:
                    expected = ProjCRS.from_user_input(crs)
                except Exception as err:
                    raise ValueError(f"crs argument {crs!r} is not a valid CRS: {err}") from err
                if not expected.equals(self.crs_obj, ignore_axis_order=True):
                    raise EODataError(f"{path}: composite CRS {src.crs.to_string()} does not match the expected "
                                      f"crs={crs!r}")
            if src.transform.is_identity:
                raise EODataError(f"{path}: composite has no geotransform (identity); expected a georeferenced GeoTIFF")
            desc = [d.strip().upper() if d else None for d in src.descriptions]
            if all(d is None for d in desc):
                logger.warning("GEDI: %s has no band descriptions; assuming %s", path, ", ".join(COMPOSITE_BANDS))
                self.band_index = list(range(len(COMPOSITE_BANDS)))
            else:
                want = [b.upper() for b in COMPOSITE_BANDS]
                missing = [b for b in want if b not in desc]
                if missing:
                    raise EODataError(f"{path}: band descriptions {src.descriptions} lack {missing}; expected "
                                      f"{', '.join(COMPOSITE_BANDS)}")
                self.band_index = [desc.index(b) for b in want]
            self.transform = src.transform
            self.crs_str = src.crs.to_string()
            self.height, self.width = src.height, src.width
            if self.height < self.chip_size or self.width < self.chip_size:
                raise EODataError(f"{path}: composite of {self.height}x{self.width} pixels is smaller than one chip "
                                  f"of {self.chip_size}")
            f = max(1, math.ceil(max(src.height, src.width) / 1024))
            small = src.read(out_shape=(src.count, math.ceil(src.height / f), math.ceil(src.width / f)),
                             resampling=Resampling.nearest, masked=True)
            small = np.ma.filled(small.astype(np.float64), np.nan)[self.band_index]
        s2 = small[:12]
        if s2_units == "auto":
            med = np.nanmedian(s2) if np.isfinite(s2).any() else 0.0
            s2_units = "dn" if med > 2.0 else "reflectance"
            logger.info("GEDI: %s S2 bands read as %s (median %.3g)", path, s2_units, med)
        self.s2_units, self.s2_offset = s2_units, float(s2_offset)
        small = self._convert(small)
        if not np.isfinite(small).any(axis=(1, 2)).all():
            bad = [COMPOSITE_BANDS[i] for i in range(14) if not np.isfinite(small[i]).any()]
            raise EODataError(f"{path}: bands {bad} contain only no-data/NaN")
        for name, v in (("means", means), ("stds", stds)):
            if v is not None and len(v) != len(COMPOSITE_BANDS):
                raise ValueError(f"{name} must have {len(COMPOSITE_BANDS)} values (one per band), got {len(v)}")
        self.means = np.asarray(means if means is not None else np.nanmean(small, axis=(1, 2)), np.float32)
        sd = np.asarray(stds if stds is not None else np.nanstd(small, axis=(1, 2)), np.float32)
        self.stds = np.where(sd > 0, sd, 1.0).astype(np.float32)

    def _open_20m(self, path: str | Path | None, mode: str) -> None:
        """Check the 20 m S2 raster against the composite grid (see the class docstring)."""
        self.upsample_20m = mode
        self.composite_20m: Path | None = None
        self._r20: _RasterCache | None = None
        if path is None or mode == "none":
            return
        self.composite_20m = require_file(path, "20 m Sentinel-2 bands GeoTIFF",
                                          f"A GeoTIFF with bands {', '.join(S2_20M_BANDS)} at 20 m (the synthetic "
                                          f"world writes {COMPOSITE_20M_NAME} beside the composite; worlds written "
                                          "before it existed: `eoplugins synth --out DIR --overwrite`).")
        p, t = self.composite_20m, self.transform
        with rasterio.open(p) as src:
            desc = [d.strip().upper() if d else None for d in src.descriptions]
            if all(d is None for d in desc):
                if src.count != len(S2_20M_BANDS):
                    raise EODataError(f"{p}: {src.count} bands without descriptions; expected the {len(S2_20M_BANDS)}"
                                      f" 20 m bands {', '.join(S2_20M_BANDS)} in that order")
                self._idx20 = list(range(1, len(S2_20M_BANDS) + 1))
            else:
                missing = [b for b in S2_20M_BANDS if b not in desc]
                if missing:
                    raise EODataError(f"{p}: band descriptions {src.descriptions} lack {missing}; expected "
                                      f"{', '.join(S2_20M_BANDS)}")
                self._idx20 = [desc.index(b) + 1 for b in S2_20M_BANDS]
            if src.crs is None or not ProjCRS.from_user_input(src.crs.to_wkt()).equals(self.crs_obj,
                                                                                         ignore_axis_order=True):
                raise EODataError(f"{p}: CRS {src.crs} differs from the composite's {self.crs_str}; expected the 20 m "
                                  "bands on the composite's CRS")
            t20 = src.transform
            if abs(t20.a - 2 * t.a) > 1e-6 * abs(t.a) or abs(t20.e - 2 * t.e) > 1e-6 * abs(t.e) or t20.b or t20.d:
                raise EODataError(f"{p}: pixel size ({t20.a}, {t20.e}) is not twice the composite's ({t.a}, {t.e}); "
                                  "expected native 20 m bands of a 10 m composite")
            ox, oy = (t.c - t20.c) / t.a, (t.f - t20.f) / t.e
            if abs(ox - round(ox)) > 1e-3 or abs(oy - round(oy)) > 1e-3:
                raise EODataError(f"{p}: grid is not aligned with the composite's 10 m pixel edges (offset {ox:.3f}, "
                                  f"{oy:.3f} composite pixels)")
            self._off20 = (int(round(oy)), int(round(ox)))  # composite (0, 0) in 10 m pixels of the 20 m grid
            self._shape20 = (src.height, src.width)
            if (self._off20[0] < 0 or self._off20[1] < 0 or self._off20[0] + self.height > 2 * src.height
                    or self._off20[1] + self.width > 2 * src.width):
                raise EODataError(f"{p}: 20 m raster ({src.height}x{src.width} px, bounds {tuple(src.bounds)}) does "
                                  f"not cover the composite {self.composite} ({self.height}x{self.width} px)")
        self._r20 = _RasterCache(str(p))

    def _read_20m(self, row: int, col: int) -> np.ndarray:
        """The 20 m bands upsampled to the composite pixels ``[row:row+cs, col:col+cs]`` (``[6, cs, cs]``).

        A margin of two 20 m pixels (the cubic kernel's reach) is read around the chip, so every chip equals the
        same pixels of the whole raster upsampled at once.
        """
        cs = self.chip_size
        h20, w20 = self._shape20
        r, c = row + self._off20[0], col + self._off20[1]
        margin = 2 if self.upsample_20m == "cubic" else 0
        r0, c0 = max(r // 2 - margin, 0), max(c // 2 - margin, 0)
        r1, c1 = min(-(-(r + cs) // 2) + margin, h20), min(-(-(c + cs) // 2) + margin, w20)
        arr = self._r20.get().read(indexes=self._idx20, window=Window(c0, r0, c1 - c0, r1 - r0), masked=True)
        up = upsample_20m(np.ma.filled(arr.astype(np.float32), np.nan), self.upsample_20m)
        return up[:, r - 2 * r0 : r - 2 * r0 + cs, c - 2 * c0 : c - 2 * c0 + cs]

    def _open_dense(self, path: str | Path | None, band: int, resampling: str) -> None:
        """Check the dense product and decide whether it must be warped onto the composite's grid."""
        self.dense_target: Path | None = None
        self._dense: _RasterCache | None = None
        if path is None:
            return
        if len(self.targets) != 1:
            raise ValueError(f"dense_target needs exactly one target (the product's variable), "
                             f"got targets={self.targets}")
        try:
            self.dense_resampling = Resampling[resampling]
        except KeyError:
            raise ValueError(f"dense_resampling must be a rasterio resampling name (e.g. 'bilinear', 'nearest'), "
                             f"got {resampling!r}") from None
        self.dense_target = require_file(path, f"dense {self.targets[0]} product GeoTIFF",
                                         "Give the path of a single-band GeoTIFF; the synthetic world writes "
                                         f"{CANOPY_HEIGHT_NAME} beside the granules (worlds written before "
                                         "it existed: `eoplugins synth --out DIR --overwrite`).")
        with rasterio.open(self.dense_target) as src:
            if not isinstance(band, int) or not 1 <= band <= src.count:
                raise EODataError(f"{self.dense_target}: dense_band={band!r} but the file has {src.count} band(s); "
                                  "expected a 1-based band index")
            if src.crs is None or src.transform.is_identity:
                raise EODataError(f"{self.dense_target}: dense product has no CRS or no geotransform; expected a "
                                  f"georeferenced GeoTIFF (the composite is in {self.crs_str})")
            same_grid = (ProjCRS.from_user_input(src.crs.to_wkt()).equals(self.crs_obj, ignore_axis_order=True)
                         and src.transform.almost_equals(self.transform) and src.shape == (self.height, self.width))
            self.dense_nodata = src.nodata
            if not same_grid:
                logger.info("GEDI: %s (%s, %s px) is warped onto the composite grid (%s, %s px) with %s resampling",
                            self.dense_target.name, src.crs.to_string(), src.shape, self.crs_str,
                            (self.height, self.width), resampling)
        self.dense_band, self.dense_same_grid = band, same_grid
        self._dense = _RasterCache(str(self.dense_target))

    def _read_dense(self, row: int, col: int, nrows: int, ncols: int) -> np.ndarray:
        """Dense product on the composite's pixels ``[row:row+nrows, col:col+ncols]``; invalid pixels -> NaN."""
        src = self._dense.get()
        win = Window(col, row, ncols, nrows)
        if self.dense_same_grid:
            arr = src.read(self.dense_band, window=win, masked=True)
        else:
            with WarpedVRT(src, crs=self.crs_str, transform=self.transform, width=self.width, height=self.height,
                           resampling=self.dense_resampling, src_nodata=self.dense_nodata, nodata=np.nan,
                           dtype="float32") as vrt:
                arr = vrt.read(self.dense_band, window=win, masked=True)
        out = np.ma.filled(arr.astype(np.float32), np.nan)
        out[~np.isfinite(out)] = np.nan
        return out

    def _dense_valid_per_chip(self, n_r: int, n_c: int) -> np.ndarray:
        """Number of valid dense-product pixels in every chip (read one row of chips at a time)."""
        cs = self.chip_size
        counts = np.zeros(n_r * n_c, np.int64)
        for i in range(n_r):
            strip = np.isfinite(self._read_dense(i * cs, 0, cs, n_c * cs))
            counts[i * n_c : (i + 1) * n_c] = strip.reshape(cs, n_c, cs).sum(axis=(0, 2))
        if not counts.any():
            raise EODataError(f"{self.dense_target}: no valid (finite, not no-data={self.dense_nodata}) pixel falls "
                              f"inside the composite {self.composite} ({self.crs_str}); check that the product "
                              "covers it")
        return counts

    def _convert(self, x: np.ndarray) -> np.ndarray:
        """S2 DN -> reflectance when needed (bands first, composite order)."""
        x = x.astype(np.float32, copy=True)
        if self.s2_units == "dn":
            x[:12] = (x[:12] - self.s2_offset) / 10000.0
        return x

    def _read_image(self, row: int, col: int) -> np.ndarray:
        cs = self.chip_size
        src = self._raster.get()
        arr = src.read(indexes=[i + 1 for i in self.band_index], window=Window(col, row, cs, cs), masked=True)
        x = np.ma.filled(arr.astype(np.float32), np.nan)
        if self._r20 is not None:  # native 20 m bands replace the composite's (DUNIA: cubic to 10 m)
            x[[COMPOSITE_BANDS.index(b) for b in S2_20M_BANDS]] = self._read_20m(row, col)
        x = self._convert(x)
        x = (x - self.means[:, None, None]) / self.stds[:, None, None]
        return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)

    # ---------------------------------------------------------------------------- collocation
    def _collocate(self) -> None:
        s = self.shots_ds.shots
        tr = Transformer.from_crs("EPSG:4326", self.crs_obj, always_xy=True)
        x, y = tr.transform(s["lon"], s["lat"])
        inv = ~self.transform
        cols, rows = _affine_apply(inv, np.asarray(x), np.asarray(y))
        rows = np.floor(np.asarray(rows)).astype(np.int64)
        cols = np.floor(np.asarray(cols)).astype(np.int64)
        cs = self.chip_size
        h, w = (self.height // cs) * cs, (self.width // cs) * cs
        inside = np.isfinite(x) & np.isfinite(y) & (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        if not inside.any():
            files = ", ".join(str(g.l2a) for g in self.shots_ds.granules)
            box = tuple(round(b, 1) for b in self._bounds(0, 0, self.height, self.width))
            raise EODataError(f"all {len(rows)} GEDI shots of {files} fall outside the composite {self.composite} "
                              f"(CRS {self.crs_str}, bounds {box}); "
                              "check that the composite covers the granules and that its CRS is right")
        n_out = int((~inside).sum())
        if n_out:
            logger.info("GEDI: %d of %d filtered shots fall outside the full chips of %s", n_out, len(rows),
                        self.composite.name)
        self.shot_ids = np.nonzero(inside)[0]
        self.shot_rows, self.shot_cols = rows[inside], cols[inside]

    def _bounds(self, row: int, col: int, nrows: int, ncols: int) -> tuple[float, float, float, float]:
        t = self.transform
        xs, ys = zip(*(_affine_apply(t, c, r) for r, c in ((row, col), (row + nrows, col), (row, col + ncols),
                                                (row + nrows, col + ncols))))
        return min(xs), min(ys), max(xs), max(ys)

    def _make_chips(self, split: str, block_chips: int, fractions: Sequence[float], require: bool,
                    label_fraction: float, seed: int) -> None:
        cs = self.chip_size
        n_r, n_c = self.height // cs, self.width // cs
        chip_of_shot = (self.shot_rows // cs) * n_c + self.shot_cols // cs
        order = np.argsort(chip_of_shot, kind="stable")
        bounds = np.searchsorted(chip_of_shot[order], np.arange(n_r * n_c + 1))
        members = [order[bounds[k] : bounds[k + 1]] for k in range(n_r * n_c)]  # positions into shot_ids
        self.all_chip_counts = np.array([len(m) for m in members])
        cr, cc = np.divmod(np.arange(n_r * n_c), n_c)
        block = (cr // block_chips) * (math.ceil(n_c / block_chips)) + cc // block_chips
        ids = np.unique(block)
        if split == "all":
            chips = np.arange(n_r * n_c)
        else:
            parts = split_indices(len(ids), fractions, seed)
            chosen = ids[parts[("train", "val", "test").index(split)]]
            chips = np.nonzero(np.isin(block, chosen))[0]
        if len(chips) == 0:
            raise EODataError(f"{self.composite}: split {split!r} is empty: {len(ids)} spatial blocks of "
                              f"{block_chips}x{block_chips} chips cannot be cut by {list(fractions)}; use a smaller "
                              "block_chips or chip_size")
        if require:
            empty = chips[self.all_chip_counts[chips] == 0]
            if len(empty):
                logger.info("GEDI: %d of %d %s chips have no footprint and are excluded", len(empty), len(chips), split)
            chips = chips[self.all_chip_counts[chips] > 0]
            if len(chips) == 0:
                raise EODataError(f"{self.composite}: no chip of split {split!r} contains a GEDI footprint after "
                                  "filtering; use require_footprints=False, other split settings or more granules")
        if self._dense is not None:
            valid = self._dense_valid_per_chip(n_r, n_c)
            chips = chips[valid[chips] > 0]
            if len(chips) == 0:
                raise EODataError(f"{self.dense_target}: no chip of split {split!r} holds a valid pixel of the "
                                  "dense product")
        if split == "train" and label_fraction < 1.0:
            chips = np.asarray(subsample_fraction(chips, label_fraction, seed), np.int64)
        self.chips = [(int(k // n_c) * cs, int(k % n_c) * cs) for k in chips]
        self.chip_members = [members[k] for k in chips]
        rows = np.array([r for r, _ in self.chips], np.float64) + cs / 2
        cols = np.array([c for _, c in self.chips], np.float64) + cs / 2
        cx, cy = _affine_apply(self.transform, cols, rows)
        lon, lat = Transformer.from_crs(self.crs_obj, "EPSG:4326", always_xy=True).transform(cx, cy)
        self.chip_latlon = np.stack([np.atleast_1d(lat), np.atleast_1d(lon)], 1).astype(np.float32)

    def _set_padding(self, max_footprints: int | None, seed: int) -> None:
        most = int(self.all_chip_counts.max()) if len(self.all_chip_counts) else 0
        self.max_footprints = max(1, most) if max_footprints is None else int(max_footprints)
        rng = np.random.default_rng(seed)
        cut = 0
        for i, m in enumerate(self.chip_members):
            if len(m) > self.max_footprints:
                self.chip_members[i] = np.sort(rng.choice(m, self.max_footprints, replace=False))
                cut += 1
        if cut:
            logger.info("GEDI: %d chips hold more than max_footprints=%d footprints; a seeded subset is kept", cut,
                        self.max_footprints)

    # ------------------------------------------------------------------------------- sampling
    def __len__(self) -> int:
        return len(self.chips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Return chip ``index`` with its footprints, waveforms and sparse target map."""
        row, col = self.chips[index]
        cs, k_max = self.chip_size, self.max_footprints
        members = self.chip_members[index]
        sid = self.shot_ids[members]
        s = self.shots_ds.shots
        k = len(sid)
        fr = self.shot_rows[members] - row
        fc = self.shot_cols[members] - col
        foot = np.full((k_max, 2), -1, np.int64)
        foot[:k, 0], foot[:k, 1] = fr, fc
        fmask = np.zeros(k_max, bool)
        fmask[:k] = True
        wave = np.zeros((k_max, self.shots_ds.waveform_length), np.float32)
        for j, i in enumerate(sid):
            wave[j] = self.shots_ds.waveform(int(i))
        per = {}
        for t in TARGETS:
            v = np.full(k_max, self.ignore_value, np.float32)
            v[:k] = s[t][sid]
            per[t] = v
        mask = np.full((len(self.targets), cs, cs), self.ignore_value, np.float32)
        if self._dense is not None:
            dense = self._read_dense(row, col, cs, cs)
            mask[0] = np.where(np.isfinite(dense), dense, self.ignore_value)
        else:  # each footprint's value at its pixel, the mean where several share one
            for ti, t in enumerate(self.targets):
                vals = s[t][sid].astype(np.float64)
                ok = np.isfinite(vals)
                tot = np.zeros((cs, cs))
                num = np.zeros((cs, cs))
                np.add.at(tot, (fr[ok], fc[ok]), vals[ok])
                np.add.at(num, (fr[ok], fc[ok]), 1)
                mask[ti][num > 0] = (tot[num > 0] / num[num > 0]).astype(np.float32)
        sn = np.full(k_max, -1, np.int64)
        sn[:k] = s["shot_number"][sid]
        t = self.transform
        x0, y0 = _affine_apply(t, col, row)
        ct = rasterio.Affine(t.a, t.b, x0, t.d, t.e, y0)
        left, bottom, right, top = self._bounds(row, col, cs, cs)
        lat, lon = self.chip_latlon[index]
        return {
            "image": torch.from_numpy(self._read_image(row, col)),
            "mask": torch.from_numpy(mask[0] if len(self.targets) == 1 else mask),
            "footprints": torch.from_numpy(foot),
            "footprint_mask": torch.from_numpy(fmask),
            "waveform": torch.from_numpy(wave),
            **{t_: torch.from_numpy(v) for t_, v in per.items()},
            "shot_number": torch.from_numpy(sn),
            "crs": self.crs_str,
            "transform": torch.tensor([ct.a, ct.b, ct.c, ct.d, ct.e, ct.f], dtype=torch.float64),
            "bounds": torch.tensor([left, bottom, right, top], dtype=torch.float64),
            "location_coords": torch.tensor([lat, lon], dtype=torch.float32),
            "filename": f"{self.composite.stem}_r{row:05d}_c{col:05d}",
        }

    def plot(self, sample: dict[str, Any], show_titles: bool = True, suptitle: str | None = None) -> Figure:
        """Plot the RGB composite with footprints, their waveforms and the target map (and prediction)."""
        image = sample["image"]
        if isinstance(image, dict):  # modality dict (``image_modalities``): S2 channels come first
            image = torch.cat([v for v in image.values()], dim=0)
        img = image.detach().cpu().numpy()
        rgb = img[[3, 2, 1]].transpose(1, 2, 0)
        lo, hi = np.percentile(rgb, 2), np.percentile(rgb, 98)
        rgb = np.clip((rgb - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
        tgt = self.targets[0]
        mask = sample["mask"].detach().cpu().numpy()
        mask = mask if mask.ndim == 2 else mask[0]
        if "footprint_mask" in sample and "footprints" in sample and tgt in sample:
            fm = sample["footprint_mask"].detach().cpu().numpy().astype(bool)
            foot = sample["footprints"].detach().cpu().numpy()[fm]
            vals = sample[tgt].detach().cpu().numpy()[fm]
        elif self._dense is None:  # batch filtered to image/mask (as terratorch tasks plot it): footprints from the map
            fm = None
            foot = np.argwhere(mask != self.ignore_value)
            vals = mask[mask != self.ignore_value]
        else:  # dense target map: no footprint to mark
            fm, foot, vals = None, np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
        panels = 4 if "prediction" in sample else 3
        fig, axs = plt.subplots(1, panels, figsize=(4 * panels, 4))
        axs[0].imshow(rgb)
        if len(foot):
            sc = axs[0].scatter(foot[:, 1], foot[:, 0], c=vals, s=12, cmap="viridis", edgecolors="w", linewidths=0.3)
            fig.colorbar(sc, ax=axs[0], fraction=0.046)
        if fm is not None and "waveform" in sample:
            waves = sample["waveform"].detach().cpu().numpy()[fm]
            for w in waves[:20]:
                axs[1].plot(w, np.arange(len(w)), lw=0.7)
        else:
            axs[1].text(0.5, 0.5, "waveforms not in this batch", ha="center", va="center", transform=axs[1].transAxes)
        axs[1].invert_yaxis()
        shown = np.ma.masked_equal(mask, self.ignore_value)
        im = axs[2].imshow(shown, cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=axs[2], fraction=0.046)
        if panels == 4:
            pred = np.asarray(sample["prediction"].detach().cpu() if isinstance(sample["prediction"], Tensor)
                              else sample["prediction"])
            pred = pred if pred.ndim == 2 else pred[0]
            im = axs[3].imshow(pred, cmap="viridis")
            fig.colorbar(im, ax=axs[3], fraction=0.046)
        for a in (axs[0], axs[2], *axs[3:]):
            a.set_axis_off()
        if show_titles:
            axs[0].set_title(f"RGB + {len(foot)} footprints ({tgt})")
            axs[1].set_title("waveforms")
            axs[2].set_title(f"target {tgt}")
            if panels == 4:
                axs[3].set_title("prediction")
        if suptitle:
            fig.suptitle(suptitle)
        fig.tight_layout()
        return fig
