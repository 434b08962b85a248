"""Google Earth Engine source: the per-tile selection of the original MMEarth
download, in two API requests per tile.

Request 1, ``computeValue``: one dictionary with everything the tile needs to
know (chosen Sentinel-2 image, product, date, CRS and grid origin, its bands,
the Sentinel-1 image per orbit pass, Dynamic World availability, ERA5 values).
Request 2, ``computePixels``: the whole stack (every modality resampled to
the Sentinel-2 grid at 10 m) on an explicit grid, as a NumPy array. The
original needed about 20 sequential round trips (several ``getInfo`` per
modality, then ``getDownloadUrl`` and an HTTP GET).

Selection rules, as the original (``ee_utils/ee_data.py``):

* Sentinel-2: a random year 2017-2020 (2018: Jan-Nov; 2019: Dec 2018-Dec
  2019); L2A (COPERNICUS/S2_SR_HARMONIZED) or L1C (COPERNICUS/S2_HARMONIZED)
  at random, L2A falling back to L1C when its collection is empty;
  CLOUDY_PIXEL_PERCENTAGE < 10; the image must contain the tile buffered by
  200 m; one image at random; its B4 projection gives the CRS; spectral bands
  bilinear, SCL and QA60 nearest.
* Sentinel-1 (COPERNICUS/S1_GRD, IW): per orbit pass the image closest in
  time to the S2 date within 2017-2020 that contains the tile; every band
  except ``angle``; bilinear.
* ASTER GDEM elevation and ``ee.Terrain.slope`` of it; bilinear.
* ERA5-Land monthly aggregates: previous month, current month, and the 12
  months ending with the current one (mean of temperature_2m, min of
  temperature_2m_min, max of temperature_2m_max, sum of
  total_precipitation_sum), mean over the tile.
* Dynamic World: mode of the S2 year's ``label`` + 1.
* ETH canopy height 2020 and its standard deviation; bilinear.
* ESA WorldCover v100 ``Map``.

Random choices are seeded per tile (the original's seed: a hash of the tile
centre coordinates), so a tile's selection is reproducible.

Requests and retries: the client's own retries are switched off
(``ee.data.setMaxRetries(0)``), so one attempt is one HTTP request; every
request holds a slot of the Prefect global concurrency limit for its whole
duration; transient failures (429, 5xx, timeouts, dropped connections) raise
:class:`TransientSourceError` and Prefect task retries (exponential backoff,
jitter) fetch the tile again; permanent outcomes raise :class:`NoDataError`
and are never retried.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import contextlib
import http.client
import json
import logging
import math
import os
import random
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from affine import Affine

from tasks.common.concurrency import slot
from tasks.multimodal import schema
from tasks.multimodal.sources.base import Grid, NoDataError, Source, Tile, TileStack, TransientSourceError

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
#: pixels EE returns for masked data (unmasked with this, turned into NaN here)
MASK_VALUE = -3.0e38

EE_LIMIT_NAME = "earthengine-requests"

_TRANSIENT_PATTERNS = (
    "too many concurrent", "rate limit", "quota", "resource_exhausted", "resource exhausted",
    "internal error", "service is currently unavailable", "unavailable", "backend error",
    "deadline", "timed out", "timeout", "connection", "429", "500", "502", "503", "504",
)


def is_transient(exc: BaseException) -> bool:
    """Whether an exception from the EE client is worth retrying."""
    if isinstance(exc, (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException)):
        return True
    try:
        import httplib2

        if isinstance(exc, httplib2.HttpLib2Error):
            return True
    except ImportError:  # pragma: no cover
        pass
    try:
        import requests

        if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
            return True
    except ImportError:  # pragma: no cover
        pass
    msg = str(exc).lower()
    return any(p in msg for p in _TRANSIENT_PATTERNS)


# --------------------------------------------------------------------------
# Per-tile random choices (seeded like the original)
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Choices:
    year: int
    start: str
    end: str
    prefer: str  # "l2a" or "l1c"
    u: float  # picks the image: index = floor(u * n_images)


def tile_seed(lat: float, lon: float) -> int:
    """The original's per-tile seed: sha256 of "lat_lon" modulo 10^5."""
    return int(hashlib.sha256(f"{lat}_{lon}".encode()).hexdigest(), 16) % 10**5


