"""``eoplugins lianet-convert``: authors' checkpoints (mojganmadadi/LIANet layout) -> this package's checkpoints.

The reference files are built here from the reference's documented layout: :func:`reference_layout` lists every key
and shape the reference classes (tag v1.0.0 ``LIANet`` + ``ResUNet``; branch ``release/v1.0.1`` / ``main``
``LIANetLight``) save, written from their layer definitions; :func:`to_reference` renames a project generator's
weights into that layout (this test's own mapping, checked against the layout). The converted checkpoint must then
rebuild a model whose outputs equal the original's.

Full-size measurement (paper-size tables and trunks, default patch 128; prints the maximum differences)::

    LIANET_CONVERT_FULL=1 .venv/bin/python -m pytest -q -s -p no:cacheprovider \
        tests/models/test_lianet_convert.py -k full_size
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from terratorch.registry import BACKBONE_REGISTRY

import terratorch_eoplugins  # noqa: F401  (imports terratorch, which sets the matmul precision)
from terratorch_eoplugins.cli import main as cli_main
from terratorch_eoplugins.models.lianet import LIANetGenerator, generator_config, load_generator
from terratorch_eoplugins.models.lianet_convert import ConversionError, convert_checkpoint
from terratorch_eoplugins.tasks.lianet_pretrain import LIANetPretrainTask

# --------------------------------------------------------------------------- the reference's layout
_DEC = {"small": [512, 256, 256, 256, 256, 128], "large": [512, 512, 512, 512, 256, 128]}
_ENC = [64, 256, 512, 1024, 2048]


def _gn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def _conv(prefix: str, cout: int, cin: int, k: int, bias: bool = True) -> dict[str, tuple[int, ...]]:
    out = {f"{prefix}.weight": (cout, cin, k, k)}
    if bias:
        out[f"{prefix}.bias"] = (cout,)
    return out


def _resblock(prefix: str, c: int) -> dict[str, tuple[int, ...]]:  # conv(no bias) GN ReLU conv(no bias) GN
    return {**_conv(f"{prefix}.0", c, c, 3, False), **_gn(f"{prefix}.1", c),
            **_conv(f"{prefix}.3", c, c, 3, False), **_gn(f"{prefix}.4", c)}


def reference_layout(model: dict[str, Any], num_regions: int | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the reference generator's ``state_dict`` for ``model`` (used_parameters.json's entry)."""
    levels, t_size, feat = model["levels"], model["table_size"], model["feat_dim"]
    enc_ch, pre = levels * feat, model["preproj_channels"]
    shapes: dict[str, tuple[int, ...]] = {**_conv("preproj", pre, enc_ch, 1)}
    final = {**_conv("final_layer.0", 64, 128, 3), **_gn("final_layer.1", 64),
             **_conv("final_layer.3", model["out_channels"], 64, 3)}
    if model["_target_"].endswith(".LIANet"):  # tag v1.0.0: Base / Large
        shapes["encoder.tables"] = (levels, t_size, feat)
        shapes["time_emb.weight"] = (model["timestamp_dim"], enc_ch)
        size = model["resunet_backbone_size"]
        with torch.device("meta"):
            net = getattr(torchvision.models, "resnet50" if size == "small" else "resnet101")(weights=None)
        for k, v in net.state_dict().items():
            if k.startswith("fc."):
                continue
            k = k.replace("conv1.weight", "initial.0.weight") if k == "conv1.weight" else k
            k = re.sub(r"^bn1\.", "initial.1.", k)
            k = re.sub(r"^layer([1-4])\.", r"encoder\1.", k)
            shapes[f"resunet.encoder.{k}"] = (64, pre, 7, 7) if k == "initial.0.weight" else tuple(v.shape)
        dec = _DEC[size]
        fuse_in = [_ENC[-2] + _ENC[-1], _ENC[-3] + dec[0], _ENC[-4] + dec[1], _ENC[-5] + dec[2]]
        for i in range(4):
            shapes.update(_conv(f"resunet.block_{i}.fuse.0", dec[i], fuse_in[i], 3))  # biased fuse conv
            shapes.update(_gn(f"resunet.block_{i}.fuse.1", dec[i]))
            for r in range(3):
                shapes.update(_resblock(f"resunet.block_{i}.resblocks.{r}.block", dec[i]))
        shapes.update(_conv("resunet.upsample_final.1", dec[4], dec[3], 3))  # biased, no norm
        shapes.update(_resblock("resunet.res_block_final.block", dec[4]))
        shapes.update(_conv("resunet.final_conv", dec[5], dec[4], 1))
    else:  # LIANetLight: release/v1.0.1 (one table) or main (one table per region)
        shapes["encoder.tables"] = (t_size, feat) if num_regions is None else (num_regions, t_size, feat)
        mode = model["time_mode"]
        if mode == "index":
            shapes["time_encoder.emb.weight"] = (model["timestamp_dim"], enc_ch)
        elif mode in ("sinusoidal", "fourier_learned"):
            k = model["num_time_frequencies"]
            if mode == "fourier_learned":
                shapes["time_encoder.freqs"] = (k,)
            shapes.update({"time_encoder.proj.weight": (enc_ch, 2 * k), "time_encoder.proj.bias": (enc_ch,)})
        else:
            h = model["time_mlp_hidden"]
            for i, (o, c) in zip((0, 2, 4), ((h, 3), (h, h), (enc_ch, h))):
                shapes.update({f"time_encoder.net.{i}.weight": (o, c), f"time_encoder.net.{i}.bias": (o,)})
        shapes.update({**_conv("light_head.stem.0", 256, pre, 1, False), **_gn("light_head.stem.1", 256)})
        for b in range(model.get("n_blocks", 3)):
            shapes.update(_resblock(f"light_head.blocks.{b}.block", 256))
        shapes.update(_conv("light_head.proj", 128, 256, 1))
    shapes.update(final)
    return shapes


