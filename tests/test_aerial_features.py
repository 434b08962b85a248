"""hloc-layout SIFT features, NN matching, pairs and VLAD retrieval (tasks.aerial.*).

Small synthetic images (random multi-scale textures, homography-warped copies,
Gaussian blobs at known pixels) and a tiny synthetic world; fast (seconds).
"""

from __future__ import annotations

import itertools
import os

import cv2
import h5py
import numpy as np
import pytest

from tasks.aerial import features as F
from tasks.aerial import geometry as G
from tasks.aerial import io as IO
from tasks.aerial import matching as M
from tasks.aerial import pairs as P
from tasks.aerial import retrieval as R
from tasks.common.atomic import _HOST

SIFT = F.FEATURE_CONFS["sift"]
NN_RATIO = M.MATCHER_CONFS["NN-ratio"]


def texture(seed: int, w: int = 320, h: int = 240) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = sum(cv2.resize(rng.random((h // s, w // s)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
              * s ** 0.5 for s in (2, 4, 8, 16))
    return cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def homography(angle_deg=8.0, scale=0.9, tx=30.0, ty=-5.0, p=(1e-4, 5e-5)) -> np.ndarray:
    t = np.deg2rad(angle_deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty], [p[0], p[1], 1.0]])


def apply_h(h, pts):
    q = np.c_[pts, np.ones(len(pts))] @ h.T
    return q[:, :2] / q[:, 2:]


@pytest.fixture(scope="module")
def warped_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("warp")
    img = texture(0)
    h = homography()
    (d / "sub").mkdir()
    cv2.imwrite(str(d / "sub" / "a.png"), img)
    cv2.imwrite(str(d / "b.png"), cv2.warpPerspective(img, h, (320, 240), flags=cv2.INTER_LINEAR))
    fp = F.extract_features(SIFT, d, ["sub/a.png", "b.png"], d / "feats-sift.h5")
    return d, fp, h


# ----------------------------------------------------------------------------- features


def test_feature_layout_and_keypoint_convention(warped_pair):
    import pycolmap

    d, fp, _ = warped_pair
    assert IO.list_h5_names(fp) == ["b.png", "sub/a.png"]
    with h5py.File(fp, "r") as f:
        assert isinstance(f["sub"], h5py.Group) and isinstance(f["sub/a.png"], h5py.Group)  # nested groups
        g = f["sub/a.png"]
        assert set(g) == {"keypoints", "descriptors", "scores", "scales", "oris", "image_size"}
        kp, desc = g["keypoints"][()], g["descriptors"][()]
        n = len(kp)
        assert n > 200
        assert kp.shape == (n, 2) and kp.dtype == np.float32
        assert desc.shape == (128, n) and desc.dtype == np.float32  # transposed, as hloc
        assert g["scores"].shape == (n,) and g["scales"].shape == (n,) and g["oris"].shape == (n,)
        assert g["image_size"][()].tolist() == [320, 240]  # (width, height)
        assert g["keypoints"].attrs["uncertainty"] == pytest.approx(1.0)
        np.testing.assert_allclose(np.linalg.norm(desc, axis=0), 1.0, atol=1e-3)
    # independent pycolmap run on the same pixels: stored = pycolmap (COLMAP convention) - 0.5
    gray = cv2.imread(str(d / "sub" / "a.png"), cv2.IMREAD_GRAYSCALE)
    opts = pycolmap.FeatureExtractionOptions()
    opts.num_threads = 1
    opts.sift.first_octave = 0
    opts.sift.peak_threshold = 0.01
    kps, descs = pycolmap.FeatureExtractor.create(opts, device=pycolmap.Device.cpu).extract_from_uint8_array(gray)
    ref = np.array([[k.x, k.y] for k in kps], np.float32)
    assert len(ref) == n
    np.testing.assert_allclose(kp, ref - 0.5, atol=1e-4)
    ref_desc = descs.data.astype(np.float32)
    ref_desc /= np.linalg.norm(ref_desc, axis=1, keepdims=True)
    np.testing.assert_allclose(desc.T, ref_desc, atol=1e-4)
    assert np.array_equal(IO.read_keypoints(fp, "sub/a.png"), kp)
    assert IO.read_descriptors(fp, "sub/a.png").shape == (128, n)


def _blobs(w, h, centres, sigma):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w), np.float32)
    for cx, cy in centres:
        img += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))
    return (img / img.max() * 255).round().astype(np.uint8)


