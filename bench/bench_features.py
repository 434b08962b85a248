"""Benchmark: SIFT extraction (images/s) and NN matching (pairs/s), hloc layout, CPU.

Images are a synthetic world's Earth Studio frames and ground photos (640x480 by
default), or random multi-scale textures with ``--source texture``. Extraction
runs in one process and fanned out over ``--workers`` processes (part files +
merge, as a flow would); matching runs NN-ratio (mutual + ratio 0.8) on every
pair of images, one process and fanned out.

    .venv/bin/python bench/bench_features.py                          # world, 24 frames + 8 photos, 640x480
    .venv/bin/python bench/bench_features.py --source texture --n 32  # textures
    .venv/bin/python bench/bench_features.py --size 1600 1200 --conf sift
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _extract_part(args):
    from tasks.aerial import features as F

    conf, image_dir, names, fp, n, i = args
    F.extract_features_parts(conf, image_dir, names, fp, n_parts=n, part_index=i)


def _match_part(args):
    from tasks.aerial import matching as M

    conf, pairs_path, fp, mp, n, i = args
    M.match_features_parts(conf, pairs_path, fp, mp, n_parts=n, part_index=i)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=("world", "texture"), default="world")
    ap.add_argument("--n-aerial", type=int, default=24)
    ap.add_argument("--n-ground", type=int, default=8)
    ap.add_argument("--n", type=int, default=32, help="number of texture images")
    ap.add_argument("--size", type=int, nargs=2, default=[640, 480])
    ap.add_argument("--conf", default="sift")
    ap.add_argument("--matcher", default="NN-ratio")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-pairs", type=int, default=200)
    args = ap.parse_args()

    import cv2
    import numpy as np

    from tasks.aerial import features as F
    from tasks.aerial import io as IO
    from tasks.aerial import matching as M

    conf = F.FEATURE_CONFS[args.conf]
    mconf = M.MATCHER_CONFS[args.matcher]
    w, h = args.size
    root = Path(tempfile.mkdtemp(prefix="bench_features_"))
    try:
        if args.source == "world":
            from tasks.aerial.earthstudio import ingest_scene
            from tasks.aerial.synthetic_world import generate_world

            t0 = time.perf_counter()
            info = generate_world(root, n_aerial=args.n_aerial, n_ground=args.n_ground, size=(w, h))
            ingest_scene(root, info.scene)
            footage = root / "data" / info.scene / "footage"
            frames = sorted(p.name for p in footage.glob("*.jpeg"))
            image_dir = {**{n: footage for n in frames}, **{n: info.images_dir for n in info.photo_names}}
            names = frames + list(info.photo_names)
            print(f"world: {len(frames)} frames + {len(info.photo_names)} photos at {w}x{h} "
                  f"in {time.perf_counter() - t0:.1f} s")
        else:
            image_dir = root / "imgs"
            image_dir.mkdir()
            names = []
            for i in range(args.n):
                rng = np.random.default_rng(i)
                img = sum(cv2.resize(rng.random((h // s, w // s)).astype(np.float32), (w, h),
                                     interpolation=cv2.INTER_CUBIC) * s ** 0.5 for s in (2, 4, 8, 16))
                img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
                cv2.imwrite(str(image_dir / f"t{i:03d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
                names.append(f"t{i:03d}.jpg")
            print(f"textures: {len(names)} at {w}x{h}")

        # extraction, one process
        fp1 = root / "one" / f"{conf['output']}.h5"
        t0 = time.perf_counter()
        F.extract_features(conf, image_dir, names, fp1)
        t1 = time.perf_counter() - t0
        nkp = [len(IO.read_keypoints(fp1, n)) for n in names]
        print(f"extract 1 process : {len(names) / t1:7.2f} images/s  ({t1:.2f} s, "
              f"mean {np.mean(nkp):.0f} keypoints/image, conf {args.conf})")

        # extraction, fan-out over processes + merge
        fpn = root / "many" / f"{conf['output']}.h5"
        fpn.parent.mkdir()
        t0 = time.perf_counter()
        with ProcessPoolExecutor(args.workers) as pool:
            list(pool.map(_extract_part, [(conf, image_dir, names, fpn, args.workers, i) for i in range(args.workers)]))
        F.merge_features(IO.part_paths(fpn, args.workers), fpn, remove_parts=True)
        tn = time.perf_counter() - t0
        print(f"extract {args.workers} processes: {len(names) / tn:7.2f} images/s  "
              f"({tn:.2f} s incl. pool start + merge)")

        # matching
        pairs = list(itertools.combinations(names, 2))[: args.max_pairs]
        pairs_path = root / "pairs.txt"
        IO.write_pairs(pairs_path, pairs)
        mp1 = root / "one" / "matches.h5"
        t0 = time.perf_counter()
        M.match_features(mconf, pairs_path, fp1, mp1)
        t1 = time.perf_counter() - t0
        nm = [len(IO.read_matches(mp1, a, b)[0]) for a, b in pairs]
        print(f"match 1 process   : {len(pairs) / t1:7.2f} pairs/s   ({t1:.2f} s, {len(pairs)} pairs, "
              f"mean {np.mean(nm):.0f} matches/pair, {args.matcher})")
        mpn = root / "many" / "matches.h5"
        t0 = time.perf_counter()
        with ProcessPoolExecutor(args.workers) as pool:
            list(pool.map(_match_part, [(mconf, pairs_path, fp1, mpn, args.workers, i) for i in range(args.workers)]))
        M.merge_matches(M.part_paths(mpn, args.workers), mpn, remove_parts=True)
        tn = time.perf_counter() - t0
        print(f"match {args.workers} processes : {len(pairs) / tn:7.2f} pairs/s   "
              f"({tn:.2f} s incl. pool start + merge)")

        # resume: nothing to do
        t0 = time.perf_counter()
        F.extract_features(conf, image_dir, names, fp1)
        M.match_features(mconf, pairs_path, fp1, mp1)
        print(f"rerun (all skipped): {time.perf_counter() - t0:.3f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
