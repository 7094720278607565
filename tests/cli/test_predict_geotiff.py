"""``terratorch predict ... --predict_output_dir DIR`` writes georeferenced Cloud-Optimized GeoTIFFs.

Unit tests of the writer (class and regression maps, file ownership, key stripping, county CSV), then one
shipped config per model family run through terratorch's CLI on the tiny world, whose written maps are reopened
with rasterio and compared with the georeferencing of each sample's source (PASTIS patch polygons, the LIANet
region's tiles, the GEDI composite, the Burn Scars scenes), and one real ``terratorch fit`` + ``terratorch
predict`` pair in subprocesses run from a folder other than the checkpoint's.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.warp
import rasterio.windows
import torch
from rasterio.transform import from_bounds
from test_configs import REPO, _data_root_override

from terratorch_eoplugins.datasets.common import PREDICT_META_KEY, class_legend, collate_georeference
from terratorch_eoplugins.datasets.pastis import PASTIS_CLASSES, PASTIS_PALETTE
from terratorch_eoplugins.tasks.prediction_writer import PREDICT_META_KEY as WRITER_KEY
from terratorch_eoplugins.tasks.prediction_writer import GeoTIFFPredictionWriter, write_prediction_cog

CONFIGS = REPO / "configs"
T = (10.0, 0.0, 500000.0, 0.0, -10.0, 4200000.0)


class _Trainer:
    """What the writer reads from a trainer: ``predict_output_dir`` and ``callbacks``."""

    def __init__(self, out: Path) -> None:
        self.predict_output_dir = str(out)
        self.callbacks: list = []


def _cog(path: Path) -> rasterio.DatasetReader:
    src = rasterio.open(path)
    assert src.driver == "GTiff" and src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG", path
    assert src.profile["tiled"], path
    return src


# ---------------------------------------------------------------------------------------------- the writer
def test_class_map_is_a_uint8_cog_with_colour_table_and_class_names(tmp_path: Path) -> None:
    labels = np.arange(300 * 300).reshape(300, 300) % 5
    colors = [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 8, 7]]
    path = write_prediction_cog(tmp_path / "m.tif", labels, "EPSG:32631", T, classes=True,
                                class_names=list("abcde"), colors=colors)
    with _cog(path) as src:
        assert src.dtypes == ("uint8",) and src.nodata is None
        assert src.crs.to_epsg() == 32631 and tuple(src.transform)[:6] == T
        np.testing.assert_array_equal(src.read(1), labels)
        assert src.colormap(1)[4] == (9, 8, 7, 255) and src.colormap(1)[1] == (255, 0, 0, 255)
        tags = src.tags()
        assert json.loads(tags["class_names"]) == list("abcde") and tags["CLASS_3"] == "d"
        assert tags["kind"] == "classes" and src.overviews(1)  # 300 px > one 256 px block: overviews exist


def test_regression_map_is_float32_with_nodata(tmp_path: Path) -> None:
    values = np.array([[[1.5, np.nan], [np.inf, -2.0]], [[0.0, 1.0], [2.0, 3.0]]], np.float64)
    path = write_prediction_cog(tmp_path / "r.tif", values, "EPSG:2154", T, classes=False, nodata=-9999.0,
                                band_names=["rh98", "cover"])
    with _cog(path) as src:
        assert src.dtypes == ("float32", "float32") and src.nodata == -9999.0
        assert src.descriptions == ("rh98", "cover") and src.tags()["kind"] == "regression"
        np.testing.assert_array_equal(src.read(1), np.array([[1.5, -9999.0], [-9999.0, -2.0]], np.float32))


def test_writer_strips_the_batch_and_writes_each_sample(tmp_path: Path) -> None:
    writer = GeoTIFFPredictionWriter()
    trainer = _Trainer(tmp_path / "out")
    samples = [{"filename": f"/data/DATA_S2/S2_{i}.npy", "crs": "EPSG:2154", "transform": torch.tensor(T)}
               for i in (1, 2)]
    batch = {"image": torch.zeros(2, 3, 4, 4), PREDICT_META_KEY: {**collate_georeference(samples),
                                                                  "legend": {"names": ["x", "y"], "colors": []}}}
    writer.on_predict_batch_start(trainer, None, batch, 0)
    assert set(batch) == {"image"}  # what reaches the model
    pred = torch.tensor([[[0, 1], [1, 0]], [[1, 1], [1, 1]]])
    writer.write_on_batch_end(trainer, None, (pred, ["ignored"] * 2), None, batch, 0)
    assert sorted(p.name for p in writer.written) == ["S2_1_pred.tif", "S2_2_pred.tif"]
    with rasterio.open(tmp_path / "out" / "S2_2_pred.tif") as src:
        assert src.read(1).tolist() == [[1, 1], [1, 1]] and src.tags()["source"] == "/data/DATA_S2/S2_2.npy"


def test_writer_replaces_its_own_files_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    meta = {"filename": ["a.tif"], "crs": ["EPSG:2154"], "transform": [T]}
    for _ in range(2):  # a second predict run into the same folder replaces its own map
        writer = GeoTIFFPredictionWriter()
        writer.setup(_Trainer(out), None, "predict")
        writer.on_predict_batch_start(_Trainer(out), None, {PREDICT_META_KEY: dict(meta)}, 0)
        writer.write_on_batch_end(_Trainer(out), None, torch.ones(1, 2, 2), None, {}, 0)
    foreign = out / "b_pred.tif"
    foreign.write_bytes(b"user data")
    writer = GeoTIFFPredictionWriter()
    writer.on_predict_batch_start(_Trainer(out), None, {PREDICT_META_KEY: {**meta, "filename": ["b.tif"]}}, 0)
    with pytest.raises(FileExistsError, match="b_pred.tif"):
        writer.write_on_batch_end(_Trainer(out), None, torch.ones(1, 2, 2), None, {}, 0)
    assert foreign.read_bytes() == b"user data"


def test_writer_errors_name_what_is_missing(tmp_path: Path) -> None:
    writer = GeoTIFFPredictionWriter()
    with pytest.raises(Exception, match="predict_meta"):
        writer.write_on_batch_end(_Trainer(tmp_path), None, torch.ones(1, 2, 2), None, {}, 0)
    writer.on_predict_batch_start(_Trainer(tmp_path), None, {PREDICT_META_KEY: {"filename": ["a"]}}, 0)
    with pytest.raises(Exception, match="'crs' and 'transform'"):
        writer.write_on_batch_end(_Trainer(tmp_path), None, torch.ones(1, 2, 2), None, {}, 0)
    trainer = _Trainer(tmp_path)
    trainer.predict_output_dir = None
    with pytest.raises(ValueError, match="--predict_output_dir"):
        writer.output_folder(trainer)


def test_scalar_predictions_go_to_a_csv_in_target_units(tmp_path: Path) -> None:
    """County-level CropNet yields: one row per county-year, standardised outputs mapped back."""
    writer = GeoTIFFPredictionWriter()
    meta = {"filename": ["19001_2020", "19003_2020"], "label_mean": [[5.0], [5.0]], "label_std": [[0.5], [0.5]]}
    writer.on_predict_batch_start(_Trainer(tmp_path), None, {PREDICT_META_KEY: meta}, 0)
    writer.write_on_batch_end(_Trainer(tmp_path), None, (torch.tensor([1.0, -2.0]), None), None, {}, 0)
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert lines == ["sample,output_0,prediction_0", "19001_2020,1,5.5", "19003_2020,-2,4"]


def test_scalar_predictions_without_meta_are_named_by_dataset_index(tmp_path: Path) -> None:
    """The TS-fusion CropNet loader has no ``predict_meta``: rows are named by dataset index, stats from the batch."""
    writer = GeoTIFFPredictionWriter()
    batch = {"label_mean": torch.tensor([[1.0], [1.0]]), "label_std": torch.tensor([[2.0], [2.0]])}
    writer.write_on_batch_end(_Trainer(tmp_path), None, torch.tensor([[0.5], [1.0]]), [3, 4], batch, 0)
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert lines == ["sample,output_0,prediction_0", "3,0.5,2", "4,1,3"]
    with pytest.raises(Exception, match="predict_meta"):  # maps need georeferencing: no silent fallback
        writer.write_on_batch_end(_Trainer(tmp_path), None, torch.ones(1, 2, 2), [0], {}, 1)


def test_meta_key_and_legend_are_shared_by_datasets_and_writer() -> None:
    assert WRITER_KEY == PREDICT_META_KEY

    class _DS:
        classes = PASTIS_CLASSES
        palette = PASTIS_PALETTE

    legend = class_legend(_DS())
    assert legend["names"] == list(PASTIS_CLASSES) and legend["colors"][1] == [31, 119, 180]


# ---------------------------------------------------------------------- shipped configs through the CLI
def _predict(config: str, world: Path, tmp: Path, extra: list[str] = (), fit_first: bool = False) -> Path:
    """``[fit then] predict`` of a shipped config through terratorch's CLI in this process; returns the maps' folder."""
    from terratorch.cli_tools import build_lightning_cli

    cfg = CONFIGS / f"{config}.yaml"
    profile = CONFIGS / "profiles" / "cpu" / f"{config}.yaml"  # the CPU size of a paper-scale config
    out = tmp / "maps"
    common = ["-c", str(cfg), *(["-c", str(profile)] if profile.is_file() else []), *_data_root_override(cfg, world),
              f"--trainer.default_root_dir={tmp}", f"--trainer.logger.init_args.save_dir={tmp}", *extra]
    ckpt = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fit_first:
            build_lightning_cli(["fit", *common, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
                                 "--trainer.limit_val_batches=0"])
            ckpt = [f"--ckpt_path={next(tmp.glob('**/last.ckpt'))}"]
        build_lightning_cli(["predict", *common, *ckpt, "--trainer.limit_predict_batches=1",
                             f"--predict_output_dir={out}"])
    assert sorted(out.glob("*.tif")), f"{config}: no map written in {out}"
    return out


def _check_pastis(maps: Path, world: Path, prefix: str) -> None:
    meta = gpd.read_file(world / "PASTIS-R" / "metadata.geojson").set_index("ID_PATCH")
    for path in sorted(maps.glob("*.tif")):
        pid = int(re.fullmatch(rf"{prefix}_(\d+)_pred\.tif", path.name).group(1))
        with _cog(path) as src:
            assert src.crs.to_epsg() == 2154 and src.shape == (128, 128)
            expected = from_bounds(*meta.loc[pid].geometry.bounds, 128, 128)
            assert src.transform.almost_equals(expected, precision=1e-6)
            assert src.dtypes == ("uint8",)
            assert json.loads(src.tags()["class_names"])[:19] == list(PASTIS_CLASSES[:19])
            assert src.colormap(1)[3] == (44, 160, 44, 255)  # PASTIS palette: Corn
            assert src.read(1).max() < 19


@pytest.mark.slow
# S4's data module reads both series of a patch (radar aligned to the optical dates), so its maps are named after
# the patch's S2 file whatever the inference modality
@pytest.mark.parametrize(("config", "prefix"), [("micro_unet_pastis", "S2"), ("s4_pastis_optical", "S2"),
                                                ("s4_pastis_radar", "S2"), ("dunia_pastis", "S2")])
def test_pastis_configs_write_the_patch_grid(config: str, prefix: str, tiny_world_dir: Path, tmp_path: Path) -> None:
    """PASTIS baseline (TemporalWrapper, which rejects unknown keys), S4 optical/radar, DUNIA fine-tuned."""
    _check_pastis(_predict(config, tiny_world_dir, tmp_path, ["--data.init_args.batch_size=2"]), tiny_world_dir,
                  prefix)


@pytest.mark.slow
def test_dunia_zeroshot_pastis_writes_class_maps(tiny_world_dir: Path, tmp_path: Path) -> None:
    maps = _predict("dunia_pastis_zeroshot", tiny_world_dir, tmp_path,
                    ["--data.init_args.batch_size=1", "--model.init_args.pixels_per_image=64"], fit_first=True)
    _check_pastis(maps, tiny_world_dir, "S2")


@pytest.mark.slow
def test_lianet_maps_sit_on_the_region_grid_over_the_patch(tiny_world_dir: Path, tmp_path: Path) -> None:
    maps = _predict("lianet_pastis", tiny_world_dir, tmp_path)
    meta = gpd.read_file(tiny_world_dir / "PASTIS-R" / "metadata.geojson").set_index("ID_PATCH")
    names = sorted(maps.glob("*.tif"))
    assert len(names) > 1  # (date x patch) samples: one map per acquisition of a patch
    for path in names:
        pid, when = re.fullmatch(r"(\d+)_(\d{8}T\d{6})_pred\.tif", path.name).groups()
        tile = next((tiny_world_dir / "S2_TILES").glob(f"*/{when}.tif"))
        with _cog(path) as src, rasterio.open(tile) as ref:
            assert src.crs == ref.crs and src.res == ref.res and src.dtypes == ("uint8",)
            col, row = ~ref.transform * (src.transform.c, src.transform.f)
            assert abs(col - round(col)) < 1e-6 and abs(row - round(row)) < 1e-6  # on the tile's pixel grid
            left, _, _, top = rasterio.warp.transform_bounds(meta.crs, ref.crs, *meta.loc[int(pid)].geometry.bounds)
            assert abs(src.bounds.left - left) <= ref.res[0] and abs(src.bounds.top - top) <= ref.res[0]
            assert json.loads(src.tags()["class_names"])[1] == "Meadow"


def _check_gedi(maps: Path, world: Path, bands: int = 1) -> None:
    with rasterio.open(world / "GEDI" / "S2L2A_S1GRD_composite.tif") as comp:
        for path in sorted(maps.glob("*.tif")):
            row, col = map(int, re.fullmatch(r"S2L2A_S1GRD_composite_r(\d+)_c(\d+)_pred\.tif", path.name).groups())
            with _cog(path) as src:
                assert src.crs == comp.crs and src.dtypes == ("float32",) * bands and src.nodata == -9999.0
                window = rasterio.windows.Window(col, row, src.width, src.height)
                assert src.transform == rasterio.windows.transform(window, comp.transform)
                assert src.tags()["kind"] == "regression" and np.isfinite(src.read()).all()


@pytest.mark.slow
def test_gedi_regression_config_writes_float_maps(tiny_world_dir: Path, tmp_path: Path) -> None:
    _check_gedi(_predict("dunia_gedi", tiny_world_dir, tmp_path, ["--data.init_args.batch_size=2"]), tiny_world_dir)


@pytest.mark.slow
def test_dunia_zeroshot_gedi_predicts_tile_by_tile(tiny_world_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """64 px chips embedded as 32 px tiles with 8 px overlap, blended, then retrieved."""
    from terratorch_eoplugins.tasks.dunia_knn import DUNIAZeroShotKNNTask

    shapes: list[tuple[int, ...]] = []
    embed = DUNIAZeroShotKNNTask._embed_prepared

    def spy(self: DUNIAZeroShotKNNTask, x: torch.Tensor) -> torch.Tensor:
        if self.trainer.predicting:
            shapes.append(tuple(x.shape[-2:]))
        return embed(self, x)

    monkeypatch.setattr(DUNIAZeroShotKNNTask, "_embed_prepared", spy)
    tiles = "{h_crop: 32, w_crop: 32, h_stride: 24, w_stride: 24, delta: 4}"
    maps = _predict("dunia_gedi_zeroshot", tiny_world_dir, tmp_path,
                    ["--data.init_args.batch_size=2", f"--model.init_args.tiled_inference_parameters={tiles}"],
                    fit_first=True)
    _check_gedi(maps, tiny_world_dir, bands=3)  # RH98, canopy cover, PAI: one database, one band each
    assert shapes and set(shapes) == {(32, 32)}  # every forward pass of predict saw one tile


@pytest.mark.slow
def test_burnscars_maps_match_their_scenes(tiny_world_dir: Path, tmp_path: Path) -> None:
    maps = _predict("unet_burnscars", tiny_world_dir, tmp_path, ["--data.init_args.batch_size=1"])
    for path in sorted(maps.glob("*.tif")):
        with _cog(path) as src, rasterio.open(src.tags()["source"]) as scene:
            assert path.name == Path(scene.name).stem + "_pred.tif"
            assert src.crs == scene.crs and src.transform == scene.transform and src.bounds == scene.bounds
            assert src.dtypes == ("uint8",) and json.loads(src.tags()["class_names"]) == ["Not burned", "Burn scar"]
            assert src.colormap(1)[1] == (229, 51, 26, 255)


@pytest.mark.slow
def test_cropnet_predict_batches_name_county_years(tiny_world_dir: Path) -> None:
    """CropNet has no rasters: its predict batches give the writer county-year ids and the label statistics."""
    from terratorch_eoplugins.datamodules.cropnet import CropNetDataModule

    dm = CropNetDataModule(root=str(tiny_world_dir / "CropNet"), max_dates=2, batch_size=2, standardize_label=True)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    meta = batch.pop(PREDICT_META_KEY)
    first = dm.predict_dataset[0]
    assert meta["filename"][0] == f"{first['fips']}_{first['year']}"
    mean, std = dm.label_statistics()
    assert meta["label_mean"][0] == pytest.approx(mean.tolist()) and meta["label_std"][0] == pytest.approx(std.tolist())
    assert "crs" not in meta and "label_mean" not in batch  # default batch_keys: nothing extra reaches the model


# ------------------------------------------------------------------ the real command, from another folder
@pytest.mark.slow
@pytest.mark.compat  # also in CI's Python 3.12 leg (.ci/run)
def test_terratorch_predict_from_another_folder(tiny_world_dir: Path, tmp_path: Path,
                                                cli_env: dict[str, str]) -> None:
    """``terratorch fit`` in one folder, ``terratorch predict --ckpt_path`` in another, relative output folder."""
    exe = shutil.which("terratorch", path=str(Path(sys.executable).parent))
    assert exe, "the terratorch console script is not installed next to this Python"
    cfg = CONFIGS / "micro_unet_pastis.yaml"
    data = _data_root_override(cfg, tiny_world_dir)
    fit_dir, other = tmp_path / "fit", tmp_path / "elsewhere"
    fit_dir.mkdir()
    other.mkdir()
    fit = subprocess.run([exe, "fit", "-c", str(cfg), *data, "--trainer.max_epochs=1",
                          "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"],
                         cwd=fit_dir, env=cli_env, capture_output=True, text=True, timeout=900)
    assert fit.returncode == 0, fit.stderr[-4000:]
    ckpt = next(fit_dir.glob("runs/**/last.ckpt"))
    pred = subprocess.run([exe, "predict", "-c", str(cfg), *data, f"--ckpt_path={ckpt}",
                           "--predict_output_dir", "maps"],
                          cwd=other, env=cli_env, capture_output=True, text=True, timeout=900)
    assert pred.returncode == 0, pred.stderr[-4000:]
    _check_pastis(other / "maps", tiny_world_dir, "S2")
    assert not list(other.glob("maps/*.pt"))  # terratorch's default writer did not write tensors beside them
