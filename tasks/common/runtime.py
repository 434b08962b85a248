"""The public facade of the flows' runtime: each name it offers is owned by one of the modules below
(``_OWNERS``) and loaded from there when first asked for, so ``from tasks.common.runtime import
DaskSettings`` imports pydantic, not Prefect or Dask.

* :mod:`tasks.common.prefect_server`: the Prefect API, the configured one or a local server of
  the run's own, and its health watchdog;
* :mod:`tasks.common.local_run`: ``python -m flows.<name>`` (checks, server, watchdog, the
  libraries' logs in the run folder);
* :mod:`tasks.common.dask_settings`: :class:`DaskSettings`, where a flow's tasks run;
* :mod:`blocks.dask_cluster`: the ``DaskCluster`` block and :func:`load_dask_block`;
* :mod:`tasks.common.task_runner`: the Dask task runner (the one module on prefect-dask internals);
* :mod:`tasks.common.workers`: what the running flow's cluster offers;
* :mod:`tasks.common.dask_env`: the Dask configuration the task runner applies;
* :mod:`tasks.common.signals`: ``import pycolmap`` keeping the process's signal handling.

New code imports from the owner; this module keeps existing imports working.
"""

from __future__ import annotations

import importlib
from typing import Any

_OWNERS = {
    "tasks.common.prefect_server": (
        "PROJECT_ROOT", "DEFAULT_PREFECT_HOME", "PrefectServer", "ApiChoice", "configured_api", "api_answers",
        "configured_api_problem", "local_prefect_server", "EXIT_API_GONE", "API_GRACE_S", "ApiWatchdog",
        "history_hint", "stop_for_lost_api", "_free_port",
    ),
    "tasks.common.local_run": ("run_local", "library_logs_to", "DASK_LOG"),
    "tasks.common.dask_settings": ("DaskSettings", "detect_gpus", "dask_settings_from_env"),
    "blocks.dask_cluster": ("load_dask_block",),
    "tasks.common.task_runner": (
        "make_task_runner", "FlowDaskTaskRunner", "CrashAwareDaskFuture", "quiet_shutdown_tracebacks",
    ),
    "tasks.common.workers": ("flow_dask_client", "worker_count", "gpu_workers", "worker_address",
                             "match_worker_threads"),
    "tasks.common.dask_env": ("DASK_LOG_LENGTH", "bound_dask_logs", "keep_malloc_defaults"),
    "tasks.common.signals": ("import_pycolmap", "keep_signal_handlers", "route_glog"),
}
_OWNER_OF = {name: module for module, names in _OWNERS.items() for name in names}

__all__ = [name for name in _OWNER_OF if not name.startswith("_")]


def __getattr__(name: str) -> Any:
    module = _OWNER_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_OWNER_OF])
