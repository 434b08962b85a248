"""Benchmark: client-side CPU of the Earth Engine source per tile.

Two parts, both in process CPU time (other load on the machine counts little):

1. The pieces before and after the requests: the original's draws (seed from the
   geodesic centroid, year, product, the randint(0, n-1) table for n = 1..1024); the
   ``computeValue`` expression built + serialized the plain way, and the same JSON from
   the per-combination template (:func:`metadata_request`); decoding a 130 x 130 x 24 NPY
   answer under the lock. The client is initialised against the tests' fake.
2. ``--fetch`` (default on): the whole ``EarthEngineSource.fetch`` of each tile, both
   requests through the real earthengine-api client (googleapiclient, requests, JSON),
   against the fake running in its own process (so its CPU is not counted), one tile
   after another, without Prefect slots: everything the client spends per tile.

    python bench/bench_ee_client.py                 # 100 tiles
    python bench/bench_ee_client.py --tiles 300 --no-fetch
    python bench/bench_ee_client.py --code /tmp/old-checkout   # the same bench on other code
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=100)
    ap.add_argument("--fetch", action=argparse.BooleanOptionalAction, default=True,
                    help="also time whole fetches against the fake in its own process")
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose tasks/ is measured (default: this one)")
    args = ap.parse_args()
    sys.path.insert(0, str(args.code))
    sys.path.insert(1, str(ROOT))

    import ee
    import numpy as np

    import tasks.multimodal.sources.earthengine as ee_mod
    from tasks.multimodal import tiles as tiles_mod
    from tests.fake_ee import FakeEarthEngine, initialize_ee

    print(f"code: {Path(ee_mod.__file__).resolve()}")
    regions = tiles_mod.load_regions(tiles_mod.DEFAULT_REGIONS)
    tiles = tiles_mod.sample_tiles(regions, tiles_mod.eco_region_index(regions), args.tiles + 2, 0)
    templated = hasattr(ee_mod, "metadata_request")
    with FakeEarthEngine() as fake:
        initialize_ee(fake)
        ee_mod.metadata_expression(tiles[0], ee_mod.choose(tiles[0]))  # warm-up: the client's algorithm table
        t0 = time.process_time()
        chs = [ee_mod.choose(t) for t in tiles]
        t1 = time.process_time()
        sizes = [len(ee.serializer.toJSON(ee_mod.metadata_expression(t, ch), for_cloud_api=True))
                 for t, ch in zip(tiles, chs)]
        t2 = time.process_time()
        if templated:
            for t, ch in zip(tiles, chs):
                ee_mod.metadata_request(t, ch)
        t3 = time.process_time()
    buf = io.BytesIO()
    np.save(buf, np.zeros((130, 130), dtype=[(f"b{i}", "<f4") for i in range(24)]))
    raw = buf.getvalue()
    t4 = time.process_time()
    for _ in tiles:
        ee_mod.decode_npy(raw)
    t5 = time.process_time()
    n = len(tiles)
    print(f"{n} tiles; per tile CPU: draws (centroid, seed, year, product, index table) {(t1 - t0) / n * 1e3:.2f} ms, "
          f"metadata expression build + serialize {(t2 - t1) / n * 1e3:.2f} ms "
          f"(JSON {sum(sizes) / n / 1024:.1f} KiB), "
          + (f"the same JSON from the template {(t3 - t2) / n * 1e3:.2f} ms (templates built included), "
             if templated else "")
          + f"NPY decode under the lock {(t5 - t4) / n * 1e3:.2f} ms")
    if args.fetch:
        fetch_cpu(ee_mod, tiles)
    return 0


def fetch_cpu(ee_mod, tiles) -> None:
    """Whole fetches against a fake in its own process; client CPU per tile."""
    import ee

    ee_mod.slot = lambda *a, **k: contextlib.nullcontext()  # no Prefect here: requests hold no slot
    proc = subprocess.Popen([sys.executable, "-m", "tests.fake_ee"], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        ee.Reset()
        ee_mod._initialized.clear()
        src = ee_mod.EarthEngineSource(project=info["project"], credentials=info["service_account_info"],
                                       url=info["url"])
        for t in tiles[:2]:  # initialisation (token, discovery document) is not per tile
            src.fetch(t, None)
        body = tiles[2:]
        c0, w0 = time.process_time(), time.perf_counter()
        no_data = 0
        for t in body:
            try:
                src.fetch(t, None)
            except ee_mod.NoDataError:
                no_data += 1
        c1, w1 = time.process_time(), time.perf_counter()
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    n = len(body)
    print(f"whole fetch, {n} tiles ({no_data} no data), fake in its own process: client CPU "
          f"{(c1 - c0) / n * 1e3:.1f} ms per tile (wall {(w1 - w0) / n * 1e3:.0f} ms per tile, one at a time)")


if __name__ == "__main__":
    sys.exit(main())
