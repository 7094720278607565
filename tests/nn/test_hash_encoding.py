"""Multiresolution hash encoding: formula, gradients, memory-lean path vs. naive path, collision rates."""

from __future__ import annotations

import math

import pytest
import torch

from terratorch_eoplugins.nn.hash_encoding import (
    HashGridEncoding2D,
    collision_statistics,
    level_seeds,
    naive_hash_grid,
)

C1, C2 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F
M64 = (1 << 64) - 1


def _hash(ix: int, iy: int, level: int, t: int, per_level: bool = True) -> int:
    """Direct formula with Python integers: ((ix*C1) ^ (iy*C2) ^ seed_l) mod 2**64 mod T."""
    seed = 0xD6E8FEB86659FD93 ^ (((level if per_level else 0) * 0x9E3779B97F4A7C15) & M64)
    return ((((ix * C1) & M64) ^ ((iy * C2) & M64) ^ seed) & M64) % t


def _formula(enc: HashGridEncoding2D, x: float, y: float) -> torch.Tensor:
    table = enc.table.detach().double()
    out = []
    for level in range(enc.levels):
        n_l = round(enc.base_resolution * enc.growth**level)
        px, py = x * n_l / enc.region_size, y * n_l / enc.region_size
        ix, iy = math.floor(px), math.floor(py)
        fx, fy = px - ix, py - iy
        corners = [(0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)]
        tab = table if enc.shared_table else table[level]
        acc = torch.zeros(enc.features_per_level, dtype=torch.float64)
        for dx, dy, w in corners:
            row = _hash(ix + dx, iy + dy, level, enc.table_size, enc.per_level_seeds)
            acc += (w if enc.bilinear else 0.25) * tab[row]
        out.append(acc)
    return torch.cat(out)


@pytest.mark.parametrize("shared,bilinear,per_level", [(True, True, True), (False, True, True), (True, False, False)])
def test_values_equal_the_direct_formula(shared: bool, bilinear: bool, per_level: bool) -> None:
    torch.manual_seed(0)
    enc = HashGridEncoding2D(levels=6, features_per_level=3, log2_table_size=9, base_resolution=4, growth=1.7,
                             region_size=500.0, shared_table=shared, bilinear=bilinear, per_level_seeds=per_level,
                             init_range=1.0)
    # pixel-aligned and fractional coordinates, incl. the region's corners
    pts = torch.cat([torch.tensor([[0.0, 0.0], [499.0, 499.0], [17.0, 400.0]]), torch.rand(20, 2) * 500], dim=0)
    out = enc(pts.double()).double()
    assert out.shape == (23, 18)
    expected = torch.stack([_formula(enc, float(p[0]), float(p[1])) for p in pts.double()])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=2e-5)  # float32 positions and weights


def test_seeds_follow_the_reference_constants() -> None:
    seeds = level_seeds(3)
    assert seeds[0] == 0xD6E8FEB86659FD93 - (1 << 64)  # signed int64 reinterpretation
    assert (seeds[2] & M64) == 0xD6E8FEB86659FD93 ^ ((2 * 0x9E3779B97F4A7C15) & M64)
    assert level_seeds(3, per_level=False) == [seeds[0]] * 3


@pytest.mark.parametrize("shared", [True, False])
def test_gradients_reach_only_the_touched_table_rows(shared: bool) -> None:
    torch.manual_seed(1)
    enc = HashGridEncoding2D(levels=4, features_per_level=2, log2_table_size=12, base_resolution=8, growth=2.0,
                             region_size=300.0, shared_table=shared)
    pts = torch.rand(7, 2) * 300
    (enc(pts) * torch.randn(7, 8)).sum().backward()
    grad = enc.table.grad
    touched = torch.zeros_like(grad[..., 0], dtype=torch.bool)
    for level in range(enc.levels):
        n_l = 8 * 2**level
        for x, y in pts.tolist():
            ix, iy = math.floor(x * n_l / 300.0), math.floor(y * n_l / 300.0)
            for dx in (0, 1):
                for dy in (0, 1):
                    row = _hash(ix + dx, iy + dy, level, enc.table_size)
                    if shared:
                        touched[row] = True
                    else:
                        touched[level, row] = True
    nonzero = grad.abs().sum(-1) > 0
    assert torch.equal(nonzero, touched)
    assert int(touched.sum()) <= 4 * 4 * 7


def test_lean_path_matches_naive_values_and_gradients() -> None:
    torch.manual_seed(2)
    enc = HashGridEncoding2D(levels=5, features_per_level=4, log2_table_size=10, base_resolution=4, growth=2.0,
                             region_size=1000.0)
    pts = torch.rand(257, 2) * 1000
    g = torch.randn(257, 20)
    out = enc(pts)
    ref = naive_hash_grid(pts, enc.table, enc.resolutions, enc.region_size, enc.seeds)
    torch.testing.assert_close(out, ref)
    (ga,) = torch.autograd.grad((out * g).sum(), enc.table)
    (gb,) = torch.autograd.grad((ref * g).sum(), enc.table)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [torch.rand(5, 3), torch.rand(10), torch.rand(2, 5, 2)])