def to_reference(gen: LIANetGenerator) -> dict[str, torch.Tensor]:
    """The project generator's tensors under the reference's key names (sinusoidal frequencies are not saved)."""
    out = {}
    for k, v in gen.state_dict().items():
        r = k
        r = r.replace("encoder.table", "encoder.tables") if r == "encoder.table" else r
        if gen.variant == "modified":
            r = r.replace("time_encoder.embedding.", "time_encoder.emb.")
            r = r.replace("time_encoder.mlp.", "time_encoder.net.")
            r = r.replace("time_encoder.frequencies", "time_encoder.freqs").replace("trunk.", "light_head.")
            if k == "time_encoder.frequencies" and gen.config["time_mode"] == "sinusoidal":
                continue  # a non-persistent buffer in the reference
        else:
            r = r.replace("time_encoder.embedding.weight", "time_emb.weight")
            parts = r.split(".")
            if parts[0] == "trunk":
                if parts[1] == "stem":
                    r = "resunet.encoder.initial." + ".".join(parts[2:])
                elif parts[1] == "layers":
                    r = f"resunet.encoder.encoder{int(parts[2]) + 1}." + ".".join(parts[3:])
                elif parts[1] == "stages" and parts[3] == "0":
                    r = f"resunet.block_{parts[2]}.fuse." + ".".join(parts[4:])
                elif parts[1] == "stages":
                    r = f"resunet.block_{parts[2]}.resblocks.{int(parts[3]) - 1}.block." + ".".join(parts[5:])
                elif parts[1:3] == ["head", "0"]:
                    r = "resunet.upsample_final.1." + ".".join(parts[4:])
                elif parts[1:3] == ["head", "1"]:
                    r = "resunet.res_block_final.block." + ".".join(parts[4:])
                else:
                    r = "resunet.final_conv." + ".".join(parts[3:])
        out[r] = v.clone()
    return out


def _write_reference(tmp: Path, state: dict[str, torch.Tensor], params: dict[str, Any], ddp: bool = True) -> tuple:
    ck, pj = tmp / "latest_validation_checkpoint.pt", tmp / "used_parameters.json"
    sd = {(f"module._orig_mod.{k}" if ddp else k): v for k, v in state.items()}  # DDP + torch.compile prefixes
    torch.save({"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": {}}, ck)
    pj.write_text(json.dumps(params))
    return ck, pj


V100_SMALL = {"_target_": "models.LIANet.LIANet", "timestamp_dim": 4, "levels": 3, "n_min": 4, "growth": 2,
              "table_size": 256, "feat_dim": 4, "complete_tile_size": 300, "resunet_backbone_size": "small",
              "bilinear": True, "out_channels": 12, "preproj_channels": 128}
LIGHT_SMALL = {"_target_": "models.LIANet.LIANetLight", "timestamp_dim": 43, "time_mode": "fourier_learned",
               "num_time_frequencies": 8, "time_input_dim": 3, "time_mlp_hidden": 16, "levels": 4, "n_min": 4,
               "growth": 2, "table_size": 512, "feat_dim": 8, "complete_tile_size": 300, "out_channels": 12,
               "preproj_channels": 32, "resunet_backbone_size": "small", "bilinear": True, "hash_vectorized": True,
               "final_activation": None}


