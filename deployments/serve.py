"""Serve the deployments of ``prefect.yaml`` from this machine, without a worker.

    python -m deployments.serve                 # the API of Prefect's settings (profile, env, .env), else its own server
    python -m deployments.serve --list          # show what would be served

The deployments (flow + parameters + schedule) appear in the Prefect UI, where
runs are started with "Run" or "Custom run"; their schedules fire while this
process runs. Stopping it (Ctrl-C) pauses every deployment it served: their
schedules stop and runs started from the UI stay Scheduled until it serves
again. For deployments that keep running without this process, use a work pool
and ``prefect worker start`` (``python -m deployments.deploy``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import get_client, serve
from prefect.deployments.runner import RunnerDeployment
from prefect.exceptions import ObjectNotFound

from blocks import register_blocks
from deployments.spec import PREFECT_FILE, load_specs, to_runner_deployment
from tasks.common.prefect_server import configured_api_problem, local_prefect_server


def build_deployments(path: str | Path = PREFECT_FILE, names: list[str] | None = None) -> list[RunnerDeployment]:
    """The deployments of ``prefect.yaml`` (only ``names``, if given) as served deployments."""
    specs = load_specs(path)
    if names:
        unknown = sorted(set(names) - {s.name for s in specs})
        if unknown:
            raise SystemExit(f"{path}: no deployment named {unknown}; choose from {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in names]
    return [to_runner_deployment(s) for s in specs]


def deployed_to_pools(deployments: list[RunnerDeployment]) -> list[str]:
    """``flow/name (pool)`` of those ``deployments`` already on the server for a work pool."""
    out = []
    with get_client(sync_client=True) as client:
        for d in deployments:
            try:
                existing = client.read_deployment_by_name(f"{d.flow_name}/{d.name}")
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                out.append(f"{d.flow_name}/{d.name} ({existing.work_pool_name})")
    return out


def _schedule_text(d: RunnerDeployment) -> str:
    out = []
    for s in d.schedules or []:
        sch = s.schedule
        what = getattr(sch, "cron", None) or getattr(sch, "interval", None) or getattr(sch, "rrule", None)
        out.append(f"{what} ({getattr(sch, 'timezone', None) or 'UTC'})")
    return ", ".join(out) or "none"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deployments.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the deployments and exit")
    ap.add_argument("--prefect-file", default=str(PREFECT_FILE), help="deployments file (default: prefect.yaml)")
    ap.add_argument("--only", nargs="*", metavar="NAME", help="serve only these deployments")
    args = ap.parse_args(argv)
    deployments = build_deployments(args.prefect_file, args.only)
    if args.list:
        for d in deployments:
            print(f"{d.flow_name}/{d.name}  schedule: {_schedule_text(d)}  tags: {d.tags}")
        return 0
    if (why := configured_api_problem()) is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    with local_prefect_server() as server:
        print(f"Prefect API: {server.url} ({server.source})  UI: {server.ui_url}", flush=True)
        register_blocks()
        clashes = deployed_to_pools(deployments)
        if clashes:
            print("These deployments exist on this server for a work pool (`prefect deploy`); serving them "
                  "under the same name would leave them broken for both: " + "; ".join(clashes)
                  + ". Delete them first (prefect deployment delete NAME), or run them with a worker.",
                  file=sys.stderr)
            return 2
        print("Serving " + ", ".join(f"{d.flow_name}/{d.name}" for d in deployments)
              + ". Stopping this process pauses these deployments.", flush=True)
        serve(*deployments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
