"""Benchmark: screen PatchMatch photometric settings on a few images of a demo scene (issue 14).

For each ``--try`` setting (space-separated ``key=JSON`` DenseConfig overrides; ``-`` for the
defaults) and each image of ``--names``: runs the photometric pass of that image alone (nothing is
written) and prints the share of its true-surface pixels (at the working size) whose photometric
depth is correct (relative error under ``--tolerance``), the share untextured, and the CPU seconds.
A cheap proxy for the coverage of the full run (``bench_dense_coverage.py``, column "phot ok"),
since the geometric pass starts from these maps:

    python bench/bench_dense_screen.py --root /tmp/demo --names 0001_036.jpeg 4547680894_b3d4f1ff4a_o.jpg \\
        --try - "patchmatch.coarse_iterations=3" "patchmatch.max_image_size=480"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from bench_dense_coverage import _GT
from benchlib import cpu_seconds, patchmatch_demo


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--scene", default="0001")
    ap.add_argument("--names", nargs="+", required=True, help="images (a name may be given by its prefix)")
    ap.add_argument("--try", dest="tries", nargs="+", default=["-"], help="settings: 'k=v k2=v2' or '-'")
    ap.add_argument("--tolerance", type=float, default=0.05)
    args = ap.parse_args()

    from tasks.aerial import dense as D
    from tasks.aerial import pipeline as PL
    from tasks.aerial.dense.patchmatch import patch_match_image, working_size
    from tasks.aerial.dense.views import _cam
    from tasks.aerial.evaluate import gt_depth_on_grid

    _, paths = patchmatch_demo(args.root, args.scene, [])
    all_names = PL.registered_names(paths)
    names = [next(a for a in all_names if a.startswith(n)) for n in args.names]
    ws = D.open_workspace(paths.dense)
    gt = _GT(paths.ground_truth)
    for t in args.tries:
        sets = [] if t == "-" else t.split()
        cfg, _ = patchmatch_demo(args.root, args.scene, sets)
        dc = cfg.dense
        tot = np.zeros(3)
        cpu = 0.0
        for n in names:
            c0 = cpu_seconds()
            info: dict = {}
            depth, _ = patch_match_image(ws, n, dc, "photometric", info)
            c1 = cpu_seconds()
            cpu += c1 - c0
            c = _cam(ws.rec, ws.by_name[n])
            W, H, sx, sy = working_size(c, dc.patchmatch.max_image_size)
            K_raw, _, _, g_raw = gt.cams[n]
            g = gt_depth_on_grid(g_raw, K_raw, np.diag([sx, sy, 1.0]) @ c.K, (H, W))
            true = g > 0
            ok = true & (depth > 0) & (np.abs(depth - g) <= args.tolerance * np.maximum(g, 1e-9))
            row = np.array([true.sum(), ok.sum(), (true & ~info["textured"]).sum()], float)
            tot += row
            print(f"  {t:<40} {n:<32} phot ok {row[1] / row[0]:.3f}  no texture {row[2] / row[0]:.3f}  "
                  f"{c1 - c0:5.1f} CPU-s", flush=True)
        print(f"{t:<42} ALL {len(names)} images: phot ok {tot[1] / tot[0]:.3f}  no texture {tot[2] / tot[0]:.3f}  "
              f"{cpu / len(names):.1f} CPU-s per image", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
