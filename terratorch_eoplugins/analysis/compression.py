"""LIANet as a neural compressor: bits per pixel (supplement eq. 2) and PSNR (eq. 3) over random patches.

* ``1 / bpp = Q / (8 B) * sum_c P_c``: ``B`` bytes of generator parameters (tables, time encoder and CNN, at
  their storage dtype), ``Q`` encoded acquisitions, ``P_c`` pixels of channel ``c`` over the region (12 bands
  of the region grid; no-data pixels excluded when a tile has them is not attempted: the full grid is used).
* ``PSNR(I | S) = 10 log10(max I^2 / <(I - S)^2>)`` with ``I`` the LIANet patch, ``S`` the Sentinel-2 L2A
  patch (both ``(DN - 1000) / 10000``, ``S`` clipped to [0, 1]) and ``<.>`` the mean over pixels and bands,
  for all 12 bands and for RGB (B04, B03, B02).
* Fitted rate-distortion curve (Fig. 5): ``PSNR(bpp) = a1 u + a2 u^2 + a3 u^3``, ``u = log(1 + bpp)`` (a cubic
  ``P3`` without constant term, so ``PSNR(0) = 0``), least squares through the models' median PSNR (all bands
  and RGB); with fewer than 3 distinct bpp values the degree drops to their number.
* JPEG2000 reference (a real codec, Pillow's OpenJPEG encoder) on the *same* patches: each band is quantised to
  the L2A digital number ``DN = round(10000 r + 1000)`` (uint16), encoded as a raw J2K codestream at target
  compression ratios (``quality_mode="rates"``, irreversible 9/7 wavelet), decoded and turned back into
  reflectance; bpp = codestream bits / (pixels x bands), PSNR = eq. 3 of the decoded patch against the
  reference. The lossless (reversible 5/3) bpp of the same patches is the raw-data reference of Fig. 5.

``eoplugins compression --ckpt RUN.ckpt --tiles-root DIR`` (one region) or ``--region NAME=CKPT:ROOT[:T1,T2]``
(repeat, one region or checkpoint each) prints the statistics over ``--patches`` random ``--patch-size`` patches
(default 100 x 128 px, as in the supplement's Fig. 5), a per-region table (with the JPEG2000 PSNR interpolated at
the model's bpp) and draws the rate-distortion plot (dots min/max, bar +-1.5 std, cross mean, open circle median;
blue all bands, orange RGB; bold lines the P3 fit; grey the JPEG2000 line and its lossless bpp).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from terratorch_eoplugins.datasets.s2_tiles import RGB, S2TileSampler, scan_region  # noqa: E402
from terratorch_eoplugins.metrics import peak_psnr  # noqa: E402
from terratorch_eoplugins.models.lianet import LIANetGenerator, load_generator  # noqa: E402

logger = logging.getLogger("terratorch_eoplugins.analysis.compression")

__all__ = ["DEFAULT_JPEG2000_RATIOS", "bits_per_pixel", "compression_report", "evaluate_rate_distortion",
           "fit_rate_distortion", "jpeg2000_available", "jpeg2000_curve", "jpeg2000_psnr_at", "jpeg2000_reference",
           "legend_labels", "parse_region", "psnr", "rate_distortion_figure", "rate_distortion_plot", "region_table"]

#: target compression ratios of the JPEG2000 line (relative to the 16-bit samples: bpp ~ 16 / ratio + headers)
DEFAULT_JPEG2000_RATIOS: tuple[float, ...] = (4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
#: L2A digital numbers: reflectance = (DN - 1000) / 10000
DN_OFFSET, DN_SCALE = 1000.0, 10000.0
TABLE_FIELDS = ("region", "model", "bpp", "psnr_all_median", "psnr_all_mean", "psnr_all_std", "psnr_rgb_median",
                "psnr_rgb_mean", "psnr_rgb_std", "jpeg2000_psnr_all", "jpeg2000_psnr_rgb")


def bits_per_pixel(n_bytes: float, n_acquisitions: int, pixels_per_channel: Sequence[int]) -> float:
    """Eq. 2: ``bpp = 8 B / (Q * sum_c P_c)``."""
    total = float(sum(pixels_per_channel))
    if n_bytes <= 0 or n_acquisitions <= 0 or total <= 0:
        raise ValueError(f"need positive bytes, acquisitions and pixels, got {n_bytes}, {n_acquisitions}, {total}")
    return 8.0 * n_bytes / (n_acquisitions * total)


def psnr(generated: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> float:
    """Eq. 3: ``10 log10(max(I)^2 / mean((I - S)^2))`` over all pixels and channels given
    (:func:`~terratorch_eoplugins.metrics.peak_psnr`)."""
    return float(peak_psnr(generated, reference))


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    return {"min": float(a.min()), "max": float(a.max()), "mean": float(a.mean()), "median": float(np.median(a)),
            "std": float(a.std())}


def _sampler(tiles_root: str | Path, tiles: Sequence[str] | None, n_patches: int, patch_size: int, seed: int,
             region: Any = None) -> S2TileSampler:
    """The seeded validation patches of a region: the same patches for the model and the JPEG2000 reference."""
    region = region if region is not None else scan_region(tiles_root, tiles)
    return S2TileSampler(tiles_root, tiles, split="val", patch_size=patch_size, length=n_patches, seed=seed,
                         region=region)


def compression_report(generator: LIANetGenerator, tiles_root: str | Path, tiles: Sequence[str] | None = None,
                       n_patches: int = 100, patch_size: int = 128, seed: int = 0, batch_size: int = 4,
                       name: str = "LIANet") -> dict[str, Any]:
    """bpp of ``generator`` and PSNR statistics (all bands, RGB) over random patches of its region."""
    region = scan_region(tiles_root, tiles)
    n_bytes = sum(p.numel() * p.element_size() for p in generator.parameters())
    q = len(region.times)
    h, w = region.shape
    bpp = bits_per_pixel(n_bytes, q, [h * w] * 12)
    ds = _sampler(tiles_root, tiles, n_patches, patch_size, seed, region)
    generator = generator.eval()
    all_bands, rgb = [], []
    with torch.no_grad():
        for start in range(0, n_patches, batch_size):
            samples = [ds[i] for i in range(start, min(n_patches, start + batch_size))]
            origin = torch.stack([s["origin_px"] for s in samples])
            t = generator.resolve_time(torch.stack([s["time_days"] for s in samples]).double(),
                                       torch.stack([s["time_index"] for s in samples]))
            pred = generator(origin, t, patch_size).float().numpy()
            for p, s in zip(pred, samples):
                ref = s["image"].numpy()
                all_bands.append(psnr(p, ref))
                rgb.append(psnr(p[list(RGB)], ref[list(RGB)]))
    return {"name": name, "bpp": bpp, "bytes": n_bytes, "acquisitions": q, "region_shape": [h, w],
            "patches": n_patches, "patch_size": patch_size, "psnr_all": _stats(all_bands), "psnr_rgb": _stats(rgb),
            "psnr_all_values": all_bands, "psnr_rgb_values": rgb}


# ------------------------------------------------------------------------------ fitted rate-distortion curve
def fit_rate_distortion(bpp: Sequence[float] | np.ndarray, psnr_db: Sequence[float] | np.ndarray,
                        degree: int = 3) -> np.ndarray:
    """Least-squares ``PSNR = sum_k a_k u^k`` (k = 1..degree, ``u = log(1 + bpp)``, no constant: ``PSNR(0) = 0``).

    Returns ``[a_1, ..., a_d]``. Non-finite points are ignored; with fewer than ``degree`` distinct bpp values the
    degree drops to their number (logged as a warning). Raises ``ValueError`` without any finite point.
    """
    b = np.asarray(bpp, np.float64).reshape(-1)
    y = np.asarray(psnr_db, np.float64).reshape(-1)
    if b.shape != y.shape:
        raise ValueError(f"bpp ({b.size} values) and psnr ({y.size} values) must have the same length")
    if degree < 1:
        raise ValueError(f"degree must be >= 1, got {degree}")
    ok = np.isfinite(b) & np.isfinite(y) & (b > -1)
    u, y = np.log1p(b[ok]), y[ok]
    distinct = int(np.unique(u[u != 0]).size)
    if distinct == 0:
        raise ValueError("fit_rate_distortion: need at least one finite (bpp > 0, PSNR) point")
    if distinct < degree:
        logger.warning("rate-distortion fit: only %d distinct bpp value(s), fitting degree %d instead of %d",
                       distinct, distinct, degree)
        degree = distinct
    design = np.stack([u**k for k in range(1, degree + 1)], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return coef


def evaluate_rate_distortion(coefficients: Sequence[float] | np.ndarray, bpp: float | np.ndarray) -> np.ndarray:
    """``sum_k a_k log(1 + bpp)^k`` for the coefficients of :func:`fit_rate_distortion`."""
    u = np.log1p(np.asarray(bpp, np.float64))
    out = np.zeros_like(u)
    for k, a in enumerate(coefficients):
        out = out + float(a) * u ** (k + 1)
    return out


# ------------------------------------------------------------------------------------ JPEG2000 reference
def jpeg2000_available() -> bool:
    """Whether Pillow was built with the OpenJPEG (JPEG2000) codec."""
    from PIL import features

    return bool(features.check("jpg_2000"))


def _reflectance_to_dn(r: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(r, np.float64) * DN_SCALE + DN_OFFSET), 0, 65535).astype(np.uint16)


def _j2k_band(band: np.ndarray, ratio: float | None) -> tuple[np.ndarray, int]:
    """Encode one uint16 band as a J2K codestream (``ratio`` None: lossless); returns (decoded band, bytes)."""
    from PIL import Image

    buf = io.BytesIO()
    im = Image.fromarray(np.ascontiguousarray(band))
    if ratio is None:
        im.save(buf, format="JPEG2000", no_jp2=True, irreversible=False)
    else:
        im.save(buf, format="JPEG2000", no_jp2=True, irreversible=True, quality_mode="rates",
                quality_layers=[float(ratio)])
    n = buf.tell()
    buf.seek(0)
    with Image.open(buf) as dec:
        out = np.asarray(dec).astype(np.float64)
    return out, n


def jpeg2000_curve(patches: Sequence[np.ndarray], ratios: Sequence[float] = DEFAULT_JPEG2000_RATIOS,
                   lossless: bool = True) -> dict[str, Any]:
    """JPEG2000 rate-distortion line over ``patches`` (reflectance ``(12, H, W)`` arrays, the eq. 3 reference).

    Each band is quantised to the L2A DN (uint16), encoded band by band at each target compression ``ratio``,
    decoded and converted back; per ratio: mean actual bpp (codestream bits / (pixels x bands)) and the eq. 3 PSNR
    statistics (all bands, RGB). ``lossless`` adds the mean bpp of the reversible encoding (``lossless_bpp``).
    """
    if not jpeg2000_available():
        raise RuntimeError("JPEG2000 reference: this Pillow has no OpenJPEG (jpg_2000) codec; "
                           "install Pillow with OpenJPEG support")
    if not patches:
        raise ValueError("jpeg2000_curve: expected at least one patch")
    ratios = [float(r) for r in ratios]
    if any(r <= 1 for r in ratios):
        raise ValueError(f"JPEG2000 compression ratios must be > 1, got {ratios}")
    bpp_vals = [[] for _ in ratios]
    all_vals: list[list[float]] = [[] for _ in ratios]
    rgb_vals: list[list[float]] = [[] for _ in ratios]
    lossless_bpp = []
    for ref in patches:
        ref = np.asarray(ref, np.float64)
        if ref.ndim != 3:
            raise ValueError(f"JPEG2000 reference patches must be (bands, H, W) arrays, got shape {ref.shape}")
        dn = _reflectance_to_dn(ref)
        n_samples = dn.size
        for i, ratio in enumerate(ratios):
            bands, n_bytes = zip(*(_j2k_band(b, ratio) for b in dn))
            dec = (np.stack(bands) - DN_OFFSET) / DN_SCALE
            bpp_vals[i].append(8.0 * sum(n_bytes) / n_samples)
            all_vals[i].append(psnr(dec, ref))
            rgb_vals[i].append(psnr(dec[list(RGB)], ref[list(RGB)]) if ref.shape[0] > max(RGB) else math.nan)
        if lossless:
            lossless_bpp.append(8.0 * sum(_j2k_band(b, None)[1] for b in dn) / n_samples)
    return {"ratios": ratios, "patches": len(patches), "bpp": [float(np.mean(v)) for v in bpp_vals],
            "psnr_all": [_stats(v) for v in all_vals], "psnr_rgb": [_stats(v) for v in rgb_vals],
            "lossless_bpp": float(np.mean(lossless_bpp)) if lossless_bpp else None}


def jpeg2000_reference(tiles_root: str | Path, tiles: Sequence[str] | None = None, n_patches: int = 100,
                       patch_size: int = 128, seed: int = 0,
                       ratios: Sequence[float] = DEFAULT_JPEG2000_RATIOS) -> dict[str, Any]:
    """:func:`jpeg2000_curve` on the same seeded patches as :func:`compression_report` (same arguments)."""
    ds = _sampler(tiles_root, tiles, n_patches, patch_size, seed)
    return jpeg2000_curve([ds[i]["image"].numpy() for i in range(n_patches)], ratios)


def jpeg2000_psnr_at(curve: dict[str, Any], bpp: float, key: str = "psnr_all") -> float:
    """Mean JPEG2000 PSNR at ``bpp``, linear in log(bpp) between the line's points; NaN outside its bpp range (the
    codec is not extrapolated). Ratios that reach the same bpp (header floor) keep the first one's PSNR."""
    x = np.log(np.asarray(curve["bpp"], np.float64))
    y = np.asarray([s["mean"] for s in curve[key]], np.float64)
    x, keep = np.unique(x, return_index=True)
    y = y[keep]
    if bpp <= 0 or not x[0] <= math.log(bpp) <= x[-1]:
        return math.nan
    return float(np.interp(math.log(bpp), x, y))


