"""CPU backend built from OpenCV pieces (the first CPU backend; PatchMatch, :mod:`.patchmatch`, is the
default now). For a reference image and each of its source views: when the epipole lies well
outside the reference view (sideways motion) the pair is rectified from the known relative pose
and matched with ``cv2.StereoSGBM`` (left-right check), disparities become depth on the reference
grid; otherwise (forward motion) a multi-direction plane sweep (fronto-parallel and ground planes,
NCC, winner-take-all) gives the estimate. Per pixel the median of the per-source estimates that
agree within ``rel_tolerance`` is kept where at least ``min_consistent`` agree. Rectification is
computed here (not with ``cv2.stereoRectify``, which picks a vertical rectification when the
baseline is more vertical and whose cropping ignores the overlap)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tasks.aerial.dense.config import DenseConfig, DenseError
from tasks.aerial.dense.io import depth_path, read_depth_h5, write_depth_h5, write_ply_points
from tasks.aerial.dense.views import _Cam, _angle, _cam, _posed_ids, _prior_points, select_sources
from tasks.aerial.dense.workspace import Workspace, open_workspace

log = logging.getLogger(__name__)

def _scaled_K(K: np.ndarray, sx: float, sy: float) -> np.ndarray:
    return np.diag([sx, sy, 1.0]) @ K


def _cv_homography(H: np.ndarray) -> np.ndarray:
    """COLMAP-convention homography (pixel centres at +0.5) -> OpenCV index convention."""
    return np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]]) @ H @ np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])


def _border_rays(K: np.ndarray, width: int, height: int, n: int = 33) -> np.ndarray:
    """Camera rays (z = 1) through ``n`` points along each image edge."""
    s = np.linspace(0.0, 1.0, n)
    pts = np.concatenate([
        np.stack([s * width, np.zeros(n)], 1), np.stack([s * width, np.full(n, height)], 1),
        np.stack([np.zeros(n), s * height], 1), np.stack([np.full(n, width), s * height], 1)])
    return np.c_[pts, np.ones(len(pts))] @ np.linalg.inv(K).T


def _rect_extent(rays_rect: np.ndarray, f: float, cap: float) -> tuple[float, float, float, float] | None:
    """(x0, x1, y0, y1) of rectified-plane coordinates (principal point at 0) of the border rays,
    clipped to [-cap, cap]; None when the view looks away from the rectified axis."""
    z = rays_rect[:, 2]
    ok = z > 0.05 * np.linalg.norm(rays_rect, axis=1)
    if ok.mean() < 0.5:
        return None
    x = f * rays_rect[ok, 0] / z[ok]
    y = f * rays_rect[ok, 1] / z[ok]
    if not ok.all():  # part of the border turns away: the view extends without bound there
        return (-cap, cap, -cap, cap)
    return (float(np.clip(x.min(), -cap, cap)), float(np.clip(x.max(), -cap, cap)),
            float(np.clip(y.min(), -cap, cap)), float(np.clip(y.max(), -cap, cap)))


def _sgbm(cfg: DenseConfig, min_disp: int, num_disp: int) -> Any:
    bs = int(cfg.sgbm.block_size) | 1
    mode = {"sgbm": cv2.StereoSGBM_MODE_SGBM, "3way": cv2.StereoSGBM_MODE_SGBM_3WAY,
            "hh": cv2.StereoSGBM_MODE_HH}[cfg.sgbm.mode.lower()]
    return cv2.StereoSGBM_create(minDisparity=int(min_disp), numDisparities=int(num_disp), blockSize=bs,
                                 P1=8 * 3 * bs * bs, P2=32 * 3 * bs * bs, disp12MaxDiff=-1, preFilterCap=31,
                                 uniquenessRatio=int(cfg.sgbm.uniqueness),
                                 speckleWindowSize=int(cfg.sgbm.speckle_window),
                                 speckleRange=int(cfg.sgbm.speckle_range), mode=mode)


def _texture_mask(img: np.ndarray, min_std: float) -> np.ndarray:
    g = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float32)
    m = cv2.blur(g, (5, 5))
    v = cv2.blur(g * g, (5, 5)) - m * m
    return v > min_std * min_std


def _pair_depth(ws: Workspace, ref: _Cam, src: _Cam, cfg: DenseConfig, prior_xyz: np.ndarray | None,
                info: dict) -> np.ndarray | None:
    """Depth of the reference (full resolution, z in the reference camera, NaN = none) from one
    rectified stereo pair with ``src``; None when the pair cannot be rectified usefully."""
    info["method"] = "rectified"
    size = cfg.sgbm.max_image_size
    img_r, s_r = ws.image(ref.name, size)
    img_s, s_s = ws.image(src.name, size)
    Kr = _scaled_K(ref.K, img_r.shape[1] / ref.width, img_r.shape[0] / ref.height)
    Ks = _scaled_K(src.K, img_s.shape[1] / src.width, img_s.shape[0] / src.height)

    base = src.centre - ref.centre
    b = float(np.linalg.norm(base))
    if b < 1e-9:
        return None
    ex = base / b
    if min(_angle(ex, ref.axis), _angle(-ex, ref.axis)) < cfg.sgbm.min_baseline_angle:
        info["reason"] = "epipole inside the reference view"
        return None
    z0 = ref.axis + src.axis
    z0 = z0 - (z0 @ ex) * ex
    if np.linalg.norm(z0) < 1e-6:
        return None
    ez = z0 / np.linalg.norm(z0)
    ey = np.cross(ez, ex)
    R_rect = np.stack([ex, ey, ez])  # world -> rectified (both views)
    R_rl = R_rect @ ref.R.T  # reference camera -> rectified
    R_rs = R_rect @ src.R.T
    f = float(np.sqrt(Kr[0, 0] * Kr[1, 1]))

    # --- disparity range at the working scale: d_true = f b / Z_rect (Z_rect: rectified depth)
    zz = np.zeros(0)
    if prior_xyz is not None and len(prior_xyz):
        zz = ((prior_xyz - ref.centre) @ R_rect.T)[:, 2]
        zz = zz[zz > 0]
    if cfg.depth_min:
        d_hi = f * b / cfg.depth_min
    elif zz.size >= 5:
        d_hi = f * b / (float(np.percentile(zz, 2)) / cfg.prior_near_pad)
    else:
        d_hi = cfg.sgbm.fallback_disparity_fraction * img_r.shape[1]
    if cfg.depth_max:
        d_lo = f * b / cfg.depth_max
    elif cfg.prior_far_pad and zz.size >= 5:
        d_lo = f * b / (float(np.percentile(zz, 98)) * cfg.prior_far_pad)
    else:
        d_lo = 0.0  # up to infinity (distant terrain, horizon)
    d_lo, d_hi = max(0.0, d_lo - 2.0), d_hi + 2.0
    max_nd = max(16, int(cfg.sgbm.max_disparities) // 16 * 16)
    # a range wider than max_nd: match this pair at a coarser scale (down to min_pair_scale)
    s_pair = float(np.clip(max_nd / max(d_hi - d_lo, 1e-6), cfg.sgbm.min_pair_scale, 1.0))
    if s_pair < 0.999:
        img_r = cv2.resize(img_r, (max(16, round(img_r.shape[1] * s_pair)), max(16, round(img_r.shape[0] * s_pair))),
                           interpolation=cv2.INTER_AREA)
        img_s = cv2.resize(img_s, (max(16, round(img_s.shape[1] * s_pair)), max(16, round(img_s.shape[0] * s_pair))),
                           interpolation=cv2.INTER_AREA)
        Kr = _scaled_K(ref.K, img_r.shape[1] / ref.width, img_r.shape[0] / ref.height)
        Ks = _scaled_K(src.K, img_s.shape[1] / src.width, img_s.shape[0] / src.height)
        s_eff = float(np.sqrt(Kr[0, 0] * Kr[1, 1])) / f
        f, d_lo, d_hi = f * s_eff, d_lo * s_eff, d_hi * s_eff
    if d_hi - d_lo > max_nd:  # still too wide: keep the window around the median prior disparity
        mid = f * b / float(np.median(zz)) if zz.size else 0.5 * (d_lo + d_hi)
        d_lo = max(0.0, mid - max_nd / 2)
        d_hi = d_lo + max_nd
    num_disp = int(min(max_nd, max(16, math.ceil((d_hi - d_lo) / 16.0) * 16)))
    info["pair_scale"] = round(s_pair, 3)

    cap = cfg.sgbm.max_rect_factor * max(img_r.shape[:2])
    ext_l = _rect_extent(_border_rays(Kr, img_r.shape[1], img_r.shape[0]) @ R_rl.T, f, cap)
    ext_r = _rect_extent(_border_rays(Ks, img_s.shape[1], img_s.shape[0]) @ R_rs.T, f, cap)
    if ext_l is None or ext_r is None:
        info["reason"] = "views turn away from the rectified axis"
        return None
    y0, y1 = max(ext_l[2], ext_r[2]), min(ext_l[3], ext_r[3])
    if y1 - y0 < 16:
        info["reason"] = "no common rows"
        return None
    xl0, xl1 = ext_l[0], ext_l[1]
    # d_obs = x_l - x_r = d_true + (cx_l - cx_r); choose cx_r so that d_obs starts at 0
    pad = num_disp
    cx_l = pad - xl0
    cx_r = cx_l + d_lo
    cy = -y0
    width = int(math.ceil(pad + (xl1 - xl0) + num_disp))
    height = int(math.ceil(y1 - y0))
    K_l = np.array([[f, 0, cx_l], [0, f, cy], [0, 0, 1.0]])
    K_r = np.array([[f, 0, cx_r], [0, f, cy], [0, 0, 1.0]])
    H_l = K_l @ R_rl @ np.linalg.inv(Kr)
    H_r = K_r @ R_rs @ np.linalg.inv(Ks)
    rect_l = cv2.warpPerspective(img_r, _cv_homography(H_l), (width, height), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT)
    rect_r = cv2.warpPerspective(img_s, _cv_homography(H_r), (width, height), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT)
    ones_l = np.full(img_r.shape[:2], 255, np.uint8)
    ones_r = np.full(img_s.shape[:2], 255, np.uint8)
    mask_l = cv2.warpPerspective(ones_l, _cv_homography(H_l), (width, height), flags=cv2.INTER_NEAREST) > 0
    mask_r = cv2.warpPerspective(ones_r, _cv_homography(H_r), (width, height), flags=cv2.INTER_NEAREST) > 0
    mask_l = cv2.erode(mask_l.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    mask_r = cv2.erode(mask_r.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0

    sgbm = _sgbm(cfg, 0, num_disp)
    disp_l = sgbm.compute(rect_l, rect_r).astype(np.float32) / 16.0
    disp_r = sgbm.compute(rect_r[:, ::-1].copy(), rect_l[:, ::-1].copy()).astype(np.float32)[:, ::-1] / 16.0
    valid = (disp_l >= 0) & mask_l
    info["sgbm_valid"] = round(float(valid.sum() / max(1, mask_l.sum())), 3)
    if cfg.sgbm.min_texture > 0:
        valid &= _texture_mask(rect_l, cfg.sgbm.min_texture)
    # left-right check: the right view's disparity at x - d must agree
    xs = np.arange(width, dtype=np.float32)[None, :] - disp_l
    xi = np.rint(xs).astype(np.int64)
    inside = (xi >= 0) & (xi < width)
    xi = np.clip(xi, 0, width - 1)
    rows = np.arange(height)[:, None]
    d_back = disp_r[rows, xi]
    valid &= inside & mask_r[rows, xi] & (d_back >= 0) & (np.abs(d_back - disp_l) <= cfg.sgbm.lr_max_diff)
    d_true = disp_l - (cx_l - cx_r)  # f b / Z_rect
    valid &= d_true > 0.25
    disp = np.where(valid, d_true, 0.0).astype(np.float32)
    info["num_disparities"] = num_disp
    info["rect_size"] = (width, height)
    info["rect_valid"] = round(float(valid.sum() / max(1, mask_l.sum())), 3)

    # --- back onto the full-resolution reference grid
    H_full = K_l @ R_rl @ np.linalg.inv(ref.K)
    uu, vv = np.meshgrid(np.arange(ref.width) + 0.5, np.arange(ref.height) + 0.5)
    pix = np.stack([uu, vv, np.ones_like(uu)], -1)
    q = pix @ H_full.T
    mx = (q[..., 0] / q[..., 2] - 0.5).astype(np.float32)
    my = (q[..., 1] / q[..., 2] - 0.5).astype(np.float32)
    d_near = cv2.remap(disp, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    d_lin = cv2.remap(disp, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    w_lin = cv2.remap(valid.astype(np.float32), mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                      borderValue=0)
    use_lin = (w_lin > 0.999) & (np.abs(d_lin - d_near) < 1.0)
    d = np.where(use_lin, d_lin, d_near)
    ray_z = (pix @ np.linalg.inv(ref.K).T @ R_rl.T)[..., 2]  # rectified z of the reference ray with z_ref = 1
    with np.errstate(divide="ignore", invalid="ignore"):
        z_rect = f * b / d
        depth = z_rect / ray_z
    ok = (d > 0) & (ray_z > 0) & np.isfinite(depth) & (depth > 0) & (q[..., 2] > 0)
    return np.where(ok, depth, np.nan).astype(np.float32)


def _to_full_grid(est: np.ndarray, ref: _Cam) -> np.ndarray:
    """Nearest-neighbour map of a working-scale reference map onto the full-resolution grid."""
    h, w = est.shape
    if (h, w) == (ref.height, ref.width):
        return est
    mx = ((np.arange(ref.width) + 0.5) * (w / ref.width) - 0.5).astype(np.float32)
    my = ((np.arange(ref.height) + 0.5) * (h / ref.height) - 0.5).astype(np.float32)
    mx, my = np.meshgrid(mx, my)
    return cv2.remap(est, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)


def _sweep_family(gr: np.ndarray, gs: np.ndarray, A: np.ndarray, B: np.ndarray, pix: np.ndarray,
                  w_lo: float, w_hi: float, cfg: DenseConfig) -> dict | None:
    """One plane family ``H(w) = A + w B`` (reference pixel -> source pixel), ``w`` from ``w_lo`` to
    ``w_hi``: per pixel the best zero-mean NCC, the margin to the best clearly different plane, the
    refined ``w`` and the relative precision of the resulting depth."""
    h, w = gr.shape

    def project(wv):
        q = pix @ A.T + np.asarray(wv)[..., None] * (pix @ B.T)
        with np.errstate(divide="ignore", invalid="ignore"):
            return q[..., 0] / q[..., 2], q[..., 1] / q[..., 2], q[..., 2]

    xn, yn, dn = project(w_hi)
    xf, yf, df = project(w_lo)
    span = np.hypot(xn - xf, yn - yf)
    span = span[(dn > 0) & (df > 0) & np.isfinite(span)]
    if span.size < 0.01 * h * w:
        return None
    n_planes = int(np.clip(math.ceil(float(np.percentile(span, 95)) / cfg.sgbm.sweep_step_px) + 1, 16,
                           cfg.sgbm.sweep_max_planes))
    win = (int(cfg.sgbm.sweep_window) | 1,) * 2
    kernel = np.ones(win, np.uint8)
    mr = cv2.boxFilter(gr, -1, win, borderType=cv2.BORDER_REFLECT)
    vr = cv2.boxFilter(gr * gr, -1, win, borderType=cv2.BORDER_REFLECT) - mr * mr
    best = np.full((h, w), -np.inf, np.float32)
    second = np.full((h, w), -1.0, np.float32)
    best_k = np.full((h, w), -10, np.int32)
    prev = np.full((h, w), np.nan, np.float32)
    nxt = np.full((h, w), np.nan, np.float32)
    last = np.full((h, w), np.nan, np.float32)
    ones_s = np.full(gs.shape, 255, np.uint8)
    gap = max(2, n_planes // 32)
    row3 = (pix @ A.T)[..., 2], (pix @ B.T)[..., 2]
    min_var = cfg.sgbm.sweep_min_std ** 2
    for k, wk in enumerate(np.linspace(w_lo, w_hi, n_planes)):
        Hcv = _cv_homography(A + wk * B)
        warped = cv2.warpPerspective(gs, Hcv, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        inside = cv2.warpPerspective(ones_s, Hcv, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        ms = cv2.boxFilter(warped, -1, win, borderType=cv2.BORDER_REFLECT)
        vs = cv2.boxFilter(warped * warped, -1, win, borderType=cv2.BORDER_REFLECT) - ms * ms
        cov = cv2.boxFilter(gr * warped, -1, win, borderType=cv2.BORDER_REFLECT) - mr * ms
        with np.errstate(invalid="ignore", divide="ignore"):
            ncc = cov / np.sqrt(np.maximum(vr * vs, 1e-3))
        ncc[((row3[0] + wk * row3[1]) <= 0) | (cv2.erode(inside, kernel) == 0) | ~(vs > min_var)] = np.nan
        just = best_k == k - 1
        nxt[just] = ncc[just]
        upd = ncc > best
        far_old = upd & (best_k < k - gap)  # the old best becomes the best clearly different plane
        second[far_old] = np.maximum(second[far_old], best[far_old])
        stay = ~upd & (best_k < k - gap) & (ncc > second)
        second[stay] = ncc[stay]
        prev[upd] = last[upd]
        nxt[upd] = np.nan
        best[upd] = ncc[upd]
        best_k[upd] = k
        last = ncc
    with np.errstate(invalid="ignore", divide="ignore"):
        den = 2.0 * (2.0 * best - prev - nxt)
        delta = np.where(np.isfinite(den) & (den > 1e-6), (nxt - prev) / den, 0.0)
    delta = np.clip(delta, -0.5, 0.5)
    wsol = w_lo + (w_hi - w_lo) * (best_k + delta) / max(1, n_planes - 1)
    x0, y0, d0 = project(wsol)
    dw = 1e-3 * (w_hi - w_lo)
    x1, y1, _ = project(wsol + dw)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel_err = cfg.sgbm.sweep_sigma_px / (np.hypot(x1 - x0, y1 - y0) / dw * np.abs(wsol))
    ok = ((best >= cfg.sgbm.sweep_min_ncc) & (best - second >= cfg.sgbm.sweep_min_margin) & (best_k > 0)
          & (best_k < n_planes - 1) & (vr > min_var) & (d0 > 0) & np.isfinite(rel_err)
          & (rel_err <= cfg.sgbm.sweep_max_rel_error))
    return {"best": np.where(ok, best, -np.inf), "w": wsol, "ok": ok, "planes": n_planes}


def _pair_depth_sweep(ws: Workspace, ref: _Cam, src: _Cam, cfg: DenseConfig, prior_xyz: np.ndarray | None,
                      info: dict) -> np.ndarray | None:
    """Depth of the reference from one source by multi-direction plane sweeping (as for urban
    street-level video): fronto-parallel planes of the reference and horizontal (ground) planes,
    each family uniform in inverse distance; zero-mean NCC over a square window; per pixel the best
    plane over both families, with parabolic refinement within its family. Used for pairs that
    cannot be rectified usefully (forward motion: the epipole lies in the image). Pixels that are
    untextured, ambiguous (a clearly different plane scores almost as well), poorly conditioned
    (too little parallax for ``sweep_max_rel_error``) or with a low NCC are NaN."""
    info["method"] = "sweep"
    size = min(cfg.sgbm.max_image_size, int(cfg.sgbm.sweep_max_size))
    img_r, _ = ws.image(ref.name, size)
    img_s, _ = ws.image(src.name, size)
    h, w = img_r.shape[:2]
    Kr = _scaled_K(ref.K, w / ref.width, h / ref.height)
    Ks = _scaled_K(src.K, img_s.shape[1] / src.width, img_s.shape[0] / src.height)
    gr = cv2.cvtColor(img_r, cv2.COLOR_BGR2GRAY).astype(np.float32)
    gs = cv2.cvtColor(img_s, cv2.COLOR_BGR2GRAY).astype(np.float32)
    R_sr = src.R @ ref.R.T
    t_sr = src.t - R_sr @ ref.t
    b = float(np.linalg.norm(t_sr))
    if b < 1e-9:
        return None
    Kr_inv = np.linalg.inv(Kr)
    A = Ks @ R_sr @ Kr_inv
    uu, vv = np.meshgrid(np.arange(w, dtype=np.float64) + 0.5, np.arange(h, dtype=np.float64) + 0.5)
    pix = np.stack([uu, vv, np.ones_like(uu)], -1)
    rays = pix @ Kr_inv.T  # z = 1
    xr = None if prior_xyz is None or not len(prior_xyz) else prior_xyz @ ref.R.T + ref.t  # reference frame
    ahead = float(-(R_sr.T @ t_sr)[2])  # how far the source sits in front of the reference

    families = []
    # fronto-parallel planes z = 1 / w
    zz = np.zeros(0) if xr is None else xr[:, 2][xr[:, 2] > 0]
    if cfg.depth_min:
        z_near = float(cfg.depth_min)
    elif zz.size >= 5:
        z_near = float(np.percentile(zz, 2)) / cfg.prior_near_pad
    else:  # nearer points would be seen under more than the largest triangulation angle
        z_near = b / math.tan(math.radians(max(cfg.max_triangulation_angle, 1.0)))
    z_near = max(z_near, 1.25 * ahead)  # nearer planes lie behind the source
    if cfg.depth_max:
        w_far = 1.0 / float(cfg.depth_max)
    elif cfg.prior_far_pad and zz.size >= 5:
        w_far = 1.0 / (float(np.percentile(zz, 98)) * cfg.prior_far_pad)
    else:
        w_far = 0.0  # the plane at infinity
    if 1.0 / z_near > w_far:
        families.append(("fronto", np.array([0.0, 0.0, 1.0]), w_far, 1.0 / z_near))
    # ground planes n . X = d below the camera (n: world down in the reference frame)
    if cfg.sgbm.sweep_ground and xr is not None:
        n_down = ref.R @ (-ws.up)
        dd = xr @ n_down
        dd = dd[dd > 0]
        if dd.size >= 5:
            d_lo = float(np.percentile(dd, 2)) / cfg.prior_near_pad
            d_hi = float(np.percentile(dd, 98)) * cfg.prior_near_pad
            families.append(("ground", n_down, 1.0 / d_hi, 1.0 / d_lo))
    if not families:
        info["reason"] = "no depth range"
        return None

    best = np.full((h, w), -np.inf, np.float32)
    depth = np.full((h, w), np.nan, np.float32)
    if cfg.sgbm.sweep_min_center_std > 0:  # against foreground fattening onto untextured background (sky)
        m3 = cv2.blur(gr, (3, 3))
        flat = (cv2.blur(gr * gr, (3, 3)) - m3 * m3) < cfg.sgbm.sweep_min_center_std ** 2
        best[flat] = np.inf  # nothing can win there
    planes = {}
    for name, n_ref, w_lo, w_hi in families:
        B = Ks @ np.outer(t_sr, n_ref) @ Kr_inv
        fam = _sweep_family(gr, gs, A, B, pix, w_lo, w_hi, cfg)
        if fam is None:
            continue
        planes[name] = fam["planes"]
        with np.errstate(invalid="ignore", divide="ignore"):
            z = 1.0 / (fam["w"] * (rays @ n_ref))
        take = fam["ok"] & (fam["best"] > best) & np.isfinite(z) & (z > 0)
        best[take] = fam["best"][take]
        depth[take] = z[take]
    if not planes:
        info["reason"] = "the source does not see the reference's scene"
        return None
    info["num_planes"] = planes
    info["rect_valid"] = round(float(np.isfinite(depth).mean()), 3)
    return _to_full_grid(depth, ref)


def fuse_depths(estimates: np.ndarray, rel_tolerance: float, min_consistent: int) -> tuple[np.ndarray, np.ndarray]:
    """Fuse per-source depth maps ``(n, H, W)`` (NaN or 0 = none): per pixel, the estimate with
    the most others within ``rel_tolerance`` (relative) defines the agreeing set, the result is
    the set's median where it has at least ``min_consistent`` members, else 0.
    Returns (depth HxW float32, number of agreeing estimates HxW)."""
    e = np.asarray(estimates, np.float32)
    if e.ndim != 3 or e.shape[0] == 0:
        raise ValueError("estimates must be (n, H, W) with n >= 1")
    e = np.where(np.isfinite(e) & (e > 0), e, np.nan)
    n = e.shape[0]
    counts = np.zeros(e.shape, np.int16)
    for i in range(n):
        for j in range(n):
            with np.errstate(invalid="ignore"):
                counts[i] += np.abs(e[i] - e[j]) <= rel_tolerance * e[i]
    best = np.argmax(counts, axis=0)
    ref_val = np.take_along_axis(e, best[None], 0)[0]
    with np.errstate(invalid="ignore"):
        member = np.abs(e - ref_val[None]) <= rel_tolerance * ref_val[None]
    n_agree = member.sum(0)
    srt = np.sort(np.where(member, e, np.nan), axis=0)  # NaN sort last
    lo = np.clip((n_agree - 1) // 2, 0, n - 1)[None]
    hi = np.clip(n_agree // 2, 0, n - 1)[None]
    med = 0.5 * (np.take_along_axis(srt, lo, 0)[0] + np.take_along_axis(srt, hi, 0)[0])
    keep = (n_agree >= max(1, min_consistent)) & np.isfinite(med)
    return np.where(keep, med, 0.0).astype(np.float32), np.where(keep, n_agree, 0).astype(np.int16)


def depth_cpu(workspace: Path | Workspace, image_name: str, config: DenseConfig | None = None,
              info: dict | None = None) -> np.ndarray:
    """CPU multi-view depth of one workspace image: float32 HxW (full image size), metres along the
    camera z axis, 0 = unknown. ``info`` (optional dict) receives the sources used and per-pair
    diagnostics. Raises FileNotFoundError / DenseError when the reference image cannot be read."""
    cfg = config or DenseConfig()
    ws = open_workspace(workspace)
    if image_name not in ws.by_name:
        raise DenseError(f"{image_name}: not in the workspace model {ws.path / 'sparse'}")
    info = {} if info is None else info
    rec = ws.rec
    ref = _cam(rec, ws.by_name[image_name])
    ws.image(image_name, cfg.sgbm.max_image_size)  # raises for a missing / corrupt reference
    unusable = {iid for iid in _posed_ids(rec) if not (ws.path / "images" / rec.images[iid].name).is_file()}
    cands = select_sources(rec, ref.image_id, max(1, cfg.num_sources) * max(1, cfg.sgbm.candidate_factor),
                           cfg.min_triangulation_angle, cfg.max_triangulation_angle, cfg.max_view_angle,
                           cfg.max_scale_ratio, exclude=unusable,
                           work_size=cfg.sgbm.max_image_size if cfg.scale_ratio_at_working_size else None)
    prior = _prior_points(rec, ref)
    estimates, pairs = [], []
    for j in cands:
        if len(estimates) >= cfg.num_sources:
            break
        src = _cam(rec, j)
        pinfo: dict = {"source": src.name}
        try:
            est = _pair_depth(ws, ref, src, cfg, prior, pinfo)
            if est is None and cfg.sgbm.sweep_fallback:
                pinfo["rectify"] = pinfo.pop("reason", "not rectifiable")
                est = _pair_depth_sweep(ws, ref, src, cfg, prior, pinfo)
        except (FileNotFoundError, DenseError, cv2.error) as exc:  # a bad source only loses that pair
            pinfo["reason"] = str(exc)
            est = None
        pairs.append(pinfo)
        if est is not None:
            pinfo["valid"] = float(np.isfinite(est).mean())
            estimates.append(est)
    info["sources"] = [p["source"] for p in pairs if "valid" in p]
    info["pairs"] = pairs
    if not estimates:
        info["note"] = "no usable source view"
        return np.zeros((ref.height, ref.width), np.float32)
    depth, _ = fuse_depths(np.stack(estimates), cfg.sgbm.rel_tolerance, cfg.sgbm.min_consistent)
    return depth


def _existing_depth(path: Path, shape: tuple[int, int] | None) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        d = read_depth_h5(path)
    except Exception:  # noqa: BLE001 - unreadable: recompute
        return None
    if shape is not None and d.shape != shape:
        return None
    return d


def run_dense(workspace: Path | Workspace, image_names: list[str] | None, config: DenseConfig | None,
              depth_dir: Path) -> dict:
    """CPU backend over images of a workspace (all model images by default, sorted by name).

    Writes ``depth_dir/<stem>.h5`` per image; an image whose file already exists and loads with the
    right size is skipped (resumable). Returns ``{"stats": {name: {"valid_fraction", "seconds",
    "sources", "skipped"}}, "failures": {name: reason}}``; one bad image never stops the others."""
    cfg = config or DenseConfig()
    ws = open_workspace(workspace)
    depth_dir = Path(depth_dir)
    names = sorted(ws.by_name) if image_names is None else list(image_names)
    stats: dict[str, dict] = {}
    failures: dict[str, str] = {}
    for name in names:
        t0 = time.perf_counter()
        out = depth_path(depth_dir, name)
        shape = None
        if name in ws.by_name:
            c = _cam(ws.rec, ws.by_name[name])
            shape = (c.height, c.width)
        old = _existing_depth(out, shape)
        if old is not None:
            stats[name] = {"valid_fraction": float((old > 0).mean()), "seconds": time.perf_counter() - t0,
                           "sources": [], "skipped": True}
            continue
        info: dict = {}
        try:
            depth = depth_cpu(ws, name, cfg, info=info)
            write_depth_h5(out, depth)
        except Exception as exc:  # noqa: BLE001 - one image never sinks the others
            failures[name] = f"{type(exc).__name__}: {exc}"
            log.warning("dense cpu: %s failed: %s", name, failures[name])
            continue
        stats[name] = {"valid_fraction": float((depth > 0).mean()), "seconds": time.perf_counter() - t0,
                       "sources": info.get("sources", []), "skipped": False}
        if "note" in info:
            stats[name]["note"] = info["note"]
    return {"stats": stats, "failures": failures}


def fused_point_cloud_cpu(workspace: Path | Workspace, depth_dir: Path, output: Path | None = None,
                          image_names: list[str] | None = None, stride: int = 2) -> Path:
    """Back-project the depth maps of ``depth_dir`` (every ``stride``-th pixel) into the model frame
    and write ``fused.ply`` (default ``workspace/fused.ply``), coloured from the images."""
    ws = open_workspace(workspace)
    workspace = ws.path
    output = Path(output) if output is not None else workspace / "fused.ply"
    names = sorted(ws.by_name) if image_names is None else list(image_names)
    xyz_all, rgb_all = [], []
    for name in names:
        p = depth_path(Path(depth_dir), name)
        if name not in ws.by_name or not p.is_file():
            continue
        c = _cam(ws.rec, ws.by_name[name])
        d = read_depth_h5(p)[::stride, ::stride]
        vv, uu = np.nonzero(d > 0)
        if vv.size == 0:
            continue
        z = d[vv, uu].astype(float)
        u = uu * stride + 0.5
        v = vv * stride + 0.5
        rays = np.stack([u, v, np.ones_like(u)], 1) @ np.linalg.inv(c.K).T
        xyz = (rays * z[:, None] - c.t) @ c.R  # R^T (x_cam - t)
        img = cv2.imread(str(Path(workspace) / "images" / name), cv2.IMREAD_COLOR)
        if img is not None and img.shape[:2] == (c.height, c.width):
            rgb = img[vv * stride, uu * stride][:, ::-1]
        else:
            rgb = np.full((len(z), 3), 200, np.uint8)
        xyz_all.append(xyz.astype(np.float32))
        rgb_all.append(rgb.astype(np.uint8))
    xyz = np.concatenate(xyz_all) if xyz_all else np.zeros((0, 3), np.float32)
    rgb = np.concatenate(rgb_all) if rgb_all else np.zeros((0, 3), np.uint8)
    return write_ply_points(output, xyz, rgb)


