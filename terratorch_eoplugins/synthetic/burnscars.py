"""Synthetic HLS Burn Scars scenes in the real on-disk format (``ibm-nasa-geospatial/hls_burn_scars``).

Each scene is a 512x512, 30 m UTM window of its own :class:`~terratorch_eoplugins.synthetic.world.World`
(forest- and shrub-dominated land cover), rendered cloud-free on one fire-season date of 2018-2021.
HLS bands are the world's Sentinel-2 bands B02, B03, B04, B8A, B11, B12. Burn events are smooth
blobs inside burnable land (forest, grass/shrub) where the post-fire reflectance mixes towards a
char/ash spectrum: NIR drops strongly, SWIR2 rises, the visible darkens slightly, so the normalised
burn ratio NBR = (NIR - SWIR2) / (NIR + SWIR2) falls (dNBR > 0) as on real burn scars.

Written tree (literal real names)::

    hls_burn_scars/
      training/subsetted_512x512_HLS.S30.T11SMT.2019235.v1.4_merged.tif   6 bands, float, pixel-interleaved
      training/subsetted_512x512_HLS.S30.T11SMT.2019235.v1.4.mask.tif     1 band int16: 1 burn, 0 not, -1 no data
      validation/...

Images carry a UTM CRS written as a WKT without EPSG code (like the real files: ``to_epsg()`` gives
``None``, pyproj's ``to_epsg(min_confidence=25)`` the UTM code) and a 30 m north-up transform.
Some scenes have an edge swath without data (all bands 9999, mask -1) and some small unlabelled
regions (mask -1, valid image).

:func:`burn_map` returns the burned region of a scene on any grid resolution (e.g. 10 m for
Sentinel-2 renderings of the same fire), deterministic from the scene's seed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from scipy.ndimage import binary_opening, label, map_coordinates

from terratorch_eoplugins.synthetic.world import (
    FOREST,
    GRASSLAND,
    S2_BANDS,
    World,
    WorldSpec,
    _rng,
    smooth_noise,
)

#: Sentinel-2 bands that make up the six HLS S30 bands of the dataset, in file order.
HLS_S2_BANDS: tuple[str, ...] = ("B02", "B03", "B04", "B8A", "B11", "B12")
HLS_BAND_NAMES: tuple[str, ...] = ("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2")
_S2_INDEX = [S2_BANDS.index(b) for b in HLS_S2_BANDS]
#: Post-fire char/ash reflectance in the HLS bands (dark visible, very low NIR, high SWIR2).
_CHAR = np.array([0.030, 0.040, 0.050, 0.050, 0.170, 0.240], np.float32)
#: Value of image pixels without data (PANGAEA replaces it by 0).
NO_DATA_VALUE = 9999.0
SCENE_SIZE = 512
RESOLUTION = 30.0
#: Land cover of burn-scar scenes: (cropland, forest, grass/shrub, urban, water).
_LANDCOVER = (0.12, 0.45, 0.33, 0.05, 0.05)
#: MGRS tiles of western-US fire regions: (tile, UTM zone, easting and northing of the 100 km square's SW corner).
_TILES: tuple[tuple[str, int, int, int], ...] = (
    ("T10TGT", 10, 700000, 5200000),
    ("T11SMT", 11, 400000, 3700000),
    ("T10SEH", 10, 500000, 4200000),
    ("T11TLH", 11, 300000, 4700000),
    ("T12SVC", 12, 400000, 3700000),
    ("T13SDV", 13, 400000, 3900000),
)
_SIZES = {"tiny": (5, 2), "demo": (24, 8)}


def utm_wkt(zone: int) -> str:
    """WKT of WGS 84 / UTM ``zone`` N written the way the real files carry it: no EPSG authority."""
    return (
        f'PROJCS["UTM Zone {zone}, Northern Hemisphere",GEOGCS["Unknown datum based upon the WGS 84 ellipsoid",'
        'DATUM["Not specified (based on WGS 84 spheroid)",SPHEROID["WGS 84",6378137,298.257223563]],'
        'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],PROJECTION["Transverse_Mercator"],'
        f'PARAMETER["latitude_of_origin",0],PARAMETER["central_meridian",{6 * zone - 183}],'
        'PARAMETER["scale_factor",0.9996],PARAMETER["false_easting",500000],PARAMETER["false_northing",0],'
        'UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'
    )


@dataclasses.dataclass(frozen=True)
class BurnScene:
    """One synthetic HLS Burn Scars scene: where, when, and the seed of its world and fire.

    Args:
        folder: ``"training"`` or ``"validation"``.
        tile: MGRS tile id with its leading ``T`` (e.g. ``"T11SMT"``).
        zone: UTM zone (northern hemisphere) of the tile.
        origin: (x, y) of the scene's top-left corner in UTM metres.
        date: Acquisition date (post-fire).
        seed: Seed of the scene's world, fire and no-data regions.
        shape: (height, width) in pixels.
        resolution: Pixel size in metres.
    """

    folder: str
    tile: str
    zone: int
    origin: tuple[float, float]
    date: dt.date
    seed: int
    shape: tuple[int, int] = (SCENE_SIZE, SCENE_SIZE)
    resolution: float = RESOLUTION

    @property
    def epsg(self) -> int:
        return 32600 + self.zone

    @property
    def stem(self) -> str:
        """``subsetted_512x512_HLS.S30.{tile}.{YYYYDDD}.v1.4`` (shared by image and mask names)."""
        doy = self.date.timetuple().tm_yday
        return f"subsetted_512x512_HLS.S30.{self.tile}.{self.date.year}{doy:03d}.v1.4"

    @property
    def image_name(self) -> str:
        return f"{self.stem}_merged.tif"

    @property
    def mask_name(self) -> str:
        return f"{self.stem}.mask.tif"

    @property
    def crs_wkt(self) -> str:
        return utm_wkt(self.zone)

    @property
    def transform(self) -> Affine:
        x0, y0 = self.origin
        return Affine(self.resolution, 0.0, x0, 0.0, -self.resolution, y0)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in UTM metres."""
        x0, y0 = self.origin
        h, w = self.shape
        return x0, y0 - h * self.resolution, x0 + w * self.resolution, y0

    def world_spec(self) -> WorldSpec:
        """The world of this scene: its window, one cloud-free acquisition on :attr:`date`."""
        return WorldSpec(
            name=self.stem, crs=f"EPSG:{self.epsg}", origin=self.origin, shape=self.shape,
            resolution=self.resolution, tile=self.tile, seed=self.seed,
            start=(self.date - dt.timedelta(days=1)).isoformat(), end=(self.date + dt.timedelta(days=1)).isoformat(),
            n_s2_dates=1, n_s1_dates=1, cloudy_fraction=0.0, landcover_fractions=_LANDCOVER,
        )

    def world(self) -> World:
        return World(self.world_spec())


