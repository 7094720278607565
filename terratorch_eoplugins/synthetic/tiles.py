"""Sentinel-2 L2A and Sentinel-1 GeoTIFF tiles of a synthetic :class:`~.world.World`.

Layout (the LIANet reference layout: one full multi-band GeoTIFF per acquisition, timestamp in the name)::

    S2_TILES/{TILE}/{YYYYMMDDTHHMMSS}.tif              12 x H x W uint16 DN = 10000 * reflectance + 1000
    S2_TILES/{TILE}/MSK_CLDPRB/{YYYYMMDDTHHMMSS}.tif   1 x H x W uint8 cloud probability (0-100), like L2A's MSK_CLDPRB
    S1_TILES/{TILE}/{ASC|DESC}/{YYYYMMDDTHHMMSS}.tif   3 x H x W float32 backscatter VV, VH (dB), angle (degrees)

The S1 ``angle`` band is the incidence angle from the ellipsoid, the third band of Google Earth Engine's
``COPERNICUS/S1_GRD`` exports (VV, VH, angle); readers use it for DUNIA's incidence normalisation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio

from terratorch_eoplugins.dates import TIMESTAMP_FORMAT
from terratorch_eoplugins.synthetic.world import S1_BANDS, S2_BANDS, S2_L2A_OFFSET, World


def reflectance_to_dn(refl: np.ndarray) -> np.ndarray:
    """L2A digital numbers (processing baseline >= 04.00): ``round(10000 * reflectance) + 1000`` as uint16."""
    return np.clip(np.round(refl * 10000.0) + S2_L2A_OFFSET, 1, 65535).astype(np.uint16)


def _profile(world: World, count: int, dtype: str) -> dict:
    return {
        "driver": "GTiff", "height": world.height, "width": world.width, "count": count, "dtype": dtype,
        "crs": world.crs, "transform": world.transform, "compress": "deflate", "tiled": True,
        "blockxsize": 256, "blockysize": 256, "interleave": "band",
    }


class S2TileWriter:
    """Writes one Sentinel-2 L2A GeoTIFF (and its cloud-probability mask) per rendered date."""

    def __init__(self, world: World, out_dir: str | Path) -> None:
        self.world = world
        self.dir = Path(out_dir) / "S2_TILES" / world.spec.tile
        (self.dir / "MSK_CLDPRB").mkdir(parents=True, exist_ok=True)

    def add(self, index: int, reflectance: np.ndarray, clouds: np.ndarray) -> Path:
        when = self.world.s2_dates[index]
        stamp = when.strftime(TIMESTAMP_FORMAT)
        path = self.dir / f"{stamp}.tif"
        with rasterio.open(path, "w", **_profile(self.world, len(S2_BANDS), "uint16"), predictor=2) as dst:
            dst.write(reflectance_to_dn(reflectance))
            dst.descriptions = S2_BANDS
            dst.update_tags(ACQUISITION_TIME=when.isoformat(), PROCESSING_BASELINE="04.00",
                            BOA_ADD_OFFSET=str(-S2_L2A_OFFSET), BOA_QUANTIFICATION_VALUE="10000",
                            TILE_ID=self.world.spec.tile)
        with rasterio.open(self.dir / "MSK_CLDPRB" / f"{stamp}.tif", "w", **_profile(self.world, 1, "uint8")) as dst:
            dst.write(np.round(clouds * 100).astype(np.uint8)[None])
            dst.descriptions = ("MSK_CLDPRB",)
        return path


class S1TileWriter:
    """Writes one Sentinel-1 VV/VH backscatter (dB) + incidence angle GeoTIFF per rendered date and orbit."""

    def __init__(self, world: World, out_dir: str | Path) -> None:
        self.world = world
        self.dir = Path(out_dir) / "S1_TILES" / world.spec.tile
        for orbit in ("ASC", "DESC"):
            (self.dir / orbit).mkdir(parents=True, exist_ok=True)

    def add(self, index: int, orbit: str, backscatter: np.ndarray) -> Path:
        when = self.world.s1_dates(orbit)[index]
        path = self.dir / orbit.upper() / f"{when.strftime(TIMESTAMP_FORMAT)}.tif"
        angle = self.world.s1_incidence_angle(orbit)[None]
        with rasterio.open(path, "w", **_profile(self.world, len(S1_BANDS) + 1, "float32"), predictor=3) as dst:
            dst.write(np.concatenate([backscatter.astype(np.float32), angle]))
            dst.descriptions = (*S1_BANDS, "angle")
            dst.update_tags(ACQUISITION_TIME=when.isoformat(), ORBIT_DIRECTION=orbit.upper(),
                            UNITS="dB; angle: degrees", TILE_ID=self.world.spec.tile)
        return path
