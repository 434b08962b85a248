"""Benchmark: the CPU dense stage on a demo scene's own (estimated) poses, evaluated as the
pipeline test does (coverage of the true-surface pixels, AbsRel, share within 1.25x, per group
and per image, with each image's sources).

Needs a root where the aerial pipeline has run up to the dense workspace (e.g. a copy of the
pipeline test's ``aerial_demo0`` folder, or the root of ``python -m flows.aerial``). Works on
that folder: it replaces ``dense/stereo``, ``dense/depths`` and the product's depths.

    python bench/bench_dense_demo.py --root /tmp/demo                      # PatchMatch, every image
    python bench/bench_dense_demo.py --root /tmp/demo --subset             # the pipeline test's subset
    python bench/bench_dense_demo.py --root /tmp/demo --set cpu_method='"sgbm"'
    python bench/bench_dense_demo.py --root /tmp/demo --keep-photometric --set patchmatch.geom_max_error=2.0

``--keep-photometric`` keeps the photometric maps already there (compare settings of the geometric
pass); with ``--subset`` the photometric maps of images outside the subset are removed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import cpu_seconds, patchmatch_demo  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--scene", default="0001")
    ap.add_argument("--subset", action="store_true", help="every photo and every third frame (the pipeline test)")
    ap.add_argument("--keep-photometric", action="store_true")
    ap.add_argument("--set", nargs="*", default=[], help="DenseConfig overrides key=value (JSON values)")
    args = ap.parse_args()

    from tasks.aerial import pipeline as PL
    from tasks.aerial.evaluate import evaluate_scene

    cfg, paths = patchmatch_demo(args.root, args.scene, args.set)
    names = PL.registered_names(paths)
    frames = [n for n in names if n.endswith(".jpeg")]
    queries = [n for n in names if not n.endswith(".jpeg")]
    todo = queries + (frames[::3] if args.subset else frames)
    shutil.rmtree(paths.dense / "depths", ignore_errors=True)
    stereo = paths.dense / "stereo"
    if not args.keep_photometric:
        shutil.rmtree(stereo, ignore_errors=True)
    else:
        for p in stereo.rglob("*.geometric.bin"):
            p.unlink()
        if args.subset:
            for p in stereo.rglob("*.photometric.bin"):
                if p.name.rsplit(".", 2)[0] not in todo:
                    p.unlink()
    c0, t0 = cpu_seconds(), time.perf_counter()
    res = PL.dense_depths_cpu(paths, cfg, todo)
    cpu, wall = cpu_seconds() - c0, time.perf_counter() - t0
    shutil.rmtree(paths.product, ignore_errors=True)
    PL.export_product(paths)
    acc = evaluate_scene(paths.product, paths.ground_truth, queries)["depth"]
    print(f"{cfg.dense.cpu_method} {' '.join(args.set) or 'defaults'}: {len(todo)} images, {wall:.0f} s wall, "
          f"{cpu:.0f} CPU-s ({cpu / max(1, len(todo)):.1f} per image); failures {res['failures'] or 'none'}")
    for g in ("aerial", "photos", "all"):
        if g in acc:
            m = acc[g]
            print(f"{g:<7} images {m['images']:3d} coverage {m['coverage']:.3f} AbsRel {m['absrel']:.4f} "
                  f"within 1.25x {m['within_1.25']:.3f}")
    for n, m in sorted(acc["per image"].items()):
        src = ",".join(s.rsplit(".", 1)[0][-8:] for s in res["stats"].get(n, {}).get("sources", []))
        print(f"  {n:<32} coverage {m['coverage']:.3f} AbsRel {m['absrel']:.4f} within {m['within_1.25']:.3f}  {src}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
