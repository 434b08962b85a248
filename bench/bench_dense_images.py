"""Benchmark: the CPU PatchMatch on a few images of the default synthetic world (ground-truth
poses and points), one configuration at a time: the photometric pass on the images and their
sources, the geometric pass on the images, then coverage of the true surface, AbsRel and the
share within 1.25x of each pass's maps against the exact depth, and the CPU-seconds per pass.

    python bench/bench_dense_images.py --root /tmp/w                      # frame 0001_010, one photo
    python bench/bench_dense_images.py --root /tmp/w --set patchmatch.min_consistent=1 patchmatch.geom_max_error=2.0
    python bench/bench_dense_images.py --root /tmp/w --names 0001_030.jpeg --geometric-only

``--geometric-only`` keeps the photometric maps already in the workspace (compare filters of the
geometric pass without recomputing them); the geometric maps are always recomputed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from benchlib import cpu_seconds  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="world folder (made when missing)")
    ap.add_argument("--names", nargs="*", default=None, help="images (default: frame 10 and photo 3)")
    ap.add_argument("--set", nargs="*", default=[], help="DenseConfig overrides key=value (JSON values)")
    ap.add_argument("--geometric-only", action="store_true")
    args = ap.parse_args()

    from tasks.aerial import dense as D
    from tasks.aerial.dense import patchmatch as PM
    from tasks.aerial.earthstudio import ingest_scene
    from tasks.aerial.synthetic_world import ensure_world

    world = ensure_world(args.root)
    footage = args.root / "data" / world.scene / "footage"
    if not footage.is_dir():
        ingest_scene(args.root, world.scene)
    ws_path = args.root / "ws"
    if not (ws_path / "sparse").is_dir():
        mapping = {n: footage for n in world.frame_names}
        mapping.update({n: world.images_dir for n in world.photo_names})
        D.prepare_workspace(world.gt_sparse_dir, mapping, ws_path)
    ws = D.open_workspace(ws_path)
    cfg = D.DenseConfig().with_overrides({k: json.loads(v) for k, v in (a.split("=", 1) for a in args.set)})
    names = args.names or [world.frame_names[10], world.photo_names[3]]
    todo = set(names)
    for n in names:
        todo |= {ws.rec.images[j].name for j in PM.source_ids(ws.rec, ws.by_name[n], cfg)}
    if not args.geometric_only:
        for n in todo:
            for p in D.map_paths(ws_path, n, "photometric"):
                p.unlink(missing_ok=True)
    for n in names:
        for p in D.map_paths(ws_path, n, "geometric"):
            p.unlink(missing_ok=True)
    c0, t0 = cpu_seconds(), time.perf_counter()
    r1 = D.run_patch_match(ws, sorted(todo), cfg, "photometric")
    c1, t1 = cpu_seconds(), time.perf_counter()
    r2 = D.run_patch_match(ws, names, cfg, "geometric")
    c2, t2 = cpu_seconds(), time.perf_counter()
    n_phot = sum(not s["skipped"] for s in r1["stats"].values())
    print(f"config overrides {args.set or 'none'}; photometric: {n_phot} images, {c1 - c0:.1f} CPU-s "
          f"({(c1 - c0) / max(1, n_phot):.2f} per image, {t1 - t0:.1f} s wall); geometric: {len(names)} images, "
          f"{c2 - c1:.1f} CPU-s ({(c2 - c1) / len(names):.2f} per image, {t2 - t1:.1f} s wall); "
          f"failures {r1['failures'] or ''}{r2['failures'] or ''}")
    for n in names:
        c = ws.rec.cameras[ws.rec.images[ws.by_name[n]].camera_id]
        gt = D.read_depth_h5(world.gt_depths_dir / f"{D.image_stem(n)}.h5")
        for kind in ("photometric", "geometric"):
            d = cv2.resize(D.read_colmap_array(D.map_paths(ws_path, n, kind)[0]), (c.width, c.height),
                           interpolation=cv2.INTER_NEAREST)
            both = (d > 0) & (gt > 0)
            e, g = d[both].astype(float), gt[both].astype(float)
            rel = np.abs(e - g) / g
            print(f"{n:<32} {kind:<12} coverage {both.sum() / max(1, (gt > 0).sum()):.3f} AbsRel {rel.mean():.4f} "
                  f"median {np.median(rel):.4f} within 1.25x {np.mean(np.maximum(e / g, g / e) < 1.25):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
