"""Runs as operators start them: deployment runs that honour their Dask parameters, an external
multi-process Dask cluster (one GPU worker), two runs on one folder, a killed flow process, a
killed Dask worker, and cancellation through a served deployment. Small configurations only."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tasks.common.runtime import PROJECT_ROOT, DaskSettings, _free_port
from tests.processes import server_env, start_logged, stop_group

pytestmark = pytest.mark.usefixtures("prefect_server")

PY = sys.executable


def smoke(out: Path, name: str = "data_rt", n_tiles: int = 8, **kw) -> dict:
    """A few synthetic tiles (the parameters as a deployment stores them)."""
    cfg = {"name": name, "output_dir": str(out), "n_tiles": n_tiles, "fetch_batch_size": 2, "part_size": 4,
           "dask": {"n_workers": 1}}
    cfg.update(kw)
    return {"config": cfg}


def _env(**extra) -> dict:
    return server_env(**extra)


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _flow_run(run_id):
    with _client() as c:
        return c.read_flow_run(run_id)


def _task_runs(run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as c:
        return c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))


def _logs(run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    time.sleep(1.0)  # logs are sent in batches
    with _client() as c:
        return "\n".join(x.message for x in c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))))


def _wait(pred, timeout: float, what: str, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _apply(flow, name: str, parameters: dict):
    """Register a deployment whose entrypoint is the flow's module path (``flows.multimodal:...``): a
    file-path entrypoint is loaded as a top-level module (``multimodal``) that the processes of an
    external Dask cluster cannot import when they unpickle the run's context."""
    from prefect.deployments.runner import EntrypointType

    return flow.to_deployment(name=name, parameters=parameters, entrypoint_type=EntrypointType.MODULE_PATH).apply()


