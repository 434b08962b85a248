"""One multimodal dataset build, the twin of the aerial flow's ``SceneRun``: what the stages
share (configuration, source, tile states, layout, report) and the stages that drive the
flow's task runner: select the tiles, decide from the stacks index what to fetch, fetch the
missing tiles and pack each partition alongside, fetch again what was not the stack written
and assemble the h5 (one writer), then statistics, splits and tile_info, and the report.

``flows/multimodal.py`` calls these in order; the work itself is in the stage modules
(:mod:`~tasks.multimodal.select_tiles`, :mod:`~tasks.multimodal.stacks`,
:mod:`~tasks.multimodal.convert`), and every path comes from
:class:`~tasks.multimodal.layout.DatasetLayout`. The methods run inside the flow (they submit
Prefect tasks and log with the flow run's logger).
"""

from __future__ import annotations

import concurrent.futures
import json
import queue
import re
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from prefect import get_run_logger

from tasks.common.atomic import remove_partials, write_bytes_atomic
from tasks.common.concurrency import ensure_limit
from tasks.common.progress import Progress
from tasks.common.report import RunFailed, RunReport, tiles_map_png
from tasks.common.window import RunCancelled, in_thread, is_cancellation, run_windowed
from tasks.multimodal import convert, stacks
from tasks.multimodal import tiles as tiles_mod
from tasks.multimodal.config import MultimodalConfig
from tasks.multimodal.contact_sheet import contact_sheet_png
from tasks.multimodal.layout import REPORT, DatasetLayout
from tasks.multimodal.select_tiles import TileSelection, select_tiles
from tasks.multimodal.sources import make_source
from tasks.multimodal.sources.base import Source
from tasks.multimodal.tasks import assemble_h5_task, fetch_task, pack_partition_task
from tasks.multimodal.tile import Grid, Tile

#: report.json count of the "429 Too many requests" answers the fetch met (Earth Engine)
RATE_LIMITED = "429 answers (too many requests)"
#: report.json ``outputs`` key of the contact sheet's path
CONTACT_SHEET = "contact sheet"
#: the most tile centres drawn on the report's map (every k-th tile beyond that)
MAP_POINTS = 20000
#: how Python words a full disk or quota in an OSError's text (errno 28 ENOSPC, 122 EDQUOT)
_DISK_FULL = re.compile(r"\[Errno (28|122)\]|No space left on device|Disk quota exceeded")

#: a fetch batch: the tiles' positions in the tiles file, and the tiles
Batch = tuple[list[int], list[Tile]]


def fetch_batches(tiles_path: Path, table: stacks.TileStates, size: int, only=None) -> Iterator[Batch]:
    """Fetch batches (positions, tiles) of the tiles still missing, read from the tiles
    file in chunks as the window asks for them; ``only``: a set of tile ids to restrict to."""
    positions, batch = [], []
    offset = 0
    for chunk in tiles_mod.iter_tiles(tiles_path):
        for i, tile in enumerate(chunk, start=offset):
            if table.state[i] == 0 and (only is None or tile.tile_id in only):
                positions.append(i)
                batch.append(tile)
                if len(batch) >= size:
                    yield positions, batch
                    positions, batch = [], []
        offset += len(chunk)
    if batch:
        yield positions, batch


def part_spec(table: stacks.TileStates, k: int, part_size: int, image_size: int,
              compression: convert.Compression) -> convert.PartSpec | None:
    """Partition ``k``: the done tiles among file positions [k*part_size, (k+1)*part_size),
    keyed by their index entries (None when it has none). Fixed by position, a part can
    be packed as soon as its own tiles are settled, while later tiles are still fetched."""
    a = k * part_size
    sl = slice(a, min(a + part_size, len(table)))
    ids = [i.decode() for i in table.ids[sl][table.state[sl] == 1]]
    if not ids:
        return None
    return convert.PartSpec(k, ids, convert.entries_part_key(ids, table, image_size, compression))


