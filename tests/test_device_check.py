"""``benchmarks/device_check.sh --dry-run`` runs on a CPU machine: it prints the plan of every step, builds the
training arguments of every paper-scale config, and runs each step's argument parsing and a tiny CPU version of
its measurement code through the same guarded child processes as the real GPU check."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS = ("lianet_", "dunia_", "s4_", "tsfusion_")


def _device_check():
    spec = importlib.util.spec_from_file_location("device_check", REPO / "benchmarks" / "device_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cuda_only_tests_are_found_by_their_skip_condition(tmp_path: Path) -> None:
    dc = _device_check()
    assert "tests/nn/test_hash_encoding.py::test_cuda_path_matches_cpu" in dc.cuda_only_tests()
    (tmp_path / "test_x.py").write_text(
        "import pytest, torch\n"
        "@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA')\ndef test_a(): pass\n"
        "@pytest.mark.gpu\ndef test_b(): pass\n"
        "def test_c(): pass\n"
        "class TestD:\n    @pytest.mark.skipif(not torch.cuda.is_available(), reason='')\n    def test_e(self): pass\n")
    assert dc.cuda_only_tests(tmp_path, tmp_path) == [
        "test_x.py::test_a", "test_x.py::test_b", "test_x.py::TestD::test_e"]
    # a step that hangs is stopped at its cap, keeping what it reported; a failing one is reported with its output
    code = "import time; print('@@RESULT ' + '{\"step\": \"x\", \"status\": \"ok\"}', flush=True); time.sleep(60)"
    hung = dc.run_guarded("x", [sys.executable, "-c", code], 1.5, echo=False)
    assert [r["status"] for r in hung] == ["ok", "timeout"]
    (bad,) = dc.run_guarded("y", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], 30, echo=False)
    assert bad["status"] == "error" and bad["returncode"] == 3 and "boom" in bad["tail"]
    # children get one step each: --steps-to-run and its values are dropped, everything else is kept
    assert dc._forward_args(["--dry-run", "--steps-to-run", "hash", "knn", "--budget-s", "9"]) == [
        "--dry-run", "--budget-s", "9"]


@pytest.mark.slow
def test_dry_run_plans_every_step_and_runs_tiny_cpu_versions(tmp_path: Path, cli_env: dict[str, str]) -> None:
    out = tmp_path / "device_check.json"
    env = {**cli_env, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "benchmarks/device_check.sh", "--dry-run", "--json", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "DRY RUN" in text and "plan:" in text
    for step in ("tests: cap", "hash: cap", "knn: cap", "train: ", "== tests,hash,knn"):
        assert step in text
    configs = sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name.startswith(MODELS))
    assert configs
    for name in configs:  # every paper-scale config is planned, with the model it builds read from its pieces
        assert f"    {name}" in text
    records = json.loads(out.read_text())
    planned = {r["config"]: r for r in records if r["step"] == "train"}
    assert sorted(f"{c}.yaml" for c in planned) == configs
    for r in planned.values():
        assert r["status"] == "planned" and "--trainer.precision=bf16-mixed" in r["args"]
        assert "--trainer.accelerator=gpu" in r["args"] and r.get("model_class")
    by_step = {r["step"]: r for r in records if r["step"] != "train"}
    assert {"tests", "hash", "hash_encoding.py", "knn", "knn_retrieval.py"} <= set(by_step)
    assert all(r["status"] == "ok" for r in by_step.values()), by_step
    assert "tests/nn/test_hash_encoding.py::test_cuda_path_matches_cpu" in by_step["tests"]["ids"]
    assert by_step["hash"]["fwd_point_levels_per_s"] > 0 and by_step["hash"]["bound_point_levels_per_s"] > 0
    assert by_step["knn"]["same_neighbour_set"] == 1.0
