"""A Prefect block that stores where flows run their tasks (a Dask cluster).

Its fields are exactly the flows' ``dask`` settings
(:class:`tasks.common.dask_settings.DaskSettings`). Save once, then refer to it by
name from either flow's configuration (``--set dask_block=NAME``) or a
deployment's parameters, e.g. a SLURM cluster::

    from blocks import DaskCluster
    DaskCluster(cluster_class="dask_jobqueue.SLURMCluster",
                cluster_kwargs={"cores": 8, "memory": "32GB", "queue": "gpu"},
                adapt_kwargs={"minimum": 1, "maximum": 40}).save("slurm", overwrite=True)

or an existing scheduler: ``DaskCluster(address="tcp://host:8786").save("lab")``.
``tasks.common.slurm.SLURMCluster`` adds GPU worker jobs to ``dask_jobqueue.SLURMCluster``;
``python -m tasks.common.slurm --print-job-script --block slurm`` prints a block's job scripts.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import ConfigDict

from tasks.common.dask_settings import DaskSettings


class DaskCluster(Block, DaskSettings):
    """Where the flows' tasks run: an existing scheduler, a cluster class with its kwargs, or a local cluster."""

    model_config = ConfigDict(extra="allow")  # as every Block (stored documents carry block metadata)

    _block_type_name = "Dask Cluster"
    _description = "Dask cluster used by the dataset factory's flows (address, cluster class or local sizing)."

    def to_settings(self) -> DaskSettings:
        return DaskSettings(**{k: getattr(self, k) for k in DaskSettings.model_fields})


def load_dask_block(name: str) -> DaskSettings:
    """The settings saved in the ``DaskCluster`` block ``name`` (needs the Prefect API)."""
    try:
        return DaskCluster.load(name).to_settings()
    except ValueError as exc:
        raise ValueError(f"dask_block {name!r}: no DaskCluster block of that name ({exc}); save one "
                         f"(see blocks/dask_cluster.py) or remove dask_block to use the dask settings") from exc