def burnscars_scenes(size: str = "tiny", seed: int = 0) -> list[BurnScene]:
    """The scenes written by :func:`write_burnscars` for ``size`` (``tiny``: 5 + 2, ``demo``: 24 + 8)."""
    if size not in _SIZES:
        raise ValueError(f"unknown burn-scars size {size!r}: expected one of {sorted(_SIZES)}")
    n_train, n_val = _SIZES[size]
    rng = _rng(seed, "burnscars", "scenes")
    span = 100000 - SCENE_SIZE * int(RESOLUTION)
    scenes: list[BurnScene] = []
    stems: set[str] = set()
    for i in range(n_train + n_val):
        tile, zone, e0, n0 = _TILES[int(rng.integers(len(_TILES)))]
        while True:
            date = dt.date(int(rng.integers(2018, 2022)), 1, 1) + dt.timedelta(days=int(rng.integers(151, 300)))
            # HLS pixels lie on a 30 m grid of absolute UTM coordinates (e.g. origin 716760, 5213190)
            x0 = 30 * (-(-e0 // 30) + int(rng.integers(0, span // 30)))
            y0 = 30 * (-(-(n0 + SCENE_SIZE * 30) // 30) + int(rng.integers(0, span // 30)))
            scene = BurnScene(folder="training" if i < n_train else "validation", tile=tile, zone=zone,
                              origin=(float(x0), float(y0)), date=date, seed=int(rng.integers(2**31)))
            if scene.stem not in stems:
                break
        stems.add(scene.stem)
        scenes.append(scene)
    return scenes


def burn_severity(scene: BurnScene, world: World | None = None) -> np.ndarray:
    """Burn severity ``(H, W)`` float32 of ``scene``: 0 unburned, 0.55-1 burned.

    One to three fires, each an elliptical Gaussian bump roughened by a smooth random field, are
    thresholded inside burnable land (forest, grass/shrub) so that about 5-20 % of the scene burns
    (specks under 64 pixels are dropped).
    """
    world = world if world is not None else scene.world()
    h, w = scene.shape
    rng = _rng(scene.seed, "burn")
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    field = 0.25 * smooth_noise((h, w), 12.0, _rng(scene.seed, "burn", "edge"))
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.15, 0.85, 2) * (h, w)
        r = rng.uniform(40, 130)
        aspect = rng.uniform(0.5, 1.0)
        theta = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
        v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
        field += np.exp(-0.5 * ((u / r) ** 2 + (v / (r * aspect)) ** 2))
    # Forest and grass/shrub burn; one-pixel grassy lanes between crop parcels do not carry the fire.
    burnable = binary_opening((world.landcover == FOREST) | (world.landcover == GRASSLAND), np.ones((3, 3), bool))
    k = int(round(rng.uniform(0.05, 0.20) * h * w))
    values = np.sort(field[burnable])
    thr = values[-k] if 0 < k <= values.size else (values[0] if values.size else np.inf)
    burned = burnable & (field >= thr)
    components, n = label(burned)
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    burned &= sizes[components] >= 64  # drop specks: mapped perimeters are contiguous
    ramp = np.clip((field - thr) / 0.3, 0, 1)
    texture = smooth_noise((h, w), 4.0, _rng(scene.seed, "burn", "texture"))
    severity = np.clip(0.6 + 0.35 * ramp + 0.05 * texture, 0.55, 1.0)
    return np.where(burned, severity, 0.0).astype(np.float32)


def burn_map(scene: BurnScene, resolution: float | None = None, world: World | None = None) -> np.ndarray:
    """Boolean burned region of ``scene`` on a north-up grid of ``resolution`` metres over its bounds.

    ``None`` (or the scene's 30 m) gives exactly the written mask's burned pixels (before no-data
    regions). A finer resolution (e.g. 10 m) resamples the burned region bilinearly with its
    boundary halfway between 30 m pixel centres; the grid's transform is
    ``Affine(resolution, 0, x0, 0, -resolution, y0)`` with the scene's :attr:`BurnScene.origin`.
    """
    burned = burn_severity(scene, world) > 0
    if resolution is None or resolution == scene.resolution:
        return burned
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    factor = scene.resolution / resolution
    h, w = scene.shape
    oh, ow = h * factor, w * factor
    if abs(oh - round(oh)) > 1e-6 or abs(ow - round(ow)) > 1e-6:
        raise ValueError(f"resolution {resolution} m must divide the scene extent {h * scene.resolution} m "
                         "into whole pixels")
    rows = (np.arange(round(oh)) + 0.5) / factor - 0.5
    cols = (np.arange(round(ow)) + 0.5) / factor - 0.5
    grid = np.meshgrid(rows, cols, indexing="ij")
    return map_coordinates(burned.astype(np.float32), grid, order=1, mode="nearest") >= 0.5


def render_scene(scene: BurnScene) -> tuple[np.ndarray, np.ndarray]:
    """Image ``(6, H, W)`` float32 HLS reflectance (9999 on no data) and mask ``(H, W)`` int16 (-1/0/1)."""
    world = scene.world()
    pre = world.s2_reflectance(0)[_S2_INDEX]
    severity = burn_severity(scene, world)
    rng = _rng(scene.seed, "burnscars", "render")
    post = (1 - severity)[None] * pre + severity[None] * _CHAR[:, None, None]
    post = post + (severity > 0)[None] * rng.normal(0, 0.006, post.shape).astype(np.float32)
    image = np.clip(post, 0.0, 1.5).astype(np.float32)
    mask = (severity > 0).astype(np.int16)

    h, w = scene.shape
    if rng.random() < 0.4:  # edge of the acquisition swath: no data in any band
        yy, xx = np.mgrid[0:h, 0:w]
        angle = rng.uniform(0, 2 * np.pi)
        proj = (xx - w / 2) * np.cos(angle) + (yy - h / 2) * np.sin(angle)
        outside = proj >= np.quantile(proj, 1 - rng.uniform(0.02, 0.12))
        image[:, outside] = NO_DATA_VALUE
        mask[outside] = -1
    if rng.random() < 0.4:  # small unlabelled regions with valid reflectance
        blobs = smooth_noise((h, w), 8.0, _rng(scene.seed, "burnscars", "unlabelled"))
        mask[blobs >= np.quantile(blobs, 1 - rng.uniform(0.005, 0.015))] = -1
    return image, mask


def write_scene(scene: BurnScene, root: str | Path, dtype: str = "float32") -> tuple[Path, Path]:
    """Write the image/mask GeoTIFF pair of ``scene`` under ``root/scene.folder``; return their paths."""
    folder = Path(root) / scene.folder
    folder.mkdir(parents=True, exist_ok=True)
    image, mask = render_scene(scene)
    h, w = scene.shape
    common = dict(driver="GTiff", width=w, height=h, crs=CRS.from_wkt(scene.crs_wkt), transform=scene.transform)
    image_path, mask_path = folder / scene.image_name, folder / scene.mask_name
    with rasterio.open(image_path, "w", count=6, dtype=dtype, interleave="pixel", **common) as dst:
        dst.write(image.astype(dtype))
        dst.descriptions = HLS_BAND_NAMES
    with rasterio.open(mask_path, "w", count=1, dtype="int16", **common) as dst:
        dst.write(mask[None])
    return image_path, mask_path


def write_burnscars(out_dir: str | Path, size: str = "tiny", seed: int = 0, dtype: str = "float32") -> Path:
    """Write ``out_dir/hls_burn_scars/{training,validation}`` and return ``out_dir/hls_burn_scars``.

    Args:
        out_dir: Parent folder.
        size: ``"tiny"`` (5 training + 2 validation scenes, seconds) or ``"demo"`` (24 + 8).
        seed: Seed of the scene list, worlds and fires.
        dtype: Image dtype; the real files are probably float64 (12.6 MB each), float32 halves the size.
    """
    if np.dtype(dtype).kind != "f":
        raise ValueError(f"dtype must be a float dtype (HLS reflectance), got {dtype!r}")
    root = Path(out_dir) / "hls_burn_scars"
    for scene in burnscars_scenes(size, seed):
        write_scene(scene, root, dtype)
    return root
