"""Dense covisibility of the images of a scene product, pair by pair.

``cov[i, j]`` is the fraction of the pixels of image ``i`` with a depth whose 3D point,
reprojected into image ``j``, lands inside ``j`` in front of it and agrees with ``j``'s
depth there: ``|z_j - depth_j| <= rel_tolerance * depth_j`` (10 % by default, the
tolerance of SuperGlue's MegaDepth training). Pixels of ``i`` without depth are not
counted; a pixel landing where ``j`` has no depth does not agree. The matrix is not
symmetric (a close-up photo can lie entirely inside a wide aerial view, and not the
reverse); ``-1`` marks pairs that were not computed because an image has no depth.

Where depth maps have holes, that fraction is at most ``j``'s coverage. Alongside it,
``known[i, j]`` = (fraction of ``i``'s pixels landing inside ``j``) x (fraction of those
landing on a known depth of ``j`` that agree): the pixels landing on a hole of ``j``
(visibility unknown) are left out, an estimate of the covisibility the full surfaces
would give when holes are spread evenly. Both come from the same counts (per pair and
direction: pixels of ``i`` with depth, agreeing, landing on a hole, landing inside).

Cost grows with the number of *candidate* pairs, not with images squared:

1. each image with a depth map gives a sparse sample of its 3D points (a grid of
   ``prune_grid`` pixels) and their bounding box;
2. boxes (grown by the tolerance) are intersected by sort-and-sweep along one axis;
3. a pair survives when some sample point of either image projects inside the other
   image, in front of it, within its depth range (the frusta overlap where the surfaces
   are). A pair no sample point of either survives has overlap below ~1/grid size.

Candidates are cut into blocks (:func:`blocks`), each block computed by
:func:`compute_block` (a numba kernel, both directions of a pair at once) into its own
file, so blocks run over the Dask workers and a rerun computes only missing blocks.
Inputs: the product's ``sparse-txt`` (COLMAP text) and ``depths/<stem>.h5``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pycolmap

from tasks.aerial import geometry
from tasks.aerial.dense import depth_path, read_depth_h5
from tasks.aerial.evaluate import gt_depth_on_grid
from tasks.common.atomic import write_json_atomic, write_npz_atomic
from tasks.common.fingerprint import fingerprint
from tasks.common.forms import setting


@dataclass
class CovisibilityConfig:
    """Settings of the dense covisibility of the training exports."""

    # the form shows the rule itself: a pixel of i agrees with image j when its depth there
    # is within this fraction of j's depth (0.1: 10 %, SuperGlue's MegaDepth tolerance)
    rel_tolerance: float = setting(0.10, "|z_j - depth_j| <= tol * depth_j")
    stride: int = setting(1, "count every stride-th pixel of each image in each direction (1: every pixel; "
                             "2: a quarter of them, about 4 times faster)")
    prune_grid: tuple[int, int] = setting((48, 36), "sample points per image (columns, rows) of the quick test "
                                                    "that drops pairs whose views cannot overlap")
    block_pairs: int = setting(128, "image pairs computed per task (one Dask task each)")

    def fingerprint(self) -> str:
        return fingerprint(self, length=16)


@dataclass
class View:
    """One image of the product: pinhole K, world-to-camera pose, size, depth file."""

    name: str
    K: np.ndarray
    w2c: np.ndarray  # 4x4
    width: int
    height: int
    depth_file: Path | None = None

    @property
    def centre(self) -> np.ndarray:
        return geometry.invert_pose(self.w2c)[:3, 3]


def load_views(product: Path) -> list[View]:
    """The registered images of ``product`` (``sparse-txt`` + ``depths/``), sorted by
    image id (the order of ``images.txt``). ``depth_file`` is None for an image without a
    depth map or whose depth map has no known pixel."""
    product = Path(product)
    sparse = product / "sparse-txt"
    if not (sparse / "images.txt").exists():
        raise FileNotFoundError(f"{sparse}: no COLMAP model (images.txt); run the export stage first")
    rec = pycolmap.Reconstruction(str(sparse))
    views = []
    for image_id in sorted(rec.images):
        im = rec.images[image_id]
        if not im.has_pose:
            continue
        cam = rec.cameras[im.camera_id]
        w2c = geometry.w2c_matrix(im)
        d = depth_path(product / "depths", im.name)
        views.append(View(im.name, np.asarray(cam.calibration_matrix(), float), w2c, int(cam.width),
                          int(cam.height), d if d.exists() and (read_depth_h5(d) > 0).any() else None))
    return views


def product_fingerprint(product: Path) -> str:
    """Changes when the model (its text files, by content) or any depth map of the product changes."""
    product = Path(product)
    model = fingerprint(None, product / "sparse-txt", pattern="*.txt", content=True)
    return fingerprint(model, product / "depths", pattern="*.h5", length=16)


# ----------------------------------------------------------------------------- geometry


@numba.njit(cache=True, nogil=True)
def _count_agreeing(depth_i, K_i, depth_j, K_j, R, t, stride, tol):  # pragma: no cover - numba
    """(pixels of i with depth, pixels agreeing in j, pixels landing inside j where j has
    no depth, pixels landing inside j) for the relative pose (R, t) from camera i to j."""
    h_i, w_i = depth_i.shape
    h_j, w_j = depth_j.shape
    fx, fy, cx, cy = K_i[0, 0], K_i[1, 1], K_i[0, 2], K_i[1, 2]
    gx, gy, dx, dy = K_j[0, 0], K_j[1, 1], K_j[0, 2], K_j[1, 2]
    n_valid = 0
    n_ok = 0
    n_hole = 0
    n_in = 0
    for r in range(0, h_i, stride):
        for c in range(0, w_i, stride):
            z = depth_i[r, c]
            if z <= 0:
                continue
            n_valid += 1
            x = (c + 0.5 - cx) / fx * z
            y = (r + 0.5 - cy) / fy * z
            xj = R[0, 0] * x + R[0, 1] * y + R[0, 2] * z + t[0]
            yj = R[1, 0] * x + R[1, 1] * y + R[1, 2] * z + t[1]
            zj = R[2, 0] * x + R[2, 1] * y + R[2, 2] * z + t[2]
            if zj <= 0:
                continue
            u = gx * xj / zj + dx
            v = gy * yj / zj + dy
            if u < 0 or v < 0 or u >= w_j or v >= h_j:
                continue
            n_in += 1
            dj = depth_j[int(v), int(u)]
            if dj <= 0:
                n_hole += 1
            elif abs(zj - dj) <= tol * dj:
                n_ok += 1
    return n_valid, n_ok, n_hole, n_in


def relative_pose(a: View, b: View) -> tuple[np.ndarray, np.ndarray]:
    """Camera a -> camera b."""
    return geometry.relative_pose(a.w2c, b.w2c)


def pair_counts(a: View, da: np.ndarray, b: View, db: np.ndarray, rel_tolerance: float = 0.1,
                stride: int = 1) -> np.ndarray:
    """Counts of a pair, int64 2x4: rows a->b and b->a; columns pixels with depth,
    agreeing, landing on a hole, landing inside."""
    out = np.zeros((2, 4), np.int64)
    for k, (v1, d1, v2, d2) in enumerate(((a, da, b, db), (b, db, a, da))):
        R, t = relative_pose(v1, v2)
        out[k] = _count_agreeing(np.ascontiguousarray(d1, np.float32), np.ascontiguousarray(v1.K),
                                 np.ascontiguousarray(d2, np.float32), np.ascontiguousarray(v2.K), R, t,
                                 int(stride), float(rel_tolerance))
    return out


def fractions(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(covisibility, known) from counts (..., 4)."""
    n, ok, hole, inside = (np.asarray(counts, np.float64)[..., k] for k in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):
        cov = np.where(n > 0, ok / n, 0.0)
        known = np.where((n > 0) & (inside - hole > 0), ok / (inside - hole) * inside / n, 0.0)
    return cov, known


