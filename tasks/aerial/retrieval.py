"""Image retrieval without network weights: VLAD on the local SIFT descriptors.

The original pipeline retrieves reference frames for each MegaDepth photo with
NetVLAD (hloc's ``netvlad`` conf, downloaded weights). This module computes an
honest, classic substitute offline from the features already extracted
(:mod:`tasks.aerial.features`): VLAD (Jegou et al. 2010) with

* a visual vocabulary of ``n_words`` centres by k-means
  (OpenCV's ``cv2.kmeans``, k-means++ seeding, fixed seed) on a seeded sample
  of the database descriptors;
* hard assignment of each descriptor to its nearest centre, residuals summed per
  centre;
* intra-normalisation (each centre's residual sum to unit L2, Arandjelovic &
  Zisserman 2013), power normalisation (signed square root) and global L2.

Output is hloc's global-features layout: one group per image with
``global_descriptor`` (K*D,) float32 and ``image_size`` (copied from the
features file). The vocabulary is stored in the same file as the root attribute
``vlad_vocabulary`` (K, D) (with ``vlad_n_words``, ``vlad_seed``), never as a
dataset, so hloc's name listing is not disturbed; reruns reuse it
(:func:`ensure_vocabulary`) and descriptors of different vocabularies are never
mixed in one file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from tasks.aerial import io as hloc_io
from tasks.common.atomic import atomic_h5

logger = logging.getLogger(__name__)

VOCAB_ATTR = "vlad_vocabulary"


def _sample_descriptors(feature_path: Path, names: Sequence[str], max_descriptors: int,
                        rng: np.random.Generator) -> np.ndarray:
    per_image = max(1, math.ceil(max_descriptors / max(1, len(names))))
    chunks = []
    for _, f in hloc_io.iter_features(feature_path, names):
        d = f["descriptors"].astype(np.float32).T  # (N, D)
        if len(d) > per_image:
            d = d[np.sort(rng.choice(len(d), per_image, replace=False))]
        chunks.append(d)
    chunks = [c for c in chunks if len(c)]
    return np.concatenate(chunks) if chunks else np.zeros((0, 128), np.float32)


def build_vocabulary(feature_path: Path, names: Sequence[str], n_words: int = 64, seed: int = 0,
                     max_descriptors: int = 50_000, iterations: int = 20) -> np.ndarray:
    """k-means vocabulary (n_words, D) float32 on a seeded sample (at most
    ``max_descriptors``, spread evenly over ``names``) of the descriptors in
    ``feature_path``. Deterministic for a given file, names and seed.

    OpenCV's k-means (k-means++ seeding from OpenCV's per-thread RNG, seeded here):
    20x faster than scipy's ``kmeans2`` on 50 000 SIFT descriptors (0.6 s vs 12.6 s)."""
    import cv2

    names = hloc_io.unique_names(names)
    if not names:
        raise ValueError("build_vocabulary needs at least one image")
    rng = np.random.default_rng(seed)
    data = np.ascontiguousarray(_sample_descriptors(Path(feature_path), names, max_descriptors, rng), np.float32)
    if len(data) < n_words:
        raise ValueError(f"only {len(data)} descriptors for a {n_words}-word vocabulary")
    cv2.setRNGSeed(int(seed))
    criteria = (cv2.TERM_CRITERIA_MAX_ITER + cv2.TERM_CRITERIA_EPS, iterations, 1e-4)
    _, _, centres = cv2.kmeans(data, n_words, None, criteria, 1, cv2.KMEANS_PP_CENTERS)
    return centres.astype(np.float32)


