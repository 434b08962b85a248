"""Settings of the dense stage: what every method shares (:class:`DenseConfig`), one
sub-configuration per method (:class:`PatchMatchConfig`, :class:`SGBMConfig`,
:class:`ColmapConfig`), and the stage's error type.

Which method runs is decided in one place, :func:`tasks.aerial.dense.backends.select_backend`,
from ``backend``, ``cpu_method``, ``gpu_method`` and the workers of the cluster.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tasks.common import checks
from tasks.common.forms import setting

CUDA_MESSAGE = "pycolmap is built without CUDA: install pycolmap-cuda12 on GPU workers"

#: the spellings of the three choices (the form's drop-downs; select_backend reads them)
DEVICES = ("auto", "cpu", "gpu")
CPU_METHODS = ("sgbm", "patchmatch")
GPU_METHODS = ("auto", "colmap", "patchmatch")
VIEW_SELECTIONS = ("coverage", "shared")
SGBM_MODES = ("3way", "sgbm", "hh")


@dataclass
class PatchMatchConfig:
    """The project's PatchMatch multi-view stereo (COLMAP's method compiled with numba; on the CPU,
    or on a GPU through numba.cuda)."""

    # "shared" is what SGBM and COLMAP use; "coverage" left the demo's high frames with sources
    # that see more of them (docs/benchmarks.md, issue 14)
    view_selection: str = setting("coverage", "how source views are chosen: coverage (so that two of them see "
                                  "each part of the image) or shared (the views sharing the most sparse points)")
    # demo: 8 against 6 covers +2.3 / +2.7 points at 1.25x the CPU time
    num_sources: int | None = setting(8, "source views per image (empty: the shared num_sources)")
    max_image_size: int = setting(320, "long side, in pixels, of the working image; depth maps are written "
                                  "at this size, and memory and time grow with its square")
    iterations: int = setting(3, "propagation and refinement sweeps of the photometric pass")
    # demo: +1.6 / +2.5 points of coverage (docs/benchmarks.md, issue 14 fourth session)
    coarse_iterations: int = setting(4, "sweeps at a coarser image first, whose result starts the working "
                                     "size (helps weakly textured surfaces; 0: off)")
    coarse_scale: float = setting(0.5, "size of the coarse image, as a fraction of the working size")
    geom_iterations: int = setting(2, "sweeps of the geometric pass, which checks each depth against the "
                                   "source views' depth maps (0: no geometric pass)")
    window_radius: int = setting(6, "half size, in pixels of the working image, of the window whose colours "
                                 "are compared between views")
    window_step: int = setting(3, "compare every this many pixels of the window (larger: faster, coarser)")
    sigma_color: float = setting(0.2, "how much a window pixel of another grey level counts less "
                                 "(grey levels 0 to 1)")
    k_best: int = setting(2, "a depth's cost is the mean over this many best-matching source views")
    perturbation: float = setting(0.2, "relative change of depth and normal tried by the first refinement")
    far_pad: float = setting(1.5, "depth search up to the image's farthest sparse point times this")
    min_std: float = setting(0.01, "pixels whose window has less grey-level spread than this get no depth "
                             "(grey levels 0 to 1)")
    min_ncc: float = setting(0.3, "colour agreement (NCC, -1 to 1) a source view needs to confirm a depth")
    # 1 with the speckle filter: demo coverage aerial 0.682 -> 0.772, photos 0.582 -> 0.647 (COLMAP: 2)
    min_consistent: int = setting(1, "source views that must confirm a depth for it to be kept")
    min_triangulation_angle: float = setting(1.0, "degrees between the rays of a confirming source view")
    geom_weight: float = setting(0.3, "geometric pass: weight of the reprojection error (pixels) in the cost")
    geom_max_cost: float = setting(3.0, "geometric pass: the reprojection error counts up to this many pixels")
    speckle_size: int = setting(300, "connected regions of fewer pixels (working size) lose their depth: "
                                "isolated wrong depths (0 or 1: off)")
    speckle_tolerance: float = setting(0.08, "relative depth difference within which neighbours are one region")
    # demo: the per-image AbsRel outliers 0.15-0.25 go, for 0.2 / 1.3 points of coverage
    region_min_share: float = setting(0.1, "regions where fewer than this share of the pixels have two "
                                      "confirming views lose their depth (0: off)")
    geom_max_error: float = setting(1.0, "pixels a confirming view's forward-backward reprojection may miss by")
    seed: int = setting(0, "seed of the random depth and normal hypotheses")
    threads: int = setting(0, "CPU threads per dense task (0: all cores); changes only the speed")


@dataclass
class SGBMConfig:
    """OpenCV's semi-global matching on rectified image pairs, with a plane sweep for pairs that
    cannot be rectified (forward motion); depths fused per pixel."""

    max_image_size: int = setting(2000, "long side, in pixels, of the working image")
    min_baseline_angle: float = setting(30.0, "degrees between the baseline and the viewing direction a pair "
                                        "needs to be rectified (else it goes to the plane sweep)")
    candidate_factor: int = setting(3, "source views considered: num_sources times this, best ranked first")
    block_size: int = setting(3, "matched block size (pixels, odd)")
    uniqueness: int = setting(5, "percent by which the best disparity must beat the second best")
    speckle_window: int = setting(100, "disparity regions of fewer pixels are removed")
    speckle_range: int = setting(2, "disparity difference within which neighbours are one region")
    mode: str = setting("3way", "OpenCV's SGBM mode: 3way, sgbm (5 paths) or hh (8 paths, more memory)")
    max_disparities: int = setting(256, "largest disparity search (a multiple of 16)")
    fallback_disparity_fraction: float = setting(0.25, "without a depth prior, search disparities up to this "
                                                 "fraction of the image width")
    min_pair_scale: float = setting(0.35, "a pair whose disparity range is too large is matched smaller, down "
                                    "to this scale")
    lr_max_diff: float = setting(1.0, "left-right check tolerance (pixels)")
    min_texture: float = setting(0.0, "grey-level spread (5x5 pixels) below which a pixel is not matched "
                                 "(0: off)")
    max_rect_factor: float = setting(1.6, "largest rectified image, in units of the working image's long side")
    sweep_fallback: bool = setting(True, "plane sweep for pairs that cannot be rectified")
    sweep_max_size: int = setting(480, "plane sweep: long side of the working image (pixels)")
    sweep_window: int = setting(9, "plane sweep: compared window (pixels)")
    sweep_step_px: float = setting(1.0, "plane sweep: at most this many pixels of motion between planes")
    sweep_max_planes: int = setting(128, "plane sweep: most planes per direction")
    sweep_ground: bool = setting(True, "plane sweep: also sweep horizontal (ground) planes")
    sweep_min_ncc: float = setting(0.6, "plane sweep: colour agreement (NCC) a depth needs")
    sweep_min_margin: float = setting(0.1, "plane sweep: how much the best agreement must beat clearly "
                                      "different depths")
    sweep_min_std: float = setting(2.0, "plane sweep: grey-level spread of the window below which agreement is "
                                   "not trusted")
    sweep_min_center_std: float = setting(1.0, "plane sweep: grey-level spread (3x3) a pixel needs (0: off)")
    sweep_sigma_px: float = setting(0.5, "plane sweep: assumed matching precision (pixels)")
    sweep_max_rel_error: float = setting(0.02, "plane sweep: drop depths less precise than this (relative)")
    min_consistent: int = setting(2, "per pixel, pair estimates that must agree for the depth to be kept")
    rel_tolerance: float = setting(0.03, "relative depth difference within which pair estimates agree")


@dataclass
class ColmapConfig:
    """COLMAP's CUDA PatchMatch through pycolmap (a GPU worker with pycolmap-cuda12)."""

    max_image_size: int = setting(2000, "long side, in pixels, of the images PatchMatch works on")
    geom_consistency: bool = setting(True, "run COLMAP's geometric-consistency pass")
    gpu_index: str = setting("-1", "which GPUs COLMAP uses (-1: all)")
    patch_match_extra: dict = setting(help="further pycolmap.PatchMatchOptions attributes, by name",
                                      factory=dict)


