"""Tests of the PASTIS-R dataset and datamodule on hand-made real-format trees."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from pyproj import Transformer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from pastis_fixtures import default_patches, small_tree, write_pastis_tree  # noqa: E402

from terratorch_eoplugins.datamodules.pastis import PASTISDataModule  # noqa: E402
from terratorch_eoplugins.datasets.pastis import OFFICIAL_FOLD_ROTATIONS, PASTIS, PASTIS_CLASSES  # noqa: E402
from terratorch_eoplugins.errors import EODataError, EODatasetNotFoundError

REF = dt.date(2018, 9, 1)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Full tree: 2 patches per fold, variable S2 length, float16 S1, object date fields."""
    return write_pastis_tree(tmp_path_factory.mktemp("pastis") / "PASTIS-R")


@pytest.fixture(scope="module")
def gdal_tree(tmp_path_factory):
    """Date fields stored as JSON strings (what older GDAL returns), float32 S1."""
    return write_pastis_tree(tmp_path_factory.mktemp("pastis_str") / "PASTIS-R", default_patches(1),
                             date_style="string", s1_dtype=np.float32, seed=1)


@pytest.fixture
def small(tmp_path):
    """One patch per fold, 2-3 dates; tests may damage it."""
    return small_tree(tmp_path / "PASTIS-R")


def _raw(root: Path, mod: str, pid: int) -> np.ndarray:
    return np.load(root / f"DATA_{mod}" / f"{mod}_{pid}.npy")


def _linspace_idx(t: int, n: int) -> np.ndarray:
    return np.array([int(round(i * (t - 1) / (n - 1))) for i in range(n)])


# ---------------------------------------------------------------- reading and content
@pytest.mark.parametrize("style", ["dict", "dict_str", "string"])
def test_date_field_styles(tmp_path, style):
    tree = write_pastis_tree(tmp_path / "PASTIS-R", default_patches(1), date_style=style,
                             modalities=("S2",), seed=3)
    ds = PASTIS(tree.root, num_dates=None, normalize=False)
    assert len(ds) == 5
    for i in range(len(ds)):
        s = ds[i]
        want = [(d - REF).days for d in tree.dates[s["id_patch"]]["S2"]]
        assert s["dates"].dtype == torch.int64
        assert s["dates"].tolist() == want
        doy = [[d.year, d.timetuple().tm_yday] for d in tree.dates[s["id_patch"]]["S2"]]
        assert s["temporal_coords"].dtype == torch.float32
        assert s["temporal_coords"].tolist() == doy
        np.testing.assert_allclose(s["cloud_cover"].numpy(), tree.cloud[s["id_patch"]], rtol=1e-6)


def test_gdal_string_dates_and_multimodal(gdal_tree):
    ds = PASTIS(gdal_tree.root, modalities=("S2", "S1A", "S1D"), num_dates=4, normalize=False)
    s = ds[0]
    pid = s["id_patch"]
    assert set(s["image"]) == {"S2", "S1A", "S1D"} and set(s["dates"]) == {"S2", "S1A", "S1D"}
    for m, c in [("S2", 10), ("S1A", 3), ("S1D", 3)]:
        raw = _raw(gdal_tree.root, m, pid)
        idx = _linspace_idx(raw.shape[0], 4)
        assert s["image"][m].shape == (c, 4, 128, 128) and s["image"][m].dtype == torch.float32
        np.testing.assert_array_equal(s["image"][m].numpy(), raw[idx].astype(np.float32).transpose(1, 0, 2, 3))
        assert s["dates"][m].tolist() == [(gdal_tree.dates[pid][m][i] - REF).days for i in idx]
    # temporal_coords follow S2 even when it is not listed first
    s2 = PASTIS(gdal_tree.root, modalities=("S1D", "S2"), num_dates=4, normalize=False)[0]
    idx = _linspace_idx(len(gdal_tree.dates[pid]["S2"]), 4)
    assert s2["temporal_coords"][:, 1].tolist() == [gdal_tree.dates[pid]["S2"][i].timetuple().tm_yday for i in idx]
    s1 = PASTIS(gdal_tree.root, modalities=("S1D",), num_dates=4, normalize=False)[0]
    assert "cloud_cover" not in s1
    idx = _linspace_idx(len(gdal_tree.dates[pid]["S1D"]), 4)
    assert s1["temporal_coords"][:, 0].tolist() == [gdal_tree.dates[pid]["S1D"][i].year for i in idx]


