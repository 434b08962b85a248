"""The training exports as the readers' own code opens them, and the exports' reruns,
on a tiny synthetic product (four nadir cameras over a plane; seconds, no pipeline run).

Each reader check copies what that reader's code does, cited by repository and path:
zju3dv/LoFTR ``src/datasets/megadepth.py`` (``MegaDepthDataset.__init__``/``__getitem__``),
kvuong2711/aerial-megadepth ``data_generation/datasets_preprocess/preprocess_aerialmegadepth.py``
(``get_parser``) and its sample DUSt3R loader ``MegaDepthAerial`` (the README's
``misc/megadepth_aerial.py``, ``_get_views``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tasks.aerial import covisibility as C
from tasks.aerial import training_export as T
from tasks.aerial.dense.io import write_depth_h5
from tests.test_aerial_exports import _view

DOCS = Path(__file__).resolve().parents[1] / "docs" / "training_exports.md"
SCENE = "0042"


# ----------------------------------------------------------------------------- a tiny product


def _quat_wxyz(R: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    x, y, z, w = Rotation.from_matrix(R).as_quat()
    return np.array([w, x, y, z])


def make_product(root: Path, n: int = 4, seed: int = 0) -> Path:
    """``root/localized_dense_metric`` with ``images/``, ``depths/<stem>.h5`` and
    ``sparse-txt/`` (COLMAP text) of ``n`` nadir cameras 100 m over the plane z = 0, each
    shifted by a quarter footprint, and the ground points they observe."""
    import cv2

    rng = np.random.default_rng(seed)
    product = root / "localized_dense_metric"
    for sub in ("images", "depths", "sparse-txt"):
        (product / sub).mkdir(parents=True, exist_ok=True)
    views = [_view(f"img_{k}.jpg", [20.0 * k, 0, 100]) for k in range(n)]
    pts = np.stack(np.meshgrid(np.arange(-60, 140, 4.0), np.arange(-40, 40, 4.0)), -1).reshape(-1, 2)
    pts = np.c_[pts, np.zeros(len(pts))]
    obs: dict[int, list[tuple[int, int]]] = {}
    img_lines = ["# Image list", "#", "#", "#"]
    for k, v in enumerate(views):
        img = (rng.random((v.height, v.width, 3)) * 255).astype(np.uint8)
        cv2.imwrite(str(product / "images" / v.name), img)
        write_depth_h5(product / "depths" / f"img_{k}.h5", np.full((v.height, v.width), 100.0, np.float32))
        cam = (v.w2c[:3, :3] @ pts.T + v.w2c[:3, 3:4]).T
        uv = (v.K @ cam.T).T
        uv = uv[:, :2] / uv[:, 2:]
        inside = np.nonzero((uv[:, 0] >= 0) & (uv[:, 0] < v.width) & (uv[:, 1] >= 0) & (uv[:, 1] < v.height))[0]
        q, t = _quat_wxyz(v.w2c[:3, :3]), v.w2c[:3, 3]
        img_lines.append(" ".join(map(str, [k + 1, *q, *t, 1, v.name])))
        img_lines.append(" ".join(f"{uv[p, 0]} {uv[p, 1]} {p + 1}" for p in inside))
        for m, p in enumerate(inside):
            obs.setdefault(int(p), []).append((k + 1, m))
    v = views[0]
    (product / "sparse-txt" / "cameras.txt").write_text(
        f"# Camera list\n#\n#\n1 SIMPLE_PINHOLE {v.width} {v.height} {v.K[0, 0]} {v.K[0, 2]} {v.K[1, 2]}\n")
    (product / "sparse-txt" / "images.txt").write_text("\n".join(img_lines) + "\n")
    p_lines = ["# 3D point list", "#", "#"]
    for p, track in sorted(obs.items()):
        x, y, z = pts[p]
        p_lines.append(" ".join(map(str, [p + 1, x, y, z, 128, 128, 128, 0.5] + [e for o in track for e in o])))
    (product / "sparse-txt" / "points3D.txt").write_text("\n".join(p_lines) + "\n")
    return product


def export(tmp: Path, product: Path, config: T.ExportConfig | None = None, aerial=frozenset({"img_0.jpg"}),
           ground_truth: Path | None = None) -> dict:
    """The stage functions in the flow's order for one scene, without Prefect."""
    config = config or T.export_config(covisibility={"stride": 2})
    ex = tmp / "training"
    plan = C.plan(product, T.covisibility_work(ex, SCENE), config.covisibility)
    for k in plan.missing_blocks():
        C.run_block(plan, k, config.covisibility)
    entry = T.export_scene(ex, SCENE, product, set(aerial), plan, config, {"pipeline": "test"},
                           ground_truth=ground_truth)
    index = T.export_dataset(ex, None, config)
    return {"export": ex, "entry": entry, "index": index, "config": config}


