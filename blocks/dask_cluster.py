"""A Prefect block that stores where flows run their tasks (a Dask cluster).

Save once, then refer to it by name from any flow configuration
(``--set dask_block=NAME``) or deployment, e.g. a SLURM cluster::

    from blocks import DaskCluster
    DaskCluster(cluster_class="dask_jobqueue.SLURMCluster",
                cluster_kwargs={"cores": 8, "memory": "32GB", "queue": "gpu"},
                adapt_kwargs={"minimum": 1, "maximum": 40}).save("slurm", overwrite=True)
"""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from pydantic import Field


class DaskCluster(Block):
    """Where the flows' tasks run: an existing scheduler, a cluster class, or a local cluster."""

    _block_type_name = "Dask Cluster"
    _description = "Dask cluster used by the dataset factory's flows (address, cluster class or local sizing)."

    address: str | None = Field(None, description="existing scheduler, e.g. tcp://host:8786")
    cluster_class: str | None = Field(None, description="cluster class import path, e.g. dask_jobqueue.SLURMCluster")
    cluster_kwargs: dict[str, Any] = Field(default_factory=dict)
    adapt_kwargs: dict[str, Any] | None = None
    n_workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str | None = None
    gpus_per_worker: int | None = None

    def to_settings(self):
        from tasks.multimodal.config import DaskSettings

        return DaskSettings(**{k: getattr(self, k) for k in DaskSettings.model_fields})
