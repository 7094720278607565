"""Callbacks that make ``terratorch fit ... --ckpt_path last`` continue an interrupted run exactly.

Lightning resumes the model, optimizer, scheduler, loop counters and callback states from a checkpoint, but two
things stop a plain setup from resuming where it stopped:

- :class:`ResumableModelCheckpoint` -- where ``last.ckpt`` lives. Lightning's ``ModelCheckpoint`` writes into the
  logger's ``<save_dir>/<name>/version_<N>/checkpoints``, and every invocation opens a new ``version_<N>``, so
  ``--ckpt_path last`` looks in an empty folder and silently trains from scratch. This subclass gives an experiment
  one checkpoint folder, ``<save_dir>/<experiment>/checkpoints``, whatever the version: the experiment is the
  logger's name (the shipped loggers, :mod:`terratorch_eoplugins.tasks.loggers`, take the config's; for MLflow,
  whose names are store ids, ``<default_root_dir>/<experiment name>``), or, when that is Lightning's default
  ``lightning_logs``, the name of the config file the run was started with
  (``terratorch fit -c configs/unet_pastis.yaml`` -> ``runs/unet_pastis/checkpoints``, beside the logs'
  ``runs/unet_pastis/version_<N>``). A logger version
  given by name (``--trainer.logger.init_args.version=fit``) keeps Lightning's ``<save_dir>/<name>/<version>/
  checkpoints``. It also writes ``last.ckpt`` at every epoch end (Lightning 2.6 only does when the monitored metric
  improved), and a ``fit`` that does not resume refuses to start in a folder that holds another run's checkpoints
  instead of overwriting them.
- :class:`RandomStateCallback` -- what Lightning does not save: the global Python / NumPy / torch (and CUDA)
  random states and the state of the training dataloaders' own generators (``DataLoader(generator=...)``,
  a sampler's ``generator``). Without them a resumed epoch shuffles, augments and drops out differently from the
  uninterrupted run. With them, a run resumed from an end-of-epoch checkpoint ends with the same weights.

Both are in the shipped trainer pieces (``configs/trainer/*.yaml``).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from terratorch_eoplugins.tasks.loggers import (
    DEFAULT_LOGGER_NAME,
    ConfigNamedMLFlowLogger,
    bind_run_name,
    run_config_name,
)

logger = logging.getLogger("terratorch_eoplugins.tasks")

__all__ = ["RANDOM_STATE_KEY", "RandomStateCallback", "ResumableModelCheckpoint", "run_config_name"]

#: the checkpoint key :class:`RandomStateCallback` writes (one entry per training process)
RANDOM_STATE_KEY = "eoplugins_random_state"


class ResumableModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with one checkpoint folder per experiment and no silent overwriting.

    Same arguments as Lightning's ``ModelCheckpoint``. Without ``dirpath``, checkpoints go to
    ``<logger save_dir>/<experiment>/checkpoints`` when the logger numbers its versions (the default), so the
    ``last.ckpt`` of an interrupted ``fit`` is where the next ``fit --ckpt_path last`` looks. The experiment is the
    logger's name, or the stem of the run's config file when the logger keeps Lightning's default name
    (``lightning_logs``). With a named logger version (a string) or an explicit ``dirpath``, the folder is
    Lightning's. ``last.ckpt`` is rewritten at every save point (end of epoch or of validation), and a ``fit`` that
    does not resume refuses to start when that folder already holds ``*.ckpt`` files.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dirpath_given = self.dirpath is not None

    def experiment_dirpath(self, trainer: Trainer) -> str | None:
        """The experiment's checkpoint folder, or ``None`` to use Lightning's folder."""
        if self._dirpath_given:
            return None
        bind_run_name(trainer)  # the config-named loggers (tasks/loggers.py) learn their name here at the latest
        save_dir, name = trainer.default_root_dir, None
        if trainer.loggers and isinstance(trainer.loggers[0], ConfigNamedMLFlowLogger):
            # MLflow's name / version are ids inside its store: the checkpoints go beside it, by experiment name
            name = trainer.loggers[0].experiment_name
        elif trainer.loggers:
            run_logger = trainer.loggers[0]
            if isinstance(run_logger.version, str):  # a named version is a run folder of its own
                return None
            if run_logger.save_dir is not None:
                save_dir = run_logger.save_dir
            name = run_logger.name
        if not name or name == DEFAULT_LOGGER_NAME:
            name = run_config_name(trainer) or name
        return os.path.join(save_dir, name, "checkpoints") if name else None

    def _pin_dirpath(self, trainer: Trainer) -> None:
        dirpath = self.experiment_dirpath(trainer)
        if dirpath is not None:
            self.dirpath = os.path.normpath(dirpath)

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        # ``--ckpt_path last`` is resolved before ``setup``: look in the experiment's folder already
        self._pin_dirpath(trainer)
        return super()._find_last_checkpoints(trainer)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._pin_dirpath(trainer)
        super().setup(trainer, pl_module, stage)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def _save_last_if_behind(self, trainer: Trainer) -> None:
        """Write ``last.ckpt`` at every save point, as Lightning did before 2.6.

        Since Lightning 2.6, ``save_last`` only rewrites ``last.ckpt`` when a top-k checkpoint is saved at the same
        step, i.e. when the monitored metric improved; ``--ckpt_path last`` would then go back to the best epoch.
        """
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):  # skipped: saved at this step
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the checkpoint to resume from is known here (restored before ``on_fit_start``), and nothing is saved yet
        if trainer.ckpt_path is not None or trainer.fast_dev_run or not self.dirpath:
            return
        if self.save_top_k == 0 and not self.save_last:
            return
        existing = sorted(name for name in (os.listdir(self.dirpath) if os.path.isdir(self.dirpath) else [])
                          if name.endswith(self.FILE_EXTENSION))
        if existing:
            shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
            raise FileExistsError(
                f"{self.dirpath} already holds the checkpoints of an earlier run ({shown}); this new run would mix "
                "its checkpoints with them. Continue that run with --ckpt_path last, start a separate one under "
                "another name (--trainer.logger.init_args.name=<name>: checkpoints in <save_dir>/<name>/checkpoints), "
                "or move the folder away.")


class RandomStateCallback(Callback):
    """Saves the random states Lightning does not in every checkpoint and restores them when ``fit`` resumes.

    Saved per training process (gathered from all of them under DDP): Python's ``random``, NumPy's global
    ``RandomState``, torch's CPU generator, the CUDA generators (when CUDA is initialised), and the generators of
    the training dataloaders (``DataLoader.generator``, ``sampler.generator``, ``batch_sampler.sampler.generator``).

    The global states are restored at ``on_fit_start`` (after the checkpoint is loaded, before the training loop
    draws from them); dataloader generators at the first ``on_train_epoch_start`` (the dataloaders are built after
    ``on_fit_start``). Exact for checkpoints written at the end of an epoch (Lightning's default schedule) with
    ``num_workers=0``; with worker processes the workers' seeds also follow the restored states, but a
    ``DataLoader(generator=...)``'s worker base seed of the first resumed epoch does not.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._pending_loaders: list[torch.Tensor] | None = None
        self._fit_started = False

    # ---- saving ----
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        state = {**global_random_state(), "loaders": [g.get_state() for g in loader_generators(
            trainer.train_dataloader)]}
        checkpoint[RANDOM_STATE_KEY] = {"ranks": _gather_from_ranks(state)}

    # ---- restoring ----
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(RANDOM_STATE_KEY)
        if not saved:
            logger.warning("the checkpoint holds no random state (written without RandomStateCallback): the "
                           "resumed run continues from the current random state")
            return
        ranks = saved["ranks"]
        if len(ranks) != trainer.world_size:
            logger.warning("the checkpoint's random state comes from %d process(es), this run has %d: every "
                           "process restores rank %d's", len(ranks), trainer.world_size,
                           trainer.global_rank % len(ranks))
        self._pending = ranks[trainer.global_rank % len(ranks)]
        if self._fit_started:  # strategies that restore after setup (e.g. DeepSpeed) load after on_fit_start
            self._restore_global()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_started = True
        self._restore_global()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending_loaders is None:
            return
        generators = loader_generators(trainer.train_dataloader)
        if len(generators) != len(self._pending_loaders):
            logger.warning("the checkpoint holds %d dataloader generator state(s), the training dataloaders have "
                           "%d: not restored", len(self._pending_loaders), len(generators))
        else:
            for g, s in zip(generators, self._pending_loaders):
                g.set_state(s)
            # the epoch's iterator was created (one draw from DataLoader.generator) before this hook in the
            # resumed run and after it in an uninterrupted one: draw it again from the restored state
            for loader in _loaders(trainer.train_dataloader):
                if isinstance(getattr(loader, "generator", None), torch.Generator):
                    torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
        self._pending_loaders = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_started = False

    def _restore_global(self) -> None:
        if self._pending is None:
            return
        set_global_random_state(self._pending)
        self._pending_loaders = list(self._pending.get("loaders") or []) or None
        self._pending = None


def global_random_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (if initialised) CUDA random states, as tensors and plain Python values.

    Plain values only, so that checkpoints holding them load with ``torch.load(weights_only=True)``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                   int(has_gauss), float(cached)),
            "torch": torch.get_rng_state(), "cuda": list(cuda)}


