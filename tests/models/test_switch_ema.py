"""Switch EMA (DUNIA appendix E.2): the averages and switches equal an independent loop, and a resumed fit ends with
the weights of an uninterrupted one; the waveform diffusion task averages its diffusion model."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from terratorch_eoplugins.tasks.ema import SwitchEMA

X = torch.linspace(-1, 1, 32).unsqueeze(1).repeat(1, 3) * torch.tensor([1.0, -0.5, 2.0])
Y = X @ torch.tensor([[0.3], [1.2], [-0.7]]) + 0.05


class Tiny(pl.LightningModule):
    """A linear model with Switch EMA on its trainable layer, wired as the DUNIA tasks wire it."""

    def __init__(self, **ema) -> None:  # noqa: ANN003
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 1)
        self.frozen = nn.Linear(3, 1)
        self.frozen.requires_grad_(False)
        self.sema = SwitchEMA(**ema)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.sema.step(self.lin.named_parameters())

    def on_save_checkpoint(self, checkpoint) -> None:  # noqa: ANN001
        checkpoint["sema"] = self.sema.state_dict()

    def on_load_checkpoint(self, checkpoint) -> None:  # noqa: ANN001
        self.sema.load_state_dict(checkpoint["sema"])

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        return ((self.lin(x) - y) ** 2).mean()

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.2)


def _loader() -> DataLoader:
    return DataLoader(TensorDataset(X, Y), batch_size=32, shuffle=False)


def _fit(steps: int, root: Path, ckpt: str | None = None, **ema) -> tuple[Tiny, SwitchEMA, pl.Trainer]:
    model = Tiny(**ema)
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, accelerator="cpu")
    trainer.fit(model, _loader(), ckpt_path=ckpt)
    return model, model.sema, trainer


def _reference(steps: int, decay: float, every: int, switch_every: int, coef: float) -> dict[str, torch.Tensor]:
    """Independent loop: full-batch SGD; the EMA starts as the weights after step 1, is updated every `every` steps
    and switched in every `switch_every` steps."""
    model = Tiny()
    w = {n: p.detach().clone() for n, p in model.lin.named_parameters()}
    ema = None
    for step in range(1, steps + 1):
        wt = w["weight"].clone().requires_grad_(True)
        bt = w["bias"].clone().requires_grad_(True)
        loss = ((X @ wt.T + bt - Y) ** 2).mean()
        gw, gb = torch.autograd.grad(loss, [wt, bt])
        w = {"weight": w["weight"] - 0.2 * gw, "bias": w["bias"] - 0.2 * gb}
        if ema is None:
            ema = {n: t.clone() for n, t in w.items()}
        if step % every == 0:
            ema = {n: decay * ema[n] + (1 - decay) * w[n] for n in w}
        if step % switch_every == 0:
            w = {n: coef * ema[n] + (1 - coef) * w[n] for n in w}
    return {**w, **{f"ema.{n}": t for n, t in ema.items()}}


EMA = {"decay": 0.9, "every": 2, "switch_every": 6, "coef": 0.7}


def test_switch_ema_equals_an_independent_loop(tmp_path: Path) -> None:
    model, cb, _ = _fit(13, tmp_path, **EMA)
    ref = _reference(13, **EMA)
    torch.testing.assert_close(model.lin.weight.detach(), ref["weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.lin.bias.detach(), ref["bias"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cb.ema["weight"], ref["ema.weight"], rtol=1e-5, atol=1e-6)
    assert set(cb.ema) == {"weight", "bias"} and cb.steps == 13
    plain, _, _ = _fit(13, tmp_path / "plain", **{**EMA, "switch_every": 0})
    assert not torch.allclose(plain.lin.weight, model.lin.weight)  # the switches changed the trajectory


def test_resumed_fit_ends_like_an_uninterrupted_one(tmp_path: Path) -> None:
    full, full_cb, _ = _fit(13, tmp_path / "full", **EMA)
    _, _, first = _fit(7, tmp_path / "a", **EMA)  # stops between an update (6) and a switch (12)
    ckpt = tmp_path / "mid.ckpt"
    first.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)["sema"]["steps"] == 7
    resumed, cb, _ = _fit(13, tmp_path / "b", ckpt=str(ckpt), **EMA)
    for (n, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    for n, t in full_cb.ema.items():
        torch.testing.assert_close(cb.ema[n], t, rtol=0, atol=0)


def test_bad_arguments_name_themselves() -> None:
    for kwargs in ({"decay": 1.0}, {"coef": 1.5}, {"every": -1}, {"switch_every": -1}):
        with pytest.raises(ValueError, match="sema_"):
            SwitchEMA(**kwargs)
    off = SwitchEMA(every=0)
    off.step(Tiny().lin.named_parameters())
    assert off.state_dict() is None and off.steps == 0
