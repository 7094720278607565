"""TS fusion's pretraining recipe pieces: independent Dirichlets (eq. 3), the input-only raw image modality."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

from terratorch_eoplugins.models.tsfusion import ModalitySpec, TSFusionModel, sample_group_budgets


def test_independent_dirichlets_per_group():
    # modalities: image tokens, raw image (alpha 1000), coords | weather a, weather b
    alphas = torch.tensor([0.5, 1000.0, 0.5, 0.5, 2.0], dtype=torch.float64)
    groups = [0, 0, 0, 1, 1]
    limits = torch.tensor([10_000] * 5)
    budget, n = 128, 4000
    gen = torch.Generator().manual_seed(0)
    out = sample_group_budgets(alphas, groups, budget, limits, n, gen).double()
    # each group spends at most its half of the budget, and nearly all of it (flooring loses < 1 token per modality)
    for sel, k in ((slice(0, 3), 3), (slice(3, 5), 2)):
        tot = out[:, sel].sum(1)
        assert (tot <= budget // 2).all() and (tot > budget // 2 - k).all()
    # within a group the shares follow that group's own Dirichlet: E[p_m] = alpha_m / sum(alpha of the group)
    share_i = out[:, :3].mean(0) / (budget // 2)
    share_t = out[:, 3:].mean(0) / (budget // 2)
    ref_i = alphas[:3] / alphas[:3].sum()
    ref_t = alphas[3:] / alphas[3:].sum()
    assert torch.allclose(share_i, ref_i, atol=0.02) and torch.allclose(share_t, ref_t, atol=0.03)
    # independence: the image group's draws do not depend on the weather alphas (the same random stream)
    other = alphas.clone()
    other[3:] = torch.tensor([5.0, 0.1], dtype=torch.float64)
    again = sample_group_budgets(other, groups, budget, limits, n, torch.Generator().manual_seed(0))
    assert torch.equal(again[:, :3], out[:, :3].long())
    # the target draw excludes the input-only modality (group < 0): it never gets a target token
    tgt = sample_group_budgets(alphas, [0, -1, 0, 1, 1], budget, limits, 100, gen)
    assert (tgt[:, 1] == 0).all() and (tgt[:, [0, 2]].sum(1) > budget // 2 - 3).all()
    with pytest.raises(ValueError, match="weights"):
        sample_group_budgets(alphas, groups, budget, limits, 2, gen, weights=[1.0])


def test_raw_image_modality_patchifies_as_terramind_and_is_input_only():
    specs = [ModalitySpec("image", "image", 50, 4, "image"), ModalitySpec("weather_t", "seq", 20, 6, "weather"),
             ModalitySpec("untok_image", "raw", 0, 4, "image", channels=3, patch_size=4)]
    model = TSFusionModel(specs, dim=32, encoder_depth=1, decoder_depth=1, num_heads=4)
    x = torch.randn(2, 3, 8, 8)
    tokens = {"image": torch.randint(0, 50, (2, 4)), "weather_t": torch.randint(0, 20, (2, 6)), "untok_image": x}
    emb, ids = model.embed(tokens)
    # TerraMind's ImageEncoderEmbedding: rearrange "b d (nh ph) (nw pw) -> b (nh nw) (ph pw d)", then proj
    ref = model.enc_patch["untok_image"](rearrange(x, "b d (nh ph) (nw pw) -> b (nh nw) (ph pw d)", ph=4, pw=4))
    ref = ref + model.enc_pos["untok_image"] + model.enc_mod[2]
    assert torch.allclose(emb[:, -4:], ref, atol=1e-6) and ids.tolist() == [0] * 4 + [1] * 6 + [2] * 4
    ins = {n: torch.full((2, s.num_tokens), not s.is_raw) for n, s in zip(model.names, specs)}
    with pytest.raises(ValueError, match="input only"):
        model.correlation_loss(tokens, ins, {"untok_image": torch.ones(2, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="cannot be generated"):
        model.generate({"image": tokens["image"]}, "untok_image")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.embed({"untok_image": torch.randn(2, 3, 8, 4)})
    with pytest.raises(ValueError, match="patch_size"):
        ModalitySpec("raw", "raw", 0, 4, channels=3)


def test_quantile_atoms_at_both_ends_capped_data():
    # e.g. relative humidity in [40, 100] %, capped at both ends: 15 % exactly at 40 and 20 % exactly at 100 (B = 16)
    import numpy as np

    from terratorch_eoplugins.nn.ts_tokenizers.binning import QuantileTokenizer

    rng = np.random.default_rng(5)
    u = rng.random(8000)
    x = np.where(u < 0.15, 40.0, np.where(u > 0.8, 100.0, rng.uniform(40.0, 100.0, 8000)))
    tok = QuantileTokenizer(16).fit(x)
    k = int(tok.n_bins[0])
    edges = tok.edges[0, : k + 1].numpy()
    q = np.quantile(x, np.arange(17) / 16, method="inverted_cdf")
    q[0] = x.min()
    # the edges are the paper's quantiles t_j = F^-1(j/B) with duplicates merged, plus the zero-width bin of the cap
    np.testing.assert_array_equal(edges[:-1], np.unique(q))
    assert edges[-1] == edges[-2] == 100.0
    enc, dec = tok.encode(x), tok.decode(tok.encode(x)).double().numpy()
    top, low = x == 100.0, x == 40.0
    # the cap has its own token, decoded to the cap exactly; no other value shares it
    assert (enc[torch.from_numpy(top)] == k - 1).all() and (enc[torch.from_numpy(~top)] < k - 1).all()
    assert (dec[top] == 100.0).all()
    # the atom at the minimum: the first bin [x_min, t_1) of the merged quantiles (half-open bins, section 3.1.1)
    assert (enc[torch.from_numpy(low)] == 0).all()
    inner = ~top
    lo, hi = edges[:-1][enc.numpy()[inner]], edges[1:][enc.numpy()[inner]]
    assert ((x[inner] >= lo) & (x[inner] < hi)).all()  # every interior value sits in its half-open quantile bin
    assert ((dec[inner] >= lo) & (dec[inner] <= hi)).all()
