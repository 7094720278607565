"""Pretrained weights of the plugin's model families: one flag, strict builder arguments, self-contained checkpoints.

**One flag.** The pretraining checkpoint of a LIANet, DUNIA, S4 or TS-fusion model is always passed as
``backbone_ckpt_path`` (:data:`PRETRAINED_FLAG`): terratorch's own convention, where a backbone builder's
``ckpt_path`` is written ``backbone_ckpt_path`` in an ``EncoderDecoderFactory``'s ``model_args``
(``--model.init_args.model_args.backbone_ckpt_path``), and the init argument of the plugin's own tasks that wrap
such a model (:class:`~terratorch_eoplugins.tasks.dunia_knn.DUNIAZeroShotKNNTask`,
:class:`~terratorch_eoplugins.tasks.dunia_diffusion.DUNIAWaveformDiffusionTask`,
:class:`~terratorch_eoplugins.tasks.tsfusion_cropnet.TSFusionCropNetTask`: ``--model.init_args.backbone_ckpt_path``).
The former names (:data:`RENAMED_FLAGS`) are errors that name it.

**Strict arguments.** Every registered builder of the plugin rejects unknown keyword arguments, naming them and
listing the accepted ones (:func:`check_builder_kwargs`), so a misspelt ``backbone_*`` key fails instead of being
ignored.

**Missing weights.** A model meant to start from its pretraining that is built without it logs one warning naming
the flag (:func:`warn_no_pretrained`).

**Self-contained checkpoints.** A fine-tuned checkpoint must rebuild its model without the pretraining file (which
may have been moved, deleted, or named by a path relative to another working directory). The pretrained weights
are in the fine-tuned checkpoint's ``state_dict`` anyway; what the file also provides is architecture (LIANet's
generator configuration and region metadata, DUNIA's architecture overrides). When a checkpoint is saved, its
``hyper_parameters`` are rewritten (:func:`self_contained_model_args` for terratorch's tasks, through the callback
:class:`~terratorch_eoplugins.tasks.callbacks.SelfContainedCheckpoint`; the plugin's tasks do it in their own
``on_save_checkpoint``): ``backbone_ckpt_path`` becomes ``None``, the architecture read from the file is written
out as builder arguments, and ``backbone_pretrained_from`` (:data:`PROVENANCE_FLAG`) records the absolute path the
weights came from. That path is never read: it only says that the weights come from the checkpoint being restored
(``load_from_checkpoint`` builds the model from the hyper-parameters, then loads the ``state_dict``; so do
``terratorch test|predict|fit --ckpt_path``, whose LightningCLI reads the checkpoint's hyper-parameters over the
command line's), so no "no pretrained weights" warning is logged for it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

__all__ = [
    "PRETRAINED_FLAG", "PROVENANCE_FLAG", "RENAMED_FLAGS", "check_builder_kwargs", "log_restored",
    "reject_renamed_flags", "resolve_source", "self_contained_hparams", "self_contained_model_args",
    "warn_no_pretrained",
]

logger = logging.getLogger("terratorch_eoplugins.models.pretrained")

#: the one name of "pretraining checkpoint of this plugin model" (a builder's ``ckpt_path`` in ``model_args``)
PRETRAINED_FLAG = "backbone_ckpt_path"
#: written by self-contained checkpoints in place of :data:`PRETRAINED_FLAG`: where the weights came from (not read)
PROVENANCE_FLAG = "backbone_pretrained_from"
#: former names of :data:`PRETRAINED_FLAG` (errors naming it)
RENAMED_FLAGS: dict[str, str] = {"dunia_ckpt_path": PRETRAINED_FLAG, "pretrained_ckpt": PRETRAINED_FLAG}
#: the method a backbone implements to rebuild without its pretraining file (see :func:`self_contained_model_args`)
SELF_CONTAINED_METHOD = "self_contained_args"


def resolve_source(path: str | Path) -> str:
    """Absolute, normalised form of a pretraining checkpoint path (recorded as :data:`PROVENANCE_FLAG`)."""
    return str(Path(path).expanduser().resolve())


def reject_renamed_flags(owner: str, **given: Any) -> None:
    """Raise ``ValueError`` naming :data:`PRETRAINED_FLAG` if a former flag (``dunia_ckpt_path=...``) was given."""
    for old, value in given.items():
        if value is not None:
            new = RENAMED_FLAGS.get(old, PRETRAINED_FLAG)
            raise ValueError(f"{owner}: {old} was renamed to {new}, the one flag for the pretrained weights of the "
                             f"plugin's models: pass --model.init_args.{new}={value} instead of "
                             f"--model.init_args.{old}")


def check_builder_kwargs(builder: str, kwargs: Mapping[str, Any], accepted: Iterable[str],
                         prefix: str = "backbone_") -> None:
    """Raise ``ValueError`` for keyword arguments a registered builder does not take.

    Names every unknown key (as the builder gets it and as written in ``model_args``, with ``prefix``) and lists
    the accepted ones; former names of the pretrained-weights flag are pointed to :data:`PRETRAINED_FLAG`.
    """
    if not kwargs:
        return
    unknown = sorted(kwargs)
    hints = [f"{k} is now {prefix}ckpt_path" if prefix else f"{k} is now ckpt_path"
             for k in unknown if k.removeprefix(prefix) in RENAMED_FLAGS or k in RENAMED_FLAGS]
    written = ", ".join(prefix + k for k in unknown)
    raise ValueError(f"{builder}: unknown argument(s) {unknown} (model_args {written}); accepted: "
                     f"{sorted(set(accepted))}" + (f" ({'; '.join(hints)})" if hints else ""))


def warn_no_pretrained(model: str, flag: str, consequence: str, hint: str = "") -> None:
    """The one warning of a model built without the pretraining it is meant to start from.

    ``"<model>: no pretrained weights (<flag> is null): <consequence>[; <hint>]"``.
    """
    logger.warning("%s: no pretrained weights (%s is null): %s%s", model, flag, consequence,
                   f"; {hint}" if hint else "")


def log_restored(model: str, source: str) -> None:
    """Info log of a model rebuilt from a self-contained checkpoint (weights come from its ``state_dict``)."""
    logger.info("%s: built without reading its pretraining file; the pretrained weights (from %s) come from the "
                "checkpoint being restored", model, source)


def self_contained_hparams(hparams: Mapping[str, Any], source: str | None, **updates: Any) -> dict[str, Any]:
    """Hyper-parameters of a plugin task rewritten for a self-contained checkpoint.

    ``hparams`` with :data:`PRETRAINED_FLAG` set to ``None``, :data:`PROVENANCE_FLAG` to ``source`` and the
    ``updates`` (architecture read from the pretraining file, other files whose content is in the ``state_dict``)
    applied. Unchanged (a copy) when ``source`` is ``None`` (no pretraining file was read).
    """
    out = dict(hparams)
    if source is None:
        return out
    out.update(copy.deepcopy(updates))
    out[PRETRAINED_FLAG] = None
    out[PROVENANCE_FLAG] = source
    return out


def self_contained_model_args(model_args: Mapping[str, Any], model: nn.Module) -> dict[str, Any] | None:
    """``model_args`` of a terratorch task (``EncoderDecoderFactory``) rewritten for a self-contained checkpoint.

    Looks in ``model`` for the plugin backbone (a module with a ``self_contained_args()`` method returning the
    builder arguments that rebuild it without reading its pretraining file, ``{}`` when it read none) and writes
    those arguments as ``backbone_<name>`` keys over a copy of ``model_args``. ``None`` when nothing changes
    (no plugin backbone, or it was not loaded from a pretraining file).
    """
    found = [m for m in model.modules() if callable(getattr(m, SELF_CONTAINED_METHOD, None))]
    args = [a for a in (getattr(m, SELF_CONTAINED_METHOD)() for m in found) if a]
    if not args:
        return None
    if len(args) > 1:
        logger.warning("%d plugin backbones were loaded from pretraining files in one model; the checkpoint keeps "
                       "their paths (which must exist when it is restored)", len(args))
        return None
    out = copy.deepcopy(dict(model_args))
    out.update({f"backbone_{k}": copy.deepcopy(v) for k, v in args[0].items()})
    return out
