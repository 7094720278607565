"""Hand-made PASTIS-R trees in the real on-disk format (numpy + json only), for the loader tests.

Patches are 128 x 128 like the real release; only the number of patches and dates is small.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SIZE = 128
N_BANDS = {"S2": 10, "S1A": 3, "S1D": 3}
# Lambert-93 (EPSG:2154) centre of the first patch, in the Occitanie area of the real T31TFJ tile.
ORIGIN_X, ORIGIN_Y = 760_000.0, 6_290_000.0


@dataclass
class PatchSpec:
    """One patch: id, fold and number of dates per modality."""

    id_patch: int
    fold: int
    n_dates: dict[str, int]
    tile: str = "t31tfj"


@dataclass
class PastisTree:
    """What a fixture wrote: the root and the per-patch metadata (dates as ``datetime.date`` lists)."""

    root: Path
    patches: list[PatchSpec]
    dates: dict[int, dict[str, list[dt.date]]] = field(default_factory=dict)
    centers: dict[int, tuple[float, float]] = field(default_factory=dict)
    cloud: dict[int, list[float]] = field(default_factory=dict)
    norm: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)

    def ids(self, folds: Sequence[int]) -> list[int]:
        """Sorted ids of the patches in ``folds``."""
        return sorted(p.id_patch for p in self.patches if p.fold in folds)


def default_patches(n_per_fold: int = 2, t_s2: Sequence[int] = (7, 9, 5, 8, 6, 10, 4, 7, 9, 8),
                    t_s1: int = 5) -> list[PatchSpec]:
    """``n_per_fold`` patches in each of the 5 folds, with S2 lengths varying per patch."""
    out = []
    for k in range(5 * n_per_fold):
        fold = k % 5 + 1
        out.append(PatchSpec(10000 + 7 * k, fold, {"S2": t_s2[k % len(t_s2)], "S1A": t_s1 + k % 2, "S1D": t_s1 - 1}))
    return out


def _dates(rng: np.random.Generator, n: int) -> list[dt.date]:
    start = dt.date(2018, 9, 3)
    days = np.sort(rng.choice(np.arange(0, 420), size=n, replace=False))
    return [start + dt.timedelta(days=int(d)) for d in days]


def _square(cx: float, cy: float, angle_deg: float, half: float = 640.0) -> list[list[float]]:
    a = math.radians(angle_deg)
    corners = [(-half, -half), (half, -half), (half, half), (-half, half), (-half, -half)]
    return [[cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)] for x, y in corners]


def write_pastis_tree(
    root: str | Path,
    patches: Sequence[PatchSpec] | None = None,
    *,
    modalities: Sequence[str] = ("S2", "S1A", "S1D"),
    date_style: str = "dict",
    s1_dtype: Any = np.float16,
    with_cloud: bool = True,
    with_crs: bool = True,
    seed: int = 0,
) -> PastisTree:
    """Write a PASTIS-R tree at ``root`` (the ``PASTIS-R`` directory itself).

    Args:
        root: output directory.
        patches: patch specs (default :func:`default_patches`).
        modalities: which ``DATA_*`` folders and ``NORM_*`` files to write.
        date_style: ``"dict"`` (JSON objects with int values, as in the real file), ``"dict_str"``
            (objects with string values) or ``"string"`` (JSON text in the property, as old GDAL returns it).
        s1_dtype: dtype of the S1 arrays.
        with_cloud: write the synthetic world's optional ``cloudcover-S2`` property.
        with_crs: write the ``crs`` member (EPSG:2154); without it GeoJSON means EPSG:4326.
        seed: numpy seed.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    patches = list(patches) if patches is not None else default_patches()
    rng = np.random.default_rng(seed)
    tree = PastisTree(root, patches)
    (root / "ANNOTATIONS").mkdir(exist_ok=True)
    for m in modalities:
        (root / f"DATA_{m}").mkdir(exist_ok=True)

    features = []
    for k, p in enumerate(patches):
        cx, cy = ORIGIN_X + 1500.0 * k, ORIGIN_Y - 900.0 * (k % 3)
        tree.centers[p.id_patch] = (cx, cy)
        props: dict[str, Any] = {"ID_PATCH": p.id_patch, "N_Parcel": int(rng.integers(5, 90)),
                                 "Parcel_Cover": float(rng.uniform(0.3, 0.95)), "TILE": p.tile, "Fold": p.fold}
        tree.dates[p.id_patch] = {}
        for m in ("S2", "S1A", "S1D"):
            dates = _dates(rng, p.n_dates[m])
            tree.dates[p.id_patch][m] = dates
            obj: dict[str, Any] = {str(i): int(d.strftime("%Y%m%d")) for i, d in enumerate(dates)}
            if date_style == "dict_str":
                obj = {k_: str(v) for k_, v in obj.items()}
            props[f"dates-{m}"] = json.dumps(obj) if date_style == "string" else obj
        if with_cloud:
            cloud = [round(float(c), 3) for c in rng.uniform(0, 1, p.n_dates["S2"])]
            tree.cloud[p.id_patch] = cloud
            obj = {str(i): c for i, c in enumerate(cloud)}
            props["cloudcover-S2"] = json.dumps(obj) if date_style == "string" else obj
        features.append({"type": "Feature", "properties": props,
                         "geometry": {"type": "Polygon", "coordinates": [_square(cx, cy, 3.0 + k)]}})

        for m in modalities:
            t = p.n_dates[m]
            if m == "S2":
                arr = rng.integers(0, 6000, size=(t, 10, SIZE, SIZE)).astype(np.int16)
            else:
                arr = rng.normal(-12, 4, size=(t, 3, SIZE, SIZE)).astype(s1_dtype)
            np.save(root / f"DATA_{m}" / f"{m}_{p.id_patch}.npy", arr)
        target = np.zeros((3, SIZE, SIZE), np.uint8)
        target[0] = rng.integers(0, 20, size=(SIZE, SIZE))
        target[0, :4, :4] = 19  # every patch has void pixels
        target[1] = rng.integers(0, 50, size=(SIZE, SIZE))
        target[2] = target[0] > 0
        np.save(root / "ANNOTATIONS" / f"TARGET_{p.id_patch}.npy", target)

    fc: dict[str, Any] = {"type": "FeatureCollection", "name": "metadata", "features": features}
    if with_crs:
        fc["crs"] = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::2154"}}
    (root / "metadata.geojson").write_text(json.dumps(fc))

    for m in modalities:
        c = N_BANDS[m]
        base_mean = 1000.0 if m == "S2" else -12.0
        norm = {f"Fold_{f}": {"mean": (base_mean + 50.0 * f + rng.uniform(-10, 10, c)).tolist(),
                              "std": (rng.uniform(100, 900, c) if m == "S2" else rng.uniform(2, 5, c)).tolist()}
                for f in range(1, 6)}
        tree.norm[m] = norm
        (root / f"NORM_{m}_patch.json").write_text(json.dumps(norm))
    return tree


def small_tree(root: str | Path, **kwargs: Any) -> PastisTree:
    """One patch per fold with 2-3 dates: cheap trees for error tests that modify files."""
    patches = [PatchSpec(20000 + k, k % 5 + 1, {"S2": 2 + k % 2, "S1A": 2, "S1D": 3}) for k in range(5)]
    return write_pastis_tree(root, patches, **kwargs)
