"""TS-fusion correlation pretraining (Basile et al., 2025, sections 3.3 and 4; appendix A.1).

Every step: the batch's images, daily weather windows and grid coordinates are tokenized
(:class:`TSFusionTokenizers`: a small trainable FSQ image tokenizer, one time-series tokenizer with
per-variable statistics, 0.25 degree coordinate tokens), input and target token budgets are split over
the modalities by independent Dirichlet draws (:func:`~terratorch_eoplugins.models.tsfusion.sample_token_budgets`,
``alpha = 0.5``, budgets ``N_in`` / ``N_tgt``), and the encoder-decoder minimises the modality-averaged
cross-entropy of the target tokens. Optimiser: AdamW ``(0.9, 0.95)``, weight decay 0.05, linear warmup +
cosine decay (appendix A.1; gradient clipping 1.0 comes from the trainer config).

Validation also *generates* each weather variable from the image alone (autoregressive, greedy),
decodes the tokens back to physical units and logs the coefficient of determination against the true
series (``val/gen_r2`` and per variable ``val/gen_r2_<var>``), the paper's section 5.2 / appendix C.2 test.

Tokenizers are fitted on the training pairs in :meth:`TSFusionPretrainTask.on_fit_start` (unless loaded)
and live in the task's ``state_dict`` (prefix ``tokenizers.``), so a checkpoint carries them to
fine-tuning (:class:`~terratorch_eoplugins.tasks.tsfusion_cropnet.TSFusionCropNetTask`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchgeo.trainers import BaseTask

from terratorch_eoplugins.models.tsfusion import (
    ModalitySpec,
    TSFusionModel,
    sample_token_budgets,
    sample_token_masks,
)
from terratorch_eoplugins.metrics import generation_scores, r2_score

__all__ = ["TSFusionTokenizers", "TSFusionPretrainTask", "coordinate_tokens", "MODEL_SIZES"]

#: encoder/decoder sizes of the registered variants (dim, encoder depth, decoder depth, heads)
MODEL_SIZES: dict[str, tuple[int, int, int, int]] = {"tsfusion_base": (768, 12, 12, 12),
                                                     "tsfusion_tiny": (64, 2, 2, 4)}


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
    """

    def __init__(self, weather: Sequence[str], window: int, image_size: int, image_channels: int = 3,
                 ts_kind: str = "uniform", ts_kwargs: Mapping[str, Any] | None = None,
                 image_kwargs: Mapping[str, Any] | None = None, coords: bool = True, coords_resolution: float = 0.25,
                 image_steps: int = 200, fsq_steps: int = 200) -> None:
        super().__init__()
        from terratorch_eoplugins.nn.quantizers import build_ts_tokenizer

        self.weather = list(weather)
        if not self.weather:
            raise ValueError("weather must name at least one variable")
        self.window = int(window)
        kw = dict(ts_kwargs or {})
        if ts_kind in ("uniform", "quantile"):
            kw.setdefault("num_bins", 64)
        self.ts = build_ts_tokenizer(ts_kind, num_variables=len(self.weather), **kw)
        self.ts_kind = ts_kind
        self.image = _build_image_tokenizer(image_channels, image_size, dict(image_kwargs or {}))
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
            shape = _image_token_shape(self.image, self.image_channels, self.image_size)
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
                from terratorch_eoplugins.nn.quantizers import train_fsq_tokenizer

                hist = train_fsq_tokenizer(self.ts, weather, steps=max(1, cap(self.fsq_steps)), seed=seed)
                info["fsq_loss"] = hist[-1]
            info.update(_train_image_tokenizer(self.image, images, cap(self.image_steps), seed))
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


def _build_image_tokenizer(channels: int, size: int, kwargs: dict[str, Any]) -> nn.Module:
    from terratorch_eoplugins.nn.image_tokenizer import build_image_tokenizer

    kw = dict(DEFAULT_IMAGE_TOKENIZER) if not kwargs else dict(kwargs)
    kind = kw.pop("kind", "fsq")
    if kind == "fsq":
        kw.setdefault("in_channels", channels)
    tok = build_image_tokenizer(kind, **kw)
    if size % tok.patch_size:
        raise ValueError(f"image_size {size} must be a multiple of the image tokenizer's patch size {tok.patch_size}")
    return tok


