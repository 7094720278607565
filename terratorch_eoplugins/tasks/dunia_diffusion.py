"""DUNIA waveform generation (paper section 3.5, appendix C): latent diffusion conditioned on pixel embeddings ``O^V``.

Pipeline per GEDI footprint of a :class:`~terratorch_eoplugins.datamodules.gedi.GEDIDataModule` chip
(``batch_keys: [footprints, footprint_mask, waveform, shot_number]``):

1. the frozen DUNIA image model gives ``O^V = forward_embeddings(image)["vertical"]`` ``[B, D_p, H, W]``; the
   condition is ``O^V`` at the footprint pixel, L2-normalised;
2. the frozen :class:`~terratorch_eoplugins.nn.waveform.WaveformAutoencoder` encodes and quantizes the footprint's
   waveform: ``z = RVQ(E_w(W))`` ``[16, L/16]``, standardised per channel with statistics of the first
   ``latent_stats_batches`` training batches, read when the diffusion phase starts (stored in the checkpoint;
   LDM's "scale by std");
3. :class:`~terratorch_eoplugins.nn.diffusion1d.KarrasLatentDiffusion` learns ``D(z_t; s, O^V) ~ z_0`` (eq. 13)
   with the condition replaced by a random vector for ``p_uncond = 50%`` of the examples; sampling is the
   Karras ODE sampler (Heun, 30 steps) with classifier-free guidance ``s = 3`` (eq. 14); ``D_w(z_0)`` is the
   generated waveform.

Weights: ``backbone_ckpt_path`` is a DUNIA pretraining checkpoint (:mod:`terratorch_eoplugins.models.dunia`); it
gives the image model and, when it holds them (``model.waveform.*``), the waveform autoencoder trained with it, as
in the paper. ``autoencoder_ckpt_path`` loads the autoencoder from another checkpoint (any state dict whose keys
end in the autoencoder's names, e.g. this task's own checkpoint). Without autoencoder weights, the task first
trains the autoencoder for ``autoencoder_steps`` optimisation steps (reconstruction MSE + RVQ commitment,
section 3.4.3), then freezes it and trains the diffusion model. Without ``backbone_ckpt_path`` the image model is
randomly initialised (a warning is logged): the pipeline runs, but the condition carries only what a random
network extracts from the image.

Evaluation (validation on the first ``val_generate_batches`` batches, test and predict on all): the time-aligned
Pearson r (best shift within ``align_max_shift`` samples; ``r_*_unaligned`` without) between each reference
waveform and (a) the generated waveform, (b) the **retrieval baseline**, the waveform of the
nearest key (cosine) in a database built from the training split when first needed; its keys are, as in the paper
(section 4.1.2), the L2-normalised waveform embeddings ``O^W = embed(E_w(W))`` of the training footprints, queried
with the footprint pixel's ``O^V`` (``retrieval_keys: waveform``, the same database as the zero-shot task's
``keys: waveform``); ``retrieval_keys: vertical`` keys the database by the training footprints' ``O^V`` instead
(pixel-to-pixel, the former behaviour), (c) a random database waveform (chance),
(d) the autoencoder reconstruction (upper bound). ``predict`` writes HDF5 (``predict_output``, default
``<predict_output_dir>/dunia_waveforms.h5``): ``shot_number``,
``generated``, ``retrieved``, ``reference`` ``[G, L]``, the three r values, ``chip``/``row``/``col``.

Both the latent statistics and the retrieval database read the training split through
:func:`~terratorch_eoplugins.tasks.preparation.train_split_batches` (batches in dataset order, through the
datamodule's batch hooks, on the task's device). Called without a trainer (e.g. ``training_step`` by hand), the
first diffusion batch sets the latent statistics and the retrieval and random baselines are skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchgeo.trainers import BaseTask

from terratorch_eoplugins.metrics import aligned_pearson_r, pearson_r
from terratorch_eoplugins.models.dunia import (
    DUNIA_VARIANTS,
    architecture_overrides,
    build_dunia,
    load_dunia_checkpoint,
)
from terratorch_eoplugins.models.pretrained import (
    PRETRAINED_FLAG,
    log_restored,
    reject_renamed_flags,
    resolve_source,
    self_contained_hparams,
    warn_no_pretrained,
)
from terratorch_eoplugins.nn.diffusion1d import CrossAttentionUNet1D, KarrasLatentDiffusion
from terratorch_eoplugins.nn.neighborhood_attention import NeighborhoodAttention2D
from terratorch_eoplugins.nn.waveform import WaveformAutoencoder
from terratorch_eoplugins.runtime import read_checkpoint
from terratorch_eoplugins.tasks.ema import SwitchEMA
from terratorch_eoplugins.tasks.optimization import OptimizerDefaults
from terratorch_eoplugins.tasks.preparation import train_split_batches

__all__ = ["OPTIMIZATION", "DUNIAWaveformDiffusionTask", "build_conditioning_encoder"]

#: AdamW without weight decay at a constant rate (paper: lr 1e-4)
OPTIMIZATION = OptimizerDefaults("AdamW", {"weight_decay": 0.0}, None)

logger = logging.getLogger("terratorch_eoplugins.tasks.dunia_diffusion")

REQUIRED_KEYS = ("image", "footprints", "footprint_mask", "waveform")


def build_conditioning_encoder(variant: str = "tiny", ckpt_path: str | None = None,
                               kwargs: Mapping[str, Any] | None = None,
                               pretrained_from: str | None = None) -> nn.Module:
    """DUNIA image model giving ``O^V``: loaded from ``ckpt_path`` or randomly initialised (:func:`build_dunia`).

    Without ``ckpt_path`` one warning names the flag, unless ``pretrained_from`` says that the weights come from a
    self-contained checkpoint being restored (:mod:`terratorch_eoplugins.models.pretrained`).
    """
    if ckpt_path is not None:
        return load_dunia_checkpoint(ckpt_path, variant=variant, **dict(kwargs or {}))
    if variant not in DUNIA_VARIANTS:
        raise ValueError(f"dunia_variant={variant!r}: expected one of {list(DUNIA_VARIANTS)}")
    if pretrained_from:
        log_restored(f"DUNIA waveform diffusion (DUNIA-{variant})", pretrained_from)
    else:
        warn_no_pretrained("DUNIA", PRETRAINED_FLAG, f"the frozen conditioning DUNIA-{variant} is random",
                           f"pass --model.init_args.{PRETRAINED_FLAG}=<DUNIA pretraining checkpoint>")
    # built with its pretraining heads, then dropped: the seeded initialisation of the task's other modules (drawn
    # after this one) depends on the heads' draws
    return build_dunia(variant, **dict(kwargs or {})).drop_pretraining_heads()


def _autoencoder_state(path: str | Path, ae: nn.Module) -> dict[str, Tensor] | None:
    """Autoencoder weights inside a checkpoint: the keys ``<prefix><name>`` for every autoencoder key ``name``."""
    obj = read_checkpoint(path, "DUNIA pretraining")
    state = obj.get("state_dict", obj)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a Lightning checkpoint or a state dict")
    own = ae.state_dict()
    probe = next(iter(own))
    for key in state:
        if key.endswith(probe):
            prefix = key[: len(key) - len(probe)]
            if all(prefix + k in state for k in own):
                return {k: state[prefix + k] for k in own}
    return None


class DUNIAWaveformDiffusionTask(BaseTask):
    """Latent diffusion of GEDI waveforms conditioned on DUNIA pixel embeddings (section 3.5, appendix C).

    Args:
        dunia_variant: DUNIA image model (``"tiny"`` for CPU/synthetic runs, ``"base"`` = the paper).
        backbone_ckpt_path: DUNIA pretraining checkpoint (image model + waveform AE); ``None``: random image model
            (one warning). Checkpoints of this task are self-contained (:mod:`terratorch_eoplugins.models.pretrained`):
            they store ``backbone_ckpt_path: null``, ``autoencoder_ckpt_path: null`` and ``backbone_pretrained_from``.
        dunia_kwargs: architecture overrides of the image model.
        waveform_length: ``L`` (paper: 256; the datamodule's ``waveform_length`` must match).
        autoencoder_kwargs: extra :class:`WaveformAutoencoder` arguments.
        autoencoder_ckpt_path: checkpoint holding the waveform autoencoder (overrides the one in
            ``backbone_ckpt_path``).
        autoencoder_steps: optimisation steps that train the autoencoder first when no weights are loaded.
        autoencoder_lr: learning rate of that phase.
        unet_kwargs: :class:`CrossAttentionUNet1D` arguments (``model_channels`` 128 = the paper's projection).
        sigma_data, loss_weighting, null_condition: :class:`KarrasLatentDiffusion` arguments.
        p_uncond: probability of dropping the condition in training (paper: 0.5).
        guidance_scale: CFG scale ``s`` (paper: 3).
        num_steps: sampler steps (paper: 30). solver: ``"heun"`` (Karras' ODE solver) or ``"euler"``.
        lr, optimizer, optimizer_hparams, scheduler, scheduler_hparams: as in terratorch's tasks
            (:mod:`~terratorch_eoplugins.tasks.optimization`) for the diffusion model; defaults: ``AdamW`` (paper:
            lr 1e-4) with ``{weight_decay: 0}``, constant rate. The autoencoder phase's group has ``autoencoder_lr``
            and no weight decay.
        normalize_condition: L2-normalise ``O^V`` (the embeddings are compared by cosine in DUNIA).
        database_max_items: cap of the training-split retrieval database (seeded subsample).
        retrieval_keys: keys of the retrieval baseline's database: ``"waveform"`` (``O^W`` of the frozen waveform
            autoencoder; the paper's) or ``"vertical"`` (``O^V`` of the training footprints). ``O^W`` is aligned
            with ``O^V`` only when the autoencoder comes from the DUNIA pretraining checkpoint.
        val_generate_batches: validation batches on which waveforms are generated (sampling is costly).
        val_generate_max: at most this many footprints per such validation batch (test/predict: all).
        predict_output: HDF5 file written by ``predict``; ``None``: ``<predict_output_dir>/dunia_waveforms.h5`` with
            terratorch's ``--predict_output_dir`` (set in ``configs/dunia_gedi_waveform_diffusion.yaml``), else nothing.
        seed: seed of the evaluation noise, null conditions and random baseline.
        na_backend: neighborhood-attention backend of the frozen DUNIA (``"torch"``: the pure-PyTorch reference;
            natten's CPU flex backend materialises the full score matrix and is far slower without a GPU;
            ``None`` keeps the model's own setting).
        cache_conditions: keep each footprint's ``O^V`` by shot number (DUNIA is frozen, so it never changes):
            the image model then runs once per chip over the whole run.
        latent_stats_batches: training batches whose footprints set the per-channel mean/std that standardise the
            latents (``sigma_data = 1``), read once when the diffusion phase starts (:meth:`fit_latent_stats`);
            ``0``: the first diffusion batch alone.
        backbone_pretrained_from: written by self-contained checkpoints: the file the weights came from, never read.
        align_max_shift: the r values are the paper's "time-aligned" Pearson r: each waveform is shifted by the
            lag within +-``align_max_shift`` samples that maximises r (:func:`~terratorch_eoplugins.metrics.
            aligned_pearson_r`; the paper does not say how it aligns, 16 = 1/16 of the 256-sample window is this
            project's choice); ``r_*_unaligned`` are logged beside them. ``0``: no alignment.
        sema_decay, sema_every, sema_switch_every, sema_coefficient: Switch EMA of the diffusion model during the
            diffusion phase (:class:`~terratorch_eoplugins.tasks.ema.SwitchEMA`; paper: decay 0.9 every 5 steps,
            switched in every 1K steps with coefficient 0.9); ``sema_every=0`` disables it. Saved in checkpoints.
        dunia_ckpt_path: former name of ``backbone_ckpt_path``; an error naming it.
    """

    ignore = ("dunia_ckpt_path",)
    monitor = "val/loss"

    def __init__(self, dunia_variant: str = "tiny", backbone_ckpt_path: str | None = None,
                 dunia_kwargs: dict[str, Any] | None = None, waveform_length: int = 256,
                 autoencoder_kwargs: dict[str, Any] | None = None, autoencoder_ckpt_path: str | None = None,
                 autoencoder_steps: int = 300, autoencoder_lr: float = 3e-3, unet_kwargs: dict[str, Any] | None = None,
                 sigma_data: float = 1.0, loss_weighting: Literal["none", "edm"] = "none",
                 null_condition: Literal["random", "learned"] = "random", p_uncond: float = 0.5,
                 guidance_scale: float = 3.0, num_steps: int = 30, solver: Literal["heun", "euler"] = "heun",
                 lr: float = 1e-4, optimizer: str = OPTIMIZATION.optimizer,
                 optimizer_hparams: dict[str, Any] | None = None, scheduler: str | None = OPTIMIZATION.scheduler,
                 scheduler_hparams: dict[str, Any] | None = None,
                 normalize_condition: bool = True,
                 database_max_items: int = 100_000, retrieval_keys: Literal["waveform", "vertical"] = "waveform",
                 val_generate_batches: int = 1, val_generate_max: int = 32,
                 predict_output: str | None = None, seed: int = 0,
                 na_backend: Literal["auto", "natten", "torch"] | None = "torch", cache_conditions: bool = True,
                 latent_stats_batches: int = 64, backbone_pretrained_from: str | None = None,
                 align_max_shift: int = 16, sema_decay: float = 0.9, sema_every: int = 5,
                 sema_switch_every: int = 1000, sema_coefficient: float = 0.9,
                 dunia_ckpt_path: str | None = None) -> None:
        reject_renamed_flags("DUNIAWaveformDiffusionTask", dunia_ckpt_path=dunia_ckpt_path)
        if latent_stats_batches < 0:
            raise ValueError(f"latent_stats_batches must be >= 0, got {latent_stats_batches}")
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if align_max_shift < 0:
            raise ValueError(f"align_max_shift must be >= 0 (samples), got {align_max_shift}")
        if retrieval_keys not in ("waveform", "vertical"):
            raise ValueError(f"retrieval_keys must be 'waveform' (O^W) or 'vertical' (O^V), got {retrieval_keys!r}")
        OPTIMIZATION.check(optimizer, optimizer_hparams, scheduler, scheduler_hparams)
        self._sema = SwitchEMA(sema_decay, sema_every, sema_switch_every, sema_coefficient)  # checks the arguments
        super().__init__()

    # ------------------------------------------------------------------------------------- models
    def configure_models(self) -> None:
        hp = self.hparams
        self.dunia = build_conditioning_encoder(hp["dunia_variant"], hp["backbone_ckpt_path"], hp["dunia_kwargs"],
                                                hp.get("backbone_pretrained_from"))
        #: absolute path of the pretraining checkpoint the image model came from (``None``: random init)
        self.pretrained_source: str | None = (resolve_source(hp["backbone_ckpt_path"]) if hp["backbone_ckpt_path"]
                                              else hp.get("backbone_pretrained_from"))
        for p in self.dunia.parameters():
            p.requires_grad_(False)
        self.dunia.eval()
        if hp["na_backend"] is not None:
            for mod in self.dunia.modules():
                if isinstance(mod, NeighborhoodAttention2D):
                    mod.backend = hp["na_backend"]
        self._cond_cache: dict[int, Tensor] = {}
        self.cond_dim = int(getattr(self.dunia, "out_dim", 64))
        # O^W has the DUNIA model's D_p (as in DUNIAPretrainModel), so a pretraining checkpoint's autoencoder loads
        ae_kwargs = {"embed_dim": self.cond_dim, **dict(hp["autoencoder_kwargs"] or {})}
        self.autoencoder = WaveformAutoencoder(length=hp["waveform_length"], **ae_kwargs)
        loaded = None
        for path in (hp["autoencoder_ckpt_path"], hp["backbone_ckpt_path"]):
            if path is not None:
                loaded = _autoencoder_state(path, self.autoencoder)
                if loaded is not None:
                    self.autoencoder.load_state_dict(loaded)
                    logger.info("DUNIA waveform diffusion: waveform autoencoder loaded from %s", path)
                    break
                if path == hp["autoencoder_ckpt_path"]:
                    raise ValueError(f"autoencoder_ckpt_path={path}: no WaveformAutoencoder weights of length "
                                     f"{hp['waveform_length']} found in this checkpoint")
        self.register_buffer("ae_ready", torch.tensor(loaded is not None))
        net = CrossAttentionUNet1D(in_channels=self.autoencoder.latent_channels, cond_dim=self.cond_dim,
                                   **dict(hp["unet_kwargs"] or {}))
        self.diffusion = KarrasLatentDiffusion(net, self.cond_dim, sigma_data=hp["sigma_data"],
                                               null_condition=hp["null_condition"], loss_weighting=hp["loss_weighting"])
        c = self.autoencoder.latent_channels
        self.register_buffer("latent_mean", torch.zeros(c))
        self.register_buffer("latent_std", torch.ones(c))
        self.register_buffer("stats_ready", torch.tensor(False))
        self._database: dict[str, Tensor] | None = None
        self._eval: dict[str, list[Tensor]] = {}
        self._pred: list[dict[str, Tensor]] = []

    def train(self, mode: bool = True) -> DUNIAWaveformDiffusionTask:
        """Keep the frozen DUNIA (and the autoencoder once frozen) in eval mode."""
        super().train(mode)
        self.dunia.eval()
        if bool(self.ae_ready):
            self.autoencoder.eval()
        return self

    def configure_optimizers(self) -> dict[str, Any]:
        """The ``optimizer`` and ``scheduler`` arguments (default: AdamW, constant rate) on the diffusion model, plus
        the waveform autoencoder (``autoencoder_lr``, no weight decay) while it still has to be trained."""
        hp = self.hparams
        groups: list[dict[str, Any]] = [{"params": list(self.diffusion.parameters())}]
        if not bool(self.ae_ready):
            groups.append({"params": list(self.autoencoder.parameters()), "lr": hp["autoencoder_lr"],
                           "weight_decay": 0.0})
        return OPTIMIZATION.configure(self, groups)

    # ------------------------------------------------------------------------------------ batches
    def footprint_samples(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Valid footprints of a chip batch: ``waveform [G, L]``, ``cond`` (O^V) ``[G, D_p]``, ``chip``, ``row``,
        ``col`` ``[G]`` and ``shot_number`` ``[G]`` (-1 when the batch has none)."""
        missing = [k for k in REQUIRED_KEYS if k not in batch]
        if missing:
            raise KeyError(f"DUNIA waveform diffusion: batch lacks {missing}; set the datamodule's batch_keys to "
                           "[footprints, footprint_mask, waveform, shot_number]")
        image, foot, wave = batch["image"], batch["footprints"], batch["waveform"]
        fmask = batch["footprint_mask"].bool()
        if wave.shape[-1] != self.autoencoder.length:
            raise ValueError(f"DUNIA waveform diffusion: batch waveforms have {wave.shape[-1]} samples but the model "
                             f"was built with waveform_length={self.autoencoder.length}; set the datamodule's "
                             f"waveform_length (and waveform_mode: resample) to match")
        chip, k = torch.nonzero(fmask, as_tuple=True)
        rows, cols = foot[chip, k, 0], foot[chip, k, 1]
        out = {"waveform": wave[chip, k].float(), "chip": chip, "row": rows, "col": cols,
               "shot_number": batch["shot_number"][chip, k] if "shot_number" in batch else torch.full_like(chip, -1)}
        if len(chip) == 0:
            out["cond"] = image.new_zeros(0, self.cond_dim)
            return out
        shots = out["shot_number"].tolist()
        use_cache = self.hparams["cache_conditions"] and min(shots) >= 0
        if use_cache and all(sn in self._cond_cache for sn in shots):
            out["cond"] = torch.stack([self._cond_cache[sn] for sn in shots]).to(image.device)
            return out
        with torch.no_grad():
            ov = self.dunia.forward_embeddings(image)["vertical"]
        cond = ov[chip, :, rows, cols]
        if not torch.isfinite(cond).all():
            raise ValueError("DUNIA waveform diffusion: the pixel embeddings O^V contain NaN/Inf (check the image "
                             "and the DUNIA checkpoint)")
        out["cond"] = F.normalize(cond, dim=1) if self.hparams["normalize_condition"] else cond
        if use_cache:
            self._cond_cache.update(zip(shots, out["cond"].detach().cpu()))
        return out

    def latents(self, waveform: Tensor, update_stats: bool = False) -> Tensor:
        """Standardised quantized latents ``[G, 16, L/16]`` of the frozen autoencoder."""
        self.autoencoder.eval()
        with torch.no_grad():
            zq, _, _ = self.autoencoder.quantize(self.autoencoder.encode(waveform))
        if not bool(self.stats_ready):
            mean, std = self._latent_moments(zq, store=update_stats)
            return (zq - mean[None, :, None]) / std[None, :, None]
        return (zq - self.latent_mean[None, :, None]) / self.latent_std[None, :, None]

    def _latent_moments(self, zq: Tensor, store: bool) -> tuple[Tensor, Tensor]:
        """Per-channel mean and std of quantized latents ``[G, C, T]``; ``store`` keeps them as the standardisation."""
        mean, std = zq.mean(dim=(0, 2)), zq.std(dim=(0, 2)).clamp_min(1e-6)
        if store:
            self.latent_mean.copy_(mean)
            self.latent_std.copy_(std)
            self.stats_ready.fill_(True)
        return mean, std

    @torch.no_grad()
    def fit_latent_stats(self, waveforms: Iterable[Tensor]) -> int:
        """Set the latent standardisation (per-channel mean and std of the frozen autoencoder's quantized latents)
        from chunks of footprint waveforms ``[G, L]``, pooled; returns the number of footprints."""
        self.autoencoder.eval()
        zs = [self.autoencoder.quantize(self.autoencoder.encode(w.float().to(self.latent_mean.device)))[0]
              for w in waveforms if len(w)]
        if not zs:
            raise ValueError("DUNIA waveform diffusion: no GEDI footprint in the waveforms given to fit_latent_stats "
                             "(the training split needs footprints with waveforms)")
        z = torch.cat(zs)
        self._latent_moments(z, store=True)
        return len(z)

    def decode_latents(self, x: Tensor) -> Tensor:
        """Generated standardised latents -> waveforms ``[G, L]`` with the frozen decoder."""
        z = x * self.latent_std[None, :, None] + self.latent_mean[None, :, None]
        with torch.no_grad():
            return self.autoencoder.decode(z)

    @torch.no_grad()
    def generate(self, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Waveforms ``[G, L]`` for conditions ``[G, D_p]``: Karras sampler + CFG, then ``D_w``."""
        hp = self.hparams
        shape = (self.autoencoder.latent_channels, self.autoencoder.latent_length)
        x = self.diffusion.sample(cond, shape, num_steps=hp["num_steps"], guidance_scale=hp["guidance_scale"],
                                  solver=hp["solver"], generator=generator)
        return self.decode_latents(x)

    # ----------------------------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor | None:
        s = self.footprint_samples(batch)
        g = len(s["waveform"])
        if g == 0:
            logger.warning("DUNIA waveform diffusion: training batch %d has no GEDI footprint; skipped", batch_idx)
            return None
        if not bool(self.ae_ready):
            if self.global_step < self.hparams["autoencoder_steps"]:
                self.autoencoder.train()
                out = self.autoencoder(s["waveform"])
                rec = self.autoencoder.reconstruction_loss(s["waveform"], out["recon"])
                loss = rec + out["commit_loss"]
                self.log("train/ae_recon", rec, batch_size=g, on_step=True, on_epoch=True)
                self.log("train/loss", loss, batch_size=g, prog_bar=True, on_step=True, on_epoch=True)
                return loss
            self.ae_ready.fill_(True)
            self.autoencoder.eval()
            for p in self.autoencoder.parameters():
                p.requires_grad_(False)
            logger.info("DUNIA waveform diffusion: autoencoder frozen after %d steps", self.global_step)
        if not bool(self.stats_ready) and self.hparams["latent_stats_batches"] > 0 and self._trainer is not None:
            batches = train_split_batches(self._trainer, self, self.hparams["latent_stats_batches"],
                                          "DUNIA waveform diffusion (latent statistics)")
            n = self.fit_latent_stats(b["waveform"][b["footprint_mask"].bool()] for b in batches)
            logger.info("DUNIA waveform diffusion: latent statistics from %d training footprints", n)
        z0 = self.latents(s["waveform"], update_stats=True)
        loss = self.diffusion.loss(z0, s["cond"], self.hparams["p_uncond"])
        self.log("train/loss", loss, batch_size=g, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train/diffusion_loss", loss, batch_size=g, on_step=False, on_epoch=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Switch EMA of the diffusion model after each optimiser step of the diffusion phase."""
        if outputs is not None and bool(self.ae_ready):
            self._sema.step(self.diffusion.named_parameters())

    # --------------------------------------------------------------------------------- evaluation
    def _generator(self, batch_idx: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.hparams["seed"]) * 100003 + batch_idx)

    @torch.no_grad()
    def waveform_keys(self, waveform: Tensor) -> Tensor:
        """L2-normalised waveform embeddings ``O^W = embed(E_w(W))`` ``[G, D_p]`` of the frozen autoencoder."""
        self.autoencoder.eval()
        return F.normalize(self.autoencoder.embed(self.autoencoder.encode(waveform.float())), dim=1)

    def build_database(self) -> dict[str, Tensor] | None:
        """Training-split retrieval database: L2-normalised keys (``O^W`` of the footprints' waveforms, or their
        ``O^V`` with ``retrieval_keys: vertical``) with the waveforms and shot numbers (built on first use from the
        training split; ``None`` without a trainer)."""
        if self._database is not None:
            return self._database
        if self._trainer is None:
            logger.warning("DUNIA waveform diffusion: no trainer, hence no training split; retrieval and random "
                           "baselines skipped")
            return None
        keys, waves, shots = [], [], []
        for batch in train_split_batches(self._trainer, self, what="DUNIA waveform diffusion (retrieval database)"):
            s = self.footprint_samples(batch)
            if self.hparams.get("retrieval_keys", "waveform") == "waveform":
                keys.append(self.waveform_keys(s["waveform"]) if len(s["waveform"]) else s["cond"])
            else:
                keys.append(F.normalize(s["cond"], dim=1))
            waves.append(s["waveform"])
            shots.append(s["shot_number"])
        db = {"keys": torch.cat(keys), "waveform": torch.cat(waves), "shot_number": torch.cat(shots)}
        n_max = int(self.hparams["database_max_items"])
        if len(db["keys"]) > n_max:
            idx = torch.randperm(len(db["keys"]), generator=torch.Generator().manual_seed(self.hparams["seed"]))[:n_max]
            db = {k: v[idx.to(v.device)] for k, v in db.items()}
        if len(db["keys"]) == 0:
            logger.warning("DUNIA waveform diffusion: the training split has no footprint; no retrieval database")
            return None
        self._database = db
        return db

    def retrieve(self, cond: Tensor) -> Tensor:
        """Retrieval baseline: the database waveform of the key (``O^W``, or ``O^V``) nearest to the pixel's ``O^V``
        (cosine)."""
        db = self.build_database()
        if db is None:
            raise RuntimeError("DUNIA waveform diffusion: no retrieval database (needs a trainer whose data has a "
                               "training split)")
        sim = F.normalize(cond, dim=1) @ db["keys"].T
        return db["waveform"][sim.argmax(1)]

    def _correlations(self, waveforms: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
        """Pearson r to the reference after the best time shift within ``align_max_shift`` samples (the paper's
        time-aligned r) and without any shift."""
        plain = pearson_r(waveforms, ref)
        shift = int(self.hparams["align_max_shift"])
        return (aligned_pearson_r(waveforms, ref, shift)[0] if shift > 0 else plain), plain

    def evaluate_footprints(self, s: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Generated, retrieved, random and reconstructed waveforms with their Pearson r to the reference."""
        g = self._generator(batch_idx)
        ref = s["waveform"]
        out = {"reference": ref, "generated": self.generate(s["cond"], g)}
        with torch.no_grad():
            out["reconstructed"] = self.autoencoder(ref)["recon"] if bool(self.ae_ready) else torch.zeros_like(ref)
        for name in ("generated", "reconstructed"):
            out[f"r_{name}"], out[f"r_{name}_unaligned"] = self._correlations(out[name], ref)
        db = self.build_database()
        if db is not None:
            out["retrieved"] = self.retrieve(s["cond"])
            rnd = torch.randint(0, len(db["waveform"]), (len(ref),), generator=g).to(ref.device)
            out["random"] = db["waveform"][rnd]
            for name in ("retrieved", "random"):
                out[f"r_{name}"], out[f"r_{name}_unaligned"] = self._correlations(out[name], ref)
        return out

    def _eval_step(self, batch: Any, batch_idx: int, stage: str, generate: bool) -> None:
        s = self.footprint_samples(batch)
        n = len(s["waveform"])
        if n == 0:
            logger.warning("DUNIA waveform diffusion: %s batch %d has no GEDI footprint; skipped", stage, batch_idx)
            return
        z0 = self.latents(s["waveform"])
        with torch.no_grad():
            loss = self.diffusion.loss(z0, s["cond"], self.hparams["p_uncond"], generator=self._generator(batch_idx))
        self.log(f"{stage}/loss", loss, batch_size=n, on_epoch=True, on_step=False, prog_bar=stage == "val")
        if generate:
            if stage == "val" and n > self.hparams["val_generate_max"]:
                s = {k: v[: self.hparams["val_generate_max"]] for k, v in s.items()}
            res = self.evaluate_footprints(s, batch_idx)
            for k, v in res.items():
                if k.startswith("r_"):
                    self._eval.setdefault(k, []).append(v.detach().cpu())

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, "val", batch_idx < self.hparams["val_generate_batches"])

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, batch_idx, "test", True)

    def _log_correlations(self, stage: str) -> None:
        for k, parts in self._eval.items():
            r = torch.cat(parts)
            ok = torch.isfinite(r)
            if ok.any():
                self.log(f"{stage}/{k}", r[ok].mean(), batch_size=int(ok.sum()))
        self._eval = {}

    def on_validation_epoch_end(self) -> None:
        self._log_correlations("val")

    def on_test_epoch_end(self) -> None:
        self._log_correlations("test")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the Switch-EMA state."""
        state = checkpoint.get("dunia_sema")
        if state is not None:
            self._sema.load_state_dict(state)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The Switch-EMA state, and self-contained hyper-parameters: no pretraining or autoencoder file is read
        when the task is rebuilt (the weights and ``ae_ready`` are in the ``state_dict``;
        :mod:`terratorch_eoplugins.models.pretrained`)."""
        sema = self._sema.state_dict()
        if sema is not None:
            checkpoint["dunia_sema"] = sema
        hp = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY)
        if not isinstance(hp, Mapping):
            return
        updates: dict[str, Any] = {}
        if hp.get("autoencoder_ckpt_path"):
            updates["autoencoder_ckpt_path"] = None
        if self.pretrained_source is not None:
            kwargs = {**dict(hp.get("dunia_kwargs") or {}), **architecture_overrides(self.dunia, hp["dunia_variant"])}
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY] = self_contained_hparams(
                hp, self.pretrained_source, dunia_kwargs=kwargs or None, **updates)
        elif updates:
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY] = {**hp, **updates}

    # ------------------------------------------------------------------------------------ predict
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Generate a waveform per footprint; :meth:`on_predict_epoch_end` writes them to ``predict_output``.

        Returns ``None`` so that terratorch's ``CustomWriter`` (a default callback of ``terratorch predict``) skips it.
        """
        s = self.footprint_samples(batch)
        if len(s["waveform"]) == 0:
            logger.warning("DUNIA waveform diffusion: predict batch %d has no GEDI footprint", batch_idx)
            return None
        res = self.evaluate_footprints(s, batch_idx)
        offset = sum(int(p["chip_count"]) for p in self._pred)
        keep = {k: v.detach().cpu() for k, v in res.items() if k != "reconstructed" and k != "random"}
        keep.update({k: s[k].detach().cpu() for k in ("shot_number", "row", "col")})
        keep["chip"] = s["chip"].detach().cpu() + offset
        keep["chip_count"] = torch.tensor(batch["image"].shape[0])
        self._pred.append(keep)
        return None

    def on_predict_epoch_end(self) -> None:
        path = self.hparams["predict_output"]
        out_dir = getattr(self.trainer, "predict_output_dir", None) if self._trainer is not None else None
        if path is None and out_dir:
            path = str(Path(out_dir) / "dunia_waveforms.h5")
        if path is None or not self._pred:
            self._pred = []
            return
        import h5py

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        keys = [k for k in self._pred[0] if k != "chip_count"]
        with h5py.File(p, "w") as f:
            for k in keys:
                f.create_dataset(k, data=torch.cat([d[k] for d in self._pred]).numpy())
            f.attrs["guidance_scale"] = float(self.hparams["guidance_scale"])
            f.attrs["num_steps"] = int(self.hparams["num_steps"])
            f.attrs["solver"] = str(self.hparams["solver"])
            f.attrs["waveform_length"] = int(self.autoencoder.length)
            for k in ("r_generated", "r_retrieved", "r_random"):
                if k in keys:
                    r = np.concatenate([d[k].numpy() for d in self._pred])
                    f.attrs[f"mean_{k}"] = float(np.nanmean(r))
        logger.info("DUNIA waveform diffusion: %d generated waveforms written to %s",
                    sum(len(d["shot_number"]) for d in self._pred), p)
        print(f"DUNIA waveform diffusion: generated waveforms written to {p}")
        self._pred = []
