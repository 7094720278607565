"""Helpers shared by the datasets and datamodules: splits, label fractions, collation, batch filtering, plots.

Errors and file checks live in :mod:`terratorch_eoplugins.errors`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import default_collate

from terratorch_eoplugins.errors import EODataError

logger = logging.getLogger("terratorch_eoplugins.datasets")


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Deterministically shuffle ``range(n)`` with ``seed`` and cut it by ``fractions`` (summing to 1)."""
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {list(fractions)}")
    perm = np.random.default_rng(seed).permutation(n)
    cuts = np.round(np.cumsum(fractions)[:-1] * n).astype(int)
    return [np.sort(p) for p in np.split(perm, cuts)]


def subsample_fraction(indices: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Keep ``fraction`` (0, 1] of ``indices`` (at least one), chosen deterministically by ``seed``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    idx = list(indices)
    if fraction >= 1.0 or not idx:
        return idx
    k = max(1, int(round(fraction * len(idx))))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(idx, size=k, replace=False))


def collate_samples(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Collate a list of sample dicts.

    Tensors with equal shapes are stacked; tensors of different shapes (e.g. date vectors of
    different lengths) and non-tensor metadata (CRS strings, file names, dicts) are kept as lists.
    Nested dicts (multi-modal ``image``) are collated recursively.
    """
    out: dict[str, Any] = {}
    for key in samples[0]:
        vals = [s[key] for s in samples]
        first = vals[0]
        if isinstance(first, Mapping):
            out[key] = collate_samples(vals)
        elif isinstance(first, Tensor) and all(isinstance(v, Tensor) and v.shape == first.shape for v in vals):
            out[key] = torch.stack(vals)
        elif isinstance(first, (int, float, np.integer, np.floating)) and not isinstance(first, bool):
            out[key] = default_collate(vals)
        else:
            out[key] = list(vals)
    return out


def filter_batch_keys(batch: dict[str, Any], keep: Iterable[str] | None) -> dict[str, Any]:
    """Drop batch entries that a model would receive as unexpected keyword arguments.

    terratorch tasks forward every batch key except ``image``/``mask``/``filename`` to
    ``backbone.forward(**kwargs)``; baselines such as Prithvi reject unknown keys. ``keep`` lists
    the extra keys the configured model accepts (``None`` keeps everything).
    """
    if keep is None:
        return batch
    allowed = {"image", "mask", "target", "filename", *keep}
    return {k: v for k, v in batch.items() if k in allowed}


#: sample keys that georeference a sample's pixel grid for prediction maps: ``filename`` (source file or sample
#: id, names the output), ``crs`` (WKT or ``EPSG:n``), ``transform`` (6 affine coefficients a, b, c, d, e, f)
GEOREF_KEYS: tuple[str, ...] = ("filename", "crs", "transform")
#: batch key of predict batches with what a prediction writer needs and the model must not see: the collated
#: :data:`GEOREF_KEYS`, ``legend`` (``{"names": [...], "colors": [[r, g, b], ...]}``) of class maps, and for
#: non-raster samples ``label_mean`` / ``label_std`` (``[B, n]``) that map outputs back to target units
PREDICT_META_KEY = "predict_meta"


def bounds_transform(bounds: Sequence[float], height: int, width: int) -> tuple[float, ...]:
    """Affine coefficients ``(a, b, c, d, e, f)`` of a north-up ``height x width`` grid filling ``bounds``.

    ``bounds`` is ``(minx, miny, maxx, maxy)``; the first pixel's top-left corner is ``(minx, maxy)``.
    """
    minx, miny, maxx, maxy = (float(b) for b in bounds)
    if not (maxx > minx and maxy > miny and height > 0 and width > 0):
        raise EODataError(f"bounds {list(bounds)} with grid {height} x {width}: expected minx < maxx, miny < maxy "
                          "and a positive grid size")
    return ((maxx - minx) / width, 0.0, minx, 0.0, -(maxy - miny) / height, maxy)


def collate_georeference(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The :data:`GEOREF_KEYS` of ``samples`` as batch entries: ``filename`` and ``crs`` as lists of strings,
    ``transform`` as a list of 6-float tuples (plain floats: no precision plugin or device transfer touches them).
    Keys absent from the first sample are left out."""
    out: dict[str, Any] = {}
    for key in GEOREF_KEYS:
        if key not in samples[0]:
            continue
        vals = [s.get(key) for s in samples]
        if key == "transform":
            out[key] = [tuple(float(c) for c in torch.as_tensor(v, dtype=torch.float64).reshape(-1)[:6]) for v in vals]
        else:
            out[key] = [str(v) for v in vals]
    return out


def class_legend(dataset: Any) -> dict[str, list] | None:
    """Legend of a dataset's class maps: ``classes`` names and ``palette`` colours (RGB 0-255), or ``None``."""
    names = list(getattr(dataset, "classes", None) or ())
    if not names:
        return None
    palette = getattr(dataset, "palette", None)
    colors: list[list[int]] = []
    if palette is not None:
        pal = np.asarray(palette, np.float64)
        pal = pal * 255.0 if pal.size and pal.max() <= 1.0 else pal
        colors = [[int(round(c)) for c in rgb[:3]] for rgb in np.clip(pal, 0, 255)]
    return {"names": [str(n) for n in names], "colors": colors}


def split_modalities(image: Tensor, modalities: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
    """Split a batched ``[B, C, ...]`` tensor into ``{modality: image[:, indices]}``.

    Raises :class:`EODataError` if an index is outside the ``C`` channels.
    """
    if not isinstance(image, Tensor):
        raise EODataError(f"image_modalities needs a stacked image tensor, got {type(image).__name__}")
    n = image.shape[1]
    out = {}
    for name, idx in modalities.items():
        bad = [i for i in idx if not -n <= i < n]
        if bad:
            raise EODataError(f"image_modalities[{name!r}] indexes channels {bad}, but the image has {n} channels")
        out[name] = image[:, list(idx)]
    return out


def plot_panels(panels: Sequence[tuple[np.ndarray, str]], show_titles: bool = True, suptitle: str | None = None):
    """One row of image panels ``(array, title)`` without axes: the layout shared by the datasets' ``plot()``."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (img, title) in zip(axes[0], panels):
        ax.imshow(img, interpolation="nearest")
        ax.axis("off")
        if show_titles:
            ax.set_title(title)
    if suptitle:
        fig.suptitle(suptitle)
    return fig
