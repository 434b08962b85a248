"""The local runtime: Prefect server lifecycle and the Dask task runner factory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import json

import httpx
import psutil
import pytest

from tasks.common import runtime, task_runner


def _server_pids(port: int) -> list[int]:
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "prefect" in cmd and "server" in cmd and str(port) in cmd:
            out.append(p.info["pid"])
    return out


def test_local_server_starts_sets_env_and_stops(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with runtime.local_prefect_server(home=tmp_path / "home") as server:
        assert os.environ["PREFECT_API_URL"] == server.url
        assert server.url.startswith("http://127.0.0.1:")
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        assert (tmp_path / "home" / "prefect.db").exists()
        port = int(server.url.split(":")[2].split("/")[0])
        assert _server_pids(port)
    assert "PREFECT_API_URL" not in os.environ
    deadline = time.monotonic() + 10
    while _server_pids(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _server_pids(port), "server processes left running"
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url + "/health", timeout=2)


def test_existing_api_url_is_used_as_is(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    with runtime.local_prefect_server(home=tmp_path) as server:
        assert server.process is None and server.url == "http://127.0.0.1:9/api"
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def _start_holder(tmp_path):
    """A child process holding a local Prefect server; returns (process, server port)."""
    script = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(runtime.PROJECT_ROOT)!r})
        os.environ.pop("PREFECT_API_URL", None)
        from tasks.common.runtime import local_prefect_server
        with local_prefect_server(home={str(tmp_path / 'h')!r}) as s:
            print(s.url, flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    return proc, int(url.split(":")[2].split("/")[0])


def _gone(port: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while _server_pids(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _server_pids(port)


def test_ctrl_c_leaves_nothing_running(tmp_path):
    """SIGINT to a process holding a local server: the server goes with it."""
    proc, port = _start_holder(tmp_path)
    assert _server_pids(port)
    proc.send_signal(2)  # SIGINT, as Ctrl-C
    proc.wait(timeout=30)
    assert _gone(port)


def test_sigkill_of_parent_takes_server_down(tmp_path):
    proc, port = _start_holder(tmp_path)
    proc.kill()
    proc.wait(timeout=10)
    assert _gone(port)


def test_dask_settings_local_cluster_kwargs(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    kw = runtime.DaskSettings(n_workers=2).local_cluster_kwargs()
    assert kw["n_workers"] == 2 and kw["processes"] is True
    assert kw["host"] == "127.0.0.1" and kw["dashboard_address"] == "127.0.0.1:0"
    assert kw["resources"] == {"GPU": 1}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert runtime.DaskSettings(n_workers=3).local_cluster_kwargs()["resources"] == {}
    assert runtime.DaskSettings(n_workers=1, gpus_per_worker=2).local_cluster_kwargs()["resources"] == {"GPU": 2}
    off = runtime.DaskSettings(dashboard_address="").local_cluster_kwargs()
    assert off["dashboard_address"] == "127.0.0.1:0" and off["scheduler_kwargs"] == {"dashboard": False}


def test_dask_settings_rules():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="exclude each other"):
        runtime.DaskSettings(address="tcp://127.0.0.1:8786", cluster_class="dask_jobqueue.SLURMCluster")
    with pytest.raises(ValidationError, match="needs a protocol"):
        runtime.DaskSettings(address="127.0.0.1:8786")
    with pytest.raises(ValidationError, match="import path"):
        runtime.DaskSettings(cluster_class="SLURMCluster")
    with pytest.raises(ValidationError, match="Extra inputs"):
        runtime.DaskSettings(n_worker=2)


def test_one_dask_settings_everywhere():
    """The flows' configurations, the block and the runner share the one DaskSettings."""
    from blocks.dask_cluster import DaskCluster
    from flows.aerial import AerialConfig
    from tasks.multimodal.config import MultimodalConfig

    assert MultimodalConfig.model_fields["dask"].annotation is runtime.DaskSettings
    assert AerialConfig.model_fields["dask"].annotation is runtime.DaskSettings
    assert "n_workers" not in AerialConfig.model_fields
    assert issubclass(DaskCluster, runtime.DaskSettings)
    assert set(runtime.DaskSettings.model_fields) <= set(DaskCluster.model_fields)
    block = DaskCluster(cluster_class="dask_jobqueue.SLURMCluster", cluster_kwargs={"cores": 8, "queue": "gpu"},
                        adapt_kwargs={"minimum": 1, "maximum": 40})
    kw = block.to_settings().runner_kwargs()
    assert kw == {"cluster_class": "dask_jobqueue.SLURMCluster", "cluster_kwargs": {"cores": 8, "queue": "gpu"},
                  "adapt_kwargs": {"minimum": 1, "maximum": 40}}


