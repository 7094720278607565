"""LIANet's own downstream tasks (Dynamic World, canopy height, leaf type, building coverage and footprints).

:class:`LIANetRegionDataModule` serves the (acquisition date x patch) samples of
:class:`~terratorch_eoplugins.datasets.lianet_downstream.RegionLabels`: the patches inside the training box train,
the patches outside it validate and test (the paper: a 500 km^2 box, the rest of the region for validation).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from terratorch_eoplugins.datamodules.lianet import DEFAULT_KEYS, _LIANetFinetuneDataModule
from terratorch_eoplugins.datasets.lianet_downstream import REGION_TASKS, RegionLabels

__all__ = ["LIANetRegionDataModule"]


class LIANetRegionDataModule(_LIANetFinetuneDataModule):
    """One LIANet downstream task of the pretraining region ``tiles_root``.

    Args:
        root: the task's label folder (``LIANET_LABELS/<TILE>`` of the synthetic world).
        task: ``dynamic_world``, ``canopy_height``, ``leaf_type``, ``building_coverage`` or ``building_footprints``.
        tiles_root, tiles: the pretraining region's S2 tiles (same as the pretraining datamodule).
        patch_size: patch side in 10 m pixels (128 in the paper).
        train_area_km2: area of the square training box (500 in the paper); ``train_box_origin`` its top-left
            pixel (column, row); or ``train_area_bounds`` [col0, row0, col1, row1] (pixels, end-exclusive, the
            reference's pixel box; when given, ``train_area_km2`` is ignored).
        image: ``"placeholder"`` (LIANet) or ``"s2"`` (baselines on the same samples).
        num_dates: dates kept per patch (``None``: all, the reference).
        max_label_gap_days: Dynamic World: largest gap between an acquisition and its nearest label date.
        batch_size, num_workers, batch_keys: loader settings (batch 32 in the paper).
    """

    def __init__(self, root: str = "data/demo/LIANET_LABELS/T31TFJ", task: str = "dynamic_world",
                 tiles_root: str = "data/demo/S2_TILES", tiles: Sequence[str] | None = None, patch_size: int = 128,
                 train_area_km2: float | None = 500.0, train_box_origin: Sequence[int] = (0, 0),
                 train_area_bounds: Sequence[int] | None = None, image: str = "placeholder",
                 num_dates: int | None = None, max_label_gap_days: float = 1.0, batch_size: int = 32,
                 num_workers: int = 0, batch_keys: Sequence[str] | None = DEFAULT_KEYS) -> None:
        super().__init__(tiles_root, tiles, batch_size, num_workers, batch_keys)
        if task not in REGION_TASKS:
            raise ValueError(f"task must be one of {sorted(REGION_TASKS)}, got {task!r}")
        self.root, self.task, self.patch_size = Path(root), task, patch_size
        self.train_area_km2, self.train_box_origin = train_area_km2, list(train_box_origin)
        self.train_area_bounds = None if train_area_bounds is None else list(train_area_bounds)
        self.image, self.num_dates, self.max_label_gap_days = image, num_dates, max_label_gap_days

    @property
    def num_classes(self) -> int:
        return REGION_TASKS[self.task][1]

    @property
    def ignore_index(self) -> float:
        return REGION_TASKS[self.task][2]

    def _make(self, split: str) -> RegionLabels:
        return RegionLabels(self.root, self.region, task=self.task, split=split, patch_size=self.patch_size,
                            train_area_km2=None if self.train_area_bounds is not None else self.train_area_km2,
                            train_box_origin=self.train_box_origin, train_area_bounds=self.train_area_bounds,
                            image=self.image, num_dates=self.num_dates, max_label_gap_days=self.max_label_gap_days)
