"""Run folders named after the config (``terratorch_eoplugins.tasks.loggers``) and the TensorBoard / MLflow logger
pieces that carry terratorch's validation figures.

The toy tests drive the loggers through a plain Lightning ``Trainer`` that holds a ``SaveConfigCallback`` as the
LightningCLI would; the CLI test runs ``terratorch fit`` / ``test`` on the micro U-Net config with the shipped
logger pieces (``configs/trainer/logger/*.yaml``) and reopens what they wrote.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "micro_unet_pastis.yaml"
DEMO_PREFIX = "data/demo/"


def _toy_module():
    import lightning.pytorch as pl

    class Toy(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(3, 2)

        def training_step(self, batch, _):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch, _):
            self.log("val/loss", torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def _loader(self):
            data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.arange(8) % 2)
            return torch.utils.data.DataLoader(data, batch_size=4)

        def train_dataloader(self):
            return self._loader()

        def val_dataloader(self):
            return self._loader()

    return Toy()


def _cli_config_callback(config_file: str):
    """The ``SaveConfigCallback`` a LightningCLI started with ``-c config_file`` adds (saving nothing here)."""
    from jsonargparse import Namespace
    from lightning.pytorch.cli import SaveConfigCallback

    class RecordOnly(SaveConfigCallback):
        def save_config(self, trainer, pl_module, stage) -> None:
            self.seen_log_dir = trainer.log_dir

    return RecordOnly(parser=None, config=Namespace(config=[Path(config_file)]), save_to_log_dir=False)


def _toy_fit(run_logger, root: Path, config_file: str | None = "experiments/my_exp.yaml",
             ckpt_path: str | None = None):
    import lightning.pytorch as pl

    from terratorch_eoplugins.tasks.callbacks import ResumableModelCheckpoint
    from terratorch_eoplugins.tasks.loggers import ConfigRunName

    callbacks = [ConfigRunName(), ResumableModelCheckpoint(monitor="val/loss", save_last=True)]
    callbacks += [_cli_config_callback(config_file)] if config_file else []
    trainer = pl.Trainer(max_epochs=1, logger=run_logger, callbacks=callbacks, default_root_dir=root,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         log_every_n_steps=1, accelerator="cpu", devices=1)
    trainer.fit(_toy_module(), ckpt_path=ckpt_path)
    return trainer


def test_csv_logger_folder_is_the_config_name_and_resume_finds_its_checkpoints(tmp_path: Path) -> None:
    from terratorch_eoplugins.tasks.loggers import ConfigNamedCSVLogger

    first = _toy_fit(ConfigNamedCSVLogger(tmp_path), tmp_path)
    assert first.log_dir == str(tmp_path / "my_exp" / "version_0")
    rows = list(csv.DictReader(open(tmp_path / "my_exp" / "version_0" / "metrics.csv", newline="")))
    assert any(r.get("val/loss") for r in rows)
    assert (tmp_path / "my_exp" / "checkpoints" / "last.ckpt").is_file()
    # a second invocation of the same config: next version, same checkpoint folder (--ckpt_path last)
    second = _toy_fit(ConfigNamedCSVLogger(tmp_path), tmp_path, ckpt_path="last")
    assert second.log_dir == str(tmp_path / "my_exp" / "version_1")
    assert sorted(p.name for p in (tmp_path / "my_exp").iterdir()) == ["checkpoints", "version_0", "version_1"]
    assert not (tmp_path / "lightning_logs").exists()


def test_explicit_name_and_no_cli_keep_lightnings_folders(tmp_path: Path) -> None:
    from terratorch_eoplugins.tasks.loggers import ConfigNamedCSVLogger

    assert _toy_fit(ConfigNamedCSVLogger(tmp_path, name="mine"), tmp_path / "a").log_dir == str(
        tmp_path / "mine" / "version_0")
    assert _toy_fit(ConfigNamedCSVLogger(tmp_path / "b"), tmp_path / "b", config_file=None).log_dir == str(
        tmp_path / "b" / "lightning_logs" / "version_0")


def test_tensorboard_logger_writes_events_under_the_config_name(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from terratorch_eoplugins.tasks.loggers import ConfigNamedTensorBoardLogger

    _toy_fit(ConfigNamedTensorBoardLogger(tmp_path), tmp_path)
    events = list((tmp_path / "my_exp" / "version_0").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert "val/loss" in acc.Tags()["scalars"]


def test_mlflow_logger_writes_a_local_store_with_the_config_as_experiment(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow", reason="mlflow-skinny is in the test extra")
    from mlflow.tracking import MlflowClient

    from terratorch_eoplugins.tasks.loggers import ConfigNamedMLFlowLogger

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the logger sets for a file store when unset
    store = tmp_path / "mlruns"
    run_logger = ConfigNamedMLFlowLogger(save_dir=str(store))
    _toy_fit(run_logger, tmp_path)
    client = MlflowClient(tracking_uri=f"file:{store}")
    experiment = client.get_experiment_by_name("my_exp")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert "val/loss" in run.data.metrics
    assert (tmp_path / "my_exp" / "checkpoints" / "last.ckpt").is_file()  # beside the store, by experiment name


# ---- the real CLI with the shipped pieces ----

RUNS = r"""
import sys, warnings
warnings.filterwarnings("ignore")
from terratorch.cli_tools import build_lightning_cli
for spec in sys.argv[1].split(";"):
    build_lightning_cli(spec.split("|") + sys.argv[2:])
