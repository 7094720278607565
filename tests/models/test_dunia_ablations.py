"""DUNIA ablations (appendix H): NA layers 0/1/2, shared decoder, single-level VICReg, literal Zero-CL, commitment
term; each ablation piece runs through the CLI (fast_dev_run) on the tiny world."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from terratorch_eoplugins.losses import vicreg_loss, zero_cl_loss
from terratorch_eoplugins.models.dunia import build_dunia
from terratorch_eoplugins.nn.neighborhood_attention import NeighborhoodAttention2D
from terratorch_eoplugins.tasks.dunia_pretrain import DUNIAPretrainTask

REPO = Path(__file__).resolve().parents[2]
MICRO = dict(embed_dim=32, ffn_dim=64, num_heads=2, out_dim=8, na_kernel=5, na_heads=1)
PIECES = sorted(p.stem.removeprefix("dunia_") for p in (REPO / "configs" / "models" / "pretrain").glob("dunia_*.yaml"))


@pytest.fixture(autouse=True)
def _setup(one_torch_thread: None, quiet_lightning: None) -> None:
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------- Zero-CL forms
def _whiten(x: np.ndarray, shrinkage: float, eps: float = 1e-6) -> np.ndarray:
    """``(C_s)^{-1/2}`` of ``C = x^T x / N`` shrunk towards ``tr(C)/D I``, eigenvalues floored at ``eps tr(C)/D``."""
    c = x.T @ x / x.shape[0]
    scale = np.trace(c) / c.shape[0]
    c = (1 - shrinkage) * c + shrinkage * scale * np.eye(c.shape[0])
    lam, e = np.linalg.eigh(c)
    return e @ np.diag(1.0 / np.sqrt(np.maximum(lam, eps * scale))) @ e.T


def _np_literal(za: np.ndarray, zb: np.ndarray) -> tuple[float, float]:
    """Appendix B's Eqs. 3-6 as printed: S = Z Z^T / D_p, H^Ins = S^{-1/2} Z, L_Ins = sum_i (1 - sum_d H^A H^B)^2;
    C = Z^T Z / G, H^Fea = C^{-1/2} Z^T, L_Fea = sum_d (1 - sum_i H^A H^B)^2 (Z L2-normalised rows)."""
    za = za / np.linalg.norm(za, axis=1, keepdims=True)
    zb = zb / np.linalg.norm(zb, axis=1, keepdims=True)
    ha, hb = _whiten(za.T, 0.0) @ za, _whiten(zb.T, 0.0) @ zb
    fa, fb = _whiten(za, 0.0) @ za.T, _whiten(zb, 0.0) @ zb.T
    return float(((1 - (ha * hb).sum(1)) ** 2).sum()), float(((1 - (fa * fb).sum(1)) ** 2).sum())


def _np_standardized(za: np.ndarray, zb: np.ndarray, s: float = 0.1) -> tuple[float, float]:
    """The official Zero-CL form: standardise (instances over features, features over instances), shrink, and
    divide the inner products by D_p and G."""
    g, d = za.shape
    za = za / np.linalg.norm(za, axis=1, keepdims=True)
    zb = zb / np.linalg.norm(zb, axis=1, keepdims=True)

    def std(z: np.ndarray, axis: int) -> np.ndarray:
        zc = z - z.mean(axis, keepdims=True)
        return zc / np.sqrt((zc ** 2).mean(axis, keepdims=True) + 1e-6)

    ia, ib = std(za, 1), std(zb, 1)
    ha, hb = _whiten(ia.T, s) @ ia, _whiten(ib.T, s) @ ib
    ca, cb = std(za, 0), std(zb, 0)
    fa, fb = _whiten(ca, s) @ ca.T, _whiten(cb, s) @ cb.T
    return float(((1 - (ha * hb).sum(1) / d) ** 2).sum()), float(((1 - (fa * fb).sum(1) / g) ** 2).sum())


@pytest.mark.parametrize("g,d", [(6, 16), (24, 8)])
def test_literal_and_standardized_zero_cl_each_match_their_own_equations(g: int, d: int) -> None:
    rng = np.random.default_rng(g + d)
    za = rng.normal(size=(g, d)) + 0.5
    zb = za + 0.3 * rng.normal(size=(g, d))
    lit = zero_cl_loss(torch.tensor(za), torch.tensor(zb), shrinkage=0.0, form="literal", return_parts=True)
    std = zero_cl_loss(torch.tensor(za), torch.tensor(zb), return_parts=True)
    ins_l, fea_l = _np_literal(za, zb)
    ins_s, fea_s = _np_standardized(za, zb)
    assert float(lit["ins"]) == pytest.approx(ins_l, rel=1e-6)
    assert float(lit["fea"]) == pytest.approx(fea_l, rel=1e-6)
    assert float(std["ins"]) == pytest.approx(ins_s, rel=1e-6)
    assert float(std["fea"]) == pytest.approx(fea_s, rel=1e-6)
    # the two forms are different functions: neither matches the other's equations
    assert abs(float(lit["loss"]) - (ins_s + fea_s)) > 1e-3 * (ins_s + fea_s)
    assert abs(float(std["loss"]) - (ins_l + fea_l)) > 1e-3 * (ins_l + fea_l)
    with pytest.raises(ValueError, match="form must be"):
        zero_cl_loss(torch.tensor(za), torch.tensor(zb), form="official")


# ----------------------------------------------------------------------------------------- image model
@pytest.mark.parametrize("na_layers", [0, 1, 2])
def test_output_layers_are_na_or_convolutional(na_layers: int) -> None:
    model = build_dunia("tiny", na_layers=na_layers, **MICRO)
    for dec in (model.decoder_v, model.decoder_h):
        kinds = [isinstance(m, NeighborhoodAttention2D) for m in dec.na]
        assert kinds == ([False, False] if na_layers == 0 else [True] * na_layers)
    out = model.forward_embeddings(torch.randn(2, 14, 16, 16))
    assert out["vertical"].shape == out["horizontal"].shape == (2, 8, 16, 16)
    assert (out["vertical"] < 0).any()  # the convolutional output stays signed (no final ReLU)
    lowshot = {id(p) for p in model.lowshot_parameters()}
    assert lowshot == {id(p) for d in (model.decoder_v, model.decoder_h) for p in d.na[-1].parameters()}
    with pytest.raises(ValueError, match="na_layers"):
        build_dunia("tiny", na_layers=3)


def test_shared_decoder_gives_one_decoder_for_both_embeddings() -> None:
    separate = build_dunia("tiny", **MICRO)
    shared = build_dunia("tiny", shared_decoder=True, **MICRO)
    assert shared.decoder_h is shared.decoder_v and separate.decoder_h is not separate.decoder_v
    n_dec = sum(p.numel() for p in separate.decoder_v.parameters())
    assert sum(p.numel() for p in separate.parameters()) - sum(p.numel() for p in shared.parameters()) == n_dec
    shared.eval()
    out = shared.forward_embeddings(torch.randn(1, 14, 16, 16))
    torch.testing.assert_close(out["vertical"], out["horizontal"])
    assert shared.config["shared_decoder"] is True


def test_single_level_vicreg_uses_the_last_decoder_level_only() -> None:
    def task(levels: str) -> DUNIAPretrainTask:
        torch.manual_seed(0)
        return DUNIAPretrainTask(variant="tiny", image_kwargs=MICRO, lstm_layers=1, waveform_length=64,
                                 waveform_kwargs={"codebook_size": 16, "num_quantizers": 2}, vicreg_pixels=None,
                                 vicreg_levels=levels, optimizer="AdamW", sema_every=0).eval()

    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(1, 14, 16, 16, generator=g), "series": torch.randn(1, 14, 2, 16, 16, generator=g),
             "footprints": torch.full((1, 1, 2), -1), "footprint_mask": torch.zeros(1, 1, dtype=torch.bool),
             "waveform": torch.zeros(1, 1, 64)}
    single, hier = task("single"), task("hierarchical")
    with torch.no_grad():
        parts_s, parts_h = single.compute_losses(batch), hier.compute_losses(batch)
        out = single.model.image.forward_embeddings(batch["image"])
        a = single.model.image.project_horizontal(out["horizontal_levels"])
        b = single.model.temporal_embeddings(batch["series"])["projected"]

        def pix(x: torch.Tensor) -> torch.Tensor:
            return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

        per_level = [float(vicreg_loss(pix(x), pix(y))) for x, y in zip(a, b)]
    assert float(parts_s["vicreg"]) == pytest.approx(per_level[0], rel=1e-5)
    assert float(parts_h["vicreg"]) == pytest.approx(sum(per_level), rel=1e-5)
    with pytest.raises(ValueError, match="vicreg_levels"):
        DUNIAPretrainTask(variant="tiny", vicreg_levels="two")
    with pytest.raises(ValueError, match="zero_cl_form"):
        DUNIAPretrainTask(variant="tiny", zero_cl_form="exact")


# ----------------------------------------------------------------------------------------- CLI
def test_every_pretraining_piece_is_an_ablation_of_the_paper_piece() -> None:
    import yaml

    base = yaml.safe_load((REPO / "configs" / "models" / "pretrain" / "dunia.yaml").read_text())["init_args"]
    assert base["commit_weight"] == 0.0 and "vicreg_levels" not in base  # the paper's choices by default
    assert set(PIECES) == {"commit", "na0", "na1", "shared_decoder", "vicreg_single", "zero_cl_literal"}
    for name in PIECES:
        path = REPO / "configs" / "models" / "pretrain" / f"dunia_{name}.yaml"
        init = yaml.safe_load(path.read_text())["init_args"]
        changed = {k for k in {*base, *init} if base.get(k) != init.get(k)}
        assert changed and changed <= {"image_kwargs", "vicreg_levels", "zero_cl_form", "zero_cl_shrinkage",
                                       "commit_weight"}, (name, changed)


@pytest.mark.parametrize("piece", PIECES)
def test_ablation_piece_runs_through_the_cli(piece: str, tiny_world_dir: Path, tmp_path: Path) -> None:
    """``terratorch fit`` (fast_dev_run: one training and one validation batch) of each ablation piece at the CPU
    profile's size, on 32 px chips of the tiny world."""
    from terratorch.cli_tools import build_lightning_cli

    cfg = REPO / "configs"
    cli = build_lightning_cli([
        "fit", "-c", str(cfg / "dunia_pretrain.yaml"),
        "--model", str(cfg / "models" / "pretrain" / f"dunia_{piece}.yaml"),
        "-c", str(cfg / "profiles" / "cpu" / "dunia_pretrain.yaml"),
        f"--data.init_args.root={tiny_world_dir / 'GEDI'}", "--data.init_args.chip_size=32",
        "--data.init_args.batch_size=2", "--data.init_args.require_footprints=true",
        "--model.init_args.vicreg_pixels=256", "--trainer.fast_dev_run=true", "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=false", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}"], run=True)
    hp = cli.model.hparams
    expected = {"na0": ("image_kwargs", {"na_layers": 0}), "na1": ("image_kwargs", {"na_layers": 1}),
                "shared_decoder": ("image_kwargs", {"shared_decoder": True}),
                "vicreg_single": ("vicreg_levels", "single"),
                "zero_cl_literal": ("zero_cl_form", "literal"), "commit": ("commit_weight", 1.0)}[piece]
    assert hp[expected[0]] == expected[1] and hp["variant"] == "tiny"
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
