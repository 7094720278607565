"""LIANet fine-tuning samples: labelled patches placed in a pretraining region's pixel grid, x acquisition dates.

Fine-tuning samples are (acquisition date x labelled patch) pairs, as in the paper. Each labelled patch
is mapped to its origin in the pretraining region's pixel grid through its real georeferencing:

* PASTIS: the patch polygon of ``metadata.geojson`` (Lambert-93) is reprojected to the region's UTM CRS
  and its top-left corner becomes the pixel origin (rounded to the nearest pixel);
* HLS Burn Scars: each 30 m scene mask is reprojected (nearest) onto the region's 10 m grid, cut into
  ``patch_size`` windows on the scene's own grid (the reference's 0..1408 grid), windows without burned
  pixels dropped.

Times come from the region's acquisitions (days since 2015-01-01 with time of day, like pretraining):
PASTIS pairs every patch with every acquisition of the region (``dates="region"``, the reference) or with
its own S2 dates matched to acquisitions on the same day (``dates="patch"``); each Burn Scars scene is
paired with the first acquisition on or after its date (post-fire) within ``max_gap_days``. Patches
outside the region and dates outside the pretrained period raise :class:`EODataError` (Burn Scars scenes
of other tiles are skipped with a warning: the region is one tile of a sparse dataset).

Sample: ``image`` is a placeholder ``(1, P, P)`` of zeros (LIANet takes no imagery; its size sets the patch
size) or, with ``image="s2"``, the acquisition's 12-band reflectance window (for baselines); ``mask``;
``origin_px`` ``(2,)`` float (column, row); ``time_days``; ``time_index``; metadata (``date``, ``patch_id``) and the
window's georeferencing (``crs`` WKT and ``transform`` of the region grid, ``filename`` = ``<patch id>_<time>``).
The datamodules (:mod:`terratorch_eoplugins.datamodules.lianet`) choose the splits and the keys that reach
the model.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyproj
import rasterio
import rasterio.warp
import torch
from affine import Affine
from matplotlib.figure import Figure
from rasterio.crs import CRS
from rasterio.windows import Window
from torchgeo.datasets import NonGeoDataset

from terratorch_eoplugins.datasets.burnscars import BURN_PALETTE, HLSBurnScars
from terratorch_eoplugins.datasets.common import logger, plot_panels, subsample_fraction
from terratorch_eoplugins.datasets.pastis import PASTIS, PASTIS_CLASSES, PASTIS_PALETTE
from terratorch_eoplugins.datasets.s2_tiles import RGB, S2Region, dn_to_reflectance
from terratorch_eoplugins.dates import days_since_epoch
from terratorch_eoplugins.errors import EODataError

__all__ = ["LIANetBurnScars", "LIANetPASTIS", "polygon_origin", "reproject_mask"]


# ----------------------------------------------------------------------------- georeferencing
def _transformer(src_crs: Any, dst_crs: CRS, what: str) -> pyproj.Transformer:
    """``src_crs`` -> ``dst_crs`` transformer (x, y order); :class:`EODataError` naming ``what`` if impossible."""
    try:
        return pyproj.Transformer.from_crs(pyproj.CRS.from_user_input(src_crs),
                                           pyproj.CRS.from_user_input(dst_crs.to_wkt()), always_xy=True)
    except (pyproj.exceptions.CRSError, pyproj.exceptions.ProjError, TypeError, ValueError) as err:
        raise EODataError(f"{what}: cannot transform from CRS {str(src_crs)[:80]!r} to the region CRS "
                          f"{dst_crs.to_string()} ({err})") from None


def polygon_origin(geometry: Any, src_crs: Any, region: S2Region, size: int, what: str = "patch") -> tuple[int, int]:
    """(column, row) of the top-left pixel of a ``size`` x ``size`` patch polygon in the region grid.

    The polygon vertices are reprojected to the region CRS; raises :class:`EODataError` if the CRS cannot
    be transformed or the patch leaves the region.
    """
    coords = np.asarray(geometry.exterior.coords if hasattr(geometry, "exterior") else geometry, np.float64)
    tr = _transformer(src_crs, region.crs, what)
    try:
        xs, ys = tr.transform(coords[:, 0], coords[:, 1], errcheck=True)
    except pyproj.exceptions.ProjError as err:
        raise EODataError(f"{what}: cannot reproject its polygon to {region.crs.to_string()} ({err})") from None
    xs, ys = np.asarray(xs), np.asarray(ys)
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
        raise EODataError(f"{what}: polygon reprojects to non-finite coordinates in {region.crs.to_string()}")
    cols, rows = region.pixel_of(xs.min(), ys.max())
    col, row = int(np.round(cols)), int(np.round(rows))
    h, w = region.shape
    if col < 0 or row < 0 or col + size > w or row + size > h:
        raise EODataError(f"{what} lies outside the pretrained region: origin (column {col}, row {row}) of a "
                          f"{size}x{size} patch in a {h}x{w} pixel grid ({region.root}); fine-tuning patches must "
                          "come from the pretraining region")
    return col, row


def reproject_mask(mask: np.ndarray, src_crs: Any, src_transform: Affine, region: S2Region,
                   what: str = "mask") -> tuple[np.ndarray, int, int] | None:
    """Mask reprojected (nearest, no data -1) onto the region grid over its footprint.

    Returns ``(array, col0, row0)`` (position of the array's top-left pixel in the region grid), or
    ``None`` if the footprint does not intersect the region.
    """
    h, w = mask.shape
    left, top = src_transform * (0, 0)
    right, bottom = src_transform * (w, h)
    try:
        src = CRS.from_user_input(src_crs)
        bx = rasterio.warp.transform_bounds(src, region.crs, min(left, right), min(top, bottom), max(left, right),
                                            max(top, bottom))
    except Exception as err:
        raise EODataError(f"{what}: cannot transform its bounds to the region CRS {region.crs.to_string()} "
                          f"({err})") from None
    if not all(np.isfinite(bx)):
        raise EODataError(f"{what}: bounds reproject to non-finite coordinates in {region.crs.to_string()}")
    c0, r0 = region.pixel_of(bx[0], bx[3])
    c1, r1 = region.pixel_of(bx[2], bx[1])
    c0, r0 = int(np.floor(float(c0) + 1e-6)), int(np.floor(float(r0) + 1e-6))
    c1, r1 = int(np.ceil(float(c1) - 1e-6)), int(np.ceil(float(r1) - 1e-6))
    rh, rw = region.shape
    c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, rw), min(r1, rh)
    if c1 <= c0 or r1 <= r0:
        return None
    dst = np.full((r1 - r0, c1 - c0), -1, np.int16)
    rasterio.warp.reproject(mask.astype(np.int16), dst, src_transform=src_transform, src_crs=src,
                            dst_transform=region.transform @ Affine.translation(c0, r0), dst_crs=region.crs,
                            src_nodata=-1, dst_nodata=-1, resampling=rasterio.enums.Resampling.nearest)
    return dst, c0, r0


# ---------------------------------------------------------------------------- fine-tuning data
class _LIANetSamples(NonGeoDataset):
    """(date x patch) samples in a pretraining region; subclasses fill :attr:`samples` and :meth:`_mask`."""

    classes: tuple[str, ...] = ()
    #: title of the target panel of :meth:`plot`
    mask_title = "Mask"

    def __init__(self, region: S2Region, patch_size: int, image: str, boa_offset: float) -> None:
        if image not in ("placeholder", "s2"):
            raise ValueError(f"image must be 'placeholder' or 's2', got {image!r}")
        self.region, self.patch_size, self.image, self.boa_offset = region, int(patch_size), image, float(boa_offset)
        self.times = region.times
        self.days = region.acquisition_days
        self.samples: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.samples)

    def _mask(self, sample: Mapping[str, Any]) -> np.ndarray:
        raise NotImplementedError

    def _s2(self, col: int, row: int, t: int) -> np.ndarray:
        when, p = self.times[t], self.patch_size
        for tile in self.region.tiles:
            tc, tr = col - tile.offset[0], row - tile.offset[1]
            if 0 <= tc and 0 <= tr and tc + p <= tile.shape[1] and tr + p <= tile.shape[0]:
                path = dict(tile.files).get(when)
                if path is not None:
                    with rasterio.open(path) as src:
                        return dn_to_reflectance(src.read(window=Window(tc, tr, p, p)), self.boa_offset)
        raise EODataError(f"{self.region.root}: no tile file of {when.isoformat()} covers the window at column {col}, "
                          f"row {row}")

    def _cloud(self, col: int, row: int, t: int) -> float | None:
        """Mean cloud probability (``MSK_CLDPRB``, 0-100) of the window on acquisition ``t`` (``None``: no mask)."""
        when, p = self.times[t], self.patch_size
        for tile in self.region.tiles:
            tc, tr = col - tile.offset[0], row - tile.offset[1]
            path = dict(tile.files).get(when)
            if path is not None and 0 <= tc and 0 <= tr and tc + p <= tile.shape[1] and tr + p <= tile.shape[0]:
                mask = Path(path).parent / "MSK_CLDPRB" / Path(path).name
                if not mask.is_file():
                    return None
                with rasterio.open(mask) as src:
                    return float(src.read(1, window=Window(tc, tr, p, p)).mean())
        return None

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        col, row = s["origin"]
        t = s["time_index"]
        p = self.patch_size
        image = self._s2(col, row, t) if self.image == "s2" else np.zeros((1, p, p), np.float32)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "mask": self._mask_tensor(s),
            "origin_px": torch.tensor([col, row], dtype=torch.float32),
            "time_days": torch.tensor(self.days[t], dtype=torch.float32),
            "time_index": torch.tensor(t, dtype=torch.long),
            "date": self.times[t].isoformat(),
            "patch_id": str(s["id"]),
            "crs": self.region.crs.to_wkt(),
            "transform": torch.tensor(tuple(self.region.transform @ Affine.translation(col, row))[:6],
                                      dtype=torch.float64),
            "filename": f"{s['id']}_{self.times[t].strftime('%Y%m%dT%H%M%S')}",
        }

    def _mask_tensor(self, sample: Mapping[str, Any]) -> torch.Tensor:
        """The sample's target as the batch holds it (class indices; regression subclasses return floats)."""
        return torch.from_numpy(self._mask(sample).astype(np.int64))

    def _prediction_map(self, pred: np.ndarray) -> np.ndarray:
        """A ``[C, H, W]`` prediction as the map :meth:`plot` draws (the arg-max class)."""
        return pred.argmax(0)

    def plot(self, sample: Mapping[str, Any], show_titles: bool = True, suptitle: str | None = None) -> Figure:
        """S2 window (when loaded), target and, if present, prediction (drawn by :meth:`_colorize`)."""
        panels = []
        img = np.asarray(sample["image"], np.float32)
        if img.shape[0] >= 12:
            panels.append((np.clip(img[list(RGB)].transpose(1, 2, 0) * 3.5, 0, 1), "Sentinel-2 (RGB)"))
        panels.append((self._colorize(np.asarray(sample["mask"])), self.mask_title))
        if "prediction" in sample:
            pred = np.asarray(sample["prediction"])
            if pred.ndim == 3:
                pred = self._prediction_map(pred)
            panels.append((self._colorize(pred), "Prediction"))
        if suptitle is None and show_titles:
            suptitle = f"{sample.get('patch_id', '')} {sample.get('date', '')}"
        return plot_panels(panels, show_titles, suptitle)

    def _colorize(self, labels: np.ndarray) -> np.ndarray:
        palette = PASTIS_PALETTE if len(self.classes) > 2 else BURN_PALETTE
        out = np.ones((*labels.shape, 3), np.float32)
        ok = (labels >= 0) & (labels < len(palette))
        out[ok] = palette[labels[ok]]
        return out


class LIANetPASTIS(_LIANetSamples):
    """PASTIS patches x acquisition dates in a LIANet pretraining region.

    Args:
        root: the ``PASTIS-R`` folder (read with :class:`~terratorch_eoplugins.datasets.pastis.PASTIS`).
        region: the pretraining region (:func:`~terratorch_eoplugins.datasets.s2_tiles.scan_region`).
        split, protocol, fold_rotation: PASTIS split (``"pangaea"``: folds 1-3/4/5).
        dates: ``"region"`` (every acquisition of the region, the reference) or ``"patch"`` (the patch's own
            S2 dates, each matched to an acquisition on the same day).
        image: ``"placeholder"`` or ``"s2"``.
        void_label: value of the void class in masks.
        label_fraction, seed: subset of the split's patches.
        outside: ``"error"`` (default) or ``"skip"`` for patches outside the region.
        num_dates: keep this many of each patch's dates (``round(linspace)``; ``None`` = all, the reference).
        max_cloud: drop (date x patch) pairs whose window has a mean cloud probability (``MSK_CLDPRB``, 0-100)
            above this, before ``num_dates`` subsampling (the supplement fine-tunes PASTIS on cloud-free
            timestamps only, section 10); ``None`` keeps every date.
    """

    classes = PASTIS_CLASSES
    palette = PASTIS_PALETTE

    def __init__(self, root: str | Path, region: S2Region, split: str = "train", protocol: str = "pangaea",
                 fold_rotation: int = 0, dates: str = "region", image: str = "placeholder", void_label: int | None = -1,
                 label_fraction: float = 1.0, seed: int = 0, outside: str = "error", boa_offset: float = 1000.0,
                 num_dates: int | None = None, max_cloud: float | None = None) -> None:
        super().__init__(region, PASTIS.patch_size, image, boa_offset)
        if max_cloud is not None and not 0 <= max_cloud <= 100:
            raise ValueError(f"max_cloud must be a cloud probability in [0, 100] or None, got {max_cloud!r}")
        if num_dates is not None and num_dates < 1:
            raise ValueError(f"num_dates must be a positive int or None, got {num_dates}")
        if dates not in ("region", "patch"):
            raise ValueError(f"dates must be 'region' or 'patch', got {dates!r}")
        if outside not in ("error", "skip"):
            raise ValueError(f"outside must be 'error' or 'skip', got {outside!r}")
        self.pastis = PASTIS(root, split=split, protocol=protocol, fold_rotation=fold_rotation, modalities=("S2",),
                             num_dates=None, void_label=void_label, normalize=False, label_fraction=label_fraction,
                             seed=seed)
        self.void_label = void_label
        meta = gpd.read_file(self.pastis.metadata_path)
        geoms = {int(i): g for i, g in zip(meta["ID_PATCH"].astype(np.int64), meta.geometry)}
        src_crs = meta.crs
        by_day: dict[dt.date, int] = {}
        for i, t in enumerate(self.times):
            by_day.setdefault(t.date(), i)
        first, last = self.times[0].date(), self.times[-1].date()
        skipped = 0
        for k, patch in enumerate(self.pastis.patches):
            pid = patch["id_patch"]
            what = f"PASTIS patch {pid} ({self.pastis.metadata_path})"
            try:
                origin = polygon_origin(geoms[pid], src_crs, region, self.patch_size, what)
            except EODataError:
                if outside == "skip":
                    skipped += 1
                    continue
                raise
            if dates == "region":
                indices = list(range(len(self.times)))
            else:
                indices = []
                for d in patch["dates"]["S2"]:
                    if d not in by_day:
                        where = "outside" if (d < first or d > last) else "inside"
                        raise EODataError(f"{what}: S2 date {d.isoformat()} has no pretraining acquisition on that day "
                                          f"({where} the pretrained period {first}..{last})")
                    indices.append(by_day[d])
            if max_cloud is not None:
                indices = [t for t in indices if (self._cloud(*origin, t) or 0.0) <= max_cloud]
            if num_dates is not None and len(indices) > num_dates:
                indices = [indices[i] for i in np.round(np.linspace(0, len(indices) - 1, num_dates)).astype(int)]
            self.samples += [{"origin": origin, "time_index": t, "id": pid, "index": k} for t in indices]
        if skipped:
            logger.warning("LIANet PASTIS: skipped %d patch(es) outside the region %s", skipped, region.root)
        if not self.samples:
            raise EODataError(f"{root}: no PASTIS patch of split {split!r} lies in the region {region.root}")
        self._mask_cache: dict[int, np.ndarray] = {}

    @property
    def num_classes(self) -> int:
        return self.pastis.num_classes

    def _mask(self, sample: Mapping[str, Any]) -> np.ndarray:
        k = sample["index"]
        if k not in self._mask_cache:
            self._mask_cache[k] = self.pastis.load_mask(k)
        return self._mask_cache[k]


class LIANetBurnScars(_LIANetSamples):
    """HLS Burn Scars windows x their post-fire acquisition in a LIANet pretraining region.

    Args:
        root: the ``hls_burn_scars`` folder (``training/``, ``validation/``).
        region: the pretraining region.
        split: ``"train"`` (``training/``) or ``"val"``/``"test"`` (``validation/``), the original split.
        patch_size, stride: windows on each scene's reprojected 10 m mask.
        keep_unburned: keep windows without burned pixels (the reference drops them).
        max_gap_days: the paired acquisition is the first on or after the scene date within this many days.
        image: ``"placeholder"`` or ``"s2"``.
        require_data: drop windows with no-data pixels in the paired acquisition.
        label_fraction: fraction of the ``train`` scenes kept (labels-budget experiments, as
            :class:`HLSBurnScars`); val/test untouched.
        seed: seed of the ``label_fraction`` subsample.
    """

    classes = ("Not burned", "Burn scar")
    palette = BURN_PALETTE

    def __init__(self, root: str | Path, region: S2Region, split: str = "train", patch_size: int = 128,
                 stride: int | None = None, keep_unburned: bool = False, max_gap_days: float = 30.0,
                 image: str = "placeholder", require_data: bool = True, boa_offset: float = 1000.0,
                 label_fraction: float = 1.0, seed: int = 0) -> None:
        super().__init__(region, patch_size, image, boa_offset)
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if not 0.0 < label_fraction <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
        stride = int(stride or patch_size)
        if split == "train":  # the whole training/ folder: PANGAEA's train + val parts
            scenes = HLSBurnScars(root, split="train", normalize=False).scenes
            scenes = scenes + HLSBurnScars(root, split="val", normalize=False).scenes
            scenes = sorted(scenes, key=lambda s: str(s["image"]))
            if label_fraction < 1.0:
                kept = subsample_fraction(range(len(scenes)), label_fraction, seed)
                logger.info("LIANet BurnScars train: label_fraction=%s keeps %d of %d scenes", label_fraction,
                            len(kept), len(scenes))
                scenes = [scenes[i] for i in kept]
        else:
            scenes = HLSBurnScars(root, split="test", normalize=False).scenes
        self._masks: list[np.ndarray] = []
        outside = 0
        p = self.patch_size
        for scene in scenes:
            with rasterio.open(scene["mask"]) as src:
                mask, crs, transform = src.read(1), src.crs, src.transform
            if mask.dtype.kind == "f":
                mask = np.where(np.isnan(mask), -1, mask)
            what = f"HLS Burn Scars scene {scene['mask']}"
            warped = reproject_mask(mask, crs, transform, region, what)
            if warped is None:
                outside += 1
                continue
            arr, c0, r0 = warped
            t = self._pair(scene["date"], what, max_gap_days)
            m_id = len(self._masks)
            self._masks.append(arr)
            # window grid anchored at the scene's own top-left corner in the region grid
            sx, sy = _transformer(crs, region.crs, what).transform(*(transform * (0, 0)))
            sc, sr = region.pixel_of(sx, sy)
            gc, gr = int(np.round(sc)) - c0, int(np.round(sr)) - r0
            for i in range(gr % stride, arr.shape[0] - p + 1, stride):
                for j in range(gc % stride, arr.shape[1] - p + 1, stride):
                    win = arr[i:i + p, j:j + p]
                    if (win < 0).all() or (not keep_unburned and not (win == 1).any()):
                        continue
                    if require_data and not self._has_data(c0 + j, r0 + i, t):
                        continue
                    self.samples.append({"origin": (c0 + j, r0 + i), "time_index": t, "mask_id": m_id,
                                         "offset": (i, j), "id": f"{Path(scene['image']).name}@{i},{j}"})
        if outside:
            logger.warning("LIANet BurnScars: skipped %d scene(s) of %s outside the region %s", outside, root,
                           region.root)
        if not self.samples:
            raise EODataError(f"{root}: no {p}x{p} burn-scar window of split {split!r} lies in the region "
                              f"{region.root} (with data and burned pixels)")

    def _pair(self, date: dt.date, what: str, max_gap: float) -> int:
        ref = days_since_epoch(date)
        for i, d in enumerate(self.days):
            if d >= ref and d - ref <= max_gap + 1:
                return i
        raise EODataError(f"{what}: no pretraining acquisition within {max_gap:g} days after {date.isoformat()} "
                          f"(pretrained period {self.times[0].date()}..{self.times[-1].date()})")

    def _has_data(self, col: int, row: int, t: int) -> bool:
        when, p = self.times[t], self.patch_size
        for tile in self.region.tiles:
            tc, tr = col - tile.offset[0], row - tile.offset[1]
            path = dict(tile.files).get(when)
            if path is not None and 0 <= tc and 0 <= tr and tc + p <= tile.shape[1] and tr + p <= tile.shape[0]:
                with rasterio.open(path) as src:
                    return bool((src.read(1, window=Window(tc, tr, p, p)) != 0).all())
        return False

    @property
    def num_classes(self) -> int:
        return 2

    def _mask(self, sample: Mapping[str, Any]) -> np.ndarray:
        i, j = sample["offset"]
        return self._masks[sample["mask_id"]][i:i + self.patch_size, j:j + self.patch_size]
