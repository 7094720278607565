"""Sweep definitions, result rows and leaderboard rendering (no subprocess)."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from terratorch_eoplugins.benchmark.callbacks import count_parameters
from terratorch_eoplugins.benchmark.leaderboard import best_values, format_value, render_markdown
from terratorch_eoplugins.benchmark.runner import (
    COLUMNS,
    append_row,
    error_tail,
    latest_rows,
    read_rows,
    select_metrics,
)
from terratorch_eoplugins.benchmark.spec import SweepSpecError, deep_merge, load_sweep, model_overrides
from terratorch_eoplugins.metrics import pearson_from_sums

REPO = Path(__file__).resolve().parents[2]


def test_count_parameters_counts_frozen_and_shared_once() -> None:
    shared = torch.nn.Linear(4, 4)  # 20 parameters
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), shared, shared, torch.nn.Linear(4, 2))
    net[0].requires_grad_(False)
    total, tunable = count_parameters(net)
    assert total == (3 * 4 + 4) + (4 * 4 + 4) + (4 * 2 + 2)
    assert tunable == total - (3 * 4 + 4)


def test_pearson_from_running_sums_matches_numpy_over_batches() -> None:
    rng = np.random.default_rng(0)
    t = rng.normal(size=500)
    p = 0.7 * t + rng.normal(scale=0.5, size=500)
    sums = np.zeros(6)
    for chunk in np.array_split(np.arange(500), 7):  # accumulated batch by batch as the callback does
        pc, tc = p[chunk], t[chunk]
        sums += [len(chunk), pc.sum(), tc.sum(), (pc * pc).sum(), (tc * tc).sum(), (pc * tc).sum()]
    assert pearson_from_sums(*sums) == pytest.approx(np.corrcoef(p, t)[0, 1], abs=1e-10)
    assert math.isnan(pearson_from_sums(1, 1.0, 1.0, 1.0, 1.0, 1.0))
    assert math.isnan(pearson_from_sums(3, 3.0, 1.0, 3.0, 1.0, 1.0))  # constant prediction


def test_metric_columns_per_task_kind() -> None:
    logged = {"test/mIoU": 0.4, "test/Accuracy": 0.5, "test/F1_Score": 0.6, "test/Pixel_Accuracy": 0.9,
              "test/RMSE": 2.0, "test/MAE": 1.5, "pearson_r": 0.8}
    assert select_metrics("segmentation", logged) == [0.4, 0.5, 0.6]  # macro accuracy, not pixel accuracy
    assert select_metrics("regression", logged) == [2.0, 1.5, 0.8]
    assert math.isnan(select_metrics("regression", {"test/RMSE": 1.0})[2])
    with pytest.raises(ValueError, match="unknown task kind 'detection'"):
        select_metrics("detection", logged)


def test_model_patch_merges_model_args_and_deletes_keys() -> None:
    piece = REPO / "configs" / "models" / "pastis" / "terramind.yaml"
    patch = {"freeze_backbone": True, "model_args": {"decoder": "FCNDecoder", "decoder_channels": "__delete__",
                                                     "decoder_num_convs": 1, "necks": [{"name": "SelectIndices",
                                                                                        "indices": [-1]}]}}
    args = model_overrides(piece, patch)
    assert args[0] == "--model.init_args.freeze_backbone=true"
    merged = json.loads(args[1].split("=", 1)[1])
    base = yaml.safe_load(piece.read_text())["init_args"]["model_args"]
    assert "decoder_channels" not in merged and merged["decoder"] == "FCNDecoder"
    assert merged["necks"] == [{"name": "SelectIndices", "indices": [-1]}]  # lists are replaced, not merged
    assert {k: v for k, v in merged.items() if k not in patch["model_args"]} == \
        {k: v for k, v in base.items() if k not in patch["model_args"]}
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}
    # strings reach jsonargparse unquoted (a Literal rejects '"mp"'), unless YAML would read them as another type
    assert model_overrides(piece, {"pooling": "mp", "name": "true", "lr": 1e-4}) == [
        "--model.init_args.pooling=mp", '--model.init_args.name="true"', "--model.init_args.lr=0.0001"]


def _write_sweep(tmp: Path, models: list, **extra) -> Path:
    spec = {"name": "t", "trainer": "configs/trainer/cpu.yaml",
            "settings": {"full": {"label": "Full", "model": {}}, "frozen": {"model": {"freeze_backbone": True}}},
            "tasks": {"pastis": {"data": "configs/data/pastis.yaml"}}, "models": models, **extra}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_sweep_matrix_expands_and_skips_optional_missing(tmp_path: Path) -> None:
    models = [{"name": "micro", "settings": ["full", "frozen"],
               "tasks": {"pastis": {"model": "configs/models/pastis/micro_unet.yaml", "label_fractions": [1.0, 0.1]}}},
              {"name": "future", "optional": True, "tasks": {"pastis": {"model": "configs/models/pastis/nope.yaml"}}}]
    sweep = load_sweep(_write_sweep(tmp_path, models, seeds=[0, 1]), repo=REPO)
    assert len(sweep.runs) == 2 * 2 * 2
    assert {r.run_id for r in sweep.runs} >= {"micro__pastis__full__lf100__s0", "micro__pastis__frozen__lf010__s1"}
    assert sweep.skipped == ["future x pastis: missing configs/models/pastis/nope.yaml"]


def test_shared_pretraining_has_one_id_and_must_be_identical(tmp_path: Path) -> None:
    pre = {"config": "configs/dunia_pretrain.yaml", "ckpt_arg": "model.init_args.model_args.backbone_ckpt_path",
           "share": "dunia", "overrides": ["--trainer.max_epochs=1"]}
    knn_arg = "model.init_args.backbone_ckpt_path"
    models = [{"name": "dunia", "tasks": {"gedi": {"model": "configs/models/gedi/dunia.yaml", "pretrain": pre}}},
              {"name": "dunia_knn", "tasks": {"gedi": {"model": "configs/models/gedi/dunia_zeroshot.yaml",
                                                       "pretrain": pre | {"ckpt_arg": knn_arg}}}},
              {"name": "s4", "tasks": {"gedi": {"model": "configs/models/gedi/dunia.yaml",
                                                "pretrain": pre | {"share": None}}}}]
    gedi = {"tasks": {"gedi": {"data": "configs/data/gedi.yaml", "kind": "regression"}}}
    sweep = load_sweep(_write_sweep(tmp_path, models, **gedi), repo=REPO)
    ids = {r.model: r.pretrain_id for r in sweep.runs}
    assert ids == {"dunia": "dunia__gedi__s0", "dunia_knn": "dunia__gedi__s0", "s4": "s4__gedi__s0"}
    models[1]["tasks"]["gedi"]["pretrain"] = pre | {"overrides": ["--trainer.max_epochs=2"]}
    with pytest.raises(SweepSpecError, match="share the pretraining 'dunia__gedi__s0'.*must be identical"):
        load_sweep(_write_sweep(tmp_path, models, **gedi), repo=REPO)


@pytest.mark.parametrize("models, message", [
    ([{"name": "m", "tasks": {"pastis": {"model": "configs/models/pastis/nope.yaml"}}}], "not found: configs/models"),
    ([{"name": "m", "tasks": {"mars": {"model": "configs/models/pastis/unet.yaml"}}}], "unknown task 'mars'"),
    ([{"name": "m", "settings": ["lora"], "tasks": {}}], "unknown setting 'lora'"),
    ([{"tasks": {}}], "missing required key 'name'"),
])
def test_bad_sweep_files_name_the_problem(tmp_path: Path, models: list, message: str) -> None:
    with pytest.raises(SweepSpecError, match=message):
        load_sweep(_write_sweep(tmp_path, models), repo=REPO)


def _append_many(args: tuple[str, int]) -> None:
    path, k = args
    for i in range(40):
        append_row(Path(path), {"run_id": f"p{k}_{i}", "status": "ok", "error": "x" * 3000})


def test_rows_are_appended_atomically_by_concurrent_processes(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    with mp.get_context("fork").Pool(4) as pool:
        pool.map(_append_many, [(str(path), k) for k in range(4)])
    rows = read_rows(path)
    assert len(rows) == 160 and all(r["status"] == "ok" and len(r["error"]) == 3000 for r in rows)
    assert path.read_text().count("run_id,sweep") == 1  # one header


def _row(task: str, kind: str, model: str, setting: str, vals: list[float], seed: int = 0, tunable: float = 1e6,
         status: str = "ok", pretrained: bool = False) -> dict:
    return {"run_id": f"{model}__{task}__{setting}__lf100__s{seed}", "sweep": "t", "model": model,
            "model_label": model.upper(), "pretrained": pretrained, "task": task, "task_label": task.title(),
            "kind": kind, "setting": setting, "setting_label": setting.title(), "label_fraction": 1.0, "seed": seed,
            "status": status, "m1": vals[0], "m2": vals[1], "m3": vals[2], "tunable_params": tunable,
            "total_params": tunable * 2, "train_s": 10, "peak_rss_mb": 2048, "error": "" if status == "ok" else "boom"}


def test_leaderboard_layout_top3_bold_and_seed_means(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    rows = [_row("pastis", "segmentation", "a", "full", [0.50, 0.6, 0.7], tunable=17.3e6),
            _row("pastis", "segmentation", "b", "full", [0.10, 0.2, 0.3], tunable=102e6, pretrained=True),
            _row("pastis", "segmentation", "b", "frozen", [0.30, 0.4, 0.5], tunable=15.5e6, pretrained=True),
            _row("pastis", "segmentation", "c", "full", [0.20, 0.3, 0.4], seed=0),
            _row("pastis", "segmentation", "c", "full", [0.40, 0.5, 0.6], seed=1),
            _row("gedi", "regression", "a", "full", [3.0, 2.0, 0.5]),
            _row("gedi", "regression", "b", "full", [1.0, 1.0, 0.9], pretrained=True),
            _row("gedi", "regression", "d", "full", [0, 0, 0], status="failed")]
    for r in rows:
        append_row(path, r)
    md = render_markdown(path, command="eoplugins sweep t.yaml")
    lines = md.splitlines()
    assert ("| Task | Model / Setting | # Tunable Params (M) | IoU (%) | Acc (%) | F1 (%) | train s | peak RSS GB |"
            in lines)
    b = next(ln for ln in lines if "| B (Full/Frozen) | 102/15.5 |" in ln)
    # IoU in %: 10.0 ties with nothing and is fourth of {50, 30, 30 (c's mean), 10}: not bold; the tied 30s are the
    # second and third best, so bold together (three bold values in all)
    assert "| 10.0 / **30.0** |" in b
    c = next(ln for ln in lines if ln.startswith("|  | C† |"))
    assert "**30.0±14.1**" in c  # mean ± sample std over the two seeds, in %
    assert "### 100% labels, regression: Gedi" in lines
    a_gedi = next(ln for ln in lines if "| Gedi | A† |" in ln)
    b_gedi = next(ln for ln in lines if ln.startswith("|  | B | 1 |"))
    # two regressors: only the better one is bold, lower RMSE/MAE and higher r
    assert "| 3.000 | 2.000 | 0.500 |" in a_gedi and "| **1.000** | **1.000** | **0.900** |" in b_gedi
    assert "### Failed runs (1)" in lines and any("d__gedi__full" in ln for ln in lines)
    assert best_values([0.1, 0.5, 0.3, 0.2], higher_is_better=False) == {0.1, 0.2, 0.3}
    assert set(COLUMNS) >= {"tunable_params", "total_params", "train_s", "peak_rss_mb", "cuda_peak_mb", "status"}


def test_leaderboard_says_whether_every_run_scored_the_same_test_pixels(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    for model, pixels in (("a", 4096), ("b", 4096), ("c", 1024)):
        append_row(path, {**_row("pastis", "segmentation", model, "full", [0.5, 0.5, 0.5]), "test_pixels": pixels})
    append_row(path, {**_row("gedi", "regression", "a", "full", [1, 1, 0.5]), "test_pixels": 300})
    lines = render_markdown(path).splitlines()
    assert "- Gedi: every run (1) scored 300 test pixels." in lines
    pastis = next(ln for ln in lines if ln.startswith("- Pastis:"))
    assert "**runs scored different numbers of test pixels**" in pastis
    assert "4,096: `a__pastis__full__lf100__s0`, `b__pastis__full__lf100__s0`; 1,024: `c__pastis" in pastis


def test_bolding_follows_each_metrics_direction_and_never_exceeds_three_or_the_whole_column() -> None:
    iou = [0.40, 0.10, 0.30, 0.20, 0.50]
    rmse = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert best_values(iou, higher_is_better=True) == {0.50, 0.40, 0.30}  # mIoU: highest
    assert best_values(rmse, higher_is_better=False) == {1.0, 2.0, 3.0}  # RMSE: lowest
    assert best_values([0.3, 0.1, 0.2], True) == {0.3, 0.2}  # three rows: two bold, not the whole column
    assert best_values([0.3, 0.1], True) == {0.3} and best_values([0.3], True) == set()
    assert best_values([0.3, float("nan"), 0.1], True) == {0.3}  # NaN (not logged) is not a row
    assert best_values([0.9, 0.5, 0.5, 0.5, 0.1], True) == {0.9}  # a three-way tie for second does not fit in 3
    assert best_values([0.9, 0.8, 0.5, 0.5, 0.1], True) == {0.9, 0.8}
    assert format_value(0.18728, "IoU") == "18.7" and format_value(0.952, "Acc") == "95.2"
    assert format_value(24.54815, "RMSE") == "24.548" and format_value(0.7060, "r") == "0.706"


def test_one_regression_table_per_task_so_units_never_share_a_column(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    for r in (_row("cropnet", "regression", "prithvi", "frozen", [1.14, 0.69, 0.77]),
              _row("cropnet", "regression", "unet", "full", [1.30, 0.80, 0.60]),
              _row("cropnet_yield", "regression", "tsfusion", "native", [24.5, 19.0, 0.71])):
        append_row(path, {**r, "task_label": {"cropnet": "CropNet (std. log yield)",
                                              "cropnet_yield": "CropNet (yield)"}[r["task"]]})
    lines = render_markdown(path).splitlines()
    heads = [ln for ln in lines if ln.startswith("### ")]
    assert heads == ["### 100% labels, regression: CropNet (std. log yield)",
                     "### 100% labels, regression: CropNet (yield)"]
    i, j = (lines.index(h) for h in heads)
    first, second = lines[i:j], lines[j:]
    assert sum("CropNet (std. log yield)" in ln for ln in first) == 2 and not any("TSFUSION" in ln for ln in first)
    assert sum(ln.startswith("|") and "|---|" not in ln for ln in second) == 2  # header + the one TS-fusion row
    assert any("| CropNet (yield) | TSFUSION† (Native) | 1 | 24.500 | 19.000 | 0.710 |" in ln for ln in second)
    assert any("| **1.140** | **0.690** | **0.770** |" in ln for ln in first)


def test_error_tail_keeps_the_exception_line() -> None:
    log = "noise\n" * 50 + "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad backbone\n"
    assert error_tail(log).startswith("ValueError: bad backbone | Traceback")


def test_latest_row_wins(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    append_row(path, {"run_id": "x", "status": "failed"})
    append_row(path, {"run_id": "x", "status": "ok"})
    assert latest_rows(path)["x"]["status"] == "ok"


def test_callback_pearson_r_on_a_regression_task_matches_numpy(tmp_path: Path) -> None:
    """BenchmarkStats' r over ignore-masked test pixels, batch by batch, equals numpy's on the same predictions."""
    from types import SimpleNamespace

    from terratorch.tasks import PixelwiseRegressionTask

    import terratorch_eoplugins  # noqa: F401  (registers micro_unet)
    from terratorch_eoplugins.benchmark.callbacks import BenchmarkStats

    torch.manual_seed(0)
    task = PixelwiseRegressionTask(model_factory="EncoderDecoderFactory", loss="mse", ignore_index=-1,
                                   model_args={"backbone": "micro_unet", "backbone_in_channels": 3,
                                               "decoder": "IdentityDecoder"})
    task.eval()
    strategy = SimpleNamespace(reduce=lambda t, reduce_op=None: t)
    trainer = SimpleNamespace(world_size=1, accelerator=object(), strategy=strategy, is_global_zero=True)
    out = tmp_path / "stats.json"
    cb = BenchmarkStats(path=str(out))
    cb.on_test_start(trainer, task)
    preds, targets = [], []
    for i in range(3):
        x = torch.randn(2, 3, 32, 32)
        y = torch.randn(2, 32, 32)
        y[:, : 8 * i] = -1  # ignored pixels
        with torch.no_grad():
            cb.on_test_batch_start(trainer, task, {"image": x, "mask": y.clone()}, i)
            p = task.model(x).output.reshape(y.shape)
        preds.append(p[y != -1])
        targets.append(y[y != -1])
    cb.on_test_end(trainer, task)
    stats = json.loads(out.read_text())
    p, t = torch.cat(preds).double().numpy(), torch.cat(targets).double().numpy()
    assert stats["pearson_n"] == p.size == 3 * 2 * 32 * 32 - 2 * 32 * (0 + 8 + 16)
    assert stats["pearson_r"] == pytest.approx(np.corrcoef(p, t)[0, 1], abs=1e-9)
    assert stats["test_samples"] == 6 and stats["total_params"] == stats["tunable_params"] > 0
    assert stats["test_pixels"] == stats["pearson_n"]  # the scored (not ignored) target pixels


def test_rows_append_to_a_results_csv_of_the_previous_header(tmp_path: Path) -> None:
    """A sweep resumed on a CSV written before ``test_samples``/``test_pixels`` keeps that file's header."""
    import csv

    from terratorch_eoplugins.benchmark.runner import COLUMNS, LEGACY_COLUMNS, append_row, read_rows

    old = tmp_path / "old.csv"
    with open(old, "w", newline="") as f:
        csv.writer(f).writerow(LEGACY_COLUMNS)
    append_row(old, {"run_id": "a", "status": "ok", "test_pixels": 7})
    assert [r["run_id"] for r in read_rows(old)] == ["a"] and "test_pixels" not in read_rows(old)[0]
    new = tmp_path / "new.csv"
    append_row(new, {"run_id": "b", "test_pixels": 7})
    assert list(read_rows(new)[0]) == COLUMNS and read_rows(new)[0]["test_pixels"] == "7"
    with pytest.raises(ValueError, match="unknown column"):
        append_row(new, {"run_id": "c", "pixels": 1})


