"""LIANet ("Location Is All You Need"): a coordinate-only implicit representation of Sentinel-2 over one region.

The generator maps a patch origin ``(x0, y0)`` in the pretraining region's pixel grid and an
acquisition time to the 12-band Sentinel-2 L2A patch: multiresolution hash encoding of every pixel's
coordinates (:class:`~terratorch_eoplugins.nn.hash_encoding.HashGridEncoding2D`) + a time vector
(:class:`~terratorch_eoplugins.nn.time_encoding.TimeEncoding`) added to it, a 1x1 pre-projection,
a CNN trunk and a final 3x3 conv block to the bands. Variants (defaults = the authors' code,
``mojganmadadi/LIANet``):

* ``base``: per-level tables (L = 11, F = 4, T = 2**17; the reference config's ``feat_dim: 4``, 74.8M
  parameters), index time embedding (4 seasons, N(0, 1e-3) init), ResNet50 U-Net trunk (decoder widths 512, 256,
  256, 256; the reference's biased skip-fusion convs and final up-conv without GroupNorm), pixel-centre
  coordinates (``x0 + 0.5 ... x0 + H - 0.5``), ReLU output (reference tag v1.0.0; tag v1.0.1, which the
  supplement links, holds the same code);
* ``large``: same with a ResNet101 encoder and decoder widths 512 x 4;
* ``modified``: one shared table (L = 13, F = 128, T = 2**19), learned Fourier time encoding, a light
  full-resolution CNN trunk (1x1 to 256, three residual 3x3 blocks, 1x1 to 128), pixel-corner coordinates
  (``x0 ... x0 + H - 1``), identity output (reference branch ``release/v1.0.1`` = tag v4.2.0, the PASTIS/BurnScars
  model).

Options that select the project's earlier choices (loaded automatically for checkpoints written before the
options existed, see :data:`LEGACY_DEFAULTS`): ``pixel_centers``, ``resunet_decoder="groupnorm"``,
``activate_features=False``, ``mlp_phase="year_fraction"``. Authors' checkpoints are imported with
:mod:`terratorch_eoplugins.models.lianet_convert` (``eoplugins lianet-convert``).

Fine-tuning (:func:`lianet_base`, :func:`lianet_large`, :func:`lianet_modified` in terratorch's backbone
registry): the generator is loaded from a pretraining checkpoint, frozen (kept in eval mode by default, so batch
norm statistics do not drift; ``freeze_eval=False`` follows the reference), and its 128-channel trunk features,
passed through the generator's output activation as in the reference (ReLU for Base/Large), are the backbone
output. The
patch origin and time reach the backbone as batch keys ``origin_px`` (``[B, 2]`` = column, row of the
patch's top-left pixel) and ``time_days`` (``[B]`` days since 2015-01-01) or ``time_index``; the
``image`` batch entry is only a placeholder whose spatial size sets the patch size. The paper's
convolutional head is the ``eoplugins_lianet_classifier_head`` decoder (conv blocks + the reference's 3x3 classifier;
terratorch adds no head) or ``lianet_head`` (conv blocks; terratorch adds its 1x1 classifier).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from terratorch.registry import DECODER_REGISTRY, TERRATORCH_BACKBONE_REGISTRY, TERRATORCH_DECODER_REGISTRY
from terratorch.registry.registry import Registry
from torch import Tensor, nn
from torch.nn import functional as F

from terratorch_eoplugins.models.pretrained import (
    PRETRAINED_FLAG,
    check_builder_kwargs,
    log_restored,
    resolve_source,
    warn_no_pretrained,
)
from terratorch_eoplugins.nn.hash_encoding import HashGridEncoding2D
from terratorch_eoplugins.nn.time_encoding import TimeEncoding
from terratorch_eoplugins.runtime import read_checkpoint

logger = logging.getLogger("terratorch_eoplugins.models.lianet")

__all__ = [
    "LEGACY_DEFAULTS", "LIANET_VARIANTS", "LIANetBackbone", "LIANetGenerator", "LIANetHead", "generator_config",
    "lianet_base", "lianet_classifier_head", "lianet_head", "lianet_large", "lianet_modified", "load_generator",
    "parameter_counts", "save_generator",
]

#: prefix of the decoder-registry source of decoders that include their classifier (terratorch adds no head)
HEAD_SOURCE = "eoplugins"
REGISTERED = {"backbone": ["lianet_base", "lianet_large", "lianet_modified"],
              "decoder": ["lianet_head", f"{HEAD_SOURCE}_lianet_classifier_head"]}

#: Checkpoint key holding the generator configuration (plain Python types only).
CKPT_KEY = "lianet"

_COMMON: dict[str, Any] = {
    "base_resolution": 16, "growth": 2.0, "region_size": 10980.0, "per_level_seeds": True, "bilinear": True,
    "init_range": None, "num_timestamps": None, "num_frequencies": 8, "time_hidden": 64, "time_scale": 1.0,
    "preproj_channels": 128, "trunk_hidden": 256, "trunk_blocks": 3, "trunk_out": 128, "decoder_widths": None,
    "out_bands": 12, "region_shape": None, "acquisitions": None, "region_crs": None, "region_transform": None,
    "mlp_phase": "doy", "time_init_std": 0.02, "resunet_decoder": "reference", "activate_features": True,
}
#: Default hyper-parameters of each variant (reference values; override any of them by keyword).
LIANET_VARIANTS: dict[str, dict[str, Any]] = {
    "base": {**_COMMON, "levels": 11, "features_per_level": 4, "log2_table_size": 17, "shared_table": False,
             "time_mode": "index", "num_timestamps": 4, "time_init_std": 1e-3, "trunk": "resnet50",
             "decoder_widths": [512, 256, 256, 256], "final_activation": "relu", "clamp": 100.0,
             "pixel_centers": True},
    "large": {**_COMMON, "levels": 11, "features_per_level": 4, "log2_table_size": 17, "shared_table": False,
              "time_mode": "index", "num_timestamps": 4, "time_init_std": 1e-3, "trunk": "resnet101",
              "decoder_widths": [512, 512, 512, 512], "final_activation": "relu", "clamp": 100.0,
              "pixel_centers": True},
    "modified": {**_COMMON, "levels": 13, "features_per_level": 128, "log2_table_size": 19, "shared_table": True,
                 "time_mode": "fourier_learned", "trunk": "lite", "final_activation": "none", "clamp": None,
                 "pixel_centers": False},
}
#: values of options added after checkpoints were first written: a stored configuration without the key was
#: trained with the project's earlier behaviour, so loading it (load_generator, the pretraining task) fills these in
LEGACY_DEFAULTS: dict[str, Any] = {"pixel_centers": False, "resunet_decoder": "groupnorm", "activate_features": False,
                                   "mlp_phase": "year_fraction", "time_init_std": 0.02}


def with_legacy_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """A stored generator configuration completed with :data:`LEGACY_DEFAULTS` for the keys it lacks."""
    return {**LEGACY_DEFAULTS, **dict(config)}


def generator_config(variant: str = "modified", **overrides: Any) -> dict[str, Any]:
    """Complete generator configuration of ``variant`` with ``overrides`` applied (unknown keys rejected)."""
    if variant not in LIANET_VARIANTS:
        raise ValueError(f"unknown LIANet variant {variant!r}: expected one of {sorted(LIANET_VARIANTS)}")
    cfg = copy.deepcopy(LIANET_VARIANTS[variant])
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise ValueError(f"unknown LIANet generator argument(s) {unknown}; valid: {sorted(cfg)}")
    cfg.update({k: copy.deepcopy(v) for k, v in overrides.items()})
    cfg["variant"] = variant
    if cfg["acquisitions"] is not None:
        cfg["acquisitions"] = [float(a) for a in cfg["acquisitions"]]
        if cfg["time_mode"] == "index":
            cfg["num_timestamps"] = len(cfg["acquisitions"])
    if cfg["region_shape"] is not None:
        cfg["region_shape"] = [int(v) for v in cfg["region_shape"]]
    if cfg["resunet_decoder"] not in ("reference", "groupnorm"):
        raise ValueError(f"resunet_decoder must be 'reference' or 'groupnorm', got {cfg['resunet_decoder']!r}")
    return cfg


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 4 groups up to 64 channels, 8 up to 128, 16 up to 256, else 32 (divisor-safe)."""
    groups = 4 if channels <= 64 else 8 if channels <= 128 else 16 if channels <= 256 else 32
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


