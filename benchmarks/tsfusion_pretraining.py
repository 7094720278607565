"""TS fusion: does correlation pretraining help CropNet yield prediction? Pretrained vs from scratch, same budget.

For each seed:

1. pretrain :class:`~terratorch_eoplugins.tasks.tsfusion_pretrain.TSFusionPretrainTask` (tiny model) on the
   (image, daily weather) pairs of the pretraining years (no yields are used), and measure the R^2 of weather
   series *generated from images alone* against the truth on the held-out year;
2. fine-tune :class:`~terratorch_eoplugins.tasks.tsfusion_cropnet.TSFusionCropNetTask` twice with the same
   epochs, optimiser and data: from the pretrained encoder ("pretrained") and from a random encoder that
   shares the pretrained run's tokenizers ("scratch", the paper's "S" rows, which also share TerraMind's
   tokenizers); both with MP and/or MMP pooling, one learning rate end to end with a linear warmup
   (``--warmup-epochs``) and cosine decay, and the epoch with the best validation (2022) Pearson r^2 is tested
   (appendix A.2: "selected the best model based on validation R^2"; ``--select last`` tests the last epoch);
   with several ``--finetune-lr`` values each arm is fine-tuned at each rate and keeps the rate with the best
   validation Pearson r^2 (the same grid and selection rule for both arms; all candidates go to
   ``<csv>_all_lrs.csv``);
3. report the protocol's test-year (2020) metrics on yields: RMSE, r2_pearson (Pearson r^2: the paper's tables have
   R^2 = Corr.^2 in 69 of 72 cells, as MMST-ViT), R2 (coefficient of determination), and the calibration of
   the predictions (``test_bias``: mean predicted - true yield; ``test_std_ratio``: std of predicted / true yields).

Recipe (issue 20 defaults): pretraining with independent image / weather Dirichlets (eq. 3, ``--dirichlet``) and the
input-only raw image modality (``--raw-patch-size``, alpha 1000); fine-tuning with the paper's encoder dropout 0.25,
attention dropout 0.3 and stochastic depth 0.5 (``--regularization``) on the crop's paper state subset (``--states``).
The earlier behaviour: ``--dirichlet joint --raw-patch-size 0 --regularization none --states all``.

Prints per-run rows and mean +- std over seeds, side by side, and writes them to ``--csv``.
``--pretrain-dir`` keeps the pretraining checkpoints and reuses one made with the same settings and seed
(runs are deterministic on CPU), so seeds can run as separate processes and fine-tuning variants can share them;
``--encoder-lr-scale 0`` freezes the encoder (a probe of the pretrained vs random features).

    python benchmarks/tsfusion_pretraining.py --world /tmp/tsf_demo     # demo world (writes it if missing)
    python benchmarks/tsfusion_pretraining.py --size tiny --seeds 0 1 2 --pretrain-epochs 8 --finetune-epochs 15
"""

from __future__ import annotations

import argparse
import csv
import logging
import tempfile
import time
import warnings
from itertools import product
from pathlib import Path

import numpy as np
import torch


def _trainer(epochs: int, **kw):  # noqa: ANN202
    import lightning.pytorch as pl

    return pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, gradient_clip_val=1.0, num_sanity_val_steps=0, **kw)


def _best_callback():  # noqa: ANN202
    import lightning.pytorch as pl

    class BestValR2(pl.Callback):
        """Keep (in memory) the weights of the epoch with the best validation Pearson r^2 (the paper's "R^2",
        appendix A.2)."""

        def __init__(self) -> None:
            self.score, self.state, self.metrics, self.epoch = -float("inf"), None, {}, -1

        def on_validation_end(self, trainer, pl_module) -> None:  # noqa: ANN001  (after the task's epoch end)
            if trainer.sanity_checking:
                return
            m = {k: float(v) for k, v in getattr(pl_module, "last_metrics", {}).items() if k.startswith("val/")}
            score = m.get("val/r2_pearson", float("nan"))
            if np.isfinite(score) and score > self.score:
                self.score, self.metrics, self.epoch = score, m, trainer.current_epoch
                self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    return BestValR2


