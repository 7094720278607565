"""Import the authors' LIANet checkpoints (``mojganmadadi/LIANet``) as checkpoints of this package.

The reference code saves a torch file whose ``model_state_dict`` holds the generator weights (keys possibly
prefixed ``module.`` by DDP and ``_orig_mod.`` by ``torch.compile``) and writes the run's resolved hydra
configuration to a separate ``used_parameters.json``; its ``model`` entry names the class (``_target_``) and its
arguments. Three code versions are understood:

* tag v1.0.0 (= tag v1.0.1), ``models.LIANet.LIANet``: LIANet-Base (``resunet_backbone_size: small``) or -Large
  (``large``); per-level tables ``encoder.tables [L, T, F]``, season embedding ``time_emb``, ResUNet ``resunet.*``;
* branch ``release/v1.0.1`` (= tag v4.2.0), ``models.LIANet.LIANetLight``: LIANet-Modified; one shared table
  ``encoder.tables [T, F]``, ``time_encoder.*`` (``emb`` / ``freqs`` + ``proj`` / ``net``), ``light_head.*``;
* branch ``main``: ``LIANetLight`` with ``num_regions`` tables ``encoder.tables [R, T, F]`` and the run's
  ``region_list`` (``{index: [tile, ...]}``); one region is extracted (``--region``). Its coordinate scale is the
  region's mosaic width, which the reference computes from the rasters (10980 px for a one-tile region; give
  ``--region-size`` for a multi-tile region).

Every key is mapped to the project's :class:`~terratorch_eoplugins.models.lianet.LIANetGenerator` (same tensors,
renamed); a key that cannot be mapped, a tensor of the wrong shape or a missing weight is refused with the keys
named. Buffers the reference does not save (the fixed ``sinusoidal`` frequencies) are taken from the freshly built
generator. The output is a weights-only checkpoint that both ``backbone_ckpt_path`` of the ``lianet_*`` backbones
and :class:`~terratorch_eoplugins.tasks.lianet_pretrain.LIANetPretrainTask` load (``state_dict`` with ``generator.``
keys, the ``"lianet"`` generator config, ``hyper_parameters``), plus the provenance under ``"lianet_converted_from"``.

Command line (:mod:`terratorch_eoplugins.analysis.lianet_convert`): ``eoplugins lianet-convert --checkpoint REF.pt
--parameters used_parameters.json --out OUT.ckpt [--region NAME] [--region-size PX] [--overwrite]``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from terratorch_eoplugins.models.lianet import CKPT_KEY, LIANetGenerator, generator_config
from terratorch_eoplugins.runtime import read_checkpoint

logger = logging.getLogger("terratorch_eoplugins.models.lianet_convert")

__all__ = ["ConversionError", "convert_checkpoint", "convert_state_dict", "generator_args_from_reference",
           "read_parameters", "region_table"]

#: side of one Sentinel-2 tile in 10 m pixels (the reference's mosaic unit and default coordinate scale)
S2_TILE_PX = 10980
#: reference model classes (``_target_`` of ``used_parameters.json``'s ``model``)
_V100_CLASS = "LIANet"
_LIGHT_CLASS = "LIANetLight"


class ConversionError(ValueError):
    """A reference checkpoint or configuration this converter cannot map (the message names what and why)."""


# ------------------------------------------------------------------------------------------- configuration
def read_parameters(path: str | Path) -> dict[str, Any]:
    """The run configuration ``used_parameters.json`` (a JSON object with a ``model`` entry)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"reference run configuration not found: {str(p)!r}")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{p}: not a JSON file ({err})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise ConversionError(f"{p}: expected the reference's used_parameters.json, a JSON object with a 'model' "
                              "entry (the generator class '_target_' and its arguments)")
    return cfg


def _model_class(model: Mapping[str, Any], where: str) -> str:
    target = str(model.get("_target_", ""))
    name = target.rsplit(".", 1)[-1]
    if name not in (_V100_CLASS, _LIGHT_CLASS):
        raise ConversionError(f"{where}: model._target_ {target!r} is not a LIANet generator of the reference "
                              f"(expected models.LIANet.{_V100_CLASS} or models.LIANet.{_LIGHT_CLASS})")
    return name


