"""MMEarth multimodal dataset flow.

Stages: sample tiles -> fetch a stack per tile -> pack partitions (parallel:
read, convert, compress, statistics) -> assemble NAME.h5 (one writer) ->
band statistics, splits, tile_info -> report.

Local run on the embedded default (synthetic source, shipped regions)::

    python -m flows.multimodal
    python -m flows.multimodal --config mmearth64 --set n_tiles=500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from pydantic import ValidationError
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

from tasks.common.atomic import remove_partials, write_json_atomic
from tasks.common.concurrency import ensure_limit
from tasks.common.report import RunReport, tiles_map_png
from tasks.common.runtime import local_prefect_server, make_task_runner
from tasks.multimodal import convert, stacks, tiles as tiles_mod
from tasks.multimodal.config import CONFIGS, MultimodalConfig, get_config
from tasks.multimodal.sources import make_source
from tasks.multimodal.tasks import assemble_h5_task, fetch_batch_task, pack_partition_task


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


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


def _pack_and_assemble(config: MultimodalConfig, specs: list[convert.PartSpec], paths: dict[str, Path],
                       tile_info: dict[str, Any], h5_path: Path, compression: convert.Compression,
                       report: RunReport) -> list[dict[str, Any]]:
    """Pack every partition on the Dask workers, then write the h5 with one writer."""
    logger = get_run_logger()
    futs = [
        pack_partition_task.submit(spec, str(paths["tiles"]), {t: tile_info[t] for t in spec.tile_ids},
                                   str(paths["parts"]), config.image_size, compression)
        for spec in specs
    ]
    spec_of = dict(zip(futs, specs))
    progress = _Progress(logger, "pack", sum(len(s.tile_ids) for s in specs))
    parts: list[convert.PartResult] = []
    for fut in as_completed(futs):
        spec = spec_of[fut]
        try:
            parts.append(fut.result())
        except Exception as exc:  # the part's tiles are reported, the rest goes on
            for tid in spec.tile_ids:
                report.problem(tid, "pack", f"{type(exc).__name__}: {exc}")
        progress.advance(len(spec.tile_ids))
    parts.sort(key=lambda p: p.index)
    keep = {Path(p.path).name for p in parts}
    for stale in paths["parts"].glob("part_*.npz"):
        if stale.name not in keep:
            stale.unlink()
    assemble_h5_task(parts, str(h5_path), config.image_size, compression)
    return [convert.part_summary(p) for p in parts]


@flow(name="multimodal", task_runner=make_task_runner(), log_prints=True)
def multimodal_flow(config: MultimodalConfig = MultimodalConfig()) -> dict[str, Any]:
    """Build an MMEarth-compatible dataset into ``config.output_dir/config.name``."""
    logger = get_run_logger()
    out = config.dataset_dir
    paths = stacks.dataset_paths(out)
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
    for folder in (out, paths["tiles"], paths["tile_info"], paths["parts"]):
        remove_partials(folder)
    report = RunReport(title=f"multimodal dataset {config.name}")

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
        key = {"n_tiles": config.n_tiles, "mode": config.sampling_mode, "tile_size_m": config.tile_size_m,
               "seed": config.seed, "batch": config.batch, "eco_labels": config.eco_labels}
        previous = json.loads(key_path.read_text()) if key_path.exists() else None
        if tiles_path.exists() and previous and previous.get("key") == key:
            # the same deterministic sample as last time: no need to ask Earth Engine again
            tiles, eco_index = tiles_mod.read_tiles_geojson(tiles_path), previous["eco_index"]
            logger.info("re-using the Earth Engine tile sample in %s", tiles_path)
        else:
            labels = tiles_mod.load_eco_index(config.eco_labels) if config.eco_labels else None
            tiles, eco_index = sample_tiles_ee(source, config.n_tiles, config.sampling_mode, labels,
                                               config.tile_size_m, config.seed, config.batch)
            tiles_mod.write_tiles_geojson(tiles, tiles_path)
            write_json_atomic(key_path, {"key": key, "eco_index": eco_index})
        source.eco_index = eco_index
        regions = []
    else:
        tiles = tiles_mod.sample_tiles(regions, eco_index, config.n_tiles, config.sampling_mode,
                                       tile_size_m=config.tile_size_m, seed=config.seed, batch=config.batch)
    tiles_mod.write_tiles_geojson(tiles, tiles_path)
    logger.info("%d tiles -> %s", len(tiles), tiles_path)
    report.counts["tiles sampled"] = len(tiles)

    report.timings["tiles"] = time.monotonic() - t0
    # 2. stacks ------------------------------------------------------------
    t0 = time.monotonic()
    before = stacks.scan_tiles(tiles, source, out)
    fetch = fetch_batch_task.with_options(
        retries=config.fetch_retries, retry_jitter_factor=0.5,
        retry_delay_seconds=[config.fetch_retry_delay_s * 2**i for i in range(max(config.fetch_retries, 1))])
    todo = [t for t in tiles if before[t.tile_id] == "missing"]  # done or no-data tiles are never refetched
    logger.info("%d of %d tiles to fetch (%d already done)", len(todo), len(tiles), len(tiles) - len(todo))
    batches = _chunks(todo, config.fetch_batch_size)
    futures = {fetch.submit(b, source, str(out), config.stack_compress, config.fetch_threads, config.fetch_slots): b
               for b in batches}
    progress = _Progress(logger, "stacks", len(todo))
    reasons: dict[str, str] = {}
    for fut in as_completed(list(futures)):
        batch = futures[fut]
        try:
            for o in fut.result():
                if o.status == "failed":
                    reasons[o.tile_id] = o.reason
        except Exception as exc:  # retries exhausted: the batch's unfinished tiles fail
            for t in batch:
                reasons.setdefault(t.tile_id, f"{type(exc).__name__}: {exc}")
        progress.advance(len(batch))
    report.timings["fetch"] = time.monotonic() - t0
    t0 = time.monotonic()
    states = stacks.scan_tiles(tiles, source, out)
    done_ids = [t.tile_id for t in tiles if states[t.tile_id] == "done"]
    no_data = [tid for tid, s in states.items() if s == "no_data"]
    failed = [tid for tid, s in states.items() if s == "missing"]
    for tid in failed:
        report.problem(tid, "fetch", reasons.get(tid, "stack missing after fetching"))
    tile_info = stacks.load_tile_info([t.tile_id for t in tiles], out)
    for tid in no_data:
        report.problem(tid, "fetch", f"no data: {tile_info.get(tid, {}).get('NO_DATA_REASON', '')}")
    by_reason = Counter(str(tile_info.get(tid, {}).get("NO_DATA_REASON", "")).split(":")[0] for tid in no_data)
    for why, k in sorted(by_reason.items()):  # permanent outcomes by reason: a wrong one is visible
        report.notes.append(f"no data (permanent, never fetched again): {k} tile(s): {why or 'no reason recorded'}")
    fetched = sum(1 for t in tiles if before[t.tile_id] == "missing" and states[t.tile_id] != "missing")
    report.counts.update({"stacks done": len(done_ids), "fetched this run": fetched, "no data": len(no_data),
                          "fetch failed": len(failed)})

    # 3. pack partitions (parallel) and assemble the h5 (one writer) ------
    compression = convert.Compression(config.compression_codec, config.compression_level)
    specs = convert.make_partitions(done_ids, config.part_size)
    keys = [convert.part_key(spec, paths["tiles"], tile_info, config.image_size, compression) for spec in specs]
    h5_path = out / f"{config.name}.h5"
    manifest = out / "work" / "h5_manifest.json"
    summaries = convert.read_manifest(h5_path, manifest, keys)
    if summaries is not None:
        logger.info("%s is up to date (%d parts); not rewritten", h5_path, len(summaries))
    else:
        summaries = _pack_and_assemble(config, specs, paths, tile_info, h5_path, compression, report)
        convert.write_manifest(h5_path, manifest, summaries)
        if not config.keep_parts:
            for p in paths["parts"].glob("part_*.npz"):
                p.unlink()
    n_rows = sum(s["n_rows"] for s in summaries)
    for s in summaries:
        for tid, reason in s["problems"].items():
            report.problem(tid, "convert", reason)

    # 4. statistics, splits, tile_info ------------------------------------
    band_stats, empty = convert.merge_stats(summaries).band_stats()
    for k, channels in empty.items():
        report.notes.append(f"band_stats[{k}] is NaN for channel(s) {channels}: no valid value of this kind")
    splits = convert.make_splits(n_rows, config.split_fractions, config.split_seed)
    files = convert.write_dataset_jsons(out, config.name, tile_info, band_stats, splits)
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
def _parse_value(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def parse_args(argv: list[str] | None = None) -> MultimodalConfig:
    ap = argparse.ArgumentParser(prog="python -m flows.multimodal", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="default", choices=sorted(CONFIGS), help="named configuration")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field (VALUE parsed as JSON when possible), e.g. n_tiles=500 or dask.n_workers=4")
    args = ap.parse_args(argv)
    overrides: dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            ap.error(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        node = overrides
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _parse_value(value)
    try:
        return get_config(args.config, **overrides)
    except ValidationError as exc:
        ap.error(f"invalid configuration: {exc}")


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    with local_prefect_server() as server:
        print(f"Prefect API: {server.url}  (UI: {server.ui_url})", flush=True)
        runner = make_task_runner(config.dask_settings().to_runtime())
        result = multimodal_flow.with_options(task_runner=runner)(config=config)
    counts = result["counts"]
    print(f"\nDataset written to {result['dataset_dir']}")
    for k, v in counts.items():
        print(f"  {k:>16}: {v}")
    if result["problems"]:
        print(f"  {len(result['problems'])} problem(s); see {Path(result['dataset_dir']) / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
