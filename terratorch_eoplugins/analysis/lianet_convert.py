"""``eoplugins lianet-convert``: convert an authors' LIANet checkpoint (``mojganmadadi/LIANet``) into a checkpoint
of this package that ``backbone_ckpt_path`` of the ``lianet_*`` backbones and the pretraining task load.

The conversion itself is :func:`terratorch_eoplugins.models.lianet_convert.convert_checkpoint` (see its module for the
key layouts understood). Exit status 0 on success, 2 with a message on stderr for input it refuses.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from terratorch_eoplugins.models.lianet_convert import ConversionError, convert_checkpoint

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``eoplugins lianet-convert``: convert one reference checkpoint; returns the exit status."""
    parser = argparse.ArgumentParser(prog="eoplugins lianet-convert",
                                     description="Convert an authors' LIANet checkpoint (mojganmadadi/LIANet) into a "
                                                 "checkpoint of this package (backbone_ckpt_path / pretraining task).")
    parser.add_argument("--checkpoint", required=True, help="reference torch file with 'model_state_dict'")
    parser.add_argument("--parameters", required=True, help="the run's used_parameters.json")
    parser.add_argument("--out", required=True, help="output checkpoint (.ckpt)")
    parser.add_argument("--region", default=None,
                        help="main-branch multi-region checkpoints: region index or its tile names "
                             "(e.g. T16TEK+T16TFK)")
    parser.add_argument("--region-size", type=float, default=None,
                        help="coordinate scale in pixels (the reference's complete_tile_size / mosaic width); needed "
                             "for multi-tile main-branch regions")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = convert_checkpoint(args.checkpoint, args.parameters, args.out, region=args.region,
                                 region_size=args.region_size, overwrite=args.overwrite)
    except (ConversionError, ValueError, FileNotFoundError) as err:
        print(f"eoplugins lianet-convert: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0

