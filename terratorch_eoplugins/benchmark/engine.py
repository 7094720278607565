"""Where a sweep's runs execute: ``--engine local`` (default) or ``--engine ray``.

``local`` is :meth:`SweepRunner.run <terratorch_eoplugins.benchmark.runner.SweepRunner.run>`: one run after the
other in this process's machine. ``ray`` (:func:`run_ray`, ``pip install "terratorch-eoplugins[ray]"``) makes each
run a Ray task requesting ``--cpus-per-run`` / ``--gpus-per-run`` and each pretraining stage (one per
``pretrain_id``, shared by the runs that name it) a task of its own that those runs' tasks depend on, on a local
Ray instance (default) or the cluster at ``--address``. A task executes exactly what the local engine executes
(:meth:`SweepRunner.execute_recorded`): the same run folders, the same markers, a row appended to the results CSV
by the task itself (under the CSV's lock), so resuming is the same whatever the engine: runs with a row are
skipped, unfinished fits continue from ``last.ckpt``, a finished pretraining is reused. On a cluster every node
must see the repository, the world, the runs folder and the results folder at the same paths (a shared file
system) and have the package installed.

A run whose row says ``failed``, or whose task died (worker crash, node lost: recorded by the driver as a
``failed`` row with error ``runner: ray: ...``), is submitted again up to ``retries`` times; a retry of a run
whose pretraining failed submits the pretraining again first (once for all the runs sharing it). Ray's own task
retries are off: every attempt leaves a row. Interrupting the driver (Ctrl-C) cancels the tasks; a cancelled
task kills its ``terratorch`` process group and records nothing, so the next invocation resumes it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from terratorch_eoplugins.benchmark.runner import SweepRunner, row_message
from terratorch_eoplugins.benchmark.spec import RunSpec

ENGINES = ("local", "ray")
RAY_HINT = 'the Ray engine needs Ray: pip install "terratorch-eoplugins[ray]" (or pip install ray)'
#: a task waits for its subprocesses by polling with this timeout when the sweep sets none: the polling wait is
#: interruptible, so cancelling the task (Ctrl-C in the driver) kills the subprocess at once instead of after it
_POLL_FOREVER = 10 * 365 * 86400.0


class EngineError(RuntimeError):
    """The engine cannot run the sweep (Ray missing, a resource request no node can meet); the message says why."""


def import_ray() -> Any:
    """The ``ray`` module, or :class:`EngineError` naming the extra to install."""
    try:
        import ray
    except ImportError as err:
        raise EngineError(RAY_HINT) from err
    return ray


def _quiet(_msg: str) -> None:
    """Progress printer of the runner copies inside tasks: the driver prints each row when it arrives."""


def _task_runner(runner: SweepRunner, gpus: float) -> SweepRunner:
    """The runner as a task uses it: the GPUs and CPU threads Ray gave the task, an interruptible wait."""
    r = copy.copy(runner)
    r.env = dict(runner.env)
    if gpus > 0 and "CUDA_VISIBLE_DEVICES" in os.environ:  # set by Ray to the task's GPUs
        r.env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    if "OMP_NUM_THREADS" not in r.env and "OMP_NUM_THREADS" in os.environ:  # Ray: the task's CPU count
        r.env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
    if r.timeout is None:
        r.timeout = _POLL_FOREVER
    return r


def _pretrain_task(runner: SweepRunner, run: RunSpec, gpus: float) -> tuple[Path | None, float, str]:
    """Ray task: run (or reuse) ``run``'s pretraining stage; ``(ckpt, seconds, error)``."""
    try:
        return _task_runner(runner, gpus)._pretrain(run)
    except Exception as e:  # noqa: BLE001 - reported to every fine-tuning run of the stage, as the local engine does
        return None, 0.0, f"pretrain: runner: {type(e).__name__}: {e}"


def _run_task(runner: SweepRunner, run: RunSpec, gpus: float,
              pretrained: tuple[Path | None, float, str] | None) -> dict:
    """Ray task: fit and test one run (its pretraining already done when it has one); the recorded row."""
    return _task_runner(runner, gpus).execute_recorded(run, pretrained)


