"""Self-supervised and reconstruction losses of the plugin's models, grouped by model.

Sections:

* **S4** (Shenoy et al., "S4: Self-Supervised Sensing Across the Spectrum", 2024):
  :func:`s4_pixel_infonce` (multi-modal space-time InfoNCE, Eq. 2, symmetric over the anchor modality),
  :func:`s4_reconstruction_l1` (cross-modal mean L1, Eq. 3) and their module wrappers
  :class:`S4InfoNCELoss`, :class:`S4ReconstructionLoss`.
* **DUNIA** (Fayad et al., ICML 2025): :func:`zero_cl_loss` (Zero-CL with ZCA whitening), :func:`vicreg_loss`,
  :func:`hierarchical_vicreg`, :func:`dunia_reconstruction_losses`.

Whitening and covariance matrices are computed with full float32 products whatever
``torch.get_float32_matmul_precision()`` says (``import terratorch`` sets ``"medium"``: bfloat16 / TF32 products
would perturb a whitened ``G x G`` or ``D x D`` system by far more than its smallest eigenvalues): those blocks run
under :func:`~terratorch_eoplugins.runtime.exact_matmul`, which restores the caller's setting afterwards. Their
backward pass runs at the precision in force when ``backward()`` is called.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from terratorch_eoplugins.runtime import exact_matmul

__all__ = [
    "S4_INFONCE_CHUNK",
    "S4InfoNCELoss",
    "S4ReconstructionLoss",
    "s4_pixel_infonce",
    "s4_reconstruction_l1",
    "s4_sample_positions",
]


# =====================================================================================================
# S4: pixel-wise multi-modal space-time contrastive loss and cross-modal reconstruction loss
# =====================================================================================================

#: anchor rows per chunk of the InfoNCE logits (``[B, chunk, N]`` at a time): bounds memory without changing the value
S4_INFONCE_CHUNK = 1024


def s4_sample_positions(batch: int, positions: int, num_pixels: int | None, generator: torch.Generator | None = None,
                        device: torch.device | str | None = None, valid: Tensor | None = None) -> Tensor:
    """Indices ``[batch, P]`` of the space-time positions used per sample (distinct within a sample).

    ``num_pixels=None`` (or >= ``positions``) keeps every position in order; otherwise ``num_pixels``
    positions are drawn uniformly without replacement, independently for each sample. With ``valid``
    (``[batch, positions]`` boolean) the draw is among the valid positions; a sample with fewer valid positions
    than ``num_pixels`` gets all of them, then invalid ones (which the loss masks out).
    """
    if positions < 1:
        raise ValueError(f"no space-time position to contrast (T*H*W = {positions})")
    if num_pixels is not None and num_pixels < 2:
        raise ValueError(f"num_pixels must be >= 2 (one positive and at least one negative) or None, got {num_pixels}")
    if num_pixels is None or num_pixels >= positions:
        return torch.arange(positions, device=device).expand(batch, positions)
    scores = torch.rand(batch, positions, generator=generator, device=generator.device if generator else device)
    if valid is not None:
        scores = scores + (~valid.bool()).to(scores.device, scores.dtype) * 2.0  # invalid positions sort last
    return scores.argsort(dim=1)[:, :num_pixels].to(device)


def _flatten_positions(z: Tensor, name: str) -> Tensor:
    if z.ndim < 3:
        raise ValueError(f"{name} must be [B, D, ...positions] (e.g. [B, D, T, H, W]), got shape {tuple(z.shape)}")
    return z.flatten(2)  # B x D x N


def _infonce_chunk(anchor: Tensor, positive: Tensor, other: Tensor, col_bias: Tensor, temperature: float) -> Tensor:
    """Per-row InfoNCE of a chunk of anchors: ``logsumexp_j(a_i . b_j / tau + bias_j) - a_i . b_i / tau``.

    ``anchor``, ``positive``: ``[B, c, D]`` (unit vectors; ``positive`` = the other modality at the same positions);
    ``other``: ``[B, N, D]`` every candidate; ``col_bias``: ``[B, N]`` (0 valid, ``-inf`` masked).
    """
    logits = torch.bmm(anchor, other.transpose(1, 2)) / temperature + col_bias[:, None, :]
    return torch.logsumexp(logits, dim=2) - (anchor * positive).sum(-1) / temperature


def s4_pixel_infonce(z_a: Tensor, z_b: Tensor, temperature: float = 0.5, num_pixels: int | None = None,
                     indices: Tensor | None = None, generator: torch.Generator | None = None,
                     valid: Tensor | None = None, chunk_size: int | None = S4_INFONCE_CHUNK) -> Tensor:
    """S4 multi-modal space-time InfoNCE (Eq. 2), averaged symmetrically over both anchor modalities.

    For each sample, the features of the two modalities at the same space-time position ``(t, y, x)``
    form the positive pair; every other position (other pixel or other date) *of the opposite modality*
    in the same sample is a negative. With cosine similarity ``sim`` and temperature ``tau``::

        l_a(i) = -log( exp(sim(a_i, b_i)/tau) / sum_j exp(sim(a_i, b_j)/tau) )

    ``l_a`` is averaged over the anchor pixels of modality a, ``l_b`` likewise with b as the anchor,
    the per-sample loss is ``(mean l_a + mean l_b) / 2`` and the result is the batch mean.

    By default every position of the feature map is an anchor and every other one a negative (the paper). The
    ``N x N`` logits of a sample are never materialised at once: anchors are processed ``chunk_size`` rows at a
    time (``[B, chunk_size, N]`` logits, each row's log-sum-exp is complete, so the value is exactly the
    unchunked formula), and with gradients enabled each chunk is recomputed in the backward pass
    (activation checkpointing), so memory stays ``O(B * chunk_size * N)`` forward and backward.

    Args:
        z_a: ``[B, D, T, H, W]`` (or any ``[B, D, ...]``) projected features of modality a.
        z_b: features of modality b, same shape.
        temperature: ``tau`` (paper default 0.5).
        num_pixels: positions sampled per sample (the project's earlier default, 256; fewer negatives lower the
            loss by about ``log(N / num_pixels)``); ``None`` = every position (paper).
        indices: explicit ``[B, P]`` flat position indices (overrides ``num_pixels``).
        generator: random generator of the position sampling.
        valid: ``[B, D-less positions]`` boolean (``[B, T, H, W]`` or flat ``[B, N]``), ``False`` for positions made
            of padding (dates appended to batch series of different lengths): they are neither anchors nor
            negatives, and each sample's mean runs over its valid anchors only.
        chunk_size: anchor rows per chunk (``None``: all rows at once).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    if z_a.shape != z_b.shape:
        raise ValueError(f"the two modalities' feature maps must have the same shape [B, D, T, H, W] (same dates and "
                         f"H x W), got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    a, b = _flatten_positions(z_a, "z_a"), _flatten_positions(z_b, "z_b")
    bsz, _, n = a.shape
    if valid is not None:
        valid = valid.reshape(valid.shape[0], -1).bool().to(a.device) if valid.ndim >= 2 else valid
        if valid.shape != (bsz, n):
            raise ValueError(f"valid must have one flag per position, [B={bsz}, N={n}] (or [B, T, H, W]), got shape "
                             f"{tuple(valid.shape)}")
        if bool((valid.sum(1) < 2).any()):
            raise ValueError("every sample needs at least 2 valid positions (a positive and a negative)")
    if indices is None:
        indices = s4_sample_positions(bsz, n, num_pixels, generator, a.device, valid)
    elif indices.ndim != 2 or indices.shape[0] != bsz:
        raise ValueError(f"indices must be [B={bsz}, P], got shape {tuple(indices.shape)}")
    if indices.shape[1] < 2:
        raise ValueError(f"need at least 2 positions per sample (a positive and a negative), got {indices.shape[1]}")
    indices = indices.to(a.device)
    if not (indices.shape[1] == n and torch.equal(indices, torch.arange(n, device=a.device).expand(bsz, n))):
        idx = indices.unsqueeze(1).expand(-1, a.shape[1], -1)
        a, b = a.gather(2, idx), b.gather(2, idx)
        valid = None if valid is None else valid.gather(1, indices)
    a = F.normalize(a.transpose(1, 2), dim=-1)  # B x P x D
    b = F.normalize(b.transpose(1, 2), dim=-1)
    p = a.shape[1]
    keep = torch.ones(bsz, p, dtype=torch.bool, device=a.device) if valid is None else valid
    bias = torch.zeros(bsz, p, dtype=a.dtype, device=a.device).masked_fill(~keep, float("-inf"))
    step = p if chunk_size is None else int(chunk_size)
    checkpointed = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad) and step < p
    rows_a, rows_b = [], []
    for i0 in range(0, p, step):
        sl = slice(i0, min(i0 + step, p))
        args_a = (a[:, sl], b[:, sl], b, bias, temperature)
        args_b = (b[:, sl], a[:, sl], a, bias, temperature)
        if checkpointed:
            rows_a.append(checkpoint(_infonce_chunk, *args_a, use_reentrant=False))
            rows_b.append(checkpoint(_infonce_chunk, *args_b, use_reentrant=False))
        else:
            rows_a.append(_infonce_chunk(*args_a))
            rows_b.append(_infonce_chunk(*args_b))
    la, lb = torch.cat(rows_a, 1), torch.cat(rows_b, 1)  # B x P
    w = keep.to(la.dtype)
    zero = torch.zeros((), dtype=la.dtype, device=la.device)
    loss_a = torch.where(keep, la, zero).sum(1) / w.sum(1)
    loss_b = torch.where(keep, lb, zero).sum(1) / w.sum(1)
    return (0.5 * (loss_a + loss_b)).mean()


