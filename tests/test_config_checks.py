"""Settings and inputs are checked before any server or cluster starts: one message, no
traceback, a non-zero exit; unknown keys name the nearest valid key."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tasks.common.cli import EXIT_CONFIG, ConfigError
from tasks.common.runtime import PROJECT_ROOT


@pytest.fixture
def no_server(monkeypatch):
    """Fail the test if a flow's main() gets as far as starting a server."""
    import tasks.common.runtime

    def boom(*a, **k):
        raise AssertionError("a server was started before the configuration was checked")

    monkeypatch.setattr(tasks.common.runtime, "local_prefect_server", boom)


def _main(module, argv, capsys):
    rc = module.main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("argv, expected", [
    (["--set", "n_tile=5"], "n_tile: unknown setting; did you mean 'n_tiles'?"),
    (["--set", "dask.n_worker=2"], "dask.n_worker: unknown setting; did you mean 'dask.n_workers'?"),
    (["--set", "split_fractions=[0.8,0.1,0.2]"], "sum to 1 (they sum to 1.1)"),
    (["--set", "image_size=256"], "image_size 256 px does not fit a tile of 1300 m (130 px"),
    (["--set", "tile_size_m=500", "--set", "image_size=64"], "image_size 64 px does not fit a tile of 500 m"),
    (["--set", "tile_sampler=earthengine"], "tile_sampler=earthengine needs source=earthengine"),
    (["--set", "fetch_slots=50"], "fetch_slots 50 exceeds request_ceiling 40"),
    (["--set", "name=dataset1"], "name"),
    (["--set", "dask.address=127.0.0.1:8786"], "needs a protocol"),
    (["--set", "n_tiles"], "--set expects KEY=VALUE"),
])
def test_multimodal_settings_mistakes(argv, expected, capsys, no_server):
    import flows.multimodal

    rc, err = _main(flows.multimodal, argv, capsys)
    assert rc == EXIT_CONFIG
    assert expected in err and err.startswith("error: ") and "\n" not in err


def test_multimodal_input_files_checked_early(tmp_path, capsys, no_server):
    import flows.multimodal

    bad = tmp_path / "regions.geojson"
    bad.write_text('{"type": "FeatureCollection", "features": [')
    rc, err = _main(flows.multimodal, ["--set", f"regions={bad}"], capsys)
    assert rc == EXIT_CONFIG and str(bad) in err and "not valid JSON at line 1" in err
    rc, err = _main(flows.multimodal, ["--set", f"eco_labels={tmp_path / 'missing.json'}"], capsys)
    assert rc == EXIT_CONFIG and "missing.json: ecoregion index mapping file not found" in err
    tiles = tmp_path / "tiles.geojson"
    tiles.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": None,
                                                                             "properties": {}}]}))
    rc, err = _main(flows.multimodal, ["--set", f"tiles_geojson={tiles}"], capsys)
    assert rc == EXIT_CONFIG and str(tiles) in err and "feature 0" in err


def test_aerial_settings_and_inputs_checked_early(tmp_path, capsys, no_server):
    import flows.aerial

    rc, err = _main(flows.aerial, ["--set", "dense_bach=2"], capsys)
    assert rc == EXIT_CONFIG and "did you mean 'dense_batch'?" in err
    rc, err = _main(flows.aerial, ["--set", 'pipeline_options={"retrieval_nm": 3}'], capsys)
    # pipeline_options is a typed form: an unknown key names the nearest one, at any depth
    assert rc == EXIT_CONFIG and "did you mean 'pipeline_options.retrieval_num'?" in err
    rc, err = _main(flows.aerial, ["--set", "pipeline_options.dense.cpu_methd=patchmatch"], capsys)
    assert rc == EXIT_CONFIG and "did you mean 'pipeline_options.dense.cpu_method'?" in err
    rc, err = _main(flows.aerial, ["--set", "pipeline_options.dense.cpu_method=pm"], capsys)
    assert rc == EXIT_CONFIG and "pipeline_options.dense.cpu_method: Input should be 'sgbm' or 'patchmatch'" in err
    rc, err = _main(flows.aerial, ["--set", "exports.covisibility.rel_tolerence=0.2"], capsys)
    assert rc == EXIT_CONFIG and "did you mean 'exports.covisibility.rel_tolerance'?" in err
    rc, err = _main(flows.aerial, ["--trajectory", "spiarl"], capsys)
    assert rc == EXIT_CONFIG and "trajectory: Input should be" in err and "'spiral'" in err
    rc, err = _main(flows.aerial, ["--plan-only"], capsys)
    assert rc == EXIT_CONFIG and "plan_only needs places" in err
    rc, err = _main(flows.aerial, ["--config", "smoke", "--set", "world_options.n_aerial=30", "--root",
                                   str(tmp_path / "none"), "--no-synthetic"], capsys)
    assert rc == EXIT_CONFIG and "no downloaded_data/ folder" in err  # named config, flags, --set together
    rc, err = _main(flows.aerial, ["--pipeline", "sift+nn"], capsys)
    # the pipeline is a choice of the form: the message names the field and the valid names
    assert rc == EXIT_CONFIG and "pipeline: Input should be 'sift+mnn' or 'superpoint+superglue'" in err
    assert "(got 'sift+nn')" in err
    rc, err = _main(flows.aerial, ["--root", str(tmp_path / "none"), "--no-synthetic"], capsys)
    assert rc == EXIT_CONFIG and "no downloaded_data/ folder" in err
    root = tmp_path / "root"
    (root / "downloaded_data").mkdir(parents=True)
    (root / "downloaded_data" / "0001.json").write_text("{}")
    rc, err = _main(flows.aerial, ["--root", str(root), "--scenes", "0002"], capsys)
    assert rc == EXIT_CONFIG and "scenes ['0002'] have no Earth Studio export" in err
    bad_list = tmp_path / "list.json"
    bad_list.write_text("[{]")
    rc, err = _main(flows.aerial, ["--root", str(root), "--scene-list", str(bad_list)], capsys)
    assert rc == EXIT_CONFIG and "scene_list:" in err and str(bad_list) in err
    rc, err = _main(flows.aerial, ["--root", str(root), "--scene-list", str(tmp_path / "nope.npz")], capsys)
    assert rc == EXIT_CONFIG and "scene list not found" in err
    rc, err = _main(flows.aerial, ["--root", str(root), "--megadepth", str(tmp_path / "md")], capsys)
    assert rc == EXIT_CONFIG and "megadepth" in err and "not a folder" in err


def test_a_mistake_is_printed_once_without_traceback(tmp_path):
    """The real command: one line on stderr, exit 2, nothing started (no Prefect home created)."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT), "FACTORY_PREFECT_HOME": str(tmp_path / "ph"),
           "PREFECT_HOME": str(tmp_path / "ph2")}
    out = subprocess.run([sys.executable, "-m", "flows.multimodal", "--set", "n_tile=5"], cwd=PROJECT_ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == EXIT_CONFIG
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert lines == ["error: invalid configuration: n_tile: unknown setting; did you mean 'n_tiles'?"], out.stderr
    assert not (tmp_path / "ph").exists() and out.stdout == ""


def test_deployment_parameters_are_checked_too():
    """The same rules hold for a configuration built from stored parameters (deployments, the UI)."""
    from pydantic import ValidationError

    from tasks.multimodal.config import MultimodalConfig, get_config

    with pytest.raises(ValidationError, match="sum to 1"):
        MultimodalConfig(split_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="unknown configuration 'smok'"):
        get_config("smok")
    assert get_config("earthengine").dask.n_workers == 2
