"""Sentinel-2 L2A tiles of one region, sampled as random (acquisition, patch) pairs for LIANet pretraining.

On-disk layout (the LIANet reference layout, read unchanged)::

    root/{TILE}/{YYYYMMDDTHHMMSS}.tif              12 x H x W uint16 L2A DN (B01..B12 with B8A, no B10)
    root/{TILE}/MSK_CLDPRB/{YYYYMMDDTHHMMSS}.tif   optional cloud probability 0-100 (used by ``max_cloud``)

Several tiles of the same CRS and resolution form a mosaic: the region grid is the union of their
bounds and each tile's pixel offset in it comes from its georeferencing (adjacent MGRS tiles overlap,
e.g. 984 px for T32UPU/T32UQU). Pixel coordinates ``(x, y)`` = (column, row) in this region grid are
what LIANet encodes. Times are the file-name timestamps, as days since 2015-01-01.

Reflectance for the L1 loss is ``clip((DN - boa_offset) / 10000, 0, 1)`` (L2A processing baseline >= 04.00
adds the +1000 offset). Windows containing no-data pixels (DN 0 in every band, e.g. outside the swath) are
rejected and drawn again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import rasterio
import rasterio.enums
import rasterio.errors
import torch
from affine import Affine
from matplotlib.figure import Figure
from rasterio.crs import CRS
from rasterio.windows import Window
from torchgeo.datasets import NonGeoDataset

from terratorch_eoplugins.datasets.common import logger
from terratorch_eoplugins.dates import (
    days_since_epoch,
    parse_timestamp,
)
from terratorch_eoplugins.errors import EODataError, EODatasetNotFoundError, require_dir

__all__ = ["S2_L2A_BANDS", "S2Region", "S2TileSampler", "TileInfo", "acquisition_time", "scan_region"]

S2_L2A_BANDS: tuple[str, ...] = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
#: indices of red, green, blue in :data:`S2_L2A_BANDS`
RGB = (3, 2, 1)
#: tile file names: the acquisition's ``TIMESTAMP_FORMAT`` stamp (``YYYYMMDDTHHMMSS``) + ``.tif``
FILE_PATTERN = re.compile(r"^(?P<stamp>\d{8}T\d{6})\.tif$")


@dataclasses.dataclass
class TileInfo:
    """One tile folder: its acquisitions and its place in the region grid."""

    name: str
    folder: Path
    shape: tuple[int, int]
    transform: Affine
    offset: tuple[int, int] = (0, 0)  # (column, row) of the tile's top-left pixel in the region grid
    files: list[tuple[dt.datetime, Path]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class S2Region:
    """The pixel grid of a region (one tile or a mosaic) and its acquisitions."""

    root: Path
    crs: CRS
    transform: Affine
    shape: tuple[int, int]
    tiles: list[TileInfo]

    @property
    def resolution(self) -> float:
        return float(self.transform.a)

    @property
    def size(self) -> int:
        """Side used to scale hash-grid levels: the larger of height and width."""
        return int(max(self.shape))

    @property
    def times(self) -> list[dt.datetime]:
        """Distinct acquisition times over all tiles, sorted."""
        return sorted({t for tile in self.tiles for t, _ in tile.files})

    @property
    def acquisition_days(self) -> list[float]:
        """:attr:`times` as days since 2015-01-01."""
        return [days_since_epoch(t) for t in self.times]

    def pixel_of(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """(column, row) float positions in the region grid of map coordinates ``(x, y)`` in :attr:`crs`."""
        inv = ~self.transform
        cols, rows = inv * (np.asarray(x, np.float64), np.asarray(y, np.float64))
        return np.asarray(cols), np.asarray(rows)

    def describe(self) -> dict[str, Any]:
        """Plain-type summary (for checkpoints and logs)."""
        return {"crs": self.crs.to_string(), "transform": list(tuple(self.transform)[:6]), "shape": list(self.shape),
                "tiles": [t.name for t in self.tiles], "acquisitions": self.acquisition_days}


def acquisition_time(name: str) -> dt.datetime | None:
    """Acquisition time of a tile file named ``YYYYMMDDTHHMMSS.tif`` (``None``: another name or an invalid stamp)."""
    m = FILE_PATTERN.match(name)
    if not m:
        return None
    try:
        return parse_timestamp(m.group("stamp"))
    except ValueError:
        return None


def _scan_tile(folder: Path) -> TileInfo:
    files, skipped = [], 0
    shape = transform = crs = None
    for path in sorted(folder.iterdir()):
        when = acquisition_time(path.name) if path.is_file() else None
        if when is None or "bf" in path.name:
            skipped += path.is_file()
            continue
        try:
            src = rasterio.open(path)
        except rasterio.errors.RasterioIOError as err:
            raise EODataError(f"{path}: cannot be read as a GeoTIFF ({err}); expected a {len(S2_L2A_BANDS)}-band "
                              "Sentinel-2 L2A uint16 acquisition") from None
        with src:
            if src.count != len(S2_L2A_BANDS):
                raise EODataError(f"{path}: expected {len(S2_L2A_BANDS)} Sentinel-2 L2A bands {list(S2_L2A_BANDS)}, "
                                  f"got {src.count}")
            if src.dtypes[0] != "uint16":
                raise EODataError(f"{path}: expected uint16 L2A digital numbers, got dtype {src.dtypes[0]}")
            if src.crs is None:
                raise EODataError(f"{path}: no CRS; expected the tile's UTM CRS in the GeoTIFF")
            if abs(src.transform.b) > 1e-9 or abs(src.transform.d) > 1e-9 or src.transform.e >= 0:
                raise EODataError(f"{path}: expected a north-up grid, got transform {tuple(src.transform)[:6]}")
            if shape is None:
                shape, transform, crs = (src.height, src.width), src.transform, src.crs
            elif (src.height, src.width) != shape or src.crs != crs or not src.transform.almost_equals(transform):
                raise EODataError(f"{path}: grid {src.height}x{src.width} {src.crs} differs from the other files of "
                                  f"{folder} ({shape[0]}x{shape[1]} {crs}); a tile folder holds one grid")
        files.append((when, path))
    if skipped:
        logger.info("S2 tiles: skipped %d file(s) of %s not named YYYYMMDDTHHMMSS.tif", skipped, folder)
    if not files:
        raise EODatasetNotFoundError(folder, "Sentinel-2 L2A acquisitions (YYYYMMDDTHHMMSS.tif)")
    info = TileInfo(folder.name, folder, shape, transform, files=sorted(files))
    info.crs = crs  # type: ignore[attr-defined]
    return info


def scan_region(root: str | Path, tiles: Sequence[str] | None = None) -> S2Region:
    """Index the tile folders under ``root`` (all subfolders, or ``tiles``) and build the region grid."""
    root = require_dir(root, "Sentinel-2 tiles root folder")
    if tiles is None:
        names = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not names:
            raise EODatasetNotFoundError(root, "Sentinel-2 tile folders (root/<TILE>/<YYYYMMDDTHHMMSS>.tif)")
    else:
        names = [tiles] if isinstance(tiles, str) else list(tiles)
        if not names:
            raise ValueError("tiles: expected at least one tile name")
    infos = [_scan_tile(require_dir(root / n, f"Sentinel-2 tile folder {n!r}")) for n in names]
    crs = infos[0].crs  # type: ignore[attr-defined]
    res = infos[0].transform.a
    for t in infos[1:]:
        if t.crs != crs:  # type: ignore[attr-defined]
            raise EODataError(f"{t.folder}: CRS {t.crs} differs from {crs} of {infos[0].folder}; a mosaic "  # type: ignore[attr-defined]
                              "needs tiles of one UTM zone")
        if abs(t.transform.a - res) > 1e-9 or abs(t.transform.e + res) > 1e-9:
            raise EODataError(f"{t.folder}: pixel size {t.transform.a} differs from {res} of {infos[0].folder}")
    left = min(t.transform.c for t in infos)
    top = max(t.transform.f for t in infos)
    right = max(t.transform.c + t.shape[1] * res for t in infos)
    bottom = min(t.transform.f - t.shape[0] * res for t in infos)
    for t in infos:
        col, row = (t.transform.c - left) / res, (top - t.transform.f) / res
        if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
            raise EODataError(f"{t.folder}: grid is not aligned with {infos[0].folder} "
                              f"(offset {col:.3f}, {row:.3f} px)")
        t.offset = (int(round(col)), int(round(row)))
    shape = (int(round((top - bottom) / res)), int(round((right - left) / res)))
    return S2Region(Path(root), crs, Affine(res, 0.0, left, 0.0, -res, top), shape, infos)


def dn_to_reflectance(dn: np.ndarray, boa_offset: float = 1000.0, quantification: float = 10000.0) -> np.ndarray:
    """``clip((DN - boa_offset) / quantification, 0, 1)`` as float32."""
    return np.clip((dn.astype(np.float32) - boa_offset) / quantification, 0.0, 1.0)


def read_patch(path: Path, col: int, row: int, size: int | tuple[int, int]) -> np.ndarray:
    """DN window ``(12, h, w)`` of ``path`` at (column, row) in the tile's grid."""
    h, w = (size, size) if isinstance(size, int) else size
    with rasterio.open(path) as src:
        if col < 0 or row < 0 or col + w > src.width or row + h > src.height:
            raise ValueError(f"window at column {col}, row {row} of size {h}x{w} leaves {path} "
                             f"({src.height}x{src.width})")
        try:
            return src.read(window=Window(col, row, w, h))
        except rasterio.errors.RasterioIOError as err:
            raise EODataError(f"{path}: pixel data cannot be read ({err}); the file is truncated or corrupt") from None


