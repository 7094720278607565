"""The mixed-radix token code of finite scalar quantization (TS-fusion paper, eq. 1), shared by the FSQ
time-series tokenizer and the FSQ image tokenizer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["fsq_index_to_levels", "fsq_levels_to_index"]


def fsq_levels_to_index(level_idx: Tensor, levels: Sequence[int]) -> Tensor:
    """Mixed-radix token of eq. (1): ``tau = sum_d i_d prod_{m>d} L_m`` for level indices ``[..., D]``."""
    lv = torch.as_tensor(list(levels), dtype=torch.long, device=level_idx.device)
    if level_idx.shape[-1] != len(lv):
        raise ValueError(f"level indices: expected last dimension {len(lv)} (len(levels)), got {level_idx.shape[-1]}")
    # radix of dimension d is prod_{m>d} L_m (the last dimension is the least significant)
    radix = torch.ones_like(lv)
    if len(lv) > 1:
        radix[:-1] = torch.flip(torch.cumprod(torch.flip(lv[1:], [0]), 0), [0])
    return (level_idx.long() * radix).sum(-1)


def fsq_index_to_levels(tokens: Tensor, levels: Sequence[int]) -> Tensor:
    """Inverse of :func:`fsq_levels_to_index`: tokens ``[...]`` -> level indices ``[..., D]``."""
    lv = torch.as_tensor(list(levels), dtype=torch.long, device=tokens.device)
    out = []
    rest = tokens.long()
    for d in range(len(lv) - 1, -1, -1):
        out.append(rest % lv[d])
        rest = torch.div(rest, lv[d], rounding_mode="floor")
    return torch.stack(out[::-1], -1)
