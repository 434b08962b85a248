"""Tests of the loopback Earth Engine fake (tests/fake_ee.py) with the real ``earthengine-api`` client."""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import json
import math
import re
import threading
import urllib.error
import urllib.request
from typing import Any, Callable, Iterator

import ee
import numpy as np
import pytest
from google.auth.transport.requests import Request as AuthRequest
from pyproj import Transformer

from tests.fake_ee import (
    METADATA_KEYS,
    MISSING_VALUE,
    S2_BANDS_L1C,
    S2_BANDS_L2A,
    FakeEarthEngine,
    extract_request,
    initialize_ee,
    metadata_answer,
    missing_rows,
    pixels_array,
)

pytestmark = pytest.mark.timeout(60)

REQUEST_T1: dict[str, Any] = {
    "tile_id": "t1", "kind": "metadata", "lat": 50.5, "lon": 8.5, "year": 2019,
    "start": "2018-12-01", "end": "2019-12-31", "prefer": "l2a", "u": 0.3,
}


def metadata_request(tile_id: str, **overrides: Any) -> dict[str, Any]:
    """REQUEST_T1 for another tile, with overrides."""
    return {**REQUEST_T1, "tile_id": tile_id, **overrides}


def compute_metadata(request: dict[str, Any]) -> Any:
    """One value:compute of a metadata request, as the source sends it (plus a computed entry)."""
    return ee.data.computeValue(ee.Dictionary({"request": request, "n": ee.Number(1).add(1)}))


def grid(width: int, height: int) -> dict[str, Any]:
    """A computePixels grid at 10 m in UTM 32N."""
    return {
        "dimensions": {"width": width, "height": height},
        "affineTransform": {
            "scaleX": 10, "shearX": 0, "translateX": 400000,
            "shearY": 0, "scaleY": -10, "translateY": 5600000,
        },
        "crsCode": "EPSG:32632",
    }


def compute_pixels(tile_id: str, band_ids: list[str], width: int = 130, height: int = 130) -> Any:
    """One computePixels of a tile, as the source sends it."""
    image = (
        ee.Image.constant(list(range(1, len(band_ids) + 1)))
        .rename(band_ids)
        .set("request", {"tile_id": tile_id, "kind": "pixels"})
    )
    return ee.data.computePixels(
        {"expression": image, "fileFormat": "NUMPY_NDARRAY", "grid": grid(width, height), "bandIds": band_ids}
    )


@pytest.fixture
def make_fake() -> Iterator[Callable[..., FakeEarthEngine]]:
    """Start a fake and initialize the (global) ee client against it; ee.Reset() after."""
    fakes: list[FakeEarthEngine] = []

    def _make(**kwargs: Any) -> FakeEarthEngine:
        fake = FakeEarthEngine(**kwargs).start()
        fakes.append(fake)
        ee.Reset()  # another test may have initialized the global client (and cached the algorithms)
        initialize_ee(fake, max_retries=0)
        return fake

    try:
        yield _make
    finally:
        ee.Reset()
        for fake in fakes:
            fake.stop()


