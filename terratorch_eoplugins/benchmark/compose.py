"""A sweep run's composed config, and its export to terratorch-iterate's config format.

:func:`compose_run_config` builds the one document that ``terratorch fit -c <run dir>/run.yaml <overrides>``
stands for: the run's trainer, data and model pieces (the trainer's ``logger:`` / ``callbacks:`` files inlined)
with every override the sweep passes applied (world roots, label fraction, setting patch, pretrained checkpoint,
the sweep's and the command line's overrides). ``run.yaml`` itself only names the pieces, so this is what stays
readable when the pieces change. Overrides are applied as jsonargparse reads them: ``--a.b=value`` sets a key
(the value parsed as YAML), ``--a.b+=value`` appends to a list, and a key under a ``class_path`` entry goes to
its ``init_args``.

:func:`iterate_config` turns it into a terratorch-iterate config (the ``defaults`` / ``tasks`` / ``n_trials`` /
``optimization_space`` schema of its ``benchmark_types.Defaults`` and ``Task``) that repeats the run without a
search: one task whose ``terratorch_task`` is the model's ``init_args`` and whose ``datamodule`` is the data
piece, the trainer arguments in ``defaults.trainer_args``, an empty optimisation space and one trial.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from terratorch_eoplugins.benchmark.runner import METRICS, SweepRunner
from terratorch_eoplugins.benchmark.spec import RunSpec

#: trainer entries that may name another YAML file (relative to the trainer piece), as the shipped pieces do
TRAINER_FILE_KEYS = ("logger", "callbacks", "plugins", "profiler", "strategy")
#: the first line of an exported terratorch-iterate config (an existing file without it is never replaced)
ITERATE_MARKER = "# terratorch-iterate config exported by `eoplugins sweep --export-iterate`"
#: terratorch task classes terratorch-iterate can build, by its task ``type``
ITERATE_TASK_TYPES = {
    "SemanticSegmentationTask": "segmentation",
    "PixelwiseRegressionTask": "regression",
    "ClassificationTask": "classification",
    "MultiLabelClassificationTask": "multilabel_classification",
    "ObjectDetectionTask": "object_detection",
}
#: trainer arguments left out of the export: terratorch-iterate sets its own logger (MLflow), callbacks and
#: checkpointing, and a LightningCLI ``class_path`` entry is not a Trainer argument
ITERATE_DROPPED_TRAINER_KEYS = ("logger", "callbacks", "default_root_dir", "enable_checkpointing")


class ComposeError(ValueError):
    """A run's config cannot be composed or exported; the message names the piece, override or class."""


def _is_yaml_path(value: Any) -> bool:
    return isinstance(value, str) and value.endswith((".yaml", ".yml"))


def load_piece(path: Path) -> Any:
    """A config piece's YAML; for a trainer piece use :func:`load_trainer_piece`."""
    if not path.is_file():
        raise ComposeError(f"config piece not found: {path}")
    return yaml.safe_load(path.read_text())


def load_trainer_piece(path: Path) -> dict:
    """A trainer piece with its ``logger:`` / ``callbacks:`` (...) files inlined (paths relative to the piece)."""
    cfg = load_piece(path) or {}
    if not isinstance(cfg, dict):
        raise ComposeError(f"{path}: expected a mapping of Trainer arguments")
    for key in TRAINER_FILE_KEYS:
        value = cfg.get(key)
        if _is_yaml_path(value):
            ref = Path(value) if Path(value).is_absolute() else path.parent / value
            if not ref.is_file():
                raise ComposeError(f"{path}: {key}: {value} names no file (looked for {ref})")
            cfg[key] = load_piece(ref)
    return cfg


