"""Progress output of long preparation steps (``runtime.Progress``): tokenizer training and reading a split."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from terratorch_eoplugins.runtime import Progress, visible_info


def test_progress_lines_count_elapsed_and_eta(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("terratorch_eoplugins.test_progress")
    with caplog.at_level(logging.INFO, logger="terratorch_eoplugins"):
        with Progress(log, "fitting something", total=4, unit="steps", every_s=0) as progress:
            for i in range(4):
                progress.update(note=f"loss {i}")
    lines = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert lines[0] == "fitting something: started (4 steps)"
    assert re.fullmatch(r"fitting something: 1/4 steps \(25 %\), \d+ s elapsed, ETA \d+ s, loss 0", lines[1])
    assert re.fullmatch(r"fitting something: 4/4 steps, \d+ s elapsed, done", lines[-1])
    assert len(lines) == 5  # start, 3 intermediate lines (none when the last unit is done), the end


def test_tokenizer_fitting_reports_progress(caplog: pytest.LogCaptureFixture) -> None:
    from terratorch_eoplugins.models.tsfusion_tokenizers import TSFusionTokenizers

    tok = TSFusionTokenizers(["tmax", "prcp"], window=4, image_size=16, ts_kind="fsq", image_steps=3, fsq_steps=2)
    gen = torch.Generator().manual_seed(0)
    with caplog.at_level(logging.INFO, logger="terratorch_eoplugins"):
        tok.fit(torch.rand(6, 3, 16, 16, generator=gen), torch.rand(6, 2, 4, generator=gen))
    lines = [r.getMessage() for r in caplog.records if r.name == "terratorch_eoplugins.nn"]
    started = [m for m in lines if m.endswith("started (2 steps)") or m.endswith("started (3 steps)")]
    finished = [m for m in lines if re.search(r": (2/2|3/3) steps, \d+ s elapsed, done, loss [\d.]+$", m)]
    assert len(started) == 2 and len(finished) == 2, lines
    assert all(m.startswith("training the ") for m in started)
    assert tok.fitted


def test_visible_info_shows_lines_only_where_nothing_else_would(capsys: pytest.CaptureFixture[str]) -> None:
    bare = logging.getLogger("eoplugins_progress_test_bare")
    bare.propagate = False  # like a program with no logging set up at all (terratorch fit)
    with visible_info(bare):
        bare.info("shown")
    bare.info("not shown after the block")
    assert capsys.readouterr().err == "shown\n"
    assert not bare.handlers and bare.level == logging.NOTSET
