"""Benchmark: fetching stacks from Earth Engine under the request ceiling.

Runs the real multimodal flow (Prefect server, Dask cluster, the real
earthengine-api client) against the loopback fake Earth Engine of the tests
with a latency model (default 0.4 s per computeValue, 1.5 s per
computePixels) and a ceiling of 40 concurrent requests, which the fake also
enforces like the real service (a 41st concurrent request gets 429).

Reports for the fetch stage: tiles/s, API requests per tile, mean requests
in flight (= slots in use), and the ratio to the ceiling-bound rate
``ceiling / (t_value + t_pixels)``.

    python bench/bench_earthengine.py                     # 400 tiles, ceiling 40
    python bench/bench_earthengine.py --tiles 800 --threads 24
    python bench/bench_earthengine.py --tiles 600 --ceiling 10 --slots 5 --batch 50   # 2 cores: scaled down
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=400)
    ap.add_argument("--ceiling", type=int, default=40)
    ap.add_argument("--t-value", type=float, default=0.4)
    ap.add_argument("--t-pixels", type=float, default=1.5)
    ap.add_argument("--workers", type=int, default=2, help="Dask worker processes")
    ap.add_argument("--threads-per-worker", type=int, default=2,
                    help="Dask threads per worker: 2 lets a second fetch task run beside a draining one "
                         "(as the earthengine configuration)")
    ap.add_argument("--slots", type=int, default=None,
                    help="request slots leased per worker process (default: ceiling / workers)")
    ap.add_argument("--threads", type=int, default=None,
                    help="fetching threads per fetch task (default: 1.4 x slots)")
    ap.add_argument("--batch", type=int, default=None, help="tiles per fetch task (default: tiles / workers)")
    ap.add_argument("--tile-size-m", type=float, default=None,
                    help="smaller tiles (100: 10x10 px stacks) cut the client's and the fake's CPU per tile "
                         "(decoding, GeoTIFF), not the requests: for a machine too busy for full stacks")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    slots = args.slots or -(-args.ceiling // args.workers)
    threads = args.threads or int(round(1.4 * slots))

    import subprocess

    import httpx

    from tasks.common.dask_settings import DaskSettings
    from tasks.common.prefect_server import local_prefect_server
    from tasks.common.task_runner import make_task_runner

    out = Path(args.out or tempfile.mkdtemp(prefix="bench_ee_"))
    shutil.rmtree(out / "data_bench_ee", ignore_errors=True)
    # the fake runs in its own process: it must not share a GIL with what is measured
    fake_proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_ee", "--latency-value", str(args.t_value), "--latency-pixels",
         str(args.t_pixels), "--max-concurrent", str(args.ceiling), "--missing-fraction", "0"],
        cwd=Path(__file__).resolve().parents[1], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        fake = json.loads(fake_proc.stdout.readline())
        with local_prefect_server(home=out / "prefect") as server:
            from blocks import EarthEngineCredentials
            from flows.multimodal import multimodal_flow
            from tasks.multimodal.config import MultimodalConfig

            EarthEngineCredentials(project=fake["project"], service_account_key=json.dumps(fake["service_account_info"])
                                   ).save("bench-ee", overwrite=True)
            cfg = MultimodalConfig(
                name="data_bench_ee", output_dir=str(out), n_tiles=args.tiles, sampling_mode=2, source="earthengine",
                source_options={"credentials_block": "bench-ee", "url": fake["url"]},
                request_ceiling=args.ceiling, fetch_batch_size=args.batch or -(-args.tiles // args.workers), fetch_threads=threads, fetch_slots=slots,
                fetch_retry_delay_s=1.0, part_size=100,
                **({"tile_size_m": args.tile_size_m, "image_size": 8} if args.tile_size_m else {}),
            )
            runner = make_task_runner(DaskSettings(n_workers=args.workers, threads_per_worker=args.threads_per_worker))
            t0 = time.perf_counter()
            result = multimodal_flow.with_options(task_runner=runner)(config=cfg)
            total = time.perf_counter() - t0
            snap = httpx.get(f"{fake['url']}/__stats__", timeout=30).json()
            print(f"Prefect UI was {server.ui_url}")
    finally:
        fake_proc.stdin.close()
        fake_proc.wait(timeout=30)
        if not args.out:  # a temporary dataset: GBs of stacks
            shutil.rmtree(out, ignore_errors=True)

    fetch_s = result["timings"]["fetch"]
    n = result["counts"]["stacks done"]
    value, pixels = snap["total"].get("value", 0), snap["total"].get("pixels", 0)
    per_tile = {tid: c.get("value", 0) + c.get("pixels", 0) for tid, c in snap["requests_by_tile"].items()}
    bound = args.ceiling / (args.t_value + args.t_pixels)
    rate = n / fetch_s
    window = snap["tile_window_s"]
    print(f"\n{n} tiles fetched in {fetch_s:.1f}s (whole flow {total:.1f}s); ceiling {args.ceiling}, "
          f"{args.workers} workers x {args.threads_per_worker} Dask threads, {slots} slots and {threads} fetching "
          f"threads per task, batch {cfg.fetch_batch_size}, {int(cfg.tile_size_m / 10)} px stacks, latency {args.t_value}+{args.t_pixels}s")
    print(f"tiles/s: {rate:.2f}; ceiling-bound rate {bound:.2f} tiles/s; ratio {rate / bound:.1%}")
    bound_s = n / bound
    print(f"ceiling-bound time {bound_s:.1f}s; the flow's own overhead {(fetch_s - bound_s) / bound_s:.1%} of it "
          f"(steady state {(window - bound_s) / bound_s:.1%})")
    print(f"requests per tile: {(value + pixels) / max(n, 1):.2f} (max {max(per_tile.values())}); "
          f"computeValue {value}, computePixels {pixels}, rejected by the ceiling {snap['total'].get('rejected', 0)}")
    print(f"mean requests in flight (slots in use) during fetch: {snap['slot_seconds'] / fetch_s:.1f} "
          f"of {args.ceiling}; max in flight {snap['max_in_flight']}")
    print(f"steady state (first to last tile request, without cluster start-up): {window:.1f}s, "
          f"{n / window:.2f} tiles/s, ratio {n / window / bound:.1%}, mean in flight {snap['slot_seconds'] / window:.1f}")
    print(f"counts: {json.dumps(result['counts'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
