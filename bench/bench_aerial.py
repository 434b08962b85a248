"""Benchmark: the aerial flow's first stages, as plain functions.

Times the synthetic world generation (the embedded default), the Earth Studio
ingest (frames decoded and written per second) and the MegaDepth preprocessing
(images per second, one process and with threads).

    python bench/bench_aerial.py                      # the default world: 48 frames, 16 photos, 640x480
    python bench/bench_aerial.py --size 1600 1200     # bigger renders and photos
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-aerial", type=int, default=48)
    ap.add_argument("--n-ground", type=int, default=16)
    ap.add_argument("--size", type=int, nargs=2, default=[640, 480])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from tasks.aerial import megadepth
    from tasks.aerial.earthstudio import ingest_scene
    from tasks.aerial.synthetic_world import generate_world

    root = Path(tempfile.mkdtemp(prefix="bench_aerial_"))
    try:
        t0 = time.perf_counter()
        world = generate_world(root, n_aerial=args.n_aerial, n_ground=args.n_ground, size=tuple(args.size))
        t_world = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = ingest_scene(root, world.scene, force=True)
        t_ingest = time.perf_counter() - t0
        entry = megadepth.load_scene_list(world.scene_list_path)[0]
        t0 = time.perf_counter()
        r1 = megadepth.preprocess_scene(world.megadepth_root, entry, root / "md1")
        t_md1 = time.perf_counter() - t0
        t0 = time.perf_counter()
        r2 = megadepth.preprocess_scene(world.megadepth_root, entry, root / "md2", workers=args.threads)
        t_md2 = time.perf_counter() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)
    w, h = args.size
    print(f"synthetic world ({args.n_aerial} aerial frames + {args.n_ground} photos, {w}x{h}): {t_world:.1f}s")
    print(f"Earth Studio ingest: {res.frames_written} frames in {t_ingest:.2f}s = {res.frames_written / t_ingest:.1f} frames/s "
          "(decode + JPEG write + metadata + reference model)")
    ok1 = sum(r.status == "done" for r in r1)
    ok2 = sum(r.status == "done" for r in r2)
    print(f"MegaDepth preprocessing: {ok1} images in {t_md1:.2f}s = {ok1 / t_md1:.1f} images/s (1 thread); "
          f"{ok2 / t_md2:.1f} images/s ({args.threads} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
