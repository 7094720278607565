"""GEDI L1B/L2A/L2B shots: granule discovery, HDF5 beam reading and waveform processing.

:class:`GEDIShots` (a torchgeo :class:`~torchgeo.datasets.NonGeoDataset`) reads the real GEDI HDF5 granules
unchanged (layout in ``../shared/reference/datasets.md`` section 4): one sample per GEDI shot, joining the three
products of a granule on ``shot_number`` per beam: processed L1B waveform, RH98 (L2A), canopy cover and PAI
(L2B), location and acquisition time. Configurable quality filtering; filtered shots are counted. The image
chips collocated with these shots are :class:`~terratorch_eoplugins.datasets.gedi_chips.GEDIChips`.

Waveform processing (GEDI-BDL style): ``w = max(raw - noise_mean_corrected, 0)``, normalised to
unit sum, then brought to ``waveform_length`` samples. ``waveform_mode="pad"`` (default) keeps
the native 1-ns (15 cm) sampling so the vertical scale is the same for every shot: shorter
waveforms are zero-padded at the end (bottom); longer ones are cropped to the window of
``waveform_length`` samples that holds the most energy. ``waveform_mode="resample"`` linearly
interpolates the whole receive window onto ``waveform_length`` samples (fixed size whatever the
window, at the price of a per-shot vertical scale) and renormalises to unit sum.

DUNIA's preprocessing (appendix F), both off by default here and on in the DUNIA configs:

* ``waveform_window="signal"`` first cuts each waveform between its signal start and signal end, read from
  the real L2A fields ``BEAMxxxx/rx_processing_a<n>/toploc`` (highest detected return) and ``.../botloc``
  (lowest detected return) of the shot's ``selected_algorithm`` ``<n>``: sample positions within the shot's
  ``rx_sample_count`` samples, taken as 1-based like ``rx_sample_start_index`` and rounded outwards
  (``floor(toploc) .. ceil(botloc)``, clipped to the waveform). The paper names the fields "signal start / signal
  end" of L1B; the public L1B has no such fields, the L2A ones are their GEDI product equivalents. Shots whose
  window is missing (-9999, NaN, ``botloc < toploc``) are dropped and counted (``signal_window``).
  ``"full"`` keeps the whole receive window (GEDI-BDL).
* ``leaf_on_months=(4, 5, 6, 7, 8, 9)`` keeps the shots acquired April-September (the L1B ``delta_time``,
  seconds since 2018-01-01 UTC, gives the month), dropping leaf-off waveforms whose deciduous canopy
  return differs; ``None`` keeps every shot. Removed shots are counted (``leaf_off``).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor
from torchgeo.datasets import NonGeoDataset

from terratorch_eoplugins.datasets.common import logger, split_indices
from terratorch_eoplugins.errors import EODataError, EODatasetNotFoundError, require_dir, require_file

__all__ = [
    "ALL_BEAMS", "COVERAGE_BEAMS", "GEDIGranule", "GEDIShots", "POWER_BEAMS", "TARGETS", "extract_waveform",
    "LEAF_ON_MONTHS", "cut_signal", "find_granules", "process_waveform", "shot_months",
]

COVERAGE_BEAMS: tuple[str, ...] = ("BEAM0000", "BEAM0001", "BEAM0010", "BEAM0011")
POWER_BEAMS: tuple[str, ...] = ("BEAM0101", "BEAM0110", "BEAM1000", "BEAM1011")
ALL_BEAMS: tuple[str, ...] = COVERAGE_BEAMS + POWER_BEAMS
TARGETS: tuple[str, ...] = ("rh98", "cover", "pai")
#: GEDI ``delta_time`` counts seconds since this instant (UTC).
GEDI_EPOCH = dt.datetime(2018, 1, 1)
INVALID = -9999.0
#: DUNIA's leaf-on season (appendix F: "only ... waveforms acquired during the leaf-on season", April-September).
LEAF_ON_MONTHS: tuple[int, ...] = (4, 5, 6, 7, 8, 9)
WAVEFORM_WINDOWS: tuple[str, ...] = ("full", "signal")

_PRODUCTS = {"1_B": "L1B", "2_A": "L2A", "2_B": "L2B"}
_NAME_RE = re.compile(r"^GEDI0(?P<level>1_B|2_A|2_B)_(?P<time>\d{13})_O(?P<orbit>\d{5})_(?P<sub>\d{2})_.*\.h5$")
_L1B_FIELDS = ("shot_number", "rxwaveform", "rx_sample_count", "rx_sample_start_index", "noise_mean_corrected",
               "delta_time")
_L2A_FIELDS = ("shot_number", "rh", "quality_flag", "degrade_flag", "sensitivity", "lat_lowestmode", "lon_lowestmode")
_L2B_FIELDS = ("shot_number", "cover", "pai", "l2b_quality_flag", "algorithmrun_flag")


# ------------------------------------------------------------------------------------ granules
@dataclass(frozen=True)
class GEDIGranule:
    """The three product files of one GEDI (sub-)granule, matched by orbit and sub-granule number."""

    name: str
    l1b: Path
    l2a: Path
    l2b: Path


def find_granules(root: str | Path | Sequence[str | Path]) -> list[GEDIGranule]:
    """Find GEDI granules in a folder (searched recursively) or in an explicit list of files.

    Files are matched across products by ``(orbit, sub-granule)`` from the official file names
    ``GEDI0{1_B|2_A|2_B}_{YYYYDDDHHMMSS}_O{orbit}_{sub}_...h5``. Incomplete triplets are skipped
    with a warning; no complete triplet at all raises :class:`EODatasetNotFoundError`.
    """
    if isinstance(root, (str, Path)):
        folder = require_dir(root, "GEDI granule folder")
        files = sorted(p for p in folder.rglob("GEDI0*.h5"))
        where = str(folder)
    else:
        files = [require_file(p, "GEDI granule") for p in root]
        where = f"{len(files)} listed files"
    groups: dict[tuple[str, str], dict[str, Path]] = {}
    stamps: dict[tuple[str, str], str] = {}
    for f in files:
        m = _NAME_RE.match(f.name)
        if m is None:
            if isinstance(root, (str, Path)):
                logger.warning("GEDI: ignoring %s (name does not follow "
                               "GEDI0{1_B|2_A|2_B}_<time>_O<orbit>_<sub>_...h5)", f)
                continue
            raise EODataError(f"{f}: not a GEDI granule name; expected GEDI0{{1_B|2_A|2_B}}_<YYYYDDDHHMMSS>_"
                              f"O<orbit>_<sub>_..._V002.h5")
        key = (m["orbit"], m["sub"])
        product = _PRODUCTS[m["level"]]
        slot = groups.setdefault(key, {})
        if product in slot:
            raise EODataError(f"two {product} files for orbit {key[0]} sub-granule {key[1]}: {slot[product]} and {f}")
        slot[product] = f
        stamps.setdefault(key, m["time"])
    granules = []
    for key in sorted(groups):
        slot = groups[key]
        missing = [p for p in ("L1B", "L2A", "L2B") if p not in slot]
        if missing:
            logger.warning("GEDI: skipping orbit %s sub-granule %s: missing %s product (have %s)", key[0], key[1],
                           "/".join(missing), ", ".join(str(p) for p in slot.values()))
            continue
        granules.append(GEDIGranule(f"{stamps[key]}_O{key[0]}_{key[1]}", slot["L1B"], slot["L2A"], slot["L2B"]))
    if not granules:
        raise EODatasetNotFoundError(where, "Complete GEDI granules (matching GEDI01_B + GEDI02_A + GEDI02_B files)")
    return granules


def _beams_in(f: h5py.File, path: Path, product: str) -> list[str]:
    beams = sorted(k for k in f.keys() if re.fullmatch(r"BEAM\d{4}", k) and isinstance(f[k], h5py.Group))
    if not beams:
        raise EODataError(f"{path}: no BEAMxxxx groups found; expected a GEDI {product} granule with groups "
                          f"{', '.join(ALL_BEAMS)}")
    short = f.get("METADATA/DatasetIdentification")
    if short is not None and "shortName" in short.attrs:
        name = short.attrs["shortName"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        if product not in name.replace("_", ""):
            raise EODataError(f"{path}: METADATA/DatasetIdentification shortName is {name!r}; expected a {product} "
                              "product (file name and content disagree)")
    return beams


def _open_h5(path: Path, product: str) -> h5py.File:
    """``h5py.File(path, "r")`` with an :class:`EODataError` naming the file when it is not a readable HDF5 file."""
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise EODataError(f"{path}: cannot be opened as an HDF5 file ({err}); expected a GEDI {product} granule "
                          "(a truncated download or a corrupt file?)") from None


def _read_beam(g: h5py.Group, path: Path, beam: str, fields: Sequence[str], product: str) -> dict[str, np.ndarray]:
    """Read per-shot datasets of one beam (``rh`` only column 98, ``rxwaveform`` only its length)."""
    out: dict[str, np.ndarray] = {}
    lengths: dict[str, int] = {}
    for name in fields:
        ds = g.get(name)
        if not isinstance(ds, h5py.Dataset):
            raise EODataError(f"{path}: {beam} has no dataset {name!r}; a GEDI {product} beam needs "
                              f"{', '.join(fields)}")
        if name == "rxwaveform":
            if ds.ndim != 1:
                raise EODataError(f"{path}: {beam}/rxwaveform must be one flat 1-D array, got shape {ds.shape}")
            out["n_waveform_samples"] = np.array(ds.shape[0])
        elif name == "rh":
            if ds.ndim != 2 or ds.shape[1] < 99:
                raise EODataError(f"{path}: {beam}/rh must be N x 101 (RH0..RH100), got shape {ds.shape}")
            out["rh98"] = ds[:, 98].astype(np.float32)
            lengths["rh"] = ds.shape[0]
        else:
            arr = ds[()]
            if arr.ndim != 1:
                raise EODataError(f"{path}: {beam}/{name} must be 1-D (one value per shot), got shape {arr.shape}")
            out[name] = arr
            lengths[name] = len(arr)
    n = lengths["shot_number"]
    for name, length in lengths.items():
        if length != n:
            raise EODataError(f"{path}: {beam}/{name} has {length} shots but shot_number has {n}")
    if not np.issubdtype(out["shot_number"].dtype, np.integer):
        raise EODataError(f"{path}: {beam}/shot_number must be an integer (uint64) array, "
                          f"got {out['shot_number'].dtype}")
    if len(np.unique(out["shot_number"])) != n:
        raise EODataError(f"{path}: {beam}/shot_number contains duplicated shot numbers")
    return out


def _read_signal_window(g: h5py.Group, path: Path, beam: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-shot L2A signal start/end (``rx_processing_a<n>/toploc``, ``botloc``) of the ``selected_algorithm``.

    Shots whose algorithm group is absent get NaN (dropped later as ``signal_window``); a beam without any
    ``rx_processing_a<n>`` group is an error naming the file.
    """
    sel_ds = g.get("selected_algorithm")
    n = g["shot_number"].shape[0]
    if not isinstance(sel_ds, h5py.Dataset) or sel_ds.shape != (n,):
        raise EODataError(f"{path}: {beam}/selected_algorithm missing or not one value per shot; "
                          "waveform_window='signal' needs it with rx_processing_a<n>/toploc and botloc")
    sel = sel_ds[()].astype(np.int64)
    top = np.full(n, np.nan, np.float64)
    bot = np.full(n, np.nan, np.float64)
    found = False
    for a in np.unique(sel):
        grp = g.get(f"rx_processing_a{a}")
        if not isinstance(grp, h5py.Group):
            continue
        fields = [grp.get(k) for k in ("toploc", "botloc")]
        if not all(isinstance(d, h5py.Dataset) and d.shape == (n,) for d in fields):
            raise EODataError(f"{path}: {beam}/rx_processing_a{a} needs 1-D toploc and botloc with {n} values "
                              "(one per shot) for waveform_window='signal'")
        m = sel == a
        top[m], bot[m] = fields[0][()][m], fields[1][()][m]
        found = True
    if n and not found:
        raise EODataError(f"{path}: {beam} has no rx_processing_a<n> group for its selected_algorithm values "
                          f"{sorted(set(sel.tolist()))}; waveform_window='signal' reads rx_processing_a<n>/toploc "
                          "and botloc (or use waveform_window='full')")
    invalid = (top <= INVALID + 0.5) | (bot <= INVALID + 0.5)
    top[invalid], bot[invalid] = np.nan, np.nan
    return top, bot


