"""One run per output folder, and runs whose process died marked as crashed.

:func:`exclusive_output` wraps a flow function: before the body runs it takes
an exclusive ``flock`` on ``FOLDER/.run.lock``. A second run aimed at the same
folder (a schedule firing while a manual run is busy) stops at once with
:class:`OutputBusy`, a message naming the run that holds the folder, before it
writes anything, so writes never interleave and each report counts only its
own run's work.

The lock file holds the holder's flow-run id (and the Prefect API it reports to)
while it runs. When the body ends, however it ends, the record stays, with
``ended`` and the outcome added: the flow's final state is only sent to the API
after the body returns, and a Prefect server that died meanwhile never gets it.
The kernel releases an ``flock`` when its process dies, even by SIGKILL, and the
record stays behind too. So the next run that takes the lock always finds its
predecessor's record: if Prefect still shows that flow run unfinished (RUNNING,
PENDING...), it marks it (and, when its process died, its task runs still
RUNNING or PENDING) ``Crashed``, so the database never keeps a dead run RUNNING.
A run that stopped because its API stopped answering (:func:`note_held`, called
by the CLI's API watchdog) says so in the record and in that state's message.
The stages then resume from what the dead run completed (each stage skips
complete outputs; partial files have temporary names and are removed).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import socket
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Prefect is imported inside the functions that talk to it: the lock is taken outside Prefect too (no flow run: nothing to mark); importing
# prefect takes 5 s, httpx 0.6 s on the shared 2-core machine (python -X importtime), and
# tests/test_import_hygiene.py keeps the library Prefect-free.

log = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
EXIT_BUSY = 3  # the CLI's exit status when the output folder is in use


class OutputBusy(RuntimeError):
    """Another run is writing to this output folder."""


def _logger():
    with contextlib.suppress(Exception):
        from prefect import get_run_logger

        return get_run_logger()
    return log


def _current_flow_run() -> tuple[str | None, str | None]:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None, None
    return str(ctx.flow_run.id), ctx.flow_run.name


def mark_crashed(flow_run_id: str, why: str, tasks_only_if_unfinished: bool = False) -> list[str]:
    """Set the flow run ``flow_run_id`` and its unfinished task runs to ``Crashed`` if the API still
    shows them running (or pending/cancelling); returns what was changed (``flow``/task-run ids).
    ``tasks_only_if_unfinished``: leave the task runs alone when the flow run has a final state
    (a run whose body ended: its own bookkeeping settled them)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, TaskRunFilter,
                                                TaskRunFilterState, TaskRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    unfinished = {StateType.RUNNING, StateType.PENDING, StateType.CANCELLING, StateType.SCHEDULED}
    changed: list[str] = []
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(flow_run_id)
        except ObjectNotFound:
            return changed
        flow_unfinished = run.state is not None and run.state.type in unfinished
        if tasks_only_if_unfinished and not flow_unfinished:
            return changed
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(
                any_=[StateType.RUNNING, StateType.PENDING]))))
        for t in tasks:
            client.set_task_run_state(t.id, Crashed(message=why), force=True)
            changed.append(str(t.id))
        if flow_unfinished:
            client.set_flow_run_state(run.id, Crashed(message=why), force=True)
            changed.append("flow")
    return changed


def _read_record(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return {"unreadable": raw[:200].decode(errors="replace")}


def _write_record(fd: int, record: dict[str, Any] | None) -> None:
    os.ftruncate(fd, 0)
    if record is not None:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode())
    os.fsync(fd)


#: the records of the locks this process holds (lock path -> (fd, record)), for :func:`note_held`
_HELD: dict[Path, tuple[int, dict[str, Any]]] = {}


def note_held(**fields: Any) -> None:
    """Add ``fields`` to the record of every lock this process holds (e.g. why it is about to stop
    without the usual way out), so the next run on those folders can say so."""
    for fd, record in list(_HELD.values()):
        record.update(fields)
        with contextlib.suppress(OSError):
            _write_record(fd, record)


def _api_url() -> str | None:
    with contextlib.suppress(Exception):
        from prefect.settings import PREFECT_API_URL

        return PREFECT_API_URL.value()
    return None


def _settle_previous(previous: dict[str, Any], folder: Path, logger) -> None:
    """Mark the flow run of the lock's previous record ``Crashed`` if Prefect still shows it unfinished."""
    dead = previous.get("flow_run_id")
    ended = previous.get("ended")
    if ended:  # its body ended: did its final state reach the API?
        why = (f"its flow ended at {ended} ({previous.get('outcome', '?')}) but its final state never reached "
               f"the Prefect API {previous.get('api') or ''}".rstrip() + f"; found by the next run on {folder}")
    else:
        why = (f"its process (pid {previous.get('pid')} on {previous.get('host')}) died while holding {folder}"
               + (f" ({previous['stopped']})" if previous.get("stopped") else "") + "; found by the next run on that folder")
    if dead:
        try:
            changed = mark_crashed(dead, why, tasks_only_if_unfinished=bool(ended))
        except Exception as exc:  # noqa: BLE001 - an unreachable API must not stop the new run
            changed = []
            logger.warning("could not check the previous flow run %s: %s", dead, exc)
        if changed:
            logger.warning("flow run %s (%s) marked Crashed: %s; %d task run(s) too", dead,
                           previous.get("flow_run_name"), why, len([c for c in changed if c != "flow"]))
    if not ended:
        logger.info("%s: resuming after an interrupted run (%s)", folder, previous.get("flow_run_name"))


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, what: str = "output folder") -> Iterator[dict[str, Any]]:
    """Hold ``folder`` for this run (see the module docstring); raises :class:`OutputBusy`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(fd) or {}
            raise OutputBusy(
                f"{what} {folder} is in use by flow run {holder.get('flow_run_name') or '?'} "
                f"({holder.get('flow_run_id') or 'no id'}, pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, since {holder.get('started', '?')}); this run stops without "
                f"writing anything. Wait for that run to finish (or cancel it), or choose another folder."
            ) from None
        previous = _read_record(fd)
        if previous:  # the last run's record: ended (final state maybe never sent) or its holder died
            _settle_previous(previous, folder, _logger())
        run_id, run_name = _current_flow_run()
        record = {"flow_run_id": run_id, "flow_run_name": run_name, "pid": os.getpid(),
                  "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "api": _api_url()}
        _write_record(fd, record)
        _HELD[path] = (fd, record)
        outcome = "interrupted"
        try:
            yield previous or {}
            outcome = "completed"
        except BaseException as exc:
            outcome = f"{type(exc).__name__}: {exc}"[:300]
            raise
        finally:
            _HELD.pop(path, None)
            # kept, not emptied: the next run checks that Prefect got this run's final state
            _write_record(fd, {**record, "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "outcome": outcome})
    finally:
        os.close(fd)  # releases the flock


def exclusive_output(folder_of: Callable[..., str | os.PathLike], what: str = "output folder"):
    """Decorator for a flow function: hold ``folder_of(*args, **kwargs)`` while the body runs."""

    lock = output_lock

    def wrap(fn):
        def inner(*args, **kwargs):
            with lock(folder_of(*args, **kwargs), what):
                return fn(*args, **kwargs)

        # the wrapper lives in the flow's module namespace (only closure variables used above), so that
        # Prefect resolves the flow's parameter annotations against the flow module's globals
        inner = types.FunctionType(inner.__code__, fn.__globals__, fn.__name__, None, inner.__closure__)
        return functools.wraps(fn)(inner)

    return wrap
