"""Multiresolution 2-D hash-grid encoding (LIANet / Instant-NGP style), pure PyTorch.

A pixel coordinate ``p = (x, y)`` (column, row in the region's pixel frame) is scaled at level
``l`` to ``p * N_l / S`` with ``N_l = round(base_resolution * growth**l)`` and ``S`` the region side
in pixels. The four grid nodes around it are hashed into a table of ``T = 2**log2_table_size`` rows
of ``F`` features,

    h_l(ix, iy) = ((ix * C1) XOR (iy * C2) XOR seed_l) mod T,

with the xxHash primes ``C1 = 0x9E3779B185EBCA87``, ``C2 = 0xC2B2AE3D27D4EB4F`` (64-bit wrap-around)
and ``seed_l = 0xD6E8FEB86659FD93 XOR (l * 0x9E3779B97F4A7C15)`` (mod 2**64), and the four rows are
blended bilinearly (or averaged). Levels are concatenated: the output is ``[N, L * F]`` with level
``l`` in columns ``l*F:(l+1)*F``.

Memory: the forward pass computes one level at a time with a fused weighted gather
(:func:`torch.nn.functional.embedding_bag`) straight into the output, and saves only the input
coordinates for the backward pass, which recomputes the indices and scatters the gradient into
the table level by level. No ``[L * N, F]`` per-corner intermediate is ever built.

Gradient layout (``sparse_grad``): by default the table gradient is dense (``[T, F]``, what every
``torch.optim`` optimiser and global-norm gradient clipping expect). With ``sparse_grad=True`` the
backward pass returns a *coalesced sparse COO* gradient holding only the touched rows, like
``nn.Embedding(sparse=True)``: the touched rows of all levels are found first (``torch.unique`` over
the recomputed corner indices, ``4 * L * N`` integers), then each level's weighted upstream gradient is
``index_add_``-ed straight into the compact ``[U, F]`` value tensor (``U`` = distinct touched rows), so
neither the dense ``[T, F]`` gradient nor per-corner ``[L * N, F]`` tensors exist. The table must then
be optimised by an optimiser that accepts sparse gradients (``torch.optim.SparseAdam``, lazy Adam
moments on the touched rows only, or ``torch.optim.SGD``), the other parameters by the usual one;
global-norm clipping must skip (or densify) the table gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "HashGridEncoding2D",
    "axis_nodes",
    "collision_statistics",
    "naive_hash_grid",
    "hash_2d",
    "level_resolutions",
    "level_row_counts",
    "level_seeds",
    "HASH_PRIMES",
    "SEED_BASE",
    "SEED_STEP",
]

_MASK64 = (1 << 64) - 1


def _signed64(value: int) -> int:
    """Two's-complement reinterpretation of an unsigned 64-bit integer as a signed int64."""
    value &= _MASK64
    return value - (1 << 64) if value >= (1 << 63) else value


#: xxHash64 primes used for the x and y grid coordinates (as signed int64).
HASH_PRIMES: tuple[int, int] = (_signed64(0x9E3779B185EBCA87), _signed64(0xC2B2AE3D27D4EB4F))
SEED_BASE = 0xD6E8FEB86659FD93
SEED_STEP = 0x9E3779B97F4A7C15


def level_seeds(levels: int, per_level: bool = True) -> list[int]:
    """Signed int64 seeds: ``SEED_BASE XOR (l * SEED_STEP)`` per level, or the level-0 seed for all levels."""
    return [_signed64(SEED_BASE ^ ((l if per_level else 0) * SEED_STEP)) for l in range(levels)]


def level_resolutions(levels: int, base_resolution: int, growth: float) -> list[int]:
    """Grid resolution ``N_l = round(base_resolution * growth**l)`` of each level."""
    return [int(round(base_resolution * growth**l)) for l in range(levels)]


