"""Base Lightning datamodule shared by the package's datamodules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import DataLoader
from torchgeo.datamodules import NonGeoDataModule

from terratorch_eoplugins.datasets.common import (
    PREDICT_META_KEY,
    class_legend,
    collate_georeference,
    collate_samples,
    filter_batch_keys,
    split_modalities,
)


class EODataModule(NonGeoDataModule):
    """:class:`torchgeo.datamodules.NonGeoDataModule` with metadata-aware collation.

    * Normalisation happens in the datasets (their statistics come with the data), so the
      torchgeo batch augmentation is the identity unless a subclass sets ``train_aug``.
    * ``batch_keys`` names the extra sample keys (dates, georeferencing...) that reach the model;
      everything else is dropped after collation so that baselines which reject unknown keyword
      arguments (Prithvi, ``TemporalWrapper``) work. ``None`` keeps every key.
    * ``predict`` batches also carry ``predict_meta`` (:data:`~terratorch_eoplugins.datasets.common.PREDICT_META_KEY`):
      the samples' ``filename``, ``crs`` and ``transform`` and the dataset's class legend, which the prediction
      writer (:class:`terratorch_eoplugins.tasks.prediction_writer.GeoTIFFPredictionWriter`) removes from the
      batch before the model sees it and uses to write georeferenced maps.
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

    def _predict_meta(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """What the prediction writer needs besides the model output: georeferencing and the class legend."""
        meta = collate_georeference(samples)
        legend = class_legend(getattr(self, "predict_dataset", None))
        if legend is not None:
            meta["legend"] = legend
        return meta

    def _predict_collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate_fn(samples)
        batch[PREDICT_META_KEY] = self._predict_meta(samples)
        return batch

    def _dataloader_factory(self, split: str) -> DataLoader:
        dataset = self._valid_attribute(f"{split}_dataset", "dataset")
        batch_size = self._valid_attribute(f"{split}_batch_size", "batch_size")
        collate = self._predict_collate if split == "predict" else self.collate_fn
        return DataLoader(dataset=dataset, batch_size=batch_size, shuffle=split == "train",
                          num_workers=self.num_workers, collate_fn=collate,
                          persistent_workers=self.num_workers > 0)
