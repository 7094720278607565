"""DUNIA's appendix-F preprocessing: leaf-on GEDI shots, signal-window waveforms, S1 incidence normalisation,
cubic 20 m -> 10 m S2 bands and calendar four-month mosaics, each checked against an independent computation on
the files the synthetic world writes."""

from __future__ import annotations

import datetime as dt
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.windows import Window

from terratorch_eoplugins.datasets.dunia_chips import DUNIAPretrainChips
from terratorch_eoplugins.datasets.gedi_chips import COMPOSITE_20M_NAME, COMPOSITE_BANDS, GEDIChips
from terratorch_eoplugins.datasets.gedi_shots import LEAF_ON_MONTHS, GEDIShots, find_granules
from terratorch_eoplugins.datasets.preprocessing import (
    S2_20M_BANDS,
    calendar_periods,
    calendar_year,
    normalise_incidence,
    upsample_20m,
)
from terratorch_eoplugins.errors import EODataError
from terratorch_eoplugins.synthetic.gedi import write_gedi
from terratorch_eoplugins.synthetic.world import FOREST, make_world

TO_UTM = Transformer.from_crs("EPSG:4326", "EPSG:32631", always_xy=True)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gedi(tmp_path_factory.mktemp("synth"), "tiny", seed=0)


def _file_shots(synth: Path) -> dict[int, dict]:
    """Every shot of the written granules, read straight from the HDF5 files: time, waveform, signal window."""
    out = {}
    for gr in find_granules(synth):
        with h5py.File(gr.l1b) as f1, h5py.File(gr.l2a) as f2:
            for b in f1:
                if not b.startswith("BEAM"):
                    continue
                g1, g2 = f1[b], f2[b]
                assert np.array_equal(g1["shot_number"][:], g2["shot_number"][:])
                flat = g1["rxwaveform"][:]
                for k, sn in enumerate(g1["shot_number"][:]):
                    s, c = int(g1["rx_sample_start_index"][k]), int(g1["rx_sample_count"][k])
                    out[int(sn)] = dict(
                        when=dt.datetime(2018, 1, 1) + dt.timedelta(seconds=float(g1["delta_time"][k])),
                        raw=flat[s - 1 : s - 1 + c].astype(np.float64), noise=float(g1["noise_mean_corrected"][k]),
                        top=float(g2["rx_processing_a1/toploc"][k]), bot=float(g2["rx_processing_a1/botloc"][k]),
                        rh=g2["rh"][k], lat=float(g2["lat_lowestmode"][k]), lon=float(g2["lon_lowestmode"][k]),
                        z0=float(g1["geolocation/elevation_bin0"][k]), z1=float(g1["geolocation/elevation_lastbin"][k]),
                        ground=float(g2["elev_lowestmode"][k]))
    return out


# ------------------------------------------------------------------------------------------ 1. leaf-on shots
def test_leaf_on_filter_keeps_april_to_september_shots(synth: Path) -> None:
    files = _file_shots(synth)
    leaf_on = {sn for sn, d in files.items() if 4 <= d["when"].month <= 9}
    assert 0 < len(leaf_on) < len(files)  # the world writes leaf-on and leaf-off tracks
    every = GEDIShots(synth, waveform_length=8)
    kept = GEDIShots(synth, waveform_length=8, leaf_on_months=LEAF_ON_MONTHS)
    expected = set(every.shots["shot_number"].tolist()) & leaf_on
    assert set(kept.shots["shot_number"].tolist()) == expected and len(kept) == len(expected)
    assert kept.filter_counts["leaf_off"] == len(every) - len(expected) > 0
    assert all(4 <= files[int(sn)]["when"].month <= 9 for sn in kept.shots["shot_number"])
    assert "leaf_off" not in every.filter_counts
    leaf_off = GEDIShots(synth, waveform_length=8, leaf_on_months=[10, 11, 12, 1, 2, 3])
    assert len(leaf_off) == len(every) - len(kept)
    with pytest.raises(ValueError, match="leaf_on_months"):
        GEDIShots(synth, leaf_on_months=[13])