SKY_ROWS = 30  # the ground truth of img_1 sees sky in its top rows


def make_ground_truth(product: Path, out: Path) -> Path:
    """The synthetic world's ground-truth layout (``sparse/`` COLMAP model with the same
    names, ``depths/<stem>.h5`` with 0 where a ray hits nothing) for the tiny product:
    img_1 sees sky in its top :data:`SKY_ROWS` rows."""
    import shutil

    from tasks.aerial.dense.io import read_depth_h5

    shutil.copytree(product / "sparse-txt", out / "sparse")
    (out / "depths").mkdir(parents=True)
    for f in sorted((product / "depths").glob("*.h5")):
        d = read_depth_h5(f)
        if f.stem == "img_1":
            d[:SKY_ROWS] = 0.0
        write_depth_h5(out / "depths" / f.name, d)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("readers")
    product = make_product(tmp / "scene")
    gt = make_ground_truth(product, tmp / "ground_truth" / SCENE)
    return {**export(tmp, product, ground_truth=gt), "product": product, "tmp": tmp, "ground_truth": gt}


# ----------------------------------------------------------------------------- 1. LoFTR


def _loftr_init(npz_path: str, min_overlap_score: float = 0.0):
    """zju3dv/LoFTR src/datasets/megadepth.py, MegaDepthDataset.__init__, the index part
    verbatim (``self.`` dropped)."""
    scene_info = np.load(npz_path, allow_pickle=True)
    pair_infos = scene_info['pair_infos'].copy()
    del scene_info['pair_infos']
    pair_infos = [pair_info for pair_info in pair_infos if pair_info[1] > min_overlap_score]
    return scene_info, pair_infos


def test_loftr_megadepth_dataset_reads_pair_infos(exported):
    """Every range file goes through LoFTR's __init__ and the index part of __getitem__
    (paths joined on root_dir, K reshaped, T_0to1 from the two poses)."""
    import os.path as osp

    ex = exported["export"]
    total = 0
    for lo, hi in exported["config"].ranges:
        path = ex / "pair_infos" / f"{SCENE}_{lo:g}_{hi:g}.npz"
        scene_info, pair_infos = _loftr_init(str(path))
        assert "pair_infos" not in scene_info
        for idx in range(len(pair_infos)):
            (idx0, idx1), overlap_score, central_matches = pair_infos[idx]
            assert lo < overlap_score <= hi
            for i in (idx0, idx1):
                assert osp.isfile(osp.join(str(ex), scene_info['image_paths'][i]))
                assert osp.isfile(osp.join(str(ex), scene_info['depth_paths'][i]))
                K = np.array(scene_info['intrinsics'][i].copy(), dtype=np.float32).reshape(3, 3)
                assert K[0, 0] > 0
            T0, T1 = scene_info['poses'][idx0], scene_info['poses'][idx1]
            T_0to1 = np.matmul(T1, np.linalg.inv(T0))[:4, :4]
            assert np.allclose(T_0to1[3], [0, 0, 0, 1])
            assert central_matches.shape[1] == 4
        total += len(pair_infos)
        assert T.read_pair_infos(path)["pair_kinds"].shape == (len(pair_infos),)
    assert total >= 3  # four cameras shifted by a quarter footprint: pairs in every range


# ----------------------------------------------------------------------------- 2. AerialMegaDepth's preprocessing


def _amd_get_parser():
    """kvuong2711/aerial-megadepth data_generation/datasets_preprocess/
    preprocess_aerialmegadepth.py, ``get_parser``, verbatim (the current script; its first
    version had ``--megasynth_dir``)."""
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument('--megadepth_aerial_dir', required=True)
    parser.add_argument('--precomputed_pairs', required=True)
    parser.add_argument('--output_dir', default='data/megadepth_aerial_processed')
    return parser


