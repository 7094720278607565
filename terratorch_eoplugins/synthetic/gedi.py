"""Synthetic GEDI L1B/L2A/L2B granules and a Sentinel-2/1 composite over the synthetic world.

:func:`write_gedi` flies a few GEDI ground tracks (8 beams ~600 m apart across track, one shot
every ~60 m along track) over the same region as the PASTIS world (:func:`make_world`), simulates
each shot's received waveform from the world's forest structure, and writes the three products
of every track in the real on-disk layout (see ``../shared/reference/datasets.md`` section 4)::

    out_dir/GEDI/GEDI01_B_<YYYYDDDHHMMSS>_O<orbit>_<sub>_T<track>_02_005_01_V002.h5
    out_dir/GEDI/GEDI02_A_<...>_003_01_V002.h5
    out_dir/GEDI/GEDI02_B_<...>_003_01_V002.h5
    out_dir/GEDI/S2L2A_S1GRD_composite.tif
    out_dir/GEDI/S2L2A_20m.tif
    out_dir/GEDI/canopy_height_rh98_10m.tif

Waveform physics (per footprint, using the world pixel under the footprint centre):

* ground return: a Gaussian (transmit pulse, widened by slope and low vegetation) at the ground
  elevation, with energy ``1 - cover``;
* canopy return: energy ``cover`` spread between the ground and the canopy top following a
  crown profile (beta shape peaking at 70% of the height), convolved with the pulse;
* a noise floor (``noise_mean_corrected`` ~ 200-240 DN, Gaussian read noise) added to the
  scaled signal; coverage beams carry half the energy of full-power beams.

Leaf-off shots (acquired October-March) over deciduous (non-conifer) forest see a weaker canopy return: the
canopy energy is scaled by the forest's seasonal leaf factor ``(0.35 + 0.6 * season) / 0.95`` (the world's
deciduous green-fraction cycle, ~0.37 in January, 1 in July), so the leaf-on filter of DUNIA has shots to
remove (the tiny world's two tracks fly in January and June). L2B ``cover``/``pai`` stay the leaf-on values.
L2A ``rx_processing_a1/toploc`` and ``botloc`` (``selected_algorithm`` = 1) are the 1-based first and last
samples where the noise-free signal exceeds 3 noise standard deviations (-9999 when none does).

RH metrics come from the noise-free cumulative energy above the ground mode, so RH98 follows
the canopy height in forests and stays at ~1-2 m elsewhere; L2B ``cover`` is the world's
``canopy_cover`` and ``pai = -ln(1 - cover) / 0.5`` (Beer's law, k = 0.5). A few shots carry
``quality_flag = 0``, ``degrade_flag = 3``, low ``sensitivity``, or -9999 in L2B.

``canopy_height_rh98_10m.tif`` is the synthetic stand-in for a GEDI-derived 10 m canopy-height map
(the wall-to-wall RH98 products that DUNIA fine-tunes on, e.g. Lang et al. 2023 or Schwartz et al.
2023): one float32 band, the RH98 of the noise-free waveform that a footprint centred on each pixel
would return (same waveform model, leaf-on low vegetation), no-data -9999 over water (as such maps mask
water bodies).
It is computed through a lookup table over (canopy height, cover, ground-return width), so it is
coherent with the footprints' L2A RH98 up to their noise (energy, geolocation jitter, acquisition
date).

The composite is the per-band median of the cloud-free Sentinel-2 dates (float32 BOA
reflectance, bands B01..B12 with B8A) followed by the median Sentinel-1 VV and VH backscatter
(dB, both orbits): one 14-band float32 GeoTIFF in the world's UTM grid with band descriptions
``B01 ... B12, VV, VH``. ``S2L2A_20m.tif`` holds the six native 20 m bands (B05, B06, B07, B8A, B11, B12) of
that composite at 20 m (2 x 2 pixel means, as the sensor integrates them), same CRS and origin, for DUNIA's
cubic 20 m -> 10 m upsampling.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import h5py
import numpy as np
import rasterio
from pyproj import Transformer
from scipy.interpolate import RegularGridInterpolator

from terratorch_eoplugins.synthetic.world import (
    CROPLAND,
    FOREST,
    GRASSLAND,
    S1_BANDS,
    S2_BANDS,
    WATER,
    World,
    _rng,
    make_world,
    smooth_noise,
    to_datetime,
)

COVERAGE_BEAMS: tuple[str, ...] = ("BEAM0000", "BEAM0001", "BEAM0010", "BEAM0011")
POWER_BEAMS: tuple[str, ...] = ("BEAM0101", "BEAM0110", "BEAM1000", "BEAM1011")
#: Across-track order of the beams on the ground (coverage and power beams interleave).
BEAM_ORDER: tuple[str, ...] = ("BEAM0000", "BEAM0101", "BEAM0001", "BEAM0110",
                               "BEAM0010", "BEAM1000", "BEAM0011", "BEAM1011")
COMPOSITE_NAME = "S2L2A_S1GRD_composite.tif"
COMPOSITE_20M_NAME = "S2L2A_20m.tif"
#: Sentinel-2 bands with a native 20 m resolution.
S2_20M_BANDS: tuple[str, ...] = ("B05", "B06", "B07", "B8A", "B11", "B12")
CANOPY_HEIGHT_NAME = "canopy_height_rh98_10m.tif"
GEDI_EPOCH = dt.datetime(2018, 1, 1)
NOISE_SD = 2.5          # read-noise standard deviation of rxwaveform (DN)
BIN_M = 0.15            # range of one 1-ns waveform sample (metres)
PULSE_SIGMA_M = 0.75    # transmit pulse standard deviation (metres)
BEAM_SPACING_M = 600.0
SHOT_SPACING_M = 60.0
GROUND_SPEED_MS = 7000.0
INVALID = -9999.0


def _ground_elevation(world: World) -> np.ndarray:
    """A smooth terrain (metres) with hills of ~30 m relief, seeded like the world."""
    field = smooth_noise(world.shape, max(world.shape) / 4.0, _rng(world.spec.seed, "gedi", "dem"))
    return (220.0 + 25.0 * field).astype(np.float32)


def _gauss(z: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    g = np.exp(-0.5 * ((z - mu) / sigma) ** 2)
    s = g.sum()
    return g / s if s > 0 else g


def simulate_waveform(z: np.ndarray, ground: float, height: float, cover: float, sigma_ground: float) -> np.ndarray:
    """Noise-free received waveform (unit total energy) sampled at elevations ``z`` (top to bottom).

    Ground return ``(1 - cover) * N(ground, sigma_ground)`` plus a canopy return of energy
    ``cover`` distributed between the ground and ``ground + height``.
    """
    wf = (1.0 - cover) * _gauss(z, ground, sigma_ground)
    if height > 0.5 and cover > 0:
        u = (z - ground) / height
        inside = (u > 0) & (u < 1)
        dens = np.where(inside, np.clip(u, 0, 1) ** 3 * np.clip(1 - u, 0, 1) ** 1.3, 0.0)
        if dens.sum() > 0:
            dens = dens / dens.sum()
            half = int(np.ceil(4 * PULSE_SIGMA_M / BIN_M))
            k = np.exp(-0.5 * (np.arange(-half, half + 1) * BIN_M / PULSE_SIGMA_M) ** 2)
            canopy = np.convolve(dens, k / k.sum(), mode="same")
            wf = wf + cover * canopy / canopy.sum()
    return wf / wf.sum()


def rh_metrics(z: np.ndarray, wf: np.ndarray, ground: float) -> np.ndarray:
    """RH0..RH100 (metres above ``ground``): height where the energy accumulated from the bottom reaches p%."""
    zb = z[::-1]
    cum = np.cumsum(wf[::-1])
    cum = cum / cum[-1]
    # np.interp needs strictly increasing xp: keep the first sample of each plateau.
    keep = np.concatenate([[True], np.diff(cum) > 0])
    return (np.interp(np.arange(101) / 100.0, cum[keep], zb[keep]) - ground).astype(np.float32)


def _rh98_lookup() -> RegularGridInterpolator:
    """RH98 (m) of :func:`simulate_waveform` on a (height, cover, ground-return sigma) grid, linearly interpolated."""
    heights = np.arange(0.0, 40.01, 0.5)
    covers = np.linspace(0.0, 0.99, 23)
    sigmas = np.linspace(PULSE_SIGMA_M, 3.0, 10)
    table = np.zeros((len(heights), len(covers), len(sigmas)), np.float32)
    for i, h in enumerate(heights):
        z = h + 30.0 - BIN_M * np.arange(int((h + 50.0) / BIN_M) + 1)  # ground at 0, 30 m above, 20 m below
        for j, c in enumerate(covers):
            for k, sg in enumerate(sigmas):
                table[i, j, k] = rh_metrics(z, simulate_waveform(z, 0.0, h, c, sg), 0.0)[98]
    return RegularGridInterpolator((heights, covers, sigmas), table)


def _ground_sigma(world: World, dem: np.ndarray, green: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Width (m) of the ground return: transmit pulse widened by slope and by low vegetation."""
    gy, gx = np.gradient(dem, world.spec.resolution)
    slope = np.hypot(gy, gx)[rows, cols]
    lc = world.landcover[rows, cols]
    low_veg = np.where((lc == CROPLAND) | (lc == GRASSLAND), 0.8 * green[rows, cols], 0.0)
    return np.sqrt(PULSE_SIGMA_M**2 + (12.5 * slope) ** 2 + (low_veg / 2) ** 2)


