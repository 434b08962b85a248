"""Aerial part 2: every stage of tasks.aerial.pipeline on the synthetic demo scene,
against its ground truth, without Prefect (the flow tests are in test_aerial_flow.py)."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pycolmap
import pytest

from tasks.aerial import pipeline as PL
from tasks.aerial.earthstudio import ingest_scene
from tasks.aerial.evaluate import depth_metrics, evaluate_scene, gt_depth_on_grid
from tasks.aerial.megadepth import load_scene_list, preprocess_scene
from tasks.aerial.synthetic_world import ensure_world


def _prepare(root: Path, **world) -> PL.ScenePaths:
    info = ensure_world(root, **world)
    ingest_scene(root, info.scene)
    for entry in load_scene_list(info.scene_list_path):
        preprocess_scene(root / "megadepth", entry, root / "megadepth_processed")
    return PL.scene_paths(root, info.scene, root / "megadepth_processed", PL.PIPELINES.build())


def _sfm(paths: PL.ScenePaths, cfg: PL.PipelineConfig):
    """collect -> features -> pairs -> matches -> reference -> localization."""
    info = PL.collect_images(paths)
    PL.extract(paths, cfg, info["reference"] + sorted(info["queries"]))
    PL.make_pairs(paths, cfg, info)
    PL.match(paths, cfg)
    return info, PL.reference(paths, cfg), PL.localize(paths, cfg, info)


def _run(paths: PL.ScenePaths, cfg: PL.PipelineConfig, dense_names=None) -> dict:
    info, ref, loc = _sfm(paths, cfg)
    names = PL.prepare_dense(paths, PL.cpu_backend(cfg))
    dense = PL.dense_depths_cpu(paths, cfg, dense_names(names) if dense_names else names)
    PL.fuse_cpu(paths, cfg)
    export = PL.export_product(paths)
    return {"info": info, "reference": ref, "localization": loc, "dense": dense, "export": export}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The embedded demo scene (default world: 48 frames, 16 photos, 640x480), every stage with
    the default configuration: dense depth (the CPU PatchMatch) for every registered image, as
    ``python -m flows.aerial`` makes it."""
    root = tmp_path_factory.mktemp("aerial_demo")
    paths = _prepare(root)
    cfg = PL.PIPELINES.build()
    out = _run(paths, cfg)
    out["paths"] = paths
    out["cfg"] = cfg
    out["accuracy"] = evaluate_scene(paths.product, paths.ground_truth, sorted(out["info"]["queries"]))
    return out


#: Registration of the demo scene: (measured, limit). The pipeline is deterministic (the
#: same figures in every run since they were first recorded, docs/benchmarks.md); each limit
#: is about 2x the measured figure (1.5x for the reprojection error, whose spread is
#: smaller), so a regression that makes a figure 3x worse fails.
REGISTRATION_LIMITS = {
    "median rotation error deg": (0.1016, 0.2),
    "max rotation error deg": (0.2605, 0.5),
    "median centre error m": (0.0754, 0.15),
    "max centre error m": (0.1926, 0.4),
    "median centre error / extent": (0.00049, 0.001),
    "scale ratio median deviation": (0.00032, 0.0008),
    "scale ratio max deviation": (0.0305, 0.06),
    "mean reprojection error px": (0.485, 0.75),
}


def registration_figures(poses: dict, localization_counts: dict) -> dict[str, float]:
    out = {k: poses[k] for k in REGISTRATION_LIMITS if k in poses}
    out["scale ratio median deviation"] = abs(poses["scale ratio median"] - 1.0)
    out["mean reprojection error px"] = localization_counts["mean reprojection error px"]
    return out


def registration_failures(figures: dict[str, float]) -> list[str]:
    return [f"{k} = {figures[k]:.5g} (measured {m}, limit {lim})"
            for k, (m, lim) in REGISTRATION_LIMITS.items() if not figures[k] < lim]


def test_registration_limits_catch_a_3x_regression():
    """Each limit passes the measured figure and fails a figure 3x worse."""
    measured = {k: m for k, (m, _) in REGISTRATION_LIMITS.items()}
    assert registration_failures(measured) == []
    for k in REGISTRATION_LIMITS:
        assert len(registration_failures({**measured, k: 3 * measured[k]})) == 1, k


