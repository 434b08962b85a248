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
    import tasks.common.local_run

    def boom(*a, **k):
        raise AssertionError("a server was started before the configuration was checked")

    monkeypatch.setattr(tasks.common.local_run, "local_prefect_server", boom)


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

    rc, err = _main(flows.aerial, ["--set", "image_bach=2"], capsys)
    assert rc == EXIT_CONFIG and "did you mean 'image_batch'?" in err
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
    assert rc == EXIT_CONFIG and "pipeline: Input should be 'sift+mnn', 'superpoint+superglue' or 'aliked+lightglue'" in err
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


# ---------------------------------------------------------------------------------------------
# issue 26 items 7-8: one validation layer for numbers and sizes (tasks/common/checks.py)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["--set", "tile_size_m=Infinity"], "tile_size_m: Input should be a finite number"),
    (["--set", "split_fractions=[NaN, 0.1, 0.1]"], "split_fractions.0: Input should be a finite number"),
    (["--set", "fetch_retry_delay_s=NaN"], "fetch_retry_delay_s: Input should be a finite number"),
    (["--set", "n_tiles=100000000"], "n_tiles: Input should be less than or equal to 10000000"),
    (["--set", "image_size=100000"], "image_size: Input should be less than or equal to 1024"),
    (["--set", "source_options.timeout_s=Infinity"], "source_options.timeout_s is inf: must be a finite number"),
])
def test_multimodal_numbers_finite_and_bounded(argv, expected, capsys, no_server):
    import flows.multimodal

    rc, err = _main(flows.multimodal, argv, capsys)
    assert rc == EXIT_CONFIG and expected in err and "\n" not in err, err


@pytest.mark.parametrize("argv, expected", [
    (["--set", "trajectory_options.frames=100000000"], "frames is 100000000: must be in [1, 10000]"),
    (["--set", "trajectory_options.frame_rate=Infinity"], "trajectory_options.frame_rate: Input should be a "
                                                          "finite number"),
    (["--set", "trajectory_options.width=1e9"], "width is 1000000000 px: must be in [16, 3840] px"),
    (["--set", "world_options.size=[1e9, 1e9]"], "world_options: size is 1000000000.0 px: must be in [16, 3840] px"),
    (["--set", "world_options.size=[3840, 3840]", "--set", "world_options.n_aerial=1000"],
     "more than the 2,000,000,000 the renderer may hold"),
    (["--set", "world_options.n_aerial=true"], "n_aerial is True (bool), not a number"),
    (["--set", "world_options.lat0=NaN"], "lat0 is nan: must be a finite number"),
    (["--set", "world_options.trajectory_options.frames=100000000"], "frames is 100000000: must be in [1, 10000]"),
    (["--set", "world_options.n_arial=3"], "unknown setting(s) n_arial"),
    (["--set", "pipeline_options.dense.sgbm.rel_tolerance=NaN"], "pipeline_options.dense.sgbm.rel_tolerance: Input "
                                                                 "should be a finite number"),
    (["--set", "image_batch=100000000"], "image_batch: Input should be less than or equal to 10000"),
    (["--set", "pipeline_options.dense.patchmatch.max_image_size=1000000000"],
     "dense.patchmatch.max_image_size is 1000000000: must be in [16, 8192]"),
    (["--set", "pipeline_options.retrieval_num=10000000"], "pipeline.retrieval_num is 10000000: must be in [1, 1000]"),
    (["--scenes", "../../etc"], "scene id '../../etc' contains a path separator"),
])
def test_aerial_numbers_finite_and_bounded(argv, expected, capsys, no_server):
    """Before the fixes, frames=10^8 grew a worker to 10.9 GB and size=[1e9, 1e9] drew the OOM
    killer; Infinity and NaN passed or crashed late."""
    import flows.aerial

    rc, err = _main(flows.aerial, argv, capsys)
    assert rc == EXIT_CONFIG and expected in err and "\n" not in err, err