def write_canopy_height(world: World, path: str | Path, dem: np.ndarray | None = None,
                        when: dt.datetime | None = None) -> Path:
    """Write the dense 10 m RH98 map of ``world`` (float32 GeoTIFF, no-data -9999) to ``path``.

    Every pixel gets the RH98 of the noise-free waveform of a footprint centred on it (see the
    module docstring); ``when`` sets the low-vegetation state (default: mid-July of the world's
    last season, leaf-on). Water pixels get the no-data value -9999.
    """
    path = Path(path)
    dem = _ground_elevation(world) if dem is None else dem
    when = when or dt.datetime(to_datetime(world.spec.end).year, 7, 15)
    green = world.green_fraction(when)
    h, w = world.shape
    rows, cols = np.indices((h, w)).reshape(2, -1)
    pts = np.stack([np.clip(world.canopy_height[rows, cols], 0, 40), np.clip(world.canopy_cover[rows, cols], 0, 0.99),
                    np.clip(_ground_sigma(world, dem, green, rows, cols), PULSE_SIGMA_M, 3.0)], 1)
    rh98 = _rh98_lookup()(pts).reshape(h, w).astype(np.float32)
    rh98[world.landcover == WATER] = INVALID
    profile = dict(driver="GTiff", width=w, height=h, count=1, dtype="float32", crs=world.crs,
                   transform=world.transform, nodata=INVALID, compress="deflate", predictor=3)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(rh98, 1)
        dst.set_band_description(1, "RH98")
        dst.update_tags(UNITS="m", PRODUCT="GEDI-derived canopy height (RH98) at 10 m, synthetic",
                        DATE=when.date().isoformat())
    return path