def parse_overrides(args: list[str]) -> list[tuple[list[str], Any, bool]]:
    """``--a.b=v`` / ``--a.b v`` / ``--a.b+=v`` tokens as ``(key path, YAML-parsed value, append)``."""
    out: list[tuple[list[str], Any, bool]] = []
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or len(token) == 2:
            raise ComposeError(f"override {token!r}: expected --key=value, --key value or --key+=value")
        if "=" in token:
            key, text = token[2:].split("=", 1)
        elif i + 1 < len(args):
            key, text = token[2:], args[i + 1]
            i += 1
        else:
            raise ComposeError(f"override {token!r}: no value")
        append = key.endswith("+")
        key = key.rstrip("+")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        out.append((key.split("."), value, append))
        i += 1
    return out


def apply_override(cfg: dict, path: list[str], value: Any, append: bool = False) -> None:
    """Set (or append to) ``cfg`` at ``path``; under a ``class_path`` entry, keys go to its ``init_args``."""
    where = ".".join(path)
    node: Any = cfg
    for i, part in enumerate(path):
        if not isinstance(node, dict):
            raise ComposeError(f"override --{where}: {'.'.join(path[:i]) or 'the config'} is "
                               f"{type(node).__name__} {node!r}, not a mapping")
        if "class_path" in node and part not in ("class_path", "init_args", "dict_kwargs"):
            node = node.setdefault("init_args", {})
        if i == len(path) - 1:
            if not append:
                node[part] = copy.deepcopy(value)
                return
            items = node.get(part)
            items = [] if items is None else (items if isinstance(items, list) else [items])
            if isinstance(value, str) and "." in value and all(isinstance(x, dict) and "class_path" in x
                                                              for x in items):
                value = {"class_path": value}  # `--trainer.callbacks+=pkg.Class`, as jsonargparse reads it
            node[part] = [*items, copy.deepcopy(value)]
            return
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        node = child


def apply_profile(cfg: dict, profile: Path) -> None:
    """Overlay a profile file (a second ``-c``) on ``cfg`` as jsonargparse does: a piece path replaces the piece, a
    ``trainer`` mapping is merged key by key, a ``data``/``model`` mapping merges its ``init_args`` key by key into
    the same class (a value that is itself a mapping, e.g. ``model_args``, is replaced whole)."""
    over = load_piece(profile) or {}
    if not isinstance(over, dict):
        raise ComposeError(f"{profile}: expected a mapping (an overlay of a runnable config)")
    for key, value in over.items():
        if key == "trainer":
            if isinstance(value, str):
                cfg["trainer"] = load_trainer_piece(profile.parent / value)
            elif isinstance(value, dict):
                cfg["trainer"] = {**cfg["trainer"], **value}
            continue
        if key in ("data", "model"):
            if isinstance(value, str):
                cfg[key] = load_piece(profile.parent / value)
                continue
            if not isinstance(value, dict):
                raise ComposeError(f"{profile}: {key}: expected a piece path or a mapping, got {value!r}")
            base = cfg.get(key) or {}
            if value.get("class_path") not in (None, base.get("class_path")):
                cfg[key] = copy.deepcopy(value)
                continue
            merged = copy.deepcopy(base)
            merged.setdefault("init_args", {}).update(copy.deepcopy(value.get("init_args") or {}))
            cfg[key] = merged
            continue
        cfg[key] = copy.deepcopy(value)


def compose_run_config(runner: SweepRunner, run: RunSpec, pretrain_ckpt: Path | None = None) -> dict:
    """The run's full config (``seed_everything``, ``trainer``, ``data``, ``model``) with every override applied.

    ``pretrain_ckpt`` defaults to the checkpoint of the run's finished pretraining stage (if any).
    """
    repo = runner.repo
    cfg: dict = {
        "seed_everything": run.seed,
        "trainer": load_trainer_piece(repo / run.trainer),
        "data": load_piece(repo / run.data),
        "model": load_piece(repo / run.model_piece),
    }
    if run.profile:
        apply_profile(cfg, repo / run.profile)
    ckpt = pretrain_ckpt if pretrain_ckpt is not None else runner.pretrain_ckpt(run)
    for path, value, append in parse_overrides(runner.override_args(run, ckpt)):
        if path[0] not in cfg:
            raise ComposeError(f"run {run.run_id}: override --{'.'.join(path)} is not under seed_everything, "
                               "trainer, data or model")
        apply_override(cfg, path, value, append)
    return cfg


