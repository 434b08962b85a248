"""CUDA kernels of the PatchMatch multi-view stereo: the CPU kernels (:mod:`.kernels`) on a GPU,
one thread per pixel, through ``numba.cuda``.

The same algorithm, settings and inputs as the CPU path: the host side
(:func:`tasks.aerial.dense.patchmatch.patch_match_image`) prepares the same kernel inputs ``P``
(reference windows from :func:`.kernels.ref_windows` on the CPU, the source stack, the
homography terms) and calls :func:`solve` / :func:`consistency` of this module instead of the
CPU module's. The scalar helpers (counter-based random numbers, bilinear sampling, the NCC cost,
the forward-backward error, the random and perturbed normals) are the CPU module's own Python
source compiled for CUDA (:func:`_device`: one definition, two targets); the per-pixel bodies of
``initialise`` / ``sweep`` / ``consistency`` are written again here because a CUDA thread handles
one pixel (the CPU versions loop over rows with ``prange``) and cannot allocate arrays
(``cuda.local.array`` of at most :data:`MAX_SOURCES` sources instead of ``np.empty``).

Determinism: the random numbers are the same hash of (seed, pixel, iteration, draw) as on the CPU
and the red-black schedule means a thread only reads pixels of the other colour, so a run gives
the same maps every time; against the CPU maps they differ only where floating-point rounding
(fused multiply-add, libm) flips a comparison between two nearly equal costs
(tests/test_aerial_patchmatch_cuda.py states and checks the tolerance under numba's CUDA
simulator).

Importing this module needs ``numba.cuda`` (part of numba, or the numba-cuda package) but no GPU;
:func:`available` says whether a GPU (or the simulator, ``NUMBA_ENABLE_CUDASIM=1``) can run it.
"""

from __future__ import annotations

import math
import types

import numpy as np
from numba import cuda, float64

from tasks.aerial.dense import kernels

BAD = kernels.BAD
MAX_SOURCES = 16  # per-thread cost array (patchmatch.num_sources is 8 by default)
_NI = kernels._NI
_NJ = kernels._NJ
_BLOCK = (16, 8)  # threads per block (columns, rows)