def test_make_task_runner_variants():
    from prefect_dask import DaskTaskRunner

    r = runtime.make_task_runner(runtime.DaskSettings(address="tcp://127.0.0.1:8786"))
    assert isinstance(r, DaskTaskRunner) and r.address == "tcp://127.0.0.1:8786"
    r = runtime.make_task_runner(runtime.DaskSettings(cluster_class="distributed.LocalCluster",
                                                      cluster_kwargs={"n_workers": 1}))
    assert r.cluster_kwargs == {"n_workers": 1}
    r = runtime.make_task_runner(runtime.DaskSettings(n_workers=2))
    assert r.cluster_kwargs["n_workers"] == 2
    assert r.duplicate().cluster_kwargs == r.cluster_kwargs


def test_runner_settings_come_from_the_flow_run_parameters(monkeypatch):
    """Without fixed settings the runner asks the run's parameters when the cluster is first needed."""
    seen = []

    def settings_from(params):
        seen.append(params)
        return runtime.DaskSettings(n_workers=params["config"]["n"], dashboard_address="")

    r = runtime.make_task_runner(settings_from=settings_from).duplicate()  # as the flow engine does
    assert r.settings is None and r.cluster_kwargs == {}
    monkeypatch.setattr(task_runner, "_flow_run_parameters", lambda: {"config": {"n": 1}})
    with r:
        workers = r.client.scheduler_info(n_workers=-1)["workers"]
        assert len(workers) == 1 and r.settings.n_workers == 1
        assert all(w.startswith("tcp://127.0.0.1:") for w in workers)
        link = r.client.dashboard_link
        assert link.startswith("http://127.0.0.1:")
        # dashboard off: the scheduler is started without it (its HTTP server keeps health and
        # metrics, on loopback). Whether /status then answers 404 depended on test order in a
        # fresh clone (200 once, after other clusters in the same process), so the setting the
        # scheduler gets is what is checked here.
        assert r.settings.local_cluster_kwargs()["scheduler_kwargs"] == {"dashboard": False}
    assert seen == [{"config": {"n": 1}}]


def test_local_cluster_listens_on_loopback_only():
    """The scheduler, its dashboard, the nannies and the workers bind 127.0.0.1, nothing else."""
    r = runtime.make_task_runner(runtime.DaskSettings(n_workers=1))
    with r:
        link = r.client.dashboard_link
        assert link.startswith("http://127.0.0.1:")
        # the scheduler's HTTP server answers (its health route; the dashboard itself needs bokeh)
        assert httpx.get(link.rsplit("/", 1)[0] + "/health", timeout=10).status_code == 200
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
        addrs = {(c.laddr.ip, c.laddr.port) for p in procs for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN}
    ours = {a for a in addrs if a[0] != "127.0.0.1"}
    assert addrs and not ours, f"listening beyond loopback: {sorted(ours)}"


