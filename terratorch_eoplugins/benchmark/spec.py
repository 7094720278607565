"""Sweep definitions: a YAML matrix of models x tasks x settings x label fractions x seeds -> concrete runs.

A sweep file (``benchmarks/sweeps/*.yaml``) names the shipped config pieces; every run is one
``terratorch fit`` + ``terratorch test`` over ``--trainer <piece> --data <piece> --model <piece>`` plus overrides::

    name: smoke
    world: data/demo                 # where the data pieces' ``data/demo/`` roots point (``--world`` overrides)
    trainer: configs/trainer/cpu.yaml
    overrides: [--trainer.max_epochs=2]        # every run of the sweep
    label_fractions: [1.0, 0.1]
    seeds: [0]
    settings:                                  # how a setting changes the model piece
      full: {label: Full, model: {freeze_backbone: false}}
      frozen: {label: Frozen, model: {freeze_backbone: true}}
    tasks:
      pastis: {label: PASTIS, data: configs/data/pastis.yaml, kind: segmentation}
    models:
      - name: micro_unet
        label: Micro UNet
        pretrained: false                      # random init: flagged in the leaderboard
        settings: [full]
        tasks:
          pastis: {model: configs/models/pastis/micro_unet.yaml}

``folds: [0, 1, 2, 3, 4]`` (sweep-wide or per task) adds a cross-validation dimension: one run per fold
(``--data.init_args.fold_rotation=<k>``, another data argument with ``fold_arg``; run ids end in ``__f<k>``), a
pretraining shared by the folds, and leaderboard values that are means over seeds and folds.

``extends: <other sweep.yaml>`` starts from another sweep file and changes only what it gives
(:func:`read_sweep_file`): e.g. ``lianet_table3_smoke.yaml`` is table 3's protocol at CPU size.

A task may add ``overrides`` of its own (after the sweep's, before the model's and the entry's).
A task (or a model x task entry) may map leaderboard columns to other logged keys (``metrics: {r: test/r}``) for
tasks that log their own metrics. A model x task entry may also give its own ``data`` and ``trainer`` pieces,
``overrides``, ``label_fractions``, ``settings_only`` (a subset of the model's settings), per-setting model
patches (``settings: {embedding: {model_args: {...}}}``, merged over the sweep-level patch) and a ``pretrain``
stage (``{config: configs/lianet_pretrain_pastis.yaml, ckpt_arg: model.init_args.model_args.backbone_ckpt_path,
overrides: [...]}``) whose ``last.ckpt`` is passed to the fine-tuning run. The top-level configs are paper scale: an
entry (and its ``pretrain`` stage) sizes a run for CPU with ``profile: configs/profiles/cpu/<runnable>.yaml``, an
overlay passed as a second ``-c`` right after the run's config (before every override and the checkpoint flag).
``across_tasks: true`` in a stage makes it one pretraining per seed for all the model's tasks (a stage that reads
no task data). Model entries whose ``pretrain`` stages name the same ``share`` key reuse one pretraining per task x
seed (e.g. DUNIA's low-shot head and zero-shot KNN runs); their stages must then be identical. Entries with
``optional: true`` whose pieces do not exist yet are skipped (so a model whose configs are still being written is one
YAML edit away).

Model patches (``model:`` of a setting) are merged into the model piece's ``init_args``: scalar keys become
``--model.init_args.<key>=<value>`` and a ``model_args`` patch is merged into the piece's ``model_args``
(``__delete__`` removes a key, lists are replaced) and passed whole as ``--model.init_args.model_args=<json>``,
so each run is reproducible from the shipped pieces and the command recorded in the results.
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from terratorch_eoplugins.models.pretrained import RENAMED_FLAGS

#: the data root prefix that the shipped data pieces use (the demo world)
DEMO_PREFIX = "data/demo/"
DELETE = "__delete__"
KINDS = ("segmentation", "regression")


class SweepSpecError(ValueError):
    """A sweep file is malformed; the message names the file, the entry and what was expected."""


@dataclass(frozen=True)
class PretrainSpec:
    """A pretraining stage shared by every fine-tuning run of one model x task x seed."""

    config: str
    ckpt_arg: str
    overrides: tuple[str, ...] = ()
    ckpt: str = "last"  # "last" or "best"
    #: a name shared by several model entries that reuse one pretraining (default: the model's name)
    share: str | None = None
    #: an overlay (``configs/profiles/<profile>/<config>.yaml``) passed as ``-c`` right after ``config``
    profile: str | None = None
    #: one pretraining per seed for every task of the model (the stage reads no task data: e.g. TS fusion's
    #: pretraining on every crop's (image, weather) pairs, then fine-tuned per crop); default: per task x seed
    across_tasks: bool = False


@dataclass(frozen=True)
class RunSpec:
    """One cell of the sweep matrix."""

    sweep: str
    model: str
    model_label: str
    pretrained: bool
    task: str
    task_label: str
    kind: str
    setting: str
    setting_label: str
    label_fraction: float
    seed: int
    trainer: str
    data: str
    model_piece: str
    model_patch: dict = field(default_factory=dict, hash=False, compare=False)
    overrides: tuple[str, ...] = ()
    pretrain: PretrainSpec | None = None
    note: str = ""
    #: leaderboard column -> logged metric key, replacing the kind's default (e.g. ``{r: test/r}``)
    metric_keys: dict = field(default_factory=dict, hash=False, compare=False)
    #: an overlay (``configs/profiles/<profile>/<config>.yaml``) passed as ``-c`` right after the run's config
    profile: str | None = None
    #: a cross-validation fold (``--data.init_args.<fold_arg>=<fold>``); ``None``: the data piece's own split
    fold: int | None = None
    fold_arg: str = "fold_rotation"

    @property
    def run_id(self) -> str:
        rid = f"{self.model}__{self.task}__{self.setting}__lf{round(self.label_fraction * 100):03d}__s{self.seed}"
        return rid if self.fold is None else f"{rid}__f{self.fold}"

    @property
    def pretrain_id(self) -> str:
        owner = self.pretrain.share if self.pretrain is not None and self.pretrain.share else self.model
        if self.pretrain is not None and self.pretrain.across_tasks:
            return f"{owner}__s{self.seed}"
        return f"{owner}__{self.task}__s{self.seed}"


def deep_merge(base: Any, patch: Any, keep_deletes: bool = False) -> Any:
    """``patch`` merged into a copy of ``base``: dicts recursively, ``__delete__`` removes a key, rest replaced.

    ``keep_deletes``: a ``__delete__`` of a key that ``base`` lacks stays in the result, so that merging two patches
    (a setting's and an entry's) keeps the deletion for the piece they are applied to.
    """
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if v == DELETE:
            if keep_deletes and k not in out:
                out[k] = DELETE
            else:
                out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v, keep_deletes)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _strip_deletes(node: Any) -> Any:
    """``node`` without the ``__delete__`` markers left where a patch deleted a key the piece does not have."""
    if isinstance(node, dict):
        return {k: _strip_deletes(v) for k, v in node.items() if v != DELETE}
    return node


def profile_model_args(profile: Path | None) -> dict | None:
    """The ``model.init_args.model_args`` an overlay sets (whole: jsonargparse replaces the dict), or ``None``."""
    if profile is None:
        return None
    cfg = yaml.safe_load(profile.read_text()) or {}
    model = cfg.get("model") if isinstance(cfg, dict) else None
    args = ((model or {}).get("init_args") or {}).get("model_args") if isinstance(model, dict) else None
    return args if isinstance(args, dict) else None


def _cli_value(value: Any) -> str:
    """A value as jsonargparse reads it back: a plain string as itself (a quoted ``"mp"`` fails a ``Literal``
    check), a string that YAML would read as something else (``"true"``, ``"1"``) and every other value as JSON."""
    if isinstance(value, str) and yaml.safe_load(value) == value and value.strip() == value and value:
        return value
    return json.dumps(value)


def model_overrides(model_piece: Path, patch: dict, profile: Path | None = None) -> list[str]:
    """CLI overrides that apply ``patch`` to the model piece (see module docstring); a ``model_args`` patch is merged
    into the ``profile``'s ``model_args`` where the profile sets them (it replaces the piece's)."""
    if not patch:
        return []
    out = []
    for key, value in patch.items():
        if key == "model_args":
            piece = yaml.safe_load(model_piece.read_text()) or {}
            base = profile_model_args(profile)
            if base is None:
                base = (piece.get("init_args") or {}).get("model_args")
            if not isinstance(base, dict):
                raise SweepSpecError(f"{model_piece}: a 'model_args' patch needs init_args.model_args in the piece")
            merged = _strip_deletes(deep_merge(base, value))
            out.append(f"--model.init_args.model_args={json.dumps(merged, separators=(',', ':'))}")
        elif value != DELETE:  # an init_args key cannot be removed on the command line: the piece's stays
            out.append(f"--model.init_args.{key}={_cli_value(value)}")
    return out


def data_root_overrides(data_piece: Path, world: str, prefix: str = DEMO_PREFIX) -> list[str]:
    """``--data.init_args.<arg>=<world>/...`` for every data argument that points into ``prefix``."""
    if world.rstrip("/") + "/" == prefix:
        return []
    cfg = yaml.safe_load(data_piece.read_text()) or {}
    out = []
    for key, value in (cfg.get("init_args") or {}).items():
        if isinstance(value, str) and value.startswith(prefix):
            out.append(f"--data.init_args.{key}={Path(world) / value[len(prefix):]}")
    return out


def top_level_data_piece(config: Path) -> Path:
    """The data piece a top-level config (``data: data/x.yaml``) composes."""
    cfg = yaml.safe_load(config.read_text()) or {}
    data = cfg.get("data")
    if not isinstance(data, str):
        raise SweepSpecError(f"{config}: expected 'data: <piece.yaml>' (a path relative to the file)")
    return config.parent / data


def _req(d: dict, key: str, where: str) -> Any:
    if key not in d:
        raise SweepSpecError(f"{where}: missing required key '{key}'")
    return d[key]


@dataclass
class Sweep:
    """A parsed sweep file."""

    path: Path
    name: str
    world: str
    raw: dict
    runs: list[RunSpec]
    skipped: list[str]  # "model x task: why" for optional entries whose pieces do not exist

    def task_info(self) -> dict[str, dict]:
        return self.raw.get("tasks", {})


def read_sweep_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The mapping of a sweep file, with ``extends: <base.yaml>`` (relative to the file) resolved.

    The file's keys are merged over its base's (:func:`deep_merge`, ``__delete__`` removes a key; lists such as
    ``overrides``, ``seeds`` and ``folds`` are replaced), except ``models``, which is merged entry by entry on
    ``name``: an entry naming a base model patches it (e.g. another backbone in its settings, a CPU ``profile``),
    ``{name: x, __delete__: true}`` drops it, a new name is appended. A smoke version of a table is thus the table's
    file plus the sizes it changes, and cannot drift from the table's protocol.
    """
    path = Path(path)
    if not path.is_file():
        raise SweepSpecError(f"sweep file not found: {path}" + (f" (extended by {_chain[-1]})" if _chain else ""))
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise SweepSpecError(f"{path}: expected a mapping with name/tasks/models")
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str):
        raise SweepSpecError(f"{path}: extends must be the path of another sweep file, got {base_name!r}")
    base_path = (path.parent / base_name).resolve()
    if base_path in _chain or base_path == path.resolve():
        raise SweepSpecError(f"{path}: extends {base_name} forms a cycle")
    base = read_sweep_file(base_path, (*_chain, path.resolve()))
    models = raw.pop("models", None)
    out = deep_merge(base, raw, keep_deletes=True)
    if models is not None:
        if not isinstance(models, list) or not all(isinstance(m, dict) and "name" in m for m in models):
            raise SweepSpecError(f"{path}: 'models' of a sweep that extends another must be a list of entries "
                                 "with a name (patches of the base's entries or new ones)")
        merged = list(base.get("models") or [])
        names = [m.get("name") for m in merged]
        for entry in models:
            if entry["name"] not in names:
                if entry.get(DELETE) is True:
                    raise SweepSpecError(f"{path}: models: {entry['name']!r} is not a model of {base_name}, "
                                         f"which has {names}")
                merged.append(entry)
                names.append(entry["name"])
                continue
            i = names.index(entry["name"])
            if entry.get(DELETE) is True:
                merged.pop(i)
                names.pop(i)
            else:
                merged[i] = deep_merge(merged[i], entry, keep_deletes=True)
        out["models"] = merged
    return out


