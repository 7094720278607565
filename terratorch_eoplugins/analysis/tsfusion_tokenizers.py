"""Train the TS-fusion tokenizers on a CropNet tree (real or synthetic): image FSQ + time-series tokenizers.

Writes, under ``--out`` (default ``runs/tsfusion_tokenizers``; the trained-tokenizer path the fusion model
reads is configurable there):

* ``image_fsq.pt``: :class:`~terratorch_eoplugins.nn.image_tokenizer.FSQImageTokenizer` trained on the
  Sentinel-2 grid images (``/255``, every grid and date of the train county-years);
* ``ts_fsq.pt``: :class:`~terratorch_eoplugins.nn.ts_tokenizers.fsq.FSQTokenizer` (levels 8-8-8-8, lambda_FSQ 0.1)
  trained on the daily WRF-HRRR series, one univariate series per (county-year, month, grid, variable) of
  ``days_per_month`` days, statistics per variable (``num_variables = V``), raw units;
* ``ts_uniform.pt``, ``ts_quantile.pt``: deterministic tokenizers (``--num-bins``, 500 in the paper, C.3);
* ``metrics.json``: reconstruction MSE/MAE/R^2 and token utilisation of every tokenizer on the held-out
  ``val`` years (table 1/4 of the paper; time-series errors in standardised units, averaged over the
  variables, plus per variable in raw units), and the image tokenizer's MSE before/after training.

Load them with :func:`~terratorch_eoplugins.nn.ts_tokenizers.serialization.load_ts_tokenizer` and
:func:`~terratorch_eoplugins.nn.image_tokenizer.load_image_tokenizer`.

``eoplugins tsfusion-tokenizers --root data/demo/CropNet --out runs/tsfusion_tokenizers``
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from terratorch_eoplugins.datasets.tsfusion import load_cropnet_tokenizer_data
from terratorch_eoplugins.metrics import reconstruction_metrics
from terratorch_eoplugins.nn.image_tokenizer import FSQImageTokenizer, save_image_tokenizer, train_image_tokenizer
from terratorch_eoplugins.nn.ts_tokenizers.binning import QuantileTokenizer, UniformTokenizer
from terratorch_eoplugins.nn.ts_tokenizers.fsq import FSQTokenizer
from terratorch_eoplugins.nn.ts_tokenizers.serialization import save_ts_tokenizer
from terratorch_eoplugins.nn.ts_tokenizers.training import train_fsq_tokenizer

__all__ = ["DEFAULT_OUT", "main", "train_tsfusion_tokenizers"]

DEFAULT_OUT = "runs/tsfusion_tokenizers"


def _ts_metrics(tok: Any, x: torch.Tensor, variables: Sequence[str]) -> dict[str, Any]:
    """Metrics in standardised units (per-variable train statistics) averaged over variables + per variable raw."""
    per_var, std_units = {}, []
    x_hat = tok.decode(tok.encode(x))
    mean = x.mean((0, 2))
    for v, name in enumerate(variables):
        a, b = x[:, v].double(), x_hat[:, v].double()
        sd = float(a.std()) or 1.0
        mse = float(((a - b) ** 2).mean())
        per_var[name] = {"mse": mse, "mae": float((a - b).abs().mean()),
                         "r2": 1 - mse / float(((a - mean[v]) ** 2).mean()) if sd > 0 else float("nan")}
        std_units.append((mse / sd**2, float((a - b).abs().mean()) / sd))
    overall = reconstruction_metrics(tok, x)
    return {"mse_std": float(np.mean([m for m, _ in std_units])), "mae_std": float(np.mean([m for _, m in std_units])),
            "tokens_used": overall["tokens_used"], "codebook_size": tok.codebook_size, "per_variable": per_var}


def train_tsfusion_tokenizers(root: str | Path, out_dir: str | Path = DEFAULT_OUT, days_per_month: int = 28,
                              num_bins: int = 500, fsq_levels: Sequence[int] = (8, 8, 8, 8), fsq_downsample: int = 4,
                              fsq_hidden: int = 64, fsq_steps: int = 400, image_levels: Sequence[int] = (8, 8, 8, 6, 5),
                              image_hidden: Sequence[int] = (32, 64, 64), image_steps: int = 300, batch_size: int = 32,
                              lr: float = 2e-3, seed: int = 0, max_samples: int | None = None) -> dict[str, Any]:
    """Fit/train all tokenizers on the ``train`` split, evaluate on ``val``, save them under ``out_dir``."""
    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = load_cropnet_tokenizer_data(root, "train", days_per_month, max_samples=max_samples)
    val = load_cropnet_tokenizer_data(root, "val", days_per_month, max_samples=max_samples)
    variables = train["variables"]
    v = len(variables)
    metrics: dict[str, Any] = {"root": str(root), "train_county_years": len(train["county_years"]),
                               "val_county_years": len(val["county_years"]), "train_series": int(len(train["weather"])),
                               "train_images": int(len(train["images"])), "variables": variables}
    t0 = time.time()
    for name, tok in (("uniform", UniformTokenizer(num_bins, num_variables=v)),
                      ("quantile", QuantileTokenizer(num_bins, num_variables=v))):
        tok.fit(train["weather"])
        save_ts_tokenizer(tok, out / f"ts_{name}.pt")
        metrics[f"ts_{name}"] = _ts_metrics(tok, val["weather"], variables)
    fsq = FSQTokenizer(levels=fsq_levels, hidden_dim=fsq_hidden, downsample=fsq_downsample, num_variables=v)
    fsq.fit(train["weather"])
    metrics["ts_fsq_untrained"] = _ts_metrics(fsq, val["weather"], variables)
    hist = train_fsq_tokenizer(fsq, train["weather"], steps=fsq_steps, batch_size=batch_size, lr=lr, seed=seed)
    save_ts_tokenizer(fsq, out / "ts_fsq.pt")
    metrics["ts_fsq"] = _ts_metrics(fsq, val["weather"], variables)
    metrics["ts_fsq"]["train_loss_first_last"] = [hist[0], hist[-1]]
    channels = int(train["images"].shape[1])
    img_tok = FSQImageTokenizer(channels, levels=image_levels, hidden_dims=image_hidden).fit(train["images"])
    size = train["images"].shape[-1]
    if size % img_tok.patch_size:
        raise ValueError(f"image side {size} is not a multiple of the image tokenizer patch {img_tok.patch_size}; "
                         "change image_hidden (patch = 2**len) or resize with image_size")

    def img_mse(tok: FSQImageTokenizer, x: torch.Tensor) -> tuple[float, int]:
        with torch.no_grad():
            tokens = torch.cat([tok.encode(c) for c in x.split(64)])
            rec = torch.cat([tok.decode(t) for t in tokens.split(64)])
        return float(((rec - x) ** 2).mean()), int(tokens.unique().numel())

    before, _ = img_mse(img_tok, val["images"])
    ihist = train_image_tokenizer(img_tok, train["images"], steps=image_steps, batch_size=batch_size, lr=lr, seed=seed)
    after, used = img_mse(img_tok, val["images"])
    save_image_tokenizer(img_tok, out / "image_fsq.pt")
    metrics["image_fsq"] = {"mse_before": before, "mse_after": after, "val_pixel_variance": float(val["images"].var()),
                            "tokens_used": used, "vocab_size": img_tok.vocab_size, "patch_size": img_tok.patch_size,
                            "train_loss_first_last": [ihist[0], ihist[-1]]}
    metrics["seconds"] = time.time() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """``eoplugins tsfusion-tokenizers``: train and save the TS-fusion tokenizers, print table-1 style metrics."""
    p = argparse.ArgumentParser(prog="eoplugins tsfusion-tokenizers", description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, help="CropNet folder (e.g. data/demo/CropNet)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder of the trained tokenizers")
    p.add_argument("--days-per-month", type=int, default=28)
    p.add_argument("--num-bins", type=int, default=500)
    p.add_argument("--fsq-levels", default="8-8-8-8")
    p.add_argument("--fsq-downsample", type=int, default=4, help="FSQ temporal compression L / L' (power of 2)")
    p.add_argument("--fsq-hidden", type=int, default=64)
    p.add_argument("--fsq-steps", type=int, default=400)
    p.add_argument("--image-steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-samples", type=int, default=None, help="at most this many county-years per split")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    m = train_tsfusion_tokenizers(a.root, a.out, a.days_per_month, a.num_bins,
                                  [int(x) for x in a.fsq_levels.split("-")], fsq_downsample=a.fsq_downsample,
                                  fsq_hidden=a.fsq_hidden, fsq_steps=a.fsq_steps,
                                  image_steps=a.image_steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                                  max_samples=a.max_samples)
    print(f"{'tokenizer':<18}{'MSE (std)':>12}{'MAE (std)':>12}{'tokens used':>13}")
    for k in ("ts_quantile", "ts_uniform", "ts_fsq_untrained", "ts_fsq"):
        r = m[k]
        print(f"{k:<18}{r['mse_std']:>12.5f}{r['mae_std']:>12.5f}{r['tokens_used']:>9}/{r['codebook_size']}")
    im = m["image_fsq"]
    print(f"image_fsq: val MSE {im['mse_before']:.5f} -> {im['mse_after']:.5f} (pixel variance "
          f"{im['val_pixel_variance']:.5f}), tokens used {im['tokens_used']}/{im['vocab_size']}")
    print(f"wrote {a.out}/{{image_fsq,ts_fsq,ts_uniform,ts_quantile}}.pt and metrics.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
