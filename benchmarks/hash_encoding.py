"""Hash-grid encoding benchmark: lean level-by-level path vs. a naive vectorised ``[L*N, F]`` implementation.

Configuration of LIANet-Modified (L = 13 levels, F = 128, one shared table of 2**19 rows, 10980 px region).
Each implementation runs in a fresh subprocess, so that peak memory is its own: forward + backward
(gradient w.r.t. the table, upstream gradient of ones) over ``--points`` pixel coordinates, either
uniformly random over the region (``--layout random``) or the pixel grid of square patches, as LIANet
encodes them (``--layout patch``: ``points / 16384`` patches of 128 x 128 at random origins).
Implementations:

* ``naive``: all levels at once, four ``[L*N, F]`` corner gathers blended with ordinary autograd
  (dense table gradient from indexing's backward) -- the reference's vectorised path;
* ``lean``: :class:`HashGridEncoding2D` default (fused per-level ``embedding_bag``, recomputing backward,
  dense ``[T, F]`` table gradient accumulated with ``index_add_``);
* ``sparse``: the same with ``sparse_grad=True`` (coalesced sparse COO table gradient of the touched
  rows only; train the table with ``torch.optim.SparseAdam``).

Reported: throughput (points/s, median over ``--repeats`` timed passes after one warm-up) and peak memory
above the state before the first pass (CPU: peak resident set size from ``getrusage``; CUDA:
``torch.cuda.max_memory_allocated``). Every implementation holds the output and its upstream gradient
(``2 * N * L * F`` floats, the "interface"); the table gradient (dense or sparse) and the rest
("intermediates") are printed separately. Ratios vs. naive are printed at the end.

    python benchmarks/hash_encoding.py                     # CPU, 16384 random points
    python benchmarks/hash_encoding.py --layout patch      # one 128x128 patch
    python benchmarks/hash_encoding.py --device cuda --points 1048576
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, statistics, sys, time
import torch
from terratorch_eoplugins.nn.hash_encoding import HashGridEncoding2D, naive_hash_grid
impl, device, points, repeats, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
layout = sys.argv[6]
if threads > 0:
    torch.set_num_threads(threads)
torch.manual_seed(0)
enc = HashGridEncoding2D(levels=13, features_per_level=128, log2_table_size=19, base_resolution=16, growth=2.0,
                         region_size=10980.0, shared_table=True, sparse_grad=impl == "sparse").to(device)
if layout == "random":
    coords = torch.rand(points, 2) * 10980.0
else:
    if points % 16384:
        raise SystemExit("--layout patch needs --points to be a multiple of 16384 (128x128 patches)")
    ys, xs = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    grid = torch.stack([xs, ys], -1).reshape(1, -1, 2)
    origins = torch.randint(0, 10980 - 128, (points // 16384, 1, 2)).float()
    coords = (grid + origins).reshape(-1, 2)
coords = coords.to(device)
grad_bytes = []

def step():
    if impl in ("lean", "sparse"):
        out = enc(coords)
    else:
        out = naive_hash_grid(coords, enc.table, enc.resolutions, enc.region_size, enc.seeds, enc.bilinear)
    (g,) = torch.autograd.grad(out, enc.table, torch.ones_like(out))
    if g.is_sparse:
        grad_bytes.append(g._values().numel() * g._values().element_size() + g._indices().numel() * 8)
    else:
        grad_bytes.append(g.numel() * g.element_size())
    return g

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    step(); torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - base
else:
    base = rss()
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
times = []
for _ in range(repeats):
    if device == "cuda": torch.cuda.synchronize()
    t = time.perf_counter(); step()
    if device == "cuda": torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
# bytes every implementation must hold: the output and its upstream gradient
floor = 2 * points * enc.out_dim * 4
print(json.dumps({"impl": impl, "points_per_s": points / statistics.median(times), "peak_bytes": peak,
                  "grad_bytes": grad_bytes[0], "intermediate_bytes": max(peak - floor - grad_bytes[0], 0),
                  "floor_bytes": floor, "seconds": statistics.median(times), "threads": torch.get_num_threads()}))
"""


def run(impl: str, device: str, points: int, repeats: int, threads: int, layout: str = "random") -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, impl, device, str(points), str(repeats), str(threads), layout],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--points", type=int, default=16384, help="pixel coordinates per pass (128x128 patch = 16384)")
    p.add_argument("--layout", default="random", choices=["random", "patch"],
                   help="random points over the region, or the pixel grids of 128x128 patches")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--impls", nargs="+", default=["lean", "sparse"], choices=["lean", "sparse"],
                   help="lean implementations compared with the naive one")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line")
    args = p.parse_args(argv)
    res = {impl: run(impl, args.device, args.points, args.repeats, args.threads, args.layout)
           for impl in (*args.impls, "naive")}
    naive = res["naive"]
    ratios = {impl: {"throughput_ratio": res[impl]["points_per_s"] / naive["points_per_s"],
                     "peak_memory_ratio": res[impl]["peak_bytes"] / naive["peak_bytes"],
                     "intermediate_memory_ratio": res[impl]["intermediate_bytes"] / max(naive["intermediate_bytes"], 1)}
              for impl in args.impls}
    if args.json:
        print(json.dumps({"device": args.device, "points": args.points, "layout": args.layout, **res,
                          "ratios": ratios}))
        return 0
    print(f"LIANet-Modified hash grid (L=13, F=128, T=2^19, shared table), {args.points} points ({args.layout}), "
          f"{args.device}, {naive['threads']} thread(s)")
    for name, r in res.items():
        print(f"  {name:6s}: {r['points_per_s']:12,.0f} points/s  ({r['seconds'] * 1e3:8.1f} ms fwd+bwd)   "
              f"peak {r['peak_bytes'] / 2**20:8.1f} MiB = table grad {r['grad_bytes'] / 2**20:6.1f} MiB"
              f" + intermediates {r['intermediate_bytes'] / 2**20:7.1f} MiB + interface")
    print(f"  (interface held by all: output + upstream gradient = {naive['floor_bytes'] / 2**20:.1f} MiB)")
    for impl, r in ratios.items():
        print(f"  {impl}/naive: throughput {r['throughput_ratio']:.2f}x (goal >= 3), peak memory "
              f"{r['peak_memory_ratio']:.3f} (goal <= 0.25), intermediates only {r['intermediate_memory_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
