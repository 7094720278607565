"""Optimiser and scheduler of the plugin's own tasks, chosen with terratorch's argument names (issue 22, item 6)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from timm.optim import Lion

from terratorch_eoplugins.tasks.dunia_pretrain import DUNIAPretrainTask
from terratorch_eoplugins.tasks.lianet_pretrain import LIANetPretrainTask
from terratorch_eoplugins.tasks.optimization import WarmupCosine, build_optimization, warmup_cosine_factor
from terratorch_eoplugins.tasks.s4_pretrain import S4PretrainTask
from terratorch_eoplugins.tasks.tsfusion_pretrain import TSFusionPretrainTask

LIANET_SMALL = dict(levels=3, features_per_level=2, log2_table_size=10, base_resolution=8, growth=2.0,
                    preproj_channels=8, trunk_hidden=8, trunk_blocks=1, trunk_out=8)
DUNIA_MICRO = dict(embed_dim=32, ffn_dim=64, num_heads=2, out_dim=8, na_kernel=5, na_heads=1)
TSF_SMALL = dict(before=5, after=2, image_size=16,
                 image_tokenizer_kwargs={"levels": [5, 4, 4], "hidden_dims": [16, 16]},
                 model_kwargs={"dim": 16, "encoder_depth": 1, "decoder_depth": 1})


def _from_yaml(text: str) -> pl.LightningModule:
    """Instantiate ``model:`` of a YAML config the way LightningCLI does (jsonargparse, class_path + init_args)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningModule, "model")
    cfg = parser.parse_object(yaml.safe_load(text))
    return parser.instantiate_classes(cfg).model


def _lianet(**kw: object) -> LIANetPretrainTask:
    task = LIANetPretrainTask("modified", LIANET_SMALL, **kw)
    task.generator = task.build_generator()
    return task


def test_task_from_yaml_uses_the_named_optimizer_and_scheduler() -> None:
    task = _from_yaml("""
model:
  class_path: terratorch_eoplugins.tasks.s4_pretrain.S4PretrainTask
  init_args:
    widths: [4, 8, 8, 16]
    lr: 0.02
    optimizer: SGD
    optimizer_hparams: {momentum: 0.8, nesterov: true}
    scheduler: CosineAnnealingLR
    scheduler_hparams: {T_max: 7, eta_min: 0.001, interval: step}
""")
    assert isinstance(task, S4PretrainTask)
    conf = task.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]
    assert type(opt) is torch.optim.SGD
    assert opt.defaults["lr"] == 0.02 and opt.defaults["momentum"] == 0.8 and opt.defaults["nesterov"] is True
    assert type(sched["scheduler"]) is torch.optim.lr_scheduler.CosineAnnealingLR
    assert sched["scheduler"].T_max == 7 and sched["scheduler"].eta_min == 0.001
    assert sched["interval"] == "step" and sched["monitor"] == task.monitor  # terratorch's factory layout
    assert task.hparams["scheduler_hparams"]["interval"] == "step"  # the stored hyper-parameters are not edited


def test_plugin_warmup_cosine_and_class_paths_from_yaml() -> None:
    task = _from_yaml("""
model:
  class_path: terratorch_eoplugins.tasks.lianet_pretrain.LIANetPretrainTask
  init_args:
    generator_args: {levels: 3, features_per_level: 2, log2_table_size: 10, base_resolution: 8, preproj_channels: 8,
                     trunk_hidden: 8, trunk_blocks: 1, trunk_out: 8}
    lr: 0.001
    optimizer: timm.optim.Lion
    optimizer_hparams: {weight_decay: 0.2}
    scheduler: terratorch_eoplugins.tasks.optimization.WarmupCosine
    scheduler_hparams: {warmup: 3, total: 30, min_lr_ratio: 0.1, interval: step}
""")
    task.generator = task.build_generator()
    conf = task.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert type(opt) is Lion and opt.defaults["weight_decay"] == 0.2 and opt.defaults["lr"] == 0.001
    assert type(sched) is WarmupCosine and (sched.warmup, sched.total, sched.min_lr_ratio) == (3, 30, 0.1)
    assert conf["lr_scheduler"]["interval"] == "step"


