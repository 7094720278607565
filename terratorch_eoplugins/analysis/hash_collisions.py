"""Hash-collision rates of a LIANet hash grid (supplement section 8, eq. 1): ``eoplugins hash-collisions``.

At level ``l`` a collision is a pair of *distinct* grid nodes with the same table row,
``(x_i, y_i) != (x_j, y_j)`` and ``h_l(x_i, y_i) = h_l(x_j, y_j)`` (eq. 1). The nodes counted are exactly those the
encoder looks up for the pixels of the region: pixel ``p`` (column or row, ``0 ... W - 1``, or ``p + 0.5`` with
``pixel_centers``) is scaled to ``p * N_l / S`` in float32 as in :class:`~terratorch_eoplugins.nn.hash_encoding.
HashGridEncoding2D`, and its cell's two nodes ``floor(.)`` and ``floor(.) + 1`` per axis are used (the bilinear
blend reads all four corners). Every level is hashed, coarse ones included (the encoder has no dense-grid
indexing), so a coarse level whose nodes would fit in the table can still collide. The row of each node is the
encoder's own hash (:func:`~terratorch_eoplugins.nn.hash_encoding.hash_2d` with the level's seed).

Reported per level: ``nodes`` (distinct nodes), ``rows`` (distinct rows they use), ``colliding_nodes`` (nodes that
share their row with another node of the level), ``rate = colliding_nodes / nodes``, ``pairs`` (colliding pairs
``sum_r c_r (c_r - 1) / 2``), ``pair_rate = pairs / (n (n - 1) / 2)`` and the uniform-hash expectation of ``rate``,
``1 - (1 - 1/T)^(n - 1)``. Over all levels: ``rate = sum colliding_nodes / sum nodes`` (eq. 1 per level, pooled);
with a table shared by all levels also ``shared_table_rate``, the fraction of (level, node) entries whose row is
used by any other entry of any level (collisions of the shared table's rows across levels).

Usage::

    eoplugins hash-collisions --ckpt RUN.ckpt
    eoplugins hash-collisions --variant modified --region-shape 10980 10980     # paper-size grid, tens of seconds
    eoplugins hash-collisions --levels 6 --log2-table-size 12 --base-resolution 8 --region-size 384 \\
        --region-shape 384 256 --json collisions.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from terratorch_eoplugins.models.lianet import LIANetGenerator, generator_config, load_generator
from terratorch_eoplugins.nn.hash_encoding import axis_nodes, level_resolutions, level_row_counts, level_seeds

__all__ = ["GRID_KEYS", "axis_nodes", "grid_from_generator", "hash_collision_report", "main"]

#: hash-grid settings the report needs (generator configuration keys, plus ``region_shape`` and ``pixel_centers``)
GRID_KEYS = ("levels", "log2_table_size", "base_resolution", "growth", "region_size", "region_shape", "shared_table",
             "per_level_seeds", "pixel_centers")
LEVEL_FIELDS = ("level", "resolution", "nodes", "rows", "colliding_nodes", "rate", "pairs", "pair_rate",
                "expected_uniform_rate")


def grid_from_generator(generator: LIANetGenerator) -> dict[str, Any]:
    """The :data:`GRID_KEYS` of a generator (region shape from its configuration, else the square region)."""
    cfg = generator.config
    out = {k: cfg[k] for k in GRID_KEYS if k != "region_shape"}
    out["region_shape"] = list(generator.region_extent())
    return out


def hash_collision_report(levels: int, log2_table_size: int, base_resolution: int, growth: float,
                          region_size: float, region_shape: Sequence[int] | None = None, shared_table: bool = True,
                          per_level_seeds: bool = True, pixel_centers: bool = False,
                          chunk: int = 1 << 22) -> dict[str, Any]:
    """Eq. 1 collision counts per level and over all levels for the nodes a region of ``region_shape`` (H, W)
    pixels touches (default: the square ``region_size``); see the module docstring for the quantities."""
    if levels < 1 or not 1 <= log2_table_size <= 30 or base_resolution < 1 or growth <= 0 or region_size <= 0:
        raise ValueError(f"invalid hash grid: levels={levels}, log2_table_size={log2_table_size}, "
                         f"base_resolution={base_resolution}, growth={growth}, region_size={region_size}")
    if region_shape is None:
        region_shape = (int(region_size), int(region_size))
    if len(region_shape) != 2 or min(region_shape) < 1:
        raise ValueError(f"region_shape must be two positive pixel counts (H, W), got {list(region_shape)}")
    h_px, w_px = (int(v) for v in region_shape)
    t_size = 1 << int(log2_table_size)
    res = level_resolutions(levels, base_resolution, growth)
    seeds = level_seeds(levels, per_level_seeds)
    total = torch.zeros(t_size, dtype=torch.int64) if shared_table else None
    rows_out = []
    for level, (n_l, seed) in enumerate(zip(res, seeds)):
        scale = n_l / float(region_size)  # the encoder's per-level scale (a Python float, applied to float32)
        xs, ys = axis_nodes(w_px, scale, pixel_centers), axis_nodes(h_px, scale, pixel_centers)
        counts = level_row_counts(xs, ys, seed, t_size, chunk)
        if total is not None:
            total += counts
        n = int(xs.numel() * ys.numel())
        colliding = int(counts[counts > 1].sum())
        pairs = int((counts * (counts - 1) // 2).sum())
        rows_out.append({
            "level": level, "resolution": n_l, "nodes": n, "rows": int((counts > 0).sum()),
            "colliding_nodes": colliding, "rate": colliding / n, "pairs": pairs,
            "pair_rate": pairs / (n * (n - 1) / 2) if n > 1 else 0.0,
            "expected_uniform_rate": 1.0 - (1.0 - 1.0 / t_size) ** (n - 1),
        })
    nodes = sum(r["nodes"] for r in rows_out)
    colliding = sum(r["colliding_nodes"] for r in rows_out)
    out: dict[str, Any] = {
        "grid": {"levels": levels, "log2_table_size": int(log2_table_size), "table_size": t_size,
                 "base_resolution": base_resolution, "growth": growth, "region_size": float(region_size),
                 "region_shape": [h_px, w_px], "shared_table": bool(shared_table),
                 "per_level_seeds": bool(per_level_seeds), "pixel_centers": bool(pixel_centers)},
        "levels": rows_out,
        "all_levels": {"nodes": nodes, "colliding_nodes": colliding, "rate": colliding / nodes},
    }
    if total is not None:
        out["all_levels"]["shared_table_rate"] = int(total[total > 1].sum()) / nodes
        out["all_levels"]["shared_table_rows"] = int((total > 0).sum())
    return out


def _format(rep: dict[str, Any]) -> str:
    g = rep["grid"]
    lines = [f"hash grid: L={g['levels']}, T=2**{g['log2_table_size']} ({g['table_size']} rows, "
             f"{'shared by all levels' if g['shared_table'] else 'one per level'}), N_0={g['base_resolution']}, "
             f"growth {g['growth']:g}, region_size {g['region_size']:g} px, region {g['region_shape'][0]}x"
             f"{g['region_shape'][1]} px, {'pixel centres' if g['pixel_centers'] else 'pixel corners'}, "
             f"{'per-level' if g['per_level_seeds'] else 'one'} seed(s); every level is hashed",
             f"{'level':>5s} {'N_l':>7s} {'nodes':>12s} {'rows used':>10s} {'colliding':>12s} {'rate':>9s} "
             f"{'uniform':>9s} {'pairs':>12s}"]
    for r in rep["levels"]:
        lines.append(f"{r['level']:5d} {r['resolution']:7d} {r['nodes']:12d} {r['rows']:10d} "
                     f"{r['colliding_nodes']:12d} {r['rate']:9.4%} {r['expected_uniform_rate']:9.4%} "
                     f"{r['pairs']:12d}")
    a = rep["all_levels"]
    lines.append(f"  all {'':>7s} {a['nodes']:12d} {'':>10s} {a['colliding_nodes']:12d} {a['rate']:9.4%}"
                 "   (eq. 1 per level, pooled over levels)")
    if "shared_table_rate" in a:
        lines.append(f"shared table: {a['shared_table_rate']:.4%} of (level, node) entries share their row with "
                     f"another entry of any level ({a['shared_table_rows']} rows used)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``eoplugins hash-collisions``: print (and optionally save) the eq. 1 collision rates."""
    ap = argparse.ArgumentParser(prog="eoplugins hash-collisions",
                                 description="LIANet hash-collision rates (supplement eq. 1) per level and over all "
                                             "levels, for a generator checkpoint or explicit grid arguments")
    ap.add_argument("--ckpt", default=None, help="LIANet generator checkpoint (grid and region shape from it)")
    ap.add_argument("--variant", default="modified", choices=["base", "large", "modified"],
                    help="defaults of the grid arguments without --ckpt")
    ap.add_argument("--levels", type=int, default=None)
    ap.add_argument("--log2-table-size", type=int, default=None)
    ap.add_argument("--base-resolution", type=int, default=None)
    ap.add_argument("--growth", type=float, default=None)
    ap.add_argument("--region-size", type=float, default=None, help="coordinate scale S (pixels)")
    ap.add_argument("--region-shape", type=int, nargs=2, default=None, metavar=("H", "W"),
                    help="region in pixels (default: the checkpoint's, else S x S)")
    ap.add_argument("--shared-table", default=None, choices=["yes", "no"], help="one table for all levels")
    ap.add_argument("--per-level-seeds", default=None, choices=["yes", "no"])
    ap.add_argument("--pixel-centers", default=None, choices=["yes", "no"],
                    help="pixel coordinates p + 0.5 (Base/Large) instead of p (Modified)")
    ap.add_argument("--json", default=None, help="write the report to this JSON file")
    ap.add_argument("--csv", default=None, help="write the per-level table to this CSV file")
    args = ap.parse_args(argv)
    if args.ckpt:
        try:
            grid = grid_from_generator(load_generator(args.ckpt))
        except (OSError, ValueError) as err:
            print(f"eoplugins hash-collisions: --ckpt {args.ckpt}: {err}", file=sys.stderr)
            return 2
    else:
        cfg = generator_config(args.variant)
        grid = {k: cfg[k] for k in GRID_KEYS}
    overrides = {"levels": args.levels, "log2_table_size": args.log2_table_size,
                 "base_resolution": args.base_resolution, "growth": args.growth, "region_size": args.region_size,
                 "region_shape": args.region_shape, "shared_table": args.shared_table,
                 "per_level_seeds": args.per_level_seeds, "pixel_centers": args.pixel_centers}
    for key, value in overrides.items():
        if value is not None:
            grid[key] = value == "yes" if value in ("yes", "no") else value
    if args.region_size is not None and args.region_shape is None and not args.ckpt:
        grid["region_shape"] = None  # the square of the given region size
    try:
        rep = hash_collision_report(**grid)
    except ValueError as err:
        print(f"eoplugins hash-collisions: {err}", file=sys.stderr)
        return 2
    if args.ckpt:
        rep["ckpt"] = str(args.ckpt)
    print(_format(rep))
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2))
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(LEVEL_FIELDS))
            writer.writeheader()
            writer.writerows(rep["levels"])
            writer.writerow({"level": "all", **{k: v for k, v in rep["all_levels"].items() if k in LEVEL_FIELDS}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