def test_pycolmap_import_keeps_the_sigterm_handler():
    """Importing the aerial stages (pycolmap) leaves a process's SIGTERM handling as it was: a
    cancellation's SIGTERM runs Python's handler instead of pycolmap's abort with a stack trace."""
    script = textwrap.dedent(f"""
        import os, signal, sys, threading, time
        sys.path.insert(0, {str(runtime.PROJECT_ROOT)!r})
        signal.signal(signal.SIGTERM, lambda *a: (print("clean exit", flush=True), os._exit(0)))
        t = threading.Thread(target=lambda: __import__("tasks.aerial.dense"))  # as in a Dask worker thread
        t.start(); t.join()
        import pycolmap
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "clean exit" in out.stdout, out.stderr[-2000:]
    assert "SIGTERM" not in out.stderr and "leaked semaphore" not in out.stderr


def test_run_each_and_in_thread():
    """The one submit/collect/problems loop: results and failures to their callbacks, every item
    once; a thread from in_thread sees the caller's context (how Prefect finds the flow run)."""
    import contextvars
    import threading

    from tasks.common.window import in_thread, run_each

    var = contextvars.ContextVar("var", default="unset")
    var.set("flow")
    seen: dict = {}

    def work(i):
        if i == 3:
            raise ValueError("bad item 3")
        return (i, var.get(), threading.current_thread().name)

    ok, bad = {}, {}
    stats = run_each(lambda i: in_thread(work, i, name=f"item-{i}"), range(6), on_result=ok.__setitem__,
                     on_error=lambda i, exc: bad.__setitem__(i, str(exc)), window=2)
    assert sorted(ok) == [0, 1, 2, 4, 5] and bad == {3: "bad item 3"}
    assert all(v[1] == "flow" and v[2] == f"item-{i}" for i, v in ok.items())
    assert stats.submitted == 6 and stats.max_in_flight == 2
    seen.update(ok)
    stats = run_each(lambda f: f, [in_thread(work, i) for i in (7, 8)], on_result=lambda f, v: seen.__setitem__(v[0], v),
                     on_error=lambda f, exc: None)
    assert stats.max_in_flight == 2 and {7, 8} <= set(seen)  # futures submitted earlier, collected


def test_shutdown_comm_tracebacks_are_dropped_other_dask_records_kept(caplog):
    """The "Batched Comm Closed" INFO record (a traceback at cluster shutdown) is not printed once a
    runner is made; distributed.batched's other records still are."""
    import logging

    runtime.make_task_runner(runtime.DaskSettings(n_workers=1))
    runtime.make_task_runner(runtime.DaskSettings(n_workers=1))  # installed once
    logger = logging.getLogger("distributed.batched")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.INFO, logger="distributed.batched"):
        try:
            raise OSError("Stream is closed")
        except OSError:
            logger.info("Batched Comm Closed %r", "<TCP (closed)>", exc_info=True)
        logger.info("Batched Comm other %r", 1)
    messages = [r.getMessage() for r in caplog.records if r.name == "distributed.batched"]
    assert messages == ["Batched Comm other 1"]


# --------------------------------------------------------------------------
# which Prefect API a run uses: Prefect's own settings (issue 27 item 1)
# --------------------------------------------------------------------------
def _profile_home(tmp_path, monkeypatch, url: str):
    """A PREFECT_HOME whose active profile has PREFECT_API_URL, set as the README says (`prefect config
    set`); nothing in the environment, no .env in the working folder."""
    home = tmp_path / "prefect-home"
    for var in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    subprocess.run([sys.executable, "-m", "prefect", "config", "set", f"PREFECT_API_URL={url}"], env=env,
                   check=True, capture_output=True, timeout=120)
    return home


def test_api_url_set_with_prefect_config_is_used(tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{runtime._free_port()}/api"
    home = _profile_home(tmp_path, monkeypatch, url)
    choice = runtime.configured_api()
    assert choice.url == url
    assert choice.source == f"from profile 'ephemeral' ({home / 'profiles.toml'})"
    with runtime.local_prefect_server(home=tmp_path / "own") as server:
        assert server.process is None and server.url == url and not server.own
        assert os.environ["PREFECT_API_URL"] == url  # for the Dask workers
    assert not (tmp_path / "own").exists()  # no server of its own
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # the environment wins, as in Prefect
    assert runtime.configured_api() == runtime.ApiChoice("http://127.0.0.1:9/api",
                                                         "from the environment variable PREFECT_API_URL")


def test_no_api_url_anywhere_says_why_the_run_starts_its_own(tmp_path, monkeypatch):
    for var in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "empty-home"))
    monkeypatch.chdir(tmp_path)
    choice = runtime.configured_api()
    assert choice.url is None and choice.source.startswith("no PREFECT_API_URL in the environment, .env, profile")


