"""The Earth Engine source with the real earthengine-api client against a loopback
fake server, a real Prefect server and a real Dask cluster."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import random

import httpx
import pytest
import shapely.geometry

from tasks.common.runtime import DaskSettings, make_task_runner
from tasks.multimodal import schema
from tasks.multimodal.config import MultimodalConfig
from tasks.multimodal.sources.base import NoDataError, Tile, TransientSourceError
from tasks.multimodal.sources.earthengine import (
    Choices, EarthEngineAuthError, TileMeta, choose, is_transient, permanent_reason, s2_window, stack_grid,
    tile_seed,
)
from tests import fake_ee
from tests.dataset_checks import check_dataset
from tests.fake_ee import FakeEarthEngine


def _tile(tid="t1", lon=8.5, lat=50.5):
    d = 0.006
    ring = [[lon - d, lat - d], [lon + d, lat - d], [lon + d, lat + d], [lon - d, lat + d], [lon - d, lat - d]]
    return Tile(tid, "Temperate Broadleaf & Mixed Forests", "Western European broadleaf forests", lon, lat,
                {"type": "Polygon", "coordinates": [ring]})


# --------------------------------------------------------------------------
# plain functions
# --------------------------------------------------------------------------
def test_choices_are_seeded_per_tile_like_the_original():
    a, b = choose(_tile()), choose(_tile("other-id"))
    assert a == b  # the seed is the tile centre, not its id
    assert isinstance(a, Choices) and 2017 <= a.year <= 2020 and a.prefer in ("l2a", "l1c")
    assert (a.start, a.end) == s2_window(a.year) and len(a.table) == 1024
    moved = [choose(_tile(lon=8.5 + i / 100)) for i in range(40)]
    assert {c.year for c in moved} == {2017, 2018, 2019, 2020} and {c.prefer for c in moved} == {"l2a", "l1c"}
    # every tile centre gives its own seed, and the draws follow it (a seed that ignored the centre would repeat)
    assert len({tile_seed(c.lat, c.lon) for c in moved}) == 40
    for c in moved[:5]:
        (start, _), l2a, index = _original_draws(c.lat, c.lon)
        assert (c.start, c.prefer, c.index(100)) == (start, "l2a" if l2a else "l1c", index(100))
    (start, end), l2a, index = _original_draws(a.lat, a.lon)
    assert (a.start, a.end, a.prefer) == (start, end, "l2a" if l2a else "l1c")
    assert [a.index(n) for n in (1, 2, 7, 40, 333, 1024)] == [index(n) for n in (1, 2, 7, 40, 333, 1024)]


def test_index_table_is_randint_for_every_n():
    from tasks.multimodal.sources.earthengine import index_table

    for seed in range(20):
        rng = random.Random(seed)
        rng.randint(2017, 2020)
        table = index_table(rng, 700)
        state = rng.getstate()
        for n in range(1, 701):
            rng.setstate(state)
            assert table[n - 1] == rng.randint(0, n - 1), (seed, n)
        rng.setstate(state)
        assert index_table(rng, 700) == table and rng.getstate() == state  # rng left unchanged


def test_seed_centroid_geodesic_and_tile_info_lat_lon():
    """The seed uses the geodesic centroid (checked against a fine subdivision of the spherical
    polygon); lat/lon within 1e-8 degrees of it (copied from an original tile_info) are kept
    digit for digit."""
    import numpy as np

    from tasks.multimodal.sources.earthengine import geodesic_centroid, seed_lat_lon

    def subdivided(ring, levels=5):  # sum of flat sub-triangle area x centroid, on the sphere
        def vec(p):
            lo, la = np.radians(p)
            return np.array([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)])
        v = [vec(p) for p in ring[:-1]]
        tris = [(v[0], v[i], v[i + 1]) for i in range(1, len(v) - 1)]
        for _ in range(levels):
            nxt = []
            for a, b, c in tris:
                ab, bc, ca = [(x + y) / np.linalg.norm(x + y) for x, y in ((a, b), (b, c), (c, a))]
                nxt += [(a, ab, ca), (ab, b, bc), (ca, bc, c), (ab, bc, ca)]
            tris = nxt
        total = sum(np.linalg.norm(np.cross(b - a, c - a)) / 2 * (a + b + c) / 3 for a, b, c in tris)
        x, y, z = total
        return math.degrees(math.atan2(y, x)), math.degrees(math.atan2(z, math.hypot(x, y)))

    for lon, lat, d in ((8.5, 50.5, 0.006), (-70.2, -33.4, 0.2), (150.0, 69.0, 1.0)):
        base = _tile(lon=lon, lat=lat)
        ring = [[lon - d, lat - d], [lon + d, lat - d], [lon + d, lat + d], [lon - d, lat + d], [lon - d, lat - d]]
        t = Tile("t", base.biome, base.eco_region, lon, lat, {"type": "Polygon", "coordinates": [ring]})
        glon, glat = geodesic_centroid(t.geometry)
        slon, slat = subdivided(ring)
        assert abs(glon - slon) < 1e-9 * max(1, d) and abs(glat - slat) < 1e-7 * d, (glon, slon, glat, slat)
        if d >= 0.2:  # great-circle edges: the centroid is not the lon/lat centre
            assert abs(glat - lat) > 1e-6
            assert seed_lat_lon(t) == (glat, glon)
        copied = Tile("t", t.biome, t.eco_region, glon + 3e-9, glat - 3e-9, t.geometry)
        assert seed_lat_lon(copied) == (glat - 3e-9, glon + 3e-9)


def test_s2_windows():
    assert s2_window(2018) == ("2018-01-01", "2018-11-30")
    assert s2_window(2019) == ("2018-12-01", "2019-12-31")
    assert s2_window(2017) == ("2017-01-01", "2017-12-31")


def test_transient_classification():
    import ee

    # only errors known to be permanent are permanent; unknown ones (this CPython race) retry
    assert permanent_reason(SystemError("AST constructor recursion depth mismatch (before=48, after=47)")) is None
    assert permanent_reason(ee.EEException("Image.load: Image asset 'x' not found.")) is None
    assert permanent_reason(ee.EEException("Geometry.Polygon: LinearRing requires at least 3 points.")) \
        == "invalid tile geometry"
    assert permanent_reason(ee.EEException("Too many concurrent requests.")) is None
    assert is_transient(ee.EEException("Too many concurrent requests."))
    assert is_transient(ee.EEException("An internal error has occurred."))
    assert is_transient(ee.EEException("The service is currently unavailable."))
    assert is_transient(ConnectionError("RemoteDisconnected"))
    assert is_transient(TimeoutError("read timed out"))
    assert not is_transient(ee.EEException("Image.load: Image asset 'x' not found."))
    assert not is_transient(ee.EEException("Geometry.Polygon: LinearRing requires at least 3 points."))


@pytest.mark.parametrize("answer, permanent", [
    ({}, False), ({"n_images": None}, False), ({"n_images": "0"}, False), ({"n_images": -1}, False),
    ({"n_images": 1.5}, False), ({"n_images": True}, False), ({"n_images": 0}, True), ({"n_images": 0.0}, True),
])
def test_only_a_well_formed_no_image_answer_is_permanent(answer, permanent):
    """A 200 whose answer lacks n_images (``{"result": {}}``) or has one that is not a count
    is malformed: a transient error (retried); only n_images == 0 is no-data."""
    from tasks.multimodal.sources.earthengine import parse_metadata

    t = _tile()
    with pytest.raises(NoDataError if permanent else TransientSourceError) as info:
        parse_metadata(t, choose(t), answer)
    assert type(info.value) is (NoDataError if permanent else TransientSourceError)
    if not permanent:
        assert "malformed metadata answer" in str(info.value)


def test_stack_bands_and_grid_follow_the_s2_image():
    meta = TileMeta("l2a", "COPERNICUS/S2_SR_HARMONIZED/x", "2019-06-01",
                    [b for b in schema.S2_BANDS_L2A if b != "MSK_CLDPRB"] + ["AOT"], "EPSG:32632",
                    [10, 0, 399960, 0, -10, 5600040], {"asc": {"id": "a", "bands": ["VV", "VH", "angle"]}, "desc": None},
                    0, {}, ["202905_temperature_2m"])
    bands = meta.stack_bands()
    assert "MSK_CLDPRB" not in bands["sentinel2"] and bands["sentinel2"][-2:] == ["SCL", "QA60"]
    assert bands["aster"] == ["b1", "slope"] and bands["era5"] == ["202905_temperature_2m"]  # the original's names
    assert not meta.missing_s2_bands()
    short = dataclasses.replace(meta, s2_bands=[b for b in meta.s2_bands if b != "B8A"])
    assert short.missing_s2_bands() == ["B8A"]
    assert bands["sentinel1_asc"] == ["VV", "VH"] and bands["sentinel1_desc"] is None
    assert bands["dynamic_world"] is None  # no Dynamic World image that year
    grid = stack_grid(_tile(), meta)
    assert grid.crs == "EPSG:32632" and grid.size == 130
    assert (grid.transform.c - 399960) % 10 == 0 and (grid.transform.f - 5600040) % 10 == 0


def test_secrets_are_refused_as_flow_parameters():
    with pytest.raises(ValueError, match="credentials"):
        MultimodalConfig(source="earthengine", source_options={"service_account_key": "{...}"})


# --------------------------------------------------------------------------
# through Prefect, Dask and the fake
# --------------------------------------------------------------------------


def _save_block(name: str, fake: FakeEarthEngine, info: dict | None = None) -> None:
    from blocks import EarthEngineCredentials

    EarthEngineCredentials(project=fake.project,
                           service_account_key=json.dumps(info or fake.service_account_info())).save(name, overwrite=True)


def _run(cfg: MultimodalConfig, n_workers: int = 2):
    from flows.multimodal import multimodal_flow

    return multimodal_flow.with_options(task_runner=make_task_runner(DaskSettings(n_workers=n_workers)))(config=cfg)


def _ee_config(tmp_path, fake, block, **kw) -> MultimodalConfig:
    base = dict(name="data_ee", output_dir=str(tmp_path), n_tiles=12, source="earthengine",
                source_options={"credentials_block": block, "url": fake.url},
                fetch_batch_size=3, fetch_threads=3, fetch_retry_delay_s=0.05, request_ceiling=6, part_size=5)
    base.update(kw)
    return MultimodalConfig(**base)


@pytest.fixture(scope="module")
def ee_run(tmp_path_factory, prefect_server):
    """One full run with faults: retried transient ones, a permanent no-data tile."""
    out = tmp_path_factory.mktemp("ee")
    from tasks.multimodal import tiles as tiles_mod

    regions = tiles_mod.load_regions(tiles_mod.DEFAULT_REGIONS)
    tiles = tiles_mod.sample_tiles(regions, tiles_mod.eco_region_index(regions), 12, 0)
    ids = [t.tile_id for t in tiles]
    # ids[4], ids[5]: a 200 without n_images / with a malformed one is retried, never no-data
    faults = {ids[0]: ["429", "500"], ids[1]: ["drop"], ids[2]: ["503"], ids[4]: ["empty_result"],
              ids[5]: ["bad_count"]}
    with FakeEarthEngine(latency={"value": 0.02, "pixels": 0.05}, no_data_tiles={ids[3]}, faults=faults,
                         tiles=tiles) as fake:
        _save_block("ee-test", fake)
        cfg = _ee_config(out, fake, "ee-test")
        result = _run(cfg)
        snapshot = fake.snapshot()
        secret = fake.service_account_info()
    return cfg, result, snapshot, ids, secret


@pytest.mark.usefixtures("prefect_server")
def test_full_flow_same_format_as_synthetic(ee_run):
    cfg, result, snap, ids, _ = ee_run
    counts = result["counts"]
    assert counts["tiles sampled"] == 12 and counts["no data"] == 1 and counts["fetch failed"] == 0
    assert counts["rows in h5"] == 11
    check_dataset(cfg.dataset_dir, cfg.name, 11, cfg.image_size)
    info = json.loads((cfg.dataset_dir / f"{cfg.name}_tile_info.json").read_text())
    assert info[ids[3]]["NO_DATA"] is True and "Sentinel-2" in info[ids[3]]["NO_DATA_REASON"]
    done = [t for t in info if not info[t]["NO_DATA"]]
    assert all(info[t]["SOURCE"] == "earthengine" and info[t]["S2_IMAGEID"].startswith("COPERNICUS/S2") for t in done)
    assert all(info[t]["BANDS"]["aster"] == ["b1", "slope"] and len(info[t]["BANDS"]["era5"]) == 12
               and info[t]["ERA5_YEAR_MONTHS"] == 13 for t in done)
    import h5py

    with h5py.File(cfg.dataset_dir / f"{cfg.name}.h5") as h5:  # the original's b1 lands in the elevation channel
        assert (h5["aster"][:, 0] != -32768).mean() > 0.9


@pytest.mark.usefixtures("prefect_server")
def test_two_requests_per_tile_retries_and_no_data_not_retried(ee_run):
    cfg, result, snap, ids, _ = ee_run
    per_tile = snap["requests_by_tile"]
    faulted = {ids[0]: 2, ids[1]: 1, ids[2]: 1, ids[4]: 1, ids[5]: 1}
    for tid in ids:
        got = per_tile[tid]
        if tid == ids[3]:  # permanent: one metadata request, never retried, no pixels
            assert got.get("value") == 1 and not got.get("pixels"), got
        elif tid in faulted:  # each injected fault costs exactly one more metadata request
            assert got == {"value": 1 + faulted[tid], "pixels": 1}, (tid, got)
        else:
            assert got == {"value": 1, "pixels": 1}, (tid, got)
    assert {f[2] for f in snap["faults_injected"]} == {"429", "500", "drop", "503", "empty_result", "bad_count"}
    no_data = [p for p in result["problems"] if p["item"] == ids[3]]
    assert len(no_data) == 1 and no_data[0]["reason"].startswith("no data: no Sentinel-2 image")


@pytest.mark.usefixtures("prefect_server")
def test_429_answers_are_counted_in_the_report(ee_run):
    """The fake answered one "429 Too many concurrent requests" (tile 0's first fault): the
    flow counts it in report.json and the returned counts; 500, 503 and a dropped
    connection are not 429s."""
    from tasks.multimodal.run import RATE_LIMITED

    cfg, result, snap, ids, _ = ee_run
    injected = [f for f in snap["faults_injected"] if f[2] == "429"]
    assert len(injected) == 1
    assert result["counts"][RATE_LIMITED] == len(injected)
    report = json.loads((cfg.dataset_dir / "report.json").read_text())
    assert report["counts"][RATE_LIMITED] == 1


@pytest.mark.usefixtures("prefect_server")
def test_credentials_never_in_logs_or_artifacts(ee_run, prefect_server):
    cfg, result, snap, ids, secret = ee_run
    key_body = secret["private_key"].split("-----")[2].strip().splitlines()[3]
    needles = [key_body, secret["private_key_id"]]
    texts = [json.dumps(result), (cfg.dataset_dir / "report.json").read_text(), json.dumps(snap["log"], default=str),
             (cfg.dataset_dir / f"{cfg.name}_tile_info.json").read_text()]
    api = prefect_server.url
    runs = httpx.post(f"{api}/flow_runs/filter", json={"limit": 200, "sort": "EXPECTED_START_TIME_DESC"}, timeout=10).json()
    for run in runs:
        texts.append(json.dumps(run.get("parameters")))
        logs = httpx.post(f"{api}/logs/filter", timeout=30, json={
            "logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200, "sort": "TIMESTAMP_ASC"}).json()
        texts.extend(entry["message"] for entry in logs)
    task_runs = httpx.post(f"{api}/task_runs/filter", json={"limit": 200}, timeout=30).json()
    texts.append(json.dumps(task_runs))
    arts = httpx.post(f"{api}/artifacts/filter", json={"limit": 200, "sort": "CREATED_DESC"}, timeout=10).json()
    texts.extend(json.dumps(a.get("data")) for a in arts)
    assert len(texts) > 10
    for text in texts:
        for needle in needles:
            assert needle not in text


@pytest.mark.usefixtures("prefect_server")
def test_requests_in_flight_never_exceed_the_limit(tmp_path):
    from tasks.common.concurrency import read_limit

    with FakeEarthEngine(latency={"value": 0.05, "pixels": 0.12}) as fake:
        _save_block("ee-ceiling", fake)
        cfg = _ee_config(tmp_path, fake, "ee-ceiling", n_tiles=40, request_ceiling=4, fetch_batch_size=5,
                         fetch_threads=4, request_limit_name="ee-ceiling-test", part_size=20)
        result = _run(cfg, n_workers=4)
        assert result["counts"]["stacks done"] == 40
        assert fake.max_admitted_in_flight <= 4 and fake.max_in_flight <= 4
        assert fake.max_in_flight == 4, "16 fetchers over 40 tiles should fill all 4 slots"
        assert fake.total.get("rejected", 0) == 0
    assert read_limit("ee-ceiling-test") == 4


@pytest.mark.usefixtures("prefect_server")
def test_missing_limit_is_an_error_not_unlimited():
    from tasks.common.concurrency import MissingConcurrencyLimit, slot

    with pytest.raises(MissingConcurrencyLimit, match="no-such-limit"):
        with slot("no-such-limit"):
            pass


@pytest.mark.usefixtures("prefect_server")
def test_missing_persistent_credentials_fail_before_any_tile(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EE_SERVICE_ACCOUNT_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    with FakeEarthEngine() as fake:
        cfg = MultimodalConfig(name="data_ee_nocreds", output_dir=str(tmp_path), n_tiles=3, source="earthengine",
                               source_options={"project": fake.project, "url": fake.url})
        with pytest.raises(EarthEngineAuthError, match="earthengine authenticate"):
            _run(cfg)
        assert fake.total.get("value", 0) == 0 and fake.total.get("pixels", 0) == 0
    assert not list(tmp_path.rglob("*.tif"))


@pytest.mark.usefixtures("prefect_server")
def test_bad_service_account_key_fails_before_any_tile(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    with FakeEarthEngine() as fake:
        info = dict(fake.service_account_info())
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        info["private_key"] = other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()).decode()
        _save_block("ee-bad", fake, info)
        cfg = _ee_config(tmp_path, fake, "ee-bad", n_tiles=3)
        with pytest.raises(EarthEngineAuthError):
            _run(cfg)
        assert fake.total.get("value", 0) == 0 and fake.total.get("pixels", 0) == 0


@pytest.mark.usefixtures("prefect_server")
def test_rerun_fetches_exactly_the_failed_tiles(tmp_path):
    from tasks.multimodal import tiles as tiles_mod

    regions = tiles_mod.load_regions(tiles_mod.DEFAULT_REGIONS)
    tiles = tiles_mod.sample_tiles(regions, tiles_mod.eco_region_index(regions), 8, 0)
    ids = [t.tile_id for t in tiles]
    broken = {ids[1]: ["500"] * 3, ids[5]: ["503"] * 3}  # outlast 1 retry
    with FakeEarthEngine(faults=broken, no_data_tiles={ids[2]}, tiles=tiles) as fake:
        _save_block("ee-rerun", fake)
        cfg = _ee_config(tmp_path, fake, "ee-rerun", n_tiles=8, fetch_retries=1, fetch_batch_size=2, fetch_threads=2)
        first = _run(cfg)
        assert first["counts"]["fetch failed"] == 2 and first["counts"]["no data"] == 1
        failed = {p["item"] for p in first["problems"] if p["stage"] == "fetch" and not p["reason"].startswith("no data")}
        assert failed == {ids[1], ids[5]}
        fake.reset_counters()
        second = _run(cfg)
        assert set(fake.requests_by_tile) == {ids[1], ids[5]}, fake.requests_by_tile
        assert second["counts"]["fetch failed"] == 0 and second["counts"]["rows in h5"] == 7


@pytest.mark.usefixtures("prefect_server")
def test_tiles_sampled_on_earth_engine(tmp_path):
    from shapely.geometry import Point

    from tasks.multimodal import tiles as tiles_mod

    with FakeEarthEngine() as fake:
        _save_block("ee-sampler", fake)
        cfg = _ee_config(tmp_path, fake, "ee-sampler", n_tiles=10, tile_sampler="earthengine", sampling_mode=2)
        result = _run(cfg)
        assert result["counts"]["tiles sampled"] == 10 and result["counts"]["stacks done"] == 10
        points = [e for e in fake.log if e["kind"] == "value" and (e["tile_id"] or "").startswith("__points__")]
        assert len(points) == 10  # one randomPoints request per ecoregion (10 ecoregions, 1 tile each)
        fake.reset_counters()
        again = _run(cfg)  # same settings: the sample is re-used, nothing is asked again
        assert again["counts"]["tiles sampled"] == 10 and again["counts"]["fetched this run"] == 0
        assert not any((e["tile_id"] or "").startswith("__") for e in fake.log if e["kind"] == "value")
    regions = {r.eco_region: r.geometry for r in tiles_mod.load_regions(tiles_mod.DEFAULT_REGIONS)}
    for t in tiles_mod.read_tiles_geojson(cfg.dataset_dir / f"{cfg.name}_tiles.geojson"):
        assert regions[t.eco_region].contains(Point(t.lon, t.lat))
        assert math.isclose(t.tile_size_m, 1300, rel_tol=0.02)


# --------------------------------------------------------------------------
# The selection, held to the original's rules (ee_utils/ee_data.py of MMEarth-data)
# --------------------------------------------------------------------------
def _original_draws(lat: float, lon: float):
    """The original's client side, written out plainly: seed, year and window, product.
    Returns (window, l2a first?, a function n -> image index) with the global
    ``random`` state left where the original leaves it before the index draw."""
    random.seed(int(hashlib.sha256(f"{lat}_{lon}".encode("utf-8")).hexdigest(), 16) % 10**5)
    rnd_year = random.randint(2017, 2020)
    if rnd_year == 2018:
        window = ("2018-01-01", "2018-11-30")
    elif rnd_year in (2017, 2020):
        window = (f"{rnd_year}-01-01", f"{rnd_year}-12-31")
    else:
        window = ("2018-12-01", "2019-12-31")
    l2a = random.randint(0, 1) == 0
    state = random.getstate()

    def index(n: int) -> int:
        random.setstate(state)
        return random.randint(0, n - 1)
    return window, l2a, index


def _ms(date: str) -> float:
    return dt.datetime.fromisoformat(date).replace(tzinfo=dt.timezone.utc).timestamp() * 1000


def _grown(tile, metres: float):
    """The tile's bounding box grown by ``metres`` (the tiles here are lon/lat squares and
    the fake's footprints boxes 3 km or 100 m around them: containment of the buffered
    tile is containment of this box)."""
    minx, miny, maxx, maxy = shapely.geometry.shape(tile.geometry).bounds
    lat = (miny + maxy) / 2
    dx, dy = metres / (111_320.0 * math.cos(math.radians(lat))), metres / 110_574.0
    return shapely.geometry.box(minx - dx, miny - dy, maxx + dx, maxy + dy)


def _expected(fake: FakeEarthEngine, tile, name: str, year_months: int = 13) -> dict:
    """What the original would have picked for ``tile`` from the fake's known scenes."""
    poly = shapely.geometry.shape(tile.geometry)
    scenes = fake.catalogue.scenes(name, poly)
    (start, end), l2a, index = _original_draws(tile.lat, tile.lon)

    def s2(coll):
        return [im for im in scenes[coll] if im.footprint.intersects(poly)
                and _ms(start) <= im.props["system:time_start"] < _ms(end)
                and im.props["CLOUDY_PIXEL_PERCENTAGE"] < 10]
    cands, s2_type = s2(fake_ee.S2_COLLECTIONS[0]), "l2a"
    if not l2a or not cands:
        cands, s2_type = s2(fake_ee.S2_COLLECTIONS[1]), "l1c"
    cands = [im for im in cands if im.footprint.contains(_grown(tile, 200))]
    if not cands:
        return {"n": 0}
    pick = cands[index(len(cands))]
    when = dt.datetime.fromtimestamp(pick.props["system:time_start"] / 1000, dt.timezone.utc)
    day = when.strftime("%Y-%m-%d")
    s1 = {}
    for orbit in ("ASCENDING", "DESCENDING"):
        ok = [im for im in scenes[fake_ee.S1_COLLECTION]
              if _ms("2017-01-01") <= im.props["system:time_start"] < _ms("2020-12-31")
              and im.footprint.contains(_grown(tile, 200)) and im.props["instrumentMode"] == "IW"
              and im.props["orbitProperties_pass"] == orbit]
        ok.sort(key=lambda im: abs(im.props["system:time_start"] - _ms(day)))
        s1[orbit[:3].lower() if orbit == "ASCENDING" else "desc"] = ok[0].props["system:id"] if ok else None
    c = poly.centroid
    y, m = when.year, when.month
    months = [((y * 12 + m - 1 - k) // 12, (y * 12 + m - 1 - k) % 12 + 1) for k in range(year_months - 1, -1, -1)]
    rows = [fake_ee.era5_month_values(c.y, c.x, yy, mm) for yy, mm in months]
    prev = ((y * 12 + m - 2) // 12, (y * 12 + m - 2) % 12 + 1)
    return {
        "n": len(cands), "s2_type": s2_type, "s2_id": pick.props["system:id"], "s2_date": day, "s1": s1,
        "month1": fake_ee.era5_month_values(c.y, c.x, *prev), "month2": rows[-1],
        "year": [sum(r[0] for r in rows) / len(rows), min(r[1] for r in rows), max(r[2] for r in rows),
                 sum(r[3] for r in rows)],
        "era5_names": [f"{yy}{mm:02d}_{b}" for yy, mm in (prev, (y, m)) for b in schema.ERA5_BANDS]
        + ["0_temperature_2m_mean", "1_temperature_2m_min_min", "2_temperature_2m_max_max",
           "3_total_precipitation_sum_sum"],
    }


def _selection_tiles(k: int = 36):
    """Tiles in both hemispheres whose lat/lon are the geodesic centroid (as lat/lon copied
    from an original tile_info are Earth Engine's centroid)."""
    from tasks.multimodal.sources.earthengine import geodesic_centroid

    out = []
    for i in range(k):
        lat = -55.0 + (i * 37.3) % 120.0
        lon = -170.0 + (i * 71.9) % 340.0
        t = _tile(f"sel{i:02d}", lon=lon, lat=lat)
        clon, clat = geodesic_centroid(t.geometry)
        out.append(Tile(t.tile_id, t.biome, t.eco_region, clon, clat, t.geometry))
    return out


@pytest.fixture
def ee_direct(monkeypatch):
    """The source against a fake, without Prefect slots (the selection is what is tested)."""
    import contextlib

    import tasks.multimodal.sources.base as sources_base
    import tasks.multimodal.sources.earthengine as ee_mod

    monkeypatch.setattr(ee_mod, "slot", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(sources_base, "slot", lambda *a, **k: contextlib.nullcontext())  # a request's slot
    ee_mod._initialized.clear()
    fakes = []

    def make(**kw):
        fake = FakeEarthEngine(**kw).start()
        fakes.append(fake)
        ee_mod._initialized.clear()
        return fake, ee_mod.EarthEngineSource(project=fake.project, credentials=fake.service_account_info(),
                                              url=fake.url)
    yield make
    for f in fakes:
        f.stop()
    ee_mod._initialized.clear()


def _compare(fake, src, tiles, year_months=13):
    seen_n, mismatches = [], []
    for t in tiles:
        exp = _expected(fake, t, t.tile_id, year_months)
        try:
            _, meta = src.select(t)
        except NoDataError as exc:
            if exp["n"] != 0:
                mismatches.append((t.tile_id, "no data", str(exc)))
            seen_n.append(0)
            continue
        got = {"s2_type": meta.s2_type, "s2_id": meta.s2_id, "s2_date": meta.s2_date,
               "s1": {o: (meta.s1[o] or {}).get("id") for o in ("asc", "desc")}}
        want = {k: exp.get(k) for k in got}
        if got != want:
            mismatches.append((t.tile_id, got, want))
        for part in ("month1", "month2", "year"):
            if not all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(meta.era5[part], exp[part])):
                mismatches.append((t.tile_id, part, meta.era5[part], exp[part]))
        if meta.stack_bands()["era5"] != exp["era5_names"]:
            mismatches.append((t.tile_id, "era5 names", meta.stack_bands()["era5"]))
        seen_n.append(exp["n"])
    return seen_n, mismatches


def test_selection_matches_the_original(ee_direct):
    """Chosen S2 image (id, product, date), S1 per orbit and ERA5 windows equal what the
    original's rules pick from the fake's known candidate lists, for 36 tiles in both
    hemispheres with n from 1 to several hundred."""
    tiles = _selection_tiles()
    fake, src = ee_direct(tiles=tiles, s2_counts=(1, 6000), no_data_tiles={"sel05"})
    seen_n, mismatches = _compare(fake, src, tiles)
    assert not mismatches, mismatches[:3]
    positive = [n for n in seen_n if n]
    assert min(positive) <= 3 and max(positive) >= 200, sorted(seen_n)
    assert seen_n[5] == 0  # the cloud filter leaves no candidate: an empty collection, no data
    assert {t.lat > 0 for t in tiles} == {True, False}


def _mutate(monkeypatch, module, name: str, old: str, new: str) -> None:
    """Replace ``module.name`` by its own source with ``old`` replaced by ``new``."""
    import inspect
    import textwrap

    src = textwrap.dedent(inspect.getsource(getattr(module, name)))
    assert old in src
    namespace = dict(vars(module))
    exec(compile(src.replace(old, new), f"<mutated {name}>", "exec"), namespace)
    monkeypatch.setattr(module, name, namespace[name])


@pytest.mark.parametrize("change", ["cloud filter dropped", "no containment buffer", "timestamp, not midnight",
                                    "a day added to windows", "floor(u*n) index", "precipitation mean",
                                    "12-month year"])
def test_selection_test_catches_a_regression(ee_direct, monkeypatch, change):
    """Each deviation of issue 12's table, put back into the source, fails the selection check."""

    import tasks.multimodal.sources.earthengine as ee_mod

    tiles = _selection_tiles(16 if change == "timestamp, not midnight" else 8)
    fake, src = ee_direct(tiles=tiles, s2_counts=(20, 800))
    if change == "cloud filter dropped":
        monkeypatch.setattr(ee_mod, "CLOUD_THRESHOLD", 1000)
    elif change == "no containment buffer":
        monkeypatch.setattr(ee_mod, "S2_BUFFER_M", 0)
        monkeypatch.setattr(ee_mod, "S1_BUFFER_M", 0)
    elif change == "timestamp, not midnight":
        _mutate(monkeypatch, ee_mod, "metadata_expression",
                'day = ee.Date(date.format("YYYY-MM-dd"))', "day = date")
    elif change == "a day added to windows":
        monkeypatch.setattr(ee_mod, "s2_window", lambda y: tuple(
            (dt.date.fromisoformat(d) + dt.timedelta(days=i)).isoformat()
            for i, d in enumerate(s2_window(y))))
    elif change == "floor(u*n) index":
        real_choose = ee_mod.choose

        def floor_choose(tile, table_size=ee_mod.INDEX_TABLE_SIZE):
            ch = real_choose(tile, table_size)
            u = random.Random(ee_mod.tile_seed(ch.lat, ch.lon)).random()
            return dataclasses.replace(ch, table=tuple(int(u * n) for n in range(1, table_size + 1)))
        monkeypatch.setattr(ee_mod, "choose", floor_choose)
    elif change == "precipitation mean":
        monkeypatch.setattr(ee_mod, "ERA5_YEAR_REDUCERS", ee_mod.ERA5_YEAR_REDUCERS[:3]
                            + (("total_precipitation_sum", "mean"),))
    elif change == "12-month year":
        src.era5_year_months = 12
    _, mismatches = _compare(fake, src, tiles)
    assert mismatches, f"{change}: the selection check did not notice"


def test_corrected_era5_year_is_an_option(ee_direct):
    tiles = _selection_tiles(4)
    fake, src = ee_direct(tiles=tiles)
    src.era5_year_months = 12
    _, mismatches = _compare(fake, src, tiles, year_months=12)
    assert not mismatches, mismatches[:2]
    with pytest.raises(ValueError, match="era5_year_months"):
        type(src)(project="p", era5_year_months=11)


def test_missing_s2_band_is_a_per_tile_error(ee_direct):
    tiles = _selection_tiles(16)
    fake, src = ee_direct(tiles=tiles, missing_band=1.0)
    errors = []
    for t in tiles:
        try:
            src.select(t)
        except NoDataError as exc:
            errors.append(exc.reason)
    l2a = [r for r in errors if "missing Sentinel-2 band" in r]
    assert l2a and all("B8A" in r for r in l2a), errors


def test_wrong_collection_id_fails(ee_direct, monkeypatch):
    import tasks.multimodal.sources.earthengine as ee_mod

    tiles = _selection_tiles(2)
    fake, src = ee_direct(tiles=tiles)
    monkeypatch.setattr(ee_mod, "S1_GRD", "COPERNICUS/S1")
    with pytest.raises(TransientSourceError, match="not found"):  # an unknown error: retried, never NO_DATA
        src.select(tiles[0])


def test_bad_key_from_the_environment_names_the_variable(monkeypatch, tmp_path):
    from tasks.multimodal.sources import make_source
    from tasks.multimodal.sources.earthengine import credentials_from_env

    monkeypatch.setenv("EE_SERVICE_ACCOUNT_KEY", "{not json")
    with pytest.raises(EarthEngineAuthError, match="EE_SERVICE_ACCOUNT_KEY.*not valid JSON"):
        credentials_from_env()
    monkeypatch.setenv("EE_SERVICE_ACCOUNT_KEY", str(tmp_path / "missing.json"))
    with pytest.raises(EarthEngineAuthError, match="EE_SERVICE_ACCOUNT_KEY names a key file"):
        credentials_from_env()
    bad = {"type": "service_account", "project_id": "p", "private_key": "nope", "client_email": "a@b"}
    monkeypatch.setenv("EE_SERVICE_ACCOUNT_KEY", json.dumps(bad))
    src = make_source("earthengine", {}, None)
    with pytest.raises(EarthEngineAuthError, match="from the environment variable EE_SERVICE_ACCOUNT_KEY"):
        src._credentials()


def test_initialisation_failure_message(ee_direct):
    """A temporary initialisation failure says so (not "tile -: ..."); a tile fetch retries it."""
    import tasks.multimodal.sources.earthengine as ee_mod

    fake, _ = ee_direct()
    src = ee_mod.EarthEngineSource(project=fake.project, credentials=fake.service_account_info(),
                                   url="http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ee_mod.EarthEngineInitError) as info:
        src.initialize()
    assert str(info.value).startswith("Earth Engine initialisation at http://127.0.0.1:9 failed (temporary")
    with pytest.raises(TransientSourceError) as tile_error:
        src.select(_tile("t9"))
    assert str(tile_error.value).startswith("tile t9: Earth Engine initialisation")


def test_more_candidates_than_the_index_table(ee_direct, monkeypatch):
    """Above the table's bound the metadata is asked once more with a table reaching n: the
    pick is still the original's (a third request for that tile only)."""
    import tasks.multimodal.sources.earthengine as ee_mod

    real = ee_mod.choose
    monkeypatch.setattr(ee_mod, "choose", lambda tile, table_size=8: real(tile, table_size))
    tiles = _selection_tiles(6)
    fake, src = ee_direct(tiles=tiles, s2_counts=(200, 800))
    seen_n, mismatches = _compare(fake, src, tiles)
    assert not mismatches, mismatches[:2]
    for t, n in zip(tiles, seen_n):
        assert fake.requests_by_tile[t.tile_id]["value"] == (2 if n > 8 else 1), (t.tile_id, n)
    assert max(seen_n) > 8


@pytest.mark.usefixtures("prefect_server")
def test_prefect_lessor_sub_leases():
    """The pool's lessor against the real Prefect server: sub-leases count against the limit,
    a full limit answers None (or TimeoutError when waiting), a missing limit is an error,
    and released leases free their slots."""
    from prefect.client.orchestration import get_client

    from tasks.common.concurrency import MissingConcurrencyLimit, PrefectLessor, ensure_limit

    ensure_limit("pool-test", 3)
    lessor = PrefectLessor("pool-test")

    def active() -> int:
        with get_client(sync_client=True) as client:
            return client.read_global_concurrency_limit_by_name("pool-test").active_slots

    a = lessor.acquire(2, wait=False)
    assert a is not None and active() == 2
    assert lessor.acquire(2, wait=False) is None  # one slot left
    with pytest.raises(TimeoutError):
        lessor.acquire(2, wait=True, timeout_s=0.3, poll_s=0.1)
    lessor.renew(a)
    lessor.release(a)
    b = lessor.acquire(3, wait=False)
    assert b is not None and active() == 3
    lessor.release(b)
    assert active() == 0
    with pytest.raises(MissingConcurrencyLimit, match="no-such-pool-limit"):
        PrefectLessor("no-such-pool-limit").acquire(1, wait=True, timeout_s=5)


def test_default_endpoint_is_high_volume(monkeypatch):
    from tasks.multimodal.sources import make_source

    """Without source_options.url the client talks to Google's high-volume endpoint (the one
    Google asks automated parallel clients to use); a url set by the user (the fake's) wins."""
    import contextlib

    import ee

    import tasks.multimodal.sources.base as sources_base
    import tasks.multimodal.sources.earthengine as ee_mod

    seen = []
    monkeypatch.setattr(ee, "Initialize", lambda **kw: seen.append(kw["url"]))
    monkeypatch.setattr(ee.data, "setMaxRetries", lambda n: None)
    monkeypatch.setattr(ee.data, "setDeadline", lambda ms: None)
    monkeypatch.setattr(ee.deprecation, "_FetchDataCatalogStac", ee.deprecation._FetchDataCatalogStac)
    monkeypatch.setattr(ee_mod, "slot", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(sources_base, "slot", lambda *a, **k: contextlib.nullcontext())  # a request's slot
    monkeypatch.setattr(ee_mod.EarthEngineSource, "_credentials", lambda self: object())
    monkeypatch.setattr(ee_mod, "_initialized", {})
    src = make_source("earthengine", {"project": "p"}, None)
    src.initialize()
    assert seen == ["https://earthengine-highvolume.googleapis.com"] == [ee.data.HIGH_VOLUME_API_BASE_URL]
    assert "earthengine-highvolume" in repr(src)
    make_source("earthengine", {"project": "p", "url": "http://127.0.0.1:9"}, None).initialize()
    assert seen[-1] == "http://127.0.0.1:9"


def test_metadata_template_gives_the_same_request(ee_direct, monkeypatch):
    """The metadata JSON from the per-combination template equals the plain serialization of
    metadata_expression for tiles of every year window and product (and hemisphere), and the
    request sent carries the same body as ee.data.computeValue's."""
    import ee
    import googleapiclient.http

    import tasks.multimodal.sources.earthengine as ee_mod

    fake, src = ee_direct()
    src.initialize()
    tiles = _selection_tiles(24)
    combos = set()
    for t in tiles:
        for months in (13, 12):
            ch = ee_mod.choose(t)
            combos.add((ch.year, ch.prefer))
            plain = ee.serializer.encode(ee_mod.metadata_expression(t, ch, months), for_cloud_api=True)
            assert json.dumps(ee_mod.metadata_request(t, ch, months)) == json.dumps(plain), t.tile_id
    assert len(combos) >= 6, combos
    assert any(tpl is not None for tpl in ee_mod._TEMPLATES.values())  # the template path was taken
    bodies = []
    real = googleapiclient.http.HttpRequest.execute

    def spy(self, *a, **k):
        bodies.append((self.method, self.uri, self.body))
        return real(self, *a, **k)
    monkeypatch.setattr(googleapiclient.http.HttpRequest, "execute", spy)
    ch = ee_mod.choose(tiles[0])
    a = ee.data.computeValue(ee_mod.metadata_expression(tiles[0], ch))
    b = ee_mod.compute_value(ee_mod.metadata_request(tiles[0], ch))
    assert a == b and bodies[0] == bodies[1]


def test_pixels_template_gives_the_same_request(ee_direct, monkeypatch):
    """The computePixels expression from its template equals the plain serialization of
    pixels_expression (with and without Sentinel-1 orbits and Dynamic World, L2A and L1C),
    and compute_pixels sends the same body as ee.data.computePixels."""
    import ee
    import googleapiclient.http

    import tasks.multimodal.sources.earthengine as ee_mod

    tiles = _selection_tiles(24)
    fake, src = ee_direct(tiles=tiles)
    shapes, metas = set(), []
    for t in tiles:
        try:
            _, meta = src.select(t)
        except NoDataError:
            continue
        metas.append((t, meta))
        b = meta.stack_bands()
        shapes.add((meta.s2_type, bool(b["sentinel1_asc"]), bool(b["sentinel1_desc"]), bool(b["dynamic_world"])))
        expr, names = ee_mod.pixels_request(t, meta)
        image, plain_names = ee_mod.pixels_expression(t, meta)
        assert json.dumps(expr) == json.dumps(ee.serializer.encode(image, for_cloud_api=True)), t.tile_id
        assert names == plain_names
    assert len(metas) >= 20 and len(shapes) >= 3, shapes
    assert any(tpl is not None for tpl in ee_mod._PIXEL_TEMPLATES.values())
    bodies = []
    real = googleapiclient.http.HttpRequest.execute

    def spy(self, *a, **k):
        bodies.append((self.method, self.uri, self.body))
        return real(self, *a, **k)
    monkeypatch.setattr(googleapiclient.http.HttpRequest, "execute", spy)
    t, meta = metas[0]
    grid = ee_mod.stack_grid(t, meta)
    expr, names = ee_mod.pixels_request(t, meta)
    image, _ = ee_mod.pixels_expression(t, meta)
    base = {"fileFormat": "NPY", "bandIds": names,
            "grid": {"dimensions": {"width": grid.size, "height": grid.size},
                     "affineTransform": {"scaleX": 10.0, "shearX": 0.0, "translateX": grid.transform.c,
                                         "shearY": 0.0, "scaleY": -10.0, "translateY": grid.transform.f},
                     "crsCode": grid.crs}}
    a = ee.data.computePixels({**base, "expression": image})
    b = ee_mod.compute_pixels({**base, "expression": expr})
    assert a == b and bodies[0] == bodies[1]
