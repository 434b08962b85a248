"""Prefect blocks: saved, reusable configuration for the flows (editable in the UI).

Register their types on a server once (the deploy and serve entry points do it
too, idempotently)::

    prefect block register -m blocks
"""

from blocks.dask_cluster import DaskCluster
from blocks.earthengine import EarthEngineCredentials

BLOCK_TYPES = (DaskCluster, EarthEngineCredentials)


def register_blocks() -> list[str]:
    """Register (or update) the block types and schemas on the current Prefect API,
    as ``prefect block register -m blocks`` does; safe to repeat. Returns their slugs."""
    for block in BLOCK_TYPES:
        block.register_type_and_schema()
    return [b.get_block_type_slug() for b in BLOCK_TYPES]


__all__ = ["DaskCluster", "EarthEngineCredentials", "BLOCK_TYPES", "register_blocks"]
