"""Lightning datamodule of DUNIA's pretraining data.

Splits, loaders and collation of :class:`~terratorch_eoplugins.datasets.dunia_chips.DUNIAPretrainChips`.
Batches hold the 14-band composite ``image``, the multi-temporal ``series`` of the same chip and the chip's
GEDI footprints (positions, waveforms, RH98); the dataset module documents how they are read.
"""

from __future__ import annotations

from collections.abc import Sequence

from terratorch_eoplugins.datamodules._base import EODataModule
from terratorch_eoplugins.datasets.dunia_chips import DUNIAPretrainChips
from terratorch_eoplugins.datasets.gedi_shots import LEAF_ON_MONTHS

__all__ = ["DUNIAPretrainDataModule"]


class DUNIAPretrainDataModule(EODataModule):
    """Train/val/test :class:`DUNIAPretrainChips` (spatial-block splits of :class:`GEDIChips`).

    YAML::

        data:
          class_path: terratorch_eoplugins.datamodules.dunia.DUNIAPretrainDataModule
          init_args: {root: data/demo/GEDI, chip_size: 64, num_periods: 3, batch_size: 8}
    """

    def __init__(self, root: str = "data/demo/GEDI", s2_root: str | None = None, s1_root: str | None = None,
                 chip_size: int = 64, num_periods: int = 3, max_cloud: float = 50.0, waveform_length: int = 256,
                 waveform_mode: str = "resample", require_footprints: bool = False, max_footprints: int | None = None,
                 filter_quality: bool = True, filter_degrade: bool = True, min_sensitivity: float | None = 0.9,
                 block_chips: int = 2, split_fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0,
                 batch_size: int = 8, num_workers: int = 0,
                 batch_keys: Sequence[str] | None = ("series", "footprints", "footprint_mask", "waveform",
                                                     "rh98"),
                 mosaic_periods: str = "calendar", mosaic_year: int | None = None,
                 s1_incidence_ref: float | None = 40.0, leaf_on_months: Sequence[int] | None = LEAF_ON_MONTHS,
                 waveform_window: str = "signal", composite_20m: str | None = "auto",
                 upsample_20m: str = "cubic") -> None:
        """Collect the :class:`DUNIAPretrainChips` arguments; ``batch_keys`` are kept besides ``image``/``mask``.

        The preprocessing options default to the paper's choices (appendix F): calendar four-month mosaics,
        S1 normalised to 40 degrees, leaf-on (April-September) GEDI shots, waveforms cut to the signal, 20 m S2
        bands (``composite_20m``, ``"auto"``: ``root/S2L2A_20m.tif`` when present) upsampled by cubic convolution.
        """
        super().__init__(DUNIAPretrainChips, batch_size=batch_size, num_workers=num_workers, batch_keys=batch_keys,
                         root=str(root), s2_root=s2_root, s1_root=s1_root, chip_size=chip_size,
                         num_periods=num_periods, max_cloud=max_cloud, targets=("rh98",),
                         waveform_length=waveform_length, waveform_mode=waveform_mode,
                         require_footprints=require_footprints, max_footprints=max_footprints,
                         filter_quality=filter_quality, filter_degrade=filter_degrade, min_sensitivity=min_sensitivity,
                         block_chips=block_chips, split_fractions=tuple(split_fractions), seed=seed,
                         mosaic_periods=mosaic_periods, mosaic_year=mosaic_year, s1_incidence_ref=s1_incidence_ref,
                         leaf_on_months=None if leaf_on_months is None else tuple(leaf_on_months),
                         waveform_window=waveform_window,
                         composite_20m=composite_20m,
                         upsample_20m=upsample_20m)

    def setup(self, stage: str) -> None:
        """Build the split datasets; ``predict`` uses the test split."""
        super().setup(stage)
        if stage == "predict":
            self.predict_dataset = self.dataset_class(split="test", **self.kwargs)
