"""CPU backend: PatchMatch multi-view stereo compiled with numba (COLMAP's method, ECCV 2016).

Per reference image, at a working size of ``patchmatch.max_image_size`` (long side):

1. **Views**: :func:`source_ids`: ``patchmatch.num_sources`` sources chosen so that the reference's scene
   (the model's sparse points in front of it) is seen by two of them within the triangulation,
   viewing-angle and scale limits (:func:`~tasks.aerial.dense.views.select_sources_covering`;
   ranking by shared points, as the GPU backend's ``patch-match.cfg``, left the demo's high
   frames with sources that see a few percent of them, docs/benchmarks.md).
2. **Photometric pass** (``phase="photometric"``): per-pixel depth and normal hypotheses drawn in
   the image's depth range (from its sparse points: 1st-99th percentile, padded), then
   ``patchmatch.iterations`` red-black sweeps of propagation (8 neighbours' planes) and random refinement
   (perturbations shrinking each iteration); the cost is the bilateral-weighted NCC over a window,
   aggregated over the ``patchmatch.k_best`` best source views per pixel (see :mod:`.kernels`). With
   ``patchmatch.coarse_iterations`` > 0 (coarse to fine), that many iterations run first at
   ``patchmatch.coarse_scale`` of the working size, and their planes, upsampled, replace the random start
   of the working size's ``patchmatch.iterations`` (the same window covers more of a weakly textured
   surface at the coarse size, and the working size starts from converged planes). The map is
   written (filtered, below, only when no geometric pass follows) as
   ``stereo/{depth,normal}_maps/<name>.photometric.bin``.
3. **Geometric pass** (``phase="geometric"``): its sources are selected as in 1. among the images
   that have a photometric map (a dense subset of the workspace leaves the others out); starts
   from the image's photometric map and runs ``patchmatch.geom_iterations`` more sweeps with the
   forward-backward reprojection error through each source's photometric depth added to the cost
   (weight ``patchmatch.geom_weight``, capped at ``patchmatch.geom_max_cost`` pixels), as COLMAP's
   ``geom_consistency``; written as ``<name>.geometric.bin``.
4. **Filter** (COLMAP's ``filter``; as in COLMAP, the photometric maps stay unfiltered when a
   geometric pass follows, so that a source's map has a depth wherever its texture allows and the
   geometric pass starts from converged planes): a pixel keeps its depth when at least
   ``patchmatch.min_consistent`` sources see it with NCC >= ``patchmatch.min_ncc``, a triangulation angle of at
   least ``patchmatch.min_triangulation_angle`` and (geometric pass) a forward-backward error of at most
   ``patchmatch.geom_max_error`` pixels (a source without a photometric map does not count there).

The maps are COLMAP's (``pycolmap.DepthMap`` / ``NormalMap`` read them), at the working size, so
fusion (``pycolmap.stereo_fusion``) and the export to ``depths/<stem>.h5`` are the same code for
this backend and the GPU one (:mod:`.fusion`). Resume: an image whose map of the pass exists with
the working size is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import cv2
import numba
import numpy as np

from tasks.aerial.dense import kernels
from tasks.aerial.dense.config import DenseConfig, DenseError
from tasks.aerial.dense.io import read_colmap_array, read_colmap_header, write_colmap_array
from tasks.aerial.dense.views import (_Cam, _cam, _depth_prior, _posed_ids, global_depth_range, select_sources,
                                      select_sources_covering, working_size)
from tasks.aerial.dense.workspace import Workspace, open_workspace
from tasks.common.atomic import write_json_atomic
from tasks.common.fingerprint import fingerprint

log = logging.getLogger(__name__)

PHASES = ("photometric", "geometric")


def map_paths(workspace: Path, name: str, kind: str) -> tuple[Path, Path]:
    """(depth map, normal map) of ``name`` in a workspace, COLMAP's names."""
    stereo = Path(workspace) / "stereo"
    return (stereo / "depth_maps" / f"{name}.{kind}.bin", stereo / "normal_maps" / f"{name}.{kind}.bin")


