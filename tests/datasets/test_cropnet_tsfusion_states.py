"""TS fusion's per-crop CropNet state subsets (Basile et al. 2025, appendix A.2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from terratorch_eoplugins.datamodules.cropnet import CropNetDataModule
from terratorch_eoplugins.datasets.cropnet import PAPER_STATES, US_STATES, CropNet, resolve_states
from terratorch_eoplugins.errors import EODataError


@pytest.fixture(scope="module")
def tiny(tiny_world_dir: Path) -> Path:
    return tiny_world_dir / "CropNet"  # the session's tiny world (shared with the other tests)


def test_paper_lists_and_counts():
    # appendix A.2: cotton 17 states, winter wheat 5, soybeans and corn the same 4
    assert {c: len(v) for c, v in PAPER_STATES.items()} == {"Cotton": 17, "WinterWheat": 5, "Soybeans": 4, "Corn": 4}
    assert PAPER_STATES["Corn"] == PAPER_STATES["Soybeans"] == ("Illinois", "Iowa", "Louisiana", "Mississippi")
    assert set(PAPER_STATES["WinterWheat"]) == {"Illinois", "Indiana", "Kansas", "Kentucky", "Mississippi"}
    assert all(s in US_STATES for v in PAPER_STATES.values() for s in v)
    assert resolve_states("paper", "Corn") == frozenset({"17", "19", "22", "28"})
    assert len(resolve_states("paper", "Cotton")) == 17
    # names, USPS codes and FIPS codes, any case
    assert resolve_states(["iowa", "IL", "48", 5], "Corn") == frozenset({"19", "17", "48", "05"})
    assert resolve_states(None, "Corn") is None


@pytest.mark.parametrize("bad", [["Iowa", "Narnia"], ["XX"], [], "Iowa"])
def test_unknown_states_are_errors(bad):
    with pytest.raises(ValueError, match="states"):
        resolve_states(bad, "Corn")
    with pytest.raises(ValueError, match="Narnia"):
        resolve_states(["Narnia"], "Corn")


def test_dataset_and_datamodule_keep_only_the_selected_states(tiny: Path):
    every = CropNet(tiny, crop="Corn", split="train")
    by_state = {}
    for r in every.records:
        by_state.setdefault(r["fips"][:2], []).append(r["fips"])
    assert len(by_state) >= 2, by_state  # the tiny world has several states
    keep = sorted(by_state)[0]
    only = CropNet(tiny, crop="Corn", split="train", states=[keep])
    assert sorted(r["fips"] for r in only.records) == sorted(by_state[keep])
    assert only.skipped["other_state"] == len(every) - len(only)
    paper = CropNet(tiny, crop="Corn", split="train", states="paper")
    want = {"17", "19", "22", "28"}
    assert sorted(r["fips"] for r in paper.records) == sorted(f for s, v in by_state.items() if s in want for f in v)
    with pytest.raises(EODataError, match="selected states"):
        CropNet(tiny, crop="Corn", split="train", states=["Alaska"])
    with pytest.raises(ValueError, match="Narnia"):
        CropNetDataModule(str(tiny), crop="Corn", states=["Narnia"]).setup("fit")
