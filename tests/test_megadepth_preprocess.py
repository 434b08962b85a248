"""MegaDepth preprocessing (tasks/aerial/megadepth.py) on a tiny hand-made raw tree."""

from __future__ import annotations

import os

os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from tasks.aerial import megadepth as md

SCENE, SUB = "0001", "0"

# name -> (W, H, f, cx, cy, k); off-centre principal points, one portrait, one that fits. No
# distortion: a distorted camera's dense image has other intrinsics (tests/test_synthetic_realistic.py).
CAMERAS = {
    "a.jpg": (1000, 700, 900.0, 480.3, 360.0, 0.0),
    "b.jpg": (700, 1100, 1000.0, 340.6, 570.2, 0.0),
    "c.jpg": (640, 480, 500.0, 330.0, 230.0, 0.0),
}


def _pose(i: int) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera (R, t) of image i."""
    R = Rotation.from_euler("xyz", [5.0 * i + 3.0, -7.0 * i + 2.0, 11.0 * i - 4.0], degrees=True).as_matrix()
    t = np.array([0.3 * i - 0.2, 0.1 * i + 0.05, 1.5 + 0.2 * i])
    return R, t


def _depth_fn(W: int, H: int) -> np.ndarray:
    """Known depth: a plane in pixel coordinates with an unknown (0) patch."""
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    depth = (2.0 + 0.003 * xs + 0.002 * ys).astype(np.float32)
    depth[: H // 10, : W // 10] = 0.0
    return depth


def _texture(W: int, H: int, seed: int) -> np.ndarray:
    """Smooth random texture (BGR uint8), channels deliberately different."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, size=(H // 16 + 2, W // 16 + 2, 3)).astype(np.float32)
    img = cv2.resize(low, (W, H), interpolation=cv2.INTER_CUBIC)
    img[..., 2] = 0.5 * img[..., 2] + 120.0  # red brighter
    img[..., 0] = 0.5 * img[..., 0]  # blue darker
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture()
def raw_tree(tmp_path: Path) -> Path:
    """``<tmp>/md`` laid out like MegaDepth v1 (sparse text model, dense imgs, depths)."""
    root = tmp_path / "md"
    sparse = md.sparse_model_dir(root, SCENE, SUB)
    sparse.mkdir(parents=True)
    dense = md.dense_dir(root, SCENE, SUB)
    (dense / "imgs").mkdir(parents=True)
    (dense / "depths").mkdir(parents=True)
    cam_lines = ["# Camera list with one line of data per camera:",
                 "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]",
                 f"# Number of cameras: {len(CAMERAS)}"]
    img_lines = ["# Image list with two lines of data per image:",
                 "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
                 "#   POINTS2D[] as (X, Y, POINT3D_ID)",
                 f"# Number of images: {len(CAMERAS)}, mean observations per image: 0"]
    for i, (name, (W, H, f, cx, cy, k)) in enumerate(CAMERAS.items(), start=1):
        cam_lines.append(f"{i} SIMPLE_RADIAL {W} {H} {f!r} {cx!r} {cy!r} {k!r}")
        R, t = _pose(i)
        qx, qy, qz, qw = Rotation.from_matrix(R).as_quat()
        nums = " ".join(repr(float(v)) for v in (qw, qx, qy, qz, *t))
        img_lines.append(f"{i} {nums} {i} {name}")
        img_lines.append("")
        assert cv2.imwrite(str(dense / "imgs" / name), _texture(W, H, i), [cv2.IMWRITE_JPEG_QUALITY, 100])
        with h5py.File(dense / "depths" / (Path(name).stem + ".h5"), "w") as fh:
            fh.create_dataset("depth", data=_depth_fn(W, H))
    (sparse / "cameras.txt").write_text("\n".join(cam_lines) + "\n")
    (sparse / "images.txt").write_text("\n".join(img_lines) + "\n")
    (sparse / "points3D.txt").write_text(
        "# 3D point list with one line of data per point:\n"
        "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)\n"
        "# Number of points: 0, mean track length: 0\n")
    return root


def _entry() -> md.SceneEntry:
    return md.SceneEntry(SCENE, SUB, list(CAMERAS))