#: DenseConfig fields the PatchMatch reads besides its own (``DenseConfig.patchmatch``; of those,
#: ``threads`` changes only the speed): a map is reused only when all of them are as when it was
#: computed (``settings_stamp``)
_SHARED_SETTINGS = ("num_sources", "depth_min", "depth_max", "max_view_angle", "min_triangulation_angle",
                    "max_triangulation_angle", "max_scale_ratio", "prior_near_pad", "prior_far_pad",
                    "scale_ratio_at_working_size")
#: ... of which the photometric maps do not depend on these when a geometric pass follows (they stay
#: unfiltered then), so a change of the filter or the geometric pass keeps them
_GEOMETRIC_ONLY = ("geom_iterations", "min_ncc", "min_consistent", "min_triangulation_angle", "geom_weight",
                   "geom_max_cost", "geom_max_error", "speckle_size", "speckle_tolerance", "region_min_share")


def settings_stamp(cfg: DenseConfig, phase: str) -> str:
    """A digest of the settings the ``phase`` maps depend on (see ``_SHARED_SETTINGS``). The
    PatchMatch's own settings are stamped under their former flat names (``patchmatch.<field>``), so the
    stamps of maps made before the settings were grouped stay valid; ``scale_ratio_at_working_size``
    only when on (maps made before it existed stay valid)."""
    own = {k: v for k, v in dataclasses.asdict(cfg.patchmatch).items() if k != "threads"}
    if phase == "photometric" and cfg.patchmatch.geom_iterations > 0:
        own = {k: v for k, v in own.items() if k not in _GEOMETRIC_ONLY}
    shared = {k: getattr(cfg, k) for k in _SHARED_SETTINGS
              if k != "scale_ratio_at_working_size" or cfg.scale_ratio_at_working_size}
    return fingerprint({"phase": phase, **{f"pm_{k}": v for k, v in own.items()}, **shared}, length=16)


def stamp_path(workspace: Path, name: str, kind: str) -> Path:
    """``stereo/patchmatch/<name>.<kind>.json``: the settings stamp of a CPU PatchMatch map pair,
    written after the pair (outside COLMAP's folders); a map without it, or with another stamp
    (other settings, another backend, an earlier version), is computed again."""
    return Path(workspace) / "stereo" / "patchmatch" / f"{name}.{kind}.json"


def _index_K(c: _Cam, sx: float, sy: float) -> np.ndarray:
    """Intrinsics at the working size in pixel-index convention (centre of pixel (i, j) at (j, i))."""
    K = np.diag([sx, sy, 1.0]) @ c.K
    K[0, 2] -= 0.5
    K[1, 2] -= 0.5
    return K


def _grey(img: np.ndarray) -> np.ndarray:
    return (cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float32) / 255.0) if img.ndim == 3 else \
        img.astype(np.float32) / 255.0


def _grey_at(ws: Workspace, name: str, size: tuple[int, int]) -> np.ndarray:
    img, _ = ws.image(name, max(size))
    if img.shape[1] != size[0] or img.shape[0] != size[1]:
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return _grey(img)


def depth_range(ws: Workspace, ref: _Cam, cfg: DenseConfig) -> tuple[float, float]:
    """The reference's depth range: the configuration's, else the 1st-99th percentile of its
    sparse points' depths widened by ``prior_near_pad`` / ``patchmatch.far_pad``, else the model's."""
    if cfg.depth_min and cfg.depth_max:
        return float(cfg.depth_min), float(cfg.depth_max)
    z = _depth_prior(ws.rec, ref)
    if z.size >= 5:
        lo, hi = np.percentile(z, [1, 99])
        return float(lo / cfg.prior_near_pad), float(hi * cfg.patchmatch.far_pad)
    rng = global_depth_range(ws.rec, cfg)
    if rng is None:
        raise DenseError(f"{ref.name}: no sparse point gives a depth range; set DenseConfig.depth_min / depth_max")
    return rng


