"""LIANet as a neural compressor: bits per pixel (supplement eq. 2) and PSNR (eq. 3) over random patches.

* ``1 / bpp = Q / (8 B) * sum_c P_c``: ``B`` bytes of generator parameters (tables, time encoder and CNN, at
  their storage dtype), ``Q`` encoded acquisitions, ``P_c`` pixels of channel ``c`` over the region (12 bands
  of the region grid; no-data pixels excluded when a tile has them is not attempted: the full grid is used).
* ``PSNR(I | S) = 10 log10(max I^2 / <(I - S)^2>)`` with ``I`` the LIANet patch, ``S`` the Sentinel-2 L2A
  patch (both ``(DN - 1000) / 10000``, ``S`` clipped to [0, 1]) and ``<.>`` the mean over pixels and bands,
  for all 12 bands and for RGB (B04, B03, B02).

``eoplugins compression --ckpt RUN.ckpt --tiles-root DIR`` prints the statistics over ``--patches`` random
``--patch-size`` patches (default 100 x 128 px, as in the supplement's Fig. 5) and draws the rate-distortion
plot (dots min/max, bar +-1.5 std, cross mean, open circle median; blue all bands, orange RGB).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from terratorch_eoplugins.datasets.s2_tiles import RGB, S2TileSampler, scan_region  # noqa: E402
from terratorch_eoplugins.metrics import peak_psnr  # noqa: E402
from terratorch_eoplugins.models.lianet import LIANetGenerator, load_generator  # noqa: E402

__all__ = ["bits_per_pixel", "compression_report", "psnr", "rate_distortion_plot"]


def bits_per_pixel(n_bytes: float, n_acquisitions: int, pixels_per_channel: Sequence[int]) -> float:
    """Eq. 2: ``bpp = 8 B / (Q * sum_c P_c)``."""
    total = float(sum(pixels_per_channel))
    if n_bytes <= 0 or n_acquisitions <= 0 or total <= 0:
        raise ValueError(f"need positive bytes, acquisitions and pixels, got {n_bytes}, {n_acquisitions}, {total}")
    return 8.0 * n_bytes / (n_acquisitions * total)


def psnr(generated: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> float:
    """Eq. 3: ``10 log10(max(I)^2 / mean((I - S)^2))`` over all pixels and channels given
    (:func:`~terratorch_eoplugins.metrics.peak_psnr`)."""
    return float(peak_psnr(generated, reference))


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    return {"min": float(a.min()), "max": float(a.max()), "mean": float(a.mean()), "median": float(np.median(a)),
            "std": float(a.std())}


def compression_report(generator: LIANetGenerator, tiles_root: str | Path, tiles: Sequence[str] | None = None,
                       n_patches: int = 100, patch_size: int = 128, seed: int = 0, batch_size: int = 4,
                       name: str = "LIANet") -> dict[str, Any]:
    """bpp of ``generator`` and PSNR statistics (all bands, RGB) over random patches of its region."""
    region = scan_region(tiles_root, tiles)
    n_bytes = sum(p.numel() * p.element_size() for p in generator.parameters())
    q = len(region.times)
    h, w = region.shape
    bpp = bits_per_pixel(n_bytes, q, [h * w] * 12)
    ds = S2TileSampler(tiles_root, tiles, split="val", patch_size=patch_size, length=n_patches, seed=seed,
                       region=region)
    generator = generator.eval()
    all_bands, rgb = [], []
    with torch.no_grad():
        for start in range(0, n_patches, batch_size):
            samples = [ds[i] for i in range(start, min(n_patches, start + batch_size))]
            origin = torch.stack([s["origin_px"] for s in samples])
            t = generator.resolve_time(torch.stack([s["time_days"] for s in samples]).double(),
                                       torch.stack([s["time_index"] for s in samples]))
            pred = generator(origin, t, patch_size).float().numpy()
            for p, s in zip(pred, samples):
                ref = s["image"].numpy()
                all_bands.append(psnr(p, ref))
                rgb.append(psnr(p[list(RGB)], ref[list(RGB)]))
    return {"name": name, "bpp": bpp, "bytes": n_bytes, "acquisitions": q, "region_shape": [h, w],
            "patches": n_patches, "patch_size": patch_size, "psnr_all": _stats(all_bands), "psnr_rgb": _stats(rgb),
            "psnr_all_values": all_bands, "psnr_rgb_values": rgb}


def rate_distortion_plot(reports: Sequence[dict[str, Any]], out: str | Path) -> Path:
    """PSNR statistics against bpp (log x axis) for each report; blue = all bands, orange = RGB."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for rep in reports:
        for key, color, dx in (("psnr_all", "tab:blue", 0.97), ("psnr_rgb", "tab:orange", 1.03)):
            st, x = rep[key], rep["bpp"] * dx
            ax.plot([x, x], [st["mean"] - 1.5 * st["std"], st["mean"] + 1.5 * st["std"]], color=color, lw=3, alpha=0.6)
            ax.plot([x, x], [st["min"], st["max"]], ".", color=color)
            ax.plot(x, st["mean"], "x", color=color)
            ax.plot(x, st["median"], "o", mfc="none", color=color)
        ax.annotate(rep["name"], (rep["bpp"], rep["psnr_all"]["max"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.axhline(30, color="purple", ls="-.", lw=1)
    ax.axhline(40, color="red", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("bits per pixel (eq. 2)")
    ax.set_ylabel("PSNR [dB] (eq. 3)")
    ax.plot([], [], color="tab:blue", lw=3, label="all bands")
    ax.plot([], [], color="tab:orange", lw=3, label="RGB")
    ax.legend(loc="lower right")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(args: Any) -> int:
    """``eoplugins compression`` entry point (arguments parsed in :mod:`terratorch_eoplugins.cli`)."""
    reports = []
    for ckpt in args.ckpt:
        gen = load_generator(ckpt)
        rep = compression_report(gen, args.tiles_root, args.tiles, args.patches, args.patch_size, args.seed,
                                 name=Path(ckpt).stem)
        reports.append(rep)
        a, r = rep["psnr_all"], rep["psnr_rgb"]
        print(
            f"{rep['name']}: bpp={rep['bpp']:.4g} ({rep['bytes'] / 2**20:.1f} MiB of parameters, "
            f"Q={rep['acquisitions']}, "
            f"region {rep['region_shape'][0]}x{rep['region_shape'][1]} px x 12 bands)"
        )
        print(f"  PSNR all bands: median {a['median']:.2f}  mean {a['mean']:.2f}  std {a['std']:.2f}  "
              f"min {a['min']:.2f}  max {a['max']:.2f} dB")
        print(f"  PSNR RGB:       median {r['median']:.2f}  mean {r['mean']:.2f}  std {r['std']:.2f}  "
              f"min {r['min']:.2f}  max {r['max']:.2f} dB")
    if args.out:
        print(f"rate-distortion plot: {rate_distortion_plot(reports, args.out)}")
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if not k.endswith("_values")}
                                               for r in reports], indent=2))
    return 0
