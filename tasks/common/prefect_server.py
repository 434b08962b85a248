"""The Prefect API a run talks to: the one configured in Prefect's settings, or a local server of its own.

If Prefect's settings name an API (``PREFECT_API_URL`` from the environment, ``.env``, the
active profile of ``prefect config set``, ``prefect.toml``: :func:`configured_api`), that
server is used as is. Otherwise :func:`local_prefect_server` starts ``prefect server start``
on loopback with SQLite under a project-local ``PREFECT_HOME`` (``.prefect/`` by default), so
that Dask worker processes can reach the same API (Prefect's ephemeral mode makes each worker
start its own temporary server, which fails). The server runs in its own process group and is
stopped on exit, on Ctrl-C and on SIGTERM; Linux's parent-death signal covers a parent killed
with SIGKILL. Analytics are off (no network).

:class:`ApiWatchdog` stops a CLI run whose API stopped answering (exit :data:`EXIT_API_GONE`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dotenv
import httpx
import psutil
from prefect.client.orchestration import get_client
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import (
    PREFECT_API_REQUEST_TIMEOUT,
    PREFECT_API_URL,
    PREFECT_CLIENT_MAX_RETRIES,
    Settings,
    temporary_settings,
)
# private helpers of Prefect's settings loader: the one way to learn which profile file Prefect read
from prefect.settings.sources import ProfileSettingsTomlLoader, _get_profiles_path, _read_toml_file

from tasks.common import runlock

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


def apply_environ(env: dict[str, str]) -> dict[str, str | None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def restore_environ(old: dict[str, str | None]) -> None:
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
    url = Settings().api.url
    prof_url, prof, prof_short = _profile_api_url()
    if not url:
        return ApiChoice(None, f"no PREFECT_API_URL in the environment, .env, {prof_short} or prefect.toml")
    url = str(url).rstrip("/")
    same = lambda v: bool(v) and str(v).rstrip("/") == url  # noqa: E731
    if same(os.environ.get("PREFECT_API_URL")):
        return ApiChoice(url, "from the environment variable PREFECT_API_URL")
    with contextlib.suppress(Exception):
        if Path(".env").is_file() and same(dotenv.dotenv_values(".env").get("PREFECT_API_URL")):
            return ApiChoice(url, f"from {Path('.env').resolve()}")
    if same(prof_url):
        return ApiChoice(url, f"from {prof}")
    return ApiChoice(url, "from Prefect's settings (prefect.toml or pyproject.toml)")


def api_answers(url: str) -> BaseException | None:
    """None when the Prefect API at ``url`` answers its health check (with this process's
    credentials), else the error."""
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
        old = apply_environ({**_QUIET_ENV, "PREFECT_API_URL": url})
        try:
            with _prefect_settings(url, os.environ.get("PREFECT_HOME")):
                yield PrefectServer(url=url, process=None,
                                    home=Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser(),
                                    log_path=None, source=choice.source)
        finally:
            restore_environ(old)
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
    old = apply_environ({**env, "PREFECT_API_URL": url})
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
        restore_environ(old)
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
    with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_API_REQUEST_TIMEOUT: timeout,
                                     PREFECT_CLIENT_MAX_RETRIES: 0}), get_client(sync_client=True) as client:
        return client.api_healthcheck() is None


def stop_for_lost_api(url: str, seconds: float) -> None:
    """The watchdog's verdict in a CLI run: say so, note it in the run locks, stop this process's
    children (Dask workers, the local server) and exit ``EXIT_API_GONE`` at once: every way out
    through Prefect would retry the dead API for minutes. The next run on the same folder marks
    this flow run Crashed (the lock's record stays)."""
    msg = (f"the Prefect API {url} has not answered for {seconds:.0f} s (the limit: FACTORY_API_GRACE_S, "
           f"default {API_GRACE_S:.0f} s): its server stopped? This run stops now (exit {EXIT_API_GONE}); the next "
           "run on the same folder marks it Crashed and resumes from what it completed.")
    with contextlib.suppress(Exception):
        print(f"\nerror: {msg}", file=sys.stderr, flush=True)
    with contextlib.suppress(Exception):
        runlock.note_held(stopped=f"the Prefect API {url} stopped answering; the run stopped itself after {seconds:.0f} s")
    with contextlib.suppress(Exception):
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


def _drain_prefect_queues(timeout: float = 10.0) -> None:
    """Send queued logs and events while the server is still up; otherwise their
    workers retry against a dead server at interpreter exit."""
    with contextlib.suppress(Exception):
        APILogWorker.drain_all(timeout=timeout)
    with contextlib.suppress(Exception):
        EventsWorker.drain_all(timeout=timeout)


@contextlib.contextmanager
def _prefect_settings(url: str, home: str | None) -> Iterator[None]:
    """Point the already-imported Prefect settings of this process at ``url``."""
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield
