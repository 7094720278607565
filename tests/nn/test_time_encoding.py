"""LIANet time encodings: index, sinusoidal, learned Fourier and MLP modes against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from terratorch_eoplugins.nn.time_encoding import TimeEncoding


def test_index_mode_is_a_lookup_table() -> None:
    enc = TimeEncoding("index", 6, num_timestamps=4)
    out = enc(torch.tensor([0, 3, 3]))
    torch.testing.assert_close(out, enc.embedding.weight[[0, 3, 3]])
    assert 0.005 < float(enc.embedding.weight.std()) < 0.05  # N(0, 0.02) init
    with pytest.raises(ValueError, match="out of range"):
        enc(torch.tensor([4]))
    with pytest.raises(ValueError, match="integer"):
        enc(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="num_timestamps"):
        TimeEncoding("index", 6)


def test_sinusoidal_mode_uses_fixed_powers_of_two() -> None:
    torch.manual_seed(0)
    enc = TimeEncoding("sinusoidal", 5, num_frequencies=3)
    t = torch.tensor([0.0, 1.25, 1600.4])
    feats = torch.stack([torch.sin(t), torch.sin(2 * t), torch.sin(4 * t),
                         torch.cos(t), torch.cos(2 * t), torch.cos(4 * t)], 1)
    torch.testing.assert_close(enc(t), feats @ enc.proj.weight.T + enc.proj.bias)
    assert not any(p is enc.frequencies for p in enc.parameters())


def test_learned_fourier_frequencies_receive_gradients() -> None:
    torch.manual_seed(0)
    enc = TimeEncoding("fourier_learned", 4, num_frequencies=8, time_scale=365.25)
    t = torch.tensor([100.0, 1500.5])
    x = t / 365.25
    ang = x[:, None] * enc.frequencies[None]
    expected = torch.cat([torch.sin(ang), torch.cos(ang)], 1) @ enc.proj.weight.T + enc.proj.bias
    out = enc(t)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert enc.frequencies.grad is not None and enc.frequencies.grad.abs().sum() > 0


def test_mlp_mode_feeds_days_and_annual_phase() -> None:
    torch.manual_seed(0)
    enc = TimeEncoding("mlp", 7, hidden_dim=16)
    assert sum(isinstance(m, torch.nn.Linear) for m in enc.mlp) == 3
    t = torch.tensor([0.0, 365.2425 / 4])
    phase = torch.tensor([0.0, math.pi / 2])
    expected = enc.mlp(torch.stack([t, torch.sin(phase), torch.cos(phase)], 1))
    torch.testing.assert_close(enc(t), expected, rtol=1e-5, atol=1e-5)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="time mode"):
        TimeEncoding("season", 4)
    enc = TimeEncoding("sinusoidal", 4)
    with pytest.raises(ValueError, match=r"1-D"):
        enc(torch.zeros(2, 3))
