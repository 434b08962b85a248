"""What the running flow's Dask cluster offers (the one place that asks Dask): its client, its
workers, which of them have GPUs, and this worker's own address and thread count."""

from __future__ import annotations

from typing import Any

from distributed import get_worker
from prefect.context import FlowRunContext


def flow_dask_client():
    """The Dask client of the running flow's task runner, None outside a Dask-run flow."""
    ctx = FlowRunContext.get()
    return getattr(getattr(ctx, "task_runner", None), "client", None) if ctx else None


def _workers() -> dict[str, dict[str, Any]] | None:
    client = flow_dask_client()
    return None if client is None else client.scheduler_info(n_workers=-1)["workers"]


def worker_count() -> int:
    """How many Dask workers the running flow has (1 when it runs on no Dask cluster)."""
    workers = _workers()
    return max(1, len(workers)) if workers is not None else 1


def gpu_workers() -> list[str]:
    """Addresses of the running flow's Dask workers that declare the resource ``GPU`` (none
    when the flow does not run on a Dask task runner)."""
    workers = _workers() or {}
    return sorted(a for a, w in workers.items() if (w.get("resources") or {}).get("GPU", 0) >= 1)


def worker_address() -> str | None:
    """This Dask worker's address (None when not called on a worker)."""
    try:
        return get_worker().address
    except Exception:  # noqa: BLE001 - not on a Dask worker
        return None


def match_worker_threads() -> None:
    """OpenCV's and numba's thread pools as wide as this Dask worker's thread count: with one
    worker process per core, one thread each, so concurrent tasks do not oversubscribe the
    cores. Outside a worker: the defaults stay."""
    try:
        n = max(1, int(get_worker().state.nthreads))
    except Exception:  # noqa: BLE001 - not on a Dask worker: leave the defaults
        return
    # imported here, on a worker of an aerial run, which has loaded both already: the flow process
    # and the multimodal flow, which import this module, do not pay for them (cv2 0.5 s, numba 1.3 s
    # measured with python -X importtime on the shared 2-core machine)
    import cv2
    import numba

    cv2.setNumThreads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
