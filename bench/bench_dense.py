"""Benchmark: a CPU dense-depth backend (tasks/aerial/dense/) against exact ground truth.

``--backend patchmatch`` (default): the PatchMatch MVS (photometric pass over every image, then the
geometric pass, then the export of the maps); ``--backend sgbm``: the OpenCV SGBM backend.

Generates the synthetic world (default parameters: 48 aerial frames, 16 ground photos,
640x480), ingests the Earth Studio video, builds a dense workspace from the ground-truth
sparse model (metric ENU poses; aerial frames from the ingested footage, ground photos from
the MegaDepth image folder), runs ``run_dense`` on every image and compares each depth map with
the ground-truth depth. Per image it prints the time, the fraction of pixels with an estimate
(``valid``), and over the pixels that have both an estimate and a ground-truth surface: AbsRel
(mean |d - gt| / gt) and delta<1.25 (share with max(d/gt, gt/d) < 1.25); ``spurious`` is the
share of estimates where the ground truth has no surface (sky). Summaries for aerial frames and
ground photos are printed separately (pixel-weighted over images with estimates).

    python bench/bench_dense.py                       # default world in a temporary folder
    python bench/bench_dense.py --root /tmp/w --keep   # reuse / keep a world folder
    python bench/bench_dense.py --limit 8              # only the first 8 aerial frames and 4 photos
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def metrics(est: np.ndarray, gt: np.ndarray) -> dict:
    has = est > 0
    both = has & (gt > 0)
    out = {"valid": float(has.mean()), "n": int(both.sum()), "known": int((gt > 0).sum()),
           "spurious": float((has & (gt <= 0)).sum() / max(1, has.sum()))}
    if both.any():
        e, g = est[both].astype(np.float64), gt[both].astype(np.float64)
        out["abs_rel_sum"] = float(np.sum(np.abs(e - g) / g))
        out["d125_sum"] = float(np.sum(np.maximum(e / g, g / e) < 1.25))
        out["abs_rel"] = out["abs_rel_sum"] / out["n"]
        out["d125"] = out["d125_sum"] / out["n"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=None, help="world folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary world folder")
    ap.add_argument("--n-aerial", type=int, default=48)
    ap.add_argument("--n-ground", type=int, default=16)
    ap.add_argument("--size", type=int, nargs=2, default=[640, 480])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="only this many aerial frames (and half as many photos)")
    ap.add_argument("--num-sources", type=int, default=None)
    ap.add_argument("--backend", choices=["patchmatch", "sgbm"], default="patchmatch")
    ap.add_argument("--set", nargs="*", default=[], help="DenseConfig overrides key=value (JSON values)")
    args = ap.parse_args()

    from tasks.aerial import dense
    from tasks.aerial.earthstudio import ingest_scene
    from tasks.aerial.synthetic_world import ensure_world

    tmp = args.root is None
    root = Path(tempfile.mkdtemp(prefix="bench_dense_")) if tmp else args.root
    try:
        t0 = time.perf_counter()
        world = ensure_world(root, n_aerial=args.n_aerial, n_ground=args.n_ground, size=tuple(args.size),
                             seed=args.seed)
        ingest_scene(root, world.scene)
        t_world = time.perf_counter() - t0
        footage = root / "data" / world.scene / "footage"
        mapping = {n: footage for n in world.frame_names}
        mapping.update({n: world.images_dir for n in world.photo_names})
        ws = root / "dense_bench" / "workspace"
        depth_dir = root / "dense_bench" / "depths"
        shutil.rmtree(depth_dir, ignore_errors=True)  # always measure, never resume
        dense.prepare_workspace(world.gt_sparse_dir, mapping, ws)
        import json
        import resource

        cfg = dense.DenseConfig(backend="cpu", cpu_method=args.backend).with_overrides(
            {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.set)})
        if args.num_sources:
            cfg.num_sources = args.num_sources
        frames = world.frame_names[: args.limit] if args.limit else world.frame_names
        photos = world.photo_names[: max(1, args.limit // 2)] if args.limit else world.photo_names
        shutil.rmtree(ws / "stereo", ignore_errors=True)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        if args.backend == "sgbm":
            res = dense.run_dense(ws, frames + photos, cfg, depth_dir)
        else:
            from tasks.aerial.dense.backends import merge_dense_results

            W = dense.open_workspace(ws)
            steps = [dense.run_patch_match(W, frames + photos, cfg, "photometric"),
                     dense.run_patch_match(W, frames + photos, cfg, "geometric"),
                     dense.export_colmap_depths(W, depth_dir, frames + photos, kind="geometric")]
            res = merge_dense_results(steps)
        t_dense = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu_dense = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)

        print(f"world {args.n_aerial} aerial + {args.n_ground} photos, {args.size[0]}x{args.size[1]}, seed {args.seed} "
              f"(generated/ingested in {t_world:.1f}s); workspace {ws}")
        if args.backend == "sgbm":
            print(f"config: sgbm num_sources={cfg.num_sources} min_consistent={cfg.sgbm.min_consistent} "
                  f"rel_tolerance={cfg.sgbm.rel_tolerance} max_disparities={cfg.sgbm.max_disparities} "
                  f"cpu size={cfg.sgbm.max_image_size} sgbm block={cfg.sgbm.block_size} mode={cfg.sgbm.mode}")
        else:
            print(f"config: patchmatch num_sources={cfg.num_sources} "
                  + " ".join(f"{k}={v}" for k, v in vars(cfg.patchmatch).items()))
        header = f"{'image':<32} {'kind':<6} {'sec':>6} {'valid':>6} {'AbsRel':>7} {'d<1.25':>7} {'spur':>6} sources"
        groups: dict[str, list[dict]] = {"aerial": [], "ground": []}
        print(header)
        for kind, names in (("aerial", frames), ("ground", photos)):
            for name in names:
                if name in res["failures"]:
                    print(f"{name:<32} {kind:<6} FAILED {res['failures'][name]}")
                    continue
                st = res["stats"][name]
                est = dense.read_depth_h5(dense.depth_path(depth_dir, name))
                gt = dense.read_depth_h5(world.gt_depths_dir / f"{dense.image_stem(name)}.h5")
                m = metrics(est, gt)
                m["seconds"] = st["seconds"]
                groups[kind].append(m)
                ar = f"{m['abs_rel']:.4f}" if "abs_rel" in m else "   -   "
                d1 = f"{m['d125']:.3f}" if "d125" in m else "   -  "
                src = ",".join(s.rsplit(".", 1)[0][-8:] for s in st.get("sources", [])) or st.get("note", "-")
                print(f"{name:<32} {kind:<6} {st['seconds']:6.2f} {m['valid']:6.3f} {ar:>7} {d1:>7} "
                      f"{m['spurious']:6.4f} {src}")
        print()
        for kind, ms in groups.items():
            if not ms:
                continue
            n = sum(m["n"] for m in ms)
            with_est = [m for m in ms if m["n"] > 0]
            secs = [m["seconds"] for m in ms]
            line = (f"{kind:<6}: {len(ms)} images, {len(with_est)} with estimates; "
                    f"time/image mean {np.mean(secs):.2f}s (max {np.max(secs):.2f}s); "
                    f"valid fraction mean {np.mean([m['valid'] for m in ms]):.3f} "
                    f"(median {np.median([m['valid'] for m in ms]):.3f}, min {np.min([m['valid'] for m in ms]):.3f}); "
                    f"coverage of true surface {n / max(1, sum(m['known'] for m in ms)):.3f} "
                    f"(worst image {min(m['n'] / max(1, m['known']) for m in ms):.3f})")
            if n:
                line += (f"; AbsRel {sum(m.get('abs_rel_sum', 0) for m in ms) / n:.4f}, "
                         f"delta<1.25 {sum(m.get('d125_sum', 0) for m in ms) / n:.3f} (pixel-weighted), "
                         f"worst image AbsRel {max(m['abs_rel'] for m in with_est):.4f}, "
                         f"spurious {sum(m['spurious'] * m['valid'] for m in ms) / max(1e-9, sum(m['valid'] for m in ms)):.4f}")
            print(line)
        print(f"failures: {len(res['failures'])}; total dense time {t_dense:.1f}s wall, {cpu_dense:.1f} CPU-s "
              f"({t_dense / max(1, len(frames) + len(photos)):.2f}s wall, "
              f"{cpu_dense / max(1, len(frames) + len(photos)):.2f} CPU-s per image)")
    finally:
        if tmp and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif tmp:
            print(f"kept {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
