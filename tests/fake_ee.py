"""A loopback fake of the Earth Engine REST API for tests.

The real ``earthengine-api`` client talks to it over HTTP on 127.0.0.1, so
tests exercise the client's real serialization, authentication, retry and
timeout behaviour without reaching Google::

    with FakeEarthEngine(latency={"value": 0.05}) as fake:
        initialize_ee(fake)          # ee.Initialize(credentials=..., url=fake.url, project=fake.project)
        ee.data.computeValue(...)

Endpoints served (any version prefix ``v1``, ``v1alpha``, ``v1beta``):

* ``POST /token``: the google-auth service-account JWT grant (the signature of
  the assertion is checked against the key of :meth:`FakeEarthEngine.service_account_info`).
* ``GET /$discovery/rest``: the discovery document shipped in ``ee/tests``.
* ``GET /<v>/projects/<project>/algorithms``: ``ee/tests/algorithms.json``.
* ``POST /<v>/projects/<project>/value:compute``: the value of the expression.
* ``POST /<v>/projects/<project>/image:computePixels``: the image of the
  expression on the requested grid, as NPY bytes (a structured array).

Answers come from evaluating the serialized expression graph (see
:class:`Evaluator`): collection ids, filters (bounds, dates end-exclusive,
metadata, containment of a buffered geometry), band selections, reducers and
resampling, over a catalogue of scenes generated per tile location
(:class:`Catalogue`: Sentinel-2 scenes with cloud cover, footprints and dates,
Sentinel-1 scenes with orbit pass and instrument mode, monthly ERA5 images,
Dynamic World, the single-image assets). Nothing is read from a plain request
dictionary: a wrong collection id, a dropped filter or a wrong reducer changes
the answer or fails. The tile a request is about (for counters and scripted
faults) is found from the tile polygon or the Sentinel-2 scene the expression
loads (:func:`identify`); ``tiles`` names them.

API requests (algorithms, value:compute, computePixels) need ``Authorization:
Bearer <token issued by /token>``; errors are answered with Earth Engine's
error bodies (``{"error": {"code", "message", "status"}}``).
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import secrets
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable

import numpy as np

logger = logging.getLogger("fake_ee")

#: Fill value of missing pixels (the source unmasks with it).
MISSING_VALUE: float = -3.0e38

#: Earth Engine error bodies per fault / status code: (code, message, status).
EE_ERRORS: dict[str, tuple[int, str, str]] = {
    "400": (400, "Invalid argument.", "INVALID_ARGUMENT"),
    "401": (
        401,
        "Request had invalid authentication credentials. Expected OAuth 2 access token, "
        "login cookie or other valid authentication credential.",
        "UNAUTHENTICATED",
    ),
    "403": (403, "The caller does not have permission.", "PERMISSION_DENIED"),
    "404": (404, "Requested entity was not found.", "NOT_FOUND"),
    "429": (429, "Too many concurrent requests.", "RESOURCE_EXHAUSTED"),
    "500": (500, "An internal error has occurred.", "INTERNAL"),
    "503": (503, "The service is currently unavailable.", "UNAVAILABLE"),
}

#: Fault names understood by ``faults`` / ``fault_kinds``.
FAULT_NAMES: frozenset[str] = frozenset({"429", "500", "503", "400", "drop", "slow", "empty_result",
                                         "bad_count"})

S2_BANDS_L2A: tuple[str, ...] = (
    "B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12",
    "AOT", "WVP", "SCL", "TCI_R", "TCI_G", "TCI_B", "MSK_CLDPRB", "MSK_SNWPRB",
    "QA10", "QA20", "QA60",
)
S2_BANDS_L1C: tuple[str, ...] = (
    "B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12",
    "QA10", "QA20", "QA60",
)

# Probability that an L2A scene lacks MSK_CLDPRB.
P_NO_CLDPRB = 0.1

#: Largest computePixels answer the real service allows (bytes).
MAX_PIXELS_BYTES = 48 * 1024 * 1024

_API_PATH = re.compile(
    r"^/(?P<version>v1(?:alpha|beta)?)/projects/(?P<project>[^/]+)/"
    r"(?P<method>algorithms|value:compute|image:computePixels)$"
)
_KIND_OF_METHOD = {"algorithms": "algorithms", "value:compute": "value", "image:computePixels": "pixels"}


# --------------------------------------------------------------------------- helpers


def _unit(*parts: Any) -> float:
    """A deterministic number in [0, 1) from ``parts`` (a stable hash)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _seed(*parts: Any) -> int:
    """A deterministic 64-bit seed from ``parts``."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def ee_error_body(code: int | str, message: str | None = None) -> dict[str, Any]:
    """An Earth Engine error body: ``{"error": {"code", "message", "status"}}``."""
    default_code, default_message, status = EE_ERRORS.get(str(code), EE_ERRORS["500"])
    return {"error": {"code": int(default_code), "message": message or default_message, "status": status}}


def _ee_data_dir() -> str:
    """The ``tests`` directory of the installed ``ee`` package."""
    import ee  # local import: the fake itself does not need the client

    return os.path.join(os.path.dirname(ee.__file__), "tests")


_FILE_CACHE: dict[str, bytes] = {}
_FILE_LOCK = threading.Lock()


def _ee_test_file(name: str) -> bytes:
    """Bytes of ``ee/tests/<name>``, read once per process."""
    with _FILE_LOCK:
        if name not in _FILE_CACHE:
            with open(os.path.join(_ee_data_dir(), name), "rb") as fh:
                _FILE_CACHE[name] = fh.read()
        return _FILE_CACHE[name]


_KEY_LOCK = threading.Lock()
_PRIVATE_KEY: Any = None
_PRIVATE_KEY_PEM: str | None = None


def _private_key() -> tuple[Any, str]:
    """The process-wide RSA key (generated once) and its PKCS#8 PEM."""
    global _PRIVATE_KEY, _PRIVATE_KEY_PEM
    with _KEY_LOCK:
        if _PRIVATE_KEY is None:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import rsa

            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _PRIVATE_KEY = key
            _PRIVATE_KEY_PEM = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode()
        assert _PRIVATE_KEY_PEM is not None
        return _PRIVATE_KEY, _PRIVATE_KEY_PEM


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


#: The ``aud`` google-auth puts in every service-account grant, whatever ``token_uri`` is.
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"


