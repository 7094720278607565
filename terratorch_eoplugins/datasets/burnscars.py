"""HLS Burn Scars (``ibm-nasa-geospatial/hls_burn_scars``) as a torchgeo :class:`NonGeoDataset`.

On-disk layout (read unchanged)::

    root/
      training/subsetted_512x512_HLS.S30.T{tile}.{YYYYDDD}.v1.4_merged.tif   6 bands, float reflectance
      training/subsetted_512x512_HLS.S30.T{tile}.{YYYYDDD}.v1.4.mask.tif     1 band: 1 burn, 0 not burned, -1 no data
      validation/...

Splits follow PANGAEA: ``train``/``val`` are a 90/10 ``sklearn.model_selection.train_test_split``
(``random_state=23``) of the sorted ``training/`` scenes, ``test`` is all of ``validation/``.
"""

from __future__ import annotations

import calendar
import datetime as dt
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pyproj
import rasterio
import rasterio.errors
import torch
from affine import Affine
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from rasterio.windows import Window
from sklearn.model_selection import train_test_split
from torchgeo.datasets import NonGeoDataset

from terratorch_eoplugins.datasets.common import logger, subsample_fraction
from terratorch_eoplugins.errors import EODataError, EODatasetNotFoundError, require_dir

_NAME = r"subsetted_512x512_HLS\.(?P<sensor>[SL]30)\.(?P<tile>T[0-9A-Z]{5})\.(?P<date>\d{7})\.v1\.4"
IMAGE_PATTERN = re.compile(rf"^{_NAME}_merged\.tif$")
MASK_PATTERN = re.compile(rf"^{_NAME}\.mask\.tif$")
#: colours (RGB in [0, 1]) of the two classes in plots and prediction maps: dark green, red
BURN_PALETTE: np.ndarray = np.array([(0.1, 0.4, 0.1), (0.9, 0.2, 0.1)], np.float32)

#: Band aliases accepted in ``bands`` (case-insensitive): terratorch HLSBands names and Sentinel-2/HLS band ids.
_ALIASES: dict[str, str] = {
    "BLUE": "BLUE", "B02": "BLUE", "B2": "BLUE",
    "GREEN": "GREEN", "B03": "GREEN", "B3": "GREEN",
    "RED": "RED", "B04": "RED", "B4": "RED",
    "NIR_NARROW": "NIR_NARROW", "NIR": "NIR_NARROW", "B8A": "NIR_NARROW",
    "SWIR_1": "SWIR_1", "SWIR1": "SWIR_1", "B11": "SWIR_1",
    "SWIR_2": "SWIR_2", "SWIR2": "SWIR_2", "B12": "SWIR_2",
}


@functools.lru_cache(maxsize=64)
def _to_latlon(wkt: str) -> pyproj.Transformer:
    return pyproj.Transformer.from_crs(pyproj.CRS.from_wkt(wkt), "EPSG:4326", always_xy=True)


def _xy(t: Affine, col: float, row: float) -> tuple[float, float]:
    """Map pixel coordinates (col, row) through ``t`` (x = a*col + b*row + c, y = d*col + e*row + f)."""
    return t.a * col + t.b * row + t.c, t.d * col + t.e * row + t.f


def _open_tif(path: Path, what: str) -> rasterio.DatasetReader:
    """``rasterio.open`` with an :class:`EODataError` naming the file when it is not a readable GeoTIFF."""
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as err:
        raise EODataError(f"{path}: cannot be read as a GeoTIFF ({err}); expected {what}") from None


def _read_tif(src: rasterio.DatasetReader, path: Path, what: str, *args: Any, **kwargs: Any) -> np.ndarray:
    """``src.read(...)`` with an :class:`EODataError` naming the file when its pixel data is unreadable."""
    try:
        return src.read(*args, **kwargs)
    except rasterio.errors.RasterioIOError as err:
        raise EODataError(f"{path}: pixel data cannot be read ({err}); the file is truncated or corrupt: "
                          f"expected {what}") from None


