"""Process-level runtime helpers shared by the CLI drivers and the numerics.

* **terratorch in a subprocess**: :func:`terratorch_command` finds the ``terratorch`` console script of this
  Python, :func:`run_process` / :func:`run_terratorch` run it (output to the console or to a log file, an optional
  time limit that kills the child's whole process group, wall time and peak RSS of exactly that child from
  ``os.wait4``), :func:`read_last_metrics` reads what its CSV logger wrote. The quickstart demo
  (:mod:`terratorch_eoplugins.analysis.demo`) and the benchmark sweeps
  (:mod:`terratorch_eoplugins.benchmark.runner`) both run terratorch through these, so there is one way to do it.
* **float32 matmul precision**: ``import terratorch`` calls ``torch.set_float32_matmul_precision("medium")``, after
  which float32 matrix products may run in bfloat16 (CPUs with AMX-BF16) or TF32 (CUDA). Code whose result depends
  on full float32 products (exact KNN retrieval, whitening and covariance in the self-supervised losses, ...) wraps
  them in :func:`exact_matmul`, which sets ``"highest"`` for the block only and restores the caller's setting
  (the legacy global and the per-backend ``fp32_precision`` values) afterwards.

* **progress of long steps**: :class:`Progress` reports a loop outside Lightning's progress bar (tokenizer
  training, reading a split to fit statistics or fill a database) as INFO lines with counts, elapsed time and ETA,
  and :func:`visible_info` shows them on stderr when nothing else displays the package's logs (``terratorch fit``).

* **checkpoint files**: :func:`read_checkpoint` loads with ``weights_only=True`` and turns torch's errors into
  messages naming the file (without torch's advice to unpickle anyway).

Inside this package this module imports only :mod:`terratorch_eoplugins.errors`; torch is imported lazily.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from terratorch_eoplugins.errors import require_file

__all__ = [
    "MATMUL_PRECISIONS", "ProcResult", "Progress", "TerratorchError", "exact_matmul", "float32_matmul_precision",
    "read_checkpoint", "read_last_metrics", "run_process", "run_terratorch", "terratorch_command", "visible_info",
]

#: the values ``torch.set_float32_matmul_precision`` accepts
MATMUL_PRECISIONS = ("highest", "high", "medium")


# ============================================================================================ precision
@contextlib.contextmanager
def float32_matmul_precision(precision: str = "highest") -> Iterator[None]:
    """Run the block with ``torch.set_float32_matmul_precision(precision)``, then restore the caller's setting.

    Restores the legacy global (``torch.get_float32_matmul_precision()``) and, where this torch has them, the
    per-backend ``torch.backends.{cuda,mkldnn}.matmul.fp32_precision`` values exactly as they were (a user may have
    set those directly). Usable as a decorator too. Only the forward computation inside the block is covered: a
    backward pass run later uses the precision in force at that time.
    """
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"precision must be one of {list(MATMUL_PRECISIONS)}, got {precision!r}")
    import torch

    candidates = (getattr(torch.backends.cuda, "matmul", None), getattr(torch.backends.mkldnn, "matmul", None))
    backends = [b for b in candidates if b is not None and hasattr(b, "fp32_precision")]
    previous = torch.get_float32_matmul_precision()
    saved = [b.fp32_precision for b in backends]
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
        for b, value in zip(backends, saved):
            if b.fp32_precision != value:
                b.fp32_precision = value


def exact_matmul() -> contextlib.AbstractContextManager[None]:
    """:func:`float32_matmul_precision` ``("highest")``: full float32 matrix products inside the block."""
    return float32_matmul_precision("highest")


# ============================================================================================ checkpoints
def read_checkpoint(path: str | Path, what: str, map_location: Any = "cpu") -> Mapping[str, Any]:
    """``torch.load(path, map_location, weights_only=True)`` with clear errors (never unpickles arbitrary objects):
    the one reader of checkpoint files of every model family and tokenizer.

    ``what`` names the expected checkpoint in the messages (e.g. ``"DUNIA"``). Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` for a file that is not a readable mapping (Lightning checkpoint or state dict).
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} checkpoint not found: {str(p)!r}")
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message advises weights_only=False, i.e. unpickling arbitrary objects, which is what we refuse:
        # keep only its diagnosis (the object it refused, or why the bytes are not a PyTorch file)
        found = re.search(r"(Unsupported global: .*?)(?:\. Please|$)|(Unsupported operand \d+)", str(err), re.M)
        detail = next((g for g in found.groups() if g), "") if found else ""
        detail = detail or "not a weights-only PyTorch file"
        raise ValueError(f"{p}: cannot be read as a PyTorch checkpoint holding only tensors and plain containers "
                         f"({detail}); checkpoints with other pickled objects are never loaded") from None
    except Exception as err:  # truncated, empty or non-PyTorch files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{p}: cannot be read as a PyTorch checkpoint ({first})") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{p}: expected a Lightning checkpoint or a state dict, got {type(obj).__name__}")
    return obj



# ============================================================================================ subprocesses
def terratorch_command(env: Mapping[str, str] | None = None) -> list[str]:
    """The ``terratorch`` console script next to this Python (then on ``PATH``); ``python -m terratorch`` otherwise."""
    path = str(Path(sys.executable).parent) + os.pathsep + (os.environ if env is None else env).get("PATH", "")
    exe = shutil.which("terratorch", path=path)
    return [exe] if exe else [sys.executable, "-m", "terratorch"]


@dataclass
class ProcResult:
    """Outcome of one child process."""

    returncode: int
    wall_s: float
    maxrss_mb: float
    #: the last 4000 characters of the log ("" when the output went to the console)
    tail: str
    timed_out: bool = False


class TerratorchError(subprocess.CalledProcessError):
    """A ``terratorch`` subprocess exited with a non-zero status; the message names the command and its log."""

    def __init__(self, returncode: int, cmd: Sequence[str], log: Path | None = None, tail: str = "",
                 timed_out: bool = False) -> None:
        super().__init__(returncode, list(cmd), output=tail)
        self.log, self.tail, self.timed_out = log, tail, timed_out

    def __str__(self) -> str:
        shown = " ".join(shlex.quote(str(c)) for c in self.cmd)
        why = "ran past its time limit and was killed" if self.timed_out else (
            f"was killed by signal {-self.returncode}" if self.returncode < 0 else
            f"exited with status {self.returncode}")
        msg = f"`{shown}` {why}"
        if self.log is not None:
            msg += f"; its output is in {self.log}"
        last = [ln for ln in self.tail.splitlines() if ln.strip()][-1:] if self.tail else []
        if last:
            msg += f" (last line: {last[0].strip()[:300]})"
        return msg


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (its own session: DDP workers and data loaders go with it)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_process(cmd: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
                log: str | Path | None = None, timeout: float | None = None) -> ProcResult:
    """Run ``cmd`` in its own session and wait for it; wall time and ``ru_maxrss`` of exactly this child.

    Args:
        cmd: the command line.
        env: its environment (default: this process's).
        cwd: its working directory (default: this process's).
        log: file receiving ``$ <cmd>`` then the child's stdout + stderr (created, truncated); ``None``: the
            child writes to this process's console.
        timeout: seconds after which the child's whole process group is killed (``timed_out`` is then set and a
            ``TIMEOUT`` line is appended to the log).

    If waiting is interrupted (Ctrl-C, an exception), the child's process group is killed before re-raising, so
    no training keeps running in the background.
    """
    cmd = [str(c) for c in cmd]
    env = dict(os.environ if env is None else env)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if log is not None:
            log = Path(log)
            log.parent.mkdir(parents=True, exist_ok=True)
            out = stack.enter_context(open(log, "w"))
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
        else:
            out = None
            sys.stdout.flush()
            sys.stderr.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out is not None else None, env=env,
                                cwd=cwd, start_new_session=True)
        timed_out = False
        try:
            if timeout is None:
                _, status, rusage = os.wait4(proc.pid, 0)
            else:
                deadline = t0 + timeout
                while True:
                    pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        break
                    if time.perf_counter() > deadline:
                        _kill_group(proc)
                        _, status, rusage = os.wait4(proc.pid, 0)
                        timed_out = True
                        if out is not None:
                            out.write(f"\nTIMEOUT: killed after {timeout:.0f} s\n")
                        break
                    time.sleep(0.2)
        except BaseException:
            _kill_group(proc)
            with contextlib.suppress(ChildProcessError):
                os.wait4(proc.pid, 0)
            proc.returncode = -signal.SIGKILL
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    tail = Path(log).read_text(errors="replace")[-4000:] if log is not None else ""
    return ProcResult(proc.returncode, wall, rusage.ru_maxrss / 1024.0, tail, timed_out)


def run_terratorch(args: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
                   log: str | Path | None = None, timeout: float | None = None, check: bool = False,
                   echo: bool = False) -> ProcResult:
    """``terratorch <args>`` through :func:`run_process`.

    ``echo`` prints ``$ terratorch <args>`` first; ``check`` raises :class:`TerratorchError` on a non-zero exit.
    """
    cmd = [*terratorch_command(env), *map(str, args)]
    if echo:
        print("$", " ".join(["terratorch", *map(str, args)]), flush=True)
    res = run_process(cmd, env=env, cwd=cwd, log=log, timeout=timeout)
    if check and res.returncode != 0:
        raise TerratorchError(res.returncode, ["terratorch", *map(str, args)], None if log is None else Path(log),
                              res.tail, res.timed_out)
    return res


def read_last_metrics(metrics_csv: str | Path) -> dict[str, float]:
    """Merge the rows of a Lightning ``CSVLogger`` ``metrics.csv``, later values winning (non-numbers skipped)."""
    path = require_file(metrics_csv, "terratorch CSV-logger metrics file",
                        hint="The terratorch run wrote no metrics there: check its output or log for the error.")
    out: dict[str, float] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if v not in ("", None):
                    try:
                        out[k] = float(v)
                    except ValueError:
                        pass
    return out


# ============================================================================================ progress
class Progress:
    """INFO lines for a long loop: ``<what>: <done>/<total> <unit> (<pct>), <elapsed> elapsed, ETA <eta>``.

    A line when the loop starts, then at most one every ``every_s`` seconds, and one when it ends (:meth:`close`,
    or leaving the ``with`` block); ``total=None`` (unknown length) reports counts and elapsed time only.

    Args:
        logger: where the lines go (the package's loggers: ``terratorch_eoplugins.<layer>``).
        what: the step, as the user should read it (``"TSFusionCropNetTask: training the image tokenizer"``).
        total: the number of units, if known.
        unit: what is counted (``"steps"``, ``"batches"``).
        every_s: the least number of seconds between two lines.
    """

    def __init__(self, logger: logging.Logger, what: str, total: int | None = None, unit: str = "steps",
                 every_s: float = 10.0) -> None:
        self.logger, self.what, self.total, self.unit, self.every_s = logger, what, total, unit, float(every_s)
        self.done = 0
        self._start = time.monotonic()
        self._last = self._start
        self._closed = False
        self.logger.info("%s: started (%s %s)", what, "?" if total is None else total, unit)

    def update(self, n: int = 1, note: str = "") -> None:
        """``n`` more units done; ``note`` (e.g. the current loss) is appended to a line when one is due."""
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every_s and (self.total is None or self.done < self.total):
            self._last = now
            self.logger.info("%s", self._line(now, note))

    def close(self, note: str = "") -> None:
        """Report the end (once)."""
        if not self._closed:
            self._closed = True
            self.logger.info("%s", self._line(time.monotonic(), note, final=True))

    def _line(self, now: float, note: str, final: bool = False) -> str:
        elapsed = now - self._start
        count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
        text = f"{self.what}: {count} {self.unit}"
        if self.total and not final:
            text += f" ({100.0 * self.done / self.total:.0f} %)"
        text += f", {_duration(elapsed)} elapsed"
        if self.total and self.done and not final:
            text += f", ETA {_duration(elapsed / self.done * (self.total - self.done))}"
        if final:
            text += ", done"
        return text + (f", {note}" if note else "")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


@contextlib.contextmanager
def visible_info(logger: logging.Logger) -> Iterator[None]:
    """Show ``logger``'s INFO lines on stderr inside the block when no handler would display them.

    Under ``terratorch fit`` nothing configures Python logging, so the package's INFO lines would be dropped; with
    a handler already in place (``eoplugins`` commands, pytest's ``caplog``, a user's ``logging`` setup) nothing
    changes. Only on the global rank 0 (``$RANK`` / ``$LOCAL_RANK`` unset or 0), like Lightning's own messages.
    """
    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
    if logger.hasHandlers() or rank != "0":
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
