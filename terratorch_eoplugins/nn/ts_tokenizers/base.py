"""The common API of the time-series tokenizers: special tokens, missing values, per-variable layout."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["SPECIAL_TOKENS", "TimeSeriesTokenizer", "as_real_tensor"]

#: Special tokens of appendix A.1, appended after the data tokens in this order.
SPECIAL_TOKENS = ("[PAD]", "[EOS]", "[NULL]", "[ZERO]")
_MISSING = ("error", "null")


def as_real_tensor(x: Tensor | np.ndarray | Sequence[float], name: str) -> Tensor:
    """``x`` as a real-valued tensor (arrays and sequences converted); ``name`` is used in the error."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if not (x.is_floating_point() or x.dtype in (torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise TypeError(f"{name}: expected a real-valued tensor or array, got dtype {x.dtype}")
    return x


class TimeSeriesTokenizer(nn.Module):
    """Common base: special tokens, missing-value policy, per-variable layout and fitted flag.

    Args:
        num_variables: ``None`` for one set of statistics over all values, or ``V`` for statistics per
            variable along dimension ``-2`` of the input (``[..., V, L]``).
        missing: ``"error"`` (NaN input raises) or ``"null"`` (NaN becomes ``[NULL]``).
        zero_token: encode exact zeros as ``[ZERO]`` (decoded to exactly 0).
    """

    kind = "base"

    def __init__(self, num_variables: int | None = None, missing: str = "error", zero_token: bool = False) -> None:
        super().__init__()
        if num_variables is not None and (not isinstance(num_variables, int) or num_variables < 1):
            raise ValueError(f"num_variables: expected None or a positive int, got {num_variables!r}")
        if missing not in _MISSING:
            raise ValueError(f"missing: expected one of {_MISSING}, got {missing!r}")
        self.num_variables = num_variables
        self.missing = missing
        self.zero_token = bool(zero_token)
        self.register_buffer("fitted", torch.tensor(False))
        self.config: dict[str, Any] = {"num_variables": num_variables, "missing": missing, "zero_token": zero_token}

    # -- vocabulary -------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        """Number of data tokens (bins or FSQ codes)."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Data tokens plus the four special tokens."""
        return self.codebook_size + len(SPECIAL_TOKENS)

    @property
    def pad_id(self) -> int:
        return self.codebook_size

    @property
    def eos_id(self) -> int:
        return self.codebook_size + 1

    @property
    def null_id(self) -> int:
        return self.codebook_size + 2

    @property
    def zero_id(self) -> int:
        return self.codebook_size + 3

    @property
    def special_ids(self) -> dict[str, int]:
        return {name: self.codebook_size + i for i, name in enumerate(SPECIAL_TOKENS)}

    @property
    def num_stat_rows(self) -> int:
        return self.num_variables or 1

    # -- checks -----------------------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if not bool(self.fitted):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(x) on training series first "
                               "(or load a fitted state_dict)")

    def _to_rows(self, x: Tensor, name: str) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """Reshape ``[..., L]`` (or ``[..., V, L]``) to ``[V', N, L]`` and return the inverse reshape."""
        if x.ndim < 1 or x.shape[-1] == 0:
            raise ValueError(f"{name}: expected a series tensor [..., L] with L >= 1, got shape {tuple(x.shape)}")
        if self.num_variables is None:
            shape = x.shape
            rows = x.reshape(1, -1, shape[-1])
            return rows, lambda y: y.reshape(*shape[:-1], y.shape[-1])
        v = self.num_variables
        if x.ndim < 2 or x.shape[-2] != v:
            raise ValueError(f"{name}: expected [..., V={v}, L] (num_variables={v}), got shape {tuple(x.shape)}")
        shape = x.shape
        rows = x.reshape(-1, v, shape[-1]).transpose(0, 1)  # [V, N, L]

        def back(y: Tensor) -> Tensor:
            return y.transpose(0, 1).reshape(*shape[:-1], y.shape[-1])

        return rows, back

    def _check_values(self, x: Tensor, name: str) -> Tensor:
        """Float copy of ``x``; raise on +-inf, and on NaN unless ``missing="null"``."""
        x = x.to(torch.float64) if x.dtype == torch.float64 else x.float()
        if torch.isinf(x).any():
            raise ValueError(f"{name}: input contains +-inf; expected finite values (NaN only with missing='null')")
        if self.missing == "error" and torch.isnan(x).any():
            raise ValueError(f"{name}: input contains NaN; clean the series or build the tokenizer with "
                             "missing='null' to encode missing values as [NULL]")
        return x

    def _check_tokens(self, tokens: Tensor | np.ndarray) -> Tensor:
        tokens = as_real_tensor(tokens, "decode(tokens)")
        if tokens.is_floating_point():
            raise TypeError(f"decode(tokens): expected integer token ids, got dtype {tokens.dtype}")
        tokens = tokens.long()
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"decode(tokens): ids must lie in [0, {self.vocab_size}) (vocab_size), got range "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        return tokens

    def _apply_specials(self, tokens: Tensor, values: Tensor) -> Tensor:
        """Decoded values at special tokens: NaN for [PAD]/[EOS]/[NULL], 0 for [ZERO]."""
        values = torch.where(tokens >= self.codebook_size, torch.full_like(values, float("nan")), values)
        return torch.where(tokens == self.zero_id, torch.zeros_like(values), values)

    def encode(self, x: Tensor | np.ndarray) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, tokens: Tensor | np.ndarray) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.encode(x)

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, vocab_size={self.vocab_size}, num_variables={self.num_variables}"
