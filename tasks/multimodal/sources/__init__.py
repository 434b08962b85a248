"""Per-tile stack providers behind one interface (:class:`~.base.Source`)."""

from __future__ import annotations

from typing import Any

from tasks.multimodal.sources.base import (  # noqa: F401
    Grid, NoDataError, Source, SourceError, Tile, TileStack, TransientSourceError,
)

SOURCES = ("synthetic",)


def make_source(name: str, options: dict[str, Any] | None = None, eco_index: dict[str, int] | None = None) -> Source:
    """Build the source called ``name`` with its options."""
    options = dict(options or {})
    if name == "synthetic":
        from tasks.multimodal.sources.synthetic import SyntheticSource

        return SyntheticSource(eco_index=eco_index, **options)
    raise ValueError(f"unknown source {name!r}; choose one of {SOURCES}")
