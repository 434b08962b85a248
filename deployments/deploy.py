"""Deploy ``prefect.yaml`` to a Prefect server for a worker to run.

    prefect server start                      # once, in its own terminal (UI http://127.0.0.1:4200)
    prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m deployments.deploy              # blocks, work pool, `prefect deploy --all`
    prefect worker start --pool geodata-process

Idempotent: block types are (re-)registered, a missing work pool is created (an
existing one, and whatever an operator changed in it, is kept), and every
deployment is created or updated. Runs execute in this project folder (the
pull step ``prefect deploy`` records), on the machine of the worker.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings
from prefect.workers.process import ProcessWorker

from blocks import register_blocks
from deployments.spec import PREFECT_FILE, PROJECT_ROOT, load_specs


def api_url() -> str | None:
    return os.environ.get("PREFECT_API_URL") or get_current_settings().api.url


def ensure_work_pool(name: str, pool_type: str = "process") -> bool:
    """Create the work pool ``name`` unless it exists; True when it was created."""
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type=pool_type, description="geodata-factory flows, run as local processes",
                base_job_template=ProcessWorker.get_default_base_job_template()))
            return True
        if pool.type != pool_type:
            raise SystemExit(f"work pool {name!r} exists with type {pool.type!r}; prefect.yaml needs a "
                             f"{pool_type!r} pool: delete it or rename the pool in prefect.yaml")
        return False


def deploy(prefect_file: str | Path = PREFECT_FILE, names: list[str] | None = None) -> list[str]:
    """Register blocks, create the work pools, and ``prefect deploy`` the file's deployments."""
    prefect_file = Path(prefect_file).resolve()
    specs = load_specs(prefect_file)
    register_blocks()
    for pool in sorted({(s.work_pool or {}).get("name") for s in specs} - {None}):
        if ensure_work_pool(pool):
            print(f"created work pool {pool!r} (type process)", flush=True)
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", str(prefect_file)]
    cmd += [a for n in names for a in ("--name", n)] if names else ["--all"]
    # PWD: prefect.yaml's PYTHONPATH job variable ("{{ $PWD }}") is the project folder
    subprocess.run(cmd, cwd=PROJECT_ROOT, env=dict(os.environ, PWD=str(PROJECT_ROOT)), check=True)
    return [s.name for s in specs if not names or s.name in names]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deployments.deploy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefect-file", default=str(PREFECT_FILE), help="deployments file (default: prefect.yaml)")
    ap.add_argument("--name", action="append", help="deploy only this deployment (repeatable)")
    args = ap.parse_args(argv)
    url = api_url()
    if not url:
        print("No Prefect server to deploy to: start one (`prefect server start`) and set "
              "PREFECT_API_URL (`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`).",
              file=sys.stderr)
        return 2
    try:
        deployed = deploy(args.prefect_file, args.name)
    except subprocess.CalledProcessError as exc:
        print(f"`prefect deploy` failed (exit {exc.returncode}); see its output above", file=sys.stderr)
        return 1
    pools = sorted({(s.work_pool or {}).get("name") for s in load_specs(args.prefect_file)} - {None})
    print(f"deployed {len(deployed)} deployment(s) to {url}: {', '.join(deployed)}")
    for pool in pools:
        print(f"run them with:  prefect worker start --pool {pool}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
