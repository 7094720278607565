"""``eoplugins sweep FILE --count-params``: every run's parameter counts without training.

Each run's model is built offline, in this process, exactly as ``terratorch fit`` would build it from the run's
composed config (the same ``-c`` file and overrides the sweep passes, through terratorch's own
``build_lightning_cli(run=False)``), then ``configure_model()`` is called (the hook where some tasks build or
freeze parts) and the parameters are counted as the sweep's :class:`~terratorch_eoplugins.benchmark.callbacks.
BenchmarkStats` counts them during a real run: tunable = ``requires_grad``. No data is read, no checkpoint or
logger folder is written (the composed configs go to a temporary folder) and pretraining stages are not run: a
run that fine-tunes a pretrained plugin model is built with a randomly initialised backbone of the same
architecture, which has the same parameter counts. The folds of a run (``folds:``) differ only in their data:
their model is built once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from terratorch_eoplugins.benchmark.callbacks import count_parameters
from terratorch_eoplugins.benchmark.runner import SweepRunner
from terratorch_eoplugins.benchmark.spec import RunSpec, Sweep

__all__ = ["ParamCount", "count_run_parameters", "count_sweep_parameters"]


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of one run's model (``error`` set, counts ``None`` when it could not be built)."""

    run_id: str
    tunable: int | None
    total: int | None
    error: str = ""

    def csv_line(self) -> str:
        """``run_id,tunable,total`` (empty counts for a failed build)."""
        fmt = ("" if v is None else str(v) for v in (self.tunable, self.total))
        return ",".join([self.run_id, *fmt])


def count_run_parameters(runner: SweepRunner, run: RunSpec) -> ParamCount:
    """Build ``run``'s LightningModule from its composed config and count its parameters."""
    from terratorch.cli_tools import build_lightning_cli

    args = [*runner.run_args(run), "--trainer.logger=false", "--trainer.callbacks=[]",
            f"--trainer.default_root_dir={runner.runs_dir}"]
    try:
        # Lightning and terratorch print banners and tips on stdout: keep stdout for the CSV
        with contextlib.redirect_stdout(sys.stderr):
            cli = build_lightning_cli(args, run=False)
            model = cli.model
            model.configure_model()
        total, tunable = count_parameters(model)
    except (Exception, SystemExit) as err:  # jsonargparse reports a bad config by SystemExit
        return ParamCount(run.run_id, None, None, f"{type(err).__name__}: {err}")
    finally:
        cli = model = None
        gc.collect()
    return ParamCount(run.run_id, tunable, total)


def count_sweep_parameters(sweep: Sweep, runs: Iterable[RunSpec], repo: str = ".", world: str | None = None,
                           extra: Iterable[str] = (),
                           emit: Callable[[ParamCount], None] | None = None) -> list[ParamCount]:
    """:func:`count_run_parameters` for each of ``runs``; ``emit`` is called with each result as it comes."""
    out: list[ParamCount] = []
    with tempfile.TemporaryDirectory(prefix="eoplugins-count-params-") as tmp:
        runner = SweepRunner(sweep, repo=repo, runs_dir=tmp, results_dir=tmp, world=world, extra=extra,
                             log=lambda _msg: None)
        built: dict[str, ParamCount] = {}  # the folds of a run share its model: built once
        for run in runs:
            key = dataclasses.replace(run, fold=None).run_id
            if key in built:
                res = dataclasses.replace(built[key], run_id=run.run_id)
            else:
                res = built[key] = count_run_parameters(runner, run)
            out.append(res)
            if emit is not None:
                emit(res)
    return out
