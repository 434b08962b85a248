"""What the benchmarks share: the CPU seconds of this process, and a sampler that runs in a
background thread while a ``with`` block runs (peak memory, CPU of child processes)."""

from __future__ import annotations

import resource
import threading


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class BackgroundSampler:
    """Calls :meth:`sample` every ``period`` seconds in a daemon thread inside ``with``."""

    def __init__(self, period: float) -> None:
        self.period = period
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