def _verify_jwt(assertion: str, audiences: Iterable[str]) -> dict[str, Any] | None:
    """The claims of an RS256 JWT signed with the process key, or None if invalid."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    try:
        header_b64, payload_b64, signature_b64 = assertion.split(".")
        header = json.loads(_b64url_decode(header_b64))
        claims = json.loads(_b64url_decode(payload_b64))
        if header.get("alg") != "RS256":
            return None
        key, _ = _private_key()
        key.public_key().verify(
            _b64url_decode(signature_b64),
            f"{header_b64}.{payload_b64}".encode(),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    except (ValueError, InvalidSignature, json.JSONDecodeError):
        return None
    if not isinstance(claims, dict) or claims.get("aud") not in set(audiences):
        return None
    if float(claims.get("exp", 0)) < time.time() - 60:
        return None
    return claims


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --------------------------------------------------------------------------- metadata answers


class BadRequest(ValueError):
    """A request the fake answers with 400 INVALID_ARGUMENT."""


def utm_epsg(lat: float, lon: float) -> int:
    """The WGS 84 / UTM EPSG code of (lat, lon) (standard 6-degree zones)."""
    zone = int(math.floor((lon + 180.0) / 6.0)) % 60 + 1
    return (32600 if lat >= 0 else 32700) + zone


_TRANSFORMERS = threading.local()


def _project(lat: float, lon: float, epsg: int) -> tuple[float, float]:
    """(x, y) of (lat, lon) in ``epsg`` (pyproj; transformers cached per thread)."""
    from pyproj import Transformer

    cache: dict[int, Any] = getattr(_TRANSFORMERS, "cache", None) or {}
    _TRANSFORMERS.cache = cache
    if epsg not in cache:
        cache[epsg] = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
    x, y = cache[epsg].transform(lon, lat)
    return float(x), float(y)


_LAT_BANDS = "CDEFGHJKLMNPQRSTUVWX"
_MGRS_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


def _mgrs_name(lat: float, lon: float, tile_id: str) -> str:
    """A plausible MGRS tile name (zone, latitude band, two square letters)."""
    zone = int(math.floor((lon + 180.0) / 6.0)) % 60 + 1
    band = _LAT_BANDS[min(max(int((lat + 80.0) // 8), 0), len(_LAT_BANDS) - 1)]
    a = _MGRS_LETTERS[int(_unit(tile_id, "mgrs1") * len(_MGRS_LETTERS))]
    b = _MGRS_LETTERS[int(_unit(tile_id, "mgrs2") * 20)]
    return f"{zone:02d}{band}{a}{b}"


def _parse_date(value: Any, name: str) -> dt.date:
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError as exc:
        raise BadRequest(f"Invalid date in request field '{name}': {value!r}.") from exc


def _shift_month(year: int, month: int, delta: int) -> tuple[int, int]:
    ordinal = year * 12 + (month - 1) + delta
    return ordinal // 12, ordinal % 12 + 1


# --------------------------------------------------------------------------- pixel answers


def _smooth_field(seed: int, height: int, width: int, scale: float = 40.0, octaves: int = 4) -> np.ndarray:
    """A smooth deterministic field in [0, 1] of shape (height, width).

    Sum of plane waves; each wave sin(fx*x + fy*y + p) is built from 1-D sines and
    cosines (sin(a+b) = sin a cos b + cos a sin b) so no 2-D trigonometry is needed:
    the fake must stay cheap next to the code it serves."""
    rng = np.random.default_rng(seed)
    yy = np.arange(height, dtype=np.float64)
    xx = np.arange(width, dtype=np.float64)
    total = np.zeros((height, width), dtype=np.float64)
    weight = 0.0
    for k in range(octaves):
        amp = 0.6**k
        s = scale / (1.7**k)
        angle = rng.uniform(0.0, 2.0 * math.pi)
        phase = rng.uniform(0.0, 2.0 * math.pi)
        fx, fy = math.cos(angle) / s, math.sin(angle) / s
        ax = 2.0 * math.pi * fx * xx
        by = 2.0 * math.pi * fy * yy + phase
        total += amp * (np.outer(np.cos(by), np.sin(ax)) + np.outer(np.sin(by), np.cos(ax)))
        weight += amp
    return (total / weight + 1.0) / 2.0


def _classes(field: np.ndarray, thresholds: list[float], codes: list[float]) -> np.ndarray:
    """Quantize ``field`` in [0, 1]: codes[i] where field < thresholds[i] (last: rest)."""
    idx = np.searchsorted(np.asarray(thresholds), field, side="right")
    return np.asarray(codes, dtype=np.float64)[np.minimum(idx, len(codes) - 1)]


_S2_PROFILE = {
    "B1": 1200, "B2": 900, "B3": 1000, "B4": 800, "B5": 1300, "B6": 2200, "B7": 2600, "B8": 2800,
    "B8A": 2900, "B9": 700, "B10": 25, "B11": 2000, "B12": 1100,
}
_WORLDCOVER = [10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100]
_DW_PROBS = {
    "water", "trees", "grass", "flooded_vegetation", "crops", "shrub_and_scrub", "built", "bare", "snow_and_ice",
}


def _elevation(tile_id: str, height: int, width: int) -> np.ndarray:
    base = 2500.0 * _unit(tile_id, "elevation_base") ** 2
    relief = 50.0 + 500.0 * _unit(tile_id, "relief")
    elev = base + relief * _smooth_field(_seed(tile_id, "elevation"), height, width, scale=60.0)
    return np.clip(elev, 0.0, 3000.0)


def band_values(tile_id: str, band_id: str, height: int, width: int) -> np.ndarray:
    """Deterministic plausible values (float64, (height, width)) of one band id.

    ``band_id`` is ``"<group>__<band>"``; unknown ids give zeros.
    """
    group, _, band = band_id.partition("__")
    shape = (height, width)
    field = _smooth_field(_seed(tile_id, band_id), height, width)
    common = _smooth_field(_seed(tile_id, group, "common"), height, width)

    if group == "sentinel2":
        if band in _S2_PROFILE:
            refl = _S2_PROFILE[band] * (0.6 + 0.8 * common) * (0.9 + 0.2 * field)
            return np.clip(np.round(refl), 1.0, 10000.0)
        if band == "AOT":
            return np.round(50.0 + 250.0 * field)
        if band == "WVP":
            return np.round(500.0 + 3000.0 * field)
        if band in ("TCI_R", "TCI_G", "TCI_B"):
            return np.round(np.clip(40.0 + 160.0 * common + 30.0 * field, 0.0, 255.0))
        if band == "SCL":
            return _classes(field, [0.08, 0.12, 0.55, 0.75, 0.85, 0.93], [6, 3, 4, 5, 7, 8, 9])
        if band == "QA60":
            return _classes(field, [0.85, 0.95], [0, 1024, 2048])
        if band == "MSK_CLDPRB":
            return np.clip(np.round((field - 0.5) * 200.0), 0.0, 100.0)
        if band == "MSK_SNWPRB":
            return np.clip(np.round((field - 0.8) * 500.0), 0.0, 100.0)
        return np.zeros(shape)  # QA10, QA20 and unknown bands
    if group in ("sentinel1_asc", "sentinel1_desc", "sentinel1"):
        co = -20.0 + 12.0 * common + 4.0 * (field - 0.5)
        if band in ("VV", "HH"):
            return np.clip(co, -25.0, 0.0)
        if band in ("VH", "HV"):
            return np.clip(co - 7.0, -25.0, 0.0)
        if band == "angle":
            return 30.0 + 16.0 * np.broadcast_to(np.linspace(0.0, 1.0, width)[None, :], shape)
        return np.zeros(shape)
    if group == "aster":
        elev = _elevation(tile_id, height, width)
        if band == "elevation":
            return elev
        if band == "slope":
            gy, gx = np.gradient(elev, 10.0)
            return np.clip(np.degrees(np.arctan(np.hypot(gx, gy))) * 3.0, 0.0, 60.0)
        return np.zeros(shape)
    if group == "dynamic_world":
        if band == "label":
            return _classes(field, [0.1, 0.3, 0.4, 0.45, 0.6, 0.7, 0.8, 0.9], [1, 2, 3, 4, 5, 6, 7, 8, 9])
        if band in _DW_PROBS:
            return field
        return np.zeros(shape)
    if group == "canopy_height_eth":
        height_m = np.clip(45.0 * common - 5.0, 0.0, 40.0)
        if band == "height":
            return height_m
        if band == "std":
            return np.clip(0.5 + 0.2 * height_m + field, 0.0, 10.0)
        return np.zeros(shape)
    if group == "esa_worldcover" and band == "Map":
        return _classes(common, [0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.72, 0.8, 0.85, 0.9], _WORLDCOVER)
    return np.zeros(shape)


def missing_rows(tile_id: str, band_ids: list[str], height: int, fraction: float) -> tuple[str, slice] | None:
    """Which band (and rows) of a tile's answer is filled with :data:`MISSING_VALUE`, if any."""
    if not band_ids or fraction <= 0.0 or _unit(tile_id, "missing") >= fraction:
        return None
    band = band_ids[int(_unit(tile_id, "missing_band") * len(band_ids))]
    n = max(1, min(height, 2 + int(_unit(tile_id, "missing_n") * 4)))
    r0 = int(_unit(tile_id, "missing_r0") * max(1, height - n + 1))
    return band, slice(r0, r0 + n)


def _jsonable(v: Any) -> Any:
    if isinstance(v, FDate):
        return {"type": "Date", "value": v.ms}
    if isinstance(v, (FImage, FFeature, FCollection)):
        raise BadRequest(f"value:compute of a {type(v).__name__[1:]} is not supported by fake_ee.")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return v
    return v


# --------------------------------------------------------------------------- the expression evaluator
#
# The fake answers by evaluating the serialized expression graph the client sends
# (``{"result": ref, "values": {ref: node}}``; nodes ``constantValue``,
# ``integerValue``, ``arrayValue``, ``dictionaryValue``, ``valueReference``,
# ``functionInvocationValue`` (``functionName`` + ``arguments``),
# ``functionDefinitionValue`` and ``argumentReference``) over a small catalogue
# generated per tile location (see :class:`Catalogue`). Unknown functions are an
# error (400), so a change in what the source asks is noticed.

MS_PER_DAY = 86_400_000
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def _ms(d: dt.datetime) -> int:
    return int((d - _EPOCH).total_seconds() * 1000)


def _from_ms(ms: float) -> dt.datetime:
    return _EPOCH + dt.timedelta(milliseconds=float(ms))


class FDate:
    def __init__(self, ms: float):
        self.ms = float(ms)

    @property
    def dt(self) -> dt.datetime:
        return _from_ms(self.ms)


class FBand:
    """One band of an image: a name, how its values come about (``fn(ctx)`` -> array
    on the request's grid), its resampling and where it comes from (for checks)."""

    def __init__(self, name: str, fn: Any, origin: tuple[str, str], resample: str = "nearest"):
        self.name, self.fn, self.origin, self.resample = name, fn, origin, resample

    def but(self, **kw: Any) -> "FBand":
        b = FBand(self.name, self.fn, self.origin, self.resample)
        for k, v in kw.items():
            setattr(b, k, v)
        return b


class FImage:
    """An image: bands (a list, or a callable making it on first use), properties, footprint."""

    def __init__(self, bands: Any, props: dict[str, Any] | None = None, footprint: Any = None,
                 crs: str = "EPSG:4326", transform: list[float] | None = None):
        self._bands = bands
        self.props = dict(props or {})
        self.footprint = footprint  # shapely geometry (lon/lat) or None = everywhere
        self.crs = crs
        self.transform = transform or [1, 0, 0, 0, 1, 0]

    @property
    def bands(self) -> list[FBand]:
        if callable(self._bands):
            self._bands = self._bands()
        return self._bands

    @bands.setter
    def bands(self, value: list[FBand]) -> None:
        self._bands = value

    def but(self, **kw: Any) -> "FImage":
        out = FImage(self._bands if callable(self._bands) else list(self._bands), self.props, self.footprint, self.crs, self.transform)
        for k, v in kw.items():
            setattr(out, k, v)
        return out

    def band_names(self) -> list[str]:
        return [b.name for b in self.bands]


class FFeature:
    def __init__(self, geometry: Any, props: dict[str, Any] | None = None):
        self.footprint = geometry
        self.props = dict(props or {})


class FCollection:
    def __init__(self, elements: list[Any], cid: str = ""):
        self.elements = elements
        self.cid = cid


class FFunction:
    def __init__(self, arg_names: list[str], body: str, evaluator: "Evaluator"):
        self.arg_names, self.body, self.evaluator = arg_names, body, evaluator

    def __call__(self, *args: Any) -> Any:
        return self.evaluator.eval_ref(self.body, dict(zip(self.arg_names, args)))


def _props_of(el: Any) -> dict[str, Any]:
    return el.props if isinstance(el, (FImage, FFeature)) else {}


def _geometry_of(el: Any) -> Any:
    return el.footprint if isinstance(el, (FImage, FFeature)) else el


def _blur(a: np.ndarray) -> np.ndarray:
    """What bilinear resampling does to a band here: a 3x3 mean (class codes stop being codes)."""
    p = np.pad(a, 1, mode="edge")
    return sum(p[i:i + a.shape[0], j:j + a.shape[1]] for i in range(3) for j in range(3)) / 9.0


def _metres_to_deg(lat: float, m: float) -> tuple[float, float]:
    return m / (111_320.0 * max(math.cos(math.radians(lat)), 1e-6)), m / 110_574.0


def _buffer(geom: Any, metres: float) -> Any:
    """A buffer in metres (local equirectangular approximation; good to < 1 m at tile size)."""
    import shapely.affinity

    c = geom.centroid
    kx, ky = _metres_to_deg(c.y, 1.0)
    local = shapely.affinity.scale(geom, 1 / kx, 1 / ky, origin=c)
    return shapely.affinity.scale(local.buffer(metres, 16, join_style="mitre") if metres else local, kx, ky, origin=c)


