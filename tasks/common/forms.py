"""How configuration models read as forms in the Prefect UI (a flow's parameters)."""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic_core import PydanticUndefined


def grouped_titles(groups: dict[str, list[str]]) -> Callable[[str, Any], str]:
    """A pydantic ``field_title_generator``: the form label "Group · field" (the field's
    own name, as ``--set`` and ``prefect.yaml`` spell it), so the UI's form of a flat
    configuration reads in sections. Fields in no group are labelled by their name."""
    group_of = {f: g for g, fields in groups.items() for f in fields}

    def title(name: str, _info: Any) -> str:
        return f"{group_of[name]} · {name}" if name in group_of else name

    return title


#: characters the Prefect UI's Markdown would take as markup in a field description
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~])")


def escape_markdown(text: str) -> str:
    """``text`` as literal Markdown: ``data/<scene>/`` stays ``data/<scene>/`` in the UI
    (unescaped, ``<scene>`` is taken for an HTML tag and dropped)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def markdown_safe_descriptions(schema: dict[str, Any], _cls: Any = None) -> None:
    """A pydantic ``json_schema_extra``: every property description of the model's JSON schema
    (what the UI renders as Markdown) escaped; the fields' own descriptions (what ``--help``
    prints) stay as written."""
    for prop in (schema.get("properties") or {}).values():
        if isinstance(prop.get("description"), str):
            prop["description"] = escape_markdown(prop["description"])


def setting(default: Any = None, help: str = "", *, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with its user-facing description: ``name: T = setting(3, "what it does")``.
    The UI form and ``--help`` show ``help`` (explicit field metadata, the one source of a
    setting's description; comments in the source are for developers and never reach a form)."""
    meta = {"help": help} if help else {}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_help(cls: type) -> dict[str, str]:
    """``{field: description}`` of a dataclass: each field's ``metadata["help"]``
    (:func:`setting`), the one source of a setting's description (comments never reach a form)."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            out[f.name] = f.metadata["help"]
    return out


def missing_help(cls: type) -> list[str]:
    """The settings of the dataclass ``cls`` without an explicit description (:func:`setting`);
    private fields (``_name``) are not settings."""
    return [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_") and not f.metadata.get("help")]


def overrides_model(cls: type, name: str, *, doc: str = "", choices: dict[str, Any] | None = None,
                    nested: dict[str, type] | None = None, exclude: tuple[str, ...] = ()) -> type:
    """A pydantic model of optional overrides of the dataclass ``cls`` (the one owner of the
    settings and their defaults): every field typed as in ``cls`` (``choices`` narrows some to
    ``Literal`` choices, ``nested`` gives the override model of a nested dataclass), default
    ``None`` = "the named configuration's value", described by its comment in ``cls``.
    Unknown keys are errors. ``overrides()`` of an instance is the dict of what was set."""
    hints = typing.get_type_hints(cls)
    comments = field_help(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude or f.name.startswith("_"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if nested and f.name in nested:
            ann: Any = nested[f.name]
            fields[f.name] = (ann, Field(default_factory=ann, description=comments.get(f.name) or
                                         f"settings of {f.name}"))
            continue
        ann = (choices or {}).get(f.name, hints[f.name])
        shown = "none" if default is None else json_default(default)
        what = comments.get(f.name) or f.name.replace("_", " ")
        fields[f.name] = (ann | None, Field(None, description=f"{what} (default: {shown})"))

    class Overrides(BaseModel):
        settings_class: typing.ClassVar[type]
        # NaN/Infinity refused (tasks.common.checks)
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra=markdown_safe_descriptions)

        def overrides(self) -> dict[str, Any]:
            """What was given (``None`` fields: as the named configuration), nested models included."""
            out: dict[str, Any] = {}
            for k in type(self).model_fields:
                v = getattr(self, k)
                if isinstance(v, BaseModel) and hasattr(v, "overrides"):
                    v = v.overrides()
                    if v:
                        out[k] = v
                elif v is not None:
                    out[k] = v
            return out

    model = create_model(name, __base__=Overrides, __doc__=doc or f"Overrides of {cls.__name__}.", **fields)
    model.settings_class = cls  # the dataclass that owns these settings and their descriptions
    return model


def json_default(v: Any) -> str:
    """A default value as the form's description shows it."""
    try:
        return json.dumps(v)
    except TypeError:
        return repr(v)


def _model_of(annotation: Any) -> type | None:
    """The pydantic model class of a field's annotation (``M`` or ``M | None``), else None."""
    for a in (annotation, *typing.get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def settings_rows(model: type, prefix: str = "", group: str = "") -> list[tuple[str, str, str, str]]:
    """``(group, key, default, description)`` of every setting of ``model`` (the group of the
    form's "Group · field" label), nested models' fields as dotted keys (``dask.n_workers``),
    from the same field metadata the UI form shows."""
    rows: list[tuple[str, str, str, str]] = []
    title_of = model.model_config.get("field_title_generator")
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        title = title_of(name, info) if title_of else ""
        grp = title.split(" · ")[0] if " · " in title else group
        desc = " ".join((info.description or "").split())
        sub = _model_of(info.annotation)
        if sub is not None:
            rows.append((grp, key, "", desc))
            rows += settings_rows(sub, key + ".", grp)
            continue
        if info.default_factory is not None:
            default = info.default_factory()
        else:
            default = None if info.default is PydanticUndefined else info.default
        rows.append((grp, key, "" if "(default" in desc else json_default(default), desc))
    return rows


def settings_help(model: type, width: int = 100) -> str:
    """The ``--help`` epilog: every ``--set`` key with its default and description, by group."""
    lines = [f"settings (--set KEY=VALUE, nested keys with dots; the defaults of {model.__name__}: "
             "a --config may change some):"]
    by_group: dict[str, list[tuple[str, str, str]]] = {}
    for group, key, default, desc in settings_rows(model):
        by_group.setdefault(group or "Other", []).append((key, default, desc))
    for group, rows in by_group.items():
        lines.append(f" {group}:")
        for key, default, desc in rows:
            text = desc + (f" (default: {default})" if default else "")
            if len(key) > 28:  # a long dotted key on its own line
                lines.append(f"  {key}")
                lines += textwrap.wrap(text, width=width, initial_indent=" " * 31, subsequent_indent=" " * 31)
            else:
                lines += textwrap.wrap(text, width=width, initial_indent=f"  {key:<28} ",
                                       subsequent_indent=" " * 31) or [f"  {key}"]
    return "\n".join(lines)
