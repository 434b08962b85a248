"""How long a CLI run goes on after its Prefect server dies (issue 26 item 9: about 5 minutes, then
exit 1, the flow run left RUNNING).

    python bench/bench_api_gone.py [--grace 45]

Runs a flow through the CLI entry point both flows use (``tasks.common.local_run.run_local``: its own
local server, the run lock, the API watchdog) whose body waits; when the run holds its output folder,
kills the server's process group (SIGKILL) and measures the wall time from the kill to the run's
exit, its exit status and its last stderr line. ``--grace``: ``FACTORY_API_GRACE_S`` (default: the
project's 45 s).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys, time
from prefect import flow
from tasks.common.runlock import exclusive_output
from tasks.common.local_run import run_local

class Config:
    def __init__(self, argv):
        self.folder = argv[0]
    def check_inputs(self):
        pass

@flow(name="bench-api-gone")
@exclusive_output(lambda config: config.folder)
def wait(config):
    for _ in range(1200):
        time.sleep(0.5)

sys.exit(run_local(sys.argv[1:], Config, wait, lambda result: 0))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grace", type=float, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PYTHONPATH=str(ROOT), FACTORY_PREFECT_HOME=str(tmp / "home"), PREFECT_HOME=str(tmp / "home"))
    if args.grace is not None:
        env["FACTORY_API_GRACE_S"] = str(args.grace)
    folder = tmp / "out"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(folder)], cwd=tmp, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lock = folder / ".run.lock"
    while not lock.exists() or not lock.read_text().strip():
        if proc.poll() is not None:
            print(proc.communicate())
            return 1
        time.sleep(0.3)
    server = [p for p in psutil.Process(proc.pid).children(recursive=True)
              if "server" in " ".join(p.cmdline()) and "start" in " ".join(p.cmdline())]
    os.killpg(server[0].pid, signal.SIGKILL)
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(json.dumps({"grace s": args.grace or 45.0, "exit": proc.returncode,
                      "seconds from the server's death to the exit": round(time.monotonic() - t0, 1),
                      "last stderr line": (err.strip().splitlines() or [""])[-1][:300],
                      "lock record": json.loads(lock.read_text())}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