def pair_covisibility(a: View, da: np.ndarray, b: View, db: np.ndarray, rel_tolerance: float = 0.1,
                      stride: int = 1) -> tuple[float, float]:
    """(cov a->b, cov b->a) for two views and their depth maps."""
    cov, _ = fractions(pair_counts(a, da, b, db, rel_tolerance, stride))
    return float(cov[0]), float(cov[1])


def covisible_pixels(a: View, da: np.ndarray, b: View, db: np.ndarray, rel_tolerance: float = 0.1,
                     stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The pixels (row, col) of ``a`` covisible in ``b`` and where they land in ``b`` (u, v):
    the same test as the kernel, for drawing one pair."""
    pts, rc = geometry.backproject(da, a.K, a.w2c, stride)
    cam = pts @ b.w2c[:3, :3].T + b.w2c[:3, 3]
    z = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = b.K[0, 0] * cam[:, 0] / z + b.K[0, 2]
        v = b.K[1, 1] * cam[:, 1] / z + b.K[1, 2]
    ok = (z > 0) & (u >= 0) & (v >= 0) & (u < db.shape[1]) & (v < db.shape[0])
    idx = np.nonzero(ok)[0]
    dj = db[v[idx].astype(int), u[idx].astype(int)]
    agree = (dj > 0) & (np.abs(z[idx] - dj) <= rel_tolerance * dj)
    idx = idx[agree]
    return rc[idx], np.stack([u[idx], v[idx]], axis=1)


# ----------------------------------------------------------------------------- candidates


def _samples(view: View, depth: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    h, w = depth.shape
    gx, gy = grid
    cols = np.linspace(0, w - 1, gx).round().astype(int)
    rows = np.linspace(0, h - 1, gy).round().astype(int)
    sub = np.zeros_like(depth)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    sub[rr, cc] = depth[rr, cc]
    pts, _ = geometry.backproject(sub, view.K, view.w2c)
    if len(pts) < 8:  # sparse depth: take its valid pixels instead
        pts, _ = geometry.backproject(depth, view.K, view.w2c, stride=max(1, int(math.sqrt(depth.size / 4000))))
        if len(pts) > gx * gy:
            pts = pts[np.linspace(0, len(pts) - 1, gx * gy).astype(int)]
    return pts


def _sees(view: View, depth_range: tuple[float, float], pts: np.ndarray, tol: float) -> bool:
    cam = pts @ view.w2c[:3, :3].T + view.w2c[:3, 3]
    z = cam[:, 2]
    near, far = depth_range
    ok = (z > near * (1 - tol)) & (z < far * (1 + tol))
    if not ok.any():
        return False
    u = view.K[0, 0] * cam[ok, 0] / z[ok] + view.K[0, 2]
    v = view.K[1, 1] * cam[ok, 1] / z[ok] + view.K[1, 2]
    return bool(((u >= 0) & (v >= 0) & (u < view.width) & (v < view.height)).any())


def candidate_pairs(views: list[View], config: CovisibilityConfig) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """Pairs (i < j) of views with depth whose surfaces can be covisible (see the module
    docstring); and counts: views with depth, all pairs, box overlaps, candidates."""
    tol = config.rel_tolerance
    info: dict[int, tuple[np.ndarray, tuple[float, float], np.ndarray, np.ndarray]] = {}
    for k, v in enumerate(views):
        if v.depth_file is None:
            continue
        d = read_depth_h5(v.depth_file)
        valid = d[d > 0]
        if valid.size == 0:
            continue
        pts = _samples(v, d, config.prune_grid)
        if len(pts) == 0:
            continue
        allpts, _ = geometry.backproject(d, v.K, v.w2c, stride=max(1, int(math.sqrt(d.size / 20000))))
        allpts = np.vstack([allpts, pts])
        grow = 1.5 * tol * float(valid.max())  # 1.5: off-axis rays are longer than their z
        info[k] = (pts, (float(valid.min()), float(valid.max())), allpts.min(0) - grow, allpts.max(0) + grow)
    ids = sorted(info)
    lo = np.array([info[k][2] for k in ids]).reshape(-1, 3)
    hi = np.array([info[k][3] for k in ids]).reshape(-1, 3)
    order = np.argsort(lo[:, 0], kind="stable")
    boxes = 0
    pairs: list[tuple[int, int]] = []
    for a_pos, a in enumerate(order):  # sort and sweep along x
        for b in order[a_pos + 1:]:
            if lo[b, 0] > hi[a, 0]:
                break
            if np.any(lo[b, 1:] > hi[a, 1:]) or np.any(lo[a, 1:] > hi[b, 1:]):
                continue
            boxes += 1
            i, j = sorted((ids[a], ids[b]))
            pi, ri = info[i][0], info[i][1]
            pj, rj = info[j][0], info[j][1]
            if _sees(views[j], rj, pi, tol) or _sees(views[i], ri, pj, tol):
                pairs.append((i, j))
    pairs.sort()
    n = len(ids)
    return pairs, {"views with depth": n, "all pairs": n * (n - 1) // 2, "box overlaps": boxes,
                   "candidate pairs": len(pairs)}


def blocks(pairs: list[tuple[int, int]], block_pairs: int) -> list[list[tuple[int, int]]]:
    """Candidate pairs cut into blocks of at most ``block_pairs`` (in order, so that a
    block reuses the depth maps of the same first images)."""
    return [pairs[k:k + block_pairs] for k in range(0, len(pairs), max(1, block_pairs))]


# ----------------------------------------------------------------------------- blocks


def block_path(work: Path, index: int) -> Path:
    return Path(work) / f"block_{index:05d}.npz"


def compute_block(views: list[View], pairs: list[tuple[int, int]], config: CovisibilityConfig, out: Path,
                  key: str = "") -> Path:
    """Counts of ``pairs`` (both directions) into ``out`` (``pairs`` int32 Mx2, ``counts``
    int64 Mx2x4, see :func:`pair_counts`; ``key``: the inputs' fingerprint). Skipped when
    ``out`` exists with the same key."""
    out = Path(out)
    if block_done(out, key, len(pairs)):
        return out
    cache: dict[int, np.ndarray] = {}

    def depth(k: int) -> np.ndarray:
        if k not in cache:
            if len(cache) > 16:
                cache.pop(next(iter(cache)))
            cache[k] = read_depth_h5(views[k].depth_file)
        return cache[k]

    counts = np.zeros((len(pairs), 2, 4), np.int64)
    for m, (i, j) in enumerate(pairs):
        counts[m] = pair_counts(views[i], depth(i), views[j], depth(j), config.rel_tolerance, config.stride)
    write_npz_atomic(out, pairs=np.asarray(pairs, np.int32).reshape(-1, 2), counts=counts, key=np.str_(key))
    return out


def block_done(path: Path, key: str, n_pairs: int | None = None) -> bool:
    try:
        with np.load(path) as z:
            return str(z["key"]) == key and (n_pairs is None or len(z["pairs"]) == n_pairs)
    except Exception:  # noqa: BLE001 - missing or unreadable: recompute
        return False


def assemble(n_views: int, has_depth: np.ndarray, block_files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(covisibility, known) N x N float32 from the block files: ``-1`` where an image
    has no depth, 0 for pairs that were pruned, 1 on the diagonal of images with depth."""
    mats = []
    ok = np.nonzero(np.asarray(has_depth, bool))[0]
    for _ in range(2):
        mat = np.full((n_views, n_views), -1.0, np.float32)
        mat[np.ix_(ok, ok)] = 0.0
        mat[ok, ok] = 1.0
        mats.append(mat)
    for f in block_files:
        with np.load(f) as z:
            p, counts = z["pairs"], z["counts"]
        for mat, frac in zip(mats, fractions(counts)):
            mat[p[:, 0], p[:, 1]] = frac[:, 0]
            mat[p[:, 1], p[:, 0]] = frac[:, 1]
    return mats[0], mats[1]


@dataclass
class Plan:
    """What the covisibility of one scene needs: views, candidates, blocks, where blocks go."""

    product: Path
    work: Path
    key: str
    views: list[View]
    pairs: list[tuple[int, int]]
    blocks: list[list[tuple[int, int]]]
    counts: dict[str, int] = field(default_factory=dict)

    def block_files(self) -> list[Path]:
        return [block_path(self.work, k) for k in range(len(self.blocks))]

    def missing_blocks(self) -> list[int]:
        return [k for k, b in enumerate(self.blocks) if not block_done(block_path(self.work, k), self.key, len(b))]

    def block(self, index: int) -> Block:
        """What block ``index``'s task needs, and no more: a task handed the whole plan had it
        pickled and walked by Prefect for every block (at 1000 images, 377 000 pairs: the
        flow process at 100 % of a core and one worker busy at a time)."""
        return Block(self.views, np.asarray(self.blocks[index], np.int32).reshape(-1, 2),
                     block_path(self.work, index), self.key)


@dataclass
class Block:
    """One block of a :class:`Plan`: the scene's views, the block's pairs (M x 2), its file."""

    views: list[View]
    pairs: np.ndarray
    out: Path
    key: str


def plan(product: Path, work: Path, config: CovisibilityConfig) -> Plan:
    """Views and candidate pairs of ``product``; the pair list is cached in
    ``work/candidates.json`` keyed by the product and the settings (a rerun on an
    unchanged product does not prune again)."""
    work = Path(work)
    views = load_views(product)
    key = f"{product_fingerprint(product)}-{config.fingerprint()}"
    cached = work / "candidates.json"
    pairs = counts = None
    if cached.exists():
        try:
            c = json.loads(cached.read_text())
            if c.get("key") == key:
                pairs, counts = [tuple(p) for p in c["pairs"]], c["counts"]
        except (ValueError, KeyError):
            pass
    if pairs is None:
        pairs, counts = candidate_pairs(views, config)
        write_json_atomic(cached, {"key": key, "pairs": pairs, "counts": counts})
    return Plan(Path(product), work, key, views, pairs, blocks(pairs, config.block_pairs), dict(counts))


def run_block(p: Plan, index: int, config: CovisibilityConfig) -> Path:
    return run(p.block(index), config)


def run(block: Block, config: CovisibilityConfig) -> Path:
    """Compute one block (:meth:`Plan.block`) into its file."""
    return compute_block(block.views, [(int(i), int(j)) for i, j in block.pairs], config, block.out, block.key)


def matrices(p: Plan) -> tuple[np.ndarray, np.ndarray]:
    """(covisibility, known) of a planned scene whose blocks are all computed."""
    has = np.array([v.depth_file is not None for v in p.views])
    missing = p.missing_blocks()
    if missing:
        raise RuntimeError(f"{p.work}: covisibility blocks {missing[:10]} missing or stale; compute them first")
    return assemble(len(p.views), has, p.block_files())


def ground_truth_matrices(p: Plan, gt_dir: Path, config: CovisibilityConfig,
                          on_estimate_support: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(covisibility, known) of the planned pairs recomputed from a ground truth
    (``gt_dir/sparse`` COLMAP model with the same image names, ``gt_dir/depths/<stem>.h5``
    z-depth at the raw image geometry): true poses, true depth sampled on each product
    image's grid. ``on_estimate_support``: the true depth only where the product has a
    depth (isolates pose and depth errors from coverage)."""
    gt = pycolmap.Reconstruction(str(Path(gt_dir) / "sparse"))
    by = {im.name: im for im in gt.images.values()}
    views, depths = [], {}
    for k, v in enumerate(p.views):
        g = by.get(v.name)
        f = Path(gt_dir) / "depths" / f"{Path(v.name).stem}.h5"
        w2c = geometry.w2c_matrix(g) if g is not None else np.eye(4)
        views.append(View(v.name, v.K, w2c, v.width, v.height, v.depth_file))
        if g is None or not f.exists() or v.depth_file is None:
            continue
        est = read_depth_h5(v.depth_file)
        d = gt_depth_on_grid(read_depth_h5(f), np.asarray(gt.cameras[g.camera_id].calibration_matrix()), v.K,
                             est.shape)
        depths[k] = np.where(est > 0, d, 0).astype(np.float32) if on_estimate_support else d
    n = len(views)
    mats = [np.full((n, n), -1.0, np.float32) for _ in range(2)]
    for i, j in p.pairs:
        if i in depths and j in depths:
            c = pair_counts(views[i], depths[i], views[j], depths[j], config.rel_tolerance, config.stride)
            for mat, frac in zip(mats, fractions(c)):
                mat[i, j], mat[j, i] = frac
    return mats[0], mats[1]


def to_dict(p: Plan) -> dict[str, Any]:
    return {"product": str(p.product), "blocks": len(p.blocks), **p.counts}


__all__ = ["CovisibilityConfig", "View", "load_views", "product_fingerprint", "pair_covisibility",
           "covisible_pixels", "candidate_pairs", "blocks", "compute_block", "block_done", "assemble", "Plan", "plan",
           "run_block", "run", "Block", "matrices", "relative_pose", "pair_counts", "fractions", "ground_truth_matrices"]
