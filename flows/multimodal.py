"""MMEarth multimodal dataset flow.

Stages: sample tiles -> fetch a stack per tile -> pack partitions (parallel:
read, convert, compress, statistics) -> assemble NAME.h5 (one writer) ->
band statistics, splits, tile_info -> report.

Local run on the embedded default (synthetic source, shipped regions)::

    python -m flows.multimodal
    python -m flows.multimodal --config mmearth64 --set n_tiles=500
"""

from __future__ import annotations

import contextvars
import json
import queue
import re
import resource
import sys
import threading
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
from prefect import flow, get_run_logger

from tasks.common.atomic import remove_partials, write_bytes_atomic
from tasks.common.concurrency import ensure_limit
from tasks.common.progress import Progress
from tasks.common.report import RunFailed, RunReport, tiles_map_png
from tasks.common.cli import parse_config
from tasks.common.runlock import exclusive_output
from tasks.common.runtime import make_task_runner, run_local
from tasks.common.window import RunCancelled, is_cancellation, run_windowed
from tasks.multimodal import convert, stacks, tiles as tiles_mod
from tasks.multimodal.contact_sheet import contact_sheet_png
from tasks.multimodal.config import CONFIGS, MultimodalConfig
from tasks.multimodal.select_tiles import select_tiles
from tasks.multimodal.sources import make_source
from tasks.multimodal.tile import Grid, Tile
from tasks.multimodal.tasks import assemble_h5_task, fetch_batch_task, pack_partition_task


def _batches(tiles_path: Path, table: stacks.TileStates, size: int, only=None) -> Iterator[tuple[list[int], list[Tile]]]:
    """Fetch batches (positions, tiles) of the tiles still missing, read from the tiles
    file in chunks as the window asks for them; ``only``: a set of tile ids to restrict to."""
    pos, tiles = [], []
    offset = 0
    for chunk in tiles_mod.iter_tiles(tiles_path):
        for i, t in enumerate(chunk, start=offset):
            if table.state[i] == 0 and (only is None or t.tile_id in only):
                pos.append(i)
                tiles.append(t)
                if len(tiles) >= size:
                    yield pos, tiles
                    pos, tiles = [], []
        offset += len(chunk)
    if tiles:
        yield pos, tiles


#: report.json count of the "429 Too many requests" answers the fetch met (Earth Engine)
RATE_LIMITED = "429 answers (too many requests)"


def _fetch(config: MultimodalConfig, source, out: Path, tiles_path: Path, table: stacks.TileStates,
           failed: dict[int, str], stage: str = "stacks", only=None, on_settled=None,
           report: RunReport | None = None) -> int:
    """Fetch the missing tiles in batch tasks, at most ``config.tasks_in_flight`` at once;
    stream each batch's outcomes into ``table`` and the stacks index, and the reasons of
    the tiles that failed into ``failed`` (by position); ``on_settled(positions)`` is
    called with each finished batch's positions; the 429 answers the tiles met are added
    to ``report.counts[RATE_LIMITED]`` when it has that count. Returns how many tiles got a
    permanent outcome (stack or no-data) this time."""
    logger = get_run_logger()
    fetch = fetch_batch_task.with_options(
        retries=config.fetch_retries, retry_jitter_factor=0.5,
        retry_delay_seconds=[config.fetch_retry_delay_s * 2**i for i in range(max(config.fetch_retries, 1))])
    index = stacks.StackIndex(out)
    paths = stacks.dataset_paths(out)
    todo = table.count("missing") if only is None else len(only)
    progress = Progress(stage, todo, "tiles", logger=logger)
    finished = [0]

    def submit(item: tuple[list[int], list[Tile]]):
        return fetch.submit(item[1], source, str(out), config.stack_compress, config.fetch_threads, config.fetch_slots)

    def on_done(item: tuple[list[int], list[Tile]], fut) -> None:
        positions, batch = item
        try:
            outcomes = fut.result()
        except Exception as exc:  # retries exhausted: what the batch did write still counts
            if is_cancellation(exc):  # the run is being cancelled: not this batch's problem
                raise RunCancelled(str(exc)) from exc
            outcomes = []
            for t in batch:
                grid = Grid.for_tile(t)
                e = stacks.tile_check(t, stacks.fetch_key(source, t, grid), paths, grid.size)
                outcomes.append(stacks.TileOutcome(t.tile_id, "checked" if e else "failed",
                                                   f"{type(exc).__name__}: {exc}", entry=e))
        new = []
        for p, o in zip(positions, outcomes):
            if o.entry is not None:
                table.set(p, o.entry)
                failed.pop(p, None)
                new.append((o.tile_id, o.entry))
            else:
                failed[p] = o.reason
        index.append(new)
        finished[0] += len(new)
        if report is not None and RATE_LIMITED in report.counts:
            report.counts[RATE_LIMITED] += sum(o.rate_limited for o in outcomes)
        progress.advance(len(batch))
        if on_settled is not None:
            on_settled(positions)

    with progress:
        stats = run_windowed(submit, _batches(tiles_path, table, config.fetch_batch_size, only),
                             config.tasks_in_flight, on_done, idle=progress.tick)
    logger.debug("%s: %d fetch tasks, at most %d in flight", stage, stats.submitted, stats.max_in_flight)
    return finished[0]