def epsg_of(wkt: str) -> int | None:
    """EPSG code of a (possibly non-EPSG) WKT, matched loosely as GEO-Bench-2 does; for display only."""
    try:
        return pyproj.CRS.from_wkt(wkt).to_epsg(min_confidence=25)
    except pyproj.exceptions.CRSError:
        return None


class HLSBurnScars(NonGeoDataset):
    """HLS Burn Scars: 512x512 HLS S30 scenes (30 m, 6 bands) with burn-scar masks.

    Sample keys:

    * ``image``: float32 ``(C, H, W)`` reflectance, no-data replaced, normalised when ``normalize``.
    * ``mask``: long ``(H, W)``: 1 burn scar, 0 not burned, -1 no data (ignored), also -1 where the
      image has no data (``no_data_value``, NaN, the file's nodata tag).
    * ``crs``: the file's CRS as WKT (real files carry a non-EPSG WKT; it is kept as is).
    * ``transform``: float64 ``(6,)`` affine coefficients ``(a, b, c, d, e, f)`` in *affine* order
      (``x = a*col + b*row + c``, ``y = d*col + e*row + f``) of the returned patch (crop included).
    * ``bounds``: float64 ``(4,)`` ``(left, bottom, right, top)`` of the returned patch.
    * ``tile`` (e.g. ``"T11SMT"``), ``date`` (ISO ``"YYYY-MM-DD"``), both from the file name.
    * ``temporal_coords``: float32 ``(1, 2)`` ``(year, day-of-year)``, as terratorch's FireScarsNonGeo.
    * ``location_coords``: float32 ``(2,)`` ``(lat, lon)`` of the patch centre.
    * ``filename``: path of the image file.

    Args:
        root: Folder holding ``training/`` and ``validation/``.
        split: ``"train"``, ``"val"`` (90/10 of ``training/``) or ``"test"`` (``validation/``).
        bands: Band names to keep, in order (default all six); also accepts ``B02``... ``B12`` / ``B8A``.
        crop_size: Side of a random square crop applied to the ``train`` split; val/test are full scenes.
        no_data_value: Image value marking missing data (PANGAEA: 9999).
        no_data_replace: Reflectance written into no-data image pixels (before normalisation).
        normalize: Subtract ``means`` and divide by ``stds`` per band.
        means, stds: Per-band statistics in reflectance units, for the selected ``bands`` (sequence in
            ``bands`` order, or a mapping band name -> value). Default: the Prithvi/terratorch burn-scars
            statistics (:attr:`MEANS`, :attr:`STDS`).
        label_fraction: Fraction of ``train`` scenes kept (labels-budget experiments); val/test untouched.
        seed: Seed of the ``label_fraction`` subsample.
        split_seed: ``random_state`` of the 90/10 train/val split (PANGAEA: 23).
        transforms: Optional callable applied to each sample dict last.
    """

    all_bands: tuple[str, ...] = ("BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2")
    classes: tuple[str, ...] = ("Not burned", "Burn scar")
    palette: np.ndarray = BURN_PALETTE
    #: Prithvi / terratorch ``FireScarsNonGeoDataModule`` statistics (reflectance units).
    MEANS: dict[str, float] = {
        "BLUE": 0.033349706741586264, "GREEN": 0.05701185520536176, "RED": 0.05889748132001316,
        "NIR_NARROW": 0.2323245113436119, "SWIR_1": 0.1972854853760658, "SWIR_2": 0.11944914225186566,
    }
    STDS: dict[str, float] = {
        "BLUE": 0.02269135568823774, "GREEN": 0.026807560223070237, "RED": 0.04004109844362779,
        "NIR_NARROW": 0.07791732423672691, "SWIR_1": 0.08708738838140137, "SWIR_2": 0.07241979477437814,
    }
    split_folders: dict[str, str] = {"train": "training", "val": "training", "test": "validation"}
    ignore_index = -1

    def __init__(
        self,
        root: str | Path = "data",
        split: str = "train",
        bands: Sequence[str] | None = None,
        crop_size: int | None = None,
        no_data_value: float = 9999.0,
        no_data_replace: float = 0.0,
        normalize: bool = True,
        means: Sequence[float] | Mapping[str, float] | None = None,
        stds: Sequence[float] | Mapping[str, float] | None = None,
        label_fraction: float = 1.0,
        seed: int = 0,
        split_seed: int = 23,
        transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        if split not in self.split_folders:
            raise ValueError(f"split must be one of {list(self.split_folders)}, got {split!r}")
        if crop_size is not None and (not isinstance(crop_size, int) or crop_size <= 0):
            raise ValueError(f"crop_size must be a positive int or None, got {crop_size!r}")
        self.root = Path(root)
        self.split = split
        self.bands = self._resolve_bands(bands)
        self.band_indices = [self.all_bands.index(b) for b in self.bands]
        self.crop_size = crop_size if split == "train" else None
        self.no_data_value = no_data_value
        self.no_data_replace = no_data_replace
        self.normalize = normalize
        self.means = self._resolve_stats(means, self.MEANS, "means")
        self.stds = self._resolve_stats(stds, self.STDS, "stds")
        if np.any(self.stds <= 0) or not np.all(np.isfinite(self.stds)) or not np.all(np.isfinite(self.means)):
            raise ValueError(f"means must be finite and stds finite and > 0, got means={self.means.tolist()}, "
                             f"stds={self.stds.tolist()}")
        if not 0.0 < label_fraction <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
        self.transforms = transforms

        require_dir(self.root, "HLS Burn Scars root folder")
        sub = self.split_folders[split]
        folder = require_dir(self.root / sub, f"HLS Burn Scars {sub}/ folder")
        scenes = self._list_scenes(folder)
        if not scenes:
            raise EODatasetNotFoundError(
                folder,
                "HLS Burn Scars scenes (subsetted_512x512_HLS.S30.T<tile>.<YYYYDDD>.v1.4_merged.tif + .mask.tif)")
        if split in ("train", "val"):
            if len(scenes) < 2:
                raise EODataError(f"{folder}: the 90/10 train/val split needs at least 2 scenes, found {len(scenes)}")
            train_idx, val_idx = train_test_split(np.arange(len(scenes)), test_size=0.1, random_state=split_seed)
            indices = [int(i) for i in (train_idx if split == "train" else val_idx)]
            if split == "train" and label_fraction < 1.0:
                kept = subsample_fraction(indices, label_fraction, seed)
                logger.info("HLS Burn Scars train: label_fraction=%s keeps %d of %d scenes", label_fraction,
                            len(kept), len(indices))
                indices = kept
            scenes = [scenes[i] for i in indices]
        self.scenes: list[dict[str, Any]] = scenes

    # ------------------------------------------------------------------------------- arguments
    def _resolve_bands(self, bands: Sequence[str] | None) -> tuple[str, ...]:
        if bands is None:
            return self.all_bands
        if isinstance(bands, str):
            bands = [bands]
        out = []
        for b in bands:
            name = _ALIASES.get(str(b).upper())
            if name is None:
                raise ValueError(f"bands: unknown band {b!r}; expected names from {list(self.all_bands)} "
                                 f"(or S2 ids B02, B03, B04, B8A, B11, B12)")
            if name in out:
                raise ValueError(f"bands: {b!r} given twice (as {name})")
            out.append(name)
        if not out:
            raise ValueError("bands: expected at least one band")
        return tuple(out)

    def _resolve_stats(self, values: Sequence[float] | Mapping[str, float] | None, default: Mapping[str, float],
                       name: str) -> np.ndarray:
        if values is None:
            return np.array([default[b] for b in self.bands], np.float64)
        if isinstance(values, Mapping):
            table = {_ALIASES.get(str(k).upper(), str(k)): float(v) for k, v in values.items()}
            missing = [b for b in self.bands if b not in table]
            if missing:
                raise ValueError(f"{name}: no value for bands {missing} (given for {list(values)})")
            return np.array([table[b] for b in self.bands], np.float64)
        arr = np.asarray(values, np.float64).ravel()
        if arr.size != len(self.bands):
            raise ValueError(f"{name}: expected {len(self.bands)} values (one per band of {list(self.bands)}), "
                             f"got {arr.size}")
        return arr

    # ---------------------------------------------------------------------------------- listing
    @staticmethod
    def _list_scenes(folder: Path) -> list[dict[str, Any]]:
        images: dict[str, re.Match[str]] = {}
        masks: dict[str, re.Match[str]] = {}
        ignored = 0
        for entry in sorted(folder.iterdir()):
            m_img = IMAGE_PATTERN.match(entry.name)
            m_mask = MASK_PATTERN.match(entry.name)
            if entry.is_file() and m_img:
                images[entry.name[: -len("_merged.tif")]] = m_img
            elif entry.is_file() and m_mask:
                masks[entry.name[: -len(".mask.tif")]] = m_mask
            else:
                ignored += 1
        if ignored:
            logger.info("HLS Burn Scars: ignored %d entries of %s not matching the scene file pattern", ignored, folder)
        for stem in sorted(images):
            if stem not in masks:
                raise EODataError(f"{folder / (stem + '_merged.tif')}: no mask; expected the partner file "
                                  f"{folder / (stem + '.mask.tif')}")
        for stem in sorted(masks):
            if stem not in images:
                raise EODataError(f"{folder / (stem + '.mask.tif')}: no image; expected the partner file "
                                  f"{folder / (stem + '_merged.tif')}")
        scenes = []
        for stem in sorted(images):
            m = images[stem]
            image_path = folder / (stem + "_merged.tif")
            code = m.group("date")
            year, doy = int(code[:4]), int(code[4:])
            if year < 1 or not 1 <= doy <= (366 if calendar.isleap(year) else 365):
                raise EODataError(f"{image_path}: invalid acquisition date {code!r} in the file name, expected YYYYDDD")
            date = dt.date(year, 1, 1) + dt.timedelta(days=doy - 1)
            scenes.append({"image": image_path, "mask": folder / (stem + ".mask.tif"), "tile": m.group("tile"),
                           "date": date})
        return scenes

    def __len__(self) -> int:
        return len(self.scenes)

    # ---------------------------------------------------------------------------------- reading
    def _read(self, scene: dict[str, Any]) -> dict[str, Any]:
        """Read and validate one pair, random-cropped to ``crop_size`` when set.

        Raises :class:`EODataError` for a scene without a single labelled pixel (the loss over it would be NaN) and
        for reflectance at another scale (digital numbers where reflectance in [0, 1] is expected); a random crop
        that holds no labelled pixel is drawn again (up to :attr:`crop_tries` times).
        """
        ipath, mpath = scene["image"], scene["mask"]
        with _open_tif(ipath, "a 6-band HLS reflectance GeoTIFF") as src:
            if src.count != len(self.all_bands):
                raise EODataError(f"{ipath}: expected {len(self.all_bands)} bands {list(self.all_bands)}, "
                                  f"got {src.count}")
            if not all(np.dtype(d).kind == "f" for d in src.dtypes):
                raise EODataError(f"{ipath}: expected float reflectance bands, got dtype {src.dtypes[0]}")
            if src.crs is None:
                raise EODataError(f"{ipath}: no CRS; expected a UTM CRS in the GeoTIFF")
            crs, transform, shape, file_nodata = src.crs, src.transform, (src.height, src.width), src.nodata
            if self.crop_size is not None and (self.crop_size > shape[0] or self.crop_size > shape[1]):
                raise ValueError(f"crop_size={self.crop_size} is larger than the scene "
                                 f"{shape[0]}x{shape[1]} of {ipath}")
            full_mask = self._read_mask(mpath, ipath, crs, transform, shape)
            if (full_mask == -1).all():
                raise EODataError(f"{mpath}: every pixel is -1 (no data), so the scene has no labelled pixel (its "
                                  "loss would be NaN); expected 0 (not burned) or 1 (burn scar) somewhere: remove "
                                  "the scene pair from the split folder")
            for _ in range(self.crop_tries if self.crop_size is not None else 1):
                win = window = None
                mask = full_mask
                if self.crop_size is not None:
                    window = (int(torch.randint(0, shape[0] - self.crop_size + 1, ()).item()),
                              int(torch.randint(0, shape[1] - self.crop_size + 1, ()).item()))
                    win = Window(window[1], window[0], self.crop_size, self.crop_size)
                    r, c = window
                    mask = full_mask[r : r + self.crop_size, c : c + self.crop_size].copy()
                image = _read_tif(src, ipath, "6 float reflectance bands", window=win).astype(np.float32, copy=False)
                invalid = ~np.isfinite(image)
                invalid |= image == self.no_data_value
                if file_nodata is not None and not np.isnan(file_nodata):
                    invalid |= image == file_nodata
                mask[invalid.any(axis=0)] = -1
                if window is None or (mask != -1).any():
                    break
            else:
                raise EODataError(f"{ipath}: no {self.crop_size}x{self.crop_size} crop with a labelled pixel in "
                                  f"{self.crop_tries} random draws (the mask is -1 or the image holds no data "
                                  f"({self.no_data_value:g}, NaN) almost everywhere)")
            if window is None and (mask == -1).all():
                raise EODataError(f"{ipath}: every pixel is no data (image value {self.no_data_value:g}, NaN or the "
                                  "file's nodata in some band), so the scene has no labelled pixel (its loss would be "
                                  "NaN); expected reflectance data: remove the scene pair from the split folder")
        valid = ~invalid.any(axis=0)
        all_valid = bool(valid.all())
        self._check_scale(image if all_valid else image[:, valid], ipath)
        if not all_valid:
            image[invalid] = self.no_data_replace
        if self.band_indices != list(range(image.shape[0])):
            image = image[self.band_indices]
        if self.normalize:  # in place, in float32 (the statistics rounded to float32)
            image = np.ascontiguousarray(image)
            np.subtract(image, self.means.astype(np.float32)[:, None, None], out=image)
            np.divide(image, self.stds.astype(np.float32)[:, None, None], out=image)
        if window is not None:  # the crop's top-left corner becomes the origin
            x0, y0 = _xy(transform, window[1], window[0])
            transform = Affine(transform.a, transform.b, x0, transform.d, transform.e, y0)
        return {"image": image.astype(np.float32, copy=False), "mask": mask, "crs": crs, "transform": transform}

    #: random crops drawn before giving up on finding one with a labelled pixel
    crop_tries: int = 10
    #: plausible surface reflectance of valid pixels (HLS: -0.01 to 1.6 after the 0.0001 scale factor)
    reflectance_range: tuple[float, float] = (-0.5, 2.0)

    def _check_scale(self, values: np.ndarray, ipath: Path) -> None:
        """Raise when more than 1 % of the valid reflectance values lie outside :attr:`reflectance_range`."""
        if values.size == 0:
            return
        lo, hi = self.reflectance_range
        if lo <= values.min() and values.max() <= hi:  # nothing outside: the share is 0
            return
        share = float(np.mean((values < lo) | (values > hi)))
        if share > 0.01:
            raise EODataError(f"{ipath}: {share:.0%} of the valid pixel values lie outside [{lo:g}, {hi:g}] (median "
                              f"{float(np.median(values)):.4g}, max {float(values.max()):.4g}); expected surface "
                              "reflectance in [0, 1] (HLS digital numbers x 0.0001), not digital numbers 0-10000")

    def _read_mask(self, mpath: Path, ipath: Path, crs: Any, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
        """The full ``int64`` mask of a scene, checked against its image's grid and the value set {-1, 0, 1}."""
        with _open_tif(mpath, "a 1-band burn-scar mask GeoTIFF") as src:
            if src.count != 1:
                raise EODataError(f"{mpath}: expected 1 mask band, got {src.count}")
            if src.crs is None:
                raise EODataError(f"{mpath}: no CRS; expected the CRS of {ipath.name}")
            if (src.height, src.width) != shape:
                raise EODataError(f"{mpath}: mask shape {src.height}x{src.width} differs from image shape "
                                  f"{shape[0]}x{shape[1]} of {ipath.name}")
            if src.crs != crs:
                raise EODataError(f"{mpath}: mask CRS differs from the image CRS of {ipath.name}")
            if not src.transform.almost_equals(transform, precision=1e-6):
                raise EODataError(f"{mpath}: mask transform {tuple(src.transform)[:6]} differs from image "
                                  f"transform {tuple(transform)[:6]} of {ipath.name}")
            mask = _read_tif(src, mpath, "a mask band of -1/0/1", 1)
        if mask.dtype.kind == "f":
            mask = np.where(np.isnan(mask), -1, mask)
        # integers between -1 and 1 can only be -1, 0 or 1: np.unique (a sort) only when that does not settle it
        if not (mask.dtype.kind in "iu" and mask.size and mask.min() >= -1 and mask.max() <= 1):
            values = np.unique(mask)
            bad = values[~np.isin(values, (-1, 0, 1))]
        else:
            bad = np.empty(0, mask.dtype)
        if bad.size:
            raise EODataError(f"{mpath}: mask values must be -1 (no data), 0 (not burned) or 1 (burn scar), "
                              f"found {bad[:10].tolist()}")
        return mask.astype(np.int64)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Sample ``index``: image, mask and georeferencing/date metadata (see class docstring)."""
        scene = self.scenes[index]
        data = self._read(scene)
        image, mask, transform = data["image"], data["mask"], data["transform"]
        wkt = data["crs"].to_wkt()
        h, w = mask.shape
        cx, cy = _xy(transform, w / 2.0, h / 2.0)
        try:
            lon, lat = _to_latlon(wkt).transform(cx, cy, errcheck=True)
        except pyproj.exceptions.ProjError as err:  # pragma: no cover - depends on exotic CRSs
            raise EODataError(f"{scene['image']}: cannot convert the CRS to latitude/longitude ({err})") from err
        corners = [_xy(transform, 0, 0), _xy(transform, w, 0), _xy(transform, 0, h), _xy(transform, w, h)]
        xs, ys = [p[0] for p in corners], [p[1] for p in corners]
        date: dt.date = scene["date"]
        sample: dict[str, Any] = {
            "image": torch.from_numpy(image),
            "mask": torch.from_numpy(mask),
            "crs": wkt,
            "transform": torch.tensor(tuple(transform)[:6], dtype=torch.float64),
            "bounds": torch.tensor([min(xs), min(ys), max(xs), max(ys)], dtype=torch.float64),
            "tile": scene["tile"],
            "date": date.isoformat(),
            "temporal_coords": torch.tensor([[date.year, date.timetuple().tm_yday]], dtype=torch.float32),
            "location_coords": torch.tensor([lat, lon], dtype=torch.float32),
            "filename": str(scene["image"]),
        }
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample

    # ------------------------------------------------------------------------------- statistics
    def band_statistics(self, max_scenes: int | None = 64, stride: int = 4) -> tuple[list[float], list[float]]:
        """Per-band mean and std (reflectance units) of this split's valid pixels, for the selected bands.

        Reads at most ``max_scenes`` scenes (an evenly spaced subset) and every ``stride``-th pixel
        along each axis; no-data pixels are excluded.
        """
        n = len(self.scenes)
        chosen = range(n)
        if max_scenes is not None and n > max_scenes:
            chosen = np.linspace(0, n - 1, max_scenes).round().astype(int)
        total = np.zeros(len(self.bands))
        total_sq = np.zeros(len(self.bands))
        count = 0
        for i in chosen:
            path = self.scenes[int(i)]["image"]
            with rasterio.open(path) as src:
                if src.count != len(self.all_bands):
                    raise EODataError(f"{path}: expected {len(self.all_bands)} bands, got {src.count}")
                image = src.read()[:, ::stride, ::stride].astype(np.float64)
                file_nodata = src.nodata
            invalid = ~np.isfinite(image) | (image == self.no_data_value)
            if file_nodata is not None and not np.isnan(file_nodata):
                invalid |= image == file_nodata
            valid = ~invalid.any(axis=0)
            pixels = image[self.band_indices][:, valid]
            total += pixels.sum(axis=1)
            total_sq += (pixels**2).sum(axis=1)
            count += pixels.shape[1]
        if count == 0:
            raise EODataError(f"{self.root}: no valid pixels in the {self.split} split to compute band statistics")
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
        std = np.where(std > 0, std, 1.0)
        return mean.tolist(), std.tolist()

    # ------------------------------------------------------------------------------------- plot
    def plot(self, sample: Mapping[str, Any], show_titles: bool = True, suptitle: str | None = None,
             false_color: bool = False) -> Figure:
        """Show the image (true colour, or SWIR2/NIR/Red false colour), the mask and, if any, the prediction.

        ``false_color`` is used automatically when the red, green or blue band is not loaded.
        """
        image = np.asarray(sample["image"], np.float64)
        if self.normalize:
            image = image * self.stds[:, None, None] + self.means[:, None, None]
        rgb = ("RED", "GREEN", "BLUE")
        fc = ("SWIR_2", "NIR_NARROW", "RED")
        if not false_color and all(b in self.bands for b in rgb):
            chans, label = [self.bands.index(b) for b in rgb], "RGB"
        elif all(b in self.bands for b in fc):
            chans, label = [self.bands.index(b) for b in fc], "SWIR2/NIR/Red"
        else:
            chans, label = [0, 0, 0], self.bands[0]
        img = np.moveaxis(image[chans], 0, -1)
        mask = np.asarray(sample["mask"]) if "mask" in sample else None
        valid = (mask >= 0) if mask is not None else np.ones(img.shape[:2], bool)
        if valid.any():
            lo = np.percentile(img[valid], 2, axis=0)
            hi = np.percentile(img[valid], 98, axis=0)
        else:
            lo, hi = img.min(axis=(0, 1)), img.max(axis=(0, 1))
        img = np.clip((img - lo) / np.maximum(hi - lo, 1e-6), 0, 1)

        panels: list[tuple[str, np.ndarray]] = []
        if mask is not None:
            panels.append(("Mask", mask))
        if "prediction" in sample:
            pred = np.asarray(sample["prediction"])
            if pred.ndim == 3:  # logits / probabilities (K, H, W)
                pred = pred.argmax(axis=0)
            panels.append(("Prediction", pred))
        cmap = ListedColormap(["#7f7f7f", "#1b3a1b", "#ff4500"])  # -1 no data, 0 not burned, 1 burn scar
        fig, axes = plt.subplots(1, 1 + len(panels), figsize=(4 * (1 + len(panels)), 4), squeeze=False)
        axes = axes[0]
        axes[0].imshow(img)
        for ax, (title, arr) in zip(axes[1:], panels):
            ax.imshow(arr, cmap=cmap, vmin=-1.5, vmax=1.5, interpolation="nearest")
            if show_titles:
                ax.set_title(title)
        if show_titles:
            title = label
            if "tile" in sample and "date" in sample:
                title = f"{sample['tile']} {sample['date']} ({label})"
            if "crs" in sample:
                epsg = epsg_of(sample["crs"])
                title += f"\nEPSG:{epsg}" if epsg else ""
            axes[0].set_title(title)
        for ax in axes:
            ax.axis("off")
        if suptitle is not None:
            fig.suptitle(suptitle)
        fig.tight_layout()
        return fig