def test_task_specific_metric_keys() -> None:
    logged = {"test/RMSE": 2.0, "test/r": 0.7}
    assert select_metrics("regression", logged, {"r": "test/r"})[0::2] == [2.0, 0.7]
    with pytest.raises(ValueError, match=r"\['IoU'\] do not exist for regression"):
        select_metrics("regression", logged, {"IoU": "test/mIoU"})


def test_eoplugins_sweep_command_lists_and_renders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from terratorch_eoplugins.cli import main

    models = [{"name": "micro", "tasks": {"pastis": {"model": "configs/models/pastis/micro_unet.yaml"}}}]
    path = _write_sweep(tmp_path, models)
    results = tmp_path / "results"
    assert main(["sweep", str(path), "--repo", str(REPO), "--results-dir", str(results), "--list"]) == 0
    assert capsys.readouterr().out.splitlines() == ["todo  micro__pastis__full__lf100__s0"]
    append_row(results / "t.csv", _row("pastis", "segmentation", "micro", "full", [0.2, 0.3, 0.4]))
    assert main(["sweep", str(path), "--repo", str(REPO), "--results-dir", str(results), "--list"]) == 0
    assert capsys.readouterr().out.splitlines() == ["done  micro__pastis__full__lf100__s0"]
    assert main(["sweep", str(path), "--repo", str(REPO), "--results-dir", str(results), "--render"]) == 0
    assert "| Pastis | MICRO† | 1 | 20.0 | 30.0 | 40.0 |" in (results / "t.md").read_text()  # %; one row: no bold
    assert (results / "t.png").stat().st_size > 1000