def test_variable_t_native_and_linspace(tree):
    native = PASTIS(tree.root, num_dates=None, normalize=False)
    six = PASTIS(tree.root, num_dates=6, normalize=False)
    lengths = set()
    for i in range(len(native)):
        a, b = native[i], six[i]
        pid = a["id_patch"]
        raw = _raw(tree.root, "S2", pid)
        t = raw.shape[0]
        lengths.add(t)
        assert a["image"].shape == (10, t, 128, 128)
        np.testing.assert_array_equal(a["image"].numpy(), raw.astype(np.float32).transpose(1, 0, 2, 3))
        idx = _linspace_idx(t, 6)
        np.testing.assert_array_equal(six.date_indices(t), idx)
        assert b["image"].shape == (10, 6, 128, 128)
        np.testing.assert_array_equal(b["image"].numpy(), raw[idx].astype(np.float32).transpose(1, 0, 2, 3))
        assert b["dates"].tolist() == [(tree.dates[pid]["S2"][j] - REF).days for j in idx]
        np.testing.assert_allclose(b["cloud_cover"].numpy(), np.asarray(tree.cloud[pid])[idx], rtol=1e-6)
    assert len(lengths) > 3
    # fewer native dates than requested: indices repeat, as PANGAEA's linspace does
    np.testing.assert_array_equal(six.date_indices(4), [0, 1, 1, 2, 2, 3])


def test_georeferencing(tree):
    ds = PASTIS(tree.root, split="val", normalize=False)
    to_ll = Transformer.from_crs("EPSG:2154", "EPSG:4326", always_xy=True)
    for i in range(len(ds)):
        s = ds[i]
        assert s["crs"] == "EPSG:2154"
        assert s["fold"] == 4 and s["tile"] == "t31tfj"
        cx, cy = tree.centers[s["id_patch"]]
        lon, lat = to_ll.transform(cx, cy)
        np.testing.assert_allclose(s["location_coords"].numpy(), [lat, lon], atol=1e-4)
        assert s["location_coords"].dtype == torch.float32
        b = s["bounds"]
        assert b.dtype == torch.float64
        # a rotated 1280 m square: bounds contain the centre and are a bit wider than 1280 m
        assert b[0] < cx < b[2] and b[1] < cy < b[3]
        assert 1280 < float(b[2] - b[0]) < 1280 * 1.5 and 1280 < float(b[3] - b[1]) < 1280 * 1.5
        assert 42 < lat < 45 and 2 < lon < 5  # Occitanie


def test_splits_pangaea_and_official(tree):
    for split, folds in zip(("train", "val", "test"), ([1, 2, 3], [4], [5])):
        ds = PASTIS(tree.root, split=split, normalize=False)
        assert ds.ids == tree.ids(folds)
        assert {ds[i]["fold"] for i in range(len(ds))} == set(folds)
    for rot, (tr, va, te) in enumerate([([1, 2, 3], [4], [5]), ([2, 3, 4], [5], [1]), ([3, 4, 5], [1], [2]),
                                        ([4, 5, 1], [2], [3]), ([5, 1, 2], [3], [4])]):
        assert OFFICIAL_FOLD_ROTATIONS[rot] == (tuple(tr), tuple(va), tuple(te))
        got = {sp: PASTIS(tree.root, split=sp, protocol="official", fold_rotation=rot, normalize=False).ids
               for sp in ("train", "val", "test")}
        assert got == {"train": tree.ids(tr), "val": tree.ids(va), "test": tree.ids(te)}
        assert not set(got["train"]) & set(got["val"]) and not set(got["val"]) & set(got["test"])
    assert PASTIS(tree.root, normalize=False).ids == tree.ids([1, 2, 3, 4, 5])
    # explicit folds override the split
    assert PASTIS(tree.root, split="train", folds=[2, 5], normalize=False).ids == tree.ids([2, 5])


