"""Hostile inputs of issue 26 items 7-8 and issue 27 items 2 and 4: how long until the error, and
the peak memory (before the fixes: frames=10^8 grew a worker to 10.9 GB in 83 s, world size
[1e9, 1e9] drove the flow to 23.5 GB and the OOM killer, a 1 MB deflate-bombed scene list took
2.4 GB, a mistyped --root rendered a world for 515 s).

    python bench/bench_validation.py [--bomb-mb 2400]

Each command runs as a subprocess (``/usr/bin/time``-like: wall time, peak RSS from
``resource.getrusage(RUSAGE_CHILDREN)``); the bomb is written once to a temporary folder.
"""

from __future__ import annotations

import argparse
import io
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def bomb(path: Path, mb: int) -> None:
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": (mb << 20,)})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("data.npy", "w", force_zip64=True) as fh:
            fh.write(head.getvalue())
            zeros = bytes(1 << 20)
            for _ in range(mb):
                fh.write(zeros)


def run(label: str, argv: list[str]) -> None:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KB, the largest child so far
    err = (out.stderr.strip().splitlines() or [""])[-1]
    print(f"| {label} | exit {out.returncode} | {wall:.1f} s | {max(peak, before) / 1024:.0f} MB | {err[:110]} |",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bomb-mb", type=int, default=2400)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "bomb.npz"
        bomb(npz, args.bomb_mb)
        print(f"bomb: {npz.stat().st_size / 2**20:.1f} MB file, {args.bomb_mb} MB declared")
        print("| input | outcome | wall | peak RSS (largest child so far) | message |")
        print("|---|---|---|---|---|")
        code = ("import sys; from tasks.aerial import megadepth as md\ntry: md.load_scene_list(sys.argv[1])\n"
                "except ValueError as e: print(e, file=sys.stderr); sys.exit(2)")
        run(f"scene list bomb ({args.bomb_mb} MB declared)", ["-c", code, str(npz)])
        run("trajectory_options.frames=100000000", ["-m", "flows.aerial", "--set",
                                                     "trajectory_options.frames=100000000"])
        run("world_options.size=[1e9,1e9]", ["-m", "flows.aerial", "--set", "world_options.size=[1e9,1e9]"])
        run("--root /nonexistent/aerial", ["-m", "flows.aerial", "--root", f"{tmp}/nonexistent/aerial"])
        run("output_dir=/proc/x", ["-m", "flows.multimodal", "--set", "output_dir=/proc/x"])
        run("tile_size_m=Infinity", ["-m", "flows.multimodal", "--set", "tile_size_m=Infinity"])


if __name__ == "__main__":
    main()
