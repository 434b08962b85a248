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
* ``POST /<v>/projects/<project>/value:compute``: the per-tile metadata answer
  (see :func:`metadata_answer`) or the constant at the result node.
* ``POST /<v>/projects/<project>/image:computePixels``: an NPY structured array
  (see :func:`pixels_array`).

The tile a request is about is found in the request body by
:func:`extract_request`: the source embeds a constant dictionary with (at
least) ``tile_id`` and ``kind`` in every request of a tile.

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
from typing import Any, Iterable

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
FAULT_NAMES: frozenset[str] = frozenset({"429", "500", "503", "400", "drop", "slow"})

S2_BANDS_L2A: tuple[str, ...] = (
    "B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12",
    "AOT", "WVP", "SCL", "TCI_R", "TCI_G", "TCI_B", "MSK_CLDPRB", "MSK_SNWPRB",
    "QA10", "QA20", "QA60",
)
S2_BANDS_L1C: tuple[str, ...] = (
    "B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12",
    "QA10", "QA20", "QA60",
)

#: Keys of a metadata answer, in order.
METADATA_KEYS: tuple[str, ...] = (
    "request", "n_images", "s2_type", "s2_id", "s2_date", "s2_bands", "crs", "crs_transform",
    "s1_asc", "s1_desc", "dw_count", "era5",
)

#: Fields a metadata request must carry.
METADATA_REQUEST_FIELDS: tuple[str, ...] = ("lat", "lon", "year", "start", "end", "prefer", "u")

# Probabilities of the deterministic per-tile choices of the metadata answer.
P_L2A_FALLBACK = 0.2
P_NO_CLDPRB = 0.1
P_NO_S1 = 0.2
P_NO_DW = 0.05

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


# --------------------------------------------------------------------------- request extraction


def _decode_node(node: Any, values: dict[str, Any], depth: int = 0) -> Any:
    """Turn a serialized EE value into plain Python where it is constant.

    ``{"constantValue": x}`` becomes ``x``, ``{"integerValue": "3"}`` ``3``,
    ``{"dictionaryValue": {"values": {...}}}`` a dict and ``{"arrayValue":
    {"values": [...]}}`` a list (of decoded items), ``{"valueReference": k}``
    the decoded ``values[k]``. Other nodes are kept, with decoded children.
    """
    if depth > 200:
        return node
    if isinstance(node, list):
        return [_decode_node(item, values, depth + 1) for item in node]
    if not isinstance(node, dict):
        return node
    keys = set(node)
    if keys == {"constantValue"}:
        return node["constantValue"]
    if keys == {"integerValue"}:
        try:
            return int(node["integerValue"])
        except (TypeError, ValueError):
            return node
    if keys == {"valueReference"} and isinstance(node["valueReference"], str):
        ref = node["valueReference"]
        if ref in values:
            return _decode_node(values[ref], values, depth + 1)
        return node
    if keys == {"dictionaryValue"} and isinstance(node["dictionaryValue"], dict):
        inner = node["dictionaryValue"].get("values", {}) or {}
        return {str(k): _decode_node(v, values, depth + 1) for k, v in inner.items()}
    if keys == {"arrayValue"} and isinstance(node["arrayValue"], dict):
        return [_decode_node(v, values, depth + 1) for v in node["arrayValue"].get("values", []) or []]
    return {k: _decode_node(v, values, depth + 1) for k, v in node.items()}


def _is_request(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("tile_id"), str) and isinstance(obj.get("kind"), str)


def _find_request(obj: Any, depth: int = 0) -> dict[str, Any] | None:
    if depth > 200:
        return None
    if _is_request(obj):
        return obj
    children: Iterable[Any]
    if isinstance(obj, dict):
        children = obj.values()
    elif isinstance(obj, list):
        children = obj
    else:
        return None
    for child in children:
        found = _find_request(child, depth + 1)
        if found is not None:
            return found
    return None


def _expression_values(body: Any) -> dict[str, Any]:
    """The ``values`` table of the (first) serialized expression in ``body``."""
    stack = [body]
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            if "result" in obj and isinstance(obj.get("values"), dict):
                return obj["values"]
            stack.extend(obj.values())
        elif isinstance(obj, list):
            stack.extend(obj)
    return {}


def extract_request(body: Any) -> dict[str, Any] | None:
    """The tile request embedded in a request body, as a plain dict, or None.

    Finds anywhere in ``body`` a dictionary with a string ``tile_id`` and a
    string ``kind``, whether serialized as a constant (``{"constantValue":
    {...}}``), as a dictionary of constants (``{"dictionaryValue": {"values":
    {"tile_id": {"constantValue": "t1"}, ...}}}``, value references resolved)
    or plain.
    """
    fast = _scan_request(body)
    if fast is not None:
        return copy.deepcopy(fast)
    values = _expression_values(body)
    decoded = _decode_node(body, values)
    found = _find_request(decoded)
    return copy.deepcopy(found) if found is not None else None


