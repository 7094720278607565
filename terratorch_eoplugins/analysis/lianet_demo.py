"""LIANet end-to-end demo: pretrain on the demo region's Sentinel-2 tiles, fine-tune on demo PASTIS, compare.

One command (``eoplugins lianet-demo --data-dir data/demo``, ``make lianet-demo``) that, like
:mod:`terratorch_eoplugins.analysis.demo`, runs the real terratorch CLI in subprocesses exactly as a user would:

1. writes the synthetic demo world if absent (S2 tiles of the region + PASTIS-R cut from the same world);
2. ``terratorch fit -c configs/lianet_pretrain_pastis.yaml`` (coordinate-only reconstruction of the
   region's tiles; LIANet supplement section 8);
3. ``terratorch fit -c configs/lianet_pastis.yaml --model.init_args.model_args.backbone_ckpt_path <ckpt>``
   (frozen generator + conv head on (date x patch) samples; supplement section 10) and
   ``terratorch test`` with the fine-tuning checkpoint of the best validation loss;
4. prints the pretraining validation PSNR of the first and last epoch, the fine-tuning test mIoU and pixel
   accuracy and those of the majority-class baseline (the train split's most frequent class, scored with
   the same torchmetrics metrics on the same test samples).

Returns exit status 0 only if the PSNR rose, the test mIoU beats the baseline's and the test pixel accuracy is
not below the baseline's.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from terratorch_eoplugins.analysis.demo import best_checkpoint, data_piece, majority_baseline, run_stage
from terratorch_eoplugins.runtime import read_last_metrics

PRETRAIN_CONFIG = "configs/lianet_pretrain_pastis.yaml"
FINETUNE_CONFIG = "configs/lianet_pastis.yaml"
#: the CPU profiles (overlays) the demo runs the paper-scale configs with
PRETRAIN_PROFILE = "configs/profiles/cpu/lianet_pretrain_pastis.yaml"
FINETUNE_PROFILE = "configs/profiles/cpu/lianet_pastis.yaml"


def profile_args(profile: str | None) -> list[str]:
    """``["-c", profile]`` (an overlay right after the config), or nothing for ``None`` / ``""`` (paper scale)."""
    if not profile:
        return []
    if not Path(profile).is_file():
        raise FileNotFoundError(f"profile {profile!r} not found (run from the repository root or pass its path)")
    return ["-c", profile]


def profile_data_args(profile: str | None) -> dict:
    """The ``data.init_args`` a profile overlays (so a baseline scored beside the run sees the same samples)."""
    if not profile:
        return {}
    cfg = yaml.safe_load(Path(profile).read_text()) or {}
    return dict((cfg.get("data") or {}).get("init_args") or {})


def epoch_metric(metrics_csv: Path, key: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` of every row of a Lightning CSVLogger file that has ``key`` (in file order)."""
    out: list[tuple[int, float]] = []
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get(key) not in ("", None):
                out.append((int(float(row.get("epoch") or 0)), float(row[key])))
    if not out:
        raise ValueError(f"{metrics_csv}: no {key!r} values logged")
    return out


def _pretrain(config: str, tiles_root: str, log: list[str], name: str, stamp: str, extra: Sequence[str],
              epochs: int | None, runs_dir: str, env: dict[str, str],
              profile: str | None = PRETRAIN_PROFILE) -> tuple[Path, Path, float, list[tuple[int, float]]]:
    """``terratorch fit`` of the pretraining config; returns (generator file, log dir, seconds, val PSNR per epoch)."""
    pre_dir, seconds = run_stage("fit", config, [*profile_args(profile), f"--data.init_args.root={tiles_root}", *log,
                                                 *extra], runs_dir, name, f"fit-{stamp}", env, epochs)
    ckpt = pre_dir / "lianet_generator.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"pretraining wrote no {ckpt}")
    return ckpt, pre_dir, seconds, epoch_metric(pre_dir / "metrics.csv", "val/PSNR")


