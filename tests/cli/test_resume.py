"""``terratorch fit ... --ckpt_path last`` continues an interrupted run and ends like an uninterrupted one.

The CLI tests stop a run after its first epoch (``max_epochs=1``, the checkpoint Lightning writes at the end of an
epoch, as after a kill at that point) or SIGKILL a real ``terratorch fit`` process once it has written ``last.ckpt``,
start it again with ``--ckpt_path last`` in a new process, and compare the final checkpoint with that of an
uninterrupted run. The other tests drive the two callbacks
(``terratorch_eoplugins.tasks.callbacks``) through a plain Lightning ``Trainer`` on a toy model.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "micro_unet_pastis.yaml"
DEMO_PREFIX = "data/demo/"

#: ``ROOT:EPOCHS[:EXTRA]`` per run, then the arguments every run shares; a refused run prints REFUSED
RUNS = r"""
import sys, warnings
warnings.filterwarnings("ignore")
from terratorch.cli_tools import build_lightning_cli
for spec in sys.argv[1].split(","):
    root, epochs, *extra = spec.split(":")
    try:
        build_lightning_cli(["fit", *sys.argv[2:], f"--trainer.logger.init_args.save_dir={root}",
                             f"--trainer.default_root_dir={root}", f"--trainer.max_epochs={epochs}", *extra])
    except FileExistsError as err:
        print("REFUSED", err)
"""


def _cpu_overlay(world: Path) -> list[str]:
    """The micro U-Net config on the tiny world, sized for a CPU test: 4 shuffled single-sample steps per epoch."""
    data = yaml.safe_load((CONFIG.parent / yaml.safe_load(CONFIG.read_text())["data"]).read_text())["init_args"]
    roots = [f"--data.init_args.{k}={world / v[len(DEMO_PREFIX):]}" for k, v in data.items()
             if isinstance(v, str) and v.startswith(DEMO_PREFIX)]
    return ["-c", str(CONFIG), *roots, "--data.init_args.batch_size=1", "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false"]


def _fit(specs: list[str], common: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-c", RUNS, ",".join(specs), *common], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


def _val_loss_by_epoch(metrics_csv: Path) -> dict[int, float]:
    with open(metrics_csv, newline="") as f:
        return {int(r["epoch"]): float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")}


@pytest.mark.slow
@pytest.mark.compat  # also in CI's Python 3.12 leg (.ci/run)
def test_fit_resumed_with_ckpt_path_last_ends_like_an_uninterrupted_fit(tiny_world_dir: Path, tmp_path: Path,
                                                                        cli_env: dict[str, str]) -> None:
    common = _cpu_overlay(tiny_world_dir)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _fit([f"{straight}:2", f"{stopped}:1"], common, cli_env)
    ckpt_dir = stopped / CONFIG.stem / "checkpoints"  # named after the config, shared by the logger's versions
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["epoch"] == 0

    # a new run must not write into the stopped run's folder; `--ckpt_path last` continues it (new process)
    out = _fit([f"{stopped}:1", f"{stopped}:2:--ckpt_path=last"], common, cli_env)
    assert "REFUSED" in out and str(ckpt_dir) in out

    a = torch.load(straight / CONFIG.stem / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"]) == (1, 8)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        torch.testing.assert_close(sb["exp_avg"], sa["exp_avg"], rtol=0, atol=1e-6)

    # the resumed invocation logged epoch 1 only (it did not train again from scratch), with the same val/loss
    logs = stopped / CONFIG.stem  # logs and checkpoints of a config share runs/<config name>/
    resumed = [_val_loss_by_epoch(p) for p in sorted(logs.glob("version_*/metrics.csv"))]
    assert [sorted(m) for m in resumed] == [[0], [1]]  # the stopped run, the resumed run (the refused one logged none)
    straight_losses = _val_loss_by_epoch(straight / CONFIG.stem / "version_0" / "metrics.csv")
    assert resumed[1][1] == pytest.approx(straight_losses[1], abs=1e-6)
    assert resumed[0][0] == pytest.approx(straight_losses[0], abs=1e-6)


def _assert_same_final_checkpoint(a_path: Path, b_path: Path) -> dict:
    a, b = torch.load(a_path, weights_only=False), torch.load(b_path, weights_only=False)
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    return a


@pytest.mark.slow
def test_sigkilled_terratorch_fit_resumes_with_ckpt_path_last(tiny_world_dir: Path, tmp_path: Path,
                                                               cli_env: dict[str, str]) -> None:
    """SIGKILL a real ``terratorch fit`` after it wrote ``last.ckpt``; ``--ckpt_path last`` ends like an
    uninterrupted fit (same epoch, step and weights)."""
    from terratorch_eoplugins.runtime import terratorch_command

    epochs = 3
    common = _cpu_overlay(tiny_world_dir)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _fit([f"{straight}:{epochs}"], common, cli_env)

    def fit_cmd(*extra: str) -> list[str]:
        return [*terratorch_command(cli_env), "fit", *common, f"--trainer.logger.init_args.save_dir={killed}",
                f"--trainer.default_root_dir={killed}", f"--trainer.max_epochs={epochs}", *extra]

    last = killed / CONFIG.stem / "checkpoints" / "last.ckpt"
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(fit_cmd(), cwd=REPO, env=cli_env, stdout=log, stderr=subprocess.STDOUT)
        killed_at, deadline = None, time.monotonic() + 540
        while proc.poll() is None and time.monotonic() < deadline:
            if last.is_file():
                os.kill(proc.pid, signal.SIGSTOP)  # freeze it, then kill only if last.ckpt is complete
                try:
                    killed_at = torch.load(last, weights_only=False)["epoch"]
                except Exception:  # caught while writing it: let it finish
                    os.kill(proc.pid, signal.SIGCONT)
                else:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.02)
        proc.wait(timeout=60)
    log_text = (tmp_path / "killed.log").read_text(errors="replace")[-3000:]
    assert proc.returncode == -signal.SIGKILL, f"the fit ended on its own before it was killed:\n{log_text}"
    assert killed_at is not None and killed_at < epochs - 1

    resumed = subprocess.run(fit_cmd("--ckpt_path=last"), cwd=REPO, env=cli_env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    final = _assert_same_final_checkpoint(straight / CONFIG.stem / "checkpoints" / "last.ckpt", last)
    assert final["epoch"] == epochs - 1
    # the resumed process trained only the epochs after the kill (it did not start again from scratch)
    logged = [_val_loss_by_epoch(p) for p in sorted((killed / CONFIG.stem).glob("version_*/metrics.csv"))]
    assert sorted(logged[-1]) == list(range(killed_at + 1, epochs))


# ---- the callbacks on a toy model (no CLI) ----

class _Noisy(torch.utils.data.Dataset):
    """Items that draw from torch's and NumPy's global generators, like random augmentations."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy as np

        return torch.full((6,), float(i)) + torch.rand(6) + float(np.random.rand()), torch.tensor(i % 2)


def _toy_module(generator_seed: int | None):
    import lightning.pytorch as pl

    class Toy(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Dropout(0.5), torch.nn.Linear(12, 2))

        def training_step(self, batch, _):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch, _):
            self.log("val/loss", torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1]))
            self.log("val/constant", 1.0)  # never improves after the first epoch

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

        def train_dataloader(self):
            gen = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
            return torch.utils.data.DataLoader(_Noisy(), batch_size=4, shuffle=True, generator=gen)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(_Noisy(), batch_size=8)

    return Toy()


def _toy_fit(root: Path, epochs: int, generator_seed: int | None, ckpt_path: str | None = None,
             random_state: bool = True, version: str | None = None, monitor: str = "val/loss") -> torch.Tensor:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from terratorch_eoplugins.tasks.callbacks import RandomStateCallback, ResumableModelCheckpoint

    pl.seed_everything(0, verbose=False)
    module = _toy_module(generator_seed)
    callbacks = [ResumableModelCheckpoint(monitor=monitor, save_last=True)]
    callbacks += [RandomStateCallback()] if random_state else []
    trainer = pl.Trainer(max_epochs=epochs, logger=CSVLogger(root, name="toy", version=version), callbacks=callbacks,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         log_every_n_steps=1, accelerator="cpu", devices=1)
    trainer.fit(module, ckpt_path=ckpt_path)
    return torch.cat([p.detach().flatten() for p in module.parameters()])


@pytest.mark.parametrize("generator_seed", [None, 5], ids=["global_generator", "dataloader_generator"])
def test_random_state_callback_makes_resumed_training_exact(generator_seed: int | None, tmp_path: Path) -> None:
    straight = _toy_fit(tmp_path / "a", 3, generator_seed)
    _toy_fit(tmp_path / "b", 1, generator_seed)
    resumed = _toy_fit(tmp_path / "b", 3, generator_seed, ckpt_path="last")
    assert torch.equal(resumed, straight)
    # without the saved random states the resumed epochs shuffle and drop out differently
    _toy_fit(tmp_path / "c", 1, generator_seed, random_state=False)
    assert not torch.equal(_toy_fit(tmp_path / "c", 3, generator_seed, "last", random_state=False), straight)


def test_resumable_checkpoint_folders_and_refusal(tmp_path: Path) -> None:
    _toy_fit(tmp_path, 1, None)
    _toy_fit(tmp_path, 2, None, ckpt_path="last")
    folder = tmp_path / "toy" / "checkpoints"  # one folder for the numbered versions of the experiment
    assert (folder / "last.ckpt").is_file() and sorted(p.name for p in (tmp_path / "toy").iterdir()) == [
        "checkpoints", "version_0", "version_1"]
    with pytest.raises(FileExistsError, match="--ckpt_path last"):
        _toy_fit(tmp_path, 1, None)
    # a named version is a run folder of its own, as in Lightning
    _toy_fit(tmp_path, 1, None, version="fit")
    assert (tmp_path / "toy" / "fit" / "checkpoints" / "last.ckpt").is_file()


def test_last_checkpoint_is_the_last_epoch_even_when_the_metric_stops_improving(tmp_path: Path) -> None:
    """Lightning 2.6 rewrites last.ckpt only with an improving top-k checkpoint; resuming needs the last epoch."""
    _toy_fit(tmp_path, 3, None, monitor="val/constant")
    folder = tmp_path / "toy" / "checkpoints"
    assert torch.load(folder / "last.ckpt", weights_only=False)["epoch"] == 2
    assert [p.name for p in folder.glob("epoch=*.ckpt")] == ["epoch=0-step=6.ckpt"]