class Evaluator:
    """Evaluates one serialized expression against ``catalogue``; records what it did."""

    def __init__(self, expression: dict[str, Any], catalogue: "Catalogue"):
        self.values = expression.get("values") or {}
        self.result = expression.get("result")
        self.catalogue = catalogue
        self.memo: dict[str, Any] = {}
        self._purity: dict[str, bool] = {}
        self.calls: list[str] = []  # function names, in evaluation order (tests read them)
        self.tile_name: str | None = None
        self.polygons: list[tuple[str, Any]] = []  # the tile polygons of the expression

    def invocations(self, function: str) -> list[dict[str, Any]]:
        """Every invocation of ``function`` anywhere in the graph (nested ones included)."""
        found, stack = [], list(self.values.values())
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                f = node.get("functionInvocationValue")
                if isinstance(f, dict) and f.get("functionName") == function:
                    found.append(f)
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
        return found

    def run(self) -> Any:
        seen = set()
        for f in self.invocations("GeometryConstructors.Polygon"):  # tile polygons first: global
            coords = self.eval_node(f["arguments"]["coordinates"], {})  # collections answer for them
            name = self.catalogue.tile_name(coords)
            if name in seen:
                continue
            seen.add(name)
            poly = _polygon(self, coords)
            self.catalogue.register(name, poly)
            self.polygons.append((name, poly))
            self.tile_name = self.tile_name or name
        return self.eval_ref(self.result, {})

    def _pure(self, ref: str) -> bool:
        """Whether ``ref`` uses no function argument (then one value serves every call)."""
        got = self._purity.get(ref)
        if got is None:
            self._purity[ref] = True  # (graphs are acyclic)
            refs, stack, pure = [], [self.values[ref]], True
            while stack and pure:
                node = stack.pop()
                if isinstance(node, dict):
                    if "argumentReference" in node:
                        pure = False
                    elif "valueReference" in node:
                        refs.append(node["valueReference"])
                    else:
                        stack.extend(node.values())
                elif isinstance(node, list):
                    stack.extend(node)
            got = pure and all(self._pure(r) for r in refs)
            self._purity[ref] = got
        return got

    def eval_ref(self, ref: str, scope: dict[str, Any]) -> Any:
        if ref in self.memo:
            return self.memo[ref]
        pure = not scope or self._pure(ref)
        out = self.eval_node(self.values[ref], {} if pure else scope)
        if pure:
            self.memo[ref] = out
        return out

    def eval_node(self, node: Any, scope: dict[str, Any]) -> Any:
        if not isinstance(node, dict) or len(node) != 1:
            raise BadRequest(f"Invalid expression node {str(node)[:80]}.")
        (kind, v), = node.items()
        if kind == "constantValue":
            return v
        if kind == "integerValue":
            return int(v)
        if kind == "valueReference":
            return self.eval_ref(v, scope)
        if kind == "arrayValue":
            return [self.eval_node(x, scope) for x in v.get("values", [])]
        if kind == "dictionaryValue":
            return {k: self.eval_node(x, scope) for k, x in (v.get("values") or {}).items()}
        if kind == "argumentReference":
            return scope[v]
        if kind == "functionDefinitionValue":
            return FFunction(list(v.get("argumentNames") or []), v["body"], self)
        if kind == "functionInvocationValue":
            name = v.get("functionName")
            impl = _FUNCTIONS.get(name)
            if impl is None:
                raise BadRequest(f"Unknown algorithm: {name}.")
            self.calls.append(name)
            args = {k: self.eval_node(x, scope) for k, x in (v.get("arguments") or {}).items()}
            return impl(self, **args)
        raise BadRequest(f"Invalid expression node kind {kind}.")


_FUNCTIONS: dict[str, Any] = {}


def _fn(name: str):
    def deco(f):
        _FUNCTIONS[name] = f
        return f
    return deco


# ---- numbers, lists, dictionaries, strings
for _name, _op in {
    "Number.eq": lambda a, b: int(a == b), "Number.gt": lambda a, b: int(a > b), "Number.lt": lambda a, b: int(a < b),
    "Number.or": lambda a, b: int(bool(a) or bool(b)), "Number.and": lambda a, b: int(bool(a) and bool(b)),
    "Number.min": min, "Number.max": max, "Number.subtract": lambda a, b: a - b, "Number.add": lambda a, b: a + b,
    "Number.multiply": lambda a, b: a * b,
}.items():
    _FUNCTIONS[_name] = (lambda op: lambda ev, left, right: op(left, right))(_op)
_FUNCTIONS["Number.abs"] = lambda ev, input: abs(input)
_FUNCTIONS["Number.floor"] = lambda ev, input: math.floor(input)
_FUNCTIONS["If"] = lambda ev, condition, trueCase=None, falseCase=None: trueCase if condition else falseCase


@_fn("List.get")
def _list_get(ev, list, index):  # noqa: A002 - EE's argument names
    index = int(index)
    if not 0 <= index < len(list):
        raise BadRequest(f"List.get: List index must be between 0 and {len(list) - 1}, inclusive; got {index}.")
    return list[index]


_FUNCTIONS["List.add"] = lambda ev, list, element: [*list, element]  # noqa: A002
_FUNCTIONS["List.map"] = lambda ev, list, baseAlgorithm, dropNulls=False: [  # noqa: A002
    r for r in (baseAlgorithm(x) for x in list) if not (dropNulls and r is None)]
_FUNCTIONS["List.remove"] = lambda ev, list, element: (  # noqa: A002
    [x for i, x in enumerate(list) if i != list.index(element)] if element in list else list)
_FUNCTIONS["Dictionary"] = lambda ev, input=None: dict(input or {})
_FUNCTIONS["String"] = lambda ev, input: str(input)
_FUNCTIONS["String.split"] = lambda ev, string, regex, flags=None: re.split(regex, string)
_FUNCTIONS["Number.parse"] = lambda ev, input, radix=10: (int(input) if re.fullmatch(r"-?\d+", input.strip())
                                                         else float(input))
_FUNCTIONS["Dictionary.get"] = lambda ev, dictionary, key: dictionary[key]


@_fn("Element.get")
def _element_get(ev, object, property):  # noqa: A002
    return _props_of(object).get(property)


@_fn("Element.set")
def _element_set(ev, object, key, value):  # noqa: A002
    out = object.but() if isinstance(object, FImage) else FFeature(object.footprint, object.props)
    out.props = {**object.props, key: value}
    return out


@_fn("Element.setMulti")
def _element_set_multi(ev, object, properties):  # noqa: A002
    out = object.but() if isinstance(object, FImage) else FFeature(object.footprint, object.props)
    out.props = {**object.props, **properties}
    return out


# ---- dates
@_fn("Date")
def _date(ev, value, timeZone=None):
    if isinstance(value, FDate):
        return value
    if isinstance(value, (int, float)):
        return FDate(value)
    if isinstance(value, str):
        try:
            d = dt.datetime.fromisoformat(value)
        except ValueError:
            raise BadRequest(f"Date: Unable to parse date '{value}'.") from None
        return FDate(_ms(d if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)))
    raise BadRequest(f"Date: Parameter 'value' is required and may not be null (got {value!r}).")


def _as_date(v: Any) -> FDate:
    return _date(None, v)


@_fn("DateRange")
def _date_range(ev, start, end=None, timeZone=None):
    return (_as_date(start).ms, _as_date(end).ms)


@_fn("Date.format")
def _date_format(ev, date, format=None, timeZone=None):  # noqa: A002
    if format != "YYYY-MM-dd":
        raise BadRequest(f"fake_ee: Date.format supports 'YYYY-MM-dd' only, got {format!r}.")
    return date.dt.strftime("%Y-%m-%d")


@_fn("Date.get")
def _date_get(ev, date, unit, timeZone=None):
    return {"year": date.dt.year, "month": date.dt.month, "day": date.dt.day}[unit]


@_fn("Date.fromYMD")
def _date_from_ymd(ev, year, month, day, timeZone=None):
    return FDate(_ms(dt.datetime(int(year), int(month), int(day), tzinfo=dt.timezone.utc)))


@_fn("Date.advance")
def _date_advance(ev, date, delta, unit, timeZone=None):
    d = date.dt
    if unit == "month":
        y, m = _shift_month(d.year, d.month, int(delta))
        return FDate(_ms(d.replace(year=y, month=m)))
    if unit == "year":
        return FDate(_ms(d.replace(year=d.year + int(delta))))
    if unit == "day":
        return FDate(date.ms + float(delta) * MS_PER_DAY)
    raise BadRequest(f"fake_ee: Date.advance unit {unit!r} not supported.")


@_fn("Date.difference")
def _date_difference(ev, date, start, unit):
    if unit != "day":
        raise BadRequest(f"fake_ee: Date.difference unit {unit!r} not supported.")
    return (date.ms - _as_date(start).ms) / MS_PER_DAY


# ---- geometry
@_fn("GeometryConstructors.Polygon")
def _polygon(ev, coordinates, evenOdd=True, proj=None, geodesic=None, maxError=None):
    import shapely

    try:
        poly = shapely.Polygon(coordinates[0], coordinates[1:])
    except (ValueError, TypeError, IndexError) as exc:
        raise BadRequest(f"Geometry.Polygon: LinearRing requires at least 3 points ({exc}).") from None
    if len(coordinates[0]) < 4 or not poly.is_valid or poly.area == 0:
        raise BadRequest("Geometry.Polygon: invalid polygon (LinearRing requires at least 3 points).")
    return poly


_FUNCTIONS["Feature"] = lambda ev, geometry, metadata=None: FFeature(geometry, metadata)
_FUNCTIONS["Geometry.buffer"] = lambda ev, geometry, distance, maxError=None, proj=None: _buffer(geometry, distance)
@_fn("Collection.geometry")
def _collection_geometry(ev, collection, maxError=None):
    import shapely

    geoms = [_geometry_of(e) for e in collection.elements]
    if geoms and all(g.geom_type == "Point" for g in geoms):
        return shapely.MultiPoint([(g.x, g.y) for g in geoms])  # in collection order
    return shapely.unary_union(geoms)


@_fn("Geometry.coordinates")
def _coordinates(ev, geometry):
    if geometry.geom_type == "MultiPoint":
        return [[p.x, p.y] for p in geometry.geoms]
    if geometry.geom_type == "Point":
        return [geometry.x, geometry.y]
    return [list(map(list, geometry.exterior.coords))]


# ---- filters: callables on an element
def _field(el: Any, name: str) -> Any:
    if name == ".geo":
        return _geometry_of(el)
    if name == ".all":
        return el
    return _props_of(el).get(name)


@_fn("Filter.intersects")
def _f_intersects(ev, leftField=None, rightValue=None, maxError=None):
    geom = _geometry_of(rightValue)
    return lambda el: (_geometry_of(_field(el, leftField)) is None
                       or _geometry_of(_field(el, leftField)).intersects(geom))


@_fn("Filter.contains")
def _f_contains(ev, leftField=None, rightValue=None, maxError=None):
    geom = _geometry_of(rightValue)
    return lambda el: _field(el, leftField) is None or _field(el, leftField).contains(geom)


@_fn("Filter.dateRangeContains")
def _f_date_range(ev, leftValue=None, rightField=None):
    start, end = leftValue
    return lambda el: _field(el, rightField) is not None and start <= _field(el, rightField) < end


