"""S4 samples: nearest-timestamp pairing of two date series, aligned PASTIS-R radar/optical pairs."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from terratorch_eoplugins.datasets.pastis import PASTIS
from terratorch_eoplugins.datasets.s4 import S4PASTIS, align_nearest_timestamps, collate_s4, estimate_cloud_cover
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
    ds = S4PASTIS(root, folds=(1, 2, 3, 4, 5))  # defaults: every aligned date, RGB optical
    full = PASTIS(root, folds=(1, 2, 3, 4, 5), modalities=("S2", "S1A"), num_dates=None)
    for i in range(len(ds)):
        s, f = ds[i], full[i]
        opt, rad = s["image"]["optical"], s["image"]["radar"]
        d_o, d_r = f["dates"]["S2"].numpy(), f["dates"]["S1A"].numpy()
        t_min = min(len(d_o), len(d_r))
        assert opt.shape[1] == rad.shape[1] == t_min and opt.shape[0] == 3 and rad.shape[0] == 3
        # independent check: each kept date's partner is a closest acquisition of the other series
        short, other = (s["dates"]["radar"], s["dates"]["optical"]) if len(d_r) <= len(d_o) else (
            s["dates"]["optical"], s["dates"]["radar"])
        pool = d_o if len(d_r) <= len(d_o) else d_r
        for a, b in zip(short.numpy(), other.numpy()):
            assert abs(a - b) == np.abs(pool - a).min()
        # the pixels are those of the chosen dates
        j = int(np.flatnonzero(d_o == s["dates"]["optical"][0].item())[0])
        assert torch.equal(opt[:, 0], f["image"]["S2"][[2, 1, 0], j])  # B4, B3, B2
        assert torch.allclose(s["cloud_cover"], f["cloud_cover"][[int(np.flatnonzero(d_o == d)[0])
                                                                  for d in s["dates"]["optical"].numpy()]])
    s = S4PASTIS(root, split="train", num_dates=3, crop_size=32, optical_bands=None)[0]  # earlier choices as options
    assert s["image"]["optical"].shape == (10, 3, 32, 32) and s["mask"].shape == (32, 32)
    import matplotlib.pyplot as plt
    plt.close(ds.plot(ds[0], suptitle="pair"))
    with pytest.raises(ValueError, match="radar must be one of"):
        S4PASTIS(root, radar="S2")
    with pytest.raises(ValueError, match="crop_size"):
        S4PASTIS(root, crop_size=500)


# ----------------------------------------------------------------------------- batching rule, single modality, clouds
def test_collate_pads_with_the_last_date_and_marks_real_dates() -> None:
    a = {"image": torch.arange(2 * 3 * 1 * 1.0).view(2, 3, 1, 1), "mask": torch.zeros(1, 1),
         "cloud_cover": torch.tensor([0.1, 0.2, 0.3])}
    b = {"image": torch.arange(2 * 5 * 1 * 1.0).view(2, 5, 1, 1) + 100, "mask": torch.zeros(1, 1),
         "cloud_cover": torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0])}
    batch = collate_s4([a, b])
    assert batch["image"].shape == (2, 2, 5, 1, 1)
    assert batch["date_mask"].tolist() == [[True, True, True, False, False], [True] * 5]
    assert batch["image"][0, :, 3:, 0, 0].tolist() == [[2.0, 2.0], [5.0, 5.0]]  # last date repeated
    assert torch.equal(batch["image"][1], b["image"])
    assert torch.isnan(batch["cloud_cover"][0, 3:]).all() and batch["cloud_cover"][0, :3].tolist() == pytest.approx(
        [0.1, 0.2, 0.3])
    pair = collate_s4([{"image": {"optical": a["image"], "radar": a["image"]}},
                       {"image": {"optical": b["image"], "radar": b["image"]}}])
    assert pair["image"]["radar"].shape == (2, 2, 5, 1, 1) and pair["date_mask"].sum().item() == 8


def test_inference_modality_serves_one_aligned_series(tiny_world_dir: Path) -> None:
    root = tiny_world_dir / "PASTIS-R"
    both = S4PASTIS(root, folds=(1,))
    for m in ("optical", "radar"):
        one = S4PASTIS(root, folds=(1,), inference_modality=m)
        s, ref = one[0], both[0]
        assert torch.equal(s["image"], ref["image"][m]) and torch.equal(s["dates"], ref["dates"][m])
        assert torch.equal(s["cloud_cover"], ref["cloud_cover"])
    with pytest.raises(ValueError, match="inference_modality"):
        S4PASTIS(root, inference_modality="S2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="optical_bands"):
        S4PASTIS(root, optical_bands=[10])


def test_cloud_cover_estimate_from_the_blue_band(tiny_world_dir: Path, tmp_path: Path) -> None:
    # independent computation: share of pixels whose B2 / 10000 exceeds 0.2, per date
    x = np.zeros((10, 2, 4, 5), np.float32)
    x[0, 0, :2] = 2500  # 10 of 20 pixels bright in blue on date 0
    x[1:, 1] = 9000  # date 1 bright in other bands only: not counted
    x[0, 1, 0, 0] = 2000  # exactly at the threshold: not counted
    assert estimate_cloud_cover(x).tolist() == [0.5, 0.0]
    assert estimate_cloud_cover(x, threshold=0.1).tolist() == pytest.approx([0.5, 0.05])
    root = tiny_world_dir / "PASTIS-R"
    est = S4PASTIS(root, folds=(1, 2), cloud_source="estimate")
    raw = PASTIS(root, folds=(1, 2), modalities=("S2",), num_dates=None, normalize=False)
    meta = S4PASTIS(root, folds=(1, 2), cloud_source="metadata")
    for i in range(len(est)):
        io, _ = est.aligned_indices(i)
        expected = ((raw[i]["image"][0, io] / 10000 > 0.2).float().mean((1, 2))).numpy()
        assert est[i]["cloud_cover"].numpy() == pytest.approx(expected, abs=1e-6)  # from de-normalised values
        # the synthetic world's cloud masks: the estimate finds the cloudy dates of the metadata field
        m = meta[i]["cloud_cover"].numpy()
        assert set(np.flatnonzero(m > 0.3)) <= set(np.flatnonzero(est[i]["cloud_cover"].numpy() > 0.1))
    # a user-supplied file
    ids = [str(p["id_patch"]) for p in est.patches]
    supplied = {k: [0.25] * len(p["dates"]["S2"]) for k, p in zip(ids, est.patches)}
    path = tmp_path / "clouds.json"
    path.write_text(__import__("json").dumps(supplied))
    s = S4PASTIS(root, folds=(1, 2), cloud_source=str(path))[0]
    assert s["cloud_cover"].tolist() == [0.25] * s["image"]["optical"].shape[1]
    path.write_text(__import__("json").dumps({ids[0]: [0.1]}))
    with pytest.raises(EODataError, match="cloud fractions, expected one per S2 date"):
        S4PASTIS(root, folds=(1, 2), cloud_source=str(path))[0]
    with pytest.raises(ValueError, match="cloud_source"):
        S4PASTIS(root, cloud_source="nowhere.json")