def _scan_request(body: Any) -> dict[str, Any] | None:
    """Linear fast path of :func:`extract_request`: one pass over the raw JSON (no value
    references resolved, which expands a shared graph into a tree), looking for the
    request as a plain/constant dict or as a dictionaryValue of constants."""
    table = _expression_values(body)

    def constant(node: Any) -> tuple[bool, Any]:
        for _ in range(50):  # follow value references to a constant
            if isinstance(node, dict) and set(node) == {"valueReference"} and node["valueReference"] in table:
                node = table[node["valueReference"]]
            else:
                break
        if isinstance(node, dict) and set(node) == {"constantValue"}:
            return True, node["constantValue"]
        return False, None

    stack = [body]
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            if _is_request(obj):
                return obj
            dv = obj.get("dictionaryValue")
            if isinstance(dv, dict) and isinstance(dv.get("values"), dict) and "tile_id" in dv["values"] \
                    and "kind" in dv["values"]:
                plain = {}
                for k, v in dv["values"].items():
                    ok, value = constant(v)
                    if ok:
                        plain[k] = value
                if _is_request(plain) and len(plain) == len(dv["values"]):
                    return plain
            stack.extend(obj.values())
        elif isinstance(obj, list):
            stack.extend(obj)
    return None


def constant_result(body: Any) -> Any:
    """The constant at the result node of ``body["expression"]``, else None."""
    expression = body.get("expression") if isinstance(body, dict) else None
    if not isinstance(expression, dict):
        return None
    values = expression.get("values") or {}
    node = expression.get("result")
    for _ in range(100):
        if isinstance(node, str) and node in values:
            node = values[node]
        elif isinstance(node, dict) and set(node) == {"valueReference"} and node["valueReference"] in values:
            node = values[node["valueReference"]]
        else:
            break
    if isinstance(node, dict) and set(node) == {"constantValue"}:
        return node["constantValue"]
    if isinstance(node, dict) and set(node) == {"integerValue"}:
        return int(node["integerValue"])
    return None


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


def era5_answer(tile_id: str, lat: float, date: dt.date) -> dict[str, list[float]]:
    """ERA5-Land-like monthly aggregates around ``date``.

    ``month1``: the previous month, ``month2``: the month of ``date``,
    ``year``: the 12 months ending with ``month2``; each ``[mean 2 m
    temperature, min, max (K), total precipitation (m)]``.
    """
    rng = random.Random(_seed(tile_id, "era5"))
    t_annual = 300.0 - 0.0072 * lat * lat + rng.uniform(-2.0, 2.0)
    amplitude = 0.2 * abs(lat) + rng.uniform(0.0, 1.5)
    peak = 7 if lat >= 0 else 1
    wet = rng.uniform(0.02, 0.12)
    months = [_shift_month(date.year, date.month, d) for d in range(-11, 1)]
    rows: list[list[float]] = []
    for year, month in months:
        mrng = random.Random(_seed(tile_id, "era5", year, month))
        t = t_annual + amplitude * math.cos(2.0 * math.pi * (month - peak) / 12.0) + mrng.uniform(-1.0, 1.0)
        spread = 4.0 + 0.08 * abs(lat) + mrng.uniform(0.0, 3.0)
        precip = max(0.0, wet * (1.0 + 0.5 * math.sin(2.0 * math.pi * month / 12.0)) * mrng.uniform(0.5, 1.5))
        rows.append([round(t, 3), round(t - spread, 3), round(t + spread, 3), round(precip, 5)])
    year_vec = [
        round(sum(r[0] for r in rows) / 12.0, 3),
        min(r[1] for r in rows),
        max(r[2] for r in rows),
        round(sum(r[3] for r in rows), 5),
    ]
    return {"month1": rows[-2], "month2": rows[-1], "year": year_vec}


