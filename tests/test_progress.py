"""The progress helper both flows use (issue 27 item 3): done/total, rate and time left, in the log
and as a Prefect progress artifact, for stages over a few seconds."""

from __future__ import annotations

import json
import logging

import pytest

from tasks.common.progress import Progress, duration
from tasks.common.window import run_each


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "progress-test"]


def test_lines_say_done_total_rate_and_time_left_and_short_stages_say_nothing(caplog):
    caplog.set_level(logging.INFO, logger="progress-test")
    logger = logging.getLogger("progress-test")
    clock = Clock()
    with Progress("scene 0001 dense", 32, "tasks", logger=logger, clock=clock) as p:
        for k in range(32):
            clock.t += 4.0  # 4 s a task
            p.advance()
            if k == 11:
                assert _lines(caplog)[-1] == "scene 0001 dense: 11/32 tasks (34%), 0.25/s, about 1m 24s left"
    lines = _lines(caplog)
    assert lines[-1] == "scene 0001 dense: 32/32 tasks in 2m 08s"
    assert len(lines) == 17  # at most one line per 5 s (tasks every 4 s: every other one), and the last
    caplog.clear()
    with Progress("quick", 5, logger=logger, clock=clock) as p:  # ends within 3 s: nothing
        for _ in range(5):
            clock.t += 0.5
            p.advance()
    assert _lines(caplog) == []


def test_heartbeat_while_nothing_finishes(caplog):
    caplog.set_level(logging.INFO, logger="progress-test")
    clock = Clock()
    p = Progress("scene 0001 dense", 9, "tasks", logger=logging.getLogger("progress-test"), clock=clock)
    for _ in range(95):  # the window's idle calls, one a second
        clock.t += 1.0
        p.tick()
    assert _lines(caplog) == [f"scene 0001 dense: 0/9 tasks (0%), running for {t}" for t in ("30s", "1m 00s", "1m 30s")]


def test_update_from_a_plain_function_callback(caplog):
    caplog.set_level(logging.INFO, logger="progress-test")
    clock = Clock()
    p = Progress("synthetic world", 0, "renders", logger=logging.getLogger("progress-test"), clock=clock)
    for k in range(1, 65):
        clock.t += 1.0
        p.update(k, 64)
    p.close()
    lines = _lines(caplog)
    assert lines[0].startswith("synthetic world: 3/64 renders (5%), 1.00/s, about 1m 01s left")
    assert lines[-1] == "synthetic world: 64/64 renders in 1m 04s"


def test_run_each_counts_results_and_failures():
    import concurrent.futures

    clock = Clock()
    seen = []

    class Recorder(Progress):
        def advance(self, n=1, note=""):
            seen.append(n)
            super().advance(n, note)

    pool = concurrent.futures.ThreadPoolExecutor(2)

    def work(i):
        if i == 3:
            raise ValueError("bad item")
        return i

    p = Recorder("t", 6, clock=clock)
    errors = []
    run_each(lambda i: pool.submit(work, i), range(6), on_result=lambda *_: None,
             on_error=lambda i, e: errors.append(i), progress=p)
    assert seen == [1] * 6 and p.done == 6 and p.closed and errors == [3]


def test_slow_items_say_the_time_each():
    clock = Clock()
    p = Progress("scene 0001 dense", 9, "tasks", clock=clock)
    clock.t += 302.0
    p.done = 1
    assert p.text() == "scene 0001 dense: 1/9 tasks (11%), 5m 02s each, about 40m 16s left"


def test_duration_words():
    assert [duration(x) for x in (0, 44.6, 95, 3599, 7500)] == ["0s", "45s", "1m 35s", "59m 59s", "2h 05m"]


@pytest.mark.usefixtures("prefect_server")
def test_progress_artifact_in_a_flow_run():
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.context import get_run_context

    clock = Clock()

    @flow(name="progress-artifact")
    def stage():
        with Progress("scene 0001 features", 4, "parts", clock=clock) as p:
            for _ in range(4):
                clock.t += 6.0
                p.advance()
        return str(get_run_context().flow_run.id)

    run_id = stage()
    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    prog = [a for a in arts if a.type == "progress"]
    assert len(prog) == 1 and float(prog[0].data) == 100.0
    assert prog[0].description == "scene 0001 features: 4/4 parts in 24s"


