"""TS-fusion correlation pretraining (Basile et al., 2025, sections 3.3 and 4; appendix A.1).

Every step: the batch's images, daily weather windows and grid coordinates are tokenized
(:class:`~terratorch_eoplugins.models.tsfusion_tokenizers.TSFusionTokenizers`: a small trainable FSQ image
tokenizer, one time-series tokenizer with per-variable statistics, 0.25 degree coordinate tokens), input and target
token budgets are split over the modalities by independent Dirichlet draws
(:func:`~terratorch_eoplugins.models.tsfusion.sample_token_budgets`, ``alpha = 0.5``, budgets ``N_in`` / ``N_tgt``),
and the encoder-decoder minimises the modality-averaged cross-entropy of the target tokens. Optimiser: AdamW
``(0.9, 0.95)``, weight decay 0.05, linear warmup + cosine decay (appendix A.1; gradient clipping 1.0 comes from the
trainer config): the defaults of terratorch's ``optimizer`` / ``optimizer_hparams`` / ``scheduler`` /
``scheduler_hparams`` arguments (:mod:`~terratorch_eoplugins.tasks.optimization`).

Validation also *generates* each weather variable from the image alone (autoregressive, greedy),
decodes the tokens back to physical units and logs the coefficient of determination against the true
series (``val/gen_r2`` and per variable ``val/gen_r2_<var>``), the paper's section 5.2 / appendix C.2 test.

Tokenizers are fitted on the training pairs before the first step (unless loaded), through the train-split
preparation mechanism (:class:`~terratorch_eoplugins.tasks.preparation.TrainSplitPreparation`: the training split's
batches in dataset order), and live in the task's ``state_dict`` (prefix ``tokenizers.``), so a checkpoint carries
them to fine-tuning (:class:`~terratorch_eoplugins.tasks.tsfusion_cropnet.TSFusionCropNetTask`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchgeo.trainers import BaseTask

from terratorch_eoplugins.metrics import generation_scores
from terratorch_eoplugins.models.tsfusion import (
    MODEL_SIZES,
    TSFusionModel,
    load_terramind_weights,
    sample_group_budgets,
    sample_token_budgets,
    sample_token_masks,
)
from terratorch_eoplugins.models.tsfusion_tokenizers import TSFusionTokenizers
from terratorch_eoplugins.tasks.optimization import OptimizerDefaults
from terratorch_eoplugins.tasks.preparation import TrainSplitPreparation

__all__ = ["OPTIMIZATION", "TSFusionPretrainTask"]

#: appendix A.1: AdamW (0.9, 0.95), weight decay 0.05, linear warmup + cosine decay, per step
OPTIMIZATION = OptimizerDefaults("AdamW", {"weight_decay": 0.05, "betas": (0.9, 0.95)}, "WarmupCosine",
                                 {"warmup": 20, "interval": "step"})


class TSFusionPretrainTask(TrainSplitPreparation, BaseTask):
    """Correlation pretraining of :class:`~terratorch_eoplugins.models.tsfusion.TSFusionModel`.

    Batches come from :class:`~terratorch_eoplugins.datamodules.tsfusion.TSFusionPretrainDataModule`
    (``image``, ``weather``, ``coords``).

    Args:
        model: ``tsfusion_tiny`` or ``tsfusion_base`` (size preset), overridable by ``model_kwargs``
            (``dim``, ``encoder_depth``, ``decoder_depth``, ``num_heads``, ``mlp_ratio``).
        weather, before, after, image_size, image_channels: must match the datamodule.
        ts_tokenizer, ts_tokenizer_kwargs, image_tokenizer_kwargs, coords, tokenizer_steps: see
            :class:`~terratorch_eoplugins.models.tsfusion_tokenizers.TSFusionTokenizers` (``tokenizer_steps``
            trains the image and FSQ tokenizers).
        alpha: Dirichlet concentration per modality (a float for all, or ``{modality: alpha}``; 0.5 in the paper).
        dirichlet: ``independent`` (section 4, eq. 3: one Dirichlet over the image-side modalities -- image tokens,
            the raw image and coordinates -- and an independent one over the weather modalities, each group getting
            ``group_weights`` of the budget) or ``joint`` (one Dirichlet over all modalities; earlier behaviour).
        group_weights: budget shares of the (image, time-series) groups with ``independent`` (the paper gives none:
            equal shares).
        raw_patch_size: add the input-only raw image modality (appendix A.1: "one untokenized image modality was
            emphasized (alpha = 1000) and never a target"), patches of this side (TerraMind: 16); ``None``: none.
        raw_alpha: its Dirichlet concentration in the input draw (1000 in the paper).
        terramind_ckpt_path: warm start (section 4) from a local TerraMind checkpoint, the file terratorch's
            ``terramind_v1_base`` loads (``TerraMind_v1_base.pt``), with ``model: tsfusion_base``
            (:func:`~terratorch_eoplugins.models.tsfusion.load_terramind_weights`); ``None``: random init.
        terramind_image_modality, terramind_raw_modality: the TerraMind modalities whose embeddings initialise the
            image-token and raw-image modalities (defaults ``tok_sen2l2a@224`` and ``untok_sen2rgb@224``).
        input_budget, target_budget: ``N_in`` and ``N_tgt`` (128 / 128 in the paper).
        lr, optimizer, optimizer_hparams, scheduler, scheduler_hparams: as in terratorch's tasks; defaults:
            ``AdamW`` with ``{weight_decay: 0.05, betas: [0.9, 0.95]}``, ``WarmupCosine`` with
            ``{warmup: 20, interval: step}`` (``total``: the trainer's estimated steps).
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
                 target_budget: int = 64, lr: float = 1e-3, optimizer: str = OPTIMIZATION.optimizer,
                 optimizer_hparams: dict[str, Any] | None = None, scheduler: str | None = OPTIMIZATION.scheduler,
                 scheduler_hparams: dict[str, Any] | None = None, generate_batches: int = 1,
                 emd_weight: float = 1.0, dirichlet: str = "independent",
                 group_weights: Sequence[float] | None = None, raw_patch_size: int | None = None,
                 raw_alpha: float = 1000.0, terramind_ckpt_path: str | None = None,
                 terramind_image_modality: str = "tok_sen2l2a@224",
                 terramind_raw_modality: str = "untok_sen2rgb@224") -> None:
        if dirichlet not in ("independent", "joint"):
            raise ValueError(f"dirichlet must be 'independent' (paper eq. 3) or 'joint', got {dirichlet!r}")
        if raw_alpha <= 0:
            raise ValueError(f"raw_alpha must be > 0, got {raw_alpha}")
        if model not in MODEL_SIZES:
            raise ValueError(f"model must be one of {sorted(MODEL_SIZES)}, got {model!r}")
        if input_budget < 1 or target_budget < 1:
            raise ValueError(f"input_budget and target_budget must be >= 1, got {input_budget}, {target_budget}")
        OPTIMIZATION.check(optimizer, optimizer_hparams, scheduler, scheduler_hparams)
        super().__init__()

    def configure_models(self) -> None:
        """Build the tokenizers and the correlation model."""
        hp = self.hparams
        self.tokenizers = TSFusionTokenizers(hp["weather"], hp["before"] + 1 + hp["after"], hp["image_size"],
                                             hp["image_channels"], hp["ts_tokenizer"], hp["ts_tokenizer_kwargs"],
                                             hp["image_tokenizer_kwargs"], hp["coords"],
                                             image_steps=hp["tokenizer_steps"], fsq_steps=hp["tokenizer_steps"],
                                             raw_patch_size=hp.get("raw_patch_size"))
        dim, enc, dec, heads = MODEL_SIZES[hp["model"]]
        kw = dict(dim=dim, encoder_depth=enc, decoder_depth=dec, num_heads=heads)
        kw.update(dict(hp["model_kwargs"] or {}))
        self.model = TSFusionModel(self.tokenizers.modalities(), **kw)
        if hp.get("terramind_ckpt_path"):
            load_terramind_weights(self.model, hp["terramind_ckpt_path"], hp.get("terramind_image_modality",
                                   "tok_sen2l2a@224"), hp.get("terramind_raw_modality", "untok_sen2rgb@224"))
        alpha = hp["alpha"]
        names = self.model.names
        if isinstance(alpha, Mapping):
            unknown = [k for k in alpha if k not in names]
            if unknown:
                raise ValueError(f"alpha names unknown modalities {unknown}; modalities are {names}")
            values = [float(alpha.get(n, 0.5)) for n in names]
        else:
            values = [float(alpha)] * len(names)
        raw = [s.is_raw for s in self.model.specs]
        if not (isinstance(alpha, Mapping) and any(n in alpha for n, r in zip(names, raw) if r)):
            values = [float(hp.get("raw_alpha", 1000.0)) if r else v for v, r in zip(values, raw)]
        # eq. 3 groups: 0 = image side (image tokens, raw image, coordinates), 1 = time series (weather)
        self.groups = [1 if n.startswith("weather_") else 0 for n in names]
        #: target draw: raw (input-only) modalities never get targets
        self.target_groups = [-1 if r else g for g, r in zip(self.groups, raw)]
        self.register_buffer("alphas", torch.tensor(values, dtype=torch.float64), persistent=False)
        self.register_buffer("limits", torch.tensor([s.num_tokens for s in self.model.specs]), persistent=False)
        self._gen: dict[str, list[Tensor]] = {"pred": [], "true": []}

    def configure_optimizers(self) -> dict[str, Any]:
        """The ``optimizer`` and ``scheduler`` arguments (default: AdamW (0.9, 0.95), warmup + cosine, appendix A.1)."""
        return OPTIMIZATION.configure(self, self.model.parameters())

    # ------------------------------------------------------------------ tokenizers
    def fit_tokenizers(self, images: Tensor, weather: Tensor, max_steps: int | None = None) -> dict[str, float]:
        """Fit the tokenizers on training pairs (done automatically before the first step of any stage)."""
        return self.tokenizers.fit(images, weather, seed=0, max_steps=max_steps)

    def needs_preparation(self) -> bool:
        """Tokenizers not fitted yet (neither loaded from a checkpoint nor fitted by :meth:`fit_tokenizers`)."""
        return not self.tokenizers.fitted

    def prepare_from_train_split(self, batches: Iterable[Mapping[str, Any]]) -> None:
        """Fit the tokenizers on every training pair (``image`` and ``weather`` of the batches, in dataset order).

        Reading the batches leaves the global random state as it was (:func:`train_split_batches`), so training
        draws the same masks as without this preparation.
        """
        images, weather = [], []
        for batch in batches:
            self._check_batch(batch)
            images.append(batch["image"])
            weather.append(batch["weather"])
        if not images:
            raise RuntimeError("TSFusionPretrainTask: the training split has no pair to fit the tokenizers on")
        # a fast_dev_run smoke test only checks the wiring: 2 tokenizer training steps
        fast = bool(self._trainer is not None and self.trainer.fast_dev_run)
        self.fit_tokenizers(torch.cat(images), torch.cat(weather), 2 if fast else None)

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
        alphas, limits = self.alphas.cpu(), self.limits.cpu()
        if hp.get("dirichlet", "independent") == "joint":
            n_in = sample_token_budgets(alphas, hp["input_budget"], limits, b, generator)
            keep = torch.tensor([g >= 0 for g in self.target_groups])
            n_tg = torch.zeros_like(n_in)
            n_tg[:, keep] = sample_token_budgets(alphas[keep], hp["target_budget"], limits[keep], b, generator)
        else:
            gw = hp.get("group_weights")
            n_in = sample_group_budgets(alphas, self.groups, hp["input_budget"], limits, b, generator, gw)
            present = sorted({g for g in self.target_groups if g >= 0})
            gw_t = None if gw is None else [list(gw)[g] for g in present]
            n_tg = sample_group_budgets(alphas, self.target_groups, hp["target_budget"], limits, b, generator, gw_t)
        empty = n_in.sum(1) == 0  # every sample needs one input token to attend to
        if bool(empty.any()):
            n_in[empty, 0] = 1
        ins, tgts = sample_token_masks(n_in, n_tg, [s.num_tokens for s in self.model.specs], generator)
        dev = next(iter(tokens.values())).device
        in_m = {n: m.to(dev) for n, m in zip(self.model.names, ins)}
        tg_m = {n: m.to(dev) for n, m, s in zip(self.model.names, tgts, self.model.specs) if not s.is_raw}
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


