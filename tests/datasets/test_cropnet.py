"""Tests of the CropNet dataset, collation, metrics and datamodule on the synthetic world and hand-made files."""

from __future__ import annotations

import datetime as dt
import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import h5py  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from terratorch_eoplugins.datamodules.cropnet import CropNetDataModule  # noqa: E402
from terratorch_eoplugins.datasets.cropnet import (  # noqa: E402
    CROPS,
    WEATHER_VARIABLES,
    CropNet,
    cropnet_collate,
)
from terratorch_eoplugins.errors import EODataError, EODatasetNotFoundError
from terratorch_eoplugins.metrics import cropnet_metrics
from terratorch_eoplugins.synthetic.cropnet import write_cropnet  # noqa: E402

# The real header (../shared/reference/datasets.md section 3), written out independently of the package's constants.
HRRR_HEADER = [
    "Year", "Month", "Day", "Daily/Monthly", "State", "County", "FIPS Code", "Grid Index",
    "Lat (llcrnr)", "Lon (llcrnr)", "Lat (urcrnr)", "Lon (urcrnr)",
    "Avg Temperature (K)", "Max Temperature (K)", "Min Temperature (K)", "Precipitation (kg m**-2)",
    "Relative Humidity (%)", "Wind Gust (m s**-1)", "Wind Speed (m s**-1)",
    "U Component of Wind (m s**-1)", "V Component of Wind (m s**-1)",
    "Downward Shortwave Radiation Flux (W m**-2)", "Vapor Pressure Deficit (kPa)",
]
USDA_HEADER = ["commodity_desc", "reference_period_desc", "year", "state_ansi", "state_name", "county_ansi",
               "county_name", "asd_code", "asd_desc", "domain_desc", "source_desc", "agg_level_desc",
               "PRODUCTION, MEASURED IN BU", "YIELD, MEASURED IN BU / ACRE"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_cropnet(tmp_path_factory.mktemp("cropnet"), "tiny", seed=0)


# --------------------------------------------------------------------------------- hand-made trees
def weather_value(fips: str, grid: int, month: int, day: int, var: int) -> float:
    """Deterministic, distinct value per cell so tests can check where each number lands."""
    return 280.0 + int(fips[-3:]) + 10 * grid + month + day / 100 + var / 1000


def make_tree(root: Path, *, counties: dict[str, int] | None = None, usda: list[tuple[str, str, str]] | None = None,
              image_fips: set[str] | None = None, weather_fips: set[str] | None = None, year: int = 2021,
              months: tuple[int, ...] = (6, 7), drop_hrrr_column: str | None = None,
              drop_usda_column: str | None = None, nan_cells: tuple[tuple[str, int, int, int, int], ...] = (),
              missing_rows: tuple[tuple[str, int, int, int], ...] = (), long_term_year: int | None = None,
              layout: str = "hf", size: int = 8) -> Path:
    """A small real-format CropNet tree in Iowa (state 19). ``counties``: FIPS -> number of grids.

    HRRR grid indices are numbered in the reverse order of the HDF5 grids, so matching by
    coordinates is exercised.
    """
    counties = counties or {"19001": 2}
    image_fips = set(counties) if image_fips is None else image_fips
    weather_fips = set(counties) if weather_fips is None else weather_fips
    usda = usda if usda is not None else [(f, "1000000", "180.5") for f in counties]
    if layout == "hf":
        s2, hrrr, usda_dir = "Sentinel-2 Imagery/data/AG", "WRF-HRRR Computed Dataset/data", "USDA Crop Dataset/Corn"
        crop_name = "Corn"
    else:  # tutorial layout of the CropNet package
        s2, hrrr, usda_dir, crop_name = "Sentinel/AG", "HRRR", "USDA/data/Soybean", "Soybean"

    coords = {f: np.array([[[41.0 + 0.08 * g, -93.0], [41.08 + 0.08 * g, -92.92]] for g in range(n)])
              for f, n in counties.items()}
    # Sentinel-2: one file for Apr-Jun, one for Jul-Sep
    folder = root / s2 / str(year) / "IA"
    folder.mkdir(parents=True, exist_ok=True)
    for q0, q1 in (("04-01", "06-30"), ("07-01", "09-30")):
        qm = range(int(q0[:2]), int(q1[:2]) + 1)
        with h5py.File(folder / f"Agriculture_19_IA_{year}-{q0}_{year}-{q1}.h5", "w") as f:
            for fips in sorted(image_fips):
                n = counties[fips]
                for m in months:
                    if m not in qm:
                        continue
                    for day in (1, 15):
                        g = f.create_group(f"{fips}/{year}-{m:02d}-{day:02d}")
                        data = np.zeros((n, size, size, 3), np.uint8)
                        for k in range(n):
                            data[k] = 10 * k + m + day  # distinct per grid and date
                        g.create_dataset("data", data=data)
                        g.create_dataset("state", data=np.array([b"IOWA"] * n))
                        g.create_dataset("county", data=np.array([f"C{fips}".encode()] * n))
                        g.create_dataset("coordinates", data=coords[fips])
    # HRRR
    def hrrr_file(y: int, m: int, daily: bool) -> None:
        rows = []
        for fips in sorted(weather_fips):
            n = counties[fips]
            for hg in range(n):
                k = n - 1 - hg  # HRRR grid index hg covers HDF5 grid k
                (la0, lo0), (la1, lo1) = coords[fips][k]
                geo = [int(fips), hg, la0, lo0, la1, lo1]
                if daily:
                    for d in range(1, 31 if m == 6 else 32):
                        if (fips, k, m, d) in missing_rows:
                            continue
                        vals = [weather_value(fips, k, m, d, v) for v in range(11)]
                        for nf, nk, nm, nd, nv in nan_cells:
                            if (nf, nk, nm, nd) == (fips, k, m, d):
                                vals[nv] = np.nan
                        rows.append([y, m, d, "Daily", "IA", "Adair", *geo, *vals])
                monthly = [weather_value(fips, k, m, 0, v) for v in range(11)]
                rows.append([y, m, None, "Monthly", "IA", "Adair", *geo, *monthly])
        df = pd.DataFrame(rows, columns=HRRR_HEADER)
        if drop_hrrr_column:
            df = df.drop(columns=[drop_hrrr_column])
        path = root / hrrr / str(y) / "IA" / f"HRRR_19_IA_{y}-{m:02d}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(path, index=False)

    for m in months:
        hrrr_file(year, m, daily=True)
    if long_term_year is not None:
        for m in range(1, 13):
            hrrr_file(long_term_year, m, daily=False)
    # USDA
    rows = [["CORN", "YEAR", year, 19, "IOWA", int(f[2:]), f"C{f}", 70, "SOUTHWEST", "TOTAL", "SURVEY", "COUNTY", p, y]
            for f, p, y in usda]
    df = pd.DataFrame(rows, columns=USDA_HEADER)
    if drop_usda_column:
        df = df.drop(columns=[drop_usda_column])
    path = root / usda_dir / str(year) / f"USDA_{crop_name}_County_{year}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return root


def handmade(root: Path, **kw) -> CropNet:
    args = dict(crop="Corn", years=[2021], months=(6, 7), long_term_years=1)
    args.update(kw)
    return CropNet(root, **args)


# ------------------------------------------------------------------------------------ synthetic
def test_writer_layout(tiny: Path) -> None:
    assert tiny.name == "CropNet"
    total = sum(p.stat().st_size for p in tiny.rglob("*") if p.is_file())
    assert total < 50e6
    h5s = sorted((tiny / "Sentinel-2 Imagery" / "data" / "AG" / "2021" / "IA").glob("*.h5"))
    assert [p.name for p in h5s] == ["Agriculture_19_IA_2021-04-01_2021-06-30.h5",
                                     "Agriculture_19_IA_2021-07-01_2021-09-30.h5"]
    with h5py.File(h5s[0]) as f:
        fips = sorted(f.keys())
        assert all(len(k) == 5 and k.startswith("19") for k in fips)
        grp = f[fips[0]]
        dates = sorted(grp.keys())
        assert dates[0] == "2021-04-01"
        data = grp[dates[0]]["data"]
        assert data.dtype == np.uint8 and data.ndim == 4 and data.shape[1:] == (32, 32, 3)
        coords = grp[dates[0]]["coordinates"][()]
        assert coords.shape == (data.shape[0], 2, 2)
        assert np.all(coords[:, 1] > coords[:, 0])  # upper-right north-east of lower-left
        assert grp[dates[0]]["state"][0] == b"IOWA"
    grids = set()
    for p in (tiny / "Sentinel-2 Imagery" / "data" / "AG" / "2021").rglob("*04-01_*.h5"):
        with h5py.File(p) as f:
            grids |= {f[k]["2021-04-01"]["data"].shape[0] for k in f}
    assert len(grids) >= 3 and min(grids) >= 1 and max(grids) <= 6  # variable number of grids

    csv = tiny / "WRF-HRRR Computed Dataset" / "data" / "2021" / "IA" / "HRRR_19_IA_2021-07.csv"
    df = pd.read_csv(csv)
    assert list(df.columns) == HRRR_HEADER
    assert set(df["Daily/Monthly"]) == {"Daily", "Monthly"}
    assert df.loc[df["Daily/Monthly"] == "Monthly", "Day"].isna().all()
    # long-term years have monthly rows only
    lt = pd.read_csv(tiny / "WRF-HRRR Computed Dataset" / "data" / "2015" / "TX" / "HRRR_48_TX_2015-01.csv")
    assert set(lt["Daily/Monthly"]) == {"Monthly"} and lt["FIPS Code"].astype(str).str.startswith("48").all()

    usda = pd.read_csv(tiny / "USDA Crop Dataset" / "Cotton" / "2021" / "USDA_Cotton_County_2021.csv")
    assert list(usda.columns[:12]) == USDA_HEADER[:12]
    assert "PRODUCTION, MEASURED IN 480 LB BALES" in usda.columns
    assert set(usda["state_ansi"]) == {48}
    corn = pd.read_csv(tiny / "USDA Crop Dataset" / "Corn" / "2020" / "USDA_Corn_County_2020.csv")
    assert set(corn["state_ansi"]) == {17, 19, 48}


@pytest.mark.parametrize("crop", CROPS)
def test_loads_each_crop(tiny: Path, crop: str) -> None:
    ds = CropNet(tiny, crop=crop, split="train", image_size=16)
    assert len(ds) >= 3
    usda = pd.read_csv(next((tiny / "USDA Crop Dataset" / crop / "2021").glob("*.csv")))
    usda["fips"] = usda["state_ansi"].astype(str).str.zfill(2) + usda["county_ansi"].astype(str).str.zfill(3)
    ycol = next(c for c in usda.columns if c.startswith("YIELD"))
    pcol = next(c for c in usda.columns if c.startswith("PRODUCTION"))
    s = ds[len(ds) - 1]
    t, g = s["image"].shape[:2]
    assert s["image"].shape == (t, g, 3, 16, 16) and s["image"].dtype == torch.float32
    assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
    assert s["grid_coords"].shape == (g, 2, 2) and s["n_grids"] == g
    assert s["weather_short"].shape == (6, 31, g, len(WEATHER_VARIABLES))
    assert s["weather_long"].shape == (5, 12, g, len(WEATHER_VARIABLES))
    assert s["weather_long_mask"].all()  # 2016-2020 monthly weather all present
    for key in ("image", "weather_short", "weather_long", "target", "label"):
        assert torch.isfinite(s[key]).all(), key
    assert s["temporal_coords"].shape == (t, 2) and (s["temporal_coords"][:, 0] == 2021).all()
    assert s["dates"][0] == "2021-04-01" and len(s["dates"]) == t
    row = usda[usda["fips"] == s["fips"]].iloc[0]
    assert s["target"][0].item() == pytest.approx(math.log(row[pcol]), rel=1e-6)
    assert s["target"][1].item() == pytest.approx(math.log(row[ycol]), rel=1e-6)
    assert s["label"].tolist() == [s["target"][1].item()]
    assert s["year"] == 2021 and s["state"] == row["state_name"]
    lat, lon = s["location_coords"].tolist()
    assert 25 < lat < 45 and -105 < lon < -85


def test_split_years(tiny: Path) -> None:
    years = {split: {r["year"] for r in CropNet(tiny, crop="Corn", split=split).records}
             for split in ("train", "val", "test")}
    assert years == {"train": {2021}, "val": {2022}, "test": {2020}}
    custom = CropNet(tiny, crop="Corn", split="train", split_years={"train": [2020, 2022]})
    assert {r["year"] for r in custom.records} == {2020, 2022}
    both = CropNet(tiny, crop="Corn", years=[2020, 2022])
    assert len(both) == len(CropNet(tiny, crop="Corn", split="test")) + len(CropNet(tiny, crop="Corn", split="val"))
    with pytest.raises(ValueError, match="split"):
        CropNet(tiny, crop="Corn", split="holdout")
    with pytest.raises(ValueError, match="crop"):
        CropNet(tiny, crop="Rice")
    with pytest.raises(ValueError, match="target"):
        CropNet(tiny, crop="Corn", target="area")


def test_synthetic_skips_are_logged(tiny: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="terratorch_eoplugins.datasets"):
        ds = CropNet(tiny, crop="Cotton", split="val")
    # the last Texas county has no imagery in 2022, and some county-years have a withheld yield
    assert ds.skipped["no_images"] == 1
    assert "without Sentinel-2 images" in caplog.text
    total_usda = sum(CropNet(tiny, crop=c, years=[y]).skipped["no_yield"] for c in CROPS for y in (2020, 2021, 2022))
    assert total_usda >= 1


def test_collate_keeps_every_grid(tiny: Path) -> None:
    ds = CropNet(tiny, crop="Corn", split="train", max_dates=3)
    samples = [ds[i] for i in range(len(ds))]
    n_grids = [s["n_grids"] for s in samples]
    assert len(set(n_grids)) >= 2
    batch = cropnet_collate(samples)
    g_max = max(n_grids)
    assert batch["image"].shape[:3] == (len(samples), 3, g_max)
    assert batch["grid_mask"].sum(1).tolist() == n_grids
    assert batch["weather_short"].shape[3] == g_max and batch["weather_long"].shape[3] == g_max
    for b, s in enumerate(samples):
        g = s["n_grids"]
        assert torch.equal(batch["image"][b, :, :g], s["image"])
        assert torch.equal(batch["weather_short"][b, :, :, :g], s["weather_short"])
        assert torch.equal(batch["grid_coords"][b, :g], s["grid_coords"])
        assert (batch["image"][b, :, g:] == 0).all()
    assert batch["time_mask"].all() and batch["fips"] == [s["fips"] for s in samples]


def test_grid_mean_and_targets(tiny: Path) -> None:
    full = CropNet(tiny, crop="Soybeans", split="val")
    mean = CropNet(tiny, crop="Soybeans", split="val", grid_aggregation="mean", target="both")
    prod = CropNet(tiny, crop="Soybeans", split="val", target="production")
    i = max(range(len(full)), key=lambda k: full.records[k]["log_yield"])
    a, b = full[i], mean[i]
    t, g = a["image"].shape[:2]
    assert b["image"].shape == (3, t, *a["image"].shape[-2:])
    torch.testing.assert_close(b["image"], a["image"].mean(1).permute(1, 0, 2, 3))
    torch.testing.assert_close(b["weather_short"], a["weather_short"].mean(2))
    torch.testing.assert_close(b["weather_long"], a["weather_long"].mean(2))
    assert torch.equal(b["label"], a["target"]) and torch.equal(prod[i]["label"], a["target"][:1])
    batch = cropnet_collate([mean[k] for k in range(len(mean))])
    assert batch["image"].ndim == 5 and batch["label"].shape == (len(mean), 2)


def test_datamodule_normalises_and_filters(tiny: Path) -> None:
    dm = CropNetDataModule(tiny, crop="Corn", batch_size=3, batch_keys=("grid_mask", "weather_short"))
    dm.setup("fit")
    train = dm.train_dataset
    stats = dm.statistics()
    assert len(stats["image_mean"]) == 3 and len(stats["weather_mean"]) == len(WEATHER_VARIABLES)
    assert 280 < stats["weather_mean"][0] < 305  # K
    imgs = torch.cat([train[i]["image"].permute(2, 0, 1, 3, 4).reshape(3, -1) for i in range(len(train))], 1)
    assert imgs.mean(1).abs().max() < 0.2 and (imgs.std(1) - 1).abs().max() < 0.3
    ws = torch.cat([train[i]["weather_short"].reshape(-1, 9) for i in range(len(train))])
    assert ws.mean(0).abs().max() < 0.2
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "grid_mask", "weather_short"}
    assert batch["label"].shape == (3, 1) and dm.num_outputs == 1
    dm_all = CropNetDataModule(tiny, crop="Corn", batch_size=2, batch_keys=None, grid_aggregation="mean",
                               image_size=8, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    dm_all.setup("test")
    batch = next(iter(dm_all.test_dataloader()))
    assert {"target", "grid_mask", "time_mask", "fips", "temporal_coords"} <= set(batch)
    assert batch["image"].shape[:2] == (2, 3) and batch["image"].shape[-1] == 8
    assert dm_all.statistics()["image_mean"] == [0.5] * 3  # explicit statistics are kept


def test_weather_windows_and_label_statistics_for_ts_fusion(tiny: Path) -> None:
    """TS fusion's data view: daily weather windows around every image date, padded like the images, and the label
    statistics with which a model maps standardised predictions back to log yields."""
    from terratorch_eoplugins.datasets.weather_windows import hrrr_columns, weather_windows

    keys = ["weather_windows", "grid_mask", "time_mask", "label_mean", "label_std"]
    dm = CropNetDataModule(tiny, crop="Corn", grid_aggregation="none", normalize=False, standardize_label=True,
                           long_term_years=0, image_size=8, max_dates=3, batch_size=4, batch_keys=keys,
                           window_weather=("precip", "tavg"), window_before=5, window_after=2)
    dm.setup("fit")
    s = dm.train_dataset[0]
    idx = [WEATHER_VARIABLES.index(c) for c in hrrr_columns(["precip", "tavg"])]
    assert s["weather_windows"].shape == (len(s["dates"]), s["n_grids"], 2, 8)
    wins, _, _ = weather_windows(s["weather_short"], s["weather_short_mask"], s["dates"], (4, 5, 6, 7, 8, 9), 5, 2)
    assert torch.equal(s["weather_windows"], wins[:, :, idx])
    # independent: a date with 5 days before and 2 after inside the season sits at position 5 of its window
    season = (dt.date(s["year"], 4, 1), dt.date(s["year"], 9, 30))
    checked = 0
    for t, iso in enumerate(s["dates"]):
        day = dt.date.fromisoformat(iso)
        if (day - season[0]).days >= 5 and (season[1] - day).days >= 2:
            for k, when in enumerate([day - dt.timedelta(days=5 - k) for k in range(8)]):
                value = s["weather_short"][when.month - 4, when.day - 1, 0, idx[1]]
                assert s["weather_windows"][t, 0, 1, k] == value
            checked += 1
    assert checked
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"image", "label", *keys}
    samples = [dm.val_dataset[i] for i in range(len(batch["label"]))]
    for b, smp in enumerate(samples):
        t, g = smp["weather_windows"].shape[:2]
        assert torch.equal(batch["weather_windows"][b, :t, :g], smp["weather_windows"])
        assert (batch["weather_windows"][b, :, g:] == 0).all()
    mean, std = dm.label_statistics()
    assert torch.equal(batch["label_mean"], mean.expand(len(samples), -1))
    assert torch.equal(batch["label_std"], std.expand(len(samples), -1))
    torch.testing.assert_close(batch["label"] * batch["label_std"] + batch["label_mean"],
                               torch.stack([smp["label"] for smp in samples]))
    plain = CropNetDataModule(tiny, crop="Corn", grid_aggregation="mean", image_size=8, max_dates=3, batch_size=2,
                              batch_keys=["label_mean", "label_std"], image_mean=[0.5] * 3, image_std=[0.25] * 3,
                              weather_mean=[0.0] * 9, weather_std=[1.0] * 9, weather_long_mean=[0.0] * 9,
                              weather_long_std=[1.0] * 9)
    plain.setup("validate")
    batch = next(iter(plain.val_dataloader()))
    assert (batch["label_mean"] == 0).all() and (batch["label_std"] == 1).all() and "weather_windows" not in batch
    with pytest.raises(ValueError, match="grid_aggregation"):
        CropNet(tiny, crop="Corn", grid_aggregation="mean", window_weather=["tavg"])
    with pytest.raises(ValueError, match="not among weather_variables"):
        CropNet(tiny, crop="Corn", weather_variables=WEATHER_VARIABLES[:2], window_weather=["precip"])
    with pytest.raises(ValueError, match="unknown"):
        CropNet(tiny, crop="Corn", window_weather=["snow"])


