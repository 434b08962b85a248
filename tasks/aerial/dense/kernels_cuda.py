"""CUDA kernels of the PatchMatch multi-view stereo: the CPU kernels (:mod:`.kernels`) on a GPU,
one thread per pixel, through ``numba.cuda``.

The same algorithm, settings and inputs as the CPU path: the host side
(:func:`tasks.aerial.dense.patchmatch.patch_match_image`) prepares the same kernel inputs ``P``
(reference windows from :func:`.kernels.ref_windows` on the CPU, the source stack, the
homography terms) and calls :func:`solve` / :func:`consistency` of this module instead of the
CPU module's. The scalar helpers (counter-based random numbers, bilinear sampling, the NCC cost,
the forward-backward error, the random and perturbed normals) are the CPU module's own Python
source compiled for CUDA (:func:`_device`: one definition, two targets), and so are the per-pixel
bodies of ``initialise`` / ``sweep`` / ``consistency`` (``kernels._initialise_pixel``,
``_sweep_pixel``, ``_consistent_sources``): the CPU kernels call them row by row under
``prange``, the CUDA kernels here once per thread with its local scratch arrays
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

import types

import numpy as np
from numba import cuda, float64

from tasks.aerial.dense import kernels

BAD = kernels.BAD
MAX_SOURCES = 16  # per-thread cost array (patchmatch.num_sources is 8 by default)
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


_plane_cost = _device(kernels._plane_cost, _ncc_cost=_ncc_cost, _geom_error=_geom_error)
_initialise_pixel = _device(kernels._initialise_pixel, _rand=_rand, _random_normal=_random_normal,
                            _plane_cost=_plane_cost)
_sweep_pixel = _device(kernels._sweep_pixel, _rand=_rand, _random_normal=_random_normal,
                       _perturb_normal=_perturb_normal, _plane_cost=_plane_cost)
_consistent_sources = _device(kernels._consistent_sources, _ncc_cost=_ncc_cost, _geom_error=_geom_error)


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
    _initialise_pixel(i, j, depth, normal, cost, Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step,
                      k_best, geom, gw, gmax, sdepth, sdwh, inv_min, inv_max, min_var, seed, costs, hm)


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
    _sweep_pixel(i, j, it, depth, normal, cost, Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half, step,
                 k_best, geom, gw, gmax, sdepth, sdwh, d_min, d_max, seed, pert, costs, hm)


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
    good = _consistent_sources(i, j, depth, normal, cen, Kri, Kr, A, b, R, t, Ks, Ksi, srcs, swh, wn, rcw, var, half,
                               step, geom, gmax, sdepth, sdwh, min_ncc, geom_max_px, min_angle_cos, min_var, hm)
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
