"""Benchmark: the flow process's per-tile work on a rerun with everything done, at N tiles.

What the multimodal flow does before it fetches anything, on the real code path,
without fetching N stacks first: sample N tiles and write the tiles GeoJSON
(streamed), then decide what to fetch (``stacks.decide_states`` over the tiles
read back in chunks: per tile a Grid, a fetch key, an index lookup, one
``stat`` and a read of its JSON), rewrite the stacks index, and build every partition's key (what the
h5 manifest check needs). The "done" stacks are zero-byte files whose index
lines match them (size, mtime, fetch key), so the decision vouches for each
tile exactly as it does for real stacks: the one ``stat`` is the same call.

Reports the wall and CPU time of each step per tile and the peak of Python
allocations (tracemalloc) during the decision, i.e. what the flow process holds
per tile.

    nice -n 10 python bench/bench_rerun_decision.py --tiles 100000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import cpu_seconds  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=100000)
    ap.add_argument("--part-size", type=int, default=500)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from tasks.multimodal import convert, stacks, tiles as tiles_mod
    from tasks.multimodal.layout import DatasetLayout
    from tasks.multimodal.sources.synthetic import SyntheticSource
    from tasks.multimodal.tile import Grid

    out = Path(args.out or tempfile.mkdtemp(prefix="bench_decide_"))
    shutil.rmtree(out, ignore_errors=True)
    layout = DatasetLayout(out, "data_bench")
    for p in (layout.stacks, layout.tile_info_dir, layout.parts):
        p.mkdir(parents=True)
    regions, _ = tiles_mod.load_regions_split(tiles_mod.DEFAULT_REGIONS)
    eco = tiles_mod.eco_region_index(regions)
    source = SyntheticSource(eco_index=eco)
    tiles_path = layout.tiles_geojson
    n = args.tiles
    rows: dict[str, tuple[float, float]] = {}

    t0, c0 = time.perf_counter(), cpu_seconds()
    tiles_mod.write_tiles_stream(tiles_mod.iter_sample_tiles(regions, eco, n, 0, tile_size_m=100.0), tiles_path)
    rows["sample + write tiles GeoJSON"] = (time.perf_counter() - t0, cpu_seconds() - c0)

    # the finished state a first run leaves: a stack per tile, its JSON (about the 0.9 KB of a
    # real one; the decision reads it) and its index line
    t0 = time.perf_counter()
    info = {"S2_DATE": "2019-06-01", "S2_type": "l2a", "CRS": "EPSG:32633", "biome": 7, "eco_region": 412,
            "NO_DATA": False, "SOURCE": "synthetic", "S2_IMAGEID": "COPERNICUS/S2_SR_HARMONIZED/" + "x" * 38,
            "BANDS": {"sentinel2": ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12",
                                    "QA60", "MSK_CLDPRB", "SCL"], "sentinel1_asc": ["VV", "VH"],
                      "sentinel1_desc": None, "aster": ["elevation", "slope"], "era5": [f"b{i}" for i in range(12)],
                      "dynamic_world": ["label"], "canopy_height_eth": ["height", "std"], "esa_worldcover": ["Map"]},
            "era5": {"month1": [280.1, 275.2, 285.3, 0.05], "month2": [281.1, 276.2, 286.3, 0.06],
                     "year": [279.1, 260.2, 295.3, 0.75]},
            "STACK": {"blake2b": "0" * 32, "bytes": 0, "crs": "EPSG:32633", "transform": [10.0, 0, 0, 0, -10.0, 0],
                      "size": [130, 130]}}
    with open(layout.stacks_index, "w") as fh:
        for chunk in tiles_mod.iter_tiles(tiles_path):
            for t in chunk:
                tif = layout.stack(t.tile_id)
                tif.touch()
                st = tif.stat()
                key = stacks.fetch_key(source, t, Grid.for_tile(t))
                layout.tile_json(t.tile_id).write_text(
                    json.dumps({**info, "lat": t.lat, "lon": t.lon, "FETCH_KEY": key}))
                fh.write(json.dumps({"id": t.tile_id, "state": "done", "key": key, "bytes": st.st_size,
                                     "mtime_ns": st.st_mtime_ns, "digest": "0" * 32}) + "\n")
    setup = time.perf_counter() - t0

    t0, c0 = time.perf_counter(), cpu_seconds()
    table, counts = stacks.decide_states(tiles_mod.iter_tiles(tiles_path), source, out)
    rows["decide (index + stat + JSON read per tile, index rewritten)"] = (time.perf_counter() - t0, cpu_seconds() - c0)
    assert counts["full checks"] == 0 and table.count("done") == n, counts
    del table
    tracemalloc.start()  # a second decision, for its memory only (tracemalloc slows Python down)
    table, counts = stacks.decide_states(tiles_mod.iter_tiles(tiles_path), source, out)
    decide_peak = tracemalloc.get_traced_memory()[1]
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert counts["full checks"] == 0 and table.count("done") == n, counts

    from tasks.multimodal.run import partitions
    from tasks.multimodal.config import MultimodalConfig

    cfg = MultimodalConfig(name="data_bench", part_size=args.part_size, tile_size_m=100.0, image_size=8)
    t0, c0 = time.perf_counter(), cpu_seconds()
    keys = [s.key for s in partitions(table, cfg.part_size, cfg.image_size, convert.Compression())]
    rows["partition keys (manifest check)"] = (time.perf_counter() - t0, cpu_seconds() - c0)
    t0, c0 = time.perf_counter(), cpu_seconds()
    n_map = sum(len(c) for c in tiles_mod.iter_tiles(tiles_path))
    rows["one pass over the tiles file"] = (time.perf_counter() - t0, cpu_seconds() - c0)
    assert n_map == n and len(keys) == -(-n // args.part_size)

    print(f"N={n} tiles (setup of {n} stacks and index lines: {setup:.1f}s)")
    for k, (wall, cpu) in rows.items():
        print(f"  {k:<48} wall {wall:7.2f}s  CPU {cpu:7.2f}s  ({1e3 * cpu / n:.3f} ms/tile)")
    print(f"  decision: peak Python allocations {decide_peak / 1e6:.1f} MB ({decide_peak / n:.0f} B/tile), "
          f"held after it {held / 1e6:.1f} MB ({held / n:.0f} B/tile)")
    print(f"  files: tiles GeoJSON {tiles_path.stat().st_size / 1e6:.1f} MB, "
          f"stacks index {os.path.getsize(layout.stacks_index) / 1e6:.1f} MB")
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