def _need(model: Mapping[str, Any], key: str, where: str) -> Any:
    if model.get(key) is None:
        raise ConversionError(f"{where}: model.{key} is missing (needed to rebuild the generator)")
    return model[key]


def _log2(table_size: Any, where: str) -> int:
    t = int(table_size)
    if t < 2 or t & (t - 1):
        raise ConversionError(f"{where}: model.table_size={table_size!r} is not a power of two; the project's hash "
                              "tables need T = 2**k")
    return int(math.log2(t))


def _activation(value: Any, default: str, where: str) -> str:
    value = default if value is None and default == "relu" else value
    if value in (None, "none", "None"):
        return "none"
    if str(value).lower() == "relu":
        return "relu"
    raise ConversionError(f"{where}: model.final_activation={value!r} (expected 'ReLU' or none)")


def region_table(params: Mapping[str, Any]) -> dict[str, list[str]]:
    """``{region index: [tile, ...]}`` of a main-branch run (``region_list``), ``{}`` when the run has none."""
    regions = params.get("region_list")
    if not isinstance(regions, Mapping):
        return {}
    return {str(k): [str(t) for t in (v if isinstance(v, (list, tuple)) else [v])] for k, v in regions.items()}


def _describe_regions(regions: Mapping[str, list[str]], count: int) -> str:
    if regions:
        return "; ".join(f"{k}: {'+'.join(v)}" for k, v in regions.items())
    return ", ".join(str(i) for i in range(count)) + " (no region_list in the configuration)"


def _select_region(region: str | None, count: int, regions: Mapping[str, list[str]], where: str) -> tuple[int, str]:
    """Index and display name of the region ``region`` (index, tile list joined by ``+``/``,``, or one tile)."""
    if region is None:
        if count == 1:
            idx = 0
        else:
            raise ConversionError(f"{where}: the checkpoint holds {count} regions' tables; choose one with --region "
                                  f"(index or tile names): {_describe_regions(regions, count)}")
    else:
        wanted = region.strip()
        tiles = [t for t in re.split(r"[+,\s]+", wanted) if t]
        hits = [int(k) for k, v in regions.items()
                if wanted == k or tiles == v or (len(tiles) == 1 and tiles[0] in v)]
        if not hits and wanted.isdigit():
            hits = [int(wanted)]
        if len(hits) != 1 or not 0 <= hits[0] < count:
            raise ConversionError(f"{where}: --region {region!r} matches {'several' if len(hits) > 1 else 'no'} "
                                  f"region of the checkpoint; regions: {_describe_regions(regions, count)}")
        idx = hits[0]
    name = "+".join(regions.get(str(idx), [])) or f"region {idx}"
    return idx, name


