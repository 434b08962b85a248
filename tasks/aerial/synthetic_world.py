"""Deterministic synthetic aerial-ground place, written in the real input formats.

A seeded little city block (ground plane with streets and 6-10 textured box
buildings) anchored at a real latitude/longitude is rendered by exact,
vectorised numpy ray casting and written in the layout of :mod:`tasks.aerial.layout`
and the raw MegaDepth layout of :mod:`tasks.aerial.megadepth`:

1. an Earth Studio export: ``downloaded_data/<scene>.mp4`` and ``<scene>.json``;
2. a raw MegaDepth tree (COLMAP text model in a non-metric similarity frame,
   JPEG photos, HDF5 depths in the same frame's units);
3. ``megadepth/scene_list.json``;
4. ground truth apart: ``ground_truth/<scene>/sparse`` (COLMAP text, metric ENU of
   the first aerial frame) and ``ground_truth/<scene>/depths/<stem>.h5`` (metres).

Conventions: cameras follow COLMAP (x right, y down, z forward; pixel ``(i, j)``
has its centre at ``(i + 0.5, j + 0.5)``); depth is the distance along the camera
z axis, 0 where no surface.  Rendering happens in a "world" ENU frame anchored at
``(lat0, lon0, alt0)`` with the ground at ``z = 0``; the ground truth is expressed
in the ENU frame of the first aerial frame, related by the rigid map
``x_first = A @ x_world + b``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from pathlib import Path

import numpy as np

from tasks.aerial import esp as esp_format
from tasks.aerial import megadepth
from tasks.aerial import plan as planning
from tasks.aerial.dense.io import write_depth_h5
from tasks.aerial.earthstudio import export_document, frame_name
from tasks.aerial.geometry import (
    enu_to_ecef,
    enu_to_geodetic,
    focal_from_fov,
    look_at,
    r_ecef_to_enu,
)
from tasks.aerial.layout import SceneLayout, default_megadepth, default_scene_list
from tasks.aerial.plan import _ring_point as _plan_ring_point
from tasks.common.atomic import atomic_dir, atomic_path, write_json_atomic, write_text_atomic

os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")

FOV_VERTICAL_DEG = 50.0
FRAME_RATE = 10.0
CELL = 40.0  # city grid pitch (m); street centre lines at x, y = 20 + 40 k
STREET_HALF = 5.0
SIDEWALK_HALF = 7.0
MARKER = ".world_complete"
WORLD_VERSION = 3  # bump when the generator's output changes: ensure_world regenerates
INFO_NAME = "world_info.json"

# ----------------------------------------------------------------------------- data


@dataclass
class Box:
    """Axis-aligned building ``lo <= x <= hi`` (ENU metres, world frame)."""

    lo: np.ndarray
    hi: np.ndarray
    colour: np.ndarray  # base wall colour, RGB in [0, 1]
    roof: np.ndarray  # roof colour
    window_dx: float
    window_dz: float
    brick: float


@dataclass
class View:
    """A pinhole camera in the world frame (COLMAP axes)."""

    r_c2w: np.ndarray
    centre: np.ndarray
    f: float
    cx: float
    cy: float
    width: int
    height: int


@dataclass
class WorldInfo:
    """Where everything of a generated world lies, and how it was made."""

    root: Path
    scene: str
    seed: int
    origin: tuple[float, float, float]  # (lat0, lon0, alt0) of the rendering world frame
    first_frame_origin: tuple[float, float, float]  # (lat, lon, alt) of aerial frame 0 = GT frame origin
    width: int
    height: int
    n_frames: int
    n_photos: int
    video_path: Path
    json_path: Path
    megadepth_root: Path
    sfm_dir: Path  # megadepth/MegaDepth_v1_SfM/<scene>/sparse/manhattan/0
    images_dir: Path  # .../dense0/imgs
    depths_dir: Path  # .../dense0/depths
    scene_list_path: Path
    gt_sparse_dir: Path
    gt_depths_dir: Path
    photo_names: list[str]
    frame_names: list[str]
    sim_scale: float  # world_md = s * R @ x_gt + t  (x_gt: metric ENU of the first frame)
    sim_rotation: list[list[float]]
    sim_translation: list[float]
    render_seconds: float
    total_seconds: float
    params: dict = field(default_factory=dict)
    distractors: list[str] = field(default_factory=list)  # photos that must stay unregistered (realistic world)

    def to_json(self) -> dict:
        """JSON-serialisable dict (paths relative to ``root``)."""
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, Path):
                out[k] = str(v) if k == "root" else str(Path(v).relative_to(self.root))
        return out

    @classmethod
    def from_json(cls, d: dict, root: Path) -> WorldInfo:
        """Inverse of :meth:`to_json`, paths re-anchored at ``root``."""
        d = dict(d)
        d["root"] = Path(root)
        for k in ("video_path", "json_path", "megadepth_root", "sfm_dir", "images_dir", "depths_dir",
                  "scene_list_path", "gt_sparse_dir", "gt_depths_dir"):
            d[k] = Path(root) / d[k]
        d["origin"] = tuple(d["origin"])
        d["first_frame_origin"] = tuple(d["first_frame_origin"])
        return cls(**d)

    def sim_transform(self, x_gt: np.ndarray) -> np.ndarray:
        """Map metric GT points (N, 3) into the MegaDepth similarity frame."""
        r = np.asarray(self.sim_rotation)
        return self.sim_scale * np.asarray(x_gt) @ r.T + np.asarray(self.sim_translation)


# ----------------------------------------------------------------------------- noise


def _hash(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Integer lattice hash to [0, 1)."""
    h = (ix.astype(np.int64) * 374761393 + iy.astype(np.int64) * 668265263 + seed * 2246822519) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 1274126177) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return (h & 0xFFFFFF).astype(np.float64) / float(0x1000000)