def _part_spec(table: stacks.TileStates, k: int, config: MultimodalConfig,
               compression: convert.Compression) -> convert.PartSpec | None:
    """Partition ``k``: the done tiles among file positions [k*part_size, (k+1)*part_size),
    keyed by their index entries (None when it has none). Fixed by position, a part can
    be packed as soon as its own tiles are settled, while later tiles are still fetched."""
    a = k * config.part_size
    sl = slice(a, min(a + config.part_size, len(table)))
    ids = [i.decode() for i in table.ids[sl][table.state[sl] == 1]]
    if not ids:
        return None
    return convert.PartSpec(k, ids, convert.entries_part_key(ids, table, config.image_size, compression))


def _partitions(table: stacks.TileStates, config: MultimodalConfig,
                compression: convert.Compression) -> Iterator[convert.PartSpec]:
    """Every partition with done tiles, one at a time (the ids of one part in memory)."""
    for k in range(-(-len(table) // config.part_size)):
        spec = _part_spec(table, k, config, compression)
        if spec is not None:
            yield spec


class _Packer:
    """Packs partitions on the Dask workers (bounded window) and keeps their results; a
    part whose stacks are not the ones written is set aside (``redo``) with its tiles'
    reasons (``mismatched``), for they are fetched again and the part packed anew."""

    def __init__(self, config: MultimodalConfig, out: Path, compression: convert.Compression, report: RunReport):
        self.config, self.compression, self.report = config, compression, report
        self.paths = stacks.dataset_paths(out)
        self.info = stacks.TileInfoDir(out)
        self.parts: dict[int, convert.PartResult] = {}
        self.redo: list[convert.PartSpec] = []
        self.mismatched: dict[str, str] = {}
        self.seconds = 0.0

    def run(self, specs, defer: bool, stage: str, total: int) -> None:
        logger = get_run_logger()
        progress = Progress(stage, total, "tiles", logger=logger)
        cfg = self.config

        def submit(spec):
            return pack_partition_task.submit(spec, str(self.paths["tiles"]), self.info, str(self.paths["parts"]),
                                              cfg.image_size, self.compression, defer)

        def on_done(spec, fut) -> None:
            try:
                res = fut.result()
            except Exception as exc:  # the part's tiles are reported, the rest goes on
                if is_cancellation(exc):  # the run is being cancelled: not these tiles' problem
                    raise RunCancelled(str(exc)) from exc
                for tid in spec.tile_ids:
                    self.report.problem(tid, "pack", f"{type(exc).__name__}: {exc}")
                res = None
            if res is not None and res.integrity and not res.path:
                self.mismatched.update(res.integrity)
                self.redo.append(spec)
            elif res is not None:
                self.parts[res.index] = res
            progress.advance(len(spec.tile_ids))

        t0 = time.monotonic()
        with progress:
            run_windowed(submit, specs, cfg.tasks_in_flight, on_done, idle=progress.tick)
        self.seconds += time.monotonic() - t0


def _fetch_and_pack(config: MultimodalConfig, source, out: Path, tiles_path: Path, table: stacks.TileStates,
                    failed: dict[int, str], packer: _Packer) -> int:
    """Fetch the missing tiles and, alongside (a second window in a second thread), pack
    each partition as soon as all its tiles are settled, so packing overlaps the fetch.
    Returns how many tiles got a permanent outcome this time."""
    P = config.part_size
    n_parts = -(-len(table) // P)
    left = np.bincount(table.positions("missing") // P, minlength=n_parts)  # unsettled tiles per part
    ready: queue.SimpleQueue = queue.SimpleQueue()
    for k in np.flatnonzero(left == 0):
        ready.put(int(k))
    total = table.count("done") + table.count("missing")

    def specs():
        while (k := ready.get()) is not None:
            spec = _part_spec(table, k, config, packer.compression)
            if spec is not None:
                yield spec

    def on_settled(positions: list[int]) -> None:
        for k, n in zip(*np.unique(np.asarray(positions) // P, return_counts=True)):
            left[k] -= n
            if left[k] == 0:
                ready.put(int(k))

    error: list[BaseException] = []

    def pack_thread() -> None:
        try:
            packer.run(specs(), True, "pack", total)
        except BaseException as exc:  # raised again in the flow thread
            error.append(exc)

    ctx = contextvars.copy_context()  # the flow run's context, so tasks can be submitted from the thread
    thread = threading.Thread(target=ctx.run, args=(pack_thread,), name="pack-window", daemon=True)
    thread.start()
    try:
        fetched = _fetch(config, source, out, tiles_path, table, failed, on_settled=on_settled,
                         report=packer.report)
    except BaseException:
        ready.put(None)  # interrupted or failed: packs in flight are abandoned with the run
        thread.join(timeout=5.0)
        raise
    ready.put(None)
    thread.join()
    if error:
        raise error[0]
    return fetched


def _finish_h5(config: MultimodalConfig, packer: _Packer, out: Path, tiles_path: Path, source,
               table: stacks.TileStates, h5_path: Path, report: RunReport) -> tuple[list[dict[str, Any]], int]:
    """Fetch again the tiles whose stack was not the one written and re-pack their parts,
    then write the h5 with one writer. Returns the part summaries and how many tiles
    were fetched again."""
    logger = get_run_logger()
    paths, compression = packer.paths, packer.compression
    refetched = 0
    if packer.mismatched:
        # a stack that is not the one written is treated like a missing one: fetched again
        mismatched = dict(packer.mismatched)
        logger.warning("%d stack(s) differ from what was written; fetching them again", len(mismatched))
        for tid, reason in mismatched.items():
            report.problem(tid, "integrity", f"{reason}; fetched again")
            (paths["tile_info"] / f"{tid}.json").unlink(missing_ok=True)
            table.set(table.pos_of(tid), None)
        failed: dict[int, str] = {}
        refetched = _fetch(config, source, out, tiles_path, table, failed, stage="fetch again", only=set(mismatched),
                           report=report)
        for tid in mismatched:
            p = table.pos_of(tid)
            if table.state_of(p) != "done":
                report.problem(tid, "fetch", failed.get(p, "not fetched again after an integrity mismatch"))
        again = [s for s in (_part_spec(table, spec.index, config, compression) for spec in packer.redo) if s]
        packer.redo.clear()
        packer.run(again, False, "pack again", sum(len(s.tile_ids) for s in again))
    done_parts = [packer.parts[i] for i in sorted(packer.parts)]
    keep = {Path(p.path).name for p in done_parts}
    for stale in paths["parts"].glob("part_*.npz"):
        if stale.name not in keep:
            stale.unlink()
    report.timings["pack"] = packer.seconds
    if not sum(p.n_rows for p in done_parts):  # nothing to write: a good dataset is never replaced by 0 rows
        return [convert.part_summary(p) for p in done_parts], refetched
    t0 = time.monotonic()
    about = source_about(source)
    assemble_h5_task(done_parts, str(h5_path), config.image_size, compression,
                     {"source": about["name"], "synthetic": about["synthetic"], "source_note": about["note"]})
    report.timings["assemble"] = time.monotonic() - t0
    return [convert.part_summary(p) for p in done_parts], refetched


#: the most tile centres drawn on the report's map (every k-th tile beyond that)
MAP_POINTS = 20000


def _map_points(tiles_path: Path, n: int) -> list[tuple[float, float, str]]:
    step = max(1, -(-n // MAP_POINTS))
    pts, i = [], 0
    for chunk in tiles_mod.iter_tiles(tiles_path):
        for t in chunk:
            if i % step == 0:
                pts.append((t.lon, t.lat, t.biome))
            i += 1
    return pts


def _report_unfetched(table: stacks.TileStates, failed: dict[int, str], report: RunReport) -> None:
    """Tiles without a stack, in file order: why (failed) or the source's no-data reason."""
    for p in table.positions("missing", "no_data"):
        if table.state[p] == 0:
            report.problem(table.tile_id(p), "fetch", failed.get(int(p), "stack missing after fetching"))
        else:
            report.problem(table.tile_id(p), "fetch", f"no data: {table.no_data_reason.get(int(p), '')}")


@flow(name="multimodal", task_runner=make_task_runner(settings_from=MultimodalConfig.dask_settings_of),
      log_prints=True)
@exclusive_output(lambda config=None: (config or MultimodalConfig()).dataset_dir, "dataset folder")
def multimodal_flow(config: MultimodalConfig = MultimodalConfig()) -> dict[str, Any]:
    """Build an MMEarth-compatible dataset into ``config.output_dir/config.name``."""
    logger = get_run_logger()
    out = config.dataset_dir
    paths = stacks.dataset_paths(out)
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
    for folder in (out, paths["tiles"], paths["tile_info"], paths["parts"]):
        remove_partials(folder)
    # problems are streamed to a file; report.json keeps the first 1000 and counts by reason
    report = RunReport(title=f"multimodal dataset {config.name}", problems_file=out / "report_problems.jsonl",
                       keep_problems=1000)

    # 1. tiles -------------------------------------------------------------
    t0 = time.monotonic()
    ee = config.source == "earthengine"
    limited = config.source in ("earthengine", "stac")
    if limited:  # every Earth Engine / STAC request of every task holds a slot of this limit
        ensure_limit(config.request_limit_name, config.request_ceiling)

    def source_for(eco_index):
        return make_source(config.source, config.source_options, eco_index,
                           limit_name=config.request_limit_name if limited else None,
                           ceiling=config.request_ceiling if limited else None,
                           rate=config.request_rate if ee else None)

    sampler = source_for(None) if config.tile_sampler == "earthengine" and ee else None
    selection = select_tiles(config, out, sampler)
    source = source_for(selection.eco_index)
    source.check()  # credentials, project: fail before any tile is fetched
    about = source_about(source)
    report.extra["source"] = about
    if about["synthetic"]:
        report.title += " (SYNTHETIC data)"
        report.notes.insert(0, about["note"])
        logger.warning(about["note"])
    report.notes.extend(selection.notes)
    logger.info("%d tiles (%s) -> %s", selection.n_tiles, selection.how, selection.path)
    report.counts["tiles sampled"] = selection.n_tiles
    report.timings["tiles"] = time.monotonic() - t0
    if ee:  # what the service answered "429 Too many requests" (retried; a sign the ceiling or rate is too high)
        report.counts[RATE_LIMITED] = 0

    # 2. stacks: decide from the index, fetch what is missing --------------
    t0 = time.monotonic()
    damaged: dict[str, str] = {}
    table, scan = stacks.decide_states(tiles_mod.iter_tiles(selection.path), source, out, damaged)
    report.timings["scan"] = time.monotonic() - t0
    for tid, reason in damaged.items():  # a damaged stack is treated like a missing one
        report.problem(tid, "integrity", f"{reason}; fetched again")
    logger.info(scan_message(len(table), table.count("missing"), scan, stacks.index_path(out)))
    attempted = table.count("missing")  # tiles this run has to fetch
    failed: dict[int, str] = {}  # reasons of the tiles that failed, by position
    compression = convert.Compression(config.compression_codec, config.compression_level)
    packer = _Packer(config, out, compression, report)
    h5_path, manifest = out / f"{config.name}.h5", out / "work" / "h5_manifest.json"
    if table.count("missing"):  # 3. pack each partition as soon as its tiles are settled
        fetched = _fetch_and_pack(config, source, out, selection.path, table, failed, packer)
        summaries = convert.read_manifest(h5_path, manifest, [s.key for s in _partitions(table, config, compression)])
    else:  # nothing to fetch: the h5 may be up to date as it is
        fetched = 0
        summaries = convert.read_manifest(h5_path, manifest, [s.key for s in _partitions(table, config, compression)])
        if summaries is None:
            packer.run(_partitions(table, config, compression), True, "pack", table.count("done"))
    report.timings["fetch"] = time.monotonic() - t0  # packing overlaps it (timings["pack"]: the packing window)
    t0 = time.monotonic()
    _report_unfetched(table, failed, report)
    del failed
    # 4. assemble the h5 (one writer) --------------------------------------
    if summaries is not None:
        logger.info("%s is up to date (%d parts); not rewritten", h5_path, len(summaries))
    else:
        summaries, refetched = _finish_h5(config, packer, out, selection.path, source, table, h5_path, report)
        fetched += refetched
        if sum(x["n_rows"] for x in summaries):
            convert.write_manifest(h5_path, manifest, summaries)
    if not config.keep_parts:
        for p in paths["parts"].glob("part_*.npz"):
            p.unlink()
    report.counts.update({"stacks done": table.count("done"), "fetched this run": fetched,
                          "no data": table.count("no_data"), "fetch failed": table.count("missing")})
    n_rows = sum(s["n_rows"] for s in summaries)
    for s in summaries:
        for tid, reason in s["problems"].items():
            report.problem(tid, "convert", reason)
    failure = _run_failure(report, attempted, fetched, table, n_rows)
    if n_rows == 0:  # nothing to publish: the dataset's files (a good earlier h5 included) stay as they are
        report.counts["rows in h5"] = 0
        _write_report(config, report, out, selection, table)
        raise RunFailed(failure)

    # 5. statistics, splits, tile_info ------------------------------------
    band_stats, empty = convert.merge_stats(summaries).band_stats()
    for k, channels in empty.items():
        report.notes.append(f"band_stats[{k}] is 0 (mean, std, min, max) for channel(s) {channels}: "
                            "no valid value of this kind")
    splits = convert.make_splits(n_rows, config.split_fractions, config.split_seed)
    tile_info_path = out / f"{config.name}_tile_info.json"
    unreadable: list[str] = []
    rows: set[str] = set()

    def in_h5(tid: str) -> bool:  # built only when a tile's JSON could not be read
        if not rows:
            rows.update(t for x in summaries for t in x["tile_ids"])
        return tid in rows

    try:  # first, for it can refuse: every h5 row needs its tile's entry
        stacks.write_tile_info_json(tile_info_path, table.tile_ids("done", "no_data"), out, unreadable, in_h5)
    except stacks.TileInfoLost as exc:
        for tid in unreadable:
            report.problem(tid, "tile_info", f"{stacks.dataset_paths(out)['tile_info'] / tid}.json unreadable")
        _write_report(config, report, out, selection, table)
        raise RunFailed(str(exc)) from None
    for tid in unreadable:  # not in the h5 (no data, or not converted): reported, never dropped silently
        report.problem(tid, "tile_info", f"{stacks.dataset_paths(out)['tile_info'] / tid}.json unreadable; "
                                         f"left out of {tile_info_path.name}")
    files = convert.write_dataset_jsons(out, config.name, None, band_stats, splits)
    files["tile_info"] = tile_info_path
    report.counts.update({"rows in h5": n_rows, "convert failed": sum(len(s["problems"]) for s in summaries),
                          "train": len(splits["train"]), "val": len(splits["val"]), "test": len(splits["test"])})
    report.outputs.update({"h5": str(h5_path), **{k: str(v) for k, v in files.items()}, "tiles": str(selection.path)})
    report.timings["pack, write, statistics"] = time.monotonic() - t0

    report.extra["memory"] = memory_held(table, summaries)

    # 6. report (the map shows at most MAP_POINTS tiles) ------------------
    _write_report(config, report, out, selection, table)
    logger.info("dataset %s: %s", out, json.dumps(report.counts))
    if failure:
        raise RunFailed(failure)
    return {"dataset_dir": str(out), **report.to_dict()}


#: how Python words a full disk or quota in an OSError's text (errno 28 ENOSPC, 122 EDQUOT)
_DISK_FULL = re.compile(r"\[Errno (28|122)\]|No space left on device|Disk quota exceeded")


def _run_failure(report: RunReport, attempted: int, fetched: int, table: stacks.TileStates,
                 n_rows: int) -> str | None:
    """Why the run must exit non-zero, or None: it has no row at all, every tile it tried to
    fetch failed, or a tile failed on a full disk (the report's problems say which)."""
    where = report.problems_file or "report.json"
    # every problem is counted by reason (the report streams them); "stage: reason" keys
    full = sum(v for k, v in report.problems_by_reason.items() if _DISK_FULL.search(k))
    if full:
        return (f"the disk is full: {full} problem(s) say 'No space left on device' (see {where}); free space "
                f"and run again (finished tiles are kept)")
    if attempted and not fetched and table.count("missing"):
        return (f"every tile this run tried to fetch failed ({table.count('missing')} of {attempted}; see {where}); "
                f"{'the dataset was not replaced' if not n_rows else 'the dataset holds the tiles finished earlier'}")
    if not n_rows:
        return f"no tile gave a row ({table.count('no_data')} no data, {table.count('missing')} failed; see {where})"
    return None


def _write_report(config: MultimodalConfig, report: RunReport, out: Path, selection, table) -> None:
    png = tiles_map_png(_map_points(selection.path, len(table)), [r.geometry for r in selection.regions],
                        title=f"{config.name}: {len(table)} tiles")
    h5_path, n_rows = out / f"{config.name}.h5", report.counts.get("rows in h5", 0)
    synthetic = bool(report.extra.get("source", {}).get("synthetic"))
    try:  # what is inside a tile, for a sample of tiles (no data in magenta)
        if not n_rows or not h5_path.exists():
            raise FileNotFoundError(f"{h5_path} was not written")
        sheet = out / "tiles_contact_sheet.png"
        write_bytes_atomic(sheet, contact_sheet_png(h5_path, title=f"{config.name}: {n_rows} tiles, a sample"
                                                    + (" (SYNTHETIC)" if synthetic else "")
                                                    + "; no data in magenta"))
        report.outputs["contact sheet"] = str(sheet)
    except Exception as exc:  # noqa: BLE001 - a picture never sinks the dataset
        report.problem(config.name, "report", f"contact sheet: {type(exc).__name__}: {exc}")
    report.write(out, png)
    report.publish(key=config.name.replace("_", "-").lower(), map_png=png)


def source_about(source) -> dict[str, Any]:
    """The source as the report, the h5's attributes and the terminal name it."""
    synthetic = bool(getattr(source, "synthetic", False))
    note = (f"SYNTHETIC data: source '{source.name}' generates every tile in this project; "
            "it is not real satellite imagery (source=earthengine fetches real data)") if synthetic else \
        f"source '{source.name}'"
    return {"name": source.name, "synthetic": synthetic, "note": note}


def scan_message(n: int, missing: int, scan: dict[str, int], index: Path) -> str:
    """The log line of the stacks scan: what is to fetch, and how the done tiles were known
    (the index vouches for a tile it lists unchanged; the others are checked in full)."""
    done, full, vouched = n - missing, scan["full checks"], n - scan["full checks"]
    how = []
    if done and vouched:
        how.append(f"{vouched} vouched for by {index.name}")
    if done and full:
        how.append(f"{full} checked in full" + ("" if scan["indexed"] else f" (no {index.name} yet)"))
    return f"{missing} of {n} tiles to fetch ({done} already done" + "".join(f"; {h}" for h in how) + ")"


def memory_held(table: stacks.TileStates, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """What this run held in memory that grows with the dataset, for the report: the tiles,
    tile_info, the index and the h5 are streamed; what stays is the tile state table and one
    statistics summary per partition (the Prefect database grows by task run, not by tile)."""
    n = max(len(table), 1)
    summary_bytes = sum(len(json.dumps(s, default=str)) for s in summaries)
    return {
        "flow process peak RSS MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "tile state table MB": round(table.nbytes / 1e6, 3),
        "tile state table B per tile": round(table.nbytes / n, 1),
        "partition summaries": len(summaries),
        "partition summaries MB": round(summary_bytes / 1e6, 3),
        "grows with the tiles": "the tile state table (per tile: id, state, fetch key, stack size, mtime "
                                "and digest; a reason per no-data tile) and one statistics summary per "
                                "partition; the tiles file, tile_info, the stacks index and the h5 are "
                                "streamed, and at most tasks_in_flight tasks are held",
    }


# --------------------------------------------------------------------------
# Local entry point
# --------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> MultimodalConfig:
    """The configuration named by ``--config`` with ``--set`` overrides (raises :class:`ConfigError`)."""
    return parse_config(argv, prog="python -m flows.multimodal", description=__doc__, configs=CONFIGS)


def main(argv: list[str] | None = None) -> int:
    try:
        return run_local(argv, parse_args, multimodal_flow, finish, folder_of=lambda config: config.dataset_dir)
    except RunFailed as exc:  # the report is written; no traceback for a failure it explains
        print(f"error: {exc}", file=sys.stderr)
        return 1


def finish(result: dict[str, Any]) -> int:
    """Print where the dataset is, its counts, and the paths of its report and picture."""
    counts = result["counts"]
    print(f"\nDataset written to {result['dataset_dir']}")
    if result.get("source", {}).get("synthetic"):
        print(f"  {result['source']['note']}")
    for k, v in counts.items():
        print(f"  {k:>16}: {v}")
    outputs = result.get("outputs", {})
    if result["problems"]:
        where = result.get("problems_file") or outputs.get("report")
        print(f"  {result.get('problems_total', len(result['problems']))} problem(s); see {where}")
    print(f"Report: {outputs.get('report', Path(result['dataset_dir']) / 'report.json')}")
    if outputs.get("picture"):
        print(f"Picture: {outputs['picture']}")
    if outputs.get("contact sheet"):
        print(f"Picture: {outputs['contact sheet']}")
    from tasks.multimodal.torchgeo import TORCHGEO_FILENAMES

    if Path(result["dataset_dir"]).name not in TORCHGEO_FILENAMES.values():  # TorchGeo opens release names only
        print(f"  for TorchGeo's MMEarth: python -m tasks.multimodal.torchgeo {result['dataset_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
