"""Tests of the loopback Earth Engine fake (tests/fake_ee.py) with the real ``earthengine-api`` client."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import threading
import urllib.error
import urllib.request
from typing import Any, Callable, Iterator

import ee
import numpy as np
import pytest
import shapely.geometry
from google.auth.transport.requests import Request as AuthRequest

from tasks.multimodal.sources.base import Tile
from tasks.multimodal.sources.earthengine import (
    choose, decode_npy, metadata_expression, parse_metadata, pixels_expression,
)
from tests import fake_ee
from tests.fake_ee import (
    MISSING_VALUE,
    FakeEarthEngine,
    band_values,
    initialize_ee,
    missing_rows,
)

pytestmark = pytest.mark.timeout(120)

NAMES = ["t1", "t2", "t3", "t4", "p", "s", "empty", "full", "after-revoke", *[f"c{i}" for i in range(8)],
         *[f"r{i}" for i in range(4)], *[f"m{i}" for i in range(300)]]


def tile(name: str) -> Tile:
    """A 1.2 km lon/lat square at a place given by the name (t1: 8.5 E, 50.5 N)."""
    if name == "t1":
        lon, lat = 8.5, 50.5
    else:
        h = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
        lon, lat = -170 + (h % 3400) / 10.0, -55 + ((h // 3400) % 1200) / 10.0
    d = 0.006
    ring = [[lon - d, lat - d], [lon + d, lat - d], [lon + d, lat + d], [lon - d, lat + d], [lon - d, lat - d]]
    return Tile(name, "Tundra", "x", lon, lat, {"type": "Polygon", "coordinates": [ring]})


TILES = {n: tile(n).geometry for n in NAMES}


def compute_metadata(name: str) -> Any:
    """The source's metadata request of a tile."""
    t = tile(name)
    return ee.data.computeValue(metadata_expression(t, choose(t)))


def compute_pixels(name: str, width: int = 130, height: int = 130, bands: list[str] | None = None) -> np.ndarray:
    """The source's pixels request of a tile (after its metadata request), decoded."""
    t = tile(name)
    ch = choose(t)
    meta = parse_metadata(t, ch, ee.data.computeValue(metadata_expression(t, ch)))
    image, names = pixels_expression(t, meta)
    return decode_npy(ee.data.computePixels({"expression": image, "fileFormat": "NPY", "bandIds": bands or names,
                                             "grid": grid(width, height)}))


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


@pytest.fixture
def make_fake() -> Iterator[Callable[..., FakeEarthEngine]]:
    """Start a fake and initialize the (global) ee client against it; ee.Reset() after."""
    fakes: list[FakeEarthEngine] = []

    def _make(**kwargs: Any) -> FakeEarthEngine:
        kwargs.setdefault("tiles", TILES)
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


def value(expr: Any) -> Any:
    return ee.data.computeValue(expr)


# --------------------------------------------------------------------------- 1. what the query asks


def _t1_poly():
    return ee.Geometry.Polygon(tile("t1").geometry["coordinates"])


def test_metadata_request(make_fake: Callable[..., FakeEarthEngine]) -> None:
    fake = make_fake()
    assert fake.total["token"] == 1 and fake.total["discovery"] >= 1 and fake.total["algorithms"] == 1
    fake.reset_counters()
    result = compute_metadata("t1")
    assert fake.requests_by_tile == {"t1": {"value": 1, "pixels": 0}} and fake.total["value"] == 1
    assert result["n_images"] > 0 and result["s2_type"] in ("l2a", "l1c")
    collection = "S2_SR_HARMONIZED" if result["s2_type"] == "l2a" else "S2_HARMONIZED"
    assert result["s2_id"].startswith(f"COPERNICUS/{collection}/" + result["s2_date"].replace("-", ""))
    assert result["crs"] in ("EPSG:32632", "EPSG:32633")
    transform = result["crs_transform"]
    assert transform[:2] == [10, 0] and transform[3:5] == [0, -10] and transform[2] % 10 == 0
    for orbit in ("s1_asc", "s1_desc"):
        pick = result[orbit]  # {"ids": [] or [the closest scene], "bands": its bands}
        assert len(pick["ids"]) <= 1 and all(i.startswith("COPERNICUS/S1_GRD/") for i in pick["ids"])
        assert not pick["ids"] or pick["bands"][-1] == "angle"
    names, values = result["era5"]["names"], result["era5"]["values"]
    assert len(names) == 12 and set(values) == set(names)
    assert names[8:] == ["0_temperature_2m_mean", "1_temperature_2m_min_min", "2_temperature_2m_max_max",
                         "3_total_precipitation_sum_sum"]
    assert compute_metadata("t1") == result  # deterministic
    assert "ImageCollection.load" in fake.evaluations[-1]["calls"]