"""


def _figures_in_events(folder: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: list[str] = []
    for f in folder.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f), size_guidance={"images": 0})
        acc.Reload()
        tags += acc.Tags()["images"]
    return tags


@pytest.mark.slow
def test_cli_runs_log_under_the_config_name_with_figures(tiny_world_dir: Path, tmp_path: Path,
                                                        cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """``fit`` with the TensorBoard piece draws validation figures into runs/<config>/version_0; ``test`` with the
    default CSV piece writes runs/<config>/version_1/metrics.csv; ``fit`` with the MLflow piece logs figures as
    artifacts of a run in the experiment named after the config. Run from an empty folder: the pieces' relative
    ``runs`` is the folder a user finds."""
    data = yaml.safe_load((CONFIG.parent / yaml.safe_load(CONFIG.read_text())["data"]).read_text())["init_args"]
    roots = [f"--data.init_args.{k}={tiny_world_dir / v[len(DEMO_PREFIX):]}" for k, v in data.items()
             if isinstance(v, str) and v.startswith(DEMO_PREFIX)]
    runs = tmp_path / "runs"
    common = [*roots, "--data.init_args.batch_size=1", "--trainer.limit_train_batches=2",
              "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              "--model.init_args.plot_on_val=1"]
    logger_dir = REPO / "configs" / "trainer" / "logger"
    ckpt = runs / CONFIG.stem / "checkpoints" / "last.ckpt"
    specs = [f"fit|-c|{CONFIG}|--trainer.logger|{logger_dir / 'tensorboard.yaml'}|--trainer.max_epochs=1",
             f"test|-c|{CONFIG}|--ckpt_path={ckpt}",
             f"fit|-c|{CONFIG}|--trainer.logger|{logger_dir / 'mlflow.yaml'}|--ckpt_path=last"
             f"|--trainer.max_epochs=2"]
    env = {**cli_env, "MLFLOW_TRACKING_URI": ""}
    proc = subprocess.run([sys.executable, "-c", RUNS, ";".join(specs), *common], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"

    folder = runs / CONFIG.stem
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoints", "version_0", "version_1"]
    assert sorted(p.name for p in runs.iterdir()) == [CONFIG.stem, "mlruns"]
    assert _figures_in_events(folder / "version_0"), "no validation figure in the TensorBoard events"
    assert (folder / "version_0" / "config.yaml").is_file()
    with open(folder / "version_1" / "metrics.csv", newline="") as f:
        assert any(r.get("test/mIoU") for r in csv.DictReader(f))

    # the MLflow piece: a local store in runs/mlruns
    pytest.importorskip("mlflow", reason="mlflow-skinny is in the test extra")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{runs / 'mlruns'}")
    experiment = client.get_experiment_by_name(CONFIG.stem)
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert "val/loss" in run.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id) if a.path.endswith(".png")]
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1  # the resumed fit continued the TensorBoard run's
