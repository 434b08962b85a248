"""Camera helpers and source-view selection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import math

import numpy as np
import pycolmap

from tasks.aerial.geometry import angle_deg as _angle
from tasks.aerial.geometry import cam_from_world, project

# ----------------------------------------------------------------------------- geometry helpers


@dataclass
class _Cam:
    image_id: int
    name: str
    K: np.ndarray  # 3x3, full resolution, COLMAP pixel convention
    R: np.ndarray  # world -> camera
    t: np.ndarray
    width: int
    height: int

    @property
    def centre(self) -> np.ndarray:
        return -self.R.T @ self.t

    @property
    def axis(self) -> np.ndarray:
        return self.R[2]


def _posed_ids(rec: pycolmap.Reconstruction) -> list[int]:
    """Ids of the images with a pose (registered), sorted."""
    return sorted(i for i, im in rec.images.items() if im.has_pose)


def _cam(rec: pycolmap.Reconstruction, image_id: int) -> _Cam:
    im = rec.images[image_id]
    cam = rec.cameras[im.camera_id]
    m = cam_from_world(im)
    return _Cam(image_id, im.name, np.asarray(cam.calibration_matrix(), float), m[:, :3], m[:, 3],
                int(cam.width), int(cam.height))


def working_size(c: _Cam, max_size: int) -> tuple[int, int, float, float]:
    """(width, height, sx, sy) of camera ``c`` scaled so that its long side is at most ``max_size``
    (the size PatchMatch works at; :func:`_at_size` for the source selection)."""
    s = min(1.0, max_size / max(c.width, c.height))
    w, h = max(1, round(c.width * s)), max(1, round(c.height * s))
    return w, h, w / c.width, h / c.height


def _at_size(c: _Cam, max_size: int | None) -> _Cam:
    """``c`` as the dense method sees it: scaled so that its long side is at most ``max_size``
    (None: full resolution). Projections are the same points in smaller pixels; what changes is
    the focal length in those pixels, which the apparent scale ratio of two views compares: a
    method that shrinks every image to the same long side compares a 1600-pixel photo and a
    640-pixel frame at equal size, and the ratio must be measured there."""
    if max_size is None or max(c.width, c.height) <= max_size:
        return c
    w, h, sx, sy = working_size(c, max_size)
    return _Cam(c.image_id, c.name, np.diag([sx, sy, 1.0]) @ c.K, c.R, c.t, w, h)


def _project(c: _Cam, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pixels Nx2, depth N) of world points."""
    return project(c.K, c.R, c.t, xyz)


def _depth_prior(rec: pycolmap.Reconstruction, c: _Cam, min_points: int = 10) -> np.ndarray:
    """Depths (in camera ``c``) of the sparse points it sees (see :func:`_prior_points`)."""
    xyz = _prior_points(rec, c, min_points)
    if xyz is None or not len(xyz):
        return np.zeros(0)
    _, z = _project(c, xyz)
    return z[z > 0]


def _all_points(rec: pycolmap.Reconstruction) -> np.ndarray:
    """All 3D points of ``rec`` (Nx3)."""
    return np.array([p.xyz for p in rec.points3D.values()], float).reshape(-1, 3)


