"""The realistic synthetic world (``world_options.world = "realistic"``): as hard as real data.

The easy world (:mod:`tasks.aerial.synthetic_world`) renders the Earth Studio frames and the
ground photos from the same model under nearly the same light. Real AerialMegaDepth inputs
differ in every way this module reproduces, in the same file layout and ground truth:

* **Earth Studio frames** are rendered from a *degraded copy* of the model, as Google's
  photogrammetric mesh is: building footprints and heights off by decimetres (melted,
  decimated geometry), no small objects (people, vehicles, trees, poles), textures at a
  reduced resolution (pattern detail below :data:`AERIAL_TEXTURE_M` metres faded, shading at
  half the frame's resolution, upsampled and blurred) and one fixed sun with its shadows
  baked in.
* **Ground photos** see the *full* model, small objects in front of the facades included,
  under their own light (sun position, clear/hazy/overcast sky with clouds, cast shadows),
  with their own exposure, white balance, tone curve, vignetting, optical blur, sensor noise
  and JPEG quality (70-95); several focal lengths and sizes (portrait and landscape, up to
  1600 px). Their cameras are written in the raw MegaDepth sparse model as MegaDepth's are:
  SIMPLE_RADIAL or RADIAL at the photo's size with radial distortion, while the dense
  images (``dense0/imgs``) are the undistorted photos, whose pinhole intrinsics follow from
  that camera (:func:`tasks.aerial.megadepth.dense_intrinsics`, the one rule the ingest uses).
* **Distractors**: photos in the scene list and the MegaDepth model like any other, that
  must stay unregistered: another place, a close-up of a wall, a building of the same style
  (a repeated facade) and a view of the sky. They are rendered from other seeded cities; the
  MegaDepth model places them at their own poses (near the scene, or far for another
  place), with their own depths. The ground truth lists them in
  ``ground_truth/<scene>/distractors.json`` (name, kind); they have no ground-truth pose.
* ``contact_sheet.png`` at the root: aerial frames beside photos of the same spot.

Rendering streams view by view (:func:`tasks.aerial.synthetic_world.render_stream`): memory
holds a few views, never the world.
"""

from __future__ import annotations

import json
import math
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tasks.aerial import megadepth
from tasks.aerial import synthetic_world
from tasks.aerial.dense.io import write_depth_h5
from tasks.aerial.earthstudio import export_document, frame_name
from tasks.aerial.geometry import look_at
from tasks.aerial.layout import SceneLayout, default_scene_list
from tasks.common.atomic import atomic_path, write_json_atomic, write_text_atomic

#: Pattern detail finer than this (m) is missing from the aerial model's textures.
AERIAL_TEXTURE_M = 0.35
#: The aerial model's geometry error: footprint edges and roof heights off by up to (m).
AERIAL_FOOTPRINT_ERR, AERIAL_HEIGHT_ERR = 0.35, 0.8
#: Raw photo sizes (w, h) the photos are drawn from: landscape and portrait, up to 1600 px.
PHOTO_SIZES = ((1600, 1200), (900, 1200), (1024, 768), (800, 600), (768, 1024), (1200, 800), (640, 480),
               (600, 800))
#: Largest photo (pixels): the world's size bound counts every photo at this size.
PHOTO_MAX_PIXELS = max(w * h for w, h in PHOTO_SIZES)
#: Sizes of distractor photos (moderate: they only have to be there).
DISTRACTOR_SIZES = ((800, 600), (600, 800), (1024, 768))
DISTRACTOR_KINDS = ("repeated_facade", "other_place", "close_up", "sky")
DISTRACTORS_NAME = "distractors.json"
CONTACT_SHEET = "contact_sheet.png"
PROP_BASE = 1_000_000  # face ids of small objects: PROP_BASE + 8 * index + face (6: sphere)


@dataclass
class Prop:
    """A small object of the full model: an axis-aligned box, or a sphere (tree canopy)."""

    kind: str  # person, vehicle, tree, pole
    lo: np.ndarray
    hi: np.ndarray
    colour: np.ndarray
    sphere: tuple[np.ndarray, float] | None = None


@dataclass
class Light:
    """Sun direction (unit, towards the sun), its colour, ambient (sky) colour and sky look."""

    sun: np.ndarray
    sun_colour: np.ndarray
    ambient: np.ndarray
    horizon: np.ndarray
    zenith: np.ndarray
    clouds: float  # 0 clear .. 1 overcast


# ----------------------------------------------------------------------------- model


def degraded_copy(boxes: list[synthetic_world.Box], rng: np.random.Generator) -> list[synthetic_world.Box]:
    """The aerial model's buildings: each footprint edge and roof moved by up to
    :data:`AERIAL_FOOTPRINT_ERR` / :data:`AERIAL_HEIGHT_ERR` metres (same textures)."""
    out = []
    for b in boxes:
        lo, hi = b.lo.copy(), b.hi.copy()
        lo[:2] += rng.uniform(-AERIAL_FOOTPRINT_ERR, AERIAL_FOOTPRINT_ERR, 2)
        hi[:2] += rng.uniform(-AERIAL_FOOTPRINT_ERR, AERIAL_FOOTPRINT_ERR, 2)
        hi[2] = max(3.0, hi[2] + rng.uniform(-AERIAL_HEIGHT_ERR, AERIAL_HEIGHT_ERR))
        out.append(synthetic_world.Box(lo=lo, hi=hi, colour=b.colour, roof=b.roof, window_dx=b.window_dx,
                          window_dz=b.window_dz, brick=b.brick))
    return out


