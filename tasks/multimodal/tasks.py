"""Prefect task wrappers of the multimodal stages: retries, tags, logging; no logic.

The fetch's retry policy is set in one place, :func:`fetch_task`, from the configuration.

The plain functions they call are tested without Prefect.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.multimodal import convert, stacks
from tasks.multimodal.sources.base import Source, Tile


@task(name="fetch-stacks", cache_policy=NO_CACHE, tags=["multimodal", "fetch"])
def fetch_batch_task(tiles: list[Tile], source: Source, out_dir: str, compress: str | None = None,
                     threads: int = 1, slots: int | None = None) -> list[stacks.TileOutcome]:
    """Fetch a batch of tiles. Tiles failing transiently raise, so Prefect retries the
    batch (exponential backoff with jitter); tiles already written or recorded as
    no-data are skipped on the retry, so only the failed ones are fetched again."""
    logger = get_run_logger()
    last = [time.monotonic()]

    def progress(done: int, total: int) -> None:  # a line every 30 s inside long batches
        now = time.monotonic()
        if now - last[0] >= 30 and done < total:
            last[0] = now
            logger.info("batch progress: %d/%d tiles", done, total)

    outcomes = stacks.fetch_batch(tiles, source, Path(out_dir), compress, threads, slots, progress)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
        if o.status in ("failed", "no_data"):
            logger.warning("tile %s: %s (%s)", o.tile_id, o.status, o.reason)
    logger.info("batch of %d tiles: %s", len(tiles), counts)
    return outcomes


def fetch_task(retries: int, first_delay_s: float):
    """:func:`fetch_batch_task` with the fetch's retry policy (the one place it is set):
    ``retries`` retries of a batch whose tiles failed transiently, the first after
    ``first_delay_s`` seconds, doubling each time, with 50 % jitter."""
    return fetch_batch_task.with_options(
        retries=retries, retry_jitter_factor=0.5,
        retry_delay_seconds=[first_delay_s * 2**i for i in range(max(retries, 1))])


@task(name="pack-partition", cache_policy=NO_CACHE, tags=["multimodal", "pack"], retries=1)
def pack_partition_task(spec: convert.PartSpec, tiles_dir: str, tile_info: Any, parts_dir: str,
                        image_size: int, compression: convert.Compression,
                        defer_on_mismatch: bool = False) -> convert.PartResult:
    """``tile_info``: a ``stacks.TileInfoDir`` (the worker reads its tiles' JSONs) or a dict."""
    logger = get_run_logger()
    res = convert.pack_partition(spec, tiles_dir, tile_info, parts_dir, image_size, compression, defer_on_mismatch)
    logger.info("part %d: %d rows%s, %d problem(s)", spec.index, res.n_rows,
                " (re-used)" if res.reused else "", len(res.problems))
    for tid, reason in res.integrity.items():
        logger.warning("tile %s: stack is not the one written (%s)", tid, reason)
    return res


@task(name="assemble-h5", cache_policy=NO_CACHE, tags=["multimodal", "write"])
def assemble_h5_task(parts: list[convert.PartResult], h5_path: str, image_size: int,
                     compression: convert.Compression, attrs: dict[str, Any] | None = None) -> int:
    logger = get_run_logger()
    n = convert.assemble_h5(parts, h5_path, image_size, compression, attrs)
    logger.info("wrote %s with %d rows", h5_path, n)
    return n
