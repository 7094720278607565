"""LIANet datamodules: pretraining over a region's Sentinel-2 tiles, fine-tuning on PASTIS and HLS Burn Scars.

The samples are built by :class:`~terratorch_eoplugins.datasets.s2_tiles.S2TileSampler` (pretraining) and by
:class:`~terratorch_eoplugins.datasets.lianet.LIANetPASTIS` and
:class:`~terratorch_eoplugins.datasets.lianet.LIANetBurnScars` (fine-tuning: (acquisition date x labelled patch)
pairs placed in the pretraining region's pixel grid); these datamodules choose the splits and the loaders.
Only ``batch_keys`` reach the model (fine-tuning default: ``origin_px``, ``time_days``, ``time_index``).

Every LIANet datamodule publishes, through :meth:`~_LIANetDataModule.train_split_info` (read by tasks with
:func:`terratorch_eoplugins.tasks.preparation.train_split_info`), the pretraining region (grid, CRS and
acquisitions, as plain types) and its validation samples' plot function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torchgeo.datasets import NonGeoDataset

from terratorch_eoplugins.datamodules._base import EODataModule
from terratorch_eoplugins.datasets.lianet import LIANetBurnScars, LIANetPASTIS
from terratorch_eoplugins.datasets.pastis import VOID_CLASS, pastis_num_classes, protocol_folds
from terratorch_eoplugins.datasets.s2_tiles import S2Region, S2TileSampler, scan_region

__all__ = ["LIANetBurnScarsDataModule", "LIANetPASTISDataModule", "LIANetPretrainDataModule"]

DEFAULT_KEYS = ("origin_px", "time_days", "time_index")


class _LIANetDataModule(EODataModule):
    """A datamodule over one pretraining region (the tile folders under ``tiles_root``), scanned once."""

    def __init__(self, dataset_class: type, tiles_root: str | Path, tiles: Sequence[str] | None, batch_size: int,
                 num_workers: int, batch_keys: Sequence[str] | None) -> None:
        super().__init__(dataset_class, batch_size=batch_size, num_workers=num_workers, batch_keys=batch_keys)
        self.tiles_root, self.tiles = Path(tiles_root), (list(tiles) if tiles is not None else None)
        self._region: S2Region | None = None

    @property
    def region(self) -> S2Region:
        """The pretraining region (grid and acquisitions) read from ``tiles_root`` (scanned once)."""
        if self._region is None:
            self._region = scan_region(self.tiles_root, self.tiles)
        return self._region

    def train_split_info(self, name: str) -> Any:
        """Metadata published to tasks (:func:`terratorch_eoplugins.tasks.preparation.train_split_info`).

        ``name``:

        * ``"region"``: the pretraining region as plain types: ``size`` (pixels, the larger side), ``shape``
          ``[H, W]``, ``acquisitions`` (days since 2015-01-01), ``crs`` (string), ``transform`` (6 floats),
          ``tiles`` (folder names);
        * ``"plot_sample"``: the validation dataset's ``plot(sample, ...)`` (``None`` before ``setup`` or
          when it has none).

        Any other name: ``None``.
        """
        if name == "region":
            region = self.region
            return {**region.describe(), "size": region.size}
        if name == "plot_sample":
            plot: Callable[..., Any] | None = getattr(self.val_dataset, "plot", None)
            return plot
        return None


# ---------------------------------------------------------------------------------- pretraining
class LIANetPretrainDataModule(_LIANetDataModule):
    """Random (acquisition, patch) samples of a region's S2 tiles (:class:`S2TileSampler`).

    Args:
        root: folder with the tile folders (``root/{TILE}/{YYYYMMDDTHHMMSS}.tif``).
        tiles: tile names forming the region (default: every folder under ``root``).
        patch_size: patch side (128 in the paper; smaller trains faster on a CPU).
        samples_per_epoch: random samples per training epoch (the paper: 1,024,000).
        val_samples: fixed validation samples (also used for ``test``).
        batch_size, num_workers: loader settings (batch 64 in the paper).
        seed: seed of the validation samples.
        max_cloud: reject windows with a mean cloud probability above this (``None``: keep clouds, as the paper).
        boa_offset: L2A offset subtracted from the digital numbers.
        batch_keys: sample keys passed on besides ``image``.
    """

    def __init__(self, root: str = "data/demo/S2_TILES", tiles: Sequence[str] | None = None, patch_size: int = 128,
                 samples_per_epoch: int = 1024, val_samples: int = 64, batch_size: int = 64, num_workers: int = 0,
                 seed: int = 0, max_cloud: float | None = None, boa_offset: float = 1000.0,
                 batch_keys: Sequence[str] | None = ("origin_px", "time_days", "time_index", "date")) -> None:
        super().__init__(S2TileSampler, root, tiles, batch_size, num_workers, batch_keys)
        self.root = Path(root)
        self.patch_size, self.samples_per_epoch, self.val_samples = patch_size, samples_per_epoch, val_samples
        self.seed, self.max_cloud, self.boa_offset = seed, max_cloud, boa_offset

    def _make(self, split: str, length: int) -> S2TileSampler:
        return S2TileSampler(self.root, self.tiles, split=split, patch_size=self.patch_size, length=length,
                             seed=self.seed, boa_offset=self.boa_offset, max_cloud=self.max_cloud, region=self.region)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train_dataset = self._make("train", self.samples_per_epoch)
        if stage in ("fit", "validate"):
            self.val_dataset = self._make("val", self.val_samples)
        if stage in ("test", "predict"):
            self.test_dataset = self._make("val", self.val_samples)
            self.predict_dataset = self.test_dataset


class _LIANetFinetuneDataModule(_LIANetDataModule):
    """Train/val/test fine-tuning samples of one pretraining region; subclasses build a split's dataset."""

    def __init__(self, tiles_root: str, tiles: Sequence[str] | None, batch_size: int, num_workers: int,
                 batch_keys: Sequence[str] | None) -> None:
        super().__init__(NonGeoDataset, tiles_root, tiles, batch_size, num_workers, batch_keys)

    def _make(self, split: str) -> NonGeoDataset:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train_dataset = self._make("train")
        if stage in ("fit", "validate"):
            self.val_dataset = self._make("val")
        if stage in ("test", "predict"):
            self.test_dataset = self._make("test")
            self.predict_dataset = self.test_dataset


