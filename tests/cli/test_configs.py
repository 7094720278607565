"""Every shipped top-level config runs ``fit`` and ``test`` through terratorch's real CLI on the tiny world.

The subprocesses never import ``terratorch_eoplugins`` themselves: the configs' ``class_path`` entries
must pull the plugin in, exactly as when a user types ``terratorch fit -c configs/<file>``.
"""

from __future__ import annotations

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

RUN_BOTH = r"""
import sys, warnings
warnings.filterwarnings("ignore")
from terratorch.cli_tools import build_lightning_cli
args = sys.argv[2:]
for sub in sys.argv[1].split(","):
    build_lightning_cli([sub, *args])
"""


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


def _run(subcommands: str, config: Path, world: Path, tmp: Path, env: dict[str, str], extra: list[str]) -> None:
    # no checkpoint callbacks: a smoke run must not write multi-GB checkpoints of the large baselines
    args = ["-c", str(config), *_data_root_override(config, world), "--trainer.fast_dev_run=true",
            "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp}", f"--trainer.logger.init_args.save_dir={tmp}", *extra]
    proc = subprocess.run([sys.executable, "-c", RUN_BOTH, subcommands, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{config.name}:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"


def test_there_are_configs_for_every_baseline_on_pastis() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"prithvi_pastis", "terramind_pastis", "dofa_pastis", "unet_pastis", "micro_unet_pastis"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_fits_and_tests_through_the_cli(config: Path, tiny_world_dir: Path, tmp_path: Path,
                                               cli_env: dict[str, str]) -> None:
    _run("fit,test", config, tiny_world_dir, tmp_path, cli_env, [])


@pytest.mark.slow
def test_terratorch_executable_needs_no_extra_flag(tiny_world_dir: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
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
