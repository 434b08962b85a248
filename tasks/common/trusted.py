"""One check of the files a later run trusts: a record of each file's size and content digest,
written (last, atomically) by the stage that wrote the files, and checked before a rerun reuses
them. A file that is missing, truncated or rewritten no longer matches its record, so the
stage makes it again instead of handing it on.

A record is a plain JSON-able mapping ``{relative path: {"size": n, "sha256": hex}}`` (paths
relative to a base folder; ``sha256`` left out for files checked by size only, such as large
links to another stage's files). Used by the training exports (``work/<scene>/scene.json``),
the planning stage (``<scene>.plan.json`` records its ``.esp``), the MegaDepth preprocessing
(each image's ``.npz`` records its ``.jpg``/``.exr`` and inputs) and the dense fusion
(``fused.ply.json``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike, content: bool = True) -> dict[str, Any]:
    """``{"size", "sha256"}`` of one file (``sha256`` only with ``content``)."""
    rec: dict[str, Any] = {"size": os.stat(path).st_size}
    if content:
        rec["sha256"] = digest(path)
    return rec


def record(base: str | os.PathLike, files: Iterable[str | os.PathLike], content: bool = True) -> dict[str, Any]:
    """The record of ``files`` (paths under ``base``, or relative to it)."""
    base = Path(base)
    out = {}
    for f in files:
        f = Path(f)
        rel = f.relative_to(base) if f.is_absolute() else f
        out[rel.as_posix()] = file_record(base / rel, content)
    return out


def problems(base: str | os.PathLike, rec: Mapping[str, Any] | None) -> list[str]:
    """What no longer matches ``rec`` under ``base`` (empty: every file is as recorded). A
    missing or malformed record is a problem too: nothing can be trusted without one."""
    if not isinstance(rec, Mapping) or not rec:
        return ["no record of the files"]
    base = Path(base)
    out = []
    for rel, want in rec.items():
        p = base / rel
        try:
            st = p.stat()
        except OSError:
            out.append(f"{p}: missing")
            continue
        if not isinstance(want, Mapping) or st.st_size != want.get("size"):
            out.append(f"{p}: {st.st_size} bytes, recorded {want.get('size') if isinstance(want, Mapping) else '?'}")
            continue
        if "sha256" in want and digest(p) != want["sha256"]:
            out.append(f"{p}: content differs from the record")
    return out


def matches(base: str | os.PathLike, rec: Mapping[str, Any] | None) -> bool:
    return not problems(base, rec)


__all__ = ["digest", "file_record", "record", "problems", "matches"]