def generator_args_from_reference(params: Mapping[str, Any], region_tiles: Sequence[str] | None = None,
                                  region_size: float | None = None, where: str = "used_parameters.json"
                                  ) -> tuple[str, dict[str, Any]]:
    """Variant and generator configuration equal to the reference run's generator.

    ``region_tiles``: the tiles of the extracted main-branch region (their count sets the default coordinate scale
    ``10980`` for one tile); ``region_size`` overrides the scale (the reference's ``complete_tile_size`` /
    ``mosaic_width``).
    """
    model = params["model"]
    cls = _model_class(model, where)
    args: dict[str, Any] = {
        "levels": int(_need(model, "levels", where)),
        "base_resolution": int(_need(model, "n_min", where)),
        "growth": float(_need(model, "growth", where)),
        "log2_table_size": _log2(_need(model, "table_size", where), where),
        "features_per_level": int(_need(model, "feat_dim", where)),
        "out_bands": int(model.get("out_channels") or 12),
        "preproj_channels": int(model["preproj_channels"]) if model.get("preproj_channels") else 0,
        "trunk_out": 128,  # hard-coded in both reference code versions
    }
    size = region_size if region_size is not None else model.get("complete_tile_size")
    if cls == _V100_CLASS:
        backbone = str(model.get("resunet_backbone_size", "small"))
        if backbone not in ("small", "large"):
            raise ConversionError(f"{where}: model.resunet_backbone_size={backbone!r} (expected 'small' or 'large')")
        variant = "base" if backbone == "small" else "large"
        args.update(time_mode="index", num_timestamps=int(_need(model, "timestamp_dim", where)),
                    final_activation=_activation(model.get("final_activation"), "relu", where),
                    bilinear=True)  # v1.0.0 always blends bilinearly (its `bilinear` argument is unused)
        if size is None:
            raise ConversionError(f"{where}: model.complete_tile_size is missing (the coordinate scale); give "
                                  "--region-size")
    else:
        variant = "modified"
        mode = str(_need(model, "time_mode", where))
        if mode not in ("index", "sinusoidal", "fourier_learned", "mlp"):
            raise ConversionError(f"{where}: model.time_mode={mode!r} is not a reference time mode")
        args["time_mode"] = mode
        if mode == "index":
            args["num_timestamps"] = int(_need(model, "timestamp_dim", where))
        if mode in ("sinusoidal", "fourier_learned"):
            args["num_frequencies"] = int(_need(model, "num_time_frequencies", where))
        if mode == "mlp":
            if int(model.get("time_input_dim") or 0) != 3:
                raise ConversionError(f"{where}: model.time_input_dim={model.get('time_input_dim')!r}; only the "
                                      "reference's 3 MLP inputs [days, sin DOY, cos DOY] are supported")
            args["time_hidden"] = int(_need(model, "time_mlp_hidden", where))
        args["trunk_blocks"] = int(model.get("n_blocks") or 3)
        args["final_activation"] = _activation(model.get("final_activation"), "none", where)
        bilinear = bool(model.get("bilinear", True))
        if model.get("hash_vectorized") is False and bilinear:
            # release/v1.0.1's non-vectorised loop averages the four corners whatever `bilinear` says
            logger.warning("%s: hash_vectorized is false: the reference's loop path averages the corners "
                           "(bilinear=False)", where)
            bilinear = False
        args["bilinear"] = bilinear
        if region_tiles is not None:  # main branch: the scale is the region's mosaic width, one tile high
            tiles = list(region_tiles)
            if size is None and len(tiles) > 1:
                raise ConversionError(f"{where}: region {'+'.join(tiles)} is a mosaic of {len(tiles)} tiles; its "
                                      "coordinate scale (mosaic width = 10980 x tiles - overlaps, computed by the "
                                      "reference from the rasters) is not in the configuration: give --region-size")
            size = S2_TILE_PX if size is None else size
            args["region_shape"] = [S2_TILE_PX, int(round(float(size)))]
        elif size is None:
            raise ConversionError(f"{where}: model.complete_tile_size is missing (the coordinate scale); give "
                                  "--region-size")
    args["region_size"] = float(size)
    if not args["region_size"] > 0:
        raise ConversionError(f"{where}: coordinate scale {size!r} must be a positive number of pixels")
    return variant, args


# -------------------------------------------------------------------------------------------- state dict
_PREFIXES = ("module.", "_orig_mod.")

