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

    address: str | None = Field(None, description="existing scheduler, e.g. tcp://host:8786 (wins over the rest)")
    cluster_class: str | None = Field(None, description="cluster class import path, e.g. dask_jobqueue.SLURMCluster "
                                                        "or dask_kubernetes.operator.KubeCluster")
    cluster_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of that class, e.g. "
                                           '{"queue": "cpu", "cores": 8, "memory": "32GB"} for SLURMCluster')
    adapt_kwargs: dict[str, Any] | None = Field(None, description='adaptive scaling, e.g. {"minimum": 1, '
                                                '"maximum": 40}; empty: a fixed size')
    n_workers: int | None = Field(None, description="local cluster: worker processes (default: CPU count)")
    threads_per_worker: int = Field(1, description="local cluster: threads per worker process")
    memory_limit: str | None = Field(None, description="local cluster: memory per worker, e.g. 4GB")
    gpus_per_worker: int | None = Field(None, description="local cluster: Dask GPU resource per worker "
                                                          "(default: detect)")

    def to_settings(self):
        from tasks.multimodal.config import DaskSettings

        return DaskSettings(**{k: getattr(self, k) for k in DaskSettings.model_fields})
