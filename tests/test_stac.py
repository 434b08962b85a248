"""The STAC source against a loopback STAC API + COG server (tests/fake_stac.py) built from
synthetic COGs at run time: selection rules, the queries sent, byte ranges, retries, and
``python -m flows.multimodal --config stac`` end to end with MMEarth's reader."""

from __future__ import annotations

import contextlib
import datetime as dt
import json

import h5py
import numpy as np
import pytest

from tasks.multimodal import tiles as tiles_mod
from tasks.multimodal.sources import NoDataError
from tasks.multimodal.sources import stac as st
from tasks.multimodal.sources.earthengine import choose, s2_window
from tasks.multimodal.tile import Grid
from tests import fake_stac
from tests.fake_stac import FakeStac

TILE_M = 640.0  # 64 px tiles: the demo size of these tests


def _tiles(n: int = 8):
    regions = tiles_mod.load_regions(tiles_mod.DEFAULT_REGIONS)
    return tiles_mod.sample_tiles(regions, tiles_mod.eco_region_index(regions), n, 0, tile_size_m=TILE_M)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tiles = _tiles(8)
    with FakeStac(tiles, tmp_path_factory.mktemp("stac")) as fake:
        yield tiles, fake


def _direct(fake, monkeypatch, **kw) -> st.StacSource:
    """The source without Prefect (no request slots): selection and reads only."""
    src = st.StacSource(api_url=fake.url, retry_delay_s=0.05, **kw)
    monkeypatch.setattr(src, "_request_slot", contextlib.nullcontext)
    return src


def _t(item) -> dt.datetime:
    return fake_stac._parse_time(item["properties"]["datetime"])


def expected(fake: FakeStac, tile) -> dict:
    """The picks by the rules, from the fake's whole catalogue (no search involved)."""
    ch = choose(tile)
    start, end = (dt.datetime.fromisoformat(d).replace(tzinfo=dt.timezone.utc) for d in s2_window(ch.year))
    area = st.buffered_tile(tile, 200)
    cands = sorted((i for i in fake.items if i["collection"] == fake_stac.S2 and start <= i["_time"] < end
                    and i["properties"]["eo:cloud_cover"] < 10 and i["_shape"].contains(area)),
                   key=lambda i: (i["_time"], i["id"]))
    if not cands:
        return {"s2": None}
    s2 = cands[choose(tile, table_size=max(len(cands), 1)).index(len(cands))]
    day = dt.datetime.combine(s2["_time"].date(), dt.time(), dt.timezone.utc)
    lo, hi = dt.datetime(2017, 1, 1, tzinfo=dt.timezone.utc), dt.datetime(2020, 12, 31, tzinfo=dt.timezone.utc)
    s1 = {}
    for orbit, key in (("ascending", "asc"), ("descending", "desc")):
        ok = [i for i in fake.items if i["collection"] == fake_stac.S1 and i["properties"]["sat:orbit_state"] == orbit
              and i["properties"]["sar:instrument_mode"] == "IW" and lo <= i["_time"] < hi and i["_shape"].contains(area)]
        best = min(ok, key=lambda i: (abs((i["_time"] - day).total_seconds()), i["_time"], i["id"]), default=None)
        s1[key] = best["id"] if best else None
    return {"s2": s2["id"], "date": s2["_time"].strftime("%Y-%m-%d"), "s1": s1}


def check_selection(fake: FakeStac, src: st.StacSource, tiles) -> dict:
    """Fetch every tile and compare its picks with :func:`expected`; return the stacks."""
    out = {}
    for tile in tiles:
        want = expected(fake, tile)
        try:
            stack = src.fetch(tile, Grid.for_tile(tile))
        except NoDataError:
            assert want["s2"] is None, f"{tile.tile_id}: no data, expected {want['s2']}"
            continue
        info = stack.info
        assert info["S2_IMAGEID"] == want["s2"], tile.tile_id
        assert info["S2_DATE"] == want["date"]
        assert info["S1_IMAGEIDS"] == want["s1"], tile.tile_id
        out[tile.tile_id] = stack
    return out