def run_lianet_demo(data_dir: str = "data/demo", size: str = "demo", runs_dir: str = "runs",
                    pretrain_config: str = PRETRAIN_CONFIG, finetune_config: str = FINETUNE_CONFIG,
                    pretrain_epochs: int | None = None, finetune_epochs: int | None = None,
                    extra_pretrain: Sequence[str] = (), extra_finetune: Sequence[str] = (),
                    pretrained: str | None = None, pretrain_profile: str | None = PRETRAIN_PROFILE,
                    finetune_profile: str | None = FINETUNE_PROFILE) -> dict[str, float]:
    """Write the world if absent, pretrain, fine-tune and test through the terratorch CLI; print a summary.

    ``pretrained``: an existing pretraining checkpoint of the demo region; skips step 1 (no PSNR reported).
    ``pretrain_profile`` / ``finetune_profile``: overlays after the configs (default: the CPU profiles; ``None``:
    the paper-scale configs as they are, a GPU job).
    """
    from terratorch_eoplugins.synthetic import write_world

    for cfg in (pretrain_config, finetune_config):
        if not Path(cfg).is_file():
            raise FileNotFoundError(f"config {cfg!r} not found (run from the repository root or pass its path)")
    t0 = time.perf_counter()
    written = write_world(data_dir, size=size, products=["s2_tiles", "s1_tiles", "pastis"])
    pastis_root = str(written["pastis"])
    tiles_root = str(Path(written["s2_tiles"]).parent)
    world_s = time.perf_counter() - t0
    print(f"synthetic world ({size}) ready in {data_dir} [{world_s:.0f} s]", flush=True)

    env = dict(os.environ)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log = ["--trainer.enable_progress_bar=false"]

    # 1. pretraining
    pre_name, pre_s, psnr = "lianet_demo_pretrain", 0.0, [(-1, float("nan"))]
    if pretrained is not None:
        ckpt = Path(pretrained)
        if not ckpt.is_file():
            raise FileNotFoundError(f"--pretrained checkpoint {pretrained!r} not found")
        pre_dir = ckpt.parent
    else:
        ckpt, pre_dir, pre_s, psnr = _pretrain(pretrain_config, tiles_root, log, pre_name, stamp, extra_pretrain,
                                               pretrain_epochs, runs_dir, env, pretrain_profile)

    # 2. fine-tuning + test
    ft_name = "lianet_demo_pastis"
    data_over = [f"--data.init_args.root={pastis_root}", f"--data.init_args.tiles_root={tiles_root}"]
    model_over = [f"--model.init_args.model_args.backbone_ckpt_path={ckpt}"]
    # the profile first: a later -c file replaces the whole model_args, the checkpoint flag included
    over = [*profile_args(finetune_profile), *data_over, *model_over, *log]
    ft_dir, ft_s = run_stage("fit", finetune_config, [*over, *extra_finetune], runs_dir, ft_name, f"fit-{stamp}", env,
                             finetune_epochs)
    best = best_checkpoint(ft_dir)
    test_dir, test_s = run_stage("test", finetune_config, [*over, f"--ckpt_path={best}", *extra_finetune], runs_dir,
                                 ft_name, f"test-{stamp}", env)
    metrics = read_last_metrics(test_dir / "metrics.csv")
    base = majority_baseline(data_piece(finetune_config), {**profile_data_args(finetune_profile), "root": pastis_root,
                                                           "tiles_root": tiles_root})
    total = time.perf_counter() - t0

    miou = metrics.get("test/mIoU", float("nan"))
    print("\n================ LIANet demo summary ================")
    print(f"time              world {world_s:.0f} s, pretrain {pre_s:.0f} s, fine-tune {ft_s:.0f} s, "
          f"test {test_s:.0f} s (total {total:.0f} s)")
    print(f"pretraining       {pre_dir}  (generator {ckpt})")
    if pretrained is None:
        print(f"val/PSNR          epoch {psnr[0][0]}: {psnr[0][1]:.2f} dB -> epoch {psnr[-1][0]}: {psnr[-1][1]:.2f} dB "
              f"(best {max(v for _, v in psnr):.2f} dB)")
    print(f"fine-tuning       {ft_dir}  (best {best.name})")
    for key in ("test/mIoU", "test/Pixel_Accuracy", "test/F1_Score"):
        if key in metrics:
            print(f"{key:21s}{metrics[key]:.4f}")
    print(f"majority baseline mIoU {base['mIoU']:.4f}  pixel acc {base['Pixel_Accuracy']:.4f}  "
          f"F1 {base['F1_Score']:.4f}  (always class {base['majority_class']}, {base['test_samples']} test samples)")
    verdict = "ABOVE" if miou > base["mIoU"] else "NOT above"
    print(f"test mIoU {miou:.4f} is {verdict} the majority-class baseline {base['mIoU']:.4f} "
          f"({miou / max(base['mIoU'], 1e-12):.1f}x)")
    acc = metrics.get("test/Pixel_Accuracy", float("nan"))
    print(f"test pixel accuracy {acc:.4f} is {'not below' if acc >= base['Pixel_Accuracy'] else 'BELOW'} the "
          f"baseline's {base['Pixel_Accuracy']:.4f}")
    return {"psnr_first": psnr[0][1], "psnr_last": psnr[-1][1], "test_mIoU": miou,
            "test_pixel_accuracy": acc, "test_F1": metrics.get("test/F1_Score", float("nan")),
            "majority_mIoU": base["mIoU"],
            "majority_pixel_accuracy": base["Pixel_Accuracy"], "majority_F1": base["F1_Score"], "seconds": total}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eoplugins lianet-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data/demo")
    p.add_argument("--size", default="demo", choices=["tiny", "demo"])
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--pretrain-config", default=PRETRAIN_CONFIG)
    p.add_argument("--finetune-config", default=FINETUNE_CONFIG)
    p.add_argument("--pretrain-profile", default=PRETRAIN_PROFILE,
                   help="overlay after the pretraining config (default: the CPU profile; '' = paper scale)")
    p.add_argument("--finetune-profile", default=FINETUNE_PROFILE,
                   help="overlay after the fine-tuning config (default: the CPU profile; '' = paper scale)")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="override the pretraining config's max_epochs")
    p.add_argument("--finetune-epochs", type=int, default=None, help="override the fine-tuning config's max_epochs")
    p.add_argument("--pretrained", default=None,
                   help="reuse this pretraining checkpoint of the demo region (skips pretraining)")
    a = p.parse_args(argv)
    res = run_lianet_demo(a.data_dir, a.size, a.runs_dir, a.pretrain_config, a.finetune_config, a.pretrain_epochs,
                          a.finetune_epochs, pretrained=a.pretrained, pretrain_profile=a.pretrain_profile,
                          finetune_profile=a.finetune_profile)
    ok = (res["test_mIoU"] > res["majority_mIoU"] and res["test_pixel_accuracy"] >= res["majority_pixel_accuracy"]
          and (a.pretrained is not None or res["psnr_last"] > res["psnr_first"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
