"""Embedding export (``eoplugins embed``): per-pixel embeddings of a region as a georeferenced GeoTIFF stack.

* **DUNIA** (:mod:`terratorch_eoplugins.models.dunia`): ``O^V`` (vertical) and/or ``O^H`` (horizontal) pixel
  embeddings of the pretrained image model for a 14-band Sentinel-2 L2A + Sentinel-1 composite (one GeoTIFF, a
  12-band S2 + a 2-band S1 GeoTIFF on one grid, or a folder holding ``S2L2A_S1GRD_composite.tif`` such as a GEDI
  data root). The input is read as the pretraining chips read it (:class:`~terratorch_eoplugins.datasets.
  gedi_chips.GEDIChips`): bands reordered by their descriptions to ``B01..B12, VV, VH``, S2 digital numbers
  turned into reflectance (``(DN - 1000) / 10000``, detected from the S2 median unless ``s2_units`` says), every
  band standardised with the mean and standard deviation of the whole input raster (or of ``stats_from``, e.g.
  the pretraining composite when only a part of it is embedded), no-data set to 0.
* **LIANet** (:mod:`terratorch_eoplugins.models.lianet`): the generator's trunk features (the fine-tuning
  backbone's output) for every pixel ``(x, y)`` of the pretraining region's grid at one date. LIANet is
  coordinate-only: the region (grid shape, CRS, transform) and the acquisition dates come from the pretraining
  checkpoint; ``bbox`` cuts a part of the region, ``date`` chooses the time (an acquisition on that calendar day
  is used at its exact time; another day is encoded at 00:00 when the time encoding is continuous, and is an
  error for the ``index`` encoding, which only knows the pretraining acquisitions).

**Tiles.** The region is processed tile by tile (``tile_size`` x ``tile_size`` pixels, neighbouring tiles
overlapping by ``overlap`` pixels), so memory is bounded by ``batch_size`` tiles whatever the region's size.
Tiles are stitched by centre-cropping: every output pixel is taken from the one tile in which it lies deepest
(farthest from a tile edge that is not the edge of the input raster / region), i.e. at least ``overlap // 2``
pixels inside. A tile reaches past the requested bbox into the rest of the raster or region where there is some,
so bbox pixels keep their context. Both models see their whole input jointly (DUNIA: global self-attention and
absolute sine-cosine positions over the tile's tokens; LIANet: GroupNorm statistics over the patch), so an
embedding depends on the tile it was computed in: every output pixel is *exactly* the model's forward on its
tile, and a one-shot forward over a larger window gives (slightly) different values. The defaults are the
pretraining input sizes (DUNIA: 64 px chips, appendix E.1; LIANet: 128 px patches), with 16 / 32 px overlap.
A raster smaller than a DUNIA tile is zero-padded (the standardised mean, as the datasets fill no-data) to the
next multiple of the patch size; LIANet tiles never leave the region.

**Output.** A Cloud-Optimized GeoTIFF (DEFLATE with the floating-point predictor, 256 px internal tiles,
overviews averaged) with one band per embedding dimension, band descriptions ``OV_00..``, ``OH_00..`` (DUNIA)
or ``trunk_000..`` (LIANet), the CRS and transform of the input raster / region (shifted to the bbox), and tags
recording the model, checkpoint, date, tiling and normalisation. ``dtype="float16"`` stores IEEE half floats
(GDAL < 3.11, rasterio 1.4: ``NBITS=16`` on a Float32 band, read as float32 arrays holding the float16-rounded
values; GDAL >= 3.11, rasterio 1.5: a native Float16 band, read as float16 arrays). The file
is written through temporary files beside ``out`` and moved into place at the end; an existing ``out`` is only
replaced with ``overwrite=True``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
import torch
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import CRSError, RasterioIOError
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from terratorch_eoplugins.datasets.gedi_chips import COMPOSITE_BANDS, COMPOSITE_NAME
from terratorch_eoplugins.dates import TIME_EPOCH, days_since_epoch
from terratorch_eoplugins.errors import EODataError
from terratorch_eoplugins.models.dunia import load_dunia_checkpoint
from terratorch_eoplugins.models.lianet import load_generator
from terratorch_eoplugins.runtime import exact_matmul, read_checkpoint

__all__ = [
    "DUNIA_TILE", "LIANET_TILE", "CompositeInput", "EmbedReport", "Grid", "Tile", "axis_tiles", "bbox_window",
    "embed_dunia", "embed_lianet", "lianet_time", "main", "plan_tiles", "write_embedding_raster",
]

logger = logging.getLogger("terratorch_eoplugins.analysis.embed")

#: default (tile size, overlap) of each model: its pretraining input size (DUNIA appendix E.1: 64 px chips;
#: LIANet: 128 px patches)
DUNIA_TILE: tuple[int, int] = (64, 16)
LIANET_TILE: tuple[int, int] = (128, 32)
DTYPES = ("float32", "float16")
DUNIA_KINDS = ("OV", "OH", "both")
#: internal tile side of the written COG
BLOCKSIZE = 256


# ============================================================================================ grid and tiles
@dataclasses.dataclass(frozen=True)
class Grid:
    """A north-up pixel grid: CRS, affine transform of pixel (0, 0)'s corner, height and width in pixels."""

    crs: CRS
    transform: Affine
    height: int
    width: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in :attr:`crs`."""
        t = self.transform
        return t.c, t.f + t.e * self.height, t.c + t.a * self.width, t.f


@dataclasses.dataclass(frozen=True)
class Tile:
    """One model input window (``row``, ``col``, ``height``, ``width`` in the grid) and the part of it that goes
    to the output (``own``: a :class:`~rasterio.windows.Window` in grid pixels)."""

    row: int
    col: int
    height: int
    width: int
    own: Window


def axis_tiles(lo: int, hi: int, n: int, size: int, overlap: int) -> list[tuple[int, int, int]]:
    """Tiles along one axis covering output pixels ``[lo, hi)`` of an axis of ``n`` pixels.

    Returns ``(start, own_lo, own_hi)`` per tile: the tile reads ``[start, start + size)`` (inside ``[0, n)``;
    ``size`` is clipped to ``n``) and owns the output pixels ``[own_lo, own_hi)``, each pixel owned by the tile in
    which it lies deepest (the distance to the nearest tile edge that is not an end of the axis; ties go to the
    earlier tile). Consecutive tiles start ``size - overlap`` apart.
    """
    if not 0 <= lo < hi <= n:
        raise ValueError(f"output range [{lo}, {hi}) is not inside the axis [0, {n})")
    if size < 1 or overlap < 0:
        raise ValueError(f"tile size must be >= 1 and overlap >= 0, got {size} and {overlap}")
    if size > n:  # a context smaller than the tile: one tile along this axis, or few with a moderate overlap
        size, overlap = n, min(overlap, n // 2)
    step, margin = max(1, size - overlap), overlap // 2
    starts: list[int] = []
    s = lo - margin
    while True:
        c = min(max(s, 0), n - size)
        if not starts or c != starts[-1]:
            starts.append(c)
        if c + size == n or c + size - margin >= hi:
            break
        s += step
    p = np.arange(lo, hi)
    depth = np.full((len(starts), len(p)), -np.inf)
    for k, c in enumerate(starts):
        left = p - c if c > 0 else np.full(len(p), np.inf)
        right = c + size - 1 - p if c + size < n else np.full(len(p), np.inf)
        depth[k] = np.where((p >= c) & (p < c + size), np.minimum(left, right), -np.inf)
    best = depth.argmax(0)
    out = []
    for k, c in enumerate(starts):
        mine = np.nonzero(best == k)[0]
        if len(mine) == 0:
            continue
        if mine[-1] - mine[0] + 1 != len(mine):  # cannot happen for equal-size sorted tiles
            raise RuntimeError(f"tile {k} of axis [{lo}, {hi}) owns a non-contiguous range")
        out.append((c, lo + int(mine[0]), lo + int(mine[-1]) + 1))
    return out


def plan_tiles(window: Window, grid_shape: tuple[int, int], tile_size: tuple[int, int], overlap: int) -> list[Tile]:
    """The tiles (row-major) covering ``window`` of a grid of ``grid_shape`` (see :func:`axis_tiles`)."""
    r0, c0 = int(window.row_off), int(window.col_off)
    rows = axis_tiles(r0, r0 + int(window.height), grid_shape[0], tile_size[0], overlap)
    cols = axis_tiles(c0, c0 + int(window.width), grid_shape[1], tile_size[1], overlap)
    th, tw = min(tile_size[0], grid_shape[0]), min(tile_size[1], grid_shape[1])
    return [Tile(rs, cs, th, tw, Window(ca, ra, cb - ca, rb - ra)) for rs, ra, rb in rows for cs, ca, cb in cols]


def _parse_crs(value: Any, what: str) -> CRS:
    try:
        return value if isinstance(value, CRS) else CRS.from_user_input(value)
    except (CRSError, ValueError, TypeError) as err:
        raise ValueError(f"{what}: {value!r} is not a valid CRS ({err}); expected e.g. 'EPSG:32631'") from None


def bbox_window(bbox: Sequence[float] | None, grid: Grid, bbox_crs: Any = None, what: str = "the input raster",
                arg: str = "--bbox") -> Window:
    """The pixel window of ``grid`` covering ``bbox`` (minx, miny, maxx, maxy in ``bbox_crs``, default the grid's
    CRS), snapped outwards to whole pixels; ``None``: the whole grid. Raises ``ValueError`` naming ``arg`` when the
    box is malformed or not inside the grid's bounds."""
    if bbox is None:
        return Window(0, 0, grid.width, grid.height)
    if len(bbox) != 4:
        raise ValueError(f"{arg} needs 4 numbers (minx miny maxx maxy), got {list(bbox)}")
    minx, miny, maxx, maxy = (float(v) for v in bbox)
    if not (math.isfinite(minx + miny + maxx + maxy) and minx < maxx and miny < maxy):
        raise ValueError(f"{arg} {list(bbox)}: expected finite minx < maxx and miny < maxy")
    src_crs = grid.crs if bbox_crs is None else _parse_crs(bbox_crs, f"{arg}-crs")
    if src_crs != grid.crs:
        minx, miny, maxx, maxy = transform_bounds(src_crs, grid.crs, minx, miny, maxx, maxy, densify_pts=21)
    t = grid.transform
    eps = 1e-6
    c0 = math.floor((minx - t.c) / t.a + eps)
    c1 = math.ceil((maxx - t.c) / t.a - eps)
    r0 = math.floor((maxy - t.f) / t.e + eps)
    r1 = math.ceil((miny - t.f) / t.e - eps)
    if c0 < 0 or r0 < 0 or c1 > grid.width or r1 > grid.height or c1 <= c0 or r1 <= r0:
        gb = tuple(round(v, 3) for v in grid.bounds)
        raise ValueError(f"{arg} {list(bbox)} ({src_crs.to_string()}) is not inside {what}: bounds {gb} in "
                         f"{grid.crs.to_string()} ({grid.height} x {grid.width} pixels of {t.a:g} m)")
    return Window(c0, r0, c1 - c0, r1 - r0)


