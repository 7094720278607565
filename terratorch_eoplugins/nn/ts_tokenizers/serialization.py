"""Saving and loading fitted time-series tokenizers (``{"kind", "config", "state_dict"}`` files)."""

from __future__ import annotations

from pathlib import Path

import torch

from terratorch_eoplugins.nn.ts_tokenizers.base import TimeSeriesTokenizer
from terratorch_eoplugins.nn.ts_tokenizers.factory import build_ts_tokenizer
from terratorch_eoplugins.runtime import read_checkpoint

__all__ = ["load_ts_tokenizer", "save_ts_tokenizer"]


def save_ts_tokenizer(tokenizer: TimeSeriesTokenizer, path: str | Path) -> Path:
    """Save ``{"kind", "config", "state_dict"}`` so that :func:`load_ts_tokenizer` rebuilds the tokenizer."""
    if not bool(tokenizer.fitted):
        raise RuntimeError(f"save_ts_tokenizer: {type(tokenizer).__name__} is not fitted")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"kind": tokenizer.kind, "config": dict(tokenizer.config), "state_dict": tokenizer.state_dict()}, path)
    return path


def load_ts_tokenizer(path: str | Path, map_location: str | torch.device = "cpu") -> TimeSeriesTokenizer:
    """Load a tokenizer written by :func:`save_ts_tokenizer` (evaluation mode)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"time-series tokenizer checkpoint not found: {str(path)!r}; train one with "
                                "`eoplugins tsfusion-tokenizers` or fit a deterministic one")
    ckpt = read_checkpoint(path, "time-series tokenizer", map_location)  # plain dict of tensors + config
    if not isinstance(ckpt, dict) or not {"kind", "config", "state_dict"} <= set(ckpt):
        raise ValueError(f"{str(path)!r}: expected a dict with keys kind/config/state_dict (save_ts_tokenizer)")
    tok = build_ts_tokenizer(ckpt["kind"], **ckpt["config"])
    tok.load_state_dict(ckpt["state_dict"])
    return tok.eval()
