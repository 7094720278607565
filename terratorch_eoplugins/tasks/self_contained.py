"""Self-contained checkpoints of terratorch's own tasks with a plugin backbone.

A fine-tuned ``SemanticSegmentationTask`` / ``PixelwiseRegressionTask`` over a LIANet, DUNIA, S4 or TS-fusion
backbone stores ``model_args.backbone_ckpt_path`` in its hyper-parameters. Lightning rebuilds a model from those
hyper-parameters (``load_from_checkpoint``, and LightningCLI's ``--ckpt_path``, which reads them over the command
line's) before it loads the ``state_dict``, so the pretraining file would be read again, from a path that may be
relative to another working directory, moved or deleted. :class:`SelfContainedCheckpoint` rewrites the saved
``model_args`` instead (:func:`~terratorch_eoplugins.models.pretrained.self_contained_model_args`):
``backbone_ckpt_path: null``, the architecture read from the pretraining file as builder arguments, and
``backbone_pretrained_from`` naming where the weights came from (never read). The plugin's own tasks do the same in
their ``on_save_checkpoint``. The shipped trainer pieces (``configs/trainer/callbacks/*.yaml``) include it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from terratorch_eoplugins.models.pretrained import self_contained_model_args

__all__ = ["SelfContainedCheckpoint"]


class SelfContainedCheckpoint(Callback):
    """Writes checkpoints whose ``model_args`` rebuild the model without reading the backbone's pretraining file.

    Acts on tasks whose hyper-parameters hold ``model_args`` (terratorch's ``EncoderDecoderFactory`` tasks) and
    whose model contains a plugin backbone that was loaded from a pretraining checkpoint; other checkpoints are
    left as they are. The module's own hyper-parameters are not changed (only the saved copy).
    """

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        hparams = checkpoint.get(pl_module.CHECKPOINT_HYPER_PARAMS_KEY)
        if not isinstance(hparams, Mapping) or not isinstance(hparams.get("model_args"), Mapping):
            return
        model_args = self_contained_model_args(hparams["model_args"], pl_module)
        if model_args is not None:
            checkpoint[pl_module.CHECKPOINT_HYPER_PARAMS_KEY] = {**hparams, "model_args": model_args}
