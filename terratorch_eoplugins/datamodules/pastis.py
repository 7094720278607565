"""Lightning datamodule for PASTIS-R (PANGAEA split or the official 5-fold rotation)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from terratorch_eoplugins.datamodules._base import EODataModule
from terratorch_eoplugins.datasets.pastis import PASTIS, PASTIS_CLASSES, VOID_CLASS, pastis_num_classes, protocol_folds

__all__ = ["PASTISDataModule"]


class PASTISDataModule(EODataModule):
    """PASTIS-R train/val/test datasets of one split protocol.

    The train, val and test folds come from ``protocol`` / ``fold_rotation``; normalisation
    statistics are averaged over the train folds for every split; ``label_fraction`` subsamples the
    train split only. ``predict`` uses the test folds.
    """

    def __init__(
        self,
        root: str = "data/demo/PASTIS-R",
        modalities: Sequence[str] = ("S2",),
        protocol: Literal["pangaea", "official"] = "pangaea",
        fold_rotation: int = 0,
        num_dates: int | None = 6,
        void_label: int | None = -1,
        label_fraction: float = 1.0,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
        batch_keys: Sequence[str] | None = (),
        normalize: bool = True,
        reference_date: str = "2018-09-01",
    ) -> None:
        """Configure the datamodule.

        Args:
            root: the ``PASTIS-R`` directory.
            modalities: any of ``"S2"``, ``"S1A"``, ``"S1D"``.
            protocol: ``"pangaea"`` (folds 1-3 / 4 / 5) or ``"official"`` (5-fold rotation).
            fold_rotation: index 0-4 of the official rotation (0 for PANGAEA).
            num_dates: dates per sample by ``linspace``; ``None`` keeps all (use ``batch_size=1``).
            void_label: value of the void class in masks (``None`` keeps 19).
            label_fraction: fraction of the train patches kept (seeded by ``seed``).
            seed: seed of the ``label_fraction`` subset.
            batch_size: samples per batch.
            num_workers: data loader workers.
            batch_keys: extra sample keys passed to the model (e.g. ``temporal_coords``); ``None`` keeps all.
            normalize: standardise with the train folds' ``NORM_*_patch.json`` statistics.
            reference_date: ISO date that ``dates`` count days from.
        """
        if not 0.0 < label_fraction <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1], got {label_fraction}")
        self.train_folds, self.val_folds, self.test_folds = protocol_folds(protocol, fold_rotation)
        super().__init__(
            PASTIS, batch_size=batch_size, num_workers=num_workers, batch_keys=batch_keys,
            root=Path(root), protocol=protocol, fold_rotation=fold_rotation, modalities=tuple(modalities),
            num_dates=num_dates, void_label=void_label, normalize=normalize, norm_folds=self.train_folds,
            reference_date=reference_date,
        )
        self.label_fraction = label_fraction
        self.seed = seed
        self.void_label = void_label

    @property
    def num_classes(self) -> int:
        """Classes predicted by the model: 19 when void is mapped to ``void_label``, else 20."""
        return pastis_num_classes(self.void_label)

    @property
    def class_names(self) -> list[str]:
        """Names of the ``num_classes`` classes."""
        return list(PASTIS_CLASSES[: self.num_classes])

    @property
    def ignore_index(self) -> int | None:
        """Label value to ignore in losses and metrics (the void class)."""
        return VOID_CLASS if self.void_label is None else self.void_label

    def _make(self, split: str, folds: Sequence[int], **extra: Any) -> PASTIS:
        return PASTIS(split=split, folds=folds, **self.kwargs, **extra)  # type: ignore[arg-type]

    def setup(self, stage: str) -> None:
        """Build the datasets that ``stage`` (fit, validate, test, predict) needs."""
        if stage == "fit":
            self.train_dataset = self._make("train", self.train_folds, label_fraction=self.label_fraction,
                                            seed=self.seed)
        if stage in ("fit", "validate"):
            self.val_dataset = self._make("val", self.val_folds)
        if stage == "test":
            self.test_dataset = self._make("test", self.test_folds)
        if stage == "predict":
            self.predict_dataset = self._make("test", self.test_folds)
