"""Sentinel-2 tile sampler for LIANet pretraining: region grid, mosaics, exact pixels, no-data, bad files."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from terratorch_eoplugins.datasets.s2_tiles import S2TileSampler, acquisition_time, scan_region
from terratorch_eoplugins.dates import days_since_epoch
from terratorch_eoplugins.errors import EODataError, EODatasetNotFoundError


def test_region_of_the_tiny_world(tiny_world_dir: Path, tiny_world) -> None:
    region = scan_region(tiny_world_dir / "S2_TILES")
    assert region.shape == tiny_world.shape and region.crs == tiny_world.crs
    assert region.transform.almost_equals(tiny_world.transform)
    assert region.times == [d.replace(microsecond=0) for d in tiny_world.s2_dates]
    assert region.size == max(tiny_world.shape)


def test_samples_are_the_world_pixels_at_their_origin_and_date(tiny_world_dir: Path, tiny_world) -> None:
    ds = S2TileSampler(tiny_world_dir / "S2_TILES", split="val", patch_size=24, length=6, seed=3)
    for i in range(3):
        s = ds[i]
        x0, y0 = (int(v) for v in s["origin_px"])
        t = int(s["time_index"])
        assert s["date"] == tiny_world.s2_dates[t].isoformat()
        assert float(s["time_days"]) == pytest.approx(days_since_epoch(tiny_world.s2_dates[t]), abs=1e-3)
        refl = tiny_world.s2_reflectance(t)[:, y0:y0 + 24, x0:x0 + 24]  # noise depends on the rendered window
        np.testing.assert_allclose(s["image"].numpy(), np.clip(refl, 0, 1), atol=6e-5)
        assert s["image"].shape == (12, 24, 24) and s["image"].min() >= 0 and s["image"].max() <= 1
    # validation samples are fixed, training samples are drawn afresh
    assert ds[0]["origin_px"].tolist() == ds[0]["origin_px"].tolist()
    train = S2TileSampler(tiny_world_dir / "S2_TILES", split="train", patch_size=24, length=6)
    origins = {tuple(train[0]["origin_px"].tolist()) for _ in range(5)}
    assert len(origins) > 1
    fig = ds.plot({**ds[0], "prediction": ds[1]["image"]})
    assert len(fig.axes) == 3
    plt.close(fig)


def _cut(src_path: Path, dst: Path, col: int, width: int) -> None:
    with rasterio.open(src_path) as src:
        profile = src.profile
        data = src.read(window=Window(col, 0, width, src.height))
        profile.update(width=width, transform=src.transform @ Affine.translation(col, 0))
    dst.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)


def test_overlapping_tiles_form_a_mosaic(tiny_world_dir: Path, tmp_path: Path, tiny_world) -> None:
    """Two adjacent tiles overlapping by 40 px: offsets from georeferencing, same pixels as the full tile."""
    files = sorted((tiny_world_dir / "S2_TILES" / tiny_world.spec.tile).glob("*.tif"))[:2]
    for f in files:
        _cut(f, tmp_path / "A" / f.name, 0, 150)
        _cut(f, tmp_path / "B" / f.name, 110, 146)
    region = scan_region(tmp_path)
    assert region.shape == tiny_world.shape
    assert [t.offset for t in region.tiles] == [(0, 0), (110, 0)]
    ds = S2TileSampler(tmp_path, split="val", patch_size=32, length=8, region=region)
    with rasterio.open(files[0]) as src:
        full = src.read()
    for i in range(8):
        s = ds[i]
        x0, y0 = (int(v) for v in s["origin_px"])
        t = int(s["time_index"])
        with rasterio.open(files[t]) as src:
            ref = src.read(window=Window(x0, y0, 32, 32))
        expected = np.clip((ref.astype(np.float32) - 1000) / 10000, 0, 1)
        np.testing.assert_allclose(s["image"].numpy(), expected, atol=1e-6)
    assert full.shape[1:] == region.shape


def test_nodata_windows_are_skipped(tmp_path: Path, tiny_world_dir: Path, tiny_world) -> None:
    src_file = sorted((tiny_world_dir / "S2_TILES" / tiny_world.spec.tile).glob("*.tif"))[0]
    dst = tmp_path / "T" / src_file.name
    dst.parent.mkdir()
    with rasterio.open(src_file) as src:
        profile, data = src.profile, src.read()
    data[:, :, 64:] = 0  # only the left 64 columns hold data
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)
    ds = S2TileSampler(tmp_path, split="val", patch_size=32, length=20)
    assert all(ds[i]["origin_px"][0] <= 32 for i in range(20))
    data[:] = 0
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)
    with pytest.raises(EODataError, match="no valid 32x32 window"):
        S2TileSampler(tmp_path, split="val", patch_size=32, length=2, max_tries=5)[0]


def _write(path: Path, count: int = 12, dtype: str = "uint16", crs: str | None = "EPSG:32631",
           transform: Affine = Affine(10, 0, 600000, 0, -10, 5000000)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=40, height=40, count=count, dtype=dtype, crs=crs,
                       transform=transform) as dst:
        dst.write(np.full((count, 40, 40), 1500, dtype))


def test_bad_inputs_have_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(EODatasetNotFoundError, match="tiles root"):
        scan_region(tmp_path / "missing")
    _write(tmp_path / "a" / "T1" / "20190101T103000.tif", count=10)
    with pytest.raises(EODataError, match="expected 12 Sentinel-2 L2A bands"):
        scan_region(tmp_path / "a")
    _write(tmp_path / "b" / "T1" / "20190101T103000.tif", dtype="float32")
    with pytest.raises(EODataError, match="uint16"):
        scan_region(tmp_path / "b")
    _write(tmp_path / "c" / "T1" / "20190101T103000.tif")
    _write(tmp_path / "c" / "T2" / "20190101T103000.tif", crs="EPSG:32632")
    with pytest.raises(EODataError, match="one UTM zone"):
        scan_region(tmp_path / "c")
    (tmp_path / "d" / "T1").mkdir(parents=True)
    (tmp_path / "d" / "T1" / "notes.txt").write_text("x")
    with pytest.raises(EODatasetNotFoundError, match="YYYYMMDDTHHMMSS"):
        scan_region(tmp_path / "d")
    _write(tmp_path / "e" / "T1" / "20190101T103000.tif")
    _write(tmp_path / "e" / "T2" / "20190101T103000.tif", transform=Affine(10, 0, 600005, 0, -10, 5000000))
    with pytest.raises(EODataError, match="not aligned"):
        scan_region(tmp_path / "e")
    with pytest.raises(ValueError, match="larger than tile"):
        S2TileSampler(tmp_path / "c", tiles=["T1"], patch_size=64)
    with pytest.raises(ValueError, match="split"):
        S2TileSampler(tmp_path / "c", tiles=["T1"], split="test", patch_size=8)


def test_acquisition_time_reads_the_file_name_stamp() -> None:
    assert acquisition_time("20190707T103031.tif") == dt.datetime(2019, 7, 7, 10, 30, 31)
    assert acquisition_time("20190707T103031.tif.aux.xml") is None  # not a tile file
    assert acquisition_time("20191340T000000.tif") is None  # month 13: no valid time
    assert acquisition_time("notes.txt") is None
