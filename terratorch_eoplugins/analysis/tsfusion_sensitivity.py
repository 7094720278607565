"""Per-modality gradient sensitivity of a fine-tuned TS-fusion CropNet model (Basile et al., 2025, section 5.5,
Fig. 9 and appendix A.3 / C.8).

For every county-year of a split, the predicted log yield is differentiated with respect to the encoder's
input token embeddings (token + position + modality embedding) of every (grid, date) sample. The
sensitivity of a modality group (``image``, ``weather``) is the mean L2 norm of these gradients over the
group's tokens and the county's samples: how strongly the prediction reacts to changes in that modality's
input embeddings. The paper relates these maps to the error map (low gradients where errors are high).

    eoplugins tsfusion-sensitivity --ckpt runs/.../last.ckpt --root data/demo/CropNet --crop Corn --split test \\
        --out tsfusion_sensitivity

writes ``<out>.csv`` (one row per county: location, true and predicted yield, absolute error, gradient
norm per modality group) and ``<out>.png`` (maps of error and gradients; error vs gradient scatter).
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from terratorch_eoplugins.runtime import read_checkpoint

__all__ = ["load_cropnet_task", "modality_gradients", "main"]


def load_cropnet_task(ckpt: str | Path) -> Any:
    """A fine-tuned :class:`~terratorch_eoplugins.tasks.tsfusion_cropnet.TSFusionCropNetTask` from a Lightning
    checkpoint (``torch.load(weights_only=True)``); the pretraining checkpoint it was initialised from is not needed."""
    from terratorch_eoplugins.tasks.tsfusion_cropnet import TSFusionCropNetTask

    path = Path(ckpt)
    blob = read_checkpoint(path, "TS-fusion CropNet")
    if "state_dict" not in blob or "hyper_parameters" not in blob:
        raise ValueError(f"{path}: expected a Lightning checkpoint of TSFusionCropNetTask "
                         "(state_dict + hyper_parameters)")
    hp = {k: v for k, v in dict(blob["hyper_parameters"]).items() if not k.startswith("_")}
    hp.update(backbone_ckpt_path=None, tokenizer_ckpt=None)  # weights come from this checkpoint
    task = TSFusionCropNetTask(**hp)
    task.load_state_dict(blob["state_dict"])
    return task.eval()


def modality_gradients(task: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Predictions ``[B]`` (log units, destandardised with the batch's ``label_mean`` / ``label_std``) and per-group
    mean gradient norms ``{group: [B]}``.

    ``d pred_b / d x`` for the input embeddings ``x`` of county ``b``'s valid samples; the norm is taken
    per token over the embedding dimension and averaged over the group's tokens and the valid samples.
    """
    model = task.model
    was = model.training
    model.eval()
    tokens, valid = task.tokens_of(batch)
    b, s = valid.shape
    x = model.embed_samples(tokens).detach().requires_grad_(True)
    pred = model.forward_embeddings(x, valid)[:, 0]
    (grad,) = torch.autograd.grad(pred.sum(), x)  # counties are independent: each row only reaches its own pred
    norms = grad.norm(dim=-1).reshape(b, s, -1)  # [B, S, N]
    w = valid.float()[..., None]
    out = {}
    for g, name in enumerate(model.group_names):
        sel = model.token_groups == g
        per_sample = norms[:, :, sel].mean(-1, keepdim=True)
        out[name] = ((per_sample * w).sum((1, 2)) / w.sum((1, 2)).clamp_min(1)).detach()
    model.train(was)
    return task.destandardize(pred.detach()[:, None], batch)[:, 0], out


def _plot(rows: list[dict[str, Any]], groups: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = np.array([r["lat"] for r in rows])
    lon = np.array([r["lon"] for r in rows])
    err = np.array([r["abs_error"] for r in rows])
    panels = [("abs. yield error", err)] + [(f"grad {g}", np.array([r[f"grad_{g}"] for r in rows])) for g in groups]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.3 * (len(panels) + 1), 3.2))
    for ax, (title, val) in zip(axes, panels):
        sc = ax.scatter(lon, lat, c=val, cmap="viridis", s=30)
        fig.colorbar(sc, ax=ax, fraction=0.046)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("lon")
        ax.set_ylabel("lat")
    ax = axes[-1]
    for g in groups:
        ax.scatter([r[f"grad_{g}"] for r in rows], err, s=15, label=g)
    ax.set_xscale("log")
    ax.set_xlabel("mean gradient norm")
    ax.set_ylabel("abs. yield error")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eoplugins tsfusion-sensitivity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="TSFusionCropNetTask checkpoint (Lightning .ckpt)")
    p.add_argument("--root", required=True, help="CropNet folder")
    p.add_argument("--crop", default="Corn")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--max-dates", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--months", type=int, nargs="+", default=[4, 5, 6, 7, 8, 9],
                   help="months of daily weather and images (as in the fine-tuning data)")
    p.add_argument("--out", default="tsfusion_sensitivity", help="output prefix (.csv, .png)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(list(argv) if argv is not None else None)
    torch.set_num_threads(args.threads)
    from terratorch_eoplugins.datamodules.cropnet import CropNetDataModule
    from terratorch_eoplugins.tasks.tsfusion_cropnet import REQUIRED_KEYS

    task = load_cropnet_task(args.ckpt)
    hp = task.hparams
    dm = CropNetDataModule(args.root, crop=args.crop, grid_aggregation="none", normalize=False, standardize_label=True,
                           long_term_years=0, batch_size=args.batch_size, image_size=args.image_size,
                           max_dates=args.max_dates, batch_keys=[*REQUIRED_KEYS, "fips", "county", "location_coords"],
                           months=args.months, window_weather=hp["weather"], window_before=hp["before"],
                           window_after=hp["after"])
    dm.setup({"train": "fit", "val": "validate", "test": "test"}[args.split])
    loader = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[args.split]()
    groups = list(task.model.group_names)
    rows = []
    for batch in loader:
        pred, grads = modality_gradients(task, batch)
        true = task.destandardize(batch["label"].float(), batch)[:, 0]
        for i in range(len(pred)):
            lat, lon = batch["location_coords"][i].tolist()
            row = {"fips": batch["fips"][i], "county": batch["county"][i], "lat": lat, "lon": lon,
                   "true_yield": float(np.exp(true[i])), "pred_yield": float(np.exp(pred[i]))}
            row["abs_error"] = abs(row["pred_yield"] - row["true_yield"])
            for g in groups:
                row[f"grad_{g}"] = float(grads[g][i])
            rows.append(row)
    if not rows:
        raise ValueError(f"split {args.split!r} of {args.crop} has no county-year")
    prefix = Path(args.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{prefix}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot(rows, groups, Path(f"{prefix}.png"))
    err = np.array([r["abs_error"] for r in rows])
    for g in groups:
        gv = np.array([r[f"grad_{g}"] for r in rows])
        rho = float(np.corrcoef(gv, err)[0, 1]) if len(rows) > 2 and gv.std() > 0 and err.std() > 0 else float("nan")
        print(f"{g:8s} mean gradient norm {gv.mean():.4g}  (Pearson r with abs. error: {rho:.3f})")
    print(f"wrote {prefix}.csv, {prefix}.png ({len(rows)} counties)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
