"""Dask settings the flows' local clusters use, in a module light enough for the
benchmarks to import without Prefect. Nothing here runs at import: the task runner
(:func:`tasks.common.task_runner.make_task_runner`) applies them when a flow's runner is made."""

from __future__ import annotations

import os

import dask


def keep_malloc_defaults() -> None:
    """Do not let Dask's nanny set ``MALLOC_TRIM_THRESHOLD_`` in the local workers.

    Setting it switches glibc's dynamic mmap threshold off, so every array above
    128 KiB is mmapped and unmapped again: the dense stage ran 2.2x slower with it
    (8.7 s vs 19.1 s for three images, sys time 0.3 s vs 9.3 s; see
    docs/benchmarks.md). Workers started elsewhere (``address``) keep their own
    settings; ``FACTORY_DASK_MALLOC_TRIM=1`` keeps Dask's default here."""
    if os.environ.get("FACTORY_DASK_MALLOC_TRIM", "0") != "1":
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})


#: Dask keeps its last ``distributed.admin.low-level-log-length`` messages per connection and
#: transitions for debugging (default 1000): every task message with the task's arguments, so
#: a flow of large batches held up to 1000 of them (2.3 MB a task of 250 tiles measured; 730 MB
#: flow process at 100 000 tiles). 50 is kept unless DASK_DISTRIBUTED__ADMIN__LOW_LEVEL_LOG_LENGTH says.
DASK_LOG_LENGTH = 50


def bound_dask_logs() -> None:
    """Keep Dask's low-level logs short in the local scheduler, client and workers (the nanny
    hands its config to the worker processes)."""
    if "DASK_DISTRIBUTED__ADMIN__LOW_LEVEL_LOG_LENGTH" not in os.environ:
        dask.config.set({"distributed.admin.low-level-log-length": DASK_LOG_LENGTH})
