"""Cloud-robustness evaluation of S4 (paper section 5.7): mIoU grouped by the cloud-cover ratio of each test series.

The cloud-cover ratio of a series is the number of clouded pixels over all pixels of the series, i.e.
the mean of its per-date cloud fractions. Sources of the per-date fractions: the PASTIS-R metadata field
``cloudcover-S2`` (the synthetic world writes it from its cloud masks); the real release has none, so on
:class:`~terratorch_eoplugins.datasets.s4.S4PASTIS` datasets (the default here, as S4 is fine-tuned on them)
``cloud_source="auto"`` falls back to an *estimate* from the S2 bands (blue B2 reflectance above 0.2, see
:func:`~terratorch_eoplugins.datasets.s4.estimate_cloud_cover`), or a user-supplied JSON file
``{ID_PATCH: [fraction per S2 date]}`` (e.g. from s2cloudless masks) gives them. The series are those the models
see: every aligned date by default (the ratio counts each series' own dates, never the padding of a batch); with
a plain :class:`~terratorch_eoplugins.datasets.pastis.PASTIS` dataset the ``num_dates`` dates it serves. Series
are grouped into ratio bins and, per bin and model, the confusion matrix is summed over the bin's series and
mIoU = mean IoU over the classes present (union > 0, utae-paps convention), void (-1) ignored. With two or more
models the table adds the mIoU gain of the first model over each other one (the paper plots S4's gain over a
baseline).

Command line::

    eoplugins s4-clouds --root data/demo/PASTIS-R --model s4=<fine-tuned.ckpt> --model scratch=<other.ckpt>
    eoplugins s4-clouds --root /path/to/PASTIS-R --modality radar --cloud-source estimate --model ...
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from terratorch_eoplugins.datasets.common import collate_samples
from terratorch_eoplugins.datasets.pastis import PASTIS
from terratorch_eoplugins.datasets.s4 import CLOUD_BLUE_THRESHOLD, S4PASTIS, collate_s4
from terratorch_eoplugins.errors import EODataError
from terratorch_eoplugins.runtime import read_checkpoint

__all__ = ["DEFAULT_BINS", "confusion_matrix", "mean_iou", "series_cloud_ratio", "cloud_robustness",
           "load_segmentation_checkpoint", "main"]

#: cloud-cover ratio bin edges (fractions); the last bin includes its right edge
DEFAULT_BINS: tuple[float, ...] = (0.0, 0.05, 0.10, 0.25, 1.0)


def confusion_matrix(pred: Tensor | np.ndarray, target: Tensor | np.ndarray, num_classes: int,
                     ignore_index: int | None = -1) -> np.ndarray:
    """``K x K`` confusion matrix (rows: target, columns: prediction), ``ignore_index`` pixels dropped."""
    p = np.asarray(pred.detach().cpu() if isinstance(pred, Tensor) else pred).reshape(-1).astype(np.int64)
    t = np.asarray(target.detach().cpu() if isinstance(target, Tensor) else target).reshape(-1).astype(np.int64)
    if p.shape != t.shape:
        raise ValueError(f"prediction and target sizes differ: {p.size} vs {t.size}")
    keep = np.ones_like(t, dtype=bool) if ignore_index is None else t != ignore_index
    p, t = p[keep], t[keep]
    bad = (t < 0) | (t >= num_classes) | (p < 0) | (p >= num_classes)
    if bad.any():
        raise ValueError(f"labels must be in 0..{num_classes - 1} (or ignore_index={ignore_index}); "
                         f"found {sorted(set(t[bad].tolist()) | set(p[bad].tolist()))[:5]}")
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def mean_iou(cm: np.ndarray) -> float:
    """Mean IoU over the classes with a non-empty union (NaN when the matrix is empty)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    present = union > 0
    return float(np.mean(tp[present] / union[present])) if present.any() else float("nan")


def series_cloud_ratio(cloud_cover: Tensor | np.ndarray | None, where: str = "sample") -> float:
    """Clouded pixels / all pixels of a series = mean of its per-date cloud fractions."""
    if cloud_cover is None:
        raise EODataError(f"{where}: no per-date cloud cover; the PASTIS-R metadata needs the field 'cloudcover-S2' "
                          "(written by the synthetic world; add it from cloud masks for the real release)")
    cc = np.asarray(cloud_cover.detach().cpu() if isinstance(cloud_cover, Tensor) else cloud_cover, np.float64)
    if cc.size == 0 or not np.all(np.isfinite(cc)) or cc.min() < 0 or cc.max() > 1:
        raise EODataError(f"{where}: cloud cover must be fractions in [0, 1] for every date, got {cc.tolist()}")
    return float(cc.mean())