def test_demo_registration_accuracy(demo):
    poses = demo["accuracy"]["poses"]
    assert poses["photos attempted"] == 16
    assert poses["photos registered"] == 16, demo["localization"].problems
    assert poses["false registrations"] == 0, poses["false registration photos"]
    figures = registration_figures(poses, demo["localization"].counts)
    assert registration_failures(figures) == [], figures


#: Depth of the demo scene by the SGBM CPU method (``--config sgbm``) on every photo and every third
#: frame: (measured, limit, kind). Deterministic like the registration; AbsRel and the share outside
#: 1.25x at about 2x the measured figure, coverage at half, so a figure 3x worse fails.
DEPTH_LIMITS = {
    ("aerial", "absrel"): (0.0092, 0.02, "max"),
    ("aerial", "outside_1.25"): (0.0053, 0.012, "max"),
    ("aerial", "coverage"): (0.248, 0.12, "min"),
    ("photos", "absrel"): (0.018, 0.036, "max"),
    ("photos", "outside_1.25"): (0.0105, 0.025, "max"),
    ("photos", "coverage"): (0.156, 0.075, "min"),
    ("all", "absrel"): (0.0119, 0.025, "max"),
}


def depth_failures(depth: dict, limits: dict | None = None) -> list[str]:
    """The figures of ``depth`` outside ``limits`` (default: the SGBM ones, ``DEPTH_LIMITS``)."""
    out = []
    for (group, metric), (measured, limit, kind) in (DEPTH_LIMITS if limits is None else limits).items():
        g = depth[group]
        value = 1.0 - g["within_1.25"] if metric == "outside_1.25" else g[metric]
        if not (value < limit if kind == "max" else value > limit):
            out.append(f"{group} {metric} = {value:.4g} (measured {measured}, limit {kind} {limit})")
    return out


def test_depth_limits_catch_a_3x_regression():
    def as_depth(values):
        depth = {}
        for (group, metric), v in values.items():
            depth.setdefault(group, {})["within_1.25" if metric == "outside_1.25" else metric] = \
                1.0 - v if metric == "outside_1.25" else v
        for g in depth.values():
            g.setdefault("within_1.25", 1.0)
            g.setdefault("coverage", 1.0)
        return depth

    measured = {k: m for k, (m, _, _) in DEPTH_LIMITS.items()}
    assert depth_failures(as_depth(measured)) == []
    for k, (m, _, kind) in DEPTH_LIMITS.items():
        worse = {**measured, k: 3 * m if kind == "max" else m / 3}
        assert len(depth_failures(as_depth(worse))) == 1, k


def test_accuracy_summary_names_each_missed_goal():
    """The terminal's and the report's accuracy rows: a met goal is plain, a missed one says what."""
    from tasks.aerial.evaluate import summary_rows

    poses = {"photos registered": 4, "photos attempted": 5, "median rotation error deg": 0.38,
             "median centre error m": 0.3, "median centre error / extent": 0.0023, "scene extent m": 133.0,
             "scale ratio median": 1.0056, "scale ratio max deviation": 0.1}
    depth = {"aerial": {"coverage": 0.423, "absrel": 0.023, "within_1.25": 0.98, "pixels": 10, "images": 24},
             "photos": {"coverage": 0.65, "absrel": 0.06, "within_1.25": 0.85, "pixels": 10, "images": 4},
             "all": {"coverage": 0.5, "absrel": 0.03, "within_1.25": 0.95, "pixels": 20, "images": 28}}
    rows = {m.split(" (")[0]: goal for m, _, goal in summary_rows({"poses": poses, "depth": depth})}
    assert rows["photos registered"] == "all [MISSED: 1 not registered]"
    assert rows["median rotation error"] == "< 0.5 deg" and "MISSED" not in rows["metric scale"]
    assert rows["depth aerial"].endswith("[MISSED: coverage 42.3 % < 70 %]")
    assert rows["depth photos"].endswith("[MISSED: AbsRel 0.0600 >= 0.05; within 1.25x 85.0 % < 90 %]")
    assert "MISSED" not in rows["depth all"]
    poses["median rotation error deg"] = 0.6
    rows = {m.split(" (")[0]: goal for m, _, goal in summary_rows({"poses": poses, "depth": depth})}
    assert rows["median rotation error"] == "< 0.5 deg [MISSED: rotation error >= 0.5 deg]"


