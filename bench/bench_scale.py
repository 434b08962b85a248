"""Benchmark: what the multimodal flow itself costs per tile at 10 000 / 100 000 tiles.

Runs the real flow (local Prefect server, Dask LocalCluster) twice on N tiles
with tiny stacks (``--tile-size-m 100`` = 10x10 px, ``image_size`` 8) so that
disk and pixels are not the limit: a first run that fetches everything, then
a rerun with everything done. The source is the embedded synthetic one
(default; a few hundred microseconds a tile) or the Earth Engine source
against the loopback fake server of the tests with near-zero latency
(``--source earthengine``; then the earthengine-api client's own CPU per tile
is included). Reports:

* wall time per stage (tiles, scan = rerun decision, fetch, pack, assemble),
* CPU-seconds per tile of the flow process and of all Dask workers (less
  sensitive than wall time to other users of a shared machine),
* peak RSS of the flow process and of the largest worker process,
* Prefect database size and task runs,
* the flow's serial overhead against the ceiling-bound fetch time of
  bench/bench_earthengine.py's latency model (40 requests, 0.4 s + 1.5 s).

    nice -n 10 python bench/bench_scale.py --tiles 10000
    nice -n 10 python bench/bench_scale.py --tiles 100000 --out /tmp/scale100k
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
from benchlib import BackgroundSampler, cpu_seconds  # noqa: E402


class Sampler(BackgroundSampler):
    """Peak RSS and CPU seconds of this process and, per kind, of its child processes."""

    def __init__(self, period: float = 0.5) -> None:
        super().__init__(period)
        self.peak_main = 0
        self.peak_worker = 0
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, cpu seconds last seen)
        self._me = psutil.Process()

    @staticmethod
    def _kind(p: psutil.Process) -> str:
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            return "other"
        if "prefect" in cmd and "server" in cmd:
            return "prefect server"
        if "fake_ee" in cmd:
            return "fake ee"
        return "dask"

    def sample(self) -> None:
        try:
            self.peak_main = max(self.peak_main, self._me.memory_info().rss)
        except psutil.Error:
            pass
        for p in self._me.children(recursive=True):
            try:
                kind = self.cpu.get(p.pid, (None,))[0] or self._kind(p)
                t = p.cpu_times()
                self.cpu[p.pid] = (kind, t.user + t.system)
                if kind == "dask":
                    self.peak_worker = max(self.peak_worker, p.memory_info().rss)
            except psutil.Error:
                continue

    def cpu_of(self, kind: str) -> float:
        return sum(c for k, c in self.cpu.values() if k == kind)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=10000)
    ap.add_argument("--source", choices=["synthetic", "earthengine"], default="synthetic")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=250, help="tiles per fetch task")
    ap.add_argument("--part-size", type=int, default=500, help="tiles per pack task")
    ap.add_argument("--window", type=int, default=8, help="tasks in flight (tasks_in_flight)")
    ap.add_argument("--threads", type=int, default=4, help="fetching threads per task (earthengine)")
    ap.add_argument("--tile-size-m", type=float, default=100.0)
    ap.add_argument("--ceiling", type=int, default=40)
    ap.add_argument("--t-value", type=float, default=0.4, help="latency model of the bound (not applied)")
    ap.add_argument("--t-pixels", type=float, default=1.5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the output folder")
    args = ap.parse_args()

    from tasks.common.dask_settings import DaskSettings
    from tasks.common.prefect_server import local_prefect_server
    from tasks.common.task_runner import make_task_runner

    out = Path(args.out or tempfile.mkdtemp(prefix="bench_scale_"))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    fake_proc = None
    source_options: dict = {}
    if args.source == "earthengine":
        fake_proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fake_ee", "--latency-value", "0.001", "--latency-pixels", "0.001",
             "--max-concurrent", str(args.ceiling), "--missing-fraction", "0"],
            cwd=Path(__file__).resolve().parents[1], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        fake = json.loads(fake_proc.stdout.readline())
    results = []
    try:
        with local_prefect_server(home=out / "prefect", start_timeout=900) as server, Sampler() as mem:
            from flows.multimodal import multimodal_flow
            from tasks.multimodal.config import MultimodalConfig

            if args.source == "earthengine":
                from blocks import EarthEngineCredentials

                EarthEngineCredentials(project=fake["project"],
                                       service_account_key=json.dumps(fake["service_account_info"])
                                       ).save("bench-scale", overwrite=True)
                source_options = {"credentials_block": "bench-scale", "url": fake["url"]}
            cfg = MultimodalConfig(
                name="data_bench_scale", output_dir=str(out), n_tiles=args.tiles, sampling_mode=0,
                source=args.source, source_options=source_options, tile_size_m=args.tile_size_m, image_size=8,
                request_ceiling=args.ceiling, fetch_batch_size=args.batch, part_size=args.part_size,
                fetch_threads=args.threads if args.source == "earthengine" else 1,
                fetch_slots=min(args.threads, args.ceiling) if args.source == "earthengine" else None,
                tasks_in_flight=args.window, fetch_retry_delay_s=1.0,
            )
            for label in ("first run", "rerun, all done"):
                c0, w0 = cpu_seconds(), mem.cpu_of("dask")
                t0 = time.perf_counter()
                runner = make_task_runner(DaskSettings(n_workers=args.workers, threads_per_worker=1))
                result = multimodal_flow.with_options(task_runner=runner)(config=cfg)
                wall = time.perf_counter() - t0
                time.sleep(1.0)  # a last CPU sample of the workers before they are gone
                results.append({"label": label, "wall": wall, "cpu_flow": cpu_seconds() - c0,
                                "cpu_workers": mem.cpu_of("dask") - w0, "timings": result["timings"],
                                "counts": result["counts"]})
                print(f"{label}: {wall:.1f}s {json.dumps(result['timings'])}", flush=True)
            import httpx

            n_task_runs = httpx.post(f"{server.url}/task_runs/count", json={}, timeout=60).json()
            n_events = None
            try:
                n_events = httpx.post(f"{server.url}/events/count-by/event", json={"filter": {}}, timeout=60).json()
                n_events = sum(x.get("count", 0) for x in n_events)
            except Exception:
                n_events = None
        peak_main, peak_worker = mem.peak_main, mem.peak_worker
        db = sum(p.stat().st_size for p in (out / "prefect").glob("prefect.db*"))
        ds = out / "data_bench_scale"
        sizes = {
            "tiles GeoJSON": (ds / "data_bench_scale_tiles.geojson").stat().st_size,
            "stacks index": (ds / "work" / "stacks_index.jsonl").stat().st_size,
            "tile_info JSON": (ds / "data_bench_scale_tile_info.json").stat().st_size,
            "h5 manifest": (ds / "work" / "h5_manifest.json").stat().st_size,
        }
    finally:
        if fake_proc is not None:
            fake_proc.stdin.close()
            fake_proc.wait(timeout=60)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    n = args.tiles
    bound_s = n * (args.t_value + args.t_pixels) / args.ceiling
    print(f"\nN={n} tiles, source {args.source}, {args.workers} workers, batch {args.batch}, "
          f"part {args.part_size}, window {args.window}, stacks {int(args.tile_size_m / 10)} px")
    for r in results:
        t = r["timings"]
        print(f"{r['label']}: wall {r['wall']:.1f}s; tiles {t.get('tiles', 0):.1f}s, scan {t.get('scan', 0):.1f}s, "
              f"fetch {t.get('fetch', 0):.1f}s, pack {t.get('pack', 0):.1f}s, assemble {t.get('assemble', 0):.1f}s, "
              f"post {t.get('pack, write, statistics', 0):.1f}s; CPU flow {r['cpu_flow']:.1f}s "
              f"({1e3 * r['cpu_flow'] / n:.2f} ms/tile), workers {r['cpu_workers']:.1f}s "
              f"({1e3 * r['cpu_workers'] / n:.2f} ms/tile); counts {json.dumps(r['counts'])}")
    first = results[0]
    serial = first["wall"] - first["timings"].get("fetch", 0) + first["timings"].get("scan", 0)
    print(f"peak RSS: flow process {peak_main / 1e6:.0f} MB, largest worker {peak_worker / 1e6:.0f} MB")
    print(f"Prefect DB {db / 1e6:.1f} MB ({db / n:.0f} B/tile), {n_task_runs} task runs, events {n_events}")
    print("files: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()))
    print(f"ceiling-bound fetch time at {args.ceiling} requests, {args.t_value}+{args.t_pixels}s: {bound_s:.0f}s; "
          f"first run outside the fetch stage {serial:.0f}s = {serial / bound_s:.1%} of it; all flow+worker CPU "
          f"{first['cpu_flow'] + first['cpu_workers']:.0f}s = {(first['cpu_flow'] + first['cpu_workers']) / bound_s:.1%} "
          f"of one core over it")
    print(json.dumps({"n": n, "results": results, "peak_main": peak_main, "peak_worker": peak_worker, "db": db,
                      "task_runs": n_task_runs, "sizes": sizes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