# ============================================================================================ writing
@dataclasses.dataclass
class EmbedReport:
    """What :func:`embed_dunia` / :func:`embed_lianet` wrote."""

    path: Path
    band_names: list[str]
    crs: str
    transform: tuple[float, ...]
    shape: tuple[int, int]
    tiles: int
    dtype: str
    tags: dict[str, str]

    def summary(self) -> str:
        """One line for the console."""
        return (f"{self.path}: {len(self.band_names)} bands ({self.band_names[0]}..{self.band_names[-1]}), "
                f"{self.shape[0]} x {self.shape[1]} px, {self.crs}, {self.dtype}, {self.tiles} tile(s)")


def _check_out(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out}: the file exists; pass --overwrite to replace it")
    if out.exists() and not out.is_file():
        raise ValueError(f"--out {out}: exists and is not a file")
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise ValueError(f"--out {out}: expected a GeoTIFF file name ending in .tif or .tiff")
    return out


def write_embedding_raster(out: str | Path, grid: Grid, window: Window, tiles: Sequence[Tile],
                           compute: Callable[[Sequence[Tile]], np.ndarray], band_names: Sequence[str],
                           dtype: str = "float32", tags: dict[str, str] | None = None,
                           band_tags: Sequence[dict[str, str]] | None = None, batch_size: int = 4,
                           overwrite: bool = False) -> EmbedReport:
    """Run ``compute`` over ``tiles`` (in batches of equal-size tiles) and write the owned part of each result into a
    COG covering ``window`` of ``grid``.

    ``compute(batch)`` returns ``[len(batch), len(band_names), tile.height, tile.width]`` values for the tiles'
    windows. Memory holds one batch; the full-resolution stack goes to an uncompressed temporary GeoTIFF beside
    ``out``, which is then copied into the compressed COG (with overviews) and removed.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    out = _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    r0, c0, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
    transform = grid.transform @ Affine.translation(c0, r0)
    raw = out.with_name(f".{out.name}.{os.getpid()}.raw.tif")
    cog = out.with_name(f".{out.name}.{os.getpid()}.cog.tif")
    nb = len(band_names)
    profile = dict(driver="GTiff", width=w, height=h, count=nb, dtype="float32", crs=grid.crs, transform=transform,
                   tiled=True, blockxsize=BLOCKSIZE, blockysize=BLOCKSIZE, compress="none", interleave="pixel",
                   BIGTIFF="IF_NEEDED")
    all_tags = {"EMBEDDING_DTYPE": dtype, **(tags or {})}
    try:
        with rasterio.open(raw, "w", **profile) as dst:
            dst.descriptions = tuple(band_names)
            dst.update_tags(**all_tags)
            for i, bt in enumerate(band_tags or []):
                dst.update_tags(i + 1, **bt)
            done = 0
            for batch in _batches(tiles, batch_size):
                values = np.asarray(compute(batch), np.float32)
                if values.shape[:2] != (len(batch), nb):
                    raise RuntimeError(f"compute returned {values.shape}, expected [{len(batch)}, {nb}, H, W]")
                for t, v in zip(batch, values):
                    o = t.own
                    part = v[:, o.row_off - t.row:o.row_off - t.row + o.height,
                             o.col_off - t.col:o.col_off - t.col + o.width]
                    if dtype == "float16":  # round to nearest here: GDAL's NBITS=16 conversion truncates
                        part = part.astype(np.float16).astype(np.float32)
                    dst.write(part, window=Window(o.col_off - c0, o.row_off - r0, o.width, o.height))
                done += len(batch)
                logger.info("embed: %d / %d tiles", done, len(tiles))
        opts: dict[str, Any] = dict(compress="DEFLATE", predictor="YES", blocksize=BLOCKSIZE,
                                    overview_resampling="average", BIGTIFF="IF_SAFER")
        if dtype == "float16":
            opts["nbits"] = 16
        rasterio.shutil.copy(raw, cog, driver="COG", **opts)
        os.replace(cog, out)
    finally:
        for p in (raw, cog):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return EmbedReport(out, list(band_names), grid.crs.to_string(), tuple(transform)[:6], (h, w), len(tiles), dtype,
                       all_tags)


def _batches(tiles: Sequence[Tile], n: int) -> Iterator[list[Tile]]:
    for i in range(0, len(tiles), n):
        yield list(tiles[i:i + n])


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r}: {err}; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available on this machine; use --device cpu")
    return dev


def _check_tiling(tile_size: int, overlap: int, multiple: int, model: str) -> None:
    if tile_size < multiple or tile_size % multiple:
        raise ValueError(f"--tile-size {tile_size}: {model} needs a positive multiple of {multiple}")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"--overlap {overlap}: expected 0 <= overlap < --tile-size ({tile_size})")


def _band_names(prefix: str, n: int) -> list[str]:
    width = max(2, len(str(n - 1)))
    return [f"{prefix}_{i:0{width}d}" for i in range(n)]


# ============================================================================================ DUNIA
class CompositeInput:
    """DUNIA's 14-band input (``B01..B12, VV, VH``) read from one or several GeoTIFFs on one grid, converted and
    standardised as :class:`~terratorch_eoplugins.datasets.gedi_chips.GEDIChips` reads its composite.

    Args:
        paths: one 14-band GeoTIFF, several GeoTIFFs whose bands add up to the 14 (e.g. S2 12 bands + S1 VV, VH),
            or a folder holding ``S2L2A_S1GRD_composite.tif``.
        s2_units: ``"auto"`` (DN when the S2 median exceeds 2), ``"reflectance"`` or ``"dn"``.
        s2_offset: L2A radiometric offset subtracted from DN (1000 for processing baseline >= 04.00).
        arg: the argument named in error messages.
    """

    def __init__(self, paths: str | Path | Sequence[str | Path], s2_units: str = "auto", s2_offset: float = 1000.0,
                 arg: str = "--image") -> None:
        if s2_units not in ("auto", "reflectance", "dn"):
            raise ValueError(f"--s2-units must be 'auto', 'reflectance' or 'dn', got {s2_units!r}")
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise ValueError(f"{arg}: give the 14-band S2 + S1 composite GeoTIFF (or S2 and S1 GeoTIFFs)")
        self.paths = [self._resolve(Path(p), arg) for p in paths]
        self.arg = arg
        sources: list[tuple[Path, int]] = []
        desc: list[str | None] = []
        grid: Grid | None = None
        counts = []
        for p in self.paths:
            try:
                src = rasterio.open(p)
            except RasterioIOError as err:
                raise EODataError(f"{arg} {p}: cannot be read as a GeoTIFF ({err})") from None
            with src:
                if src.crs is None or src.transform.is_identity:
                    raise EODataError(f"{arg} {p}: no CRS or no geotransform; expected a georeferenced GeoTIFF")
                t = src.transform
                if abs(t.b) > 1e-9 or abs(t.d) > 1e-9 or t.e >= 0:
                    raise EODataError(f"{arg} {p}: expected a north-up grid, got transform {tuple(t)[:6]}")
                g = Grid(src.crs, t, src.height, src.width)
                if grid is None:
                    grid = g
                elif g.crs != grid.crs or (g.height, g.width) != (grid.height, grid.width) or \
                        not g.transform.almost_equals(grid.transform):
                    raise EODataError(f"{arg} {p}: grid {g.height}x{g.width} {g.crs} {tuple(g.transform)[:6]} differs "
                                      f"from {self.paths[0]} ({grid.height}x{grid.width} {grid.crs} "
                                      f"{tuple(grid.transform)[:6]}); the input files must share one grid")
                counts.append(src.count)
                sources += [(p, b + 1) for b in range(src.count)]
                desc += [d.strip().upper() if d else None for d in src.descriptions]
        assert grid is not None
        self.grid = grid
        if len(sources) != len(COMPOSITE_BANDS):
            files = ", ".join(f"{p.name}: {c}" for p, c in zip(self.paths, counts))
            raise EODataError(f"{arg}: {len(sources)} bands in total ({files}); DUNIA expects {len(COMPOSITE_BANDS)} "
                              f"({', '.join(COMPOSITE_BANDS)}: S2 L2A 12 bands then S1 VV, VH dB)")
        if all(d is None for d in desc):
            logger.warning("embed: %s has no band descriptions; assuming %s", arg, ", ".join(COMPOSITE_BANDS))
            order = list(range(len(COMPOSITE_BANDS)))
        else:
            missing = [b for b in COMPOSITE_BANDS if b not in desc]
            if missing:
                raise EODataError(f"{arg}: band descriptions {desc} lack {missing}; expected "
                                  f"{', '.join(COMPOSITE_BANDS)}")
            order = [desc.index(b) for b in COMPOSITE_BANDS]
        self.sources = [sources[i] for i in order]
        self._stats(s2_units, float(s2_offset))

    @staticmethod
    def _resolve(p: Path, arg: str) -> Path:
        if p.is_dir():
            p = p / COMPOSITE_NAME
        if not p.is_file():
            raise FileNotFoundError(f"{arg} {p}: no such file; expected a GeoTIFF (or a folder holding "
                                    f"{COMPOSITE_NAME})")
        return p

    def _read(self, window: Window | None = None, out_shape: tuple[int, int] | None = None) -> np.ndarray:
        """The 14 bands (composite order) as float32 with no-data as NaN."""
        parts = []
        for path in dict.fromkeys(p for p, _ in self.sources):
            idx = [b for p, b in self.sources if p == path]
            with rasterio.open(path) as src:
                kw: dict[str, Any] = {"window": window, "masked": True}
                if out_shape is not None:
                    kw.update(out_shape=(len(idx), *out_shape), resampling=Resampling.nearest)
                arr = src.read(indexes=idx, **kw)
            parts.append((path, idx, np.ma.filled(arr.astype(np.float32), np.nan)))
        lookup = {(p, b): a[i] for p, idx, a in parts for i, b in enumerate(idx)}
        return np.stack([lookup[s] for s in self.sources])

    def _convert(self, x: np.ndarray) -> np.ndarray:
        if self.s2_units == "dn":
            x[:12] = (x[:12] - self.s2_offset) / 10000.0
        return x

    def _stats(self, s2_units: str, s2_offset: float) -> None:
        g = self.grid
        f = max(1, math.ceil(max(g.height, g.width) / 1024))
        small = self._read(out_shape=(math.ceil(g.height / f), math.ceil(g.width / f))).astype(np.float64)
        if s2_units == "auto":
            s2 = small[:12]
            med = np.nanmedian(s2) if np.isfinite(s2).any() else 0.0
            s2_units = "dn" if med > 2.0 else "reflectance"
        self.s2_units, self.s2_offset = s2_units, s2_offset
        small = self._convert(small.astype(np.float32))  # float32 statistics, as GEDIChips computes them
        bad = [COMPOSITE_BANDS[i] for i in range(14) if not np.isfinite(small[i]).any()]
        if bad:
            raise EODataError(f"{self.arg}: bands {bad} contain only no-data/NaN")
        self.means = np.nanmean(small, axis=(1, 2)).astype(np.float32)
        sd = np.nanstd(small, axis=(1, 2)).astype(np.float32)
        self.stds = np.where(sd > 0, sd, 1.0).astype(np.float32)

    def use_statistics(self, other: CompositeInput) -> None:
        """Standardise with the band statistics of ``other`` (e.g. the pretraining composite)."""
        self.means, self.stds = other.means.copy(), other.stds.copy()

    def read(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        """Standardised ``[14, height, width]`` float32 of the window (no-data and non-finite values -> 0)."""
        x = self._convert(self._read(Window(col, row, width, height)))
        x = (x - self.means[:, None, None]) / self.stds[:, None, None]
        return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def _dunia_variant(ckpt: str | Path, variant: str | None) -> str:
    if variant is not None:
        return variant
    obj = read_checkpoint(ckpt, "DUNIA")
    found = (obj.get("hyper_parameters") or {}).get("variant")
    if found is None:
        raise ValueError(f"--ckpt {ckpt}: the checkpoint records no DUNIA variant (hyper_parameters.variant); "
                         "pass --variant (tiny or base)")
    return str(found)


def embed_dunia(ckpt: str | Path, image: str | Path | Sequence[str | Path], out: str | Path, *, kind: str = "both",
                bbox: Sequence[float] | None = None, bbox_crs: Any = None,
                stats_from: str | Path | Sequence[str | Path] | None = None, s2_units: str = "auto",
                s2_offset: float = 1000.0, variant: str | None = None, tile_size: int = DUNIA_TILE[0],
                overlap: int = DUNIA_TILE[1], batch_size: int = 4, dtype: str = "float32", device: str = "auto",
                overwrite: bool = False) -> EmbedReport:
    """Write DUNIA's per-pixel embeddings (``kind``: ``"OV"``, ``"OH"`` or ``"both"`` = ``O^V`` then ``O^H``) of
    ``image`` (within ``bbox``) as a GeoTIFF stack (see the module docstring)."""
    if kind not in DUNIA_KINDS:
        raise ValueError(f"--kind must be one of {DUNIA_KINDS} for DUNIA, got {kind!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    _check_out(out, overwrite)
    dev = _device(device)
    variant = _dunia_variant(ckpt, variant)
    model = load_dunia_checkpoint(ckpt, variant=variant).eval().to(dev)
    p = model.patch_size
    _check_tiling(tile_size, overlap, p, f"DUNIA (patch size {p})")
    src = CompositeInput(image, s2_units, s2_offset)
    if model.in_channels != len(COMPOSITE_BANDS):
        raise ValueError(f"--ckpt {ckpt}: the DUNIA image model takes {model.in_channels} channels, the composite "
                         f"reader gives {len(COMPOSITE_BANDS)} ({', '.join(COMPOSITE_BANDS)})")
    if stats_from is not None:
        src.use_statistics(CompositeInput(stats_from, s2_units, s2_offset, arg="--stats-from"))
    grid = src.grid
    window = bbox_window(bbox, grid, bbox_crs, what=f"the input raster {src.paths[0]}")
    tiles = plan_tiles(window, (grid.height, grid.width), (tile_size, tile_size), overlap)
    th, tw = tiles[0].height, tiles[0].width
    ph, pw = -(-th // p) * p, -(-tw // p) * p  # a raster smaller than a tile: zero-pad to the patch grid

    def compute(batch: Sequence[Tile]) -> np.ndarray:
        x = np.zeros((len(batch), len(COMPOSITE_BANDS), ph, pw), np.float32)
        for i, t in enumerate(batch):
            x[i, :, :th, :tw] = src.read(t.row, t.col, t.height, t.width)
        with torch.inference_mode(), exact_matmul():
            emb = model.forward_embeddings(torch.from_numpy(x).to(dev))
            parts = {"OV": [emb["vertical"]], "OH": [emb["horizontal"]],
                     "both": [emb["vertical"], emb["horizontal"]]}[kind]
            return torch.cat(parts, 1)[:, :, :th, :tw].float().cpu().numpy()

    d = model.out_dim
    names = (_band_names("OV", d) if kind in ("OV", "both") else []) + \
        (_band_names("OH", d) if kind in ("OH", "both") else [])
    band_tags = [{"EMBEDDING": n[:2], "DIMENSION": str(int(n[3:]))} for n in names]
    tags = {"EMBEDDING_MODEL": "DUNIA", "DUNIA_VARIANT": variant, "EMBEDDING_KIND": kind,
            "CHECKPOINT": str(Path(ckpt).resolve()), "INPUT": ";".join(str(q.resolve()) for q in src.paths),
            "INPUT_BANDS": ",".join(COMPOSITE_BANDS), "S2_UNITS": src.s2_units, "S2_OFFSET": f"{src.s2_offset:g}",
            "BAND_MEANS": json.dumps([round(float(v), 7) for v in src.means]),
            "BAND_STDS": json.dumps([round(float(v), 7) for v in src.stds]),
            "STATS_FROM": "input" if stats_from is None else str(stats_from),
            "TILE_SIZE": str(tile_size), "OVERLAP": str(overlap),
            "STITCHING": "centre-crop: each pixel from the one tile it lies deepest in"}
    return write_embedding_raster(out, grid, window, tiles, compute, names, dtype, tags, band_tags, batch_size,
                                  overwrite)


# ============================================================================================ LIANet
def _parse_date(value: str | dt.date | dt.datetime) -> dt.date | dt.datetime:
    if isinstance(value, (dt.date, dt.datetime)):
        return value
    try:
        return dt.date.fromisoformat(value) if len(value) == 10 else dt.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ValueError(f"--date {value!r}: expected YYYY-MM-DD (or YYYY-MM-DDTHH:MM:SS)") from None


def lianet_time(config: dict[str, Any], date: str | dt.date | dt.datetime, ckpt: str | Path = "") -> tuple[float, str]:
    """Days since 2015-01-01 that encode ``date`` for a generator of ``config``, and how they were chosen.

    A calendar date with a pretraining acquisition uses that acquisition's time; otherwise the date (its 00:00 when
    no time is given) must lie within the pretraining acquisitions' range (continuous time encodings) or match an
    acquisition within half a day (``index`` time encoding). Raises ``ValueError`` naming ``--date``.
    """
    when = _parse_date(date)
    acq = sorted(float(a) for a in (config.get("acquisitions") or []))
    acq_time = [TIME_EPOCH + dt.timedelta(days=a) for a in acq]
    index_mode = config.get("time_mode") == "index"
    if not isinstance(when, dt.datetime):
        same = [a for a, t in zip(acq, acq_time) if t.date() == when]
        if same:
            return same[0], f"pretraining acquisition {(TIME_EPOCH + dt.timedelta(days=same[0])):%Y-%m-%dT%H:%M:%S}"
    days = days_since_epoch(when)
    if not acq:
        if index_mode:
            raise ValueError(f"--date {date}: --ckpt {ckpt} uses the 'index' time encoding but records no "
                             "acquisition list, so no date can be mapped to an index")
        return days, "date as given (the checkpoint records no acquisition range)"
    span = f"{acq_time[0]:%Y-%m-%d} .. {acq_time[-1]:%Y-%m-%d}"
    if index_mode:
        best = min(acq, key=lambda a: abs(a - days))
        if abs(best - days) > 0.5:
            shown = ", ".join(f"{t:%Y-%m-%d}" for t in acq_time[:12]) + (" ..." if len(acq) > 12 else "")
            raise ValueError(f"--date {date}: this LIANet ('index' time encoding) only knows its {len(acq)} "
                             f"pretraining acquisitions ({shown}); choose one of them")
        return best, "nearest pretraining acquisition"
    if not acq[0] - 1.0 <= days <= acq[-1] + 1.0:
        raise ValueError(f"--date {date} is outside the pretraining time range {span} of --ckpt {ckpt}")
    return days, "date within the pretraining range (no acquisition that day)"


def lianet_grid(config: dict[str, Any], ckpt: str | Path = "") -> Grid:
    """The pretraining region's grid recorded in a generator ``config`` (``ValueError`` when it is not recorded)."""
    crs, transform, shape = config.get("region_crs"), config.get("region_transform"), config.get("region_shape")
    if crs is None or transform is None or shape is None:
        raise ValueError(f"--ckpt {ckpt}: the LIANet checkpoint records no region georeferencing (region_crs, "
                         "region_transform, region_shape); pretrain with a LIANet datamodule (configs/"
                         "lianet_pretrain_*.yaml), which stores them")
    t = Affine(*[float(v) for v in list(transform)[:6]])
    if abs(t.b) > 1e-9 or abs(t.d) > 1e-9 or t.e >= 0:
        raise ValueError(f"--ckpt {ckpt}: region transform {tuple(t)[:6]} is not a north-up grid")
    return Grid(_parse_crs(crs, f"--ckpt {ckpt}: region_crs"), t, int(shape[0]), int(shape[1]))


