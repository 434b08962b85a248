"""What the benchmarks share: the CPU seconds of this process, and a sampler that runs in a
background thread while a ``with`` block runs (peak memory, CPU of child processes)."""

from __future__ import annotations

import json
import resource
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class BackgroundSampler(ABC):
    """Calls :meth:`sample` every ``period`` seconds in a daemon thread inside ``with``."""

    def __init__(self, period: float) -> None:
        self.period = period
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @abstractmethod
    def sample(self) -> None:
        """One sample (runs in the sampler's thread)."""

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


def patchmatch_demo(root: Path, scene: str, sets: list[str]) -> tuple[Any, Any]:
    """The pipeline configuration with ``dense.cpu_method`` patchmatch and ``--set key=JSON``
    DenseConfig overrides, and the scene's paths in a demo run under ``root`` (which must
    have its dense workspace)."""
    from tasks.aerial import pipeline as PL

    cfg = PL.PIPELINES.build()
    try:  # keys as DenseConfig spells them, a method's with its section: patchmatch.window_radius=4
        cfg.dense = cfg.dense.with_overrides({"cpu_method": "patchmatch",
                                              **{k: json.loads(v) for k, v in (a.split("=", 1) for a in sets)}})
    except TypeError as exc:
        raise SystemExit(f"--set: {exc}") from None
    paths = PL.scene_paths(root, scene, root / "megadepth_processed", cfg)
    if not (paths.dense / "sparse").is_dir():
        raise SystemExit(f"{paths.dense / 'sparse'}: no dense workspace; run the pipeline up to prepare_dense first")
    return cfg, paths
