"""Products of an earlier run that a failed scene leaves behind are marked stale.

A scene that fails in this run keeps what earlier runs made (nothing is deleted), but
none of it may look current: each product folder gets a ``STALE.txt`` saying why and
since when, ``accuracy.json`` gets a ``"stale"`` entry, and the ingest outputs
(``footage/``, ``<scene>.json``, ``ingest.json``, the reference model) get a
``STALE.txt`` in ``data/<scene>/`` when the ingest itself failed.  A later run that
rebuilds a product removes its marker.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tasks.aerial.layout import SceneLayout
from tasks.common.atomic import write_json_atomic, write_text_atomic

MARKER = "STALE.txt"


def scene_products(root: str | Path, scene: str) -> list[Path]:
    """Final products of a scene from any pipeline configuration, and its accuracy file."""
    layout = SceneLayout(Path(root), scene)
    out = layout.products()
    if layout.accuracy.is_file():
        out.append(layout.accuracy)
    return out


def mark_stale(root: str | Path, scene: str, reason: str, ingest_failed: bool = False,
               current: list[Path] = ()) -> list[str]:
    """Mark what earlier runs left for ``scene`` (not the ``current`` products this run made);
    returns the paths marked (for the report)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    layout = SceneLayout(Path(root), scene)
    folder = layout.scene_dir
    marked = []
    keep = {Path(c).resolve() for c in current}
    for p in scene_products(root, scene):
        if p.resolve() in keep:
            continue
        made = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(p.stat().st_mtime))
        text = (f"STALE: scene {scene} failed in the run of {when} ({reason}).\n"
                f"This was made by an earlier run ({made}) and does not reflect the current inputs.\n")
        if p.is_dir():
            write_text_atomic(p / MARKER, text)
        else:
            try:
                doc = json.loads(p.read_text())
            except json.JSONDecodeError:
                doc = {}
            if isinstance(doc, dict):
                doc["stale"] = text.strip()
                write_json_atomic(p, doc, indent=1)
        marked.append(str(p))
    if ingest_failed and (layout.footage.is_dir() or layout.metadata.exists()):
        write_text_atomic(folder / MARKER, f"STALE: the Earth Studio ingest of scene {scene} failed in the run of "
                                           f"{when} ({reason}); footage/, {scene}.json, ingest.json and the "
                                           "reference model are from an earlier export.\n")
        marked.append(str(layout.footage))
    return marked


def clear_stale(path: str | Path) -> None:
    """Remove the marker of a product (folder) or scene folder rebuilt by this run."""
    (Path(path) / MARKER).unlink(missing_ok=True)