def _join(sn: Sequence[np.ndarray], paths: Sequence[Path], beam: str) -> list[np.ndarray] | None:
    """Indices into each product that align the shots; identity when the orders agree."""
    if all(len(s) == len(sn[0]) and np.array_equal(s, sn[0]) for s in sn[1:]):
        return None
    common = sn[0]
    for s in sn[1:]:
        common = np.intersect1d(common, s)
    idx = []
    for s in sn:
        order = np.argsort(s, kind="stable")
        idx.append(order[np.searchsorted(s, common, sorter=order)])
    dropped = {p.name: len(s) - len(common) for p, s in zip(paths, sn)}
    logger.warning("GEDI: %s shot numbers differ across products; joined on shot_number: %d common shots, "
                   "unmatched per file %s", beam, len(common), dropped)
    return idx


def extract_waveform(flat: np.ndarray, start: int, count: int) -> np.ndarray:
    """Shot waveform from the flat L1B ``rxwaveform`` with a **1-based** ``rx_sample_start_index``."""
    if start < 1:
        raise EODataError(f"rx_sample_start_index must be >= 1 (1-based), got {start}")
    return np.asarray(flat[start - 1 : start - 1 + count])


def shot_months(delta_time: np.ndarray) -> np.ndarray:
    """Calendar month (1-12, UTC) of GEDI ``delta_time`` values (seconds since 2018-01-01T00:00:00 UTC)."""
    us = np.round(np.asarray(delta_time, np.float64) * 1e6).astype("timedelta64[us]")
    when = np.datetime64("2018-01-01T00:00:00", "us") + us
    return (when.astype("datetime64[M]").astype(np.int64) % 12 + 1).astype(np.int8)


