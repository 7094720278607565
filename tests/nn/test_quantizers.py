"""Time-series tokenizers (TerraMind time-series fusion, section 3.1): bounds, bijection, balance, learning."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from terratorch_eoplugins.metrics import reconstruction_metrics
from terratorch_eoplugins.nn.fsq_index import fsq_index_to_levels, fsq_levels_to_index
from terratorch_eoplugins.nn.ts_tokenizers.base import SPECIAL_TOKENS
from terratorch_eoplugins.nn.ts_tokenizers.binning import QuantileTokenizer, UniformTokenizer
from terratorch_eoplugins.nn.ts_tokenizers.factory import build_ts_tokenizer
from terratorch_eoplugins.nn.ts_tokenizers.fsq import FSQTokenizer
from terratorch_eoplugins.nn.ts_tokenizers.serialization import load_ts_tokenizer, save_ts_tokenizer
from terratorch_eoplugins.nn.ts_tokenizers.training import train_fsq_tokenizer


def _weather(n: int = 192, length: int = 48, seed: int = 0) -> torch.Tensor:
    """Hourly-temperature-like series: climate offset + diurnal cycle with random phase/amplitude + noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length).float()
    base = 15 + 8 * torch.randn(n, 1, generator=g)
    amp = 2 + 3 * torch.rand(n, 1, generator=g)
    phase = 2 * math.pi * torch.rand(n, 1, generator=g)
    return base + amp * torch.sin(2 * math.pi * t / 24 + phase) + 0.2 * torch.randn(n, length, generator=g)


# -- uniform ---------------------------------------------------------------------------------------
def test_uniform_edges_tokens_and_roundtrip_bound():
    x = torch.randn(50, 3, 20, generator=torch.Generator().manual_seed(1)) * 4 + 2
    b = 13
    tok = UniformTokenizer(b).fit(x)
    lo, hi = float(x.min()), float(x.max())
    # edges t_j = x_min + j/B (x_max - x_min)
    expected = lo + np.arange(b + 1) / b * (hi - lo)
    np.testing.assert_allclose(tok.edges[0].numpy(), expected, rtol=0, atol=1e-9)
    tokens = tok.encode(x)
    assert tokens.dtype == torch.long and tokens.shape == x.shape
    # independent formula: tau = floor((x - min) / width), x_max in the last bin
    width = (hi - lo) / b
    ref = torch.clamp(torch.floor((x.double() - lo) / width), max=b - 1).long()
    assert (tokens != ref).float().mean() < 1e-3  # ties exactly on an edge may differ by float rounding
    err = (tok.decode(tokens) - x).abs().max().item()
    # derived bound: midpoint decoding of [t_{j-1}, t_j) is off by at most half the bin width
    assert err <= width / 2 + 1e-5
    assert err > 0.8 * width / 2  # the bound is tight on dense data
    assert tok.vocab_size == b + len(SPECIAL_TOKENS)


def test_uniform_per_variable_statistics_and_out_of_range_clamp():
    x = torch.stack([torch.linspace(0, 1, 40), torch.linspace(-100, 100, 40)], 0).expand(5, 2, 40)
    tok = UniformTokenizer(8, num_variables=2).fit(x)
    assert tok.edges[0, 0] == 0 and tok.edges[0, -1] == 1
    assert tok.edges[1, 0] == -100 and tok.edges[1, -1] == 100
    widths = torch.tensor([1 / 8, 200 / 8]).view(1, 2, 1)
    assert ((tok.decode(tok.encode(x)) - x).abs() <= widths / 2 + 1e-5).all()
    out = torch.tensor([[[-5.0, 5.0], [-1e4, 1e4]]])
    assert tok.encode(out).tolist() == [[[0, 7], [0, 7]]]


