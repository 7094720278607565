"""DUNIA zero-shot retrieval against the retrieval database's size (paper appendix G, table G1: 100 / 10 / 5 %).

For each key embedding (``--keys``: ``waveform`` = the paper's O^W keys, ``vertical`` = pixel-to-pixel O^V keys) and
each database fraction (``--fractions``, default 1.0 0.1 0.05), runs ``terratorch test`` of
``configs/dunia_gedi_zeroshot.yaml`` (CPU profile unless ``--paper-scale``) in-process with
``--model.init_args.database_fraction <f>`` (the database is built from the training footprints, then a seeded
fraction of its entries is kept; ``--seed``) and prints one markdown row per run: entries in the database, RMSE
and Pearson r of RH98, canopy cover and PAI at K = 50 (the paper's KNN_b for these products), the Pearson r of the
retrieved waveform (KNN = 1; O^W keys only) and the mean predictor's RMSE.

    python benchmarks/dunia_database_size.py --ckpt runs/dunia_pretrain/checkpoints/last.ckpt --world data/demo
    python benchmarks/dunia_database_size.py                       # tiny world in a temp dir, random-init DUNIA-tiny
    python benchmarks/dunia_database_size.py --out benchmarks/results/dunia_database_size.md ...

Without ``--ckpt`` the DUNIA-tiny image model and waveform encoder are random: the table then only shows that the
command runs (use a checkpoint of ``configs/dunia_pretrain.yaml`` with its CPU profile for meaningful figures).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("rh98", "cover", "pai")


def run(world: Path, keys: str, fraction: float, ckpt: str | None, paper_scale: bool, seed: int,
        k: int = 50) -> dict[str, float]:
    """``terratorch test`` of the zero-shot config with one key embedding and database fraction; its test metrics."""
    from terratorch.cli_tools import build_lightning_cli

    args = ["test", "-c", str(REPO / "configs" / "dunia_gedi_zeroshot.yaml")]
    if not paper_scale:
        args += ["-c", str(REPO / "configs" / "profiles" / "cpu" / "dunia_gedi_zeroshot.yaml")]
    args += [f"--data.init_args.root={world / 'GEDI'}", f"--model.init_args.keys={keys}",
             f"--model.init_args.database_fraction={fraction}", f"--model.init_args.seed={seed}",
             f"--model.init_args.k={k}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
             "--trainer.callbacks=[]", f"--trainer.default_root_dir={tempfile.mkdtemp(prefix='dunia_dbsize_')}"]
    if ckpt:
        args.append(f"--model.init_args.backbone_ckpt_path={ckpt}")
    with contextlib.redirect_stdout(io.StringIO()):
        cli = build_lightning_cli(args)
    out = {key: float(v) for key, v in cli.trainer.callback_metrics.items()}
    out["entries"] = float(len(cli.model.database))
    return out


def row(keys: str, fraction: float, m: dict[str, float], seconds: float) -> str:
    cells = [keys, f"{fraction:g}", f"{m['entries']:.0f}"]
    for t in TARGETS:
        cells.append(f"{m.get(f'test/{t}_rmse', float('nan')):.3g} ({m.get(f'test/{t}_r', float('nan')):.2f})")
    cells.append(f"{m['test/waveform_r']:.3f}" if "test/waveform_r" in m else "-")
    cells.append(" / ".join(f"{m.get(f'test/{t}_rmse_mean_predictor', float('nan')):.3g}" for t in TARGETS))
    cells.append(f"{seconds:.0f}")
    return "| " + " | ".join(cells) + " |"


HEADER = ("| keys | fraction | entries | RH98 RMSE (r) | cover RMSE (r) | PAI RMSE (r) | waveform r (K=1) | "
          "mean predictor RMSE (RH98 / cover / PAI) | s |\n|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=Path, help="synthetic world folder (holding GEDI/); default: the tiny world "
                                              "written to a temporary folder")
    p.add_argument("--ckpt", help="DUNIA pretraining checkpoint (image model + waveform encoder)")
    p.add_argument("--keys", nargs="+", default=["waveform", "vertical"], choices=["waveform", "vertical"])
    p.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.1, 0.05])
    p.add_argument("--seed", type=int, default=0, help="seed of the database subsample")
    p.add_argument("--paper-scale", action="store_true", help="dunia_base (no CPU profile)")
    p.add_argument("--out", type=Path, help="also write the table (markdown) here")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    world = a.world
    if world is None:
        from terratorch_eoplugins.synthetic import write_world

        world = Path(tempfile.mkdtemp(prefix="dunia_world_"))
        write_world(world, size="tiny", seed=0)
    lines = [HEADER]
    for keys in a.keys:
        for f in a.fractions:
            t0 = time.perf_counter()
            m = run(world, keys, f, a.ckpt, a.paper_scale, a.seed)
            lines.append(row(keys, f, m, time.perf_counter() - t0))
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    cmd = "python benchmarks/dunia_database_size.py " + " ".join(argv if argv is not None else [])
    print(table)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(f"# DUNIA zero-shot retrieval vs database size (table G1)\n\nWorld: `{world}`; checkpoint: "
                         f"`{a.ckpt}`; seed {a.seed}.\n\n```\n{cmd.strip()}\n```\n\n{table}\n")
    return table


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
