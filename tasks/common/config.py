"""Named configurations and how a configuration is built from settings: the one mechanism of
both flows (``--config NAME --set key=value``) and of the stages' own named settings.

A named configuration is a plain dict of settings over a model's defaults, registered as one
line in a :class:`NamedConfigs` (as hloc's confs)::

    CONFIGS = NamedConfigs("configuration", AerialConfig, {
        "default": {},
        "smoke": {"root": "output/aerial_smoke", "image_batch": 2},
    })
    config = CONFIGS.build("smoke", dask={"n_workers": 2})   # nested dicts merge

The model is a pydantic model (a flow's configuration: every mistake is one
:class:`ConfigError`) or a dataclass (a stage's settings: nested dataclasses are built from
nested dicts, unknown keys are refused naming the nearest valid key, and the object's own
``check()`` runs). Nothing here imports Prefect or Dask.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

__all__ = ["ConfigError", "NamedConfigs", "UnknownSetting", "build", "build_dataclass",
           "describe_validation_error", "merge"]


class ConfigError(ValueError):
    """A mistake in the flow's settings or inputs: the message says what and where."""


class UnknownSetting(ConfigError, KeyError):
    """An unknown configuration name or setting key (a :class:`ConfigError` that is also a
    ``KeyError``, as a missing key of a mapping); the message names the valid ones."""

    __str__ = ValueError.__str__  # the message as written (KeyError's own quotes it)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` over ``base``; nested dicts merge key by key."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model class that holds the field at ``loc[:-1]`` (for nearest-key hints)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def _nearest(key: str, valid: list[str], prefix: str = "") -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"did you mean {prefix + near[0]!r}?" if near else f"valid keys: {', '.join(valid)}"


def describe_validation_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """One line per mistake, ``field: what is wrong``; unknown keys name the nearest valid key."""
    lines = []
    for err in exc.errors():
        loc = tuple(err.get("loc") or ())
        where = ".".join(str(p) for p in loc) or "configuration"
        if err.get("type") == "extra_forbidden":
            holder = _model_at(model, loc)
            prefix = ".".join(str(p) for p in loc[:-1])
            lines.append(f"{where}: unknown setting; "
                         + _nearest(str(loc[-1]), sorted(holder.model_fields) if holder else [],
                                    prefix + "." if prefix else ""))
        else:
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            lines.append(f"{where}: {msg} (got {err.get('input')!r})" if loc else msg)
    return "invalid configuration: " + "; ".join(lines)


def build(model: type[BaseModel], values: dict[str, Any]) -> Any:
    """``model(**values)``, every mistake as one :class:`ConfigError`."""
    try:
        return model(**values)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, model)) from None


def _dataclass_of(annotation: Any) -> type | None:
    """The dataclass of a field's annotation (``D`` or ``D | None``), else None."""
    for a in (annotation, *typing.get_args(annotation)):
        if isinstance(a, type) and dataclasses.is_dataclass(a):
            return a
    return None


def build_dataclass(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """The dataclass ``cls`` from a dict of settings (the others: its defaults); a nested
    dataclass field given as a dict is built the same way. An unknown key raises
    :class:`UnknownSetting` naming ``where`` + the key and the nearest valid one; a wrong
    value, the dataclass's own ``check()`` (run on the top-level object, which checks its parts)."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise UnknownSetting(f"unknown setting {where + key!r}; "
                                 + _nearest(key, [k for k in known if not k.startswith("_")], where))
        sub = _dataclass_of(hints[key])
        if sub is not None and isinstance(value, dict):
            value = build_dataclass(sub, value, f"{where}{key}.")
        kwargs[key] = value
    obj = cls(**kwargs)
    if not where and callable(getattr(obj, "check", None)):
        obj.check()
    return obj


class NamedConfigs(Mapping[str, dict[str, Any]]):
    """Named configurations of ``model``: ``{name: settings}``, each a dict over the model's
    defaults. ``CONFIGS[name]`` is that dict; :meth:`build` makes the configuration, with
    overrides. ``what`` names them in messages ("configuration", "pipeline configuration");
    ``name_field``: a setting that is set to the name of the configuration built."""

    def __init__(self, what: str, model: type, entries: dict[str, dict[str, Any]], *, default: str = "default",
                 name_field: str | None = None) -> None:
        if default not in entries:
            raise ValueError(f"{what}s: the default {default!r} is not one of {sorted(entries)}")
        self.what, self.model, self.default, self.name_field = what, model, default, name_field
        self._entries = entries

    def __getitem__(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self._entries[name])  # a copy: the registry itself never changes

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def settings(self, name: str | None = None, /, **overrides: Any) -> dict[str, Any]:
        """The settings of the named configuration ``name`` (default: :attr:`default`) with
        ``overrides`` merged over them (nested dicts key by key)."""
        name = self.default if name is None else name
        if name not in self._entries:
            raise UnknownSetting(f"unknown {self.what} {name!r}; choose one of {sorted(self._entries)}")
        named = {self.name_field: name} if self.name_field else {}
        return merge(merge(named, self._entries[name]), overrides)

    def build(self, name: str | None = None, /, **overrides: Any) -> Any:
        """The named configuration ``name`` with ``overrides``, as a ``model``: a pydantic model
        (mistakes: :class:`ConfigError`) or a dataclass (:func:`build_dataclass`)."""
        values = self.settings(name, **overrides)
        if isinstance(self.model, type) and issubclass(self.model, BaseModel):
            return build(self.model, values)
        return build_dataclass(self.model, values)
