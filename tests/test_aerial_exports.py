"""Training exports (tasks/aerial/covisibility.py, tasks/aerial/training_export.py).

Here: the covisibility kernel against analytic cases and the frustum pruning against
brute force, on small synthetic views (fast). The checks of the files as the training
readers load them run on the demo scene (``test_aerial_pipeline.py``) and on the flow's
output (``test_aerial_flow.py``) through the helpers below, so no extra pipeline runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from tasks.aerial import covisibility as C
from tasks.aerial import training_export as T


# ----------------------------------------------------------------------------- synthetic views


def _view(name: str, centre, yaw_deg: float = 0.0, f: float = 200.0, w: int = 160, h: int = 120) -> C.View:
    """A camera looking straight down (-z world) from ``centre``, rotated by ``yaw`` about
    the vertical."""
    a = np.radians(yaw_deg)
    # camera x right, y down, z forward (down to the ground)
    r_c2w = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag([1, -1, -1])
    w2c = np.eye(4)
    w2c[:3, :3] = r_c2w.T
    w2c[:3, 3] = -r_c2w.T @ np.asarray(centre, float)
    K = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1.0]])
    return C.View(name, K, w2c, w, h, None)


def _ground_depth(v: C.View) -> np.ndarray:
    """z-depth of the plane z = 0 seen by a downward camera: its height, everywhere."""
    return np.full((v.height, v.width), float(v.centre[2]), np.float32)


def test_kernel_analytic_half_overlap():
    """Two nadir cameras 100 m up, the second shifted by half the footprint: half of the
    pixels of each land in the other, and they agree."""
    a = _view("a", [0, 0, 100])
    footprint_x = 160 / 200 * 100  # metres
    b = _view("b", [footprint_x / 2, 0, 100])
    da, db = _ground_depth(a), _ground_depth(b)
    ab, ba = C.pair_covisibility(a, da, b, db)
    assert ab == pytest.approx(0.5, abs=0.01) and ba == pytest.approx(0.5, abs=0.01)
    # the tolerance is relative to j's depth: 5 % off agrees, 20 % off does not
    assert C.pair_covisibility(a, da, b, db * 1.05)[0] == pytest.approx(0.5, abs=0.01)
    assert C.pair_covisibility(a, da, b, db * 1.2)[0] == 0.0
    assert C.pair_covisibility(a, da, b, db * 1.2, rel_tolerance=0.25)[0] == pytest.approx(0.5, abs=0.01)
    # holes in j: strict covisibility drops with j's coverage, "known" does not
    holes = db.copy()
    holes[:, ::2] = 0
    cov, known = C.fractions(C.pair_counts(a, da, b, holes))
    assert cov[0] == pytest.approx(0.25, abs=0.01) and known[0] == pytest.approx(0.5, abs=0.01)
    # pixels of i without depth are not counted
    half = da.copy()
    half[:, 80:] = 0  # the right half of a: the part that lands in b
    assert C.pair_covisibility(a, half, b, db)[0] == 0.0
    # a wide view and a close-up: not symmetric
    low = _view("low", [0, 0, 25])
    wide_low, low_wide = C.pair_covisibility(a, da, low, _ground_depth(low))
    assert low_wide == pytest.approx(1.0, abs=0.01) and wide_low == pytest.approx(1 / 16, abs=0.01)


def test_occlusion_disagrees():
    """A box in front of the ground in j (its depth much smaller): i's ground pixels behind
    it do not agree."""
    a = _view("a", [0, 0, 100])
    b = _view("b", [0, 0, 100], yaw_deg=0)
    da, db = _ground_depth(a), _ground_depth(b)
    db[:60] = 40.0  # the top half of j sees a roof 60 m up
    ab, ba = C.pair_covisibility(a, da, b, db)
    assert ab == pytest.approx(0.5, abs=0.01)
    assert ba == pytest.approx(0.5, abs=0.01)  # the roof pixels of j land on ground in i


def _grid_views(n: int = 14, seed: int = 3) -> tuple[list[C.View], dict[int, np.ndarray]]:
    rng = np.random.default_rng(seed)
    views, depths = [], {}
    for k in range(n):
        c = [rng.uniform(-200, 200), rng.uniform(-200, 200), rng.uniform(60, 140)]
        views.append(_view(f"v{k:02d}", c, yaw_deg=rng.uniform(0, 360)))
        depths[k] = _ground_depth(views[-1])
    return views, depths


def _write_depths(tmp: Path, views: list[C.View], depths: dict[int, np.ndarray]) -> None:
    from tasks.aerial.dense import write_depth_h5

    for k, v in enumerate(views):
        v.depth_file = write_depth_h5(tmp / f"{v.name}.h5", depths[k])


def test_pruning_keeps_every_overlapping_pair(tmp_path):
    """Candidates against brute force over all pairs: no pair with overlap is lost, and
    pairs far apart are not candidates (cost follows the candidates)."""
    views, depths = _grid_views()
    _write_depths(tmp_path, views, depths)
    cfg = C.CovisibilityConfig(stride=2)
    pairs, counts = C.candidate_pairs(views, cfg)
    cand = set(pairs)
    overlapping = 0
    for i in range(len(views)):
        for j in range(i + 1, len(views)):
            ab, ba = C.pair_covisibility(views[i], depths[i], views[j], depths[j], stride=2)
            if max(ab, ba) > 0.0:
                overlapping += 1
                assert (i, j) in cand, (i, j, ab, ba)
    assert overlapping >= 8
    assert counts["candidate pairs"] == len(pairs) < counts["all pairs"] == 14 * 13 // 2
    assert len(pairs) <= overlapping + 2  # pruning is tight on this layout (measured: equal)


def test_blocks_resume_and_assemble(tmp_path):
    views, depths = _grid_views(8, seed=5)
    _write_depths(tmp_path, views, depths)
    cfg = C.CovisibilityConfig(stride=2, block_pairs=2)
    pairs, _ = C.candidate_pairs(views, cfg)
    parts = C.blocks(pairs, 2)
    assert sum(map(len, parts)) == len(pairs) and all(len(b) <= 2 for b in parts)
    files = [C.compute_block(views, b, cfg, C.block_path(tmp_path / "w", k), key="k1") for k, b in enumerate(parts)]
    mtimes = [f.stat().st_mtime_ns for f in files]
    C.compute_block(views, parts[0], cfg, files[0], key="k1")  # same key: kept
    assert files[0].stat().st_mtime_ns == mtimes[0]
    assert not C.block_done(files[0], "k2")  # changed inputs: recomputed
    has = np.ones(len(views), bool)
    has[-1] = False
    cov, known = C.assemble(len(views), has, files)
    assert (cov[-1] == -1).all() and (cov[:, -1] == -1).all()
    for i, j in pairs:
        if j == len(views) - 1:
            continue
        assert cov[i, j] == pytest.approx(C.pair_covisibility(views[i], depths[i], views[j], depths[j],
                                                              stride=2)[0], abs=1e-6)


def test_export_settings_are_checked():
    assert T.export_config(ranges=[[0.2, 0.4]]).ranges == ((0.2, 0.4),)
    with pytest.raises(KeyError, match="unknown export setting"):
        T.export_config(tolerance=0.2)
    with pytest.raises(ValueError, match="pair_score"):
        T.export_config(pair_score="median")


# ----------------------------------------------------------------------------- helpers for the demo / flow


def run_exports(export: Path, paths, config: T.ExportConfig | None = None) -> dict:
    """The stage functions in the flow's order for one scene, without Prefect."""
    config = config or T.export_config()
    plan = C.plan(paths.product, T.covisibility_work(export, paths.scene), config.covisibility)
    for k in plan.missing_blocks():
        C.run_block(plan, k, config.covisibility)
    entry = T.export_scene(export, paths.scene, paths.product, T.reference_names(paths.scene_dir), plan, config,
                           {"pipeline": "sift+mnn", "features": "sift-colmap", "matcher": "NN-ratio"})
    index = T.export_dataset(export, None, config)
    return {"plan": plan, "entry": entry, "index": index, "config": config}


