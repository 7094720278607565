"""Fault injection: every broken input raises the package's error type with a message naming the culprit.

Valid files come from the tiny synthetic world (``tiny_world_dir``). Each test mirrors the product it needs into
``tmp_path`` as symbolic links, then *replaces* one link by a broken file (the session's world is never written),
and checks the exception type and that the message names the file, field or argument and what was expected.
Where real data legitimately contains the fault (CropNet dates of another grid, GEDI shots without samples), the
expected behaviour is a logged, counted skip instead of an error.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from terratorch_eoplugins.errors import EODataError, EODatasetNotFoundError


# ============================================================================================= helpers
def _mirror(src: Path, dst: Path) -> Path:
    """``dst``: the folders of ``src`` with every file a symbolic link to the original (cheap to corrupt one)."""
    for p in sorted(src.rglob("*")):
        target = dst / p.relative_to(src)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(p, target)
    return dst


def _put(path: Path, data: bytes | str) -> Path:
    """Replace ``path`` (a link into the session world) by a new file with ``data``."""
    path.unlink(missing_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _own(path: Path) -> Path:
    """Replace the link ``path`` by a private copy of its target (to edit it in place)."""
    data = path.read_bytes()
    return _put(path, data)


def _save_npy(path: Path, arr: np.ndarray, allow_pickle: bool = False) -> Path:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=allow_pickle)
    return path


def _fails(exc: type[BaseException], fn: Callable[[], object], *culprits: object) -> str:
    """Run ``fn``; it must raise ``exc`` whose message contains every culprit (path, field, expectation)."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for c in culprits:
        assert str(c) in msg, f"{c!r} not named in: {msg}"
    return msg


# ============================================================================================= PASTIS
@pytest.fixture
def pastis(tiny_world_dir: Path, tmp_path: Path) -> Path:
    return _mirror(tiny_world_dir / "PASTIS-R", tmp_path / "PASTIS-R")


def _pastis_item(root: Path, pid: int | None = None, modalities: tuple[str, ...] = ("S2",)) -> dict:
    from terratorch_eoplugins.datasets.pastis import PASTIS

    ds = PASTIS(root, split=None, modalities=modalities, num_dates=6)
    return ds[ds.ids.index(pid) if pid is not None else 0]


def _first_pid(root: Path) -> int:
    return min(int(p.stem.split("_")[1]) for p in (root / "DATA_S2").glob("S2_*.npy"))


def _s2(root: Path) -> Path:
    return root / "DATA_S2" / f"S2_{_first_pid(root)}.npy"


def test_pastis_empty_npy(pastis: Path) -> None:
    path = _put(_s2(pastis), b"")
    _fails(EODataError, lambda: _pastis_item(pastis), path, "empty file (0 bytes)", "PASTIS S2 patch")


