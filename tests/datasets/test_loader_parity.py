"""The PASTIS loader returns exactly torchgeo's arrays for the same files, on every read path of the fast loader.

torchgeo's :class:`torchgeo.datasets.PASTIS` reads a whole patch with ``np.load`` and ``float()``; ours reads only
the kept dates in blocks (through a memory map of the file; without one, a scratch buffer and a cast for
int16/float16, ``preadv`` straight into the output for float32) and normalises each block in one fused pass
(numba; numpy's two passes as the fallback). The arrays must be bit-identical (``torch.equal``) to torchgeo's,
transposed to ``C x T x H x W``, cut to the PANGAEA dates and normalised with the same float32 operations.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torchgeo.datasets import PASTIS as TorchgeoPASTIS

sys.path.insert(0, str(Path(__file__).parent))
from pastis_fixtures import PatchSpec, write_pastis_tree  # noqa: E402

import terratorch_eoplugins.datasets.pastis as pastis_module  # noqa: E402
from terratorch_eoplugins.datasets.pastis import PASTIS  # noqa: E402

MODS = ("S2", "S1A", "S1D")


def _patches() -> list[PatchSpec]:
    # one patch per fold; S2 lengths around the PANGAEA 6 (fewer dates repeat indices), S1 up to 9 dates
    lengths = [(7, 9, 4), (3, 5, 6), (12, 8, 5), (6, 6, 9), (9, 4, 7)]
    return [PatchSpec(30000 + k, k + 1, {"S2": a, "S1A": b, "S1D": c}) for k, (a, b, c) in enumerate(lengths)]


@pytest.fixture(scope="module", params=[np.float16, np.float32], ids=["s1_float16", "s1_float32"])
def tree(request, tmp_path_factory):
    """A PASTIS-R tree under ``<tmp>/PASTIS-R`` (torchgeo's layout) with float16 or float32 S1."""
    return write_pastis_tree(tmp_path_factory.mktemp("parity") / "PASTIS-R", _patches(), s1_dtype=request.param)


def _torchgeo(tree) -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    """torchgeo's image of every patch per modality and its mask, by ID_PATCH."""
    out: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for m in MODS:
        ds = TorchgeoPASTIS(str(tree.root.parent), folds=(1, 2, 3, 4, 5), bands=m.lower())
        out[m] = {int(pid): ds[i] for i, pid in enumerate(ds.idxs)}
    return out


def _norm(tree, m: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the PANGAEA train folds 1-3, averaged from the JSON file as float64, then float32."""
    stats = json.loads((tree.root / f"NORM_{m}_patch.json").read_text())
    mean = np.mean([stats[f"Fold_{f}"]["mean"] for f in (1, 2, 3)], axis=0).astype(np.float32)
    std = np.mean([stats[f"Fold_{f}"]["std"] for f in (1, 2, 3)], axis=0).astype(np.float32)
    return mean, std


def _expected(ref: torch.Tensor, num_dates: int | None, norm: tuple[np.ndarray, np.ndarray] | None) -> torch.Tensor:
    x = ref.numpy()  # T x C x H x W float32, as torchgeo returns it
    if num_dates is not None:
        x = x[np.round(np.linspace(0, x.shape[0] - 1, num_dates)).astype(np.int64)]
    x = x.transpose(1, 0, 2, 3)
    if norm is not None:
        x = (x - norm[0][:, None, None, None]) / norm[1][:, None, None, None]
    return torch.from_numpy(np.ascontiguousarray(x))


def _check(tree, ref, modalities, num_dates, normalize) -> None:
    ds = PASTIS(tree.root, modalities=modalities, num_dates=num_dates, normalize=normalize, void_label=None)
    assert sorted(ds.ids) == sorted(ref["S2"])
    for k, pid in enumerate(ds.ids):
        s = ds[k]
        images = s["image"] if len(modalities) > 1 else {modalities[0]: s["image"]}
        for m in modalities:
            want = _expected(ref[m][pid]["image"], num_dates, _norm(tree, m) if normalize else None)
            got = images[m]
            assert got.dtype == torch.float32 and got.is_contiguous()
            assert torch.equal(got, want), f"patch {pid} {m} num_dates={num_dates} normalize={normalize}"
        assert torch.equal(s["mask"], ref["S2"][pid]["mask"])


@pytest.mark.parametrize("block_bytes", [1 << 20, 1], ids=["block_1MiB", "block_one_date"])
def test_pastis_arrays_equal_torchgeo(tree, block_bytes, monkeypatch):
    monkeypatch.setattr(pastis_module, "_BLOCK_BYTES", block_bytes)
    ref = _torchgeo(tree)
    for num_dates in (None, 6):
        for normalize in (False, True):
            _check(tree, ref, MODS, num_dates, normalize)
    _check(tree, ref, ("S1A",), None, True)


@pytest.mark.parametrize(("use_mmap", "fused", "scatter"), [(True, False, True), (False, True, True),
                                                            (False, True, False), (False, False, False)],
                         ids=["mmap_numpy", "read_fused", "scratch_fused", "scratch_numpy"])
def test_pastis_read_paths_agree(tree, use_mmap, fused, scatter, monkeypatch):
    """Every read path (memory map, scatter read for float32, scratch buffer) with the fused numba normalisation or
    numpy's passes, and the exact whole-array reader, give the same bytes as torchgeo's arrays."""
    ref = _torchgeo(tree)
    monkeypatch.setattr(pastis_module, "_USE_MMAP", use_mmap)
    monkeypatch.setattr(PASTIS, "fused", fused)
    if not scatter:
        monkeypatch.setattr(pastis_module, "_scatter_read", lambda *a: False)  # as after a short preadv / no preadv
    _check(tree, ref, MODS, None, True)
    ds = PASTIS(tree.root, modalities=MODS, num_dates=6)
    for k in range(len(ds)):
        patch = ds.patches[k]
        for m in MODS:
            fast, idx = ds._load_modality(patch, m)
            exact, idx_exact = ds._load_modality_exact(patch, m)
            assert np.array_equal(idx, idx_exact) and fast.tobytes() == exact.tobytes()
        assert np.array_equal(ds._load_mask(patch), ds._load_mask_exact(patch))


def test_pastis_outliers_take_the_exact_path(tmp_path):
    """A few S1 values outside the dB range (under 1 %): the fast checks cannot prove the check passes, the exact
    reader decides (it passes) and the sample is the same as torchgeo's."""
    tree = write_pastis_tree(tmp_path / "PASTIS-R", _patches()[:2], s1_dtype=np.float32)
    pid = tree.patches[0].id_patch
    path = tree.root / "DATA_S1A" / f"S1A_{pid}.npy"
    arr = np.load(path)
    arr[0, 0, :8, :8] = 75.0
    np.save(path, arr)
    ref = TorchgeoPASTIS(str(tmp_path), folds=(1, 2), bands="s1a")
    want = {int(p): ref[i]["image"] for i, p in enumerate(ref.idxs)}
    ds = PASTIS(tree.root, folds=(1, 2), modalities=("S1A",), num_dates=None)
    for k, p in enumerate(ds.ids):
        assert torch.equal(ds[k]["image"], _expected(want[p], None, _norm(tree, "S1A")))


def test_pastis_threads_share_nothing(tree):
    """Reading from several threads (each has its own scratch buffer) gives the same samples as one thread."""
    ds = PASTIS(tree.root, modalities=MODS, num_dates=None)
    one = [ds[k]["image"] for k in range(len(ds))]
    with ThreadPoolExecutor(4) as pool:
        many = list(pool.map(lambda k: ds[k]["image"], list(range(len(ds))) * 3))
    for k, sample in enumerate(many):
        assert all(torch.equal(sample[m], one[k % len(ds)][m]) for m in MODS)


def test_pastis_rewritten_file_is_read_again(tmp_path):
    """Parsed .npy headers are reused only for the same header bytes and a large enough file: a patch rewritten
    with another number of dates, or cut off, after a first read is checked again by the same dataset."""
    tree = write_pastis_tree(tmp_path / "PASTIS-R", _patches()[:1], modalities=("S2",))
    ds = PASTIS(tree.root, folds=(1,), num_dates=None, normalize=False)
    path = tree.root / "DATA_S2" / f"S2_{tree.patches[0].id_patch}.npy"
    first = ds[0]["image"]
    arr = np.load(path)
    np.save(path, arr[:-1])
    with pytest.raises(pastis_module.EODataError, match="6 dates in the array but 7"):
        ds[0]
    np.save(path, arr[:, ::-1].copy())  # same header, other values
    assert torch.equal(ds[0]["image"], torch.from_numpy(arr[:, ::-1].astype(np.float32).transpose(1, 0, 2, 3)))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(pastis_module.EODataError, match="truncated"):
        ds[0]
    np.save(path, arr)
    assert torch.equal(ds[0]["image"], first)