def load_sweep(path: str | Path, repo: str | Path = ".", trainer: str | None = None) -> Sweep:
    """Parse a sweep file into runs. Piece paths are relative to ``repo``; ``trainer`` replaces the sweep's."""
    path, repo = Path(path), Path(repo)
    if not path.is_file():
        raise SweepSpecError(f"sweep file not found: {path}")
    raw = read_sweep_file(path)
    name = str(raw.get("name") or path.stem)
    world = str(raw.get("world", DEMO_PREFIX.rstrip("/")))
    trainer_piece = trainer or _req(raw, "trainer", str(path))
    sweep_overrides = tuple(raw.get("overrides") or ())
    fractions = [float(f) for f in raw.get("label_fractions", [1.0])]
    seeds = [int(s) for s in raw.get("seeds", [0])]
    sweep_folds = raw.get("folds")
    settings = raw.get("settings") or {"full": {"label": "Full", "model": {}}}
    tasks = _req(raw, "tasks", str(path))
    models = _req(raw, "models", str(path))
    if not isinstance(models, list):
        raise SweepSpecError(f"{path}: 'models' must be a list of entries with name/tasks")
    for t, tinfo in tasks.items():
        _req(tinfo, "data", f"{path}: tasks.{t}")
        if tinfo.get("kind", "segmentation") not in KINDS:
            raise SweepSpecError(f"{path}: tasks.{t}.kind must be one of {KINDS}, got {tinfo.get('kind')!r}")
    if not (repo / trainer_piece).is_file():
        raise SweepSpecError(f"{path}: trainer piece not found: {trainer_piece}")

    runs: list[RunSpec] = []
    skipped: list[str] = []
    for m in models:
        mname = _req(m, "name", f"{path}: models entry")
        where = f"{path}: models[{mname}]"
        m_settings = m.get("settings", ["full"])
        for s in m_settings:
            if s not in settings:
                raise SweepSpecError(f"{where}: unknown setting {s!r}; defined: {sorted(settings)}")
        for tname, entry in (_req(m, "tasks", where) or {}).items():
            if tname not in tasks:
                raise SweepSpecError(f"{where}: unknown task {tname!r}; defined: {sorted(tasks)}")
            entry = entry if isinstance(entry, dict) else {"model": entry}
            tinfo = tasks[tname]
            model_piece = _req(entry, "model", f"{where}.tasks.{tname}")
            data_piece = entry.get("data", tinfo["data"])
            pre = entry.get("pretrain")
            profile = entry.get("profile")
            needed = ([model_piece, data_piece] + ([pre["config"]] if pre else []) + ([profile] if profile else [])
                      + ([pre["profile"]] if pre and pre.get("profile") else []))
            missing = [p for p in needed if not (repo / p).is_file()]
            if missing:
                if m.get("optional") or entry.get("optional"):
                    skipped.append(f"{mname} x {tname}: missing {', '.join(missing)}")
                    continue
                raise SweepSpecError(f"{where}.tasks.{tname}: config piece(s) not found: {', '.join(missing)}")
            pretrain = None
            if pre:
                old_flag = str(pre.get("ckpt_arg", "")).rsplit(".", 1)[-1]
                if old_flag in RENAMED_FLAGS:
                    raise SweepSpecError(f"{where}.tasks.{tname}.pretrain.ckpt_arg: {old_flag} was renamed to "
                                         f"{RENAMED_FLAGS[old_flag]} (e.g. model.init_args.{RENAMED_FLAGS[old_flag]})")
                pretrain = PretrainSpec(config=_req(pre, "config", f"{where}.tasks.{tname}.pretrain"),
                                        ckpt_arg=_req(pre, "ckpt_arg", f"{where}.tasks.{tname}.pretrain"),
                                        overrides=tuple(pre.get("overrides") or ()), ckpt=pre.get("ckpt", "last"),
                                        share=str(pre["share"]) if pre.get("share") else None,
                                        profile=str(pre["profile"]) if pre.get("profile") else None,
                                        across_tasks=bool(pre.get("across_tasks", False)))
            run_fractions = [float(f) for f in entry.get("label_fractions", tinfo.get("label_fractions", fractions))]
            folds = tinfo.get("folds", sweep_folds)
            if folds is not None and (not isinstance(folds, list) or not all(isinstance(k, int) for k in folds)):
                raise SweepSpecError(f"{path}: tasks.{tname}.folds (or the sweep's folds) must be a list of integers "
                                     f"(the data piece's fold indices), got {folds!r}")
            fold_arg = str(tinfo.get("fold_arg", raw.get("fold_arg", "fold_rotation")))
            for s in entry.get("settings_only", m_settings):
                sdef = settings[s]
                patch = deep_merge(sdef.get("model") or {}, ((entry.get("settings") or {}).get(s) or {}),
                                   keep_deletes=True)
                for lf, seed, fold in itertools.product(run_fractions, seeds, folds if folds is not None else [None]):
                    runs.append(RunSpec(
                        sweep=name, model=mname, model_label=str(m.get("label", mname)),
                        pretrained=bool(m.get("pretrained", False)), task=tname,
                        task_label=str(tinfo.get("label", tname)), kind=tinfo.get("kind", "segmentation"),
                        setting=s, setting_label=str(sdef.get("label", s)), label_fraction=lf, seed=seed,
                        trainer=str(entry.get("trainer", trainer_piece)), data=str(data_piece),
                        model_piece=str(model_piece), model_patch=patch,
                        overrides=sweep_overrides + tuple(tinfo.get("overrides") or ()) + tuple(
                            m.get("overrides") or ()) + tuple(entry.get("overrides") or ()),
                        pretrain=pretrain, note=str(entry.get("note", tinfo.get("note", ""))),
                        metric_keys={**(tinfo.get("metrics") or {}), **(entry.get("metrics") or {})},
                        profile=str(profile) if profile else None, fold=fold, fold_arg=fold_arg))
    ids = [r.run_id for r in runs]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise SweepSpecError(f"{path}: duplicate runs {sorted(dup)} (a model listed twice?)")
    stages: dict[str, tuple[str, PretrainSpec]] = {}
    for r in runs:
        if r.pretrain is None:
            continue
        first = stages.setdefault(r.pretrain_id, (r.model, r.pretrain))
        if ((first[1].config, first[1].overrides, first[1].profile)
                != (r.pretrain.config, r.pretrain.overrides, r.pretrain.profile)):
            raise SweepSpecError(
                f"{path}: models {first[0]!r} and {r.model!r} share the pretraining {r.pretrain_id!r} "
                f"(pretrain.share) but give it different config/profile/overrides: "
                f"{first[1].config} {first[1].profile} {list(first[1].overrides)} "
                f"vs {r.pretrain.config} {r.pretrain.profile} {list(r.pretrain.overrides)}; "
                "a shared pretraining must be identical"
            )
    return Sweep(path=path, name=name, world=world, raw=raw, runs=runs, skipped=skipped)