def test_runner_runs_a_shared_pretraining_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two model entries sharing a pretraining: one `terratorch fit` of the stage, same checkpoint and time for both."""
    from terratorch_eoplugins.benchmark import runner as runner_mod

    pre = {"config": "configs/dunia_pretrain.yaml", "ckpt_arg": "model.init_args.model_args.backbone_ckpt_path",
           "share": "dunia"}
    knn_arg = "model.init_args.backbone_ckpt_path"
    models = [{"name": "dunia", "tasks": {"gedi": {"model": "configs/models/gedi/dunia.yaml", "pretrain": pre}}},
              {"name": "dunia_knn", "tasks": {"gedi": {"model": "configs/models/gedi/dunia_zeroshot.yaml",
                                                       "pretrain": pre | {"ckpt_arg": knn_arg}}}}]
    sweep = load_sweep(_write_sweep(tmp_path, models, tasks={"gedi": {"data": "configs/data/gedi.yaml",
                                                                    "kind": "regression"}}), repo=REPO)
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], log: Path, env: dict, cwd: Path, timeout: float | None) -> runner_mod.ProcResult:
        calls.append(cmd)
        ckpts = log.parent / "fit" / "checkpoints"
        ckpts.mkdir(parents=True)
        (ckpts / "last.ckpt").write_bytes(b"weights")
        return runner_mod.ProcResult(0, 12.5, 100.0, "")

    monkeypatch.setattr(runner_mod, "run_logged", fake_run)
    runner = runner_mod.SweepRunner(sweep, repo=REPO, runs_dir=tmp_path / "runs", results_dir=tmp_path / "res",
                                    log=lambda s: None)
    got = [runner._pretrain(r) for r in sweep.runs]
    assert len(calls) == 1 and "configs/dunia_pretrain.yaml" in calls[0]
    assert got[0] == got[1] and got[0][0].name == "last.ckpt" and got[0][1:] == (12.5, "")
    args = [runner.run_args(r, got[0][0]) for r in sweep.runs]
    assert f"--model.init_args.model_args.backbone_ckpt_path={got[0][0]}" in args[0]
    assert f"--model.init_args.backbone_ckpt_path={got[0][0]}" in args[1]


def test_a_profile_overlays_the_run_and_its_pretraining_before_every_override(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``profile:`` of an entry and of its ``pretrain`` stage: a second ``-c`` right after the config, a setting's
    ``model_args`` patch merged into the profile's (which replaces the piece's), and the composed config sized by it."""
    from terratorch_eoplugins.benchmark import runner as runner_mod
    from terratorch_eoplugins.benchmark.compose import compose_run_config

    profile, pre_profile = "configs/profiles/cpu/lianet_pastis.yaml", "configs/profiles/cpu/lianet_pretrain_pastis.yaml"
    entry = {"model": "configs/models/pastis/lianet.yaml", "data": "configs/data/pastis_lianet.yaml",
             "profile": profile,
             "pretrain": {"config": "configs/lianet_pretrain_pastis.yaml", "profile": pre_profile,
                          "ckpt_arg": "model.init_args.model_args.backbone_ckpt_path"}}
    settings = {"head": {"model": {"model_args": {"decoder_channels": [16]}}}}
    sweep = load_sweep(_write_sweep(tmp_path, [{"name": "lianet", "settings": ["head"], "tasks": {"pastis": entry}}],
                                    settings=settings), repo=REPO)
    (run,) = sweep.runs
    assert run.profile == profile and run.pretrain.profile == pre_profile
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], log: Path, env: dict, cwd: Path, timeout: float | None) -> runner_mod.ProcResult:
        calls.append(cmd)
        (log.parent / "fit" / "checkpoints").mkdir(parents=True)
        (log.parent / "fit" / "checkpoints" / "last.ckpt").write_bytes(b"weights")
        return runner_mod.ProcResult(0, 1.0, 1.0, "")

    monkeypatch.setattr(runner_mod, "run_logged", fake_run)
    runner = runner_mod.SweepRunner(sweep, repo=REPO, runs_dir=tmp_path / "runs", results_dir=tmp_path / "res",
                                    log=lambda s: None)
    ckpt, _, err = runner._pretrain(run)
    assert not err
    pre_cmd = calls[0]
    i = pre_cmd.index("configs/lianet_pretrain_pastis.yaml")
    assert pre_cmd[i + 1:i + 3] == ["-c", str(REPO / pre_profile)]
    args = runner.run_args(run, ckpt)
    assert args[0] == "-c" and args[2:4] == ["-c", str(REPO / profile)] and not args[4].startswith("-c")
    assert args[-1] == f"--model.init_args.model_args.backbone_ckpt_path={ckpt}"  # after the profile: kept
    patched = json.loads(next(a for a in args if a.startswith("--model.init_args.model_args=")).split("=", 1)[1])
    cpu = yaml.safe_load((REPO / profile).read_text())["model"]["init_args"]["model_args"]
    assert patched == {**cpu, "decoder_channels": [16]}  # the profile's generator, not the paper-size piece's
    cfg = compose_run_config(runner, run, ckpt)
    gen = cfg["model"]["init_args"]["model_args"]["backbone_generator_args"]
    assert gen == cpu["backbone_generator_args"] and cfg["model"]["init_args"]["lr"] == 2.0e-3
    assert cfg["data"]["init_args"]["num_dates"] == 4 and cfg["trainer"]["max_epochs"] == 16
    assert cfg["model"]["init_args"]["model_args"]["backbone_ckpt_path"] == str(ckpt)
    entry["profile"] = "configs/profiles/cpu/nope.yaml"
    with pytest.raises(SweepSpecError, match="not found: configs/profiles/cpu/nope.yaml"):
        load_sweep(_write_sweep(tmp_path, [{"name": "lianet", "tasks": {"pastis": entry}}]), repo=REPO)


