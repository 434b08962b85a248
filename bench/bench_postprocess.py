"""Benchmark: post-processing alone (stacks -> NAME.h5 + band stats + splits).

Builds N synthetic 130x130 float32 stacks with the embedded synthetic source
(once, cached in the work folder), then times post-processing alone: for a small N
(``convert.packs_locally``) ``convert.pack_to_h5``, packing threads (read, check, convert,
compress, statistics) beside the single writer, with no part files; above it, or with
``--runner dask``/``threads``, what the flow runs after fetching: ``pack_partition`` on every
Dask worker (or in local threads), ``assemble_h5`` (one writer, direct chunk writes) and the
merged statistics; then splits and the JSON files. Prints tiles/s, MB/s written and the
peak resident memory of the whole process tree (this process + Dask workers).
Packing reads each tile's JSON on the worker and checks every stack's digest
and grid against the record written with it, as the flow does; the cost of
that check is measured separately (one process, the same stacks read with and
without it).

    python bench/bench_postprocess.py                 # N=2000, 128 px
    python bench/bench_postprocess.py --n 500 --workers 2
    python bench/bench_postprocess.py --codec zlib --level 4   # plain zlib, for comparison
"""

from __future__ import annotations

import time

T_START = time.perf_counter()  # before the imports: --post-only counts the cold start

import argparse
import os
import shutil
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
from benchlib import BackgroundSampler  # noqa: E402

from tasks.multimodal import convert, stacks  # noqa: E402


class PeakRSS(BackgroundSampler):
    """Samples the summed RSS of this process and its children every 20 ms."""

    def __init__(self) -> None:
        super().__init__(period=0.02)
        self.peak = 0
        self.peak_main = 0
        self.peak_child = 0
        self._me = psutil.Process()

    def sample(self) -> None:
        total = 0
        for p in [self._me] + self._me.children(recursive=True):
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            if p.pid == self._me.pid:
                self.peak_main = max(self.peak_main, rss)
            else:
                self.peak_child = max(self.peak_child, rss)
        self.peak = max(self.peak, total)


def build_stacks(work: Path, n: int) -> tuple[list[str], dict]:
    # imported here, not at the top: --post-only times the cold start of post-processing, which
    # needs neither the tile sampler nor the synthetic source (their imports, pyproj and
    # pydantic among them, cost about 0.1 s of the 0.4 s of imports, measured with -X importtime)
    from tasks.multimodal import tiles as tiles_mod
    from tasks.multimodal.sources.synthetic import SyntheticSource

    regions = tiles_mod.load_regions(tiles_mod.DEFAULT_REGIONS)
    eco = tiles_mod.eco_region_index(regions)
    tiles = tiles_mod.sample_tiles(regions, eco, n, 0, seed=123)
    source = SyntheticSource(seed=123, eco_index=eco)
    t0 = time.perf_counter()
    for i, t in enumerate(tiles):
        stacks.fetch_tile(t, source, work)
        if (i + 1) % 500 == 0:
            print(f"  built {i + 1}/{n} stacks ({time.perf_counter() - t0:.0f}s)", flush=True)
    ids = [t.tile_id for t in tiles]
    return ids, stacks.load_tile_info(ids, work)


def integrity_cost(work: Path, ids: list[str], image_size: int, comp, n: int = 300) -> tuple[float, float, float]:
    """CPU ms per tile (this process) to read a stack without / with the digest + grid
    check, and to pack a tile (pack_partition over the same tiles, which includes the check)."""
    from tasks.multimodal.sources.base import read_stack

    sample = ids[:n]
    records = {t: stacks.read_tile_info(t, work)["STACK"] for t in sample}
    for t in sample[:20]:  # warm the page cache and GDAL
        read_stack(work / "tiles" / f"{t}.tif")
    out = []
    for verified in (False, True):
        t0 = time.process_time()
        for t in sample:
            if verified:
                stacks.read_verified_stack(work / "tiles" / f"{t}.tif", records[t])
            else:
                read_stack(work / "tiles" / f"{t}.tif")
        out.append(1e3 * (time.process_time() - t0) / len(sample))
    parts = work / "work" / "bench_parts_cpu"
    shutil.rmtree(parts, ignore_errors=True)
    t0 = time.process_time()
    convert.pack_partition(convert.PartSpec(0, sample), work / "tiles", stacks.TileInfoDir(work), parts, image_size, comp)
    out.append(1e3 * (time.process_time() - t0) / len(sample))
    shutil.rmtree(parts, ignore_errors=True)
    return out[0], out[1], out[2]