def _track_layout(world: World, n_tracks: int, seed: int) -> list[dict]:
    """Ground tracks: alternating ascending (NE) and descending (SE) passes over the region."""
    rng = _rng(seed, "gedi", "tracks")
    left, bottom, right, top = world.bounds
    cx, cy = (left + right) / 2, (bottom + top) / 2
    start, end = to_datetime(world.spec.start), to_datetime(world.spec.end)
    span = (end - start).days
    tracks = []
    # At ~44 deg N a 51.6 deg-inclination orbit crosses at ~59 deg from north.
    for k in range(n_tracks):
        az = np.deg2rad(59.4 if k % 2 == 0 else 120.6)
        d = np.array([np.sin(az), np.cos(az)])     # along-track unit vector (x east, y north)
        n = np.array([d[1], -d[0]])                 # across-track unit vector
        width = min(right - left, top - bottom)
        offset = (rng.uniform(-0.35, 0.35)) * width
        day = int(span * (k + 1) / (n_tracks + 1))
        when = start + dt.timedelta(days=day, hours=float(rng.uniform(0, 24)))
        night = k % 2 == 1
        tracks.append(dict(
            centre=np.array([cx, cy]) + offset * n, d=d, n=n, when=when.replace(microsecond=0),
            orbit=2000 + 131 * k + int(rng.integers(0, 100)), sub=int(rng.integers(1, 5)),
            track=int(rng.integers(100, 4000)),
            solar=float(rng.uniform(-35, -8) if night else rng.uniform(25, 60)),
            degraded=k == 1,
        ))
    return tracks


