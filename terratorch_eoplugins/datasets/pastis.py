"""PASTIS / PASTIS-R: panoptic agricultural satellite time series (Garnot & Landrieu, 2021).

Reads the real PASTIS-R release (zenodo 5735646) unchanged::

    PASTIS-R/
      metadata.geojson                  one Feature per patch (EPSG:2154 polygon, ID_PATCH, Fold, TILE, dates-*)
      NORM_S2_patch.json  NORM_S1A_patch.json  NORM_S1D_patch.json   per-fold channel mean/std
      DATA_S2/S2_{ID}.npy               T x 10 x 128 x 128 int16
      DATA_S1A/S1A_{ID}.npy             T x 3 x 128 x 128 float16/float32 (VV, VH, VV-VH dB)
      DATA_S1D/S1D_{ID}.npy             T x 3 x 128 x 128 float16/float32
      ANNOTATIONS/TARGET_{ID}.npy       3 x 128 x 128 uint8, channel 0 = semantic class

Two split protocols: PANGAEA (train folds 1-3, val 4, test 5, 6 dates by ``linspace``) and the
official 5-fold cross-validation rotation of the U-TAE paper.
"""

from __future__ import annotations

import datetime as dt
import json
import mmap
import os
import re
import threading
import tokenize
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal

import geopandas as gpd
import numpy as np
import shapely
import torch
from matplotlib.figure import Figure
from pyproj import Transformer
from torch import Tensor
from torchgeo.datasets import NonGeoDataset

from terratorch_eoplugins.datasets._fused import convert_dates
from terratorch_eoplugins.datasets.common import bounds_transform, logger, plot_panels, subsample_fraction
from terratorch_eoplugins.errors import EODataError, check_array, require_dir, require_file

__all__ = ["PASTIS", "PASTIS_CLASSES", "PASTIS_PALETTE", "OFFICIAL_FOLD_ROTATIONS", "PANGAEA_FOLDS", "load_npy"]

PASTIS_CLASSES: tuple[str, ...] = (
    "Background", "Meadow", "Soft winter wheat", "Corn", "Winter barley", "Winter rapeseed", "Spring barley",
    "Sunflower", "Grapevine", "Beet", "Winter triticale", "Winter durum wheat", "Fruits, vegetables, flowers",
    "Potatoes", "Leguminous fodder", "Soybeans", "Orchard", "Mixed cereal", "Sorghum", "Void label",
)
VOID_CLASS = 19

# Fixed 20-colour palette (RGB in [0, 1]); background black, void light grey.
PASTIS_PALETTE: np.ndarray = np.array([
    (0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141),
    (230, 230, 230),
], dtype=np.float32) / 255.0

# (train, val, test) folds of the official 5-fold cross-validation (utae-paps ``train_semantic.py``).
OFFICIAL_FOLD_ROTATIONS: tuple[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...] = (
    ((1, 2, 3), (4,), (5,)),
    ((2, 3, 4), (5,), (1,)),
    ((3, 4, 5), (1,), (2,)),
    ((4, 5, 1), (2,), (3,)),
    ((5, 1, 2), (3,), (4,)),
)
PANGAEA_FOLDS = OFFICIAL_FOLD_ROTATIONS[0]
_SPLIT_POS = {"train": 0, "val": 1, "test": 2}

S2_BANDS: tuple[str, ...] = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
S1_BANDS: tuple[str, ...] = ("VV", "VH", "VV-VH")
_MODALITY_SPEC: dict[str, dict[str, Any]] = {
    "S2": {"bands": S2_BANDS, "dtypes": (np.int16,)},
    "S1A": {"bands": S1_BANDS, "dtypes": (np.float16, np.float32)},
    "S1D": {"bands": S1_BANDS, "dtypes": (np.float16, np.float32)},
}


def protocol_folds(protocol: str, fold_rotation: int = 0) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Return the (train, val, test) folds of a split protocol (``"pangaea"`` or ``"official"``)."""
    if protocol == "pangaea":
        if fold_rotation != 0:
            raise ValueError(
                f"fold_rotation={fold_rotation} is invalid for protocol='pangaea' (only rotation 0 exists)"
            )
        return PANGAEA_FOLDS
    if protocol == "official":
        if not isinstance(fold_rotation, (int, np.integer)) or not 0 <= fold_rotation < len(OFFICIAL_FOLD_ROTATIONS):
            raise ValueError(f"fold_rotation must be an int in 0..4 for protocol='official', got {fold_rotation!r}")
        return OFFICIAL_FOLD_ROTATIONS[int(fold_rotation)]
    raise ValueError(f"protocol must be 'pangaea' or 'official', got {protocol!r}")


def _check_folds(folds: Sequence[int], what: str) -> tuple[int, ...]:
    out = tuple(folds)
    if not out or any(not isinstance(f, (int, np.integer)) or isinstance(f, bool) or not 1 <= f <= 5 for f in out):
        raise ValueError(f"{what} must be a non-empty sequence of fold numbers in 1..5, got {list(out)!r}")
    return tuple(int(f) for f in out)


def _parse_date(value: Any, where: str) -> dt.date:
    """Parse a PASTIS date (YYYYMMDD as int or str; ISO strings accepted)."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    text = str(value).strip()
    try:
        if re.fullmatch(r"\d{8}", text):
            return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
        return dt.date.fromisoformat(text[:10])
    except ValueError:
        raise EODataError(f"{where}: invalid date {value!r}, expected YYYYMMDD") from None


