"""``eoplugins sweep``: run (or resume) a benchmark sweep through ``terratorch fit``/``test``, render its leaderboard.

Examples::

    eoplugins sweep benchmarks/sweeps/smoke.yaml                        # run/resume -> runs/sweeps/smoke/results/
    eoplugins sweep benchmarks/sweeps/smoke.yaml --list                 # the runs, nothing executed
    eoplugins sweep benchmarks/sweeps/smoke.yaml --only 'micro_unet.*'  # a subset (regex on run ids)
    eoplugins sweep benchmarks/sweeps/full.yaml --trainer configs/trainer/gpu.yaml
    eoplugins sweep benchmarks/sweeps/full.yaml --trainer configs/trainer/cpu_ddp.yaml          # 2 CPU processes
    eoplugins sweep benchmarks/sweeps/full.yaml --trainer configs/trainer/gpu.yaml -- --trainer.devices=4 \
        --trainer.strategy=ddp                                         # anything after -- goes to every call
    eoplugins sweep benchmarks/sweeps/full.yaml --shard 0/3 --results-dir /shared/results   # machine 0 of 3
    eoplugins sweep benchmarks/sweeps/smoke.yaml --results-dir benchmarks/results   # add to the committed results
    eoplugins sweep benchmarks/sweeps/smoke.yaml --render               # only re-render the leaderboard
    eoplugins sweep benchmarks/sweeps/full.yaml --count-params          # CSV run_id,tunable,total; no training

Outputs: ``<results-dir>/<sweep>.{csv,md,png}``; ``--results-dir`` defaults to a folder of this sweep's runs
(``<runs-dir>/<sweep>/results``), so the committed ``benchmarks/results`` is read (runs it records are skipped) and
written only when named. The sweep appends only to a results CSV it wrote and replaces only a leaderboard / plot it
wrote (anything else of that name makes it stop before running). The ``Produced by`` line of the leaderboard is
rewritten only by an invocation that produced rows (``--render`` and re-runs with nothing to do keep it).

Exit status: 0 when every selected run is finished ``ok``; 1 when a run of this invocation failed (or a selected
run is recorded as failed and was not retried); 2 for a usage error: ``--only`` matching no run, a ``--world`` that
is not a folder, an output path holding a file the sweep did not write. ``--count-params`` exits 1 when a model
could not be built.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence

from terratorch_eoplugins.benchmark.leaderboard import (
    is_sweep_markdown,
    is_sweep_plot,
    produced_by_line,
    render_markdown,
    render_plot,
)
from terratorch_eoplugins.benchmark.params import ParamCount, count_sweep_parameters
from terratorch_eoplugins.benchmark.runner import SweepOutputError, SweepRunner, check_results_csv, latest_rows
from terratorch_eoplugins.benchmark.spec import RunSpec, Sweep, load_sweep


def _shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or int(m[1]) >= int(m[2]):
        raise argparse.ArgumentTypeError(f"--shard expects I/N with 0 <= I < N, got {text!r}")
    return int(m[1]), int(m[2])


def _fail(msg: str) -> int:
    print(f"eoplugins sweep: error: {msg}", file=sys.stderr)
    return 2


def _count_params(sweep: Sweep, runs: list[RunSpec], repo: str, world: str | None, extra: list[str]) -> int:
    print("run_id,tunable,total", flush=True)

    def emit(res: ParamCount) -> None:
        print(res.csv_line(), flush=True)
        if res.error:
            print(f"eoplugins sweep: {res.run_id}: model not built: {res.error}", file=sys.stderr, flush=True)

    results = count_sweep_parameters(sweep, runs, repo=repo, world=world, extra=extra, emit=emit)
    return 1 if any(r.error for r in results) else 0


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
    p.add_argument("--results-dir", default=None,
                   help="CSV/MD/PNG output (default: <runs-dir>/<sweep>/results; give benchmarks/results to read "
                        "and extend the committed results)")
    p.add_argument("--only", default=None, help="regex: run only matching run ids")
    p.add_argument("--shard", type=_shard, default=None, help="I/N: run every N-th pending run starting at I")
    p.add_argument("--list", action="store_true", help="print the runs and exit")
    p.add_argument("--count-params", action="store_true",
                   help="build every selected run's model offline (no data, no training) and print the CSV "
                        "run_id,tunable,total on stdout")
    p.add_argument("--render", action="store_true", help="only render the leaderboard from the CSV")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs recorded as failed")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep fine-tuning checkpoints after the test")
    p.add_argument("--timeout", type=float, default=None, help="seconds per terratorch subprocess")
    a = p.parse_args(argv)

    sweep = load_sweep(a.sweep, repo=a.repo, trainer=a.trainer)
    runner = SweepRunner(sweep, repo=a.repo, runs_dir=a.runs_dir, results_dir=a.results_dir, world=a.world,
                         extra=extra, keep_checkpoints=a.keep_checkpoints, retry_failed=a.retry_failed,
                         timeout=a.timeout)
    try:
        only = re.compile(a.only) if a.only is not None else None
    except re.error as err:
        return _fail(f"--only {a.only!r} is not a regular expression ({err})")
    runs = [r for r in sweep.runs if only is None or only.search(r.run_id)]
    if not runs:
        return _fail(f"--only {a.only!r} matches none of the {len(sweep.runs)} run ids of {a.sweep} "
                     f"(e.g. {sweep.runs[0].run_id if sweep.runs else 'none'}); see --list")
    for s in sweep.skipped:
        print(f"skipped (optional, config missing): {s}")
    if a.list:
        pending = {r.run_id for r in runner.pending(runs)}
        for r in runs:
            print(f"{'todo' if r.run_id in pending else 'done'}  {r.run_id}")
        return 0
    if a.count_params:
        return _count_params(sweep, runs, a.repo, a.world, extra)

    out_md, out_png = runner.csv_path.with_suffix(".md"), runner.csv_path.with_suffix(".png")
    try:  # before anything runs: never append to, or replace, a file the sweep did not write
        check_results_csv(runner.csv_path)
    except SweepOutputError as err:
        return _fail(str(err))
    for path, ours in ((out_md, is_sweep_markdown(out_md)), (out_png, is_sweep_plot(out_png, out_md))):
        if path.exists() and not ours:
            return _fail(f"{path}: exists and was not written by `eoplugins sweep` (no leaderboard marker); "
                         "refusing to replace it: move it away or choose another --results-dir")

    produced: list[dict] = []
    if not a.render:
        todo = runner.pending(runs)
        if todo:
            world = runner.repo / runner.world
            if not world.is_dir():
                flag = "--world" if a.world is not None else f"the sweep's world ({sweep.path})"
                return _fail(f"{flag} {runner.world!r} is not a folder (looked for {world}); write it with "
                             f"`eoplugins synth --out {runner.world} --size demo` or pass --world DIR")
        if a.shard is not None:
            i, n = a.shard
            todo = todo[i::n]
        produced = runner.run(todo)
    if not runner.csv_path.is_file():
        print(f"no results yet: {runner.csv_path}")
        return 1
    shown = [a.sweep, *argv[1:]] + (["--", *extra] if extra else [])
    cmd = "eoplugins sweep " + " ".join(shlex.quote(x) for x in shown)
    # the "Produced by" line names the command that produced rows; a re-render keeps the previous one (hand edits too)
    previous = produced_by_line(out_md) if out_md.is_file() and not produced else None
    md = render_markdown(runner.csv_path, title=f"Leaderboard: {sweep.name}", command=cmd if produced else None,
                         order=[m["name"] for m in sweep.raw["models"]], run_ids={r.run_id for r in sweep.runs},
                         produced_by=previous)
    notes = sweep.raw.get("notes") or []
    if notes:
        md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    if sweep.skipped:
        md += "\nNot in this sweep (configs not present when it ran): " + "; ".join(sweep.skipped) + "\n"
    out_md.write_text(md)
    png = render_plot(runner.csv_path, out_png, run_ids={r.run_id for r in sweep.runs})
    print(f"results: {runner.csv_path}\nleaderboard: {out_md}" + (f"\nplot: {png}" if png else ""))
    if a.render:
        return 0
    failed = sorted({r["run_id"] for r in produced if r.get("status") != "ok"})
    if a.shard is None:  # runs recorded as failed earlier and not retried count too (no shard: all are ours)
        latest = latest_rows(runner.csv_path)
        failed = sorted(set(failed) | {r.run_id for r in runs if latest.get(r.run_id, {}).get("status", "ok") != "ok"})
    if failed:
        print(f"{len(failed)} run(s) failed: " + ", ".join(failed) + " (errors in the CSV and the leaderboard; "
              "--retry-failed runs them again)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
