"""The tile-selection stage (given file / Earth Engine sampler with its re-use key /
local sampler) writes the tiles GeoJSON exactly once; later stages read it back in
chunks; the flow's per-tile state is compact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tasks.multimodal import select_tiles as sel, stacks, tiles as tiles_mod
from tasks.multimodal.config import MultimodalConfig
from tasks.multimodal.sources.synthetic import SyntheticSource
from tasks.multimodal.tile import Tile


@pytest.fixture
def writes(monkeypatch):
    """Every tiles-GeoJSON write: (path, number of tiles)."""
    seen: list[tuple[Path, int]] = []
    real = tiles_mod.write_tiles_stream

    def spy(tiles, path):
        n = real(tiles, path)
        seen.append((Path(path), n))
        return n

    monkeypatch.setattr(tiles_mod, "write_tiles_stream", spy)
    return seen


def _read(path: Path) -> list[Tile]:
    return [t for c in tiles_mod.iter_tiles(path) for t in c]


def test_local_sampler_streams_the_sample_once(tmp_path, writes):
    cfg = MultimodalConfig(name="data_sel", output_dir=str(tmp_path), n_tiles=40, seed=5)
    s = sel.select_tiles(cfg, cfg.dataset_dir)
    assert writes == [(s.path, 40)] and s.n_tiles == 40 and s.how == "sampled"
    regions, _ = tiles_mod.load_regions_split(tiles_mod.DEFAULT_REGIONS)
    expected = tiles_mod.sample_tiles(regions, s.eco_index, 40, 0, seed=5)
    assert _read(s.path) == expected  # same tiles, same order as the whole-list sampler
    assert json.loads(s.path.read_text())["features"][0]["properties"]["tile_id"] == expected[0].tile_id
    assert any("Rock & Ice" in n for n in s.notes) and s.regions


def test_given_tiles_file_is_validated_and_copied_once(tmp_path, writes):
    regions, _ = tiles_mod.load_regions_split(tiles_mod.DEFAULT_REGIONS)
    eco = tiles_mod.eco_region_index(regions)
    mine = tiles_mod.sample_tiles(regions, eco, 7, 1, seed=9)
    given = tmp_path / "mine.geojson"
    given.write_text(json.dumps(tiles_mod.tiles_feature_collection(mine), indent=2))  # a user's layout
    cfg = MultimodalConfig(name="data_sel", output_dir=str(tmp_path / "o"), tiles_geojson=str(given))
    s = sel.select_tiles(cfg, cfg.dataset_dir)
    assert writes == [(s.path, 7)] and s.how == "given" and _read(s.path) == mine
    # a user's file (not one feature a line) is still read, validated and chunked
    assert [len(c) for c in tiles_mod.iter_tiles(given, chunk=3)] == [3, 3, 1]

    bad = json.loads(given.read_text())
    bad["features"][2]["properties"]["eco_region"] = "Nowhere"
    given.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"mine\.geojson.*Nowhere.*eco_labels"):
        sel.select_tiles(cfg, cfg.dataset_dir)
    assert len(writes) == 1  # nothing written for a refused file


def test_earthengine_sampler_runs_once_then_reuses_its_sample(tmp_path, writes, monkeypatch):
    import tasks.multimodal.tiles_ee as tiles_ee

    regions, _ = tiles_mod.load_regions_split(tiles_mod.DEFAULT_REGIONS)
    eco = {r.eco_region: 100 + i for i, r in enumerate(regions)}
    calls: list[tuple] = []
    source = object()

    def fake_sampler(src, n, mode, labels, size, seed, batch):
        calls.append((src, n, mode, labels, size, seed, batch))
        return tiles_mod.sample_tiles(regions, eco, n, mode, tile_size_m=size, seed=seed, batch=batch), eco

    monkeypatch.setattr(tiles_ee, "sample_tiles_ee", fake_sampler)
    cfg = MultimodalConfig(name="data_sel", output_dir=str(tmp_path), source="earthengine",
                           tile_sampler="earthengine", n_tiles=12, sampling_mode="biome-equal", seed=3,
                           tile_size_m=1280.0)
    first = sel.select_tiles(cfg, cfg.dataset_dir, source)
    assert calls == [(source, 12, 1, None, 1280.0, 3, 0)]
    assert writes == [(first.path, 12)] and first.eco_index == eco and first.how == "sampled on Earth Engine"
    again = sel.select_tiles(cfg, cfg.dataset_dir, source)
    assert len(calls) == 1 and len(writes) == 1, "the same key re-uses the sample: no request, no write"
    assert again.how == "re-used Earth Engine sample" and again.eco_index == eco and again.n_tiles == 12
    other = cfg.model_copy(update={"seed": 4})
    sel.select_tiles(other, cfg.dataset_dir, source)
    assert len(calls) == 2 and len(writes) == 2 and calls[-1][5] == 4
    with pytest.raises(ValueError, match="needs source=earthengine"):
        sel.select_tiles(cfg, cfg.dataset_dir, None)


def test_tiles_are_read_in_chunks(tmp_path):
    regions, _ = tiles_mod.load_regions_split(tiles_mod.DEFAULT_REGIONS)
    eco = tiles_mod.eco_region_index(regions)
    chunks = list(tiles_mod.iter_sample_tiles(regions, eco, 60, 2, seed=1, chunk=4))
    assert max(len(c) for c in chunks) <= 4
    p = tmp_path / "t.geojson"
    assert tiles_mod.write_tiles_stream(iter(chunks), p) == 60
    sizes = [len(c) for c in tiles_mod.iter_tiles(p, chunk=16)]
    assert sizes == [16, 16, 16, 12]
    assert _read(p) == tiles_mod.sample_tiles(regions, eco, 60, 2, seed=1)
    lines = p.read_text().splitlines()
    assert len(lines) == 62  # header, one feature a line, footer
    lines[5] = lines[5][:40]  # a damaged line names the file and the line
    p.write_text("\n".join(lines))
    with pytest.raises(tiles_mod.TilesError, match=r"t\.geojson: line 6"):
        _read(p)


def test_tile_states_are_compact_and_match_the_dicts(tmp_path):
    regions, _ = tiles_mod.load_regions_split(tiles_mod.DEFAULT_REGIONS)
    eco = tiles_mod.eco_region_index(regions)
    tiles = tiles_mod.sample_tiles(regions, eco, 6, 0, tile_size_m=200.0, seed=2)
    source = SyntheticSource(seed=2, eco_index=eco, no_data_rate=0.3)
    outcomes = [stacks.fetch_tile(t, source, tmp_path) for t in tiles[:5]]  # the last one stays missing
    assert {o.status for o in outcomes} == {"fetched", "no_data"}
    table, counts = stacks.decide_states([tiles[:2], tiles[2:4], tiles[4:]], source, tmp_path)
    states, entries = table.as_dicts()
    assert list(states) == [t.tile_id for t in tiles] and states[tiles[5].tile_id] == "missing"
    for o in outcomes:
        assert entries[o.tile_id] == table[o.tile_id] == o.entry._replace(mtime_ns=entries[o.tile_id].mtime_ns)
    assert table.count("done") + table.count("no_data") == 5 and counts["full checks"] == 6
    # per tile: a state byte, key, size, mtime and digest, and the id: about 100 B, no Python object
    per_tile = sum(a.itemsize for a in (table.ids, table.state, table.key, table.size, table.mtime_ns, table.digest))
    assert per_tile <= 120 and isinstance(table.state, np.ndarray)
    # the index is rewritten in file order and read back as arrays
    again, counts = stacks.decide_states([tiles], source, tmp_path)
    assert counts["full checks"] == 1 and again.as_dicts() == (states, entries)
    with pytest.raises(KeyError):
        table[tiles[5].tile_id]


def test_fetch_batches_read_the_tiles_file_lazily_within_the_window(tmp_path, monkeypatch):
    """The flow's fetch batches come from the tiles file as the window asks: with a
    window of 2 batches of 3, at most 2 x 3 tiles (+ one chunk read ahead) exist at once."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks.multimodal.run import fetch_batches
    from tasks.common.window import run_windowed

    regions, _ = tiles_mod.load_regions_split(tiles_mod.DEFAULT_REGIONS)
    eco = tiles_mod.eco_region_index(regions)
    p = tmp_path / "t.geojson"
    tiles_mod.write_tiles_stream(tiles_mod.iter_sample_tiles(regions, eco, 40, 0, seed=1), p)
    read = [0]
    real = tiles_mod.iter_tiles

    def counting(path, chunk=4):
        for c in real(path, chunk=4):
            read[0] += len(c)
            yield c

    monkeypatch.setattr(tiles_mod, "iter_tiles", counting)
    table = stacks.TileStates(np.array([b"x%d" % i for i in range(40)]))
    table.state[::5] = 1  # every fifth tile is done: not fetched
    in_flight, peak_in_flight, read_at_submit, got = [0], [0], [], []

    def submit(item):
        in_flight[0] += len(item[1])
        peak_in_flight[0] = max(peak_in_flight[0], in_flight[0])
        read_at_submit.append(read[0])
        return pool.submit(lambda: None)

    def on_done(item, fut):
        in_flight[0] -= len(item[1])
        got.extend(item[0])

    with ThreadPoolExecutor(2) as pool:
        stats = run_windowed(submit, fetch_batches(p, table, 3), 2, on_done)
    assert sorted(got) == [i for i in range(40) if i % 5] and stats.submitted == 11
    assert stats.max_in_flight <= 2 and peak_in_flight[0] <= 6 and read[0] == 40
    assert read_at_submit[0] == 4, "the first batch goes out after one chunk of the file, not all of it"