_FUNCTIONS["Filter.lessThan"] = lambda ev, leftField=None, rightValue=None: (
    lambda el: _field(el, leftField) is not None and _field(el, leftField) < rightValue)
_FUNCTIONS["Filter.equals"] = lambda ev, leftField=None, rightValue=None: (
    lambda el: _field(el, leftField) == rightValue)
_FUNCTIONS["Filter.inList"] = lambda ev, leftField=None, rightValue=None: (
    lambda el: _field(el, leftField) in rightValue)
_FUNCTIONS["Filter.not"] = lambda ev, filter: (lambda el: not filter(el))  # noqa: A002
_FUNCTIONS["Filter.listContains"] = lambda ev, leftValue=None, rightField=None, leftField=None, rightValue=None: (
    lambda el: (_field(el, rightField) in leftValue) if rightField is not None else (rightValue in _field(el, leftField)))


# ---- collections
@_fn("ImageCollection.load")
def _ic_load(ev, id, version=None):  # noqa: A002
    return ev.catalogue.collection(id, ev)


@_fn("FeatureCollection.load")
def _fc_load(ev, tableId, geometryColumn=None, version=None):
    return ev.catalogue.collection(tableId, ev)


_FUNCTIONS["Collection.loadTable"] = _fc_load


_FUNCTIONS["Collection.filter"] = lambda ev, collection, filter: FCollection(  # noqa: A002
    [e for e in collection.elements if filter(e)], collection.cid)
_FUNCTIONS["Collection.size"] = lambda ev, collection: len(collection.elements)
_FUNCTIONS["Collection.map"] = lambda ev, collection, baseAlgorithm, dropNulls=False: FCollection(
    [r for r in (baseAlgorithm(e) for e in collection.elements) if not (dropNulls and r is None)], collection.cid)
_FUNCTIONS["Collection.toList"] = lambda ev, collection, count, offset=0: collection.elements[int(offset):int(offset) + int(count)]
_FUNCTIONS["ImageCollection.fromImages"] = lambda ev, images: FCollection(list(images))


@_fn("Collection.first")
def _first(ev, collection):
    return collection.elements[0] if collection.elements else None


@_fn("Collection.limit")
def _limit(ev, collection, limit=None, key=None, ascending=True):
    els = list(collection.elements)
    if key is not None:
        els = sorted(els, key=lambda e: _props_of(e).get(key), reverse=not ascending)  # stable
    return FCollection(els if limit is None else els[:int(limit)], collection.cid)


@_fn("AggregateFeatureCollection.array")
def _aggregate_array(ev, collection, property):  # noqa: A002
    return [_props_of(e).get(property) for e in collection.elements]


@_fn("Collection.reduceColumns")
def _reduce_columns(ev, collection, reducer, selectors, weightSelectors=None):
    if not (isinstance(reducer, tuple) and reducer[0] == "toList"):
        raise BadRequest("fake_ee: reduceColumns supports Reducer.toList only.")
    return {"list": [[_props_of(e).get(s) for s in selectors] for e in collection.elements]}


_FUNCTIONS["Reducer.toList"] = lambda ev, numOptional=None, tupleSize=None: ("toList", tupleSize)
for _r in ("mean", "min", "max", "sum", "mode"):
    _FUNCTIONS[f"Reducer.{_r}"] = (lambda r: lambda ev, **kw: r)(_r)


_FUNCTIONS["ErrorMargin"] = lambda ev, value=None, unit=None: value


@_fn("Feature.geometry")
def _feature_geometry(ev, feature, maxError=None, proj=None, geodesics=None):
    return feature.footprint


@_fn("Geometry.area")
def _area(ev, geometry, maxError=None, proj=None):
    from tasks.multimodal.tiles import geodesic_area_m2  # a measure, not the product's sampling

    return geodesic_area_m2(geometry)


@_fn("FeatureCollection.randomPoints")
def _random_points(ev, region, points=1000, seed=0, maxError=None):
    """Uniform points in the region: rejection in the bounding box, equal-area in latitude
    (the fake's own sampler; nothing of the product's)."""
    import shapely

    geom = shapely.unary_union([_geometry_of(e) for e in region.elements]) if isinstance(region, FCollection) \
        else _geometry_of(region)
    if geom is None or geom.is_empty:
        raise BadRequest("Collection.randomPoints: empty region.")
    rng = random.Random(int(seed))
    minx, miny, maxx, maxy = geom.bounds
    s0, s1 = math.sin(math.radians(miny)), math.sin(math.radians(maxy))
    out: list[FFeature] = []
    prepared = __import__("shapely.prepared").prepared.prep(geom)
    while len(out) < int(points):
        p = shapely.Point(rng.uniform(minx, maxx), math.degrees(math.asin(rng.uniform(s0, s1))))
        if prepared.contains(p):
            out.append(FFeature(p))
    return FCollection(out)


# ---- images
@_fn("Image.load")
def _image_load(ev, id, version=None):  # noqa: A002
    return ev.catalogue.image(id, ev)


@_fn("Image.constant")
def _image_constant(ev, value):
    vals = value if isinstance(value, list) else [value]
    return FImage([FBand(f"constant_{i}" if len(vals) > 1 else "constant",
                         (lambda c: lambda ctx: np.full(ctx["shape"], float(c)))(c), ("constant", str(c)))
                   for i, c in enumerate(vals)])


@_fn("Image.select")
def _image_select(ev, input, bandSelectors, newNames=None):  # noqa: A002
    names = input.band_names()
    picked = []
    for sel in bandSelectors:
        if isinstance(sel, int):
            picked.append(input.bands[sel])
            continue
        matches = [b for b in input.bands if re.fullmatch(sel, b.name)]
        if not matches:
            raise BadRequest(f"Image.select: Pattern '{sel}' did not match any bands. Available bands: {names}")
        picked.extend(matches)
    if newNames:
        picked = [b.but(name=n) for b, n in zip(picked, newNames)]
    return input.but(bands=picked)


@_fn("Image.rename")
def _image_rename(ev, input, names):  # noqa: A002
    if len(names) != len(input.bands):
        raise BadRequest(f"Image.rename: The number of names ({len(names)}) must match the number of bands "
                         f"({len(input.bands)}: {input.band_names()}).")
    return input.but(bands=[b.but(name=n) for b, n in zip(input.bands, names)])


@_fn("Image.addBands")
def _image_add_bands(ev, dstImg, srcImg, names=None, overwrite=False):
    taken = set(dstImg.band_names())
    added = []
    for b in srcImg.bands:  # as Image.cat: a repeated name gets a suffix _1, _2, ...
        name, k = b.name, 0
        while name in taken:
            k += 1
            name = f"{b.name}_{k}"
        taken.add(name)
        added.append(b.but(name=name))
    return dstImg.but(bands=dstImg.bands + added)


_FUNCTIONS["Image.float"] = lambda ev, value: value.but(bands=[b.but(fn=b.fn) for b in value.bands])
_FUNCTIONS["Image.bandNames"] = lambda ev, image: image.band_names()
_FUNCTIONS["Image.projection"] = lambda ev, image: {"crs": image.crs, "transform": list(image.transform)}
_FUNCTIONS["Projection.crs"] = lambda ev, projection: projection["crs"]
_FUNCTIONS["Projection.transform"] = lambda ev, projection: projection["transform"]
_FUNCTIONS["Image.date"] = lambda ev, image: FDate(image.props["system:time_start"])


@_fn("Image.resample")
def _image_resample(ev, image, mode="bilinear"):
    if mode not in ("bilinear", "bicubic"):
        raise BadRequest(f"Image.resample: invalid mode {mode!r}.")
    return image.but(bands=[b.but(resample=mode) for b in image.bands])


@_fn("Image.add")
def _image_add(ev, image1, image2):
    other = image2.bands[0].fn
    return image1.but(bands=[b.but(fn=(lambda f: lambda ctx: f(ctx) + other(ctx))(b.fn)) for b in image1.bands])


@_fn("Image.unmask")
def _image_unmask(ev, input, value=None, sameFootprint=True):  # noqa: A002
    if isinstance(value, FImage):
        value = float(value.bands[0].fn({"shape": (1, 1)})[0, 0])
    fill = float(value if value is not None else 0)
    return input.but(bands=[b.but(fn=(lambda f: lambda ctx: np.where(np.isnan(f(ctx)), fill, f(ctx)))(b.fn))
                            for b in input.bands])


@_fn("Terrain.slope")
def _terrain_slope(ev, input):  # noqa: A002
    elev = input.bands[0]

    def slope(ctx):
        gy, gx = np.gradient(elev.fn(ctx), 10.0)
        return np.degrees(np.arctan(np.hypot(gx, gy)))
    return FImage([FBand("slope", slope, ("Terrain.slope", elev.origin[1]), elev.resample)], input.props,
                  input.footprint, input.crs, input.transform)


@_fn("ImageCollection.toBands")
def _to_bands(ev, collection):
    bands = []
    for i, im in enumerate(collection.elements):
        prefix = im.props.get("system:index", str(i))
        bands.extend(b.but(name=f"{prefix}_{b.name}") for b in im.bands)
    return FImage(bands)


@_fn("ImageCollection.reduce")
def _ic_reduce(ev, collection, reducer, parallelScale=None):
    if not collection.elements:
        return FImage([])
    first = collection.elements[0]
    op = {"mean": np.mean, "min": np.min, "max": np.max, "sum": np.sum}[reducer]
    bands = []
    for k, b in enumerate(first.bands):
        members = [im.bands[k] for im in collection.elements]
        bands.append(FBand(f"{b.name}_{reducer}",
                           (lambda ms: lambda ctx: op(np.stack([m.fn(ctx) for m in ms]), axis=0))(members),
                           (f"reduce.{reducer}", b.origin[1])))
    return FImage(bands)


@_fn("reduce.mode")
def _ic_mode(ev, collection, parallelScale=None):
    if not collection.elements:
        return FImage([])
    first = collection.elements[0]
    bands = []
    for k, b in enumerate(first.bands):
        members = [im.bands[k] for im in collection.elements]

        def mode(ctx, ms=members):
            stack = np.stack([m.fn(ctx) for m in ms[:7]]).astype(np.int64)
            counts = np.stack([(stack == c).sum(axis=0) for c in range(int(stack.max()) + 1)])
            return counts.argmax(axis=0).astype(np.float64)
        bands.append(FBand(b.name, mode, ("reduce.mode", b.origin[1])))  # the shortcut keeps names
    return FImage(bands)


