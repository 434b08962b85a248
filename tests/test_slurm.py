"""The flows on a real SLURM cluster: Debian's slurm-wlm 22.05 and munge, one node on loopback
started by :mod:`deployments.slurm_local` (its GPU a declared generic resource), the Dask workers
submitted as SLURM jobs by :class:`tasks.common.slurm.SLURMCluster` (one CPU job or two, one GPU
job). Skips, saying why, where slurm-wlm or munge is not installed (`.ci/run` installs them)."""

from __future__ import annotations

import contextvars
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from deployments.slurm_local import MARK, missing_programs
from tasks.common.runtime import PROJECT_ROOT
from tests.processes import start_logged, stop_group, wait_for_line
from tests.test_runtime_runs import _apply, _client, _flow_run, _h5_digest, _logs, _task_runs, _wait, smoke

pytestmark = [pytest.mark.usefixtures("prefect_server"),
              pytest.mark.skipif(bool(missing_programs()), reason=f"SLURM not installed ({', '.join(missing_programs())} "
                                 "missing): apt-get install -y slurm-wlm munge (.ci/run does, as root)")]

PRELOAD = str(PROJECT_ROOT / "tests" / "dask_worker_preload.py")
CLUSTER = "tasks.common.slurm.SLURMCluster"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    from deployments.slurm_local import local_slurm

    with local_slurm() as cluster:
        yield cluster


@pytest.fixture
def records(tmp_path, monkeypatch):
    """Where the worker jobs' preload records the tasks they run (sbatch passes the environment on,
    so the jobs import this worktree and reach the session's Prefect server)."""
    rec = tmp_path / "records"
    rec.mkdir()
    monkeypatch.setenv("FACTORY_TEST_RECORD_DIR", str(rec))
    monkeypatch.setenv("PYTHONPATH", str(PROJECT_ROOT))
    return rec


def slurm_dask(tmp: Path, n_workers: int = 1, gpu_jobs: int = 1, start_timeout: float = 180, **extra) -> dict:
    """``dask`` settings: worker jobs of one core and 3 GB each on the test cluster."""
    kw = {"cores": 1, "processes": 1, "memory": "3GB", "walltime": "00:30:00", "interface": "lo",
          "n_workers": n_workers, "gpu_jobs": gpu_jobs, "start_timeout": start_timeout,
          "log_directory": str(tmp / "slurm-logs"),
          # the scheduler's HTTP server on loopback, a free port (Dask's default: every interface, 8787)
          "scheduler_options": {"dashboard": False, "dashboard_address": "127.0.0.1:0"},
          "worker_extra_args": ["--preload", PRELOAD],
          "gpu_job_kwargs": {"job_script_prologue": ["export FACTORY_TEST_GPU_STANDIN=1"]}}
    kw.update(extra)
    return {"cluster_class": CLUSTER, "cluster_kwargs": kw}


def _records(rec: Path) -> dict[str, list[dict]]:
    return {f.stem: [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
            for f in rec.glob("*.jsonl") if f.stem != "gpu-standin"}


def _new_jobs(slurm, before: set[str]) -> list[dict]:
    return [j for j in slurm.finished_jobs() if j["JobId"] not in before]


def _job_ids(slurm) -> set[str]:
    return {j["JobId"] for j in slurm.finished_jobs()}


def _jobs_cancelled_by_the_flow(slurm, before: set[str]) -> list[dict]:
    """The jobs started since ``before``, once SLURM lists none (a cancelled job is COMPLETING for
    a few seconds: KillWait=5); each ended CANCELLED, i.e. the cluster cancelled it, none ran out."""
    _wait(lambda: slurm.squeue() == [], 60, "SLURM to list no job")
    jobs = _wait(lambda: _new_jobs(slurm, before), 30, "the jobs in jobcomp.log")
    assert all(j["JobState"] == "CANCELLED" for j in jobs), jobs
    return jobs


def _marked_processes(folder: Path) -> list[int]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get(MARK) == str(folder):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


# --------------------------------------------------------------------------
# the cluster itself, as a user starts it
# --------------------------------------------------------------------------
def test_documented_script_starts_a_gpu_node_and_stops_everything(tmp_path):
    log = tmp_path / "slurm_local.log"
    proc = start_logged(["-m", "deployments.slurm_local"], log, dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))
    try:
        wait_for_line(proc, log, "export SLURM_CONF=", timeout=120)
        conf = next(x for x in log.read_text().splitlines() if x.startswith("export SLURM_CONF=")).split("=", 1)[1]
        env = dict(os.environ, SLURM_CONF=conf)
        sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T %G"], env=env, capture_output=True, text=True)
        assert sinfo.stdout.split() == ["factory1", "idle", "gpu:1"], sinfo
        out = tmp_path / "job.out"
        sub = subprocess.run(["sbatch", "--parsable", "--gres=gpu:1", "-o", str(out), "--wrap", "echo gpu-job-ran"],
                             env=env, capture_output=True, text=True)
        assert sub.returncode == 0, sub.stderr
        _wait(lambda: out.exists() and "gpu-job-ran" in out.read_text(), 60, "the GPU job's output")
        two = subprocess.run(["sbatch", "--gres=gpu:2", "--wrap", "true"], env=env, capture_output=True, text=True)
        assert two.returncode != 0 and "Requested node configuration is not available" in two.stderr
        folder = Path(conf).parent
        assert _marked_processes(folder)  # munged, slurmctld, slurmd
    finally:
        stop_group(proc, signal.SIGINT, timeout=60)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert "SLURM stopped" in log.read_text()
    assert not _marked_processes(folder), "daemons left running"
    assert not folder.exists()