def test_defaults_are_the_papers_choices() -> None:
    trainer = SimpleNamespace(max_epochs=10, estimated_stepping_batches=200)
    # LIANet: AdamW 5e-4, no weight decay, 5 warmup epochs + cosine per epoch
    lia = _lianet()
    lia._trainer = trainer
    conf = lia.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]
    assert type(opt) is torch.optim.AdamW and opt.defaults["lr"] == 5e-4 and opt.defaults["weight_decay"] == 0.0
    assert type(sched["scheduler"]) is WarmupCosine and sched["interval"] == "epoch"
    assert (sched["scheduler"].warmup, sched["scheduler"].total, sched["scheduler"].min_lr_ratio) == (5, 10, 0.0)
    # DUNIA: Lion 5e-5, weight decay 0.4, 5K warmup steps + cosine over the trainer's steps
    dunia = DUNIAPretrainTask(variant="tiny", image_kwargs=DUNIA_MICRO, lstm_layers=1, waveform_length=64,
                              waveform_kwargs={"codebook_size": 16, "num_quantizers": 2})
    dunia._trainer = SimpleNamespace(max_epochs=100, estimated_stepping_batches=250_000)
    conf = dunia.configure_optimizers()
    assert type(conf["optimizer"]) is Lion
    assert conf["optimizer"].defaults["lr"] == 5e-5 and conf["optimizer"].defaults["weight_decay"] == 0.4
    s = conf["lr_scheduler"]
    assert s["interval"] == "step" and (s["scheduler"].warmup, s["scheduler"].total) == (5000, 250_000)
    # TS fusion pretraining: AdamW (0.9, 0.95), weight decay 0.05, warmup + cosine per step
    tsf = TSFusionPretrainTask(**TSF_SMALL)
    tsf._trainer = trainer
    conf = tsf.configure_optimizers()
    assert type(conf["optimizer"]) is torch.optim.AdamW
    defaults = conf["optimizer"].defaults
    assert tuple(defaults["betas"]) == (0.9, 0.95) and defaults["weight_decay"] == 0.05
    assert conf["lr_scheduler"]["interval"] == "step" and conf["lr_scheduler"]["scheduler"].total == 200
    # S4: Adam, no weight decay, constant rate
    conf = S4PretrainTask(widths=[4, 8, 8, 16]).configure_optimizers()
    assert type(conf["optimizer"]) is torch.optim.Adam and conf["optimizer"].defaults["weight_decay"] == 0.0
    assert "lr_scheduler" not in conf


def test_given_hparams_merge_over_the_defaults_of_the_same_class_only() -> None:
    tsf = TSFusionPretrainTask(optimizer_hparams={"weight_decay": 0.1}, **TSF_SMALL)
    opt = tsf.configure_optimizers()["optimizer"]
    assert opt.defaults["weight_decay"] == 0.1 and tuple(opt.defaults["betas"]) == (0.9, 0.95)  # paper's betas kept
    other = TSFusionPretrainTask(optimizer="Adam", **TSF_SMALL)  # another class: its own defaults
    opt = other.configure_optimizers()["optimizer"]
    assert type(opt) is torch.optim.Adam and opt.defaults["weight_decay"] == 0 and opt.defaults["betas"] == (0.9, 0.999)
    assert "lr_scheduler" not in TSFusionPretrainTask(scheduler=None, **TSF_SMALL).configure_optimizers()


def test_unknown_names_and_keys_are_errors_naming_the_argument() -> None:
    with pytest.raises(ValueError, match=r"optimizer='adamw'.*did you mean 'AdamW'"):
        LIANetPretrainTask("modified", LIANET_SMALL, optimizer="adamw")
    with pytest.raises(ValueError, match=r"optimizer='NoSuchOpt' is not an optimizer of torch.optim"):
        S4PretrainTask(widths=[4, 8, 8, 16], optimizer="NoSuchOpt")
    with pytest.raises(ValueError, match=r"optimizer='nosuch\.module\.Opt': cannot import"):
        S4PretrainTask(widths=[4, 8, 8, 16], optimizer="nosuch.module.Opt")
    with pytest.raises(ValueError, match=r"scheduler='Cosine'"):
        S4PretrainTask(widths=[4, 8, 8, 16], scheduler="Cosine")
    with pytest.raises(ValueError, match=r"scheduler_hparams: unknown key\(s\) \['warmup_steps'\]"):
        LIANetPretrainTask("modified", LIANET_SMALL, scheduler_hparams={"warmup_steps": 3})
    with pytest.raises(ValueError, match="scheduler_hparams.interval"):
        S4PretrainTask(widths=[4, 8, 8, 16], scheduler="StepLR", scheduler_hparams={"step_size": 2, "interval": "x"})
    task = _lianet(scheduler_hparams={"total": None})
    task._trainer = SimpleNamespace(max_epochs=-1, estimated_stepping_batches=math.inf)
    with pytest.raises(ValueError, match="scheduler_hparams.total"):
        task.configure_optimizers()


def test_warmup_cosine_scheduler_values_per_parameter_group() -> None:
    w = torch.nn.Parameter(torch.zeros(1))
    v = torch.nn.Parameter(torch.zeros(1))
    conf = build_optimization([{"params": [w]}, {"params": [v], "lr": 1.0}], 0.1, "SGD", None, "WarmupCosine",
                              {"warmup": 4, "total": 20, "min_lr_ratio": 0.2, "interval": "step"})
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(25):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for s, (a, b) in enumerate(lrs):
        if s < 4:
            f = (s + 1) / 4
        else:
            f = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - 4) / 16)))
        assert a == pytest.approx(0.1 * f) and b == pytest.approx(1.0 * f)
    assert warmup_cosine_factor(30, 4, 20, 0.2) == pytest.approx(0.2)
    assert warmup_cosine_factor(0, 50, 10) == pytest.approx(1 / 9)  # a warmup longer than the run is shortened


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.lrs: list[float] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> dict:
        return build_optimization(self.parameters(), 0.1, "AdamW", {"weight_decay": 0.0}, "WarmupCosine",
                                  {"warmup": 3, "interval": "step"}, trainer=self._trainer)


class _SaveAt(pl.Callback):
    """Write a checkpoint after ``step`` optimiser steps (an interrupted run's last.ckpt)."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def _fit(tmp_path: Path, callbacks: list[pl.Callback], ckpt: str | None = None) -> _Tiny:
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(5, 2)), batch_size=1)
    model = _Tiny()
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu", callbacks=callbacks)
    trainer.fit(model, data, ckpt_path=ckpt)
    return model


def test_warmup_cosine_state_is_restored_when_a_fit_resumes(tmp_path: Path) -> None:
    full = _fit(tmp_path, [_SaveAt(5, tmp_path / "epoch0.ckpt")])  # 2 epochs x 5 steps; checkpoint after epoch 0
    assert full.lrs[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1]) and full.lrs[-1] < 0.01
    state = torch.load(tmp_path / "epoch0.ckpt", weights_only=False)["lr_schedulers"][0]
    assert (state["last_epoch"], state["warmup"], state["total"]) == (5, 3, 10)
    resumed = _fit(tmp_path, [], str(tmp_path / "epoch0.ckpt"))
    assert resumed.lrs == pytest.approx(full.lrs[5:])


def test_a_given_warmup_length_replaces_the_default_one_whatever_its_unit() -> None:
    """``warmup_epochs`` given where the default says ``warmup`` (steps), or the reverse: one warm-up, the given."""
    from terratorch_eoplugins.tasks.optimization import OptimizerDefaults

    steps = OptimizerDefaults("AdamW", {}, "WarmupCosine", {"warmup": 5000, "interval": "step"})
    got = steps.resolve("AdamW", None, "WarmupCosine", {"warmup_epochs": 1})["scheduler_hparams"]
    assert got == {"warmup_epochs": 1, "interval": "step"}
    epochs = OptimizerDefaults("AdamW", {}, "WarmupCosine", {"warmup_epochs": 5, "interval": "step"})
    got = epochs.resolve("AdamW", None, "WarmupCosine", {"warmup": 20})["scheduler_hparams"]
    assert got == {"warmup": 20, "interval": "step"}
    assert epochs.resolve("AdamW", None, "WarmupCosine", {"warmup_epochs": 2})["scheduler_hparams"] == \
        {"warmup_epochs": 2, "interval": "step"}
    assert epochs.resolve("AdamW", None, "WarmupCosine", None)["scheduler_hparams"] == \
        {"warmup_epochs": 5, "interval": "step"}
    assert epochs.resolve("AdamW", None, "CosineAnnealingLR", {"T_max": 3})["scheduler_hparams"] == {"T_max": 3}
