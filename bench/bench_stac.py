"""Benchmark: the STAC source's fetch against the tests' loopback STAC API + COG server
(tests/fake_stac.py) with an added latency per HTTP request.

Fetches every tile with ``--threads`` threads, at most ``--slots`` requests in flight
(the Prefect request limit stood in for by a semaphore, so the figure is the source's own,
without Prefect or Dask), and reports tiles/s, HTTP requests and bytes read per tile, the
most requests seen in flight by the server, and the bound the latency model gives:
``slots / (requests per tile x latency)`` (every request holds a slot for about one
latency; the client's CPU per tile is reported too, the other bound:
``cores / cpu per tile``).

    python bench/bench_stac.py                               # 8 tiles, 50 ms, 8 threads, 8 slots
    python bench/bench_stac.py --tiles 16 --latency 0.1 --threads 16 --slots 16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=8)
    ap.add_argument("--latency", type=float, default=0.05, help="seconds added to every HTTP request")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--slots", type=int, default=8, help="requests in flight at most (the request limit)")
    ap.add_argument("--tile-m", type=float, default=1280.0, help="tile side (m): 1280 = 128 px")
    args = ap.parse_args(argv)

    from bench.benchlib import cpu_seconds
    from tasks.multimodal import tiles as tiles_mod
    from tasks.multimodal.sources import stac as st
    from tasks.multimodal.tile import Grid
    from tests.fake_stac import FakeStac

    regions = tiles_mod.load_regions(tiles_mod.DEFAULT_REGIONS)
    tiles = tiles_mod.sample_tiles(regions, tiles_mod.eco_region_index(regions), args.tiles, 0, tile_size_m=args.tile_m)
    sem = threading.Semaphore(args.slots)

    @contextlib.contextmanager
    def request_slot():
        with sem:
            yield

    with tempfile.TemporaryDirectory() as tmp, FakeStac(tiles, Path(tmp)) as fake:
        src = st.StacSource(api_url=fake.url)
        src._request_slot = request_slot
        src.check()  # the landing page, outside the timing
        fake.latency_s = args.latency
        fake.reads.clear()
        fake.searches.clear()
        done, failed = [0], []

        def one(t):
            try:
                src.fetch(t, Grid.for_tile(t))
                done[0] += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported
                failed.append(f"{t.tile_id}: {exc}")

        c0, t0 = cpu_seconds(), time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(one, tiles))
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        n = max(done[0], 1)
        requests = len(fake.reads) + len(fake.searches)
        per_tile = requests / n
        result = {
            "tiles": args.tiles, "fetched": done[0], "failed": failed[:3], "latency_s": args.latency,
            "threads": args.threads, "slots": args.slots, "tile_px": int(args.tile_m / 10),
            "wall_s": round(wall, 2), "tiles_per_s": round(done[0] / wall, 3),
            "requests_per_tile": round(per_tile, 1), "searches_per_tile": round(len(fake.searches) / n, 1),
            "bytes_per_tile": int(sum(fake.bytes_by_file().values()) / n),
            "max_in_flight": fake.max_in_flight, "whole_file_reads": len(fake.whole_file_reads()),
            "client_cpu_s_per_tile": round(cpu / n, 3),
            "latency_bound_tiles_per_s": round(args.slots / (per_tile * args.latency), 3) if args.latency else None,
        }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
