"""Label rasters of LIANet's own downstream tasks over the synthetic region (the reference's T32UPU tasks).

Written next to the region's Sentinel-2 tiles, on the same 10 m grid (CRS and transform of the tiles), each in
its source's format::

    LIANET_LABELS/{TILE}/DW/dw_{YYYYMMDDTHHMMSS}.tif   Dynamic World ``label`` band, uint8, one per S2 acquisition
    LIANET_LABELS/{TILE}/mch.tif                       canopy height (metres, float32; 0 outside forests)
    LIANET_LABELS/{TILE}/DLT.tif                       Copernicus HRL Dominant Leaf Type, uint8
    LIANET_LABELS/{TILE}/buildings.geojson             building footprints, Microsoft's format (EPSG:4326 polygons)

* **Dynamic World**: the 9-class ``label`` band (0 water, 1 trees, 2 grass, 3 flooded vegetation, 4 crops,
  5 shrub and scrub, 6 built, 7 bare, 8 snow and ice), one file per S2 acquisition as Dynamic World is
  predicted per S2 image; nodata 255 where the image is cloudy (cloud opacity > 0.3), as Dynamic World
  masks clouds. Seasonal: cropland is 4 crops while green (green fraction >= 0.25 on that date), else 7 bare.
  Forest -> 1, grassland -> 2, urban -> 6, water -> 0. Readers merge it into the paper's 6 classes.
* **Canopy height** (``mch.tif``): the world's forest canopy height in metres, 0 elsewhere.
* **Dominant leaf type** (``DLT.tif``): 0 all non-tree area, 1 broadleaved, 2 coniferous (the world's conifer
  mask), 255 outside the production area (a strip along the east edge, ``DLT_OUTSIDE_FRACTION`` of the width).
* **Buildings** (``buildings.geojson``): a FeatureCollection of polygons in EPSG:4326 (properties ``height`` and
  ``confidence`` = -1, as the Microsoft Global ML Building Footprints). Buildings lie only on URBAN pixels: the
  urban area is cut into 40 m blocks and each block whose 10 m pixels are all urban holds one seeded rectangle
  (axis-aligned in the region CRS, corners on the 2.5 m grid, 15-40 m a side), so rasterising at 2.5 m is exact.
  The world's S2 images mix bright roofs into each urban pixel by its building coverage
  (:attr:`World.building_coverage`), so the images carry the sub-pixel buildings as real ones do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyproj
import rasterio

from terratorch_eoplugins.dates import TIMESTAMP_FORMAT
from terratorch_eoplugins.synthetic.world import (
    BUILDING_BLOCK_PX,
    BUILDING_FINE_M,
    CROPLAND,
    FOREST,
    GRASSLAND,
    URBAN,
    WATER,
    World,
    make_world,
)

__all__ = ["DLT_NODATA", "DW_CLASSES", "DW_NODATA", "LABELS_DIR", "building_rectangles", "dw_label",
           "dlt_label", "write_lianet_labels"]

LABELS_DIR = "LIANET_LABELS"
#: Dynamic World's 9 classes of its ``label`` band
DW_CLASSES = ("water", "trees", "grass", "flooded_vegetation", "crops", "shrub_and_scrub", "built", "bare",
              "snow_and_ice")
DW_NODATA = 255
DLT_NODATA = 255
DLT_OUTSIDE_FRACTION = 0.03
#: cloud opacity above which a Dynamic World pixel is masked
DW_CLOUD_THRESHOLD = 0.3
#: green fraction from which a cropland pixel is "crops" (below: "bare")
CROP_GREEN_THRESHOLD = 0.25
#: building block side (10 m pixels) and fine grid step (metres)
BLOCK_PX = BUILDING_BLOCK_PX
FINE_M = BUILDING_FINE_M


def dw_label(world: World, index: int) -> np.ndarray:
    """The Dynamic World 9-class label of S2 acquisition ``index`` (uint8, 255 under clouds)."""
    lc = world.landcover
    green = world.green_fraction(world.s2_dates[index])
    out = np.full(lc.shape, DW_NODATA, np.uint8)
    out[lc == WATER] = 0
    out[lc == FOREST] = 1
    out[lc == GRASSLAND] = 2
    out[lc == URBAN] = 6
    crop = lc == CROPLAND
    out[crop & (green >= CROP_GREEN_THRESHOLD)] = 4
    out[crop & (green < CROP_GREEN_THRESHOLD)] = 7
    out[world.cloud_mask(index) > DW_CLOUD_THRESHOLD] = DW_NODATA
    return out


def dlt_label(world: World) -> np.ndarray:
    """HRL Dominant Leaf Type coding: 0 non-tree, 1 broadleaved, 2 coniferous, 255 outside the area."""
    forest = world.landcover == FOREST
    out = np.where(forest, np.where(world._conifer, 2, 1), 0).astype(np.uint8)
    outside = max(1, int(round(DLT_OUTSIDE_FRACTION * world.width)))
    out[:, world.width - outside:] = DLT_NODATA
    return out


def building_rectangles(world: World) -> list[tuple[float, float, float, float]]:
    """Building rectangles ``(left, bottom, right, top)`` in the region CRS (metres), seeded by the world's seed
    (:meth:`World.building_rectangles`; their coverage is mixed into the world's S2 reflectance)."""
    return world.building_rectangles()


def _profile(world: World, dtype: str, nodata: float | None) -> dict:
    return {"driver": "GTiff", "height": world.height, "width": world.width, "count": 1, "dtype": dtype,
            "crs": world.crs, "transform": world.transform, "compress": "deflate", "tiled": True,
            "blockxsize": 256, "blockysize": 256, "nodata": nodata}


def write_lianet_labels(out_dir: str | Path, size: str = "tiny", seed: int = 0, world: World | None = None) -> Path:
    """Write ``out_dir/LIANET_LABELS/{TILE}/`` (see the module doc) for the world of ``size``/``seed``; returns
    the ``LIANET_LABELS`` folder."""
    world = world if world is not None else make_world(size, seed=seed)
    root = Path(out_dir) / LABELS_DIR
    folder = root / world.spec.tile
    (folder / "DW").mkdir(parents=True, exist_ok=True)
    for i, when in enumerate(world.s2_dates):
        with rasterio.open(folder / "DW" / f"dw_{when.strftime(TIMESTAMP_FORMAT)}.tif", "w",
                           **_profile(world, "uint8", DW_NODATA)) as dst:
            dst.write(dw_label(world, i)[None])
            dst.descriptions = ("label",)
            dst.update_tags(ACQUISITION_TIME=when.isoformat(), CLASSES=",".join(DW_CLASSES))
    with rasterio.open(folder / "mch.tif", "w", **_profile(world, "float32", None), predictor=3) as dst:
        dst.write(world.canopy_height.astype(np.float32)[None])
        dst.descriptions = ("canopy_height",)
        dst.update_tags(UNITS="m")
    with rasterio.open(folder / "DLT.tif", "w", **_profile(world, "uint8", DLT_NODATA)) as dst:
        dst.write(dlt_label(world)[None])
        dst.descriptions = ("DLT",)
        dst.update_tags(CODES="0: all non-tree area, 1: broadleaved, 2: coniferous, 255: outside area")
    to_wgs = pyproj.Transformer.from_crs(world.crs.to_wkt(), "EPSG:4326", always_xy=True)
    features = []
    for left, bottom, right, top in building_rectangles(world):
        xs, ys = to_wgs.transform([left, right, right, left, left], [top, top, bottom, bottom, top])
        ring = [[float(x), float(y)] for x, y in zip(xs, ys)]
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": {"height": -1.0, "confidence": -1.0}})
    (folder / "buildings.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return root
