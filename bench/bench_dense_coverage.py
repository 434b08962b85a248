"""Benchmark: where the CPU PatchMatch loses coverage on a demo scene (issue 14).

Per image, on the true-surface pixels (ground-truth depth > 0) at the PatchMatch working size:

* **bounds** from the synthetic ground truth (its poses and depth maps): the share of those
  pixels whose surface point is seen (projects inside, in front, and the source's true depth
  there agrees within 2 %) by at least 2 views with a per-pixel triangulation angle of at least
  ``patchmatch.min_triangulation_angle`` (the filter's) — ``sel``: among the sources the geometric pass
  selected; ``all``: among every image whose principal axis is within ``max_view_angle`` and
  with the per-pixel angle at most ``max_triangulation_angle`` (the selection's limits);
* the **loss per step**: no texture (``patchmatch.min_std``), no correct depth (relative error under
  5 %) in the photometric map / in the geometric pass before its filter, correct but removed by
  the geometric filter (split by whether 2 selected sources truly see the pixel), kept; and the
  coverage after the export to the image size, as the pipeline test evaluates it
  (``evaluate_scene``).

Needs a root where the aerial pipeline has run up to the dense workspace (see
``bench_dense_demo.py``); runs the photometric pass where its maps are missing (resume), always
the geometric pass, then the export:

    python bench/bench_dense_coverage.py --root /tmp/demo                       # every image
    python bench/bench_dense_coverage.py --root /tmp/demo --names 0001_020.jpeg 0001_045.jpeg
    python bench/bench_dense_coverage.py --root /tmp/demo --fresh --set num_sources=6
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import cpu_seconds, patchmatch_demo  # noqa: E402

import numpy as np  # noqa: E402


class _GT:
    """The synthetic ground truth: camera, pose and raw depth map per image name."""

    def __init__(self, gt_dir: Path):
        import pycolmap

        from tasks.aerial.dense import read_depth_h5
        from tasks.aerial.geometry import cam_from_world

        rec = pycolmap.Reconstruction(str(gt_dir / "sparse"))
        self.cams = {}
        for im in rec.images.values():
            cam = rec.cameras[im.camera_id]
            m = cam_from_world(im)
            p = gt_dir / "depths" / f"{Path(im.name).stem}.h5"
            if p.exists():
                self.cams[im.name] = (np.asarray(cam.calibration_matrix(), float), m[:, :3], m[:, 3],
                                      read_depth_h5(p))

    def views(self, name: str, shape: tuple[int, int], others: list[str], min_angle: float, max_angle: float,
              max_view_angle: float | None) -> np.ndarray:
        """Per pixel of a ``shape`` grid of ``name`` (the raw camera scaled): how many of ``others``
        truly see its surface point within the angles (0 where no true surface)."""
        from tasks.aerial.evaluate import gt_depth_on_grid

        K, R, t, gd = self.cams[name]
        h, w = shape
        Kg = np.diag([w / gd.shape[1], h / gd.shape[0], 1.0]) @ K
        d = gt_depth_on_grid(gd, K, Kg, shape).ravel()
        u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
        rays = np.linalg.inv(Kg) @ np.stack([u.ravel(), v.ravel(), np.ones(u.size)])
        X = (R.T @ (rays * d - t[:, None])).T  # world points
        C = -R.T @ t
        count = np.zeros(u.size, np.int32)
        lo, hi = math.cos(math.radians(min_angle)), math.cos(math.radians(max_angle))
        for o in others:
            if o not in self.cams or o == name:
                continue
            Ko, Ro, to, go = self.cams[o]
            if max_view_angle is not None and float(R[2] @ Ro[2]) < math.cos(math.radians(max_view_angle)):
                continue
            xc = X @ Ro.T + to
            z = xc[:, 2]
            with np.errstate(divide="ignore", invalid="ignore"):
                px = xc @ Ko.T
                uu, vv = px[:, 0] / px[:, 2], px[:, 1] / px[:, 2]
            ok = (d > 0) & (z > 0) & (uu >= 0) & (vv >= 0) & (uu < go.shape[1]) & (vv < go.shape[0])
            iy, ix = np.floor(vv[ok]).astype(int), np.floor(uu[ok]).astype(int)
            g = go[iy, ix]
            vis = np.zeros(u.size, bool)
            vis[ok] = (g > 0) & (np.abs(g - z[ok]) <= 0.02 * z[ok])
            Co = -Ro.T @ to
            a, b = C - X, Co - X
            cosang = np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
            count += vis & (cosang <= lo) & (cosang >= hi)
        return count.reshape(shape)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--scene", default="0001")
    ap.add_argument("--names", nargs="*", default=None, help="images to analyse (default: every registered one)")
    ap.add_argument("--fresh", action="store_true", help="recompute the photometric maps too")
    ap.add_argument("--set", nargs="*", default=[], help="DenseConfig overrides key=value (JSON values)")
    ap.add_argument("--tolerance", type=float, default=0.05, help="relative error of a correct depth")
    args = ap.parse_args()

    from tasks.aerial import dense as D
    from tasks.aerial import pipeline as PL
    from tasks.aerial.dense.patchmatch import working_size
    from tasks.aerial.dense.views import _cam
    from tasks.aerial.evaluate import evaluate_scene, gt_depth_on_grid

    cfg, paths = patchmatch_demo(args.root, args.scene, args.set)
    dc = cfg.dense
    names = PL.registered_names(paths)
    queries = [n for n in names if not n.endswith(".jpeg")]
    todo = args.names or names
    stereo = paths.dense / "stereo"
    if args.fresh:
        shutil.rmtree(stereo, ignore_errors=True)
    for n in todo:
        for p in D.map_paths(paths.dense, n, "geometric"):
            p.unlink(missing_ok=True)
    ws = D.open_workspace(paths.dense)
    c0 = cpu_seconds()
    r1 = D.run_patch_match(ws, names, dc, "photometric")  # every image: the sources need maps
    c1 = cpu_seconds()
    details: dict = {}
    r2 = D.run_patch_match(ws, todo, dc, "geometric", details=details)
    c2 = cpu_seconds()
    shutil.rmtree(paths.dense / "depths", ignore_errors=True)
    D.export_colmap_depths(ws, paths.dense / "depths", names, kind="geometric")
    shutil.rmtree(paths.product, ignore_errors=True)
    PL.export_product(paths)
    acc = evaluate_scene(paths.product, paths.ground_truth, queries)["depth"]
    n_phot = sum(not s["skipped"] for s in r1["stats"].values())
    print(f"patchmatch {' '.join(args.set) or 'defaults'}: photometric {n_phot} images computed, "
          f"{c1 - c0:.0f} CPU-s; geometric {len(todo)} images, {c2 - c1:.0f} CPU-s "
          f"({(c2 - c1) / max(1, len(todo)):.1f} per image); failures {r1['failures'] or ''}{r2['failures'] or 'none'}")

    gt = _GT(paths.ground_truth)
    cols = ("true", "bound sel", "bound all", "no texture", "phot ok", "geo ok", "filtered ok|sel>=2",
            "filtered ok|sel<2", "kept", "kept ok")
    sums = {"aerial": np.zeros(len(cols)), "photos": np.zeros(len(cols))}
    print(f"{'image':<32} " + " ".join(f"{c:>10}" for c in cols[1:]) + "   export coverage / AbsRel  wall s (both passes)  sources")
    for n in todo:
        info = details.get(n)
        if info is None or "unfiltered depth" not in info:
            print(f"{n:<32} no geometric map ({r2['stats'].get(n, {}).get('note', r2['failures'].get(n))})")
            continue
        c = _cam(ws.rec, ws.by_name[n])
        W, H, sx, sy = working_size(c, dc.patchmatch.max_image_size)
        K_raw, _, _, g_raw = gt.cams[n]
        g = gt_depth_on_grid(g_raw, K_raw, np.diag([sx, sy, 1.0]) @ c.K, (H, W))
        true = g > 0
        srcs = info["sources"]
        v_sel = gt.views(n, (H, W), srcs, dc.patchmatch.min_triangulation_angle, 180.0, None)
        v_all = gt.views(n, (H, W), list(gt.cams), dc.patchmatch.min_triangulation_angle, dc.max_triangulation_angle,
                         dc.max_view_angle)

        def ok(d, g=g):
            return (d > 0) & (np.abs(d - g) <= args.tolerance * np.maximum(g, 1e-9))

        phot = D.read_colmap_array(D.map_paths(paths.dense, n, "photometric")[0])
        pre, kept = info["unfiltered depth"], D.read_colmap_array(D.map_paths(paths.dense, n, "geometric")[0])
        tex = info["textured"]
        filt = true & ok(pre) & (kept <= 0)
        row = np.array([true.sum(), (true & (v_sel >= 2)).sum(), (true & (v_all >= 2)).sum(), (true & ~tex).sum(),
                        (true & ok(phot)).sum(), (true & ok(pre)).sum(), (filt & (v_sel >= 2)).sum(),
                        (filt & (v_sel < 2)).sum(), (true & (kept > 0)).sum(), (true & ok(kept)).sum()], float)
        sums["photos" if n in queries else "aerial"] += row
        m = acc["per image"].get(n, {})
        sec = r1["stats"].get(n, {}).get("seconds", 0.0) + r2["stats"].get(n, {}).get("seconds", 0.0)
        print(f"{n:<32} " + " ".join(f"{x / max(row[0], 1):10.3f}" for x in row[1:])
              + f"   {m.get('coverage', float('nan')):.3f} / {m.get('absrel', float('nan')):.4f}  {sec:5.1f} s  "
              + ",".join(s.rsplit(".", 1)[0][-8:] for s in srcs))
    for grp, row in sums.items():
        if row[0]:
            a = acc.get(grp, {})
            print(f"{grp.upper():<32} " + " ".join(f"{x / row[0]:10.3f}" for x in row[1:])
                  + f"   {a.get('coverage', float('nan')):.3f} / {a.get('absrel', float('nan')):.4f} "
                  f"within 1.25x {a.get('within_1.25', float('nan')):.3f} ({a.get('images', 0)} images exported)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
