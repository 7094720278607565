"""ConvLSTM cell formula, causality and DUNIA's multi-temporal autoencoder shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from terratorch_eoplugins.nn.convlstm import ConvLSTM, ConvLSTMCell, MultiTemporalAE


def test_cell_matches_lstm_equations() -> None:
    torch.manual_seed(0)
    cell = ConvLSTMCell(3, 4)
    x, h, c = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    w, b = cell.gates.weight, cell.gates.bias
    gates = F.conv2d(torch.cat([x, h], 1), w, b, padding=1)
    i, f, o, g = (gates[:, 4 * n:4 * (n + 1)] for n in range(4))
    c_ref = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_ref = torch.sigmoid(o) * torch.tanh(c_ref)
    h_new, c_new = cell(x, (h, c))
    assert torch.allclose(c_new, c_ref, atol=1e-6) and torch.allclose(h_new, h_ref, atol=1e-6)


def test_convlstm_is_causal_in_time() -> None:
    torch.manual_seed(0)
    lstm = ConvLSTM(3, 4, num_layers=2)
    x = torch.randn(1, 3, 4, 6, 6)
    y = lstm(x)
    x2 = x.clone()
    x2[:, :, 2:] += 1.0
    y2 = lstm(x2)
    assert y.shape == (1, 4, 4, 6, 6)
    assert torch.allclose(y[:, :, :2], y2[:, :, :2]) and not torch.allclose(y[:, :, 2:], y2[:, :, 2:])


def test_multitemporal_ae_levels_pooling_and_errors() -> None:
    torch.manual_seed(0)
    ae = MultiTemporalAE(in_channels=5, out_dim=4, num_levels=4, lstm_layers=1)
    m = torch.randn(2, 5, 3, 16, 24)
    out = ae(m)
    assert out["recon"].shape == m.shape
    for d, (x, o) in enumerate(zip(out["features"], out["pooled"])):
        assert x.shape == (2, 4 * 2**d, 3, 16 // 2**d, 24 // 2**d)
        assert torch.allclose(o, x.mean(2))
    with pytest.raises(ValueError, match="divisible by 8"):
        ae(torch.randn(1, 5, 3, 12, 16))
    with pytest.raises(ValueError, match=r"\[B, 5, T, H, W\]"):
        ae(torch.randn(1, 4, 3, 16, 16))


def test_multitemporal_ae_learns_to_reconstruct() -> None:
    torch.manual_seed(0)
    ae = MultiTemporalAE(in_channels=3, out_dim=4, num_levels=2, lstm_layers=1)
    m = torch.randn(2, 3, 2, 8, 8)
    opt = torch.optim.Adam(ae.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = F.mse_loss(ae(m)["recon"], m)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.7 * first
