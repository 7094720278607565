"""Optimiser and learning-rate schedule of the plugin's own tasks, chosen from YAML with terratorch's arguments.

Every task of this package that trains (LIANet, DUNIA and TS-fusion pretraining, DUNIA waveform diffusion, the
TS-fusion CropNet task, S4 pretraining) takes the arguments of terratorch's tasks:

``lr``
    base learning rate.
``optimizer``
    a class name of :mod:`torch.optim` (``AdamW``, ``Adam``, ``SGD`` ...) or an importable class path
    (``timm.optim.Lion``).
``optimizer_hparams``
    keyword arguments of the optimiser (``weight_decay``, ``betas`` ...).
``scheduler``
    a class name of :mod:`torch.optim.lr_scheduler` (``CosineAnnealingLR``, ``SequentialLR`` ...), ``WarmupCosine``
    (:class:`WarmupCosine`, this plugin's linear warmup + cosine decay, the papers' schedule), an importable class
    path, or ``null`` (constant rate).
``scheduler_hparams``
    keyword arguments of the scheduler, plus ``interval`` (``"epoch"`` or ``"step"``, as terratorch).

A task's defaults are its paper's choices (:class:`OptimizerDefaults`). When ``optimizer`` (``scheduler``) is the
task's default class, the given ``optimizer_hparams`` (``scheduler_hparams``) are merged over the default ones, so
``optimizer_hparams: {weight_decay: 0.1}`` keeps the paper's betas; for another class they are used as given.
A torch optimiser with a torch scheduler (or none) is built by terratorch's own
:func:`terratorch.tasks.optimizer_factory.optimizer_factory`, exactly as in terratorch's tasks; the factory only
looks names up in ``torch.optim``, so class paths and :class:`WarmupCosine` are built here.

:class:`WarmupCosine` hyper-parameters: ``warmup`` (intervals of linear warmup), or ``warmup_epochs`` (epochs,
converted to optimiser steps with ``interval: step``), ``total`` (intervals until the end of the cosine decay;
default: the trainer's ``max_epochs`` or ``estimated_stepping_batches``) and ``min_lr_ratio`` (final rate as a
fraction of the base rate). Its state (``warmup``, ``total``, the step counter) is saved in Lightning checkpoints,
so a resumed fit continues the same schedule.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from terratorch.tasks.optimizer_factory import optimizer_factory
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["OptimizerDefaults", "WarmupCosine", "build_optimization", "resolve_optimizer", "resolve_scheduler",
           "warmup_cosine_factor"]

INTERVALS = ("epoch", "step")
#: schedulers of this plugin, selectable by their short name
PLUGIN_SCHEDULERS: dict[str, type] = {}
#: ``scheduler_hparams`` keys that :func:`build_optimization` reads itself (not passed to the scheduler)
_WARMUP_COSINE_KEYS = {"warmup", "warmup_epochs", "total", "min_lr_ratio", "interval"}


def warmup_cosine_factor(step: int, warmup: int, total: int, min_lr_ratio: float = 0.0) -> float:
    """Learning-rate factor at ``step``: linear warmup ``(step + 1) / warmup``, then cosine from 1 to
    ``min_lr_ratio`` at ``total`` (constant afterwards). A warmup longer than the run is shortened to
    ``total - 1`` intervals, so the base rate is reached."""
    warmup = min(int(warmup), max(int(total) - 1, 0))
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(LRScheduler):
    """Linear warmup over ``warmup`` intervals, then cosine decay to ``min_lr_ratio * base_lr`` at ``total``.

    The papers' schedule (LIANet, DUNIA, TS fusion: :func:`warmup_cosine_factor`), applied to every parameter
    group's own base rate. Select it with ``scheduler: WarmupCosine`` (or the class path
    ``terratorch_eoplugins.tasks.optimization.WarmupCosine``).

    Args:
        optimizer: the wrapped optimiser.
        total: scheduler intervals (epochs or steps) until the end of the decay (>= 1).
        warmup: linear warmup intervals (>= 0).
        min_lr_ratio: final rate as a fraction of the base rate, in [0, 1].
        last_epoch: index of the last interval (-1: start).
    """

    def __init__(self, optimizer: Optimizer, total: int, warmup: int = 0, min_lr_ratio: float = 0.0,
                 last_epoch: int = -1) -> None:
        if int(total) < 1:
            raise ValueError(f"WarmupCosine: total must be >= 1 scheduler interval, got {total!r}")
        if int(warmup) < 0:
            raise ValueError(f"WarmupCosine: warmup must be >= 0, got {warmup!r}")
        if not 0.0 <= float(min_lr_ratio) <= 1.0:
            raise ValueError(f"WarmupCosine: min_lr_ratio must lie in [0, 1], got {min_lr_ratio!r}")
        self.total, self.warmup, self.min_lr_ratio = int(total), int(warmup), float(min_lr_ratio)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The rate factor at interval ``step``."""
        return warmup_cosine_factor(step, self.warmup, self.total, self.min_lr_ratio)

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]


PLUGIN_SCHEDULERS["WarmupCosine"] = WarmupCosine


