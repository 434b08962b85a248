"""The aerial flow's planning stage, plan-only runs, exit status and stale products,
through a real local Prefect server (small inputs: no rendering, no SfM)."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

from tasks.common.runtime import DaskSettings, make_task_runner

pytestmark = pytest.mark.usefixtures("prefect_server")

PLACES = """\
- {scene: "0101", latitude: 47.3769, longitude: 8.5417, ground_altitude: 408, radius: 100}
- {scene: "0102", longitude: 2.2945, ground_altitude: 35, radius: 120}
- {scene: "0103", latitude: 48.8584, longitude: 2.2945, ground_altitude: 35, radius: 120}
"""


def _main_on_test_server(monkeypatch, server, printed):
    """flows.aerial.main with its server start replaced by the session's test server, and what it
    prints collected in ``printed`` (``(text, to_stderr)``; not through pytest's capture, whose
    stream Prefect's log handler would keep after the test)."""
    import sys

    import flows.aerial as fa

    def fake_print(*args, file=None, **kw):
        printed.append((" ".join(str(a) for a in args), file is sys.stderr))

    import tasks.common.local_run as rt

    monkeypatch.setattr(fa, "print", fake_print, raising=False)
    monkeypatch.setattr(rt, "print", fake_print, raising=False)

    @contextlib.contextmanager
    def same_server(*a, **k):
        yield server  # the session's server (a runtime.PrefectServer: url, ui_url, source, home)

    monkeypatch.setattr(rt, "local_prefect_server", same_server)
    return fa.main


def test_plan_only_writes_projects_for_good_places_and_exits_1_for_the_bad_one(tmp_path, monkeypatch, prefect_server):
    from tasks.aerial import esp
    from tasks.aerial.plan import read_plan

    places = tmp_path / "places.yaml"
    places.write_text(PLACES)
    printed: list = []
    main = _main_on_test_server(monkeypatch, prefect_server, printed)
    rc = main(["--root", str(tmp_path / "out"), "--places", str(places), "--plan-only", "--workers", "1",
               "--trajectory-options", '{"frames": 20}'])
    out = "\n".join(t for t, _ in printed)
    assert rc == 1
    assert "plan 0102: NOT PLANNED" in out and "no 'latitude'" in out
    assert "plan 0101: 21 cameras" in out and "check the first one by eye" in out
    for scene in ("0101", "0103"):
        plan = read_plan(tmp_path / "out" / "plans" / f"{scene}.plan.json")
        got = esp.read_esp(tmp_path / "out" / "plans" / f"{scene}.esp")
        assert len(got.cameras) == len(plan.cameras) == 21
        np.testing.assert_allclose([c.latitude for c in got.cameras], [c.latitude for c in plan.cameras],
                                   atol=1e-12)
    assert not (tmp_path / "out" / "plans" / "0102.esp").exists()
    assert not (tmp_path / "out" / "downloaded_data").exists()  # plan only: no synthetic world either

    places.write_text(PLACES.replace('{scene: "0102", longitude', '{scene: "0102", latitude: 48.0, longitude'))
    assert main(["--root", str(tmp_path / "out"), "--places", str(places), "--plan-only", "--workers", "1",
                 "--trajectory-options", '{"frames": 20}']) == 0


def test_impossible_trajectory_is_refused_with_the_settings(tmp_path, capsys):
    """Checked when the configuration is built (CLI, deployments, the UI alike), before any place is
    planned: one error naming the setting (it was an error per place after the flow started)."""
    from pydantic import ValidationError

    from flows.aerial import AerialConfig, main

    places = tmp_path / "places.yaml"
    places.write_text(PLACES)
    with pytest.raises(ValidationError, match=r"trajectory_options: trajectory 'spiral\+streets': pass_altitudes "
                                              r".* below ground"):
        AerialConfig(root=str(tmp_path / "out"), places=str(places), plan_only=True,
                     trajectory_options={"pass_altitudes": [3, -1]})
    rc = main(["--root", str(tmp_path / "out"), "--places", str(places), "--plan-only",
               "--trajectory-options", '{"pass_altitudes": [3, -1]}'])
    err = capsys.readouterr().err
    assert rc == 2 and "pass_altitudes" in err and "below ground" in err and not (tmp_path / "out").exists()


def test_failed_scene_exits_1_and_marks_the_earlier_product_stale(tmp_path, monkeypatch, prefect_server):
    root = tmp_path / "root"
    dl = root / "downloaded_data"
    dl.mkdir(parents=True)
    cam = {"position": {"x": 4e6, "y": 6e5, "z": 4.7e6}, "rotation": {"x": 0, "y": 0, "z": 0},
           "coordinate": {"latitude": 47.0, "longitude": 8.0, "altitude": 500.0}, "fovVertical": 50}
    (dl / "0001.json").write_text(json.dumps({"name": "0001", "width": 64, "height": 48, "numFrames": 2,
                                              "cameraFrames": [cam, cam, cam]}))
    (dl / "0001.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(3000))  # a damaged download
    scene = root / "data" / "0001"
    product = scene / "sfm_output_localization" / "sfm_sift+mnn" / "localized_dense_metric"
    (product / "sparse-txt").mkdir(parents=True)
    (product / "sparse-txt" / "images.txt").write_text("# from an earlier run\n")
    (scene / "accuracy.json").write_text(json.dumps({"poses": {"photos registered": 5}}))
    (scene / "ingest.json").write_text(json.dumps({"scene": "0001", "signature": "old", "frames": []}))
    (scene / "footage").mkdir()
    (scene / "footage" / "0001_000.jpeg").write_bytes(b"old frame")
    printed: list = []
    main = _main_on_test_server(monkeypatch, prefect_server, printed)
    rc = main(["--root", str(root), "--no-synthetic", "--workers", "1"])
    assert rc == 1
    err = "\n".join(t for t, to_err in printed if to_err)
    assert "FAILED scene 0001: ingest: EarthStudioError" in err and "0001.mp4" in err
    # nothing lost, nothing looks current
    assert (product / "sparse-txt" / "images.txt").read_text() == "# from an earlier run\n"
    assert "STALE: scene 0001 failed" in (product / "STALE.txt").read_text()
    acc = json.loads((scene / "accuracy.json").read_text())
    assert acc["poses"] == {"photos registered": 5} and acc["stale"].startswith("STALE: scene 0001 failed")
    assert "footage/" in (scene / "STALE.txt").read_text()
    assert (scene / "footage" / "0001_000.jpeg").read_bytes() == b"old frame"
    report = json.loads((scene / "report.json").read_text())
    stale = {p["item"] for p in report["problems"] if p["stage"] == "stale"}
    assert stale == {str(product), str(scene / "accuracy.json"), str(scene / "footage")}


def test_scene_failure_rules():
    from tasks.aerial.report import scene_failure
    from tasks.common.report import RunReport

    r = RunReport(title="x")
    r.outputs["product"] = "/p"
    r.problem("frame 48", "ingest", "cameraFrames[48] has no video frame")
    r.problem("photo.jpg", "localization", "not registered")
    assert scene_failure("0001", r) is None  # item problems do not fail the scene
    r.problem("0001 video", "ingest", "video ends after 24 of 48 frames")
    assert "video ends after 24 of 48" in scene_failure("0001", r)  # damaged input: exit 1
    r2 = RunReport(title="y")
    assert scene_failure("0002", r2) == "no product was made"


def test_mark_stale_skips_this_runs_product_and_clear_removes_markers(tmp_path):
    from tasks.aerial.stale import MARKER, clear_stale, mark_stale

    scene = tmp_path / "data" / "0001"
    old = scene / "sfm_output_localization" / "sfm_superpoint+superglue" / "localized_dense_metric"
    new = scene / "sfm_output_localization" / "sfm_sift+mnn" / "localized_dense_metric"
    old.mkdir(parents=True)
    new.mkdir(parents=True)
    marked = mark_stale(tmp_path, "0001", "evaluate: KeyError", current=[new])
    assert marked == [str(old)] and (old / MARKER).exists() and not (new / MARKER).exists()
    assert not (scene / MARKER).exists()  # the ingest did not fail
    clear_stale(old)
    assert not (old / MARKER).exists()