def _generator_args(model: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The project configuration the reference entry means (written here, independently of the converter)."""
    common = {"levels": model["levels"], "base_resolution": model["n_min"], "growth": float(model["growth"]),
              "log2_table_size": int(model["table_size"]).bit_length() - 1, "features_per_level": model["feat_dim"],
              "preproj_channels": model["preproj_channels"], "region_size": float(model.get("complete_tile_size",
                                                                                             10980))}
    if model["_target_"].endswith(".LIANet"):
        return ("base" if model["resunet_backbone_size"] == "small" else "large"), {**common,
                                                                                  "num_timestamps": 4}
    extra = {"time_mode": model["time_mode"], "num_frequencies": model["num_time_frequencies"],
             "time_hidden": model["time_mlp_hidden"], "num_timestamps": model["timestamp_dim"]}
    return "modified", {**common, **extra}


def _roundtrip(tmp: Path, model: dict[str, Any], origin: torch.Tensor, t: torch.Tensor, size: int,
               num_regions: int | None = None, region: str | None = None, params_extra: dict | None = None,
               generator_args: dict[str, Any] | None = None) -> tuple[float, LIANetGenerator, Path]:
    variant, args = _generator_args(model) if generator_args is None else generator_args
    torch.manual_seed(0)
    gen = LIANetGenerator(variant, **args).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped tensor cannot go unnoticed
        for name, p in gen.named_parameters():
            if not name.startswith("encoder."):
                p.add_(0.05 * torch.randn_like(p))
        gen.encoder.table.normal_(0, 0.5)
    ref = to_reference(gen)
    if num_regions is not None:  # main branch: the region's table among others
        tables = torch.randn(num_regions, *ref["encoder.tables"].shape)
        tables[1] = ref["encoder.tables"]
        ref["encoder.tables"] = tables
    layout = reference_layout(model, num_regions)
    assert {k: tuple(v.shape) for k, v in ref.items()} == layout
    ck, pj = _write_reference(tmp, ref, {"model": model, **(params_extra or {})})
    out = convert_checkpoint(ck, pj, tmp / "converted.ckpt", region=region)
    torch.set_float32_matmul_precision("highest")  # after importing the package (terratorch sets "medium")
    conv = load_generator(out, variant=variant).eval()
    with torch.no_grad():
        diff = float((conv(origin, t, size) - gen(origin, t, size)).abs().max())
    return diff, gen, out


PAPER = {
    "base": {**V100_SMALL, "levels": 11, "n_min": 16, "table_size": 2**17, "feat_dim": 4, "complete_tile_size": 10980},
    "large": {**V100_SMALL, "levels": 11, "n_min": 16, "table_size": 2**17, "feat_dim": 4, "complete_tile_size": 10980,
              "resunet_backbone_size": "large"},
    # release/v1.0.1 PASTIS/BurnScars run: 13 levels, 2**19 x 128 shared table, learned Fourier time
    "modified": {**LIGHT_SMALL, "levels": 13, "n_min": 16, "table_size": 2**19, "feat_dim": 128,
                 "complete_tile_size": 10980, "preproj_channels": 128, "time_mlp_hidden": 64, "n_blocks": 3},
}


@pytest.mark.parametrize("variant", ["base", "large", "modified"])
def test_default_variants_have_the_reference_layout(variant: str) -> None:
    """At their defaults, the variants hold exactly the reference's tensors (keys and shapes; BN statistics too)."""
    with torch.device("meta"):
        gen = LIANetGenerator(variant)
    ref = to_reference(gen)
    assert {k: tuple(v.shape) for k, v in ref.items()} == reference_layout(PAPER[variant])
    name, args = _generator_args(PAPER[variant])
    cfg = generator_config(name)
    args.pop("num_timestamps")
    assert {k: cfg[k] for k in args} == args
    n_params = sum(v.numel() for k, v in ref.items() if not k.endswith(("running_mean", "running_var", "tracked")))
    assert n_params == sum(p.numel() for p in gen.parameters())


def test_modified_roundtrip_loads_in_the_backbone_and_the_pretraining_task(tmp_path: Path) -> None:
    origin, t = torch.tensor([[3.0, 5.0], [100.0, 20.0]]), torch.tensor([1500.25, 2100.75])
    diff, gen, out = _roundtrip(tmp_path, LIGHT_SMALL, origin, t, 24)
    assert diff < 1e-5
    bb = BACKBONE_REGISTRY.build("lianet_modified", ckpt_path=str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(bb(torch.zeros(2, 1, 24, 24), origin_px=origin, time_days=t)[0],
                                   gen.features(origin, t, 24), rtol=0, atol=1e-5)
    task = LIANetPretrainTask.load_from_checkpoint(out, map_location="cpu").eval()
    with torch.no_grad():
        torch.testing.assert_close(task(origin, t, size=24), gen(origin, t, 24), rtol=0, atol=1e-5)
    meta = torch.load(out, weights_only=True)["lianet_converted_from"]
    assert meta["model_class"] == "models.LIANet.LIANetLight" and meta["region"] is None


@pytest.mark.parametrize("mode", ["sinusoidal", "mlp", "index"])
def test_modified_time_modes_and_the_unsaved_sinusoidal_buffer(tmp_path: Path, mode: str) -> None:
    model = {**LIGHT_SMALL, "time_mode": mode, "timestamp_dim": 5, "n_blocks": 2}
    variant, args = _generator_args(model)
    args = {**args, "trunk_blocks": 2, "num_timestamps": 5}
    t = torch.tensor([0, 4]) if mode == "index" else torch.tensor([1500.25, 2100.75])
    diff, gen, _ = _roundtrip(tmp_path, model, torch.tensor([[3.0, 5.0], [10.0, 20.0]]), t, 16,
                              generator_args=(variant, args))
    assert diff < 1e-5


def test_base_roundtrip_with_the_reference_resunet(tmp_path: Path) -> None:
    """Full ResNet50 trunk (its widths are fixed by resunet_backbone_size), tiny tables, patch 32."""
    diff, _, out = _roundtrip(tmp_path, V100_SMALL, torch.tensor([[3.0, 5.0]]), torch.tensor([2]), 32)
    assert diff < 1e-5
    cfg = torch.load(out, weights_only=True)["lianet"]["config"]
    assert cfg["pixel_centers"] and cfg["resunet_decoder"] == "reference" and cfg["activate_features"]


def test_main_branch_regions_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = {k: v for k, v in LIGHT_SMALL.items() if k != "complete_tile_size"}
    model["num_regions"] = 3
    regions = {"region_list": {"0": ["T31TFJ"], "1": ["T32ULU"], "2": ["T16TEK", "T16TFK"]}}
    variant, args = _generator_args(model)
    args = {**args, "region_size": 10980.0}
    origin, t = torch.tensor([[10000.0, 7.0]]), torch.tensor([1800.5])
    diff, _, out = _roundtrip(tmp_path, model, origin, t, 16, num_regions=3, region="T32ULU",
                              params_extra=regions, generator_args=(variant, args))
    assert diff < 1e-5
    assert load_generator(out).config["region_shape"] == [10980, 10980]
    ck, pj = tmp_path / "latest_validation_checkpoint.pt", tmp_path / "used_parameters.json"
    with pytest.raises(ConversionError, match=r"holds 3 regions.*0: T31TFJ; 1: T32ULU; 2: T16TEK\+T16TFK"):
        convert_checkpoint(ck, pj, tmp_path / "x.ckpt")
    with pytest.raises(ConversionError, match="mosaic of 2 tiles.*--region-size"):
        convert_checkpoint(ck, pj, tmp_path / "x.ckpt", region="2")
    # never replaces a file it did not write, unless asked
    other = tmp_path / "mine.txt"
    other.write_text("keep me")
    assert cli_main(["lianet-convert", "--checkpoint", str(ck), "--parameters", str(pj), "--out", str(other),
                     "--region", "1"]) == 2
    assert other.read_text() == "keep me" and "already exists" in capsys.readouterr().err
    assert cli_main(["lianet-convert", "--checkpoint", str(ck), "--parameters", str(pj), "--out", str(other),
                     "--region", "T32ULU", "--overwrite"]) == 0
    assert load_generator(other).variant == "modified"
    # a key the converter cannot map, and a missing weight, are refused with their names
    sd = torch.load(ck, weights_only=True)
    bad = dict(sd["model_state_dict"])
    bad["module._orig_mod.light_head.extra.weight"] = torch.zeros(1)
    torch.save({"model_state_dict": bad}, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match=r"cannot be mapped.*light_head\.extra\.weight"):
        convert_checkpoint(tmp_path / "bad.pt", pj, tmp_path / "y.ckpt", region="0")
    bad.pop("module._orig_mod.light_head.extra.weight")
    bad.pop("module._orig_mod.light_head.proj.bias")
    torch.save({"model_state_dict": bad}, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match=r"lacks 1 weight.*trunk\.proj\.bias"):
        convert_checkpoint(tmp_path / "bad.pt", pj, tmp_path / "y.ckpt", region="0")
    assert not (tmp_path / "y.ckpt").exists()


@pytest.mark.skipif(not os.environ.get("LIANET_CONVERT_FULL"), reason="paper-size measurement: LIANET_CONVERT_FULL=1")
@pytest.mark.parametrize("variant", ["modified", "base", "large"])
def test_full_size(tmp_path: Path, variant: str) -> None:
    origin = torch.tensor([[1000.0, 2000.0], [5000.0, 9000.0]])
    t = torch.tensor([0, 3]) if variant != "modified" else torch.tensor([1500.25, 2100.75])
    diff, _, _ = _roundtrip(tmp_path, PAPER[variant], origin, t, 128)
    print(f"\nLIANet-{variant} full size: max |converted - original| = {diff:.3e}")
    assert diff < 1e-5
