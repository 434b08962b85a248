"""STAC source: MMEarth tiles from public Cloud-Optimized GeoTIFFs behind a STAC API
(Microsoft Planetary Computer by default), without an Earth Engine account.

Per tile: STAC searches (``pystac-client``, ``POST /search``) pick the products with the
Earth Engine source's rules where the data allow (:func:`~.earthengine.choose`: the
original's seeded year window and draws), then each band is read with GDAL through
``/vsicurl/`` HTTP range requests, warped onto the tile's 10 m grid
(:class:`rasterio.vrt.WarpedVRT`: only the blocks under the tile are fetched, never a
whole scene). The README's "STAC source" section has the per-modality table.

* Sentinel-2 (``sentinel-2-l2a``): the S2 year window of the draw (``datetime``
  ``start/end`` with ``end`` exclusive as the original's ``filterDate``), the tile polygon
  (``intersects``), ``eo:cloud_cover < 10`` (the STAC copy of CLOUDY_PIXEL_PERCENTAGE);
  candidates whose footprint contains the tile buffered by 200 m, ordered by
  (datetime, id); the image ``randint(0, n - 1)`` of the original's stream. The product
  draw is made (it advances the stream) but Planetary Computer has no L1C collection, so
  every tile is L2A (``S2_PRODUCT_DRAWN`` records the draw). The grid is the tile's on
  the image's B04 grid (its ``proj:epsg`` and ``proj:transform``). Reflectances are
  harmonised as EE's ``S2_SR_HARMONIZED`` (``raster:bands`` scale/offset applied, back to
  DN x 10000, so baseline-04.00 scenes lose their +1000). No MSK_CLDPRB asset: the band
  is left out, as EE does for an L2A image without it. QA60 is derived from SCL
  (8, 9 cloud -> 1024; 10 cirrus -> 2048), as QA60 is empty after 2022 anyway.
* Sentinel-1 (``sentinel-1-rtc``, ``sar:instrument_mode = IW``): per pass
  (``sat:orbit_state``) the scene closest in time to midnight UTC of the S2 day within
  2017-01-01..2020-12-31 (exclusive) whose footprint contains the tile +200 m; searched
  first within +-:data:`S1_NEAR_DAYS` days (a closer scene cannot lie outside), then over
  the whole period for a pass still missing. RTC gamma0 (linear) read bilinear, then dB
  (EE's S1_GRD is sigma0 dB, not terrain-flattened).
* Elevation (``cop-dem-glo-30``, asset ``data``): mosaic of the items under the tile,
  bilinear, one pixel of margin; slope (degrees) from it at 10 m.
* ESA WorldCover (``esa-worldcover``, asset ``map``, 2020 = v100): nearest.
* ERA5, Dynamic World, ETH canopy height: no STAC COG copy; absent per tile (BANDS null,
  era5 values NaN), as the original marks a missing Sentinel-1 orbit.

Requests: every STAC search and every band read holds a slot of a Prefect global
concurrency limit (``limit_name``, as the Earth Engine source does: batch leases shared
by the fetching threads). 429/5xx are retried honouring ``Retry-After``: searches by
urllib3; a band read that fails (GDAL's own retries are off: GDAL ignores Retry-After) is
forgotten by GDAL's cache and its URL asked again with ``HEAD`` under the same urllib3
policy, then read again; a tile that still fails is a :class:`TransientSourceError`
(retried by the flow).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import functools
import glob
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import rasterio
import requests
import shapely
from pyproj import Transformer
from pystac_client import Client
from pystac_client.stac_api_io import StacApiIO
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from requests.adapters import HTTPAdapter
from shapely.geometry import shape
from urllib3 import Retry

from tasks.multimodal import schema
from tasks.multimodal.sources.base import (Grid, NoDataError, Source, Tile, TileStack, TransientSourceError,
                                           pooled_session, request_slot)
from tasks.multimodal.sources.earthengine import (CLOUD_THRESHOLD, S1_BUFFER_M, S1_END, S1_START, S2_BUFFER_M,
                                                  choose, stack_grid)
from tasks.multimodal.sources.synthetic import slope_degrees

log = logging.getLogger(__name__)

PC_API = "https://planetarycomputer.microsoft.com/api/stac/v1"
ENV_API_URL = "STAC_API_URL"
STAC_LIMIT_NAME = "stac-requests"
S2_L2A = "sentinel-2-l2a"
S1_RTC = "sentinel-1-rtc"
DEM = "cop-dem-glo-30"
WORLDCOVER = "esa-worldcover"
WORLDCOVER_WINDOW = ("2020-01-01T00:00:00Z", "2020-12-31T23:59:59Z")  # v100, as EE's ESA/WorldCover/v100
#: MMEarth's Sentinel-2 band name -> Planetary Computer asset key
S2_ASSETS: dict[str, str] = {
    "B1": "B01", "B2": "B02", "B3": "B03", "B4": "B04", "B5": "B05", "B6": "B06", "B7": "B07", "B8A": "B8A",
    "B8": "B08", "B9": "B09", "B11": "B11", "B12": "B12", "SCL": "SCL",
}
#: the stack's Sentinel-2 bands (the original's L2A list without MSK_CLDPRB, which has no asset)
S2_BANDS: tuple[str, ...] = tuple(b for b in schema.S2_BANDS_L2A if b != "MSK_CLDPRB")
S1_NEAR_DAYS = 30
#: SCL classes -> QA60 bits: 8, 9 (cloud medium/high probability) opaque; 10 (thin cirrus) cirrus
QA60_FROM_SCL = {8: 1024, 9: 1024, 10: 2048}

GDAL_OPTIONS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no listing of the "folder" of a URL
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    # the blocks of a window one range request after another: a read holding one request slot
    # makes one request at a time (GDAL's default fetches them in parallel, past the limit)
    "GDAL_HTTP_MULTIRANGE": "SERIAL",
    "VSI_CACHE": "FALSE",
    "CPL_VSIL_CURL_NON_CACHED": "",  # set per source: no failed-request memory between retries
}


@functools.lru_cache(maxsize=1)
def _libgdal():
    """The GDAL library rasterio runs on (its wheel's copy, else the one loaded), or None."""
    paths = sorted(glob.glob(os.path.join(os.path.dirname(rasterio.__file__) + ".libs", "libgdal*")))
    if not paths:
        with contextlib.suppress(OSError), open("/proc/self/maps") as fh:
            paths = sorted({line.split()[-1] for line in fh if "libgdal" in line and line.split()[-1].startswith("/")})
    for p in paths:
        with contextlib.suppress(OSError, AttributeError):
            lib = ctypes.CDLL(p)
            lib.VSICurlPartialClearCache.argtypes = [ctypes.c_char_p]
            return lib
    log.warning("GDAL library not found: a COG read that failed is not asked again in this process")
    return None


def forget_url(href: str) -> None:
    """Drop what GDAL's /vsicurl/ remembers of ``href`` (its size, blocks, and a failure: GDAL
    otherwise answers a later open of the URL from memory, without a request)."""
    lib = _libgdal()
    if lib is not None:
        lib.VSICurlPartialClearCache(("/vsicurl/" + href).encode())


def _date_window(start: str, end: str) -> str:
    """A STAC ``datetime`` interval for Earth Engine's ``filterDate(start, end)`` (end exclusive):
    STAC intervals are inclusive, so the end is the last millisecond before ``end``."""
    e = datetime.datetime.fromisoformat(end).replace(tzinfo=datetime.timezone.utc) - datetime.timedelta(milliseconds=1)
    return f"{start}T00:00:00Z/{e.strftime('%Y-%m-%dT%H:%M:%S.%f')[:-3]}Z"


def _item_time(item: dict[str, Any]) -> datetime.datetime:
    p = item["properties"]
    s = p.get("datetime") or p.get("start_datetime")
    t = datetime.datetime.fromisoformat(str(s).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)


def buffered_tile(tile: Tile, metres: float):
    """The tile polygon buffered by ``metres`` (in its UTM zone), in lon/lat (shapely)."""
    crs = tile.utm_crs
    fwd = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform
    inv = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform
    utm = shapely.transform(shape(tile.geometry), lambda x, y: fwd(x, y), interleaved=False)
    return shapely.transform(utm.buffer(metres), lambda x, y: inv(x, y), interleaved=False)


def contains(item: dict[str, Any], area) -> bool:
    try:
        return shape(item["geometry"]).contains(area)
    except (KeyError, ValueError, TypeError, AttributeError):
        return False


def item_crs(item: dict[str, Any]) -> str | None:
    p = item["properties"]
    if p.get("proj:epsg"):
        return f"EPSG:{int(p['proj:epsg'])}"
    if p.get("proj:code"):
        return str(p["proj:code"])
    return None


def raster_band(asset: dict[str, Any]) -> dict[str, Any]:
    bands = asset.get("raster:bands") or [{}]
    return bands[0] if isinstance(bands, list) and bands else {}


def s2_harmonise(item: dict[str, Any], asset: dict[str, Any]) -> tuple[float, float]:
    """(a, b) with EE's harmonised DN = a * DN + b: the asset's ``raster:bands`` scale/offset
    turned back into DN x 10000; without an offset, baseline >= 04.00 subtracts 1000 (the
    BOA_ADD_OFFSET that EE's S2_SR_HARMONIZED removes)."""
    rb = raster_band(asset)
    scale = rb.get("scale")
    offset = rb.get("offset")
    if scale:
        return float(scale) * 1e4, float(offset or 0.0) * 1e4
    baseline = str(item["properties"].get("s2:processing_baseline") or "00.00")
    return 1.0, (-1000.0 if baseline >= "04.00" else 0.0)


class StacConfigError(RuntimeError):
    """The STAC API or its settings are unusable: fails the flow before any tile."""


# --------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------
@dataclass
class StacSource(Source):
    """A STAC API + COGs (see module doc). ``api_url``: the STAC API root (default the
    ``STAC_API_URL`` environment variable, else Planetary Computer's); ``sign``: sign asset
    URLs with the ``planetary-computer`` package (Planetary Computer's blob storage needs
    it; off for other servers)."""

    api_url: str | None = None
    sign: bool | None = None
    limit_name: str = STAC_LIMIT_NAME
    ceiling: int | None = None
    slot_timeout_s: float | None = None
    timeout_s: float = 60.0
    retries: int = 5
    retry_delay_s: float = 1.0
    page_size: int = 250
    eco_index: dict[str, int] | None = field(default=None, repr=False)
    name: str = "stac"

    def __post_init__(self) -> None:
        self.api_url = (self.api_url or os.environ.get(ENV_API_URL) or PC_API).rstrip("/")
        if self.sign is None:
            self.sign = "planetarycomputer.microsoft.com" in self.api_url
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:  # sent to Dask workers: without the per-thread clients
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def cache_key(self) -> str:
        return f"stac-v1|{self.api_url}"

    def check(self) -> None:
        """Before any tile: the signing package when signing, and the API answering as a STAC
        item-search API."""
        if self.sign:
            try:
                import planetary_computer  # noqa: F401  - optional (the stac-pc extra): only when signing
            except ImportError:
                raise StacConfigError(
                    f"source_options.sign is on for {self.api_url} but the planetary-computer package is not "
                    "installed: pip install 'geodata-factory[stac-pc]' (or planetary-computer), or set "
                    "source_options.sign=false for a server that needs no signing") from None
        try:
            client = self._client()
        except Exception as exc:
            raise StacConfigError(f"the STAC API at {self.api_url} does not answer ({type(exc).__name__}: {exc}); "
                                  "check source_options.api_url (or STAC_API_URL)") from None
        if not client.conforms_to("ITEM_SEARCH"):
            raise StacConfigError(f"{self.api_url} is not a STAC API with item search (no /search in its "
                                  "conformance classes); set source_options.api_url to the API root")

    # -- requests ------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, threads: int, slots: int | None = None, tiles: int | None = None):
        """Request slots for a batch, as every source with a request limit leases them
        (:func:`~tasks.multimodal.sources.base.pooled_session`; not paced)."""
        with pooled_session(self.limit_name, threads, slots, self.ceiling, tiles, self.slot_timeout_s) as batch:
            yield batch

    def _request_slot(self):
        return request_slot(self.limit_name, self.slot_timeout_s)

    def _client(self):
        """This thread's pystac-client Client (a requests session is not shared between threads)."""
        client = getattr(self._local, "client", None)
        if client is None:
            io = StacApiIO(max_retries=self._retry_policy(), timeout=self.timeout_s)
            modifier = None
            if self.sign:
                import planetary_computer  # optional (the stac-pc extra): imported only when signing

                modifier = planetary_computer.sign_inplace
            with self._request_slot():
                client = Client.open(self.api_url, stac_io=io, modifier=modifier)
            self._local.client = client
        return client

    def search(self, tile: Tile, what: str, **params: Any) -> list[dict[str, Any]]:
        """Every item of one search (all pages), as dicts; one request slot held throughout."""
        params.setdefault("intersects", tile.geometry)
        params.setdefault("limit", self.page_size)
        try:
            client = self._client()
            with self._request_slot():
                return list(client.search(**params).items_as_dicts())
        except Exception as exc:
            raise TransientSourceError(tile.tile_id, f"STAC search for {what} at {self.api_url} failed: "
                                                     f"{type(exc).__name__}: {exc}") from None

    def read(self, tile: Tile, href: str, grid: Grid, resampling: str, nodata: float | None,
             margin: int = 0) -> np.ndarray:
        """One band (the asset's first) warped onto ``grid`` (``margin`` extra pixels each side),
        float32 with NaN where the source has no data; only the blocks under the tile are read."""
        t = grid.transform
        size = grid.size + 2 * margin
        transform = t @ t.translation(-margin, -margin)
        # GDAL's own retries do not read Retry-After: one attempt per open here; after a failure
        # the URL is asked again (HEAD) through urllib3, which waits as Retry-After says
        env = dict(GDAL_OPTIONS, GDAL_HTTP_MAX_RETRY="0", GDAL_HTTP_TIMEOUT=str(int(self.timeout_s)))
        env.pop("CPL_VSIL_CURL_NON_CACHED")
        for attempt in range(self.retries + 1):
            try:
                with self._request_slot(), rasterio.Env(**env), rasterio.open(href) as src:
                    src_nodata = nodata if nodata is not None else src.nodata
                    with WarpedVRT(src, crs=grid.crs, transform=transform, width=size, height=size,
                                   resampling=Resampling[resampling], src_nodata=src_nodata, nodata=np.nan,
                                   dtype="float32") as vrt:
                        return vrt.read(1)
            except (RasterioError, OSError) as exc:
                forget_url(href)  # GDAL remembers a failure: the next open must ask the server again
                if attempt == self.retries or not self._wait_until_served(href):
                    raise TransientSourceError(tile.tile_id, f"reading {href}: {exc}") from None
                log.info("tile %s: reading %s failed (%s); asked again", tile.tile_id, href, exc)
        raise AssertionError("unreachable")

    def _wait_until_served(self, href: str) -> bool:
        """After a failed read: ``HEAD href`` with the searches' retry policy (429/5xx retried,
        waiting as each answer's Retry-After says, else backing off from ``retry_delay_s``).
        True when the server answers 2xx, so that the read is tried again."""
        session = getattr(self._local, "head_session", None)
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(max_retries=self._retry_policy())
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.head_session = session
        try:
            with self._request_slot():
                return session.head(href, timeout=self.timeout_s, allow_redirects=True).ok
        except requests.RequestException:
            return False

    def _retry_policy(self):
        return Retry(total=self.retries, backoff_factor=self.retry_delay_s / 2,
                     status_forcelist=(429, 500, 502, 503, 504), allowed_methods=None,
                     respect_retry_after_header=True, raise_on_status=False)

    def _href(self, tile: Tile, item: dict[str, Any], key: str) -> tuple[str, dict[str, Any]]:
        asset = (item.get("assets") or {}).get(key)
        if not asset or not asset.get("href"):
            raise NoDataError(tile.tile_id, f"item {item.get('id')} of {item.get('collection')} has no asset {key!r}")
        return asset["href"], asset

    # -- selection ---------------------------------------------------------------
    def select_s2(self, tile: Tile):
        """(choices, the picked item, n candidates) by the original's rules (module doc)."""
        ch = choose(tile)
        items = self.search(tile, "Sentinel-2", collections=[S2_L2A], datetime=_date_window(ch.start, ch.end),
                            query={"eo:cloud_cover": {"lt": CLOUD_THRESHOLD}})
        area = buffered_tile(tile, S2_BUFFER_M)
        cands = sorted((i for i in items if contains(i, area)), key=lambda i: (_item_time(i), i["id"]))
        n = len(cands)
        if n == 0:
            raise NoDataError(tile.tile_id, f"no Sentinel-2 image: no {S2_L2A} item with eo:cloud_cover < "
                                            f"{CLOUD_THRESHOLD} contains the tile (+{S2_BUFFER_M} m) in "
                                            f"filterDate({ch.start}, {ch.end})")
        if n > len(ch.table):
            ch = choose(tile, table_size=n)
        return ch, cands[ch.index(n)], n

    def select_s1(self, tile: Tile, day: datetime.datetime) -> dict[str, dict[str, Any] | None]:
        """Per pass the IW scene closest in time to ``day`` that contains the tile +200 m."""
        lo = datetime.datetime.fromisoformat(S1_START).replace(tzinfo=datetime.timezone.utc)
        hi = datetime.datetime.fromisoformat(S1_END).replace(tzinfo=datetime.timezone.utc)
        area = buffered_tile(tile, S1_BUFFER_M)
        out: dict[str, dict[str, Any] | None] = {"ascending": None, "descending": None}

        def best(items, orbit):
            ok = [i for i in items if i["properties"].get("sat:orbit_state") == orbit and contains(i, area)
                  and lo <= _item_time(i) < hi]
            return min(ok, key=lambda i: (abs((_item_time(i) - day).total_seconds()), _item_time(i), i["id"]),
                       default=None)

        near = datetime.timedelta(days=S1_NEAR_DAYS)
        a, b = max(lo, day - near), min(hi, day + near)
        query = {"sar:instrument_mode": {"eq": "IW"}}
        if a < b:
            items = self.search(tile, "Sentinel-1", collections=[S1_RTC], query=query,
                                datetime=_date_window(a.strftime("%Y-%m-%d"), b.strftime("%Y-%m-%d")))
            for orbit in out:
                pick = best(items, orbit)
                # nothing outside [a, b) can be closer (a side clipped by the period has nothing beyond)
                bound = min(day - a if a > lo else datetime.timedelta.max, b - day if b < hi else datetime.timedelta.max)
                if pick is not None and abs(_item_time(pick) - day) <= bound:
                    out[orbit] = pick
        for orbit in out:
            if out[orbit] is None:
                items = self.search(tile, f"Sentinel-1 {orbit}", collections=[S1_RTC],
                                    query={**query, "sat:orbit_state": {"eq": orbit}},
                                    datetime=_date_window(S1_START, S1_END))
                out[orbit] = best(items, orbit)
        return out

    # -- one tile --------------------------------------------------------------------
    def fetch(self, tile: Tile, grid: Grid) -> TileStack:
        ch, s2, n = self.select_s2(tile)
        b4_href, b4 = self._href(tile, s2, "B04")
        crs = item_crs(s2)
        transform = b4.get("proj:transform")
        if crs is None or not transform:
            with self._request_slot(), rasterio.Env(**{k: v for k, v in GDAL_OPTIONS.items() if v}), \
                    rasterio.open(b4_href) as src:
                crs = crs or src.crs.to_string()
                transform = list(src.transform)[:6]
        grid = stack_grid(tile, SimpleNamespace(crs=crs, crs_transform=[float(v) for v in transform]))
        when = _item_time(s2)
        s2_date = when.strftime("%Y-%m-%d")
        day = datetime.datetime.fromisoformat(s2_date).replace(tzinfo=datetime.timezone.utc)

        layers: list[np.ndarray] = []
        bands: dict[str, list[str] | None] = {}
        products: dict[str, str | None] = {}
        # Sentinel-2
        scl = None
        for band in S2_BANDS:
            if band == "QA60":
                qa = np.zeros_like(scl)
                for cls, bit in QA60_FROM_SCL.items():
                    qa[scl == cls] = bit
                qa[np.isnan(scl)] = np.nan
                layers.append(qa)
                continue
            href, asset = self._href(tile, s2, S2_ASSETS[band])
            rb = raster_band(asset)
            if band == "SCL":
                scl = self.read(tile, href, grid, "nearest", rb.get("nodata", 0))
                layers.append(scl)
                continue
            a, b = s2_harmonise(s2, asset)
            layers.append(self.read(tile, href, grid, "bilinear", rb.get("nodata", 0)) * np.float32(a) + np.float32(b))
        bands["sentinel2"] = list(S2_BANDS)
        products["sentinel2"] = f"{S2_L2A}/{s2['id']}"
        # Sentinel-1
        s1 = self.select_s1(tile, day)
        for orbit, key in (("ascending", "asc"), ("descending", "desc")):
            item = s1[orbit]
            pols = [p for p in schema.S1_POLARISATIONS if item and p.lower() in (item.get("assets") or {})]
            bands[f"sentinel1_{key}"] = pols or None
            products[f"sentinel1_{key}"] = f"{S1_RTC}/{item['id']}" if pols else None
            for p in pols:
                href, asset = self._href(tile, item, p.lower())
                lin = self.read(tile, href, grid, "bilinear", raster_band(asset).get("nodata"))
                with np.errstate(divide="ignore", invalid="ignore"):
                    layers.append(np.where(lin > 0, 10.0 * np.log10(lin), np.nan).astype(np.float32))
        # elevation and slope (Copernicus DEM in place of ASTER)
        dems = sorted(self.search(tile, "elevation", collections=[DEM]), key=lambda i: i["id"])
        if dems:
            elev = None
            for item in dems:
                href, asset = self._href(tile, item, "data")
                part = self.read(tile, href, grid, "bilinear", raster_band(asset).get("nodata"), margin=1)
                elev = part if elev is None else np.where(np.isnan(elev), part, elev)
            slope = slope_degrees(elev, grid.resolution, grid.resolution)
            layers += [elev[1:-1, 1:-1], slope[1:-1, 1:-1].astype(np.float32)]
            bands["aster"] = list(schema.ASTER_BANDS)
            products["aster"] = ",".join(f"{DEM}/{i['id']}" for i in dems)
        else:
            bands["aster"] = None
            products["aster"] = None
        for absent in ("era5", "dynamic_world", "canopy_height_eth"):
            bands[absent] = None
            products[absent] = None
        # ESA WorldCover v100
        wcs = sorted(self.search(tile, "WorldCover", collections=[WORLDCOVER], datetime="/".join(WORLDCOVER_WINDOW)),
                     key=lambda i: i["id"])
        if wcs:
            wc = None
            for item in wcs:
                href, asset = self._href(tile, item, "map")
                part = self.read(tile, href, grid, "nearest", raster_band(asset).get("nodata", 0))
                wc = part if wc is None else np.where(np.isnan(wc), part, wc)
            layers.append(wc)
            bands["esa_worldcover"] = list(schema.WORLDCOVER_BANDS)
            products["esa_worldcover"] = ",".join(f"{WORLDCOVER}/{i['id']}" for i in wcs)
        else:
            bands["esa_worldcover"] = None
            products["esa_worldcover"] = None
        data = np.stack(layers).astype(np.float32, copy=False)
        info = {
            "S2_DATE": s2_date, "S2_type": "l2a", "CRS": grid.crs, "lat": ch.lat, "lon": ch.lon,
            "biome": schema.BIOME_INDEX[tile.biome], "eco_region": self.eco_region_index(tile),
            "NO_DATA": False, "BANDS": bands,
            # no public STAC copy of ERA5-Land: missing values, as the EE source writes them (NaN)
            "era5": {part: [math.nan] * 4 for part in ("month1", "month2", "year")},
            "S2_IMAGEID": s2["id"], "S2_CANDIDATES": n, "S2_PRODUCT_DRAWN": ch.prefer,
            "S1_IMAGEIDS": {k: (s1[o] or {}).get("id") for o, k in (("ascending", "asc"), ("descending", "desc"))},
            "PRODUCTS": products, "STAC_API": self.api_url, "SOURCE": "stac",
        }
        return TileStack(tile.tile_id, data, grid.crs, grid.transform, info)
