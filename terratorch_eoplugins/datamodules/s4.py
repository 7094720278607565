"""S4 datamodule: the PASTIS-R splits as aligned radar/optical pairs (pretraining) or one aligned modality
(fine-tuning).

The pairs are built by :class:`~terratorch_eoplugins.datasets.s4.S4PASTIS` (nearest-timestamp alignment,
:func:`~terratorch_eoplugins.datasets.s4.align_nearest_timestamps`); :class:`S4PASTISDataModule` chooses the
splits (a PASTIS-R protocol), the training crop and the loaders. Defaults are the paper's: every aligned date of
the shorter series and RGB optical input; batches of series with different date counts are padded with the
series' last date and carry ``date_mask`` (:func:`~terratorch_eoplugins.datasets.s4.collate_s4`), which always
reaches the task and the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from terratorch_eoplugins.datamodules.pastis import PASTISDataModule
from terratorch_eoplugins.datasets.common import filter_batch_keys, split_modalities
from terratorch_eoplugins.datasets.s4 import CLOUD_BLUE_THRESHOLD, S4_RGB_BANDS, S4PASTIS, collate_s4

__all__ = ["S4PASTISDataModule"]


class S4PASTISDataModule(PASTISDataModule):
    """Train/val/test :class:`S4PASTIS` series of a PASTIS-R split protocol.

    Args:
        root: the ``PASTIS-R`` directory.
        optical: optical modality (``"S2"``).
        radar: radar modality (``"S1A"`` or ``"S1D"``).
        num_dates: aligned dates per sample (``linspace``); ``None`` (default, paper) keeps every aligned date
            (variable per patch: batches are padded and carry ``date_mask``); 6 was the project's earlier default.
        max_gap_days: maximum date gap of a pair (``None``: spans must overlap).
        crop_size: random crop of the *train* samples (``None``: full 128 x 128 patches).
        optical_bands: S2 channels served as optical (default RGB as in the paper; ``None``: all 10 bands).
        inference_modality: ``None`` (pretraining: both modalities) or ``"optical"`` / ``"radar"`` (fine-tuning:
            ``image`` is that modality's aligned series).
        cloud_source, cloud_threshold: cloud cover of the optical dates (:class:`S4PASTIS`).
        protocol, fold_rotation, void_label, label_fraction, seed, batch_size, num_workers, batch_keys,
        normalize, reference_date: as :class:`PASTISDataModule` (``date_mask`` is always kept).
    """

    def __init__(self, root: str = "data/demo/PASTIS-R", optical: str = "S2", radar: str = "S1A",
                 num_dates: int | None = None, max_gap_days: float | None = None, crop_size: int | None = None,
                 optical_bands: Sequence[int] | None = S4_RGB_BANDS,
                 inference_modality: Literal["optical", "radar"] | None = None, cloud_source: str = "auto",
                 cloud_threshold: float = CLOUD_BLUE_THRESHOLD,
                 protocol: Literal["pangaea", "official"] = "pangaea", fold_rotation: int = 0,
                 void_label: int | None = -1, label_fraction: float = 1.0, seed: int = 0, batch_size: int = 4,
                 num_workers: int = 0, batch_keys: Sequence[str] | None = (), normalize: bool = True,
                 reference_date: str = "2018-09-01") -> None:
        if batch_keys is not None and "date_mask" not in batch_keys:
            batch_keys = [*batch_keys, "date_mask"]
        super().__init__(root=root, modalities=(optical, radar), protocol=protocol, fold_rotation=fold_rotation,
                         num_dates=num_dates, void_label=void_label, label_fraction=label_fraction, seed=seed,
                         batch_size=batch_size, num_workers=num_workers, batch_keys=batch_keys, normalize=normalize,
                         reference_date=reference_date)
        self.dataset_class = S4PASTIS
        self.optical, self.radar = optical, radar
        self.max_gap_days, self.crop_size = max_gap_days, crop_size
        self.s4_kwargs = {"optical_bands": None if optical_bands is None else list(optical_bands),
                          "inference_modality": inference_modality, "cloud_source": cloud_source,
                          "cloud_threshold": cloud_threshold}

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = filter_batch_keys(collate_s4(samples), self.batch_keys)
        if self.image_modalities is not None:
            batch["image"] = split_modalities(batch["image"], self.image_modalities)
        return batch

    def _make(self, split: str, folds: Sequence[int], **extra: Any) -> S4PASTIS:
        kw = {k: v for k, v in self.kwargs.items() if k != "modalities"}
        crop = self.crop_size if split == "train" else None
        return S4PASTIS(split=split, folds=folds, optical=self.optical, radar=self.radar,
                        max_gap_days=self.max_gap_days, crop_size=crop, **self.s4_kwargs, **kw,
                        **extra)  # type: ignore[arg-type]
