"""Training of the FSQ time-series tokenizer: AdamW, warmup + cosine schedule, gradient clipping (appendix A.1)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from terratorch_eoplugins.nn.training import train_on_random_batches
from terratorch_eoplugins.nn.ts_tokenizers.base import as_real_tensor
from terratorch_eoplugins.nn.ts_tokenizers.fsq import FSQTokenizer

__all__ = ["train_fsq_tokenizer"]


def train_fsq_tokenizer(tokenizer: FSQTokenizer, series: Tensor | np.ndarray, steps: int = 500,
                        batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 0.01, grad_clip: float = 1.0,
                        warmup_steps: int = 0, seed: int = 0, log_every: int = 0) -> list[float]:
    """Train an FSQ tokenizer on series ``[N, L]`` (``[N, V, L]`` with ``num_variables``) with AdamW, a cosine
    schedule and gradient clipping (appendix A.1). Fits the statistics first if needed; returns the loss per step."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    series = as_real_tensor(series, "series").float()
    if series.ndim < 2:
        raise ValueError(f"series: expected [N, L] or [N, V, L], got shape {tuple(series.shape)}")
    if not bool(tokenizer.fitted):
        tokenizer.fit(series)
    opt = torch.optim.AdamW(tokenizer.parameters(), lr=lr, weight_decay=weight_decay)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return train_on_random_batches(tokenizer, series, steps, batch_size, opt, sched, grad_clip, seed, log_every,
                                   ("recon", "commit"))