def make_props(rng: np.random.Generator, boxes: list[synthetic_world.Box]) -> list[Prop]:
    """People, parked vehicles, trees and poles along the streets of the city centre (both
    sides of every street within 80 m), in front of the facades."""
    props: list[Prop] = []
    lines = [-60.0, -20.0, 20.0, 60.0]
    for along_x in (True, False):
        for c in lines:
            for side in (-1.0, 1.0):
                s = -80.0
                while s < 80.0:
                    s += rng.uniform(2.0, 7.0)
                    kind = rng.choice(["person", "person", "person", "tree", "pole", "vehicle", "vehicle"])
                    if kind == "vehicle":
                        off, (la, wa, h) = 3.3, (rng.uniform(3.8, 4.8), rng.uniform(1.7, 1.9), rng.uniform(1.4, 1.9))
                    elif kind == "person":
                        off, (la, wa, h) = rng.uniform(5.2, 6.8), (0.45, 0.35, rng.uniform(1.55, 1.9))
                    elif kind == "tree":
                        off, (la, wa, h) = 5.6, (0.35, 0.35, rng.uniform(2.6, 3.4))
                    else:
                        off, (la, wa, h) = 5.5, (0.16, 0.16, rng.uniform(4.0, 6.5))
                    centre = np.array([s, c + side * off]) if along_x else np.array([c + side * off, s])
                    half = np.array([la, wa]) / 2 if along_x else np.array([wa, la]) / 2
                    lo = np.array([*(centre - half), 0.0])
                    hi = np.array([*(centre + half), h])
                    if synthetic_world._inside_any(0.5 * (lo + hi), boxes, 0.3) or synthetic_world._inside_any(np.array([*centre, 0.5]), boxes, 0.3):
                        continue
                    if kind == "vehicle":
                        hue = rng.uniform(0, 1)
                        colour = np.array([0.5 + 0.4 * math.cos(6.28 * hue), 0.5 + 0.4 * math.cos(6.28 * (hue - 0.33)),
                                           0.5 + 0.4 * math.cos(6.28 * (hue - 0.67))]) * rng.uniform(0.4, 1.0)
                    elif kind == "person":
                        colour = rng.uniform(0.1, 0.9, 3)
                    elif kind == "tree":
                        colour = np.array([0.35, 0.25, 0.15])
                    else:
                        colour = np.array([0.25, 0.26, 0.28])
                    props.append(Prop(str(kind), lo, hi, colour))
                    if kind == "tree":
                        r = rng.uniform(1.4, 2.4)
                        cz = h + 0.7 * r
                        cc = np.array([*centre, cz])
                        props.append(Prop("tree", cc - r, cc + r, np.array([0.2, 0.42, 0.15]) * rng.uniform(0.7, 1.2),
                                          sphere=(cc, r)))
    return props


def _models(rng: np.random.Generator) -> tuple[list[synthetic_world.Box], list[synthetic_world.Box], list[Prop]]:
    boxes = synthetic_world._make_city(rng)
    return boxes, degraded_copy(boxes, rng), make_props(rng, boxes)


def world_models(seed: int) -> tuple[list[synthetic_world.Box], list[synthetic_world.Box], list[Prop]]:
    """The realistic world's models for ``seed`` in its render frame: (full model's buildings,
    the aerial model's buildings, the full model's small objects)."""
    return _models(np.random.default_rng([seed, 23]))


# ----------------------------------------------------------------------------- rays, casting


def _grid_rays(view: synthetic_world.View) -> np.ndarray:
    """World ray directions (H, W, 3), camera-z component 1."""
    return synthetic_world._rays(view).reshape(view.height, view.width, 3)


_BOX_EDGES = [(a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1]


def _screen_rect(view: synthetic_world.View, lo: np.ndarray, hi: np.ndarray) -> tuple[int, int, int, int] | None:
    """Pixel rectangle ``(v0, v1, u0, u1)`` holding the projection of the box's part in front
    of the camera (edges clipped at 5 cm), or None when it is behind or off the image."""
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    xc = (corners - view.centre) @ view.r_c2w
    near = 0.05
    front = xc[:, 2] > near
    if not front.any():
        return None
    pts = [xc[front]]
    if not front.all():
        for a, b in _BOX_EDGES:
            if front[a] != front[b]:
                t = (near - xc[a, 2]) / (xc[b, 2] - xc[a, 2])
                pts.append((xc[a] + t * (xc[b] - xc[a]))[None])
    q = np.vstack(pts)
    u = view.f * q[:, 0] / q[:, 2] + view.cx
    v = view.f * q[:, 1] / q[:, 2] + view.cy
    u0, u1 = max(0, int(math.floor(u.min())) - 1), min(view.width, int(math.ceil(u.max())) + 1)
    v0, v1 = max(0, int(math.floor(v.min())) - 1), min(view.height, int(math.ceil(v.max())) + 1)
    return None if u0 >= u1 or v0 >= v1 else (v0, v1, u0, u1)


def _cast_props(view: synthetic_world.View, d: np.ndarray, depth: np.ndarray, fid: np.ndarray, props: list[Prop]) -> None:
    """Add the small objects to ``depth``/``fid`` ((H, W), 0 = nothing), casting each one only
    against the rays of its projected bounding rectangle."""
    o = view.centre
    for pi, pr in enumerate(props):
        rect = _screen_rect(view, pr.lo, pr.hi)
        if rect is None:
            continue
        v0, v1, u0, u1 = rect
        sub = d[v0:v1, u0:u1].reshape(-1, 3)
        if pr.sphere is None:
            tnear, tfar, tmin = synthetic_world.slab(o, synthetic_world.inverse_directions(sub), pr.lo, pr.hi)
            ok = (tnear <= tfar) & (tnear > 1e-6)
            axis = synthetic_world.entry_axis(tmin, tnear, np.ones(len(sub), bool))
            face = 2 * axis + (np.choose(axis, [sub[:, 0], sub[:, 1], sub[:, 2]]) < 0)
        else:
            c, rad = pr.sphere
            oc = o - c
            a = np.einsum("ij,ij->i", sub, sub)
            b = 2.0 * sub @ oc
            disc = b * b - 4 * a * (oc @ oc - rad * rad)
            ok = disc > 0
            tnear = np.where(ok, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), np.inf)
            ok &= tnear > 1e-6
            face = np.full(len(sub), 6)
        cur = depth[v0:v1, u0:u1].reshape(-1)
        better = ok & ((cur <= 0) | (tnear < cur))
        if better.any():
            cur_f = fid[v0:v1, u0:u1].reshape(-1)
            cur[better] = tnear[better]
            cur_f[better] = PROP_BASE + 8 * pi + face[better]
            depth[v0:v1, u0:u1] = cur.reshape(v1 - v0, u1 - u0)
            fid[v0:v1, u0:u1] = cur_f.reshape(v1 - v0, u1 - u0)


