"""Loader throughput: the project's dataset classes vs a reference loader, on the same files, in one process.

PASTIS-R (``<root>/PASTIS-R``, e.g. the synthetic world of ``eoplugins synth --out data/demo --size demo``):

* ``ours``: :class:`terratorch_eoplugins.datasets.pastis.PASTIS` with its defaults (``normalize=True``: float32
  ``C x T x H x W`` standardised with the NORM_*_patch.json statistics, all value checks on; ``void_label=-1``),
  all five folds;
* ``ours raw``: the same with ``normalize=False`` (float32 values as stored, the same work as the reference);
* ``torchgeo``: :class:`torchgeo.datasets.PASTIS` (``bands="s2"``, semantic mode: ``np.load`` of the whole patch,
  ``float()``, target channel 0 as long), all five folds. For the 6-date PANGAEA protocol its sample is cut to the
  same ``round(linspace(0, T-1, 6))`` dates (torchgeo has no date selection: it reads every date); for S2 + S1
  the same index of a ``bands="s1a"`` dataset adds the S1A time series through torchgeo's own image reader
  (``_load_image``; its mask is not read twice).

HLS Burn Scars (``--burnscars-root``, default ``<root>/hls_burn_scars``, else a synthetic ``tiny`` tree written to
a temporary folder): the ``validation/`` scenes read by ours (``HLSBurnScars(split="test")``, normalised, and
``normalize=False``) and by terratorch's ``FireScarsNonGeo(split="val")`` (rioxarray, no normalisation).

Cases: PASTIS S2 all dates, S2 6 dates (PANGAEA), S2 + S1A all dates, S2 + S1A 6 dates; HLS Burn Scars. Each
loader reads every sample once as warm-up (so every file is in the page cache for all of them), then ``--repeats``
passes over all samples, alternating the order of the loaders. Printed per case: samples per second of each loader
(median pass, wall clock) and the ratios ours / reference (> 1: ours is faster), as the median of the per-repeat
ratios of wall-clock time and of thread CPU time (on a shared machine the CPU time is the steadier measure), and
whether ``ours raw`` returned exactly the reference's arrays for every sample (PASTIS: transposed to
``C x T x H x W``, void 19 as -1; HLS Burn Scars: the reference's no-data pixels, value 9999 in these files, set
to 0 and masked -1 as ours does), i.e. both read the same files to the same values.

    python benchmarks/loader_throughput.py                      # data/demo/PASTIS-R, 7 repeats, 1 thread
    python benchmarks/loader_throughput.py --root /data --repeats 3 --limit 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

Loader = Callable[[int], Any]


def _pass(load: Loader, indices: Sequence[int]) -> tuple[float, float]:
    """Wall-clock and thread CPU seconds of loading ``indices`` once."""
    w0, c0 = time.perf_counter(), time.thread_time()
    for i in indices:
        load(i)
    return time.perf_counter() - w0, time.thread_time() - c0


def compare(loaders: dict[str, Loader], indices: Sequence[int], repeats: int) -> dict[str, dict[str, float]]:
    """Time ``loaders`` over ``indices`` in alternating order; return samples/s (median pass) per loader and the
    median per-repeat ratios of every loader against the last one (the reference)."""
    names = list(loaders)
    for name in names:  # warm-up: page cache, lazy caches, allocator
        _pass(loaders[name], indices)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            w, c = _pass(loaders[name], indices)
            wall[name].append(w)
            cpu[name].append(c)
    ref = names[-1]
    out: dict[str, dict[str, float]] = {}
    for name in names:
        out[name] = {
            "samples_per_s": len(indices) / statistics.median(wall[name]),
            "cpu_samples_per_s": len(indices) / statistics.median(cpu[name]),
            "ratio_wall": statistics.median(b / a for a, b in zip(wall[name], wall[ref])),
            "ratio_cpu": statistics.median(b / a for a, b in zip(cpu[name], cpu[ref])),
        }
    return out


def _linspace(t: int, n: int) -> np.ndarray:
    return np.round(np.linspace(0, t - 1, n)).astype(np.int64)


def pastis_cases(root: Path, num_dates: int) -> list[tuple[str, dict[str, Loader], list[int]]]:
    """The PASTIS cases: (title, {ours, ours raw, torchgeo}, indices) with the same files for every loader."""
    from torchgeo.datasets import PASTIS as TorchgeoPASTIS

    from terratorch_eoplugins.datasets.pastis import PASTIS

    tg = {b: TorchgeoPASTIS(str(root), folds=(1, 2, 3, 4, 5), bands=b) for b in ("s2", "s1a")}
    tg_ids = [int(i) for i in tg["s2"].idxs]
    cases = []
    for mods in (("S2",), ("S2", "S1A")):
        for nd in (None, num_dates):
            ours = PASTIS(root / "PASTIS-R", split=None, modalities=mods, num_dates=nd)
            raw = PASTIS(root / "PASTIS-R", split=None, modalities=mods, num_dates=nd, normalize=False)
            pos = {pid: k for k, pid in enumerate(tg_ids)}
            order = [pos[pid] for pid in ours.ids]  # torchgeo index of our k-th patch

            def reference(k: int, mods: tuple[str, ...] = mods, nd: int | None = nd,
                          order: list[int] = order) -> dict[str, Any]:
                i = order[k]
                sample = tg["s2"][i]
                images = {"S2": sample["image"]}
                if "S1A" in mods:
                    images["S1A"] = tg["s1a"]._load_image(i)
                if nd is not None:
                    images = {m: x[torch.from_numpy(_linspace(x.shape[0], nd))] for m, x in images.items()}
                sample["image"] = images
                return sample

            title = f"PASTIS {' + '.join(mods)}, {'all dates' if nd is None else f'{nd} dates (PANGAEA)'}"
            cases.append((title, {"ours": ours.__getitem__, "ours raw": raw.__getitem__, "torchgeo": reference},
                          list(range(len(ours))), _same_pastis))
    return cases


def _same_pastis(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """``ours raw`` sample ``a`` holds torchgeo's arrays ``b`` (C x T x H x W; void 19 as -1)."""
    imgs = a["image"] if isinstance(a["image"], dict) else {"S2": a["image"]}
    mask = b["mask"].clone()
    mask[mask == 19] = -1
    return torch.equal(a["mask"], mask) and all(torch.equal(x, b["image"][m].permute(1, 0, 2, 3))
                                                for m, x in imgs.items())