# ---------------------------------------------------------------------------------------------
# issue 27 item 4: an output folder that cannot be created is found with the other settings
# ---------------------------------------------------------------------------------------------
def test_output_folder_that_cannot_be_made_is_a_setting_error(tmp_path, capsys, no_server):
    import flows.aerial
    import flows.multimodal

    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    rc, err = _main(flows.multimodal, ["--set", f"output_dir={a_file}"], capsys)
    assert rc == EXIT_CONFIG and f"output_dir {a_file}/data_embedded_v001: cannot be used" in err
    assert f"its parent {a_file} is a file" in err and "\n" not in err
    rc, err = _main(flows.multimodal, ["--set", "output_dir=/proc/x"], capsys)
    assert rc == EXIT_CONFIG and "output_dir /proc/x/data_embedded_v001: cannot write in /proc" in err, err
    rc, err = _main(flows.aerial, ["--root", str(a_file / "aerial"), "--synthetic"], capsys)
    assert rc == EXIT_CONFIG and f"root {a_file / 'aerial'}: cannot be used" in err, err
    root = tmp_path / "root"
    (root / "downloaded_data").mkdir(parents=True)
    (root / "downloaded_data" / "0001.json").write_text("{}")
    rc, err = _main(flows.aerial, ["--root", str(root), "--set", "exports.root=/proc/x"], capsys)
    assert rc == EXIT_CONFIG and "exports.root /proc/x: cannot write in /proc" in err, err
    rc, err = _main(flows.aerial, ["--root", str(root), "--megadepth-out", str(a_file)], capsys)
    assert rc == EXIT_CONFIG and f"megadepth_out {a_file}: cannot be used as an output folder: it is a file" in err
    assert not list(tmp_path.rglob(".write-check-*"))  # the probe leaves nothing behind


def test_output_folder_probe_accepts_new_and_existing_folders(tmp_path):
    from tasks.common.cli import check_output_folder

    check_output_folder(tmp_path, "output_dir")
    check_output_folder(tmp_path / "new" / "deeper", "output_dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # checked, not created


# ---------------------------------------------------------------------------------------------
# issue 27 item 2: a mistyped --root is an error, the synthetic world is asked for
# ---------------------------------------------------------------------------------------------
def test_root_without_data_is_an_error_unless_the_world_is_asked_for(tmp_path, capsys, no_server, monkeypatch):
    import flows.aerial
    from tasks.aerial.config import AerialConfig, get_config

    missing = tmp_path / "nonexistent" / "aerial"
    rc, err = _main(flows.aerial, ["--root", str(missing)], capsys)
    assert rc == EXIT_CONFIG and f"root {missing}: no downloaded_data/ folder" in err
    assert "--synthetic (--set synthetic=true)" in err and "\n" not in err
    assert not missing.exists()
    # the default run and the named configurations' own roots still build the world; --synthetic anywhere
    monkeypatch.chdir(tmp_path)
    assert AerialConfig().builds_world() and get_config("smoke").builds_world()
    assert not AerialConfig(root=str(missing)).builds_world()
    assert AerialConfig(root=str(missing), synthetic=True).builds_world()
    assert flows.aerial.parse_args(["--root", str(missing), "--synthetic"]).builds_world()
    assert not AerialConfig(synthetic=False).builds_world()
    AerialConfig().check_inputs()  # the default run: accepted
    (tmp_path / "output" / "aerial" / "downloaded_data").mkdir(parents=True)
    assert not AerialConfig().builds_world()  # data there: it is used, no world


def test_mistyped_root_command_one_line_no_server(tmp_path):
    """The real command: ``python -m flows.aerial --root /nonexistent/aerial`` exits 2 with one line,
    starts no server and creates nothing (it rendered a world for 515 s before)."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT), "FACTORY_PREFECT_HOME": str(tmp_path / "ph"),
           "PREFECT_HOME": str(tmp_path / "ph2")}
    missing = tmp_path / "nonexistent" / "aerial"
    out = subprocess.run([sys.executable, "-m", "flows.aerial", "--root", str(missing)], cwd=PROJECT_ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == EXIT_CONFIG, out.stderr[-2000:]
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: root {missing}: no downloaded_data/"), out.stderr
    assert "--synthetic" in lines[0]
    assert not (tmp_path / "ph").exists() and not (tmp_path / "nonexistent").exists()
