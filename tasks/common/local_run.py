"""``python -m flows.<name>``: the command-line run both flows share (checks first, then the Prefect
API, the watchdog and the run folder's library logs around the flow)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tasks.common.cli import EXIT_CONFIG, ConfigError
from tasks.common.prefect_server import (
    ApiWatchdog,
    apply_environ,
    configured_api_problem,
    history_hint,
    local_prefect_server,
    restore_environ,
    stop_for_lost_api,
)
from tasks.common.runlock import EXIT_BUSY, OutputBusy
from tasks.common.signals import route_glog

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
            with (ApiWatchdog(server.url, on_gone=lambda s: stop_for_lost_api(server.url, s)),
                  library_logs_to(folder_of(config) if folder_of else None) as log_dir):
                result = flow(config=config)
        except OutputBusy as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BUSY
    code = finish(result)
    if log_dir is not None:
        print(f"Library logs (COLMAP, Dask): {log_dir}", flush=True)
    print(history_hint(server), flush=True)
    return code


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
    old = apply_environ({"FACTORY_LIBRARY_LOG_DIR": str(log_dir), "DASK_LOGGING__DISTRIBUTED": "warning"})
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
        restore_environ(old)
