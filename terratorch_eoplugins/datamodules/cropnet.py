"""Lightning datamodule for CropNet county-level crop yield (train 2021 / val 2022 / test 2020)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from terratorch_eoplugins.datamodules._base import EODataModule
from terratorch_eoplugins.datasets.common import filter_batch_keys
from terratorch_eoplugins.datasets.cropnet import CROPNET_SPLIT_YEARS, WEATHER_VARIABLES, CropNet, cropnet_collate

__all__ = ["CropNetDataModule"]


class CropNetDataModule(EODataModule):
    """CropNet train/val/test datasets of one crop, normalised with statistics of the train split.

    Images are divided by 255 and standardised per channel; daily and monthly weather are
    standardised per variable. Statistics not given explicitly are estimated on the train split
    (images on ``stats_samples`` county-years, weather on up to ``4 * stats_samples``) and reused by
    every split. Batches pad grids and dates to the batch maximum (``grid_mask``, ``time_mask``,
    see :func:`~terratorch_eoplugins.datasets.cropnet.cropnet_collate`).

    The regression target reaches the model as ``label`` (what terratorch's ``ScalarRegressionTask``
    reads); the sample's two-value ``target`` and every other extra key are dropped unless listed in
    ``batch_keys`` (``None`` keeps everything), since terratorch forwards extra keys to the backbone.
    Batches also offer ``label_mean`` and ``label_std`` (``B x num_outputs``: the statistics that
    standardised ``label``; 0 and 1 without ``standardize_label``), so that a model maps its predictions back to
    log units from the batch alone. ``predict`` uses the test split.
    """

    def __init__(
        self,
        root: str = "data/demo/CropNet",
        crop: str = "Soybeans",
        split_years: Mapping[str, Sequence[int]] | None = None,
        months: Sequence[int] = (4, 5, 6, 7, 8, 9),
        image_months: Sequence[int] | None = None,
        long_term_years: int = 5,
        days_per_month: int = 31,
        image_size: int | None = None,
        max_dates: int | None = None,
        weather_variables: Sequence[str] = WEATHER_VARIABLES,
        target: Literal["yield", "production", "both"] = "yield",
        grid_aggregation: Literal["none", "mean"] = "none",
        batch_size: int = 1,
        num_workers: int = 0,
        batch_keys: Sequence[str] | None = (),
        normalize: bool = True,
        stats_samples: int = 16,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        weather_mean: Sequence[float] | None = None,
        weather_std: Sequence[float] | None = None,
        weather_long_mean: Sequence[float] | None = None,
        weather_long_std: Sequence[float] | None = None,
        s2_root: str = "Sentinel-2 Imagery/data",
        s2_product: Literal["AG", "NDVI"] = "AG",
        hrrr_root: str = "WRF-HRRR Computed Dataset/data",
        usda_root: str = "USDA Crop Dataset",
        crop_dirs: Mapping[str, str] | None = None,
        standardize_label: bool = False,
        label_mean: Sequence[float] | None = None,
        label_std: Sequence[float] | None = None,
        window_weather: Sequence[str] | None = None,
        window_before: int = 29,
        window_after: int = 10,
        states: str | Sequence[str] | None = None,
    ) -> None:
        """Configure the datamodule.

        Args:
            root: the ``CropNet`` folder.
            crop: ``Corn``, ``Cotton``, ``Soybeans`` or ``WinterWheat``.
            split_years: years of ``train``/``val``/``test`` (default 2021 / 2022 / 2020).
            months, image_months, long_term_years, days_per_month, image_size, max_dates, weather_variables,
                target, grid_aggregation, s2_root, s2_product, hrrr_root, usda_root, crop_dirs, window_weather,
                window_before, window_after, states: see :class:`~terratorch_eoplugins.datasets.cropnet.CropNet`
                (``window_weather`` adds TS fusion's ``weather_windows`` key; ``states: paper`` keeps TS fusion's
                per-crop state subset of appendix A.2, a list of state names any subset, ``null`` every state).
            batch_size: county-years per batch (grids and dates are padded within a batch).
            num_workers: data loader workers.
            batch_keys: extra sample keys passed to the model (e.g. ``grid_mask``, ``weather_short``,
                ``temporal_coords``, ``weather_windows``, ``label_mean``, ``label_std``); ``None`` keeps all.
            normalize: standardise images and weather (statistics given below or estimated on train).
            stats_samples: county-years of the train split used to estimate image statistics.
            image_mean, image_std, weather_mean, weather_std, weather_long_mean, weather_long_std:
                explicit statistics (skip the estimation of that group).
            standardize_label: feed ``(label - label_mean) / label_std`` to the task (terratorch's scalar
                regression has no target scaling, and log yields sit far from a fresh head's zero output);
                predictions map back with :meth:`destandardize`. Metrics logged by the task are then in
                standardised units; :func:`~terratorch_eoplugins.metrics.cropnet_metrics` on
                destandardised predictions gives the protocol's yield metrics.
            label_mean, label_std: explicit label statistics (default: mean/std of the train split's labels).
        """
        if stats_samples < 1:
            raise ValueError(f"stats_samples must be >= 1, got {stats_samples}")
        self.split_years = {k: tuple(int(y) for y in v) for k, v in (split_years or CROPNET_SPLIT_YEARS).items()}
        for split in ("train", "val", "test"):
            if split not in self.split_years:
                raise ValueError(f"split_years must define 'train', 'val' and 'test', got {sorted(self.split_years)}")
        super().__init__(
            CropNet, batch_size=batch_size, num_workers=num_workers, batch_keys=batch_keys,
            root=Path(root), crop=crop, split_years=self.split_years, months=tuple(months),
            image_months=None if image_months is None else tuple(image_months), long_term_years=long_term_years,
            days_per_month=days_per_month, image_size=image_size, max_dates=max_dates,
            weather_variables=tuple(weather_variables), target=target, grid_aggregation=grid_aggregation,
            s2_root=s2_root, s2_product=s2_product, hrrr_root=hrrr_root, usda_root=usda_root,
            crop_dirs=dict(crop_dirs) if crop_dirs else None,
            window_weather=None if window_weather is None else tuple(window_weather), window_before=window_before,
            window_after=window_after,
            states=states if states is None or isinstance(states, str) else tuple(states),
        )
        self.normalize = normalize
        self.stats_samples = stats_samples
        self.stats: dict[str, list[float] | None] = {
            "image_mean": _list(image_mean), "image_std": _list(image_std),
            "weather_mean": _list(weather_mean), "weather_std": _list(weather_std),
            "weather_long_mean": _list(weather_long_mean), "weather_long_std": _list(weather_long_std),
        }
        self._train_raw: CropNet | None = None
        self.standardize_label = standardize_label
        self.label_mean = None if label_mean is None else torch.tensor([float(v) for v in label_mean])
        self.label_std = None if label_std is None else torch.tensor([float(v) for v in label_std])

    @property
    def num_outputs(self) -> int:
        """Number of regression outputs in ``label``."""
        return 2 if self.kwargs["target"] == "both" else 1

    def _make(self, split: str) -> CropNet:
        stats = self.statistics() if self.normalize else {}
        if split == "train" and self._train_raw is not None:  # already indexed to estimate the statistics
            dataset = copy.copy(self._train_raw)
            dataset.set_statistics(**stats)
            return dataset
        return CropNet(split=split, **self.kwargs, **stats)  # type: ignore[arg-type]

    def statistics(self) -> dict[str, list[float]]:
        """Normalisation statistics (explicit ones, completed by estimates on the train split)."""
        if any(v is None for v in self.stats.values()):
            if self._train_raw is None:
                self._train_raw = CropNet(split="train", **self.kwargs)  # type: ignore[arg-type]
            if self.stats["image_mean"] is None or self.stats["image_std"] is None:
                mean, std = self._train_raw.image_statistics(self.stats_samples)
                self.stats["image_mean"], self.stats["image_std"] = mean, std
            if any(self.stats[k] is None for k in ("weather_mean", "weather_std", "weather_long_mean",
                                                   "weather_long_std")):
                est = self._train_raw.weather_statistics(4 * self.stats_samples)
                for k, v in est.items():
                    if self.stats[k] is None:
                        self.stats[k] = v
        return {k: list(v) for k, v in self.stats.items() if v is not None}

    def label_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of ``label`` over the train split (from the USDA records; no image is read)."""
        if self.label_mean is None or self.label_std is None:
            if self._train_raw is None:
                self._train_raw = CropNet(split="train", **self.kwargs)  # type: ignore[arg-type]
            cols = {"yield": ["log_yield"], "production": ["log_production"],
                    "both": ["log_production", "log_yield"]}[self.kwargs["target"]]
            values = torch.tensor([[r[c] for c in cols] for r in self._train_raw.records], dtype=torch.float32)
            if len(values) < 2:
                raise ValueError(f"standardize_label needs >= 2 train county-years, got {len(values)}")
            self.label_mean = values.mean(0) if self.label_mean is None else self.label_mean
            self.label_std = values.std(0).clamp_min(1e-6) if self.label_std is None else self.label_std
        return self.label_mean, self.label_std

    def destandardize(self, pred: torch.Tensor) -> torch.Tensor:
        """Map standardised predictions back to log units (identity when ``standardize_label`` is off)."""
        if not self.standardize_label:
            return pred
        mean, std = self.label_statistics()
        return pred * std.to(pred) + mean.to(pred)

    def setup(self, stage: str) -> None:
        """Build the datasets that ``stage`` (fit, validate, test, predict) needs."""
        if self.standardize_label:
            self.label_statistics()
        if stage == "fit":
            self.train_dataset = self._make("train")
        if stage in ("fit", "validate"):
            self.val_dataset = self._make("val")
        if stage == "test":
            self.test_dataset = self._make("test")
        if stage == "predict":
            self.predict_dataset = self._make("test")

    def _predict_meta(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """County-year ids (``<fips>_<year>``) and the label statistics that map outputs back to log units."""
        n = len(samples)
        if self.standardize_label:
            mean, std = self.label_statistics()
        else:
            mean, std = torch.zeros(self.num_outputs), torch.ones(self.num_outputs)
        return {"filename": [f"{s['fips']}_{s['year']}" for s in samples],
                "label_mean": mean.expand(n, -1).tolist(), "label_std": std.expand(n, -1).tolist()}

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = cropnet_collate(samples)
        if self.standardize_label:
            mean, std = self.label_statistics()
            batch["label"] = (batch["label"] - mean) / std
        else:
            mean, std = torch.zeros(self.num_outputs), torch.ones(self.num_outputs)
        n = len(batch["label"])
        batch["label_mean"], batch["label_std"] = mean.expand(n, -1).clone(), std.expand(n, -1).clone()
        if self.batch_keys is None:
            return batch
        batch = filter_batch_keys(batch, ["label", *self.batch_keys])
        if "target" not in self.batch_keys:
            batch.pop("target", None)
        return batch


def _list(x: Sequence[float] | None) -> list[float] | None:
    return None if x is None else [float(v) for v in x]
