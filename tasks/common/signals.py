"""``import pycolmap`` that keeps the process's own SIGTERM / SIGINT handling.

Only the standard library: the aerial package imports this at import time, and the dense
stage's library path (``bench/gpu_check.sh``) must import without Prefect or Dask
(:mod:`tasks.common.runtime` re-exports both names).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from pathlib import Path
from collections.abc import Iterator


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


def import_pycolmap():
    """``import pycolmap`` without its SIGTERM handler (see :func:`keep_signal_handlers`); COLMAP's
    log goes where :func:`route_glog` says (``FACTORY_LIBRARY_LOG_DIR``)."""
    if "pycolmap" in sys.modules:
        return sys.modules["pycolmap"]
    with keep_signal_handlers(signal.SIGTERM, signal.SIGINT):
        import pycolmap
    route_glog(pycolmap)
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


__all__ = ["keep_signal_handlers", "import_pycolmap", "route_glog"]
