"""Shared fixtures: the tiny synthetic world is written once per test session; float32 matmul precision.

**Matmul precision.** ``import terratorch`` sets ``torch.set_float32_matmul_precision("medium")``; on CPUs with
AMX-BF16 and on CUDA GPUs float32 products then run in bfloat16 / TF32. The test run forces one precision before
every test so that the package's exactness guards (:func:`terratorch_eoplugins.runtime.exact_matmul`) are always
exercised under the reduced setting, whatever was imported first: ``"medium"`` by default, or the value of
``--matmul-precision`` / the ``EOPLUGINS_MATMUL_PRECISION`` environment variable (``highest``, ``high``, ``medium``,
or ``keep`` to leave torch's setting alone)::

    EOPLUGINS_MATMUL_PRECISION=medium .venv/bin/python -m pytest -q tests/nn/test_knn.py
    .venv/bin/python -m pytest -q --matmul-precision highest tests/test_losses_dunia.py

The :func:`matmul_spy` fixture records the precision in force at every matrix product, so a test can check a
guard on any machine (the numerical effect of ``"medium"`` shows only on AMX / CUDA hardware).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]
PRECISION_ENV = "EOPLUGINS_MATMUL_PRECISION"
_PRECISIONS = ("highest", "high", "medium", "keep")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--matmul-precision", default=None, choices=_PRECISIONS,
                     help=f"float32 matmul precision forced before every test (default: ${PRECISION_ENV} or medium; "
                          "keep: leave torch's setting alone)")


def _forced_precision(config: pytest.Config) -> str | None:
    value = config.getoption("--matmul-precision") or os.environ.get(PRECISION_ENV) or "medium"
    if value not in _PRECISIONS:
        raise pytest.UsageError(f"{PRECISION_ENV}={value!r}: expected one of {list(_PRECISIONS)}")
    return None if value == "keep" else value


def pytest_report_header(config: pytest.Config) -> str:
    value = _forced_precision(config)
    return f"float32 matmul precision forced per test: {value or 'no (keep)'}"


@pytest.fixture(autouse=True)
def forced_matmul_precision(request: pytest.FixtureRequest) -> str | None:
    """Set the run's float32 matmul precision before each test (see the module docstring); returns it."""
    value = _forced_precision(request.config)
    if value is not None:
        import torch

        torch.set_float32_matmul_precision(value)
    return value


class MatmulSpy:
    """A torch function mode recording ``(op name, float32 matmul precision in force)`` for every matrix product."""

    OPS = frozenset({"mm", "matmul", "__matmul__", "__rmatmul__", "bmm", "addmm", "baddbmm", "addbmm", "linear",
                     "einsum", "mv", "addmv", "tensordot", "chain_matmul", "multi_dot"})

    def __init__(self) -> None:
        from torch.overrides import TorchFunctionMode

        spy = self

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
                import torch

                name = getattr(func, "__name__", "")
                if name in spy.OPS:
                    spy.calls.append((name, torch.get_float32_matmul_precision()))
                return func(*args, **(kwargs or {}))

        self.calls: list[tuple[str, str]] = []
        self._mode = _Mode()

    def __enter__(self) -> MatmulSpy:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)

    def precisions(self) -> set[str]:
        """The distinct precisions seen."""
        return {p for _, p in self.calls}


@pytest.fixture
def matmul_spy() -> MatmulSpy:
    """A fresh :class:`MatmulSpy`; use it as ``with matmul_spy: ...``."""
    return MatmulSpy()


@pytest.fixture(scope="session")
def tiny_world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding every product of the tiny synthetic world (seed 0)."""
    from terratorch_eoplugins.synthetic import write_world

    out = tmp_path_factory.mktemp("tiny_world")
    write_world(out, size="tiny", seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_world():
    """The in-memory tiny :class:`~terratorch_eoplugins.synthetic.world.World` (seed 0)."""
    from terratorch_eoplugins.synthetic.world import make_world

    return make_world("tiny", seed=0)


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    """Environment for terratorch CLI subprocesses: offline, quiet, single-threaded BLAS."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2")})
    return env


@pytest.fixture
def quiet_lightning():
    """Run a test with warnings ignored and Lightning's logger at ERROR (short Trainer runs print a lot)."""
    import logging
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        yield


@pytest.fixture
def one_torch_thread():
    """Run a test on one torch thread: small 3-D convolutions are far faster that way on contended CI cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
