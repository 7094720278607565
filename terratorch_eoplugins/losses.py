"""Self-supervised and reconstruction losses of the plugin's models, grouped by model.

Sections:

* **S4** (Shenoy et al., "S4: Self-Supervised Sensing Across the Spectrum", 2024):
  :func:`s4_pixel_infonce` (multi-modal space-time InfoNCE, Eq. 2, symmetric over the anchor modality),
  :func:`s4_reconstruction_l1` (cross-modal mean L1, Eq. 3) and their module wrappers
  :class:`S4InfoNCELoss`, :class:`S4ReconstructionLoss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "S4InfoNCELoss",
    "S4ReconstructionLoss",
    "s4_pixel_infonce",
    "s4_reconstruction_l1",
    "s4_sample_positions",
]


# =====================================================================================================
# S4: pixel-wise multi-modal space-time contrastive loss and cross-modal reconstruction loss
# =====================================================================================================

def s4_sample_positions(batch: int, positions: int, num_pixels: int | None, generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> Tensor:
    """Indices ``[batch, P]`` of the space-time positions used per sample (distinct within a sample).

    ``num_pixels=None`` (or >= ``positions``) keeps every position in order; otherwise ``num_pixels``
    positions are drawn uniformly without replacement, independently for each sample.
    """
    if positions < 1:
        raise ValueError(f"no space-time position to contrast (T*H*W = {positions})")
    if num_pixels is not None and num_pixels < 2:
        raise ValueError(f"num_pixels must be >= 2 (one positive and at least one negative) or None, got {num_pixels}")
    if num_pixels is None or num_pixels >= positions:
        return torch.arange(positions, device=device).expand(batch, positions)
    scores = torch.rand(batch, positions, generator=generator, device=generator.device if generator else device)
    return scores.argsort(dim=1)[:, :num_pixels].to(device)


def _flatten_positions(z: Tensor, name: str) -> Tensor:
    if z.ndim < 3:
        raise ValueError(f"{name} must be [B, D, ...positions] (e.g. [B, D, T, H, W]), got shape {tuple(z.shape)}")
    return z.flatten(2)  # B x D x N


def s4_pixel_infonce(z_a: Tensor, z_b: Tensor, temperature: float = 0.5, num_pixels: int | None = None,
                     indices: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """S4 multi-modal space-time InfoNCE (Eq. 2), averaged symmetrically over both anchor modalities.

    For each sample, the features of the two modalities at the same space-time position ``(t, y, x)``
    form the positive pair; every other position (other pixel or other date) *of the opposite modality*
    in the same sample is a negative. With cosine similarity ``sim`` and temperature ``tau``::

        l_a(i) = -log( exp(sim(a_i, b_i)/tau) / sum_j exp(sim(a_i, b_j)/tau) )

    ``l_a`` is averaged over the anchor pixels of modality a, ``l_b`` likewise with b as the anchor,
    the per-sample loss is ``(mean l_a + mean l_b) / 2`` and the result is the batch mean.

    Args:
        z_a: ``[B, D, T, H, W]`` (or any ``[B, D, ...]``) projected features of modality a.
        z_b: features of modality b, same shape.
        temperature: ``tau`` (paper default 0.5).
        num_pixels: positions sampled per sample to bound memory (``P x P`` logits); ``None`` = all.
        indices: explicit ``[B, P]`` flat position indices (overrides ``num_pixels``).
        generator: random generator of the position sampling.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if z_a.shape != z_b.shape:
        raise ValueError(f"the two modalities' feature maps must have the same shape [B, D, T, H, W] (same dates and "
                         f"H x W), got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    a, b = _flatten_positions(z_a, "z_a"), _flatten_positions(z_b, "z_b")
    bsz, _, n = a.shape
    if indices is None:
        indices = s4_sample_positions(bsz, n, num_pixels, generator, a.device)
    elif indices.ndim != 2 or indices.shape[0] != bsz:
        raise ValueError(f"indices must be [B={bsz}, P], got shape {tuple(indices.shape)}")
    if indices.shape[1] < 2:
        raise ValueError(f"need at least 2 positions per sample (a positive and a negative), got {indices.shape[1]}")
    idx = indices.to(a.device).unsqueeze(1).expand(-1, a.shape[1], -1)
    a = F.normalize(a.gather(2, idx).transpose(1, 2), dim=-1)  # B x P x D
    b = F.normalize(b.gather(2, idx).transpose(1, 2), dim=-1)
    logits = torch.bmm(a, b.transpose(1, 2)) / temperature  # B x P x P, [i, j] = sim(a_i, b_j) / tau
    target = torch.arange(logits.shape[1], device=logits.device)
    loss_a = F.cross_entropy(logits.flatten(0, 1), target.repeat(bsz), reduction="none").view(bsz, -1).mean(1)
    loss_b = F.cross_entropy(logits.transpose(1, 2).flatten(0, 1), target.repeat(bsz),
                             reduction="none").view(bsz, -1).mean(1)
    return (0.5 * (loss_a + loss_b)).mean()


def s4_reconstruction_l1(prediction: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """S4 cross-modal reconstruction loss (Eq. 3): ``||x_hat - x||_1 / (T * C * H * W)``, batch-averaged.

    Args:
        prediction: ``[B, C, T, H, W]`` reconstruction of the other modality.
        target: the other modality's series, same shape.
        mask: optional weights broadcastable to ``prediction`` (1 = counted, e.g. cloud-free); the
            per-sample mean is then taken over the weighted elements only. The paper uses no mask.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"reconstruction and target shapes differ: {tuple(prediction.shape)} vs {tuple(target.shape)}")
    err = (prediction - target).abs()
    if mask is None:
        return err.flatten(1).mean(1).mean()
    w = torch.broadcast_to(mask.to(err.dtype), err.shape).flatten(1)
    per_sample = (err.flatten(1) * w).sum(1) / w.sum(1).clamp_min(1e-12)
    return per_sample.mean()


class S4InfoNCELoss(nn.Module):
    """Module form of :func:`s4_pixel_infonce` with a fixed temperature and pixel budget."""

    def __init__(self, temperature: float = 0.5, num_pixels: int | None = 256) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.num_pixels = num_pixels

    def forward(self, z_a: Tensor, z_b: Tensor, indices: Tensor | None = None) -> Tensor:
        """Symmetric pixel InfoNCE between two ``[B, D, T, H, W]`` feature maps."""
        return s4_pixel_infonce(z_a, z_b, self.temperature, self.num_pixels, indices)


class S4ReconstructionLoss(nn.Module):
    """Module form of :func:`s4_reconstruction_l1`."""

    def forward(self, prediction: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mean L1 over T x C x H x W, averaged over the batch."""
        return s4_reconstruction_l1(prediction, target, mask)
