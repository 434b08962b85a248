"""What an output depends on, as one short hash: the one rule every re-runnable stage uses to
decide whether its outputs are still those of its inputs and settings.

Settings are hashed as canonical JSON (dataclasses as their fields); each input file by name,
size and modification time (a folder: its files matching ``pattern``), or by its bytes when
``content`` is set (small text files whose rewrite with the same content must not count).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any


def _files(p: Path, pattern: str) -> list[Path]:
    return sorted(x for x in p.glob(pattern) if x.is_file()) if p.is_dir() else [p]


def fingerprint(settings: Any, *inputs: str | Path, pattern: str = "*", content: bool = False,
                length: int = 32) -> str:
    """A hex digest of ``settings`` and ``inputs`` (see the module docstring); ``length`` hex digits."""
    h = hashlib.sha256(json.dumps(asdict(settings) if is_dataclass(settings) else settings, sort_keys=True,
                                  default=str).encode())
    for p in inputs:
        for f in _files(Path(p), pattern):
            if content:
                h.update(f.name.encode())
                h.update(f.read_bytes())
            else:
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:length]
