"""S4 label efficiency: pretrained-then-fine-tuned vs from scratch at 10% labels, optical and radar, >= 3 seeds.

Protocol (synthetic PASTIS-R world, PANGAEA folds):

1. S4 pretraining (:class:`~terratorch_eoplugins.tasks.s4_pretrain.S4PretrainTask`, L_c + lambda L_r) on the
   *unlabelled* radar (S1A) + optical (S2) series of the train folds 1-3, nearest-timestamp aligned,
   6 dates, random 32 x 32 crops; once, shared by every fine-tuning run.
2. For each inference modality (optical S2 / radar S1A) and seed: terratorch ``SemanticSegmentationTask``
   with the registered ``s4_unet3d`` backbone, fine-tuned on 10% of the train patches (subset drawn by
   the seed, random 64 x 64 crops) either from the S4 checkpoint or from scratch (same seed, same steps,
   same learning rate).
3. Test mIoU on fold 5 (confusion matrix summed over the test set; mean IoU over classes with a non-empty
   union; void ignored) and, for optical, the cloud-robustness table (mIoU by cloud-cover ratio of the
   test series, averaged over seeds).

Run (about 15 minutes on one CPU thread; 12 fine-tuning runs of 100 steps + 40 pretraining epochs)::

    python benchmarks/s4_label_efficiency.py --root data/demo/PASTIS-R

Results go to ``benchmarks/results/s4_label_efficiency.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

import terratorch_eoplugins  # noqa: F401  (registers s4_unet3d)
from terratorch_eoplugins.analysis.s4_clouds import cloud_robustness, confusion_matrix, mean_iou
from terratorch_eoplugins.datamodules.s4 import S4PASTISDataModule
from terratorch_eoplugins.datasets._common import collate_samples, filter_batch_keys
from terratorch_eoplugins.datasets.pastis import PASTIS
from terratorch_eoplugins.tasks.s4_pretrain import S4PretrainTask

MODALITIES = {"optical": ("S2", 10), "radar": ("S1A", 3)}


def _md(df: pd.DataFrame, fmt: str = "{:.1f}") -> str:
    """Markdown table of ``df`` (index included) without the optional ``tabulate`` dependency."""
    d = df.reset_index()
    cells = [[fmt.format(v) if isinstance(v, (float, np.floating)) else str(v) for v in row] for row in d.to_numpy()]
    head = [str(c) for c in d.columns]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in cells])


class _RandomCrop:
    """Same random ``size`` x ``size`` window of ``image`` (C x T x H x W) and ``mask`` (fine-tuning augmentation)."""

    def __init__(self, size: int | None) -> None:
        self.size = size

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        h, w = sample["mask"].shape
        if self.size is None or self.size >= min(h, w):
            return sample
        y, x = (int(torch.randint(0, n - self.size + 1, ())) for n in (h, w))
        sample["image"] = sample["image"][..., y:y + self.size, x:x + self.size].contiguous()
        sample["mask"] = sample["mask"][y:y + self.size, x:x + self.size].contiguous()
        return sample


def _trainer(epochs: int, **kw: Any) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, **kw)


class _LossHistory(pl.Callback):
    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = trainer.callback_metrics
        self.epochs.append({k: float(m[f"train/{k}_epoch" if k == "loss" else f"train/{k}"])
                            for k in ("loss", "loss_c", "loss_r")})


def pretrain(args: argparse.Namespace, out: Path) -> tuple[Path, list[dict[str, float]]]:
    """S4 pretraining on the train folds; returns the checkpoint and the per-epoch losses."""
    pl.seed_everything(0, workers=True)
    dm = S4PASTISDataModule(args.root, num_dates=args.num_dates, crop_size=args.crop_size,
                            batch_size=args.pretrain_batch_size)
    task = S4PretrainTask(widths=args.widths, num_pixels=args.num_pixels, lr=args.pretrain_lr,
                          reconstruction_weight=args.lambda_r)
    hist = _LossHistory()
    trainer = _trainer(args.pretrain_epochs, callbacks=[hist])
    trainer.fit(task, datamodule=dm)
    ckpt = out / "s4_pretrain.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, hist.epochs


def finetune(args: argparse.Namespace, modality: str, seed: int, ckpt: Path | None) -> torch.nn.Module:
    """Fine-tune ``s4_unet3d`` on 10% labels (``ckpt=None``: from scratch); returns the trained task."""
    from terratorch.tasks import SemanticSegmentationTask

    key, cin = MODALITIES[modality]
    pl.seed_everything(seed, workers=True)
    train = PASTIS(args.root, split="train", modalities=[key], num_dates=args.num_dates,
                   label_fraction=args.label_fraction, seed=seed, transforms=_RandomCrop(args.finetune_crop_size))
    loader = DataLoader(train, batch_size=args.finetune_batch_size, shuffle=True,
                        collate_fn=lambda s: filter_batch_keys(collate_samples(s), ()))
    task = SemanticSegmentationTask(
        model_factory="EncoderDecoderFactory",
        model_args={"backbone": "s4_unet3d", "backbone_modality": modality, "backbone_in_channels": cin,
                    "backbone_widths": list(args.widths), "backbone_ckpt_path": None if ckpt is None else str(ckpt),
                    "decoder": "IdentityDecoder", "num_classes": 19},
        loss="ce", ignore_index=-1, lr=args.finetune_lr, optimizer="AdamW",
        optimizer_hparams={"weight_decay": 0.01}, freeze_backbone=False,
    )
    _trainer(args.finetune_epochs).fit(task, train_dataloaders=loader)
    return task.eval()


@torch.no_grad()
def test_miou(model: torch.nn.Module, dataset: PASTIS, key: str) -> float:
    """Test mIoU (%) with the confusion matrix summed over the whole test set."""
    cm = np.zeros((19, 19), np.int64)
    for i in range(len(dataset)):
        s = dataset[i]
        x = s["image"][key] if isinstance(s["image"], dict) else s["image"]
        pred = model(x[None]).output.argmax(1)[0]
        cm += confusion_matrix(pred, s["mask"], 19, -1)
    return 100 * mean_iou(cm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/demo/PASTIS-R")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--modalities", nargs="+", default=["optical", "radar"], choices=list(MODALITIES))
    ap.add_argument("--widths", type=int, nargs=4, default=[8, 16, 32, 64])
    ap.add_argument("--num-dates", type=int, default=6)
    ap.add_argument("--label-fraction", type=float, default=0.1)
    ap.add_argument("--crop-size", type=int, default=32)
    ap.add_argument("--num-pixels", type=int, default=256)
    ap.add_argument("--lambda-r", type=float, default=1.0)
    ap.add_argument("--pretrain-epochs", type=int, default=40)
    ap.add_argument("--pretrain-batch-size", type=int, default=4)
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--finetune-epochs", type=int, default=100)
    ap.add_argument("--finetune-batch-size", type=int, default=2)
    ap.add_argument("--finetune-crop-size", type=int, default=64)
    ap.add_argument("--finetune-lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is much faster than 2 on contended shared cores")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "tmp").mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    ckpt, losses = pretrain(args, out / "tmp")
    t_pre = time.time() - t0
    print(f"pretraining {t_pre:.0f}s; loss {losses[0]['loss']:.3f} -> {losses[-1]['loss']:.3f} "
          f"(L_c {losses[0]['loss_c']:.3f} -> {losses[-1]['loss_c']:.3f}, "
          f"L_r {losses[0]['loss_r']:.3f} -> {losses[-1]['loss_r']:.3f})", flush=True)

    runs: list[dict[str, Any]] = []
    clouds: list[pd.DataFrame] = []
    for modality in args.modalities:
        key = MODALITIES[modality][0]
        test = PASTIS(args.root, split="test", modalities=("S2",) if key == "S2" else ("S2", key),
                      num_dates=args.num_dates)
        for seed in args.seeds:
            models = {}
            for init, path in (("pretrained", ckpt), ("scratch", None)):
                t1 = time.time()
                model = finetune(args, modality, seed, path)
                miou = test_miou(model, test, key)
                models[init] = (model, key)
                runs.append({"modality": modality, "seed": seed, "init": init, "test_mIoU": miou,
                             "seconds": time.time() - t1})
                print(f"{modality:7s} seed {seed} {init:10s} test mIoU {miou:5.1f}  ({time.time() - t1:.0f}s)",
                      flush=True)
            if modality == "optical":
                tab = cloud_robustness(models, test)
                tab["seed"] = seed
                clouds.append(tab)

    df = pd.DataFrame(runs)
    summary = df.groupby(["modality", "init"])["test_mIoU"].agg(["mean", "std", "count"])
    summary.columns = ["mIoU_mean", "mIoU_std", "n_seeds"]
    per_seed = df.pivot_table(index=["modality", "seed"], columns="init", values="test_mIoU")
    per_seed["gain"] = per_seed["pretrained"] - per_seed["scratch"]
    result: dict[str, Any] = {
        "command": "python benchmarks/s4_label_efficiency.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()),
        "seconds_total": time.time() - t0, "seconds_pretrain": t_pre,
        "pretrain_losses": losses, "runs": runs,
        "summary": summary.reset_index().to_dict(orient="records"),
        "per_seed": per_seed.reset_index().to_dict(orient="records"),
    }
    md = ["# S4 label efficiency (synthetic PASTIS-R, 10% labels)", "", f"Command: `{result['command']}`", "",
          f"Total {result['seconds_total']:.0f} s (pretraining {t_pre:.0f} s) on {args.threads} CPU threads.", "",
          f"Pretraining loss {losses[0]['loss']:.3f} -> {losses[-1]['loss']:.3f} "
          f"(L_c {losses[0]['loss_c']:.3f} -> {losses[-1]['loss_c']:.3f}, "
          f"L_r {losses[0]['loss_r']:.3f} -> {losses[-1]['loss_r']:.3f}) over {len(losses)} epochs.", "",
          "## Test mIoU (%), mean +- std over seeds", "", _md(summary), "",
          "## Per seed", "", _md(per_seed), ""]
    if clouds:
        ct = pd.concat(clouds)
        num = [c for c in ct.columns if c not in ("bin", "seed")]
        cavg = ct.groupby("bin", sort=False)[num].mean()
        result["cloud_robustness_optical"] = cavg.reset_index().to_dict(orient="records")
        md += ["## Cloud robustness, optical inference (mean over seeds)", "", _md(cavg, "{:.2f}"), ""]
    (out / "s4_label_efficiency.json").write_text(json.dumps(result, indent=2, default=float))
    (out / "s4_label_efficiency.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