# --------------------------------------------------------------------------
# the flows' workers as SLURM jobs
# --------------------------------------------------------------------------
def test_aerial_smoke_on_slurm_gpu_tasks_only_on_the_gpu_job(tmp_path, slurm, records):
    from flows.aerial import aerial_flow
    from tasks.aerial.config import get_config

    before = _job_ids(slurm)
    # the smoke configuration on the tests' smaller world (as test_runtime_runs' external cluster):
    # the smoke world's GPU stand-in (CPU PatchMatch of every image in one task on one core) ran
    # past 9 minutes on the busy 2-core machine
    cfg = get_config("smoke", root=str(tmp_path / "aerial"), synthetic=True, dask=slurm_dask(tmp_path),
                     world_options={"n_aerial": 16, "n_ground": 3, "size": [320, 240]})
    result = aerial_flow(config=cfg)
    jobs = _jobs_cancelled_by_the_flow(slurm, before)
    assert sorted(j["Name"] for j in jobs) == ["dask-worker", "dask-worker-gpu"]
    recs = _records(records)
    gpu_tasks = [r for rs in recs.values() for r in rs if r["resources"].get("GPU")]
    assert result["dense_backend"] == "gpu" and gpu_tasks
    assert all(r in recs["SLURMCluster-gpu-0"] for r in gpu_tasks)
    assert recs.get("SLURMCluster-0") and not [r for r in recs["SLURMCluster-0"] if r["resources"].get("GPU")]
    assert (records / "gpu-standin.jsonl").exists()  # no CUDA here: the stand-in ran on the GPU job
    assert result["scenes"]["0001"]["counts"]["depth maps"] >= 1


def test_scancelled_worker_job_costs_a_retry_not_data(tmp_path, slurm, records):
    """A worker job cancelled by SLURM mid-task: its task runs again on the other job and the
    output equals an undisturbed run's."""
    from distributed import Client

    from flows.multimodal import multimodal_flow
    from tasks.multimodal.config import MultimodalConfig

    def cfg(sub, dask):
        return MultimodalConfig(**smoke(tmp_path / sub, n_tiles=12, source_options={"latency_s": 0.3},
                                        dask=dask)["config"])

    ref = multimodal_flow(config=cfg("ref", {"n_workers": 1, "dashboard_address": ""}))
    box: dict = {}
    ctx = contextvars.copy_context()
    t = threading.Thread(target=lambda: box.setdefault("r", ctx.run(
        multimodal_flow, config=cfg("hit", slurm_dask(tmp_path, n_workers=2, gpu_jobs=0)))))
    t.start()

    def busy_job():
        """The SLURM job of the worker that started a task last (the preload's records), once
        both worker jobs run."""
        if len([j for j in slurm.squeue() if j["state"] == "RUNNING"]) < 2:
            return None
        recs = [r for rs in _records(records).values() for r in rs]
        return max(recs, key=lambda r: r["t"])["slurm_job"] if recs else None

    victim = _wait(busy_job, 300, "two running worker jobs that run tasks", step=0.1)
    slurm.run("scancel", victim)
    t.join(timeout=600)
    assert not t.is_alive()
    assert "r" in box, "the run failed (see the log above)"
    result = box["r"]
    killed = next(j for j in slurm.finished_jobs() if j["JobId"] == victim)
    assert killed["JobState"] == "CANCELLED", killed
    assert result["counts"] == ref["counts"]
    assert _h5_digest(tmp_path / "hit" / "data_rt") == _h5_digest(tmp_path / "ref" / "data_rt")
    for name in ("data_rt_tile_info.json", "data_rt_band_stats.json", "data_rt_splits.json"):
        a, b = tmp_path / "hit" / "data_rt" / name, tmp_path / "ref" / "data_rt" / name
        if b.exists():
            assert a.read_bytes() == b.read_bytes(), name
    _wait(lambda: slurm.squeue() == [], 60, "SLURM to list no job")


