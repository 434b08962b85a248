"""The whole multimodal flow through a real local Prefect server and a real Dask
LocalCluster, then the output checked exactly against the contract."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest

from tasks.common.runtime import DaskSettings, PROJECT_ROOT, make_task_runner
from tasks.multimodal import schema
from tasks.multimodal.config import MultimodalConfig
from tests.dataset_checks import check_dataset
from tests.mmearth_reader import OUT_MODALITIES, Reader

pytestmark = pytest.mark.usefixtures("prefect_server")


def _run(cfg: MultimodalConfig, runner=None):
    from flows.multimodal import multimodal_flow

    runner = runner or make_task_runner(DaskSettings(n_workers=2))
    return multimodal_flow.with_options(task_runner=runner)(config=cfg)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow")
    cfg = MultimodalConfig(
        name="data_flowtest", output_dir=str(out), n_tiles=14, fetch_batch_size=3, part_size=4,
        source_options={"no_data_rate": 0.15, "missing_orbit_rate": 0.4, "seed": 7},
    )
    result = _run(cfg)
    return cfg, result


def test_flow_counts_and_report(built):
    cfg, result = built
    counts = result["counts"]
    assert counts["tiles sampled"] == 14
    assert counts["stacks done"] + counts["no data"] + counts["fetch failed"] == 14
    assert counts["no data"] >= 1, "no_data_rate 0.15 over 14 tiles should hit at least one tile"
    assert counts["rows in h5"] == counts["stacks done"] and counts["convert failed"] == 0
    no_data_items = {p["item"] for p in result["problems"] if p["reason"].startswith("no data")}
    assert len(no_data_items) == counts["no data"]
    report = json.loads((cfg.dataset_dir / "report.json").read_text())
    assert report["counts"] == counts
    # what grows with the tiles is said: per tile its id, a state byte, a 32-byte key and digest,
    # two int64 (measured 100.6 B a tile here, with the no-data reasons; 90-200 allowed)
    mem = report["memory"]
    assert 90 <= mem["tile state table B per tile"] <= 200 + 200 * counts["no data"] / 14, mem
    assert 1 <= mem["partition summaries"] <= -(-14 // 4) and mem["flow process peak RSS MB"] > 50
    assert "tile state table" in mem["grows with the tiles"]
    png = (cfg.dataset_dir / "tiles_map.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    sheet = cfg.dataset_dir / "tiles_contact_sheet.png"
    assert report["outputs"]["contact sheet"] == str(sheet) and sheet.read_bytes()[:4] == b"\x89PNG"
    # the synthetic source says so: report.json, its title (the artifact's heading), the h5
    assert report["source"]["synthetic"] is True and "SYNTHETIC" in report["title"]
    assert report["notes"][0].startswith("SYNTHETIC data")
    with h5py.File(cfg.dataset_dir / f"{cfg.name}.h5") as f:
        assert f.attrs["source"] == "synthetic" and bool(f.attrs["synthetic"])


def test_h5_exact_schema_and_alignment(built):
    cfg, result = built
    check_dataset(cfg.dataset_dir, cfg.name, result["counts"]["rows in h5"], cfg.image_size)


def test_splits_stats_and_training_reader(built):
    cfg, result = built
    out = cfg.dataset_dir
    n = result["counts"]["rows in h5"]
    splits = json.loads((out / f"{cfg.name}_splits.json").read_text())
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == list(range(n))
    stats = json.loads((out / f"{cfg.name}_band_stats.json").read_text())
    assert set(stats) == set(schema.STATS_KEYS)
    for key, (ds, _) in schema.STATS_KEYS.items():
        for field in ("mean", "std", "min", "max"):
            assert len(stats[key][field]) == schema.H5_BY_NAME[ds].channels
    import h5py

    norm = {"sentinel2_l2a": [], "sentinel2_l1c": [], "sentinel1": []}
    with h5py.File(out / f"{cfg.name}.h5", "r") as f:
        for split in ("train", "val", "test"):
            reader = Reader(out, split)  # MMEarth's own reader, every modality it can load
            for i in range(len(reader)):
                item = reader[i]
                row = splits[split][i]
                s2 = item["sentinel2"]
                assert s2.shape == (13, cfg.image_size, cfg.image_size) and s2.dtype == np.float32
                l2a = reader.tile_info[item["id"]]["S2_type"] == "l2a"
                raw = f["sentinel2"][row]
                norm["sentinel2_l2a" if l2a else "sentinel2_l1c"].append(
                    [s2[c][raw[c] != 0] for c in range(13)])
                # sentinel1: exactly the -inf pixels of the h5 are missing (NaN) for the reader
                s1 = item["sentinel1"]
                np.testing.assert_array_equal(np.isnan(s1), np.isneginf(f["sentinel1"][row]))
                norm["sentinel1"].append([s1[c][np.isfinite(s1[c])] for c in range(8)])
                assert np.isfinite(item["aster"]).all() and np.isfinite(item["era5"]).all()
                # classes as the reader remaps them: DW label+1 -> label, 0 -> -1; WorldCover
                # 10..100 -> 0..10 and then its no-data test (== 0) also turns tree cover into -1
                dw = f["dynamic_world"][row].astype(np.int64)
                np.testing.assert_array_equal(item["dynamic_world"], np.where(dw == 0, -1, dw - 1))
                wc = f["esa_worldcover"][row]
                classes = list(schema.WORLDCOVER_CLASSES)
                exp = np.vectorize(lambda v: -1 if v in (0, 10) else classes.index(v))(wc)
                np.testing.assert_array_equal(item["esa_worldcover"], exp)
                assert item["biome"].argmax() == reader.tile_info[item["id"]]["biome"]
                # the pretraining targets: 12 S2 bands (no B10)
            item = Reader(out, split, OUT_MODALITIES)[0] if len(reader) else None
            if item is not None:
                assert item["sentinel2"].shape == (12, cfg.image_size, cfg.image_size)
    # statistics over all tiles normalise the valid pixels to mean 0, std 1 per channel
    for key, per_tile in norm.items():
        if not per_tile:
            continue
        for c in range(len(per_tile[0])):
            v = np.concatenate([t[c] for t in per_tile]).astype(np.float64)
            if key == "sentinel2_l2a" and c == 10 or v.size < 2:
                continue  # L2A has no B10
            assert abs(v.mean()) < 1e-3 and abs(v.std() - 1) < 1e-3, (key, c, v.mean(), v.std())


def test_prefect_artifacts_published(built, prefect_server):
    import httpx

    keys = ["data-flowtest-counts", "data-flowtest-report"]
    resp = httpx.post(f"{prefect_server.url}/artifacts/filter", timeout=10,
                      json={"artifacts": {"key": {"any_": keys}}, "limit": 50, "sort": "CREATED_DESC"})
    resp.raise_for_status()
    kinds = {a["key"]: a for a in resp.json()}
    assert set(keys) <= set(kinds)
    assert "data:image/png;base64," in kinds["data-flowtest-report"]["data"]
    rows = json.loads(kinds["data-flowtest-counts"]["data"])
    assert {"what": "tiles sampled", "count": 14} in rows


def test_rerun_skips_everything_and_keeps_h5(built):
    cfg, result = built
    h5 = cfg.dataset_dir / f"{cfg.name}.h5"
    before = h5.stat().st_mtime_ns
    again = _run(cfg)
    assert again["counts"]["fetched this run"] == 0
    assert again["counts"]["rows in h5"] == result["counts"]["rows in h5"]
    assert h5.stat().st_mtime_ns == before


def test_corrupt_geotiff_in_tiles_folder_is_fetched_again(tmp_path):
    cfg = MultimodalConfig(name="data_corrupt", output_dir=str(tmp_path), n_tiles=6, fetch_batch_size=3, part_size=3)
    from prefect.task_runners import ThreadPoolTaskRunner

    first = _run(cfg, ThreadPoolTaskRunner(max_workers=2))
    tif = sorted((cfg.dataset_dir / "tiles").glob("*.tif"))[0]
    tif.write_bytes(tif.read_bytes()[: tif.stat().st_size // 3])  # truncated
    second = _run(cfg, ThreadPoolTaskRunner(max_workers=2))
    assert second["counts"]["fetched this run"] == 1
    assert second["counts"]["rows in h5"] == first["counts"]["rows in h5"] == 6


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.write_text("{ not json"), "regions.geojson"),
    (lambda p: p.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [0, 0]},
         "properties": {"biome": "Tundra", "eco_region": "x"}}]})), "Point"),
    (lambda p: p.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]]},
         "properties": {"biome": "Moon Dust", "eco_region": "x"}}]})), "Moon Dust"),
])
def test_bad_regions_fail_with_file_and_field(tmp_path, mutate, message):
    from prefect.task_runners import ThreadPoolTaskRunner

    p = tmp_path / "regions.geojson"
    mutate(p)
    cfg = MultimodalConfig(name="data_bad", output_dir=str(tmp_path / "o"), regions=str(p), n_tiles=2)
    with pytest.raises(Exception, match=message):
        _run(cfg, ThreadPoolTaskRunner(max_workers=1))


@pytest.mark.parametrize("tile_id", ["../evil", "a/b"])
def test_unsafe_tile_id_in_tiles_file_is_refused(tmp_path, tile_id):
    from prefect.task_runners import ThreadPoolTaskRunner

    tiles = {"type": "FeatureCollection", "features": [{
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[8.5, 50.5], [8.52, 50.5], [8.52, 50.51], [8.5, 50.51], [8.5, 50.5]]]},
        "properties": {"tile_id": tile_id, "biome": "Temperate Broadleaf & Mixed Forests",
                       "eco_region": "Western European broadleaf forests"}}]}
    p = tmp_path / "tiles.geojson"
    p.write_text(json.dumps(tiles))
    cfg = MultimodalConfig(name="data_bad", output_dir=str(tmp_path / "o"), tiles_geojson=str(p))
    with pytest.raises(Exception, match="tile_id"):
        _run(cfg, ThreadPoolTaskRunner(max_workers=1))
    assert not list((tmp_path / "o").rglob("*.tif"))
    assert not (tmp_path / "evil").exists()


def _h5_arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in f}


def test_interrupted_run_resumes_without_redoing_work(tmp_path, prefect_server):
    """Ctrl-C a local run mid-fetch, run again: same dataset as an uninterrupted run,
    and no tile fetched twice."""
    common = ["--set", "n_tiles=24", "--set", "fetch_batch_size=2", "--set", "part_size=6",
              "--set", "dask.n_workers=2"]
    env = dict(os.environ, PREFECT_API_URL=prefect_server.url, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "flows.multimodal", "--set", "name=data_resume",
           "--set", f"output_dir={tmp_path / 'a'}", *common]
    proc = subprocess.Popen(cmd + ["--set", 'source_options={"latency_s": 0.3}'], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    info_dir = tmp_path / "a" / "data_resume" / "work" / "tile_info"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if info_dir.is_dir() and len(list(info_dir.glob("*.json"))) >= 6:
            break
        time.sleep(0.1)
    children = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C goes to the terminal's whole process group
    proc.wait(timeout=90)
    psutil.wait_procs(children, timeout=30)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE], "left running"
    # a tile is finished when its stack and its tile JSON are both written (the stack first): a
    # Ctrl-C between the two leaves a stack that the rerun rightly fetches again
    done_before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a" / "data_resume" / "tiles").glob("*.tif")
                   if (info_dir / f"{p.stem}.json").exists()}
    assert 0 < len(done_before) < 24, "interrupt should land mid-fetch"
    assert not (tmp_path / "a" / "data_resume" / "data_resume.h5").exists()

    from flows.multimodal import parse_args

    resumed = _run(parse_args(["--set", "name=data_resume", "--set", f"output_dir={tmp_path / 'a'}", *common]))
    assert resumed["counts"]["fetched this run"] == 24 - len(done_before)
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a" / "data_resume" / "tiles").glob("*.tif")}
    assert all(after[k] == v for k, v in done_before.items()), "a finished tile was fetched again"

    clean = _run(parse_args(["--set", "name=data_resume", "--set", f"output_dir={tmp_path / 'b'}", *common]))
    assert clean["counts"] == resumed["counts"] | {"fetched this run": 24}
    a, b = tmp_path / "a" / "data_resume", tmp_path / "b" / "data_resume"
    ha, hb = _h5_arrays(a / "data_resume.h5"), _h5_arrays(b / "data_resume.h5")
    assert ha.keys() == hb.keys()
    for k in ha:
        np.testing.assert_array_equal(ha[k], hb[k], err_msg=k)
    for suffix in ("_tile_info.json", "_band_stats.json", "_splits.json"):
        assert (a / f"data_resume{suffix}").read_text() == (b / f"data_resume{suffix}").read_text(), suffix