@_fn("Image.reduceRegion")
def _reduce_region(ev, image, reducer, geometry=None, scale=None, **kw):
    if reducer != "mean":
        raise BadRequest("fake_ee: reduceRegion supports Reducer.mean only.")
    c = geometry.centroid
    ctx = {"shape": (1, 1), "lon": c.x, "lat": c.y, "point": True}
    return {b.name: float(b.fn(ctx)[0, 0]) for b in image.bands}


# --------------------------------------------------------------------------- the catalogue

S2_COLLECTIONS = ("COPERNICUS/S2_SR_HARMONIZED", "COPERNICUS/S2_HARMONIZED")
S1_COLLECTION = "COPERNICUS/S1_GRD"
ERA5_COLLECTION = "ECMWF/ERA5_LAND/MONTHLY_AGGR"
DW_COLLECTION = "GOOGLE/DYNAMICWORLD/V1"
ASTER_ASSET = "projects/sat-io/open-datasets/ASTER/GDEM"
CANOPY_ASSETS = ("users/nlang/ETH_GlobalCanopyHeight_2020_10m_v1", "users/nlang/ETH_GlobalCanopyHeightSD_2020_10m_v1")
WORLDCOVER_COLLECTION = "ESA/WorldCover/v100"
RESOLVE_TABLE = "RESOLVE/ECOREGIONS/2017"
ERA5_BAND_NAMES = ("temperature_2m", "temperature_2m_min", "temperature_2m_max", "total_precipitation_sum")
#: footprint kinds of generated scenes: margin around the tile's bounding box in metres
#: (contains the tile + 200 m; contains the tile only; overlaps it; misses it)
FOOTPRINTS = (("contains", 3000.0, 0.70), ("tile-only", 100.0, 0.12), ("overlaps", -400.0, 0.10),
              ("misses", -5000.0, 0.08))
_S2_SPAN = (dt.datetime(2016, 7, 1, tzinfo=dt.timezone.utc), dt.datetime(2021, 6, 30, tzinfo=dt.timezone.utc))
_WINDOW_EDGES = ("2017-01-01", "2017-12-31", "2018-01-01", "2018-11-30", "2018-12-01", "2019-12-31",
                 "2020-01-01", "2020-12-31")


class Box:
    """A lon/lat box footprint (cheap: the catalogue makes thousands per tile)."""

    __slots__ = ("bounds",)

    def __init__(self, minx: float, miny: float, maxx: float, maxy: float):
        self.bounds = (minx, miny, maxx, maxy)

    def contains(self, geom: Any) -> bool:  # a box contains a geometry iff it contains its bounds
        a, b = self.bounds, geom.bounds
        return a[0] <= b[0] and a[1] <= b[1] and b[2] <= a[2] and b[3] <= a[3]

    def intersects(self, geom: Any) -> bool:  # bounds overlap (exact for the boxes and squares used here)
        a, b = self.bounds, geom.bounds
        return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]

    @property
    def shape(self) -> Any:
        import shapely

        return shapely.box(*self.bounds)


def _box_around(poly: Any, margin_m: float, shift: tuple[float, float] = (0.0, 0.0),
                bounds: tuple[float, float, float, float] | None = None) -> Box:
    minx, miny, maxx, maxy = bounds or poly.bounds
    kx, ky = _metres_to_deg((miny + maxy) / 2, 1.0)
    if margin_m <= -5000:  # misses: a box beside the tile, still within filterBounds' reach of nothing
        w = maxx - minx
        return Box(maxx + w * 0.5, miny, maxx + w * 3, maxy)
    if margin_m < 0:  # overlaps: shifted by half a tile
        w = maxx - minx
        return Box(minx + w / 2, miny - 1000 * ky, maxx + 5000 * kx, maxy + 1000 * ky)
    return Box(minx - margin_m * kx + shift[0] * kx, miny - margin_m * ky + shift[1] * ky,
                       maxx + margin_m * kx + shift[0] * kx, maxy + margin_m * ky + shift[1] * ky)


def _footprint(rng: random.Random, poly: Any, bounds: tuple[float, float, float, float] | None = None) -> tuple[str, Any]:
    u, acc = rng.random(), 0.0
    for kind, margin, p in FOOTPRINTS:
        acc += p
        if u < acc:
            break
    shift = (rng.uniform(-0.4, 0.4) * margin, rng.uniform(-0.4, 0.4) * margin) if margin > 1000 else (0.0, 0.0)
    return kind, _box_around(poly, margin, shift, bounds)


def era5_month_values(lat: float, lon: float, year: int, month: int) -> list[float]:
    """ERA5-Land-like monthly [mean 2 m temperature, min, max (K), total precipitation (m)] at a
    0.1-degree cell."""
    cell = (round(lat, 1), round(lon, 1))
    base = random.Random(_seed("era5", *cell))
    t_annual = 300.0 - 0.0072 * lat * lat + base.uniform(-2.0, 2.0)
    amplitude = 0.2 * abs(lat) + base.uniform(0.0, 1.5)
    peak = 7 if lat >= 0 else 1
    wet = base.uniform(0.02, 0.12)
    m = random.Random(_seed("era5", *cell, year, month))
    t = t_annual + amplitude * math.cos(2.0 * math.pi * (month - peak) / 12.0) + m.uniform(-1.0, 1.0)
    spread = 4.0 + 0.08 * abs(lat) + m.uniform(0.0, 3.0)
    precip = max(0.0, wet * (1.0 + 0.5 * math.sin(2.0 * math.pi * month / 12.0)) * m.uniform(0.5, 1.5))
    return [round(t, 3), round(t - spread, 3), round(t + spread, 3), round(precip, 5)]