def test_jobs_slurm_never_starts_are_reported_within_start_timeout(tmp_path, slurm, records):
    from flows.multimodal import multimodal_flow
    from tasks.common.slurm import JobsNotStarted
    from tasks.multimodal.config import MultimodalConfig

    slurm.run("scontrol", "update", "nodename=factory1", "state=drain", "reason=test-drained")
    try:
        t0 = time.monotonic()
        with pytest.raises(JobsNotStarted) as err:
            multimodal_flow(config=MultimodalConfig(**smoke(tmp_path, dask=slurm_dask(tmp_path, start_timeout=15))["config"]))
        took = time.monotonic() - t0
    finally:
        slurm.run("scontrol", "update", "nodename=factory1", "state=resume")
    msg = str(err.value)
    assert "within start_timeout=15 s" in msg and "0 worker(s) connected" in msg
    assert "GPU worker SLURMCluster-gpu-0: SLURM job" in msg and "CPU worker SLURMCluster-0: SLURM job" in msg
    assert "PENDING (reason: ReqNodeNotAvail" in msg or "PENDING (reason: Nodes required" in msg, msg
    assert took < 15 + 60, took  # reported, not hung (flow start and cleanup included)
    _wait(lambda: slurm.squeue() == [], 60, "the pending jobs to be cancelled")
    assert not (tmp_path / "data_rt" / "data_rt.h5").exists()


def test_job_slurm_rejects_is_reported_at_once(tmp_path, slurm, records):
    """A GPU job asking for 2 GPUs of a 1-GPU node: sbatch refuses it; reported at once, in SLURM's words."""
    from tasks.common.slurm import JobsNotStarted, SLURMCluster

    kw = slurm_dask(tmp_path, gpu_job_kwargs={"job_extra_directives": ["--gres=gpu:2"]})["cluster_kwargs"]
    t0 = time.monotonic()
    with pytest.raises(JobsNotStarted) as err:
        SLURMCluster(**kw)
    took = time.monotonic() - t0
    msg = str(err.value)
    assert msg.startswith("SLURM rejected the Dask worker jobs")
    assert "GPU worker SLURMCluster-gpu-0: not submitted (sbatch failed: " in msg
    assert "Requested node configuration is not available" in msg
    assert "The GPU worker job script SLURM rejected:" in msg and "#SBATCH --gres=gpu:2" in msg
    assert took < kw["start_timeout"] / 2, took  # not left to the timeout
    _wait(lambda: slurm.squeue() == [], 60, "the CPU job to be cancelled")


def test_import_keeps_ctrl_c_and_works_in_a_thread():
    """dask-jobqueue 0.9.0 sets SIGINT to sys.exit when imported (dask_jobqueue/runner.py): the
    flow process keeps its KeyboardInterrupt, and the import works outside the main thread."""
    code = ("import signal, threading\n"
            "box = {}\n"
            "t = threading.Thread(target=lambda: box.setdefault('ok', __import__('tasks.common.slurm').common.slurm))\n"
            "t.start(); t.join()\n"
            "assert 'ok' in box, 'import failed in a thread'\n"
            "import tasks.common.slurm\n"
            "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, signal.getsignal(signal.SIGINT)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))
    assert r.returncode == 0, r.stderr[-2000:]


def test_print_job_script(tmp_path):
    """The job scripts a user's settings produce, printed without submitting anything."""
    kw = {"queue": "gpu-long", "account": "geo", "walltime": "04:00:00", "cores": 8, "memory": "32GB",
          "gpu_jobs": 1, "gpu_job_kwargs": {"queue": "gpu"}}
    r = subprocess.run([sys.executable, "-m", "tasks.common.slurm", "--print-job-script",
                        "--cluster-kwargs", json.dumps(kw)], cwd=PROJECT_ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)), timeout=120)
    assert r.returncode == 0, r.stderr
    cpu, gpu = r.stdout.split("# GPU worker job")
    assert "#SBATCH -p gpu-long" in cpu and "#SBATCH -A geo" in cpu and "#SBATCH -t 04:00:00" in cpu
    assert "--gres" not in cpu and "--resources" not in cpu
    assert "#SBATCH -p gpu\n" in gpu and "#SBATCH --gres=gpu:1" in gpu and "--resources GPU=1" in gpu
    assert "sbatch" not in r.stderr