def source_ids(rec, image_id: int, cfg: DenseConfig, exclude=()) -> list[int]:
    """The PatchMatch sources of an image: ``patchmatch.num_sources`` (else ``num_sources``) views chosen by
    ``patchmatch.view_selection`` ("coverage": :func:`~tasks.aerial.dense.views.select_sources_covering`;
    "shared": :func:`~tasks.aerial.dense.views.select_sources`) within the selection's angle limits (with
    ``scale_ratio_at_working_size``, the scale ratio at ``patchmatch.max_image_size``, where windows are compared)."""
    select = select_sources_covering if cfg.patchmatch.view_selection == "coverage" else select_sources
    return select(rec, image_id, cfg.patchmatch.num_sources or cfg.num_sources, cfg.min_triangulation_angle,
                  cfg.max_triangulation_angle, cfg.max_view_angle, cfg.max_scale_ratio, exclude=exclude,
                  work_size=cfg.patchmatch.max_image_size if cfg.scale_ratio_at_working_size else None)


def kernels_for(device: str):
    """The kernel module of ``device``: "cpu" (:mod:`.kernels`, numba on the CPU) or "cuda"
    (:mod:`.kernels_cuda`, numba.cuda; both have ``solve`` and ``consistency`` with the same inputs)."""
    if device == "cpu":
        return kernels
    if device == "cuda":
        # numba-cuda is installed on GPU workers only: imported when a GPU backend asks for it
        from tasks.aerial.dense import kernels_cuda
        return kernels_cuda
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


