"""S4 pretraining datamodule: the PASTIS-R splits as aligned radar/optical pairs.

The pairs are built by :class:`~terratorch_eoplugins.datasets.s4.S4PASTIS` (nearest-timestamp alignment,
:func:`~terratorch_eoplugins.datasets.s4.align_nearest_timestamps`); :class:`S4PASTISDataModule` chooses the
splits (a PASTIS-R protocol), the training crop and the loaders.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from terratorch_eoplugins.datamodules.pastis import PASTISDataModule
from terratorch_eoplugins.datasets.s4 import S4PASTIS

__all__ = ["S4PASTISDataModule"]


class S4PASTISDataModule(PASTISDataModule):
    """Train/val/test :class:`S4PASTIS` pairs of a PASTIS-R split protocol (labels kept but unused by S4).

    Args:
        root: the ``PASTIS-R`` directory.
        optical: optical modality (``"S2"``).
        radar: radar modality (``"S1A"`` or ``"S1D"``).
        num_dates: aligned dates per sample (``linspace``); ``None`` keeps all (use ``batch_size=1``).
        max_gap_days: maximum date gap of a pair (``None``: spans must overlap).
        crop_size: random crop of the *train* samples (``None``: full 128 x 128 patches).
        protocol, fold_rotation, void_label, label_fraction, seed, batch_size, num_workers, batch_keys,
        normalize, reference_date: as :class:`PASTISDataModule`.
    """

    def __init__(self, root: str = "data/demo/PASTIS-R", optical: str = "S2", radar: str = "S1A",
                 num_dates: int | None = 6, max_gap_days: float | None = None, crop_size: int | None = None,
                 protocol: Literal["pangaea", "official"] = "pangaea", fold_rotation: int = 0,
                 void_label: int | None = -1, label_fraction: float = 1.0, seed: int = 0, batch_size: int = 4,
                 num_workers: int = 0, batch_keys: Sequence[str] | None = (), normalize: bool = True,
                 reference_date: str = "2018-09-01") -> None:
        super().__init__(root=root, modalities=(optical, radar), protocol=protocol, fold_rotation=fold_rotation,
                         num_dates=num_dates, void_label=void_label, label_fraction=label_fraction, seed=seed,
                         batch_size=batch_size, num_workers=num_workers, batch_keys=batch_keys, normalize=normalize,
                         reference_date=reference_date)
        self.dataset_class = S4PASTIS
        self.optical, self.radar = optical, radar
        self.max_gap_days, self.crop_size = max_gap_days, crop_size

    def _make(self, split: str, folds: Sequence[int], **extra: Any) -> S4PASTIS:
        kw = {k: v for k, v in self.kwargs.items() if k != "modalities"}
        crop = self.crop_size if split == "train" else None
        return S4PASTIS(split=split, folds=folds, optical=self.optical, radar=self.radar,
                        max_gap_days=self.max_gap_days, crop_size=crop, **kw, **extra)  # type: ignore[arg-type]
