"""Bounded windows of submitted tasks: at most ``window`` futures exist at any time.

A flow that submits every task up front holds one future (and its task run's
state and result) per task for the whole run, so its memory grows with the
work. :func:`run_windowed` submits from an iterator, keeps at most ``window``
futures in flight, hands each finished one to a callback in completion order
and drops it, so memory is flat however many items there are. :func:`run_each` is the same loop with
successes and failures handed to separate callbacks (failures become the item's problems);
:func:`in_thread` runs a function in a thread that keeps the caller's Prefect context (the
aerial flow drives each scene's chain of stages from one such thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class RunCancelled(Exception):
    """A future of the window was cancelled: the run is being cancelled (its Dask client closes
    and cancels every future), so the loop stops instead of turning each cancelled future into
    a problem of its item."""


def is_cancellation(exc: BaseException) -> bool:
    """``exc`` says the work was cancelled (Dask's ``FutureCancelledError``, a cancelled
    ``concurrent.futures`` or asyncio future), not that it failed."""
    return isinstance(exc, (concurrent.futures.CancelledError, asyncio.CancelledError, RunCancelled))


def future_cancelled(fut: Any) -> bool:
    """The future (or the Dask/concurrent future a Prefect future wraps) was cancelled."""
    inner = getattr(fut, "wrapped_future", fut)
    try:
        return bool(inner.cancelled())
    except Exception:  # noqa: BLE001 - a future without cancelled(): not known to be cancelled
        return False


@dataclass
class WindowStats:
    submitted: int = 0
    max_in_flight: int = 0  # the most futures held at once (<= window)


def run_windowed(submit: Callable[[T], Any], items: Iterable[T], window: int,
                 on_done: Callable[[T, Any], None], idle: Callable[[], None] | None = None) -> WindowStats:
    """Submit ``submit(item)`` for every item with at most ``window`` in flight; call
    ``on_done(item, future)`` (in this thread) as each finishes. ``submit`` may return
    any future with ``add_done_callback`` (Prefect, Dask, concurrent.futures). A cancelled
    future raises :class:`RunCancelled` (the run is being cancelled: no item's problem).
    ``idle()``: called about every second while nothing finishes (a progress heartbeat)."""
    window = max(1, int(window))
    finished: queue.SimpleQueue = queue.SimpleQueue()
    in_flight: dict[int, tuple[T, Any]] = {}
    stats = WindowStats()
    it = iter(items)
    exhausted = False
    seq = 0
    while True:
        while not exhausted and len(in_flight) < window:
            try:
                item = next(it)
            except StopIteration:
                exhausted = True
                break
            fut = submit(item)
            in_flight[seq] = (item, fut)
            stats.submitted += 1
            stats.max_in_flight = max(stats.max_in_flight, len(in_flight))
            fut.add_done_callback(lambda _f, k=seq: finished.put(k))
            seq += 1
        if not in_flight:
            return stats
        while True:  # a timed wait, so Ctrl-C / cancellation reach this thread promptly
            try:
                k = finished.get(timeout=1.0)
                break
            except queue.Empty:
                if idle is not None:
                    idle()
                continue
        item, fut = in_flight.pop(k)
        if future_cancelled(fut):
            raise RunCancelled(f"cancelled with {len(in_flight) + 1} task(s) in flight")
        on_done(item, fut)
        del item, fut


def run_each(submit: Callable[[T], Any], items: Iterable[T], on_result: Callable[[T, Any], None],
             on_error: Callable[[T, BaseException], None], window: int | None = None,
             progress: Any = None) -> WindowStats:
    """The one "submit, collect, turn failures into problems" loop: :func:`run_windowed` over
    ``items`` (at most ``window`` in flight; ``None``: no bound), then in this thread, in
    completion order, ``on_result(item, value)`` for each success and ``on_error(item, exc)``
    for each failure, so one failed item never sinks the others. ``submit`` may also return a
    future submitted earlier (``submit=lambda f: f`` collects a list of futures). ``progress``: a
    :class:`tasks.common.progress.Progress` advanced by one per finished item, closed at the end."""
    if window is None:
        items = list(items)
        window = max(1, len(items))

    def on_done(item: T, fut: Any) -> None:
        try:
            value = fut.result()
        except Exception as exc:  # noqa: BLE001 - reported for its item; the others go on
            if is_cancellation(exc):
                raise RunCancelled(str(exc)) from exc
            on_error(item, exc)
        else:
            on_result(item, value)
        if progress is not None:
            progress.advance(1)

    try:
        return run_windowed(submit, items, window, on_done, idle=progress.tick if progress is not None else None)
    finally:
        if progress is not None:
            progress.close()


def in_thread(fn: Callable[..., Any], *args: Any, name: str | None = None) -> concurrent.futures.Future:
    """``fn(*args)`` in a new daemon thread, as a ``concurrent.futures.Future``. The thread runs
    in a copy of the caller's context (``contextvars``), which is how Prefect 3 finds the running
    flow: tasks submitted from it belong to the flow run and use its task runner, and
    ``get_run_logger()`` works. A daemon thread, so a cancelled or interrupted flow does not wait
    for it at exit."""
    fut: concurrent.futures.Future = concurrent.futures.Future()
    ctx = contextvars.copy_context()  # one copy per thread: a context runs in one thread at a time

    def run() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(ctx.run(fn, *args))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
            fut.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut
