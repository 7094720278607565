"""terratorch_eoplugins.runtime: the float32 matmul precision guard and the one way to run a subprocess."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from terratorch_eoplugins.errors import EODatasetNotFoundError
from terratorch_eoplugins.runtime import (
    TerratorchError,
    exact_matmul,
    float32_matmul_precision,
    read_last_metrics,
    run_process,
    run_terratorch,
    terratorch_command,
)


@pytest.fixture
def restore_precision():
    legacy = torch.get_float32_matmul_precision()
    backends = [b for b in (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul) if hasattr(b, "fp32_precision")]
    saved = [b.fp32_precision for b in backends]
    yield backends
    torch.set_float32_matmul_precision(legacy)
    for b, v in zip(backends, saved):
        b.fp32_precision = v


def test_exact_matmul_sets_highest_inside_and_restores_the_callers_setting(restore_precision, matmul_spy) -> None:
    torch.set_float32_matmul_precision("medium")
    before = [b.fp32_precision for b in restore_precision]
    a = torch.randn(8, 8)
    with matmul_spy:
        with exact_matmul():
            assert torch.get_float32_matmul_precision() == "highest"
            a @ a
        a @ a
    assert matmul_spy.calls == [("matmul", "highest"), ("matmul", "medium")]
    assert torch.get_float32_matmul_precision() == "medium"
    assert [b.fp32_precision for b in restore_precision] == before


def test_guard_restores_after_an_exception_and_per_backend_values(restore_precision) -> None:
    torch.set_float32_matmul_precision("high")
    if restore_precision:  # a user who set one backend directly keeps exactly that
        restore_precision[0].fp32_precision = "ieee"
    before = [b.fp32_precision for b in restore_precision]
    with pytest.raises(RuntimeError, match="boom"), exact_matmul():
        raise RuntimeError("boom")
    assert torch.get_float32_matmul_precision() == "high"
    assert [b.fp32_precision for b in restore_precision] == before


def test_guard_works_as_a_decorator_and_rejects_unknown_precisions(restore_precision) -> None:
    torch.set_float32_matmul_precision("medium")

    @float32_matmul_precision("highest")
    def inner() -> str:
        return torch.get_float32_matmul_precision()

    assert inner() == "highest" and inner() == "highest"
    assert torch.get_float32_matmul_precision() == "medium"
    with pytest.raises(ValueError, match="precision must be one of"), float32_matmul_precision("fp16"):
        pass


def test_run_process_logs_output_exit_code_and_peak_rss(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    code = "import sys; b = bytearray(64 * 2**20); print('hello'); sys.exit(3)"
    res = run_process([sys.executable, "-c", code], log=log)
    assert res.returncode == 3 and not res.timed_out
    assert res.maxrss_mb > 60 and res.wall_s > 0
    text = log.read_text()
    assert text.startswith("$ ") and "hello" in text and "hello" in res.tail


def test_run_process_kills_the_process_group_on_timeout(tmp_path: Path) -> None:
    log = tmp_path / "t.log"
    t0 = time.perf_counter()
    # the child starts a grandchild; both must be gone once the time limit kills the group
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            " print(p.pid, flush=True); time.sleep(60)")
    res = run_process([sys.executable, "-c", code], log=log, timeout=1.5)
    assert res.timed_out and res.returncode < 0 and time.perf_counter() - t0 < 20
    assert "TIMEOUT" in log.read_text()
    grandchild = Path(f"/proc/{int(log.read_text().splitlines()[1])}")

    def alive() -> bool:
        try:
            return "State:\tZ" not in (grandchild / "status").read_text()  # a zombie is dead, awaiting its reaper
        except FileNotFoundError:
            return False

    deadline = time.time() + 5
    while alive() and time.time() < deadline:
        time.sleep(0.1)
    assert not alive()


def test_run_terratorch_check_raises_naming_the_command_and_log(tmp_path: Path, monkeypatch) -> None:
    from terratorch_eoplugins import runtime

    fake = [sys.executable, "-c", "import sys; print('bad config'); sys.exit(2)"]
    monkeypatch.setattr(runtime, "terratorch_command", lambda env=None: fake)
    log = tmp_path / "fit.log"
    with pytest.raises(TerratorchError) as err:
        run_terratorch(["fit", "-c", "cfg.yaml"], log=log, check=True)
    msg = str(err.value)
    assert "`terratorch fit -c cfg.yaml` exited with status 2" in msg and str(log) in msg and "bad config" in msg
    assert run_terratorch(["fit"], log=log).returncode == 2  # without check: the result only


def test_terratorch_command_prefers_the_console_script_next_to_python() -> None:
    cmd = terratorch_command()
    assert cmd == [str(Path(sys.executable).parent / "terratorch")] or cmd[-2:] == ["-m", "terratorch"]


def test_read_last_metrics_merges_rows_and_names_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,test/mIoU,note\n0,0.25,x\n1,,y\n1,0.5,\n")
    assert read_last_metrics(path) == {"epoch": 1.0, "test/mIoU": 0.5}
    with pytest.raises(EODatasetNotFoundError, match="metrics file not found: .*nothing.csv"):
        read_last_metrics(tmp_path / "nothing.csv")