def vlad(descriptors: np.ndarray, vocab: np.ndarray) -> np.ndarray:
    """VLAD of (N, D) descriptors with a (K, D) vocabulary: (K*D,) float32,
    intra-normalised, signed-sqrt, L2-normalised (zeros when N == 0)."""
    x = np.asarray(descriptors, dtype=np.float32)
    c = np.asarray(vocab, dtype=np.float32)
    k, d = c.shape
    if len(x) == 0:
        return np.zeros(k * d, np.float32)
    assign = np.argmax(x @ c.T - 0.5 * np.sum(c * c, axis=1)[None], axis=1)
    onehot = np.zeros((k, len(x)), np.float32)
    onehot[assign, np.arange(len(x))] = 1.0
    counts = onehot.sum(axis=1)
    v = onehot @ x - counts[:, None] * c
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    v = np.where(norms > 0, v / np.maximum(norms, 1e-12), 0.0)
    v = np.sign(v) * np.sqrt(np.abs(v))
    v = v.ravel()
    n = np.linalg.norm(v)
    return (v / n if n > 0 else v).astype(np.float32)


def load_vocabulary(out_path: Path) -> np.ndarray | None:
    """The vocabulary stored in a global-features file, or None."""
    out_path = Path(out_path)
    if not out_path.exists():
        return None
    with h5py.File(str(out_path), "r", libver="latest") as fd:
        v = fd.attrs.get(VOCAB_ATTR)
        return None if v is None else np.asarray(v, dtype=np.float32)


def ensure_vocabulary(feature_path: Path, names: Sequence[str], out_path: Path, n_words: int = 64,
                      seed: int = 0) -> np.ndarray:
    """The vocabulary of ``out_path`` if it has one, else a new one from ``names``."""
    v = load_vocabulary(out_path)
    if v is not None:
        return v
    return build_vocabulary(feature_path, names, n_words, seed)


def compute_global_descriptors(feature_path: Path, names: Sequence[str], vocab: np.ndarray, out_path: Path,
                               overwrite: bool = False, seed: int | None = None) -> Path:
    """VLAD global descriptors of ``names`` (local features from ``feature_path``) into
    ``out_path`` (hloc global-features layout), atomically; names already present are
    skipped (recomputed with ``overwrite``). The vocabulary is stored as the root
    attribute ``vlad_vocabulary``; a file holding descriptors of a different
    vocabulary raises ValueError unless ``overwrite``, which then starts a new
    file."""
    out_path = Path(out_path)
    vocab = np.asarray(vocab, dtype=np.float32)
    names = hloc_io.unique_names(names)
    stored = load_vocabulary(out_path)
    same = stored is not None and stored.shape == vocab.shape and np.array_equal(stored, vocab)
    if out_path.exists() and hloc_io.list_h5_names(out_path) and not same and not overwrite:
        raise ValueError(f"{out_path} holds descriptors of another (or no) vocabulary; pass overwrite=True")
    fresh = not same  # a new file: the old one (if any) had another vocabulary
    done = set() if overwrite else set(hloc_io.list_h5_names(out_path))
    todo = [n for n in names if n not in done]
    if not todo:
        return hloc_io.ensure_h5(out_path)
    results = {}
    for n, f in hloc_io.iter_features(feature_path, todo, keys=("descriptors", "image_size")):
        results[n] = (vlad(f["descriptors"].astype(np.float32).T, vocab), f.get("image_size"))
    base = None if fresh else out_path
    with atomic_h5(out_path, base=base) as out:
        if fresh:
            out.attrs[VOCAB_ATTR] = vocab
            out.attrs["vlad_n_words"] = int(vocab.shape[0])
            if seed is not None:
                out.attrs["vlad_seed"] = int(seed)
        for n, (g, size) in results.items():
            hloc_io.write_global(out, n, g, size)
    logger.info("retrieval: %d VLAD descriptor(s) into %s", len(todo), out_path)
    return out_path


def vlad_global_features(feature_path: Path, names: Sequence[str], out_path: Path,
                         db_names: Sequence[str] | None = None,
                         n_words: int = 64, seed: int = 0) -> Path:
    """Convenience: vocabulary from ``db_names`` (default ``names``) unless ``out_path``
    already stores one, then the descriptors of ``names``."""
    vocab = ensure_vocabulary(feature_path, list(db_names if db_names is not None else names), out_path, n_words, seed)
    return compute_global_descriptors(feature_path, names, vocab, out_path, seed=seed)