def _import_class(path: str, what: str, argument: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{argument}={path!r}: cannot import the {what} class ({type(e).__name__}: {e})") from e


def _unknown(argument: str, name: str, what: str, choices: Iterable[str]) -> ValueError:
    choices = sorted(choices)
    close = [c for c in choices if c.lower() == name.lower()] or difflib.get_close_matches(name, choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = "torch.optim.lr_scheduler, WarmupCosine" if argument == "scheduler" else "torch.optim"
    return ValueError(f"{argument}={name!r} is not {what}{hint}; expected a class name of {where} or an importable "
                      "class path (package.module.Class)")


def _torch_names(module: Any, base: type) -> set[str]:
    return {n for n in dir(module) if isinstance(getattr(module, n), type) and issubclass(getattr(module, n), base)
            and getattr(module, n) is not base}


def resolve_optimizer(name: str) -> tuple[type, bool]:
    """``(class, from_torch)`` of an ``optimizer`` argument; ``ValueError`` naming the argument when unknown."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"optimizer must be a torch.optim class name or a class path, got {name!r}")
    if "." not in name:
        if name not in _torch_names(torch.optim, Optimizer):
            raise _unknown("optimizer", name, "an optimizer of torch.optim", _torch_names(torch.optim, Optimizer))
        return getattr(torch.optim, name), True
    cls = _import_class(name, "optimizer", "optimizer")
    if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
        raise ValueError(f"optimizer={name!r} is not a torch.optim.Optimizer subclass")
    return cls, False


def resolve_scheduler(name: str) -> tuple[type, bool]:
    """``(class, from_torch)`` of a ``scheduler`` argument; ``ValueError`` naming the argument when unknown."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"scheduler must be a scheduler class name, a class path or null, got {name!r}")
    torch_names = _torch_names(torch.optim.lr_scheduler, LRScheduler) | {"ReduceLROnPlateau"}
    if "." not in name:
        if name in torch_names:
            return getattr(torch.optim.lr_scheduler, name), True
        if name in PLUGIN_SCHEDULERS:
            return PLUGIN_SCHEDULERS[name], False
        raise _unknown("scheduler", name, "a learning-rate scheduler", torch_names | set(PLUGIN_SCHEDULERS))
    cls = _import_class(name, "scheduler", "scheduler")
    if not isinstance(cls, type):
        raise ValueError(f"scheduler={name!r} is not a class")
    return cls, False


def _check_warmup_cosine(hp: Mapping[str, Any]) -> None:
    unknown = sorted(set(hp) - _WARMUP_COSINE_KEYS)
    if unknown:
        raise ValueError(f"scheduler_hparams: unknown key(s) {unknown} for WarmupCosine; expected some of "
                         f"{sorted(_WARMUP_COSINE_KEYS)}")
    if "warmup" in hp and "warmup_epochs" in hp:
        raise ValueError("scheduler_hparams: give warmup (scheduler intervals) or warmup_epochs, not both")
    for key in ("warmup", "warmup_epochs"):
        if hp.get(key) is not None and not float(hp[key]) >= 0:
            raise ValueError(f"scheduler_hparams.{key} must be >= 0, got {hp[key]!r}")
    if hp.get("total") is not None and int(hp["total"]) < 1:
        raise ValueError(f"scheduler_hparams.total must be >= 1 or null (the trainer's length), got {hp['total']!r}")
    if not 0.0 <= float(hp.get("min_lr_ratio", 0.0)) <= 1.0:
        raise ValueError(f"scheduler_hparams.min_lr_ratio must lie in [0, 1], got {hp['min_lr_ratio']!r}")


def check_optimization_args(optimizer: str, optimizer_hparams: Mapping[str, Any] | None, scheduler: str | None,
                            scheduler_hparams: Mapping[str, Any] | None) -> None:
    """Validate the four arguments at task construction (errors name the argument)."""
    resolve_optimizer(optimizer)
    if optimizer_hparams is not None and not isinstance(optimizer_hparams, Mapping):
        raise ValueError(f"optimizer_hparams must be a mapping of keyword arguments, got {optimizer_hparams!r}")
    if scheduler_hparams is not None and not isinstance(scheduler_hparams, Mapping):
        raise ValueError(f"scheduler_hparams must be a mapping of keyword arguments, got {scheduler_hparams!r}")
    interval = (scheduler_hparams or {}).get("interval", "epoch")
    if interval not in INTERVALS:
        raise ValueError(f"scheduler_hparams.interval must be 'epoch' or 'step', got {interval!r}")
    if scheduler is not None and resolve_scheduler(scheduler)[0] is WarmupCosine:
        _check_warmup_cosine(scheduler_hparams or {})


def _trainer_length(trainer: Any, interval: str) -> float | None:
    """Scheduler intervals of the trainer's run (``max_epochs`` or ``estimated_stepping_batches``); None unknown."""
    if trainer is None:
        return None
    value = getattr(trainer, "max_epochs" if interval == "epoch" else "estimated_stepping_batches", None)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value >= 1 else None


def _warmup_cosine_kwargs(hp: Mapping[str, Any], interval: str, trainer: Any) -> dict[str, Any]:
    """Constructor arguments of :class:`WarmupCosine` from its ``scheduler_hparams`` and the trainer."""
    total = hp.get("total")
    warmup = hp.get("warmup")
    if hp.get("warmup_epochs") is not None:
        epochs = _trainer_length(trainer, "epoch")
        if interval == "epoch":
            warmup = float(hp["warmup_epochs"])
        else:
            steps = hp.get("total") or _trainer_length(trainer, "step")
            warmup = float(hp["warmup_epochs"]) * steps / epochs if steps and epochs else 0.0
        warmup = int(round(warmup))
    warmup = int(warmup or 0)
    if total is None:
        total = _trainer_length(trainer, interval)
        if total is None:
            if trainer is not None:
                raise ValueError(f"WarmupCosine needs the run's length: the trainer has no finite "
                                 f"{'max_epochs' if interval == 'epoch' else 'max_epochs / max_steps'}; set "
                                 "scheduler_hparams.total")
            total = warmup + 1  # no trainer attached (a task used outside fit): warm up, then decay
    return {"total": int(total), "warmup": warmup, "min_lr_ratio": float(hp.get("min_lr_ratio", 0.0))}


def build_optimization(params: Any, lr: float, optimizer: str, optimizer_hparams: Mapping[str, Any] | None = None,
                       scheduler: str | None = None, scheduler_hparams: Mapping[str, Any] | None = None, *,
                       monitor: str = "val/loss", trainer: Any = None) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` value for the given arguments (see the module docstring).

    ``params`` are parameters or parameter groups (groups may set their own ``lr`` / ``weight_decay``).
    """
    check_optimization_args(optimizer, optimizer_hparams, scheduler, scheduler_hparams)
    opt_cls, opt_torch = resolve_optimizer(optimizer)
    o_hp = copy.deepcopy(dict(optimizer_hparams or {}))
    s_hp = copy.deepcopy(dict(scheduler_hparams or {}))  # terratorch's factory edits nested SequentialLR entries
    sched_cls, sched_torch = resolve_scheduler(scheduler) if scheduler is not None else (None, True)
    if opt_torch and sched_torch:  # everything terratorch's factory can name: built exactly as terratorch does
        return optimizer_factory(optimizer, lr, params, o_hp, scheduler, monitor, s_hp)
    opt = (optimizer_factory(optimizer, lr, params, o_hp)["optimizer"] if opt_torch
           else opt_cls(params, lr=lr, **o_hp))
    if sched_cls is None:
        return {"optimizer": opt}
    interval = s_hp.pop("interval", "epoch")
    kwargs = _warmup_cosine_kwargs(s_hp, interval, trainer) if sched_cls is WarmupCosine else s_hp
    sched = sched_cls(opt, **kwargs)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": monitor, "interval": interval}}


@dataclass(frozen=True)
class OptimizerDefaults:
    """A task's default optimiser and schedule (its paper's choices) and how given arguments combine with them.

    Args:
        optimizer, optimizer_hparams, scheduler, scheduler_hparams: the defaults.
    """

    optimizer: str
    optimizer_hparams: Mapping[str, Any] = field(default_factory=dict)
    scheduler: str | None = None
    scheduler_hparams: Mapping[str, Any] = field(default_factory=dict)

    def resolve(self, optimizer: str, optimizer_hparams: Mapping[str, Any] | None, scheduler: str | None,
                scheduler_hparams: Mapping[str, Any] | None) -> dict[str, Any]:
        """Effective arguments: given hparams merged over the defaults when the class is the default one."""
        o_hp = dict(self.optimizer_hparams) if optimizer == self.optimizer else {}
        o_hp.update(dict(optimizer_hparams or {}))
        s_hp = dict(self.scheduler_hparams) if scheduler is not None and scheduler == self.scheduler else {}
        given = dict(scheduler_hparams or {})
        for a, b in (("warmup", "warmup_epochs"), ("warmup_epochs", "warmup")):
            if a in given and a not in self.scheduler_hparams:  # a given warm-up length replaces the default one
                s_hp.pop(b, None)
        s_hp.update(given)
        return {"optimizer": optimizer, "optimizer_hparams": o_hp, "scheduler": scheduler, "scheduler_hparams": s_hp}

    def check(self, optimizer: str, optimizer_hparams: Mapping[str, Any] | None, scheduler: str | None,
              scheduler_hparams: Mapping[str, Any] | None) -> None:
        """Validate a task's arguments at construction (``ValueError`` naming the argument)."""
        check_optimization_args(**self.resolve(optimizer, optimizer_hparams, scheduler, scheduler_hparams))

    def configure(self, task: Any, params: Any) -> dict[str, Any]:
        """``configure_optimizers`` of ``task`` (its ``hparams`` hold ``lr`` and the four arguments)."""
        hp = task.hparams
        args = self.resolve(hp["optimizer"], hp.get("optimizer_hparams"), hp.get("scheduler"),
                            hp.get("scheduler_hparams"))
        trainer = getattr(task, "_trainer", None)
        return build_optimization(params, hp["lr"], **args, monitor=getattr(task, "monitor", "val/loss"),
                                  trainer=trainer)
