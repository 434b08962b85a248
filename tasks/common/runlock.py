"""One run per output folder, and runs whose process died marked as crashed.

:func:`exclusive_output` wraps a flow function: before the body runs it takes
an exclusive ``flock`` on ``FOLDER/.run.lock``. A second run aimed at the same
folder (a schedule firing while a manual run is busy) stops at once with
:class:`OutputBusy`, a message naming the run that holds the folder, before it
writes anything, so writes never interleave and each report counts only its
own run's work.

The lock file holds the holder's flow-run id while it runs and is emptied when
the run ends, however it ends (completed, failed, cancelled: the ``finally``
runs). The kernel releases an ``flock`` when its process dies, even by
SIGKILL, but then the record stays behind: the next run that takes the lock
finds it and marks that flow run (and its task runs still RUNNING or PENDING)
``Crashed`` in Prefect, so the database never keeps a dead run RUNNING. The
stages then resume from what the dead run completed (each stage skips
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


def mark_crashed(flow_run_id: str, why: str) -> list[str]:
    """Set the flow run ``flow_run_id`` and its unfinished task runs to ``Crashed`` if the API still
    shows them running (or pending/cancelling); returns what was changed (``flow``/task-run ids)."""
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
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
            task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(
                any_=[StateType.RUNNING, StateType.PENDING]))))
        for t in tasks:
            client.set_task_run_state(t.id, Crashed(message=why), force=True)
            changed.append(str(t.id))
        if run.state is not None and run.state.type in unfinished:
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
        logger = _logger()
        previous = _read_record(fd)
        if previous:  # its holder died without releasing: the kernel dropped the lock, the record stayed
            why = (f"its process (pid {previous.get('pid')} on {previous.get('host')}) died while holding "
                   f"{folder}; found by the next run on that folder")
            dead = previous.get("flow_run_id")
            if dead:
                try:
                    changed = mark_crashed(dead, why)
                except Exception as exc:  # noqa: BLE001 - an unreachable API must not stop the new run
                    changed = []
                    logger.warning("could not mark the dead flow run %s crashed: %s", dead, exc)
                if changed:
                    logger.warning("flow run %s (%s) marked Crashed: %s; %d task run(s) too", dead,
                                   previous.get("flow_run_name"), why, len([c for c in changed if c != "flow"]))
            logger.info("%s: resuming after an interrupted run (%s)", folder, previous.get("flow_run_name"))
        run_id, run_name = _current_flow_run()
        record = {"flow_run_id": run_id, "flow_run_name": run_name, "pid": os.getpid(),
                  "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_record(fd, record)
        try:
            yield previous or {}
        finally:
            _write_record(fd, None)
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
