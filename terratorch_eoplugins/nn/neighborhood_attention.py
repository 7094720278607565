"""2-D neighborhood attention (Hassani et al., 2023), as used at full resolution by DUNIA's decoders.

Every query pixel attends to a ``k x k`` window of keys around it. At the borders the window is *shifted*
inside the map (not zero-padded), so every query sees exactly ``k x k`` keys: along an axis of length ``L``
the window of position ``i`` starts at ``clamp(i - k // 2, 0, L - k)`` (natten's rule,
``natten/backends/flex.py::get_na_flex_mask``: window centre clamped to ``[k//2, L - 1 - (k//2 + k%2 - 1)]``).
A kernel larger than the map is clamped to the map size (DUNIA's window 19 on small crops), in which case
each query attends to the whole axis.

Two implementations of the same operation:

* :func:`na2d_reference`: pure PyTorch. Queries are processed in square blocks; the keys of a block lie in
  one rectangle, attended with a fused masked ``scaled_dot_product_attention`` (the mask keeps each query's
  ``k x k`` window). Differentiable everywhere.
* natten's ``natten.functional.na2d`` (flex backend on CPU, fused kernels on CUDA) when importable.
  natten's CPU flex backend has **no backward pass**, needs a power-of-two head dim in [8, 512] and runs
  eagerly (measured ~50x slower than :func:`na2d_reference` on a 64 x 64 map, window 19, on one CPU thread),
  so :func:`neighborhood_attention_2d` with ``backend="auto"`` uses natten for CUDA tensors only and the
  PyTorch implementation otherwise; ``backend="natten"`` forces natten (CPU: inference only).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NATTEN_AVAILABLE", "NeighborhoodAttention2D", "na2d_reference", "neighborhood_attention_2d",
           "window_starts"]

try:  # natten is optional
    from natten.functional import na2d as _natten_na2d

    NATTEN_AVAILABLE = True
except Exception:  # pragma: no cover - depends on the environment
    _natten_na2d = None
    NATTEN_AVAILABLE = False

Backend = Literal["auto", "natten", "torch"]


def _clamp_kernel(kernel_size: int | tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    if len(ks) != 2 or min(ks) < 1:
        raise ValueError(f"kernel_size must be a positive int or a pair of them, got {kernel_size!r}")
    return min(int(ks[0]), size[0]), min(int(ks[1]), size[1])


def window_starts(length: int, kernel: int, device: torch.device | None = None) -> Tensor:
    """First key index of each query's window along an axis: ``clamp(i - kernel // 2, 0, length - kernel)``."""
    if not 1 <= kernel <= length:
        raise ValueError(f"kernel {kernel} must lie in [1, length={length}] (clamp it to the map size first)")
    i = torch.arange(length, device=device)
    return (i - kernel // 2).clamp(0, length - kernel)


def _check_qkv(query: Tensor, key: Tensor, value: Tensor) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.ndim != 5:
            raise ValueError(f"neighborhood attention expects heads-last [B, H, W, heads, head_dim] tensors; "
                             f"{name} has shape {tuple(getattr(t, 'shape', ()))}")
    if query.shape[:4] != key.shape[:4] or key.shape[:4] != value.shape[:4] or query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} must share "
            "[B, H, W, heads] (and query/key the head dim)"
        )


def na2d_reference(query: Tensor, key: Tensor, value: Tensor, kernel_size: int | tuple[int, int],
                   scale: float | None = None, tile: int = 16) -> Tensor:
    """Pure-PyTorch 2-D neighborhood attention with natten's border rule (see the module docstring).

    The query grid is cut into ``tile x tile`` blocks; the keys of a block's queries lie in one rectangle
    (from the first query's window start to the last query's window end along each axis), so each block is
    one dense :func:`torch.nn.functional.scaled_dot_product_attention` call over that rectangle with a boolean
    mask keeping, for every query, exactly the ``kh x kw`` keys of its (shifted) window.

    Args:
        query, key, value: ``[B, H, W, heads, head_dim]`` (natten's heads-last layout).
        kernel_size: window side(s); clamped to ``(H, W)``.
        scale: logit scale (default ``head_dim ** -0.5``).
        tile: query block side.
    """
    _check_qkv(query, key, value)
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    b, h, w, nh, d = query.shape
    kh, kw = _clamp_kernel(kernel_size, (h, w))
    dev = query.device
    sy, sx = window_starts(h, kh, dev), window_starts(w, kw, dev)
    q_all = query.permute(0, 3, 1, 2, 4)  # B x nh x H x W x d
    k_all = key.permute(0, 3, 1, 2, 4)
    v_all = value.permute(0, 3, 1, 2, 4)
    out = query.new_empty(b, nh, h, w, value.shape[-1])
    for r0 in range(0, h, tile):
        r1 = min(h, r0 + tile)
        kr0, kr1 = int(sy[r0]), int(sy[r1 - 1]) + kh
        # key-row membership of each query row: [nq_rows, nk_rows]
        krow = torch.arange(kr0, kr1, device=dev)
        row_ok = (krow[None] >= sy[r0:r1, None]) & (krow[None] < sy[r0:r1, None] + kh)
        for c0 in range(0, w, tile):
            c1 = min(w, c0 + tile)
            kc0, kc1 = int(sx[c0]), int(sx[c1 - 1]) + kw
            kcol = torch.arange(kc0, kc1, device=dev)
            col_ok = (kcol[None] >= sx[c0:c1, None]) & (kcol[None] < sx[c0:c1, None] + kw)
            # [qr, qc, kr, kc] -> [nq, nk]
            mask = (row_ok[:, None, :, None] & col_ok[None, :, None, :]).reshape((r1 - r0) * (c1 - c0), -1)
            q = q_all[:, :, r0:r1, c0:c1].reshape(b, nh, -1, d)
            k = k_all[:, :, kr0:kr1, kc0:kc1].reshape(b, nh, -1, d)
            v = v_all[:, :, kr0:kr1, kc0:kc1].reshape(b, nh, -1, value.shape[-1])
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            out[:, :, r0:r1, c0:c1] = o.view(b, nh, r1 - r0, c1 - c0, -1)
    return out.permute(0, 2, 3, 1, 4)