def s4_reconstruction_l1(prediction: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """S4 cross-modal reconstruction loss (Eq. 3): ``||x_hat - x||_1 / (T * C * H * W)``, batch-averaged.

    Args:
        prediction: ``[B, C, T, H, W]`` reconstruction of the other modality.
        target: the other modality's series, same shape.
        mask: optional weights broadcastable to ``prediction`` (1 = counted, e.g. cloud-free); the
            per-sample mean is then taken over the weighted elements only. The paper uses no mask.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"reconstruction and target shapes differ: {tuple(prediction.shape)} vs {tuple(target.shape)}")
    err = (prediction - target).abs()
    if mask is None:
        return err.flatten(1).mean(1).mean()
    w = torch.broadcast_to(mask.to(err.dtype), err.shape).flatten(1)
    per_sample = (err.flatten(1) * w).sum(1) / w.sum(1).clamp_min(1e-12)
    return per_sample.mean()


class S4InfoNCELoss(nn.Module):
    """Module form of :func:`s4_pixel_infonce` with a fixed temperature and pixel budget."""

    def __init__(self, temperature: float = 0.5, num_pixels: int | None = None,
                 chunk_size: int | None = S4_INFONCE_CHUNK) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.num_pixels = num_pixels
        self.chunk_size = chunk_size

    def forward(self, z_a: Tensor, z_b: Tensor, indices: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
        """Symmetric pixel InfoNCE between two ``[B, D, T, H, W]`` feature maps (every position by default)."""
        return s4_pixel_infonce(z_a, z_b, self.temperature, self.num_pixels, indices, valid=valid,
                                chunk_size=self.chunk_size)


class S4ReconstructionLoss(nn.Module):
    """Module form of :func:`s4_reconstruction_l1`."""

    def forward(self, prediction: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """Mean L1 over T x C x H x W, averaged over the batch."""
        return s4_reconstruction_l1(prediction, target, mask)


# =====================================================================================================
# DUNIA (Fayad et al., ICML 2025): Zero-CL pixel-waveform alignment, hierarchical VICReg pixel-pixel
# alignment, reconstruction MSEs (section 3.4, appendix B)
# =====================================================================================================

__all__ += ["dunia_reconstruction_losses", "hierarchical_vicreg", "vicreg_loss", "zca_whitening_matrix", "zero_cl_loss"]


def zca_whitening_matrix(x: Tensor, shrinkage: float = 0.1, eps: float = 1e-6) -> Tensor:
    """ZCA whitening matrix ``W = E Lambda^{-1/2} E^T`` of the second-moment matrix ``C = x^T x / N`` (``x [N, D]``).

    Numerical stability (Zero-CL with few GEDI footprints, ``G < D_p``, makes ``C`` rank deficient):
    the eigen-decomposition is taken in float64 with autocast off, ``C`` is shrunk towards a scaled identity,
    ``C_s = (1 - shrinkage) C + shrinkage * (tr(C) / D) I`` (the official Zero-CL code's ``0.9 cov + 0.1 I``
    on standardised data), eigenvalues are floored at ``eps * tr(C) / D``, and ``W`` is detached (eigenvector
    gradients are undefined for repeated eigenvalues; the official code detaches it too).
    """
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"zca_whitening_matrix expects [N >= 1, D], got shape {tuple(x.shape)}")
    if not 0.0 <= shrinkage < 1.0:
        raise ValueError(f"shrinkage must lie in [0, 1), got {shrinkage}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        z = x.detach().double()
        c = z.T @ z / z.shape[0]
        d = c.shape[0]
        scale = torch.trace(c).clamp_min(1e-30) / d
        c = (1.0 - shrinkage) * c + shrinkage * scale * torch.eye(d, dtype=c.dtype, device=c.device)
        evals, evecs = torch.linalg.eigh(c)
        inv_sqrt = evals.clamp_min(eps * scale).rsqrt()
        w = (evecs * inv_sqrt) @ evecs.T
    return w.to(x.dtype)


def _check_pair(a: Tensor, b: Tensor, what: str) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{what}: expects two [N, D] embedding matrices of the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError(f"{what}: embeddings contain NaN/Inf")


def _standardize(z: Tensor, dim: int, eps: float = 1e-6) -> Tensor:
    """``(z - mean) / std`` along ``dim`` (population std, ``1/N``), as in Zero-CL (Zhang et al., 2021)."""
    zc = z - z.mean(dim, keepdim=True)
    return zc / torch.sqrt((zc ** 2).mean(dim, keepdim=True) + eps)


def zero_cl_loss(z_a: Tensor, z_b: Tensor, shrinkage: float = 0.1, normalize: bool = True, standardize: bool = True,
                 return_parts: bool = False, form: str = "standardized") -> Tensor | dict[str, Tensor]:
    """Zero-CL loss ``L_Fea + L_Ins`` between paired embeddings (DUNIA appendix B, Eqs. 3-6).

    ``z_a``: ``[G, D_p]`` pixel embeddings (``O^V`` at the GEDI footprints), ``z_b``: their waveform embeddings
    (``O^W``); both L2-normalised along ``D_p`` when ``normalize`` (the paper's ``Z^A``, ``Z^B``).

    * instance-wise (Eqs. 3-4): each instance is standardised over its ``D_p`` features, ``S = Z Z^T / D_p``
      (``G x G``, the instances' correlation "affinity" matrix), ``H^Ins = W^Ins Z`` with ``W^Ins = S^{-1/2}``
      (ZCA), ``L_Ins = sum_i (1 - sum_d H^A_id H^B_id / D_p)^2``;
    * feature-wise (Eqs. 5-6): each feature is standardised over the ``G`` instances, ``C = Z^T Z / G``
      (``D_p x D_p``, the covariance matrix), ``H^Fea = W^Fea Z^T`` with ``W^Fea = C^{-1/2}``,
      ``L_Fea = sum_d (1 - sum_i H^A_di H^B_di / G)^2``.

    **Standardisation** (``standardize=True``): appendix B calls ``C`` a *covariance* matrix and whitens as in
    Zero-CL (Zhang et al., 2021), whose formulation and official code centre and scale the embeddings before
    whitening: along the batch for the feature-wise term, along the features for the instance-wise term.
    Without it the second-moment matrix of L2-normalised embeddings is dominated by their shared mean direction:
    after (shrunk) whitening that direction alone carries the cross-correlation, and both terms are minimised
    by collapsing every pixel and waveform embedding onto one direction (positive and negative pairs then have
    the same cosine similarity). Standardised, the loss is invariant to a shared offset and only the
    instance-specific parts can reach the "1 -" targets. ``standardize=False`` keeps the literal
    uncentred Eqs. 4 and 6 (kept for comparison; it collapses in training).

    Each branch is whitened with its own matrix (:func:`zca_whitening_matrix`: shrinkage ``(1 - s) C + s I`` on
    standardised data, and ``W`` detached, as in the official Zero-CL code; only ``Z`` receives gradients). The
    inner products are divided by ``D_p`` (instance) and ``G`` (feature) so that a whitened vector's inner
    product with itself is 1 (``H H^T = D_p I`` resp. ``G I`` without the division): the "1 -" target of
    Eqs. 3 and 5 is then reachable, as with the official code's ``c = z1^T z2 / N``.

    ``form="literal"`` computes appendix B's Eqs. 3-6 as printed instead (the ablation of the official-code form,
    ``form="standardized"``, the default): no standardisation (``standardize`` is ignored) and unscaled inner
    products, ``L_Ins = sum_i (1 - sum_d H^A_id H^B_id)^2`` and ``L_Fea = sum_d (1 - sum_i H^A_di H^B_di)^2``
    with ``H^Ins = S^{-1/2} Z``, ``S = Z Z^T / D_p`` and ``H^Fea = C^{-1/2} Z^T``, ``C = Z^T Z / G``. ``shrinkage``
    still applies (0 = the printed equations); the eigenvalue floor of :func:`zca_whitening_matrix` keeps the
    inverse square root finite for the rank-deficient matrix (``S`` when ``G > D_p``, ``C`` when ``G < D_p``).
    """
    if form not in ("standardized", "literal"):
        raise ValueError(f"zero_cl_loss: form must be 'standardized' or 'literal', got {form!r}")
    _check_pair(z_a, z_b, "zero_cl_loss")
    g, d = z_a.shape
    if g < 2:
        raise ValueError(f"zero_cl_loss needs at least 2 paired samples (G = {g}); "
                         "skip batches with fewer GEDI footprints")
    if d < 2:
        raise ValueError(f"zero_cl_loss needs at least 2 features (D_p = {d})")
    if normalize:
        z_a, z_b = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1)
    literal = form == "literal"
    standardize = standardize and not literal
    ins_scale, fea_scale = (1.0, 1.0) if literal else (float(d), float(g))
    with exact_matmul():  # whitened products in full float32 (see the module docstring)
        # instance-wise: whiten the G x G affinity Z Z^T / D (= second moment of Z^T, [D, G])
        ia, ib = (_standardize(z_a, 1), _standardize(z_b, 1)) if standardize else (z_a, z_b)
        ha = zca_whitening_matrix(ia.T, shrinkage) @ ia  # G x D
        hb = zca_whitening_matrix(ib.T, shrinkage) @ ib
        ins = ((1.0 - (ha * hb).sum(1) / ins_scale) ** 2).sum()
        # feature-wise: whiten the D x D covariance Z^T Z / G
        ca, cb = (_standardize(z_a, 0), _standardize(z_b, 0)) if standardize else (z_a, z_b)
        fa = zca_whitening_matrix(ca, shrinkage) @ ca.T  # D x G
        fb = zca_whitening_matrix(cb, shrinkage) @ cb.T
        fea = ((1.0 - (fa * fb).sum(1) / fea_scale) ** 2).sum()
    if return_parts:
        return {"loss": fea + ins, "ins": ins, "fea": fea}
    return fea + ins


def vicreg_loss(z_a: Tensor, z_b: Tensor, var_weight: float = 25.0, inv_weight: float = 25.0, cov_weight: float = 1.0,
                eps: float = 1e-4, normalize: bool = True, return_parts: bool = False) -> Tensor | dict[str, Tensor]:
    """VICReg between paired ``[M, D]`` embeddings as written in DUNIA appendix B (Eqs. 7-10).

    * ``L_var = (v(Z^A) + v(Z^B)) / 2``, ``v(Z) = mean_d max(0, 1 - sqrt(Var_d(Z) + eps))`` (``Var`` over ``M``
      with ``1/M``);
    * ``L_inv = (1/M) sum_i ||Z^A_i - Z^B_i||^2``;
    * ``L_cov = c(Z^A) + c(Z^B)``, ``c(Z) = (1/D) sum_{k != l} cov(Z)_{kl}^2`` with ``cov`` normalised by ``M - 1``;
    * ``L = var_weight L_var + inv_weight L_inv + cov_weight L_cov`` (25 / 25 / 1).

    ``normalize``: L2-normalise the rows first (the paper's ``Z``). Note that unit-norm rows have per-feature
    standard deviations of at most ``~1/sqrt(D)``, so the variance hinge never reaches 0 and keeps pushing the
    embeddings to spread over the sphere.
    """
    _check_pair(z_a, z_b, "vicreg_loss")
    m, d = z_a.shape
    if m < 2:
        raise ValueError(f"vicreg_loss needs at least 2 samples (M = {m})")
    if normalize:
        z_a, z_b = F.normalize(z_a, dim=1), F.normalize(z_b, dim=1)
    inv = ((z_a - z_b) ** 2).sum(1).mean()

    def var_cov(z: Tensor) -> tuple[Tensor, Tensor]:
        zc = z - z.mean(0, keepdim=True)
        v = torch.relu(1.0 - torch.sqrt((zc ** 2).mean(0) + eps)).mean()
        cov = zc.T @ zc / (m - 1)
        off = cov - torch.diag(torch.diagonal(cov))
        return v, (off ** 2).sum() / d

    with exact_matmul():  # covariance products in full float32 (see the module docstring)
        va, ca = var_cov(z_a)
        vb, cb = var_cov(z_b)
    var = 0.5 * (va + vb)
    cov = ca + cb
    loss = var_weight * var + inv_weight * inv + cov_weight * cov
    if return_parts:
        return {"loss": loss, "var": var, "inv": inv, "cov": cov}
    return loss


def _pixels(x: Tensor) -> Tensor:
    """``[B, D, H, W]`` -> ``[B*H*W, D]``."""
    if x.ndim != 4:
        raise ValueError(f"expected a [B, D, H, W] feature map, got shape {tuple(x.shape)}")
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def hierarchical_vicreg(levels_a: list[Tensor], levels_b: list[Tensor], num_pixels: int | None = None,
                        generator: torch.Generator | None = None, **kwargs: float | bool) -> Tensor:
    """Hierarchical pixel-pixel VICReg (DUNIA Eq. 1): ``sum_d VICReg(Z^H_d, Z^T_d)`` over the decoder levels.

    ``levels_a``/``levels_b``: per-level ``[B, D_pd, H_d, W_d]`` maps (projected ``O^H_d`` and ``O^T_d``); every
    pixel of the batch is a sample (``M_d = B H_d W_d``). ``num_pixels`` subsamples at most that many pixels per
    level (the same pixels in both branches) to bound the cost; ``None`` uses all. ``kwargs`` go to
    :func:`vicreg_loss` (weights 25/25/1 by default).
    """
    if len(levels_a) != len(levels_b) or not levels_a:
        raise ValueError(f"hierarchical_vicreg: need the same non-zero number of levels, got {len(levels_a)} and "
                         f"{len(levels_b)}")
    total = levels_a[0].new_zeros(())
    for d, (a, b) in enumerate(zip(levels_a, levels_b)):
        if a.shape != b.shape:
            raise ValueError(f"hierarchical_vicreg: level {d + 1} shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        pa, pb = _pixels(a), _pixels(b)
        if num_pixels is not None and pa.shape[0] > num_pixels:
            idx = torch.randperm(pa.shape[0], generator=generator, device=generator.device if generator else None)
            idx = idx[:num_pixels].to(pa.device)
            pa, pb = pa[idx], pb[idx]
        total = total + vicreg_loss(pa, pb, **kwargs)  # type: ignore[arg-type]
    return total


def dunia_reconstruction_losses(waveform: Tensor | None = None, waveform_hat: Tensor | None = None,
                                series: Tensor | None = None, series_hat: Tensor | None = None,
                                image: Tensor | None = None, image_hat: Tensor | None = None) -> dict[str, Tensor]:
    """The three reconstruction MSEs of DUNIA Eq. 2: ``MSE(W, W_hat)``, ``MSE(M, M_hat)``, ``MSE(I, I_hat)``.

    Returns ``{"waveform", "series", "image", "total"}`` for the pairs given (a missing pair is left out of
    ``total``, e.g. a batch without GEDI footprints has no waveform term).
    """
    out: dict[str, Tensor] = {}
    pairs = (("waveform", waveform, waveform_hat), ("series", series, series_hat), ("image", image, image_hat))
    for name, x, y in pairs:
        if x is None and y is None:
            continue
        if x is None or y is None or x.shape != y.shape:
            raise ValueError(f"dunia_reconstruction_losses: {name} and its reconstruction must both be given with the "
                             f"same shape, got {getattr(x, 'shape', None)} and {getattr(y, 'shape', None)}")
        out[name] = F.mse_loss(y, x)
    if not out:
        raise ValueError("dunia_reconstruction_losses: no (input, reconstruction) pair given")
    out["total"] = torch.stack(list(out.values())).sum()
    return out