class ConvResBlock(nn.Module):
    """3x3 conv - GN - GELU - 3x3 conv - GN, added with weight ``res_scale``, then GELU."""

    def __init__(self, channels: int, res_scale: float = 0.1) -> None:
        super().__init__()
        self.res_scale = res_scale
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), group_norm(channels), nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), group_norm(channels))
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.res_scale * self.block(x))


class LiteTrunk(nn.Module):
    """LIANet-Modified trunk at full resolution: 1x1 to ``hidden`` + GN + GELU, residual blocks, 1x1 to ``out``."""

    def __init__(self, in_channels: int, out_channels: int = 128, hidden: int = 256, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), group_norm(hidden), nn.GELU())
        self.blocks = nn.Sequential(*[ConvResBlock(hidden) for _ in range(blocks)])
        self.proj = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.blocks(self.stem(x)))


class _GNResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), group_norm(channels),
                                  nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  group_norm(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.body(x))


def _conv_gn_relu(cin: int, cout: int, bias: bool = False, norm: bool = True) -> nn.Sequential:
    """3x3 conv (+ bias) + GroupNorm (or identity, keeping the module indices) + ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=bias), group_norm(cout) if norm else nn.Identity(),
                         nn.ReLU(inplace=True))


class ResUNetTrunk(nn.Module):
    """LIANet-Base/Large trunk: untrained torchvision ResNet encoder (5 stages, /2 ... /32) and a GN U-Net decoder.

    The ResNet's first conv takes ``in_channels``; each decoder stage upsamples x2 (bilinear), concatenates the
    skip, applies 3x3 conv + GN + ReLU and three GN residual blocks; a last x2 upsampling, 3x3 conv to 256 + ReLU,
    one residual block and a 1x1 conv give ``out_channels`` at full resolution. Input sides must be multiples of 32.

    ``decoder="reference"`` (``Pretraining/src/models/ResUNet.py``, tag v1.0.0): the four skip-fusion convs and the
    final up-conv keep their biases and the up-conv has no GroupNorm. ``decoder="groupnorm"``: the project's earlier
    variant (bias-free convs, GroupNorm after the up-conv), kept to load checkpoints trained with it.
    """

    def __init__(self, in_channels: int, depth: str = "resnet50", widths: Sequence[int] = (512, 256, 256, 256),
                 out_channels: int = 128, decoder: str = "reference") -> None:
        super().__init__()
        import torchvision

        if depth not in ("resnet50", "resnet101"):
            raise ValueError(f"ResUNet depth must be 'resnet50' or 'resnet101', got {depth!r}")
        if len(widths) != 4:
            raise ValueError(f"decoder_widths must have 4 values, got {list(widths)}")
        if decoder not in ("reference", "groupnorm"):
            raise ValueError(f"ResUNet decoder must be 'reference' or 'groupnorm', got {decoder!r}")
        ref = decoder == "reference"
        net = getattr(torchvision.models, depth)(weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu)
        self.pool = net.maxpool
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        skips = [1024, 512, 256, 64]
        stages = []
        cin = 2048
        for w, s in zip(widths, skips):
            stages.append(nn.Sequential(_conv_gn_relu(cin + s, w, bias=ref), *[_GNResBlock(w) for _ in range(3)]))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.head = nn.Sequential(_conv_gn_relu(cin, 256, bias=ref, norm=not ref), _GNResBlock(256),
                                  nn.Conv2d(256, out_channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"the ResUNet trunk needs patch sides that are multiples of 32, got {h}x{w}")
        s0 = self.stem(x)
        feats = [s0]
        y = self.pool(s0)
        for layer in self.layers:
            y = layer(y)
            feats.append(y)
        y = feats[-1]
        for stage, skip in zip(self.stages, reversed(feats[:-1])):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = stage(torch.cat([y, skip], dim=1))
        y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        return self.head(y)


class LIANetGenerator(nn.Module):
    """LIANet generator: (patch origin, time) -> Sentinel-2 patch ``[B, 12, H, W]``.

    Args:
        variant: ``"base"``, ``"large"`` or ``"modified"`` (defaults of :data:`LIANET_VARIANTS`).
        **overrides: any key of the variant's configuration (hash grid: ``levels``, ``features_per_level``,
            ``log2_table_size``, ``base_resolution``, ``growth``, ``region_size``, ``shared_table``,
            ``per_level_seeds``, ``bilinear``, ``init_range``; time: ``time_mode``, ``num_timestamps``,
            ``num_frequencies``, ``time_hidden``, ``time_scale``; trunk: ``preproj_channels``, ``trunk``
            (``lite``/``resnet50``/``resnet101``), ``trunk_hidden``, ``trunk_blocks``, ``trunk_out``,
            ``decoder_widths``, ``resunet_decoder`` (``reference``/``groupnorm``); output: ``out_bands``,
            ``final_activation`` (``relu``/``none``), ``clamp``, ``activate_features`` (fine-tuning features pass
            through the output activation, as in the reference); coordinates: ``pixel_centers`` (sample pixel
            centres ``x0 + 0.5 ...``, the v1.0.0 reference, or corners ``x0 ...``, release/v1.0.1); time extras:
            ``mlp_phase`` (``doy``/``year_fraction``), ``time_init_std`` (index embedding init);
            region metadata used for range checks: ``region_shape`` (H, W), ``acquisitions`` (days since
            2015-01-01 of the pretraining acquisitions), ``region_crs``, ``region_transform``).
    """

    def __init__(self, variant: str = "modified", **overrides: Any) -> None:
        super().__init__()
        cfg = generator_config(variant, **overrides)
        self.config = cfg
        self.variant = variant
        self.encoder = HashGridEncoding2D(
            levels=cfg["levels"], features_per_level=cfg["features_per_level"],
            log2_table_size=cfg["log2_table_size"], base_resolution=cfg["base_resolution"], growth=cfg["growth"],
            region_size=cfg["region_size"], shared_table=cfg["shared_table"], per_level_seeds=cfg["per_level_seeds"],
            bilinear=cfg["bilinear"], init_range=cfg["init_range"])
        enc_ch = self.encoder.out_dim
        self.time_encoder = TimeEncoding(cfg["time_mode"], enc_ch, num_timestamps=cfg["num_timestamps"],
                                         num_frequencies=cfg["num_frequencies"], hidden_dim=cfg["time_hidden"],
                                         time_scale=cfg["time_scale"], mlp_phase=cfg["mlp_phase"],
                                         index_init_std=cfg["time_init_std"])
        pre = cfg["preproj_channels"]
        self.preproj = nn.Conv2d(enc_ch, pre, 1) if pre else nn.Identity()
        trunk_in = pre or enc_ch
        if cfg["trunk"] == "lite":
            self.trunk: nn.Module = LiteTrunk(trunk_in, cfg["trunk_out"], cfg["trunk_hidden"], cfg["trunk_blocks"])
        elif cfg["trunk"] in ("resnet50", "resnet101"):
            self.trunk = ResUNetTrunk(trunk_in, cfg["trunk"], cfg["decoder_widths"] or (512, 256, 256, 256),
                                      cfg["trunk_out"], decoder=cfg["resunet_decoder"])
        else:
            raise ValueError(f"trunk must be 'lite', 'resnet50' or 'resnet101', got {cfg['trunk']!r}")
        c = cfg["trunk_out"]
        self.final_layer = nn.Sequential(nn.Conv2d(c, c // 2, 3, padding=1), group_norm(c // 2), nn.ReLU(inplace=True),
                                         nn.Conv2d(c // 2, cfg["out_bands"], 3, padding=1))
        if cfg["final_activation"] not in ("relu", "none", None):
            raise ValueError(f"final_activation must be 'relu' or 'none', got {cfg['final_activation']!r}")
        self.out_act = nn.ReLU() if cfg["final_activation"] == "relu" else nn.Identity()
        acq = cfg["acquisitions"]
        self.register_buffer("acquisitions", torch.tensor(acq if acq else [], dtype=torch.float64), persistent=False)

    # ------------------------------------------------------------------------------------ checks
    @property
    def feature_channels(self) -> int:
        """Channels of the trunk features (the fine-tuning backbone output)."""
        return int(self.config["trunk_out"])

    def region_extent(self) -> tuple[int, int]:
        """(height, width) in pixels of the pretraining region (square of ``region_size`` if unknown)."""
        if self.config["region_shape"] is not None:
            h, w = self.config["region_shape"]
            return int(h), int(w)
        s = int(self.config["region_size"])
        return s, s

    def check_origin(self, origin: Tensor, size: tuple[int, int]) -> None:
        """Raise ``ValueError`` if a patch of ``size`` at ``origin`` (``[B, 2]`` x, y) leaves the region."""
        if origin.ndim != 2 or origin.shape[1] != 2:
            raise ValueError(f"origin_px must have shape [B, 2] (column, row), got {tuple(origin.shape)}")
        if not torch.isfinite(origin).all():
            raise ValueError("origin_px contains NaN or infinite values")
        rh, rw = self.region_extent()
        x, y = origin[:, 0], origin[:, 1]
        bad = (x < 0) | (y < 0) | (x + size[1] > rw) | (y + size[0] > rh)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"patch origin (x={float(x[i]):g}, y={float(y[i]):g}) with size {size[0]}x{size[1]} lies "
                             f"outside the pretrained region of {rh}x{rw} pixels")

    def resolve_time(self, time_days: Tensor | None = None, time_index: Tensor | None = None,
                     tolerance_days: float = 0.5) -> Tensor:
        """Time input of the time encoder; checks that days lie within the pretraining period.

        For ``index`` mode a day value is mapped to the pretraining acquisition within
        ``tolerance_days`` (error if none).
        """
        acq = self.acquisitions
        if self.time_encoder.needs_index:
            if time_index is not None:
                return time_index.long().reshape(-1)
            if time_days is None:
                raise ValueError("time mode 'index' needs time_index or time_days (with known acquisitions)")
            if acq.numel() == 0:
                raise ValueError("time mode 'index' got time_days but the generator knows no acquisition list")
            d = (time_days.double().reshape(-1, 1) - acq.to(time_days.device)[None]).abs()
            best, idx = d.min(dim=1)
            if (best > tolerance_days).any():
                i = int((best > tolerance_days).nonzero()[0])
                raise ValueError(f"date {float(time_days.reshape(-1)[i]):.2f} (days since 2015-01-01) matches no "
                                 f"pretraining acquisition within {tolerance_days} days; 'index' time cannot "
                                 "represent unseen dates")
            return idx
        if time_days is None:
            raise ValueError(f"time mode {self.config['time_mode']!r} needs time_days (days since 2015-01-01)")
        t = time_days.reshape(-1)
        if not torch.isfinite(t).all():
            raise ValueError("time_days contains NaN or infinite values")
        if acq.numel():
            lo, hi = float(acq.min()) - 1.0, float(acq.max()) + 1.0
            bad = (t < lo) | (t > hi)
            if bad.any():
                v = float(t[bad][0])
                raise ValueError(f"time {v:.2f} days since 2015-01-01 is outside the pretrained period "
                                 f"[{lo + 1:.2f}, {hi - 1:.2f}]")
        return t

    # ----------------------------------------------------------------------------------- forward
    def encode(self, origin: Tensor, t: Tensor, size: tuple[int, int]) -> Tensor:
        """Hash features plus time vector, ``[B, L*F, H, W]`` (channels-last memory)."""
        b = origin.shape[0]
        h, w = size
        dev = self.encoder.table.device
        ys, xs = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32),
                                torch.arange(w, device=dev, dtype=torch.float32), indexing="ij")
        grid = torch.stack([xs, ys], dim=-1).reshape(1, h * w, 2)
        if self.config["pixel_centers"]:
            grid = grid + 0.5  # exact in float32, as the reference's linspace(0.5, H - 0.5, H)
        coords = (grid + origin.to(dev, torch.float32)[:, None, :]).reshape(b * h * w, 2)
        enc = self.encoder(coords).view(b, h, w, -1)
        tf = self.time_encoder(t.to(dev)).to(enc.dtype)
        enc = enc + tf[:, None, None, :]
        return enc.permute(0, 3, 1, 2)

    def features(self, origin: Tensor, t: Tensor, size: tuple[int, int] | int = 128) -> Tensor:
        """Trunk features ``[B, trunk_out, H, W]`` of patches at ``origin`` (``[B, 2]`` x, y) and times ``t``."""
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.check_origin(origin, size)
        x = self.encode(origin, t, size)
        if self.config["clamp"]:
            x = x.clamp(-self.config["clamp"], self.config["clamp"])
        return self.trunk(self.preproj(x)).contiguous()

    def backbone_features(self, origin: Tensor, t: Tensor, size: tuple[int, int] | int = 128) -> Tensor:
        """Fine-tuning features: :meth:`features` through the output activation if ``activate_features`` (the
        reference replaces ``final_layer`` by an identity, so its features pass ``out_act``: ReLU for Base/Large)."""
        feats = self.features(origin, t, size)
        return self.out_act(feats) if self.config["activate_features"] else feats

    def forward(self, origin: Tensor, t: Tensor, size: tuple[int, int] | int = 128) -> Tensor:
        """Reconstructed L2A reflectance ``[B, out_bands, H, W]`` (units of ``(DN - 1000) / 10000``)."""
        return self.out_act(self.final_layer(self.features(origin, t, size))).contiguous()


# ---------------------------------------------------------------------------------- checkpoints
def save_generator(generator: LIANetGenerator, path: str | Path) -> Path:
    """Write ``{"lianet": {"config": ...}, "state_dict": ...}`` (plain types and tensors: ``weights_only``-safe)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({CKPT_KEY: {"config": copy.deepcopy(generator.config)}, "state_dict": generator.state_dict()}, path)
    return path


