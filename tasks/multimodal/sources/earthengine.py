"""Google Earth Engine source: the per-tile selection of the original MMEarth
download (``ee_utils/ee_data.py`` of MMEarth-data), in two API requests per tile.

Request 1, ``computeValue``: one dictionary with everything the tile needs to
know (number of candidate Sentinel-2 images, the chosen one, its product,
date, CRS and grid origin, its bands, the Sentinel-1 image per orbit pass,
Dynamic World availability, the ERA5 band names and values). Request 2,
``computePixels``: the whole stack (every modality resampled to the
Sentinel-2 grid at 10 m) on an explicit grid, as NPY bytes. The original
needed about 20 sequential round trips.

Per-tile choices, exactly as the original:

* Python's ``random`` seeded with ``int(sha256(f"{lat}_{lon}")) % 10**5``,
  ``lat``/``lon`` the tile's geodesic centroid (see :func:`seed_lat_lon`),
  then, in this order, ``randint(2017, 2020)`` (the year), ``randint(0, 1)``
  (0: L2A, 1: L1C) and ``randint(0, n - 1)`` (the image), ``n`` being the
  number of candidates the server finds. ``n`` is known only on the server,
  so the client computes ``randint(0, n - 1)`` for every ``n`` up to
  :data:`INDEX_TABLE_SIZE` (from the generator state after the first two
  draws) and the expression picks entry ``n - 1`` of it (sent as one string). When the
  server reports more candidates than the table holds, the metadata request is
  sent once more with a table long enough for that ``n`` (a third request for
  that tile only; logged), so the pick is still the original's.
* Sentinel-2: year windows 2017 and 2020: Jan 1 - Dec 31, 2018: Jan 1 - Nov
  30, 2019: Dec 1 2018 - Dec 31 2019, each ``filterDate(start, end)`` with
  ``end`` exclusive as written (so Dec 31 / Nov 30 themselves are left out);
  ``filterBounds``; CLOUDY_PIXEL_PERCENTAGE < 10; L2A
  (COPERNICUS/S2_SR_HARMONIZED) falls back to L1C (COPERNICUS/S2_HARMONIZED)
  when its filtered collection is empty (before the containment filter);
  the image must contain the tile buffered by 200 m. Its B4 projection gives
  the CRS. Bands as the original's config; an L2A image without
  MSK_CLDPRB is kept without it; any other missing band is a per-tile error
  (:class:`NoDataError`), never a shorter stack.
* Sentinel-1 (COPERNICUS/S1_GRD, IW), 2017-01-01 to 2020-12-31 (exclusive),
  images containing the tile buffered by 200 m; per orbit pass the image
  closest in time to midnight UTC of the S2 day; every band except ``angle``.
* ERA5-Land monthly aggregates: the previous and the current month
  (``toBands`` of the images from the 1st of the previous month to the last
  day of the current one, exclusive), and the "year": from the 1st of the
  same month one year earlier to the last day of the current month
  (exclusive), i.e. 13 monthly images, the original's quirk (default;
  ``era5_year_months=12`` gives a calendar year, recorded in tile_info
  ``ERA5_YEAR_MONTHS``), reduced per band (mean of temperature_2m, min of
  temperature_2m_min, max of temperature_2m_max, sum of
  total_precipitation_sum); mean over the tile at 10 m. tile_info
  ``BANDS.era5`` holds the twelve band names Earth Engine gives these.
* Dynamic World: mode of ``label`` + 1 over the S2 year (Jan 1 - Dec 31,
  exclusive). ASTER GDEM ``b1`` and its slope, ETH canopy height and SD,
  ESA WorldCover ``Map``; continuous bands bilinear, SCL/QA60/labels nearest.

Every branch of the metadata expression is valid whichever the server
evaluates (an empty candidate list picks a placeholder image, empty Sentinel-1
lists give empty lists), so correctness never depends on
``ee.Algorithms.If`` skipping a branch.

Requests and retries: the client's own retries are switched off
(``ee.data.setMaxRetries(0)``), so one attempt is one HTTP request; every
request holds a slot of the Prefect global concurrency limit for its whole
duration. Only outcomes known to be permanent raise :class:`NoDataError`
(no Sentinel-2 image, a missing band, an invalid tile geometry, an ecoregion
without index); every other failure, known transient or unknown, raises
:class:`TransientSourceError` and is retried.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import io
import json
import logging
import math
import os
import random
import re
import socket
import threading
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import requests
from affine import Affine
from pyproj import Transformer

# ``ee`` (and google.oauth2, httplib2, which come with it) is imported inside the functions
# that call Earth Engine: importing it takes about 3 s (measured: ``import ee`` 2.9 s,
# google.oauth2.service_account 0.5 s, httplib2 0.6 s on the 2-core development machine), which
# the STAC source's workers (they use this module's selection rules) and the tile sampler's
# other modes would pay without using it.
from tasks.common.concurrency import slot
from tasks.multimodal import schema
from tasks.multimodal.sources.base import (Grid, NoDataError, Source, Tile, TileStack, TransientSourceError,
                                           pooled_session, request_slot)

log = logging.getLogger(__name__)

S2_L2A = "COPERNICUS/S2_SR_HARMONIZED"
S2_L1C = "COPERNICUS/S2_HARMONIZED"
S1_GRD = "COPERNICUS/S1_GRD"
ASTER = "projects/sat-io/open-datasets/ASTER/GDEM"
ERA5_MONTHLY = "ECMWF/ERA5_LAND/MONTHLY_AGGR"
DYNAMIC_WORLD = "GOOGLE/DYNAMICWORLD/V1"
CANOPY_HEIGHT = "users/nlang/ETH_GlobalCanopyHeight_2020_10m_v1"
CANOPY_HEIGHT_SD = "users/nlang/ETH_GlobalCanopyHeightSD_2020_10m_v1"
WORLDCOVER = "ESA/WorldCover/v100"
CLOUD_THRESHOLD = 10
S2_BUFFER_M = 200
S1_BUFFER_M = 200
S1_START, S1_END = "2017-01-01", "2020-12-31"  # the original's general period, end exclusive as written
#: The original's names of the ASTER bands (tile_info BANDS.aster): the asset's ``b1`` and its slope.
ASTER_BANDS_EE: tuple[str, str] = ("b1", "slope")
#: ERA5 bands reduced for the "year" values, with the original's reducer per band (by name).
ERA5_YEAR_REDUCERS: tuple[tuple[str, str], ...] = (
    ("temperature_2m", "mean"), ("temperature_2m_min", "min"), ("temperature_2m_max", "max"),
    ("total_precipitation_sum", "sum"),
)
#: randint(0, n - 1) is precomputed for n = 1..INDEX_TABLE_SIZE (see module doc).
INDEX_TABLE_SIZE = 1024
#: How close (degrees) a tile's lat/lon must be to its geodesic centroid to be taken as
#: Earth Engine's centroid (lat/lon copied from an original tile_info) for the seed.
SEED_LATLON_TOLERANCE_DEG = 1e-8
#: pixels EE returns for masked data (unmasked with this, turned into NaN here)
MASK_VALUE = -3.0e38

EE_LIMIT_NAME = "earthengine-requests"
#: Google's endpoint for automated, parallel requests (``ee.data.HIGH_VOLUME_API_BASE_URL``), used
#: unless ``source_options.url`` names another (a private deployment, the tests' fake).
HIGH_VOLUME_URL = "https://earthengine-highvolume.googleapis.com"
#: Google's own endpoints: the client may fetch Google's deprecated-asset catalogue for them.
GOOGLE_URLS = (HIGH_VOLUME_URL, "https://earthengine.googleapis.com")

_TRANSIENT_PATTERNS = (
    "too many concurrent", "rate limit", "quota", "resource_exhausted", "resource exhausted",
    "internal error", "service is currently unavailable", "unavailable", "backend error",
    "deadline", "timed out", "timeout", "connection", "429", "500", "502", "503", "504",
)
#: Earth Engine messages known to be permanent for the tile (its geometry is unusable).
_PERMANENT_PATTERNS = (
    ("linearring requires at least", "invalid tile geometry"),
    ("invalid geojson geometry", "invalid tile geometry"),
    ("geometry has no vertices", "invalid tile geometry"),
    ("polygon has no interior", "invalid tile geometry"),
    ("self-intersect", "invalid tile geometry"),
    ("invalid polygon", "invalid tile geometry"),
)


def is_transient(exc: BaseException) -> bool:
    """Whether an exception from the EE client is a known transient failure (429, 5xx,
    timeouts, dropped connections). Unknown errors are not "transient" here but are
    retried as well: see :func:`permanent_reason`."""
    if isinstance(exc, (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException)):
        return True
    try:
        import httplib2  # the ee client's transport (lazy, as ee: see the imports)

        if isinstance(exc, httplib2.HttpLib2Error):
            return True
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return True
    msg = str(exc).lower()
    return any(p in msg for p in _TRANSIENT_PATTERNS)


#: messages of Earth Engine's 429 answers (too many concurrent requests, request rate, quota)
_RATE_LIMIT_PATTERNS = ("too many concurrent", "too many requests", "rate limit", "quota exceeded",
                        "resource_exhausted", "resource exhausted", "429")


def is_rate_limited(exc: BaseException) -> bool:
    """Whether an error is Earth Engine's "429 Too many requests" (counted and reported)."""
    msg = str(exc).lower()
    return any(p in msg for p in _RATE_LIMIT_PATTERNS)