# (reference pattern, project replacement) per code version; first match wins
_COMMON_RULES: list[tuple[str, str]] = [
    (r"^preproj\.(weight|bias)$", r"preproj.\1"),
    (r"^final_layer\.(0|1|3)\.(weight|bias)$", r"final_layer.\1.\2"),
]
_V100_RULES: list[tuple[str, str]] = [
    (r"^time_emb\.weight$", "time_encoder.embedding.weight"),
    (r"^resunet\.encoder\.initial\.([01])\.(.+)$", r"trunk.stem.\1.\2"),
    (r"^resunet\.encoder\.encoder([1-4])\.(.+)$", "LAYER"),
    (r"^resunet\.block_([0-3])\.fuse\.([01])\.(weight|bias)$", r"trunk.stages.\1.0.\2.\3"),
    (r"^resunet\.block_([0-3])\.resblocks\.(\d+)\.block\.([0134])\.(weight|bias)$", "RESBLOCK"),
    (r"^resunet\.upsample_final\.1\.(weight|bias)$", r"trunk.head.0.0.\1"),
    (r"^resunet\.res_block_final\.block\.([0134])\.(weight|bias)$", r"trunk.head.1.body.\1.\2"),
    (r"^resunet\.final_conv\.(weight|bias)$", r"trunk.head.2.\1"),
]
_LIGHT_RULES: list[tuple[str, str]] = [
    (r"^time_encoder\.emb\.weight$", "time_encoder.embedding.weight"),
    (r"^time_encoder\.freqs$", "time_encoder.frequencies"),
    (r"^time_encoder\.proj\.(weight|bias)$", r"time_encoder.proj.\1"),
    (r"^time_encoder\.net\.([024])\.(weight|bias)$", r"time_encoder.mlp.\1.\2"),
    (r"^light_head\.stem\.([01])\.(weight|bias)$", r"trunk.stem.\1.\2"),
    (r"^light_head\.blocks\.(\d+)\.block\.([0134])\.(weight|bias)$", r"trunk.blocks.\1.block.\2.\3"),
    (r"^light_head\.proj\.(weight|bias)$", r"trunk.proj.\1"),
]


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _map_key(key: str, v100: bool) -> str | None:
    if key == "encoder.tables":
        return "encoder.table"
    for pattern, repl in _COMMON_RULES + (_V100_RULES if v100 else _LIGHT_RULES):
        m = re.match(pattern, key)
        if not m:
            continue
        if repl == "LAYER":
            return f"trunk.layers.{int(m.group(1)) - 1}.{m.group(2)}"
        if repl == "RESBLOCK":
            return f"trunk.stages.{m.group(1)}.{int(m.group(2)) + 1}.body.{m.group(3)}.{m.group(4)}"
        return m.expand(repl)
    return None


def _listing(keys: Sequence[str], limit: int = 12) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def convert_state_dict(ref_state: Mapping[str, Tensor], generator: LIANetGenerator, v100: bool,
                       region_index: int | None = None, where: str = "checkpoint") -> dict[str, Tensor]:
    """The reference ``model_state_dict`` renamed to ``generator``'s keys (``region_index``: main-branch table).

    ``generator`` may live on the ``meta`` device (only its names, shapes and dtypes are used).

    Raises :class:`ConversionError` naming the keys that cannot be mapped, have another shape, or are missing.
    """
    target = generator.state_dict()
    params = {n for n, _ in generator.named_parameters()}
    out: dict[str, Tensor] = {}
    unmapped, shapes = [], []
    for raw, value in ref_state.items():
        if not isinstance(value, Tensor):
            unmapped.append(f"{raw} (not a tensor)")
            continue
        key = _strip(raw)
        new = _map_key(key, v100)
        if new is not None and new == "encoder.table" and region_index is not None:
            if value.ndim != 3 or not 0 <= region_index < value.shape[0]:
                shapes.append(f"{raw} {tuple(value.shape)} has no region {region_index}")
                continue
            value = value[region_index]
        if new is None or new not in target:
            unmapped.append(raw)
            continue
        if tuple(value.shape) != tuple(target[new].shape):
            shapes.append(f"{raw} {tuple(value.shape)} -> {new} {tuple(target[new].shape)}")
            continue
        if new in out:
            unmapped.append(f"{raw} (duplicate of another key mapped to {new})")
            continue
        out[new] = value.detach().to(target[new].dtype).clone().contiguous()
    if unmapped:
        raise ConversionError(f"{where}: {len(unmapped)} reference key(s) cannot be mapped to the project's "
                              f"LIANet-{generator.variant} generator: {_listing(unmapped)}")
    if shapes:
        raise ConversionError(f"{where}: {len(shapes)} tensor(s) do not match the generator rebuilt from "
                              f"used_parameters.json: {_listing(shapes)}")
    missing = [k for k in target if k not in out]
    missing_params = [k for k in missing if k in params]
    if missing_params:
        raise ConversionError(f"{where}: the reference checkpoint lacks {len(missing_params)} weight(s) of the "
                              f"generator: {_listing(missing_params)}")
    if missing:  # buffers the reference does not save (its non-persistent sinusoidal frequencies)
        if any(target[k].is_meta for k in missing):  # shapes-only generator: build a real one for the buffers
            target = LIANetGenerator(generator.variant, **{k: v for k, v in generator.config.items()
                                                           if k != "variant"}).state_dict()
        for k in missing:
            logger.info("%s: buffer %s not in the reference checkpoint: taken from the rebuilt generator", where, k)
            out[k] = target[k].detach().clone()
    return out