def test_leaf_off_waveforms_over_deciduous_forest_have_a_weaker_canopy_return(synth: Path) -> None:
    """Share of the waveform energy more than 3 m above the ground, relative to the stand's cover."""
    world = make_world("tiny", 0)
    left, bottom, right, top = world.bounds
    ratio: dict[bool, list[float]] = {True: [], False: []}
    for d in _file_shots(synth).values():
        x, y = TO_UTM.transform(d["lon"], d["lat"])
        if not (left < x < right and bottom < y < top):
            continue
        r, c = int((top - y) // 10), int((x - left) // 10)
        cover = world.canopy_cover[r, c]
        if world.landcover[r, c] != FOREST or world._conifer[r, c] or world.canopy_height[r, c] < 10 or cover < 0.3:
            continue
        w = np.maximum(d["raw"] - d["noise"], 0)
        z = np.linspace(d["z0"], d["z1"], len(w))
        ratio[4 <= d["when"].month <= 9].append(w[z > d["ground"] + 3].sum() / w.sum() / cover)
    assert len(ratio[True]) > 10 and len(ratio[False]) > 10
    assert np.median(ratio[True]) > 0.8 and np.median(ratio[False]) < 0.6


# ------------------------------------------------------------------------------------ 2. signal window
def test_signal_window_waveform_matches_numpy_on_the_written_files(synth: Path) -> None:
    files = _file_shots(synth)
    ds = GEDIShots(synth, waveform_length=256, waveform_mode="resample", waveform_window="signal")
    full = GEDIShots(synth, waveform_length=256, waveform_mode="resample")
    assert len(ds) > 500
    rng = np.random.default_rng(0)
    for i in rng.choice(len(ds), 25, replace=False):
        d = files[int(ds.shots["shot_number"][i])]
        lo, hi = math.floor(d["top"]) - 1, math.ceil(d["bot"])
        assert 0 <= lo < hi <= len(d["raw"]) and hi - lo < len(d["raw"])
        w = np.maximum(d["raw"][lo:hi] - d["noise"], 0)
        w = np.interp(np.linspace(0, len(w) - 1, 256), np.arange(len(w)), w)
        np.testing.assert_allclose(ds.waveform(int(i)), w / w.sum(), rtol=1e-5, atol=1e-7)
        j = int(np.nonzero(full.shots["shot_number"] == ds.shots["shot_number"][i])[0][0])
        assert not np.allclose(full.waveform(j), ds.waveform(int(i)))
    with pytest.raises(ValueError, match="waveform_window"):
        GEDIShots(synth, waveform_window="cut")


def test_signal_window_missing_l2a_fields_is_an_error(synth: Path, tmp_path: Path) -> None:
    copy = tmp_path / "gedi"
    shutil.copytree(synth, copy, ignore=shutil.ignore_patterns("*.tif"))
    l2a = find_granules(copy)[0].l2a
    with h5py.File(l2a, "a") as f:
        del f["BEAM0101/rx_processing_a1"]
    with pytest.raises(EODataError, match=rf"{l2a.name}.*BEAM0101.*rx_processing_a"):
        GEDIShots(copy, waveform_window="signal")
    assert len(GEDIShots(copy, waveform_length=8)) > 0  # the full window does not need them


# ------------------------------------------------------------------------------- 3. S1 incidence angle
def test_normalise_incidence_is_eq15_on_linear_backscatter() -> None:
    rng = np.random.default_rng(0)
    db = rng.uniform(-25, -5, (2, 6, 7))
    angle = rng.uniform(30, 46, (6, 7))
    lin = 10 ** (db / 10)
    ref = lin * math.cos(math.radians(40)) ** 2 / np.cos(np.radians(angle)) ** 2
    np.testing.assert_allclose(normalise_incidence(db, angle, 40.0), 10 * np.log10(ref), atol=1e-4)
    np.testing.assert_allclose(normalise_incidence(lin, angle, 40.0, db=False), ref, rtol=1e-5)
    np.testing.assert_allclose(normalise_incidence(db, np.full((6, 7), 40.0), 40.0), db, atol=1e-4)


def test_series_s1_is_normalised_per_acquisition(tiny_world_dir: Path) -> None:
    ds = DUNIAPretrainChips(tiny_world_dir / "GEDI", split="test", chip_size=64)
    raw = DUNIAPretrainChips(tiny_world_dir / "GEDI", split="test", chip_size=64, s1_incidence_ref=None)
    assert ds.s1_incidence_ref == 40.0
    row, col = ds.chips[0]
    tile, tc, tr = ds._tile_window(row, col)
    win = Window(tc, tr, 64, 64)
    series, series_raw = ds.series(0), raw.series(0)
    for p in range(3):
        norm, plain = [], []
        for when, path in ds.s1_files[tile.name]:
            if not ds.period_edges[p] <= when < ds.period_edges[p + 1]:
                continue
            with rasterio.open(path) as src:
                assert src.descriptions == ("VV", "VH", "angle")
                vv, angle = src.read(1, window=win).astype(np.float64), src.read(3, window=win).astype(np.float64)
            lin = 10 ** (vv / 10) * np.cos(np.radians(40.0)) ** 2 / np.cos(np.radians(angle)) ** 2
            norm.append(10 * np.log10(lin))
            plain.append(vv)
        assert norm, f"no S1 acquisition in period {p}"
        expected = (np.median(np.stack(norm), 0) - ds.means[12]) / ds.stds[12]
        np.testing.assert_allclose(series[12, p], expected, atol=1e-4)
        np.testing.assert_allclose(series_raw[12, p], (np.median(np.stack(plain), 0) - ds.means[12]) / ds.stds[12],
                                   atol=1e-4)


def test_s1_without_angle_band_is_an_error_only_when_normalising(tiny_world_dir: Path, tmp_path: Path) -> None:
    ds = DUNIAPretrainChips(tiny_world_dir / "GEDI", split="test", chip_size=64)
    path = tmp_path / "20190101T000000.tif"
    with rasterio.open(path, "w", driver="GTiff", width=4, height=4, count=2, dtype="float32") as dst:
        dst.write(np.full((2, 4, 4), -12.0, np.float32))
        dst.descriptions = ("VV", "VH")
    with pytest.raises(EODataError, match=rf"{path.name}.*angle.*s1_incidence_ref"):
        ds._read_s1(path, Window(0, 0, 4, 4))
    ds.s1_incidence_ref = None
    assert np.allclose(ds._read_s1(path, Window(0, 0, 4, 4)), -12.0)
    with pytest.raises(ValueError, match="s1_incidence_ref"):
        DUNIAPretrainChips(tiny_world_dir / "GEDI", split="test", chip_size=64, s1_incidence_ref=95)


# ------------------------------------------------------------------------------- 4. 20 m -> 10 m cubic
def _keys_matrix(n: int) -> np.ndarray:
    """``[2n, n]`` bicubic (Keys, a = -0.75) interpolation matrix, pixel-area geometry, edge pixels replicated."""
    a = -0.75

    def k(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a if t < 2 else 0.0

    m = np.zeros((2 * n, n))
    for j in range(2 * n):
        x = (j + 0.5) / 2 - 0.5
        i0 = math.floor(x)
        for tap in range(i0 - 1, i0 + 3):
            m[j, min(max(tap, 0), n - 1)] += k(x - tap)
    return m


def _chip_bands(ds: GEDIChips, i: int) -> np.ndarray:
    x = ds[i]["image"].numpy()
    return x * ds.stds[:, None, None] + ds.means[:, None, None]


def test_20m_bands_are_upsampled_by_cubic_convolution(synth: Path, tmp_path: Path) -> None:
    with rasterio.open(synth / COMPOSITE_20M_NAME) as src:
        b20, t20, crs = src.read().astype(np.float64), src.transform, src.crs
        assert src.descriptions == S2_20M_BANDS and t20.a == 20
    # shift the 20 m grid one 20 m pixel up-left (edge-replicated) so the chip offsets are exercised too
    shifted = np.pad(b20, ((0, 0), (1, 0), (1, 0)), mode="edge")
    path = tmp_path / "shifted_20m.tif"
    with rasterio.open(path, "w", driver="GTiff", width=shifted.shape[2], height=shifted.shape[1], count=6,
                       dtype="float32", crs=crs, transform=Affine(20, 0, t20.c - 20, 0, -20, t20.f + 20)) as dst:
        dst.write(shifted.astype(np.float32))
        dst.descriptions = S2_20M_BANDS
    idx = [COMPOSITE_BANDS.index(b) for b in S2_20M_BANDS]
    for src20, data, off in ((synth / COMPOSITE_20M_NAME, b20, 0), (path, shifted, 2)):
        ds = GEDIChips(synth, split="all", chip_size=64, waveform_length=8, composite_20m=src20)
        mr, mc = _keys_matrix(data.shape[1]), _keys_matrix(data.shape[2])
        full = (mr @ data @ mc.T)[:, off:, off:]  # the separable cubic kernel, rows then columns
        for i in (0, 5, len(ds) - 1):
            row, col = ds.chips[i]
            np.testing.assert_allclose(_chip_bands(ds, i)[idx], full[:, row : row + 64, col : col + 64], atol=2e-5)
    near = GEDIChips(synth, split="all", chip_size=64, waveform_length=8, composite_20m=path, upsample_20m="nearest")
    row, col = near.chips[3]
    rep = np.repeat(np.repeat(shifted, 2, 1), 2, 2)[:, 2:, 2:]
    np.testing.assert_allclose(_chip_bands(near, 3)[idx], rep[:, row : row + 64, col : col + 64], atol=2e-5)
    none = GEDIChips(synth, split="all", chip_size=64, waveform_length=8, composite_20m=path, upsample_20m="none")
    plain = GEDIChips(synth, split="all", chip_size=64, waveform_length=8)
    assert np.array_equal(none[3]["image"].numpy(), plain[3]["image"].numpy())
    np.testing.assert_allclose(upsample_20m(b20[:, :4, :4]), np.einsum("ij,bjk,lk->bil", _keys_matrix(4),
                                                                       b20[:, :4, :4], _keys_matrix(4)), atol=1e-5)


def test_20m_raster_errors(synth: Path, tmp_path: Path) -> None:
    with rasterio.open(synth / COMPOSITE_20M_NAME) as src:
        data, t, crs = src.read(), src.transform, src.crs
    cases = {"aligned": (Affine(20, 0, t.c + 5, 0, -20, t.f), S2_20M_BANDS),
             "twice": (Affine(10, 0, t.c, 0, -10, t.f), S2_20M_BANDS),
             "lack": (t, ("B05", "B06", "B07", "B08", "B11", "B12"))}
    for what, (tr, names) in cases.items():
        path = tmp_path / f"{what}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=6,
                           dtype="float32", crs=crs, transform=tr) as dst:
            dst.write(data)
            dst.descriptions = names
        with pytest.raises(EODataError, match=rf"{path.name}.*{what}"):
            GEDIChips(synth, split="all", chip_size=64, waveform_length=8, composite_20m=path)
    with pytest.raises(ValueError, match="upsample_20m"):
        GEDIChips(synth, split="all", chip_size=64, upsample_20m="bilinear")


# -------------------------------------------------------------------------------- 5. calendar mosaics
def test_calendar_windows() -> None:
    assert calendar_periods(2020) == [dt.datetime(2019, 10, 1), dt.datetime(2020, 2, 1), dt.datetime(2020, 6, 1),
                                      dt.datetime(2020, 10, 1)]
    times = [dt.datetime(2019, 9, 3), dt.datetime(2019, 10, 2), dt.datetime(2020, 3, 1), dt.datetime(2020, 9, 30)]
    assert calendar_year(times) == 2020


def test_series_dates_land_in_their_four_month_window(tiny_world_dir: Path) -> None:
    ds = DUNIAPretrainChips(tiny_world_dir / "GEDI", split="test", chip_size=64)
    assert ds.mosaic_periods == "calendar" and ds.mosaic_year == 2019  # the world spans Sep 2018 - Oct 2019
    seen = set()
    for when, _ in ds.region.tiles[0].files:
        y = ds.mosaic_year
        if (when.year == y - 1 and when.month >= 10) or (when.year == y and when.month == 1):
            expected = 0
        elif when.year == y and 2 <= when.month <= 5:
            expected = 1
        elif when.year == y and 6 <= when.month <= 9:
            expected = 2
        else:
            expected = -1
        assert ds._period(when) == expected, when
        seen.add(expected)
    assert {0, 1, 2} <= seen
    equal = DUNIAPretrainChips(tiny_world_dir / "GEDI", split="test", chip_size=64, mosaic_periods="equal")
    times = equal.region.times
    assert equal.period_edges[0] == times[0] and equal.period_edges[-1] == times[-1] + dt.timedelta(seconds=1)
    assert not np.array_equal(equal.series(0), ds.series(0))
    with pytest.raises(ValueError, match="num_periods"):
        DUNIAPretrainChips(tiny_world_dir / "GEDI", split="test", chip_size=64, num_periods=4)
    with pytest.raises(EODataError, match="mosaic_year"):
        DUNIAPretrainChips(tiny_world_dir / "GEDI", split="test", chip_size=64, mosaic_year=2021).series(0)


def test_dunia_defaults_follow_the_paper(tiny_world_dir: Path) -> None:
    ds = DUNIAPretrainChips(tiny_world_dir / "GEDI", split="test", chip_size=64)
    shots = ds.shots_ds
    assert shots.leaf_on_months == LEAF_ON_MONTHS and shots.waveform_window == "signal"
    assert ds.composite_20m == tiny_world_dir / "GEDI" / COMPOSITE_20M_NAME and ds.upsample_20m == "cubic"
