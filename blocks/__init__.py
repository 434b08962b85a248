"""Prefect blocks: saved, reusable configuration for the flows (editable in the UI)."""

from blocks.dask_cluster import DaskCluster

__all__ = ["DaskCluster"]
