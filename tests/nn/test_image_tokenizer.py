"""Image tokenizers of TS fusion (section 3.2): small FSQ tokenizer, TerraMind adapter, CropNet training script."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from terratorch_eoplugins.nn.fsq_index import fsq_levels_to_index
from terratorch_eoplugins.nn.image_tokenizer import (
    FSQImageTokenizer,
    TerraMindImageTokenizer,
    build_image_tokenizer,
    load_image_tokenizer,
    save_image_tokenizer,
    train_image_tokenizer,
)
from terratorch_eoplugins.nn.ts_tokenizers.serialization import load_ts_tokenizer


def _smooth_images(n: int, size: int = 16, channels: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, size // 4, size // 4, generator=g)
    return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def test_fsq_image_tokenizer_shapes_codes_and_tokens():
    tok = FSQImageTokenizer(3, levels=(8, 8, 8, 6, 5), hidden_dims=(8, 16))
    assert tok.vocab_size == 15360 and tok.patch_size == 4
    x = _smooth_images(2, 16)
    tokens = tok.encode(x)
    assert tokens.dtype == torch.long and tokens.shape == (2, 4, 4)
    assert tokens.min() >= 0 and tokens.max() < tok.vocab_size
    assert tok.decode(tokens).shape == x.shape
    z_e, z_q, t2 = tok.quantize(tok._norm(x))
    assert torch.equal(t2, tokens)
    # codes are the symmetric levels of section 3.1.2 and the tokens their eq. (1) index
    lv = torch.tensor([8, 8, 8, 6, 5]).view(1, -1, 1, 1)
    idx = (z_q + 1) * (lv - 1) / 2
    assert torch.allclose(idx, idx.round(), atol=1e-5)
    assert torch.equal(fsq_levels_to_index(idx.round().long().permute(0, 2, 3, 1), tok.levels), tokens)
    assert torch.allclose(tok.codes_from_tokens(tokens), z_q, atol=1e-6)
    assert z_e.abs().max() <= 1


def test_fsq_image_tokenizer_errors_and_checkpoint(tmp_path):
    tok = FSQImageTokenizer(2, levels=(5, 5), hidden_dims=(4,))
    with pytest.raises(ValueError, match="C=2"):
        tok.encode(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="multiples of the patch size 2"):
        tok.encode(torch.rand(1, 2, 7, 8))
    bad = torch.rand(1, 2, 8, 8)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tok.encode(bad)
    with pytest.raises(TypeError, match="integer"):
        tok.decode(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"\[0, 25\)"):
        tok.decode(torch.full((1, 4, 4), 25))
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        tok.decode(torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="levels"):
        FSQImageTokenizer(2, levels=(1, 5))
    with pytest.raises(ValueError, match="unknown kind"):
        build_image_tokenizer("vqgan")
    x = torch.rand(3, 2, 8, 8)
    tok.fit(x)
    loaded = build_image_tokenizer("fsq", checkpoint=save_image_tokenizer(tok, tmp_path / "img.pt"))
    assert torch.equal(loaded.encode(x), tok.encode(x)) and torch.allclose(loaded.mean, tok.mean)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image_tokenizer(tmp_path / "none.pt")


def test_fsq_image_tokenizer_training_reduces_reconstruction_error(one_torch_thread):
    torch.manual_seed(0)
    x = _smooth_images(48, 16, seed=1)
    tok = FSQImageTokenizer(3, levels=(8, 8, 8, 6, 5), hidden_dims=(16,), commitment_weight=0.1).fit(x)

    def mse(images: torch.Tensor) -> float:
        return float(((tok.decode(tok.encode(images)) - images) ** 2).mean())

    held = _smooth_images(16, 16, seed=2)
    before, before_held = mse(x), mse(held)
    hist = train_image_tokenizer(tok, x, steps=80, batch_size=16, lr=3e-3)
    assert sum(hist[-5:]) / 5 < 0.3 * sum(hist[:3]) / 3
    assert mse(x) < 0.3 * before
    # beats the best constant (per-channel mean) image on held-out images by a wide margin
    const = float(((held - x.mean((0, 2, 3)).view(1, -1, 1, 1)) ** 2).mean())
    assert mse(held) < 0.3 * min(before_held, const)


def test_terramind_tokenizer_random_weights_and_local_checkpoint(tmp_path, one_torch_thread):
    # ~6 s per build (289M parameters, ViT-B encoder + diffusion U-Net) and ~1 s per call at 32 px on one CPU thread
    tm = TerraMindImageTokenizer("terramind_v1_tokenizer_s2l2a", pretrained=False, decode_timesteps=1)
    assert tm.vocab_size == 8 * 8 * 8 * 6 * 5 and tm.patch_size == 16 and tm.in_channels == 12
    x = torch.randn(2, 12, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = tm.encode(x)
    assert tokens.dtype == torch.long and tokens.shape == (2, 2, 2)
    assert tokens.min() >= 0 and tokens.max() < tm.vocab_size
    assert tm.decode(tokens, generator=torch.Generator().manual_seed(0)).shape == (2, 12, 32, 32)
    out = tm.loss(x)
    assert torch.isfinite(out["loss"]) and float(out["commit"]) == 0.0
    with pytest.raises(ValueError, match="C=12"):
        tm.encode(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        tm.encode(torch.randn(1, 12, 24, 24))
    # real weights through a local checkpoint: the same state dict gives the same tokens
    ckpt = tmp_path / "TerraMind_Tokenizer_S2L2A.pt"
    torch.save(tm.model.state_dict(), ckpt)
    del tm
    tm2 = TerraMindImageTokenizer("terramind_v1_tokenizer_s2l2a", ckpt_path=ckpt)
    assert torch.equal(tm2.encode(x), tokens)
    with pytest.raises(FileNotFoundError, match="not found"):
        TerraMindImageTokenizer(ckpt_path=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="expected one of"):
        TerraMindImageTokenizer("terramind_v1_small")


def test_train_tokenizers_on_synthetic_cropnet(tiny_world_dir, tmp_path, one_torch_thread):
    from terratorch_eoplugins.analysis.tsfusion_tokenizers import train_tsfusion_tokenizers

    out = tmp_path / "tok"
    m = train_tsfusion_tokenizers(tiny_world_dir / "CropNet", out, num_bins=32, fsq_levels=(5, 5, 5), fsq_hidden=16,
                                  fsq_steps=40, image_hidden=(8, 8), image_steps=15, batch_size=16, lr=3e-3,
                                  max_samples=3)
    for name in ("image_fsq", "ts_fsq", "ts_uniform", "ts_quantile"):
        assert (out / f"{name}.pt").is_file()
    assert json.loads((out / "metrics.json").read_text())["ts_fsq"]["mse_std"] == m["ts_fsq"]["mse_std"]
    assert m["ts_fsq"]["mse_std"] < 0.8 * m["ts_fsq_untrained"]["mse_std"]  # training helps on held-out years
    assert m["ts_uniform"]["mse_std"] < 0.05 and m["ts_quantile"]["mse_std"] < 0.2
    assert m["image_fsq"]["mse_after"] < m["image_fsq"]["mse_before"]
    fsq = load_ts_tokenizer(out / "ts_fsq.pt")
    assert fsq.num_variables == len(m["variables"]) and fsq.levels == [5, 5, 5]
    img = load_image_tokenizer(out / "image_fsq.pt")
    assert img.in_channels == 3


def test_tsfusion_tokenizers_command(tiny_world_dir, tmp_path, capsys, one_torch_thread):
    """``eoplugins tsfusion-tokenizers`` through the package's console command on the tiny world."""
    from terratorch_eoplugins.cli import main

    out = tmp_path / "cli_tok"
    assert main(["tsfusion-tokenizers", "--root", str(tiny_world_dir / "CropNet"), "--out", str(out),
                 "--num-bins", "16", "--fsq-levels", "5-5-5", "--fsq-hidden", "8", "--fsq-steps", "3",
                 "--image-steps", "2", "--batch-size", "8", "--max-samples", "2"]) == 0
    printed = capsys.readouterr().out
    assert "ts_quantile" in printed and "image_fsq: val MSE" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ts_uniform"]["codebook_size"] == 16 and metrics["ts_fsq"]["codebook_size"] == 125
    for name in ("image_fsq", "ts_fsq", "ts_uniform", "ts_quantile"):
        assert (out / f"{name}.pt").is_file()
    assert load_ts_tokenizer(out / "ts_fsq.pt").levels == [5, 5, 5]
