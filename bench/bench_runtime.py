"""How fast a configuration mistake is reported (issue: 12-25 s, after the server and Dask had started).

    python bench/bench_runtime.py [--repeat 3]

Runs the real commands with a typo'd key, a bad input file and a broken rule, and prints the
wall time to the error exit (this includes the Python/Prefect import time) and the message.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    bad = tmp / "regions.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": [')
    cases = {
        "multimodal --set n_tile=5": ["flows.multimodal", "--set", "n_tile=5"],
        "multimodal bad regions file": ["flows.multimodal", "--set", f"regions={bad}"],
        "multimodal split fractions": ["flows.multimodal", "--set", "split_fractions=[0.8,0.1,0.2]"],
        "aerial missing scene list": ["flows.aerial", "--scene-list", str(tmp / "none.npz")],
    }
    env = dict(os.environ, PYTHONPATH=str(ROOT), FACTORY_PREFECT_HOME=str(tmp / "prefect"))
    env.pop("PREFECT_API_URL", None)
    out = {}
    for name, argv in cases.items():
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=env, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
        out[name] = {"exit": r.returncode, "seconds_median": sorted(times)[len(times) // 2],
                     "stderr_lines": len(r.stderr.strip().splitlines()), "message": r.stderr.strip()[:160],
                     "server started": (tmp / "prefect").exists()}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
