"""Image tokenizers for TerraMind time-series fusion (Basile et al., 2025, section 3.2; appendix A.1).

One API for both tokenizers: ``encode(image [B, C, H, W]) -> LongTensor [B, h, w]``, ``decode(tokens) ->
image``, ``vocab_size``, ``patch_size`` and ``loss(image) -> {"loss", "recon", "commit"}``.

* :class:`TerraMindImageTokenizer`: TerraMind's FSQ image tokenizers built through terratorch's
  ``FULL_MODEL_REGISTRY`` (``terramind_v1_tokenizer_{s2l2a,s1rtc,s1grd,dem,ndvi,lulc}``, terratorch
  1.2.11): ViT-B encoder with patch 16, FSQ levels ``8-8-8-6-5`` (15360 codes; LULC ``7-5-5-5-5``), and a
  diffusion decoder (DiVAE; LULC: ViT decoder). ``pretrained=False`` builds random weights offline;
  real weights come from a local checkpoint (``ckpt_path``) or, with network, ``pretrained=True``
  (Hugging Face). Its loss is ``L_img`` of section 3.2 with ``prediction_type="sample"``:
  ``E ||I - D_phi(I_t, t, Z_q)||^2 + lambda_FSQ * code_loss``; the paper's image tokenizers use
  ``lambda_commit = 0`` (appendix A.1: "rely on sigmoid regularization"), the default here.
  TerraMind's FSQ is sigmoid-based (codes in ``[0, 1]``) and its token index puts the *first*
  dimension least significant (``index = sum_d i_d prod_{m<d} L_m``); tokens are returned unchanged
  so that they stay compatible with TerraMind's embedding tables.
* :class:`FSQImageTokenizer`: a small trainable tokenizer, the offline default so that pretraining runs
  end to end without TerraMind weights: a convolutional encoder (stride-2 stages, ``patch_size`` =
  ``2**stages``) to ``D = len(levels)`` latents per patch, FSQ of vector-quantize-pytorch with the
  symmetric levels ``c_{d,j} = -1 + 2j/(L_d - 1)`` (``preserve_symmetry=True``), the token index of
  eq. (1), and a mirrored convolutional decoder. Deviation from the paper, stated plainly: its decoder is
  a deterministic conv decoder trained with ``||I - I_hat||^2`` (no diffusion), which keeps CPU
  training to seconds; the commitment term ``lambda_FSQ ||Z_e - sg(Z_q)||^2`` is as in section 3.2.

Use :func:`build_image_tokenizer` (``kind="fsq"`` or ``"terramind"``) and
:func:`save_image_tokenizer` / :func:`load_image_tokenizer` for checkpoints of the small tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from terratorch_eoplugins.nn.fsq_index import fsq_index_to_levels, fsq_levels_to_index
from terratorch_eoplugins.nn.training import train_on_random_batches
from terratorch_eoplugins.runtime import read_checkpoint

__all__ = [
    "IMAGE_TOKENIZERS",
    "TERRAMIND_TOKENIZERS",
    "FSQImageTokenizer",
    "ImageTokenizer",
    "TerraMindImageTokenizer",
    "build_image_tokenizer",
    "load_image_tokenizer",
    "save_image_tokenizer",
    "train_image_tokenizer",
]

#: TerraMind v1 tokenizers registered by terratorch 1.2.11 in ``FULL_MODEL_REGISTRY`` -> input channels.
TERRAMIND_TOKENIZERS: dict[str, int] = {
    "terramind_v1_tokenizer_s2l2a": 12,
    "terramind_v1_tokenizer_s1rtc": 2,
    "terramind_v1_tokenizer_s1grd": 2,
    "terramind_v1_tokenizer_dem": 1,
    "terramind_v1_tokenizer_ndvi": 1,
}


def _check_image(image: Tensor, channels: int, patch: int, name: str) -> Tensor:
    if not isinstance(image, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [B, C, H, W], got {type(image).__name__}")
    if image.ndim != 4 or image.shape[1] != channels:
        raise ValueError(f"{name}: expected [B, C={channels}, H, W], got shape {tuple(image.shape)}")
    if image.shape[-2] % patch or image.shape[-1] % patch:
        raise ValueError(f"{name}: H and W must be multiples of the patch size {patch}, got {tuple(image.shape[-2:])}")
    if not image.is_floating_point():
        raise TypeError(f"{name}: expected a float image, got dtype {image.dtype}")
    if not torch.isfinite(image).all():
        raise ValueError(f"{name}: image contains NaN or inf")
    return image


class ImageTokenizer(nn.Module):
    """Common API of the image tokenizers."""

    in_channels: int
    patch_size: int

    @property
    def vocab_size(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, image: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, tokens: Tensor, **kwargs: Any) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, image: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, image: Tensor) -> Tensor:
        return self.encode(image)

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.is_floating_point():
            raise TypeError("decode(tokens): expected an integer tensor [B, h, w]")
        if tokens.ndim != 3:
            raise ValueError(f"decode(tokens): expected [B, h, w], got shape {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"decode(tokens): ids must lie in [0, {self.vocab_size}), got range "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        return tokens.long()


class _ResBlock2d(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.gelu(self.conv1(F.gelu(self.norm(x)))))


class FSQImageTokenizer(ImageTokenizer):
    """Small conv + FSQ image tokenizer (offline default; see the module docstring).

    Args:
        in_channels: image channels ``C``.
        levels: FSQ levels (default ``8-8-8-6-5``: TerraMind's 15360-code vocabulary).
        hidden_dims: channels of the encoder stages (one stride-2 stage each; ``patch_size = 2**len``).
        commitment_weight: ``lambda_FSQ`` of section 3.2.
    """

    kind = "fsq"

    def __init__(self, in_channels: int = 3, levels: Sequence[int] = (8, 8, 8, 6, 5),
                 hidden_dims: Sequence[int] = (32, 64, 64), commitment_weight: float = 0.1) -> None:
        super().__init__()
        from vector_quantize_pytorch import FSQ

        levels = [int(v) for v in levels]
        if in_channels < 1:
            raise ValueError(f"in_channels: expected >= 1, got {in_channels}")
        if not levels or any(v < 2 for v in levels):
            raise ValueError(f"levels: expected ints >= 2, got {levels!r}")
        if not hidden_dims or any(h < 1 for h in hidden_dims):
            raise ValueError(f"hidden_dims: expected a non-empty sequence of positive ints, got {hidden_dims!r}")
        if commitment_weight < 0:
            raise ValueError(f"commitment_weight: expected >= 0, got {commitment_weight}")
        self.in_channels = int(in_channels)
        self.levels = levels
        self.patch_size = 2 ** len(hidden_dims)
        self.commitment_weight = float(commitment_weight)
        self.config: dict[str, Any] = {"in_channels": in_channels, "levels": levels, "hidden_dims": list(hidden_dims),
                                       "commitment_weight": commitment_weight}
        d = len(levels)
        enc: list[nn.Module] = [nn.Conv2d(in_channels, hidden_dims[0], 3, padding=1)]
        prev = hidden_dims[0]
        for h in hidden_dims:
            enc += [nn.Conv2d(prev, h, 4, stride=2, padding=1), _ResBlock2d(h)]
            prev = h
        enc += [nn.GELU(), nn.Conv2d(prev, d, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(d, prev, 3, padding=1)]
        for h in reversed(hidden_dims):
            dec += [_ResBlock2d(prev), nn.ConvTranspose2d(prev, h, 4, stride=2, padding=1)]
            prev = h
        dec += [nn.GELU(), nn.Conv2d(prev, in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.fsq = FSQ(levels=levels, preserve_symmetry=True)
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        # per-channel standardisation (identity until fit); stored so checkpoints carry it
        self.register_buffer("mean", torch.zeros(in_channels))
        self.register_buffer("std", torch.ones(in_channels))

    @property
    def vocab_size(self) -> int:
        return int(math.prod(self.levels))

    def fit(self, images: Tensor) -> FSQImageTokenizer:
        """Fit per-channel mean/std on ``[N, C, H, W]`` images (optional; identity otherwise)."""
        images = _check_image(images, self.in_channels, 1, "fit(images)")
        self.mean.copy_(images.mean((0, 2, 3)))
        self.std.copy_(images.std((0, 2, 3)).clamp(min=1e-6))
        return self

    def _norm(self, image: Tensor) -> Tensor:
        return (image - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def quantize(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(Z_e, Z_q, tokens)`` for a standardised image: ``Z_e = tanh(E(I))`` ``[B, D, h, w]`` (bounded latent),
        ``Z_q`` its nearest FSQ code (straight-through), tokens ``[B, h, w]`` by eq. (1)."""
        h = self.encoder(image)
        z_q, _ = self.fsq(h)  # 4-D input: FSQ treats dim 1 as the code dimension -> [B, D, h, w]
        z_last = z_q.detach().permute(0, 2, 3, 1)
        level_idx = torch.round((z_last + 1) * (self._levels - 1) / 2).long()
        tokens = fsq_levels_to_index(level_idx, self.levels)
        return torch.tanh(h), z_q, tokens

    def encode(self, image: Tensor) -> Tensor:
        image = _check_image(image, self.in_channels, self.patch_size, "encode(image)")
        with torch.no_grad():
            return self.quantize(self._norm(image))[2]

    def codes_from_tokens(self, tokens: Tensor) -> Tensor:
        idx = fsq_index_to_levels(tokens.long(), self.levels)  # [B, h, w, D]
        codes = -1 + 2 * idx.float() / (self._levels - 1).float()
        return codes.permute(0, 3, 1, 2)

    def decode(self, tokens: Tensor, **kwargs: Any) -> Tensor:
        """Images ``[B, C, h * patch, w * patch]`` in the input units."""
        tokens = self._check_tokens(tokens)
        with torch.no_grad():
            y = self.decoder(self.codes_from_tokens(tokens.to(self.mean.device)))
        return y * self.std.view(1, -1, 1, 1) + self.mean.view(1, -1, 1, 1)

    def loss(self, image: Tensor) -> dict[str, Tensor]:
        """``||I - D(Z_q)||^2 + lambda_FSQ ||Z_e - sg(Z_q)||^2`` (means per element, standardised units)."""
        image = self._norm(_check_image(image, self.in_channels, self.patch_size, "loss(image)"))
        z_e, z_q, _ = self.quantize(image)
        recon = F.mse_loss(self.decoder(z_q), image)
        commit = F.mse_loss(z_e, z_q.detach())
        return {"loss": recon + self.commitment_weight * commit, "recon": recon, "commit": commit}


class TerraMindImageTokenizer(ImageTokenizer):
    """Adapter around a TerraMind FSQ tokenizer of terratorch's ``FULL_MODEL_REGISTRY``.

    Args:
        name: registry name, e.g. ``terramind_v1_tokenizer_s2l2a`` (see :data:`TERRAMIND_TOKENIZERS`).
        pretrained: download the official weights (needs network); ``False`` = random weights.
        ckpt_path: local state-dict file of the tokenizer (official ``TerraMind_Tokenizer_*.pt``); overrides
            ``pretrained``.
        freeze: keep the tokenizer frozen (eval mode, no gradients), as in the paper's pretraining.
        commitment_weight: ``lambda_FSQ`` applied to TerraMind's code loss (0 in the paper, appendix A.1).
        decode_timesteps: diffusion steps used by :meth:`decode` (DDIM, terratorch's default pipeline).
    """

    kind = "terramind"

    def __init__(self, name: str = "terramind_v1_tokenizer_s2l2a", pretrained: bool = False,
                 ckpt_path: str | Path | None = None, freeze: bool = True, commitment_weight: float = 0.0,
                 decode_timesteps: int = 50, **kwargs: Any) -> None:
        super().__init__()
        from terratorch.registry import FULL_MODEL_REGISTRY

        if name not in TERRAMIND_TOKENIZERS:
            raise ValueError(f"name: expected one of {sorted(TERRAMIND_TOKENIZERS)} (image-regression tokenizers of "
                             f"terratorch's FULL_MODEL_REGISTRY), got {name!r}")
        if ckpt_path is not None:
            if not Path(ckpt_path).is_file():
                raise FileNotFoundError(f"ckpt_path: TerraMind tokenizer checkpoint not found: {str(ckpt_path)!r}")
            kwargs["ckpt_path"] = str(ckpt_path)
            pretrained = False
        self.name = name
        self.model = FULL_MODEL_REGISTRY.build(name, pretrained=pretrained, **kwargs)
        self.in_channels = TERRAMIND_TOKENIZERS[name]
        self.patch_size = int(self.model.patch_size)
        self.commitment_weight = float(commitment_weight)
        self.decode_timesteps = int(decode_timesteps)
        self.freeze = freeze
        if freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> TerraMindImageTokenizer:
        super().train(mode)
        if self.freeze:
            self.model.eval()
        return self

    @property
    def vocab_size(self) -> int:
        return int(self.model.quantize.codebook_size)

    def encode(self, image: Tensor) -> Tensor:
        image = _check_image(image, self.in_channels, self.patch_size, "encode(image)")
        with torch.no_grad():
            return self.model.tokenize(image).long()

    def decode(self, tokens: Tensor, timesteps: int | None = None, generator: torch.Generator | None = None,
               **kwargs: Any) -> Tensor:
        """Diffusion decoding of ``[B, h, w]`` tokens to ``[B, C, h * 16, w * 16]`` (``timesteps`` DDIM steps)."""
        tokens = self._check_tokens(tokens)
        with torch.no_grad():
            return self.model.decode_tokens(tokens, timesteps=timesteps or self.decode_timesteps,
                                            generator=generator, **kwargs)

    def loss(self, image: Tensor) -> dict[str, Tensor]:
        """``L_img`` of section 3.2: the decoder reconstructs ``I`` from the noised ``I_t`` at a random step ``t``,
        conditioned on ``Z_q``; plus ``lambda_FSQ`` times the quantizer's code loss."""
        image = _check_image(image, self.in_channels, self.patch_size, "loss(image)")
        model = self.model
        sched = model.noise_scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (image.shape[0],), device=image.device)
        noised = sched.add_noise(image, torch.randn_like(image), t)
        dec, code_loss = model.train_forward(image, noised, t)
        recon = F.mse_loss(dec, image)
        commit = code_loss.mean() if isinstance(code_loss, Tensor) else torch.tensor(float(code_loss))
        return {"loss": recon + self.commitment_weight * commit, "recon": recon, "commit": commit}