def _parse_indexed(value: Any, where: str) -> list[Any]:
    """Parse a ``{"0": v0, "1": v1, ...}`` property (JSON string as GDAL may return it, dict, or list)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise EODataError(
                f'{where}: expected a JSON object {{"0": ..., "1": ...}}, got {value[:60]!r} ({err})'
            ) from None
    if isinstance(value, Mapping):
        try:
            items = sorted(((int(k), v) for k, v in value.items()), key=lambda kv: kv[0])
        except (TypeError, ValueError):
            raise EODataError(f'{where}: keys must be integer positions "0", "1", ..., got {list(value)[:5]}') from None
        if [k for k, _ in items] != list(range(len(items))):
            raise EODataError(f"{where}: keys must be the consecutive positions 0..{len(items) - 1}")
        return [v for _, v in items]
    if isinstance(value, (list, tuple, np.ndarray)):
        return list(value)
    raise EODataError(f"{where}: expected an object {{\"0\": ..., \"1\": ...}}, got {type(value).__name__} {value!r}")


def _npy_expected(what: str) -> str:
    return f"expected a numeric {what} array saved with numpy.save"


def _npy_layout(f: BinaryIO, path: Path, size: int, what: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Read and check the header of the open ``.npy`` file ``f`` of ``size`` bytes.

    Returns ``(shape, fortran_order, dtype, data_offset)``; raises :class:`EODataError` naming ``path`` for an
    empty, foreign, corrupt, object-dtype or truncated file (see :func:`load_npy`). ``OSError`` passes through.
    """
    expected = _npy_expected(what)
    if size == 0:
        raise EODataError(f"{path}: empty file (0 bytes); {expected}")
    if f.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
        raise EODataError(f"{path}: not a NumPy .npy file (it does not start with the \\x93NUMPY magic "
                          f"bytes); {expected}")
    f.seek(0)
    try:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran_order, dtype = read_header(f)
    # Python 3.12+ raises tokenize.TokenError on some garbled headers
    except (ValueError, EOFError, SyntaxError, TypeError, tokenize.TokenError) as err:
        raise EODataError(f"{path}: corrupt .npy header ({err}); {expected}") from None
    offset = f.tell()
    if dtype.hasobject:
        raise EODataError(f"{path}: holds Python objects (dtype {dtype}), which only unpickling could load; pickled "
                          f"data is never loaded: {expected}")
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < need:
        raise EODataError(f"{path}: truncated: {size} bytes, but its header announces a {'x'.join(map(str, shape))} "
                          f"{dtype} array ({need} bytes); the file was cut off (an interrupted copy or download?)")
    return tuple(shape), bool(fortran_order), dtype, offset


def load_npy(path: str | Path, what: str) -> np.ndarray:
    """Memory-map the array of a ``.npy`` file, never unpickling, with errors that name the file and the problem.

    numpy's own errors for broken files are misleading (an empty file: ``EOFError``; a truncated one: "mmap length is
    greater than file size"; pickled objects: a hint to pass ``allow_pickle=True``, which must never be done with
    data files). The header is read first, so an empty, foreign, corrupt, truncated or object-dtype file raises
    :class:`EODataError` naming it and what was expected (``what``: e.g. ``"PASTIS S2 patch"``).
    """
    path = Path(path)
    expected = _npy_expected(what)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            _npy_layout(f, path, size, what)
    except OSError as err:
        raise EODataError(f"{path}: cannot be read ({err.strerror or err}); {expected}") from None
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise EODataError(f"{path}: cannot be read as a .npy array ({type(err).__name__}: {err}); {expected}") from None


#: normalised values beyond this many standard deviations mean data and statistics at different scales
MAX_ABS_Z = 100.0
#: share of values allowed beyond :data:`MAX_ABS_Z` (isolated outliers) or outside a product's raw range
_OUTLIER_SHARE = 0.01
#: plausible raw value ranges: Sentinel-1 backscatter in dB
_S1_DB_RANGE = (-100.0, 60.0)


#: bytes of one read block of :meth:`PASTIS._load_modality` (whole dates, at least one): small enough that a block
#: and its float32 output stay in the CPU caches while they are cast, checked and normalised, large enough that the
#: per-block Python overhead stays small (1 MiB was the fastest of 256 KiB - 16 MiB on the demo world)
_BLOCK_BYTES = 1 << 20
_SCRATCH = threading.local()  # per-thread read buffer (datasets may be read from several threads)


