"""The S4 loss-ablation pieces (table 2a of the S4 paper: L_c only, L_r only, single-modal contrastive) run through
terratorch's CLI with the CPU profile of the pretraining config (fast_dev_run), on the tiny world."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
PIECES = {"s4_lc": {"reconstruction_weight": 0.0}, "s4_lr": {"contrastive_weight": 0.0},
          # two augmented views of the optical series, no radar, no reconstruction
          "s4_single_modal": {"mode": "single_modal", "single_modal_modality": "optical", "reconstruction_weight": 0.0,
                              "augment": {"gain_std": 0.1, "offset_std": 0.1, "noise_std": 0.1, "erase_prob": 0.5,
                                          "erase_frac": 0.25}}}


def test_each_piece_differs_from_the_paper_piece_only_in_its_ablation() -> None:
    base = yaml.safe_load((REPO / "configs" / "models" / "pretrain" / "s4.yaml").read_text())["init_args"]
    for name, change in PIECES.items():
        init = yaml.safe_load((REPO / "configs" / "models" / "pretrain" / f"{name}.yaml").read_text())["init_args"]
        differs = {k: init.get(k) for k in {*base, *init} if base.get(k) != init.get(k)}
        assert differs == change, (name, differs)


@pytest.mark.parametrize("piece", sorted(PIECES))
def test_ablation_piece_runs_through_the_cli(piece: str, tiny_world_dir: Path, tmp_path: Path) -> None:
    from terratorch.cli_tools import build_lightning_cli

    cfg = REPO / "configs"
    cli = build_lightning_cli([
        "fit", "-c", str(cfg / "s4_pretrain_pastis.yaml"),
        "--model", str(cfg / "models" / "pretrain" / f"{piece}.yaml"),
        "-c", str(cfg / "profiles" / "cpu" / "s4_pretrain_pastis.yaml"),
        f"--data.init_args.root={tiny_world_dir / 'PASTIS-R'}", "--data.init_args.crop_size=32",
        "--data.init_args.batch_size=2", "--trainer.fast_dev_run=true", "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}"], run=True)
    hp = cli.model.hparams
    assert all(hp[k] == v for k, v in PIECES[piece].items())
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