def test_folds_make_one_run_per_fold_sharing_one_pretraining_and_the_leaderboard_averages_them(tmp_path: Path) -> None:
    from terratorch_eoplugins.benchmark import runner as runner_mod

    pre = {"config": "configs/lianet_pretrain_pastis.yaml", "ckpt_arg": "model.init_args.model_args.backbone_ckpt_path"}
    models = [{"name": "lianet", "tasks": {"pastis": {"model": "configs/models/pastis/lianet.yaml", "pretrain": pre}}},
              {"name": "micro", "tasks": {"pastis": {"model": "configs/models/pastis/micro_unet.yaml"}}}]
    tasks = {"pastis": {"data": "configs/data/pastis_lianet.yaml", "folds": [0, 3],
                        "overrides": ["--data.init_args.protocol=official"]}}
    sweep = load_sweep(_write_sweep(tmp_path, models, tasks=tasks, overrides=["--trainer.max_epochs=1"]), repo=REPO)
    assert [r.run_id for r in sweep.runs] == [f"{m}__pastis__full__lf100__s0__f{k}" for m in ("lianet", "micro")
                                              for k in (0, 3)]
    assert {r.pretrain_id for r in sweep.runs[:2]} == {"lianet__pastis__s0"}
    runner = runner_mod.SweepRunner(sweep, repo=REPO, runs_dir=tmp_path / "runs", results_dir=tmp_path / "res",
                                    log=lambda s: None)
    args = runner.override_args(sweep.runs[3])
    assert "--data.init_args.fold_rotation=3" in args
    # the sweep's overrides, then the task's, then the model's and the entry's
    assert args.index("--trainer.max_epochs=1") < args.index("--data.init_args.protocol=official")
    csv = tmp_path / "r.csv"
    for fold, iou in ((0, 0.2), (3, 0.4)):
        append_row(csv, _row("pastis", "segmentation", "micro", "full", [iou, 0.5, 0.5]) | {
            "run_id": f"micro__pastis__full__lf100__s0__f{fold}"})
    md = render_markdown(csv)
    assert "30.0±14.1" in md and "Mean over seeds and folds" in md
    for bad in ([0, "x"], 3):
        with pytest.raises(SweepSpecError, match="folds .* must be a list of integers"):
            load_sweep(_write_sweep(tmp_path, models, tasks={"pastis": tasks["pastis"] | {"folds": bad}}), repo=REPO)