def select_sources(rec: pycolmap.Reconstruction, image_id: int, k: int, min_angle_deg: float = 3.0,
                   max_angle_deg: float = 40.0, max_view_angle_deg: float = 60.0, max_scale_ratio: float = 2.0,
                   exclude: Iterable[int] = (), min_overlap: float = 0.25, work_size: int | None = None) -> list[int]:
    """Up to ``k`` source image ids for reference ``image_id``, best first; deterministic.

    1. Images sharing 3D points with the reference (``rec.points3D`` tracks), kept when the median
       triangulation angle of the shared points (angle at the point between the two camera centres)
       lies in ``[min_angle_deg, max_angle_deg]`` and the principal axes differ by at most
       ``max_view_angle_deg``; ranked by the number of shared points (as COLMAP's ``__auto__``).
    2. When fewer than ``k`` are found (e.g. a model with poses only, or images without
       observations), the rest is filled from the other images by geometry. Scene points seen by
       the reference (the sparse points projecting into it; for a pose-only model a grid of its
       pixels at a typical depth) must fall inside the candidate for at least ``min_overlap`` of
       them, their median triangulation angle must lie in the same range, the axes within
       ``max_view_angle_deg`` and the median apparent scale ratio of the scene in the two views
       within ``max_scale_ratio``; ranked by distance between the camera centres.

    ``work_size``: the long side (pixels) to which the method shrinks every image; the scale ratio
    is measured at that size (:func:`_at_size`; None: at full resolution).
    """
    if k <= 0:
        return []
    ref = _at_size(_cam(rec, image_id), work_size)
    excluded = set(exclude) | {image_id}
    chosen: list[int] = []

    # --- 1. shared 3D points
    im = rec.images[image_id]
    shared: dict[int, list[float]] = {}
    centres: dict[int, np.ndarray] = {}
    for p2 in im.points2D:
        if not p2.has_point3D():
            continue
        pt = rec.points3D[p2.point3D_id]
        xyz = np.asarray(pt.xyz, float)
        ray_r = ref.centre - xyz
        for el in pt.track.elements:
            j = el.image_id
            if j in excluded:
                continue
            if j not in centres:
                centres[j] = np.asarray(rec.images[j].projection_center(), float)
            shared.setdefault(j, []).append(float(_angle(ray_r, centres[j] - xyz)))
    ranked = []
    for j, angles in shared.items():
        med = float(np.median(angles))
        if not (min_angle_deg <= med <= max_angle_deg):
            continue
        cj = _cam(rec, j)
        if _angle(ref.axis, cj.axis) > max_view_angle_deg:
            continue
        ranked.append((-len(angles), abs(med - 0.5 * (min_angle_deg + max_angle_deg)), j))
    chosen = [j for *_, j in sorted(ranked)][:k]
    if len(chosen) >= k:
        return chosen

    # --- 2. geometric fallback: co-visibility of scene points seen by the reference
    pts = _scene_points(rec, ref)
    if pts is None:
        return chosen
    f_ref = float(np.sqrt(ref.K[0, 0] * ref.K[1, 1]))
    d_ref = np.linalg.norm(pts - ref.centre, axis=1)
    cands = []
    for j in _posed_ids(rec):
        if j in excluded or j in chosen:
            continue
        cj = _at_size(_cam(rec, j), work_size)
        if _angle(ref.axis, cj.axis) > max_view_angle_deg:
            continue
        uv, z = _project(cj, pts)
        vis = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < cj.width) & (uv[:, 1] >= 0) & (uv[:, 1] < cj.height)
        if vis.mean() < min_overlap:
            continue
        tri = float(np.median(_angle(ref.centre - pts[vis], cj.centre - pts[vis])))
        if not (min_angle_deg <= tri <= max_angle_deg):
            continue
        f_j = float(np.sqrt(cj.K[0, 0] * cj.K[1, 1]))
        scale = float(np.median((f_j / np.linalg.norm(pts[vis] - cj.centre, axis=1)) / (f_ref / d_ref[vis])))
        if max(scale, 1.0 / scale) > max_scale_ratio:
            continue
        cands.append((float(np.linalg.norm(cj.centre - ref.centre)), j))
    chosen += [j for _, j in sorted(cands)][: k - len(chosen)]
    return chosen


def _front_points(c: _Cam, xyz: np.ndarray, cells: tuple[int, int], tolerance: float) -> np.ndarray:
    """Mask of the points ``xyz`` that camera ``c`` sees in front of it, inside its image and no
    farther than ``1 + tolerance`` times the nearest point of their cell of a ``cells`` grid over
    the image (a coarse z-buffer: the sparse points of a surface hidden behind another are left out)."""
    uv, z = _project(c, xyz)
    ok = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < c.width) & (uv[:, 1] >= 0) & (uv[:, 1] < c.height)
    gx, gy = cells
    cell = np.full(len(xyz), -1, np.int64)
    cell[ok] = (np.minimum((uv[ok, 1] * gy / c.height).astype(np.int64), gy - 1) * gx
                + np.minimum((uv[ok, 0] * gx / c.width).astype(np.int64), gx - 1))
    near = np.full(gx * gy, np.inf)
    np.minimum.at(near, cell[ok], z[ok])
    front = np.zeros(len(xyz), bool)
    front[ok] = z[ok] <= (1.0 + tolerance) * near[cell[ok]]
    return front