# --------------------------------------------------------------------------
# the user's path: a prefect.yaml deployment run by `prefect worker`, then cancelled
# --------------------------------------------------------------------------
def test_prefect_yaml_deployment_on_slurm_by_a_worker_then_cancelled(tmp_path, slurm, records, prefect_server):
    """prefect.yaml's multimodal deployment (its entrypoint and job variables) with a saved
    DaskCluster block of SLURM worker jobs, run by a `prefect worker` process: a run of the smoke
    configuration completes with its workers as SLURM jobs (a CPU job and a GPU job), cancelled
    when it ends; a second run cancelled mid-run (the UI's Cancel) leaves no job."""
    import yaml
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    from blocks.dask_cluster import DaskCluster
    from deployments.deploy import deploy
    from deployments.spec import load_specs
    from tasks.multimodal.config import CONFIGS
    from tests.dataset_checks import check_dataset
    from tests.processes import server_env

    spec = next(s for s in load_specs() if s.name == "embedded-default")
    DaskCluster(**slurm_dask(tmp_path)).save("rt-slurm", overwrite=True)
    entry = {"name": "rt-slurm", "entrypoint": spec.entrypoint,
             "parameters": {"config": {**CONFIGS["smoke"], "output_dir": str(tmp_path / "done"),
                                       "dask_block": "rt-slurm"}},
             "work_pool": {"name": "rt-slurm-pool", "job_variables": spec.work_pool["job_variables"]}}
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump({"name": "rt-slurm", "deployments": [entry]}))
    assert deploy(path) == ["rt-slurm"]
    log = tmp_path / "worker.log"
    proc = start_logged(["-m", "prefect", "worker", "start", "--pool", "rt-slurm-pool", "--name", "slurm-worker"],
                        log, server_env(prefect_server), cwd=tmp_path)
    try:
        before = _job_ids(slurm)
        fr = run_deployment("multimodal/rt-slurm", timeout=0)
        done = _wait(lambda: (r := _flow_run(fr.id)).state.is_final() and r, 400, "the deployment run")
        assert done.state.type == StateType.COMPLETED, (done.state, log.read_text()[-3000:])
        assert "Dask: tasks.common.slurm.SLURMCluster(" in _logs(fr.id)
        # the run's state is final a moment before its process closes the cluster
        jobs = _jobs_cancelled_by_the_flow(slurm, before)
        assert sorted(j["Name"] for j in jobs) == ["dask-worker", "dask-worker-gpu"]
        report = json.loads((tmp_path / "done" / "data_smoke" / "report.json").read_text())
        counts = report["counts"]
        assert counts["stacks done"] + counts["no data"] == CONFIGS["smoke"]["n_tiles"]
        recs = _records(records)  # the tasks ran in the SLURM jobs' workers
        assert set(recs) <= {"SLURMCluster-0", "SLURMCluster-gpu-0"} and sum(map(len, recs.values())) >= 6 + 1
        check_dataset(tmp_path / "done" / "data_smoke", "data_smoke", counts["rows in h5"])

        # cancelled mid-run
        before = _job_ids(slurm)
        params = smoke(tmp_path / "cancel", n_tiles=40, source_options={"latency_s": 0.3}, dask_block="rt-slurm")
        fr = run_deployment("multimodal/rt-slurm", parameters=params, timeout=0)
        _wait(lambda: len([j for j in slurm.squeue() if j["state"] == "RUNNING"]) == 2 and
              len([t for t in _task_runs(fr.id) if t.state is not None and t.state.type == StateType.COMPLETED]) >= 3,
              400, "two running worker jobs and 3 completed tasks")
        t0 = time.monotonic()
        with _client() as c:
            c.set_flow_run_state(fr.id, Cancelling(), force=True)
        final = _wait(lambda: (r := _flow_run(fr.id)).state.is_final() and r, 120, "the run to be cancelled")
        assert final.state.type == StateType.CANCELLED, final.state
        _jobs_cancelled_by_the_flow(slurm, before)  # not left to die with the scheduler (death-timeout 60 s)
        print(f"cancel -> squeue empty: {time.monotonic() - t0:.1f} s")
    finally:
        stop_group(proc, timeout=30)