# ------------------------------------------------------------------------------------ table and plot
def region_table(reports: Sequence[dict[str, Any]], jpeg2000: dict[str, dict[str, Any]] | None = None
                 ) -> list[dict[str, Any]]:
    """One row per report (key ``region``, default ``""``): bpp, PSNR median/mean/std (all bands, RGB) and the
    JPEG2000 mean PSNR of that region at the same bpp (NaN without a line or outside its bpp range)."""
    rows = []
    for rep in reports:
        region = rep.get("region", "")
        curve = (jpeg2000 or {}).get(region)
        a, r = rep["psnr_all"], rep["psnr_rgb"]
        rows.append({
            "region": region, "model": rep["name"], "bpp": rep["bpp"],
            "psnr_all_median": a["median"], "psnr_all_mean": a["mean"], "psnr_all_std": a["std"],
            "psnr_rgb_median": r["median"], "psnr_rgb_mean": r["mean"], "psnr_rgb_std": r["std"],
            "jpeg2000_psnr_all": jpeg2000_psnr_at(curve, rep["bpp"], "psnr_all") if curve else math.nan,
            "jpeg2000_psnr_rgb": jpeg2000_psnr_at(curve, rep["bpp"], "psnr_rgb") if curve else math.nan,
        })
    return rows


def _format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = (f"{'region':<14s} {'model':<22s} {'bpp':>9s} | {'all: med':>8s} {'mean':>7s} {'std':>6s} | "
            f"{'RGB: med':>8s} {'mean':>7s} {'std':>6s} | {'J2K all':>7s} {'J2K RGB':>7s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['region'][:14]:<14s} {r['model'][:22]:<22s} {r['bpp']:9.4g} | "
                     f"{r['psnr_all_median']:8.2f} {r['psnr_all_mean']:7.2f} {r['psnr_all_std']:6.2f} | "
                     f"{r['psnr_rgb_median']:8.2f} {r['psnr_rgb_mean']:7.2f} {r['psnr_rgb_std']:6.2f} | "
                     f"{r['jpeg2000_psnr_all']:7.2f} {r['jpeg2000_psnr_rgb']:7.2f}")
    return "\n".join(lines)


