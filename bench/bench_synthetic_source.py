"""Per-tile cost of the synthetic source's fetch (the embedded default's data).

    python bench/bench_synthetic_source.py [--tiles 50]
"""

from __future__ import annotations

import argparse
import math
import time

from tasks.multimodal import schema
from tasks.multimodal.sources.base import Grid, Tile
from tasks.multimodal.sources.synthetic import SyntheticSource


def square(tile_id: str, biome: str, lon: float, lat: float) -> Tile:
    dlat = 650.0 / 111_320.0
    dlon = dlat / max(math.cos(math.radians(lat)), 0.05)
    ring = [[lon - dlon, lat - dlat], [lon + dlon, lat - dlat], [lon + dlon, lat + dlat],
            [lon - dlon, lat + dlat], [lon - dlon, lat - dlat]]
    return Tile(tile_id=tile_id, biome=biome, eco_region="x", lon=lon, lat=lat,
                geometry={"type": "Polygon", "coordinates": [ring]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiles", type=int, default=50)
    n = ap.parse_args().tiles
    src = SyntheticSource(seed=0)
    tiles = [square(f"tm{i}", schema.BIOMES[i % schema.N_BIOMES], -120.0 + 240.0 * i / n, -60.0 + 120.0 * i / n)
             for i in range(n)]
    grids = [Grid.for_tile(t) for t in tiles]
    start = time.perf_counter()
    for tile, grid in zip(tiles, grids):
        src.fetch(tile, grid)
    per_tile_ms = (time.perf_counter() - start) / n * 1000.0
    print(f"synthetic fetch: {per_tile_ms:.2f} ms per {grids[0].size}x{grids[0].size} tile ({n} tiles)")


if __name__ == "__main__":
    main()