def test_demo_sgbm_depth_accuracy(demo, tmp_path):
    """The SGBM CPU method on every photo and every third frame of the demo, in a copy of the
    demo's workspace (its own dense stage, fusion, export and evaluation)."""
    import shutil

    paths0 = demo["paths"]
    root = tmp_path / "demo"
    shutil.copytree(paths0.root, root, symlinks=True)
    cfg = PL.PIPELINES.build(dense={"cpu_method": "sgbm"})
    paths = PL.scene_paths(root, paths0.scene, root / "megadepth_processed", cfg)
    for stale in (paths.dense / "stereo", paths.dense / "depths", paths.dense / "fused.ply", paths.product):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    names = PL.registered_names(paths)
    frames = [n for n in names if n.endswith(".jpeg")]
    out = PL.dense_depths_cpu(paths, cfg, [n for n in names if not n.endswith(".jpeg")] + frames[::3])
    assert not out["failures"], out["failures"]
    assert PL.fuse_cpu(paths, cfg).stat().st_size > 1000
    assert PL.export_product(paths)["product depths"] == 16 + 16
    depth = evaluate_scene(paths.product, paths.ground_truth, sorted(demo["info"]["queries"]))["depth"]
    assert depth["aerial"]["images"] == 16 and depth["photos"]["images"] == 16
    assert depth_failures(depth) == [], depth


#: The CPU PatchMatch (the default CPU method) on every image of the demo, as ``python -m flows.aerial``
#: densifies it (issue 14; goals: coverage >= 0.70
#: aerial, >= 0.60 photos, AbsRel < 0.05, >= 90 % within 1.25x). (measured, limit, kind); measured
#: with the fourth session's defaults (bench_dense_coverage.py and the flow: the same figures);
#: margins: coverage -3 / -2.5 points, AbsRel 1.5x, outside 1.25x 1.7-2x.
PATCHMATCH_LIMITS = {
    ("aerial", "coverage"): (0.770, 0.74, "min"),
    ("aerial", "absrel"): (0.0178, 0.027, "max"),
    ("aerial", "outside_1.25"): (0.018, 0.03, "max"),
    ("photos", "coverage"): (0.645, 0.62, "min"),
    ("photos", "absrel"): (0.0201, 0.030, "max"),
    ("photos", "outside_1.25"): (0.013, 0.025, "max"),
}


def test_demo_patchmatch_depth_meets_the_goals(demo):
    """Every registered image of the demo densified by the default CPU method (both passes, the
    fusion, the export, the product), evaluated against the ground truth."""
    depth = demo["accuracy"]["depth"]
    assert depth["aerial"]["images"] == 48 and depth["photos"]["images"] == 16
    assert depth_failures(depth, PATCHMATCH_LIMITS) == [], depth


def test_reference_triangulation(demo):
    paths = demo["paths"]
    ref = pycolmap.Reconstruction(str(paths.sfm))
    empty = pycolmap.Reconstruction(str(paths.reference_empty))
    assert ref.num_reg_images() == empty.num_reg_images() == 48
    assert ref.num_points3D() > 1100  # measured 1417
    by_name = {im.name: im for im in ref.images.values()}
    for im in empty.images.values():  # poses held fixed
        assert np.allclose(by_name[im.name].cam_from_world().matrix(), im.cam_from_world().matrix(), atol=1e-9)
    errors = [p.error for p in ref.points3D.values()]
    assert np.mean(errors) < 1.5
    counts = demo["reference"].counts
    assert counts["reference pairs verified"] >= 95  # measured 108


def test_pairs_and_hloc_files(demo):
    paths = demo["paths"]
    from tasks.aerial.io import read_pairs

    ref_pairs = read_pairs(paths.pairs_reference)
    ret = read_pairs(paths.pairs_retrieval)
    qq = read_pairs(paths.pairs_query)
    queries = set(demo["info"]["queries"])
    reference = set(demo["info"]["reference"])
    assert ref_pairs and all(a in reference and b in reference for a, b in ref_pairs)
    assert ret and all(a in queries and b in reference for a, b in ret)
    assert qq and all(a in queries and b in queries for a, b in qq)
    # retrieval scales: not all query-reference pairs
    assert len(ret) < len(queries) * len(reference)
    with h5py.File(paths.features, "r") as f:
        for name in list(queries)[:3] + list(reference)[:3]:
            g = f[name]
            assert g["keypoints"].shape[1] == 2 and g["descriptors"].shape[0] == 128
            assert g["descriptors"].shape[1] == g["keypoints"].shape[0]
            assert set(g) >= {"keypoints", "descriptors", "scores", "image_size"}
    with h5py.File(paths.matches, "r") as f:
        a, b = ret[0]
        key = f"{a}/{b}" if f"{a}/{b}" in f else f"{b}/{a}"
        assert {"matches0", "matching_scores0"} <= set(f[key])
    assert paths.sfm.name == "sfm_sift+mnn"


