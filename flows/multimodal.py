"""MMEarth multimodal dataset flow.

Stages: sample tiles -> fetch a stack per tile -> pack partitions (parallel:
read, convert, compress, statistics) -> assemble NAME.h5 (one writer) ->
band statistics, splits, tile_info -> report.

Local run on the embedded default (synthetic source, shipped regions)::

    python -m flows.multimodal
    python -m flows.multimodal --config mmearth64 --set n_tiles=500
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from tasks.common.cli import parse_config
from tasks.common.report import RunFailed
from tasks.common.runlock import exclusive_output
from tasks.common.runtime import make_task_runner, run_local
from tasks.multimodal.config import CONFIGS, MultimodalConfig
from tasks.multimodal.layout import DatasetLayout
from tasks.multimodal.run import CONTACT_SHEET, MultimodalRun
from tasks.multimodal.torchgeo import TORCHGEO_FILENAMES


@flow(name="multimodal", task_runner=make_task_runner(settings_from=MultimodalConfig.dask_settings_of),
      log_prints=True)
@exclusive_output(lambda config=None: (config or MultimodalConfig()).dataset_dir, "dataset folder")
def multimodal_flow(config: MultimodalConfig = MultimodalConfig()) -> dict[str, Any]:
    """Build an MMEarth-compatible dataset into ``config.output_dir/config.name``."""
    logger = get_run_logger()
    run = MultimodalRun.start(config)  # folders, the report (tasks/multimodal/run.py)
    run.select_tiles()  # 1. tiles -> NAME_tiles.geojson; the source, checked
    run.scan_stacks()  # 2. stacks: what the index vouches for, what to fetch
    summaries = run.fetch_and_pack()  # 3. fetch the missing tiles, pack each partition as its tiles settle
    if summaries is None:  # 4. fetch again what was not the stack written; NAME.h5 (one writer)
        summaries = run.finish()
    else:
        logger.info("%s is up to date (%d parts); not rewritten", run.layout.h5, len(summaries))
    n_rows = run.settle(summaries)
    failure = run.failure(n_rows)
    if n_rows == 0:  # nothing to publish: the dataset's files (a good earlier h5 included) stay as they are
        run.report.counts["rows in h5"] = 0
        run.write_report()
        raise RunFailed(failure)
    run.publish(summaries, n_rows)  # 5. band statistics, splits, NAME_tile_info.json
    run.write_report(n_rows)  # 6. report.json, the map, the contact sheet
    logger.info("dataset %s: %s", run.layout.root, json.dumps(run.report.counts))
    if failure:
        raise RunFailed(failure)
    return {"dataset_dir": str(run.layout.root), **run.report.to_dict()}


# --------------------------------------------------------------------------
# Local entry point
# --------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> MultimodalConfig:
    """The configuration named by ``--config`` with ``--set`` overrides (raises :class:`ConfigError`)."""
    return parse_config(argv, prog="python -m flows.multimodal", description=__doc__, configs=CONFIGS)


def main(argv: list[str] | None = None) -> int:
    try:
        return run_local(argv, parse_args, multimodal_flow, finish, folder_of=lambda config: config.dataset_dir)
    except RunFailed as exc:  # the report is written; no traceback for a failure it explains
        print(f"error: {exc}", file=sys.stderr)
        return 1


def finish(result: dict[str, Any]) -> int:
    """Print where the dataset is, its counts, and the paths of its report and picture."""
    counts = result["counts"]
    print(f"\nDataset written to {result['dataset_dir']}")
    if result.get("source", {}).get("synthetic"):
        print(f"  {result['source']['note']}")
    for k, v in counts.items():
        print(f"  {k:>16}: {v}")
    outputs = result.get("outputs", {})
    if result["problems"]:
        where = result.get("problems_file") or outputs.get("report")
        print(f"  {result.get('problems_total', len(result['problems']))} problem(s); see {where}")
    print(f"Report: {outputs.get('report', DatasetLayout(result['dataset_dir']).report)}")
    if outputs.get("picture"):
        print(f"Picture: {outputs['picture']}")
    if outputs.get(CONTACT_SHEET):
        print(f"Picture: {outputs[CONTACT_SHEET]}")
    if Path(result["dataset_dir"]).name not in TORCHGEO_FILENAMES.values():  # TorchGeo opens release names only
        print(f"  for TorchGeo's MMEarth: python -m tasks.multimodal.torchgeo {result['dataset_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
