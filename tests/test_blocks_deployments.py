"""Blocks (saved configuration) and the scheduled deployments."""

from __future__ import annotations

import json

import pytest


@pytest.mark.usefixtures("prefect_server")
def test_earthengine_block_cli_saves_secret_key(tmp_path, capsys):
    from blocks.earthengine import EarthEngineCredentials, main

    key = {"type": "service_account", "project_id": "p", "private_key": "-----BEGIN PRIVATE KEY-----\nabc\n",
           "client_email": "sa@p.iam.gserviceaccount.com", "token_uri": "http://127.0.0.1:9/token"}
    path = tmp_path / "key.json"
    path.write_text(json.dumps(key))
    assert main(["--name", "ee-cli", "--project", "my-proj", "--key", str(path)]) == 0
    out = capsys.readouterr().out
    assert "abc" not in out and "ee-cli" in out
    block = EarthEngineCredentials.load("ee-cli")
    assert block.project == "my-proj" and block.key_info() == key
    assert "abc" not in repr(block)


@pytest.mark.usefixtures("prefect_server")
def test_earthengine_block_rejects_non_json_key():
    from blocks.earthengine import EarthEngineCredentials

    with pytest.raises(ValueError, match="not JSON"):
        EarthEngineCredentials(project="p", service_account_key="not json").key_info()


@pytest.mark.usefixtures("prefect_server")
def test_dask_cluster_block_drives_the_task_runner():
    from blocks import DaskCluster
    from tasks.common.runtime import make_task_runner
    from tasks.multimodal.config import MultimodalConfig

    DaskCluster(n_workers=3, threads_per_worker=2).save("three", overwrite=True)
    cfg = MultimodalConfig(dask_block="three")
    runner = make_task_runner(cfg.dask_settings())
    assert runner.cluster_kwargs["n_workers"] == 3 and runner.cluster_kwargs["threads_per_worker"] == 2


def test_deployments_are_built_with_valid_parameters():
    from deployments.serve import build_deployments
    from tasks.multimodal.config import MultimodalConfig

    deps = {d.name: d for d in build_deployments()}
    assert {"embedded-default", "earthengine", "mmearth64-embedded"} <= set(deps)
    assert deps["embedded-default"].schedules and deps["embedded-default"].schedules[0].schedule.cron == "0 3 * * 1"
    from flows.aerial import AerialConfig

    assert {"aerial-demo", "aerial-scenes"} <= set(deps)
    for d in deps.values():  # the stored parameters validate
        (AerialConfig if d.flow_name == "aerial" else MultimodalConfig)(**d.parameters["config"])
    assert deps["aerial-scenes"].parameters["config"]["synthetic"] is False
    assert deps["earthengine"].parameters["config"]["source_options"] == {"credentials_block": "ee"}
