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


# ----------------------------------------------------------------------------- every position, in chunks
def _reference_infonce(za: torch.Tensor, zb: torch.Tensor, tau: float,
                       valid: torch.Tensor | None = None) -> torch.Tensor:
    """Unchunked float64 formula with explicit masks (independent of the chunked implementation): per sample,
    the full N x N cosine matrix, rows and columns of invalid positions dropped, symmetric CE mean."""
    out = []
    for i in range(za.shape[0]):
        a = za[i].reshape(za.shape[1], -1).T.double()
        b = zb[i].reshape(zb.shape[1], -1).T.double()
        if valid is not None:
            keep = valid[i].reshape(-1).bool()
            a, b = a[keep], b[keep]
        a = a / a.norm(dim=1, keepdim=True)
        b = b / b.norm(dim=1, keepdim=True)
        s = a @ b.T / tau
        la = (torch.logsumexp(s, 1) - s.diagonal()).mean()
        lb = (torch.logsumexp(s.T, 1) - s.diagonal()).mean()
        out.append((la + lb) / 2)
    return torch.stack(out).mean()


def test_chunked_infonce_over_every_position_equals_the_unchunked_formula() -> None:
    g = torch.Generator().manual_seed(5)
    za = torch.randn(2, 6, 3, 4, 5, generator=g, dtype=torch.float64)  # N = 60 positions
    zb = torch.randn(2, 6, 3, 4, 5, generator=g, dtype=torch.float64)
    ref = _reference_infonce(za, zb, 0.5)
    # the loop-based formula of the first test agrees with the reference on a sample
    assert ref.item() == pytest.approx(_naive_infonce(za.numpy(), zb.numpy(), 0.5)[0], rel=1e-10)
    grads = []
    for chunk in (None, 1, 7, 60, 1000):
        a, b = za.clone().requires_grad_(), zb.clone().requires_grad_()
        loss = s4_pixel_infonce(a, b, chunk_size=chunk)  # num_pixels=None: every position (paper default)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-12)
        loss.backward()
        grads.append((a.grad, b.grad))
    for ga, gb in grads[1:]:
        assert torch.allclose(ga, grads[0][0], rtol=1e-10, atol=1e-12)
        assert torch.allclose(gb, grads[0][1], rtol=1e-10, atol=1e-12)
    # the module wrapper's default is every position as well
    assert S4InfoNCELoss()(za, zb).item() == pytest.approx(ref.item(), rel=1e-12)


def test_chunked_infonce_memory_is_bounded_by_the_chunk() -> None:
    """No tensor saved for the backward pass is larger than one chunk of logits (B x chunk x N), whereas the
    unchunked loss saves the whole B x N x N matrix."""
    za = torch.randn(2, 8, 4, 8, 8, requires_grad=True)  # N = 256
    zb = torch.randn(2, 8, 4, 8, 8, requires_grad=True)
    n = 256

    def largest_saved(chunk: int | None) -> int:
        sizes = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = s4_pixel_infonce(za, zb, chunk_size=chunk)
        loss.backward()
        return max(sizes)

    assert largest_saved(None) >= 2 * n * n
    assert largest_saved(32) <= 2 * 32 * n


def test_valid_mask_drops_padded_positions_as_anchors_and_negatives() -> None:
    g = torch.Generator().manual_seed(6)
    za = torch.randn(2, 5, 3, 2, 2, generator=g, dtype=torch.float64)
    zb = torch.randn(2, 5, 3, 2, 2, generator=g, dtype=torch.float64)
    valid = torch.ones(2, 3, 2, 2, dtype=torch.bool)
    valid[1, 2] = False  # sample 1: its last time cell is padding
    ref = _reference_infonce(za, zb, 0.5, valid)
    for chunk in (None, 3):
        assert s4_pixel_infonce(za, zb, valid=valid, chunk_size=chunk).item() == pytest.approx(ref.item(), rel=1e-12)
    # = the mean of the two samples computed alone on their real positions
    alone = (s4_pixel_infonce(za[:1], zb[:1]) + s4_pixel_infonce(za[1:, :, :2], zb[1:, :, :2])) / 2
    assert s4_pixel_infonce(za, zb, valid=valid).item() == pytest.approx(alone.item(), rel=1e-12)
    # changing padded features changes nothing
    zb2 = zb.clone()
    zb2[1, :, 2] = 100.0
    assert s4_pixel_infonce(za, zb2, valid=valid).item() == pytest.approx(ref.item(), rel=1e-12)
    # sampling draws among the valid positions only
    idx = s4_sample_positions(2, 12, 8, torch.Generator().manual_seed(0), valid=valid.flatten(1))
    assert int(idx[1].max()) < 8 and len(set(idx[1].tolist())) == 8
    with pytest.raises(ValueError, match="one flag per position"):
        s4_pixel_infonce(za, zb, valid=valid[:, :2])
    with pytest.raises(ValueError, match="at least 2 valid positions"):
        s4_pixel_infonce(za, zb, valid=torch.zeros(2, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_size"):
        s4_pixel_infonce(za, zb, chunk_size=0)


def test_sampled_positions_lower_the_loss_by_about_log_all_over_sampled() -> None:
    """The earlier default (256 sampled positions) vs every position: with unrelated features the loss is about
    log(number of candidates), so sampling P of N positions lowers it by about log(N / P)."""
    g = torch.Generator().manual_seed(7)
    za = torch.randn(1, 64, 4, 16, 16, generator=g)  # N = 1024
    zb = torch.randn(1, 64, 4, 16, 16, generator=g)
    full = s4_pixel_infonce(za, zb).item()
    sampled = s4_pixel_infonce(za, zb, num_pixels=256, generator=torch.Generator().manual_seed(0)).item()
    assert full - sampled == pytest.approx(math.log(1024 / 256), abs=0.05)