def test_cli_run_uses_the_profile_api_and_says_so(tmp_path, monkeypatch):
    """`python -m flows.multimodal` after `prefect config set PREFECT_API_URL=...`: the run goes to that
    API (here nobody listens there, so it stops at once with one line naming it and its profile) and
    never starts a server of its own."""
    url = f"http://127.0.0.1:{runtime._free_port()}/api"
    home = _profile_home(tmp_path, monkeypatch, url)
    env = dict(os.environ, PYTHONPATH=str(runtime.PROJECT_ROOT), FACTORY_PREFECT_HOME=str(tmp_path / "own"))
    out = subprocess.run([sys.executable, "-m", "flows.multimodal", "--set", f"output_dir={tmp_path / 'out'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"error: the Prefect API {url} (from profile 'ephemeral' ({home / 'profiles.toml'})) does not answer")
    assert not (tmp_path / "own").exists() and not (tmp_path / "out").exists()
    served = subprocess.run([sys.executable, "-m", "deployments.serve"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=240)  # serve too: the profile's server, not one of its own
    assert served.returncode == 2, served.stdout + served.stderr
    assert served.stderr.strip().splitlines()[-1].startswith(f"error: the Prefect API {url} (from profile 'ephemeral'")
    assert not (tmp_path / "own").exists()


# --------------------------------------------------------------------------
# a Prefect API that stops answering mid-run (issue 26 item 9)
# --------------------------------------------------------------------------
def test_api_watchdog_fires_once_after_the_grace_and_not_while_answered():
    answers = {"ok": True}
    fired = []
    with runtime.ApiWatchdog("http://x/api", on_gone=fired.append, grace=0.6, interval=0.05,
                             probe=lambda: answers["ok"]):
        time.sleep(1.0)
        assert not fired  # answered all along
        answers["ok"] = False
        deadline = time.monotonic() + 10
        while not fired and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(fired) == 1 and 0.6 <= fired[0] < 5


def test_api_watchdog_default_probe_has_no_retries(tmp_path):
    """The default probe answers within its interval against a dead port (Prefect's client would
    otherwise retry for about a minute) and the grace has its stated default."""
    wd = runtime.ApiWatchdog(f"http://127.0.0.1:{runtime._free_port()}/api", on_gone=lambda s: None, interval=2.0)
    assert wd.grace == runtime.API_GRACE_S == 45.0
    t0 = time.monotonic()
    assert wd.probe() is False
    assert time.monotonic() - t0 < 10


_LOST_SERVER_SCRIPT = textwrap.dedent("""
    import sys, time
    from prefect import flow
    from tasks.common.runlock import exclusive_output
    from tasks.common.runtime import run_local

    class Config:
        def __init__(self, argv):
            self.folder = argv[0]
        def check_inputs(self):
            pass

    @flow(name="lost-server-check")
    @exclusive_output(lambda config: config.folder)
    def wait(config):  # the test kills the server meanwhile
        for _ in range(600):
            time.sleep(0.5)

    sys.exit(run_local(sys.argv[1:], Config, wait, lambda result: 0))
""")


def test_cli_run_whose_server_dies_stops_within_the_grace(tmp_path):
    """Issue 26 item 9, the real thing: the run's own server is killed mid-run; the CLI run stops with
    exit 4 after FACTORY_API_GRACE_S (5 s here) instead of ~5 minutes, its lock record saying why, for
    the next run to mark it Crashed (test_runtime_runs.py::test_a_run_stopped_by_the_api_watchdog...)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PYTHONPATH=str(runtime.PROJECT_ROOT), FACTORY_PREFECT_HOME=str(tmp_path / "home"),
               PREFECT_HOME=str(tmp_path / "home"), FACTORY_API_GRACE_S="5")
    folder = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _LOST_SERVER_SCRIPT, str(folder)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (folder / ".run.lock").exists() or not (folder / ".run.lock").read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.3)
        server = [p for p in psutil.Process(proc.pid).children(recursive=True)
                  if "server" in " ".join(p.cmdline()) and "start" in " ".join(p.cmdline())]
        assert server
        os.killpg(server[0].pid, 9)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=120)
        stopped_after = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == runtime.EXIT_API_GONE, out + err
    assert "has not answered for" in err and "This run stops now" in err
    assert stopped_after < 60  # grace 5 s + one check interval + stopping; was ~5 minutes
    record = json.loads((folder / ".run.lock").read_text())
    assert record["flow_run_id"] and "ended" not in record and "stopped answering" in record["stopped"]


# --------------------------------------------------------------------------
# library chatter in the run folder, not the terminal (issue 27 item 3)
# --------------------------------------------------------------------------
_CHATTER_CHILD = """
import logging
import tasks.aerial  # the first pycolmap import of a process, as on a Dask worker
import pycolmap, distributed
pycolmap.logging.info("COLMAP info chatter")
pycolmap.logging.error("COLMAP error")
logging.getLogger("distributed.worker").info("Start worker at: chatter")
"""

_CHATTER_SCRIPT = """
import logging, os, subprocess, sys
if sys.argv[3] == "as in a flow":  # Dask's records reach Prefect's console handler through the root logger
    import flows.multimodal
    assert not logging.getLogger("distributed").handlers and logging.getLogger("distributed").propagate
import distributed
from tasks.common import runtime

from distributed.utils import silence_logging_cmgr

with runtime.library_logs_to(sys.argv[1]) as log_dir, silence_logging_cmgr(logging.WARNING):  # as a LocalCluster
    logging.getLogger("distributed.scheduler").info("Receive client connection: chatter")
    logging.getLogger("distributed.nanny").warning("Worker process still alive: a real warning")
    sys.stderr.flush()
    child = subprocess.run([sys.executable, "-c", sys.argv[2]], stderr=subprocess.PIPE, text=True)
    print("CHILD", child.returncode, repr(child.stderr))
    print("LOGDIR", log_dir)
print("RESTORED", "FACTORY_LIBRARY_LOG_DIR" not in os.environ)
logging.getLogger("distributed.scheduler").info("after the run: on the terminal again")
"""


@pytest.mark.parametrize("order", ["as in a flow", "dask alone"])
def test_library_chatter_goes_to_the_run_folder(tmp_path, order):
    env = dict(os.environ, PYTHONPATH=str(runtime.PROJECT_ROOT))
    out = subprocess.run([sys.executable, "-c", _CHATTER_SCRIPT, str(tmp_path / "out"), _CHATTER_CHILD, order],
                         env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    log_dir = tmp_path / "out" / "logs"
    assert f"LOGDIR {log_dir}" in out.stdout and "RESTORED True" in out.stdout
    # the terminal: warnings and errors only, until the block ends
    terminal = out.stderr + next(x for x in out.stdout.splitlines() if x.startswith("CHILD"))
    assert "chatter" not in terminal
    assert "a real warning" in out.stderr and "COLMAP error" in terminal and "CHILD 0" in terminal
    assert "after the run: on the terminal again" in out.stderr
    dask_log = (log_dir / runtime.DASK_LOG).read_text()
    assert "Receive client connection: chatter" in dask_log and "a real warning" in dask_log
    colmap = "".join(p.read_text() for p in log_dir.glob("colmap.log.*"))
    assert "COLMAP info chatter" in colmap and "COLMAP error" in colmap