def select_sources_covering(rec: pycolmap.Reconstruction, image_id: int, k: int, min_angle_deg: float = 3.0,
                            max_angle_deg: float = 40.0, max_view_angle_deg: float = 60.0,
                            max_scale_ratio: float = 2.0, exclude: Iterable[int] = (), min_views: int = 2,
                            cells: tuple[int, int] = (16, 12), tolerance: float = 0.15,
                            work_size: int | None = None) -> list[int]:
    """Up to ``k`` source image ids for reference ``image_id`` chosen for coverage; deterministic.

    The reference's scene is sampled by the model's sparse points in front of it (every model
    point, not only its own observations: a reference that observes few points still gets the
    views that see its surface), thinned by a coarse z-buffer and weighted so that every cell of
    a ``cells`` grid over the image weighs the same. A candidate sees a point when the point lies in
    its image in front of its own z-buffer (or the point's track has the candidate), the
    triangulation angle at the point lies in ``[min_angle_deg, max_angle_deg]`` and the apparent
    scale ratio within ``max_scale_ratio``; candidates have their principal axis within
    ``max_view_angle_deg`` of the reference's. Sources are added greedily: the one that most
    raises the weight of the points seen by at least ``min_views`` chosen sources (the geometric
    filter's count), then by ``k``, ties broken by the shared points; none is added that adds
    nothing. Falls back to :func:`select_sources` when the model has too few points in view.
    ``work_size``: as in :func:`select_sources` (the scale ratio at the method's image size).
    """
    if k <= 0:
        return []
    ref = _at_size(_cam(rec, image_id), work_size)
    excluded = set(exclude) | {image_id}
    ids = list(rec.points3D.keys())
    xyz = np.array([rec.points3D[i].xyz for i in ids], float).reshape(-1, 3)
    front = _front_points(ref, xyz, cells, tolerance) if len(xyz) else np.zeros(0, bool)
    if front.sum() < 20:
        return select_sources(rec, image_id, k, min_angle_deg, max_angle_deg, max_view_angle_deg, max_scale_ratio,
                              exclude, work_size=work_size)
    pts = xyz[front]
    pid = [ids[i] for i in np.flatnonzero(front)]
    uv, _ = _project(ref, pts)
    gx, gy = cells
    cell = (np.minimum((uv[:, 1] * gy / ref.height).astype(np.int64), gy - 1) * gx
            + np.minimum((uv[:, 0] * gx / ref.width).astype(np.int64), gx - 1))
    weight = 1.0 / np.bincount(cell, minlength=gx * gy)[cell]
    # which of these points each image observes (the tracks), read once: index arrays per image, so
    # each candidate below costs numpy work on its own observations, not a Python pass over all points
    observed: dict[int, list[int]] = {}
    for n, i in enumerate(pid):
        for j in {el.image_id for el in rec.points3D[i].track.elements}:
            observed.setdefault(j, []).append(n)
    tracked = {j: np.asarray(v, np.int64) for j, v in observed.items()}
    f_ref = float(np.sqrt(ref.K[0, 0] * ref.K[1, 1]))
    d_ref = np.linalg.norm(pts - ref.centre, axis=1)
    lo, hi = math.cos(math.radians(min_angle_deg)), math.cos(math.radians(max_angle_deg))
    seen: dict[int, np.ndarray] = {}
    for j in _posed_ids(rec):
        if j in excluded:
            continue
        cj = _at_size(_cam(rec, j), work_size)
        if _angle(ref.axis, cj.axis) > max_view_angle_deg:
            continue
        vis = _front_points(cj, pts, cells, tolerance)
        vis[tracked.get(j, [])] = True
        a, b = ref.centre - pts, cj.centre - pts
        d_j = np.linalg.norm(b, axis=1)
        cosang = np.sum(a * b, 1) / np.maximum(d_ref * d_j, 1e-12)
        f_j = float(np.sqrt(cj.K[0, 0] * cj.K[1, 1]))
        scale = (f_j / np.maximum(d_j, 1e-12)) / (f_ref / np.maximum(d_ref, 1e-12))
        vis &= (cosang <= lo) & (cosang >= hi) & (np.maximum(scale, 1.0 / scale) <= max_scale_ratio)
        if vis.any():
            seen[j] = vis
    shared = {j: len(tracked.get(j, ())) for j in seen}
    chosen: list[int] = []
    count = np.zeros(len(pts), np.int64)

    def score(c: np.ndarray) -> tuple[float, float]:
        return float(weight @ np.minimum(c, min_views)), float(weight @ np.minimum(c, k))

    base = score(count)
    while len(chosen) < k and seen:
        best = max(sorted(seen), key=lambda j: (*score(count + seen[j]), shared[j]))
        new = score(count + seen[best])
        if new <= base:
            break
        chosen.append(best)
        count += seen.pop(best)
        base = new
    return chosen


