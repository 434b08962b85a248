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
        w.write(np.full((H, W, 3), (40 + 30 * i) % 250, np.uint8))
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
    # the extra (numFrames + 1) entry is documented Earth Studio behaviour: a note, not a problem
    assert res.frames_skipped == {} and res.problems() == []
    assert len(res.notes) == 1 and res.notes[0].startswith("cameraFrames[6] has no video frame")
    meta = json.loads(res.record.read_text())
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
    assert again.skipped_scene and again.notes == res.notes and again.problems() == []


def test_video_with_more_frames_than_entries_is_reported_not_shifted(tmp_path):
    _export(tmp_path, n_frames=6, n_entries=5)
    res = ingest_scene(tmp_path, "0001")
    assert res.frames_written == 5
    assert set(res.frames_skipped) == {"5"}
    assert "no cameraFrames entry" in res.frames_skipped["5"]


def test_nan_entry_is_skipped_and_later_frames_keep_their_pose(tmp_path):
    _export(tmp_path, n_frames=6, nan_at=2)
    res = ingest_scene(tmp_path, "0001")
    assert "2" in res.frames_skipped and "rotation.y is nan: must be a finite number" in res.frames_skipped["2"]
    meta = json.loads(res.record.read_text())
    assert [f["index"] for f in meta["frames"]] == [0, 1, 3, 4, 5]
    for f in meta["frames"]:  # frame 3's image is still frame 3's
        assert _grey(tmp_path / "data" / "0001" / "footage" / f["name"]) == pytest.approx(40 + 30 * f["index"], abs=8)


def test_out_of_range_coordinate_is_refused_naming_file_entry_and_field(tmp_path):
    """Issue 26 item 12: latitude 123 in the first camera entry moved every pose by ~6000 km,
    silently. Now that entry is skipped and reported (file, entry, field); the others keep
    their poses (the origin is the first usable entry)."""
    _export(tmp_path, n_frames=6)
    path = tmp_path / "downloaded_data" / "0001.json"
    doc = json.loads(path.read_text())
    doc["cameraFrames"][0]["coordinate"]["latitude"] = 123.0
    doc["cameraFrames"][3]["coordinate"]["altitude"] = 5e7
    doc["cameraFrames"][4]["coordinate"]["longitude"] = True
    path.write_text(json.dumps(doc))
    track = load_camera_track(path)
    assert track.skipped[0] == (f"{path}: cameraFrames[0]: coordinate.latitude is 123.0 degrees: must be in "
                                "[-90, 90] degrees")
    assert "cameraFrames[3]: coordinate.altitude is 50000000.0 m: must be in [-500, 100000] m" in track.skipped[3]
    assert "cameraFrames[4]: coordinate.longitude is True (bool), not a number" in track.skipped[4]
    res = ingest_scene(tmp_path, "0001")
    assert {"0", "3", "4"} <= set(res.frames_skipped)
    assert any(item == "frame 0" and "latitude is 123.0" in why for item, why in res.problems())


@pytest.mark.parametrize("key, value, match", [
    ("numFrames", float("nan"), "numFrames is nan: must be a finite number"),
    ("width", float("inf"), "width is inf: must be a finite number"),
    ("width", 1e9, r"width is 1000000000.0 px: must be in \[1, 8192\] px"),
    ("height", "480", r"height is '480' \(str\), not a number"),
    ("numFrames", 1e12, r"numFrames is 1000000000000.0: must be in \[0, 100000\]"),
])
def test_non_finite_or_huge_header_numbers_are_clear_errors(tmp_path, key, value, match):
    """Issue 26 item 8: numFrames NaN and width Infinity crashed (ValueError / OverflowError)."""
    _export(tmp_path, n_frames=3)
    path = tmp_path / "downloaded_data" / "0001.json"
    doc = json.loads(path.read_text())
    doc[key] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(EarthStudioError, match=match) as info:
        load_camera_track(path)
    assert str(path) in str(info.value) and "export the JSON from Earth Studio again" in str(info.value)


def _damage(video, where, nbytes):
    """Zero ``nbytes`` of the video's sample data at the fraction ``where`` of its mdat box."""
    data = bytearray(video.read_bytes())
    start = data.index(b"mdat") + 4
    end = data.rindex(b"moov") - 4 if data.rindex(b"moov") > start else len(data)
    at = int(start + (end - start) * where)
    data[at:at + nbytes] = bytes(nbytes)
    video.write_bytes(bytes(data))


