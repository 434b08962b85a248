"""What the configuration of every flow shares: the model rules (a misspelt key is an error,
NaN and Infinity are refused, form descriptions are literal Markdown) and where the tasks run
(``dask``, ``dask_block``), so each flow's configuration model only adds its own settings.

The cluster settings are declared last in each flow's model with the shared field types
(``dask: DaskField``, ``dask_block: DaskBlockField = None``): pydantic puts a base class's
fields first, and the form and ``--help`` should open with the flow's own settings."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.common import checks
from tasks.common.forms import markdown_safe_descriptions
from blocks.dask_cluster import load_dask_block
from tasks.common.dask_settings import DaskSettings

__all__ = ["DaskBlockField", "DaskField", "FlowConfig"]

#: ``dask``: where the tasks run (the one Dask configuration, tasks.common.dask_settings.DaskSettings)
DaskField = Annotated[DaskSettings, Field(default_factory=DaskSettings, description="where the tasks run")]
#: ``dask_block``: a saved DaskCluster block instead of ``dask``
DaskBlockField = Annotated[str | None, Field(description="name of a saved DaskCluster block; overrides dask")]


class FlowConfig(BaseModel):
    """The base of a flow's single parameter ``config``: the rules, and the run's cluster from its
    ``dask`` and ``dask_block`` settings (declared by the flow's model with :data:`DaskField`
    and :data:`DaskBlockField`)."""

    # a misspelt key is an error, never silently ignored; NaN and Infinity are refused in every
    # number (tasks.common.checks.FINITE); descriptions reach the UI as literal Markdown
    model_config = ConfigDict(extra="forbid", **checks.FINITE, json_schema_extra=markdown_safe_descriptions)

    def dask_settings(self) -> DaskSettings:
        """The cluster this run uses: the saved ``dask_block`` if named, else ``dask``."""
        return load_dask_block(self.dask_block) if self.dask_block else self.dask

    @classmethod
    def dask_settings_of(cls, parameters: dict[str, Any]) -> DaskSettings:
        """The cluster of a flow run, from its own ``config`` parameter (local, deployed or
        scheduled alike): the task runner's ``settings_from``."""
        config = parameters.get("config")
        if not isinstance(config, cls):
            config = cls.model_validate(config or {})
        return config.dask_settings()