def cut_signal(raw: np.ndarray, toploc: float, botloc: float) -> np.ndarray:
    """Samples of ``raw`` between the signal start ``toploc`` and end ``botloc`` (1-based, inclusive, rounded out).

    ``raw[floor(toploc) - 1 : ceil(botloc)]`` clipped to the waveform; raises :class:`EODataError` for a
    window that is not finite, not inside the waveform or empty.
    """
    n = len(raw)
    if not (np.isfinite(toploc) and np.isfinite(botloc)) or botloc < toploc or toploc < 1 or toploc > n:
        raise EODataError(f"signal window toploc={toploc}, botloc={botloc} is not a valid 1-based window of a "
                          f"{n}-sample waveform; expected 1 <= toploc <= botloc")
    lo = max(int(np.floor(toploc)) - 1, 0)
    hi = min(int(np.ceil(botloc)), n)
    return np.asarray(raw[lo:hi])


def process_waveform(raw: np.ndarray, noise: float, length: int, mode: str = "pad") -> np.ndarray:
    """Subtract the noise mean, clip at 0, normalise to unit sum and bring to ``length`` samples.

    ``mode="pad"`` zero-pads at the end or crops to the ``length`` window holding the most
    energy (native 15-cm sampling); ``mode="resample"`` linearly interpolates the whole window
    onto ``length`` samples and renormalises. A waveform without energy above the noise is
    returned as zeros.
    """
    w = np.clip(np.asarray(raw, np.float64) - float(noise), 0.0, None)
    if mode == "resample":
        if len(w) == 0:
            return np.zeros(length, np.float32)
        if len(w) == 1:
            w = np.full(length, w[0])
        else:
            w = np.interp(np.linspace(0, len(w) - 1, length), np.arange(len(w)), w)
    elif mode == "pad":
        if len(w) > length:
            c = np.concatenate([[0.0], np.cumsum(w)])
            best = int(np.argmax(c[length:] - c[:-length]))
            w = w[best : best + length]
        elif len(w) < length:
            w = np.concatenate([w, np.zeros(length - len(w))])
    else:
        raise ValueError(f"waveform_mode must be 'pad' or 'resample', got {mode!r}")
    s = w.sum()
    return (w / s if s > 0 else w).astype(np.float32)