def test_keypoints_at_pixel_centres_and_rescaled_to_original(tmp_path):
    centres = np.array([(200.0, 160.0), (420.0, 300.0), (120.0, 380.0), (520.0, 100.0)])  # pixel indices
    cv2.imwrite(str(tmp_path / "blobs.png"), _blobs(640, 480, centres, 8.0))
    full = {**SIFT, "preprocessing": {"grayscale": True, "resize_max": 1600}}
    half = {**SIFT, "preprocessing": {"grayscale": True, "resize_max": 320}}
    for conf, path, tol, unc in ((full, tmp_path / "full.h5", 0.05, 1.0), (half, tmp_path / "half.h5", 0.3, 2.0)):
        F.extract_features(conf, tmp_path, ["blobs.png"], path)
        kp, u = IO.read_keypoints(path, "blobs.png", return_uncertainty=True)
        assert u == pytest.approx(unc)
        assert IO.read_image_size(path, "blobs.png") == (640, 480)
        dist = np.linalg.norm(kp[:, None] - centres[None], axis=-1)
        nearest = dist.min(axis=0)
        assert (nearest < tol).all(), (path.name, nearest)  # hloc convention: pixel centre = integer


def test_max_keypoints_keeps_largest_scales(tmp_path):
    cv2.imwrite(str(tmp_path / "t.png"), texture(3))
    conf = {**SIFT, "model": {**SIFT["model"], "max_keypoints": 100}}
    F.extract_features(conf, tmp_path, ["t.png"], tmp_path / "f100.h5")
    F.extract_features(SIFT, tmp_path, ["t.png"], tmp_path / "fall.h5")
    with h5py.File(tmp_path / "f100.h5") as a, h5py.File(tmp_path / "fall.h5") as b:
        s100, sall = a["t.png/scales"][()], b["t.png/scales"][()]
    assert len(s100) == 100 < len(sall)
    assert s100.min() >= np.sort(sall)[::-1][99] - 1e-6