def neighborhood_attention_2d(query: Tensor, key: Tensor, value: Tensor, kernel_size: int | tuple[int, int],
                              scale: float | None = None, backend: Backend = "auto") -> Tensor:
    """2-D neighborhood attention of ``[B, H, W, heads, head_dim]`` tensors with the kernel clamped to ``(H, W)``.

    ``backend``: ``"natten"`` (error when natten is missing, or on CPU when a gradient is needed - natten's
    flex backend has no CPU backward - or the head dim is not a power of two in [8, 512]), ``"torch"``
    (:func:`na2d_reference`) or ``"auto"`` (natten for CUDA tensors, the PyTorch implementation otherwise).
    """
    _check_qkv(query, key, value)
    ks = _clamp_kernel(kernel_size, tuple(query.shape[1:3]))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    d = query.shape[-1]
    cpu_ok = not needs_grad and 8 <= d <= 512 and d & (d - 1) == 0  # natten's flex backend limits on CPU
    natten_ok = NATTEN_AVAILABLE and (query.is_cuda or cpu_ok)
    if backend == "natten":
        if not NATTEN_AVAILABLE:
            raise RuntimeError("backend='natten' but natten is not importable; use backend='auto' or 'torch'")
        if not natten_ok:
            raise RuntimeError(
                "backend='natten': natten's CPU (flex) backend has no backward pass and needs a power-of-two "
                f"head_dim in [8, 512] (got {d}); use backend='auto' (falls back to the PyTorch "
                "implementation)"
            )
    elif backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto', 'natten' or 'torch', got {backend!r}")
    if backend == "natten" or (backend == "auto" and NATTEN_AVAILABLE and query.is_cuda):
        return _natten_na2d(query.contiguous(), key.contiguous(), value.contiguous(), kernel_size=ks, scale=scale)
    return na2d_reference(query, key, value, ks, scale)


class NeighborhoodAttention2D(nn.Module):
    """Neighborhood-attention layer on ``[B, C, H, W]`` maps: pre-norm NA + residual, then pre-norm MLP + residual.

    The attention is natten's ``NeighborhoodAttention2D`` operation (qkv projection, 2-D NA with window
    ``kernel_size`` clamped to the map, output projection) written here so that it runs with or without
    natten; the MLP (ratio ``mlp_ratio``, GELU) completes a standard transformer layer as in the NA paper's
    NAT blocks.

    Args:
        dim: channels ``C``.
        num_heads: attention heads (``dim`` must be divisible by it).
        kernel_size: window side (DUNIA: 19), clamped to the map size at run time.
        mlp_ratio: hidden width of the MLP relative to ``dim`` (0 disables the MLP).
        dropout: dropout on the attention output and MLP.
        backend: see :func:`neighborhood_attention_2d`.
    """

    def __init__(self, dim: int, num_heads: int = 4, kernel_size: int = 19, mlp_ratio: float = 2.0,
                 dropout: float = 0.0, backend: Backend = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"NeighborhoodAttention2D: dim={dim} is not divisible by num_heads={num_heads}")
        if kernel_size < 1:
            raise ValueError(f"NeighborhoodAttention2D: kernel_size must be >= 1, got {kernel_size}")
        self.dim, self.num_heads, self.kernel_size, self.backend = dim, num_heads, int(kernel_size), backend
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        hidden = int(round(dim * mlp_ratio))
        self.mlp = (
            None
            if hidden == 0
            else nn.Sequential(
                nn.LayerNorm(dim),
                nn.Linear(dim, hidden),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, dim),
                nn.Dropout(dropout),
            )
        )

    def attention(self, x: Tensor) -> Tensor:
        """Neighborhood attention (no residual) of channels-last ``[B, H, W, C]``."""
        b, h, w, c = x.shape
        qkv = self.qkv(x).view(b, h, w, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.unbind(3)
        out = neighborhood_attention_2d(q, k, v, self.kernel_size, backend=self.backend)
        return self.proj(out.reshape(b, h, w, c))

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, C, H, W]``."""
        if x.ndim != 4 or x.shape[1] != self.dim:
            raise ValueError(f"NeighborhoodAttention2D expects [B, {self.dim}, H, W], got {tuple(x.shape)}")
        y = x.permute(0, 2, 3, 1)
        y = y + self.drop(self.attention(self.norm1(y)))
        if self.mlp is not None:
            y = y + self.mlp(y)
        return y.permute(0, 3, 1, 2).contiguous()

