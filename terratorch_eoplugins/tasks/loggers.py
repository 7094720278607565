"""Loggers that name a run's folder after its config: ``terratorch fit -c configs/unet_pastis.yaml`` logs to
``runs/unet_pastis/version_<N>/``.

Lightning's loggers put every run under one experiment name (``lightning_logs``) unless a name is given, and a
top-level config cannot give one: it names its trainer piece by path (``trainer: trainer/cpu.yaml``), and any
``trainer.<key>`` in the same file replaces that piece. These subclasses of Lightning's CSV, TensorBoard and MLflow
loggers take the experiment name from the run instead: without ``name`` (``experiment_name`` for MLflow) it is the
stem of the config file the LightningCLI was started with (``-c``), read from the CLI's ``SaveConfigCallback`` by
:func:`run_config_name`; outside the CLI it is Lightning's ``lightning_logs``. An explicit name always wins
(``--trainer.logger.init_args.name=<name>``).

A logger does not see the trainer, so :class:`ConfigRunName` (first in the shipped callback lists,
``configs/trainer/callbacks/*.yaml``) gives it the name at the start of each run, before it creates its folder;
``ResumableModelCheckpoint`` does the same earlier, when ``--ckpt_path last`` is resolved. A logger used without
either keeps Lightning's default name.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger

logger = logging.getLogger("terratorch_eoplugins.tasks")

__all__ = ["DEFAULT_LOGGER_NAME", "ConfigNamedCSVLogger", "ConfigNamedMLFlowLogger", "ConfigNamedTensorBoardLogger",
           "ConfigRunName", "bind_run_name", "run_config_name"]

#: the experiment name Lightning's loggers use when given none
DEFAULT_LOGGER_NAME = "lightning_logs"


def run_config_name(trainer: Trainer) -> str | None:
    """The stem of the config file a LightningCLI run was started with (its first ``-c``), or ``None``.

    Read from the CLI's ``SaveConfigCallback`` (which holds the parsed configuration); absent when the trainer was
    not built by a LightningCLI from a config file, or under ``fast_dev_run``.
    """
    for callback in trainer.callbacks:
        if isinstance(callback, SaveConfigCallback):
            files = callback.config.get("config") if callback.config is not None else None
            if files:
                return Path(os.fspath(files[0])).stem
    return None


class _FolderNamedAfterConfig:
    """Mixin for Lightning's CSV and TensorBoard loggers: ``name=None`` means "the run's config name"."""

    _name: str
    _version: int | str | None
    _experiment: Any

    def _init_config_name(self, name: str | None, version: int | str | None) -> None:
        self._follows_config = name is None
        self._auto_version = version is None

    def bind_config_name(self, config_name: str | None) -> None:
        """Use ``config_name`` as the experiment name, unless a name was given or the run already wrote files."""
        if not self._follows_config or not config_name or config_name == self._name:
            return
        if self._experiment is not None:
            logger.warning("the logger already writes to %s: its folder is not renamed to %r", self.log_dir,
                           config_name)
            self._follows_config = False
            return
        self._name = config_name
        if self._auto_version:  # the next free version_<N> under the new folder
            self._version = None
        self._follows_config = False


class ConfigNamedCSVLogger(_FolderNamedAfterConfig, CSVLogger):
    """Lightning's ``CSVLogger`` writing to ``<save_dir>/<config name>/version_<N>/metrics.csv``.

    Args:
        save_dir: the folder of all experiments (the shipped pieces: ``runs``).
        name: the experiment folder; ``None`` (default): the stem of the run's config file (``lightning_logs``
            outside the CLI).
        version: as in Lightning (``None``: the next free ``version_<N>``; a string: that folder).
        prefix, flush_logs_every_n_steps: as in Lightning's ``CSVLogger``.
    """

    def __init__(self, save_dir: str | os.PathLike[str], name: str | None = None, version: int | str | None = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 100) -> None:
        super().__init__(save_dir, name=name or DEFAULT_LOGGER_NAME, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)
        self._init_config_name(name, version)