def test_normalisation_by_hand(tree):
    def expected(mod, pid, folds, idx):
        mean = np.mean([tree.norm[mod][f"Fold_{f}"]["mean"] for f in folds], axis=0)
        std = np.mean([tree.norm[mod][f"Fold_{f}"]["std"] for f in folds], axis=0)
        raw = _raw(tree.root, mod, pid)[idx].astype(np.float64)
        return ((raw - mean[None, :, None, None]) / std[None, :, None, None]).transpose(1, 0, 2, 3)

    ds = PASTIS(tree.root, split="test", modalities=("S2", "S1A"), num_dates=3)
    s = ds[0]
    for m in ("S2", "S1A"):
        idx = _linspace_idx(_raw(tree.root, m, s["id_patch"]).shape[0], 3)
        np.testing.assert_allclose(s["image"][m].numpy(), expected(m, s["id_patch"], [1, 2, 3], idx),
                                   rtol=1e-4, atol=1e-4)
    # official rotation 2: statistics of its train folds 3, 4, 5
    ds = PASTIS(tree.root, split="val", protocol="official", fold_rotation=2, num_dates=3)
    s = ds[0]
    idx = _linspace_idx(_raw(tree.root, "S2", s["id_patch"]).shape[0], 3)
    np.testing.assert_allclose(s["image"].numpy(), expected("S2", s["id_patch"], [3, 4, 5], idx), rtol=1e-4, atol=1e-4)
    # explicit norm folds
    s = PASTIS(tree.root, split="val", norm_folds=[2], num_dates=3)[0]
    idx = _linspace_idx(_raw(tree.root, "S2", s["id_patch"]).shape[0], 3)
    np.testing.assert_allclose(s["image"].numpy(), expected("S2", s["id_patch"], [2], idx), rtol=1e-4, atol=1e-4)


def test_void_mapping(tree):
    pid = tree.ids([1])[0]
    raw = np.load(tree.root / "ANNOTATIONS" / f"TARGET_{pid}.npy")[0].astype(np.int64)
    assert (raw == 19).any() and (raw == 0).any()
    for void, ncls in [(-1, 19), (None, 20), (255, 19), (19, 20)]:
        ds = PASTIS(tree.root, folds=[1], void_label=void, normalize=False)
        m = ds[ds.ids.index(pid)]["mask"]
        assert m.dtype == torch.int64 and m.shape == (128, 128)
        want = raw.copy()
        if void is not None:
            want[raw == 19] = void
        np.testing.assert_array_equal(m.numpy(), want)
        assert ds.num_classes == ncls and ds.class_names == list(PASTIS_CLASSES[:ncls])
    assert len(PASTIS.classes) == 20 and PASTIS.classes[19].startswith("Void")
    with pytest.raises(ValueError, match="void_label"):
        PASTIS(tree.root, void_label=3, normalize=False)


def test_label_fraction(tree):
    full = PASTIS(tree.root, normalize=False).ids
    a = PASTIS(tree.root, label_fraction=0.5, seed=7, normalize=False).ids
    b = PASTIS(tree.root, label_fraction=0.5, seed=7, normalize=False).ids
    assert a == b and len(a) == 5 and set(a) < set(full)
    others = {tuple(PASTIS(tree.root, label_fraction=0.5, seed=s, normalize=False).ids) for s in range(8)}
    assert len(others) > 1
    assert len(PASTIS(tree.root, split="train", label_fraction=0.01, normalize=False)) == 1
    with pytest.raises(ValueError, match="label fraction"):
        PASTIS(tree.root, label_fraction=0.0, normalize=False)


