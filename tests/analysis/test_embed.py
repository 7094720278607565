"""``eoplugins embed``: DUNIA O^V/O^H and LIANet trunk features as tiled, georeferenced GeoTIFF stacks."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from terratorch_eoplugins.analysis.embed import (
    CompositeInput,
    Grid,
    axis_tiles,
    embed_dunia,
    embed_lianet,
    main,
    plan_tiles,
    write_embedding_raster,
)
from terratorch_eoplugins.datasets.gedi_chips import COMPOSITE_BANDS
from terratorch_eoplugins.dates import TIME_EPOCH, days_since_epoch
from terratorch_eoplugins.errors import EODataError
from terratorch_eoplugins.models.dunia import DUNIAPretrainModel, load_dunia_checkpoint
from terratorch_eoplugins.models.lianet import LIANetGenerator, save_generator

#: the tiny DUNIA of tests/models/test_dunia.py (NA head dim 8 = out_dim / na_heads)
MICRO = dict(embed_dim=32, ffn_dim=64, num_heads=2, out_dim=8, na_kernel=5, na_heads=1)
WAVE = dict(codebook_size=16, num_quantizers=2)
#: the small LIANet generator of tests/models/test_lianet.py
SMALL = dict(levels=6, features_per_level=4, log2_table_size=12, base_resolution=8, growth=2.0, preproj_channels=16,
             trunk_hidden=16, trunk_blocks=1, trunk_out=16)
CRS_UTM = "EPSG:32631"
ORIGIN = Affine(10.0, 0.0, 600000.0, 0.0, -10.0, 5000000.0)
ACQ = [1000.4375, 1030.4375, 1060.4375]  # days since 2015-01-01 (10:30 UTC)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------------ fixtures
def _dunia_ckpt(path: Path) -> Path:
    model = DUNIAPretrainModel("tiny", MICRO, lstm_layers=1, waveform_length=64, waveform_kwargs=WAVE)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"variant": "tiny", "image_kwargs": MICRO, "lstm_layers": 1,
                                     "waveform_length": 64, "waveform_kwargs": WAVE}}, path)
    return path


def _composite(path: Path, h: int, w: int, seed: int = 0, order: list[int] | None = None,
               bands: list[int] | None = None) -> np.ndarray:
    """A 14-band composite in DN (S2) and dB (S1), bands written in ``order`` (with descriptions); returns the
    values in composite order."""
    rng = np.random.default_rng(seed)
    s2 = 1000 + rng.uniform(200, 4000, (12, h, w))
    s1 = rng.uniform(-25, -5, (2, h, w))
    data = np.concatenate([s2, s1]).astype(np.float32)
    order = order or list(range(14))
    bands = bands if bands is not None else order
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=len(bands), dtype="float32", crs=CRS_UTM,
                       transform=ORIGIN) as dst:
        dst.write(data[bands])
        dst.descriptions = tuple(COMPOSITE_BANDS[i] for i in bands)
    return data


def _standardise(data: np.ndarray) -> np.ndarray:
    """The pretraining chips' scaling, written out independently: S2 DN -> reflectance, per-band z-score."""
    x = data.astype(np.float32).copy()
    x[:12] = (x[:12] - 1000.0) / 10000.0
    m, s = np.nanmean(x, axis=(1, 2)), np.nanstd(x, axis=(1, 2))
    return ((x - m[:, None, None]) / s[:, None, None]).astype(np.float32)


def _lianet_ckpt(path: Path, shape: tuple[int, int] = (96, 80), **kw: object) -> LIANetGenerator:
    g = LIANetGenerator("modified", **{**SMALL, **kw}, region_size=float(max(shape)), region_shape=list(shape),
                        acquisitions=ACQ, region_crs=CRS_UTM, region_transform=list(ORIGIN)[:6]).eval()
    save_generator(g, path)
    return g


def _read(path: Path) -> tuple[np.ndarray, rasterio.io.DatasetReader]:
    src = rasterio.open(path)
    return src.read(), src