#: the sub-configurations, by the field of :class:`DenseConfig` that holds them
METHOD_CONFIGS: dict[str, type] = {"patchmatch": PatchMatchConfig, "sgbm": SGBMConfig, "colmap": ColmapConfig}


@dataclass
class DenseConfig:
    """Settings of the dense stage: where it runs, the settings every method shares, and one
    sub-configuration per method."""

    backend: str = setting("auto", "where depth maps are computed: auto (on a GPU when a Dask worker "
                           "declares the resource GPU, else on the CPU), cpu or gpu (falls back to the CPU, "
                           "saying so, when no worker has a GPU)")
    # demo: patchmatch covers 77 % / 64.5 % of the aerial / photo pixels at AbsRel 0.018 / 0.020; sgbm
    # 25 % / 15 % at AbsRel 0.009 / 0.018 (docs/benchmarks.md, issue 14)
    cpu_method: str = setting("patchmatch", "method on the CPU: patchmatch (denser) or sgbm (sparser, "
                              "more exact, faster)")
    gpu_method: str = setting("auto", "method on a GPU: auto (COLMAP's when the worker's pycolmap has CUDA, "
                              "else the project's PatchMatch on numba.cuda), colmap or patchmatch")
    batch: int = setting(4, "images per CPU dense task")
    num_sources: int = setting(4, "source views per image")
    min_triangulation_angle: float = setting(3.0, "source views: least angle (degrees) between the rays to a "
                                             "shared point")
    max_triangulation_angle: float = setting(40.0, "source views: largest angle (degrees) between the rays to "
                                             "a shared point")
    max_view_angle: float = setting(60.0, "source views: largest angle (degrees) between the viewing "
                                    "directions")
    max_scale_ratio: float = setting(2.0, "source views: largest ratio of the scene's apparent size in the "
                                     "two views")
    # realistic world, 24 frames (800-px photos, 640-px frames): photo AbsRel 0.72 -> 0.63; the demo
    # (630-px photos, 640-px frames): photo coverage 64.5 % -> 61.7 %: off until it helps both
    scale_ratio_at_working_size: bool = setting(False, "source views: measure the scale ratio at the size the "
                                                "method works at (images of other sizes shrink by other "
                                                "factors) instead of at full resolution")
    prior_near_pad: float = setting(1.5, "depth search from the nearest sparse point's depth divided by this")
    prior_far_pad: float | None = setting(None, "depth search up to the farthest sparse point's depth times "
                                          "this (empty: no limit for SGBM, 10 for the whole model's range)")
    depth_min: float | None = setting(None, "nearest depth searched, in model units (with depth_max; empty: "
                                      "from the sparse points)")
    depth_max: float | None = setting(None, "farthest depth searched, in model units (with depth_min)")
    fusion_min_num_pixels: int = setting(3, "fusion: depth maps that must agree on a point")
    patchmatch: PatchMatchConfig = setting(help="the project's PatchMatch (CPU, or GPU through numba.cuda)",
                                           factory=PatchMatchConfig)
    sgbm: SGBMConfig = setting(help="OpenCV SGBM with a plane sweep (CPU)", factory=SGBMConfig)
    colmap: ColmapConfig = setting(help="COLMAP's CUDA PatchMatch (GPU)", factory=ColmapConfig)

    def __post_init__(self) -> None:
        for name, cls in METHOD_CONFIGS.items():  # from JSON or overrides: a dict per method
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls(**value))

    def with_overrides(self, overrides: dict[str, Any]) -> "DenseConfig":
        """A copy with ``overrides`` applied; a method's sub-dict (or a dotted key,
        ``"patchmatch.window_radius"``) changes only the fields it names. Raises TypeError naming
        an unknown setting."""
        nested: dict[str, Any] = {}
        for key, value in overrides.items():
            section, _, name = key.partition(".")
            if name:
                nested.setdefault(section, {})[name] = value
            elif isinstance(value, dict):
                nested.setdefault(key, {}).update(value)
            else:
                nested[key] = value
        overrides = nested
        out = dataclasses.replace(self, **{k: v for k, v in overrides.items() if k not in METHOD_CONFIGS})
        for name in METHOD_CONFIGS:
            sub = overrides.get(name)
            if isinstance(sub, dict):
                setattr(out, name, dataclasses.replace(getattr(self, name), **sub))
            elif sub is not None:
                setattr(out, name, sub)
        return out

    def check(self) -> None:
        """Refuse unknown choices, sizes and counts that would exhaust memory or time
        (:data:`DENSE_BOUNDS`) and non-finite numbers (``ValueError`` naming the field,
        ``dense.<field>`` or ``dense.<method>.<field>``)."""
        for name, value, allowed in (("backend", self.backend, DEVICES), ("cpu_method", self.cpu_method, CPU_METHODS),
                                     ("gpu_method", self.gpu_method, GPU_METHODS),
                                     ("patchmatch.view_selection", self.patchmatch.view_selection, VIEW_SELECTIONS)):
            if value not in allowed:
                raise ValueError(f"dense.{name} must be one of {allowed}, got {value!r}")
        check_bounds(self, DENSE_BOUNDS, "dense")
        for name in METHOD_CONFIGS:
            check_bounds(getattr(self, name), METHOD_BOUNDS[name], f"dense.{name}")