def _same_burnscars(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """``ours raw`` sample ``a`` holds terratorch's arrays ``b`` once terratorch's are given the no-data handling
    ours does: image pixels at the PANGAEA no-data value 9999 (or NaN) set to 0 in every band and -1 in the mask
    (terratorch replaces only values the file's nodata tag masks)."""
    image = b["image"].clone()
    bad = (image == 9999) | image.isnan()
    image[bad] = 0
    mask = b["mask"].clone()
    mask[bad.any(dim=0)] = -1
    return torch.equal(a["image"], image) and torch.equal(a["mask"], mask)


def burnscars_case(root: Path, min_samples: int) -> tuple[str, dict[str, Loader], list[int], Callable]:
    """HLS Burn Scars ``validation/`` scenes: ours (``split="test"``) vs terratorch's ``FireScarsNonGeo``
    (``split="val"``, the same folder), each scene repeated up to ``min_samples`` samples per pass."""
    from terratorch.datasets import FireScarsNonGeo

    from terratorch_eoplugins.datasets.burnscars import HLSBurnScars

    ours = HLSBurnScars(root, split="test")
    raw = HLSBurnScars(root, split="test", normalize=False)
    ref = FireScarsNonGeo(str(root), split="val")
    names = [Path(f).name for f in ref.image_files]
    if [s["image"].name for s in ours.scenes] != names:
        raise SystemExit(f"{root}/validation: ours and terratorch list different scenes")
    indices = list(range(len(ours))) * max(1, -(-min_samples // len(ours)))
    loaders = {"ours": ours.__getitem__, "ours raw": raw.__getitem__, "terratorch": ref.__getitem__}
    return f"HLS Burn Scars, {len(ours)} validation scenes", loaders, indices, _same_burnscars


class MMSTStyleCropNet:
    """Reference reader of CropNet county-years as the CropNet authors' MMST-ViT loaders read them (written here
    from their description, not copied): per sample, every listed Sentinel-2 date group of the county read with
    h5py and stacked; the daily weather of the season from the monthly WRF-HRRR CSVs (``pandas.read_csv`` with an
    LRU cache of 128 files, concatenated, filtered on the county and ``Daily``, grouped by month and grid, sorted by
    day, days 1-28) and the monthly weather of the preceding years the same way on ``Monthly`` rows; the county's
    USDA row.

    It reads the files ``ours`` reads for the same sample (the dataset's own index: image files and dates, HRRR and
    USDA paths), so the two do the same I/O; ours also fills gaps, masks and matches grids, which this does not.
    """

    def __init__(self, ds: Any) -> None:
        import functools

        import pandas as pd

        self.ds = ds
        self.read_csv = functools.lru_cache(maxsize=128)(pd.read_csv)
        self.columns = list(ds.weather_variables)

    def _weather(self, paths: list[Path], fips: str, kind: str) -> list[np.ndarray]:
        import pandas as pd

        frames = [self.read_csv(str(p)) for p in paths if p.is_file()]
        if not frames:
            return []
        df = pd.concat(frames, ignore_index=True)
        df = df[(df["FIPS Code"].astype(str).str.zfill(5) == fips) & (df["Daily/Monthly"] == kind)]
        out = []
        for _, month in df.groupby("Month"):
            if kind == "Daily":
                # days 1-28 as MMST-ViT keeps them; a missing day (the synthetic world drops some, as real
                # CropNet does) becomes a NaN row so that the grids stack (MMST-ViT's torch.stack would fail)
                grids = [g.sort_values("Day").drop_duplicates("Day").set_index("Day").reindex(range(1, 29))
                         [self.columns].to_numpy() for _, g in month.groupby("Grid Index")]
                out.append(np.stack(grids))
            else:
                out.append(month[self.columns].to_numpy().reshape(-1))
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        import h5py

        ds, e = self.ds, self.ds._entries[index]
        images = []
        for path, dates in e.s2:
            with h5py.File(path, "r") as h5:
                grp = h5[e.fips]
                images.extend(np.asarray(grp[d]["data"]) for d in dates)
        short = self._weather([ds._hrrr_path(e.year, e.state_fips, e.st, m) for m in ds.months], e.fips, "Daily")
        long = [self._weather([ds._hrrr_path(y, e.state_fips, e.st, m) for m in range(1, 13)], e.fips, "Monthly")
                for y in range(e.year - ds.long_term_years, e.year)]
        usda = self.read_csv(str(ds._usda_path(e.year)))
        row = usda[(usda["state_ansi"].astype(str).str.zfill(2) + usda["county_ansi"].astype(str).str.zfill(3))
                   == e.fips]
        return {"image": torch.from_numpy(np.stack(images)), "weather_short": [torch.from_numpy(x) for x in short],
                "weather_long": [torch.from_numpy(np.stack(x)) if x else None for x in long], "usda": row}


def _same_cropnet(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The images (``ours raw``: ``T x G x C x H x W`` of the kept dates, scaled by 1/255) are the reference's
    stacked date groups (``T x G x H x W x C``); the weather and targets are shaped differently and not compared."""
    ref = b["image"].permute(0, 1, 4, 2, 3).float() / 255.0
    return a["image"].shape == ref.shape and torch.equal(a["image"], ref)


def cropnet_case(root: Path, min_samples: int) -> tuple[str, dict[str, Loader], list[int], Callable] | None:
    """CropNet soybeans, the validation year (2022): ours (``grid_aggregation='none'``, per-channel image
    statistics of the split applied) and ``ours raw`` (no statistics) vs :class:`MMSTStyleCropNet`."""
    from terratorch_eoplugins.datasets.cropnet import CropNet

    raw = CropNet(root, crop="Soybeans", split="val", days_per_month=28)
    if len(raw) == 0:
        return None
    ours = CropNet(root, crop="Soybeans", split="val", days_per_month=28)
    ours.set_statistics(*raw.image_statistics(max_samples=4), **raw.weather_statistics(max_samples=4))
    ref = MMSTStyleCropNet(raw)
    indices = list(range(len(raw))) * max(1, -(-min_samples // len(raw)))
    loaders = {"ours": ours.__getitem__, "ours raw": raw.__getitem__, "MMST-ViT style": ref.__getitem__}
    return f"CropNet soybeans 2022, {len(raw)} counties", loaders, indices, _same_cropnet


def same_arrays(loaders: dict[str, Loader], indices: Sequence[int], same: Callable) -> bool:
    """Whether ``ours raw`` and the reference (the last loader) return the same arrays for every sample."""
    ref = list(loaders)[-1]
    return all(same(loaders["ours raw"](k), loaders[ref](k)) for k in sorted(set(indices)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="data/demo", help="folder holding PASTIS-R/ (default data/demo)")
    ap.add_argument("--repeats", type=int, default=7, help="timed passes per loader (alternating order)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both loaders)")
    ap.add_argument("--num-dates", type=int, default=6, help="dates of the PANGAEA protocol")
    ap.add_argument("--limit", type=int, help="time only the first N samples")
    ap.add_argument("--burnscars-root", help="hls_burn_scars folder (training/, validation/); default "
                    "<root>/hls_burn_scars, else a synthetic 'tiny' tree written to a temporary folder")
    ap.add_argument("--no-burnscars", action="store_true", help="skip the HLS Burn Scars case")
    ap.add_argument("--no-cropnet", action="store_true", help="skip the CropNet case (<root>/CropNet)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    if not (root / "PASTIS-R" / "metadata.geojson").is_file():
        raise SystemExit(f"{root / 'PASTIS-R'}: no PASTIS-R tree (make one: eoplugins synth --out {root} --size demo)")

    results: dict[str, Any] = {"root": str(root), "threads": args.threads, "repeats": args.repeats, "cases": {}}
    print(f"loader throughput, {root}, torch threads {args.threads}, {args.repeats} alternating repeats "
          f"(samples/s of the median pass; ratio = ours / reference speed, median of per-repeat ratios)")
    print(f"{'case':38s} {'n':>4s} {'ours':>8s} {'ours raw':>9s} {'reference':>10s} {'ours/ref':>8s} {'(cpu)':>6s} "
          f"{'raw/ref':>7s} {'(cpu)':>6s}  same arrays")
    cases = pastis_cases(root, args.num_dates)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_burnscars:
            bs_root = Path(args.burnscars_root) if args.burnscars_root else root / "hls_burn_scars"
            if not (bs_root / "validation").is_dir():
                from terratorch_eoplugins.synthetic.burnscars import write_burnscars

                bs_root = write_burnscars(tmp, "tiny", seed=0)
            cases.append(burnscars_case(bs_root, 16))
        if not args.no_cropnet and (root / "CropNet").is_dir():
            case = cropnet_case(root / "CropNet", 8)
            if case is not None:
                cases.append(case)
        for title, loaders, indices, same in cases:
            if args.limit:
                indices = indices[: args.limit]
            identical = same_arrays(loaders, indices, same)
            r = compare(loaders, indices, args.repeats)
            ref = list(loaders)[-1]
            results["cases"][title] = {"samples": len(indices), "reference": ref, "same_arrays": identical, **r}
            print(f"{title:38s} {len(indices):4d} {r['ours']['samples_per_s']:8.1f} "
                  f"{r['ours raw']['samples_per_s']:9.1f} {r[ref]['samples_per_s']:10.1f} "
                  f"{r['ours']['ratio_wall']:8.2f} {r['ours']['ratio_cpu']:6.2f} {r['ours raw']['ratio_wall']:7.2f} "
                  f"{r['ours raw']['ratio_cpu']:6.2f}  {'yes' if identical else 'NO'} ({ref})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
