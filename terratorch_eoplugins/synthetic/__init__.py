"""The synthetic world: one seeded region written in the exact on-disk formats of the real datasets.

``write_world(out_dir, size, seed)`` (or ``eoplugins synth --out DIR``) renders the region once per
acquisition date and writes every requested product from the same pixels:

* ``s2_tiles``: Sentinel-2 L2A GeoTIFFs per date (+ cloud probability), ``s1_tiles``: Sentinel-1 VV/VH per date;
* ``pastis``: the PASTIS-R tree (:mod:`.pastis`);
* ``burnscars``, ``cropnet``, ``gedi``: HLS BurnScars, CropNet and GEDI writers;
* ``lianet_burn_tiles``: 10 m Sentinel-2 tiles over the BurnScars region, for LIANet's burn-region pretraining;
* ``lianet_labels``: LIANet's own downstream labels on the region's S2 grid (Dynamic World per date, canopy height,
  dominant leaf type, building footprints; :mod:`.lianet_labels`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from terratorch_eoplugins.synthetic.world import World, WorldSpec, make_world

logger = logging.getLogger("terratorch_eoplugins.synthetic")

#: Products rendered from the shared region in one pass over the dates.
REGION_PRODUCTS = ("s2_tiles", "s1_tiles", "pastis")
#: Products with their own writer module ``terratorch_eoplugins.synthetic.<name>`` exposing ``write_<name>``.
EXTRA_PRODUCTS = ("burnscars", "cropnet", "gedi", "lianet_burn_tiles", "lianet_labels")
ALL_PRODUCTS = REGION_PRODUCTS + EXTRA_PRODUCTS
MANIFEST = "world.json"
_STAGING_PREFIX = ".synth-staging-"


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


class SynthOutputError(FileExistsError):
    """``write_world`` refused to write: the output folder holds files it did not write, or another world."""


def _is_ours(name: str) -> bool:
    """Staging folders of :func:`write_world` (``.synth-staging-<pid>``)."""
    return name.startswith(_STAGING_PREFIX)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a world written by :func:`write_world`; raises :class:`SynthOutputError` for another file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SynthOutputError(f"{path}: not a manifest of `eoplugins synth` (cannot be read as JSON: {err}); "
                               "refusing to write into a folder whose world.json was not written by it") from None
    if not isinstance(data, dict) or not {"size", "seed", "products"} <= set(data) \
            or not isinstance(data["products"], dict):
        raise SynthOutputError(f"{path}: not a manifest of `eoplugins synth` (expected a JSON object with 'size', "
                               "'seed' and 'products'); refusing to write into a folder whose world.json was not "
                               "written by it")
    return data


def _relative_product_dir(out: Path, recorded: str) -> Path | None:
    """A product path recorded in a manifest, relative to ``out`` (manifests store ``str(out / product)``)."""
    p = Path(recorded)
    for base in (out, out.resolve()):
        try:
            return p.relative_to(base)
        except ValueError:
            pass
    try:
        return p.resolve().relative_to(out.resolve())
    except ValueError:
        pass
    parts = p.parts
    if out.name in parts:  # the folder was moved or the manifest was written from another working directory
        i = len(parts) - 1 - parts[::-1].index(out.name)
        return Path(*parts[i + 1:]) if i + 1 < len(parts) else None
    return None


def _recorded_files(out: Path, manifest: dict[str, Any]) -> dict[str, list[str]]:
    """Files of each product of a manifest, relative to ``out`` (POSIX strings).

    Manifests written before files were recorded list only product folders: every file now under such a folder
    counts as the world's.
    """
    files = manifest.get("files")
    if isinstance(files, dict):
        return {str(k): [str(f) for f in v] for k, v in files.items()}
    out_files: dict[str, list[str]] = {}
    for name, recorded in manifest["products"].items():
        rel = _relative_product_dir(out, str(recorded))
        if rel is None or not (out / rel).exists():
            continue
        root = out / rel
        found = [root] if root.is_file() else [f for f in root.rglob("*") if f.is_file() or f.is_symlink()]
        out_files[str(name)] = sorted(f.relative_to(out).as_posix() for f in found)
    return out_files


def _remove_files(out: Path, rels: Iterable[str]) -> int:
    """Delete ``out/rel`` for each ``rel`` (missing ones skipped) and the folders this leaves empty; returns count."""
    n = 0
    parents: set[Path] = set()
    for rel in rels:
        path = out / rel
        if path.is_file() or path.is_symlink():
            path.unlink()
            n += 1
            parents.update(p for p in path.parents if p != out and out in p.parents)
    for folder in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: holds other files
            folder.rmdir()
    return n


def _listing(entries: Iterable[str], limit: int = 5) -> str:
    items = sorted(entries)
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def write_world(out_dir: str | Path, size: str = "tiny", seed: int = 0, products: Sequence[str] | None = None,
                overwrite: bool = False) -> dict[str, Path]:
    """Write the synthetic world of ``size`` (``tiny`` or ``demo``) and ``seed`` under ``out_dir``.

    Returns a mapping product -> written path. Files are never lost:

    * ``out_dir`` must be empty (or absent) or hold a manifest ``world.json`` written by this function; any other
      content makes it refuse (:class:`SynthOutputError` naming what it found), ``overwrite`` or not.
    * The manifest records every file written (per product, relative to ``out_dir``). If it records the same
      ``size`` and ``seed`` and every requested product, nothing is rewritten unless ``overwrite`` (so
      ``make demo`` is cheap the second time); missing products (or products whose files were deleted) are
      added. ``overwrite`` rewrites the requested products, replacing only files the manifest records.
    * A manifest of another ``size`` or ``seed`` makes it refuse unless ``overwrite``; then the old world's
      recorded files are removed (and the folders this empties) before the new world's files are moved in.
    * Products are rendered into a staging folder inside ``out_dir`` first; a file of the new world whose place is
      taken by a file the manifest does not record (a user's file) makes it refuse before anything is removed.
    """
    out = Path(out_dir)
    wanted = list(products) if products is not None else [*REGION_PRODUCTS, *_available_extra()]
    unknown = sorted(set(wanted) - set(ALL_PRODUCTS))
    if unknown:
        raise ValueError(f"unknown synthetic products {unknown}: expected a subset of {list(ALL_PRODUCTS)}")
    wanted = list(dict.fromkeys(wanted))
    if out.exists() and not out.is_dir():
        raise SynthOutputError(f"{out}: exists and is not a folder; expected an empty folder or one written by "
                               "`eoplugins synth`")
    manifest_path = out / MANIFEST
    previous: dict[str, Any] | None = None
    if out.is_dir():
        for stale in out.iterdir():  # staging folders of an interrupted earlier run
            pid = stale.name[len(_STAGING_PREFIX):]
            if stale.is_dir() and _is_ours(stale.name) and (not pid.isdigit() or not _pid_alive(int(pid))):
                shutil.rmtree(stale, ignore_errors=True)
        if manifest_path.is_file():
            previous = _read_manifest(manifest_path)
        else:
            found = [e.name for e in out.iterdir() if not _is_ours(e.name)]
            if found:
                raise SynthOutputError(
                    f"{out}: not empty ({_listing(found)}) and holds no {MANIFEST} written by `eoplugins synth`; "
                    "refusing to write a synthetic world there (its files could replace yours): choose an empty "
                    "or new folder")
    recorded = _recorded_files(out, previous) if previous is not None else {}
    same_world = previous is not None and previous.get("size") == size and previous.get("seed") == seed
    if previous is not None and not same_world and not overwrite:
        n = sum(len(v) for v in recorded.values())
        raise SynthOutputError(
            f"{out}: holds another synthetic world ({MANIFEST}: size={previous.get('size')!r}, "
            f"seed={previous.get('seed')!r}, {n} files); asked for size={size!r}, seed={seed!r}. Pass overwrite=True "
            "(`eoplugins synth --overwrite`) to replace it (its recorded files are removed first), or choose "
            "another folder")
    if same_world:
        have = set(previous["products"])  # type: ignore[index]
        complete = {p for p in have if all((out / f).is_file() for f in recorded.get(p, []))}
        todo = list(wanted) if overwrite else [p for p in wanted if p not in complete]
        if not todo:
            logger.info("synthetic world already present in %s (size=%s, seed=%s)", out, size, seed)
            return {k: Path(v) for k, v in previous["products"].items() if k in wanted}  # type: ignore[index]
    else:
        todo = list(wanted)

    out.mkdir(parents=True, exist_ok=True)
    staging = out / f"{_STAGING_PREFIX}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        world = make_world(size, seed=seed)
        staged = write_region(world, staging, [p for p in todo if p in REGION_PRODUCTS])
        for name in todo:
            if name in EXTRA_PRODUCTS:
                module = importlib.import_module(f"terratorch_eoplugins.synthetic.{name}")
                kwargs: dict[str, Any] = {"size": size, "seed": seed}
                if "world" in inspect.signature(getattr(module, f"write_{name}")).parameters:
                    kwargs["world"] = world
                staged[name] = Path(getattr(module, f"write_{name}")(staging, **kwargs))
        product_dirs = {name: Path(path).relative_to(staging) for name, path in staged.items()}
        new_files: dict[str, list[str]] = {name: [] for name in product_dirs}
        empty_dirs: list[str] = []
        for f in sorted(staging.rglob("*")):
            if f.is_dir():
                if not any(f.iterdir()):
                    empty_dirs.append(f.relative_to(staging).as_posix())
                continue
            rel = f.relative_to(staging)
            owner = next((n for n, d in product_dirs.items() if rel == d or d in rel.parents), "other")
            new_files.setdefault(owner, []).append(rel.as_posix())
        # the world's own files may be replaced; a file it did not write may not
        owned = {f for fs in recorded.values() for f in fs} if previous is not None else set()

        def taken(rel: str) -> bool:
            """``out/rel`` holds something this world may not replace (a foreign file, a folder, a file as parent)."""
            target = out / rel
            if os.path.lexists(target):
                return target.is_dir() or rel not in owned
            return any(os.path.lexists(d) and not d.is_dir() for d in target.parents if out in d.parents)

        blocked = [rel for fs in new_files.values() for rel in fs if taken(rel)]
        if blocked:
            raise SynthOutputError(
                f"{out}: {len(blocked)} file(s) of the synthetic world would replace files that {MANIFEST} does not "
                f"record as written by `eoplugins synth` ({_listing(blocked)}); nothing was changed. Move them away "
                "or choose another folder")
        if same_world:
            stale = [f for p in todo for f in recorded.get(p, [])]
            keep = {p: fs for p, fs in recorded.items() if p not in todo}
        else:
            stale = [f for fs in recorded.values() for f in fs]
            keep = {}
        removed = _remove_files(out, stale)
        if removed:
            logger.info("removed %d file(s) of the previous world in %s", removed, out)
        for fs in new_files.values():
            for rel in fs:
                target = out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / rel, target)
        for rel in empty_dirs:
            (out / rel).mkdir(parents=True, exist_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = {**keep, **new_files}
    written = {**({k: Path(v) for k, v in previous["products"].items() if k in keep} if previous else {}),
               **{name: out / d for name, d in product_dirs.items()}}
    tmp = manifest_path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps({
        "generator": "eoplugins synth", "size": size, "seed": seed, "spec": dataclasses.asdict(world.spec),
        "products": {k: str(v) for k, v in written.items()},
        "files": {k: sorted(v) for k, v in files.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }, indent=2))
    os.replace(tmp, manifest_path)
    return {k: v for k, v in written.items() if k in wanted}


__all__ = ["ALL_PRODUCTS", "MANIFEST", "SynthOutputError", "World", "WorldSpec", "make_world", "write_region",
           "write_world"]