def set_global_random_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`global_random_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("the checkpoint holds %d CUDA generator states, this machine has %d devices: not "
                           "restored", len(cuda), torch.cuda.device_count())


def _loaders(dataloaders: Any) -> list[Any]:
    """The dataloaders in ``trainer.train_dataloader`` (one loader, or a list / dict of them)."""
    if dataloaders is None:
        return []
    if isinstance(dataloaders, Mapping):
        return [d for v in dataloaders.values() for d in _loaders(v)]
    if isinstance(dataloaders, (list, tuple)):
        return [d for v in dataloaders for d in _loaders(v)]
    return [dataloaders]


def loader_generators(dataloaders: Any) -> list[torch.Generator]:
    """The distinct ``torch.Generator`` objects the training dataloaders draw from, in a fixed order."""
    found: list[torch.Generator] = []
    for loader in _loaders(dataloaders):
        sampler = getattr(loader, "sampler", None)
        batch_sampler = getattr(loader, "batch_sampler", None)
        candidates: Iterable[Any] = (getattr(loader, "generator", None), getattr(sampler, "generator", None),
                                     getattr(getattr(batch_sampler, "sampler", None), "generator", None))
        for g in candidates:
            if isinstance(g, torch.Generator) and all(g is not f for f in found):
                found.append(g)
    return found


def _gather_from_ranks(state: dict[str, Any]) -> list[dict[str, Any]]:
    """``[state of rank 0, state of rank 1, ...]`` (every process calls this when a checkpoint is saved)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, state)
        return states
    return [state]