def test_filters_are_evaluated(make_fake: Callable[..., FakeEarthEngine]) -> None:
    """Dates end-exclusive, cloud cover, bounds, containment with its buffer, instrument
    mode and orbit pass change what the fake answers, as they would on Earth Engine."""
    fake = make_fake()
    poly = _t1_poly()
    s2 = ee.ImageCollection("COPERNICUS/S2_HARMONIZED").filterBounds(poly)
    scenes = fake.catalogue.scenes("t1", shapely.geometry.shape(tile("t1").geometry))["COPERNICUS/S2_HARMONIZED"]
    bounded = [im for im in scenes if im.props["fake:footprint"] != "misses"]
    assert value(s2.size()) == len(bounded) < len(scenes)
    in_2017 = [im for im in bounded if "20170101" <= im.props["system:index"][:8] < "20171231"]
    assert value(s2.filterDate("2017-01-01", "2017-12-31").size()) == len(in_2017)
    with_dec31 = [im for im in bounded if "20170101" <= im.props["system:index"][:8] < "20180101"]
    assert value(s2.filterDate("2017-01-01", "2018-01-01").size()) == len(with_dec31) > len(in_2017)  # exclusive
    clear = [im for im in bounded if im.props["CLOUDY_PIXEL_PERCENTAGE"] < 10]
    assert value(s2.filterMetadata("CLOUDY_PIXEL_PERCENTAGE", "less_than", 10).size()) == len(clear) < len(bounded)
    inner = value(s2.filter(ee.Filter.contains(".geo", poly)).size())
    buffered = value(s2.filter(ee.Filter.contains(".geo", poly.buffer(200))).size())
    assert inner == sum(im.props["fake:footprint"] in ("contains", "tile-only") for im in bounded)
    assert buffered == sum(im.props["fake:footprint"] == "contains" for im in bounded) < inner
    s1 = ee.ImageCollection("COPERNICUS/S1_GRD").filterBounds(poly)
    iw = value(s1.filterMetadata("instrumentMode", "equals", "IW").size())
    asc = value(s1.filterMetadata("orbitProperties_pass", "equals", "ASCENDING").size())
    assert 0 < iw < value(s1.size()) and 0 < asc < value(s1.size())


def test_no_data_tiles_cloud_filter_leaves_nothing(make_fake: Callable[..., FakeEarthEngine]) -> None:
    make_fake(no_data_tiles={"empty"})
    result = compute_metadata("empty")
    assert result["n_images"] == 0  # every branch still evaluated: the placeholder stands in
    assert compute_metadata("full")["n_images"] > 0
    poly = ee.Geometry.Polygon(tile("empty").geometry["coordinates"])
    coll = ee.ImageCollection("COPERNICUS/S2_SR_HARMONIZED").filterBounds(poly)
    assert value(coll.size()) > 0 and value(coll.filterMetadata("CLOUDY_PIXEL_PERCENTAGE", "less_than", 10).size()) == 0


def test_reducers_and_bands_are_evaluated(make_fake: Callable[..., FakeEarthEngine]) -> None:
    make_fake()
    poly = _t1_poly()
    era = ee.ImageCollection("ECMWF/ERA5_LAND/MONTHLY_AGGR").filterDate("2019-01-01", "2019-03-31")
    c = shapely.geometry.shape(tile("t1").geometry).centroid
    months = [fake_ee.era5_month_values(c.y, c.x, 2019, m) for m in (1, 2, 3)]
    got = {r: value(era.select("total_precipitation_sum").reduce(getattr(ee.Reducer, r)())
                    .reduceRegion(ee.Reducer.mean(), poly, 10))[f"total_precipitation_sum_{r}"]
           for r in ("sum", "mean", "max")}
    assert math.isclose(got["sum"], sum(m[3] for m in months)) and math.isclose(got["mean"], got["sum"] / 3)
    assert math.isclose(got["max"], max(m[3] for m in months))
    assert value(era.select(["temperature_2m"]).toBands().bandNames()) == ["201901_temperature_2m",
                                                                         "201902_temperature_2m",
                                                                         "201903_temperature_2m"]
    with pytest.raises(ee.EEException, match="did not match any bands"):
        value(era.first().select(["no_such_band"]).bandNames())
    with pytest.raises(ee.EEException, match="not found"):
        value(ee.ImageCollection("COPERNICUS/S2_SR").filterBounds(poly).size())
    assert value(ee.Number(1).add(2)) == 3