def summarize(rows: list[dict], poolings: list[str]) -> None:
    """Print mean +- std over seeds of each metric, scratch vs pretrained side by side, and the win count."""
    print(f"{'pooling':8s} {'metric':12s} {'scratch':>18s} {'pretrained':>18s} {'wins':>6s}")
    for pooling in poolings:
        for metric in ("test_r2_pearson", "test_R2", "test_RMSE", "val_r2_pearson", "test_bias", "test_std_ratio"):
            if any(metric not in r for r in rows):
                continue
            vals = {arm: np.array([r[metric] for r in rows if r["pooling"] == pooling and r["arm"] == arm])
                    for arm in ("scratch", "pretrained")}
            if metric == "test_bias":  # closer to 0 is better
                better = np.abs(vals["pretrained"]) < np.abs(vals["scratch"])
            elif metric == "test_std_ratio":  # closer to 1 is better
                better = np.abs(np.log(vals["pretrained"])) < np.abs(np.log(vals["scratch"]))
            else:
                better = vals["pretrained"] < vals["scratch"] if metric.endswith("RMSE") else \
                    vals["pretrained"] > vals["scratch"]
            print(f"{pooling:8s} {metric:12s} " + " ".join(
                f"{vals[a].mean():8.3f} +- {vals[a].std():6.3f}" for a in ("scratch", "pretrained"))
                + f" {int(better.sum())}/{len(better)}")
    gens = [r["gen_r2"] for r in rows if r["arm"] == "pretrained" and r["pooling"] == poolings[0]]
    print(f"generated weather R2 (image only, held-out year): {np.mean(gens):.3f} +- {np.std(gens):.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default=None, help="folder holding CropNet/ (written with --size if missing)")
    p.add_argument("--size", default="demo", choices=["tiny", "demo"])
    p.add_argument("--crop", default="Corn")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pooling", nargs="+", default=["mmp", "mp"], choices=["mp", "mmp"])
    p.add_argument("--pretrain-epochs", type=int, default=15)
    p.add_argument("--finetune-epochs", type=int, default=20)
    p.add_argument("--before", type=int, default=14, help="weather days before the image (paper: 29)")
    p.add_argument("--after", type=int, default=5, help="weather days after the image (paper: 10)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--max-dates", type=int, default=6)
    p.add_argument("--tokenizer-steps", type=int, default=100)
    p.add_argument("--samples-per-county", type=int, default=8,
                   help="(grid, date) samples pooled per county in training")
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--finetune-lr", type=float, nargs="+", default=[1e-3],
                   help="fine-tuning learning rate(s); with several, each arm (scratch / pretrained) is fine-tuned "
                        "at each one and the rate with the best validation Pearson r^2 is kept for that arm "
                        "(selection on "
                        "2022 only, as the paper's protocol; every candidate's test metrics go to <csv>_all_lrs.csv)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="fine-tuning linear warmup (paper: 5 of 200)")
    p.add_argument("--encoder-lr-scale", type=float, default=1.0,
                   help="encoder learning rate = finetune-lr * this, both arms (1: one rate, as the paper)")
    p.add_argument("--select", default="best", choices=["best", "last"],
                   help="test the epoch with the best validation Pearson r^2 (paper, appendix A.2) or the last "
                        "epoch")
    p.add_argument("--pretrain-dir", default=None,
                   help="keep pretraining checkpoints here and reuse one made with the same settings")
    p.add_argument("--dirichlet", default="independent", choices=["independent", "joint"],
                   help="pretraining token budgets: independent image / time-series Dirichlets (paper eq. 3) or joint")
    p.add_argument("--raw-patch-size", type=int, default=8,
                   help="patch side of the input-only raw image modality (alpha 1000, paper A.1); 0: none")
    p.add_argument("--regularization", default="paper", choices=["paper", "none"],
                   help="fine-tuning encoder dropout / attention dropout / stochastic depth: paper 0.25 / 0.3 / 0.5, "
                        "or none (0 / 0 / 0, the earlier figures)")
    p.add_argument("--states", nargs="+", default=["paper"],
                   help="fine-tuning states: 'paper' (the crop's subset of appendix A.2), 'all', or state names")
    p.add_argument("--csv", default="benchmarks/results/tsfusion_pretraining.csv")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pretrain-only", action="store_true",
                   help="only write the pretraining checkpoints (--pretrain-dir)")
    p.add_argument("--aggregate", nargs="+", default=None,
                   help="only summarise the given CSV files of earlier runs (e.g. one process per seed)")
    args = p.parse_args(argv)
    if args.aggregate:
        rows = []
        for path in args.aggregate:
            with open(path, newline="") as f:
                for r in csv.DictReader(f):
                    rows.append({k: (v if k in ("pooling", "arm") else float(v)) for k, v in r.items()})
        summarize(rows, sorted({r["pooling"] for r in rows}, reverse=True))
        return 0

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("terratorch_eoplugins").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    import lightning.pytorch as pl

    from terratorch_eoplugins.datamodules.cropnet import CropNetDataModule
    from terratorch_eoplugins.datamodules.tsfusion import TSFusionPretrainDataModule
    from terratorch_eoplugins.tasks.tsfusion_cropnet import REQUIRED_KEYS, TSFusionCropNetTask
    from terratorch_eoplugins.tasks.tsfusion_pretrain import TSFusionPretrainTask

    world = Path(args.world) if args.world else Path(tempfile.mkdtemp(prefix="tsfusion_world_"))
    if not (world / "CropNet").is_dir():
        from terratorch_eoplugins.synthetic import write_world

        write_world(world, size=args.size, seed=0, products=["cropnet"])
    root = world / "CropNet"
    shared = dict(before=args.before, after=args.after, image_size=args.image_size,
                  tokenizer_steps=args.tokenizer_steps, raw_patch_size=args.raw_patch_size or None)
    reg = (dict(encoder_dropout=0.25, attn_dropout=0.3, drop_path=0.5) if args.regularization == "paper"
           else dict(encoder_dropout=0.0, attn_dropout=0.0, drop_path=0.0))
    pre_dm = TSFusionPretrainDataModule(root, split_years={"train": (2021, 2022), "val": (2020,), "test": (2020,)},
                                        before=args.before, after=args.after, image_size=args.image_size,
                                        batch_size=32, max_pairs=None)
    ft_dm = CropNetDataModule(root, crop=args.crop, grid_aggregation="none", normalize=False, standardize_label=True,
                              long_term_years=0, batch_size=4, batch_keys=list(REQUIRED_KEYS),
                              image_size=args.image_size, max_dates=args.max_dates,
                              window_weather=("tavg", "tmax", "tmin", "precip"), window_before=args.before,
                              window_after=args.after,
                              states=None if args.states == ["all"] else "paper" if args.states == ["paper"]
                              else args.states)
    BestValR2 = _best_callback()
    rows, cands = [], []
    t_all = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="tsfusion_bench_"))
    keep = Path(args.pretrain_dir) if args.pretrain_dir else tmp
    keep.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        pl.seed_everything(seed, verbose=False)
        t0 = time.time()
        pre = TSFusionPretrainTask(lr=args.pretrain_lr, input_budget=48, target_budget=48, generate_batches=2,
                                   dirichlet=args.dirichlet, **shared)
        tag = (f"{world.resolve().name}_e{args.pretrain_epochs}_lr{args.pretrain_lr:g}_b{args.before}a{args.after}"
               f"_px{args.image_size}_tok{args.tokenizer_steps}")
        if args.dirichlet != "joint" or args.raw_patch_size:
            tag += f"_{args.dirichlet}_raw{args.raw_patch_size}"
        ckpt = keep / f"pretrain_{tag}_seed{seed}.ckpt"
        if args.pretrain_dir and ckpt.is_file():  # same settings and seed: reuse
            from terratorch_eoplugins.tasks.tsfusion_pretrain import TSFusionPretrainTask as _T

            pre = _T.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
        else:
            tr = _trainer(args.pretrain_epochs, limit_val_batches=0)
            tr.fit(pre, pre_dm)
            tr.save_checkpoint(ckpt)
        gen = _trainer(1)
        res = gen.test(pre, pre_dm, verbose=False)[0]
        t_pre = time.time() - t0
        print(f"seed {seed}: pretrain {t_pre:.0f}s  test loss {res['test/loss']:.3f}  generated-weather R2 "
              f"{res.get('test/gen_r2', float('nan')):.3f} (tavg {res.get('test/gen_r2_tavg', float('nan')):.3f}, "
              f"precip {res.get('test/gen_r2_precip', float('nan')):.3f})", flush=True)
        runs = [] if args.pretrain_only else product(args.pooling, ("scratch", "pretrained"), args.finetune_lr)
        for pooling, arm, lr in runs:
            pl.seed_everything(seed, verbose=False)
            t1 = time.time()
            task = TSFusionCropNetTask(pooling=pooling, lr=lr,
                                       backbone_ckpt_path=str(ckpt) if arm == "pretrained" else None,
                                       tokenizer_ckpt=str(ckpt), train_samples_per_county=args.samples_per_county,
                                       scheduler_hparams={"warmup_epochs": args.warmup_epochs},
                                       encoder_lr_scale=args.encoder_lr_scale, **reg,
                                       **shared)
            best = BestValR2()
            tr = _trainer(args.finetune_epochs, callbacks=[best])
            tr.fit(task, ft_dm)
            if args.select == "best" and best.state is not None:
                task.load_state_dict(best.state)
                val = best.metrics
            else:
                val = {k: float(v) for k, v in tr.callback_metrics.items() if k.startswith("val/")}
            test = tr.test(task, ft_dm, verbose=False)[0]
            row = {"seed": seed, "pooling": pooling, "arm": arm, "lr": lr,
                   "gen_r2": res.get("test/gen_r2", float("nan")),
                   "gen_r2_tavg": res.get("test/gen_r2_tavg", float("nan")), "best_epoch": best.epoch,
                   "val_r2_pearson": val.get("val/r2_pearson", float("nan")), "val_R2": val.get("val/R2", float("nan")),
                   "test_RMSE": test.get("test/RMSE", float("nan")),
                   "test_r2_pearson": test.get("test/r2_pearson", float("nan")),
                   "test_r": test.get("test/r", float("nan")), "test_R2": test.get("test/R2", float("nan")),
                   "test_bias": float((task.last_yields["pred"] - task.last_yields["true"]).mean()),
                   "test_std_ratio": float(task.last_yields["pred"].std() / task.last_yields["true"].std()),
                   "seconds": time.time() - t1}
            cands.append(row)
            print(f"  {pooling:3s} {arm:10s} lr {lr:g} test RMSE {row['test_RMSE']:.2f}  r2_pearson "
                  f"{row['test_r2_pearson']:.3f}  R2 {row['test_R2']:.3f}  (val r2_pearson {row['val_r2_pearson']:.3f})"
                  f"  {row['seconds']:.0f}s", flush=True)
        for pooling in [] if args.pretrain_only else args.pooling:  # per arm: the rate with the best val r2_pearson
            for arm in ("scratch", "pretrained"):
                mine = [r for r in cands if r["seed"] == seed and r["pooling"] == pooling and r["arm"] == arm]
                best_row = max(mine, key=lambda r: r["val_r2_pearson"] if np.isfinite(r["val_r2_pearson"])
                               else -np.inf)
                rows.append(best_row)
                if len(args.finetune_lr) > 1:
                    print(f"  kept {pooling:3s} {arm:10s} lr {best_row['lr']:g} (val r2_pearson "
                          f"{best_row['val_r2_pearson']:.3f})")
    print(f"\n{args.crop}, {len(args.seeds)} seeds, {args.pretrain_epochs} pretraining / {args.finetune_epochs} "
          f"fine-tuning epochs, learning rate(s) {args.finetune_lr}, total {time.time() - t_all:.0f}s")
    if not rows:
        return 0
    summarize(rows, args.pooling)
    if args.csv:
        out = Path(args.csv)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {out}")
        if len(args.finetune_lr) > 1:  # every candidate run, for the record
            every = out.with_name(out.stem + "_all_lrs" + out.suffix)
            with every.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(cands[0]))
                w.writeheader()
                w.writerows(cands)
            print(f"wrote {every}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
