"""The dense stage's backends: one protocol, one class per method, and the one place that picks one.

A backend (:class:`DenseBackend`) knows how to

* ``prepare`` COLMAP's dense workspace of the registered images (the same for every method),
* ``run_batch``: one step (``steps()``, e.g. PatchMatch's photometric then geometric pass) over one
  batch of images (``batches()``); every batch of a step runs before the next step starts,
* ``fuse``: ``fused.ply`` and the final ``depths/<stem>.h5`` once every step is done.

Methods: :class:`PatchMatchBackend` (the project's PatchMatch, numba on the CPU; the default),
:class:`SGBMBackend` (OpenCV SGBM with a plane sweep, CPU), :class:`ColmapCudaBackend` (COLMAP's
CUDA PatchMatch through pycolmap-cuda12) and :class:`PatchMatchCudaBackend` (the project's
PatchMatch with its kernels on numba.cuda, for a GPU worker without a CUDA pycolmap).

:func:`select_backend` is the only code that decides which method runs: from the configuration
(``backend``, ``cpu_method``, ``gpu_method``), the Dask workers that declare the resource ``GPU``
and what those workers can run (:func:`gpu_capabilities`, asked on a GPU worker). Nothing else
compares method names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol, Sequence, TypedDict

import pycolmap

from tasks.aerial.dense.config import CUDA_MESSAGE, GPU_METHODS, DenseConfig
from tasks.aerial.dense.fusion import fuse_and_export
from tasks.aerial.dense.gpu import patch_match_gpu
from tasks.aerial.dense.patchmatch import PHASES, run_patch_match
from tasks.aerial.dense.sgbm import fused_point_cloud_cpu, run_dense
from tasks.aerial.dense.workspace import prepare_workspace

NO_GPU_MESSAGE = ("no GPU dense method can run on this worker: pycolmap has no CUDA (install pycolmap-cuda12) "
                  "and numba.cuda finds no CUDA GPU (install numba-cuda, check the NVIDIA driver)")

Progress = Callable[[int, int], None]


class ImageStats(TypedDict, total=False):
    """What a dense step says about one image."""

    valid_fraction: float  # share of the pixels with a depth
    seconds: float
    sources: list[str]  # the source views used
    skipped: bool  # nothing had to be recomputed
    note: str


class DenseResult(TypedDict, total=False):
    """The result of one dense task (a step over a batch, or the fusion)."""

    stats: dict[str, ImageStats]  # per image
    failures: dict[str, str]  # per image: why it has no depth
    fusion: dict[str, Any]  # the fusion's counts (fused points, fused images, seconds)
    finish: bool  # these stats are the scene's final depth maps (the export after fusion)
    worker: str  # the Dask worker that ran the task
    method: str  # the backend's name (run_all)


class DenseBackend(Protocol):
    """One method of the dense stage (module docstring)."""

    name: ClassVar[str]  # the method, as reports and logs name it
    device: ClassVar[str]  # "cpu" or "gpu"
    resources: ClassVar[dict[str, int]]  # the Dask resources each of its tasks needs
    config: DenseConfig

    def prepare(self, model: Path, images: Path, workspace: Path, names: list[str]) -> list[str]: ...

    def steps(self) -> tuple[str, ...]: ...

    def batches(self, names: list[str]) -> list[list[str]]: ...

    def run_batch(self, workspace: Path, depth_dir: Path, names: list[str], step: str,
                  progress: Progress | None = None) -> DenseResult: ...

    def fuse(self, workspace: Path, depth_dir: Path, names: list[str]) -> DenseResult: ...


@dataclass(frozen=True)
class _Backend:
    """What the backends share: the workspace and batches of ``config.batch`` images."""

    config: DenseConfig
    resources: ClassVar[dict[str, int]] = {}

    def prepare(self, model: Path, images: Path, workspace: Path, names: list[str]) -> list[str]:
        """COLMAP's dense workspace (``images/``, ``sparse/``) of ``names``. Our cameras carry no
        distortion (Earth Studio frames are pinhole, the processed photos are undistorted), so
        "undistortion" is the identity: images are linked, not resampled."""
        prepare_workspace(model, images, workspace, image_names=names)
        return names

    def batches(self, names: list[str]) -> list[list[str]]:
        size = self.config.batch
        return [names[i:i + size] for i in range(0, len(names), size)]


@dataclass(frozen=True)
class PatchMatchBackend(_Backend):
    """The project's PatchMatch (:mod:`.patchmatch`) on the CPU: photometric maps of every batch,
    then (``patchmatch.geom_iterations`` > 0) the geometric pass, then COLMAP's fusion and the
    export of the maps (:func:`~tasks.aerial.dense.fusion.fuse_and_export`)."""

    name: ClassVar[str] = "patchmatch"
    device: ClassVar[str] = "cpu"
    kernels: ClassVar[str] = "cpu"  # where the kernels run (patchmatch.kernels_for)

    def steps(self) -> tuple[str, ...]:
        return PHASES if self.config.patchmatch.geom_iterations > 0 else PHASES[:1]

    def run_batch(self, workspace: Path, depth_dir: Path, names: list[str], step: str,
                  progress: Progress | None = None) -> DenseResult:
        return run_patch_match(workspace, names, self.config, step, device=self.kernels, progress=progress)

    def fuse(self, workspace: Path, depth_dir: Path, names: list[str]) -> DenseResult:
        kind = self.steps()[-1]  # the maps of the last pass: geometric, or photometric without one
        out = fuse_and_export(workspace, depth_dir, kind, self.config.patchmatch.max_image_size, self.config, names)
        return {**out, "finish": True}


@dataclass(frozen=True)
class PatchMatchCudaBackend(PatchMatchBackend):
    """The same PatchMatch, its kernels on the GPU through numba.cuda (:mod:`.kernels_cuda`), each
    step as one task of every image on a GPU worker."""

    name: ClassVar[str] = "patchmatch-cuda"
    device: ClassVar[str] = "gpu"
    resources: ClassVar[dict[str, int]] = {"GPU": 1}
    kernels: ClassVar[str] = "cuda"

    def batches(self, names: list[str]) -> list[list[str]]:
        return [list(names)]


@dataclass(frozen=True)
class SGBMBackend(_Backend):
    """OpenCV SGBM on rectified pairs with a plane sweep (:mod:`.sgbm`): depth h5 per batch, then
    the depths back-projected into ``fused.ply``."""

    name: ClassVar[str] = "sgbm"
    device: ClassVar[str] = "cpu"

    def steps(self) -> tuple[str, ...]:
        return ("depth",)

    def run_batch(self, workspace: Path, depth_dir: Path, names: list[str], step: str,
                  progress: Progress | None = None) -> DenseResult:
        return run_dense(workspace, names, self.config, depth_dir)

    def fuse(self, workspace: Path, depth_dir: Path, names: list[str]) -> DenseResult:
        path = fused_point_cloud_cpu(workspace, depth_dir, Path(workspace) / "fused.ply")
        return {"fusion": {"fused ply": str(path)}}  # the batches' stats are the final ones


@dataclass(frozen=True)
class ColmapCudaBackend(_Backend):
    """COLMAP's CUDA PatchMatch through pycolmap (:mod:`.gpu`), the original pipeline's method:
    one task of every image on a GPU worker, then the shared fusion and export."""

    name: ClassVar[str] = "colmap"
    device: ClassVar[str] = "gpu"
    resources: ClassVar[dict[str, int]] = {"GPU": 1}

    def steps(self) -> tuple[str, ...]:
        return ("patchmatch",)

    def batches(self, names: list[str]) -> list[list[str]]:
        return [list(names)]

    def run_batch(self, workspace: Path, depth_dir: Path, names: list[str], step: str,
                  progress: Progress | None = None) -> DenseResult:
        return patch_match_gpu(workspace, self.config, names)

    def fuse(self, workspace: Path, depth_dir: Path, names: list[str]) -> DenseResult:
        kind = "geometric" if self.config.colmap.geom_consistency else "photometric"
        out = fuse_and_export(workspace, depth_dir, kind, self.config.colmap.max_image_size, self.config, names)
        return {**out, "finish": True}


#: every backend, by the name reports give it
BACKENDS: dict[str, type] = {b.name: b for b in (PatchMatchBackend, SGBMBackend, ColmapCudaBackend,
                                                 PatchMatchCudaBackend)}


# ----------------------------------------------------------------------------- the choice


def colmap_has_cuda() -> bool:
    """pycolmap here is built with CUDA."""
    return bool(getattr(pycolmap, "has_cuda", False))


def numba_cuda_available() -> bool:
    """numba.cuda can run the project's kernels here (a CUDA GPU, or numba's simulator)."""
    try:
        from tasks.aerial.dense import kernels_cuda  # numba-cuda: only on GPU workers
    except ImportError:
        return False
    return kernels_cuda.available()


@dataclass(frozen=True)
class GpuCapabilities:
    """What a GPU worker can run (asked on the worker: its pycolmap and numba, not the flow's)."""

    colmap: bool  # pycolmap built with CUDA
    numba_cuda: bool  # numba.cuda finds a GPU


def gpu_capabilities() -> GpuCapabilities:
    """This worker's :class:`GpuCapabilities`."""
    return GpuCapabilities(colmap=colmap_has_cuda(), numba_cuda=numba_cuda_available())


def resolve_dense_backend(requested: str, gpus: Sequence[str]) -> tuple[str, str]:
    """(device, why): "gpu" only when a worker offers the resource ``GPU``, so that a GPU task can
    never wait for a worker that does not exist."""
    if requested == "cpu":
        return "cpu", "CPU backend requested"
    if gpus:
        return "gpu", f"GPU backend: {len(gpus)} worker(s) declare GPU ({', '.join(gpus)})"
    why = "no Dask worker declares the resource GPU"
    if requested == "gpu":
        return "cpu", f"GPU backend requested but {why}: CPU backend instead"
    return "cpu", f"CPU backend: {why}"


def gpu_method(config: DenseConfig | None = None, capabilities: GpuCapabilities | None = None) -> str:
    """``"colmap"`` or ``"patchmatch"``: the GPU implementation a worker with ``capabilities``
    (default: this process's, :func:`gpu_capabilities`) runs for ``config`` (``gpu_method`` "auto":
    COLMAP's when pycolmap has CUDA, else numba's). Raises RuntimeError, saying what to install,
    when the requested one (or, for "auto", either) cannot run there."""
    want = (config or DenseConfig()).gpu_method
    if want not in GPU_METHODS:
        raise ValueError(f"DenseConfig.gpu_method must be one of {GPU_METHODS}, got {want!r}")
    colmap = capabilities.colmap if capabilities is not None else None
    if want in ("auto", "colmap") and (colmap if colmap is not None else colmap_has_cuda()):
        return "colmap"
    if want == "colmap":
        raise RuntimeError(CUDA_MESSAGE)
    if capabilities.numba_cuda if capabilities is not None else numba_cuda_available():
        return "patchmatch"
    if want == "patchmatch":
        raise RuntimeError("gpu_method 'patchmatch': numba.cuda finds no CUDA GPU on this worker (install "
                           "numba-cuda, check the NVIDIA driver and CUDA_VISIBLE_DEVICES)")
    raise RuntimeError(NO_GPU_MESSAGE)


@dataclass(frozen=True)
class Selection:
    """The chosen backend and why (for the log and the report)."""

    backend: DenseBackend
    why: str


def select_backend(config: DenseConfig, gpu_workers: Sequence[str],
                   capabilities: Callable[[], GpuCapabilities] = gpu_capabilities) -> Selection:
    """The one decision of which dense method runs: on a GPU (``config.backend`` "auto" or "gpu" and
    a worker declares ``GPU``; ``capabilities()`` says what such a worker can run, asked only then)
    the method of ``config.gpu_method``, else the CPU method ``config.cpu_method``."""
    device, why = resolve_dense_backend(config.backend, gpu_workers)
    if device == "gpu":
        cls = ColmapCudaBackend if gpu_method(config, capabilities()) == "colmap" else PatchMatchCudaBackend
    else:
        cls = SGBMBackend if config.cpu_method == SGBMBackend.name else PatchMatchBackend
    return Selection(cls(config), f"{why}; method {cls.name}")


def run_all(backend: DenseBackend, workspace: Path, depth_dir: Path, names: list[str]) -> DenseResult:
    """Every step of ``backend`` over ``names`` in one call, then its fusion (tests, scripts; the
    flow runs the same calls as tasks): the per-image stats merged (:func:`merge_dense_results`)."""
    steps = [backend.run_batch(workspace, depth_dir, names, step) for step in backend.steps()]
    fused = backend.fuse(workspace, depth_dir, names)
    merged = merge_dense_results(steps + ([fused] if fused.get("finish") else []))
    return {**merged, "fusion": fused.get("fusion", {}), "finish": True, "method": backend.name}


def merge_dense_results(steps: list[DenseResult]) -> DenseResult:
    """Per-image stats of successive dense steps: seconds summed, ``skipped`` only when every step
    skipped the image, the last step's coverage; failures of any step (the first reason kept)."""
    stats: dict[str, ImageStats] = {}
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


__all__ = ["BACKENDS", "ColmapCudaBackend", "DenseBackend", "DenseResult", "GpuCapabilities", "ImageStats",
           "NO_GPU_MESSAGE", "PatchMatchBackend", "PatchMatchCudaBackend", "SGBMBackend", "Selection",
           "colmap_has_cuda", "gpu_capabilities", "gpu_method", "merge_dense_results", "numba_cuda_available",
           "resolve_dense_backend", "run_all", "select_backend"]
