"""Library modules import neither Prefect nor Dask (nor pycolmap, where they do not use it) at import
time: a GPU or SLURM worker that runs one kernel, or a script that reads a product, pays only for what
it uses. Each module is imported in an interpreter that has loaded none of the watched packages.

Modules are imported one after another in a child interpreter, ``sys.modules`` read after each one.
That is as strict as one interpreter per module: a watched package that appears after ``import B``
was loaded by code ``import B`` ran (every module imported before was checked clean, and so was all
it imported); the child stops as soon as a watched package a later module is checked for is
loaded, and a fresh child goes on with the rest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

#: The Prefect / Dask side of the project: may import prefect, distributed or dask at import time.
USES_PREFECT_OR_DASK = {
    # flows and the thin Prefect task wrappers of the stages
    "flows.aerial": "a Prefect flow",
    "flows.multimodal": "a Prefect flow",
    "tasks.aerial.tasks": "Prefect task wrappers",
    "tasks.multimodal.tasks": "Prefect task wrappers",
    "tasks.multimodal.run": "the multimodal run object: submits the Prefect tasks (the twin of flows.aerial.SceneRun)",
    # the runtime
    "tasks.common.prefect_server": "the Prefect API (server, settings, client)",
    "tasks.common.local_run": "the CLI run around a flow (Prefect server, watchdog, Dask logs)",
    "tasks.common.task_runner": "the prefect-dask task runner",
    "tasks.common.workers": "asks the flow run's Dask client",
    "tasks.common.dask_env": "the Dask configuration the task runner applies",
    "tasks.common.slurm": "a dask-jobqueue cluster class",
    # flow configurations: load_dask_block loads a Prefect block
    "tasks.common.flow_config": "the flows' shared configuration (dask_block: a Prefect block)",
    "tasks.aerial.config": "a flow's configuration (dask_block: a Prefect block)",
    "tasks.multimodal.config": "a flow's configuration (dask_block: a Prefect block)",
    # Prefect blocks and deployments
    "blocks": "Prefect blocks",
    "blocks.dask_cluster": "a Prefect block",
    "blocks.earthengine": "a Prefect block",
    "deployments.deploy": "Prefect deployments",
    "deployments.serve": "Prefect deployments",
    "deployments.spec": "prefect.yaml entries as Prefect deployments",
}

PREFECT_OR_DASK = ("prefect", "prefect_dask", "distributed", "dask")

#: Modules that must not load pycolmap (they do not use it); the others use it or import a stage that does.
PYCOLMAP_FREE = (
    "tasks", "tasks.aerial", "tasks.aerial.geometry", "tasks.aerial.io", "tasks.aerial.layout",
    "tasks.aerial.plan", "tasks.aerial.esp", "tasks.aerial.stale", "tasks.aerial.pairs",
    "tasks.aerial.retrieval", "tasks.aerial.matching", "tasks.multimodal", "tasks.common",
)

_CHILD = r"""
import importlib, json, sys
watch = json.loads(sys.argv[1])  # [[module, [watched packages it must not load]], ...]
for i, (module, forbidden) in enumerate(watch):
    before = set(sys.modules)
    try:
        importlib.import_module(module)
    except BaseException as exc:
        print(json.dumps({"module": module, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        continue
    loaded = sorted(p for p in {"prefect", "prefect_dask", "distributed", "dask", "pycolmap"} - before
                    if p in sys.modules)
    print(json.dumps({"module": module, "loaded": loaded}), flush=True)
    later = {p for _, f in watch[i + 1:] for p in f}
    if later & set(loaded):
        break  # a later module could no longer be checked for it here
"""


def library_modules() -> list[str]:
    """Every module of the project's packages (``tasks``, ``blocks``, ``deployments``, ``flows``)."""
    out = []
    for package in ("tasks", "blocks", "deployments", "flows"):
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            rel = path.relative_to(PROJECT_ROOT).with_suffix("")
            if "data" in rel.parts:  # tasks/common/data: scripts that made the bundled data files
                continue
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out.append(".".join(parts))
    return out


def import_report(checks: dict[str, tuple[str, ...]]) -> dict[str, dict]:
    """{module: {"loaded": [...]} or {"error": ...}} for ``checks`` ({module: packages it must not load}),
    each module imported in an interpreter that had loaded none of those packages."""
    todo = sorted(checks.items(), key=lambda kv: ("pycolmap" not in kv[1], kv[0]))  # pycolmap-free first
    report: dict[str, dict] = {}
    while todo:
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(todo)], cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=300)
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        assert lines, f"the import child printed nothing (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        for line in lines:
            report[line.pop("module")] = line
        todo = [kv for kv in todo if kv[0] not in report]
    return report


def test_library_modules_do_not_import_prefect_dask_or_unused_pycolmap():
    modules = library_modules()
    stale = sorted(set(USES_PREFECT_OR_DASK) - set(modules))
    assert not stale, f"USES_PREFECT_OR_DASK names modules that do not exist: {stale}"
    checks = {}
    for module in modules:
        forbidden = () if module in USES_PREFECT_OR_DASK else PREFECT_OR_DASK
        forbidden += ("pycolmap",) if module in PYCOLMAP_FREE else ()
        if forbidden:
            checks[module] = forbidden
    assert len(checks) > 40 and "tasks.aerial.geometry" in checks  # the walk found the library
    report = import_report(checks)
    problems = []
    for module, forbidden in checks.items():
        got = report[module]
        if "error" in got:
            problems.append(f"{module}: does not import: {got['error']}")
        elif bad := sorted(set(got["loaded"]) & set(forbidden)):
            problems.append(f"{module}: importing it loads {', '.join(bad)}")
    assert not problems, (
        "library modules import what they do not use (find the chain with "
        "`python -X importtime -c 'import MODULE' 2>&1 | grep -B3 PACKAGE`; import the package where it is "
        "used, or add the module to USES_PREFECT_OR_DASK if it is part of the Prefect/Dask side):\n  "
        + "\n  ".join(problems))