def hash_2d(ix: Tensor, iy: Tensor, seed: int, table_size: int) -> Tensor:
    """``((ix * C1) XOR (iy * C2) XOR seed) mod table_size`` on int64 tensors (wrap-around products).

    ``table_size`` must be a power of two (the modulo is a bit mask, equal to Python's ``%`` on the
    signed value).
    """
    h = torch.bitwise_xor(ix * HASH_PRIMES[0], iy * HASH_PRIMES[1])
    h = torch.bitwise_xor(h, torch.tensor(seed, dtype=torch.int64, device=h.device))
    return torch.bitwise_and(h, table_size - 1)


def _level_lookup(coords: Tensor, scale: float, seed: int, table_size: int, bilinear: bool) -> tuple[Tensor, Tensor]:
    """Corner indices ``[N, 4]`` (order 00, 10, 01, 11) and blending weights ``[N, 4]`` at one level."""
    pos = coords * scale
    base = torch.floor(pos)
    frac = pos - base
    i0 = base.to(torch.int64)
    # (ix + 1) * C1 = ix * C1 + C1 (mod 2**64): four corners from two products per axis
    ax0 = i0[:, 0] * HASH_PRIMES[0]
    ay0 = i0[:, 1] * HASH_PRIMES[1]
    ax1, ay1 = ax0 + HASH_PRIMES[0], ay0 + HASH_PRIMES[1]
    ay0 = torch.bitwise_xor(ay0, seed)
    ay1 = torch.bitwise_xor(ay1, seed)
    mask = table_size - 1
    idx = torch.stack([torch.bitwise_xor(ax0, ay0), torch.bitwise_xor(ax1, ay0),
                       torch.bitwise_xor(ax0, ay1), torch.bitwise_xor(ax1, ay1)], dim=1).bitwise_and_(mask)
    if bilinear:
        fx, fy = frac[:, 0], frac[:, 1]
        gx, gy = 1.0 - fx, 1.0 - fy
        w = torch.stack([gx * gy, fx * gy, gx * fy, fx * fy], dim=1)
    else:
        w = torch.full((coords.shape[0], 4), 0.25, dtype=coords.dtype, device=coords.device)
    return idx, w


class _HashGridFunction(torch.autograd.Function):
    """Level-by-level fused lookup; saves only the coordinates, recomputes indices in backward."""

    @staticmethod
    def forward(ctx, coords: Tensor, table: Tensor, scales: tuple[float, ...], seeds: tuple[int, ...],  # type: ignore[override]
                shared: bool, bilinear: bool, sparse_grad: bool = False) -> Tensor:
        n = coords.shape[0]
        t_size, feat = table.shape[-2], table.shape[-1]
        levels = len(scales)
        out = torch.empty(n, levels * feat, dtype=table.dtype, device=table.device)
        c = coords.to(table.dtype) if table.dtype in (torch.float32, torch.float64) else coords.float()
        for level in range(levels):
            idx, w = _level_lookup(c, scales[level], seeds[level], t_size, bilinear)
            tab = table if shared else table[level]
            out[:, level * feat:(level + 1) * feat] = F.embedding_bag(
                idx, tab, per_sample_weights=w.to(tab.dtype), mode="sum")
        ctx.save_for_backward(coords)
        ctx.meta = (scales, seeds, shared, bilinear, table.shape, table.dtype, sparse_grad)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (coords,) = ctx.saved_tensors
        scales, seeds, shared, bilinear, shape, dtype, sparse_grad = ctx.meta
        grad_table = None
        if ctx.needs_input_grad[1] and sparse_grad:
            grad_table = _sparse_table_grad(coords, grad_out, scales, seeds, shared, bilinear, shape, dtype)
        elif ctx.needs_input_grad[1]:
            grad_table = torch.zeros(shape, dtype=dtype, device=grad_out.device)
            t_size, feat = shape[-2], shape[-1]
            c = coords.to(dtype) if dtype in (torch.float32, torch.float64) else coords.float()
            for level in range(len(scales)):
                idx, w = _level_lookup(c, scales[level], seeds[level], t_size, bilinear)
                g = grad_out[:, level * feat:(level + 1) * feat]
                dst = grad_table if shared else grad_table[level]
                for corner in range(4):
                    dst.index_add_(0, idx[:, corner], g * w[:, corner:corner + 1].to(g.dtype))
        return None, grad_table, None, None, None, None, None


