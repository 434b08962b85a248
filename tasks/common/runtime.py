"""Local runtime shared by every flow: a Prefect API server and the Dask task runner.

Prefect
    If ``PREFECT_API_URL`` is set, that server is used as is. Otherwise
    :func:`local_prefect_server` starts ``prefect server start`` on loopback
    with SQLite under a project-local ``PREFECT_HOME`` (``.prefect/`` by
    default), so that Dask worker processes can reach the same API (Prefect's
    ephemeral mode makes each worker start its own temporary server, which
    fails). The server runs in its own process group and is stopped on exit,
    on Ctrl-C and on SIGTERM; Linux's parent-death signal covers a parent
    killed with SIGKILL. Analytics are off (no network).

Dask
    :func:`make_task_runner` is the one factory for the task runner: a
    ``LocalCluster`` sized to the machine (default), an existing scheduler
    (``address``), or any cluster class with kwargs (``cluster_class``, e.g.
    ``dask_jobqueue.SLURMCluster``), so SLURM or Kubernetes clusters plug in
    without code changes. Workers carry Dask resources; ``GPU`` is declared on
    workers that have GPUs.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PREFECT_HOME = PROJECT_ROOT / ".prefect"

# Settings every process of a local run gets (the flow process, the server, the
# Dask workers). Analytics off: this machine has no network.
_QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class PrefectServer:
    url: str
    process: subprocess.Popen | None
    home: Path
    log_path: Path | None

    @property
    def ui_url(self) -> str:
        return self.url[: -len("/api")] if self.url.endswith("/api") else self.url


def _apply_env(env: dict[str, str]) -> dict[str, str | None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def _restore_env(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _stop_process_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    # anything the server left in its group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so cleanup runs (main thread only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def local_prefect_server(
    home: str | os.PathLike | None = None,
    port: int | None = None,
    start_timeout: float = 120.0,
) -> Iterator[PrefectServer]:
    """Use ``PREFECT_API_URL`` if set, else run a loopback Prefect server for the block.

    Sets ``PREFECT_API_URL`` (and ``PREFECT_HOME``) in ``os.environ`` for the
    duration so that this process and every process it starts (Dask workers)
    talk to the same server; restores the environment and stops the server on
    exit, including on KeyboardInterrupt and SIGTERM.
    """
    url = os.environ.get("PREFECT_API_URL")
    if url:
        old = _apply_env(dict(_QUIET_ENV))
        try:
            with _prefect_settings(url, os.environ.get("PREFECT_HOME")):
                yield PrefectServer(url=url.rstrip("/"), process=None,
                                    home=Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser(),
                                    log_path=None)
        finally:
            _restore_env(old)
        return

    home_path = Path(home or os.environ.get("FACTORY_PREFECT_HOME") or DEFAULT_PREFECT_HOME).resolve()
    home_path.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = dict(_QUIET_ENV)
    env.update(
        PREFECT_HOME=str(home_path),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home_path / 'prefect.db'}",
        PREFECT_LOGGING_TO_API_BATCH_INTERVAL="0.5",
    )
    server_env = dict(os.environ, **env)
    server_env.pop("PREFECT_API_URL", None)
    # The UI asks /ui-settings where its API is; without this it answers port 4200
    # whatever port the server listens on ("Can't connect to Server API").
    server_env["PREFECT_UI_API_URL"] = url
    log_path = home_path / f"server-{port}.log"
    log.info("starting local Prefect server at %s (home %s)", url, home_path)
    with open(log_path, "wb") as log_fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env, stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_set_pdeathsig,
        )
    old = _apply_env({**env, "PREFECT_API_URL": url})
    try:
        with _sigterm_as_interrupt():
            deadline = time.monotonic() + start_timeout
            while not _healthy(url):
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"Prefect server exited with code {proc.returncode}; log {log_path}:\n{tail}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Prefect server did not answer at {url} within {start_timeout:.0f}s; see {log_path}")
                time.sleep(0.25)
            with _prefect_settings(url, str(home_path)):
                yield PrefectServer(url=url, process=proc, home=home_path, log_path=log_path)
    finally:
        _drain_prefect_queues()
        _stop_process_group(proc)
        _restore_env(old)
        with contextlib.suppress(OSError):
            if log_path.stat().st_size == 0:
                log_path.unlink()


def _drain_prefect_queues(timeout: float = 10.0) -> None:
    """Send queued logs and events while the server is still up; otherwise their
    workers retry against a dead server at interpreter exit."""
    with contextlib.suppress(Exception):
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=timeout)
    with contextlib.suppress(Exception):
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=timeout)


@contextlib.contextmanager
def _prefect_settings(url: str, home: str | None) -> Iterator[None]:
    """Point the already-imported Prefect settings of this process at ``url``."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield


# --------------------------------------------------------------------------
# Dask
# --------------------------------------------------------------------------
def detect_gpus() -> int:
    """Number of GPUs visible to this machine (CUDA_VISIBLE_DEVICES, else nvidia-smi)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        return len(ids)
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


@dataclass
class DaskConfig:
    """How to get a Dask cluster.

    * ``address``: connect to an existing scheduler (``tcp://host:8786``).
    * ``cluster_class`` (+ ``cluster_kwargs``, ``adapt_kwargs``): any Dask
      cluster class by import path, e.g. ``dask_jobqueue.SLURMCluster``.
    * neither: a ``LocalCluster`` sized to this machine: ``n_workers``
      processes (default: CPU count) with ``threads_per_worker`` threads.
    ``gpus_per_worker``: Dask ``GPU`` resource per worker; ``None`` detects
    (local: the machine's GPUs spread over workers).
    """

    address: str | None = None
    cluster_class: str | None = None
    cluster_kwargs: dict[str, Any] = field(default_factory=dict)
    adapt_kwargs: dict[str, Any] | None = None
    n_workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str | None = None
    gpus_per_worker: int | None = None

    def local_cluster_kwargs(self) -> dict[str, Any]:
        n = self.n_workers or max(1, os.cpu_count() or 1)
        kwargs: dict[str, Any] = {
            "n_workers": n,
            "threads_per_worker": self.threads_per_worker,
            "processes": True,
            "dashboard_address": ":0",  # a free port: several clusters may run at once
        }
        if self.memory_limit:
            kwargs["memory_limit"] = self.memory_limit
        gpus = self.gpus_per_worker
        if gpus is None:
            total = detect_gpus()
            gpus = max(1, total // n) if total else 0
        kwargs["resources"] = {"GPU": gpus} if gpus else {}
        kwargs.update(self.cluster_kwargs)
        return kwargs


def dask_config_from_env() -> DaskConfig:
    """Defaults for flows started by a deployment: ``FACTORY_DASK_ADDRESS``,
    ``FACTORY_DASK_CLUSTER_CLASS`` and ``FACTORY_DASK_CLUSTER_KWARGS`` (JSON)."""
    import json

    return DaskConfig(
        address=os.environ.get("FACTORY_DASK_ADDRESS") or None,
        cluster_class=os.environ.get("FACTORY_DASK_CLUSTER_CLASS") or None,
        cluster_kwargs=json.loads(os.environ.get("FACTORY_DASK_CLUSTER_KWARGS") or "{}"),
    )


def keep_malloc_defaults() -> None:
    """Do not let Dask's nanny set ``MALLOC_TRIM_THRESHOLD_`` in the local workers.

    Setting it switches glibc's dynamic mmap threshold off, so every array above
    128 KiB is mmapped and unmapped again: the dense stage ran 2.2x slower with it
    (8.7 s vs 19.1 s for three images, sys time 0.3 s vs 9.3 s; see
    docs/benchmarks.md). Workers started elsewhere (``address``) keep their own
    settings; ``FACTORY_DASK_MALLOC_TRIM=1`` keeps Dask's default here."""
    import dask

    if os.environ.get("FACTORY_DASK_MALLOC_TRIM", "0") != "1":
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})


def make_task_runner(cfg: DaskConfig | None = None):
    """Build the ``DaskTaskRunner`` every flow uses (``cfg`` None: from the environment)."""
    from prefect_dask import DaskTaskRunner

    keep_malloc_defaults()
    cfg = cfg or dask_config_from_env()
    if cfg.address:
        return DaskTaskRunner(address=cfg.address)
    if cfg.cluster_class:
        kwargs: dict[str, Any] = {"cluster_class": cfg.cluster_class, "cluster_kwargs": dict(cfg.cluster_kwargs)}
        if cfg.adapt_kwargs:
            kwargs["adapt_kwargs"] = cfg.adapt_kwargs
        return DaskTaskRunner(**kwargs)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cfg.local_cluster_kwargs())