def _half_floats(src: rasterio.io.DatasetReader) -> bool:
    """IEEE half floats on disk: NBITS=16 on a Float32 band (GDAL < 3.11) or a native Float16 band (GDAL >= 3.11)."""
    return src.tags(1, ns="IMAGE_STRUCTURE").get("NBITS") == "16" or src.dtypes[0] == "float16"


# ------------------------------------------------------------------------------------------------ tiling
@pytest.mark.parametrize("lo,hi,n,size,overlap", [(0, 384, 384, 64, 16), (10, 50, 384, 64, 16), (0, 44, 44, 64, 16),
                                                  (0, 100, 100, 96, 32), (3, 97, 100, 32, 0), (5, 61, 70, 24, 7)])
def test_tiles_cover_each_pixel_once_and_deep_inside(lo: int, hi: int, n: int, size: int, overlap: int) -> None:
    tiles = axis_tiles(lo, hi, n, size, overlap)
    size = min(size, n)
    owned = [p for _, a, b in tiles for p in range(a, b)]
    assert owned == list(range(lo, hi))  # each output pixel exactly once, in order
    for start, a, b in tiles:
        assert 0 <= start and start + size <= n and start <= a < b <= start + size
        for p in (a, b - 1):  # depth to every tile edge that is not an end of the axis
            if start > 0:
                assert p - start >= overlap // 2
            if start + size < n:
                assert start + size - 1 - p >= overlap // 2


def test_stitching_matches_a_one_shot_local_operator(tmp_path: Path) -> None:
    """With a local operator (3x3 mean, radius 1) any overlap >= 2 makes the tiled result equal to one pass over
    the whole grid, in the written file's every pixel: the stitching and window arithmetic are exact."""
    rng = np.random.default_rng(1)
    field = rng.normal(size=(3, 53, 47)).astype(np.float32)
    grid = Grid(CRS.from_string(CRS_UTM), ORIGIN, 53, 47)

    def box3(x: np.ndarray) -> np.ndarray:
        p = np.pad(x, ((0, 0), (1, 1), (1, 1)))
        return sum(p[:, i:i + x.shape[1], j:j + x.shape[2]] for i in range(3) for j in range(3)) / 9.0

    def compute(batch: list) -> np.ndarray:
        return np.stack([box3(field[:, t.row:t.row + t.height, t.col:t.col + t.width]) for t in batch])

    window = Window(5, 4, 38, 45)  # col, row, width, height
    tiles = plan_tiles(window, (53, 47), (16, 16), 4)
    assert len(tiles) > 4
    rep = write_embedding_raster(tmp_path / "box.tif", grid, window, tiles, compute, ["a", "b", "c"], batch_size=3)
    got, src = _read(rep.path)
    np.testing.assert_allclose(got, box3(field)[:, 4:49, 5:43], atol=1e-6)
    assert src.transform == ORIGIN @ Affine.translation(5, 4) and src.descriptions == ("a", "b", "c")
    src.close()


