"""Benchmark: how busy a batch's request slots stay to the end of every batch.

The flow's slot logic alone, without the Earth Engine client's CPU (which on a
busy 2-core machine, not the slots, limits ``bench_earthengine.py``): the real
``stacks.fetch_batch`` and ``EarthEngineSource.session``/``_request_slot``, with
requests that are sleeps (two per tile, ``t_value`` and ``t_pixels``) under a fake
global limit of ``ceiling`` slots (tests/test_slot_pool.py's ``FakeLimit``, which
also records whether a request ever ran without a held slot). ``workers``
simulated Dask workers, each with its own slot pool and ``threads_per_worker``
threads taking batches from one queue, as the flow's cluster does.

Reports the mean requests in flight against the ceiling and the time against
the ceiling-bound time ``tiles x (t_value + t_pixels) / ceiling``.

    python bench/bench_slot_tail.py                          # the earthengine preset, latencies / 2
    python bench/bench_slot_tail.py --threads-per-worker 1
"""

from __future__ import annotations

import argparse
import queue
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=2000)
    ap.add_argument("--ceiling", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads-per-worker", type=int, default=2)
    ap.add_argument("--slots", type=int, default=20)
    ap.add_argument("--threads", type=int, default=28)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--t-value", type=float, default=0.2)
    ap.add_argument("--t-pixels", type=float, default=0.75)
    args = ap.parse_args()

    import tasks.multimodal.sources.earthengine as ee_mod
    from tasks.common.concurrency import SlotPool
    from tasks.multimodal import stacks
    from tests import test_slot_pool as tsp

    limit = tsp.FakeLimit(args.ceiling)
    pools: dict[str, SlotPool] = {}
    ee_mod.slot = limit.slot  # the per-batch lease of the old design, if that is what runs
    ee_mod.shared_pool = lambda name, chunk, timeout_s=None: pools.setdefault(
        name, SlotPool(limit, chunk, poll_s=0.05, timeout_s=timeout_s))

    class Source(tsp.SlowSource):
        def fetch(self, tile, grid):
            for seconds in (args.t_value, args.t_pixels):
                with self._request_slot():
                    limit.request("x", seconds)
            raise tsp.NoDataError(tile.tile_id, "no image (bench)")

    tiles = tsp._tiles("t", args.tiles)
    batches: queue.SimpleQueue = queue.SimpleQueue()
    for i in range(0, len(tiles), args.batch):
        batches.put(tiles[i:i + args.batch])
    out = Path(tempfile.mkdtemp(prefix="bench_slot_tail_"))
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:  # requests in flight, every 10 ms
        while not stop.wait(0.01):
            samples.append(limit.in_flight)

    def worker_thread(w: int) -> None:
        src = Source(project="p", ceiling=args.ceiling, limit_name=f"worker-{w}")  # a pool per worker process
        src.limit = limit
        while True:
            try:
                batch = batches.get_nowait()
            except queue.Empty:
                return
            stacks.fetch_batch(batch, src, out, threads=args.threads, slots=args.slots)

    threads = [threading.Thread(target=worker_thread, args=(w,)) for w in range(args.workers)
               for _ in range(args.threads_per_worker)]
    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    sampler.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    shutil.rmtree(out, ignore_errors=True)  # the no-data tile JSONs
    bound = args.tiles * (args.t_value + args.t_pixels) / args.ceiling
    mean = sum(samples) / max(len(samples), 1)
    print(f"{args.tiles} tiles, ceiling {args.ceiling}, {args.workers} workers x {args.threads_per_worker} threads, "
          f"batch {args.batch}, {args.slots} slots / {args.threads} threads per task, latency "
          f"{args.t_value}+{args.t_pixels}s")
    print(f"wall {wall:.1f}s; ceiling-bound {bound:.1f}s; overhead {(wall - bound) / bound:.1%}; "
          f"mean in flight {mean:.1f} of {args.ceiling} ({mean / args.ceiling:.1%}); max held {limit.max_held}, "
          f"max in flight {limit.max_in_flight}; requests without a held slot: {len(limit.violations)}; "
          f"limit calls {limit.calls} ({limit.calls / -(-args.tiles // args.batch):.1f} per batch)")
    return 0 if not limit.violations and limit.max_held <= args.ceiling else 1


if __name__ == "__main__":
    sys.exit(main())
