"""MMEarth multimodal dataset flow.

Stages: sample tiles -> fetch a stack per tile -> pack partitions (parallel:
read, convert, compress, statistics) -> assemble NAME.h5 (one writer) ->
band statistics, splits, tile_info -> report.

Local run on the embedded default (synthetic source, shipped regions)::

    python -m flows.multimodal
    python -m flows.multimodal --config mmearth64 --set n_tiles=500
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from tasks.common.atomic import remove_partials, write_json_atomic
from tasks.common.concurrency import ensure_limit
from tasks.common.report import RunReport, tiles_map_png
from tasks.common.cli import EXIT_CONFIG, ConfigError, parse_config
from tasks.common.runlock import EXIT_BUSY, OutputBusy, exclusive_output
from tasks.common.runtime import local_prefect_server, make_task_runner
from tasks.common.window import run_windowed
from tasks.multimodal import convert, stacks, tiles as tiles_mod
from tasks.multimodal.config import CONFIGS, MultimodalConfig, get_config
from tasks.multimodal.sources import make_source
from tasks.multimodal.sources.base import Grid, Tile
from tasks.multimodal.tasks import assemble_h5_task, fetch_batch_task, pack_partition_task


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class _Progress:
    """Progress line in the terminal/logs plus a Prefect progress artifact."""

    def __init__(self, logger, stage: str, total: int):
        self.logger, self.stage, self.total, self.done = logger, stage, max(total, 1), 0
        self.t0 = time.monotonic()
        self.last = 0.0
        self.artifact = create_progress_artifact(0.0, description=f"{stage}: 0/{total}")

    def advance(self, n: int, extra: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= 1.0 or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            self.logger.info("%s: %d/%d (%.0f%%, %.1f/s) %s", self.stage, self.done, self.total,
                             100.0 * self.done / self.total, rate, extra)
            update_progress_artifact(self.artifact, 100.0 * self.done / self.total,
                                     description=f"{self.stage}: {self.done}/{self.total}")


def _fetch(config: MultimodalConfig, source, out: Path, todo: list[Tile], states: dict[str, str],
           entries: dict[str, stacks.Entry], reasons: dict[str, str], stage: str = "stacks") -> int:
    """Fetch ``todo`` in batch tasks, at most ``config.tasks_in_flight`` at once; stream each
    batch's outcomes into ``states``/``entries`` and the stacks index. Returns how many
    tiles got a permanent outcome (stack or no-data) this time."""
    logger = get_run_logger()
    fetch = fetch_batch_task.with_options(
        retries=config.fetch_retries, retry_jitter_factor=0.5,
        retry_delay_seconds=[config.fetch_retry_delay_s * 2**i for i in range(max(config.fetch_retries, 1))])
    index = stacks.StackIndex(out)
    paths = stacks.dataset_paths(out)
    progress = _Progress(logger, stage, len(todo))
    finished = [0]

    def submit(batch: list[Tile]):
        return fetch.submit(batch, source, str(out), config.stack_compress, config.fetch_threads, config.fetch_slots)

    def on_done(batch: list[Tile], fut) -> None:
        try:
            outcomes = fut.result()
        except Exception as exc:  # retries exhausted: what the batch did write still counts
            outcomes = []
            for t in batch:
                grid = Grid.for_tile(t)
                e = stacks.tile_check(t, stacks.fetch_key(source, t, grid), paths, grid.size)
                outcomes.append(stacks.TileOutcome(t.tile_id, "checked" if e else "failed",
                                                   f"{type(exc).__name__}: {exc}", entry=e))
        new = []
        for o in outcomes:
            if o.entry is not None:
                states[o.tile_id] = o.entry.state
                entries[o.tile_id] = o.entry
                new.append((o.tile_id, o.entry))
            else:
                reasons[o.tile_id] = o.reason
        index.append(new)
        finished[0] += len(new)
        progress.advance(len(batch))

    stats = run_windowed(submit, _chunks(todo, config.fetch_batch_size), config.tasks_in_flight, on_done)
    logger.debug("%s: %d fetch tasks, at most %d in flight", stage, stats.submitted, stats.max_in_flight)
    return finished[0]


def _pack_and_assemble(config: MultimodalConfig, specs: list[convert.PartSpec], out: Path, tiles: list[Tile],
                       source, states: dict[str, str], entries: dict[str, stacks.Entry], reasons: dict[str, str],
                       h5_path: Path, compression: convert.Compression, report: RunReport) -> tuple[list[dict[str, Any]], int]:
    """Pack every partition on the Dask workers (bounded window), fetch again the tiles
    whose stack is not the one written and re-pack their parts, then write the h5 with
    one writer. Returns the part summaries and how many tiles were fetched again."""
    logger = get_run_logger()
    paths = stacks.dataset_paths(out)
    info = stacks.TileInfoDir(out)
    parts: dict[int, convert.PartResult] = {}
    redo: list[convert.PartSpec] = []
    mismatched: dict[str, str] = {}
    progress = _Progress(logger, "pack", sum(len(s.tile_ids) for s in specs))

    def run(batch: list[convert.PartSpec], defer: bool) -> None:
        def submit(spec):
            return pack_partition_task.submit(spec, str(paths["tiles"]), info, str(paths["parts"]),
                                              config.image_size, compression, defer)

        def on_done(spec, fut) -> None:
            try:
                res = fut.result()
            except Exception as exc:  # the part's tiles are reported, the rest goes on
                for tid in spec.tile_ids:
                    report.problem(tid, "pack", f"{type(exc).__name__}: {exc}")
                res = None
            if res is not None and res.integrity and not res.path:
                mismatched.update(res.integrity)
                redo.append(spec)
            elif res is not None:
                parts[res.index] = res
            progress.advance(len(spec.tile_ids))

        run_windowed(submit, batch, config.tasks_in_flight, on_done)

    t0 = time.monotonic()
    run(specs, defer=True)
    refetched = 0
    if mismatched:
        # a stack that is not the one written is treated like a missing one: fetched again
        logger.warning("%d stack(s) differ from what was written; fetching them again", len(mismatched))
        for tid, reason in mismatched.items():
            report.problem(tid, "integrity", f"{reason}; fetched again")
            (paths["tile_info"] / f"{tid}.json").unlink(missing_ok=True)
            states[tid] = "missing"
            entries.pop(tid, None)
        todo = [t for t in tiles if t.tile_id in mismatched]
        refetched = _fetch(config, source, out, todo, states, entries, reasons, stage="fetch again")
        for t in todo:
            if states[t.tile_id] != "done":
                report.problem(t.tile_id, "fetch", reasons.get(t.tile_id, "not fetched again after an integrity mismatch"))
        again = []
        for spec in redo:
            ids = [tid for tid in spec.tile_ids if states[tid] == "done"]
            again.append(convert.PartSpec(spec.index, ids, convert.entries_part_key(
                ids, entries, config.image_size, compression)))
        redo.clear()
        progress = _Progress(logger, "pack again", sum(len(s.tile_ids) for s in again))
        run(again, defer=False)
    done_parts = [parts[i] for i in sorted(parts)]
    keep = {Path(p.path).name for p in done_parts}
    for stale in paths["parts"].glob("part_*.npz"):
        if stale.name not in keep:
            stale.unlink()
    report.timings["pack"] = time.monotonic() - t0
    t0 = time.monotonic()
    assemble_h5_task(done_parts, str(h5_path), config.image_size, compression)
    report.timings["assemble"] = time.monotonic() - t0
    return [convert.part_summary(p) for p in done_parts], refetched


def _dask_settings(parameters: dict[str, Any]):
    """The cluster of a run, from its own ``config`` parameter (local, deployed or scheduled alike)."""
    config = parameters.get("config")
    if not isinstance(config, MultimodalConfig):
        config = MultimodalConfig.model_validate(config or {})
    return config.dask_settings()


@flow(name="multimodal", task_runner=make_task_runner(settings_from=_dask_settings), log_prints=True)
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
    regions_path = Path(config.regions) if config.regions else tiles_mod.DEFAULT_REGIONS
    regions, skipped_regions = tiles_mod.load_regions_split(regions_path)
    for r in skipped_regions:
        report.notes.append(f"region {r.eco_region} ({r.biome}) skipped: its biome is not sampled by MMEarth")
    eco_index = tiles_mod.eco_region_index(regions, config.eco_labels)
    tiles_path = out / f"{config.name}_tiles.geojson"
    source = make_source(config.source, config.source_options, eco_index)
    if config.source == "earthengine":
        # every Earth Engine request of every task holds a slot of this limit
        ensure_limit(config.request_limit_name, config.request_ceiling)
        source.limit_name = config.request_limit_name
        source.ceiling = config.request_ceiling
    source.check()  # credentials, project: fail before any tile
    if config.tiles_geojson:
        tiles = tiles_mod.read_tiles_geojson(config.tiles_geojson)
        missing = sorted({t.eco_region for t in tiles} - set(eco_index))
        if missing:
            raise ValueError(f"{config.tiles_geojson}: ecoregion(s) {missing[:5]} have no index; "
                             "pass eco_labels with a {name: index} mapping")
    elif config.tile_sampler == "earthengine":
        if config.source != "earthengine":
            raise ValueError("tile_sampler=earthengine needs source=earthengine (its credentials and project)")
        from tasks.multimodal.tiles_ee import sample_tiles_ee

        key_path = out / "work" / "ee_tiles_key.json"
        key = {"n_tiles": config.n_tiles, "mode": config.sampling_mode_index, "tile_size_m": config.tile_size_m,
               "seed": config.seed, "batch": config.batch, "eco_labels": config.eco_labels}
        previous = json.loads(key_path.read_text()) if key_path.exists() else None
        if tiles_path.exists() and previous and previous.get("key") == key:
            # the same deterministic sample as last time: no need to ask Earth Engine again
            tiles, eco_index = tiles_mod.read_tiles_geojson(tiles_path), previous["eco_index"]
            logger.info("re-using the Earth Engine tile sample in %s", tiles_path)
        else:
            labels = tiles_mod.load_eco_index(config.eco_labels) if config.eco_labels else None
            tiles, eco_index = sample_tiles_ee(source, config.n_tiles, config.sampling_mode_index, labels,
                                               config.tile_size_m, config.seed, config.batch)
            tiles_mod.write_tiles_geojson(tiles, tiles_path)
            write_json_atomic(key_path, {"key": key, "eco_index": eco_index})
        source.eco_index = eco_index
        regions = []
    else:
        tiles = tiles_mod.sample_tiles(regions, eco_index, config.n_tiles, config.sampling_mode_index,
                                       tile_size_m=config.tile_size_m, seed=config.seed, batch=config.batch)
    tiles_mod.write_tiles_geojson(tiles, tiles_path)
    logger.info("%d tiles -> %s", len(tiles), tiles_path)
    report.counts["tiles sampled"] = len(tiles)

    report.timings["tiles"] = time.monotonic() - t0
    # 2. stacks ------------------------------------------------------------
    t0 = time.monotonic()
    damaged: dict[str, str] = {}
    states, entries, scan = stacks.decide(tiles, source, out, damaged)
    report.timings["scan"] = time.monotonic() - t0
    for tid, reason in damaged.items():  # a damaged stack is treated like a missing one
        report.problem(tid, "integrity", f"{reason}; fetched again")
    del damaged
    todo = [t for t in tiles if states[t.tile_id] == "missing"]  # done or no-data tiles are never refetched
    logger.info("%d of %d tiles to fetch (%d already done; %d tiles fully checked, the rest vouched for by %s)",
                len(todo), len(tiles), len(tiles) - len(todo), scan["full checks"], stacks.index_path(out))
    reasons: dict[str, str] = {}
    fetched = _fetch(config, source, out, todo, states, entries, reasons)
    del todo
    report.timings["fetch"] = time.monotonic() - t0
    t0 = time.monotonic()
    for t in tiles:
        s = states[t.tile_id]
        if s == "missing":
            report.problem(t.tile_id, "fetch", reasons.get(t.tile_id, "stack missing after fetching"))
        elif s == "no_data":
            report.problem(t.tile_id, "fetch", f"no data: {entries[t.tile_id].digest}")

    # 3. pack partitions (parallel) and assemble the h5 (one writer) ------
    compression = convert.Compression(config.compression_codec, config.compression_level)
    done_ids = [t.tile_id for t in tiles if states[t.tile_id] == "done"]
    specs = [convert.PartSpec(s.index, s.tile_ids, convert.entries_part_key(s.tile_ids, entries, config.image_size,
                                                                           compression))
             for s in convert.make_partitions(done_ids, config.part_size)]
    del done_ids
    h5_path = out / f"{config.name}.h5"
    manifest = out / "work" / "h5_manifest.json"
    summaries = convert.read_manifest(h5_path, manifest, [s.key for s in specs])
    if summaries is not None:
        logger.info("%s is up to date (%d parts); not rewritten", h5_path, len(summaries))
    else:
        summaries, refetched = _pack_and_assemble(config, specs, out, tiles, source, states, entries, reasons,
                                                  h5_path, compression, report)
        fetched += refetched
        convert.write_manifest(h5_path, manifest, summaries)
        if not config.keep_parts:
            for p in paths["parts"].glob("part_*.npz"):
                p.unlink()
    del specs
    n_states = {k: 0 for k in ("done", "no_data", "missing")}
    for v in states.values():
        n_states[v] += 1
    report.counts.update({"stacks done": n_states["done"], "fetched this run": fetched,
                          "no data": n_states["no_data"], "fetch failed": n_states["missing"]})
    n_rows = sum(s["n_rows"] for s in summaries)
    for s in summaries:
        for tid, reason in s["problems"].items():
            report.problem(tid, "convert", reason)

    # 4. statistics, splits, tile_info ------------------------------------
    band_stats, empty = convert.merge_stats(summaries).band_stats()
    for k, channels in empty.items():
        report.notes.append(f"band_stats[{k}] is NaN for channel(s) {channels}: no valid value of this kind")
    splits = convert.make_splits(n_rows, config.split_fractions, config.split_seed)
    files = convert.write_dataset_jsons(out, config.name, None, band_stats, splits)
    files["tile_info"] = out / f"{config.name}_tile_info.json"
    stacks.write_tile_info_json(files["tile_info"], (t.tile_id for t in tiles if states[t.tile_id] != "missing"), out)
    report.counts.update({"rows in h5": n_rows, "convert failed": sum(len(s["problems"]) for s in summaries),
                          "train": len(splits["train"]), "val": len(splits["val"]), "test": len(splits["test"])})
    report.outputs.update({"h5": str(h5_path), **{k: str(v) for k, v in files.items()}, "tiles": str(tiles_path)})

    report.timings["pack, write, statistics"] = time.monotonic() - t0
    # 5. report --------------------------------------------------------------
    png = tiles_map_png([(t.lon, t.lat, t.biome) for t in tiles], [r.geometry for r in regions],
                        title=f"{config.name}: {len(tiles)} tiles")
    report.write(out, png)
    report.publish(key=config.name.replace("_", "-").lower(), map_png=png)
    logger.info("dataset %s: %s", out, json.dumps(report.counts))
    return {"dataset_dir": str(out), **report.to_dict()}


# --------------------------------------------------------------------------
# Local entry point
# --------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> MultimodalConfig:
    """The configuration named by ``--config`` with ``--set`` overrides (raises :class:`ConfigError`)."""
    return parse_config(argv, prog="python -m flows.multimodal", description=__doc__, configs=CONFIGS,
                        get_config=get_config)


def main(argv: list[str] | None = None) -> int:
    try:  # every setting and input file checked before any server or cluster starts
        config = parse_args(argv)
        config.check_inputs()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    with local_prefect_server() as server:
        print(f"Prefect API: {server.url}  (UI: {server.ui_url})", flush=True)
        try:
            result = multimodal_flow(config=config)
        except OutputBusy as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BUSY
    counts = result["counts"]
    print(f"\nDataset written to {result['dataset_dir']}")
    for k, v in counts.items():
        print(f"  {k:>16}: {v}")
    if result["problems"]:
        print(f"  {len(result['problems'])} problem(s); see {Path(result['dataset_dir']) / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
