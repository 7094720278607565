"""A seeded, procedural Earth-observation region with known, learnable structure.

The :class:`World` holds the static geography of one region (land cover, crop parcels with
their PASTIS class, forest canopy height and cover, buildings in the urban area) and renders, for any acquisition date,
Sentinel-2 L2A bottom-of-atmosphere reflectance (12 bands, with clouds) and Sentinel-1
backscatter (VV, VH in dB, with speckle). Writers in this package cut the real datasets'
on-disk formats out of it, so loaders, models and configs are exercised end to end offline,
and tests can assert that a model learns the signal (crop class from phenology, canopy height
from radar/optical texture, ...), not only that it runs.

Everything is deterministic given :attr:`WorldSpec.seed`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from functools import cached_property

import numpy as np
from affine import Affine
from rasterio.crs import CRS

from terratorch_eoplugins.dates import to_datetime

#: Sentinel-2 L2A bands in file order (B10 cirrus is not part of L2A).
S2_BANDS: tuple[str, ...] = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
#: Central wavelengths (micrometres) of :data:`S2_BANDS`, e.g. for DOFA's wavelength-conditioned embedding.
S2_WAVELENGTHS: tuple[float, ...] = (0.443, 0.490, 0.560, 0.665, 0.705, 0.740, 0.783, 0.842, 0.865, 0.945, 1.610, 2.190)
#: L2A processing baseline >= 04.00 adds this offset to the digital numbers (DN = 10000 * reflectance + 1000).
S2_L2A_OFFSET = 1000
S1_BANDS: tuple[str, ...] = ("VV", "VH")

#: The world's crop classes are PASTIS' (1-18; 0 = not a crop parcel): see ``datasets.pastis.PASTIS_CLASSES``.

#: Land-cover codes of :attr:`World.landcover`.
LANDCOVER: dict[int, str] = {0: "cropland", 1: "forest", 2: "grassland", 3: "urban", 4: "water"}
CROPLAND, FOREST, GRASSLAND, URBAN, WATER = range(5)

# --- spectral endmembers (BOA reflectance per S2 band) ------------------------------------------
_SOIL = np.array([0.08, 0.09, 0.12, 0.16, 0.19, 0.21, 0.23, 0.25, 0.26, 0.27, 0.33, 0.29], np.float32)
_VEG = np.array([0.02, 0.03, 0.07, 0.03, 0.10, 0.30, 0.40, 0.45, 0.47, 0.48, 0.22, 0.11], np.float32)
_WATER = np.array([0.06, 0.06, 0.05, 0.03, 0.02, 0.015, 0.01, 0.01, 0.01, 0.008, 0.005, 0.004], np.float32)
_URBAN = np.array([0.12, 0.13, 0.15, 0.17, 0.18, 0.19, 0.20, 0.21, 0.21, 0.22, 0.26, 0.24], np.float32)
#: roofs: brighter than the urban ground (streets, yards) in every band, so a 10 m pixel's building coverage shows in
#: its reflectance by linear mixing, as sub-pixel roofs do in real Sentinel-2 images
_ROOF = np.array([0.20, 0.22, 0.25, 0.28, 0.29, 0.30, 0.31, 0.32, 0.32, 0.32, 0.37, 0.34], np.float32)
_CONIFER = np.array([0.01, 0.02, 0.04, 0.02, 0.06, 0.18, 0.24, 0.27, 0.28, 0.29, 0.13, 0.06], np.float32)
_CLOUD = np.array([0.55, 0.56, 0.57, 0.58, 0.58, 0.59, 0.60, 0.60, 0.60, 0.45, 0.50, 0.42], np.float32)

#: building layout: the urban area is cut into blocks of this many 10 m pixels a side; each block whose pixels are
#: all urban holds one rectangle with corners on a grid of this step (metres)
BUILDING_BLOCK_PX = 4
BUILDING_FINE_M = 2.5

# Per-class phenology: (start-of-season DOY, end-of-season DOY, peak green fraction, base green
# fraction, soil brightness, leaf tweak band, leaf tweak amount, structure factor for radar).
# Winter crops have a start DOY in autumn (> 250) and peak in spring of the following year.
_PHENOLOGY: dict[int, tuple[float, float, float, float, float, int, float, float]] = {
    1: (60, 330, 0.75, 0.45, 1.00, 5, 0.00, 0.35),    # Meadow: green most of the year
    2: (290, 190, 0.85, 0.05, 1.05, 10, 0.03, 0.55),  # Soft winter wheat
    3: (140, 275, 0.90, 0.02, 0.95, 8, 0.06, 1.00),   # Corn: late, tall
    4: (280, 170, 0.85, 0.05, 1.10, 4, -0.01, 0.50),  # Winter barley: earlier than wheat
    5: (265, 180, 0.80, 0.10, 0.90, 2, 0.05, 0.70),   # Winter rapeseed: yellow flowering (green/red up)
    6: (75, 200, 0.80, 0.02, 1.05, 10, -0.02, 0.45),  # Spring barley
    7: (120, 250, 0.75, 0.02, 1.00, 11, 0.04, 0.80),  # Sunflower
    8: (110, 290, 0.50, 0.10, 1.25, 6, 0.03, 0.60),   # Grapevine: sparse rows, bright soil
    9: (110, 285, 0.90, 0.02, 0.85, 7, 0.05, 0.60),   # Beet
    10: (285, 195, 0.85, 0.05, 1.00, 11, -0.02, 0.55),  # Winter triticale
    11: (295, 185, 0.80, 0.05, 1.15, 9, 0.04, 0.50),  # Winter durum wheat
    12: (90, 240, 0.65, 0.05, 0.90, 1, 0.04, 0.40),   # Fruits, vegetables, flowers
    13: (105, 230, 0.85, 0.02, 0.80, 8, -0.04, 0.45),  # Potatoes
    14: (50, 300, 0.70, 0.30, 0.95, 5, 0.04, 0.40),   # Leguminous fodder
    15: (135, 265, 0.85, 0.02, 1.00, 6, -0.04, 0.65),  # Soybeans
    16: (95, 300, 0.60, 0.25, 1.10, 7, -0.03, 0.90),  # Orchard
    17: (300, 195, 0.75, 0.05, 1.00, 3, 0.03, 0.50),  # Mixed cereal
    18: (150, 280, 0.80, 0.02, 0.95, 9, -0.05, 0.85),  # Sorghum
}
#: :data:`_PHENOLOGY` as a (19, 8) array indexed by class; class 0 (not a crop) has no season, soil brightness 1.
_PHENOLOGY_TABLE = np.array([_PHENOLOGY.get(c, (0, 0, 0, 0, 1, 0, 0, 0)) for c in range(19)], np.float32)
# Relative parcel frequencies, roughly PASTIS' long tail (meadow and wheat dominate).
_CLASS_FREQ = np.array([20, 12, 9, 5, 4, 3, 3, 3, 2.5, 2.5, 2.5, 2, 2, 2, 2, 1.5, 1.5, 1.5], np.float64)


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """Geometry, period and seed of a synthetic region.

    Args:
        name: Short identifier written into metadata.
        crs: CRS of the region's grid (a projected CRS in metres; UTM like Sentinel-2 tiles).
        origin: (x, y) of the top-left corner in ``crs`` units.
        shape: (height, width) in pixels.
        resolution: Pixel size in metres.
        tile: Sentinel-2 MGRS tile id the region pretends to belong to.
        seed: Seed of every random choice.
        start, end: Acquisition period (ISO dates).
        n_s2_dates: Number of Sentinel-2 acquisitions, evenly spaced with jitter.
        n_s1_dates: Number of Sentinel-1 acquisitions per orbit direction.
        cloudy_fraction: Fraction of S2 dates that carry clouds.
        landcover_fractions: Target fractions (cropland, forest, grassland, urban, water).
        parcel_size: (min, max) parcel side in pixels.
    """

    name: str = "synthetic"
    crs: str = "EPSG:32631"
    origin: tuple[float, float] = (630000.0, 4850000.0)
    shape: tuple[int, int] = (384, 256)
    resolution: float = 10.0
    tile: str = "T31TFJ"
    seed: int = 0
    start: str = "2018-09-01"
    end: str = "2019-10-31"
    n_s2_dates: int = 10
    n_s1_dates: int = 14
    cloudy_fraction: float = 0.3
    landcover_fractions: tuple[float, float, float, float, float] = (0.72, 0.12, 0.08, 0.04, 0.04)
    parcel_size: tuple[int, int] = (14, 48)

    @classmethod
    def preset(cls, size: str, seed: int = 0) -> WorldSpec:
        """Named sizes: ``tiny`` (unit tests, ~1 s) and ``demo`` (quickstart training in CPU minutes)."""
        if size == "tiny":
            return cls(name="tiny", shape=(384, 256), n_s2_dates=10, n_s1_dates=14, seed=seed)
        if size == "demo":
            return cls(name="demo", shape=(768, 768), n_s2_dates=20, n_s1_dates=28, seed=seed)
        raise ValueError(f"unknown world size {size!r}: expected 'tiny' or 'demo'")


def smooth_noise(shape: tuple[int, int], scale: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian random field with correlation length ``scale`` pixels, zero mean and unit std."""
    h, w = shape
    white = rng.standard_normal((h, w))
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    kernel = np.exp(-2.0 * (np.pi * scale) ** 2 * (fx**2 + fy**2))
    field = np.fft.irfft2(np.fft.rfft2(white) * kernel, s=(h, w))
    field -= field.mean()
    std = field.std()
    return (field / std if std > 0 else field).astype(np.float32)


