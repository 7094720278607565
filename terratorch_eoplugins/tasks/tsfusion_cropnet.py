"""CropNet county yield fine-tuning of the TS-fusion encoder (Basile et al., 2025, section 4 and appendix A.2).

For every county-year the encoder embeds each (grid, date) sample separately (image tokens + the
grid's daily weather window around the date, as the pretraining pairs of
:mod:`terratorch_eoplugins.datasets.tsfusion`), the token embeddings are pooled by mean pooling
(MP) or modality mean pooling (MMP) and averaged over the county's grids and dates, and the head
``y = MLP(z) + 0.1 W_r z`` predicts the (standardised) log yield under MSE (Fig. 4, appendix A.2).
The decoder of pretraining is dropped.

Initialisation: from scratch (random encoder) or from a pretraining checkpoint
(``backbone_ckpt_path``: a ``TSFusionPretrainTask`` Lightning checkpoint read with
``torch.load(weights_only=True)``; it also provides the fitted tokenizers; without it one warning is logged).
Without a checkpoint the tokenizers are fitted on the train split's pairs before the first step, through the
train-split preparation mechanism (:class:`~terratorch_eoplugins.tasks.preparation.TrainSplitPreparation`;
``tokenizer_ckpt`` can supply the tokenizers of a pretraining run while keeping a random encoder: the "from
scratch" arm of the paper, which shares TerraMind's tokenizers). Checkpoints of this task are self-contained
(:mod:`terratorch_eoplugins.models.pretrained`): encoder and tokenizers are in the ``state_dict``, so they store
``backbone_ckpt_path: null``, ``tokenizer_ckpt: null`` and ``backbone_pretrained_from``.

Metrics (validation and test epochs, torchmetrics, synchronised over DDP ranks): ``RMSE``, ``MAE``, Pearson ``r``,
``r2_pearson`` (squared Pearson r, the MMST-ViT protocol's "R^2") and ``R2`` (the coefficient of determination
``1 - SS_res / SS_tot``) on yields, i.e. ``exp`` of the log-yield predictions, destandardised with the batch's
``label_mean`` / ``label_std`` (the same values as :func:`~terratorch_eoplugins.metrics.cropnet_metrics`).

Optimiser: terratorch's ``optimizer`` / ``optimizer_hparams`` / ``scheduler`` / ``scheduler_hparams`` arguments
(:mod:`~terratorch_eoplugins.tasks.optimization`); default AdamW (weight decay 0.01) with a linear warmup of
``scheduler_hparams.warmup_epochs`` and cosine decay, stepped per optimiser step (appendix A.2).

The task reads only its batches. They come from :class:`~terratorch_eoplugins.datamodules.cropnet.CropNetDataModule`
with ``grid_aggregation: none``, ``normalize: false`` (the tokenizers see raw values), the daily weather windows cut
on the data side (``window_weather``, ``window_before``, ``window_after``: the task's ``weather``, ``before`` and
``after``) and ``batch_keys:`` :data:`REQUIRED_KEYS`
(``[weather_windows, grid_mask, time_mask, grid_coords, label_mean, label_std]``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchgeo.trainers import BaseTask
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, PearsonCorrCoef, R2Score

from terratorch_eoplugins.errors import EODataError
from terratorch_eoplugins.models.pretrained import (
    PRETRAINED_FLAG,
    log_restored,
    reject_renamed_flags,
    resolve_source,
    self_contained_hparams,
    warn_no_pretrained,
)
from terratorch_eoplugins.models.tsfusion import (
    MODEL_SIZES,
    TSFusionModel,
    TSFusionRegressor,
    load_tsfusion_weights,
)
from terratorch_eoplugins.models.tsfusion_tokenizers import TSFusionTokenizers
from terratorch_eoplugins.runtime import read_checkpoint
from terratorch_eoplugins.tasks.optimization import OptimizerDefaults
from terratorch_eoplugins.tasks.preparation import TrainSplitPreparation

__all__ = ["OPTIMIZATION", "PAIR_KEYS", "REQUIRED_KEYS", "TSFusionCropNetTask", "county_pairs", "cropnet_yield_metrics"]

#: appendix A.2: AdamW, weight decay 0.01, linear warmup (``warmup_epochs``, in epochs) + cosine decay, per step
OPTIMIZATION = OptimizerDefaults("AdamW", {"weight_decay": 0.01}, "WarmupCosine",
                                 {"warmup_epochs": 0.0, "interval": "step"})


def cropnet_yield_metrics() -> MetricCollection:
    """The CropNet yield metrics as torchmetrics (DDP-synchronised): ``RMSE``, ``MAE``, ``r`` and ``R2`` (coefficient
    of determination); ``r2_pearson`` is ``r ** 2`` (logged by the task). States in float64."""
    metrics = MetricCollection({"RMSE": MeanSquaredError(squared=False), "MAE": MeanAbsoluteError(),
                                "r": PearsonCorrCoef(), "R2": R2Score()})
    return metrics.set_dtype(torch.float64)

#: batch keys (besides ``image``) from which :func:`county_pairs` cuts the (grid, date) pairs
PAIR_KEYS = ("weather_windows", "grid_mask", "time_mask", "grid_coords")
#: the ``batch_keys`` of the CropNetDataModule: the pair keys and the label statistics of the yield metrics
REQUIRED_KEYS = (*PAIR_KEYS, "label_mean", "label_std")


def county_pairs(batch: Mapping[str, Any]) -> tuple[list[dict[str, Tensor]], Tensor]:
    """Per-county (grid, date) pairs of a collated CropNet batch (padding removed).

    Reads ``image [B, T, G, C, H, W]``, ``weather_windows [B, T, G, V, L]`` (the daily weather windows around
    every image date, cut on the data side), ``grid_mask``, ``time_mask`` and ``grid_coords``.

    Returns a list (one per county) of ``image [S, C, H, W]``, ``weather [S, V, L]``, ``coords [S, 2]``
    and the number of samples ``S = T * G`` of each county (date-major order, ``t * G + g``).
    """
    missing = [k for k in ("image", *PAIR_KEYS) if k not in batch]
    if missing:
        raise KeyError(f"TS-fusion CropNet batches need {missing}: set the CropNetDataModule's batch_keys to "
                       f"{list(REQUIRED_KEYS)}, window_weather / window_before / window_after to the task's weather / "
                       "before / after, and grid_aggregation: none")
    image = batch["image"]
    if image.ndim != 6:
        raise ValueError(f"batch['image'] must be [B, T, G, C, H, W] (grid_aggregation: none), got "
                         f"{tuple(image.shape)}")
    windows = batch["weather_windows"]
    if windows.ndim != 5 or windows.shape[:3] != image.shape[:3]:
        raise ValueError(f"batch['weather_windows'] must be [B, T, G, V, L] with the image's B, T, G "
                         f"{tuple(image.shape[:3])}, got {tuple(windows.shape)}")
    out, counts = [], []
    for b in range(image.shape[0]):
        g = int(batch["grid_mask"][b].sum())
        t = int(batch["time_mask"][b].sum())
        if g == 0:
            raise EODataError(f"county {batch.get('fips', ['?'] * (b + 1))[b]}: no grids (grid_mask is all False); "
                              "a county without grids cannot be predicted")
        wins = windows[b, :t, :g]  # [T, G, V, L]
        if not bool(torch.isfinite(wins).all()):
            raise EODataError("weather_windows has non-finite values; the CropNet reader fills missing days, so the "
                              "data were modified after reading")
        img = image[b, :t, :g]
        coords = batch["grid_coords"][b, :g].float().mean(1)
        out.append({"image": img.reshape(t * g, *img.shape[2:]), "weather": wins.reshape(t * g, *wins.shape[2:]),
                    "coords": coords[None].expand(t, -1, -1).reshape(t * g, 2)})
        counts.append(t * g)
    return out, torch.tensor(counts)


class TSFusionCropNetTask(TrainSplitPreparation, BaseTask):
    """County yield regression with the TS-fusion encoder, MP or MMP pooling and the 0.1-residual MLP head.

    Args:
        model, model_kwargs: encoder size preset (``tsfusion_tiny`` / ``tsfusion_base``) and overrides; must
            match the pretraining run when ``backbone_ckpt_path`` is set.
        pooling: ``mp`` (mean pooling) or ``mmp`` (modality mean pooling).
        backbone_ckpt_path: pretraining checkpoint (encoder + tokenizers); ``None`` trains from scratch.
        tokenizer_ckpt: checkpoint to take only the tokenizers from (random encoder).
        weather, before, after, image_size, image_channels, ts_tokenizer, ts_tokenizer_kwargs,
            image_tokenizer_kwargs, tokenizer_steps: tokenizer settings (as in pretraining).
        use_modalities: modalities fed to the encoder (default image + weather, as the paper's downstream model).
        hidden_dim, dropout, residual_scale: head (appendix A.2: dropout 0.25, residual 0.1).
        encoder_dropout, attn_dropout, drop_path: encoder regularisation of appendix A.2 ("dropout at 0.25, attention
            dropout at 0.3, and stochastic depth at 0.5"; :class:`~terratorch_eoplugins.models.tsfusion.TSFusionModel`
            ``drop``, ``attn_drop``, ``drop_path``); 0 / 0 / 0 was the earlier behaviour.
        raw_patch_size: the input-only raw image modality of pretraining (must match the pretraining run; the
            downstream model feeds it only when ``use_modalities`` names ``untok_image``).
        activation_checkpointing: recompute the encoder blocks in backward (saves activation memory at the cost of a
            second forward; the same results: dropout draws are replayed).
        lr: base learning rate (paper: 5e-5; larger rates for short CPU runs).
        optimizer, optimizer_hparams, scheduler, scheduler_hparams: as in terratorch's tasks; defaults: ``AdamW``
            with ``{weight_decay: 0.01}``, ``WarmupCosine`` with ``{warmup_epochs: 0, interval: step}``.
            ``scheduler_hparams.warmup_epochs`` is the linear warmup before the cosine decay (appendix A.2: 5 of 200
            epochs); it keeps the first, large gradients of the random head from overwriting a pretrained encoder.
        encoder_lr_scale: the encoder's learning rate is ``lr * encoder_lr_scale`` (1: one rate, as the paper).
        train_samples_per_county: during training, pool a random subset of this many (grid, date) samples per
            county (compute saving and augmentation; ``None`` = all). Validation and test always use all.
        backbone_pretrained_from: written by self-contained checkpoints: the file the weights came from, never read.
        pretrained_ckpt: former name of ``backbone_ckpt_path``; an error naming it.
    """

    monitor = "val/loss"
    ignore = ("weights", "pretrained_ckpt")

    def __init__(self, model: str = "tsfusion_tiny", model_kwargs: Mapping[str, Any] | None = None,
                 pooling: Literal["mp", "mmp"] = "mmp", backbone_ckpt_path: str | None = None,
                 tokenizer_ckpt: str | None = None, weather: Sequence[str] = ("tavg", "tmax", "tmin", "precip"),
                 before: int = 29, after: int = 10, image_size: int = 32, image_channels: int = 3,
                 ts_tokenizer: str = "uniform", ts_tokenizer_kwargs: Mapping[str, Any] | None = None,
                 image_tokenizer_kwargs: Mapping[str, Any] | None = None, tokenizer_steps: int = 200,
                 use_modalities: Sequence[str] | None = None, hidden_dim: int = 128, dropout: float = 0.25,
                 residual_scale: float = 0.1, lr: float = 1e-3, optimizer: str = OPTIMIZATION.optimizer,
                 optimizer_hparams: dict[str, Any] | None = None, scheduler: str | None = OPTIMIZATION.scheduler,
                 scheduler_hparams: dict[str, Any] | None = None, train_samples_per_county: int | None = None,
                 encoder_lr_scale: float = 1.0, backbone_pretrained_from: str | None = None,
                 pretrained_ckpt: str | None = None, encoder_dropout: float = 0.25, attn_dropout: float = 0.3,
                 drop_path: float = 0.5, raw_patch_size: int | None = None,
                 activation_checkpointing: bool = False) -> None:
        reject_renamed_flags("TSFusionCropNetTask", pretrained_ckpt=pretrained_ckpt)
        if pooling not in ("mp", "mmp"):
            raise ValueError(f"pooling must be 'mp' or 'mmp', got {pooling!r}")
        if model not in MODEL_SIZES:
            raise ValueError(f"model must be one of {sorted(MODEL_SIZES)}, got {model!r}")
        if train_samples_per_county is not None and train_samples_per_county < 1:
            raise ValueError(f"train_samples_per_county must be >= 1 or None, got {train_samples_per_county}")
        OPTIMIZATION.check(optimizer, optimizer_hparams, scheduler, scheduler_hparams)
        if encoder_lr_scale < 0:
            raise ValueError(f"encoder_lr_scale must be >= 0, got {encoder_lr_scale}")
        super().__init__()

    def configure_models(self) -> None:
        """Tokenizers, encoder (no decoder) and regressor; optionally load pretrained weights."""
        hp = self.hparams
        self.tokenizers = TSFusionTokenizers(hp["weather"], hp["before"] + 1 + hp["after"], hp["image_size"],
                                             hp["image_channels"], hp["ts_tokenizer"], hp["ts_tokenizer_kwargs"],
                                             hp["image_tokenizer_kwargs"], coords=True,
                                             image_steps=hp["tokenizer_steps"], fsq_steps=hp["tokenizer_steps"],
                                             raw_patch_size=hp.get("raw_patch_size"))
        dim, enc, dec, heads = MODEL_SIZES[hp["model"]]
        kw = dict(dim=dim, encoder_depth=enc, decoder_depth=dec, num_heads=heads, drop=hp.get("encoder_dropout", 0.0),
                  attn_drop=hp.get("attn_dropout", 0.0), drop_path=hp.get("drop_path", 0.0))
        kw.update(dict(hp["model_kwargs"] or {}))
        encoder = TSFusionModel(self.tokenizers.modalities(), with_decoder=False, **kw)
        encoder.activation_checkpointing = bool(hp.get("activation_checkpointing", False))
        use = hp["use_modalities"] or ["image", *[f"weather_{v}" for v in hp["weather"]]]
        self.model = TSFusionRegressor(encoder, hp["pooling"], 1, hp["hidden_dim"], hp["dropout"],
                                       hp["residual_scale"], modalities=use)
        ckpt = hp["backbone_ckpt_path"] or hp["tokenizer_ckpt"]
        if ckpt:
            self._load_tokenizers(ckpt)
        #: absolute path of the pretraining checkpoint the encoder came from (``None``: from scratch)
        self.pretrained_source: str | None = hp.get("backbone_pretrained_from")
        if hp["backbone_ckpt_path"]:
            load_tsfusion_weights(self.model.encoder, hp["backbone_ckpt_path"])
            self.pretrained_source = resolve_source(hp["backbone_ckpt_path"])
        elif self.pretrained_source:
            log_restored(f"TSFusionCropNetTask ({hp['model']})", self.pretrained_source)
        else:
            warn_no_pretrained("TS fusion", PRETRAINED_FLAG, f"the {hp['model']} encoder is random (from scratch)",
                               "pass a TS-fusion pretraining checkpoint (configs/tsfusion_pretrain.yaml) as "
                               f"--model.init_args.{PRETRAINED_FLAG}")
        self._outs: dict[str, list[Tensor]] = {"pred": [], "true": []}

    def configure_metrics(self) -> None:
        """Yield metrics of the validation and test epochs (:func:`cropnet_yield_metrics`)."""
        self.val_yield_metrics = cropnet_yield_metrics()
        self.test_yield_metrics = cropnet_yield_metrics()

    def _load_tokenizers(self, path: str) -> None:
        blob = read_checkpoint(path, "TS-fusion pretraining or tokenizer")
        state = blob.get("state_dict", blob)
        state = state if isinstance(state, Mapping) else {}
        sub = {k[len("tokenizers."):]: v for k, v in state.items() if k.startswith("tokenizers.")}
        if not sub:
            raise ValueError(f"{path}: no 'tokenizers.*' weights (expected a TSFusionPretrainTask checkpoint)")
        own = self.tokenizers.state_dict()
        bad = [k for k in own if k not in sub or sub[k].shape != own[k].shape]
        if bad:
            raise ValueError(f"{path}: tokenizer weights do not match this task's tokenizer settings ({bad[:4]}); use "
                             "the pretraining run's weather, window, image size and tokenizer arguments")
        self.tokenizers.load_state_dict(sub)

    def configure_optimizers(self) -> dict[str, Any]:
        """The ``optimizer`` and ``scheduler`` arguments (default: AdamW, warmup + cosine per step, appendix A.2)
        on two parameter groups: the head at ``lr`` and the encoder at ``lr * encoder_lr_scale``."""
        hp = self.hparams
        lr, scale = hp["lr"], hp.get("encoder_lr_scale", 1.0)
        enc = [p for p in self.model.encoder.parameters() if p.requires_grad]
        head = [p for n, p in self.model.named_parameters() if p.requires_grad and not n.startswith("encoder.")]
        groups = [{"params": head, "lr": lr}] + ([{"params": enc, "lr": lr * scale}] if scale > 0 else [])
        if scale == 0:
            for p in enc:
                p.requires_grad_(False)
        return OPTIMIZATION.configure(self, groups)

    # ------------------------------------------------------------------ tokenizers
    def needs_preparation(self) -> bool:
        """Tokenizers not fitted yet (no ``backbone_ckpt_path`` / ``tokenizer_ckpt`` and not restored)."""
        return not self.tokenizers.fitted

    def prepare_from_train_split(self, batches: Iterable[Mapping[str, Any]]) -> None:
        """Fit the tokenizers on the (grid, date) pairs of every training county (batches in dataset order).

        Reading the batches leaves the global random state as it was (:func:`train_split_batches`).
        """
        images, weather = [], []
        for batch in batches:
            pairs, _ = self._county_pairs(batch)
            images += [p["image"] for p in pairs]
            weather += [p["weather"] for p in pairs]
        if not images:
            raise RuntimeError("TSFusionCropNetTask: the training split has no county to fit the tokenizers on")
        # a fast_dev_run smoke test only checks the wiring: 2 tokenizer training steps
        fast = bool(self._trainer is not None and self.trainer.fast_dev_run)
        self.tokenizers.fit(torch.cat(images), torch.cat(weather), max_steps=2 if fast else None)

    def _county_pairs(self, batch: Mapping[str, Any]) -> tuple[list[dict[str, Tensor]], Tensor]:
        """:func:`county_pairs`, with the batch's windows checked against the task's weather, before and after."""
        pairs, counts = county_pairs(batch)
        hp = self.hparams
        want = (len(hp["weather"]), hp["before"] + 1 + hp["after"])
        got = tuple(pairs[0]["weather"].shape[1:]) if pairs else want
        if got != want:
            raise ValueError(f"the batch's weather windows have {got[0]} variables x {got[1]} days, but the task's "
                             f"weather {list(hp['weather'])}, before {hp['before']} and after {hp['after']} need "
                             f"{want[0]} x {want[1]}: give the CropNetDataModule the same window_weather, "
                             "window_before and window_after")
        return pairs, counts

    def tokens_of(self, batch: Mapping[str, Any], max_samples: int | None = None
                  ) -> tuple[dict[str, Tensor], Tensor]:
        """Token ids ``{modality: [B, S_max, N_m]}`` and sample validity ``[B, S_max]`` of a CropNet batch.

        ``max_samples`` keeps a random subset of at most that many (grid, date) samples per county.
        """
        pairs, counts = self._county_pairs(batch)
        if max_samples is not None:
            for i, p in enumerate(pairs):
                n = len(p["image"])
                if n > max_samples:
                    keep = torch.randperm(n)[:max_samples]
                    pairs[i] = {k: v[keep] for k, v in p.items()}
            counts = torch.tensor([len(p["image"]) for p in pairs])
        image = torch.cat([p["image"] for p in pairs])
        weather = torch.cat([p["weather"] for p in pairs])
        coords = torch.cat([p["coords"] for p in pairs])
        flat = self.tokenizers.tokenize(image, weather, coords)
        b, s_max = len(pairs), int(counts.max())
        valid = torch.arange(s_max)[None] < counts[:, None]
        out = {}
        for name, tok in flat.items():
            full = tok.new_zeros(b, s_max, *tok.shape[1:])
            full[valid] = tok
            out[name] = full
        return out, valid.to(image.device)

    # ------------------------------------------------------------------ steps
    def forward(self, batch: Mapping[str, Any], max_samples: int | None = None) -> Tensor:
        tokens, valid = self.tokens_of(batch, max_samples)
        return self.model(tokens, valid)

    def _step(self, batch: Mapping[str, Any], stage: str) -> Tensor:
        pred = self(batch, self.hparams["train_samples_per_county"] if stage == "train" else None)
        label = batch["label"].float().reshape(pred.shape)
        loss = F.mse_loss(pred, label)
        self.log(f"{stage}/loss", loss, batch_size=pred.shape[0], prog_bar=stage == "train", on_epoch=True,
                 on_step=stage == "train")
        if stage != "train":
            log_pred, log_true = self.destandardize(pred.detach(), batch), self.destandardize(label.detach(), batch)
            getattr(self, f"{stage}_yield_metrics").update(torch.exp(log_pred.double()).ravel(),
                                                          torch.exp(log_true.double()).ravel())
            self._outs["pred"].append(log_pred.cpu())
            self._outs["true"].append(log_true.cpu())
        return loss

    def training_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "test")

    @staticmethod
    def destandardize(x: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """Log units of standardised predictions or labels ``x [B, n]`` of ``batch``: ``x * label_std + label_mean``
        with the batch's label statistics (the datamodule's ``label_mean`` / ``label_std`` keys)."""
        missing = [k for k in ("label_mean", "label_std") if k not in batch]
        if missing:
            raise KeyError(f"TS-fusion CropNet batches need {missing} for the yield metrics: add them to the "
                           f"CropNetDataModule's batch_keys ({list(REQUIRED_KEYS)})")
        return x * batch["label_std"].to(x).reshape(x.shape) + batch["label_mean"].to(x).reshape(x.shape)

    def yield_metrics(self, stage: str) -> dict[str, float]:
        """CropNet metrics of the ``stage``'s epoch on yields, over all DDP ranks (resets them): ``RMSE``, ``MAE``,
        ``r``, ``r2_pearson`` (= r^2) and ``R2`` (coefficient of determination); empty before two county-years."""
        metrics = getattr(self, f"{stage}_yield_metrics")
        if self._outs["pred"]:
            pred, true = torch.cat(self._outs["pred"]), torch.cat(self._outs["true"])
            #: yields (exp of the log predictions / labels) of this rank's last validation or test epoch, for analyses
            self.last_yields = {"pred": torch.exp(pred.double()).ravel(), "true": torch.exp(true.double()).ravel()}
        self._outs = {"pred": [], "true": []}
        n = int(metrics["MAE"].total)
        if self._trainer is not None and self.trainer.world_size > 1:
            n = int(self.trainer.strategy.reduce(torch.tensor(float(n), device=self.device), reduce_op="sum"))
        out: dict[str, float] = {}
        if n >= 2:
            out = {k: float(v) for k, v in metrics.compute().items()}
            out["r2_pearson"] = out["r"] ** 2
        metrics.reset()
        return out

    def _epoch_end(self, stage: str) -> None:
        metrics = self.yield_metrics(stage)
        for k, v in metrics.items():
            if np.isfinite(v):
                self.log(f"{stage}/{k}", v)
        self.last_metrics = {f"{stage}/{k}": v for k, v in metrics.items()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Self-contained hyper-parameters: encoder and tokenizers are in the ``state_dict``, so no pretraining or
        tokenizer file is read when the task is rebuilt (:mod:`terratorch_eoplugins.models.pretrained`)."""
        hp = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY)
        if not isinstance(hp, Mapping):
            return
        updates = {"tokenizer_ckpt": None} if hp.get("tokenizer_ckpt") else {}
        if self.pretrained_source is not None:
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY] = self_contained_hparams(hp, self.pretrained_source, **updates)
        elif updates:
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY] = {**hp, **updates}

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")
