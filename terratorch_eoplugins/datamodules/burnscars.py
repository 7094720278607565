"""Lightning datamodule for HLS Burn Scars (PANGAEA split: 90/10 of ``training/``, test = ``validation/``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from terratorch_eoplugins.datamodules._base import EODataModule
from terratorch_eoplugins.datasets.burnscars import HLSBurnScars
from terratorch_eoplugins.datasets.common import logger


class HLSBurnScarsDataModule(EODataModule):
    """:class:`~terratorch_eoplugins.datasets.burnscars.HLSBurnScars` for ``fit``/``validate``/``test``/``predict``.

    Training scenes are random-cropped to ``crop_size``; validation, test and predict scenes are
    full 512x512 (PANGAEA evaluates them by sliding-window inference). ``predict`` uses the test split.

    Args:
        root: Folder holding ``training/`` and ``validation/`` (default: the synthetic demo world).
        batch_size: Samples per batch.
        num_workers: DataLoader workers.
        crop_size: Random crop side of training samples (``None``: full scenes).
        bands: Bands to load (default all six: BLUE, GREEN, RED, NIR_NARROW, SWIR_1, SWIR_2).
        label_fraction: Fraction of training scenes kept.
        seed: Seed of the ``label_fraction`` subsample.
        split_seed: ``random_state`` of the 90/10 train/val split (PANGAEA: 23).
        batch_keys: Extra sample keys passed on to the model (e.g. ``["temporal_coords", "location_coords"]``
            for Prithvi-EO-2.0 with metadata); ``None`` keeps every key.
        means, stds: Per-band normalisation statistics (reflectance units, in ``bands`` order or a
            band -> value mapping). When ``None`` they are computed once from the training split's
            images (at most ``stats_max_scenes`` scenes) and cached on the datamodule; nothing is
            written into the data folder. Pass :attr:`HLSBurnScars.MEANS` / ``STDS`` for Prithvi's.
        no_data_value: Image value marking missing data.
        no_data_replace: Reflectance written into no-data pixels (before normalisation).
        stats_max_scenes: Scenes read to compute ``means``/``stds``.
    """

    def __init__(
        self,
        root: str | Path = "data/demo/hls_burn_scars",
        batch_size: int = 8,
        num_workers: int = 0,
        crop_size: int | None = 224,
        bands: Sequence[str] | None = None,
        label_fraction: float = 1.0,
        seed: int = 0,
        split_seed: int = 23,
        batch_keys: Sequence[str] | None = (),
        means: Sequence[float] | Mapping[str, float] | None = None,
        stds: Sequence[float] | Mapping[str, float] | None = None,
        no_data_value: float = 9999.0,
        no_data_replace: float = 0.0,
        stats_max_scenes: int | None = 64,
    ) -> None:
        super().__init__(
            HLSBurnScars, batch_size=batch_size, num_workers=num_workers, batch_keys=batch_keys, root=root,
            bands=None if bands is None else list(bands), label_fraction=label_fraction, seed=seed,
            split_seed=split_seed, no_data_value=no_data_value, no_data_replace=no_data_replace,
        )
        if (means is None) != (stds is None):
            raise ValueError("means and stds must be given together (or both left None to compute them)")
        self.crop_size = crop_size
        self.means = means
        self.stds = stds
        self.stats_max_scenes = stats_max_scenes

    def _ensure_stats(self) -> None:
        """Compute ``means``/``stds`` from the training split once (cached on the datamodule)."""
        if self.means is not None and self.stds is not None:
            return
        train = HLSBurnScars(split="train", normalize=False, **self.kwargs)
        self.means, self.stds = train.band_statistics(max_scenes=self.stats_max_scenes)
        logger.info("HLS Burn Scars: band statistics from %d training scenes: means=%s stds=%s",
                    len(train), [round(m, 4) for m in self.means], [round(s, 4) for s in self.stds])

    def _dataset(self, split: str, **extra: Any) -> HLSBurnScars:
        return HLSBurnScars(split=split, means=self.means, stds=self.stds, **self.kwargs, **extra)

    def setup(self, stage: str) -> None:
        """Build the datasets of ``stage`` (``fit``, ``validate``, ``test`` or ``predict``)."""
        self._ensure_stats()
        if stage == "fit":
            self.train_dataset = self._dataset("train", crop_size=self.crop_size)
        if stage in ("fit", "validate"):
            self.val_dataset = self._dataset("val")
        if stage == "test":
            self.test_dataset = self._dataset("test")
        if stage == "predict":
            self.predict_dataset = self._dataset("test")