def available() -> bool:
    """Whether ``numba.cuda`` can run these kernels here (a CUDA GPU with its driver, or the simulator)."""
    try:
        return bool(cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken driver means no GPU
        return False


def _device(dispatcher, **bindings):
    """The CPU kernel module's scalar function ``dispatcher`` (numba ``njit``) compiled as a CUDA
    device function from the same Python source; ``bindings`` replace the globals it calls (the
    CUDA versions of the helpers it uses)."""
    f = dispatcher.py_func
    g = dict(f.__globals__)
    g.update(bindings)
    clone = types.FunctionType(f.__code__, g, f.__name__, f.__defaults__, f.__closure__)
    return cuda.jit(device=True)(clone)


_rand = _device(kernels._rand)
_bilinear = _device(kernels._bilinear)
_ncc_cost = _device(kernels._ncc_cost, _bilinear=_bilinear)
_geom_error = _device(kernels._geom_error)
_random_normal = _device(kernels._random_normal, _rand=_rand)
_perturb_normal = _device(kernels._perturb_normal, _rand=_rand)


@cuda.jit(device=True)
def _cost(i, j, d, n0, n1, n2, Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step, k_best, geom, gw,
          gmax, sdepth, sdwh, costs, hm):
    """:func:`.kernels._cost` for one thread (``costs``, ``hm``: its local arrays)."""
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
        costs[bi] = 1e30 + costs[bi]
    for s in range(ns):
        if costs[s] >= 1e30:
            costs[s] -= 1e30
    return tot / kb


@cuda.jit
def _initialise(depth, normal, cost, Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step, k_best, geom,
                gw, gmax, sdepth, sdwh, inv_min, inv_max, min_var, seed):
    """:func:`.kernels.initialise`, one thread per pixel."""
    j, i = cuda.grid(2)
    h, w = depth.shape
    if i >= h or j >= w:
        return
    costs = cuda.local.array(MAX_SOURCES, float64)
    hm = cuda.local.array(9, float64)
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
    cost[i, j] = _cost(i, j, depth[i, j], normal[i, j, 0], normal[i, j, 1], normal[i, j, 2], Kri, Kr, A, b, R, t, Ks,
                       Ksi, srcs, swh, wn, rcw, var, half, step, k_best, geom, gw, gmax, sdepth, sdwh, costs, hm)


@cuda.jit
def _sweep(color, it, depth, normal, cost, Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step, k_best,
           geom, gw, gmax, sdepth, sdwh, d_min, d_max, min_var, seed, pert):
    """:func:`.kernels.sweep`, one thread per pixel of checkerboard ``color`` (thread column ``x``
    handles column ``2 x + (i + color) % 2`` of row ``i``)."""
    x, i = cuda.grid(2)
    h, w = depth.shape
    j = 2 * x + (i + color) % 2
    if i >= h or j >= w:
        return
    if var[i, j] <= min_var:
        return
    costs = cuda.local.array(MAX_SOURCES, float64)
    hm = cuda.local.array(9, float64)
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
        c = _cost(i, j, dp, m0, m1, m2, Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step, k_best,
                  geom, gw, gmax, sdepth, sdwh, costs, hm)
        if c < bc:
            bc = c
            bd = dp
            b0 = m0
            b1 = m1
            b2 = m2
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
        c = _cost(i, j, dd, e0, e1, e2, Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step, k_best,
                  geom, gw, gmax, sdepth, sdwh, costs, hm)
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


@cuda.jit
def _consistency(depth, normal, count, cen, Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step, geom,
                 gmax, sdepth, sdwh, min_ncc, geom_max_px, min_angle_cos, min_consistent, min_var):
    """:func:`.kernels.consistency`, one thread per pixel (``cen``: the sources' centres in the
    reference frame, computed on the host)."""
    j, i = cuda.grid(2)
    h, w = depth.shape
    if i >= h or j >= w:
        return
    hm = cuda.local.array(9, float64)
    d = float(depth[i, j])
    if d <= 0.0 or var[i, j] <= min_var:
        depth[i, j] = 0.0
        return
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
        return
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
            if sdwh[s, 0] == 0:
                continue
            if _geom_error(X0, X1, X2, u, v, s, R, t, Ks, Ksi, Kr, sdepth, sdwh[s, 0], sdwh[s, 1],
                           gmax) > geom_max_px:
                continue
        good += 1
    count[i, j] = good
    if good < min_consistent:
        depth[i, j] = 0.0


# ----------------------------------------------------------------------------- host side


def _grid(w: int, h: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((w + _BLOCK[0] - 1) // _BLOCK[0], (h + _BLOCK[1] - 1) // _BLOCK[1]), _BLOCK


def _device_inputs(P) -> tuple:
    """The arrays of ``P`` (the CPU kernels' input tuple) on the device, the scalars as they are."""
    (Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step, k_best, geom, gw, gmax, sdepth, sdwh) = P
    if A.shape[0] > MAX_SOURCES:
        raise ValueError(f"{A.shape[0]} source views; the CUDA kernels take at most {MAX_SOURCES} (dense.patchmatch.num_sources)")
    dev = [cuda.to_device(np.ascontiguousarray(a)) for a in (Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var)]
    return (*dev, int(half), int(step), int(k_best), bool(geom), float(gw), float(gmax),
            cuda.to_device(np.ascontiguousarray(sdepth)), cuda.to_device(np.ascontiguousarray(sdwh)))


def solve(depth: np.ndarray, normal: np.ndarray, P, d_min: float, d_max: float, min_var: float, seed: int,
          perturbations: list[float]) -> np.ndarray:
    """:func:`.kernels.solve` on the GPU: random hypotheses where ``depth`` is 0, then one red-black
    sweep per entry of ``perturbations``; ``depth`` / ``normal`` updated in place (one copy each
    way). Returns the costs."""
    h, w = depth.shape
    D = _device_inputs(P)
    dd = cuda.to_device(np.ascontiguousarray(depth, np.float32))
    dn = cuda.to_device(np.ascontiguousarray(normal, np.float32))
    dc = cuda.device_array((h, w), np.float32)
    grid, block = _grid(w, h)
    _initialise[grid, block](dd, dn, dc, *D, 1.0 / d_max, 1.0 / d_min, float(min_var), int(seed))
    half_grid, _ = _grid((w + 1) // 2, h)
    for it, pert in enumerate(perturbations):
        for color in (0, 1):
            _sweep[half_grid, block](color, it + 1, dd, dn, dc, *D, float(d_min), float(d_max), float(min_var),
                                     int(seed), float(pert))
    depth[:] = dd.copy_to_host()
    normal[:] = dn.copy_to_host()
    return dc.copy_to_host()


def consistency(depth, normal, P, min_ncc, geom_max_px, min_angle_cos, min_consistent, min_var) -> np.ndarray:
    """:func:`.kernels.consistency` on the GPU (``depth`` updated in place); the count per pixel."""
    (Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step, k_best, geom, gw, gmax, sdepth, sdwh) = P
    cen = np.einsum("sri,sr->si", R, -t)  # -R^T t per source, as the CPU kernel computes it
    D = _device_inputs(P)
    h, w = depth.shape
    dd = cuda.to_device(np.ascontiguousarray(depth, np.float32))
    count = cuda.to_device(np.zeros((h, w), np.int32))
    grid, block = _grid(w, h)
    _consistency[grid, block](dd, cuda.to_device(np.ascontiguousarray(normal, np.float32)), count,
                              cuda.to_device(np.ascontiguousarray(cen)), *D[:15], D[16], D[18], D[19], D[20],
                              float(min_ncc), float(geom_max_px), float(min_angle_cos), int(min_consistent),
                              float(min_var))
    depth[:] = dd.copy_to_host()
    return count.copy_to_host()


__all__ = ["MAX_SOURCES", "available", "solve", "consistency"]
