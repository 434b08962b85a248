"""Write-then-rename: a file or folder either exists complete or not at all.

The one place the project writes outputs atomically. Every writer puts its work under
one temporary naming scheme beside the target::

    .<target name>.<host>-<pid>-<random>.partial<suffix>

(the final suffix is repeated, so format-sniffing writers such as GDAL, OpenCV or
numpy still see ``.tif``/``.jpeg``/``.npz``), then renames it onto the target. A crash
leaves at most such a ``.*.partial*`` entry, which no stage ever trusts and
:func:`remove_partials` deletes (only those whose writer no longer runs).

* :func:`atomic_path` - a temporary file path (any writer);
* :func:`write_bytes_atomic` / :func:`write_text_atomic` / :func:`write_json_atomic` /
  :func:`write_npz_atomic` - whole files;
* :func:`atomic_dir` - a temporary folder renamed onto the target folder (the old
  folder, if any, replaced);
* :func:`atomic_h5` - an ``h5py.File`` on a temporary file, fsynced and renamed;
  ``base`` copies an existing file in first (append);
* :func:`link_atomic` - a symbolic or hard link (hard link falls back to a copy);
* :func:`remove_partials` - the cleanup of leftovers.

Files get the permissions any other new file of the process would get (0666 less the
umask; ``mkstemp``'s 0600 is not carried over), folders 0777 less the umask.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# numpy and h5py are imported by the writers that need them: modules that write only JSON or text
# (reports, stale markers, plans' records) import this one without them (numpy 0.4 s, h5py 0.6 s on the
# shared 2-core machine, python -X importtime).

PARTIAL = ".partial"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname().split(".")[0]) or "host"
# ".<target>.<host>-<pid>-<random>.partial<suffix>": the writer's tag has no dot
_TAG = re.compile(r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[^.]*\.partial")


def _prefix(path: Path) -> str:
    return f".{path.name}.{_HOST}-{os.getpid()}-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; rename it onto ``path`` on success.

    ``suffix`` (default: ``path``'s) ends the temporary name. ``fsync``: flush the file
    to disk before the rename (for files a later stage trusts without checking). On an
    exception the temporary file is removed and the exception propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=f"{PARTIAL}{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        if fsync:
            _fsync(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _fsync(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    except OSError:  # pragma: no cover - best effort (some file systems refuse)
        pass


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, **kwargs: Any) -> Path:
    kwargs.setdefault("indent", None)
    return write_text_atomic(path, json.dumps(obj, **kwargs))


def write_npz_atomic(path: str | os.PathLike, **arrays: Any) -> Path:
    """``np.savez(path, **arrays)`` (uncompressed, as ``np.savez``), atomically."""
    import numpy as np

    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, merge: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path``
    (an existing folder is removed after the new one is in place: at every moment
    ``path`` is either the old complete folder or the new one). On an exception the
    temporary folder is removed.

    ``merge``: instead, move each entry of the temporary folder into ``path``, replacing
    the entry of the same name and keeping the others (a model folder that also holds
    later stages' subfolders). Each entry lands atomically, the whole not: such a
    folder needs its own completeness marker, removed before and written after."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=PARTIAL, dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        if merge:
            path.mkdir(parents=True, exist_ok=True)
            for item in sorted(tmp.iterdir()):
                target = path / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif item.is_dir() and (target.is_symlink() or target.exists()):
                    target.unlink()
                os.replace(item, target)
            tmp.rmdir()
        elif path.is_dir() and not path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=PARTIAL, dir=path.parent))
            os.replace(path, old)  # onto the empty folder: atomic on POSIX
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if path.is_symlink() or path.exists():
                path.unlink()
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike, base: str | os.PathLike | None = None, **kwargs: Any):
    """Yield an ``h5py.File`` open for writing on a temporary file beside ``path``; on
    success fsync it and rename it onto ``path``. ``base``: copy this file in first and
    open it for appending (when it exists). ``kwargs`` go to ``h5py.File`` (default
    ``libver="latest"``)."""
    import h5py

    kwargs.setdefault("libver", "latest")
    with atomic_path(path, fsync=True) as tmp:
        if base is not None and Path(base).exists():
            shutil.copyfile(base, tmp)
            mode = "a"
        else:
            mode = "w"
        with h5py.File(str(tmp), mode, **kwargs) as fd:
            yield fd


def link_atomic(src: str | os.PathLike, dst: str | os.PathLike, kind: str = "symlink") -> Path:
    """Make ``dst`` a link to ``src`` by rename (an existing ``dst`` is replaced).

    ``kind="symlink"``: a symbolic link whose target is ``src`` as given (pass a relative
    path for a movable tree); left untouched when it already points there.
    ``kind="hardlink"``: a hard link, or a copy where the file system refuses one; left
    untouched when ``dst`` already is ``src``'s file."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if kind == "symlink":
        if dst.is_symlink() and Path(os.readlink(dst)) == src:
            return dst
    elif kind == "hardlink":
        if dst.exists() and os.path.samefile(src, dst):
            return dst
    else:
        raise ValueError(f"link kind {kind!r}: use symlink or hardlink")
    with atomic_path(dst, suffix=dst.suffix) as tmp:
        tmp.unlink()
        if kind == "symlink":
            os.symlink(src, tmp)
        else:
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copy2(src, tmp)
    return dst


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - another user's process
        return True
    return True


def writer_alive(name: str, max_foreign_age_s: float = 86400.0, mtime: float | None = None) -> bool:
    """Whether the writer of the temporary entry ``name`` may still be writing it: a
    process of this host that still runs, or (another host's, whose processes cannot be
    seen from here) an entry younger than ``max_foreign_age_s``. Entries without a
    writer tag (an older scheme) have no live writer."""
    m = _TAG.match(name)
    if m is None:
        return False
    if m["host"] == _HOST:
        return _pid_alive(int(m["pid"]))
    return mtime is not None and time.time() - mtime < max_foreign_age_s


def remove_partials(folder: str | os.PathLike, pattern: str = "*", *, recursive: bool = False,
                    max_foreign_age_s: float = 86400.0) -> int:
    """Delete the temporary ``.*.partial*`` files and folders an interrupted run left in
    ``folder`` (in its subfolders too with ``recursive``) whose writer no longer runs
    (see :func:`writer_alive`); ``pattern``: only those of targets whose name matches
    (fnmatch). Returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = folder.rglob(".*.partial*") if recursive else folder.glob(".*.partial*")
    n = 0
    for p in sorted(found, key=lambda x: len(x.parts), reverse=True):
        m = _TAG.match(p.name)
        target = m["target"] if m else p.name[1:].split(PARTIAL)[0]
        if pattern != "*" and not fnmatch.fnmatchcase(target, pattern):
            continue
        try:
            mtime = p.lstat().st_mtime
        except FileNotFoundError:
            continue
        if writer_alive(p.name, max_foreign_age_s, mtime):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            n += 1
        except FileNotFoundError:
            continue
    return n
