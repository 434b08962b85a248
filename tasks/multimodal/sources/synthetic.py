"""An embedded, offline source of physically plausible synthetic tiles.

:class:`SyntheticSource` mimics what the Earth Engine export of the original
MMEarth pipeline produced for one tile (the original's per-tile choices are
listed in the README's "Against real Earth Engine" section), without any network access:

* a Sentinel-2 date drawn like the original (random year 2017-2020 with the
  2018/2019 windows) and a random product (L2A or L1C);
* ASTER-like elevation from smooth random relief around a biome-dependent
  base level, and the slope computed from it (``np.gradient`` at the pixel
  size, degrees) so the two are exactly consistent;
* a patchy land-cover field (biome mixture + elevation + smooth noise) from
  which ESA WorldCover, Dynamic World (label + 1, i.e. 1..9, as the original's stacks), Sentinel-2 spectra,
  the L2A scene classification, Sentinel-1 backscatter and canopy height are
  all derived, so every modality agrees with every other;
* ERA5-Land-like monthly aggregates following latitude, season, hemisphere,
  elevation (lapse rate) and biome.

Everything is a deterministic function of ``(seed, tile_id)`` and the tile's
attributes: the random generators are seeded from a SHA-256 hash (never
Python's salted ``hash()``), so runs, processes and machines agree. Smooth
random fields are Gaussian-bump bases applied separably (``W @ C @ W.T``),
which keeps a 130 x 130 tile to a few milliseconds.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.multimodal import schema
from tasks.multimodal.sources.base import Grid, NoDataError, Source, Tile, TileStack

__all__ = [
    "SyntheticSource",
    "WORLDCOVER_TO_DYNAMIC_WORLD",
    "WORLDCOVER_TO_SCL",
    "NO_S2_REASON",
    "s2_date_window",
    "slope_degrees",
]

#: Reason of the permanent no-data outcome (the Earth Engine source uses the same).
NO_S2_REASON = "no Sentinel-2 image with CLOUDY_PIXEL_PERCENTAGE < 10 contains the tile"

#: Fraction of tiles whose Sentinel-2 image has a no-data strip (image edge).
S2_EDGE_RATE = 0.05

# --------------------------------------------------------------------------
# Land-cover classes and their appearance in every modality
# --------------------------------------------------------------------------
_WC = schema.WORLDCOVER_CLASSES  # (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
_WC_POS = {code: i for i, code in enumerate(_WC)}

#: ESA WorldCover code -> Dynamic World label (raw 0..8, before the h5's +1).
WORLDCOVER_TO_DYNAMIC_WORLD: dict[int, int] = {
    10: 1,  # tree cover -> trees
    20: 5,  # shrubland -> shrub_and_scrub
    30: 2,  # grassland -> grass
    40: 4,  # cropland -> crops
    50: 6,  # built-up -> built
    60: 7,  # bare / sparse vegetation -> bare
    70: 8,  # snow and ice -> snow_and_ice
    80: 0,  # permanent water -> water
    90: 3,  # herbaceous wetland -> flooded_vegetation
    95: 1,  # mangroves -> trees
    100: 2,  # moss and lichen -> grass
}

#: ESA WorldCover code -> Sentinel-2 L2A scene classification (clear sky).
WORLDCOVER_TO_SCL: dict[int, int] = {
    10: 4, 20: 4, 30: 4, 40: 4, 50: 5, 60: 5, 70: 11, 80: 6, 90: 4, 95: 4, 100: 4,
}

_DW_LUT = np.array([WORLDCOVER_TO_DYNAMIC_WORLD[c] for c in _WC], dtype=np.float32)
_SCL_LUT = np.array([WORLDCOVER_TO_SCL[c] for c in _WC], dtype=np.float32)
_WC_LUT = np.array(_WC, dtype=np.float32)

#: Typical surface reflectance (x 10000) per WorldCover class for the bands
#: B1 B2 B3 B4 B5 B6 B7 B8A B8 B9 B11 B12 (B10 is handled separately).
_S2_SURFACE_BANDS: tuple[str, ...] = (
    "B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8A", "B8", "B9", "B11", "B12",
)
_SPECTRA = np.array(
    [
        # B1   B2    B3    B4    B5    B6    B7    B8A   B8    B9    B11   B12
        [250, 300, 550, 350, 900, 2300, 2800, 3000, 2900, 3000, 1500, 700],  # 10 trees
        [500, 600, 850, 950, 1350, 1900, 2200, 2400, 2300, 2400, 2600, 1700],  # 20 shrub
        [400, 500, 800, 700, 1200, 2400, 2900, 3100, 3000, 3100, 2400, 1400],  # 30 grass
        [400, 500, 850, 650, 1300, 2800, 3400, 3600, 3500, 3600, 2300, 1300],  # 40 crops
        [900, 1000, 1150, 1250, 1350, 1500, 1600, 1700, 1650, 1700, 2000, 1800],  # 50 built
        [1200, 1400, 1800, 2200, 2500, 2700, 2800, 2900, 2850, 2900, 3500, 3000],  # 60 bare
        [8500, 8800, 8900, 8800, 8700, 8500, 8300, 8000, 8100, 7500, 1200, 900],  # 70 snow
        [600, 500, 450, 250, 200, 150, 130, 110, 120, 100, 60, 40],  # 80 water
        [400, 450, 650, 500, 900, 1700, 2000, 2200, 2100, 2100, 1400, 700],  # 90 wetland
        [250, 300, 500, 300, 800, 2000, 2500, 2700, 2600, 2600, 1200, 500],  # 95 mangroves
        [500, 600, 800, 900, 1200, 1700, 1900, 2000, 1950, 2000, 2100, 1500],  # 100 moss
    ],
    dtype=np.float32,
)
_SNOW_SPECTRUM = _SPECTRA[_WC_POS[70]]
_CLOUD_SPECTRUM = np.array(
    [5200, 5400, 5500, 5600, 5600, 5700, 5700, 5700, 5700, 4000, 3500, 2500], dtype=np.float32
)
#: Top-of-atmosphere minus surface reflectance (L1C): path radiance, strongest
#: in the blue; B9 sits in a water-vapour absorption band (multiplied instead).
_L1C_OFFSET = np.array([900, 600, 350, 200, 150, 120, 100, 80, 90, 0, 20, 10], dtype=np.float32)
_L1C_B9_FACTOR = 0.35

#: Sentinel-1 co-polarised backscatter (dB) per class, and cross-pol minus co-pol.
_S1_CO = np.array([-7.5, -10.0, -11.5, -10.5, -4.0, -14.0, -13.0, -21.5, -9.0, -7.0, -13.0], dtype=np.float32)
_S1_CROSS_DIFF = np.array([-6.5, -7.0, -7.5, -7.0, -8.0, -8.0, -7.0, -8.0, -6.5, -6.0, -7.5], dtype=np.float32)

#: Elevation preference of each class in the land-cover score (per std of relief).
_ELEV_BETA = np.array([-0.2, 0.0, 0.0, -0.3, -0.3, 0.3, 1.5, -1.0, -0.8, -0.6, 0.2])


@dataclass(frozen=True)
class _Biome:
    """Per-biome parameters of the generator."""

    elevation: tuple[float, float]  # range of the tile's base elevation (m)
    relief: float  # typical std of the relief (m)
    cover: dict[int, float]  # WorldCover class -> share
    precip: tuple[float, float]  # range of the mean monthly precipitation (m)
    precip_season: float  # amplitude of the precipitation seasonality (0..1)
    wet_in_winter: bool  # precipitation peak in winter (Mediterranean) instead of summer
    canopy: float  # maximum canopy height (m)
    desert: bool = False


_BIOMES: dict[str, _Biome] = {
    "Tundra": _Biome((20, 800), 40, {30: .3, 100: .25, 20: .12, 60: .1, 70: .08, 80: .1, 90: .05},
                     (0.01, 0.05), 0.4, False, 6),
    "Tropical & Subtropical Moist Broadleaf Forests": _Biome(
        (20, 900), 70, {10: .8, 40: .06, 30: .05, 80: .04, 50: .03, 90: .02}, (0.15, 0.4), 0.3, False, 45),
    "Mediterranean Forests, Woodlands & Scrub": _Biome(
        (30, 900), 80, {10: .3, 20: .3, 30: .15, 40: .15, 60: .05, 50: .05}, (0.02, 0.08), 0.85, True, 25),
    "Deserts & Xeric Shrublands": _Biome(
        (100, 1200), 40, {60: .65, 20: .25, 30: .06, 50: .02, 40: .02}, (0.001, 0.01), 0.5, False, 8,
        desert=True),
    "Temperate Grasslands, Savannas & Shrublands": _Biome(
        (100, 1200), 30, {30: .5, 40: .3, 20: .1, 10: .05, 50: .03, 80: .02}, (0.02, 0.08), 0.5, False, 20),
    "Boreal Forests/Taiga": _Biome(
        (50, 700), 40, {10: .65, 90: .1, 80: .1, 30: .08, 100: .05, 20: .02}, (0.03, 0.08), 0.4, False, 25),
    "Temperate Conifer Forests": _Biome(
        (200, 2000), 150, {10: .7, 30: .1, 20: .1, 60: .05, 50: .03, 80: .02}, (0.04, 0.15), 0.4, True, 40),
    "Temperate Broadleaf & Mixed Forests": _Biome(
        (50, 800), 60, {10: .45, 40: .3, 30: .15, 50: .06, 80: .04}, (0.04, 0.12), 0.2, False, 35),
    "Montane Grasslands & Shrublands": _Biome(
        (2500, 4500), 200, {30: .45, 20: .2, 60: .2, 70: .1, 100: .05}, (0.02, 0.12), 0.6, False, 10),
    "Mangroves": _Biome((0, 8), 1.5, {95: .55, 80: .3, 90: .1, 10: .05}, (0.1, 0.3), 0.5, False, 25),
    "Flooded Grasslands & Savannas": _Biome(
        (0, 200), 2.5, {90: .45, 30: .3, 80: .2, 40: .05}, (0.05, 0.2), 0.8, False, 15),
    "Tropical & Subtropical Grasslands, Savannas & Shrublands": _Biome(
        (100, 1500), 50, {30: .4, 20: .3, 10: .15, 40: .1, 60: .05}, (0.03, 0.15), 0.9, False, 20),
    "Tropical & Subtropical Dry Broadleaf Forests": _Biome(
        (50, 1000), 60, {10: .5, 20: .25, 40: .15, 30: .1}, (0.03, 0.12), 0.85, False, 25),
    "Tropical & Subtropical Coniferous Forests": _Biome(
        (500, 2500), 150, {10: .7, 30: .15, 20: .1, 40: .05}, (0.05, 0.2), 0.7, False, 35),
}
assert set(_BIOMES) == set(schema.BIOMES), "every MMEarth biome needs generator parameters"


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def _rng(seed: int, tile_id: str, part: str) -> np.random.Generator:
    """A generator that depends only on (seed, tile_id, part), stable across processes."""
    digest = hashlib.sha256(f"synthetic|{seed}|{tile_id}|{part}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


@functools.lru_cache(maxsize=32)
def _basis(n: int, scale: float) -> np.ndarray:
    """(n, c) Gaussian-bump basis with knots every ``scale`` pixels (covering the edges)."""
    c = int(math.ceil((n - 1) / scale)) + 3
    knots = (np.arange(c) - 1.0) * scale
    x = np.arange(n, dtype=np.float64)
    w = np.exp(-0.5 * ((x[:, None] - knots[None, :]) / (0.7 * scale)) ** 2)
    w.setflags(write=False)
    return w


def _smooth(rng: np.random.Generator, n: int, scale: float, k: int = 1) -> np.ndarray:
    """``k`` smooth random fields (k, n, n), each with zero mean and unit std.

    Correlation length is about ``scale`` pixels: random weights on a coarse
    grid of Gaussian bumps, evaluated separably as ``W @ C @ W.T``.
    """
    w = _basis(n, float(scale))
    coeff = rng.standard_normal((k, w.shape[1], w.shape[1]))
    f = w @ coeff @ w.T
    f -= f.mean(axis=(1, 2), keepdims=True)
    f /= f.std(axis=(1, 2), keepdims=True) + 1e-12
    return f


def slope_degrees(elevation: np.ndarray, res_x: float, res_y: float) -> np.ndarray:
    """Slope (degrees) of an elevation grid (m) with pixel sizes res_x, res_y (m)."""
    dz_dy, dz_dx = np.gradient(np.asarray(elevation, dtype=np.float64), res_y, res_x)
    return np.degrees(np.arctan(np.hypot(dz_dx, dz_dy)))


def s2_date_window(year: int) -> tuple[_dt.date, _dt.date]:
    """The original's Sentinel-2 date window of a sampled year (inclusive)."""
    if year == 2018:
        return _dt.date(2018, 1, 1), _dt.date(2018, 11, 30)
    if year == 2019:
        return _dt.date(2018, 12, 1), _dt.date(2019, 12, 31)
    return _dt.date(year, 1, 1), _dt.date(year, 12, 31)