def _documented_command() -> list[str]:
    """The preprocessing command of docs/training_exports.md (its bash block), as argv."""
    blocks = re.findall(r"```bash\n(.*?)```", DOCS.read_text(), re.S)
    cmd = [b for b in blocks if "preprocess_aerialmegadepth.py" in b]
    assert len(cmd) == 1, "docs/training_exports.md: one preprocessing command"
    argv = shlex.split(cmd[0].replace("\\\n", " "))
    assert argv[:2] == ["python", "datasets_preprocess/preprocess_aerialmegadepth.py"]
    return argv[2:]


def test_aerialmegadepth_preprocessing_command_parses(exported):
    """The documented command and the one index.json gives parse with the script's own
    parser; they name the export's files; the old flag exits 2 as the script does."""
    ex = exported["export"]
    readers = json.loads((ex / "index.json").read_text())["readers"]["aerialmegadepth"]
    from_index = [x for k, v in readers.items() if k.startswith("--") for x in (k, v)]
    for argv in (_documented_command(), from_index):
        args = _amd_get_parser().parse_args(argv)
        # main(args.megadepth_aerial_dir, args.precomputed_pairs, args.output_dir), run in EXPORT
        data = np.load(ex / args.precomputed_pairs, allow_pickle=True)
        for scene in data["scenes"]:
            in_dir = os.path.join(ex, args.megadepth_aerial_dir, scene, "sfm_output_localization",
                                  "sfm_superpoint+superglue", "localized_dense_metric")
            assert os.path.isfile(os.path.join(in_dir, "sparse-txt", "cameras.txt"))
        assert args.output_dir == T.AMD_PROCESSED
    with pytest.raises(SystemExit) as exc:
        _amd_get_parser().parse_args(["--megasynth_dir", "aerialmegadepth/", "--precomputed_pairs", "x.npz"])
    assert exc.value.code == 2


# ----------------------------------------------------------------------------- 3. MegaDepthAerial's segmentation


def _imread_cv2(path, options=None):
    """naver/dust3r dust3r/utils/image.py ``imread_cv2``, verbatim but for the default."""
    import cv2
    options = cv2.IMREAD_COLOR if options is None else options
    if path.endswith(('.exr', 'EXR')):
        options = cv2.IMREAD_ANYDEPTH
    img = cv2.imread(path, options)
    if img is None:
        raise IOError(f'Could not load image={path} with {options=}')
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def _amd_preprocess(ex: Path, out_dir: Path) -> None:
    """What preprocess_aerialmegadepth.py's ``main``/``resize_one_image`` write per image
    (depth > 2000 to 0, image copied to ``<tag>.jpg``, ``.exr``, ``.npz`` with K and
    cam2world), with the poses and K from the product's text model."""
    import shutil

    import cv2
    import h5py

    from tasks.aerial import geometry as G

    data = np.load(ex / "aerialmegadepth_pairs.npz", allow_pickle=True)
    for image_id, tag in enumerate(data["images"]):
        scene = data["images_scene_name"][image_id]
        root = ex / "aerialmegadepth" / scene / "sfm_output_localization" / T.AMD_SFM_FOLDER / "localized_dense_metric"
        views = {v.name: v for v in C.load_views(root)}
        os.makedirs(out_dir / scene, exist_ok=True)
        with h5py.File(os.path.join(root, 'depths', os.path.splitext(tag)[0] + '.h5'), 'r') as hd5:
            depthmap = np.asarray(hd5['depth'])
        depthmap[depthmap > 2000] = 0.0
        shutil.copy(os.path.join(root, 'images', tag), os.path.join(out_dir, scene, tag + '.jpg'))
        cv2.imwrite(os.path.join(out_dir, scene, tag + '.exr'), depthmap)
        np.savez(os.path.join(out_dir, scene, tag + '.npz'), intrinsics=views[tag].K,
                 cam2world=G.invert_pose(views[tag].w2c))


