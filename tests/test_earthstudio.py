"""Pose conventions and the Earth Studio ingest."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")
import cv2  # noqa: E402

from tasks.aerial import geometry  # noqa: E402
from tasks.aerial.earthstudio import EarthStudioError, frame_name, ingest_scene, load_camera_track  # noqa: E402

LAT0, LON0, ALT0 = 47.3769, 8.5417, 408.0


def test_r_ecef_to_enu_hand_values():
    np.testing.assert_allclose(geometry.r_ecef_to_enu(0, 0), [[0, 1, 0], [0, 0, 1], [1, 0, 0]], atol=1e-12)
    # at the north pole, on lon 0: east = +Y, north = -X, up = +Z
    np.testing.assert_allclose(geometry.r_ecef_to_enu(90, 0), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-12)


def test_camera_looking_straight_down():
    # At (0, 0): nadir camera, image right = east (+Y ecef), image down = south (-Z ecef),
    # forward = down (-X ecef). Its ECEF camera-to-world matrix, by hand:
    r_ecef = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)
    euler = geometry.Rotation.from_matrix(r_ecef).as_euler("XYZ", degrees=True)
    c2w = geometry.cam2world_rotation(euler, 0.0, 0.0)
    np.testing.assert_allclose(c2w, [[1, 0, 0], [0, -1, 0], [0, 0, -1]], atol=1e-12)
    np.testing.assert_allclose(c2w[:, 2], [0, 0, -1], atol=1e-12)  # looks down in ENU
    np.testing.assert_allclose(geometry.look_at([0, 0, 100], [0, 0, 0]), c2w, atol=1e-12)


def test_level_camera_facing_north():
    r = geometry.look_at([0, 0, 2], [0, 100, 2])
    # columns: x = east, y = down, z = north
    np.testing.assert_allclose(r, [[1, 0, 0], [0, 0, 1], [0, -1, 0]], atol=1e-12)
    euler = geometry.euler_from_cam2world(r, LAT0, LON0)
    np.testing.assert_allclose(geometry.cam2world_rotation(euler, LAT0, LON0), r, atol=1e-12)


def test_intrinsics_and_enu():
    assert geometry.focal_from_fov(480, 90.0) == pytest.approx(240.0)
    assert geometry.fov_from_focal(480, 240.0) == pytest.approx(90.0)
    lat, lon, alt = geometry.enu_to_geodetic(np.array([0.0, 100.0, 5.0]), LAT0, LON0, ALT0)
    assert lat > LAT0 and lon == pytest.approx(LON0, abs=1e-9)
    np.testing.assert_allclose(geometry.geodetic_to_enu(lat, lon, alt, LAT0, LON0, ALT0), [0, 100, 5], atol=1e-6)


def test_frame_names():
    assert frame_name("0001", 7, 100) == "0001_007.jpeg"
    assert frame_name("0001", 7, 1500) == "0001_0007.jpeg"


# --------------------------------------------------------------------------
# A small hand-made export: frame i is a flat image of grey level 40 + 30 i
# --------------------------------------------------------------------------
W, H = 160, 120


def _poses(n):
    out = []
    for i in range(n):
        a = 2 * math.pi * i / n
        pos = np.array([200 * math.cos(a), 200 * math.sin(a), 150.0 + 10 * i])
        out.append((pos, geometry.look_at(pos, [0, 0, 0])))
    return out


def _export(root, scene="0001", n_frames=6, n_entries=None, nan_at=None, drop_json_key=None):
    dl = root / "downloaded_data"
    dl.mkdir(parents=True, exist_ok=True)
    w = cv2.VideoWriter(str(dl / f"{scene}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (W, H))
    for i in range(n_frames):
        w.write(np.full((H, W, 3), 40 + 30 * i, np.uint8))
    w.release()
    n_entries = n_frames + 1 if n_entries is None else n_entries
    poses = _poses(n_entries)
    # Earth Studio's frame: ENU at the first camera; our poses are ENU at (LAT0, LON0, ALT0) = first camera
    frames = []
    for i, (pos, r) in enumerate(poses):
        lat, lon, alt = geometry.enu_to_geodetic(pos - poses[0][0], *geometry.enu_to_geodetic(poses[0][0], LAT0, LON0, ALT0))
        first = geometry.enu_to_geodetic(poses[0][0], LAT0, LON0, ALT0)
        r_first = geometry.r_ecef_to_enu(first[0], first[1]) @ geometry.r_ecef_to_enu(LAT0, LON0).T @ r
        euler = geometry.euler_from_cam2world(r_first, first[0], first[1])
        x, y, z = geometry.enu_to_ecef(pos, LAT0, LON0, ALT0)
        lat, lon, alt = geometry.enu_to_geodetic(pos, LAT0, LON0, ALT0)
        frames.append({"position": {"x": x, "y": y, "z": z}, "rotation": dict(zip("xyz", map(float, euler))),
                       "coordinate": {"latitude": lat, "longitude": lon, "altitude": alt}, "fovVertical": 50.0})
    if nan_at is not None:
        frames[nan_at]["rotation"]["y"] = float("nan")
    doc = {"name": scene, "width": W, "height": H, "numFrames": n_frames, "frameRate": 10, "cameraFrames": frames}
    if drop_json_key:
        doc.pop(drop_json_key)
    (dl / f"{scene}.json").write_text(json.dumps(doc))
    return poses


def _grey(path):
    return float(cv2.imread(str(path)).mean())


def test_ingest_round_trip_and_alignment(tmp_path):
    poses = _export(tmp_path, n_frames=6)
    res = ingest_scene(tmp_path, "0001")
    assert res.frames_written == 6 and res.video_frames == 6 and res.camera_entries == 7
    assert set(res.frames_skipped) == {"6"}  # the extra (numFrames + 1) entry, reported
    meta = json.loads(res.metadata.read_text())
    first = poses[0][0]
    for f in meta["frames"]:
        i = f["index"]
        assert f["name"] == f"0001_{i:03d}.jpeg"
        assert _grey(tmp_path / "data" / "0001" / "footage" / f["name"]) == pytest.approx(40 + 30 * i, abs=8)
        c2w = np.array(f["cam2world"])
        # positions: ENU at the first frame; rotations: the rendering rotation expressed there
        lat_f, lon_f, _ = geometry.enu_to_geodetic(first, LAT0, LON0, ALT0)
        r_expected = geometry.r_ecef_to_enu(lat_f, lon_f) @ geometry.r_ecef_to_enu(LAT0, LON0).T @ poses[i][1]
        np.testing.assert_allclose(c2w[:3, :3], r_expected, atol=1e-9)
        assert np.linalg.norm(c2w[:3, 3]) == pytest.approx(np.linalg.norm(poses[i][0] - first), abs=1e-4)
    import pycolmap

    rec = pycolmap.Reconstruction(str(res.reference_model))
    assert rec.num_images() == 6 and rec.num_points3D() == 0
    for image in rec.images.values():
        f = next(x for x in meta["frames"] if x["name"] == image.name)
        w2c = image.cam_from_world().matrix() if callable(image.cam_from_world) else image.cam_from_world.matrix()
        c2w = np.array(f["cam2world"])
        np.testing.assert_allclose(w2c[:, :3], c2w[:3, :3].T, atol=1e-9)
        cam = rec.cameras[image.camera_id]
        assert cam.model.name == "SIMPLE_PINHOLE"
        assert cam.params[0] == pytest.approx(geometry.focal_from_fov(H, 50.0))
        assert list(cam.params[1:]) == [W / 2, H / 2]
    again = ingest_scene(tmp_path, "0001")
    assert again.skipped_scene


def test_video_with_more_frames_than_entries_is_reported_not_shifted(tmp_path):
    _export(tmp_path, n_frames=6, n_entries=5)
    res = ingest_scene(tmp_path, "0001")
    assert res.frames_written == 5
    assert set(res.frames_skipped) == {"5"}
    assert "no cameraFrames entry" in res.frames_skipped["5"]


def test_nan_entry_is_skipped_and_later_frames_keep_their_pose(tmp_path):
    _export(tmp_path, n_frames=6, nan_at=2)
    res = ingest_scene(tmp_path, "0001")
    assert "2" in res.frames_skipped and "non-finite" in res.frames_skipped["2"]
    meta = json.loads(res.metadata.read_text())
    assert [f["index"] for f in meta["frames"]] == [0, 1, 3, 4, 5]
    for f in meta["frames"]:  # frame 3's image is still frame 3's
        assert _grey(tmp_path / "data" / "0001" / "footage" / f["name"]) == pytest.approx(40 + 30 * f["index"], abs=8)


def test_json_without_camera_frames(tmp_path):
    _export(tmp_path, drop_json_key="cameraFrames")
    with pytest.raises(EarthStudioError, match=r"0001\.json.*cameraFrames"):
        load_camera_track(tmp_path / "downloaded_data" / "0001.json")


def test_missing_and_corrupt_video(tmp_path):
    _export(tmp_path)
    video = tmp_path / "downloaded_data" / "0001.mp4"
    video.write_bytes(os.urandom(5000))
    with pytest.raises(EarthStudioError, match="0001.mp4"):
        ingest_scene(tmp_path, "0001")
    video.unlink()
    with pytest.raises(EarthStudioError, match="video not found"):
        ingest_scene(tmp_path, "0001")
