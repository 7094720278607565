"""Lightning datamodule of TS-fusion pretraining: (image, daily weather window) pairs of the CropNet tree.

The pairs themselves (one per county, grid and image date; windows of ``before + 1 + after`` days around the
acquisition) are built by :func:`terratorch_eoplugins.datasets.tsfusion.cropnet_pairs`; this module chooses the
years of each split and the loaders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from terratorch_eoplugins.datasets.common import logger
from terratorch_eoplugins.datasets.cropnet import CROPS, CropNet
from terratorch_eoplugins.datasets.tsfusion import PairDataset, cropnet_pairs
from terratorch_eoplugins.datasets.weather_windows import hrrr_columns

__all__ = ["TSFusionPretrainDataModule"]


class TSFusionPretrainDataModule(pl.LightningDataModule):
    """(image, daily weather) pairs of the CropNet tree for correlation pretraining.

    Batches: ``image [B, C, H, W]`` (``/255``, no standardisation: the image tokenizer sees raw
    reflectance-like values), ``weather [B, V, L]`` in physical units (the weather tokenizer is fitted on
    them), ``coords [B, 2]`` grid centre (lat, lon), ``observed``, ``offset``, ``doy``.

    Args:
        root: the ``CropNet`` folder.
        crops: crops whose USDA county lists define the county-years (pairs are deduplicated by county-year;
            no yield is used).
        split_years: years of ``train``/``val``/``test`` pairs (default: pretrain on 2021 + 2022, validate on 2020).
        months: months of daily weather and images.
        weather: short weather names (:data:`~terratorch_eoplugins.datasets.weather_windows.TSFUSION_WEATHER`).
        before, after: window around the acquisition day.
        image_size: resize grid images to this side.
        min_observed: minimum fraction of observed (not interpolated) days in a window.
        max_pairs: keep at most this many pairs per split (random, seeded).
        batch_size, num_workers: loader settings.
        seed: seed of the subsampling.
    """

    def __init__(self, root: str = "data/demo/CropNet", crops: Sequence[str] = CROPS,
                 split_years: Mapping[str, Sequence[int]] | None = None, months: Sequence[int] = (4, 5, 6, 7, 8, 9),
                 weather: Sequence[str] = ("tavg", "tmax", "tmin", "precip"), before: int = 29, after: int = 10,
                 image_size: int | None = 32, min_observed: float = 0.5, max_pairs: int | None = None,
                 batch_size: int = 32, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.root = Path(root)
        self.crops = [CropNet._canonical_crop(c) for c in crops]
        if not self.crops:
            raise ValueError("crops must not be empty")
        years = split_years or {"train": (2021, 2022), "val": (2020,), "test": (2020,)}
        self.split_years = {k: tuple(int(y) for y in v) for k, v in years.items()}
        for s in ("train", "val"):
            if s not in self.split_years:
                raise ValueError(f"split_years must define 'train' and 'val', got {sorted(self.split_years)}")
        self.months = tuple(int(m) for m in months)
        self.weather = tuple(weather)
        self.columns = hrrr_columns(self.weather)
        if before < 0 or after < 0:
            raise ValueError(f"before and after must be >= 0, got {before}, {after}")
        self.before, self.after = int(before), int(after)
        if not 0 <= min_observed <= 1:
            raise ValueError(f"min_observed must be in [0, 1], got {min_observed}")
        self.min_observed = float(min_observed)
        self.image_size = image_size
        self.max_pairs = max_pairs
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.skipped: dict[str, int] = {"few_observed_days": 0}
        self._pairs: dict[str, PairDataset] = {}

    @property
    def window(self) -> int:
        """Days per weather window ``L``."""
        return self.before + 1 + self.after

    def pairs(self, split: str) -> PairDataset:
        """The pairs of ``split`` (built on first use)."""
        if split not in self._pairs:
            self._pairs[split] = self._build(split)
        return self._pairs[split]

    def _build(self, split: str) -> PairDataset:
        if split not in self.split_years:
            raise ValueError(f"unknown split {split!r}; split_years has {sorted(self.split_years)}")
        pairs, dropped = cropnet_pairs(self.root, self.crops, self.split_years[split], self.months, self.weather,
                                       self.before, self.after, self.image_size, self.min_observed, self.max_pairs,
                                       self.seed, split)
        self.skipped["few_observed_days"] += dropped
        if self.skipped["few_observed_days"]:
            logger.warning("TS-fusion %s: dropped %d pairs with < %.0f%% observed weather days", split,
                           self.skipped["few_observed_days"], 100 * self.min_observed)
        return pairs

    def setup(self, stage: str) -> None:
        """Build the pair datasets ``stage`` needs."""
        if stage == "fit":
            self.pairs("train")
        if stage in ("fit", "validate"):
            self.pairs("val")
        if stage in ("test", "predict"):
            self.pairs("test" if "test" in self.split_years else "val")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.pairs(split), batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed)
                          if shuffle else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self.split_years else "val", False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
