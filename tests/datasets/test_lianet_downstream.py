"""LIANet's own downstream tasks: label files of the synthetic world read back through
:class:`~terratorch_eoplugins.datasets.lianet_downstream.RegionLabels` (round trip, no-data, footprint rasterisation,
coverage, the training-box split, missing files)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyproj
import pytest
import rasterio
from affine import Affine
from shapely.geometry import Polygon
from shapely.geometry import box as shapely_box
from shapely.ops import transform as shapely_transform
from torchgeo.datasets import DatasetNotFoundError

from terratorch_eoplugins.datamodules.lianet_downstream import LIANetRegionDataModule
from terratorch_eoplugins.datasets.lianet_downstream import DW_TO_TASK, RegionLabels, patch_grid, train_box
from terratorch_eoplugins.datasets.s2_tiles import scan_region
from terratorch_eoplugins.synthetic.lianet_labels import building_rectangles, dlt_label, dw_label
from terratorch_eoplugins.synthetic.world import _ROOF, _URBAN, URBAN

P = 64


@pytest.fixture(scope="module")
def region(tiny_world_dir: Path):
    return scan_region(tiny_world_dir / "S2_TILES")


@pytest.fixture(scope="module")
def labels(tiny_world_dir: Path) -> Path:
    return tiny_world_dir / "LIANET_LABELS" / "T31TFJ"


def _ds(labels: Path, region, task: str, split: str = "val", **kw) -> RegionLabels:
    kw.setdefault("train_area_km2", 1.0)
    return RegionLabels(labels, region, task=task, split=split, patch_size=P, **kw)


def _window(sample) -> tuple[slice, slice]:
    col, row = (int(v) for v in sample["origin_px"])
    return slice(row, row + P), slice(col, col + P)


def test_dynamic_world_is_the_label_of_the_acquisition_date(labels, region, tiny_world) -> None:
    ds = _ds(labels, region, "dynamic_world")
    seen = set()
    for i in range(0, len(ds), 7):
        s = ds[i]
        t = int(s["time_index"])
        dw = dw_label(tiny_world, t)[_window(s)]  # the world has a label on every acquisition date
        want = np.where(dw == 255, 255, DW_TO_TASK[np.where(dw == 255, 0, dw)])
        np.testing.assert_array_equal(s["mask"].numpy(), want)
        seen.add(t)
    assert len(seen) > 1
    # seasonal: some cropland pixel is crops (3) on one date and bare (5) on another
    masks = np.stack([ds[i]["mask"].numpy() for i in range(len(ds)) if ds.samples[i]["index"] == 0])
    assert ((masks == 3).any(0) & (masks == 5).any(0)).any()


def test_static_labels_round_trip_and_dlt_nodata(labels, region, tiny_world) -> None:
    ch = _ds(labels, region, "canopy_height")
    dlt = _ds(labels, region, "leaf_type")
    assert len(ch) == len(dlt) == len(ch.patches) * len(region.times)  # every (patch x date), same label
    want_dlt = dlt_label(tiny_world)
    for i in range(0, len(ch), 5):
        s = ch[i]
        assert s["mask"].dtype.is_floating_point
        np.testing.assert_allclose(s["mask"].numpy() * 30.0, tiny_world.canopy_height[_window(s)], rtol=1e-6)
        np.testing.assert_array_equal(dlt[i]["mask"].numpy(), want_dlt[_window(dlt[i])])
    # the HRL's outside-area strip (255) reaches the samples at the east edge and is the ignored value
    east = [i for i, smp in enumerate(dlt.samples) if smp["origin"][0] + P == region.shape[1]]
    m = dlt[east[0]]["mask"].numpy()
    assert (m[:, -1] == 255).all() and set(np.unique(m)) <= {0, 1, 2, 255}
    assert LIANetRegionDataModule(task="leaf_type").ignore_index == 255


def test_label_raster_on_another_grid_is_read_by_georeference(labels, region, tiny_world, tmp_path) -> None:
    """A DLT raster covering only part of the region (its own transform) lands on the right pixels."""
    root = tmp_path / "labels"
    root.mkdir()
    want = dlt_label(tiny_world)
    r0, c0, h, w = 70, 30, 150, 120
    sub = want[r0:r0 + h, c0:c0 + w]
    with rasterio.open(root / "DLT.tif", "w", driver="GTiff", height=h, width=w, count=1, dtype="uint8",
                       crs=region.crs, transform=region.transform * Affine.translation(c0, r0), nodata=255) as dst:
        dst.write(sub[None])
    ds = _ds(root, region, "leaf_type")
    full = ds._on_region(root / "DLT.tif", 255, "uint8")
    np.testing.assert_array_equal(full[r0:r0 + h, c0:c0 + w], sub)
    assert (full[:r0] == 255).all() and (full[:, c0 + w:] == 255).all()


def _utm_buildings(labels: Path, crs) -> list[Polygon]:
    """The GeoJSON polygons reprojected independently (pyproj + shapely) to the region CRS."""
    feats = json.loads((labels / "buildings.geojson").read_text())["features"]
    tr = pyproj.Transformer.from_crs("EPSG:4326", crs.to_wkt(), always_xy=True).transform
    return [shapely_transform(tr, Polygon(f["geometry"]["coordinates"][0])) for f in feats]


def test_building_footprints_and_coverage_against_polygon_areas(labels, region, tiny_world) -> None:
    fp = _ds(labels, region, "building_footprints", train_area_km2=None, train_area_bounds=[0, 0, 1, 1])
    cov = _ds(labels, region, "building_coverage", train_area_km2=None, train_area_bounds=[0, 0, 1, 1])
    polys = _utm_buildings(labels, region.crs)
    assert len(polys) == len(building_rectangles(tiny_world)) > 20
    t = region.transform
    checked = 0
    for col, row in patch_grid(region.shape, P):
        if (col, row) not in fp.patches:
            continue
        fine = fp.footprints(col, row)
        assert fine.shape == (4 * P, 4 * P)
        left, top = t * (col, row)
        window = shapely_box(left, top - P * 10, left + P * 10, top)
        area = sum(p.intersection(window).area for p in polys)
        assert fine.sum() * 2.5 * 2.5 == pytest.approx(area, abs=1.0)
        if area == 0:
            continue
        c = cov.coverage(col, row)
        for r, k in zip(*np.nonzero(c > 0)):  # every covered 10 m pixel: fraction = polygon area / 100 m^2
            x0, y0 = t * (col + k, row + r)
            px = shapely_box(x0, y0 - 10, x0 + 10, y0)
            assert c[r, k] == pytest.approx(sum(p.intersection(px).area for p in polys) / 100.0, abs=1e-3)
        # buildings only where the world is urban (the S2's built-up signal carries them)
        lc = tiny_world.landcover[row:row + P, col:col + P]
        assert (lc[c > 0] == URBAN).all()
        checked += 1
    assert checked >= 1
    s = fp[next(i for i, smp in enumerate(fp.samples) if fp.footprints(*smp["origin"]).any())]
    assert s["mask"].shape == (4 * P, 4 * P) and set(np.unique(s["mask"].numpy())) == {0, 1}


def test_s2_images_carry_the_building_coverage_by_linear_mixing(labels, region, tiny_world) -> None:
    """The coverage the dataset reads from the GeoJSON is the world's, and every urban pixel of a clear S2 date is
    the roof / urban-ground mix of that coverage (x brightness, + noise of std 0.004): the images show the
    sub-pixel buildings that the building tasks ask for."""
    cov = _ds(labels, region, "building_coverage", train_area_km2=None, train_area_bounds=[0, 0, 1, 1])
    for col, row in patch_grid(region.shape, P):
        np.testing.assert_allclose(tiny_world.building_coverage[row:row + P, col:col + P], cov.coverage(col, row),
                                   atol=1e-6)

    clear = next(i for i in range(len(tiny_world.s2_dates)) if not tiny_world.cloudy_dates[i])
    refl = tiny_world.s2_reflectance(clear)
    urban = tiny_world.landcover == URBAN
    c = tiny_world.building_coverage[urban]
    assert c.min() == 0 and c.max() > 0.5  # bare urban ground and mostly-roofed pixels both occur
    mix = ((1 - c)[None] * _URBAN[:, None] + c[None] * _ROOF[:, None]) * tiny_world._brightness[urban][None]
    resid = refl[:, urban] - mix
    assert abs(float(resid.mean())) < 1e-3 and float(resid.std()) < 0.0045
    # the band-mean reflectance of urban pixels follows the coverage (roofs are brighter in every band)
    assert np.corrcoef(refl[:, urban].mean(0), c)[0, 1] > 0.9
    assert ((tiny_world.building_coverage > 0) <= urban).all()


@pytest.mark.parametrize("km2", [0.5, 1.0, 2.0])
def test_training_box_split(labels, region, km2: float) -> None:
    train = _ds(labels, region, "canopy_height", "train", train_area_km2=km2, train_box_origin=(0, 64))
    val = _ds(labels, region, "canopy_height", "val", train_area_km2=km2, train_box_origin=(0, 64))
    side = round(math.sqrt(km2 * 1e6) / 10.0)
    assert train.box == (0, 64, side, 64 + side)
    assert train.box_area_km2 == pytest.approx(side * side * 100 / 1e6)
    assert train.box_area_km2 == pytest.approx(km2, rel=0.02)
    c0, r0, c1, r1 = train.box
    covered = np.zeros(region.shape, np.uint8)
    for c, r in train.patches:
        assert c0 <= c and r0 <= r and c + P <= c1 and r + P <= r1
        covered[r:r + P, c:c + P] += 1
    for c, r in val.patches:
        assert c + P <= c0 or c >= c1 or r + P <= r0 or r >= r1
        covered[r:r + P, c:c + P] += 1
    assert covered.max() == 1  # disjoint
    assert {smp["origin"] for smp in train.samples}.isdisjoint({smp["origin"] for smp in val.samples})
    straddling = len(patch_grid(region.shape, P)) - len(train.patches) - len(val.patches)
    assert straddling >= 1  # the box edge falls inside patches here: those are in neither split
    # an explicit pixel box as the reference's train_area_bounds, clipped to the region
    assert train_box(region, train_area_bounds=[0, 128, 10_000, 384]) == (0, 128, 256, 384)


def test_missing_files_raise_dataset_not_found(labels, region, tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError, match="nope"):
        RegionLabels(tmp_path / "nope", region, task="canopy_height")
    partial = tmp_path / "partial"
    shutil.copytree(labels, partial, ignore=shutil.ignore_patterns("mch.tif", "buildings.geojson", "DW"))
    for task, missing in (("canopy_height", "mch.tif"), ("building_coverage", "buildings.geojson"),
                          ("dynamic_world", "DW")):
        with pytest.raises(DatasetNotFoundError, match=missing):
            _ds(partial, region, task)
    with pytest.raises(ValueError, match="task must be one of"):
        _ds(labels, region, "landcover")


def test_plot(labels, region) -> None:
    import matplotlib

    matplotlib.use("Agg")
    for task in ("dynamic_world", "canopy_height"):
        ds = _ds(labels, region, task, image="s2")
        s = ds[0]
        s["prediction"] = s["mask"]
        fig = ds.plot(s)
        assert len(fig.axes) == 3
