"""Read the deployments of ``prefect.yaml`` (the file ``prefect deploy`` reads).

One reader for both ways of running them: ``deployments.deploy`` hands the file
to ``prefect deploy``; ``deployments.serve`` turns each entry into a
``RunnerDeployment`` with the same name, parameters, schedules (with their
time zones), tags and concurrency limit.
"""

from __future__ import annotations

import datetime
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType
from prefect.schedules import Cron, Interval, RRule

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = PROJECT_ROOT / "prefect.yaml"


@dataclass
class DeploymentSpec:
    name: str
    entrypoint: str  # module path of the flow object, e.g. flows.multimodal.multimodal_flow
    description: str = ""
    tags: list[str] = field(default_factory=list)
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: list[dict[str, Any]] = field(default_factory=list)
    concurrency_limit: dict[str, Any] | int | None = None
    work_pool: dict[str, Any] = field(default_factory=dict)

    @property
    def flow_name(self) -> str:
        return load_flow(self.entrypoint).name


def load_specs(path: str | Path = PREFECT_FILE) -> list[DeploymentSpec]:
    """The deployments of ``path``; a malformed entry names the file, entry and field."""
    path = Path(path)
    doc = yaml.safe_load(path.read_text()) or {}
    out = []
    for i, d in enumerate(doc.get("deployments") or []):
        for key in ("name", "entrypoint"):
            if not d.get(key):
                raise ValueError(f"{path}: deployment #{i + 1} has no {key!r}")
        if ".py:" in d["entrypoint"] or "/" in d["entrypoint"]:
            raise ValueError(f"{path}: deployment {d['name']!r}: entrypoint {d['entrypoint']!r} is a file path; "
                             "give the module path (e.g. flows.multimodal.multimodal_flow): a file-path flow "
                             "is imported under another name, which Dask cluster processes cannot import")
        known = set(DeploymentSpec.__dataclass_fields__)
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"{path}: deployment {d['name']!r}: field(s) {extra} are not read by "
                             f"deployments.serve; use {sorted(known)}")
        out.append(DeploymentSpec(**{k: v for k, v in d.items() if v is not None}))
    return out


def load_flow(entrypoint: str):
    """The flow object of a module-path entrypoint (``flows.x.flow_name``; also ``flows.x:flow_name``).
    A file path (``flows/x.py:name``) is refused with what to write instead: such a flow module is
    imported under another name, which the processes of an external Dask cluster cannot import."""
    if ".py:" in entrypoint or "/" in entrypoint:
        module = Path(entrypoint.partition(":")[0]).with_suffix("").as_posix().replace("/", ".")
        raise ValueError(f"entrypoint {entrypoint!r}: use the module path "
                         f"{module}.{entrypoint.rpartition(':')[2]!s} (a file path breaks runs on Dask clusters)")
    module, _, attr = entrypoint.rpartition(":") if ":" in entrypoint else entrypoint.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def to_schedule(s: dict[str, Any]):
    """A ``prefect.yaml`` schedule entry (cron / interval / rrule, with timezone) as a Prefect schedule."""
    tz = s.get("timezone")
    active = s.get("active", True)
    if "cron" in s:
        return Cron(s["cron"], timezone=tz, day_or=s.get("day_or", True), active=active)
    if "interval" in s:
        anchor = s.get("anchor_date")
        if isinstance(anchor, str):
            anchor = datetime.datetime.fromisoformat(anchor)
        return Interval(datetime.timedelta(seconds=float(s["interval"])), anchor_date=anchor, timezone=tz, active=active)
    if "rrule" in s:
        return RRule(s["rrule"], timezone=tz, active=active)
    raise ValueError(f"schedule {s}: give cron, interval (seconds) or rrule, with timezone")


def to_runner_deployment(spec: DeploymentSpec):
    """``spec`` as a deployment served by this process (``prefect.serve``)."""
    limit = spec.concurrency_limit
    if isinstance(limit, dict):
        limit = ConcurrencyLimitConfig(limit=int(limit["limit"]),
                                       collision_strategy=ConcurrencyLimitStrategy(
                                           limit.get("collision_strategy", "ENQUEUE")))
    return load_flow(spec.entrypoint).to_deployment(
        name=spec.name, entrypoint_type=EntrypointType.MODULE_PATH, description=spec.description, tags=spec.tags, parameters=spec.parameters,
        schedules=[to_schedule(s) for s in spec.schedules], concurrency_limit=limit)
    # (no job variables: they configure a work pool's infrastructure; served runs are
    # subprocesses of serve and inherit its environment)
