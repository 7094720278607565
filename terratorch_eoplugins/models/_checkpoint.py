"""State dicts of Lightning checkpoints for the model families (files read by
:func:`terratorch_eoplugins.runtime.read_checkpoint`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from terratorch_eoplugins.runtime import read_checkpoint


def read_state_dict(path: str | Path, what: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors of a Lightning checkpoint's ``state_dict`` (or of a plain state dict) and its hyper-parameters."""
    obj = read_checkpoint(path, what)
    hparams = dict(obj.get("hyper_parameters", {}) or {})
    state = obj.get("state_dict", obj)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: 'state_dict' is not a mapping")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}, hparams
