"""Prediction maps as Cloud-Optimized GeoTIFFs: a Lightning prediction writer for ``terratorch predict``.

terratorch's own writer (``terratorch.cli_tools.CustomWriter``, a default callback of its CLI) copies the profile
of each sample's source GeoTIFF, so it fails for samples cut from ``.npy`` patches (PASTIS), region grids
(LIANet) or composites (GEDI chips). :class:`GeoTIFFPredictionWriter` instead reads the georeferencing that the
plugin's datamodules put in every predict batch under ``predict_meta`` (each sample's ``filename``, ``crs``,
``transform``, and the dataset's class legend), removes that entry before the model sees the batch, and writes
one COG per sample:

* class maps (integer predictions, e.g. terratorch's ``argmax``): ``uint8`` (``uint16`` beyond 255 classes) with
  a colour table, the class names in the tags (``class_names`` as JSON, ``CLASS_<i>`` per class) and nearest
  overviews;
* regression maps (floating predictions, one band per output channel): ``float32`` with ``nodata`` (non-finite
  values are written as ``nodata``) and averaged overviews.

Predictions without spatial dimensions (county-level CropNet yields) go to ``predictions.csv`` in the output
folder, one row per sample (named by ``predict_meta['filename']``, else by its dataset index), with the outputs
mapped back to target units where the batch gives the label statistics (``label_mean``, ``label_std``).

Output folder: ``output_dir``, else ``--predict_output_dir`` of ``terratorch predict``. An existing file is
replaced only when a previous run of this writer wrote it (tag ``TERRATORCH_EOPLUGINS=prediction``); any other
file of the same name stops the run. When this writer is among the trainer's callbacks it takes over from
terratorch's default writer during ``predict`` (both would write the same samples).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import rasterio
import rasterio.shutil
import torch
from affine import Affine
from lightning.pytorch.callbacks import BasePredictionWriter
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.io import MemoryFile
from torch import Tensor

from terratorch_eoplugins.errors import EODataError

__all__ = ["PREDICT_META_KEY", "GeoTIFFPredictionWriter", "write_prediction_cog"]

logger = logging.getLogger("terratorch_eoplugins.tasks.prediction_writer")

#: batch key the datamodules fill for ``predict`` (``terratorch_eoplugins.datasets.common.PREDICT_META_KEY``)
PREDICT_META_KEY = "predict_meta"
#: tag that marks a file as written by this writer (such files may be replaced by a later run)
OWNER_TAG = {"TERRATORCH_EOPLUGINS": "prediction"}
_SOURCE_SUFFIXES = {".tif", ".tiff", ".npy", ".npz", ".h5", ".hdf5", ".nc", ".jp2", ".zarr"}


def _safe_name(filename: str) -> str:
    """Output stem of a sample: its file name without a raster/array suffix, unsafe characters replaced."""
    name = Path(str(filename)).name
    if Path(name).suffix.lower() in _SOURCE_SUFFIXES:
        name = Path(name).stem
    name = re.sub(r"[^A-Za-z0-9._@,+=-]+", "-", name).strip("-.")
    return name or "sample"


def _owned_by_writer(path: Path) -> bool:
    try:
        with rasterio.open(path) as src:
            return src.tags().get("TERRATORCH_EOPLUGINS") == OWNER_TAG["TERRATORCH_EOPLUGINS"]
    except rasterio.errors.RasterioIOError:
        return False


def _parse_crs(crs: Any, where: str) -> CRS:
    try:
        return CRS.from_user_input(crs)
    except (CRSError, TypeError, ValueError) as err:
        raise EODataError(f"{where}: crs {str(crs)[:80]!r} is not a CRS (expected WKT or 'EPSG:<code>')") from err


def write_prediction_cog(path: str | Path, array: np.ndarray, crs: Any, transform: Sequence[float], *,
                         classes: bool, nodata: float = -9999.0, class_names: Sequence[str] | None = None,
                         colors: Sequence[Sequence[int]] | None = None, band_names: Sequence[str] | None = None,
                         tags: Mapping[str, str] | None = None, blocksize: int = 256,
                         compress: str = "DEFLATE") -> Path:
    """Write one prediction map ``array`` (``H x W`` or ``C x H x W``) as a Cloud-Optimized GeoTIFF.

    Args:
        path: output file (written through a temporary file in the same folder, then renamed).
        array: class ids (``classes=True``) or values.
        crs: the sample's CRS (WKT, ``EPSG:n`` or a rasterio CRS).
        transform: 6 affine coefficients ``(a, b, c, d, e, f)`` of the sample's pixel grid.
        classes: class ids as ``uint8``/``uint16`` with a colour table; otherwise ``float32`` with ``nodata``.
        nodata: no-data value of regression maps (non-finite values are written as it).
        class_names, colors: legend of class maps (names by class id, RGB 0-255 colours).
        band_names: band descriptions.
        tags: extra dataset tags.
        blocksize: COG tile size (a multiple of 16).
        compress: COG compression.
    """
    path = Path(path)
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{path}: a prediction map must be H x W or C x H x W, got shape {tuple(arr.shape)}")
    coeffs = [float(v) for v in transform][:6]
    singular = len(coeffs) == 6 and coeffs[0] * coeffs[4] - coeffs[1] * coeffs[3] == 0
    if len(coeffs) != 6 or not all(math.isfinite(v) for v in coeffs) or singular:
        raise EODataError(f"{path}: transform {list(transform)} is not 6 finite, invertible affine coefficients")
    all_tags = dict(OWNER_TAG)
    all_tags["kind"] = "classes" if classes else "regression"
    if classes:
        if arr.size and (arr.min() < 0 or not np.all(np.isfinite(arr))):
            raise ValueError(f"{path}: class ids must be non-negative integers, got minimum {arr.min()}")
        dtype = "uint8" if not arr.size or arr.max() <= 255 else "uint16"
        if class_names is not None and len(class_names) > 256:
            dtype = "uint16"
        arr = arr.astype(dtype)
        file_nodata = None
        if class_names:
            all_tags["class_names"] = json.dumps(list(class_names))
            all_tags.update({f"CLASS_{i}": str(n) for i, n in enumerate(class_names)})
    else:
        dtype = "float32"
        arr = arr.astype(np.float32)
        arr = np.where(np.isfinite(arr), arr, np.float32(nodata))
        file_nodata = float(nodata)
    all_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
    count, height, width = arr.shape
    profile = {"driver": "GTiff", "height": height, "width": width, "count": count, "dtype": dtype,
               "crs": _parse_crs(crs, str(path)), "transform": Affine(*coeffs), "nodata": file_nodata}
    tmp = path.with_name(f".{path.name}.tmp")
    with MemoryFile() as mem:
        with mem.open(**profile) as ds:
            ds.write(arr)
            if classes and dtype == "uint8":
                cmap = {i: (128, 128, 128, 255) for i in range(256)}
                for i, rgb in enumerate(colors or ()):
                    cmap[i] = (*(int(c) for c in rgb[:3]), 255)
                ds.write_colormap(1, cmap)
            ds.update_tags(**all_tags)
            for i, name in enumerate(band_names or (), start=1):
                if i <= count:
                    ds.set_band_description(i, str(name))
        with mem.open() as src:
            rasterio.shutil.copy(src, tmp, driver="COG", BLOCKSIZE=int(blocksize), COMPRESS=compress,
                                 OVERVIEW_RESAMPLING="NEAREST" if classes else "AVERAGE")
    os.replace(tmp, path)
    return path


def _outputs(prediction: Any) -> list[tuple[Tensor, str]]:
    """``(tensor, suffix)`` pairs of a ``predict_step`` result (terratorch's ``(y_hat, filenames)`` or a tensor)."""
    if prediction is None:
        return []
    if isinstance(prediction, Tensor):
        return [(prediction, "")]
    if isinstance(prediction, tuple) and len(prediction) == 2 and not isinstance(prediction[1], str):
        prediction = prediction[0]  # (y_hat, file names)
    if isinstance(prediction, Tensor):
        return [(prediction, "")]
    if isinstance(prediction, tuple) and len(prediction) == 2 and isinstance(prediction[1], str):
        return [(prediction[0], str(prediction[1]))]  # (y_hat, suffix)
    if isinstance(prediction, list):
        out = []
        for i, p in enumerate(prediction):
            out += [(t, s or f"{i}") for t, s in _outputs(p)]
        return out
    raise TypeError(f"GeoTIFFPredictionWriter: cannot read a prediction of type {type(prediction).__name__}; "
                    "expected a tensor, (tensor, file names), or a list of (tensor, suffix)")


class GeoTIFFPredictionWriter(BasePredictionWriter):
    """Write every predicted sample as a georeferenced Cloud-Optimized GeoTIFF (see the module docstring).

    Args:
        output_dir: output folder; ``None`` uses ``--predict_output_dir`` of ``terratorch predict``.
        nodata: no-data value of regression maps.
        suffix: appended to each sample's name (``<name>_<suffix>.tif``) unless the task names its output (terratorch's
            ``output_on_inference``: ``<name>_<output>.tif``).
        blocksize: COG tile size.
        compress: COG compression (``DEFLATE``, ``LZW``, ``ZSTD``...).
        replace_terratorch_writer: remove terratorch's default ``CustomWriter`` from the trainer during predict.
    """

    def __init__(self, output_dir: str | None = None, nodata: float = -9999.0, suffix: str = "pred",
                 blocksize: int = 256, compress: str = "DEFLATE", replace_terratorch_writer: bool = True) -> None:
        super().__init__(write_interval="batch")
        if blocksize < 16 or blocksize % 16:
            raise ValueError(f"blocksize must be a positive multiple of 16, got {blocksize}")
        self.output_dir = output_dir
        self.nodata, self.suffix, self.blocksize, self.compress = float(nodata), suffix, int(blocksize), compress
        self.replace_terratorch_writer = replace_terratorch_writer
        self._meta: dict[tuple[int, int], dict[str, Any]] = {}
        self._written: dict[Path, str] = {}
        self.written: list[Path] = []

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before ``predict``: forget earlier runs and take over from terratorch's default writer."""
        if stage != "predict":
            return
        self._meta, self._written, self.written = {}, {}, []
        if self.replace_terratorch_writer:
            others = [c for c in trainer.callbacks if type(c).__name__ == "CustomWriter"
                      and type(c).__module__.startswith("terratorch.")]
            if others:
                trainer.callbacks = [c for c in trainer.callbacks if all(c is not o for o in others)]
                logger.info("GeoTIFFPredictionWriter replaces terratorch's CustomWriter for this predict run")

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        """Take the georeferencing out of the batch, so that the model receives only its inputs."""
        if isinstance(batch, dict) and PREDICT_META_KEY in batch:
            self._meta[(dataloader_idx, batch_idx)] = batch.pop(PREDICT_META_KEY)

    def output_folder(self, trainer: pl.Trainer) -> Path:
        """``output_dir``, else the trainer's ``predict_output_dir`` (created if missing)."""
        out = self.output_dir if self.output_dir is not None else getattr(trainer, "predict_output_dir", None)
        if out is None:
            raise ValueError("GeoTIFFPredictionWriter: no output folder; pass `--predict_output_dir DIR` to "
                             "`terratorch predict` or set the callback's `output_dir`")
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        """Write the batch's predictions: one COG per sample, or rows of ``predictions.csv``."""
        meta = self._meta.pop((dataloader_idx, batch_idx), None)
        outputs = _outputs(prediction)
        if not outputs:
            return
        if meta is None and all(t.ndim <= 2 for t, _ in outputs):
            meta = self._row_meta(batch, batch_indices, batch_idx, len(outputs[0][0]))
        if meta is None:
            raise EODataError(f"predict batch {batch_idx} carries no {PREDICT_META_KEY!r} (the samples' filename, crs "
                              "and transform): use a datamodule of terratorch_eoplugins.datamodules, whose predict "
                              "batches carry it, or terratorch's CustomWriter for samples read from GeoTIFF files")
        out_dir = self.output_folder(trainer)
        for tensor, suffix in outputs:
            t = tensor.detach().cpu()
            t = t.float() if t.dtype in (torch.bfloat16, torch.float16) else t
            if t.ndim <= 2:
                self._write_rows(out_dir, t, suffix, meta, batch_idx)
            else:
                self._write_maps(out_dir, t, suffix, meta, batch_idx)

    # ------------------------------------------------------------------ writing
    @staticmethod
    def _row_meta(batch: Any, batch_indices: Sequence[int] | None, batch_idx: int, n: int) -> dict[str, Any]:
        """Names (dataset indices) and label statistics of a batch without ``predict_meta`` (scalar outputs)."""
        if batch_indices is not None and len(batch_indices) == n:
            names = [str(int(i)) for i in batch_indices]
        else:
            names = [f"batch{batch_idx}_{i}" for i in range(n)]
        meta: dict[str, Any] = {"filename": names}
        if isinstance(batch, Mapping) and "label_mean" in batch and "label_std" in batch:
            meta["label_mean"], meta["label_std"] = batch["label_mean"].tolist(), batch["label_std"].tolist()
        return meta

    def _names(self, meta: Mapping[str, Any], n: int, batch_idx: int) -> list[str]:
        names = meta.get("filename")
        if names is None or len(names) != n:
            raise EODataError(f"predict batch {batch_idx}: {PREDICT_META_KEY}['filename'] holds "
                              f"{None if names is None else len(names)} names for {n} predictions")
        return [str(x) for x in names]

    def _target(self, out_dir: Path, name: str, suffix: str, ext: str) -> Path:
        parts = [_safe_name(name), *([suffix or self.suffix] if suffix or self.suffix else [])]
        path = out_dir / ("_".join(parts) + ext)
        if path in self._written:
            raise EODataError(f"{path}: two samples of this predict run have the same name ({self._written[path]!r} "
                              f"and {name!r}); the datasets' 'filename' must be unique per sample")
        if path.exists() and not (ext == ".tif" and _owned_by_writer(path)):
            raise FileExistsError(f"{path} exists and was not written by GeoTIFFPredictionWriter; choose another "
                                  "--predict_output_dir or move the file away")
        self._written[path] = name
        return path

    def _write_maps(self, out_dir: Path, t: Tensor, suffix: str, meta: Mapping[str, Any], batch_idx: int) -> None:
        n = t.shape[0]
        names = self._names(meta, n, batch_idx)
        crs, transforms = meta.get("crs"), meta.get("transform")
        if crs is None or transforms is None or len(crs) != n or len(transforms) != n:
            raise EODataError(f"predict batch {batch_idx} ({names[0]}...): {PREDICT_META_KEY} needs 'crs' and "
                              f"'transform' for each of the {n} samples to write georeferenced maps")
        classes = not torch.is_floating_point(t)
        if classes and t.ndim == 4 and t.shape[1] == 1:
            t = t[:, 0]
        legend = meta.get("legend") or {}
        class_names, colors = (legend.get("names"), legend.get("colors")) if classes else (None, None)
        names_of_bands = legend.get("names") or []
        band_names = names_of_bands if not classes and t.ndim == 4 and len(names_of_bands) == t.shape[1] else None
        for i in range(n):
            path = self._target(out_dir, names[i], suffix, ".tif")
            write_prediction_cog(path, t[i].numpy(), crs[i], transforms[i], classes=classes, nodata=self.nodata,
                                 class_names=class_names, colors=colors, band_names=band_names,
                                 tags={"source": names[i]}, blocksize=self.blocksize, compress=self.compress)
            self.written.append(path)

    def _write_rows(self, out_dir: Path, t: Tensor, suffix: str, meta: Mapping[str, Any], batch_idx: int) -> None:
        values = t.double().reshape(t.shape[0], -1)
        n, k = values.shape
        names = self._names(meta, n, batch_idx)
        mean, std = meta.get("label_mean"), meta.get("label_std")
        scaled = None
        if mean is not None and std is not None:
            m = torch.as_tensor(mean, dtype=torch.float64).reshape(n, -1)
            s = torch.as_tensor(std, dtype=torch.float64).reshape(n, -1)
            if m.shape[1] == k:
                scaled = values * s + m
        path = out_dir / "_".join(p for p in ("predictions", suffix) if p)
        path = path.with_suffix(".csv")
        header = ["sample", *[f"output_{j}" for j in range(k)], *([f"prediction_{j}" for j in range(k)]
                                                                     if scaled is not None else [])]
        if path not in self._written:
            if path.exists():
                raise FileExistsError(f"{path} exists; choose another --predict_output_dir or move the file away")
            self._written[path] = "rows"
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(header)
            self.written.append(path)
        with path.open("a", newline="") as f:
            w = csv.writer(f)
            for i in range(n):
                row = [names[i], *(f"{v:.6g}" for v in values[i].tolist())]
                if scaled is not None:
                    row += [f"{v:.6g}" for v in scaled[i].tolist()]
                w.writerow(row)
