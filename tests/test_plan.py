"""Planning stage: named trajectories, the plan file, Earth Studio projects (.esp), and the
round trip plan -> synthetic render -> ingest."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from tasks.aerial import esp, geometry
from tasks.aerial import plan as PL

LAT0, LON0, ALT0 = 47.3769, 8.5417, 408.0
CITY = PL.Place("0001", LAT0, LON0, ALT0, 100.0)

# The synthetic world's default trajectory before it was rendered from a plan (seed 0,
# 48 frames): phases drawn from the world's seed and camera positions/rotations computed by
# the world's own former pose function, recorded when the planning stage replaced it.
OLD_PHASES = [3.682719829030431, 3.481453302102835, 5.087562850280148]
OLD_POSITIONS = {
    0: [248.38748717265756, 76.83525373194828, 300.0],
    10: [157.1118637265247, -145.54457525957142, 129.5723677565443],
    24: [143.3004733688409, 44.32803099920096, 40.0],
    25: [-20.0, 0.22030962996273828, 4.895833333333333],
    37: [20.0, -8.220309629962728, 3.645833333333333],
    48: [-17.77969037003725, 20.0, 2.5],
}
OLD_ROTATION_10 = [[0.6773578584687142, 0.42041984738207683, -0.6036832642188357],
                   [0.7356536763795022, -0.38710428102796607, 0.5558452518814424],
                   [-0.0, -0.8206079621457817, -0.5714915331507084]]
OLD_ROTATION_37 = [[0.9234817698377688, 0.005021722660720003, -0.3836094408103393],
                   [0.3836423083776116, -0.01208800288468593, 0.9234026529141864],
                   [-0.0, -0.9999143275740071, -0.013089595571344597]]


def test_default_plan_is_the_former_synthetic_trajectory():
    plan = PL.make_plan(CITY, PL.get_trajectory(frames=48, phases=OLD_PHASES))
    assert len(plan.cameras) == 49 and plan.num_frames == 48
    for k, pos in OLD_POSITIONS.items():
        np.testing.assert_array_equal(plan.cameras[k].position_enu, pos)  # bit for bit
    np.testing.assert_array_equal(plan.cameras[10].cam2world_enu, OLD_ROTATION_10)  # spiral: look-at rule
    np.testing.assert_array_equal(plan.cameras[37].cam2world_enu, OLD_ROTATION_37)  # street pass
    np.testing.assert_allclose([c.time for c in plan.cameras], np.arange(49) / 48)


def test_pan_tilt_roll_hand_derived():
    # columns: image x (right), y (down), z (forward) in the local ENU frame (east, north, up)
    cases = {
        (0, 0, 0): [[1, 0, 0], [0, -1, 0], [0, 0, -1]],  # straight down, top of image to north
        (0, 90, 0): [[1, 0, 0], [0, 0, -1], [0, 1, 0]],  # level, facing north
        (90, 90, 0): [[0, -1, 0], [0, 0, -1], [1, 0, 0]],  # level, facing east: right = south
        (180, 90, 0): [[-1, 0, 0], [0, 0, -1], [0, -1, 0]],  # level, facing south: right = west
        (0, 90, 90): [[0, 0, -1], [-1, 0, 0], [0, 1, 0]],  # facing north, image x turned to point down
    }
    for (pan, tilt, roll), cols in cases.items():
        r = geometry.rotation_from_pan_tilt_roll(pan, tilt, roll)
        np.testing.assert_allclose(r, np.array(cols, float).T, atol=1e-12, err_msg=str((pan, tilt, roll)))
    # 45 deg down towards north-east: forward = (sin45 sin45, cos45 sin45, -cos45)
    r = geometry.rotation_from_pan_tilt_roll(45, 45, 0)
    np.testing.assert_allclose(r[:, 2], [0.5, 0.5, -math.sqrt(0.5)], atol=1e-12)
    np.testing.assert_allclose(r[2, 0], 0.0, atol=1e-12)  # no roll: image x stays horizontal
    for pan, tilt, roll in [(10, 30, 0), (200, 95, -3), (359, 150, 12), (90, 90, 0)]:
        got = geometry.pan_tilt_roll_from_rotation(geometry.rotation_from_pan_tilt_roll(pan, tilt, roll))
        np.testing.assert_allclose(got, (pan, tilt, roll), atol=1e-9)
    # a look-at camera (roll 0) gives roll 0 and the pan/tilt of its direction
    r = geometry.look_at([0, 0, 0], [0, -10, -10])  # south, 45 deg down
    np.testing.assert_allclose(geometry.pan_tilt_roll_from_rotation(r), (180, 45, 0), atol=1e-9)


@pytest.mark.parametrize("name", sorted(PL.TRAJECTORIES))
def test_esp_round_trip_recovers_every_planned_camera(tmp_path, name):
    traj = PL.get_trajectory(name, frames=30, phases=[0.3, 1.1, 2.0], fov=42.0)
    plan = PL.make_plan(PL.Place("0042", -33.8568, 151.2153, 5.0, 150.0), traj)
    path = esp.write_esp(plan, tmp_path / "0042.esp")
    doc = json.loads(path.read_text())
    assert doc["settings"]["duration"] == 30 and doc["settings"]["timeFormat"] == "frames"
    assert doc["settings"]["dimensions"] == {"width": 640, "height": 480}
    cam_group = doc["scenes"][0]["attributes"][0]
    assert cam_group["type"] == "cameraGroup"
    assert [a["type"] for a in cam_group["attributes"]] == [
        "cameraPositionGroup", "cameraTargetEffect", "cameraRotationGroup", "cameraLensGroup"]
    lon_attr = cam_group["attributes"][0]["attributes"][0]["attributes"][0]
    assert lon_attr["type"] == "longitude" and len(lon_attr["keyframes"]) == 31
    assert all(0.0 <= k["value"] <= 1.0 for k in lon_attr["keyframes"])
    # the keyframe value is the position within the range, as Earth Studio stores it
    assert lon_attr["keyframes"][0]["value"] == pytest.approx((plan.cameras[0].longitude + 180) / 360, abs=1e-15)

    got = esp.read_esp(path)
    assert (got.name, got.duration, got.width, got.height, got.frame_rate) == ("0042", 30, 640, 480, 10.0)
    assert [c.frame for c in got.cameras] == list(range(31))
    for c, g in zip(plan.cameras, got.cameras):
        assert g.latitude == pytest.approx(c.latitude, abs=1e-12)
        assert g.longitude == pytest.approx(c.longitude, abs=1e-12)
        assert g.altitude == pytest.approx(c.altitude, abs=1e-6)
        assert g.fov_vertical == pytest.approx(42.0, abs=1e-12)
        r_local = geometry.local_rotation(c.cam2world_enu, *plan.origin[:2], c.latitude, c.longitude)
        np.testing.assert_allclose(g.cam2world_local(), r_local, atol=1e-9)
        assert g.look_at is None


def test_esp_reader_aims_at_an_enabled_point_of_interest(tmp_path):
    plan = PL.make_plan(CITY, PL.get_trajectory("orbit", frames=8))
    doc = esp.esp_document(plan)
    effect = doc["scenes"][0]["attributes"][0]["attributes"][1]
    effect["attributes"][0]["value"]["relative"] = 1  # enable the target effect (the place centre)
    (tmp_path / "poi.esp").write_text(json.dumps(doc))
    got = esp.read_esp(tmp_path / "poi.esp")
    for g in got.cameras:
        assert g.look_at == pytest.approx((LAT0, LON0, ALT0), abs=1e-9)
        fwd = g.cam2world_local()[:, 2]
        to_centre = geometry.geodetic_to_enu(LAT0, LON0, ALT0, g.latitude, g.longitude, g.altitude)
        np.testing.assert_allclose(fwd, to_centre / np.linalg.norm(to_centre), atol=1e-9)


def test_esp_reader_errors_name_file_and_attribute(tmp_path):
    p = tmp_path / "x.esp"
    p.write_text("not json")
    with pytest.raises(esp.EspError, match=r"x\.esp.*not JSON"):
        esp.read_esp(p)
    doc = esp.esp_document(PL.make_plan(CITY, PL.get_trajectory(frames=4)))
    del doc["scenes"][0]["attributes"][0]["attributes"][3]  # no lens group
    p.write_text(json.dumps(doc))
    with pytest.raises(esp.EspError, match=r"x\.esp.*fov"):
        esp.read_esp(p)


def test_plan_file_round_trip_and_stage_skip(tmp_path):
    traj = PL.get_trajectory(frames=12, spiral_altitudes=[200, 50])
    res = PL.plan_scene(tmp_path, CITY, traj)
    assert res.cameras == 13 and not res.skipped
    assert res.plan == tmp_path / "plans" / "0001.plan.json" and res.esp.exists()
    back = PL.read_plan(res.plan)
    assert back.place == CITY and back.trajectory == traj
    ref = PL.make_plan(CITY, traj)
    for a, b in zip(ref.cameras, back.cameras):
        np.testing.assert_array_equal(a.position_enu, b.position_enu)
        np.testing.assert_array_equal(a.cam2world_enu, b.cam2world_enu)
        assert (a.latitude, a.longitude, a.altitude, a.pan, a.tilt) == (b.latitude, b.longitude, b.altitude,
                                                                        b.pan, b.tilt)
        # the look-at point is on the camera's optical axis
        t = geometry.geodetic_to_enu(b.look_at["latitude"], b.look_at["longitude"], b.look_at["altitude"],
                                     *back.origin)
        d = (t - b.position_enu) / np.linalg.norm(t - b.position_enu)
        np.testing.assert_allclose(d, b.cam2world_enu[:, 2], atol=1e-9)
    assert min(c.altitude - ALT0 for c in back.cameras) == pytest.approx(2.5, abs=1e-3)  # + curvature
    assert PL.plan_scene(tmp_path, CITY, traj).skipped
    assert not PL.plan_scene(tmp_path, CITY, PL.get_trajectory(frames=12)).skipped  # settings changed


@pytest.mark.parametrize("field, value, match", [
    ("latitude", True, r"'latitude' is True \(bool\), not a number"),
    ("latitude", float("nan"), "'latitude' is nan: must be a finite number"),
    ("longitude", float("inf"), "'longitude' is inf: must be a finite number"),
    ("radius", 1e-9, r"'radius' is 1e-09: must be in \[1, 20000\]"),
    ("radius", "100", r"'radius' is '100' \(str\), not a number"),
    ("scene", "../x", "scene id '../x' contains a path separator"),
    ("scene", "..", "scene id '..' is a reference to a folder"),
    ("width", 1e9, r"unknown field\(s\) width.*trajectory_options"),
])
def test_hostile_places_are_refused(tmp_path, field, value, match):
    """Issue 26 item 8: a place's numbers are finite, in range and numbers (not booleans); its
    scene id is a plain name; unknown fields are errors, not silently ignored."""
    place = {"scene": "0001", "latitude": 47.37, "longitude": 8.54, "ground_altitude": 408, "radius": 100,
             field: value}
    with pytest.raises(PL.PlanError, match=match):
        PL.place_from_dict(place, "places.json: place 0")
    f = tmp_path / "places.json"
    f.write_text(json.dumps([place]))  # NaN/Infinity as JSON's Python spelling: read as floats
    with pytest.raises(PL.PlanError, match=match):
        PL.load_places(f)


def test_bad_places_get_clear_errors(tmp_path):
    with pytest.raises(PL.PlanError, match=r"scene 0007.*no 'latitude'.*coordinates"):
        PL.place_from_dict({"scene": "0007", "longitude": 8.5, "ground_altitude": 400, "radius": 100}, "places.yaml")
    with pytest.raises(PL.PlanError, match=r"scene 0007.*'longitude' is 'east'"):
        PL.place_from_dict({"scene": "0007", "latitude": 1, "longitude": "east", "ground_altitude": 0,
                            "radius": 1}, "x")
    with pytest.raises(PL.PlanError, match=r"'latitude' is 95: must be in \(-90, 90\)"):
        PL.place_from_dict({"scene": "1", "latitude": 95, "longitude": 0, "ground_altitude": 0, "radius": 1}, "x")
    with pytest.raises(PL.PlanError, match=r"'radius' is -5: must be in \[1, 20000\]"):
        PL.place_from_dict({"scene": "1", "latitude": 5, "longitude": 0, "ground_altitude": 0, "radius": -5}, "x")
    f = tmp_path / "places.yaml"
    f.write_text("- {scene: '0001', latitude: 47.37, longitude: 8.54, ground_altitude: 408, radius: 100}\n"
                 "- {scene: '0002', longitude: 8.54, ground_altitude: 408, radius: 100}\n"
                 "- {scene: '0003', latitude: 40.0, longitude: -3.7, ground_altitude: 650, radius: 80}\n")
    errors: list = []
    places = PL.load_places(f, errors=errors)
    assert [p.scene for p in places] == ["0001", "0003"]
    assert errors[0][0] == "0002" and "places.yaml: place 1 (scene 0002): no 'latitude'" in errors[0][1]
    with pytest.raises(PL.PlanError, match="no 'latitude'"):
        PL.load_places(f)


@pytest.mark.parametrize("overrides, match", [
    ({"frames": 0}, r"frames is 0: must be in \[1, 10000\] \(the plan has frames \+ 1 cameras\)"),
    ({"fov": 0.0}, r"fov is 0.0 degrees: must be in \(0, 179\]"),
    # issue 26 items 7-8: sizes bounded, NaN / Infinity / booleans refused, whatever the field
    ({"frames": 100000000}, r"frames is 100000000: must be in \[1, 10000\]"),
    ({"frames": 2.5}, "frames is 2.5: must be a whole number"),
    ({"frame_rate": float("inf")}, "frame_rate is inf: must be a finite number"),
    ({"width": 1000000000}, r"width is 1000000000 px: must be in \[16, 3840\]"),
    ({"spiral_turns": float("nan")}, "spiral_turns is nan: must be a finite number"),
    ({"loop": True}, r"loop is True \(bool\), not a number"),
    ({"spiral_fraction": 1.5}, r"spiral_fraction 1.5 must be in \[0, 1\]"),
    ({"loop_coverage": 0.0}, r"loop_coverage 0.0 must be in \(0, 1\]"),
    ({"spiral_radii": [-1, 1]}, "spiral_radii .* must be >= 0"),
    ({"pass_pitch_deg": [0, 95]}, "pass_pitch_deg .* within"),
    ({"speed": 3}, "unknown setting.*speed"),
    ({"spiral_altitudes": [300, -20]}, "spiral_altitudes .* below ground"),
    ({"pass_altitudes": [5, 0.1]}, "pass_altitudes .* below ground"),
    ({"target_height": [2, 5]}, "target_height .* below ground"),
])
def test_impossible_trajectories_are_refused(overrides, match):
    with pytest.raises(PL.PlanError, match=match):
        PL.get_trajectory(**overrides)


def test_unknown_trajectory_and_camera_on_its_target():
    with pytest.raises(PL.PlanError, match="unknown trajectory 'zigzag'.*spiral\\+streets"):
        PL.get_trajectory("zigzag")
    with pytest.raises(PL.PlanError, match="camera 0 sits on its look-at point"):
        PL.make_plan(CITY, PL.get_trajectory("orbit", spiral_radii=[0, 0], spiral_altitudes=[8, 8],
                                             target_height=[8, 0], frames=4))


def test_plan_rendered_by_the_synthetic_world_and_ingested_gives_the_plan_cameras(tmp_path):
    """One source of truth: the world renders its plan; the ingested reference poses are the
    plan's cameras (expressed in the ENU frame of the first frame)."""
    import pycolmap

    from tasks.aerial.earthstudio import ingest_scene, load_camera_track
    from tasks.aerial.synthetic_world import generate_world

    world = generate_world(tmp_path, n_aerial=8, n_ground=2, size=(160, 120), seed=5)
    plan = PL.read_plan(tmp_path / "plans" / "0001.plan.json")
    assert esp.read_esp(tmp_path / "plans" / "0001.esp").cameras[-1].frame == 8
    track = load_camera_track(world.json_path)
    assert len(track.frames) == plan.num_frames + 1 == 9  # what Earth Studio exports: numFrames + 1
    res = ingest_scene(tmp_path, "0001")
    check = res.plan_check
    assert check["cameras compared"] == 9
    assert check["max position difference m"] < 1e-6 and check["max rotation difference deg"] < 1e-6
    first = plan.cameras[0]
    a = geometry.r_ecef_to_enu(first.latitude, first.longitude) @ geometry.r_ecef_to_enu(*plan.origin[:2]).T
    ref = pycolmap.Reconstruction(str(res.reference_model))
    assert ref.num_images() == 8
    for image in ref.images.values():
        k = int(image.name.split("_")[1].split(".")[0])
        c = plan.cameras[k]
        w2c = image.cam_from_world().matrix()
        centre = -w2c[:, :3].T @ w2c[:, 3]
        np.testing.assert_allclose(w2c[:, :3].T, a @ c.cam2world_enu, atol=1e-9)
        np.testing.assert_allclose(centre, geometry.geodetic_to_enu(c.latitude, c.longitude, c.altitude,
                                                                    first.latitude, first.longitude,
                                                                    first.altitude), atol=1e-6)
        # and the export's Euler angles are the plan's rotation in ECEF
        r_ecef = Rotation.from_euler("XYZ", track.frames[k].rotation_deg, degrees=True).as_matrix()
        np.testing.assert_allclose(geometry.r_ecef_to_enu(*plan.origin[:2]) @ r_ecef, c.cam2world_enu, atol=1e-9)


def test_export_that_differs_from_its_plan_is_flagged():
    from tasks.aerial.report import plan_check_note, plan_check_ok
    from tasks.aerial.earthstudio import CameraFrame, CameraTrack

    plan = PL.make_plan(CITY, PL.get_trajectory(frames=4))
    frames = []
    for c in plan.cameras:
        ecef_r = geometry.r_ecef_to_enu(LAT0, LON0).T @ c.cam2world_enu
        euler = Rotation.from_matrix(ecef_r).as_euler("XYZ", degrees=True)
        frames.append(CameraFrame(c.frame, c.latitude, c.longitude, c.altitude + 30.0, np.zeros(3), euler, 50.0))
    check = PL.compare_with_export(plan, CameraTrack(None, "0001", 640, 480, 4, frames))
    assert check["max position difference m"] == pytest.approx(30.0, abs=1e-3)
    assert check["max rotation difference deg"] < 1e-9
    assert not plan_check_ok(check) and "DIFFERS FROM" in plan_check_note(check)
