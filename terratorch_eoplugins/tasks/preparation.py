"""One mechanism for "fit something on the training split before training".

Some models need statistics of the training split before their first step: TS fusion's tokenizers (bin edges
and FSQ codebooks), DUNIA's zero-shot retrieval database, DUNIA diffusion's latent statistics and retrieval
database, a regression head's bias (:class:`TargetMeanBiasInit`). All of them go through this module:

- :func:`train_split_batches` is the only place in ``tasks/`` that touches ``trainer.datamodule``. It yields the
  training split's batches in a fixed order (no shuffling, so it draws nothing from the global RNG and a resumed
  run sees the same sequence), each passed through the datamodule's batch hooks and moved to the module's
  device exactly as a training batch would be. Tasks therefore still read only batches.
- :class:`TrainSplitPreparation` is a LightningModule mixin: a task implements :meth:`needs_preparation` and
  :meth:`prepare_from_train_split`; the mixin calls them at the start of ``fit``, ``validate``, ``test`` and
  ``predict``. Statistics that are part of the task's state (buffers) are saved in its checkpoints, so a
  restored task does not prepare again.
- :class:`PrepareFromTrainSplit` is the same contract as a Lightning callback, for modules that are not ours
  (terratorch's tasks), e.g. :class:`TargetMeanBiasInit`.
- :func:`train_split_info` is the one other reader of ``trainer.datamodule``: setup-time metadata that the
  datamodule publishes by name through its ``train_split_info(name)`` method (e.g. LIANet's pretraining
  region, from which the generator is built).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader

from terratorch_eoplugins.runtime import Progress, visible_info

logger = logging.getLogger("terratorch_eoplugins.tasks")

__all__ = ["PrepareFromTrainSplit", "TargetMeanBiasInit", "TrainSplitPreparation", "train_split_batches",
           "train_split_info"]


def _ordered(loader: DataLoader) -> DataLoader:
    """``loader`` over the same dataset, batch size, collation and workers, in dataset order (a batch sampler, e.g.
    footprint batches, is kept, unshuffled when it has a ``shuffle`` switch)."""
    if not isinstance(loader, DataLoader):
        return loader
    if loader.batch_size is None and loader.batch_sampler is not None:
        batches = loader.batch_sampler
        if getattr(batches, "shuffle", False):
            batches = copy.copy(batches)
            batches.shuffle = False
        return DataLoader(loader.dataset, batch_sampler=batches, num_workers=loader.num_workers,
                          collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, drop_last=False, pin_memory=loader.pin_memory)


def train_split_batches(trainer: Trainer | None, module: LightningModule | None = None,
                        max_batches: int | None = None, what: str = "this task",
                        progress: str | None = None) -> Iterator[dict[str, Any]]:
    """The training split's batches, in order, as the model's training steps would receive them; reading them
    leaves the global torch random state unchanged.

    Args:
        trainer: the running trainer; its datamodule must provide ``train_dataloader()``.
        module: moves each batch to ``module.device`` through its ``transfer_batch_to_device`` (default: the
            trainer's LightningModule).
        max_batches: stop after this many batches (``None``: the whole split).
        what: named in the error when there is no datamodule.
        progress: report the reading as INFO lines (:class:`~terratorch_eoplugins.runtime.Progress`) under this
            title: batches read of the split's total, elapsed time, ETA.
    """
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    if dm is None or not hasattr(dm, "train_dataloader"):
        raise RuntimeError(f"{what} fits statistics on the training split before it runs, but the trainer has no "
                           "datamodule with a train_dataloader(); pass `--data` (a datamodule) or a checkpoint that "
                           "already holds them")
    if getattr(dm, "train_dataset", None) is None and hasattr(dm, "setup"):
        dm.setup("fit")
    module = module if module is not None else getattr(trainer, "lightning_module", None)
    # Reading leaves the global torch RNG as it was (a DataLoader iterator draws its base seed from it, a dataset
    # may draw too), so training after a preparation draws what it would have drawn without one.
    with torch.random.fork_rng(devices=[]):
        loader = _ordered(dm.train_dataloader())
        batches = iter(loader)
    total = len(loader) if hasattr(loader, "__len__") else None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    report = Progress(logger, progress, total, "batches") if progress else None
    i = 0
    while max_batches is None or i < max_batches:
        with torch.random.fork_rng(devices=[]):
            batch = next(batches, None)
        if batch is None:
            break
        i += 1
        if report is not None:
            report.update()
        if hasattr(dm, "on_before_batch_transfer"):
            batch = dm.on_before_batch_transfer(batch, 0)
        if hasattr(module, "transfer_batch_to_device"):
            batch = module.transfer_batch_to_device(batch, module.device, 0)
        if hasattr(dm, "on_after_batch_transfer"):
            batch = dm.on_after_batch_transfer(batch, 0)
        yield batch
    if report is not None:
        report.close()


def train_split_info(trainer: Trainer | None, name: str, default: Any = None) -> Any:
    """Setup-time metadata that the trainer's datamodule publishes about its data, by ``name``.

    The other way, besides :func:`train_split_batches`, in which a task learns about its data: a datamodule
    publishes plain metadata (e.g. the LIANet datamodules' pretraining ``"region"``: grid shape, CRS,
    acquisitions) and helpers (their ``"plot_sample"`` function) through its method ``train_split_info(name)``,
    which returns ``None`` for what it does not publish. Nothing is set up here: the datamodule computes what it
    publishes on demand.

    Args:
        trainer: the running trainer (``None``: no trainer attached yet).
        name: what to read.
        default: returned when there is no trainer or datamodule, the datamodule publishes nothing, or nothing
            under ``name``.
    """
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    publish = getattr(dm, "train_split_info", None)
    value = publish(name) if callable(publish) else None
    return default if value is None else value


class TrainSplitPreparation:
    """LightningModule mixin: prepare from the training split once, before the first step of any stage.

    Subclasses implement :meth:`needs_preparation` and :meth:`prepare_from_train_split`, and may set
    :attr:`preparation_max_batches`. A subclass that overrides a stage-start hook calls ``super()``.
    """

    #: how many training batches :meth:`prepare_from_train_split` receives (``None``: all)
    preparation_max_batches: int | None = None

    def needs_preparation(self) -> bool:
        """Whether the statistics are still missing (e.g. not restored from a checkpoint)."""
        raise NotImplementedError

    def prepare_from_train_split(self, batches: Iterable[Mapping[str, Any]]) -> None:
        """Fit the statistics on ``batches`` (the training split, in order, on the module's device)."""
        raise NotImplementedError

    def _prepare_if_needed(self) -> None:
        if not self.needs_preparation():
            return
        trainer = getattr(self, "_trainer", None)
        name = type(self).__name__
        # minutes for some tasks (TS-fusion tokenizers): progress lines on stderr even under `terratorch fit`
        with visible_info(logging.getLogger("terratorch_eoplugins")):
            start = time.monotonic()
            logger.info("%s: preparing from the training split", name)
            self.prepare_from_train_split(train_split_batches(trainer, self, self.preparation_max_batches, name,
                                                             progress=f"{name}: reading the training split"))
            logger.info("%s: prepared in %.1f s", name, time.monotonic() - start)

    def on_fit_start(self) -> None:
        self._prepare_if_needed()

    def on_validation_start(self) -> None:
        self._prepare_if_needed()

    def on_test_start(self) -> None:
        self._prepare_if_needed()

    def on_predict_start(self) -> None:
        self._prepare_if_needed()


class PrepareFromTrainSplit(Callback):
    """The same contract as :class:`TrainSplitPreparation` for a LightningModule that is not ours: a callback
    whose :meth:`prepare` receives the training split's batches at the start of ``fit``."""

    def __init__(self, max_batches: int | None = None) -> None:
        super().__init__()
        self.max_batches = max_batches

    def prepare(self, pl_module: LightningModule, batches: Iterable[Mapping[str, Any]]) -> None:
        raise NotImplementedError

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.prepare(pl_module, train_split_batches(trainer, pl_module, self.max_batches, type(self).__name__))


class TargetMeanBiasInit(PrepareFromTrainSplit):
    """At the start of ``fit``, set the bias of the task head's final convolution to the mean target of the
    training split (labelled pixels only, ``!= ignore_index``).

    For low-shot regression heads (DUNIA section 4.1.2) on targets far from zero (RH98 in metres): a zero-centred
    output must otherwise first climb to the target scale, and in the meantime the large gradients of that offset
    flow into the trainable layers and disturb the pretrained embeddings. Add it with
    ``--trainer.callbacks+=terratorch_eoplugins.tasks.preparation.TargetMeanBiasInit``.
    """

    def prepare(self, pl_module: LightningModule, batches: Iterable[Mapping[str, Any]]) -> None:
        head = getattr(getattr(pl_module, "model", None), "head", None)
        convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)] if head is not None else []
        if not convs or convs[-1].bias is None:
            raise ValueError("TargetMeanBiasInit: the task's model has no head ending in a Conv2d with a bias "
                             "(expected terratorch's regression head, model.head)")
        ignore = getattr(pl_module, "hparams", {}).get("ignore_index", None)
        total, count = 0.0, 0
        for batch in batches:
            y = batch["mask"].double()
            keep = torch.isfinite(y) if ignore is None else torch.isfinite(y) & (y != ignore)
            total, count = total + float(y[keep].sum()), count + int(keep.sum())
        if count == 0:
            raise ValueError("TargetMeanBiasInit: the training split has no labelled pixel")
        with torch.no_grad():
            convs[-1].bias.fill_(total / count)
        logger.info("TargetMeanBiasInit: head bias set to the training target mean %.4f (%d pixels)",
                    total / count, count)