def test_product_layout(demo):
    """What DUSt3R/AerialMegaDepth loaders read: five numbers per camera line, COLMAP's
    headers, real image files, depths as float32 metres with gzip."""
    product = demo["paths"].product
    assert product.name == "localized_dense_metric" and product.parent.name == "sfm_sift+mnn"
    lines = (product / "sparse-txt" / "cameras.txt").read_text().splitlines()
    assert all(x.startswith("#") for x in lines[:3]) and not lines[3].startswith("#")
    for line in lines[3:]:
        parts = line.split()
        assert parts[1] == "SIMPLE_PINHOLE" and len(parts) == 2 + 5
    img_lines = (product / "sparse-txt" / "images.txt").read_text().splitlines()
    assert all(x.startswith("#") for x in img_lines[:4]) and not img_lines[4].startswith("#")
    assert (product / "sparse-txt" / "points3D.txt").exists()
    model = pycolmap.Reconstruction(str(product / "sparse-txt"))
    assert model.num_reg_images() == 48 + 16
    images = sorted(p.name for p in (product / "images").iterdir())
    assert images == sorted(im.name for im in model.images.values())
    assert not any((product / "images" / n).is_symlink() for n in images)
    depths = sorted((product / "depths").glob("*.h5"))
    assert len(depths) == demo["export"]["product depths"] == 48 + 16
    with h5py.File(depths[0], "r") as f:
        d = f["depth"]
        assert d.dtype == np.float32 and d.compression == "gzip"
    # a photo's depth has the photo's size
    photo = next(n for n in images if not n.endswith(".jpeg"))
    import cv2

    img = cv2.imread(str(product / "images" / photo))
    with h5py.File(product / "depths" / f"{Path(photo).stem}.h5", "r") as f:
        assert f["depth"].shape == img.shape[:2]
    assert (demo["paths"].dense / "fused.ply").stat().st_size > 1000


def test_rerun_skips_complete_stages(demo):
    paths, cfg = demo["paths"], demo["cfg"]
    info = PL.collect_images(paths)
    mtimes = {p: p.stat().st_mtime_ns for p in (paths.features, paths.matches, paths.pairs_all)}
    PL.extract(paths, cfg, info["reference"] + sorted(info["queries"]))
    PL.make_pairs(paths, cfg, info)
    PL.match(paths, cfg)
    assert PL.reference(paths, cfg).skipped
    assert PL.localize(paths, cfg, info).skipped
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # a changed setting invalidates the stage (and only then)
    changed = PL.PIPELINES.build(sfm={"ref_max_epipolar_error": 3.0})
    res = PL.reference(paths, changed)
    assert not res.skipped
    assert PL.reference(paths, changed).skipped
    assert not PL.reference(paths, cfg).skipped  # back to the demo's settings


def test_resume_after_interruption(demo):
    """A run killed during localization (its temporary folder left behind) and during the
    dense stage (some depth maps missing, the product not exported) resumes: finished work
    is kept, only the missing pieces are computed."""
    from tasks.aerial import dense as D

    paths, cfg, info = demo["paths"], demo["cfg"], demo["info"]
    depth_dir = paths.dense / "depths"
    done = sorted(depth_dir.glob("*.h5"))
    lost = done[:2]
    kept = {p: p.stat().st_mtime_ns for p in done[2:]}
    for p in lost:
        p.unlink()
    from tasks.common.atomic import _HOST

    # the temporary folder of a killed writer (process gone), in the atomic module's naming scheme
    partial = paths.localized.with_name(f".{paths.localized.name}.{_HOST}-999999999-k1ll3d.partial")
    partial.mkdir()
    (partial / "junk").write_text("half-written")
    (paths.localized / ".complete").unlink()  # the stage had not finished
    import shutil

    shutil.rmtree(paths.product)
    loc = PL.localize(paths, cfg, info)
    assert not loc.skipped and loc.counts["photos registered"] == 16
    assert not partial.exists()
    names = [p.name for p in lost]
    todo = [n for n in PL.registered_names(paths) if D.depth_path(depth_dir, n).name in names]
    res = PL.dense_depths_cpu(paths, cfg, todo + [n for n in PL.registered_names(paths)
                                                  if D.depth_path(depth_dir, n) in kept][:3])
    assert sorted(n for n, st in res["stats"].items() if not st.get("skipped")) == sorted(todo)
    assert all(p.exists() for p in lost)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    out = PL.export_product(paths)
    assert out["product depths"] == len(done)


