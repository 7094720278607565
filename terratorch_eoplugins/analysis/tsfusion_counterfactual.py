"""Coordinate-swap counterfactual test of a TS-fusion pretraining checkpoint (Basile et al., 2025, section 5.3,
appendix B algorithm 1 and appendix C.6).

For ``n_img`` images ``I_m`` of the held-out pairs, the weather series is generated from the image and its
true grid coordinates ``c_m`` and compared with the truth, ``L_m^ref = L(f(I_m, c_m), y_m)``; then from the
same image with ``n_false`` coordinates ``c_j`` of *other* pairs (``j != m``), ``L_m^swap(j)``. The image
score is ``Delta_m = mean_j (L_m^swap(j) - L_m^ref)``; ``mu_Delta = mean_m Delta_m``, with a non-parametric
percentile bootstrap confidence interval (DiCiccio & Efron, 1996) for ``H0: mu_Delta = 0``. ``L`` is the
MSE between generated and true series (physical units) averaged over the chosen weather variables.

    eoplugins tsfusion-counterfactual --ckpt runs/.../last.ckpt --root data/demo/CropNet --years 2020 \\
        --n-img 200 --n-false 50 --out tsfusion_counterfactual

writes ``<out>.csv`` (one row per image), ``<out>_summary.csv`` and ``<out>.png`` (histogram of ``Delta_m``
with the CI; one example series with true and swapped coordinates).
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

__all__ = ["bootstrap_ci", "coordinate_swap", "load_pretrain_task", "main"]


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0
                 ) -> tuple[float, float, float]:
    """Mean of ``values`` and its percentile-bootstrap ``level`` confidence interval ``(mean, low, high)``."""
    v = np.asarray(values, np.float64)
    if v.size < 2 or not np.isfinite(v).all():
        raise ValueError(f"bootstrap_ci needs >= 2 finite values, got {v.size} (finite: {int(np.isfinite(v).sum())})")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"level must be in (0, 1) and n_boot >= 1, got {level}, {n_boot}")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (n_boot, v.size))].mean(1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def load_pretrain_task(ckpt: str | Path) -> Any:
    """A :class:`~terratorch_eoplugins.tasks.tsfusion_pretrain.TSFusionPretrainTask` from a Lightning checkpoint
    (``torch.load(weights_only=True)``: hyper-parameters + weights, tokenizers included)."""
    from terratorch_eoplugins.tasks.tsfusion_pretrain import TSFusionPretrainTask

    path = Path(ckpt)
    blob = read_checkpoint(path, "TS-fusion pretraining")
    if "state_dict" not in blob or "hyper_parameters" not in blob:
        raise ValueError(f"{path}: expected a Lightning checkpoint of TSFusionPretrainTask "
                         "(state_dict + hyper_parameters)")
    hp = dict(blob["hyper_parameters"])
    task = TSFusionPretrainTask(**{k: v for k, v in hp.items() if not k.startswith("_")})
    task.load_state_dict(blob["state_dict"])
    return task.eval()


@torch.no_grad()
def coordinate_swap(task: Any, image: torch.Tensor, weather: torch.Tensor, coords: torch.Tensor, n_img: int,
                    n_false: int, variables: Sequence[str] | None = None, seed: int = 0, chunk: int = 64
                    ) -> dict[str, np.ndarray]:
    """Algorithm 1: reference and swapped losses of ``n_img`` sampled pairs.

    Args:
        task: a pretraining task with the ``coords`` modality.
        image, weather, coords: held-out pairs ``[M, C, H, W]``, ``[M, V, L]``, ``[M, 2]``.
        n_img: images to evaluate (``min(n_img, M)``).
        n_false: false coordinates per image, drawn from the other pairs' coordinates (``j != m``).
        variables: weather variables entering the loss (default: all of the task).
        seed: sampling seed.
        chunk: generation batch size.

    Returns:
        ``index [n]``, ``L_ref [n]``, ``L_swap [n, n_false]``, ``delta [n]`` (``mean_j L_swap - L_ref``),
        ``false_index [n, n_false]``, and the generated series of the first image (``example_*``).
    """
    if "coords" not in task.model.names:
        raise ValueError("the checkpoint's model has no 'coords' modality (pretrained with coords: false); the "
                         "coordinate-swap test needs it")
    m_total = image.shape[0]
    if m_total < 2:
        raise ValueError(f"need >= 2 pairs to swap coordinates, got {m_total}")
    if n_img < 1 or n_false < 1:
        raise ValueError(f"n_img and n_false must be >= 1, got {n_img}, {n_false}")
    names = list(task.tokenizers.weather)
    variables = list(variables or names)
    unknown = [v for v in variables if v not in names]
    if unknown:
        raise ValueError(f"variables {unknown} are not modalities of the checkpoint ({names})")
    vidx = [names.index(v) for v in variables]
    rng = np.random.default_rng(seed)
    index = rng.choice(m_total, size=min(n_img, m_total), replace=False)  # lines 3-5: new reference indices
    false_idx = np.stack([rng.choice(np.delete(np.arange(m_total), m), size=n_false, replace=n_false > m_total - 1)
                          for m in index])  # line 10: c_j with j != m
    rows_img = np.repeat(index, 1 + n_false)
    rows_crd = np.concatenate([np.concatenate([[m], f]) for m, f in zip(index, false_idx)])
    losses = np.empty(len(rows_img))
    gens = []
    for s in range(0, len(rows_img), chunk):
        ii, cc = rows_img[s:s + chunk], rows_crd[s:s + chunk]
        gen = task.generate_weather(image[ii], coords[cc], variables=variables)  # [b, V', L]
        true = weather[ii][:, vidx]
        losses[s:s + chunk] = ((gen - true) ** 2).mean((1, 2)).double().numpy()
        if s == 0:
            gens.append(gen[: 1 + n_false])
    losses = losses.reshape(len(index), 1 + n_false)
    l_ref, l_swap = losses[:, 0], losses[:, 1:]
    return {"index": index, "L_ref": l_ref, "L_swap": l_swap, "delta": (l_swap - l_ref[:, None]).mean(1),
            "false_index": false_idx, "example_generated": gens[0].numpy(),
            "example_true": weather[index[0]][vidx].numpy()}


def _plot(out: dict[str, np.ndarray], summary: dict[str, float], variables: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    ax.hist(out["delta"], bins=min(30, max(5, len(out["delta"]) // 4)), color="tab:blue", alpha=0.8)
    ax.axvline(0, color="k", lw=1)
    ax.axvline(summary["mean_delta"], color="tab:red", lw=1.5, label=f"mean {summary['mean_delta']:.3g}")
    ax.axvspan(summary["ci_low"], summary["ci_high"], color="tab:red", alpha=0.15,
               label=f"{100 * summary['level']:.0f}% CI [{summary['ci_low']:.3g}, {summary['ci_high']:.3g}]")
    ax.set_xlabel(r"$\bar\Delta_m$ = mean swapped loss - reference loss")
    ax.set_ylabel("images")
    ax.legend(fontsize=7)
    ax.set_title("coordinate swap (algorithm 1)", fontsize=9)
    ax = axes[1]
    true, gen = out["example_true"][0], out["example_generated"]
    ax.plot(true, "k-", lw=2, label="truth")
    ax.plot(gen[0, 0], "tab:green", lw=1.5, label="true coordinates")
    for k in range(1, min(len(gen), 6)):
        ax.plot(gen[k, 0], color="tab:orange", lw=0.8, alpha=0.7, label="false coordinates" if k == 1 else None)
    ax.set_xlabel("day in window")
    ax.set_ylabel(variables[0])
    ax.legend(fontsize=7)
    ax.set_title("example generation", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eoplugins tsfusion-counterfactual", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="TSFusionPretrainTask checkpoint (Lightning .ckpt)")
    p.add_argument("--root", required=True, help="CropNet folder")
    p.add_argument("--years", type=int, nargs="+", default=[2020], help="held-out years of the pairs")
    p.add_argument("--crops", nargs="+", default=["Corn", "Cotton", "Soybeans", "WinterWheat"])
    p.add_argument("--variables", nargs="+", default=None, help="weather variables in the loss (default: all)")
    p.add_argument("--n-img", type=int, default=200)
    p.add_argument("--n-false", type=int, default=50)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--level", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="tsfusion_counterfactual", help="output prefix (.csv, _summary.csv, .png)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(list(argv) if argv is not None else None)
    torch.set_num_threads(args.threads)
    from terratorch_eoplugins.datamodules.tsfusion import TSFusionPretrainDataModule

    task = load_pretrain_task(args.ckpt)
    hp = task.hparams
    dm = TSFusionPretrainDataModule(args.root, crops=args.crops, split_years={"train": args.years, "val": args.years},
                                    weather=hp["weather"], before=hp["before"], after=hp["after"],
                                    image_size=hp["image_size"])
    pairs = dm.pairs("val").tensors
    variables = args.variables or list(hp["weather"])
    out = coordinate_swap(task, pairs["image"], pairs["weather"], pairs["coords"], args.n_img, args.n_false,
                          variables, args.seed)
    mean, low, high = bootstrap_ci(out["delta"], args.n_boot, args.level, args.seed)
    reject = not (low <= 0.0 <= high)
    summary = {"n_img": len(out["index"]), "n_false": args.n_false, "mean_delta": mean, "ci_low": low,
               "ci_high": high, "level": args.level, "reject_H0": reject, "mean_L_ref": float(out["L_ref"].mean()),
               "mean_L_swap": float(out["L_swap"].mean()), "variables": " ".join(variables)}
    prefix = Path(args.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{prefix}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pair_index", "lat", "lon", "L_ref", "L_swap_mean", "delta_mean"])
        for k, m in enumerate(out["index"]):
            lat, lon = pairs["coords"][m].tolist()
            w.writerow([int(m), f"{lat:.5f}", f"{lon:.5f}", f"{out['L_ref'][k]:.6g}", f"{out['L_swap'][k].mean():.6g}",
                        f"{out['delta'][k]:.6g}"])
    with open(f"{prefix}_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary))
        w.writeheader()
        w.writerow(summary)
    _plot(out, summary, variables, Path(f"{prefix}.png"))
    verdict = "reject H0 (coordinates change the generations)" if reject else "cannot reject H0"
    print(f"mu_Delta = {mean:.4g}, {100 * args.level:.0f}% bootstrap CI [{low:.4g}, {high:.4g}] over "
          f"{summary['n_img']} images x {args.n_false} false coordinates: {verdict}")
    print(f"wrote {prefix}.csv, {prefix}_summary.csv, {prefix}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
