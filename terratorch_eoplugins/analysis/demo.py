"""The quickstart demo: synthetic world -> ``terratorch fit`` -> ``terratorch test`` -> metrics vs. a trivial baseline.

Runs the real terratorch CLI in subprocesses, exactly as a user would type it, then reads the metrics
that the CSV logger wrote and compares the test mIoU with the majority-class baseline computed with
the same torchmetrics metric on the same test pixels.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from terratorch_eoplugins.runtime import TerratorchError, read_last_metrics, run_terratorch


def run_stage(subcommand: str, config: str, overrides: Sequence[str], runs_dir: str, name: str, version: str,
              env: dict[str, str], max_epochs: int | None = None) -> tuple[Path, float]:
    """``terratorch <subcommand> -c <config>`` logging to ``<runs_dir>/<name>/<version>``: (log dir, seconds)."""
    args = [subcommand, "-c", config, *overrides, f"--trainer.logger.init_args.save_dir={runs_dir}",
            f"--trainer.default_root_dir={runs_dir}", f"--trainer.logger.init_args.name={name}",
            f"--trainer.logger.init_args.version={version}"]
    if max_epochs is not None:
        args.append(f"--trainer.max_epochs={max_epochs}")
    res = run_terratorch(args, env=env, check=True, echo=True)
    return Path(runs_dir) / name / version, res.wall_s


def best_checkpoint(log_dir: Path) -> Path:
    """The last ``best-*.ckpt`` (sorted by name) under ``<log_dir>/checkpoints``."""
    ckpts = sorted((log_dir / "checkpoints").glob("best-*.ckpt"))
    if not ckpts:
        raise FileNotFoundError(f"no best-*.ckpt written under {log_dir / 'checkpoints'}")
    return ckpts[-1]


def data_piece(config: str) -> Path:
    """The data piece a top-level config composes (``data: data/x.yaml``, relative to the config)."""
    return Path(config).parent / yaml.safe_load(Path(config).read_text())["data"]


def majority_baseline(data_config: Path, overrides: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Test mIoU / pixel accuracy / macro F1 of always predicting the train split's most frequent class.

    ``data_config`` is a datamodule piece (``class_path`` + ``init_args``); ``overrides`` replace init args
    (e.g. the data roots given on the command line).
    """
    from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassJaccardIndex

    import terratorch_eoplugins  # noqa: F401

    cfg = yaml.safe_load(data_config.read_text())
    init = {**cfg.get("init_args", {}), **(overrides or {})}
    module_name, cls_name = cfg["class_path"].rsplit(".", 1)
    dm = getattr(__import__(module_name, fromlist=[cls_name]), cls_name)(**init)
    dm.setup("fit")
    counts = torch.zeros(dm.num_classes, dtype=torch.long)
    for i in range(len(dm.train_dataset)):
        m = dm.train_dataset[i]["mask"]
        counts += torch.bincount(m[m >= 0].flatten(), minlength=dm.num_classes)[: dm.num_classes]
    majority = int(counts.argmax())
    dm.setup("test")
    miou = MulticlassJaccardIndex(num_classes=dm.num_classes, ignore_index=dm.ignore_index, average="macro")
    acc = MulticlassAccuracy(num_classes=dm.num_classes, ignore_index=dm.ignore_index, average="micro")
    f1 = MulticlassF1Score(num_classes=dm.num_classes, ignore_index=dm.ignore_index, average="macro")
    for i in range(len(dm.test_dataset)):
        m = dm.test_dataset[i]["mask"][None]
        pred = torch.full_like(m, majority)
        miou.update(pred, m)
        acc.update(pred, m)
        f1.update(pred, m)
    return {"majority_class": majority, "mIoU": float(miou.compute()), "Pixel_Accuracy": float(acc.compute()),
            "F1_Score": float(f1.compute()), "test_samples": len(dm.test_dataset)}


def run_demo(config: str = "configs/micro_unet_pastis.yaml", data_dir: str = "data/demo", size: str = "demo",
             max_epochs: int | None = None, runs_dir: str = "runs") -> dict[str, float]:
    """Write the world if absent, train and test ``config`` through the terratorch CLI, print a summary."""
    from terratorch_eoplugins.synthetic import write_world

    t0 = time.perf_counter()
    written = write_world(data_dir, size=size, products=["s2_tiles", "s1_tiles", "pastis"])
    pastis_root = str(written["pastis"])
    print(f"synthetic world ({size}) ready in {data_dir} [{time.perf_counter() - t0:.0f} s]", flush=True)

    env = dict(os.environ)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = "demo_" + Path(config).stem
    data = [f"--data.init_args.root={pastis_root}"]
    fit_dir, fit_s = run_stage("fit", config, data, runs_dir, name, f"fit-{stamp}", env, max_epochs)
    best = best_checkpoint(fit_dir)
    test_dir, test_s = run_stage("test", config, [*data, f"--ckpt_path={best}"], runs_dir, name, f"test-{stamp}", env)
    metrics = read_last_metrics(test_dir / "metrics.csv")
    base = majority_baseline(data_piece(config), {"root": pastis_root})

    print("\n================ demo summary ================")
    print(f"config            {config}")
    print(f"fit / test time   {fit_s:.0f} s / {test_s:.0f} s   (total {time.perf_counter() - t0:.0f} s)")
    print(f"checkpoint        {best}")
    print(f"fit metrics       {fit_dir / 'metrics.csv'}")
    print(f"test metrics      {test_dir / 'metrics.csv'}")
    for key in ("test/mIoU", "test/Pixel_Accuracy", "test/F1_Score", "test/Accuracy"):
        if key in metrics:
            print(f"{key:21s}{metrics[key]:.4f}")
    print(f"majority baseline mIoU {base['mIoU']:.4f}  pixel acc {base['Pixel_Accuracy']:.4f}"
          f"  (always class {base['majority_class']})")
    miou = metrics.get("test/mIoU", float("nan"))
    verdict = "ABOVE" if miou > base["mIoU"] else "NOT above"
    print(f"test mIoU {miou:.4f} is {verdict} the majority-class baseline {base['mIoU']:.4f}")
    return {"test_mIoU": miou, "majority_mIoU": base["mIoU"], "fit_seconds": fit_s}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eoplugins demo", description=__doc__)
    p.add_argument("--config", default="configs/micro_unet_pastis.yaml")
    p.add_argument("--data-dir", default="data/demo")
    p.add_argument("--size", default="demo", choices=["tiny", "demo"])
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--runs-dir", default="runs")
    a = p.parse_args(argv)
    try:
        res = run_demo(a.config, a.data_dir, a.size, a.max_epochs, a.runs_dir)
    except TerratorchError as err:
        print(f"eoplugins demo: {err}", file=sys.stderr)
        return 1
    return 0 if res["test_mIoU"] > res["majority_mIoU"] else 1


if __name__ == "__main__":
    sys.exit(main())
