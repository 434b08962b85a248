"""Tests of the synthetic aerial-ground world generator (tasks/aerial/synthetic_world.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")

import cv2  # noqa: E402
import h5py  # noqa: E402
import pycolmap  # noqa: E402

from tasks.aerial.geometry import cam2world_rotation, focal_from_fov, geodetic_to_enu  # noqa: E402
from tasks.aerial.synthetic_world import WorldInfo, _make_city, ensure_world, generate_world  # noqa: E402

KW = dict(scene="0001", seed=3, n_aerial=6, n_ground=4, size=(640, 480))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> WorldInfo:
    return generate_world(tmp_path_factory.mktemp("world_a"), **KW)


@pytest.fixture(scope="module")
def world_again(tmp_path_factory) -> WorldInfo:
    return generate_world(tmp_path_factory.mktemp("world_b"), **KW)


def _depth(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["depth"][()]


def _c2w(image: pycolmap.Image) -> tuple[np.ndarray, np.ndarray]:
    """(R_c2w, centre) of a COLMAP image."""
    m = image.cam_from_world().matrix()
    r, t = m[:, :3], m[:, 3]
    return r.T, -r.T @ t


def _gt(world: WorldInfo) -> pycolmap.Reconstruction:
    return pycolmap.Reconstruction(str(world.gt_sparse_dir))


def _by_name(rec: pycolmap.Reconstruction) -> dict[str, pycolmap.Image]:
    return {im.name: im for im in rec.images.values()}


def test_determinism(world: WorldInfo, world_again: WorldInfo) -> None:
    assert world.json_path.read_text() == world_again.json_path.read_text()
    for name in ("images.txt", "cameras.txt", "points3D.txt"):
        assert (world.gt_sparse_dir / name).read_text() == (world_again.gt_sparse_dir / name).read_text()
        assert (world.sfm_dir / name).read_text() == (world_again.sfm_dir / name).read_text()
    for name in world.photo_names:
        assert (world.images_dir / name).read_bytes() == (world_again.images_dir / name).read_bytes()
    assert world.photo_names == world_again.photo_names
    assert world.sim_scale == world_again.sim_scale


def test_earth_studio_export(world: WorldInfo) -> None:
    es = json.loads(world.json_path.read_text())
    assert es["numFrames"] == KW["n_aerial"]
    assert len(es["cameraFrames"]) == es["numFrames"] + 1
    assert (es["width"], es["height"]) == KW["size"]
    for fr in es["cameraFrames"]:
        assert set(fr) >= {"position", "rotation", "coordinate", "fovVertical"}
        assert set(fr["position"]) == {"x", "y", "z"}
        assert set(fr["coordinate"]) == {"latitude", "longitude", "altitude"}
    alts = [fr["coordinate"]["altitude"] - world.origin[2] for fr in es["cameraFrames"]]
    assert max(alts) > 250 and min(alts) < 60
    cap = cv2.VideoCapture(str(world.video_path))
    n = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        assert frame.shape == (480, 640, 3)
        n += 1
    assert n == es["numFrames"]
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == es["numFrames"]


def test_ingest_round_trip(world: WorldInfo) -> None:
    """Earth Studio JSON -> ENU of the first frame (contract conventions) == GT aerial poses."""
    es = json.loads(world.json_path.read_text())
    c0 = es["cameraFrames"][0]["coordinate"]
    lat0, lon0, alt0 = c0["latitude"], c0["longitude"], c0["altitude"]
    gt = _by_name(_gt(world))
    f = focal_from_fov(es["height"], es["cameraFrames"][0]["fovVertical"])
    for k, name in enumerate(world.frame_names):
        fr = es["cameraFrames"][k]
        c = fr["coordinate"]
        pos = geodetic_to_enu(c["latitude"], c["longitude"], c["altitude"], lat0, lon0, alt0)
        rot = cam2world_rotation([fr["rotation"][a] for a in "xyz"], lat0, lon0)
        r_gt, c_gt = _c2w(gt[name])
        assert np.allclose(pos, c_gt, atol=1e-6, rtol=0)
        assert np.abs(rot - r_gt).max() < 1e-9
        cam = gt[name].camera
        assert cam.model.name == "SIMPLE_PINHOLE"
        assert np.allclose(cam.params, [f, es["width"] / 2, es["height"] / 2])
    assert np.allclose(geodetic_to_enu(lat0, lon0, alt0, *world.first_frame_origin), 0, atol=1e-9)


def test_depth_matches_analytic_intersection(world: WorldInfo) -> None:
    """GT depth at pixels equals the analytic ray / box-or-ground intersection distance."""
    rng = np.random.default_rng(0)
    boxes = _make_city(np.random.default_rng(KW["seed"]))
    es = json.loads(world.json_path.read_text())
    gt = _by_name(_gt(world))
    from tasks.aerial.synthetic_world import _rigid_world_to_first
    from tasks.aerial.geometry import geodetic_to_enu as g2e

    c0 = es["cameraFrames"][0]["coordinate"]
    first_world = g2e(c0["latitude"], c0["longitude"], c0["altitude"], *world.origin)
    a, b, _ = _rigid_world_to_first(*world.origin, first_world)
    checked = 0
    for name in world.photo_names[:2] + world.frame_names[:2]:
        im = gt[name]
        r_first, c_first = _c2w(im)
        r_w, c_w = a.T @ r_first, a.T @ (c_first - b)
        cam = im.camera
        f, cx, cy = cam.params[0], cam.params[1], cam.params[2]
        depth = _depth(world.gt_depths_dir / f"{Path(name).stem}.h5")
        assert depth.shape == (cam.height, cam.width)
        for _ in range(40):
            u, v = int(rng.integers(0, cam.width)), int(rng.integers(0, cam.height))
            d = r_w @ np.array([(u + 0.5 - cx) / f, (v + 0.5 - cy) / f, 1.0])
            ts = []
            if c_w[2] > 0 and d[2] < 0:
                ts.append(-c_w[2] / d[2])
            for bx in boxes:
                with np.errstate(divide="ignore", invalid="ignore"):
                    t1, t2 = (bx.lo - c_w) / d, (bx.hi - c_w) / d
                tn, tf = np.nanmax(np.minimum(t1, t2)), np.nanmin(np.maximum(t1, t2))
                if tn <= tf and tn > 0:
                    ts.append(tn)
            expect = min(ts) if ts else 0.0
            assert depth[v, u] == pytest.approx(expect, rel=1e-5, abs=1e-4)
            checked += expect > 0
    assert checked > 20


def test_cross_view_depth_consistency(world: WorldInfo) -> None:
    """Back-projected ground-photo pixels land on matching depths in the other views."""
    gt = _by_name(_gt(world))
    names = world.photo_names + world.frame_names
    views = {}
    for n in names:
        r, c = _c2w(gt[n])
        views[n] = (r, c, gt[n].camera, _depth(world.gt_depths_dir / f"{Path(n).stem}.h5"))
    hits = 0
    for src in world.photo_names:
        r, c, cam, depth = views[src]
        f, cx, cy = cam.params[:3]
        vv, uu = np.nonzero(depth > 0)
        sel = np.random.default_rng(1).choice(vv.size, 200, replace=False)
        v, u = vv[sel], uu[sel]
        x = c + (np.stack([(u + 0.5 - cx) / f, (v + 0.5 - cy) / f, np.ones(u.size)], 1) * depth[v, u, None]) @ r.T
        for dst in names:
            if dst == src:
                continue
            r2, c2, cam2, d2 = views[dst]
            xc = (x - c2) @ r2
            ok = xc[:, 2] > 1
            f2, cx2, cy2 = cam2.params[:3]
            pu = f2 * xc[:, 0] / np.where(ok, xc[:, 2], 1) + cx2
            pv = f2 * xc[:, 1] / np.where(ok, xc[:, 2], 1) + cy2
            ok &= (pu >= 1) & (pu < cam2.width - 1) & (pv >= 1) & (pv < cam2.height - 1)
            dd = d2[pv[ok].astype(int), pu[ok].astype(int)]
            good = np.abs(dd - xc[ok, 2]) < 0.02 * xc[ok, 2] + 0.1  # visible ones agree; others are occluded
            hits += int(good.sum())
    assert hits > 50


def test_megadepth_model(world: WorldInfo) -> None:
    md = _by_name(pycolmap.Reconstruction(str(world.sfm_dir)))
    gt = _by_name(_gt(world))
    s, r_sim, t_sim = world.sim_scale, np.asarray(world.sim_rotation), np.asarray(world.sim_translation)
    assert 0.05 <= s <= 0.5
    assert sorted(md) == sorted(world.photo_names)
    scene_list = json.loads(world.scene_list_path.read_text())
    assert scene_list == [{"scene": "0001", "subscene": "0", "images": world.photo_names}]
    for name in world.photo_names:
        r_md, c_md = _c2w(md[name])
        r_gt, c_gt = _c2w(gt[name])
        # back to metric: x_gt = R^T (x_md - t) / s
        assert np.allclose(r_sim.T @ (c_md - t_sim) / s, c_gt, atol=1e-6)
        assert np.allclose(r_sim.T @ r_md, r_gt, atol=1e-9)
        cam = md[name].camera
        assert cam.model.name == "SIMPLE_RADIAL"
        f, cx, cy, k = cam.params
        assert k == 0.0
        assert abs(cx - cam.width / 2) >= 2 or abs(cy - cam.height / 2) >= 2
        assert cam.width >= 640 and cam.height >= 480
        d_md = _depth(world.depths_dir / f"{Path(name).stem}.h5")
        d_gt = _depth(world.gt_depths_dir / f"{Path(name).stem}.h5")
        assert d_md.dtype == np.float32 and d_gt.dtype == np.float32
        assert np.allclose(d_md, s * d_gt.astype(np.float64), rtol=1e-6, atol=1e-7)
        assert (d_gt == 0).any() and (d_gt > 0).mean() > 0.2  # street views: sky above
        img = cv2.imread(str(world.images_dir / name))
        assert img is not None and img.shape == (cam.height, cam.width, 3)
        assert img.std() > 10
        stem = Path(name).stem
        assert len(stem.split("_")[0]) == 10 and len(stem.split("_")[1]) == 10 and stem.endswith("_o")
    rec = pycolmap.Reconstruction(str(world.sfm_dir))
    assert rec.num_points3D() >= 100
    # points re-project onto their observations in the similarity frame
    for pid, p in list(rec.points3D.items())[:50]:
        for el in p.track.elements:
            im = rec.image(el.image_id)
            xy = im.camera.img_from_cam(im.cam_from_world() * p.xyz)
            assert np.allclose(xy, im.points2D[el.point2D_idx].xy, atol=1e-3)


def test_feature_rich_images(world: WorldInfo) -> None:
    sift = cv2.SIFT_create()
    cap = cv2.VideoCapture(str(world.video_path))
    ok, frame = cap.read()
    assert ok
    assert len(sift.detect(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), None)) > 300
    img = cv2.imread(str(world.images_dir / world.photo_names[0]), cv2.IMREAD_GRAYSCALE)
    assert len(sift.detect(img, None)) > 100


def test_ensure_world_idempotent(tmp_path: Path) -> None:
    kw = dict(scene="0002", seed=1, n_aerial=2, n_ground=1, size=(640, 480))
    info = ensure_world(tmp_path, **kw)
    assert (tmp_path / ".world_complete").exists()
    mtime = info.json_path.stat().st_mtime_ns
    again = ensure_world(tmp_path, **kw)
    assert again.json_path.stat().st_mtime_ns == mtime
    assert again.photo_names == info.photo_names and again.sim_scale == info.sim_scale
    (tmp_path / ".world_complete").unlink()
    third = ensure_world(tmp_path, **kw)
    assert (tmp_path / ".world_complete").exists()
    assert third.json_path.read_text() == info.json_path.read_text()