def _simulate_beam(world: World, dem: np.ndarray, green: np.ndarray, tr: dict, beam: str, seed: int,
                   to_lonlat: Transformer) -> dict[str, np.ndarray]:
    """Every shot of one beam of one track: locations, waveforms, L2A and L2B variables."""
    rng = _rng(seed, "gedi", "beam", tr["orbit"], beam)
    left, bottom, right, top = world.bounds
    res = world.spec.resolution
    bi = BEAM_ORDER.index(beam)
    power = beam in POWER_BEAMS
    diag = float(np.hypot(right - left, top - bottom))
    s = np.arange(-diag / 2 - 600, diag / 2 + 600, SHOT_SPACING_M) + rng.uniform(0, SHOT_SPACING_M)
    xy = tr["centre"][None] + s[:, None] * tr["d"][None] + (bi - 3.5) * BEAM_SPACING_M * tr["n"][None]
    xy = xy + rng.normal(0, 3.0, xy.shape)  # geolocation jitter
    margin = 300.0
    keep = ((xy[:, 0] > left - margin) & (xy[:, 0] < right + margin)
            & (xy[:, 1] > bottom - margin) & (xy[:, 1] < top + margin))
    xy, s = xy[keep], s[keep]
    n = len(s)
    h, w = world.shape
    rows = np.clip(np.floor((top - xy[:, 1]) / res).astype(int), 0, h - 1)
    cols = np.clip(np.floor((xy[:, 0] - left) / res).astype(int), 0, w - 1)
    height = world.canopy_height[rows, cols].astype(np.float64)
    cover = world.canopy_cover[rows, cols].astype(np.float64)
    ground = dem[rows, cols].astype(np.float64)
    sigma_g = _ground_sigma(world, dem, green, rows, cols)
    doy = float(tr["when"].timetuple().tm_yday)
    season = 0.5 + 0.5 * np.cos(2 * np.pi * (doy - 200) / 365.0)  # as World.green_fraction: 1 in July
    deciduous = (world.landcover[rows, cols] == FOREST) & ~world._conifer[rows, cols]
    wave_cover = np.where(deciduous, cover * min(1.0, (0.35 + 0.6 * season) / 0.95), cover)

    energy = (6000.0 if power else 3000.0) * np.exp(rng.normal(0, 0.2, n))
    weak = rng.random(n) < 0.03
    energy[weak] *= 0.05
    noise_mean = rng.uniform(200, 240) + 3.0 * np.sin(s / 900.0) + rng.normal(0, 0.5, n)

    starts = np.zeros(n, np.uint64)
    counts = np.zeros(n, np.uint16)
    chunks, rh = [], np.zeros((n, 101), np.float32)
    bin0 = np.zeros(n)
    lastbin = np.zeros(n)
    rx_energy = np.zeros(n, np.float32)
    toploc = np.full(n, INVALID, np.float32)
    botloc = np.full(n, INVALID, np.float32)
    pos = 1  # rx_sample_start_index is 1-based
    for i in range(n):
        z_top = ground[i] + height[i] + rng.uniform(30, 60)
        z_bot = ground[i] - rng.uniform(20, 40)
        cnt = int((z_top - z_bot) / BIN_M) + 1
        z = z_top - BIN_M * np.arange(cnt)
        wf = simulate_waveform(z, ground[i], height[i], wave_cover[i], sigma_g[i])
        rh[i] = rh_metrics(z, wf, ground[i])
        signal = energy[i] * wf
        above = np.nonzero(signal > 3 * NOISE_SD)[0]
        if len(above):
            toploc[i], botloc[i] = above[0] + 1, above[-1] + 1
        raw = noise_mean[i] + signal + rng.normal(0, NOISE_SD, cnt)
        chunks.append(raw.astype(np.float32))
        starts[i], counts[i] = pos, cnt
        pos += cnt
        bin0[i], lastbin[i] = z[0], z[-1]
        rx_energy[i] = signal.sum()

    lon, lat = to_lonlat.transform(xy[:, 0], xy[:, 1])
    base = rng.uniform(0.955, 0.985) if power else rng.uniform(0.90, 0.95)
    sens = np.clip(base + rng.normal(0, 0.015, n), 0, 0.999)
    sens[weak] = rng.uniform(0.5, 0.85, weak.sum())
    quality = (~weak & (rng.random(n) > 0.03)).astype(np.uint8)
    degrade = np.zeros(n, np.uint8)
    if tr["degraded"]:
        frac = (s - s.min()) / max(np.ptp(s), 1.0) if n else s
        degrade[(frac > 0.45) & (frac < 0.52)] = 3
    l2b_ok = quality.astype(bool) & (rng.random(n) > 0.03)
    cov = np.where(l2b_ok, np.clip(cover, 0, 0.99), INVALID).astype(np.float32)
    pai = np.where(l2b_ok, -np.log(1 - np.clip(cover, 0, 0.99)) / 0.5, INVALID).astype(np.float32)
    t0 = (tr["when"] - GEDI_EPOCH).total_seconds()
    base = tr["orbit"] * 10**13 + (bi + 1) * 10**11 + tr["sub"] * 10**9
    return dict(
        shot_number=(np.uint64(base) + np.arange(n, dtype=np.uint64) + np.uint64(1000)),
        delta_time=t0 + (s - s.min() if n else s) / GROUND_SPEED_MS,
        lat=np.asarray(lat, np.float64), lon=np.asarray(lon, np.float64), ground=ground,
        rxwaveform=np.concatenate(chunks) if chunks else np.zeros(0, np.float32),
        starts=starts, counts=counts, noise=(noise_mean + rng.normal(0, 0.2, n)).astype(np.float32),
        rx_energy=rx_energy, bin0=bin0, lastbin=lastbin, rh=rh, quality=quality, degrade=degrade,
        sensitivity=sens.astype(np.float32), solar=(tr["solar"] + 0.001 * (s - s.mean())).astype(np.float32),
        cover=cov, pai=pai, l2b_quality=l2b_ok.astype(np.uint8), algorithmrun=l2b_ok.astype(np.uint8),
        rows=rows, cols=cols, toploc=toploc, botloc=botloc,
    )