def _bin_labels(bins: Sequence[float]) -> list[str]:
    return [f"[{lo:.2f}, {hi:.2f}{']' if i == len(bins) - 2 else ')'}"
            for i, (lo, hi) in enumerate(zip(bins[:-1], bins[1:]))]


def _logits(model: Callable[..., Any], x: Tensor, date_mask: Tensor | None = None) -> Tensor:
    out = model(x) if date_mask is None else model(x, date_mask=date_mask)
    return out.output if hasattr(out, "output") else out


@torch.no_grad()
def cloud_robustness(models: Mapping[str, tuple[Callable[[Tensor], Any], str]], dataset: PASTIS,
                     bins: Sequence[float] = DEFAULT_BINS, num_classes: int | None = None, batch_size: int = 4,
                     device: str | torch.device = "cpu") -> pd.DataFrame:
    """mIoU of each model per cloud-cover-ratio bin of the test series.

    Args:
        models: name -> (model returning ``[B, K, H, W]`` logits or a terratorch ``ModelOutput``,
            input modality of ``dataset``: ``"optical"`` / ``"radar"`` for an :class:`S4PASTIS` dataset, whose
            padded batches also pass ``date_mask=`` to the model; ``"S2"``, ``"S1A"``... for a plain PASTIS one).
        dataset: an :class:`S4PASTIS` dataset with ``inference_modality=None`` (both modalities, cloud cover from its
            ``cloud_source``), or a :class:`PASTIS` dataset loading ``"S2"`` (with the ``cloudcover-S2`` field) and
            every model's modality.
        bins: increasing bin edges of the cloud-cover ratio in [0, 1].
        num_classes: classes of the confusion matrix (default ``dataset.num_classes``).
        batch_size: evaluation batch size.
        device: evaluation device.

    Returns:
        One row per bin (and a final ``all`` row): ``bin``, ``n_series``, ``cloud_ratio_mean``,
        ``mIoU_<name>`` (percent) and, with several models, ``gain_<first>_vs_<other>`` (points).
    """
    edges = [float(b) for b in bins]
    if len(edges) < 2 or any(b >= a for a, b in zip(edges[1:], edges[:-1])) or edges[0] < 0 or edges[-1] > 1:
        raise ValueError(f"bins must be >= 2 increasing edges within [0, 1], got {list(bins)}")
    if not models:
        raise ValueError("give at least one model to evaluate")
    s4 = isinstance(dataset, S4PASTIS)
    if s4 and dataset.inference_modality is not None:
        raise ValueError("give an S4PASTIS dataset with inference_modality=None (both modalities are served, each "
                         "model takes its own)")
    if "S2" not in dataset.modalities:
        raise ValueError(f"the dataset must load S2 for its cloud cover; it loads {list(dataset.modalities)}")
    served = ["optical", "radar"] if s4 else list(dataset.modalities)
    for name, (_, mod) in models.items():
        if mod not in served:
            raise ValueError(f"model {name!r} needs modality {mod!r}; the dataset serves {served}")
    collate = collate_s4 if s4 else collate_samples
    k = num_classes or dataset.num_classes
    ignore = dataset.void_label if dataset.void_label is not None else None
    n_bins = len(edges) - 1
    cms = {name: np.zeros((n_bins, k, k), np.int64) for name in models}
    ratios: list[list[float]] = [[] for _ in range(n_bins)]
    for m, _ in models.values():
        if isinstance(m, nn.Module):
            m.eval().to(device)
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collate(samples)
        rat = [series_cloud_ratio(s.get("cloud_cover"), f"patch {s['id_patch']}") for s in samples]
        which = [min(int(np.searchsorted(edges, r, side="right")) - 1, n_bins - 1) for r in rat]
        for r, b in zip(rat, which):
            ratios[b].append(r)
        for name, (model, mod) in models.items():
            x = batch["image"][mod] if isinstance(batch["image"], Mapping) else batch["image"]
            dm = batch.get("date_mask")
            dm = None if dm is None or bool(dm.all()) else dm.to(device)
            pred = _logits(model, x.to(device), dm).argmax(1).cpu()
            for j, b in enumerate(which):
                cms[name][b] += confusion_matrix(pred[j], batch["mask"][j], k, ignore)
    rows = []
    labels = _bin_labels(edges)
    for b in range(n_bins + 1):
        sel = slice(None) if b == n_bins else b
        row: dict[str, Any] = {"bin": "all" if b == n_bins else labels[b]}
        rs = [r for rr in ratios for r in rr] if b == n_bins else ratios[b]
        row["n_series"] = len(rs)
        row["cloud_ratio_mean"] = float(np.mean(rs)) if rs else float("nan")
        for name in models:
            cm = cms[name].sum(0) if b == n_bins else cms[name][sel]
            row[f"mIoU_{name}"] = 100 * mean_iou(cm) if rs else float("nan")
        names = list(models)
        for other in names[1:]:
            row[f"gain_{names[0]}_vs_{other}"] = row[f"mIoU_{names[0]}"] - row[f"mIoU_{other}"]
        rows.append(row)
    return pd.DataFrame(rows)


