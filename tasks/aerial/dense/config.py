"""Settings of the dense stage (both backends) and its error type."""

from __future__ import annotations

from dataclasses import dataclass, field

CUDA_MESSAGE = "pycolmap is built without CUDA: install pycolmap-cuda12 on GPU workers"

# ----------------------------------------------------------------------------- config


@dataclass
class DenseConfig:
    """Settings of the dense stage (both backends; the CPU ones are prefixed where ambiguous)."""

    backend: str = "auto"  # "cpu" | "gpu" | "auto" (the caller resolves: GPU when a worker declares one)
    # the CPU method: "patchmatch" (numba MVS, tasks/aerial/dense/patchmatch.py; demo: coverage 77 % / 64.5 %
    # of the aerial / photo pixels at AbsRel 0.018 / 0.020, the flow end to end in 5 min on 2 cores) |
    # "sgbm" (OpenCV SGBM on rectified pairs + plane sweep: covers 25 % / 15 % at AbsRel 0.009 / 0.018, for
    # sparse but more exact depth in less time; docs/benchmarks.md, issue 14)
    cpu_method: str = "patchmatch"
    num_sources: int = 4  # neighbouring views per reference image
    max_image_size: int = 2000  # as the original PatchMatch setting (long side, pixels)
    min_consistent: int = 2  # CPU fusion: number of per-source estimates that must agree
    rel_tolerance: float = 0.03  # CPU fusion: relative depth agreement
    # --- source selection (both backends)
    min_triangulation_angle: float = 3.0  # degrees
    max_triangulation_angle: float = 40.0  # degrees
    max_view_angle: float = 60.0  # degrees between the principal axes
    max_scale_ratio: float = 2.0  # pose-only fallback: apparent scale of the scene in the two views
    # --- CPU PatchMatch backend (tasks/aerial/dense/patchmatch.py)
    # sources: "coverage" (views.select_sources_covering: greedy, so that the reference's scene is seen
    # twice) | "shared" (views.select_sources: most shared sparse points, as SGBM and the GPU backend)
    pm_view_selection: str = "coverage"
    # sources per reference image (None: num_sources, the other backends'); demo: 8 against 6 covers
    # +2.3 / +2.7 points at 1.25x the CPU (7.0 CPU-s per image with the defaults below)
    pm_num_sources: int | None = 8
    pm_max_image_size: int = 320  # working long side (pixels); maps are written at this size
    pm_iterations: int = 3  # photometric red-black iterations (at the working size)
    # coarse to fine: this many photometric iterations at pm_coarse_scale of the working size first, whose
    # planes start the working size's pm_iterations (0: off; the window covers more of weakly textured
    # surfaces there; demo: +1.6 / +2.5 points of coverage, docs/benchmarks.md, issue 14 fourth session)
    pm_coarse_iterations: int = 4
    pm_coarse_scale: float = 0.5
    pm_geom_iterations: int = 2  # geometric-consistency iterations (0: no geometric pass)
    pm_window_radius: int = 6  # NCC window half size (pixels at the working size; 13x13 px)
    pm_window_step: int = 3  # sample every this many pixels in the window (5x5 samples)
    pm_sigma_color: float = 0.2  # bilateral weight, grey levels in [0, 1]
    pm_k_best: int = 2  # per pixel, the cost is the mean over the best this many sources
    pm_perturbation: float = 0.2  # relative depth / normal perturbation of the first refinement
    pm_far_pad: float = 1.5  # depth range: farthest sparse depth times this
    pm_min_std: float = 0.01  # reference window grey std below which a pixel gets no depth
    pm_min_ncc: float = 0.3  # filter: NCC a consistent source needs
    # filter: consistent sources a pixel needs (COLMAP: 2). 1 with the speckle filter below: demo coverage
    # aerial 0.682 -> 0.772, photos 0.582 -> 0.647, AbsRel 0.017 / 0.026 -> 0.023 / 0.020 (the wrong depths
    # that one source confirms come as small isolated regions; without the speckle filter AbsRel is 0.07 / 0.20)
    pm_min_consistent: int = 1
    pm_min_triangulation_angle: float = 1.0  # filter: degrees
    pm_geom_weight: float = 0.3  # geometric pass: weight of the reprojection error (pixels) in the cost
    pm_geom_max_cost: float = 3.0  # ... capped at this many pixels
    # filter, then: regions (4-connected, neighbours within pm_speckle_tolerance relative depth) of fewer
    # than pm_speckle_size pixels (at the working size) lose their depth (isolated wrong depths; 0 or 1: off)
    pm_speckle_size: int = 300
    pm_speckle_tolerance: float = 0.08
    # ... and regions where fewer than this share of the pixels have 2 consistent sources (a wrong plane one
    # source confirms; demo: the per-image AbsRel outliers 0.15-0.25 go, for 0.2 / 1.3 points of coverage)
    pm_region_min_share: float = 0.1
    pm_geom_max_error: float = 1.0  # filter: forward-backward error a consistent source may have (pixels; COLMAP's)
    pm_seed: int = 0
    pm_threads: int = 0  # numba threads per task (0: numba's default, all cores)
    # --- SGBM CPU backend (tasks/aerial/dense/sgbm.py)
    cpu_max_image_size: int | None = None  # working size of the CPU stereo (None: max_image_size)
    min_baseline_angle: float = 30.0  # degrees between baseline and reference axis (epipole well outside)
    candidate_factor: int = 3  # consider num_sources * candidate_factor ranked candidates
    sgbm_block_size: int = 3
    sgbm_uniqueness: int = 5
    sgbm_speckle_window: int = 100
    sgbm_speckle_range: int = 2
    sgbm_mode: str = "3way"  # "3way" | "sgbm" (5 paths) | "hh" (8 paths, more memory)
    max_disparities: int = 256  # cap of numDisparities (multiple of 16)
    fallback_disparity_fraction: float = 0.25  # no depth prior: search 0 .. fraction * width
    prior_near_pad: float = 1.5  # disparity search from the prior: nearest depth = zmin / near_pad
    prior_far_pad: float | None = None  # farthest depth = zmax * far_pad (None: infinity)
    min_pair_scale: float = 0.35  # a pair whose disparity range exceeds max_disparities is matched smaller
    lr_max_diff: float = 1.0  # left-right check tolerance (pixels)
    min_texture: float = 0.0  # local grey std (5x5) below which a pixel is not matched (0: off)
    max_rect_factor: float = 1.6  # rectified extent cap, in units of the working image's long side
    sweep_fallback: bool = True  # plane sweep for pairs that cannot be rectified (forward motion)
    sweep_max_size: int = 480  # plane sweep (forward-motion pairs): working long side
    sweep_window: int = 9  # NCC window (pixels)
    sweep_step_px: float = 1.0  # plane spacing: at most this pixel motion between planes
    sweep_max_planes: int = 128
    sweep_ground: bool = True  # also sweep horizontal (ground) planes
    sweep_min_ncc: float = 0.6
    sweep_min_margin: float = 0.1  # best NCC minus the best NCC of clearly different depths
    sweep_min_std: float = 2.0  # grey-level std in the window below which NCC is not trusted
    sweep_min_center_std: float = 1.0  # 3x3 grey std a pixel needs (0: off)
    sweep_sigma_px: float = 0.5  # assumed matching precision (pixels) for the conditioning test
    sweep_max_rel_error: float = 0.02  # drop pixels whose depth would be less precise than this
    depth_min: float | None = None  # optional manual depth range (both backends)
    depth_max: float | None = None
    # --- GPU backend (tasks/aerial/dense/backends.py decides on the GPU worker)
    # "auto": COLMAP's CUDA PatchMatch when pycolmap has CUDA, else the pm_* PatchMatch above on numba.cuda |
    # "colmap" | "patchmatch" (only that one; the task fails, saying what to install, when it cannot run)
    gpu_method: str = "auto"
    geom_consistency: bool = True  # GPU backend; the CPU one runs its geometric pass when pm_geom_iterations > 0
    gpu_index: str = "-1"
    fusion_min_num_pixels: int = 3  # both backends: pycolmap.stereo_fusion's min_num_pixels
    patch_match_extra: dict = field(default_factory=dict)  # extra PatchMatchOptions attributes

    def cpu_size(self) -> int:
        return int(self.cpu_max_image_size or self.max_image_size)

    def check(self) -> None:
        """Refuse sizes and counts that would exhaust memory or time (:data:`DENSE_BOUNDS`) and
        non-finite numbers (``ValueError`` naming the field, ``dense.<field>``)."""
        check_bounds(self, DENSE_BOUNDS, "dense")


