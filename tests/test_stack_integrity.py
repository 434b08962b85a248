"""A stack is what was fetched, or it is fetched again; and the flow's bookkeeping
stays bounded (windowed futures, one-pass index)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

from tasks.common.window import run_windowed
from tasks.multimodal import convert, stacks, tiles as tiles_mod
from tasks.multimodal.layout import DatasetLayout
from tasks.multimodal.sources.synthetic import SyntheticSource

IMG = 16


@pytest.fixture(scope="module")
def world():
    regions = tiles_mod.load_regions(tiles_mod.DEFAULT_REGIONS)
    eco = tiles_mod.eco_region_index(regions)
    tiles = tiles_mod.sample_tiles(regions, eco, 5, 0, tile_size_m=300.0, seed=3)
    return tiles, SyntheticSource(seed=3, eco_index=eco, missing_orbit_rate=0.0)


def _same_layout_pair(out: Path, ids: list[str]) -> tuple[str, str]:
    """Two tiles whose stacks have the same bands: a copy is then a valid stack for both."""
    bands = {tid: json.dumps(stacks.read_tile_info(tid, out)["BANDS"], sort_keys=True) for tid in ids}
    for a in ids:
        for b in ids:
            if a != b and bands[a] == bands[b]:
                return a, b
    raise AssertionError("no two tiles with the same bands")


def _fetch_all(tiles, source, out):
    for t in tiles:
        o = stacks.fetch_tile(t, source, out)
        assert o.status == "fetched", o
    states, entries, _ = stacks.decide(tiles, source, out)
    assert set(states.values()) == {"done"}
    return entries


def _overwrite_4k_keep_mtime(tif: Path) -> None:
    st = tif.stat()
    raw = bytearray(tif.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 4096] = os.urandom(4096)
    tif.write_bytes(bytes(raw))
    os.utime(tif, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: stat cannot tell
    assert tif.stat().st_size == st.st_size


def _pack(tiles, out, entries, defer=True):
    ids = [t.tile_id for t in tiles]
    spec = convert.PartSpec(0, ids, convert.entries_part_key(ids, entries, IMG, convert.Compression()))
    return convert.pack_partition(spec, out / "tiles", stacks.TileInfoDir(out), out / "work" / "parts", IMG,
                                  defer_on_mismatch=defer)


def test_tile_json_records_digest_and_grid(tmp_path, world):
    tiles, source = world
    _fetch_all(tiles[:1], source, tmp_path)
    info = stacks.read_tile_info(tiles[0].tile_id, tmp_path)
    rec = info["STACK"]
    tif = tmp_path / "tiles" / f"{tiles[0].tile_id}.tif"
    raw = tif.read_bytes()
    assert rec["bytes"] == len(raw) and rec["crc32"] == f"{zlib.crc32(raw):08x}" and "blake2b" not in rec
    assert rec["crs"] == tiles[0].utm_crs and rec["width"] == rec["height"] == 30 and len(rec["transform"]) == 6
    # the bookkeeping never reaches the dataset's tile_info
    assert set(stacks.load_tile_info([tiles[0].tile_id], tmp_path)[tiles[0].tile_id]) & set(stacks.BOOKKEEPING) == set()


def test_4k_overwritten_mid_file_is_caught_by_pack_then_by_the_full_check(tmp_path, world):
    tiles, source = world
    entries = _fetch_all(tiles, source, tmp_path)
    victim = tmp_path / "tiles" / f"{tiles[2].tile_id}.tif"
    _overwrite_4k_keep_mtime(victim)
    # the rerun's stat check vouches for it (size and mtime unchanged) ...
    states, entries, counts = stacks.decide(tiles, source, tmp_path)
    assert states[tiles[2].tile_id] == "done" and counts["full checks"] == 0
    # ... but packing checks the digest of the bytes it reads
    res = _pack(tiles, tmp_path, entries)
    assert set(res.integrity) == {tiles[2].tile_id} and res.path == "", res
    assert "digest mismatch" in res.integrity[tiles[2].tile_id]
    assert not (tmp_path / "work" / "parts" / "part_00000.npz").exists()
    # without defer, the part is written without that row and the problem is reported
    res = _pack(tiles, tmp_path, entries, defer=False)
    assert res.n_rows == len(tiles) - 1 and tiles[2].tile_id in res.problems
    # the full check (a tile not vouched for by the index) catches it too
    DatasetLayout(tmp_path).stacks_index.unlink()
    why: dict[str, str] = {}
    states, _, counts = stacks.decide(tiles, source, tmp_path, why)
    assert states[tiles[2].tile_id] == "missing" and counts["full checks"] == len(tiles)
    assert list(why) == [tiles[2].tile_id] and "digest" in why[tiles[2].tile_id]


def test_another_tiles_geotiff_copied_over_is_caught(tmp_path, world):
    tiles, source = world
    entries = _fetch_all(tiles, source, tmp_path)
    a, b = _same_layout_pair(tmp_path, [t.tile_id for t in tiles])
    src, dst = (tmp_path / "tiles" / f"{tid}.tif" for tid in (a, b))
    st = dst.stat()
    shutil.copyfile(src, dst)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    # a valid GeoTIFF with the right bands: only the record tells it is another place
    assert stacks.stack_is_complete(dst, stacks.read_tile_info(b, tmp_path)["BANDS"], 30) is None
    # packing checks the grid and the digest (the index is bypassed here: same-size copies exist)
    res = _pack(tiles, tmp_path, entries)
    assert set(res.integrity) == {b}
    assert "another tile" in res.integrity[b]
    why: dict[str, str] = {}
    DatasetLayout(tmp_path).stacks_index.unlink()
    states, _, _ = stacks.decide(tiles, source, tmp_path, why)
    assert states[b] == "missing" and list(why) == [b]
    # refetching restores exactly the bytes that were recorded
    bt = next(t for t in tiles if t.tile_id == b)
    assert stacks.fetch_tile(bt, source, tmp_path).status == "fetched"
    states, entries2, _ = stacks.decide(tiles, source, tmp_path)
    assert set(states.values()) == {"done"} and entries2[b].digest == entries[b].digest


def test_rerun_decides_from_the_index_without_opening_stacks(tmp_path, world, monkeypatch):
    tiles, source = world
    _fetch_all(tiles, source, tmp_path)
    opened = []
    monkeypatch.setattr(stacks, "tile_check", lambda *a, **k: opened.append(a[0].tile_id))
    states, _, counts = stacks.decide(tiles, source, tmp_path)
    assert set(states.values()) == {"done"} and opened == [] and counts["full checks"] == 0
    # the index is compact: one line per finished tile, rewritten, not appended forever
    lines = DatasetLayout(tmp_path).stacks_index.read_text().splitlines()
    assert sorted(json.loads(x)["id"] for x in lines) == sorted(t.tile_id for t in tiles)
    # a cut last line (crash while appending) only costs that tile a full check
    with open(DatasetLayout(tmp_path).stacks_index, "a") as fh:
        fh.write('{"id": "x", "sta')
    monkeypatch.undo()
    states, _, counts = stacks.decide(tiles, source, tmp_path)
    assert set(states.values()) == {"done"} and counts["full checks"] == 0


def test_tile_info_json_is_streamed_identically(tmp_path, world):
    tiles, source = world
    _fetch_all(tiles, source, tmp_path)
    ids = [t.tile_id for t in tiles]
    p = tmp_path / "ti.json"
    assert stacks.write_tile_info_json(p, iter(ids), tmp_path) == len(ids)
    assert p.read_text() == json.dumps(stacks.load_tile_info(ids, tmp_path))


def test_window_bounds_the_futures_held():
    held = [0]
    peak = [0]
    lock = threading.Lock()
    seen = []

    def work(i):
        return i * i

    with ThreadPoolExecutor(4) as pool:
        def submit(i):
            with lock:
                held[0] += 1
                peak[0] = max(peak[0], held[0])
            return pool.submit(work, i)

        def on_done(i, fut):
            with lock:
                held[0] -= 1
            seen.append((i, fut.result()))

        stats = run_windowed(submit, iter(range(500)), 7, on_done)
    assert stats.submitted == 500 and stats.max_in_flight == 7 and peak[0] == 7
    assert sorted(seen) == [(i, i * i) for i in range(500)]


@pytest.mark.usefixtures("prefect_server")
def test_flow_refetches_damaged_stacks_and_rebuilds_the_same_h5(tmp_path):
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.multimodal import multimodal_flow
    from tasks.multimodal.config import MultimodalConfig

    cfg = MultimodalConfig(name="data_integrity", output_dir=str(tmp_path), n_tiles=6, fetch_batch_size=2,
                           part_size=3, tile_size_m=300.0, image_size=IMG, tasks_in_flight=2,
                           source_options={"missing_orbit_rate": 0.0})

    def run():
        return multimodal_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=2))(config=cfg)

    first = run()
    h5 = cfg.dataset_dir / f"{cfg.name}.h5"
    with h5py.File(h5) as f:
        before = {k: f[k][:] for k in f}
    tiles_dir = cfg.dataset_dir / "tiles"
    a, b = _same_layout_pair(cfg.dataset_dir, sorted(p.stem for p in tiles_dir.glob("*.tif")))
    c = next(p.stem for p in sorted(tiles_dir.glob("*.tif")) if p.stem not in (a, b))
    _overwrite_4k_keep_mtime(tiles_dir / f"{c}.tif")  # only packing can see this one
    shutil.copyfile(tiles_dir / f"{a}.tif", tiles_dir / f"{b}.tif")  # another tile's valid GeoTIFF
    # the h5 is vouched for by its manifest and is not rebuilt from stacks that did not
    # change on record; a damaged stack matters (and is caught) when the h5 is rebuilt
    h5.unlink()
    second = run()
    assert second["counts"]["fetched this run"] == 2
    assert second["counts"]["rows in h5"] == first["counts"]["rows in h5"] == 6
    integrity = {p["item"]: p["reason"] for p in second["problems"] if p["stage"] == "integrity"}
    assert set(integrity) == {b, c}
    assert all("fetched again" in r for r in integrity.values())
    with h5py.File(h5) as f:
        for k in before:
            np.testing.assert_array_equal(f[k][:], before[k], err_msg=k)
    lines = (cfg.dataset_dir / "report_problems.jsonl").read_text().splitlines()
    assert {json.loads(x)["item"] for x in lines} >= set(integrity)


def test_stack_opens_never_list_the_tiles_folder(tmp_path, world, monkeypatch):
    """GDAL lists a file's whole folder on open (side-car files) and when it creates a file
    over an existing one (the atomic write's temporary name): O(N) per tile in a folder of N
    stacks (1 -> 4 ms per write from 1000 to 12 000 tiles). Every stack open runs with the
    listing off, so a side-car file beside a stack is never read into it."""
    import rasterio

    from tasks.multimodal.sources import base

    tiles, source = world
    seen = []
    real_open = rasterio.open

    def recording_open(path, mode="r", **kw):
        seen.append((mode, rasterio.env.getenv().get("GDAL_DISABLE_READDIR_ON_OPEN")))
        return real_open(path, mode, **kw)

    monkeypatch.setattr(base.rasterio, "open", recording_open)
    _fetch_all(tiles[:2], source, tmp_path)  # writes through the atomic temporary name
    tid = tiles[0].tile_id
    tif = tmp_path / "tiles" / f"{tid}.tif"
    Path(f"{tif}.aux.xml").write_text(
        '<PAMDataset><Metadata><MDI key="SIDECAR">read</MDI></Metadata>'
        '<PAMRasterBand band="1"><Description>not_a_band</Description></PAMRasterBand></PAMDataset>')
    data, names = base.read_stack(tif)
    assert "not_a_band" not in names and data.shape[0] == len(names)
    with base.open_stack(tif) as ds:
        assert "SIDECAR" not in ds.tags()
    info = stacks.read_tile_info(tid, tmp_path)
    assert stacks.stack_is_complete(tif, info["BANDS"], 30) is None
    assert {m for m, _ in seen} == {"r", "w"}
    assert all(v == "EMPTY_DIR" for _, v in seen), seen
    with real_open(tif) as ds:  # a plain GDAL open does read the side-car: the check above means something
        assert ds.tags().get("SIDECAR") == "read"


def test_records_from_before_crc32_are_still_checked(tmp_path, world):
    """Records written before 2026-12-07 hold a BLAKE2b-128 digest instead of a CRC-32: such a
    stack is read when its digest matches and refused, naming the check, when not; a record
    with no digest at all is refused (nothing vouches for the bytes)."""
    tiles, source = world
    _fetch_all(tiles[:1], source, tmp_path)
    tif = tmp_path / "tiles" / f"{tiles[0].tile_id}.tif"
    rec = stacks.read_tile_info(tiles[0].tile_id, tmp_path)["STACK"]
    raw = tif.read_bytes()
    old = {k: v for k, v in rec.items() if k != "crc32"} | {"blake2b": hashlib.blake2b(raw, digest_size=16).hexdigest()}
    data, _ = stacks.read_verified_stack(tif, old)
    assert np.array_equal(data, stacks.read_verified_stack(tif, rec)[0], equal_nan=True)
    with pytest.raises(stacks.StackIntegrityError, match="BLAKE2b digest mismatch"):
        stacks.read_verified_stack(tif, old | {"blake2b": "0" * 32})
    with pytest.raises(stacks.StackIntegrityError, match="CRC-32 digest mismatch"):
        stacks.read_verified_stack(tif, rec | {"crc32": "00000000"})
    with pytest.raises(stacks.StackIntegrityError, match="no content digest"):
        stacks.read_verified_stack(tif, {k: v for k, v in rec.items() if k != "crc32"})
    assert stacks._entry(tif, "k", old).digest == old["blake2b"] and stacks._entry(tif, "k", rec).digest == rec["crc32"]
