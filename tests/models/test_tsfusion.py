"""TS fusion (Basile et al. 2025): budgets, masks, decoding, head, pooling, data pairs, tasks and bad input."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from terratorch_eoplugins.datamodules.tsfusion import TSFusionPretrainDataModule
from terratorch_eoplugins.datasets.tsfusion import extract_pairs
from terratorch_eoplugins.datasets.weather_windows import weather_windows
from terratorch_eoplugins.errors import EODataError
from terratorch_eoplugins.models.tsfusion import (
    ModalitySpec,
    TSFusionHead,
    TSFusionModel,
    TSFusionRegressor,
    load_tsfusion_weights,
    pool_tokens,
    sample_token_budgets,
    sample_token_masks,
)

MODS = [ModalitySpec("image", "image", 12, 9, "image"), ModalitySpec("weather_a", "seq", 10, 8, "weather"),
        ModalitySpec("weather_b", "seq", 10, 8, "weather")]


def _tiny(with_decoder: bool = True, mods=MODS) -> TSFusionModel:  # noqa: ANN001
    torch.manual_seed(0)
    return TSFusionModel(mods, dim=32, encoder_depth=1, decoder_depth=1, num_heads=4, with_decoder=with_decoder)


def _tokens(b: int, mods=MODS, seed: int = 0) -> dict[str, torch.Tensor]:  # noqa: ANN001
    g = torch.Generator().manual_seed(seed)
    return {s.name: torch.randint(0, s.vocab_size, (b, s.num_tokens), generator=g) for s in mods}


# ------------------------------------------------------------------------------------------ budgets
@pytest.mark.parametrize("use_generator", [False, True])
def test_dirichlet_budgets_respect_budget_limits_and_dirichlet_mean(use_generator: bool) -> None:
    torch.manual_seed(0)
    alphas = torch.tensor([1.0, 2.0, 3.0])
    limits = torch.tensor([1000, 1000, 5])
    gen = torch.Generator().manual_seed(0) if use_generator else None
    n = sample_token_budgets(alphas, 60, limits, 4000, gen)
    assert n.dtype == torch.long and n.shape == (4000, 3)
    assert bool((n >= 0).all()) and bool((n.sum(1) <= 60).all()) and bool((n <= limits).all())
    # without clamping, floor loses < 1 token per modality; the Dirichlet mean is alpha / sum(alpha)
    free = sample_token_budgets(alphas, 600, torch.tensor([10**6] * 3), 4000, gen)
    assert bool((free.sum(1) > 600 - 3).all())
    mean = free.double().mean(0) / 600
    assert torch.allclose(mean, alphas.double() / 6, atol=0.02)
    # small alpha (paper: 0.5) gives the heavier Dirichlet variance alpha_i(a0 - alpha_i) / (a0^2 (a0 + 1))
    half = sample_token_budgets(torch.full((2,), 0.5), 1000, torch.tensor([10**6] * 2), 8000, gen).double() / 1000
    assert abs(half[:, 0].var().item() - 0.25 / 2) < 0.02


def test_budget_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="positive"):
        sample_token_budgets(torch.tensor([0.5, 0.0]), 10, torch.tensor([5, 5]), 2)
    with pytest.raises(ValueError, match="modalities"):
        sample_token_budgets(torch.tensor([0.5, 0.5]), 10, torch.tensor([5, 5, 5]), 2)


def test_masks_are_disjoint_with_the_requested_counts() -> None:
    n_in = torch.tensor([[3, 8, 0], [9, 2, 5]])
    n_tg = torch.tensor([[9, 4, 2], [4, 9, 8]])
    ins, tgts = sample_token_masks(n_in, n_tg, [9, 8, 8], torch.Generator().manual_seed(1))
    for m, n_m in enumerate([9, 8, 8]):
        assert not bool((ins[m] & tgts[m]).any())
        assert ins[m].sum(1).tolist() == n_in[:, m].clamp(max=n_m).tolist()
        expect_t = torch.minimum(n_tg[:, m], n_m - n_in[:, m].clamp(max=n_m))
        assert tgts[m].sum(1).tolist() == expect_t.tolist()


# ------------------------------------------------------------------------------------------ model
def test_targets_and_loss_are_consistent_with_an_independent_cross_entropy() -> None:
    model = _tiny()
    tok = _tokens(3)
    ins = {s.name: torch.zeros(3, s.num_tokens, dtype=torch.bool) for s in MODS}
    tgt = {s.name: torch.zeros(3, s.num_tokens, dtype=torch.bool) for s in MODS}
    ins["image"][:] = True  # image -> weather_a only
    tgt["weather_a"][:, [1, 4, 6]] = True
    out = model.correlation_loss(tok, ins, tgt)
    assert set(out) == {"loss", "loss_weather_a", "acc_weather_a"}
    # independent: decoder states from the public pieces, CE over the three target positions of each sample
    ctx, _, c_valid = model.encode(tok, ins)
    q, q_ids, q_tok, q_valid, q_pos = model._decoder_queries(tok, tgt)
    assert q_pos[0].tolist() == [1, 4, 6] and torch.equal(q_tok, tok["weather_a"][:, [1, 4, 6]])
    logits = model.heads["weather_a"](model.run_decoder(q, q_ids, q_valid, ctx, c_valid))
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 10), tok["weather_a"][:, [1, 4, 6]].reshape(-1))
    assert torch.allclose(out["loss"], ce, atol=1e-6)
    with pytest.raises(ValueError, match="overlap"):
        model.correlation_loss(tok, ins, {**tgt, "image": ins["image"]})


def test_sequence_decoding_is_causal_and_image_decoding_ignores_target_ids() -> None:
    model = _tiny().eval()
    tok = _tokens(2)
    tgt = {"weather_a": torch.ones(2, 8, dtype=torch.bool), "image": torch.ones(2, 9, dtype=torch.bool)}
    ctx, _, c_valid = model.encode({"weather_b": tok["weather_b"]})

    def states(t: dict[str, torch.Tensor]) -> torch.Tensor:
        q, ids, _, valid, _ = model._decoder_queries(t, tgt)
        return model.run_decoder(q, ids, valid, ctx, c_valid)

    changed = {k: v.clone() for k, v in tok.items()}
    changed["weather_a"][:, 5:] = (changed["weather_a"][:, 5:] + 1) % 10
    changed["image"] = (changed["image"] + 1) % 12
    h0, h1 = states(tok), states(changed)
    # packed order: image queries (9, mask tokens: never see target ids), then weather_a positions 0..7, whose
    # queries see tokens before their position only (token 5 enters query 6)
    assert torch.allclose(h0[:, :9], h1[:, :9], atol=1e-6)
    assert torch.allclose(h0[:, 9:15], h1[:, 9:15], atol=1e-6)
    assert not torch.allclose(h0[:, 15:17], h1[:, 15:17])


def test_joint_generation_equals_one_modality_at_a_time() -> None:
    model = _tiny().eval()
    tok = _tokens(3)
    given = {"image": tok["image"]}
    joint = model.generate(given, ["weather_a", "weather_b"], banned_ids=[9])
    alone = model.generate(given, "weather_b", banned_ids=[9])
    assert torch.equal(joint["weather_b"], alone)
    assert int(joint["weather_a"].max()) < 9 and int(alone.max()) < 9


def test_correlation_learning_loss_decreases_and_beats_chance(one_torch_thread) -> None:  # noqa: ANN001
    """Weather tokens are a deterministic function of the image tokens: the model must learn the correlation."""
    torch.manual_seed(0)
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    b = 32

    def batch() -> dict[str, torch.Tensor]:
        c = torch.randint(0, 10, (b, 1))
        img = (c + 12 * (torch.rand(b, 9) < 0.2)).clamp(max=11)  # the class c with 20 % noise tokens (11)
        w = (c + torch.arange(8)[None]) % 10  # weather_a series starts at the image's class
        return {"image": img, "weather_a": w, "weather_b": (w * 3) % 10}

    def loss_of(t: dict[str, torch.Tensor]) -> torch.Tensor:
        ins = {"image": torch.ones(b, 9, dtype=torch.bool), "weather_a": torch.zeros(b, 8, dtype=torch.bool),
               "weather_b": torch.zeros(b, 8, dtype=torch.bool)}
        tgt = {"image": torch.zeros(b, 9, dtype=torch.bool), "weather_a": torch.ones(b, 8, dtype=torch.bool),
               "weather_b": torch.ones(b, 8, dtype=torch.bool)}
        return model.correlation_loss(t, ins, tgt)["loss"]

    with torch.no_grad():
        first = float(loss_of(batch()))
    for _ in range(120):
        loss = loss_of(batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = batch()
    gen = model.generate({"image": test["image"]}, "weather_a")
    acc = float((gen == test["weather_a"]).float().mean())
    with torch.no_grad():
        assert float(loss_of(test)) < 0.5 * first
    assert acc > 0.5  # chance is 0.1


def test_head_residual_is_scaled_by_0_1() -> None:
    torch.manual_seed(0)
    head = TSFusionHead(16, 2, hidden_dim=8, dropout=0.0)
    z = torch.randn(5, 16)
    with torch.no_grad():
        head.mlp[-1].weight.zero_()
        head.mlp[-1].bias.zero_()
    assert torch.allclose(head(z), 0.1 * z @ head.residual.weight.T, atol=1e-6)
    head2 = TSFusionHead(16, 1, residual_scale=0.0, dropout=0.0)
    assert torch.allclose(head2(z), head2.mlp(z))


def test_mp_and_mmp_pooling_formulas() -> None:
    z = torch.randn(4, 6, 3)
    groups = torch.tensor([0, 0, 1, 1, 1, 1])
    assert torch.allclose(pool_tokens(z, groups, "mp", 2), z.mean(1))
    mmp = torch.cat([z[:, :2].mean(1), z[:, 2:].mean(1)], -1)
    assert torch.allclose(pool_tokens(z, groups, "mmp", 2), mmp)
    with pytest.raises(ValueError, match="pooling"):
        pool_tokens(z, groups, "max", 2)  # type: ignore[arg-type]


@pytest.mark.parametrize("pooling", ["mp", "mmp"])
def test_regressor_pools_tokens_then_valid_grids_and_dates(pooling: str) -> None:
    enc = _tiny(with_decoder=False)
    reg = TSFusionRegressor(enc, pooling, hidden_dim=8, dropout=0.0).eval()
    tok = {k: v.reshape(2, 3, -1) for k, v in _tokens(6).items()}
    valid = torch.tensor([[True, True, False], [True, False, False]])
    pred = reg(tok, valid)
    feats = []
    for b in range(2):
        per = []
        for s in range(3):
            if not valid[b, s]:
                continue
            z, _, _ = enc.encode({k: v[b, s][None] for k, v in tok.items()})
            z = z[0]
            per.append(z.mean(0) if pooling == "mp" else torch.cat([z[:9].mean(0), z[9:].mean(0)]))
        feats.append(torch.stack(per).mean(0))
    assert torch.allclose(pred, reg.head(torch.stack(feats)), atol=1e-5)
    assert reg.head.mlp[1].in_features == 32 * (2 if pooling == "mmp" else 1)
    with pytest.raises(ValueError, match="no grids"):
        reg(tok, torch.tensor([[True, False, False], [False, False, False]]))


def test_registered_builders_and_weight_loading(tmp_path: Path) -> None:
    from terratorch.registry import BACKBONE_REGISTRY, DECODER_REGISTRY

    import terratorch_eoplugins  # noqa: F401

    model = BACKBONE_REGISTRY.build("tsfusion_tiny", modalities=[m.__dict__ for m in MODS])
    assert model.out_channels == [64]
    out = model(_tokens(2))
    assert out[0].shape == (2, 25, 64)
    head = DECODER_REGISTRY.build("tsfusion_head", [64], num_outputs=1)
    assert head(out).shape == (2, 1) and head.out_channels == 1
    path = tmp_path / "w.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    enc = BACKBONE_REGISTRY.build("tsfusion_tiny", modalities=MODS, with_decoder=False, ckpt_path=str(path))
    assert torch.equal(enc.enc_tok["image"].weight, model.enc_tok["image"].weight)
    wrong = TSFusionModel([ModalitySpec("image", "image", 13, 9)], dim=64, encoder_depth=2, decoder_depth=0,
                          num_heads=4, with_decoder=False)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_tsfusion_weights(wrong, str(path))
    with pytest.raises(ValueError, match="no public"):
        BACKBONE_REGISTRY.build("tsfusion_tiny", modalities=MODS, pretrained=True)


# ------------------------------------------------------------------------------------------ data pairs
def _sample(g: int = 2, dates=("2021-04-01", "2021-06-15"), nan: bool = False) -> dict:  # noqa: ANN001
    months = (4, 5, 6)
    ws = torch.arange(3 * 31 * g * 2, dtype=torch.float32).reshape(3, 31, g, 2)
    if nan:
        ws[1, 3, 0, 0] = float("nan")
    return {"image": torch.rand(len(dates), g, 3, 8, 8), "weather_short": ws,
            "weather_short_mask": torch.ones(3, 31, dtype=torch.bool), "dates": list(dates),
            "grid_coords": torch.rand(g, 2, 2), "fips": "19001", "year": 2021, "n_grids": g}, months


def test_weather_windows_follow_the_calendar_and_shift_inside_the_season() -> None:
    s, months = _sample()
    wins, frac, off = weather_windows(s["weather_short"], s["weather_short_mask"], s["dates"], months, 5, 2)
    assert wins.shape == (2, 2, 2, 8)
    # independent: consecutive calendar days Apr 1..Jun 30 (30 + 31 + 30 days)
    days = [(mi, d) for mi, m in enumerate(months) for d in range([30, 31, 30][mi])]
    seq = torch.stack([s["weather_short"][mi, d] for mi, d in days])  # [N, G, V]
    pos = days.index((2, 14))  # June 15
    assert torch.equal(wins[1], seq[pos - 5:pos + 3].permute(1, 2, 0))
    assert off.tolist() == [0, 5]  # April 1 has no 5 days before inside the season: window shifted
    assert torch.equal(wins[0], seq[0:8].permute(1, 2, 0))
    assert torch.allclose(frac, torch.ones(2))


def test_extract_pairs_and_bad_samples() -> None:
    s, months = _sample()
    p = extract_pairs(s, months, None, 5, 2)
    assert p["image"].shape == (4, 3, 8, 8) and p["weather"].shape == (4, 2, 8)
    assert torch.equal(p["image"][1], s["image"][0, 1])  # date-major order
    no_grid, _ = _sample(g=0)
    with pytest.raises(EODataError, match="no grids"):
        extract_pairs(no_grid, months)
    bad, _ = _sample(nan=True)
    with pytest.raises(EODataError, match="non-finite"):
        extract_pairs(bad, months, None, 5, 2)
    unmatched, _ = _sample()
    unmatched["weather_short"] = unmatched["weather_short"][:, :, :1]  # an image grid without weather
    with pytest.raises(EODataError, match="every image grid needs its weather"):
        extract_pairs(unmatched, months, None, 5, 2)
    late, _ = _sample(dates=("2021-09-01",))
    with pytest.raises(EODataError, match="outside the weather months"):
        extract_pairs(late, months, None, 5, 2)


@pytest.fixture(scope="module")
def cropnet_copy(tiny_world_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny CropNet tree with bad weather: one month's cells blanked, one state-month CSV removed."""
    root = tmp_path_factory.mktemp("tsf") / "CropNet"
    shutil.copytree(tiny_world_dir / "CropNet", root)
    hrrr = root / "WRF-HRRR Computed Dataset" / "data" / "2021"
    csv = hrrr / "IA" / "HRRR_19_IA_2021-06.csv"
    df = pd.read_csv(csv)
    daily = df["Daily/Monthly"] == "Daily"
    rows = df.index[daily & (df["Day"] <= 20)]
    df.loc[rows, "Avg Temperature (K)"] = np.nan  # 20 days of missing cells in every IA county
    df.to_csv(csv, index=False)
    (hrrr / "TX" / "HRRR_48_TX_2021-07.csv").unlink()  # TX images of 2021 have no weather
    return root