def test_world_render_reports_each_render(tmp_path):
    from tasks.aerial.synthetic_world import generate_world

    calls = []
    generate_world(tmp_path, n_aerial=3, n_ground=2, size=(160, 120), seed=1, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(k, 5) for k in range(1, 6)]


# --------------------------------------------------------------------------
# the end of a local run (issue 27 items 3 and 7)
# --------------------------------------------------------------------------
def test_report_names_its_problems_file_only_when_written(tmp_path):
    from tasks.common.report import RunReport

    stale = tmp_path / "report_problems.jsonl"
    stale.write_text('{"item": "old", "stage": "fetch", "reason": "an earlier run"}\n')
    clean = RunReport("clean run", problems_file=stale, keep_problems=10)
    path = clean.write(tmp_path)
    d = json.loads(path.read_text())
    assert "problems_file" not in d and d["problems_total"] == 0 and not stale.exists()
    assert d["outputs"]["report"] == str(path)
    bad = RunReport("run with a problem", problems_file=stale, keep_problems=10)
    bad.problem("t1", "fetch", "timeout")
    d = json.loads(bad.write(tmp_path).read_text())
    assert d["problems_file"] == str(stale) and stale.read_text().count("\n") == 1


def test_aerial_summary_is_a_short_table_with_the_report_and_pictures(capsys):
    from flows.aerial import print_result

    counts = {f"count number {i}": 1000 + i for i in range(30)} | {"dense backend": "cpu", "error px": 0.4240841636784985}
    outputs = {"product": "/r/data/0001/localized_dense_metric", "report": "/r/data/0001/report.json",
               "picture": "/r/data/0001/overview.png", "covisibility picture": "/r/training/pictures/0001_covisibility.png"}
    print_result({"root": "/r", "plans": {}, "pipeline": "sift+mnn", "dense_backend": "cpu", "failed": {},
                  "scenes": {"0001": {"counts": counts, "outputs": outputs, "problems": [], "accuracy": None}}})
    out = capsys.readouterr().out
    assert max(len(x) for x in out.splitlines()) <= 100
    assert "count number 29" in out and "1029" in out and "0.4241" in out
    for path in outputs.values():
        assert path in out


def test_multimodal_summary_names_the_report_and_picture(capsys):
    from flows.multimodal import finish

    result = {"dataset_dir": "/o/data", "counts": {"rows in h5": 4}, "problems": [],
              "outputs": {"report": "/o/data/report.json", "picture": "/o/data/tiles_map.png"}}
    assert finish(result) == 0
    out = capsys.readouterr().out
    assert "Report: /o/data/report.json" in out and "Picture: /o/data/tiles_map.png" in out


def test_history_hint_opens_the_kept_history(tmp_path, monkeypatch):
    """The command the summary gives (PREFECT_HOME=<home> prefect server start) serves the database
    the run's own server wrote: the same file, as Prefect resolves it."""
    from prefect.settings import Settings

    from tasks.common.runtime import PrefectServer, history_hint

    home = tmp_path / ".prefect"
    own = PrefectServer(url="http://127.0.0.1:4321/api", process=object(), home=home, log_path=None)
    hint = history_hint(own)
    assert "died with this run's own Prefect server" in hint
    assert f"PREFECT_HOME={home} prefect server start" in hint
    monkeypatch.setenv("PREFECT_HOME", str(home))
    for var in ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        monkeypatch.delenv(var, raising=False)
    db = Settings().server.database.connection_url.get_secret_value()
    assert db == f"sqlite+aiosqlite:///{home / 'prefect.db'}"  # what local_prefect_server writes
    external = PrefectServer(url="http://127.0.0.1:4200/api", process=None, home=home, log_path=None)
    assert history_hint(external) == "Prefect UI: http://127.0.0.1:4200 (this run is in its history there)."