def _metadata(f: h5py.File, short_name: str, file_name: str) -> None:
    g = f.create_group("METADATA/DatasetIdentification")
    g.attrs["shortName"] = short_name
    g.attrs["fileName"] = file_name
    g.attrs["VersionID"] = "002"
    g.attrs["abstract"] = "Synthetic granule written by terratorch_eoplugins.synthetic.gedi (not real GEDI data)."


def _write_granule(out: Path, tr: dict, beams: dict[str, dict[str, np.ndarray]]) -> list[Path]:
    stamp = tr["when"].strftime("%Y%j%H%M%S")
    stem = f"{stamp}_O{tr['orbit']:05d}_{tr['sub']:02d}_T{tr['track']:05d}_02"
    names = {"L1B": f"GEDI01_B_{stem}_005_01_V002.h5", "L2A": f"GEDI02_A_{stem}_003_01_V002.h5",
             "L2B": f"GEDI02_B_{stem}_003_01_V002.h5"}
    paths = {k: out / v for k, v in names.items()}
    desc = {b: ("Coverage beam" if b in COVERAGE_BEAMS else "Full power beam") for b in beams}
    with h5py.File(paths["L1B"], "w") as f:
        _metadata(f, "GEDI_L1B", names["L1B"])
        for b, d in beams.items():
            g = f.create_group(b)
            g.attrs["description"] = desc[b]
            g["shot_number"] = d["shot_number"]
            g["delta_time"] = d["delta_time"]
            g["stale_return_flag"] = np.zeros(len(d["shot_number"]), np.uint8)
            g["noise_mean_corrected"] = d["noise"]
            g["rx_energy"] = d["rx_energy"]
            g["rxwaveform"] = d["rxwaveform"]
            g["rx_sample_count"] = d["counts"]
            g["rx_sample_start_index"] = d["starts"]
            g["geolocation/latitude_bin0"] = d["lat"]
            g["geolocation/latitude_lastbin"] = d["lat"] + 2e-6
            g["geolocation/longitude_bin0"] = d["lon"]
            g["geolocation/longitude_lastbin"] = d["lon"] + 2e-6
            g["geolocation/elevation_bin0"] = d["bin0"]
            g["geolocation/elevation_lastbin"] = d["lastbin"]
            g["geolocation/degrade"] = d["degrade"]
            g["geolocation/solar_elevation"] = d["solar"]
    with h5py.File(paths["L2A"], "w") as f:
        _metadata(f, "GEDI_L2A", names["L2A"])
        for b, d in beams.items():
            g = f.create_group(b)
            g.attrs["description"] = desc[b]
            g["shot_number"] = d["shot_number"]
            g["delta_time"] = d["delta_time"]
            g["rh"] = d["rh"]
            g["quality_flag"] = d["quality"]
            g["degrade_flag"] = d["degrade"]
            g["sensitivity"] = d["sensitivity"]
            g["lat_lowestmode"] = d["lat"]
            g["lon_lowestmode"] = d["lon"]
            g["elev_lowestmode"] = d["ground"].astype(np.float32)
            g["solar_elevation"] = d["solar"]
            g["selected_algorithm"] = np.ones(len(d["shot_number"]), np.uint8)
            g["rx_processing_a1/toploc"] = d["toploc"]
            g["rx_processing_a1/botloc"] = d["botloc"]
    with h5py.File(paths["L2B"], "w") as f:
        _metadata(f, "GEDI_L2B", names["L2B"])
        for b, d in beams.items():
            g = f.create_group(b)
            g.attrs["description"] = desc[b]
            g["shot_number"] = d["shot_number"]
            g["cover"] = d["cover"]
            g["pai"] = d["pai"]
            g["l2b_quality_flag"] = d["l2b_quality"]
            g["algorithmrun_flag"] = d["algorithmrun"]
            g["sensitivity"] = d["sensitivity"]
            g["rh100"] = np.round(d["rh"][:, 100] * 100).astype(np.int16)
            g["geolocation/lat_lowestmode"] = d["lat"]
            g["geolocation/lon_lowestmode"] = d["lon"]
            g["geolocation/degrade_flag"] = d["degrade"]
            g["geolocation/delta_time"] = d["delta_time"]
            g["geolocation/elev_lowestmode"] = d["ground"].astype(np.float32)
    return list(paths.values())


