"""``eoplugins sweep FILE --count-params``: parameter counts of every run without training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _sweep(tmp_path: Path, model_piece: str = "configs/models/pastis/micro_unet.yaml") -> Path:
    spec = {
        "name": "params", "world": "data/nowhere", "trainer": "configs/trainer/cpu.yaml",
        "label_fractions": [1.0], "seeds": [0],
        "settings": {"full": {"label": "Full", "model": {"freeze_backbone": False}},
                     "frozen": {"label": "Frozen", "model": {"freeze_backbone": True}}},
        "tasks": {"pastis": {"label": "PASTIS", "data": "configs/data/pastis.yaml", "kind": "segmentation"}},
        "models": [{"name": "unet", "label": "UNet", "settings": ["full", "frozen"],
                    "tasks": {"pastis": {"model": model_piece}}}],
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _independent_counts(piece: Path, freeze_backbone: bool) -> tuple[int, int]:
    """The task built straight from the model piece's YAML (no sweep, no CLI), counted by hand."""
    import terratorch.tasks

    import terratorch_eoplugins  # noqa: F401  (registers the plugin's pieces)

    cfg = yaml.safe_load(piece.read_text())
    cls = getattr(terratorch.tasks, cfg["class_path"].rsplit(".", 1)[1])
    task = cls(**{**cfg["init_args"], "freeze_backbone": freeze_backbone})
    params = list(task.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@pytest.mark.slow
def test_count_params_prints_each_runs_counts_without_training(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path)
    res = subprocess.run([sys.executable, "-m", "terratorch_eoplugins.cli", "sweep", str(sweep), "--count-params"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "run_id,tunable,total"
    rows = {ln.split(",")[0]: tuple(map(int, ln.split(",")[1:])) for ln in lines[1:]}
    piece = REPO / "configs/models/pastis/micro_unet.yaml"
    assert rows["unet__pastis__full__lf100__s0"] == _independent_counts(piece, freeze_backbone=False)
    frozen = rows["unet__pastis__frozen__lf100__s0"]
    assert frozen == _independent_counts(piece, freeze_backbone=True)
    assert 0 < frozen[0] < frozen[1]  # the frozen encoder is counted in total only
    assert not (REPO / "data/nowhere").exists()  # nothing read or written for the (absent) world
    assert not list(tmp_path.glob("runs*"))


@pytest.mark.slow
def test_count_params_reports_a_model_that_cannot_be_built(tmp_path: Path) -> None:
    bad = tmp_path / "bad_piece.yaml"
    cfg = yaml.safe_load((REPO / "configs/models/pastis/micro_unet.yaml").read_text())
    cfg["init_args"]["model_args"]["decoder"] = "NoSuchDecoder"
    bad.write_text(yaml.safe_dump(cfg))
    sweep = _sweep(tmp_path, str(bad))
    res = subprocess.run([sys.executable, "-m", "terratorch_eoplugins.cli", "sweep", str(sweep), "--count-params",
                          "--only", "full"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1
    assert res.stdout.strip().splitlines() == ["run_id,tunable,total", "unet__pastis__full__lf100__s0,,"]
    assert "unet__pastis__full__lf100__s0: model not built" in res.stderr
