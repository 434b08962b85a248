"""The command line both flows share: ``--config NAME --set key=value``, checked up front.

A configuration mistake is one :class:`ConfigError` with a message that names
the field and says what to do; ``main()`` prints it once (no traceback) and
exits with :data:`EXIT_CONFIG` before any server or cluster starts. Unknown
keys are errors that name the nearest valid key.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.common.config import ConfigError, NamedConfigs, merge
from tasks.common.forms import settings_help

__all__ = ["EXIT_CONFIG", "Alias", "ConfigError", "check_output_folder", "merge", "nest", "parse_config",
           "parse_sets", "parse_value"]

EXIT_CONFIG = 2  # as argparse's own usage errors


def check_output_folder(path: str | os.PathLike, what: str) -> None:
    """Raise :class:`ConfigError` (naming the setting ``what``) unless ``path`` is a writable folder
    or can be created: its nearest existing ancestor is a folder where a folder can be made (tried:
    a temporary folder is made there and removed at once). Finds a path under a file, ``/proc``, a
    read-only file system or a folder without write permission before any server starts."""
    path = Path(path).expanduser().absolute()
    probe_in = path
    while not probe_in.exists() and not probe_in.is_symlink() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        kind = "a file" if probe_in.is_file() else "not a folder"
        where = "" if probe_in == path else f" (its parent {probe_in} is {kind})"
        raise ConfigError(f"{what} {path}: cannot be used as an output folder{where or f': it is {kind}'}; "
                          "choose another folder")
    try:
        made = tempfile.mkdtemp(prefix=".write-check-", dir=probe_in)
    except OSError as exc:
        then = "" if probe_in == path else f", so {path} cannot be created"
        raise ConfigError(f"{what} {path}: cannot write in {probe_in}{then} ({exc.strerror or exc}); "
                          "choose a writable folder") from None
    with contextlib.suppress(OSError):
        os.rmdir(made)


def parse_value(v: str) -> Any:
    """``--set`` values: JSON when they parse as JSON (numbers, lists, objects, true), else the string."""
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["a=1", "dask.n_workers=2"]`` -> ``{"a": 1, "dask": {"n_workers": 2}}``."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p!r} is given both as a value and as a group")
        node[leaf] = parse_value(value)
    return out


def nest(key: str, value: Any) -> dict[str, Any]:
    """``nest("dask.n_workers", 2)`` -> ``{"dask": {"n_workers": 2}}``."""
    *parents, leaf = key.split(".")
    out: dict[str, Any] = {leaf: value}
    for p in reversed(parents):
        out = {p: out}
    return out


@dataclass(frozen=True)
class Alias:
    """A documented flag that is shorthand for ``--set KEY=VALUE`` (built by :func:`parse_config`).

    ``kind``: ``value`` (a string), ``int``, ``json`` (parsed as JSON), ``list`` (zero or more
    values; none given = unset) or ``const`` (no value: sets ``const``)."""

    flag: str
    key: str
    help: str = ""
    kind: str = "value"
    const: Any = True


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg} at column {exc.colno}): {text!r}") from None


def parse_config(argv: list[str] | None, *, prog: str, description: str | None, configs: NamedConfigs,
                 aliases: Sequence[Alias] = ()) -> Any:
    """The one command line of every flow: ``--config NAME`` (one of ``configs``, the flow's
    named configurations), then the ``aliases`` given (documented shorthands for ``--set``), then
    ``--set KEY=VALUE`` overrides in order, built by ``configs.build(NAME, **overrides)`` (which
    raises :class:`ConfigError` naming the field; unknown keys name the nearest valid key).
    ``--help`` lists every setting of the configuration model with its default and description
    (:func:`tasks.common.forms.settings_help`)."""
    ap = argparse.ArgumentParser(prog=prog, description=description, epilog=settings_help(configs.model),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=configs.default, choices=sorted(configs),
                    help=f"named configuration ({configs.default})")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any field (VALUE parsed as JSON when possible; nested fields with dots), "
                         "e.g. dask.n_workers=2 or dask_block=slurm")
    for a in aliases:
        kw: dict[str, Any] = {"dest": f"alias:{a.key}", "default": argparse.SUPPRESS,
                              **({} if a.kind == "const" else {"metavar": a.key.rsplit(".", 1)[-1].upper()}),
                              "help": f"{a.help} (--set {a.key}=...)" if a.help else f"--set {a.key}=..."}
        if a.kind == "const":
            ap.add_argument(a.flag, action="store_const", const=a.const, **kw)
        elif a.kind == "list":
            ap.add_argument(a.flag, nargs="*", **kw)
        elif a.kind in ("int", "json", "value"):
            ap.add_argument(a.flag, type={"int": int, "json": _json_arg, "value": str}[a.kind], **kw)
        else:
            raise ValueError(f"alias {a.flag}: unknown kind {a.kind!r}")
    ns = vars(ap.parse_args(argv))
    values: dict[str, Any] = {}
    for dest, v in ns.items():
        if dest.startswith("alias:"):
            values = merge(values, nest(dest.removeprefix("alias:"), v if v != [] else None))
    return configs.build(ns["config"], **merge(values, parse_sets(ns["set"])))
