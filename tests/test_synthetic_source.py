"""Tests of the embedded synthetic source (tasks/multimodal/sources/synthetic.py)."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from tasks.multimodal import schema
from tasks.multimodal.sources.base import Grid, NoDataError, Tile, TileStack, read_stack, write_stack
from tasks.multimodal.sources.synthetic import (
    NO_S2_REASON,
    WORLDCOVER_TO_DYNAMIC_WORLD,
    SyntheticSource,
    s2_date_window,
    slope_degrees,
)

INFO_KEYS = {
    "S2_DATE", "S2_type", "CRS", "lat", "lon", "biome", "eco_region", "NO_DATA", "BANDS", "era5",
    "SOURCE", "SYNTHETIC",
}
TUNDRA = "Tundra"
RAINFOREST = "Tropical & Subtropical Moist Broadleaf Forests"
TEMPERATE = "Temperate Broadleaf & Mixed Forests"


def make_tile(tile_id: str = "t1", biome: str = TUNDRA, lon: float = 10.0, lat: float = 60.0,
              eco_region: str = "x") -> Tile:
    """A square tile of about 1300 m around (lon, lat)."""
    dlat = 650.0 / 111_320.0
    dlon = dlat / max(math.cos(math.radians(lat)), 0.05)
    ring = [[lon - dlon, lat - dlat], [lon + dlon, lat - dlat], [lon + dlon, lat + dlat],
            [lon - dlon, lat + dlat], [lon - dlon, lat - dlat]]
    return Tile(tile_id=tile_id, biome=biome, eco_region=eco_region, lon=lon, lat=lat,
                geometry={"type": "Polygon", "coordinates": [ring]})


def fetch(src: SyntheticSource, tile: Tile) -> TileStack:
    return src.fetch(tile, Grid.for_tile(tile))


def bands_of(stack: TileStack) -> dict[str, np.ndarray]:
    return dict(zip(stack.band_descriptions, stack.data))


@pytest.fixture(scope="module")
def sample() -> list[tuple[Tile, TileStack]]:
    """Tiles of every biome over a spread of latitudes/longitudes."""
    src = SyntheticSource(seed=7)
    out = []
    for i in range(56):
        biome = schema.BIOMES[i % schema.N_BIOMES]
        tile = make_tile(f"s{i}", biome, lon=-175.0 + 6.3 * i, lat=-72.0 + 2.6 * i)
        out.append((tile, fetch(src, tile)))
    return out


# --------------------------------------------------------------------------
def test_determinism() -> None:
    tile = make_tile()
    a = fetch(SyntheticSource(seed=0), tile)
    b = fetch(SyntheticSource(seed=0), tile)
    assert np.array_equal(a.data, b.data, equal_nan=True)
    assert a.info == b.info
    assert a.crs == b.crs and a.transform == b.transform
    c = fetch(SyntheticSource(seed=1), tile)
    assert c.data.shape != a.data.shape or not np.array_equal(c.data, a.data, equal_nan=True)
    d = fetch(SyntheticSource(seed=0), make_tile("t2"))
    assert d.data.shape != a.data.shape or not np.array_equal(d.data, a.data, equal_nan=True)


def test_shape_dtype_bands_and_info(sample: list[tuple[Tile, TileStack]]) -> None:
    for tile, stack in sample:
        grid = Grid.for_tile(tile)
        info = stack.info
        assert set(info) == INFO_KEYS
        assert set(schema.STACK_GROUPS) <= set(info["BANDS"])
        names = schema.stack_band_descriptions(info["BANDS"])
        assert stack.band_descriptions == names
        assert stack.data.dtype == np.float32
        assert stack.data.shape == (len(names), grid.size, grid.size)
        assert stack.crs == grid.crs == info["CRS"] == tile.utm_crs
        assert re.fullmatch(r"EPSG:32[67]\d\d", stack.crs)
        assert 1 <= int(stack.crs[-2:]) <= 60
        assert stack.transform == grid.transform
        assert info["S2_type"] in schema.S2_TYPES
        expected_s2 = schema.S2_BANDS_L2A if info["S2_type"] == "l2a" else schema.S2_BANDS_L1C
        assert info["BANDS"]["sentinel2"] == list(expected_s2)
        assert info["BANDS"]["aster"] == list(schema.ASTER_BANDS)
        assert info["BANDS"]["dynamic_world"] == ["label"]
        assert info["BANDS"]["esa_worldcover"] == ["Map"]
        assert info["BANDS"]["canopy_height_eth"] == ["height", "std"]
        assert info["biome"] == schema.BIOME_INDEX[tile.biome]
        assert info["eco_region"] == 0
        assert info["NO_DATA"] is False and info["SYNTHETIC"] is True and info["SOURCE"] == "synthetic"
        assert isinstance(info["lat"], float) and isinstance(info["lon"], float)
        assert (info["lat"], info["lon"]) == (tile.lat, tile.lon)
        assert json.loads(json.dumps(info)) == info  # plain JSON types only
    assert {s.info["S2_type"] for _, s in sample} == {"l1c", "l2a"}


def test_s2_date_windows(sample: list[tuple[Tile, TileStack]]) -> None:
    years = set()
    for _, stack in sample:
        date = dt.date.fromisoformat(stack.info["S2_DATE"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", stack.info["S2_DATE"])
        assert dt.date(2017, 1, 1) <= date <= dt.date(2020, 12, 31)
        assert date.year != 2018 or date.month <= 11
        years.add(date.year)
    assert len(years) >= 3
    assert s2_date_window(2019) == (dt.date(2018, 12, 1), dt.date(2019, 12, 31))
    assert s2_date_window(2018) == (dt.date(2018, 1, 1), dt.date(2018, 11, 30))


def test_value_ranges_and_consistency(sample: list[tuple[Tile, TileStack]]) -> None:
    wc_classes = np.array(schema.WORLDCOVER_CLASSES)
    dw_of_wc = np.zeros(101)
    for wc, dw in WORLDCOVER_TO_DYNAMIC_WORLD.items():
        dw_of_wc[wc] = dw
    co_minus_cross = []
    for _, stack in sample:
        b = bands_of(stack)
        s2_type = stack.info["S2_type"]
        for name in schema.S2_SPECTRAL:
            key = f"sentinel2/{name}"
            if name == "B10" and s2_type == "l2a":
                assert key not in b
                continue
            v = b[key][np.isfinite(b[key])]
            assert v.min() >= 1 and v.max() <= 10000, key
        if s2_type == "l1c":
            assert np.nanmedian(b["sentinel2/B10"]) < 60
            assert "sentinel2/SCL" not in b and "sentinel2/MSK_CLDPRB" not in b
        else:
            scl = b["sentinel2/SCL"][np.isfinite(b["sentinel2/SCL"])]
            assert np.all(np.isin(scl, schema.SCL_CLASSES))
            prob = b["sentinel2/MSK_CLDPRB"][np.isfinite(b["sentinel2/MSK_CLDPRB"])]
            assert prob.min() >= 0 and prob.max() <= 100 and np.median(prob) < 10
            assert np.all(np.isin(np.unique(b["sentinel2/SCL"][b["sentinel2/MSK_CLDPRB"] >= 80]), [9]))
        qa = b["sentinel2/QA60"][np.isfinite(b["sentinel2/QA60"])]
        assert np.all(np.isin(qa, [0, 1024, 2048])) and np.mean(qa == 0) > 0.5
        # only Sentinel-2 may have missing pixels
        other = [n for n in stack.band_descriptions if not n.startswith("sentinel2/")]
        assert np.all(np.isfinite(np.stack([b[n] for n in other])))
        for orbit in ("sentinel1_asc", "sentinel1_desc"):
            pols = stack.info["BANDS"][orbit]
            if pols is None:
                assert not any(n.startswith(orbit + "/") for n in b)
                continue
            assert pols in (["VV", "VH"], ["HH", "HV"])
            co, cross = b[f"{orbit}/{pols[0]}"], b[f"{orbit}/{pols[1]}"]
            assert co.min() >= -30 and co.max() <= 5
            assert cross.min() >= -40 and cross.max() <= 0
            co_minus_cross.append(float(np.mean(co - cross)))
        wc = b["esa_worldcover/Map"]
        assert np.all(np.isin(wc, wc_classes))
        dw = b["dynamic_world/label"]
        assert dw.min() >= 1 and dw.max() <= 9  # label + 1, as the original's stacks
        assert np.array_equal(dw - 1, dw_of_wc[wc.astype(int)])
        h, sd = b["canopy_height_eth/height"], b["canopy_height_eth/std"]
        assert h.min() >= 0 and h.max() <= 50 and sd.min() >= 0 and sd.max() <= 10
        assert np.all(h[~np.isin(wc, [10, 20, 95])] == 0)
        if np.mean(wc == 10) > 0.1:
            assert np.mean(h[wc == 10]) > 3
    assert 5.0 < float(np.mean(co_minus_cross)) < 9.0


def test_s2_spectra_follow_land_cover() -> None:
    src = SyntheticSource(seed=2)
    checked = 0
    for i in range(20):
        stack = fetch(src, make_tile(f"rf{i}", RAINFOREST, lon=-60.0, lat=-3.0))
        if stack.info["S2_type"] != "l2a":
            continue
        b = bands_of(stack)
        clear = (b["sentinel2/MSK_CLDPRB"] < 20) & np.isfinite(b["sentinel2/B4"])
        trees = clear & (b["esa_worldcover/Map"] == 10)
        water = clear & (b["esa_worldcover/Map"] == 80)
        if trees.sum() > 100:
            ndvi = (b["sentinel2/B8"] - b["sentinel2/B4"]) / (b["sentinel2/B8"] + b["sentinel2/B4"])
            assert np.median(ndvi[trees]) > 0.6
            assert np.all(np.isin(b["sentinel2/SCL"][trees], [4, 10]))  # 10: thin cirrus
            checked += 1
        if water.sum() > 20:
            assert np.median(b["sentinel2/B8"][water]) < np.median(b["sentinel2/B3"][water])
            assert np.all(np.isin(b["sentinel2/SCL"][water], [6, 10]))
            for orbit in ("sentinel1_asc", "sentinel1_desc"):
                if f"{orbit}/VV" in b:
                    assert np.median(b[f"{orbit}/VV"][water]) < -15
    assert checked > 0


def test_slope_consistent_with_elevation(sample: list[tuple[Tile, TileStack]]) -> None:
    for tile, stack in sample[:14]:
        b = bands_of(stack)
        res = Grid.for_tile(tile).resolution
        elev = b["aster/elevation"].astype(np.float64)
        dz_dy, dz_dx = np.gradient(elev, res, res)
        expected = np.degrees(np.arctan(np.hypot(dz_dx, dz_dy)))
        np.testing.assert_allclose(b["aster/slope"], expected, atol=1e-3)
        np.testing.assert_allclose(slope_degrees(elev, res, res), expected)
        assert 0 <= b["aster/slope"].min() and b["aster/slope"].max() < 90


def test_elevation_follows_biome() -> None:
    src = SyntheticSource(seed=0)
    montane = [float(bands_of(fetch(src, make_tile(f"m{i}", "Montane Grasslands & Shrublands", 37.0, -3.0)))
                     ["aster/elevation"].mean()) for i in range(5)]
    mangrove = [bands_of(fetch(src, make_tile(f"g{i}", "Mangroves", 100.0, 5.0)))["aster/elevation"]
                for i in range(5)]
    assert min(montane) > 2000
    assert all(m.min() >= -5 and m.max() < 30 for m in mangrove)


def test_era5_structure_and_aggregation(sample: list[tuple[Tile, TileStack]]) -> None:
    for _, stack in sample:
        era5 = stack.info["era5"]
        assert set(era5) == {"month1", "month2", "year"}
        for vec in era5.values():
            assert len(vec) == 4 and all(type(v) is float for v in vec)
            mean, tmin, tmax, precip = vec
            assert 180 < tmin < mean < tmax < 340
            assert precip >= 0
        m1, m2, yr = era5["month1"], era5["month2"], era5["year"]
        assert yr[1] <= min(m1[1], m2[1])  # min of the monthly minima
        assert yr[2] >= max(m1[2], m2[2])  # max of the monthly maxima
        assert yr[3] >= m1[3] + m2[3]  # sum of the 12 months
        assert yr[1] < yr[0] < yr[2]  # mean of monthly means lies between


def test_era5_month1_is_previous_month() -> None:
    """Mid-latitude north: spring months warm up from month1 to month2, autumn cools."""
    src = SyntheticSource(seed=4)
    warming = cooling = 0
    for i in range(80):
        info = fetch(src, make_tile(f"ml{i}", TEMPERATE, lon=10.0, lat=50.0)).info
        month = int(info["S2_DATE"][5:7])
        diff = info["era5"]["month2"][0] - info["era5"]["month1"][0]
        if month in (4, 5):
            assert diff > 0, info["S2_DATE"]
            warming += 1
        elif month in (10, 11):
            assert diff < 0, info["S2_DATE"]
            cooling += 1
    assert warming and cooling


def test_tropical_warmer_than_polar() -> None:
    src = SyntheticSource(seed=0)
    for i in range(5):
        tropic = fetch(src, make_tile(f"tr{i}", RAINFOREST, lon=20.0, lat=1.0)).info["era5"]["year"]
        polar = fetch(src, make_tile(f"po{i}", TUNDRA, lon=20.0, lat=72.0)).info["era5"]["year"]
        assert tropic[0] > polar[0] + 15
        assert tropic[0] > 285 and polar[0] < 273
        # tropics: small seasonal range; polar: large
        assert tropic[2] - tropic[1] < polar[2] - polar[1]


def test_hemispheres_have_opposite_seasons() -> None:
    src = SyntheticSource(seed=5)

    def season_correlation(lat: float) -> float:
        phase, temp = [], []
        for i in range(40):
            info = fetch(src, make_tile(f"h{lat}_{i}", TEMPERATE, lon=10.0, lat=lat)).info
            month = int(info["S2_DATE"][5:7])
            phase.append(math.cos(2 * math.pi * (month - 7) / 12))
            temp.append(info["era5"]["month2"][0])
        return float(np.corrcoef(phase, temp)[0, 1])

    assert season_correlation(45.0) > 0.8
    assert season_correlation(-45.0) < -0.8


def test_precipitation_depends_on_biome() -> None:
    src = SyntheticSource(seed=0)
    desert = [fetch(src, make_tile(f"d{i}", "Deserts & Xeric Shrublands", 10.0, 23.0)).info["era5"]["year"][3]
              for i in range(5)]
    wet = [fetch(src, make_tile(f"w{i}", RAINFOREST, 10.0, 2.0)).info["era5"]["year"][3] for i in range(5)]
    assert max(desert) < 0.2 and min(wet) > 1.0


def test_sentinel1_orbits_and_polarisations() -> None:
    tile = make_tile("orb")
    both = fetch(SyntheticSource(seed=0, missing_orbit_rate=0.0), tile)
    none = fetch(SyntheticSource(seed=0, missing_orbit_rate=1.0), tile)
    assert both.info["BANDS"]["sentinel1_asc"] and both.info["BANDS"]["sentinel1_desc"]
    assert none.info["BANDS"]["sentinel1_asc"] is None and none.info["BANDS"]["sentinel1_desc"] is None
    assert none.data.shape[0] == both.data.shape[0] - 4
    # everything but Sentinel-1 is the same whatever the missing-orbit rate
    nb, bb = bands_of(none), bands_of(both)
    for name in nb:
        assert np.array_equal(nb[name], bb[name], equal_nan=True)

    src = SyntheticSource(seed=0, missing_orbit_rate=0.0)
    polar = {tuple(fetch(src, make_tile(f"p{i}", TUNDRA, 25.0, 70.0)).info["BANDS"]["sentinel1_asc"])
             for i in range(12)}
    assert polar == {("VV", "VH"), ("HH", "HV")}
    for i in range(12):
        info = fetch(src, make_tile(f"q{i}", TEMPERATE, 25.0, 45.0)).info
        assert info["BANDS"]["sentinel1_asc"] == ["VV", "VH"] == info["BANDS"]["sentinel1_desc"]


def test_some_tiles_have_an_s2_edge(sample: list[tuple[Tile, TileStack]]) -> None:
    src = SyntheticSource(seed=11)
    with_nan = 0
    for i in range(100):
        stack = fetch(src, make_tile(f"e{i}", TEMPERATE, 10.0, 50.0))
        nan = np.isnan(stack.data)
        if nan.any():
            with_nan += 1
            n_s2 = len(stack.info["BANDS"]["sentinel2"])
            assert not nan[n_s2:].any()
            frac = nan[0].mean()
            assert 0.01 < frac < 0.5
            assert np.array_equal(nan[:n_s2], np.broadcast_to(nan[0], nan[:n_s2].shape))
    assert 1 <= with_nan <= 15


def test_write_read_round_trip(tmp_path: Path) -> None:
    stack = fetch(SyntheticSource(seed=0), make_tile())
    path = write_stack(tmp_path / "tiles" / "t1.tif", stack)
    data, names = read_stack(path)
    assert names == stack.band_descriptions
    assert data.dtype == np.float32
    assert np.array_equal(data, stack.data, equal_nan=True)


def test_no_data_rate() -> None:
    with pytest.raises(NoDataError) as err:
        fetch(SyntheticSource(no_data_rate=1.0), make_tile("gone"))
    assert err.value.tile_id == "gone" and err.value.reason == NO_S2_REASON
    src = SyntheticSource(seed=3, no_data_rate=0.5)
    outcomes = []
    for i in range(40):
        try:
            fetch(src, make_tile(f"n{i}"))
            outcomes.append(True)
        except NoDataError:
            outcomes.append(False)
    assert 5 < sum(outcomes) < 35
    again = []
    for i in range(40):
        try:
            fetch(src, make_tile(f"n{i}"))
            again.append(True)
        except NoDataError:
            again.append(False)
    assert again == outcomes


def test_unknown_biome_and_ecoregion() -> None:
    with pytest.raises(ValueError, match=r"tile bad.*Rock & Ice"):
        fetch(SyntheticSource(), make_tile("bad", biome="Rock & Ice"))
    src = SyntheticSource(eco_index={"Eco A": 17})
    assert fetch(src, make_tile("eco", eco_region="Eco A")).info["eco_region"] == 17
    with pytest.raises(ValueError, match=r"tile eco2.*Eco B"):
        fetch(src, make_tile("eco2", eco_region="Eco B"))
    with pytest.raises(ValueError):
        SyntheticSource(missing_orbit_rate=1.5)
