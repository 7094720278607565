"""DUNIA losses against independent NumPy implementations of the appendix-B formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from terratorch_eoplugins.losses import (
    dunia_reconstruction_losses,
    hierarchical_vicreg,
    vicreg_loss,
    zca_whitening_matrix,
    zero_cl_loss,
)


# ----------------------------------------------------------------------------- NumPy references
def np_l2(z: np.ndarray) -> np.ndarray:
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def np_inv_sqrt(m: np.ndarray, shrinkage: float, eps: float = 1e-6) -> np.ndarray:
    """(shrunk) M^{-1/2} by eigh: E diag(lambda^{-1/2}) E^T."""
    d = m.shape[0]
    s = np.trace(m) / d
    m = (1 - shrinkage) * m + shrinkage * s * np.eye(d)
    lam, e = np.linalg.eigh(m)
    lam = np.maximum(lam, eps * s)
    return e @ np.diag(lam ** -0.5) @ e.T


def np_standardize(z: np.ndarray, axis: int, eps: float = 1e-6) -> np.ndarray:
    zc = z - z.mean(axis, keepdims=True)
    return zc / np.sqrt((zc ** 2).mean(axis, keepdims=True) + eps)


def np_zero_cl(za: np.ndarray, zb: np.ndarray, shrinkage: float, standardize: bool = True) -> tuple[float, float]:
    """Eqs. 3-6 (Zero-CL standardisation first) with the inner products normalised by D (instance) and G (feature)."""
    za, zb = np_l2(za.astype(np.float64)), np_l2(zb.astype(np.float64))
    g, d = za.shape
    # instance-wise: rows standardised over the features, S = Z Z^T / D (G x G), H = S^{-1/2} Z
    ia, ib = (np_standardize(za, 1), np_standardize(zb, 1)) if standardize else (za, zb)
    ha = np_inv_sqrt(ia @ ia.T / d, shrinkage) @ ia
    hb = np_inv_sqrt(ib @ ib.T / d, shrinkage) @ ib
    ins = sum((1 - sum(ha[i, k] * hb[i, k] for k in range(d)) / d) ** 2 for i in range(g))
    # feature-wise: columns standardised over the batch, C = Z^T Z / G (D x D), H = C^{-1/2} Z^T
    ca, cb = (np_standardize(za, 0), np_standardize(zb, 0)) if standardize else (za, zb)
    fa = np_inv_sqrt(ca.T @ ca / g, shrinkage) @ ca.T
    fb = np_inv_sqrt(cb.T @ cb / g, shrinkage) @ cb.T
    fea = sum((1 - sum(fa[k, i] * fb[k, i] for i in range(g)) / g) ** 2 for k in range(d))
    return float(ins), float(fea)


def np_vicreg(za: np.ndarray, zb: np.ndarray, eps: float = 1e-4) -> tuple[float, float, float]:
    za, zb = np_l2(za.astype(np.float64)), np_l2(zb.astype(np.float64))
    m, d = za.shape

    def v(z: np.ndarray) -> float:
        std = np.sqrt(((z - z.mean(0)) ** 2).sum(0) / m + eps)
        return float(np.mean(np.maximum(0.0, 1.0 - std)))

    def c(z: np.ndarray) -> float:
        zc = z - z.mean(0)
        cov = zc.T @ zc / (m - 1)
        return float(sum(cov[k, l] ** 2 for k in range(d) for l in range(d) if k != l) / d)

    var = 0.5 * (v(za) + v(zb))
    inv = float(np.mean(((za - zb) ** 2).sum(1)))
    cov = c(za) + c(zb)
    return var, inv, cov


# ----------------------------------------------------------------------------- Zero-CL
@pytest.mark.parametrize("g,d", [(26, 16), (8, 16), (40, 8)])
@pytest.mark.parametrize("shrinkage", [0.0, 0.1])
@pytest.mark.parametrize("standardize", [True, False])
def test_zero_cl_matches_numpy_formulas(g: int, d: int, shrinkage: float, standardize: bool) -> None:
    rng = np.random.default_rng(g * d)
    za = rng.normal(size=(g, d)) + 0.3
    zb = za + 0.5 * rng.normal(size=(g, d))
    out = zero_cl_loss(torch.tensor(za), torch.tensor(zb), shrinkage=shrinkage, standardize=standardize,
                       return_parts=True)
    ins, fea = np_zero_cl(za, zb, shrinkage, standardize)
    assert float(out["ins"]) == pytest.approx(ins, rel=1e-6, abs=1e-8)
    assert float(out["fea"]) == pytest.approx(fea, rel=1e-6, abs=1e-8)
    assert float(out["loss"]) == pytest.approx(ins + fea, rel=1e-6)


def test_zero_cl_ignores_a_shared_direction() -> None:
    """Regression (collapse): embeddings sharing one dominant direction with unrelated residuals must not look
    aligned. Standardised Zero-CL scores them like unrelated views; the uncentred form rewards the shared part."""
    rng = np.random.default_rng(1)
    g, d = 26, 64
    common = rng.normal(size=(1, d)) * 5.0
    za = torch.tensor(common + rng.normal(size=(g, d)))
    zb = torch.tensor(common + rng.normal(size=(g, d)))  # same direction, unrelated per-instance parts
    ua, ub = torch.tensor(rng.normal(size=(g, d))), torch.tensor(rng.normal(size=(g, d)))  # fully unrelated
    shared, unrelated = float(zero_cl_loss(za, zb)), float(zero_cl_loss(ua, ub))
    assert shared == pytest.approx(unrelated, rel=0.1)
    assert float(zero_cl_loss(za, zb, standardize=False)) < float(zero_cl_loss(ua, ub, standardize=False))
    # aligned per-instance parts on top of the shared direction are what lowers the loss
    aligned = torch.tensor(common) + (za - torch.tensor(common)) + 0.1 * torch.tensor(rng.normal(size=(g, d)))
    assert float(zero_cl_loss(za, aligned)) < 0.5 * shared


def test_zero_cl_standardised_invariances() -> None:
    """Without L2 normalisation: L_Fea is invariant to a per-feature offset and scale, L_Ins to a per-instance one."""
    rng = np.random.default_rng(2)
    za, zb = torch.tensor(rng.normal(size=(20, 12))), torch.tensor(rng.normal(size=(20, 12)))
    base = zero_cl_loss(za, zb, normalize=False, return_parts=True)
    scale, offset = torch.tensor(rng.uniform(0.5, 2.0, size=(1, 12))), torch.tensor(rng.normal(size=(1, 12)))
    shifted = zero_cl_loss(za * scale + offset, zb, normalize=False, return_parts=True)
    assert float(shifted["fea"]) == pytest.approx(float(base["fea"]), rel=1e-4)
    scale, offset = torch.tensor(rng.uniform(0.5, 2.0, size=(20, 1))), torch.tensor(rng.normal(size=(20, 1)))
    shifted = zero_cl_loss(za * scale + offset, zb, normalize=False, return_parts=True)
    assert float(shifted["ins"]) == pytest.approx(float(base["ins"]), rel=1e-4)


def test_zero_cl_is_zero_for_identical_full_rank_views() -> None:
    """Whitened identical views: feature loss 0 when G > D (C full rank), instance loss 0 when G < D (S full rank)."""
    rng = np.random.default_rng(0)
    z = torch.tensor(rng.normal(size=(200, 8)))
    assert float(zero_cl_loss(z, z, shrinkage=0.0, return_parts=True)["fea"]) < 1e-8
    z = torch.tensor(rng.normal(size=(6, 32)))
    assert float(zero_cl_loss(z, z, shrinkage=0.0, return_parts=True)["ins"]) < 1e-8
    # unrelated views score worse than aligned ones
    other = torch.tensor(rng.normal(size=(6, 32)))
    assert float(zero_cl_loss(z, other)) > float(zero_cl_loss(z, z)) + 1.0


def test_zero_cl_is_stable_with_fewer_footprints_than_features() -> None:
    """G < D_p with duplicated rows (rank-deficient S and C): finite loss and gradients in float32."""
    torch.manual_seed(0)
    base = torch.randn(3, 64)
    za = torch.cat([base, base[:1]], 0).requires_grad_(True)  # G = 4, rank 3
    zb = torch.randn(4, 64, requires_grad=True)
    loss = zero_cl_loss(za, zb)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(za.grad).all() and torch.isfinite(zb.grad).all()
    w = zca_whitening_matrix(torch.zeros(5, 16))  # all-zero input: no NaN either
    assert torch.isfinite(w).all()


def test_zero_cl_gradient_aligns_pairs() -> None:
    """A few gradient steps on free embeddings lower the loss and raise the positive-pair cosine similarity."""
    torch.manual_seed(0)
    za = torch.randn(30, 16, requires_grad=True)
    zb = torch.randn(30, 16)
    opt = torch.optim.SGD([za], lr=0.05)
    first = float(zero_cl_loss(za, zb).detach())
    for _ in range(50):
        opt.zero_grad()
        loss = zero_cl_loss(za, zb)
        loss.backward()
        opt.step()
    cos = torch.nn.functional.cosine_similarity(za.detach(), zb).mean()
    assert float(zero_cl_loss(za, zb).detach()) < first
    assert float(cos) > 0.3


def test_zero_cl_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        zero_cl_loss(torch.randn(1, 8), torch.randn(1, 8))
    with pytest.raises(ValueError, match="same shape"):
        zero_cl_loss(torch.randn(4, 8), torch.randn(4, 9))
    bad = torch.randn(4, 8)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        zero_cl_loss(bad, torch.randn(4, 8))
    with pytest.raises(ValueError, match="shrinkage"):
        zca_whitening_matrix(torch.randn(4, 8), shrinkage=1.0)


# ----------------------------------------------------------------------------- VICReg
@pytest.mark.parametrize("m,d", [(50, 8), (300, 16)])
def test_vicreg_matches_numpy_formulas(m: int, d: int) -> None:
    rng = np.random.default_rng(m)
    za = rng.normal(size=(m, d)) + rng.normal(size=(1, d))
    zb = za + 0.3 * rng.normal(size=(m, d))
    out = vicreg_loss(torch.tensor(za), torch.tensor(zb), return_parts=True)
    var, inv, cov = np_vicreg(za, zb)
    assert float(out["var"]) == pytest.approx(var, rel=1e-6)
    assert float(out["inv"]) == pytest.approx(inv, rel=1e-6)
    assert float(out["cov"]) == pytest.approx(cov, rel=1e-6)
    assert float(out["loss"]) == pytest.approx(25 * var + 25 * inv + 1 * cov, rel=1e-6)


def test_hierarchical_vicreg_sums_levels_and_subsamples_the_same_pixels() -> None:
    torch.manual_seed(0)
    levels_a = [torch.randn(2, 8 * 2**d, 16 // 2**d, 16 // 2**d) for d in range(4)]
    levels_b = [x + 0.1 * torch.randn_like(x) for x in levels_a]
    total = hierarchical_vicreg(levels_a, levels_b)
    per_level = []
    for a, b in zip(levels_a, levels_b):
        pa = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]).numpy()
        pb = b.permute(0, 2, 3, 1).reshape(-1, b.shape[1]).numpy()
        var, inv, cov = np_vicreg(pa, pb)
        per_level.append(25 * var + 25 * inv + cov)
    assert float(total) == pytest.approx(sum(per_level), rel=1e-5)
    # identical branches: subsampling must pick the same pixels in both, so the invariance stays 0
    same = hierarchical_vicreg(levels_a, levels_a, num_pixels=20, var_weight=0.0, cov_weight=0.0)
    assert float(same) == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="level 2 shapes differ"):
        hierarchical_vicreg(levels_a[:2], [levels_b[0], levels_b[1][:, :4]])
    with pytest.raises(ValueError, match="number of levels"):
        hierarchical_vicreg(levels_a, levels_b[:3])


# ----------------------------------------------------------------------------- reconstructions
def test_reconstruction_losses() -> None:
    torch.manual_seed(0)
    w, wh = torch.rand(5, 32), torch.rand(5, 32)
    m, mh = torch.randn(2, 3, 3, 4, 4), torch.randn(2, 3, 3, 4, 4)
    i, ih = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = dunia_reconstruction_losses(w, wh, m, mh, i, ih)
    ref = [float(((a - b) ** 2).mean()) for a, b in ((w, wh), (m, mh), (i, ih))]
    assert [float(out[k]) for k in ("waveform", "series", "image")] == pytest.approx(ref, rel=1e-6)
    assert float(out["total"]) == pytest.approx(sum(ref), rel=1e-6)
    no_wave = dunia_reconstruction_losses(series=m, series_hat=mh, image=i, image_hat=ih)
    assert "waveform" not in no_wave and float(no_wave["total"]) == pytest.approx(ref[1] + ref[2], rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        dunia_reconstruction_losses(image=i, image_hat=ih[:, :2])
    with pytest.raises(ValueError, match="no \\(input"):
        dunia_reconstruction_losses()


# ----------------------------------------------------------------------------- precision guard
@pytest.mark.parametrize("loss", ["zero_cl", "vicreg"])
def test_whitening_and_covariance_run_in_full_float32_under_medium_precision(loss: str, matmul_spy) -> None:
    """``import terratorch`` sets "medium": the losses' matrix products must still run at "highest", and the
    caller's setting must be left as it was (also after a call that raises)."""
    rng = np.random.default_rng(3)
    za = torch.tensor(rng.normal(size=(24, 16)), dtype=torch.float32)
    zb = torch.tensor(rng.normal(size=(24, 16)), dtype=torch.float32)
    fn = zero_cl_loss if loss == "zero_cl" else vicreg_loss
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with matmul_spy:
            got = fn(za, zb, return_parts=True)
        assert matmul_spy.calls and matmul_spy.precisions() == {"highest"}, matmul_spy.calls
        assert torch.get_float32_matmul_precision() == "medium"
        if loss == "zero_cl":
            ins, fea = np_zero_cl(za.numpy(), zb.numpy(), 0.1)
            assert float(got["ins"]) == pytest.approx(ins, rel=1e-4, abs=1e-4)
            assert float(got["fea"]) == pytest.approx(fea, rel=1e-4, abs=1e-4)
        else:
            var, inv, cov = np_vicreg(za.numpy(), zb.numpy())
            assert float(got["cov"]) == pytest.approx(cov, rel=1e-5)
        with pytest.raises(ValueError, match="NaN"):
            fn(za, torch.full_like(zb, float("nan")))
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