def s2_window(year: int) -> tuple[str, str]:
    if year == 2018:
        return "2018-01-01", "2018-11-30"
    if year == 2019:
        return "2018-12-01", "2019-12-31"
    return f"{year}-01-01", f"{year}-12-31"


def choose(tile: Tile) -> Choices:
    rng = random.Random(tile_seed(tile.lat, tile.lon))
    year = rng.randint(2017, 2020)
    start, end = s2_window(year)
    prefer = "l2a" if rng.randint(0, 1) == 0 else "l1c"
    return Choices(year=year, start=start, end=end, prefer=prefer, u=rng.random())


def _end_exclusive(date: str) -> str:
    return (_dt.date.fromisoformat(date) + _dt.timedelta(days=1)).isoformat()


# --------------------------------------------------------------------------
# Expressions
# --------------------------------------------------------------------------
def metadata_expression(tile: Tile, ch: Choices):
    """The one ``computeValue`` dictionary of a tile (see module doc)."""
    import ee

    poly = ee.Geometry.Polygon(tile.geometry["coordinates"])
    request = {"tile_id": tile.tile_id, "kind": "metadata", "lat": tile.lat, "lon": tile.lon,
               "year": ch.year, "start": ch.start, "end": ch.end, "prefer": ch.prefer, "u": ch.u}

    def s2(collection: str):
        return (ee.ImageCollection(collection).filterBounds(poly)
                .filterDate(ch.start, _end_exclusive(ch.end))
                .filterMetadata("CLOUDY_PIXEL_PERCENTAGE", "less_than", CLOUD_THRESHOLD))

    l2a, l1c = s2(S2_L2A), s2(S2_L1C)
    use_l1c = ee.Number(1 if ch.prefer == "l1c" else 0).Or(l2a.size().eq(0))
    coll = ee.ImageCollection(ee.Algorithms.If(use_l1c, l1c, l2a))
    s2_type = ee.String(ee.Algorithms.If(use_l1c, "l1c", "l2a"))
    contained = coll.filter(ee.Filter.contains(".geo", poly.buffer(S2_BUFFER_M)))
    n = contained.size()
    idx = ee.Number(ch.u).multiply(n).floor().min(n.subtract(1)).max(0)
    img = ee.Image(contained.toList(1, idx).get(0))
    date = ee.Date(img.get("system:time_start"))
    proj = img.select("B4").projection()

    # Sentinel-1: per orbit pass, closest in time to the S2 date
    s1 = (ee.ImageCollection(S1_GRD).filterBounds(poly).filterDate("2017-01-01", "2021-01-01")
          .filterMetadata("instrumentMode", "equals", "IW")
          .filter(ee.Filter.contains(".geo", poly))
          .map(lambda im: im.set("date_difference",
                                 ee.Date(im.get("system:time_start")).difference(date, "day").abs()))
          .sort("date_difference"))

    def s1_pick(orbit: str):
        c = s1.filterMetadata("orbitProperties_pass", "equals", orbit)
        first = ee.Image(c.first())
        return ee.Algorithms.If(c.size().gt(0), ee.Dictionary({
            "id": first.get("system:id"), "bands": first.bandNames().remove("angle")}), None)

    # ERA5-Land, sampled over the tile
    month_start = ee.Date.fromYMD(date.get("year"), date.get("month"), 1)
    era = ee.ImageCollection(ERA5_MONTHLY).select(list(schema.ERA5_BANDS))

    def era_vec(c, reducers=None):
        image = c.first() if reducers is None else ee.Image.cat([
            c.select(b).reduce(r) for b, r in zip(schema.ERA5_BANDS, reducers)]).rename(list(schema.ERA5_BANDS))
        values = ee.Image(image).reduceRegion(ee.Reducer.mean(), poly, 10).values(list(schema.ERA5_BANDS))
        return ee.Algorithms.If(c.size().gt(0), values, None)

    era5 = ee.Dictionary({
        "month1": era_vec(era.filterDate(month_start.advance(-1, "month"), month_start)),
        "month2": era_vec(era.filterDate(month_start, month_start.advance(1, "month"))),
        "year": era_vec(era.filterDate(month_start.advance(-11, "month"), month_start.advance(1, "month")),
                        [ee.Reducer.mean(), ee.Reducer.min(), ee.Reducer.max(), ee.Reducer.sum()]),
    })
    dw_count = (ee.ImageCollection(DYNAMIC_WORLD).filterBounds(poly)
                .filterDate(ee.Date.fromYMD(date.get("year"), 1, 1), ee.Date.fromYMD(date.get("year"), 12, 31)).size())
    found = ee.Dictionary({
        "request": request, "n_images": n, "s2_type": s2_type, "s2_id": img.get("system:id"),
        "s2_date": date.format("YYYY-MM-dd"), "s2_bands": img.bandNames(),
        "crs": proj.crs(), "crs_transform": proj.transform(),
        "s1_asc": s1_pick("ASCENDING"), "s1_desc": s1_pick("DESCENDING"),
        "dw_count": dw_count, "era5": era5,
    })
    empty = ee.Dictionary({"request": request, "n_images": 0})
    return ee.Dictionary(ee.Algorithms.If(n.gt(0), found, empty))


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

    def stack_bands(self) -> dict[str, list[str] | None]:
        """tile_info BANDS: the bands the stack will have, per group, in file order."""
        if self.s2_type == "l2a":
            s2 = [b for b in schema.S2_BANDS_L2A if b in self.s2_bands]
        else:
            s2 = [b for b in schema.S2_BANDS_L1C if b in self.s2_bands]
        bands: dict[str, list[str] | None] = {"sentinel2": s2}
        for orbit in ("asc", "desc"):
            pick = self.s1.get(orbit)
            pols = [b for b in (pick or {}).get("bands") or [] if b in schema.S1_POLARISATIONS]
            bands[f"sentinel1_{orbit}"] = pols or None
        bands["aster"] = list(schema.ASTER_BANDS)
        bands["era5"] = list(schema.ERA5_BANDS)
        bands["dynamic_world"] = list(schema.DYNAMIC_WORLD_BANDS) if self.dw_count > 0 else None
        bands["canopy_height_eth"] = list(schema.CANOPY_BANDS)
        bands["esa_worldcover"] = list(schema.WORLDCOVER_BANDS)
        return bands


