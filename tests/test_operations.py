"""Used as operators use it: blocks registered, prefect.yaml deployed to a work pool,
a real `prefect worker start` process running the demo deployments triggered through
the API, an interval schedule firing by itself, and the CLI's list commands.

Everything runs against the session's loopback server (tests/conftest.py); the
runs write into temporary folders only (the demos' parameters are overridden with
smoke sizes, as an operator's Custom run would).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.processes import ROOT, server_env, start_logged, stop_group

POOL = "geodata-process"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _env(server) -> dict[str, str]:
    return server_env(server, PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_WORKER_PREFETCH_SECONDS="5",
                      COLUMNS="200")  # the CLI's tables truncate names at 80


def prefect_cli(server, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "prefect", *args], env=_env(server), cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    if check and res.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def smoke_multimodal(out: Path, name: str = "data_demo_api", n_tiles: int = 8) -> dict:
    return {"name": name, "output_dir": str(out), "n_tiles": n_tiles, "fetch_batch_size": 4, "part_size": 4}


def smoke_aerial(root: Path) -> dict:
    # the smallest world that registers (as tests/test_aerial_flow.py); the CPU PatchMatch at 240 px
    return {"root": str(root), "synthetic": True,
            "world_options": {"n_aerial": 24, "n_ground": 5, "size": [480, 360]},
            "image_batch": 2, "pipeline_options": {"dense": {"batch": 8, "patchmatch": {"max_image_size": 240}}}}


def wait_for_runs(ids, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> dict:
    from prefect import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = {i: client.read_flow_run(i) for i in ids}
            if all(r.state and r.state.type.value in TERMINAL for r in runs.values()):
                return runs
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"worker exited with {proc.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                states = {str(i): r.state.name if r.state else None for i, r in runs.items()}
                raise AssertionError(f"runs not finished after {timeout:.0f}s: {states}\n{_tail(log)}")
            time.sleep(2)


def _tail(log: Path | None, n: int = 6000) -> str:
    return log.read_text(errors="replace")[-n:] if log and log.exists() else ""


def artifact_keys(flow_run_id) -> set[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {a.key for a in arts if a.key}


@pytest.fixture(scope="module")
def worker(prefect_server, tmp_path_factory):
    """`prefect worker start --pool geodata-process` as its own process (stopped at the end)."""
    from deployments.deploy import deploy

    log = tmp_path_factory.mktemp("worker") / "worker.log"
    deploy()  # the project's prefect.yaml: blocks, work pool, `prefect deploy --all`
    proc = start_logged(["-m", "prefect", "worker", "start", "--pool", POOL, "--name", "test-worker"], log,
                        _env(prefect_server), cwd=log.parent)
    try:
        yield proc, log
    finally:
        stop_group(proc, timeout=30)


def test_blocks_registered_by_the_documented_command(prefect_server):
    from prefect import get_client

    from blocks import register_blocks

    res = prefect_cli(prefect_server, "block", "register", "-m", "blocks")
    assert "Dask Cluster" in res.stdout and "Earth Engine Credentials" in res.stdout
    assert register_blocks() == ["dask-cluster", "earth-engine-credentials"]  # again: idempotent
    with get_client(sync_client=True) as client:
        for slug in ("dask-cluster", "earth-engine-credentials"):
            schema = client.get_most_recent_block_schema_for_block_type(
                client.read_block_type_by_slug(slug).id)
            assert schema is not None and schema.fields["properties"]


@pytest.mark.timeout(1800)  # two flow runs in worker subprocesses; ~3 min on 2 idle cores
def test_worker_runs_both_demos_triggered_through_the_api(prefect_server, worker, tmp_path):
    from prefect import get_client
    from prefect.deployments import run_deployment

    proc, log = worker
    with get_client(sync_client=True) as client:
        for name, flow in (("embedded-default", "multimodal"), ("aerial-demo", "aerial")):
            dep = client.read_deployment_by_name(f"{flow}/{name}")
            assert dep.entrypoint == f"flows.{flow}.{flow}_flow"  # module paths (Dask workers import them)
            assert dep.work_pool_name == POOL and dep.schedules and dep.schedules[0].schedule.timezone == "UTC"
            assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                       {"directory": str(ROOT)}}]
    mm = run_deployment("multimodal/embedded-default", timeout=0,
                        parameters={"config": smoke_multimodal(tmp_path / "mm")})
    ae = run_deployment("aerial/aerial-demo", timeout=0, parameters={"config": smoke_aerial(tmp_path / "aerial")})
    runs = wait_for_runs([mm.id, ae.id], timeout=1700, proc=proc, log=log)
    for r in runs.values():
        assert r.state.type.value == "COMPLETED", f"{r.name}: {r.state.name} {r.state.message}\n{_tail(log)}"
        assert r.work_pool_name == POOL
    # the multimodal demo's dataset and report
    out = tmp_path / "mm" / "data_demo_api"
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["rows in h5"] == 8 and (out / "data_demo_api.h5").stat().st_size > 0
    assert {"data-demo-api-report", "data-demo-api-counts"} <= artifact_keys(mm.id)
    # the aerial demo's product and accuracy
    scene = tmp_path / "aerial" / "data" / "0001"
    assert (scene / "accuracy.json").exists() and (scene / "overview.png").exists()
    product = scene / "sfm_output_localization" / "sfm_sift+mnn" / "localized_dense_metric"
    assert any((product / "depths").glob("*.h5")) and (product / "sparse-txt" / "images.txt").exists()
    assert {"aerial-0001-report", "aerial-0001-accuracy"} <= artifact_keys(ae.id)


@pytest.mark.timeout(900)
def test_interval_schedule_fires_without_anyone_triggering(prefect_server, worker, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, \
        FlowRunFilterState, FlowRunFilterStateType

    from deployments.deploy import deploy

    proc, log = worker
    spec = {"name": "schedule-smoke", "entrypoint": "flows.multimodal.multimodal_flow",
            "parameters": {"config": smoke_multimodal(tmp_path, "data_sched", n_tiles=4)},
            "schedules": [{"interval": 15, "timezone": "Europe/Zurich"}],
            "concurrency_limit": {"limit": 1, "collision_strategy": "ENQUEUE"},
            "work_pool": {"name": POOL, "job_variables": {"env": {"FACTORY_TEST": "1"}}}}
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump({"name": "sched-test", "deployments": [spec]}))
    t0 = time.monotonic()
    deploy(path)
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("multimodal/schedule-smoke")
        assert dep.schedules[0].schedule.timezone == "Europe/Zurich"
        only = dict(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
        try:
            while True:
                done = client.read_flow_runs(**only, flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["COMPLETED"]))))
                if len(done) >= 2:
                    break
                bad = client.read_flow_runs(**only, flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["FAILED", "CRASHED"]))))
                assert not bad, f"{bad[0].state.name}: {bad[0].state.message}\n{_tail(log)}"
                assert proc.poll() is None, _tail(log)
                assert time.monotonic() - t0 < 600, f"no two completed scheduled runs in 600 s\n{_tail(log)}"
                time.sleep(3)
        finally:
            client.pause_deployment(dep.id)
    assert all(r.auto_scheduled for r in done)  # created by the scheduler, not by a trigger
    assert (tmp_path / "data_sched" / "data_sched.h5").exists()


def test_cli_lists_deployments_and_runs(prefect_server, worker):
    deps = prefect_cli(prefect_server, "deployment", "ls").stdout
    assert "embedded-default" in deps and "aerial-demo" in deps
    prefect_cli(prefect_server, "flow-run", "ls")
    assert POOL in prefect_cli(prefect_server, "work-pool", "ls").stdout


def test_prefect_yaml_matches_the_presets():
    """The deployments' stored parameters validate, and those named after a preset are that preset."""
    from deployments.spec import load_specs, to_runner_deployment
    from flows.aerial import AerialConfig
    from tasks.multimodal.config import MultimodalConfig, get_config

    specs = {s.name: s for s in load_specs()}
    assert {"embedded-default", "mmearth64-embedded", "earthengine", "aerial-demo", "aerial-scenes"} <= set(specs)
    cfg = {n: (AerialConfig if "aerial" in s.entrypoint else MultimodalConfig)(**s.parameters["config"])
           for n, s in specs.items()}
    assert cfg["embedded-default"] == get_config("default")
    assert cfg["mmearth64-embedded"] == get_config("mmearth64")
    assert cfg["earthengine"] == get_config("earthengine", source_options={"credentials_block": "ee"})
    assert cfg["aerial-demo"] == AerialConfig() and cfg["aerial-scenes"].synthetic is False
    for s in specs.values():
        assert s.work_pool["name"] == POOL
        assert all(sch.get("timezone") for sch in s.schedules)
    served = to_runner_deployment(specs["embedded-default"])
    assert served.schedules[0].schedule.cron == "0 3 * * 1" and served.schedules[0].schedule.timezone == "UTC"
    assert served.concurrency_limit == 1


