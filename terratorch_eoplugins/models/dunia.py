"""DUNIA (Fayad et al., ICML 2025): pixel-sized embeddings by cross-modal alignment (section 3, appendices A, E).

Pre-trained image model :class:`DUNIA` (``I [B, C, H, W]`` -> ``O^V, O^H [B, D_p, H, W]``):

* **Patch embedding**: ``Conv2d(C, D, P, stride=P)`` (appendix A.1), ``P = 8``; any ``H, W`` divisible by ``P``.
  Position: a fixed 2-D sine-cosine embedding computed for the actual token grid (the paper is silent on
  position encoding; a fixed one keeps "any input size" without interpolating a learned table).
* **Encoder**: 16 pre-norm transformer layers in 4 blocks of 4 (``D = 512``, 8 heads, attention dropout 0.1),
  FFN = two linear layers with a 2048-wide GeGLU (``W2 (GELU(x W_g) * x W_u)``), dropout 0.1 (appendix E.1).
  The token map after each block feeds the decoders.
* **Two DPT-style decoders** (:class:`~terratorch_eoplugins.nn.dpt.DPTDecoder`), vertical and horizontal, giving
  ``O_d`` ``[B, D_p 2^(d-1), H/2^(d-1), W/2^(d-1)]`` for ``d = 1..4`` with two neighborhood-attention layers
  (window 19, clamped to the map) on ``O_1``; ``O^V = O^V_1`` and ``O^H = O^H_1`` (``D_p = 64``). Ablations
  (appendix H, architecture keys): ``na_layers`` 0 / 1 / 2 (0 = a convolutional output layer, H.4) and
  ``shared_decoder`` (one decoder for ``O^V`` and ``O^H``, H.2); the paper's 2 and ``False`` by default.
* **Pretraining-only heads** (dropped by :meth:`DUNIA.drop_pretraining_heads` and never loaded by the
  terratorch backbone): a projection head per ``O^H_d`` (``1x1 conv D_pd -> 2 D_pd``, ReLU, ``1x1 conv -> D_pd``;
  appendix A.1 says "expands by two, projects back"; we project back to the level's own width ``D_pd`` so that
  the hierarchical VICReg compares ``M_d x D_pd`` matrices as in Eq. 1), and the 1x1 convolution that
  reconstructs ``I`` from ``O^H`` (the mono-temporal MSE of Eq. 2).

Pretraining container :class:`DUNIAPretrainModel`: ``image`` (:class:`DUNIA`), ``temporal``
(:class:`~terratorch_eoplugins.nn.convlstm.MultiTemporalAE`, two NA layers on ``O^T_1`` and a projection head
per ``O^T_d``, section 3.3) and ``waveform`` (:class:`~terratorch_eoplugins.nn.waveform.WaveformAutoencoder`;
its :meth:`embed` gives ``O^W``: channel mean of ``z_e`` + linear to ``D_p``).

terratorch: backbones ``dunia_base`` / ``dunia_tiny`` (registered factories returning :class:`DUNIABackbone`;
``out_channels = [D_p, D_p]``, ``forward`` returns ``[O^V, O^H]``; ``pretrained=True`` needs a local
``ckpt_path``; ``lowshot=True`` freezes everything but the last NA layer of each decoder, section 4.1.2) and the
decoder ``dunia_lowshot_head`` (first of the two 1x1 convolutions of the low-shot head; terratorch's task head
adds the second). The bare image model of a variant is :func:`build_dunia`; :func:`prepare_dunia_input` turns a
batch ``image`` (series, modality dict, other band order) into DUNIA's ``[B, C, H, W]`` input.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from terratorch.registry import TERRATORCH_BACKBONE_REGISTRY, TERRATORCH_DECODER_REGISTRY
from torch import Tensor, nn

from terratorch_eoplugins.errors import check_model_input
from terratorch_eoplugins.models._checkpoint import read_state_dict
from terratorch_eoplugins.models.pretrained import (
    PRETRAINED_FLAG,
    check_builder_kwargs,
    log_restored,
    resolve_source,
    warn_no_pretrained,
)
from terratorch_eoplugins.nn.convlstm import MultiTemporalAE
from terratorch_eoplugins.nn.dpt import DPTDecoder
from terratorch_eoplugins.nn.neighborhood_attention import NeighborhoodAttention2D

__all__ = [
    "DUNIA", "DUNIABackbone", "DUNIALowShotHead", "DUNIAPretrainModel", "DUNIA_VARIANTS", "GeGLUFeedForward",
    "ProjectionHead", "TEMPORAL_REDUCTIONS", "TransformerLayer", "architecture_overrides", "build_dunia",
    "conv_output_layers", "dunia_base",
    "dunia_lowshot_head",
    "dunia_tiny", "load_dunia_checkpoint", "load_dunia_pretrain_model", "prepare_dunia_input", "sincos_2d",
]

logger = logging.getLogger("terratorch_eoplugins.models.dunia")

REGISTERED = {"backbone": ["dunia_base", "dunia_tiny"], "decoder": ["dunia_lowshot_head"]}

#: Architecture of each variant (keyword arguments of :class:`DUNIA`). ``base`` = the paper (appendix E.1);
#: ``tiny`` = a CPU-sized variant for tests and the synthetic world.
DUNIA_VARIANTS: dict[str, dict[str, Any]] = {
    "base": dict(in_channels=14, patch_size=8, embed_dim=512, depth=16, num_blocks=4, num_heads=8, ffn_dim=2048,
                 dropout=0.1, out_dim=64, num_levels=4, na_kernel=19, na_heads=4, na_layers=2, shared_decoder=False),
    "tiny": dict(in_channels=14, patch_size=8, embed_dim=64, depth=4, num_blocks=4, num_heads=4, ffn_dim=128,
                 dropout=0.1, out_dim=16, num_levels=4, na_kernel=7, na_heads=2, na_layers=2, shared_decoder=False),
}


def conv_output_layers(dim: int) -> nn.ModuleList:
    """The convolutional output layer of appendix H.4's "CNN" ablation (``na_layers=0``), in place of the two NA
    layers on ``O_1``: a 3x3 Conv-BatchNorm-ReLU then a 3x3 convolution (linear, so that ``O_1`` keeps signed
    values for the cosine retrieval), ``D_p -> D_p``. The paper does not detail its convolutional layers."""
    return nn.ModuleList([nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.ReLU(inplace=True)),
                          nn.Conv2d(dim, dim, 3, padding=1)])


def sincos_2d(dim: int, h: int, w: int, device: torch.device | None = None) -> Tensor:
    """Fixed 2-D sine-cosine position embedding ``[h*w, dim]`` (half the channels per axis; ``dim % 4 == 0``)."""
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be divisible by 4, got {dim}")
    q = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(q, device=device, dtype=torch.float32) / q))
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    oy, ox = ys.reshape(-1, 1) * omega, xs.reshape(-1, 1) * omega
    return torch.cat([oy.sin(), oy.cos(), ox.sin(), ox.cos()], 1)


class GeGLUFeedForward(nn.Module):
    """``W_2 (GELU(x W_g) * (x W_u))``: the GeGLU feed-forward (Shazeer, 2020) with hidden width ``ffn_dim``."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.w_in = nn.Linear(dim, 2 * ffn_dim)
        self.drop = nn.Dropout(dropout)
        self.w_out = nn.Linear(ffn_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        u, g = self.w_in(x).chunk(2, -1)
        return self.w_out(self.drop(F.gelu(g) * u))


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: ``x + Drop(MHSA(LN x))``, then ``x + Drop(GeGLU(LN x))``."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"TransformerLayer: embed_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = GeGLUFeedForward(dim, ffn_dim, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ffn(self.norm2(x)))


class ProjectionHead(nn.Sequential):
    """Two-layer 1x1-conv projection head ``C -> hidden -> out`` with ReLU between (appendix A.1)."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int) -> None:
        super().__init__(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, out_channels, 1))


class DUNIA(nn.Module):
    """DUNIA's pre-trained image model: ``I [B, C, H, W]`` -> ``O^V, O^H [B, D_p, H, W]`` (+ per-level maps).

    Args:
        in_channels: ``C`` (paper: 14 = 12 S2 bands + S1 VV, VH).
        patch_size: ``P`` (paper: 8; a power of two).
        embed_dim: ``D`` (paper: 512).
        depth: transformer layers (paper: 16).
        num_blocks: transformer blocks (paper: 4 of 4 layers); one decoder level per block.
        num_heads: attention heads (paper: 8).
        ffn_dim: GeGLU hidden width (paper: 2048).
        dropout: dropout and attention dropout (paper: 0.1).
        out_dim: ``D_p`` (paper: 64).
        num_levels: decoder levels (= ``num_blocks``).
        na_kernel: NA window (paper: 19, clamped to the map size).
        na_heads: heads of the NA layers.
        na_layers: neighborhood-attention layers on ``O_1`` of each decoder (paper: 2; appendix H.4's ablation:
            ``0`` = a convolutional output layer instead, :func:`conv_output_layers`; ``1``).
        shared_decoder: one decoder gives both ``O^V`` and ``O^H`` (appendix H.2's ablation; paper: ``False``, two
            separate decoders).
        pretraining_heads: build the projection heads of ``O^H_d`` and the reconstruction of ``I``.
        variant: name recorded in checkpoints (``load_dunia_checkpoint`` checks it).
    """

    def __init__(self, in_channels: int = 14, patch_size: int = 8, embed_dim: int = 512, depth: int = 16,
                 num_blocks: int = 4, num_heads: int = 8, ffn_dim: int = 2048, dropout: float = 0.1,
                 out_dim: int = 64, num_levels: int = 4, na_kernel: int = 19, na_heads: int = 4, na_layers: int = 2,
                 shared_decoder: bool = False, pretraining_heads: bool = True, variant: str = "custom") -> None:
        super().__init__()
        if depth % num_blocks:
            raise ValueError(f"DUNIA: depth={depth} must be a multiple of num_blocks={num_blocks}")
        if num_levels != num_blocks:
            raise ValueError(f"DUNIA: one decoder level per transformer block: num_levels={num_levels} must equal "
                             f"num_blocks={num_blocks}")
        if patch_size < 1 or patch_size & (patch_size - 1):
            raise ValueError(f"DUNIA: patch_size must be a power of two, got {patch_size}")
        if na_layers not in (0, 1, 2):
            raise ValueError(f"DUNIA: na_layers must be 0 (convolutional output layer), 1 or 2, got {na_layers}")
        self.config = dict(in_channels=in_channels, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                           num_blocks=num_blocks, num_heads=num_heads, ffn_dim=ffn_dim, dropout=dropout,
                           out_dim=out_dim, num_levels=num_levels, na_kernel=na_kernel, na_heads=na_heads,
                           na_layers=na_layers, shared_decoder=bool(shared_decoder))
        self.variant = variant
        self.in_channels, self.patch_size, self.embed_dim, self.out_dim = in_channels, patch_size, embed_dim, out_dim
        self.num_levels = num_levels
        self.level_dims = [out_dim * 2 ** d for d in range(num_levels)]
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.pos_drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList([TransformerLayer(embed_dim, num_heads, ffn_dim, dropout) for _ in range(depth)])
        self.block_norms = nn.ModuleList([nn.LayerNorm(embed_dim) for _ in range(num_blocks)])
        self.layers_per_block = depth // num_blocks
        dec = dict(dim=embed_dim, out_dim=out_dim, patch_size=patch_size, num_levels=num_levels, na_layers=na_layers,
                   na_kernel=na_kernel, na_heads=na_heads, dropout=0.0)
        self.decoder_v = self._decoder(dec)
        # appendix H.2: a shared decoder is the same module under both names (O^V = O^H)
        self.decoder_h = self.decoder_v if shared_decoder else self._decoder(dec)
        self.projection_heads: nn.ModuleList | None = None
        self.reconstruction_head: nn.Module | None = None
        if pretraining_heads:
            self.projection_heads = nn.ModuleList([ProjectionHead(c, 2 * c, c) for c in self.level_dims])
            self.reconstruction_head = nn.Conv2d(out_dim, in_channels, 1)

    @staticmethod
    def _decoder(kwargs: dict[str, Any]) -> DPTDecoder:
        dec = DPTDecoder(**kwargs)
        if kwargs["na_layers"] == 0:  # the output layers applied to O_1 (DPTDecoder runs its `na` list on O_1)
            dec.na = conv_output_layers(kwargs["out_dim"])
        return dec

    # ------------------------------------------------------------------------------------ encoder
    def check_input(self, image: Tensor) -> None:
        """Raise a clear error for a non-``[B, C, H, W]`` input or ``H, W`` not divisible by ``P``."""
        if not isinstance(image, Tensor) or image.ndim != 4:
            raise ValueError(f"DUNIA expects an image [B, {self.in_channels}, H, W], got "
                             f"{tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}")
        if image.shape[1] != self.in_channels:
            raise ValueError(f"DUNIA was built for {self.in_channels} input channels, got {image.shape[1]}")
        h, w = image.shape[-2:]
        if h % self.patch_size or w % self.patch_size or h == 0 or w == 0:
            raise ValueError(f"DUNIA: input height and width must be positive multiples of the patch size "
                             f"{self.patch_size}, got {h} x {w}")
        check_model_input(image, "DUNIA", min_size=self.patch_size)

    def encode(self, image: Tensor) -> list[Tensor]:
        """Token maps ``[B, D, H/P, W/P]`` after each transformer block (shallow to deep)."""
        self.check_input(image)
        x = self.patch_embed(image)
        b, d, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2) + sincos_2d(d, gh, gw, x.device).to(x.dtype)
        x = self.pos_drop(x)
        taps = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if (i + 1) % self.layers_per_block == 0:
                t = self.block_norms[len(taps)](x)
                taps.append(t.transpose(1, 2).reshape(b, d, gh, gw))
        return taps

    # ------------------------------------------------------------------------------------ outputs
    def forward_embeddings(self, image: Tensor) -> dict[str, Any]:
        """``{"vertical": O^V, "horizontal": O^H}`` ``[B, D_p, H, W]`` plus ``"vertical_levels"`` and
        ``"horizontal_levels"`` (``[O_1, ..., O_4]``, ``O_d`` ``[B, D_p 2^(d-1), H/2^(d-1), W/2^(d-1)]``)."""
        taps = self.encode(image)
        v = self.decoder_v(taps)
        h = self.decoder_h(taps)
        return {"vertical": v[0], "horizontal": h[0], "vertical_levels": v, "horizontal_levels": h}

    def forward(self, image: Tensor) -> dict[str, Any]:
        """Same as :meth:`forward_embeddings`."""
        return self.forward_embeddings(image)

    def project_horizontal(self, levels: Sequence[Tensor]) -> list[Tensor]:
        """Projection heads on ``O^H_d`` (pretraining only)."""
        if self.projection_heads is None:
            raise RuntimeError("this DUNIA model has no projection heads (pretraining_heads=False or dropped)")
        return [head(x) for head, x in zip(self.projection_heads, levels)]

    def reconstruct(self, horizontal: Tensor) -> Tensor:
        """``I_hat`` from ``O^H`` (pretraining only, mono-temporal MSE of Eq. 2)."""
        if self.reconstruction_head is None:
            raise RuntimeError("this DUNIA model has no reconstruction head (pretraining_heads=False or dropped)")
        return self.reconstruction_head(horizontal)

    def drop_pretraining_heads(self) -> DUNIA:
        """Remove the projection and reconstruction heads (section 3.1: discarded after pretraining)."""
        self.projection_heads = None
        self.reconstruction_head = None
        return self

    def lowshot_parameters(self) -> list[nn.Parameter]:
        """Parameters trained in low-shot fine-tuning: the last NA layer of each decoder (section 4.1.2; the last
        output layer with ``na_layers`` 0 or 1; once with a shared decoder)."""
        params = [*self.decoder_v.na[-1].parameters(), *self.decoder_h.na[-1].parameters()]
        return list({id(p): p for p in params}.values())


def _variant_kwargs(variant: str, **kw: Any) -> dict[str, Any]:
    if variant not in DUNIA_VARIANTS:
        raise ValueError(f"unknown DUNIA variant {variant!r}: expected one of {list(DUNIA_VARIANTS)}")
    cfg = dict(DUNIA_VARIANTS[variant])
    cfg.update(kw)
    return cfg


def build_dunia(variant: str = "base", pretraining_heads: bool = True, **overrides: Any) -> DUNIA:
    """The bare :class:`DUNIA` image model of ``variant`` (:data:`DUNIA_VARIANTS`: ``"base"`` = the paper, appendix
    E.1; ``"tiny"`` = CPU-sized, ``D = 64``, 4 layers, ``D_p = 16``, NA window 7), randomly initialised;
    ``overrides`` change its architecture. The terratorch backbones are :func:`dunia_base` / :func:`dunia_tiny`."""
    return DUNIA(**_variant_kwargs(variant, **overrides), pretraining_heads=pretraining_heads, variant=variant)


# ======================================================================================== input preparation
#: the temporal reductions :func:`prepare_dunia_input` offers for ``[B, C, T, H, W]`` series
TEMPORAL_REDUCTIONS = ("median", "mean", "first", "last")


def _reduce_time(x: Tensor, how: str | None, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.ndim == 4:
        return x
    if x.ndim != 5:
        raise ValueError(f"{name}: expected [B, C, H, W] or [B, C, T, H, W], got {tuple(x.shape)}")
    if how is None:
        raise ValueError(f"DUNIA takes one composite image [B, C, H, W]; got a series {tuple(x.shape)} for {name}: "
                         "set temporal_reduce: median (or mean)")
    if x.shape[2] == 0:
        raise ValueError(f"{name}: the series has T = 0 dates")
    if how == "median":
        return x.median(dim=2).values
    if how == "mean":
        return x.mean(dim=2)
    if how == "first":
        return x[:, :, 0]
    if how == "last":
        return x[:, :, -1]
    raise ValueError(f"temporal_reduce must be one of {TEMPORAL_REDUCTIONS} (or None), got {how!r}")


def prepare_dunia_input(image: Tensor | Mapping[str, Tensor], temporal_reduce: str | None = "median",
                        input_modalities: Sequence[str] | None = None,
                        input_channels: Sequence[int | None] | None = None) -> Tensor:
    """One ``[B, C, H, W]`` DUNIA input from a batch ``image`` (DUNIA takes one composite image, section 3.1).

    Args:
        image: ``[B, C, H, W]``, a ``[B, C, T, H, W]`` series, or a dict of modalities of either shape.
        temporal_reduce: reduction of a series over time (:data:`TEMPORAL_REDUCTIONS`; ``"median"`` = the paper's
            per-pixel median composite); ``None`` rejects series.
        input_modalities: order in which the modalities of a dict are concatenated along channels after their own
            temporal reduction (their dates may differ); ``None``: the dict's order.
        input_channels: the input channel giving each DUNIA band, in DUNIA's band order; ``-1`` or ``None``
            inserts a zero channel (the band's mean after standardisation) for a band the dataset lacks.
            ``None``: the channels as they are.
    """
    if isinstance(image, Mapping):
        names = list(input_modalities) if input_modalities is not None else list(image)
        missing = [m for m in names if m not in image]
        if missing:
            raise ValueError(f"batch['image'] lacks modalities {missing}; got {list(image)}")
        parts = [_reduce_time(image[m], temporal_reduce, f"batch['image'][{m!r}]") for m in names]
        if len({(p.shape[0], *p.shape[-2:]) for p in parts}) != 1:
            shapes = {m: tuple(p.shape) for m, p in zip(names, parts)}
            raise ValueError(f"modalities {names} must share B, H and W after the temporal reduction, got {shapes}")
        x = torch.cat(parts, dim=1)
    elif isinstance(image, Tensor):
        x = _reduce_time(image, temporal_reduce, "batch['image']")
    else:
        raise ValueError(f"batch['image'] must be a tensor or a dict of tensors, got {type(image).__name__}")
    if input_channels is not None:
        idx = [-1 if i is None else int(i) for i in input_channels]
        if any(i < -1 or i >= x.shape[1] for i in idx):
            raise ValueError(f"input channels {list(input_channels)} out of range for an input with {x.shape[1]} "
                             "channels (-1 or null inserts a zero channel)")
        zero = x.new_zeros(x.shape[0], 1, *x.shape[2:])
        x = torch.cat([x[:, i:i + 1] if i >= 0 else zero for i in idx], dim=1)
    return x


# ======================================================================================== pretraining container
class DUNIAPretrainModel(nn.Module):
    """Everything trained by DUNIA's pretraining: image model, multi-temporal AE and waveform AE.

    Args:
        variant: :data:`DUNIA_VARIANTS` key of the image model.
        image_kwargs: overrides of the image model's architecture.
        temporal_channels: channels of the multi-temporal input ``M`` (paper: 14).
        lstm_layers: ConvLSTM layers per block (paper: 2).
        waveform_length: GEDI waveform samples ``L`` (paper: 256).
        waveform_kwargs: extra :class:`~terratorch_eoplugins.nn.waveform.WaveformAutoencoder` arguments.
    """

    def __init__(self, variant: str = "base", image_kwargs: Mapping[str, Any] | None = None,
                 temporal_channels: int = 14, lstm_layers: int = 2, waveform_length: int = 256,
                 waveform_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        from terratorch_eoplugins.nn.waveform import WaveformAutoencoder

        self.image = build_dunia(variant, **dict(image_kwargs or {}))
        cfg = self.image.config
        dp, levels = self.image.out_dim, self.image.num_levels
        self.temporal = MultiTemporalAE(temporal_channels, dp, levels, lstm_layers)
        self.temporal_na = nn.Sequential(*[NeighborhoodAttention2D(dp, cfg["na_heads"], cfg["na_kernel"])
                                           for _ in range(2)])
        self.temporal_heads = nn.ModuleList([ProjectionHead(c, 2 * c, c) for c in self.image.level_dims])
        self.waveform = WaveformAutoencoder(length=waveform_length, embed_dim=dp, **dict(waveform_kwargs or {}))

    def temporal_embeddings(self, series: Tensor) -> dict[str, Any]:
        """``M [B, C, T, H, W]`` -> ``{"recon": M_hat, "levels": [O^T_d] (pooled, NA on d=1), "projected": [...]}``."""
        out = self.temporal(series)
        pooled = list(out["pooled"])
        pooled[0] = self.temporal_na(pooled[0])
        return {"recon": out["recon"], "levels": pooled,
                "projected": [head(x) for head, x in zip(self.temporal_heads, pooled)]}


# ======================================================================================== checkpoints
def _read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    return read_state_dict(path, "DUNIA")


def _checkpoint_variant(state: Mapping[str, Tensor], hparams: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    variant = hparams.get("variant")
    overrides = dict(hparams.get("image_kwargs") or {})
    return (str(variant) if variant is not None else None), overrides


def _image_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    for prefix in ("model.image.", "image.", "model."):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if any(k.startswith("patch_embed.") for k in sub):
            return sub
    return dict(state)


def load_dunia_checkpoint(path: str | Path, variant: str = "base", pretraining_heads: bool = False,
                          **overrides: Any) -> DUNIA:
    """Build the ``variant`` image model and load it from a pretraining checkpoint (or a plain state dict).

    Accepts a Lightning checkpoint of :class:`~terratorch_eoplugins.tasks.dunia_pretrain.DUNIAPretrainTask`
    (keys ``model.image.*``; its ``hyper_parameters`` name the variant and overrides), a state dict of
    :class:`DUNIAPretrainModel` (``image.*``) or of :class:`DUNIA` itself. Raises ``ValueError`` naming the file
    when the checkpoint was trained with another variant or architecture. ``pretraining_heads=False`` (the
    default) drops the projection/reconstruction heads.
    """
    state, hparams = _read_checkpoint(path)
    ck_variant, ck_overrides = _checkpoint_variant(state, hparams)
    if ck_variant is not None and ck_variant != variant:
        raise ValueError(f"{path}: checkpoint of DUNIA variant {ck_variant!r}, but variant={variant!r} was requested")
    model = build_dunia(variant, pretraining_heads=True, **{**ck_overrides, **overrides})
    img = _image_state(state)
    if not any(k.startswith("patch_embed.") for k in img):
        raise ValueError(f"{path}: no DUNIA image-model weights (expected keys 'model.image.patch_embed.*', "
                         "'image.patch_embed.*' or 'patch_embed.*')")
    own = model.state_dict()
    for k, v in img.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)} but DUNIA variant {variant!r} expects "
                             f"{tuple(own[k].shape)}: the checkpoint was trained with another variant/architecture")
    missing = [k for k in own if k not in img and not k.startswith(("projection_heads.", "reconstruction_head."))]
    if missing:
        raise ValueError(f"{path}: missing {len(missing)} DUNIA weight(s) for variant {variant!r}, e.g. {missing[:3]} "
                         "(checkpoint of another variant or architecture?)")
    unexpected = [k for k in img if k not in own]
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} unexpected weight(s) for DUNIA variant {variant!r}, e.g. "
                         f"{unexpected[:3]} (checkpoint of another variant?)")
    model.load_state_dict(img, strict=False)
    if not pretraining_heads:
        model.drop_pretraining_heads()
    logger.info("DUNIA %s: loaded %d tensors from %s", variant, len(img), path)
    return model


def load_dunia_pretrain_model(path: str | Path, variant: str = "base") -> DUNIAPretrainModel:
    """The whole :class:`DUNIAPretrainModel` (image + temporal + waveform AEs) of a pretraining checkpoint.

    Used to embed waveforms (``model.waveform.embed(model.waveform.encode(w))`` = ``O^W``) for retrieval databases.
    """
    state, hparams = _read_checkpoint(path)
    ck_variant, ck_overrides = _checkpoint_variant(state, hparams)
    if ck_variant is not None and ck_variant != variant:
        raise ValueError(f"{path}: checkpoint of DUNIA variant {ck_variant!r}, but variant={variant!r} was requested")
    kw = {k: hparams[k] for k in ("temporal_channels", "lstm_layers", "waveform_length", "waveform_kwargs")
          if k in hparams and hparams[k] is not None}
    model = DUNIAPretrainModel(variant, ck_overrides, **kw)
    sub = {k.removeprefix("model."): v for k, v in state.items()}
    own = model.state_dict()
    bad = [k for k, v in sub.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in sub]
    if bad or missing:
        raise ValueError(f"{path}: not a DUNIA pretraining checkpoint of variant {variant!r} "
                         f"(shape mismatches {bad[:3]}, missing {missing[:3]})")
    model.load_state_dict({k: v for k, v in sub.items() if k in own}, strict=True)
    return model


# ======================================================================================== terratorch
class DUNIABackbone(nn.Module):
    """DUNIA as a terratorch backbone: ``forward(x) -> [O^V, O^H]`` (``out_channels = [D_p, D_p]``).

    Args:
        variant: :data:`DUNIA_VARIANTS` key.
        ckpt_path: DUNIA pretraining checkpoint (``None``: random init).
        lowshot: freeze everything but the last NA layer of each decoder (section 4.1.2); frozen modules stay in
            eval mode (BatchNorm statistics and dropout frozen too).
        band_indices: DUNIA band ``j`` (of ``B01..B12, VV, VH``) is read from input channel ``band_indices[j]``;
            ``None`` (or ``-1``) entries are filled with zeros (the standardised mean: a band the dataset lacks).
            ``None`` keeps the input as is.
        temporal_reduce: ``"median"`` or ``"mean"`` over time of ``[B, C, T, H, W]`` inputs (DUNIA takes one
            composite image, section 3.1: a temporal median composite of a series); ``None`` rejects 5-D input.
        modalities: order in which a dict input ``{modality: [B, C_m, (T_m,) H, W]}`` is concatenated along
            channels after the temporal reduction of each modality (their dates may differ).
        pretrained_from: written by self-contained checkpoints (:mod:`terratorch_eoplugins.models.pretrained`):
            the file the weights came from, never read (they come from the checkpoint being restored).
        **kwargs: architecture overrides (keys of :data:`DUNIA_VARIANTS`; must match the checkpoint).
    """

    def __init__(self, variant: str = "base", ckpt_path: str | Path | None = None, lowshot: bool = False,
                 band_indices: Sequence[int | None] | None = None,
                 temporal_reduce: Literal["median", "mean"] | None = None, modalities: Sequence[str] | None = None,
                 pretrained_from: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        if variant not in DUNIA_VARIANTS:
            raise ValueError(f"unknown DUNIA variant {variant!r}: expected one of {list(DUNIA_VARIANTS)}")
        check_builder_kwargs(f"dunia_{variant}", {k: v for k, v in kwargs.items() if k not in DUNIA_VARIANTS[variant]},
                             (*_BACKBONE_ARGS, *DUNIA_VARIANTS[variant]))
        self.variant = variant
        #: absolute path of the pretraining checkpoint the weights came from (``None``: random init)
        self.pretrained_source: str | None = pretrained_from
        if ckpt_path is not None:
            self.model = load_dunia_checkpoint(ckpt_path, variant, **kwargs)
            self.pretrained_source = resolve_source(ckpt_path)
        else:
            self.model = build_dunia(variant, pretraining_heads=False, **kwargs)
            if pretrained_from:
                log_restored(f"dunia_{variant}", pretrained_from)
            else:
                warn_no_pretrained("DUNIA", f"model_args.{PRETRAINED_FLAG}",
                                   "the " + ("frozen " if lowshot else "") + f"DUNIA-{variant} encoder is random",
                                   "pass a DUNIA pretraining checkpoint (configs/dunia_pretrain.yaml) as "
                                   f"--model.init_args.model_args.{PRETRAINED_FLAG}")
        self.band_indices = None if band_indices is None else [None if i is None else int(i) for i in band_indices]
        if self.band_indices is not None and len(self.band_indices) != self.model.in_channels:
            raise ValueError(f"band_indices must name a source channel (or null) for each of the "
                             f"{self.model.in_channels} DUNIA bands, got {len(self.band_indices)} entries")
        if temporal_reduce not in (None, "median", "mean"):
            raise ValueError(f"temporal_reduce must be None, 'median' or 'mean', got {temporal_reduce!r}")
        self.temporal_reduce = temporal_reduce
        self.modalities = None if modalities is None else list(modalities)
        self.out_channels = [self.model.out_dim, self.model.out_dim]
        self.lowshot = lowshot
        if lowshot:
            for p in self.model.parameters():
                p.requires_grad_(False)
            for p in self.model.lowshot_parameters():
                p.requires_grad_(True)

    def self_contained_args(self) -> dict[str, Any]:
        """Builder arguments that rebuild this backbone without its pretraining file: the architecture overrides
        read from it (:func:`architecture_overrides`); ``{}`` when no file was read."""
        if self.pretrained_source is None:
            return {}
        return {"ckpt_path": None, "pretrained_from": self.pretrained_source,
                **architecture_overrides(self.model, self.variant)}

    def train(self, mode: bool = True) -> DUNIABackbone:
        super().train(mode)
        if self.lowshot and mode:
            self.model.eval()
            self.model.decoder_v.na[-1].train()
            self.model.decoder_h.na[-1].train()
        return self

    def prepare_input(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        """Temporal reduction, modality concatenation and band mapping of a batch's ``image``
        (:func:`prepare_dunia_input` with this backbone's ``temporal_reduce``, ``modalities`` and ``band_indices``)."""
        if isinstance(x, Mapping) and self.modalities is None:
            raise ValueError(f"DUNIA got a dict of modalities {list(x)}: set modalities (their channel "
                             "concatenation order), e.g. [S2, S1A]")
        return prepare_dunia_input(x, self.temporal_reduce, self.modalities, self.band_indices)

    def forward(self, x: Tensor | Mapping[str, Tensor], **kwargs: Any) -> list[Tensor]:
        """``[B, C, H, W]`` (see :meth:`prepare_input`) -> ``[O^V, O^H]``; extra batch keys in ``kwargs`` are
        ignored."""
        x = self.prepare_input(x)
        out = self.model.forward_embeddings(x)
        return [out["vertical"], out["horizontal"]]


#: keyword arguments of the dunia_* builders besides the architecture keys of :data:`DUNIA_VARIANTS`
_BACKBONE_ARGS = ("pretrained", "ckpt_path", "lowshot", "band_indices", "temporal_reduce", "modalities",
                  "pretrained_from")


def architecture_overrides(model: DUNIA, variant: str) -> dict[str, Any]:
    """The architecture keys of ``model`` that differ from the defaults of ``variant`` (:data:`DUNIA_VARIANTS`)."""
    defaults = DUNIA_VARIANTS[variant]
    return {k: v for k, v in model.config.items() if defaults.get(k) != v}


def _backbone(variant: str, pretrained: bool, ckpt_path: str | None, kwargs: dict[str, Any]) -> DUNIABackbone:
    if pretrained and ckpt_path is None and not kwargs.get("pretrained_from"):
        raise ValueError(f"dunia_{variant}: pretrained=True needs ckpt_path (a DUNIA pretraining checkpoint from "
                         "configs/dunia_pretrain.yaml); no weights are downloadable")
    return DUNIABackbone(variant, ckpt_path or None, **kwargs)


@TERRATORCH_BACKBONE_REGISTRY.register
def dunia_base(pretrained: bool = False, ckpt_path: str | None = None, lowshot: bool = False,
               **kwargs: Any) -> DUNIABackbone:
    """terratorch backbone ``dunia_base`` (the paper's DUNIA, appendix E.1): :class:`DUNIABackbone` returning
    ``[O^V, O^H]``; ``ckpt_path`` = local DUNIA pretraining checkpoint, ``lowshot`` = low-shot freezing."""
    return _backbone("base", pretrained, ckpt_path, {"lowshot": lowshot, **kwargs})


@TERRATORCH_BACKBONE_REGISTRY.register
def dunia_tiny(pretrained: bool = False, ckpt_path: str | None = None, lowshot: bool = False,
               **kwargs: Any) -> DUNIABackbone:
    """terratorch backbone ``dunia_tiny`` (CPU-sized DUNIA for tests and the synthetic world):
    :class:`DUNIABackbone` returning ``[O^V, O^H]``; ``ckpt_path`` and ``lowshot`` as in :func:`dunia_base`."""
    return _backbone("tiny", pretrained, ckpt_path, {"lowshot": lowshot, **kwargs})


class DUNIALowShotHead(nn.Module):
    """First layer of DUNIA's low-shot head: a 1x1 convolution halving the channels of the chosen embedding + ReLU.

    The second 1x1 convolution (``C/2 -> outputs``) is the final 1x1 convolution of terratorch's
    segmentation/regression head (keep ``head_channel_list`` unset). ``embedding``: ``"vertical"`` (``O^V``,
    vertical-structure tasks such as RH98), ``"horizontal"`` (``O^H``, land cover/crops) or ``"both"``
    (concatenated).
    """

    def __init__(self, embed_dim: Sequence[int],
                 embedding: Literal["vertical", "horizontal", "both"] = "horizontal") -> None:
        super().__init__()
        if len(embed_dim) < 2:
            raise ValueError(f"dunia_lowshot_head expects the DUNIA backbone's embeddings [O^V, O^H], got channels "
                             f"{list(embed_dim)}")
        if embedding not in ("vertical", "horizontal", "both"):
            raise ValueError(f"embedding must be 'vertical', 'horizontal' or 'both', got {embedding!r}")
        self.embedding = embedding
        cin = sum(embed_dim[:2]) if embedding == "both" else embed_dim[0 if embedding == "vertical" else 1]
        self.out_channels = max(1, cin // 2)
        self.conv = nn.Sequential(nn.Conv2d(cin, self.out_channels, 1), nn.ReLU(inplace=True))

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) < 2:
            raise ValueError(f"dunia_lowshot_head expects [O^V, O^H], got {len(features)} feature map(s)")
        x = {"vertical": features[0], "horizontal": features[1]}.get(self.embedding)
        if x is None:
            x = torch.cat(list(features[:2]), 1)
        return self.conv(x)


@TERRATORCH_DECODER_REGISTRY.register
def dunia_lowshot_head(embed_dim: Sequence[int], embedding: str = "horizontal", **kwargs: Any) -> DUNIALowShotHead:
    """DUNIA's low-shot head (first 1x1 conv) as a terratorch decoder (other keyword arguments are errors)."""
    check_builder_kwargs("dunia_lowshot_head", kwargs, ("embedding",), prefix="decoder_")
    return DUNIALowShotHead(embed_dim, embedding)  # type: ignore[arg-type]

