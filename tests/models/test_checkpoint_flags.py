"""Pretrained weights of the plugin's models: one flag (``backbone_ckpt_path``), unknown keys are errors, one warning
when the weights are missing, and fine-tuned checkpoints that load after their pretraining file is deleted.

Each family is fine-tuned for one step through Lightning on tiny in-memory batches (or the tiny world for TS fusion),
saved by ``Trainer.save_checkpoint`` (so the callbacks' and the module's ``on_save_checkpoint`` run), its pretraining
file deleted, and restored with ``load_from_checkpoint``: the restored model must give the same outputs.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from terratorch.registry import BACKBONE_REGISTRY, DECODER_REGISTRY
from terratorch.tasks import PixelwiseRegressionTask, SemanticSegmentationTask
from torch.utils.data import Dataset

import terratorch_eoplugins  # noqa: F401
from terratorch_eoplugins.benchmark.spec import data_root_overrides, top_level_data_piece
from terratorch_eoplugins.models.dunia import DUNIA_VARIANTS, build_dunia
from terratorch_eoplugins.models.lianet import LIANetGenerator, save_generator
from terratorch_eoplugins.models.pretrained import PRETRAINED_FLAG, PROVENANCE_FLAG
from terratorch_eoplugins.models.s4 import S4Model
from terratorch_eoplugins.tasks.self_contained import SelfContainedCheckpoint

REPO = Path(__file__).resolve().parents[2]
LOGGER = "terratorch_eoplugins.models.pretrained"

LIANET_SMALL = dict(levels=4, features_per_level=2, log2_table_size=10, base_resolution=8, growth=2.0,
                    preproj_channels=8, trunk_hidden=8, trunk_blocks=1, trunk_out=8)
S4_WIDTHS = [4, 8, 8, 8]
#: a non-default DUNIA-tiny architecture: it must reach the restored model from the checkpoint, not the file
DUNIA_MICRO = dict(embed_dim=32, ffn_dim=64, num_heads=2, out_dim=8, na_kernel=5, na_heads=1)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> Iterator[None]:
    yield


class _Samples(Dataset):
    """``n`` samples made by ``make(i)`` (deterministic per index)."""

    def __init__(self, make: Callable[[int], dict[str, torch.Tensor]], n: int = 4) -> None:
        self.make, self.n = make, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.make(i)


def _fine_tune_and_save(task: pl.LightningModule, samples: Dataset, path: Path,
                        callbacks: list[pl.Callback] | None = None) -> dict[str, torch.Tensor]:
    """One training batch through Lightning (one optimisation step; the KNN task has no optimiser, so ``max_steps``
    would never be reached), then ``Trainer.save_checkpoint``; returns a batch."""
    dm = pl.LightningDataModule.from_datasets(train_dataset=samples, batch_size=2)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         num_sanity_val_steps=0,
                         callbacks=[SelfContainedCheckpoint()] if callbacks is None else callbacks)
    trainer.fit(task, dm)
    trainer.save_checkpoint(path)
    return next(iter(dm.train_dataloader()))


def _outputs(task: pl.LightningModule, batch: Mapping[str, Any]) -> torch.Tensor:
    task.eval()
    rest = {k: v for k, v in batch.items() if k not in ("image", "mask")}
    with torch.no_grad():
        return task(batch["image"], **rest).output


def _hparams(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)["hyper_parameters"]


# ------------------------------------------------------------------------------------------ pretraining files
def _lianet_pretraining(path: Path) -> Path:
    torch.manual_seed(0)
    gen = LIANetGenerator("modified", **LIANET_SMALL, region_size=64, region_shape=[64, 48],
                          acquisitions=[1500.5, 1600.5], region_crs="EPSG:32631",
                          region_transform=[10.0, 0.0, 500000.0, 0.0, -10.0, 4900000.0])
    return save_generator(gen, path)


def _lianet_sample(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {"image": torch.zeros(1, 16, 16), "mask": torch.randint(0, 3, (16, 16), generator=g),
            "origin_px": torch.tensor([4.0 * i, 8.0]), "time_days": torch.tensor(1500.5 + 100.0 * (i % 2))}


def _s4_pretraining(path: Path) -> Path:
    torch.manual_seed(0)
    model = S4Model({"optical": 4, "radar": 2}, S4_WIDTHS)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"widths": S4_WIDTHS, "n_specific": 2, "pool_time": True}}, path)
    return path


def _s4_sample(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {"image": torch.randn(4, 2, 16, 16, generator=g), "mask": torch.randint(0, 3, (16, 16), generator=g)}


def _dunia_pretraining(path: Path) -> Path:
    torch.manual_seed(0)
    model = build_dunia("tiny", **DUNIA_MICRO)
    torch.save({"state_dict": {f"model.image.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"variant": "tiny", "image_kwargs": DUNIA_MICRO}}, path)
    return path


def _dunia_sample(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    image = torch.randn(14, 16, 16, generator=g)
    mask = torch.full((16, 16), -1.0)
    mask[::3, ::3] = 10 + 3 * image[0, ::3, ::3]
    return {"image": image, "mask": mask}


# ------------------------------------------------------------------------------- self-contained checkpoints
def test_lianet_fine_tuned_checkpoint_loads_after_its_pretraining_file_is_deleted(tmp_path: Path) -> None:
    pre = _lianet_pretraining(tmp_path / "pre" / "generator.pt")
    args = {"backbone": "lianet_modified", "backbone_ckpt_path": str(pre), "backbone_generator_args": LIANET_SMALL,
            "decoder": "lianet_head", "decoder_channels": [8], "num_classes": 3}
    task = SemanticSegmentationTask(model_args=args, model_factory="EncoderDecoderFactory", loss="ce",
                                    ignore_index=-1, plot_on_val=False)
    batch = _fine_tune_and_save(task, _Samples(_lianet_sample), tmp_path / "ft.ckpt")
    shutil.rmtree(tmp_path / "pre")
    saved = _hparams(tmp_path / "ft.ckpt")["model_args"]
    assert saved[PRETRAINED_FLAG] is None and saved[PROVENANCE_FLAG] == str(pre.resolve())
    # the region metadata read from the pretraining file travels in the checkpoint
    assert saved["backbone_generator_args"]["region_shape"] == [64, 48]
    assert saved["backbone_generator_args"]["region_crs"] == "EPSG:32631"
    assert task.hparams["model_args"][PRETRAINED_FLAG] == str(pre)  # the live module is not changed
    restored = SemanticSegmentationTask.load_from_checkpoint(tmp_path / "ft.ckpt")
    torch.testing.assert_close(_outputs(restored, batch), _outputs(task, batch), rtol=0, atol=0)
    gen = restored.model.encoder.generator
    assert gen.region_extent() == (64, 48) and gen.acquisitions.tolist() == [1500.5, 1600.5]
    # the pretraining file would have been needed without the callback: that is what the callback fixes
    pre2 = _lianet_pretraining(tmp_path / "pre2" / "generator.pt")
    plain = SemanticSegmentationTask(model_args={**args, "backbone_ckpt_path": str(pre2)},
                                     model_factory="EncoderDecoderFactory", loss="ce", ignore_index=-1,
                                     plot_on_val=False)
    _fine_tune_and_save(plain, _Samples(_lianet_sample), tmp_path / "plain.ckpt", callbacks=[])
    shutil.rmtree(tmp_path / "pre2")
    with pytest.raises(FileNotFoundError, match="LIANet checkpoint not found"):
        SemanticSegmentationTask.load_from_checkpoint(tmp_path / "plain.ckpt")


def test_s4_fine_tuned_checkpoint_loads_after_its_pretraining_file_is_deleted(tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    pre = _s4_pretraining(tmp_path / "s4.ckpt")
    args = {"backbone": "s4_unet3d", "backbone_modality": "optical", "backbone_in_channels": 4,
            "backbone_widths": S4_WIDTHS, "backbone_ckpt_path": str(pre), "decoder": "IdentityDecoder",
            "num_classes": 3}
    task = SemanticSegmentationTask(model_args=args, model_factory="EncoderDecoderFactory", loss="ce",
                                    ignore_index=-1, plot_on_val=False)
    batch = _fine_tune_and_save(task, _Samples(_s4_sample), tmp_path / "ft.ckpt")
    pre.unlink()
    assert _hparams(tmp_path / "ft.ckpt")["model_args"][PROVENANCE_FLAG] == str(pre.resolve())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        restored = SemanticSegmentationTask.load_from_checkpoint(tmp_path / "ft.ckpt")
    assert not [r for r in caplog.records if "no pretrained weights" in r.getMessage()]
    torch.testing.assert_close(_outputs(restored, batch), _outputs(task, batch), rtol=0, atol=0)


def test_dunia_fine_tuned_checkpoint_keeps_the_architecture_of_the_deleted_file(tmp_path: Path) -> None:
    pre = _dunia_pretraining(tmp_path / "dunia.ckpt")
    args = {"backbone": "dunia_tiny", "backbone_ckpt_path": str(pre), "backbone_lowshot": True,
            "decoder": "dunia_lowshot_head", "decoder_embedding": "both", "head_dropout": 0.0}
    task = PixelwiseRegressionTask(model_args=args, model_factory="EncoderDecoderFactory", loss="mse",
                                   ignore_index=-1, plot_on_val=False)
    assert task.model.encoder.model.embed_dim == 32  # the file's architecture (not DUNIA-tiny's 64)
    batch = _fine_tune_and_save(task, _Samples(_dunia_sample), tmp_path / "ft.ckpt")
    pre.unlink()
    saved = _hparams(tmp_path / "ft.ckpt")["model_args"]
    assert {k: saved[f"backbone_{k}"] for k in DUNIA_MICRO} == {
        k: v for k, v in DUNIA_MICRO.items() if DUNIA_VARIANTS["tiny"][k] != v}
    restored = PixelwiseRegressionTask.load_from_checkpoint(tmp_path / "ft.ckpt")
    torch.testing.assert_close(_outputs(restored, batch), _outputs(task, batch), rtol=0, atol=0)


def test_dunia_zero_shot_checkpoint_loads_after_its_pretraining_file_is_deleted(tmp_path: Path) -> None:
    from terratorch_eoplugins.tasks.dunia_knn import DUNIAZeroShotKNNTask

    pre = _dunia_pretraining(tmp_path / "dunia.ckpt")
    task = DUNIAZeroShotKNNTask(backbone_ckpt_path=str(pre), keys="vertical", k_values=[1, 5], k=5,
                                na_backend="torch")
    batch = _fine_tune_and_save(task, _Samples(_dunia_sample), tmp_path / "knn.ckpt", callbacks=[])
    pre.unlink()
    hp = _hparams(tmp_path / "knn.ckpt")
    assert hp[PRETRAINED_FLAG] is None and hp[PROVENANCE_FLAG] == str(pre.resolve())
    assert hp["dunia_kwargs"] == {k: v for k, v in DUNIA_MICRO.items() if DUNIA_VARIANTS["tiny"][k] != v}
    restored = DUNIAZeroShotKNNTask.load_from_checkpoint(tmp_path / "knn.ckpt")
    assert len(restored.database) == len(task.database) > 0
    emb = task.embed(batch["image"])
    torch.testing.assert_close(restored.embed(batch["image"]), emb, rtol=0, atol=0)
    torch.testing.assert_close(restored.database.predict_map(emb, 5, restored.fingerprint),
                               task.database.predict_map(emb, 5, task.fingerprint))


def test_tsfusion_cropnet_checkpoint_loads_after_its_pretraining_file_is_deleted(tiny_world_dir: Path,
                                                                                 tmp_path: Path) -> None:
    from terratorch_eoplugins.datamodules.cropnet import CropNetDataModule
    from terratorch_eoplugins.tasks.tsfusion_cropnet import REQUIRED_KEYS, TSFusionCropNetTask
    from terratorch_eoplugins.tasks.tsfusion_pretrain import TSFusionPretrainTask

    common = dict(before=5, after=2, image_size=16, tokenizer_steps=2,
                  image_tokenizer_kwargs={"levels": [5, 4, 4], "hidden_dims": [8, 8]},
                  model_kwargs={"dim": 16, "encoder_depth": 1, "decoder_depth": 1})
    torch.manual_seed(0)
    pretrain = TSFusionPretrainTask(**common)
    pretrain.fit_tokenizers(torch.rand(16, 3, 16, 16), torch.randn(16, 4, 8))
    pre = tmp_path / "pre" / "tsfusion.ckpt"
    pre.parent.mkdir()
    torch.save({"state_dict": pretrain.state_dict()}, pre)
    dm = CropNetDataModule(tiny_world_dir / "CropNet", crop="Corn", grid_aggregation="none", normalize=False,
                           standardize_label=True, long_term_years=0, image_size=16, max_dates=2, batch_size=4,
                           batch_keys=list(REQUIRED_KEYS), window_weather=("tavg", "tmax", "tmin", "precip"),
                           window_before=5, window_after=2)
    task = TSFusionCropNetTask(backbone_ckpt_path=str(pre), hidden_dim=8, **common)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(task, dm)
    trainer.save_checkpoint(tmp_path / "ft.ckpt")
    shutil.rmtree(pre.parent)
    hp = _hparams(tmp_path / "ft.ckpt")
    assert hp[PRETRAINED_FLAG] is None and hp[PROVENANCE_FLAG] == str(pre.resolve())
    restored = TSFusionCropNetTask.load_from_checkpoint(tmp_path / "ft.ckpt")
    assert restored.tokenizers.fitted and not restored.needs_preparation()
    batch = next(iter(dm.val_dataloader()))
    task.eval()
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(batch), task(batch), rtol=0, atol=0)


# -------------------------------------------------------------------------------------- one flag, old names
@pytest.mark.parametrize(("cls", "old"), [("dunia_knn.DUNIAZeroShotKNNTask", "dunia_ckpt_path"),
                                          ("dunia_diffusion.DUNIAWaveformDiffusionTask", "dunia_ckpt_path"),
                                          ("tsfusion_cropnet.TSFusionCropNetTask", "pretrained_ckpt")])
def test_former_flag_names_are_errors_naming_backbone_ckpt_path(cls: str, old: str) -> None:
    import importlib

    module, name = cls.split(".")
    task_cls = getattr(importlib.import_module(f"terratorch_eoplugins.tasks.{module}"), name)
    with pytest.raises(ValueError, match=rf"{old} was renamed to backbone_ckpt_path.*"
                                         rf"--model\.init_args\.backbone_ckpt_path=runs/x\.ckpt"):
        task_cls(**{old: "runs/x.ckpt"})


def test_every_shipped_piece_and_sweep_uses_the_one_flag() -> None:
    old = ("dunia_ckpt_path", "pretrained_ckpt")
    files = [*(REPO / "configs").rglob("*.yaml"), *(REPO / "benchmarks" / "sweeps").glob("*.yaml")]
    offending = [f"{p.relative_to(REPO)}: {name}" for p in files for name in old if name in p.read_text()]
    assert not offending
    pieces = {"pastis/lianet", "burnscars/lianet", "pastis/s4_optical", "pastis/s4_radar", "pastis/dunia",
              "gedi/dunia"}
    for piece in pieces:
        init = yaml.safe_load((REPO / "configs" / "models" / f"{piece}.yaml").read_text())["init_args"]
        assert init["model_args"][PRETRAINED_FLAG] is None, piece
    for piece in ("pastis/dunia_zeroshot", "gedi/dunia_zeroshot", "gedi/dunia_waveform_diffusion", "cropnet/tsfusion"):
        init = yaml.safe_load((REPO / "configs" / "models" / f"{piece}.yaml").read_text())["init_args"]
        assert PRETRAINED_FLAG in init and init[PRETRAINED_FLAG] is None, piece


def test_sweep_with_a_former_flag_is_refused(tmp_path: Path) -> None:
    from terratorch_eoplugins.benchmark.spec import SweepSpecError, load_sweep

    text = (REPO / "benchmarks" / "sweeps" / "smoke.yaml").read_text()
    assert "ckpt_arg: model.init_args.backbone_ckpt_path" in text
    bad = tmp_path / "old.yaml"
    bad.write_text(text.replace("ckpt_arg: model.init_args.backbone_ckpt_path",
                                "ckpt_arg: model.init_args.dunia_ckpt_path"))
    with pytest.raises(SweepSpecError, match="dunia_ckpt_path was renamed to backbone_ckpt_path"):
        load_sweep(bad, repo=REPO)


# -------------------------------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize(("name", "kwargs", "key"), [
    ("lianet_modified", {"generator_args": LIANET_SMALL, "ckpt_pth": "x.pt"}, "backbone_ckpt_pth"),
    ("lianet_modified", {"generator_args": {**LIANET_SMALL, "levls": 3}}, "levls"),
    ("s4_unet3d", {"widths": S4_WIDTHS, "ckpt": "x.ckpt"}, "backbone_ckpt"),
    ("dunia_tiny", {"lowshott": True}, "backbone_lowshott"),
    ("tsfusion_tiny", {"with_decoders": False}, "backbone_with_decoders"),
    ("micro_unet", {"in_chanels": 4}, "backbone_in_chanels"),
])
def test_misspelt_backbone_keys_are_errors_listing_the_accepted_ones(name: str, kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"{name}: unknown .*{key}.*accepted: \[") as err:
        BACKBONE_REGISTRY.build(name, **kwargs)
    if key.startswith("backbone_") and name != "micro_unet":
        assert "'ckpt_path'" in str(err.value)  # the accepted keys are listed


def test_former_flag_in_model_args_points_to_backbone_ckpt_path() -> None:
    with pytest.raises(ValueError, match=r"backbone_pretrained_ckpt is now backbone_ckpt_path"):
        BACKBONE_REGISTRY.build("s4_unet3d", widths=S4_WIDTHS, backbone_pretrained_ckpt="x.ckpt")
    with pytest.raises(ValueError, match=r"pretrained_ckpt is now backbone_ckpt_path"):
        BACKBONE_REGISTRY.build("dunia_tiny", pretrained_ckpt="x.ckpt")


@pytest.mark.parametrize(("name", "kwargs", "key"), [("lianet_head", {"chanels": [8]}, "decoder_chanels"),
                                                     ("dunia_lowshot_head", {"embeding": "both"}, "decoder_embeding"),
                                                     ("tsfusion_head", {"hiden_dim": 8}, "decoder_hiden_dim")])
def test_misspelt_decoder_keys_are_errors(name: str, kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"{name}: unknown argument.*{key}.*accepted"):
        DECODER_REGISTRY.build(name, [16, 16], **kwargs)


def test_misspelt_key_in_a_terratorch_task_fails_the_build() -> None:
    args = {"backbone": "lianet_modified", "backbone_ckpt_pth": "x.pt", "backbone_generator_args": LIANET_SMALL,
            "decoder": "lianet_head", "num_classes": 3}
    with pytest.raises(ValueError, match="backbone_ckpt_pth.*accepted.*'ckpt_path'"):
        SemanticSegmentationTask(model_args=args, model_factory="EncoderDecoderFactory", loss="ce", ignore_index=-1)


# ----------------------------------------------------------------------------------------- missing weights
def _no_weights_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "no pretrained weights" in r.getMessage()]


@pytest.mark.parametrize(("build", "family", "flag"), [
    (lambda: BACKBONE_REGISTRY.build("lianet_modified", generator_args=LIANET_SMALL), "lianet_modified",
     "model_args.backbone_ckpt_path"),
    (lambda: BACKBONE_REGISTRY.build("s4_unet3d", widths=S4_WIDTHS), "S4", "model_args.backbone_ckpt_path"),
    (lambda: BACKBONE_REGISTRY.build("dunia_tiny", lowshot=True, **DUNIA_MICRO), "DUNIA",
     "model_args.backbone_ckpt_path"),
    (lambda: BACKBONE_REGISTRY.build("tsfusion_tiny"), "TS fusion", "model_args.backbone_ckpt_path"),
])
def test_missing_pretrained_weights_warn_once_naming_the_flag(build: Callable[[], Any], family: str, flag: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        build()
    (message,) = _no_weights_records(caplog)
    assert message.startswith(f"{family}") and f"({flag} is null)" in message


def test_the_plugin_tasks_warn_once_naming_their_flag(caplog: pytest.LogCaptureFixture) -> None:
    from terratorch_eoplugins.tasks.dunia_knn import DUNIAZeroShotKNNTask
    from terratorch_eoplugins.tasks.tsfusion_cropnet import TSFusionCropNetTask

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        DUNIAZeroShotKNNTask(dunia_kwargs=DUNIA_MICRO)
    (message,) = _no_weights_records(caplog)
    assert message == ("DUNIA: no pretrained weights (backbone_ckpt_path is null): the frozen DUNIA-tiny encoder is "
                       "random, so are its embeddings; pass a DUNIA pretraining checkpoint "
                       "(configs/dunia_pretrain.yaml) as --model.init_args.backbone_ckpt_path")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        TSFusionCropNetTask(before=5, after=2, image_size=16, model_kwargs={"dim": 16, "encoder_depth": 1})
    (message,) = _no_weights_records(caplog)
    assert message.startswith("TS fusion: no pretrained weights (backbone_ckpt_path is null)")


def test_dunia_pastis_warns_that_its_frozen_encoder_is_random(caplog: pytest.LogCaptureFixture) -> None:
    """The shipped dunia_pastis piece without a checkpoint: one warning (it used to say nothing)."""
    init = yaml.safe_load((REPO / "configs" / "models" / "pastis" / "dunia.yaml").read_text())["init_args"]
    init.pop("class_names")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        SemanticSegmentationTask(**init)
    (message,) = _no_weights_records(caplog)
    variant = init["model_args"]["backbone"].removeprefix("dunia_")  # the paper's base at the shipped scale
    assert variant == "base"
    assert message.startswith("DUNIA: no pretrained weights (model_args.backbone_ckpt_path is null): the frozen "
                              f"DUNIA-{variant} encoder is random")


# ------------------------------------------------------------------------------------------ the real CLI
@pytest.mark.slow
def test_lianet_checkpoint_tests_from_another_folder_after_the_pretraining_file_is_gone(
        tiny_world_dir: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """The issue's command: ``cd elsewhere && terratorch test -c .../configs/lianet_pastis.yaml --ckpt_path
    .../last.ckpt --model.init_args.model_args.backbone_ckpt_path <relative path>``."""
    exe = shutil.which("terratorch", path=str(Path(sys.executable).parent))
    assert exe
    config = REPO / "configs" / "lianet_pastis.yaml"
    profile = REPO / "configs" / "profiles" / "cpu" / "lianet_pastis.yaml"  # CPU size; the flag comes after it
    piece = yaml.safe_load(profile.read_text())
    gen_args = piece["model"]["init_args"]["model_args"]["backbone_generator_args"]
    fit_dir, other = tmp_path / "fit", tmp_path / "elsewhere"
    fit_dir.mkdir()
    other.mkdir()
    torch.manual_seed(0)
    save_generator(LIANetGenerator("modified", **gen_args), fit_dir / "pre" / "lianet_generator.pt")
    data = data_root_overrides(top_level_data_piece(config), str(tiny_world_dir))
    quick = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
             "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false"]
    flag = "--model.init_args.model_args.backbone_ckpt_path=pre/lianet_generator.pt"  # relative to fit_dir
    env = {**cli_env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), cli_env.get("PYTHONPATH")]))}
    fit = subprocess.run([exe, "fit", "-c", str(config), "-c", str(profile), *data, *quick, flag], cwd=fit_dir,
                         env=env, capture_output=True, text=True, timeout=900)
    assert fit.returncode == 0, fit.stderr[-4000:]
    (ckpt,) = [p for p in fit_dir.rglob("last.ckpt")]
    shutil.rmtree(fit_dir / "pre")
    test = subprocess.run([exe, "test", "-c", str(config), "-c", str(profile), *data, *quick, f"--ckpt_path={ckpt}",
                           flag], cwd=other, env=env, capture_output=True, text=True, timeout=900)
    assert test.returncode == 0, test.stderr[-4000:]
    assert "test/mIoU" in test.stdout + test.stderr
    assert "not found" not in test.stderr and "no pretrained weights" not in test.stderr
