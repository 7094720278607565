"""LIANet fine-tuning samples: PASTIS and Burn Scars patches georeferenced into the pretraining region."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from terratorch_eoplugins.datasets.lianet import LIANetBurnScars, LIANetPASTIS, polygon_origin
from terratorch_eoplugins.datasets.s2_tiles import scan_region
from terratorch_eoplugins.errors import EODataError
from terratorch_eoplugins.synthetic.lianet_burn_tiles import write_lianet_burn_tiles


@pytest.fixture(scope="module")
def burn_tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lianet_burn_tiles(tmp_path_factory.mktemp("lianet_burn"), "tiny", 0)


def test_pastis_patches_land_on_their_pixels(tiny_world_dir: Path) -> None:
    """The S2 window at each patch's mapped origin is the PASTIS patch's own S2 image of that date."""
    region = scan_region(tiny_world_dir / "S2_TILES")
    ds = LIANetPASTIS(tiny_world_dir / "PASTIS-R", region, split="train", dates="patch", image="s2")
    assert len(ds) > 0
    seen = set()
    for i in range(0, len(ds), max(1, len(ds) // 6)):
        s = ds[i]
        k = ds.samples[i]["index"]
        patch = ds.pastis.patches[k]
        dates = patch["dates"]["S2"]
        j = [d.isoformat() for d in dates].index(s["date"][:10])
        raw = np.load(patch["files"]["S2"])[j].astype(np.float32)  # T x 10 x 128 x 128 (B2..B12, no B1/B9)
        ours = s["image"].numpy()[[1, 2, 3, 4, 5, 6, 7, 8, 10, 11]] * 10000
        assert np.corrcoef(raw.ravel(), ours.ravel())[0, 1] > 0.99
        assert s["mask"].shape == (128, 128) and s["image"].shape == (12, 128, 128)
        seen.add(tuple(s["origin_px"].tolist()))
    assert len(seen) > 1
    region_ds = LIANetPASTIS(tiny_world_dir / "PASTIS-R", region, split="val", dates="region", num_dates=3)
    assert len(region_ds) == 3 * len(region_ds.pastis)


def test_pastis_max_cloud_drops_cloudy_pairs(tiny_world_dir: Path) -> None:
    """max_cloud keeps exactly the (date x patch) pairs whose MSK_CLDPRB window mean is at most the threshold."""
    import rasterio
    from rasterio.windows import Window

    region = scan_region(tiny_world_dir / "S2_TILES")
    every = LIANetPASTIS(tiny_world_dir / "PASTIS-R", region, split="train", dates="region")
    clear = LIANetPASTIS(tiny_world_dir / "PASTIS-R", region, split="train", dates="region", max_cloud=20)
    tile = region.tiles[0]
    files = dict(tile.files)

    def cloud(s: dict) -> float:
        path = files[region.times[s["time_index"]]]
        col, row = s["origin"][0] - tile.offset[0], s["origin"][1] - tile.offset[1]
        with rasterio.open(path.parent / "MSK_CLDPRB" / path.name) as src:
            return float(src.read(1, window=Window(col, row, 128, 128)).mean())

    expected = [(s["id"], s["time_index"]) for s in every.samples if cloud(s) <= 20]
    assert [(s["id"], s["time_index"]) for s in clear.samples] == expected
    assert 0 < len(clear) < len(every)  # the tiny world has cloudy dates
    with pytest.raises(ValueError, match="max_cloud"):
        LIANetPASTIS(tiny_world_dir / "PASTIS-R", region, split="train", max_cloud=150)


def test_bad_georeferencing_and_dates(tiny_world_dir: Path) -> None:
    region = scan_region(tiny_world_dir / "S2_TILES")
    square = [(0, 0), (1280, 0), (1280, -1280), (0, -1280), (0, 0)]
    with pytest.raises(EODataError, match="cannot transform"):
        polygon_origin(square, "EPSG:999999", region, 128, "patch X")
    with pytest.raises(EODataError, match="patch X"):
        polygon_origin(square, "+proj=geocent +units=m +no_defs +type=crs +foo", region, 128, "patch X")
    far = [(x + 5e5, y) for x, y in square]
    with pytest.raises(EODataError, match="outside the pretrained region"):
        polygon_origin(far, region.crs.to_wkt(), region, 128, "patch Y")
    sub = scan_region(tiny_world_dir / "S2_TILES")
    sub.tiles[0].files = sub.tiles[0].files[:2]  # pretend only the first two acquisitions were pretrained
    with pytest.raises(EODataError, match="no pretraining acquisition on that day"):
        LIANetPASTIS(tiny_world_dir / "PASTIS-R", sub, split="val", dates="patch")


def test_burnscars_windows_show_the_burn_in_the_paired_acquisition(tiny_world_dir: Path, burn_tiles: Path) -> None:
    region = scan_region(burn_tiles)
    ds = LIANetBurnScars(tiny_world_dir / "hls_burn_scars", region, split="train", image="s2")
    assert len(ds) > 0
    burned, clear = [], []
    for i in range(len(ds)):
        s = ds[i]
        m = s["mask"].numpy()
        assert (m == 1).any()
        nir = s["image"].numpy()[8]  # B8A: NIR drops on burn scars
        burned.append(nir[m == 1].mean())
        if (m == 0).any():
            clear.append(nir[m == 0].mean())
    assert np.mean(burned) < np.mean(clear) - 0.05


def test_burnscars_label_fraction_keeps_whole_training_scenes(tiny_world_dir: Path, burn_tiles: Path) -> None:
    region = scan_region(burn_tiles)
    root = tiny_world_dir / "hls_burn_scars"
    full = LIANetBurnScars(root, region, split="train", keep_unburned=True)
    scene = [s["id"].split("@")[0] for s in full.samples]
    assert len(set(scene)) >= 2
    half = LIANetBurnScars(root, region, split="train", keep_unburned=True, label_fraction=0.5, seed=1)
    kept = {s["id"].split("@")[0] for s in half.samples}
    assert 0 < len(kept) < len(set(scene))
    # every window of a kept scene stays, none of a dropped one
    assert [s["id"] for s in half.samples] == [s["id"] for s, sc in zip(full.samples, scene) if sc in kept]
    again = LIANetBurnScars(root, region, split="train", keep_unburned=True, label_fraction=0.5, seed=1)
    assert [s["id"] for s in again.samples] == [s["id"] for s in half.samples]
    test = LIANetBurnScars(root, region, split="test", keep_unburned=True, label_fraction=0.5)
    assert len(test) == len(LIANetBurnScars(root, region, split="test", keep_unburned=True))
    with pytest.raises(ValueError, match="label_fraction"):
        LIANetBurnScars(root, region, split="train", label_fraction=0.0)