def test_selection_follows_the_original_rules(world, monkeypatch):
    tiles, fake = world
    fake.searches.clear()
    stacks = check_selection(fake, _direct(fake, monkeypatch), tiles)
    assert len(stacks) >= 6  # the catalogue gives most tiles an image
    # the queries: collection, the tile polygon, the window end-exclusive, the cloud filter
    s2_queries = [q for q in fake.searches if q["collections"] == [fake_stac.S2]]
    assert len(s2_queries) == len(tiles)
    for tile, q in zip(tiles, s2_queries):
        start, end = s2_window(choose(tile).year)
        assert q["intersects"] == json.loads(json.dumps(tile.geometry))
        last = dt.date.fromisoformat(end) - dt.timedelta(days=1)  # filterDate's end is exclusive
        assert q["datetime"] == f"{start}T00:00:00Z/{last}T23:59:59.999Z"
        assert q["query"] == {"eo:cloud_cover": {"lt": 10}}
    for q in fake.searches:
        assert q["collections"][0] in fake_stac.COLLECTIONS and "intersects" in q
        if q["collections"] == [fake_stac.S1]:
            assert q["query"]["sar:instrument_mode"] == {"eq": "IW"}
    # the stack: on the B04 grid, harmonised reflectance, SCL-derived QA60, dB, DEM mosaic, WorldCover v100
    tile = next(t for t in tiles if t.tile_id in stacks)
    s = stacks[tile.tile_id]
    names = s.band_descriptions
    item = next(i for i in fake.items if i["id"] == s.info["S2_IMAGEID"])
    import rasterio

    with rasterio.open(fake.root / "cogs" / f"{tile.tile_id}_S2_B04.tif") as src:
        col, row = ~src.transform @ (s.transform.c, s.transform.f)
        assert float(col).is_integer() and float(row).is_integer()  # the grid sits on B04's pixels
        raw = src.read(1)[int(row):int(row) + 64, int(col):int(col) + 64].astype(np.float32)
    offset = -1000.0 if item["properties"]["s2:processing_baseline"] >= "04.00" else 0.0
    b4 = s.data[names.index("sentinel2/B4")]
    np.testing.assert_allclose(b4[raw != 0], raw[raw != 0] + offset, atol=0.01)
    scl, qa = s.data[names.index("sentinel2/SCL")], s.data[names.index("sentinel2/QA60")]
    assert set(np.unique(qa[scl == 9])) <= {1024} and set(np.unique(qa[scl == 4])) <= {0}
    assert np.nanmax(s.data[names.index("sentinel1_asc/VV")]) < 0  # dB of gamma0 < 1
    elev = s.data[names.index("aster/elevation")]
    assert not np.isnan(elev).any() and 250 < elev.mean() < 350  # both DEM pieces filled the tile
    wc = s.data[names.index("esa_worldcover/Map")]
    assert set(np.unique(wc)) <= {10, 20, 30, 40, 50, 60, 80}  # v100; the 2021 v200 item (all 95) is not used
    assert s.info["BANDS"]["dynamic_world"] is None and s.info["BANDS"]["canopy_height_eth"] is None
    assert s.info["PRODUCTS"]["sentinel2"] == f"sentinel-2-l2a/{item['id']}"
    assert s.info["PRODUCTS"]["era5"] is None and np.isnan(s.info["era5"]["year"]).all()


@pytest.mark.parametrize("change", ["wrong collection", "no cloud filter", "no date window", "no containment"])
def test_selection_check_catches_a_regression(world, monkeypatch, change):
    """The checks above fail when the source queries the wrong collection or drops a filter."""
    tiles, fake = world
    src = _direct(fake, monkeypatch)
    if change == "wrong collection":
        monkeypatch.setattr(st, "S2_L2A", "sentinel-2-l1c")
    elif change in ("no cloud filter", "no date window"):
        drop = "query" if change == "no cloud filter" else "datetime"
        real = st.StacSource.search

        def search(self, tile, what, **params):
            if params.get("collections") == [fake_stac.S2]:
                params.pop(drop)
            return real(self, tile, what, **params)

        monkeypatch.setattr(st.StacSource, "search", search)
    else:
        monkeypatch.setattr(st, "contains", lambda item, area: True)
    with pytest.raises(AssertionError):
        check_selection(fake, src, tiles)


def test_windowed_reads_only_and_retries(tmp_path, monkeypatch):
    """Every COG byte comes from a Range request and a tile reads a fraction of each 10 m
    file; 429/503 answers (searches and reads) are retried and the tile still comes; a read
    that keeps failing is a transient error. A server of its own: GDAL caches what it read
    from a URL for the process, so the files must not have been read by another test."""
    with FakeStac(_tiles(8), tmp_path) as fake:
        src = _direct(fake, monkeypatch)
        tile, other = [t for t in fake.tiles if expected(fake, t)["s2"]][:2]
        src.check()  # the landing page, before the faults
        fake.faults.update({f"/cogs/{tile.tile_id}_S2_B03.tif": [429, 503], "/search": [429]})
        fake.retry_after_s = 2
        fake.reads.clear()
        stack = src.fetch(tile, Grid.for_tile(tile))
        assert not fake.faults["/search"] and not fake.faults[f"/cogs/{tile.tile_id}_S2_B03.tif"]  # both answered
        refused = next(r.t0 for r in fake.reads if r.path == "/search" and r.status == 429)
        assert min(t for t in fake.search_times if t > refused) - refused >= 1.9  # asked again after Retry-After: 2
        b03 = [r for r in fake.reads if r.path.endswith(f"{tile.tile_id}_S2_B03.tif")]
        assert [r.status for r in b03[:3]] == [429, 503, 200]  # read, HEAD asked again, HEAD answered
        assert b03[2].t0 - b03[1].t0 >= 1.9  # after the 503's Retry-After: 2
        assert stack.data.shape[1:] == (64, 64)
        assert fake.whole_file_reads() == []
        read = fake.bytes_by_file()
        for key in ("B02", "B04", "B08"):  # (B03's reads were retried)
            name = f"{tile.tile_id}_S2_{key}.tif"
            assert 0 < read[name] < 0.5 * fake.sizes[name], (name, read[name], fake.sizes[name])
        fake.faults[f"/cogs/{other.tile_id}_S2_B02.tif"] = [503] * 50
        src.retries = 1
        with pytest.raises(st.TransientSourceError, match="B02"):
            src.fetch(other, Grid.for_tile(other))
        # the retry (same process) asks the server again: GDAL remembered no failure
        fake.faults.clear()
        assert src.fetch(other, Grid.for_tile(other)).data.shape[1:] == (64, 64)