IMAGE_TOKENIZERS: dict[str, type[ImageTokenizer]] = {"fsq": FSQImageTokenizer, "terramind": TerraMindImageTokenizer}


def build_image_tokenizer(kind: str = "fsq", checkpoint: str | Path | None = None, **kwargs: Any) -> ImageTokenizer:
    """``kind="fsq"`` (small trainable, offline default; ``checkpoint`` loads a trained one) or ``"terramind"``."""
    if kind not in IMAGE_TOKENIZERS:
        raise ValueError(f"build_image_tokenizer: unknown kind {kind!r}; expected one of {sorted(IMAGE_TOKENIZERS)}")
    if checkpoint is not None:
        if kind != "fsq":
            raise ValueError("build_image_tokenizer: `checkpoint` is for kind='fsq'; use ckpt_path= for TerraMind")
        return load_image_tokenizer(checkpoint)
    return IMAGE_TOKENIZERS[kind](**kwargs)


def save_image_tokenizer(tokenizer: FSQImageTokenizer, path: str | Path) -> Path:
    """Save a :class:`FSQImageTokenizer` as ``{"kind", "config", "state_dict"}``."""
    if not isinstance(tokenizer, FSQImageTokenizer):
        raise TypeError("save_image_tokenizer: only FSQImageTokenizer is saved this way (TerraMind: its own .pt)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"kind": "fsq", "config": dict(tokenizer.config), "state_dict": tokenizer.state_dict()}, path)
    return path


def load_image_tokenizer(path: str | Path, map_location: str | torch.device = "cpu") -> FSQImageTokenizer:
    """Load a tokenizer written by :func:`save_image_tokenizer` (evaluation mode)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image tokenizer checkpoint not found: {str(path)!r}; train one with "
                                "`eoplugins tsfusion-tokenizers`")
    ckpt = read_checkpoint(path, "image tokenizer", map_location)  # plain dict of tensors + config
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "fsq" or "state_dict" not in ckpt:
        raise ValueError(f"{str(path)!r}: expected a dict with kind='fsq', config, state_dict (save_image_tokenizer)")
    tok = FSQImageTokenizer(**ckpt["config"])
    tok.load_state_dict(ckpt["state_dict"])
    return tok.eval()


def train_image_tokenizer(tokenizer: ImageTokenizer, images: Tensor, steps: int = 300, batch_size: int = 16,
                          lr: float = 2e-3, weight_decay: float = 0.01, grad_clip: float = 1.0, seed: int = 0,
                          log_every: int = 0) -> list[float]:
    """Train on ``[N, C, H, W]`` images with AdamW, a cosine schedule and gradient clipping; returns the losses."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    params = [p for p in tokenizer.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_image_tokenizer: the tokenizer has no trainable parameters (frozen?)")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    return train_on_random_batches(tokenizer, images, steps, batch_size, opt, sched, grad_clip, seed, log_every,
                                   ("recon",))
