"""Progress of a long stage, the one helper both flows use: done/total, rate and time left as a
log line (the terminal and the Prefect logs) and as a Prefect progress artifact.

A stage that ends within ``quiet_s`` (3 s) shows nothing; a longer one shows a line at most every
``every_s`` seconds (5 s) and a last one when it ends, and, inside a flow or task run, a progress
artifact (``prefect.artifacts.create_progress_artifact``) that it updates with the same words::

    scene 0001 dense: 12/32 tasks (38%), 0.21/s, about 1m 35s left
    scene 0001 dense: 2/9 tasks (22%), 5m 02s each, about 35m 17s left
    scene 0001 dense: 32/32 tasks in 2m 31s

While nothing finishes, :meth:`Progress.tick` (called every second by the windows of tasks) still
shows a line every ``heartbeat_s`` (30 s): ``scene 0001 dense: 0/9 tasks (0%), running for 1m 30s``.

Used as ``Progress(...).advance(n)`` where the work is counted (the flows' windows of tasks,
:func:`tasks.common.window.run_each`), or as a ``callback(done, total)`` handed to a plain function
that counts its own items (:meth:`Progress.update`: the synthetic world's renders). Thread-safe: the
aerial flow advances a scene's stages from that scene's thread, Dask callbacks from theirs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

# Prefect is imported inside the functions that talk to it: progress is reported from library code, in a flow run or not; importing
# prefect takes 5 s, httpx 0.6 s on the shared 2-core machine (python -X importtime), and
# tests/test_import_hygiene.py keeps the library Prefect-free.

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """``45s``, ``1m 35s``, ``2h 05m``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _run_logger():
    with contextlib.suppress(Exception):
        from prefect import get_run_logger

        return get_run_logger()
    return log


def _in_run() -> bool:
    with contextlib.suppress(Exception):
        from prefect.context import FlowRunContext, TaskRunContext

        return FlowRunContext.get() is not None or TaskRunContext.get() is not None
    return False


class Progress:
    """Progress of ``stage`` over ``total`` ``unit`` (see the module docstring)."""

    def __init__(self, stage: str, total: int, unit: str = "", logger: Any = None, every_s: float = 5.0,
                 quiet_s: float = 3.0, artifact: bool = True, clock=time.monotonic, heartbeat_s: float = 30.0):
        self.stage, self.total, self.unit = stage, max(int(total), 0), unit
        self.logger = logger or _run_logger()
        self.every_s, self.quiet_s, self.clock, self.heartbeat_s = every_s, quiet_s, clock, heartbeat_s
        self.want_artifact = artifact and _in_run()  # decided here: callbacks may run outside the run's context
        self.done = 0
        self.t0 = clock()
        self.last_shown: float | None = None
        self.shown_done = -1
        self.artifact_id = None
        self.closed = False
        self._lock = threading.Lock()

    # -- the words -------------------------------------------------------------------------
    def text(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = now - self.t0
        unit = f" {self.unit}" if self.unit else ""
        if self.total and self.done >= self.total:
            return f"{self.stage}: {self.done}/{self.total}{unit} in {duration(elapsed)}"
        pct = f" ({100.0 * self.done / self.total:.0f}%)" if self.total else ""
        out = f"{self.stage}: {self.done}/{self.total}{unit}{pct}"
        if not self.done:
            out += f", running for {duration(elapsed)}"
        elif elapsed > 0:
            rate = self.done / elapsed
            if rate < 0.1:  # slow items: the time per item says more than 0.00/s
                out += f", {duration(1.0 / rate)} each"
            else:
                out += f", {rate:.2f}/s" if rate < 10 else f", {rate:.0f}/s"
            out += f", about {duration((self.total - self.done) / rate)} left"
        return out

    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 1.0

    # -- counting --------------------------------------------------------------------------
    def advance(self, n: int = 1, note: str = "") -> None:
        """``n`` more items done."""
        with self._lock:
            self.done += n
            self._maybe_show(note)

    def update(self, done: int, total: int | None = None) -> None:
        """``done`` items of ``total`` (a plain function's ``progress(done, total)`` callback)."""
        with self._lock:
            self.done = done
            if total is not None:
                self.total = max(int(total), 0)
            self._maybe_show("")

    def tick(self) -> None:
        """Nothing finished lately: a line anyway once ``heartbeat_s`` passed since the last one (long
        items: the first of 9 dense tasks can take minutes)."""
        with self._lock:
            now = self.clock()
            since = now - (self.last_shown if self.last_shown is not None else self.t0)
            if not self.closed and now - self.t0 >= self.quiet_s and since >= self.heartbeat_s:
                self._show("", now)

    def close(self) -> None:
        """The last line (and the artifact at its final value), if the stage was shown at all."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.last_shown is None and self.clock() - self.t0 < self.quiet_s:
                return  # a short stage: nothing to say
            if self.shown_done != self.done or self.last_shown is None:
                self._show("")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- showing ---------------------------------------------------------------------------
    def _maybe_show(self, note: str) -> None:
        now = self.clock()
        if now - self.t0 < self.quiet_s:
            return
        if self.last_shown is not None and now - self.last_shown < self.every_s:
            return
        self._show(note, now)

    def _show(self, note: str, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        self.last_shown, self.shown_done = now, self.done
        text = self.text(now)
        with contextlib.suppress(Exception):  # progress must never break the work it reports
            self.logger.info("%s%s", text, f" {note}" if note else "")
        if self.want_artifact:
            with contextlib.suppress(Exception):  # e.g. the API gone: the log line is said already
                from prefect.artifacts import create_progress_artifact, update_progress_artifact

                if self.artifact_id is None:
                    self.artifact_id = create_progress_artifact(100.0 * self.fraction(), description=text)
                else:
                    update_progress_artifact(self.artifact_id, 100.0 * self.fraction(), description=text)
