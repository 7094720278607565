"""GEDI L1B/L2A/L2B shots, S1/S2 chips, datamodule and synthetic writer."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import h5py
import matplotlib
import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from pyproj import Transformer

from terratorch_eoplugins.datamodules.gedi import GEDIDataModule
from terratorch_eoplugins.datasets.gedi_chips import (
    CANOPY_HEIGHT_NAME,
    COMPOSITE_BANDS,
    COMPOSITE_NAME,
    GEDIChips,
)
from terratorch_eoplugins.datasets.gedi_shots import (
    LEAF_ON_MONTHS,
    GEDIShots,
    extract_waveform,
    find_granules,
    process_waveform,
)
from terratorch_eoplugins.errors import EODataError, EODatasetNotFoundError
from terratorch_eoplugins.synthetic.gedi import write_gedi
from terratorch_eoplugins.synthetic.world import FOREST, make_world

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

UTM = "EPSG:32631"
ORIGIN = (630000.0, 4850000.0)
TO_LL = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
TO_UTM = Transformer.from_crs("EPSG:4326", UTM, always_xy=True)


# ----------------------------------------------------------------------------- hand-made data
def pixel_latlon(row: float, col: float) -> tuple[float, float]:
    """(lat, lon) of the centre of pixel (row, col) of the hand-made 10 m UTM grid."""
    x, y = ORIGIN[0] + (col + 0.5) * 10, ORIGIN[1] - (row + 0.5) * 10
    lon, lat = TO_LL.transform(x, y)
    return lat, lon


def beam_data(shots: list[dict], base: int) -> dict[str, np.ndarray]:
    """Per-beam arrays from a list of shots {raw, noise, rh98, cover, pai, pixel, flags...}."""
    counts = [len(s["raw"]) for s in shots]
    starts = np.cumsum([0] + counts[:-1]) + 1  # 1-based
    lat, lon = zip(*(pixel_latlon(*s.get("pixel", (1, 1))) for s in shots))
    rh = np.tile(np.linspace(-2, 5, 101, dtype=np.float32), (len(shots), 1))
    rh[:, 98] = [s["rh98"] for s in shots]
    return {
        "shot_number": base + np.arange(len(shots), dtype=np.uint64),
        "rxwaveform": np.concatenate([np.asarray(s["raw"], np.float32) for s in shots]),
        "rx_sample_count": np.array(counts, np.uint16),
        "rx_sample_start_index": starts.astype(np.uint64),
        "noise_mean_corrected": np.array([s["noise"] for s in shots], np.float32),
        "delta_time": np.array([s.get("t", 5.0e7) for s in shots], np.float64),
        "rh": rh,
        "quality_flag": np.array([s.get("q", 1) for s in shots], np.uint8),
        "degrade_flag": np.array([s.get("deg", 0) for s in shots], np.uint8),
        "sensitivity": np.array([s.get("sens", 0.97) for s in shots], np.float32),
        "lat_lowestmode": np.array(lat), "lon_lowestmode": np.array(lon),
        "solar_elevation": np.array([s.get("sun", -10.0) for s in shots], np.float32),
        "cover": np.array([s["cover"] for s in shots], np.float32),
        "pai": np.array([s["pai"] for s in shots], np.float32),
        "l2b_quality_flag": np.array([s.get("q2b", 1) for s in shots], np.uint8),
        "algorithmrun_flag": np.ones(len(shots), np.uint8),
    }


PRODUCT_FIELDS = {
    "GEDI01_B": ("shot_number", "rxwaveform", "rx_sample_count", "rx_sample_start_index", "noise_mean_corrected",
                 "delta_time"),
    "GEDI02_A": ("shot_number", "rh", "quality_flag", "degrade_flag", "sensitivity", "lat_lowestmode",
                 "lon_lowestmode", "solar_elevation"),
    "GEDI02_B": ("shot_number", "cover", "pai", "l2b_quality_flag", "algorithmrun_flag"),
}


def write_handmade(folder: Path, beams: dict[str, dict[str, np.ndarray]], orbit: int = 1234,
                   drop: dict[str, set[str]] | None = None, l2b_perm: dict[str, np.ndarray] | None = None,
                   skip_beam: dict[str, str] | None = None) -> list[Path]:
    """Write the three products of one granule; ``drop`` removes fields, ``l2b_perm`` reorders L2B shots."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"2019200123456_O{orbit:05d}_01_T01234_02"
    paths = []
    for prod, fields in PRODUCT_FIELDS.items():
        pge = "005_01" if prod == "GEDI01_B" else "003_01"
        path = folder / f"{prod}_{stem}_{pge}_V002.h5"
        with h5py.File(path, "w") as f:
            f.create_group("METADATA/DatasetIdentification").attrs["shortName"] = "GEDI_" + {
                "GEDI01_B": "L1B", "GEDI02_A": "L2A", "GEDI02_B": "L2B"}[prod]
            for b, d in beams.items():
                if skip_beam and skip_beam.get(prod) == b:
                    continue
                g = f.create_group(b)
                g.attrs["description"] = "Full power beam" if b in ("BEAM0101", "BEAM0110", "BEAM1000", "BEAM1011") \
                    else "Coverage beam"
                for k in fields:
                    if drop and k in drop.get(prod, set()):
                        continue
                    v = d[k]
                    if prod == "GEDI02_B" and l2b_perm and b in l2b_perm:
                        v = v[l2b_perm[b]]
                    g[k] = v
        paths.append(path)
    return paths