def _expected_geometry(name: str) -> tuple[int, int, int, int, int, int]:
    """(x0, y0, w, h, nw, nh) computed independently from the documented rule."""
    W, H, _, cx, cy, _ = CAMERAS[name]
    hw, hh = int(np.floor(min(cx, W - cx))), int(np.floor(min(cy, H - cy)))
    x0, y0, w, h = int(round(cx - hw)), int(round(cy - hh)), 2 * hw, 2 * hh
    lim = (800, 600) if w >= h else (600, 800)
    s = min(1.0, lim[0] / w, lim[1] / h)
    return x0, y0, w, h, int(round(w * s)), int(round(h * s))


def test_read_sparse_model(raw_tree: Path) -> None:
    model = md.read_sparse_model(raw_tree, SCENE, SUB)
    assert set(model) == set(CAMERAS)
    for i, (name, (W, H, f, cx, cy, _)) in enumerate(CAMERAS.items(), start=1):
        entry = model[name]
        np.testing.assert_allclose(entry.K, [[f, 0, cx], [0, f, cy], [0, 0, 1]])
        R, t = _pose(i)
        w2c = np.eye(4)
        w2c[:3, :3], w2c[:3, 3] = R, t
        np.testing.assert_allclose(entry.cam2world, np.linalg.inv(w2c), atol=1e-9)
        assert entry.size == (W, H)


