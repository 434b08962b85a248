"""The synthetic aerial-ground world (embedded default of the aerial flow) and the
MegaDepth preprocessing checked against its ground truth."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")
import cv2  # noqa: E402
import pycolmap  # noqa: E402

from tasks.aerial import geometry  # noqa: E402
from tasks.aerial.earthstudio import ingest_scene  # noqa: E402
from tasks.aerial.synthetic_world import ensure_world, generate_world  # noqa: E402


def _pose(image) -> np.ndarray:
    m = image.cam_from_world().matrix() if callable(image.cam_from_world) else image.cam_from_world.matrix()
    return np.vstack([m, [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return generate_world(root, n_aerial=6, n_ground=4, seed=3)


def test_inputs_in_the_real_formats(world):
    doc = json.loads(world.json_path.read_text())
    assert doc["numFrames"] == 6 and len(doc["cameraFrames"]) == 7  # Earth Studio: numFrames + 1
    assert doc["width"] >= 640 and doc["height"] >= 480
    for key in ("position", "rotation", "coordinate", "fovVertical"):
        assert key in doc["cameraFrames"][0]
    cap = cv2.VideoCapture(str(world.video_path))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 6
    entries = json.loads(world.scene_list_path.read_text())
    assert entries[0]["scene"] == world.scene and len(entries[0]["images"]) == 4
    rec = pycolmap.Reconstruction(str(world.sfm_dir))
    assert rec.num_images() == 4
    for cam in rec.cameras.values():
        assert cam.model.name == "SIMPLE_RADIAL"
        f, cx, cy, k = cam.params
        assert (cx, cy) != (cam.width / 2, cam.height / 2)  # MegaDepth's principal points are not centred
        assert cam.width >= 640 or cam.height >= 640


def test_deterministic(world, tmp_path):
    again = generate_world(tmp_path, n_aerial=6, n_ground=4, seed=3)
    assert again.json_path.read_text() == world.json_path.read_text()
    a = (world.gt_sparse_dir / "images.txt").read_text()
    assert (again.gt_sparse_dir / "images.txt").read_text() == a
    name = world.photo_names[0]
    assert np.array_equal(cv2.imread(str(world.images_dir / name)), cv2.imread(str(again.images_dir / name)))


def test_ingest_round_trip_gives_the_rendering_poses(world):
    res = ingest_scene(world.root, world.scene)
    gt = pycolmap.Reconstruction(str(world.gt_sparse_dir))
    ref = pycolmap.Reconstruction(str(res.reference_model))
    assert ref.num_images() == 6
    for image in ref.images.values():
        g = gt.find_image_with_name(image.name)
        np.testing.assert_allclose(_pose(image), _pose(g), atol=1e-6)


def test_megadepth_model_is_the_ground_truth_under_a_similarity(world):
    md = pycolmap.Reconstruction(str(world.sfm_dir))
    gt = pycolmap.Reconstruction(str(world.gt_sparse_dir))
    s = world.sim_scale
    for name in world.photo_names:
        c_md = np.linalg.inv(_pose(md.find_image_with_name(name)))[:3, 3]
        c_gt = np.linalg.inv(_pose(gt.find_image_with_name(name)))[:3, 3]
        np.testing.assert_allclose(c_md, world.sim_transform(c_gt), atol=1e-6)
        stem = os.path.splitext(name)[0]
        with h5py.File(world.depths_dir / f"{stem}.h5") as f_md, h5py.File(world.gt_depths_dir / f"{stem}.h5") as f_gt:
            np.testing.assert_allclose(f_md["depth"][:], s * f_gt["depth"][:], rtol=1e-5)


def test_megadepth_preprocessing_against_ground_truth(world, tmp_path):
    from tasks.aerial import megadepth

    entry = megadepth.load_scene_list(world.scene_list_path)[0]
    results = megadepth.preprocess_scene(world.megadepth_root, entry, tmp_path)
    assert [r.status for r in results] == ["done"] * 4
    md = pycolmap.Reconstruction(str(world.sfm_dir))
    for r in results:
        out = tmp_path / entry.scene / entry.subscene
        z = np.load(out / f"{r.name}.npz")
        depth = cv2.imread(str(out / f"{r.name}.exr"), cv2.IMREAD_UNCHANGED)
        h, w = depth.shape
        k = z["intrinsics"]
        assert k[0, 2] == pytest.approx(w / 2) and k[1, 2] == pytest.approx(h / 2)
        # cam2world is the raw model's pose (same non-metric frame)
        np.testing.assert_allclose(z["cam2world"], np.linalg.inv(_pose(md.find_image_with_name(r.name))), atol=1e-9)
        # the focal length scales with the image, the depth values do not
        cam = md.cameras[md.find_image_with_name(r.name).camera_id]
        scale = w / (2 * min(cam.params[1], cam.width - cam.params[1]))
        assert k[0, 0] == pytest.approx(cam.params[0] * scale, rel=0.02)
        with h5py.File(world.depths_dir / f"{os.path.splitext(r.name)[0]}.h5") as f:
            raw = f["depth"][:]
        valid = depth[depth > 0]
        assert valid.min() >= raw[raw > 0].min() - 1e-6 and valid.max() <= raw.max() + 1e-6


def test_ensure_world_is_idempotent(tmp_path):
    a = ensure_world(tmp_path, n_aerial=3, n_ground=2)
    mtime = a.json_path.stat().st_mtime_ns
    b = ensure_world(tmp_path, n_aerial=3, n_ground=2)
    assert b.json_path.stat().st_mtime_ns == mtime
    # f = h / (2 tan(fov / 2)), worked by hand: 240 / tan(25 deg) = 514.6817...
    assert geometry.focal_from_fov(480, 50.0) == pytest.approx(514.6817, abs=1e-3)
