"""Shared fixtures: the tiny synthetic world is written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]


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
def one_torch_thread():
    """Run a test on one torch thread: small 3-D convolutions are far faster that way on contended CI cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
