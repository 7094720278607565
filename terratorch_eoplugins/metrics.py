"""Every evaluation metric of the package in one place.

- Regression: :func:`pearson_r` (row-wise), :func:`aligned_pearson_r` (row-wise after the best time shift, DUNIA's
  waveform score), :func:`pearson_from_sums` (from running sums), :func:`r2_score`
  (coefficient of determination), :func:`cropnet_metrics` (CropNet yields, table 2 of the TS-fusion paper). These
  are the formulas for analyses and tests; the tasks' per-epoch regression metrics are torchmetrics'
  (``PearsonCorrCoef``, ``R2Score``, ``MeanSquaredError(squared=False)``, ``MeanAbsoluteError``), synchronised
  over DDP ranks. Names: ``R2`` is always the coefficient of determination; squared Pearson r is ``r2_pearson``.
- Classification: :func:`weighted_f1` (DUNIA's classification metric, support-weighted F1).
- Generation and representation: :func:`generation_scores` (TS fusion weather from images),
  :func:`alignment_similarities` (DUNIA table H1), :func:`reconstruction_metrics` (time-series tokenizers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class TokenizerLike(Protocol):
    """What :func:`reconstruction_metrics` needs of a time-series tokenizer (metrics import nothing of the package)."""

    codebook_size: int

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, tokens: Tensor) -> Tensor: ...

__all__ = [
    "aligned_pearson_r",
    "alignment_similarities",
    "cropnet_metrics",
    "generation_scores",
    "pearson_from_sums",
    "peak_psnr",
    "pearson_r",
    "r2_score",
    "reconstruction_metrics",
    "weighted_f1",
]


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def pearson_r(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Pearson correlation of ``[N, L]`` tensors (NaN where a row is constant)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    den = a.norm(dim=1) * b.norm(dim=1)
    r = (a * b).sum(1) / den
    return torch.where(den > 0, r, torch.full_like(r, float("nan")))


def aligned_pearson_r(pred: Tensor, ref: Tensor, max_shift: int) -> tuple[Tensor, Tensor]:
    """Row-wise Pearson r of ``pred`` and ``ref`` (``[N, L]``) after the best time alignment of ``pred``.

    DUNIA scores generated and retrieved waveforms by the Pearson r "computed between the time-aligned" waveforms
    and the acquired ones (section 4.1) without saying how they are aligned; here ``pred`` is shifted by the integer
    lag ``d`` in ``[-max_shift, max_shift]`` (samples moved in are 0, the waveforms' value outside the signal) that
    maximises r, and that r is returned with the lags (``r[i] = max_d pearson_r(shift(pred[i], d), ref[i])``).
    ``max_shift = 0`` is :func:`pearson_r`. NaN where every shift leaves a constant row.
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    n, length = pred.shape
    max_shift = min(int(max_shift), length - 1)
    best = torch.full((n,), -math.inf, dtype=torch.promote_types(pred.dtype, ref.dtype), device=pred.device)
    lag = torch.zeros(n, dtype=torch.long, device=pred.device)
    for d in range(-max_shift, max_shift + 1):
        shifted = torch.zeros_like(pred)
        if d >= 0:
            shifted[:, d:] = pred[:, :length - d]
        else:
            shifted[:, :d] = pred[:, -d:]
        r = pearson_r(shifted, ref)
        better = r > best  # NaN never wins
        best = torch.where(better, r, best)
        lag = torch.where(better, torch.full_like(lag, d), lag)
    return torch.where(torch.isfinite(best), best, torch.full_like(best, float("nan"))), lag


def pearson_from_sums(n: float, sp: float, st: float, spp: float, stt: float, spt: float) -> float:
    """Pearson r from running sums; NaN when fewer than two values or a constant series."""
    if n < 2:
        return float("nan")
    cov = spt - sp * st / n
    vp = spp - sp * sp / n
    vt = stt - st * st / n
    if vp <= 0 or vt <= 0:
        return float("nan")
    return cov / math.sqrt(vp * vt)


def r2_score(pred: Tensor, true: Tensor) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` over all finite entries."""
    ok = torch.isfinite(pred) & torch.isfinite(true)
    p, t = pred[ok].double(), true[ok].double()
    ss_tot = float(((t - t.mean()) ** 2).sum())
    return 1.0 - float(((t - p) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")


def cropnet_metrics(pred_log: Any, true_log: Any) -> dict[str, float]:
    """``RMSE``, ``MAE``, Pearson ``r``, ``r2_pearson`` (= r², what MMST-ViT and the TS-fusion tables call R^2) and
    ``R2`` (the coefficient of determination 1 - SS_res/SS_tot).

    Computed on ``exp`` of the predicted and true log yields (or log productions), pooled over
    all county-years given. (The TS-fusion task computes the same values with torchmetrics during training.)
    """
    p = np.exp(np.asarray(_np(pred_log), np.float64).ravel())
    t = np.exp(np.asarray(_np(true_log), np.float64).ravel())
    if p.shape != t.shape:
        raise ValueError(f"pred_log and true_log must have the same number of values, got {p.size} and {t.size}")
    if p.size < 2:
        raise ValueError(f"need at least 2 county-years to compute CropNet metrics, got {p.size}")
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        raise ValueError("pred_log and true_log must be finite")
    rmse = float(np.sqrt(np.mean((p - t) ** 2)))
    mae = float(np.mean(np.abs(p - t)))
    pc, tc = p - p.mean(), t - t.mean()
    denom = float(np.sqrt((pc**2).sum() * (tc**2).sum()))
    r = float((pc * tc).sum() / denom) if denom > 0 else float("nan")
    ss_tot = float((tc**2).sum())
    r2 = 1.0 - float(((t - p) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return {"RMSE": rmse, "MAE": mae, "r": r, "r2_pearson": r * r, "R2": r2}


def generation_scores(pred: Tensor, true: Tensor, names: Sequence[str]) -> dict[str, float]:
    """``gen_r2`` (mean over variables), ``gen_r2_<v>`` and ``gen_mse_<v>`` of generated vs true series
    ``[N, V, L]``."""
    out = {}
    r2s = []
    for i, v in enumerate(names):
        r2 = r2_score(pred[:, i], true[:, i])
        out[f"gen_r2_{v}"] = r2
        ok = torch.isfinite(pred[:, i])
        out[f"gen_mse_{v}"] = float(((pred[:, i][ok] - true[:, i][ok]) ** 2).mean()) if bool(ok.any()) else float("nan")
        r2s.append(r2)
    out["gen_r2"] = float(np.nanmean(r2s)) if np.isfinite(r2s).any() else float("nan")
    return out


@torch.no_grad()
def alignment_similarities(z_a: Tensor, z_b: Tensor, max_samples: int = 4096) -> dict[str, float]:
    """Mean cosine similarity of positive pairs (same row) and negative pairs (other rows) (paper table H1)."""
    if z_a.shape != z_b.shape or z_a.ndim != 2 or z_a.shape[0] < 2:
        raise ValueError(f"alignment_similarities expects two [N >= 2, D] matrices, got {tuple(z_a.shape)} and "
                         f"{tuple(z_b.shape)}")
    if z_a.shape[0] > max_samples:
        idx = torch.randperm(z_a.shape[0], generator=torch.Generator().manual_seed(0))[:max_samples].to(z_a.device)
        z_a, z_b = z_a[idx], z_b[idx]
    a, b = F.normalize(z_a.float(), dim=1), F.normalize(z_b.float(), dim=1)
    sim = a @ b.T
    n = sim.shape[0]
    pos = sim.diagonal().mean()
    neg = (sim.sum() - sim.diagonal().sum()) / (n * n - n)
    return {"positive": float(pos), "negative": float(neg)}


def reconstruction_metrics(tokenizer: TokenizerLike, x: Tensor | np.ndarray) -> dict[str, float]:
    """Round-trip ``decode(encode(x))`` errors in the units of ``x`` (as table 1/4): MSE, MAE, R^2, and the
    number of distinct data tokens used ("token utilization"). Special-token positions are excluded."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).float()
    tokens = tokenizer.encode(x)
    x_hat = tokenizer.decode(tokens)
    ok = ~(torch.isnan(x) | torch.isnan(x_hat))
    a, b = x[ok].double(), x_hat[ok].double()
    mse = float(((a - b) ** 2).mean())
    var = float(a.var(unbiased=False))
    data = tokens[tokens < tokenizer.codebook_size]
    return {"mse": mse, "mae": float((a - b).abs().mean()), "r2": 1.0 - mse / var if var > 0 else float("nan"),
            "tokens_used": int(torch.unique(data).numel())}


def weighted_f1(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None) -> float:
    """Support-weighted F1 over classes (DUNIA's classification metric): per-class F1 weighted by each class's
    number of true pixels. ``pred`` holds class indices or ``[N, C, ...]`` scores; pixels equal to
    ``ignore_index`` in ``target`` are left out. Computed with torchmetrics."""
    from torchmetrics.functional.classification import multiclass_f1_score

    if pred.ndim == target.ndim + 1:
        pred = pred.argmax(1)
    return float(multiclass_f1_score(pred, target, num_classes=num_classes, average="weighted",
                                     ignore_index=ignore_index))


def peak_psnr(generated: Tensor | np.ndarray, reference: Tensor | np.ndarray, per_sample: bool = False) -> Tensor:
    """LIANet supplement eq. 3: ``PSNR(I | S) = 10 log10(max(I)^2 / <(I - S)^2>)``, in float64.

    ``I`` is the generated image, ``S`` the reference, ``<.>`` the spatio-spectral mean. The peak is the maximum of
    the *generated* image (not a fixed data range). With ``per_sample`` the first axis is the batch: one value per
    sample (mean and max over the other axes); otherwise one value over everything given. ``+inf`` where the error
    is zero, ``-inf`` where ``max(I) = 0``."""
    i = torch.as_tensor(generated).detach().to(torch.float64)
    s = torch.as_tensor(reference).detach().to(device=i.device, dtype=torch.float64)
    if i.shape != s.shape:
        raise ValueError(f"generated {tuple(i.shape)} and reference {tuple(s.shape)} shapes differ")
    if per_sample:
        i, s = i.reshape(i.shape[0], -1), s.reshape(s.shape[0], -1)
    else:
        i, s = i.reshape(1, -1), s.reshape(1, -1)
    mse = ((i - s) ** 2).mean(dim=1)
    peak = i.max(dim=1).values ** 2
    out = 10.0 * torch.log10(peak / mse)
    out = torch.where(mse == 0, torch.full_like(out, math.inf), out)
    return out if per_sample else out[0]
