"""PASTIS-R release cut from the synthetic world's tiles.

Writes exactly the layout of the public PASTIS-R archive (zenodo 5735646)::

    PASTIS-R/metadata.geojson                  EPSG:2154 patch polygons, ID_PATCH, Fold, TILE, N_Parcel, Parcel_Cover,
                                               dates-S2/S1A/S1D as {"0": YYYYMMDD, ...}
    PASTIS-R/NORM_{S2,S1A,S1D}_patch.json      {"Fold_k": {"mean": [C], "std": [C]}}
    PASTIS-R/DATA_S2/S2_{ID}.npy               T x 10 x 128 x 128 int16 (reflectance * 1e4; the 2018-19 archive
                                               has no L2A offset)
    PASTIS-R/DATA_S1A/S1A_{ID}.npy             T' x 3 x 128 x 128 float32 (VV, VH, VV-VH in dB)
    PASTIS-R/DATA_S1D/S1D_{ID}.npy             T'' x 3 x 128 x 128 float32
    PASTIS-R/ANNOTATIONS/TARGET_{ID}.npy       3 x 128 x 128 uint8 (0: semantic class, 1: parcel index in patch,
                                               2: void flag)

plus one synthetic-only property, ``cloudcover-S2`` (fraction of cloudy pixels per date, same keying as
``dates-S2``), which real loaders ignore and which cloud-robustness evaluations use. As in the real
archive, a patch keeps only the dates on which it is not almost fully clouded, so T varies per patch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pyproj import Transformer

from terratorch_eoplugins.datasets.pastis import VOID_CLASS
from terratorch_eoplugins.synthetic.world import S2_BANDS, World, _rng

PATCH = 128
#: PASTIS S2 bands (B2, B3, B4, B5, B6, B7, B8, B8A, B11, B12) as indices into :data:`S2_BANDS`.
PASTIS_S2_INDEX = [S2_BANDS.index(b) for b in ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")]
#: A patch drops an S2 date whose cloud cover exceeds this fraction.
MAX_PATCH_CLOUD = 0.9


class PastisWriter:
    """Accumulates rendered dates into 128 x 128 patches and writes the PASTIS-R tree in :meth:`finish`."""

    def __init__(self, world: World, out_dir: str | Path) -> None:
        self.world = world
        self.root = Path(out_dir) / "PASTIS-R"
        rows, cols = world.height // PATCH, world.width // PATCH
        if rows * cols == 0:
            raise ValueError(f"world {world.shape} is smaller than one {PATCH}x{PATCH} PASTIS patch")
        self.windows = [(slice(r * PATCH, (r + 1) * PATCH), slice(c * PATCH, (c + 1) * PATCH))
                        for r in range(rows) for c in range(cols)]
        rng = _rng(world.spec.seed, "pastis-ids")
        n = len(self.windows)
        self.ids = np.sort(rng.choice(np.arange(10000, 10000 + 40 * n), size=n, replace=False))
        self.folds = (rng.permutation(n) % 5) + 1
        self.s2: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.s2_dates: list[list[int]] = [[] for _ in range(n)]
        self.s2_cloud: list[list[float]] = [[] for _ in range(n)]
        self.s1: dict[str, list[list[np.ndarray]]] = {"asc": [[] for _ in range(n)], "desc": [[] for _ in range(n)]}
        self.s1_dates: dict[str, list[int]] = {"asc": [], "desc": []}

    def add_s2(self, index: int, reflectance: np.ndarray, clouds: np.ndarray) -> None:
        when = int(self.world.s2_dates[index].strftime("%Y%m%d"))
        for k, (ry, rx) in enumerate(self.windows):
            cover = float((clouds[ry, rx] > 0.5).mean())
            if cover > MAX_PATCH_CLOUD:
                continue
            patch = reflectance[PASTIS_S2_INDEX, ry, rx]
            self.s2[k].append(np.clip(np.round(patch * 10000), 0, 32767).astype(np.int16))
            self.s2_dates[k].append(when)
            self.s2_cloud[k].append(round(cover, 4))

    def add_s1(self, index: int, orbit: str, backscatter: np.ndarray) -> None:
        self.s1_dates[orbit].append(int(self.world.s1_dates(orbit)[index].strftime("%Y%m%d")))
        for k, (ry, rx) in enumerate(self.windows):
            vv, vh = backscatter[0, ry, rx], backscatter[1, ry, rx]
            self.s1[orbit][k].append(np.stack([vv, vh, vv - vh]).astype(np.float32))

    def _target(self, ry: slice, rx: slice) -> tuple[np.ndarray, int, float]:
        world = self.world
        pid = world.parcel_id[ry, rx]
        sem = world.crop_class[ry, rx].copy()
        ids, inside = np.unique(pid[pid > 0], return_counts=True)
        total = np.bincount(world.parcel_id.ravel(), minlength=world.n_parcels + 1)[ids] if len(ids) else ids
        # PASTIS marks parcels lying mostly outside the patch as void.
        void_ids = ids[inside < 0.5 * total] if len(ids) else ids
        void = np.isin(pid, void_ids)
        sem[void] = VOID_CLASS
        local = np.zeros_like(pid)
        for j, i in enumerate(ids, start=1):
            local[pid == i] = j
        target = np.stack([sem, np.minimum(local, 255), void.astype(np.uint8)]).astype(np.uint8)
        return target, int(len(ids)), float((pid > 0).mean())

    def finish(self) -> Path:
        root = self.root
        for d in ("DATA_S2", "DATA_S1A", "DATA_S1D", "ANNOTATIONS"):
            (root / d).mkdir(parents=True, exist_ok=True)
        to_l93 = Transformer.from_crs(self.world.crs, "EPSG:2154", always_xy=True)
        tr = self.world.transform
        features = []
        for k, (ry, rx) in enumerate(self.windows):
            pid = int(self.ids[k])
            if not self.s2[k]:
                raise RuntimeError(f"patch {pid} has no cloud-free S2 date; increase n_s2_dates")
            np.save(root / "DATA_S2" / f"S2_{pid}.npy", np.stack(self.s2[k]))
            np.save(root / "DATA_S1A" / f"S1A_{pid}.npy", np.stack(self.s1["asc"][k]))
            np.save(root / "DATA_S1D" / f"S1D_{pid}.npy", np.stack(self.s1["desc"][k]))
            target, n_parcel, cover = self._target(ry, rx)
            np.save(root / "ANNOTATIONS" / f"TARGET_{pid}.npy", target)
            # Patch square in the UTM grid, reprojected to Lambert-93 (a slightly rotated square there).
            xs = [tr.c + rx.start * tr.a, tr.c + rx.stop * tr.a]
            ys = [tr.f + ry.start * tr.e, tr.f + ry.stop * tr.e]
            ring_utm = [(xs[0], ys[0]), (xs[1], ys[0]), (xs[1], ys[1]), (xs[0], ys[1]), (xs[0], ys[0])]
            ring = [list(map(lambda v: round(v, 3), to_l93.transform(x, y))) for x, y in ring_utm]
            features.append({
                "type": "Feature",
                "properties": {
                    "ID_PATCH": pid,
                    "N_Parcel": n_parcel,
                    "Parcel_Cover": round(cover, 6),
                    "TILE": self.world.spec.tile.lower(),
                    "dates-S2": {str(i): d for i, d in enumerate(self.s2_dates[k])},
                    "dates-S1A": {str(i): d for i, d in enumerate(self.s1_dates["asc"])},
                    "dates-S1D": {str(i): d for i, d in enumerate(self.s1_dates["desc"])},
                    "Fold": int(self.folds[k]),
                    "cloudcover-S2": {str(i): c for i, c in enumerate(self.s2_cloud[k])},
                },
                "geometry": {"type": "Polygon", "coordinates": [ring]},
            })
        collection = {
            "type": "FeatureCollection",
            "name": "metadata",
            "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::2154"}},
            "features": features,
        }
        (root / "metadata.geojson").write_text(json.dumps(collection))
        self._write_norms()
        return root

    def _write_norms(self) -> None:
        series = {"S2": self.s2, "S1A": self.s1["asc"], "S1D": self.s1["desc"]}
        for name, per_patch in series.items():
            stats = {}
            for fold in range(1, 6):
                arrays = [np.stack(per_patch[k]).astype(np.float64) for k in range(len(self.windows))
                          if self.folds[k] == fold]
                if not arrays:
                    continue
                # Pooled over dates and pixels of all patches of the fold, per channel.
                flat = np.concatenate([a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1) for a in arrays], axis=1)
                stats[f"Fold_{fold}"] = {"mean": flat.mean(1).round(6).tolist(), "std": flat.std(1).round(6).tolist()}
            (self.root / f"NORM_{name}_patch.json").write_text(json.dumps(stats))
