"""What the configuration of every flow shares: the model rules (a misspelt key is an error,
NaN and Infinity are refused, form descriptions are literal Markdown) and where the tasks run
(``dask``, ``dask_block``), so each flow's configuration model only adds its own settings."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.common import checks
from tasks.common.forms import markdown_safe_descriptions
from tasks.common.runtime import DaskSettings, load_dask_block

__all__ = ["FlowConfig"]


class FlowConfig(BaseModel):
    """The base of a flow's single parameter ``config``: the rules and the cluster settings."""

    # a misspelt key is an error, never silently ignored; NaN and Infinity are refused in every
    # number (tasks.common.checks.FINITE); descriptions reach the UI as literal Markdown
    model_config = ConfigDict(extra="forbid", **checks.FINITE, json_schema_extra=markdown_safe_descriptions)

    dask: DaskSettings = Field(default_factory=DaskSettings, description="where the tasks run")
    dask_block: str | None = Field(None, description="name of a saved DaskCluster block; overrides dask")

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
