"""Numba kernels of the CPU PatchMatch multi-view stereo (see :mod:`tasks.aerial.dense.patchmatch`).

The method is COLMAP's (Schönberger, Zheng, Frahm, Pollefeys, "Pixelwise View Selection for
Unstructured Multi-View Stereo", ECCV 2016), run with the red-black checkerboard schedule of
Gipuma (Galliani et al., ICCV 2015) so that every pixel of one colour can be updated in parallel
(``numba.prange`` over rows): a pixel only reads the hypotheses of pixels of the other colour.

Conventions of these kernels (the caller converts): pixel *index* coordinates (the centre of
pixel ``(row i, column j)`` is ``(j, i)``), intrinsics ``K`` already in that convention and at the
working size; for source ``s``, ``x_s = R[s] @ x_ref + t[s]``. A hypothesis is a depth ``d`` (z in
the reference camera) and a unit normal ``n`` in the reference camera facing it (``n . ray < 0``).
Its plane ``{X : n . X = n . (d ray)}`` induces the homography ``H = A[s] + b[s] m^T`` with
``A = K_s R K_r^-1``, ``b = K_s t`` and ``m = K_r^-T n / (n . d ray)``.

Cost of a hypothesis against one source: 1 - NCC of the bilateral-weighted reference window
(weights ``exp(-dI^2 / 2 sigma_c^2 - dx^2 / 2 sigma_s^2)``, precomputed once per image by
:func:`ref_windows`) with the source window warped by ``H`` (bilinear); 2 when the window leaves
the source or is flat. With ``geom`` on, the forward-backward reprojection error (pixels) through
the source's depth map, capped at ``geom_max``, is added with weight ``geom_weight`` (COLMAP's
geometric consistency). Over sources, the cost is the mean of the ``k_best`` lowest costs (view
selection per pixel, robust to occlusion).

Random numbers come from a counter-based hash of (seed, pixel, iteration, draw), so results do not
depend on how rows are spread over threads.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

BAD = 2.0  # cost of an impossible hypothesis (1 - NCC lies in [0, 2])

# propagation pattern: 4 near and 4 far neighbours, all of the other checkerboard colour
_NI = np.array([-1, 1, 0, 0, -5, 5, 0, 0], np.int64)
_NJ = np.array([0, 0, -1, 1, 0, 0, -5, 5], np.int64)


@njit(cache=True, inline="always")
def _rand(seed, i, j, it, k):
    """Uniform [0, 1) from a splitmix64 hash of the counters."""
    x = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(i) * np.uint64(0xBF58476D1CE4E5B9) \
        + np.uint64(j) * np.uint64(0x94D049BB133111EB) + np.uint64(it * 64 + k) * np.uint64(0xD6E8FEB86659FD93)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return float(x >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True, inline="always")
def _bilinear(img, s, x, y, w, h):
    if x < 0.0 or y < 0.0 or x > w - 1.0 or y > h - 1.0:
        return -1.0
    x0 = int(x)
    y0 = int(y)
    if x0 > w - 2:
        x0 = w - 2
    if y0 > h - 2:
        y0 = h - 2
    fx = x - x0
    fy = y - y0
    a = img[s, y0, x0] * (1.0 - fx) + img[s, y0, x0 + 1] * fx
    b = img[s, y0 + 1, x0] * (1.0 - fx) + img[s, y0 + 1, x0 + 1] * fx
    return a * (1.0 - fy) + b * fy


@njit(parallel=True, cache=True, fastmath=True)
def ref_windows(ref, half, step, sigma_color, sigma_spatial):
    """Per pixel: normalised bilateral weights ``wn`` (HxWxK), weighted centred values times weight
    ``rcw`` (HxWxK) and the weighted variance ``var`` (HxW) of the reference window of
    ``(2 half + 1)^2`` samples ``step`` pixels apart (clamped at the border)."""
    h, w = ref.shape
    side = 2 * half + 1
    kk = side * side
    wn = np.empty((h, w, kk), np.float32)
    rcw = np.empty((h, w, kk), np.float32)
    var = np.empty((h, w), np.float32)
    ic = 1.0 / (2.0 * sigma_color * sigma_color)
    isp = 1.0 / (2.0 * sigma_spatial * sigma_spatial)
    for i in prange(h):
        vals = np.empty(kk, np.float64)
        ws = np.empty(kk, np.float64)
        for j in range(w):
            c = ref[i, j]
            tot = 0.0
            k = 0
            for a in range(-half, half + 1):
                y = min(max(i + a * step, 0), h - 1)
                for b in range(-half, half + 1):
                    x = min(max(j + b * step, 0), w - 1)
                    v = ref[y, x]
                    dd = (v - c) * (v - c)
                    sp = float((a * a + b * b) * step * step)
                    wt = math.exp(-dd * ic - sp * isp)
                    vals[k] = v
                    ws[k] = wt
                    tot += wt
                    k += 1
            mean = 0.0
            for k in range(kk):
                ws[k] /= tot
                mean += ws[k] * vals[k]
            vv = 0.0
            for k in range(kk):
                dv = vals[k] - mean
                vv += ws[k] * dv * dv
                wn[i, j, k] = ws[k]
                rcw[i, j, k] = ws[k] * dv
            var[i, j] = vv
    return wn, rcw, var


@njit(cache=True, fastmath=True, inline="always")
def _ncc_cost(hm, u, v, srcs, s, sw, sh, wn, rcw, vr, i, j, half, step):
    """1 - NCC of the window of reference pixel (i, j) against source ``s`` warped by ``hm`` (9)."""
    hx = hm[0] * u + hm[1] * v + hm[2]
    hy = hm[3] * u + hm[4] * v + hm[5]
    hz = hm[6] * u + hm[7] * v + hm[8]
    s1 = 0.0
    s2 = 0.0
    s12 = 0.0
    k = 0
    for a in range(-half, half + 1):
        dy = float(a * step)
        for b in range(-half, half + 1):
            dx = float(b * step)
            z = hz + hm[6] * dx + hm[7] * dy
            if z <= 1e-9:
                return BAD
            x = (hx + hm[0] * dx + hm[1] * dy) / z
            y = (hy + hm[3] * dx + hm[4] * dy) / z
            val = _bilinear(srcs, s, x, y, sw, sh)
            if val < 0.0:
                return BAD
            wt = wn[i, j, k]
            s1 += wt * val
            s2 += wt * val * val
            s12 += rcw[i, j, k] * val
            k += 1
    vs = s2 - s1 * s1
    if vs < 1e-7:
        return BAD
    ncc = s12 / math.sqrt(vr * vs)
    if ncc > 1.0:
        ncc = 1.0
    if ncc < -1.0:
        ncc = -1.0
    return 1.0 - ncc


@njit(cache=True, fastmath=True, inline="always")
def _geom_error(X0, X1, X2, u, v, s, R, t, Ks, Ksi, Kr, sdepth, sdw, sdh, gmax):
    """Forward-backward reprojection error (pixels) of the reference point X through source ``s``'s
    depth map; ``gmax`` when the source has no depth there."""
    y0 = R[s, 0, 0] * X0 + R[s, 0, 1] * X1 + R[s, 0, 2] * X2 + t[s, 0]
    y1 = R[s, 1, 0] * X0 + R[s, 1, 1] * X1 + R[s, 1, 2] * X2 + t[s, 1]
    y2 = R[s, 2, 0] * X0 + R[s, 2, 1] * X1 + R[s, 2, 2] * X2 + t[s, 2]
    if y2 <= 1e-9:
        return gmax
    px = (Ks[s, 0, 0] * y0 + Ks[s, 0, 1] * y1) / y2 + Ks[s, 0, 2]
    py = (Ks[s, 1, 1] * y1) / y2 + Ks[s, 1, 2]
    ix = int(px + 0.5)
    iy = int(py + 0.5)
    if px < -0.5 or py < -0.5 or ix >= sdw or iy >= sdh:
        return gmax
    ds = sdepth[s, iy, ix]
    if ds <= 0.0:
        return gmax
    # back-project the source pixel at the source's depth, then into the reference
    q0 = ds * (Ksi[s, 0, 0] * px + Ksi[s, 0, 1] * py + Ksi[s, 0, 2])
    q1 = ds * (Ksi[s, 1, 1] * py + Ksi[s, 1, 2])
    q2 = ds
    q0 -= t[s, 0]
    q1 -= t[s, 1]
    q2 -= t[s, 2]
    r0 = R[s, 0, 0] * q0 + R[s, 1, 0] * q1 + R[s, 2, 0] * q2
    r1 = R[s, 0, 1] * q0 + R[s, 1, 1] * q1 + R[s, 2, 1] * q2
    r2 = R[s, 0, 2] * q0 + R[s, 1, 2] * q1 + R[s, 2, 2] * q2
    if r2 <= 1e-9:
        return gmax
    bu = (Kr[0, 0] * r0 + Kr[0, 1] * r1) / r2 + Kr[0, 2]
    bv = (Kr[1, 1] * r1) / r2 + Kr[1, 2]
    e = math.sqrt((bu - u) * (bu - u) + (bv - v) * (bv - v))
    return e if e < gmax else gmax


@njit(cache=True, fastmath=True, inline="always")
def _plane_cost(i, j, d, n0, n1, n2, Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step, k_best, geom,
                gw, gmax, sdepth, sdwh, costs, hm):
    """Aggregated cost of hypothesis (d, n) at pixel (i, j): the mean of the ``k_best`` lowest
    per-source costs (NCC, plus the weighted forward-backward error in the geometric pass); the
    per-source costs go into ``costs``, ``hm`` (9 values) is scratch. One definition for both
    targets: the CPU kernels call it through :func:`_cost`, :mod:`.kernels_cuda` compiles it as a
    device function (a CUDA thread passes its local arrays)."""
    u = float(j)
    v = float(i)
    rx = Kri[0, 0] * u + Kri[0, 1] * v + Kri[0, 2]
    ry = Kri[1, 1] * v + Kri[1, 2]
    nr = n0 * rx + n1 * ry + n2
    c = d * nr
    if c > -1e-9:
        return BAD
    m0 = (Kri[0, 0] * n0) / c
    m1 = (Kri[0, 1] * n0 + Kri[1, 1] * n1) / c
    m2 = (Kri[0, 2] * n0 + Kri[1, 2] * n1 + n2) / c
    ns = A.shape[0]
    for s in range(ns):
        for r in range(3):
            hm[3 * r + 0] = A[s, r, 0] + b[s, r] * m0
            hm[3 * r + 1] = A[s, r, 1] + b[s, r] * m1
            hm[3 * r + 2] = A[s, r, 2] + b[s, r] * m2
        cs = _ncc_cost(hm, u, v, srcs, s, swh[s, 0], swh[s, 1], wn, rcw, var[i, j], i, j, half, step)
        if geom and sdwh[s, 0] > 0:
            cs += gw * _geom_error(d * rx, d * ry, d, u, v, s, R, t, Ks, Ksi, Kr, sdepth, sdwh[s, 0], sdwh[s, 1],
                                   gmax)
        costs[s] = cs
    # mean of the k_best lowest (insertion of the small list)
    kb = k_best if k_best < ns else ns
    tot = 0.0
    for q in range(kb):
        best = 1e30
        bi = 0
        for s in range(ns):
            if costs[s] < best:
                best = costs[s]
                bi = s
        tot += best
        costs[bi] = 1e30 + costs[bi]  # marked; restored below
    for s in range(ns):
        if costs[s] >= 1e30:
            costs[s] -= 1e30
    return tot / kb


@njit(cache=True, fastmath=True)
def _cost(i, j, d, n0, n1, n2, P, costs):
    """:func:`_plane_cost` with the kernel inputs ``P`` (a tuple) and its own scratch."""
    (Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step, k_best, geom, gw, gmax, sdepth,
     sdwh) = P
    hm = np.empty(9)
    return _plane_cost(i, j, d, n0, n1, n2, Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step, k_best,
                       geom, gw, gmax, sdepth, sdwh, costs, hm)


@njit(cache=True, fastmath=True, inline="always")
def _random_normal(seed, i, j, it, k, rx, ry):
    """A random unit normal facing the camera ray (rx, ry, 1)."""
    z = 2.0 * _rand(seed, i, j, it, k) - 1.0
    phi = 2.0 * math.pi * _rand(seed, i, j, it, k + 1)
    r2 = 1.0 - z * z
    r = math.sqrt(r2 if r2 > 0.0 else 0.0)  # no max(): the CUDA kernels compile this function too
    n0, n1, n2 = r * math.cos(phi), r * math.sin(phi), z
    if n0 * rx + n1 * ry + n2 > 0:
        n0, n1, n2 = -n0, -n1, -n2
    return n0, n1, n2


@njit(cache=True, fastmath=True, inline="always")
def _perturb_normal(n0, n1, n2, amount, seed, i, j, it, k, rx, ry):
    a0 = n0 + amount * (2.0 * _rand(seed, i, j, it, k) - 1.0)
    a1 = n1 + amount * (2.0 * _rand(seed, i, j, it, k + 1) - 1.0)
    a2 = n2 + amount * (2.0 * _rand(seed, i, j, it, k + 2) - 1.0)
    nn = math.sqrt(a0 * a0 + a1 * a1 + a2 * a2)
    a0, a1, a2 = a0 / nn, a1 / nn, a2 / nn
    if a0 * rx + a1 * ry + a2 >= -1e-3:  # would face away: keep the old one
        return n0, n1, n2
    return a0, a1, a2


@njit(cache=True, fastmath=True)
def _initialise_pixel(i, j, depth, normal, cost, Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step,
                      k_best, geom, gw, gmax, sdepth, sdwh, inv_min, inv_max, min_var, seed, costs, hm):
    """:func:`initialise` at pixel (i, j) (one definition for the CPU rows and the CUDA threads)."""
    if var[i, j] <= min_var:
        depth[i, j] = 0.0
        cost[i, j] = BAD
        return
    rx = Kri[0, 0] * j + Kri[0, 1] * i + Kri[0, 2]
    ry = Kri[1, 1] * i + Kri[1, 2]
    if depth[i, j] <= 0.0:
        inv = inv_max + (inv_min - inv_max) * _rand(seed, i, j, 0, 0)
        depth[i, j] = 1.0 / inv
        n0, n1, n2 = _random_normal(seed, i, j, 0, 1, rx, ry)
        normal[i, j, 0] = n0
        normal[i, j, 1] = n1
        normal[i, j, 2] = n2
    cost[i, j] = _plane_cost(i, j, depth[i, j], normal[i, j, 0], normal[i, j, 1], normal[i, j, 2], Kri, Kr, A, b, R, t,
                             Ks, Ksi, srcs, swh, wn, rcw, var, half, step, k_best, geom, gw, gmax, sdepth, sdwh, costs,
                             hm)


@njit(parallel=True, cache=True, fastmath=True)
def initialise(depth, normal, cost, P, inv_min, inv_max, min_var, seed):
    """Random hypotheses (uniform in inverse depth within the range, random facing normals) for
    every textured pixel of ``depth`` that is 0; costs of all hypotheses."""
    (Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step, k_best, geom, gw, gmax, sdepth,
     sdwh) = P
    h, w = depth.shape
    ns = A.shape[0]
    for i in prange(h):
        costs = np.empty(ns)
        hm = np.empty(9)
        for j in range(w):
            _initialise_pixel(i, j, depth, normal, cost, Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half,
                              step, k_best, geom, gw, gmax, sdepth, sdwh, inv_min, inv_max, min_var, seed, costs, hm)


@njit(cache=True, fastmath=True)
def _sweep_pixel(i, j, it, depth, normal, cost, Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step,
                 k_best, geom, gw, gmax, sdepth, sdwh, d_min, d_max, seed, pert, costs, hm):
    """:func:`sweep` at pixel (i, j): its 8 other-colour neighbours' planes, then 4 refinements,
    the cheapest kept (one definition for the CPU rows and the CUDA threads)."""
    h, w = depth.shape
    inv_min = 1.0 / d_max
    inv_max = 1.0 / d_min
    u = float(j)
    v = float(i)
    rx = Kri[0, 0] * u + Kri[0, 1] * v + Kri[0, 2]
    ry = Kri[1, 1] * v + Kri[1, 2]
    bd = float(depth[i, j])
    b0 = float(normal[i, j, 0])
    b1 = float(normal[i, j, 1])
    b2 = float(normal[i, j, 2])
    bc = float(cost[i, j])
    for q in range(8):
        ni = i + _NI[q]
        nj = j + _NJ[q]
        if ni < 0 or nj < 0 or ni >= h or nj >= w:
            continue
        dq = depth[ni, nj]
        if dq <= 0.0:
            continue
        m0 = normal[ni, nj, 0]
        m1 = normal[ni, nj, 1]
        m2 = normal[ni, nj, 2]
        qx = Kri[0, 0] * nj + Kri[0, 1] * ni + Kri[0, 2]
        qy = Kri[1, 1] * ni + Kri[1, 2]
        den = m0 * rx + m1 * ry + m2
        if den > -1e-6:
            continue
        dp = dq * (m0 * qx + m1 * qy + m2) / den
        if dp < d_min or dp > d_max:
            continue
        c = _plane_cost(i, j, dp, m0, m1, m2, Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step,
                        k_best, geom, gw, gmax, sdepth, sdwh, costs, hm)
        if c < bc:
            bc = c
            bd = dp
            b0 = m0
            b1 = m1
            b2 = m2
    # refinement (COLMAP: a random and a perturbed hypothesis, mixed with the current one)
    inv = inv_max + (inv_min - inv_max) * _rand(seed, i, j, it, 8)
    d_rand = 1.0 / inv
    r0, r1, r2 = _random_normal(seed, i, j, it, 9, rx, ry)
    d_pert = bd * (1.0 + pert * (2.0 * _rand(seed, i, j, it, 11) - 1.0))
    if d_pert < d_min or d_pert > d_max:
        d_pert = bd
    p0, p1, p2 = _perturb_normal(b0, b1, b2, pert, seed, i, j, it, 12, rx, ry)
    c0 = b0
    c1 = b1
    c2 = b2
    for q in range(4):
        if q == 0:
            dd, e0, e1, e2 = d_rand, c0, c1, c2
        elif q == 1:
            dd, e0, e1, e2 = bd, r0, r1, r2
        elif q == 2:
            dd, e0, e1, e2 = d_pert, p0, p1, p2
        else:
            dd, e0, e1, e2 = d_pert, c0, c1, c2
        c = _plane_cost(i, j, dd, e0, e1, e2, Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step,
                        k_best, geom, gw, gmax, sdepth, sdwh, costs, hm)
        if c < bc:
            bc = c
            bd = dd
            b0 = e0
            b1 = e1
            b2 = e2
    depth[i, j] = bd
    normal[i, j, 0] = b0
    normal[i, j, 1] = b1
    normal[i, j, 2] = b2
    cost[i, j] = bc


@njit(parallel=True, cache=True, fastmath=True)
def sweep(color, it, depth, normal, cost, P, d_min, d_max, min_var, seed, pert):
    """One half-iteration: every pixel of checkerboard ``color`` tries its 8 other-colour
    neighbours' planes (propagation) and 4 random refinements (a new depth, a new normal, and
    both perturbed by ``pert``), keeping the cheapest."""
    (Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step, k_best, geom, gw, gmax, sdepth,
     sdwh) = P
    h, w = depth.shape
    ns = A.shape[0]
    for i in prange(h):
        costs = np.empty(ns)
        hm = np.empty(9)
        for j in range((i + color) % 2, w, 2):
            if var[i, j] <= min_var:
                continue
            _sweep_pixel(i, j, it, depth, normal, cost, Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half,
                         step, k_best, geom, gw, gmax, sdepth, sdwh, d_min, d_max, seed, pert, costs, hm)


@njit(cache=True, fastmath=True)
def _consistent_sources(i, j, depth, normal, cen, Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step,
                        geom, gmax, sdepth, sdwh, min_ncc, geom_max_px, min_angle_cos, min_var, hm):
    """:func:`consistency` at pixel (i, j): how many sources confirm its depth (0 and the depth set
    to 0 where it has none or its plane faces away); one definition for both targets."""
    d = float(depth[i, j])
    if d <= 0.0 or var[i, j] <= min_var:
        depth[i, j] = 0.0
        return 0
    u = float(j)
    v = float(i)
    rx = Kri[0, 0] * u + Kri[0, 1] * v + Kri[0, 2]
    ry = Kri[1, 1] * v + Kri[1, 2]
    n0 = normal[i, j, 0]
    n1 = normal[i, j, 1]
    n2 = normal[i, j, 2]
    c = d * (n0 * rx + n1 * ry + n2)
    if c > -1e-9:
        depth[i, j] = 0.0
        return 0
    m0 = (Kri[0, 0] * n0) / c
    m1 = (Kri[0, 1] * n0 + Kri[1, 1] * n1) / c
    m2 = (Kri[0, 2] * n0 + Kri[1, 2] * n1 + n2) / c
    X0 = d * rx
    X1 = d * ry
    X2 = d
    xn = math.sqrt(X0 * X0 + X1 * X1 + X2 * X2)
    good = 0
    ns = A.shape[0]
    for s in range(ns):
        # triangulation angle at X between the two centres (reference centre at 0)
        e0 = cen[s, 0] - X0
        e1 = cen[s, 1] - X1
        e2 = cen[s, 2] - X2
        en = math.sqrt(e0 * e0 + e1 * e1 + e2 * e2)
        xe = xn * en
        cosang = (-X0 * e0 - X1 * e1 - X2 * e2) / (xe if xe > 1e-12 else 1e-12)
        if cosang > min_angle_cos:
            continue
        for r in range(3):
            hm[3 * r + 0] = A[s, r, 0] + b[s, r] * m0
            hm[3 * r + 1] = A[s, r, 1] + b[s, r] * m1
            hm[3 * r + 2] = A[s, r, 2] + b[s, r] * m2
        cs = _ncc_cost(hm, u, v, srcs, s, swh[s, 0], swh[s, 1], wn, rcw, var[i, j], i, j, half, step)
        if 1.0 - cs < min_ncc:
            continue
        if geom:
            if sdwh[s, 0] == 0:  # no photometric map of this source: it cannot confirm the depth
                continue
            if _geom_error(X0, X1, X2, u, v, s, R, t, Ks, Ksi, Kr, sdepth, sdwh[s, 0], sdwh[s, 1],
                           gmax) > geom_max_px:
                continue
        good += 1
    return good


@njit(parallel=True, cache=True, fastmath=True)
def consistency(depth, normal, P, min_ncc, geom_max_px, min_angle_cos, min_consistent, min_var):
    """COLMAP's PatchMatch filter: a pixel keeps its depth when at least ``min_consistent`` sources
    see it with NCC >= ``min_ncc``, a triangulation angle whose cosine is <= ``min_angle_cos`` and,
    in the geometric pass, a forward-backward error <= ``geom_max_px`` through the source's depth
    map (a source without a map does not count).
    Returns the number of consistent sources per pixel (depths of the others are set to 0)."""
    (Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step, k_best, geom, gw, gmax, sdepth,
     sdwh) = P
    h, w = depth.shape
    ns = A.shape[0]
    count = np.zeros((h, w), np.int32)
    # camera centres of the sources in the reference frame: -R^T t
    cen = np.empty((ns, 3))
    for s in range(ns):
        for r in range(3):
            cen[s, r] = -(R[s, 0, r] * t[s, 0] + R[s, 1, r] * t[s, 1] + R[s, 2, r] * t[s, 2])
    for i in prange(h):
        hm = np.empty(9)
        for j in range(w):
            good = _consistent_sources(i, j, depth, normal, cen, Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw,
                                       var, half, step, geom, gmax, sdepth, sdwh, min_ncc, geom_max_px,
                                       min_angle_cos, min_var, hm)
            count[i, j] = good
            if good < min_consistent:
                depth[i, j] = 0.0
    return count


@njit(cache=True)
def remove_speckles(depth, rel_tol, min_size, count=None, min_count=2, min_share=0.0):
    """Sets to 0 the depths of the small regions: 4-connected sets of valid pixels whose neighbours'
    depths differ by at most ``rel_tol`` (relative), of fewer than ``min_size`` pixels (wrong depths
    that sources happen to confirm come as such isolated blobs; OpenCV's ``filterSpeckles`` for
    depth). With ``count`` (consistent sources per pixel), a region also goes when fewer than
    ``min_share`` of its pixels have ``min_count`` of them (a plane that only one source confirms
    anywhere). Returns the number of pixels removed."""
    h, w = depth.shape
    label = np.full((h, w), -1, np.int64)
    stack = np.empty(h * w, np.int64)
    members = np.empty(h * w, np.int64)
    removed = 0
    for i0 in range(h):
        for j0 in range(w):
            if depth[i0, j0] <= 0.0 or label[i0, j0] >= 0:
                continue
            label[i0, j0] = 1
            stack[0] = i0 * w + j0
            top = 1
            n = 0
            confirmed = 0
            while top > 0:
                top -= 1
                p = stack[top]
                members[n] = p
                n += 1
                a = p // w
                b = p - a * w
                if count is not None and count[a, b] >= min_count:
                    confirmed += 1
                d = depth[a, b]
                for q in range(4):
                    x = a + (1 if q == 0 else (-1 if q == 1 else 0))
                    y = b + (1 if q == 2 else (-1 if q == 3 else 0))
                    if x < 0 or y < 0 or x >= h or y >= w or label[x, y] >= 0:
                        continue
                    e = depth[x, y]
                    if e <= 0.0 or abs(e - d) > rel_tol * d:
                        continue
                    label[x, y] = 1
                    stack[top] = x * w + y
                    top += 1
            if n < min_size or (count is not None and confirmed < min_share * n):
                for k in range(n):
                    p = members[k]
                    depth[p // w, p - (p // w) * w] = 0.0
                removed += n
    return removed


def solve(depth, normal, P, d_min, d_max, min_var, seed, perturbations):
    """Random hypotheses where ``depth`` is 0 (:func:`initialise`), then one red-black
    :func:`sweep` per entry of ``perturbations`` (iteration ``k + 1`` uses the ``k``-th); in place.
    Returns the costs. :mod:`.kernels_cuda` has the same function for the GPU."""
    cost = np.empty(depth.shape, np.float32)
    initialise(depth, normal, cost, P, 1.0 / d_max, 1.0 / d_min, min_var, seed)
    for it, pert in enumerate(perturbations):
        for color in (0, 1):
            sweep(color, it + 1, depth, normal, cost, P, d_min, d_max, min_var, seed, pert)
    return cost
