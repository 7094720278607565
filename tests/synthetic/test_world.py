"""The synthetic world: determinism, learnable structure, and coherence of every written product."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from pyproj import Transformer

from terratorch_eoplugins.datasets.pastis import VOID_CLASS
from terratorch_eoplugins.synthetic import write_world
from terratorch_eoplugins.synthetic.pastis import MAX_PATCH_CLOUD, PASTIS_S2_INDEX, PATCH
from terratorch_eoplugins.synthetic.tiles import TIMESTAMP_FORMAT, reflectance_to_dn
from terratorch_eoplugins.synthetic.world import (
    FOREST,
    S2_BANDS,
    S2_L2A_OFFSET,
    WorldSpec,
    _rng,
    make_world,
    smooth_noise,
)


def test_same_seed_same_world_other_seed_other_world() -> None:
    a, b, c = make_world("tiny", 0), make_world("tiny", 0), make_world("tiny", 1)
    assert np.array_equal(a.crop_class, b.crop_class)
    assert np.array_equal(a.s2_reflectance(2), b.s2_reflectance(2))
    assert np.array_equal(a.s1_backscatter(1, "desc"), b.s1_backscatter(1, "desc"))
    assert not np.array_equal(a.crop_class, c.crop_class)


def test_smooth_noise_is_standardised_and_correlated() -> None:
    f = smooth_noise((128, 128), 8.0, _rng(0, "t"))
    assert abs(f.mean()) < 1e-5 and abs(f.std() - 1) < 1e-4
    lag1 = np.corrcoef(f[:, :-1].ravel(), f[:, 1:].ravel())[0, 1]
    lag40 = np.corrcoef(f[:, :-40].ravel(), f[:, 40:].ravel())[0, 1]
    assert lag1 > 0.9 and abs(lag40) < 0.3


def test_every_crop_class_is_present_and_background_exists(tiny_world) -> None:
    present = set(np.unique(tiny_world.crop_class))
    assert present == set(range(19))
    assert (tiny_world.landcover == FOREST).any()
    assert tiny_world.canopy_height[tiny_world.landcover == FOREST].min() > 0
    assert tiny_world.canopy_height[tiny_world.landcover != FOREST].max() == 0


def test_phenology_separates_winter_and_summer_crops(tiny_world) -> None:
    """Winter wheat is green in spring and harvested by August; corn is the reverse."""
    w = tiny_world
    wheat, corn = w.crop_class == 2, w.crop_class == 3
    april, august = w.green_fraction("2019-04-20"), w.green_fraction("2019-08-10")
    assert april[wheat].mean() > april[corn].mean() + 0.4
    assert august[corn].mean() > august[wheat].mean() + 0.4
    # the classes' NDVI trajectories are what a model has to learn: check they appear in the reflectance
    clear = [i for i in range(len(w.s2_dates)) if not w.cloudy_dates[i]]
    nir, red = S2_BANDS.index("B08"), S2_BANDS.index("B04")
    crop = w.landcover == 0
    ndvi = [(lambda r: (r[nir] - r[red]) / (r[nir] + r[red]))(w.s2_reflectance(i))[crop] for i in clear]
    gf = [w.green_fraction(w.s2_dates[i])[crop] for i in clear]
    r = np.corrcoef(np.ravel(ndvi), np.ravel(gf))[0, 1]
    assert r > 0.95


def test_clouds_only_on_cloudy_dates_and_brighten_the_scene(tiny_world) -> None:
    w = tiny_world
    for i in range(len(w.s2_dates)):
        cm = w.cloud_mask(i)
        if w.cloudy_dates[i]:
            assert cm.max() > 0.9
            blue = w.s2_reflectance(i)[S2_BANDS.index("B02")]
            assert blue[cm > 0.9].mean() > blue[cm == 0].mean() + 0.2
        else:
            assert cm.max() == 0


def test_radar_backscatter_grows_with_vegetation_volume(tiny_world) -> None:
    """Summer VH over corn (tall, structure 1.0) exceeds meadow (0.35); forest VH grows with canopy height."""
    w = tiny_world
    i = int(np.argmin([abs(d.month - 7.5) for d in w.s1_dates("desc")]))
    vh = w.s1_backscatter(i, "desc")[1]
    corn, meadow = w.crop_class == 3, w.crop_class == 1
    assert vh[corn].mean() > vh[meadow].mean() + 1.0
    forest = w.landcover == FOREST
    r = np.corrcoef(vh[forest], w.canopy_height[forest])[0, 1]
    assert r > 0.3


def test_s2_tiles_hold_l2a_dn_with_offset(tiny_world_dir: Path, tiny_world) -> None:
    tiles = sorted((tiny_world_dir / "S2_TILES" / "T31TFJ").glob("*.tif"))
    assert len(tiles) == len(tiny_world.s2_dates)
    with rasterio.open(tiles[3]) as src:
        assert src.count == 12 and src.dtypes[0] == "uint16"
        assert src.crs.to_epsg() == 32631 and src.res == (10.0, 10.0)
        assert src.descriptions == S2_BANDS
        assert src.transform == tiny_world.transform
        dn = src.read()
    assert tiles[3].stem == tiny_world.s2_dates[3].strftime(TIMESTAMP_FORMAT)
    refl = tiny_world.s2_reflectance(3)
    assert np.array_equal(dn, reflectance_to_dn(refl))
    # the preprocessing LIANet uses recovers reflectance to quantisation precision
    back = np.clip((dn.astype(np.float32) - S2_L2A_OFFSET) / 10000, 0, 1)
    assert np.abs(back - np.clip(refl, 0, 1)).max() <= 0.5e-4 + 1e-7
    with rasterio.open(tiny_world_dir / "S2_TILES" / "T31TFJ" / "MSK_CLDPRB" / tiles[3].name) as src:
        assert np.array_equal(src.read(1), np.round(tiny_world.cloud_mask(3) * 100).astype(np.uint8))
    s1 = sorted((tiny_world_dir / "S1_TILES" / "T31TFJ" / "ASC").glob("*.tif"))
    with rasterio.open(s1[0]) as src:
        assert src.descriptions == ("VV", "VH", "angle") and src.dtypes[0] == "float32"
        np.testing.assert_allclose(src.read((1, 2)), tiny_world.s1_backscatter(0, "asc"), rtol=0, atol=1e-5)
        angle = src.read(3)
        assert 38 < angle.min() < angle.max() < 46 and (np.diff(angle, axis=1) > 0).all()  # ascending looks east


def test_pastis_patches_are_cut_from_the_same_tiles(tiny_world_dir: Path, tiny_world) -> None:
    """Every PASTIS S2 value equals the tile DN minus the L2A offset at the patch's georeferenced window."""
    root = tiny_world_dir / "PASTIS-R"
    meta = gpd.read_file(root / "metadata.geojson")
    assert meta.crs.to_epsg() == 2154
    to_utm = Transformer.from_crs("EPSG:2154", tiny_world.crs, always_xy=True)
    tiles = {p.stem: p for p in (tiny_world_dir / "S2_TILES" / "T31TFJ").glob("*.tif")}
    for _, row in meta.iterrows():
        pid = row["ID_PATCH"]
        dates = row["dates-S2"] if isinstance(row["dates-S2"], dict) else json.loads(row["dates-S2"])
        s2 = np.load(root / "DATA_S2" / f"S2_{pid}.npy")
        assert s2.dtype == np.int16 and s2.shape[1:] == (10, PATCH, PATCH) and s2.shape[0] == len(dates)
        # the Lambert-93 polygon maps back to the UTM patch window
        x, y = to_utm.transform(*row.geometry.exterior.coords[0])
        col, r0 = ~tiny_world.transform @ (x, y)
        col, r0 = int(round(col)), int(round(r0))
        assert col % PATCH == 0 and r0 % PATCH == 0
        stamp = {str(d.strftime("%Y%m%d")): d for d in tiny_world.s2_dates}
        first = stamp[str(dates["0"])]
        with rasterio.open(tiles[first.strftime(TIMESTAMP_FORMAT)]) as src:
            dn = src.read(window=((r0, r0 + PATCH), (col, col + PATCH)))
        expected = dn[PASTIS_S2_INDEX].astype(np.int32) - S2_L2A_OFFSET
        assert np.array_equal(s2[0].astype(np.int32), expected)
        target = np.load(root / "ANNOTATIONS" / f"TARGET_{pid}.npy")
        assert target.shape == (3, PATCH, PATCH) and target.dtype == np.uint8
        sem = target[0]
        truth = tiny_world.crop_class[r0:r0 + PATCH, col:col + PATCH]
        keep = sem != VOID_CLASS
        assert np.array_equal(sem[keep], truth[keep])
        assert row["N_Parcel"] == len(np.unique(tiny_world.parcel_id[r0:r0 + PATCH, col:col + PATCH])) - 1
        clouds = row["cloudcover-S2"] if isinstance(row["cloudcover-S2"], dict) else json.loads(row["cloudcover-S2"])
        assert max(clouds.values()) <= MAX_PATCH_CLOUD
    assert sorted(meta["Fold"].unique()) == [1, 2, 3, 4, 5]


