"""The package's layer rules, enforced on the import graph and the class tree (see docs/architecture.md).

- ``datasets/`` builds every view of the data; ``datamodules/`` only choose splits, samplers, collation and loaders.
- ``models/`` (with ``nn/`` layers and ``losses.py``) hold every ``nn.Module``; ``tasks/`` hold LightningModules
  that read only the batch: no import of ``datasets/`` or ``datamodules/`` and no ``trainer.datamodule`` outside
  the one train-split preparation mechanism (``tasks/preparation.py``).
- Nothing imports upward: each layer imports only the layers listed for it below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "terratorch_eoplugins"

#: what the application layer (analysis/, benchmark/) may import: every layer below it
APPLICATION = {"__init__", "errors", "dates", "runtime", "nn", "losses", "metrics", "models", "datasets", "datamodules",
               "synthetic", "tasks"}
#: what each layer (a sub-package or a top-level module) may import from the package
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "metrics": set(),
    "dates": {"errors"},
    # numeric-precision guards and the terratorch subprocess runner: a utility any layer may use
    "runtime": {"errors"},
    "nn": {"errors", "dates", "runtime"},
    "losses": {"errors", "nn", "runtime"},
    "datasets": {"errors", "dates"},
    "models": {"errors", "dates", "nn", "losses", "metrics", "runtime"},
    "datamodules": {"errors", "dates", "datasets"},
    "synthetic": {"errors", "dates", "datasets"},
    "tasks": {"errors", "dates", "nn", "losses", "metrics", "models", "runtime"},
    # the application layer: analyses and sweeps may use everything below them
    "analysis": APPLICATION,
    "benchmark": APPLICATION,
    "cli": {"__init__", "errors", "models", "synthetic", "analysis", "benchmark", "runtime"},
    "__init__": {"datamodules", "datasets", "models", "tasks"},
}
MODULE_LAYERS = ("nn", "models", "losses")
REACH_IN = {"datamodule", "train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader"}
DATASET_BASES = {"Dataset", "NonGeoDataset", "GeoDataset", "IterableDataset", "TensorDataset"}
MODULE_BASES = {"Module", "Sequential", "ModuleList", "ModuleDict"}


def _files() -> dict[Path, ast.Module]:
    return {f: ast.parse(f.read_text(), str(f)) for f in sorted(ROOT.rglob("*.py"))}


def _layer(path: Path) -> str:
    return path.relative_to(ROOT).parts[0].removesuffix(".py")


def _imported_layers(tree: ast.Module) -> set[tuple[str, int]]:
    out = set()
    for n in ast.walk(tree):
        mods: list[str] = []
        if isinstance(n, ast.ImportFrom) and n.module and n.level == 0 and n.module.startswith("terratorch_eoplugins"):
            mods = [n.module] if n.module != "terratorch_eoplugins" else [f"terratorch_eoplugins.{a.name}"
                                                                          for a in n.names]
        elif isinstance(n, ast.Import):
            mods = [a.name for a in n.names if a.name.startswith("terratorch_eoplugins")]
        for m in mods:
            parts = m.split(".")
            out.add((parts[1] if len(parts) > 1 else "__init__", n.lineno))
    return out


def _bases(node: ast.ClassDef) -> set[str]:
    return {b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases}


def _subclasses(trees: dict[Path, ast.Module], roots: set[str]) -> set[str]:
    names = set(roots)
    for _ in range(4):  # classes deriving from the package's own subclasses, a few levels deep
        for tree in trees.values():
            names |= {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and _bases(n) & names}
    return names


def test_every_layer_is_listed() -> None:
    layers = {_layer(f) for f in _files()}
    assert layers <= set(ALLOWED), f"new layer(s) {sorted(layers - set(ALLOWED))}: add them to ALLOWED"


def test_no_upward_or_sideways_import() -> None:
    bad = []
    for f, tree in _files().items():
        src = _layer(f)
        for dst, line in _imported_layers(tree):
            if dst != src and dst not in ALLOWED[src]:
                bad.append(f"{f.relative_to(ROOT.parent)}:{line} {src}/ imports {dst}")
    assert not bad, "layer rule broken:\n" + "\n".join(sorted(bad))


def test_no_relative_imports() -> None:
    """Absolute imports only, so the import-graph check above sees every edge."""
    bad = [f"{f}:{n.lineno}" for f, t in _files().items() for n in ast.walk(t)
           if isinstance(n, ast.ImportFrom) and n.level > 0]
    assert not bad, bad


def test_datasets_live_in_datasets() -> None:
    trees = _files()
    datasets = _subclasses(trees, DATASET_BASES)
    bad = [f"{f.relative_to(ROOT.parent)}:{n.lineno} {n.name}" for f, t in trees.items() for n in ast.walk(t)
           if isinstance(n, ast.ClassDef) and _bases(n) & datasets and _layer(f) != "datasets"]
    assert not bad, "Dataset classes outside datasets/:\n" + "\n".join(bad)


def test_modules_live_in_models_nn_or_losses() -> None:
    trees = _files()
    modules = _subclasses(trees, MODULE_BASES)
    bad = [f"{f.relative_to(ROOT.parent)}:{n.lineno} {n.name}" for f, t in trees.items() for n in ast.walk(t)
           if isinstance(n, ast.ClassDef) and _bases(n) & modules and _layer(f) not in MODULE_LAYERS]
    assert not bad, "nn.Module classes outside models/, nn/ and losses.py:\n" + "\n".join(bad)


def test_tasks_read_only_the_batch() -> None:
    """Only tasks/preparation.py may reach the datamodule (the train-split preparation mechanism).

    tasks/callbacks.py (checkpointing and random-state callbacks) may read ``trainer.train_dataloader`` to save and
    restore its generators' states, never data, and never the datamodule.
    """
    bad = []
    for f, tree in _files().items():
        if _layer(f) != "tasks" or f.name == "preparation.py":
            continue
        forbidden = {"datamodule"} if f.name == "callbacks.py" else REACH_IN
        for n in ast.walk(tree):
            name = n.attr if isinstance(n, ast.Attribute) else n.value if isinstance(n, ast.Constant) else None
            if name in forbidden:  # obj.datamodule, or getattr(obj, "datamodule")
                bad.append(f"{f.relative_to(ROOT.parent)}:{n.lineno} {name}")
    assert not bad, "tasks reaching into the datamodule:\n" + "\n".join(bad)


def test_tasks_and_models_hold_no_command_line_script() -> None:
    bad = []
    for f, tree in _files().items():
        if _layer(f) in {"tasks", "models", "nn", "datasets", "datamodules"}:
            for n in tree.body:
                if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test):
                    bad.append(str(f.relative_to(ROOT.parent)))
                if isinstance(n, (ast.Import, ast.ImportFrom)) and any(a.name == "argparse" for a in n.names):
                    bad.append(str(f.relative_to(ROOT.parent)))
    assert not bad, "command-line scripts belong in analysis/ behind an eoplugins subcommand: " + ", ".join(bad)


@pytest.mark.parametrize("rule", ["tasks", "datasets"])
def test_the_rules_catch_a_violation(tmp_path: Path, rule: str) -> None:
    """The checks are not vacuous: a planted violation is found."""
    src = {"tasks": "from terratorch_eoplugins.datamodules.pastis import PASTISDataModule\n",
           "datasets": "from terratorch_eoplugins.models.lianet import LIANetGenerator\n"}[rule]
    edges = _imported_layers(ast.parse(src))
    assert any(dst not in ALLOWED[rule] for dst, _ in edges)