def _monthly_climate(
    rng: np.random.Generator, lat: float, months: np.ndarray, mean_elevation: float, biome: _Biome
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Monthly (mean, min, max temperature in K, precipitation in m) for calendar months 1..12."""
    alat = abs(lat)
    north = 1.0 if lat >= 0 else -1.0
    annual = 301.0 - 0.0075 * alat**2 - 0.0065 * mean_elevation + rng.normal(0.0, 1.0)
    amplitude = (1.0 + 0.25 * alat) * rng.uniform(0.7, 1.3)  # half the annual range
    if biome.desert:
        annual += 2.0
    phase = np.cos(2.0 * np.pi * (months - 7) / 12.0)  # +1 in July, -1 in January
    t_mean = annual + north * amplitude * phase + rng.normal(0.0, 0.8, size=months.shape)
    half_range = (5.0 + 0.12 * alat + (5.0 if biome.desert else 0.0)) * rng.uniform(0.85, 1.15)
    t_min = t_mean - half_range * rng.uniform(0.9, 1.2, size=months.shape)
    t_max = t_mean + half_range * rng.uniform(0.8, 1.05, size=months.shape)
    base = rng.uniform(*biome.precip)
    wet_peak = 7 if (lat >= 0) != biome.wet_in_winter else 1
    season = 1.0 + biome.precip_season * np.cos(2.0 * np.pi * (months - wet_peak) / 12.0)
    precip = base * np.maximum(season, 0.03) * rng.lognormal(0.0, 0.35, size=months.shape)
    return t_mean, t_min, t_max, precip


# --------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------
class SyntheticSource(Source):
    """Offline source of plausible, mutually consistent synthetic MMEarth tiles.

    Parameters
    ----------
    seed:
        Global seed; together with the tile id it fixes every value of a tile.
    eco_index:
        Ecoregion-name-to-index mapping for ``info["eco_region"]``; ``None``
        gives index 0 to every tile. A name missing from a given mapping is an
        ``UnknownEcoregionError`` (a ``ValueError``).
    missing_orbit_rate:
        Probability (per orbit, independently) that no Sentinel-1 image of
        that orbit pass exists (``BANDS[orbit]`` is then ``None``).
    no_data_rate:
        Probability (deterministic per tile) that no Sentinel-2 image exists:
        :meth:`fetch` then raises :class:`NoDataError`, like the Earth Engine
        source.
    latency_s:
        Simulated per-tile request time (seconds), to exercise scheduling,
        progress and interruption the way a remote source would.
    """

    name = "synthetic"
    synthetic = True

    def __init__(
        self,
        seed: int = 0,
        eco_index: dict[str, int] | None = None,
        missing_orbit_rate: float = 0.25,
        no_data_rate: float = 0.0,
        latency_s: float = 0.0,
    ) -> None:
        for label, rate in (("missing_orbit_rate", missing_orbit_rate), ("no_data_rate", no_data_rate)):
            if not 0.0 <= float(rate) <= 1.0:
                raise ValueError(f"{label} must be in [0, 1], got {rate!r}")
        self.seed = int(seed)
        self.eco_index = dict(eco_index) if eco_index is not None else None
        self.missing_orbit_rate = float(missing_orbit_rate)
        self.no_data_rate = float(no_data_rate)
        self.latency_s = max(0.0, float(latency_s))

    def cache_key(self) -> str:
        """Everything besides the tile that changes what :meth:`fetch` returns."""
        eco = None if self.eco_index is None else sorted(self.eco_index.items())
        blob = json.dumps([self.seed, self.missing_orbit_rate, self.no_data_rate, eco])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"SyntheticSource(seed={self.seed}, eco_index={'None' if self.eco_index is None else '<mapping>'}, "
            f"missing_orbit_rate={self.missing_orbit_rate}, no_data_rate={self.no_data_rate})"
        )

    # ------------------------------------------------------------------
    def fetch(self, tile: Tile, grid: Grid) -> TileStack:
        """Return the deterministic synthetic stack of ``tile`` on ``grid``.

        Raises :class:`NoDataError` for the (deterministic) ``no_data_rate``
        share of tiles and ``ValueError`` for an unknown biome or ecoregion
        (:meth:`Source.eco_region_index`).
        """
        tid = tile.tile_id
        if self.latency_s:
            time.sleep(self.latency_s)
        if tile.biome not in _BIOMES:
            raise ValueError(
                f"tile {tid}: unknown biome {tile.biome!r} (expected one of the {schema.N_BIOMES} "
                "MMEarth biomes in schema.BIOMES)"
            )
        biome = _BIOMES[tile.biome]
        eco = self.eco_region_index(tile)
        if self.no_data_rate > 0.0 and _rng(self.seed, tid, "nodata").random() < self.no_data_rate:
            raise NoDataError(tid, NO_S2_REASON)

        n = int(grid.size)
        res_x = abs(float(grid.transform.a))
        res_y = abs(float(grid.transform.e))
        rng = _rng(self.seed, tid, "content")

        # ---- Sentinel-2 date and product, as the original drew them ----
        year = int(rng.integers(2017, 2021))
        start, end = s2_date_window(year)
        date = start + _dt.timedelta(days=int(rng.integers(0, (end - start).days + 1)))
        s2_type = "l2a" if rng.random() < 0.5 else "l1c"
        s2_bands = list(schema.S2_BANDS_L2A if s2_type == "l2a" else schema.S2_BANDS_L1C)

        # ---- elevation (m) and slope (deg) ----
        relief = biome.relief * rng.uniform(0.3, 1.5)
        relief_f = _smooth(rng, n, 60.0)[0] + 0.35 * _smooth(rng, n, 20.0)[0] + 0.1 * _smooth(rng, n, 8.0)[0]
        rows = np.arange(n, dtype=np.float64)[:, None]
        cols = np.arange(n, dtype=np.float64)[None, :]
        tilt_x, tilt_y = rng.normal(0.0, relief / (n * res_x), size=2)  # regional gradient (m/m)
        elevation = (
            rng.uniform(*biome.elevation)
            + relief * relief_f
            + tilt_x * (cols - n / 2) * res_x
            + tilt_y * (rows - n / 2) * res_y
        )
        # keep the relief above the biome's lowest base level (mangroves a few metres below 0)
        elevation += max(0.0, biome.elevation[0] - 3.0 - float(elevation.min()))
        elevation = elevation.astype(np.float32)
        slope = slope_degrees(elevation, res_x, res_y).astype(np.float32)
        z = (elevation - elevation.mean()) / (float(elevation.std()) + 1e-6)

        # ---- land cover ----
        codes = np.array(list(biome.cover), dtype=np.int64)
        shares = rng.dirichlet(np.array([biome.cover[c] for c in codes]) * 8.0 + 0.05)
        pos = np.array([_WC_POS[int(c)] for c in codes])
        fields = _smooth(rng, n, 25.0, len(codes)) + 0.4 * _smooth(rng, n, 8.0, len(codes))
        score = (
            np.log(shares + 1e-4)[:, None, None]
            + 1.3 * fields
            + _ELEV_BETA[pos][:, None, None] * z[None]
        )
        cls = pos[np.argmax(score, axis=0)]  # (n, n) position in schema.WORLDCOVER_CLASSES
        is_tree = (cls == _WC_POS[10]) | (cls == _WC_POS[95])

        # ---- ERA5-Land monthly aggregates ----
        month_ordinals = (date.year * 12 + date.month - 1) + np.arange(-11, 1)
        cal_months = month_ordinals % 12 + 1
        t_mean, t_min, t_max, precip = _monthly_climate(rng, tile.lat, cal_months, float(elevation.mean()), biome)

        def era5_vec(sel: slice | int) -> list[float]:
            if isinstance(sel, int):
                return [float(t_mean[sel]), float(t_min[sel]), float(t_max[sel]), float(precip[sel])]
            return [float(t_mean[sel].mean()), float(t_min[sel].min()), float(t_max[sel].max()),
                    float(precip[sel].sum())]

        era5 = {"month1": era5_vec(-2), "month2": era5_vec(-1), "year": era5_vec(slice(None))}

        # ---- Sentinel-2 ----
        surface = _SPECTRA[cls]  # (n, n, 12)
        surface = np.moveaxis(surface, -1, 0)  # (12, n, n)
        brightness = 1.0 + 0.08 * _smooth(rng, n, 15.0)[0]
        surface = surface * brightness.astype(np.float32)[None]
        # seasonal snow on the ground (the S2 image is one date; land-cover maps are annual)
        snow_frac = float(np.clip((271.0 - era5["month2"][0]) / 8.0, 0.0, 1.0))
        snow = np.zeros((n, n), dtype=bool)
        snow_field = 0.7 * _smooth(rng, n, 20.0)[0] + 0.7 * z
        if snow_frac > 0.0:
            snow = snow_field >= np.quantile(snow_field, 1.0 - snow_frac)
            cover = np.where(is_tree, 0.5, 1.0).astype(np.float32) * snow
            surface = surface * (1.0 - cover)[None] + _SNOW_SPECTRUM[:, None, None] * cover[None]
        # clouds (the scene is < 10 % cloudy; most tiles are clear)
        cloud_f, cirrus_f = _smooth(rng, n, 30.0, 2)
        cloudy, has_cirrus = rng.random(2) < (0.35, 0.2)
        t_cloud = rng.uniform(3.0, 8.0) if cloudy else 12.0
        cloud_prob = 100.0 / (1.0 + np.exp(-(2.5 * cloud_f - t_cloud)))
        cloud_prob = np.clip(np.rint(cloud_prob + np.abs(rng.normal(0.0, 1.5, size=(n, n)))), 0, 100)
        cirrus = np.clip(1.5 * cirrus_f - rng.uniform(2.0, 5.0), 0.0, None) if has_cirrus else np.zeros((n, n))
        alpha = (np.clip((cloud_prob - 30.0) / 70.0, 0.0, 1.0) ** 1.5).astype(np.float32)
        toa = surface * (1.0 - alpha)[None] + _CLOUD_SPECTRUM[:, None, None] * alpha[None]
        toa[:9] += (300.0 * cirrus).astype(np.float32)[None]
        toa *= 1.0 + 0.03 * rng.standard_normal(toa.shape, dtype=np.float32)
        if s2_type == "l1c":
            toa += _L1C_OFFSET[:, None, None]
            toa[9] *= _L1C_B9_FACTOR
        toa = np.clip(np.rint(toa), 1.0, 10000.0)
        # QA60: 60 m blocks, 1024 opaque cloud, 2048 cirrus
        block = np.minimum(np.arange(n) // 6 * 6 + 3, n - 1)
        opaque_b = (cloud_prob >= 80.0)[np.ix_(block, block)]
        cirrus_b = (cirrus > 0.5)[np.ix_(block, block)]
        qa60 = np.where(opaque_b, 1024.0, np.where(cirrus_b, 2048.0, 0.0))
        s2: dict[str, np.ndarray] = dict(zip(_S2_SURFACE_BANDS, toa))
        s2["QA60"] = qa60
        if s2_type == "l1c":
            s2["B10"] = np.clip(np.rint(rng.uniform(5.0, 30.0) + 8.0 * np.abs(cirrus_f) + 100.0 * cirrus), 1, 10000)
        else:
            scl = _SCL_LUT[cls].copy()
            scl[snow & ~is_tree] = 11.0
            scl[cirrus > 0.5] = 10.0
            scl[cloud_prob >= 50.0] = 8.0
            scl[cloud_prob >= 80.0] = 9.0
            s2["MSK_CLDPRB"] = cloud_prob
            s2["SCL"] = scl
        if rng.random() < S2_EDGE_RATE:  # the image's edge crosses the tile
            theta = rng.uniform(0.0, 2.0 * np.pi)
            d = math.cos(theta) * (cols - n / 2) + math.sin(theta) * (rows - n / 2)
            edge = d >= np.quantile(d, 1.0 - rng.uniform(0.05, 0.35))
            for band in s2:
                s2[band] = np.where(edge, np.nan, s2[band])

        # ---- Sentinel-1 (dB), per orbit pass ----
        polar = abs(tile.lat) > 60.0
        u_missing = rng.random(2)
        u_pol = rng.random(2)
        co = _S1_CO[cls].copy()
        if biome.desert:
            co[cls == _WC_POS[60]] = -17.0
        co += 1.2 * _smooth(rng, n, 12.0)[0].astype(np.float32)
        cross = co + _S1_CROSS_DIFF[cls] + 0.5 * _smooth(rng, n, 12.0)[0].astype(np.float32)
        dz_dx = np.gradient(elevation.astype(np.float64), res_x, axis=1)
        s1: dict[str, dict[str, np.ndarray] | None] = {}
        for k, (orbit, look) in enumerate((("sentinel1_asc", 1.0), ("sentinel1_desc", -1.0))):
            speckle = rng.standard_normal((2, n, n), dtype=np.float32) * 1.5
            if u_missing[k] < self.missing_orbit_rate:
                s1[orbit] = None
                continue
            # slopes facing the sensor (east-looking ascending, west-looking descending) are brighter
            terrain = np.clip(8.0 * look * dz_dx, -6.0, 6.0).astype(np.float32)
            pols = ("HH", "HV") if polar and u_pol[k] < 0.5 else ("VV", "VH")
            s1[orbit] = {
                pols[0]: np.clip(co + terrain + speckle[0] + (0.5 if pols[0] == "HH" else 0.0), -30.0, 5.0),
                pols[1]: np.clip(cross + terrain + speckle[1], -40.0, -3.0),
            }

        # ---- canopy height (m) and its standard deviation ----
        hmax = biome.canopy * rng.uniform(0.5, 1.0)
        h_field = (0.5 * (_smooth(rng, n, 10.0)[0] + 2.0) / 2.0).clip(0.0, 1.0)  # ~[0, 1]
        noise = rng.standard_normal((2, n, n))
        height = np.where(is_tree, hmax * (0.55 + 0.45 * h_field) + 1.5 * noise[0], 0.0)
        shrub = cls == _WC_POS[20]
        height = np.where(shrub, np.abs(1.2 * h_field + 0.8 * noise[0]), height)
        height = np.rint(np.clip(height, 0.0, biome.canopy * 1.05))
        std = np.where(is_tree, 2.0 + 0.12 * height, 1.0 + 0.5 * np.abs(noise[1]))
        std = np.clip(np.rint(std + 0.8 * noise[1] * is_tree), 0.0, 10.0)

        # ---- assemble ----
        bands: dict[str, list[str] | None] = {
            "sentinel2": s2_bands,
            "sentinel1_asc": list(s1["sentinel1_asc"]) if s1["sentinel1_asc"] else None,
            "sentinel1_desc": list(s1["sentinel1_desc"]) if s1["sentinel1_desc"] else None,
            "aster": list(schema.ASTER_BANDS),
            "era5": list(schema.ERA5_BANDS),
            "dynamic_world": list(schema.DYNAMIC_WORLD_BANDS),
            "canopy_height_eth": list(schema.CANOPY_BANDS),
            "esa_worldcover": list(schema.WORLDCOVER_BANDS),
        }
        layers: dict[str, dict[str, np.ndarray]] = {
            "sentinel2": s2,
            "aster": {"elevation": elevation, "slope": slope},
            # as the original's export: the yearly label shifted by +1 on Earth Engine (1..9, 0 = no data)
            "dynamic_world": {"label": _DW_LUT[cls] + 1.0},
            "canopy_height_eth": {"height": height, "std": std},
            "esa_worldcover": {"Map": _WC_LUT[cls]},
        }
        for orbit in ("sentinel1_asc", "sentinel1_desc"):
            if s1[orbit] is not None:
                layers[orbit] = s1[orbit]
        data = np.empty((len(schema.stack_band_descriptions(bands)), n, n), dtype=np.float32)
        i = 0
        for group in schema.STACK_GROUPS:
            for band in bands[group] or ():
                data[i] = layers[group][band]
                i += 1

        info: dict[str, Any] = {
            "S2_DATE": date.isoformat(),
            "S2_type": s2_type,
            "CRS": grid.crs,
            "lat": float(tile.lat),
            "lon": float(tile.lon),
            "biome": schema.BIOME_INDEX[tile.biome],
            "eco_region": eco,
            "NO_DATA": False,
            "BANDS": bands,
            "era5": era5,
            "SOURCE": self.name,
            "SYNTHETIC": True,
        }
        stack = TileStack(tile_id=tid, data=data, crs=grid.crs, transform=grid.transform, info=info)
        stack.validate()
        return stack
