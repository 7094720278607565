"""TerraMind-style correlation model for quantized time series + image tokens (Basile et al., 2025).

Paper: "Task-agnostic fusion of time series and imagery for Earth observation" (arXiv 2510.23118).

* **Correlation learning** (section 3.3): a transformer encoder ``E_corr`` over a concatenation of
  randomly sampled tokens of every modality (token embedding + learned modality embedding + learned
  1-D / 2-D position embedding, appendix A.1 "Learned positional embeddings were applied to both
  images (2D) and sequences (1D)"), and a decoder with cross-attention that predicts the target
  tokens under cross-entropy, averaged over modalities (appendix A.1, the ``mod`` loss).
* **Decoder inputs** follow TerraMind / 4M: image-like targets are queried by a mask token plus
  position and modality embeddings, and decoder self-attention stays within a modality
  (``decoder_sep_mask``); sequence modalities (weather, coordinates) decode *causally*
  (section 4, "the decoder operates in an autoregressive manner, using a causal attention mask"):
  the query of a target position also carries the embedding of the previous target token of the
  same modality (teacher forcing), and attention is causal within the modality.
* **Token budgets** (section 4, Eq. 3 and appendix A.1): input and target budgets ``N_in`` / ``N_tgt`` (128 / 128)
  are split by Dirichlet draws, scaled, floored and clamped to each modality's token count
  (:func:`sample_token_budgets`). Eq. 3 factorises into *independent* Dirichlets over the image-side and the
  time-series modalities (:func:`sample_group_budgets`, used by the pretraining task by default; each group gets an
  equal share of the budget, which the paper does not specify); one joint Dirichlet over all modalities stays an
  option. The input-only raw image modality (``kind="raw"``, TerraMind's ``untok_*`` patch embedding; alpha = 1000,
  never a target) joins the inputs. Targets are drawn from the tokens not given as input (:func:`sample_token_masks`).
* **Generation** (:meth:`TSFusionModel.generate`): a weather series from an image (and optional
  coordinates), token by token for sequence modalities, in one pass for image modalities.
* **Downstream** (appendix A.2): :class:`TSFusionRegressor` encodes every (grid, time) sample,
  pools with mean pooling (MP) or modality mean pooling (MMP, section 4 formula for
  ``z_modality``) over tokens, grids and dates, and predicts with :class:`TSFusionHead`,
  ``y = MLP(z) + 0.1 W_r z``.

The transformer blocks are terratorch's TerraMind blocks (``terramind.model.tm_utils.Block`` and
``DecoderBlock``: SwiGLU-gated MLP, no qkv bias, LayerNorm eps 1e-6 without bias, appendix A.1),
so the layer structure, key names and mask convention (``True`` = do not attend) match TerraMind. **Warm start**
(section 4): :func:`load_terramind_weights` copies a TerraMind checkpoint (the ``TerraMind_v1_base.pt`` terratorch's
``terramind_v1_base`` loads, by local path) into the encoder and decoder blocks, norms, context projection, mask
token, the image-token embeddings / head (``tok_sen2l2a@224``) and the raw image patch embedding
(``untok_sen2rgb@224``); the weather and coordinate modalities (TerraMind's coordinates are 30K-vocabulary text) are
new and stay random (:func:`terramind_key_map` lists what is shared).

Registered in terratorch: backbones ``tsfusion_base`` (12 + 12 layers, dim 768, 12 heads, as the
paper) and ``tsfusion_tiny`` (2 + 2 layers, dim 64; tests and CPU runs); decoder ``tsfusion_head``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from terratorch.models.backbones.terramind.model.tm_utils import Block, DecoderBlock, LayerNorm
from terratorch.registry import TERRATORCH_BACKBONE_REGISTRY, TERRATORCH_DECODER_REGISTRY
from torch import Tensor, nn

from terratorch_eoplugins.models.pretrained import (
    PRETRAINED_FLAG,
    check_builder_kwargs,
    log_restored,
    resolve_source,
    warn_no_pretrained,
)
from terratorch_eoplugins.runtime import read_checkpoint

logger = logging.getLogger(__name__)

__all__ = [
    "ModalitySpec",
    "TSFusionModel",
    "TSFusionHead",
    "TSFusionRegressor",
    "sample_token_budgets",
    "sample_token_masks",
    "sample_group_budgets",
    "pool_tokens",
    "ordinal_emd",
    "default_modalities",
    "tsfusion_base",
    "tsfusion_tiny",
    "tsfusion_head",
    "load_tsfusion_weights",
    "load_terramind_weights",
    "terramind_key_map",
    "MODEL_SIZES",
]

REGISTERED = {"backbone": ["tsfusion_base", "tsfusion_tiny"], "decoder": ["tsfusion_head"]}

#: encoder/decoder sizes of the registered variants (dim, encoder depth, decoder depth, heads)
MODEL_SIZES: dict[str, tuple[int, int, int, int]] = {"tsfusion_base": (768, 12, 12, 12),
                                                     "tsfusion_tiny": (64, 2, 2, 4)}


@dataclass(frozen=True)
class ModalitySpec:
    """One token modality.

    Attributes:
        name: modality key (e.g. ``image``, ``weather_tavg``, ``coords``).
        kind: ``image`` (2-D token grid, parallel decoding), ``seq`` (1-D sequence, causal decoding) or ``raw``
            (an *untokenized* image given as pixels ``[B, C, H, W]``, embedded by a linear patch projection as
            TerraMind's ``untok_*`` modalities; input only, never a target: appendix A.1, "input only modalities,
            where one untokenized image modality was emphasized (alpha = 1000) and never a target").
        vocab_size: number of token ids (including special tokens of the tokenizer); unused (0) for ``raw``.
        num_tokens: tokens per sample (``h * w`` for images, the sequence length otherwise).
        group: pooling group of MMP (``image`` or ``weather``; default: ``name``).
        ordinal: number of leading token ids that are ordered bins (uniform / quantile weather tokens); they get
            the ordinal EMD loss of appendix A.1 in addition to cross-entropy. 0: not ordinal.
        channels, patch_size: pixel channels and patch side of a ``raw`` modality (TerraMind: 16 px patches).
    """

    name: str
    kind: Literal["image", "seq"]
    vocab_size: int
    num_tokens: int
    group: str | None = None
    ordinal: int = 0
    channels: int = 0
    patch_size: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("image", "seq", "raw"):
            raise ValueError(f"modality {self.name!r}: kind must be 'image', 'seq' or 'raw', got {self.kind!r}")
        if self.kind == "raw":
            if self.channels < 1 or self.patch_size < 1 or self.num_tokens < 1:
                raise ValueError(f"raw modality {self.name!r}: channels, patch_size and num_tokens must be >= 1, got "
                                 f"{self.channels}, {self.patch_size} and {self.num_tokens}")
            return
        if self.vocab_size < 2 or self.num_tokens < 1:
            raise ValueError(f"modality {self.name!r}: vocab_size must be >= 2 and num_tokens >= 1, got "
                             f"{self.vocab_size} and {self.num_tokens}")

    @property
    def pool_group(self) -> str:
        return self.group or self.name

    @property
    def is_raw(self) -> bool:
        return self.kind == "raw"


def _as_specs(modalities: Sequence[ModalitySpec | Mapping[str, Any]]) -> list[ModalitySpec]:
    specs = [m if isinstance(m, ModalitySpec) else ModalitySpec(**dict(m)) for m in modalities]
    if not specs:
        raise ValueError("modalities must not be empty")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"modality names must be unique, got {names}")
    return specs


def default_modalities(image_tokens: int = 196, image_vocab: int = 15360, weather_len: int = 40,
                       weather_vocab: int = 504, weather: Sequence[str] = ("tavg", "tmax", "tmin", "precip"),
                       coords_vocab: int = 2160) -> list[ModalitySpec]:
    """Paper-like defaults: a 14 x 14 TerraMind-size image token map (vocabulary 15360), daily weather
    windows of 40 days (29 before + acquisition day + 10 after, section 4) per variable, and the grid
    centre as two coordinate tokens on a 0.25 degree grid (appendix A.1: 720 latitude + 1440 longitude bins)."""
    mods = [ModalitySpec("image", "image", image_vocab, image_tokens, "image")]
    mods += [ModalitySpec(f"weather_{v}", "seq", weather_vocab, weather_len, "weather") for v in weather]
    if coords_vocab:
        mods.append(ModalitySpec("coords", "seq", coords_vocab, 2, "coords"))
    return mods


# ------------------------------------------------------------------------------ token sampling
def sample_token_budgets(alphas: Tensor, budget: int, limits: Tensor, batch_size: int,
                         generator: torch.Generator | None = None) -> Tensor:
    """Per-sample token counts of each modality: ``floor(p * budget)`` clamped to ``limits``, ``p ~ Dir(alphas)``.

    Appendix A.1: "Budgets of N_in = 128 and N_tgt = 128 tokens were allocated by scaling Dirichlet
    samples, flooring, and clamping to modality-specific limits". Dirichlet draws are normalised
    Gamma(alpha, 1) draws.

    Args:
        alphas: ``[M]`` concentrations (> 0).
        budget: total tokens ``N`` to allocate (>= 0).
        limits: ``[M]`` or ``[B, M]`` maximum tokens per modality.
        batch_size: number of samples ``B``.
        generator: optional torch generator.

    Returns:
        ``[B, M]`` long tensor with ``sum <= budget`` and ``0 <= n <= limits``.
    """
    alphas = torch.as_tensor(alphas, dtype=torch.float64)
    if alphas.ndim != 1 or not bool((alphas > 0).all()):
        raise ValueError(f"alphas must be a 1-D tensor of positive concentrations, got {alphas.tolist()}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    limits = torch.as_tensor(limits)
    if limits.shape[-1] != alphas.numel():
        raise ValueError(f"limits has {limits.shape[-1]} modalities but alphas has {alphas.numel()}")
    gam = torch._standard_gamma(alphas.expand(batch_size, -1).contiguous()) if generator is None else \
        _gamma_with_generator(alphas, batch_size, generator)
    p = gam / gam.sum(-1, keepdim=True).clamp_min(1e-300)
    p = torch.nan_to_num(p, nan=1.0 / alphas.numel())
    n = torch.floor(p * budget).long()
    return torch.minimum(n, limits.to(n.device).long().expand_as(n))


def sample_group_budgets(alphas: Tensor, groups: Sequence[int], budget: int, limits: Tensor, batch_size: int,
                         generator: torch.Generator | None = None, weights: Sequence[float] | None = None) -> Tensor:
    """Token counts ``[B, M]`` from *independent* Dirichlets per modality group (section 4, eq. 3).

    Eq. 3 factorises the sampling density into ``Dir(p^(I) | alpha^(I)) * Dir(p^(T) | alpha^(T))`` over the image and
    the time-series modalities. Group ``g`` gets ``floor(budget * w_g)`` tokens (``weights``, normalised; default equal
    shares, the paper gives no split), spread over its modalities by :func:`sample_token_budgets` with its own
    ``p^(g)``. Modalities with ``groups[m] < 0`` get no token (e.g. an input-only modality in the target draw).
    """
    alphas = torch.as_tensor(alphas, dtype=torch.float64)
    groups_t = torch.as_tensor(list(groups), dtype=torch.long)
    if groups_t.numel() != alphas.numel():
        raise ValueError(f"groups has {groups_t.numel()} entries but alphas {alphas.numel()}")
    limits = torch.as_tensor(limits)
    ids = sorted(int(g) for g in set(groups_t.tolist()) if g >= 0)
    if not ids:
        raise ValueError("every modality is excluded (groups < 0): nothing to sample")
    w = torch.ones(len(ids), dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.numel() != len(ids) or not bool((w >= 0).all()) or float(w.sum()) <= 0:
        raise ValueError(f"weights must be {len(ids)} non-negative numbers with a positive sum, got {w.tolist()}")
    w = w / w.sum()
    out = torch.zeros(batch_size, alphas.numel(), dtype=torch.long)
    for g, wg in zip(ids, w.tolist()):
        sel = (groups_t == g).nonzero().flatten()
        lim = limits[..., sel]
        out[:, sel] = sample_token_budgets(alphas[sel], int(budget * wg), lim, batch_size, generator)
    return out


def _gamma_with_generator(alphas: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
    """Gamma(alpha, 1) via Marsaglia-Tsang with a boost for alpha < 1 (reproducible with ``generator``)."""
    a = alphas.expand(batch_size, -1)
    boost = a < 1
    d = torch.where(boost, a + 1, a) - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.zeros_like(a)
    todo = torch.ones_like(a, dtype=torch.bool)
    for _ in range(1000):
        if not bool(todo.any()):
            break
        x = torch.randn(a.shape, generator=generator, dtype=torch.float64)
        v = (1 + c * x) ** 3
        u = torch.rand(a.shape, generator=generator, dtype=torch.float64)
        ok = (v > 0) & (torch.log(u.clamp_min(1e-300)) < 0.5 * x**2 + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        new = todo & ok
        out = torch.where(new, d * v, out)
        todo = todo & ~ok
    u = torch.rand(a.shape, generator=generator, dtype=torch.float64)
    return torch.where(boost, out * u.clamp_min(1e-300) ** (1.0 / a), out)


def sample_token_masks(n_input: Tensor, n_target: Tensor, num_tokens: Sequence[int],
                       generator: torch.Generator | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Random disjoint input / target masks per modality from per-sample counts.

    For modality ``m`` of ``N_m`` tokens, a random permutation of its positions is drawn per sample;
    the first ``n_input[:, m]`` positions are inputs, the next ``min(n_target, N_m - n_input)`` are
    targets (4M / TerraMind: targets are the tokens the encoder does not see).

    Returns:
        ``(inputs, targets)``: lists of ``[B, N_m]`` bool masks.
    """
    if n_input.shape != n_target.shape or n_input.shape[1] != len(num_tokens):
        raise ValueError(f"n_input {tuple(n_input.shape)} and n_target {tuple(n_target.shape)} must be "
                         f"[B, {len(num_tokens)}]")
    b = n_input.shape[0]
    ins, tgts = [], []
    for m, n_m in enumerate(num_tokens):
        scores = torch.rand(b, n_m, generator=generator)
        rank = scores.argsort(dim=1).argsort(dim=1)  # rank of each position in a random permutation
        k_in = n_input[:, m:m + 1].clamp(0, n_m)
        k_tg = torch.minimum(n_target[:, m:m + 1].clamp_min(0), n_m - k_in)
        ins.append(rank < k_in)
        tgts.append((rank >= k_in) & (rank < k_in + k_tg))
    return ins, tgts


def _pack(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the ``True`` entries of ``mask [B, N]`` first (original order kept), padded; and validity."""
    n = int(mask.sum(1).max().item()) if mask.numel() else 0
    n = max(n, 1)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :n]
    valid = torch.gather(mask, 1, order)
    return order, valid


# --------------------------------------------------------------------------------------- model
class TSFusionModel(nn.Module):
    """Encoder-decoder correlation model over image and time-series tokens (section 3.3).

    Args:
        modalities: :class:`ModalitySpec` list (or dicts of its fields).
        dim: embedding width.
        encoder_depth, decoder_depth: transformer layers.
        num_heads: attention heads.
        mlp_ratio: MLP hidden ratio (SwiGLU, so the hidden width is ``2/3`` of it, as TerraMind).
        with_decoder: build the decoder (pretraining / generation); fine-tuning drops it (appendix A.2).
        drop_path: stochastic depth rate (0 in pretraining, appendix A.1; 0.5 in fine-tuning, appendix A.2), per
            block by TerraMind's linear decay rule ``linspace(0, drop_path, depth)``.
        drop: dropout after the attention projection of every block (TerraMind's ``drop_rate``; its gated MLP has
            none); 0 in pretraining, 0.25 in fine-tuning (appendix A.2 "dropout at 0.25").
        attn_drop: attention dropout (0 in pretraining, 0.3 in fine-tuning, appendix A.2).
    """

    def __init__(self, modalities: Sequence[ModalitySpec | Mapping[str, Any]], dim: int = 768,
                 encoder_depth: int = 12, decoder_depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 with_decoder: bool = True, drop_path: float = 0.0, drop: float = 0.0, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        for name, v in (("drop_path", drop_path), ("drop", drop), ("attn_drop", attn_drop)):
            if not 0.0 <= float(v) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        self.specs = _as_specs(modalities)
        self.names = [s.name for s in self.specs]
        self.dim = dim
        self.out_channels = [dim]
        norm = partial(LayerNorm, eps=1e-6, bias=False)
        block = dict(num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=False, proj_bias=False, mlp_bias=False,
                     act_layer=nn.SiLU, norm_layer=norm, gated_mlp=True)
        self.enc_tok = nn.ModuleDict({s.name: nn.Embedding(s.vocab_size, dim) for s in self.specs if not s.is_raw})
        #: linear patch projections of the raw (untokenized) image modalities, TerraMind's ``proj`` (no bias)
        self.enc_patch = nn.ModuleDict({s.name: nn.Linear(s.channels * s.patch_size**2, dim, bias=False)
                                        for s in self.specs if s.is_raw})
        self.enc_pos = nn.ParameterDict({s.name: nn.Parameter(torch.zeros(s.num_tokens, dim)) for s in self.specs})
        self.enc_mod = nn.Parameter(torch.zeros(len(self.specs), dim))
        dpr = [float(x) for x in torch.linspace(0, drop_path, encoder_depth)] if encoder_depth else []
        self.encoder = nn.ModuleList([Block(dim, drop_path=dpr[i], drop=drop, attn_drop=attn_drop, **block)
                                      for i in range(encoder_depth)])
        self.enc_norm = norm(dim)
        self.with_decoder = with_decoder
        if with_decoder:
            self.dec_tok = nn.ModuleDict({s.name: nn.Embedding(s.vocab_size, dim) for s in self.specs
                                          if s.kind == "seq"})
            self.dec_pos = nn.ParameterDict({s.name: nn.Parameter(torch.zeros(s.num_tokens, dim)) for s in self.specs
                                             if not s.is_raw})
            self.dec_mod = nn.Parameter(torch.zeros(len(self.specs), dim))
            self.mask_token = nn.Parameter(torch.zeros(dim))
            self.context_proj = nn.Linear(dim, dim)
            self.decoder = nn.ModuleList([DecoderBlock(dim, drop=drop, attn_drop=attn_drop, **block)
                                          for _ in range(decoder_depth)])
            self.dec_norm = norm(dim)
            self.heads = nn.ModuleDict({s.name: nn.Linear(dim, s.vocab_size) for s in self.specs if not s.is_raw})
        #: recompute encoder blocks in backward instead of storing their activations (memory, not results)
        self.activation_checkpointing = False
        #: absolute path of the pretraining checkpoint loaded by the registered builders (``None``: none)
        self.pretrained_source: str | None = None
        self._init_weights()

    def self_contained_args(self) -> dict[str, Any]:
        """Builder arguments of :func:`tsfusion_base` / :func:`tsfusion_tiny` that rebuild this model without its
        pretraining file (:mod:`terratorch_eoplugins.models.pretrained`); ``{}`` when none was read."""
        if self.pretrained_source is None:
            return {}
        return {"ckpt_path": None, "pretrained_from": self.pretrained_source}

    def _init_weights(self) -> None:
        """MAE-style init (appendix A.1): xavier-uniform linears, N(0, 0.02) embeddings."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for p in [*self.enc_pos.values(), self.enc_mod]:
            nn.init.normal_(p, std=0.02)
        if self.with_decoder:
            for p in [*self.dec_pos.values(), self.dec_mod, self.mask_token]:
                nn.init.normal_(p, std=0.02)

    # ------------------------------------------------------------------ helpers
    def spec(self, name: str) -> ModalitySpec:
        return self.specs[self.names.index(name)]

    def _check_tokens(self, tokens: Mapping[str, Tensor]) -> None:
        for name, t in tokens.items():
            if name not in self.names:
                raise KeyError(f"unknown modality {name!r}; the model has {self.names}")
            s = self.spec(name)
            if s.is_raw:
                p = s.patch_size
                if (t.ndim != 4 or t.shape[1] != s.channels or t.shape[2] % p or t.shape[3] % p
                        or (t.shape[2] // p) * (t.shape[3] // p) != s.num_tokens or not t.is_floating_point()):
                    raise ValueError(f"raw modality {name!r} must be float pixels [B, {s.channels}, H, W] with "
                                     f"(H/{p}) * (W/{p}) = {s.num_tokens} patches, got {tuple(t.shape)} ({t.dtype})")
                continue
            if t.ndim != 2 or t.shape[1] != s.num_tokens:
                raise ValueError(f"tokens[{name!r}] must be [B, {s.num_tokens}], got {tuple(t.shape)}")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= s.vocab_size):
                raise ValueError(f"tokens[{name!r}] must be ids in [0, {s.vocab_size}), got range "
                                 f"[{int(t.min())}, {int(t.max())}]")

    def embed(self, tokens: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Encoder embeddings of all tokens ``[B, N, D]`` (modality order of the model) and modality ids ``[N]``."""
        self._check_tokens(tokens)
        parts, ids = [], []
        for i, s in enumerate(self.specs):
            if s.name not in tokens:
                continue
            if s.is_raw:  # TerraMind's patchify order: "b d (nh ph) (nw pw) -> b (nh nw) (ph pw d)"
                x, p = tokens[s.name], s.patch_size
                bsz, c, h, w = x.shape
                x = x.reshape(bsz, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(bsz, -1, p * p * c)
                emb = self.enc_patch[s.name](x.to(self.enc_mod.dtype))
            else:
                emb = self.enc_tok[s.name](tokens[s.name])
            parts.append(emb + self.enc_pos[s.name] + self.enc_mod[i])
            ids.append(torch.full((s.num_tokens,), i, dtype=torch.long))
        if not parts:
            raise ValueError(f"no token of any modality given; expected some of {self.names}")
        return torch.cat(parts, 1), torch.cat(ids).to(parts[0].device)

    def run_encoder(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """Encoder blocks over embeddings ``x [B, N, D]``; ``valid [B, N]`` masks padding keys."""
        mask = None
        if valid is not None and not bool(valid.all()):
            n = x.shape[1]
            eye = torch.eye(n, dtype=torch.bool, device=x.device)
            mask = ~(valid[:, None, :] | eye[None])  # True = do not attend (TerraMind convention)
        for blk in self.encoder:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # recompute the block in backward (same dropout / drop-path draws: the RNG state is restored)
                x = torch.utils.checkpoint.checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        return self.enc_norm(x)

    def encode(self, tokens: Mapping[str, Tensor], input_masks: Mapping[str, Tensor] | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """Encode the (selected) tokens.

        Returns:
            ``(z [B, n, D], modality ids [B, n], valid [B, n])``; without ``input_masks`` every token is
            encoded, ``n = N`` and ``valid`` is all ``True``.
        """
        x, ids = self.embed(tokens)
        b = x.shape[0]
        ids = ids[None].expand(b, -1)
        if input_masks is None:
            valid = torch.ones(ids.shape, dtype=torch.bool, device=x.device)
            return self.run_encoder(x), ids, valid
        mask = torch.cat([input_masks[s.name] for s in self.specs if s.name in tokens], 1)
        order, valid = _pack(mask)
        x = torch.gather(x, 1, order[..., None].expand(-1, -1, x.shape[-1]))
        return self.run_encoder(x, valid), torch.gather(ids, 1, order), valid

    def forward(self, x: Mapping[str, Tensor], **kwargs: Any) -> list[Tensor]:
        """terratorch backbone contract: ``{modality: tokens [B, N_m]}`` -> ``[z [B, N, D]]`` (all tokens encoded)."""
        if not isinstance(x, Mapping):
            raise TypeError("TSFusionModel expects a dict {modality: LongTensor[B, N_m]} of token ids, got "
                            f"{type(x).__name__}")
        return [self.encode(x)[0]]

    # ------------------------------------------------------------------ decoder
    def _decoder_queries(self, targets: Mapping[str, Tensor], target_masks: Mapping[str, Tensor]
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Packed decoder queries ``[B, n, D]``, their modality ids, target ids, validity and positions."""
        parts, ids, tok, pos, masks = [], [], [], [], []
        for i, s in enumerate(self.specs):
            if s.name not in target_masks:
                continue
            if s.is_raw:
                raise ValueError(f"modality {s.name!r} is raw (untokenized): input only, never a target")
            t = targets[s.name]
            b = t.shape[0]
            q = self.mask_token + self.dec_pos[s.name] + self.dec_mod[i]
            q = q[None].expand(b, -1, -1)
            if s.kind == "seq":
                # previous *target* token of the same modality (targets are in time order): teacher forcing
                m = target_masks[s.name]
                idx = torch.arange(s.num_tokens, device=t.device)[None].expand(b, -1)
                last = torch.where(m, idx, torch.full_like(idx, -1))
                prev_pos = torch.cummax(last, dim=1).values  # last target position <= p
                prev_pos = torch.cat([torch.full_like(prev_pos[:, :1], -1), prev_pos[:, :-1]], 1)  # < p
                has_prev = prev_pos >= 0
                prev_tok = torch.gather(t, 1, prev_pos.clamp_min(0))
                q = q + self.dec_tok[s.name](prev_tok) * has_prev[..., None]
            parts.append(q)
            ids.append(torch.full((b, s.num_tokens), i, dtype=torch.long, device=t.device))
            tok.append(t)
            pos.append(torch.arange(s.num_tokens, device=t.device)[None].expand(b, -1))
            masks.append(target_masks[s.name])
        q, ids, tok, pos, mask = (torch.cat(v, 1) for v in (parts, ids, tok, pos, masks))
        order, valid = _pack(mask)
        q = torch.gather(q, 1, order[..., None].expand(-1, -1, q.shape[-1]))
        return q, torch.gather(ids, 1, order), torch.gather(tok, 1, order), valid, torch.gather(pos, 1, order)

    def run_decoder(self, q: Tensor, q_ids: Tensor, q_valid: Tensor, context: Tensor, c_valid: Tensor) -> Tensor:
        """Decoder blocks: self-attention within a modality (causal for ``seq`` modalities), cross-attention
        to the valid encoder tokens; returns the normalised decoder states ``[B, n, D]``."""
        n = q.shape[1]
        is_seq = torch.tensor([s.kind == "seq" for s in self.specs], device=q.device)[q_ids]  # [B, n]
        same = q_ids[:, :, None] == q_ids[:, None, :]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[None]
        allowed = same & q_valid[:, None, :] & (causal | ~is_seq[:, :, None])
        allowed = allowed | torch.eye(n, dtype=torch.bool, device=q.device)[None]
        sa_mask = ~allowed
        xa_allowed = c_valid[:, None, :].expand(-1, n, -1)
        xa_mask = ~xa_allowed
        ctx = self.context_proj(context)
        for blk in self.decoder:
            q = blk(q, ctx, sa_mask, xa_mask)
        return self.dec_norm(q)

    def correlation_loss(self, tokens: Mapping[str, Tensor], input_masks: Mapping[str, Tensor],
                         target_masks: Mapping[str, Tensor], emd_weight: float = 0.0) -> dict[str, Tensor]:
        """Modality-averaged cross-entropy of the target tokens (section 3.3, appendix A.1 ``mod`` loss).

        With ``emd_weight > 0``, modalities with ordinal tokens (``ModalitySpec.ordinal``) add
        ``emd_weight`` times the ordinal earth mover's distance (appendix A.1, "additional ordinal EMD loss for
        weather tokens"), :func:`ordinal_emd`.

        Returns ``{"loss": ..., "loss_<modality>": ..., "acc_<modality>": ...}`` for modalities with targets.
        """
        if not self.with_decoder:
            raise RuntimeError("this TSFusionModel was built with with_decoder=False (fine-tuning encoder)")
        for name, m in input_masks.items():
            if name in target_masks and bool((m & target_masks[name]).any()):
                raise ValueError(f"modality {name!r}: input and target masks overlap")
        ctx, _, c_valid = self.encode(tokens, input_masks)
        q, q_ids, q_tok, q_valid, _ = self._decoder_queries(tokens, target_masks)
        h = self.run_decoder(q, q_ids, q_valid, ctx, c_valid)
        out: dict[str, Tensor] = {}
        losses = []
        for i, s in enumerate(self.specs):
            sel = q_valid & (q_ids == i)
            if not bool(sel.any()):
                continue
            logits = self.heads[s.name](h[sel])
            ce = F.cross_entropy(logits, q_tok[sel])
            out[f"loss_{s.name}"] = ce
            out[f"acc_{s.name}"] = (logits.argmax(-1) == q_tok[sel]).float().mean()
            if emd_weight > 0 and s.ordinal > 0:
                emd = ordinal_emd(logits, q_tok[sel], s.ordinal)
                out[f"emd_{s.name}"] = emd
                ce = ce + emd_weight * emd
            losses.append(ce)
        if not losses:
            raise ValueError("no target token in the batch: every target budget was 0")
        out["loss"] = torch.stack(losses).mean()
        return out

    @torch.no_grad()
    def generate(self, tokens: Mapping[str, Tensor], target: str | Sequence[str], temperature: float = 0.0,
                 generator: torch.Generator | None = None, banned_ids: Sequence[int] = ()
                 ) -> Tensor | dict[str, Tensor]:
        """Generate all tokens of modality ``target`` (or of several) from the given modalities.

        Every given token is input. Sequence modalities are decoded autoregressively (one position per
        step under the causal mask); image modalities in one parallel pass. Several targets are decoded
        together: decoder self-attention never crosses modalities, so this equals decoding them one by
        one. ``temperature = 0`` is greedy; ``banned_ids`` (e.g. a tokenizer's [PAD]/[EOS]/[NULL]) are
        never produced.

        Returns:
            ``[B, N_target]`` token ids, or a dict of them when ``target`` is a list.
        """
        names = [target] if isinstance(target, str) else list(target)
        raw = [n for n in names if self.spec(n).is_raw]
        if raw:
            raise ValueError(f"raw (untokenized) modalities {raw} cannot be generated; they are input only")
        clash = [n for n in names if n in tokens]
        if clash:
            raise ValueError(f"target modalities {clash} must not be among the inputs {list(tokens)}")
        specs = [self.spec(n) for n in names]
        ctx, _, c_valid = self.encode(tokens)
        b = ctx.shape[0]
        out = {s.name: torch.zeros(b, s.num_tokens, dtype=torch.long, device=ctx.device) for s in specs}
        steps = max(s.num_tokens if s.kind == "seq" else 1 for s in specs)
        for p in range(steps):
            masks = {}
            for s in specs:
                m = torch.zeros(b, s.num_tokens, dtype=torch.bool, device=ctx.device)
                m[:, : (min(p, s.num_tokens - 1) + 1) if s.kind == "seq" else s.num_tokens] = True
                masks[s.name] = m
            q, q_ids, _, q_valid, q_pos = self._decoder_queries(out, masks)
            h = self.run_decoder(q, q_ids, q_valid, ctx, c_valid)
            for i, s in enumerate(self.specs):
                if s.name not in out or (s.kind == "seq" and p >= s.num_tokens) or (s.kind == "image" and p > 0):
                    continue
                sel = q_valid & (q_ids == i) & ((q_pos == p) if s.kind == "seq" else True)
                logits = self.heads[s.name](h[sel])
                if banned_ids:
                    logits[..., list(banned_ids)] = float("-inf")
                picked = _pick(logits, temperature, generator)
                if s.kind == "seq":
                    out[s.name][:, p] = picked
                else:
                    out[s.name] = picked.reshape(b, s.num_tokens)
        return out[names[0]] if isinstance(target, str) else out


def ordinal_emd(logits: Tensor, target: Tensor, num_ordinal: int) -> Tensor:
    """Ordinal earth mover's distance between ``softmax(logits)`` and one-hot targets over the first
    ``num_ordinal`` (ordered bin) ids: ``mean_k |CDF_p(k) - 1[k >= t]|`` averaged over targets with an ordinal id
    (special tokens after the bins are left to cross-entropy)."""
    ok = target < num_ordinal
    if not bool(ok.any()):
        return logits.new_zeros(())
    p = torch.softmax(logits[ok].float(), -1)[:, :num_ordinal]
    cdf = p.cumsum(-1)
    k = torch.arange(num_ordinal, device=logits.device)
    step = (k[None] >= target[ok][:, None]).float()
    return (cdf - step).abs().mean()


def _pick(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------- downstream
class TSFusionHead(nn.Module):
    """Prediction head of appendix A.2: ``y = MLP(z) + residual_scale * W_r z`` (``residual_scale = 0.1``).

    Args:
        in_dim: width of the pooled representation ``z``.
        num_outputs: outputs (1: log yield).
        hidden_dim: MLP hidden width.
        dropout: dropout inside the MLP (appendix A.2 fine-tuning: 0.25).
        residual_scale: scale of the linear residual path.
    """

    def __init__(self, in_dim: int, num_outputs: int = 1, hidden_dim: int = 256, dropout: float = 0.25,
                 residual_scale: float = 0.1) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, num_outputs))
        self.residual = nn.Linear(in_dim, num_outputs, bias=False)
        self.residual_scale = float(residual_scale)
        self.out_channels = num_outputs

    def forward(self, z: Tensor) -> Tensor:
        return self.mlp(z) + self.residual_scale * self.residual(z)


def pool_tokens(z: Tensor, groups: Tensor, mode: Literal["mp", "mmp"], num_groups: int) -> Tensor:
    """Pool token embeddings of one (grid, time) sample: ``z [S, N, D]``, ``groups [N]`` (pooling group id).

    * ``mp``: mean over all tokens -> ``[S, D]``.
    * ``mmp``: mean within each group, concatenated in group order -> ``[S, num_groups * D]`` (section 4).
    """
    if mode == "mp":
        return z.mean(1)
    if mode != "mmp":
        raise ValueError(f"pooling must be 'mp' or 'mmp', got {mode!r}")
    parts = []
    for g in range(num_groups):
        sel = groups == g
        if not bool(sel.any()):
            raise ValueError(f"modality mean pooling: no token of pooling group {g}")
        parts.append(z[:, sel].mean(1))
    return torch.cat(parts, -1)


class TSFusionRegressor(nn.Module):
    """County-level regression (appendix A.2 / Fig. 4): encoder per (grid, time) sample, MP or MMP over the
    tokens, mean over the county's valid grids and dates, :class:`TSFusionHead`.

    ``forward(tokens, valid)``: ``tokens[m]`` is ``[B, S, N_m]`` (``S = T * G`` samples per county),
    ``valid [B, S]`` marks real (not padded) samples. Returns ``[B, num_outputs]``.
    """

    def __init__(self, encoder: TSFusionModel, pooling: Literal["mp", "mmp"] = "mmp", num_outputs: int = 1,
                 hidden_dim: int = 256, dropout: float = 0.25, residual_scale: float = 0.1,
                 modalities: Sequence[str] | None = None) -> None:
        super().__init__()
        if pooling not in ("mp", "mmp"):
            raise ValueError(f"pooling must be 'mp' or 'mmp', got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling
        self.modalities = list(modalities) if modalities is not None else list(encoder.names)
        unknown = [m for m in self.modalities if m not in encoder.names]
        if unknown:
            raise ValueError(f"modalities {unknown} are not in the encoder's {encoder.names}")
        ordered = [s for s in encoder.specs if s.name in self.modalities]
        self.group_names = list(dict.fromkeys(s.pool_group for s in ordered))
        gid = []
        for s in ordered:
            gid += [self.group_names.index(s.pool_group)] * s.num_tokens
        self.register_buffer("token_groups", torch.tensor(gid, dtype=torch.long), persistent=False)
        width = encoder.dim * (len(self.group_names) if pooling == "mmp" else 1)
        self.head = TSFusionHead(width, num_outputs, hidden_dim, dropout, residual_scale)

    def embed_samples(self, tokens: Mapping[str, Tensor]) -> Tensor:
        """Encoder input embeddings ``[B*S, N, D]`` (exposed for gradient sensitivity)."""
        flat = {m: tokens[m].reshape(-1, *tokens[m].shape[2:])
                if self.encoder.spec(m).is_raw else tokens[m].reshape(-1, tokens[m].shape[-1])
                for m in self.modalities}
        return self.encoder.embed(flat)[0]

    def forward_embeddings(self, x: Tensor, valid: Tensor) -> Tensor:
        """Prediction from encoder input embeddings ``x [B*S, N, D]`` and ``valid [B, S]``."""
        b, s = valid.shape
        z = self.encoder.run_encoder(x)
        pooled = pool_tokens(z, self.token_groups, self.pooling, len(self.group_names)).reshape(b, s, -1)
        w = valid.to(pooled.dtype)[..., None]
        county = (pooled * w).sum(1) / w.sum(1).clamp_min(1.0)
        return self.head(county)

    def forward(self, tokens: Mapping[str, Tensor], valid: Tensor) -> Tensor:
        missing = [m for m in self.modalities if m not in tokens]
        if missing:
            raise KeyError(f"tokens lack modalities {missing}")
        if not bool(valid.any(1).all()):
            raise ValueError("every county needs at least one valid (grid, date) sample; a county with no grids "
                             "cannot be predicted")
        return self.forward_embeddings(self.embed_samples(tokens), valid)


# -------------------------------------------------------------------------------- registration
#: keyword arguments of the tsfusion_* builders
_BUILDER_ARGS = ("modalities", "pretrained", "ckpt_path", "pretrained_from", "mlp_ratio", "with_decoder", "drop_path",
                 "drop", "attn_drop", "terramind_ckpt_path", "terramind_image_modality", "terramind_raw_modality")


def _build(name: str, modalities: Any, pretrained: bool, ckpt_path: str | None, pretrained_from: str | None,
           **kwargs: Any) -> TSFusionModel:
    check_builder_kwargs(name, {k: v for k, v in kwargs.items() if k not in _BUILDER_ARGS}, _BUILDER_ARGS)
    tm_path = kwargs.pop("terramind_ckpt_path", None)
    tm_kw = {k[len("terramind_"):]: kwargs.pop(k) for k in ("terramind_image_modality", "terramind_raw_modality")
             if k in kwargs}
    if pretrained and not ckpt_path and not pretrained_from and not tm_path:
        raise ValueError("no public TS-fusion weights exist: pass ckpt_path to a tsfusion pretraining checkpoint, "
                         "terramind_ckpt_path to a local TerraMind_v1_base.pt (warm start), or pretrained: false")
    if tm_path and ckpt_path:
        raise ValueError("give either ckpt_path (a TS-fusion checkpoint) or terramind_ckpt_path (a TerraMind warm "
                         "start), not both")
    dim, encoder_depth, decoder_depth, num_heads = MODEL_SIZES[name]
    mods = default_modalities() if modalities is None else modalities
    model = TSFusionModel(mods, dim=dim, encoder_depth=encoder_depth, decoder_depth=decoder_depth,
                          num_heads=num_heads, **kwargs)
    if ckpt_path:
        load_tsfusion_weights(model, ckpt_path)
        model.pretrained_source = resolve_source(ckpt_path)
    elif tm_path:
        load_terramind_weights(model, tm_path, **tm_kw)
        model.pretrained_source = resolve_source(tm_path)
    elif pretrained_from:
        model.pretrained_source = pretrained_from
        log_restored(name, pretrained_from)
    else:
        warn_no_pretrained("TS fusion", f"model_args.{PRETRAINED_FLAG}", f"the {name} encoder is random",
                           "pass a TS-fusion pretraining checkpoint (configs/tsfusion_pretrain.yaml) as "
                           f"--model.init_args.model_args.{PRETRAINED_FLAG}")
    return model


def load_tsfusion_weights(model: TSFusionModel, path: str, strict_encoder: bool = True) -> list[str]:
    """Load the correlation model weights of a pretraining checkpoint (``torch.load(weights_only=True)``).

    Accepts a Lightning checkpoint (``state_dict`` with ``model.`` prefixes) or a plain state dict.
    Decoder weights are skipped when ``model`` has no decoder. Returns the loaded key names.
    """
    blob = read_checkpoint(path, "TS-fusion pretraining")
    state = blob.get("state_dict", blob)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict or a Lightning checkpoint with 'state_dict'")
    prefix = "model."
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} or dict(state)
    own = model.state_dict()
    sub = {k: v for k, v in sub.items() if k in own}
    enc_keys = [k for k in own if k.startswith(("enc_", "encoder."))]
    missing = [k for k in enc_keys if k not in sub]
    if strict_encoder and missing:
        raise ValueError(f"{path}: checkpoint lacks encoder weights {missing[:5]} (is it a tsfusion pretraining "
                         "checkpoint?)")
    bad = [k for k, v in sub.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"{path}: shape mismatch for {bad[:5]} (e.g. {bad[0]}: checkpoint "
                         f"{tuple(sub[bad[0]].shape)} vs model {tuple(own[bad[0]].shape)}); use the same "
                         "modalities, tokenizers and model size as in pretraining")
    model.load_state_dict(sub, strict=False)
    return sorted(sub)


#: TerraMind state-dict names (``TerraMind`` / ``TerraMindViT`` of terratorch 1.2.11) -> names in TSFusionModel
_TERRAMIND_RENAMES = (("encoder_norm.", "enc_norm."), ("decoder_norm.", "dec_norm."),
                      ("decoder_proj_context.", "context_proj."))


def terramind_key_map(model: TSFusionModel, image_modality: str = "tok_sen2l2a@224",
                      raw_modality: str = "untok_sen2rgb@224", image_name: str = "image") -> dict[str, str]:
    """``{TSFusionModel key: TerraMind key}`` of every tensor the two models share (by structure, not by shape).

    Shared: the encoder blocks (``encoder.<i>.*``) and ``encoder_norm``; with a decoder, the decoder blocks
    (``decoder.<i>.*``), ``decoder_norm``, ``decoder_proj_context`` and the ``mask_token``; the embeddings of the
    tokenized image modality ``image_modality`` (encoder token embedding, position and modality embeddings; decoder
    position and modality embeddings and ``to_logits`` -> the image head's weight) and of the raw image modality
    ``raw_modality`` (patch projection, position and modality embeddings, for this model's ``raw`` modality).
    Not shared (stay randomly initialised): weather and coordinate modalities (TerraMind has no weather; its
    ``coords`` are 30K-vocabulary text tokens), the weather decoder token embeddings, the bias of every head
    (TerraMind's ``to_logits`` has none) and the heads of non-image modalities.
    """
    own = model.state_dict()
    out: dict[str, str] = {}
    for k in own:
        if k.startswith(("encoder.", "decoder.")):
            out[k] = k
        for theirs, mine in _TERRAMIND_RENAMES:
            if k.startswith(mine):
                out[k] = theirs + k[len(mine):]
    if "mask_token" in own:
        out["mask_token"] = "mask_token"
    for i, s in enumerate(model.specs):
        if s.name == image_name and s.kind == "image":
            tm = image_modality
            out[f"enc_tok.{s.name}.weight"] = f"encoder_embeddings.{tm}.token_emb.weight"
            out[f"enc_pos.{s.name}"] = f"encoder_embeddings.{tm}.pos_emb"
            out[f"enc_mod#{i}"] = f"encoder_embeddings.{tm}.mod_emb"
            if model.with_decoder:
                out[f"dec_pos.{s.name}"] = f"decoder_embeddings.{tm}.pos_emb"
                out[f"dec_mod#{i}"] = f"decoder_embeddings.{tm}.mod_emb"
                out[f"heads.{s.name}.weight"] = f"decoder_embeddings.{tm}.to_logits.weight"
        elif s.is_raw:
            tm = raw_modality
            out[f"enc_patch.{s.name}.weight"] = f"encoder_embeddings.{tm}.proj.weight"
            out[f"enc_pos.{s.name}"] = f"encoder_embeddings.{tm}.pos_emb"
            out[f"enc_mod#{i}"] = f"encoder_embeddings.{tm}.mod_emb"
    return out


def load_terramind_weights(model: TSFusionModel, path: str, image_modality: str = "tok_sen2l2a@224",
                           raw_modality: str = "untok_sen2rgb@224", image_name: str = "image",
                           state: Mapping[str, Tensor] | None = None) -> dict[str, list[str]]:
    """Warm start (section 4, "we warm start our pretraining by leveraging ... backbone weights from TerraMind"): copy
    the shared tensors of a TerraMind checkpoint into ``model`` (:func:`terramind_key_map`).

    ``path`` is the local file terratorch's ``terramind_v1_base`` loads (``TerraMind_v1_base.pt``, a plain state dict of
    the encoder-decoder ``TerraMind``), or a state dict saved from ``terramind_v1_base`` (encoder only: then the decoder
    stays random and is reported as missing). Read with ``torch.load(weights_only=True)``; never downloads.
    ``(1, N, D)`` position and ``(1, 1, D)`` modality embeddings and the ``(1, 1, D)`` mask token are squeezed.

    Returns ``{"loaded": model keys, "missing": model keys the map names but the file lacks, "not_shared": model
    keys outside the map, "unused": file keys not loaded}``.

    Raises:
        ValueError: a shared tensor whose shape differs (naming both keys and shapes), or a file with no encoder block.
    """
    if state is None:
        blob = read_checkpoint(path, "TerraMind")
        state = blob.get("state_dict", blob) if isinstance(blob, Mapping) else blob
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a TerraMind state dict (TerraMind_v1_base.pt), got {type(state).__name__}")
    state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
    if not any(k.startswith("encoder.0.") for k in state):
        raise ValueError(f"{path}: no 'encoder.0.*' weights; expected the state dict terratorch's terramind_v1_base "
                         "loads (TerraMind_v1_base.pt)")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("encoder.") and k.split(".")[1].isdigit())
    if depth != len(model.encoder):
        raise ValueError(f"{path}: TerraMind encoder has {depth} blocks, this model {len(model.encoder)}; use "
                         "tsfusion_base (12 + 12 layers, dim 768) for terramind_v1_base")
    own = model.state_dict()
    mapping = terramind_key_map(model, image_modality, raw_modality, image_name)
    loaded, missing = [], []
    new: dict[str, Tensor] = {}
    mods = {}
    for mine, theirs in mapping.items():
        if theirs not in state:
            missing.append(mine)
            continue
        src = state[theirs]
        if mine.startswith(("enc_mod#", "dec_mod#")):
            name, idx = mine.split("#")
            target = own[name][int(idx)]
        else:
            target = own[mine]
        while src.ndim > target.ndim and src.shape[0] == 1:  # (1, N, D) -> (N, D), (1, 1, D) -> (D)
            src = src[0]
        if src.shape != target.shape:
            raise ValueError(f"{path}: TerraMind key {theirs!r} has shape {tuple(state[theirs].shape)} but "
                             f"TSFusionModel key {mine!r} needs {tuple(target.shape)} (dim, vocabulary, token grid "
                             "or patch channels differ)")
        if mine.startswith(("enc_mod#", "dec_mod#")):
            mods.setdefault(name, own[name].clone())[int(idx)] = src
        else:
            new[mine] = src.to(target.dtype)
        loaded.append(mine)
    new.update(mods)
    model.load_state_dict(new, strict=False)
    used = {mapping[k] for k in loaded}
    report = {"loaded": sorted(loaded), "missing": sorted(missing),
              "not_shared": sorted(k for k in own if k not in mapping and not any(
                  m.startswith(k + "#") for m in mapping)),
              "unused": sorted(k for k in state if k not in used)}
    logger.info("TerraMind warm start from %s: %d tensors loaded, %d missing in the file, %d model tensors not shared "
                "(e.g. %s)", path, len(loaded), len(missing), len(report["not_shared"]), report["not_shared"][:4])
    return report


@TERRATORCH_BACKBONE_REGISTRY.register
def tsfusion_base(modalities: Any = None, pretrained: bool = False, ckpt_path: str | None = None,
                  pretrained_from: str | None = None, **kwargs: Any) -> TSFusionModel:
    """Paper size (appendix A.1): 12 encoder + 12 decoder layers, dim 768, 12 heads, SwiGLU.

    ``ckpt_path``: TS-fusion pretraining checkpoint; ``pretrained_from`` is written by self-contained checkpoints
    and never read; ``kwargs``: ``mlp_ratio``, ``with_decoder``, ``drop_path``, ``drop``, ``attn_drop``, and the
    TerraMind warm start (section 4): ``terramind_ckpt_path`` (a local ``TerraMind_v1_base.pt``, the file terratorch's
    ``terramind_v1_base`` loads; :func:`load_terramind_weights`), ``terramind_image_modality`` (default
    ``tok_sen2l2a@224``) and ``terramind_raw_modality`` (default ``untok_sen2rgb@224``); others are errors.
    """
    return _build("tsfusion_base", modalities, pretrained, ckpt_path, pretrained_from, **kwargs)


@TERRATORCH_BACKBONE_REGISTRY.register
def tsfusion_tiny(modalities: Any = None, pretrained: bool = False, ckpt_path: str | None = None,
                  pretrained_from: str | None = None, **kwargs: Any) -> TSFusionModel:
    """Tiny variant for tests and CPU runs: 2 + 2 layers, dim 64, 4 heads; arguments as :func:`tsfusion_base`."""
    return _build("tsfusion_tiny", modalities, pretrained, ckpt_path, pretrained_from, **kwargs)


@TERRATORCH_DECODER_REGISTRY.register
def tsfusion_head(embed_dim: Sequence[int], num_outputs: int = 1, hidden_dim: int = 256, dropout: float = 0.25,
                  residual_scale: float = 0.1, **kwargs: Any) -> nn.Module:
    """CropNet head as a terratorch decoder: mean over tokens of the last feature, then :class:`TSFusionHead`
    (other keyword arguments are errors)."""
    check_builder_kwargs("tsfusion_head", kwargs, ("num_outputs", "hidden_dim", "dropout", "residual_scale"),
                         prefix="decoder_")
    return _PooledHead(int(list(embed_dim)[-1]), num_outputs, hidden_dim, dropout, residual_scale)


class _PooledHead(nn.Module):
    def __init__(self, dim: int, num_outputs: int, hidden_dim: int, dropout: float, residual_scale: float) -> None:
        super().__init__()
        self.head = TSFusionHead(dim, num_outputs, hidden_dim, dropout, residual_scale)
        self.out_channels = num_outputs

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        z = features[-1]
        if z.ndim == 3:
            z = z.mean(1)
        elif z.ndim == 4:
            z = z.mean((2, 3))
        return self.head(z)
