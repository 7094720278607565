"""The small training loop shared by the tokenizers trained outside Lightning (TS-fusion image and FSQ series)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from terratorch_eoplugins.runtime import Progress

logger = logging.getLogger("terratorch_eoplugins.nn")

__all__ = ["train_on_random_batches"]


def train_on_random_batches(module: nn.Module, data: Tensor, steps: int, batch_size: int,
                            optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                            grad_clip: float, seed: int = 0, log_every: int = 0,
                            log_terms: Sequence[str] = ()) -> list[float]:
    """``steps`` optimizer steps of ``module.loss(batch)["loss"]`` on batches drawn with replacement from ``data``.

    Batches of ``min(batch_size, len(data))`` rows are drawn by a generator seeded with ``seed`` (the global random
    state is not used); gradients are clipped to norm ``grad_clip``; ``scheduler`` steps after every step. Every
    ``log_every`` steps (0: never) the loss and the ``log_terms`` of ``module.loss``'s output are printed. Progress
    (steps done, loss, elapsed time, ETA) goes to the ``terratorch_eoplugins.nn`` logger at INFO, a line at most
    every 10 s. The module is left in evaluation mode. Returns the loss of each step.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    gen = torch.Generator().manual_seed(seed)
    module.train()
    history: list[float] = []
    progress = Progress(logger, f"training the {type(module).__name__}", steps, "steps")
    for step in range(steps):
        idx = torch.randint(0, data.shape[0], (min(batch_size, data.shape[0]),), generator=gen)
        out = module.loss(data[idx])
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        scheduler.step()
        history.append(float(out["loss"].detach()))
        progress.update(note=f"loss {history[-1]:.5f}")
        if log_every and (step % log_every == 0 or step == steps - 1):
            terms = "".join(f"  {k} {float(out[k].detach()):.5f}" for k in log_terms)
            print(f"step {step:5d}  loss {history[-1]:.5f}{terms}")
    progress.close(note=f"loss {history[-1]:.5f}" if history else "")
    module.eval()
    return history
