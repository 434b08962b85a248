"""The realistic synthetic world (tasks/aerial/synthetic_realistic.py, world_options.world=realistic)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tasks.aerial import megadepth as MD
from tasks.aerial import synthetic_realistic as R
from tasks.aerial import synthetic_world as SW
from tasks.aerial.dense.io import read_depth_h5
from tasks.aerial.geometry import geodetic_to_enu

KW = dict(world="realistic", seed=2, n_aerial=6, n_ground=12, size=(320, 240))  # 9 true photos, 3 distractors
SMALL = dict(world="realistic", seed=5, n_aerial=4, n_ground=4, distractors=1, size=(160, 120))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SW.WorldInfo:
    return SW.generate_world(tmp_path_factory.mktemp("realistic"), **KW)


def _models(world: SW.WorldInfo):
    import pycolmap

    return pycolmap.Reconstruction(str(world.sfm_dir)), pycolmap.Reconstruction(str(world.gt_sparse_dir))


def _world_view(world: SW.WorldInfo, image, camera) -> SW.View:
    """A ground-truth image (metric ENU of the first frame) as a pinhole view in the render frame."""
    lat0, lon0, alt0 = world.origin
    first = geodetic_to_enu(*world.first_frame_origin, lat0, lon0, alt0)
    a, b, _ = SW._rigid_world_to_first(lat0, lon0, alt0, first)
    m = image.cam_from_world().matrix()
    r_first, c_first = m[:, :3].T, -m[:, :3].T @ m[:, 3]
    k = camera.calibration_matrix()
    assert abs(k[0, 0] - k[1, 1]) < 1e-6 * k[0, 0]
    return SW.View(a.T @ r_first, a.T @ (c_first - b), float(k[0, 0]), float(k[0, 2]), float(k[1, 2]),
                   int(camera.width), int(camera.height))


def _jpeg_quality(path: Path) -> int:
    """libjpeg quality whose scaled standard luminance table is the file's first DQT table."""
    std = np.array([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
                    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99])
    zigzag = [0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7,
              14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39,
              46, 53, 60, 61, 54, 47, 55, 62, 63]
    data = path.read_bytes()
    at = data.index(b"\xff\xdb")
    table = np.frombuffer(data[at + 5:at + 5 + 64], np.uint8).astype(int)
    for q in range(1, 101):
        scale = 5000 // q if q < 50 else 200 - 2 * q
        ref = np.clip((std * scale + 50) // 100, 1, 255)[zigzag]
        if np.array_equal(ref, table):
            return q
    raise AssertionError(f"{path}: not a libjpeg standard table")


def test_photos_sizes_cameras_quality(world: SW.WorldInfo) -> None:
    import cv2

    md_model, _ = _models(world)
    sizes, qualities, models = [], [], set()
    by_name = {im.name: im for im in md_model.images.values()}
    for name in world.photo_names:
        path = world.images_dir / name
        img = cv2.imread(str(path))
        cam = md_model.cameras[by_name[name].camera_id]
        assert (cam.width, cam.height) == (img.shape[1], img.shape[0])  # dense image at the camera's size
        models.add(cam.model.name)
        assert cam.model.name in ("SIMPLE_RADIAL", "RADIAL") and abs(cam.params[3]) > 1e-4, name  # distorted
        sizes.append((img.shape[1], img.shape[0]))
        qualities.append(_jpeg_quality(path))
    assert models == {"SIMPLE_RADIAL", "RADIAL"}
    assert any(h > w for w, h in sizes) and any(w > h for w, h in sizes)  # portrait and landscape
    assert max(max(s) for s in sizes) >= 1200 and len(set(sizes)) >= 5
    assert min(qualities) >= 70 and max(qualities) <= 95 and len(set(qualities)) >= 4
    focals = {round(md_model.cameras[by_name[n].camera_id].params[0] / max(sizes[i]), 2)
              for i, n in enumerate(world.photo_names)}
    assert len(focals) >= 5  # several focal lengths


def test_distractors_listed_apart(world: SW.WorldInfo) -> None:
    md_model, gt = _models(world)
    listed = R.read_distractors(world.gt_sparse_dir.parent)
    assert sorted(listed) == sorted(world.distractors) and len(listed) == 3
    assert sorted(listed.values()) == sorted(R.DISTRACTOR_KINDS[:3])
    scene_list = json.loads(world.scene_list_path.read_text())[0]["images"]
    assert set(listed) <= set(scene_list) and len(scene_list) == 12
    assert scene_list[-1] not in listed or scene_list[0] not in listed  # interspersed, not appended
    md_names = {im.name for im in md_model.images.values()}
    gt_names = {im.name for im in gt.images.values()}
    assert set(listed) <= md_names  # in MegaDepth's model like any photo, with depths
    assert not set(listed) & gt_names  # no ground-truth pose
    for name in listed:
        assert (world.depths_dir / f"{Path(name).stem}.h5").exists()
        assert not (world.gt_depths_dir / f"{Path(name).stem}.h5").exists()


def test_ground_truth_depth_and_occluders(world: SW.WorldInfo) -> None:
    """Each true photo's ground-truth depth is the full model's, small objects included: they
    hide part of the buildings and ground in most photos."""
    _, gt = _models(world)
    boxes, _, props = R.world_models(KW["seed"])
    assert {p.kind for p in props} == {"person", "vehicle", "tree", "pole"}
    true_names = set(world.photo_names) - set(world.distractors)
    occluded = []
    for im in gt.images.values():
        if im.name not in true_names:
            continue
        view = _world_view(world, im, gt.cameras[im.camera_id])
        full, _ = R.cast_view(view, boxes, props)
        bare, _ = R.cast_view(view, boxes, [])
        depth = read_depth_h5(world.gt_depths_dir / f"{Path(im.name).stem}.h5")
        both = (full > 0) & (depth > 0)
        assert np.allclose(depth[both], full[both], rtol=1e-5, atol=1e-4)
        assert np.array_equal(depth > 0, full > 0)
        occluded.append(float(np.mean((full > 0) & ((bare == 0) | (full < bare - 0.3)))))
    assert len(occluded) == 9
    assert sum(o > 0.01 for o in occluded) >= 5, occluded


def test_aerial_frames_show_the_degraded_model(world: SW.WorldInfo) -> None:
    """The frames' depth is the degraded copy's (footprints and heights moved, no small
    objects), not the full model's."""
    _, gt = _models(world)
    boxes, aerial_boxes, props = R.world_models(KW["seed"])
    moved = [max(np.abs(a.lo - b.lo).max(), np.abs(a.hi - b.hi).max()) for a, b in zip(boxes, aerial_boxes)]
    assert len(boxes) == len(aerial_boxes) and min(moved) > 0.01
    differ = 0
    for im in gt.images.values():
        if im.name not in world.frame_names:
            continue
        view = _world_view(world, im, gt.cameras[im.camera_id])
        depth = read_depth_h5(world.gt_depths_dir / f"{Path(im.name).stem}.h5")
        degraded, _ = R.cast_view(view, aerial_boxes, [])
        full, _ = R.cast_view(view, boxes, props)
        assert np.allclose(depth, degraded, rtol=1e-5, atol=1e-4)
        differ += int(np.mean(np.abs(full - degraded) > 0.1) > 0.005)
    assert differ >= len(world.frame_names) - 1


def test_ingest_undistorts_intrinsics(world: SW.WorldInfo, tmp_path: Path) -> None:
    """The MegaDepth preprocessing gives each distorted photo the intrinsics of its dense
    (undistorted) image: the ground truth's pinhole camera, scaled to the output size."""
    _, gt = _models(world)
    entry = MD.SceneEntry(world.scene, "0", list(world.photo_names))
    results = MD.preprocess_scene(world.megadepth_root, entry, tmp_path / "md_out")
    assert [r.status for r in results] == ["done"] * len(world.photo_names), [r.reason for r in results]
    gt_by = {im.name: gt.cameras[im.camera_id] for im in gt.images.values()}
    checked = 0
    for r in results:
        if r.name not in gt_by:
            continue
        cam = gt_by[r.name]
        nw, nh = r.size
        with np.load(Path(r.outputs[2])) as z:
            k = z["intrinsics"]
        expected = np.diag([nw / cam.width, nh / cam.height, 1.0]) @ cam.calibration_matrix()
        np.testing.assert_allclose(k, expected, rtol=2e-3, atol=0.05)
        checked += 1
    assert checked == 9


def test_contact_sheet(world: SW.WorldInfo) -> None:
    data = (world.root / R.CONTACT_SHEET).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert w > 400 and h >= 2 * 240  # at least two rows of an aerial frame beside a photo


def test_deterministic_by_seed(tmp_path: Path) -> None:
    a = SW.generate_world(tmp_path / "a", **SMALL)
    b = SW.generate_world(tmp_path / "b", **SMALL)
    c = SW.generate_world(tmp_path / "c", **{**SMALL, "seed": 6})
    assert a.photo_names == b.photo_names and a.photo_names != c.photo_names
    for name in a.photo_names:
        assert (a.images_dir / name).read_bytes() == (b.images_dir / name).read_bytes()
    for name in ("cameras.txt", "images.txt", "points3D.txt"):
        assert (a.sfm_dir / name).read_text() == (b.sfm_dir / name).read_text()
        assert (a.gt_sparse_dir / name).read_text() == (b.gt_sparse_dir / name).read_text()
    assert a.video_path.read_bytes() == b.video_path.read_bytes()


def test_world_options_checked() -> None:
    SW.check_world_options({"world": "realistic", "n_aerial": 600, "n_ground": 300, "size": [1280, 720]})
    with pytest.raises(ValueError, match="world is 'hard': must be one of easy, realistic"):
        SW.check_world_options({"world": "hard"}, where="")
    with pytest.raises(ValueError, match="only the realistic world has distractors"):
        SW.check_world_options({"distractors": 2}, where="")
    with pytest.raises(ValueError, match="distractors is 12"):
        SW.check_world_options({"world": "realistic", "n_ground": 12, "distractors": 12}, where="")
    with pytest.raises(ValueError, match="more than the 2,000,000,000"):
        SW.check_world_options({"world": "realistic", "n_aerial": 1000, "n_ground": 500, "size": [1920, 1080]})


def test_evaluation_counts_registered_distractors(world: SW.WorldInfo, tmp_path: Path) -> None:
    """A product holding a distractor is a false registration: counted apart, the goal missed;
    the true photos' accuracy is not diluted by the distractors."""
    import pycolmap

    from tasks.aerial.evaluate import evaluate_scene, summary_table

    gt = pycolmap.Reconstruction(str(world.gt_sparse_dir))
    name = world.distractors[0]
    cam = pycolmap.Camera(model="SIMPLE_PINHOLE", width=800, height=600, params=[700.0, 400.0, 300.0],
                          camera_id=10_000)
    gt.add_camera_with_trivial_rig(cam)
    gt.add_image_with_trivial_frame(pycolmap.Image(name=name, camera_id=10_000, image_id=10_000),
                                    pycolmap.Rigid3d(pycolmap.Rotation3d(np.eye(3)), np.zeros(3)))
    (tmp_path / "sparse-txt").mkdir()
    gt.write_text(str(tmp_path / "sparse-txt"))
    acc = evaluate_scene(tmp_path, world.gt_sparse_dir.parent, list(world.photo_names))
    assert acc["distractors"] == {"attempted": 3, "registered": 1,
                                  "registered names": {name: R.read_distractors(world.gt_sparse_dir.parent)[name]}}
    assert acc["poses"]["photos attempted"] == 9 and acc["poses"]["photos registered"] == 9
    row = next(r for r in summary_table(acc) if r["metric"].startswith("distractors registered"))
    assert row["met"].startswith("NO") and row["value"].startswith("1/3")
