"""Ecoregions -> sampled tiles -> tiles GeoJSON (plain functions, no Prefect).

The first stage of the multimodal flow (the tiles GeoJSON: one Feature per
tile with a Polygon and properties ``tile_id``, ``biome``, ``eco_region``,
``lat``, ``lon``, ``tile_size_m``; the sampling modes of MMEarth-data's
``create_tiles_polygon.py``; see README.md "The multimodal flow"):

1. :func:`load_regions` reads ecoregion polygons (RESOLVE Ecoregions 2017 or a
   small file of the same shape, e.g. :data:`DEFAULT_REGIONS`).
2. :func:`eco_region_index` fixes the ecoregion-name -> index mapping (0..845).
3. :func:`sample_tiles` draws square tiles in one of the three MMEarth modes.
4. :func:`write_tiles_geojson` / :func:`read_tiles_geojson` store them; the
   reader also validates tiles files written by users. The writer streams
   (one feature per line), and :func:`iter_tiles` reads the flow's own file
   back in chunks, so no stage holds every tile at once.

Every error about an input file is a ``ValueError`` subclass
(:class:`RegionsError`, :class:`TilesError`) whose message names the file, the
feature index (and ecoregion or tile_id where known) and the field, and says
what to do about it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Union

import numpy as np
import shapely
from pyproj import Geod, Transformer
from shapely.geometry import MultiPolygon, Polygon
from shapely.validation import explain_validity

from tasks.common import checks
from tasks.common.atomic import atomic_path
from tasks.multimodal import schema
from tasks.multimodal.tile import Tile

log = logging.getLogger(__name__)

#: The small embedded default: 10 real ecoregions (10 biomes) plus one Rock & Ice.
DEFAULT_REGIONS = Path(__file__).parent / "data" / "regions_default.geojson"
DEFAULT_TILE_SIZE_M = 1300.0
#: what to do about a missing input file: each is optional in the flow's configuration
_OPTIONAL_FILE = "check the path (or omit it to use the default)"

#: Sampling modes of the original MMEarth code.
SAMPLING_MODES: dict[int, str] = {
    0: "equal share per biome; inside a biome, per ecoregion in proportion to its area",
    1: "equal share per biome; equal share per ecoregion inside it",
    2: "equal share per ecoregion",
}

PolygonLike = Union[Polygon, MultiPolygon]

_GEOD = Geod(ellps="WGS84")
# Property names, in order of preference: plain names first, then RESOLVE's.
_ECO_KEYS = ("eco_region", "ECO_NAME")
_BIOME_KEYS = ("biome", "BIOME_NAME")
_ECO_ID_KEYS = ("eco_id", "ECO_ID")
_BIOME_BY_FOLD = {b.casefold(): b for b in schema.BIOMES}
_UNSAMPLED_BY_FOLD = {b.casefold(): b for b in schema.UNSAMPLED_BIOMES}
_MAX_REJECTION_ROUNDS = 200
_MAX_DRAW = 2_000_000


class RegionsError(ValueError):
    """An ecoregion polygon file or an ecoregion-index mapping file is unusable."""


class TilesError(ValueError):
    """A tiles GeoJSON file is unusable."""


class _GeomError(ValueError):
    """Internal: what is wrong with a geometry (the caller adds file/feature)."""


@dataclass(frozen=True)
class Region:
    """One ecoregion: its name, biome name, (Multi)Polygon in EPSG:4326, RESOLVE ECO_ID."""

    eco_region: str
    biome: str
    geometry: PolygonLike
    eco_id: int | None = None


# --------------------------------------------------------------------------
# Shared helpers: file reading, geometry parsing
# --------------------------------------------------------------------------
def _where(path: Path, index: int | None = None, label: str | None = None,
           field: str | None = None) -> str:
    """``file: feature 3 ('name'): field 'x'`` - the location prefix of every error."""
    parts = [str(path)]
    if index is not None:
        parts.append(f"feature {index}" + (f" ({label!r})" if label else ""))
    if field is not None:
        parts.append(f"field {field!r}")
    return ": ".join(parts)


def _features(doc: Any, path: Path, error: type[ValueError]) -> list[Any]:
    """The ``features`` list of a GeoJSON FeatureCollection, or ``error``."""
    if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection":
        found = doc.get("type") if isinstance(doc, dict) else type(doc).__name__
        raise error(
            f"{path}: not a GeoJSON FeatureCollection (top-level type is {found!r}); "
            'wrap the features as {"type": "FeatureCollection", "features": [...]}'
        )
    feats = doc.get("features")
    if not isinstance(feats, list):
        raise error(f"{path}: field 'features' must be a list of GeoJSON features")
    return feats


def _ring(coords: Any, what: str, max_abs_lon: float) -> np.ndarray:
    """Validate one linear ring and return it as an (n, 2) float array."""
    try:
        arr = np.asarray(coords, dtype=float)
    except (TypeError, ValueError):
        raise _GeomError(f"{what} is not a list of [lon, lat] number positions") from None
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise _GeomError(f"{what} is not a list of [lon, lat] number positions")
    arr = arr[:, :2]
    if len(arr) < 4:
        raise _GeomError(
            f"{what} has {len(arr)} positions; a polygon ring needs at least 4 "
            "(3 corners and the first repeated as the last)"
        )
    if not np.isfinite(arr).all():
        raise _GeomError(f"{what} contains NaN or infinite coordinates")
    bad = (np.abs(arr[:, 0]) > max_abs_lon) | (np.abs(arr[:, 1]) > 90.0)
    if bad.any():
        x, y = arr[int(np.argmax(bad))]
        raise _GeomError(
            f"{what} has a position out of lon/lat range: [{x:g}, {y:g}]; coordinates "
            "must be EPSG:4326 longitude, latitude in degrees (reproject the file, check "
            "the axis order)"
        )
    if not np.array_equal(arr[0], arr[-1]):
        raise _GeomError(f"{what} is not closed: its last position must repeat the first")
    return arr


def _polygon(coords: Any, what: str, max_abs_lon: float) -> Polygon:
    if not isinstance(coords, list) or not coords:
        raise _GeomError(f"{what} has no rings; 'coordinates' must be [[[lon, lat], ...], ...]")
    rings = [_ring(r, f"{what} ring {j}", max_abs_lon) for j, r in enumerate(coords)]
    return Polygon(rings[0], rings[1:])


def _parse_geometry(geom: Any, allowed: tuple[str, ...], max_abs_lon: float = 180.0,
                    check_valid: bool = True) -> PolygonLike:
    """GeoJSON geometry dict -> shapely polygon, or :class:`_GeomError` saying why not."""
    if geom is None:
        raise _GeomError("is missing (null); every feature needs a polygon geometry")
    if not isinstance(geom, dict):
        raise _GeomError(f"must be a GeoJSON geometry object, got {type(geom).__name__}")
    gtype = geom.get("type")
    if gtype not in allowed:
        raise _GeomError(
            f"is a {gtype!r}, not a {' or '.join(allowed)}; give the area as a polygon "
            "(e.g. buffer points or lines into polygons first)"
        )
    coords = geom.get("coordinates")
    if gtype == "Polygon":
        shp: PolygonLike = _polygon(coords, "polygon", max_abs_lon)
    else:
        if not isinstance(coords, list) or not coords:
            raise _GeomError("MultiPolygon has no polygons")
        shp = MultiPolygon([_polygon(p, f"polygon {k}", max_abs_lon) for k, p in enumerate(coords)])
    if check_valid and not shp.is_valid:
        raise _GeomError(
            f"is not a valid polygon ({explain_validity(shp)}); fix it, e.g. with "
            "shapely.make_valid or QGIS 'Fix geometries'"
        )
    return shp


def _polygonal_part(geom: Any) -> PolygonLike | None:
    """The polygonal part of a geometry (after make_valid), or None if there is none."""
    polys = [g for g in shapely.get_parts(geom) if isinstance(g, (Polygon, MultiPolygon))]
    if not polys:
        return None
    merged = shapely.union_all(polys)
    return merged if isinstance(merged, (Polygon, MultiPolygon)) and not merged.is_empty else None


def _canonical_biome(name: str) -> str | None:
    """Canonical spelling of a sampled or unsampled biome name (case-insensitive)."""
    key = name.strip().casefold()
    return _BIOME_BY_FOLD.get(key) or _UNSAMPLED_BY_FOLD.get(key)


def _unknown_biome(where: str, name: str) -> str:
    return (
        f"{where}: unknown biome name {name!r}; use one of the RESOLVE 2017 / MMEarth "
        f"biome names: {', '.join(repr(b) for b in schema.BIOMES)} "
        f"(or {', '.join(repr(b) for b in sorted(schema.UNSAMPLED_BIOMES))}, which are not sampled)"
    )


def geodesic_area_m2(geometry: PolygonLike) -> float:
    """Geodesic area on the WGS84 ellipsoid in m^2 (any ring orientation)."""
    oriented = shapely.orient_polygons(geometry, exterior_cw=False)
    return abs(float(_GEOD.geometry_area_perimeter(oriented)[0]))


# --------------------------------------------------------------------------
# 1. Ecoregion polygons
# --------------------------------------------------------------------------
def _prop(props: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str, Any]:
    """(key, value) of the first present, non-null property among ``keys``."""
    for key in keys:
        if props.get(key) is not None:
            return key, props[key]
    return keys[0], None


def _region_feature(feat: Any, i: int, path: Path, repair: bool) -> Region:
    """Validate one ecoregion feature and return it as a :class:`Region`."""
    if not isinstance(feat, dict) or feat.get("type") != "Feature":
        raise RegionsError(f"{_where(path, i)}: not a GeoJSON Feature object")
    props = feat.get("properties")
    if not isinstance(props, dict):
        raise RegionsError(
            f"{_where(path, i, field='properties')}: missing; each feature needs properties "
            f"'eco_region' (or RESOLVE 'ECO_NAME') and 'biome' (or 'BIOME_NAME')"
        )
    key, name = _prop(props, _ECO_KEYS)
    if not isinstance(name, str) or not name.strip():
        raise RegionsError(
            f"{_where(path, i, field='eco_region')}: missing or empty ecoregion name; "
            f"set property 'eco_region' (or RESOLVE 'ECO_NAME') to the ecoregion's name"
        )
    name = name.strip()
    bkey, biome_raw = _prop(props, _BIOME_KEYS)
    if not isinstance(biome_raw, str) or not biome_raw.strip():
        raise RegionsError(
            f"{_where(path, i, name, 'biome')}: missing or empty biome name; set property "
            f"'biome' (or RESOLVE 'BIOME_NAME') to one of: {', '.join(schema.BIOMES)}"
        )
    biome = _canonical_biome(biome_raw)
    if biome is None:
        raise RegionsError(_unknown_biome(_where(path, i, name, bkey), biome_raw))
    ikey, eco_id_raw = _prop(props, _ECO_ID_KEYS)
    eco_id: int | None = None
    if eco_id_raw is not None:
        ok = isinstance(eco_id_raw, (int, float)) and not isinstance(eco_id_raw, bool)
        if not ok or not float(eco_id_raw).is_integer():
            raise RegionsError(f"{_where(path, i, name, ikey)}: must be an integer, got {eco_id_raw!r}")
        eco_id = int(eco_id_raw)
    sampled = biome in schema.BIOMES
    try:
        geom = _parse_geometry(feat.get("geometry"), ("Polygon", "MultiPolygon"),
                               check_valid=sampled and not repair)
    except _GeomError as exc:
        hint = "" if "valid polygon" not in str(exc) else " (or load with repair=True)"
        raise RegionsError(f"{_where(path, i, name, 'geometry')}: {exc}{hint}") from None
    if sampled and repair and not geom.is_valid:
        fixed = _polygonal_part(shapely.make_valid(geom))
        if fixed is None:
            raise RegionsError(
                f"{_where(path, i, name, 'geometry')}: invalid polygon ({explain_validity(geom)}) "
                "has no area left after repair; fix or remove the feature"
            )
        log.warning("%s: repaired invalid polygon (%s)", _where(path, i, name, "geometry"),
                    explain_validity(geom))
        geom = fixed
    return Region(eco_region=name, biome=biome, geometry=geom, eco_id=eco_id)


def _merge(path: Path, parsed: list[tuple[int, Region]]) -> list[Region]:
    """Merge features sharing an ecoregion name (unary_union), keeping first-seen order."""
    groups: dict[str, list[tuple[int, Region]]] = {}
    for i, region in parsed:
        groups.setdefault(region.eco_region, []).append((i, region))
    merged: list[Region] = []
    for name, items in groups.items():
        i0, first = items[0]
        ids = {r.eco_id for _, r in items if r.eco_id is not None}
        for i, r in items[1:]:
            if r.biome != first.biome:
                raise RegionsError(
                    f"{_where(path, i, name, 'biome')}: {r.biome!r} differs from {first.biome!r} "
                    f"of feature {i0} with the same ecoregion name; one ecoregion has one biome"
                )
        if len(ids) > 1:
            raise RegionsError(
                f"{_where(path, items[-1][0], name, 'eco_id')}: features with this ecoregion name "
                f"carry different ECO_IDs {sorted(ids)}; one ecoregion has one id"
            )
        geom = first.geometry if len(items) == 1 else shapely.union_all([r.geometry for _, r in items])
        merged.append(Region(name, first.biome, geom, next(iter(ids)) if ids else None))
    return merged


def load_regions_split(path: str | Path, repair: bool = False) -> tuple[list[Region], list[Region]]:
    """Read an ecoregion FeatureCollection; return ``(sampled, skipped)`` regions.

    Each feature needs a Polygon/MultiPolygon geometry (EPSG:4326) and properties
    ``eco_region``/``biome`` (or RESOLVE's ``ECO_NAME``/``BIOME_NAME``, plus an
    optional integer ``eco_id``/``ECO_ID``). Biome names match case-insensitively
    and are returned in the canonical spelling of :data:`schema.BIOMES`. Features
    with the same ecoregion name are merged (unary_union). Regions whose biome is
    in :data:`schema.UNSAMPLED_BIOMES` ("Rock & Ice", RESOLVE's "N/A") go to
    ``skipped``; their geometry is parsed but not checked for validity.
    ``repair=True`` fixes invalid polygons with ``shapely.make_valid`` (logged)
    instead of raising.

    Raises :class:`RegionsError` naming the file, feature and field.
    """
    path = Path(path)
    doc = checks.read_json(path, "ecoregion polygons", RegionsError, missing=_OPTIONAL_FILE)
    feats = _features(doc, path, RegionsError)
    if not feats:
        raise RegionsError(f"{path}: the FeatureCollection has no features; add ecoregion polygons")
    regions = _merge(path, [(i, _region_feature(f, i, path, repair)) for i, f in enumerate(feats)])
    sampled = [r for r in regions if r.biome in schema.BIOMES]
    skipped = [r for r in regions if r.biome not in schema.BIOMES]
    return sampled, skipped


def load_regions(path: str | Path = DEFAULT_REGIONS, repair: bool = False) -> list[Region]:
    """The sampled regions of an ecoregion file (see :func:`load_regions_split`).

    Skipped (unsampled-biome) regions are logged at INFO; call
    :func:`load_regions_split` to get them as a list.
    """
    sampled, skipped = load_regions_split(path, repair=repair)
    if skipped:
        log.info("%s: skipped %d region(s) of unsampled biomes: %s", path, len(skipped),
                 ", ".join(f"{r.eco_region} ({r.biome})" for r in skipped))
    return sampled


# --------------------------------------------------------------------------
# 2. Ecoregion index
# --------------------------------------------------------------------------
def load_eco_index(path: str | Path) -> dict[str, int]:
    """Read and validate a ``{ecoregion name: index}`` JSON file (MMEarth's eco_labels.json shape)."""
    path = Path(path)
    doc = checks.read_json(path, "ecoregion index mapping", RegionsError, missing=_OPTIONAL_FILE)
    if not isinstance(doc, dict) or not doc:
        raise RegionsError(
            f"{path}: the ecoregion index mapping must be a non-empty JSON object "
            '{"ecoregion name": index, ...}'
        )
    seen: dict[int, str] = {}
    out: dict[str, int] = {}
    for name, idx in doc.items():
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < schema.N_ECOREGIONS:
            raise RegionsError(
                f"{path}: entry {name!r}: index {idx!r} must be an integer in "
                f"[0, {schema.N_ECOREGIONS}); fix the mapping file"
            )
        if idx in seen:
            log.warning("%s: index %d is used by both %r and %r", path, idx, seen[idx], name)
        seen.setdefault(idx, name)
        out[name.strip()] = idx
    return out


def _default_eco_index(regions: Sequence[Region]) -> dict[str, int]:
    names = {r.eco_region for r in regions}
    if regions and all(r.eco_id is not None for r in regions):
        out: dict[str, int] = {}
        owner: dict[int, str] = {}
        for r in regions:
            idx = int(r.eco_id) - 1  # type: ignore[arg-type]
            if not 0 <= idx < schema.N_ECOREGIONS:
                raise RegionsError(
                    f"ecoregion {r.eco_region!r}: ECO_ID {r.eco_id} gives index {idx}, outside "
                    f"[0, {schema.N_ECOREGIONS}); pass an ecoregion index mapping file instead"
                )
            if owner.get(idx, r.eco_region) != r.eco_region:
                raise RegionsError(
                    f"ecoregions {owner[idx]!r} and {r.eco_region!r} share ECO_ID {r.eco_id}; "
                    "pass an ecoregion index mapping file instead"
                )
            owner[idx] = r.eco_region
            out[r.eco_region] = idx
        return out
    if len(names) > schema.N_ECOREGIONS:
        raise RegionsError(
            f"{len(names)} ecoregions do not fit the {schema.N_ECOREGIONS} MMEarth ecoregion labels"
        )
    biome_of = {r.eco_region: r.biome for r in regions}
    order = sorted(names, key=lambda n: (schema.BIOME_INDEX.get(biome_of[n], schema.N_BIOMES), n))
    return {name: i for i, name in enumerate(order)}


def eco_region_index(regions: Sequence[Region], mapping_path: str | Path | None = None) -> dict[str, int]:
    """The ecoregion-name -> index mapping (indices in 0..845).

    * With ``mapping_path``: the ``{name: index}`` JSON file (the shape of
      MMEarth's ``stats/eco_labels.json``), so a user holding MMEarth's mapping
      gets identical indices. Indices must be integers in [0, 846) and every
      ecoregion of ``regions`` must be in the file. The whole file's mapping is
      returned.
    * Default, when every region has a RESOLVE ``ECO_ID``: index = ECO_ID - 1
      (RESOLVE 2017 numbers its ecoregions from 1; an ECO_ID outside 1..846 or
      shared by two names is an error that asks for a mapping file). Note that
      MMEarth's release numbers the ecoregions by its own list, so pass its
      mapping file to reproduce its indices exactly.
    * Default otherwise: the regions sorted by (biome index in
      :data:`schema.BIOMES`, ecoregion name), numbered from 0. This is stable
      for one regions file but differs from MMEarth's own numbering.

    Raises :class:`RegionsError` on a bad file, a missing name or an index out of range.
    """
    if mapping_path is None:
        return _default_eco_index(regions)
    path = Path(mapping_path)
    mapping = load_eco_index(path)
    missing = sorted({r.eco_region for r in regions} - mapping.keys())
    if missing:
        shown = ", ".join(repr(n) for n in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise RegionsError(
            f"{path}: ecoregion index mapping lacks {len(missing)} ecoregion(s) of the regions "
            f"file: {shown}{more}; add them (indices in [0, {schema.N_ECOREGIONS})) or use a "
            "regions file whose ECO_NAMEs match"
        )
    return mapping


# --------------------------------------------------------------------------
# 3. Sampling
# --------------------------------------------------------------------------
def allocate_counts(n: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split ``n`` into integers proportional to ``weights`` (largest remainder).

    Exact rational arithmetic; the counts sum to ``n``; ties in the remainder
    go to the alphabetically first name.
    """
    if not weights:
        return {}
    fw = {k: Fraction(w) for k, w in weights.items()}
    if any(w < 0 for w in fw.values()) or sum(fw.values()) == 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {dict(weights)}")
    total = sum(fw.values())
    quotas = {k: n * w / total for k, w in fw.items()}
    counts = {k: math.floor(q) for k, q in quotas.items()}
    left = n - sum(counts.values())
    for k in sorted(quotas, key=lambda k: (-(quotas[k] - counts[k]), k))[:left]:
        counts[k] += 1
    return counts


def tile_counts(regions: Sequence[Region], n_tiles: int, mode: int) -> dict[str, int]:
    """Tiles per ecoregion name for a sampling mode (see :data:`SAMPLING_MODES`)."""
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sampling mode {mode!r} must be one of {sorted(SAMPLING_MODES)}: {SAMPLING_MODES}")
    if mode == 2:
        return allocate_counts(n_tiles, {r.eco_region: 1 for r in regions})
    by_biome: dict[str, list[Region]] = {}
    for r in regions:
        by_biome.setdefault(r.biome, []).append(r)
    per_biome = allocate_counts(n_tiles, {b: 1 for b in by_biome})
    counts: dict[str, int] = {}
    for biome, regs in by_biome.items():
        weights = {r.eco_region: geodesic_area_m2(r.geometry) if mode == 0 else 1.0 for r in regs}
        counts.update(allocate_counts(per_biome[biome], weights))
    return counts


def region_rng(seed: int, batch: int, eco_region: str) -> np.random.Generator:
    """numpy Generator seeded stably (sha256) from (seed, batch, ecoregion name)."""
    digest = hashlib.sha256(f"{seed}\x1f{batch}\x1f{eco_region}".encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "big"))


def _points_in_polygon(poly: Polygon, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniform by area (on the sphere) inside ``poly``: (n, 2) lon, lat."""
    minx, miny, maxx, maxy = poly.bounds
    s0, s1 = math.sin(math.radians(miny)), math.sin(math.radians(maxy))
    shapely.prepare(poly)
    fill = max(poly.area / max((maxx - minx) * (maxy - miny), 1e-300), 1e-4)
    found: list[np.ndarray] = []
    have = 0
    for _ in range(_MAX_REJECTION_ROUNDS):
        draw = int(min(_MAX_DRAW, max(64, 1.5 * (n - have) / fill)))
        lon = rng.uniform(minx, maxx, draw)
        lat = np.degrees(np.arcsin(np.clip(rng.uniform(s0, s1, draw), -1.0, 1.0)))
        inside = shapely.contains_xy(poly, lon, lat)
        found.append(np.column_stack([lon[inside], lat[inside]]))
        have += int(inside.sum())
        if have >= n:
            return np.concatenate(found)[:n]
    raise ValueError(f"could not place {n} points inside a polygon with bounds {poly.bounds}")


def sample_points(geometry: PolygonLike, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random points inside a (Multi)Polygon, uniform by geodesic area: (n, 2) lon, lat.

    Parts of a MultiPolygon get a multinomial share by geodesic area; inside a
    part, rejection sampling in its bounding box (equal-area in latitude,
    vectorised with ``shapely.contains_xy``).
    """
    parts = list(geometry.geoms) if isinstance(geometry, MultiPolygon) else [geometry]
    if n <= 0:
        return np.empty((0, 2))
    if len(parts) == 1:
        return _points_in_polygon(parts[0], n, rng)
    areas = np.array([geodesic_area_m2(p) for p in parts])
    shares = rng.multinomial(n, areas / areas.sum())
    chunks = [_points_in_polygon(p, int(k), rng) for p, k in zip(parts, shares) if k > 0]
    return np.concatenate(chunks)


def _transformer(crs: str, inverse: bool) -> Transformer:
    src, dst = ("EPSG:4326", crs) if not inverse else (crs, "EPSG:4326")
    return Transformer.from_crs(src, dst, always_xy=True)


def square_rings(lon: np.ndarray, lat: np.ndarray, size_m: float, crs: str) -> np.ndarray:
    """Squares of side ``size_m`` centred on the points, axis-aligned in ``crs``.

    Returns (n, 5, 2) closed, counter-clockwise lon/lat rings. A ring crossing
    the antimeridian keeps continuous longitudes (beyond +-180 on one side).
    """
    x, y = _transformer(crs, inverse=False).transform(np.asarray(lon), np.asarray(lat))
    h = size_m / 2.0
    dx = np.array([-h, h, h, -h, -h])
    dy = np.array([-h, -h, h, h, -h])
    cx = np.asarray(x)[:, None] + dx
    cy = np.asarray(y)[:, None] + dy
    rlon, rlat = _transformer(crs, inverse=True).transform(cx.ravel(), cy.ravel())
    rlon = np.asarray(rlon).reshape(cx.shape)
    rlat = np.asarray(rlat).reshape(cx.shape)
    centre = np.asarray(lon)[:, None]
    rlon = np.where(rlon - centre > 180.0, rlon - 360.0, rlon)
    rlon = np.where(rlon - centre < -180.0, rlon + 360.0, rlon)
    return np.stack([rlon, rlat], axis=-1)


def _ring_geojson(ring: np.ndarray) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": [[[round(float(x), 8), round(float(y), 8)] for x, y in ring]]}


def _check_sampling_args(regions: Sequence[Region], eco_index: Mapping[str, int], n_tiles: int,
                         tile_size_m: float, batch: int) -> None:
    if isinstance(n_tiles, bool) or not isinstance(n_tiles, int) or n_tiles < 0:
        raise ValueError(f"n_tiles must be an integer >= 0, got {n_tiles!r}")
    if n_tiles and not regions:
        raise ValueError("no regions to sample from (all skipped or an empty regions file)")
    if not (isinstance(tile_size_m, (int, float)) and math.isfinite(tile_size_m) and tile_size_m > 0):
        raise ValueError(f"tile_size_m must be a positive number of metres, got {tile_size_m!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be an integer >= 0, got {batch!r}")
    names = [r.eco_region for r in regions]
    if len(set(names)) != len(names):
        raise ValueError("regions contain duplicate ecoregion names; merge them first (load_regions does)")
    for r in regions:
        if r.biome not in schema.BIOMES:
            raise ValueError(_unknown_biome(f"region {r.eco_region!r}", r.biome))
        idx = eco_index.get(r.eco_region)
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < schema.N_ECOREGIONS:
            raise ValueError(
                f"region {r.eco_region!r}: eco_index gives {idx!r}; need an integer in "
                f"[0, {schema.N_ECOREGIONS}) for every region (see eco_region_index)"
            )


def sample_tiles(regions: Sequence[Region], eco_index: Mapping[str, int], n_tiles: int, mode: int,
                 tile_size_m: float = DEFAULT_TILE_SIZE_M, seed: int = 0, batch: int = 0) -> list[Tile]:
    """Draw ``n_tiles`` square tiles over the regions in sampling ``mode`` (0, 1 or 2).

    Counts per ecoregion come from :func:`tile_counts` (largest remainder, exact
    sum). Centres are uniform inside each ecoregion (the centre is inside; the
    square may overhang the border), drawn from :func:`region_rng` so the same
    (seed, batch, ecoregion) always gives the same points. Each centre becomes a
    square of side ``tile_size_m`` built in its UTM zone (``Tile.utm_crs``).
    Tile ids are ``f"{eco_index:03d}_{batch}_{k:05d}"`` with k counting within
    the ecoregion; tiles are ordered by (eco index, name, k).
    """
    return [t for chunk in iter_sample_tiles(regions, eco_index, n_tiles, mode, tile_size_m, seed, batch)
            for t in chunk]


def iter_sample_tiles(regions: Sequence[Region], eco_index: Mapping[str, int], n_tiles: int, mode: int,
                      tile_size_m: float = DEFAULT_TILE_SIZE_M, seed: int = 0, batch: int = 0,
                      chunk: int = 20000) -> Iterator[list[Tile]]:
    """:func:`sample_tiles` as chunks of at most ``chunk`` tiles (one ecoregion at a time),
    so a large sample is written without holding every tile."""
    _check_sampling_args(regions, eco_index, n_tiles, tile_size_m, batch)
    counts = tile_counts(regions, n_tiles, mode) if n_tiles else {}
    used = [eco_index[r.eco_region] for r in regions if counts.get(r.eco_region, 0)]
    if len(set(used)) != len(used):
        raise ValueError("eco_index maps several sampled ecoregions to one index, so tile ids collide")
    for region in sorted(regions, key=lambda r: (eco_index[r.eco_region], r.eco_region)):
        n = counts.get(region.eco_region, 0)
        if n == 0:
            continue
        pts = sample_points(region.geometry, n, region_rng(seed, batch, region.eco_region))
        idx = eco_index[region.eco_region]
        for s0 in range(0, n, chunk):
            tiles = [Tile(schema.check_tile_id(f"{idx:03d}_{batch}_{k:05d}"), region.biome, region.eco_region,
                          float(lon), float(lat), {}, float(tile_size_m))
                     for k, (lon, lat) in enumerate(pts[s0:s0 + chunk], start=s0)]
            yield _with_squares(tiles)


def _with_squares(tiles: list[Tile]) -> list[Tile]:
    """Fill each tile's geometry with its square, transforming per UTM zone at once."""
    by_crs: dict[tuple[str, float], list[int]] = {}
    for i, t in enumerate(tiles):
        by_crs.setdefault((t.utm_crs, t.tile_size_m), []).append(i)
    out = list(tiles)
    for (crs, size), idxs in by_crs.items():
        lon = np.array([tiles[i].lon for i in idxs])
        lat = np.array([tiles[i].lat for i in idxs])
        for i, ring in zip(idxs, square_rings(lon, lat, size, crs)):
            out[i] = dataclasses.replace(tiles[i], geometry=_ring_geojson(ring))
    return out


# --------------------------------------------------------------------------
# 4. Tiles GeoJSON
# --------------------------------------------------------------------------
def _tile_feature_dict(t: Tile) -> dict[str, Any]:
    return {
        "type": "Feature",
        "properties": {
            "tile_id": t.tile_id, "biome": t.biome, "eco_region": t.eco_region,
            "lat": t.lat, "lon": t.lon, "tile_size_m": t.tile_size_m,
        },
        "geometry": t.geometry,
    }


def tiles_feature_collection(tiles: Iterable[Tile]) -> dict[str, Any]:
    """The tiles GeoJSON document (a FeatureCollection, one Polygon Feature per tile)."""
    return {"type": "FeatureCollection", "features": [_tile_feature_dict(t) for t in tiles]}


#: First line of a tiles GeoJSON written by :func:`write_tiles_geojson` (one feature a line follows).
_STREAM_HEADER = '{"type": "FeatureCollection", "features": ['


def write_tiles_geojson(tiles: Iterable[Tile], path: str | Path) -> Path:
    """Write tiles as a GeoJSON FeatureCollection, atomically; return the path."""
    write_tiles_stream(tiles, path)
    return Path(path)


def write_tiles_stream(tiles: Iterable[Tile] | Iterable[list[Tile]], path: str | Path) -> int:
    """Write tiles (or chunks of tiles, as :func:`iter_sample_tiles` yields) as a GeoJSON
    FeatureCollection, streamed one feature a line, atomically. Returns the number of
    tiles. Raises :class:`TilesError` for a bad or duplicate tile_id (nothing is written)."""
    path = Path(path)
    seen: set[str] = set()
    n = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(_STREAM_HEADER)
            for item in tiles:
                for t in (item if isinstance(item, list) else [item]):
                    try:
                        schema.check_tile_id(t.tile_id, where=str(path))
                    except ValueError as exc:
                        raise TilesError(str(exc)) from None
                    if t.tile_id in seen:
                        raise TilesError(f"{path}: duplicate tile_id {t.tile_id!r}; tile ids must be unique")
                    seen.add(t.tile_id)
                    fh.write(("\n" if n == 0 else ",\n") + json.dumps(_tile_feature_dict(t)))
                    n += 1
            fh.write("\n]}\n")
            fh.flush()
            os.fsync(fh.fileno())
    return n


def iter_tiles(path: str | Path, chunk: int = 5000) -> Iterator[list[Tile]]:
    """The tiles of a tiles GeoJSON in file order, in lists of at most ``chunk``.

    A file written by :func:`write_tiles_geojson` (the flow's own
    ``NAME_tiles.geojson``) is read a line at a time, so memory holds one chunk;
    any other file is read and validated whole by :func:`read_tiles_geojson`."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        if fh.readline().rstrip("\n") != _STREAM_HEADER:
            streamed = False
        else:
            streamed = True
            out: list[Tile] = []
            for lineno, line in enumerate(fh, start=2):
                line = line.rstrip().rstrip(",")
                if not line or line == "]}":
                    continue
                try:
                    f = json.loads(line)
                    p = f["properties"]
                    out.append(Tile(p["tile_id"], p["biome"], p["eco_region"], float(p["lon"]), float(p["lat"]),
                                    f["geometry"], float(p["tile_size_m"])))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    raise TilesError(f"{path}: line {lineno}: not a tile feature as this flow writes it "
                                     f"({type(exc).__name__}: {exc}); delete the file so the tiles are "
                                     "selected again") from None
                if len(out) >= chunk:
                    yield out
                    out = []
            if out:
                yield out
    if not streamed:
        tiles = read_tiles_geojson(path)
        for i in range(0, len(tiles), chunk):
            yield tiles[i:i + chunk]


def _number(props: Mapping[str, Any], key: str, where: str, lo: float, hi: float) -> float | None:
    value = props.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise TilesError(f"{where}: field {key!r}: {value!r} must be a number in [{lo:g}, {hi:g}]")
    return float(value)


def _text(props: Mapping[str, Any], key: str, where: str) -> str:
    value = props.get(key)
    if not isinstance(value, str) or not value.strip():
        raise TilesError(f"{where}: field {key!r}: missing or empty; every tile needs a {key} name")
    return value.strip()


def _tile_feature(feat: Any, i: int, path: Path) -> Tile:
    """Validate one tiles-GeoJSON feature and return it as a :class:`Tile`."""
    if not isinstance(feat, dict) or feat.get("type") != "Feature":
        raise TilesError(f"{_where(path, i)}: not a GeoJSON Feature object")
    props = feat.get("properties")
    if not isinstance(props, dict):
        raise TilesError(f"{_where(path, i, field='properties')}: missing; need tile_id, biome, eco_region")
    if props.get("tile_id") is None:
        raise TilesError(f"{_where(path, i, field='tile_id')}: missing; give every tile a unique tile_id")
    try:
        tile_id = schema.check_tile_id(props["tile_id"], where=_where(path, i, field="tile_id"))
    except ValueError as exc:
        raise TilesError(str(exc)) from None
    where = _where(path, i, tile_id)
    biome_raw = _text(props, "biome", where)
    biome = _BIOME_BY_FOLD.get(biome_raw.casefold())
    if biome is None:
        raise TilesError(_unknown_biome(f"{where}: field 'biome'", biome_raw))
    eco_region = _text(props, "eco_region", where)
    try:
        poly = _parse_geometry(feat.get("geometry"), ("Polygon",), max_abs_lon=360.0)
    except _GeomError as exc:
        raise TilesError(f"{where}: field 'geometry': {exc}") from None
    poly = unwrap_antimeridian(poly)
    lat = _number(props, "lat", where, -90.0, 90.0)
    lon = _number(props, "lon", where, -360.0, 360.0)
    if (lat is None) != (lon is None):
        raise TilesError(f"{where}: field {'lat' if lat is None else 'lon'!r}: give both lat and lon, or neither")
    if lat is None or lon is None:
        lon, lat = poly.centroid.x, poly.centroid.y
    elif min(poly.distance(shapely.Point(lon + k, lat)) for k in (-360.0, 0.0, 360.0)) > 1e-6:
        raise TilesError(
            f"{where}: field 'lat'/'lon': ({lat:g}, {lon:g}) lies outside the tile polygon; "
            "are lat and lon swapped?"
        )
    lon = wrap_lon(lon)
    size = _number(props, "tile_size_m", where, 1e-9, 1e7)
    if size is None:
        size = round(math.sqrt(geodesic_area_m2(poly)) / 10.0) * 10.0
        if size <= 0:
            raise TilesError(f"{where}: field 'tile_size_m': missing, and the polygon is too small to estimate it")
    geometry = {"type": "Polygon",
                "coordinates": [[[float(x), float(y)] for x, y in ring.coords]
                                for ring in [poly.exterior, *poly.interiors]]}
    return Tile(tile_id, biome, eco_region, float(lon), float(lat), geometry, float(size))


def wrap_lon(lon: float) -> float:
    """Longitude in [-180, 180) (one inside it is returned as it is, bit for bit)."""
    lon = float(lon)
    return lon if -180.0 <= lon < 180.0 else (lon + 180.0) % 360.0 - 180.0


def _unwrap_ring(ring: np.ndarray, ref: float) -> np.ndarray:
    """The ring with every step between consecutive vertices taken the short way round
    (|step| <= 180 degrees), placed by whole turns next to longitude ``ref``."""
    lon = ring[:, 0]
    steps = (np.diff(lon) + 180.0) % 360.0 - 180.0
    out = np.concatenate([[lon[0]], lon[0] + np.cumsum(steps)])
    out += 360.0 * np.round((ref - out[0]) / 360.0)
    return np.column_stack([out, ring[:, 1]])


def unwrap_antimeridian(poly: Polygon) -> Polygon:
    """A tile polygon written across the antimeridian with a jump of its longitudes
    (179.99 ... -179.99, as RFC 7946 writers do) is, read as planar coordinates, a band
    round the whole globe whose centroid lies near longitude 0. Tiles are small, so a
    step of more than 180 degrees between consecutive vertices can only be such a
    crossing: the rings are made continuous (longitudes beyond +-180 on one side, as
    :func:`square_rings` writes them) with the centroid in [-180, 180). Other polygons
    are returned unchanged."""
    ext = np.asarray(poly.exterior.coords)[:, :2]
    rings = [ext] + [np.asarray(r.coords)[:, :2] for r in poly.interiors]
    if not any((np.abs(np.diff(r[:, 0])) > 180.0).any() for r in rings):
        return poly
    ext = _unwrap_ring(ext, ext[0, 0])
    holes = [_unwrap_ring(r, float(np.mean(ext[:, 0]))) for r in rings[1:]]
    out = Polygon(ext, holes)
    shift = wrap_lon(out.centroid.x) - out.centroid.x
    if shift:
        out = Polygon(ext + [shift, 0.0], [h + [shift, 0.0] for h in holes])
    return out


def read_tiles_geojson(path: str | Path) -> list[Tile]:
    """Read and validate a tiles GeoJSON (ours or a user's); return its tiles in file order.

    Each feature needs a Polygon and properties ``tile_id`` (unique, a safe file
    name), ``biome`` (one of :data:`schema.BIOMES`) and ``eco_region``.
    Optional ``lat``/``lon`` default to the polygon centroid; an absent
    ``tile_size_m`` is estimated as the square root of the geodesic area,
    rounded to 10 m. Raises :class:`TilesError` naming the file, the feature
    index, the tile_id and the field.
    """
    path = Path(path)
    feats = _features(checks.read_json(path, "tiles GeoJSON", TilesError, missing=_OPTIONAL_FILE), path, TilesError)
    tiles: list[Tile] = []
    first: dict[str, int] = {}
    for i, feat in enumerate(feats):
        tile = _tile_feature(feat, i, path)
        if tile.tile_id in first:
            raise TilesError(
                f"{_where(path, i, tile.tile_id, 'tile_id')}: duplicate of feature "
                f"{first[tile.tile_id]}; tile ids must be unique"
            )
        first[tile.tile_id] = i
        tiles.append(tile)
    return tiles
