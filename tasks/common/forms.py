"""How configuration models read as forms in the Prefect UI (a flow's parameters)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def grouped_titles(groups: dict[str, list[str]]) -> Callable[[str, Any], str]:
    """A pydantic ``field_title_generator``: the form label "Group · field" (the field's
    own name, as ``--set`` and ``prefect.yaml`` spell it), so the UI's form of a flat
    configuration reads in sections. Fields in no group are labelled by their name."""
    group_of = {f: g for g, fields in groups.items() for f in fields}

    def title(name: str, _info: Any) -> str:
        return f"{group_of[name]} · {name}" if name in group_of else name

    return title