def test_transforms_applied(tree):
    def tf(sample):
        sample["image"] = sample["image"] * 0 + 1
        return sample

    s = PASTIS(tree.root, normalize=False, transforms=tf)[0]
    assert torch.all(s["image"] == 1)


def test_plot(tree, tmp_path):
    ds = PASTIS(tree.root, split="test", modalities=("S2", "S1A"))
    s = ds[0]
    s["prediction"] = s["mask"].clone()
    fig = ds.plot(s, suptitle="PASTIS", date_index=1)
    assert len(fig.axes) == 3
    fig.savefig(tmp_path / "pastis.png")
    fig2 = PASTIS(tree.root, split="test", modalities=("S1D",)).plot(ds[1] | {"image": ds[1]["image"]["S1A"]},
                                                                     show_titles=False)
    fig2.savefig(tmp_path / "pastis_s1.png")
    plt.close("all")
    for name in ("pastis.png", "pastis_s1.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    with pytest.raises(ValueError, match="date_index"):
        ds.plot(s, date_index=50)


def test_plot_modality_split_sample(tree):
    """terratorch's ``plot_sample`` moves a multi-modal ``image`` dict's entries to the sample's top level."""
    ds = PASTIS(tree.root, split="test", modalities=("S2", "S1A"))
    s = ds[0]
    split = {k: v for k, v in s.items() if k != "image"} | dict(s["image"])
    split["prediction"] = s["mask"].clone()
    fig = ds.plot(split)
    ref = ds.plot(s | {"prediction": s["mask"].clone()})
    assert len(fig.axes) == 3
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), ref.axes[0].images[0].get_array())
    plt.close("all")
    with pytest.raises(KeyError, match="no 'image' and none of the modalities"):
        ds.plot({"mask": s["mask"]})


# ---------------------------------------------------------------- datamodule
def test_datamodule_batches(tree):
    dm = PASTISDataModule(root=str(tree.root), batch_size=2, num_dates=4,
                          batch_keys=("temporal_coords", "location_coords"))
    assert dm.num_classes == 19 and dm.class_names == list(PASTIS_CLASSES[:19]) and dm.ignore_index == -1
    dm.setup("fit")
    assert sorted(dm.train_dataset.ids) == tree.ids([1, 2, 3]) and dm.val_dataset.ids == tree.ids([4])
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "mask", "filename", "temporal_coords", "location_coords"}
    assert batch["image"].shape == (2, 10, 4, 128, 128) and batch["mask"].shape == (2, 128, 128)
    assert batch["temporal_coords"].shape == (2, 4, 2) and batch["location_coords"].shape == (2, 2)
    assert set(next(iter(dm.val_dataloader()))) == {"image", "mask", "filename", "temporal_coords",
                                                   "location_coords"}
    dm.setup("test")
    assert dm.test_dataset.ids == tree.ids([5])
    dm.setup("predict")
    assert dm.predict_dataset.ids == tree.ids([5])
    assert next(iter(dm.predict_dataloader()))["image"].shape[0] == 2

    # every key, several modalities, official protocol; norm stats always from the train folds
    dm = PASTISDataModule(root=str(tree.root), modalities=("S2", "S1A"), protocol="official", fold_rotation=3,
                          batch_size=2, num_dates=3, batch_keys=None, void_label=None, label_fraction=0.5, seed=1)
    assert dm.num_classes == 20 and dm.ignore_index == 19
    dm.setup("fit")
    dm.setup("test")
    assert set(dm.train_dataset.ids) < set(tree.ids([4, 5, 1])) and len(dm.train_dataset) == 3
    assert dm.val_dataset.ids == tree.ids([2]) and dm.test_dataset.ids == tree.ids([3])
    assert dm.test_dataset.norm_folds == (4, 5, 1) and dm.val_dataset.label_fraction == 1.0
    batch = next(iter(dm.test_dataloader()))
    assert {"image", "mask", "dates", "temporal_coords", "location_coords", "crs", "bounds", "id_patch", "fold",
            "tile", "cloud_cover"} <= set(batch)
    assert batch["image"]["S2"].shape == (2, 10, 3, 128, 128) and batch["image"]["S1A"].shape == (2, 3, 3, 128, 128)
    assert batch["bounds"].shape == (2, 4) and batch["crs"] == ["EPSG:2154"] * 2
    assert batch["fold"].tolist() == [3, 3]
    assert batch["dates"]["S1A"].shape == (2, 3)