RAW = {  # (raw samples, noise mean)
    0: ([10, 12, 16, 10], 10.0),
    1: ([5, 9, 5], 5.0),
    2: ([1, 1, 3, 7, 1], 1.0),
}


def handmade_shots(n: int = 3, overrides: dict[int, dict] | None = None) -> list[dict]:
    shots = []
    for i in range(n):
        raw, noise = RAW[i % 3]
        s = dict(raw=raw, noise=noise, rh98=10.0 + i, cover=0.1 * (i + 1), pai=0.5 * (i + 1), pixel=(2 + i, 3 + i))
        s.update((overrides or {}).get(i, {}))
        shots.append(s)
    return shots


@pytest.fixture
def handmade(tmp_path: Path) -> Path:
    beams = {"BEAM0000": beam_data(handmade_shots(), 10**16), "BEAM0101": beam_data(handmade_shots(), 2 * 10**16)}
    write_handmade(tmp_path / "gedi", beams)
    return tmp_path / "gedi"


def write_composite(path: Path, count: int = 14, crs: str | None = UTM, size: int = 16, shift: float = 0.0,
                    descriptions: bool = True, values: np.ndarray | None = None) -> Path:
    rng = np.random.default_rng(0)
    data = values if values is not None else rng.normal(0.2, 0.05, (count, size, size)).astype(np.float32)
    prof = dict(driver="GTiff", width=size, height=size, count=count, dtype="float32",
                transform=Affine(10, 0, ORIGIN[0] + shift, 0, -10, ORIGIN[1]))
    if crs is not None:
        prof["crs"] = crs
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data)
        if descriptions:
            for i, name in enumerate((COMPOSITE_BANDS * 2)[:count], start=1):
                dst.set_band_description(i, name)
    return path