def test_pixels_request(make_fake: Callable[..., FakeEarthEngine]) -> None:
    fake = make_fake(missing_fraction=0.0)
    fake.reset_counters()
    arr = compute_pixels("t1")
    assert isinstance(arr, np.ndarray) and arr.shape == (130, 130)
    assert fake.requests_by_tile == {"t1": {"value": 1, "pixels": 1}}
    assert all(arr.dtype[name] == np.dtype("<f4") for name in arr.dtype.names)
    # resampling as asked: bilinear spectral bands are smoothed (not integers), SCL/QA60 nearest (codes)
    assert not np.array_equal(arr["sentinel2__B4"], np.round(arr["sentinel2__B4"]))
    assert set(np.unique(arr["sentinel2__QA60"])) <= {0.0, 1024.0, 2048.0}
    bands = fake.pixel_bands[-1]["bands"]
    assert bands["sentinel2__B4"][1] == "bilinear" and bands["sentinel2__QA60"][1] == "nearest"
    assert bands["aster__b1"] == (("projects/sat-io/open-datasets/ASTER/GDEM", "b1"), "bilinear")
    assert bands["esa_worldcover__Map"][1] == "nearest"
    assert set(np.unique(arr["esa_worldcover__Map"])) <= {10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100}
    if "dynamic_world__label" in arr.dtype.names:  # mode of label + 1: 1..9
        assert set(np.unique(arr["dynamic_world__label"])) <= set(range(1, 10))
    rect = compute_pixels("t1", width=40, height=25, bands=["sentinel2__B4"])
    assert rect.shape == (25, 40)


def test_pixel_value_ranges() -> None:
    ranges: dict[str, tuple[float, float]] = {
        "sentinel2__B2": (1, 10000), "sentinel2__B8A": (1, 10000), "sentinel2__B12": (1, 10000),
        "sentinel2__SCL": (0, 11), "sentinel2__MSK_CLDPRB": (0, 100),
        "sentinel1_asc__VV": (-25, 0), "sentinel1_desc__VH": (-25, 0),
        "aster__elevation": (0, 3000), "aster__slope": (0, 60),
        "dynamic_world__label": (1, 9), "canopy_height_eth__height": (0, 40), "canopy_height_eth__std": (0, 10),
    }
    for t in ("a", "b", "c"):
        for band, (lo, hi) in ranges.items():
            arr = band_values(t, band, 64, 64)
            assert lo <= arr.min() and arr.max() <= hi, band
        assert set(np.unique(band_values(t, "sentinel2__QA60", 64, 64))) <= {0.0, 1024.0, 2048.0}
        assert not band_values(t, "nonsense__x", 8, 8).any()


def test_missing_rows(make_fake: Callable[..., FakeEarthEngine]) -> None:
    holes = [t for t in (f"m{i}" for i in range(300)) if missing_rows(t, ["a", "b"], 32, 0.1) is not None]
    assert 10 < len(holes) < 60
    make_fake()  # default missing_fraction 0.1
    name = holes[0]
    arr = compute_pixels(name, width=32, height=32)
    band, rows = missing_rows(name, [b for b in arr.dtype.names if not b.startswith("dynamic_world")],
                              32, 0.1)  # type: ignore[misc]
    assert np.all(arr[band][rows] == np.float32(MISSING_VALUE))
    assert all(not np.any(arr[b] == np.float32(MISSING_VALUE)) for b in arr.dtype.names if b != band)


def test_pixels_too_large_is_invalid_argument(make_fake: Callable[..., FakeEarthEngine]) -> None:
    make_fake()
    with pytest.raises(ee.EEException, match="Total request size"):
        compute_pixels("t1", width=5000, height=5000)


def test_random_points_inside_the_region_by_geometry(make_fake: Callable[..., FakeEarthEngine]) -> None:
    """The fake's randomPoints (its own sampler), checked by shapely containment of each point."""
    from tasks.multimodal import tiles_ee
    from tasks.multimodal.sources.earthengine import EarthEngineSource

    fake = make_fake()
    regions = fake.catalogue.regions()
    region = next(r for r in regions if r.props["BIOME_NAME"] != "Rock & Ice")
    src = EarthEngineSource(project=fake.project, url=fake.url)
    import contextlib
    from unittest import mock

    with mock.patch.object(tiles_ee, "slot", lambda *a, **k: contextlib.nullcontext()):
        pts = tiles_ee.random_points(src, region.props["ECO_NAME"], 50, 1234)
        again = tiles_ee.random_points(src, region.props["ECO_NAME"], 50, 1234)
    assert len(pts) == 50 and pts == again and len(set(pts)) == 50
    assert all(region.footprint.contains(shapely.geometry.Point(lon, lat)) for lon, lat in pts)