def _sparse_table_grad(coords: Tensor, grad_out: Tensor, scales: Sequence[float], seeds: Sequence[int], shared: bool,
                       bilinear: bool, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """Coalesced sparse COO gradient of the table: unique touched rows first, then ``index_add_`` per level/corner."""
    t_size, feat = shape[-2], shape[-1]
    c = coords.to(dtype) if dtype in (torch.float32, torch.float64) else coords.float()
    idx_l, w_l = [], []
    for level in range(len(scales)):
        idx, w = _level_lookup(c, scales[level], seeds[level], t_size, bilinear)
        idx_l.append(idx if shared else idx + level * t_size)  # flat row of the [L * T] stack of per-level tables
        w_l.append(w)
    rows, inverse = torch.unique(torch.stack(idx_l), sorted=True, return_inverse=True)  # [U], [L, N, 4]
    del idx_l
    values = torch.zeros(rows.numel(), feat, dtype=dtype, device=grad_out.device)
    for level in range(len(scales)):
        g = grad_out[:, level * feat:(level + 1) * feat]
        inv, w = inverse[level], w_l[level]
        for corner in range(4):
            values.index_add_(0, inv[:, corner], g * w[:, corner:corner + 1].to(g.dtype))
    # sorted unique flat rows = lexicographically sorted (level, row) pairs: already coalesced
    indices = rows[None] if shared else torch.stack([rows // t_size, rows % t_size])
    return torch.sparse_coo_tensor(indices, values, shape, dtype=dtype, device=grad_out.device, is_coalesced=True,
                                   check_invariants=False)


class HashGridEncoding2D(nn.Module):
    """Multiresolution hash encoding of 2-D pixel coordinates ``[N, 2]`` -> features ``[N, L * F]``.

    Args:
        levels: number of resolution levels ``L``.
        features_per_level: features per level ``F``.
        log2_table_size: ``log2(T)``; ``T`` rows per table.
        base_resolution: grid resolution ``N_0`` of the coarsest level.
        growth: per-level growth factor ``b`` (``N_l = round(N_0 * b**l)``).
        region_size: side ``S`` of the region in pixels; level ``l`` scales coordinates by ``N_l / S``.
        shared_table: one ``[T, F]`` table for all levels (LIANet-Modified, reference branch ``release/v1.0.1`` = tag
            v4.2.0) or ``[L, T, F]`` (Base/Large, tag v1.0.0).
        per_level_seeds: independent hash seed per level (otherwise the level-0 seed everywhere).
        bilinear: bilinear blending of the four corners (otherwise their plain mean).
        init_range: tables are initialised ``U(-init_range, init_range)``; default 1e-2 for a shared
            table, 1e-4 for per-level tables (the reference's two code versions).
        sparse_grad: return the table gradient as a coalesced sparse COO tensor of the touched rows (see the
            module docstring; needs ``torch.optim.SparseAdam``/``SGD`` for the table). Default: dense.
        backend: ``"torch"`` (always available), ``"tcnn"`` (tiny-cuda-nn, requires it and CUDA) or
            ``"auto"`` (``"torch"``; tiny-cuda-nn uses its own hash function, so its values differ from
            the formula above and it is never selected implicitly).
    """

    def __init__(self, levels: int = 13, features_per_level: int = 128, log2_table_size: int = 19,
                 base_resolution: int = 16, growth: float = 2.0, region_size: float = 10980.0,
                 shared_table: bool = True, per_level_seeds: bool = True, bilinear: bool = True,
                 init_range: float | None = None, backend: str = "auto", sparse_grad: bool = False) -> None:
        super().__init__()
        if levels < 1 or features_per_level < 1:
            raise ValueError(f"levels and features_per_level must be >= 1, got {levels} and {features_per_level}")
        if not 1 <= log2_table_size <= 30:
            raise ValueError(f"log2_table_size must be in 1..30, got {log2_table_size}")
        if base_resolution < 1 or growth <= 0:
            raise ValueError(f"base_resolution must be >= 1 and growth > 0, got {base_resolution} and {growth}")
        if not region_size or region_size <= 0:
            raise ValueError(f"region_size must be a positive number of pixels, got {region_size}")
        if backend not in ("auto", "torch", "tcnn"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'tcnn', got {backend!r}")
        if sparse_grad and backend == "tcnn":
            raise ValueError("sparse_grad=True is only available with the PyTorch backend, not backend='tcnn'")
        self.levels = int(levels)
        self.features_per_level = int(features_per_level)
        self.log2_table_size = int(log2_table_size)
        self.table_size = 1 << self.log2_table_size
        self.base_resolution = int(base_resolution)
        self.growth = float(growth)
        self.region_size = float(region_size)
        self.shared_table = bool(shared_table)
        self.per_level_seeds = bool(per_level_seeds)
        self.bilinear = bool(bilinear)
        self.sparse_grad = bool(sparse_grad)
        self.resolutions = level_resolutions(self.levels, self.base_resolution, self.growth)
        self.scales = tuple(n / self.region_size for n in self.resolutions)
        self.seeds = tuple(level_seeds(self.levels, self.per_level_seeds))
        rng = init_range if init_range is not None else (1e-2 if self.shared_table else 1e-4)
        shape = (self.table_size, self.features_per_level) if self.shared_table else (
            self.levels, self.table_size, self.features_per_level)
        self.table = nn.Parameter(torch.empty(shape).uniform_(-rng, rng))
        self.backend = "torch"
        self._tcnn: nn.Module | None = None
        if backend == "tcnn":
            self._build_tcnn()

    @property
    def out_dim(self) -> int:
        """``L * F``."""
        return self.levels * self.features_per_level

    def _build_tcnn(self) -> None:
        try:
            import tinycudann as tcnn  # type: ignore[import-not-found]
        except ImportError as err:
            raise RuntimeError("backend='tcnn' needs the tinycudann package (not importable here)") from err
        if not torch.cuda.is_available():
            raise RuntimeError("backend='tcnn' needs CUDA")
        self._tcnn = tcnn.Encoding(2, {
            "otype": "HashGrid", "n_levels": self.levels, "n_features_per_level": self.features_per_level,
            "log2_hashmap_size": self.log2_table_size, "base_resolution": self.base_resolution,
            "per_level_scale": self.growth, "interpolation": "Linear" if self.bilinear else "Nearest",
        })
        self.backend = "tcnn"

    def extra_repr(self) -> str:
        return (
            f"levels={self.levels}, features_per_level={self.features_per_level}, "
            f"table_size=2**{self.log2_table_size}, "
            f"resolutions={self.resolutions[0]}..{self.resolutions[-1]}, region_size={self.region_size:g}, "
            f"shared_table={self.shared_table}, per_level_seeds={self.per_level_seeds}, bilinear={self.bilinear}"
            + (", sparse_grad=True" if self.sparse_grad else "")
        )

    def forward(self, coords: Tensor) -> Tensor:
        """Encode pixel coordinates ``[N, 2]`` (x = column, y = row) into ``[N, L * F]`` features."""
        if not isinstance(coords, Tensor) or coords.ndim != 2 or coords.shape[1] != 2:
            shape = tuple(coords.shape) if isinstance(coords, Tensor) else type(coords).__name__
            raise ValueError(f"coords must be a float tensor of shape [N, 2] (x, y pixel coordinates), got {shape}")
        if not coords.is_floating_point():
            coords = coords.float()
        if self._tcnn is not None:
            return self._tcnn((coords / self.region_size).clamp(0, 1)).float()
        return _HashGridFunction.apply(coords, self.table, self.scales, self.seeds, self.shared_table, self.bilinear,
                                       self.sparse_grad)

    def node_indices(self, level: int, ix: Tensor, iy: Tensor) -> Tensor:
        """Table row of grid node ``(ix, iy)`` at ``level`` (for collision analysis)."""
        return hash_2d(ix.to(torch.int64), iy.to(torch.int64), self.seeds[level], self.table_size)


def axis_nodes(n_pixels: int, scale: float, pixel_centers: bool = False) -> torch.Tensor:
    """Sorted distinct grid-node indices along one axis that :class:`HashGridEncoding2D` reads for pixels
    ``0 ... n_pixels - 1`` (``p + 0.5`` with ``pixel_centers``) at ``scale`` (``N_l / S``): ``floor(p * scale)``
    and ``floor(p * scale) + 1``, computed in float32 like the encoder."""
    if n_pixels < 1:
        raise ValueError(f"n_pixels must be >= 1, got {n_pixels}")
    p = torch.arange(n_pixels, dtype=torch.float32)
    if pixel_centers:
        p = p + 0.5
    lower = torch.floor(p * scale).to(torch.int64)
    return torch.unique(torch.cat([lower, lower + 1]))


def level_row_counts(xs: torch.Tensor, ys: torch.Tensor, seed: int, table_size: int,
                     chunk: int = 1 << 22) -> torch.Tensor:
    """Nodes per table row (``[T]``, int64) of the node grid ``ys x xs`` at one level (hash seed ``seed``),
    hashed in chunks of about ``chunk`` nodes."""
    counts = torch.zeros(table_size, dtype=torch.int64)
    rows_per_chunk = max(1, chunk // max(1, xs.numel()))
    for start in range(0, ys.numel(), rows_per_chunk):
        iy = ys[start:start + rows_per_chunk]
        h = hash_2d(xs[None, :].expand(iy.numel(), -1).reshape(-1), iy[:, None].expand(-1, xs.numel()).reshape(-1),
                    seed, table_size)
        counts += torch.bincount(h, minlength=table_size)
    return counts


def collision_statistics(levels: int = 13, log2_table_size: int = 19, base_resolution: int = 16, growth: float = 2.0,
                         region_size: float = 10980.0, per_level_seeds: bool = True, shared_table: bool = True,
                         n_pixels: int = 1 << 20, exact_limit: int = 1 << 24, seed: int = 0) -> dict[str, object]:
    """Hash-collision rates of an encoding configuration (LIANet supplement, section 8, eq. 1).

    Returns a dict with

    * ``level_rate``: per level, the fraction of the grid nodes the encoder reads for the square region's pixels
      (:func:`axis_nodes` per axis) that share their table row with another node of the same level (exact count
      when the level has at most ``exact_limit`` such nodes, else the expectation ``1 - (1 - 1/T)**(n - 1)`` of a
      uniform hash, flagged in ``level_exact``); ``level_nodes`` the node counts. The per-level report of
      ``eoplugins hash-collisions`` (:mod:`terratorch_eoplugins.analysis.hash_collisions`) counts the same nodes;
    * ``full_rate``: over ``n_pixels`` random pixel positions, the fraction whose lower-corner rows
      coincide with those of another, spatially distinct sampled position at *every* level (identical
      concatenated embedding up to interpolation);
    * ``cross_level_rate`` (shared tables): fraction of nodes ``(ix, iy)`` of each level whose row is the
      row of the same integer node at another level, i.e. structural aliasing between levels, which
      per-level seeds remove.
    """
    t_size = 1 << log2_table_size
    res = level_resolutions(levels, base_resolution, growth)
    seeds = level_seeds(levels, per_level_seeds)
    level_rate, level_exact, level_nodes = [], [], []
    for level, n_l in enumerate(res):
        nodes = axis_nodes(int(region_size), n_l / float(region_size))  # read along one axis of the square region
        n_nodes = nodes.numel() ** 2
        level_nodes.append(int(n_nodes))
        if n_nodes <= exact_limit:
            counts = level_row_counts(nodes, nodes, seeds[level], t_size)
            level_rate.append(float(counts[counts > 1].sum()) / n_nodes)
            level_exact.append(True)
        else:
            level_rate.append(1.0 - (1.0 - 1.0 / t_size) ** (n_nodes - 1))
            level_exact.append(False)
    gen = torch.Generator().manual_seed(seed)
    pix = torch.randint(0, int(region_size), (n_pixels, 2), generator=gen, dtype=torch.int64)
    pix = torch.unique(pix, dim=0)
    sig = torch.empty(pix.shape[0], levels, dtype=torch.int64)
    for level, n_l in enumerate(res):
        cell = torch.floor(pix.double() * (n_l / region_size)).to(torch.int64)
        sig[:, level] = hash_2d(cell[:, 0], cell[:, 1], seeds[level], t_size)
    _, inverse, counts = torch.unique(sig, dim=0, return_inverse=True, return_counts=True)
    full = int((counts[inverse] > 1).sum())
    out: dict[str, object] = {
        "resolutions": res, "level_rate": level_rate, "level_exact": level_exact, "level_nodes": level_nodes,
        "full_rate": full / pix.shape[0], "full_count": full, "n_pixels": int(pix.shape[0]),
    }
    if shared_table:
        cross = []
        probe = torch.randint(0, max(2, res[0]), (min(n_pixels, 1 << 16), 2), generator=gen, dtype=torch.int64)
        for level in range(levels):
            mine = hash_2d(probe[:, 0], probe[:, 1], seeds[level], t_size)
            hit = torch.zeros(probe.shape[0], dtype=torch.bool)
            for other in range(levels):
                if other != level:
                    hit |= hash_2d(probe[:, 0], probe[:, 1], seeds[other], t_size) == mine
            cross.append(float(hit.double().mean()))
        out["cross_level_rate"] = cross
    return out


def naive_hash_grid(coords: Tensor, table: Tensor, resolutions: Sequence[int], region_size: float,
                    seeds: Sequence[int], bilinear: bool = True) -> Tensor:
    """Direct vectorised formula over all levels at once (the memory-heavy ``[L * N, F]`` reference path).

    Kept for tests and the benchmark: every level's four corners are gathered as ``[L * N, F]`` tensors
    and blended with ordinary autograd.
    """
    n, levels = coords.shape[0], len(resolutions)
    shared = table.ndim == 2
    t_size, feat = table.shape[-2], table.shape[-1]
    scales = torch.tensor([r / region_size for r in resolutions], dtype=coords.dtype, device=coords.device)
    pos = coords[None, :, :] * scales[:, None, None]  # [L, N, 2]
    base = torch.floor(pos)
    frac = pos - base
    i0 = base.to(torch.int64)
    seed_t = torch.tensor(list(seeds), dtype=torch.int64, device=coords.device)[:, None]
    level_off = (torch.arange(levels, device=coords.device)[:, None] * t_size) if not shared else 0
    flat = table if shared else table.reshape(levels * t_size, feat)

    def corner(dx: int, dy: int) -> Tensor:
        ix, iy = i0[..., 0] + dx, i0[..., 1] + dy
        h = torch.bitwise_and(torch.bitwise_xor(torch.bitwise_xor(ix * HASH_PRIMES[0], iy * HASH_PRIMES[1]), seed_t),
                              t_size - 1)
        return flat[(h + level_off).reshape(-1)]  # [L*N, F]

    f00, f10, f01, f11 = corner(0, 0), corner(1, 0), corner(0, 1), corner(1, 1)
    if bilinear:
        fx = frac[..., 0].reshape(-1, 1)
        fy = frac[..., 1].reshape(-1, 1)
        enc = (1 - fx) * (1 - fy) * f00 + fx * (1 - fy) * f10 + (1 - fx) * fy * f01 + fx * fy * f11
    else:
        enc = 0.25 * (f00 + f10 + f01 + f11)
    return enc.view(levels, n, feat).permute(1, 0, 2).reshape(n, levels * feat)