def test_as_half_and_mapping_image_dir(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    cv2.imwrite(str(tmp_path / "x" / "one.jpg"), texture(1))
    cv2.imwrite(str(tmp_path / "y" / "two.jpg"), texture(2))
    fp = F.extract_features(SIFT, {"one.jpg": tmp_path / "x", "two.jpg": tmp_path / "y"},
                            ["one.jpg", "two.jpg"], tmp_path / "f.h5", as_half=True)
    with h5py.File(fp) as f:
        assert f["one.jpg/keypoints"].dtype == np.float16 and f["two.jpg/descriptors"].dtype == np.float16
        assert f["one.jpg/image_size"].dtype == np.int64
    with pytest.raises(ValueError):
        F.extract_features(SIFT, tmp_path / "x", ["missing.jpg"], tmp_path / "g.h5")


# ----------------------------------------------------------------------------- matching


def test_warped_pair_matches_agree_with_homography(warped_pair, tmp_path):
    d, fp, h = warped_pair
    IO.write_pairs(tmp_path / "pairs.txt", [("sub/a.png", "b.png")])
    mp = M.match_features(NN_RATIO, tmp_path / "pairs.txt", fp, tmp_path / "m.h5")
    with h5py.File(mp) as f:
        assert list(f) == ["sub-a.png"] and list(f["sub-a.png"]) == ["b.png"]  # names_to_pair nesting
        g = f["sub-a.png/b.png"]
        k0, k1 = IO.read_keypoints(fp, "sub/a.png"), IO.read_keypoints(fp, "b.png")
        assert g["matches0"].dtype == np.int16 and g["matches0"].shape == (len(k0),)
        assert g["matching_scores0"].dtype == np.float16 and g["matching_scores0"].shape == (len(k0),)
    m, sc = IO.read_matches(mp, "sub/a.png", "b.png")
    assert len(m) > 100 and m.shape[1] == 2 and len(sc) == len(m)
    err = np.linalg.norm(apply_h(h, k0[m[:, 0]]) - k1[m[:, 1]], axis=1)
    assert (err < 2.0).mean() > 0.8
    # the keypoint convention is the one of cv2.warpPerspective (pixel centres at integers):
    # assuming COLMAP's (corner origin) instead is measurably worse
    err_colmap = np.linalg.norm(apply_h(h, k0[m[:, 0]] + 0.5) - 0.5 - k1[m[:, 1]], axis=1)
    good = err < 2.0
    assert np.median(err[good]) < 0.8 * np.median(err_colmap[good])
    # reverse order read flips columns
    mr, scr = IO.read_matches(mp, "b.png", "sub/a.png")
    assert np.array_equal(mr, m[:, ::-1]) and np.array_equal(scr, sc)


def _brute_force_nn(d0, d1, ratio, dist_thr, mutual):
    sim = d0.T.astype(np.float64) @ d1.astype(np.float64)

    def nn(s):
        out, score = [], []
        for row in s:
            order = np.argsort(-row, kind="stable")
            b = order[0]
            ok = True
            dd = 2 * (1 - row[order[:2]])
            if ratio and len(row) > 1:
                ok &= dd[0] <= ratio ** 2 * dd[1]
            if dist_thr:
                ok &= dd[0] <= dist_thr ** 2
            out.append(b if ok else -1)
            score.append((row[b] + 1) / 2 if ok else 0.0)
        return np.array(out), np.array(score)

    m0, s0 = nn(sim)
    if mutual:
        m1, _ = nn(sim.T)
        m0 = np.array([j if j > -1 and m1[j] == i else -1 for i, j in enumerate(m0)])
    return m0, s0


def test_nearest_neighbor_semantics_on_handmade_descriptors():
    e = np.eye(8, dtype=np.float32)

    def unit(v):
        v = np.asarray(v, np.float32)
        return v / np.linalg.norm(v)

    # image 0: a -> clear partner A; b -> ambiguous between B1 and B2 (fails ratio);
    # c and c' both closest to C, C closest to c (c' not mutual)
    d0 = np.stack([e[0], e[1], e[2], unit(e[2] + 0.6 * e[3])], 1)
    d1 = np.stack([unit(e[0] + 0.1 * e[5]), unit(e[1] + 0.3 * e[6]),
                   unit(e[1] + 0.32 * e[7]), unit(e[2] + 0.05 * e[4])], 1)
    m, s = M.nearest_neighbor_match(d0, d1, ratio_threshold=0.8, do_mutual_check=True)
    assert m.tolist() == [0, -1, 3, -1]
    sim = d0.T @ d1
    assert s[0] == pytest.approx((sim[0, 0] + 1) / 2) and s[1] == 0.0
    assert s[3] == pytest.approx((sim[3, 3] + 1) / 2)  # hloc keeps the score when only the mutual check failed
    m, _ = M.nearest_neighbor_match(d0, d1, ratio_threshold=None, do_mutual_check=True)
    assert m.tolist() == [0, 1, 3, -1]  # no ratio test: b matched to its nearest
    m, _ = M.nearest_neighbor_match(d0, d1, ratio_threshold=None, do_mutual_check=False)
    assert m.tolist() == [0, 1, 3, 3]  # no mutual check: c' kept
    m, _ = M.nearest_neighbor_match(d0, d1, distance_threshold=0.2)
    assert m.tolist() == [0, -1, 3, -1]  # |a - A| ~ 0.1 < 0.2 < |b - B1| ~ 0.29
    # a single descriptor on one side disables the ratio test; empty sides match nothing
    m, _ = M.nearest_neighbor_match(d0, d1[:, 1:2], ratio_threshold=0.8)
    assert m.tolist() == [-1, 0, -1, -1]
    m, s = M.nearest_neighbor_match(d0, np.zeros((8, 0), np.float32), ratio_threshold=0.8)
    assert m.tolist() == [-1] * 4 and s.tolist() == [0.0] * 4
    # vectorised == brute force on random descriptors, every option
    rng = np.random.default_rng(0)
    a = rng.normal(size=(16, 60)).astype(np.float32)
    b = np.concatenate([a[:, :30] + 0.3 * rng.normal(size=(16, 30)), rng.normal(size=(16, 40))], 1).astype(np.float32)
    a /= np.linalg.norm(a, axis=0)
    b /= np.linalg.norm(b, axis=0)
    for ratio, thr, mutual in itertools.product((None, 0.8), (None, 0.9), (True, False)):
        m, s = M.nearest_neighbor_match(a, b, ratio, thr, mutual)
        rm, rs = _brute_force_nn(a, b, ratio, thr, mutual)
        assert m.tolist() == rm.tolist(), (ratio, thr, mutual)
        np.testing.assert_allclose(s, rs, atol=1e-5)
    assert (M.nearest_neighbor_match(a, b, 0.8)[0][:30] == np.arange(30)).mean() > 0.8


def test_pair_names_find_pair_and_pairs_files(tmp_path):
    assert IO.names_to_pair("a/b.jpg", "c.jpg") == "a-b.jpg/c.jpg"
    assert IO.names_to_pair_old("a/b.jpg", "c.jpg") == "a-b.jpg_c.jpg"
    with h5py.File(tmp_path / "m.h5", "w") as f:
        g = f.create_group("x.jpg/y.jpg")
        g["matches0"] = np.array([1, -1, 0], np.int16)
        g["matching_scores0"] = np.array([0.9, 0.1, 0.8], np.float16)
        g = f.create_group("p.jpg_q.jpg")  # legacy key
        g["matches0"] = np.array([-1, 0], np.int16)
        g["matching_scores0"] = np.array([0, 0.7], np.float16)
    with h5py.File(tmp_path / "m.h5") as f:
        assert IO.find_pair(f, "x.jpg", "y.jpg") == ("x.jpg/y.jpg", False)
        assert IO.find_pair(f, "y.jpg", "x.jpg") == ("x.jpg/y.jpg", True)
        assert IO.find_pair(f, "p.jpg", "q.jpg") == ("p.jpg_q.jpg", False)
        assert IO.find_pair(f, "q.jpg", "p.jpg") == ("p.jpg_q.jpg", True)
        with pytest.raises(ValueError):
            IO.find_pair(f, "x.jpg", "q.jpg")
    m, s = IO.read_matches(tmp_path / "m.h5", "y.jpg", "x.jpg")
    assert m.tolist() == [[1, 0], [0, 2]] and s.astype(np.float32).tolist() == pytest.approx([0.9, 0.8], abs=1e-3)
    m, _ = IO.read_matches(tmp_path / "m.h5", "q.jpg", "p.jpg")
    assert m.tolist() == [[0, 1]]
    pairs = [("a/b.jpg", "c.jpg"), ("c.jpg", "d.jpg")]
    IO.write_pairs(tmp_path / "pairs.txt", pairs)
    assert (tmp_path / "pairs.txt").read_text() == "a/b.jpg c.jpg\nc.jpg d.jpg"
    assert IO.read_pairs(tmp_path / "pairs.txt") == pairs
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]
    assert M.unique_new_pairs([("a", "b"), ("b", "a"), ("a", "a"), ("c", "a")]) == [("a", "b"), ("c", "a")]