def test_void_marks_parcels_mostly_outside_the_patch(tiny_world_dir: Path, tiny_world) -> None:
    root = tiny_world_dir / "PASTIS-R"
    meta = gpd.read_file(root / "metadata.geojson")
    to_utm = Transformer.from_crs("EPSG:2154", tiny_world.crs, always_xy=True)
    totals = np.bincount(tiny_world.parcel_id.ravel())
    n_void = 0
    for _, row in meta.iterrows():
        col, r0 = ~tiny_world.transform @ to_utm.transform(*row.geometry.exterior.coords[0])
        r0, col = int(round(r0)), int(round(col))
        pid = tiny_world.parcel_id[r0:r0 + PATCH, col:col + PATCH]
        sem = np.load(root / "ANNOTATIONS" / f"TARGET_{row['ID_PATCH']}.npy")[0]
        for p in np.unique(pid[pid > 0]):
            inside = (pid == p).sum()
            is_void = (sem[pid == p] == VOID_CLASS).all()
            assert is_void == (inside < 0.5 * totals[p])
            n_void += is_void
    assert n_void > 0


def test_norm_files_hold_pooled_fold_statistics(tiny_world_dir: Path) -> None:
    root = tiny_world_dir / "PASTIS-R"
    meta = gpd.read_file(root / "metadata.geojson")
    norm = json.loads((root / "NORM_S2_patch.json").read_text())
    fold = int(meta["Fold"].iloc[0])
    ids = meta.loc[meta["Fold"] == fold, "ID_PATCH"]
    stack = np.concatenate([np.load(root / "DATA_S2" / f"S2_{i}.npy").astype(np.float64).transpose(1, 0, 2, 3)
                            .reshape(10, -1) for i in ids], axis=1)
    np.testing.assert_allclose(norm[f"Fold_{fold}"]["mean"], stack.mean(1), atol=1e-5)
    np.testing.assert_allclose(norm[f"Fold_{fold}"]["std"], stack.std(1), atol=1e-5)
    for name in ("S1A", "S1D"):
        s1 = json.loads((root / f"NORM_{name}_patch.json").read_text())
        assert len(s1[f"Fold_{fold}"]["mean"]) == 3