def _vnoise(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Smooth value noise in [0, 1) with unit lattice."""
    xf, yf = np.floor(x), np.floor(y)
    fx, fy = x - xf, y - yf
    fx = fx * fx * (3 - 2 * fx)
    fy = fy * fy * (3 - 2 * fy)
    ix, iy = xf.astype(np.int64), yf.astype(np.int64)
    a = _hash(ix, iy, seed)
    b = _hash(ix + 1, iy, seed)
    c = _hash(ix, iy + 1, seed)
    d = _hash(ix + 1, iy + 1, seed)
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _fade(period: float, footprint: np.ndarray) -> np.ndarray:
    """Weight of a pattern of spatial period ``period`` (m) given the pixel footprint (m):
    1 when well resolved, fading to 0 when it would alias."""
    return np.clip(period / (3.0 * footprint) - 0.5, 0.0, 1.0)


def _fbm(u: np.ndarray, v: np.ndarray, seed: int, foot: np.ndarray, scales=(16.0, 6.0, 2.0, 0.7)) -> np.ndarray:
    """Band-limited fractal noise in about [-0.5, 0.5]."""
    out = np.zeros_like(u)
    amp = 0.5
    for i, s in enumerate(scales):
        out += amp * _fade(s, foot) * (_vnoise(u / s, v / s, seed + 17 * i) - 0.5)
        amp *= 0.7
    return out


# ----------------------------------------------------------------------------- scene


def _make_city(rng: np.random.Generator) -> list[Box]:
    """6-10 buildings in 40 m city blocks centred at (40 i, 40 j); streets run between blocks."""
    cells = [(i, j) for i in range(-1, 2) for j in range(-1, 2)]
    cells += [(-2, 0), (2, 0), (0, -2), (0, 2), (2, 2), (-2, -2)]
    n = int(rng.integers(6, 11))
    chosen = rng.choice(len(cells), size=n, replace=False)
    boxes = []
    for k in chosen:
        ci, cj = cells[k]
        cx, cy = ci * CELL, cj * CELL
        half = CELL / 2 - SIDEWALK_HALF - 0.5  # max half extent inside the block
        hx = rng.uniform(0.55, 1.0) * half
        hy = rng.uniform(0.55, 1.0) * half
        ox = rng.uniform(-(half - hx), half - hx)
        oy = rng.uniform(-(half - hy), half - hy)
        h = rng.uniform(8.0, 40.0)
        hue = rng.uniform(0, 1)
        base = np.array([0.55 + 0.35 * math.cos(2 * math.pi * hue), 0.55 + 0.35 * math.cos(2 * math.pi * (hue - 1 / 3)),
                         0.55 + 0.35 * math.cos(2 * math.pi * (hue - 2 / 3))])
        roof = rng.uniform(0.25, 0.6, 3)
        boxes.append(Box(lo=np.array([cx + ox - hx, cy + oy - hy, 0.0]), hi=np.array([cx + ox + hx, cy + oy + hy, h]),
                         colour=base, roof=roof, window_dx=float(rng.uniform(2.2, 3.5)),
                         window_dz=float(rng.uniform(3.0, 3.8)), brick=float(rng.uniform(0.25, 0.4))))
    return boxes


def _inside_any(p: np.ndarray, boxes: list[Box], margin: float = 0.5) -> bool:
    return any(np.all(p > b.lo - margin) and np.all(p < b.hi + margin) for b in boxes)


# ----------------------------------------------------------------------------- ray casting


def _rays(view: View) -> np.ndarray:
    """World ray directions (H*W, 3) scaled so that the camera-z component is 1."""
    u = (np.arange(view.width) + 0.5 - view.cx) / view.f
    v = (np.arange(view.height) + 0.5 - view.cy) / view.f
    uu, vv = np.meshgrid(u, v)
    d_cam = np.stack([uu.ravel(), vv.ravel(), np.ones(uu.size)], axis=1)
    return d_cam @ view.r_c2w.T


def cast(view: View, boxes: list[Box]) -> tuple[np.ndarray, np.ndarray]:
    """Ray cast every pixel: returns (depth (H*W,), face id (H*W,)).

    Face ids: -2 sky, -1 ground, ``6 * box + k`` with k in (-x, +x, -y, +y, -z, +z).
    Depth is the ray parameter of the camera-z-normalised direction, i.e. the
    distance along the camera z axis."""
    return cast_rays(view.centre, _rays(view), view.r_c2w[:, 2], boxes)


def inverse_directions(d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``1 / d`` per axis as three contiguous columns (components below 1e-12 taken as 1e-12)."""
    dd = np.where(np.abs(d) < 1e-12, 1e-12, d)
    return tuple(np.ascontiguousarray(1.0 / dd[:, k]) for k in range(3))


def slab(o: np.ndarray, inv: tuple, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Ray / axis-aligned box slab test, column by column (a reduction over a 3-wide axis is
    several times slower): ``(t_near, t_far, (t_min per axis))`` for rays from ``o`` (one
    point, or (N, 3) points) with inverse directions ``inv`` (:func:`inverse_directions`)."""
    o = np.asarray(o, float)
    tmin, tmax = [], []
    for k in range(3):
        ok_ = o[..., k]
        t1 = (lo[k] - ok_) * inv[k]
        t2 = (hi[k] - ok_) * inv[k]
        tmin.append(np.minimum(t1, t2))
        tmax.append(np.maximum(t1, t2))
    return (np.maximum(np.maximum(tmin[0], tmin[1]), tmin[2]), np.minimum(np.minimum(tmax[0], tmax[1]), tmax[2]),
            tuple(tmin))


def entry_axis(tmin: tuple, tnear: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """Axis (0, 1, 2) of the face a ray enters a box through (the first axis whose t_min is
    t_near, as ``argmax`` picks), for the rays ``sel``."""
    tn = tnear[sel]
    return np.where(tmin[0][sel] == tn, 0, np.where(tmin[1][sel] == tn, 1, 2))


def cast_rays(o: np.ndarray, d: np.ndarray, axis_z: np.ndarray, boxes: list[Box]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`cast` for rays ``o + t d`` (``d``: (N, 3), scaled so that their component along the
    camera axis ``axis_z`` is 1; ``t`` is then the depth along that axis)."""
    n = d.shape[0]
    t_best = np.full(n, np.inf)
    fid = np.full(n, -2, dtype=np.int64)
    if o[2] > 0:
        with np.errstate(divide="ignore", invalid="ignore"):
            tg = -o[2] / d[:, 2]
        ok = (d[:, 2] < 0) & (tg > 0)
        t_best[ok] = tg[ok]
        fid[ok] = -1
    inv = inverse_directions(d)
    for bi, b in enumerate(boxes):
        # cheap culling: all corners behind the camera
        corners = np.array([[x, y, z] for x in (b.lo[0], b.hi[0]) for y in (b.lo[1], b.hi[1]) for z in (b.lo[2], b.hi[2])])
        zc = (corners - o) @ axis_z
        if np.all(zc <= 0):
            continue
        tnear, tfar, tmin = slab(o, inv, b.lo, b.hi)
        hit = (tnear <= tfar) & (tnear > 1e-9) & (tnear < t_best)
        if not hit.any():
            continue
        axis = entry_axis(tmin, tnear, hit)
        positive = np.choose(axis, [d[hit, 0], d[hit, 1], d[hit, 2]]) < 0  # ray going -axis enters through the +axis face
        t_best[hit] = tnear[hit]
        fid[hit] = 6 * bi + 2 * axis + positive.astype(np.int64)
    depth = np.where(fid == -2, 0.0, t_best)
    return depth, fid


def _shade(view: View, boxes: list[Box], depth: np.ndarray, fid: np.ndarray, sun: np.ndarray,
           seed: int, sky_tint: np.ndarray) -> np.ndarray:
    """Procedural colour (H*W, 3) in [0, 1] of the cast rays."""
    d = _rays(view)
    n = d.shape[0]
    col = np.zeros((n, 3))
    foot = np.maximum(depth * np.linalg.norm(d, axis=1) / view.f, 1e-3)  # metres per pixel
    # sky
    sky = fid == -2
    if sky.any():
        el = d[sky, 2] / np.linalg.norm(d[sky], axis=1)
        t = np.clip(el, 0, 1)[:, None]
        col[sky] = (1 - t) * np.array([0.85, 0.9, 0.95]) + t * np.array([0.35, 0.55, 0.9])
        col[sky] *= sky_tint
    p = view.centre + d * depth[:, None]
    # ground
    g = fid == -1
    if g.any():
        col[g] = _ground_colour(p[g, 0], p[g, 1], foot[g], seed) * (0.55 + 0.45 * max(sun[2], 0.0))
    # buildings
    for bi, b in enumerate(boxes):
        for k in range(6):
            m = fid == 6 * bi + k
            if not m.any():
                continue
            axis, positive = divmod(k, 2)
            normal = np.zeros(3)
            normal[axis] = 1.0 if positive else -1.0
            q = p[m]
            if axis == 2:
                c = _roof_colour(q[:, 0], q[:, 1], foot[m], b, seed + 1000 * bi)
            else:
                u = q[:, 1 - axis] * (1 if positive else -1) + 1000.0 * k
                c = _wall_colour(u, q[:, 2], foot[m], b, seed + 1000 * bi + 7 * k, b.hi[2])
            col[m] = c * (0.45 + 0.55 * max(float(normal @ sun), 0.0))
    return np.clip(col, 0, 1)


def _ground_colour(x: np.ndarray, y: np.ndarray, foot: np.ndarray, seed: int) -> np.ndarray:
    dx = np.abs(np.mod(x, CELL) - CELL / 2)  # distance to the nearest street centre line
    dy = np.abs(np.mod(y, CELL) - CELL / 2)
    dist = np.minimum(dx, dy)
    noise = _fbm(x, y, seed + 1, foot)
    out = np.empty((x.size, 3))
    city = (np.abs(x) < 100) & (np.abs(y) < 100)
    # fields outside the city: large coloured patches
    pf = _vnoise(x / 35.0, y / 35.0, seed + 2)
    field_col = np.stack([0.35 + 0.3 * pf, 0.45 + 0.25 * _vnoise(x / 23.0, y / 23.0, seed + 3), 0.2 + 0.15 * pf], 1)
    out[:] = field_col + 0.25 * noise[:, None]
    street = city & (dist < STREET_HALF)
    out[street] = (0.33 + 0.3 * noise[street])[:, None] * np.array([1.0, 1.0, 1.05])
    # lane markings (dashed) and crosswalks
    along = np.where(dx < dy, y, x)
    lane = street & (dist < 0.15 + 0.3 * (1 - _fade(1.0, foot))) & (np.mod(along, 6.0) < 3.0) & (np.maximum(dx, dy) > SIDEWALK_HALF)
    out[lane] = np.array([0.95, 0.92, 0.7])
    inter = street & (np.maximum(dx, dy) < SIDEWALK_HALF + 3.0) & (np.maximum(dx, dy) > SIDEWALK_HALF)
    stripes = inter & (np.mod(np.where(dx < dy, x, y), 1.2) < 0.6)
    out[stripes] = 0.9
    walk = city & (dist >= STREET_HALF) & (dist < SIDEWALK_HALF)
    tiles = np.mod(np.floor(x / 0.8) + np.floor(y / 0.8), 2) * 0.08 * _fade(1.6, foot)
    out[walk] = (0.62 + tiles[walk] + 0.25 * noise[walk])[:, None] * np.array([1.0, 0.95, 0.88])
    block = city & (dist >= SIDEWALK_HALF)
    grass = _vnoise(x / 9.0, y / 9.0, seed + 4)
    out[block] = np.stack([0.25 + 0.2 * grass, 0.5 + 0.2 * grass, 0.2 + 0.1 * grass], 1)[block] + 0.3 * noise[block, None]
    # scattered coloured markers (cars / kiosks) for distinctiveness
    cell = _hash(np.floor(x / 3.0).astype(np.int64), np.floor(y / 3.0).astype(np.int64), seed + 5)
    spot = city & (cell > 0.93)
    hue = _hash(np.floor(x / 3.0).astype(np.int64), np.floor(y / 3.0).astype(np.int64), seed + 6)
    out[spot] = np.stack([hue, 1 - hue, 0.5 + 0.5 * np.sin(6 * hue)], 1)[spot] * 0.9
    return out


def _wall_colour(u: np.ndarray, z: np.ndarray, foot: np.ndarray, b: Box, seed: int, height: float) -> np.ndarray:
    noise = _fbm(u, z, seed, foot)
    tint = 0.85 + 0.3 * _vnoise(u / 11.0, z / 11.0, seed + 3)
    # bricks
    row = np.floor(z / b.brick)
    bu = u / (2 * b.brick) + 0.5 * np.mod(row, 2)
    mortar = (np.mod(z, b.brick) < 0.05) | (np.mod(bu, 1.0) < 0.05 / (2 * b.brick))
    brick_var = _hash(np.floor(bu).astype(np.int64), row.astype(np.int64), seed + 9) - 0.5
    wb = _fade(b.brick, foot)
    shade = 1.0 + wb * (0.25 * brick_var - 0.3 * mortar)
    out = (b.colour * tint[:, None] + 0.3 * noise[:, None]) * shade[:, None]
    # windows
    wu = np.mod(u, b.window_dx) / b.window_dx
    wz = np.mod(z, b.window_dz) / b.window_dz
    floor_ix = np.floor(z / b.window_dz)
    win = (wu > 0.25) & (wu < 0.75) & (wz > 0.3) & (wz < 0.8) & (floor_ix >= 1) & (z < height - 1.0)
    lit = _hash(np.floor(u / b.window_dx).astype(np.int64), floor_ix.astype(np.int64), seed + 11)
    wcol = np.stack([0.1 + 0.6 * lit * (lit > 0.7), 0.15 + 0.5 * lit * (lit > 0.7), 0.25 + 0.2 * lit], 1)
    frame = (wu > 0.2) & (wu < 0.8) & (wz > 0.25) & (wz < 0.85) & ~win & (floor_ix >= 1) & (z < height - 1.0)
    out[frame] = 0.9
    out[win] = wcol[win]
    # ground-floor shop front / door + big poster per face section
    door = (z < 2.6) & (np.mod(u, 9.0) < 2.0)
    out[door] = np.array([0.35, 0.2, 0.1]) + 0.2 * noise[door, None]
    sec = np.floor(u / 13.0).astype(np.int64)
    poster_h = _hash(sec, np.full_like(sec, 3), seed + 13)
    poster = (np.mod(u, 13.0) > 4.0) & (np.mod(u, 13.0) < 8.5) & (z > 2.8) & (z < 3.0 + 3.0 * poster_h) & (poster_h > 0.4)
    pc = np.stack([poster_h, _hash(sec, np.full_like(sec, 5), seed), 1 - poster_h], 1)
    stripes = 0.7 + 0.3 * np.sin(u * 3.0 + z * 2.0)
    out[poster] = (pc * stripes[:, None])[poster]
    return out


def _roof_colour(x: np.ndarray, y: np.ndarray, foot: np.ndarray, b: Box, seed: int) -> np.ndarray:
    noise = _fbm(x, y, seed + 21, foot)
    out = b.roof[None, :] + 0.35 * noise[:, None]
    # roof units (AC boxes) as darker/lighter squares
    ix, iy = np.floor(x / 4.0).astype(np.int64), np.floor(y / 4.0).astype(np.int64)
    h = _hash(ix, iy, seed + 23)
    unit = (h > 0.75) & (np.mod(x, 4.0) > 1.0) & (np.mod(y, 4.0) > 1.0)
    out[unit] = 0.85 - 0.5 * h[unit, None]
    edge = (np.minimum(x - b.lo[0], b.hi[0] - x) < 0.6) | (np.minimum(y - b.lo[1], b.hi[1] - y) < 0.6)
    out[edge] = 0.8
    return out


def render(view: View, boxes: list[Box], sun: np.ndarray, seed: int, sky_tint=(1.0, 1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Render ``view``: (RGB float image (H, W, 3) in [0, 1], depth (H, W) in metres)."""
    depth, fid = cast(view, boxes)
    col = _shade(view, boxes, depth, fid, np.asarray(sun, float), seed, np.asarray(sky_tint, float))
    return col.reshape(view.height, view.width, 3), depth.reshape(view.height, view.width)


def render_stream(fn, items, workers: int | None = None, on_each=None):
    """``fn(item)`` for each of ``items``, yielded in order as they finish, on up to 2 threads (numpy
    and OpenCV release the GIL), with at most two renders per thread in flight or waiting: the
    caller writes each one out and drops it, so memory holds a few views, not the world.
    ``on_each()`` is called in the calling thread before each result is yielded (progress)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    workers = workers or max(1, min(2, os.cpu_count() or 1))
    items = list(items)
    if workers == 1 or len(items) < 2:
        for item in items:
            r = fn(item)
            if on_each is not None:
                on_each()
            yield r
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                break
        while pending:
            r = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            if on_each is not None:
                on_each()
            yield r


# ----------------------------------------------------------------------------- poses


RING = CELL / 2  # the ground photos use the streets around the central block (the plan's street loop)
PLACE_RADIUS = 100.0  # radius of interest of the city (m): the plan's distances are multiples of it


def _ring_point(u: float) -> tuple[np.ndarray, np.ndarray]:
    """Point and unit travel direction on the square street loop x, y = +-RING, u in [0, 1)."""
    return _plan_ring_point(u, RING)


def world_plan(scene: str, lat0: float, lon0: float, alt0: float, n_aerial: int, size: tuple[int, int],
               phases, trajectory: str = "spiral+streets", **options):
    """The plan the world's aerial frames are rendered from: the place is the city centre on the
    ground with radius :data:`PLACE_RADIUS`, the trajectory a named configuration whose
    look-at phases come from the world's seed."""
    from tasks.aerial import plan as planning

    t = planning.get_trajectory(trajectory, **{"frames": n_aerial, "fov": FOV_VERTICAL_DEG, "frame_rate": FRAME_RATE,
                                               "width": int(size[0]), "height": int(size[1]),
                                               "phases": [float(x) for x in phases], **options})
    return planning.make_plan(planning.Place(scene, lat0, lon0, alt0, PLACE_RADIUS), t)


def _rigid_world_to_first(lat0: float, lon0: float, alt0: float, first_enu_world: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(A, b, first geodetic) with ``x_first = A @ x_world + b``."""
    lat_f, lon_f, alt_f = (float(v) for v in enu_to_geodetic(first_enu_world, lat0, lon0, alt0))
    r0 = r_ecef_to_enu(lat0, lon0)
    rf = r_ecef_to_enu(lat_f, lon_f)
    a = rf @ r0.T
    e0 = enu_to_ecef(np.zeros(3), lat0, lon0, alt0)
    ef = enu_to_ecef(np.asarray(first_enu_world, float), lat0, lon0, alt0)
    b = rf @ (e0 - ef)
    return a, b, (lat_f, lon_f, alt_f)


@dataclass
class AerialPlan:
    """The aerial frames of a synthetic world: their Earth Studio plan (written as the ``.esp`` and
    the plan file), focal length in pixels, poses in the world (plan) frame, and the rigid map
    from that frame to the first frame's (``a_wf @ x + b_wf``) with the first frame's geodetic
    position."""

    plan: Any
    focal: float
    positions: list[np.ndarray]
    rotations: list[np.ndarray]
    a_wf: np.ndarray
    b_wf: np.ndarray
    first_geo: tuple


def write_aerial_plan(root: Path, scene: str, lat0: float, lon0: float, alt0: float, n_aerial: int,
                      size: tuple[int, int], rng: np.random.Generator, trajectory_options: dict | None) -> AerialPlan:
    """Plan the aerial frames of a synthetic world (the trajectory's phases drawn from ``rng``),
    write the plan as Earth Studio's ``.esp`` and the plan file, and return it with its poses
    (one owner for both worlds)."""
    offs = rng.uniform(0, 2 * math.pi, 3)
    plan = world_plan(scene, lat0, lon0, alt0, n_aerial, size, offs, **(trajectory_options or {}))
    plan_path, esp_path = planning.plan_paths(root, scene)
    esp_format.write_esp(plan, esp_path)
    planning.write_plan(plan, plan_path)
    positions = [c.position_enu for c in plan.cameras]
    rotations = [c.cam2world_enu for c in plan.cameras]
    a_wf, b_wf, first_geo = _rigid_world_to_first(lat0, lon0, alt0, positions[0])
    return AerialPlan(plan, focal_from_fov(size[1], plan.trajectory.fov), positions, rotations, a_wf, b_wf, first_geo)


def write_aerial_footage(video_path: Path, depth_paths: list[Path], renders, aerial: AerialPlan,
                         frame_names: list[str], first_image_id: int,
                         size: tuple[int, int]) -> tuple[list[tuple], list[tuple]]:
    """Write the Earth Studio footage (mp4, atomically) and each frame's true depth from the
    streamed ``renders`` ((rgb, depth) per frame, written and dropped one by one); return the
    ground-truth cameras and images of the frames (ids from ``first_image_id``, first-frame
    coordinates) for the ground-truth model."""
    import cv2  # imported where used, as generate_world (see the PNG note in synthetic_realistic)

    width, height = size
    gt_cams: list[tuple] = []
    gt_images: list[tuple] = []
    with atomic_path(video_path) as tmp_video:
        writer = cv2.VideoWriter(str(tmp_video), cv2.VideoWriter_fourcc(*"mp4v"), FRAME_RATE, (width, height))
        if not writer.isOpened():
            raise RuntimeError("cv2.VideoWriter could not open an mp4v writer")
        for k, (rgb, depth) in enumerate(renders):
            writer.write(_to_u8_bgr(rgb))
            write_depth_h5(depth_paths[k], depth)
            r_first = aerial.a_wf @ aerial.rotations[k]
            c_first = aerial.a_wf @ aerial.positions[k] + aerial.b_wf
            iid = first_image_id + k
            gt_cams.append((iid, "SIMPLE_PINHOLE", width, height, [aerial.focal, width / 2.0, height / 2.0]))
            gt_images.append((iid, frame_names[k], r_first.T, -r_first.T @ c_first, []))
        writer.release()
    return gt_cams, gt_images


def megadepth_frame(root: Path, scene: str, rng: np.random.Generator) -> tuple:
    """The raw MegaDepth side of a synthetic world: a random similarity (scale, rotation,
    translation) from the world frame to the MegaDepth model's arbitrary frame, as a real
    MegaDepth reconstruction has, and the model's folders (created): ``(scale, rotation,
    translation, megadepth root, sparse model dir, dense images dir, dense depths dir)``."""
    sim_s = float(rng.uniform(0.05, 0.5))
    sim_r = _random_rotation(rng)
    sim_t = rng.uniform(-50, 50, 3)
    md_root = default_megadepth(root)
    sfm_dir = megadepth.sparse_model_dir(md_root, scene, "0")
    dense = megadepth.dense_dir(md_root, scene, "0")
    img_dir, md_depth_dir = dense / "imgs", dense / "depths"
    img_dir.mkdir(parents=True, exist_ok=True)
    md_depth_dir.mkdir(parents=True, exist_ok=True)
    return sim_s, sim_r, sim_t, md_root, sfm_dir, img_dir, md_depth_dir


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def _tracks(views: list[View], depth_paths: list[Path], points: list[np.ndarray],
            ) -> tuple[list[list[tuple[float, float, int]]], list[list[tuple[int, int]]]]:
    """Where each world point is seen: per view its observations ``[(x, y, 0)]`` and per point its
    track ``[(image id = view index + 1, observation index)]``, both in view then point order. A
    point is seen where it projects into the view and its depth there (read from ``depth_paths``,
    one view at a time) is the point's within 1 % + 5 cm."""
    from tasks.aerial.dense.io import read_depth_h5

    pts2d: list[list[tuple[float, float, int]]] = [[] for _ in views]
    tracks: list[list[tuple[int, int]]] = [[] for _ in points]
    for i2, (v2, path) in enumerate(zip(views, depth_paths)):
        d2 = read_depth_h5(path)
        for k, x_w in enumerate(points):
            xc = v2.r_c2w.T @ (x_w - v2.centre)
            if xc[2] <= 0.1:
                continue
            u2 = v2.f * xc[0] / xc[2] + v2.cx
            y2 = v2.f * xc[1] / xc[2] + v2.cy
            if not (0 <= u2 < v2.width and 0 <= y2 < v2.height):
                continue
            if abs(d2[int(y2), int(u2)] - xc[2]) > 0.01 * xc[2] + 0.05:
                continue
            tracks[k].append((i2 + 1, len(pts2d[i2])))
            pts2d[i2].append((float(u2), float(y2), 0))
    return pts2d, tracks


# ----------------------------------------------------------------------------- writers


def _to_u8_bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray((np.clip(rgb, 0, 1) * 255.0 + 0.5).astype(np.uint8)[:, :, ::-1])


def _write_model(out_dir: Path, cams: list[tuple[int, str, int, int, list[float]]],
                 images: list[tuple[int, str, np.ndarray, np.ndarray, list[tuple[float, float, int]]]],
                 points: list[tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]]) -> None:
    """COLMAP text model via pycolmap. images: (id, name, R_w2c, t_w2c, points2D [(x, y, _)]);
    points: (xyz, rgb uint8, track [(image_id, point2D_idx)])."""
    import pycolmap

    rec = pycolmap.Reconstruction()
    for cid, model, w, h, params in cams:
        rec.add_camera_with_trivial_rig(pycolmap.Camera(model=model, width=w, height=h, params=params, camera_id=cid))
    for iid, name, r, t, pts in images:
        im = pycolmap.Image(name=name, camera_id=iid, image_id=iid,
                            points2D=[pycolmap.Point2D(np.array([x, y], float)) for x, y, _ in pts])
        rec.add_image_with_trivial_frame(im, pycolmap.Rigid3d(pycolmap.Rotation3d(r), np.asarray(t, float)))
    for xyz, rgb, track in points:
        tr = pycolmap.Track()
        for iid, idx in track:
            tr.add_element(iid, idx)
        rec.add_point3D(np.asarray(xyz, float), tr, np.asarray(rgb, np.uint8))
    with atomic_dir(out_dir) as tmp:
        rec.write_text(str(tmp))


# ----------------------------------------------------------------------------- main entry


#: Bounds of the world's settings (``world_options``): ``field: (low, high, unit)``. The renderer
#: streams views to disk (a few in memory at a time), so the bound on the world's pixels
#: (frames x width x height + photos x their size; a realistic world's photos counted at their
#: largest size) is one of disk and time: :data:`WORLD_MAX_PIXELS` = 2 billion pixels is about
#: 10 GB of depth maps and images and a few CPU hours, above a paper-sized scene (1000 frames
#: of 1280x720 and 500 photos of 1600x1200 are 1.9 billion), so a typo cannot fill the disk.
WORLD_RANGES: dict[str, tuple[float, float, str]] = {
    "seed": (0, 2**32 - 1, ""), "lat0": (-85.0, 85.0, "degrees"), "lon0": (-180.0, 180.0, "degrees"),
    "alt0": (-500.0, 9000.0, "m"), "n_aerial": (2, 1000, "frames"), "n_ground": (1, 500, "photos"),
}
WORLD_SIZE_RANGE = (16, 3840)  # px, each of width and height (Earth Studio's 4K at most)
WORLD_MAX_PIXELS = 2_000_000_000
#: Named worlds: ``easy`` (the CI default: one model, photos like the frames) and ``realistic``
#: (:mod:`tasks.aerial.synthetic_realistic`: degraded aerial model, real-photo effects, distractors).
WORLDS = ("easy", "realistic")


def check_world_options(options: dict, where: str = "world_options") -> dict:
    """``options`` (the keyword arguments of :func:`generate_world`) if every one is known, of its
    type, finite and in range (:data:`WORLD_RANGES`); raises ``ValueError`` naming the field
    (``where`` + ``.`` + field; ``where=""``: the field alone)."""
    import inspect

    from tasks.aerial import plan as planning
    from tasks.common import checks

    def name(key: str) -> str:
        return f"{where}.{key}" if where else key

    at = f"{where}: " if where else ""
    if not isinstance(options, dict):
        raise ValueError(f"{at}must be a mapping of settings, got {type(options).__name__}")
    params = inspect.signature(generate_world).parameters
    known = [k for k in params if k != "root"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{at}unknown setting(s) {', '.join(map(str, unknown))}; settings: {', '.join(known)}")
    for key, (lo, hi, unit) in WORLD_RANGES.items():
        if key in options:
            checks.number(options[key], name(key), lo=lo, hi=hi, unit=unit, integer=params[key].annotation == "int")
    if "scene" in options:
        checks.plain_name(options["scene"], name("scene") + " (scene id)")
    size = options.get("size", params["size"].default)
    if not isinstance(size, (list, tuple)) or len(size) != 2:
        raise ValueError(f"{name('size')} is {size!r}: must be [width, height] in pixels")
    w, h = (checks.whole(v, name("size"), lo=WORLD_SIZE_RANGE[0], hi=WORLD_SIZE_RANGE[1], unit="px") for v in size)
    world = options.get("world", params["world"].default)
    if world not in WORLDS:
        raise ValueError(f"{name('world')} is {world!r}: must be one of {', '.join(WORLDS)}")
    n_aerial = int(options.get("n_aerial", params["n_aerial"].default))
    n_ground = int(options.get("n_ground", params["n_ground"].default))
    if options.get("distractors") is not None:
        if world != "realistic":
            raise ValueError(f"{name('distractors')}: only the realistic world has distractors; "
                             f"set {name('world')} to realistic or drop it")
        checks.number(options["distractors"], name("distractors"), lo=0, hi=n_ground - 1, unit="photos", integer=True)
    photo_px = w * h
    if world == "realistic":
        from tasks.aerial.synthetic_realistic import PHOTO_MAX_PIXELS

        photo_px = PHOTO_MAX_PIXELS
    pixels = n_aerial * w * h + n_ground * photo_px
    if pixels > WORLD_MAX_PIXELS:
        raise ValueError(f"{at}{n_aerial} frames of {w}x{h} px and {n_ground} photos of up to {photo_px:,} px are "
                         f"{pixels:,} pixels, more than the {WORLD_MAX_PIXELS:,} the renderer may hold; "
                         f"lower n_aerial, n_ground or size")
    traj = options.get("trajectory_options") or {}
    if not isinstance(traj, dict):
        raise ValueError(f"{name('trajectory_options')} must be a mapping of trajectory settings")
    try:
        rest = {k: v for k, v in traj.items() if k != "trajectory"}  # world_plan's arguments
        planning.get_trajectory(traj.get("trajectory", "spiral+streets"),
                                **{"frames": options.get("n_aerial", params["n_aerial"].default), **rest})
    except (planning.PlanError, TypeError) as exc:
        raise ValueError(f"{name('trajectory_options')}: {exc}") from None
    return options


def generate_world(root: Path, scene: str = "0001", seed: int = 0, lat0: float = 47.3769, lon0: float = 8.5417,
                   alt0: float = 408.0, n_aerial: int = 48, n_ground: int = 16,
                   size: tuple[int, int] = (640, 480), trajectory_options: dict | None = None,
                   world: str = "easy", distractors: int | None = None, progress=None) -> WorldInfo:
    """Generate the synthetic place under ``root`` (see module docstring); returns its :class:`WorldInfo`.
    ``world``: "easy" (this module) or "realistic" (:mod:`tasks.aerial.synthetic_realistic`, with
    ``distractors`` of the ``n_ground`` photos distractors; default a quarter). ``size``: the
    aerial frames' (and the easy world's photos'). ``progress(done, total)``: called after each
    of the ``n_aerial + n_ground`` renders."""
    import cv2

    t_start = time.perf_counter()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).unlink(missing_ok=True)
    params = dict(version=WORLD_VERSION, scene=scene, seed=seed, lat0=lat0, lon0=lon0, alt0=alt0, n_aerial=n_aerial, n_ground=n_ground,
                  size=list(size), trajectory_options=dict(trajectory_options or {}), world=world, distractors=distractors)
    if world not in WORLDS:
        raise ValueError(f"world is {world!r}: must be one of {', '.join(WORLDS)}")
    if world == "realistic":
        # imported here: synthetic_realistic builds on this module (a top-level import would be circular)
        from tasks.aerial.synthetic_realistic import generate_realistic

        return generate_realistic(root, scene, seed, lat0, lon0, alt0, n_aerial, n_ground, size, trajectory_options,
                                  distractors, params, progress)
    if distractors:
        raise ValueError("distractors: only the realistic world has distractors (world='realistic')")
    rng = np.random.default_rng(seed)
    boxes = _make_city(rng)
    rendered = [0]

    def on_each() -> None:
        rendered[0] += 1
        if progress is not None:
            progress(rendered[0], n_aerial + n_ground)

    width, height = int(size[0]), int(size[1])
    render_s = 0.0

    # ---- aerial poses (world frame = the plan frame): rendered from the plan, one source of truth
    aerial = write_aerial_plan(root, scene, lat0, lon0, alt0, n_aerial, (width, height), rng, trajectory_options)
    plan, f_aerial, aer_pos, aer_rot = aerial.plan, aerial.focal, aerial.positions, aerial.rotations
    a_wf, b_wf, first_geo = aerial.a_wf, aerial.b_wf, aerial.first_geo

    # ---- Earth Studio export: what Earth Studio exports for that plan (numFrames + 1 entries, Global)
    layout = SceneLayout(root, scene)
    video_path, json_path = layout.video, layout.camera_export
    es = export_document(plan)

    sun_aerial = np.array([0.4, -0.3, 0.87])
    sun_aerial /= np.linalg.norm(sun_aerial)
    gt_depths = layout.gt_depths
    frame_names = [frame_name(scene, k, n_aerial) for k in range(n_aerial)]
    aer_views = [View(aer_rot[k], aer_pos[k], f_aerial, width / 2.0, height / 2.0, width, height) for k in range(n_aerial)]
    t0 = time.perf_counter()
    aer_renders = render_stream(lambda v: render(v, boxes, sun_aerial, seed, (1.0, 1.0, 1.0)), aer_views,
                                on_each=on_each)
    gt_cams, gt_images = write_aerial_footage(video_path, [gt_depths / f"{Path(n).stem}.h5" for n in frame_names],
                                              aer_renders, aerial, frame_names, n_ground + 1, (width, height))
    render_s += time.perf_counter() - t0  # rendering and writing interleave: both are counted
    write_json_atomic(json_path, es, indent=2)

    # ---- ground photos
    sim_s, sim_r, sim_t, md_root, sfm_dir, img_dir, md_depth_dir = megadepth_frame(root, scene, rng)
    photo_names: list[str] = []
    jobs: list[tuple[View, np.ndarray, tuple]] = []
    grades: list[tuple] = []
    for j in range(n_ground):
        while True:  # on the streets around the central block, looking along them
            xy, d = _ring_point(rng.uniform(0, 1))
            side = np.array([-d[1], d[0]])
            xy = xy + side * rng.uniform(-STREET_HALF + 1, STREET_HALF - 1)
            pos = np.array([xy[0], xy[1], rng.uniform(1.5, 2.0)])
            if not _inside_any(pos, boxes, 1.0):
                break
        heading = math.atan2(d[1], d[0]) + math.radians(rng.uniform(-35, 35))  # the way the low pass flies
        pitch = math.radians(rng.uniform(2.0, 15.0))
        target = pos + np.array([math.cos(heading) * math.cos(pitch), math.sin(heading) * math.cos(pitch), math.sin(pitch)])
        r_c2w = look_at(pos, target)
        fov = rng.uniform(55.0, 70.0) if rng.uniform() < 0.6 else rng.uniform(22.0, 40.0)  # some zoomed
        f = focal_from_fov(height, fov)
        cx = width / 2.0 + rng.choice([-1, 1]) * rng.uniform(3.0, 20.0)
        cy = height / 2.0 + rng.choice([-1, 1]) * rng.uniform(3.0, 20.0)
        view = View(r_c2w, pos, f, cx, cy, width, height)
        sun = sun_aerial + 0.3 * np.array([math.cos(1.0 + j), math.sin(1.0 + j), 0.0])  # another time of day
        sun /= np.linalg.norm(sun)
        grade = (rng.uniform(0.8, 1.25), rng.uniform(0.9, 1.1, 3), rng.uniform(0.8, 1.15))  # gamma, cast, brightness
        name = f"{int(rng.integers(10**9, 10**10)):010d}_{int(rng.integers(0, 16**10)):010x}_o.jpg"
        photo_names.append(name)
        jobs.append((view, sun, (1.0, 0.95, 0.85)))
        grades.append(grade)
    t0 = time.perf_counter()
    ground_renders = render_stream(lambda job: render(job[0], boxes, job[1], seed, job[2]), jobs, on_each=on_each)
    # 3D points with tracks among the ground photos (GT first-frame ENU): each photo's samples are
    # drawn while it is in memory; the tracks are found afterwards, one photo's depth at a time
    per_photo = max(1, 400 // max(n_ground, 1))
    samples: list[tuple[np.ndarray, np.ndarray]] = []  # (world point, colour), in (photo, sample) order
    views: list[View] = []
    for j, ((rgb, depth), (gamma, cast_, bright)) in enumerate(zip(ground_renders, grades)):
        view, name = jobs[j][0], photo_names[j]
        rgb = np.clip(bright * cast_ * rgb, 0, 1) ** gamma
        with atomic_path(megadepth.raw_image_path(md_root, scene, "0", name)) as tmp:
            cv2.imwrite(str(tmp), _to_u8_bgr(rgb), [cv2.IMWRITE_JPEG_QUALITY, 95])
        write_depth_h5(gt_depths / f"{Path(name).stem}.h5", depth)
        write_depth_h5(megadepth.raw_depth_path(md_root, scene, "0", name), sim_s * depth)
        views.append(view)
        vv, uu = np.nonzero(depth > 0)
        if vv.size == 0:
            continue
        pick = rng.choice(vv.size, size=min(per_photo, vv.size), replace=False)
        for p in pick:
            u, v = uu[p] + 0.5, vv[p] + 0.5
            dz = depth[vv[p], uu[p]]
            x_w = view.centre + view.r_c2w @ np.array([(u - view.cx) / view.f, (v - view.cy) / view.f, 1.0]) * dz
            samples.append((x_w, (np.clip(rgb[vv[p], uu[p]], 0, 1) * 255).astype(np.uint8)))
    render_s += time.perf_counter() - t0
    pts2d, tracks = _tracks(views, [gt_depths / f"{Path(n).stem}.h5" for n in photo_names], [x for x, _ in samples])
    points = [(a_wf @ x_w + b_wf, colour, track) for (x_w, colour), track in zip(samples, tracks)]

    md_cams, md_images, gt_photo_cams, gt_photo_images = [], [], [], []
    for j, view in enumerate(views):
        iid = j + 1
        params_ = [view.f, view.cx, view.cy, 0.0]
        md_cams.append((iid, "SIMPLE_RADIAL", width, height, params_))
        gt_photo_cams.append((iid, "SIMPLE_RADIAL", width, height, params_))
        r_first = a_wf @ view.r_c2w
        c_first = a_wf @ view.centre + b_wf
        r_w2c, t_w2c = r_first.T, -r_first.T @ c_first
        gt_photo_images.append((iid, photo_names[j], r_w2c, t_w2c, pts2d[j]))
        r_md = r_w2c @ sim_r.T
        t_md = sim_s * t_w2c - r_md @ sim_t
        md_images.append((iid, photo_names[j], r_md, t_md, pts2d[j]))
    md_points = [(sim_s * sim_r @ x + sim_t, c, tr) for x, c, tr in points]
    _write_model(sfm_dir, md_cams, md_images, md_points)
    gt_sparse = layout.gt_sparse
    _write_model(gt_sparse, gt_photo_cams + gt_cams, gt_photo_images + gt_images, points)

    scene_list = default_scene_list(md_root)
    write_json_atomic(scene_list, [{"scene": scene, "subscene": "0", "images": photo_names}], indent=2)

    info = WorldInfo(
        root=root, scene=scene, seed=seed, origin=(lat0, lon0, alt0), first_frame_origin=first_geo,
        width=width, height=height, n_frames=n_aerial, n_photos=n_ground, video_path=video_path, json_path=json_path,
        megadepth_root=md_root, sfm_dir=sfm_dir, images_dir=img_dir, depths_dir=md_depth_dir,
        scene_list_path=scene_list, gt_sparse_dir=gt_sparse, gt_depths_dir=gt_depths, photo_names=photo_names,
        frame_names=frame_names, sim_scale=sim_s, sim_rotation=sim_r.tolist(), sim_translation=sim_t.tolist(),
        render_seconds=render_s, total_seconds=time.perf_counter() - t_start, params=params)
    write_json_atomic(root / INFO_NAME, info.to_json(), indent=2)
    write_text_atomic(root / MARKER, "ok\n")
    return info


def ensure_world(root: Path, progress=None, **kw) -> WorldInfo:
    """Generate the world unless a complete one with the same parameters is already there
    (``progress(done, total)``: see :func:`generate_world`)."""
    root = Path(root)
    scene = kw.get("scene", "0001")
    info_path = root / INFO_NAME
    if SceneLayout(root, scene).camera_export.exists() and (root / MARKER).exists() and info_path.exists():
        info = WorldInfo.from_json(json.loads(info_path.read_text()), root)
        wanted = {"world": "easy", "distractors": None, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}}
        have = {"world": "easy", "distractors": None, **info.params}  # worlds made before worlds had names: easy
        if info.params.get("version") == WORLD_VERSION and all(have.get(k) == v for k, v in wanted.items()):
            return info
    return generate_world(root, progress=progress, **kw)


__all__ = ["WorldInfo", "Box", "View", "cast", "render", "generate_world", "ensure_world"]