def write_composite(world: World, path: str | Path, block_rows: int = 128) -> Path:
    """Write the 14-band float32 S2 (median cloud-free reflectance) + S1 (median dB) composite of ``world``."""
    path = Path(path)
    h, w = world.shape
    clear = [i for i in range(len(world.s2_dates)) if not world.cloudy_dates[i]] or list(range(len(world.s2_dates)))
    s1 = [(o, i) for o in ("asc", "desc") for i in range(len(world.s1_dates(o)))]
    profile = dict(driver="GTiff", width=w, height=h, count=len(S2_BANDS) + len(S1_BANDS), dtype="float32",
                   crs=world.crs, transform=world.transform, tiled=True, blockxsize=128, blockysize=128,
                   compress="deflate", predictor=3)
    if w % 16 or h % 16:
        profile.update(tiled=False, blockxsize=None, blockysize=None)
        profile = {k: v for k, v in profile.items() if v is not None}
    start = min(world.s2_dates[0], *(world.s1_dates(o)[0] for o in ("asc", "desc")))
    end = max(world.s2_dates[-1], *(world.s1_dates(o)[-1] for o in ("asc", "desc")))
    with rasterio.open(path, "w", **profile) as dst:
        for y in range(0, h, block_rows):
            win = (slice(y, min(y + block_rows, h)), slice(0, w))
            s2 = np.median(np.stack([world.s2_reflectance(i, win) for i in clear]), axis=0)
            s1m = np.median(np.stack([world.s1_backscatter(i, o, win) for o, i in s1]), axis=0)
            block = np.concatenate([s2, s1m]).astype(np.float32)
            dst.write(block, window=rasterio.windows.Window(0, y, w, block.shape[1]))
        for i, name in enumerate(S2_BANDS + S1_BANDS, start=1):
            dst.set_band_description(i, name)
        dst.update_tags(S2_UNITS="BOA reflectance", S1_UNITS="dB", S2_COMPOSITE="median of cloud-free dates",
                        S1_COMPOSITE="median of ascending and descending dates",
                        DATE_START=start.date().isoformat(), DATE_END=end.date().isoformat())
    return path


