"""Latent diffusion pieces of DUNIA waveform generation: Karras schedule, EDM preconditioning, CFG (eq. 14),
condition dropout, the cross-attention UNet and the Heun ODE sampler against an analytic Gaussian denoiser."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from terratorch_eoplugins.nn.diffusion1d import CrossAttentionUNet1D, KarrasLatentDiffusion, cfg_combine, karras_sigmas
from terratorch_eoplugins.runtime import exact_matmul

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _small_unet(cond_dim: int = 8) -> CrossAttentionUNet1D:
    return CrossAttentionUNet1D(in_channels=16, model_channels=16, channel_mult=(1, 2), cond_dim=cond_dim,
                                context_tokens=3, num_heads=2)


@pytest.mark.parametrize("n", [1, 5, 30])
def test_karras_sigmas_follow_eq5(n: int) -> None:
    s_min, s_max, rho = 0.002, 80.0, 7.0
    i = np.arange(n)
    ramp = i / (n - 1) if n > 1 else np.zeros(1)
    expected = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    got = karras_sigmas(n, s_min, s_max, rho).numpy()
    assert got.shape == (n + 1,) and got[-1] == 0.0
    np.testing.assert_allclose(got[:-1], expected.astype(np.float32), rtol=1e-5)
    assert got[0] == pytest.approx(s_max)


def test_cfg_combination_is_eq14() -> None:
    torch.manual_seed(0)
    dm = KarrasLatentDiffusion(_small_unet(), 8)
    torch.nn.init.normal_(dm.net.out[-1].weight, std=0.1)  # non-zero output so the condition matters
    x, c = torch.randn(4, 16, 8), F.normalize(torch.randn(4, 8), dim=1)
    null = dm.null_condition(4, x.device)
    sigma = torch.tensor([0.7])
    with torch.no_grad(), exact_matmul():
        d_c = dm.denoise(x, sigma, c)
        d_u = dm.denoise(x, sigma, null)
        assert not torch.allclose(d_c, d_u)
        for s in (0.0, 1.0, 3.0):
            expected = d_u + s * (d_c - d_u)
            torch.testing.assert_close(dm.guided_denoise(x, sigma, c, s, null), expected, atol=1e-5, rtol=1e-5)
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    torch.testing.assert_close(cfg_combine(a, b, 3.0), a + 3.0 * (b - a))


def test_edm_preconditioning_formula() -> None:
    dm = KarrasLatentDiffusion(_small_unet(), 8, sigma_data=0.5)  # zero-initialised output layer: F = 0
    x = torch.randn(2, 16, 8)
    sigma = torch.tensor([0.3, 4.0])
    with torch.no_grad():
        d = dm.denoise(x, sigma, torch.zeros(2, 8))
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    torch.testing.assert_close(d, c_skip[:, None, None] * x)


def test_condition_dropout_rate_and_null_vectors() -> None:
    dm = KarrasLatentDiffusion(_small_unet(), 8)
    cond = F.normalize(torch.randn(20000, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    out, dropped = dm.drop_condition(cond, 0.5, torch.Generator().manual_seed(0))
    # binomial(20000, 0.5): sd 0.0035, so +-0.015 is > 4 sd
    assert abs(dropped.float().mean().item() - 0.5) < 0.015
    assert torch.equal(out[~dropped], cond[~dropped])
    assert not torch.isclose(out[dropped], cond[dropped]).all(1).any()
    torch.testing.assert_close(out[dropped].norm(dim=1), torch.ones(int(dropped.sum())))  # random unit vectors
    assert not dm.drop_condition(cond, 0.0)[1].any() and dm.drop_condition(cond, 1.0)[1].all()
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        dm.drop_condition(cond, 1.5)
    learned = KarrasLatentDiffusion(_small_unet(), 8, null_condition="learned")
    out, dropped = learned.drop_condition(cond[:100], 1.0)
    assert torch.equal(out, learned.null_embedding.expand(100, -1))


def test_unet_shapes_uses_condition_and_errors() -> None:
    torch.manual_seed(0)
    net = _small_unet()
    torch.nn.init.normal_(net.out[-1].weight, std=0.1)
    x = torch.randn(3, 16, 16)
    c1, c2 = torch.randn(3, 8), torch.randn(3, 8)
    y1 = net(x, torch.zeros(3), c1)
    assert y1.shape == x.shape
    assert not torch.allclose(y1, net(x, torch.zeros(3), c2))  # the cross-attention reads the condition
    assert not torch.allclose(y1, net(x, torch.ones(3), c1))   # and the noise level matters
    paper = CrossAttentionUNet1D()
    assert paper.in_proj.out_channels == 128 and paper.in_proj.in_channels == 16
    assert paper(torch.randn(2, 16, 16), torch.zeros(2), torch.randn(2, 64)).shape == (2, 16, 16)
    with pytest.raises(ValueError, match="condition must be"):
        net(x, torch.zeros(3), torch.randn(3, 5))
    with pytest.raises(ValueError, match="divisible by 2"):
        net(torch.randn(3, 16, 7), torch.zeros(3), c1)
    with pytest.raises(ValueError, match="16 latent channels"):
        net(torch.randn(3, 4, 16), torch.zeros(3), c1)


class _GaussianOracle(KarrasLatentDiffusion):
    """Exact denoiser for data ``x0 ~ N(mu(c), sd^2 I)`` with ``mu(c) = 2 c[:, 0]`` (conditional) or 0 (null)."""

    def __init__(self, sd: float) -> None:
        super().__init__(_small_unet(), 8)
        self.sd = sd

    def denoise(self, x: Tensor, sigma: Tensor, cond: Tensor) -> Tensor:
        sigma = sigma.reshape(-1).expand(x.shape[0])[:, None, None]
        is_null = cond.abs().sum(1) < 1e-12
        mu = torch.where(is_null, torch.zeros_like(cond[:, 0]), 2 * cond[:, 0])[:, None, None]
        return (self.sd ** 2 * x + sigma ** 2 * mu) / (self.sd ** 2 + sigma ** 2)

    def null_condition(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> Tensor:
        return torch.zeros(n, self.cond_dim, device=device)


@pytest.mark.parametrize("solver,tol", [("heun", 0.03), ("euler", 0.15)])
def test_karras_ode_sampler_recovers_a_gaussian_and_guidance_extrapolates(solver: str, tol: float) -> None:
    dm = _GaussianOracle(sd=0.5)
    cond = torch.zeros(512, 8)
    cond[:, 0] = 1.0  # mu = 2
    g = torch.Generator().manual_seed(0)
    x = dm.sample(cond, (16, 8), num_steps=30, guidance_scale=1.0, solver=solver, generator=g)
    assert abs(x.mean().item() - 2.0) < tol and abs(x.std().item() - 0.5) < tol
    # s = 3: D_u + 3 (D_c - D_u); for this oracle the ODE ends at the extrapolated mean 3 * 2 = 6
    x3 = dm.sample(cond, (16, 8), num_steps=30, guidance_scale=3.0, solver=solver,
                   generator=torch.Generator().manual_seed(0))
    assert abs(x3.mean().item() - 6.0) < 3 * tol
    with pytest.raises(ValueError, match="solver"):
        dm.sample(cond, (16, 8), solver="rk4")


def test_training_loss_decreases() -> None:
    torch.manual_seed(0)
    dm = KarrasLatentDiffusion(_small_unet(), 8)
    g = torch.Generator().manual_seed(0)
    cond = F.normalize(torch.randn(64, 8, generator=g), dim=1)
    z0 = (torch.sin(torch.linspace(0, 6.28, 16))[None, None] * cond[:, :1, None] * 2).expand(64, 16, 16).contiguous()
    opt = torch.optim.Adam(dm.parameters(), lr=3e-3)
    fixed = torch.Generator()

    def eval_loss() -> float:
        with torch.no_grad():
            return dm.loss(z0, cond, 0.0, generator=fixed.manual_seed(5)).item()

    before = eval_loss()
    for _ in range(60):
        loss = dm.loss(z0, cond, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.8 * before  # measured 0.115 -> 0.075