def test_megadepth_aerial_loader_reads_segmentation(exported):
    """MegaDepthAerial._get_views' reading part on every pair of the split file: the
    segmentation path it builds from ROOT, the checks on it, the sky zeroed: exactly the
    ground truth's sky rows of img_1, nothing elsewhere."""
    import os.path as osp

    ex = exported["export"]
    readers = json.loads((ex / "index.json").read_text())["readers"]["aerialmegadepth"]
    _amd_preprocess(ex, ex / readers["--output_dir"])
    ROOT = str(ex / readers["MegaDepthAerial"]["ROOT"])
    with np.load(osp.join(ROOT, readers["MegaDepthAerial"]["split_file"]), allow_pickle=True) as data:
        all_scenes, all_images, pairs = data['scenes'], data['images'], data['pairs']
    assert len(pairs) > 0
    seen = set()
    for pair_idx in range(len(pairs)):
        scene_id, im1_id, im2_id, score = pairs[pair_idx]
        scene = all_scenes[scene_id]
        seq_path = osp.join(ROOT, scene)
        for im_id in [im1_id, im2_id]:
            img = all_images[im_id]
            image = _imread_cv2(osp.join(seq_path, img + '.jpg'))
            depthmap = _imread_cv2(osp.join(seq_path, img + ".exr"))
            before = depthmap.copy()
            seg_root = ROOT.replace('megadepth_aerial_processed', 'megadepth_aerial_processed_segmentation')
            seg_path = osp.join(seg_root, scene, img + '.png')
            segmap = _imread_cv2(seg_path)
            assert (segmap[:, :, 0] == segmap[:, :, 1]).all()
            assert (segmap[:, :, 0] == segmap[:, :, 2]).all()
            segmap = segmap[:, :, 0]
            depthmap[segmap == 2] = 0
            assert segmap.shape == depthmap.shape == image.shape[:2]
            expect_sky = np.zeros(before.shape, bool)
            if img == "img_1.jpg":
                expect_sky[:SKY_ROWS] = True
            np.testing.assert_array_equal(depthmap == 0, expect_sky | (before == 0))
            assert set(np.unique(segmap)) <= {T.ADE20K_SKY, T.SEG_UNKNOWN}
            seen.add(img)
    assert "img_1.jpg" in seen
    entry = exported["entry"]["segmentation"]
    assert entry["with ground truth"] == 4 and entry["sky pixels"] == SKY_ROWS * 160


# ----------------------------------------------------------------------------- 15. files a later run trusts


def test_rel_tolerance_out_of_range_rejected_at_config_validation():
    from pydantic import ValidationError

    from tasks.aerial.config import AerialConfig

    for bad in (-1, 0, float("nan"), 1.5):
        with pytest.raises(ValueError, match=r"covisibility\.rel_tolerance"):
            T.export_config(covisibility={"rel_tolerance": bad})
    with pytest.raises(ValidationError, match=r"exports: export setting covisibility\.rel_tolerance=-1"):
        AerialConfig.model_validate({"exports": {"covisibility": {"rel_tolerance": -1}}})
    assert T.export_config(covisibility={"rel_tolerance": 0.25}).covisibility.rel_tolerance == 0.25


def _files(ex: Path) -> dict[str, bytes]:
    return {p.relative_to(ex).as_posix(): p.read_bytes() for p in sorted(ex.rglob("*"))
            if p.is_file() and not p.is_symlink() and "work" not in p.relative_to(ex).parts[:1]}