def _scene_points(rec: pycolmap.Reconstruction, ref: _Cam, max_points: int = 300) -> np.ndarray | None:
    """Scene points seen by ``ref`` for source selection: the sparse points it sees (see
    :func:`_prior_points`), else a grid of its pixels at a typical depth (the median distance at
    which the other principal axes pass closest to its own, else 10 times the median distance to
    the other cameras)."""
    xyz = _prior_points(rec, ref)
    if xyz is not None and len(xyz):
        step = max(1, len(xyz) // max_points)
        return xyz[::step]
    others = [_cam(rec, j) for j in _posed_ids(rec) if j != ref.image_id]
    if not others:
        return None
    depths = []
    for c in others:
        d = c.centre - ref.centre
        a, b, cc = 1.0, ref.axis @ c.axis, 1.0
        den = a * cc - b * b
        if den < 1e-6:
            continue
        s_ = (cc * (d @ ref.axis) - b * (d @ c.axis)) / den
        u_ = (b * (d @ ref.axis) - a * (d @ c.axis)) / den
        if s_ > 0 and u_ > 0:
            depths.append(s_)
    if depths:
        depth = float(np.median(depths))
    else:
        depth = 10.0 * float(np.median([np.linalg.norm(c.centre - ref.centre) for c in others]))
    if depth <= 0:
        return None
    gu, gv = np.meshgrid(np.linspace(0.1, 0.9, 7) * ref.width, np.linspace(0.1, 0.9, 5) * ref.height)
    rays = np.stack([gu.ravel(), gv.ravel(), np.ones(gu.size)], 1) @ np.linalg.inv(ref.K).T
    return (rays * depth - ref.t) @ ref.R


def _prior_points(rec: pycolmap.Reconstruction, c: _Cam, min_points: int = 10) -> np.ndarray | None:
    """World points seen by ``c`` (its observations, else model points projecting into it)."""
    im = rec.images[c.image_id]
    ids = [p.point3D_id for p in im.points2D if p.has_point3D()]
    if len(ids) >= min_points:
        return np.array([rec.points3D[i].xyz for i in ids], float)
    if not rec.points3D:
        return None
    xyz = _all_points(rec)
    uv, z = _project(c, xyz)
    ok = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < c.width) & (uv[:, 1] >= 0) & (uv[:, 1] < c.height)
    return xyz[ok] if ok.sum() >= 5 else None


def _up_vector(rec: pycolmap.Reconstruction) -> np.ndarray:
    """World up direction: the mean of the cameras' up axes (-y; photos and video are taken
    upright), which for a metric ENU model is close to +z."""
    ups = [-_cam(rec, j).R[1] for j in _posed_ids(rec)]
    u = np.sum(ups, axis=0)
    n = float(np.linalg.norm(u))
    return u / n if n > 1e-9 else np.array([0.0, 0.0, 1.0])




def global_depth_range(rec: pycolmap.Reconstruction, cfg) -> tuple[float, float] | None:
    """Depth range for PatchMatch when some image has no observed sparse point (COLMAP would stop
    with "You must manually set the minimum and maximum depth"): the config's, else the range of
    every model point seen in front of any camera, padded."""
    if cfg.depth_min and cfg.depth_max:
        return float(cfg.depth_min), float(cfg.depth_max)
    lo, hi = math.inf, 0.0
    for iid in _posed_ids(rec):
        pr = _depth_prior(rec, _cam(rec, iid))
        if pr.size:
            a, b = np.percentile(pr, [1, 99])
            lo, hi = min(lo, a), max(hi, b)
    if hi <= 0:
        return None
    return float(lo / cfg.prior_near_pad), float(hi * (cfg.prior_far_pad or 10.0))