def write_composite_20m(composite: str | Path, path: str | Path) -> Path:
    """Write the 20 m S2 bands (:data:`S2_20M_BANDS`, 2 x 2 means of ``composite``'s 10 m pixels) to ``path``.

    Same CRS and origin as the composite, pixel size doubled; an odd last row/column is averaged over the
    pixels it holds.
    """
    path = Path(path)
    with rasterio.open(composite) as src:
        idx = [list(src.descriptions).index(b) + 1 for b in S2_20M_BANDS]
        x = src.read(idx).astype(np.float64)
        crs, t = src.crs, src.transform
    c, h, w = x.shape
    h2, w2 = -(-h // 2), -(-w // 2)
    pad = np.full((c, 2 * h2, 2 * w2), np.nan)
    pad[:, :h, :w] = x
    out = np.nanmean(pad.reshape(c, h2, 2, w2, 2), axis=(2, 4)).astype(np.float32)
    profile = dict(driver="GTiff", width=w2, height=h2, count=c, dtype="float32", crs=crs,
                   transform=rasterio.Affine(2 * t.a, t.b, t.c, t.d, 2 * t.e, t.f), compress="deflate", predictor=3)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(out)
        for i, name in enumerate(S2_20M_BANDS, start=1):
            dst.set_band_description(i, name)
        dst.update_tags(S2_UNITS="BOA reflectance", RESOLUTION="20 m (native S2 20 m bands, 2x2 means)")
    return path


def write_gedi(out_dir: str | Path, size: str = "tiny", seed: int = 0, world: World | None = None,
               n_tracks: int | None = None) -> Path:
    """Write synthetic GEDI granules and the S2/S1 composite under ``out_dir/GEDI``; return that folder.

    Args:
        out_dir: Parent folder (``GEDI/`` is created inside).
        size: World preset (``tiny``: a few seconds, ~1.5k shots; ``demo``: ~8k shots) when ``world`` is None.
        seed: Seed of the world (when built here) and of the GEDI simulation (tracks, noise, flags).
        world: An existing :class:`World` (e.g. shared with the PASTIS writer); overrides ``size``.
        n_tracks: Number of ground tracks (one granule each); default grows with the region's area.
    """
    world = world if world is not None else make_world(size, seed)
    out = Path(out_dir) / "GEDI"
    out.mkdir(parents=True, exist_ok=True)
    left, bottom, right, top = world.bounds
    if n_tracks is None:
        area_km2 = (right - left) * (top - bottom) / 1e6
        n_tracks = int(np.clip(round(np.sqrt(area_km2)), 2, 6))
    dem = _ground_elevation(world)
    to_lonlat = Transformer.from_crs(world.crs, "EPSG:4326", always_xy=True)
    for tr in _track_layout(world, n_tracks, seed):
        green = world.green_fraction(tr["when"])
        beams = {b: _simulate_beam(world, dem, green, tr, b, seed, to_lonlat) for b in COVERAGE_BEAMS + POWER_BEAMS}
        _write_granule(out, tr, beams)
    write_composite(world, out / COMPOSITE_NAME)
    write_composite_20m(out / COMPOSITE_NAME, out / COMPOSITE_20M_NAME)
    write_canopy_height(world, out / CANOPY_HEIGHT_NAME, dem)
    return out
