"""Time-series tokenizers by name (``uniform``, ``quantile``, ``fsq``)."""

from __future__ import annotations

from typing import Any

from terratorch_eoplugins.nn.ts_tokenizers.base import TimeSeriesTokenizer
from terratorch_eoplugins.nn.ts_tokenizers.binning import QuantileTokenizer, UniformTokenizer
from terratorch_eoplugins.nn.ts_tokenizers.fsq import FSQTokenizer

__all__ = ["TS_TOKENIZERS", "build_ts_tokenizer"]

TS_TOKENIZERS: dict[str, type[TimeSeriesTokenizer]] = {
    "uniform": UniformTokenizer,
    "quantile": QuantileTokenizer,
    "fsq": FSQTokenizer,
}


def build_ts_tokenizer(kind: str, **kwargs: Any) -> TimeSeriesTokenizer:
    """Build an (unfitted) tokenizer: ``kind`` in ``uniform`` / ``quantile`` (``num_bins=...``) or ``fsq``."""
    if kind not in TS_TOKENIZERS:
        raise ValueError(f"build_ts_tokenizer: unknown kind {kind!r}; expected one of {sorted(TS_TOKENIZERS)}")
    if kind in ("uniform", "quantile") and "num_bins" not in kwargs:
        raise ValueError(f"build_ts_tokenizer({kind!r}): num_bins is required")
    return TS_TOKENIZERS[kind](**kwargs)