def parse_metadata(tile: Tile, ch: Choices, result: Any) -> TileMeta:
    """Validate the metadata answer; NoDataError when the tile has no S2 image."""
    if not isinstance(result, dict):
        raise TransientSourceError(tile.tile_id, f"unexpected metadata answer {type(result).__name__}")
    req = result.get("request") or {}
    if req.get("tile_id") != tile.tile_id:
        raise TransientSourceError(tile.tile_id, f"metadata answer is for tile {req.get('tile_id')!r}")
    if not result.get("n_images"):
        raise NoDataError(
            tile.tile_id,
            f"no {'L1C' if ch.prefer == 'l1c' else 'L2A or L1C'} Sentinel-2 image with CLOUDY_PIXEL_PERCENTAGE < "
            f"{CLOUD_THRESHOLD} contains the tile (+{S2_BUFFER_M} m) between {ch.start} and {ch.end}",
        )
    try:
        era5 = result.get("era5") or {}
        return TileMeta(
            s2_type=str(result["s2_type"]), s2_id=str(result["s2_id"]), s2_date=str(result["s2_date"]),
            s2_bands=[str(b) for b in result["s2_bands"]], crs=str(result["crs"]),
            crs_transform=[float(v) for v in result["crs_transform"]],
            s1={"asc": result.get("s1_asc"), "desc": result.get("s1_desc")},
            dw_count=int(result.get("dw_count") or 0),
            era5={k: (None if era5.get(k) is None else [float(v) if v is not None else math.nan for v in era5[k]])
                  for k in ("month1", "month2", "year")},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise TransientSourceError(tile.tile_id, f"malformed metadata answer: {exc}") from exc


def stack_grid(tile: Tile, meta: TileMeta, resolution: float = 10.0) -> Grid:
    """The tile's pixel grid in the S2 image's CRS, aligned to its 10 m pixel grid."""
    from pyproj import Transformer

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

    poly = ee.Geometry.Polygon(tile.geometry["coordinates"])
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
    return image.set("request", {"tile_id": tile.tile_id, "kind": "pixels"}), names


# --------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------
_init_lock = threading.Lock()
_initialized: dict[str, bool] = {}
#: per thread: the semaphore of the batch session the thread works for (its share of leased slots)
_local = threading.local()


@dataclass
class EarthEngineSource(Source):
    """Earth Engine through the official client (see module doc).

    ``credentials``: a service-account key (dict, from a Prefect Secret or the
    :class:`blocks.earthengine.EarthEngineCredentials` block), or ``None`` for
    the user's persistent credentials from ``earthengine authenticate``.
    ``url``: the API endpoint (default Google's; tests point it at a fake).
    """

    project: str
    credentials: dict[str, Any] | None = field(default=None, repr=False)
    url: str | None = None
    limit_name: str = EE_LIMIT_NAME
    timeout_s: float = 120.0
    slot_timeout_s: float | None = None
    ceiling: int | None = None  # the limit's size, to cap a batch's lease
    eco_index: dict[str, int] | None = field(default=None, repr=False)
    name: str = "earthengine"

    def __repr__(self) -> str:  # never show the key
        kind = "service-account key" if self.credentials else "persistent credentials"
        return f"EarthEngineSource(project={self.project!r}, credentials=<{kind}>, url={self.url!r})"

    def cache_key(self) -> str:
        return "earthengine-v1"

    # -- client --------------------------------------------------------------
    def _credentials(self):
        import ee
        from google.oauth2 import service_account

        if self.credentials:
            try:
                return service_account.Credentials.from_service_account_info(self.credentials, scopes=ee.oauth.SCOPES)
            except (ValueError, KeyError) as exc:
                raise EarthEngineAuthError(
                    f"the Earth Engine service-account key is not valid ({type(exc).__name__}); save the full JSON "
                    "key of the service account in the EarthEngineCredentials block or the Prefect Secret") from None
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

        key = f"{self.url}|{self.project}|{hashlib.sha256(json.dumps(self.credentials, sort_keys=True).encode()).hexdigest() if self.credentials else 'persistent'}"
        with _init_lock:
            if _initialized.get(key):
                return
            creds = self._credentials()
            if self.url:
                # A custom endpoint (a private deployment, or the tests' fake): the client
                # must not fetch Google's deprecated-asset catalogue from storage.googleapis.com.
                ee.deprecation._FetchDataCatalogStac = lambda: {}
            with self._request_slot():
                try:
                    ee.Initialize(credentials=creds, project=self.project, url=self.url)
                    ee.data.setMaxRetries(0)  # one attempt = one request; Prefect retries tiles
                    ee.data.setDeadline(int(self.timeout_s * 1000))  # rebuilds the client: inside the slot
                except Exception as exc:
                    if is_transient(exc):
                        raise TransientSourceError("-", f"Earth Engine initialisation failed: {exc}") from None
                    raise EarthEngineAuthError(f"Earth Engine rejected the credentials or project "
                                               f"{self.project!r}: {exc}") from None
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
    def session(self, threads: int, slots: int | None = None):
        """Lease request slots for a batch: ``slots`` (default ``threads``, at most the
        ceiling) slots of the Prefect limit for the batch's duration (2 API calls to
        Prefect per batch, not 4 per tile), shared by the batch's threads through a local
        semaphore: each request holds one of them while in flight, so the global ceiling
        bounds every request. More threads than slots keep the slots busy while some
        threads do local work (decoding, writing the GeoTIFF)."""
        occupy = max(1, min(slots or threads, self.ceiling or threads))
        sem = threading.BoundedSemaphore(occupy)

        def bind() -> None:  # run by each thread of the batch
            _local.semaphore = sem

        with slot(self.limit_name, occupy=occupy, timeout_seconds=self.slot_timeout_s):
            try:
                yield bind
            finally:
                _local.semaphore = None  # the calling thread, if it fetched itself

    @contextlib.contextmanager
    def _request_slot(self):
        sem = getattr(_local, "semaphore", None)
        if sem is None:  # outside a batch session: one Prefect slot per request
            with slot(self.limit_name, timeout_seconds=self.slot_timeout_s):
                yield
        else:
            with sem:
                yield

    def _call(self, tile: Tile, what: str, fn):
        with self._request_slot():
            try:
                return fn()
            except (NoDataError, TransientSourceError):
                raise
            except Exception as exc:
                if is_transient(exc):
                    raise TransientSourceError(tile.tile_id, f"{what}: {type(exc).__name__}: {exc}") from None
                raise NoDataError(tile.tile_id, f"{what}: {exc}") from None

    # -- one tile ------------------------------------------------------------
    def fetch(self, tile: Tile, grid: Grid) -> TileStack:
        import ee

        try:
            self.initialize()
        except TransientSourceError as exc:
            raise TransientSourceError(tile.tile_id, exc.reason) from None
        ch = choose(tile)
        result = self._call(tile, "computeValue", lambda: ee.data.computeValue(metadata_expression(tile, ch)))
        meta = parse_metadata(tile, ch, result)
        grid = stack_grid(tile, meta)
        image, names = pixels_expression(tile, meta)
        t = grid.transform
        params = {
            "expression": image, "fileFormat": "NUMPY_NDARRAY", "bandIds": names,
            "grid": {"dimensions": {"width": grid.size, "height": grid.size},
                     "affineTransform": {"scaleX": t.a, "shearX": t.b, "translateX": t.c,
                                         "shearY": t.d, "scaleY": t.e, "translateY": t.f},
                     "crsCode": grid.crs},
        }
        arr = self._call(tile, "computePixels", lambda: ee.data.computePixels(params))
        try:
            data = np.stack([np.asarray(arr[n], dtype=np.float32) for n in names])
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise TransientSourceError(tile.tile_id, f"computePixels returned an unexpected array: {exc}") from None
        if data.shape[1:] != (grid.size, grid.size):
            raise TransientSourceError(tile.tile_id, f"computePixels returned {data.shape[1:]}, asked {grid.size}")
        data[data <= MASK_VALUE * 0.5] = np.nan
        info = {
            "S2_DATE": meta.s2_date, "S2_type": meta.s2_type, "CRS": meta.crs,
            "lat": tile.lat, "lon": tile.lon,
            "biome": schema.BIOME_INDEX[tile.biome], "eco_region": self._eco_index(tile),
            "NO_DATA": False, "BANDS": meta.stack_bands(),
            "era5": {k: v for k, v in meta.era5.items()},
            "S2_IMAGEID": meta.s2_id,
            "S1_IMAGEIDS": {o: (meta.s1[o] or {}).get("id") for o in ("asc", "desc")},
            "SOURCE": "earthengine",
        }
        return TileStack(tile.tile_id, data, grid.crs, grid.transform, info)

    def _eco_index(self, tile: Tile) -> int:
        if self.eco_index is None:
            return 0
        try:
            return int(self.eco_index[tile.eco_region])
        except KeyError:
            raise NoDataError(tile.tile_id, f"ecoregion {tile.eco_region!r} has no index in the mapping") from None


class EarthEngineAuthError(RuntimeError):
    """Missing or bad credentials/project: fails the flow before any tile."""


def credentials_from_env() -> dict[str, Any] | None:
    """A service-account key from ``EE_SERVICE_ACCOUNT_KEY`` (JSON text or a file path)."""
    raw = os.environ.get("EE_SERVICE_ACCOUNT_KEY")
    if not raw:
        return None
    if raw.lstrip().startswith("{"):
        return json.loads(raw)
    with open(raw) as fh:
        return json.load(fh)