# ----------------------------------------------------------------------------- resume, parts


@pytest.fixture()
def four_images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    base = texture(5)
    names = []
    for i in range(4):
        h = homography(angle_deg=3 * i, scale=1 - 0.04 * i, tx=6 * i, ty=-3 * i)
        name = f"im{i}.png"
        cv2.imwrite(str(d / name), cv2.warpPerspective(base, h, (320, 240)))
        names.append(name)
    return d, names


def _count_calls(monkeypatch, module, attr):
    calls = []
    orig = getattr(module, attr)

    def wrapped(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(module, attr, wrapped)
    return calls


def test_resume_does_not_recompute(four_images, tmp_path, monkeypatch):
    d, names = four_images
    calls = _count_calls(monkeypatch, F, "extract_image")
    fp = tmp_path / "f.h5"
    F.extract_features(SIFT, d, names[:3], fp)
    assert len(calls) == 3
    mtime = fp.stat().st_mtime_ns
    F.extract_features(SIFT, d, names[:3], fp)
    assert len(calls) == 3 and fp.stat().st_mtime_ns == mtime
    F.extract_features(SIFT, d, names, fp)
    assert len(calls) == 4 and IO.list_h5_names(fp) == sorted(names)
    F.extract_features(SIFT, d, names[:1], fp, overwrite=True)
    assert len(calls) == 5 and IO.list_h5_names(fp) == sorted(names)

    mcalls = _count_calls(monkeypatch, M, "nearest_neighbor_match")
    mp = tmp_path / "m.h5"
    IO.write_pairs(tmp_path / "p1.txt", [(names[0], names[1]), (names[1], names[0]), (names[1], names[2])])
    M.match_features(NN_RATIO, tmp_path / "p1.txt", fp, mp)
    assert len(mcalls) == 2  # (1, 0) is (0, 1)
    mtime = mp.stat().st_mtime_ns
    IO.write_pairs(tmp_path / "p2.txt", [(names[2], names[1]), (names[1], names[0]), (names[2], names[3])])
    M.match_features(NN_RATIO, tmp_path / "p2.txt", fp, mp)
    assert len(mcalls) == 3  # only (2, 3) is new
    assert mp.stat().st_mtime_ns != mtime
    mtime = mp.stat().st_mtime_ns
    M.match_features(NN_RATIO, tmp_path / "p2.txt", fp, mp)
    assert len(mcalls) == 3 and mp.stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp/chunk files left


def test_interrupted_extraction_keeps_finished_chunks(four_images, tmp_path, monkeypatch):
    d, names = four_images
    fp = tmp_path / "f.h5"
    orig = F.extract_image
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return orig(*a, **k)

    monkeypatch.setattr(F, "extract_image", flaky)
    with pytest.raises(RuntimeError):
        F.extract_features(SIFT, d, names, fp, chunk_size=1)
    assert not fp.exists() and len(IO.chunk_glob(fp)) == 2
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]
    stale = tmp_path / f".{fp.name}.{_HOST}-999999999-0badf00d.partial.h5"  # a SIGKILLed writer's temporary file
    stale.write_bytes(b"partial")
    F.extract_features(SIFT, d, names, fp, chunk_size=1)
    assert not stale.exists()
    assert len(calls) == 5  # 2 done + 1 failed + the remaining 2
    assert IO.list_h5_names(fp) == sorted(names) and IO.chunk_glob(fp) == []