def test_signal_is_learnable(tiny: Path) -> None:
    """OLS on growing-season weather and summer greenness predicts held-out log corn yield."""

    def features(ds: CropNet) -> tuple[np.ndarray, np.ndarray]:
        x, y = [], []
        for i in range(len(ds)):
            s = ds[i]
            w = s["weather_short"].mean(2).numpy()[2:5]  # Jun-Aug
            m = s["weather_short_mask"].numpy()[2:5]
            temp, precip, vpd = w[m][:, 0].mean(), w[m][:, 3].mean(), w[m][:, 8].mean()
            summer = [k for k, d in enumerate(s["dates"]) if d[5:7] in ("06", "07", "08")]
            img = s["image"].numpy()[summer]
            red, nir = img[:, :, 0], img[:, :, 1]  # Agriculture composite: B11, B08, B02
            green = ((nir - red) / (nir + red + 1e-6)).mean()
            x.append([1.0, temp - 296, (temp - 296) ** 2, np.log(precip), vpd, green])
            y.append(s["label"].item())
        return np.array(x), np.array(y)

    x_tr, y_tr = features(CropNet(tiny, crop="Corn", years=[2020, 2021]))
    x_te, y_te = features(CropNet(tiny, crop="Corn", years=[2022]))
    coef = np.linalg.lstsq(x_tr, y_tr, rcond=None)[0]
    pred = x_te @ coef
    r2 = 1 - ((y_te - pred) ** 2).sum() / ((y_te - y_te.mean()) ** 2).sum()
    assert len(y_te) >= 8 and r2 > 0.3
    assert cropnet_metrics(pred, y_te)["r"] > 0.55


