"""LIANet compression analysis: P3 rate-distortion fit, JPEG2000 reference line, per-region table, eq. 1 hash
collisions (against a brute-force count and the encoder's own lookups) and the two commands on the tiny world."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from terratorch_eoplugins.analysis.compression import (
    evaluate_rate_distortion,
    fit_rate_distortion,
    jpeg2000_available,
    jpeg2000_curve,
    jpeg2000_psnr_at,
    legend_labels,
    parse_region,
    rate_distortion_figure,
    region_table,
)
from terratorch_eoplugins.analysis.hash_collisions import hash_collision_report
from terratorch_eoplugins.models.lianet import LIANetGenerator, save_generator
from terratorch_eoplugins.nn.hash_encoding import (
    HASH_PRIMES,
    _level_lookup,
    collision_statistics,
    level_resolutions,
    level_seeds,
)

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(levels=6, features_per_level=4, log2_table_size=12, base_resolution=8, growth=2.0, preproj_channels=16,
             trunk_hidden=16, trunk_blocks=1, trunk_out=16)
needs_j2k = pytest.mark.skipif(not jpeg2000_available(), reason="Pillow without OpenJPEG (jpg_2000)")


def test_p3_fit_recovers_coefficients_and_passes_through_zero(caplog: pytest.LogCaptureFixture) -> None:
    true = np.array([30.0, -8.0, 1.5])
    bpp = np.geomspace(0.01, 20.0, 9)
    coef = fit_rate_distortion(bpp, evaluate_rate_distortion(true, bpp))
    np.testing.assert_allclose(coef, true, rtol=1e-8)
    assert evaluate_rate_distortion(coef, 0.0) == 0.0
    noisy = evaluate_rate_distortion(true, bpp) + np.random.default_rng(0).normal(0, 1e-3, bpp.size)
    np.testing.assert_allclose(fit_rate_distortion(bpp, noisy), true, atol=0.05)
    # fewer distinct points than the degree: lower degree, logged; repeated bpp values count once; NaN ignored
    with caplog.at_level("WARNING"):
        two = fit_rate_distortion([0.5, 0.5, 2.0, 1.0], [20.0, 22.0, 35.0, math.nan])
    assert two.size == 2 and "fitting degree 2" in caplog.text
    one = fit_rate_distortion([1.0], [30.0])
    assert one.size == 1 and one[0] == pytest.approx(30.0 / math.log(2.0))
    with pytest.raises(ValueError, match="at least one finite"):
        fit_rate_distortion([math.nan], [1.0])


def _smooth_patch(bands: int = 12, size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    walk = np.cumsum(np.cumsum(rng.normal(size=(bands, size, size)), axis=1), axis=2)
    walk = (walk - walk.min()) / (walk.max() - walk.min())
    return (0.05 + 0.4 * walk + rng.normal(0, 0.005, walk.shape)).clip(0, 1)


@needs_j2k
def test_jpeg2000_line_rate_and_distortion_decrease_with_compression() -> None:
    patch = _smooth_patch()
    curve = jpeg2000_curve([patch], ratios=[4, 16, 64])
    bpp, mean = curve["bpp"], [s["mean"] for s in curve["psnr_all"]]
    assert bpp[0] > bpp[1] > bpp[2] > 0
    assert mean[0] > mean[1] > mean[2]
    assert [s["mean"] for s in curve["psnr_rgb"]][0] > [s["mean"] for s in curve["psnr_rgb"]][2]
    assert curve["lossless_bpp"] > bpp[0]
    # interpolation in log(bpp) between the points, NaN outside the line
    mid = math.sqrt(bpp[0] * bpp[1])
    assert min(mean[:2]) <= jpeg2000_psnr_at(curve, mid) <= max(mean[:2])
    assert jpeg2000_psnr_at(curve, bpp[1]) == pytest.approx(mean[1])
    assert math.isnan(jpeg2000_psnr_at(curve, bpp[0] * 10))
    # the table pairs a model with its region's line at the model's bpp
    rep = {"name": "m", "region": "A", "bpp": bpp[1], "psnr_all": curve["psnr_all"][0],
           "psnr_rgb": curve["psnr_rgb"][0]}
    row = region_table([rep], {"A": curve})[0]
    assert row["jpeg2000_psnr_all"] == pytest.approx(mean[1]) and row["model"] == "m"
    fig = rate_distortion_figure([rep, {**rep, "bpp": bpp[0]}, {**rep, "bpp": bpp[2]}], {"A": curve})
    labels = legend_labels(fig)
    assert {"P3 fit all bands (median)", "P3 fit RGB (median)", "JPEG2000 all bands (mean)",
            "JPEG2000 lossless"} <= set(labels)


def test_parse_region() -> None:
    assert parse_region("A0=run.ckpt:data/S2:T1,T2") == ("A0", "run.ckpt", "data/S2", ["T1", "T2"])
    assert parse_region("A0=run.ckpt:data/S2") == ("A0", "run.ckpt", "data/S2", None)
    for bad in ("run.ckpt:data", "A=run.ckpt", "A=:data", "A=a:b:c:d"):
        with pytest.raises(ValueError, match="--region"):
            parse_region(bad)


def _brute_force(levels: int, log2_t: int, base: int, growth: float, size: float, shape: tuple[int, int],
                 centers: bool) -> list[tuple[set, int]]:
    """Per level: the nodes the region's pixels touch (Python loop) and their colliding-node count (eq. 1)."""
    t_size, mask = 1 << log2_t, (1 << 64) - 1
    out = []
    for n_l, seed in zip(level_resolutions(levels, base, growth), level_seeds(levels)):
        scale = np.float32(n_l / size)
        nodes = set()
        for y in range(shape[0]):
            for x in range(shape[1]):
                fx = int(math.floor(np.float32(x + 0.5 * centers) * scale))
                fy = int(math.floor(np.float32(y + 0.5 * centers) * scale))
                nodes.update({(fx, fy), (fx + 1, fy), (fx, fy + 1), (fx + 1, fy + 1)})
        rows: dict[int, set] = {}
        for ix, iy in nodes:
            h = (((ix * HASH_PRIMES[0]) & mask) ^ ((iy * HASH_PRIMES[1]) & mask) ^ (seed & mask)) % t_size
            rows.setdefault(h, set()).add((ix, iy))
        out.append((nodes, sum(len(s) for s in rows.values() if len(s) > 1), rows))
    return out


