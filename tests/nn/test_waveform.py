"""DUNIA waveform autoencoder: shapes, L/16 downsampling, residual VQ against a hand-written RVQ, errors, learning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from terratorch_eoplugins.nn.waveform import PAPER_WAVEFORM_LENGTH, ResBlock1d, UpResBlock1d, WaveformAutoencoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _waves(n: int, length: int, seed: int = 0) -> torch.Tensor:
    """Unit-sum two-mode waveforms (canopy + ground Gaussians) like GEDI's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(length, dtype=torch.float32)
    ground = length * (0.6 + 0.3 * torch.rand(n, 1, generator=g))
    top = ground - length * 0.5 * torch.rand(n, 1, generator=g)
    cover = torch.rand(n, 1, generator=g)
    w = (1 - cover) * torch.exp(-0.5 * ((x - ground) / 3) ** 2) + cover * torch.exp(-0.5 * ((x - top) / 10) ** 2)
    return w / w.sum(1, keepdim=True)


@pytest.mark.parametrize("length", [64, 128, PAPER_WAVEFORM_LENGTH])
def test_shapes_and_downsampling_factor_16(length: int) -> None:
    m = WaveformAutoencoder(length=length).eval()
    w = _waves(5, length)
    z = m.encode(w)
    assert m.length == length and m.latent_channels == 16 and m.latent_length == length // 16
    assert z.shape == (5, 16, length // 16)
    zq, idx, commit = m.quantize(z)
    assert zq.shape == z.shape and idx.shape == (5, length // 16, 8) and commit.ndim == 0
    assert m.decode(zq).shape == (5, length)
    out = m(w)
    assert set(out) == {"recon", "z", "zq", "indices", "commit_loss", "embedding"}
    assert out["embedding"].shape == (5, 64)


def test_architecture_matches_appendix_a2() -> None:
    m = WaveformAutoencoder()
    stem_conv = m.stem[0]
    assert (stem_conv.in_channels, stem_conv.out_channels, stem_conv.kernel_size, stem_conv.stride) == (
        1,
        2,
        (3,),
        (2,),
    )
    assert len(m.encoder) == 3 and all(len(stage) == 3 for stage in m.encoder)
    assert [stage[0].conv1.stride[0] for stage in m.encoder] == [2, 2, 2]
    assert all(block.conv1.stride[0] == 1 for stage in m.encoder for block in stage[1:])
    assert [stage[-1].conv2.out_channels for stage in m.encoder] == [4, 8, 16]
    assert all(isinstance(stage[0], UpResBlock1d) for stage in m.decoder)
    assert all(isinstance(b, ResBlock1d) for stage in m.decoder for b in stage[1:])
    assert [stage[-1].conv2.out_channels for stage in m.decoder] == [8, 4, 2]
    assert isinstance(m.out_stem, nn.ConvTranspose1d) and m.out_stem.out_channels == 1
    assert m.rvq.num_quantizers == 8 and m.rvq.codebook_size == 512
    # each stage halves the length: stem L/2, stages L/4, L/8, L/16
    x = m.stem(torch.randn(2, 1, 256))
    lengths = [x.shape[-1]]
    for stage in m.encoder:
        x = stage(x)
        lengths.append(x.shape[-1])
    assert lengths == [128, 64, 32, 16]


def test_residual_vq_matches_a_handwritten_residual_quantizer() -> None:
    torch.manual_seed(0)
    m = WaveformAutoencoder(length=128, num_quantizers=4, codebook_size=32)
    m.train()
    m(_waves(64, 128))  # k-means initialises the codebooks from data
    m.eval()
    with torch.no_grad():
        z = m.encode(_waves(7, 128, seed=1))
        zq, idx, _ = m.quantize(z)
        codes = m.codes_from_indices(idx)
        # the per-quantizer codes sum to z_q (appendix A.2: "summed to produce the final quantized representation")
        assert codes.shape == (4, 7, 16, 8)
        torch.testing.assert_close(codes.sum(0), zq, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.decode_indices(idx), m.decode(zq), atol=1e-6, rtol=1e-5)
        # independent RVQ: nearest code of the residual, quantizer after quantizer
        books = m.rvq.codebooks  # [Q, V, C]
        residual = z.transpose(1, 2).reshape(-1, 16)
        total = torch.zeros_like(residual)
        for q in range(4):
            d = torch.cdist(residual, books[q])
            j = d.argmin(1)
            assert torch.equal(j, idx[..., q].reshape(-1))
            residual = residual - books[q][j]
            total = total + books[q][j]
        torch.testing.assert_close(total.reshape(7, 8, 16).transpose(1, 2), zq, atol=1e-5, rtol=1e-5)
        # each extra quantizer can only shrink the quantization error
        errs = [(z - codes[: q + 1].sum(0)).pow(2).mean().item() for q in range(4)]
        assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:]))