#: per tile: the 429 answers its requests met in this process, until the tile's outcome takes them
_rate_limited: dict[str, int] = {}
_rate_limited_lock = threading.Lock()


def permanent_reason(exc: BaseException) -> str | None:
    """The reason when an error is known to be permanent for the tile, else None (retry).

    Only errors known to be permanent may make a tile NO_DATA (never fetched
    again); anything else, e.g. the CPython "AST constructor recursion depth
    mismatch" race, is retried."""
    if is_transient(exc):
        return None
    msg = str(exc).lower()
    for pattern, reason in _PERMANENT_PATTERNS:
        if pattern in msg:
            return reason
    return None


# --------------------------------------------------------------------------
# Per-tile random choices (seeded like the original)
# --------------------------------------------------------------------------
def _unit_vectors(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    lo, la = np.radians(lon), np.radians(lat)
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1)


def _true_centroid(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Area-weighted centroid vector of the spherical triangle abc (S2's TrueCentroid)."""
    def angle(u, v):
        return math.atan2(float(np.linalg.norm(np.cross(u, v))), float(np.dot(u, v)))

    ra, rb, rc = (1.0 if t == 0 else t / math.sin(t) for t in (angle(b, c), angle(c, a), angle(a, b)))
    x = np.array([a[0], b[0] - a[0], c[0] - a[0]])
    y = np.array([a[1], b[1] - a[1], c[1] - a[1]])
    z = np.array([a[2], b[2] - a[2], c[2] - a[2]])
    r = np.array([ra, rb - ra, rc - ra])
    return 0.5 * np.array([np.dot(np.cross(y, z), r), np.dot(np.cross(z, x), r), np.dot(np.cross(x, y), r)])


def geodesic_centroid(geometry: dict[str, Any]) -> tuple[float, float]:
    """(lon, lat) of a GeoJSON Polygon's centroid on the sphere (edges are great-circle
    arcs, as Earth Engine's geodesic geometries), the sum of the true centroids of a
    triangle fan of each ring (holes subtract), normalised."""
    total = np.zeros(3)
    for k, ring in enumerate(geometry["coordinates"]):
        pts = np.asarray(ring, dtype=np.float64)
        if len(pts) > 1 and np.array_equal(pts[0], pts[-1]):
            pts = pts[:-1]
        v = _unit_vectors(pts[:, 0], pts[:, 1])
        part = np.zeros(3)
        for i in range(1, len(v) - 1):
            part += _true_centroid(v[0], v[i], v[i + 1])
        total += part if k == 0 else -part
    x, y, z = total
    return math.degrees(math.atan2(y, x)), math.degrees(math.atan2(z, math.hypot(x, y)))


def seed_lat_lon(tile: Tile) -> tuple[float, float]:
    """The (lat, lon) the original seeds a tile with: Earth Engine's geodesic centroid.

    When the tile's own lat/lon agree with the geodesic centroid within
    :data:`SEED_LATLON_TOLERANCE_DEG` they are taken as Earth Engine's exact floats
    (lat/lon copied from an original tile_info into the tiles GeoJSON: the seed
    string needs every digit); otherwise the centroid computed here, which agrees
    with Earth Engine's to about 1e-12 degrees but may differ in the last digits of
    the seed string (see the README's Earth Engine section)."""
    lon, lat = geodesic_centroid(tile.geometry)
    if abs(tile.lat - lat) <= SEED_LATLON_TOLERANCE_DEG and abs(tile.lon - lon) <= SEED_LATLON_TOLERANCE_DEG:
        return tile.lat, tile.lon
    return lat, lon


def tile_seed(lat: float, lon: float) -> int:
    """The original's per-tile seed: sha256 of "lat_lon" modulo 10^5."""
    return int(hashlib.sha256(f"{lat}_{lon}".encode()).hexdigest(), 16) % 10**5


def s2_window(year: int) -> tuple[str, str]:
    """The original's Sentinel-2 ``filterDate(start, end)`` window of a year (end exclusive)."""
    if year == 2018:
        return "2018-01-01", "2018-11-30"
    if year == 2019:
        return "2018-12-01", "2019-12-31"
    return f"{year}-01-01", f"{year}-12-31"


def index_table(rng: random.Random, size: int) -> tuple[int, ...]:
    """``randint(0, n - 1)`` for n = 1..size, each as if drawn from ``rng``'s current state.

    CPython's ``randint(0, n - 1)`` is ``_randbelow(n)``: ``getrandbits(k)`` with
    ``k = n.bit_length()`` until a value below ``n``. All ``n`` of one bit length
    read the same stream of ``getrandbits(k)`` values, so each stream is drawn once
    (``rng`` is left unchanged)."""
    state = rng.getstate()
    out = [0] * size
    try:
        for k in range(1, size.bit_length() + 1):
            rng.setstate(state)
            draws: list[int] = []
            for n in range(1 << (k - 1), min(1 << k, size + 1)):
                pick = next((d for d in draws if d < n), None)
                while pick is None:
                    d = rng.getrandbits(k)
                    draws.append(d)
                    if d < n:
                        pick = d
                out[n - 1] = pick
    finally:
        rng.setstate(state)
    return tuple(out)


@dataclass(frozen=True)
class Choices:
    year: int
    start: str
    end: str
    prefer: str  # "l2a" or "l1c"
    table: tuple[int, ...]  # table[n - 1] = randint(0, n - 1) after the year and product draws
    lat: float  # the seed's centroid
    lon: float

    def index(self, n: int) -> int:
        return self.table[n - 1]


def choose(tile: Tile, table_size: int = INDEX_TABLE_SIZE) -> Choices:
    """The original's draws for a tile: year, product, then the image index for any n."""
    lat, lon = seed_lat_lon(tile)
    rng = random.Random(tile_seed(lat, lon))
    year = rng.randint(2017, 2020)
    start, end = s2_window(year)
    prefer = "l2a" if rng.randint(0, 1) == 0 else "l1c"
    return Choices(year=year, start=start, end=end, prefer=prefer, table=index_table(rng, table_size),
                   lat=lat, lon=lon)


# --------------------------------------------------------------------------
# Expressions
# --------------------------------------------------------------------------
def _polygon(tile: Tile):
    import ee

    return ee.Geometry.Polygon(tile.geometry["coordinates"])


def metadata_expression(tile: Tile, ch: Choices, era5_year_months: int = 13):
    """The one ``computeValue`` dictionary of a tile (see module doc). Valid whichever
    branches the server evaluates: with no candidate, a placeholder image stands in."""
    import ee

    poly = _polygon(tile)

    def s2(collection: str):
        return (ee.ImageCollection(collection).filterBounds(poly).filterDate(ch.start, ch.end)
                .filterMetadata("CLOUDY_PIXEL_PERCENTAGE", "less_than", CLOUD_THRESHOLD))

    l2a, l1c = s2(S2_L2A), s2(S2_L1C)
    use_l1c = ee.Number(1 if ch.prefer == "l1c" else 0).Or(l2a.size().eq(0))
    coll = ee.ImageCollection(ee.Algorithms.If(use_l1c, l1c, l2a))
    s2_type = ee.Algorithms.If(use_l1c, "l1c", "l2a")
    contained = coll.filter(ee.Filter.contains(".geo", poly.buffer(S2_BUFFER_M)))
    n = contained.size()
    # the table travels as one string (a list of 1024 numbers costs the client ~10 ms to encode)
    table = ee.String(",".join(map(str, ch.table))).split(",")
    idx = ee.Number.parse(table.get(n.min(len(ch.table)).max(1).subtract(1)))
    # stands in when there is no candidate: a date inside every collection's coverage (2019-06-01), so that
    # each later part (S1, ERA5 windows, Dynamic World) stays valid; the client ignores it (n = 0)
    placeholder = ee.Image.constant(0).rename("B4").set("system:time_start", 1_559_347_200_000, "system:id", "")
    img = ee.Image(contained.toList(n).add(placeholder).get(idx))
    date = ee.Date(img.get("system:time_start"))
    day = ee.Date(date.format("YYYY-MM-dd"))  # midnight UTC of the S2 day, as the original's date string
    proj = img.select("B4").projection()

    # Sentinel-1: per orbit pass, closest in time to the S2 day
    s1 = (ee.ImageCollection(S1_GRD).filterDate(S1_START, S1_END).filterBounds(poly)
          .filter(ee.Filter.contains(".geo", poly.buffer(S1_BUFFER_M)))
          .filterMetadata("instrumentMode", "equals", "IW")
          .map(lambda im: im.set("date_difference", im.date().difference(day, "day").abs()))
          .sort("date_difference"))

    def s1_pick(orbit: str):  # ids: [] or [the closest scene]; bands: the placeholder's when there is none
        first = s1.filterMetadata("orbitProperties_pass", "equals", orbit).limit(1)
        return ee.Dictionary({"ids": first.aggregate_array("system:id"),
                              "bands": ee.Image(first.toList(1).add(placeholder).get(0)).bandNames()})

    # ERA5-Land: dates as the original writes them, end exclusive
    month_start = ee.Date.fromYMD(date.get("year"), date.get("month"), 1)
    month_last = month_start.advance(1, "month").advance(-1, "day")
    era = ee.ImageCollection(ERA5_MONTHLY)
    monthly = era.filterDate(month_start.advance(-1, "month"), month_last).select(list(schema.ERA5_BANDS)).toBands()
    year_coll = era.filterDate(month_start.advance(-(era5_year_months - 1), "month"), month_last)
    # per band its reducer ("<band>_<reducer>"; Image.select, not a client-side map per band)
    yearly = ee.ImageCollection([year_coll.reduce(getattr(ee.Reducer, r)()).select([f"{b}_{r}"])
                                 for b, r in ERA5_YEAR_REDUCERS]).toBands().float()
    combined = ee.Image.cat([monthly, yearly])
    era5 = ee.Dictionary({"names": combined.bandNames(),
                          "values": combined.reduceRegion(ee.Reducer.mean(), poly, 10)})
    year = date.get("year")
    dw_count = (ee.ImageCollection(DYNAMIC_WORLD).filterBounds(poly)
                .filterDate(ee.Date.fromYMD(year, 1, 1), ee.Date.fromYMD(year, 12, 31)).size())
    return ee.Dictionary({
        "n_images": n, "s2_type": s2_type, "s2_id": img.get("system:id"),
        "s2_date": date.format("YYYY-MM-dd"), "s2_bands": img.bandNames(),
        "crs": proj.crs(), "crs_transform": proj.transform(),
        "s1_asc": s1_pick("ASCENDING"), "s1_desc": s1_pick("DESCENDING"),
        "dw_count": dw_count, "era5": era5,
    })


# --------------------------------------------------------------------------
# The metadata request without building and serializing the expression per tile
# --------------------------------------------------------------------------
#: Building the metadata expression (~6.5 ms) and serializing it (~3.7 ms) were a third of the
#: client's CPU per tile. Once the year window, product, table length and ERA5 year are fixed,
#: only the polygon's vertices and the index table's string depend on the tile: the expression
#: is built and serialized once per such combination with stand-in vertices and table (a
#: template), and a tile's JSON is the template with its own values put in. The serializer
#: merges equal values (a ring's closing vertex becomes a reference to its first), so templates
#: are also keyed by which vertices of the tile are equal; a tile whose values could be merged
#: with anything else (an integral coordinate, a vertex or table text found in the template) is
#: serialized the plain way. tests/test_earthengine.py checks both ways give the same JSON.
_TEMPLATES: dict[tuple, Any] = {}
_TEMPLATES_LOCK = threading.Lock()
_TABLE_STANDIN = "index-table-stand-in-5f0c2e"


def _expression_globals(fn) -> tuple:
    """``fn`` and the module-level constants it (and its inner functions) reads, with their
    values: a template is reused only while none of them changed."""
    names: set[str] = set()

    def walk(code) -> None:
        names.update(code.co_names)
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                walk(c)
    walk(fn.__code__)
    g = fn.__globals__
    consts = tuple((n, g[n]) for n in sorted(names) if isinstance(g.get(n), (str, int, float, tuple)))
    return (fn, consts, tuple(schema.ERA5_BANDS))


def _standin_vertex(k: int) -> list[float]:
    return [-1000.0 - k - 0.123456789, 1000.0 + k + 0.987654321]


def _standin_tile(tile: Tile, ring_lengths: tuple, pattern: tuple) -> Tile:
    """``tile`` with each distinct vertex replaced by its stand-in (:func:`_standin_vertex`), rings
    of ``ring_lengths``: the tile a template is serialized from."""
    standins = {k: _standin_vertex(k) for k in set(pattern)}
    verts = [standins[first] for first in pattern]
    coords, i = [], 0
    for n in ring_lengths:
        coords.append(verts[i:i + n])
        i += n
    return Tile(tile.tile_id, tile.biome, tile.eco_region, tile.lon, tile.lat,
                {"type": "Polygon", "coordinates": coords}, tile.tile_size_m)


def _build_template(tile: Tile, ch: Choices, era5_year_months: int, ring_lengths: tuple, pattern: tuple):
    """(parts, slots): the template's JSON text between the stand-ins, and which value (a
    vertex index or "table") goes into each gap; None if the stand-ins are not each found
    exactly once in the text."""
    import ee

    standins = {k: _standin_vertex(k) for k in set(pattern)}
    stand_tile = _standin_tile(tile, ring_lengths, pattern)
    text = json.dumps(ee.serializer.encode(metadata_expression(stand_tile, ch, era5_year_months), for_cloud_api=True))
    table_json = json.dumps(",".join(map(str, ch.table)))
    if text.count(table_json) != 1:
        return None
    text = text.replace(table_json, json.dumps(_TABLE_STANDIN))
    tokens: dict[str, Any] = {json.dumps(_TABLE_STANDIN): "table"}
    for k, v in standins.items():
        tokens[json.dumps(v)] = k
    if any(text.count(t) != 1 for t in tokens):
        return None
    pieces = re.split("(" + "|".join(re.escape(t) for t in tokens) + ")", text)
    return pieces[0::2], [tokens[t] for t in pieces[1::2]], "".join(pieces[0::2])


def metadata_request(tile: Tile, ch: Choices, era5_year_months: int = 13) -> dict[str, Any]:
    """``ee.serializer.encode(metadata_expression(tile, ch, era5_year_months), for_cloud_api=True)``,
    from a template (see above) when the tile's values allow it."""
    import ee

    table_json = json.dumps(",".join(map(str, ch.table)))
    try:
        rings = tile.geometry["coordinates"]
        keys = [json.dumps(list(v)) for ring in rings for v in ring]
        ring_lengths = tuple(len(r) for r in rings)
        pattern = tuple(keys.index(k) for k in keys)
        plain = any(float(x).is_integer() for ring in rings for v in ring for x in v)
    except (KeyError, TypeError, ValueError):
        plain = True
    if not plain:
        key = (_expression_globals(metadata_expression), ring_lengths, pattern, ch.start, ch.end, ch.prefer,
               len(ch.table), era5_year_months)
        with _TEMPLATES_LOCK:
            tpl = _TEMPLATES.get(key, False)
        if tpl is False:
            tpl = _build_template(tile, ch, era5_year_months, ring_lengths, pattern)
            with _TEMPLATES_LOCK:
                if len(_TEMPLATES) >= 256:  # a few dozen combinations in practice
                    _TEMPLATES.clear()
                _TEMPLATES[key] = tpl
        if tpl is not None:
            parts, slots, whole = tpl
            if table_json not in whole and not any(keys[k] in whole for k in set(pattern)):
                out = [parts[0]]
                for slot_, part in zip(slots, parts[1:]):
                    out.append(table_json if slot_ == "table" else keys[slot_])
                    out.append(part)
                return json.loads("".join(out))
    return ee.serializer.encode(metadata_expression(tile, ch, era5_year_months), for_cloud_api=True)


def compute_value(expression: dict[str, Any]) -> Any:
    """``ee.data.computeValue`` for an expression already serialized: the same request (body
    ``{"expression": ...}`` plus the client's workload tag, to the same method)."""
    import ee

    body = {"expression": expression}
    ee.data._maybe_populate_workload_tag(body)
    return ee.data._execute_cloud_call(
        ee.data._get_cloud_projects().value().compute(body=body, project=ee.data._get_projects_path(),
                                                      prettyPrint=False))["result"]


@dataclass
class TileMeta:
    """The parsed answer of the metadata request."""

    s2_type: str
    s2_id: str
    s2_date: str
    s2_bands: list[str]
    crs: str
    crs_transform: list[float]
    s1: dict[str, dict[str, Any] | None]
    dw_count: int
    era5: dict[str, list[float] | None]
    era5_names: list[str] = field(default_factory=list)

    def sentinel2_bands(self) -> list[str]:
        """The original's S2 bands for the product; L2A without MSK_CLDPRB drops it."""
        wanted = list(schema.S2_BANDS_L2A if self.s2_type == "l2a" else schema.S2_BANDS_L1C)
        if self.s2_type == "l2a" and "MSK_CLDPRB" not in self.s2_bands:
            wanted.remove("MSK_CLDPRB")
        return wanted

    def missing_s2_bands(self) -> list[str]:
        return [b for b in self.sentinel2_bands() if b not in self.s2_bands]

    def stack_bands(self) -> dict[str, list[str] | None]:
        """tile_info BANDS: the bands of the stack per group (file order), and the
        ERA5 band names, as the original writes them."""
        bands: dict[str, list[str] | None] = {"sentinel2": self.sentinel2_bands()}
        for orbit in ("asc", "desc"):
            pick = self.s1.get(orbit)
            bands[f"sentinel1_{orbit}"] = ([b for b in pick.get("bands") or [] if b != "angle"] or None) if pick else None
        bands["aster"] = list(ASTER_BANDS_EE)
        bands["era5"] = list(self.era5_names)
        bands["dynamic_world"] = list(schema.DYNAMIC_WORLD_BANDS) if self.dw_count > 0 else None
        bands["canopy_height_eth"] = list(schema.CANOPY_BANDS)
        bands["esa_worldcover"] = list(schema.WORLDCOVER_BANDS)
        return bands


def _one(value: Any) -> dict[str, Any] | None:
    """A Sentinel-1 pick of the metadata answer: {"ids": [id] or [], "bands": [...]}."""
    if not isinstance(value, dict) or not value.get("ids"):
        return None
    return {"id": value["ids"][0], "bands": list(value.get("bands") or [])}


def candidate_count(result: dict[str, Any]) -> int | None:
    """The answer's ``n_images`` when it is a count (an integer >= 0, as JSON gives it);
    None when it is missing or anything else."""
    n = result.get("n_images")
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        return None
    if isinstance(n, float) and not n.is_integer():
        return None
    return int(n) if n >= 0 else None


def parse_metadata(tile: Tile, ch: Choices, result: Any) -> TileMeta:
    """Validate the metadata answer; NoDataError when the tile has no S2 image or the
    image lacks a band the stack must have."""
    if not isinstance(result, dict):
        raise TransientSourceError(tile.tile_id, f"unexpected metadata answer {type(result).__name__}")
    n = candidate_count(result)
    if n is None:  # a 200 that does not say how many images: malformed, asked again (never no-data)
        raise TransientSourceError(
            tile.tile_id, f"malformed metadata answer: n_images is {result.get('n_images', 'missing')!r}, "
                          f"not a count (answer keys: {sorted(result)[:12]})")
    if n == 0:  # only a well-formed answer that says "no image" is permanent
        raise NoDataError(
            tile.tile_id,
            f"no Sentinel-2 image: no {'L1C' if ch.prefer == 'l1c' else 'L2A or L1C'} image with "
            f"CLOUDY_PIXEL_PERCENTAGE < {CLOUD_THRESHOLD} contains the tile (+{S2_BUFFER_M} m) in "
            f"filterDate({ch.start}, {ch.end})",
        )
    try:
        era5 = result.get("era5") or {}
        names = [str(b) for b in era5.get("names") or []]
        values = era5.get("values") or {}

        def part(sl: slice) -> list[float] | None:
            sel = names[sl]
            if len(sel) != 4:
                return None
            return [math.nan if values.get(b) is None else float(values[b]) for b in sel]

        meta = TileMeta(
            s2_type=str(result["s2_type"]), s2_id=str(result["s2_id"]), s2_date=str(result["s2_date"]),
            s2_bands=[str(b) for b in result["s2_bands"]], crs=str(result["crs"]),
            crs_transform=[float(v) for v in result["crs_transform"]],
            s1={"asc": _one(result.get("s1_asc")), "desc": _one(result.get("s1_desc"))},
            dw_count=int(result.get("dw_count") or 0),
            era5={"month1": part(slice(0, 4)), "month2": part(slice(4, 8)), "year": part(slice(8, None))},
            era5_names=names,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TransientSourceError(tile.tile_id, f"malformed metadata answer: {exc}") from exc
    missing = meta.missing_s2_bands()
    if missing:
        raise NoDataError(tile.tile_id, f"missing Sentinel-2 band: image {meta.s2_id} has no band(s) "
                                        f"{', '.join(missing)} (only MSK_CLDPRB may be absent)")
    return meta


def stack_grid(tile: Tile, meta: TileMeta, resolution: float = 10.0) -> Grid:
    """The tile's pixel grid in the S2 image's CRS, aligned to its 10 m pixel grid."""
    x, y = Transformer.from_crs("EPSG:4326", meta.crs, always_xy=True).transform(tile.lon, tile.lat)
    size = int(round(tile.tile_size_m / resolution))
    half = size * resolution / 2.0
    ox, oy = meta.crs_transform[2], meta.crs_transform[5]
    x0 = ox + math.floor((x - half - ox) / resolution) * resolution
    y1 = oy + math.ceil((y + half - oy) / resolution) * resolution
    return Grid(crs=meta.crs, transform=Affine(resolution, 0.0, x0, 0.0, -resolution, y1), size=size)


def band_id(group: str, band: str) -> str:
    """EE band names cannot hold '/': 'sentinel2/B4' travels as 'sentinel2__B4'."""
    return f"{group}__{band}"


def pixels_expression(tile: Tile, meta: TileMeta):
    """The stack image: every modality, float, masked pixels set to MASK_VALUE."""
    import ee

    poly = _polygon(tile)
    bands = meta.stack_bands()
    parts = []
    s2_img = ee.Image(meta.s2_id)
    s2_cont = [b for b in bands["sentinel2"] if b not in ("SCL", "QA60")]
    s2_near = [b for b in bands["sentinel2"] if b in ("SCL", "QA60")]
    parts.append(s2_img.select(s2_cont).resample("bilinear"))
    if s2_near:
        parts.append(s2_img.select(s2_near))
    for orbit in ("asc", "desc"):
        pols = bands[f"sentinel1_{orbit}"]
        if pols:
            parts.append(ee.Image(meta.s1[orbit]["id"]).select(pols).resample("bilinear"))
    elevation = ee.Image(ASTER).select(["b1"]).float()
    parts.append(ee.Image.cat([elevation, ee.Terrain.slope(elevation)]).resample("bilinear"))
    if bands["dynamic_world"]:
        year = int(meta.s2_date[:4])
        dw = (ee.ImageCollection(DYNAMIC_WORLD).filterBounds(poly)
              .filterDate(f"{year}-01-01", f"{year}-12-31").select("label")
              .map(lambda im: im.add(1).rename("label")).mode())
        parts.append(dw)
    parts.append(ee.Image.cat([ee.Image(CANOPY_HEIGHT), ee.Image(CANOPY_HEIGHT_SD)]).resample("bilinear"))
    parts.append(ee.ImageCollection(WORLDCOVER).first().select(["Map"]))
    names = [band_id(*d.split("/", 1)) for d in schema.stack_band_descriptions(bands)]
    image = ee.Image.cat([p.float() for p in parts]).rename(names).unmask(MASK_VALUE, False)
    return image, names


#: Built and serialized once per (bands, Sentinel-1 orbits present, Dynamic World year, ring shape)
#: like the metadata request (see there); stand-ins for the image ids and the polygon.
_PIXEL_TEMPLATES: dict[tuple, Any] = {}


def pixels_request(tile: Tile, meta: TileMeta) -> tuple[dict[str, Any], list[str]]:
    """``(ee.serializer.encode(image, for_cloud_api=True), names)`` of
    :func:`pixels_expression`, from a template when the tile's values allow it."""
    import ee

    bands = meta.stack_bands()
    names = [band_id(*d.split("/", 1)) for d in schema.stack_band_descriptions(bands)]
    orbits = tuple(o for o in ("asc", "desc") if bands[f"sentinel1_{o}"])
    ids = {"s2": meta.s2_id, **{o: meta.s1[o]["id"] for o in orbits}}
    try:
        rings = tile.geometry["coordinates"]
        vkeys = [json.dumps(list(v)) for ring in rings for v in ring]
        ring_lengths = tuple(len(r) for r in rings)
        pattern = tuple(vkeys.index(k) for k in vkeys)
        plain = (any(float(x).is_integer() for ring in rings for v in ring for x in v)
                 or len(set(ids.values())) < len(ids))
    except (KeyError, TypeError, ValueError, AttributeError):
        plain = True
    if not plain:
        dw_year = meta.s2_date[:4] if bands["dynamic_world"] else None
        groups = tuple((g, tuple(bands.get(g) or ())) for g in schema.STACK_GROUPS)
        key = (_expression_globals(pixels_expression), groups, orbits, dw_year, ring_lengths, pattern)
        with _TEMPLATES_LOCK:
            tpl = _PIXEL_TEMPLATES.get(key, False)
        if tpl is False:
            tpl = None
            standins = {k: _standin_vertex(k) for k in set(pattern)}
            stand_tile = _standin_tile(tile, ring_lengths, pattern)
            stand_ids = {k: f"stand-in/{k}-image-5f0c2e" for k in ids}
            stand_meta = dataclasses.replace(
                meta, s2_id=stand_ids["s2"],
                s1={o: ({**meta.s1[o], "id": stand_ids[o]} if o in orbits else meta.s1[o]) for o in ("asc", "desc")})
            image, stand_names = pixels_expression(stand_tile, stand_meta)
            text = json.dumps(ee.serializer.encode(image, for_cloud_api=True))
            tokens: dict[str, Any] = {json.dumps(v): ("id", k) for k, v in stand_ids.items()}
            if bands["dynamic_world"]:
                tokens.update({json.dumps(v): ("vertex", k) for k, v in standins.items()})
            if stand_names == names and all(text.count(t) == 1 for t in tokens):
                pieces = re.split("(" + "|".join(re.escape(t) for t in tokens) + ")", text)
                tpl = (pieces[0::2], [tokens[t] for t in pieces[1::2]], "".join(pieces[0::2]))
            with _TEMPLATES_LOCK:
                if len(_PIXEL_TEMPLATES) >= 1024:
                    _PIXEL_TEMPLATES.clear()
                _PIXEL_TEMPLATES[key] = tpl
        if tpl is not None:
            parts, slots, whole = tpl
            values = {("id", k): json.dumps(v) for k, v in ids.items()}
            values.update({("vertex", k): vkeys[k] for k in set(pattern)})
            if not any(values[s] in whole for s in slots):
                out = [parts[0]]
                for slot_, part in zip(slots, parts[1:]):
                    out.append(values[slot_])
                    out.append(part)
                return json.loads("".join(out)), names
    image, names = pixels_expression(tile, meta)
    return ee.serializer.encode(image, for_cloud_api=True), names


def compute_pixels(params: dict[str, Any]) -> Any:
    """``ee.data.computePixels`` for ``params["expression"]`` already serialized: the same
    request (file format, workload tag, method) and the same conversion of the answer."""
    import ee

    params = params.copy()
    converter = ee.data._extract_image_converter(params)
    params["fileFormat"] = ee._cloud_api_utils.convert_to_image_file_format(converter.expected_data_format())
    ee.data._maybe_populate_workload_tag(params)
    data = ee.data._execute_cloud_call(
        ee.data._get_cloud_projects_raw().image().computePixels(project=ee.data._get_projects_path(), body=params))
    return converter.do_conversion(data) if converter else data


#: numpy parses an NPY header with ast.literal_eval; CPython 3.11's AST conversion keeps
#: its recursion depth per interpreter, so concurrent parses in threads can fail with
#: "AST constructor recursion depth mismatch": NPY answers are decoded under this lock.
_NPY_LOCK = threading.Lock()


def decode_npy(raw: bytes) -> np.ndarray:
    with _NPY_LOCK:
        return np.load(io.BytesIO(raw), allow_pickle=False)


# --------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------
_init_lock = threading.Lock()
_initialized: dict[str, bool] = {}
@dataclass
class EarthEngineSource(Source):
    """Earth Engine through the official client (see module doc).

    ``credentials``: a service-account key (dict, from a Prefect Secret or the
    :class:`blocks.earthengine.EarthEngineCredentials` block), or ``None`` for
    the user's persistent credentials from ``earthengine authenticate``.
    ``url``: the API endpoint (default :data:`HIGH_VOLUME_URL`, the one Google asks automated
    parallel clients to use; tests point it at a fake).
    ``credentials_origin``: where the key came from, named in error messages.
    ``era5_year_months``: 13 (default, the original's quirk: the same month a year
    earlier to the current month) or 12 (a calendar year ending with the current
    month); recorded in tile_info ``ERA5_YEAR_MONTHS``.
    """

    project: str
    credentials: dict[str, Any] | None = field(default=None, repr=False)
    url: str | None = None
    limit_name: str = EE_LIMIT_NAME
    timeout_s: float = 120.0
    slot_timeout_s: float | None = None
    ceiling: int | None = None  # the limit's size, to cap a batch's lease
    request_rate: float | None = None  # requests/s for the project (paced per process, see SlotPool.set_rate)
    eco_index: dict[str, int] | None = field(default=None, repr=False)
    credentials_origin: str = "the EarthEngineCredentials block or the Prefect Secret"
    era5_year_months: int = 13
    name: str = "earthengine"

    def __post_init__(self) -> None:
        if self.era5_year_months not in (12, 13):
            raise ValueError(f"source_options.era5_year_months is {self.era5_year_months!r}; use 13 (the "
                             "original's 13 monthly images, default) or 12 (a calendar year)")

    def __repr__(self) -> str:  # never show the key
        kind = "service-account key" if self.credentials else "persistent credentials"
        return f"EarthEngineSource(project={self.project!r}, credentials=<{kind}>, url={self.endpoint!r})"

    @property
    def endpoint(self) -> str:
        """The API endpoint requests go to: ``url``, else Google's high-volume endpoint."""
        return self.url or HIGH_VOLUME_URL

    def cache_key(self) -> str:
        # v2: the original's selection (issue 12); the ERA5 year changes what a stack holds
        return f"earthengine-v2-era5y{self.era5_year_months}"

    # -- client --------------------------------------------------------------
    def _credentials(self):
        import ee
        from google.oauth2 import service_account

        if self.credentials:
            try:
                return service_account.Credentials.from_service_account_info(self.credentials, scopes=ee.oauth.SCOPES)
            except (ValueError, KeyError) as exc:
                raise EarthEngineAuthError(
                    f"the Earth Engine service-account key from {self.credentials_origin} is not valid "
                    f"({type(exc).__name__}: {exc}); put the whole JSON key file of the service account "
                    "there") from None
        adc = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") or os.path.expanduser(
            "~/.config/gcloud/application_default_credentials.json")
        if not os.path.exists(ee.oauth.get_credentials_path()) and not os.path.exists(adc):
            # nothing on disk: say so now, rather than let google-auth probe the network for credentials
            raise EarthEngineAuthError(
                f"no Earth Engine credentials: {ee.oauth.get_credentials_path()} does not exist. Run "
                "`earthengine authenticate` on this machine, or save a service-account key in an "
                "EarthEngineCredentials block and pass source_options.credentials_block")
        try:
            return ee.data.get_persistent_credentials()
        except ee.EEException as exc:
            raise EarthEngineAuthError(
                "no Earth Engine credentials: run `earthengine authenticate` on this machine (persistent "
                "credentials in ~/.config/earthengine/credentials), or save a service-account key in an "
                "EarthEngineCredentials block and pass its name (source_options.credentials_block)") from exc

    def initialize(self) -> None:
        """``ee.Initialize`` once per process, holding one request slot (one of the batch's
        leased slots when called inside a batch session, else its own Prefect slot)."""
        import ee

        url = self.endpoint
        key = f"{url}|{self.project}|{hashlib.sha256(json.dumps(self.credentials, sort_keys=True).encode()).hexdigest() if self.credentials else 'persistent'}"
        with _init_lock:
            if _initialized.get(key):
                return
            creds = self._credentials()
            if url.rstrip("/") not in GOOGLE_URLS:
                # A custom endpoint (a private deployment, or the tests' fake): the client
                # must not fetch Google's deprecated-asset catalogue from storage.googleapis.com.
                ee.deprecation._FetchDataCatalogStac = lambda: {}
            with self._request_slot():
                try:
                    ee.Initialize(credentials=creds, project=self.project, url=url)
                    ee.data.setMaxRetries(0)  # one attempt = one request; Prefect retries tiles
                    ee.data.setDeadline(int(self.timeout_s * 1000))  # rebuilds the client: inside the slot
                except Exception as exc:
                    if is_transient(exc):
                        where = url
                        raise EarthEngineInitError(f"Earth Engine initialisation at {where} failed "
                                                   f"(temporary, retried): {exc}") from None
                    origin = self.credentials_origin if self.credentials else "persistent credentials"
                    raise EarthEngineAuthError(f"Earth Engine rejected the credentials ({origin}) "
                                               f"or project {self.project!r}: {exc}") from None
            _initialized.clear()
            _initialized[key] = True

    def check(self) -> None:
        """Fail before any tile: credentials, project and a one-value request."""
        import ee

        if not self.project:
            raise EarthEngineAuthError("no Earth Engine Cloud project: set source_options.project "
                                       "(the project registered for Earth Engine)")
        self.initialize()
        with slot(self.limit_name, timeout_seconds=self.slot_timeout_s):
            try:
                ee.data.computeValue(ee.Number(1))
            except Exception as exc:
                raise EarthEngineAuthError(f"Earth Engine request with project {self.project!r} failed: {exc}") from None

    @contextlib.contextmanager
    def session(self, threads: int, slots: int | None = None, tiles: int | None = None):
        """Request slots for a batch of ``tiles`` tiles, shared by the threads of every batch
        of the process (:func:`~tasks.multimodal.sources.base.pooled_session`), paced at
        ``request_rate``. More threads than slots keep the slots busy while some threads do
        local work (decoding, writing the GeoTIFF)."""
        with pooled_session(self.limit_name, threads, slots, self.ceiling, tiles, self.slot_timeout_s,
                            self.request_rate) as batch:
            yield batch

    def take_rate_limited(self, tile_id: str) -> int:
        """How many 429 answers the tile's requests met (in this process, since the last call)."""
        with _rate_limited_lock:
            return _rate_limited.pop(tile_id, 0)

    def _request_slot(self):
        return request_slot(self.limit_name, self.slot_timeout_s)

    def _call(self, tile: Tile, what: str, fn):
        with self._request_slot():
            try:
                return fn()
            except (NoDataError, TransientSourceError):
                raise
            except Exception as exc:
                if is_rate_limited(exc):
                    with _rate_limited_lock:
                        _rate_limited[tile.tile_id] = _rate_limited.get(tile.tile_id, 0) + 1
                reason = permanent_reason(exc)
                if reason is not None:
                    raise NoDataError(tile.tile_id, f"{reason}: {what}: {exc}") from None
                # known transient or unknown: retried (an unknown error must never lose the tile)
                raise TransientSourceError(tile.tile_id, f"{what}: {type(exc).__name__}: {exc}") from None

    # -- one tile ------------------------------------------------------------
    def select(self, tile: Tile) -> tuple[Choices, TileMeta]:
        """Request 1: the tile's choices and what the server found for them."""
        try:
            self.initialize()
        except EarthEngineInitError as exc:
            raise TransientSourceError(tile.tile_id, str(exc)) from None
        ch = choose(tile)
        result = self._call(tile, "computeValue", lambda: compute_value(
            metadata_request(tile, ch, self.era5_year_months)))
        n = candidate_count(result) if isinstance(result, dict) else None
        if n is not None and n > len(ch.table):
            # more candidates than the precomputed table: ask again with a table that reaches n
            log.info("tile %s: %d Sentinel-2 candidates > %d; metadata asked again with a longer index table",
                     tile.tile_id, n, len(ch.table))
            ch = choose(tile, table_size=n)
            result = self._call(tile, "computeValue", lambda: compute_value(
                metadata_request(tile, ch, self.era5_year_months)))
        return ch, parse_metadata(tile, ch, result)

    def fetch(self, tile: Tile, grid: Grid) -> TileStack:
        ch, meta = self.select(tile)
        grid = stack_grid(tile, meta)
        image, names = pixels_request(tile, meta)
        t = grid.transform
        params = {
            "expression": image, "fileFormat": "NPY", "bandIds": names,
            "grid": {"dimensions": {"width": grid.size, "height": grid.size},
                     "affineTransform": {"scaleX": t.a, "shearX": t.b, "translateX": t.c,
                                         "shearY": t.d, "scaleY": t.e, "translateY": t.f},
                     "crsCode": grid.crs},
        }
        raw = self._call(tile, "computePixels", lambda: compute_pixels(params))
        try:
            arr = decode_npy(raw)
            data = np.stack([np.asarray(arr[n], dtype=np.float32) for n in names])
        except (KeyError, ValueError, TypeError, IndexError, OSError, EOFError) as exc:
            raise TransientSourceError(tile.tile_id, f"computePixels returned an unexpected array: {exc}") from None
        if data.shape[1:] != (grid.size, grid.size):
            raise TransientSourceError(tile.tile_id, f"computePixels returned {data.shape[1:]}, asked {grid.size}")
        data[data <= MASK_VALUE * 0.5] = np.nan
        info = {
            "S2_DATE": meta.s2_date, "S2_type": meta.s2_type, "CRS": meta.crs,
            "lat": ch.lat, "lon": ch.lon,
            "biome": schema.BIOME_INDEX[tile.biome], "eco_region": self.eco_region_index(tile),
            "NO_DATA": False, "BANDS": meta.stack_bands(),
            "era5": {k: v for k, v in meta.era5.items()},
            "S2_IMAGEID": meta.s2_id,
            "S1_IMAGEIDS": {o: (meta.s1[o] or {}).get("id") for o in ("asc", "desc")},
            "ERA5_YEAR_MONTHS": self.era5_year_months,
            "SOURCE": "earthengine",
        }
        return TileStack(tile.tile_id, data, grid.crs, grid.transform, info)


class EarthEngineAuthError(RuntimeError):
    """Missing or bad credentials/project: fails the flow before any tile."""


class EarthEngineInitError(RuntimeError):
    """``ee.Initialize`` failed for a temporary reason (a tile fetch turns it into a retry)."""


ENV_KEY = "EE_SERVICE_ACCOUNT_KEY"


def credentials_from_env() -> dict[str, Any] | None:
    """A service-account key from ``EE_SERVICE_ACCOUNT_KEY`` (JSON text or a file path)."""
    raw = os.environ.get(ENV_KEY)
    if not raw:
        return None
    try:
        if raw.lstrip().startswith("{"):
            key = json.loads(raw)
            where = f"{ENV_KEY} (JSON text)"
        else:
            where = f"{ENV_KEY} (file {raw})"
            with open(raw) as fh:
                key = json.load(fh)
    except json.JSONDecodeError as exc:
        raise EarthEngineAuthError(f"the service-account key in {ENV_KEY} is not valid JSON (line {exc.lineno}: "
                                   f"{exc.msg}); set it to the whole key file's text or to its path") from None
    except OSError as exc:
        raise EarthEngineAuthError(f"{ENV_KEY} names a key file that cannot be read ({exc.strerror}: {raw}); set "
                                   "it to the key file's path or to its JSON text") from None
    if not isinstance(key, dict) or key.get("type") != "service_account":
        raise EarthEngineAuthError(f"{where} is not a service-account key (no \"type\": \"service_account\"); "
                                   "use the JSON key file of the service account")
    return key