def test_an_entry_deletion_survives_the_setting_patch_it_is_merged_over() -> None:
    """A setting patch without the key, then an entry patch deleting it: the piece's key is gone in the run."""
    setting = {"freeze_backbone": True, "model_args": {"decoder": "FCNDecoder"}}
    entry = {"model_args": {"backbone_use_temporal": "__delete__", "backbone_bands": "__delete__", "nope": "__delete__",
                            "extra": {"a": 1, "b": "__delete__"}}}
    patch = deep_merge(setting, entry, keep_deletes=True)
    args = model_overrides(REPO / "configs" / "models" / "pastis" / "terramind.yaml", patch)
    merged = json.loads(next(a for a in args if a.startswith("--model.init_args.model_args=")).split("=", 1)[1])
    assert "backbone_use_temporal" not in merged and "backbone_bands" not in merged and "nope" not in merged
    assert merged["decoder"] == "FCNDecoder" and merged["extra"] == {"a": 1}
    assert deep_merge({"x": 1}, {"y": "__delete__"}) == {"x": 1}


def test_a_sweep_extends_another_and_patches_its_models_by_name(tmp_path: Path) -> None:
    """``extends:``: the base's keys with the file's merged over them; models patched, dropped or added by name."""
    micro = {"model": "configs/models/pastis/micro_unet.yaml"}
    base = _write_sweep(tmp_path, [{"name": "micro", "label": "Micro", "settings": ["full", "frozen"],
                                    "tasks": {"pastis": micro}},
                                   {"name": "unet", "tasks": {"pastis": {"model": "configs/models/pastis/unet.yaml"}}}],
                        seeds=[0, 1])
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({
        "extends": base.name, "name": "child", "seeds": [3], "overrides": ["--trainer.max_epochs=1"],
        "models": [{"name": "micro", "label": "Micro (small)", "settings": ["full"],
                    "tasks": {"pastis": {"settings": {"full": {"model_args": {"decoder_channels": [8]}}}}}},
                   {"name": "unet", "__delete__": True},
                   {"name": "micro2", "tasks": {"pastis": micro}}]}))
    sweep = load_sweep(child, repo=REPO)
    assert sweep.name == "child" and sweep.raw["tasks"] == yaml.safe_load(base.read_text())["tasks"]
    assert sorted(r.run_id for r in sweep.runs) == ["micro2__pastis__full__lf100__s3", "micro__pastis__full__lf100__s3"]
    run = next(r for r in sweep.runs if r.model == "micro")
    assert run.model_label == "Micro (small)" and "--trainer.max_epochs=1" in run.overrides
    assert run.model_patch["model_args"] == {"decoder_channels": [8]}
    child.write_text(yaml.safe_dump({"extends": "child.yaml", "models": []}))
    with pytest.raises(SweepSpecError, match="cycle"):
        load_sweep(child, repo=REPO)
    child.write_text(yaml.safe_dump({"extends": base.name, "models": [{"name": "nope", "__delete__": True}]}))
    with pytest.raises(SweepSpecError, match="'nope' is not a model of"):
        load_sweep(child, repo=REPO)