#: Bounds of the settings that size the dense stage's memory and time: ``field: (low, high)``
#: (image sides in pixels: 8K at most; counts a few times the largest useful value).
DENSE_BOUNDS: dict[str, tuple[float, float]] = {
    "batch": (1, 10000), "num_sources": (1, 64), "fusion_min_num_pixels": (0, 1000),
}
METHOD_BOUNDS: dict[str, dict[str, tuple[float, float]]] = {
    "patchmatch": {"max_image_size": (16, 8192), "num_sources": (1, 64), "iterations": (0, 100),
                   "coarse_iterations": (0, 100), "geom_iterations": (0, 100), "window_radius": (1, 64),
                   "window_step": (1, 64), "k_best": (1, 64), "speckle_size": (0, 10_000_000),
                   "min_consistent": (1, 64)},
    "sgbm": {"max_image_size": (16, 8192), "sweep_max_size": (16, 8192), "candidate_factor": (1, 100),
             "max_disparities": (16, 4096), "sweep_max_planes": (1, 4096), "sweep_window": (1, 255),
             "min_consistent": (1, 64)},
    "colmap": {"max_image_size": (16, 8192)},
}


def check_bounds(obj: object, bounds: dict[str, tuple[float, float]], prefix: str) -> None:
    """Every ``int``/``float`` field of the dataclass ``obj`` finite and of its type, those in
    ``bounds`` in range (tasks.common.checks.number); ``None`` (unset) passes."""
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        v = getattr(obj, f.name)
        kind = (f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))).replace(" | None", "")
        if v is None or kind not in ("int", "float"):
            continue
        lo, hi = bounds.get(f.name, (None, None))
        checks.number(v, f"{prefix}.{f.name}", lo=lo, hi=hi, integer=kind == "int")


class DenseError(RuntimeError):
    """A dense step could not run for one image (the message says why)."""