def test_pastis_truncated_npy(pastis: Path) -> None:
    data = _s2(pastis).read_bytes()
    path = _put(_s2(pastis), data[: len(data) // 2])
    _fails(EODataError, lambda: _pastis_item(pastis), path, "truncated", "int16 array")


def test_pastis_npy_that_is_not_npy(pastis: Path) -> None:
    path = _put(_s2(pastis), "ID_PATCH,values\n10001,1 2 3\n")
    _fails(EODataError, lambda: _pastis_item(pastis), path, "not a NumPy .npy file")


def test_pastis_pickled_object_npy_is_never_unpickled(pastis: Path) -> None:
    arr = np.empty(2, dtype=object)
    arr[:] = [{"a": 1}, [1, 2]]
    path = _save_npy(_s2(pastis), arr, allow_pickle=True)
    msg = _fails(EODataError, lambda: _pastis_item(pastis), path, "Python objects", "never loaded")
    assert "allow_pickle" not in msg  # no hint to enable unpickling


def test_pastis_corrupt_npy_header(pastis: Path) -> None:
    data = bytearray(_s2(pastis).read_bytes())
    data[10:40] = b"{'descr': <i2, 'fortran_ord"  # garbled header dict
    path = _put(_s2(pastis), bytes(data))
    _fails(EODataError, lambda: _pastis_item(pastis), path, "corrupt .npy header")


def test_pastis_npy_of_another_dtype(pastis: Path) -> None:
    arr = np.load(_s2(pastis))
    path = _save_npy(_s2(pastis), arr.astype(np.float32))
    _fails(EODataError, lambda: _pastis_item(pastis), path, "expected dtype int16", "got float32")


def test_pastis_npy_of_another_band_count(pastis: Path) -> None:
    arr = np.load(_s2(pastis))
    path = _save_npy(_s2(pastis), arr[:, :9])
    _fails(EODataError, lambda: _pastis_item(pastis), path, "expected shape *x10x128x128")


def test_pastis_npy_dates_disagree_with_metadata(pastis: Path) -> None:
    arr = np.load(_s2(pastis))
    path = _save_npy(_s2(pastis), arr[:-1])
    _fails(EODataError, lambda: _pastis_item(pastis), path, "metadata.geojson", "dates-S2")


def test_pastis_s1_with_nan(pastis: Path) -> None:
    pid = _first_pid(pastis)
    path = pastis / "DATA_S1A" / f"S1A_{pid}.npy"
    arr = np.load(path).copy()
    arr[0, 0, 5, 5] = np.nan
    _save_npy(path, arr)
    _fails(EODataError, lambda: _pastis_item(pastis, pid, ("S1A",)), path, "NaN", "finite S1A")


def test_pastis_s1_in_linear_units_instead_of_db(pastis: Path) -> None:
    pid = _first_pid(pastis)
    path = pastis / "DATA_S1A" / f"S1A_{pid}.npy"
    arr = np.load(path).astype(np.float32)
    _save_npy(path, (10 ** (arr / 10) * 1e4).astype(np.float32))  # linear power x 10000
    _fails(EODataError, lambda: _pastis_item(pastis, pid, ("S1A",)), path, "backscatter in dB")


def test_pastis_normalisation_at_another_scale(pastis: Path) -> None:
    norm = pastis / "NORM_S2_patch.json"
    stats = json.loads(norm.read_text())
    for fold in stats.values():  # statistics of reflectance 0-1 for digital numbers 0-10000
        fold["mean"] = [m / 1e4 for m in fold["mean"]]
        fold["std"] = [s / 1e4 for s in fold["std"]]
    _put(norm, json.dumps(stats))
    _fails(EODataError, lambda: _pastis_item(pastis), _s2(pastis), norm, "different scales")


def test_pastis_normalisation_not_json(pastis: Path) -> None:
    norm = _put(pastis / "NORM_S2_patch.json", "{'Fold_1': ")
    _fails(EODataError, lambda: _pastis_item(pastis), norm, "not valid JSON")


def test_pastis_normalisation_missing_fold(pastis: Path) -> None:
    norm = pastis / "NORM_S2_patch.json"
    stats = json.loads(norm.read_text())
    del stats["Fold_1"]
    _put(norm, json.dumps(stats))
    _fails(EODataError, lambda: _pastis_item(pastis), norm, "'Fold_1'", "'mean' and 'std'")


def test_pastis_normalisation_zero_std(pastis: Path) -> None:
    norm = pastis / "NORM_S2_patch.json"
    stats = json.loads(norm.read_text())
    for fold in stats.values():
        fold["std"][3] = 0.0
    _put(norm, json.dumps(stats))
    _fails(EODataError, lambda: _pastis_item(pastis), norm, "std > 0")


def test_pastis_normalisation_band_count(pastis: Path) -> None:
    norm = pastis / "NORM_S2_patch.json"
    stats = json.loads(norm.read_text())
    stats["Fold_1"]["mean"] = stats["Fold_1"]["mean"][:8]
    _put(norm, json.dumps(stats))
    _fails(EODataError, lambda: _pastis_item(pastis), norm, "Fold_1", "10 values")


def test_pastis_annotation_entirely_void(pastis: Path) -> None:
    pid = _first_pid(pastis)
    path = pastis / "ANNOTATIONS" / f"TARGET_{pid}.npy"
    arr = np.load(path).copy()
    arr[0] = 19
    _save_npy(path, arr)
    _fails(EODataError, lambda: _pastis_item(pastis, pid), path, "void class (19)", "NaN")


def test_pastis_annotation_unknown_class(pastis: Path) -> None:
    pid = _first_pid(pastis)
    path = pastis / "ANNOTATIONS" / f"TARGET_{pid}.npy"
    arr = np.load(path).copy()
    arr[0, 3, 3] = 30
    _save_npy(path, arr)
    _fails(EODataError, lambda: _pastis_item(pastis, pid), path, "0..19", "30")


def test_pastis_annotation_missing(pastis: Path) -> None:
    pid = _first_pid(pastis)
    path = pastis / "ANNOTATIONS" / f"TARGET_{pid}.npy"
    path.unlink()
    _fails(EODatasetNotFoundError, lambda: _pastis_item(pastis, pid), path, "PASTIS annotation file")


def test_pastis_annotation_empty(pastis: Path) -> None:
    pid = _first_pid(pastis)
    path = _put(pastis / "ANNOTATIONS" / f"TARGET_{pid}.npy", b"")
    _fails(EODataError, lambda: _pastis_item(pastis, pid), path, "empty file", "PASTIS annotation")


def test_pastis_annotation_of_another_dtype(pastis: Path) -> None:
    pid = _first_pid(pastis)
    path = pastis / "ANNOTATIONS" / f"TARGET_{pid}.npy"
    _save_npy(path, np.load(path).astype(np.int64))
    _fails(EODataError, lambda: _pastis_item(pastis, pid), path, "expected dtype uint8")


def test_pastis_patch_file_missing(pastis: Path) -> None:
    path = _s2(pastis)
    path.unlink()
    _fails(EODatasetNotFoundError, lambda: _pastis_item(pastis), path, "PASTIS S2 patch file")


def _edit_metadata(root: Path, edit: Callable[[dict], None]) -> Path:
    path = root / "metadata.geojson"
    fc = json.loads(path.read_text())
    edit(fc)
    return _put(path, json.dumps(fc))


def _pastis(root: Path) -> object:
    from terratorch_eoplugins.datasets.pastis import PASTIS

    return PASTIS(root, split=None)


def test_pastis_metadata_not_geojson(pastis: Path) -> None:
    path = _put(pastis / "metadata.geojson", "this is not JSON")
    _fails(EODataError, lambda: _pastis(pastis), path, "cannot be read as GeoJSON")


def test_pastis_metadata_missing_field(pastis: Path) -> None:
    def edit(fc: dict) -> None:
        for f in fc["features"]:
            del f["properties"]["Fold"]

    path = _edit_metadata(pastis, edit)
    _fails(EODataError, lambda: _pastis(pastis), path, "missing field(s) ['Fold']")


def test_pastis_metadata_duplicated_patch_id(pastis: Path) -> None:
    def edit(fc: dict) -> None:
        fc["features"][1]["properties"]["ID_PATCH"] = fc["features"][0]["properties"]["ID_PATCH"]

    path = _edit_metadata(pastis, edit)
    _fails(EODataError, lambda: _pastis(pastis), path, "duplicated ID_PATCH")


def test_pastis_metadata_invalid_date(pastis: Path) -> None:
    def edit(fc: dict) -> None:
        fc["features"][0]["properties"]["dates-S2"]["1"] = 20191345

    path = _edit_metadata(pastis, edit)
    _fails(EODataError, lambda: _pastis(pastis), path, "'dates-S2'", "invalid date 20191345", "YYYYMMDD")


def test_pastis_metadata_date_keys_not_consecutive(pastis: Path) -> None:
    def edit(fc: dict) -> None:
        d = fc["features"][0]["properties"]["dates-S2"]
        d["17"] = d.pop("1")

    path = _edit_metadata(pastis, edit)
    _fails(EODataError, lambda: _pastis(pastis), path, "'dates-S2'", "consecutive positions")


def test_pastis_metadata_without_crs(pastis: Path) -> None:
    path = _edit_metadata(pastis, lambda fc: fc.pop("crs"))  # read as WGS84: the Lambert-93 metres are no lat/lon
    _fails(EODataError, lambda: _pastis(pastis), path, "not valid coordinates", "EPSG:2154")


def test_pastis_metadata_cloud_cover_of_another_length(pastis: Path) -> None:
    def edit(fc: dict) -> None:
        fc["features"][0]["properties"]["cloudcover-S2"] = {"0": 0.5}

    path = _edit_metadata(pastis, edit)
    _fails(EODataError, lambda: _pastis(pastis), path, "cloudcover-S2", "1 values for")


def test_pastis_metadata_without_features(pastis: Path) -> None:
    path = _edit_metadata(pastis, lambda fc: fc.update(features=[]))
    _fails(EODataError, lambda: _pastis(pastis), path)


# ============================================================================================= BurnScars
@pytest.fixture
def burn(tiny_world_dir: Path, tmp_path: Path) -> Path:
    return _mirror(tiny_world_dir / "hls_burn_scars", tmp_path / "hls_burn_scars")


def _first_scene(root: Path) -> tuple[Path, Path]:
    image = sorted((root / "validation").glob("*_merged.tif"))[0]
    return image, image.with_name(image.name.replace("_merged.tif", ".mask.tif"))


def _rewrite_tif(path: Path, data: np.ndarray, **profile_changes: object) -> Path:
    with rasterio.open(path) as src:
        profile = src.profile
    profile.update(count=data.shape[0], dtype=str(data.dtype), **profile_changes)
    path.unlink()
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def _burn_item(root: Path, split: str = "test") -> dict:
    from terratorch_eoplugins.datasets.burnscars import HLSBurnScars

    return HLSBurnScars(root, split=split)[0]


def test_burnscars_image_band_count(burn: Path) -> None:
    image, _ = _first_scene(burn)
    _rewrite_tif(image, rasterio.open(image).read()[:5])
    _fails(EODataError, lambda: _burn_item(burn), image, "expected 6 bands", "got 5")


def test_burnscars_image_integer_dtype(burn: Path) -> None:
    image, _ = _first_scene(burn)
    _rewrite_tif(image, (rasterio.open(image).read() * 10000).astype(np.uint16))
    _fails(EODataError, lambda: _burn_item(burn), image, "expected float reflectance")


def test_burnscars_reflectance_at_digital_number_scale(burn: Path) -> None:
    image, _ = _first_scene(burn)
    _rewrite_tif(image, (rasterio.open(image).read() * 10000).astype(np.float32))
    _fails(EODataError, lambda: _burn_item(burn), image, "expected surface reflectance in [0, 1]",
           "not digital numbers")


def test_burnscars_mask_entirely_no_data(burn: Path) -> None:
    _, mask = _first_scene(burn)
    _rewrite_tif(mask, np.full_like(rasterio.open(mask).read(), -1))
    _fails(EODataError, lambda: _burn_item(burn), mask, "every pixel is -1", "NaN")


def test_burnscars_image_entirely_no_data(burn: Path) -> None:
    image, _ = _first_scene(burn)
    _rewrite_tif(image, np.full_like(rasterio.open(image).read(), 9999.0))
    _fails(EODataError, lambda: _burn_item(burn), image, "every pixel is no data", "9999")


def test_burnscars_mask_unknown_value(burn: Path) -> None:
    _, mask = _first_scene(burn)
    m = rasterio.open(mask).read()
    m[0, 0, 0] = 2
    _rewrite_tif(mask, m)
    _fails(EODataError, lambda: _burn_item(burn), mask, "mask values must be -1", "[2]")


def test_burnscars_mask_missing(burn: Path) -> None:
    image, mask = _first_scene(burn)
    mask.unlink()
    _fails(EODataError, lambda: _burn_item(burn), image, "no mask", mask.name)


def test_burnscars_mask_of_another_shape(burn: Path) -> None:
    _, mask = _first_scene(burn)
    _rewrite_tif(mask, rasterio.open(mask).read()[:, :256, :256], height=256, width=256)
    _fails(EODataError, lambda: _burn_item(burn), mask, "mask shape 256x256 differs")


def test_burnscars_mask_of_another_grid(burn: Path) -> None:
    _, mask = _first_scene(burn)
    with rasterio.open(mask) as src:
        data, t = src.read(), src.transform
    _rewrite_tif(mask, data, transform=rasterio.Affine(t.a, t.b, t.c + 300, t.d, t.e, t.f))
    _fails(EODataError, lambda: _burn_item(burn), mask, "transform", "differs")


def test_burnscars_image_not_a_geotiff(burn: Path) -> None:
    image, _ = _first_scene(burn)
    _put(image, b"II*\x00 this is no tiff at all" * 4)
    _fails(EODataError, lambda: _burn_item(burn), image, "cannot be read as a GeoTIFF", "HLS reflectance")


def test_burnscars_image_empty_file(burn: Path) -> None:
    image, _ = _first_scene(burn)
    _put(image, b"")
    _fails(EODataError, lambda: _burn_item(burn), image, "GeoTIFF")


def test_burnscars_image_without_crs(burn: Path) -> None:
    image, _ = _first_scene(burn)
    with rasterio.open(image) as src:
        data, profile = src.read(), src.profile
    profile.pop("crs")
    image.unlink()
    with rasterio.open(image, "w", **profile) as dst:
        dst.write(data)
    _fails(EODataError, lambda: _burn_item(burn), image, "no CRS")


# ============================================================================================= S2 tiles
@pytest.fixture
def tiles(tiny_world_dir: Path, tmp_path: Path) -> Path:
    return _mirror(tiny_world_dir / "S2_TILES", tmp_path / "S2_TILES")


def _one_acquisition(root: Path) -> Path:
    """Keep a single acquisition in the (single) tile folder; return it."""
    folder = next(p for p in root.iterdir() if p.is_dir())
    files = sorted(folder.glob("*.tif"))
    for f in files[1:]:
        f.unlink()
    return files[0]


def _sampler(root: Path) -> object:
    from terratorch_eoplugins.datasets.s2_tiles import S2TileSampler

    return S2TileSampler(root, split="val", patch_size=32, length=2)


def test_s2_tile_band_count(tiles: Path) -> None:
    path = _one_acquisition(tiles)
    _rewrite_tif(path, rasterio.open(path).read()[:10])
    _fails(EODataError, lambda: _sampler(tiles), path, "expected 12 Sentinel-2 L2A bands", "got 10")


def test_s2_tile_float_dtype(tiles: Path) -> None:
    path = _one_acquisition(tiles)
    _rewrite_tif(path, rasterio.open(path).read().astype(np.float32) / 10000)
    _fails(EODataError, lambda: _sampler(tiles), path, "expected uint16")


def test_s2_tile_at_another_scale(tiles: Path) -> None:
    path = _one_acquisition(tiles)
    dn = rasterio.open(path).read()
    _rewrite_tif(path, np.clip(dn // 40, 1, 255).astype(np.uint16))  # 8-bit display values
    _fails(EODataError, lambda: _sampler(tiles)[0], path, "boa_offset=1000", "L2A digital numbers")


def test_s2_tile_not_a_geotiff(tiles: Path) -> None:
    path = _one_acquisition(tiles)
    _put(path, b"\x00" * 64)
    _fails(EODataError, lambda: _sampler(tiles), path, "cannot be read as a GeoTIFF")


def test_s2_tile_folder_without_acquisitions(tiles: Path) -> None:
    folder = next(p for p in tiles.iterdir() if p.is_dir())
    for f in folder.glob("*.tif"):
        f.unlink()
    _fails(EODatasetNotFoundError, lambda: _sampler(tiles), folder, "YYYYMMDDTHHMMSS.tif")


def test_s2_tile_folder_mixing_grids(tiles: Path) -> None:
    folder = next(p for p in tiles.iterdir() if p.is_dir())
    path = sorted(folder.glob("*.tif"))[-1]
    with rasterio.open(path) as src:
        data, t = src.read(), src.transform
    _rewrite_tif(path, data, transform=rasterio.Affine(t.a, t.b, t.c + 10 * t.a, t.d, t.e, t.f))
    _fails(EODataError, lambda: _sampler(tiles), path, "differs from the other files", "one grid")


def test_s2_tile_not_north_up(tiles: Path) -> None:
    path = _one_acquisition(tiles)
    with rasterio.open(path) as src:
        data, t = src.read(), src.transform
    _rewrite_tif(path, data, transform=rasterio.Affine(t.a, 0.5, t.c, 0.0, t.e, t.f))
    _fails(EODataError, lambda: _sampler(tiles), path, "north-up")


# ============================================================================================= CropNet
@pytest.fixture
def cropnet(tiny_world_dir: Path, tmp_path: Path) -> Path:
    return _mirror(tiny_world_dir / "CropNet", tmp_path / "CropNet")


def _cropnet(root: Path) -> object:
    from terratorch_eoplugins.datasets.cropnet import CropNet

    return CropNet(root, crop="Soybeans")


def _first_h5(root: Path) -> tuple[Path, str, list[str]]:
    """The first Sentinel-2 HDF5 file of sample 0, its county FIPS and its date keys."""
    import h5py

    ds = _cropnet(root)
    sample = ds[0]
    fips = str(sample["fips"])
    for path in sorted((root / "Sentinel-2 Imagery").rglob("*.h5")):
        with h5py.File(path, "r") as f:
            if fips in f and any(k in f[fips] for k in sample["dates"]):
                return path, fips, sorted(k for k in f[fips] if k in sample["dates"])
    raise AssertionError("no HDF5 file of sample 0")


def test_cropnet_h5_not_hdf5(cropnet: Path) -> None:
    path, _, _ = _first_h5(cropnet)
    _put(path, b"garbage" * 10)
    _fails(EODataError, lambda: _cropnet(cropnet)[0], path, "HDF5")


def test_cropnet_h5_truncated(cropnet: Path) -> None:
    path, _, _ = _first_h5(cropnet)
    data = path.read_bytes()
    _put(path, data[: len(data) // 2])
    _fails(EODataError, lambda: _cropnet(cropnet)[0], path, "truncated")


def test_cropnet_h5_date_without_data(cropnet: Path) -> None:
    import h5py

    path, fips, keys = _first_h5(cropnet)
    _own(path)
    with h5py.File(path, "r+") as f:
        del f[fips][keys[0]]["data"]
    _fails(EODataError, lambda: _cropnet(cropnet)[0], path, f"/{fips}/{keys[0]}", "missing dataset 'data'")


def test_cropnet_h5_date_without_grids(cropnet: Path) -> None:
    import h5py

    path, fips, keys = _first_h5(cropnet)
    _own(path)
    with h5py.File(path, "r+") as f:
        g = f[fips][keys[0]]
        data, coords = g["data"][()], g["coordinates"][()]
        del g["data"], g["coordinates"]
        g["data"], g["coordinates"] = data[:0], coords[:0]
    _fails(EODataError, lambda: _cropnet(cropnet)[0], path, f"/{fips}/{keys[0]}/data", "no grid images")


def test_cropnet_usda_csv_empty(cropnet: Path) -> None:
    years = _cropnet(cropnet).years
    path = next((cropnet / "USDA Crop Dataset" / "Soybeans").rglob(f"*_{years[0]}.csv"))
    _put(path, b"")
    _fails(EODataError, lambda: _cropnet(cropnet), path, "USDA CSV")


def test_cropnet_usda_csv_without_columns(cropnet: Path) -> None:
    years = _cropnet(cropnet).years
    path = next((cropnet / "USDA Crop Dataset" / "Soybeans").rglob(f"*_{years[0]}.csv"))
    _put(path, "x,y\n1,2\n")
    _fails(EODataError, lambda: _cropnet(cropnet), path, "missing column", "USDA Quick Stats")


def test_cropnet_hrrr_csv_empty(cropnet: Path) -> None:
    ds = _cropnet(cropnet)
    year = ds.years[0]
    paths = sorted((cropnet / "WRF-HRRR Computed Dataset" / "data" / str(year)).rglob("*.csv"))
    for p in paths:
        _put(p, b"")
    msg = _fails(EODataError, lambda: _cropnet(cropnet)[0], "WRF-HRRR")
    assert any(str(p) in msg for p in paths), msg


def test_cropnet_dates_of_another_grid_set_are_a_counted_skip(cropnet: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Real CropNet has dates whose grid set differs; the majority grid set is kept, the odd date skipped and
    logged, also when the odd date is the first one."""
    import h5py

    path, fips, keys = _first_h5(cropnet)
    all_dates = list(_cropnet(cropnet)[0]["dates"])
    _own(path)
    with h5py.File(path, "r+") as f:
        g = f[fips][keys[0]]
        coords = g["coordinates"][()]
        del g["coordinates"]
        g["coordinates"] = coords + 0.5  # the first date's grids moved by half a degree
    with caplog.at_level(logging.WARNING, logger="terratorch_eoplugins"):
        sample = _cropnet(cropnet)[0]
    assert list(sample["dates"]) == [d for d in all_dates if d != keys[0]]
    text = caplog.text
    assert keys[0] in text and fips in text and "dropped 1 of" in text


# ============================================================================================= GEDI
@pytest.fixture
def gedi(tiny_world_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "GEDI"
    root.mkdir()
    for p in tiny_world_dir.joinpath("GEDI").glob("*.h5"):
        os.symlink(p, root / p.name)
    return root


def _gedi(root: Path) -> object:
    from terratorch_eoplugins.datasets.gedi_shots import GEDIShots

    return GEDIShots(root)


def test_gedi_l1b_not_hdf5(gedi: Path) -> None:
    path = sorted(gedi.glob("GEDI01_B*.h5"))[0]
    _put(path, b"\x89HDF\r\n\x1a\n" + b"x" * 100)
    _fails(EODataError, lambda: _gedi(gedi), path, "HDF5")


def test_gedi_l2a_truncated(gedi: Path) -> None:
    path = sorted(gedi.glob("GEDI02_A*.h5"))[0]
    data = path.read_bytes()
    _put(path, data[: len(data) // 2])
    _fails(EODataError, lambda: _gedi(gedi), path, "HDF5")


def test_gedi_beam_without_a_field(gedi: Path) -> None:
    import h5py

    path = _own(sorted(gedi.glob("GEDI02_A*.h5"))[0])
    with h5py.File(path, "r+") as f:
        beam = sorted(k for k in f if k.startswith("BEAM"))[0]
        del f[beam]["quality_flag"]
    _fails(EODataError, lambda: _gedi(gedi), path, beam, "no dataset 'quality_flag'")


def test_gedi_sample_index_outside_the_waveform(gedi: Path) -> None:
    import h5py

    path = _own(sorted(gedi.glob("GEDI01_B*.h5"))[0])
    with h5py.File(path, "r+") as f:
        beam = sorted(k for k in f if k.startswith("BEAM"))[0]
        start = f[beam]["rx_sample_start_index"][()]
        start[-1] = f[beam]["rxwaveform"].shape[0] + 10
        f[beam]["rx_sample_start_index"][...] = start
    _fails(EODataError, lambda: _gedi(gedi), path, f"{beam}/rx_sample_start_index", "outside rxwaveform")


def test_gedi_shots_without_samples_are_a_counted_skip(gedi: Path) -> None:
    """Shots with ``rx_sample_count == 0`` have no waveform: they are filtered out and counted, not kept as zeros."""
    import h5py

    before = _gedi(gedi)
    path = _own(sorted(gedi.glob("GEDI01_B*.h5"))[0])
    with h5py.File(path, "r+") as f:
        beam = sorted(k for k in f if k.startswith("BEAM"))[0]
        count = f[beam]["rx_sample_count"][()]
        count[:5] = 0
        f[beam]["rx_sample_count"][...] = count
    ds = _gedi(gedi)
    assert ds.filter_counts["no_waveform"] == 5
    assert len(before) - 5 <= len(ds) <= len(before)  # some of the 5 may have been filtered for other reasons
    assert (ds.shots["count"] > 0).all()


# ============================================================================================= checkpoints
def _read_checkpoint(path: Path) -> object:
    from terratorch_eoplugins.runtime import read_checkpoint

    return read_checkpoint(path, "DUNIA")


class _NotAllowed:
    """A class that a weights-only load must refuse to unpickle."""


def test_checkpoint_missing(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.ckpt"
    _fails(FileNotFoundError, lambda: _read_checkpoint(path), path, "DUNIA checkpoint not found")


def test_checkpoint_empty(tmp_path: Path) -> None:
    path = _put(tmp_path / "empty.ckpt", b"")
    _fails(ValueError, lambda: _read_checkpoint(path), path, "cannot be read as a PyTorch checkpoint")


def test_checkpoint_truncated(tmp_path: Path) -> None:
    path = tmp_path / "t.ckpt"
    torch.save({"state_dict": {"w": torch.randn(256, 256)}}, path)
    data = path.read_bytes()
    _put(path, data[: len(data) // 2])
    _fails(ValueError, lambda: _read_checkpoint(path), path, "cannot be read as a PyTorch checkpoint")


def test_checkpoint_text_file(tmp_path: Path) -> None:
    path = _put(tmp_path / "notes.ckpt", "model: dunia\nepochs: 3\n")
    _fails(ValueError, lambda: _read_checkpoint(path), path, "cannot be read as a PyTorch checkpoint")


def test_checkpoint_of_another_structure(tmp_path: Path) -> None:
    path = tmp_path / "list.ckpt"
    torch.save([torch.zeros(2)], path)
    _fails(ValueError, lambda: _read_checkpoint(path), path, "expected a Lightning checkpoint or a state dict")


def test_checkpoint_with_pickled_objects_is_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "obj.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "callback": _NotAllowed()}, f, protocol=2)
    msg = _fails(ValueError, lambda: _read_checkpoint(path), path, "cannot be read as a PyTorch checkpoint",
                 "Unsupported global", "_NotAllowed", "never loaded")
    assert "weights_only" not in msg  # no advice to unpickle it anyway


def test_tokenizer_files_truncated_or_pickled(tmp_path: Path) -> None:
    from terratorch_eoplugins.nn.image_tokenizer import load_image_tokenizer
    from terratorch_eoplugins.nn.ts_tokenizers.serialization import load_ts_tokenizer

    truncated = _put(tmp_path / "image_fsq.pt", b"PK\x03\x04 not a whole zip")
    _fails(ValueError, lambda: load_image_tokenizer(truncated), truncated, "cannot be read as a PyTorch checkpoint")
    pickled = tmp_path / "ts_fsq.pt"
    with open(pickled, "wb") as f:
        pickle.dump({"kind": "fsq", "config": {}, "state_dict": {}, "hook": _NotAllowed()}, f, protocol=2)
    msg = _fails(ValueError, lambda: load_ts_tokenizer(pickled), pickled, "Unsupported global", "never loaded")
    assert "weights_only" not in msg


def test_knn_database_corrupt(tmp_path: Path) -> None:
    from terratorch_eoplugins.nn.knn import KNNDatabase

    path = _put(tmp_path / "db.npz", b"PK\x03\x04 broken zip")
    _fails(ValueError, lambda: KNNDatabase.load(path), path, "cannot be read as a KNN database")


def test_knn_database_missing_arrays(tmp_path: Path) -> None:
    from terratorch_eoplugins.nn.knn import KNNDatabase

    path = tmp_path / "db.npz"
    np.savez(path, keys=np.zeros((2, 3), np.float32))
    _fails(ValueError, lambda: KNNDatabase.load(path), path, "missing arrays ['labels', 'metadata']")


# ============================================================================================= model inputs
def _db() -> object:
    from terratorch_eoplugins.nn.knn import KNNDatabase

    db = KNNDatabase(4, "classification", num_classes=2)
    db.add(torch.randn(10, 4), torch.arange(10) % 2)
    return db


def test_knn_queries_with_nan() -> None:
    q = torch.randn(3, 4)
    q[1, 2] = float("nan")
    _fails(ValueError, lambda: _db().predict(q, 3), "queries", "1 embedding(s) contain NaN or Inf")


def test_knn_queries_with_zero_norm() -> None:
    _fails(ValueError, lambda: _db().predict(torch.zeros(2, 4), 3), "queries", "zero norm")


def test_knn_queries_of_another_dimension() -> None:
    _fails(ValueError, lambda: _db().predict(torch.randn(2, 5), 3), "D=5", "D=4")


def test_zero_cl_with_nan_embeddings() -> None:
    from terratorch_eoplugins.losses import zero_cl_loss

    z = torch.randn(6, 4)
    _fails(ValueError, lambda: zero_cl_loss(z, z.clone().fill_(float("nan"))), "zero_cl_loss", "NaN/Inf")


def test_vicreg_with_mismatched_views() -> None:
    from terratorch_eoplugins.losses import vicreg_loss

    _fails(ValueError, lambda: vicreg_loss(torch.randn(6, 4), torch.randn(5, 4)), "vicreg_loss", "(6, 4)", "(5, 4)")


def test_waveform_autoencoder_with_nan_waveforms() -> None:
    from terratorch_eoplugins.nn.waveform import WaveformAutoencoder

    ae = WaveformAutoencoder(length=64, channels=(2, 2, 2, 2), blocks_per_stage=1, num_quantizers=1,
                             codebook_size=8, embed_dim=4)
    w = torch.rand(3, 64)
    w[2, 7] = float("nan")
    _fails(ValueError, lambda: ae.encode(w), "WaveformAutoencoder.encode", "1 of 3 input waveforms contain NaN")


def test_fsq_image_tokenizer_with_nan_image() -> None:
    pytest.importorskip("vector_quantize_pytorch")
    from terratorch_eoplugins.nn.image_tokenizer import FSQImageTokenizer

    tok = FSQImageTokenizer(in_channels=3, levels=(5, 5), hidden_dims=(8, 8))
    x = torch.rand(1, 3, 16, 16)
    x[0, 0, 0, 0] = float("nan")
    _fails(ValueError, lambda: tok.encode(x), "encode(image)", "image contains NaN or inf")


@pytest.mark.parametrize("name,depth,too_small", [("micro_unet", 3, 4), ("unet_classic", 4, 8)])
def test_unet_backbones_state_their_minimum_input_size(name: str, depth: int, too_small: int) -> None:
    from terratorch.registry import BACKBONE_REGISTRY

    import terratorch_eoplugins  # noqa: F401
    from terratorch_eoplugins.errors import EOInputError

    net = BACKBONE_REGISTRY.build(name, in_channels=2, width=4)
    assert net.min_input_size == 2**depth
    _fails(EOInputError, lambda: net(torch.rand(1, 2, too_small, 2**depth)), f"EOUNet (depth {depth})",
           f"at least {2**depth} pixels", f"got {too_small} x {2**depth}")
    assert net.eval()(torch.rand(1, 2, 2**depth, 2**depth))[0].shape[-2:] == (2**depth, 2**depth)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_backbones_reject_non_finite_inputs(value: float) -> None:
    from terratorch_eoplugins.errors import EOInputError
    from terratorch_eoplugins.models.baselines import micro_unet
    from terratorch_eoplugins.models.dunia import build_dunia
    from terratorch_eoplugins.models.s4 import S4Model

    x = torch.rand(1, 2, 16, 16)
    x[0, 1, 3, 5] = value
    _fails(EOInputError, lambda: micro_unet(in_channels=2, width=4)(x), "EOUNet", "1 NaN or infinite value(s)",
           "(1, 2, 16, 16)")
    dunia = build_dunia("tiny", in_channels=2)
    _fails(EOInputError, lambda: dunia.encode(x), "DUNIA", "1 NaN or infinite value(s)")
    s4 = S4Model(in_channels={"optical": 2, "radar": 2}, widths=(4, 8))
    _fails(EOInputError, lambda: s4.encode(x[:, :, None], "optical"), "S4 optical encoder", "NaN or infinite")


def test_fault_module_never_writes_into_the_session_world(tiny_world_dir: Path) -> None:
    """Every corruption above replaced a link: the shared world's files are still regular, valid files."""
    for p in (tiny_world_dir / "PASTIS-R" / "DATA_S2").glob("*.npy"):
        assert not p.is_symlink() and np.load(p, mmap_mode="r").dtype == np.int16
