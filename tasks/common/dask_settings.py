"""Where a flow's tasks run: :class:`DaskSettings`, the one Dask configuration of the project.

A ``LocalCluster`` sized to the machine (default), an existing scheduler (``address``), or any
cluster class with kwargs (``cluster_class``, e.g. ``dask_jobqueue.SLURMCluster``), so SLURM or
Kubernetes clusters plug in without code changes. Workers carry Dask resources; ``GPU`` is
declared on workers that have GPUs. Plain pydantic: neither Prefect nor Dask is imported here
(the settings are read by the configurations; :mod:`tasks.common.task_runner` starts the cluster;
a saved ``DaskCluster`` block loads with :func:`blocks.dask_cluster.load_dask_block`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

def detect_gpus() -> int:
    """Number of GPUs visible to this machine (CUDA_VISIBLE_DEVICES, else nvidia-smi)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        return len(ids)
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


class DaskSettings(BaseModel):
    """Where a flow's tasks run: the one Dask configuration of the project.

    Used by both flow configurations (field ``dask``), the ``DaskCluster``
    block and the CLI (``--set dask.n_workers=2``).

    * ``address``: connect to an existing scheduler (``tcp://host:8786``).
    * ``cluster_class`` (+ ``cluster_kwargs``, ``adapt_kwargs``): any Dask
      cluster class by import path, e.g. ``dask_jobqueue.SLURMCluster`` or
      ``dask_kubernetes.operator.KubeCluster``; the kwargs go to it unchanged.
    * neither: a ``LocalCluster`` sized to this machine: ``n_workers``
      processes (default: CPU count) with ``threads_per_worker`` threads,
      listening on 127.0.0.1 only, its dashboard on ``dashboard_address``.
    ``gpus_per_worker``: Dask ``GPU`` resource per local worker; ``None``
    detects (the machine's GPUs spread over the workers).
    """

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="existing Dask scheduler, e.g. tcp://host:8786")
    cluster_class: str | None = Field(None, description="cluster class import path, e.g. dask_jobqueue.SLURMCluster")
    cluster_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of cluster_class "
                                           "(or extra LocalCluster arguments)")
    adapt_kwargs: dict[str, Any] | None = Field(None, description="cluster.adapt() arguments, e.g. minimum, maximum")
    n_workers: int | None = Field(None, ge=1, description="local workers (default: CPU count)")
    threads_per_worker: int = Field(1, ge=1, description="threads per local worker")
    memory_limit: str | None = Field(None, description="memory limit per local worker, e.g. 4GB")
    gpus_per_worker: int | None = Field(None, ge=0, description="Dask GPU resource per local worker (default: detect)")
    dashboard_address: str | None = Field("127.0.0.1:0", description="local dashboard (host:port, port 0 = a free "
                                          "one); empty = no dashboard. Loopback unless you choose otherwise")

    @field_validator("dashboard_address")
    @classmethod
    def _dashboard(cls, v: str | None) -> str | None:
        return v or None

    @model_validator(mode="after")
    def _one_way(self) -> "DaskSettings":
        if self.address and self.cluster_class:
            raise ValueError("dask.address and dask.cluster_class exclude each other: give one")
        if self.address and not re.match(r"^[a-z0-9+]+://", self.address):
            raise ValueError(f"dask.address {self.address!r} needs a protocol, e.g. tcp://host:8786")
        if self.cluster_class:
            module, _, name = self.cluster_class.rpartition(".")
            if not module or not name:
                raise ValueError(f"dask.cluster_class {self.cluster_class!r} must be an import path "
                                 "such as dask_jobqueue.SLURMCluster")
        return self

    def describe(self) -> str:
        if self.address:
            return f"existing Dask scheduler {self.address}"
        if self.cluster_class:
            return f"{self.cluster_class}({json.dumps(self.cluster_kwargs, default=str)})"
        kw = self.local_cluster_kwargs()
        return (f"LocalCluster: {kw['n_workers']} worker(s) x {kw['threads_per_worker']} thread(s)"
                f"{', GPU ' + str(kw['resources']['GPU']) + ' per worker' if kw['resources'] else ''}")

    def local_cluster_kwargs(self) -> dict[str, Any]:
        n = self.n_workers or max(1, os.cpu_count() or 1)
        kwargs: dict[str, Any] = {
            "n_workers": n,
            "threads_per_worker": self.threads_per_worker,
            "processes": True,
            "host": "127.0.0.1",  # scheduler, workers and nannies on loopback only
            # the scheduler's HTTP server (health, metrics; the dashboard unless off) on a free loopback port
            "dashboard_address": self.dashboard_address or "127.0.0.1:0",
        }
        if not self.dashboard_address or importlib.util.find_spec("bokeh") is None:
            # off, or impossible without bokeh: then the scheduler is not asked for it at all (asking
            # makes it try `import distributed.dashboard.scheduler`, which without bokeh failed
            # once in a fresh-clone run with "module 'distributed.dashboard' has no attribute
            # 'scheduler'" and took the cluster down); its HTTP server keeps health and metrics
            kwargs["scheduler_kwargs"] = {"dashboard": False}
        if self.memory_limit:
            kwargs["memory_limit"] = self.memory_limit
        gpus = self.gpus_per_worker
        if gpus is None:
            total = detect_gpus()
            gpus = max(1, total // n) if total else 0
        kwargs["resources"] = {"GPU": gpus} if gpus else {}
        kwargs.update(self.cluster_kwargs)
        return kwargs

    def runner_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``prefect_dask.DaskTaskRunner`` for these settings."""
        if self.address:
            return {"address": self.address}
        if self.cluster_class:
            return {"cluster_class": self.cluster_class, "cluster_kwargs": dict(self.cluster_kwargs),
                    "adapt_kwargs": dict(self.adapt_kwargs or {})}
        return {"cluster_class": "distributed.LocalCluster", "cluster_kwargs": self.local_cluster_kwargs(),
                "adapt_kwargs": dict(self.adapt_kwargs or {})}


def dask_settings_from_env() -> DaskSettings:
    """Settings for a runner with nothing else to go on: ``FACTORY_DASK_ADDRESS``,
    ``FACTORY_DASK_CLUSTER_CLASS`` and ``FACTORY_DASK_CLUSTER_KWARGS`` (JSON), else a local cluster."""
    return DaskSettings(
        address=os.environ.get("FACTORY_DASK_ADDRESS") or None,
        cluster_class=os.environ.get("FACTORY_DASK_CLUSTER_CLASS") or None,
        cluster_kwargs=json.loads(os.environ.get("FACTORY_DASK_CLUSTER_KWARGS") or "{}"),
    )
