"""Local runtime shared by every flow: a Prefect API server and the Dask task runner.

Prefect
    If Prefect's settings name an API (``PREFECT_API_URL`` from the environment,
    ``.env``, the active profile of ``prefect config set``, ``prefect.toml``:
    :func:`configured_api`), that server is used as is. Otherwise
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
import json
import logging
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import distributed
from prefect_dask import DaskTaskRunner
from prefect_dask.task_runners import PrefectDaskFuture
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
    source: str = ""  # why this server: where its URL came from, or why the run started its own

    @property
    def own(self) -> bool:
        """True when this run started the server (it stops with the run)."""
        return self.process is not None

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


@dataclass(frozen=True)
class ApiChoice:
    """The Prefect API a run uses: ``url`` (None: none configured, the run starts its own
    server) and ``source``, where Prefect found it, in words."""

    url: str | None
    source: str


def _profile_api_url() -> tuple[str | None, str, str]:
    """(PREFECT_API_URL of the active profile, "profile 'NAME' (PATH)", "profile 'NAME'") as Prefect
    reads them."""
    from prefect.settings import Settings
    from prefect.settings.sources import ProfileSettingsTomlLoader, _get_profiles_path, _read_toml_file

    path = _get_profiles_path()
    name = os.environ.get("PREFECT_PROFILE")
    with contextlib.suppress(Exception):
        name = name or _read_toml_file(path).get("active")
    loader = ProfileSettingsTomlLoader(Settings)
    short = f"profile {name or 'ephemeral'!r}"
    return loader.profile_settings.get("PREFECT_API_URL"), f"{short} ({path})", short


def configured_api() -> ApiChoice:
    """The Prefect API URL exactly as Prefect resolves it now (``prefect.settings.Settings()``:
    environment, ``.env``, the active profile of ``prefect config set``, ``prefect.toml``,
    ``pyproject.toml``), and which of those gave it. Built afresh, not from the settings
    Prefect read at import, so a variable set or removed since counts as Prefect's CLI
    would count it."""
    from prefect.settings import Settings

    url = Settings().api.url
    prof_url, prof, prof_short = _profile_api_url()
    if not url:
        return ApiChoice(None, f"no PREFECT_API_URL in the environment, .env, {prof_short} or prefect.toml")
    url = str(url).rstrip("/")
    same = lambda v: bool(v) and str(v).rstrip("/") == url  # noqa: E731
    if same(os.environ.get("PREFECT_API_URL")):
        return ApiChoice(url, "from the environment variable PREFECT_API_URL")
    with contextlib.suppress(Exception):
        import dotenv

        if Path(".env").is_file() and same(dotenv.dotenv_values(".env").get("PREFECT_API_URL")):
            return ApiChoice(url, f"from {Path('.env').resolve()}")
    if same(prof_url):
        return ApiChoice(url, f"from {prof}")
    return ApiChoice(url, "from Prefect's settings (prefect.toml or pyproject.toml)")


def api_answers(url: str) -> BaseException | None:
    """None when the Prefect API at ``url`` answers its health check (with this process's
    credentials), else the error."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            return client.api_healthcheck()
    except Exception as exc:  # noqa: BLE001 - reported by the caller
        return exc


def configured_api_problem() -> str | None:
    """None when no Prefect API is configured or the configured one answers; else one line
    saying which API does not answer, where its URL comes from, and what to do."""
    choice = configured_api()
    if not choice.url or (err := api_answers(choice.url)) is None:
        return None
    return (f"the Prefect API {choice.url} ({choice.source}) does not answer ({type(err).__name__}: {err}). "
            "Start that server (prefect server start), or unset the URL (prefect config unset PREFECT_API_URL) "
            "to let the run start its own.")


