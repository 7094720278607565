"""Hash-grid encoding benchmark: lean level-by-level path vs. a naive vectorised ``[L*N, F]`` implementation.

Configuration of LIANet-Modified (L = 13 levels, F = 128, one shared table of 2**19 rows, 10980 px region).
Each implementation runs in a fresh subprocess, so that peak memory is its own: forward + backward
(gradient w.r.t. the table) over ``--points`` random pixel coordinates. Reported per implementation:
throughput (points/s, median over ``--repeats`` timed passes after one warm-up) and peak memory above
the state before the first pass (CPU: peak resident set size from ``getrusage``; CUDA:
``torch.cuda.max_memory_allocated``). Both paths allocate the same dense table gradient and output,
which are included in the peak; the peak minus this common floor ("intermediates") is printed as well.
Ratios lean/naive are printed at the end.

    python benchmarks/hash_encoding.py                     # CPU, 16384 points (one 128x128 patch)
    python benchmarks/hash_encoding.py --device cuda --points 1048576
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, resource, statistics, sys, time
import torch
from terratorch_eoplugins.nn.hash_encoding import HashGridEncoding2D, naive_hash_grid
impl, device, points, repeats, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if threads > 0:
    torch.set_num_threads(threads)
torch.manual_seed(0)
enc = HashGridEncoding2D(levels=13, features_per_level=128, log2_table_size=19, base_resolution=16, growth=2.0,
                         region_size=10980.0, shared_table=True).to(device)
coords = (torch.rand(points, 2) * 10980.0).to(device)

def step():
    if impl == "lean":
        out = enc(coords)
    else:
        out = naive_hash_grid(coords, enc.table, enc.resolutions, enc.region_size, enc.seeds, enc.bilinear)
    (g,) = torch.autograd.grad(out, enc.table, torch.ones_like(out))
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
# bytes every implementation must hold: output, its upstream gradient, the dense table gradient
floor = 2 * points * enc.out_dim * 4 + enc.table.numel() * 4
print(json.dumps({"impl": impl, "points_per_s": points / statistics.median(times), "peak_bytes": peak,
                  "intermediate_bytes": max(peak - floor, 0), "floor_bytes": floor,
                  "seconds": statistics.median(times), "threads": torch.get_num_threads()}))
"""


def run(impl: str, device: str, points: int, repeats: int, threads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, impl, device, str(points), str(repeats), str(threads)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--points", type=int, default=16384, help="pixel coordinates per pass (128x128 patch = 16384)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line")
    args = p.parse_args(argv)
    res = {impl: run(impl, args.device, args.points, args.repeats, args.threads) for impl in ("lean", "naive")}
    lean, naive = res["lean"], res["naive"]
    ratios = {"throughput_ratio": lean["points_per_s"] / naive["points_per_s"],
              "peak_memory_ratio": lean["peak_bytes"] / naive["peak_bytes"],
              "intermediate_memory_ratio": lean["intermediate_bytes"] / max(naive["intermediate_bytes"], 1)}
    if args.json:
        print(json.dumps({"device": args.device, "points": args.points, **res, **ratios}))
        return 0
    print(f"LIANet-Modified hash grid (L=13, F=128, T=2^19, shared table), {args.points} points, {args.device}, "
          f"{lean['threads']} thread(s)")
    for name, r in res.items():
        print(f"  {name:5s}: {r['points_per_s']:12,.0f} points/s  ({r['seconds'] * 1e3:8.1f} ms fwd+bwd)   "
              f"peak {r['peak_bytes'] / 2**20:8.1f} MiB, of which intermediates {r['intermediate_bytes'] / 2**20:8.1f} MiB")
    print(f"  (both hold output + upstream gradient + dense table gradient = {lean['floor_bytes'] / 2**20:.1f} MiB)")
    print(f"  throughput lean/naive = {ratios['throughput_ratio']:.2f}x (goal >= 3)")
    print(f"  peak memory lean/naive = {ratios['peak_memory_ratio']:.3f} (goal <= 0.25); "
          f"intermediates only = {ratios['intermediate_memory_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