def _image_token_shape(tok: nn.Module, channels: int, size: int) -> tuple[int, int]:
    was = tok.training
    tok.eval()
    out = tok.encode(torch.zeros(1, channels, size, size))
    tok.train(was)
    return int(out.shape[-2]), int(out.shape[-1])


def _train_image_tokenizer(tok: nn.Module, images: Tensor, steps: int, seed: int) -> dict[str, float]:
    from terratorch_eoplugins.nn.image_tokenizer import train_image_tokenizer

    if hasattr(tok, "fit"):
        tok.fit(images)
    if steps <= 0 or not any(True for _ in tok.parameters()):
        return {}
    if getattr(tok, "freeze", False):  # a frozen (pretrained TerraMind) tokenizer is used as is
        return {}
    hist = train_image_tokenizer(tok, images, steps=steps, seed=seed)
    return {"image_tokenizer_loss": float(hist[-1])} if len(hist) else {}


# ------------------------------------------------------------------------------------------ task
class TSFusionPretrainTask(BaseTask):
    """Correlation pretraining of :class:`~terratorch_eoplugins.models.tsfusion.TSFusionModel`.

    Batches come from :class:`~terratorch_eoplugins.datamodules.tsfusion.TSFusionPretrainDataModule`.

    Args:
        model: ``tsfusion_tiny`` or ``tsfusion_base`` (size preset), overridable by ``model_kwargs``
            (``dim``, ``encoder_depth``, ``decoder_depth``, ``num_heads``, ``mlp_ratio``).
        weather, before, after, image_size, image_channels: must match the datamodule.
        ts_tokenizer, ts_tokenizer_kwargs, image_tokenizer_kwargs, coords, tokenizer_steps: see
            :class:`TSFusionTokenizers` (``tokenizer_steps`` trains the image and FSQ tokenizers).
        alpha: Dirichlet concentration per modality (a float for all, or ``{modality: alpha}``; 0.5 in the paper).
        input_budget, target_budget: ``N_in`` and ``N_tgt`` (128 / 128 in the paper).
        lr, weight_decay, betas, warmup_steps: AdamW + warmup/cosine schedule (``total_steps`` from the trainer).
        generate_batches: validation batches on which weather is generated from images (0: off).
        emd_weight: weight of the ordinal EMD loss on uniform/quantile weather tokens (appendix A.1; 0: CE only).
    """

    monitor = "val/loss"

    def __init__(self, model: str = "tsfusion_tiny", model_kwargs: Mapping[str, Any] | None = None,
                 weather: Sequence[str] = ("tavg", "tmax", "tmin", "precip"), before: int = 29, after: int = 10,
                 image_size: int = 32, image_channels: int = 3, ts_tokenizer: str = "uniform",
                 ts_tokenizer_kwargs: Mapping[str, Any] | None = None,
                 image_tokenizer_kwargs: Mapping[str, Any] | None = None, coords: bool = True,
                 tokenizer_steps: int = 200, alpha: float | Mapping[str, float] = 0.5, input_budget: int = 64,
                 target_budget: int = 64, lr: float = 1e-3, weight_decay: float = 0.05,
                 betas: Sequence[float] = (0.9, 0.95), warmup_steps: int = 20, generate_batches: int = 1,
                 emd_weight: float = 1.0) -> None:
        if model not in MODEL_SIZES:
            raise ValueError(f"model must be one of {sorted(MODEL_SIZES)}, got {model!r}")
        if input_budget < 1 or target_budget < 1:
            raise ValueError(f"input_budget and target_budget must be >= 1, got {input_budget}, {target_budget}")
        super().__init__()

    def configure_models(self) -> None:
        """Build the tokenizers and the correlation model."""
        hp = self.hparams
        self.tokenizers = TSFusionTokenizers(hp["weather"], hp["before"] + 1 + hp["after"], hp["image_size"],
                                             hp["image_channels"], hp["ts_tokenizer"], hp["ts_tokenizer_kwargs"],
                                             hp["image_tokenizer_kwargs"], hp["coords"],
                                             image_steps=hp["tokenizer_steps"], fsq_steps=hp["tokenizer_steps"])
        dim, enc, dec, heads = MODEL_SIZES[hp["model"]]
        kw = dict(dim=dim, encoder_depth=enc, decoder_depth=dec, num_heads=heads)
        kw.update(dict(hp["model_kwargs"] or {}))
        self.model = TSFusionModel(self.tokenizers.modalities(), **kw)
        alpha = hp["alpha"]
        names = self.model.names
        if isinstance(alpha, Mapping):
            unknown = [k for k in alpha if k not in names]
            if unknown:
                raise ValueError(f"alpha names unknown modalities {unknown}; modalities are {names}")
            values = [float(alpha.get(n, 0.5)) for n in names]
        else:
            values = [float(alpha)] * len(names)
        self.register_buffer("alphas", torch.tensor(values, dtype=torch.float64), persistent=False)
        self.register_buffer("limits", torch.tensor([s.num_tokens for s in self.model.specs]), persistent=False)
        self._gen: dict[str, list[Tensor]] = {"pred": [], "true": []}

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (betas 0.9/0.95, weight decay 0.05) with linear warmup and cosine decay (appendix A.1)."""
        hp = self.hparams
        opt = torch.optim.AdamW(self.model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"],
                                betas=tuple(hp["betas"]))
        total = max(1, int(getattr(self.trainer, "estimated_stepping_batches", 1) or 1)) if self._trainer else 1
        warm = min(hp["warmup_steps"], max(total - 1, 0))

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            t = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1 + math.cos(math.pi * t))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ tokenizers
    def fit_tokenizers(self, images: Tensor, weather: Tensor, max_steps: int | None = None) -> dict[str, float]:
        """Fit the tokenizers on training pairs (done automatically at the start of ``fit``)."""
        return self.tokenizers.fit(images, weather, seed=0, max_steps=max_steps)

    def on_fit_start(self) -> None:
        """Fit the tokenizers on the datamodule's training pairs unless they were loaded from a checkpoint."""
        self._ensure_tokenizers()

    def on_validation_start(self) -> None:
        self._ensure_tokenizers()

    def on_test_start(self) -> None:
        """``test`` without ``fit`` (and without a checkpoint) still needs tokenizers: fit them on the train pairs."""
        self._ensure_tokenizers()

    def _ensure_tokenizers(self) -> None:
        if self.tokenizers.fitted:
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "pairs"):
            raise RuntimeError("TSFusionPretrainTask needs a TSFusionPretrainDataModule (with .pairs('train')) to fit "
                               "its tokenizers, or fitted tokenizers (fit_tokenizers / a checkpoint)")
        train = dm.pairs("train").tensors
        # a fast_dev_run smoke test only checks the wiring: 2 tokenizer training steps
        self.fit_tokenizers(train["image"], train["weather"], 2 if self.trainer.fast_dev_run else None)

    # ------------------------------------------------------------------ steps
    def _check_batch(self, batch: Mapping[str, Any]) -> None:
        for k in ("image", "weather"):
            if k not in batch:
                raise KeyError(f"TSFusionPretrainTask batch lacks {k!r} (got {sorted(batch)}); use "
                               "TSFusionPretrainDataModule")
        if not bool(torch.isfinite(batch["weather"]).all()):
            raise ValueError("batch['weather'] has non-finite values: missing weather must be filled by the "
                             "datamodule before tokenization")

    def tokenize(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        self._check_batch(batch)
        return self.tokenizers.tokenize(batch["image"], batch["weather"], batch.get("coords"))

    def compute_losses(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Sample Dirichlet budgets and masks, return the correlation losses of one batch."""
        tokens = self.tokenize(batch)
        b = next(iter(tokens.values())).shape[0]
        hp = self.hparams
        n_in = sample_token_budgets(self.alphas.cpu(), hp["input_budget"], self.limits.cpu(), b, generator)
        n_tg = sample_token_budgets(self.alphas.cpu(), hp["target_budget"], self.limits.cpu(), b, generator)
        empty = n_in.sum(1) == 0  # every sample needs one input token to attend to
        if bool(empty.any()):
            n_in[empty, 0] = 1
        ins, tgts = sample_token_masks(n_in, n_tg, [s.num_tokens for s in self.model.specs], generator)
        dev = next(iter(tokens.values())).device
        in_m = {n: m.to(dev) for n, m in zip(self.model.names, ins)}
        tg_m = {n: m.to(dev) for n, m in zip(self.model.names, tgts)}
        return self.model.correlation_loss(tokens, in_m, tg_m, self.hparams["emd_weight"])

    def _log(self, out: Mapping[str, Tensor], stage: str, bsz: int) -> None:
        self.log(f"{stage}/loss", out["loss"], batch_size=bsz, prog_bar=stage == "train", on_epoch=True,
                 on_step=stage == "train")
        for k, v in out.items():
            if k != "loss":
                self.log(f"{stage}/{k}", v, batch_size=bsz, on_epoch=True, on_step=False)

    def training_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        out = self.compute_losses(batch)
        self._log(out, "train", batch["image"].shape[0])
        return out["loss"]

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        gen = torch.Generator().manual_seed(1000 + batch_idx)  # same masks every validation
        out = self.compute_losses(batch, gen)
        self._log(out, "val", batch["image"].shape[0])
        if batch_idx < self.hparams["generate_batches"]:
            self._gen["pred"].append(self.generate_weather(batch["image"]).cpu())
            self._gen["true"].append(batch["weather"].cpu())

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        gen = torch.Generator().manual_seed(2000 + batch_idx)
        out = self.compute_losses(batch, gen)
        self._log(out, "test", batch["image"].shape[0])
        if batch_idx < self.hparams["generate_batches"]:
            self._gen["pred"].append(self.generate_weather(batch["image"]).cpu())
            self._gen["true"].append(batch["weather"].cpu())

    def _log_generation(self, stage: str) -> None:
        if not self._gen["pred"]:
            return
        pred, true = torch.cat(self._gen["pred"]), torch.cat(self._gen["true"])
        self._gen = {"pred": [], "true": []}
        scores = generation_scores(pred, true, self.tokenizers.weather)
        for k, v in scores.items():
            if np.isfinite(v):
                self.log(f"{stage}/{k}", v)

    def on_validation_epoch_end(self) -> None:
        self._log_generation("val")

    def on_test_epoch_end(self) -> None:
        self._log_generation("test")

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_weather(self, image: Tensor, coords: Tensor | None = None, temperature: float = 0.0,
                         variables: Sequence[str] | None = None) -> Tensor:
        """Weather ``[B, V, L]`` (physical units) generated from images (and coordinates, if given).

        ``variables`` restricts the generation to some weather variables (in that order; default all)."""
        names = list(self.tokenizers.weather)
        variables = list(variables or names)
        was = self.model.training
        self.model.eval()
        given = self.tokenizers.tokenize(image=image, coords=coords)
        targets = [f"weather_{v}" for v in variables]
        out = self.model.generate(given, targets, temperature, banned_ids=self.tokenizers.banned_weather_ids())
        self.model.train(was)
        if variables == names:
            return self.tokenizers.decode_weather(out)
        b, length = image.shape[0], next(iter(out.values())).shape[1]
        filler = {f"weather_{v}": out.get(f"weather_{v}", torch.zeros(b, length, dtype=torch.long, device=image.device))
                  for v in names}
        full = self.tokenizers.decode_weather(filler)
        return full[:, [names.index(v) for v in variables]]