def test_scripted_faults(make_fake: Callable[..., FakeEarthEngine]) -> None:
    fake = make_fake(faults={"t2": ["429", "500", "503", "400"], "t3": ["drop"], "t4": ["slow"]}, slow_s=3.0)
    req = "t2"
    for pattern in ("too many concurrent requests", "internal error", "currently unavailable", "invalid argument"):
        with pytest.raises(ee.EEException) as info:
            compute_metadata(req)
        assert pattern in str(info.value).lower()
    assert compute_metadata(req)["n_images"] > 0
    assert fake.requests_by_tile["t2"]["value"] == 5

    outcome: Any = None
    with pytest.raises(Exception) as dropped:
        outcome = compute_metadata("t3")
    assert outcome is None
    assert isinstance(dropped.value, (ConnectionError, OSError)) and not isinstance(dropped.value, ee.EEException)
    assert compute_metadata("t3")["n_images"] > 0

    ee.data.setDeadline(500)
    try:
        with pytest.raises(TimeoutError):
            compute_metadata("t4")
    finally:
        ee.data.setDeadline(0)
    assert compute_metadata("t4")["n_images"] > 0

    assert [f for f in fake.faults_injected] == [
        ("t2", "value", "429"), ("t2", "value", "500"), ("t2", "value", "503"), ("t2", "value", "400"),
        ("t3", "value", "drop"), ("t4", "value", "slow"),
    ]
    statuses = [e["status"] for e in fake.log if e["tile_id"] == "t2"]
    assert statuses == [429, 500, 503, 400, 200]


def test_pixels_faults_and_random_faults(make_fake: Callable[..., FakeEarthEngine]) -> None:
    fake = make_fake(faults={"p": ["503"]})
    with pytest.raises(ee.EEException, match="unavailable"):
        compute_pixels("p", 8, 8)  # the fault hits the metadata request
    assert compute_pixels("p", 8, 8).shape == (8, 8)
    assert fake.requests_by_tile["p"] == {"value": 2, "pixels": 1}

    def run(seed: int) -> list[tuple[str | None, str, str]]:
        ee.Reset()
        f = make_fake(fault_rate=0.5, fault_kinds=["429", "500"], seed=seed)
        for i in range(12):
            try:
                compute_metadata(f"r{i % 4}")
            except ee.EEException as exc:
                assert str(exc) in ("Too many concurrent requests.", "An internal error has occurred.")
        return sorted(f.faults_injected, key=repr)

    first, second = run(7), run(7)
    assert first == second and 2 <= len(first) <= 10


# --------------------------------------------------------------------------- 5. concurrency


def _concurrent_metadata(n: int) -> list[Any]:
    barrier = threading.Barrier(n)

    def call(i: int) -> Any:
        barrier.wait()
        try:
            return compute_metadata(f"c{i}")
        except ee.EEException as exc:
            return exc

    with cf.ThreadPoolExecutor(n) as pool:
        return list(pool.map(call, range(n)))


def test_max_in_flight(make_fake: Callable[..., FakeEarthEngine]) -> None:
    fake = make_fake(latency={"value": 0.3})
    fake.reset_counters()
    results = _concurrent_metadata(8)
    max_in_flight, slot_seconds = fake.max_in_flight, fake.slot_seconds
    assert all(isinstance(r, dict) and r["n_images"] > 0 for r in results)
    assert [r for r in results] == [compute_metadata(f"c{i}") for i in range(8)]  # each its own tile's answer
    assert max_in_flight == 8 and fake.in_flight == 0
    assert slot_seconds >= 8 * 0.3
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
    body = {"expression": {"result": "0", "values": {"0": {"constantValue": 7}}}}
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
    assert compute_metadata("after-revoke")["n_images"] > 0
    assert fake.total["unauthorized"] == 1 and fake.total["token"] == 1 and fake.total["value"] == 1


# --------------------------------------------------------------------------- 7. secrets


def test_no_secrets_in_log_or_counters(make_fake: Callable[..., FakeEarthEngine]) -> None:
    fake = make_fake(faults={"s": ["429"]})
    for _ in range(2):
        try:
            compute_metadata("s")
        except ee.EEException:
            pass
    compute_pixels("s", 8, 8)
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