def _s1_answer(tile_id: str, lat: float, date: dt.date, orbit: str) -> dict[str, Any] | None:
    if _unit(tile_id, "s1", orbit) < P_NO_S1:
        return None
    rng = random.Random(_seed(tile_id, "s1id", orbit))
    day = date + dt.timedelta(days=rng.randint(-6, 6))
    t0 = dt.datetime.combine(day, dt.time(5 if orbit == "asc" else 17, rng.randint(0, 59), rng.randint(0, 59)))
    t1 = t0 + dt.timedelta(seconds=25)
    polar = abs(lat) > 70
    product = "1SDH" if polar else "1SDV"
    sat = "S1A" if rng.random() < 0.6 else "S1B"
    orbit_no = rng.randint(10000, 40000)
    ident = (
        f"COPERNICUS/S1_GRD/{sat}_IW_GRDH_{product}_{t0:%Y%m%dT%H%M%S}_{t1:%Y%m%dT%H%M%S}_"
        f"{orbit_no:06d}_{rng.randint(0, 0xFFFFFF):06X}_{rng.randint(0, 0xFFFF):04X}"
    )
    return {"id": ident, "bands": ["HH", "HV"] if polar else ["VV", "VH"]}


def metadata_answer(request: dict[str, Any], no_data: bool = False) -> dict[str, Any]:
    """The ``value:compute`` result for a metadata request (deterministic).

    Raises :class:`BadRequest` when the request lacks a field.
    """
    missing = [name for name in METADATA_REQUEST_FIELDS if name not in request]
    if missing:
        raise BadRequest(f"Metadata request is missing field(s): {', '.join(missing)}.")
    tile_id = str(request["tile_id"])
    try:
        lat = float(request["lat"])
        lon = float(request["lon"])
        u = float(request["u"])
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"Invalid number in request: {exc}.") from exc
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 360.0):
        raise BadRequest(f"Coordinates out of range: lat={lat}, lon={lon}.")
    start = _parse_date(request["start"], "start")
    end = _parse_date(request["end"], "end")
    if end < start:
        raise BadRequest(f"Empty date range: {start} .. {end}.")
    prefer = str(request["prefer"]).lower()
    if prefer not in ("l2a", "l1c"):
        raise BadRequest(f"Invalid product preference {request['prefer']!r}.")

    answer: dict[str, Any] = {key: None for key in METADATA_KEYS}
    answer["request"] = request
    if no_data:
        answer["n_images"] = 0
        return answer

    answer["n_images"] = 1 + int(_unit(tile_id, "n_images") * 40)
    s2_type = prefer
    if prefer == "l2a" and _unit(tile_id, "l2a_fallback") < P_L2A_FALLBACK:
        s2_type = "l1c"
    answer["s2_type"] = s2_type

    span = (end - start).days + 1
    offset = int(((u + _unit(tile_id, "date")) % 1.0) * span)
    date = start + dt.timedelta(days=min(offset, span - 1))
    answer["s2_date"] = date.isoformat()
    rng = random.Random(_seed(tile_id, "s2id"))
    sensing = dt.datetime.combine(date, dt.time(rng.randint(9, 11), rng.randint(0, 59), rng.randint(0, 59)))
    generated = sensing + dt.timedelta(seconds=rng.randint(60, 600))
    collection = "S2_SR_HARMONIZED" if s2_type == "l2a" else "S2_HARMONIZED"
    answer["s2_id"] = (
        f"COPERNICUS/{collection}/{sensing:%Y%m%dT%H%M%S}_{generated:%Y%m%dT%H%M%S}_T{_mgrs_name(lat, lon, tile_id)}"
    )
    if s2_type == "l2a":
        bands = list(S2_BANDS_L2A)
        if _unit(tile_id, "no_cldprb") < P_NO_CLDPRB:
            bands.remove("MSK_CLDPRB")
    else:
        bands = list(S2_BANDS_L1C)
    answer["s2_bands"] = bands

    epsg = utm_epsg(lat, lon)
    answer["crs"] = f"EPSG:{epsg}"
    x, y = _project(lat, lon, epsg)
    x0 = 100000 * math.floor(x / 100000.0)
    y0 = 100000 * math.ceil(y / 100000.0)
    answer["crs_transform"] = [10, 0, int(x0), 0, -10, int(y0)]

    answer["s1_asc"] = _s1_answer(tile_id, lat, date, "asc")
    answer["s1_desc"] = _s1_answer(tile_id, lat, date, "desc")
    answer["dw_count"] = 0 if _unit(tile_id, "no_dw") < P_NO_DW else 20 + int(_unit(tile_id, "dw") * 120)
    answer["era5"] = era5_answer(tile_id, lat, date)
    return answer


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


