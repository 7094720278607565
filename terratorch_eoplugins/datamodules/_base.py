"""Base Lightning datamodule shared by the package's datamodules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import DataLoader
from torchgeo.datamodules import NonGeoDataModule

from terratorch_eoplugins.datasets.common import collate_samples, filter_batch_keys, split_modalities


class EODataModule(NonGeoDataModule):
    """:class:`torchgeo.datamodules.NonGeoDataModule` with metadata-aware collation.

    * Normalisation happens in the datasets (their statistics come with the data), so the
      torchgeo batch augmentation is the identity unless a subclass sets ``train_aug``.
    * ``batch_keys`` names the extra sample keys (dates, georeferencing...) that reach the model;
      everything else is dropped after collation so that baselines which reject unknown keyword
      arguments (Prithvi, ``TemporalWrapper``) work. ``None`` keeps every key.
    * ``image_modalities`` optionally splits a stacked ``image`` tensor into a dict of modalities by
      channel indices, e.g. ``{"S2L2A": [0, ..., 11], "S1GRD": [12, 13]}`` for TerraMind's multimodal input.
    """

    def __init__(self, dataset_class: type, batch_size: int = 8, num_workers: int = 0,
                 batch_keys: Sequence[str] | None = (), image_modalities: Mapping[str, Sequence[int]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(dataset_class, batch_size, num_workers, **kwargs)
        self.batch_keys = None if batch_keys is None else list(batch_keys)
        self.image_modalities = None if image_modalities is None else {k: list(v) for k, v in image_modalities.items()}
        self.collate_fn = self._collate
        self.aug = lambda batch: batch  # datasets return normalised tensors

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = filter_batch_keys(collate_samples(samples), self.batch_keys)
        if self.image_modalities is not None:
            batch["image"] = split_modalities(batch["image"], self.image_modalities)
        return batch

    def _dataloader_factory(self, split: str) -> DataLoader:
        dataset = self._valid_attribute(f"{split}_dataset", "dataset")
        batch_size = self._valid_attribute(f"{split}_batch_size", "batch_size")
        return DataLoader(dataset=dataset, batch_size=batch_size, shuffle=split == "train",
                          num_workers=self.num_workers, collate_fn=self.collate_fn,
                          persistent_workers=self.num_workers > 0)