# -- quantile --------------------------------------------------------------------------------------
def test_quantile_bins_balanced_on_lognormal():
    rng = np.random.default_rng(0)
    b, n = 16, 32000
    train = rng.lognormal(0.0, 1.0, n)
    tok = QuantileTokenizer(b).fit(train)
    # edges are the empirical quantiles F^-1(j/B) (inverted CDF)
    ref = np.quantile(train, np.arange(1, b) / b, method="inverted_cdf")
    np.testing.assert_allclose(tok.edges[0, 1:-1].numpy(), ref)
    counts = np.bincount(tok.encode(train).numpy(), minlength=b)
    assert np.abs(counts - n / b).max() <= 2  # exact quantiles: every bin holds n/B training values
    held = rng.lognormal(0.0, 1.0, n)
    c_held = np.bincount(tok.encode(held).numpy(), minlength=b)
    assert np.abs(c_held / (n / b) - 1).max() < 0.15  # binomial sd ~2.7% of n/B: 15% is > 5 sd
    # uniform bins on the same skewed data are far from balanced (the motivation of section 3.1.1)
    c_uni = np.bincount(UniformTokenizer(b).fit(train).encode(held).numpy(), minlength=b)
    assert c_uni.max() > 5 * n / b


def test_quantile_roundtrip_bound_and_mean_reconstruction():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.gamma(2.0, 3.0, (40, 50)))
    for recon, factor in (("midpoint", 0.5), ("mean", 1.0)):
        tok = QuantileTokenizer(10, reconstruction=recon).fit(x)
        tokens = tok.encode(x)
        widths = tok.bin_widths()[0]
        err = (tok.decode(tokens).double() - x).abs()
        # derived bound: |x - x_hat| <= factor * width of the bin holding x
        assert (err <= factor * widths[tokens] + 1e-5).all(), recon
    mid = reconstruction_metrics(QuantileTokenizer(10).fit(x), x)["mse"]
    mean = reconstruction_metrics(QuantileTokenizer(10, reconstruction="mean").fit(x), x)["mse"]
    assert mean < mid  # the in-bin mean is the MSE-optimal value for a fixed partition


def test_quantile_duplicate_edges_merged_on_zero_inflated_data():
    rng = np.random.default_rng(2)
    x = np.where(rng.random(4000) < 0.6, 0.0, rng.exponential(2.0, 4000))
    tok = QuantileTokenizer(10).fit(x)
    k = int(tok.n_bins[0])
    edges = tok.edges[0, : k + 1]
    assert k < 10 and (edges[1:] > edges[:-1]).all() and torch.isinf(tok.edges[0, k + 1 :]).all()
    assert int(tok.encode(x).max()) == k - 1
    # with [ZERO], zeros get their own token and the rest are quantile-binned again into 10 bins
    tz = QuantileTokenizer(10, zero_token=True).fit(x)
    enc = tz.encode(x)
    assert (enc[torch.from_numpy(x) == 0] == tz.zero_id).all() and int(tz.n_bins[0]) == 10
    assert (tz.decode(enc)[torch.from_numpy(x) == 0] == 0).all()


@pytest.mark.parametrize("reconstruction", ["midpoint", "mean"])
def test_quantile_atom_at_the_maximum_gets_its_own_bin(reconstruction: str):
    # relative humidity capped at 100 %: 20 % of the values sit exactly at the maximum (> 1/B with B = 16)
    rng = np.random.default_rng(3)
    x = np.where(rng.random(5000) < 0.2, 100.0, rng.uniform(40.0, 100.0, 5000))
    tok = QuantileTokenizer(16, reconstruction=reconstruction).fit(x)
    k = int(tok.n_bins[0])
    edges = tok.edges[0, : k + 1].numpy()
    assert k <= 16 and edges[-1] == edges[-2] == 100.0  # the zero-width last bin [100, 100]
    enc = tok.encode(x)
    at_max = torch.from_numpy(x == 100.0)
    assert (enc[at_max] == k - 1).all() and (enc[~at_max] < k - 1).all()  # no interior value shares its token
    dec = tok.decode(enc)
    assert (dec[at_max] == 100.0).all()
    # every interior value decodes inside its own half-open bin [t_{j-1}, t_j)
    lo, hi = torch.from_numpy(edges[:-1])[enc[~at_max]], torch.from_numpy(edges[1:])[enc[~at_max]]
    assert ((dec[~at_max] >= lo.float()) & (dec[~at_max] <= hi.float())).all()
    # the reference empirical quantiles (inverted CDF) below the atom are the edges, unchanged
    q = np.quantile(x, np.arange(17) / 16, method="inverted_cdf")
    q[0] = x.min()
    np.testing.assert_array_equal(edges[:-1], np.unique(q))