def _h5_dump(path):
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()].tobytes()) if isinstance(o, h5py.Dataset) else None)
    return out


def test_parts_fan_out_and_merge(four_images, tmp_path):
    d, names = four_images
    single = F.extract_features(SIFT, d, names, tmp_path / "single.h5")
    fp = tmp_path / "feats.h5"
    F.extract_features(SIFT, d, names[:1], fp)  # already has one: parts only do the rest
    plan = F.feature_parts_plan(names, fp, 2)
    assert [len(p[1]) for p in plan] == [2, 1] and sum((p[1] for p in plan), []) == names[1:]
    parts = []
    for i in range(2):  # what each worker process would run
        parts += F.extract_features_parts(SIFT, d, names, fp, n_parts=2, part_index=i)
    assert parts == IO.part_paths(fp, 2) and all(p.exists() for p in parts)
    F.merge_features(parts, fp)
    mtime = fp.stat().st_mtime_ns
    F.merge_features(parts, fp, remove_parts=True)  # idempotent: nothing new, nothing written
    assert fp.stat().st_mtime_ns == mtime and not any(p.exists() for p in parts)
    F.merge_features(parts, fp)  # parts gone: no-op
    assert _h5_dump(fp) == _h5_dump(single)  # deterministic, same bytes as one run
    with h5py.File(fp) as f:
        assert f["im0.png/keypoints"].attrs["uncertainty"] == 1.0

    pairs = list(itertools.combinations(names, 2))
    IO.write_pairs(tmp_path / "pairs.txt", pairs)
    ref = M.match_features(NN_RATIO, tmp_path / "pairs.txt", fp, tmp_path / "m_single.h5")
    mp = tmp_path / "m.h5"
    mparts = []
    for i in range(3):
        mparts += M.match_features_parts(NN_RATIO, tmp_path / "pairs.txt", fp, mp, n_parts=3, part_index=i)
    M.merge_matches(mparts, mp, remove_parts=True)
    assert sorted(IO.list_h5_names(mp)) == sorted(IO.names_to_pair(a, b) for a, b in pairs)
    assert _h5_dump(mp) == _h5_dump(ref)
    # a part holding the reverse of a merged pair adds nothing
    with h5py.File(tmp_path / "rev.h5", "w") as f:
        g = f.create_group(IO.names_to_pair(names[1], names[0]))
        g["matches0"] = np.zeros(3, np.int16)
        g["matching_scores0"] = np.zeros(3, np.float16)
    mtime = mp.stat().st_mtime_ns
    M.merge_matches([tmp_path / "rev.h5"], mp)
    assert mp.stat().st_mtime_ns == mtime