def test_gt_depth_mapping_identity_and_crop():
    gt = np.arange(12 * 16, dtype=np.float32).reshape(12, 16) + 1
    k = np.array([[10.0, 0, 8], [0, 10.0, 6], [0, 0, 1]])
    assert np.array_equal(gt_depth_on_grid(gt, k, k, gt.shape), gt)
    # a centred crop of 8x6 starting at (4, 3)
    k_crop = np.array([[10.0, 0, 4], [0, 10.0, 3], [0, 0, 1]])
    assert np.array_equal(gt_depth_on_grid(gt, k, k_crop, (6, 8)), gt[3:9, 4:12])
    m = depth_metrics(np.array([1.0, 2.0, 0.0, 4.0]), np.array([1.0, 2.2, 3.0, 0.0]))
    assert m["pixels"] == 2 and abs(m["absrel"] - 0.1 / 2.2) < 1e-9 and m["within_1.25"] == 1.0
    assert depth_metrics(np.array([2.0]), np.array([2.5]))["within_1.25"] == 0.0  # exactly 1.25x is out
    assert abs(m["coverage"] - 2 / 3) < 1e-9


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("aerial_small")
    return _prepare(root, n_aerial=24, n_ground=5, seed=0)


def test_corrupt_and_unregistrable_photos_are_reported(small):
    import cv2

    paths = small
    cfg = PL.PIPELINES.build()
    md = sorted((paths.megadepth_out / paths.scene).glob("*/*.jpg.jpg"))
    corrupt, noise = md[0], md[1]
    corrupt.write_bytes(b"not a jpeg at all")
    rng = np.random.default_rng(0)
    img = cv2.imread(str(md[2]))
    cv2.imwrite(str(noise), (rng.uniform(0, 255, img.shape)).astype(np.uint8))
    out = _run(paths, cfg, dense_names=lambda names: [n for n in names if not n.endswith(".jpeg")][:2])
    info, loc = out["info"], out["localization"]
    corrupt_name = corrupt.name[: -len(".jpg")]
    noise_name = noise.name[: -len(".jpg")]
    assert corrupt_name in info["problems"] and "not a readable image" in info["problems"][corrupt_name]
    assert noise_name in loc.problems and "not registered" in loc.problems[noise_name]
    assert loc.counts["photos attempted"] == 4
    assert loc.counts["photos registered"] >= 2
    assert out["export"]["product images"] == 24 + loc.counts["photos registered"]


def test_query_camera_rejects_anisotropic_intrinsics():
    from tasks.aerial.reconstruction import Query, query_camera

    q = Query("x.jpg", 800, 600, np.array([[500.0, 0, 400], [0, 520.0, 300], [0, 0, 1]]))
    with pytest.raises(ValueError, match="x.jpg"):
        query_camera(q, 1)
    cam = query_camera(Query("y.jpg", 800, 600, np.array([[500.0, 0, 400], [0, 500.4, 300], [0, 0, 1]])), 3)
    assert cam.model.name == "SIMPLE_PINHOLE" and abs(cam.params[0] - 500.2) < 1e-9


def test_unknown_configuration_is_named():
    with pytest.raises(KeyError, match="sift\\+mnn"):
        PL.PIPELINES.build("nope")
    with pytest.raises(KeyError, match="bogus"):
        PL.PIPELINES.build(bogus=1)
    assert PL.PIPELINES.build(dense={"backend": "cpu"}).dense.backend == "cpu"
    assert os.path.basename(str(PL.PIPELINES.build("superpoint+superglue").name)) == "superpoint+superglue"
    # the sfm folder follows the features and matcher actually used
    assert PL.PIPELINES.build().tag == "sift+mnn"
    assert PL.PIPELINES.build("superpoint+superglue").tag == "superpoint+superglue"
    assert PL.PIPELINES.build(backend="hloc", features="disk", matcher="disk+lightglue").tag == "disk+lightglue"
    paths = PL.scene_paths(Path("/r"), "0001", Path("/md"), PL.PIPELINES.build("superpoint+superglue"))
    assert paths.sfm == Path("/r/data/0001/sfm_output_localization/sfm_superpoint+superglue")