def rate_distortion_figure(reports: Sequence[dict[str, Any]], jpeg2000: dict[str, dict[str, Any]] | None = None,
                           fit: bool = True) -> Figure:
    """The rate-distortion figure: PSNR statistics against bpp (log x axis) per report, blue = all bands, orange =
    RGB; with ``fit`` the P3 fit of the median PSNR (bold lines); the JPEG2000 lines (mean PSNR, grey) and lossless
    bpp (vertical grey dashes) of each region in ``jpeg2000`` (``{region: jpeg2000_curve(...)}``)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    multi_region = len({rep.get("region", "") for rep in reports}) > 1
    for rep in reports:
        for key, color, dx in (("psnr_all", "tab:blue", 0.97), ("psnr_rgb", "tab:orange", 1.03)):
            st, x = rep[key], rep["bpp"] * dx
            ax.plot([x, x], [st["mean"] - 1.5 * st["std"], st["mean"] + 1.5 * st["std"]], color=color, lw=3, alpha=0.6)
            ax.plot([x, x], [st["min"], st["max"]], ".", color=color)
            ax.plot(x, st["mean"], "x", color=color)
            ax.plot(x, st["median"], "o", mfc="none", color=color)
        label = f"{rep['name']} [{rep.get('region', '')}]" if multi_region else rep["name"]
        ax.annotate(label, (rep["bpp"], rep["psnr_all"]["max"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    xs = [rep["bpp"] for rep in reports]
    styles = ("-", "--", ":", "-.")
    for i, (region, curve) in enumerate((jpeg2000 or {}).items()):
        suffix = f" {region}" if len(jpeg2000 or {}) > 1 else ""
        ls = styles[i % len(styles)]
        ax.plot(curve["bpp"], [s["mean"] for s in curve["psnr_all"]], ls, marker="s", ms=3, color="dimgray",
                label=f"JPEG2000 all bands (mean){suffix}")
        ax.plot(curve["bpp"], [s["mean"] for s in curve["psnr_rgb"]], ls, marker="^", ms=3, color="darkgoldenrod",
                label=f"JPEG2000 RGB (mean){suffix}")
        xs += list(curve["bpp"])
        if curve.get("lossless_bpp"):
            ax.axvline(curve["lossless_bpp"], color="gray", ls="--", lw=1, label=f"JPEG2000 lossless{suffix}")
            xs.append(curve["lossless_bpp"])
    ys = [v for rep in reports for key in ("psnr_all", "psnr_rgb") for v in (rep[key]["min"], rep[key]["max"])]
    ys += [s["mean"] for curve in (jpeg2000 or {}).values() for key in ("psnr_all", "psnr_rgb") for s in curve[key]]
    ys = [v for v in ys if math.isfinite(v)]
    if fit and reports:  # drawn over the models' bpp range (an interpolation, not an extrapolation to the codec's)
        model_bpp = [r["bpp"] for r in reports]
        grid = np.geomspace(min(model_bpp) / 2, max(model_bpp) * 2, 200)
        for key, color, name in (("psnr_all", "tab:blue", "all bands"), ("psnr_rgb", "tab:orange", "RGB")):
            coef = fit_rate_distortion([r["bpp"] for r in reports], [r[key]["median"] for r in reports])
            ax.plot(grid, evaluate_rate_distortion(coef, grid), color=color, lw=2.5,
                    label=f"P{len(coef)} fit {name} (median)")
    if ys:  # the data, not a fit's extrapolation, set the PSNR range
        ax.set_ylim(min(0.0, min(ys)) - 2.0, max(40.0, max(ys)) + 5.0)
    ax.axhline(30, color="purple", ls="-.", lw=1)
    ax.axhline(40, color="red", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("bits per pixel (eq. 2)")
    ax.set_ylabel("PSNR [dB] (eq. 3)")
    ax.plot([], [], color="tab:blue", lw=3, alpha=0.6, label="all bands")
    ax.plot([], [], color="tab:orange", lw=3, alpha=0.6, label="RGB")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def rate_distortion_plot(reports: Sequence[dict[str, Any]], out: str | Path,
                         jpeg2000: dict[str, dict[str, Any]] | None = None, fit: bool = True) -> Path:
    """Write :func:`rate_distortion_figure` to ``out`` (PNG)."""
    fig = rate_distortion_figure(reports, jpeg2000, fit)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def legend_labels(fig: Figure) -> list[str]:
    """Labels of the labelled lines of a figure's first axes (what the legend shows)."""
    return [ln.get_label() for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")]


# ------------------------------------------------------------------------------------ command line
def parse_region(spec: str) -> tuple[str, str, str, list[str] | None]:
    """``NAME=CKPT:TILES_ROOT[:TILE,TILE...]`` -> (name, checkpoint, tiles root, tiles or None)."""
    expected = "expected NAME=CKPT:TILES_ROOT[:TILE,TILE...] (paths without ':')"
    name, sep, rest = spec.partition("=")
    parts = rest.split(":")
    if not sep or not name or len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise ValueError(f"--region {spec!r}: {expected}")
    tiles = [t for t in parts[2].split(",") if t] if len(parts) == 3 else None
    if tiles is not None and not tiles:
        raise ValueError(f"--region {spec!r}: empty tile list; {expected}")
    return name, parts[0], parts[1], tiles


def _runs(args: Any) -> list[tuple[str, str, str, list[str] | None]]:
    runs = []
    if args.ckpt:
        if not args.tiles_root:
            raise ValueError("--ckpt needs --tiles-root (folder of the region's S2 tile folders)")
        name = getattr(args, "region_name", None) or Path(args.tiles_root).name
        runs += [(name, ckpt, args.tiles_root, args.tiles) for ckpt in args.ckpt]
    elif args.tiles_root:
        raise ValueError("--tiles-root needs --ckpt (or give regions as --region NAME=CKPT:TILES_ROOT[:TILES])")
    runs += [parse_region(s) for s in (getattr(args, "region", None) or [])]
    if not runs:
        raise ValueError("give --ckpt CKPT... --tiles-root DIR or one or more --region NAME=CKPT:TILES_ROOT[:TILES]")
    return runs


def main(args: Any) -> int:
    """``eoplugins compression`` entry point (arguments parsed in :mod:`terratorch_eoplugins.cli`)."""
    try:
        runs = _runs(args)
    except ValueError as err:
        print(f"eoplugins compression: {err}", file=sys.stderr)
        return 2
    reports = []
    regions: dict[str, tuple[str, list[str] | None]] = {}
    for region, ckpt, root, tiles in runs:
        if regions.setdefault(region, (root, tiles)) != (root, tiles):
            print(f"eoplugins compression: --region {region!r} is given with two different tile sets "
                  f"({regions[region]} and {(root, tiles)})", file=sys.stderr)
            return 2
        gen = load_generator(ckpt)
        rep = compression_report(gen, root, tiles, args.patches, args.patch_size, args.seed, name=Path(ckpt).stem)
        rep["region"] = region
        reports.append(rep)
        a, r = rep["psnr_all"], rep["psnr_rgb"]
        print(
            f"[{region}] {rep['name']}: bpp={rep['bpp']:.4g} ({rep['bytes'] / 2**20:.1f} MiB of parameters, "
            f"Q={rep['acquisitions']}, "
            f"region {rep['region_shape'][0]}x{rep['region_shape'][1]} px x 12 bands)"
        )
        print(f"  PSNR all bands: median {a['median']:.2f}  mean {a['mean']:.2f}  std {a['std']:.2f}  "
              f"min {a['min']:.2f}  max {a['max']:.2f} dB")
        print(f"  PSNR RGB:       median {r['median']:.2f}  mean {r['mean']:.2f}  std {r['std']:.2f}  "
              f"min {r['min']:.2f}  max {r['max']:.2f} dB")
    jpeg2000: dict[str, dict[str, Any]] = {}
    ratios = getattr(args, "jpeg2000_ratios", None) or DEFAULT_JPEG2000_RATIOS
    if getattr(args, "no_jpeg2000", False):
        pass
    elif not jpeg2000_available():
        print("JPEG2000 reference skipped: this Pillow has no OpenJPEG (jpg_2000) codec", file=sys.stderr)
    else:
        for region, (root, tiles) in regions.items():
            jpeg2000[region] = curve = jpeg2000_reference(root, tiles, args.patches, args.patch_size, args.seed, ratios)
            pts = ", ".join(f"{b:.3g} bpp: {s['mean']:.2f} dB" for b, s in zip(curve["bpp"], curve["psnr_all"]))
            print(f"[{region}] JPEG2000 (mean PSNR all bands, ratios {curve['ratios']}): {pts}; "
                  f"lossless {curve['lossless_bpp']:.3g} bpp")
            if len(set(curve["bpp"])) < len(curve["bpp"]):
                print(f"[{region}] JPEG2000: the highest ratios give no smaller codestream (the codestream headers "
                      "dominate at this patch size); the line's lowest bpp is its floor")
    rows = region_table(reports, jpeg2000)
    print(_format_table(rows))
    fits = {}
    for key in ("psnr_all", "psnr_rgb"):
        coef = fit_rate_distortion([r["bpp"] for r in reports], [r[key]["median"] for r in reports])
        fits[key] = [float(c) for c in coef]
        note = "" if len(coef) == 3 else f" (degree {len(coef)}: only {len(coef)} distinct bpp value(s))"
        terms = " + ".join(f"{c:.4g} u^{k + 1}" for k, c in enumerate(coef))
        print(f"fit median {key[5:]}: PSNR = {terms}, u = log(1 + bpp){note}")
    if args.out:
        fig = rate_distortion_figure(reports, jpeg2000)
        labels = legend_labels(fig)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
        plt.close(fig)
        print(f"rate-distortion plot: {out} (lines: {'; '.join(labels)})")
    if getattr(args, "csv", None):
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(TABLE_FIELDS))
            writer.writeheader()
            writer.writerows(rows)
    if args.json:
        payload = {"reports": [{k: v for k, v in r.items() if not k.endswith("_values")} for r in reports],
                   "table": rows, "fit": {"variable": "log(1 + bpp)", **fits}, "jpeg2000": jpeg2000}
        Path(args.json).write_text(json.dumps(payload, indent=2, allow_nan=True))
    return 0
