"""A stand-in ``hloc`` package for the tests (hloc is not installable here): hloc's entry
points and signatures, writing hloc's file layout with code that shares nothing with the
product (OpenCV's SIFT, OpenCV's brute-force matcher, a thumbnail global descriptor), so
the pipeline is shown to consume files it did not write itself.

Layout written, as hloc's ``extract_features.py`` / ``match_features.py``:
* features: one group per image name with ``keypoints`` (N, 2) float32 (pixel centre at
  integer coordinates), ``descriptors`` (D, N) (float16 when ``as_half``), ``scores`` (N,)
  and ``image_size`` (2,) = (width, height);
* global features: one group per image with ``global_descriptor`` (D,);
* matches: one group per pair ``names_to_pair(a, b)`` ('/' joined, '/' in names -> '-')
  with ``matches0`` (N0,) int16 (-1 = unmatched) and ``matching_scores0`` (N0,) float16.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import cv2
import h5py
import numpy as np

CALLS: list[tuple[str, str]] = []


def _pair(a: str, b: str) -> str:
    return "/".join((a.replace("/", "-"), b.replace("/", "-")))


def extract_main(conf, image_dir, export_dir=None, as_half=True, image_list=None, feature_path=None,
                 overwrite=False):
    CALLS.append(("extract", conf["output"]))
    feature_path = Path(feature_path or Path(export_dir) / f"{conf['output']}.h5")
    sift = cv2.SIFT_create(nfeatures=conf.get("max_keypoints", 4096))
    with h5py.File(feature_path, "a") as fd:
        for name in image_list:
            if name in fd and not overwrite:
                continue
            image = cv2.imread(str(Path(image_dir) / name), cv2.IMREAD_GRAYSCALE)
            h, w = image.shape
            grp = fd.require_group(name)
            if conf["output"].startswith("global"):
                thumb = cv2.resize(image, (32, 24), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
                thumb -= thumb.mean()
                grp.create_dataset("global_descriptor", data=thumb / (np.linalg.norm(thumb) + 1e-9))
            else:
                kps, desc = sift.detectAndCompute(image, None)
                desc = np.zeros((0, 128), np.float32) if desc is None else desc
                desc = desc / (np.linalg.norm(desc, axis=1, keepdims=True) + 1e-9)
                grp.create_dataset("keypoints", data=np.array([k.pt for k in kps], np.float32).reshape(-1, 2))
                grp.create_dataset("descriptors", data=desc.T.astype(np.float16 if as_half else np.float32))
                grp.create_dataset("scores", data=np.array([k.response for k in kps], np.float32))
            grp.create_dataset("image_size", data=np.array([w, h]))
    return feature_path


def match_main(conf, pairs, features, export_dir=None, matches=None, features_ref=None, overwrite=False):
    CALLS.append(("match", conf["output"]))
    bf = cv2.BFMatcher(cv2.NORM_L2, crossCheck=True)
    pairs_list = [line.split() for line in Path(pairs).read_text().splitlines() if line.strip()]
    with h5py.File(features, "r") as ff, h5py.File(matches, "a") as fm:
        for a, b in pairs_list:
            key = _pair(a, b)
            if key in fm or _pair(b, a) in fm:
                continue
            da = ff[a]["descriptors"][()].T.astype(np.float32)
            db = ff[b]["descriptors"][()].T.astype(np.float32)
            m0 = np.full(len(da), -1, np.int16)
            s0 = np.zeros(len(da), np.float16)
            if len(da) and len(db):
                for m in bf.match(da, db):
                    if m.distance < 0.7:
                        m0[m.queryIdx] = m.trainIdx
                        s0[m.queryIdx] = 1.0 - m.distance
            grp = fm.require_group(key)
            grp.create_dataset("matches0", data=m0)
            grp.create_dataset("matching_scores0", data=s0)
    return Path(matches)


def install(monkeypatch) -> types.ModuleType:
    """Put the stand-in in ``sys.modules`` as ``hloc`` (undone by ``monkeypatch``)."""
    hloc = types.ModuleType("hloc")
    ef = types.ModuleType("hloc.extract_features")
    ef.confs = {"superpoint_max": {"output": "feats-superpoint-n4096-rmax1600", "max_keypoints": 4096},
                "netvlad": {"output": "global-feats-netvlad"}}
    ef.main = extract_main
    mf = types.ModuleType("hloc.match_features")
    mf.confs = {"superglue": {"output": "matches-superglue"}}
    mf.main = match_main
    hloc.extract_features, hloc.match_features = ef, mf
    for name, mod in (("hloc", hloc), ("hloc.extract_features", ef), ("hloc.match_features", mf)):
        monkeypatch.setitem(sys.modules, name, mod)
    CALLS.clear()
    return hloc
