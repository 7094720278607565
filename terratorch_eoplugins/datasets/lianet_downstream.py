"""LIANet's own downstream tasks in its pretraining region (the reference's T32UPU tasks, supplement section 9).

One region, five label sources, each read as the real product is read (by its georeferencing, reprojected with
nearest-neighbour resampling onto the region's 10 m grid when its grid differs):

=====================  ==========================================  ================================================
task                   file(s) under ``root``                      target
=====================  ==========================================  ================================================
``dynamic_world``      ``DW/dw_<YYYYMMDDTHHMMSS>.tif`` (one per     6 classes: 0 water (+ flooded vegetation), 1 trees,
                       date, Dynamic World's 9-class ``label``      2 grass (+ shrub and scrub), 3 crops, 4 built-up,
                       band; no-data 255)                           5 bare (+ snow and ice); 255 ignored
``canopy_height``      ``mch.tif`` (metres)                         height / 30 (float; L1 on it as the reference);
                                                                    no-data -> -1 (ignored)
``leaf_type``          ``DLT.tif`` (Copernicus HRL DLT coding)      0 no forest, 1 broadleaved, 2 coniferous;
                                                                    255 (outside area / no-data) ignored
``building_coverage``  ``buildings.geojson`` (Microsoft building    fraction (0-1) of each 10 m pixel covered by
                       footprints, polygons in any CRS)             buildings
``building_footprints``  same                                       binary building mask at 2.5 m (patch x 4)
=====================  ==========================================  ================================================

Buildings are rasterised per patch (``rasterio.features.rasterize``, pixel-centre rule) on the 2.5 m grid that
splits each 10 m pixel of the region in 4 x 4; the coverage is the mean of that mask over each 10 m pixel (so the
two building tasks share one rasterisation; no ``mbf_*.tif`` raster is needed).

Split (the reference's training box, supplement section 9): patches of ``patch_size`` pixels tile the region from
its top-left pixel (stride = patch size, partial patches at the right/bottom edges dropped). The training box is
either ``train_area_bounds`` (column0, row0, column1, row1 in pixels, end-exclusive, as the reference's pixel box) or
a square of ``train_area_km2`` (side ``sqrt(area) / pixel size``, pixel size from the region transform) whose
top-left pixel is ``train_box_origin`` (default the region's top-left pixel), clipped to the region. A patch
belongs to ``train`` if it lies inside the box and to ``val``/``test`` (the rest of the region, the same samples)
if it does not touch it; patches straddling the box edge are dropped from both, so no labelled pixel of the box
is ever scored. :attr:`RegionLabels.box` gives the clipped box and :attr:`RegionLabels.box_area_km2` its area.

Samples: every (acquisition date x patch) pair of the region, as the reference. Static labels (canopy height,
leaf type, buildings) give the same label on every date; Dynamic World gives the label of the label date nearest to
the acquisition (ties: the earlier one), and a pair whose nearest label is more than ``max_label_gap_days`` away
or whose label window holds no valid pixel is dropped. ``num_dates`` keeps that many evenly spaced dates
(``None``: all, the reference).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import rasterio
import rasterio.features
import rasterio.warp
import torch
from affine import Affine
from shapely import STRtree
from shapely.geometry import box as shapely_box

from terratorch_eoplugins.datasets.lianet import _LIANetSamples
from terratorch_eoplugins.datasets.s2_tiles import S2Region
from terratorch_eoplugins.dates import days_since_epoch, to_datetime
from terratorch_eoplugins.errors import EODataError, require_dir, require_file

__all__ = ["DW_TO_TASK", "REGION_TASKS", "RegionLabels", "patch_grid", "split_patches", "train_box"]

#: task -> (kind, number of classes or outputs, ignore value of the target)
REGION_TASKS: dict[str, tuple[str, int, float]] = {
    "dynamic_world": ("segmentation", 6, 255),
    "canopy_height": ("regression", 1, -1.0),
    "leaf_type": ("segmentation", 3, 255),
    "building_coverage": ("regression", 1, -1.0),
    "building_footprints": ("segmentation", 2, 255),
}
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "dynamic_world": ("Water", "Trees", "Grass", "Crops", "Built-up", "Bare"),
    "leaf_type": ("No forest", "Broadleaved", "Coniferous"),
    "building_footprints": ("Background", "Building"),
}
#: Dynamic World's 9 ``label`` classes -> the paper's 6 (flooded vegetation -> water, shrub -> grass, snow -> bare)
DW_TO_TASK = np.array([0, 1, 2, 0, 3, 2, 4, 5, 5], np.uint8)
DW_NODATA = 255
DLT_NODATA = 255
#: canopy heights are divided by this (the reference's label / 30 m)
HEIGHT_SCALE = 30.0
#: 2.5 m footprint cells per 10 m pixel side
FINE = 4
_PALETTE = np.array([[0.25, 0.45, 0.85], [0.22, 0.55, 0.24], [0.53, 0.69, 0.33], [0.89, 0.59, 0.31],
                     [0.77, 0.16, 0.11], [0.65, 0.61, 0.56]], np.float32)


def patch_grid(shape: tuple[int, int], patch_size: int) -> list[tuple[int, int]]:
    """(column, row) origins of the full ``patch_size`` patches tiling a ``shape`` (H, W) grid from (0, 0)."""
    h, w = shape
    return [(c, r) for r in range(0, h - patch_size + 1, patch_size) for c in range(0, w - patch_size + 1, patch_size)]


def train_box(region: S2Region, train_area_km2: float | None = None,
              train_area_bounds: Sequence[int] | None = None,
              train_box_origin: Sequence[int] = (0, 0)) -> tuple[int, int, int, int]:
    """The training box ``(col0, row0, col1, row1)`` (end-exclusive pixels) clipped to the region."""
    if (train_area_km2 is None) == (train_area_bounds is None):
        raise ValueError("give exactly one of train_area_km2 (square box) or train_area_bounds (pixel box)")
    h, w = region.shape
    if train_area_bounds is not None:
        if len(train_area_bounds) != 4:
            raise ValueError(f"train_area_bounds must be [col0, row0, col1, row1], got {train_area_bounds!r}")
        c0, r0, c1, r1 = (int(v) for v in train_area_bounds)
    else:
        if not train_area_km2 > 0:  # type: ignore[operator]
            raise ValueError(f"train_area_km2 must be positive, got {train_area_km2!r}")
        px = abs(region.transform.a) * abs(region.transform.e)  # m^2 per pixel
        side = int(round(math.sqrt(float(train_area_km2) * 1e6 / px)))  # type: ignore[arg-type]
        c0, r0 = (int(v) for v in train_box_origin)
        c1, r1 = c0 + side, r0 + side
    c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, w), min(r1, h)
    if c1 <= c0 or r1 <= r0:
        raise ValueError(f"the training box {train_area_bounds or train_area_km2!r} does not overlap the {h}x{w} "
                         "pixel region")
    return c0, r0, c1, r1


def split_patches(origins: Sequence[tuple[int, int]], patch_size: int, box: tuple[int, int, int, int],
                  split: str) -> list[tuple[int, int]]:
    """Patches fully inside ``box`` (``train``) or not touching it (other splits); straddling ones are in neither."""
    c0, r0, c1, r1 = box
    out = []
    for c, r in origins:
        inside = c >= c0 and r >= r0 and c + patch_size <= c1 and r + patch_size <= r1
        outside = c + patch_size <= c0 or c >= c1 or r + patch_size <= r0 or r >= r1
        if (split == "train" and inside) or (split != "train" and outside):
            out.append((c, r))
    return out


def _label_time(path: Path) -> dt.datetime:
    """Acquisition time of a Dynamic World file: its ``ACQUISITION_TIME`` tag, else the timestamp in its name."""
    with rasterio.open(path) as src:
        tag = src.tags().get("ACQUISITION_TIME")
    try:
        return to_datetime(tag if tag else path.stem.split("_", 1)[1])
    except (IndexError, ValueError) as err:
        raise EODataError(f"{path}: no acquisition time (tag ACQUISITION_TIME or a name dw_<YYYYMMDDTHHMMSS>.tif): "
                          f"{err}") from None


class RegionLabels(_LIANetSamples):
    """(acquisition date x patch) samples of one LIANet downstream task in the pretraining region.

    Args:
        root: folder of the task's label files (the synthetic world's ``LIANET_LABELS/<TILE>``; see the module doc).
        region: the pretraining region (:func:`~terratorch_eoplugins.datasets.s2_tiles.scan_region`).
        task: one of :data:`REGION_TASKS`.
        split: ``train`` (patches inside the training box) or ``val``/``test`` (patches outside it).
        patch_size: patch side in 10 m pixels (128 in the paper); building footprints are ``4 x`` that.
        train_area_km2, train_box_origin, train_area_bounds: the training box (module doc).
        image: ``"placeholder"`` (LIANet) or ``"s2"`` (baselines: the date's 12-band reflectance window).
        num_dates: evenly spaced acquisition dates kept (``None``: all).
        max_label_gap_days: Dynamic World only: the largest gap between an acquisition and its nearest label date.
    """

    def __init__(self, root: str | Path, region: S2Region, task: str = "dynamic_world", split: str = "train",
                 patch_size: int = 128, train_area_km2: float | None = 500.0,
                 train_box_origin: Sequence[int] = (0, 0), train_area_bounds: Sequence[int] | None = None,
                 image: str = "placeholder", num_dates: int | None = None, max_label_gap_days: float = 1.0,
                 boa_offset: float = 1000.0) -> None:
        super().__init__(region, patch_size, image, boa_offset)
        if task not in REGION_TASKS:
            raise ValueError(f"task must be one of {sorted(REGION_TASKS)}, got {task!r}")
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if num_dates is not None and num_dates < 1:
            raise ValueError(f"num_dates must be a positive int or None, got {num_dates}")
        self.root = require_dir(root, f"LIANet {task} label folder")
        self.task, self.split = task, split
        self.kind, self.num_outputs, self.ignore_value = REGION_TASKS[task]
        self.classes = CLASS_NAMES.get(task, ())
        self.box = train_box(region, train_area_km2 if train_area_bounds is None else None, train_area_bounds,
                             train_box_origin)
        res = abs(region.transform.a) * abs(region.transform.e)
        self.box_area_km2 = (self.box[2] - self.box[0]) * (self.box[3] - self.box[1]) * res / 1e6
        self.patches = split_patches(patch_grid(region.shape, self.patch_size), self.patch_size, self.box, split)
        dates = list(range(len(self.times)))
        if num_dates is not None and len(dates) > num_dates:
            dates = [dates[i] for i in np.round(np.linspace(0, len(dates) - 1, num_dates)).astype(int)]
        self._cache: dict[Any, np.ndarray] = {}
        self._label_index: dict[int, int] = {}
        if task == "dynamic_world":
            self._dw_files = sorted((require_dir(self.root / "DW", "Dynamic World label folder")).glob("dw_*.tif"))
            if not self._dw_files:
                raise EODataError(f"{self.root / 'DW'}: no Dynamic World label file dw_<YYYYMMDDTHHMMSS>.tif")
            label_days = np.array([days_since_epoch(_label_time(p)) for p in self._dw_files])
            for t in dates:
                gaps = np.abs(label_days - self.days[t])
                k = int(np.argmin(gaps))  # first minimum: the earlier label on ties (files sorted by time)
                if gaps[k] <= max_label_gap_days:
                    self._label_index[t] = k
            dates = [t for t in dates if t in self._label_index]
        elif task in ("building_coverage", "building_footprints"):
            self._load_buildings(require_file(self.root / "buildings.geojson", "building footprints"))
        else:
            require_file(self.root / ("mch.tif" if task == "canopy_height" else "DLT.tif"),
                         "canopy height raster" if task == "canopy_height" else "dominant leaf type raster")
        for k, (c, r) in enumerate(self.patches):
            for t in dates:
                sample = {"origin": (c, r), "time_index": t, "id": f"{task}_c{c}_r{r}", "index": k}
                if task == "dynamic_world" and not (self._mask(sample) != DW_NODATA).any():
                    continue
                self.samples.append(sample)
        if not self.samples:
            raise EODataError(f"{self.root}: no {task} sample in split {split!r}: {len(self.patches)} patch(es) of "
                              f"{self.patch_size} px {'inside' if split == 'train' else 'outside'} the training box "
                              f"{self.box} of the {region.shape[0]}x{region.shape[1]} region")

    @property
    def num_classes(self) -> int:
        return self.num_outputs

    # ------------------------------------------------------------------------------------------ readers
    def _on_region(self, path: Path, nodata: float, dtype: str) -> np.ndarray:
        """Band 1 of ``path`` on the region grid (nearest resampling when the grids differ), cached."""
        if path not in self._cache:
            reg = self.region
            with rasterio.open(path) as src:
                if src.crs is None:
                    raise EODataError(f"{path}: no CRS; label rasters are placed by their georeferencing")
                same = (src.crs == reg.crs and src.transform.almost_equals(reg.transform)
                        and (src.height, src.width) == tuple(reg.shape))
                if same:
                    arr = src.read(1).astype(dtype)
                    if src.nodata is not None:
                        arr[src.read_masks(1) == 0] = nodata
                else:
                    arr = np.full(reg.shape, nodata, dtype)
                    rasterio.warp.reproject(rasterio.band(src, 1), arr, dst_transform=reg.transform, dst_crs=reg.crs,
                                            dst_nodata=nodata, resampling=rasterio.enums.Resampling.nearest)
            self._cache[path] = arr
        return self._cache[path]

    def _load_buildings(self, path: Path) -> None:
        try:
            gdf = gpd.read_file(path)
        except Exception as err:  # noqa: BLE001 - any reader failure names the file
            raise EODataError(f"{path}: cannot be read as GeoJSON building footprints ({err})") from None
        if gdf.crs is None:
            gdf = gdf.set_crs("EPSG:4326")  # GeoJSON's default CRS
        gdf = gdf[gdf.geometry.notna() & gdf.geom_type.isin(["Polygon", "MultiPolygon"])]
        self._buildings = list(gdf.to_crs(self.region.crs.to_wkt()).geometry)
        self._tree = STRtree(self._buildings)

    def footprints(self, col: int, row: int) -> np.ndarray:
        """Binary building mask (uint8) at 2.5 m of the patch at ``(col, row)``: ``(4 P, 4 P)``."""
        key = ("fp", col, row)
        if key not in self._cache:
            p = self.patch_size
            tr = self.region.transform * Affine.translation(col, row) * Affine.scale(1 / FINE)
            x0, y0 = tr * (0, 0)
            x1, y1 = tr * (p * FINE, p * FINE)
            window = shapely_box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
            shapes = [(self._buildings[i], 1) for i in self._tree.query(window)]
            out = np.zeros((p * FINE, p * FINE), np.uint8)
            if shapes:
                out = rasterio.features.rasterize(shapes, out_shape=out.shape, transform=tr, fill=0, dtype="uint8")
            self._cache[key] = out
        return self._cache[key]

    def coverage(self, col: int, row: int) -> np.ndarray:
        """Building coverage fraction (float32, 0-1) of each 10 m pixel of the patch at ``(col, row)``."""
        p = self.patch_size
        return self.footprints(col, row).reshape(p, FINE, p, FINE).mean(axis=(1, 3), dtype=np.float32)

    def _mask(self, sample: Mapping[str, Any]) -> np.ndarray:
        col, row = sample["origin"]
        p = self.patch_size
        win = (slice(row, row + p), slice(col, col + p))
        if self.task == "dynamic_world":
            dw = self._on_region(self._dw_files[self._label_index[sample["time_index"]]], DW_NODATA, "uint8")[win]
            valid = dw < len(DW_TO_TASK)
            return np.where(valid, DW_TO_TASK[np.where(valid, dw, 0)], DW_NODATA).astype(np.uint8)
        if self.task == "leaf_type":
            dlt = self._on_region(self.root / "DLT.tif", DLT_NODATA, "uint8")[win]
            return np.where(dlt <= 2, dlt, DLT_NODATA).astype(np.uint8)
        if self.task == "canopy_height":
            h = self._on_region(self.root / "mch.tif", np.nan, "float32")[win]
            return np.where(np.isfinite(h) & (h >= 0), h / HEIGHT_SCALE, self.ignore_value).astype(np.float32)
        if self.task == "building_coverage":
            return self.coverage(col, row)
        return self.footprints(col, row)

    mask_title = "Target"

    def _mask_tensor(self, sample: Mapping[str, Any]) -> torch.Tensor:
        """Class indices, or float targets for the regression tasks (read once)."""
        if self.kind == "regression":
            return torch.from_numpy(np.ascontiguousarray(self._mask(sample), np.float32))
        return super()._mask_tensor(sample)

    def _prediction_map(self, pred: np.ndarray) -> np.ndarray:
        """The arg-max class, or the single regression output."""
        return pred.argmax(0) if self.kind == "segmentation" else pred[0]

    def _colorize(self, arr: np.ndarray) -> np.ndarray:
        """Classes coloured; regression targets in grey (ignored pixels black)."""
        if self.kind == "regression":
            v = np.where(arr == self.ignore_value, 0.0, arr).astype(np.float32)
            return np.repeat(np.clip(v / max(float(v.max()), 1e-6), 0, 1)[..., None], 3, axis=-1)
        out = np.ones((*arr.shape, 3), np.float32)
        labels = arr.astype(np.int64)
        ok = (labels >= 0) & (labels < self.num_outputs)
        out[ok] = _PALETTE[labels[ok] if self.num_outputs > 2 else labels[ok] * 4]
        return out