# ---------------------------------------------------------------------------- waveform maths
def test_extract_waveform_one_based() -> None:
    flat = np.arange(1, 13, dtype=np.float32)  # three shots of 4, 3 and 5 samples
    starts, counts = [1, 5, 8], [4, 3, 5]
    got = [extract_waveform(flat, s, c).tolist() for s, c in zip(starts, counts)]
    assert got == [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
    with pytest.raises(EODataError, match="1-based"):
        extract_waveform(flat, 0, 3)


def test_process_waveform_by_hand() -> None:
    # noise subtraction, clipping at 0, unit sum, zero padding at the end
    w = process_waveform(np.array([10, 12, 16, 9]), 10.0, 6)
    np.testing.assert_allclose(w, [0, 0.25, 0.75, 0, 0, 0])
    assert w.dtype == np.float32
    # crop keeps the most energetic window of the requested length
    w = process_waveform(np.array([1, 1, 5, 9, 1, 1]), 1.0, 2)
    np.testing.assert_allclose(w, [4 / 12, 8 / 12])
    # resample interpolates the whole window linearly, then renormalises
    w = process_waveform(np.array([0, 2, 4]), 0.0, 5, mode="resample")
    np.testing.assert_allclose(w, np.array([0, 1, 2, 3, 4]) / 10, rtol=1e-6)
    assert not process_waveform(np.array([1.0, 2.0]), 5.0, 4).any()  # nothing above noise
    with pytest.raises(ValueError, match="waveform_mode"):
        process_waveform(np.ones(3), 0.0, 3, mode="stretch")


# --------------------------------------------------------------------------- hand-made HDF5
def test_handmade_granule_join_and_waveforms(handmade: Path) -> None:
    ds = GEDIShots(handmade, waveform_length=6, filter_quality=False, filter_degrade=False, min_sensitivity=None,
                   filter_l2b_quality=False)
    assert len(ds) == 6
    assert ds.filter_counts["kept"] == 6
    s = ds[0]
    np.testing.assert_allclose(s["waveform"].numpy(), [0, 0.25, 0.75, 0, 0, 0])
    np.testing.assert_allclose(ds[1]["waveform"].numpy(), [0, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(ds[2]["waveform"].numpy(), [0, 0, 2 / 8, 6 / 8, 0, 0])
    got = {(ds[i]["beam"], int(ds[i]["shot_number"])): ds[i] for i in range(len(ds))}
    x = got[("BEAM0101", 2 * 10**16 + 2)]
    assert float(x["rh98"]) == 12.0 and float(x["cover"]) == pytest.approx(0.3) and float(x["pai"]) == 1.5
    lat, lon = pixel_latlon(4, 5)
    assert float(x["lat"]) == pytest.approx(lat) and float(x["lon"]) == pytest.approx(lon)
    when = dt.datetime(2018, 1, 1) + dt.timedelta(seconds=5.0e7)
    assert x["temporal_coords"].tolist() == [[when.year, when.timetuple().tm_yday]]
    assert x["granule"] == "2019200123456_O01234_01"
    assert torch.allclose(x["target"], torch.tensor([12.0, 0.3, 1.5]))
    fig = ds.plot(s, suptitle="shot")
    assert len(fig.axes) == 1
    plt.close(fig)
    fig = ds.plot({**s, "prediction": torch.tensor(9.5)})
    assert "prediction=9.50" in fig.axes[0].get_title()
    plt.close(fig)


def test_quality_filters_are_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = {0: {"q": 0}, 1: {"deg": 3}, 2: {"sens": 0.85}}
    bad2 = {0: {"q2b": 0}, 1: {"sun": 20.0}}
    beams = {"BEAM0000": beam_data(handmade_shots(3, bad), 10**16),
             "BEAM0101": beam_data(handmade_shots(3, bad2), 2 * 10**16)}
    write_handmade(tmp_path, beams)
    with caplog.at_level(logging.INFO, logger="terratorch_eoplugins.datasets"):
        ds = GEDIShots(tmp_path, waveform_length=8)
    assert ds.filter_counts == {"total": 6, "quality_flag": 1, "degrade_flag": 1, "sensitivity": 1,
                                "l2b_quality": 1, "invalid_location": 0, "invalid_target": 0, "kept": 2}
    assert "2 of 6 shots kept" in caplog.text
    assert sorted(ds.shots["shot_number"].tolist()) == [2 * 10**16 + 1, 2 * 10**16 + 2]
    night = GEDIShots(tmp_path, waveform_length=8, night_only=True)
    assert night.filter_counts["night"] == 1 and night.shots["shot_number"].tolist() == [2 * 10**16 + 2]
    power = GEDIShots(tmp_path, waveform_length=8, filter_quality=False, filter_degrade=False,
                      min_sensitivity=None, filter_l2b_quality=False, power_beams_only=True)
    assert len(power) == 3 and {power[i]["beam"] for i in range(3)} == {"BEAM0101"}
    with pytest.raises(EODataError, match="no shot left"):
        GEDIShots(tmp_path, beams=["BEAM0000"], waveform_length=8)


def test_l2b_invalid_values(tmp_path: Path) -> None:
    beams = {"BEAM0000": beam_data(handmade_shots(3, {1: {"cover": -9999.0, "pai": -9999.0}}), 10**16)}
    write_handmade(tmp_path, beams)
    ds = GEDIShots(tmp_path, waveform_length=8, filter_l2b_quality=False, targets=("rh98",))
    assert len(ds) == 3 and np.isnan(float(ds[1]["cover"])) and np.isnan(float(ds[1]["pai"]))
    ds = GEDIShots(tmp_path, waveform_length=8, filter_l2b_quality=False, targets=("rh98", "cover"))
    assert ds.filter_counts["invalid_target"] == 1 and len(ds) == 2


def test_shot_number_mismatch_falls_back_to_join(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shots = handmade_shots(3) + [dict(raw=[2, 4, 2], noise=2.0, rh98=20.0, cover=0.9, pai=4.6)]
    d = beam_data(shots, 10**16)
    # L2B in another order and missing the second shot
    perm = np.array([3, 2, 0])
    with caplog.at_level(logging.WARNING, logger="terratorch_eoplugins.datasets"):
        write_handmade(tmp_path, {"BEAM0000": d}, l2b_perm={"BEAM0000": perm})
        ds = GEDIShots(tmp_path, waveform_length=4, filter_l2b_quality=False)
    assert "joined on shot_number" in caplog.text
    assert len(ds) == 3
    by_sn = {int(ds[i]["shot_number"]) - 10**16: ds[i] for i in range(len(ds))}
    assert sorted(by_sn) == [0, 2, 3]
    for k in (0, 2, 3):  # L2B values follow the shot, not the row
        assert float(by_sn[k]["cover"]) == pytest.approx(shots[k]["cover"])
        assert float(by_sn[k]["rh98"]) == pytest.approx(shots[k]["rh98"])
    np.testing.assert_allclose(by_sn[3]["waveform"].numpy(), [0, 1, 0, 0])


def test_missing_beam_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    beams = {"BEAM0000": beam_data(handmade_shots(), 10**16), "BEAM0101": beam_data(handmade_shots(), 2 * 10**16)}
    write_handmade(tmp_path, beams, skip_beam={"GEDI02_B": "BEAM0101"})
    with caplog.at_level(logging.WARNING, logger="terratorch_eoplugins.datasets"):
        ds = GEDIShots(tmp_path, waveform_length=8)
    assert "BEAM0101 missing from GEDI02_B" in caplog.text
    assert len(ds) == 3 and {ds[i]["beam"] for i in range(3)} == {"BEAM0000"}


@pytest.mark.parametrize(("product", "field"), [("GEDI02_A", "rh"), ("GEDI01_B", "rx_sample_start_index"),
                                                ("GEDI02_B", "cover")])
def test_missing_dataset_is_an_error(tmp_path: Path, product: str, field: str) -> None:
    write_handmade(tmp_path, {"BEAM0000": beam_data(handmade_shots(), 10**16)}, drop={product: {field}})
    with pytest.raises(EODataError, match=rf"{product}_.*BEAM0000 has no dataset '{field}'"):
        GEDIShots(tmp_path)


def test_bad_files_are_errors(tmp_path: Path) -> None:
    d = beam_data(handmade_shots(), 10**16)
    d["rx_sample_start_index"] = np.array([1, 5, 9], np.uint64)  # last shot overruns the flat array
    write_handmade(tmp_path / "a", {"BEAM0000": d})
    with pytest.raises(EODataError, match="GEDI01_B_.*outside rxwaveform of 12 samples"):
        GEDIShots(tmp_path / "a")
    d = beam_data(handmade_shots(), 10**16)
    d["quality_flag"] = d["quality_flag"][:2]
    write_handmade(tmp_path / "b", {"BEAM0000": d})
    with pytest.raises(EODataError, match="quality_flag has 2 shots but shot_number has 3"):
        GEDIShots(tmp_path / "b")
    d = beam_data(handmade_shots(), 10**16)
    d["rh"] = d["rh"][:, :50]
    write_handmade(tmp_path / "c", {"BEAM0000": d})
    with pytest.raises(EODataError, match="rh must be N x 101"):
        GEDIShots(tmp_path / "c")
    paths = write_handmade(tmp_path / "d", {"BEAM0000": beam_data(handmade_shots(), 10**16)})
    paths[0].unlink()  # no L1B: no complete granule
    with pytest.raises(EODatasetNotFoundError, match="Complete GEDI granules"):
        GEDIShots(tmp_path / "d")
    with pytest.raises(EODatasetNotFoundError, match="GEDI granule folder"):
        GEDIShots(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="targets"):
        GEDIShots(tmp_path / "a", targets=("agbd",))
    paths = write_handmade(tmp_path / "e", {"BEAM0000": beam_data(handmade_shots(), 10**16)})
    with h5py.File(paths[1], "a") as f:
        del f["BEAM0000"]
    with pytest.raises(EODataError, match="no BEAMxxxx groups"):
        GEDIShots(tmp_path / "e")


def test_granules_from_file_list(handmade: Path) -> None:
    files = sorted(handmade.glob("*.h5"))
    (gr,) = find_granules(files)
    assert gr.l1b.name.startswith("GEDI01_B") and gr.l2a.name.startswith("GEDI02_A")
    assert len(GEDIShots(files, waveform_length=4)) == 6


# -------------------------------------------------------------------- hand-made collocation
def test_chips_put_footprints_on_pixels(tmp_path: Path) -> None:
    shots = [dict(raw=[1, 3], noise=1.0, rh98=7.0, cover=0.5, pai=1.4, pixel=(3, 5)),
             dict(raw=[1, 3], noise=1.0, rh98=9.0, cover=0.5, pai=1.4, pixel=(3, 5)),   # same pixel: mean
             dict(raw=[1, 3], noise=1.0, rh98=20.0, cover=0.8, pai=3.2, pixel=(10, 12)),
             dict(raw=[1, 3], noise=1.0, rh98=30.0, cover=0.8, pai=3.2, pixel=(40, 40))]  # outside
    write_handmade(tmp_path, {"BEAM0101": beam_data(shots, 10**16)})
    comp = write_composite(tmp_path / "comp.tif")
    ds = GEDIChips(tmp_path, composite=comp, split="all", chip_size=8, waveform_length=4, require_footprints=False,
                   targets=("rh98", "cover"))
    assert len(ds) == 4 and ds.max_footprints == 2
    s = ds[0]  # chip rows 0-7, cols 0-7
    assert s["image"].shape == (14, 8, 8) and s["mask"].shape == (2, 8, 8)
    assert s["footprint_mask"].tolist() == [True, True]
    assert s["footprints"].tolist() == [[3, 5], [3, 5]]
    assert float(s["mask"][0, 3, 5]) == pytest.approx(8.0) and float(s["mask"][1, 3, 5]) == pytest.approx(0.5)
    assert int((s["mask"][0] != -1).sum()) == 1
    assert s["transform"].tolist() == [10, 0, ORIGIN[0], 0, -10, ORIGIN[1]]
    s = ds[3]  # chip rows 8-15, cols 8-15
    assert s["footprints"].tolist() == [[2, 4], [-1, -1]] and s["footprint_mask"].tolist() == [True, False]
    assert float(s["mask"][0, 2, 4]) == 20.0 and s["rh98"].tolist() == [20.0, -1.0]
    assert s["bounds"].tolist() == [ORIGIN[0] + 80, ORIGIN[1] - 160, ORIGIN[0] + 160, ORIGIN[1] - 80]
    np.testing.assert_allclose(s["waveform"][0].numpy(), [0, 1, 0, 0])
    assert not s["waveform"][1].any()
    empty = ds[1]
    assert not empty["footprint_mask"].any() and (empty["mask"] == -1).all()
    # regression splits drop chips without footprints
    assert len(GEDIChips(tmp_path, composite=comp, split="all", chip_size=8, waveform_length=4)) == 2
    # DN-encoded S2 gives the same normalised image as reflectance
    with rasterio.open(comp) as src:
        refl = src.read()
    dn = refl.copy()
    dn[:12] = refl[:12] * 10000 + 1000
    comp_dn = write_composite(tmp_path / "comp_dn.tif", values=dn)
    ds_dn = GEDIChips(tmp_path, composite=comp_dn, split="all", chip_size=8, waveform_length=4)
    assert ds_dn.s2_units == "dn"
    torch.testing.assert_close(ds_dn[0]["image"], GEDIChips(tmp_path, composite=comp, split="all", chip_size=8,
                                                            waveform_length=4)[0]["image"], atol=1e-4, rtol=1e-4)


def test_composite_errors(handmade: Path, tmp_path: Path) -> None:
    kw = dict(split="all", chip_size=8, waveform_length=4)
    with pytest.raises(EODataError, match=r"bad13\.tif: composite has 13 bands; expected 14"):
        GEDIChips(handmade, composite=write_composite(tmp_path / "bad13.tif", count=13), **kw)
    with pytest.raises(EODataError, match=r"nocrs\.tif: composite has no \(unknown\) CRS"):
        GEDIChips(handmade, composite=write_composite(tmp_path / "nocrs.tif", crs=None), **kw)
    with pytest.raises(EODataError, match="does not match the expected crs"):
        GEDIChips(handmade, composite=write_composite(tmp_path / "ok.tif"), crs="EPSG:32632", **kw)
    with pytest.raises(EODataError, match=r"fall outside the composite .*far\.tif"):
        GEDIChips(handmade, composite=write_composite(tmp_path / "far.tif", shift=50_000.0), **kw)
    with pytest.raises(EODatasetNotFoundError, match="composite"):
        GEDIChips(handmade, composite=tmp_path / "missing.tif", **kw)
    with pytest.raises(ValueError, match="multiple of 8"):
        GEDIChips(handmade, composite=tmp_path / "ok.tif", chip_size=12)
    bad = np.full((14, 16, 16), 0.2, np.float32)
    bad[13] = np.nan
    with pytest.raises(EODataError, match=r"bands \['VH'\] contain only no-data"):
        GEDIChips(handmade, composite=write_composite(tmp_path / "nan.tif", values=bad), **kw)


# --------------------------------------------------------------------------- synthetic world
@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gedi(tmp_path_factory.mktemp("synth"), "tiny", seed=0)


def test_synthetic_layout(synth: Path) -> None:
    names = sorted(p.name for p in synth.iterdir())
    assert COMPOSITE_NAME in names
    assert sum(n.startswith("GEDI01_B_") for n in names) == sum(n.startswith("GEDI02_B_") for n in names) >= 2
    l1b = next(synth.glob("GEDI01_B_*.h5"))
    with h5py.File(l1b) as f:
        assert f["METADATA/DatasetIdentification"].attrs["shortName"] == "GEDI_L1B"
        g = f["BEAM0101"]
        assert g.attrs["description"] == "Full power beam" and g["shot_number"].dtype == np.uint64
        start, count = g["rx_sample_start_index"][:], g["rx_sample_count"][:].astype(np.int64)
        assert start[0] == 1 and np.array_equal(start[1:], start[:-1] + count[:-1])
        assert start[-1] - 1 + count[-1] == g["rxwaveform"].shape[0]
    with rasterio.open(synth / COMPOSITE_NAME) as src:
        assert src.count == 14 and src.descriptions == COMPOSITE_BANDS and src.crs.to_epsg() == 32631


def test_synthetic_shots_follow_world(synth: Path) -> None:
    world = make_world("tiny", 0)
    ds = GEDIShots(synth, waveform_length=256, waveform_mode="resample")
    c = ds.filter_counts
    assert c["kept"] > 500 and all(c[k] > 0 for k in ("quality_flag", "degrade_flag", "sensitivity", "l2b_quality"))
    x, y = TO_UTM.transform(ds.shots["lon"], ds.shots["lat"])
    left, bottom, right, top = world.bounds
    inside = (x > left) & (x < right) & (y > bottom) & (y < top)
    rows = np.floor((top - y[inside]) / 10).astype(int)
    cols = np.floor((x[inside] - left) / 10).astype(int)
    height = world.canopy_height[rows, cols]
    rh98 = ds.shots["rh98"][inside]
    forest = world.landcover[rows, cols] == FOREST
    assert forest.sum() > 30
    assert np.corrcoef(rh98[forest], height[forest])[0, 1] > 0.9
    assert np.abs(rh98[forest] - height[forest]).mean() < 3.0
    assert 0 < rh98[~forest].mean() < 2.5
    np.testing.assert_allclose(ds.shots["cover"][inside], world.canopy_cover[rows, cols].clip(0, 0.99), atol=1e-6)
    np.testing.assert_allclose(ds.shots["pai"], -np.log(1 - ds.shots["cover"]) / 0.5, rtol=1e-4, atol=1e-5)
    w = ds[int(np.argmax(ds.shots["rh98"]))]["waveform"]
    assert w.shape == (256,) and float(w.sum()) == pytest.approx(1.0, abs=1e-5) and (w >= 0).all()
    assert len(GEDIShots(synth, split="train", waveform_length=8)) > len(
        GEDIShots(synth, split="val", waveform_length=8)
    )


def test_synthetic_chips_collocation_and_signal(synth: Path) -> None:
    world = make_world("tiny", 0)
    ds = GEDIChips(synth, split="all", chip_size=64, waveform_length=32, waveform_mode="resample")
    assert len(ds) == 24  # 384 x 256 world -> 6 x 4 chips, all crossed by tracks
    rh, vh, n = [], [], 0
    for i in range(len(ds)):
        s = ds[i]
        m = s["footprint_mask"].numpy()
        fp = s["footprints"].numpy()[m]
        r0 = int(round((world.bounds[3] - float(s["bounds"][3])) / 10))
        c0 = int(round((float(s["bounds"][0]) - world.bounds[0]) / 10))
        sid = ds.shot_ids[ds.chip_members[i]]
        x, y = TO_UTM.transform(ds.shots_ds.shots["lon"][sid], ds.shots_ds.shots["lat"][sid])
        px, py = world.pixel_to_xy(r0 + fp[:, 0], c0 + fp[:, 1])
        assert np.all(np.abs(x - px) <= 5.0) and np.all(np.abs(y - py) <= 5.0)  # shot inside its pixel
        vals = s["rh98"].numpy()[m]
        pix, inv = np.unique(fp, axis=0, return_inverse=True)
        assert (s["mask"].numpy() != -1).sum() == len(pix)
        means = np.bincount(inv.ravel(), vals) / np.bincount(inv.ravel())
        np.testing.assert_allclose(s["mask"].numpy()[pix[:, 0], pix[:, 1]], means, rtol=1e-5)
        rh.append(vals)
        vh.append(s["image"].numpy()[13, fp[:, 0], fp[:, 1]])
        n += m.sum()
    rh, vh = np.concatenate(rh), np.concatenate(vh)
    assert n > 400
    assert np.corrcoef(rh, vh)[0, 1] > 0.5  # canopy height is visible in VH backscatter
    # spatial splits are disjoint and cover the chips with footprints
    parts = [GEDIChips(synth, split=sp, waveform_length=8) for sp in ("train", "val", "test")]
    chips = [set(p.chips) for p in parts]
    assert all(len(c) > 0 for c in chips) and not (chips[0] & chips[1]) and not (chips[1] & chips[2])
    assert set().union(*chips) == set(ds.chips)
    assert len({p.max_footprints for p in parts}) == 1
    few = GEDIChips(synth, split="train", waveform_length=8, label_fraction=0.25)
    assert set(few.chips) < chips[0] and len(few) == round(0.25 * len(chips[0]))


def test_datamodule_and_plot(synth: Path) -> None:
    dm = GEDIDataModule(root=str(synth), chip_size=32, batch_size=4, waveform_length=64,
                        batch_keys=("footprints", "footprint_mask", "waveform"))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 14, 32, 32) and batch["mask"].shape == (4, 32, 32)
    k = dm.train_dataset.max_footprints
    assert batch["footprints"].shape == (4, k, 2) and batch["waveform"].shape == (4, k, 64)
    assert set(batch) == {"image", "mask", "filename", "footprints", "footprint_mask", "waveform"}
    valid = batch["mask"] != -1
    assert valid.any() and (batch["mask"][valid] >= 0).all()
    assert len(dm.val_dataset) > 0
    dm.setup("predict")
    assert len(dm.predict_dataset) == len(GEDIChips(synth, split="test", chip_size=32, waveform_length=8))
    pred = next(iter(dm.predict_dataloader()))  # georeferencing for the prediction writer, beside the model's keys
    meta = pred.pop("predict_meta")
    assert set(pred) == {"image", "mask", "filename", "footprints", "footprint_mask", "waveform"}
    first = dm.predict_dataset[0]
    assert meta["filename"][0] == first["filename"] and meta["crs"][0] == first["crs"]
    assert meta["transform"][0] == tuple(first["transform"].tolist())
    sample = dm.train_dataset[0]
    fig = dm.train_dataset.plot({**sample, "prediction": sample["mask"]}, suptitle="chip")
    assert len(fig.axes) >= 4
    plt.close(fig)


# ------------------------------------------------------------------------- dense target product
def _write_dense(path: Path, values: np.ndarray, crs: str | None = UTM, transform: Affine | None = None,
                 nodata: float | None = -9999.0) -> Path:
    profile = dict(driver="GTiff", width=values.shape[-1], height=values.shape[-2], count=1 if values.ndim == 2
                   else values.shape[0], dtype="float32", nodata=nodata,
                   transform=transform if transform is not None else Affine(10, 0, ORIGIN[0], 0, -10, ORIGIN[1]))
    if crs is not None:
        profile["crs"] = crs
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(values if values.ndim == 3 else values[None])
    return path


def test_synthetic_dense_rh98_map_matches_footprints(synth: Path) -> None:
    """The world's dense RH98 map is the footprints' RH98 at their pixels (same waveform model) and masks water."""
    from terratorch_eoplugins.synthetic.world import WATER

    world = make_world("tiny", 0)
    with rasterio.open(synth / CANOPY_HEIGHT_NAME) as src:
        assert src.count == 1 and src.crs.to_epsg() == 32631 and src.transform == world.transform
        dense, nodata = src.read(1), src.nodata
    assert nodata == -9999.0
    np.testing.assert_array_equal(dense == nodata, world.landcover == WATER)
    # the map is a leaf-on product: compare with the leaf-on shots (leaf-off deciduous canopies return less)
    ds = GEDIShots(synth, waveform_length=8, leaf_on_months=LEAF_ON_MONTHS)
    x, y = TO_UTM.transform(ds.shots["lon"], ds.shots["lat"])
    rows, cols = (np.asarray(v) for v in rasterio.transform.rowcol(world.transform, x, y))
    inside = (rows >= 0) & (rows < world.shape[0]) & (cols >= 0) & (cols < world.shape[1])
    at = dense[rows[inside], cols[inside]]
    rh98 = ds.shots["rh98"][inside]
    ok = at != nodata
    assert ok.sum() > 300  # the June track of the tiny world's two
    # The lookup table's linear interpolation is the only difference from the footprints' own RH98.
    assert np.abs(at[ok] - rh98[ok]).max() < 1.0 and np.sqrt(np.mean((at[ok] - rh98[ok]) ** 2)) < 0.2
    forest = world.landcover == FOREST
    assert dense[forest].mean() > 10 and 0 < dense[~forest & (dense != nodata)].mean() < 2.5


def test_dense_target_replaces_footprints(synth: Path) -> None:
    path = synth / CANOPY_HEIGHT_NAME
    with rasterio.open(path) as src:
        dense, nodata = src.read(1), src.nodata
    ds = GEDIChips(synth, split="all", chip_size=64, waveform_length=8, dense_target=path, require_footprints=False)
    assert len(ds) == 24
    for i in (0, 7, 23):
        s = ds[i]
        r, c = ds.chips[i]
        want = dense[r : r + 64, c : c + 64]
        want = np.where(want == nodata, -1.0, want)
        np.testing.assert_array_equal(s["mask"].numpy(), want)
        assert s["footprint_mask"].any()  # footprints and waveforms still come with the chip
    # The same map in another CRS and at 20 m is warped onto the composite grid.
    world = make_world("tiny", 0)
    utm32 = "EPSG:32632"
    tr = Transformer.from_crs(UTM, utm32, always_xy=True)
    x0, y0 = tr.transform(world.bounds[0] - 500, world.bounds[3] + 500)
    h, w = (world.shape[0] + 100) // 2, (world.shape[1] + 100) // 2
    xs = x0 + 20 * (np.arange(w) + 0.5)
    ys = y0 - 20 * (np.arange(h) + 0.5)
    gx, gy = np.meshgrid(xs, ys)
    bx, by = Transformer.from_crs(utm32, UTM, always_xy=True).transform(gx, gy)
    rows, cols = (np.asarray(v).reshape(bx.shape) for v in rasterio.transform.rowcol(world.transform, bx.ravel(),
                                                                                     by.ravel()))
    rows, cols = rows.clip(0, world.shape[0] - 1), cols.clip(0, world.shape[1] - 1)
    warped_src = _write_dense(synth.parent / "rh98_utm32_20m.tif", world.canopy_height[rows, cols].astype(np.float32),
                              crs=utm32, transform=Affine(20, 0, x0, 0, -20, y0))
    wd = GEDIChips(synth, split="all", chip_size=64, waveform_length=8, dense_target=warped_src,
                   require_footprints=False, dense_resampling="nearest")
    got = np.stack([wd[i]["mask"].numpy() for i in range(len(wd))])
    truth = np.stack([world.canopy_height[r : r + 64, c : c + 64] for r, c in wd.chips])
    assert (got != -1).all()
    assert np.corrcoef(got.ravel(), truth.ravel())[0, 1] > 0.9 and np.median(np.abs(got - truth)) < 0.5


def test_dense_target_nodata_nan_and_errors(handmade: Path, tmp_path: Path) -> None:
    kw = dict(chip_size=8, waveform_length=16, block_chips=1, composite=write_composite(tmp_path / "c.tif"))
    vals = np.arange(256, dtype=np.float32).reshape(16, 16) / 10
    vals[0, 0], vals[1, 1], vals[2, 2] = -9999.0, np.nan, np.inf
    vals[8:, 8:] = -9999.0  # one whole chip without a valid pixel: dropped
    path = _write_dense(tmp_path / "d.tif", vals)
    ds = GEDIChips(handmade, split="all", require_footprints=False, dense_target=path, ignore_value=-1.0, **kw)
    assert sorted(ds.chips) == [(0, 0), (0, 8), (8, 0)]
    m = ds[ds.chips.index((0, 0))]["mask"].numpy()
    assert m[0, 0] == m[1, 1] == m[2, 2] == -1.0 and m[3, 4] == pytest.approx(vals[3, 4])
    with pytest.raises(EODatasetNotFoundError, match="dense rh98 product"):
        GEDIChips(handmade, dense_target=tmp_path / "missing.tif", **kw)
    with pytest.raises(EODataError, match="dense_band=2 but the file has 1 band"):
        GEDIChips(handmade, dense_target=path, dense_band=2, **kw)
    with pytest.raises(ValueError, match="exactly one target"):
        GEDIChips(handmade, dense_target=path, targets=("rh98", "cover"), **kw)
    with pytest.raises(ValueError, match="dense_resampling"):
        GEDIChips(handmade, dense_target=path, dense_resampling="smooth", **kw)
    with pytest.raises(EODataError, match="no CRS"):
        GEDIChips(handmade, dense_target=_write_dense(tmp_path / "nocrs.tif", vals, crs=None), **kw)
    far = _write_dense(tmp_path / "far.tif", vals, transform=Affine(10, 0, ORIGIN[0] + 50_000, 0, -10, ORIGIN[1]))
    with pytest.raises(EODataError, match="no valid .* pixel falls inside the composite"):
        GEDIChips(handmade, dense_target=far, **kw)
    split = dict(split="test", require_footprints=False, split_fractions=(0.5, 0.25, 0.25))
    (r, c), = GEDIChips(handmade, **split, **kw).chips  # the test split's only chip
    hole = vals.copy()
    hole[r : r + 8, c : c + 8] = np.nan
    with pytest.raises(EODataError, match="no chip of split 'test' holds a valid pixel"):
        GEDIChips(handmade, dense_target=_write_dense(tmp_path / "hole.tif", hole), **split, **kw)


def test_datamodule_dense_train_sparse_eval(synth: Path) -> None:
    dm = GEDIDataModule(root=str(synth), chip_size=64, batch_size=4, waveform_length=8,
                        dense_target=str(synth / CANOPY_HEIGHT_NAME))
    dm.setup("fit")
    dm.setup("test")
    assert next(iter(dm.train_dataloader()))["mask"].shape == (4, 64, 64)
    with rasterio.open(synth / CANOPY_HEIGHT_NAME) as src:
        dense, nodata = src.read(1), src.nodata
    for i, (r, c) in enumerate(dm.train_dataset.chips):  # every non-water pixel of every training chip is labelled
        np.testing.assert_array_equal(
            dm.train_dataset[i]["mask"].numpy() != -1, dense[r : r + 64, c : c + 64] != nodata
        )
    sparse = GEDIChips(synth, split="train", chip_size=64, waveform_length=8)
    assert len(dm.train_dataset) >= len(sparse)  # chips without footprints are kept for dense training
    fig = dm.train_dataset.plot({"image": dm.train_dataset[0]["image"], "mask": dm.train_dataset[0]["mask"]})
    assert fig.axes[0].get_title() == "RGB + 0 footprints (rh98)"
    plt.close(fig)
    for ds in (dm.val_dataset, dm.test_dataset):  # evaluation stays on the footprints
        m = ds[0]["mask"]
        assert ds.dense_target is None and 0 < int((m != -1).sum()) < 200
    # split_dataset: any split with footprint targets, or with a given dense map
    assert dm.split_dataset("train").dense_target is None and len(dm.split_dataset("train")) == len(sparse)
    dense_test = dm.split_dataset("test", synth / CANOPY_HEIGHT_NAME)
    (r, c) = dense_test.chips[0]
    np.testing.assert_array_equal(dense_test[0]["mask"].numpy() != -1, dense[r : r + 64, c : c + 64] != nodata)
    with pytest.raises(ValueError, match="dense_splits"):
        GEDIDataModule(root=str(synth), dense_target="x.tif", dense_splits=("training",))
