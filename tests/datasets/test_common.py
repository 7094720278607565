"""Shared dataset helpers: collation of metadata, batch-key filtering, modality split, splits, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchgeo.datasets import DatasetNotFoundError

from terratorch_eoplugins.datasets.common import (
    collate_samples,
    filter_batch_keys,
    split_indices,
    split_modalities,
    subsample_fraction,
)
from terratorch_eoplugins.errors import EODataError, EODatasetNotFoundError, check_array, require_dir


def test_collate_stacks_equal_tensors_and_keeps_metadata_as_lists() -> None:
    samples = [{"image": torch.ones(2, 3), "dates": torch.arange(n), "crs": "EPSG:2154", "fold": 1 + n,
                "image_dict": {"S2": torch.zeros(1)}} for n in (2, 3)]
    b = collate_samples(samples)
    assert b["image"].shape == (2, 2, 3)
    assert isinstance(b["dates"], list) and [len(d) for d in b["dates"]] == [2, 3]
    assert b["crs"] == ["EPSG:2154", "EPSG:2154"]
    assert torch.equal(b["fold"], torch.tensor([3, 4]))
    assert b["image_dict"]["S2"].shape == (2, 1)


def test_filter_keeps_only_model_inputs_and_requested_keys() -> None:
    batch = {"image": 1, "mask": 2, "dates": 3, "crs": 4, "temporal_coords": 5}
    assert filter_batch_keys(batch, ()) == {"image": 1, "mask": 2}
    assert filter_batch_keys(batch, ["temporal_coords"]) == {"image": 1, "mask": 2, "temporal_coords": 5}
    assert filter_batch_keys(batch, None) == batch


def test_split_modalities_by_channel_indices() -> None:
    x = torch.arange(2 * 14 * 4, dtype=torch.float32).reshape(2, 14, 2, 2)
    d = split_modalities(x, {"S2L2A": list(range(12)), "S1GRD": [12, 13]})
    assert torch.equal(d["S1GRD"], x[:, 12:]) and d["S2L2A"].shape == (2, 12, 2, 2)
    with pytest.raises(EODataError, match=r"image_modalities\['S1GRD'\] indexes channels \[14\].*14 channels"):
        split_modalities(x, {"S1GRD": [13, 14]})


def test_splits_are_deterministic_partitions() -> None:
    a = split_indices(100, [0.7, 0.2, 0.1], seed=3)
    b = split_indices(100, [0.7, 0.2, 0.1], seed=3)
    assert [len(p) for p in a] == [70, 20, 10]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(100))
    sub = subsample_fraction(range(50), 0.1, seed=1)
    assert len(sub) == 5 and sub == subsample_fraction(range(50), 0.1, seed=1) and set(sub) <= set(range(50))
    with pytest.raises(ValueError, match="label fraction"):
        subsample_fraction(range(5), 0.0, seed=0)


def test_errors_name_the_path_and_the_expectation(tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError, match="PASTIS root not found: .*nowhere"):
        require_dir(tmp_path / "nowhere", "PASTIS root")
    assert issubclass(EODatasetNotFoundError, FileNotFoundError)
    with pytest.raises(EODataError, match=r"x.npy: expected shape \*x10x128x128, got 5x9x128x128"):
        check_array(np.zeros((5, 9, 128, 128)), "x.npy", shape=(None, 10, 128, 128))
    with pytest.raises(EODataError, match="x.npy: expected dtype int16, got float64"):
        check_array(np.zeros((2,)), "x.npy", dtypes=[np.int16])