def test_datamodule_variable_t_and_bad_args(tree):
    dm = PASTISDataModule(root=str(tree.root), num_dates=None, batch_size=1, batch_keys=("dates",))
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"image", "mask", "filename", "dates"} and batch["image"].shape[2] == batch["dates"].shape[1]
    with pytest.raises(ValueError, match="fold_rotation"):
        PASTISDataModule(root=str(tree.root), protocol="pangaea", fold_rotation=1)
    with pytest.raises(ValueError, match="protocol"):
        PASTISDataModule(root=str(tree.root), protocol="utae")
    with pytest.raises(ValueError, match="label_fraction"):
        PASTISDataModule(root=str(tree.root), label_fraction=1.5)


def test_datamodule_from_yaml_class_path(tree):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--data", type=PASTISDataModule)
    cfg = parser.parse_object({"data": {"class_path": "terratorch_eoplugins.datamodules.pastis.PASTISDataModule",
                                        "init_args": {"root": str(tree.root), "num_dates": 2, "batch_size": 1,
                                                      "modalities": ["S2", "S1D"]}}})
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, PASTISDataModule)
    dm.setup("test")
    assert dm.test_dataset[0]["image"]["S1D"].shape == (3, 2, 128, 128)


# ---------------------------------------------------------------- errors
def test_missing_root_and_folders(small, tmp_path):
    with pytest.raises(EODatasetNotFoundError, match="nowhere"):
        PASTIS(tmp_path / "nowhere")
    shutil.rmtree(small.root / "DATA_S1A")
    (small.root / "NORM_S1A_patch.json").unlink()
    assert len(PASTIS(small.root)) == 5  # S1A not requested: its absence does not matter
    with pytest.raises(EODatasetNotFoundError, match="DATA_S1A"):
        PASTIS(small.root, modalities=("S2", "S1A"))
    with pytest.raises(EODatasetNotFoundError, match="NORM_S1A_patch.json"):
        shutil.copytree(small.root / "DATA_S1D", small.root / "DATA_S1A")
        PASTIS(small.root, modalities=("S1A",))
    assert len(PASTIS(small.root, modalities=("S1A",), normalize=False)) == 5
    shutil.rmtree(small.root / "ANNOTATIONS")
    with pytest.raises(EODatasetNotFoundError, match="ANNOTATIONS"):
        PASTIS(small.root)


def test_missing_metadata(small):
    (small.root / "metadata.geojson").unlink()
    with pytest.raises(EODatasetNotFoundError, match="metadata.geojson"):
        PASTIS(small.root)


def _edit_metadata(root: Path, fn) -> None:
    path = root / "metadata.geojson"
    fc = json.loads(path.read_text())
    fn(fc)
    path.write_text(json.dumps(fc))


@pytest.mark.parametrize("field", ["Fold", "ID_PATCH", "dates-S1A", "dates-S2"])
def test_missing_metadata_field(small, field):
    def drop(fc):
        for f in fc["features"]:
            del f["properties"][field]

    _edit_metadata(small.root, drop)
    with pytest.raises(EODataError, match=rf"metadata.geojson.*{field}"):
        PASTIS(small.root, modalities=("S2", "S1A"))
    if field == "dates-S1A":
        assert len(PASTIS(small.root)) == 5


