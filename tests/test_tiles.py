"""Tests for tasks.multimodal.tiles: regions, ecoregion index, sampling, tiles GeoJSON."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
from pyproj import Geod
from shapely.geometry import box, shape

from tasks.multimodal import schema
from tasks.multimodal.sources.base import Tile
from tasks.multimodal.tiles import (
    DEFAULT_REGIONS,
    Region,
    RegionsError,
    TilesError,
    allocate_counts,
    eco_region_index,
    geodesic_area_m2,
    load_regions,
    load_regions_split,
    read_tiles_geojson,
    sample_tiles,
    square_rings,
    tile_counts,
    write_tiles_geojson,
)

GEOD = Geod(ellps="WGS84")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _square(lon: float, lat: float, d: float = 0.2) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": [[[lon, lat], [lon + d, lat], [lon + d, lat + d],
                                                [lon, lat + d], [lon, lat]]]}


def _feature(props: dict[str, Any] | None, geometry: Any) -> dict[str, Any]:
    return {"type": "Feature", "properties": props, "geometry": geometry}


def _fc(*features: dict[str, Any]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": list(features)}


def _write(tmp_path: Path, name: str, doc: Any) -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _region(name: str, biome: str, geom: Any, eco_id: int | None = None) -> Region:
    return Region(name, biome, geom, eco_id)


@pytest.fixture(scope="module")
def default_regions() -> list[Region]:
    return load_regions(DEFAULT_REGIONS)


@pytest.fixture(scope="module")
def synthetic() -> list[Region]:
    """A and B share a biome, B has exactly 3x A's area (same latitude band); C alone."""
    return [
        _region("A", "Tundra", box(0.0, 0.0, 1.0, 1.0)),
        _region("B", "Tundra", box(10.0, 0.0, 13.0, 1.0)),
        _region("C", "Mangroves", box(20.0, -1.0, 21.0, 0.0)),
    ]


def _index(regions: list[Region]) -> dict[str, int]:
    return {r.eco_region: i for i, r in enumerate(regions)}


# --------------------------------------------------------------------------
# the embedded default
# --------------------------------------------------------------------------
def test_default_regions_file(default_regions: list[Region], caplog: pytest.LogCaptureFixture) -> None:
    assert DEFAULT_REGIONS.stat().st_size < 20_000
    sampled, skipped = load_regions_split(DEFAULT_REGIONS)
    assert len(sampled) == 10 and len(default_regions) == 10
    assert [(r.eco_region, r.biome) for r in skipped] == [("Rock and ice", "Rock & Ice")]
    assert len({r.biome for r in sampled}) >= 9
    assert all(r.biome in schema.BIOMES for r in sampled)
    lats = [r.geometry.centroid.y for r in sampled]
    assert min(lats) < 0 < max(lats)
    for r in sampled:
        assert r.geometry.is_valid and r.geometry.geom_type == "Polygon"
        assert 5 <= len(r.geometry.exterior.coords) - 1 <= 8
        minx, miny, maxx, maxy = r.geometry.bounds
        ns = GEOD.inv(minx, miny, minx, maxy)[2] / 1000
        ew = GEOD.inv(minx, (miny + maxy) / 2, maxx, (miny + maxy) / 2)[2] / 1000
        assert 15 <= ns <= 65 and 15 <= ew <= 65, (r.eco_region, ns, ew)
    with caplog.at_level(logging.INFO, logger="tasks.multimodal.tiles"):
        load_regions(DEFAULT_REGIONS)
    assert "Rock and ice" in caplog.text


def test_same_name_features_are_merged(tmp_path: Path) -> None:
    props = {"biome": "Tundra", "eco_region": "X"}
    path = _write(tmp_path, "r.geojson", _fc(_feature(props, _square(0, 0)),
                                             _feature(props, _square(5, 5))))
    (region,) = load_regions(path)
    assert region.geometry.geom_type == "MultiPolygon"
    assert region.geometry.area == pytest.approx(0.08)


def test_resolve_property_names(tmp_path: Path) -> None:
    props = {"BIOME_NAME": "Mangroves", "ECO_NAME": "Sundarbans mangroves", "ECO_ID": 271.0}
    path = _write(tmp_path, "resolve.geojson", _fc(_feature(props, _square(89.3, 21.9))))
    (region,) = load_regions(path)
    assert (region.eco_region, region.biome, region.eco_id) == ("Sundarbans mangroves", "Mangroves", 271)


