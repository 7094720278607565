"""LIANet demo pieces (metrics parsing, majority baseline, CLI entry), table learning rate, tunable budget."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import terratorch_eoplugins  # noqa: F401
from terratorch_eoplugins.analysis.lianet_demo import epoch_metric, majority_baseline, run_lianet_demo
from terratorch_eoplugins.tasks.lianet_pretrain import LIANetPretrainTask

SMALL = dict(levels=3, features_per_level=2, log2_table_size=10, base_resolution=8, growth=2.0, preproj_channels=8,
             trunk_hidden=8, trunk_blocks=1, trunk_out=8)
REPO = Path(__file__).resolve().parents[2]


def test_epoch_metric_reads_the_lightning_csv(tmp_path: Path) -> None:
    f = tmp_path / "metrics.csv"
    f.write_text("epoch,step,train/loss,val/PSNR\n0,7,0.3,\n0,7,,9.5\n1,15,0.2,\n1,15,,12.25\n")
    assert epoch_metric(f, "val/PSNR") == [(0, 9.5), (1, 12.25)]
    with pytest.raises(ValueError, match="val/SSIM"):
        epoch_metric(f, "val/SSIM")


def test_majority_baseline_scores_the_most_frequent_train_class(tiny_world_dir: Path) -> None:
    from terratorch_eoplugins.datamodules.lianet import LIANetPASTISDataModule

    over = {"root": str(tiny_world_dir / "PASTIS-R"), "tiles_root": str(tiny_world_dir / "S2_TILES"), "num_dates": 2}
    base = majority_baseline(REPO / "configs/data/pastis_lianet.yaml", over)
    piece = yaml.safe_load((REPO / "configs/data/pastis_lianet.yaml").read_text())["init_args"]
    dm = LIANetPASTISDataModule(**{**piece, **over})  # same samples (dates, max_cloud) as the baseline scores
    dm.setup("fit")
    dm.setup("test")
    train = np.concatenate([dm.train_dataset[i]["mask"].numpy().ravel() for i in range(len(dm.train_dataset))])
    test = np.concatenate([dm.test_dataset[i]["mask"].numpy().ravel() for i in range(len(dm.test_dataset))])
    train, test = train[train >= 0], test[test >= 0]
    majority = int(np.bincount(train).argmax())
    assert base["majority_class"] == majority and base["test_samples"] == len(dm.test_dataset)
    assert base["Pixel_Accuracy"] == pytest.approx(float((test == majority).mean()), abs=1e-6)
    # macro IoU: only the majority class scores (TP = its pixels, FP = all others, FN = 0), averaged over the
    # 19 classes or over the classes with a non-empty union (torchmetrics' handling of absent classes)
    iou_major = float((test == majority).mean())
    present = np.union1d(np.unique(test), [majority]).size
    assert any(base["mIoU"] == pytest.approx(iou_major / k, abs=1e-6) for k in (19, present)), base
    # macro F1: the majority class has precision = its test share, recall 1; every other class scores 0
    f1_major = 2 * iou_major / (1 + iou_major)
    assert any(base["F1_Score"] == pytest.approx(f1_major / k, abs=1e-6) for k in (19, present)), base


def test_lianet_demo_is_a_cli_command_and_checks_its_configs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from terratorch_eoplugins.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["lianet-demo", "--help"])
    assert exit_info.value.code == 0 and "--data-dir" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        run_lianet_demo(str(tmp_path / "world"), pretrain_config=str(tmp_path / "nope.yaml"))


def test_table_learning_rate_gets_its_own_group() -> None:
    task = LIANetPretrainTask("modified", SMALL, lr=1e-3, table_lr=2e-2, scheduler_hparams={"warmup": 0})
    task._trainer = types.SimpleNamespace(max_epochs=4, estimated_stepping_batches=8)  # what configure_optimizers reads
    task.generator = task.build_generator()
    opt = task.configure_optimizers()["optimizer"]
    rest, tables = opt.param_groups
    assert tables["lr"] == pytest.approx(2e-2) and rest["lr"] == pytest.approx(1e-3)
    assert tables["params"] == [task.generator.encoder.table]
    assert len(rest["params"]) == len(list(task.generator.parameters())) - 1
    single = LIANetPretrainTask("modified", SMALL, lr=1e-3, scheduler_hparams={"warmup": 0})
    single._trainer = task._trainer
    single.generator = single.build_generator()
    assert len(single.configure_optimizers()["optimizer"].param_groups) == 1
    with pytest.raises(ValueError, match="table_lr"):
        LIANetPretrainTask("modified", SMALL, table_lr=-1.0)


def test_lianet_modified_tunable_parameters_stay_below_one_million() -> None:
    """Supplement Table 3: LIANet-Modified fine-tunes 0.87M parameters (frozen generator + conv head)."""
    from terratorch.models import EncoderDecoderFactory

    # paper trunk (128 output channels) with tiny tables: the frozen tables do not change the tunable count
    model = EncoderDecoderFactory().build_model(
        task="segmentation", backbone="lianet_modified",
        backbone_generator_args={"levels": 2, "features_per_level": 2, "log2_table_size": 8},
        decoder="lianet_head", num_classes=19)
    tunable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_gen = [p.requires_grad for p in model.encoder.generator.parameters()]
    assert frozen_gen and not any(frozen_gen)
    assert model.encoder.out_channels == [128]
    assert 0.75e6 < tunable < 1e6, tunable
    x = torch.zeros(1, 1, 32, 32)
    out = model(x, origin_px=torch.tensor([[0.0, 0.0]]), time_days=torch.tensor([1500.0])).output
    assert out.shape == (1, 19, 32, 32)


def test_pastis_protocol_runs_every_tile_and_fold(tiny_world_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from terratorch_eoplugins.analysis.lianet_pastis_protocol import main, parse_tiles, protocol_commands, summarise
    from terratorch_eoplugins.datamodules.lianet import LIANetPASTISDataModule

    tiles = parse_tiles(["T31TFM=a.pt", "T32ULU=b.pt"])
    runs = protocol_commands(tiles, range(5), "configs/lianet_pastis.yaml", "P", "S", "runs")
    assert len(runs) == 10 and {(r["tile"], r["fold"]) for r in runs} == {(t, k) for t in tiles for k in range(5)}
    assert "--data.init_args.tiles=[T32ULU]" in runs[-1]["args"]
    assert "--model.init_args.model_args.backbone_ckpt_path=b.pt" in runs[-1]["args"]
    for bad in (["T31TFM"], ["=x.pt"], ["A=x", "A=y"]):
        with pytest.raises(ValueError, match="--tile"):
            parse_tiles(bad)
    with pytest.raises(ValueError, match="0..4"):
        protocol_commands(tiles, [5], "c.yaml", "P", "S", "runs")
    mean, std = summarise([{"test/mIoU": 0.2}, {"test/mIoU": 0.4}])["test/mIoU"]
    assert mean == pytest.approx(0.3) and std == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert main(["--tile", "T=x.pt", "--tiles-root", "S", "--pastis-root", "P", "--folds", "1", "--dry-run"]) == 0
    assert "fold_rotation=1" in capsys.readouterr().out
    # the overrides the protocol passes build disjoint train/val/test splits of the region's patches
    tile = sorted(p.name for p in (tiny_world_dir / "S2_TILES").iterdir() if p.is_dir())[0]
    ids = {}
    for k in (0, 3):
        dm = LIANetPASTISDataModule(root=str(tiny_world_dir / "PASTIS-R"), tiles_root=str(tiny_world_dir / "S2_TILES"),
                                    tiles=[tile], protocol="official", fold_rotation=k, outside="skip", num_dates=1)
        dm.setup("fit")
        dm.setup("test")
        split_ids = [{s["id"] for s in d.samples} for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset)]
        assert all(split_ids) and not (split_ids[0] & split_ids[1]) and not (split_ids[0] & split_ids[2])
        ids[k] = split_ids[2]
    assert ids[0] != ids[3]  # the test fold rotates
    with pytest.raises(ValueError, match="outside"):
        LIANetPASTISDataModule(outside="ignore")