# ----------------------------------------------------------------------------- pairs


def _look(direction, centre):
    z = np.asarray(direction, float)
    z /= np.linalg.norm(z)
    up = np.array([0.0, 0.0, 1.0]) if abs(z[2]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    m = np.eye(4)
    m[:3, :3] = np.stack([x, y, z], 1)
    m[:3, 3] = centre
    return m


def test_pairs_from_poses_angle_filter_and_k():
    poses = {f"c{i}": _look([0, 1, 0], [i * 1.0, 0, 0]) for i in range(8)}
    poses["side"] = _look([1, 0, 0], [3.2, 0, 0])  # nearest to c3, but looks 90 deg away
    poses["tilt"] = _look([0, 1, np.tan(np.deg2rad(60))], [4.1, 0, 0])  # 60 deg off
    pairs = P.pairs_from_poses(poses, num=2, max_angle_deg=75)
    partners = {}
    for a, b in pairs:
        partners.setdefault(a, set()).add(b)
        partners.setdefault(b, set()).add(a)
    assert all(a != b for a, b in pairs)
    assert len({frozenset(p) for p in pairs}) == len(pairs)  # deduplicated
    assert "side" not in partners  # no camera within 75 deg of it
    assert "tilt" in partners["c4"]  # 60 deg < 75 deg
    assert partners["c0"] == {"c1", "c2"}  # k = 2 nearest
    assert P.pairs_from_poses(poses, num=2, max_angle_deg=75) == pairs  # deterministic
    strict = P.pairs_from_poses(poses, num=2, max_angle_deg=45)
    assert not any("tilt" in p for p in strict)
    q = P.pairs_from_poses(poses, num=3, max_angle_deg=75, queries=["c0"])
    assert q == [("c0", "c1"), ("c0", "c2"), ("c0", "c3")]
    assert len(P.pairs_from_poses(poses, num=50, max_angle_deg=75)) == 28 + 8  # all pairs of c0-c7, tilt with each


def test_photo_pairs_from_poses_stay_within_their_megadepth_model():
    """Two subscenes are two reconstructions in their own frames: a photo of subscene 1 whose pose
    numbers happen to sit next to subscene 0's cameras is not their neighbour. One model: the same
    pairs as pairs_from_poses."""
    poses = {f"a{i}": _look([0, 1, 0], [i * 1.0, 0, 0]) for i in range(5)}
    poses.update({f"b{i}": _look([0, 1, 0], [i * 1.0 + 0.5, 0, 0]) for i in range(3)})
    model_of = {n: n[0] for n in poses}
    by_model = P.pairs_from_poses_by_model(poses, model_of, num=2, max_angle_deg=75)
    assert by_model and all(a[0] == b[0] for a, b in by_model)  # never across subscenes
    assert {frozenset(p) for p in by_model} >= {frozenset(("b0", "b1")), frozenset(("a0", "a1"))}
    mixed = P.pairs_from_poses(poses, num=2, max_angle_deg=75)
    assert any(a[0] != b[0] for a, b in mixed)  # what pooling the poses gave
    one = {n: "0" for n in poses}
    assert P.pairs_from_poses_by_model(poses, one, num=2, max_angle_deg=75) == mixed
    assert P.pairs_from_poses_by_model(poses, {}, num=2, max_angle_deg=75) == mixed


def test_pairs_from_retrieval_rank_and_self_exclusion(tmp_path):
    g = tmp_path / "global.h5"
    vecs = {"q": [1, 0, 0], "a": [0.9, 0.1, 0], "b": [0.5, 0.5, 0], "c": [-0.1, 0, 1], "d": [-1, 0, 0]}
    with h5py.File(g, "w") as f:
        for n, v in vecs.items():
            v = np.asarray(v, np.float32)
            f.create_group(n)["global_descriptor"] = v / np.linalg.norm(v)
    assert P.pairs_from_retrieval(g, ["q"], list(vecs), 3) == [("q", "a"), ("q", "b")]  # self out, sim < 0 out
    assert P.pairs_from_retrieval(g, ["q"], list(vecs), 1) == [("q", "a")]
    assert P.pairs_from_retrieval(g, ["q"], list(vecs), 9, min_score=None)[-1] == ("q", "d")


# ----------------------------------------------------------------------------- retrieval


def test_vlad_retrieval_ranks_true_overlap_first(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    db, queries = [], []
    for i in range(5):
        img = texture(100 + i)
        cv2.imwrite(str(d / f"db{i}.png"), img)
        h = homography(angle_deg=-6 + 3 * i, scale=1.15, tx=-20, ty=-15, p=(0, 0))
        cv2.imwrite(str(d / f"q{i}.png"), cv2.warpPerspective(img, h, (320, 240)))
        db.append(f"db{i}.png")
        queries.append(f"q{i}.png")
    fp = F.extract_features(SIFT, d, db + queries, tmp_path / "f.h5")
    vocab = R.build_vocabulary(fp, db, n_words=16, seed=0)
    assert vocab.shape == (16, 128) and vocab.dtype == np.float32
    assert np.array_equal(vocab, R.build_vocabulary(fp, db, n_words=16, seed=0))  # seeded
    gp = tmp_path / "global-feats-vlad.h5"
    R.compute_global_descriptors(fp, db + queries, vocab, gp)
    with h5py.File(gp) as f:
        g = f["q0.png/global_descriptor"][()]
        assert g.shape == (16 * 128,) and g.dtype == np.float32
        assert np.linalg.norm(g) == pytest.approx(1.0, abs=1e-5)
        assert f["q0.png/image_size"][()].tolist() == [320, 240]
    assert IO.list_h5_names(gp) == sorted(db + queries)  # the vocabulary is no image
    assert np.array_equal(R.load_vocabulary(gp), vocab)
    pairs = P.pairs_from_retrieval(gp, queries, db, 2, min_score=None)
    assert len(pairs) == 10
    firsts = {q: b for q, b in pairs[::-1]}  # the first (best) one per query wins
    assert firsts == {f"q{i}.png": f"db{i}.png" for i in range(5)}
    # reruns reuse the vocabulary and skip what is there
    mtime = gp.stat().st_mtime_ns
    assert np.array_equal(R.ensure_vocabulary(fp, db[:2], gp, n_words=8), vocab)
    R.vlad_global_features(fp, db + queries, gp, db_names=db, n_words=8)
    assert gp.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError):
        R.compute_global_descriptors(fp, queries, vocab[:8], gp)
    # the descriptor is invariant to descriptor order and changes with content
    desc = IO.read_descriptors(fp, "db0.png").T
    v = R.vlad(desc, vocab)
    np.testing.assert_allclose(v, R.vlad(desc[::-1], vocab), atol=1e-6)
    assert R.vlad(np.zeros((0, 128)), vocab).tolist() == [0.0] * 16 * 128


# ----------------------------------------------------------------------------- tiny world


def test_tiny_world_frames_and_photos(tmp_path):
    from tasks.aerial.earthstudio import ingest_scene
    from tasks.aerial.synthetic_world import generate_world

    info = generate_world(tmp_path, n_aerial=6, n_ground=4, size=(320, 240), seed=1)
    ingest_scene(tmp_path, info.scene)
    footage = tmp_path / "data" / info.scene / "footage"
    frames = sorted(p.name for p in footage.glob("*.jpeg"))
    assert len(frames) == 6
    # a featureless photo (a clear sky, one flat colour) next to the world's photos
    import cv2

    cv2.imwrite(str(info.images_dir / "zz_clear_sky.jpg"), np.full((240, 320, 3), (235, 206, 135), np.uint8))
    photos = info.photo_names + ["zz_clear_sky.jpg"]
    image_dir = {**{n: footage for n in frames}, **{n: info.images_dir for n in photos}}
    work = tmp_path / "data" / info.scene / "sfm_output_localization"
    fp = F.extract_features(SIFT, image_dir, frames + photos, work / "feats-sift.h5")
    assert IO.list_h5_names(fp) == sorted(frames + photos)
    sizes = {n: len(IO.read_keypoints(fp, n)) for n in frames + photos}
    for n in frames[:1] + info.photo_names[:1]:
        assert IO.read_image_size(fp, n) == (320, 240)
    assert min(sizes[n] for n in frames) > 50
    poses = G.cam2world_from_model(work / "reference_empty")
    assert sorted(poses) == frames
    ref_pairs = P.pairs_from_poses(poses, num=3, max_angle_deg=75)
    assert ref_pairs and all(a in frames and b in frames for a, b in ref_pairs)
    IO.write_pairs(work / "pairs-db-dist3.txt", ref_pairs)
    mp = M.match_features(NN_RATIO, work / "pairs-db-dist3.txt", fp, work / "matches.h5")
    for a, b in ref_pairs:  # the 6 frames are far apart: few matches, but consistent ones
        m, _ = IO.read_matches(mp, a, b)
        assert len(np.unique(m[:, 1])) == len(m)  # mutual: one-to-one
        assert (m[:, 0] < sizes[a]).all() and (m[:, 1] < sizes[b]).all()
    # a photo of the sky has no keypoints: stored empty, matched to nothing
    blank = [n for n in photos if sizes[n] == 0]
    assert blank == ["zz_clear_sky.jpg"]
    for n in blank:
        assert IO.read_descriptors(fp, n).shape == (128, 0)
        IO.write_pairs(work / "pairs-blank.txt", [(n, frames[0]), (frames[0], n)])
        M.match_features(NN_RATIO, work / "pairs-blank.txt", fp, mp)
        assert len(IO.read_matches(mp, frames[0], n)[0]) == 0
    gp = R.vlad_global_features(fp, frames + info.photo_names, work / "global-feats-vlad.h5", db_names=frames,
                                n_words=16)
    loc = P.pairs_from_retrieval(gp, info.photo_names, frames, 3)
    assert {q for q, _ in loc} <= set(info.photo_names) and all(b in frames for _, b in loc)
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert {"feats-sift.h5", "matches.h5", "global-feats-vlad.h5"} <= set(os.listdir(work))