def embed_lianet(ckpt: str | Path, out: str | Path, date: str | dt.date | dt.datetime, *,
                 bbox: Sequence[float] | None = None, bbox_crs: Any = None, tile_size: int = LIANET_TILE[0],
                 overlap: int = LIANET_TILE[1], batch_size: int = 4, dtype: str = "float32", device: str = "auto",
                 overwrite: bool = False) -> EmbedReport:
    """Write LIANet's trunk features at ``date`` for the pretraining region (within ``bbox``) as a GeoTIFF stack
    (see the module docstring)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    _check_out(out, overwrite)
    dev = _device(device)
    gen = load_generator(ckpt).eval().to(dev)
    cfg = gen.config
    grid = lianet_grid(cfg, ckpt)
    days, how = lianet_time(cfg, date, ckpt)
    multiple = 32 if cfg["trunk"] in ("resnet50", "resnet101") else 1
    _check_tiling(tile_size, overlap, multiple, f"LIANet-{gen.variant} ({cfg['trunk']} trunk)")
    window = bbox_window(bbox, grid, bbox_crs, what=f"the pretraining region of {ckpt}")
    sizes = []
    for n in (grid.height, grid.width):  # tiles never leave the region: shrink to it (a multiple of the trunk's)
        s = min(tile_size, n) // multiple * multiple
        if s < 1:
            raise ValueError(f"--ckpt {ckpt}: the region ({grid.height} x {grid.width} px) is smaller than one "
                             f"{multiple} px tile of the {cfg['trunk']} trunk")
        sizes.append(s)
    tiles = plan_tiles(window, (grid.height, grid.width), (sizes[0], sizes[1]), overlap)
    t_in = gen.resolve_time(torch.tensor([days], dtype=torch.float64, device=dev))

    def compute(batch: Sequence[Tile]) -> np.ndarray:
        origin = torch.tensor([[t.col, t.row] for t in batch], dtype=torch.float32, device=dev)
        with torch.inference_mode(), exact_matmul():
            f = gen.features(origin, t_in.expand(len(batch)), (batch[0].height, batch[0].width))
        return f.float().cpu().numpy()

    names = _band_names("trunk", gen.feature_channels)
    stamp = (TIME_EPOCH + dt.timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%S")
    tags = {"EMBEDDING_MODEL": "LIANet", "LIANET_VARIANT": str(gen.variant), "EMBEDDING_KIND": "trunk features",
            "CHECKPOINT": str(Path(ckpt).resolve()), "DATE": str(date), "TIME": stamp, "TIME_DAYS": f"{days:.6f}",
            "TIME_CHOICE": how, "TIME_ENCODING": str(cfg["time_mode"]),
            "REGION_SHAPE": f"{grid.height} x {grid.width}",
            "WINDOW_OFFSET": f"row {window.row_off}, col {window.col_off}",
            "TILE_SIZE": str(tile_size), "OVERLAP": str(overlap),
            "STITCHING": "centre-crop: each pixel from the one tile it lies deepest in"}
    band_tags = [{"EMBEDDING": "trunk", "DIMENSION": str(i)} for i in range(len(names))]
    return write_embedding_raster(out, grid, window, tiles, compute, names, dtype, tags, band_tags, batch_size,
                                  overwrite)


# ============================================================================================ command line
def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``eoplugins embed``."""
    ap = argparse.ArgumentParser(
        prog="eoplugins embed",
        description="Write per-pixel embeddings as a georeferenced GeoTIFF stack (one band per dimension, COG): "
                    "DUNIA's O^V / O^H for an S2 + S1 composite, or LIANet's trunk features for its pretraining "
                    "region at a date. Tiles with overlap keep memory bounded.")
    ap.add_argument("--model", required=True, choices=["dunia", "lianet"])
    ap.add_argument("--ckpt", required=True, help="pretraining checkpoint (DUNIA: configs/dunia_pretrain.yaml; "
                    "LIANet: configs/lianet_pretrain_*.yaml, or its exported lianet_generator.pt)")
    ap.add_argument("--out", required=True, help="output GeoTIFF (.tif)")
    ap.add_argument("--image", nargs="+", default=None,
                    help="DUNIA: the 14-band S2 L2A + S1 composite GeoTIFF, or S2 (12 bands) and S1 (VV, VH) "
                         f"GeoTIFFs on one grid, or a folder holding {COMPOSITE_NAME} (e.g. data/demo/GEDI)")
    ap.add_argument("--stats-from", nargs="+", default=None,
                    help="DUNIA: standardise with the band statistics of this raster (e.g. the pretraining "
                         "composite) instead of the input's own")
    ap.add_argument("--s2-units", default="auto", choices=["auto", "reflectance", "dn"])
    ap.add_argument("--s2-offset", type=float, default=1000.0, help="L2A offset subtracted from S2 DN")
    ap.add_argument("--variant", default=None, help="DUNIA variant (default: the one the checkpoint records)")
    ap.add_argument("--kind", default=None, choices=list(DUNIA_KINDS),
                    help="DUNIA: O^V, O^H or both (default both, O^V bands first)")
    ap.add_argument("--date", default=None, help="LIANet: YYYY-MM-DD (or YYYY-MM-DDTHH:MM:SS) within the "
                    "pretraining time range")
    ap.add_argument("--bbox", nargs=4, type=float, default=None, metavar=("MINX", "MINY", "MAXX", "MAXY"),
                    help="part of the input raster (DUNIA) or pretraining region (LIANet) to embed; default all")
    ap.add_argument("--bbox-crs", default=None, help="CRS of --bbox (default: the raster's / region's, e.g. "
                    "EPSG:4326 for lon/lat)")
    ap.add_argument("--tile-size", type=int, default=None,
                    help=f"tile side in pixels (default: DUNIA {DUNIA_TILE[0]}, LIANet {LIANET_TILE[0]})")
    ap.add_argument("--overlap", type=int, default=None,
                    help=f"overlap of neighbouring tiles (default: DUNIA {DUNIA_TILE[1]}, LIANet {LIANET_TILE[1]})")
    ap.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return ap