def test_constant_variable_gives_one_bin():
    tok = QuantileTokenizer(8).fit(torch.full((10, 5), 3.0))
    assert int(tok.n_bins[0]) == 1
    assert tok.encode(torch.tensor([1.0, 3.0, 9.0])).tolist() == [0, 0, 0]
    assert torch.allclose(tok.decode(torch.tensor([0])), torch.tensor([3.0]))


# -- special tokens, errors, serialisation ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["uniform", "quantile", "fsq"])
def test_errors_unfitted_nan_inf_shapes_tokens(kind):
    kw = {"num_bins": 8} if kind != "fsq" else {"levels": (3, 3), "hidden_dim": 8, "downsample": 2}
    tok = build_ts_tokenizer(kind, num_variables=2, **kw)
    x = torch.randn(4, 2, 8)
    with pytest.raises(RuntimeError, match="not fitted"):
        tok.encode(x)
    tok.fit(x)
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tok.encode(bad)
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="inf"):
        tok.encode(bad)
    with pytest.raises(ValueError, match="V=2"):
        tok.encode(torch.randn(4, 3, 8))
    with pytest.raises(ValueError, match=r"\[0, "):
        tok.decode(torch.full((4, 2, 2), tok.vocab_size))
    with pytest.raises(TypeError, match="integer"):
        tok.decode(torch.zeros(4, 2, 2))
    if kind == "fsq":
        with pytest.raises(ValueError, match="divisible"):
            tok.encode(torch.randn(4, 2, 7))


def test_factory_errors():
    with pytest.raises(ValueError, match="unknown kind"):
        build_ts_tokenizer("vq")
    with pytest.raises(ValueError, match="num_bins"):
        build_ts_tokenizer("uniform")
    with pytest.raises(ValueError, match="num_bins"):
        UniformTokenizer(0)
    with pytest.raises(ValueError, match="missing"):
        UniformTokenizer(4, missing="drop")
    with pytest.raises(ValueError, match="levels"):
        FSQTokenizer(levels=(1, 4))
    with pytest.raises(ValueError, match="downsample"):
        FSQTokenizer(downsample=3)


@pytest.mark.parametrize("kind", ["uniform", "quantile", "fsq"])
def test_missing_values_become_null_and_specials_decode(kind):
    kw = {"num_bins": 8} if kind != "fsq" else {"levels": (3, 3), "hidden_dim": 8, "downsample": 2}
    tok = build_ts_tokenizer(kind, missing="null", **kw)
    x = torch.randn(6, 8)
    x[1, 3] = float("nan")
    tok.fit(x)
    tokens = tok.encode(x)
    col = 3 // (tok.downsample if kind == "fsq" else 1)
    assert tokens[1, col] == tok.null_id
    assert (tokens[0] < tok.codebook_size).all()
    specials = torch.tensor([[tok.pad_id, tok.eos_id, tok.null_id, tok.zero_id]])
    dec = tok.decode(specials)
    step = tok.downsample if kind == "fsq" else 1
    assert torch.isnan(dec[0, : 3 * step]).all() and (dec[0, 3 * step :] == 0).all()
    assert tok.special_ids == {"[PAD]": tok.pad_id, "[EOS]": tok.eos_id, "[NULL]": tok.null_id, "[ZERO]": tok.zero_id}


@pytest.mark.parametrize("kind", ["uniform", "quantile", "fsq"])
def test_state_dict_and_checkpoint_roundtrip(kind, tmp_path):
    kw = {"num_bins": 12} if kind != "fsq" else {"levels": (4, 4), "hidden_dim": 8, "downsample": 2}
    x = torch.from_numpy(np.random.default_rng(3).lognormal(0, 1, (20, 2, 16))).float()
    tok = build_ts_tokenizer(kind, num_variables=2, **kw).fit(x)
    fresh = build_ts_tokenizer(kind, num_variables=2, **kw)
    fresh.load_state_dict(tok.state_dict())
    assert torch.equal(fresh.encode(x), tok.encode(x))
    loaded = load_ts_tokenizer(save_ts_tokenizer(tok, tmp_path / "tok.pt"))
    assert type(loaded) is type(tok) and torch.equal(loaded.encode(x), tok.encode(x))
    assert torch.allclose(loaded.decode(tok.encode(x)), tok.decode(tok.encode(x)), equal_nan=True)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_ts_tokenizer(tmp_path / "missing.pt")


