"""The tokenizers of TS fusion (Basile et al., 2025, sections 3.1, 3.2 and appendix A.1) as one module.

:class:`TSFusionTokenizers` turns an (image, daily weather window, grid coordinates) pair into the token
modalities of :class:`~terratorch_eoplugins.models.tsfusion.TSFusionModel`: a small trainable FSQ image tokenizer
(:mod:`terratorch_eoplugins.nn.image_tokenizer`), one time-series tokenizer with per-variable statistics
(:mod:`terratorch_eoplugins.nn.ts_tokenizers`) giving one ``weather_<name>`` modality per variable, and
0.25 degree coordinate tokens (:func:`coordinate_tokens`). The tokenizers are fitted on the training pairs
(:meth:`TSFusionTokenizers.fit`) and frozen; they live in the tasks' ``state_dict`` (prefix ``tokenizers.``), so a
pretraining checkpoint carries them to fine-tuning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from terratorch_eoplugins.models.tsfusion import ModalitySpec
from terratorch_eoplugins.nn.image_tokenizer import build_image_tokenizer, train_image_tokenizer
from terratorch_eoplugins.nn.ts_tokenizers.factory import build_ts_tokenizer
from terratorch_eoplugins.nn.ts_tokenizers.training import train_fsq_tokenizer

__all__ = ["DEFAULT_IMAGE_TOKENIZER", "RAW_IMAGE", "TSFusionTokenizers", "build_tsfusion_image_tokenizer",
           "coordinate_tokens", "fit_image_tokenizer", "image_token_grid"]


#: name of the input-only raw (untokenized) image modality
RAW_IMAGE = "untok_image"


def coordinate_tokens(coords: Tensor, resolution: float = 0.25) -> Tensor:
    """Grid-centre ``(lat, lon) [B, 2]`` to two tokens: latitude bin in ``[0, 180/r)``, longitude bin offset
    after the latitude bins (appendix A.1: "Geo-location data is discretized to 0.25 degree resolution")."""
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be [B, 2] (lat, lon), got {tuple(coords.shape)}")
    n_lat, n_lon = round(180 / resolution), round(360 / resolution)
    lat = torch.floor((coords[:, 0].double() + 90) / resolution).long().clamp(0, n_lat - 1)
    lon = torch.floor((coords[:, 1].double() + 180) / resolution).long().clamp(0, n_lon - 1)
    return torch.stack([lat, n_lat + lon], 1)


class TSFusionTokenizers(nn.Module):
    """Image, weather and coordinate tokenizers with the modality list they produce.

    Args:
        weather: short weather names, one sequence modality ``weather_<name>`` each.
        window: days per weather window ``L``.
        image_size: side of the grid images.
        image_channels: image channels.
        ts_kind: ``uniform``, ``quantile`` or ``fsq`` (section 3.1).
        ts_kwargs: extra arguments of the time-series tokenizer (default ``num_bins: 64`` for the bins;
            the paper uses 500 on its global data).
        image_kwargs: arguments of the image tokenizer (``nn.image_tokenizer``).
        coords: add the ``coords`` modality (needed by the counterfactual analysis).
        coords_resolution: degrees per coordinate bin.
        image_steps, fsq_steps: training steps of the image tokenizer / the FSQ time-series tokenizer.
        raw_patch_size: add the input-only raw (untokenized) image modality ``untok_image`` (appendix A.1, TerraMind's
            ``untok_sen2rgb@224``): the pixels cut into patches of this side; ``None``: none.
    """

    def __init__(self, weather: Sequence[str], window: int, image_size: int, image_channels: int = 3,
                 ts_kind: str = "uniform", ts_kwargs: Mapping[str, Any] | None = None,
                 image_kwargs: Mapping[str, Any] | None = None, coords: bool = True, coords_resolution: float = 0.25,
                 image_steps: int = 200, fsq_steps: int = 200, raw_patch_size: int | None = None) -> None:
        super().__init__()
        if raw_patch_size is not None and (raw_patch_size < 1 or image_size % raw_patch_size):
            raise ValueError(f"raw_patch_size must divide image_size {image_size}, got {raw_patch_size}")
        self.raw_patch_size = raw_patch_size
        self.weather = list(weather)
        if not self.weather:
            raise ValueError("weather must name at least one variable")
        self.window = int(window)
        kw = dict(ts_kwargs or {})
        if ts_kind in ("uniform", "quantile"):
            kw.setdefault("num_bins", 64)
        self.ts = build_ts_tokenizer(ts_kind, num_variables=len(self.weather), **kw)
        self.ts_kind = ts_kind
        self.image = build_tsfusion_image_tokenizer(image_channels, image_size, image_kwargs)
        self.image_size = int(image_size)
        self.image_channels = int(image_channels)
        self.use_coords = bool(coords)
        self.coords_resolution = float(coords_resolution)
        self.image_steps = int(image_steps)
        self.fsq_steps = int(fsq_steps)
        self.register_buffer("image_fitted", torch.tensor(False))
        for p in self.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ vocabulary
    @property
    def weather_tokens(self) -> int:
        down = getattr(self.ts, "downsample", 1)
        if self.window % down:
            raise ValueError(f"weather window {self.window} must be divisible by the FSQ downsample {down}")
        return self.window // down

    @property
    def image_grid(self) -> tuple[int, int]:
        with torch.no_grad():
            shape = image_token_grid(self.image, self.image_channels, self.image_size)
        return shape

    def modalities(self) -> list[ModalitySpec]:
        h, w = self.image_grid
        mods = [ModalitySpec("image", "image", int(self.image.vocab_size), h * w, "image")]
        ordinal = int(self.ts.codebook_size) if self.ts_kind in ("uniform", "quantile") else 0
        mods += [ModalitySpec(f"weather_{v}", "seq", int(self.ts.vocab_size), self.weather_tokens, "weather", ordinal)
                 for v in self.weather]
        if self.use_coords:
            n = round(180 / self.coords_resolution) + round(360 / self.coords_resolution)
            mods.append(ModalitySpec("coords", "seq", n, 2, "coords"))
        if self.raw_patch_size:
            p = self.raw_patch_size
            mods.append(ModalitySpec(RAW_IMAGE, "raw", 0, (self.image_size // p) ** 2, "image",
                                     channels=self.image_channels, patch_size=p))
        return mods

    @property
    def fitted(self) -> bool:
        return bool(self.ts.fitted) and bool(self.image_fitted)

    # ------------------------------------------------------------------ fitting
    def fit(self, images: Tensor, weather: Tensor, seed: int = 0, max_steps: int | None = None) -> dict[str, float]:
        """Fit the weather tokenizer (statistics; FSQ network too) and train the image tokenizer on training pairs.

        ``max_steps`` caps the training steps (used under ``fast_dev_run`` smoke runs)."""
        cap = (lambda n: n) if max_steps is None else (lambda n: min(n, max_steps))
        if images.ndim != 4 or weather.ndim != 3 or weather.shape[1] != len(self.weather):
            raise ValueError(f"fit expects images [N, C, H, W] and weather [N, {len(self.weather)}, L], got "
                             f"{tuple(images.shape)} and {tuple(weather.shape)}")
        info: dict[str, float] = {}
        # Lightning runs validation/test hooks under inference mode: leave it (and no_grad) to train the tokenizers
        with torch.inference_mode(False), torch.enable_grad():
            images, weather = images.clone(), weather.clone()  # plain tensors, not inference tensors
            for p in self.parameters():
                p.requires_grad_(True)
            self.ts.fit(weather)
            if self.ts_kind == "fsq":
                hist = train_fsq_tokenizer(self.ts, weather, steps=max(1, cap(self.fsq_steps)), seed=seed)
                info["fsq_loss"] = hist[-1]
            info.update(fit_image_tokenizer(self.image, images, cap(self.image_steps), seed))
            for p in self.parameters():
                p.requires_grad_(False)
        self.image_fitted.fill_(True)
        self.eval()
        return info

    # ------------------------------------------------------------------ tokenization
    @torch.no_grad()
    def tokenize(self, image: Tensor | None = None, weather: Tensor | None = None,
                 coords: Tensor | None = None) -> dict[str, Tensor]:
        """Token ids ``{modality: [B, N_m]}`` of the given inputs."""
        if not self.fitted:
            raise RuntimeError("TSFusionTokenizers are not fitted: call fit() on training pairs (the tasks do this "
                               "in on_fit_start) or load a pretraining checkpoint")
        self.eval()
        out: dict[str, Tensor] = {}
        if image is not None:
            tok = self.image.encode(image)
            out["image"] = tok.reshape(tok.shape[0], -1).long()
            if self.raw_patch_size:
                out[RAW_IMAGE] = image.float()
        if weather is not None:
            if weather.ndim != 3 or weather.shape[1] != len(self.weather) or weather.shape[2] != self.window:
                raise ValueError(f"weather must be [B, {len(self.weather)}, {self.window}], got {tuple(weather.shape)}")
            tok = self.ts.encode(weather).long()  # [B, V, L']
            for i, v in enumerate(self.weather):
                out[f"weather_{v}"] = tok[:, i]
        if coords is not None and self.use_coords:
            out["coords"] = coordinate_tokens(coords, self.coords_resolution)
        return out

    @torch.no_grad()
    def decode_weather(self, tokens: Mapping[str, Tensor]) -> Tensor:
        """Weather series ``[B, V, L]`` (physical units) from ``weather_<v>`` tokens."""
        tok = torch.stack([tokens[f"weather_{v}"] for v in self.weather], 1)
        return self.ts.decode(tok).float()

    def banned_weather_ids(self) -> list[int]:
        """Special ids that generation must not produce ([PAD], [EOS], [NULL]; [ZERO] stays allowed)."""
        return [self.ts.pad_id, self.ts.eos_id, self.ts.null_id]



#: small FSQ image tokenizer of the CPU configs: 3 stride-2 stages (8 px patches), 8-5-5-5 = 1000 codes
DEFAULT_IMAGE_TOKENIZER: dict[str, Any] = {"kind": "fsq", "levels": [8, 5, 5, 5], "hidden_dims": [32, 64, 64]}


def build_tsfusion_image_tokenizer(channels: int, size: int, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The image tokenizer of :class:`TSFusionTokenizers`: ``kwargs`` of
    :func:`~terratorch_eoplugins.nn.image_tokenizer.build_image_tokenizer` (``kind`` included; empty or ``None``:
    :data:`DEFAULT_IMAGE_TOKENIZER`), checked against the image side ``size``."""
    kw = dict(DEFAULT_IMAGE_TOKENIZER) if not kwargs else dict(kwargs)
    kind = kw.pop("kind", "fsq")
    if kind == "fsq":
        kw.setdefault("in_channels", channels)
    tok = build_image_tokenizer(kind, **kw)
    if size % tok.patch_size:
        raise ValueError(f"image_size {size} must be a multiple of the image tokenizer's patch size {tok.patch_size}")
    return tok


def image_token_grid(tok: nn.Module, channels: int, size: int) -> tuple[int, int]:
    """Token grid ``(h, w)`` that ``tok`` gives for a ``channels x size x size`` image."""
    was = tok.training
    tok.eval()
    out = tok.encode(torch.zeros(1, channels, size, size))
    tok.train(was)
    return int(out.shape[-2]), int(out.shape[-1])


def fit_image_tokenizer(tok: nn.Module, images: Tensor, steps: int, seed: int) -> dict[str, float]:
    """Fit the image statistics of ``tok`` (if it has any) and train it for ``steps`` on ``images [N, C, H, W]``
    (nothing to train for a frozen or parameter-free tokenizer); returns the last training loss."""
    if hasattr(tok, "fit"):
        tok.fit(images)
    if steps <= 0 or not any(True for _ in tok.parameters()):
        return {}
    if getattr(tok, "freeze", False):  # a frozen (pretrained TerraMind) tokenizer is used as is
        return {}
    hist = train_image_tokenizer(tok, images, steps=steps, seed=seed)
    return {"image_tokenizer_loss": float(hist[-1])} if len(hist) else {}
