"""Benchmark: the aerial scene stages after the ingest, as plain functions (no Prefect).

Generates the demo scene (the embedded default world: 48 frames, 16 photos,
640x480), then times every stage of tasks.aerial.pipeline in one process:
features (images/s), pairs, matching (pairs/s), reference triangulation,
localization, dense depth (CPU backend, s/image), fusion, export, and prints the
accuracy against ground truth.

    python bench/bench_aerial_sfm.py                 # the demo scene
    python bench/bench_aerial_sfm.py --keep /tmp/x   # keep the outputs
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
    ap.add_argument("--keep", help="output folder to keep (default: a temporary one)")
    args = ap.parse_args()

    from tasks.aerial import pipeline as PL
    from tasks.aerial.earthstudio import ingest_scene
    from tasks.aerial.evaluate import evaluate_scene, summary_rows
    from tasks.aerial.io import read_pairs
    from tasks.aerial.megadepth import load_scene_list, preprocess_scene
    from tasks.aerial.synthetic_world import generate_world

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_aerial_sfm_"))
    times: dict[str, float] = {}
    try:
        world = generate_world(root, n_aerial=args.n_aerial, n_ground=args.n_ground, size=tuple(args.size))
        ingest_scene(root, world.scene)
        for e in load_scene_list(world.scene_list_path):
            preprocess_scene(root / "megadepth", e, root / "megadepth_processed")
        cfg = PL.PIPELINES.build()
        paths = PL.scene_paths(root, world.scene, root / "megadepth_processed", cfg)

        def timed(name, fn):
            t0 = time.perf_counter()
            out = fn()
            times[name] = time.perf_counter() - t0
            return out

        info = timed("collect", lambda: PL.collect_images(paths))
        names = info["reference"] + sorted(info["queries"])
        timed("features", lambda: PL.extract(paths, cfg, names))
        timed("pairs", lambda: PL.make_pairs(paths, cfg, info))
        n_pairs = len(read_pairs(paths.pairs_all))
        timed("matches", lambda: PL.match(paths, cfg))
        ref = timed("reference", lambda: PL.reference(paths, cfg))
        loc = timed("localization", lambda: PL.localize(paths, cfg, info))
        reg = timed("dense-prepare", lambda: PL.prepare_dense(paths, PL.cpu_backend(cfg)))
        dense = timed("dense", lambda: PL.dense_depths_cpu(paths, cfg, reg))
        timed("fusion", lambda: PL.fuse_cpu(paths, cfg))
        timed("export", lambda: PL.export_product(paths))
        acc = timed("evaluate", lambda: evaluate_scene(paths.product, paths.ground_truth, sorted(info["queries"])))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    w, h = args.size
    print(f"demo scene: {args.n_aerial} frames + {args.n_ground} photos, {w}x{h}")
    for k, v in times.items():
        print(f"  {k:<14} {v:7.2f} s")
    print(f"  total          {sum(times.values()):7.2f} s")
    print(f"features: {len(names) / times['features']:.1f} images/s; matching: {n_pairs} pairs, "
          f"{n_pairs / times['matches']:.1f} pairs/s; dense (CPU): {times['dense'] / max(len(reg), 1):.2f} s/image")
    print(f"reference: {ref.counts}")
    print(f"localization: {loc.counts}")
    print(f"dense failures: {dense['failures']}")
    for m, v, g in summary_rows(acc):
        print(f"  {m:<34} {v:<64} goal {g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