def load_generator(ckpt_path: str | Path, variant: str | None = None, **expected: Any) -> LIANetGenerator:
    """Rebuild a generator from a pretraining checkpoint (Lightning ``.ckpt`` or :func:`save_generator` file).

    Loads with ``torch.load(..., weights_only=True)``. Raises ``ValueError`` if the checkpoint was trained for
    another ``variant`` or if an ``expected`` hyper-parameter differs from the stored one.
    """
    path = Path(ckpt_path)
    ckpt = read_checkpoint(path, "LIANet")
    if CKPT_KEY not in ckpt or "config" not in ckpt[CKPT_KEY]:
        raise ValueError(f"{path}: not a LIANet checkpoint (no {CKPT_KEY!r} entry with the generator config)")
    cfg = with_legacy_defaults(ckpt[CKPT_KEY]["config"])
    stored_variant = cfg.pop("variant", None)
    if variant is not None and stored_variant != variant:
        raise ValueError(f"{path}: checkpoint holds a LIANet-{stored_variant} generator, not LIANet-{variant}; "
                         f"use the lianet_{stored_variant} backbone or another checkpoint")
    for k, v in expected.items():
        if k in cfg and v is not None and cfg[k] != v:
            raise ValueError(f"{path}: generator argument {k}={v!r} differs from the checkpoint's {cfg[k]!r}")
    state = ckpt.get("state_dict")
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: no 'state_dict' in the checkpoint")
    keys = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    if any(k.startswith("generator.") for k in keys):  # Lightning checkpoint of LIANetPretrainTask
        gen_state = {k[len("generator."):]: v for k, v in keys.items() if k.startswith("generator.")}
    else:  # save_generator export
        gen_state = keys
    generator = LIANetGenerator(stored_variant or "modified", **cfg)
    missing, unexpected = generator.load_state_dict(gen_state, strict=False)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks generator weights {missing[:5]}{'...' if len(missing) > 5 else ''}")
    if unexpected:
        logger.warning("%s: ignored %d unexpected entries (e.g. %s)", path, len(unexpected), unexpected[:3])
    return generator


