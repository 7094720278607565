"""Every shipped top-level config runs ``fit`` and ``test`` through terratorch's real CLI on the tiny world, and
every YAML piece of ``configs/`` parses (see ``configs/README.md`` for the layout these tests hold the tree to).

The subprocesses never import ``terratorch_eoplugins`` themselves: the configs' ``class_path`` entries
must pull the plugin in, exactly as when a user types ``terratorch fit -c configs/<file>``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml"))
#: configs point at the demo world by default; the tests swap this prefix for the tiny world's folder
DEMO_PREFIX = "data/demo/"


def _data_root_override(config: Path, world: Path) -> list[str]:
    """``--data.init_args.<arg>=<tiny world path>`` for every data argument that points into the demo world."""
    cfg = yaml.safe_load(config.read_text())
    data = cfg.get("data")
    if isinstance(data, str):
        data = yaml.safe_load((config.parent / data).read_text())
    overrides = []
    for key, value in (data or {}).get("init_args", {}).items():
        if isinstance(value, str) and value.startswith(DEMO_PREFIX):
            overrides.append(f"--data.init_args.{key}={world / value[len(DEMO_PREFIX):]}")
    return overrides


#: data arguments that size the data, not the model: the paper-scale configs run on the tiny world with these values
TINY_DATA = {"batch_size": 2, "patch_size": 32, "samples_per_epoch": 4, "val_samples": 2, "footprints_per_batch": 8,
             "train_area_km2": 1.0}
#: input-size arguments for one model family only, ``{prefix: {"data": {...}, "model": {...}}}``; each is applied
#: where the config's data / model piece has it. The model (architecture, width, depth) and the recipe stay the
#: paper's. TS fusion's paper-scale configs encode every grid x date of a county at 224 px with TerraMind-base and
#: generate a 40-day weather window token by token (minutes per step on CPU): one date, 32 px images and a two-day
#: window here. The ViT-L/H baselines take one sample per batch (their decoders' BatchNorm sees >1 value per channel),
#: except on CropNet, whose county-level R^2 needs two counties; Prithvi's CropNet config needs its frames.
TINY_BY_PREFIX = {
    "tsfusion_": {"data": {"max_dates": 1, "image_size": 32, "before": 1, "after": 0, "window_before": 1,
                           "window_after": 0},
                  "model": {"image_size": 32, "before": 1, "after": 0}},
    **{prefix: {"data": {"batch_size": 1}}
       for prefix in ("prithvi_pastis", "prithvi_burnscars", "prithvi_gedi", "terramind_", "dofa_")},
}
#: steps of the auxiliary fits a task runs before training (tokenizers, waveform autoencoder): not the model's size
TINY_FITS = {"tokenizer_steps": 2, "autoencoder_steps": 2}


def _tiny_data(config: Path) -> list[str]:
    """``--data.init_args.<arg>=<small>`` for the data-size arguments of the config's data piece (``TINY_DATA``)
    and ``--model.init_args.<arg>=<small>`` for the task's auxiliary fits (``TINY_FITS``), each family's input-size
    arguments added (``TINY_BY_PREFIX``); the architecture, its recipe and the trainer stay the paper's (precision
    32: fp16/bf16 mixed precision is a GPU's)."""
    cfg = yaml.safe_load(config.read_text())
    data = yaml.safe_load((config.parent / cfg["data"]).read_text())["init_args"]
    model = yaml.safe_load((config.parent / cfg["model"]).read_text()).get("init_args", {})
    tiny_data, tiny_model = dict(TINY_DATA), dict(TINY_FITS)
    for prefix, extra in TINY_BY_PREFIX.items():
        if config.stem.startswith(prefix):
            tiny_data.update(extra.get("data", {}))
            tiny_model.update(extra.get("model", {}))
    return ([f"--data.init_args.{k}={v}" for k, v in tiny_data.items() if k in data]
            + [f"--model.init_args.{k}={v}" for k, v in tiny_model.items() if k in model] + ["--trainer.precision=32"])


