"""S4 label efficiency: pretrained-then-fine-tuned vs from scratch at 10% labels, optical and radar, >= 3 seeds.

Defaults are the paper's data and model choices (sizes are CPU choices, see the arguments): every aligned date of
the shorter series (``--num-dates`` unset; batches padded with ``date_mask``), RGB optical input
(``--optical-bands 2 1 0``), 3-D U-Net pooling space and time (``--no-pool-time`` for space only), InfoNCE over
every bottleneck position (``--num-pixels`` unset; chunked). The project's earlier configuration ("today's 6-date
configuration") is ``--num-dates 6 --optical-bands -1 --no-pool-time --num-pixels 256``.

Protocol (synthetic PASTIS-R world, PANGAEA folds 1-3 train / 4 val / 5 test):

1. S4 pretraining (:class:`~terratorch_eoplugins.tasks.s4_pretrain.S4PretrainTask`, ``L_c + lambda L_r``,
   tau = 0.5) on the *unlabelled* radar (S1A) + optical (S2) series of every non-test patch (folds 1-4 by
   default: S4's point is that pretraining uses all imagery, labelled or not), nearest-timestamp aligned,
   every aligned date, random ``--pretrain-crop-size`` crops, Adam, ``--pretrain-steps`` steps; once, shared by every
   fine-tuning run. ``--pretrain-ckpt`` reuses a checkpoint written by an earlier ``--phase pretrain`` run.
2. For each inference modality (optical S2 / radar S1A), seed and init (S4 checkpoint / scratch): terratorch
   ``SemanticSegmentationTask`` with the registered ``s4_unet3d`` backbone (encoder + decoder ``h`` of the
   modality, projection head discarded) and ``IdentityDecoder``, fine-tuned on ``--label-fraction`` of the
   train patches (subset drawn by the seed). Both inits get exactly the same recipe: same architecture,
   same labelled patches, same random crops and batch order (seeded), same number of steps, AdamW with the
   same learning rate and linear warmup.
3. Test mIoU on fold 5 (confusion matrix summed over the test set; mean IoU over classes with a non-empty
   union; void ignored) and, for optical, the cloud-robustness table (mIoU by cloud-cover ratio of the
   test series, averaged over seeds).

Runs are independent and can go to ``--jobs`` worker processes (one torch thread each).

Run (see ``benchmarks/results/s4_label_efficiency.md`` for the exact command and timings)::

    python benchmarks/s4_label_efficiency.py --root data/demo/PASTIS-R --phase pretrain --out /tmp/s4
    python benchmarks/s4_label_efficiency.py --root data/demo/PASTIS-R --pretrain-ckpt /tmp/s4/s4_pretrain.ckpt

Results go to ``<out>/s4_label_efficiency.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

import terratorch_eoplugins  # noqa: F401  (registers s4_unet3d)
from terratorch_eoplugins.analysis.s4_clouds import cloud_robustness
from terratorch_eoplugins.datasets.s4 import S4PASTIS, collate_s4
from terratorch_eoplugins.tasks.s4_pretrain import S4PretrainTask

MODALITIES = {"optical": "S2", "radar": "S1A"}
NUM_CLASSES = 19


def _md(df: pd.DataFrame, fmt: str = "{:.1f}") -> str:
    """Markdown table of ``df`` (index included) without the optional ``tabulate`` dependency."""
    d = df.reset_index()
    cells = [[fmt.format(v) if isinstance(v, (float, np.floating)) else str(v) for v in row] for row in d.to_numpy()]
    head = [str(c) for c in d.columns]
    rows = ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows])


def _quiet(threads: int) -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("terratorch").setLevel(logging.ERROR)
    torch.set_num_threads(threads)


def random_crop(sample: dict[str, Any], size: int | None, generator: torch.Generator) -> dict[str, Any]:
    """Same random ``size`` x ``size`` window of ``image`` (C x T x H x W) and ``mask`` (fine-tuning augmentation)."""
    h, w = sample["mask"].shape
    if size is None or size >= min(h, w):
        return sample
    y, x = (int(torch.randint(0, n - size + 1, (), generator=generator)) for n in (h, w))
    out = dict(sample)
    out["image"] = sample["image"][..., y:y + size, x:x + size].contiguous()
    out["mask"] = sample["mask"][y:y + size, x:x + size].contiguous()
    return out


def _bands(args: argparse.Namespace) -> list[int] | None:
    return None if args.optical_bands == [-1] else list(args.optical_bands)


def _channels(args: argparse.Namespace, modality: str) -> int:
    bands = _bands(args)
    return 3 if modality == "radar" else (10 if bands is None else len(bands))


# ----------------------------------------------------------------------------------------- pretraining
def pretrain(args: argparse.Namespace, out: Path) -> tuple[Path, list[dict[str, float]]]:
    """S4 pretraining on the unlabelled pairs of ``--pretrain-folds``: the checkpoint and losses per 50 steps."""
    torch.manual_seed(0)
    ds = S4PASTIS(args.root, folds=args.pretrain_folds, num_dates=args.num_dates, crop_size=args.pretrain_crop_size,
                  optical_bands=_bands(args))
    dl = DataLoader(ds, batch_size=args.pretrain_batch_size, shuffle=True, drop_last=True,
                    collate_fn=lambda s: {k: v for k, v in collate_s4(s).items() if k in ("image", "date_mask")})
    task = S4PretrainTask(optical_channels=_channels(args, "optical"), widths=args.widths,
                          pool_time=args.pool_time, num_pixels=args.num_pixels, lr=args.pretrain_lr,
                          temperature=args.temperature, reconstruction_weight=args.lambda_r)
    task.configure_models()
    opt = torch.optim.Adam(task.parameters(), lr=args.pretrain_lr)
    step, t0, hist, losses = 0, time.time(), [], []
    task.train()
    while step < args.pretrain_steps:
        for batch in dl:
            res = task.compute_losses(batch)
            opt.zero_grad()
            res["loss"].backward()
            opt.step()
            step += 1
            hist.append([res["loss"].item(), res["loss_c"].item(), res["loss_r"].item()])
            if step % 50 == 0 or step == args.pretrain_steps:
                h = np.mean(hist[-50:], 0)
                losses.append({"step": step, "loss": float(h[0]), "loss_c": float(h[1]), "loss_r": float(h[2])})
                print(f"pretrain step {step} L {h[0]:.3f} L_c {h[1]:.3f} L_r {h[2]:.3f} ({time.time() - t0:.0f}s)",
                      flush=True)
            if step >= args.pretrain_steps:
                break
    ckpt = out / "s4_pretrain.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "s4_pretrain_losses": losses, "s4_pretrain_seconds": time.time() - t0}, ckpt)
    return ckpt, losses


# ----------------------------------------------------------------------------------------- fine-tuning
def build_finetune_task(modality: str, widths: list[int], ckpt: str | None, lr: float, in_channels: int = 3,
                        pool_time: bool = True) -> Any:
    """terratorch ``SemanticSegmentationTask`` on ``s4_unet3d`` (``ckpt=None``: from scratch)."""
    from terratorch.tasks import SemanticSegmentationTask

    return SemanticSegmentationTask(
        model_factory="EncoderDecoderFactory",
        model_args={"backbone": "s4_unet3d", "backbone_modality": modality, "backbone_in_channels": in_channels,
                    "backbone_pool_time": pool_time, "backbone_widths": list(widths), "backbone_ckpt_path": ckpt,
                    "decoder": "IdentityDecoder", "num_classes": NUM_CLASSES},
        loss="ce", ignore_index=-1, lr=lr, optimizer="AdamW", optimizer_hparams={"weight_decay": 0.01},
        freeze_backbone=False,
    )


def finetune(args: argparse.Namespace, modality: str, seed: int, ckpt: str | None) -> torch.nn.Module:
    """Fine-tune on ``--label-fraction`` of the train patches for ``--finetune-steps`` steps; returns the model.

    Crops and batch order come from a generator seeded by ``seed`` only, so both inits see the same batches.
    """
    torch.manual_seed(seed)  # head init (and the scratch backbone init) depend on the seed only
    task = build_finetune_task(modality, args.widths, ckpt, args.finetune_lr, _channels(args, modality),
                               args.pool_time)
    model = task.model.train()
    train = S4PASTIS(args.root, split="train", radar=MODALITIES["radar"], num_dates=args.num_dates,
                     optical_bands=_bands(args), inference_modality=modality, label_fraction=args.label_fraction,
                     seed=seed)
    samples = [train[i] for i in range(len(train))]
    opt = torch.optim.AdamW(model.parameters(), lr=args.finetune_lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    ce = torch.nn.CrossEntropyLoss(ignore_index=-1)
    step = 0
    while step < args.finetune_steps:
        perm = torch.randperm(len(samples), generator=gen).tolist()
        for i in range(0, len(perm), args.finetune_batch_size):
            chunk = perm[i:i + args.finetune_batch_size]
            batch = collate_s4([random_crop(samples[j], args.finetune_crop_size, gen) for j in chunk])
            x, y = batch["image"], batch["mask"].long()
            dm = None if bool(batch["date_mask"].all()) else batch["date_mask"]
            warm = min(1.0, (step + 1) / args.finetune_warmup) if args.finetune_warmup > 0 else 1.0
            for group in opt.param_groups:
                group["lr"] = args.finetune_lr * warm
            loss = ce((model(x) if dm is None else model(x, date_mask=dm)).output, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= args.finetune_steps:
                break
    return model.eval()


def run_one(args: argparse.Namespace, modality: str, seed: int, init: str, ckpt: str) -> dict[str, Any]:
    """One fine-tuning run + its test evaluation (worker entry point)."""
    _quiet(1)
    t1 = time.time()
    model = finetune(args, modality, seed, ckpt if init == "pretrained" else None)
    test = S4PASTIS(args.root, split="test", radar=MODALITIES["radar"], num_dates=args.num_dates,
                    optical_bands=_bands(args), cloud_source=args.cloud_source)
    table = cloud_robustness({init: (model, modality)}, test)  # its "all" row is the test mIoU over the whole test set
    miou = float(table.loc[table["bin"] == "all", f"mIoU_{init}"].iloc[0])
    print(f"{modality:7s} seed {seed} {init:10s} test mIoU {miou:5.1f}  ({time.time() - t1:.0f}s)", flush=True)
    return {"modality": modality, "seed": seed, "init": init, "test_mIoU": miou, "seconds": time.time() - t1,
            "clouds": table.to_dict(orient="records")}


def _command(args: argparse.Namespace) -> str:
    def flag(k: str, v: Any) -> str:
        name = k.replace("_", "-")
        if isinstance(v, bool):
            return f"--{name}" if v else f"--no-{name}"
        return f"--{name} {' '.join(map(str, v)) if isinstance(v, list) else v}"

    return "python benchmarks/s4_label_efficiency.py " + " ".join(
        flag(k, v) for k, v in vars(args).items() if v is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/demo/PASTIS-R")
    ap.add_argument("--phase", default="all", choices=["all", "pretrain", "finetune"])
    ap.add_argument("--pretrain-ckpt", default=None, help="reuse this S4 checkpoint (skips pretraining)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--modalities", nargs="+", default=["optical", "radar"], choices=list(MODALITIES))
    ap.add_argument("--widths", type=int, nargs=4, default=[8, 16, 32, 64])
    ap.add_argument("--num-dates", type=int, default=None,
                    help="aligned dates per series by linspace (default: every aligned date, the paper)")
    ap.add_argument("--optical-bands", type=int, nargs="+", default=[2, 1, 0],
                    help="S2 channels of the optical input (default RGB, the paper); -1: all 10 bands")
    ap.add_argument("--pool-time", action=argparse.BooleanOptionalAction, default=True,
                    help="3-D U-Net pools time as well as space (default, the paper)")
    ap.add_argument("--cloud-source", default="auto", help="cloud cover of the test series (S4PASTIS cloud_source)")
    ap.add_argument("--label-fraction", type=float, default=0.1)
    ap.add_argument("--pretrain-folds", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--pretrain-crop-size", type=int, default=64)
    ap.add_argument("--pretrain-batch-size", type=int, default=2)
    ap.add_argument("--pretrain-steps", type=int, default=800)
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--num-pixels", type=int, default=None,
                    help="InfoNCE positions sampled per sample (default: every position, the paper)")
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--lambda-r", type=float, default=1.0)
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--finetune-batch-size", type=int, default=2)
    ap.add_argument("--finetune-crop-size", type=int, default=40)
    ap.add_argument("--finetune-lr", type=float, default=3e-3)
    ap.add_argument("--finetune-warmup", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=1, help="fine-tuning runs in parallel (one torch thread each)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    _quiet(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.phase == "finetune" and args.pretrain_ckpt is None:
        ap.error("--phase finetune needs --pretrain-ckpt")

    t0 = time.time()
    if args.pretrain_ckpt is None:
        ckpt, losses = pretrain(args, out)
        t_pre = time.time() - t0
    else:
        ckpt = Path(args.pretrain_ckpt)
        meta = torch.load(ckpt, map_location="cpu", weights_only=True)
        losses, t_pre = meta.get("s4_pretrain_losses", []), float(meta.get("s4_pretrain_seconds", float("nan")))
    if args.phase == "pretrain":
        print(f"checkpoint: {ckpt}")
        return

    jobs = [(m, s, init) for m in args.modalities for s in args.seeds for init in ("pretrained", "scratch")]
    t_ft = time.time()
    partial = out / "s4_label_efficiency.partial.jsonl"  # one line per finished run, in case the sweep is cut short
    partial.write_text("")
    runs = []
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as ex:
        futures = [ex.submit(run_one, args, m, s, i, str(ckpt)) for m, s, i in jobs]
        for fut in as_completed(futures):
            runs.append(fut.result())
            with partial.open("a") as f:
                f.write(json.dumps({k: v for k, v in runs[-1].items() if k != "clouds"}) + "\n")
    runs.sort(key=lambda r: (r["modality"], r["seed"], r["init"]))
    t_ft = time.time() - t_ft

    df = pd.DataFrame([{k: v for k, v in r.items() if k != "clouds"} for r in runs])
    summary = df.groupby(["modality", "init"])["test_mIoU"].agg(["mean", "std", "count"])
    summary.columns = ["mIoU_mean", "mIoU_std", "n_seeds"]
    per_seed = df.pivot_table(index=["modality", "seed"], columns="init", values="test_mIoU")
    per_seed["gain"] = per_seed["pretrained"] - per_seed["scratch"]
    gains = per_seed.groupby("modality")["gain"].agg(["mean", "std", "min", "max"])
    gains.columns = ["gain_mean", "gain_std", "gain_min", "gain_max"]
    result: dict[str, Any] = {
        "command": _command(args), "seconds_finetune": t_ft, "seconds_pretrain": t_pre,
        "pretrain_losses": losses, "runs": runs,
        "summary": summary.reset_index().to_dict(orient="records"),
        "per_seed": per_seed.reset_index().to_dict(orient="records"),
        "gains": gains.reset_index().to_dict(orient="records"),
    }
    pre_line = (f"Pretraining ({len(losses) and losses[-1]['step']} steps, {t_pre:.0f} s): loss "
                f"{losses[0]['loss']:.3f} -> {losses[-1]['loss']:.3f} (L_c {losses[0]['loss_c']:.3f} -> "
                f"{losses[-1]['loss_c']:.3f}, L_r {losses[0]['loss_r']:.3f} -> {losses[-1]['loss_r']:.3f}), "
                "means over 50-step windows." if losses else "Pretraining losses not recorded in the checkpoint.")
    md = ["# S4 label efficiency (synthetic PASTIS-R, 10% labels)", "", f"Command: `{result['command']}`", "",
          f"Fine-tuning: {len(runs)} runs in {t_ft:.0f} s wall ({args.jobs} worker process(es), 1 torch thread each).",
          "", pre_line, "",
          "## Test mIoU (%), mean +- std over seeds", "", _md(summary), "",
          "## Gain of pretraining (mIoU points, pretrained - scratch, same seed)", "", _md(gains), "",
          "## Per seed", "", _md(per_seed), ""]
    clouds = []
    for r in runs:
        if r["modality"] == "optical":
            t = pd.DataFrame(r["clouds"]).rename(columns={f"mIoU_{r['init']}": "mIoU"})
            t["init"], t["seed"] = r["init"], r["seed"]
            clouds.append(t)
    if clouds:
        ct = pd.concat(clouds)
        cavg = ct.pivot_table(index="bin", columns="init", values="mIoU", aggfunc="mean", sort=False)
        cavg.insert(0, "n_series", ct.groupby("bin", sort=False)["n_series"].first())
        cavg.insert(1, "cloud_ratio_mean", ct.groupby("bin", sort=False)["cloud_ratio_mean"].first())
        cavg["gain_pretrained_vs_scratch"] = cavg["pretrained"] - cavg["scratch"]
        result["cloud_robustness_optical"] = cavg.reset_index().to_dict(orient="records")
        md += ["## Cloud robustness, optical inference (mIoU %, mean over seeds)", "", _md(cavg, "{:.2f}"), ""]
    (out / "s4_label_efficiency.json").write_text(json.dumps(result, indent=2, default=float))
    (out / "s4_label_efficiency.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