def pixels_array(
    tile_id: str, band_ids: list[str], height: int, width: int, missing_fraction: float = 0.1
) -> np.ndarray:
    """The structured (height, width) array of a computePixels answer."""
    arr = np.zeros((height, width), dtype=[(b, "<f4") for b in band_ids])
    for band_id in band_ids:
        arr[band_id] = band_values(tile_id, band_id, height, width).astype(np.float32)
    hole = missing_rows(tile_id, band_ids, height, missing_fraction)
    if hole is not None:
        arr[hole[0]][hole[1], :] = np.float32(MISSING_VALUE)
    return arr


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
        no_data_tiles: tiles whose metadata answer has ``n_images`` 0.
        faults: tile_id -> faults applied to that tile's successive API
            requests (value or pixels), one per request, then normal answers.
            Faults: ``"429"``, ``"500"``, ``"503"``, ``"400"``, ``"drop"``
            (close the connection without answering), ``"slow"`` (sleep
            ``slow_s`` then answer normally).
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
        slot_seconds, log.
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
            request = extract_request(payload)
            tile_id = request["tile_id"] if request else None
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
                else:
                    raise _Reply(fault, f"{EE_ERRORS[fault][1]}" if fault != "400" else "Injected invalid argument.")
            self._sleep(kind)
            if kind == "value":
                self._value(h, payload, request, entry)
            else:
                self._pixels(h, payload, request, entry)
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

    def _value(
        self, h: _Handler, payload: dict[str, Any], request: dict[str, Any] | None, entry: dict[str, Any]
    ) -> None:
        """Answer value:compute: the metadata of the request's tile, or the constant result."""
        if request is None:
            self._send_json(h, 200, {"result": constant_result(payload)}, entry)
            return
        if request.get("kind") in ("ecoregions", "points"):
            self._send_json(h, 200, {"result": sampler_answer(request)}, entry)
            return
        if request.get("kind") != "metadata":
            raise BadRequest(f"value:compute got a request of kind {request.get('kind')!r}; expected 'metadata'.")
        answer = metadata_answer(request, no_data=request["tile_id"] in self.no_data_tiles)
        self._send_json(h, 200, {"result": answer}, entry)

    def _pixels(
        self, h: _Handler, payload: dict[str, Any], request: dict[str, Any] | None, entry: dict[str, Any]
    ) -> None:
        """Answer image:computePixels with an NPY structured array."""
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
        tile_id = request["tile_id"] if request else "__no_tile__"
        arr = pixels_array(tile_id, band_ids, height, width, self.missing_fraction)
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        self._send(h, 200, buf.getvalue(), entry, content_type="application/octet-stream")

    # ---- low-level replies

    def _drop(self, h: _Handler, entry: dict[str, Any]) -> None:
        entry["status"] = "dropped"
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send(
        self, h: _Handler, status: int, data: bytes, entry: dict[str, Any], content_type: str = "application/json"
    ) -> None:
        entry["status"] = status
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


def _resolve_regions():
    """The fake RESOLVE/ECOREGIONS/2017: the project's shipped regions file (Rock & Ice dropped,
    as the source's filter asks)."""
    from tasks.multimodal import tiles as tiles_mod

    return tiles_mod.load_regions(tiles_mod.DEFAULT_REGIONS)


def sampler_answer(request: dict[str, Any]) -> dict[str, Any]:
    """Answers of the Earth Engine tile sampler: the ecoregion table, or randomPoints."""
    import numpy as np

    from tasks.multimodal import tiles as tiles_mod

    regions = _resolve_regions()
    if request["kind"] == "ecoregions":
        table = [[r.eco_region, r.biome, 100 + i, tiles_mod.geodesic_area_m2(r.geometry)]
                 for i, r in enumerate(sorted(regions, key=lambda r: r.eco_region))]
        return {"request": request, "table": table}
    region = next((r for r in regions if r.eco_region == request["eco_region"]), None)
    if region is None:
        raise BadRequest(f"Collection.randomPoints: empty region {request['eco_region']!r}.")
    rng = np.random.default_rng(int(request["seed"]))
    pts = tiles_mod.sample_points(region.geometry, int(request["n"]), rng)
    return {"request": request, "points": [[float(x), float(y)] for x, y in pts]}


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
    "METADATA_KEYS",
    "MISSING_VALUE",
    "S2_BANDS_L1C",
    "S2_BANDS_L2A",
    "band_values",
    "constant_result",
    "ee_error_body",
    "era5_answer",
    "extract_request",
    "initialize_ee",
    "metadata_answer",
    "missing_rows",
    "pixels_array",
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
    args = ap.parse_args(argv)
    with FakeEarthEngine(latency={"value": args.latency_value, "pixels": args.latency_pixels},
                         max_concurrent=args.max_concurrent, missing_fraction=args.missing_fraction) as fake:
        print(json.dumps({"url": fake.url, "project": fake.project,
                          "service_account_info": fake.service_account_info()}), flush=True)
        sys.stdin.read()  # until the parent closes our stdin (or dies)
    return 0


if __name__ == "__main__":
    raise SystemExit(_serve_main())