def test_flow_config_stac_end_to_end(tmp_path, prefect_server):
    """``python -m flows.multimodal --config stac`` against the loopback server: the h5 in
    MMEarth's schema, tile_info naming each modality's product, MMEarth's reader loads it."""
    from flows.multimodal import main
    from tests.dataset_checks import check_dataset
    from tests.mmearth_reader import Reader

    tiles = _tiles(8)
    with FakeStac(tiles, tmp_path / "server") as fake:
        rc = main(["--config", "stac", "--set", f"output_dir={tmp_path}", "--set", "n_tiles=8",
                   "--set", f"tile_size_m={TILE_M}", "--set", "image_size=64", "--set", "part_size=4",
                   "--set", f"source_options.api_url={fake.url}", "--set", "fetch_batch_size=4",
                   "--set", "fetch_threads=4", "--set", "fetch_slots=4", "--set", "request_ceiling=4",
                   "--set", "dask.n_workers=1"])
        assert rc == 0
        assert fake.max_in_flight <= 4  # the ceiling (GDAL's parallel range requests went past it: 7)
        assert fake.whole_file_reads() == []
    want = {t.tile_id: expected(fake, t) for t in tiles}
    n = sum(1 for w in want.values() if w["s2"])
    out = tmp_path / "data_stac_v001"
    check_dataset(out, "data_stac_v001", n, 64)
    info = json.loads((out / "data_stac_v001_tile_info.json").read_text())
    for tid, w in want.items():
        if w["s2"]:
            assert info[tid]["SOURCE"] == "stac" and info[tid]["S2_IMAGEID"] == w["s2"]
            assert info[tid]["PRODUCTS"]["sentinel2"].startswith("sentinel-2-l2a/")
            assert info[tid]["PRODUCTS"]["aster"].startswith("cop-dem-glo-30/")
    with h5py.File(out / "data_stac_v001.h5", "r") as f:
        assert f["sentinel2"].shape == (n, 13, 64, 64) and (f["sentinel2"][:, 3] > 0).mean() > 0.9
        assert np.isnan(f["era5"][:]).all() and (f["dynamic_world"][:] == 0).all()
    reader = Reader(out, "train")
    assert len(reader) > 0
    item = reader[0]
    assert item["sentinel2"].shape == (13, 64, 64)


def test_offered_in_the_form_and_deployed():
    """The flow's form offers the source; prefect.yaml deploys it against Planetary Computer;
    the preset names the dataset after the source."""
    from deployments.serve import build_deployments
    from tasks.multimodal.config import MultimodalConfig, get_config

    schema_ = MultimodalConfig.model_json_schema()
    assert "stac" in schema_["properties"]["source"]["enum"]
    cfg = get_config("stac")
    assert cfg.name == "data_stac_v001" and cfg.request_limit_name == "stac-requests"
    deps = {d.name: d for d in build_deployments()}
    config = MultimodalConfig(**deps["stac"].parameters["config"])
    assert config == get_config("stac", source_options={"api_url": st.PC_API})
    assert config.source == "stac" and config.source_options["api_url"] == st.PC_API
    assert st.StacSource(**config.source_options).sign  # Planetary Computer's assets are signed
    assert not st.StacSource(api_url="http://127.0.0.1:1/").sign


def test_unusable_api_fails_before_any_tile(world, monkeypatch):
    """check(): a URL that answers nothing, or answers but is no STAC item-search API,
    fails with one message naming the setting."""
    _, fake = world
    for url, message in (("http://127.0.0.1:1/", "does not answer"), (fake.url + "cogs/", "does not answer|not a STAC")):
        src = st.StacSource(api_url=url, retries=0)
        monkeypatch.setattr(src, "_request_slot", contextlib.nullcontext)
        with pytest.raises(st.StacConfigError, match=message) as err:
            src.check()
        assert "api_url" in str(err.value)
    src = st.StacSource(api_url=fake.url, sign=True)
    monkeypatch.setitem(__import__("sys").modules, "planetary_computer", None)  # not installed
    with pytest.raises(st.StacConfigError, match="planetary-computer"):
        src.check()


def test_unknown_source_option_is_named():
    from tasks.multimodal.sources import make_source

    with pytest.raises(ValueError, match=r"\['api_uri'\] are not settings of the stac source.*'api_url'"):
        make_source("stac", {"api_uri": "http://127.0.0.1:1/"})
    assert make_source("stac", {"api_url": "http://127.0.0.1:1/"}, limit_name="x", ceiling=3).ceiling == 3