class S2TileSampler(NonGeoDataset):
    """Random (acquisition, patch origin) samples of a region's Sentinel-2 tiles (LIANet pretraining).

    Each sample: a random tile, a random acquisition of it, and a uniform patch origin inside it;
    windows with no-data pixels (or, with ``max_cloud``, a mean cloud probability above it) are
    drawn again. ``train`` draws fresh samples every time; ``val`` is a fixed, seeded list.

    Sample keys: ``image`` float32 ``(12, P, P)`` reflectance in [0, 1]; ``origin_px`` float32 ``(2,)``
    (column, row) in the region grid; ``time_days`` float32 (days since 2015-01-01); ``time_index``
    long (acquisition index in :attr:`S2Region.times`); ``tile``; ``date`` (ISO); ``crs`` (string);
    ``transform`` float64 ``(6,)`` of the patch.

    Args:
        root: folder holding the tile folders.
        tiles: tile folder names forming the region (default: all).
        split: ``"train"`` (random) or ``"val"`` (fixed samples).
        patch_size: patch side P in pixels.
        length: samples per epoch.
        seed: seed of the ``val`` samples.
        boa_offset, quantification: DN to reflectance (``(DN - offset) / quantification``).
        max_cloud: reject windows whose mean cloud probability (``MSK_CLDPRB``, 0-100) exceeds this.
        max_tries: draws before giving up on a sample.
        transforms: callable applied to each sample.
    """

    def __init__(self, root: str | Path = "data/demo/S2_TILES", tiles: Sequence[str] | None = None,
                 split: str = "train", patch_size: int = 128, length: int = 1024, seed: int = 0,
                 boa_offset: float = 1000.0, quantification: float = 10000.0, max_cloud: float | None = None,
                 max_tries: int = 100, transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 region: S2Region | None = None) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if patch_size < 1 or length < 1 or max_tries < 1:
            raise ValueError(f"patch_size, length and max_tries must be >= 1, got {patch_size}, {length}, {max_tries}")
        self.region = region if region is not None else scan_region(root, tiles)
        small = [t.name for t in self.region.tiles if t.shape[0] < patch_size or t.shape[1] < patch_size]
        if small:
            raise ValueError(f"patch_size={patch_size} is larger than tile(s) {small}")
        self.split, self.patch_size, self.length, self.seed = split, int(patch_size), int(length), int(seed)
        self.boa_offset, self.quantification = float(boa_offset), float(quantification)
        self.max_cloud, self.max_tries, self.transforms = max_cloud, int(max_tries), transforms
        self._time_index = {t: i for i, t in enumerate(self.region.times)}
        self._origin_cache: dict[Path, np.ndarray] = {}

    def __len__(self) -> int:
        return self.length

    #: side (pixels) of the cells of the coarse no-data map used to propose patch origins
    coarse_cell: int = 16

    def _valid_origins(self, tile: TileInfo, path: Path) -> np.ndarray:
        """Coarse cells (row, col) whose patch-sized neighbourhood holds data in ``path`` (nearest-decimated band 1)."""
        cached = self._origin_cache.get(path)
        if cached is not None:
            return cached
        c, p = self.coarse_cell, self.patch_size
        h, w = tile.shape
        ch, cw = -(-h // c), -(-w // c)
        try:
            with rasterio.open(path) as src:
                band = src.read(1, out_shape=(ch, cw), resampling=rasterio.enums.Resampling.nearest)
        except rasterio.errors.RasterioIOError as err:
            raise EODataError(f"{path}: pixel data cannot be read ({err}); the file is truncated or corrupt") from None
        valid = (band != 0).astype(np.int32)
        k = -(-p // c) + 1  # cells a patch may touch
        k = min(k, ch, cw)
        csum = np.pad(valid.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        full = csum[k:, k:] - csum[:-k, k:] - csum[k:, :-k] + csum[:-k, :-k]
        rows, cols = np.nonzero(full == k * k)
        out = np.stack([rows, cols], axis=1)
        self._origin_cache[path] = out
        return out

    def _draw(self, rng: np.random.Generator) -> tuple[TileInfo, dt.datetime, Path, int, int]:
        tile = self.region.tiles[int(rng.integers(len(self.region.tiles)))]
        when, path = tile.files[int(rng.integers(len(tile.files)))]
        p, c = self.patch_size, self.coarse_cell
        cells = self._valid_origins(tile, path)
        if len(cells):
            r, q = cells[int(rng.integers(len(cells)))]
            row = int(min(r * c + rng.integers(0, c), tile.shape[0] - p))
            col = int(min(q * c + rng.integers(0, c), tile.shape[1] - p))
        else:
            col = int(rng.integers(0, tile.shape[1] - p + 1))
            row = int(rng.integers(0, tile.shape[0] - p + 1))
        return tile, when, path, col, row

    def _cloudy(self, path: Path, col: int, row: int) -> bool:
        if self.max_cloud is None:
            return False
        mask = path.parent / "MSK_CLDPRB" / path.name
        if not mask.is_file():
            return False
        with rasterio.open(mask) as src:
            prob = src.read(1, window=Window(col, row, self.patch_size, self.patch_size))
        return float(prob.mean()) > self.max_cloud

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        if self.split == "val":
            rng = np.random.default_rng([self.seed, index])
        else:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        for _ in range(self.max_tries):
            tile, when, path, col, row = self._draw(rng)
            dn = read_patch(path, col, row, self.patch_size)
            if (dn == 0).all(axis=0).any() or self._cloudy(path, col, row):
                continue
            self._check_scale(dn, path)
            return self._sample(tile, when, dn, col, row)
        raise EODataError(f"{self.region.root}: no valid {self.patch_size}x{self.patch_size} window found in "
                          f"{self.max_tries} draws (no-data everywhere or max_cloud={self.max_cloud} too strict)")

    #: plausible reflectance ``(DN - boa_offset) / quantification`` of data pixels (clouds and snow reach ~1.2)
    reflectance_range: tuple[float, float] = (-0.05, 1.6)

    def _check_scale(self, dn: np.ndarray, path: Path) -> None:
        """Raise when most of a window's values map outside :attr:`reflectance_range`: the file is at another scale
        than ``boa_offset`` / ``quantification`` say (e.g. 8-bit values, or DN without the +1000 L2A offset), which
        the clip to [0, 1] would otherwise silently turn into a black or white image."""
        refl = (dn.astype(np.float32) - self.boa_offset) / self.quantification
        lo, hi = self.reflectance_range
        share = float(np.mean((refl < lo) | (refl > hi)))
        if share > 0.5:
            raise EODataError(f"{path}: {share:.0%} of a {self.patch_size}x{self.patch_size} window's values map to "
                              f"reflectance outside [{lo:g}, {hi:g}] with boa_offset={self.boa_offset:g}, "
                              f"quantification={self.quantification:g} (DN median {float(np.median(dn)):.0f}); "
                              "expected Sentinel-2 L2A digital numbers (reflectance x 10000 + 1000 since processing "
                              "baseline 04.00): pass the file's boa_offset / quantification")

    def _sample(self, tile: TileInfo, when: dt.datetime, dn: np.ndarray, col: int, row: int) -> dict[str, Any]:
        refl = dn_to_reflectance(dn, self.boa_offset, self.quantification)
        x0, y0 = tile.offset[0] + col, tile.offset[1] + row
        tr = self.region.transform @ Affine.translation(x0, y0)
        sample = {
            "image": torch.from_numpy(refl),
            "origin_px": torch.tensor([x0, y0], dtype=torch.float32),
            "time_days": torch.tensor(days_since_epoch(when), dtype=torch.float32),
            "time_index": torch.tensor(self._time_index[when], dtype=torch.long),
            "tile": tile.name,
            "date": when.isoformat(),
            "crs": self.region.crs.to_string(),
            "transform": torch.tensor(tuple(tr)[:6], dtype=torch.float64),
        }
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample

    def plot(self, sample: Mapping[str, Any], show_titles: bool = True, suptitle: str | None = None) -> Figure:
        """True-colour patch and, when ``prediction`` is present, the reconstruction and its error."""
        def rgb(x: Any) -> np.ndarray:
            a = np.asarray(x, np.float32)[list(RGB)].transpose(1, 2, 0)
            return np.clip(a * 3.5, 0, 1)

        panels = [(rgb(sample["image"]), "Sentinel-2 (RGB)")]
        if "prediction" in sample:
            pred = np.asarray(sample["prediction"], np.float32)
            panels.append((rgb(pred), "LIANet reconstruction"))
            err = np.abs(pred - np.asarray(sample["image"], np.float32)).mean(axis=0)
            panels.append((err, "mean |error|"))
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
        for ax, (img, title) in zip(axes[0], panels):
            ax.imshow(img, cmap="magma" if img.ndim == 2 else None)
            ax.axis("off")
            if show_titles:
                ax.set_title(title)
        if suptitle is not None:
            fig.suptitle(suptitle)
        elif show_titles and "date" in sample:
            fig.suptitle(f"{sample.get('tile', '')} {sample['date']} origin {np.asarray(sample['origin_px']).tolist()}")
        return fig