def test_damaged_training_files_are_repaired_on_rerun(tmp_path):
    """Truncated, deleted and corrupted files under training/ do not survive a rerun (the
    scene's record no longer matches: exported again); a damaged covisibility file of a
    scene that is not rerun leaves that scene out of index.json instead of breaking it."""
    product = make_product(tmp_path / "scene")
    first = export(tmp_path, product)
    ex = first["export"]
    good = _files(ex)
    assert not first["entry"].get("skipped")
    assert export(tmp_path, product)["entry"].get("skipped")  # unchanged: nothing written
    damaged = {
        "scene_info": ex / "scene_info" / f"{SCENE}.npz",
        "pair_infos": ex / "pair_infos" / f"{SCENE}_0.1_0.3.npz",
        "exr": next((ex / "dust3r" / SCENE / "0").glob("*.exr")),
        "segmentation": next((ex / T.SEGMENTATION / SCENE).glob("*.png")),
    }
    for p in damaged.values():
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])  # truncated
    deleted = next((ex / "images" / SCENE).iterdir())
    deleted.unlink()
    cov = ex / "covisibility" / f"{SCENE}.npz"
    data = bytearray(cov.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = b"\0" * 64  # corrupt, same size
    cov.write_bytes(bytes(data))
    again = export(tmp_path, product)
    assert not again["entry"].get("skipped")
    assert _files(ex).keys() == good.keys()
    for rel in [p.relative_to(ex).as_posix() for p in damaged.values()] + [cov.relative_to(ex).as_posix()]:
        assert _files(ex)[rel] == good[rel], rel  # the same bytes as the first export
    assert deleted.exists() and deleted.samefile(product / "images" / deleted.name)
    assert SCENE in again["index"]["scenes"] and not again["index"]["scenes left out"]
    # index only (the scene is not rerun): the damaged scene is left out, the index is written
    cov.write_bytes(bytes(data))
    index = T.export_dataset(ex, None, again["config"])
    assert SCENE not in index["scenes"] and "content differs" in index["scenes left out"][SCENE]
    assert json.loads((ex / "index.json").read_text())["scenes left out"] == index["scenes left out"]


def test_photo_dropped_from_product_is_removed_from_training(tmp_path):
    """A photo that leaves the product takes its links, depth, DUSt3R files and segmentation
    out of training/ on the next export."""
    product = make_product(tmp_path / "scene")
    ex = export(tmp_path, product)["export"]
    gone = "img_3.jpg"
    assert (ex / "images" / SCENE / gone).exists()
    make_product(tmp_path / "scene", n=3)  # the same first three images, model without img_3
    (product / "images" / gone).unlink()
    (product / "depths" / "img_3.h5").unlink()
    again = export(tmp_path, product)
    assert again["entry"]["images"] == 3
    left = [p for p in ex.rglob(f"*{Path(gone).stem}*") if "work" not in p.relative_to(ex).parts]
    assert left == []


def test_empty_scene_is_reported_not_a_crash(tmp_path):
    """A product with no registered image: a clear error naming the scene (the flow's stage
    reports it and goes on), its earlier entry out of the index; other scenes unaffected."""
    product = make_product(tmp_path / "scene")
    ex = export(tmp_path, product)["export"]
    lines = (product / "sparse-txt" / "images.txt").read_text().splitlines()[:4]
    (product / "sparse-txt" / "images.txt").write_text("\n".join(lines) + "\n")
    (product / "sparse-txt" / "points3D.txt").write_text("# 3D point list\n")
    with pytest.raises(T.EmptyScene, match=f"scene {SCENE}: the product .* has no registered image"):
        export(tmp_path, product)
    assert SCENE not in T.export_dataset(ex, None, T.export_config())["scenes"]


def test_truncated_esp_is_invalid_and_replaced(tmp_path):
    """A truncated Earth Studio project beside a valid plan file is reported invalid and
    written again, not kept as 'up to date'; a plan file from before records still has its
    project parsed."""
    from tasks.aerial import esp
    from tasks.aerial import plan as PL
    from tests.test_plan import CITY

    traj = PL.get_trajectory(frames=12)
    res = PL.plan_scene(tmp_path, CITY, traj)
    good = res.esp.read_bytes()
    res.esp.write_bytes(good[: len(good) // 2])
    again = PL.plan_scene(tmp_path, CITY, traj)
    assert not again.skipped and again.invalid and "bytes, recorded" in again.invalid
    assert again.esp.read_bytes() == good and len(esp.read_esp(again.esp).cameras) == 13
    assert PL.plan_scene(tmp_path, CITY, traj).skipped
    # same size, other bytes
    res.esp.write_bytes(good.replace(b"{", b"[", 1))
    assert "content differs" in PL.plan_scene(tmp_path, CITY, traj).invalid
    # a plan file without the record: the project must parse
    doc = json.loads(res.plan.read_text())
    del doc["esp"]
    res.plan.write_text(json.dumps(doc))
    res.esp.write_bytes(good[:100])
    assert "not a valid Earth Studio project" in PL.plan_scene(tmp_path, CITY, traj).invalid


def test_changed_megadepth_inputs_are_processed_again(tmp_path):
    """A replaced raw depth or photo (same name), a changed pose in the sparse model, or a
    truncated output redoes that image; the others stay skipped."""
    import cv2
    import h5py

    from tasks.aerial import megadepth as md
    from tests.test_megadepth_preprocess import SCENE as MD_SCENE, SUB, _entry, _texture, raw_tree

    root = raw_tree.__wrapped__(tmp_path)  # the fixture's tree builder (a plain function)
    out = tmp_path / "out"
    names = list(_entry().images)
    assert [r.status for r in md.preprocess_scene(root, _entry(), out)] == ["done"] * 3
    assert [r.status for r in md.preprocess_scene(root, _entry(), out)] == ["skipped"] * 3
    dense = md.dense_dir(root, MD_SCENE, SUB)
    first_exr = cv2.imread(str(md.output_paths(out, MD_SCENE, SUB, names[0])[1]), cv2.IMREAD_UNCHANGED)
    # a replaced depth h5: same shape, other values
    with h5py.File(dense / "depths" / (Path(names[0]).stem + ".h5"), "r+") as fh:
        fh["depth"][...] = fh["depth"][...] * 2
    # a replaced photo
    W, H = cv2.imread(str(dense / "imgs" / names[1])).shape[1::-1]
    assert cv2.imwrite(str(dense / "imgs" / names[1]), _texture(W, H, 99), [cv2.IMWRITE_JPEG_QUALITY, 90])
    res = md.preprocess_scene(root, _entry(), out)
    assert [r.status for r in res] == ["done", "done", "skipped"]
    exr = cv2.imread(str(md.output_paths(out, MD_SCENE, SUB, names[0])[1]), cv2.IMREAD_UNCHANGED)
    np.testing.assert_allclose(exr[first_exr > 0], 2 * first_exr[first_exr > 0], rtol=1e-6)
    # a truncated output
    exr_path = md.output_paths(out, MD_SCENE, SUB, names[2])[1]
    exr_path.write_bytes(exr_path.read_bytes()[:100])
    assert [r.status for r in md.preprocess_scene(root, _entry(), out)] == ["skipped", "skipped", "done"]


# fusion on the analytic PatchMatch scene (five 128x96 views; the module fixture renders them)
from tests.test_aerial_patchmatch import scene  # noqa: E402,F401 - the fixture


def test_fusion_not_recomputed_when_nothing_changed_and_deterministic(scene, tmp_path):  # noqa: F811
    """fused.ply of the true depth and normal maps: a rerun with nothing changed keeps the
    file (same bytes, same mtime); a changed map, a damaged ply, fuse again, to the same bytes
    as a fresh fusion of the same maps."""
    import shutil

    from tasks.aerial import dense

    ws = shutil.copytree(scene["ws"], tmp_path / "ws")
    for name, (depth, normal) in scene["truth"].items():
        d, n = dense.map_paths(ws, name, "geometric")[:2]
        dense.write_colmap_array(d, depth)
        dense.write_colmap_array(n, normal)
    cfg = dense.DenseConfig()
    first = dense.fuse(ws, "geometric", 1000, cfg)
    ply = ws / "fused.ply"
    assert first["fused points"] > 500 and not first.get("skipped")
    good, mtime = ply.read_bytes(), ply.stat().st_mtime_ns
    again = dense.fuse(ws, "geometric", 1000, cfg)
    assert again["skipped"] and again["fused points"] == first["fused points"]
    assert ply.stat().st_mtime_ns == mtime
    ply.write_bytes(good[: len(good) // 2])  # damaged: fused again, the same bytes
    assert not dense.fuse(ws, "geometric", 1000, cfg).get("skipped")
    assert ply.read_bytes() == good
    # a fresh workspace with the same maps: the same bytes (fusion is deterministic)
    ws2 = shutil.copytree(ws, tmp_path / "ws2")
    (ws2 / "fused.ply").unlink()
    dense.fuse(ws2, "geometric", 1000, cfg)
    assert (ws2 / "fused.ply").read_bytes() == good
    # a changed map: fused again
    name = scene["names"][0]
    d = dense.map_paths(ws, name, "geometric")[0]
    dense.write_colmap_array(d, scene["truth"][name][0] * 1.01)
    assert not dense.fuse(ws, "geometric", 1000, cfg).get("skipped")


def test_demo_checks_pass_on_the_tiny_export(exported):
    """The checks the demo and flow tests run (tests/test_aerial_exports.py) hold on this
    export too, so the format changes above are covered without a pipeline run."""
    from tests.test_aerial_exports import check_pair_files, check_scene_info

    check_scene_info(exported["export"], SCENE, exported["product"])
    check_pair_files(exported["export"], SCENE, exported["config"])


def test_scene_without_ground_truth_gets_unknown_segmentation(tmp_path):
    """A real scene (no ground truth folder): every pixel 255, nothing marked sky."""
    import cv2

    product = make_product(tmp_path / "scene", n=2)
    out = export(tmp_path, product, ground_truth=tmp_path / "ground_truth" / "none")
    assert out["entry"]["segmentation"]["with ground truth"] == 0
    for png in (out["export"] / T.SEGMENTATION / SCENE).iterdir():
        assert (cv2.imread(str(png), cv2.IMREAD_UNCHANGED) == T.SEG_UNKNOWN).all()