@contextlib.contextmanager
def local_prefect_server(
    home: str | os.PathLike | None = None,
    port: int | None = None,
    start_timeout: float | None = None,
) -> Iterator[PrefectServer]:
    """Use the Prefect API configured in Prefect's settings (:func:`configured_api`), else run a
    loopback Prefect server for the block.

    Sets ``PREFECT_API_URL`` (and, for its own server, ``PREFECT_HOME``) in ``os.environ`` for
    the duration so that this process and every process it starts (Dask workers) talk to the
    same server; restores the environment and stops its own server on exit, including on
    KeyboardInterrupt and SIGTERM. ``start_timeout``: seconds to wait for the server to answer
    (default ``FACTORY_PREFECT_START_TIMEOUT`` or 300: a busy machine is slow).
    """
    start_timeout = start_timeout or float(os.environ.get("FACTORY_PREFECT_START_TIMEOUT") or 300)
    choice = configured_api()
    if choice.url:
        url = choice.url
        old = _apply_env({**_QUIET_ENV, "PREFECT_API_URL": url})
        try:
            with _prefect_settings(url, os.environ.get("PREFECT_HOME")):
                yield PrefectServer(url=url, process=None,
                                    home=Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser(),
                                    log_path=None, source=choice.source)
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
                yield PrefectServer(url=url, process=proc, home=home_path, log_path=log_path,
                                    source=f"own local server, history in {home_path}: {choice.source}")
    finally:
        _drain_prefect_queues()
        _stop_process_group(proc)
        _restore_env(old)
        with contextlib.suppress(OSError):
            if log_path.stat().st_size == 0:
                log_path.unlink()


#: The CLI's exit status when the Prefect API stopped answering during the run.
EXIT_API_GONE = 4
#: Seconds of unanswered health checks after which a CLI run stops (``FACTORY_API_GRACE_S``). A
#: busy local server answered /health within 2 s in every run measured; a server restart takes ~10 s.
API_GRACE_S = 45.0


class ApiWatchdog:
    """Asks the Prefect API at ``url`` for its health every ``interval`` seconds (each check
    waits at most ``interval`` seconds, no retries); once it has not answered for ``grace``
    seconds, calls ``on_gone(seconds)`` once, from its own thread.

    Without it, a run whose server died keeps going to its end (every API call retried for about a
    minute) and then exits after about 5 minutes, its flow run left RUNNING."""

    def __init__(self, url: str, on_gone: Callable[[float], None], grace: float | None = None,
                 interval: float = 5.0, probe: Callable[[], bool] | None = None):
        import threading

        self.url, self.on_gone = url, on_gone
        self.grace = float(grace if grace is not None else os.environ.get("FACTORY_API_GRACE_S") or API_GRACE_S)
        self.interval = interval
        self.probe = probe or (lambda: _api_healthy_now(url, timeout=interval))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefect-api-watchdog", daemon=True)
        self.fired = False

    def _run(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.interval):
            ok = False
            with contextlib.suppress(Exception):
                ok = bool(self.probe())
            now = time.monotonic()
            if ok:
                last_ok = now
            elif now - last_ok >= self.grace and not self._stop.is_set():
                self.fired = True
                self.on_gone(now - last_ok)
                return

    def __enter__(self) -> "ApiWatchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)