def raw_post(url: str, body: Any, token: str | None = None) -> tuple[int, Any]:
    """POST JSON with urllib (no ee client); (status, decoded JSON body)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# --------------------------------------------------------------------------- 1. metadata


def test_metadata_request(make_fake: Callable[..., FakeEarthEngine]) -> None:
    fake = make_fake()
    assert fake.total["token"] == 1 and fake.total["discovery"] >= 1 and fake.total["algorithms"] == 1
    fake.reset_counters()

    result = compute_metadata(REQUEST_T1)
    assert fake.requests_by_tile == {"t1": {"value": 1, "pixels": 0}}
    assert fake.total["value"] == 1

    assert list(result) == list(METADATA_KEYS)
    assert result["request"] == REQUEST_T1
    assert isinstance(result["n_images"], int) and result["n_images"] > 0
    assert result["s2_type"] in ("l2a", "l1c")
    date = dt.date.fromisoformat(result["s2_date"])
    assert dt.date(2018, 12, 1) <= date <= dt.date(2019, 12, 31)
    collection = "S2_SR_HARMONIZED" if result["s2_type"] == "l2a" else "S2_HARMONIZED"
    match = re.fullmatch(rf"COPERNICUS/{collection}/(\d{{8}})T\d{{6}}_\d{{8}}T\d{{6}}_T32U[A-Z]{{2}}", result["s2_id"])
    assert match and match.group(1) == date.strftime("%Y%m%d")
    if result["s2_type"] == "l2a":
        assert set(result["s2_bands"]) <= set(S2_BANDS_L2A)
        assert set(S2_BANDS_L2A) - set(result["s2_bands"]) <= {"MSK_CLDPRB"}
    else:
        assert result["s2_bands"] == list(S2_BANDS_L1C)

    assert result["crs"] == "EPSG:32632"
    transform = result["crs_transform"]
    assert transform[:2] == [10, 0] and transform[3:5] == [0, -10]
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32632", always_xy=True).transform(8.5, 50.5)
    assert transform[2] % 10 == 0 and transform[5] % 10 == 0
    assert 0 <= x - transform[2] < 110_000 and 0 <= transform[5] - y < 110_000

    for orbit in ("s1_asc", "s1_desc"):
        s1 = result[orbit]
        assert s1 is None or (s1["id"].startswith("COPERNICUS/S1_GRD/S1") and s1["bands"] == ["VV", "VH"])
    assert isinstance(result["dw_count"], int) and result["dw_count"] >= 0

    era5 = result["era5"]
    assert set(era5) == {"month1", "month2", "year"}
    for vec in era5.values():
        t, tmin, tmax, precip = vec
        assert 230.0 < tmin <= t <= tmax < 320.0 and precip >= 0.0
    assert era5["year"][1] <= min(era5["month1"][1], era5["month2"][1])
    assert era5["year"][2] >= max(era5["month1"][2], era5["month2"][2])
    assert era5["year"][3] >= era5["month1"][3] + era5["month2"][3]

    again = compute_metadata(REQUEST_T1)
    assert again == result
    assert fake.requests_by_tile["t1"] == {"value": 2, "pixels": 0}


def test_metadata_answer_statistics_and_geography() -> None:
    """The per-tile deterministic choices have about the advertised rates; CRS follows the hemisphere."""
    answers = [metadata_answer(metadata_request(f"tile-{i}")) for i in range(2000)]
    share = lambda pred: sum(1 for a in answers if pred(a)) / len(answers)  # noqa: E731
    assert 0.15 < share(lambda a: a["s2_type"] == "l1c") < 0.25
    assert 0.15 < share(lambda a: a["s1_asc"] is None) < 0.25
    assert 0.02 < share(lambda a: a["dw_count"] == 0) < 0.08
    assert 0.05 < share(lambda a: a["s2_type"] == "l2a" and "MSK_CLDPRB" not in a["s2_bands"]) < 0.12
    # u moves the date within the window
    dates = {metadata_answer(metadata_request("t1", u=u))["s2_date"] for u in (0.0, 0.25, 0.5, 0.75)}
    assert len(dates) == 4

    south = metadata_answer(metadata_request("s", lat=-33.9, lon=18.4, prefer="l1c"))
    assert south["crs"] == "EPSG:32734" and south["s2_type"] == "l1c"
    assert south["s2_id"].startswith("COPERNICUS/S2_HARMONIZED/") and south["s2_bands"] == list(S2_BANDS_L1C)
    assert south["era5"]["month2"][0] > 280.0  # southern summer/autumn around Cape Town

    polar = [metadata_answer(metadata_request(f"p{i}", lat=78.2, lon=15.6)) for i in range(20)]
    s1 = [a[o] for a in polar for o in ("s1_asc", "s1_desc") if a[o] is not None]
    assert s1 and all(x["bands"] == ["HH", "HV"] and "_1SDH_" in x["id"] for x in s1)
    assert all(a["era5"]["year"][0] < 275.0 for a in polar)


# --------------------------------------------------------------------------- 2. pixels


def test_pixels_request(make_fake: Callable[..., FakeEarthEngine]) -> None:
    fake = make_fake(missing_fraction=0.0)
    fake.reset_counters()
    arr = compute_pixels("t1", ["sentinel2__B4", "aster__elevation"])
    assert isinstance(arr, np.ndarray) and arr.shape == (130, 130)
    assert arr.dtype.names == ("sentinel2__B4", "aster__elevation")
    assert all(arr.dtype[name] == np.dtype("<f4") for name in arr.dtype.names)
    assert 1.0 <= arr["sentinel2__B4"].min() and arr["sentinel2__B4"].max() <= 10000.0
    assert 0.0 <= arr["aster__elevation"].min() and arr["aster__elevation"].max() <= 3000.0
    assert arr["sentinel2__B4"].std() > 0.0
    assert fake.requests_by_tile == {"t1": {"value": 0, "pixels": 1}}
    assert fake.total["pixels"] == 1

    # H rows and W columns from the grid; deterministic
    rect = compute_pixels("t1", ["sentinel2__B4"], width=40, height=25)
    assert rect.shape == (25, 40)
    assert np.array_equal(rect["sentinel2__B4"], compute_pixels("t1", ["sentinel2__B4"], 40, 25)["sentinel2__B4"])


def test_pixel_value_ranges() -> None:
    ranges: dict[str, tuple[float, float]] = {
        "sentinel2__B2": (1, 10000), "sentinel2__B8A": (1, 10000), "sentinel2__B12": (1, 10000),
        "sentinel2__SCL": (0, 11), "sentinel2__MSK_CLDPRB": (0, 100),
        "sentinel1_asc__VV": (-25, 0), "sentinel1_desc__VH": (-25, 0),
        "aster__elevation": (0, 3000), "aster__slope": (0, 60),
        "dynamic_world__label": (1, 9), "canopy_height_eth__height": (0, 40), "canopy_height_eth__std": (0, 10),
    }
    bands = [*ranges, "sentinel2__QA60", "esa_worldcover__Map", "nonsense__x"]
    for tile in ("a", "b", "c"):
        arr = pixels_array(tile, bands, 64, 64, missing_fraction=0.0)
        for band, (lo, hi) in ranges.items():
            assert lo <= arr[band].min() and arr[band].max() <= hi, band
        for band in ("sentinel2__SCL", "dynamic_world__label", "esa_worldcover__Map"):
            assert np.array_equal(arr[band], np.round(arr[band])), band
        assert set(np.unique(arr["sentinel2__QA60"])) <= {0.0, 1024.0, 2048.0}
        assert set(np.unique(arr["esa_worldcover__Map"])) <= {10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100}
        assert not arr["nonsense__x"].any()


def test_missing_rows(make_fake: Callable[..., FakeEarthEngine]) -> None:
    bands = ["sentinel2__B4", "aster__elevation", "sentinel1_asc__VV"]
    holes = [t for t in (f"m{i}" for i in range(300)) if missing_rows(t, bands, 32, 0.1) is not None]
    assert 10 < len(holes) < 60
    make_fake()  # default missing_fraction 0.1
    arr = compute_pixels(holes[0], bands, width=32, height=32)
    band, rows = missing_rows(holes[0], bands, 32, 0.1)  # type: ignore[misc]
    assert np.all(arr[band][rows] == np.float32(MISSING_VALUE))
    assert np.sum(arr[band] == np.float32(MISSING_VALUE)) == 32 * (rows.stop - rows.start)
    assert all(not np.any(arr[b] == np.float32(MISSING_VALUE)) for b in bands if b != band)


def test_pixels_too_large_is_invalid_argument(make_fake: Callable[..., FakeEarthEngine]) -> None:
    make_fake()
    with pytest.raises(ee.EEException, match="Total request size"):
        compute_pixels("big", ["sentinel2__B4"], width=5000, height=5000)


# --------------------------------------------------------------------------- 3. faults


def test_scripted_faults(make_fake: Callable[..., FakeEarthEngine]) -> None:
    fake = make_fake(faults={"t2": ["429", "500", "503", "400"], "t3": ["drop"], "t4": ["slow"]}, slow_s=3.0)
    req = metadata_request("t2")
    for pattern in ("too many concurrent requests", "internal error", "currently unavailable", "invalid argument"):
        with pytest.raises(ee.EEException) as info:
            compute_metadata(req)
        assert pattern in str(info.value).lower()
    assert compute_metadata(req)["n_images"] > 0
    assert fake.requests_by_tile["t2"]["value"] == 5

    outcome: Any = None
    with pytest.raises(Exception) as dropped:
        outcome = compute_metadata(metadata_request("t3"))
    assert outcome is None
    assert isinstance(dropped.value, (ConnectionError, OSError)) and not isinstance(dropped.value, ee.EEException)
    assert compute_metadata(metadata_request("t3"))["request"]["tile_id"] == "t3"

    ee.data.setDeadline(500)
    try:
        with pytest.raises(TimeoutError):
            compute_metadata(metadata_request("t4"))
    finally:
        ee.data.setDeadline(0)
    assert compute_metadata(metadata_request("t4"))["request"]["tile_id"] == "t4"

    assert [f for f in fake.faults_injected] == [
        ("t2", "value", "429"), ("t2", "value", "500"), ("t2", "value", "503"), ("t2", "value", "400"),
        ("t3", "value", "drop"), ("t4", "value", "slow"),
    ]
    statuses = [e["status"] for e in fake.log if e["tile_id"] == "t2"]
    assert statuses == [429, 500, 503, 400, 200]


def test_pixels_faults_and_random_faults(make_fake: Callable[..., FakeEarthEngine]) -> None:
    fake = make_fake(faults={"p": ["503"]})
    with pytest.raises(ee.EEException, match="unavailable"):
        compute_pixels("p", ["sentinel2__B4"], 8, 8)
    assert compute_pixels("p", ["sentinel2__B4"], 8, 8).shape == (8, 8)

    def run(seed: int) -> list[tuple[str | None, str, str]]:
        ee.Reset()
        f = make_fake(fault_rate=0.5, fault_kinds=["429", "500"], seed=seed)
        for i in range(12):
            try:
                compute_metadata(metadata_request(f"r{i % 4}"))
            except ee.EEException as exc:
                assert str(exc) in ("Too many concurrent requests.", "An internal error has occurred.")
        return sorted(f.faults_injected, key=repr)

    first, second = run(7), run(7)
    assert first == second and 2 <= len(first) <= 10


# --------------------------------------------------------------------------- 4. no data


def test_no_data_tiles(make_fake: Callable[..., FakeEarthEngine]) -> None:
    make_fake(no_data_tiles={"empty"})
    result = compute_metadata(metadata_request("empty"))
    assert list(result) == list(METADATA_KEYS)
    assert result["request"]["tile_id"] == "empty" and result["n_images"] == 0
    assert all(result[k] is None for k in METADATA_KEYS if k not in ("request", "n_images"))
    assert compute_metadata(metadata_request("full"))["n_images"] > 0


def test_value_without_request(make_fake: Callable[..., FakeEarthEngine]) -> None:
    fake = make_fake()
    assert ee.data.computeValue(ee.Number(1)) == 1
    assert ee.data.computeValue(ee.Number(1).add(2)) is None
    assert fake.requests_by_tile == {}


# --------------------------------------------------------------------------- 5. concurrency


def _concurrent_metadata(n: int) -> list[Any]:
    barrier = threading.Barrier(n)

    def call(i: int) -> Any:
        barrier.wait()
        try:
            return compute_metadata(metadata_request(f"c{i}"))
        except ee.EEException as exc:
            return exc

    with cf.ThreadPoolExecutor(n) as pool:
        return list(pool.map(call, range(n)))


def test_max_in_flight(make_fake: Callable[..., FakeEarthEngine]) -> None:
    fake = make_fake(latency={"value": 0.3})
    fake.reset_counters()
    results = _concurrent_metadata(8)
    assert all(isinstance(r, dict) and r["n_images"] > 0 for r in results)
    assert [r["request"]["tile_id"] for r in results] == [f"c{i}" for i in range(8)]
    assert fake.max_in_flight == 8 and fake.in_flight == 0
    assert fake.slot_seconds >= 8 * 0.3
    assert sorted(fake.requests_by_tile) == sorted(f"c{i}" for i in range(8))


def test_max_concurrent_answers_429(make_fake: Callable[..., FakeEarthEngine]) -> None:
    fake = make_fake(latency={"value": 0.3}, max_concurrent=3)
    results = _concurrent_metadata(8)
    ok = [r for r in results if isinstance(r, dict)]
    rejected = [r for r in results if isinstance(r, ee.EEException)]
    assert len(ok) + len(rejected) == 8
    assert len(ok) >= 3 and rejected
    assert all("Too many concurrent requests" in str(r) for r in rejected)
    assert fake.max_admitted_in_flight <= 3
    assert fake.total["rejected"] == len(rejected)


# --------------------------------------------------------------------------- 6. auth


def test_unauthorized(make_fake: Callable[..., FakeEarthEngine]) -> None:
    fake = make_fake()
    fake.reset_counters()
    url = f"{fake.url}/v1/projects/{fake.project}/value:compute"
    body = {"expression": {"result": "0", "values": {"0": {"constantValue": {"tile_id": "u", "kind": "metadata"}}}}}
    status, answer = raw_post(url, body)
    assert status == 401 and answer["error"]["status"] == "UNAUTHENTICATED" and answer["error"]["code"] == 401
    status, _ = raw_post(url, body, token="not-a-token")
    assert status == 401
    assert fake.total["unauthorized"] == 2 and fake.total["value"] == 0
    assert fake.requests_by_tile == {}

    # a token from the fake's /token endpoint works for raw requests too
    creds = fake.credentials()
    creds.refresh(AuthRequest())
    status, answer = raw_post(url, {"expression": {"result": "0", "values": {"0": {"constantValue": 5}}}}, creds.token)
    assert (status, answer) == (200, {"result": 5})
    status, answer = raw_post(f"{fake.url}/v1/projects/other-project/value:compute", body, creds.token)
    assert status == 403 and answer["error"]["status"] == "PERMISSION_DENIED"

    # revoked tokens: the client gets 401, refreshes its token and retries by itself
    fake.reset_counters()
    fake.revoke_tokens()
    assert compute_metadata(metadata_request("after-revoke"))["n_images"] > 0
    assert fake.total["unauthorized"] == 1 and fake.total["token"] == 1 and fake.total["value"] == 1


# --------------------------------------------------------------------------- 7. secrets


def test_no_secrets_in_log_or_counters(make_fake: Callable[..., FakeEarthEngine]) -> None:
    fake = make_fake(faults={"s": ["429"]})
    for _ in range(2):
        try:
            compute_metadata(metadata_request("s"))
        except ee.EEException:
            pass
    compute_pixels("s", ["sentinel2__B4"], 8, 8)
    raw_post(f"{fake.url}/v1/projects/{fake.project}/value:compute", {"expression": {}}, token="bogus-token")
    creds = fake.credentials()
    creds.refresh(AuthRequest())

    dumped = json.dumps(fake.snapshot(), default=str) + repr(fake.__dict__.get("log"))
    info = fake.service_account_info()
    key_body = "".join(info["private_key"].splitlines()[1:-1])
    assert info["private_key"] not in dumped
    for chunk in (key_body[i : i + 40] for i in range(0, len(key_body), 400)):
        assert chunk not in dumped
    assert creds.token and creds.token not in dumped
    client_token = ee.data._get_state().credentials.token  # the token the ee client is using
    assert client_token and client_token not in dumped
    assert "bogus-token" not in dumped and "Bearer" not in dumped and "authorization" not in dumped.lower()
    assert all(set(e) <= {"method", "path", "kind", "tile_id", "status", "fault", "duration_s"} for e in fake.log)


# --------------------------------------------------------------------------- extract_request


def test_extract_request_shapes() -> None:
    req = {"tile_id": "t9", "kind": "pixels"}
    constant = {"expression": {"result": "0", "values": {"0": {"constantValue": {"request": req}}}}}
    assert extract_request(constant) == req
    dictionary = {
        "expression": {
            "result": "0",
            "values": {
                "0": {"dictionaryValue": {"values": {
                    "tile_id": {"valueReference": "1"},
                    "kind": {"constantValue": "metadata"},
                    "year": {"integerValue": "2019"},
                    "lat": {"constantValue": 1.5},
                }}},
                "1": {"constantValue": "t9"},
            },
        }
    }
    assert extract_request(dictionary) == {"tile_id": "t9", "kind": "metadata", "year": 2019, "lat": 1.5}
    assert extract_request({"expression": {"result": "0", "values": {"0": {"constantValue": 1}}}}) is None
    assert math.isclose(metadata_answer(metadata_request("x"))["request"]["u"], 0.3)
