"""GPU backend: COLMAP PatchMatch stereo through pycolmap (needs a CUDA build, ``pycolmap-cuda12``),
exactly what the original pipeline ran; its maps then go through the shared fusion and export
(:mod:`.fusion`), as the CPU PatchMatch's do."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pycolmap

from tasks.aerial.dense.config import CUDA_MESSAGE, DenseConfig, DenseError
from tasks.aerial.dense.fusion import fuse_and_export
from tasks.aerial.dense.views import _posed_ids, global_depth_range, select_sources
from tasks.aerial.dense.workspace import open_workspace
from tasks.common.atomic import atomic_path

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- GPU backend


def write_stereo_config(workspace: Path, config: DenseConfig | None = None,
                        image_names: list[str] | None = None) -> dict[str, list[str]]:
    """COLMAP's undistorted layout for PatchMatch: ``stereo/{depth_maps,normal_maps,
    consistency_graphs}/``, ``stereo/patch-match.cfg`` (per image: its name, then its sources)
    and ``stereo/fusion.cfg`` (image names). Sources are explicit names from
    :func:`select_sources` (COLMAP's ``__auto__`` needs shared sparse points, which a pose-only
    model lacks). Images without a file or without any source are left out. Returns
    ``{reference name: [source names]}``."""
    cfg = config or DenseConfig()
    workspace = Path(workspace)
    ws = open_workspace(workspace)
    rec = ws.rec
    posed = _posed_ids(rec)
    present = {iid for iid in posed if (workspace / "images" / rec.images[iid].name).is_file()}
    absent = set(posed) - present
    names = sorted(ws.by_name) if image_names is None else list(image_names)
    problems: dict[str, list[str]] = {}
    for name in names:
        iid = ws.by_name.get(name)
        if iid is None or iid not in present:
            continue
        src = select_sources(rec, iid, cfg.num_sources, cfg.min_triangulation_angle, cfg.max_triangulation_angle,
                             cfg.max_view_angle, cfg.max_scale_ratio, exclude=absent,
                             work_size=cfg.colmap.max_image_size if cfg.scale_ratio_at_working_size else None)
        if src:
            problems[name] = [rec.images[j].name for j in src]
    stereo = workspace / "stereo"
    for sub in ("depth_maps", "normal_maps", "consistency_graphs"):
        (stereo / sub).mkdir(parents=True, exist_ok=True)
    for name in problems:  # image names may contain folders
        for sub in ("depth_maps", "normal_maps", "consistency_graphs"):
            (stereo / sub / name).parent.mkdir(parents=True, exist_ok=True)
    pm = "".join(f"{n}\n{', '.join(s)}\n" for n, s in problems.items())
    with atomic_path(stereo / "patch-match.cfg", suffix=".cfg") as tmp:
        tmp.write_text(pm)
    with atomic_path(stereo / "fusion.cfg", suffix=".cfg") as tmp:
        tmp.write_text("".join(f"{n}\n" for n in problems))
    return problems


def patch_match_gpu(workspace: Path, config: DenseConfig | None, image_names: list[str] | None = None) -> dict:
    """COLMAP PatchMatch stereo on this worker's GPU (``colmap.max_image_size``, geometric consistency)
    over ``image_names`` (default: every image of the workspace): COLMAP's maps in ``stereo/``.
    Returns ``{"stats": {name: {"seconds"}}, "failures": {name: reason}}`` (an image without a
    source view fails). Raises RuntimeError when pycolmap has no CUDA."""
    if not getattr(pycolmap, "has_cuda", False):
        raise RuntimeError(CUDA_MESSAGE)
    cfg = config or DenseConfig()
    workspace = Path(workspace)
    problems = write_stereo_config(workspace, cfg, image_names)
    if not problems:
        raise DenseError(f"{workspace}: no image has a source view; nothing for PatchMatch to do")
    rec = open_workspace(workspace).rec
    opts = pycolmap.PatchMatchOptions()
    opts.max_image_size = int(cfg.colmap.max_image_size)
    opts.geom_consistency = bool(cfg.colmap.geom_consistency)
    opts.gpu_index = str(cfg.colmap.gpu_index)
    opts.min_triangulation_angle = float(min(1.0, cfg.min_triangulation_angle))
    for k, v in cfg.colmap.patch_match_extra.items():
        setattr(opts, k, v)
    needs_range = any(rec.images[rec_id].num_points3D == 0 for rec_id in rec.images
                      if rec.images[rec_id].name in problems)
    if needs_range or (cfg.depth_min and cfg.depth_max):
        rng = global_depth_range(rec, cfg)
        if rng is None:
            raise DenseError("the model has images without sparse points and no depth range: set "
                             "DenseConfig.depth_min / depth_max")
        opts.depth_min, opts.depth_max = rng
    opts.allow_missing_files = True  # a source without maps (PatchMatch failed on it) is skipped, not fatal
    t0 = time.perf_counter()
    pycolmap.patch_match_stereo(str(workspace), options=opts)
    per = (time.perf_counter() - t0) / max(1, len(problems))
    failures = {name: "no source view (or image missing): PatchMatch skipped it"
                for name in (image_names or sorted(open_workspace(workspace).by_name)) if name not in problems}
    return {"stats": {name: {"seconds": per, "skipped": False} for name in problems}, "failures": failures}


def dense_gpu(workspace: Path, config: DenseConfig | None, depth_dir: Path,
              image_names: list[str] | None = None) -> dict:
    """GPU backend in one call: :func:`patch_match_gpu`, then the shared
    :func:`~tasks.aerial.dense.fusion.fuse_and_export` (``workspace/fused.ply`` and every
    ``<name>.geometric.bin`` to ``depth_dir/<stem>.h5``). Raises RuntimeError when pycolmap has no CUDA."""
    cfg = config or DenseConfig()
    run = patch_match_gpu(workspace, cfg, image_names)
    kind = "geometric" if cfg.colmap.geom_consistency else "photometric"
    out = fuse_and_export(workspace, depth_dir, kind, cfg.colmap.max_image_size, cfg, list(run["stats"]))
    for name, s in out["stats"].items():
        s["seconds"] += run["stats"].get(name, {}).get("seconds", 0.0)
    for name, why in run["failures"].items():
        out["failures"].setdefault(name, why)
    return out


__all__ = ["write_stereo_config", "patch_match_gpu", "dense_gpu"]
