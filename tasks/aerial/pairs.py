"""Image pairs to match, as hloc builds them (``pairs_from_poses``, ``pairs_from_retrieval``).

* :func:`pairs_from_poses` -- hloc's ``pairs_from_poses``: for each image the
  ``num`` nearest camera centres whose principal axes (camera z axis in the world)
  are within ``max_angle_deg`` (hloc: ``angle >= threshold`` is invalid). The
  original AerialMegaDepth pipeline used 50 within 75 deg between Earth Studio
  frames and 20 within 75 deg among MegaDepth photos.
* :func:`pairs_from_retrieval` -- hloc's ``pairs_from_retrieval``: cosine / dot
  similarities of global descriptors, the ``num`` best database images per query,
  excluding the query itself and scores below ``min_score`` (hloc passes 0).

Unlike hloc (which lists (i, j) and (j, i)), :func:`pairs_from_poses` returns
each unordered pair once, in first-seen order. Ties are broken by position
(stable sorts), so results are deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tasks.aerial import io as hloc_io


def dedupe_pairs(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop self pairs and repeated unordered pairs, keeping first occurrences."""
    seen: set[frozenset] = set()
    out = []
    for a, b in pairs:
        key = frozenset((a, b))
        if a == b or key in seen:
            continue
        seen.add(key)
        out.append((a, b))
    return out


def _top_k(scores: np.ndarray, invalid: np.ndarray, k: int) -> list[tuple[int, int]]:
    """hloc's ``pairs_from_score_matrix`` with stable tie-breaking: for each row the
    ``k`` best valid columns, best first."""
    scores = np.where(invalid, -np.inf, scores.astype(np.float64))
    k = min(k, scores.shape[1])
    out = []
    if k <= 0:
        return out
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    for i in range(scores.shape[0]):
        for j in order[i]:
            if np.isfinite(scores[i, j]):
                out.append((i, int(j)))
    return out


def pairs_from_poses_by_model(cam2world: Mapping[str, np.ndarray], model_of: Mapping[str, str], num: int,
                              max_angle_deg: float) -> list[tuple[str, str]]:
    """:func:`pairs_from_poses` within each model: ``model_of`` names the reconstruction each pose
    belongs to (a MegaDepth scene's subscenes are separate reconstructions, each in its own frame:
    the poses of two of them say nothing about each other). One model: the same pairs as
    :func:`pairs_from_poses`."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for n, pose in cam2world.items():
        groups.setdefault(str(model_of.get(n, "")), {})[n] = pose
    return dedupe_pairs([p for group in groups.values() for p in pairs_from_poses(group, num, max_angle_deg)])


def pairs_from_poses(cam2world: Mapping[str, np.ndarray], num: int, max_angle_deg: float,
                     queries: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """Spatially close pairs from camera-to-world poses (4x4, or 3x4).

    For each query (default: every image) the ``num`` nearest other cameras by
    centre distance among those whose principal axes differ by less than
    ``max_angle_deg``. Images are taken in ``cam2world``'s order. Returns unique
    unordered pairs (query first), deterministic.
    """
    names = list(cam2world)
    if not names:
        return []
    poses = np.stack([np.asarray(cam2world[n], dtype=np.float64)[:3, :4] for n in names])
    centres = poses[:, :3, 3]
    axes = poses[:, :3, 2]
    axes = axes / np.linalg.norm(axes, axis=1, keepdims=True)
    qnames = names if queries is None else list(queries)
    index = {n: i for i, n in enumerate(names)}
    missing = [q for q in qnames if q not in index]
    if missing:
        raise KeyError(f"queries without pose: {missing[:5]}")
    qi = np.array([index[q] for q in qnames], dtype=int)
    dist = np.linalg.norm(centres[qi][:, None] - centres[None], axis=-1)
    dots = np.clip(axes[qi] @ axes.T, -1.0, 1.0)
    angle = np.rad2deg(np.arccos(dots))
    invalid = angle >= max_angle_deg
    invalid[np.arange(len(qi)), qi] = True
    sel = _top_k(-dist, invalid, num)
    return dedupe_pairs([(names[qi[i]], names[j]) for i, j in sel])


def pairs_from_retrieval(global_path: Path, query_names: Sequence[str], db_names: Sequence[str], num: int,
                         min_score: float | None = 0.0, *,
                         db_global_path: Path | None = None) -> list[tuple[str, str]]:
    """For each query, the ``num`` database images with the highest global-descriptor
    similarity (dot product of the L2-normalised descriptors), self excluded,
    similarities below ``min_score`` dropped (hloc's default 0). Returns
    [(query, db)] grouped by query, best first."""
    if not query_names or not db_names:
        return []
    paths = [Path(global_path)] + ([Path(db_global_path)] if db_global_path is not None else [])
    q = hloc_io.read_global_descriptors(paths, query_names)
    d = hloc_io.read_global_descriptors(paths[::-1], db_names)
    sim = q @ d.T
    invalid = np.array(query_names)[:, None] == np.array(db_names)[None]
    if min_score is not None:
        invalid |= sim < min_score
    sel = _top_k(sim, invalid, num)
    return [(query_names[i], db_names[j]) for i, j in sel]
