"""LIANet PASTIS evaluation protocol of the supplement: 5 folds x 2 tiles, macro metrics averaged.

Supplement section 10: LIANet-Modified is pretrained per PASTIS tile (T31TFM and T32ULU, one region each)
and fine-tuned on that tile's patches; the reference's ``eval.ipynb`` averages macro IoU / accuracy / F1
over the 5 PASTIS folds of both tiles. This command runs, for every ``TILE=CKPT`` pair and every fold
rotation of the official 5-fold protocol (train 3 folds, validate on 1, test on 1), the real CLI

    terratorch fit  -c configs/lianet_pastis.yaml --data.init_args.protocol=official
                    --data.init_args.fold_rotation=K --data.init_args.tiles=[TILE]
                    --data.init_args.outside=skip --model.init_args.model_args.backbone_ckpt_path=CKPT
    terratorch test -c ... --ckpt_path=<best validation checkpoint>

and prints each run's test mIoU, pixel accuracy and F1 with their mean and standard deviation over all
runs. Differences from the reference, on purpose: test metrics of the best-validation checkpoint of one
seed (the reference reports the best validation epoch and the maximum over seeds, which is optimistic).

    eoplugins lianet-pastis-protocol --tiles-root data/S2_TILES --pastis-root data/PASTIS-R \\
        --tile T31TFM=runs/t31tfm/lianet_generator.pt --tile T32ULU=runs/t32ulu/lianet_generator.pt
    # --dry-run prints the commands; --folds 0 1 runs a subset
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from terratorch_eoplugins.analysis.lianet_demo import profile_args
from terratorch_eoplugins.runtime import read_last_metrics, run_terratorch

METRICS = ("test/mIoU", "test/Pixel_Accuracy", "test/F1_Score")


def parse_tiles(pairs: Sequence[str]) -> dict[str, str]:
    """``["T31TFM=path.pt", ...]`` -> ``{"T31TFM": "path.pt"}`` (clear error on a malformed pair)."""
    out: dict[str, str] = {}
    for pair in pairs:
        tile, sep, ckpt = pair.partition("=")
        if not sep or not tile or not ckpt:
            raise ValueError(f"--tile expects TILE=CHECKPOINT (e.g. T31TFM=runs/x/lianet_generator.pt), got {pair!r}")
        if tile in out:
            raise ValueError(f"--tile {tile} given twice")
        out[tile] = ckpt
    if not out:
        raise ValueError("give at least one --tile TILE=CHECKPOINT")
    return out


def protocol_commands(tiles: Mapping[str, str], folds: Sequence[int], config: str, pastis_root: str, tiles_root: str,
                      runs_dir: str, extra: Sequence[str] = (), profile: str | None = None) -> list[dict[str, object]]:
    """One entry per (tile, fold rotation): its name and the ``fit`` arguments (``test`` reuses them).

    ``profile``: an overlay (``configs/profiles/cpu/lianet_pastis.yaml``) placed first, before the checkpoint flag
    (a ``-c`` file replaces the whole ``model_args``); ``None``: the config at paper scale."""
    for k in folds:
        if not 0 <= int(k) <= 4:
            raise ValueError(f"fold rotations are 0..4 (official 5-fold protocol), got {k}")
    runs = []
    for tile, ckpt in tiles.items():
        for k in folds:
            name = f"lianet_pastis_{tile}_fold{k}"
            args = [*profile_args(profile), f"--data.init_args.root={pastis_root}",
                    f"--data.init_args.tiles_root={tiles_root}",
                    f"--data.init_args.tiles=[{tile}]", "--data.init_args.protocol=official",
                    f"--data.init_args.fold_rotation={int(k)}", "--data.init_args.outside=skip",
                    f"--model.init_args.model_args.backbone_ckpt_path={ckpt}",
                    f"--trainer.logger.init_args.save_dir={runs_dir}", f"--trainer.default_root_dir={runs_dir}",
                    f"--trainer.logger.init_args.name={name}", *extra]
            runs.append({"tile": tile, "fold": int(k), "name": name, "config": config, "args": args})
    return runs


def summarise(results: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and (sample) standard deviation of each metric over the runs that logged it."""
    out = {}
    for key in METRICS:
        vals = [r[key] for r in results if key in r]
        if vals:
            out[key] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eoplugins lianet-pastis-protocol", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tile", action="append", default=[], required=True,
                   help="TILE=CHECKPOINT: a PASTIS tile (folder under --tiles-root) and its pretraining checkpoint")
    p.add_argument("--tiles-root", required=True, help="folder holding the tile folders of S2 acquisitions")
    p.add_argument("--pastis-root", required=True, help="the PASTIS-R folder")
    p.add_argument("--config", default="configs/lianet_pastis.yaml")
    p.add_argument("--profile", default=None,
                   help="overlay after --config, e.g. configs/profiles/cpu/lianet_pastis.yaml (default: paper scale)")
    p.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="official fold rotations to run")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--json", default=None, help="also write per-run metrics and the summary to this file")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    a, extra = p.parse_known_args(argv)
    if not Path(a.config).is_file():
        raise FileNotFoundError(f"config {a.config!r} not found")
    runs = protocol_commands(parse_tiles(a.tile), a.folds, a.config, a.pastis_root, a.tiles_root, a.runs_dir, extra,
                             profile=a.profile)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = []
    env = dict(os.environ)
    for run in runs:
        fit = ["fit", "-c", run["config"], *run["args"], f"--trainer.logger.init_args.version=fit-{stamp}"]
        if a.dry_run:
            print("terratorch", " ".join(fit))
            print("terratorch test -c", run["config"], "... --ckpt_path=<best-*.ckpt of the fit>")
            continue
        run_terratorch(fit, env=env, check=True, echo=True)
        fit_dir = Path(a.runs_dir) / str(run["name"]) / f"fit-{stamp}"
        best = sorted((fit_dir / "checkpoints").glob("best-*.ckpt"))
        if not best:
            raise FileNotFoundError(f"no best-*.ckpt under {fit_dir / 'checkpoints'}")
        run_terratorch(["test", "-c", run["config"], *run["args"], f"--trainer.logger.init_args.version=test-{stamp}",
                        f"--ckpt_path={best[-1]}"], env=env, check=True, echo=True)
        m = read_last_metrics(Path(a.runs_dir) / str(run["name"]) / f"test-{stamp}" / "metrics.csv")
        results.append({"tile": run["tile"], "fold": run["fold"], **{k: m[k] for k in METRICS if k in m}})
    if a.dry_run:
        return 0
    print("\ntile      fold   mIoU    PixAcc  F1")
    for r in results:
        print(f"{r['tile']:9s} {r['fold']:4d}  " + "  ".join(f"{r.get(k, float('nan')):.4f}" for k in METRICS))
    summary = summarise(results)
    print("mean +- std over", len(results), "runs: " +
          ", ".join(f"{k.split('/')[1]} {m:.4f} +- {s:.4f}" for k, (m, s) in summary.items()))
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": results, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