def test_layout_default_and_modified_configurations():
    """One owner of the scene layout: the default configuration gives the contract's paths
    (``sfm_sift+mnn/localized_dense_metric``); a configuration whose sparse settings differ
    from its named one gets a folder of its own, the same for the same settings; dense
    settings and the thread count name nothing; file names follow the confs' outputs."""
    root, md = Path("/r"), Path("/md")
    work = root / "data" / "0001" / "sfm_output_localization"
    d = PL.scene_paths(root, "0001", md, PL.PIPELINES.build())
    assert d.product == work / "sfm_sift+mnn" / "localized_dense_metric"
    assert d.localized == work / "sfm_sift+mnn" / "localized_model_mapper_metric"
    assert d.features == work / "feats-sift-colmap.h5"
    assert d.matches == work / "feats-sift-colmap_matches-NN-mutual-ratio.8_pairs-all.h5"
    assert d.global_features == work / "global-feats-vlad.h5"
    assert (d.video, d.camera_export) == (root / "downloaded_data" / "0001.mp4", root / "downloaded_data" / "0001.json")
    assert (d.footage, d.metadata, d.ingest_record) == (root / "data/0001/footage", root / "data/0001/0001.json",
                                                        root / "data/0001/ingest.json")
    assert d.reference_empty == work / "reference_empty" and d.ground_truth == root / "ground_truth" / "0001"
    assert d.megadepth_scene == md / "0001"
    same = [PL.PIPELINES.build(dense={"cpu_method": "sgbm"}), PL.PIPELINES.build(sfm={"num_threads": 2})]
    assert all(PL.scene_paths(root, "0001", md, c).sfm.name == "sfm_sift+mnn" for c in same)
    mod = {
        "features": PL.PIPELINES.build(features="sift"),
        "matcher": PL.PIPELINES.build(matcher="NN-mutual"),
        "pairs": PL.PIPELINES.build(ref_pairs_num=20),
        "sfm": PL.PIPELINES.build(sfm={"abs_pose_max_error": 8.0}),
        "words": PL.PIPELINES.build(vlad_words=32),
    }
    names = {k: PL.scene_paths(root, "0001", md, c).sfm.name for k, c in mod.items()}
    assert all(n.startswith("sfm_sift+mnn-") and len(n) == len("sfm_sift+mnn-") + 8 for n in names.values()), names
    assert len(set(names.values())) == len(names)  # each its own folder
    assert PL.scene_paths(root, "0001", md, PL.PIPELINES.build(features="sift")).sfm.name == names["features"]
    assert PL.scene_paths(root, "0001", md, mod["features"]).features.name == "feats-sift.h5"
    assert PL.scene_paths(root, "0001", md, mod["matcher"]).matches.name == \
        "feats-sift-colmap_matches-NN-mutual_pairs-all.h5"
    assert PL.scene_paths(root, "0001", md, mod["words"]).global_features.name == "global-feats-vlad-k32-seed0.h5"
    assert PL.PIPELINES.build(features="sift").modified_settings() == {"features": "sift"}
    with pytest.raises(KeyError, match="sift-colmap"):
        PL.scene_paths(root, "0001", md, PL.PIPELINES.build(features="nope"))


def test_retrieval_finds_overlapping_frames(demo):
    """VLAD retrieval ranks, among its top 5, a reference frame that truly sees what the
    photo sees (centre within 20 m, viewing directions within 60 deg) for nearly every photo."""
    from tasks.aerial.pairs import pairs_from_retrieval

    paths, info = demo["paths"], demo["info"]
    gt = pycolmap.Reconstruction(str(paths.ground_truth / "sparse"))
    by = {im.name: im for im in gt.images.values()}
    queries, reference = sorted(info["queries"]), info["reference"]
    pairs = pairs_from_retrieval(paths.global_features, queries, reference, 5)
    assert len(pairs) == 5 * len(queries)
    hits = 0
    for name in queries:
        c, z = by[name].projection_center(), by[name].cam_from_world().rotation.matrix()[2]
        good = {r for r in reference if np.linalg.norm(by[r].projection_center() - c) < 20
                and z @ by[r].cam_from_world().rotation.matrix()[2] > 0.5}
        hits += bool(good & {b for a, b in pairs if a == name})
    assert hits >= 14, f"{hits}/16 photos with an overlapping frame in their top 5"


