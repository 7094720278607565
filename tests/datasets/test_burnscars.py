"""Tests of the HLS Burn Scars dataset, datamodule and synthetic writer."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import rasterio  # noqa: E402
import torch  # noqa: E402
from affine import Affine  # noqa: E402
from pyproj import CRS as PyCRS  # noqa: E402
from pyproj import Transformer  # noqa: E402
from rasterio.crs import CRS  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from terratorch_eoplugins.datamodules.burnscars import HLSBurnScarsDataModule  # noqa: E402
from terratorch_eoplugins.datasets.burnscars import HLSBurnScars, epsg_of  # noqa: E402
from terratorch_eoplugins.errors import EODataError, EODatasetNotFoundError
from terratorch_eoplugins.synthetic.burnscars import (  # noqa: E402
    burn_map,
    burnscars_scenes,
    render_scene,
    utm_wkt,
    write_burnscars,
)

PRITHVI_MEANS = [0.033349706741586264, 0.05701185520536176, 0.05889748132001316,
                 0.2323245113436119, 0.1972854853760658, 0.11944914225186566]
PRITHVI_STDS = [0.02269135568823774, 0.026807560223070237, 0.04004109844362779,
                0.07791732423672691, 0.08708738838140137, 0.07241979477437814]
NAME = re.compile(r"^subsetted_512x512_HLS\.S30\.T[0-9A-Z]{5}\.(\d{4})(\d{3})\.v1\.4(_merged|\.mask)\.tif$")
ORIGIN = (716760.0, 5213190.0)  # a real T10TGT scene origin


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return write_burnscars(tmp_path_factory.mktemp("synth"), "tiny", seed=0)


def write_pair(folder: Path, tile: str = "T10TGT", date: str = "2019235", *, size: int = 32,
               image: np.ndarray | None = None, mask: np.ndarray | None = None, dtype: str = "float64",
               crs: CRS | None | str = "utm", mask_crs: CRS | None | str = "same", transform: Affine | None = None,
               mask_transform: Affine | None = None, mask_size: int | None = None, nodata: float | None = None,
               write_image: bool = True, write_mask: bool = True, seed: int = 0) -> tuple[Path, Path]:
    """Write one hand-made real-format pair (pixel-interleaved image, int16 mask)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stem = f"subsetted_512x512_HLS.S30.{tile}.{date}.v1.4"
    if image is None:
        image = rng.uniform(0.01, 0.4, (6, size, size))
    ms = mask_size or image.shape[-1]
    if mask is None:
        mask = rng.integers(0, 2, (ms, ms)).astype(np.int16)
    crs_obj = CRS.from_wkt(utm_wkt(10)) if crs == "utm" else crs
    mcrs = crs_obj if mask_crs == "same" else mask_crs
    transform = transform or Affine(30, 0, ORIGIN[0], 0, -30, ORIGIN[1])
    ipath, mpath = folder / f"{stem}_merged.tif", folder / f"{stem}.mask.tif"
    if write_image:
        with rasterio.open(ipath, "w", driver="GTiff", width=image.shape[2], height=image.shape[1],
                           count=image.shape[0], dtype=dtype, crs=crs_obj, transform=transform,
                           interleave="pixel", nodata=nodata) as dst:
            dst.write(image.astype(dtype))
    if write_mask:
        with rasterio.open(mpath, "w", driver="GTiff", width=mask.shape[-1], height=mask.shape[-2],
                           count=1 if mask.ndim == 2 else mask.shape[0], dtype=mask.dtype, crs=mcrs,
                           transform=mask_transform or transform) as dst:
            dst.write(mask[None] if mask.ndim == 2 else mask)
    return ipath, mpath


def hand_tree(root: Path, n_train: int = 3, n_val: int = 2, **kw) -> Path:
    for i in range(n_train):
        write_pair(root / "training", date=f"2019{200 + i:03d}", seed=i, **kw)
    for i in range(n_val):
        write_pair(root / "validation", tile="T11SMT", date=f"2020{180 + i:03d}", seed=100 + i, **kw)
    return root


