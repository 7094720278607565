"""``benchmarks/loader_throughput.py`` runs end to end on the tiny world: every case reads the same arrays as its
reference loader and reports a speed ratio (the ratios themselves are measured by running the script, not here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "loader_throughput.py"


@pytest.mark.slow
def test_loader_throughput_script_reads_the_same_arrays(tiny_world_dir: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("loader_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "loader.json"
    results = module.main(["--root", str(tiny_world_dir), "--repeats", "1", "--limit", "2", "--json", str(out)])
    cases = results["cases"]
    expected = {"PASTIS S2", "PASTIS S2 + S1A", "HLS Burn Scars", "CropNet soybeans 2022"}
    assert {c.split(",")[0] for c in cases} >= expected
    for title, case in cases.items():
        assert case["same_arrays"], title
        for loader in ("ours", "ours raw", case["reference"]):
            assert case[loader]["samples_per_s"] > 0 and case[loader]["ratio_wall"] > 0
    assert json.loads(out.read_text())["cases"].keys() == cases.keys()