def test_wrong_crs(tmp_path):
    """Without the crs member GeoJSON means EPSG:4326, so Lambert-93 coordinates are invalid."""
    tree = small_tree(tmp_path / "PASTIS-R", with_crs=False, modalities=("S2",))
    with pytest.raises(EODataError, match=r"metadata.geojson.*EPSG:4326.*EPSG:2154"):
        PASTIS(tree.root)


def test_bad_date_values(small):
    def bad(fc):
        fc["features"][0]["properties"]["dates-S2"] = {"0": 20181340, "1": 20181002}

    _edit_metadata(small.root, bad)
    with pytest.raises(EODataError, match=r"dates-S2.*20181340.*YYYYMMDD"):
        PASTIS(small.root)


def test_no_patch_in_folds(small):
    def only_fold_1(fc):
        for f in fc["features"]:
            f["properties"]["Fold"] = 1

    _edit_metadata(small.root, only_fold_1)
    with pytest.raises(EODataError, match=r"no patch in folds \[5\].*metadata|metadata.*no patch in folds \[5\]"):
        PASTIS(small.root, split="test", normalize=False)


def test_invalid_arguments(small):
    with pytest.raises(ValueError, match="folds"):
        PASTIS(small.root, folds=[0, 6])
    with pytest.raises(ValueError, match="folds"):
        PASTIS(small.root, folds=[])
    with pytest.raises(ValueError, match="norm_folds"):
        PASTIS(small.root, norm_folds=[7])
    with pytest.raises(ValueError, match="protocol"):
        PASTIS(small.root, protocol="utae")
    with pytest.raises(ValueError, match="fold_rotation"):
        PASTIS(small.root, protocol="pangaea", fold_rotation=2)
    with pytest.raises(ValueError, match="fold_rotation"):
        PASTIS(small.root, protocol="official", fold_rotation=5)
    with pytest.raises(ValueError, match="split"):
        PASTIS(small.root, split="training")
    with pytest.raises(ValueError, match="modalities"):
        PASTIS(small.root, modalities=("S2", "SPOT"))
    with pytest.raises(ValueError, match="num_dates"):
        PASTIS(small.root, num_dates=0)
    with pytest.raises(ValueError, match="reference_date"):
        PASTIS(small.root, reference_date="01/09/2018")


def test_bad_norm_file(small):
    path = small.root / "NORM_S2_patch.json"
    stats = json.loads(path.read_text())
    del stats["Fold_2"]
    path.write_text(json.dumps(stats))
    with pytest.raises(EODataError, match=r"NORM_S2_patch.json.*Fold_2"):
        PASTIS(small.root)
    assert len(PASTIS(small.root, norm_folds=[1, 3])) == 5
    stats["Fold_2"] = {"mean": [0.0] * 9, "std": [1.0] * 9}
    path.write_text(json.dumps(stats))
    with pytest.raises(EODataError, match=r"NORM_S2_patch.json.*10 values"):
        PASTIS(small.root)


