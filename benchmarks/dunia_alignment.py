"""DUNIA short pretraining on the synthetic world: losses and the paper's table-H1 alignment measurement.

Trains the tiny DUNIA variant (:class:`~terratorch_eoplugins.tasks.dunia_pretrain.DUNIAPretrainTask`, AdamW) on
the training chips of the synthetic GEDI world for ``--steps`` optimiser steps, and reports on the validation
chips, before and after training:

* the loss terms (Zero-CL, hierarchical VICReg, reconstructions);
* table H1: mean cosine similarity of positive pairs (a footprint pixel's ``O^V`` and its waveform's ``O^W``;
  a pixel's projected ``O^H_1`` and its projected ``O^T_1``) and of negative pairs (the other rows of the
  mini-batch), for pixel-waveform (P<->W) and pixel-pixel (P<->P) alignment.

Use the demo world for the pixel-waveform figure: the tiny world's validation split holds no forest shot
(all 91 RH98 < 5 m: ground-only waveforms that the image cannot tell apart), so positive and negative
pixel-waveform pairs are indistinguishable there whatever the model; the demo world's has 25 % forest shots.

With ``--downstream`` the pretrained weights are saved (``--ckpt-out``) and, in the same run, evaluated on the
GEDI RH98 task of the same world through the repository's configs (``terratorch_eoplugins`` LightningCLI,
in-process), side by side:

* zero-shot KNN (``configs/dunia_gedi_zeroshot.yaml``: database = train footprints, cosine top-k, test split)
  with the pretrained checkpoint and with a randomly initialised DUNIA-tiny, against the mean predictor;
* low-shot fine-tuning (``configs/dunia_gedi.yaml``, frozen but the last NA layers + 1x1 heads) from the
  pretrained checkpoint, ``--finetune-epochs`` epochs (0 skips it; the cosine schedule's ``T_max`` is set to the
  same number of epochs) at ``--finetune-lr``, with the head's output bias initialised to the training target mean
  (:class:`~terratorch_eoplugins.tasks.preparation.TargetMeanBiasInit`); its RMSE and Pearson r are computed
  here from the predictions on the test footprint pixels, printed next to the zero-shot rows.

``--finetune-labels dense`` fine-tunes on the world's dense 10 m RH98 map over the training chips
(``configs/dunia_gedi_dense.yaml``: the paper's densely annotated 64 x 64 images for W_rh) instead of the
training footprints; validation and test stay on the GEDI footprints in both cases, so the rows compare. When
the world has that map (``GEDI/canopy_height_rh98_10m.tif``), the fine-tuned model and the pretrained zero-shot
KNN (database: train footprints, as above) are also scored on the dense map of every val/test chip (all non-water
pixels: ~100 times more test pixels than footprints), whichever labels the fine-tuning used.

``--ckpt`` skips pretraining and evaluates an existing pretraining checkpoint (``--ckpt-out`` of an earlier run).
``--seed`` also seeds the fine-tuning run (head initialisation, batch order); ``--finetune-embedding`` overrides the
config's ``decoder_embedding`` (``both``: O^V and O^H; ``vertical``: O^V only).

    python benchmarks/dunia_alignment.py                         # writes the tiny world to a temp dir
    python benchmarks/dunia_alignment.py --world /path/to/world --steps 300 --chip-size 32
    python benchmarks/dunia_alignment.py --world /path/to/world --steps 30 --downstream --finetune-epochs 3
    python benchmarks/dunia_alignment.py --world /path/to/world --ckpt /path/to/dunia_pretrain_tiny.ckpt --downstream
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader


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


def _cli(args: list[str]):  # noqa: ANN202
    """Run ``terratorch <subcommand> -c <config> ...`` in-process (quietly) and return the LightningCLI."""
    from terratorch.cli_tools import build_lightning_cli

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return build_lightning_cli(args=args, run=True)


def _test_metrics(cli) -> dict[str, float]:  # noqa: ANN001
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        out = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return {k: float(v) for k, v in out[0].items()}


def _finetuned_predictions(cli, split: str = "test", dense_map: Path | None = None) -> tuple[float, float, int]:  # noqa: ANN001
    """RMSE and Pearson r of the fine-tuned model on the labelled pixels (target != ignore_index) of a split:
    its footprints, or with ``dense_map`` every valid pixel of that dense RH98 map over the split's chips."""
    model, dm = cli.model, cli.datamodule
    loader = DataLoader(dm.split_dataset(split, dense_map), batch_size=dm.batch_size, collate_fn=dm.collate_fn)
    ignore = float(model.hparams.get("ignore_index", -1))
    preds, targets = [], []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            y = batch["mask"].float()
            rest = {k: v for k, v in batch.items() if k not in ("image", "mask", "filename")}
            out = model(batch["image"], **rest).output.reshape(y.shape)
            keep = y != ignore
            preds.append(out[keep])
            targets.append(y[keep])
    p, t = torch.cat(preds).double(), torch.cat(targets).double()
    rmse = float((p - t).pow(2).mean().sqrt())
    r = float(np.corrcoef(p.numpy(), t.numpy())[0, 1]) if len(p) > 1 else float("nan")
    return rmse, r, len(p)


