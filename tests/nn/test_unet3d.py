"""3-D U-Net layers: shapes for any T >= 1 and odd H x W, modality-specific vs shared levels, errors, learning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from terratorch_eoplugins.nn.unet3d import ConvBlock3d, UNet3D, UNet3DDecoder, UNet3DEncoder, crop_to, pad_to_multiple

W = (4, 8, 8, 16)

pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.mark.parametrize("t", [1, 2, 5])
@pytest.mark.parametrize("pool_time", [False, True])
def test_any_length_and_odd_sizes_come_back_at_input_resolution(t: int, pool_time: bool) -> None:
    m = UNet3D(3, 2, W, pool_time=pool_time).eval()
    out = m(torch.randn(2, 3, t, 19, 13))
    assert out.shape == (2, 2, t, 19, 13)
    assert UNet3D(3, None, W).eval()(torch.randn(1, 3, t, 8, 8)).shape == (1, W[0], t, 8, 8)


def test_padding_then_cropping_matches_a_manual_replicate_pad() -> None:
    torch.manual_seed(0)
    m = UNet3D(2, 3, W).eval()
    x = torch.randn(1, 2, 3, 14, 9)
    padded = nn.functional.pad(x, (0, 7, 0, 2, 0, 0), mode="replicate")  # to 16 x 16 (factor 8)
    with torch.no_grad():
        assert torch.allclose(m(x), m(padded)[..., :14, :9], atol=1e-6)
    p, size = pad_to_multiple(x, 8, 4)
    assert p.shape[-3:] == (4, 16, 16) and size == (3, 14, 9) and torch.equal(crop_to(p, size), x)


def test_architecture_is_conv3d_batchnorm_leakyrelu_with_maxpool_and_transposed_convs() -> None:
    # the paper's pooling over space and time by default; space only (the earlier choice) as an option
    assert UNet3DEncoder({"radar": 3}, (8, 16, 32, 64)).pool.kernel_size == (2, 2, 2)
    enc = UNet3DEncoder({"radar": 3, "optical": 10}, (8, 16, 32, 64), n_specific=2, pool_time=False)
    dec = UNet3DDecoder((8, 16, 32, 64), out_channels=10, pool_time=False)
    block_layers = [type(layer) for layer in enc.shared[0]]
    assert block_layers == [nn.Conv3d, nn.BatchNorm3d, nn.LeakyReLU] * 2
    assert isinstance(enc.pool, nn.MaxPool3d) and enc.pool.kernel_size == (1, 2, 2)
    assert sum(isinstance(m, nn.ConvTranspose3d) for m in dec.modules()) == 3
    # four levels: two per modality, two shared; outputs full, /2, /4, /8
    assert len(enc.specific["radar"]) == len(enc.specific["optical"]) == 2 and len(enc.shared) == 2
    feats = enc(torch.randn(1, 3, 2, 16, 16), "radar")
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 2, 16, 16), (16, 2, 8, 8), (32, 2, 4, 4), (64, 2, 2, 2)]
    assert dec(feats).shape == (1, 10, 2, 16, 16)


def test_first_two_levels_are_per_modality_and_last_two_shared() -> None:
    enc = UNet3DEncoder({"radar": 3, "optical": 10}, W, n_specific=2)
    enc(torch.randn(2, 10, 8, 8, 8), "optical")[-1].sum().backward()
    grads = {n: p.grad is not None and p.grad.abs().sum() > 0 for n, p in enc.named_parameters()}
    assert all(v for n, v in grads.items() if n.startswith(("shared.", "specific.optical.")))
    assert not any(v for n, v in grads.items() if n.startswith("specific.radar."))
    # the shared levels are the same modules for both modalities
    assert enc.shared[0][0].weight.shape[1] == W[1]
    assert enc.specific["radar"][0][0].weight.shape[1] == 3 and enc.specific["optical"][0][0].weight.shape[1] == 10


def test_bad_inputs_raise_clear_errors() -> None:
    m = UNet3D(3, 2, W)
    with pytest.raises(ValueError, match="T = 0"):
        m(torch.randn(1, 3, 0, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        m(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="expects 3 channels, got 4"):
        m(torch.randn(1, 4, 2, 8, 8))
    enc = UNet3DEncoder({"radar": 3}, W)
    with pytest.raises(ValueError, match="unknown modality 'optical'"):
        enc(torch.randn(1, 3, 1, 8, 8), "optical")
    with pytest.raises(ValueError, match="divisible by 8"):
        enc(torch.randn(1, 3, 1, 12, 8), "radar")
    with pytest.raises(ValueError, match="n_specific"):
        UNet3DEncoder({"a": 3}, W, n_specific=5)
    with pytest.raises(ValueError, match="same in_channels"):
        UNet3DEncoder({"a": 3, "b": 4}, W, n_specific=0)
    assert isinstance(ConvBlock3d(2, 3)[2], nn.LeakyReLU)


def test_unet3d_learns_a_space_time_target() -> None:
    """Per-pixel target = sign of the temporal trend of channel 0 (needs the time axis and a 3x3x3 context)."""
    torch.manual_seed(0)
    m = UNet3D(2, 1, (4, 8, 8, 8))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x = torch.randn(4, 2, 4, 8, 8)
    trend = torch.linspace(-1, 1, 4).view(1, 4, 1, 1) * torch.randn(4, 1, 8, 8).sign()
    x[:, 0] += 2 * trend
    y = (trend[:, -1:] > 0).float().unsqueeze(1).expand(-1, -1, 4, -1, -1)
    losses = []
    for _ in range(30):
        loss = nn.functional.binary_cross_entropy_with_logits(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