# ------------------------------------------------------------------------------------------------ DUNIA
def test_dunia_embeddings_equal_the_model_and_are_georeferenced(tmp_path: Path) -> None:
    # the tiled stack is compared with one forward pass of another shape: under "medium" (set for every test)
    # CPUs with AMX-BF16 and GPUs round both to bf16 differently; the tiling, not the matmul precision, is tested
    torch.set_float32_matmul_precision("highest")
    ckpt = _dunia_ckpt(tmp_path / "dunia.ckpt")
    model = load_dunia_checkpoint(ckpt, variant="tiny").eval()
    order = [13, 0, 5, 2, 1, 3, 4, 6, 7, 8, 9, 10, 11, 12]  # shuffled bands: read by their descriptions
    data = _composite(tmp_path / "comp.tif", 44, 36, order=order)
    x = _standardise(data)

    # one tile covers the raster: zero-padded to the patch grid (48 x 40), cropped back
    rep = embed_dunia(ckpt, tmp_path / "comp.tif", tmp_path / "both.tif", device="cpu")
    pad = np.zeros((1, 14, 48, 40), np.float32)
    pad[0, :, :44, :36] = x
    with torch.no_grad():
        ref = model.forward_embeddings(torch.from_numpy(pad))
    want = torch.cat([ref["vertical"], ref["horizontal"]], 1)[0, :, :44, :36].numpy()
    got, src = _read(rep.path)
    with src:
        assert src.count == 16 and src.dtypes == ("float32",) * 16 and src.shape == (44, 36)
        assert src.descriptions[:2] == ("OV_00", "OV_01") and src.descriptions[8:10] == ("OH_00", "OH_01")
        assert src.crs == CRS.from_string(CRS_UTM) and src.transform == ORIGIN
        assert src.bounds == pytest.approx((600000.0, 5000000.0 - 440, 600000.0 + 360, 5000000.0))
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and src.profile["compress"] == "deflate"
        assert src.tags()["EMBEDDING_MODEL"] == "DUNIA" and src.tags(9)["EMBEDDING"] == "OH"
    np.testing.assert_allclose(got, want, atol=1e-5)

    # tiles of 16 px with 8 px overlap inside a bbox: every pixel is the forward of the tile that owns it
    bbox = (600000.0 + 30, 5000000.0 - 400, 600000.0 + 330, 5000000.0 - 40)  # cols 3..33, rows 4..40
    rep = embed_dunia(ckpt, tmp_path / "comp.tif", tmp_path / "oh.tif", kind="OH", bbox=bbox, tile_size=16,
                      overlap=8, batch_size=3, device="cpu")
    got, src = _read(rep.path)
    with src:
        assert src.count == 8 and src.bounds == pytest.approx(bbox)
        assert src.transform == ORIGIN @ Affine.translation(3, 4)
    tiles = plan_tiles(Window(3, 4, 30, 36), (44, 36), (16, 16), 8)
    assert len(tiles) > 4
    for t in tiles:
        with torch.no_grad():
            emb = model.forward_embeddings(torch.from_numpy(x[None, :, t.row:t.row + 16, t.col:t.col + 16]))
        o = t.own
        part = emb["horizontal"][0, :, o.row_off - t.row:o.row_off - t.row + o.height,
                                 o.col_off - t.col:o.col_off - t.col + o.width].numpy()
        np.testing.assert_allclose(
            got[:, o.row_off - 4:o.row_off - 4 + o.height, o.col_off - 3:o.col_off - 3 + o.width], part, atol=1e-5)

    # float16: the float32 values rounded to half precision, stored as 16-bit floats
    rep16 = embed_dunia(ckpt, tmp_path / "comp.tif", tmp_path / "oh16.tif", kind="OH", bbox=bbox, tile_size=16,
                        overlap=8, dtype="float16", device="cpu")
    got16, src = _read(rep16.path)
    with src:
        assert _half_floats(src) and src.tags()["EMBEDDING_DTYPE"] == "float16"
    np.testing.assert_array_equal(got16, got.astype(np.float16).astype(np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["both.tif", "comp.tif", "dunia.ckpt", "oh.tif", "oh16.tif"]


def test_dunia_input_from_s2_and_s1_files_and_statistics_from_another_raster(tmp_path: Path) -> None:
    data = _composite(tmp_path / "s2.tif", 24, 32, bands=list(range(12)))
    _composite(tmp_path / "s1.tif", 24, 32, bands=[12, 13])
    _composite(tmp_path / "full.tif", 24, 32)
    split, full = CompositeInput([tmp_path / "s2.tif", tmp_path / "s1.tif"]), CompositeInput(tmp_path / "full.tif")
    np.testing.assert_allclose(split.read(2, 3, 16, 16), _standardise(data)[:, 2:18, 3:19], atol=1e-5)
    np.testing.assert_array_equal(split.read(0, 0, 24, 32), full.read(0, 0, 24, 32))
    other = tmp_path / "other.tif"
    _composite(other, 40, 40, seed=5)
    split.use_statistics(CompositeInput(other))
    assert not np.allclose(split.read(0, 0, 24, 32), full.read(0, 0, 24, 32))


def test_dunia_input_reads_like_the_pretraining_chips(tiny_world_dir: Path) -> None:
    """The synthetic world's composite, read by the exporter and by GEDIChips (DUNIA's pretraining data)."""
    from terratorch_eoplugins.datasets.gedi_chips import GEDIChips

    ds = GEDIChips(tiny_world_dir / "GEDI", split="all", chip_size=64, require_footprints=False)
    src = CompositeInput(tiny_world_dir / "GEDI")  # the folder: its S2L2A_S1GRD_composite.tif
    np.testing.assert_array_equal(src.means, ds.means)
    np.testing.assert_array_equal(src.stds, ds.stds)
    assert src.s2_units == ds.s2_units
    for i in (0, len(ds) - 1):
        row, col = ds.chips[i]
        np.testing.assert_array_equal(src.read(row, col, 64, 64), ds[i]["image"].numpy())


# ------------------------------------------------------------------------------------------------ LIANet
def test_lianet_trunk_features_for_a_date_and_bbox(tmp_path: Path) -> None:
    # the tiled stack is compared with one forward pass of another shape: under "medium" (set for every test)
    # CPUs with AMX-BF16 and GPUs round both to bf16 differently; the tiling, not the matmul precision, is tested
    torch.set_float32_matmul_precision("highest")
    g = _lianet_ckpt(tmp_path / "gen.pt")
    day = (TIME_EPOCH + dt.timedelta(days=ACQ[1])).date().isoformat()
    bbox = (600000.0 + 100, 5000000.0 - 700, 600000.0 + 500, 5000000.0 - 200)  # cols 10..50, rows 20..70
    # a tile larger than the region: one forward over the whole region, cropped to the bbox
    rep = embed_lianet(tmp_path / "gen.pt", tmp_path / "one.tif", day, bbox=bbox, device="cpu")
    with torch.no_grad():
        full = g.features(torch.zeros(1, 2), torch.tensor([ACQ[1]], dtype=torch.float64), (96, 80))[0].numpy()
    got, src = _read(rep.path)
    with src:
        assert src.count == 16 and src.descriptions[0] == "trunk_00" and src.crs == CRS.from_string(CRS_UTM)
        assert src.bounds == pytest.approx(bbox) and src.transform == ORIGIN @ Affine.translation(10, 20)
        tags = src.tags()
        assert tags["TIME_DAYS"] == f"{ACQ[1]:.6f}" and tags["TIME"].endswith("T10:30:00")
    np.testing.assert_allclose(got, full[:, 20:70, 10:50], atol=1e-5)

    # 32 px tiles with 8 px overlap over the whole region
    rep = embed_lianet(tmp_path / "gen.pt", tmp_path / "tiled.tif", day, tile_size=32, overlap=8, device="cpu")
    got, src = _read(rep.path)
    src.close()
    tiles = plan_tiles(Window(0, 0, 80, 96), (96, 80), (32, 32), 8)
    origin = torch.tensor([[t.col, t.row] for t in tiles], dtype=torch.float32)
    with torch.no_grad():
        feats = g.features(origin, torch.full((len(tiles),), ACQ[1], dtype=torch.float64), (32, 32)).numpy()
    for t, f in zip(tiles, feats):
        o = t.own
        np.testing.assert_allclose(got[:, o.row_off:o.row_off + o.height, o.col_off:o.col_off + o.width],
                                   f[:, o.row_off - t.row:o.row_off - t.row + o.height,
                                     o.col_off - t.col:o.col_off - t.col + o.width], atol=1e-5)

    # a Lightning checkpoint of the pretraining task gives the same file; a day between acquisitions is its 00:00
    lightning = tmp_path / "pretrain.ckpt"
    torch.save({"lianet": {"config": dict(g.config)},
                "state_dict": {f"generator.{k}": v for k, v in g.state_dict().items()}}, lightning)
    rep2 = embed_lianet(lightning, tmp_path / "lightning.tif", day, tile_size=32, overlap=8, device="cpu")
    np.testing.assert_array_equal(_read(rep2.path)[0], got)
    between = (TIME_EPOCH + dt.timedelta(days=1015)).date()
    rep3 = embed_lianet(tmp_path / "gen.pt", tmp_path / "between.tif", between.isoformat(), bbox=bbox, device="cpu")
    assert rep3.tags["TIME_DAYS"] == f"{days_since_epoch(between):.6f}" == "1015.000000"


# ------------------------------------------------------------------------------------------------ errors
def test_bad_arguments_name_the_argument_and_write_nothing(tmp_path: Path) -> None:
    ckpt = _dunia_ckpt(tmp_path / "dunia.ckpt")
    _composite(tmp_path / "comp.tif", 24, 24)
    _composite(tmp_path / "b13.tif", 24, 24, bands=list(range(13)))
    comp = tmp_path / "comp.tif"
    with pytest.raises(EODataError, match=r"--image: 13 bands in total \(b13.tif: 13\); DUNIA expects 14"):
        embed_dunia(ckpt, tmp_path / "b13.tif", tmp_path / "x.tif", device="cpu")
    with pytest.raises(ValueError, match=r"--bbox .* is not inside the input raster"):
        embed_dunia(ckpt, comp, tmp_path / "x.tif", bbox=(599000, 4999000, 600100, 5000000), device="cpu")
    with pytest.raises(ValueError, match="--tile-size 20: DUNIA .* multiple of 8"):
        embed_dunia(ckpt, comp, tmp_path / "x.tif", tile_size=20, device="cpu")
    with pytest.raises(ValueError, match=r"--overlap 16: expected 0 <= overlap < --tile-size \(16\)"):
        embed_dunia(ckpt, comp, tmp_path / "x.tif", tile_size=16, overlap=16, device="cpu")
    with pytest.raises(FileNotFoundError, match="--image .*missing.tif: no such file"):
        embed_dunia(ckpt, tmp_path / "missing.tif", tmp_path / "x.tif", device="cpu")
    with pytest.raises(ValueError, match="--kind must be one of"):
        embed_dunia(ckpt, comp, tmp_path / "x.tif", kind="OT", device="cpu")
    with rasterio.open(tmp_path / "moved.tif", "w", driver="GTiff", width=24, height=24, count=2, dtype="float32",
                       crs=CRS_UTM, transform=ORIGIN @ Affine.translation(1, 0)) as dst:
        dst.write(np.zeros((2, 24, 24), np.float32))
    _composite(tmp_path / "s2.tif", 24, 24, bands=list(range(12)))
    with pytest.raises(EODataError, match="must share one grid"):
        CompositeInput([tmp_path / "s2.tif", tmp_path / "moved.tif"])
    existing = tmp_path / "exists.tif"
    existing.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="--out .*exists.tif: the file exists; pass --overwrite"):
        embed_dunia(ckpt, comp, existing, device="cpu")
    assert existing.read_bytes() == b"user data"

    _lianet_ckpt(tmp_path / "gen.pt")
    gen = tmp_path / "gen.pt"
    with pytest.raises(ValueError, match=r"--date 2030-01-01 is outside the pretraining time range 2017-09-27 \.\. "
                                         r"2017-11-26"):
        embed_lianet(gen, tmp_path / "x.tif", "2030-01-01", device="cpu")
    with pytest.raises(ValueError, match="--date '2017/10/01': expected YYYY-MM-DD"):
        embed_lianet(gen, tmp_path / "x.tif", "2017/10/01", device="cpu")
    with pytest.raises(ValueError, match=r"--bbox .* is not inside the pretraining region"):
        embed_lianet(gen, tmp_path / "x.tif", "2017-10-27", bbox=(600000, 4999000, 601000, 5000000), device="cpu")
    _lianet_ckpt(tmp_path / "index.pt", time_mode="index")
    with pytest.raises(ValueError, match=r"only knows its 3 pretraining acquisitions \(2017-09-27, 2017-10-27, "
                                         r"2017-11-26\); choose one"):
        embed_lianet(tmp_path / "index.pt", tmp_path / "x.tif", "2017-10-05", device="cpu")
    embed_lianet(tmp_path / "index.pt", tmp_path / "index.tif", "2017-10-27", tile_size=48, device="cpu")
    save_generator(LIANetGenerator("modified", **SMALL, region_size=64.0), tmp_path / "nogeo.pt")
    with pytest.raises(ValueError, match="records no region georeferencing"):
        embed_lianet(tmp_path / "nogeo.pt", tmp_path / "x.tif", "2017-10-27", device="cpu")
    with pytest.raises(ValueError, match="not a LIANet checkpoint"):
        embed_lianet(ckpt, tmp_path / "x.tif", "2017-10-27", device="cpu")
    assert not (tmp_path / "x.tif").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_command_line_errors_exit_2_with_the_argument(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _dunia_ckpt(tmp_path / "dunia.ckpt")
    assert main(["--model", "dunia", "--ckpt", str(ckpt), "--out", str(tmp_path / "x.tif")]) == 2
    assert "--image is required for --model dunia" in capsys.readouterr().err
    assert main(["--model", "lianet", "--ckpt", str(ckpt), "--out", str(tmp_path / "x.tif"), "--image", "a.tif",
                 "--date", "2017-10-27"]) == 2
    assert "LIANet is coordinate-only" in capsys.readouterr().err
    assert main(["--model", "lianet", "--ckpt", str(ckpt), "--out", str(tmp_path / "x.tif")]) == 2
    assert "--date is required for --model lianet" in capsys.readouterr().err
    assert main(["--model", "dunia", "--ckpt", str(tmp_path / "none.ckpt"), "--image", "a.tif", "--out",
                 str(tmp_path / "x.tif"), "--device", "cpu"]) == 2
    assert "DUNIA checkpoint not found" in capsys.readouterr().err


@pytest.mark.slow
def test_eoplugins_embed_command_writes_georeferenced_stacks(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """The installed command, run from another working directory, for both models (bbox in lon/lat for LIANet)."""
    ckpt = _dunia_ckpt(tmp_path / "dunia.ckpt")
    _composite(tmp_path / "comp.tif", 40, 32)
    _lianet_ckpt(tmp_path / "gen.pt")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    exe = Path(sys.executable).parent / "eoplugins"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "terratorch_eoplugins.cli"]
    env = {**cli_env, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([*cmd, "embed", "--model", "dunia", "--ckpt", str(ckpt), "--image",
                           str(tmp_path / "comp.tif"), "--out", "emb/dunia.tif", "--kind", "OV", "--tile-size", "16",
                           "--overlap", "8", "--dtype", "float16"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "8 bands (OV_00..OV_07), 40 x 32 px, EPSG:32631, float16" in proc.stdout
    with rasterio.open(cwd / "emb/dunia.tif") as src:
        assert src.count == 8 and src.crs == CRS.from_string(CRS_UTM) and src.transform == ORIGIN
        assert _half_floats(src) and np.isfinite(src.read()).all()
    lonlat = transform_bounds(CRS_UTM, "EPSG:4326", 600100, 4999500, 600600, 4999800)
    proc = subprocess.run([*cmd, "embed", "--model", "lianet", "--ckpt", str(tmp_path / "gen.pt"), "--date",
                           "2017-10-27", "--bbox", *map(str, lonlat), "--bbox-crs", "EPSG:4326", "--out", "lianet.tif",
                           "--tile-size", "32", "--overlap", "8"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with rasterio.open(cwd / "lianet.tif") as src:
        l, b, r, t = src.bounds
        assert src.count == 16 and src.crs == CRS.from_string(CRS_UTM) and src.tags()["DATE"] == "2017-10-27"
        want = transform_bounds("EPSG:4326", CRS_UTM, *lonlat)
        assert l <= want[0] < l + 10 and b <= want[1] < b + 10 and r - 10 < want[2] <= r and t - 10 < want[3] <= t
    proc = subprocess.run([*cmd, "embed", "--model", "lianet", "--ckpt", str(tmp_path / "gen.pt"), "--date",
                           "2030-01-01", "--out", "late.tif"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "--date 2030-01-01 is outside the pretraining time range" in proc.stderr
    assert not (cwd / "late.tif").exists()