def test_embedding_is_channel_mean_then_linear() -> None:
    m = WaveformAutoencoder(embed_dim=32).eval()
    z = torch.randn(3, 16, 16)
    expected = z.mean(1) @ m.to_embedding.weight.T + m.to_embedding.bias
    torch.testing.assert_close(m.embed(z), expected)


def test_bad_input_is_a_clear_error() -> None:
    m = WaveformAutoencoder(length=64).eval()
    with pytest.raises(ValueError, match=r"shape \[N, 64\].*waveform_length=64"):
        m.encode(torch.rand(2, 256))
    with pytest.raises(ValueError, match=r"shape \[N, 64\]"):
        m.encode(torch.rand(2, 1, 64))
    bad = torch.rand(3, 64)
    bad[1, 5] = float("nan")
    with pytest.raises(ValueError, match="1 of 3 input waveforms contain NaN"):
        m(bad)
    with pytest.raises(ValueError, match="empty batch"):
        m.encode(torch.rand(0, 64))
    with pytest.raises(ValueError, match=r"latents of shape \[N, 16, 4\]"):
        m.decode(torch.rand(2, 16, 5))
    with pytest.raises(ValueError, match="NaN"):
        m.decode(torch.full((2, 16, 4), float("nan")))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 512\)"):
        m.codes_from_indices(torch.full((1, 4, 8), 512))
    with pytest.raises(ValueError, match="multiple of 16"):
        WaveformAutoencoder(length=100)
    with pytest.raises(TypeError, match="expected a Tensor"):
        m.encode([[0.0] * 64])


def test_short_training_on_synthetic_gedi_waveforms_reduces_reconstruction_mse(tiny_world_dir: Path) -> None:
    from terratorch_eoplugins.datasets.gedi_shots import GEDIShots

    ds = GEDIShots(tiny_world_dir / "GEDI", waveform_length=64, waveform_mode="resample")
    w = torch.stack([ds[i]["waveform"] for i in range(min(len(ds), 400))])
    torch.manual_seed(0)
    m = WaveformAutoencoder(length=64, num_quantizers=2, codebook_size=64)
    held = w[::4]
    train = w[torch.arange(len(w)) % 4 != 0]

    def mse() -> float:
        m.eval()
        with torch.no_grad():
            return m.reconstruction_loss(held, m(held)["recon"]).item()

    m.train()
    m(train[:128])  # k-means codebook init
    before = mse()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    m.train()
    for _ in range(100):
        b = train[torch.randint(0, len(train), (64,), generator=g)]
        out = m(b)
        loss = m.reconstruction_loss(b, out["recon"]) + out["commit_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mse()
    # variance of the held-out waveforms (scaled units): a predictor of the mean waveform reaches this
    variance = ((held - held.mean(0)) * m.input_scale).pow(2).mean().item()
    assert after < 0.5 * before, (before, after)
    assert after < 0.6 * variance, (after, variance)  # measured: before 16.2, after 6.0, variance 12.7