# --------------------------------------------------------------------------
# counts per mode
# --------------------------------------------------------------------------
def test_allocate_counts_exact_and_tie_break() -> None:
    assert allocate_counts(10, {"b": 1, "a": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    assert sum(allocate_counts(1001, {"x": 0.3, "y": 1e-9, "z": 7.7}).values()) == 1001


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_counts_sum_to_n(default_regions: list[Region], mode: int) -> None:
    idx = eco_region_index(default_regions)
    for n in (0, 1, 7, 33):
        tiles = sample_tiles(default_regions, idx, n, mode)
        assert len(tiles) == n


def test_mode2_equal_per_ecoregion(synthetic: list[Region]) -> None:
    tiles = sample_tiles(synthetic, _index(synthetic), 40, 2)
    counts = Counter(t.eco_region for t in tiles)
    assert counts == {"A": 14, "B": 13, "C": 13}  # remainder to the first name


def test_mode1_equal_per_biome_then_ecoregion(synthetic: list[Region]) -> None:
    counts = Counter(t.eco_region for t in sample_tiles(synthetic, _index(synthetic), 40, 1))
    assert counts == {"A": 10, "B": 10, "C": 20}


def test_mode0_area_proportional_within_biome(synthetic: list[Region]) -> None:
    a, b = (geodesic_area_m2(r.geometry) for r in synthetic[:2])
    assert b / a == pytest.approx(3.0, rel=1e-3)  # geodesic edges bow slightly
    counts = Counter(t.eco_region for t in sample_tiles(synthetic, _index(synthetic), 40, 0))
    assert counts == {"A": 5, "B": 15, "C": 20}
    # 41 = 20.5 + 20.5: the tie goes to the alphabetically first biome ("Mangroves")
    assert tile_counts(synthetic, 41, 0) == {"A": 5, "B": 15, "C": 21}


def test_bad_mode(synthetic: list[Region]) -> None:
    with pytest.raises(ValueError, match="mode"):
        sample_tiles(synthetic, _index(synthetic), 5, 3)


# --------------------------------------------------------------------------
# geometry of the tiles
# --------------------------------------------------------------------------
def test_centres_inside_and_squares_sized(default_regions: list[Region]) -> None:
    by_name = {r.eco_region: r for r in default_regions}
    idx = eco_region_index(default_regions)
    tiles = sample_tiles(default_regions, idx, 60, 2, tile_size_m=1300.0, seed=3)
    for t in tiles:
        region = by_name[t.eco_region]
        assert t.biome == region.biome
        assert region.geometry.contains(shapely.Point(t.lon, t.lat))
        ring = t.geometry["coordinates"][0]
        assert t.geometry["type"] == "Polygon" and len(ring) == 5 and ring[0] == ring[-1]
        sides = [GEOD.inv(*ring[j], *ring[j + 1])[2] for j in range(4)]
        assert np.allclose(sides, t.tile_size_m, rtol=0.01), (t.tile_id, sides)
        square = shape(t.geometry)
        assert square.is_valid and square.contains(shapely.Point(t.lon, t.lat))
        assert t.tile_id.startswith(f"{idx[t.eco_region]:03d}_0_")
        schema.check_tile_id(t.tile_id)
    assert len({t.tile_id for t in tiles}) == len(tiles)


def test_tile_size_parameter(synthetic: list[Region]) -> None:
    (t,) = sample_tiles(synthetic[:1], {"A": 5}, 1, 2, tile_size_m=640.0)
    ring = t.geometry["coordinates"][0]
    assert t.tile_size_m == 640.0
    assert GEOD.inv(*ring[0], *ring[1])[2] == pytest.approx(640.0, rel=0.01)


def test_square_across_antimeridian_is_continuous() -> None:
    ring = square_rings(np.array([179.9999]), np.array([-17.0]), 1300.0, "EPSG:32760")[0]
    assert ring[:, 0].max() - ring[:, 0].min() < 0.1
    assert shapely.Polygon(ring).is_valid


@pytest.mark.parametrize("given", [None, (-179.9991, -17.0), (180.0009, -17.0)])
def test_tile_across_antimeridian_keeps_its_place(tmp_path: Path, given) -> None:
    """A user's tile written across the antimeridian with a jump of its longitudes (as
    RFC 7946 writers do) is read where it is: centroid near +-180 (not the planar
    centroid near 0), a continuous ring, and the stack grid and Earth Engine's geodesic
    centroid there too. A lon given beyond 180 is taken modulo 360."""
    from pyproj import Transformer

    from tasks.multimodal.sources.earthengine import geodesic_centroid
    from tasks.multimodal.tile import Grid

    d = 0.006
    ring = [[179.9939, -17.0058], [-179.9939, -17.0058], [-179.9939, -16.9942], [179.9939, -16.9942],
            [179.9939, -17.0058]]  # about 1300 m square
    props = {"tile_id": "am1", "biome": "Tundra", "eco_region": "x"}
    if given is not None:
        props.update(lon=given[0], lat=given[1])
    path = _write(tmp_path, "t.geojson", _fc(_feature(props, {"type": "Polygon", "coordinates": [ring]})))
    (t,) = read_tiles_geojson(path)
    assert abs(abs(t.lon) - 180.0) < d and -180.0 <= t.lon < 180.0, t.lon
    assert t.lat == pytest.approx(-17.0, abs=d)
    lons = [p[0] for p in t.geometry["coordinates"][0]]
    assert max(lons) - min(lons) < 0.02 and shapely.Polygon(t.geometry["coordinates"][0]).is_valid
    assert t.tile_size_m == pytest.approx(1300.0, rel=0.05)
    clon, clat = geodesic_centroid(t.geometry)
    assert abs(abs(clon) - 180.0) < d and clat == pytest.approx(-17.0, abs=d)
    grid = Grid.for_tile(t)
    cx = grid.transform.c + grid.size * grid.resolution / 2
    cy = grid.transform.f - grid.size * grid.resolution / 2
    glon, glat = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True).transform(cx, cy)
    assert abs(abs(glon) - 180.0) < d and glat == pytest.approx(-17.0, abs=d), (grid.crs, glon, glat)
    # written and read back (the flow's own streamed file), it stays there
    write_tiles_geojson([t], tmp_path / "back.geojson")
    (back,) = read_tiles_geojson(tmp_path / "back.geojson")
    assert back.lon == pytest.approx(t.lon) and back.geometry == t.geometry


def test_tile_near_antimeridian_without_crossing_is_unchanged(tmp_path: Path) -> None:
    ring = [[179.9, 10.0], [179.99, 10.0], [179.99, 10.09], [179.9, 10.09], [179.9, 10.0]]
    path = _write(tmp_path, "t.geojson", _fc(_feature({"tile_id": "n1", "biome": "Tundra", "eco_region": "x"},
                                                      {"type": "Polygon", "coordinates": [ring]})))
    (t,) = read_tiles_geojson(path)
    assert t.geometry["coordinates"][0] == ring and t.lon == pytest.approx(179.945)


# --------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------
def test_deterministic_and_seed_sensitive(default_regions: list[Region]) -> None:
    idx = eco_region_index(default_regions)
    first = sample_tiles(default_regions, idx, 30, 0, seed=7, batch=2)
    assert first == sample_tiles(default_regions, idx, 30, 0, seed=7, batch=2)
    other_seed = sample_tiles(default_regions, idx, 30, 0, seed=8, batch=2)
    other_batch = sample_tiles(default_regions, idx, 30, 0, seed=7, batch=3)
    assert [(t.lon, t.lat) for t in first] != [(t.lon, t.lat) for t in other_seed]
    assert [(t.lon, t.lat) for t in first] != [(t.lon, t.lat) for t in other_batch]
    assert all("_2_" in t.tile_id for t in first) and all("_3_" in t.tile_id for t in other_batch)
    # one ecoregion's points do not depend on the other regions present
    one = [r for r in default_regions if r.eco_region == "Chilean Matorral"]
    alone = sample_tiles(one, idx, 3, 2, seed=7, batch=2)
    within = [t for t in sample_tiles(default_regions, idx, 30, 2, seed=7, batch=2)
              if t.eco_region == "Chilean Matorral"]
    assert alone == within


# --------------------------------------------------------------------------
# tiles GeoJSON round trip and reader
# --------------------------------------------------------------------------
def test_round_trip(default_regions: list[Region], tmp_path: Path) -> None:
    tiles = sample_tiles(default_regions, eco_region_index(default_regions), 25, 1)
    path = write_tiles_geojson(tiles, tmp_path / "out" / "tiles.geojson")
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 25
    props = doc["features"][0]["properties"]
    assert set(props) >= {"tile_id", "biome", "eco_region", "lat", "lon", "tile_size_m"}
    assert read_tiles_geojson(path) == tiles
    assert not list(path.parent.glob(".*partial*"))


def test_reader_fills_centroid_and_size(default_regions: list[Region], tmp_path: Path) -> None:
    (tile,) = sample_tiles(default_regions[:1], eco_region_index(default_regions), 1, 2)
    path = _write(tmp_path, "t.geojson", _fc(_feature(
        {"tile_id": "t1", "biome": tile.biome, "eco_region": tile.eco_region}, tile.geometry)))
    (back,) = read_tiles_geojson(path)
    assert back.tile_size_m == 1300.0
    assert back.lon == pytest.approx(tile.lon, abs=1e-4) and back.lat == pytest.approx(tile.lat, abs=1e-4)


def _tile_props(**kw: Any) -> dict[str, Any]:
    props = {"tile_id": "t1", "biome": "Tundra", "eco_region": "X"}
    props.update(kw)
    return {k: v for k, v in props.items() if v is not None}


@pytest.mark.parametrize(
    ("features", "needle"),
    [
        ([_feature(_tile_props(tile_id="../x"), _square(0, 0, 0.01))], "'../x'"),
        ([_feature(_tile_props(tile_id="a/b"), _square(0, 0, 0.01))], "'a/b'"),
        ([_feature(_tile_props(biome="Jungle"), _square(0, 0, 0.01))], "'Jungle'"),
        ([_feature(_tile_props(biome="Rock & Ice"), _square(0, 0, 0.01))], "biome"),
        ([_feature(_tile_props(), _square(0, 0, 0.01)),
          _feature(_tile_props(), _square(1, 1, 0.01))], "duplicate"),
        ([_feature(_tile_props(eco_region=None), _square(0, 0, 0.01))], "'eco_region'"),
        ([_feature(_tile_props(tile_id=None), _square(0, 0, 0.01))], "'tile_id'"),
        ([_feature(_tile_props(), {"type": "Point", "coordinates": [0, 0]})], "Point"),
        ([_feature(_tile_props(), None)], "'geometry'"),
        ([_feature(_tile_props(lat=50.0, lon=0.005), _square(0, 0, 0.01))], "swapped"),
    ],
)
def test_tiles_reader_errors(tmp_path: Path, features: list[dict[str, Any]], needle: str) -> None:
    path = _write(tmp_path, "user_tiles.geojson", _fc(*features))
    with pytest.raises(TilesError) as info:
        read_tiles_geojson(path)
    msg = str(info.value)
    assert "user_tiles.geojson" in msg and needle in msg
    assert f"feature {len(features) - 1}" in msg


def test_tiles_reader_bad_json(tmp_path: Path) -> None:
    path = _write(tmp_path, "broken_tiles.geojson", '{"type": "FeatureCollection",\n "features": [}')
    with pytest.raises(TilesError, match=r"broken_tiles.geojson.*line 2 column"):
        read_tiles_geojson(path)


def test_writer_rejects_unsafe_ids(tmp_path: Path) -> None:
    bad = Tile("../x", "Tundra", "X", 0.0, 0.0, _square(0, 0, 0.01))
    with pytest.raises(TilesError, match="not a safe file name"):
        write_tiles_geojson([bad], tmp_path / "t.geojson")
    assert not (tmp_path / "t.geojson").exists()


# --------------------------------------------------------------------------
# regions file errors
# --------------------------------------------------------------------------
GOOD = {"biome": "Tundra", "eco_region": "X"}
BOWTIE = {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ("{\n  \"type\": \"FeatureCollection\",\n  \"features\": [,]\n}", "line 3 column"),
        ({"type": "Feature", "properties": GOOD, "geometry": _square(0, 0)}, "FeatureCollection"),
        (_fc(_feature(GOOD, {"type": "Point", "coordinates": [1, 2]})), "'Point'"),
        (_fc(_feature(GOOD, {"type": "LineString", "coordinates": [[1, 2], [3, 4]]})), "'LineString'"),
        (_fc(_feature(GOOD, None)), "'geometry'"),
        (_fc(_feature(GOOD, {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 0]]]})),
         "at least 4"),
        (_fc(_feature(GOOD, _square(200, 10))), "out of lon/lat range"),
        (_fc(_feature(GOOD, BOWTIE)), "Self-intersection"),
        (_fc(_feature({"eco_region": "X"}, _square(0, 0))), "'biome'"),
        (_fc(_feature({"biome": "Tundra"}, _square(0, 0))), "'eco_region'"),
        (_fc(_feature({"biome": "Jungle", "eco_region": "X"}, _square(0, 0))), "Boreal Forests/Taiga"),
    ],
)
def test_regions_errors(tmp_path: Path, doc: Any, needle: str) -> None:
    path = _write(tmp_path, "my_regions.geojson", doc)
    with pytest.raises(RegionsError) as info:
        load_regions(path)
    msg = str(info.value)
    assert "my_regions.geojson" in msg and needle in msg
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        assert "feature 0" in msg


