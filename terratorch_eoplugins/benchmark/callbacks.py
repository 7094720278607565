"""Lightning callback that a sweep run adds to ``terratorch fit`` / ``terratorch test`` to record its statistics.

The sweep runner appends it on the command line (``--trainer.callbacks+=...BenchmarkStats``) and points it at
a JSON file through the ``EOPLUGINS_BENCH_STATS`` environment variable, so the shipped configs stay untouched.
Recorded (rank 0 writes, after reducing over DDP ranks where the value is a sum):

- ``total_params`` / ``tunable_params``: parameter counts of the LightningModule once ``configure_model`` has
  built and frozen it (tunable = ``requires_grad``), i.e. the "# Tunable Params" column of the LIANet
  supplement's tables 3/4;
- ``train_s``: wall time from ``on_train_start`` to ``on_train_end`` (model building and data setup excluded);
- ``cuda_peak_mb``: ``torch.cuda.max_memory_allocated`` of rank 0 (None on CPU);
- ``world_size`` and ``train_samples`` / ``test_samples``: samples seen summed over ranks (a DistributedSampler
  splits the data, so the sum is the dataset length rounded up to a multiple of the world size);
- ``test_pixels``: the test targets scored, summed over batches and ranks: the elements of the batch's ``mask``
  (or ``label``) that are finite and not the task's ``ignore_index``, so that runs of one table can be checked
  to score the same pixels (the LIANet supplement's baselines are tested on LIANet's samples);
- ``pearson_r`` for regression tasks: Pearson correlation between predictions and targets over the valid
  (non-ignored) test values, r = cov(p, t) / (std(p) std(t)), accumulated as running sums (n, Σp, Σt, Σp², Σt²,
  Σpt) so it reduces exactly over batches and ranks. terratorch's regression tasks log RMSE/MAE/R² but not r.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from terratorch_eoplugins.metrics import pearson_from_sums

#: environment variable naming the JSON file the callback writes
STATS_ENV = "EOPLUGINS_BENCH_STATS"


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """``(total, tunable)`` parameter counts; shared parameters are counted once."""
    total = tunable = 0
    for p in module.parameters():  # nn.Module.parameters() already de-duplicates shared tensors
        total += p.numel()
        if p.requires_grad:
            tunable += p.numel()
    return total, tunable


class BenchmarkStats(Callback):
    """Write parameter counts, training time, peak memory, sample counts and Pearson r to a JSON file.

    Args:
        path: output JSON file; default: the ``EOPLUGINS_BENCH_STATS`` environment variable. Without either
            the callback does nothing (so a config that keeps it still runs outside a sweep).
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__()
        self.path = path
        self._stats: dict[str, Any] = {}
        self._t0: float | None = None
        self._samples = {"train": 0, "test": 0}
        self._test_pixels = 0
        self._sums = torch.zeros(6, dtype=torch.float64)  # n, Σp, Σt, Σp², Σt², Σpt

    def _out(self) -> Path | None:
        p = self.path or os.environ.get(STATS_ENV)
        return Path(p) if p else None

    def _common(self, trainer: Trainer, pl_module: LightningModule) -> None:
        total, tunable = count_parameters(pl_module)
        self._stats.update(total_params=total, tunable_params=tunable, world_size=trainer.world_size,
                           accelerator=type(trainer.accelerator).__name__, strategy=type(trainer.strategy).__name__)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    @staticmethod
    def _batch_size(batch: Any) -> int:
        x = batch.get("image") if isinstance(batch, dict) else batch[0] if isinstance(batch, (list, tuple)) else batch
        if isinstance(x, dict):
            x = next(iter(x.values()))
        return int(x.shape[0]) if torch.is_tensor(x) else 0

    # ---- fit ----
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._common(trainer, pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._samples["train"] += self._batch_size(batch)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._t0 is not None:
            self._stats["train_s"] = time.perf_counter() - self._t0
        self._stats["epochs"] = trainer.current_epoch
        self._stats["global_step"] = trainer.global_step
        self._finish(trainer, pl_module, "train")

    # ---- test ----
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._common(trainer, pl_module)
        self._t0 = time.perf_counter()

    def _is_regression(self, pl_module: LightningModule) -> bool:
        return type(pl_module).__name__ in ("PixelwiseRegressionTask", "ScalarRegressionTask")

    @torch.no_grad()
    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        # at batch start: terratorch's test_step later adds/replaces batch entries for plotting
        self._samples["test"] += self._batch_size(batch)
        self._test_pixels += self._scored_targets(pl_module, batch)
        if not (self._is_regression(pl_module) and isinstance(batch, dict)):
            return
        target_key = "label" if type(pl_module).__name__ == "ScalarRegressionTask" else "mask"
        y = batch[target_key]
        rest = {k: v for k, v in batch.items() if k not in ("image", target_key, "filename")}
        pred = pl_module.handle_full_or_tiled_inference(batch["image"], pl_module.tiled_inference_on_testing,
                                                        **rest)
        pred = getattr(pred, "output", pred)  # terratorch's ModelOutput
        pred = pred.reshape(y.shape).double().flatten()
        y = y.double().flatten()
        ignore = pl_module.hparams.get("ignore_index")
        valid = torch.isfinite(y) & torch.isfinite(pred)
        if ignore is not None:
            valid &= y != ignore
        p, t = pred[valid].cpu(), y[valid].cpu()
        self._sums += torch.stack([torch.tensor(float(p.numel()), dtype=torch.float64), p.sum(), t.sum(),
                                   (p * p).sum(), (t * t).sum(), (p * t).sum()])

    @staticmethod
    def _scored_targets(pl_module: LightningModule, batch: Any) -> int:
        """Finite target elements of the batch that are not ``ignore_index`` (0 when the batch has no target)."""
        if not isinstance(batch, dict):
            return 0
        y = batch.get("mask", batch.get("label"))
        if not torch.is_tensor(y):
            return 0
        valid = torch.isfinite(y) if y.is_floating_point() else torch.ones_like(y, dtype=torch.bool)
        ignore = getattr(pl_module, "hparams", {}).get("ignore_index")
        if ignore is not None:
            valid &= y != ignore
        return int(valid.sum())

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._t0 is not None:
            self._stats["test_s"] = time.perf_counter() - self._t0
        pixels = torch.tensor(float(self._test_pixels), dtype=torch.float64, device=pl_module.device)
        self._stats["test_pixels"] = int(trainer.strategy.reduce(pixels, reduce_op="sum").item())
        sums = trainer.strategy.reduce(self._sums.to(pl_module.device), reduce_op="sum").cpu()
        if self._is_regression(pl_module):
            self._stats["pearson_r"] = pearson_from_sums(*[float(v) for v in sums])
            self._stats["pearson_n"] = int(sums[0])
        self._finish(trainer, pl_module, "test")

    def _finish(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        n = torch.tensor(float(self._samples[stage]), device=pl_module.device)
        self._stats[f"{stage}_samples"] = int(trainer.strategy.reduce(n, reduce_op="sum").item())
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            self._stats["cuda_peak_mb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        out = self._out()
        if out is None or not trainer.is_global_zero:
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(self._stats, indent=1))
        os.replace(tmp, out)
