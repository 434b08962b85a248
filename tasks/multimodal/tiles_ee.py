"""Tiles on Earth Engine: tile centres from ``ee.FeatureCollection.randomPoints``
inside each RESOLVE/ECOREGIONS/2017 polygon, as the original
``create_tiles_polygon.py`` (an alternative to the local-polygon sampler).

* one request lists the ecoregions (name, biome, ECO_ID, geodesic area);
* counts per ecoregion follow the sampling mode (same rules as the local
  sampler, :func:`tasks.multimodal.tiles.allocate_counts`);
* per ecoregion, requests of at most 5000 points, each with a deterministic
  seed from (seed, batch, ecoregion, request number) as the original;
* each centre becomes a square of the tile side in its UTM zone.
Every request holds a slot of the Earth Engine concurrency limit.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from typing import Any

from tasks.common.concurrency import slot
from tasks.multimodal import schema
from tasks.multimodal.sources.earthengine import EarthEngineSource
from tasks.multimodal.tile import Tile
from tasks.multimodal.tiles import Region, _with_squares, allocate_counts

log = logging.getLogger(__name__)

RESOLVE = "RESOLVE/ECOREGIONS/2017"
MAX_POINTS_PER_REQUEST = 5000


def ecoregion_table(source: EarthEngineSource) -> list[dict[str, Any]]:
    """RESOLVE ecoregions that MMEarth samples: name, biome, ECO_ID, geodesic area (m^2)."""
    import ee

    source.initialize()
    fc = (ee.FeatureCollection(RESOLVE)
          .filter(ee.Filter.inList("BIOME_NAME", list(schema.UNSAMPLED_BIOMES)).Not())
          .map(lambda f: f.set("area_m2", f.geometry().area(1000))))
    expr = fc.reduceColumns(ee.Reducer.toList(4), ["ECO_NAME", "BIOME_NAME", "ECO_ID", "area_m2"]).get("list")
    with slot(source.limit_name):
        table = ee.data.computeValue(expr)
    rows: dict[str, dict[str, Any]] = {}
    for name, biome, eco_id, area in table:
        if biome not in schema.BIOME_INDEX:
            raise ValueError(f"{RESOLVE}: ecoregion {name!r} has unknown biome {biome!r}")
        row = rows.setdefault(name, {"eco_region": name, "biome": biome, "eco_id": int(eco_id), "area_m2": 0.0})
        row["area_m2"] += float(area)  # an ecoregion can be several features
    return sorted(rows.values(), key=lambda r: (schema.BIOME_INDEX[r["biome"]], r["eco_region"]))


def counts_for_mode(table: list[dict[str, Any]], n_tiles: int, mode: int) -> dict[str, int]:
    """Tiles per ecoregion (0: biome equal, area within; 1: biome equal, ecoregion equal; 2: ecoregion equal)."""
    if mode == 2:
        return allocate_counts(n_tiles, {r["eco_region"]: 1.0 for r in table})
    biomes: dict[str, list[dict[str, Any]]] = {}
    for r in table:
        biomes.setdefault(r["biome"], []).append(r)
    per_biome = allocate_counts(n_tiles, {b: 1.0 for b in biomes})
    counts: dict[str, int] = {}
    for b, rows in biomes.items():
        w = {r["eco_region"]: (r["area_m2"] if mode == 0 else 1.0) for r in rows}
        counts.update(allocate_counts(per_biome[b], w))
    return counts


def points_seed(seed: int, batch: int, eco_region: str, n: int, loop: int) -> int:
    """Deterministic per-ecoregion seed, as the original (sha256 mod 10^5)."""
    return int(hashlib.sha256(f"{seed}{batch}{eco_region}{n}{loop}".encode()).hexdigest(), 16) % 10**5


def random_points(source: EarthEngineSource, eco_region: str, n: int, seed: int) -> list[tuple[float, float]]:
    """``n`` (<= 5000) random points inside one ecoregion, from Earth Engine."""
    import ee

    region = ee.FeatureCollection(RESOLVE).filter(ee.Filter.eq("ECO_NAME", eco_region))
    pts = ee.FeatureCollection.randomPoints(region, n, seed)
    with slot(source.limit_name):
        coords = ee.data.computeValue(pts.geometry().coordinates())
    if n == 1 and coords and not isinstance(coords[0], list):  # a single point's coordinates
        coords = [coords]
    return [(float(lon), float(lat)) for lon, lat in coords]


def sample_tiles_ee(source: EarthEngineSource, n_tiles: int, mode: int, eco_index: Mapping[str, int] | None = None,
                    tile_size_m: float = 1300.0, seed: int = 0, batch: int = 0) -> tuple[list[Tile], dict[str, int]]:
    """Sample tiles on Earth Engine. Returns (tiles, ecoregion index mapping used)."""
    from tasks.multimodal.tiles import eco_region_index

    table = ecoregion_table(source)
    if eco_index is None:
        regions = [Region(r["eco_region"], r["biome"], None, r["eco_id"]) for r in table]  # type: ignore[arg-type]
        eco_index = eco_region_index(regions)
    counts = counts_for_mode(table, n_tiles, mode)
    tiles: list[Tile] = []
    for r in table:
        name, n = r["eco_region"], counts.get(r["eco_region"], 0)
        if n == 0:
            continue
        if name not in eco_index:
            raise ValueError(f"ecoregion {name!r} has no index in the ecoregion mapping")
        pts: list[tuple[float, float]] = []
        for loop in range(math.ceil(n / MAX_POINTS_PER_REQUEST)):
            k = min(MAX_POINTS_PER_REQUEST, n - len(pts))
            pts.extend(random_points(source, name, k, points_seed(seed, batch, name, k, loop)))
        idx = eco_index[name]
        for j, (lon, lat) in enumerate(pts[:n]):
            tiles.append(Tile(schema.check_tile_id(f"{idx:03d}_{batch}_{j:05d}"), r["biome"], name, lon, lat, {},
                              float(tile_size_m)))
        log.info("ecoregion %s: %d tiles", name, len(pts))
    return _with_squares(tiles), dict(eco_index)