@pytest.mark.parametrize("where, nbytes", [(0.2, 200), (0.5, 3000)])
def test_damaged_video_frames_are_reported_and_dropped(tmp_path, where, nbytes):
    """Issue 26 item 12: 20 KB zeroed inside the mp4 gave damaged frames that were ingested. The
    decoder's error is caught for the frame it belongs to; that frame and the frames predicted
    from it (until the next keyframe) are dropped and reported; the others are ingested. Here:
    a 25 KB video of 24 frames, keyframes 0 and 12; 200 bytes zeroed in frame 2 (decoding goes
    on: frames 2-11 damaged, 12-23 good again), or 3 KB in frame 11 (decoding stops after it)."""
    from tasks.aerial.earthstudio import video_index

    dl = tmp_path / "downloaded_data"
    _export(tmp_path, n_frames=24)
    rng = np.random.default_rng(0)
    tex = cv2.GaussianBlur(cv2.resize(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8), (2 * W, 2 * H)), (0, 0), 2)
    w = cv2.VideoWriter(str(dl / "0001.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (W, H))
    good = []
    for i in range(24):  # textured, moving: every frame needs its data (flat frames compress to nothing)
        good.append(tex[3 * i:3 * i + H, 4 * i:4 * i + W].copy())
        w.write(good[-1])
    w.release()
    assert video_index(dl / "0001.mp4").sync == (0, 12)
    _damage(dl / "0001.mp4", where, nbytes)
    res = ingest_scene(tmp_path, "0001")
    damaged = {int(k): v for k, v in res.frames_skipped.items() if "is damaged" in v}
    assert damaged, res.frames_skipped
    first = min(damaged)
    assert "the decoder reports" in damaged[first] and damaged[first].endswith("dropped")
    footage = tmp_path / "data" / "0001" / "footage"
    for k in damaged:  # dropped, not ingested
        assert not (footage / f"0001_{k:03d}.jpeg").exists()
    assert any(item == f"frame {first}" and "is damaged" in why for item, why in res.problems())
    written = sorted(int(p.stem.split("_")[1]) for p in footage.glob("0001_*.jpeg"))
    for k in written:  # what is ingested is intact
        assert np.abs(cv2.imread(str(footage / f"0001_{k:03d}.jpeg")).astype(float) - good[k]).mean() < 6, k
    if nbytes == 200:
        assert sorted(damaged) == list(range(2, 12))
        assert all(f"predicted from damaged frame 2" in damaged[k] for k in range(3, 12))
        assert written == [0, 1, *range(12, 24)]
    else:
        assert sorted(damaged) == [11] and written == list(range(11)) and res.video_problem


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


# --------------------------------------------------------------------------
# data/<scene>/<scene>.json is the original's file: its own reader gives the reference poses
# --------------------------------------------------------------------------
def _original_json_to_empty_colmap_model(json_file, max_num_images=200):
    """The original's ``ges_utils.json_to_empty_colmap_model`` (aerial-megadepth), re-implemented
    independently of the project's modules: its own ECEF->ENU matrix, pymap3d for positions,
    scipy's 'XYZ' Euler angles, ``f = h / (2 tan(fov / 2))``; returns
    ``{name: (w2c 4x4, (f, cx, cy), (w, h))}`` instead of writing COLMAP binaries."""
    from pymap3d.enu import geodetic2enu
    from scipy.spatial.transform import Rotation

    def rot_ecef2enu(lat, lon):
        lamb, phi = np.deg2rad(lon), np.deg2rad(lat)
        sL, sP, cL, cP = np.sin(lamb), np.sin(phi), np.cos(lamb), np.cos(phi)
        return np.array([[-sL, cL, 0], [-sP * cL, -sP * sL, cP], [cP * cL, cP * sL, sP]])

    with open(json_file, "rb") as f:
        raw = json.load(f)
    scene_name, w, h = raw["name"], raw["width"], raw["height"]
    c0 = raw["cameraFrames"][0]["coordinate"]
    lat0, lon0, alt0 = c0["latitude"], c0["longitude"], c0["altitude"]
    rot = rot_ecef2enu(lat0, lon0)
    images = {}
    for i, frame in enumerate(raw["cameraFrames"]):
        if max_num_images is not None and i > max_num_images:
            break
        x, y, z = geodetic2enu(frame["coordinate"]["latitude"], frame["coordinate"]["longitude"],
                               frame["coordinate"]["altitude"], lat0, lon0, alt0)
        r = Rotation.from_euler("XYZ", [frame["rotation"][a] for a in "xyz"], degrees=True).as_matrix()
        c2w = np.block([[rot @ r, np.array([x, y, z]).reshape(-1, 1)], [np.zeros((1, 3)), 1]])
        fl = h / (2 * math.tan(math.radians(frame["fovVertical"]) / 2))
        images["{}_{:03d}.jpeg".format(scene_name, i)] = (np.linalg.inv(c2w), (fl, w / 2, h / 2), (w, h))
    return images


def test_metadata_file_read_by_the_originals_reader_gives_the_reference_poses(tmp_path):
    import pycolmap

    from tasks.aerial.synthetic_world import generate_world

    world = generate_world(tmp_path, n_aerial=7, n_ground=2, size=(160, 120), seed=1)
    res = ingest_scene(tmp_path, "0001")
    export = json.loads(world.json_path.read_text())
    meta = json.loads(res.metadata.read_text())
    # the export's own keys and entries, cut to the 7 frames the video holds (Earth Studio wrote 8)
    assert set(meta) == set(export) and "cameraFrames" in meta and "signature" not in meta
    assert meta["cameraFrames"] == export["cameraFrames"][:7] and len(export["cameraFrames"]) == 8
    assert {k: v for k, v in meta.items() if k != "cameraFrames"} == {k: v for k, v in export.items()
                                                                       if k != "cameraFrames"}
    record = json.loads(res.record.read_text())
    assert record["signature"] and record["metadata_file"] == "0001.json"
    assert record["alignment"] == [("cameraFrames cut from 8 to 7 entries: the video holds 7 complete frames; "
                                    "entry i is frame 0001_<i>.jpeg")]
    images = _original_json_to_empty_colmap_model(res.metadata)
    footage = tmp_path / "data" / "0001" / "footage"
    assert sorted(images) == sorted(p.name for p in footage.glob("*.jpeg"))  # every image has its frame
    gt = pycolmap.Reconstruction(str(world.gt_sparse_dir))
    ref = pycolmap.Reconstruction(str(res.reference_model))
    assert ref.num_images() == len(images) == 7
    for name, (w2c, params, size) in images.items():
        for rec in (ref, gt):  # the project's reference model, and the renderer's ground truth
            im = rec.find_image_with_name(name)
            np.testing.assert_allclose(im.cam_from_world().matrix(), w2c[:3], atol=1e-6)
        cam = ref.cameras[ref.find_image_with_name(name).camera_id]
        assert cam.model.name == "SIMPLE_PINHOLE" and (cam.width, cam.height) == size
        np.testing.assert_allclose(cam.params, params, rtol=1e-12)


def test_metadata_is_the_exports_bytes_when_nothing_needs_aligning(tmp_path):
    _export(tmp_path, n_frames=5, n_entries=5)
    res = ingest_scene(tmp_path, "0001")
    assert res.metadata.read_bytes() == (tmp_path / "downloaded_data" / "0001.json").read_bytes()
    assert json.loads(res.record.read_text())["alignment"] == []


def test_alignment_names_frames_after_the_scene_and_states_unusable_entries(tmp_path):
    _export(tmp_path, n_frames=6, nan_at=2)
    doc_path = tmp_path / "downloaded_data" / "0001.json"
    doc = json.loads(doc_path.read_text())
    doc["name"] = "Zurich HB"
    doc_path.write_text(json.dumps(doc))
    res = ingest_scene(tmp_path, "0001")
    meta = json.loads(res.metadata.read_text())
    assert meta["name"] == "0001" and len(meta["cameraFrames"]) == 6
    alignment = json.loads(res.record.read_text())["alignment"]
    assert any("'Zurich HB' set to '0001'" in a for a in alignment)
    assert any(a.startswith("cameraFrames[2] kept as exported but not used (") and "must be a finite number" in a
               for a in alignment)
    names = set(_original_json_to_empty_colmap_model(res.metadata))
    present = {p.name for p in (tmp_path / "data" / "0001" / "footage").glob("*.jpeg")}
    assert present == names - {"0001_002.jpeg"}


# --------------------------------------------------------------------------
# damaged videos
# --------------------------------------------------------------------------
def _faststart(path):
    """Move the mp4's index (moov) before its data, as streaming encoders write it, shifting
    the chunk offsets (a test helper; the project only reads mp4 files)."""
    data = path.read_bytes()
    boxes, pos = [], 0
    while pos < len(data):
        size = int.from_bytes(data[pos:pos + 4], "big")
        boxes.append((data[pos + 4:pos + 8], data[pos:pos + size]))
        pos += size
    moov = bytearray(next(b for k, b in boxes if k == b"moov"))
    shift = len(moov)
    i = moov.find(b"stco")
    while i >= 0:
        n = int.from_bytes(moov[i + 8:i + 12], "big")
        for j in range(n):
            o = i + 12 + 4 * j
            moov[o:o + 4] = (int.from_bytes(moov[o:o + 4], "big") + shift).to_bytes(4, "big")
        i = moov.find(b"stco", i + 4)
    out = b"".join(b for k, b in boxes if k == b"ftyp") + bytes(moov) + b"".join(
        b for k, b in boxes if k not in (b"ftyp", b"moov"))
    path.write_bytes(out)


def _textured_export(root, n=12):
    """An export whose frames carry detail (so a half-decoded frame differs from a whole one)."""
    _export(root, n_frames=n)
    dl = root / "downloaded_data"
    rng = np.random.default_rng(0)
    frames = [cv2.GaussianBlur(rng.integers(0, 255, (H, W, 3), dtype=np.uint8), (5, 5), 0) for _ in range(n)]
    w = cv2.VideoWriter(str(dl / "0001.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (W, H))
    for f in frames:
        w.write(f)
    w.release()
    return frames


def test_video_index_of_a_whole_video(tmp_path):
    from tasks.aerial.earthstudio import video_index

    _textured_export(tmp_path, n=12)
    video = tmp_path / "downloaded_data" / "0001.mp4"
    for layout in ("index at the end", "index at the front"):
        idx = video_index(video)
        assert (idx.samples, idx.complete) == (12, 12), layout
        _faststart(video)
    assert video_index(tmp_path / "downloaded_data" / "0001.json") is None  # not an mp4


def test_truncated_video_keeps_only_complete_frames_and_says_so_once(tmp_path, caplog):
    from tasks.aerial.earthstudio import video_index

    frames = _textured_export(tmp_path, n=12)
    video = tmp_path / "downloaded_data" / "0001.mp4"
    _faststart(video)
    data = video.read_bytes()
    assert video_index(video).complete == 12
    # cut inside a frame's data: OpenCV alone still decodes that frame, partly garbage
    video.write_bytes(data[: int(len(data) * 0.55)])
    idx = video_index(video)
    assert 0 < idx.complete < 12 and idx.samples == 12
    cap = cv2.VideoCapture(str(video))
    decoded = 0
    while cap.read()[0]:
        decoded += 1
    assert decoded > idx.complete  # the decoder hands out the incomplete frame too
    with caplog.at_level("WARNING"):
        res = ingest_scene(tmp_path, "0001")
    n = idx.complete
    assert res.frames_written == n and res.video_frames == n
    assert res.video_problem.count(f"video ends after {n} of 12 frames") == 1
    assert sum("video ends after" in r.getMessage() for r in caplog.records) == 1
    problems = res.problems()
    assert problems[0] == ("video", res.video_problem)
    assert not any("has no video frame" in why for _, why in problems)  # one summary, not one per frame
    footage = sorted((tmp_path / "data" / "0001" / "footage").glob("*.jpeg"))
    assert [p.name for p in footage] == [f"0001_{i:03d}.jpeg" for i in range(n)]
    for i, p in enumerate(footage):  # every kept frame is whole (JPEG of the rendered frame)
        err = np.abs(cv2.imread(str(p)).astype(float) - frames[i]).mean()
        assert err < 12, (p.name, err)
    meta = json.loads(res.metadata.read_text())
    assert len(meta["cameraFrames"]) == n
    assert json.loads(res.record.read_text())["video_problem"] == res.video_problem


def test_video_cut_before_its_index_is_a_clear_error(tmp_path):
    _textured_export(tmp_path, n=6)
    video = tmp_path / "downloaded_data" / "0001.mp4"  # index at the end (OpenCV's writer)
    video.write_bytes(video.read_bytes()[:-200])
    with pytest.raises(EarthStudioError, match=r"0001\.mp4: cannot open the video"):
        ingest_scene(tmp_path, "0001")


_A = math.sqrt(0.5)


@pytest.mark.parametrize("lat, lon, ecef_cols, enu_cols", [
    # (0, 0): east = +Y, north = +Z, up = +X; level, facing north
    (0.0, 0.0, [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], [[1, 0, 0], [0, 0, -1], [0, 1, 0]]),
    # (0, 90): east = -X, north = +Z, up = +Y; level, facing east (image right = south)
    (0.0, 90.0, [[0, 0, -1], [0, -1, 0], [-1, 0, 0]], [[0, -1, 0], [0, 0, -1], [1, 0, 0]]),
    # north pole on lon 0: east = +Y, north = -X, up = +Z; facing north, 45 deg down
    (90.0, 0.0, [[0, 1, 0], [_A, 0, -_A], [-_A, 0, -_A]], [[1, 0, 0], [0, -_A, -_A], [0, _A, -_A]]),
])
def test_export_rotation_convention_hand_derived(lat, lon, ecef_cols, enu_cols):
    """An export's Euler angles ('XYZ' of the ECEF camera-to-world matrix) give the hand-derived
    ENU camera-to-world matrix, through the project's and through the original's formulation."""
    from scipy.spatial.transform import Rotation

    ecef = np.array(ecef_cols, float).T
    euler = Rotation.from_matrix(ecef).as_euler("XYZ", degrees=True)
    expected = np.array(enu_cols, float).T
    np.testing.assert_allclose(geometry.cam2world_rotation(euler, lat, lon), expected, atol=1e-12)
    lamb, phi = np.deg2rad(lon), np.deg2rad(lat)
    rot = np.array([[-np.sin(lamb), np.cos(lamb), 0],
                    [-np.sin(phi) * np.cos(lamb), -np.sin(phi) * np.sin(lamb), np.cos(phi)],
                    [np.cos(phi) * np.cos(lamb), np.cos(phi) * np.sin(lamb), np.sin(phi)]])
    np.testing.assert_allclose(rot @ Rotation.from_euler("XYZ", euler, degrees=True).as_matrix(), expected,
                               atol=1e-12)
    np.testing.assert_allclose(geometry.euler_from_cam2world(expected, lat, lon), euler, atol=1e-9)


def test_a_frame_that_differs_grossly_from_its_neighbours_is_dropped(tmp_path):
    """Damage the decoder does not report (a frame of other content between two that agree)
    is found by comparing neighbours; smooth motion and cuts in the path are not flagged."""
    from tasks.aerial.earthstudio import outlier_frames

    dl = tmp_path / "downloaded_data"
    _export(tmp_path, n_frames=12)
    rng = np.random.default_rng(1)
    tex = cv2.GaussianBlur(cv2.resize(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8), (2 * W, 2 * H)), (0, 0), 2)
    w = cv2.VideoWriter(str(dl / "0001.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (W, H))
    for i in range(12):
        frame = tex[2 * i:2 * i + H, 3 * i:3 * i + W].copy()
        if i == 5:
            frame = np.where(np.arange(W)[None, :, None] % 16 < 8, 0, 255).astype(np.uint8).repeat(H, 0).repeat(3, 2)
        w.write(frame)
    w.release()
    res = ingest_scene(tmp_path, "0001")
    assert "differs grossly from its neighbours" in res.frames_skipped.get("5", ""), res.frames_skipped
    assert not (tmp_path / "data" / "0001" / "footage" / "0001_005.jpeg").exists()
    assert [k for k, v in res.frames_skipped.items() if "grossly" in v] == ["5"]
    # a cut (two agreeing halves) and a flat grey ramp (the other tests' exports) are not outliers
    cut = {i: np.full((48, 64), 40.0 if i < 4 else 200.0, np.float32) for i in range(8)}
    ramp = {i: np.full((48, 64), 40.0 + 30 * i, np.float32) for i in range(7)}
    assert outlier_frames(cut) == {} and outlier_frames(ramp) == {}
