"""The prefect-dask internals ``tasks.common.task_runner`` copies or builds on are still what it was
written against: the recorded sources, the private attributes, and the behaviour of
``PrefectDaskFuture.wait/result`` that ``CrashAwareDaskFuture`` re-implements. When one fails after
a prefect-dask upgrade: read the upstream change, adapt the copy in ``tasks/common/task_runner.py``,
then record the new digests (``task_runner.upstream_source_digest(name)``)."""

from __future__ import annotations

import inspect
import uuid

import distributed
import prefect_dask
import pytest
from prefect.states import Completed, Failed
from prefect_dask import DaskTaskRunner
from prefect_dask.task_runners import PrefectDaskFuture

from tasks.common import task_runner
from tasks.common.dask_settings import DaskSettings
from tasks.common.task_runner import CrashAwareDaskFuture, FlowDaskTaskRunner


def test_the_upstream_code_the_runner_copies_is_unchanged():
    changed = task_runner.changed_upstream_sources()
    assert not changed, (f"prefect-dask {prefect_dask.__version__} changed {changed} (prefect_dask/task_runners.py): "
                         "compare with the copies in tasks/common/task_runner.py, adapt them, then record the new "
                         "digests in UPSTREAM_SOURCES")


def test_the_private_attributes_the_runner_sets_and_reads_exist():
    runner = DaskTaskRunner()
    for name in ("_client", "address", "cluster_class", "resolved_cluster_class", "cluster_kwargs", "adapt_kwargs"):
        assert hasattr(runner, name), f"DaskTaskRunner() has no attribute {name!r} any more"
    assert isinstance(inspect.getattr_static(DaskTaskRunner, "client"), property)
    params = inspect.signature(PrefectDaskFuture.__init__).parameters
    assert {"wrapped_future", "task_run_id"} <= set(params)
    future = PrefectDaskFuture(wrapped_future=object(), task_run_id=uuid.uuid4())
    assert hasattr(future, "_wrapped_future") and hasattr(future, "_final_state")
    assert future.wrapped_future is future._wrapped_future
    # what FlowDaskTaskRunner._use sets is what DaskTaskRunner's constructor sets for the same settings
    ours = FlowDaskTaskRunner(settings=DaskSettings(cluster_class="distributed.LocalCluster",
                                                    cluster_kwargs={"n_workers": 1}, adapt_kwargs={"maximum": 2}))
    theirs = DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={"n_workers": 1},
                            adapt_kwargs={"maximum": 2})
    for name in ("address", "cluster_class", "resolved_cluster_class", "cluster_kwargs", "adapt_kwargs"):
        assert getattr(ours, name) == getattr(theirs, name), name


class _DaskFuture:
    """What the futures read of a ``distributed.Future``: ``result(timeout)``."""

    def __init__(self, outcome):
        self.outcome = outcome

    def result(self, timeout=None):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def _outcome(call):
    try:
        return "returned", call()
    except BaseException as exc:  # noqa: BLE001 - compared between the two futures
        return "raised", type(exc), str(exc)


@pytest.mark.parametrize("dask_outcome", [
    Completed(data=42),
    Failed(data=ValueError("the task failed")),
    "not a state",
    distributed.TimeoutError("slow"),
], ids=["completed", "failed", "plain value", "timeout"])
def test_crash_aware_future_behaves_as_the_upstream_future(dask_outcome, monkeypatch):
    """Where the Dask future answers (a state, a value, a timeout), the copy does what upstream does."""
    monkeypatch.setattr(task_runner, "_mark_task_run_crashed", lambda *a: pytest.fail("not a lost task"))
    run_id = uuid.uuid4()
    for method in ("result", "wait"):
        theirs = PrefectDaskFuture(wrapped_future=_DaskFuture(dask_outcome), task_run_id=run_id)
        seen: dict = {}
        ours = CrashAwareDaskFuture(_DaskFuture(dask_outcome), run_id, seen=seen)
        assert _outcome(getattr(ours, method)) == _outcome(getattr(theirs, method)), method
        assert ours._final_state is theirs._final_state
        if ours._final_state is not None:
            assert seen[run_id] == (ours._final_state.is_completed(), ours._final_state.message)
        if method == "wait":  # then result() from the recorded state
            assert _outcome(lambda: ours.result(raise_on_failure=False)) == \
                _outcome(lambda: theirs.result(raise_on_failure=False))


def test_a_lost_dask_task_is_marked_crashed_and_raises_as_upstream(monkeypatch):
    """The one difference: a Dask-level failure (a lost worker) marks the task run first."""
    marked = []
    monkeypatch.setattr(task_runner, "_mark_task_run_crashed", lambda run_id, exc: marked.append((run_id, exc)))
    lost = distributed.comm.CommClosedError("the worker holding the task died")
    run_id = uuid.uuid4()
    theirs = PrefectDaskFuture(wrapped_future=_DaskFuture(lost), task_run_id=run_id)
    ours = CrashAwareDaskFuture(_DaskFuture(lost), run_id)
    assert _outcome(ours.result) == _outcome(theirs.result)
    assert ours.wait() is None and theirs.wait() is None and ours._final_state is None
    assert [r for r, _ in marked] == [run_id, run_id] and marked[0][1] is lost