def test_hloc_backend_calls_hloc_api_and_consumes_its_files(small, monkeypatch, tmp_path):
    """The paper's configuration goes through hloc (not installable here). A stand-in
    ``hloc`` package (tests/hloc_standin.py) with hloc's entry points and signatures
    (``extract_features.main(conf, image_dir, export_dir=None, as_half=True,
    image_list=None, feature_path=None, overwrite=False)``, ``match_features.main(conf,
    pairs, features, export_dir=None, matches=None, features_ref=None, overwrite=False)``)
    writes hloc-layout files with OpenCV's SIFT and matcher and a thumbnail global
    descriptor, sharing no code with the product; the pipeline must call it that way and
    run unchanged on files it did not write."""
    import shutil

    from tests import hloc_standin

    hloc_standin.install(monkeypatch)
    calls = hloc_standin.CALLS

    root = tmp_path / "scene"
    shutil.copytree(small.root, root, symlinks=False,
                    ignore=shutil.ignore_patterns("sfm_output_localization"))
    from tasks.aerial.earthstudio import ingest_scene

    ingest_scene(root, small.scene, force=True)
    assert PL.hloc_available()
    cfg = PL.PIPELINES.build("superpoint+superglue")
    paths = PL.scene_paths(root, small.scene, root / "megadepth_processed", cfg)
    _, ref, loc = _sfm(paths, cfg)
    assert [c[0] for c in calls] == ["extract", "extract", "match"]
    assert paths.sfm.name == "sfm_superpoint+superglue" and paths.localized.is_dir()
    assert ref.counts["reference points"] > 50
    # the stand-in's features are a few hundred OpenCV SIFT points per image, not SuperPoint's:
    # after the earlier test of this module broke two of the five photos, the three true ones
    # reach 106, 15 and 12 2D-3D inliers; verification (tests/test_aerial_verification.py)
    # keeps the first and rejects the two weak ones with their reason (with the floor at 10,
    # one of them comes out 6 m below the ground: a wrong pose)
    rejected = [name for name, reason in loc.problems.items() if "2D-3D inliers" in str(reason)]
    assert loc.counts["photos registered"] >= 1
    assert loc.counts["photos registered"] + len(rejected) >= 2, loc.problems  # the mapper placed >= 2 photos


def test_scene_without_photos_still_gives_the_aerial_product(small, tmp_path):
    """No MegaDepth photos for a scene: the reference frames alone go through every stage."""
    import shutil

    root = tmp_path / "noground"
    shutil.copytree(small.root / "data", root / "data", ignore=shutil.ignore_patterns("sfm_output_localization"))
    shutil.copytree(small.root / "downloaded_data", root / "downloaded_data")
    ingest_scene(root, small.scene, force=True)
    cfg = PL.PIPELINES.build()
    paths = PL.scene_paths(root, small.scene, root / "megadepth_processed", cfg)
    out = _run(paths, cfg, dense_names=lambda names: names[-2:])
    assert out["info"]["queries"] == {}
    assert out["localization"].counts["photos attempted"] == 0
    model = pycolmap.Reconstruction(str(paths.product / "sparse-txt"))
    assert model.num_reg_images() == 24
    assert out["export"]["product depths"] == 2


# ----------------------------------------------------------------------------- training exports (issue 15)


@pytest.fixture(scope="module")
def training(demo, tmp_path_factory):
    """The training exports of the demo scene (tasks/aerial/training_export.py)."""
    from tests.test_aerial_exports import run_exports

    export = tmp_path_factory.mktemp("training")
    return {"export": export, **run_exports(export, demo["paths"])}


def test_training_files_load_as_the_readers_load_them(demo, training):
    from tests.test_aerial_exports import check_pair_files, check_scene_info

    export, paths = training["export"], demo["paths"]
    info = check_scene_info(export, paths.scene, paths.product)
    assert len(info["image_paths"]) == 48 + 16
    # the demo has depth for every image
    assert sum(d is not None for d in info["depth_paths"]) == training["entry"]["images with depth"] == 48 + 16
    out = check_pair_files(export, paths.scene, training["config"])
    assert out["aerial-ground"] > 0  # aerial-ground pairs exist and are marked
    assert (export / "pictures" / f"{paths.scene}_covisibility.png").read_bytes()[:4] == b"\x89PNG"
    assert training["entry"]["picture pair"]["score"] > 0.1


