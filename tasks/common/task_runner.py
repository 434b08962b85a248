"""The flows' Dask task runner: a ``prefect_dask.DaskTaskRunner`` that picks its cluster when the
flow run first needs it and leaves no task run RUNNING when a Dask worker dies.

The one module that depends on prefect-dask's internals: :class:`CrashAwareDaskFuture` re-implements
``PrefectDaskFuture.wait/result`` on its private ``_wrapped_future`` / ``_final_state``, and
:class:`FlowDaskTaskRunner` sets ``DaskTaskRunner``'s attributes (``_client``, ``address``,
``cluster_class``, ...) itself. :data:`UPSTREAM_SOURCES` records the upstream code those copies
follow; ``tests/test_task_runner_upstream.py`` fails when it changes (compare, adapt the copy here,
then record the new digests).

:func:`make_task_runner` is the one place that applies the project's Dask configuration
(:mod:`tasks.common.dask_env`) and log filters, when a flow's runner is made: nothing changes
Dask's configuration at import time.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import textwrap
import time
from collections.abc import Callable
from typing import Any

import distributed
import prefect_dask.task_runners
from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Completed, Crashed, State
from prefect.utilities.importtools import from_qualified_name
from prefect_dask import DaskTaskRunner
from prefect_dask.task_runners import PrefectDaskFuture

from tasks.common.dask_env import bound_dask_logs, keep_malloc_defaults
from tasks.common.dask_settings import DaskSettings, dask_settings_from_env
from tasks.common.window import is_cancellation

log = logging.getLogger(__name__)

#: sha256 of the dedented source of each prefect-dask member (``prefect_dask.task_runners.<name>``,
#: prefect-dask 0.3.7) this module copies or builds on: ``PrefectDaskFuture.wait``/``result`` are
#: re-implemented by :class:`CrashAwareDaskFuture`; ``DaskTaskRunner.__init__`` sets the attributes
#: :meth:`FlowDaskTaskRunner._use` sets again; ``client`` is called through (``_client``); ``submit``
#: returns the future whose ``wrapped_future``/``task_run_id`` are re-wrapped; ``duplicate`` and
#: ``__eq__`` are replaced, so a setting upstream adds to them must be added here too.
UPSTREAM_SOURCES = {
    "PrefectDaskFuture.wait": "805bf203e6d44856a7d27557053df202c3c4063725529b49408b744eec5f8e94",
    "PrefectDaskFuture.result": "12930f1d667d8a55700dec08dba41b0bb83981284d879d705165175016b96a8b",
    "DaskTaskRunner.__init__": "94a8e5a2e0775128c8a72e828f57ae3e33b73b77d8884ec504a1c8b647028b58",
    "DaskTaskRunner.client": "2777cacb0680ae25316432b6ee2d1cf0239a1b7d3437943907864841b2bbcdd8",
    "DaskTaskRunner.submit": "4ec69e5fe129d3636f348973202335a5738c2ad7ceedc3a49bba4fb12a4820df",
    "DaskTaskRunner.duplicate": "c383dee480c8c66658d4737a8de2071e9efe73bb9d4881778df19049d3d95e93",
    "DaskTaskRunner.__eq__": "36718f8ed42c824c19bc1a321df926bbe777081d9c23213357c00d3213a21eb3",
}


def upstream_source_digest(qualname: str) -> str:
    """sha256 of the dedented source of ``prefect_dask.task_runners.<qualname>`` as installed."""
    obj: Any = prefect_dask.task_runners
    for part in qualname.split("."):
        obj = inspect.getattr_static(obj, part)
    if isinstance(obj, property):
        obj = obj.fget
    return hashlib.sha256(textwrap.dedent(inspect.getsource(obj)).encode()).hexdigest()


def changed_upstream_sources() -> list[str]:
    """The members of :data:`UPSTREAM_SOURCES` whose installed source differs from the recorded one."""
    return [name for name, digest in UPSTREAM_SOURCES.items() if upstream_source_digest(name) != digest]


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
    ctx = FlowRunContext.get()
    return dict(ctx.parameters or {}) if ctx is not None else {}


def _mark_task_run_crashed(task_run_id, exc: BaseException) -> None:
    """Give a task run whose Dask task died with its worker(s) a final state (PrefectHQ/prefect#21638:
    without it the run stays RUNNING forever)."""
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
        if isinstance(result, State):
            self._record(result)

    def result(self, timeout: float | None = None, raise_on_failure: bool = True):
        if not self._final_state:
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
                get_run_logger().info(msg)
        return client

    def submit(self, task, parameters, wait_for=None, dependencies=None):
        fut = super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)
        if self._flow_run_id is None:
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
