"""``import pycolmap`` that keeps the process's own SIGTERM / SIGINT handling.

Only the standard library: the aerial package imports this at import time, and the dense
stage's library path (``bench/gpu_check.sh``) must import without Prefect or Dask.
:func:`guard_pycolmap_import` (installed by ``tasks.aerial``) makes every later ``import pycolmap``
of the process, in any module or thread, go the way :func:`import_pycolmap` goes; pycolmap itself
loads only when a module that uses it is imported.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.abc
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def keep_signal_handlers(*signums: int) -> Iterator[None]:
    """Restore the C-level handlers of ``signums`` after the block (works in any thread).

    pycolmap (glog's failure handler) installs a SIGTERM handler at import that
    turns the SIGTERM of a cancellation into an abort with a stack trace; a
    process keeps its own handling (Prefect's in the flow process, the default
    in a Dask worker) when pycolmap is imported inside this block."""
    libc = ctypes.CDLL(None, use_errno=True)
    saved = {}
    for sig in signums or (signal.SIGTERM, signal.SIGINT):
        buf = ctypes.create_string_buffer(512)  # >= sizeof(struct sigaction) on every Linux ABI
        if libc.sigaction(int(sig), None, buf) == 0:
            saved[int(sig)] = buf
    try:
        yield
    finally:
        for sig, buf in saved.items():
            libc.sigaction(sig, buf, None)


class _GuardedLoader(importlib.abc.Loader):
    """pycolmap's own loader, run inside :func:`keep_signal_handlers`; :func:`route_glog` after."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def __getattr__(self, name: str):  # everything else (resources, code) as pycolmap's own loader
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        with keep_signal_handlers(signal.SIGTERM, signal.SIGINT):
            self.loader.exec_module(module)
        route_glog(module)


class _PycolmapImportGuard(importlib.abc.MetaPathFinder):
    """Finds ``pycolmap`` with the finders after it and hands out its spec with a :class:`_GuardedLoader`."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "pycolmap":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _GuardedLoader(spec.loader)
                return spec
        return None


def guard_pycolmap_import() -> None:
    """From now on, the process's first ``import pycolmap`` (wherever it is written) keeps the
    process's SIGTERM / SIGINT handling and routes COLMAP's log (:func:`import_pycolmap`). Idempotent."""
    if not any(isinstance(finder, _PycolmapImportGuard) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PycolmapImportGuard())


def import_pycolmap():
    """``import pycolmap`` without its SIGTERM handler (see :func:`keep_signal_handlers`); COLMAP's
    log goes where :func:`route_glog` says (``FACTORY_LIBRARY_LOG_DIR``)."""
    guard_pycolmap_import()
    import pycolmap  # here: loading pycolmap is what this function is for

    return pycolmap


def route_glog(pycolmap, log_dir: str | None = None) -> None:
    """COLMAP's glog messages into ``LOG_DIR/colmap.log.<date>.<pid>`` (one file per process) and
    only errors on the terminal, when ``log_dir`` or ``FACTORY_LIBRARY_LOG_DIR`` names a folder;
    otherwise pycolmap's defaults (everything on stderr) stay."""
    log_dir = log_dir or os.environ.get("FACTORY_LIBRARY_LOG_DIR")
    if not log_dir:
        return
    with contextlib.suppress(Exception):
        glog = pycolmap.logging
        glog.alsologtostderr = False
        glog.stderrthreshold = 2  # ERROR
        glog.set_log_destination(glog.INFO, str(Path(log_dir) / "colmap.log."))
        glog.set_log_destination(glog.WARNING, "")  # their lines are in the INFO file already
        glog.set_log_destination(glog.ERROR, "")


__all__ = ["keep_signal_handlers", "guard_pycolmap_import", "import_pycolmap", "route_glog"]