class LIANetPASTISDataModule(_LIANetFinetuneDataModule):
    """PASTIS (date x patch) samples for a LIANet backbone pretrained on ``tiles_root``.

    Args:
        root: ``PASTIS-R`` folder.
        tiles_root, tiles: the pretraining region's S2 tiles (same as the pretraining datamodule).
        protocol, fold_rotation: PASTIS split (``"pangaea"`` folds 1-3 / 4 / 5 or the official rotation).
        dates: ``"region"`` or ``"patch"`` (see :class:`LIANetPASTIS`).
        image: ``"placeholder"`` (LIANet) or ``"s2"`` (baselines on the same samples).
        void_label: value of the void class (ignored by the loss with ``ignore_index`` = this value).
        label_fraction, seed: fraction of train patches kept.
        num_dates: dates kept per patch (``None``: all, the reference protocol).
        outside: ``"error"`` (default) or ``"skip"``: patches outside the region (e.g. of another PASTIS tile
            when each tile is its own pretraining region, as in the supplement's two-tile protocol).
        max_cloud: drop (date x patch) pairs cloudier than this (mean ``MSK_CLDPRB``, 0-100; ``None``: keep all).
        batch_size, num_workers, batch_keys: loader settings (batch 32 in the paper).
    """

    def __init__(self, root: str = "data/demo/PASTIS-R", tiles_root: str = "data/demo/S2_TILES",
                 tiles: Sequence[str] | None = None, protocol: str = "pangaea", fold_rotation: int = 0,
                 dates: str = "region", image: str = "placeholder", void_label: int | None = -1,
                 label_fraction: float = 1.0, seed: int = 0, num_dates: int | None = None, batch_size: int = 32,
                 num_workers: int = 0, batch_keys: Sequence[str] | None = DEFAULT_KEYS, outside: str = "error",
                 max_cloud: float | None = None) -> None:
        super().__init__(tiles_root, tiles, batch_size, num_workers, batch_keys)
        self.max_cloud = max_cloud
        protocol_folds(protocol, fold_rotation)  # validate early
        if outside not in ("error", "skip"):
            raise ValueError(f"outside must be 'error' or 'skip', got {outside!r}")
        self.outside = outside
        self.num_dates = num_dates
        self.root, self.protocol, self.fold_rotation = Path(root), protocol, fold_rotation
        self.dates, self.image, self.void_label = dates, image, void_label
        self.label_fraction, self.seed = label_fraction, seed

    @property
    def num_classes(self) -> int:
        return pastis_num_classes(self.void_label)

    @property
    def ignore_index(self) -> int | None:
        return VOID_CLASS if self.void_label is None else self.void_label

    def _make(self, split: str) -> LIANetPASTIS:
        return LIANetPASTIS(self.root, self.region, split=split, protocol=self.protocol,
                            fold_rotation=self.fold_rotation, dates=self.dates, image=self.image,
                            void_label=self.void_label,
                            label_fraction=self.label_fraction if split == "train" else 1.0, seed=self.seed,
                            num_dates=self.num_dates, outside=self.outside, max_cloud=self.max_cloud)


class LIANetBurnScarsDataModule(_LIANetFinetuneDataModule):
    """HLS Burn Scars windows x post-fire acquisition for a LIANet backbone pretrained on ``tiles_root``.

    Train = the scenes of ``training/``, validation and test = ``validation/`` (the original split, as in the
    paper); scenes outside the region are skipped. ``label_fraction``/``seed`` subsample the training scenes. See
    :class:`LIANetBurnScars` for the arguments.
    """

    def __init__(self, root: str = "data/demo/hls_burn_scars", tiles_root: str = "data/demo/S2_TILES_BURNSCARS",
                 tiles: Sequence[str] | None = None, patch_size: int = 128, stride: int | None = None,
                 keep_unburned: bool = False, max_gap_days: float = 30.0, image: str = "placeholder",
                 batch_size: int = 32, num_workers: int = 0, batch_keys: Sequence[str] | None = DEFAULT_KEYS,
                 label_fraction: float = 1.0, seed: int = 0) -> None:
        super().__init__(tiles_root, tiles, batch_size, num_workers, batch_keys)
        self.root, self.patch_size, self.stride = Path(root), patch_size, stride
        self.label_fraction, self.seed = label_fraction, seed
        self.keep_unburned, self.max_gap_days, self.image = keep_unburned, max_gap_days, image

    num_classes = 2
    ignore_index = -1

    def _make(self, split: str) -> LIANetBurnScars:
        return LIANetBurnScars(self.root, self.region, split=split, patch_size=self.patch_size, stride=self.stride,
                               keep_unburned=self.keep_unburned, max_gap_days=self.max_gap_days, image=self.image,
                               label_fraction=self.label_fraction if split == "train" else 1.0, seed=self.seed)