def _d2net_parse(sparse: Path) -> tuple[list[str], list[dict]]:
    """images.txt as D2-Net's preprocess_scene.py parses it (4 header lines, two lines per
    image, observations (x, y, id), -1 skipped)."""
    raw = (sparse / "images.txt").read_text().splitlines(True)[4:]
    names, obs = [], []
    for image, points in zip(raw[::2], raw[1::2]):
        image, points = image.split(" "), points.split(" ")
        names.append(image[-1].strip("\n"))
        cur = {}
        for x, y, pid in zip(points[::3], points[1::3], points[2::3]):
            if int(pid) != -1:
                cur[int(pid)] = [float(x), float(y)]
        obs.append(cur)
    return names, obs


def check_scene_info(export: Path, scene: str, product: Path) -> np.lib.npyio.NpzFile:
    """D2-Net / glue-factory: keys, dtypes, shapes, the overlap as D2-Net computes it,
    symmetry, and images/depths readable the way glue-factory reads them."""
    import cv2

    info = np.load(export / "scene_info" / f"{scene}.npz", allow_pickle=True)
    keys = {"image_paths", "depth_paths", "intrinsics", "poses", "overlap_matrix", "scale_ratio_matrix", "angles",
            "n_points3D", "points3D_id_to_2D", "points3D_id_to_ndepth"}
    assert keys <= set(info.files)
    n = len(info["image_paths"])
    for k in ("overlap_matrix", "scale_ratio_matrix", "angles"):
        assert info[k].shape == (n, n) and info[k].dtype == np.float64
    assert info["n_points3D"].shape == (n,)
    ov = info["overlap_matrix"]
    np.testing.assert_array_equal(ov, ov.T)
    images, depths = info["image_paths"], info["depth_paths"]
    valid = (images != None) & (depths != None)  # noqa: E711 - as glue-factory writes it
    assert valid.sum() >= 2
    assert (ov[~valid] == -1).all() and (ov[:, ~valid] == -1).all()
    # D2-Net's overlap from an independent parse of images.txt
    names, obs = _d2net_parse(product / "sparse-txt")
    order = {nm: k for k, nm in enumerate(names)}
    idx = [order[Path(p).name] for p in images]
    for i in np.nonzero(valid)[0]:
        for j in np.nonzero(valid)[0]:
            if i >= j:
                continue
            a, b = obs[idx[i]], obs[idx[j]]
            expect = len(a.keys() & b.keys()) / min(len(a), len(b)) if min(len(a), len(b)) else 0.0
            assert ov[i, j] == pytest.approx(expect, abs=1e-12)
            sr = info["scale_ratio_matrix"]
            if sr[i, j] > 0:
                assert sr[i, j] * sr[j, i] == pytest.approx(1.0)
    assert (ov[valid][:, valid] > 0).sum() > 0
    assert np.all(info["n_points3D"] == [len(d) for d in info["points3D_id_to_2D"]])
    # glue-factory's _read_view: root / image_paths[i]; root / depth_subpath / scene / stem.h5
    for i in np.nonzero(valid)[0]:
        path = export / images[i]
        K = info["intrinsics"][i].astype(np.float32, copy=False)
        T_ = info["poses"][i].astype(np.float32, copy=False)
        assert K.shape == (3, 3) and T_.shape == (4, 4) and np.allclose(T_[3], [0, 0, 0, 1])
        img = cv2.imread(str(path))
        with h5py.File(str(export / "depths" / scene / (path.stem + ".h5")), "r") as f:
            depth = f["/depth"].__array__().astype(np.float32, copy=False)
        assert depth.shape == img.shape[:2]
        assert (export / depths[i]).samefile(export / "depths" / scene / (path.stem + ".h5"))
        # ndepth is the point's z over the mean focal, as D2-Net's dataset uses it
        nd = info["points3D_id_to_ndepth"][i]
        assert set(nd) == set(info["points3D_id_to_2D"][i]) and all(v > 0 for v in nd.values())
    # glue-factory's sampling works on it
    mat = ov[valid][:, valid]
    pairs = np.stack(np.where((mat > 0.1) & (mat <= 1.0)), -1)
    assert len(pairs) > 0
    return info