def test_preprocess_scene_outputs(raw_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    results = md.preprocess_scene(raw_tree, _entry(), out)
    assert [r.status for r in results] == ["done"] * 3, [r.reason for r in results]
    folder = out / SCENE / SUB
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{n}.{ext}" for n in CAMERAS for ext in ("jpg", "exr", "npz"))

    rng = np.random.default_rng(0)
    for i, (name, (W, H, f, cx, cy, _)) in enumerate(CAMERAS.items(), start=1):
        x0, y0, w, h, nw, nh = _expected_geometry(name)
        img = cv2.imread(str(folder / f"{name}.jpg"), cv2.IMREAD_UNCHANGED)
        depth = cv2.imread(str(folder / f"{name}.exr"), cv2.IMREAD_UNCHANGED)
        with np.load(folder / f"{name}.npz") as z:
            K, c2w = z["intrinsics"], z["cam2world"]
        # size: fits the box, aspect kept (+-1 px), never upscaled
        assert img.shape == (nh, nw, 3) and depth.shape == (nh, nw)
        assert results[i - 1].size == (nw, nh)
        if nw >= nh:
            assert nw <= 800 and nh <= 600
        else:
            assert nw <= 600 and nh <= 800
        assert abs(nh - nw * h / w) <= 1.0
        if w <= 800 and h <= 800 and (w, h) == (nw, nh):
            assert name == "c.jpg"
        else:
            assert nw in (600, 800) or nh in (600, 800)
        # principal point exactly centred
        assert K[0, 2] == nw / 2 and K[1, 2] == nh / 2
        sx, sy = nw / w, nh / h
        np.testing.assert_allclose([K[0, 0], K[1, 1]], [f * sx, f * sy], rtol=1e-12)
        # cam2world is the inverse of the given world-to-camera
        R, t = _pose(i)
        w2c = np.eye(4)
        w2c[:3, :3], w2c[:3, 3] = R, t
        np.testing.assert_allclose(c2w, np.linalg.inv(w2c), atol=1e-9)
        # projections map through the crop + scale transform
        Kraw = np.array([[f, 0, cx], [0, f, cy], [0, 0, 1.0]])
        pix = rng.uniform([0.2 * W, 0.2 * H], [0.8 * W, 0.8 * H], size=(20, 2))
        cam = np.linalg.inv(Kraw) @ np.c_[pix, np.ones(20)].T * rng.uniform(1, 5, 20)
        world = R.T @ (cam - t[:, None])
        uv_raw = Kraw @ (R @ world + t[:, None])
        uv_raw = uv_raw[:2] / uv_raw[2]
        w2c_new = np.linalg.inv(c2w)
        uv_new = K @ (w2c_new[:3, :3] @ world + w2c_new[:3, 3:])
        uv_new = uv_new[:2] / uv_new[2]
        expected = np.stack([(uv_raw[0] - x0) * sx, (uv_raw[1] - y0) * sy])
        err = np.abs(uv_new - expected)
        assert (err[0] <= 0.5 * sx + 1e-6).all() and (err[1] <= 0.5 * sy + 1e-6).all()
        # depth: float32, nearest (values unchanged) at corresponding pixels
        assert depth.dtype == np.float32
        raw_depth = _depth_fn(W, H)
        ys = y0 + np.floor((np.arange(nh) + 0.5) * h / nh).astype(int)
        xs = x0 + np.floor((np.arange(nw) + 0.5) * w / nw).astype(int)
        np.testing.assert_array_equal(depth, raw_depth[ys[:, None], xs[None, :]])
        # image: the INTER_AREA resize of the crop, colours in the same order
        raw = cv2.imread(str(md.raw_image_path(raw_tree, SCENE, SUB, name)), cv2.IMREAD_COLOR)
        ref = cv2.resize(raw[y0:y0 + h, x0:x0 + w], (nw, nh), interpolation=cv2.INTER_AREA)
        assert np.abs(img.astype(float) - ref).mean() < 2.0
        assert img[..., 2].mean() > img[..., 0].mean() + 50


def test_rerun_skips(raw_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    md.preprocess_scene(raw_tree, _entry(), out)
    files = sorted((out / SCENE / SUB).iterdir())
    mtimes = [p.stat().st_mtime_ns for p in files]
    again = md.preprocess_scene(raw_tree, _entry(), out, workers=2)
    assert [r.status for r in again] == ["skipped"] * 3
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    # an incomplete output (no npz) is redone
    (out / SCENE / SUB / "a.jpg.npz").unlink()
    third = md.preprocess_scene(raw_tree, _entry(), out)
    assert [r.status for r in third] == ["done", "skipped", "skipped"]
    assert not [p for p in (out / SCENE / SUB).iterdir() if ".partial." in p.name]


def test_failures_are_reported(raw_tree: Path, tmp_path: Path) -> None:
    depth_b = md.raw_depth_path(raw_tree, SCENE, SUB, "b.jpg")
    depth_b.unlink()
    with h5py.File(md.raw_depth_path(raw_tree, SCENE, SUB, "c.jpg"), "w") as fh:
        fh.create_dataset("depth", data=np.ones((10, 10), np.float32))
    entry = md.SceneEntry(SCENE, SUB, ["a.jpg", "b.jpg", "c.jpg", "zzz.jpg"])
    results = {r.name: r for r in md.preprocess_scene(raw_tree, entry, tmp_path / "out")}
    assert results["a.jpg"].status == "done"
    assert results["b.jpg"].status == "failed" and str(depth_b) in results["b.jpg"].reason
    assert results["c.jpg"].status == "failed" and "c.h5" in results["c.jpg"].reason
    assert results["zzz.jpg"].status == "failed" and "not in sparse model" in results["zzz.jpg"].reason
    assert not (tmp_path / "out" / SCENE / SUB / "b.jpg.npz").exists()
    # missing model: every image fails, naming the folder, nothing raised
    missing = md.preprocess_scene(raw_tree, md.SceneEntry("9999", "0", ["x.jpg"]), tmp_path / "out")
    assert missing[0].status == "failed" and "9999" in missing[0].reason


def test_image_jobs_are_picklable(raw_tree: Path, tmp_path: Path) -> None:
    import pickle

    jobs = md.image_jobs(raw_tree, _entry(), tmp_path / "out")
    result = md.preprocess_image(*pickle.loads(pickle.dumps(jobs[0])))
    assert result.status == "done"
    assert pickle.loads(pickle.dumps(result)) == result


def test_scene_list_forms(tmp_path: Path) -> None:
    expected = [md.SceneEntry("0001", "0", ["a.jpg", "b.jpg"]),
                md.SceneEntry("0001", "1", ["c.jpg"]),
                md.SceneEntry("0010", "0", ["d.JPG"])]
    npz = tmp_path / "megadepth_image_list_v0.npz"
    np.savez(npz, data=np.array({("0001", 0): np.array(["a.jpg", "b.jpg"]), (1, "1"): ["c.jpg"],
                                 ("0010", "0"): ["d.JPG"]}, dtype=object))
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([{"scene": e.scene, "subscene": e.subscene, "images": e.images}
                                   for e in expected]))
    as_map = tmp_path / "map.json"
    as_map.write_text(json.dumps({"0001": {"0": ["a.jpg", "b.jpg"], "1": ["c.jpg"]}, "0010": {"0": ["d.JPG"]}}))
    as_yaml = tmp_path / "map.yaml"
    as_yaml.write_text("0001:\n  0: [a.jpg, b.jpg]\n  1:\n    - c.jpg\n0010:\n  0: [d.JPG]\n")
    for path in (npz, as_list, as_map, as_yaml):
        assert md.load_scene_list(path) == expected, path

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"scene": "0001", "subscene": "0", "images": []}, {"scene": "0002"}]))
    with pytest.raises(ValueError, match=r"bad\.json.*entry #1.*subscene"):
        md.load_scene_list(bad)
    bad.write_text(json.dumps({"0001": {"0": "a.jpg"}}))
    with pytest.raises(ValueError, match=r"bad\.json.*'0001'/'0'"):
        md.load_scene_list(bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        md.load_scene_list(tmp_path / "nope.json")


# ---------------------------------------------------------------------------------------------
# issue 26 item 6: names from input files become paths only through one checked join
# ---------------------------------------------------------------------------------------------
EVIL = "../../../escaped.jpg"


def test_a_traversing_image_name_writes_nothing_outside_the_output(raw_tree: Path, tmp_path: Path) -> None:
    """An image name with ``../`` (as an images.txt or a scene list could hold) made preprocessing
    write .jpg/.exr/.npz outside the output folder; now that image fails alone, with a clear
    reason, and the others are processed."""
    import pycolmap

    sparse = md.sparse_model_dir(raw_tree, SCENE, SUB)
    rec = pycolmap.Reconstruction(str(sparse))
    image = next(im for im in rec.images.values() if im.name == "a.jpg")
    image.name = EVIL  # the sparse model names the image with a path that climbs out
    rec.write_text(str(sparse))
    dense = md.dense_dir(raw_tree, SCENE, SUB)
    raw = Path(os.path.normpath(dense / "imgs" / EVIL))  # where an unchecked join would read it
    raw.parent.mkdir(parents=True, exist_ok=True)
    (dense / "imgs" / "a.jpg").rename(raw)
    (dense / "depths" / "a.h5").rename(dense / "depths" / "escaped.h5")
    out = tmp_path / "out"
    results = {r.name: r for r in md.preprocess_scene(raw_tree, md.SceneEntry(SCENE, SUB, [EVIL, "b.jpg"]), out)}
    assert results["b.jpg"].status == "done"
    bad = results[EVIL]
    assert bad.status == "failed" and "image name '../../../escaped.jpg' contains a path separator" in bad.reason
    assert "only a plain file name is allowed" in bad.reason
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(raw_tree)]
    assert written and all(p.is_relative_to(out) for p in written), written