def _check_resources(ray: Any, cpus: float, gpus: float, address: str | None, log: Callable[[str], None]) -> None:
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        return
    have = "; ".join(f"{n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for n in nodes) or "no node"
    msg = (f"--cpus-per-run {cpus:g} --gpus-per-run {gpus:g}: no node of the Ray "
           f"{'cluster at ' + address if address else 'local instance'} has that much ({have})")
    if address is None:
        raise EngineError(msg)
    log(f"warning: {msg}; the tasks wait until the cluster scales up")


class _RaySweep:
    """The driver's bookkeeping: tasks in flight, pretraining tasks by ``pretrain_id``, attempts per run."""

    def __init__(self, ray: Any, runner: SweepRunner, cpus: float, gpus: float, retries: int,
                 on_row: Callable[[dict], None] | None) -> None:
        self.ray, self.runner, self.gpus, self.retries, self.on_row = ray, runner, gpus, retries, on_row
        shipped = copy.copy(runner)
        shipped.log = _quiet
        self.runner_ref = ray.put(shipped)
        opts = {"num_cpus": cpus, "num_gpus": gpus, "max_retries": 0}
        self.run_fn = ray.remote(**opts)(_run_task)
        self.pre_fn = ray.remote(**opts)(_pretrain_task)
        self.pre_refs: dict[str, Any] = {}
        self.inflight: dict[Any, tuple[RunSpec, Any]] = {}
        self.attempts: dict[str, int] = {}

    def submit(self, run: RunSpec) -> None:
        pre = None
        if run.pretrain is not None:
            pre = self.pre_refs.get(run.pretrain_id)
            if pre is None:
                pre = self.pre_fn.options(name=f"pretrain {run.pretrain_id}").remote(self.runner_ref, run, self.gpus)
                self.pre_refs[run.pretrain_id] = pre
        ref = self.run_fn.options(name=run.run_id).remote(self.runner_ref, run, self.gpus, pre)
        self.inflight[ref] = (run, pre)
        self.attempts[run.run_id] = self.attempts.get(run.run_id, 0) + 1

    def _pretrain_failed(self, pre: Any) -> bool:
        try:
            return bool(self.ray.get(pre)[2])
        except self.ray.exceptions.RayError:
            return True

    def run(self, todo: list[RunSpec]) -> list[dict]:
        ray, rows = self.ray, []
        for r in todo:
            self.submit(r)
        try:
            while self.inflight:
                ready, _ = ray.wait(list(self.inflight), num_returns=1)
                run, pre = self.inflight.pop(ready[0])
                try:
                    row = ray.get(ready[0])
                    self.runner.log(row_message(row, self.runner.runs_dir / run.run_id))
                except ray.exceptions.RayError as e:  # the task died (worker crash, node lost, failed dependency)
                    text = str(e).strip().splitlines()
                    row = self.runner.record_failure(run, f"runner: ray: {type(e).__name__}: "
                                                          f"{text[-1] if text else ''}"[:1200])
                rows.append(row)
                if self.on_row is not None:
                    self.on_row(row)
                n = self.attempts[run.run_id]
                if row.get("status") != "ok" and n <= self.retries:
                    if pre is not None and self.pre_refs.get(run.pretrain_id) is pre and self._pretrain_failed(pre):
                        del self.pre_refs[run.pretrain_id]  # the retry runs the pretraining again (once per stage)
                    self.runner.log(f"retry {n}/{self.retries}: {run.run_id}")
                    self.submit(run)
        except BaseException:
            # Ctrl-C / an error in the driver: cancel everything (a running task's terratorch process group is
            # killed, nothing is recorded for it) and wait for the cancellations so no training goes on unseen
            refs = [*self.inflight, *self.pre_refs.values()]
            for ref in refs:
                ray.cancel(ref)
            ray.wait(refs, num_returns=len(refs), timeout=60)
            raise
        return rows


def run_ray(runner: SweepRunner, runs: Iterable[RunSpec] | None = None, address: str | None = None,
            cpus_per_run: float = 1.0, gpus_per_run: float = 0.0, retries: int = 0,
            on_row: Callable[[dict], None] | None = None, init_kwargs: dict | None = None) -> list[dict]:
    """Execute the pending runs of ``runs`` (default: the sweep's) as Ray tasks; the rows recorded, in order.

    Args:
        runner: the sweep's runner (the same one the local engine uses).
        runs: runs to consider; those with a final row are skipped (:meth:`SweepRunner.pending`).
        address: the Ray cluster to connect to; ``None``: ``$RAY_ADDRESS`` if set, else a new local instance.
            A Ray already initialised in this process (e.g. by a test) is used as it is, and left running.
        cpus_per_run: CPUs each run's (and each pretraining's) task requests.
        gpus_per_run: GPUs each task requests (Ray sets the subprocesses' ``CUDA_VISIBLE_DEVICES``).
        retries: submit a failed run again up to this many times in this call.
        on_row: called in the driver with every row as it arrives (MLflow tracking).
        init_kwargs: more ``ray.init`` arguments (e.g. ``num_cpus`` of a local instance).
    """
    if cpus_per_run < 0 or gpus_per_run < 0 or cpus_per_run + gpus_per_run <= 0:
        raise EngineError(f"--cpus-per-run {cpus_per_run:g} --gpus-per-run {gpus_per_run:g}: expected numbers >= 0, "
                          "not both 0")
    ray = import_ray()
    todo = runner.pending(runs)
    runner.log(f"sweep {runner.sweep.name}: {len(todo)} run(s) to do on Ray ({cpus_per_run:g} CPU, "
               f"{gpus_per_run:g} GPU per run) -> {runner.csv_path}")
    if not todo:
        return []
    own = not ray.is_initialized()
    if own:
        kwargs = {"log_to_driver": False, **(init_kwargs or {})}
        if address is None and not os.environ.get("RAY_ADDRESS"):
            kwargs.setdefault("include_dashboard", False)
        ray.init(address=address, **kwargs)
    try:
        _check_resources(ray, cpus_per_run, gpus_per_run, address, runner.log)
        return _RaySweep(ray, runner, cpus_per_run, gpus_per_run, retries, on_row).run(todo)
    finally:
        if own:
            ray.shutdown()
