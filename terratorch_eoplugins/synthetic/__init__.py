"""The synthetic world: one seeded region written in the exact on-disk formats of the real datasets.

``write_world(out_dir, size, seed)`` (or ``eoplugins synth --out DIR``) renders the region once per
acquisition date and writes every requested product from the same pixels:

* ``s2_tiles``: Sentinel-2 L2A GeoTIFFs per date (+ cloud probability), ``s1_tiles``: Sentinel-1 VV/VH per date;
* ``pastis``: the PASTIS-R tree (:mod:`.pastis`);
* ``burnscars``, ``cropnet``, ``gedi``: HLS BurnScars, CropNet and GEDI writers;
* ``lianet_burn_tiles``: 10 m Sentinel-2 tiles over the BurnScars region, for LIANet's burn-region pretraining.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from terratorch_eoplugins.synthetic.world import World, WorldSpec, make_world

logger = logging.getLogger("terratorch_eoplugins.synthetic")

#: Products rendered from the shared region in one pass over the dates.
REGION_PRODUCTS = ("s2_tiles", "s1_tiles", "pastis")
#: Products with their own writer module ``terratorch_eoplugins.synthetic.<name>`` exposing ``write_<name>``.
EXTRA_PRODUCTS = ("burnscars", "cropnet", "gedi", "lianet_burn_tiles")
ALL_PRODUCTS = REGION_PRODUCTS + EXTRA_PRODUCTS
MANIFEST = "world.json"


def _available_extra() -> list[str]:
    out = []
    for name in EXTRA_PRODUCTS:
        try:
            module = importlib.import_module(f"terratorch_eoplugins.synthetic.{name}")
        except ModuleNotFoundError:
            continue
        if hasattr(module, f"write_{name}"):
            out.append(name)
    return out


def write_region(world: World, out_dir: str | Path, products: Sequence[str] = REGION_PRODUCTS) -> dict[str, Path]:
    """Render every date of ``world`` once and feed the tile and PASTIS-R writers."""
    from terratorch_eoplugins.synthetic.pastis import PastisWriter
    from terratorch_eoplugins.synthetic.tiles import S1TileWriter, S2TileWriter

    out = Path(out_dir)
    s2 = S2TileWriter(world, out) if "s2_tiles" in products else None
    s1 = S1TileWriter(world, out) if "s1_tiles" in products else None
    pastis = PastisWriter(world, out) if "pastis" in products else None
    for i in range(len(world.s2_dates)):
        if s2 is None and pastis is None:
            break
        refl, clouds = world.s2_reflectance(i), world.cloud_mask(i)
        if s2 is not None:
            s2.add(i, refl, clouds)
        if pastis is not None:
            pastis.add_s2(i, refl, clouds)
    for orbit in ("asc", "desc"):
        for i in range(len(world.s1_dates(orbit))):
            if s1 is None and pastis is None:
                break
            bs = world.s1_backscatter(i, orbit)
            if s1 is not None:
                s1.add(i, orbit, bs)
            if pastis is not None:
                pastis.add_s1(i, orbit, bs)
    written: dict[str, Path] = {}
    if s2 is not None:
        written["s2_tiles"] = s2.dir
    if s1 is not None:
        written["s1_tiles"] = s1.dir
    if pastis is not None:
        written["pastis"] = pastis.finish()
    return written


def write_world(out_dir: str | Path, size: str = "tiny", seed: int = 0, products: Sequence[str] | None = None,
                overwrite: bool = False) -> dict[str, Path]:
    """Write the synthetic world of ``size`` (``tiny`` or ``demo``) and ``seed`` under ``out_dir``.

    Returns a mapping product -> written path. If ``out_dir/world.json`` records the same size, seed and
    products, nothing is rewritten unless ``overwrite`` (so ``make demo`` is cheap the second time).
    """
    out = Path(out_dir)
    wanted = list(products) if products is not None else [*REGION_PRODUCTS, *_available_extra()]
    unknown = sorted(set(wanted) - set(ALL_PRODUCTS))
    if unknown:
        raise ValueError(f"unknown synthetic products {unknown}: expected a subset of {list(ALL_PRODUCTS)}")
    manifest = out / MANIFEST
    if manifest.exists() and not overwrite:
        previous = json.loads(manifest.read_text())
        if previous.get("size") == size and previous.get("seed") == seed and set(wanted) <= set(previous.get("products", {})):
            logger.info("synthetic world already present in %s (size=%s, seed=%s)", out, size, seed)
            return {k: Path(v) for k, v in previous["products"].items() if k in wanted}
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    world = make_world(size, seed=seed)
    written = write_region(world, out, [p for p in wanted if p in REGION_PRODUCTS])
    for name in wanted:
        if name in EXTRA_PRODUCTS:
            module = importlib.import_module(f"terratorch_eoplugins.synthetic.{name}")
            kwargs = {"size": size, "seed": seed}
            if "world" in inspect.signature(getattr(module, f"write_{name}")).parameters:
                kwargs["world"] = world
            written[name] = Path(getattr(module, f"write_{name}")(out, **kwargs))
    manifest.write_text(json.dumps({
        "size": size, "seed": seed, "spec": dataclasses.asdict(world.spec),
        "products": {k: str(v) for k, v in written.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }, indent=2))
    return written


__all__ = ["ALL_PRODUCTS", "World", "WorldSpec", "make_world", "write_region", "write_world"]