def parameter_counts(generator: LIANetGenerator | None = None, variant: str = "modified",
                     **overrides: Any) -> dict[str, int]:
    """Parameters per part (hash tables, time encoder, pre-projection, trunk, final layer, total).

    Without ``generator``, the variant is built on the ``meta`` device (no memory), so paper-size
    configurations can be counted anywhere.
    """
    if generator is None:
        with torch.device("meta"):
            generator = LIANetGenerator(variant, **overrides)

    def n(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    counts = {"hash_tables": n(generator.encoder), "time_encoder": n(generator.time_encoder),
              "preproj": n(generator.preproj), "trunk": n(generator.trunk), "final_layer": n(generator.final_layer)}
    counts["total"] = sum(counts.values())
    counts["without_tables"] = counts["total"] - counts["hash_tables"]
    return counts


# ---------------------------------------------------------------------------------- fine-tuning
class LIANetBackbone(nn.Module):
    """terratorch backbone around a (frozen) :class:`LIANetGenerator`; returns ``[trunk features]``.

    ``forward(x, origin_px, time_days=None, time_index=None, **kwargs)``: ``x`` is only used for its
    spatial size (the image placeholder of the LIANet datamodules); other batch keys are ignored. Features:
    :meth:`LIANetGenerator.backbone_features`.

    ``freeze_eval``: a frozen generator stays in eval mode (default). The reference's ``DownstreamModel`` calls
    ``generator.eval()`` once and the training loop's ``model.train()`` puts it back in train mode, so the ResNet
    batch-norm statistics of Base/Large keep drifting while the head trains (the features of a "frozen" backbone
    change); the project deliberately avoids that. ``freeze_eval=False`` reproduces the reference.
    """

    def __init__(self, generator: LIANetGenerator, freeze: bool = True, pretrained_source: str | None = None,
                 freeze_eval: bool = True) -> None:
        super().__init__()
        self.generator = generator
        self.freeze_eval = bool(freeze_eval)
        self.out_channels = [generator.feature_channels]
        #: absolute path of the pretraining checkpoint the generator came from (``None``: random generator)
        self.pretrained_source = pretrained_source
        self.frozen = False
        if freeze:
            self.freeze()

    def self_contained_args(self) -> dict[str, Any]:
        """Builder arguments that rebuild this backbone without its pretraining file: the generator's whole
        configuration, region metadata included (see :mod:`terratorch_eoplugins.models.pretrained`); ``{}`` for a
        random generator."""
        if self.pretrained_source is None:
            return {}
        config = {k: copy.deepcopy(v) for k, v in self.generator.config.items() if k != "variant"}
        return {"ckpt_path": None, "pretrained_from": self.pretrained_source, "generator_args": config}

    def freeze(self) -> None:
        """Freeze the whole generator (tables, time encoder, trunk) and put it in eval mode (kept there if
        ``freeze_eval``)."""
        for p in self.generator.parameters():
            p.requires_grad_(False)
        self.frozen = True
        self.generator.eval()

    def train(self, mode: bool = True) -> LIANetBackbone:
        super().train(mode)
        if self.frozen and self.freeze_eval:
            self.generator.eval()  # no batch-norm statistics drift while fine-tuning (reference: see class doc)
        return self

    def forward(self, x: Tensor | Mapping[str, Tensor] | None = None, origin_px: Tensor | None = None,
                time_days: Tensor | None = None, time_index: Tensor | None = None, **kwargs: Any) -> list[Tensor]:
        if origin_px is None:
            raise ValueError("the LIANet backbone needs the batch key 'origin_px' ([B, 2] column, row of the patch "
                             "origin in the pretraining region); use a LIANet datamodule with "
                             "batch_keys [origin_px, time_days]")
        if isinstance(x, Tensor) and x.ndim >= 3:
            size = (int(x.shape[-2]), int(x.shape[-1]))
        else:
            size = (128, 128)
        t = self.generator.resolve_time(time_days, time_index)
        ctx = torch.no_grad() if self.frozen else torch.enable_grad()
        with ctx:
            feats = self.generator.backbone_features(origin_px.float(), t, size)
        return [feats]

    def reconstruct(self, origin_px: Tensor, time_days: Tensor | None = None, time_index: Tensor | None = None,
                    size: int | tuple[int, int] = 128) -> Tensor:
        """Sentinel-2 reconstruction of the generator for the same inputs."""
        return self.generator(origin_px.float(), self.generator.resolve_time(time_days, time_index), size)


#: keyword arguments of the lianet_* builders besides the generator configuration keys
_BUILDER_ARGS = ("ckpt_path", "pretrained", "freeze", "generator_args", "pretrained_from", "freeze_eval")


def _build_backbone(variant: str, ckpt_path: str | None, pretrained: bool, freeze: bool,
                    generator_args: Mapping[str, Any] | None, kwargs: Mapping[str, Any],
                    pretrained_from: str | None = None) -> LIANetBackbone:
    kwargs = dict(kwargs)
    freeze_eval = bool(kwargs.pop("freeze_eval", True))
    name = f"lianet_{variant}"
    known = set(LIANET_VARIANTS[variant])
    check_builder_kwargs(name, {k: v for k, v in kwargs.items() if k not in known}, (*_BUILDER_ARGS, *sorted(known)))
    args = dict(generator_args or {})
    unknown = sorted(set(args) - known - {"variant"})
    if unknown:
        raise ValueError(f"{name}: unknown generator_args key(s) {unknown} (model_args backbone_generator_args); "
                         f"accepted: {sorted(known)}")
    args.pop("variant", None)
    args.update(kwargs)  # generator keys given directly (backbone_levels: ...)
    if ckpt_path:
        generator = load_generator(ckpt_path, variant=variant, **args)
        source: str | None = resolve_source(ckpt_path)
    else:
        if pretrained and not pretrained_from:
            raise ValueError(f"{name}: pretrained=True needs ckpt_path (a LIANet pretraining checkpoint of "
                             "the same region; no weights can be downloaded)")
        if pretrained_from:  # self-contained checkpoint: its full config, older ones lack the later options
            args = with_legacy_defaults(args)
        generator = LIANetGenerator(variant, **args)
        source = pretrained_from
        if source:
            log_restored(name, source)
        else:
            warn_no_pretrained(name, f"model_args.{PRETRAINED_FLAG}", "the frozen generator is random",
                               "pretrain with configs/lianet_pretrain_*.yaml and pass its checkpoint as "
                               f"--model.init_args.model_args.{PRETRAINED_FLAG}")
    return LIANetBackbone(generator, freeze=freeze, pretrained_source=source, freeze_eval=freeze_eval)


@TERRATORCH_BACKBONE_REGISTRY.register
def lianet_base(ckpt_path: str | None = None, pretrained: bool = False, freeze: bool = True,
                generator_args: Mapping[str, Any] | None = None, pretrained_from: str | None = None,
                **kwargs: Any) -> LIANetBackbone:
    """LIANet-Base backbone (ResNet50 U-Net trunk); ``ckpt_path`` = pretraining checkpoint of the region.

    ``generator_args`` (or generator keys given directly) set the generator configuration (checked against the
    checkpoint); ``pretrained_from`` is written by self-contained checkpoints and never read
    (:mod:`terratorch_eoplugins.models.pretrained`); ``freeze_eval`` (default True): see :class:`LIANetBackbone`.
    An authors' checkpoint is first converted with ``eoplugins lianet-convert``. Other keyword arguments are errors.
    """
    return _build_backbone("base", ckpt_path, pretrained, freeze, generator_args, kwargs, pretrained_from)


@TERRATORCH_BACKBONE_REGISTRY.register
def lianet_large(ckpt_path: str | None = None, pretrained: bool = False, freeze: bool = True,
                 generator_args: Mapping[str, Any] | None = None, pretrained_from: str | None = None,
                 **kwargs: Any) -> LIANetBackbone:
    """LIANet-Large backbone (ResNet101 U-Net trunk); arguments as :func:`lianet_base`."""
    return _build_backbone("large", ckpt_path, pretrained, freeze, generator_args, kwargs, pretrained_from)


@TERRATORCH_BACKBONE_REGISTRY.register
def lianet_modified(ckpt_path: str | None = None, pretrained: bool = False, freeze: bool = True,
                    generator_args: Mapping[str, Any] | None = None, pretrained_from: str | None = None,
                    **kwargs: Any) -> LIANetBackbone:
    """LIANet-Modified backbone (shared 2**19 table, 13 levels, light trunk); arguments as :func:`lianet_base`."""
    return _build_backbone("modified", ckpt_path, pretrained, freeze, generator_args, kwargs, pretrained_from)


#: initialisations of :class:`LIANetHead`'s included classifier (the first is the reference's)
CLASSIFIER_INITS: tuple[str, ...] = ("kaiming", "zero")


class LIANetHead(nn.Module):
    """The paper's fine-tuning head: 3x3 conv + GN + ReLU blocks, optionally with its classifier conv.

    Default channels (reference ``release/v1.0.1``): 4 x 128, 4 x 64, 2 x 32 (~0.80M parameters on 128 input
    channels). Without ``num_classes`` (decoder ``lianet_head``) terratorch's segmentation/regression head adds a 1x1
    classifier; with it (decoder ``eoplugins_lianet_classifier_head``) the head ends in the reference's
    ``classifier_kernel`` x ``classifier_kernel`` classifier conv (3) and terratorch adds none. Kaiming-normal
    initialisation (fan-out, as the reference), zero biases.

    Args:
        embed_dim: channels of the backbone features (terratorch passes the list).
        channels: output channels of each conv block.
        in_index: which backbone feature map to use.
        num_classes: classes (or regression outputs) of the included classifier; ``None``: no classifier.
        classifier_kernel: kernel size of the included classifier (odd; 3 in the reference, 1 = terratorch's).
        upsample: output scale of the head: 1 (default), 2 or 4; each factor 2 is one bilinear x2 (4 = the
            reference's ``replace_final_block_4x`` for 2.5 m building footprints from 10 m features). Models using
            it need ``rescale: false`` in terratorch's ``model_args``.
        upsample_after: indices of the conv blocks each x2 comes after (one per factor 2, non-decreasing).
            ``None``: the reference's placement, after the last block of each width stage but the last (blocks 4
            and 8 of the default channels, so the later blocks work at 5 m and 2.5 m), factors left over after the
            last block (e.g. both after a single-width ``[32, 32]``). ``[n - 1, n - 1]`` (``n`` blocks) puts both
            after the conv blocks, the layout of this project's earlier releases.
        classifier_init: initialisation of the included classifier: ``"kaiming"`` (default, the reference's
            Kaiming-normal fan-out like the conv blocks) or ``"zero"`` (zero weights and bias: the head starts at
            output 0, i.e. uniform logits or a regression of 0). Not the paper's; for short fine-tuning runs of a
            regression on a 0-1 target, whose Kaiming start lies several units off (see the profiles that use it).
    """

    def __init__(self, embed_dim: Sequence[int], channels: Sequence[int] = (128, 128, 128, 128, 64, 64, 64, 64, 32, 32),
                 in_index: int = -1, num_classes: int | None = None, classifier_kernel: int = 3,
                 upsample: int = 1, upsample_after: Sequence[int] | None = None,
                 classifier_init: str = "kaiming") -> None:
        super().__init__()
        if not channels:
            raise ValueError("channels must list at least one conv block width")
        if classifier_kernel < 1 or classifier_kernel % 2 == 0:
            raise ValueError(f"classifier_kernel must be a positive odd number, got {classifier_kernel}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if upsample not in (1, 2, 4):
            raise ValueError(f"upsample must be 1, 2 or 4, got {upsample}")
        if classifier_init not in CLASSIFIER_INITS:
            raise ValueError(f"classifier_init must be one of {CLASSIFIER_INITS}, got {classifier_init!r}")
        if classifier_init != "kaiming" and num_classes is None:
            raise ValueError(f"classifier_init={classifier_init!r} needs num_classes (the head's own classifier); "
                             "without it terratorch adds and initialises the classifier")
        channels = [int(c) for c in channels]
        self.upsample_after = self.upsample_positions(channels, upsample, upsample_after)
        self.in_index = in_index
        cin = int(list(embed_dim)[in_index])
        layers: list[nn.Module] = []
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(cin, c, 3, padding=1), group_norm(c), nn.ReLU(inplace=True)]
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
                       for _ in range(self.upsample_after.count(i))]
            cin = c
        if num_classes is not None:
            layers.append(nn.Conv2d(cin, num_classes, classifier_kernel, padding=classifier_kernel // 2))
            cin = num_classes
        self.net = nn.Sequential(*layers)
        self.out_channels = cin
        self.classifier_init = classifier_init
        for m in self.net:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        if num_classes is not None and classifier_init == "zero":
            nn.init.zeros_(self.net[-1].weight)

    @staticmethod
    def upsample_positions(channels: Sequence[int], upsample: int,
                           upsample_after: Sequence[int] | None = None) -> list[int]:
        """Indices of the conv blocks each x2 upsampling follows (see the class doc)."""
        n_up, n = upsample.bit_length() - 1, len(channels)
        if upsample_after is None:
            ends = [i for i in range(n - 1) if channels[i + 1] != channels[i]]  # last block of each stage but the last
            return (ends[:n_up] + [n - 1] * n_up)[:n_up]
        after = [int(i) for i in upsample_after]
        if len(after) != n_up or any(not 0 <= i < n for i in after) or after != sorted(after):
            raise ValueError(f"upsample_after must list {n_up} non-decreasing conv block indices in [0, {n - 1}] "
                             f"(one per factor 2 of upsample={upsample}), got {list(upsample_after)}")
        return after

    def forward(self, x: list[Tensor]) -> Tensor:
        return self.net(x[self.in_index])


@TERRATORCH_DECODER_REGISTRY.register
def lianet_head(embed_dim: Sequence[int], channels: Sequence[int] = (128, 128, 128, 128, 64, 64, 64, 64, 32, 32),
                in_index: int = -1, upsample: int = 1, upsample_after: Sequence[int] | None = None,
                **kwargs: Any) -> LIANetHead:
    """The LIANet fine-tuning conv blocks as a terratorch decoder; terratorch adds its 1x1 classifier (other keyword
    arguments are errors). ``upsample``, ``upsample_after``: see :class:`LIANetHead`."""
    check_builder_kwargs("lianet_head", kwargs, ("channels", "in_index", "upsample", "upsample_after"),
                         prefix="decoder_")
    return LIANetHead(embed_dim, channels, in_index, upsample=upsample, upsample_after=upsample_after)


#: decoders that include their classifier: terratorch's factory passes them ``num_classes`` and adds no head. It reads
#: ``includes_head`` from the decoder's registry source (if the builder has the attribute), so they live in their own
#: source, named with its prefix (``eoplugins_<name>``; an unprefixed name would be tried in the smp source first,
#: which raises).
if HEAD_SOURCE not in DECODER_REGISTRY.keys():
    _HEADS = Registry()
    _HEADS.includes_head = True  # type: ignore[attr-defined]
    DECODER_REGISTRY.register_source(HEAD_SOURCE, _HEADS)
else:  # module re-imported: reuse the source registered the first time
    _HEADS = DECODER_REGISTRY[HEAD_SOURCE]


@_HEADS.register
def lianet_classifier_head(embed_dim: Sequence[int],
                           channels: Sequence[int] = (128, 128, 128, 128, 64, 64, 64, 64, 32, 32),
                           in_index: int = -1, num_classes: int = 1, classifier_kernel: int = 3, upsample: int = 1,
                           upsample_after: Sequence[int] | None = None, classifier_init: str = "kaiming",
                           **kwargs: Any) -> LIANetHead:
    """The reference's whole fine-tuning head (conv blocks + ``classifier_kernel`` classifier, 3x3 by default) as
    the terratorch decoder ``eoplugins_lianet_classifier_head``; ``num_classes`` is filled by terratorch from the
    task's ``num_classes`` (the default 1 only serves bare builds). ``upsample``, ``upsample_after``,
    ``classifier_init``: see :class:`LIANetHead`. Other keyword arguments are errors."""
    check_builder_kwargs(f"{HEAD_SOURCE}_lianet_classifier_head", kwargs,
                         ("channels", "in_index", "classifier_kernel", "upsample", "upsample_after", "classifier_init"),
                         prefix="decoder_")
    return LIANetHead(embed_dim, channels, in_index, num_classes=num_classes, classifier_kernel=classifier_kernel,
                      upsample=upsample, upsample_after=upsample_after, classifier_init=classifier_init)


# terratorch's factory asks the builder whether it has ``includes_head``, then reads the flag of its registry source
lianet_classifier_head.includes_head = True  # type: ignore[attr-defined]
