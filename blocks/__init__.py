"""Prefect blocks: saved, reusable configuration for the flows (editable in the UI)."""

from blocks.dask_cluster import DaskCluster
from blocks.earthengine import EarthEngineCredentials

__all__ = ["DaskCluster", "EarthEngineCredentials"]