def _scratch(nbytes: int) -> np.ndarray:
    """A reusable uint8 buffer of ``nbytes`` bytes, private to the calling thread (contents undefined)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _SCRATCH.buf = np.empty(max(nbytes, _BLOCK_BYTES), np.uint8)
    return buf[:nbytes]


def _read_exact(f: BinaryIO, out: np.ndarray, offset: int, path: Path) -> None:
    """Fill the contiguous array ``out`` with the bytes of ``f`` from ``offset`` on (``EODataError`` if short)."""
    view = memoryview(out).cast("B")
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise EODataError(f"{path}: ended after {offset + done} bytes while reading {len(view)} bytes from "
                              f"offset {offset}; the file is shorter than its header announces (changed while read?)")
        done += n


_HEAD_BYTES = 256  # first bytes of a .npy file read to find its header (numpy writes 64- or 128-byte headers)


def _npy_header_end(head: bytes) -> int:
    """Length of the ``.npy`` header (magic, version, length field and dictionary) at the start of ``head``, or 0
    when ``head`` does not hold a whole header of a known version."""
    magic = np.lib.format.MAGIC_PREFIX
    if len(head) < 12 or not head.startswith(magic):
        return 0
    major = head[len(magic)]
    if major == 1:
        end = 10 + int.from_bytes(head[8:10], "little")
    elif major in (2, 3):
        end = 12 + int.from_bytes(head[8:12], "little")
    else:
        return 0
    return end if end <= len(head) else 0


def _scatter_read(f: BinaryIO, block: np.ndarray, start: int) -> bool:
    """Read ``n`` consecutive ``C x H x W`` dates of ``f`` from byte ``start`` straight into the ``C x n x H x W``
    view ``block`` (same dtype) with one ``preadv``; ``False`` (nothing to trust) after a short read."""
    c, n = block.shape[:2]
    views = [memoryview(block[b, t]).cast("B") for t in range(n) for b in range(c)]
    return os.preadv(f.fileno(), views, start) == block.nbytes


#: read through a memory map of the file (no copy through a read buffer); ``False`` reads with ``preadv``/``readinto``
_USE_MMAP = hasattr(mmap, "MAP_SHARED")


def _map_dates(f: BinaryIO, shape: tuple[int, ...], dtype: np.dtype, offset: int) -> np.ndarray | None:
    """The ``T x C x H x W`` array at ``offset`` of ``f`` as a read-only view of a memory map of the file, or ``None``
    (memory maps off, or the file cannot be mapped: the caller reads it instead). The caller has checked the file's
    size against ``shape``; the map lives as long as a view of it."""
    if not _USE_MMAP:
        return None
    try:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):  # e.g. a pipe or a file system without mmap
        return None
    count = int(np.prod(shape, dtype=np.int64))
    if len(mm) < offset + count * dtype.itemsize:  # shrank since its size was checked
        mm.close()
        return None
    return np.frombuffer(mm, dtype=dtype, count=count, offset=offset).reshape(shape)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def pastis_num_classes(void_label: int | None) -> int:
    """Classes a model predicts: 19 when void (19) is remapped to ``void_label``, 20 when it is kept."""
    return len(PASTIS_CLASSES) if void_label in (None, VOID_CLASS) else len(PASTIS_CLASSES) - 1


class PASTIS(NonGeoDataset):
    """PASTIS-R semantic segmentation of crop types from Sentinel-2 / Sentinel-1 time series.

    Samples are dicts with

    * ``image``: float32 ``C x T x H x W`` (one modality) or ``{modality: C x T x H x W}``;
    * ``mask``: long ``H x W`` classes 0..18, void (19) mapped to ``void_label``;
    * ``dates``: int64 ``[T]`` days since ``reference_date`` (a dict per modality when several);
    * ``temporal_coords``: float32 ``T x 2`` (year, day of year) of S2 (else of the first modality);
    * ``location_coords``: float32 (lat, lon) of the patch centroid; ``crs``; ``bounds`` (minx, miny,
      maxx, maxy) in that CRS; ``transform``: float64 ``(6,)`` affine coefficients (a, b, c, d, e, f) of the
      patch's pixel grid, from its polygon's bounds; ``filename``: the patch's file of the first modality;
      ``id_patch``; ``fold``; ``tile``; ``cloud_cover`` (float32 ``[T]``, when the metadata has
      ``cloudcover-S2`` and S2 is loaded).
    """

    classes: tuple[str, ...] = PASTIS_CLASSES
    palette: np.ndarray = PASTIS_PALETTE
    patch_size: int = 128
    modality_bands: dict[str, tuple[str, ...]] = {m: s["bands"] for m, s in _MODALITY_SPEC.items()}
    metadata_filename = "metadata.geojson"
    norm_filename = "NORM_{modality}_patch.json"
    data_dirname = "DATA_{modality}"
    annotation_dirname = "ANNOTATIONS"
    #: normalise with the fused numba kernel (:mod:`._fused`); ``False``: numpy's passes (same values, slower)
    fused: bool = True

    def __init__(
        self,
        root: str | Path = "data/PASTIS-R",
        split: Literal["train", "val", "test"] | None = None,
        folds: Sequence[int] | None = None,
        protocol: Literal["pangaea", "official"] = "pangaea",
        fold_rotation: int = 0,
        modalities: Sequence[str] = ("S2",),
        num_dates: int | None = 6,
        void_label: int | None = -1,
        normalize: bool = True,
        norm_folds: Sequence[int] | None = None,
        reference_date: str = "2018-09-01",
        label_fraction: float = 1.0,
        seed: int = 0,
        transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        """Index the patches of a PASTIS-R tree.

        Args:
            root: the ``PASTIS-R`` directory.
            split: ``"train"``, ``"val"``, ``"test"`` of the protocol, or ``None`` for all folds.
            folds: explicit folds (1-5); override ``split``.
            protocol: ``"pangaea"`` (folds 1-3 / 4 / 5) or ``"official"`` (5-fold rotation).
            fold_rotation: index 0-4 of the official rotation (must be 0 for PANGAEA).
            modalities: any of ``"S2"``, ``"S1A"``, ``"S1D"``.
            num_dates: dates kept per modality, chosen by ``round(linspace(0, T-1, num_dates))``;
                ``None`` keeps all native dates (variable T, use batch size 1).
            void_label: value of the void class (19) in ``mask``; ``None`` keeps 19.
            normalize: standardise with the ``NORM_*_patch.json`` statistics averaged over ``norm_folds``.
            norm_folds: folds whose statistics are averaged (default: the protocol's train folds).
            reference_date: ISO date that ``dates`` count days from.
            label_fraction: fraction (0, 1] of the split's patches kept, chosen by ``seed``.
            seed: seed of the ``label_fraction`` subset.
            transforms: callable applied to each sample dict.
        """
        self.root = require_dir(root, "PASTIS-R root directory")
        mods = [str(m).upper() for m in modalities] if not isinstance(modalities, str) else [modalities.upper()]
        unknown = [m for m in mods if m not in _MODALITY_SPEC]
        if not mods or unknown or len(set(mods)) != len(mods):
            raise ValueError(
                f"modalities must be distinct values among {list(_MODALITY_SPEC)}, got {list(modalities)!r}"
            )
        self.modalities: tuple[str, ...] = tuple(mods)
        if num_dates is not None and (not isinstance(num_dates, (int, np.integer)) or num_dates < 1):
            raise ValueError(f"num_dates must be a positive int or None, got {num_dates!r}")
        self.num_dates = None if num_dates is None else int(num_dates)
        if void_label is not None and 0 <= void_label < VOID_CLASS:
            raise ValueError(f"void_label={void_label} collides with a crop class (0..18); use -1, 19, 255 or None")
        self.void_label = void_label
        try:
            self.reference_date = dt.date.fromisoformat(reference_date)
        except (TypeError, ValueError):
            raise ValueError(f"reference_date must be an ISO date 'YYYY-MM-DD', got {reference_date!r}") from None
        if split is not None and split not in _SPLIT_POS:
            raise ValueError(f"split must be 'train', 'val', 'test' or None, got {split!r}")
        rotation = protocol_folds(protocol, fold_rotation)
        self.protocol, self.fold_rotation, self.split = protocol, int(fold_rotation), split
        if folds is not None:
            self.folds = _check_folds(folds, "folds")
        elif split is not None:
            self.folds = rotation[_SPLIT_POS[split]]
        else:
            self.folds = (1, 2, 3, 4, 5)
        self.norm_folds = _check_folds(norm_folds, "norm_folds") if norm_folds is not None else rotation[0]
        self.normalize = normalize
        self.transforms = transforms
        self._range_safe_cache: dict[tuple[str, str], bool] = {}
        self._layout_cache: dict[tuple[Any, ...], tuple[tuple[int, ...], bool, np.dtype, int, int]] = {}

        self.data_dirs = {m: require_dir(self.root / self.data_dirname.format(modality=m), f"PASTIS {m} folder")
                          for m in self.modalities}
        self.annotation_dir = require_dir(self.root / self.annotation_dirname, "PASTIS annotation folder")
        self.metadata_path = require_file(self.root / self.metadata_filename, "PASTIS metadata file")
        self.norm_stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if normalize:
            for m in self.modalities:
                self.norm_stats[m] = self._load_norm(m)

        self._index_patches()
        keep = subsample_fraction(range(len(self.patches)), label_fraction, seed)
        self.patches = [self.patches[i] for i in keep]
        self.label_fraction, self.seed = label_fraction, seed

    # ------------------------------------------------------------------ metadata
    def _load_norm(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
        path = require_file(
            self.root / self.norm_filename.format(modality=modality), f"PASTIS {modality} normalisation file"
        )
        try:
            stats = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise EODataError(f"{path}: not valid JSON ({err})") from None
        n_bands = len(_MODALITY_SPEC[modality]["bands"])
        means, stds = [], []
        for f in self.norm_folds:
            key = f"Fold_{f}"
            entry = stats.get(key) if isinstance(stats, Mapping) else None
            if not isinstance(entry, Mapping) or "mean" not in entry or "std" not in entry:
                raise EODataError(
                    f"{path}: missing {key!r} with 'mean' and 'std' (needed for norm folds {list(self.norm_folds)})"
                )
            mean, std = np.asarray(entry["mean"], np.float64), np.asarray(entry["std"], np.float64)
            if mean.shape != (n_bands,) or std.shape != (n_bands,):
                raise EODataError(f"{path}: {key} mean/std must have {n_bands} values ({modality} bands), "
                                  f"got {mean.size} and {std.size}")
            means.append(mean)
            stds.append(std)
        mean, std = np.mean(means, axis=0), np.mean(stds, axis=0)
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
            raise EODataError(
                f"{path}: mean/std must be finite with std > 0, got mean={mean.tolist()} std={std.tolist()}"
            )
        return mean.astype(np.float32), std.astype(np.float32)

    def _index_patches(self) -> None:
        meta_path = self.metadata_path
        try:
            gdf = gpd.read_file(meta_path)
        except Exception as err:  # pyogrio raises several error types for unreadable files
            raise EODataError(f"{meta_path}: cannot be read as GeoJSON ({err})") from None
        required = ["ID_PATCH", "Fold"] + [f"dates-{m}" for m in self.modalities]
        missing = [c for c in required if c not in gdf.columns]
        if missing:
            raise EODataError(f"{meta_path}: missing field(s) {missing}; expected properties {required}")
        if gdf.crs is None:
            raise EODataError(f"{meta_path}: no CRS; expected the patch polygons in a known CRS (EPSG:2154)")
        epsg = gdf.crs.to_epsg()
        self.crs = f"EPSG:{epsg}" if epsg is not None else gdf.crs.to_string()
        if len(gdf) == 0:
            raise EODataError(f"{meta_path}: contains no patch feature")

        folds = gdf["Fold"]
        if folds.isna().any():
            raise EODataError(f"{meta_path}: field 'Fold' is empty for {int(folds.isna().sum())} patch(es)")
        ids = gdf["ID_PATCH"]
        if ids.isna().any():
            raise EODataError(f"{meta_path}: field 'ID_PATCH' is empty for {int(ids.isna().sum())} patch(es)")
        ids = ids.astype(np.int64)
        dup = ids[ids.duplicated()].unique()
        if len(dup):
            raise EODataError(f"{meta_path}: duplicated ID_PATCH values {sorted(dup.tolist())[:10]}")
        selected = gdf[folds.astype(np.int64).isin(self.folds)].copy()
        if len(selected) == 0:
            raise EODataError(f"{meta_path}: no patch in folds {list(self.folds)} (split={self.split!r}); "
                              f"folds present: {sorted(set(folds.astype(int).tolist()))}")
        selected["ID_PATCH"] = ids[selected.index]
        selected = selected.sort_values("ID_PATCH")

        geoms = selected.geometry
        bad = geoms.isna() | geoms.is_empty
        if bad.any():
            raise EODataError(
                f"{meta_path}: missing/empty geometry for ID_PATCH {selected['ID_PATCH'][bad].tolist()[:10]}"
            )
        bounds = geoms.bounds.to_numpy(np.float64)
        centroid = shapely.centroid(geoms.to_numpy())  # planar centroid in the file's CRS
        to_wgs84 = Transformer.from_crs(gdf.crs, "EPSG:4326", always_xy=True)
        lon, lat = to_wgs84.transform(shapely.get_x(centroid), shapely.get_y(centroid))
        lon, lat = np.asarray(lon, np.float64), np.asarray(lat, np.float64)
        if not (np.all(np.isfinite(lon)) and np.all(np.isfinite(lat))
                and np.all(np.abs(lat) <= 90) and np.all(np.abs(lon) <= 180)):
            raise EODataError(f"{meta_path}: patch centroids are not valid coordinates in the file's CRS {self.crs} "
                              "(no or wrong 'crs' member?); expected the polygons in EPSG:2154")

        has_cloud = "cloudcover-S2" in selected.columns and "S2" in self.modalities
        has_tile = "TILE" in selected.columns
        self.patches: list[dict[str, Any]] = []
        for k, (_, row) in enumerate(selected.iterrows()):
            pid = int(row["ID_PATCH"])
            patch: dict[str, Any] = {
                "id_patch": pid,
                "fold": int(row["Fold"]),
                "tile": str(row["TILE"]) if has_tile and not _is_missing(row["TILE"]) else "",
                "bounds": bounds[k],
                "location": np.array([lat[k], lon[k]], np.float32),
                "dates": {},
                "files": {},
            }
            for m in self.modalities:
                field = f"dates-{m}"
                where = f"{meta_path} (ID_PATCH {pid}, field {field!r})"
                if _is_missing(row[field]):
                    raise EODataError(f"{where}: no dates")
                patch["dates"][m] = [_parse_date(v, where) for v in _parse_indexed(row[field], where)]
                if not patch["dates"][m]:
                    raise EODataError(f"{where}: empty date list")
                patch["files"][m] = self.data_dirs[m] / f"{m}_{pid}.npy"
            if has_cloud and not _is_missing(row["cloudcover-S2"]):
                where = f"{meta_path} (ID_PATCH {pid}, field 'cloudcover-S2')"
                cc = np.asarray(_parse_indexed(row["cloudcover-S2"], where), dtype=np.float32)
                if cc.shape != (len(patch["dates"]["S2"]),):
                    raise EODataError(f"{where}: {cc.size} values for {len(patch['dates']['S2'])} S2 dates")
                patch["cloud_cover"] = cc
            elif has_cloud:
                patch["cloud_cover"] = np.full(len(patch["dates"]["S2"]), np.nan, np.float32)
            patch["files"]["TARGET"] = self.annotation_dir / f"TARGET_{pid}.npy"
            self.patches.append(patch)
        logger.debug("PASTIS %s: %d patches in folds %s", self.root, len(self.patches), list(self.folds))

    # ------------------------------------------------------------------ access
    @property
    def num_classes(self) -> int:
        """Number of classes the model predicts: 19 when void is mapped away, 20 otherwise."""
        return pastis_num_classes(self.void_label)

    @property
    def class_names(self) -> list[str]:
        """Names of the ``num_classes`` predicted classes."""
        return list(PASTIS_CLASSES[: self.num_classes])

    @property
    def ids(self) -> list[int]:
        """ID_PATCH of each sample, in sample order."""
        return [p["id_patch"] for p in self.patches]

    def __len__(self) -> int:
        """Number of patches."""
        return len(self.patches)

    def date_indices(self, t: int) -> np.ndarray:
        """Indices of the dates kept out of ``t`` native dates (``round(linspace(0, t-1, num_dates))``)."""
        if self.num_dates is None:
            return np.arange(t)
        return np.round(np.linspace(0, t - 1, self.num_dates)).astype(np.int64)

    def _range_safe(self, m: str, dtype: np.dtype) -> bool:
        """Whether every value of integer ``dtype`` normalises to ``|z| <= MAX_ABS_Z`` with ``m``'s statistics.

        Then the scale check cannot fail for any array of that dtype (e.g. int16 S2 with the release's
        statistics) and needs no pass over the data.
        """
        key = (m, dtype.str)
        safe = self._range_safe_cache.get(key)
        if safe is None:
            mean, std = self.norm_stats[m]
            info = np.iinfo(dtype)
            ends = np.array([info.min, info.max], dtype).astype(np.float32)
            z = (ends[:, None] - mean[None]) / std[None]
            safe = self._range_safe_cache[key] = bool(np.all(np.abs(z) <= MAX_ABS_Z))
        return safe

    def _checked_layout(self, f: BinaryIO, path: Path, what: str, ndim: int, shape: Sequence[int | None],
                        dtypes: Sequence[Any]) -> tuple[tuple[int, ...], bool, np.dtype, int]:
        """:func:`_npy_layout` of the open file ``f``, checked by :func:`check_array` against ``ndim``, ``shape``
        and ``dtypes``. A header already parsed and checked (same bytes, same expectations) is not parsed again;
        the file's size is checked against it every time."""
        size = os.fstat(f.fileno()).st_size
        head = f.read(_HEAD_BYTES)
        end = _npy_header_end(head)
        key = (head[:end], ndim, tuple(shape), tuple(dtypes)) if end else None
        hit = self._layout_cache.get(key) if key is not None else None
        if hit is not None and size >= hit[4]:
            return hit[:4]
        f.seek(0)
        layout = _npy_layout(f, path, size, what)
        check_array(np.broadcast_to(np.zeros((), layout[2]), layout[0]), path, ndim=ndim, shape=shape, dtypes=dtypes)
        if key is not None and f.tell() == end:
            if len(self._layout_cache) >= 4096:
                self._layout_cache.clear()
            need = layout[3] + int(np.prod(layout[0], dtype=np.int64)) * layout[2].itemsize
            self._layout_cache[key] = (*layout, need)
        return layout

    def _load_modality(self, patch: dict[str, Any], m: str) -> tuple[np.ndarray, np.ndarray]:
        """Read the kept dates of modality ``m`` as float32 ``C x T x H x W`` (normalised when asked).

        Reads only the kept dates, in blocks of consecutive dates, from a memory map of the file (without one:
        float32 with one ``preadv`` straight into the ``C x T`` output, other dtypes through a small per-thread
        buffer), and casts, transposes and normalises each block in one fused pass (:mod:`._fused`): the same
        float32 operations in the same order as :meth:`_load_modality_exact`, so the values are bit-identical.
        The value checks use the blocks' minimum and maximum (the normalisation is monotone); when they cannot
        prove that a check passes, the exact reader runs and decides (same errors, same values).
        """
        path = require_file(patch["files"][m], f"PASTIS {m} patch file")
        what = f"PASTIS {m} patch"
        n_bands = len(_MODALITY_SPEC[m]["bands"])
        try:
            with open(path, "rb") as f:
                shape, fortran, dtype, offset = self._checked_layout(
                    f, path, what, 4, (None, n_bands, self.patch_size, self.patch_size), _MODALITY_SPEC[m]["dtypes"])
                t = len(patch["dates"][m])
                if shape[0] != t:
                    raise EODataError(f"{path}: {shape[0]} dates in the array but {t} in {self.metadata_path} "
                                      f"(ID_PATCH {patch['id_patch']}, field 'dates-{m}')")
                if fortran or not dtype.isnative:
                    return self._load_modality_exact(patch, m)
                idx = self.date_indices(t)
                x, lo, hi = self._read_dates(f, path, shape, dtype, offset, idx, m)
        except OSError as err:
            raise EODataError(f"{path}: cannot be read ({err.strerror or err}); {_npy_expected(what)}") from None
        if lo is not None and not self._checks_pass(m, dtype, lo, hi):
            return self._load_modality_exact(patch, m)
        return x, idx

    def _read_dates(self, f: BinaryIO, path: Path, shape: tuple[int, ...], dtype: np.dtype, offset: int,
                    idx: np.ndarray, m: str) -> tuple[np.ndarray, np.float32 | None, np.float32 | None]:
        """Dates ``idx`` of the ``T x C x H x W`` array at ``offset`` of ``f`` as float32 ``C x T' x H x W``.

        Also returns the minimum and maximum raw value (as float32) when a value check needs them, else ``None``.
        """
        _, c, h, w = shape
        date_bytes = c * h * w * dtype.itemsize
        per_block = max(1, _BLOCK_BYTES // date_bytes)
        out = np.empty((c, len(idx), h, w), np.float32)
        flat = out.reshape(c, len(idx), h * w)
        norm = self.norm_stats[m] if self.normalize else None
        need_range = (dtype.kind == "f" or m != "S2"
                      or (norm is not None and not (dtype.kind in "iu" and self._range_safe(m, dtype))))
        mapped = _map_dates(f, shape, dtype, offset)  # the page cache itself: no copy into a buffer first
        direct = mapped is None and dtype == np.float32 and hasattr(os, "preadv")  # straight into the output
        lows: list[np.ndarray] = []
        highs: list[np.ndarray] = []
        if mapped is not None and self.fused:  # every kept date in one kernel call, row by row while in cache
            extremes = convert_dates(mapped.reshape(shape[0], c, h * w), flat, 0, norm, need_range, dates=idx)
            if extremes is None:
                return out, None, None
            return out, extremes[0], extremes[1]
        j = 0
        while j < len(idx):
            # a run of consecutive dates, at most per_block of them
            n = 1
            while n < per_block and j + n < len(idx) and idx[j + n] == idx[j] + n:
                n += 1
            block = out[:, j:j + n]
            start = offset + int(idx[j]) * date_bytes
            raw: np.ndarray | None = None  # the dates as stored, n x C x H x W (None: already in ``block``)
            if mapped is not None:
                raw = mapped[int(idx[j]):int(idx[j]) + n]
            elif not (direct and _scatter_read(f, block, start)):
                raw = _scratch(n * date_bytes).view(dtype).reshape(n, c, h, w)
                _read_exact(f, raw, start, path)
            # one fused pass: cast, normalise (the same float32 values as casting first, then (x - mean) / std)
            # and the raw extremes (the cast to float32 is monotone, so these are the float32 block's);
            # in place when the dates were read straight into the output
            src = flat[:, j:j + n].transpose(1, 0, 2) if raw is None else raw.reshape(n, c, h * w)
            extremes = convert_dates(src, flat, j, norm, need_range, fused=self.fused and raw is not None)
            if extremes is not None:
                lows.append(extremes[0])
                highs.append(extremes[1])
            j += n
        if not need_range or not lows:
            return out, None, None
        return out, np.min(lows), np.max(highs)

    def _checks_pass(self, m: str, dtype: np.dtype, lo: np.float32, hi: np.float32) -> bool:
        """Whether the raw range ``[lo, hi]`` proves that :meth:`_load_modality_exact`'s checks all pass."""
        if not (np.isfinite(lo) and np.isfinite(hi)):
            return False
        if m != "S2" and not (lo >= _S1_DB_RANGE[0] and hi <= _S1_DB_RANGE[1]):
            return False
        if self.normalize and not (dtype.kind in "iu" and self._range_safe(m, dtype)):
            mean, std = self.norm_stats[m]
            z_lo = (np.float32(lo) - mean) / std  # the same float32 operations as the samples' normalisation
            z_hi = (np.float32(hi) - mean) / std
            if not (np.all(z_lo >= -MAX_ABS_Z) and np.all(z_hi <= MAX_ABS_Z)):
                return False
        return True

    def _load_mask(self, patch: dict[str, Any]) -> np.ndarray:
        """Channel 0 of the patch's TARGET file as int64 ``H x W``, void mapped to ``void_label``."""
        path = require_file(patch["files"]["TARGET"], "PASTIS annotation file")
        what = "PASTIS annotation (TARGET)"
        size = self.patch_size
        try:
            with open(path, "rb") as f:
                shape, fortran, dtype, offset = self._checked_layout(f, path, what, 3, (None, size, size), (np.uint8,))
                if fortran or shape[0] == 0:
                    return self._load_mask_exact(patch)
                raw = np.empty((size, size), np.uint8)
                _read_exact(f, raw, offset, path)
        except OSError as err:
            raise EODataError(f"{path}: cannot be read ({err.strerror or err}); {_npy_expected(what)}") from None
        top = int(raw.max())
        if top > VOID_CLASS:
            raise EODataError(f"{path}: semantic classes must be in 0..19, found {top}")
        sem = raw.astype(np.int64)
        if self.void_label is not None:
            void = raw == VOID_CLASS
            if void.all():
                raise EODataError(f"{path}: every pixel of channel 0 is the void class ({VOID_CLASS}), so no pixel has "
                                  "a label (its loss would be NaN); expected crop classes 0..18 in the patch")
            sem[void] = self.void_label
        return sem

    def _load_modality_exact(self, patch: dict[str, Any], m: str) -> tuple[np.ndarray, np.ndarray]:
        """The reference reader: every check on the whole array (the fast path's fallback)."""
        path = require_file(patch["files"][m], f"PASTIS {m} patch file")
        arr = load_npy(path, f"PASTIS {m} patch")
        n_bands = len(_MODALITY_SPEC[m]["bands"])
        check_array(arr, path, ndim=4, shape=(None, n_bands, self.patch_size, self.patch_size),
                    dtypes=_MODALITY_SPEC[m]["dtypes"])
        t = len(patch["dates"][m])
        if arr.shape[0] != t:
            raise EODataError(f"{path}: {arr.shape[0]} dates in the array but {t} in {self.metadata_path} "
                              f"(ID_PATCH {patch['id_patch']}, field 'dates-{m}')")
        idx = self.date_indices(t)
        x = np.asarray(arr[idx], dtype=np.float32)
        if not np.all(np.isfinite(x)):
            raise EODataError(f"{path}: contains NaN/inf values; expected finite {m} data")
        x = x.transpose(1, 0, 2, 3)  # C x T x H x W
        if m != "S2" and np.mean((x < _S1_DB_RANGE[0]) | (x > _S1_DB_RANGE[1])) > _OUTLIER_SHARE:
            raise EODataError(f"{path}: values outside {list(_S1_DB_RANGE)} (range {float(x.min()):.4g} to "
                              f"{float(x.max()):.4g}); expected {m} backscatter in dB (VV, VH, VV-VH)")
        if self.normalize:
            mean, std = self.norm_stats[m]
            x = (x - mean[:, None, None, None]) / std[:, None, None, None]
            share = float(np.mean(np.abs(x) > MAX_ABS_Z))
            if share > _OUTLIER_SHARE:
                norm = self.root / self.norm_filename.format(modality=m)
                raise EODataError(f"{path}: {share:.0%} of the values lie more than {MAX_ABS_Z:g} standard deviations "
                                  f"from the means of {norm} (largest |z| {float(np.abs(x).max()):.3g}); the patch "
                                  "and its statistics are at different scales (e.g. reflectance 0-1 vs digital "
                                  "numbers 0-10000); expected both in the units of the PASTIS-R release")
        return np.ascontiguousarray(x), idx

    def _load_mask_exact(self, patch: dict[str, Any]) -> np.ndarray:
        """The reference mask reader (memory map of the whole file; the fast path's fallback)."""
        path = require_file(patch["files"]["TARGET"], "PASTIS annotation file")
        arr = load_npy(path, "PASTIS annotation (TARGET)")
        check_array(arr, path, ndim=3, shape=(None, self.patch_size, self.patch_size), dtypes=(np.uint8,))
        sem = np.asarray(arr[0]).astype(np.int64)
        if sem.max() > VOID_CLASS:
            raise EODataError(f"{path}: semantic classes must be in 0..19, found {int(sem.max())}")
        if self.void_label is not None:
            if (sem == VOID_CLASS).all():
                raise EODataError(f"{path}: every pixel of channel 0 is the void class ({VOID_CLASS}), so no pixel has "
                                  "a label (its loss would be NaN); expected crop classes 0..18 in the patch")
            sem[sem == VOID_CLASS] = self.void_label
        return sem

    def load_mask(self, index: int) -> np.ndarray:
        """Semantic mask ``H x W`` (int64, void mapped to ``void_label``) of patch ``index``, without its images."""
        return self._load_mask(self.patches[index])

    @staticmethod
    def _date_codes(patch: dict[str, Any], m: str) -> np.ndarray:
        """int64 ``T x 3`` (proleptic ordinal, year, day of year) of the patch's ``m`` dates, computed once."""
        codes = patch.setdefault("date_codes", {})
        out = codes.get(m)
        if out is None:
            out = codes[m] = np.array([[d.toordinal(), d.year, d.timetuple().tm_yday] for d in patch["dates"][m]],
                                      np.int64).reshape(-1, 3)
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Load sample ``index`` (see the class docstring for the keys)."""
        patch = self.patches[index]
        images, dates, times = {}, {}, {}
        for m in self.modalities:
            x, idx = self._load_modality(patch, m)
            images[m] = torch.from_numpy(x)
            codes = self._date_codes(patch, m)[idx]
            dates[m] = torch.from_numpy(codes[:, 0] - self.reference_date.toordinal())
            times[m] = torch.from_numpy(codes[:, 1:].astype(np.float32))
            if m == "S2" and "cloud_cover" in patch:
                cloud = torch.from_numpy(patch["cloud_cover"][idx].copy())
        single = len(self.modalities) == 1
        first = "S2" if "S2" in self.modalities else self.modalities[0]
        sample: dict[str, Any] = {
            "image": images[first] if single else images,
            "mask": torch.from_numpy(self._load_mask(patch)),
            "dates": dates[first] if single else dates,
            "temporal_coords": times[first],
            "location_coords": torch.from_numpy(patch["location"].copy()),
            "crs": self.crs,
            "bounds": torch.from_numpy(patch["bounds"].copy()),
            "transform": torch.tensor(bounds_transform(patch["bounds"], self.patch_size, self.patch_size),
                                      dtype=torch.float64),
            "filename": str(patch["files"][first]),
            "id_patch": patch["id_patch"],
            "fold": patch["fold"],
            "tile": patch["tile"],
        }
        if "cloud_cover" in patch:
            sample["cloud_cover"] = cloud
        if self.transforms is not None:
            sample = self.transforms(sample)
        return sample

    # ------------------------------------------------------------------ plotting
    @staticmethod
    def _stretch(rgb: np.ndarray) -> np.ndarray:
        out = np.empty_like(rgb, dtype=np.float32)
        for c in range(rgb.shape[-1]):
            lo, hi = np.percentile(rgb[..., c], (2, 98))
            out[..., c] = np.clip((rgb[..., c] - lo) / max(hi - lo, 1e-6), 0, 1)
        return out

    def _colorize(self, labels: np.ndarray) -> np.ndarray:
        lab = labels.astype(np.int64).copy()
        if self.void_label is not None:
            lab[lab == self.void_label] = VOID_CLASS
        lab[(lab < 0) | (lab > VOID_CLASS)] = VOID_CLASS
        return PASTIS_PALETTE[lab]

    def plot(self, sample: Mapping[str, Any], show_titles: bool = True, suptitle: str | None = None,
             date_index: int | None = None) -> Figure:
        """Plot one date of the time series (S2 RGB B4/B3/B2, or S1 VV/VH/VV-VH), the mask and ``prediction``.

        Args:
            sample: a sample from :meth:`__getitem__` (optionally with ``prediction``: ``H x W`` labels
                or ``K x H x W`` scores).
            show_titles: add panel titles.
            suptitle: optional figure title.
            date_index: which date to show (default: the middle one).
        """
        if "image" in sample:
            image = sample["image"]
        else:  # terratorch's plot_sample moves a multi-modal ``image`` dict's entries to the sample's top level
            image = {m: sample[m] for m in self.modalities if m in sample}
            if not image:
                raise KeyError(f"PASTIS.plot: the sample has no 'image' and none of the modalities "
                               f"{list(self.modalities)}; keys: {sorted(sample)}")
        if isinstance(image, Mapping):
            modality = "S2" if "S2" in image else next(iter(image))
            image = image[modality]
        else:
            modality = "S2" if "S2" in self.modalities else self.modalities[0]
        image = np.asarray(image.detach().cpu() if isinstance(image, Tensor) else image, dtype=np.float32)
        if image.ndim == 3:  # C x H x W
            image = image[:, None]
        t = image.shape[1]
        di = t // 2 if date_index is None else date_index
        if not -t <= di < t:
            raise ValueError(f"date_index={date_index} out of range for {t} dates")
        channels = (2, 1, 0) if modality == "S2" else (0, 1, 2)
        rgb = self._stretch(image[list(channels), di].transpose(1, 2, 0))

        panels: list[tuple[np.ndarray, str]] = [(rgb, f"{modality} {'RGB' if modality == 'S2' else 'VV/VH/ratio'}")]
        dates = sample.get("dates")
        if isinstance(dates, Mapping):
            dates = dates.get(modality)
        if dates is not None:
            day = int(np.asarray(dates)[di])
            panels[0] = (rgb, panels[0][1] + f" {(self.reference_date + dt.timedelta(days=day)).isoformat()}")
        if "mask" in sample:
            panels.append((self._colorize(np.asarray(sample["mask"])), "Mask"))
        if "prediction" in sample:
            pred = np.asarray(sample["prediction"].detach().cpu() if isinstance(sample["prediction"], Tensor)
                              else sample["prediction"])
            if pred.ndim == 3:
                pred = pred.argmax(0)
            panels.append((self._colorize(pred), "Prediction"))

        return plot_panels(panels, show_titles, suptitle)
