"""The one owner of the rules for values that come from users and input files.

* :func:`number`: a number is a real ``int``/``float`` (``true`` is not a number), finite
  (no NaN, no Infinity) and inside its stated range; an integer setting is a whole number.
* :func:`plain_name` / :func:`safe_join`: a name read from an input file (an image name of a
  MegaDepth ``images.txt``, a scene or subscene id, a tile id) becomes a path only through
  :func:`safe_join`, which refuses anything but a plain file name (no ``/``, ``\\``, ``..``,
  absolute paths, NUL or control characters) and checks that the result stays under its base.
* :data:`FINITE`: the pydantic setting every configuration model uses (``allow_inf_nan=False``),
  so ``--set tile_size_m=Infinity`` or a NaN in ``split_fractions`` is refused with the
  other settings, before anything starts.
* :func:`read_json`: a JSON input file parsed, or one error naming the file, the line and
  column of the mistake and what to do (missing, unreadable, not UTF-8, not JSON).
* :func:`check_npy_member`: the declared size of an ``.npz`` member and its ``.npy`` header's
  shape are checked before a byte is decompressed (a deflate bomb is refused, not expanded).

Every check raises :class:`InputError` (a ``ValueError``) whose message names the file,
the item and the field (``where``) and says what is allowed.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ConfigDict

__all__ = ["FINITE", "InputError", "check_npy_member", "number", "plain_name", "read_json", "safe_join", "whole"]

#: pydantic model configuration of every settings model: NaN and +-Infinity are refused.
FINITE = ConfigDict(allow_inf_nan=False)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_NAME_LENGTH = 255  # a file name on every common file system


class InputError(ValueError):
    """A value from a user or an input file that is refused (the message says where and why)."""


def _at(where: str) -> str:
    return f"{where}: " if where else ""


def number(value: Any, field: str, *, where: str = "", lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False, integer: bool = False, unit: str = "") -> float | int:
    """``value`` as a finite number in ``[lo, hi]`` (``lo_open``/``hi_open``: the bound itself is
    excluded); ``integer``: a whole number, returned as ``int``. Strings of digits are refused as
    JSON would (a number in a JSON/YAML file is written as a number), and so are booleans."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not _is_numpy_number(value):
        raise InputError(f"{_at(where)}{field} is {value!r} ({type(value).__name__}), not a number")
    x = float(value)
    if not math.isfinite(x):
        raise InputError(f"{_at(where)}{field} is {value!r}: must be a finite number")
    if integer:
        if x != int(x):
            raise InputError(f"{_at(where)}{field} is {value!r}: must be a whole number")
        x = int(x)
    u = f" {unit}" if unit else ""
    if lo is not None and (x < lo or (lo_open and x == lo)) or hi is not None and (x > hi or (hi_open and x == hi)):
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        rng = f"{left}{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}{right}"
        raise InputError(f"{_at(where)}{field} is {value!r}{u}: must be in {rng}{u}")
    return x


def whole(value: Any, field: str, **kw: Any) -> int:
    """:func:`number` with ``integer=True``."""
    return int(number(value, field, integer=True, **kw))


def _is_numpy_number(value: Any) -> bool:
    return isinstance(value, (np.integer, np.floating)) and not isinstance(value, np.bool_)


def plain_name(name: Any, what: str = "name", *, where: str = "") -> str:
    """``name`` if it is a plain file name (one path component), else :class:`InputError`."""
    if isinstance(name, bytes):
        try:
            name = name.decode()
        except UnicodeDecodeError:
            raise InputError(f"{_at(where)}{what} {name!r} is not UTF-8 text") from None
    if not isinstance(name, str):
        raise InputError(f"{_at(where)}{what} {name!r} is a {type(name).__name__}, not a name")
    why = None
    if not name or not name.strip():
        why = "is empty"
    elif name != name.strip():
        why = "starts or ends with white space"
    elif name in (".", ".."):
        why = "is a reference to a folder, not a name"
    elif "/" in name or "\\" in name:
        why = "contains a path separator ('/' or '\\')"
    elif _CONTROL.search(name):
        why = "contains a NUL or control character"
    elif len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_LENGTH:
        why = f"is longer than {MAX_NAME_LENGTH} bytes"
    elif os.path.isabs(name) or re.match(r"^[A-Za-z]:", name):
        why = "is an absolute path"
    if why:
        raise InputError(f"{_at(where)}{what} {name!r} {why}: only a plain file name is allowed "
                         "(no folders, no '..'); nothing was read or written for it")
    return name


def safe_join(base: str | os.PathLike, *names: Any, what: str = "name", where: str = "") -> Path:
    """``base / name1 / name2 ...`` where every name is a :func:`plain_name` (names that come
    from input files become paths only here); the result is checked to stay under ``base``
    (also through a symbolic link that already exists among the folders the names make; the last
    name may itself be a link: the pipeline's own image links, a user's linked photos, and a
    writer replaces such a link, never writes through it)."""
    base = Path(base)
    out = base
    for n in names:
        out = out / plain_name(n, what, where=where)
    real_base = os.path.realpath(base)
    real = os.path.join(os.path.realpath(out.parent), out.name)
    if os.path.commonpath([real_base, real]) != real_base:
        raise InputError(f"{_at(where)}{what} {'/'.join(map(str, names))!r} leads outside {base} "
                         f"(to {real}, through a link); nothing was read or written for it")
    return out


def read_json(path: str | os.PathLike, what: str, error: type[ValueError] = InputError, *,
              missing: str = "check the path", fix: str = "") -> Any:
    """The parsed JSON file ``path`` (a ``what``: "plan", "tiles GeoJSON"); every failure is one
    ``error`` naming the file: not found (``missing`` says what to do), unreadable or not UTF-8,
    not valid JSON at line L column C (``fix`` says what to do; default: fix the file)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} file not found; {missing}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read {what} file ({exc}); it must be UTF-8 JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
                    + (fix or f"fix the {what} file (a JSON validator shows the spot)")) from None


def check_npy_member(zf: Any, member: str, *, max_bytes: int, where: str = "") -> None:
    """Refuse the ``.npz`` member ``member`` of the open ``zipfile.ZipFile`` ``zf`` if its
    declared uncompressed size exceeds ``max_bytes`` (read from the zip's headers: nothing is
    decompressed). The reader then decompresses at most that many bytes (``zipfile`` stops at
    the declared size and checks the CRC), so a file that lies about its size fails, small."""
    info = zf.getinfo(member)
    if info.file_size > max_bytes:
        raise InputError(f"{_at(where)}{member} declares {info.file_size:,} bytes uncompressed "
                         f"({info.compress_size:,} compressed), more than the {max_bytes:,} this file may hold; "
                         "refused before decompressing (a damaged or hostile archive)")


def check_npy_shape(shape: tuple[int, ...], itemsize: int, *, available: int, member: str, where: str = "") -> int:
    """The byte count of an ``.npy`` array of ``shape`` (header values), refused when its
    header declares more than the ``available`` bytes of its member."""
    count = 1
    for s in shape:
        if not isinstance(s, int) or s < 0:
            raise InputError(f"{_at(where)}{member}: invalid shape {shape} in its header")
        count *= s
    if count * itemsize > available:
        raise InputError(f"{_at(where)}{member}: its header declares an array of shape {shape} "
                         f"({count * itemsize:,} bytes), more than the member holds ({available:,} bytes)")
    return count