def raw(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


# ------------------------------------------------------------------------------ synthetic writer
def test_synthetic_tree_is_real_format(synth):
    train = sorted((synth / "training").iterdir())
    val = sorted((synth / "validation").iterdir())
    assert len(train) == 10 and len(val) == 4
    scenes = {s.stem: s for s in burnscars_scenes("tiny", 0)}
    fractions = []
    for path in train + val:
        m = NAME.match(path.name)
        assert m, path.name
        assert 2018 <= int(m.group(1)) <= 2021 and 150 <= int(m.group(2)) <= 305
        with rasterio.open(path) as src:
            assert (src.width, src.height) == (512, 512)
            assert src.transform.a == 30 and src.transform.e == -30
            assert src.transform.c % 30 == 0 and src.transform.f % 30 == 0
            assert src.crs.to_epsg() is None  # non-EPSG WKT like the real files
            assert epsg_of(src.crs.to_wkt()) in range(32610, 32614)
            data = src.read()
            if m.group(3) == "_merged":
                assert src.count == 6 and src.dtypes[0] == "float32" and src.interleaving.name.upper() == "PIXEL"
                assert np.nanmax(data[data != 9999]) < 1.6
            else:
                assert src.count == 1 and src.dtypes[0] == "int16"
                assert set(np.unique(data)) <= {-1, 0, 1}
                fractions.append((data == 1).mean())
                stem = path.name[: -len(".mask.tif")]
                scene = scenes[stem]
                assert src.transform == scene.transform
                # the public burn map is the mask's burned region (no-data regions aside)
                bm = burn_map(scene)
                assert np.array_equal(bm[data[0] >= 0], data[0][data[0] >= 0] == 1)
    assert all(0.03 <= f <= 0.22 for f in fractions) and np.mean(fractions) > 0.06
    # where the image has no data (9999 in every band), the mask says -1; some scenes have such edges
    edges = 0
    for image_path in [p for p in train + val if p.name.endswith("_merged.tif")]:
        img = raw(image_path)
        msk = raw(image_path.with_name(image_path.name.replace("_merged.tif", ".mask.tif")))[0]
        nodata = (img == 9999).any(0)
        assert np.array_equal(nodata, (img == 9999).all(0)) and np.all(msk[nodata] == -1)
        edges += nodata.any()
    assert edges >= 1


def test_synthetic_deterministic_and_seeded():
    a, b = burnscars_scenes("tiny", 3), burnscars_scenes("tiny", 3)
    assert a == b and a != burnscars_scenes("tiny", 4)
    assert len(burnscars_scenes("demo", 0)) == 32
    img1, m1 = render_scene(a[0])
    img2, m2 = render_scene(b[0])
    assert np.array_equal(img1, img2) and np.array_equal(m1, m2)
    with pytest.raises(ValueError, match="unknown burn-scars size"):
        burnscars_scenes("huge")


def test_burn_map_other_resolution():
    scene = burnscars_scenes("tiny", 0)[0]
    world = scene.world()
    m30 = burn_map(scene, world=world)
    m10 = burn_map(scene, 10.0, world=world)
    assert m10.shape == (1536, 1536)
    # the 10 m pixel at the centre of each 30 m pixel agrees with the 30 m map almost everywhere
    assert (m10[1::3, 1::3] == m30).mean() > 0.99
    assert abs(m10.mean() - m30.mean()) < 0.01
    with pytest.raises(ValueError, match="whole pixels"):
        burn_map(scene, 7.0, world=world)


def test_synthetic_signal_is_learnable(synth):
    """A per-pixel threshold on NBR, fitted on training scenes, finds the burn scars of the test scenes."""
    def nbr_and_mask(split):
        ds = HLSBurnScars(synth, split, normalize=False)
        out = []
        for i in range(len(ds)):
            s = ds[i]
            nir, swir2 = s["image"][3].numpy(), s["image"][5].numpy()
            out.append(((nir - swir2) / (nir + swir2 + 1e-6), s["mask"].numpy()))
        return out

    def iou(pairs, thr):
        inter = sum(((n < thr) & (m == 1)).sum() for n, m in pairs)
        union = sum((((n < thr) | (m == 1)) & (m >= 0)).sum() for n, m in pairs)
        return inter / union

    train = nbr_and_mask("train") + nbr_and_mask("val")
    best = max(np.linspace(-0.5, 0.5, 41), key=lambda t: iou(train, t))
    test = nbr_and_mask("test")
    assert iou(test, best) > 0.7  # predicting all "not burned" gives a burn IoU of 0
    # burned pixels: NIR lower and SWIR2 higher than unburned vegetation on average (dNBR > 0)
    n, m = test[0]
    assert n[m == 1].mean() < n[m == 0].mean() - 0.3


# ------------------------------------------------------------------------------------- dataset
def test_splits_follow_pangaea(synth, tmp_path):
    train, val, test = (HLSBurnScars(synth, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (4, 1, 2)
    files = sorted(p for p in (synth / "training").glob("*_merged.tif"))
    tr, va = train_test_split(files, test_size=0.1, random_state=23)  # PANGAEA's call
    assert [Path(s["image"]) for s in train.scenes] == tr and [Path(s["image"]) for s in val.scenes] == va
    assert {s["image"].parent.name for s in test.scenes} == {"validation"}

    root = hand_tree(tmp_path / "bs", n_train=20, n_val=1, size=8)
    tr20 = HLSBurnScars(root, "train")
    va20 = HLSBurnScars(root, "val")
    assert (len(tr20), len(va20)) == (18, 2)
    names = lambda ds: [s["image"].name for s in ds.scenes]  # noqa: E731
    assert names(tr20) == names(HLSBurnScars(root, "train"))  # deterministic
    assert set(names(tr20)).isdisjoint(names(va20)) and len(set(names(tr20)) | set(names(va20))) == 20
    other = HLSBurnScars(root, "val", split_seed=0)
    assert names(other) != names(va20)
    # label fraction: subset of the train split, deterministic by seed, val/test untouched
    half = HLSBurnScars(root, "train", label_fraction=0.5, seed=1)
    assert len(half) == 9 and set(names(half)) <= set(names(tr20))
    assert names(half) == names(HLSBurnScars(root, "train", label_fraction=0.5, seed=1))
    assert len(HLSBurnScars(root, "val", label_fraction=0.5)) == 2
    with pytest.raises(ValueError, match="label_fraction"):
        HLSBurnScars(root, "train", label_fraction=0.0)


def test_sample_metadata(tmp_path):
    root = hand_tree(tmp_path / "bs", n_train=2, n_val=1)
    ds = HLSBurnScars(root, "test")
    s = ds[0]
    assert set(s) == {"image", "mask", "crs", "transform", "bounds", "tile", "date", "temporal_coords",
                      "location_coords", "filename"}
    assert s["image"].dtype == torch.float32 and s["image"].shape == (6, 32, 32)
    assert s["mask"].dtype == torch.long and s["mask"].shape == (32, 32)
    assert s["tile"] == "T11SMT" and s["date"] == "2020-06-28"  # 2020 is a leap year: DOY 180 = June 28
    assert s["temporal_coords"].tolist() == [[2020.0, 180.0]]
    assert s["filename"].endswith("subsetted_512x512_HLS.S30.T11SMT.2020180.v1.4_merged.tif")
    assert CRS.from_wkt(s["crs"]) == CRS.from_wkt(utm_wkt(10)) and epsg_of(s["crs"]) == 32610
    assert s["transform"].dtype == torch.float64
    assert s["transform"].tolist() == [30.0, 0.0, ORIGIN[0], 0.0, -30.0, ORIGIN[1]]
    assert s["bounds"].tolist() == [ORIGIN[0], ORIGIN[1] - 960, ORIGIN[0] + 960, ORIGIN[1]]
    lon, lat = Transformer.from_crs(PyCRS.from_epsg(32610), "EPSG:4326", always_xy=True).transform(
        ORIGIN[0] + 480, ORIGIN[1] - 480)
    assert torch.allclose(s["location_coords"], torch.tensor([lat, lon]), atol=1e-4)
    assert 46 < lat < 48 and -121 < lon < -119  # T10TGT, eastern Washington/Oregon
    assert torch.equal(s["mask"], torch.from_numpy(raw(ds.scenes[0]["mask"])[0].astype(np.int64)))


def test_normalisation(tmp_path):
    root = hand_tree(tmp_path / "bs", n_train=2, n_val=1)
    path = HLSBurnScars(root, "test").scenes[0]["image"]
    img = raw(path)
    s = HLSBurnScars(root, "test")[0]["image"].double().numpy()
    expected = (img - np.array(PRITHVI_MEANS)[:, None, None]) / np.array(PRITHVI_STDS)[:, None, None]
    np.testing.assert_allclose(s, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(HLSBurnScars(root, "test", normalize=False)[0]["image"].numpy(), img, rtol=1e-6)
    # custom statistics for a band subset, as a sequence or a mapping; band aliases
    ds = HLSBurnScars(root, "test", bands=["SWIR_2", "b8a"], means=[0.1, 0.2], stds=[0.5, 0.25])
    assert ds.bands == ("SWIR_2", "NIR_NARROW")
    np.testing.assert_allclose(ds[0]["image"].numpy(), (img[[5, 3]] - [[[0.1]], [[0.2]]]) / [[[0.5]], [[0.25]]],
                               rtol=1e-5, atol=1e-6)
    ds = HLSBurnScars(root, "test", bands=["RED"], means={"B04": 0.1}, stds={"RED": 2.0})
    np.testing.assert_allclose(ds[0]["image"].numpy(), (img[[2]] - 0.1) / 2.0, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="means: expected 2 values"):
        HLSBurnScars(root, "test", bands=["RED", "NIR"], means=[0.1] * 6, stds=[1.0, 1.0])
    with pytest.raises(ValueError, match="stds"):
        HLSBurnScars(root, "test", bands=["RED"], means=[0.1], stds=[0.0])
    with pytest.raises(ValueError, match=r"no value for bands \['RED'\]"):
        HLSBurnScars(root, "test", bands=["RED"], means={"BLUE": 0.1}, stds=[1.0])


def test_no_data_handling(tmp_path):
    image = np.random.default_rng(0).uniform(0.05, 0.3, (6, 16, 16))
    image[:, 0, :4] = 9999.0  # edge no-data in every band
    image[2, 5, 5] = np.nan  # NaN in one band
    image[4, 7, 7] = -5.0  # the file's nodata tag
    mask = np.zeros((16, 16), np.int16)
    mask[5:8, 5:8] = 1
    mask[10, 10] = -1
    for i in range(2):
        write_pair(tmp_path / "training", date=f"2019{200 + i:03d}", image=image, mask=mask, nodata=-5.0)
    write_pair(tmp_path / "validation", image=image, mask=mask, nodata=-5.0)
    s = HLSBurnScars(tmp_path, "test", normalize=False)[0]
    img, m = s["image"].numpy(), s["mask"].numpy()
    assert np.all(img[:, 0, :4] == 0.0) and img[2, 5, 5] == 0.0 and img[4, 7, 7] == 0.0
    assert np.isfinite(img).all()
    assert np.all(m[0, :4] == -1) and m[5, 5] == -1 and m[7, 7] == -1 and m[10, 10] == -1
    assert m[6, 6] == 1 and (m == 1).sum() == 7 and (m == -1).sum() == 7
    valid = np.ones((16, 16), bool)
    valid[0, :4] = valid[5, 5] = valid[7, 7] = False
    np.testing.assert_allclose(img[:, valid], image[:, valid], rtol=1e-6)
    # replacement value is configurable and happens before normalisation
    s = HLSBurnScars(tmp_path, "test", no_data_replace=0.5, means=[0.5] * 6, stds=[2.0] * 6)[0]
    assert np.all(s["image"].numpy()[:, 0, :4] == 0.0)
    # a float mask with NaN marks no data
    fmask = mask.astype(np.float32)
    fmask[3, 3] = np.nan
    write_pair(tmp_path / "validation", image=image, mask=fmask, nodata=-5.0)
    assert HLSBurnScars(tmp_path, "test")[0]["mask"][3, 3] == -1


def test_crops_train_only(synth):
    ds = HLSBurnScars(synth, "train", crop_size=100)
    full = HLSBurnScars(synth, "val", crop_size=100)
    torch.manual_seed(0)
    origins = set()
    for _ in range(3):
        s = ds[0]
        assert s["image"].shape == (6, 100, 100) and s["mask"].shape == (100, 100)
        t = s["transform"].tolist()
        with rasterio.open(s["filename"]) as src:
            col, row = round((t[2] - src.transform.c) / 30), round((src.transform.f - t[5]) / 30)
            assert 0 <= col <= 412 and 0 <= row <= 412
            window = src.read(window=rasterio.windows.Window(col, row, 100, 100))
        origins.add((row, col))
        np.testing.assert_allclose(s["image"].numpy(), (np.where(window == 9999, 0, window) - ds.means[:, None, None])
                                   / ds.stds[:, None, None], rtol=1e-4, atol=1e-4)
        cx, cy = t[2] + 50 * 30, t[5] - 50 * 30
        lon, lat = Transformer.from_crs(PyCRS.from_wkt(s["crs"]), "EPSG:4326", always_xy=True).transform(cx, cy)
        assert torch.allclose(s["location_coords"], torch.tensor([lat, lon]), atol=1e-4)
    assert len(origins) > 1  # random
    assert full[0]["image"].shape == (6, 512, 512)
    assert HLSBurnScars(synth, "test", crop_size=100)[0]["mask"].shape == (512, 512)
    with pytest.raises(ValueError, match="larger than the scene"):
        HLSBurnScars(synth, "train", crop_size=600)[0]
    with pytest.raises(ValueError, match="crop_size"):
        HLSBurnScars(synth, "train", crop_size=0)


def test_plot(synth):
    ds = HLSBurnScars(synth, "test")
    s = ds[0]
    s["prediction"] = (s["mask"] == 1).long()
    fig = ds.plot(s, suptitle="x")
    assert len(fig.axes) == 3 and "EPSG:326" in fig.axes[0].get_title()
    plt.close(fig)
    fc = HLSBurnScars(synth, "test", bands=["RED", "NIR_NARROW", "SWIR_2"])
    fig = fc.plot({"image": fc[0]["image"], "mask": fc[0]["mask"]}, show_titles=False)
    assert len(fig.axes) == 2
    plt.close(fig)


def test_ignores_unrelated_files(tmp_path, caplog):
    root = hand_tree(tmp_path / "bs", n_train=2, n_val=1)
    (root / "validation" / "index.txt").write_text("x")
    (root / "validation" / "subsetted_512x512_HLS.S30.T11SMT.2020180.v1.4_merged.tif.aux.xml").write_text("x")
    (root / "validation" / "sub").mkdir()
    with caplog.at_level(logging.INFO, logger="terratorch_eoplugins.datasets"):
        assert len(HLSBurnScars(root, "test")) == 1
    assert "ignored 3 entries" in caplog.text


# -------------------------------------------------------------------------------------- errors
def test_missing_root_and_folders(tmp_path):
    with pytest.raises(EODatasetNotFoundError, match="root folder not found"):
        HLSBurnScars(tmp_path / "nope", "train")
    write_pair(tmp_path / "bs" / "training")
    with pytest.raises(EODatasetNotFoundError, match="validation/ folder not found"):
        HLSBurnScars(tmp_path / "bs", "test")
    (tmp_path / "bs" / "validation").mkdir()
    (tmp_path / "bs" / "validation" / "notes.txt").write_text("x")
    with pytest.raises(EODatasetNotFoundError, match="HLS Burn Scars scenes"):
        HLSBurnScars(tmp_path / "bs", "test")
    with pytest.raises(EODataError, match="at least 2 scenes"):
        HLSBurnScars(tmp_path / "bs", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        HLSBurnScars(tmp_path / "bs", "validation")


def test_missing_partner(tmp_path):
    write_pair(tmp_path / "a" / "validation", write_mask=False)
    with pytest.raises(EODataError, match=r"_merged\.tif: no mask; expected .*v1\.4\.mask\.tif"):
        HLSBurnScars(tmp_path / "a", "test")
    write_pair(tmp_path / "b" / "validation", write_image=False)
    with pytest.raises(EODataError, match=r"\.mask\.tif: no image; expected .*v1\.4_merged\.tif"):
        HLSBurnScars(tmp_path / "b", "test")


def test_invalid_date_in_name(tmp_path):
    write_pair(tmp_path / "validation", date="2019367")
    with pytest.raises(EODataError, match="invalid acquisition date '2019367'"):
        HLSBurnScars(tmp_path, "test")


@pytest.mark.parametrize("bands", [5, 12])
def test_wrong_band_count(tmp_path, bands):
    write_pair(tmp_path / "validation", image=np.full((bands, 8, 8), 0.1))
    ds = HLSBurnScars(tmp_path, "test")
    with pytest.raises(EODataError, match=rf"_merged\.tif: expected 6 bands .* got {bands}"):
        ds[0]


def test_bad_masks(tmp_path):
    write_pair(tmp_path / "a" / "validation", mask=np.array([[0, 1], [2, 255]], np.int16), size=2)
    with pytest.raises(EODataError, match=r"\.mask\.tif: mask values must be -1.*found \[2, 255\]"):
        HLSBurnScars(tmp_path / "a", "test")[0]
    write_pair(tmp_path / "b" / "validation", mask=np.zeros((2, 8, 8), np.int16))
    with pytest.raises(EODataError, match="expected 1 mask band, got 2"):
        HLSBurnScars(tmp_path / "b", "test")[0]


def test_integer_image_rejected(tmp_path):
    write_pair(tmp_path / "validation", image=np.full((6, 8, 8), 1000), dtype="int16")
    with pytest.raises(EODataError, match="expected float reflectance bands, got dtype int16"):
        HLSBurnScars(tmp_path, "test")[0]


def test_missing_crs(tmp_path):
    write_pair(tmp_path / "a" / "validation", crs=None, mask_crs=None)
    with pytest.raises(EODataError, match=r"_merged\.tif: no CRS"):
        HLSBurnScars(tmp_path / "a", "test")[0]
    write_pair(tmp_path / "b" / "validation", mask_crs=None)
    with pytest.raises(EODataError, match=r"\.mask\.tif: no CRS"):
        HLSBurnScars(tmp_path / "b", "test")[0]


def test_image_mask_mismatch(tmp_path):
    write_pair(tmp_path / "a" / "validation", mask_crs=CRS.from_epsg(32611))
    with pytest.raises(EODataError, match="mask CRS differs"):
        HLSBurnScars(tmp_path / "a", "test")[0]
    write_pair(tmp_path / "b" / "validation", mask_transform=Affine(30, 0, ORIGIN[0] + 30, 0, -30, ORIGIN[1]))
    with pytest.raises(EODataError, match="mask transform .* differs"):
        HLSBurnScars(tmp_path / "b", "test")[0]
    write_pair(tmp_path / "c" / "validation", mask_size=16)
    with pytest.raises(EODataError, match="mask shape 16x16 differs from image shape 32x32"):
        HLSBurnScars(tmp_path / "c", "test")[0]


def test_unknown_band(tmp_path):
    write_pair(tmp_path / "validation")
    with pytest.raises(ValueError, match="unknown band 'B08'"):
        HLSBurnScars(tmp_path, "test", bands=["RED", "B08"])
    with pytest.raises(ValueError, match="given twice"):
        HLSBurnScars(tmp_path, "test", bands=["RED", "B04"])


# ---------------------------------------------------------------------------------- datamodule
def test_datamodule(synth):
    dm = HLSBurnScarsDataModule(synth, batch_size=2, batch_keys=["temporal_coords", "location_coords"])
    before = sorted(p.name for p in synth.rglob("*"))
    dm.setup("fit")
    assert dm.means is not None and len(dm.means) == 6
    expected = HLSBurnScars(synth, "train", normalize=False).band_statistics()
    np.testing.assert_allclose(dm.means, expected[0])
    np.testing.assert_allclose(dm.stds, expected[1])
    assert 0.2 < dm.means[3] < 0.4 and dm.means[0] < dm.means[3]  # NIR brighter than blue
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "mask", "filename", "temporal_coords", "location_coords"}
    assert batch["image"].shape == (2, 6, 224, 224) and batch["mask"].shape == (2, 224, 224)
    assert batch["temporal_coords"].shape == (2, 1, 2) and batch["location_coords"].shape == (2, 2)
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (1, 6, 512, 512)
    # normalised with the training statistics: roughly zero-mean unit-std on valid pixels
    valid = val["mask"][0] >= 0
    mean = val["image"][0][:, valid].mean(1)
    assert mean.abs().max() < 1.0
    # statistics are cached, nothing is written into the data folder
    means = list(dm.means)
    dm.setup("test")
    assert dm.means == means and len(dm.test_dataset) == 2
    test = next(iter(dm.test_dataloader()))
    assert test["image"].shape == (2, 6, 512, 512)
    dm.setup("predict")
    assert len(dm.predict_dataset) == 2
    assert sorted(p.name for p in synth.rglob("*")) == before

    dm2 = HLSBurnScarsDataModule(synth, batch_size=2, bands=["NIR_NARROW", "SWIR_2"], means=[0.2, 0.1],
                                 stds=[0.1, 0.1], crop_size=None)
    dm2.setup("fit")
    b = next(iter(dm2.train_dataloader()))
    assert set(b) == {"image", "mask", "filename"} and b["image"].shape == (2, 2, 512, 512)
    with pytest.raises(ValueError, match="means and stds must be given together"):
        HLSBurnScarsDataModule(synth, means=[0.1] * 6)


def test_datamodule_yaml_instantiation(synth):
    from jsonargparse import ArgumentParser
    from lightning import LightningDataModule

    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    cfg = parser.parse_object({"data": {
        "class_path": "terratorch_eoplugins.datamodules.burnscars.HLSBurnScarsDataModule",
        "init_args": {"root": str(synth), "batch_size": 1, "crop_size": 64, "bands": ["RED", "NIR_NARROW"],
                      "batch_keys": ["temporal_coords"], "means": [0.1, 0.3], "stds": [0.05, 0.1]},
    }})
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, HLSBurnScarsDataModule)
    dm.setup("fit")
    assert dm.train_dataset[0]["image"].shape == (2, 64, 64)
