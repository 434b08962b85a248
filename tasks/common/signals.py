"""``import pycolmap`` that keeps the process's own SIGTERM / SIGINT handling.

Only the standard library: the aerial package imports this at import time, and the dense
stage's library path (``bench/gpu_check.sh``) must import without Prefect or Dask
(:mod:`tasks.common.runtime` re-exports both names).
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import sys
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
    """``import pycolmap`` without its SIGTERM handler (see :func:`keep_signal_handlers`)."""
    if "pycolmap" in sys.modules:
        return sys.modules["pycolmap"]
    with keep_signal_handlers(signal.SIGTERM, signal.SIGINT):
        import pycolmap
    return pycolmap


__all__ = ["keep_signal_handlers", "import_pycolmap"]
