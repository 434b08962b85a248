"""Stacks stage: for each tile, ask a :class:`Source` for its stack and write it.

Layout under the dataset folder ``NAME/``:

* ``tiles/<tile_id>.tif`` - the stack (written atomically by ``write_stack``)
* ``work/tile_info/<tile_id>.json`` - the tile's tile_info entry plus
  ``FETCH_KEY``, written after the stack. A tile counts as done only when the
  JSON exists with the current fetch key and the GeoTIFF is complete and
  matches the bands it declares (or the JSON says ``NO_DATA``, a permanent
  outcome). Anything else is fetched again, so a crash at any point leaves
  nothing a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window

from tasks.common.atomic import write_json_atomic
from tasks.multimodal import schema
from tasks.multimodal.sources.base import Grid, NoDataError, Source, Tile, TransientSourceError, write_stack

log = logging.getLogger(__name__)


@dataclass
class TileOutcome:
    tile_id: str
    status: str  # "fetched", "skipped" (already done), "no_data", "failed", "transient"
    reason: str = ""


class TransientTilesError(Exception):
    """Some tiles of a batch failed transiently; raising it makes Prefect retry the batch
    (tiles already written are skipped on the retry)."""

    def __init__(self, outcomes: list[TileOutcome]):
        self.outcomes = outcomes
        sample = "; ".join(f"{o.tile_id}: {o.reason}" for o in outcomes[:3])
        super().__init__(f"{len(outcomes)} tile(s) failed transiently ({sample})")


def dataset_paths(out_dir: Path) -> dict[str, Path]:
    return {
        "tiles": out_dir / "tiles",
        "tile_info": out_dir / "work" / "tile_info",
        "parts": out_dir / "work" / "parts",
    }


def fetch_key(source: Source, tile: Tile, grid: Grid) -> str:
    """What a tile's stack depends on: the source and its settings, the tile, the grid."""
    blob = json.dumps(
        [source.name, source.cache_key(), tile.tile_id, tile.geometry,
         tile.biome, tile.eco_region, grid.crs, list(grid.transform)[:6], grid.size],
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def stack_is_complete(tif: Path, bands: dict[str, Any], size: int | None = None) -> str | None:
    """Return None if ``tif`` is a complete stack declaring ``bands``, else the reason."""
    expected = schema.stack_band_descriptions(bands)
    try:
        with rasterio.open(tif) as src:
            if src.count != len(expected):
                return f"has {src.count} bands, tile_info declares {len(expected)}"
            if any(src.descriptions) and list(src.descriptions) != expected:
                return "band names differ from tile_info BANDS"
            if size is not None and (src.width, src.height) != (size, size):
                return f"is {src.width}x{src.height}, expected {size}x{size}"
            # reading the last row of the last band detects a truncated file
            src.read(src.count, window=Window(0, src.height - 1, src.width, 1))
    except (RasterioError, OSError) as exc:
        return f"unreadable ({exc})"
    return None


def tile_state(tile: Tile, key: str, paths: dict[str, Path], size: int | None) -> str | None:
    """'done' / 'no_data' if the tile needs no fetching, else None."""
    meta = paths["tile_info"] / f"{tile.tile_id}.json"
    try:
        info = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("FETCH_KEY") != key:
        return None
    if info.get("NO_DATA"):
        return "no_data"
    if stack_is_complete(paths["tiles"] / f"{tile.tile_id}.tif", info.get("BANDS") or {}, size) is None:
        return "done"
    return None


def fetch_tile(tile: Tile, source: Source, out_dir: Path, compress: str | None = None,
               force: bool = False) -> TileOutcome:
    """Fetch one tile unless it is already done. Never raises for a tile's own failure."""
    paths = dataset_paths(out_dir)
    schema.check_tile_id(tile.tile_id)
    grid = Grid.for_tile(tile)
    key = fetch_key(source, tile, grid)
    if not force:
        state = tile_state(tile, key, paths, grid.size)
        if state == "done":
            return TileOutcome(tile.tile_id, "skipped")
        if state == "no_data":
            return TileOutcome(tile.tile_id, "no_data", "recorded earlier as no data")
    meta = paths["tile_info"] / f"{tile.tile_id}.json"
    try:
        stack = source.fetch(tile, grid)
    except NoDataError as exc:
        info = {
            "NO_DATA": True, "NO_DATA_REASON": exc.reason, "lat": tile.lat, "lon": tile.lon,
            "SOURCE": source.name, "FETCH_KEY": key,
        }
        write_json_atomic(meta, info)
        return TileOutcome(tile.tile_id, "no_data", exc.reason)
    except TransientSourceError as exc:
        return TileOutcome(tile.tile_id, "transient", exc.reason)
    except Exception as exc:  # one bad tile never sinks the batch
        log.exception("tile %s failed", tile.tile_id)
        return TileOutcome(tile.tile_id, "failed", f"{type(exc).__name__}: {exc}")
    write_stack(paths["tiles"] / f"{tile.tile_id}.tif", stack, compress=compress)
    write_json_atomic(meta, {**stack.info, "FETCH_KEY": key})
    return TileOutcome(tile.tile_id, "fetched")


def fetch_batch(tiles: list[Tile], source: Source, out_dir: Path, compress: str | None = None,
                threads: int = 1, slots: int | None = None, progress=None) -> list[TileOutcome]:
    """Fetch a batch of tiles (``threads`` at a time); raise :class:`TransientTilesError`
    if any failed transiently, after every tile of the batch was tried."""
    threads = max(1, min(threads, len(tiles)))
    done = [0]
    lock = threading.Lock()

    def one(t: Tile) -> TileOutcome:
        o = fetch_tile(t, source, out_dir, compress)
        if progress is not None:
            with lock:
                done[0] += 1
                progress(done[0], len(tiles))
        return o

    with source.session(threads, slots) as bind:
        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fetch", initializer=bind) as pool:
                outcomes = list(pool.map(one, tiles))
        else:
            bind()
            outcomes = [one(t) for t in tiles]
    transient = [o for o in outcomes if o.status == "transient"]
    if transient:
        raise TransientTilesError(transient)
    return outcomes


def scan_tiles(tiles: list[Tile], source: Source, out_dir: Path) -> dict[str, str]:
    """State of every tile on disk: 'done', 'no_data' or 'missing'."""
    paths = dataset_paths(out_dir)
    out: dict[str, str] = {}
    for t in tiles:
        grid = Grid.for_tile(t)
        out[t.tile_id] = tile_state(t, fetch_key(source, t, grid), paths, grid.size) or "missing"
    return out


def load_tile_info(tile_ids: list[str], out_dir: Path) -> dict[str, dict[str, Any]]:
    """Merge the per-tile JSON files into the tile_info dict (fetch bookkeeping removed)."""
    folder = dataset_paths(out_dir)["tile_info"]
    merged: dict[str, dict[str, Any]] = {}
    for tid in tile_ids:
        try:
            info = json.loads((folder / f"{tid}.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        info.pop("FETCH_KEY", None)
        merged[tid] = info
    return merged