def partitions(table: stacks.TileStates, part_size: int, image_size: int,
               compression: convert.Compression) -> Iterator[convert.PartSpec]:
    """Every partition with done tiles, one at a time (the ids of one part in memory)."""
    for k in range(-(-len(table) // part_size)):
        spec = part_spec(table, k, part_size, image_size, compression)
        if spec is not None:
            yield spec


class Packer:
    """Packs partitions on the Dask workers (bounded window) and keeps their results; a
    part whose stacks are not the ones written is set aside (``redo``) with its tiles'
    reasons (``mismatched``), for they are fetched again and the part packed anew."""

    def __init__(self, config: MultimodalConfig, layout: DatasetLayout, compression: convert.Compression,
                 report: RunReport):
        self.config, self.layout, self.compression, self.report = config, layout, compression, report
        self.info = stacks.TileInfoDir(layout.root)
        self.parts: dict[int, convert.PartResult] = {}
        self.redo: list[convert.PartSpec] = []
        self.mismatched: dict[str, str] = {}
        self.seconds = 0.0

    def run(self, specs, defer: bool, stage: str, total: int) -> None:
        progress = Progress(stage, total, "tiles", logger=get_run_logger())
        config = self.config

        def submit(spec):
            return pack_partition_task.submit(spec, str(self.layout.stacks), self.info, str(self.layout.parts),
                                              config.image_size, self.compression, defer)

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
            run_windowed(submit, specs, config.tasks_in_flight, on_done, idle=progress.tick)
        self.seconds += time.monotonic() - t0


class MultimodalRun:
    """A dataset build: its configuration, layout and report, then (stage by stage) its tile
    selection, source, tile states and packer. See the module doc for the stages."""

    def __init__(self, config: MultimodalConfig, layout: DatasetLayout, report: RunReport):
        self.config, self.layout, self.report = config, layout, report
        self.compression = convert.Compression(config.compression_codec, config.compression_level)
        self.packer = Packer(config, layout, self.compression, report)
        self.selection: TileSelection | None = None
        self.source: Source | None = None
        self.about: dict[str, Any] = {}
        self.table: stacks.TileStates | None = None
        self.failed: dict[int, str] = {}  # reasons of the tiles that failed, by position
        self.attempted = 0  # tiles this run has to fetch
        self.fetched = 0  # tiles that got a permanent outcome (stack or no data) this run
        self.rate_limited: int | None = None  # 429 answers met (counted for Earth Engine only)
        self._clock = time.monotonic()

    @classmethod
    def start(cls, config: MultimodalConfig) -> "MultimodalRun":
        """The dataset's folders made, partial files of an interrupted run removed, the report
        started (problems are streamed to a file; report.json keeps the first 1000 and counts
        them by reason)."""
        layout = DatasetLayout(config.dataset_dir, config.name)
        for folder in layout.folders():
            folder.mkdir(parents=True, exist_ok=True)
        for folder in layout.folders():
            remove_partials(folder)
        report = RunReport(title=f"multimodal dataset {config.name}", problems_file=layout.problems,
                           keep_problems=1000)
        return cls(config, layout, report)

    def _lap(self) -> float:
        """Seconds since the last lap (or the start)."""
        now = time.monotonic()
        seconds, self._clock = now - self._clock, now
        return seconds

    # ---- 1. tiles and the source ------------------------------------------
    def select_tiles(self) -> None:
        """Write the tiles file (:mod:`~tasks.multimodal.select_tiles`) and make the source,
        checked (credentials, project) before any tile is fetched."""
        config, report, logger = self.config, self.report, get_run_logger()
        self._lap()
        earthengine = config.source == "earthengine"
        limited = config.source in ("earthengine", "stac")
        if limited:  # every Earth Engine / STAC request of every task holds a slot of this limit
            ensure_limit(config.request_limit_name, config.request_ceiling)

        def source_for(eco_index):
            return make_source(config.source, config.source_options, eco_index,
                               limit_name=config.request_limit_name if limited else None,
                               ceiling=config.request_ceiling if limited else None,
                               rate=config.request_rate if earthengine else None)

        sampler = source_for(None) if config.tile_sampler == "earthengine" and earthengine else None
        selection = self.selection = select_tiles(config, self.layout.root, sampler)
        source = self.source = source_for(selection.eco_index)
        source.check()
        about = self.about = source_about(source)
        report.extra["source"] = about
        if about["synthetic"]:
            report.title += " (SYNTHETIC data)"
            report.notes.insert(0, about["note"])
            logger.warning(about["note"])
        report.notes.extend(selection.notes)
        logger.info("%d tiles (%s) -> %s", selection.n_tiles, selection.how, selection.path)
        report.counts["tiles sampled"] = selection.n_tiles
        report.timings["tiles"] = self._lap()
        if earthengine:  # what the service answered "429 Too many requests" (retried; a sign the ceiling or rate is too high)
            self.rate_limited = 0
            report.counts[RATE_LIMITED] = 0

    # ---- 2. stacks: decide from the index ---------------------------------
    def scan_stacks(self) -> None:
        """The tile state table: what is done (the stacks index vouches, or the full check),
        what to fetch; a damaged stack is treated like a missing one."""
        damaged: dict[str, str] = {}
        table, scan = stacks.decide_states(tiles_mod.iter_tiles(self.selection.path), self.source,
                                           self.layout.root, damaged)
        self.table = table
        self.report.timings["scan"] = time.monotonic() - self._clock  # the fetch's timing includes the scan
        for tid, reason in damaged.items():
            self.report.problem(tid, "integrity", f"{reason}; fetched again")
        get_run_logger().info(scan_message(len(table), table.count("missing"), scan, self.layout.stacks_index))
        self.attempted = table.count("missing")

    # ---- 3. fetch, pack alongside -----------------------------------------
    def fetch_and_pack(self) -> list[dict[str, Any]] | None:
        """Fetch the missing tiles, packing each partition as soon as its tiles are settled;
        with nothing to fetch, pack only when the h5 is not up to date. Returns the h5's part
        summaries when it is up to date (from its manifest), else None (:meth:`finish` writes it)."""
        config, table = self.config, self.table
        if table.count("missing"):
            self.fetched = self._fetch_alongside_packing()
            summaries = self._manifest_summaries()
        else:  # nothing to fetch: the h5 may be up to date as it is
            summaries = self._manifest_summaries()
            if summaries is None:
                self.packer.run(partitions(table, config.part_size, config.image_size, self.compression), True,
                                "pack", table.count("done"))
        self.report.timings["fetch"] = self._lap()  # packing overlaps it (timings["pack"]: the packing window)
        self._report_unfetched()
        self.failed = {}
        return summaries

    def _manifest_summaries(self) -> list[dict[str, Any]] | None:
        keys = [s.key for s in partitions(self.table, self.config.part_size, self.config.image_size,
                                          self.compression)]
        return convert.read_manifest(self.layout.h5, self.layout.h5_manifest, keys)

    def fetch(self, failed: dict[int, str], stage: str = "stacks", only=None,
              on_settled: Callable[[list[int]], None] | None = None) -> int:
        """Fetch the missing tiles (``only``: these tile ids) in batch tasks, at most
        ``config.tasks_in_flight`` at once; stream each batch's outcomes into the tile state
        table and the stacks index, and the reasons of the tiles that failed into ``failed``
        (by position); ``on_settled(positions)`` is called with each finished batch's
        positions. Returns how many tiles got a permanent outcome (stack or no data)."""
        config, table, source, logger = self.config, self.table, self.source, get_run_logger()
        fetch_batch = fetch_task(config.fetch_retries, config.fetch_retry_delay_s)
        index = stacks.StackIndex(self.layout.root)
        todo = table.count("missing") if only is None else len(only)
        progress = Progress(stage, todo, "tiles", logger=logger)
        finished = 0

        def submit(item: Batch):
            return fetch_batch.submit(item[1], source, str(self.layout.root), config.stack_compress,
                                      config.fetch_threads, config.fetch_slots)

        def on_done(item: Batch, fut) -> None:
            nonlocal finished
            positions, batch = item
            try:
                outcomes = fut.result()
            except Exception as exc:  # retries exhausted: what the batch did write still counts
                if is_cancellation(exc):  # the run is being cancelled: not this batch's problem
                    raise RunCancelled(str(exc)) from exc
                outcomes = []
                for tile in batch:
                    grid = Grid.for_tile(tile)
                    entry = stacks.tile_check(tile, stacks.fetch_key(source, tile, grid), self.layout, grid.size)
                    outcomes.append(stacks.TileOutcome(tile.tile_id, "checked" if entry else "failed",
                                                       f"{type(exc).__name__}: {exc}", entry=entry))
            new = []
            for p, outcome in zip(positions, outcomes):
                if outcome.entry is not None:
                    table.set(p, outcome.entry)
                    failed.pop(p, None)
                    new.append((outcome.tile_id, outcome.entry))
                else:
                    failed[p] = outcome.reason
            index.append(new)
            finished += len(new)
            if self.rate_limited is not None:
                self.rate_limited += sum(o.rate_limited for o in outcomes)
                self.report.counts[RATE_LIMITED] = self.rate_limited
            progress.advance(len(batch))
            if on_settled is not None:
                on_settled(positions)

        with progress:
            stats = run_windowed(submit, fetch_batches(self.selection.path, table, config.fetch_batch_size, only),
                                 config.tasks_in_flight, on_done, idle=progress.tick)
        logger.debug("%s: %d fetch tasks, at most %d in flight", stage, stats.submitted, stats.max_in_flight)
        return finished

    def _fetch_alongside_packing(self) -> int:
        """:meth:`fetch`, and alongside (a second window in a second thread) pack each
        partition as soon as all its tiles are settled. Returns what :meth:`fetch` returns."""
        table, part_size = self.table, self.config.part_size
        n_parts = -(-len(table) // part_size)
        left = np.bincount(table.positions("missing") // part_size, minlength=n_parts)  # unsettled tiles per part
        ready: queue.SimpleQueue = queue.SimpleQueue()
        for k in np.flatnonzero(left == 0):
            ready.put(int(k))
        total = table.count("done") + table.count("missing")

        def specs():
            while (k := ready.get()) is not None:
                spec = part_spec(table, k, part_size, self.config.image_size, self.compression)
                if spec is not None:
                    yield spec

        def on_settled(positions: list[int]) -> None:
            for k, n in zip(*np.unique(np.asarray(positions) // part_size, return_counts=True)):
                left[k] -= n
                if left[k] == 0:
                    ready.put(int(k))

        packing = in_thread(self.packer.run, specs(), True, "pack", total, name="pack-window")
        try:
            fetched = self.fetch(self.failed, on_settled=on_settled)
        except BaseException:
            ready.put(None)  # interrupted or failed: packs in flight are abandoned with the run
            concurrent.futures.wait([packing], timeout=5.0)
            raise
        ready.put(None)
        packing.result()  # the packing window's error, raised in the flow's thread
        return fetched

    def _report_unfetched(self) -> None:
        """Tiles without a stack, in file order: why (failed) or the source's no-data reason."""
        table = self.table
        for p in table.positions("missing", "no_data"):
            if table.state[p] == 0:
                self.report.problem(table.tile_id(p), "fetch", self.failed.get(int(p), "stack missing after fetching"))
            else:
                self.report.problem(table.tile_id(p), "fetch", f"no data: {table.no_data_reason.get(int(p), '')}")

    # ---- 4. the h5 (one writer) -------------------------------------------
    def finish(self) -> list[dict[str, Any]]:
        """Fetch again the tiles whose stack was not the one written and re-pack their parts,
        then write the h5 with one writer and its manifest. Returns the part summaries."""
        packer, report, table, layout = self.packer, self.report, self.table, self.layout
        if packer.mismatched:
            # a stack that is not the one written is treated like a missing one: fetched again
            mismatched = dict(packer.mismatched)
            get_run_logger().warning("%d stack(s) differ from what was written; fetching them again", len(mismatched))
            for tid, reason in mismatched.items():
                report.problem(tid, "integrity", f"{reason}; fetched again")
                layout.tile_json(tid).unlink(missing_ok=True)
                table.set(table.pos_of(tid), None)
            failed: dict[int, str] = {}
            self.fetched += self.fetch(failed, stage="fetch again", only=set(mismatched))
            for tid in mismatched:
                p = table.pos_of(tid)
                if table.state_of(p) != "done":
                    report.problem(tid, "fetch", failed.get(p, "not fetched again after an integrity mismatch"))
            again = [s for s in (part_spec(table, spec.index, self.config.part_size, self.config.image_size,
                                           self.compression) for spec in packer.redo) if s]
            packer.redo.clear()
            packer.run(again, False, "pack again", sum(len(s.tile_ids) for s in again))
        done_parts = [packer.parts[i] for i in sorted(packer.parts)]
        keep = {Path(p.path).name for p in done_parts}
        for stale in layout.part_files():
            if stale.name not in keep:
                stale.unlink()
        report.timings["pack"] = packer.seconds
        summaries = [convert.part_summary(p) for p in done_parts]
        if not sum(p.n_rows for p in done_parts):  # nothing to write: a good dataset is never replaced by 0 rows
            return summaries
        t0 = time.monotonic()
        assemble_h5_task(done_parts, str(layout.h5), self.config.image_size, self.compression,
                         {"source": self.about["name"], "synthetic": self.about["synthetic"],
                          "source_note": self.about["note"]})
        report.timings["assemble"] = time.monotonic() - t0
        convert.write_manifest(layout.h5, layout.h5_manifest, summaries)
        return summaries

    def settle(self, summaries: list[dict[str, Any]]) -> int:
        """After the h5: the parts dropped (unless kept), the counts and the conversion
        problems in the report. Returns the h5's rows."""
        if not self.config.keep_parts:
            for part in self.layout.part_files():
                part.unlink()
        table = self.table
        self.report.counts.update({"stacks done": table.count("done"), "fetched this run": self.fetched,
                                   "no data": table.count("no_data"), "fetch failed": table.count("missing")})
        for s in summaries:
            for tid, reason in s["problems"].items():
                self.report.problem(tid, "convert", reason)
        return sum(s["n_rows"] for s in summaries)

    def failure(self, n_rows: int) -> str | None:
        """Why the run must exit non-zero (see :func:`run_failure`), or None."""
        return run_failure(self.report, self.attempted, self.fetched, self.table, n_rows)

    # ---- 5. statistics, splits, tile_info ----------------------------------
    def publish(self, summaries: list[dict[str, Any]], n_rows: int) -> None:
        """Band statistics, splits and NAME_tile_info.json (written first, for it can refuse:
        every h5 row needs its tile's entry; then the run fails with its report written)."""
        config, report, layout = self.config, self.report, self.layout
        band_stats, empty = convert.merge_stats(summaries).band_stats()
        for k, channels in empty.items():
            report.notes.append(f"band_stats[{k}] is 0 (mean, std, min, max) for channel(s) {channels}: "
                                "no valid value of this kind")
        splits = convert.make_splits(n_rows, config.split_fractions, config.split_seed)
        unreadable: list[str] = []
        rows: set[str] = set()

        def in_h5(tid: str) -> bool:  # built only when a tile's JSON could not be read
            if not rows:
                rows.update(t for x in summaries for t in x["tile_ids"])
            return tid in rows

        try:
            stacks.write_tile_info_json(layout.tile_info, self.table.tile_ids("done", "no_data"), layout.root,
                                        unreadable, in_h5)
        except stacks.TileInfoLost as exc:
            for tid in unreadable:
                report.problem(tid, "tile_info", f"{layout.tile_json(tid)} unreadable")
            self.write_report()
            raise RunFailed(str(exc)) from None
        for tid in unreadable:  # not in the h5 (no data, or not converted): reported, never dropped silently
            report.problem(tid, "tile_info", f"{layout.tile_json(tid)} unreadable; left out of {layout.tile_info.name}")
        files = convert.write_dataset_jsons(layout.root, config.name, None, band_stats, splits)
        files["tile_info"] = layout.tile_info
        report.counts.update({"rows in h5": n_rows, "convert failed": sum(len(s["problems"]) for s in summaries),
                              "train": len(splits["train"]), "val": len(splits["val"]), "test": len(splits["test"])})
        report.outputs.update({"h5": str(layout.h5), **{k: str(v) for k, v in files.items()},
                               "tiles": str(self.selection.path)})
        report.timings["pack, write, statistics"] = self._lap()
        report.extra["memory"] = memory_held(self.table, summaries)

    # ---- 6. report ----------------------------------------------------------
    def write_report(self, n_rows: int = 0) -> None:
        """report.json, the map (at most MAP_POINTS tiles), the contact sheet (when the h5 has
        rows), and the Prefect artifacts."""
        config, report, layout, table = self.config, self.report, self.layout, self.table
        png = tiles_map_png(map_points(self.selection.path, len(table)),
                            [r.geometry for r in self.selection.regions], title=f"{config.name}: {len(table)} tiles")
        try:  # what is inside a tile, for a sample of tiles (no data in magenta)
            if not n_rows or not layout.h5.exists():
                raise FileNotFoundError(f"{layout.h5} was not written")
            write_bytes_atomic(layout.contact_sheet, contact_sheet_png(
                layout.h5, title=f"{config.name}: {n_rows} tiles, a sample"
                + (" (SYNTHETIC)" if self.about.get("synthetic") else "") + "; no data in magenta"))
            report.outputs[CONTACT_SHEET] = str(layout.contact_sheet)
        except Exception as exc:  # noqa: BLE001 - a picture never sinks the dataset
            report.problem(config.name, "report", f"contact sheet: {type(exc).__name__}: {exc}")
        report.write(layout.root, png, png_name=layout.tiles_map.name)
        report.publish(key=config.name.replace("_", "-").lower(), map_png=png)


def run_failure(report: RunReport, attempted: int, fetched: int, table: stacks.TileStates,
                n_rows: int) -> str | None:
    """Why the run must exit non-zero, or None: it has no row at all, every tile it tried to
    fetch failed, or a tile failed on a full disk (the report's problems say which)."""
    where = report.problems_file or REPORT
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


def map_points(tiles_path: Path, n: int) -> list[tuple[float, float, str]]:
    """The centres of at most :data:`MAP_POINTS` of the ``n`` tiles of the tiles file."""
    step = max(1, -(-n // MAP_POINTS))
    points, i = [], 0
    for chunk in tiles_mod.iter_tiles(tiles_path):
        for tile in chunk:
            if i % step == 0:
                points.append((tile.lon, tile.lat, tile.biome))
            i += 1
    return points


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
