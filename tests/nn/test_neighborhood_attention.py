"""Neighborhood attention: PyTorch implementation vs a brute-force reference and vs natten."""

from __future__ import annotations

import pytest
import torch

from terratorch_eoplugins.nn.neighborhood_attention import (
    NATTEN_AVAILABLE,
    NeighborhoodAttention2D,
    na2d_reference,
    neighborhood_attention_2d,
    window_starts,
)
from terratorch_eoplugins.runtime import exact_matmul


def brute_force_na2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: int) -> torch.Tensor:
    """Loop over every query; natten's rule written from its definition: the window centre is the query
    clamped to [k//2, L-1-(k//2 + k%2 - 1)], the window spans [centre - k//2, centre + k//2 + k%2 - 1]."""
    b, h, w, nh, d = q.shape
    out = torch.zeros(b, h, w, nh, v.shape[-1], dtype=q.dtype)
    kh, kw = min(kernel, h), min(kernel, w)

    def window(i: int, length: int, ks: int) -> range:
        left, right = ks // 2, ks // 2 + ks % 2 - 1
        centre = min(max(i, left), length - 1 - right)
        return range(centre - left, centre + right + 1)

    for i in range(h):
        for j in range(w):
            rows, cols = window(i, h, kh), window(j, w, kw)
            keys = k[:, rows.start:rows.stop, cols.start:cols.stop].reshape(b, -1, nh, d)
            vals = v[:, rows.start:rows.stop, cols.start:cols.stop].reshape(b, -1, nh, v.shape[-1])
            att = torch.einsum("bhd,bnhd->bhn", q[:, i, j], keys) * d ** -0.5
            out[:, i, j] = torch.einsum("bhn,bnhd->bhd", att.softmax(-1), vals)
    return out


def test_window_starts_shift_at_borders() -> None:
    assert window_starts(10, 5).tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 5, 5]
    assert window_starts(6, 6).tolist() == [0] * 6
    with pytest.raises(ValueError, match="clamp"):
        window_starts(4, 5)


@pytest.mark.parametrize("h,w,kernel,tile", [(7, 9, 3, 4), (8, 6, 4, 3), (5, 11, 19, 16), (12, 12, 5, 16)])
def test_reference_matches_brute_force(h: int, w: int, kernel: int, tile: int) -> None:
    torch.manual_seed(h * w + kernel)
    q, k, v = (torch.randn(2, h, w, 2, 4, dtype=torch.float64) for _ in range(3))
    ours = na2d_reference(q, k, v, kernel, tile=tile)
    assert torch.allclose(ours, brute_force_na2d(q, k, v, kernel), atol=1e-10)


def test_reference_gradients_match_brute_force() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 6, 7, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g1 = torch.autograd.grad(na2d_reference(q, k, v, 3, tile=4).square().sum(), (q, k, v))
    g2 = torch.autograd.grad(brute_force_na2d(q, k, v, 3).square().sum(), (q, k, v))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-9)


@pytest.mark.skipif(not NATTEN_AVAILABLE, reason="natten not installed")
@pytest.mark.parametrize("h,w,kernel", [(10, 7, 4), (17, 24, 19)])
def test_natten_and_pytorch_agree(h: int, w: int, kernel: int) -> None:
    torch.manual_seed(kernel)
    q, k, v = (torch.randn(2, h, w, 2, 8) for _ in range(3))  # natten's CPU backend: power-of-two head dim >= 8
    with torch.no_grad(), exact_matmul():  # the reference must not run in bf16/TF32 under "medium" precision
        ours = neighborhood_attention_2d(q, k, v, kernel, backend="torch")
        theirs = neighborhood_attention_2d(q, k, v, kernel, backend="natten")
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_auto_backend_trains_on_cpu() -> None:
    """natten has no CPU backward: 'auto' must fall back to the PyTorch path when gradients are needed."""
    q = torch.randn(1, 8, 8, 2, 8, requires_grad=True)
    out = neighborhood_attention_2d(q, q, q, 5, backend="auto")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    if NATTEN_AVAILABLE and not q.is_cuda:
        with pytest.raises(RuntimeError, match="backward"):
            neighborhood_attention_2d(q, q, q, 5, backend="natten")


def test_module_shapes_clamping_and_errors() -> None:
    layer = NeighborhoodAttention2D(16, num_heads=2, kernel_size=19)
    x = torch.randn(2, 16, 8, 12)  # window 19 > map: clamped, every pixel sees the whole map
    assert layer(x).shape == x.shape
    with pytest.raises(ValueError, match=r"\[B, 16, H, W\]"):
        layer(torch.randn(2, 8, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        NeighborhoodAttention2D(10, num_heads=4)
    with pytest.raises(ValueError, match="heads-last"):
        neighborhood_attention_2d(torch.randn(2, 4, 4, 8), torch.randn(2, 4, 4, 8), torch.randn(2, 4, 4, 8), 3)
    with pytest.raises(ValueError, match="backend"):
        neighborhood_attention_2d(*(torch.randn(1, 4, 4, 1, 8) for _ in range(3)), 3, backend="cuda")