def test_training_covisibility_against_ground_truth(demo, training):
    """The covisibility of every candidate pair against the same quantity recomputed from
    the true poses and the true depths (on the pixels where the product has depth, so
    that coverage, which the dense stage owns, is not what is measured here)."""
    from tasks.aerial import covisibility as C

    plan, cfg = training["plan"], training["config"].covisibility
    est, _ = C.matrices(plan)
    gt, _ = C.ground_truth_matrices(plan, demo["paths"].ground_truth, cfg, on_estimate_support=True)
    ij = np.array(plan.pairs)
    i, j = np.r_[ij[:, 0], ij[:, 1]], np.r_[ij[:, 1], ij[:, 0]]
    keep = gt[i, j] >= 0
    diff = np.abs(est[i, j] - gt[i, j])[keep]
    assert keep.sum() > 50
    # measured on the demo (PatchMatch depth): mean 0.0234, p90 0.0515 (docs/benchmarks.md,
    # bench/bench_exports.py); limits 1.5x measured. A 0.5 degree rotation error added to every
    # product pose gives mean 0.070 / p90 0.18 (fails).
    assert diff.mean() < 0.035, diff.mean()
    assert np.percentile(diff, 90) < 0.08, np.percentile(diff, 90)
    # pairs the product calls overlapping overlap in truth, and the reverse
    assert np.corrcoef(est[i, j][keep], gt[i, j][keep])[0, 1] > 0.9
    # against the truth with the full true depth (what coverage costs): measured mean 0.0765 (SGBM's
    # 25 % / 15 % coverage gave 0.269); limit 1.3x measured
    full, _ = C.ground_truth_matrices(plan, demo["paths"].ground_truth, cfg, on_estimate_support=False)
    keep = full[i, j] >= 0
    assert np.abs(est[i, j] - full[i, j])[keep].mean() < 0.10


def test_training_export_resumes(demo, training):
    from tasks.aerial import covisibility as C
    from tests.test_aerial_exports import run_exports

    export, plan = training["export"], training["plan"]
    files = plan.block_files()
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    again = C.plan(demo["paths"].product, plan.work, training["config"].covisibility)
    assert again.key == plan.key and again.pairs == plan.pairs and not again.missing_blocks()
    files[0].unlink()  # a run killed during the blocks: only that block is computed again
    assert again.missing_blocks() == [0]
    out = run_exports(export, demo["paths"])
    assert out["entry"].get("skipped")  # same product and settings: the scene files are kept
    assert {f: f.stat().st_mtime_ns for f in files[1:]} == {f: mtimes[f] for f in files[1:]}
    np.testing.assert_array_equal(C.matrices(out["plan"])[0], C.matrices(plan)[0])


def test_gpu_patchmatch_backend_on_a_small_scene(small, tmp_path):
    """The GPU backend (pycolmap PatchMatch stereo + fusion) run for real on the small scene
    whenever pycolmap has CUDA (pycolmap-cuda12 on a GPU machine). Not yet measured on a
    GPU here, so its limits are the product's goals (docs/benchmarks.md), to be tightened
    to 2x the measured figures once a GPU run is recorded."""
    if not pycolmap.has_cuda:
        pytest.skip("pycolmap is built without CUDA: the GPU backend needs pycolmap-cuda12 on a CUDA machine")
    import shutil

    root = tmp_path / "gpu"
    shutil.copytree(small.root, root, ignore=shutil.ignore_patterns("sfm_output_localization"))
    ingest_scene(root, small.scene, force=True)
    cfg = PL.PIPELINES.build(dense={"backend": "gpu"})
    paths = PL.scene_paths(root, small.scene, root / "megadepth_processed", cfg)
    info, _, _ = _sfm(paths, cfg)
    names = PL.prepare_dense(paths, PL.cpu_backend(cfg))
    PL.dense_depths_gpu(paths, cfg, names)
    PL.export_product(paths)
    depth = evaluate_scene(paths.product, paths.ground_truth, sorted(info["queries"]))["depth"]
    for group, coverage in (("aerial", 0.7), ("photos", 0.6)):
        g = depth[group]
        assert g["absrel"] < 0.05 and g["within_1.25"] >= 0.9 and g["coverage"] >= coverage, (group, g)
    assert (paths.dense / "fused.ply").stat().st_size > 0
