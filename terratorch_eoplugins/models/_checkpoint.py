"""Reading checkpoint files safely: one place for every model family's loader."""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def read_checkpoint(path: str | Path, what: str) -> Mapping[str, Any]:
    """``torch.load(path, weights_only=True)`` on CPU with clear errors (never unpickles arbitrary objects).

    ``what`` names the expected checkpoint in the messages (e.g. ``"DUNIA"``). Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` for a file that is not a readable mapping (Lightning checkpoint or state dict).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} checkpoint not found: {str(p)!r}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message advises weights_only=False, i.e. unpickling arbitrary objects, which is what we refuse:
        # keep only its diagnosis (the object it refused, or why the bytes are not a PyTorch file)
        found = re.search(r"(Unsupported global: .*?)(?:\. Please|$)|(Unsupported operand \d+)", str(err), re.M)
        detail = next((g for g in found.groups() if g), "") if found else ""
        detail = detail or "not a weights-only PyTorch file"
        raise ValueError(f"{p}: cannot be read as a PyTorch checkpoint holding only tensors and plain containers "
                         f"({detail}); checkpoints with other pickled objects are never loaded") from None
    except Exception as err:  # truncated, empty or non-PyTorch files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{p}: cannot be read as a PyTorch checkpoint ({first})") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{p}: expected a Lightning checkpoint or a state dict, got {type(obj).__name__}")
    return obj


def read_state_dict(path: str | Path, what: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors of a Lightning checkpoint's ``state_dict`` (or of a plain state dict) and its hyper-parameters."""
    obj = read_checkpoint(path, what)
    hparams = dict(obj.get("hyper_parameters", {}) or {})
    state = obj.get("state_dict", obj)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: 'state_dict' is not a mapping")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}, hparams