#: worker for the fit + test runs: configs are claimed one at a time (an exclusive file per config) by
#: ``CONFIG_WORKERS`` processes, so the 10 s import of terratorch is paid once per worker, not once per config
RUN_MANY = r"""
import contextlib, gc, io, json, os, resource, sys, time, traceback, warnings
warnings.filterwarnings("ignore")
jobs_file, claims, out = sys.argv[1:4]
plugin_preloaded = "terratorch_eoplugins" in sys.modules
from terratorch.cli_tools import build_lightning_cli
for name, subcommands, args in json.loads(open(jobs_file).read()):
    try:
        os.close(os.open(os.path.join(claims, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        continue
    start, error, log = time.perf_counter(), None, io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            for sub in subcommands:
                build_lightning_cli([sub, *args])
    except BaseException as exc:  # the parser's SystemExit included
        if not (isinstance(exc, SystemExit) and exc.code in (0, None)):
            error = log.getvalue()[-3000:] + "\n" + traceback.format_exc()[-5000:]
    result = {"error": error, "seconds": round(time.perf_counter() - start, 1), "plugin_preloaded": plugin_preloaded,
              "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(result, f)
    gc.collect()
"""
#: parallel worker processes for the config runs (each on its share of the cores); 1 = one after another
CONFIG_WORKERS = int(os.environ.get("EOPLUGINS_CONFIG_WORKERS", str(min(2, os.cpu_count() or 1))))
#: the slowest configs are claimed first, so that the workers finish together
SLOW_FIRST = ("tsfusion_pretrain", "tsfusion_cropnet", "prithvi_pastis", "prithvi_burnscars", "dunia_pastis_zeroshot",
              "dunia_gedi_waveform_diffusion", "dunia_pretrain", "prithvi_gedi", "prithvi_cropnet")


def _args(config: Path, world: Path, tmp: Path, extra: list[str]) -> list[str]:
    # no checkpoint callbacks: a smoke run must not write multi-GB checkpoints of the large baselines
    return ["-c", str(config), *_data_root_override(config, world), *_tiny_data(config), "--trainer.fast_dev_run=true",
            "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp}", f"--trainer.logger.init_args.save_dir={tmp}", *extra]