class Catalogue:
    """The fake's data: scenes generated per tile location, deterministic.

    ``s2_counts``: (low, high) of the log-uniform number of scenes per Sentinel-2
    collection and tile over mid-2016..mid-2021 (before any filter).
    ``no_data_tiles``: tile names whose Sentinel-2 scenes are all cloudy (>= 10 %).
    ``missing_band``: fraction of L2A scenes lacking B8A (not MSK_CLDPRB).
    ``tiles``: tile name -> GeoJSON geometry, to name tiles (else "lon,lat" of the centroid)."""

    def __init__(self, s2_counts: tuple[int, int] = (100, 600), no_data_tiles: Iterable[str] = (),
                 missing_band: float = 0.0, tiles: dict[str, Any] | None = None, regions_path: str | None = None):
        self.s2_counts = s2_counts
        self.no_data_tiles = set(no_data_tiles)
        self.missing_band = float(missing_band)
        self.names: dict[tuple[float, float], str] = {}
        for name, geom in (tiles or {}).items():
            self.names[self._key(geom["coordinates"])] = name
        self.regions_path = regions_path
        self._lock = threading.Lock()
        self._cache: dict[str, dict[str, list[FImage]]] = {}
        self._polys: dict[str, Any] = {}
        self._regions: list[FFeature] | None = None
        self._era5: FCollection | None = None

    @staticmethod
    def _key(coordinates: Any) -> tuple[float, float]:
        ring = coordinates[0][:-1] if coordinates[0][0] == coordinates[0][-1] else coordinates[0]
        return (round(sum(p[0] for p in ring) / len(ring), 6), round(sum(p[1] for p in ring) / len(ring), 6))

    def tile_name(self, coordinates: Any) -> str:
        key = self._key(coordinates)
        return self.names.get(key) or f"{key[0]:.6f},{key[1]:.6f}"

    @staticmethod
    def tile_hash(name: str) -> str:
        return hashlib.sha256(name.encode()).hexdigest()[:8]

    def register(self, name: str, poly: Any) -> None:
        with self._lock:
            self._polys[self.tile_hash(name)] = (name, poly)

    # -- scenes of one tile
    def scenes(self, name: str, poly: Any) -> dict[str, list[FImage]]:
        with self._lock:
            got = self._cache.get(name)
        if got is not None:
            return got
        made = self._make(name, poly)
        with self._lock:
            if len(self._cache) > 64:
                self._cache.pop(next(iter(self._cache)))
            self._cache[name] = made
        return made

    def _make(self, name: str, poly: Any) -> dict[str, list[FImage]]:
        c = poly.centroid
        lat, lon = c.y, c.x
        h = self.tile_hash(name)
        out: dict[str, list[FImage]] = {}
        epsg = utm_epsg(lat, lon)
        lo, hi = self.s2_counts
        t0, t1 = _ms(_S2_SPAN[0]), _ms(_S2_SPAN[1])
        mgrs = _mgrs_name(lat, lon, name)
        pb = poly.bounds
        origins = {}
        for z in (epsg, epsg + 1):
            x, y = _project(lat, lon, z)
            origins[z] = [10, 0, int(100000 * math.floor(x / 100000.0)), 0, -10, int(100000 * math.ceil(y / 100000.0))]
        for coll in S2_COLLECTIONS:
            rng = random.Random(_seed(name, coll))
            total = int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))
            no_l2a_before = coll == S2_COLLECTIONS[0] and rng.random() < 0.2  # L2A not yet produced here
            times = [rng.uniform(t0, t1) for _ in range(total)]
            edges = {_ms(dt.datetime.fromisoformat(d).replace(hour=10, minute=30, tzinfo=dt.timezone.utc))
                     for d in _WINDOW_EDGES}  # a clear scene on every window edge: end exclusive matters
            times += sorted(edges)
            scenes = []
            for t in sorted(times):
                when = _from_ms(t)
                if no_l2a_before and when.year < 2019:
                    continue
                kind, fp = _footprint(rng, poly, pb)
                cloud = rng.uniform(0.0, 16.0) if name not in self.no_data_tiles else rng.uniform(10.0, 80.0)
                if t in edges:
                    kind, fp = "contains", _box_around(poly, 3000.0, bounds=pb)
                    cloud = min(cloud, 5.0) if name not in self.no_data_tiles else cloud
                zone_epsg = epsg + (1 if rng.random() < 0.1 and epsg % 100 < 60 else 0)
                l2a = coll == S2_COLLECTIONS[0]
                bands = list(S2_BANDS_L2A if l2a else S2_BANDS_L1C)
                if l2a and rng.random() < P_NO_CLDPRB:
                    bands.remove("MSK_CLDPRB")
                if l2a and rng.random() < self.missing_band:
                    bands.remove("B8A")
                index = (f"{when:%Y%m%dT%H%M%S}_{when + dt.timedelta(seconds=60 + int(540 * rng.random())):%Y%m%dT%H%M%S}"
                         f"_T{mgrs}_{h}{len(scenes):04d}")
                scenes.append(FImage(
                    (lambda bands, coll: lambda: [FBand(b, (lambda b: lambda ctx: band_values(
                        ctx["tile"], f"sentinel2__{b}", *ctx["shape"]))(b), (coll, b)) for b in bands])(bands, coll),
                    {"system:time_start": int(t), "system:index": index, "system:id": f"{coll}/{index}",
                     "CLOUDY_PIXEL_PERCENTAGE": round(cloud, 4), "fake:footprint": kind},
                    fp, f"EPSG:{zone_epsg}", origins[zone_epsg]))
            out[coll] = scenes
        rng = random.Random(_seed(name, "s1"))
        s1 = []
        # per orbit pass a regular revisit (6 or 12 days) at a fixed time of day, 2016-06..2021-06
        for orbit in ("ASCENDING", "DESCENDING"):
            if rng.random() < 0.1:
                continue  # no scene of this pass here
            period = rng.choice((6, 12)) * MS_PER_DAY
            t = _ms(dt.datetime(2016, 6, 1, tzinfo=dt.timezone.utc)) + rng.uniform(0, period)
            group = "sentinel1_asc" if orbit == "ASCENDING" else "sentinel1_desc"
            kind, fp = _footprint(rng, poly, pb)
            while t < _ms(_S2_SPAN[1]):
                when = _from_ms(t)
                pols = ["HH", "HV"] if abs(lat) > 70 else (["VV"] if rng.random() < 0.1 else ["VV", "VH"])
                index = f"S1A_IW_GRDH_1SDV_{when:%Y%m%dT%H%M%S}_{h}{len(s1):04d}"
                if rng.random() < 0.3:
                    kind, fp = _footprint(rng, poly, pb)
                s1.append(FImage(
                    (lambda pols, group: lambda: [FBand(b, (lambda b: lambda ctx: band_values(
                        ctx["tile"], f"{group}__{b}", *ctx["shape"]))(b), (S1_COLLECTION, b))
                        for b in [*pols, "angle"]])(pols, group),
                    {"system:time_start": int(t), "system:index": index, "system:id": f"{S1_COLLECTION}/{index}",
                     "instrumentMode": "IW" if rng.random() < 0.9 else "EW", "orbitProperties_pass": orbit,
                     "fake:footprint": kind}, fp))
                t += period + rng.uniform(-600_000, 600_000)
        out[S1_COLLECTION] = sorted(s1, key=lambda im: im.props["system:index"])
        dw = []
        for year in range(2016, 2022):
            n = 0 if rng.random() < 0.05 else rng.randint(1, 40)
            for k in range(n):
                t = rng.uniform(_ms(dt.datetime(year, 1, 1, tzinfo=dt.timezone.utc)),
                                _ms(dt.datetime(year + 1, 1, 1, tzinfo=dt.timezone.utc)))
                dw.append(FImage([FBand("label", lambda ctx: band_values(ctx["tile"], "dynamic_world__label",
                                                                          *ctx["shape"]) - 1.0, (DW_COLLECTION, "label"))],
                                 {"system:time_start": int(t), "system:index": f"{year}{k:03d}_{h}"},
                                 _box_around(poly, 5000.0)))
        out[DW_COLLECTION] = sorted(dw, key=lambda im: im.props["system:time_start"])
        return out

    # -- what Image.load / ImageCollection.load answer
    def collection(self, cid: str, ev: Evaluator) -> FCollection:
        if cid in (*S2_COLLECTIONS, S1_COLLECTION, DW_COLLECTION):
            els: list[Any] = []
            for name, poly in ev.polygons:
                els.extend(self.scenes(name, poly)[cid])
            return FCollection(els, cid)
        if cid == ERA5_COLLECTION:
            if self._era5 is not None:
                return self._era5
            images = []
            for year in range(2014, 2023):
                for month in range(1, 13):
                    images.append(FImage(
                        [FBand(b, (lambda y, m, i: lambda ctx: np.full(
                            ctx["shape"], era5_month_values(ctx["lat"], ctx["lon"], y, m)[i]))(year, month, i),
                            (cid, b)) for i, b in enumerate(ERA5_BAND_NAMES)],
                        {"system:time_start": _ms(dt.datetime(year, month, 1, tzinfo=dt.timezone.utc)),
                         "system:index": f"{year}{month:02d}"}))
            self._era5 = FCollection(images, cid)
            return self._era5
        if cid == WORLDCOVER_COLLECTION:
            return FCollection([FImage([FBand("Map", lambda ctx: band_values(ctx["tile"], "esa_worldcover__Map",
                                                                             *ctx["shape"]), (cid, "Map"))],
                                       {"system:index": "ESA_WorldCover_10m_2020_v100"})], cid)
        if cid == RESOLVE_TABLE:
            return FCollection(self.regions(), cid)
        raise BadRequest(f"ImageCollection.load: ImageCollection asset '{cid}' not found (does not exist or "
                         "caller does not have access).")

    def image(self, iid: str, ev: Evaluator) -> FImage:
        if iid == ASTER_ASSET:
            return FImage([FBand("b1", lambda ctx: _elevation(ctx["tile"], *ctx["shape"]), (iid, "b1"))])
        if iid in CANOPY_ASSETS:
            band = "height" if iid == CANOPY_ASSETS[0] else "std"
            return FImage([FBand("b1", lambda ctx: band_values(ctx["tile"], f"canopy_height_eth__{band}",
                                                               *ctx["shape"]), (iid, "b1"))])
        coll, _, index = iid.rpartition("/")
        if coll in (*S2_COLLECTIONS, S1_COLLECTION):
            with self._lock:
                found = self._polys.get(index[-12:-4])
            if found is not None:
                name, poly = found
                ev.tile_name = ev.tile_name or name
                for im in self.scenes(name, poly)[coll]:
                    if im.props["system:index"] == index:
                        return im
        raise BadRequest(f"Image.load: Image asset '{iid}' not found (does not exist or caller does not have access).")

    def regions(self) -> list[FFeature]:
        if self._regions is None:
            import shapely.geometry

            from tasks.multimodal import tiles as tiles_mod

            path = self.regions_path or str(tiles_mod.DEFAULT_REGIONS)
            with open(path) as fh:
                doc = json.load(fh)
            feats = []
            for i, f in enumerate(doc["features"]):
                p = f["properties"]
                feats.append(FFeature(shapely.geometry.shape(f["geometry"]),
                                      {"ECO_NAME": p.get("eco_region") or p.get("ECO_NAME"),
                                       "BIOME_NAME": p.get("biome") or p.get("BIOME_NAME"), "ECO_ID": 100 + i}))
            self._regions = feats
        return self._regions


def identify(expression: dict[str, Any], catalogue: Catalogue) -> str | None:
    """The tile a request is about, from what the expression asks: its tile polygon, the
    Sentinel-2 scene it loads, or the sampler's randomPoints seed / ecoregion table."""
    ev = Evaluator(expression, catalogue)
    for f in ev.invocations("GeometryConstructors.Polygon"):
        try:
            return catalogue.tile_name(ev.eval_node(f["arguments"]["coordinates"], {}))
        except (BadRequest, KeyError, IndexError, TypeError, ZeroDivisionError):
            return None
    m = re.search(r"COPERNICUS/S2_(?:SR_)?HARMONIZED/[0-9T_]+_T\w{5}_([0-9a-f]{8})\d{4}", json.dumps(expression))
    if m:
        with catalogue._lock:
            found = catalogue._polys.get(m.group(1))
        return found[0] if found else None
    for f in ev.invocations("FeatureCollection.randomPoints"):
        return f"__points__{ev.eval_node(f['arguments'].get('seed', {'constantValue': 0}), {})}"
    if ev.invocations("Collection.reduceColumns"):
        return "__ecoregions__"
    return None


# --------------------------------------------------------------------------- the server


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with daemon threads and a deep accept queue."""

    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True
    fake: "FakeEarthEngine"


class _Reply(Exception):
    """Raised inside the handler to answer with an EE error and stop."""

    def __init__(self, code: int | str, message: str | None = None) -> None:
        super().__init__(message or str(code))
        self.code = int(code)
        self.message = message


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to :class:`FakeEarthEngine`."""

    protocol_version = "HTTP/1.1"
    server: _Server
    settle: Callable[[], None]  # the current request's bookkeeping (set by FakeEarthEngine._handle)

    def setup(self) -> None:
        """Disable Nagle: headers and body go out in separate writes (else ~40 ms per answer)."""
        super().setup()
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Silence BaseHTTPRequestHandler's stderr logging."""

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self.server.fake._handle(self, "GET")

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        self.server.fake._handle(self, "POST")


