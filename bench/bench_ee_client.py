"""Benchmark: client-side CPU of the Earth Engine source per tile, outside the requests.

Times (process CPU time, so other load on the machine counts little) what the
source does per tile before its metadata request: the original's draws
(seed from the geodesic centroid, year, product, the randint(0, n-1) table for
n = 1..1024) and building + serializing the ``computeValue`` expression; and
decoding a 130 x 130 x 24 NPY answer under the lock. The client is initialised
against the tests' fake (no request is timed).

    python bench/bench_ee_client.py                 # 300 tiles
    python bench/bench_ee_client.py --tiles 1000
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=300)
    args = ap.parse_args()

    import ee
    import numpy as np

    from tasks.multimodal import tiles as tiles_mod
    from tasks.multimodal.sources.earthengine import choose, decode_npy, metadata_expression
    from tests.fake_ee import FakeEarthEngine, initialize_ee

    regions = tiles_mod.load_regions(tiles_mod.DEFAULT_REGIONS)
    tiles = tiles_mod.sample_tiles(regions, tiles_mod.eco_region_index(regions), args.tiles, 0)
    with FakeEarthEngine() as fake:
        initialize_ee(fake)
        metadata_expression(tiles[0], choose(tiles[0]))  # warm-up: the client's algorithm table
        t0 = time.process_time()
        chs = [choose(t) for t in tiles]
        t1 = time.process_time()
        sizes = [len(ee.serializer.toJSON(metadata_expression(t, ch), for_cloud_api=True))
                 for t, ch in zip(tiles, chs)]
        t2 = time.process_time()
    buf = io.BytesIO()
    np.save(buf, np.zeros((130, 130), dtype=[(f"b{i}", "<f4") for i in range(24)]))
    raw = buf.getvalue()
    t3 = time.process_time()
    for _ in tiles:
        decode_npy(raw)
    t4 = time.process_time()
    n = len(tiles)
    print(f"{n} tiles; per tile CPU: draws (centroid, seed, year, product, index table) {(t1 - t0) / n * 1e3:.2f} ms, "
          f"metadata expression build + serialize {(t2 - t1) / n * 1e3:.2f} ms "
          f"(JSON {sum(sizes) / n / 1024:.1f} KiB), NPY decode under the lock {(t4 - t3) / n * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