@pytest.fixture(scope="module")
def config_runs(request: pytest.FixtureRequest, tiny_world_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                cli_env: dict[str, str]) -> dict[str, dict]:
    """``fit`` then ``test`` of every selected top-level config, in ``CONFIG_WORKERS`` subprocesses that run
    terratorch's CLI entry point (``build_lightning_cli``, what the ``terratorch`` script calls) one config after
    another; returns ``{config stem: {"error": traceback or None, "seconds", "max_rss_gb", ...}}``."""
    selected = sorted({item.callspec.params["config"] for item in request.session.items
                       if getattr(item, "originalname", "") == "test_config_fits_and_tests_through_the_cli"},
                      key=lambda c: (SLOW_FIRST.index(c.stem) if c.stem in SLOW_FIRST else len(SLOW_FIRST), c.stem))
    base = tmp_path_factory.mktemp("config_runs")
    claims, out = base / "claims", base / "results"
    claims.mkdir()
    out.mkdir()
    jobs = [(c.stem, ["fit", "test"], _args(c, tiny_world_dir, base / c.stem, [])) for c in selected]
    (base / "jobs.json").write_text(json.dumps(jobs))
    env = dict(cli_env, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // max(CONFIG_WORKERS, 1))))
    logs = [open(base / f"worker{i}.log", "w") for i in range(CONFIG_WORKERS)]  # noqa: SIM115
    procs = [subprocess.Popen([sys.executable, "-c", RUN_MANY, str(base / "jobs.json"), str(claims), str(out)],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    for proc in procs:
        proc.wait(timeout=3600)
    for log in logs:
        log.close()
    tails = "\n".join((base / f"worker{i}.log").read_text()[-3000:] for i in range(CONFIG_WORKERS))
    results = {c.stem: json.loads((out / f"{c.stem}.json").read_text()) if (out / f"{c.stem}.json").is_file()
               else {"error": f"no result: a worker died while running it\n{tails}"} for c in selected}
    return results


def test_there_are_configs_for_every_baseline_on_pastis() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"prithvi_pastis", "terramind_pastis", "dofa_pastis", "unet_pastis", "micro_unet_pastis"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_fits_and_tests_through_the_cli(config: Path, config_runs: dict[str, dict]) -> None:
    """The top-level configs are paper scale (model and recipe); one training and one test step of each on CPU,
    on the tiny world with a small batch (``TINY_DATA``), through terratorch's CLI in a subprocess
    (:func:`config_runs`). The first config of each worker also proves that the configs' ``class_path`` entries
    import the plugin (the workers never import it themselves)."""
    result = config_runs[config.stem]
    assert result["error"] is None, f"{config.name}:\n{result['error']}"
    assert result["plugin_preloaded"] is False


@pytest.mark.slow
@pytest.mark.compat  # also in CI's Python 3.12 leg (.ci/run)
def test_terratorch_executable_needs_no_extra_flag(tiny_world_dir: Path, tmp_path: Path,
                                                   cli_env: dict[str, str]) -> None:
    """``terratorch fit -c configs/micro_unet_pastis.yaml`` with only the data root changed."""
    exe = shutil.which("terratorch", path=str(Path(sys.executable).parent))
    assert exe, "the terratorch console script is not installed next to this Python"
    cfg = REPO / "configs" / "micro_unet_pastis.yaml"
    proc = subprocess.run([exe, "fit", "-c", str(cfg), *_data_root_override(cfg, tiny_world_dir),
                           "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}",
                           f"--trainer.logger.init_args.save_dir={tmp_path}"],
                          cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


BUILD_ONLY = r"""
import sys, warnings
warnings.filterwarnings("ignore")
from terratorch.cli_tools import build_lightning_cli
cli = build_lightning_cli(["fit", "-c", sys.argv[1]])  # max_steps=0: builds everything, trains nothing
print(type(cli.model.model.encoder).__name__, "terratorch_eoplugins" in sys.modules)
"""


@pytest.mark.slow
@pytest.mark.compat  # also in CI's Python 3.12 leg (.ci/run)
@pytest.mark.parametrize("with_path", [True, False], ids=["custom_modules_path", "no_import"])
def test_custom_modules_path_registers_the_plugin(with_path: bool, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """A config whose only plugin reference is the string backbone name needs ``custom_modules_path``."""
    import terratorch_eoplugins

    config = {
        "model": yaml.safe_load((REPO / "configs" / "models" / "pastis" / "micro_unet.yaml").read_text()),
        "data": {"class_path": "lightning.pytorch.demos.boring_classes.BoringDataModule"},
        "trainer": {"max_steps": 0, "num_sanity_val_steps": 0, "default_root_dir": str(tmp_path), "logger": False,
                    "enable_checkpointing": False},
    }
    if with_path:
        config["custom_modules_path"] = str(Path(terratorch_eoplugins.__file__).parent)
    path = tmp_path / "plugin_by_name_only.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-c", BUILD_ONLY, str(path)], cwd=tmp_path, env=cli_env,
                          capture_output=True, text=True, timeout=900)
    if with_path:
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert proc.stdout.strip().splitlines()[-1] == "TemporalWrapper True"
    else:
        assert proc.returncode != 0
        assert "micro_unet" in proc.stderr


# ---- the config tree: every piece parses, every reference resolves, names follow configs/README.md ----

PIECES = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent != REPO / "configs")
TASKS = {"pastis", "burnscars", "gedi", "cropnet", "pretrain", "dynamicworld", "canopyheight", "leaftype",
         "buildingcover", "buildings"}
DATASETS = {"pastis", "burnscars", "gedi", "cropnet", "lianetregion"}
#: a config file named anywhere in the tree's text, comments included (brace lists: s4_{lc,lr}.yaml)
CONFIG_MENTION = re.compile(r"configs/[\w./{},-]+?\.yaml")


def _expand_braces(path: str) -> list[str]:
    parts = re.split(r"\{([^{}]*)\}", path)
    return ["".join(c) for c in itertools.product(*[[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)])]


def _composed_configs() -> list[tuple[str, list[str]]]:
    """(piece, ``fit`` arguments) composing every runnable config and every piece into a full config.

    A model or data piece replaces the one of a runnable config that uses it, or failing that of one with a model
    piece of the same task folder and family (``models/pretrain/lianet_base.yaml`` -> ``lianet_pretrain_pastis.yaml``);
    a trainer piece goes into ``micro_unet_pastis.yaml``.
    """
    used = {c: yaml.safe_load(c.read_text()) for c in CONFIGS}
    host_of: dict[Path, Path] = {}
    for c, cfg in used.items():
        for key in ("trainer", "data", "model"):
            host_of.setdefault((c.parent / cfg[key]).resolve(), c)
    default = REPO / "configs" / "micro_unet_pastis.yaml"
    out = [(str(c.relative_to(REPO)), ["-c", str(c)]) for c in CONFIGS]
    for piece in PIECES:
        kind = piece.relative_to(REPO / "configs").parts[0]
        if kind == "profiles":  # an overlay of the runnable config of the same name
            out.append((str(piece.relative_to(REPO)), ["-c", str(REPO / "configs" / piece.name), "-c", str(piece)]))
            continue
        if kind not in ("trainer", "data", "models") or piece.parent.name == "callbacks":
            continue  # callback lists are loaded by the trainer pieces
        if kind == "trainer" and piece.parent.name == "logger":  # logger pieces replace a trainer piece's logger
            out.append((str(piece.relative_to(REPO)), ["-c", str(default), "--trainer.logger", str(piece)]))
            continue
        host = host_of.get(piece.resolve())
        if host is None and kind == "models":
            relatives = [c for c, cfg in used.items() if (c.parent / cfg["model"]).parent.resolve() == piece.parent
                         and piece.stem.startswith(Path(cfg["model"]).stem)]
            host = relatives[0] if relatives else None
        flag = {"trainer": "--trainer", "data": "--data", "models": "--model"}[kind]
        out.append((str(piece.relative_to(REPO)), ["-c", str(host or default), flag, str(piece)]))
    return out


PARSE_ALL = r"""
import contextlib, io, json, sys, warnings
warnings.filterwarnings("ignore")
from jsonargparse import Namespace
from terratorch.cli_tools import build_lightning_cli
jobs, class_paths = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.argv = sys.argv[:1]
failures = {}
for name, args in jobs:
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            build_lightning_cli(["fit", *args, "--print_config"])
    except SystemExit as exc:
        if exc.code not in (0, None):
            failures[name] = err.getvalue()[-1500:]
import importlib
for path in class_paths:
    module, _, attr = path.rpartition(".")
    try:
        getattr(importlib.import_module(module), attr)
    except Exception as exc:
        failures[path] = f"class_path does not import: {exc!r}"
print(json.dumps(failures))
"""


def _class_paths(node: object) -> set[str]:
    if isinstance(node, dict):
        found = {node["class_path"]} if isinstance(node.get("class_path"), str) else set()
        return found.union(*(_class_paths(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_class_paths(v) for v in node))
    return set()


@pytest.mark.slow
@pytest.mark.compat  # also in CI's Python 3.12 leg (.ci/run)
def test_every_piece_composes_into_a_config_the_cli_accepts(cli_env: dict[str, str]) -> None:
    """Each runnable config and each piece, composed into a full config, passes terratorch's parser.

    The parser checks every ``init_args`` key and value against the class signatures without building anything;
    every ``class_path`` in the tree is also imported (the subprocess imports no plugin module itself).
    """
    jobs = _composed_configs()
    covered = {name for name, _ in jobs}
    loaded_by_trainers = {str(p.relative_to(REPO)) for p in PIECES if p.parent.name == "callbacks"}
    assert covered | loaded_by_trainers == {str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")}
    class_paths = sorted(set().union(*(_class_paths(yaml.safe_load(p.read_text())) for p in [*CONFIGS, *PIECES])))
    proc = subprocess.run([sys.executable, "-c", PARSE_ALL, json.dumps(jobs), json.dumps(class_paths)], cwd=REPO,
                          env=cli_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())


def test_every_referenced_config_file_exists() -> None:
    """Piece paths (``trainer:``, ``data:``, ``model:``, ``callbacks:``, ``logger:``) and every ``configs/...yaml``
    named in the tree, in the sweeps, the README files and the Python sources (comments, docstrings) exist."""
    missing = []
    for f in [*CONFIGS, *PIECES]:
        cfg = yaml.safe_load(f.read_text())
        keys = ("trainer", "data", "model", "callbacks", "logger")
        refs = [cfg.get(k) for k in keys] if isinstance(cfg, dict) else []
        missing += [f"{f.relative_to(REPO)}: {r}" for r in refs
                    if isinstance(r, str) and r.endswith(".yaml") and not (f.parent / r).is_file()]
    texts = [*CONFIGS, *PIECES, *(REPO / "benchmarks").rglob("*.yaml"), *(REPO / "benchmarks").rglob("*.py"),
             *(REPO / "terratorch_eoplugins").rglob("*.py"), *(REPO / "tests").rglob("*.py"), REPO / "README.md",
             REPO / "configs" / "README.md", REPO / "Makefile"]
    for f in texts:
        for mention in CONFIG_MENTION.findall(f.read_text()):
            if "<" in mention or "..." in mention or "nope" in mention:  # placeholders; missing on purpose in tests
                continue
            missing += [f"{f.relative_to(REPO)}: {m}" for m in _expand_braces(mention) if not (REPO / m).is_file()]
    assert not missing, "\n".join(missing)


def test_config_tree_follows_the_naming_rule() -> None:
    """``<model>_<task>[_<variant>].yaml`` composes ``models/<task>/<model>[_<variant>].yaml``; data pieces are
    ``data/<dataset>[_<variant>].yaml``; model pieces live in task folders."""
    wrong = []
    for c in CONFIGS:
        model = Path(yaml.safe_load(c.read_text())["model"])
        task, stem = model.parent.name, model.stem
        splits = [(stem, "")] + [(stem[:i], stem[i + 1:]) for i, ch in enumerate(stem) if ch == "_"]
        names = [f"{family}_{task}" + (f"_{variant}" if variant else "") for family, variant in splits]
        if task not in TASKS or not any(c.stem == n or c.stem.startswith(n + "_") for n in names):
            wrong.append(f"{c.name} composes {model}")
    for p in PIECES:
        rel = p.relative_to(REPO / "configs")
        if rel.parts[0] == "models" and (len(rel.parts) != 3 or rel.parts[1] not in TASKS):
            wrong.append(f"{rel}: model pieces are models/<task>/<model>.yaml, tasks {sorted(TASKS)}")
        if rel.parts[0] == "profiles" and (len(rel.parts) != 3 or not (REPO / "configs" / p.name).is_file()):
            wrong.append(f"{rel}: profiles are profiles/<profile>/<runnable config>.yaml (an overlay of that config)")
        if rel.parts[0] == "data" and p.stem.split("_")[0] not in DATASETS:
            wrong.append(f"{rel}: data pieces are data/<dataset>[_<variant>].yaml, datasets {sorted(DATASETS)}")
    assert not wrong, "\n".join(wrong)


def test_configs_readme_lists_every_runnable_config_with_its_pieces() -> None:
    rows = re.findall(r"^\| `(\w+)` \| `([\w/]+\.yaml)` \| `([\w]+\.yaml)` \| `(\w+)` \|$",
                      (REPO / "configs" / "README.md").read_text(), flags=re.M)
    actual = []
    for c in CONFIGS:
        cfg = yaml.safe_load(c.read_text())
        actual.append((c.stem, cfg["model"].removeprefix("models/"), cfg["data"].removeprefix("data/"),
                       Path(cfg["trainer"]).stem))
    assert sorted(rows) == actual


PRINT_CALLBACKS = r"""
import contextlib, io, json, sys, warnings
warnings.filterwarnings("ignore")
import yaml
from terratorch.cli_tools import build_lightning_cli
out = {}
for name, args in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(buf):
        build_lightning_cli(["fit", *args, "--print_config"])
    out[name] = [c.get("class_path") for c in (yaml.safe_load(buf.getvalue())["trainer"].get("callbacks") or [])]
print(json.dumps(out))
"""


def test_dunia_classification_configs_log_weighted_f1(cli_env: dict[str, str]) -> None:
    """DUNIA's classification metric (weighted F1, section 4.1.2) is a callback of the DUNIA PASTIS config, at paper
    scale and with its CPU profile (which keeps the config's callbacks), beside the checkpointing callbacks."""
    config = REPO / "configs" / "dunia_pastis.yaml"
    jobs = [("paper", ["-c", str(config)]),
            ("cpu", ["-c", str(config), "-c", str(REPO / "configs" / "profiles" / "cpu" / "dunia_pastis.yaml")])]
    proc = subprocess.run([sys.executable, "-c", PRINT_CALLBACKS, json.dumps(jobs)], cwd=REPO, env=cli_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    callbacks = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, paths in callbacks.items():
        assert "terratorch_eoplugins.tasks.dunia_metrics.WeightedF1" in paths, (name, paths)
        assert "terratorch_eoplugins.tasks.callbacks.ResumableModelCheckpoint" in paths, (name, paths)
