"""S4 losses against independent computations: pixel InfoNCE (Eq. 2, symmetric) and mean L1 reconstruction (Eq. 3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from terratorch_eoplugins.losses import (
    S4InfoNCELoss,
    S4ReconstructionLoss,
    s4_pixel_infonce,
    s4_reconstruction_l1,
    s4_sample_positions,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")



def _naive_infonce(za: np.ndarray, zb: np.ndarray, tau: float) -> tuple[float, float, float]:
    """Loops over samples and anchors; returns (loss, mean over a-anchors, mean over b-anchors)."""
    per_sample, la_all, lb_all = [], [], []
    for a, b in zip(za, zb):  # each D x N
        a = a.reshape(a.shape[0], -1).T
        b = b.reshape(b.shape[0], -1).T
        n = a.shape[0]

        def cos(u: np.ndarray, v: np.ndarray) -> float:
            return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))

        la = np.mean([-math.log(math.exp(cos(a[i], b[i]) / tau) /
                                (math.exp(cos(a[i], b[i]) / tau) + sum(math.exp(cos(a[i], b[j]) / tau)
                                                                       for j in range(n) if j != i)))
                      for i in range(n)])
        lb = np.mean([-math.log(math.exp(cos(b[i], a[i]) / tau) /
                                (math.exp(cos(b[i], a[i]) / tau) + sum(math.exp(cos(b[i], a[j]) / tau)
                                                                       for j in range(n) if j != i)))
                      for i in range(n)])
        per_sample.append((la + lb) / 2)
        la_all.append(la)
        lb_all.append(lb)
    return float(np.mean(per_sample)), float(np.mean(la_all)), float(np.mean(lb_all))


def test_infonce_matches_the_formula_with_symmetric_averaging() -> None:
    g = torch.Generator().manual_seed(0)
    za = torch.randn(2, 5, 2, 3, 2, generator=g, dtype=torch.float64)  # B, D, T, H, W: 12 positions
    zb = torch.randn(2, 5, 2, 3, 2, generator=g, dtype=torch.float64)
    expected, la, lb = _naive_infonce(za.numpy(), zb.numpy(), 0.5)
    got = s4_pixel_infonce(za, zb)  # default temperature 0.5, all positions
    assert got.item() == pytest.approx(expected, rel=1e-10)
    assert abs(la - lb) > 1e-3  # the two anchor directions differ, so the average is really tested
    assert got.item() == pytest.approx((la + lb) / 2, rel=1e-10)
    assert s4_pixel_infonce(zb, za).item() == pytest.approx(expected, rel=1e-10)  # symmetric in the modalities
    # temperature enters as sim / tau
    assert s4_pixel_infonce(za, zb, temperature=0.1).item() == pytest.approx(
        _naive_infonce(za.numpy(), zb.numpy(), 0.1)[0], rel=1e-10)


def test_other_dates_at_the_same_pixel_are_negatives() -> None:
    """Orthonormal features, identical across modalities: every position, including the same (y, x) at
    another date, is a negative with similarity 0, so the loss is the closed form for N positions."""
    t, h, w = 3, 2, 2
    n = t * h * w
    z = torch.eye(n, dtype=torch.float64).reshape(1, n, t, h, w)
    tau = 0.5
    closed = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + (n - 1)))
    assert s4_pixel_infonce(z, z.clone(), tau).item() == pytest.approx(closed, rel=1e-12)
    # if two dates of a pixel share the same feature, the other date is a hard negative: loss goes up
    z2 = z.clone()
    z2[:, :, 1] = z2[:, :, 0]
    assert s4_pixel_infonce(z2, z2.clone(), tau).item() > closed + 0.1


def test_scale_invariance_and_alignment_lowers_the_loss() -> None:
    g = torch.Generator().manual_seed(1)
    za = torch.randn(3, 8, 2, 4, 4, generator=g)
    noise = torch.randn(3, 8, 2, 4, 4, generator=g)
    assert s4_pixel_infonce(3.0 * za, 0.5 * za + 0.1 * noise).item() == pytest.approx(
        s4_pixel_infonce(za, za + 0.2 * noise).item(), rel=1e-5)
    assert s4_pixel_infonce(za, za + 0.1 * noise) < s4_pixel_infonce(za, noise)


def test_pixel_sampling_bounds_memory_and_matches_the_loss_on_the_subset() -> None:
    g = torch.Generator().manual_seed(2)
    za = torch.randn(2, 4, 3, 4, 4, generator=g, dtype=torch.float64)
    zb = torch.randn(2, 4, 3, 4, 4, generator=g, dtype=torch.float64)
    idx = s4_sample_positions(2, 48, 10, torch.Generator().manual_seed(3))
    assert idx.shape == (2, 10) and all(len(set(r.tolist())) == 10 for r in idx) and int(idx.max()) < 48
    sub_a = torch.stack([za[i].flatten(1)[:, idx[i]] for i in range(2)])  # B x D x P
    sub_b = torch.stack([zb[i].flatten(1)[:, idx[i]] for i in range(2)])
    expected = np.mean([_naive_infonce(sub_a[i:i + 1].numpy(), sub_b[i:i + 1].numpy(), 0.5)[0] for i in range(2)])
    assert s4_pixel_infonce(za, zb, indices=idx).item() == pytest.approx(expected, rel=1e-10)
    # a seeded generator makes the sampling reproducible; the module wrapper samples num_pixels
    a1 = s4_pixel_infonce(za, zb, num_pixels=10, generator=torch.Generator().manual_seed(3))
    assert a1.item() == pytest.approx(s4_pixel_infonce(za, zb, indices=idx).item(), rel=1e-12)
    assert S4InfoNCELoss(0.5, None)(za, zb).item() == pytest.approx(s4_pixel_infonce(za, zb).item(), rel=1e-12)
    assert torch.equal(s4_sample_positions(1, 5, None), torch.arange(5)[None])


def test_infonce_bad_input() -> None:
    z = torch.randn(1, 4, 2, 4, 4)
    with pytest.raises(ValueError, match="same shape"):
        s4_pixel_infonce(z, torch.randn(1, 4, 2, 4, 5))  # mismatched H x W
    with pytest.raises(ValueError, match="same shape"):
        s4_pixel_infonce(z, torch.randn(1, 4, 3, 4, 4))  # different dates
    with pytest.raises(ValueError, match="temperature"):
        s4_pixel_infonce(z, z, temperature=0)
    with pytest.raises(ValueError, match="num_pixels"):
        s4_pixel_infonce(z, z, num_pixels=1)
    with pytest.raises(ValueError, match="T\\*H\\*W = 0"):
        s4_pixel_infonce(torch.randn(1, 4, 0, 4, 4), torch.randn(1, 4, 0, 4, 4))


def test_reconstruction_is_the_mean_l1_over_t_c_h_w_averaged_over_the_batch() -> None:
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(3, 2, 4, 5, 6, generator=g, dtype=torch.float64)
    target = torch.randn(3, 2, 4, 5, 6, generator=g, dtype=torch.float64)
    per_sample = [np.abs(pred[i].numpy() - target[i].numpy()).sum() / (4 * 2 * 5 * 6) for i in range(3)]
    assert s4_reconstruction_l1(pred, target).item() == pytest.approx(np.mean(per_sample), rel=1e-12)
    assert S4ReconstructionLoss()(pred, target).item() == pytest.approx(np.mean(per_sample), rel=1e-12)
    assert s4_reconstruction_l1(target, target).item() == 0
    # optional mask: only the weighted elements count, per sample
    mask = torch.zeros(3, 1, 4, 5, 6, dtype=torch.float64)
    mask[:, :, :2] = 1
    masked = [np.abs(pred[i, :, :2].numpy() - target[i, :, :2].numpy()).mean() for i in range(3)]
    assert s4_reconstruction_l1(pred, target, mask).item() == pytest.approx(np.mean(masked), rel=1e-12)
    with pytest.raises(ValueError, match="shapes differ"):
        s4_reconstruction_l1(pred, target[..., :5])
