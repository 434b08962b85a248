"""Bounded windows of submitted tasks: at most ``window`` futures exist at any time.

A flow that submits every task up front holds one future (and its task run's
state and result) per task for the whole run, so its memory grows with the
work. :func:`run_windowed` submits from an iterator, keeps at most ``window``
futures in flight, hands each finished one to a callback in completion order
and drops it, so memory is flat however many items there are.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class WindowStats:
    submitted: int = 0
    max_in_flight: int = 0  # the most futures held at once (<= window)


def run_windowed(submit: Callable[[T], Any], items: Iterable[T], window: int,
                 on_done: Callable[[T, Any], None]) -> WindowStats:
    """Submit ``submit(item)`` for every item with at most ``window`` in flight; call
    ``on_done(item, future)`` (in this thread) as each finishes. ``submit`` may return
    any future with ``add_done_callback`` (Prefect, Dask, concurrent.futures)."""
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
                continue
        item, fut = in_flight.pop(k)
        on_done(item, fut)
        del item, fut