def test_regions_error_names_ecoregion(tmp_path: Path) -> None:
    path = _write(tmp_path, "r.geojson", _fc(_feature(GOOD, _square(0, 0)),
                                             _feature({"biome": "Tundra", "eco_region": "Y"}, BOWTIE)))
    with pytest.raises(RegionsError, match=r"feature 1 \('Y'\): field 'geometry'"):
        load_regions(path)
    assert load_regions(path, repair=True)[1].geometry.is_valid


def test_regions_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RegionsError, match="nowhere.geojson.*not found"):
        load_regions(tmp_path / "nowhere.geojson")


# --------------------------------------------------------------------------
# ecoregion index
# --------------------------------------------------------------------------
def test_eco_index_default_without_eco_id(default_regions: list[Region]) -> None:
    idx = eco_region_index(default_regions)
    assert sorted(idx.values()) == list(range(10))
    order = sorted(idx, key=idx.get)  # type: ignore[arg-type]
    keys = [(schema.BIOME_INDEX[next(r.biome for r in default_regions if r.eco_region == n)], n)
            for n in order]
    assert keys == sorted(keys)
    assert idx["Arctic coastal tundra"] == 0  # Tundra is biome 0


def test_eco_index_default_with_eco_id(synthetic: list[Region]) -> None:
    regions = [Region(r.eco_region, r.biome, r.geometry, eco_id) for r, eco_id in zip(synthetic, (1, 846, 300))]
    assert eco_region_index(regions) == {"A": 0, "B": 845, "C": 299}
    too_big = [Region("Z", "Tundra", box(0, 0, 1, 1), 847)]
    with pytest.raises(RegionsError, match="ECO_ID 847"):
        eco_region_index(too_big)
    # a missing ECO_ID anywhere falls back to the sorted numbering
    mixed = regions[:2] + [Region("C", "Mangroves", synthetic[2].geometry, None)]
    assert eco_region_index(mixed) == {"A": 0, "B": 1, "C": 2}


def test_eco_index_mapping_file(synthetic: list[Region], tmp_path: Path) -> None:
    path = _write(tmp_path, "eco_labels.json", {"A": 17, "B": 400, "C": 845, "Unused": 3})
    idx = eco_region_index(synthetic, path)
    assert (idx["A"], idx["B"], idx["C"]) == (17, 400, 845)
    tiles = sample_tiles(synthetic, idx, 6, 2)
    assert {t.tile_id.split("_")[0] for t in tiles} == {"017", "400", "845"}


@pytest.mark.parametrize(
    ("mapping", "needle"),
    [
        ({"A": 1, "B": 2}, "'C'"),
        ({"A": 1, "B": 2, "C": 846}, "846"),
        ({"A": 1, "B": "2", "C": 3}, "'B'"),
        ([1, 2, 3], "JSON object"),
    ],
)
def test_eco_index_mapping_errors(synthetic: list[Region], tmp_path: Path, mapping: Any, needle: str) -> None:
    path = _write(tmp_path, "my_eco_labels.json", mapping)
    with pytest.raises(RegionsError) as info:
        eco_region_index(synthetic, path)
    assert "my_eco_labels.json" in str(info.value) and needle in str(info.value)


def test_sample_needs_index_for_every_region(synthetic: list[Region]) -> None:
    with pytest.raises(ValueError, match="'C'"):
        sample_tiles(synthetic, {"A": 0, "B": 1}, 5, 2)
