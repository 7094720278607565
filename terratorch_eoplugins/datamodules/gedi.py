"""Lightning datamodule for GEDI-collocated Sentinel-1/2 chips.

Splits and loaders of :class:`~terratorch_eoplugins.datasets.gedi_chips.GEDIChips`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from terratorch_eoplugins.datamodules._base import EODataModule
from terratorch_eoplugins.datasets.gedi_chips import GEDIChips

__all__ = ["FootprintBatchSampler", "GEDIDataModule"]


class FootprintBatchSampler(Sampler[list[int]]):
    """Batches of chips that together hold about ``footprints_per_batch`` GEDI footprints (DUNIA's waveform diffusion
    trains on batches of 4096 *footprints*, appendix E.2, while a chip holds a varying number of them).

    Every epoch the chips are shuffled (with torch's random generator, as ``shuffle=True`` does, so seeding and
    resuming behave the same) and laid end to end by footprint count; the run of ``T`` footprints is cut into
    ``B = max(1, T // footprints_per_batch)`` equal parts and each chip goes to the part holding the middle of its
    footprints. Every chip is used once per epoch; a batch holds ``T / B`` footprints give or take the largest
    chip's count (so at least ``footprints_per_batch`` minus that); ``len`` is ``B`` (fewer batches only when one chip
    holds more than a part, which then stands alone). Chips without a footprint are never batched.

    Args:
        counts: footprints of each chip of the dataset (``len(chip_members[i])``).
        footprints_per_batch: target footprints per batch.
        shuffle: draw a new order every epoch (else the dataset order).
    """

    def __init__(self, counts: Sequence[int], footprints_per_batch: int, shuffle: bool = True) -> None:
        if footprints_per_batch < 1:
            raise ValueError(f"footprints_per_batch must be >= 1, got {footprints_per_batch}")
        self.counts = np.asarray(counts, np.int64)
        if self.counts.ndim != 1 or (self.counts < 0).any():
            raise ValueError("counts must be one non-negative footprint count per chip")
        self.footprints_per_batch, self.shuffle = int(footprints_per_batch), bool(shuffle)
        self.total = int(self.counts.sum())

    def __len__(self) -> int:
        return max(1, self.total // self.footprints_per_batch) if self.total else 0

    def __iter__(self) -> Iterator[list[int]]:
        if self.total == 0:
            return
        order = (torch.randperm(len(self.counts)).numpy() if self.shuffle else np.arange(len(self.counts)))
        order = order[self.counts[order] > 0]
        c = self.counts[order]
        middle = np.cumsum(c) - c / 2.0
        n = len(self)
        part = np.minimum((middle * n / self.total).astype(np.int64), n - 1)
        for k in range(n):
            chips = order[part == k]
            if len(chips):
                yield chips.tolist()


class GEDIDataModule(EODataModule):
    """Train/val/test :class:`GEDIChips` with spatial-block splits.

    Batches hold ``image`` ``[B,14,H,W]``, the sparse target map ``mask`` (``ignore_value`` away from
    footprints: set the same value as the task's ``ignore_index``), and, when listed in
    ``batch_keys``, ``footprints``, ``footprint_mask``, ``waveform``, ``rh98``, ``cover``, ``pai``,
    ``shot_number``, ``crs``, ``transform``, ``bounds``, ``location_coords``.

    ``dense_target`` (a GEDI-derived 10 m product GeoTIFF, e.g. a canopy-height map) gives the splits
    in ``dense_splits`` (default: train only) a dense target map instead of the footprints, and keeps
    their chips without footprints; the other splits stay on the footprints, so validation and test
    measure the same GEDI shots as the zero-shot retrieval.

    YAML::

        data:
          class_path: terratorch_eoplugins.datamodules.gedi.GEDIDataModule
          init_args: {root: data/demo/GEDI, chip_size: 64, targets: [rh98], batch_size: 8}
    """

    def __init__(self, root: str = "data/demo/GEDI", composite: str | None = None, chip_size: int = 64,
                 targets: Sequence[str] = ("rh98",), ignore_value: float = -1.0, require_footprints: bool = True,
                 max_footprints: int | None = None, waveform_length: int = 1420, waveform_mode: str = "pad",
                 filter_quality: bool = True, filter_degrade: bool = True, min_sensitivity: float | None = 0.9,
                 filter_l2b_quality: bool = True, power_beams_only: bool = False, night_only: bool = False,
                 block_chips: int = 2, split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
                 label_fraction: float = 1.0, seed: int = 0, s2_units: str = "auto",
                 batch_size: int = 8, num_workers: int = 0, batch_keys: Sequence[str] | None = (),
                 image_modalities: Mapping[str, Sequence[int]] | None = None, dense_target: str | None = None,
                 dense_splits: Sequence[str] = ("train",), leaf_on_months: Sequence[int] | None = None,
                 waveform_window: str = "full", composite_20m: str | None = None,
                 upsample_20m: str = "cubic", footprints_per_batch: int | None = None) -> None:
        """Collect the :class:`GEDIChips` arguments (see there); ``composite`` defaults to
        ``root/S2L2A_S1GRD_composite.tif``. ``leaf_on_months``, ``waveform_window``, ``composite_20m`` and
        ``upsample_20m`` are DUNIA's preprocessing options (off by default; set in the DUNIA configs).
        ``label_fraction`` applies to the training split only.
        ``image_modalities`` splits the 14-band chips into named modalities (see :class:`EODataModule`).
        ``dense_target``/``dense_splits``: see the class docstring. ``footprints_per_batch``: training batches are
        groups of chips holding about this many footprints in all (:class:`FootprintBatchSampler`; DUNIA's
        diffusion recipe, 4096) instead of ``batch_size`` chips; validation and test keep ``batch_size``."""
        if footprints_per_batch is not None and footprints_per_batch < 1:
            raise ValueError(f"footprints_per_batch must be >= 1 (or null: batch_size chips), got "
                             f"{footprints_per_batch}")
        bad = sorted(set(dense_splits) - {"train", "val", "test"})
        if bad:
            raise ValueError(f"dense_splits may only name 'train', 'val' and 'test', got {list(dense_splits)}")
        super().__init__(GEDIChips, batch_size=batch_size, num_workers=num_workers, batch_keys=batch_keys,
                         image_modalities=image_modalities,
                         root=str(root), composite=None if composite is None else str(Path(composite)),
                         chip_size=chip_size, targets=tuple(targets), ignore_value=ignore_value,
                         require_footprints=require_footprints, max_footprints=max_footprints,
                         waveform_length=waveform_length, waveform_mode=waveform_mode,
                         filter_quality=filter_quality, filter_degrade=filter_degrade,
                         min_sensitivity=min_sensitivity, filter_l2b_quality=filter_l2b_quality,
                         power_beams_only=power_beams_only, night_only=night_only, block_chips=block_chips,
                         split_fractions=tuple(split_fractions), label_fraction=label_fraction, seed=seed,
                         s2_units=s2_units,
                         leaf_on_months=None if leaf_on_months is None else tuple(leaf_on_months),
                         waveform_window=waveform_window,
                         composite_20m=(None if composite_20m is None else composite_20m if composite_20m == "auto"
                                        else str(Path(composite_20m))),
                         upsample_20m=upsample_20m)
        self.dense_target = None if dense_target is None else str(Path(dense_target))
        self.dense_splits = tuple(dense_splits)
        self.footprints_per_batch = footprints_per_batch

    def split_dataset(self, split: str, dense_target: str | Path | None = None) -> GEDIChips:
        """The :class:`GEDIChips` of ``split`` with this module's arguments: footprint targets, or with
        ``dense_target`` that product's dense map (chips without footprints kept)."""
        kwargs = dict(self.kwargs)
        if dense_target is not None:
            kwargs.update(dense_target=str(dense_target), require_footprints=False)
        return self.dataset_class(split=split, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """``batch_size`` chips per batch, or with ``footprints_per_batch`` the chips of a
        :class:`FootprintBatchSampler` batch."""
        if self.footprints_per_batch is None:
            return super().train_dataloader()
        dataset = self._valid_attribute("train_dataset", "dataset")
        sampler = FootprintBatchSampler([len(m) for m in dataset.chip_members], self.footprints_per_batch)
        return DataLoader(dataset=dataset, batch_sampler=sampler, num_workers=self.num_workers,
                          collate_fn=self.collate_fn, persistent_workers=self.num_workers > 0)

    def _split_dataset(self, split: str) -> GEDIChips:
        return self.split_dataset(split, self.dense_target if split in self.dense_splits else None)

    def setup(self, stage: str) -> None:
        """Build the split datasets (fit: train + val, validate: val, test/predict: test)."""
        if stage == "fit":
            self.train_dataset = self._split_dataset("train")
        if stage in ("fit", "validate"):
            self.val_dataset = self._split_dataset("val")
        if stage == "test":
            self.test_dataset = self._split_dataset("test")
        if stage == "predict":
            self.predict_dataset = self._split_dataset("test")
