"""Switch EMA (SEMA; Li et al., 2024), the regulariser of DUNIA's pretraining and waveform diffusion (appendix E.2).

DUNIA "maintain[s] an EMA with a decay rate of 0.9, updating every 5 steps, and replac[es] online model parameters
every 1K steps with a SEMA coefficient of 0.9". :class:`SwitchEMA` does, one call of :meth:`SwitchEMA.step` per
optimiser step:

* the first call copies the parameters (after that step's update) into the EMA;
* every ``every`` calls: ``ema <- decay * ema + (1 - decay) * online``;
* every ``switch_every`` calls (after that call's EMA update): ``online <- coef * ema + (1 - coef) * online``.

The paper does not define the "SEMA coefficient"; reading it as the weight of the EMA in the switch is this
project's interpretation (``coef = 1`` is the Switch EMA paper's plain switch, ``online <- ema``). Buffers
(BatchNorm statistics, codebooks) are not averaged. :meth:`state_dict` / :meth:`load_state_dict` carry the
averages and the step count through checkpoints, so a resumed run goes on with the same averages. Used by
:class:`~terratorch_eoplugins.tasks.dunia_pretrain.DUNIAPretrainTask` and
:class:`~terratorch_eoplugins.tasks.dunia_diffusion.DUNIAWaveformDiffusionTask` (``sema_*`` arguments).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SwitchEMA"]


class SwitchEMA:
    """Exponential moving average of parameters, switched into the online parameters periodically.

    Args:
        decay: EMA decay (paper: 0.9).
        every: optimiser steps between EMA updates (paper: 5); ``0`` disables Switch EMA.
        switch_every: optimiser steps between switches (paper: 1000); ``0``: never switch.
        coef: weight of the EMA in a switch (paper's "SEMA coefficient": 0.9; 1: replace by the EMA).
    """

    def __init__(self, decay: float = 0.9, every: int = 5, switch_every: int = 1000, coef: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0 or not 0.0 <= coef <= 1.0:
            raise ValueError(f"sema_decay must lie in [0, 1) and sema_coefficient in [0, 1], got {decay}, {coef}")
        if every < 0 or switch_every < 0:
            raise ValueError(f"sema_every and sema_switch_every must be >= 0 optimiser steps (0: off), got {every}, "
                             f"{switch_every}")
        self.decay, self.every, self.switch_every, self.coef = float(decay), int(every), int(switch_every), float(coef)
        self.steps = 0
        self.ema: dict[str, Tensor] | None = None

    @property
    def enabled(self) -> bool:
        return self.every > 0

    @torch.no_grad()
    def step(self, named_parameters: Iterable[tuple[str, nn.Parameter]]) -> None:
        """Bookkeeping of one optimiser step of the given parameters (after the optimiser updated them)."""
        if not self.enabled:
            return
        self.steps += 1
        params = dict(named_parameters)
        if self.ema is None:
            self.ema = {n: p.detach().clone() for n, p in params.items()}
        missing = sorted(set(params) - set(self.ema))
        if missing:
            raise ValueError(f"Switch EMA: no average of {missing[:5]}; the averaged parameters changed since the "
                             "averages were made (another model or checkpoint?)")
        for n, p in params.items():  # averages restored from a checkpoint live on the CPU until used
            if self.ema[n].device != p.device:
                self.ema[n] = self.ema[n].to(p.device)
        if self.steps % self.every == 0:
            for n, p in params.items():
                self.ema[n].mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)
        if self.switch_every > 0 and self.steps % self.switch_every == 0:
            for n, p in params.items():
                p.mul_(1.0 - self.coef).add_(self.ema[n], alpha=self.coef)

    def state_dict(self) -> dict[str, Any] | None:
        """``{"steps", "ema"}`` once averaging started, else ``None``."""
        return None if self.ema is None else {"steps": self.steps, "ema": self.ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.ema = int(state["steps"]), dict(state["ema"])
