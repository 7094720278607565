"""Errors and input checks shared by the whole package.

Every loader, checkpoint reader and model entry point reports bad input through these so that a message
always names the offending file, field or argument and says what was expected.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torchgeo.datasets import DatasetNotFoundError


class EODataError(ValueError):
    """A data file exists but does not match the expected format (shape, dtype, field, CRS...)."""


class EODatasetNotFoundError(DatasetNotFoundError):
    """torchgeo's :class:`DatasetNotFoundError` with a message naming the missing path.

    Data cannot be downloaded by this package (no network at run time), so the message points
    at the synthetic-world generator as the offline alternative.
    """

    def __init__(self, path: str | Path, what: str, hint: str | None = None) -> None:
        msg = f"{what} not found: {str(path)!r}."
        msg += " " + (
            hint or "Download the dataset manually, or write the synthetic world with `eoplugins synth --out DIR`."
        )
        FileNotFoundError.__init__(self, msg)


def require_dir(path: str | Path, what: str, hint: str | None = None) -> Path:
    """Return ``path`` as a :class:`Path`, raising :class:`EODatasetNotFoundError` if it is not a directory."""
    p = Path(path)
    if not p.is_dir():
        raise EODatasetNotFoundError(p, what, hint)
    return p


def require_file(path: str | Path, what: str, hint: str | None = None) -> Path:
    """Return ``path`` as a :class:`Path`, raising :class:`EODatasetNotFoundError` if it is not a file."""
    p = Path(path)
    if not p.is_file():
        raise EODatasetNotFoundError(p, what, hint)
    return p


def check_array(
    arr: np.ndarray,
    path: str | Path,
    *,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    dtypes: Iterable[Any] | None = None,
) -> np.ndarray:
    """Validate an array read from ``path``: number of dimensions, shape (``None`` = any) and dtype.

    Raises :class:`EODataError` naming the file, what was found and what was expected.
    """
    if ndim is not None and arr.ndim != ndim:
        raise EODataError(f"{path}: expected a {ndim}-D array, got shape {tuple(arr.shape)}")
    if shape is not None:
        if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
            exp = "x".join("*" if s is None else str(s) for s in shape)
            raise EODataError(f"{path}: expected shape {exp}, got {'x'.join(map(str, arr.shape))}")
    if dtypes is not None:
        allowed = [np.dtype(d) for d in dtypes]
        if arr.dtype not in allowed:
            raise EODataError(f"{path}: expected dtype {' or '.join(str(d) for d in allowed)}, got {arr.dtype}")
    return arr


class EOInputError(ValueError):
    """A model input the model cannot process: wrong shape, smaller than the model's minimum, non-finite values."""


def check_model_input(x: Any, who: str, *, min_size: int | None = None, finite: bool = True) -> None:
    """Validate the image tensor ``x`` given to the model ``who`` before it reaches a library deep inside.

    Raises :class:`EOInputError` when the spatial size (the last two dimensions) is below ``min_size`` (e.g. a
    U-Net's ``2**depth``: each pooling halves it, and a zero-sized map fails in torch with "output size is too
    small") or when ``finite`` and ``x`` holds NaN or infinite values (which would flow on silently into NaN
    outputs and losses). The message names the model, the input's shape and what was expected.
    """
    shape = tuple(getattr(x, "shape", ()))
    if min_size is not None and len(shape) >= 2 and min(shape[-2:]) < min_size:
        raise EOInputError(f"{who}: input height and width must be at least {min_size} pixels, got "
                           f"{shape[-2]} x {shape[-1]} (input shape {shape})")
    if finite:
        import torch

        finite_mask = torch.isfinite(x)
        if not bool(finite_mask.all()):
            bad = int((~finite_mask).sum())
            raise EOInputError(f"{who}: the input holds {bad} NaN or infinite value(s) (input shape {shape}); "
                               "expected finite values: fill no-data before the model (e.g. the dataset's "
                               "normalisation or a nodata mask)")

