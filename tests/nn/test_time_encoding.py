"""LIANet time encodings: index, sinusoidal, learned Fourier and MLP modes against their formulas."""

from __future__ import annotations

import datetime as dt
import math

import pytest
import torch

from terratorch_eoplugins.nn.time_encoding import TimeEncoding, day_of_year


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


def test_mlp_mode_feeds_days_and_the_reference_day_of_year_phase() -> None:
    """Reference (Pretraining/src/dataset.py): [days since 2015-01-01, sin, cos of 2 pi (doy - 1) / 365], doy of the
    acquisition's calendar date; computed here with Python's datetime."""
    torch.manual_seed(0)
    enc = TimeEncoding("mlp", 7, hidden_dim=16)
    assert sum(isinstance(m, torch.nn.Linear) for m in enc.mlp) == 3
    stamps = [dt.datetime(2015, 1, 1), dt.datetime(2016, 12, 31, 23, 59), dt.datetime(2019, 7, 7, 10, 30, 31),
              dt.datetime(2020, 3, 1, 0, 0, 1), dt.datetime(2014, 12, 31, 12)]
    t = torch.tensor([(s - dt.datetime(2015, 1, 1)).total_seconds() / 86400 for s in stamps], dtype=torch.float64)
    phase = [2 * math.pi * (s.timetuple().tm_yday - 1) / 365.0 for s in stamps]
    assert [s.timetuple().tm_yday for s in stamps] == day_of_year(t).tolist()
    x = torch.stack([t.float(), torch.tensor([math.sin(a) for a in phase]), torch.tensor([math.cos(a) for a in phase])],
                    1)
    torch.testing.assert_close(enc(t), enc.mlp(x), rtol=0, atol=1e-6)
    # the project's earlier continuous phase stays available
    old = TimeEncoding("mlp", 7, hidden_dim=16, mlp_phase="year_fraction")
    t2 = torch.tensor([0.0, 365.2425 / 4])
    ph = torch.tensor([0.0, math.pi / 2])
    torch.testing.assert_close(old(t2), old.mlp(torch.stack([t2, torch.sin(ph), torch.cos(ph)], 1)), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match="mlp_phase"):
        TimeEncoding("mlp", 7, mlp_phase="season")


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="time mode"):
        TimeEncoding("season", 4)
    enc = TimeEncoding("sinusoidal", 4)
    with pytest.raises(ValueError, match=r"1-D"):
        enc(torch.zeros(2, 3))