def check_pair_files(export: Path, scene: str, config: T.ExportConfig) -> dict:
    """LoFTR-style pair_infos in their ranges, DUSt3R's all_metadata with plain arrays,
    AerialMegaDepth's precomputed pairs as its script loads them, aerial-ground marked."""
    os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")
    import cv2

    with np.load(export / "covisibility" / f"{scene}.npz") as z:  # plain arrays
        cov, known, score, is_aerial, names = z["covisibility"], z["known"], z["score"], z["is_aerial"], z["names"]
        assert float(z["rel_tolerance"]) == config.covisibility.rel_tolerance
    n = len(names)
    assert cov.shape == known.shape == score.shape == (n, n) and cov.dtype == np.float32
    np.testing.assert_array_equal(score, score.T)  # the pair score is symmetric by definition
    ok = cov >= 0
    assert np.all(known[ok] >= cov[ok] - 1e-6) and cov.max() <= 1.0 and known.max() <= 1.0
    counts = {}
    for lo, hi in config.ranges:
        z = np.load(export / "pair_infos" / f"{scene}_{lo:g}_{hi:g}.npz", allow_pickle=True)
        assert isinstance(z, dict)  # LoFTR's released index files are pickled dicts
        assert {"image_paths", "depth_paths", "intrinsics", "poses", "pair_infos"} <= set(z)
        pi = z["pair_infos"]
        for (i, j), s, cm in pi:  # LoFTR: (idx0, idx1), overlap_score, central_matches = pair_infos[k]
            assert lo < s <= hi and s == pytest.approx(score[i, j])
            assert z["image_paths"][i] is not None and z["depth_paths"][j] is not None
            assert cm.ndim == 2 and cm.shape[1] == 4
        kinds = z["pair_kinds"]
        assert len(kinds) == len(pi)
        for (i, j), k in zip([p[0] for p in pi], kinds):
            assert k == (0 if is_aerial[i] and is_aerial[j] else 1 if is_aerial[i] != is_aerial[j] else 2)
        counts[(lo, hi)] = len(pi)
    # DUSt3R: plain np.load (no allow_pickle), "<scene> <subscene>", files per image
    with np.load(export / "dust3r" / "all_metadata.npz") as d:
        assert all(d[k].dtype != object for k in d.files)
        scenes, images, pairs = d["scenes"], d["images"], d["pairs"]
    assert set(pairs.dtype.names) == {"scene_id", "im1_id", "im2_id", "score"}
    sid = [k for k, s in enumerate(scenes) if s.split()[0] == scene][0]
    mine = pairs[pairs["scene_id"] == sid]
    assert len(mine) > 0
    for scene_id, im1, im2, s in mine[:5]:
        sc, sub = scenes[scene_id].split()
        seq = export / "dust3r" / sc / sub
        for im in (images[im1], images[im2]):
            img = cv2.imread(str(seq / f"{im}.jpg"))
            depth = cv2.imread(str(seq / f"{im}.exr"), cv2.IMREAD_UNCHANGED)
            cam = np.load(seq / f"{im}.npz")
            assert img is not None and depth.shape == img.shape[:2] and depth.dtype == np.float32
            assert cam["intrinsics"].shape == (3, 3) and cam["cam2world"].shape == (4, 4)
        assert s > min(r[0] for r in config.ranges)
    # AerialMegaDepth --precomputed_pairs, as preprocess_aerialmegadepth.py reads it
    data = np.load(export / "aerialmegadepth_pairs.npz", allow_pickle=True)
    a_scenes, a_images, a_pairs, a_scene_name = data["scenes"], data["images"], data["pairs"], data["images_scene_name"]
    todo: dict[int, set] = {}
    for image_id, image in enumerate(a_images):
        if image is not None:
            sc = a_scene_name[image_id]
            todo.setdefault(int(np.where(a_scenes == sc)[0][0]), set()).add(image_id)
    k = int(np.where(a_scenes == scene)[0][0])
    assert {a_images[i] for i in todo[k]} == set(names)
    root = export / "aerialmegadepth" / scene / "sfm_output_localization" / T.AMD_SFM_FOLDER / "localized_dense_metric"
    raw = (root / "sparse-txt" / "cameras.txt").read_text().splitlines()[3:]
    for line in raw:
        width, height, focal, cx, cy = [float(e) for e in line.split(" ")[2:]]
    listed = (root / "sparse-txt" / "images.txt").read_text().splitlines()[4:]
    assert {line.split(" ")[-1] for line in listed[::2]} == set(names)
    ag = a_pairs[data["pair_kind"] == 1]
    for scene_id, im1, im2, s in a_pairs:
        assert a_scene_name[im1] == a_scene_name[im2] == a_scenes[scene_id]
    for scene_id, im1, im2, s in ag:
        i, j = list(names).index(a_images[im1]), list(names).index(a_images[im2])
        assert is_aerial[i] != is_aerial[j]
    idx = json.loads((export / "index.json").read_text())
    assert scene in idx["scenes"] and idx["features used"]
    assert idx["aerialmegadepth_pairs"]["pairs"] == len(a_pairs)
    return {"ranges": counts, "aerial-ground": len(ag), "pairs": len(a_pairs)}


def test_a_block_task_gets_its_block_not_the_whole_plan(tmp_path):
    """At 1000 images (377 000 candidate pairs, 2950 blocks) each block task was handed the whole
    plan, pickled and walked by Prefect per task: the flow process at 100 % of a core and one
    block at a time, 15 s each (bench/bench_aerial_scale.py, 750x250). A block's task argument
    holds the views and its own pairs only."""
    import pickle

    views = [C.View(f"{k:04d}.jpg", np.eye(3), np.eye(4), 320, 240, None) for k in range(1000)]
    pairs = [(i, j) for i in range(300) for j in range(i + 1, 1000)]
    plan = C.Plan(tmp_path, tmp_path, "key", views, pairs, C.blocks(pairs, 128))
    block = plan.block(7)
    assert block.pairs.tolist() == [list(p) for p in plan.blocks[7]]
    assert block.out == C.block_path(tmp_path, 7) and block.key == "key"
    assert len(pickle.dumps(block)) * 5 < len(pickle.dumps(plan)), (len(pickle.dumps(block)), len(pickle.dumps(plan)))
