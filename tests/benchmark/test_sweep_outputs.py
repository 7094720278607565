"""``eoplugins sweep`` never loses a file: results folders, files it did not write, the Produced-by line, exit codes.

The terratorch runs are replaced by a fake :meth:`SweepRunner.execute` that records a row the way the real one
does (through ``_finish``), so these tests need no subprocess.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from terratorch_eoplugins.benchmark import runner as runner_mod
from terratorch_eoplugins.benchmark.leaderboard import is_sweep_markdown, is_sweep_plot
from terratorch_eoplugins.benchmark.runner import SweepOutputError, append_row, read_rows
from terratorch_eoplugins.cli import main

REPO = Path(__file__).resolve().parents[2]
MODELS = [{"name": "micro", "tasks": {"pastis": {"model": "configs/models/pastis/micro_unet.yaml"}}},
          {"name": "other", "tasks": {"pastis": {"model": "configs/models/pastis/micro_unet.yaml"}}}]


def _sweep(tmp: Path) -> Path:
    spec = {"name": "t", "trainer": "configs/trainer/cpu.yaml", "settings": {"full": {"label": "Full", "model": {}}},
            "tasks": {"pastis": {"data": "configs/data/pastis.yaml"}}, "models": MODELS}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def fake_runs(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """``execute`` records an ``ok`` row (or ``failed`` for run ids mapped to "failed") without running anything."""
    outcome: dict[str, str] = {}
    executed: list[str] = []

    def execute(self: runner_mod.SweepRunner, run) -> dict:  # noqa: ANN001
        executed.append(run.run_id)
        row = {k: getattr(run, k) for k in ("sweep", "model", "model_label", "pretrained", "task", "task_label",
                                            "kind", "setting", "setting_label", "label_fraction", "seed")}
        status = outcome.get(run.run_id, "ok")
        row.update(run_id=run.run_id, status=status, m1=0.5, m2=0.6, m3=0.7, metric_names="IoU/Acc/F1",
                   tunable_params=1e6, total_params=1e6, train_s=1.0, peak_rss_mb=100.0, resumed=False)
        return self._finish(row, self.runs_dir / run.run_id, "" if status == "ok" else "fit: boom")

    monkeypatch.setattr(runner_mod.SweepRunner, "execute", execute)
    outcome["_executed"] = executed  # type: ignore[assignment]
    return outcome


def _args(path: Path, tmp: Path, *more: str) -> list[str]:
    return ["sweep", str(path), "--repo", str(REPO), "--runs-dir", str(tmp / "runs"), "--world", str(tmp), *more]


def test_default_results_folder_is_fresh_and_committed_results_are_read_only_when_named(
        tmp_path: Path, fake_runs: dict, capsys: pytest.CaptureFixture) -> None:
    path = _sweep(tmp_path)
    committed = tmp_path / "committed"
    append_row(committed / "t.csv", {"run_id": "micro__pastis__full__lf100__s0", "sweep": "t", "model": "micro",
                                     "model_label": "micro", "pretrained": False, "task": "pastis",
                                     "task_label": "PASTIS", "kind": "segmentation", "setting": "full",
                                     "setting_label": "Full", "label_fraction": 1.0, "seed": 0, "status": "ok",
                                     "m1": 0.1, "m2": 0.2, "m3": 0.3, "tunable_params": 1, "total_params": 1,
                                     "train_s": 1, "peak_rss_mb": 1})
    # default: a results folder of this sweep's runs; the committed CSV is neither read nor written
    assert main([*_args(path, tmp_path), "--list"]) == 0
    assert capsys.readouterr().out.splitlines() == ["todo  micro__pastis__full__lf100__s0",
                                                    "todo  other__pastis__full__lf100__s0"]
    assert main(_args(path, tmp_path)) == 0
    fresh = tmp_path / "runs" / "t" / "results"
    assert {r["run_id"] for r in read_rows(fresh / "t.csv")} == {"micro__pastis__full__lf100__s0",
                                                                  "other__pastis__full__lf100__s0"}
    assert len(read_rows(committed / "t.csv")) == 1 and not (committed / "t.md").exists()
    # named explicitly: its recorded run is skipped, the other one is run and appended there
    fake_runs["_executed"].clear()
    assert main([*_args(path, tmp_path), "--results-dir", str(committed)]) == 0
    assert fake_runs["_executed"] == ["other__pastis__full__lf100__s0"]
    assert len(read_rows(committed / "t.csv")) == 2


@pytest.mark.parametrize("name,content", [("t.md", "# My notes on the sweep\n\nhand-written\n"),
                                          ("t.png", b"\x89PNG\r\n\x1a\n my own drawing"),
                                          ("t.csv", "model,score\nmine,0.9\n")])
def test_a_hand_written_file_with_an_output_name_stops_the_sweep_before_it_runs(
        tmp_path: Path, fake_runs: dict, capsys: pytest.CaptureFixture, name: str, content: str | bytes) -> None:
    path = _sweep(tmp_path)
    results = tmp_path / "results"
    results.mkdir()
    target = results / name
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    for extra in ([], ["--render"]):
        assert main([*_args(path, tmp_path), "--results-dir", str(results), *extra]) == 2
        err = capsys.readouterr().err
        assert str(target) in err and "written by `eoplugins sweep`" in err and "refusing to" in err
    assert target.read_bytes() == (content if isinstance(content, bytes) else content.encode())
    assert fake_runs["_executed"] == []
    assert sorted(p.name for p in results.iterdir()) == [name]


def test_append_row_refuses_a_csv_of_another_format(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("model,score\nmine,0.9\n")
    with pytest.raises(SweepOutputError, match=r"t.csv: not a results CSV written by `eoplugins sweep`"):
        append_row(path, {"run_id": "x", "status": "ok"})
    assert path.read_text() == "model,score\nmine,0.9\n"


def test_produced_by_line_is_rewritten_only_by_an_invocation_that_produced_rows(
        tmp_path: Path, fake_runs: dict) -> None:
    path = _sweep(tmp_path)
    results = tmp_path / "results"
    base = [*_args(path, tmp_path), "--results-dir", str(results)]
    assert main([*base, "--only", "micro"]) == 0
    md = results / "t.md"
    assert is_sweep_markdown(md) and is_sweep_plot(results / "t.png", md)
    line = next(ln for ln in md.read_text().splitlines() if ln.startswith("Produced by"))
    assert "--only micro" in line
    # a hand note on the line survives a re-render and a re-run with nothing to do
    md.write_text(md.read_text().replace(line, line + " Rerun by hand on an idle machine."))
    for extra in (["--render"], ["--only", "micro"]):
        assert main([*base, *extra]) == 0
        assert (line + " Rerun by hand on an idle machine.") in md.read_text().splitlines()
    # a run that produced rows writes its own command
    assert main([*base, "--only", "other"]) == 0
    lines = md.read_text().splitlines()
    assert [ln for ln in lines if ln.startswith("Produced by")][0].startswith("Produced by `eoplugins sweep")
    assert any("--only other" in ln for ln in lines if ln.startswith("Produced by"))


def test_legacy_leaderboards_written_before_the_marker_are_recognised(tmp_path: Path) -> None:
    committed = REPO / "benchmarks" / "results" / "smoke.md"
    if committed.is_file():
        assert is_sweep_markdown(committed)
    legacy = tmp_path / "x.md"
    legacy.write_text("## Leaderboard: x\n\nProduced by `eoplugins sweep x.yaml`; raw rows: `x.csv`.\n")
    assert is_sweep_markdown(legacy)
    legacy.write_text("## Leaderboard: x\n\nMy own table\n")
    assert not is_sweep_markdown(legacy)


def test_exit_status_reports_failed_runs_empty_selections_and_missing_worlds(
        tmp_path: Path, fake_runs: dict, capsys: pytest.CaptureFixture) -> None:
    path = _sweep(tmp_path)
    results = tmp_path / "results"
    base = ["sweep", str(path), "--repo", str(REPO), "--runs-dir", str(tmp_path / "runs"), "--results-dir",
            str(results)]
    # --only matching nothing: usage error, nothing written
    assert main([*base, "--world", str(tmp_path), "--only", "no_such_model"]) == 2
    assert "--only 'no_such_model' matches none of the 2 run ids" in capsys.readouterr().err
    assert main([*base, "--world", str(tmp_path), "--only", "no_such_model", "--list"]) == 2
    # a --world that does not exist: usage error before any run
    missing = tmp_path / "no_world"
    assert main([*base, "--world", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "--world" in err and str(missing) in err and "eoplugins synth" in err
    assert fake_runs["_executed"] == [] and not results.exists()
    # a failed run: exit 1, and again on a re-run that does not retry it; 0 once the retry succeeds
    fake_runs["other__pastis__full__lf100__s0"] = "failed"
    assert main([*base, "--world", str(tmp_path)]) == 1
    assert "1 run(s) failed: other__pastis__full__lf100__s0" in capsys.readouterr().err
    assert main([*base, "--world", str(tmp_path)]) == 1
    assert main([*base, "--world", str(missing), "--render"]) == 0  # rendering needs no world and runs nothing
    fake_runs["other__pastis__full__lf100__s0"] = "ok"
    assert main([*base, "--world", str(tmp_path), "--retry-failed"]) == 0
    assert main([*base, "--world", str(missing)]) == 0  # nothing to do: the world is not needed