def _rng(seed: int, *names: object) -> np.random.Generator:
    """Independent generator per (seed, purpose) so adding one draw never shifts another."""
    key = hashlib.sha256(repr((seed, *names)).encode()).digest()
    return np.random.default_rng(int.from_bytes(key[:8], "little"))


def _double_logistic(doy: np.ndarray | float, sos: np.ndarray, eos: np.ndarray, rate: float = 0.08) -> np.ndarray:
    """Green-up at ``sos`` and senescence at ``eos`` (days of year); seasons may wrap over new year."""
    doy = np.asarray(doy, np.float32)
    wraps = sos > eos
    # Unroll the season so that it is contiguous: for wrapping seasons, shift early-year days by +365.
    d = np.where(wraps & (doy < eos + 60), doy + 365.0, doy)
    e = np.where(wraps, eos + 365.0, eos)
    up = 1.0 / (1.0 + np.exp(-rate * (d - sos - 20)))
    down = 1.0 / (1.0 + np.exp(rate * (d - e + 20)))
    return (up * down).astype(np.float32)


class World:
    """The synthetic region described by a :class:`WorldSpec`."""

    def __init__(self, spec: WorldSpec) -> None:
        self.spec = spec
        self.height, self.width = spec.shape
        self.crs = CRS.from_user_input(spec.crs)
        x0, y0 = spec.origin
        self.transform = Affine(spec.resolution, 0.0, x0, 0.0, -spec.resolution, y0)
        self._build_geography()

    # ----------------------------------------------------------------------------------- geometry
    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in :attr:`crs` units."""
        x0, y0 = self.spec.origin
        r = self.spec.resolution
        return x0, y0 - self.height * r, x0 + self.width * r, y0

    # ---------------------------------------------------------------------------------- geography
    def _build_geography(self) -> None:
        s = self.spec
        h, w = self.shape
        cf, ff, gf, uf, wf = s.landcover_fractions
        lc = np.full((h, w), CROPLAND, np.uint8)
        scale = max(h, w) / 6.0
        n_forest = smooth_noise((h, w), scale, _rng(s.seed, "forest"))
        n_water = smooth_noise((h, w), scale * 0.7, _rng(s.seed, "water"))
        n_urban = smooth_noise((h, w), scale * 0.3, _rng(s.seed, "urban"))
        n_grass = smooth_noise((h, w), scale * 0.4, _rng(s.seed, "grass"))
        lc[n_grass >= np.quantile(n_grass, 1 - gf)] = GRASSLAND
        lc[n_forest >= np.quantile(n_forest, 1 - ff)] = FOREST
        lc[n_urban >= np.quantile(n_urban, 1 - uf)] = URBAN
        lc[n_water >= np.quantile(n_water, 1 - wf)] = WATER

        # Cadastre: horizontal strips of random height, each cut into fields of random width;
        # a one-pixel lane (hedge/road, background) separates neighbouring parcels.
        rng = _rng(s.seed, "parcels")
        lo, hi = s.parcel_size
        parcel_id = np.zeros((h, w), np.int32)
        pid = 0
        y = 0
        while y < h:
            sh = int(rng.integers(lo, hi + 1))
            x = 0
            while x < w:
                sw = int(rng.integers(lo, hi + 1))
                pid += 1
                parcel_id[y : min(y + sh - 1, h), x : min(x + sw - 1, w)] = pid
                x += sw
            y += sh
        parcel_id[lc != CROPLAND] = 0
        # Drop slivers left over by the land-cover masks.
        counts = np.bincount(parcel_id.ravel(), minlength=pid + 1)
        small = counts < (lo * lo) // 3
        small[0] = False
        parcel_id[small[parcel_id]] = 0
        ids, parcel_id = np.unique(parcel_id, return_inverse=True)
        parcel_id = parcel_id.reshape(h, w).astype(np.int32)
        if ids[0] != 0:  # no background at all: shift so that 0 stays "no parcel"
            parcel_id += 1
        n_parcels = int(parcel_id.max())
        lc[(lc == CROPLAND) & (parcel_id == 0)] = GRASSLAND  # lanes and slivers are grassy margins

        p = _CLASS_FREQ / _CLASS_FREQ.sum()
        crng = _rng(s.seed, "classes")
        parcel_class = np.zeros(n_parcels + 1, np.uint8)
        parcel_class[1:] = crng.choice(np.arange(1, 19), size=n_parcels, p=p)
        # Each class appears at least once when there are enough parcels.
        if n_parcels >= 18:
            parcel_class[1 + crng.permutation(n_parcels)[:18]] = np.arange(1, 19)
        self.n_parcels = n_parcels
        self.parcel_class = parcel_class
        self.parcel_id = parcel_id
        self.crop_class = parcel_class[parcel_id]
        self.landcover = lc

        # Per-parcel phenology jitter (intra-class variability) and per-pixel noise.
        jr = _rng(s.seed, "jitter")
        self._sos_jitter = jr.normal(0, 8, n_parcels + 1).astype(np.float32)
        self._peak_jitter = jr.normal(0, 0.05, n_parcels + 1).astype(np.float32)
        self._soil_jitter = jr.normal(0, 0.06, n_parcels + 1).astype(np.float32)

        # Forest structure: canopy height 5-35 m and cover 0.3-0.95, spatially smooth inside forests.
        hn = smooth_noise((h, w), scale * 0.15, _rng(s.seed, "canopy"))
        cn = smooth_noise((h, w), scale * 0.1, _rng(s.seed, "cover"))
        forest = lc == FOREST
        self.canopy_height = np.where(forest, np.clip(20 + 7 * hn, 3, 40), 0).astype(np.float32)
        cover = 1 / (1 + np.exp(-(0.6 * cn + 0.08 * (self.canopy_height - 18))))
        self.canopy_cover = np.where(forest, np.clip(0.25 + 0.7 * cover, 0, 0.97), 0).astype(np.float32)
        self._conifer = (smooth_noise((h, w), scale * 0.2, _rng(s.seed, "conifer")) > 0.3) & forest
        self._brightness = 1.0 + 0.04 * smooth_noise((h, w), 6.0, _rng(s.seed, "brightness"))

    # ---------------------------------------------------------------------------------- timeline
    @cached_property
    def s2_dates(self) -> list[dt.datetime]:
        """Sentinel-2 acquisition times (10:30 local overpass), sorted."""
        return self._dates(self.spec.n_s2_dates, "s2", hour=10, minute=30)

    def s1_dates(self, orbit: str) -> list[dt.datetime]:
        """Sentinel-1 acquisition times for ``orbit`` ``'asc'`` (evening pass) or ``'desc'`` (morning pass)."""
        if orbit not in ("asc", "desc"):
            raise ValueError(f"orbit must be 'asc' or 'desc', got {orbit!r}")
        return self._dates(self.spec.n_s1_dates, f"s1{orbit}", hour=17 if orbit == "asc" else 5, minute=50)

    def _dates(self, n: int, key: str, hour: int, minute: int) -> list[dt.datetime]:
        start, end = to_datetime(self.spec.start), to_datetime(self.spec.end)
        span = (end - start).days
        rng = _rng(self.spec.seed, "dates", key)
        base = np.linspace(0, span, n + 2)[1:-1]
        jitter = rng.uniform(-0.3, 0.3, n) * span / (n + 1)
        days = np.unique(np.clip(np.round(base + jitter), 0, span).astype(int))
        sec = int(rng.integers(0, 60))
        return [start + dt.timedelta(days=int(d), hours=hour, minutes=minute, seconds=sec) for d in days]

    @cached_property
    def cloudy_dates(self) -> np.ndarray:
        """Boolean per S2 date: does it carry clouds."""
        n = len(self.s2_dates)
        rng = _rng(self.spec.seed, "cloudy")
        cloudy = np.zeros(n, bool)
        k = int(round(self.spec.cloudy_fraction * n))
        cloudy[rng.permutation(n)[:k]] = True
        return cloudy

    # ---------------------------------------------------------------------------------- rendering
    def _window(self, arr: np.ndarray, window: tuple[slice, slice] | None) -> np.ndarray:
        return arr if window is None else arr[..., window[0], window[1]]

    def green_fraction(self, when: dt.datetime | dt.date | str,
                       window: tuple[slice, slice] | None = None) -> np.ndarray:
        """Fraction of green vegetation per pixel on a date: the phenological signal of each class."""
        when = to_datetime(when)
        doy = float(when.timetuple().tm_yday)
        pid = self._window(self.parcel_id, window)
        cls = self.parcel_class[pid]
        lc = self._window(self.landcover, window)
        params = _PHENOLOGY_TABLE
        sos = params[cls, 0] + self._sos_jitter[pid]
        eos = params[cls, 1] + self._sos_jitter[pid]
        peak = np.clip(params[cls, 2] + self._peak_jitter[pid], 0.05, 0.98)
        base = params[cls, 3]
        g = base + (peak - base) * _double_logistic(doy, sos, eos)
        season = 0.5 + 0.5 * np.cos(2 * np.pi * (doy - 200) / 365.0)  # 1 in July, 0 in January
        grass = 0.45 + 0.3 * season
        cover = self._window(self.canopy_cover, window)
        conifer = self._window(self._conifer, window)
        forest = cover * np.where(conifer, 0.85, 0.35 + 0.6 * season)
        g = np.where(lc == GRASSLAND, grass, g)
        g = np.where(lc == FOREST, forest, g)
        g = np.where((lc == URBAN) | (lc == WATER), 0.05 * (lc == URBAN), g)
        return np.clip(g, 0, 1).astype(np.float32)

    @cached_property
    def _building_cells(self) -> list[tuple[int, int, int, int]]:
        """Building rectangles as ``(row, col, height, width)`` in cells of the fine grid (``BUILDING_FINE_M``),
        seeded by the world's seed: one per all-urban block of ``BUILDING_BLOCK_PX`` pixels, 15-40 m a side."""
        rng = _rng(self.spec.seed, "buildings")
        urban = self.landcover == URBAN
        steps = int(round(self.spec.resolution / BUILDING_FINE_M))  # fine cells per 10 m pixel
        bpx = BUILDING_BLOCK_PX
        block = bpx * steps  # fine cells per block side
        out = []
        for r in range(0, self.height - bpx + 1, bpx):
            for c in range(0, self.width - bpx + 1, bpx):
                draw = rng.integers(0, 1 << 30, 4)  # drawn for every block, so the layout depends on the seed only
                if not urban[r:r + bpx, c:c + bpx].all():
                    continue
                w = 6 + int(draw[0] % (block - 5))  # 6..16 fine cells = 15..40 m
                h = 6 + int(draw[1] % (block - 5))
                x = int(draw[2] % (block - w + 1))
                y = int(draw[3] % (block - h + 1))
                out.append((r * steps + y, c * steps + x, h, w))
        return out

    def building_rectangles(self) -> list[tuple[float, float, float, float]]:
        """Building rectangles ``(left, bottom, right, top)`` in the region CRS (metres)."""
        left0, top0 = self.transform.c, self.transform.f
        f = BUILDING_FINE_M
        return [(left0 + x * f, top0 - (y + h) * f, left0 + (x + w) * f, top0 - y * f)
                for y, x, h, w in self._building_cells]

    @cached_property
    def building_coverage(self) -> np.ndarray:
        """Fraction (float32, 0-1) of each 10 m pixel covered by buildings: mixes roofs into the S2 reflectance
        (:meth:`s2_reflectance`), the ground truth of the LIANet building-coverage task."""
        steps = int(round(self.spec.resolution / BUILDING_FINE_M))
        fine = np.zeros((self.height * steps, self.width * steps), np.float32)
        for y, x, h, w in self._building_cells:
            fine[y:y + h, x:x + w] = 1.0
        return fine.reshape(self.height, steps, self.width, steps).mean(axis=(1, 3), dtype=np.float32)

    def cloud_mask(self, index: int, window: tuple[slice, slice] | None = None) -> np.ndarray:
        """Cloud opacity in [0, 1] of S2 date ``index`` (0 on clear dates)."""
        if not self.cloudy_dates[index]:
            shape = self.shape if window is None else self._window(self.parcel_id, window).shape
            return np.zeros(shape, np.float32)
        rng = _rng(self.spec.seed, "cloud", index)
        field = smooth_noise(self.shape, max(self.shape) / 10.0, rng)
        coverage = rng.uniform(0.1, 0.8)
        thr = np.quantile(field, 1 - coverage)
        opacity = np.clip((field - thr) * 2.0, 0, 1).astype(np.float32)
        return self._window(opacity, window)

    def s2_reflectance(self, index: int, window: tuple[slice, slice] | None = None) -> np.ndarray:
        """Sentinel-2 L2A BOA reflectance ``(12, h, w)`` of date ``index``, clouds included."""
        when = self.s2_dates[index]
        g = self.green_fraction(when, window)
        pid = self._window(self.parcel_id, window)
        cls = self.parcel_class[pid]
        lc = self._window(self.landcover, window)
        params = _PHENOLOGY_TABLE
        soil_b = params[cls, 4] * (1 + self._soil_jitter[pid])
        soil = _SOIL[:, None, None] * soil_b[None]
        veg = np.broadcast_to(_VEG[:, None, None], (12, *g.shape)).copy()
        tweak_band = params[cls, 5].astype(int)
        tweak = params[cls, 6] * g  # class-specific leaf chemistry, visible when green
        np.put_along_axis(veg, tweak_band[None], np.take_along_axis(veg, tweak_band[None], 0) + tweak[None], 0)
        refl = (1 - g)[None] * soil + g[None] * veg
        conifer = self._window(self._conifer, window)
        needles = (1 - g)[None] * soil * 0.6 + g[None] * _CONIFER[:, None, None]
        refl = np.where((lc == FOREST)[None] & conifer[None], needles, refl)
        refl = np.where((lc == WATER)[None], _WATER[:, None, None], refl)
        roofs = self._window(self.building_coverage, window)[None]
        refl = np.where((lc == URBAN)[None], (1 - roofs) * _URBAN[:, None, None] + roofs * _ROOF[:, None, None], refl)
        refl = refl * self._window(self._brightness, window)[None]
        rng = _rng(self.spec.seed, "s2noise", index, None if window is None else (window[0].start, window[1].start))
        refl = refl + rng.normal(0, 0.004, refl.shape).astype(np.float32)
        a = self.cloud_mask(index, window)
        refl = (1 - a)[None] * refl + a[None] * _CLOUD[:, None, None]
        return np.clip(refl, 0, 1.5).astype(np.float32)

    def s1_incidence_angle(self, orbit: str, window: tuple[slice, slice] | None = None) -> np.ndarray:
        """Sentinel-1 incidence angle ``(h, w)`` in degrees (ellipsoid) of the ``orbit``'s relative orbit.

        The satellite looks right: eastwards on ascending, westwards on descending passes, so the angle grows
        by ~0.07 degree per km across the IW swath (29-46 degrees over 250 km) in that direction. Centres
        41.7 (ascending) and 36 degrees (descending): eq. 15 on these angles accounts for the ~0.7 dB lower VV of
        the ascending passes in :meth:`s1_backscatter`.
        """
        h, w = self.shape
        x = (np.arange(w, dtype=np.float64) - (w - 1) / 2) * self.spec.resolution / 1000.0  # km east of centre
        asc = orbit.lower() == "asc"
        angle = (41.7 if asc else 36.0) + (0.068 if asc else -0.068) * x
        return self._window(np.broadcast_to(angle.astype(np.float32), (h, w)), window).copy()

    def s1_backscatter(self, index: int, orbit: str, window: tuple[slice, slice] | None = None) -> np.ndarray:
        """Sentinel-1 backscatter ``(2, h, w)`` (VV, VH in dB) of date ``index`` of ``orbit``.

        Backscatter grows with vegetation volume: green fraction times a class structure factor
        (tall corn and sunflower scatter more than meadow) and canopy height in forests.
        """
        when = self.s1_dates(orbit)[index]
        g = self.green_fraction(when, window)
        pid = self._window(self.parcel_id, window)
        cls = self.parcel_class[pid]
        lc = self._window(self.landcover, window)
        struct = _PHENOLOGY_TABLE[cls, 7]
        height = self._window(self.canopy_height, window)
        volume = np.where(lc == FOREST, 0.6 + 0.012 * height, g * (0.4 + 0.6 * struct))
        vv = -16.0 + 9.0 * volume
        vh = -24.0 + 11.0 * volume
        vv = np.where(lc == URBAN, -4.0, vv)
        vh = np.where(lc == URBAN, -12.0, vh)
        vv = np.where(lc == WATER, -23.0, vv)
        vh = np.where(lc == WATER, -30.0, vh)
        if orbit == "asc":  # slightly different incidence geometry
            vv, vh = vv - 0.7, vh - 0.5
        corner = None if window is None else (window[0].start, window[1].start)
        rng = _rng(self.spec.seed, "speckle", orbit, index, corner)
        enl = 4.4  # equivalent number of looks of multilooked GRD
        speckle = 10 * np.log10(rng.gamma(enl, 1 / enl, (2, *vv.shape)))
        return (np.stack([vv, vh]) + speckle).astype(np.float32)

    # ---------------------------------------------------------------------------------- helpers
    def pixel_to_xy(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map pixel centres (row, col) to projected coordinates (x, y) in :attr:`crs`."""
        xs = self.transform.c + (np.asarray(cols) + 0.5) * self.transform.a
        ys = self.transform.f + (np.asarray(rows) + 0.5) * self.transform.e
        return xs, ys


def make_world(size: str | WorldSpec = "tiny", seed: int = 0) -> World:
    """Build the :class:`World` of a named size (``tiny``/``demo``) or of an explicit spec."""
    spec = size if isinstance(size, WorldSpec) else WorldSpec.preset(size, seed=seed)
    return World(spec)