def cpu_now() -> tuple[float, float]:
    """CPU seconds so far of this process (scheduler, client, writer) and of its child
    processes (Dask nannies and workers while they live; packing processes once ended)."""
    me = psutil.Process()
    t = me.cpu_times()
    kids = t.children_user + t.children_system
    for p in me.children(recursive=True):
        try:
            c = p.cpu_times()
            kids += c.user + c.system
        except psutil.Error:
            pass
    return t.user + t.system, kids


def post_process(args, work: Path, ids: list[str], info: dict | None, phases: dict[str, float],
                 cpu: dict[str, tuple[float, float]] | None = None) -> tuple[int, float, float]:
    """What the stage runs once the stacks exist: pack every part (on a Dask cluster, or in
    local threads for a small N: ``convert.packs_locally``, ``--runner``), one writer, merged
    statistics, splits and the JSON files. Phase end times go to ``phases`` (seconds since
    T_START). Returns (N, pack seconds, assemble seconds)."""
    parts_dir = work / "work" / "bench_parts"
    shutil.rmtree(parts_dir, ignore_errors=True)
    comp = convert.Compression(args.codec, args.level)
    runner = args.runner
    if runner == "auto":
        runner = "writer" if convert.packs_locally(len(ids)) else "dask"
    specs = convert.make_partitions(ids, args.part_size)

    def mark(phase: str) -> None:
        phases[phase] = time.perf_counter() - T_START
        if cpu is not None:
            cpu[phase] = cpu_now()

    if runner == "writer":  # one pass: packing processes beside the single writer, no part files
        mark("imports")
        t0 = time.perf_counter()
        res = convert.pack_to_h5(ids, work / "tiles", stacks.TileInfoDir(work), work / "data_bench.h5",
                                 args.image_size, comp, workers=args.workers)
        t_pack = time.perf_counter() - t0
        mark("pack")  # the writer beside the packing: the h5 is written when the last tile is packed
        band_stats, _ = res.stats.band_stats()
        splits = convert.make_splits(res.n_rows)
        if info is None:
            info = stacks.load_tile_info(ids, work)
        convert.write_dataset_jsons(work, "data_bench", info, band_stats, splits)
        mark("stats + jsons")
        return res.n_rows, t_pack, 0.0

    if runner == "threads":
        mark("imports")
        mark("cluster up")  # none to start
        t0 = time.perf_counter()
        parts = convert.pack_partitions_local(specs, work / "tiles", stacks.TileInfoDir(work), parts_dir,
                                              args.image_size, comp, threads=args.workers)
        out = finish(args, work, ids, info, parts, comp, phases, mark, t0)
        mark("cluster closed")
        return out

    from distributed import Client, LocalCluster

    from tasks.common.dask_env import bound_dask_logs, keep_malloc_defaults

    keep_malloc_defaults()  # the workers' glibc settings as every flow's cluster has them
    bound_dask_logs()
    mark("imports")
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(lambda: None)  # workers up before the clock starts
        mark("cluster up")
        t0 = time.perf_counter()
        futs = [
            client.submit(convert.pack_partition, s, str(work / "tiles"), stacks.TileInfoDir(work),
                          str(parts_dir), args.image_size, comp, pure=False)
            for s in specs
        ]
        parts = client.gather(futs)
        out = finish(args, work, ids, info, parts, comp, phases, mark, t0)
    mark("cluster closed")
    return out