# ------------------------------------------------------------------------------------------------ driver
def convert_checkpoint(checkpoint: str | Path, parameters: str | Path, out: str | Path, region: str | None = None,
                       region_size: float | None = None, overwrite: bool = False) -> Path:
    """Convert the reference checkpoint ``checkpoint`` (+ its ``used_parameters.json``) into ``out``.

    Refuses to replace an existing ``out`` unless ``overwrite`` (and never replaces the inputs). The file is
    written to a temporary name next to ``out`` and renamed, so a failure leaves no partial file.
    """
    ckpt_path, param_path, out = Path(checkpoint), Path(parameters), Path(out)
    if out.exists() or out.is_symlink():
        if out.resolve() in {ckpt_path.resolve(), param_path.resolve()}:
            raise ConversionError(f"--out {str(out)!r} is one of the input files; choose another output path")
        if not overwrite:
            raise ConversionError(f"--out {str(out)!r} already exists; refusing to overwrite a file this command did "
                                  "not just write (pass --overwrite to replace it)")
        if out.is_dir():
            raise ConversionError(f"--out {str(out)!r} is a directory")
    params = read_parameters(param_path)
    where = str(ckpt_path)
    ckpt = read_checkpoint(ckpt_path, "LIANet reference")
    state = ckpt.get("model_state_dict")
    if not isinstance(state, Mapping):
        raise ConversionError(f"{where}: no 'model_state_dict' entry (found {_listing([str(k) for k in ckpt])}); "
                              "expected a checkpoint written by the reference's trainer")
    cls = _model_class(params["model"], str(param_path))
    v100 = cls == _V100_CLASS
    tables = next((v for k, v in state.items() if _strip(k) == "encoder.tables"), None)
    if not isinstance(tables, Tensor):
        raise ConversionError(f"{where}: no 'encoder.tables' hash tables in model_state_dict")
    region_index, region_name, tiles = None, None, None
    if not v100 and tables.ndim == 3:  # main branch: one shared table per region
        regions = region_table(params)
        region_index, region_name = _select_region(region, int(tables.shape[0]), regions, where)
        tiles = regions.get(str(region_index), [])
    elif region is not None:
        raise ConversionError(f"{where}: --region {region!r} given, but the checkpoint holds one region's tables "
                              f"({tuple(tables.shape)})")
    variant, args = generator_args_from_reference(params, tiles, region_size, str(param_path))
    generator_config(variant, **args)  # validates
    with torch.device("meta"):  # names and shapes only: no memory, no random initialisation
        generator = LIANetGenerator(variant, **args)
    gen_state = convert_state_dict(state, generator, v100, region_index, where)
    generator.load_state_dict(gen_state, strict=True, assign=True)  # every key present with its shape
    cfg = dict(generator.config)
    provenance = {"checkpoint": str(ckpt_path.resolve()), "parameters": str(param_path.resolve()),
                  "model_class": str(params["model"].get("_target_")), "region": region_name,
                  "region_index": region_index}
    hparams = {"variant": variant, "generator_args": {k: v for k, v in cfg.items() if k != "variant"}}
    from lightning.pytorch import __version__ as lightning_version

    payload = {CKPT_KEY: {"config": cfg}, "state_dict": {f"generator.{k}": v for k, v in gen_state.items()},
               "hyper_parameters": hparams, "pytorch-lightning_version": lightning_version,
               "lianet_converted_from": provenance}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
