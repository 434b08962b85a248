"""The local runtime: Prefect server lifecycle and the Dask task runner factory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import httpx
import psutil
import pytest

from tasks.common import runtime


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


def test_dask_config_local_cluster_kwargs(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    kw = runtime.DaskConfig(n_workers=2).local_cluster_kwargs()
    assert kw["n_workers"] == 2 and kw["processes"] is True
    assert kw["resources"] == {"GPU": 1}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert runtime.DaskConfig(n_workers=3).local_cluster_kwargs()["resources"] == {}
    assert runtime.DaskConfig(n_workers=1, gpus_per_worker=2).local_cluster_kwargs()["resources"] == {"GPU": 2}


def test_make_task_runner_variants():
    from prefect_dask import DaskTaskRunner

    r = runtime.make_task_runner(runtime.DaskConfig(address="tcp://127.0.0.1:8786"))
    assert isinstance(r, DaskTaskRunner) and r.address == "tcp://127.0.0.1:8786"
    r = runtime.make_task_runner(runtime.DaskConfig(cluster_class="distributed.LocalCluster",
                                                    cluster_kwargs={"n_workers": 1}))
    assert r.cluster_kwargs == {"n_workers": 1}
    r = runtime.make_task_runner(runtime.DaskConfig(n_workers=2))
    assert r.cluster_kwargs["n_workers"] == 2