@pytest.mark.parametrize("images, subscene, expected", [
    (["../../x.jpg"], "0", "image name '../../x.jpg' contains a path separator"),
    (["/etc/passwd"], "0", "image name '/etc/passwd' contains a path separator"),
    ([".."], "0", "image name '..' is a reference to a folder"),
    (["a\x00.jpg"], "0", "contains a NUL or control character"),
    (["a.jpg"], "../0", "subscene id '../0' contains a path separator"),
])
def test_scene_list_names_are_plain_names(tmp_path: Path, images, subscene, expected) -> None:
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"scene": "0001", "subscene": subscene, "images": images}]))
    with pytest.raises(ValueError, match="only a plain file name") as info:
        md.load_scene_list(path)
    assert str(path) in str(info.value) and "entry #0" in str(info.value) and expected in str(info.value)


def test_the_checked_join_refuses_what_a_plain_join_would_follow(tmp_path: Path) -> None:
    from tasks.common.checks import InputError, safe_join

    assert safe_join(tmp_path, "0001", "a.jpg") == tmp_path / "0001" / "a.jpg"
    for name in ("..", "../x", "a/b", "a\\b", "/abs", "", " a", "a\x00b", "C:x"):
        with pytest.raises(InputError):
            safe_join(tmp_path, name, what="image name")
    (tmp_path / "link").symlink_to("/etc")  # a link that already leads out is refused too
    with pytest.raises(InputError, match="leads outside"):
        safe_join(tmp_path, "link", "passwd")
    # the last name may be a link itself (the pipeline's own image links into footage/, a user's
    # linked photos): a reader follows it, a writer replaces it (temporary name, then rename)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").symlink_to(tmp_path / "footage.jpg")
    assert safe_join(tmp_path / "images", "a.jpg") == tmp_path / "images" / "a.jpg"
    with pytest.raises(ValueError, match="scene id '../x'"):
        md.output_paths(tmp_path, "../x", "0", "a.jpg")