def test_forms_have_named_choices_and_descriptions():
    """What the UI's form renders: choices by name, a description on every field."""
    from prefect.utilities.callables import parameter_schema

    from flows.aerial import AerialConfig, aerial_flow
    from flows.multimodal import multimodal_flow
    from tasks.aerial.pipeline import PIPELINES
    from tasks.multimodal.config import MultimodalConfig

    for flow_ in (multimodal_flow, aerial_flow):
        schema = parameter_schema(flow_).model_dump()
        defs = schema["definitions"]
        for model, props in ((m, d["properties"]) for m, d in defs.items()):
            undescribed = [k for k, v in props.items() if not v.get("description")]
            assert not undescribed, f"{flow_.name}: {model} fields without a description: {undescribed}"
    mm = MultimodalConfig.model_json_schema()["properties"]
    assert mm["sampling_mode"]["enum"] == ["biome-area", "biome-equal", "ecoregion-equal"]
    assert mm["sampling_mode"]["default"] == "biome-area"  # a name, never the falsy 0 that rendered empty
    assert MultimodalConfig(sampling_mode=2).sampling_mode == "ecoregion-equal"
    assert MultimodalConfig(sampling_mode="biome-equal").sampling_mode_index == 1
    with pytest.raises(ValueError, match="sampling_mode"):
        MultimodalConfig(sampling_mode=3)
    ae = AerialConfig.model_json_schema()["properties"]
    assert ae["pipeline"]["enum"] == list(PIPELINES) == ["sift+mnn", "superpoint+superglue", "aliked+lightglue"]
    dense = AerialConfig.model_json_schema()["$defs"]["DenseOptions"]["properties"]
    assert dense["backend"]["anyOf"][0]["enum"] == ["auto", "cpu", "gpu"]


def test_dense_backend_choice_reaches_the_pipeline():
    from flows.aerial import AerialConfig, parse_args, pipeline_settings

    assert pipeline_settings(AerialConfig()).dense.backend == "auto"
    assert pipeline_settings(parse_args(["--dense-backend", "cpu"])).dense.backend == "cpu"
    cfg = pipeline_settings(AerialConfig(pipeline_options={"dense": {"backend": "gpu", "num_sources": 6}}))
    assert cfg.dense.backend == "gpu" and cfg.dense.num_sources == 6
    assert pipeline_settings(AerialConfig(pipeline_options={"dense": {"backend": "cpu"}})).dense.backend == "cpu"
    with pytest.raises(ValueError, match="dense.backend"):
        AerialConfig(pipeline_options={"dense": {"backend": "tpu"}})


def test_local_server_ui_points_at_its_own_api(prefect_server):
    """The UI asks /ui-settings where the API is; on a free port (not 4200) it must say that port."""
    import httpx

    assert not prefect_server.url.startswith("http://127.0.0.1:4200/")
    settings = httpx.get(f"{prefect_server.ui_url}/ui-settings", timeout=30).json()
    assert settings["api_url"] == prefect_server.url