def run(args: argparse.Namespace) -> EmbedReport:
    """Dispatch parsed ``eoplugins embed`` arguments to :func:`embed_dunia` / :func:`embed_lianet`."""
    common = dict(bbox=args.bbox, bbox_crs=args.bbox_crs, batch_size=args.batch_size, dtype=args.dtype,
                  device=args.device, overwrite=args.overwrite)
    if args.model == "dunia":
        if not args.image:
            raise ValueError("--image is required for --model dunia (the 14-band S2 + S1 composite GeoTIFF)")
        if args.date is not None:
            raise ValueError("--date applies to --model lianet only: DUNIA embeds the composite given by --image")
        tile = DUNIA_TILE
        return embed_dunia(args.ckpt, args.image, args.out, kind=args.kind or "both", stats_from=args.stats_from,
                           s2_units=args.s2_units, s2_offset=args.s2_offset, variant=args.variant,
                           tile_size=args.tile_size or tile[0],
                           overlap=tile[1] if args.overlap is None else args.overlap, **common)
    if args.image or args.stats_from:
        raise ValueError("--image/--stats-from apply to --model dunia only: LIANet is coordinate-only (give --date "
                         "and optionally --bbox)")
    if args.kind is not None:
        raise ValueError("--kind applies to --model dunia only (LIANet exports its trunk features)")
    if args.date is None:
        raise ValueError("--date is required for --model lianet (YYYY-MM-DD within the pretraining time range)")
    tile = LIANET_TILE
    return embed_lianet(args.ckpt, args.out, args.date, tile_size=args.tile_size or tile[0],
                        overlap=tile[1] if args.overlap is None else args.overlap, **common)


def main(argv: Sequence[str] | None = None) -> int:
    """``eoplugins embed``: exit 0 after writing the GeoTIFF, 2 with a message on a bad argument or input."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = run(args)
    except (ValueError, FileNotFoundError, FileExistsError, EODataError) as err:
        print(f"eoplugins embed: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
