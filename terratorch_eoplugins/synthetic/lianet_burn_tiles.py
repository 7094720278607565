"""Sentinel-2 10 m tiles of a burn-scar region, for LIANet pretraining on the BurnScars path.

LIANet's BurnScars protocol pretrains on the Sentinel-2 tile holding most HLS Burn Scars scenes and
pairs each scene with a post-fire acquisition. This writer picks the MGRS tile with the most synthetic
scenes (:func:`~terratorch_eoplugins.synthetic.burnscars.burnscars_scenes`), spans a region grid over
their footprints (UTM of that tile, 10 m) and writes one 12-band L2A GeoTIFF per acquisition in the
reference layout ``S2_TILES_BURNSCARS/{TILE}/{YYYYMMDDTHHMMSS}.tif`` (the same format as
:mod:`.tiles`). Acquisitions: one pre-fire date 20 days before the first fire, then each scene's
post-fire date (18:25 UTC overpass). On every date each scene's burn area (a ``window`` of its 30 m
grid centred on the fire, 128 px by default to keep the files small) shows its own world's reflectance
(upsampled to 10 m); scenes whose fire date has passed show the burn scar with the
same char mixing as the HLS images. Pixels outside the scene footprints are no-data (DN 0), as
outside the swath of a real tile; the files are sparse GeoTIFFs so the empty area costs nothing.
"""

from __future__ import annotations

import collections
import datetime as dt
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from scipy.ndimage import zoom

from terratorch_eoplugins.dates import TIMESTAMP_FORMAT
from terratorch_eoplugins.synthetic.burnscars import BurnScene, burn_severity, burnscars_scenes
from terratorch_eoplugins.synthetic.tiles import reflectance_to_dn
from terratorch_eoplugins.synthetic.world import S2_BANDS, _rng

__all__ = ["BURN_TILES_DIR", "burn_region_scenes", "write_lianet_burn_tiles"]

BURN_TILES_DIR = "S2_TILES_BURNSCARS"
RESOLUTION = 10.0
#: Char/ash reflectance in the 12 L2A bands (consistent with the HLS writer's 6-band spectrum).
_CHAR12 = np.array([0.030, 0.030, 0.040, 0.050, 0.060, 0.055, 0.052, 0.050, 0.050, 0.050, 0.170, 0.240], np.float32)


def burn_region_scenes(size: str = "tiny", seed: int = 0) -> tuple[str, list[BurnScene]]:
    """The MGRS tile with the most burn-scar scenes (first in scene order on ties) and its scenes."""
    scenes = burnscars_scenes(size, seed)
    counts = collections.Counter(s.tile for s in scenes)
    best = max(counts.values())
    tile = next(s.tile for s in scenes if counts[s.tile] == best)
    return tile, [s for s in scenes if s.tile == tile]


def _acquisitions(scenes: list[BurnScene]) -> list[dt.datetime]:
    first = min(s.date for s in scenes)
    days = {first - dt.timedelta(days=20), *(s.date for s in scenes)}
    return [dt.datetime(d.year, d.month, d.day, 18, 25, 31) for d in sorted(days)]


def _burn_window(scene: BurnScene, severity: np.ndarray, side: int) -> tuple[int, int]:
    """(row, col) of the ``side``-pixel window (scene grid) centred on the burned area, inside the scene."""
    h, w = severity.shape
    rows, cols = np.nonzero(severity > 0)
    cy, cx = (float(rows.mean()), float(cols.mean())) if rows.size else (h / 2, w / 2)
    r0 = int(np.clip(round(cy - side / 2), 0, h - side))
    c0 = int(np.clip(round(cx - side / 2), 0, w - side))
    return r0, c0


def write_lianet_burn_tiles(out_dir: str | Path, size: str = "tiny", seed: int = 0, window: int = 128) -> Path:
    """Write ``out_dir/S2_TILES_BURNSCARS/{TILE}/*.tif`` for the burn-scar scenes of ``size``/``seed``; return the root.

    Each scene contributes a ``window`` x ``window`` (30 m pixels) part centred on its burn area, written at
    10 m (``3 * window`` pixels a side); the region grid is the bounding box of these parts.
    """
    tile, scenes = burn_region_scenes(size, seed)
    window = int(min(window, scenes[0].shape[0], scenes[0].shape[1]))
    zone = scenes[0].zone
    factor = int(round(scenes[0].resolution / RESOLUTION))
    times = _acquisitions(scenes)
    parts = []
    for s in scenes:
        world = s.world()
        # Same geography, rendered on the region's acquisition dates (clear sky).
        world.__dict__["s2_dates"] = list(times)
        world.__dict__["cloudy_dates"] = np.zeros(len(times), bool)
        severity = burn_severity(s, world)
        r0, c0 = _burn_window(s, severity, window)
        x0, y0 = s.transform @ (c0, r0)
        rows, cols = slice(r0, r0 + window), slice(c0, c0 + window)
        parts.append((s, world, severity[rows, cols], (rows, cols), (x0, y0)))
    side = window * s.resolution
    left = min(p[4][0] for p in parts)
    top = max(p[4][1] for p in parts)
    right = max(p[4][0] + side for p in parts)
    bottom = min(p[4][1] - side for p in parts)
    width, height = int(round((right - left) / RESOLUTION)), int(round((top - bottom) / RESOLUTION))
    transform = Affine(RESOLUTION, 0.0, left, 0.0, -RESOLUTION, top)
    root = Path(out_dir) / BURN_TILES_DIR
    folder = root / tile
    folder.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "height": height, "width": width, "count": len(S2_BANDS), "dtype": "uint16",
               "crs": CRS.from_epsg(32600 + zone), "transform": transform, "compress": "deflate", "predictor": 2,
               "tiled": True, "blockxsize": 256, "blockysize": 256, "nodata": 0, "sparse_ok": True,
               "interleave": "band"}
    for i, when in enumerate(times):
        path = folder / f"{when.strftime(TIMESTAMP_FORMAT)}.tif"
        with rasterio.open(path, "w", **profile) as dst:
            for scene, world, severity, win, (x0, y0) in parts:
                refl = world.s2_reflectance(i, win)
                if when.date() >= scene.date:
                    rng = _rng(scene.seed, "lianet_burn", i)
                    refl = (1 - severity)[None] * refl + severity[None] * _CHAR12[:, None, None]
                    refl = refl + (severity > 0)[None] * rng.normal(0, 0.006, refl.shape).astype(np.float32)
                fine = zoom(refl, (1, factor, factor), order=1, mode="nearest", grid_mode=True)
                col = int(round((x0 - left) / RESOLUTION))
                row = int(round((top - y0) / RESOLUTION))
                dst.write(reflectance_to_dn(np.clip(fine, 0, 1.5)),
                          window=Window(col, row, fine.shape[2], fine.shape[1]))
            dst.descriptions = S2_BANDS
            dst.update_tags(ACQUISITION_TIME=when.isoformat(), PROCESSING_BASELINE="04.00", BOA_ADD_OFFSET="-1000",
                            BOA_QUANTIFICATION_VALUE="10000", TILE_ID=tile)
    return root
