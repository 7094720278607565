"""``eoplugins sweep``: run (or resume) a benchmark sweep through ``terratorch fit``/``test``, render its leaderboard.

Examples::

    eoplugins sweep benchmarks/sweeps/smoke.yaml                        # run/resume -> runs/sweeps/smoke/results/
    eoplugins sweep benchmarks/sweeps/smoke.yaml --list                 # the runs, nothing executed
    eoplugins sweep benchmarks/sweeps/smoke.yaml --only 'micro_unet.*'  # a subset (regex on run ids)
    eoplugins sweep benchmarks/sweeps/full.yaml --trainer configs/trainer/gpu.yaml
    eoplugins sweep benchmarks/sweeps/full.yaml --trainer configs/trainer/cpu_ddp.yaml          # 2 CPU processes
    eoplugins sweep benchmarks/sweeps/full.yaml --trainer configs/trainer/gpu.yaml -- --trainer.devices=4 \
        --trainer.strategy=ddp                                         # anything after -- goes to every call
    eoplugins sweep benchmarks/sweeps/full.yaml --engine ray --gpus-per-run 1       # one Ray task per run, local
    eoplugins sweep benchmarks/sweeps/full.yaml --engine ray --address HEAD:6379 --gpus-per-run 1 --retries 2
    eoplugins sweep benchmarks/sweeps/smoke.yaml --no-mlflow            # no MLflow store <runs-dir>/<sweep>/mlruns
    eoplugins sweep benchmarks/sweeps/smoke.yaml --mlflow-uri http://mlflow:5000      # a tracking server
    eoplugins sweep benchmarks/sweeps/smoke.yaml --export-iterate micro_unet__pastis__full__lf100__s0 it.yaml
    eoplugins sweep benchmarks/sweeps/full.yaml --shard 0/3 --results-dir /shared/results   # machine 0 of 3
    eoplugins sweep benchmarks/sweeps/smoke.yaml --results-dir benchmarks/results   # add to the committed results
    eoplugins sweep benchmarks/sweeps/smoke.yaml --render               # only re-render the leaderboard
    eoplugins sweep benchmarks/sweeps/full.yaml --count-params          # CSV run_id,tunable,total; no training

Engines: ``--engine local`` (default) runs one run after the other on this machine; ``--engine ray`` makes every
run (and every shared pretraining, which its runs wait for) a Ray task requesting ``--cpus-per-run`` /
``--gpus-per-run``, on a local Ray instance or the cluster at ``--address`` (``pip install
"terratorch-eoplugins[ray]"``; every node must see the same paths). Both record the same rows and resume the same
way; ``--retries N`` runs a run that fails again up to N times in this invocation (every attempt leaves a row).
``--shard I/N`` is kept, for the local engine only, as a thin way to split the pending runs over N machines
without Ray (every N-th pending run); with Ray, one driver and ``--address`` replace it.

Tracking: when the MLflow client is installed (``[mlflow]``; ``--mlflow`` insists, ``--no-mlflow`` turns it off),
every invocation that runs or renders logs one MLflow run per sweep run (params, metrics, parameter counts, timings,
``run.yaml`` and the composed config as artifacts) under a parent run holding the leaderboard files, in the local
file store ``<runs-dir>/<sweep>/mlruns`` (``--mlflow-uri URI``: another store or a server).
``--export-iterate RUN_ID OUT.yaml`` writes that run's composed config in terratorch-iterate's format.

Outputs: ``<results-dir>/<sweep>.{csv,md,png}``; ``--results-dir`` defaults to a folder of this sweep's runs
(``<runs-dir>/<sweep>/results``), so the committed ``benchmarks/results`` is read (runs it records are skipped) and
written only when named. The sweep appends only to a results CSV it wrote and replaces only a leaderboard / plot it
wrote (anything else of that name makes it stop before running). The ``Produced by`` line of the leaderboard is
rewritten only by an invocation that produced rows (``--render`` and re-runs with nothing to do keep it).

Exit status: 0 when every selected run is finished ``ok``; 1 when a run of this invocation failed (or a selected
run is recorded as failed and was not retried); 2 for a usage error: ``--only`` matching no run, a ``--world`` that
is not a folder, an output path holding a file the sweep did not write, Ray / MLflow that cannot start, an
unknown ``--export-iterate`` run. ``--count-params`` exits 1 when a model
could not be built.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import sys
from collections.abc import Sequence

from terratorch_eoplugins.benchmark.compose import ComposeError, write_iterate_config
from terratorch_eoplugins.benchmark.engine import ENGINES, EngineError, run_ray
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


def _export_iterate(runner: SweepRunner, sweep: Sweep, run_id: str, out: str, storage_uri: str | None) -> int:
    run = next((r for r in sweep.runs if r.run_id == run_id), None)
    if run is None:
        close = [r.run_id for r in sweep.runs if run_id.split("__")[0] in r.run_id][:3] or \
            [r.run_id for r in sweep.runs[:3]]
        return _fail(f"--export-iterate {run_id!r}: no such run in {sweep.path} (e.g. {', '.join(close)}); see --list")
    try:
        path = write_iterate_config(runner, run, out, storage_uri=storage_uri)
    except ComposeError as err:
        return _fail(f"--export-iterate: {err}")
    print(f"terratorch-iterate config: {path}")
    return 0


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
    p.add_argument("--shard", type=_shard, default=None,
                   help="I/N: run every N-th pending run starting at I (local engine only; kept for several machines "
                        "without Ray)")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: one run after the other here (default); ray: one Ray task per run")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else a new local Ray instance)")
    p.add_argument("--cpus-per-run", type=float, default=None, help="CPUs each Ray task requests (default: 1)")
    p.add_argument("--gpus-per-run", type=float, default=None, help="GPUs each Ray task requests (default: 0)")
    p.add_argument("--retries", type=int, default=0,
                   help="run a run that fails again up to N times in this invocation (default: 0)")
    p.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=None,
                   help="track the sweep in MLflow, store <runs-dir>/<sweep>/mlruns (default: on when the MLflow "
                        "client is installed; --no-mlflow: off)")
    p.add_argument("--mlflow-uri", default=None, help="MLflow tracking URI or folder (implies --mlflow)")
    p.add_argument("--export-iterate", nargs=2, metavar=("RUN_ID", "OUT_YAML"), default=None,
                   help="write the run's composed config in terratorch-iterate's format and exit")
    p.add_argument("--list", action="store_true", help="print the runs and exit")
    p.add_argument("--count-params", action="store_true",
                   help="build every selected run's model offline (no data, no training) and print the CSV "
                        "run_id,tunable,total on stdout")
    p.add_argument("--render", action="store_true", help="only render the leaderboard from the CSV")
    p.add_argument("--show", action="store_true", help="also print the leaderboard (Markdown) at the end")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs recorded as failed")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep fine-tuning checkpoints after the test")
    p.add_argument("--timeout", type=float, default=None, help="seconds per terratorch subprocess")
    a = p.parse_args(argv)
    if a.engine != "ray":
        given = [f for f, v in (("--address", a.address), ("--cpus-per-run", a.cpus_per_run),
                                ("--gpus-per-run", a.gpus_per_run)) if v is not None]
        if given:
            return _fail(f"{', '.join(given)}: only with --engine ray")
    elif a.shard is not None:
        return _fail("--shard: only with --engine local (with Ray, one driver schedules every run; use --address)")
    if a.retries < 0:
        return _fail(f"--retries {a.retries}: expected a number >= 0")

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
    if a.export_iterate is not None:
        return _export_iterate(runner, sweep, *a.export_iterate, storage_uri=a.mlflow_uri)

    out_md, out_png = runner.csv_path.with_suffix(".md"), runner.csv_path.with_suffix(".png")
    try:  # before anything runs: never append to, or replace, a file the sweep did not write
        check_results_csv(runner.csv_path)
    except SweepOutputError as err:
        return _fail(str(err))
    for path, ours in ((out_md, is_sweep_markdown(out_md)), (out_png, is_sweep_plot(out_png, out_md))):
        if path.exists() and not ours:
            return _fail(f"{path}: exists and was not written by `eoplugins sweep` (no leaderboard marker); "
                         "refusing to replace it: move it away or choose another --results-dir")

    todo = runner.pending(runs) if not a.render else []
    if todo:
        world = runner.repo / runner.world
        if not world.is_dir():
            flag = "--world" if a.world is not None else f"the sweep's world ({sweep.path})"
            return _fail(f"{flag} {runner.world!r} is not a folder (looked for {world}); write it with "
                         f"`eoplugins synth --out {runner.world} --size demo` or pass --world DIR")
    tracker = None
    if a.mlflow is False and a.mlflow_uri:
        return _fail("--no-mlflow with --mlflow-uri: choose one")
    track = a.mlflow or bool(a.mlflow_uri)
    if a.mlflow is None and not a.mlflow_uri:  # default: track when the client is installed, say so when not
        track = importlib.util.find_spec("mlflow") is not None
        if not track:
            print('MLflow: not installed, this sweep is not tracked (pip install "terratorch-eoplugins[mlflow]"; '
                  "--no-mlflow silences this line)")
    if track:
        from terratorch_eoplugins.benchmark.tracking import SweepTracker, TrackingError

        try:
            tracker = SweepTracker(runner, uri=a.mlflow_uri, tags={"engine": a.engine})
        except TrackingError as err:
            return _fail(str(err))
        print(f"MLflow: experiment {tracker.experiment_name!r} at {tracker.uri}")
    on_row = tracker.on_row if tracker is not None else None

    produced: list[dict] = []
    if not a.render:
        if a.shard is not None:
            i, n = a.shard
            todo = todo[i::n]
        if a.engine == "ray":
            try:
                produced = run_ray(runner, todo, address=a.address, retries=a.retries, on_row=on_row,
                                   cpus_per_run=1.0 if a.cpus_per_run is None else a.cpus_per_run,
                                   gpus_per_run=0.0 if a.gpus_per_run is None else a.gpus_per_run)
            except EngineError as err:
                if tracker is not None:
                    tracker.finish([], failed=True)
                return _fail(str(err))
        else:
            produced = runner.run(todo, retries=a.retries, on_row=on_row)
    if not runner.csv_path.is_file():
        print(f"no results yet: {runner.csv_path}")
        if tracker is not None:
            tracker.finish([], failed=True)
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
    if a.show:
        print(md)
    print(f"results: {runner.csv_path}\nleaderboard: {out_md}" + (f"\nplot: {png}" if png else ""))
    if tracker is not None:
        selected = {r.run_id for r in runs}
        latest_all = latest_rows(runner.csv_path)
        tracker.sync(row for rid, row in latest_all.items() if rid in selected)
        tracker.finish([runner.csv_path, out_md, out_png],
                       failed=any(latest_all.get(rid, {}).get("status", "ok") != "ok" for rid in selected))
    if a.render:
        return 0
    last = {r["run_id"]: r for r in produced}  # a run retried in this invocation: its last attempt counts
    failed = sorted(rid for rid, r in last.items() if r.get("status") != "ok")
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
