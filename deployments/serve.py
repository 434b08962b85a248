"""Serve the flows as scheduled deployments from this machine.

    python -m deployments.serve                 # uses PREFECT_API_URL, or starts a local server
    python -m deployments.serve --list          # show what would be served

Each deployment is a flow plus parameters plus a schedule; runs appear in the
Prefect UI and can also be started from there ("Run" / "Custom run").
"""

from __future__ import annotations

import argparse
import sys

from prefect.deployments.runner import RunnerDeployment


def build_deployments() -> list[RunnerDeployment]:
    from flows.aerial import AerialConfig, aerial_flow
    from flows.multimodal import multimodal_flow
    from tasks.multimodal.config import get_config

    return [
        multimodal_flow.to_deployment(
            name="embedded-default",
            description="The embedded default dataset (synthetic source); weekly smoke of the whole pipeline.",
            parameters={"config": get_config("default").model_dump(mode="json")},
            cron="0 3 * * 1",
            tags=["multimodal", "embedded"],
        ),
        multimodal_flow.to_deployment(
            name="earthengine",
            description="Real Earth Engine (needs an EarthEngineCredentials block named 'ee', "
                        "see `python -m blocks.earthengine`); run from the UI with your n_tiles and name.",
            parameters={"config": get_config("earthengine", source_options={"credentials_block": "ee"})
                        .model_dump(mode="json")},
            tags=["multimodal", "earthengine"],
        ),
        multimodal_flow.to_deployment(
            name="mmearth64-embedded",
            description="MMEarth64 variant (64 px) of the embedded default; on demand.",
            parameters={"config": get_config("mmearth64").model_dump(mode="json")},
            tags=["multimodal", "embedded"],
        ),
        aerial_flow.to_deployment(
            name="aerial-demo",
            description="The embedded synthetic aerial-ground scene end to end, with its accuracy "
                        "against ground truth; weekly, to catch regressions.",
            parameters={"config": AerialConfig().model_dump(mode="json")},
            cron="0 4 * * 1",
            tags=["aerial", "embedded"],
        ),
        aerial_flow.to_deployment(
            name="aerial-scenes",
            description="Real scenes: set root (Earth Studio exports in ROOT/downloaded_data), megadepth, "
                        "scene_list and scenes in a custom run. Dense depth runs on GPU workers when the "
                        "cluster has them.",
            parameters={"config": AerialConfig(synthetic=False).model_dump(mode="json")},
            tags=["aerial"],
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deployments.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the deployments and exit")
    args = ap.parse_args(argv)
    deployments = build_deployments()
    if args.list:
        for d in deployments:
            sched = ", ".join(str(s.schedule.cron) for s in (d.schedules or []) if hasattr(s.schedule, "cron"))
            print(f"{d.flow_name}/{d.name}  schedule: {sched or 'none'}  tags: {d.tags}")
        return 0
    from prefect import serve

    from tasks.common.runtime import local_prefect_server

    with local_prefect_server() as server:
        print(f"Prefect UI: {server.ui_url}", flush=True)
        serve(*deployments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