class ConfigNamedTensorBoardLogger(_FolderNamedAfterConfig, TensorBoardLogger):
    """Lightning's ``TensorBoardLogger`` writing to ``<save_dir>/<config name>/version_<N>/events.out.tfevents.*``.

    terratorch's segmentation and pixelwise-regression tasks draw validation figures (the dataset's ``plot()`` of
    the first batches, every ``plot_on_val`` epochs) into it as image summaries. View with
    ``tensorboard --logdir runs``.

    Args:
        save_dir: the folder of all experiments (the shipped pieces: ``runs``).
        name: the experiment folder; ``None`` (default): the stem of the run's config file (``lightning_logs``
            outside the CLI).
        version: as in Lightning (``None``: the next free ``version_<N>``; a string: that folder).
        kwargs: the other arguments of Lightning's ``TensorBoardLogger`` (``log_graph``, ``default_hp_metric``,
            ``prefix``, ``sub_dir``, and ``SummaryWriter``'s).
    """

    def __init__(self, save_dir: str | os.PathLike[str], name: str | None = None, version: int | str | None = None,
                 log_graph: bool = False, default_hp_metric: bool = True, prefix: str = "",
                 sub_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        super().__init__(save_dir, name=name or DEFAULT_LOGGER_NAME, version=version, log_graph=log_graph,
                         default_hp_metric=default_hp_metric, prefix=prefix, sub_dir=sub_dir, **kwargs)
        self._init_config_name(name, version)


class ConfigNamedMLFlowLogger(MLFlowLogger):
    """Lightning's ``MLFlowLogger`` whose MLflow experiment is the run's config name.

    Each invocation is one MLflow run of that experiment (metrics, hyper-parameters, and terratorch's validation
    figures as ``epoch_<E>_<batch>.png`` artifacts). The shipped piece (``configs/trainer/logger/mlflow.yaml``)
    keeps a local file store in ``runs/mlruns``; checkpoints stay in ``runs/<config name>/checkpoints``. MLflow >= 3
    refuses a file store unless ``MLFLOW_ALLOW_FILE_STORE=true``: with a ``file:`` tracking URI this logger sets
    that variable when it is unset (a database store is chosen with ``tracking_uri: sqlite:///runs/mlflow.db``,
    which needs the full ``mlflow`` package). View with ``mlflow ui --backend-store-uri runs/mlruns``.

    Args:
        experiment_name: the MLflow experiment; ``None`` (default): the stem of the run's config file
            (``lightning_logs`` outside the CLI).
        run_name: the MLflow run's name (default: MLflow's generated one).
        tracking_uri: where runs are stored; ``None``: ``$MLFLOW_TRACKING_URI``, else ``file:<save_dir>``.
        save_dir: the local file store (used without a tracking URI).
        kwargs: the other arguments of Lightning's ``MLFlowLogger`` (``tags``, ``log_model``, ``prefix``,
            ``artifact_location``, ``run_id``, ``synchronous``).
    """

    def __init__(self, experiment_name: str | None = None, run_name: str | None = None,
                 tracking_uri: str | None = None, save_dir: str | None = "./mlruns", **kwargs: Any) -> None:
        tracking_uri = tracking_uri or os.getenv("MLFLOW_TRACKING_URI") or None
        if (tracking_uri is None or tracking_uri.startswith("file:")) and save_dir is not None:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        super().__init__(experiment_name=experiment_name or DEFAULT_LOGGER_NAME, run_name=run_name,
                         tracking_uri=tracking_uri, save_dir=save_dir, **kwargs)
        self._follows_config = experiment_name is None

    @property
    def experiment_name(self) -> str:
        """The MLflow experiment's name (``name`` is its id, as in Lightning)."""
        return self._experiment_name

    def bind_config_name(self, config_name: str | None) -> None:
        """Use ``config_name`` as the experiment, unless one was given or the MLflow run already started."""
        if not self._follows_config or not config_name or config_name == self._experiment_name:
            return
        if self._initialized:
            logger.warning("the MLflow run already started in experiment %r: not moved to %r",
                           self._experiment_name, config_name)
        else:
            self._experiment_name = config_name
        self._follows_config = False


def bind_run_name(trainer: Trainer) -> str | None:
    """Give the trainer's config-named loggers the name of the run's config; returns that name (or ``None``)."""
    name = run_config_name(trainer)
    for run_logger in trainer.loggers:
        bind = getattr(run_logger, "bind_config_name", None)
        if callable(bind) and isinstance(run_logger, Logger):
            bind(name)
    return name


class ConfigRunName(Callback):
    """Gives the run's config-named loggers their name before they create anything (first in the callback lists).

    The loggers create their folders when the trainer sets up, before any callback hook (``setup`` included) runs.
    The earliest point a callback reaches the trainer is when Lightning hands every callback the module's ``log``
    (``Trainer._run``, so that callbacks may call ``self.log``): this callback names the loggers there, and again
    at ``setup`` (a no-op once named).
    """

    def __init__(self) -> None:
        self._log: Any = None

    @property
    def log(self) -> Any:
        """The LightningModule's ``log`` (set by the trainer at the start of each run)."""
        return self._log

    @log.setter
    def log(self, fn: Any) -> None:
        self._log = fn
        module = getattr(fn, "__self__", None)
        if isinstance(module, LightningModule) and module._trainer is not None:
            bind_run_name(module._trainer)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        bind_run_name(trainer)