def test_plot(tiny: Path) -> None:
    ds = CropNet(tiny, crop="Corn", split="test")
    s = ds[0]
    s["prediction"] = s["label"] + 0.05
    fig = ds.plot(s, suptitle="corn")
    assert len(fig.axes) >= 5
    plt.close(fig)
    dm = CropNet(tiny, crop="Corn", split="test", grid_aggregation="mean", image_mean=[0.5] * 3,
                 image_std=[0.2] * 3, weather_mean=[1.0] * 9, weather_std=[2.0] * 9)
    fig = dm.plot(dm[0], show_titles=False)
    plt.close(fig)


# ------------------------------------------------------------------------------------- metrics
def test_metrics_match_hand_computation() -> None:
    pred, true = np.array([100.0, 150.0, 200.0]), np.array([110.0, 140.0, 210.0])
    out = cropnet_metrics(torch.tensor(np.log(pred)), np.log(true))
    assert out["RMSE"] == pytest.approx(10.0)
    # deviations: pred (-50, 0, 50), true (-43.33, -13.33, 56.67); sum of products 5000
    r = 5000.0 / math.sqrt(5000.0 * (43.333333**2 + 13.333333**2 + 56.666667**2))
    assert out["r"] == pytest.approx(r, rel=1e-6)
    assert out["r2_pearson"] == pytest.approx(r * r, rel=1e-6)
    assert out["MAE"] == pytest.approx(10.0)
    # R2 is the coefficient of determination: 1 - SS_res / SS_tot
    assert out["R2"] == pytest.approx(1 - 300.0 / (43.333333**2 + 13.333333**2 + 56.666667**2), rel=1e-6)
    biased = cropnet_metrics(np.log(pred * 2), np.log(pred))  # perfectly correlated, wrong scale
    assert biased["r2_pearson"] == pytest.approx(1.0) and biased["R2"] < 0
    with pytest.raises(ValueError, match="same number"):
        cropnet_metrics([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2"):
        cropnet_metrics([1.0], [1.0])


# ---------------------------------------------------------------------------------- hand-made files
def test_handmade_values_and_grid_matching(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "CropNet", counties={"19001": 3}, long_term_year=2020)
    ds = handmade(root)
    assert len(ds) == 1
    s = ds[0]
    assert s["dates"] == ["2021-06-01", "2021-06-15", "2021-07-01", "2021-07-15"]
    assert s["county"] == "C19001" and s["state"] == "IOWA" and s["fips"] == "19001"
    # grid k of the image on June 15 has value 10 k + 6 + 15
    assert s["image"][1, 2, 0, 0, 0].item() == pytest.approx((20 + 21) / 255)
    # HRRR grid indices are reversed relative to the HDF5 grids: values must follow coordinates
    for k in range(3):
        assert s["weather_short"][0, 2, k, 0].item() == pytest.approx(weather_value("19001", k, 6, 3, 0), abs=1e-3)
        assert s["weather_short"][1, 30, k, 8].item() == pytest.approx(weather_value("19001", k, 7, 31, 10), abs=1e-3)
        assert s["weather_long"][0, 6, k, 3].item() == pytest.approx(weather_value("19001", k, 7, 0, 3), abs=1e-3)
    assert s["weather_short_mask"][0, :30].all() and not s["weather_short_mask"][0, 30]  # no June 31
    assert s["weather_short_mask"][1].all() and s["weather_long_mask"].all()
    assert s["target"].tolist() == pytest.approx([math.log(1e6), math.log(180.5)])


def test_missing_weather_values_are_interpolated_and_masked(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "CropNet", counties={"19001": 2},
                     nan_cells=(("19001", 0, 6, 10, 0), ("19001", 1, 7, 1, 3)),
                     missing_rows=(("19001", 1, 6, 20),))
    ds = handmade(root, days_per_month=28)
    s = ds[0]
    ws, mask = s["weather_short"], s["weather_short_mask"]
    assert ws.shape == (2, 28, 2, 9) and torch.isfinite(ws).all()
    exp = (weather_value("19001", 0, 6, 9, 0) + weather_value("19001", 0, 6, 11, 0)) / 2
    assert ws[0, 9, 0, 0].item() == pytest.approx(exp, abs=1e-3)
    exp = (weather_value("19001", 1, 6, 19, 4) + weather_value("19001", 1, 6, 21, 4)) / 2  # RH of the lost row
    assert ws[0, 19, 1, 4].item() == pytest.approx(exp, abs=1e-3)
    # July 1 of grid 1 has no precipitation: interpolated between June 30 and July 2 (across months)
    exp = (weather_value("19001", 1, 6, 30, 3) + weather_value("19001", 1, 7, 2, 3)) / 2
    assert ws[1, 0, 1, 3].item() == pytest.approx(exp, abs=1e-3)
    assert not mask[0, 9] and not mask[0, 19] and not mask[1, 0]
    assert int(mask.sum()) == 2 * 28 - 3
    # no long-term file at all: filled with finite values, fully masked
    assert torch.isfinite(s["weather_long"]).all() and not s["weather_long_mask"].any()


def test_csv_with_missing_column(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "a" / "CropNet", drop_hrrr_column="Vapor Pressure Deficit (kPa)")
    with pytest.raises(EODataError, match=r"HRRR_19_IA_2021-06\.csv.*Vapor Pressure Deficit"):
        handmade(root)
    root = make_tree(tmp_path / "b" / "CropNet", drop_usda_column="YIELD, MEASURED IN BU / ACRE")
    with pytest.raises(EODataError, match=r"USDA_Corn_County_2021\.csv.*YIELD, MEASURED IN"):
        handmade(root)
    root = make_tree(tmp_path / "c" / "CropNet", drop_usda_column="county_ansi")
    with pytest.raises(EODataError, match=r"USDA_Corn_County_2021\.csv.*county_ansi"):
        handmade(root)


def test_county_without_yield_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_tree(tmp_path / "CropNet", counties={"19001": 1, "19003": 2, "19005": 1},
                     usda=[("19001", "1000", "150"), ("19003", "2000", ""), ("19005", "(D)", "(D)")])
    with caplog.at_level(logging.WARNING, logger="terratorch_eoplugins.datasets"):
        ds = handmade(root)
    assert [r["fips"] for r in ds.records] == ["19001"]
    assert ds.skipped["no_yield"] == 2
    assert "skipped 2 county-years without USDA yield" in caplog.text


def test_county_without_grids_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_tree(tmp_path / "CropNet", counties={"19001": 1, "19003": 2}, image_fips={"19001"})
    with caplog.at_level(logging.WARNING, logger="terratorch_eoplugins.datasets"):
        ds = handmade(root)
    assert [r["fips"] for r in ds.records] == ["19001"] and ds.skipped["no_images"] == 1
    assert "skipped 1 county-years without Sentinel-2 images" in caplog.text


def test_image_without_weather_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_tree(tmp_path / "CropNet", counties={"19001": 1, "19003": 2}, weather_fips={"19003"})
    with caplog.at_level(logging.WARNING, logger="terratorch_eoplugins.datasets"):
        ds = handmade(root)
    assert [r["fips"] for r in ds.records] == ["19003"] and ds.skipped["no_weather"] == 1
    assert "skipped 1 county-years without daily weather" in caplog.text
    # a missing short-term month file also means "no weather"
    with pytest.raises(EODataError, match="is empty"):
        handmade(root, months=(6, 7, 8))


def test_empty_split_and_missing_files(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "CropNet", usda=[("19001", "", "")])
    with pytest.raises(EODataError, match=r"Corn split .* is empty.*no_yield': 1"):
        handmade(root)
    with pytest.raises(EODatasetNotFoundError, match="USDA Corn file of 2019"):
        handmade(root, years=[2019])
    with pytest.raises(EODatasetNotFoundError, match="CropNet root"):
        handmade(tmp_path / "nowhere")
    with pytest.raises(EODatasetNotFoundError, match="WRF-HRRR"):
        handmade(root, hrrr_root="HRRR")


def test_bad_image_array(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "CropNet")
    path = root / "Sentinel-2 Imagery/data/AG/2021/IA/Agriculture_19_IA_2021-04-01_2021-06-30.h5"
    with h5py.File(path, "a") as f:
        del f["19001/2021-06-15/data"]
        f["19001/2021-06-15"].create_dataset("data", data=np.zeros((2, 8, 8), np.uint8))
    ds = handmade(root)
    with pytest.raises(EODataError, match=r"19001/2021-06-15/data: expected a 4-D array"):
        ds[0]


def test_tutorial_layout_is_configurable(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "CropNet", layout="tutorial")
    ds = CropNet(root, crop="Soybeans", years=[2021], months=(6, 7), long_term_years=0, s2_root="Sentinel",
                 hrrr_root="HRRR", usda_root="USDA/data", crop_dirs={"Soybeans": "Soybean"})
    s = ds[0]
    assert s["weather_long"].shape == (0, 12, 2, 9) and s["image"].shape[:2] == (4, 2)
