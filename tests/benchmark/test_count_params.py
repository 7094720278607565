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


#: the LIANet supplement's table 3, tunable parameters in millions (PASTIS; Burn Scars where it differs)
TABLE3 = {"unet__pastis__scratch": 17.3, "micro_unet__pastis__scratch": 0.49, "terramind__pastis__frozen": 15.5,
          "terramind__pastis__embedding": 0.39, "lianet__pastis__lianet": 0.87, "terramind__burnscars__frozen": 5.0,
          "terramind__burnscars__embedding": 0.39}


@pytest.mark.slow
def test_lianet_table3_rows_match_the_tables_parameter_counts_within_ten_percent() -> None:
    """The table-3 sweep at paper scale, counted offline (the rows that build in seconds; the 300M encoders are
    checked by ``eoplugins sweep benchmarks/sweeps/lianet_table3.yaml --count-params``, see the results notes)."""
    from terratorch_eoplugins.benchmark.params import count_sweep_parameters
    from terratorch_eoplugins.benchmark.spec import load_sweep

    sweep = load_sweep(REPO / "benchmarks" / "sweeps" / "lianet_table3.yaml", repo=REPO)
    runs = [r for r in sweep.runs if r.run_id.rsplit("__lf", 1)[0] in TABLE3 and r.fold in (None, 0, 1)]
    assert len(runs) == 5 * 2 + 2  # five PASTIS rows at folds 0 and 1, two Burn Scars rows
    counts = count_sweep_parameters(sweep, runs, repo=str(REPO))
    for res in counts:
        assert not res.error, res.error
        want = TABLE3[res.run_id.rsplit("__lf", 1)[0]]
        assert abs(res.tunable / 1e6 - want) <= 0.1 * want, (res.run_id, res.tunable, want)
    # the folds of a run share its model
    f0, f1 = (c.tunable for c in counts if c.run_id.startswith("terramind__pastis__frozen"))
    assert f0 == f1


def test_table3_rows_see_the_same_samples_and_input_whatever_the_model() -> None:
    """Every image model of the table-3 and demo sweeps reads LIANet's samples (a data piece that differs from
    LIANet's only in the image and the batch keys), single-date with the 12 S2 L2A bands; the folds are PASTIS's
    official rotations."""
    from terratorch_eoplugins.benchmark.compose import compose_run_config
    from terratorch_eoplugins.benchmark.runner import SweepRunner
    from terratorch_eoplugins.benchmark.spec import load_sweep

    for name in ("lianet_table3", "demo"):
        sweep = load_sweep(REPO / "benchmarks" / "sweeps" / f"{name}.yaml", repo=REPO)
        runner = SweepRunner(sweep, repo=REPO, runs_dir="/nonexistent", results_dir="/nonexistent", log=lambda s: None)
        datas = {}
        for run in sweep.runs:
            cfg = compose_run_config(runner, run)
            data = dict(cfg["data"]["init_args"])
            image, keys = data.pop("image"), data.pop("batch_keys")
            for k in ("batch_size", "num_workers"):
                data.pop(k)
            datas.setdefault((run.task, run.fold), []).append((run.run_id, data))
            margs = cfg["model"]["init_args"].get("model_args", {})
            if run.model == "lianet":
                assert image == "placeholder" and keys == ["origin_px", "time_days", "time_index"]
                continue
            assert image == "s2" and keys == [], run.run_id
            assert not any(k.startswith("backbone_temporal") or k == "backbone_use_temporal" for k in margs), run.run_id
            bands = margs.get("backbone_bands", margs.get("backbone_model_bands"))
            if bands is not None:
                assert len(bands) == 12, run.run_id
            if run.fold is not None:
                assert data["protocol"] == "official" and data["fold_rotation"] == run.fold
        for (task, fold), rows in datas.items():
            assert all(d == rows[0][1] for _, d in rows), (name, task, fold, rows)


def test_every_shipped_sweep_loads_and_composes_every_run() -> None:
    """``benchmarks/sweeps/*.yaml``: each parses and each run's config composes (pieces, profiles, patches and
    overrides resolve), without building a model."""
    from terratorch_eoplugins.benchmark.compose import compose_run_config
    from terratorch_eoplugins.benchmark.runner import SweepRunner
    from terratorch_eoplugins.benchmark.spec import load_sweep

    files = sorted((REPO / "benchmarks" / "sweeps").glob("*.yaml"))
    assert {"demo", "smoke", "full", "lianet_table3", "s4_table1"} <= {f.stem for f in files}
    for f in files:
        sweep = load_sweep(f, repo=REPO)
        assert sweep.runs and not sweep.skipped, f
        runner = SweepRunner(sweep, repo=REPO, runs_dir="/nonexistent", results_dir="/nonexistent", log=lambda s: None)
        for run in sweep.runs:
            cfg = compose_run_config(runner, run)
            assert set(cfg) >= {"trainer", "data", "model"}, run.run_id
