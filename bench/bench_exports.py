"""Benchmark: the training exports (tasks/aerial/covisibility.py, tasks/aerial/training_export.py).

Two parts:

* ``--root ROOT [--scene S]``: a finished scene product (``python -m flows.aerial`` or the
  demo built by ``tests/test_aerial_pipeline.py``'s helpers): the frustum pruning, the
  covisibility blocks (time per 1000 candidate pairs), the scene files and the dataset
  index, timed per stage; with the synthetic ground truth, the agreement of the pair
  covisibilities with the same quantity recomputed from the true poses and depths.
* ``--synthetic 50,100,200,400``: nadir cameras over a plane at a constant density (the
  area grows with the count): candidate pairs, planning time and block time against the
  number of images, to show the cost follows the candidates, not images squared.

    nice -n 10 python bench/bench_exports.py --root output/aerial
    nice -n 10 python bench/bench_exports.py --synthetic 50,100,200,400
    nice -n 10 python bench/bench_exports.py --root output/aerial --pose-error 0.5   # must fail the test's thresholds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from tasks.aerial import covisibility as C  # noqa: E402
from tasks.aerial import training_export as T  # noqa: E402


def _warm() -> None:
    """Load the numba kernel (from its cache) outside the timings."""
    C._count_agreeing(np.ones((2, 2), np.float32), np.eye(3), np.ones((2, 2), np.float32), np.eye(3), np.eye(3),
                      np.zeros(3), 1, 0.1)


def bench_product(root: Path, scene: str, export: Path | None, pose_error_deg: float = 0.0, truth: bool = True) -> dict:
    from tasks.aerial import pipeline as PL

    paths = PL.scene_paths(root, scene, root / "megadepth_processed", PL.PIPELINES.build())
    cfg = T.export_config()
    export = export or Path(tempfile.mkdtemp(prefix="bench_exports_"))
    _warm()
    t0 = time.perf_counter()
    plan = C.plan(paths.product, T.covisibility_work(export, scene), cfg.covisibility)
    t_plan = time.perf_counter() - t0
    if pose_error_deg:  # a deliberate regression: every product pose rotated about a random axis
        from scipy.spatial.transform import Rotation

        rng = np.random.default_rng(0)
        for v in plan.views:
            ax = rng.normal(size=3)
            v.w2c[:3, :3] = Rotation.from_rotvec(np.radians(pose_error_deg) * ax / np.linalg.norm(ax)).as_matrix() \
                @ v.w2c[:3, :3]
        plan.key += f"-pose-error-{pose_error_deg}"
    t0, c0 = time.perf_counter(), time.process_time()
    missing = plan.missing_blocks()
    for n, k in enumerate(missing, 1):
        C.run_block(plan, k, cfg.covisibility)
        if n % 200 == 0:
            print(f"  {n}/{len(missing)} blocks, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    t_blocks, c_blocks = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    entry = T.export_scene(export, scene, paths.product, T.reference_names(paths.scene_dir), plan, cfg,
                           {"pipeline": "sift+mnn"})
    t_scene = time.perf_counter() - t0
    t0 = time.perf_counter()
    T.export_dataset(export, None, cfg)
    t_index = time.perf_counter() - t0
    n_pairs = len(plan.pairs)
    out = {"scene": scene, "images": len(plan.views), **plan.counts, "blocks": len(plan.blocks),
           "plan s": round(t_plan, 2), "blocks s": round(t_blocks, 2), "blocks CPU s": round(c_blocks, 2),
           "blocks run": len(missing),
           "blocks s per 1000 pairs": round(1000 * t_blocks / max(1, n_pairs), 2),
           "scene files s": round(t_scene, 2), "index s": round(t_index, 2),
           "total per scene s": round(t_plan + t_blocks + t_scene + t_index, 2),
           "pairs per range": {k: v["pairs"] for k, v in entry["ranges"].items()},
           "aerial-ground per range": {k: v["aerial-ground"] for k, v in entry["ranges"].items()}}
    if truth and (paths.ground_truth / "sparse").is_dir():
        est, known = C.matrices(plan)
        ij = np.array(plan.pairs).reshape(-1, 2)
        i, j = np.r_[ij[:, 0], ij[:, 1]], np.r_[ij[:, 1], ij[:, 0]]
        for label, support in (("on the product's depth pixels", True), ("full true depth", False)):
            gt, gtk = C.ground_truth_matrices(plan, paths.ground_truth, cfg.covisibility, on_estimate_support=support)
            keep = gt[i, j] >= 0
            for name, a, b in (("covisibility", est, gt), ("known", known, gtk if support else gt)):
                d = np.abs(a[i, j] - b[i, j])[keep]
                out[f"|{name} - truth| ({label})"] = {
                    "mean": round(float(d.mean()), 4), "p90": round(float(np.percentile(d, 90)), 4),
                    "max": round(float(d.max()), 4), "mean estimate": round(float(a[i, j][keep].mean()), 3),
                    "mean truth": round(float(b[i, j][keep].mean()), 3)}
    return out


def bench_synthetic(counts: list[int], density_m: float = 40.0, size=(160, 120)) -> list[dict]:
    """Nadir cameras 80-120 m over the plane z = 0, one per ``density_m`` x ``density_m``
    on average (footprint about 130 x 100 m, so each overlaps a handful of others)."""
    from tasks.aerial.dense import write_depth_h5

    _warm()
    rows = []
    for n in counts:
        rng = np.random.default_rng(n)
        side = density_m * np.sqrt(n)
        tmp = Path(tempfile.mkdtemp(prefix="bench_covis_"))
        views = []
        for k in range(n):
            c = np.array([rng.uniform(0, side), rng.uniform(0, side), rng.uniform(80, 120)])
            a = rng.uniform(0, 2 * np.pi)
            r_c2w = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag([1, -1, -1])
            w2c = np.eye(4)
            w2c[:3, :3] = r_c2w.T
            w2c[:3, 3] = -r_c2w.T @ c
            w, h = size
            K = np.array([[200.0 * w / 160, 0, w / 2], [0, 200.0 * w / 160, h / 2], [0, 0, 1]])
            v = C.View(f"v{k:04d}", K, w2c, w, h, None)
            v.depth_file = write_depth_h5(tmp / f"{v.name}.h5", np.full((h, w), c[2], np.float32))
            views.append(v)
        cfg = C.CovisibilityConfig()
        t0 = time.perf_counter()
        pairs, cnt = C.candidate_pairs(views, cfg)
        t_plan = time.perf_counter() - t0
        t0 = time.perf_counter()
        for k, b in enumerate(C.blocks(pairs, cfg.block_pairs)):
            C.compute_block(views, b, cfg, C.block_path(tmp / "work", k), key="bench")
        t_blocks = time.perf_counter() - t0
        rows.append({"images": n, **cnt, "plan s": round(t_plan, 2), "blocks s": round(t_blocks, 2),
                     "blocks s per 1000 pairs": round(1000 * t_blocks / max(1, len(pairs)), 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path)
    ap.add_argument("--scene", default="0001")
    ap.add_argument("--export", type=Path, help="export root (default: a temporary folder)")
    ap.add_argument("--synthetic", help="comma-separated image counts")
    ap.add_argument("--pose-error", type=float, default=0.0,
                    help="degrees of rotation error added to every product pose (a deliberate regression)")
    ap.add_argument("--no-truth", action="store_true",
                    help="skip the agreement with the synthetic ground truth (at 1000 images it costs more than the export)")
    a = ap.parse_args(argv)
    if a.root:
        print(json.dumps(bench_product(a.root.resolve(), a.scene, a.export, a.pose_error, not a.no_truth), indent=1))
    if a.synthetic:
        bench_synthetic([int(x) for x in a.synthetic.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