def test_write_world_is_idempotent_and_validates_products(tmp_path: Path) -> None:
    first = write_world(tmp_path, size="tiny", products=["pastis"])
    mtime = (first["pastis"] / "metadata.geojson").stat().st_mtime_ns
    again = write_world(tmp_path, size="tiny", products=["pastis"])
    assert again == first and (first["pastis"] / "metadata.geojson").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="unknown synthetic products"):
        write_world(tmp_path, size="tiny", products=["pastis", "landsat"])
    with pytest.raises(ValueError, match="unknown world size"):
        WorldSpec.preset("huge")


def test_console_command_writes_the_world(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "terratorch_eoplugins.cli", "synth", "--out", str(tmp_path),
                           "--size", "tiny", "--products", "pastis"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "PASTIS-R" / "metadata.geojson").is_file()
    assert "pastis" in proc.stdout


# ---------------------------------------------------------------- files are never lost
def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _manifest(root: Path) -> dict:
    return json.loads((root / "world.json").read_text())


def test_refuses_a_folder_that_is_not_empty_and_has_no_manifest(tmp_path: Path) -> None:
    from terratorch_eoplugins.synthetic import SynthOutputError

    (tmp_path / "thesis.tex").write_text("years of work")
    (tmp_path / "figures").mkdir()
    for overwrite in (False, True):
        with pytest.raises(SynthOutputError, match=r"not empty \(figures, thesis.tex\).*no world.json"):
            write_world(tmp_path, size="tiny", products=["pastis"], overwrite=overwrite)
    assert _files(tmp_path) == {"thesis.tex"} and (tmp_path / "thesis.tex").read_text() == "years of work"
    (tmp_path / "figures").rmdir()
    (tmp_path / "thesis.tex").unlink()
    (tmp_path / "world.json").write_text('{"title": "my notes"}')  # a world.json that is not a manifest
    with pytest.raises(SynthOutputError, match="world.json: not a manifest of `eoplugins synth`"):
        write_world(tmp_path, size="tiny", products=["pastis"], overwrite=True)
    assert (tmp_path / "world.json").read_text() == '{"title": "my notes"}'