def test_pretrain_pairs_handle_missing_cells_and_images_without_weather(cropnet_copy: Path) -> None:
    dm = TSFusionPretrainDataModule(cropnet_copy, crops=["Corn"], split_years={"train": (2021,), "val": (2021,)},
                                    before=5, after=2, image_size=16, min_observed=0.9)
    pairs = dm.pairs("train").tensors
    assert bool(torch.isfinite(pairs["weather"]).all())
    assert bool((pairs["observed"] >= 0.9).all())
    assert dm.skipped["few_observed_days"] > 0  # June 1 windows of IA fall into the blanked days
    assert pairs["coords"][:, 1].max() < -87  # no Texas pairs: their county-years have no weather (lon < -95 there)
    only_tx = TSFusionPretrainDataModule(cropnet_copy, crops=["Cotton"], split_years={"train": (2021,), "val": (2021,)},
                                         before=5, after=2, image_size=16)
    with pytest.raises(EODataError, match="empty"):
        only_tx.pairs("train")


# ------------------------------------------------------------------------------------------ tasks
@pytest.fixture(scope="module")
def pretrained(tiny_world_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A briefly pretrained tiny task on the tiny world (10 short epochs), its datamodule and checkpoint."""
    import lightning.pytorch as pl

    from terratorch_eoplugins.tasks.tsfusion_pretrain import TSFusionPretrainTask

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    dm = TSFusionPretrainDataModule(tiny_world_dir / "CropNet", crops=["Corn"], before=5, after=2, image_size=16,
                                    batch_size=32, split_years={"train": (2021, 2022), "val": (2020,)})
    task = TSFusionPretrainTask(before=5, after=2, image_size=16, tokenizer_steps=30, input_budget=24,
                                target_budget=24, lr=3e-3, scheduler_hparams={"warmup": 2}, generate_batches=1,
                                image_tokenizer_kwargs={"levels": [5, 4, 4], "hidden_dims": [16, 16]},
                                model_kwargs={"dim": 32, "encoder_depth": 1, "decoder_depth": 1})
    trainer = pl.Trainer(max_epochs=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0)
    trainer.fit(task, dm)
    ckpt = tmp_path_factory.mktemp("tsf_ckpt") / "pre.ckpt"
    trainer.save_checkpoint(ckpt)
    torch.set_num_threads(n)
    return task, dm, ckpt


def test_pretraining_generates_weather_that_correlates_with_the_truth(pretrained) -> None:  # noqa: ANN001
    from terratorch_eoplugins.metrics import generation_scores, r2_score

    task, dm, _ = pretrained
    val = dm.pairs("val").tensors
    idx = torch.arange(0, len(val["image"]), max(1, len(val["image"]) // 48))
    gen = task.generate_weather(val["image"][idx])
    scores = generation_scores(gen, val["weather"][idx], task.tokenizers.weather)
    # held-out year, image only: temperatures correlate with the truth (R^2 > 0; precipitation is mostly noise)
    assert scores["gen_r2_tavg"] > 0
    assert np.mean([scores[f"gen_r2_{v}"] for v in ("tavg", "tmax", "tmin")]) > 0
    t, p = val["weather"][idx][:, 0].double().numpy().ravel(), gen[:, 0].double().numpy().ravel()
    assert math.isclose(r2_score(gen[:, 0], val["weather"][idx][:, 0]),
                        1 - ((t - p) ** 2).sum() / ((t - t.mean()) ** 2).sum(), rel_tol=1e-9)


def test_pretrain_tokenizers_are_fitted_on_the_train_split_batches(pretrained, one_torch_thread) -> None:  # noqa: ANN001
    """The preparation mechanism's batches give the same tokenizers as the training pairs themselves, and leave the
    global random state alone."""
    from types import SimpleNamespace

    from terratorch_eoplugins.tasks.preparation import train_split_batches
    from terratorch_eoplugins.tasks.tsfusion_pretrain import TSFusionPretrainTask

    _, dm, _ = pretrained
    kw = dict(before=5, after=2, image_size=16, tokenizer_steps=3,
              image_tokenizer_kwargs={"levels": [5, 4, 4], "hidden_dims": [16, 16]},
              model_kwargs={"dim": 32, "encoder_depth": 1, "decoder_depth": 1})
    by_batches, direct = TSFusionPretrainTask(**kw), TSFusionPretrainTask(**kw)
    direct.load_state_dict(by_batches.state_dict())  # the same initial tokenizer weights
    assert by_batches.needs_preparation()
    state = torch.get_rng_state()
    by_batches.prepare_from_train_split(train_split_batches(SimpleNamespace(datamodule=dm), by_batches))
    assert torch.equal(torch.get_rng_state(), state)
    assert not by_batches.needs_preparation()
    train = dm.pairs("train").tensors
    # the same values in the same order; contiguous as collated batches are (the stored pairs are channels-last
    # views, whose float reductions round differently)
    direct.fit_tokenizers(train["image"].contiguous(), train["weather"].contiguous())
    fitted = by_batches.tokenizers.state_dict()
    for k, v in direct.tokenizers.state_dict().items():
        assert torch.equal(v, fitted[k]), k


def test_pretrain_checkpoint_fine_tunes_with_mp_and_mmp_and_gives_gradient_sensitivity(
        pretrained, tiny_world_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    import lightning.pytorch as pl

    from terratorch_eoplugins.datamodules.cropnet import CropNetDataModule
    from terratorch_eoplugins.tasks.tsfusion_cropnet import REQUIRED_KEYS, TSFusionCropNetTask

    task, _, ckpt = pretrained
    dm = CropNetDataModule(tiny_world_dir / "CropNet", crop="Corn", grid_aggregation="none", normalize=False,
                           standardize_label=True, long_term_years=0, image_size=16, max_dates=2, batch_size=4,
                           batch_keys=list(REQUIRED_KEYS), window_weather=("tavg", "tmax", "tmin", "precip"),
                           window_before=5, window_after=2)
    common = dict(before=5, after=2, image_size=16,
                  image_tokenizer_kwargs={"levels": [5, 4, 4], "hidden_dims": [16, 16]},
                  model_kwargs={"dim": 32, "encoder_depth": 1, "decoder_depth": 1}, hidden_dim=16)
    for pooling in ("mp", "mmp"):
        ft = TSFusionCropNetTask(pooling=pooling, backbone_ckpt_path=str(ckpt), **common)
        assert torch.equal(ft.model.encoder.enc_tok["image"].weight, task.model.enc_tok["image"].weight)
        assert ft.tokenizers.fitted
        trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_train_batches=1, limit_val_batches=2)
        trainer.fit(ft, dm)
        assert {"val/RMSE", "val/MAE", "val/R2", "val/r", "val/r2_pearson"} <= set(trainer.callback_metrics)
    trainer.save_checkpoint(tmp_path / "ft.ckpt")
    # gradient sensitivity: batched gradients equal one-county-at-a-time gradients (counties are independent)
    from terratorch_eoplugins.analysis.tsfusion_sensitivity import load_cropnet_task, main, modality_gradients

    loaded = load_cropnet_task(tmp_path / "ft.ckpt")
    batch = next(iter(dm.val_dataloader()))
    with pytest.raises(ValueError, match="window_before"):  # windows of the data side must match the task's
        TSFusionCropNetTask(**dict(common, before=4)).tokens_of(batch)
    pred, grads = modality_gradients(loaded, batch)
    assert set(grads) == {"image", "weather"} and bool((grads["image"] > 0).all())
    one = {k: (v[:1] if isinstance(v, torch.Tensor) else v[:1]) for k, v in batch.items()}
    pred1, grads1 = modality_gradients(loaded, one)
    assert torch.allclose(pred1, pred[:1], atol=1e-5) and torch.allclose(grads1["weather"], grads["weather"][:1],
                                                                          rtol=1e-4)
    prefix = tmp_path / "sens"
    assert main(["--ckpt", str(tmp_path / "ft.ckpt"), "--root", str(tiny_world_dir / "CropNet"), "--split", "val",
                 "--image-size", "16", "--max-dates", "2", "--out", str(prefix)]) == 0
    table = pd.read_csv(f"{prefix}.csv")
    assert {"grad_image", "grad_weather", "abs_error", "true_yield"} <= set(table.columns) and len(table) > 2
    assert Path(f"{prefix}.png").stat().st_size > 0
    bad = dict(common, image_size=32)
    with pytest.raises(ValueError, match="tokenizer"):
        TSFusionCropNetTask(backbone_ckpt_path=str(ckpt), **bad)


def test_cropnet_fine_tuning_schedule_warms_up_and_scales_the_encoder_rate() -> None:
    from types import SimpleNamespace

    from terratorch_eoplugins.tasks.tsfusion_cropnet import TSFusionCropNetTask

    kw = dict(before=5, after=2, image_size=16, image_tokenizer_kwargs={"levels": [5, 4, 4], "hidden_dims": [16, 16]},
              model_kwargs={"dim": 16, "encoder_depth": 1, "decoder_depth": 1}, hidden_dim=8, lr=1e-3)
    task = TSFusionCropNetTask(scheduler_hparams={"warmup_epochs": 2}, encoder_lr_scale=0.1, **kw)
    task._trainer = SimpleNamespace(estimated_stepping_batches=100, max_epochs=10)  # 10 steps per epoch
    conf = task.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    n_enc = sum(p.numel() for p in task.model.encoder.parameters())
    assert sum(p.numel() for p in opt.param_groups[1]["params"]) == n_enc
    n_all = sum(p.numel() for p in task.model.parameters())
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_all
    lrs = []
    for _ in range(100):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    lrs = np.array(lrs)
    # linear warmup over 2 epochs (20 steps) to the peak, then cosine decay; the encoder runs at 0.1 x the rate
    assert np.allclose(lrs[:20, 0], 1e-3 * np.arange(1, 21) / 20)
    assert np.allclose(lrs[20:, 0], 1e-3 * 0.5 * (1 + np.cos(np.pi * np.arange(80) / 80)))
    assert np.allclose(lrs[:, 1], 0.1 * lrs[:, 0])
    frozen = TSFusionCropNetTask(encoder_lr_scale=0.0, **kw)
    frozen._trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=1)
    opt0 = frozen.configure_optimizers()["optimizer"]
    assert len(opt0.param_groups) == 1 and not any(p.requires_grad for p in frozen.model.encoder.parameters())
    for bad, match in ((dict(scheduler_hparams={"warmup_epochs": -1}), "warmup_epochs"),
                       (dict(encoder_lr_scale=-0.5), "encoder_lr_scale")):
        with pytest.raises(ValueError, match=match):
            TSFusionCropNetTask(**bad, **kw)


def test_county_pairs_reject_a_county_without_grids() -> None:
    from terratorch_eoplugins.tasks.tsfusion_cropnet import county_pairs

    s, months = _sample()
    wins, _, _ = weather_windows(s["weather_short"], s["weather_short_mask"], s["dates"], months, 5, 2)
    batch = {"image": s["image"][None], "weather_windows": wins[None, :, :, [1]],
             "grid_mask": torch.zeros(1, 2, dtype=torch.bool), "time_mask": torch.ones(1, 2, dtype=torch.bool),
             "grid_coords": s["grid_coords"][None]}
    with pytest.raises(EODataError, match="no grids"):
        county_pairs(batch)
    batch["grid_mask"][:] = True
    pairs, counts = county_pairs(batch)
    assert counts.tolist() == [4] and pairs[0]["weather"].shape == (4, 1, 8)
    assert torch.equal(pairs[0]["weather"][1], wins[0, 1, [1]])  # date-major order, as the image
    assert torch.equal(pairs[0]["image"][1], s["image"][0, 1])
    with pytest.raises(KeyError, match="batch_keys"):
        county_pairs({"image": batch["image"]})
    bad = dict(batch, weather_windows=batch["weather_windows"].clone())
    bad["weather_windows"][0, 0, 0, 0, 3] = float("nan")
    with pytest.raises(EODataError, match="non-finite"):
        county_pairs(bad)



# ------------------------------------------------------------------------------------------ analyses
def test_bootstrap_ci_matches_normal_theory_and_rejects_bad_input() -> None:
    from terratorch_eoplugins.analysis.tsfusion_counterfactual import bootstrap_ci

    v = np.random.default_rng(0).normal(1.0, 2.0, 400)
    mean, low, high = bootstrap_ci(v, n_boot=4000, level=0.95, seed=0)
    half = 1.96 * v.std(ddof=1) / np.sqrt(v.size)
    assert mean == pytest.approx(v.mean())
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert low < 1.0 < high
    assert bootstrap_ci(v - v.mean() + 5, 500)[1] > 0  # shifted far from 0: CI excludes 0 (H0 rejected)
    with pytest.raises(ValueError, match=">= 2 finite"):
        bootstrap_ci([1.0])


def test_coordinate_swap_follows_algorithm_1(pretrained, tmp_path: Path, tiny_world_dir: Path) -> None:  # noqa: ANN001
    from terratorch_eoplugins.analysis.tsfusion_counterfactual import coordinate_swap, main

    task, dm, ckpt = pretrained
    # one batched generation is compared with single-sample ones: under "medium" (set for every test) CPUs with
    # AMX-BF16 and GPUs round them to bf16 differently; the swap bookkeeping, not the matmul precision, is tested
    torch.set_float32_matmul_precision("highest")
    val = dm.pairs("val").tensors
    out = coordinate_swap(task, val["image"], val["weather"], val["coords"], n_img=3, n_false=2, seed=1)
    assert len(set(out["index"].tolist())) == 3
    assert all(m not in f for m, f in zip(out["index"], out["false_index"]))
    np.testing.assert_allclose(out["delta"], out["L_swap"].mean(1) - out["L_ref"], rtol=1e-12)
    m, j = int(out["index"][0]), int(out["false_index"][0, 1])
    ref = task.generate_weather(val["image"][[m]], val["coords"][[m]])
    swap = task.generate_weather(val["image"][[m]], val["coords"][[j]])
    assert out["L_ref"][0] == pytest.approx(float(((ref - val["weather"][[m]]) ** 2).mean()), rel=1e-5)
    assert out["L_swap"][0, 1] == pytest.approx(float(((swap - val["weather"][[m]]) ** 2).mean()), rel=1e-5)
    prefix = tmp_path / "cf"
    assert main(["--ckpt", str(ckpt), "--root", str(tiny_world_dir / "CropNet"), "--crops", "Corn", "--n-img", "3",
                 "--n-false", "2", "--n-boot", "200", "--variables", "tavg", "--out", str(prefix)]) == 0
    table = pd.read_csv(f"{prefix}.csv")
    summary = pd.read_csv(f"{prefix}_summary.csv")
    assert len(table) == 3 and summary["mean_delta"][0] == pytest.approx(table["delta_mean"].mean(), rel=1e-4)
    assert Path(f"{prefix}.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError):
        main(["--ckpt", str(tmp_path / "missing.ckpt"), "--root", str(tiny_world_dir / "CropNet")])


def test_activation_checkpointing_gives_the_plain_loss_and_gradients_with_dropout() -> None:
    """Checkpointed encoder blocks replay the same dropout / drop-path draws: same output and gradients."""
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        enc = TSFusionModel(MODS, dim=32, encoder_depth=2, decoder_depth=1, num_heads=4, with_decoder=False,
                            drop=0.25, attn_drop=0.3, drop_path=0.5).train()
        enc.activation_checkpointing = ckpt
        torch.manual_seed(1)
        out = enc(_tokens(3))[0]
        (out.square().mean()).backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}))
    (o0, g0), (o1, g1) = grads
    assert torch.equal(o0, o1) and g0.keys() == g1.keys() and len(g0) > 0
    assert all(torch.allclose(g0[k], g1[k], atol=1e-6, rtol=1e-5) for k in g0)
