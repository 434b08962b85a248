"""The dense stage of the demo scene on the GPU beside the CPU method: time per image, coverage,
AbsRel (bench/gpu_check.sh runs this; README "GPU dense depth", docs/benchmarks.md).

Needs only the library (no Prefect server, no Prefect import: the dense modules import with numpy,
numba, OpenCV, h5py and pycolmap) and the demo scene's dense inputs, prepared once on a machine
where the aerial flow has run:

    python bench/gpu_check.py --prepare /path/to/aerial/root   # -> bench/gpu_carry/scene (ignored by git)
    pip download pycolmap==4.2.1 --no-deps --python-version 3.12 --only-binary=:all: \\
        --platform manylinux_2_28_x86_64 -d /tmp/wheels           # for a GPU machine without pycolmap
    python bench/gpu_check.py --pack-wheel /tmp/wheels/pycolmap-4.2.1-cp312-cp312-manylinux_2_28_x86_64.whl

``bench/gpu_carry`` travels with the working tree to the GPU machine (``carry`` it: it is ignored by
git); a carried package (wheel, or the smaller ``.tar.xz`` that ``--pack-wheel`` makes of one) that
is not importable there is unpacked into a temporary folder and put on ``sys.path`` (pycolmap needs
only numpy). Then, on the GPU machine: ``bench/gpu_check.sh``.

Per method (GPU: the project's PatchMatch on numba.cuda, ``device="cuda"``; CPU: the same passes
with the numba CPU kernels, the default CPU method) on a fresh copy of the workspace: the
photometric and geometric passes over every image (timed; the GPU's one-off kernel compilation is
timed apart, on the first image), the maps exported to depth h5, then the pipeline's own depth
accuracy (:func:`tasks.aerial.evaluate.depth_accuracy`: coverage of the true-surface pixels,
AbsRel, share within 1.25x, aerial frames and photos). Fusion (pycolmap's CPU stereo_fusion, the
same for both) is left out.

Exit status: 0 done; 2 no CUDA GPU here (everything before that point ran: imports, the scene, the
workspace); 3 a library is missing; 4 no prepared scene; 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / "bench" / "gpu_carry"
EXIT_NO_CUDA, EXIT_MISSING, EXIT_NO_SCENE = 2, 3, 4
NEEDED = ("numpy", "numba", "cv2", "h5py", "pycolmap")


def say(msg: str) -> None:
    print(msg, flush=True)


def unpack_carried_wheels(carry: Path) -> list[str]:
    """Put the carried packages that are not importable here on ``sys.path``: wheels (``*.whl``)
    and wheels repacked by ``--pack-wheel`` (``*.tar.xz``, smaller), unpacked once into a
    temporary folder. Returns their file names."""
    import tarfile

    used = []
    for arc in sorted([*carry.glob("*.whl"), *carry.glob("*.tar.xz")]):
        pkg = arc.name.split("-")[0].replace("-", "_").lower()
        if importlib.util.find_spec(pkg) is not None:
            continue
        dest = Path(tempfile.gettempdir()) / "gpu_check_site" / arc.name
        if not (dest / pkg).is_dir():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=dest.parent))
            if arc.suffix == ".whl":
                with zipfile.ZipFile(arc) as z:
                    z.extractall(tmp)
            else:
                with tarfile.open(arc, "r:xz") as t:
                    t.extractall(tmp, filter="data")
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
        sys.path.insert(0, str(dest))
        used.append(arc.name)
    return used


def pack_wheel(wheel: Path, carry: Path) -> int:
    """A wheel repacked as ``<wheel name>.tar.xz`` in ``carry`` (pycolmap 4.2.1 cp312: 38.2 MB as a
    wheel, 21.6 MB as tar.xz); the wheel itself is not needed there afterwards."""
    import tarfile

    carry.mkdir(parents=True, exist_ok=True)
    out = carry / (wheel.name[: -len(".whl")] + ".tar.xz")
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp)
        with tarfile.open(str(out) + ".part", "w:xz", preset=6) as t:
            for p in sorted(Path(tmp).iterdir()):
                t.add(p, arcname=p.name)
    os.replace(str(out) + ".part", out)
    say(f"{out}: {out.stat().st_size / 1e6:.1f} MB (wheel {wheel.stat().st_size / 1e6:.1f} MB)")
    return 0


def prepare(root: Path, scene: str, out: Path) -> int:
    """Copy the demo scene's dense inputs (workspace images and model, ground truth, the photo
    names) from an aerial root into ``out``; print their size."""
    sys.path.insert(0, str(ROOT))
    import pycolmap

    from tasks.aerial import pipeline as PL

    cfg = PL.PIPELINES.build()  # the default pipeline's folders, as python -m flows.aerial writes them
    paths = PL.scene_paths(Path(root), scene, Path(root) / "megadepth_processed", cfg)
    dense, gt = paths.dense, paths.ground_truth
    if not (dense / "sparse").is_dir() or not (gt / "depths").is_dir():
        say(f"{root}: no dense workspace ({dense}/sparse) or ground truth ({gt}/depths) of scene {scene}; "
            "run python -m flows.aerial --root ROOT first")
        return EXIT_NO_SCENE
    shutil.rmtree(out, ignore_errors=True)
    (out / "dense").mkdir(parents=True)
    shutil.copytree(dense / "sparse", out / "dense" / "sparse")
    shutil.copytree(dense / "images", out / "dense" / "images", symlinks=False)
    shutil.copytree(gt / "sparse", out / "ground_truth" / "sparse")
    shutil.copytree(gt / "depths", out / "ground_truth" / "depths")
    # the photos (queries) are the registered images that are not Earth Studio frames (.jpeg), as
    # bench/bench_dense_demo.py and the pipeline's evaluation group them
    names = sorted(im.name for im in pycolmap.Reconstruction(str(out / "dense" / "sparse")).images.values())
    queries = [n for n in names if not n.endswith(".jpeg")]
    (out / "scene.json").write_text(json.dumps({"scene": scene, "from": str(dense), "queries": queries}, indent=1))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    say(f"prepared {out}: {len(names)} images ({len(queries)} photos), {size / 2**20:.1f} MiB")
    return 0


def run_method(scene: Path, device: str, work: Path, limit: int | None) -> dict:
    """The dense passes of ``device`` on a fresh copy of the workspace; timings and accuracy."""
    import numpy as np

    from tasks.aerial.dense import DenseConfig, export_colmap_depths, open_workspace, run_patch_match
    from tasks.aerial.dense.backends import merge_dense_results
    from tasks.aerial.dense.patchmatch import patch_match_image

    ws_dir = work / device
    shutil.rmtree(ws_dir, ignore_errors=True)
    (ws_dir).mkdir(parents=True)
    shutil.copytree(scene / "dense" / "sparse", ws_dir / "sparse")
    (ws_dir / "images").symlink_to((scene / "dense" / "images").resolve())
    ws = open_workspace(ws_dir)
    cfg = DenseConfig()  # the CPU method's defaults, for both
    names = sorted(ws.by_name)[:limit] if limit else sorted(ws.by_name)
    compile_s = 0.0
    if device == "cuda":  # the kernels compile on first use: timed apart, on the first image
        t0 = time.perf_counter()
        patch_match_image(ws, names[0], cfg, "photometric", {}, "cuda")
        compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    steps = [run_patch_match(ws, names, cfg, "photometric", device=device)]
    steps.append(run_patch_match(ws, names, cfg, "geometric", device=device))
    wall = time.perf_counter() - t0
    out = ws_dir / "product"
    steps.append(export_colmap_depths(ws, out / "depths", names, kind="geometric"))
    res = merge_dense_results(steps)
    import pycolmap

    from tasks.aerial.evaluate import depth_accuracy

    info = json.loads((scene / "scene.json").read_text())
    acc = depth_accuracy(out, ws.rec, pycolmap.Reconstruction(str(scene / "ground_truth" / "sparse")),
                         scene / "ground_truth" / "depths", set(info["queries"]))
    return {"device": device, "images": len(names), "wall": wall, "per image": wall / max(1, len(names)),
            "compile": compile_s, "failures": res["failures"], "accuracy": acc,
            "mean valid": float(np.mean([s["valid_fraction"] for s in res["stats"].values()] or [0.0]))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", type=Path, metavar="AERIAL_ROOT", help="copy the demo scene's dense inputs here")
    ap.add_argument("--pack-wheel", type=Path, metavar="WHEEL", help="repack a wheel as .tar.xz into bench/gpu_carry")
    ap.add_argument("--scene-id", default="0001")
    ap.add_argument("--scene", type=Path, default=CARRY / "scene", help="the prepared scene (default: %(default)s)")
    ap.add_argument("--methods", default="cuda,cpu", help="comma-separated: cuda, cpu (default: %(default)s)")
    ap.add_argument("--images", type=int, default=None, help="only the first N images (sorted names)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    if args.prepare:
        return prepare(args.prepare, args.scene_id, args.scene)
    if args.pack_wheel:
        return pack_wheel(args.pack_wheel, CARRY)

    carried = unpack_carried_wheels(CARRY)
    if carried:
        say(f"carried wheels on sys.path: {', '.join(carried)}")
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        say(f"missing libraries: {', '.join(missing)} (install them, or carry their wheels in {CARRY})")
        return EXIT_MISSING
    sys.path.insert(0, str(ROOT))
    t0 = time.perf_counter()
    import tasks.aerial.dense.backends as B  # the library only: no Prefect
    from tasks.aerial.dense import open_workspace

    heavy = sorted(m for m in ("prefect", "distributed", "dask", "pymap3d") if m in sys.modules)
    say(f"library imported in {time.perf_counter() - t0:.1f} s (modules it did not need loaded: {heavy or 'none'})")
    if not (args.scene / "scene.json").is_file():
        say(f"{args.scene}: no prepared scene; run: python bench/gpu_check.py --prepare AERIAL_ROOT")
        return EXIT_NO_SCENE
    ws = open_workspace(args.scene / "dense")
    n = len(ws.by_name)
    size = sum(p.stat().st_size for p in args.scene.rglob("*") if p.is_file())
    say(f"scene {args.scene}: {n} registered images, {size / 2**20:.1f} MiB")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "cuda" in methods:
        if not B.numba_cuda_available():
            say("no CUDA GPU here: numba.cuda.is_available() is False (needs an NVIDIA GPU, its driver and "
                "numba-cuda). Everything before this point ran; the GPU part needs CUDA.")
            return EXIT_NO_CUDA
        from numba import cuda

        name = cuda.get_current_device().name
        say(f"GPU: {name.decode() if isinstance(name, bytes) else name}")
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    rows = []
    for m in methods:
        say(f"running {m} ...")
        r = run_method(args.scene, m, work, args.images)
        rows.append(r)
        say(f"{m}: {r['images']} images, {r['wall']:.1f} s ({r['per image']:.2f} s per image)"
            + (f", kernel compilation {r['compile']:.1f} s apart" if m == "cuda" else "")
            + f", failures: {r['failures'] or 'none'}")
    say("")
    say(f"{'method':<6} {'s/image':>8} {'group':<7} {'coverage':>8} {'AbsRel':>7} {'<1.25x':>7}")
    for r in rows:
        for g in ("aerial", "photos", "all"):
            a = r["accuracy"].get(g)
            if a:
                say(f"{r['device']:<6} {r['per image']:8.2f} {g:<7} {a['coverage']:8.3f} {a['absrel']:7.4f} "
                    f"{a['within_1.25']:7.3f}")
    by = {r["device"]: r for r in rows}
    if "cuda" in by and "cpu" in by:
        say(f"speed-up of the GPU per image: {by['cpu']['per image'] / max(by['cuda']['per image'], 1e-9):.1f}x "
            "(goal: 20x, with coverage and AbsRel at least as good)")
    (work / "gpu_check.json").write_text(json.dumps(rows, indent=1, default=str))
    if os.environ.get("OUT"):
        shutil.copy(work / "gpu_check.json", Path(os.environ["OUT"]) / "gpu_check.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