def patch_match_image(ws: Workspace, name: str, cfg: DenseConfig, phase: str = "photometric",
                      info: dict | None = None, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(depth HxW, normal HxWx3) of image ``name`` at the working size for one pass (module doc);
    0 depth where filtered out. ``info`` receives the sources, depth range and counts. ``device``:
    where the kernels run (:func:`kernels_for`; the same inputs and settings either way)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    kern = kernels_for(device)
    info = {} if info is None else info
    if name not in ws.by_name:
        raise DenseError(f"{name}: not in the workspace model {ws.path / 'sparse'}")
    rec = ws.rec
    ref = _cam(rec, ws.by_name[name])
    W, H, _, _ = working_size(ref, cfg.patchmatch.max_image_size)
    gref = _grey_at(ws, name, (W, H))  # raises for a missing / corrupt reference
    unusable = {iid for iid in _posed_ids(rec) if not (ws.path / "images" / rec.images[iid].name).is_file()}
    if phase == "geometric":
        # the geometric pass checks depths against the sources' photometric maps: its sources are
        # chosen among the images that have one made with these settings (a dense subset of the
        # workspace leaves the others out)
        pstamp = settings_stamp(cfg, "photometric")
        unusable |= {iid for iid in _posed_ids(rec) if iid != ref.image_id and not _map_complete(
            ws.path, rec.images[iid].name, "photometric", _working_hw(_cam(rec, iid), cfg.patchmatch.max_image_size),
            pstamp)}
    src_ids = source_ids(rec, ref.image_id, cfg, exclude=unusable)
    cams, greys, names = [], [], []
    for j in src_ids:
        c = _cam(rec, j)
        w, h, _, _ = working_size(c, cfg.patchmatch.max_image_size)
        try:
            greys.append(_grey_at(ws, c.name, (w, h)))
        except (FileNotFoundError, DenseError) as exc:  # a bad source only loses that view
            info.setdefault("bad sources", {})[c.name] = str(exc)
            continue
        cams.append(c)
        names.append(c.name)
    info["sources"] = names
    depth = np.zeros((H, W), np.float32)
    normal = np.zeros((H, W, 3), np.float32)
    if len(names) < max(1, cfg.patchmatch.min_consistent):
        info["note"] = f"{len(names)} usable source view(s), {cfg.patchmatch.min_consistent} needed"
        return depth, normal
    d_min, d_max = depth_range(ws, ref, cfg)
    info["depth range"] = (d_min, d_max)

    S = len(names)
    sdepth = np.zeros((S, 1, 1), np.float32)
    sdwh = np.zeros((S, 2), np.int64)
    geom = phase == "geometric"
    if geom:
        maps = []
        for s, (c, n) in enumerate(zip(cams, names)):
            p = map_paths(ws.path, n, "photometric")[0]
            m = _read_map(p, _working_hw(c, cfg.patchmatch.max_image_size))
            maps.append(m)
            if m is not None:
                sdwh[s] = (m.shape[1], m.shape[0])
        info["sources with maps"] = int((sdwh[:, 0] > 0).sum())
        if any(m is not None for m in maps):
            sdepth = np.zeros((S, max(g.shape[0] for g in greys), max(g.shape[1] for g in greys)), np.float32)
            for s, m in enumerate(maps):
                if m is not None:
                    sdepth[s, : m.shape[0], : m.shape[1]] = m
        own_d = _read_map(map_paths(ws.path, name, "photometric")[0], (H, W))
        own_n = _read_map(map_paths(ws.path, name, "photometric")[1], (H, W))
        if own_d is not None and own_n is not None and own_n.ndim == 3:
            depth[:] = own_d
            normal[:] = own_n

    min_var = float(cfg.patchmatch.min_std) ** 2
    seed = int(cfg.patchmatch.seed) + (7 if geom else 0)
    offset = 2 if geom else 0  # the geometric pass refines converged planes: smaller perturbations
    if not geom and cfg.patchmatch.coarse_iterations > 0 and cfg.patchmatch.coarse_scale < 1.0:
        # coarse to fine: the photometric pass at patchmatch.coarse_scale of the working size first (the same
        # window covers 1 / scale times more of the scene: weak texture matches there), its planes
        # (depth and camera-frame normal do not depend on the image scale) upsampled as the working
        # size's initial hypotheses, refined with smaller perturbations from the second step on
        cs = max(16, round(cfg.patchmatch.max_image_size * cfg.patchmatch.coarse_scale))
        Pc, _, (Wc, Hc) = _kernel_params(ref, gref, cams, greys, cs, cfg, False, sdepth, sdwh)
        dc = np.zeros((Hc, Wc), np.float32)
        nc = np.zeros((Hc, Wc, 3), np.float32)
        _solve(dc, nc, Pc, cfg, d_min, d_max, min_var, seed + 13, cfg.patchmatch.coarse_iterations, 0, kern)
        depth[:] = cv2.resize(dc, (W, H), interpolation=cv2.INTER_NEAREST)
        normal[:] = cv2.resize(nc, (W, H), interpolation=cv2.INTER_NEAREST)
        info["coarse size"] = (Wc, Hc)
        offset = 1
    P, var, _ = _kernel_params(ref, gref, cams, greys, cfg.patchmatch.max_image_size, cfg, geom, sdepth, sdwh)
    # an unfinished photometric map (or the coarse level's holes) restarts the zero pixels at random
    _solve(depth, normal, P, cfg, d_min, d_max, min_var, seed,
           cfg.patchmatch.geom_iterations if geom else cfg.patchmatch.iterations, offset, kern)
    normal[depth <= 0] = 0
    info["textured"] = var > min_var
    if geom or cfg.patchmatch.geom_iterations <= 0:
        info["unfiltered depth"] = depth.copy()
        count = kern.consistency(depth, normal, P, float(cfg.patchmatch.min_ncc), float(cfg.patchmatch.geom_max_error),
                                 math.cos(math.radians(cfg.patchmatch.min_triangulation_angle)), int(cfg.patchmatch.min_consistent),
                                 min_var)
        if cfg.patchmatch.speckle_size > 1 or cfg.patchmatch.region_min_share > 0:
            info["speckle pixels"] = int(kernels.remove_speckles(
                depth, float(cfg.patchmatch.speckle_tolerance), int(cfg.patchmatch.speckle_size), count, 2,
                float(cfg.patchmatch.region_min_share)))
        normal[depth <= 0] = 0
        info["mean consistent views"] = float(count[depth > 0].mean()) if (depth > 0).any() else 0.0
        info["consistent views"] = count
    info["valid"] = float((depth > 0).mean())
    return depth, normal


def _kernel_params(ref: _Cam, gref: np.ndarray, cams: list[_Cam], greys: list[np.ndarray], max_size: int,
                   cfg: DenseConfig, geom: bool, sdepth: np.ndarray, sdwh: np.ndarray):
    """The kernels' inputs (tuple ``P`` of :mod:`.kernels`), the reference's window variance and
    (width, height) at working size ``max_size``; ``gref`` / ``greys`` (the reference's and the
    sources' grey images at the configured working size) are resized to it when it differs."""
    W, H, sx, sy = working_size(ref, max_size)
    if gref.shape != (H, W):
        gref = cv2.resize(gref, (W, H), interpolation=cv2.INTER_AREA)
    srcs, Ks, Rs, ts = [], [], [], []
    for c, g in zip(cams, greys):
        w, h, ssx, ssy = working_size(c, max_size)
        if g.shape != (h, w):
            g = cv2.resize(g, (w, h), interpolation=cv2.INTER_AREA)
        R = c.R @ ref.R.T
        srcs.append(g)
        Ks.append(_index_K(c, ssx, ssy))
        Rs.append(R)
        ts.append(c.t - R @ ref.t)
    S = len(srcs)
    stack = np.zeros((S, max(g.shape[0] for g in srcs), max(g.shape[1] for g in srcs)), np.float32)
    swh = np.zeros((S, 2), np.int64)
    for s, g in enumerate(srcs):
        stack[s, : g.shape[0], : g.shape[1]] = g
        swh[s] = (g.shape[1], g.shape[0])
    Kr = _index_K(ref, sx, sy)
    Kri = np.linalg.inv(Kr)
    Ks_, Rs_, ts_ = np.stack(Ks), np.stack(Rs), np.stack(ts)
    A = np.einsum("sij,sjk,kl->sil", Ks_, Rs_, Kri)
    b = np.einsum("sij,sj->si", Ks_, ts_)
    half = max(1, cfg.patchmatch.window_radius // max(1, cfg.patchmatch.window_step))
    step = max(1, cfg.patchmatch.window_step)
    wn, rcw, var = kernels.ref_windows(gref, half, step, float(cfg.patchmatch.sigma_color), float(cfg.patchmatch.window_radius))
    P = (Kri, Kr, A, b, Rs_, ts_, Ks_, np.linalg.inv(Ks_), stack, swh, wn, rcw, var, half, step, int(cfg.patchmatch.k_best),
         geom, float(cfg.patchmatch.geom_weight), float(cfg.patchmatch.geom_max_cost), sdepth, sdwh)
    return P, var, (W, H)


def _solve(depth: np.ndarray, normal: np.ndarray, P, cfg: DenseConfig, d_min: float, d_max: float, min_var: float,
           seed: int, iterations: int, offset: int, kern=kernels) -> np.ndarray:
    """Random hypotheses where ``depth`` is 0, then ``iterations`` red-black sweeps (perturbation
    ``patchmatch.perturbation`` halved per iteration, starting ``offset`` halvings down); in place, by the
    kernel module ``kern`` (:func:`kernels_for`). Returns the costs."""
    perts = [max(cfg.patchmatch.perturbation * 0.5 ** (it + offset), 0.005) for it in range(iterations)]
    return kern.solve(depth, normal, P, d_min, d_max, min_var, seed, perts)


def _working_hw(c: _Cam, max_size: int) -> tuple[int, int]:
    """(height, width) of camera ``c``'s maps at working size ``max_size``."""
    w, h, _, _ = working_size(c, max_size)
    return h, w


def _read_map(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """A COLMAP map of the given (height, width), else None (missing, unreadable, other size)."""
    if not path.is_file():
        return None
    try:
        m = read_colmap_array(path)
    except (ValueError, OSError):
        return None
    return m if m.shape[:2] == tuple(shape) else None


def _map_complete(workspace: Path, name: str, kind: str, shape: tuple[int, int], stamp: str | None = None) -> bool:
    if stamp is not None:
        try:
            if json.loads(stamp_path(workspace, name, kind).read_text()).get("settings") != stamp:
                return False
        except (OSError, ValueError, AttributeError):
            return False
    for p in map_paths(workspace, name, kind):
        try:
            w, h, ch = read_colmap_header(p)
            head = len(f"{w}&{h}&{ch}&")
            if (h, w) != tuple(shape) or p.stat().st_size != head + 4 * w * h * ch:
                return False
        except (OSError, ValueError):
            return False
    return True


def run_patch_match(workspace: Path | Workspace, image_names: list[str] | None, config: DenseConfig | None,
                    phase: str = "photometric", details: dict | None = None, device: str = "cpu", progress=None) -> dict:
    """One pass of the PatchMatch over images of a workspace (all posed ones by default), its kernels
    on ``device`` ("cpu", or "cuda": the GPU backend without COLMAP, :mod:`.backends`): writes
    ``stereo/{depth,normal}_maps/<name>.<phase>.bin``. Resumable per image (a complete map of the
    pass made with the same settings, :func:`settings_stamp`, is kept, whichever device made it:
    same algorithm and inputs); one bad image never
    stops the others. Returns ``{"stats": {name:
    {"valid_fraction", "seconds", "sources", "skipped"}}, "failures": {name: reason}}``. ``details``
    (benchmarks) receives each computed image's ``info`` of :func:`patch_match_image` (with the
    per-pixel ``textured`` mask, ``unfiltered depth`` and ``consistent views`` of a filtered pass).
    ``progress(done, total)``: called after each image (computed, kept or failed)."""
    cfg = config or DenseConfig()
    ws = open_workspace(workspace)
    if cfg.patchmatch.threads:
        numba.set_num_threads(max(1, min(int(cfg.patchmatch.threads), numba.config.NUMBA_NUM_THREADS)))
    names = sorted(ws.by_name) if image_names is None else list(image_names)
    stats: dict[str, dict] = {}
    failures: dict[str, str] = {}
    stamp = settings_stamp(cfg, phase)
    for k, name in enumerate(names):
        if progress is not None and k:
            progress(k, len(names))
        t0 = time.perf_counter()
        if name not in ws.by_name:
            failures[name] = f"DenseError: {name}: not in the workspace model {ws.path / 'sparse'}"
            continue
        c = _cam(ws.rec, ws.by_name[name])
        W, H, _, _ = working_size(c, cfg.patchmatch.max_image_size)
        if _map_complete(ws.path, name, phase, (H, W), stamp):
            d = read_colmap_array(map_paths(ws.path, name, phase)[0])
            stats[name] = {"valid_fraction": float((d > 0).mean()), "seconds": time.perf_counter() - t0,
                           "sources": [], "skipped": True}
            continue
        info: dict = {}
        try:
            depth, normal = patch_match_image(ws, name, cfg, phase, info, device)
            if details is not None:
                details[name] = info
            dp, np_ = map_paths(ws.path, name, phase)
            stamp_path(ws.path, name, phase).unlink(missing_ok=True)
            write_colmap_array(np_, normal)  # normal first, then the depth map, then the stamp
            write_colmap_array(dp, depth)
            write_json_atomic(stamp_path(ws.path, name, phase), {"settings": stamp})
        except Exception as exc:  # noqa: BLE001 - one image never sinks the others
            failures[name] = f"{type(exc).__name__}: {exc}"
            log.warning("dense patchmatch (%s): %s failed: %s", phase, name, failures[name])
            continue
        stats[name] = {"valid_fraction": info.get("valid", 0.0), "seconds": time.perf_counter() - t0,
                       "sources": info.get("sources", []), "skipped": False}
        if "note" in info:
            stats[name]["note"] = info["note"]
    if progress is not None:
        progress(len(names), len(names))
    return {"stats": stats, "failures": failures}


__all__ = ["PHASES", "kernels_for", "map_paths", "settings_stamp", "stamp_path", "working_size", "depth_range", "source_ids", "patch_match_image",
           "run_patch_match"]