def iterate_config(runner: SweepRunner, run: RunSpec, storage_uri: str | None = None) -> tuple[dict, list[str]]:
    """``(config, notes)``: the run in terratorch-iterate's format and what the export could not carry over.

    Raises :class:`ComposeError` when the run's model is not a terratorch task terratorch-iterate can build.
    """
    composed = compose_run_config(runner, run)
    model = composed["model"] or {}
    class_path = str(model.get("class_path", ""))
    module, _, name = class_path.rpartition(".")
    if not module.startswith("terratorch.tasks") or name not in ITERATE_TASK_TYPES:
        raise ComposeError(
            f"run {run.run_id}: its model piece {run.model_piece} is {class_path or 'not a class_path entry'}; "
            f"terratorch-iterate builds only terratorch.tasks.{{{', '.join(ITERATE_TASK_TYPES)}}}")
    notes: list[str] = []
    trainer = dict(composed["trainer"])
    dropped = [k for k in ITERATE_DROPPED_TRAINER_KEYS if k in trainer]
    for k in dropped:
        trainer.pop(k)
    if dropped:
        notes.append(f"trainer {', '.join(dropped)} left out (terratorch-iterate sets its own MLflow logger, "
                     "callbacks and checkpointing)")
    notes.append(f"seed_everything {run.seed} of the sweep is not carried over: terratorch-iterate seeds every "
                 "fit with its own constant")
    col, key, higher = METRICS[run.kind][0]
    key = run.metric_keys.get(col, key)
    metric = "val/" + key.split("/", 1)[1] if key.startswith("test/") else f"val/{key}"
    notes.append(f"metric {metric}: the validation counterpart of the leaderboard's {col} ({key})")
    if run.pretrain is not None and runner.pretrain_ckpt(run) is None:
        notes.append(f"the pretraining stage {run.pretrain_id} has not finished: --{run.pretrain.ckpt_arg} is unset")
    task = {
        "name": run.task,
        "type": ITERATE_TASK_TYPES[name],
        "direction": "max" if higher else "min",
        "metric": metric,
        "terratorch_task": copy.deepcopy(model.get("init_args") or {}),
        "datamodule": copy.deepcopy(composed["data"]),
    }
    config = {
        "experiment_name": run.sweep,
        "run_name": run.run_id,
        "defaults": {"trainer_args": trainer, "terratorch_task": {}},
        "tasks": [task],
        "n_trials": 1,
        "save_models": False,
        "storage_uri": storage_uri or str(runner.runs_dir / "iterate_mlruns"),
        "run_repetitions": 1,
        "optimization_space": {},
    }
    return config, notes


def write_iterate_config(runner: SweepRunner, run: RunSpec, out: str | Path, storage_uri: str | None = None) -> Path:
    """Write :func:`iterate_config` to ``out`` (YAML, the notes as comments); an existing file is replaced only if
    it is an earlier export (its first line is :data:`ITERATE_MARKER`), else :class:`ComposeError`."""
    out = Path(out)
    if out.exists():
        first = out.read_text(errors="replace").splitlines()[:1] if out.is_file() else ["<not a file>"]
        if first != [ITERATE_MARKER]:
            raise ComposeError(f"{out}: exists and is not a config exported by `eoplugins sweep --export-iterate`; "
                               "refusing to replace it: choose another path")
    config, notes = iterate_config(runner, run, storage_uri)
    head = [ITERATE_MARKER, f"# sweep {runner.sweep.path}, run {run.run_id}",
            "# run with terratorch-iterate: `iterate --hpo --config <this file>` (or `terratorch iterate ...`)"]
    head += [f"# note: {n}" for n in notes]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(head) + "\n" + yaml.safe_dump(config, sort_keys=False, default_flow_style=None))
    return out
