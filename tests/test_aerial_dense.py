"""Tests of the dense package (tasks/aerial/dense/): file formats, workspace, source selection and the
SGBM CPU backend against the synthetic world's exact depth (PatchMatch: test_aerial_patchmatch.py)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pycolmap
import pytest

from tasks.aerial import dense
from tasks.aerial.earthstudio import ingest_scene
from tasks.aerial.synthetic_world import WorldInfo, generate_world

# 48 frames keep the neighbouring aerial views close enough for stereo; 256x192 keeps it fast.
KW = dict(n_aerial=48, n_ground=2, size=(256, 192), seed=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> WorldInfo:
    root = tmp_path_factory.mktemp("dense_world")
    info = generate_world(root, **KW)
    ingest_scene(root, info.scene)
    return info


def _mapping(world: WorldInfo) -> dict[str, Path]:
    footage = world.root / "data" / world.scene / "footage"
    m = {n: footage for n in world.frame_names}
    m.update({n: world.images_dir for n in world.photo_names})
    return m


@pytest.fixture(scope="module")
def workspace(world: WorldInfo, tmp_path_factory) -> Path:
    return dense.prepare_workspace(world.gt_sparse_dir, _mapping(world), tmp_path_factory.mktemp("ws") / "dense")


def _gt(world: WorldInfo, name: str) -> np.ndarray:
    return dense.read_depth_h5(world.gt_depths_dir / f"{dense.image_stem(name)}.h5")


def _stereo_frames(workspace: Path, world: WorldInfo, n: int) -> list[str]:
    """The aerial frames with the most rectifiable sources (no assumption about the trajectory)."""
    ws = dense.open_workspace(workspace)
    cfg = dense.DenseConfig()
    scored = []
    for name in world.frame_names:
        ref = dense.views._cam(ws.rec, ws.by_name[name])
        good = 0
        for j in dense.select_sources(ws.rec, ref.image_id, cfg.num_sources):
            b = dense.views._cam(ws.rec, j).centre - ref.centre
            if min(dense.views._angle(b, ref.axis), dense.views._angle(-b, ref.axis)) >= cfg.sgbm.min_baseline_angle:
                good += 1
        scored.append((-good, name))
    scored.sort()
    assert -scored[n - 1][0] >= 2, f"fewer than {n} aerial frames have two rectifiable sources: {scored[:n]}"
    return [name for _, name in scored[:n]]


def _metrics(est: np.ndarray, gt: np.ndarray) -> dict:
    both = (est > 0) & (gt > 0)
    e, g = est[both].astype(float), gt[both].astype(float)
    return {"valid": float((est > 0).mean()), "abs_rel": float(np.mean(np.abs(e - g) / g)),
            "d125": float(np.mean(np.maximum(e / g, g / e) < 1.25)),
            "spurious": float(((est > 0) & (gt <= 0)).sum() / max(1, (est > 0).sum()))}


# ----------------------------------------------------------------------------- accuracy


def test_depth_cpu_matches_ground_truth(workspace: Path, world: WorldInfo) -> None:
    for name in _stereo_frames(workspace, world, 2):
        info: dict = {}
        est = dense.depth_cpu(workspace, name, dense.DenseConfig(), info=info)
        gt = _gt(world, name)
        assert est.shape == gt.shape and est.dtype == np.float32
        m = _metrics(est, gt)
        assert len(info["sources"]) >= 2, info
        assert m["valid"] >= 0.2, (name, m, info)
        assert m["abs_rel"] < 0.05, (name, m)
        assert m["d125"] >= 0.9, (name, m)
        assert m["spurious"] < 0.05, (name, m)


def test_depth_cpu_with_manual_depth_range(workspace: Path, world: WorldInfo) -> None:
    """A given depth range shifts the disparity search window (non-zero principal point offset
    between the rectified views); the depth must stay right."""
    name = _stereo_frames(workspace, world, 1)[0]
    gt = _gt(world, name)
    lo, hi = np.percentile(gt[gt > 0], [1, 90])
    cfg = dense.DenseConfig(depth_min=float(lo) * 0.8, depth_max=float(hi) * 1.2)
    m = _metrics(dense.depth_cpu(workspace, name, cfg), gt)
    assert m["valid"] >= 0.1 and m["abs_rel"] < 0.05 and m["d125"] >= 0.9, m


def test_fuse_depths_median_of_agreeing() -> None:
    nan = np.nan
    est = np.array([[[10.0, 10.0, 10.0]], [[10.2, 20.0, nan]], [[30.0, 10.1, 0.0]], [[10.1, nan, nan]]], np.float32)
    depth, count = dense.fuse_depths(est, rel_tolerance=0.03, min_consistent=2)
    # pixel 0: 10, 10.2, 10.1 agree (30 not): median 10.1; pixel 1: 10 and 10.1; pixel 2: a single estimate
    np.testing.assert_allclose(depth[0], [10.1, 10.05, 0.0], rtol=1e-6)
    assert count[0].tolist() == [3, 2, 0]
    depth1, _ = dense.fuse_depths(est, rel_tolerance=0.03, min_consistent=1)
    assert depth1[0, 2] == pytest.approx(10.0)


# ----------------------------------------------------------------------------- files


def test_h5_round_trip(tmp_path: Path) -> None:
    depth = np.random.default_rng(0).uniform(0, 100, (17, 23)).astype(np.float64)
    depth[3, 4] = 0
    path = tmp_path / "sub" / "0001_000.h5"
    dense.write_depth_h5(path, depth)
    with h5py.File(path, "r") as f:
        assert list(f.keys()) == ["depth"]
        ds = f["depth"]
        assert ds.dtype == np.float32 and ds.compression == "gzip" and ds.shape == (17, 23)
    back = dense.read_depth_h5(path)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, depth.astype(np.float32))
    assert [p.name for p in path.parent.iterdir()] == ["0001_000.h5"]  # no temporary left behind
    with pytest.raises(ValueError):
        dense.write_depth_h5(tmp_path / "x.h5", np.zeros((2, 2, 2)))


def test_colmap_bin_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    d = rng.uniform(1, 50, (5, 7)).astype(np.float32)
    p = dense.write_colmap_array(tmp_path / "a.jpg.geometric.bin", d)
    raw = p.read_bytes()
    assert raw.startswith(b"7&5&1&")
    # COLMAP's layout: x fastest, then y, then channel (column-major width x height x channels)
    np.testing.assert_array_equal(np.frombuffer(raw[len(b"7&5&1&"):], "<f4"), d.ravel())
    np.testing.assert_array_equal(dense.read_colmap_array(p), d)
    n = rng.normal(size=(4, 6, 3)).astype(np.float32)
    p3 = dense.write_colmap_array(tmp_path / "n.bin", n)
    raw3 = p3.read_bytes()
    assert raw3.startswith(b"6&4&3&")
    # pycolmap 4 (COLMAP's own writer) gives the same bytes: channels interleaved per pixel
    pycolmap.NormalMap.from_array(n).write(str(tmp_path / "n_colmap.bin"))
    assert (tmp_path / "n_colmap.bin").read_bytes() == raw3
    np.testing.assert_array_equal(np.frombuffer(raw3[6:], "<f4"), n.ravel())
    np.testing.assert_array_equal(dense.read_colmap_array(p3), n)
    back = pycolmap.NormalMap()
    back.read(str(p3))
    np.testing.assert_array_equal(back.to_array(), n)
    (tmp_path / "bad.bin").write_bytes(b"7&5&1&" + b"\0" * 12)
    with pytest.raises(ValueError, match="truncated"):
        dense.read_colmap_array(tmp_path / "bad.bin")


def test_image_stem() -> None:
    assert dense.image_stem("0001_000.jpeg") == "0001_000"
    assert dense.image_stem("123_o.jpg.jpg") == "123_o.jpg"
    assert dense.image_stem("dir/x.png") == "dir/x"
    assert dense.depth_path(Path("/d"), "123_o.jpg.jpg") == Path("/d/123_o.jpg.h5")


def test_ply_round_trip(tmp_path: Path) -> None:
    xyz = np.arange(12, dtype=np.float32).reshape(4, 3)
    rgb = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [250, 251, 252]], np.uint8)
    p = dense.write_ply_points(tmp_path / "fused.ply", xyz, rgb)
    head = p.read_bytes()[:200]
    assert head.startswith(b"ply\nformat binary_little_endian 1.0\nelement vertex 4\n")
    assert b"property uchar red" in head
    assert p.stat().st_size == len(head.split(b"end_header\n")[0]) + len(b"end_header\n") + 4 * 15
    xyz2, rgb2 = dense.read_ply_points(p)
    np.testing.assert_array_equal(xyz2, xyz)
    np.testing.assert_array_equal(rgb2, rgb)


# ----------------------------------------------------------------------------- workspace


def test_prepare_workspace_layout_and_idempotence(workspace: Path, world: WorldInfo) -> None:
    rec = pycolmap.Reconstruction(str(workspace / "sparse"))
    assert (workspace / "sparse" / "cameras.bin").exists()
    assert rec.num_images() == len(world.frame_names) + len(world.photo_names)
    for cam in rec.cameras.values():
        assert cam.model_name == "SIMPLE_PINHOLE"  # SIMPLE_RADIAL k=0 converted
    for name in world.photo_names + world.frame_names[:3]:
        assert (workspace / "images" / name).read_bytes() == (_mapping(world)[name] / name).read_bytes()
    before = {p.name: p.stat().st_mtime_ns for p in (workspace / "images").iterdir()}
    dense.prepare_workspace(world.gt_sparse_dir, _mapping(world), workspace)
    after = {p.name: p.stat().st_mtime_ns for p in (workspace / "images").iterdir()}
    assert before == after
    assert not list(workspace.glob(".*"))  # no partial folders or files left


def _tiny_model(path: Path, model: str, params: list[float]) -> Path:
    rec = pycolmap.Reconstruction()
    rec.add_camera_with_trivial_rig(pycolmap.Camera(model=model, width=64, height=48, params=params, camera_id=7))
    im = pycolmap.Image(name="a.jpg", camera_id=7, image_id=1)
    rec.add_image_with_trivial_frame(im, pycolmap.Rigid3d(pycolmap.Rotation3d(np.eye(3)), np.zeros(3)))
    path.mkdir(parents=True)
    rec.write(str(path))
    return path


def test_prepare_workspace_rejects_distortion(tmp_path: Path) -> None:
    model = _tiny_model(tmp_path / "m1", "OPENCV", [50, 50, 32, 24, 0.1, 0, 0, 0])
    with pytest.raises(ValueError, match=r"camera 7 .*a\.jpg.*undistort_images"):
        dense.prepare_workspace(model, tmp_path, tmp_path / "ws1")
    model = _tiny_model(tmp_path / "m2", "OPENCV_FISHEYE", [50, 50, 32, 24, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="camera 7"):
        dense.prepare_workspace(model, tmp_path, tmp_path / "ws2")
    # zero distortion and fx != fy: accepted as PINHOLE
    model = _tiny_model(tmp_path / "m3", "OPENCV", [50, 60, 32, 24, 0, 0, 0, 0])
    ws = dense.prepare_workspace(model, tmp_path, tmp_path / "ws3")  # the image itself is missing: logged only
    cam = pycolmap.Reconstruction(str(ws / "sparse")).cameras[7]
    assert cam.model_name == "PINHOLE" and list(cam.params) == [50, 60, 32, 24]


def test_select_sources(workspace: Path, world: WorldInfo) -> None:
    rec = pycolmap.Reconstruction(str(workspace / "sparse"))
    by_name = {im.name: i for i, im in rec.images.items()}
    ref = by_name[world.frame_names[len(world.frame_names) // 4]]
    src = dense.select_sources(rec, ref, 4)
    assert 1 <= len(src) <= 4 and ref not in src and len(set(src)) == len(src)
    assert dense.select_sources(rec, ref, 4) == src  # deterministic
    assert src[0] not in dense.select_sources(rec, ref, 4, exclude=[src[0]])
    # a model with poses only (no 3D points) still yields sources
    for pid in list(rec.points3D):
        rec.delete_point3D(pid)
    assert rec.num_points3D() == 0
    assert len(dense.select_sources(rec, ref, 4)) >= 1


# ----------------------------------------------------------------------------- run_dense


def test_run_dense_resume_and_failures(world: WorldInfo, workspace: Path, tmp_path: Path) -> None:
    ws = dense.prepare_workspace(world.gt_sparse_dir, _mapping(world), tmp_path / "ws")
    good = _stereo_frames(ws, world, 1)[0]
    corrupt, missing = world.frame_names[-1], world.frame_names[-2]
    (ws / "images" / corrupt).unlink()  # a hard link: unlink first so the source stays intact
    (ws / "images" / corrupt).write_bytes(b"not a jpeg at all")
    (ws / "images" / missing).unlink()
    depth_dir = tmp_path / "depths"
    names = [good, corrupt, missing, "not_in_model.jpg"]
    res = dense.run_dense(ws, names, dense.DenseConfig(), depth_dir)
    assert set(res["failures"]) == {corrupt, missing, "not_in_model.jpg"}
    assert "decode" in res["failures"][corrupt]
    assert "missing" in res["failures"][missing]
    st = res["stats"][good]
    assert st["valid_fraction"] >= 0.2 and st["seconds"] > 0 and not st["skipped"]
    out = dense.depth_path(depth_dir, good)
    assert out.exists() and not dense.depth_path(depth_dir, corrupt).exists()
    m = _metrics(dense.read_depth_h5(out), _gt(world, good))
    assert m["abs_rel"] < 0.05 and m["d125"] >= 0.9
    mtime = out.stat().st_mtime_ns
    res2 = dense.run_dense(ws, [good], dense.DenseConfig(), depth_dir)
    assert res2["stats"][good]["skipped"] is True
    assert res2["stats"][good]["valid_fraction"] == pytest.approx(st["valid_fraction"])
    assert out.stat().st_mtime_ns == mtime
    # a truncated output is recomputed
    out.write_bytes(b"\x89HDF\r\n")
    res3 = dense.run_dense(ws, [good], dense.DenseConfig(), depth_dir)
    assert res3["stats"][good]["skipped"] is False and dense.read_depth_h5(out).shape == _gt(world, good).shape

    ply = dense.fused_point_cloud_cpu(ws, depth_dir, stride=2)
    xyz, rgb = dense.read_ply_points(ply)
    assert ply == ws / "fused.ply" and len(xyz) > 100 and np.isfinite(xyz).all()
    # the fused points lie on the ground-truth surface of the image they came from
    cam = dense.views._cam(dense.open_workspace(ws).rec, dense.open_workspace(ws).by_name[good])
    uv, z = dense.views._project(cam, xyz.astype(float))
    gt = _gt(world, good)
    ui, vi = np.clip(uv[:, 0].astype(int), 0, cam.width - 1), np.clip(uv[:, 1].astype(int), 0, cam.height - 1)
    rel = np.abs(z - gt[vi, ui]) / np.maximum(gt[vi, ui], 1e-6)
    assert np.median(rel) < 0.02


# ----------------------------------------------------------------------------- GPU backend (layout only here)


def test_dense_gpu_needs_cuda(workspace: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(pycolmap, "has_cuda", False)  # also on a CUDA build: the check itself
    with pytest.raises(RuntimeError, match="pycolmap is built without CUDA: install pycolmap-cuda12 on GPU workers"):
        dense.dense_gpu(workspace, dense.DenseConfig(backend="gpu"), tmp_path / "depths")


def test_stereo_layout_and_colmap_export(world: WorldInfo, tmp_path: Path) -> None:
    ws = dense.prepare_workspace(world.gt_sparse_dir, _mapping(world), tmp_path / "ws")
    problems = dense.write_stereo_config(ws, dense.DenseConfig(num_sources=3))
    for sub in ("depth_maps", "normal_maps", "consistency_graphs"):
        assert (ws / "stereo" / sub).is_dir()
    lines = (ws / "stereo" / "patch-match.cfg").read_text().splitlines()
    assert len(lines) == 2 * len(problems) and len(problems) >= len(world.frame_names) // 2
    all_names = set(world.frame_names) | set(world.photo_names)
    for ref, srcs in zip(lines[0::2], lines[1::2]):
        names = [s.strip() for s in srcs.split(",")]
        assert ref in all_names and 1 <= len(names) <= 3 and ref not in names
        assert set(names) <= all_names and names == problems[ref]
    assert (ws / "stereo" / "fusion.cfg").read_text().splitlines() == list(problems)

    # what PatchMatch leaves behind, converted to depths/<stem>.h5 (half size -> nearest upsampling)
    name = world.frame_names[0]
    h, w = KW["size"][1], KW["size"][0]
    small = np.arange((h // 2) * (w // 2), dtype=np.float32).reshape(h // 2, w // 2) + 1
    small[0, 0] = -1  # invalid values become 0
    dense.write_colmap_array(ws / "stereo" / "depth_maps" / f"{name}.geometric.bin", small)
    res = dense.export_colmap_depths(ws, tmp_path / "depths", [name, world.frame_names[1]])
    assert world.frame_names[1] in res["failures"]
    d = dense.read_depth_h5(dense.depth_path(tmp_path / "depths", name))
    assert d.shape == (h, w)
    assert d[0, 0] == 0 and d[1, 1] == 0 and d[2, 2] == small[1, 1] and d[-1, -1] == small[-1, -1]


def test_no_partial_files_left(tmp_path: Path) -> None:
    dense.write_depth_h5(tmp_path / "a.h5", np.ones((3, 3)))
    dense.write_colmap_array(tmp_path / "b.bin", np.ones((3, 3)))
    dense.write_ply_points(tmp_path / "c.ply", np.zeros((2, 3)))
    assert sorted(os.listdir(tmp_path)) == ["a.h5", "b.bin", "c.ply"]


def _two_view_model(big: tuple[int, int, float], small: tuple[int, int, float]) -> pycolmap.Reconstruction:
    """Poses only: image 1 (camera ``big``: width, height, focal) at the origin looking down +z, image 2
    (``small``) 2 m to the side, turned to the same point 20 m ahead."""
    rec = pycolmap.Reconstruction()
    for cid, (w, h, f) in ((1, big), (2, small)):
        rec.add_camera_with_trivial_rig(pycolmap.Camera(model="SIMPLE_PINHOLE", width=w, height=h,
                                                        params=[f, w / 2, h / 2], camera_id=cid))
    z = np.array([-2.0, 0.0, 20.0]) / np.linalg.norm([-2.0, 0.0, 20.0])
    x = np.cross([0.0, 1.0, 0.0], z)
    R = np.stack([x / np.linalg.norm(x), [0.0, 1.0, 0.0], z])
    for iid, rot, centre in ((1, np.eye(3), np.zeros(3)), (2, R, np.array([2.0, 0.0, 0.0]))):
        im = pycolmap.Image(name=f"{iid}.jpg", camera_id=iid, image_id=iid)
        rec.add_image_with_trivial_frame(im, pycolmap.Rigid3d(pycolmap.Rotation3d(rot), -rot @ centre))
    return rec


def test_source_scale_ratio_is_measured_at_the_working_size() -> None:
    """A 1600-pixel photo (focal 1600) and a 640-pixel frame (focal 400) see the same surface 4x apart
    at full resolution, 1.6x apart once both are shrunk to PatchMatch's 320-pixel working size,
    where its windows are compared: the frame is a source there (``scale_ratio_at_working_size``, off by
    default: on the demo it cost 2.8 points of photo coverage), and not at full resolution."""
    from tasks.aerial.dense import patchmatch as PM
    from tasks.aerial.dense import views
    from tasks.aerial.dense.config import DenseConfig

    rec = _two_view_model((1600, 1200, 1600.0), (640, 480, 400.0))
    assert dense.select_sources(rec, 1, 4) == []  # ratio 4 > max_scale_ratio 2
    assert dense.select_sources(rec, 1, 4, work_size=320) == [2]
    assert views.select_sources_covering(rec, 1, 4, work_size=320) == [2]
    cfg = DenseConfig(scale_ratio_at_working_size=True)
    assert cfg.patchmatch.max_image_size == 320 and cfg.max_scale_ratio == 2.0
    assert PM.source_ids(rec, 1, cfg) == [2]
    assert PM.source_ids(rec, 1, DenseConfig()) == []  # the default: at full resolution
    # the other way round too, and a working size larger than both images changes nothing
    assert dense.select_sources(rec, 2, 4, work_size=320) == [1]
    assert dense.select_sources(rec, 2, 4, work_size=4000) == dense.select_sources(rec, 2, 4) == []
    # equal image sizes (the easy world): the same sources at any working size
    same = _two_view_model((640, 480, 500.0), (640, 480, 500.0))
    assert dense.select_sources(same, 1, 4, work_size=320) == dense.select_sources(same, 1, 4) == [2]