def _execute(run_id, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a deployment's flow run as a worker does: a fresh process loading the deployment's
    entrypoint, with only the run id to go on."""
    return subprocess.run([PY, "-m", "prefect", "flow-run", "execute", str(run_id)], cwd=PROJECT_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _h5_digest(folder: Path) -> str:
    import h5py
    import numpy as np

    h = hashlib.sha256()
    with h5py.File(next(folder.glob("*.h5")), "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                h.update(name.encode())
                h.update(np.ascontiguousarray(obj[()]).tobytes())
        f.visititems(visit)
    return h.hexdigest()


# --------------------------------------------------------------------------
# deployment runs take their cluster from their own parameters
# --------------------------------------------------------------------------
def test_deployment_run_uses_its_dask_n_workers(tmp_path):
    from prefect.deployments import run_deployment

    from flows.multimodal import multimodal_flow

    params = smoke(tmp_path, dask={"n_workers": 1, "threads_per_worker": 2})
    _apply(multimodal_flow, "rt-params", params)
    fr = run_deployment("multimodal/rt-params", timeout=0)
    done = _execute(fr.id)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _flow_run(fr.id).state.is_completed()
    logs = _logs(fr.id)
    assert "Dask: LocalCluster: 1 worker(s) x 2 thread(s); 1 worker(s) connected; dashboard: http://127.0.0.1:" in logs
    report = json.loads((tmp_path / "data_rt" / "report.json").read_text())
    assert report["counts"]["stacks done"] + report["counts"]["no data"] == 8


# --------------------------------------------------------------------------
# an external multi-process cluster: `dask scheduler` + `dask worker` processes, one with GPU=1
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def external_cluster(tmp_path_factory, prefect_server):
    rec = tmp_path_factory.mktemp("worker-records")
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    env = _env(FACTORY_TEST_RECORD_DIR=str(rec))
    bin_ = Path(PY).parent
    dask = str(bin_ / "dask") if (bin_ / "dask").exists() else "dask"
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", "127.0.0.1:0"], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    common = ["--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard",
              "--preload", str(PROJECT_ROOT / "tests" / "dask_worker_preload.py")]
    procs.append(subprocess.Popen([dask, "worker", addr, "--name", "cpu", *common], env=env, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    procs.append(subprocess.Popen([dask, "worker", addr, "--name", "gpu", "--resources", "GPU=1", *common],
                                  env=dict(env, FACTORY_TEST_GPU_STANDIN="1"), start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    from distributed import Client

    try:
        with Client(addr, timeout=120) as client:
            client.wait_for_workers(2, timeout=180)
            names = {w["name"]: a for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
        yield {"address": addr, "records": rec, "workers": names}
    finally:
        for p in reversed(procs):
            with __import__("contextlib").suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def _records(cluster) -> dict[str, list[dict]]:
    out = {}
    for f in Path(cluster["records"]).glob("*.jsonl"):
        if f.stem not in cluster["workers"]:
            continue  # the GPU stand-in's own record
        out[f.stem] = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return out


def test_multimodal_on_external_cluster_by_address_and_by_block(tmp_path, external_cluster):
    from prefect.deployments import run_deployment

    from blocks.dask_cluster import DaskCluster
    from flows.multimodal import multimodal_flow

    before = {k: len(v) for k, v in _records(external_cluster).items()}
    # by address, in a local call: no local cluster is made, the tasks run on the external workers
    params = smoke(tmp_path / "a", dask={"address": external_cluster["address"]})
    result = multimodal_flow(**{"config": multimodal_flow.validate_parameters(params)["config"]})
    assert result["counts"]["stacks done"] + result["counts"]["no data"] == 8
    after = {k: len(v) for k, v in _records(external_cluster).items()}
    ran = sum(after.get(k, 0) - before.get(k, 0) for k in ("cpu", "gpu"))
    assert ran >= 4 + 1  # four fetch batches and at least one packing partition ran there
    # by a saved block, in a deployment run
    DaskCluster(address=external_cluster["address"]).save("rt-external", overwrite=True)
    _apply(multimodal_flow, "rt-block", smoke(tmp_path / "b", dask_block="rt-external", dask={"n_workers": 3}))
    fr = run_deployment("multimodal/rt-block", timeout=0)
    done = _execute(fr.id)
    assert done.returncode == 0, done.stderr[-3000:]
    logs = _logs(fr.id)
    assert f"Dask: existing Dask scheduler {external_cluster['address']}; 2 worker(s) connected" in logs
    assert "LocalCluster" not in logs
    final = {k: len(v) for k, v in _records(external_cluster).items()}
    assert sum(final.get(k, 0) - after.get(k, 0) for k in ("cpu", "gpu")) >= 4 + 1


def test_prefect_yaml_deployment_runs_on_the_external_cluster(tmp_path, external_cluster):
    """The deployments of prefect.yaml as an operator deploys them (`prefect deploy` of the file's
    own entrypoint and job variables; its pull step) and runs them (the run executed as a worker
    does), with a saved DaskCluster block naming the external cluster: the run imports the flow
    by its module path, as the `dask worker` processes do, so its tasks run there. (A file-path
    entrypoint failed here with "Error during deserialization of the task graph".)"""
    import yaml
    from prefect.deployments import run_deployment

    from blocks.dask_cluster import DaskCluster
    from deployments.deploy import deploy
    from deployments.spec import load_specs

    spec = next(s for s in load_specs() if s.name == "embedded-default")
    assert spec.entrypoint == "flows.multimodal.multimodal_flow"
    DaskCluster(address=external_cluster["address"]).save("rt-yaml-external", overwrite=True)
    entry = {"name": "rt-yaml-external", "entrypoint": spec.entrypoint,
             "parameters": smoke(tmp_path, dask_block="rt-yaml-external", dask={"n_workers": 3}),
             "work_pool": {"name": "rt-yaml-pool", "job_variables": spec.work_pool["job_variables"]}}
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump({"name": "rt-yaml", "deployments": [entry]}))
    assert deploy(path) == ["rt-yaml-external"]
    with _client() as c:
        dep = c.read_deployment_by_name("multimodal/rt-yaml-external")
    assert dep.entrypoint == "flows.multimodal.multimodal_flow"
    assert dep.job_variables["env"]["PYTHONPATH"] == str(PROJECT_ROOT)  # "{{ $PWD }}" where deploy ran
    before = {k: len(v) for k, v in _records(external_cluster).items()}
    fr = run_deployment("multimodal/rt-yaml-external", timeout=0)
    done = _execute(fr.id)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _flow_run(fr.id).state.is_completed()
    logs = _logs(fr.id)
    assert f"Dask: existing Dask scheduler {external_cluster['address']}; 2 worker(s) connected" in logs
    assert "LocalCluster" not in logs
    after = {k: len(v) for k, v in _records(external_cluster).items()}
    assert sum(after.get(k, 0) - before.get(k, 0) for k in ("cpu", "gpu")) >= 4 + 1
    report = json.loads((tmp_path / "data_rt" / "report.json").read_text())
    assert report["counts"]["stacks done"] + report["counts"]["no data"] == 8


def test_aerial_on_external_cluster_gpu_tasks_only_on_the_gpu_worker(tmp_path, external_cluster):
    from blocks.dask_cluster import DaskCluster
    from flows.aerial import AerialConfig, aerial_flow

    DaskCluster(address=external_cluster["address"]).save("rt-external-aerial", overwrite=True)
    cfg = AerialConfig(root=str(tmp_path / "aerial"), synthetic=True, dask_block="rt-external-aerial", image_batch=2,
                       pipeline_options={"dense": {"batch": 8}}, world_options={"n_aerial": 16, "n_ground": 3, "size": [320, 240]})
    result = aerial_flow(config=cfg)
    recs = _records(external_cluster)
    gpu_tasks = [r for name, rs in recs.items() for r in rs if r["resources"].get("GPU")]
    assert result["dense_backend"] == "gpu"
    assert gpu_tasks, "no GPU-tagged task ran"
    assert all(r in recs["gpu"] for r in gpu_tasks)  # GPU-tagged tasks ran on the GPU worker only
    assert not [r for r in recs.get("cpu", []) if r["resources"].get("GPU")]
    assert recs.get("cpu"), "the CPU worker ran nothing"
    assert result["dense_workers"]["0001"] == [external_cluster["workers"]["gpu"]]
    standin = Path(external_cluster["records"]) / "gpu-standin.jsonl"
    import pycolmap

    assert pycolmap.has_cuda or standin.exists()
    assert result["scenes"]["0001"]["counts"]["depth maps"] >= 1


# --------------------------------------------------------------------------
# one run per output folder; a killed flow process is marked crashed and resumed
# --------------------------------------------------------------------------
def _start_flow_process(params: dict, log_path: Path) -> subprocess.Popen:
    script = textwrap.dedent(f"""
        import json, sys
        from flows.multimodal import multimodal_flow
        from tasks.multimodal.config import MultimodalConfig
        r = multimodal_flow(config=MultimodalConfig(**json.loads({json.dumps(json.dumps(params["config"]))})))
        print("COUNTS", json.dumps(r["counts"]), flush=True)
    """)
    return subprocess.Popen([PY, "-c", script], cwd=PROJECT_ROOT, env=_env(), start_new_session=True,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def _lock_record(folder: Path) -> dict | None:
    p = folder / ".run.lock"
    try:
        text = p.read_text()
    except FileNotFoundError:
        return None
    return json.loads(text) if text.strip() else None


def test_second_run_on_the_same_folder_stops_with_a_clear_message(tmp_path):
    from flows.multimodal import multimodal_flow
    from tasks.common.runlock import OutputBusy
    from tasks.multimodal.config import MultimodalConfig

    params = smoke(tmp_path, n_tiles=12, source_options={"latency_s": 0.5})  # busy for 6 s at least
    first = _start_flow_process(params, tmp_path / "first.log")
    holder = _wait(lambda: _lock_record(tmp_path / "data_rt"), 300, "the first run to hold the folder")
    tiles_before = set((tmp_path / "data_rt" / "tiles").glob("*"))
    with pytest.raises(OutputBusy) as err:
        multimodal_flow(config=MultimodalConfig(**params["config"]))
    msg = str(err.value)
    assert f"is in use by flow run {holder['flow_run_name']} ({holder['flow_run_id']}" in msg
    assert "this run stops without writing anything" in msg
    assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    line = next(x for x in (tmp_path / "first.log").read_text().splitlines() if x.startswith("COUNTS"))
    counts = json.loads(line.split(" ", 1)[1])
    assert counts["fetched this run"] == 12 - 0 and counts["stacks done"] + counts["no data"] == 12
    assert tiles_before <= set((tmp_path / "data_rt" / "tiles").glob("*"))
    record = _lock_record(tmp_path / "data_rt")  # released; the record stays for the next run's check
    assert record["flow_run_id"] == holder["flow_run_id"] and record["outcome"] == "completed" and record["ended"]


def test_killed_flow_process_is_marked_crashed_and_the_rerun_resumes(tmp_path):
    from prefect.client.schemas.objects import StateType

    from flows.multimodal import multimodal_flow
    from tasks.multimodal.config import MultimodalConfig

    params = smoke(tmp_path, n_tiles=16, source_options={"latency_s": 0.3})
    proc = _start_flow_process(params, tmp_path / "killed.log")
    out = tmp_path / "data_rt"
    holder = _wait(lambda: _lock_record(out), 300, "the run to hold the folder")
    _wait(lambda: len(list((out / "work" / "tile_info").glob("*.json"))) >= 4, 300, "some stacks")
    os.killpg(proc.pid, signal.SIGKILL)  # the machine going down: the process and its Dask workers
    proc.wait(timeout=30)
    assert _flow_run(holder["flow_run_id"]).state.type == StateType.RUNNING  # what Prefect alone leaves
    result = multimodal_flow(config=MultimodalConfig(**params["config"]))
    dead = _flow_run(holder["flow_run_id"])
    assert dead.state.type == StateType.CRASHED and "died while holding" in dead.state.message
    assert not [t for t in _task_runs(holder["flow_run_id"]) if t.state.type == StateType.RUNNING]
    counts = result["counts"]
    assert counts["stacks done"] + counts["no data"] == 16
    assert counts["fetched this run"] < 16  # resumed: the dead run's stacks were kept
    from tests.dataset_checks import check_dataset

    check_dataset(out, "data_rt", counts["rows in h5"])


def _running_flow_run(name: str):
    """A flow run in the API left RUNNING, as one whose final state never reached the server."""
    from prefect import flow
    from prefect.states import Running

    @flow(name="lock-check")
    def lock_check():
        pass

    with _client() as c:
        return c.create_flow_run(lock_check, name=name, state=Running())


def test_next_run_marks_a_run_whose_end_never_reached_the_api_crashed(tmp_path, monkeypatch):
    """Issue 26 item 9: the server died before the flow's final state was sent. The run's body ended
    (the lock is released), its flow run stays RUNNING in the database; the next run on the folder
    marks it Crashed. One that did reach a final state is left alone."""
    from prefect.client.schemas.objects import StateType
    from prefect.states import Completed

    from tasks.common import runlock

    out = tmp_path / "out"
    lost, done = _running_flow_run("lost-end"), _running_flow_run("reached-end")
    with _client() as c:
        c.set_flow_run_state(done.id, Completed(), force=True)
    for run in (lost, done):
        monkeypatch.setattr(runlock, "_current_flow_run", lambda r=run: (str(r.id), r.name))
        with runlock.output_lock(out):
            pass  # the body ends; the engine's final state would be sent after this
        record = _lock_record(out)
        assert record["flow_run_id"] == str(run.id) and record["outcome"] == "completed"
        if run is lost:
            monkeypatch.setattr(runlock, "_current_flow_run", lambda: (None, None))
            with runlock.output_lock(out):
                pass
            state = _flow_run(lost.id).state
            assert state.type == StateType.CRASHED and "never reached the Prefect API" in state.message
    assert _flow_run(done.id).state.type == StateType.COMPLETED


def test_a_run_stopped_by_the_api_watchdog_is_marked_crashed_with_the_reason(tmp_path):
    """What the CLI's watchdog does when the API stops answering: note it in the held lock, exit at once
    (no way out through Prefect). The next run marks the flow run Crashed, naming the reason."""
    from prefect.client.schemas.objects import StateType

    from tasks.common import runlock

    out = tmp_path / "out"
    run = _running_flow_run("api-gone")
    script = textwrap.dedent(f"""
        import os
        from tasks.common import runlock
        runlock._current_flow_run = lambda: ({str(run.id)!r}, {run.name!r})
        with runlock.output_lock({str(out)!r}):
            runlock.note_held(stopped="the Prefect API http://x/api stopped answering; the run stopped itself")
            os._exit(4)
    """)
    proc = subprocess.run([PY, "-c", script], cwd=PROJECT_ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 4, proc.stderr
    assert "ended" not in _lock_record(out) and _lock_record(out)["stopped"].startswith("the Prefect API")
    with runlock.output_lock(out):
        pass
    state = _flow_run(run.id).state
    assert state.type == StateType.CRASHED
    assert "died while holding" in state.message and "stopped answering" in state.message


# --------------------------------------------------------------------------
# a Dask worker killed mid-task
# --------------------------------------------------------------------------
def test_killed_worker_task_retried_same_output(tmp_path):
    """Kill the worker process running a fetch: the task runs again on another worker, the run
    completes with the output of an undisturbed run and no task run is left RUNNING."""
    from distributed import Client, LocalCluster
    from prefect.client.schemas.objects import StateType

    from flows.multimodal import multimodal_flow
    from tasks.multimodal.config import MultimodalConfig

    ref = multimodal_flow(config=MultimodalConfig(**smoke(tmp_path / "ref", n_tiles=12,
                                                          source_options={"latency_s": 0.3})["config"]))
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pids = client.run(os.getpid)
        cfg = MultimodalConfig(**smoke(tmp_path / "hit", n_tiles=12, dask={"address": cluster.scheduler_address},
                                       source_options={"latency_s": 0.3})["config"])
        import contextvars
        import threading

        box = {}
        ctx = contextvars.copy_context()  # the Prefect settings (API URL) of this test's server
        t = threading.Thread(target=lambda: box.setdefault("r", ctx.run(multimodal_flow, config=cfg)))
        t.start()

        def busy():
            running = client.run(lambda dask_worker: len(dask_worker.state.executing))
            return next((addr for addr, n in running.items() if n and addr in pids), None)

        victim = _wait(busy, 300, "a worker running a task", step=0.05)
        os.kill(pids[victim], signal.SIGKILL)
        t.join(timeout=600)
        assert not t.is_alive()
    result = box["r"]
    assert result["counts"] == {**ref["counts"]}
    assert _h5_digest(tmp_path / "hit" / "data_rt") == _h5_digest(tmp_path / "ref" / "data_rt")
    stuck = [t for t in _task_runs_of_latest("multimodal") if t.state.type == StateType.RUNNING]
    assert not stuck, [t.name for t in stuck]


def _task_runs_of_latest(flow_name: str):
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with _client() as c:
        runs = c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                sort=FlowRunSort.START_TIME_DESC, limit=1)
    return _task_runs(runs[0].id)


def test_task_whose_workers_all_die_is_crashed_not_left_running(monkeypatch):
    """PrefectHQ/prefect#21638: a task that kills every worker it runs on ends KilledWorker; its
    task run gets a final state (Crashed) and the flow sees the error."""
    import dask
    from prefect import flow, task
    from prefect.client.schemas.objects import StateType

    from tasks.common.runtime import make_task_runner

    @task(name="kills-its-worker")
    def die():
        time.sleep(3)  # running for a while (its RUNNING state recorded), then the worker process dies
        os._exit(1)

    @flow(name="rt-killed-worker", task_runner=make_task_runner(DaskSettings(n_workers=1, dashboard_address="")))
    def f():
        fut = die.submit()
        try:
            fut.result()
        except Exception as exc:  # noqa: BLE001
            return type(exc).__name__, str(fut.task_run_id)
        return "no error", str(fut.task_run_id)

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        name, task_run_id = f()
    assert name == "KilledWorker"
    with _client() as c:
        tr = c.read_task_run(task_run_id)
    assert tr.state.type == StateType.CRASHED and "lost with its worker" in tr.state.message


def test_dask_forgets_finished_tasks_and_keeps_short_logs():
    """The runner holds no future and Dask keeps only a short message log, so a finished task's
    arguments and result are freed once the flow drops its future: memory stays flat in the
    number of tasks (it grew 2.3 MB a task of 250 tiles in the flow process before: the runner
    held every future, and Dask's 1000-message logs held the tasks' arguments)."""
    import dask
    from prefect import flow, task

    from tasks.common.runtime import DASK_LOG_LENGTH, flow_dask_client, make_task_runner

    @task(name="sum-payload", persist_result=False)
    def total(payload):
        return sum(payload)

    @flow(name="rt-forget", task_runner=make_task_runner(DaskSettings(n_workers=1, dashboard_address="")))
    def f():
        for k in range(12):
            assert total.submit(list(range(k, k + 20000))).result() == sum(range(k, k + 20000))
        client = flow_dask_client()
        deadline = time.monotonic() + 60
        while (n := client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        key = "distributed.admin.low-level-log-length"
        return (n, client.run_on_scheduler(lambda: dask.config.get(key)),
                sorted(client.run(lambda: dask.config.get(key)).values()))

    n_tasks, scheduler_log, worker_logs = f()
    assert n_tasks == 0, f"the scheduler still holds {n_tasks} finished tasks"
    assert scheduler_log == DASK_LOG_LENGTH and worker_logs == [DASK_LOG_LENGTH]


# --------------------------------------------------------------------------
# cancellation through a served deployment (the UI's Cancel)
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(prefect_server, tmp_path_factory):
    script = ("from flows.multimodal import multimodal_flow; from flows.aerial import aerial_flow; "
              "from prefect import serve; "
              "serve(multimodal_flow.to_deployment(name='rt-cancel'), aerial_flow.to_deployment(name='rt-cancel'))")
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = start_logged(["-c", script], log, _env())

    def deployed():
        from prefect.exceptions import ObjectNotFound

        try:
            with _client() as c:
                c.read_deployment_by_name("aerial/rt-cancel")
            return True
        except ObjectNotFound:
            return False

    _wait(deployed, 180, "the served deployments")
    yield proc, log
    stop_group(proc, signal.SIGTERM, timeout=30)


def _cancel_mid_run(served, deployment: str, params: dict, n_done: int):
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    proc, log = served
    fr = run_deployment(deployment, parameters=params, timeout=0)
    _wait(lambda: len([t for t in _task_runs(fr.id) if t.state is not None and t.state.type == StateType.COMPLETED]) >= n_done, 600,
          f"{n_done} completed tasks")
    running = _flow_run(fr.id)
    assert running.state.type == StateType.RUNNING
    before = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    assert len(before) >= 2  # the flow process and its Dask workers
    with _client() as c:
        c.set_flow_run_state(fr.id, Cancelling(), force=True)
    final = _wait(lambda: (r := _flow_run(fr.id)).state.is_final() and r, 120, "the run to be cancelled")
    assert final.state.type == StateType.CANCELLED, final.state

    def gone():
        return not [p for p in before if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    _wait(gone, 60, "the flow process and its Dask workers to exit")
    stuck = [t.name for t in _task_runs(fr.id) if t.state is None or t.state.type in (StateType.RUNNING, StateType.PENDING)]
    assert not stuck, stuck
    # cancelled work is Cancelled, not Crashed (no worker died)
    crashed = [(t.name, t.state.message) for t in _task_runs(fr.id) if t.state.type == StateType.CRASHED]
    assert not crashed, crashed
    return fr, log


def test_cancel_multimodal_then_rerun(tmp_path, served):
    from flows.multimodal import multimodal_flow
    from tasks.common.atomic import remove_partials
    from tasks.multimodal.config import MultimodalConfig

    params = smoke(tmp_path, n_tiles=40, source_options={"latency_s": 0.3})
    start = served[1].stat().st_size
    _cancel_mid_run(served, "multimodal/rt-cancel", params, n_done=3)
    with open(served[1], "rb") as fh:
        fh.seek(start)
        text = fh.read().decode(errors="replace")
    assert "Finished in state Running()" not in text and "Finished: cancelled" in text, text[-3000:]
    out = tmp_path / "data_rt"
    assert not (out / "data_rt.h5").exists()
    problems = out / "report_problems.jsonl"  # a cancellation is no tile's problem
    assert not problems.exists() or "Cancelled" not in problems.read_text(), problems.read_text()[:2000]
    result = multimodal_flow(config=MultimodalConfig(**params["config"]))
    assert result["counts"]["stacks done"] + result["counts"]["no data"] == 40
    assert 0 < result["counts"]["fetched this run"] < 40
    assert remove_partials(out / "tiles") == 0
    from tests.dataset_checks import check_dataset

    check_dataset(out, "data_rt", result["counts"]["rows in h5"])


def test_cancel_aerial_cleanly(tmp_path, served):
    """pycolmap's SIGTERM handler no longer turns the cancellation into an abort with a stack trace."""
    proc, log = served
    start = log.stat().st_size
    params = {"config": {"root": str(tmp_path / "aerial"), "synthetic": True, "dask": {"n_workers": 2},
                         "image_batch": 2, "world_options": {"n_aerial": 16, "n_ground": 3, "size": [320, 240]}}}
    _cancel_mid_run(served, "aerial/rt-cancel", params, n_done=3)
    with open(log, "rb") as fh:
        fh.seek(start)
        text = fh.read().decode(errors="replace")
    assert "*** SIGTERM" not in text and "leaked semaphore" not in text and "Aborted" not in text, text[-3000:]