def test_a_pretraining_across_tasks_is_one_per_seed(tmp_path: Path) -> None:
    pre = {"config": "configs/s4_pretrain_pastis.yaml", "ckpt_arg": "model.init_args.model_args.backbone_ckpt_path"}
    tasks = {"tasks": {"optical": {"data": "configs/data/pastis_s4_optical.yaml"},
                       "radar": {"data": "configs/data/pastis_s4_radar.yaml"}}}
    entry = {"optical": {"model": "configs/models/pastis/s4_optical.yaml", "pretrain": pre},
             "radar": {"model": "configs/models/pastis/s4_radar.yaml", "pretrain": pre}}
    per_task = load_sweep(_write_sweep(tmp_path, [{"name": "s4", "tasks": entry}], seeds=[0, 1], **tasks), repo=REPO)
    assert {r.pretrain_id for r in per_task.runs} == {"s4__optical__s0", "s4__radar__s0", "s4__optical__s1",
                                                       "s4__radar__s1"}
    shared = {t: {**e, "pretrain": {**pre, "across_tasks": True}} for t, e in entry.items()}
    across = load_sweep(_write_sweep(tmp_path, [{"name": "s4", "tasks": shared}], seeds=[0, 1], **tasks), repo=REPO)
    assert {r.pretrain_id for r in across.runs} == {"s4__s0", "s4__s1"}
    shared["radar"]["pretrain"] = {**shared["radar"]["pretrain"], "overrides": ["--trainer.max_epochs=1"]}
    with pytest.raises(SweepSpecError, match="must be identical"):
        load_sweep(_write_sweep(tmp_path, [{"name": "s4", "tasks": shared}], **tasks), repo=REPO)