def test_wrong_coordinate_shape_is_rejected(bad: torch.Tensor) -> None:
    enc = HashGridEncoding2D(levels=2, features_per_level=2, log2_table_size=8, region_size=64)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        enc(bad)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="log2_table_size"):
        HashGridEncoding2D(log2_table_size=40)
    with pytest.raises(ValueError, match="region_size"):
        HashGridEncoding2D(region_size=0)
    with pytest.raises(RuntimeError, match="tinycudann"):
        HashGridEncoding2D(levels=2, features_per_level=2, log2_table_size=8, backend="tcnn")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_path_matches_cpu() -> None:
    enc = HashGridEncoding2D(levels=4, features_per_level=4, log2_table_size=12, region_size=500.0)
    pts = torch.rand(1000, 2) * 500
    cpu = enc(pts)
    gpu = enc.cuda()(pts.cuda()).cpu()
    torch.testing.assert_close(cpu, gpu, rtol=1e-5, atol=1e-6)


def test_collision_rates_as_in_the_supplement() -> None:
    """Section 8: per-level collisions grow with resolution, full (all-level) collisions stay negligible.

    Per-level XOR seeds do not change which nodes collide within a level (XOR with a constant is a bijection
    of the table rows); with one shared table they remove the structural aliasing between levels, where
    node (ix, iy) of every level would otherwise use the same row.
    """
    kw = dict(levels=8, log2_table_size=14, base_resolution=16, growth=2.0, region_size=2000.0, n_pixels=1 << 15)
    seeded = collision_statistics(per_level_seeds=True, **kw)
    unseeded = collision_statistics(per_level_seeds=False, **kw)
    rates = seeded["level_rate"]
    assert rates[0] == 0.0  # 17 x 17 nodes in a 16384-row table: no collision with this hash
    assert rates[-1] > 0.99 and rates[-1] >= rates[2]  # 2049^2 nodes >> 16384 rows
    assert seeded["full_rate"] < 1e-3
    assert seeded["level_rate"] == unseeded["level_rate"]
    assert max(seeded["cross_level_rate"]) < 0.01
    assert min(unseeded["cross_level_rate"]) == 1.0


@pytest.mark.parametrize("shared", [True, False])
def test_sparse_gradient_equals_the_dense_one_on_the_touched_rows(shared: bool) -> None:
    torch.manual_seed(3)
    kw = dict(levels=5, features_per_level=3, log2_table_size=9, base_resolution=4, growth=2.0, region_size=400.0,
              shared_table=shared)
    dense, sparse = HashGridEncoding2D(**kw), HashGridEncoding2D(**kw, sparse_grad=True)
    sparse.table.data.copy_(dense.table.data)
    pts, g = torch.rand(61, 2) * 400, torch.randn(61, 15)
    torch.testing.assert_close(sparse(pts), dense(pts))
    (gd,) = torch.autograd.grad((dense(pts) * g).sum(), dense.table)
    (gs,) = torch.autograd.grad((sparse(pts) * g).sum(), sparse.table)
    assert gs.is_sparse and gs.is_coalesced() and gs.shape == dense.table.shape
    torch.testing.assert_close(gs.to_dense(), gd, rtol=1e-5, atol=1e-6)
    # one stored row per distinct touched row, independent of the formula: the rows the dense gradient reaches
    # (plus rows whose contributions cancel exactly, which do not occur with random weights)
    rows = gs._indices()
    flat = rows[0] if shared else rows[0] * dense.table_size + rows[1]
    touched = (gd.abs().sum(-1) > 0).reshape(-1).nonzero().flatten()
    assert torch.equal(flat, touched)
    assert gs._values().shape == (touched.numel(), 3)


def test_sparse_gradient_trains_with_sparse_adam_on_touched_rows_only() -> None:
    torch.manual_seed(4)
    enc = HashGridEncoding2D(levels=3, features_per_level=2, log2_table_size=10, base_resolution=4, region_size=100.0,
                             sparse_grad=True)
    before = enc.table.detach().clone()
    opt = torch.optim.SparseAdam([enc.table], lr=0.1)
    pts = torch.rand(9, 2) * 100
    target = torch.randn(9, 6)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = ((enc(pts) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    changed = (enc.table.detach() != before).any(-1)
    touched = torch.zeros_like(changed)
    touched[enc.table.grad.coalesce()._indices()[0]] = True
    assert torch.equal(changed, touched) and 0 < int(changed.sum()) <= 3 * 4 * 9


def test_sparse_gradient_needs_the_torch_backend() -> None:
    with pytest.raises(ValueError, match="sparse_grad"):
        HashGridEncoding2D(levels=2, features_per_level=2, log2_table_size=8, backend="tcnn", sparse_grad=True)