# -- FSQ -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [(8, 8, 8, 8), (3, 3, 3, 3, 3), (8, 5, 5, 5), (2, 7)])
def test_fsq_mixed_radix_index_is_bijection(levels):
    m = int(np.prod(levels))
    all_levels = torch.tensor(list(itertools.product(*[range(v) for v in levels])))
    tokens = fsq_levels_to_index(all_levels, levels)
    # eq. (1) computed independently
    ref = [sum(i * int(np.prod(levels[d + 1 :])) for d, i in enumerate(row)) for row in all_levels.tolist()]
    assert tokens.tolist() == ref
    assert sorted(tokens.tolist()) == list(range(m))  # onto [0, M) and injective
    assert torch.equal(fsq_index_to_levels(torch.arange(m), levels), all_levels)  # itertools order = eq. (1) order


def test_fsq_codes_are_paper_levels_and_tokens_match_codes():
    levels = (4, 3, 5)
    tok = FSQTokenizer(levels=levels, hidden_dim=8, downsample=2).fit(torch.randn(8, 16))
    z_e, z_q, tokens = tok.quantize(torch.randn(8, 1, 16) * 3)
    for d, lv in enumerate(levels):
        allowed = torch.tensor([-1 + 2 * j / (lv - 1) for j in range(lv)])
        vals = z_q[:, d].reshape(-1, 1)
        assert (vals - allowed).abs().min(1).values.max() < 1e-6  # c_{d,j} = -1 + 2j/(L_d - 1)
        # nearest level of the bounded latent (argmin of section 3.1.2)
        nearest = allowed[(z_e[:, d].reshape(-1, 1) - allowed).abs().argmin(1)]
        assert torch.allclose(nearest, vals.squeeze(1), atol=1e-6)
    assert torch.allclose(tok.codes_from_tokens(tokens), z_q, atol=1e-6)
    assert tok.codebook_size == 60 and tokens.max() < 60


def test_fsq_loss_terms_follow_eq2():
    tok = FSQTokenizer(levels=(5, 5), hidden_dim=8, downsample=2, commitment_weight=0.1)
    x = torch.randn(6, 16)
    tok.fit(x)
    torch.manual_seed(0)
    out = tok.loss(x)
    z = ((x - tok.mean) / tok.std).unsqueeze(1)
    z_e, z_q, _ = tok.quantize(z)
    recon = ((tok.decoder(z_q).squeeze(1) - z.squeeze(1)) ** 2).mean()
    commit = ((z_e - z_q) ** 2).mean()
    assert torch.allclose(out["recon"], recon, atol=1e-6) and torch.allclose(out["commit"], commit, atol=1e-6)
    assert torch.allclose(out["loss"], recon + 0.1 * commit, atol=1e-6)
    out["loss"].backward()
    assert all(p.grad is not None for p in tok.encoder.parameters())  # straight-through gradients reach E_theta


def test_fsq_training_reduces_reconstruction_error(one_torch_thread):
    torch.manual_seed(0)
    x = _weather(n=128, length=32)
    tok = FSQTokenizer(levels=(8, 8, 8), hidden_dim=16, downsample=4, dilations=(1, 2)).fit(x)
    before = reconstruction_metrics(tok, x)
    hist = train_fsq_tokenizer(tok, x, steps=60, batch_size=32, lr=3e-3, seed=0)
    after = reconstruction_metrics(tok, x)
    assert np.mean(hist[-10:]) < 0.5 * np.mean(hist[:5])
    assert after["mse"] < 0.2 * before["mse"] and after["r2"] > 0.8
    held = _weather(n=64, length=32, seed=7)
    assert reconstruction_metrics(tok, held)["r2"] > 0.7