class FakeEarthEngine:
    """A loopback fake of the Earth Engine REST API (see the module docstring).

    Args:
        project: the Cloud project the client must use (other projects get 403).
        latency: seconds to sleep before answering, per kind (``"value"``,
            ``"pixels"``, ``"algorithms"``).
        latency_jitter: relative jitter of the latency (0.2: +-20 %).
        no_data_tiles: tiles (names) whose Sentinel-2 scenes are all cloudy, so the
            cloud filter leaves no candidate.
        tiles: tile name -> GeoJSON geometry (or objects with ``tile_id`` and
            ``geometry``): names the tiles in counters, faults and ``no_data_tiles``.
        s2_counts: (low, high) of the log-uniform number of scenes per Sentinel-2
            collection and tile, before filters.
        missing_band: fraction of L2A scenes lacking B8A.
        faults: tile_id -> faults applied to that tile's successive API
            requests (value or pixels), one per request, then normal answers.
            Faults: ``"429"``, ``"500"``, ``"503"``, ``"400"``, ``"drop"``
            (close the connection without answering), ``"slow"`` (sleep
            ``slow_s`` then answer normally), ``"empty_result"`` (200 with
            ``{"result": {}}``), ``"bad_count"`` (200 with the real answer but
            ``n_images`` a string: a malformed answer).
        fault_rate: probability of a random fault on a value / pixels request
            (the decision is a hash of seed, tile, kind and attempt number, so
            it does not depend on thread scheduling).
        fault_kinds: the faults drawn by ``fault_rate`` (default 429, 500, 503).
        seed: seed of the random faults and latency jitter.
        max_concurrent: answer 429 "Too many concurrent requests." when more
            API requests than this would be served at once.
        slow_s: the sleep of a ``"slow"`` fault.
        missing_fraction: fraction of tiles whose pixels have a band with a
            few rows of :data:`MISSING_VALUE`.
        token_lifetime_s: ``expires_in`` of issued tokens.

    Attributes (counters are lock-protected; read them freely, or
    :meth:`snapshot` for a consistent copy):
        url, project, requests_by_tile, total, in_flight, max_in_flight,
        admitted_in_flight, max_admitted_in_flight, faults_injected,
        slot_seconds, log. A request is counted done (``in_flight`` down,
        its ``duration_s`` and ``slot_seconds`` taken, its ``log`` entry
        appended) just before its reply is written, so a client holding an
        answer reads counters that already include it.
    """

    def __init__(
        self,
        *,
        project: str = "fake-project",
        latency: dict[str, float] | None = None,
        latency_jitter: float = 0.0,
        no_data_tiles: Iterable[str] | None = None,
        faults: dict[str, list[str]] | None = None,
        fault_rate: float = 0.0,
        fault_kinds: list[str] | None = None,
        seed: int = 0,
        max_concurrent: int | None = None,
        slow_s: float = 5.0,
        missing_fraction: float = 0.1,
        token_lifetime_s: int = 3600,
        tiles: Any = None,
        s2_counts: tuple[int, int] = (100, 600),
        missing_band: float = 0.0,
    ) -> None:
        for tile_faults in (faults or {}).values():
            unknown = set(tile_faults) - FAULT_NAMES
            if unknown:
                raise ValueError(f"unknown fault(s) {sorted(unknown)}; known: {sorted(FAULT_NAMES)}")
        if set(fault_kinds or []) - FAULT_NAMES:
            raise ValueError(f"unknown fault kind(s) in {fault_kinds}")
        self.project = project
        self.latency = dict(latency or {})
        self.latency_jitter = float(latency_jitter)
        self.no_data_tiles = set(no_data_tiles or ())
        if tiles is not None and not isinstance(tiles, dict):
            tiles = {t.tile_id: t.geometry for t in tiles}
        self.catalogue = Catalogue(s2_counts=s2_counts, no_data_tiles=self.no_data_tiles,
                                   missing_band=missing_band, tiles=tiles)
        self.faults = {tile: list(fs) for tile, fs in (faults or {}).items()}
        self.fault_rate = float(fault_rate)
        self.fault_kinds = list(fault_kinds or ["429", "500", "503"])
        self.seed = seed
        self.max_concurrent = max_concurrent
        self.slow_s = float(slow_s)
        self.missing_fraction = float(missing_fraction)
        self.token_lifetime_s = int(token_lifetime_s)

        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._tokens: dict[str, float] = {}  # sha256(token) -> expiry (the tokens themselves are not kept)
        self._attempts: dict[tuple[str, str], int] = {}
        self._private_key_id = secrets.token_hex(20)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        self.reset_counters()

    # ---- lifecycle

    def start(self) -> "FakeEarthEngine":
        """Start serving on 127.0.0.1 (an ephemeral port)."""
        if self._server is not None:
            return self
        self._stop.clear()
        server = _Server(("127.0.0.1", 0), _Handler)
        server.fake = self
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-ee", daemon=True
        )
        self._thread.start()
        logger.debug("fake Earth Engine serving at %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving (sleeping handlers are woken up)."""
        self._stop.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "FakeEarthEngine":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---- credentials

    @property
    def token_uri(self) -> str:
        """The token endpoint of the fake."""
        return f"{self.url}/token"

    @property
    def client_email(self) -> str:
        """The service account's e-mail."""
        return f"fake-ee@{self.project}.iam.gserviceaccount.com"

    def service_account_info(self) -> dict[str, str]:
        """A service-account key whose token endpoint is the fake (needs a started fake)."""
        if not self.url:
            raise RuntimeError("start the fake first (use it as a context manager)")
        _, pem = _private_key()
        return {
            "type": "service_account",
            "project_id": self.project,
            "private_key_id": self._private_key_id,
            "private_key": pem,
            "client_email": self.client_email,
            "client_id": "100000000000000000001",
            "auth_uri": f"{self.url}/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": f"{self.url}/certs",
            "client_x509_cert_url": f"{self.url}/certs/{self.client_email}",
            "universe_domain": "googleapis.com",
        }

    def credentials(self, scopes: list[str] | None = None) -> Any:
        """``google.oauth2.service_account.Credentials`` for the fake (EE scopes by default)."""
        from google.oauth2 import service_account

        if scopes is None:
            import ee

            scopes = list(ee.oauth.SCOPES)
        return service_account.Credentials.from_service_account_info(self.service_account_info(), scopes=scopes)

    def revoke_tokens(self) -> None:
        """Forget every issued access token (the next API requests get 401)."""
        with self._lock:
            self._tokens.clear()

    # ---- counters

    def reset_counters(self) -> None:
        """Zero every counter and the log (tokens and scripted faults are kept)."""
        with self._lock:
            self.requests_by_tile: dict[str, dict[str, int]] = {}
            self.total: dict[str, int] = {
                k: 0
                for k in ("token", "discovery", "algorithms", "value", "pixels", "unauthorized", "rejected", "other")
            }
            self.in_flight = 0
            self.max_in_flight = 0
            self.admitted_in_flight = 0
            self.max_admitted_in_flight = 0
            self.faults_injected: list[tuple[str | None, str, str]] = []
            self.slot_seconds = 0.0
            self.tile_window: list[float] = []  # [first start, last end] of value/pixels requests (monotonic)
            self.log: list[dict[str, Any]] = []
            self.evaluations: list[dict[str, Any]] = []  # per evaluated request: tile, functions called
            self.pixel_bands: list[dict[str, Any]] = []  # per computePixels: band -> (origin, resampling)

    def snapshot(self) -> dict[str, Any]:
        """A consistent deep copy of every counter."""
        with self._lock:
            return copy.deepcopy(
                {
                    "requests_by_tile": self.requests_by_tile,
                    "total": self.total,
                    "in_flight": self.in_flight,
                    "max_in_flight": self.max_in_flight,
                    "admitted_in_flight": self.admitted_in_flight,
                    "max_admitted_in_flight": self.max_admitted_in_flight,
                    "faults_injected": self.faults_injected,
                    "slot_seconds": self.slot_seconds,
                    "tile_window_s": (self.tile_window[1] - self.tile_window[0]) if self.tile_window else 0.0,
                    "log": self.log,
                }
            )

    def mean_concurrency(self, wall_s: float) -> float:
        """``slot_seconds / wall_s``: mean number of API requests in flight over ``wall_s``."""
        return self.slot_seconds / wall_s if wall_s > 0 else 0.0

    def _count(self, kind: str) -> None:
        with self._lock:
            self.total[kind] = self.total.get(kind, 0) + 1

    def _log(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.log.append(entry)

    # ---- request handling

    def _handle(self, h: _Handler, method: str) -> None:
        t0 = time.monotonic()
        parsed = urllib.parse.urlsplit(h.path)
        path = urllib.parse.unquote(parsed.path)
        entry: dict[str, Any] = {"method": method, "path": path, "kind": "other", "tile_id": None, "status": None}
        body: bytes = b""
        api = False
        admitted = False
        settled = False

        def settle() -> None:
            # The request's bookkeeping, done once, and before the reply's
            # first byte (``_send`` / ``_drop`` call it): a client that has
            # its answer must find the counters and the log already updated.
            nonlocal settled
            if settled:
                return
            settled = True
            elapsed = time.monotonic() - t0
            entry["duration_s"] = round(elapsed, 6)
            with self._lock:
                if api:
                    self.in_flight -= 1
                    self.slot_seconds += elapsed
                    if entry.get("kind") in ("value", "pixels") and entry.get("tile_id"):
                        end = t0 + elapsed
                        self.tile_window = [min(self.tile_window[0], t0), max(self.tile_window[1], end)] \
                            if self.tile_window else [t0, end]
                if admitted:
                    self.admitted_in_flight -= 1
                self.log.append(entry)

        h.settle = settle
        try:
            length = int(h.headers.get("Content-Length") or 0)
            body = h.rfile.read(length) if length > 0 else b""
            if method == "POST" and path == "/token":
                entry["kind"] = "token"
                self._count("token")
                self._token(h, body, entry)
                return
            if method == "GET" and path == "/__stats__":  # counters, for a fake running in another process
                snap = self.snapshot()
                durations: dict[str, list[float]] = {}
                for e in snap.pop("log", []):
                    if e.get("duration_s") is not None:
                        durations.setdefault(e["kind"], []).append(e["duration_s"])
                snap["mean_duration_s"] = {k: sum(v) / len(v) for k, v in durations.items()}
                self._send_json(h, 200, snap, entry)
                return
            if method == "GET" and path == "/$discovery/rest":
                entry["kind"] = "discovery"
                self._count("discovery")
                self._send(h, 200, _ee_test_file("cloud_api_discovery_document.json"), entry)
                return
            match = _API_PATH.match(path)
            if match is None or (method == "GET") != (match["method"] == "algorithms"):
                self._count("other")
                raise _Reply(404, f"Method not found: {method} {path}.")
            kind = _KIND_OF_METHOD[match["method"]]
            entry["kind"] = kind
            if not self._authorized(h):
                self._count("unauthorized")
                entry["kind"] = f"{kind}:unauthorized"
                raise _Reply(401)
            self._count(kind)
            if match["project"] != self.project:
                raise _Reply(
                    403,
                    f"Caller does not have required permission to use project {match['project']}. "
                    "Grant the caller the roles/serviceusage.serviceUsageConsumer role.",
                )
            api = True
            with self._lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if kind == "algorithms":
                self._sleep(kind)
                self._send(h, 200, _ee_test_file("algorithms.json"), entry)
                return
            try:
                payload = json.loads(body or b"null")
            except json.JSONDecodeError as exc:
                raise _Reply(400, f"Invalid JSON payload received. {exc}") from None
            if not isinstance(payload, dict) or "expression" not in payload:
                raise _Reply(400, "Invalid JSON payload: missing 'expression'.")
            expression = payload["expression"]
            if not isinstance(expression, dict) or "result" not in expression:
                raise _Reply(400, "Invalid JSON payload: 'expression' is not a serialized expression.")
            tile_id = identify(expression, self.catalogue)
            entry["tile_id"] = tile_id
            if tile_id is not None:
                with self._lock:
                    per_tile = self.requests_by_tile.setdefault(tile_id, {"value": 0, "pixels": 0})
                    per_tile[kind] = per_tile.get(kind, 0) + 1
            with self._lock:
                if self.max_concurrent is not None and self.admitted_in_flight >= self.max_concurrent:
                    self.total["rejected"] += 1
                    rejected = True
                else:
                    rejected = False
                    admitted = True
                    self.admitted_in_flight += 1
                    self.max_admitted_in_flight = max(self.max_admitted_in_flight, self.admitted_in_flight)
            if rejected:
                entry["fault"] = "max_concurrent"
                raise _Reply(429)
            fault = self._next_fault(tile_id, kind)
            if fault is not None:
                entry["fault"] = fault
                with self._lock:
                    self.faults_injected.append((tile_id, kind, fault))
                logger.debug("fault %s on %s request for tile %s", fault, kind, tile_id)
                if fault == "drop":
                    self._drop(h, entry)
                    return
                if fault == "slow":
                    self._stop.wait(self.slow_s)
                elif fault == "empty_result":  # a 200 that says nothing (no n_images)
                    self._send_json(h, 200, {"result": {}}, entry)
                    return
                elif fault == "bad_count" and kind == "value":
                    result, _ = self._evaluate(payload, tile_id)
                    body = _jsonable(result)
                    if isinstance(body, dict):
                        body["n_images"] = "none"
                    self._send_json(h, 200, {"result": body}, entry)
                    return
                elif fault in EE_ERRORS:
                    raise _Reply(fault, f"{EE_ERRORS[fault][1]}" if fault != "400" else "Injected invalid argument.")
            self._sleep(kind)
            if kind == "value":
                self._value(h, payload, tile_id, entry)
            else:
                self._pixels(h, payload, tile_id, entry)
        except _Reply as reply:
            self._send_error(h, reply.code, reply.message, entry)
        except BadRequest as exc:
            self._send_error(h, 400, str(exc), entry)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            entry["status"] = entry["status"] or "client-gone"
            h.close_connection = True
        except Exception as exc:  # noqa: BLE001 - a fake bug must answer 500, not hang the client
            logger.exception("fake Earth Engine failed on %s %s", method, path)
            try:
                self._send_error(h, 500, f"An internal error has occurred. (fake: {type(exc).__name__})", entry)
            except OSError:
                h.close_connection = True
        finally:
            settle()

    def _authorized(self, h: _Handler) -> bool:
        header = h.headers.get("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        with self._lock:
            expiry = self._tokens.get(_token_hash(token.strip()))
        return expiry is not None and expiry > time.time()

    def _token(self, h: _Handler, body: bytes, entry: dict[str, Any]) -> None:
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
        grant = (form.get("grant_type") or [""])[0]
        assertion = (form.get("assertion") or [""])[0]
        if grant != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            error = {"error": "unsupported_grant_type", "error_description": "Invalid grant_type."}
            self._send_json(h, 400, error, entry)
            return
        claims = _verify_jwt(assertion, (self.token_uri, GOOGLE_TOKEN_AUDIENCE))
        if claims is None or claims.get("iss") != self.client_email:
            self._send_json(h, 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}, entry)
            return
        token = "ya29.fake-" + secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[_token_hash(token)] = time.time() + self.token_lifetime_s
        self._send_json(
            h, 200, {"access_token": token, "expires_in": self.token_lifetime_s, "token_type": "Bearer"}, entry
        )

    def _next_fault(self, tile_id: str | None, kind: str) -> str | None:
        with self._lock:
            if tile_id is not None and self.faults.get(tile_id):
                return self.faults[tile_id].pop(0)
            if self.fault_rate <= 0.0 or not self.fault_kinds:
                return None
            if tile_id is None:
                draw, pick = self._rng.random(), self._rng.random()
            else:
                attempt = self._attempts.get((tile_id, kind), 0)
                self._attempts[(tile_id, kind)] = attempt + 1
                draw = _unit(self.seed, tile_id, kind, attempt, "fault")
                pick = _unit(self.seed, tile_id, kind, attempt, "fault-kind")
        if draw < self.fault_rate:
            return self.fault_kinds[int(pick * len(self.fault_kinds))]
        return None

    def _sleep(self, kind: str) -> None:
        base = float(self.latency.get(kind, 0.0))
        if base <= 0.0:
            return
        if self.latency_jitter > 0.0:
            with self._lock:
                base *= 1.0 + self.latency_jitter * (2.0 * self._rng.random() - 1.0)
        self._stop.wait(max(0.0, base))

    def _evaluate(self, payload: dict[str, Any], tile_id: str | None) -> tuple[Any, Evaluator]:
        ev = Evaluator(payload["expression"], self.catalogue)
        ev.tile_name = tile_id
        result = ev.run()
        with self._lock:
            self.evaluations.append({"tile_id": tile_id, "calls": sorted(set(ev.calls))})
        return result, ev

    def _value(self, h: _Handler, payload: dict[str, Any], tile_id: str | None, entry: dict[str, Any]) -> None:
        """Answer value:compute: the evaluated expression."""
        result, _ = self._evaluate(payload, tile_id)
        self._send_json(h, 200, {"result": _jsonable(result)}, entry)

    def _pixels(self, h: _Handler, payload: dict[str, Any], tile_id: str | None, entry: dict[str, Any]) -> None:
        """Answer image:computePixels with an NPY structured array of the evaluated image."""
        if payload.get("fileFormat") != "NPY":
            raise BadRequest(f"fake_ee only serves fileFormat NPY, got {payload.get('fileFormat')!r}.")
        band_ids = payload.get("bandIds")
        if not isinstance(band_ids, list) or not band_ids or not all(isinstance(b, str) for b in band_ids):
            raise BadRequest("fake_ee requires a non-empty list of bandIds.")
        if len(set(band_ids)) != len(band_ids):
            raise BadRequest("Duplicate band ids in bandIds.")
        grid = payload.get("grid") or {}
        dims = grid.get("dimensions") or {}
        try:
            width, height = int(dims["width"]), int(dims["height"])
        except (KeyError, TypeError, ValueError):
            raise BadRequest("grid.dimensions.width and height are required.") from None
        if width <= 0 or height <= 0:
            raise BadRequest(f"Invalid grid dimensions {width}x{height}.")
        size = width * height * 4 * len(band_ids)
        if size > MAX_PIXELS_BYTES:
            raise BadRequest(
                f"Total request size ({size} bytes) must be less than or equal to {MAX_PIXELS_BYTES} bytes."
            )
        image, ev = self._evaluate(payload, tile_id)
        if not isinstance(image, FImage):
            raise BadRequest("computePixels: the expression is not an Image.")
        by_name = {b.name: b for b in image.bands}
        missing = [b for b in band_ids if b not in by_name]
        if missing:
            raise BadRequest(f"Band(s) {missing} not found in the image; it has {image.band_names()}.")
        name = ev.tile_name or tile_id or "__no_tile__"
        ctx = {"shape": (height, width), "tile": name}
        arr = np.zeros((height, width), dtype=[(b, "<f4") for b in band_ids])
        for b in band_ids:
            band = by_name[b]
            values = band.fn(ctx)
            if band.resample != "nearest":
                values = _blur(values)
            arr[b] = values.astype(np.float32)
        with self._lock:
            self.pixel_bands.append({"tile_id": name, "bands": {b: (by_name[b].origin, by_name[b].resample)
                                                                for b in band_ids}})
        # masked rows in one band (not Dynamic World: its stack values must stay 1..9, the h5's 0 is "no data")
        hole = missing_rows(name, [b for b in band_ids if not b.startswith("dynamic_world")], height,
                            self.missing_fraction)
        if hole is not None:
            arr[hole[0]][hole[1], :] = np.float32(MISSING_VALUE)
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        self._send(h, 200, buf.getvalue(), entry, content_type="application/octet-stream")

    # ---- low-level replies

    def _drop(self, h: _Handler, entry: dict[str, Any]) -> None:
        entry["status"] = "dropped"
        h.settle()
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send(
        self, h: _Handler, status: int, data: bytes, entry: dict[str, Any], content_type: str = "application/json"
    ) -> None:
        entry["status"] = status
        h.settle()
        h.send_response(status)
        h.send_header("Content-Type", content_type if status < 400 else "application/json; charset=UTF-8")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
        h.wfile.flush()

    def _send_json(self, h: _Handler, status: int, obj: Any, entry: dict[str, Any]) -> None:
        self._send(h, status, json.dumps(obj).encode(), entry, content_type="application/json; charset=UTF-8")

    def _send_error(self, h: _Handler, code: int, message: str | None, entry: dict[str, Any]) -> None:
        self._send_json(h, code, ee_error_body(code, message), entry)


def initialize_ee(
    fake: FakeEarthEngine, *, max_retries: int = 0, deadline_ms: float = 0, stub_deprecated_assets: bool = True
) -> None:
    """``ee.Initialize`` against ``fake`` (service-account credentials), then set retries and deadline.

    ``stub_deprecated_assets``: replace (for the rest of the process) the
    client's fetch of the deprecated-assets catalogue from
    storage.googleapis.com, which ``ee.Initialize`` does on every call, by an
    empty catalogue: tests must not reach the network. Call ``ee.Reset()`` after.
    """
    import ee

    if stub_deprecated_assets:
        ee.deprecation._FetchDataCatalogStac = lambda: {}  # type: ignore[attr-defined]
    ee.Initialize(credentials=fake.credentials(), url=fake.url, project=fake.project)
    ee.data.setMaxRetries(max_retries)
    if deadline_ms:
        ee.data.setDeadline(deadline_ms)


__all__ = [
    "BadRequest",
    "EE_ERRORS",
    "FakeEarthEngine",
    "MISSING_VALUE",
    "S2_BANDS_L1C",
    "S2_BANDS_L2A",
    "band_values",
    "ee_error_body",
    "initialize_ee",
    "missing_rows",
    "Catalogue",
    "Evaluator",
    "identify",
    "utm_epsg",
]


def _serve_main(argv: list[str] | None = None) -> int:
    """Run a fake in its own process (benchmarks: the fake must not share a GIL with
    the code it measures). Prints one JSON line {url, project, service_account_info},
    serves until stdin closes; counters at GET /__stats__."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m tests.fake_ee")
    ap.add_argument("--latency-value", type=float, default=0.0)
    ap.add_argument("--latency-pixels", type=float, default=0.0)
    ap.add_argument("--max-concurrent", type=int, default=None)
    ap.add_argument("--missing-fraction", type=float, default=0.1)
    ap.add_argument("--s2-scenes", type=int, nargs=2, default=(60, 200), metavar=("LOW", "HIGH"),
                    help="scenes per Sentinel-2 collection and tile (log-uniform; small keeps the fake cheap)")
    args = ap.parse_args(argv)
    with FakeEarthEngine(latency={"value": args.latency_value, "pixels": args.latency_pixels},
                         max_concurrent=args.max_concurrent, missing_fraction=args.missing_fraction,
                         s2_counts=tuple(args.s2_scenes)) as fake:
        print(json.dumps({"url": fake.url, "project": fake.project,
                          "service_account_info": fake.service_account_info()}), flush=True)
        sys.stdin.read()  # until the parent closes our stdin (or dies)
    return 0


if __name__ == "__main__":
    raise SystemExit(_serve_main())
