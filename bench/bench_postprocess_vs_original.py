"""Side by side: the original's post-processing against ours, on the same stacks, cold.

The original (vishalned/MMEarth-data: ``utils/convert_to_h5.py --mode create`` then
``utils/normalization.py``'s ``compute_band_stats``) is NOT part of this project: pass
the folder of a copy of it with ``--original``. This script prepares its input from the
stacks ``bench_postprocess.py`` built (``DATA/merged/<tile_id>.tif`` pixel-interleaved
as the Earth Engine downloads are, read by ``tifffile``, and ``DATA/DATA_tile_info.json``),
then runs, alternately and ``--repeat`` times, each side as fresh processes, timing
wall-clock from launch to exit (imports, the Dask cluster, everything):

* original: ``python utils/convert_to_h5.py --mode create --data_dir DATA`` then
  ``python -c "from utils.normalization import compute_band_stats; compute_band_stats(data_folder=DATA)"``
* ours: ``python bench/bench_postprocess.py --n N --post-only`` (up to
  ``convert.LOCAL_PACK_MAX_TILES`` tiles ``convert.pack_to_h5``: packing threads beside the
  single writer, statistics added up as tiles are written; above it the Dask cluster's start,
  packing on its workers and the writer; then splits and the JSON files)

and prints both figures, their ratio and the load average at each run. The machine's
load changes from minute to minute, so only figures from the same command compare.

    python bench/bench_postprocess.py --n 1000 --workers 2      # builds the stacks once
    python bench/bench_postprocess_vs_original.py --n 1000 --original /path/to/MMEarth-data --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare_original_input(work: Path, data: Path, ids: list[str]) -> None:
    """``data/merged/<id>.tif`` (H, W, B) pixel-interleaved float32 and the merged tile_info."""
    import numpy as np
    import tifffile

    from tasks.multimodal import stacks
    from tasks.multimodal.sources.base import read_stack

    merged = data / "merged"
    merged.mkdir(parents=True, exist_ok=True)
    for tid in ids:
        out = merged / f"{tid}.tif"
        if not out.exists():
            arr, _ = read_stack(work / "tiles" / f"{tid}.tif")
            tifffile.imwrite(out, np.ascontiguousarray(arr.transpose(1, 2, 0)), photometric="minisblack",
                             planarconfig="contig")
    info_path = data / f"{data.name}_tile_info.json"
    if not info_path.exists():
        info_path.write_text(json.dumps(stacks.load_tile_info(ids, work)))


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and all its processes)."""
    c0, t0 = _children_cpu(), time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dt, dc = time.perf_counter() - t0, _children_cpu() - c0
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}")
    return dt, dc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--work", default="bench_out/postprocess")
    ap.add_argument("--original", required=True, help="folder of a copy of vishalned/MMEarth-data")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runner", default="auto", choices=["auto", "dask", "threads"],
                    help="ours: where parts are packed (bench_postprocess.py --runner)")
    args = ap.parse_args()

    work = Path(args.work).resolve() / f"n{args.n}"
    ids = json.loads((work / "bench_ids.json").read_text())
    data = work / "original" / "data_orig"
    prepare_original_input(work, data, ids)
    orig = Path(args.original).resolve()
    py = sys.executable
    original_cmds = [
        [py, "utils/convert_to_h5.py", "--mode", "create", "--data_dir", str(data)],
        [py, "-c", f"from utils.normalization import compute_band_stats; compute_band_stats(data_folder={str(data)!r})"],
    ]
    ours_cmd = [py, str(ROOT / "bench" / "bench_postprocess.py"), "--n", str(args.n), "--work", str(Path(args.work).resolve()),
                "--workers", str(args.workers), "--runner", args.runner, "--post-only"]
    print(f"N={len(ids)} stacks; original in {orig}; ours: {' '.join(ours_cmd[1:])}")
    rows = []
    for r in range(args.repeat):
        load0 = os.getloadavg()[0]
        o = [timed(c, orig) for c in original_cmds]
        t_orig, c_orig = sum(x[0] for x in o), sum(x[1] for x in o)
        t_ours, c_ours = timed(ours_cmd, ROOT)
        load1 = os.getloadavg()[0]
        rows.append((t_orig, t_ours, c_orig, c_ours))
        n = len(ids)
        print(f"run {r + 1}: original {t_orig:6.1f}s = {n / t_orig:6.1f} tiles/s ({1e3 * c_orig / n:.1f} ms CPU/tile) | "
              f"ours {t_ours:6.1f}s = {n / t_ours:6.1f} tiles/s ({1e3 * c_ours / n:.1f} ms CPU/tile, all processes) | "
              f"ratio {t_orig / t_ours:4.2f}x | load average {load0:.1f} -> {load1:.1f}", flush=True)
    import h5py

    with h5py.File(data / f"{data.name}.h5", "r") as a, h5py.File(work / "data_bench.h5", "r") as b:
        na, nb = len(a["metadata"]), len(b["metadata"])
    print(f"rows written: original {na}, ours {nb} (of {len(ids)} stacks)")
    if na != len(ids) or nb != len(ids):
        sys.exit("a side skipped tiles: the figures do not compare")
    so, su = sum(r[0] for r in rows), sum(r[1] for r in rows)
    co, cu = sum(r[2] for r in rows), sum(r[3] for r in rows)
    print(f"all runs: original {len(ids) * len(rows) / so:.1f} tiles/s, ours {len(ids) * len(rows) / su:.1f} tiles/s, "
          f"ratio {so / su:.2f}x; CPU per tile original {1e3 * co / (n * len(rows)):.1f} ms, "
          f"ours {1e3 * cu / (n * len(rows)):.1f} ms (ratio {co / cu:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
