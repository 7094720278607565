"""``eoplugins`` console command: write the synthetic world, list registered components."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence


def _synth(args: argparse.Namespace) -> int:
    from terratorch_eoplugins.synthetic import SynthOutputError, write_world

    try:
        written = write_world(args.out, size=args.size, seed=args.seed, products=args.products,
                              overwrite=args.overwrite)
    except SynthOutputError as err:
        print(f"eoplugins synth: {err}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"{name:10s} {path}")
    return 0


def _registry(args: argparse.Namespace) -> int:
    from terratorch_eoplugins.models import registered_names

    for kind, names in registered_names().items():
        for name in names:
            print(f"{kind:9s} {name}")
    return 0


def _compression(args: argparse.Namespace) -> int:
    from terratorch_eoplugins.analysis.compression import main as compression_main

    return compression_main(args)


#: subcommands whose module has its own ``main(argv)`` with its own argument parser
_DELEGATED: dict[str, tuple[str, str]] = {
    "demo": (
        "terratorch_eoplugins.analysis.demo",
        "quickstart: synthetic world, terratorch fit + test, metrics vs. majority class",
    ),
    "sweep": (
        "terratorch_eoplugins.benchmark.cli",
        "benchmark sweep: models x tasks x settings through terratorch fit + test, CSV + leaderboard",
    ),
    "lianet-demo": (
        "terratorch_eoplugins.analysis.lianet_demo",
        "LIANet: pretrain on the demo region's S2 tiles, fine-tune + test on demo PASTIS vs. majority class",
    ),
    "lianet-pastis-protocol": (
        "terratorch_eoplugins.analysis.lianet_pastis_protocol",
        "LIANet PASTIS protocol: 5 folds x tiles fine-tune + test, mean +- std of macro metrics",
    ),
    "lianet-convert": (
        "terratorch_eoplugins.analysis.lianet_convert",
        "LIANet: convert an authors' checkpoint (model_state_dict + used_parameters.json) for backbone_ckpt_path",
    ),
    "s4-clouds": (
        "terratorch_eoplugins.analysis.s4_clouds",
        "S4 cloud robustness: mIoU by cloud-cover ratio of the test series",
    ),
    "tsfusion-counterfactual": (
        "terratorch_eoplugins.analysis.tsfusion_counterfactual",
        "TS fusion: coordinate-swap counterfactual test with a bootstrap CI (algorithm 1)",
    ),
    "tsfusion-sensitivity": (
        "terratorch_eoplugins.analysis.tsfusion_sensitivity",
        "TS fusion: per-modality gradient sensitivity of a CropNet yield model",
    ),
    "tsfusion-tokenizers": (
        "terratorch_eoplugins.analysis.tsfusion_tokenizers",
        "TS fusion: train the image FSQ and time-series tokenizers on a CropNet tree",
    ),
    "hash-collisions": (
        "terratorch_eoplugins.analysis.hash_collisions",
        "LIANet hash-collision rates (supplement eq. 1) per level of a generator checkpoint or grid",
    ),
    "embed": (
        "terratorch_eoplugins.analysis.embed",
        "per-pixel embeddings (DUNIA O^V/O^H, LIANet trunk features) as a tiled, georeferenced GeoTIFF stack",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``eoplugins`` command."""
    parser = argparse.ArgumentParser(prog="eoplugins", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write the synthetic world in the real datasets' formats")
    p.add_argument("--out", required=True, help="output directory (e.g. data/demo)")
    p.add_argument("--size", default="tiny", choices=["tiny", "demo"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--products", nargs="+", default=None, help="subset of products (default: all available)")
    p.add_argument("--overwrite", action="store_true", help="rewrite even if the same world is already there")
    p.set_defaults(func=_synth)
    for name, (_, help_text) in _DELEGATED.items():  # parsed by their own modules' main(argv)
        sub.add_parser(name, help=help_text, add_help=False)
    r = sub.add_parser("registry", help="list the backbones/decoders this package registers in terratorch")
    r.set_defaults(func=_registry)
    lc = sub.add_parser("compression", help="LIANet rate-distortion: bits per pixel and PSNR over random patches, "
                        "P3 fit, JPEG2000 reference, per-region table")
    lc.add_argument("--ckpt", nargs="+", default=None, help="LIANet pretraining checkpoint(s) of one region "
                    "(with --tiles-root)")
    lc.add_argument("--tiles-root", default=None, help="folder of the region's S2 tile folders (with --ckpt)")
    lc.add_argument("--tiles", nargs="+", default=None, help="tile folders forming the region (default: all)")
    lc.add_argument("--region-name", default=None, help="name of the --ckpt/--tiles-root region in the table "
                    "(default: the tiles root's folder name)")
    lc.add_argument("--region", action="append", default=None, metavar="NAME=CKPT:TILES_ROOT[:TILE,...]",
                    help="a region and one checkpoint pretrained on it (repeat for more regions or checkpoints; "
                         "paths without ':'); may be combined with --ckpt/--tiles-root")
    lc.add_argument("--patches", type=int, default=100)
    lc.add_argument("--patch-size", type=int, default=128)
    lc.add_argument("--seed", type=int, default=0)
    lc.add_argument("--jpeg2000-ratios", type=float, nargs="+", default=None,
                    help="JPEG2000 target compression ratios (default: 4 8 16 32 64 128 256)")
    lc.add_argument("--no-jpeg2000", action="store_true", help="skip the JPEG2000 reference line")
    lc.add_argument("--out", default="rate_distortion.png", help="rate-distortion plot (PNG); '' to skip")
    lc.add_argument("--csv", default=None, help="write the per-region table to this CSV file")
    lc.add_argument("--json", default=None, help="write reports, table, fit and JPEG2000 line to this JSON file")
    lc.set_defaults(func=_compression)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        module = importlib.import_module(_DELEGATED[argv[0]][0])
        return module.main(argv[1:])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
