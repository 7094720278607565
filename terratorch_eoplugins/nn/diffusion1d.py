"""Conditional latent diffusion over DUNIA waveform latents (paper section 3.5, appendix C, appendix E.1).

* :class:`CrossAttentionUNet1D`: the denoiser. The ``[N, 16, L/16]`` quantized waveform latent is projected to
  128 channels (appendix E.1) and passed through a small 1-D UNet (ResNet blocks with a FiLM time embedding,
  strided-conv down / nearest+conv up, skip concatenation) with a **cross-attention layer on the pixel
  embedding** :math:`\\mathcal{O}^V_{\\phi,\\lambda}` after every ResNet block ("integrated into the UNet via
  cross-attention at each layer", appendix C). The condition vector ``[N, D_p]`` is mapped to ``context_tokens``
  key/value tokens (with one token, softmax attention would be a constant: the output would not depend on the
  query), each latent position attends to them.
  diffusers' ``UNet1DModel`` has no cross-attention (and its ``UNet2DConditionModel`` is 2-D only), so this small
  UNet is written here.
* :class:`KarrasLatentDiffusion`: EDM preconditioning (Karras et al. 2022, eq. 7: ``D(x; s) = c_skip x + c_out
  F(c_in x, c_noise, c)``), the training objective of eq. 13 (the network output is the denoised latent ``z_0``;
  ``log s ~ N(P_mean, P_std^2)``; unweighted as in eq. 13, or EDM's ``lambda(s)`` weighting), condition dropout
  for classifier-free guidance (50%; "we replace the conditioning signal with a random vector", appendix C),
  guidance eq. 14 ``D_hat = D(x, s) + s_cfg (D(x, s, c) - D(x, s))`` and the deterministic **Karras ODE sampler**
  (Algorithm 1, Heun's 2nd-order method, 30 steps; Euler available). The noise levels follow the Karras
  schedule ``s_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``, ``s_n = 0``
  (:func:`karras_sigmas`, one line of arithmetic, so no diffusion library is a dependency); diffusers has no EDM
  Heun scheduler either (``HeunDiscreteScheduler`` derives its sigmas from a discrete DDPM beta schedule), so the
  Heun step is written here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from terratorch_eoplugins.runtime import exact_matmul

__all__ = ["CrossAttentionUNet1D", "KarrasLatentDiffusion", "cfg_combine", "karras_sigmas"]


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) eq. 5 noise levels ``[num_steps + 1]`` (decreasing, last = 0).

    ``s_i = (s_max^(1/rho) + i / (N - 1) * (s_min^(1/rho) - s_max^(1/rho)))^rho`` for ``i < N``, ``s_N = 0``;
    evaluated in float64, returned as float32. (One line of arithmetic: computed here rather than through a
    diffusion library's scheduler object.)
    """
    if num_steps < 1:
        raise ValueError(f"karras_sigmas: num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"karras_sigmas: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if rho <= 0:
        raise ValueError(f"karras_sigmas: rho must be > 0, got {rho}")
    if num_steps > 1:
        ramp = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)
    else:
        ramp = torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def cfg_combine(uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance, appendix C eq. 14: ``uncond + scale * (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


def _groups(ch: int) -> int:
    return math.gcd(8, ch)


def timestep_embedding(c_noise: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[N, dim]`` of the (continuous) noise conditioning ``c_noise [N]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=c_noise.device, dtype=torch.float32) / half)
    args = 1000.0 * c_noise.float()[:, None] * freqs[None]  # c_noise = ln(s)/4 ~ [-2, 2] -> [-2000, 2000]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class TimeResBlock1d(nn.Module):
    """``GroupNorm, SiLU, Conv1d 3`` twice with a FiLM (scale, shift) from the time embedding; 1x1 skip."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv1d(in_ch, out_ch, 3, padding=1)
        self.film = nn.Linear(time_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(temb).unsqueeze(-1).chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return h + self.skip(x)


class CrossAttention1d(nn.Module):
    """Pre-norm residual cross-attention: latent positions (queries) attend to the condition tokens."""

    def __init__(self, channels: int, context_dim: int, num_heads: int) -> None:
        super().__init__()
        heads = num_heads if channels % num_heads == 0 else 1
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.attn = nn.MultiheadAttention(channels, heads, kdim=context_dim, vdim=context_dim, batch_first=True)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        q = self.norm(x).transpose(1, 2)
        out, _ = self.attn(q, context, context, need_weights=False)
        return x + out.transpose(1, 2)


class CrossAttentionUNet1D(nn.Module):
    """1-D UNet ``F(x [N, C, L'], c_noise [N], cond [N, D_p]) -> [N, C, L']`` with cross-attention on ``cond``.

    Args:
        in_channels: latent channels (16).
        model_channels: width after the input projection (appendix E.1: 128).
        channel_mult: width multipliers per level; level ``i`` runs at length ``L' / 2^i`` (``L'`` divisible by
            ``2^(levels-1)``).
        cond_dim: ``D_p`` of the condition vector.
        context_tokens: key/value tokens the condition is mapped to.
        num_heads: attention heads.
        dropout: dropout inside the ResNet blocks.
    """

    def __init__(self, in_channels: int = 16, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2),
                 cond_dim: int = 64, context_tokens: int = 4, num_heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"CrossAttentionUNet1D: channel_mult must be positive ints, got {list(channel_mult)}")
        self.in_channels, self.cond_dim, self.context_tokens = in_channels, cond_dim, context_tokens
        self.levels = len(channel_mult)
        tdim = 4 * model_channels
        self.model_channels = model_channels
        self.time_mlp = nn.Sequential(nn.Linear(model_channels, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        ctx = model_channels
        self.context = nn.Sequential(nn.Linear(cond_dim, ctx * context_tokens), nn.SiLU(),
                                     nn.Linear(ctx * context_tokens, ctx * context_tokens))
        self.ctx_dim = ctx
        self.ctx_pos = nn.Parameter(torch.zeros(context_tokens, ctx))
        self.in_proj = nn.Conv1d(in_channels, model_channels, 1)
        widths = [model_channels * m for m in channel_mult]
        self.down_blocks = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.downsample = nn.ModuleList()
        ch = model_channels
        skips = []
        for i, w in enumerate(widths):
            self.down_blocks.append(TimeResBlock1d(ch, w, tdim, dropout))
            self.down_attn.append(CrossAttention1d(w, ctx, num_heads))
            ch = w
            skips.append(ch)
            if i < self.levels - 1:
                self.downsample.append(nn.Conv1d(ch, ch, 3, stride=2, padding=1))
        self.mid1 = TimeResBlock1d(ch, ch, tdim, dropout)
        self.mid_attn = CrossAttention1d(ch, ctx, num_heads)
        self.mid2 = TimeResBlock1d(ch, ch, tdim, dropout)
        self.up_blocks = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            self.up_blocks.append(TimeResBlock1d(ch + skips[i], w, tdim, dropout))
            self.up_attn.append(CrossAttention1d(w, ctx, num_heads))
            ch = w
            if i > 0:
                self.upsample.append(nn.Conv1d(ch, ch, 3, padding=1))
        self.out = nn.Sequential(nn.GroupNorm(_groups(ch), ch), nn.SiLU(), nn.Conv1d(ch, in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor) -> Tensor:
        n, c, length = x.shape
        if c != self.in_channels:
            raise ValueError(
                f"CrossAttentionUNet1D: expected {self.in_channels} latent channels, got shape {tuple(x.shape)}"
            )
        if length % 2 ** (self.levels - 1):
            raise ValueError(f"CrossAttentionUNet1D: latent length {length} must be divisible by "
                             f"{2 ** (self.levels - 1)} ({self.levels} levels)")
        if cond.shape != (n, self.cond_dim):
            raise ValueError(
                f"CrossAttentionUNet1D: condition must be [N={n}, {self.cond_dim}], got {tuple(cond.shape)}"
            )
        temb = self.time_mlp(
            timestep_embedding(c_noise.expand(n) if c_noise.ndim == 0 else c_noise, self.model_channels)
        )
        ctx = self.context(cond).view(n, self.context_tokens, self.ctx_dim) + self.ctx_pos
        h = self.in_proj(x)
        skips = []
        for i in range(self.levels):
            h = self.down_attn[i](self.down_blocks[i](h, temb), ctx)
            skips.append(h)
            if i < self.levels - 1:
                h = self.downsample[i](h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb), ctx), temb)
        for j in range(self.levels):
            h = torch.cat([h, skips.pop()], dim=1)
            h = self.up_attn[j](self.up_blocks[j](h, temb), ctx)
            if j < self.levels - 1:
                h = self.upsample[j](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(h)


class KarrasLatentDiffusion(nn.Module):
    """EDM-preconditioned conditional diffusion with CFG and the Karras ODE sampler (appendix C).

    Args:
        net: the denoiser network ``F(x, c_noise, cond)`` (:class:`CrossAttentionUNet1D`).
        cond_dim: ``D_p`` of the condition.
        sigma_data: standard deviation of the (standardised) latents.
        sigma_min, sigma_max, rho: Karras noise schedule (0.002, 80, 7).
        p_mean, p_std: training noise distribution ``ln s ~ N(p_mean, p_std^2)`` (EDM: -1.2, 1.2).
        null_condition: ``"random"`` (the paper: a random vector, here a random unit vector as the conditions are
            L2-normalised) or ``"learned"`` (a learned null embedding).
        loss_weighting: ``"none"`` (eq. 13: plain MSE to ``z_0``) or ``"edm"`` (``lambda(s) = (s^2 + s_d^2) /
            (s s_d)^2``).
    """

    def __init__(self, net: nn.Module, cond_dim: int, sigma_data: float = 1.0, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = 7.0, p_mean: float = -1.2, p_std: float = 1.2,
                 null_condition: Literal["random", "learned"] = "random",
                 loss_weighting: Literal["none", "edm"] = "none") -> None:
        super().__init__()
        if null_condition not in ("random", "learned"):
            raise ValueError(f"null_condition must be 'random' or 'learned', got {null_condition!r}")
        if loss_weighting not in ("none", "edm"):
            raise ValueError(f"loss_weighting must be 'none' or 'edm', got {loss_weighting!r}")
        self.net, self.cond_dim = net, cond_dim
        self.sigma_data, self.sigma_min, self.sigma_max, self.rho = sigma_data, sigma_min, sigma_max, rho
        self.p_mean, self.p_std = p_mean, p_std
        self.null_mode, self.loss_weighting = null_condition, loss_weighting
        self.null_embedding = nn.Parameter(torch.zeros(cond_dim)) if null_condition == "learned" else None

    # ------------------------------------------------------------------------------- conditions
    def null_condition(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        """``[n, D_p]`` null conditions: random unit vectors (paper) or the learned null embedding."""
        if self.null_embedding is not None:
            return self.null_embedding.unsqueeze(0).expand(n, -1)
        v = torch.randn(n, self.cond_dim, generator=generator, device="cpu" if generator is not None else device)
        return F.normalize(v, dim=1).to(device)

    def drop_condition(self, cond: Tensor, p: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Replace each row of ``cond`` by a null condition with probability ``p``; returns ``(cond, dropped)``."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"condition dropout probability must be in [0, 1], got {p}")
        u = torch.rand(cond.shape[0], generator=generator, device="cpu" if generator is not None else cond.device)
        dropped = (u < p).to(cond.device)
        null = self.null_condition(cond.shape[0], cond.device, generator)
        return torch.where(dropped[:, None], null.to(cond.dtype), cond), dropped

    # ---------------------------------------------------------------------------- denoiser (EDM)
    def denoise(self, x: Tensor, sigma: Tensor, cond: Tensor) -> Tensor:
        """``D(x; s, c) = c_skip x + c_out F(c_in x, c_noise, c)`` (Karras et al. 2022, Table 1)."""
        sigma = sigma.to(x.dtype).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        sd2 = self.sigma_data ** 2
        s = sigma[:, None, None]
        c_skip = sd2 / (s ** 2 + sd2)
        c_out = s * self.sigma_data / torch.sqrt(s ** 2 + sd2)
        c_in = 1.0 / torch.sqrt(s ** 2 + sd2)
        c_noise = torch.log(sigma) / 4.0
        return c_skip * x + c_out * self.net(c_in * x, c_noise, cond)

    def guided_denoise(self, x: Tensor, sigma: Tensor, cond: Tensor, guidance_scale: float,
                       null: Tensor | None = None) -> Tensor:
        """Eq. 14 on the denoised latents; one batched call for the conditional and unconditional branches."""
        if guidance_scale == 1.0:
            return self.denoise(x, sigma, cond)
        null = self.null_condition(x.shape[0], x.device) if null is None else null
        sig = sigma.reshape(-1).expand(x.shape[0]) if sigma.numel() == 1 else sigma
        # the batched call must equal two separate calls (eq. 14 is a difference of the two branches); reduced
        # precision matmuls (TF32/bf16 under "medium") would make the result depend on the batch composition
        with exact_matmul():
            both = self.denoise(torch.cat([x, x]), torch.cat([sig, sig]), torch.cat([cond, null]))
        d_cond, d_uncond = both.chunk(2)
        return cfg_combine(d_uncond, d_cond, guidance_scale)

    # ---------------------------------------------------------------------------------- training
    def loss(self, z0: Tensor, cond: Tensor, p_uncond: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
        """Eq. 13: ``|| D(z0 + s e; s, c~) - z0 ||^2`` with ``ln s ~ N(P_mean, P_std^2)`` and ``c~`` the condition
        dropped to a null condition with probability ``p_uncond``."""
        n = z0.shape[0]
        dev = "cpu" if generator is not None else z0.device
        sigma = torch.exp(self.p_mean + self.p_std * torch.randn(n, generator=generator, device=dev)).to(z0.device)
        noise = torch.randn(z0.shape, generator=generator, device=dev).to(z0.device)
        cond, _ = self.drop_condition(cond, p_uncond, generator)
        d = self.denoise(z0 + sigma[:, None, None] * noise, sigma, cond)
        err = (d - z0).pow(2).mean(dim=(1, 2))
        if self.loss_weighting == "edm":
            err = err * (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return err.mean()

    # ---------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, cond: Tensor, shape: Sequence[int], num_steps: int = 30, guidance_scale: float = 3.0,
               solver: Literal["heun", "euler"] = "heun", generator: torch.Generator | None = None) -> Tensor:
        """Karras et al. (2022) Algorithm 1 (deterministic): ``x_0 ~ N(0, s_0^2 I)``, ``d = (x - D_hat(x; s_i)) / s_i``,
        Euler step to ``s_{i+1}`` and Heun's correction when ``s_{i+1} > 0``. ``shape`` = ``(C, L')`` of one latent."""
        if solver not in ("heun", "euler"):
            raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
        n = cond.shape[0]
        sigmas = karras_sigmas(num_steps, self.sigma_min, self.sigma_max, self.rho).to(cond.device)
        dev = "cpu" if generator is not None else cond.device
        x = torch.randn((n, *shape), generator=generator, device=dev).to(cond.device) * sigmas[0]
        null = self.null_condition(n, cond.device, generator)

        def d_hat(x_: Tensor, s: Tensor) -> Tensor:
            return self.guided_denoise(x_, s.reshape(1), cond, guidance_scale, null)

        for i in range(num_steps):
            s, s_next = sigmas[i], sigmas[i + 1]
            d = (x - d_hat(x, s)) / s
            x_next = x + (s_next - s) * d
            if solver == "heun" and s_next > 0:
                d2 = (x_next - d_hat(x_next, s_next)) / s_next
                x_next = x + (s_next - s) * 0.5 * (d + d2)
            x = x_next
        return x