def _api_healthy_now(url: str, timeout: float) -> bool:
    """One health check of ``url`` with this process's credentials, no retries, at most ``timeout`` s."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_REQUEST_TIMEOUT, PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, \
        temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_API_REQUEST_TIMEOUT: timeout,
                                     PREFECT_CLIENT_MAX_RETRIES: 0}), get_client(sync_client=True) as client:
        return client.api_healthcheck() is None


def _stop_for_lost_api(url: str, seconds: float) -> None:
    """The watchdog's verdict in a CLI run: say so, note it in the run locks, stop this process's
    children (Dask workers, the local server) and exit ``EXIT_API_GONE`` at once: every way out
    through Prefect would retry the dead API for minutes. The next run on the same folder marks
    this flow run Crashed (the lock's record stays)."""
    from tasks.common import runlock

    msg = (f"the Prefect API {url} has not answered for {seconds:.0f} s (the limit: FACTORY_API_GRACE_S, "
           f"default {API_GRACE_S:.0f} s): its server stopped? This run stops now (exit {EXIT_API_GONE}); the next "
           "run on the same folder marks it Crashed and resumes from what it completed.")
    with contextlib.suppress(Exception):
        print(f"\nerror: {msg}", file=sys.stderr, flush=True)
    with contextlib.suppress(Exception):
        runlock.note_held(stopped=f"the Prefect API {url} stopped answering; the run stopped itself after {seconds:.0f} s")
    with contextlib.suppress(Exception):
        import psutil

        children = psutil.Process().children(recursive=True)
        for c in children:
            with contextlib.suppress(psutil.Error):
                c.terminate()
        _, alive = psutil.wait_procs(children, timeout=5)
        for c in alive:
            with contextlib.suppress(psutil.Error):
                c.kill()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(EXIT_API_GONE)


def history_hint(server: PrefectServer) -> str:
    """How to see this run again in the Prefect UI, for the end of a CLI run."""
    if not server.own:
        return f"Prefect UI: {server.ui_url} (this run is in its history there)."
    return (f"The 'View at {server.ui_url}/...' links above died with this run's own Prefect server. Its history is "
            f"kept in {server.home}; to browse it:\n  PREFECT_HOME={server.home} prefect server start   "
            f"# then open http://127.0.0.1:4200")


def run_local(argv: list[str] | None, parse_args: Callable[[list[str] | None], Any],
              flow: Callable[..., dict[str, Any]], finish: Callable[[dict[str, Any]], int],
              folder_of: Callable[[Any], Any] | None = None) -> int:
    """The ``python -m flows.<name>`` entry point both flows share: every setting and input
    checked before any server or cluster starts (exit ``EXIT_CONFIG`` with one message), the
    flow run against the Prefect API of Prefect's settings or its own local server (first line:
    which and why; exit ``EXIT_CONFIG`` when a configured API does not answer, ``EXIT_BUSY`` if
    another run holds the output, ``EXIT_API_GONE`` when the API stops answering for
    ``API_GRACE_S``), then ``finish(result)`` prints the outcome and gives the exit code, and
    the last lines say how to see the run in the UI again. ``folder_of(config)``: the run's output
    folder, where the libraries' chatter goes (``logs/``, :func:`library_logs_to`)."""
    from tasks.common.cli import EXIT_CONFIG, ConfigError
    from tasks.common.runlock import EXIT_BUSY, OutputBusy

    try:
        config = parse_args(argv)
        config.check_inputs()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if (why := configured_api_problem()) is not None:
        print(f"error: {why}", file=sys.stderr)
        return EXIT_CONFIG
    with local_prefect_server() as server:
        print(f"Prefect API: {server.url} ({server.source})  UI: {server.ui_url}", flush=True)
        try:
            with ApiWatchdog(server.url, on_gone=lambda s: _stop_for_lost_api(server.url, s)), \
                    library_logs_to(folder_of(config) if folder_of else None) as log_dir:
                result = flow(config=config)
        except OutputBusy as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BUSY
    code = finish(result)
    if log_dir is not None:
        print(f"Library logs (COLMAP, Dask): {log_dir}", flush=True)
    print(history_hint(server), flush=True)
    return code


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


# keep_signal_handlers / import_pycolmap live in tasks/common/signals.py (importable without Prefect or
# Dask: the dense stage's library path, bench/gpu_check.sh); re-exported here
from tasks.common.signals import import_pycolmap, keep_signal_handlers, route_glog  # noqa: E402,F401
from tasks.common.dask_env import DASK_LOG_LENGTH, bound_dask_logs, keep_malloc_defaults  # noqa: E402,F401


class _WarningsToRoot(logging.Handler):
    """Hands warnings and errors to the root logger's handlers (Prefect's console), nothing else."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        for h in logging.getLogger().handlers:
            if record.levelno >= h.level:
                h.handle(record)


class _ToFile(logging.Handler):
    """INFO and above into a file. Not a ``StreamHandler``: a ``LocalCluster`` (``silence_logs``)
    raises every StreamHandler of the ``distributed`` logger to WARNING, a FileHandler included."""

    def __init__(self, path: Path) -> None:
        super().__init__(level=logging.INFO)
        self._file = logging.FileHandler(path, encoding="utf-8")
        self._file.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self._file.emit(record)

    def close(self) -> None:
        self._file.close()
        super().close()


#: Dask's log file of a CLI run, under its output folder's ``logs/``.
DASK_LOG = "dask.log"


@contextlib.contextmanager
def library_logs_to(folder: str | os.PathLike | None) -> Iterator[Path | None]:
    """For the block, the libraries' chatter goes to ``FOLDER/logs/`` instead of the terminal: COLMAP's
    glog (every process that imports pycolmap after this, and this one: ``colmap.log.*``) and the
    ``distributed`` INFO records of this process (scheduler, nannies: ``dask.log``); Dask worker
    processes keep only warnings. Warnings and errors stay on the terminal. Yields the folder (None
    when it cannot be made: nothing is moved)."""
    if folder is None:
        yield None
        return
    log_dir = Path(folder) / "logs"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        yield None
        return
    old = _apply_env({"FACTORY_LIBRARY_LOG_DIR": str(log_dir), "DASK_LOGGING__DISTRIBUTED": "warning"})
    dist = logging.getLogger("distributed")
    to_file = _ToFile(log_dir / DASK_LOG)
    terminal = [(h, h.level) for h in dist.handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    for h, level in terminal:
        h.setLevel(max(level, logging.WARNING))
    propagate = dist.propagate
    forward = _WarningsToRoot()
    if propagate:  # with Prefect imported first, Dask's records reach the terminal through the root logger
        dist.propagate = False
        dist.addHandler(forward)
    dist.addHandler(to_file)
    if "pycolmap" in sys.modules:
        route_glog(sys.modules["pycolmap"], str(log_dir))
    try:
        yield log_dir
    finally:
        dist.removeHandler(to_file)
        dist.removeHandler(forward)
        dist.propagate = propagate
        to_file.close()
        for h, level in terminal:
            h.setLevel(level)
        _restore_env(old)


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


class DaskSettings(BaseModel):
    """Where a flow's tasks run: the one Dask configuration of the project.

    Used by both flow configurations (field ``dask``), the ``DaskCluster``
    block and the CLI (``--set dask.n_workers=2``).

    * ``address``: connect to an existing scheduler (``tcp://host:8786``).
    * ``cluster_class`` (+ ``cluster_kwargs``, ``adapt_kwargs``): any Dask
      cluster class by import path, e.g. ``dask_jobqueue.SLURMCluster`` or
      ``dask_kubernetes.operator.KubeCluster``; the kwargs go to it unchanged.
    * neither: a ``LocalCluster`` sized to this machine: ``n_workers``
      processes (default: CPU count) with ``threads_per_worker`` threads,
      listening on 127.0.0.1 only, its dashboard on ``dashboard_address``.
    ``gpus_per_worker``: Dask ``GPU`` resource per local worker; ``None``
    detects (the machine's GPUs spread over the workers).
    """

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="existing Dask scheduler, e.g. tcp://host:8786")
    cluster_class: str | None = Field(None, description="cluster class import path, e.g. dask_jobqueue.SLURMCluster")
    cluster_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of cluster_class "
                                           "(or extra LocalCluster arguments)")
    adapt_kwargs: dict[str, Any] | None = Field(None, description="cluster.adapt() arguments, e.g. minimum, maximum")
    n_workers: int | None = Field(None, ge=1, description="local workers (default: CPU count)")
    threads_per_worker: int = Field(1, ge=1, description="threads per local worker")
    memory_limit: str | None = Field(None, description="memory limit per local worker, e.g. 4GB")
    gpus_per_worker: int | None = Field(None, ge=0, description="Dask GPU resource per local worker (default: detect)")
    dashboard_address: str | None = Field("127.0.0.1:0", description="local dashboard (host:port, port 0 = a free "
                                          "one); empty = no dashboard. Loopback unless you choose otherwise")

    @field_validator("dashboard_address")
    @classmethod
    def _dashboard(cls, v: str | None) -> str | None:
        return v or None

    @model_validator(mode="after")
    def _one_way(self) -> "DaskSettings":
        if self.address and self.cluster_class:
            raise ValueError("dask.address and dask.cluster_class exclude each other: give one")
        if self.address and not re.match(r"^[a-z0-9+]+://", self.address):
            raise ValueError(f"dask.address {self.address!r} needs a protocol, e.g. tcp://host:8786")
        if self.cluster_class:
            module, _, name = self.cluster_class.rpartition(".")
            if not module or not name:
                raise ValueError(f"dask.cluster_class {self.cluster_class!r} must be an import path "
                                 "such as dask_jobqueue.SLURMCluster")
        return self

    def describe(self) -> str:
        if self.address:
            return f"existing Dask scheduler {self.address}"
        if self.cluster_class:
            return f"{self.cluster_class}({json.dumps(self.cluster_kwargs, default=str)})"
        kw = self.local_cluster_kwargs()
        return (f"LocalCluster: {kw['n_workers']} worker(s) x {kw['threads_per_worker']} thread(s)"
                f"{', GPU ' + str(kw['resources']['GPU']) + ' per worker' if kw['resources'] else ''}")

    def local_cluster_kwargs(self) -> dict[str, Any]:
        n = self.n_workers or max(1, os.cpu_count() or 1)
        kwargs: dict[str, Any] = {
            "n_workers": n,
            "threads_per_worker": self.threads_per_worker,
            "processes": True,
            "host": "127.0.0.1",  # scheduler, workers and nannies on loopback only
            # the scheduler's HTTP server (health, metrics; the dashboard unless off) on a free loopback port
            "dashboard_address": self.dashboard_address or "127.0.0.1:0",
        }
        if not self.dashboard_address or importlib.util.find_spec("bokeh") is None:
            # off, or impossible without bokeh: then the scheduler is not asked for it at all (asking
            # makes it try `import distributed.dashboard.scheduler`, which without bokeh failed
            # once in a fresh-clone run with "module 'distributed.dashboard' has no attribute
            # 'scheduler'" and took the cluster down); its HTTP server keeps health and metrics
            kwargs["scheduler_kwargs"] = {"dashboard": False}
        if self.memory_limit:
            kwargs["memory_limit"] = self.memory_limit
        gpus = self.gpus_per_worker
        if gpus is None:
            total = detect_gpus()
            gpus = max(1, total // n) if total else 0
        kwargs["resources"] = {"GPU": gpus} if gpus else {}
        kwargs.update(self.cluster_kwargs)
        return kwargs

    def runner_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``prefect_dask.DaskTaskRunner`` for these settings."""
        if self.address:
            return {"address": self.address}
        if self.cluster_class:
            return {"cluster_class": self.cluster_class, "cluster_kwargs": dict(self.cluster_kwargs),
                    "adapt_kwargs": dict(self.adapt_kwargs or {})}
        return {"cluster_class": "distributed.LocalCluster", "cluster_kwargs": self.local_cluster_kwargs(),
                "adapt_kwargs": dict(self.adapt_kwargs or {})}


def load_dask_block(name: str) -> DaskSettings:
    """The settings saved in the ``DaskCluster`` block ``name`` (needs the Prefect API)."""
    from blocks.dask_cluster import DaskCluster

    try:
        return DaskCluster.load(name).to_settings()
    except ValueError as exc:
        raise ValueError(f"dask_block {name!r}: no DaskCluster block of that name ({exc}); save one "
                         f"(see blocks/dask_cluster.py) or remove dask_block to use the dask settings") from exc


def dask_settings_from_env() -> DaskSettings:
    """Settings for a runner with nothing else to go on: ``FACTORY_DASK_ADDRESS``,
    ``FACTORY_DASK_CLUSTER_CLASS`` and ``FACTORY_DASK_CLUSTER_KWARGS`` (JSON), else a local cluster."""
    return DaskSettings(
        address=os.environ.get("FACTORY_DASK_ADDRESS") or None,
        cluster_class=os.environ.get("FACTORY_DASK_CLUSTER_CLASS") or None,
        cluster_kwargs=json.loads(os.environ.get("FACTORY_DASK_CLUSTER_KWARGS") or "{}"),
    )


class _DropClosedCommTracebacks(logging.Filter):
    """Drops ``distributed.batched``'s "Batched Comm Closed" record: an INFO message with a full
    traceback that a connection closing at cluster shutdown can print (a known race, e.g.
    dask/distributed#9032; the run's result is not affected). Its other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Batched Comm Closed")


class _SayCancelledNotRunning(logging.Filter):
    """Prefect's engine logs ``Finished in state Running()`` when a runner (``serve``, a worker)
    cancels the run: the runner, not the engine, records the Cancelled state, so the engine's own
    copy is still Running. The record says what happened instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Finished in state Running()" and not record.args:
            record.msg = "Finished: cancelled (the runner that started this run records it as Cancelled)"
        return True


def quiet_shutdown_tracebacks() -> None:
    """Install :class:`_DropClosedCommTracebacks` once on ``distributed.batched`` in the flow's
    process (where a local cluster's scheduler runs and where the traceback was printed)."""
    logger = logging.getLogger("distributed.batched")
    if not any(isinstance(f, _DropClosedCommTracebacks) for f in logger.filters):
        logger.addFilter(_DropClosedCommTracebacks())
    flow_runs = logging.getLogger("prefect.flow_runs")
    if not any(isinstance(f, _SayCancelledNotRunning) for f in flow_runs.filters):
        flow_runs.addFilter(_SayCancelledNotRunning())


def make_task_runner(settings: DaskSettings | None = None,
                     settings_from: Callable[[dict[str, Any]], DaskSettings] | None = None):
    """The ``DaskTaskRunner`` every flow uses.

    ``settings``: a fixed cluster (tests, benchmarks). ``settings_from``: a
    function of the flow run's parameters, called when the run submits its
    first task, so a run started by a deployment, a schedule or the UI uses the
    ``dask``/``dask_block`` of its own parameters exactly as a local run does.
    Neither: :func:`dask_settings_from_env`.
    """
    keep_malloc_defaults()
    bound_dask_logs()
    quiet_shutdown_tracebacks()
    return FlowDaskTaskRunner(settings=settings, settings_from=settings_from)


def _flow_run_parameters() -> dict[str, Any]:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return dict(ctx.parameters or {}) if ctx is not None else {}


def _mark_task_run_crashed(task_run_id, exc: BaseException) -> None:
    """Give a task run whose Dask task died with its worker(s) a final state (PrefectHQ/prefect#21638:
    without it the run stays RUNNING forever)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Crashed

    from prefect.exceptions import ObjectNotFound

    from tasks.common.window import is_cancellation

    cancelled = is_cancellation(exc)  # the run is being cancelled: its work is Cancelled, not Crashed
    msg = (f"cancelled with its flow run: {exc}" if cancelled else
           f"the Dask task was lost with its worker: {type(exc).__name__}: {exc}")
    try:
        with get_client(sync_client=True) as client:
            run = None
            for _ in range(20):  # the run's own events may still be on their way to the server
                try:
                    run = client.read_task_run(task_run_id)
                    break
                except ObjectNotFound:
                    time.sleep(0.5)
            if run is None:
                return  # never recorded: nothing is left RUNNING
            if run.state is None or not run.state.is_final():
                state = Cancelled(message=msg[:2000]) if cancelled else Crashed(message=msg[:2000])
                client.set_task_run_state(task_run_id, state, force=True)
    except Exception as api_exc:  # noqa: BLE001 - reporting must not hide the original error
        log.warning("could not mark task run %s crashed: %s", task_run_id, api_exc)


def _settle_task_runs(seen: dict[Any, tuple[bool, str | None] | None], flow_run_id=None) -> None:
    """After the cluster is closed, no task run of this flow run may stay RUNNING or PENDING.

    When a Dask worker dies, Dask reruns the tasks it held, including ones that had completed
    (their results lived in that worker's memory); the flow has their results already and drops
    the rerun, whose task run then stays RUNNING forever (PrefectHQ/prefect#21638). Such a run
    gets the final state the flow received; one the flow never received is marked Crashed.
    ``seen``: task run id -> (completed?, message) of the final state the flow received, None if
    it received none; when the flow run (``flow_run_id``) is being cancelled, Cancelled."""
    if not seen:
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId
    from prefect.states import Cancelled, Completed, Crashed

    try:
        with get_client(sync_client=True) as client:
            cancelling = False
            if flow_run_id is not None:
                flow_state = client.read_flow_run(flow_run_id).state
                cancelling = flow_state is not None and flow_state.type.value in ("CANCELLING", "CANCELLED")
            ids = list(seen)
            for i in range(0, len(ids), 200):
                runs = client.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=ids[i:i + 200])))
                for run in runs:
                    if run.state is not None and run.state.is_final():
                        continue
                    got = seen[run.id]
                    if got is not None and got[0]:
                        new = Completed(message="completed; a rerun Dask started after a worker died was dropped")
                    elif cancelling:
                        new = Cancelled(message="cancelled with its flow run")
                    else:
                        why = got[1] if got is not None else "the flow ended before this task finished"
                        new = Crashed(message=f"left unfinished by Dask: {why}"[:2000])
                    client.set_task_run_state(run.id, new, force=True)
                    log.warning("task run %s (%s) was left %s; set to %s", run.id, run.name, run.state.name, new.name)
    except Exception as exc:  # noqa: BLE001 - bookkeeping must not hide the flow's own outcome
        log.warning("could not check this run's task runs: %s", exc)


class CrashAwareDaskFuture(PrefectDaskFuture):
    """A ``PrefectDaskFuture`` whose Dask-level failure (``KilledWorker``: every worker that tried the
    task died) marks its task run ``Crashed`` before the error reaches the flow. Its final state's
    outcome (completed?, message) goes into ``seen``, the runner's record for
    :func:`_settle_task_runs`: the runner holds no future, so Dask forgets a task (its arguments,
    its result) as soon as the flow drops the future."""

    def __init__(self, wrapped_future, task_run_id, seen: dict | None = None):
        super().__init__(wrapped_future=wrapped_future, task_run_id=task_run_id)
        self._seen = seen

    def _record(self, state) -> None:
        self._final_state = state
        if self._seen is not None:
            self._seen[self.task_run_id] = (state.is_completed(), state.message)

    def _dask_result(self, timeout):
        try:
            return self._wrapped_future.result(timeout=timeout)
        except distributed.TimeoutError:
            raise
        except Exception as exc:  # the task engine returns states, so this is the infrastructure failing
            _mark_task_run_crashed(self.task_run_id, exc)
            raise

    def wait(self, timeout: float | None = None) -> None:
        try:
            result = self._dask_result(timeout)
        except Exception:  # noqa: BLE001 - as the base class: failed or timed out
            return
        from prefect.states import State

        if isinstance(result, State):
            self._record(result)

    def result(self, timeout: float | None = None, raise_on_failure: bool = True):
        if not self._final_state:
            from prefect.states import State

            try:
                res = self._dask_result(timeout)
            except distributed.TimeoutError as exc:
                raise TimeoutError(f"Task run {self.task_run_id} did not complete within {timeout} seconds") from exc
            if not isinstance(res, State):
                return res
            self._record(res)
        return self._final_state.result(raise_on_failure=raise_on_failure, _sync=True)


class FlowDaskTaskRunner(DaskTaskRunner):
    """A ``DaskTaskRunner`` that picks its cluster when the flow run first needs it."""

    def __init__(self, settings: DaskSettings | None = None,
                 settings_from: Callable[[dict[str, Any]], DaskSettings] | None = None, **_: Any):
        self.settings_from = settings_from
        self.settings: DaskSettings | None = None
        super().__init__()
        if settings is not None:
            self._use(settings)

    def _use(self, settings: DaskSettings) -> None:
        kw = settings.runner_kwargs()
        self.settings = settings
        self.address = kw.get("address")
        self.cluster_class = kw.get("cluster_class")
        self.resolved_cluster_class = None
        if self.cluster_class:
            from prefect.utilities.importtools import from_qualified_name

            self.resolved_cluster_class = from_qualified_name(self.cluster_class)
        self.cluster_kwargs = dict(kw.get("cluster_kwargs") or {})
        self.adapt_kwargs = dict(kw.get("adapt_kwargs") or {})

    @property
    def client(self):
        if self._client is None:
            if self.settings is None:
                params = _flow_run_parameters()
                settings = self.settings_from(params) if self.settings_from else dask_settings_from_env()
                self._use(settings)
            first = True
        else:
            first = False
        client = DaskTaskRunner.client.fget(self)
        if first:
            info = client.scheduler_info(n_workers=-1)
            link = client.dashboard_link if self.settings.dashboard_address or self.address else None
            n = len(info.get("workers", {}))
            msg = f"Dask: {self.settings.describe()}; {n} worker(s) connected; dashboard: {link or 'off'}"
            log.info(msg)
            with contextlib.suppress(Exception):
                from prefect import get_run_logger

                get_run_logger().info(msg)
        return client

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        fut = super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)
        if self._flow_run_id is None:
            from prefect.context import FlowRunContext

            ctx = FlowRunContext.get()
            self._flow_run_id = getattr(getattr(ctx, "flow_run", None), "id", None)
        self._seen[fut.task_run_id] = None  # ~0.2 KB a task run, not the future (nor its arguments)
        return CrashAwareDaskFuture(wrapped_future=fut.wrapped_future, task_run_id=fut.task_run_id, seen=self._seen)

    def __enter__(self):
        self._seen: dict[Any, tuple[bool, str | None] | None] = {}
        self._flow_run_id = None  # set at the first submit, from the flow run's context
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        try:
            super().__exit__(*args)
        finally:
            _settle_task_runs(getattr(self, "_seen", {}), getattr(self, "_flow_run_id", None))

    def duplicate(self):
        return type(self)(settings=self.settings, settings_from=self.settings_from)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, FlowDaskTaskRunner) and self.settings == other.settings
                and self.settings_from == other.settings_from)

    __hash__ = object.__hash__


# --------------------------------------------------------------------------
# what the running flow's cluster offers (the one place that asks Dask)
# --------------------------------------------------------------------------
def flow_dask_client():
    """The Dask client of the running flow's task runner, None outside a Dask-run flow."""
    from prefect.context import FlowRunContext

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
        from distributed import get_worker

        return get_worker().address
    except Exception:  # noqa: BLE001 - not on a Dask worker
        return None


def match_worker_threads() -> None:
    """OpenCV's and numba's thread pools as wide as this Dask worker's thread count: with one
    worker process per core, one thread each, so concurrent tasks do not oversubscribe the
    cores. Outside a worker: the defaults stay."""
    try:
        import cv2
        from distributed import get_worker

        n = max(1, int(get_worker().state.nthreads))
    except Exception:  # noqa: BLE001 - not on a Dask worker: leave the defaults
        return
    cv2.setNumThreads(n)
    import numba

    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