#: Bounds of the settings that size the dense stage's memory and time: ``field: (low, high)``
#: (image sides in pixels: 8K at most; counts a few times the largest useful value).
DENSE_BOUNDS: dict[str, tuple[float, float]] = {
    "max_image_size": (16, 8192), "pm_max_image_size": (16, 8192), "cpu_max_image_size": (16, 8192),
    "sweep_max_size": (16, 8192), "num_sources": (1, 64), "pm_num_sources": (1, 64), "pm_iterations": (0, 100),
    "pm_coarse_iterations": (0, 100), "pm_geom_iterations": (0, 100), "pm_window_radius": (1, 64),
    "pm_window_step": (1, 64), "pm_k_best": (1, 64), "candidate_factor": (1, 100), "max_disparities": (16, 4096),
    "sweep_max_planes": (1, 4096), "sweep_window": (1, 255), "pm_speckle_size": (0, 10_000_000),
    "fusion_min_num_pixels": (0, 1000), "min_consistent": (1, 64), "pm_min_consistent": (1, 64),
}


def check_bounds(obj: object, bounds: dict[str, tuple[float, float]], prefix: str) -> None:
    """Every ``int``/``float`` field of the dataclass ``obj`` finite and of its type, those in
    ``bounds`` in range (tasks.common.checks.number); ``None`` (unset) passes."""
    import dataclasses

    from tasks.common import checks

    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        v = getattr(obj, f.name)
        kind = (f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))).replace(" | None", "")
        if v is None or kind not in ("int", "float"):
            continue
        lo, hi = bounds.get(f.name, (None, None))
        checks.number(v, f"{prefix}.{f.name}", lo=lo, hi=hi, integer=kind == "int")


class DenseError(RuntimeError):
    """A dense step could not run for one image (the message says why)."""


