"""``eoplugins sweep``: run (or resume) a benchmark sweep through ``terratorch fit``/``test`` and render its leaderboard.

Examples::

    eoplugins sweep benchmarks/sweeps/smoke.yaml                        # run/resume, then write .csv/.md/.png
    eoplugins sweep benchmarks/sweeps/smoke.yaml --list                 # the runs, nothing executed
    eoplugins sweep benchmarks/sweeps/smoke.yaml --only 'micro_unet.*'  # a subset (regex on run ids)
    eoplugins sweep benchmarks/sweeps/full.yaml --trainer configs/trainer/gpu.yaml
    eoplugins sweep benchmarks/sweeps/full.yaml --trainer configs/trainer/cpu_ddp.yaml          # 2 CPU processes
    eoplugins sweep benchmarks/sweeps/full.yaml --trainer configs/trainer/gpu.yaml -- --trainer.devices=4 \
        --trainer.strategy=ddp                                         # anything after -- goes to every call
    eoplugins sweep benchmarks/sweeps/full.yaml --shard 0/3             # machine 0 of 3, shared results folder
    eoplugins sweep benchmarks/sweeps/smoke.yaml --render               # only re-render the leaderboard
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from terratorch_eoplugins.benchmark.leaderboard import render_markdown, render_plot
from terratorch_eoplugins.benchmark.runner import SweepRunner
from terratorch_eoplugins.benchmark.spec import load_sweep


def _shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or int(m[1]) >= int(m[2]):
        raise argparse.ArgumentTypeError(f"--shard expects I/N with 0 <= I < N, got {text!r}")
    return int(m[1]), int(m[2])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="eoplugins sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep definition (benchmarks/sweeps/*.yaml)")
    p.add_argument("--repo", default=".", help="folder the config pieces are relative to (default: .)")
    p.add_argument("--trainer", default=None, help="trainer piece replacing the sweep's (scale: gpu, cpu_ddp, ...)")
    p.add_argument("--world", default=None, help="data world replacing the pieces' data/demo/ roots")
    p.add_argument("--runs-dir", default="runs/sweeps", help="per-run folders (default: runs/sweeps)")
    p.add_argument("--results-dir", default="benchmarks/results", help="CSV/MD/PNG output (default: benchmarks/results)")
    p.add_argument("--only", default=None, help="regex: run only matching run ids")
    p.add_argument("--shard", type=_shard, default=None, help="I/N: run every N-th pending run starting at I")
    p.add_argument("--list", action="store_true", help="print the runs and exit")
    p.add_argument("--render", action="store_true", help="only render the leaderboard from the CSV")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs recorded as failed")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep fine-tuning checkpoints after the test")
    p.add_argument("--timeout", type=float, default=None, help="seconds per terratorch subprocess")
    a = p.parse_args(argv)

    sweep = load_sweep(a.sweep, repo=a.repo, trainer=a.trainer)
    runner = SweepRunner(sweep, repo=a.repo, runs_dir=a.runs_dir, results_dir=a.results_dir, world=a.world,
                         extra=extra, keep_checkpoints=a.keep_checkpoints, retry_failed=a.retry_failed,
                         timeout=a.timeout)
    runs = [r for r in sweep.runs if a.only is None or re.search(a.only, r.run_id)]
    for s in sweep.skipped:
        print(f"skipped (optional, config missing): {s}")
    if a.list:
        pending = {r.run_id for r in runner.pending(runs)}
        for r in runs:
            print(f"{'todo' if r.run_id in pending else 'done'}  {r.run_id}")
        return 0
    if not a.render:
        todo = runner.pending(runs)
        if a.shard is not None:
            i, n = a.shard
            todo = todo[i::n]
        runner.run(todo)
    if not runner.csv_path.is_file():
        print(f"no results yet: {runner.csv_path}")
        return 1
    cmd = "eoplugins sweep " + " ".join(shlex.quote(x) for x in [a.sweep, *argv[1:]] + (["--", *extra] if extra else []))
    md = render_markdown(runner.csv_path, title=f"Leaderboard: {sweep.name}", command=cmd,
                         order=[m["name"] for m in sweep.raw["models"]], run_ids={r.run_id for r in sweep.runs})
    notes = sweep.raw.get("notes") or []
    if notes:
        md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    if sweep.skipped:
        md += "\nNot in this sweep (configs not present when it ran): " + "; ".join(sweep.skipped) + "\n"
    out_md = runner.csv_path.with_suffix(".md")
    out_md.write_text(md)
    png = render_plot(runner.csv_path, runner.csv_path.with_suffix(".png"), run_ids={r.run_id for r in sweep.runs})
    print(f"results: {runner.csv_path}\nleaderboard: {out_md}" + (f"\nplot: {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