def _to_float(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32).copy()
    v[(v <= INVALID + 0.5) | ~np.isfinite(v)] = np.nan
    return v


class _H5Cache:
    """Per-process cache of open read-only HDF5 handles (safe with DataLoader workers)."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._files: dict[str, h5py.File] = {}

    def get(self, path: str) -> h5py.File:
        if os.getpid() != self._pid:
            self._pid, self._files = os.getpid(), {}
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = h5py.File(path, "r")
        return f

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()


# ----------------------------------------------------------------------------------- GEDIShots
class GEDIShots(NonGeoDataset):
    """GEDI shots joining L1B waveforms with L2A RH98 and L2B cover/PAI.

    Each sample: ``waveform`` float32 ``[waveform_length]`` (noise-subtracted, unit-sum),
    ``rh98``/``cover``/``pai`` float32 scalars (NaN where the product marks them invalid, -9999),
    ``target`` float32 ``[len(targets)]``, ``lat``/``lon`` float64 scalars (L2A lowest mode),
    ``location_coords`` ``(lat, lon)``, ``temporal_coords`` ``(1, 2)`` = (year, day of year),
    ``shot_number`` int64, ``beam`` and ``granule`` strings.

    Splits: ``"all"`` or ``train``/``val``/``test`` by deterministic spatial blocks of
    ``block_deg`` degrees assigned with ``seed`` in ``split_fractions`` (neighbouring shots stay
    in the same split).
    """

    def __init__(self, root: str | Path | Sequence[str | Path] = "data/demo/GEDI", split: str = "all",
                 waveform_length: int = 1420, waveform_mode: str = "pad", targets: Sequence[str] = TARGETS,
                 filter_quality: bool = True, filter_degrade: bool = True, min_sensitivity: float | None = 0.9,
                 filter_l2b_quality: bool = True, power_beams_only: bool = False, night_only: bool = False,
                 beams: Sequence[str] | None = None, split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
                 block_deg: float = 0.01, seed: int = 0, leaf_on_months: Sequence[int] | None = None,
                 waveform_window: str = "full") -> None:
        """Index the granules under ``root`` (a folder or a list of files) and apply the filters.

        Args:
            root: Folder searched recursively for GEDI granules, or a list of granule files.
            split: ``"all"``, ``"train"``, ``"val"`` or ``"test"``.
            waveform_length: Samples per returned waveform (1420 = GEDI-BDL's zero-padded length).
            waveform_mode: ``"pad"`` (native sampling, zero-pad/crop) or ``"resample"``.
            targets: Subset of ``("rh98", "cover", "pai")`` stacked into ``target``; shots with an
                invalid value in one of them are dropped.
            filter_quality: Keep L2A ``quality_flag == 1``.
            filter_degrade: Keep L2A ``degrade_flag == 0``.
            min_sensitivity: Keep L2A ``sensitivity >= min_sensitivity`` (None: no threshold).
            filter_l2b_quality: Keep L2B ``l2b_quality_flag == 1`` and ``algorithmrun_flag == 1``.
            power_beams_only: Keep the full-power beams (BEAM0101, BEAM0110, BEAM1000, BEAM1011).
            night_only: Keep shots with L2A ``solar_elevation < 0``.
            beams: Beams to read (default all eight).
            split_fractions: Train/val/test fractions of the spatial blocks.
            block_deg: Side of the spatial split blocks in degrees.
            seed: Seed of the block assignment.
            leaf_on_months: Keep shots acquired in these calendar months (UTC, from L1B ``delta_time``); DUNIA:
                :data:`LEAF_ON_MONTHS` (April-September). ``None`` (default, GEDI-BDL) keeps all.
            waveform_window: ``"full"`` (default, the whole receive window) or ``"signal"`` (DUNIA: cut between
                L2A ``rx_processing_a<n>/toploc`` and ``botloc`` before ``waveform_mode`` is applied).
        """
        if split not in ("all", "train", "val", "test"):
            raise ValueError(f"split must be 'all', 'train', 'val' or 'test', got {split!r}")
        if not isinstance(waveform_length, int) or waveform_length < 1:
            raise ValueError(f"waveform_length must be a positive integer, got {waveform_length!r}")
        if waveform_mode not in ("pad", "resample"):
            raise ValueError(f"waveform_mode must be 'pad' or 'resample', got {waveform_mode!r}")
        if waveform_window not in WAVEFORM_WINDOWS:
            raise ValueError(f"waveform_window must be 'full' or 'signal', got {waveform_window!r}")
        if leaf_on_months is not None:
            months = list(leaf_on_months)
            if not months or any(not isinstance(m, (int, np.integer)) or not 1 <= m <= 12 for m in months):
                raise ValueError(f"leaf_on_months must be None or a non-empty list of months 1-12, "
                                 f"got {leaf_on_months!r}")
            leaf_on_months = tuple(int(m) for m in months)
        bad = [t for t in targets if t not in TARGETS]
        if bad or not targets:
            raise ValueError(f"targets must be a non-empty subset of {TARGETS}, got {list(targets)!r}")
        beams = tuple(ALL_BEAMS if beams is None else beams)
        unknown = [b for b in beams if b not in ALL_BEAMS]
        if unknown:
            raise ValueError(f"unknown beam names {unknown}; expected some of {ALL_BEAMS}")
        if power_beams_only:
            beams = tuple(b for b in beams if b in POWER_BEAMS)
        self.split = split
        self.waveform_length = waveform_length
        self.waveform_mode = waveform_mode
        self.waveform_window = waveform_window
        self.leaf_on_months = leaf_on_months
        self.targets = tuple(targets)
        self.granules = find_granules(root)
        self._h5 = _H5Cache()
        cols = self._index(beams, night_only)
        keep = self._filter(cols, filter_quality, filter_degrade, min_sensitivity, filter_l2b_quality, night_only,
                            leaf_on_months)
        self.shots = {k: v[keep] for k, v in cols.items()}
        if split != "all":
            self._apply_split(split, split_fractions, block_deg, seed)
        if len(self) == 0:
            raise EODataError(f"GEDI: no shot left in split {split!r} of {root} after filtering "
                              f"(removed per filter: {self.filter_counts})")

    # -------------------------------------------------------------------------------- indexing
    def _index(self, beams: Sequence[str], night_only: bool) -> dict[str, np.ndarray]:
        l2a_fields = _L2A_FIELDS + (("solar_elevation",) if night_only else ())
        parts: list[dict[str, np.ndarray]] = []
        self.beam_names = list(ALL_BEAMS)
        for gi, gr in enumerate(self.granules):
            with _open_h5(gr.l1b, "L1B") as f1, _open_h5(gr.l2a, "L2A") as f2, _open_h5(gr.l2b, "L2B") as f3:
                present = [set(_beams_in(f, p, prod)) for f, p, prod in
                           ((f1, gr.l1b, "L1B"), (f2, gr.l2a, "L2A"), (f3, gr.l2b, "L2B"))]
                for b in beams:
                    where = [p.name for p, s in zip((gr.l1b, gr.l2a, gr.l2b), present) if b not in s]
                    if where:
                        if len(where) < 3:
                            logger.warning("GEDI: granule %s: %s missing from %s; beam skipped", gr.name, b,
                                           ", ".join(where))
                        continue
                    d1 = _read_beam(f1[b], gr.l1b, b, _L1B_FIELDS, "L1B")
                    d2 = _read_beam(f2[b], gr.l2a, b, l2a_fields, "L2A")
                    d3 = _read_beam(f3[b], gr.l2b, b, _L2B_FIELDS, "L2B")
                    start = d1["rx_sample_start_index"].astype(np.int64)
                    count = d1["rx_sample_count"].astype(np.int64)
                    n_flat = int(d1["n_waveform_samples"])
                    if len(start) and (start.min() < 1 or (start - 1 + count).max() > n_flat):
                        raise EODataError(f"{gr.l1b}: {b}/rx_sample_start_index (1-based) + rx_sample_count point "
                                          f"outside rxwaveform of {n_flat} samples")
                    idx = _join([d1["shot_number"], d2["shot_number"], d3["shot_number"]],
                                [gr.l1b, gr.l2a, gr.l2b], b)
                    i1, i2, i3 = idx if idx is not None else (slice(None),) * 3
                    n = len(d2["shot_number"][i2])
                    if self.waveform_window == "signal":
                        top, bot = _read_signal_window(f2[b], gr.l2a, b)
                        top, bot = top[i2], bot[i2]
                    else:
                        top = bot = np.full(n, np.nan)
                    parts.append(dict(
                        granule=np.full(n, gi, np.int32), beam=np.full(n, ALL_BEAMS.index(b), np.int8),
                        shot_number=d2["shot_number"][i2].astype(np.int64),
                        start=start[i1], count=count[i1],
                        noise=d1["noise_mean_corrected"][i1].astype(np.float32),
                        delta_time=d1["delta_time"][i1].astype(np.float64),
                        rh98=_to_float(d2["rh98"][i2]),
                        quality=d2["quality_flag"][i2].astype(np.int16),
                        degrade=d2["degrade_flag"][i2].astype(np.int16),
                        sensitivity=d2["sensitivity"][i2].astype(np.float32),
                        lat=d2["lat_lowestmode"][i2].astype(np.float64),
                        lon=d2["lon_lowestmode"][i2].astype(np.float64),
                        solar=(d2["solar_elevation"][i2].astype(np.float32) if night_only
                               else np.full(n, np.nan, np.float32)),
                        cover=_to_float(d3["cover"][i3]), pai=_to_float(d3["pai"][i3]),
                        l2b_quality=d3["l2b_quality_flag"][i3].astype(np.int16),
                        algorithmrun=d3["algorithmrun_flag"][i3].astype(np.int16),
                        toploc=top.astype(np.float64), botloc=bot.astype(np.float64),
                    ))
        if not parts:
            raise EODataError(f"GEDI: none of the beams {list(beams)} is present in all three products of "
                              f"{', '.join(g.name for g in self.granules)}")
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _filter(self, c: dict[str, np.ndarray], quality: bool, degrade: bool, min_sens: float | None,
                l2b: bool, night: bool, leaf_on: Sequence[int] | None = None) -> np.ndarray:
        """Apply the enabled filters in order, counting the shots each one removes."""
        keep = np.ones(len(c["shot_number"]), bool)
        counts: dict[str, int] = {"total": int(keep.size)}
        loc_ok = np.isfinite(c["lat"]) & np.isfinite(c["lon"]) & (np.abs(c["lat"]) <= 90) & (np.abs(c["lon"]) <= 180)
        has_samples = c["count"] > 0  # rx_sample_count 0: no waveform at all (counted only when it occurs)
        steps: list[tuple[str, np.ndarray | None]] = [
            ("no_waveform", has_samples if not has_samples.all() else None),
            ("quality_flag", c["quality"] == 1 if quality else None),
            ("degrade_flag", c["degrade"] == 0 if degrade else None),
            ("sensitivity", c["sensitivity"] >= min_sens if min_sens is not None else None),
            ("l2b_quality", (c["l2b_quality"] == 1) & (c["algorithmrun"] == 1) if l2b else None),
            ("night", c["solar"] < 0 if night else None),
            ("leaf_off", np.isin(shot_months(c["delta_time"]), leaf_on) if leaf_on is not None else None),
            ("signal_window", (np.isfinite(c["toploc"]) & np.isfinite(c["botloc"]) & (c["botloc"] >= c["toploc"])
                               & (c["toploc"] >= 1) & (c["toploc"] <= c["count"]))
             if self.waveform_window == "signal" else None),
            ("invalid_location", loc_ok),
            ("invalid_target", np.all([np.isfinite(c[t]) for t in self.targets], axis=0)),
        ]
        for name, ok in steps:
            if ok is None:
                continue
            counts[name] = int((keep & ~ok).sum())
            keep &= ok
        counts["kept"] = int(keep.sum())
        self.filter_counts = counts
        logger.info("GEDI: %d of %d shots kept; removed per filter: %s", counts["kept"], counts["total"],
                    {k: v for k, v in counts.items() if k not in ("total", "kept")})
        return keep

    def _apply_split(self, split: str, fractions: Sequence[float], block_deg: float, seed: int) -> None:
        if block_deg <= 0:
            raise ValueError(f"block_deg must be positive, got {block_deg}")
        bx = np.floor(self.shots["lon"] / block_deg).astype(np.int64)
        by = np.floor(self.shots["lat"] / block_deg).astype(np.int64)
        blocks, inverse = np.unique(np.stack([by, bx], 1), axis=0, return_inverse=True)
        parts = split_indices(len(blocks), fractions, seed)
        chosen = parts[("train", "val", "test").index(split)]
        keep = np.isin(inverse.ravel(), chosen)
        self.shots = {k: v[keep] for k, v in self.shots.items()}

    # ------------------------------------------------------------------------------- sampling
    def __len__(self) -> int:
        return int(len(self.shots["shot_number"]))

    def waveform(self, i: int) -> np.ndarray:
        """Processed waveform ``[waveform_length]`` (float32, unit sum) of shot ``i``."""
        s = self.shots
        gr = self.granules[int(s["granule"][i])]
        beam = ALL_BEAMS[int(s["beam"][i])]
        ds = self._h5.get(str(gr.l1b))[beam]["rxwaveform"]
        raw = extract_waveform(ds, int(s["start"][i]), int(s["count"][i]))
        if self.waveform_window == "signal":
            raw = cut_signal(raw, float(s["toploc"][i]), float(s["botloc"][i]))
        w = process_waveform(raw, float(s["noise"][i]), self.waveform_length, self.waveform_mode)
        if not w.any():
            logger.warning("GEDI: shot %d (%s %s) has no energy above noise_mean_corrected; waveform is zeros",
                           int(s["shot_number"][i]), gr.name, beam)
        return w

    def _time(self, i: int) -> tuple[float, float]:
        t = GEDI_EPOCH + dt.timedelta(seconds=float(self.shots["delta_time"][i]))
        return float(t.year), float(t.timetuple().tm_yday)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Return the processed shot ``index``."""
        s = self.shots
        year, doy = self._time(index)
        lat, lon = float(s["lat"][index]), float(s["lon"][index])
        return {
            "waveform": torch.from_numpy(self.waveform(index)),
            "rh98": torch.tensor(s["rh98"][index]),
            "cover": torch.tensor(s["cover"][index]),
            "pai": torch.tensor(s["pai"][index]),
            "target": torch.tensor([s[t][index] for t in self.targets], dtype=torch.float32),
            "lat": torch.tensor(lat, dtype=torch.float64),
            "lon": torch.tensor(lon, dtype=torch.float64),
            "location_coords": torch.tensor([lat, lon], dtype=torch.float32),
            "temporal_coords": torch.tensor([[year, doy]], dtype=torch.float32),
            "shot_number": torch.tensor(int(s["shot_number"][index]), dtype=torch.int64),
            "beam": ALL_BEAMS[int(s["beam"][index])],
            "granule": self.granules[int(s["granule"][index])].name,
        }

    def plot(self, sample: dict[str, Any], show_titles: bool = True, suptitle: str | None = None) -> Figure:
        """Plot the waveform (sample index down, like elevation) with its RH98/cover/PAI."""
        w = sample["waveform"].detach().cpu().numpy()
        fig, ax = plt.subplots(figsize=(4, 6))
        ax.plot(w, np.arange(len(w)), lw=1, label="waveform")
        pred = sample.get("prediction")
        pred = None if pred is None else np.asarray(pred.detach().cpu() if isinstance(pred, Tensor) else pred).ravel()
        if pred is not None and pred.size > 1:  # a predicted / generated waveform
            ax.plot(pred, np.arange(pred.size), lw=1, label="prediction")
            ax.legend()
        ax.invert_yaxis()
        ax.set_xlabel("normalised energy")
        ax.set_ylabel("sample (1 ns = 15 cm)")
        if show_titles:
            title = (f"{sample.get('beam', '')} RH98={float(sample['rh98']):.1f} m\n"
                     f"cover={float(sample['cover']):.2f} PAI={float(sample['pai']):.2f}")
            if pred is not None and pred.size == 1:  # a predicted scalar (e.g. RH98)
                title += f"\nprediction={float(pred[0]):.2f}"
            ax.set_title(title)
        if suptitle:
            fig.suptitle(suptitle)
        fig.tight_layout()
        return fig
