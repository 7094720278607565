"""S4 samples: nearest-timestamp pairing of two date series, aligned PASTIS-R radar/optical pairs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from terratorch_eoplugins.datasets.pastis import PASTIS
from terratorch_eoplugins.datasets.s4 import S4PASTIS, align_nearest_timestamps
from terratorch_eoplugins.errors import EODataError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- nearest-timestamp pairing
def test_alignment_keeps_the_shorter_series_and_picks_the_nearest_other_date() -> None:
    radar = [0, 6, 12, 18, 24, 30]
    optical = [5, 13, 29]
    idx_r, idx_o = align_nearest_timestamps(radar, optical)
    assert idx_o.tolist() == [0, 1, 2]  # optical is shorter: kept unchanged
    assert idx_r.tolist() == [1, 2, 5]  # 5 -> 6, 13 -> 12, 29 -> 30
    # the same with the arguments swapped
    idx_o2, idx_r2 = align_nearest_timestamps(optical, radar)
    assert idx_o2.tolist() == [0, 1, 2] and idx_r2.tolist() == [1, 2, 5]


def test_alignment_ties_are_explicit() -> None:
    # equal lengths: the first series is kept (S4 keeps radar, x_min := x_r when T_min = T_1)
    idx_a, idx_b = align_nearest_timestamps([10, 20], [0, 21])
    assert idx_a.tolist() == [0, 1] and idx_b.tolist() == [0, 1]
    # equally close candidates: the earlier acquisition wins, even when listed later
    _, idx = align_nearest_timestamps([10], [14, 6, 30])
    assert idx.tolist() == [1]
    # unsorted other series and repeated choices are fine
    _, idx = align_nearest_timestamps([1, 2], [50, 0, 3])
    assert idx.tolist() == [1, 2]


def test_alignment_missing_dates_gaps_and_errors(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="terratorch_eoplugins.datasets"):
        idx_a, idx_b = align_nearest_timestamps([0, np.nan, 20], [1, np.nan, 19, 40])
    assert idx_a.tolist() == [0, 2] and idx_b.tolist() == [0, 2] and "missing date" in caplog.text
    with pytest.raises(EODataError, match="no overlapping dates"):
        align_nearest_timestamps([0, 10, 20], [100, 120, 130, 150])
    with pytest.raises(EODataError, match="no overlapping dates.*max_gap_days"):
        align_nearest_timestamps([0, 10], [30, 45, 60], max_gap_days=15)
    with caplog.at_level(logging.WARNING, logger="terratorch_eoplugins.datasets"):
        idx_a, idx_b = align_nearest_timestamps([0, 10, 100], [2, 12, 14, 200], max_gap_days=15)
    assert idx_a.tolist() == [0, 1] and idx_b.tolist() == [0, 1] and "dropped" in caplog.text
    with pytest.raises(EODataError, match="radar: no acquisition date \\(T = 0\\)"):
        align_nearest_timestamps([], [1, 2], names=("radar", "optical"))
    with pytest.raises(EODataError, match="T = 0"):
        align_nearest_timestamps([1.0], [np.nan])


# ----------------------------------------------------------------------------- aligned PASTIS-R pairs
def test_s4_pastis_pairs_are_aligned_to_the_nearest_dates(tiny_world_dir: Path) -> None:
    root = tiny_world_dir / "PASTIS-R"
    ds = S4PASTIS(root, folds=(1, 2, 3, 4, 5), num_dates=None)
    full = PASTIS(root, folds=(1, 2, 3, 4, 5), modalities=("S2", "S1A"), num_dates=None)
    for i in range(len(ds)):
        s, f = ds[i], full[i]
        opt, rad = s["image"]["optical"], s["image"]["radar"]
        d_o, d_r = f["dates"]["S2"].numpy(), f["dates"]["S1A"].numpy()
        t_min = min(len(d_o), len(d_r))
        assert opt.shape[1] == rad.shape[1] == t_min and opt.shape[0] == 10 and rad.shape[0] == 3
        # independent check: each kept date's partner is a closest acquisition of the other series
        short, other = (s["dates"]["radar"], s["dates"]["optical"]) if len(d_r) <= len(d_o) else (
            s["dates"]["optical"], s["dates"]["radar"])
        pool = d_o if len(d_r) <= len(d_o) else d_r
        for a, b in zip(short.numpy(), other.numpy()):
            assert abs(a - b) == np.abs(pool - a).min()
        # the pixels are those of the chosen dates
        j = int(np.flatnonzero(d_o == s["dates"]["optical"][0].item())[0])
        assert torch.equal(opt[:, 0], f["image"]["S2"][:, j])
        assert torch.allclose(s["cloud_cover"], f["cloud_cover"][[int(np.flatnonzero(d_o == d)[0])
                                                                  for d in s["dates"]["optical"].numpy()]])
    s = S4PASTIS(root, split="train", num_dates=3, crop_size=32)[0]
    assert s["image"]["optical"].shape == (10, 3, 32, 32) and s["mask"].shape == (32, 32)
    import matplotlib.pyplot as plt
    plt.close(ds.plot(ds[0], suptitle="pair"))
    with pytest.raises(ValueError, match="radar must be one of"):
        S4PASTIS(root, radar="S2")
    with pytest.raises(ValueError, match="crop_size"):
        S4PASTIS(root, crop_size=500)
