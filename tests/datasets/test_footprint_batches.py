"""Footprint batches (DUNIA's diffusion recipe: batches of 4096 footprints, appendix E.2): every chip once per
epoch, batches of about the target footprint count, the datamodule's training loader built on them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from terratorch_eoplugins.datamodules.gedi import FootprintBatchSampler, GEDIDataModule


def test_every_chip_once_and_batches_of_about_the_target() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 30, 200)
    counts[:5] = 0
    sampler = FootprintBatchSampler(counts, 250)
    total, largest = int(counts.sum()), int(counts.max())
    assert len(sampler) == total // 250
    torch.manual_seed(3)
    epochs = [list(sampler) for _ in range(3)]
    for batches in epochs:
        assert len(batches) == len(sampler)
        flat = sorted(i for b in batches for i in b)
        assert flat == sorted(np.nonzero(counts)[0].tolist())  # each chip with footprints exactly once
        sums = np.array([counts[b].sum() for b in batches])
        assert sums.sum() == total
        assert (np.abs(sums - total / len(batches)) <= largest).all(), sums
        assert (sums >= 250 - largest).all()
    assert epochs[0] != epochs[1]  # a new order every epoch
    torch.manual_seed(3)
    assert list(sampler) == epochs[0]  # torch's seed decides the order, as shuffle=True
    fixed = FootprintBatchSampler(counts, 250, shuffle=False)
    assert list(fixed) == list(fixed) and [i for b in fixed for i in b] == np.nonzero(counts)[0].tolist()


def test_small_totals_and_bad_arguments() -> None:
    assert list(FootprintBatchSampler([3, 0, 4], 100, shuffle=False)) == [[0, 2]]  # fewer than the target: one batch
    assert len(FootprintBatchSampler([0, 0], 10)) == 0 and list(FootprintBatchSampler([0, 0], 10)) == []
    with pytest.raises(ValueError, match="footprints_per_batch"):
        FootprintBatchSampler([1, 2], 0)
    with pytest.raises(ValueError, match="footprints_per_batch"):
        GEDIDataModule(root="unused", footprints_per_batch=0)


def test_datamodule_trains_on_footprint_batches(tiny_world_dir: Path) -> None:
    dm = GEDIDataModule(root=str(tiny_world_dir / "GEDI"), waveform_length=64, waveform_mode="resample",
                        batch_size=2, footprints_per_batch=60,
                        batch_keys=["footprints", "footprint_mask", "waveform", "shot_number"])
    dm.setup("fit")
    counts = np.array([len(m) for m in dm.train_dataset.chip_members])
    loader = dm.train_dataloader()
    assert len(loader) == int(counts.sum()) // 60 >= 2
    torch.manual_seed(0)
    seen = []
    for batch in loader:
        n = int(batch["footprint_mask"].sum())
        assert abs(n - counts.sum() / len(loader)) <= counts.max()
        seen.append(n)
    assert sum(seen) == counts.sum()  # every training footprint once per epoch
    assert next(iter(dm.val_dataloader()))["image"].shape[0] <= 2  # validation keeps batch_size chips
    # the tasks' statistics passes read the same footprint batches, in dataset order, RNG untouched
    from terratorch_eoplugins.tasks.preparation import train_split_batches

    state = torch.get_rng_state()
    ordered = [int(b["footprint_mask"].sum()) for b in train_split_batches(SimpleNamespace(datamodule=dm))]
    assert torch.equal(torch.get_rng_state(), state)
    fixed = FootprintBatchSampler(counts, 60, shuffle=False)
    assert ordered == [int(counts[b].sum()) for b in fixed] and len(ordered) == len(loader)