@pytest.mark.parametrize("centers", [False, True])
def test_hash_collisions_match_brute_force_and_encoder(centers: bool) -> None:
    grid = dict(levels=5, log2_table_size=6, base_resolution=2, growth=2.0, region_size=20.0)
    shape = (20, 14)  # the finest levels (N_l = 32 > 20 px) skip nodes: only touched nodes count
    rep = hash_collision_report(**grid, region_shape=shape, pixel_centers=centers)
    brute = _brute_force(5, 6, 2, 2.0, 20.0, shape, centers)
    for row, (nodes, colliding, rows) in zip(rep["levels"], brute):
        assert row["nodes"] == len(nodes) and row["colliding_nodes"] == colliding
        assert row["rows"] == len(rows) and row["rate"] == pytest.approx(colliding / len(nodes))
        assert row["pairs"] == sum(len(s) * (len(s) - 1) // 2 for s in rows.values())
    assert rep["levels"][-1]["rate"] > 0 and rep["levels"][0]["rate"] == 0  # 9 nodes of level 0: no collision
    total = sum(len(b[0]) for b in brute)
    assert rep["all_levels"]["rate"] == pytest.approx(sum(b[1] for b in brute) / total)
    # shared table: entries (level, node) whose row any other entry uses
    use: dict[int, int] = {}
    for _, _, rows in brute:
        for h, s in rows.items():
            use[h] = use.get(h, 0) + len(s)
    assert rep["all_levels"]["shared_table_rate"] == pytest.approx(sum(c for c in use.values() if c > 1) / total)
    # the rows counted are exactly the rows the encoder reads for every pixel of the region
    ys, xs = torch.meshgrid(torch.arange(shape[0], dtype=torch.float32), torch.arange(shape[1], dtype=torch.float32),
                            indexing="ij")
    coords = torch.stack([xs, ys], -1).reshape(-1, 2) + (0.5 if centers else 0.0)
    for level, (n_l, seed) in enumerate(zip(level_resolutions(5, 2, 2.0), level_seeds(5))):
        idx, _ = _level_lookup(coords, n_l / 20.0, seed, 64, True)
        assert set(idx.unique().tolist()) == set(brute[level][2])


def test_collision_statistics_per_level_equals_the_report_on_a_square_region() -> None:
    """nn.hash_encoding.collision_statistics counts the same nodes as eoplugins hash-collisions (the nodes read),
    also at levels finer than the pixels, where a node lattice of the whole axis would overcount."""
    grid = dict(levels=6, log2_table_size=8, base_resolution=4, growth=2.0, region_size=40.0)
    stats = collision_statistics(**grid, n_pixels=256)
    rep = hash_collision_report(**grid)
    assert [r["nodes"] for r in rep["levels"]] == stats["level_nodes"]
    assert [r["rate"] for r in rep["levels"]] == pytest.approx(stats["level_rate"])
    assert stats["level_nodes"][-1] < (128 + 1) ** 2  # N = 128 > 40 px: fewer nodes read than the lattice holds


def test_commands_on_the_tiny_world(tiny_world_dir: Path, tmp_path: Path) -> None:
    root = tiny_world_dir / "S2_TILES"
    tile = sorted(p.name for p in root.iterdir() if p.is_dir())[0]
    ckpts = []
    for i, log2_t in enumerate((10, 12, 13)):
        torch.manual_seed(i)
        gen = LIANetGenerator("modified", **{**SMALL, "log2_table_size": log2_t}, region_size=384,
                              region_shape=[384, 256])
        ckpts.append(save_generator(gen, tmp_path / f"gen{log2_t}.pt"))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    comp = subprocess.Popen(
        [sys.executable, "-m", "terratorch_eoplugins.cli", "compression", "--ckpt", str(ckpts[0]), str(ckpts[1]),
         "--tiles-root", str(root), "--region-name", "A0", "--region", f"A1={ckpts[2]}:{root}:{tile}",
         "--patches", "2", "--patch-size", "32", "--jpeg2000-ratios", "4", "16", "64",
         "--out", str(tmp_path / "rd.png"), "--csv", str(tmp_path / "rd.csv"), "--json", str(tmp_path / "rd.json")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hc = subprocess.Popen(
        [sys.executable, "-m", "terratorch_eoplugins.cli", "hash-collisions", "--ckpt", str(ckpts[1]),
         "--json", str(tmp_path / "hc.json"), "--csv", str(tmp_path / "hc.csv")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = comp.communicate(timeout=300)
    assert comp.returncode == 0, err[-3000:]
    hc_out, hc_err = hc.communicate(timeout=300)
    assert hc.returncode == 0, hc_err[-3000:]
    # compression: per-region table, P3 fit (3 distinct bpp), JPEG2000 line on the plot
    assert (tmp_path / "rd.png").stat().st_size > 0
    lines_drawn = next(line for line in out.splitlines() if line.startswith("rate-distortion plot:"))
    for label in ("P3 fit all bands (median)", "P3 fit RGB (median)", "JPEG2000 all bands (mean) A0",
                  "JPEG2000 all bands (mean) A1"):
        assert label in lines_drawn, out
    with open(tmp_path / "rd.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["region"], r["model"]) for r in rows] == [("A0", "gen10"), ("A0", "gen12"), ("A1", "gen13")]
    assert all(float(r["bpp"]) > 0 and math.isfinite(float(r["psnr_all_median"])) for r in rows)
    payload = json.loads((tmp_path / "rd.json").read_text())
    assert len(payload["fit"]["psnr_all"]) == 3 and set(payload["jpeg2000"]) == {"A0", "A1"}
    # hash collisions of the checkpoint's grid = the function on the same arguments
    rep = json.loads((tmp_path / "hc.json").read_text())
    expected = hash_collision_report(6, 12, 8, 2.0, 384.0, (384, 256), shared_table=True, pixel_centers=False)
    assert rep["levels"] == expected["levels"] and rep["all_levels"] == expected["all_levels"]
    assert "eq. 1" in hc_out and (tmp_path / "hc.csv").read_text().count("\n") == 6 + 2
