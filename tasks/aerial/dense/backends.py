"""Which GPU implementation of the dense stage runs on a GPU worker: the one place that decides.

Whether the dense stage runs on a GPU at all is decided by the flow from the cluster
(:func:`tasks.aerial.tasks.resolve_dense_backend`: a Dask worker declares the resource ``GPU``);
on that worker, :func:`gpu_method` picks the implementation and :func:`dense_on_gpu` runs it:

* ``"colmap"``: COLMAP's CUDA PatchMatch through pycolmap (:mod:`.gpu`; needs a CUDA build of
  pycolmap, e.g. ``pip install pycolmap-cuda12``), the original pipeline's method;
* ``"patchmatch"``: the project's own PatchMatch (:mod:`.patchmatch`, the CPU method's algorithm
  and settings) with its kernels on the GPU through ``numba.cuda`` (:mod:`.kernels_cuda`), for a GPU
  node without a CUDA pycolmap (numba with numba-cuda and a CUDA driver are enough).

``DenseConfig.gpu_method`` "auto" prefers COLMAP's when pycolmap has CUDA, else numba's.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tasks.aerial.dense.config import CUDA_MESSAGE, DenseConfig

GPU_METHODS = ("auto", "colmap", "patchmatch")
NO_GPU_MESSAGE = ("no GPU dense method can run on this worker: pycolmap has no CUDA (install pycolmap-cuda12) "
                  "and numba.cuda finds no CUDA GPU (install numba-cuda, check the NVIDIA driver)")


def colmap_has_cuda() -> bool:
    """pycolmap is importable here and built with CUDA."""
    try:
        if "pycolmap" in sys.modules:
            pycolmap = sys.modules["pycolmap"]
        else:
            from tasks.common.signals import import_pycolmap  # keeps the worker's SIGTERM handling
            pycolmap = import_pycolmap()
    except ImportError:
        return False
    return bool(getattr(pycolmap, "has_cuda", False))


def numba_cuda_available() -> bool:
    """numba.cuda can run the project's kernels here (a CUDA GPU, or numba's simulator)."""
    try:
        from tasks.aerial.dense import kernels_cuda
    except ImportError:
        return False
    return kernels_cuda.available()


def gpu_method(config: DenseConfig | None = None) -> str:
    """``"colmap"`` or ``"patchmatch"``: the GPU implementation this worker runs for ``config``
    (``gpu_method`` "auto": COLMAP's when pycolmap has CUDA, else numba's). Raises RuntimeError,
    saying what to install, when the requested one (or, for "auto", either) cannot run here."""
    want = (config or DenseConfig()).gpu_method
    if want not in GPU_METHODS:
        raise ValueError(f"DenseConfig.gpu_method must be one of {GPU_METHODS}, got {want!r}")
    if want in ("auto", "colmap") and colmap_has_cuda():
        return "colmap"
    if want == "colmap":
        raise RuntimeError(CUDA_MESSAGE)
    if numba_cuda_available():
        return "patchmatch"
    if want == "patchmatch":
        raise RuntimeError("gpu_method 'patchmatch': numba.cuda finds no CUDA GPU on this worker (install "
                           "numba-cuda, check the NVIDIA driver and CUDA_VISIBLE_DEVICES)")
    raise RuntimeError(NO_GPU_MESSAGE)


def dense_on_gpu(workspace: Path, config: DenseConfig | None, depth_dir: Path,
                 image_names: list[str] | None = None) -> dict:
    """The dense stage of a workspace on this worker's GPU (:func:`gpu_method`): maps, fusion into
    ``workspace/fused.ply`` and ``depth_dir/<stem>.h5``. Returns the per-image ``stats`` /
    ``failures`` of the other dense paths, with ``gpu method`` added."""
    cfg = config or DenseConfig()
    method = gpu_method(cfg)
    if method == "colmap":
        from tasks.aerial.dense.gpu import dense_gpu
        return {**dense_gpu(workspace, cfg, depth_dir, image_names), "gpu method": method}
    from tasks.aerial.dense.fusion import fuse_and_export
    from tasks.aerial.dense.patchmatch import run_patch_match
    from tasks.aerial.dense.workspace import open_workspace

    ws = open_workspace(workspace)
    names = sorted(ws.by_name) if image_names is None else list(image_names)
    kind = "geometric" if cfg.pm_geom_iterations > 0 else "photometric"
    steps = [run_patch_match(ws, names, cfg, "photometric", device="cuda")]
    if kind == "geometric":
        steps.append(run_patch_match(ws, names, cfg, "geometric", device="cuda"))
    out = fuse_and_export(ws, depth_dir, kind, cfg.pm_max_image_size, cfg, names)
    steps.append(out)
    return {**merge_dense_results(steps), "fusion": out.get("fusion"), "gpu method": method}


def merge_dense_results(steps: list[dict]) -> dict:
    """Per-image stats of successive dense steps: seconds summed, ``skipped`` only when every step
    skipped the image, the last step's coverage; failures of any step (the first reason kept)."""
    stats: dict[str, dict] = {}
    failures: dict[str, str] = {}
    for step in steps:
        for name, why in step.get("failures", {}).items():
            failures.setdefault(name, why)
        for name, st in step.get("stats", {}).items():
            cur = stats.setdefault(name, {"seconds": 0.0, "skipped": True, "sources": []})
            cur["seconds"] += st.get("seconds", 0.0)
            cur["skipped"] = cur["skipped"] and bool(st.get("skipped"))
            cur["valid_fraction"] = st.get("valid_fraction", 0.0)
            cur["sources"] = st.get("sources") or cur["sources"]
    for name in failures:
        stats.pop(name, None)
    return {"stats": stats, "failures": failures}


__all__ = ["merge_dense_results", "GPU_METHODS", "NO_GPU_MESSAGE", "colmap_has_cuda", "numba_cuda_available", "gpu_method", "dense_on_gpu"]