@pytest.mark.parametrize(
    "mod,array,match",
    [
        ("S2", np.zeros((2, 9, 128, 128), np.int16), r"expected shape \*x10x128x128, got 2x9x128x128"),
        ("S2", np.zeros((2, 10, 64, 64), np.int16), r"expected shape \*x10x128x128, got 2x10x64x64"),
        ("S2", np.zeros((10, 128, 128), np.int16), r"expected a 4-D array"),
        ("S2", np.zeros((2, 10, 128, 128), np.float64), r"expected dtype int16, got float64"),
        ("S2", np.zeros((5, 10, 128, 128), np.int16), r"5 dates in the array but 2 in .*metadata.geojson"),
        ("S1A", np.zeros((2, 2, 128, 128), np.float16), r"expected shape \*x3x128x128"),
        ("S1A", np.zeros((2, 3, 128, 128), np.int16), r"expected dtype float16 or float32, got int16"),
        ("S1A", np.full((2, 3, 128, 128), np.nan, np.float32), r"NaN"),
        ("TARGET", np.zeros((3, 128, 128), np.int16), r"expected dtype uint8, got int16"),
        ("TARGET", np.zeros((128, 128), np.uint8), r"expected a 3-D array"),
        ("TARGET", np.full((3, 128, 128), 25, np.uint8), r"classes must be in 0..19"),
    ],
)
def test_bad_patch_files(small, mod, array, match):
    pid = small.patches[0].id_patch  # fold 1, 2 S2 dates, 2 S1A dates
    path = (small.root / "ANNOTATIONS" / f"TARGET_{pid}.npy" if mod == "TARGET"
            else small.root / f"DATA_{mod}" / f"{mod}_{pid}.npy")
    np.save(path, array)
    ds = PASTIS(small.root, folds=[1], modalities=("S2", "S1A"))
    with pytest.raises(EODataError, match=match) as err:
        ds[0]
    assert path.name in str(err.value)


def test_missing_patch_file(small):
    pid = small.patches[1].id_patch
    (small.root / "DATA_S1D" / f"S1D_{pid}.npy").unlink()
    ds = PASTIS(small.root, folds=[2], modalities=("S1D",))
    with pytest.raises(EODatasetNotFoundError, match=f"S1D_{pid}.npy"):
        ds[0]
    (small.root / "ANNOTATIONS" / f"TARGET_{pid}.npy").unlink()
    with pytest.raises(EODatasetNotFoundError, match=f"TARGET_{pid}.npy"):
        PASTIS(small.root, folds=[2])[0]


def test_duplicate_ids_and_mismatched_cloud(small):
    def dup(fc):
        fc["features"][1]["properties"]["ID_PATCH"] = fc["features"][0]["properties"]["ID_PATCH"]

    _edit_metadata(small.root, dup)
    with pytest.raises(EODataError, match="duplicated ID_PATCH"):
        PASTIS(small.root)


def test_cloud_cover_length_mismatch(small):
    def bad(fc):
        fc["features"][0]["properties"]["cloudcover-S2"] = {"0": 0.5}

    _edit_metadata(small.root, bad)
    with pytest.raises(EODataError, match="cloudcover-S2.*1 values for 2 S2 dates"):
        PASTIS(small.root)
    assert len(PASTIS(small.root, modalities=("S1A",))) == 5  # only read with S2


# ---------------------------------------------------------------- synthetic world
def test_synthetic_world_pastis(tmp_path):
    synthetic = pytest.importorskip("terratorch_eoplugins.synthetic")
    if not hasattr(synthetic, "write_world"):
        pytest.skip("terratorch_eoplugins.synthetic.write_world is not available yet")
    synthetic.write_world(tmp_path, size="tiny", seed=0, products=("pastis",))
    root = tmp_path / "PASTIS-R"
    ds = PASTIS(root, split=None, modalities=("S2", "S1A", "S1D"), num_dates=6)
    assert len(ds) > 0
    s = ds[0]
    assert s["image"]["S2"].shape == (10, 6, 128, 128) and s["mask"].shape == (128, 128)
    assert torch.isfinite(s["image"]["S2"]).all() and s["crs"] == "EPSG:2154"
    assert s["dates"]["S2"].shape == (6,) and (s["dates"]["S2"].diff() >= 0).all()
    dm = PASTISDataModule(root=str(root), batch_size=1, num_dates=6)
    dm.setup("fit")
    assert len(dm.train_dataset) > 0 and len(dm.val_dataset) > 0
    assert next(iter(dm.train_dataloader()))["image"].shape == (1, 10, 6, 128, 128)
