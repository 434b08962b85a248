"""A loopback STAC API + COG server for tests, built at run time from synthetic COGs.

It speaks like Microsoft Planetary Computer's STAC API: the landing page (``GET /``)
with its conformance classes and a ``search`` link, ``POST /search`` answering an
ItemCollection (paged with a ``next`` link whose POST body carries a ``token``), and
item assets pointing at Cloud-Optimized GeoTIFFs served from ``/cogs/<file>`` with HTTP
Range requests (206 answers). Collections, asset keys, nodata and scale/offset
metadata are Planetary Computer's (``sentinel-2-l2a``, ``sentinel-1-rtc``,
``cop-dem-glo-30``, ``esa-worldcover``); any other collection id answers no item,
as a real API does.

The catalogue is made per tile (:meth:`FakeStac.__init__`): Sentinel-2 L2A scenes
every 23 days over 2017-2020 with varied ``eo:cloud_cover``, some footprints that
stop 100 m short of the tile's 200 m buffer, some on a window's exclusive end day and
some with the processing-baseline-04.00 offset; Sentinel-1 RTC scenes of both passes
(some in EW mode, some not containing the tile); Copernicus DEM in two 4326 pieces
(a mosaic); WorldCover v100 (2020) and v200 (2021). Every item of a kind shares the
tile's COG files (the footprints differ), so the data stay small.

Searches are answered by applying every filter of the request (collections,
intersects/bbox, datetime range inclusive, ``query`` operators), so a dropped filter
changes the answer; every request is recorded (:attr:`FakeStac.searches`,
:attr:`FakeStac.reads`) for the tests to check queries and byte ranges.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

S2 = "sentinel-2-l2a"
S1 = "sentinel-1-rtc"
DEM = "cop-dem-glo-30"
WORLDCOVER = "esa-worldcover"
COLLECTIONS = (S2, S1, DEM, WORLDCOVER)
#: Planetary Computer's Sentinel-2 L2A asset keys per resolution (m)
S2_ASSETS = {10: ("B02", "B03", "B04", "B08"), 20: ("B05", "B06", "B07", "B8A", "B11", "B12", "SCL"),
             60: ("B01", "B09")}
CONFORMANCE = [
    "https://api.stacspec.org/v1.0.0/core",
    "https://api.stacspec.org/v1.0.0/item-search",
    "https://api.stacspec.org/v1.0.0/item-search#query",
    "https://api.stacspec.org/v1.0.0/item-search#sort",
    "https://api.stacspec.org/v1.0.0/item-search#fields",
    "https://api.stacspec.org/v1.0.0-rc.1/item-search#filter",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
]
HALF_M = 2560.0  # half side of a tile's scene footprint (m): 512 px at 10 m (4 x 4 COG blocks of 128)


def _iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(s: str) -> dt.datetime:
    s = s.strip().replace("Z", "+00:00")
    t = dt.datetime.fromisoformat(s)
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _smooth(rng: np.random.Generator, h: int, w: int, k: int = 6) -> np.ndarray:
    """A smooth random field in [0, 1] (bilinear upsampling of a coarse grid)."""
    coarse = rng.random((k, k))
    ys, xs = np.linspace(0, k - 1, h), np.linspace(0, k - 1, w)
    y0, x0 = np.floor(ys).astype(int).clip(0, k - 2), np.floor(xs).astype(int).clip(0, k - 2)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = coarse[y0][:, x0]
    b = coarse[y0][:, x0 + 1]
    c = coarse[y0 + 1][:, x0]
    d = coarse[y0 + 1][:, x0 + 1]
    return a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx


def write_cog(path: Path, data: np.ndarray, crs: str, transform, nodata=None, blocksize: int = 128) -> None:
    """A (1, H, W) array as an uncompressed COG with ``blocksize`` tiles (GDAL's COG driver)."""
    import rasterio
    from rasterio.io import MemoryFile

    h, w = data.shape
    profile = dict(driver="GTiff", width=w, height=h, count=1, dtype=data.dtype.name, crs=crs, transform=transform)
    if nodata is not None:
        profile["nodata"] = nodata
    with MemoryFile() as mem:
        with mem.open(**profile) as tmp:
            tmp.write(data, 1)
        with mem.open() as src:
            with rasterio.Env(GDAL_NUM_THREADS=1):
                from rasterio.shutil import copy as rio_copy

                rio_copy(src, str(path), driver="COG", BLOCKSIZE=blocksize, COMPRESS="NONE", OVERVIEWS="NONE")


@dataclass
class Request:
    method: str
    path: str
    status: int
    range: tuple[int, int] | None = None
    nbytes: int = 0
    t0: float = 0.0
    t1: float = 0.0


@dataclass
class FakeStac:
    """``with FakeStac(tiles, root) as fake: fake.url`` -> the STAC API root on 127.0.0.1."""

    tiles: list[Any]
    root: Path
    latency_s: float = 0.0
    page_limit: int = 1000
    #: path prefix -> statuses answered first (e.g. {"/search": [503], "/cogs/x.tif": [429]})
    faults: dict[str, list[int]] = field(default_factory=dict)
    retry_after_s: int = 1
    items: list[dict[str, Any]] = field(default_factory=list)
    searches: list[dict[str, Any]] = field(default_factory=list)
    search_times: list[float] = field(default_factory=list)  # when each answered search arrived
    reads: list[Request] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        (self.root / "cogs").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        for t in self.tiles:
            self._build_tile(t)
        self.sizes = {p.name: p.stat().st_size for p in (self.root / "cogs").iterdir()}

    # -- the catalogue ------------------------------------------------------
    def _href(self, name: str) -> str:
        return f"{{BASE}}/cogs/{name}"

    def _build_tile(self, tile) -> None:
        from affine import Affine
        from pyproj import Transformer

        rng_seed = int.from_bytes(tile.tile_id.encode()[-8:].rjust(8, b"\0"), "big") % (2**32)
        rng = np.random.default_rng(rng_seed)
        pr = random.Random(rng_seed)
        crs = tile.utm_crs
        fwd = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
        inv = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
        cx, cy = fwd.transform(tile.lon, tile.lat)
        x0 = math.floor((cx - HALF_M) / 60.0) * 60.0  # scene grid origin on 60 m (all bands align)
        y1 = math.ceil((cy + HALF_M) / 60.0) * 60.0
        side = 2 * HALF_M + 60.0  # 258 px at 10 m
        n10 = int(round(side / 10.0))
        #: a footprint shrunk by this ends 100 m inside the tile's 200 m buffer (east side)
        short = (x0 + side) - (cx + tile.tile_size_m / 2 + 100.0)
        tid = tile.tile_id

        def footprint(shrink_east: float = 0.0) -> dict[str, Any]:
            xs = [x0, x0 + side - shrink_east, x0 + side - shrink_east, x0, x0]
            ys = [y1, y1, y1 - side, y1 - side, y1]
            lon, lat = inv.transform(xs, ys)
            return {"type": "Polygon", "coordinates": [[[float(a), float(b)] for a, b in zip(lon, lat)]]}

        # Sentinel-2 L2A: one set of COGs per tile
        base = _smooth(rng, n10, n10)
        s2_assets: dict[str, dict[str, Any]] = {}
        for res, keys in S2_ASSETS.items():
            n = int(round(side / res))
            for k, key in enumerate(keys):
                name = f"{tid}_S2_{key}.tif"
                if key == "SCL":
                    field_ = _smooth(rng, n, n)
                    data = np.where(field_ > 0.85, 9, np.where(field_ > 0.8, 10, 4)).astype(np.uint8)
                    data[:, :2] = 0  # an image-edge no-data strip
                    nodata, dtype_ = 0, "uint8"
                else:
                    f = base[:: res // 10, :: res // 10][:n, :n]
                    data = (1500 + 400 * k + 3000 * f).astype(np.uint16)
                    data[:, :1] = 0
                    nodata, dtype_ = 0, "uint16"
                write_cog(self.root / "cogs" / name, data, crs, Affine(res, 0, x0, 0, -res, y1), nodata)
                s2_assets[key] = {"href": self._href(name), "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                                  "roles": ["data"], "gsd": res, "proj:shape": [n, n],
                                  "proj:transform": [res, 0.0, x0, 0.0, -res, y1],
                                  "raster:bands": [{"nodata": nodata, "data_type": dtype_, "spatial_resolution": res}
                                                   | ({} if key == "SCL" else {"scale": 0.0001, "offset": 0.0})]}
        epsg = int(crs.split(":")[1])
        day = dt.datetime(2017, 1, 3, 10, 30, 21, tzinfo=dt.timezone.utc) + dt.timedelta(days=pr.randint(0, 20))
        ends = [dt.datetime(2017, 12, 31, 10, 0, tzinfo=dt.timezone.utc), dt.datetime(2018, 11, 30, 10, 0, tzinfo=dt.timezone.utc),
                dt.datetime(2019, 12, 31, 10, 0, tzinfo=dt.timezone.utc), dt.datetime(2020, 12, 31, 10, 0, tzinfo=dt.timezone.utc)]
        dates = []
        while day < dt.datetime(2021, 1, 1, tzinfo=dt.timezone.utc):
            dates.append(day)
            day += dt.timedelta(days=23)
        dates += ends  # scenes on the exclusive end day of each year window
        for i, when in enumerate(sorted(dates)):
            cloud = pr.choice([1.5, 4.0, 8.0, 9.99, 10.0, 35.0, 70.0]) if when not in ends else 2.0
            shrink = short if pr.random() < 0.2 else 0.0  # the tile (+200 m) sticks out of this footprint
            baseline = "04.00" if pr.random() < 0.3 else "02.09"
            assets = json.loads(json.dumps(s2_assets))
            if baseline >= "04.00":
                for a in assets.values():
                    for b in a["raster:bands"]:
                        if "offset" in b:
                            b["offset"] = -0.1
            item_id = f"S2A_MSIL2A_{when:%Y%m%dT%H%M%S}_R0{i % 10}_{tid}"
            self._add(S2, item_id, footprint(shrink), when, {
                "eo:cloud_cover": cloud, "proj:epsg": epsg, "s2:processing_baseline": baseline,
                "platform": "Sentinel-2A", "s2:mgrs_tile": tid}, assets)

        # Sentinel-1 RTC (linear gamma0, float32, nodata -32768): files per pass
        s1_files = {}
        for orbit in ("ascending", "descending"):
            for pol in ("vv", "vh"):
                name = f"{tid}_S1_{orbit}_{pol}.tif"
                data = (0.02 + 0.2 * _smooth(rng, n10, n10) * (1.0 if pol == "vv" else 0.2)).astype(np.float32)
                data[-1, :] = -32768.0
                write_cog(self.root / "cogs" / name, data, crs, Affine(10, 0, x0, 0, -10, y1), -32768.0)
                s1_files[(orbit, pol)] = name
        day = dt.datetime(2017, 1, 2, 5, 50, tzinfo=dt.timezone.utc) + dt.timedelta(days=pr.randint(0, 12))
        k = 0
        while day < dt.datetime(2021, 1, 2, tzinfo=dt.timezone.utc):
            orbit = "ascending" if k % 2 == 0 else "descending"
            mode = "EW" if pr.random() < 0.15 else "IW"
            shrink = short if pr.random() < 0.15 else 0.0
            assets = {pol: {"href": self._href(s1_files[(orbit, pol)]), "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                            "roles": ["data"], "raster:bands": [{"nodata": -32768, "data_type": "float32"}]}
                      for pol in ("vv", "vh")}
            self._add(S1, f"S1A_{mode}_GRDH_1SDV_{day:%Y%m%dT%H%M%S}_{tid}_rtc", footprint(shrink), day, {
                "sat:orbit_state": orbit, "sar:instrument_mode": mode, "sar:polarizations": ["VV", "VH"],
                "proj:epsg": epsg, "platform": "SENTINEL-1A"}, assets)
            day += dt.timedelta(days=7, hours=pr.randint(-20, 20))
            k += 1

        # Copernicus DEM GLO-30: two pieces in EPSG:4326 at 1 arc second, split at the centroid's longitude
        lon0, lat0 = tile.lon, tile.lat
        dlat = 0.03
        dlon = 0.03 / max(math.cos(math.radians(lat0)), 0.2)
        res_deg = 1.0 / 3600.0
        top = math.ceil((lat0 + dlat) / res_deg) * res_deg
        nrows = int(round(2 * dlat / res_deg))
        for piece, (a, b) in enumerate(((lon0 - dlon, lon0), (lon0, lon0 + dlon))):
            left = math.floor(a / res_deg) * res_deg
            ncols = int(round((b - left) / res_deg)) + (0 if piece == 0 else 1)
            lons = left + (np.arange(ncols) + 0.5) * res_deg
            lats = top - (np.arange(nrows) + 0.5) * res_deg
            elev = (300.0 + 2000.0 * (lons[None, :] - lon0) + 1500.0 * (lats[:, None] - lat0)).astype(np.float32)
            name = f"{tid}_DEM_{piece}.tif"
            write_cog(self.root / "cogs" / name, elev, "EPSG:4326", Affine(res_deg, 0, left, 0, -res_deg, top), None)
            right = left + ncols * res_deg
            geom = {"type": "Polygon", "coordinates": [[[left, top], [right, top], [right, top - nrows * res_deg],
                                                        [left, top - nrows * res_deg], [left, top]]]}
            self._add(DEM, f"Copernicus_DSM_COG_10_{tid}_{piece}_DEM", geom, dt.datetime(2021, 4, 22, tzinfo=dt.timezone.utc),
                      {"gsd": 30, "proj:epsg": 4326}, {"data": {"href": self._href(name), "roles": ["data"],
                                                                 "raster:bands": [{"data_type": "float32", "unit": "metre"}]}})

        # ESA WorldCover v100 (2020) and v200 (2021), EPSG:4326 at 1/12000 degree
        res_deg = 1.0 / 12000.0
        left = math.floor((lon0 - dlon) / res_deg) * res_deg
        top = math.ceil((lat0 + dlat) / res_deg) * res_deg
        ncols, nrows = int(round(2 * dlon / res_deg)), int(round(2 * dlat / res_deg))
        classes = np.array([10, 20, 30, 40, 50, 60, 80], np.uint8)
        for version, year in (("1.0.0", 2020), ("2.0.0", 2021)):
            field_ = _smooth(rng, nrows, ncols)
            data = classes[np.minimum((field_ * len(classes)).astype(int), len(classes) - 1)]
            if version == "2.0.0":
                data[:] = 95
            name = f"{tid}_WC_{year}.tif"
            write_cog(self.root / "cogs" / name, data, "EPSG:4326", Affine(res_deg, 0, left, 0, -res_deg, top), 0)
            right, bottom = left + ncols * res_deg, top - nrows * res_deg
            geom = {"type": "Polygon", "coordinates": [[[left, top], [right, top], [right, bottom], [left, bottom], [left, top]]]}
            self._add(WORLDCOVER, f"ESA_WorldCover_10m_{year}_v{version[0]}00_{tid}", geom,
                      dt.datetime(year, 1, 1, tzinfo=dt.timezone.utc),
                      {"esa_worldcover:product_version": version, "start_datetime": f"{year}-01-01T00:00:00Z",
                       "end_datetime": f"{year}-12-31T23:59:59Z", "proj:epsg": 4326},
                      {"map": {"href": self._href(name), "roles": ["data"],
                               "raster:bands": [{"nodata": 0, "data_type": "uint8"}]}})

    def _add(self, collection: str, item_id: str, geometry: dict, when: dt.datetime, props: dict, assets: dict) -> None:
        from shapely.geometry import shape

        g = shape(geometry)
        self.items.append({
            "type": "Feature", "stac_version": "1.0.0", "id": item_id, "collection": collection,
            "geometry": geometry, "bbox": list(g.bounds),
            "properties": {"datetime": _iso(when), **props}, "assets": assets,
            "links": [], "stac_extensions": [],
            "_shape": g, "_time": when,
        })

    # -- queries ------------------------------------------------------------
    def match(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The items a search body selects: every filter applied, sorted by id."""
        from shapely.geometry import box, shape

        colls = set(body.get("collections") or [])
        if body.get("intersects"):
            area = shape(body["intersects"])
        elif body.get("bbox"):
            area = box(*body["bbox"])
        else:
            area = None
        start = end = None
        if body.get("datetime"):
            a, _, b = str(body["datetime"]).partition("/")
            start = None if a in ("", "..") else _parse_time(a)
            end = None if b in ("", "..") else _parse_time(b)
        out = []
        for it in self.items:
            if colls and it["collection"] not in colls:
                continue
            if area is not None and not it["_shape"].intersects(area):
                continue
            if start is not None and it["_time"] < start:
                continue
            if end is not None and it["_time"] > end:
                continue
            if not _query_ok(it["properties"], body.get("query") or {}):
                continue
            out.append(it)
        return sorted(out, key=lambda i: i["id"])

    def public(self, item: dict[str, Any], base: str) -> dict[str, Any]:
        doc = {k: v for k, v in item.items() if not k.startswith("_")}
        return json.loads(json.dumps(doc).replace("{BASE}", base))

    # -- server ---------------------------------------------------------------
    def __enter__(self) -> "FakeStac":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _send(self, status: int, body: bytes, ctype: str = "application/json", extra: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self._leave()  # done before the reply goes out: the client may start its next request at once
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _fault(self) -> bool:
                path = urllib.parse.urlparse(self.path).path
                with fake._lock:
                    for prefix, statuses in fake.faults.items():
                        if path.startswith(prefix) and statuses:
                            status = statuses.pop(0)
                            break
                    else:
                        return False
                fake.reads.append(Request(self.command, path, status, t0=time.monotonic()))
                self._send(status, b'{"detail": "fault"}', extra={"Retry-After": str(fake.retry_after_s)})
                return True

            def _enter(self):
                self._left = False
                with fake._lock:
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                if fake.latency_s:
                    time.sleep(fake.latency_s)

            def _leave(self):
                if self._left:
                    return
                self._left = True
                with fake._lock:
                    fake.in_flight -= 1

            def do_GET(self):
                self._enter()
                try:
                    if self._fault():
                        return
                    self._get()
                finally:
                    self._leave()

            do_HEAD = do_GET

            def do_POST(self):
                self._enter()
                try:
                    n = int(self.headers.get("Content-Length") or 0)
                    raw = self.rfile.read(n)
                    if self._fault():
                        return
                    path = urllib.parse.urlparse(self.path).path
                    if path.rstrip("/") != "/search":
                        return self._send(404, b'{"detail": "not found"}')
                    self._search(json.loads(raw or b"{}"))
                finally:
                    self._leave()

            def _base(self) -> str:
                return f"http://127.0.0.1:{fake.port}"

            def _get(self):
                path = urllib.parse.urlparse(self.path).path
                if path in ("", "/"):
                    base = self._base()
                    doc = {"type": "Catalog", "id": "fake-planetary-computer", "stac_version": "1.0.0",
                           "description": "fake", "conformsTo": CONFORMANCE,
                           "links": [{"rel": "self", "href": base + "/", "type": "application/json"},
                                     {"rel": "root", "href": base + "/", "type": "application/json"},
                                     {"rel": "search", "href": base + "/search", "method": "POST",
                                      "type": "application/geo+json"},
                                     {"rel": "search", "href": base + "/search", "method": "GET",
                                      "type": "application/geo+json"}]}
                    return self._send(200, json.dumps(doc).encode())
                if path.startswith("/cogs/"):
                    name = path[len("/cogs/"):]
                    if "/" in name or name not in fake.sizes:
                        return self._send(404, b"")
                    return self._file(name)
                return self._send(404, b'{"detail": "not found"}')

            def _file(self, name: str):
                size = fake.sizes[name]
                rng = self.headers.get("Range")
                if self.command == "HEAD":
                    fake.reads.append(Request("HEAD", name, 200, t0=time.monotonic()))
                    self.send_response(200)
                    self.send_header("Content-Length", str(size))
                    self.send_header("Accept-Ranges", "bytes")
                    self._leave()
                    self.end_headers()
                    return
                with open(fake.root / "cogs" / name, "rb") as fh:
                    if rng and rng.startswith("bytes="):
                        a, _, b = rng[6:].split(",")[0].partition("-")
                        a = int(a)
                        b = min(int(b) if b else size - 1, size - 1)
                        fh.seek(a)
                        body = fh.read(b - a + 1)
                        fake.reads.append(Request("GET", name, 206, (a, b), len(body)))
                        return self._send(206, body, "image/tiff",
                                          {"Content-Range": f"bytes {a}-{b}/{size}", "Accept-Ranges": "bytes"})
                    body = fh.read()
                fake.reads.append(Request("GET", name, 200, None, len(body)))
                return self._send(200, body, "image/tiff")

            def _search(self, body: dict[str, Any]):
                fake.searches.append(json.loads(json.dumps(body)))
                fake.search_times.append(time.monotonic())
                limit = min(int(body.get("limit") or 10), fake.page_limit)
                token = int(body.get("token") or 0)
                found = fake.match(body)
                page = found[token:token + limit]
                base = self._base()
                links = [{"rel": "root", "href": base + "/"}]
                if token + limit < len(found):
                    links.append({"rel": "next", "href": base + "/search", "method": "POST", "merge": False,
                                  "body": {**body, "token": token + limit}, "type": "application/geo+json"})
                doc = {"type": "FeatureCollection", "features": [fake.public(i, base) for i in page], "links": links,
                       "context": {"returned": len(page), "limit": limit, "matched": len(found)}}
                self._send(200, json.dumps(doc).encode(), "application/geo+json")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    # -- checks -----------------------------------------------------------------
    def whole_file_reads(self) -> list[str]:
        """COG GETs without a Range header (whole-file downloads)."""
        return [r.path for r in self.reads if r.method == "GET" and r.status == 200 and r.range is None
                and r.path in self.sizes]

    def bytes_by_file(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.reads:
            if r.range is not None:
                out[r.path] = out.get(r.path, 0) + r.nbytes
        return out


def _query_ok(props: dict[str, Any], query: dict[str, Any]) -> bool:
    for name, ops in query.items():
        v = props.get(name)
        for op, ref in ops.items():
            if v is None:
                return False
            ok = {"lt": lambda: v < ref, "lte": lambda: v <= ref, "gt": lambda: v > ref, "gte": lambda: v >= ref,
                  "eq": lambda: v == ref, "neq": lambda: v != ref, "in": lambda: v in ref}.get(op)
            if ok is None:
                raise ValueError(f"fake STAC: unknown query operator {op!r}")
            if not ok():
                return False
    return True