def test_manifest_records_every_file_and_overwrite_replaces_only_those(tmp_path: Path) -> None:
    out = tmp_path / "w"
    write_world(out, size="tiny", products=["pastis"])
    recorded = {f for fs in _manifest(out)["files"].values() for f in fs}
    assert recorded == _files(out) - {"world.json"} and any(f.startswith("PASTIS-R/DATA_S2/") for f in recorded)
    # user files beside and inside the world survive an overwrite; the world's files are rewritten
    (out / "notes.txt").write_text("mine")
    (out / "PASTIS-R" / "my_labels.csv").write_text("mine too")
    target = out / "PASTIS-R" / "metadata.geojson"
    target.write_text("corrupted by hand")
    write_world(out, size="tiny", products=["pastis"])  # same world, no overwrite: nothing rewritten
    assert target.read_text() == "corrupted by hand"
    write_world(out, size="tiny", products=["pastis"], overwrite=True)
    assert target.read_text() != "corrupted by hand"
    assert (out / "notes.txt").read_text() == "mine" and (out / "PASTIS-R" / "my_labels.csv").read_text() == "mine too"
    assert {f for fs in _manifest(out)["files"].values() for f in fs} == recorded
    assert not [p for p in out.iterdir() if p.name.startswith(".synth-staging")]


def test_another_seed_refuses_unless_told_then_removes_the_old_world_first(tmp_path: Path) -> None:
    from terratorch_eoplugins.synthetic import SynthOutputError

    write_world(tmp_path, size="tiny", seed=0, products=["pastis", "burnscars"])
    old = _files(tmp_path)
    (tmp_path / "hls_burn_scars" / "README.txt").write_text("mine")
    with pytest.raises(SynthOutputError, match=r"holds another synthetic world \(world.json: size='tiny', seed=0, "
                                               r"\d+ files\); asked for size='tiny', seed=1.*overwrite"):
        write_world(tmp_path, size="tiny", seed=1, products=["pastis"])
    assert _files(tmp_path) == old | {"hls_burn_scars/README.txt"} and _manifest(tmp_path)["seed"] == 0
    write_world(tmp_path, size="tiny", seed=1, products=["pastis"], overwrite=True)
    m = _manifest(tmp_path)
    assert m["seed"] == 1 and set(m["products"]) == {"pastis"} and set(m["files"]) == {"pastis"}
    # seed 0's BurnScars scenes are gone (the folders they emptied too), the user's file in their folder is not
    assert _files(tmp_path) == set(m["files"]["pastis"]) | {"world.json", "hls_burn_scars/README.txt"}
    assert not (tmp_path / "hls_burn_scars" / "training").exists()


def test_a_file_the_manifest_does_not_record_blocks_the_write_and_nothing_changes(tmp_path: Path) -> None:
    from terratorch_eoplugins.synthetic import SynthOutputError

    write_world(tmp_path, size="tiny", products=["pastis"])
    m = _manifest(tmp_path)
    foreign = "PASTIS-R/metadata.geojson"
    m["files"]["pastis"].remove(foreign)  # as if the user had put their own file where the world writes one
    (tmp_path / "world.json").write_text(json.dumps(m))
    (tmp_path / foreign).write_text("a hand-made metadata file")
    before = {f: (tmp_path / f).stat().st_mtime_ns for f in _files(tmp_path)}
    with pytest.raises(SynthOutputError,
                       match="1 file.*does not record.*PASTIS-R/metadata.geojson.*nothing was changed"):
        write_world(tmp_path, size="tiny", products=["pastis"], overwrite=True)
    assert {f: (tmp_path / f).stat().st_mtime_ns for f in _files(tmp_path)} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".synth-staging")]


def test_missing_products_are_added_to_an_existing_world(tmp_path: Path) -> None:
    write_world(tmp_path, size="tiny", products=["pastis"])
    pastis_mtime = (tmp_path / "PASTIS-R" / "metadata.geojson").stat().st_mtime_ns
    got = write_world(tmp_path, size="tiny", products=["pastis", "burnscars"])
    assert set(got) == {"pastis", "burnscars"} and (got["burnscars"] / "training").is_dir()
    assert (tmp_path / "PASTIS-R" / "metadata.geojson").stat().st_mtime_ns == pastis_mtime  # not rewritten
    m = _manifest(tmp_path)
    assert set(m["files"]) == {"pastis", "burnscars"}
    assert {f for fs in m["files"].values() for f in fs} == _files(tmp_path) - {"world.json"}


def test_console_command_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "terratorch_eoplugins.cli", "synth", "--out", str(tmp_path),
                           "--size", "tiny", "--products", "pastis", "--overwrite"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "keep.txt" in proc.stderr and "no world.json" in proc.stderr
    assert proc.stderr.startswith("eoplugins synth: ") and "Traceback" not in proc.stderr
    assert _files(tmp_path) == {"keep.txt"}
