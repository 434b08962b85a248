"""Benchmark: the photos' registration (localization and verification, with the second chance)
on a scene the aerial flow has already taken through matching, e.g. the realistic world:

    python -m flows.aerial --root R --synthetic --set world_options.world=realistic \
        --set world_options.n_aerial=48 --set world_options.n_ground=40 --pipeline aliked+lightglue
    python bench/bench_registration.py --root R --pipeline aliked+lightglue
    python bench/bench_registration.py --root R --pipeline aliked+lightglue --prior-noise 0.2 0.5

Runs the localization stage again (``tasks.aerial.pipeline.localize``; it rewrites the scene's
localized model) and prints, against the ground truth: true photos registered, false
registrations, distractors registered, the median errors, and the photos the second chance
registered with their errors. ``--prior-noise DEG M`` first perturbs every photo's MegaDepth pose
(a rotation of DEG degrees rms about a random axis, a centre shift of M metres rms, converted to
MegaDepth units by the true photos' spread): the synthetic world's MegaDepth poses are exact,
real ones are an SfM's. ``--evidence``: also match every true photo with the frames its TRUE pose
sees and count its matches that agree with it (the photos any aerial evidence could register).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def perturb(info: dict, root: Path, scene: str, deg: float, metres: float, seed: int = 7) -> None:
    """Perturb ``info``'s MegaDepth poses in place (see the module's text)."""
    import numpy as np
    import pycolmap
    from scipy.spatial.transform import Rotation

    from tasks.aerial import geometry

    gt = pycolmap.Reconstruction(str(root / "ground_truth" / scene / "sparse"))
    true = [im for im in gt.images.values() if im.name in info["queries"]]
    md = np.array([np.asarray(info["queries"][im.name]["cam2world"])[:3, 3] for im in true])
    world = np.array([geometry.centre(im) for im in true])
    units = float(np.linalg.norm(np.ptp(md, 0)) / np.linalg.norm(np.ptp(world, 0)))  # MegaDepth units per metre
    rng = np.random.default_rng(seed)
    for q in info["queries"].values():
        m = np.asarray(q["cam2world"], float).copy()
        m[:3, :3] = m[:3, :3] @ Rotation.from_rotvec(np.radians(deg) * rng.normal(size=3) / np.sqrt(3)).as_matrix()
        m[:3, 3] += metres * units * rng.normal(size=3) / np.sqrt(3)
        q["cam2world"] = m.tolist()


def evidence(paths, config, info: dict, gt, num: int = 10, max_error: float = 12.0) -> dict[str, int]:
    """Per true photo: its keypoints whose matches to the ``num`` frames its true pose sees lead to
    reference points that reproject within ``max_error`` px under the true pose."""
    import h5py
    import numpy as np
    import pycolmap

    from tasks.aerial import geometry, matching
    from tasks.aerial import pipeline as PL
    from tasks.aerial.reconstruction import query_camera
    from tasks.aerial.verification import _reproject, frames_seen, matched_points, point_table

    ref = pycolmap.Reconstruction(str(paths.sfm))
    queries = {q.name: q for q in PL.queries_of(info)}
    true = {im.name: im for im in gt.images.values() if im.name in queries}
    table = point_table(ref, set(ref.images))
    chosen = {n: frames_seen(table, query_camera(queries[n], 1), geometry.cam_from_world(im), num)
              for n, im in true.items()}
    out_h5 = paths.localized.parent / "matches-evidence.h5"
    pairs = [(n, ref.images[i].name) for n in true for i in chosen[n]]
    matching.match_pair_list(matching.MATCHER_CONFS[config.matcher], pairs, paths.features, out_h5)
    agree = {}
    with h5py.File(paths.features, "r") as ff:
        for n, im in true.items():
            kp = np.asarray(ff[n]["keypoints"])
            idx, xyz, _ = matched_points(ref, n, chosen[n], out_h5)
            uv, z = _reproject(query_camera(queries[n], 1).calibration_matrix(), geometry.cam_from_world(im), xyz)
            agree[n] = len(np.unique(idx[(z > 0) & (np.linalg.norm(uv - kp[idx], axis=1) < max_error)]))
    return agree


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--scene", default="0001")
    ap.add_argument("--pipeline", default="aliked+lightglue")
    ap.add_argument("--prior-noise", nargs=2, type=float, metavar=("DEG", "M"))
    ap.add_argument("--evidence", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import pycolmap

    from tasks.aerial import evaluate
    from tasks.aerial import pipeline as PL

    config = PL.PIPELINES.build(args.pipeline)
    paths = PL.scene_paths(args.root, args.scene, args.root / "megadepth_processed", config)
    info = json.loads(paths.image_list.read_text())
    if args.prior_noise:
        perturb(info, args.root, args.scene, *args.prior_noise)
    t0 = time.perf_counter()
    res = PL.localize(paths, config, info)
    seconds = time.perf_counter() - t0
    rec = pycolmap.Reconstruction(str(paths.localized))
    gt = pycolmap.Reconstruction(str(args.root / "ground_truth" / args.scene / "sparse"))
    acc = evaluate.pose_accuracy(rec, gt, sorted(info["queries"]))
    per = acc["per photo"]
    distractors = [d["name"] for d in json.loads((args.root / "ground_truth" / args.scene / "distractors.json").read_text())]
    registered = {im.name for im in rec.images.values() if im.has_pose}
    prior = {n: per.get(n) for n, v in res.details.items() if v.get("by prior")}
    print(f"localization {seconds:.1f} s (acceptance {res.counts.get('acceptance seconds', 0):.1f} s), "
          f"prior noise {args.prior_noise or 'none'}")
    print(f"true photos registered {acc['photos registered']}/{acc['photos attempted']}, false "
          f"{acc['false registrations']}, distractors registered {len(registered & set(distractors))}/{len(distractors)}, "
          f"median {acc['median rotation error deg']:.3f} deg / {acc['median centre error m']:.3f} m")
    print(f"by the second chance: {len(prior)}: " + ", ".join(
        f"{n[:10]} {a['rotation_deg']:.2f} deg {a['centre_m']:.2f} m" if a else f"{n[:10]} (no truth)"
        for n, a in sorted(prior.items())))
    if args.evidence:
        agree = evidence(paths, config, info, gt)
        enough = sorted(n for n, k in agree.items() if k >= config.sfm.accept_min_inliers)
        print(f"true photos with >= {config.sfm.accept_min_inliers} aerial matches agreeing with their true pose: "
              f"{len(enough)}/{len(agree)}; registered among them {len(set(enough) & registered)}; "
              f"without: " + ", ".join(f"{n[:10]} {agree[n]}" for n in sorted(set(agree) - set(enough))))
        print("median agreeing matches", float(np.median(list(agree.values()))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