#: the top-level configs are paper scale (DUNIA-base); this script pretrains DUNIA-tiny, so every evaluation adds the
#: CPU profile of its config (DUNIA-tiny and the CPU recipe) as a second ``-c``
ZEROSHOT_CPU = "configs/profiles/cpu/dunia_gedi_zeroshot.yaml"


def downstream(world: Path, ckpt: Path | None, runs: Path, finetune_epochs: int, finetune_lr: float,
               seed: int = 0, embedding: str | None = None, labels: str = "footprints") -> None:
    """Zero-shot KNN RH98 (pretrained vs random init) and low-shot fine-tuning, printed side by side."""
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    root = str(world / "GEDI")
    quiet = ["--trainer.default_root_dir", str(runs), "--trainer.logger", "false", "--trainer.enable_checkpointing",
             "false", "--trainer.enable_progress_bar", "false"]
    rows: list[tuple[str, dict[str, float]]] = []
    for name, path in (("zero-shot KNN, random-init DUNIA-tiny", None), ("zero-shot KNN, pretrained", ckpt)):
        args = ["fit", "-c", "configs/dunia_gedi_zeroshot.yaml", "-c", ZEROSHOT_CPU, "--data.init_args.root", root,
                *quiet, "--trainer.callbacks", "[]"]
        if path is not None:
            args += ["--model.init_args.backbone_ckpt_path", str(path)]
        t0 = time.perf_counter()
        cli = _cli(args)
        val = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
        m = {**_test_metrics(cli), **val}
        print(f"  [{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
        rows.append((name, m))
    from terratorch_eoplugins.datasets.gedi_chips import CANOPY_HEIGHT_NAME

    dense_map = world / "GEDI" / CANOPY_HEIGHT_NAME
    if dense_map.is_file() and ckpt is not None:  # the same footprint database, scored on the dense val/test maps
        cli = _cli(["fit", "-c", "configs/dunia_gedi_zeroshot.yaml", "-c", ZEROSHOT_CPU, "--data.init_args.root", root,
                    "--data.init_args.dense_target", str(dense_map), "--data.init_args.dense_splits", "[val, test]",
                    "--model.init_args.backbone_ckpt_path", str(ckpt), *quiet, "--trainer.callbacks", "[]"])
        val = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
        rows.append(("zero-shot KNN, pretrained, dense maps", {**_test_metrics(cli), **val}))
    if finetune_epochs > 0 and ckpt is not None:
        config, profile = (("configs/dunia_gedi.yaml", "configs/profiles/cpu/dunia_gedi.yaml") if labels == "footprints"
                           else ("configs/dunia_gedi_dense.yaml", "configs/profiles/cpu/dunia_gedi_dense.yaml"))
        args = ["fit", "-c", config, "-c", profile,
                "--data.init_args.root", root,
                "--model.init_args.model_args.backbone_ckpt_path", str(ckpt),
                "--trainer.max_epochs", str(finetune_epochs), "--model.init_args.lr", str(finetune_lr),
                "--model.init_args.scheduler_hparams", f"{{T_max: {finetune_epochs}}}", *quiet, "--trainer.callbacks",
                '[{"class_path": "terratorch_eoplugins.tasks.preparation.TargetMeanBiasInit"}]',
                "--seed_everything", str(seed)]
        if embedding is not None:
            args += ["--model.init_args.model_args.decoder_embedding", embedding]
        if labels == "dense":
            args += ["--data.init_args.dense_target", str(dense_map)]
        t0 = time.perf_counter()
        cli = _cli(args)
        m = _test_metrics(cli)
        m["rmse"], m["r"], m["n"] = _finetuned_predictions(cli, "test")
        m["val_rmse"], m["val_r"], _ = _finetuned_predictions(cli, "val")
        if dense_map.is_file():
            m["dense_rmse"], m["dense_r"], m["dense_n"] = _finetuned_predictions(cli, "test", dense_map)
            m["dense_val_rmse"], m["dense_val_r"], _ = _finetuned_predictions(cli, "val", dense_map)
        print(f"  [low-shot fine-tuning: {time.perf_counter() - t0:.0f} s]", flush=True)
        rows.append((f"low-shot fine-tuning ({labels}), {finetune_epochs} ep, lr {finetune_lr:g}, seed {seed}", m))
    print("\nGEDI RH98 on the test split (m)                  RMSE      r")
    mean_rmse = next((m["test/rh98_rmse_mean_predictor"] for _, m in rows if "test/rh98_rmse_mean_predictor" in m),
                     float("nan"))
    print(f"  {'mean predictor (train mean)':<44s} {mean_rmse:7.3f}      -")
    for name, m in rows:
        if name.endswith("dense maps"):
            continue
        if "test/rh98_rmse_k1" in m:
            for k in (1, 5, 50):
                print(f"  {name + f', K={k}':<44s} {m[f'test/rh98_rmse_k{k}']:7.3f} {m[f'test/rh98_r_k{k}']:6.3f}")
        else:
            extra = f"(footprint pixels {int(m['n'])}; task test/RMSE {m.get('test/RMSE', float('nan')):.3f})"
            print(f"  {name:<44s} {m['rmse']:7.3f} {m['r']:6.3f}   {extra}")
    zs = next((m for n, m in rows if n == "zero-shot KNN, pretrained"), None)
    ft = next((m for n, m in rows if n.startswith("low-shot")), None)
    if zs is not None and ft is not None:
        nan = float("nan")
        print("\nfine-tuned vs zero-shot (pretrained)            test RMSE      r    val RMSE      r")
        print(f"  {'mean predictor (train mean)':<44s} {zs.get('test/rh98_rmse_mean_predictor', nan):9.3f}      -"
              f" {zs.get('val/rh98_rmse_mean_predictor', nan):11.3f}      -")
        for k in (1, 5, 50):
            print(f"  {f'zero-shot KNN K={k}':<44s} {zs[f'test/rh98_rmse_k{k}']:9.3f} {zs[f'test/rh98_r_k{k}']:6.3f}"
                  f" {zs.get(f'val/rh98_rmse_k{k}', nan):11.3f} {zs.get(f'val/rh98_r_k{k}', nan):6.3f}")
        print(
            f"  {'low-shot fine-tuned':<44s} {ft['rmse']:9.3f} {ft['r']:6.3f} {ft['val_rmse']:11.3f} {ft['val_r']:6.3f}"
        )
        print(f"  fine-tuned / zero-shot K=5 RMSE ratio {ft['rmse'] / zs['test/rh98_rmse_k5']:.3f}; "
              f"r difference {ft['r'] - zs['test/rh98_r_k5']:+.3f}")
    zd = next((m for n, m in rows if n == "zero-shot KNN, pretrained, dense maps"), None)
    if zd is not None and ft is not None and "dense_rmse" in ft:
        nan = float("nan")
        print(f"\non the dense RH98 map of the val/test chips ({int(ft['dense_n'])} test pixels)"
              "  test RMSE      r    val RMSE      r")
        print(f"  {'mean predictor (train footprint mean)':<44s} {zd.get('test/rh98_rmse_mean_predictor', nan):9.3f}"
              f"      - {zd.get('val/rh98_rmse_mean_predictor', nan):11.3f}      -")
        for k in (1, 5, 50):
            print(f"  {f'zero-shot KNN K={k}':<44s} {zd[f'test/rh98_rmse_k{k}']:9.3f} {zd[f'test/rh98_r_k{k}']:6.3f}"
                  f" {zd.get(f'val/rh98_rmse_k{k}', nan):11.3f} {zd.get(f'val/rh98_r_k{k}', nan):6.3f}")
        print(f"  {f'low-shot fine-tuned ({labels} labels)':<44s} {ft['dense_rmse']:9.3f} {ft['dense_r']:6.3f}"
              f" {ft['dense_val_rmse']:11.3f} {ft['dense_val_r']:6.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=Path, default=None, help="synthetic world folder (default: write the tiny world)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--chip-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zero-cl-weight", type=float, default=1.0)
    ap.add_argument("--vicreg-weight", type=float, default=1.0)
    ap.add_argument("--downstream", action="store_true", help="also run zero-shot KNN / fine-tuning on GEDI RH98")
    ap.add_argument("--finetune-epochs", type=int, default=20, help="low-shot fine-tuning epochs (0: skip)")
    ap.add_argument("--finetune-lr", type=float, default=3e-3, help="low-shot fine-tuning AdamW learning rate")
    ap.add_argument("--finetune-embedding", default=None, choices=["vertical", "horizontal", "both"],
                    help="embedding read by the low-shot head (default: the config's, both)")
    ap.add_argument("--finetune-labels", default="footprints", choices=["footprints", "dense"],
                    help="fine-tune on the training footprints or on the dense RH98 map of the training chips")
    ap.add_argument("--ckpt", type=Path, default=None, help="existing DUNIA pretraining checkpoint: skip pretraining "
                    "(needs --world) and run --downstream with it")
    ap.add_argument("--ckpt-out", type=Path, default=None, help="where to save the pretrained weights "
                    "(default: <temp dir>/dunia_pretrain_tiny.ckpt with --downstream)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from terratorch_eoplugins.datamodules.dunia import DUNIAPretrainDataModule
    from terratorch_eoplugins.tasks.dunia_pretrain import DUNIAPretrainTask

    if args.ckpt is not None:
        if args.world is None or not args.ckpt.is_file():
            ap.error("--ckpt needs an existing checkpoint file and --world (the world it was pretrained on)")
        downstream(args.world, args.ckpt, Path(tempfile.mkdtemp(prefix="dunia_runs_")), args.finetune_epochs,
                   args.finetune_lr, args.seed, args.finetune_embedding, args.finetune_labels)
        return
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
    task = DUNIAPretrainTask(variant="tiny", optimizer="AdamW", lr=args.lr, optimizer_hparams={"weight_decay": 0.05},
                             scheduler_hparams={"warmup": 20, "total": args.steps}, sema_switch_every=100,
                             vicreg_pixels=2048,
                             zero_cl_weight=args.zero_cl_weight, vicreg_weight=args.vicreg_weight)
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
            print(
                f"step {step:4d} loss {float(parts['loss'].detach()):.3f} "
                f"zero_cl {float(parts['zero_cl'].detach()):.3f} "
                f"vicreg {float(parts['vicreg'].detach()):.3f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
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
    ckpt = args.ckpt_out
    if ckpt is None and args.downstream:
        ckpt = Path(tempfile.mkdtemp(prefix="dunia_ckpt_")) / "dunia_pretrain_tiny.ckpt"
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, ckpt)
        print(f"\npretrained weights: {ckpt}")
    if args.downstream:
        downstream(world, ckpt, Path(tempfile.mkdtemp(prefix="dunia_runs_")), args.finetune_epochs, args.finetune_lr,
                   args.seed, args.finetune_embedding, args.finetune_labels)


if __name__ == "__main__":
    main()