def finish(args, work: Path, ids: list[str], info: dict | None, parts: list, comp, phases: dict[str, float],
           mark, t0: float) -> tuple[int, float, float]:
    """After packing (``t0``: when it started): the writer, statistics, splits, JSON files."""
    t_pack = time.perf_counter() - t0
    mark("pack")
    n = convert.assemble_h5(parts, work / "data_bench.h5", args.image_size, comp)
    t_asm = time.perf_counter() - t0 - t_pack
    mark("assemble")
    band_stats, _ = convert.merge_part_stats(parts).band_stats()
    splits = convert.make_splits(n)
    if info is None:
        info = stacks.load_tile_info(ids, work)
    convert.write_dataset_jsons(work, "data_bench", info, band_stats, splits)
    mark("stats + jsons")
    return n, t_pack, t_asm


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--part-size", type=int, default=64)
    ap.add_argument("--codec", default="isal", choices=["isal", "zlib"])
    ap.add_argument("--level", type=int, default=1)
    ap.add_argument("--work", default="bench_out/postprocess")
    ap.add_argument("--runner", default="auto", choices=["auto", "writer", "dask", "threads"],
                    help="how: writer = packing threads beside the single writer, no part files "
                         "(convert.pack_to_h5); threads = part files packed in local threads, then "
                         "assembled; dask = part files packed on a Dask LocalCluster, then assembled; "
                         "auto = writer up to convert.LOCAL_PACK_MAX_TILES tiles, dask above; "
                         "--workers threads/workers")
    ap.add_argument("--post-only", action="store_true",
                    help="stacks already built by an earlier run: only post-process, timed from "
                         "this process's start (cold start: imports and the Dask cluster included)")
    args = ap.parse_args()

    work = Path(args.work).resolve() / f"n{args.n}"
    ids_file = work / "bench_ids.json"
    phases: dict[str, float] = {}
    if args.post_only:
        ids, info = json.loads(ids_file.read_text()), None
        cpu: dict[str, tuple[float, float]] = {}
        n, t_pack, t_asm = post_process(args, work, ids, info, phases, cpu)
        total = time.perf_counter() - T_START
        runner = args.runner if args.runner != "auto" else ("writer" if convert.packs_locally(n) else "dask")
        print(f"N={n} tiles, {args.image_size} px, {args.workers} workers, runner {runner}, part size {args.part_size}; "
              f"cold start included: {total:.2f}s = {n / total:.1f} tiles/s")
        prev, pc = 0.0, (0.0, 0.0)
        print(f"  {'phase':15s} {'wall':>7s} {'ends at':>8s}  CPU: this process (writer) + child processes (packers, Dask)")
        for k, v in phases.items():
            c = cpu.get(k, pc)
            print(f"  {k:15s} {v - prev:6.2f}s {v:7.2f}s  {c[0] - pc[0]:6.2f}s + {c[1] - pc[1]:6.2f}s")
            prev, pc = v, c
        return 0

    print(f"stacks: {work / 'tiles'}")
    ids, info = build_stacks(work, args.n)
    ids_file.write_text(json.dumps(ids))
    h5 = work / "data_bench.h5"
    comp = convert.Compression(args.codec, args.level)
    tif_bytes = sum((work / "tiles" / f"{t}.tif").stat().st_size for t in ids)
    with PeakRSS() as mem:
        n, t_pack, t_asm = post_process(args, work, ids, info, phases)
    elapsed = phases["stats + jsons"] - phases.get("cluster up", phases["imports"])
    plain_ms, verified_ms, pack_cpu_ms = integrity_cost(work, ids, args.image_size, comp)
    h5_mb = h5.stat().st_size / 1e6
    print(f"\nN={n} tiles, {args.image_size} px, {args.workers} workers, codec {args.codec} level {args.level}")
    print(f"input stacks: {tif_bytes / 1e6:.0f} MB; h5 written: {h5_mb:.0f} MB")
    if t_asm:
        print(f"pack (parallel): {t_pack:.1f}s; assemble (one writer): {t_asm:.1f}s; total {elapsed:.1f}s")
    else:
        print(f"pack and write (the writer beside the packing): {t_pack:.1f}s; total {elapsed:.1f}s")
    print(f"throughput: {n / elapsed:.1f} tiles/s, {h5_mb / elapsed:.1f} MB/s written, "
          f"{tif_bytes / 1e6 / elapsed:.1f} MB/s read")
    print(f"peak RSS: {mem.peak / 1e6:.0f} MB in all (this process + workers); "
          f"writer process {mem.peak_main / 1e6:.0f} MB, largest worker {mem.peak_child / 1e6:.0f} MB")
    print(f"integrity check (size + digest, CPU, one process): read {plain_ms:.2f} ms/tile plain, "
          f"{verified_ms:.2f} ms/tile verified: +{verified_ms - plain_ms:.2f} ms/tile = "
          f"{(verified_ms - plain_ms) / pack_cpu_ms:.1%} of the CPU of packing a tile ({pack_cpu_ms:.1f} ms, check included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
