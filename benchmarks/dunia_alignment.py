"""DUNIA short pretraining on the synthetic world: losses and the paper's table-H1 alignment measurement.

Trains the tiny DUNIA variant (:class:`~terratorch_eoplugins.tasks.dunia_pretrain.DUNIAPretrainTask`, AdamW) on
the training chips of the synthetic GEDI world for ``--steps`` optimiser steps, and reports on the validation
chips, before and after training:

* the loss terms (Zero-CL, hierarchical VICReg, reconstructions);
* table H1: mean cosine similarity of positive pairs (a footprint pixel's ``O^V`` and its waveform's ``O^W``;
  a pixel's projected ``O^H_1`` and its projected ``O^T_1``) and of negative pairs (the other rows of the
  mini-batch), for pixel-waveform (P<->W) and pixel-pixel (P<->P) alignment.

    python benchmarks/dunia_alignment.py                         # writes the tiny world to a temp dir
    python benchmarks/dunia_alignment.py --world /path/to/world --steps 300 --chip-size 32
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def evaluate(task, batches) -> dict[str, float]:  # noqa: ANN001
    task.eval()
    acc: dict[str, list[float]] = {}
    with torch.no_grad():
        for b in batches:
            parts = task.compute_losses(b, similarities=True)
            for k, v in parts.items():
                if isinstance(v, dict):
                    for kk, vv in v.items():
                        acc.setdefault(f"{k}_{kk}", []).append(vv)
                else:
                    acc.setdefault(k, []).append(float(v))
    task.train()
    return {k: float(np.mean(v)) for k, v in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=Path, default=None, help="synthetic world folder (default: write the tiny world)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--chip-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from terratorch_eoplugins.datamodules.dunia import DUNIAPretrainDataModule
    from terratorch_eoplugins.tasks.dunia_pretrain import DUNIAPretrainTask

    world = args.world
    if world is None:
        from terratorch_eoplugins.synthetic import write_world

        world = Path(tempfile.mkdtemp(prefix="dunia_world_"))
        write_world(world, size="tiny", seed=0, products=["s2_tiles", "s1_tiles", "gedi"])
    dm = DUNIAPretrainDataModule(str(world / "GEDI"), chip_size=args.chip_size, batch_size=args.batch_size)
    dm.setup("fit")
    train = list(dm.train_dataloader())
    val = list(dm.val_dataloader())
    print(f"train chips {len(dm.train_dataset)} ({len(train)} batches), val chips {len(dm.val_dataset)}; "
          f"footprints/batch {np.mean([int(b['footprint_mask'].sum()) for b in train]):.1f}")
    task = DUNIAPretrainTask(variant="tiny", optimizer="adamw", lr=args.lr, weight_decay=0.05, warmup_steps=20,
                             max_steps=args.steps, sema_switch_every=100, vicreg_pixels=2048)
    opt_cfg = task.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    before = evaluate(task, val)
    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = train[step % len(train)]
        parts = task.compute_losses(batch)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        sched.step()
        task.sema_update()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {float(parts['loss']):.3f} zero_cl {float(parts['zero_cl']):.3f} "
                  f"vicreg {float(parts['vicreg']):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    after = evaluate(task, val)
    print("\nvalidation (tiny DUNIA, synthetic world)      before    after")
    for k in ("loss", "zero_cl", "vicreg", "rec_series", "rec_image", "rec_waveform"):
        print(f"  {k:<40s} {before[k]:8.3f} {after[k]:8.3f}")
    print("\ntable H1 (cosine similarity)                  before    after")
    for name, key in (("+P<->W (positive pixel-waveform)", "sim_pw_positive"),
                      ("-P<->W (negative pixel-waveform)", "sim_pw_negative"),
                      ("+P<->P (positive pixel-pixel)", "sim_pp_positive"),
                      ("-P<->P (negative pixel-pixel)", "sim_pp_negative")):
        print(f"  {name:<40s} {before[key]:8.3f} {after[key]:8.3f}")


if __name__ == "__main__":
    main()
