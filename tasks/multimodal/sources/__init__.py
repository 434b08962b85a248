"""Per-tile stack providers behind one interface (:class:`~.base.Source`)."""

from __future__ import annotations

from typing import Any

from tasks.multimodal.sources.base import (  # noqa: F401
    NoDataError, Source, SourceError, TileStack, TransientSourceError, UnknownEcoregionError,
)

SOURCES = ("synthetic", "earthengine", "stac")


def make_source(name: str, options: dict[str, Any] | None = None, eco_index: dict[str, int] | None = None,
                limit_name: str | None = None, ceiling: int | None = None, rate: float | None = None) -> Source:
    """Build the source called ``name``, completely configured: its options, the
    ecoregion index mapping and, for Earth Engine and STAC, the Prefect concurrency limit
    every request holds a slot of (``limit_name``) and its size (``ceiling``, which
    caps a batch's lease), and for Earth Engine the project's request rate (``rate``,
    requests/s). Nothing is set on a source after this."""
    options = dict(options or {})
    if name == "synthetic":
        from tasks.multimodal.sources.synthetic import SyntheticSource

        return SyntheticSource(eco_index=eco_index, **options)
    if name == "earthengine":
        if limit_name is not None:
            options["limit_name"] = limit_name
        if ceiling is not None:
            options["ceiling"] = ceiling
        if rate is not None:
            options["request_rate"] = rate
        return _earthengine(options, eco_index)
    if name == "stac":
        import dataclasses

        from tasks.multimodal.sources.stac import StacSource

        known = {f.name for f in dataclasses.fields(StacSource) if f.name not in ("eco_index", "name")}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"source_options {unknown} are not settings of the stac source; it takes "
                             f"{sorted(known - {'limit_name', 'ceiling'})}")
        if limit_name is not None:
            options["limit_name"] = limit_name
        if ceiling is not None:
            options["ceiling"] = ceiling
        return StacSource(eco_index=eco_index, **options)
    raise ValueError(f"unknown source {name!r}; choose one of {SOURCES}")


def _earthengine(options: dict[str, Any], eco_index: dict[str, int] | None) -> Source:
    """Earth Engine source; credentials from (in order) ``credentials_block`` (an
    EarthEngineCredentials block), ``secret_block`` (a Prefect Secret holding the
    key JSON), ``EE_SERVICE_ACCOUNT_KEY`` (JSON text or file path), else the
    persistent credentials of ``earthengine authenticate``. The project from
    ``project``, the block, or ``EE_PROJECT``."""
    import json
    import os

    from tasks.multimodal.sources.earthengine import EarthEngineAuthError, EarthEngineSource, credentials_from_env

    key = None
    origin = None
    project = options.pop("project", None)
    block_name = options.pop("credentials_block", None)
    secret_name = options.pop("secret_block", None)
    if block_name:
        from blocks.earthengine import EarthEngineCredentials

        try:
            block = EarthEngineCredentials.load(block_name)
        except ValueError as exc:
            raise EarthEngineAuthError(f"EarthEngineCredentials block {block_name!r} not found ({exc}); "
                                       "save one first (see blocks/earthengine.py)") from None
        key = block.key_info()
        origin = f"EarthEngineCredentials block {block_name!r}"
        project = project or block.project
    elif secret_name:
        from prefect.blocks.system import Secret

        try:
            value = Secret.load(secret_name).get()
        except ValueError as exc:
            raise EarthEngineAuthError(f"Prefect Secret {secret_name!r} not found ({exc})") from None
        key = value if isinstance(value, dict) else json.loads(value)
        origin = f"Prefect Secret {secret_name!r}"
    else:
        key = credentials_from_env()
        origin = "the environment variable EE_SERVICE_ACCOUNT_KEY"
    project = project or os.environ.get("EE_PROJECT") or (key or {}).get("project_id")
    if not project:
        raise EarthEngineAuthError("no Earth Engine Cloud project: set source_options.project, the block's "
                                   "project, or EE_PROJECT")
    if key is not None:
        options.setdefault("credentials_origin", origin)
    return EarthEngineSource(project=project, credentials=key, eco_index=eco_index, **options)