def load_segmentation_checkpoint(path: str | Path) -> nn.Module:
    """A fine-tuned terratorch ``SemanticSegmentationTask`` from ``path`` (in eval mode).

    The S4 pretraining checkpoint is not reloaded: checkpoints written with the shipped trainer pieces are
    self-contained (``backbone_ckpt_path: null``, :mod:`terratorch_eoplugins.models.pretrained`), and in older ones
    the path is turned into ``backbone_pretrained_from`` (the fine-tuned weights in ``path`` replace the pretrained
    ones anyway, and S4's architecture is given by the other ``model_args``).
    """
    from terratorch.tasks import SemanticSegmentationTask

    p = Path(path)
    ckpt = read_checkpoint(p, "fine-tuned")
    hp = dict(ckpt.get("hyper_parameters", {}))
    if "model_args" not in hp:
        raise ValueError(f"{p}: not a terratorch SemanticSegmentationTask checkpoint "
                         "(no 'model_args' hyper-parameters)")
    model_args = dict(hp["model_args"])
    if model_args.get("backbone_ckpt_path"):  # written without SelfContainedCheckpoint
        model_args["backbone_pretrained_from"] = str(model_args["backbone_ckpt_path"])
        model_args["backbone_ckpt_path"] = None
    task = SemanticSegmentationTask.load_from_checkpoint(p, map_location="cpu", model_args=model_args)
    return task.eval()


def _parse_models(items: Sequence[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--model expects NAME=CHECKPOINT, got {item!r}")
        out[name] = Path(path)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``eoplugins s4-clouds``: print (and optionally save) the cloud-robustness table."""
    ap = argparse.ArgumentParser(prog="eoplugins s4-clouds", description="S4 cloud-robustness evaluation (mIoU "
                                 "grouped by the cloud-cover ratio of the test series)")
    ap.add_argument("--root", default="data/demo/PASTIS-R", help="PASTIS-R folder")
    ap.add_argument("--model", action="append", required=True, metavar="NAME=CKPT",
                    help="fine-tuned SemanticSegmentationTask checkpoint (repeat; the first is compared to the others)")
    ap.add_argument("--modality", default="optical",
                    help="input modality of the models: optical / radar (S4 aligned series, the default data of the "
                         "S4 configs) or S2 / S1A / S1D (plain PASTIS series, needs the cloudcover-S2 metadata field)")
    ap.add_argument("--radar", default="S1A", help="radar series of the S4 pairs (S1A or S1D)")
    ap.add_argument("--split", default="test", choices=["train", "val", "test"])
    ap.add_argument("--num-dates", type=int, default=None,
                    help="dates per series (linspace); default: every aligned date (S4) / 6 (plain PASTIS)")
    ap.add_argument("--optical-bands", type=int, nargs="+", default=[2, 1, 0],
                    help="S2 channels of the optical input (S4 modalities; default RGB); -1 keeps all 10")
    ap.add_argument("--cloud-source", default="auto",
                    help="auto (metadata field, else estimate), metadata, estimate, or a JSON file "
                         "{ID_PATCH: [fraction per S2 date]} (S4 modalities)")
    ap.add_argument("--cloud-threshold", type=float, default=CLOUD_BLUE_THRESHOLD,
                    help="blue (B2) reflectance above which a pixel is cloudy in the estimate")
    ap.add_argument("--bins", type=float, nargs="+", default=list(DEFAULT_BINS))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", default=None, help="CSV file for the table")
    args = ap.parse_args(argv)
    dataset: PASTIS
    if args.modality in ("optical", "radar"):
        bands = None if args.optical_bands == [-1] else args.optical_bands
        dataset = S4PASTIS(args.root, split=args.split, radar=args.radar, num_dates=args.num_dates,
                           optical_bands=bands, cloud_source=args.cloud_source, cloud_threshold=args.cloud_threshold)
    else:
        mods = ("S2",) if args.modality == "S2" else ("S2", args.modality)
        dataset = PASTIS(args.root, split=args.split, modalities=mods,
                         num_dates=6 if args.num_dates is None else args.num_dates)
    models = {name: (load_segmentation_checkpoint(p), args.modality) for name, p in _parse_models(args.model).items()}
    table = cloud_robustness(models, dataset, args.bins, batch_size=args.batch_size)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    return 0