def cast_view(view: synthetic_world.View, boxes: list[synthetic_world.Box], props: list[Prop], d: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """(depth (H, W), face id (H, W)) of ``view`` in the model of ``boxes`` and ``props``
    (``d``: the view's rays from :func:`_grid_rays`, when already made)."""
    d = _grid_rays(view) if d is None else d
    depth, fid = synthetic_world.cast_rays(view.centre, d.reshape(-1, 3), view.r_c2w[:, 2], boxes)
    depth, fid = depth.reshape(view.height, view.width), fid.reshape(view.height, view.width)
    if props:
        _cast_props(view, d, depth, fid, props)
    return depth, fid


# ----------------------------------------------------------------------------- shading


def _lit(p: np.ndarray, n: np.ndarray, sun: np.ndarray, boxes: list[synthetic_world.Box]) -> np.ndarray:
    """1 where the point ``p`` (M, 3) with normal ``n`` sees the sun past the buildings, else 0."""
    o = p + 0.05 * n
    inv = synthetic_world.inverse_directions(np.asarray(sun, float)[None])
    lit = np.ones(len(p), bool)
    for b in boxes:
        if not lit.any():
            break
        tnear, tfar, _ = synthetic_world.slab(o, inv, b.lo, b.hi)
        lit &= ~((tnear <= tfar) & (tfar > 0))
    return lit.astype(np.float64)


def _sky(d: np.ndarray, light: Light, seed: int) -> np.ndarray:
    """Sky colour of unit-less directions ``d`` (M, 3): gradient, sun glow, clouds."""
    dn = d / np.linalg.norm(d, axis=1, keepdims=True)
    el = np.clip(dn[:, 2], 0, 1)[:, None]
    col = light.horizon + (light.zenith - light.horizon) * el ** 0.6
    glow = np.exp(-8.0 * (1.0 - np.clip(dn @ light.sun, -1, 1)))[:, None]
    col = col + 0.5 * glow * light.sun_colour
    if light.clouds > 0:
        z = np.maximum(dn[:, 2], 0.03)
        cu, cv = dn[:, 0] / z * 3.0, dn[:, 1] / z * 3.0
        cl = synthetic_world._vnoise(cu, cv, seed) * 0.6 + synthetic_world._vnoise(cu * 2.7, cv * 2.7, seed + 1) * 0.4
        cover = np.clip((cl - (1.0 - light.clouds)) * 3.0, 0, 1)[:, None]
        col = col * (1 - cover) + cover * np.array([0.85, 0.86, 0.88]) * (0.75 + 0.25 * cl[:, None])
    return col


def shade(view: synthetic_world.View, boxes: list[synthetic_world.Box], props: list[Prop], depth: np.ndarray, fid: np.ndarray,
          light: Light, seed: int, shadow_boxes: list[synthetic_world.Box], min_foot: float = 0.0,
          d: np.ndarray | None = None) -> np.ndarray:
    """Linear colour (H, W, 3) of the cast view: textures (of the easy world's procedural
    materials), sun with cast shadows from ``shadow_boxes``, sky ambient, sky."""
    d = synthetic_world._rays(view) if d is None else d.reshape(-1, 3)
    dep, fi = depth.reshape(-1), fid.reshape(-1)
    n_px = d.shape[0]
    col = np.zeros((n_px, 3))
    normal = np.zeros((n_px, 3))
    foot = np.maximum(dep * np.linalg.norm(d, axis=1) / view.f, max(min_foot, 1e-3))
    p = view.centre + d * dep[:, None]
    sky = fi == -2
    if sky.any():
        col[sky] = _sky(d[sky], light, seed + 77)
    g = fi == -1
    if g.any():
        col[g] = synthetic_world._ground_colour(p[g, 0], p[g, 1], foot[g], seed)
        normal[g] = (0.0, 0.0, 1.0)
    for bi, b in enumerate(boxes):
        for k in range(6):
            m = fi == 6 * bi + k
            if not m.any():
                continue
            axis, positive = divmod(k, 2)
            q = p[m]
            if axis == 2:
                c = synthetic_world._roof_colour(q[:, 0], q[:, 1], foot[m], b, seed + 1000 * bi)
            else:
                u = q[:, 1 - axis] * (1 if positive else -1) + 1000.0 * k
                c = synthetic_world._wall_colour(u, q[:, 2], foot[m], b, seed + 1000 * bi + 7 * k, b.hi[2])
            col[m] = c
            normal[m, axis] = 1.0 if positive else -1.0
    pm = fi >= PROP_BASE
    if pm.any():
        idx = np.nonzero(pm)[0]
        which, face = divmod(fi[idx] - PROP_BASE, 8)
        for pi in np.unique(which):
            sel = idx[which == pi]
            f_sel = face[which == pi]
            pr = props[pi]
            q = p[sel]
            zrel = q[:, 2] - pr.lo[2]
            noise = 0.15 * (synthetic_world._vnoise(q[:, 0] * 4 + q[:, 1] * 4, q[:, 2] * 4, seed + 31 * int(pi)) - 0.5)
            c = np.tile(pr.colour, (len(sel), 1)) * (1 + noise[:, None])
            if pr.kind == "person":
                c[zrel < 0.85] = np.array([0.12, 0.13, 0.2])  # trousers
                c[zrel > pr.hi[2] - pr.lo[2] - 0.25] = np.array([0.75, 0.55, 0.42])  # head
            elif pr.kind == "vehicle":
                glass = (zrel > 0.95) & (zrel < pr.hi[2] - pr.lo[2] - 0.08)
                c[glass] = np.array([0.08, 0.1, 0.12])
                c[zrel < 0.35] = np.array([0.05, 0.05, 0.05])  # wheels / shadow band
            if pr.sphere is not None:
                nn = (q - pr.sphere[0]) / pr.sphere[1]
                leaves = synthetic_world._vnoise(q[:, 0] * 3 + 50 * q[:, 2], q[:, 1] * 3, seed + 5 + int(pi))
                c = c * (0.6 + 0.8 * leaves[:, None])
            else:
                nn = np.zeros((len(sel), 3))
                ax, pos = np.divmod(f_sel, 2)
                nn[np.arange(len(sel)), ax] = np.where(pos == 1, 1.0, -1.0)
            col[sel] = c
            normal[sel] = nn
    hit = ~sky
    if hit.any():
        ndl = np.clip(normal[hit] @ light.sun, 0, None)
        lit = np.zeros(ndl.shape)
        face_sun = ndl > 0
        if face_sun.any():
            lit[face_sun] = _lit(p[hit][face_sun], normal[hit][face_sun], light.sun, shadow_boxes)
        direct = (ndl * lit)[:, None] * light.sun_colour
        col[hit] = col[hit] * (light.ambient + direct)
    return col.reshape(view.height, view.width, 3)


# ----------------------------------------------------------------------------- light, photometry


def aerial_light(rng: np.random.Generator) -> Light:
    """The one sun baked into the aerial model (mid-day, clear)."""
    az, el = rng.uniform(0, 2 * math.pi), math.radians(rng.uniform(45.0, 60.0))
    sun = np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    return Light(sun, np.array([0.75, 0.72, 0.66]), np.array([0.42, 0.45, 0.5]), np.array([0.8, 0.85, 0.9]),
                 np.array([0.45, 0.6, 0.85]), 0.0)


def photo_light(rng: np.random.Generator) -> Light:
    """A photo's own time of day and weather: sun anywhere above 6 deg; clear, hazy or
    overcast (weak direct light, grey sky), golden hour when the sun is low."""
    az, el_deg = rng.uniform(0, 2 * math.pi), rng.uniform(6.0, 70.0)
    el = math.radians(el_deg)
    sun = np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    weather = rng.choice(["clear", "clear", "hazy", "overcast"])
    warm = float(np.clip((25.0 - el_deg) / 20.0, 0, 1))
    sun_colour = np.array([0.85, 0.8, 0.72]) * (1 - warm) + np.array([0.95, 0.65, 0.4]) * warm
    ambient = np.array([0.38, 0.42, 0.5]) * rng.uniform(0.8, 1.2)
    horizon, zenith, clouds = np.array([0.82, 0.86, 0.92]), np.array([0.3, 0.5, 0.88]), rng.uniform(0.0, 0.4)
    if weather == "hazy":
        sun_colour, horizon, zenith, clouds = sun_colour * 0.7, np.array([0.88, 0.88, 0.86]), np.array([0.6, 0.68, 0.8]), 0.5
        ambient = ambient * 1.2
    elif weather == "overcast":
        sun_colour, ambient = sun_colour * 0.15, np.array([0.75, 0.76, 0.8]) * rng.uniform(0.8, 1.1)
        horizon, zenith, clouds = np.array([0.78, 0.79, 0.8]), np.array([0.62, 0.64, 0.68]), 1.0
    horizon = horizon * (1 - 0.5 * warm) + np.array([0.95, 0.7, 0.5]) * 0.5 * warm
    return Light(sun, sun_colour, ambient, horizon, zenith, float(clouds))


def develop(rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """What a phone or camera makes of the scene light: exposure, white balance, vignetting,
    optical blur, sensor noise (shot + read), tone curve; returns uint8 BGR and the settings."""
    h, w = rgb.shape[:2]
    exposure = float(math.exp(rng.uniform(math.log(0.6), math.log(1.7))))
    wb = np.array([rng.uniform(0.82, 1.2), 1.0, rng.uniform(0.82, 1.2)])
    vignette = float(rng.uniform(0.0, 0.35))
    blur = float(rng.uniform(0.0, 0.9))
    shot, read = float(rng.uniform(0.0005, 0.003)), float(rng.uniform(0.003, 0.012))
    gamma = float(rng.uniform(0.8, 1.2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / ((w / 2) ** 2 + (h / 2) ** 2)
    img = (rgb * exposure * wb).astype(np.float32) * (1.0 - vignette * r2)[:, :, None]
    if blur > 0.2:
        img = cv2.GaussianBlur(img, (0, 0), blur)
    sigma = np.sqrt(shot * np.clip(img, 0, None) + read * read)
    img = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    img = np.clip(img, 0, 1) ** gamma
    out = synthetic_world._to_u8_bgr(img)
    return out, {"exposure": exposure, "white_balance": wb.tolist(), "vignette": vignette, "blur_px": blur,
                 "noise_shot": shot, "noise_read": read, "gamma": gamma}


def _jpeg(path: Path, bgr: np.ndarray, quality: int) -> None:
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)]):
            raise OSError(f"cv2.imwrite failed for {tmp}")


# ----------------------------------------------------------------------------- cameras


def raw_camera(rng: np.random.Generator, size: tuple[int, int], fov_long_deg: float) -> tuple[str, list[float], tuple]:
    """A MegaDepth sparse camera for a photo of ``size``: (model, COLMAP params, OpenCV
    distortion): SIMPLE_RADIAL (two in three) or RADIAL, principal point at the centre,
    barrel distortion for wide lenses, mild either way for long ones."""
    w, h = size
    f = (max(w, h) / 2.0) / math.tan(math.radians(fov_long_deg) / 2.0)
    strength = 0.14 if fov_long_deg > 55 else 0.05
    k1 = float(rng.uniform(-strength, 0.3 * strength))
    if rng.uniform() < 2 / 3:
        return "SIMPLE_RADIAL", [f, w / 2.0, h / 2.0, k1], (k1, 0.0, 0.0, 0.0)
    k2 = float(rng.uniform(-0.3, 0.3) * abs(k1))
    return "RADIAL", [f, w / 2.0, h / 2.0, k1, k2], (k1, k2, 0.0, 0.0)


def dense_view(r_c2w: np.ndarray, pos: np.ndarray, model: str, params: list[float], dist: tuple,
               size: tuple[int, int]) -> synthetic_world.View:
    """The pinhole camera of the dense (undistorted) image of a raw camera, by the ingest's rule."""
    k_raw = np.array([[params[0], 0, params[1]], [0, params[0], params[2]], [0, 0, 1.0]])
    k = megadepth.dense_intrinsics(megadepth.ModelEntry(k_raw, np.eye(4), size, dist, model), size)
    return synthetic_world.View(r_c2w, np.asarray(pos, float), float(k[0, 0]), float(k[0, 2]), float(k[1, 2]), size[0], size[1])


def distort_points(view: synthetic_world.View, params: list[float], dist: tuple, pts: list[tuple[float, float, int]]
                   ) -> list[tuple[float, float, int]]:
    """Dense-image observations mapped to the raw (distorted) photo's pixels."""
    if not pts:
        return []
    a = np.array([[x, y] for x, y, _ in pts])
    xu = (a - [view.cx, view.cy]) / view.f
    r2 = (xu ** 2).sum(axis=1, keepdims=True)
    xd = xu * (1 + dist[0] * r2 + dist[1] * r2 * r2)
    raw = xd * params[0] + [params[1], params[2]]
    return [(float(x), float(y), 0) for x, y in raw]


# ----------------------------------------------------------------------------- poses of photos


def _clear(pos: np.ndarray, boxes: list[synthetic_world.Box], props: list[Prop], margin: float = 1.0) -> bool:
    if synthetic_world._inside_any(pos, boxes, margin):
        return False
    for pr in props:
        if pr.sphere is not None:
            if np.linalg.norm(pos - pr.sphere[0]) < pr.sphere[1] + 0.5:
                return False
        elif np.all(pos > pr.lo - margin) and np.all(pos < pr.hi + margin):
            return False
    return True


def _street_pose(rng: np.random.Generator, boxes, props, pitch_deg=(0.0, 18.0), turn_deg=40.0):
    """A photographer on the street loop around the central block: (position, c2w rotation)."""
    for _ in range(1000):
        xy, d = synthetic_world._ring_point(rng.uniform(0, 1))
        side = np.array([-d[1], d[0]])
        xy = xy + side * rng.uniform(-synthetic_world.STREET_HALF + 0.8, synthetic_world.STREET_HALF - 0.8)
        pos = np.array([xy[0], xy[1], rng.uniform(1.4, 1.9)])
        if _clear(pos, boxes, props):
            break
    heading = math.atan2(d[1], d[0]) + math.radians(rng.uniform(-turn_deg, turn_deg))
    if rng.uniform() < 0.25:  # facing a facade across the street
        heading = math.atan2(side[1], side[0]) + (0 if rng.uniform() < 0.5 else math.pi) + math.radians(rng.uniform(-20, 20))
    pitch = math.radians(rng.uniform(*pitch_deg))
    target = pos + np.array([math.cos(heading) * math.cos(pitch), math.sin(heading) * math.cos(pitch), math.sin(pitch)])
    r = look_at(pos, target)
    roll = math.radians(rng.uniform(-4.0, 4.0))  # hand-held
    c, s = math.cos(roll), math.sin(roll)
    return pos, r @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def _restyled(b: synthetic_world.Box, style: synthetic_world.Box) -> synthetic_world.Box:
    return synthetic_world.Box(lo=b.lo, hi=np.array([b.hi[0], b.hi[1], max(b.hi[2], 12.0)]), colour=style.colour, roof=style.roof,
                  window_dx=style.window_dx, window_dz=style.window_dz, brick=style.brick)


def distractor_scene(kind: str, rng: np.random.Generator, boxes: list[synthetic_world.Box]):
    """(boxes, props, position, c2w, texture seed) of a distractor of ``kind`` in a foreign city."""
    f_seed = int(rng.integers(10**6, 10**9))
    f_rng = np.random.default_rng(f_seed)
    f_boxes = synthetic_world._make_city(f_rng)
    f_props = make_props(f_rng, f_boxes) if kind in ("other_place", "repeated_facade") else []
    if kind == "repeated_facade":  # a building of the same style as one of the scene's, seen from the street
        style = boxes[int(rng.integers(len(boxes)))]
        bi = int(rng.integers(len(f_boxes)))
        f_boxes[bi] = _restyled(f_boxes[bi], style)
        b = f_boxes[bi]
        for _ in range(200):
            axis, sign = int(rng.integers(2)), float(rng.choice([-1.0, 1.0]))
            face = (b.lo + b.hi) / 2
            face[axis] = b.hi[axis] if sign > 0 else b.lo[axis]
            face[1 - axis] += rng.uniform(-0.3, 0.3) * (b.hi[1 - axis] - b.lo[1 - axis])
            pos = face.copy()
            pos[axis] += sign * rng.uniform(9.0, 14.0)
            pos[2] = rng.uniform(1.5, 1.9)
            if _clear(pos, f_boxes, f_props):
                break
        target = np.array([face[0], face[1], rng.uniform(4.0, 7.0)])
        return f_boxes, f_props, pos, look_at(pos, target), f_seed
    if kind == "close_up":  # a wall from a metre or two
        b = f_boxes[int(rng.integers(len(f_boxes)))]
        axis, sign = int(rng.integers(2)), float(rng.choice([-1.0, 1.0]))
        face = (b.lo + b.hi) / 2
        face[axis] = b.hi[axis] if sign > 0 else b.lo[axis]
        face[2] = rng.uniform(1.2, 4.0)
        pos = face.copy()
        pos[axis] += sign * rng.uniform(1.2, 2.2)
        target = face + np.array([0, 0, rng.uniform(-0.3, 0.3)])
        return f_boxes, f_props, pos, look_at(pos, target), f_seed
    pos, r = _street_pose(rng, f_boxes, f_props, pitch_deg=(55.0, 80.0) if kind == "sky" else (0.0, 15.0))
    return f_boxes, f_props, pos, r, f_seed


# ----------------------------------------------------------------------------- contact sheet


def _contact_sheet(path: Path, video: Path, aerial_views: list[synthetic_world.View], photos: list[tuple[synthetic_world.View, Path, np.ndarray]],
                   aer_depth_paths: list[Path], max_rows: int = 6, row_h: int = 240) -> None:
    """PNG: per row an aerial frame and a photo that see the same spot (a red ring on both)."""
    from tasks.aerial.dense.io import read_depth_h5

    rows = []
    for view, photo_path, spots in photos:
        if len(rows) >= max_rows:
            break
        found = None
        for spot in spots:
            cands = []
            for k, av in enumerate(aerial_views):
                xc = av.r_c2w.T @ (spot - av.centre)
                if xc[2] <= 1.0:
                    continue
                u, v = av.f * xc[0] / xc[2] + av.cx, av.f * xc[1] / xc[2] + av.cy
                if 0.1 * av.width <= u < 0.9 * av.width and 0.1 * av.height <= v < 0.9 * av.height:
                    cands.append((float(np.linalg.norm(spot - av.centre)), k, u, v, xc[2]))
            for _, k, u, v, z in sorted(cands)[:8]:  # the nearest frames where the spot is not hidden
                if abs(read_depth_h5(aer_depth_paths[k])[int(v), int(u)] - z) < 0.03 * z + 0.5:
                    found = (k, (u, v), photo_path, view, spot)
                    break
            if found:
                break
        if found:
            rows.append(found)
    if not rows:
        return
    wanted = {k for k, *_ in rows}
    frames = {}
    cap = cv2.VideoCapture(str(video))
    i = 0
    while len(frames) < len(wanted):
        ok, img = cap.read()
        if not ok:
            break
        if i in wanted:
            frames[i] = img
        i += 1
    cap.release()
    tiles = []
    for k, (u, v), photo_path, view, spot in rows:
        if k not in frames:
            continue
        a = frames[k].copy()
        cv2.circle(a, (int(u), int(v)), max(6, a.shape[0] // 30), (0, 0, 255), 2)
        p = cv2.imread(str(photo_path))
        xc = view.r_c2w.T @ (spot - view.centre)
        pu, pv = view.f * xc[0] / xc[2] + view.cx, view.f * xc[1] / xc[2] + view.cy
        cv2.circle(p, (int(pu), int(pv)), max(6, p.shape[0] // 30), (0, 0, 255), 3)
        a = cv2.resize(a, (int(round(a.shape[1] * row_h / a.shape[0])), row_h), interpolation=cv2.INTER_AREA)
        p = cv2.resize(p, (int(round(p.shape[1] * row_h / p.shape[0])), row_h), interpolation=cv2.INTER_AREA)
        cv2.putText(a, f"aerial frame {k}", (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
        cv2.putText(p, photo_path.name[:24], (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(np.hstack([a, np.full((row_h, 8, 3), 255, np.uint8), p]))
    if not tiles:
        return
    width = max(t.shape[1] for t in tiles)
    sheet = np.vstack([np.pad(t, ((0, 8), (0, width - t.shape[1]), (0, 0)), constant_values=255) for t in tiles])
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(png_bytes(sheet[:, :, ::-1]))


def png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB image as PNG with stored (uncompressed) deflate blocks. No zlib
    compressor is called: once pycolmap, cv2 and h5py are loaded (in that order, as
    ``tasks.aerial`` imports them) OpenCV's, Pillow's and even Python's own deflate end in a
    double free (``deflateEnd``), measured in this environment; checksums are safe."""
    h, w = rgb.shape[:2]
    raw = np.hstack([np.zeros((h, 1), np.uint8), np.ascontiguousarray(rgb, np.uint8).reshape(h, w * 3)]).tobytes()
    blocks = [b"\x78\x01"]
    step = 65535
    for i in range(0, max(len(raw), 1), step):
        part = raw[i:i + step]
        final = 1 if i + step >= len(raw) else 0
        blocks.append(struct.pack("<BHH", final, len(part), 0xFFFF ^ len(part)) + part)
    blocks.append(struct.pack(">I", zlib.adler32(raw) & 0xFFFFFFFF))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"".join(blocks)) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- main entry


def generate_realistic(root: Path, scene: str, seed: int, lat0: float, lon0: float, alt0: float, n_aerial: int,
                       n_ground: int, size: tuple[int, int], trajectory_options: dict | None, distractors: int | None,
                       params: dict, progress=None) -> synthetic_world.WorldInfo:
    """Generate the realistic world under ``root`` (module doc); ``n_ground`` photos in the
    scene list, ``distractors`` of them distractors (default: a quarter)."""
    t_start = time.perf_counter()
    root = Path(root)
    n_distractors = n_ground // 4 if distractors is None else int(distractors)
    n_true = n_ground - n_distractors
    rng = np.random.default_rng([seed, 23])
    boxes, aerial_boxes, props = _models(rng)
    width, height = int(size[0]), int(size[1])
    done = [0]

    def on_each() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], n_aerial + n_ground)

    render_s = 0.0
    # ---- aerial frames: the degraded model, textures coarse, one sun baked in
    aerial = synthetic_world.write_aerial_plan(root, scene, lat0, lon0, alt0, n_aerial, (width, height), rng,
                                               trajectory_options)
    plan, f_aerial, aer_pos, aer_rot = aerial.plan, aerial.focal, aerial.positions, aerial.rotations
    a_wf, b_wf, first_geo = aerial.a_wf, aerial.b_wf, aerial.first_geo
    layout = SceneLayout(root, scene)
    video_path, json_path, gt_depths = layout.video, layout.camera_export, layout.gt_depths
    es = export_document(plan)
    light_a = aerial_light(rng)
    frame_names = [frame_name(scene, k, n_aerial) for k in range(n_aerial)]
    aer_views = [synthetic_world.View(aer_rot[k], aer_pos[k], f_aerial, width / 2.0, height / 2.0, width, height)
                 for k in range(n_aerial)]

    def render_aerial(view: synthetic_world.View) -> tuple[np.ndarray, np.ndarray]:
        depth, _ = cast_view(view, aerial_boxes, [])
        hw, hh = max(8, width // 2), max(8, height // 2)
        small = synthetic_world.View(view.r_c2w, view.centre, view.f * hw / width, view.cx * hw / width, view.cy * hh / height, hw, hh)
        rays = _grid_rays(small)
        d_s, f_s = cast_view(small, aerial_boxes, [], rays)
        col = shade(small, aerial_boxes, [], d_s, f_s, light_a, seed, aerial_boxes, min_foot=AERIAL_TEXTURE_M, d=rays)
        col = cv2.resize(col.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        col = cv2.GaussianBlur(col, (0, 0), 0.7)
        return np.clip(col ** (1 / 1.1), 0, 1), depth

    aer_depth_paths = [gt_depths / f"{Path(n).stem}.h5" for n in frame_names]
    t0 = time.perf_counter()
    gt_cams, gt_images = synthetic_world.write_aerial_footage(
        video_path, aer_depth_paths, synthetic_world.render_stream(render_aerial, aer_views, on_each=on_each), aerial,
        frame_names, n_ground + 1, (width, height))
    render_s += time.perf_counter() - t0
    write_json_atomic(json_path, es, indent=2)

    # ---- photos: true ones of the full model, distractors of foreign cities; order shuffled
    sim_s, sim_r, sim_t, md_root, sfm_dir, img_dir, md_depth_dir = synthetic_world.megadepth_frame(root, scene, rng)
    kinds = ["true"] * n_true + [DISTRACTOR_KINDS[i % len(DISTRACTOR_KINDS)] for i in range(n_distractors)]
    order = rng.permutation(n_ground)
    size_order = rng.permutation(len(PHOTO_SIZES))
    jobs = []
    n_true_seen = 0
    for slot in range(n_ground):
        kind = kinds[order[slot]]
        prng = np.random.default_rng([seed, 23, slot])
        if kind == "true":
            psize = PHOTO_SIZES[size_order[n_true_seen % len(PHOTO_SIZES)]]
            n_true_seen += 1
            pos, r_c2w = _street_pose(prng, boxes, props)
            fov = float(prng.choice([prng.uniform(60, 75), prng.uniform(45, 60), prng.uniform(20, 35)], p=[0.4, 0.4, 0.2]))
            w_boxes, w_props, t_seed, offset = boxes, props, seed, np.zeros(3)
        else:
            psize = DISTRACTOR_SIZES[int(prng.integers(len(DISTRACTOR_SIZES)))]
            w_boxes, w_props, pos, r_c2w, t_seed = distractor_scene(kind, prng, boxes)
            fov = float(prng.uniform(45, 70))
            if kind == "other_place":  # far from the scene in MegaDepth's own frame
                ang = prng.uniform(0, 2 * math.pi)
                offset = np.array([math.cos(ang), math.sin(ang), 0.0]) * prng.uniform(350, 600)
            else:  # placed by MegaDepth's own reconstruction near the scene's streets
                near, _ = synthetic_world._ring_point(prng.uniform(0, 1))
                offset = np.array([near[0] - pos[0], near[1] - pos[1], 0.0])
        model, cam_params, dist = raw_camera(prng, psize, fov)
        view = dense_view(r_c2w, pos, model, cam_params, dist, psize)
        name = f"{int(prng.integers(10**9, 10**10)):010d}_{int(prng.integers(0, 16**10)):010x}_o.jpg"
        jobs.append(dict(kind=kind, view=view, model=model, params=cam_params, dist=dist, name=name,
                         boxes=w_boxes, props=w_props, tex_seed=t_seed, offset=offset, light=photo_light(prng),
                         quality=int(prng.integers(70, 96)), rng_seed=[seed, 23, slot, 1]))

    def render_photo(job: dict) -> tuple[np.ndarray, np.ndarray]:
        view = job["view"]
        rays = _grid_rays(view)
        depth, fid = cast_view(view, job["boxes"], job["props"], rays)
        col = shade(view, job["boxes"], job["props"], depth, fid, job["light"], job["tex_seed"], job["boxes"], d=rays)
        bgr, _ = develop(col, np.random.default_rng(job["rng_seed"]))
        return bgr, depth, float(np.mean(fid >= PROP_BASE))

    per_photo = max(1, 400 // max(n_true, 1))
    samples: list[tuple[np.ndarray, np.ndarray]] = []
    true_views: list[synthetic_world.View] = []
    true_jobs: list[dict] = []
    sheet_photos = []
    photo_meta = []
    t0 = time.perf_counter()
    for job, (bgr, depth, occluded) in zip(jobs, synthetic_world.render_stream(render_photo, jobs, on_each=on_each)):
        name, view = job["name"], job["view"]
        _jpeg(megadepth.raw_image_path(md_root, scene, "0", name), bgr, job["quality"])
        write_depth_h5(megadepth.raw_depth_path(md_root, scene, "0", name), sim_s * depth)
        photo_meta.append({"name": name, "kind": job["kind"], "size": [view.width, view.height], "model": job["model"],
                           "params": job["params"], "jpeg_quality": job["quality"], "occluder_share": occluded})
        if job["kind"] != "true":
            continue
        write_depth_h5(gt_depths / f"{Path(name).stem}.h5", depth)
        true_views.append(view)
        true_jobs.append(job)
        spots = []  # candidate spots for the contact sheet: surface points 5-80 m away
        for fu, fv in ((0.5, 0.5), (0.5, 0.35), (0.3, 0.45), (0.7, 0.45), (0.5, 0.2)):
            u, v = fu * view.width, fv * view.height
            dz = depth[int(v), int(u)]
            if 5.0 < dz < 80.0:
                spots.append(view.centre + view.r_c2w @ np.array([(u - view.cx) / view.f, (v - view.cy) / view.f, 1.0]) * dz)
        sheet_photos.append((view, megadepth.raw_image_path(md_root, scene, "0", name), spots))
        vv, uu = np.nonzero(depth > 0)
        if vv.size == 0:
            continue
        srng = np.random.default_rng([seed, 23, len(true_views), 2])
        for p in srng.choice(vv.size, size=min(per_photo, vv.size), replace=False):
            u, v = uu[p] + 0.5, vv[p] + 0.5
            x_w = view.centre + view.r_c2w @ np.array([(u - view.cx) / view.f, (v - view.cy) / view.f, 1.0]) * depth[vv[p], uu[p]]
            samples.append((x_w, bgr[vv[p], uu[p], ::-1].copy()))
    render_s += time.perf_counter() - t0
    true_names = [j["name"] for j in true_jobs]
    pts2d, tracks = synthetic_world._tracks(true_views, [gt_depths / f"{Path(n).stem}.h5" for n in true_names], [x for x, _ in samples])
    points = [(a_wf @ x_w + b_wf, colour, track) for (x_w, colour), track in zip(samples, tracks)]

    # ---- models: MegaDepth's (all photos, raw distorted cameras, its similarity frame) and the truth
    md_cams, md_images, gt_photo_cams, gt_photo_images = [], [], [], []
    true_index = {n: i for i, n in enumerate(true_names)}
    md_ids = {}
    for j, job in enumerate(jobs):
        iid = j + 1
        view, name = job["view"], job["name"]
        md_cams.append((iid, job["model"], view.width, view.height, job["params"]))
        r_first = a_wf @ view.r_c2w
        c_first = a_wf @ (view.centre + job["offset"]) + b_wf
        r_w2c, t_w2c = r_first.T, -r_first.T @ c_first
        r_md = r_w2c @ sim_r.T
        t_md = sim_s * t_w2c - r_md @ sim_t
        obs = []
        if name in true_index:
            ti = true_index[name]
            md_ids[ti + 1] = iid
            obs = distort_points(view, job["params"], job["dist"], pts2d[ti])
            gt_photo_cams.append((iid, "PINHOLE", view.width, view.height, [view.f, view.f, view.cx, view.cy]))
            gt_photo_images.append((iid, name, r_w2c, t_w2c, pts2d[ti]))
        md_images.append((iid, name, r_md, t_md, obs))
    points = [(x, c, [(md_ids[i], k) for i, k in tr]) for x, c, tr in points]  # true-photo ids -> image ids
    md_points = [(sim_s * sim_r @ x + sim_t, c, tr) for x, c, tr in points]
    synthetic_world._write_model(sfm_dir, md_cams, md_images, md_points)
    synthetic_world._write_model(layout.gt_sparse, gt_photo_cams + gt_cams, gt_photo_images + gt_images, points)
    distractor_list = [{"name": j["name"], "kind": j["kind"]} for j in jobs if j["kind"] != "true"]
    write_json_atomic(layout.gt_sparse.parent / DISTRACTORS_NAME, distractor_list, indent=2)
    write_json_atomic(layout.gt_sparse.parent / "photos.json", photo_meta, indent=2)
    photo_names = [j["name"] for j in jobs]
    scene_list = default_scene_list(md_root)
    write_json_atomic(scene_list, [{"scene": scene, "subscene": "0", "images": photo_names}], indent=2)
    _contact_sheet(root / CONTACT_SHEET, video_path, aer_views, sheet_photos, aer_depth_paths)

    info = synthetic_world.WorldInfo(
        root=root, scene=scene, seed=seed, origin=(lat0, lon0, alt0), first_frame_origin=first_geo,
        width=width, height=height, n_frames=n_aerial, n_photos=n_ground, video_path=video_path, json_path=json_path,
        megadepth_root=md_root, sfm_dir=sfm_dir, images_dir=img_dir, depths_dir=md_depth_dir,
        scene_list_path=scene_list, gt_sparse_dir=layout.gt_sparse, gt_depths_dir=gt_depths, photo_names=photo_names,
        frame_names=frame_names, sim_scale=sim_s, sim_rotation=sim_r.tolist(), sim_translation=sim_t.tolist(),
        render_seconds=render_s, total_seconds=time.perf_counter() - t_start, params=params,
        distractors=[d["name"] for d in distractor_list])
    write_json_atomic(root / synthetic_world.INFO_NAME, info.to_json(), indent=2)
    write_text_atomic(root / synthetic_world.MARKER, "ok\n")
    return info


def read_distractors(gt_dir: Path) -> dict[str, str]:
    """Distractor photo name -> kind from a ground-truth folder (``{}`` when it lists none)."""
    path = Path(gt_dir) / DISTRACTORS_NAME
    if not path.is_file():
        return {}
    return {d["name"]: d["kind"] for d in json.loads(path.read_text())}


__all__ = ["generate_realistic", "read_distractors", "world_models", "degraded_copy", "make_props", "cast_view", "shade",
           "PHOTO_SIZES", "PHOTO_MAX_PIXELS", "DISTRACTOR_KINDS", "DISTRACTORS_NAME", "CONTACT_SHEET"]
