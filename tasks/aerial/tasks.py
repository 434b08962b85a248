"""Prefect task wrappers of the aerial stages: retries, tags, logging; no logic.

The plain functions they call (``tasks/aerial/*.py``, ``tasks.aerial.pipeline``) are
tested without Prefect. Which dense method runs is decided by
:func:`tasks.aerial.dense.backends.select_backend`; the dense tasks run the backend they are
given.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

# modules, not their functions: each call looks the function up (tests replace stage functions)
from tasks.aerial import covisibility, earthstudio, evaluate, megadepth, pipeline, synthetic_world, training_export
from tasks.aerial import plan as planning
from tasks.aerial.dense import backends
from tasks.common.progress import Progress
from tasks.common.runtime import match_worker_threads, worker_address


@task(name="synthetic-world", cache_policy=NO_CACHE, tags=["aerial"])
def world_task(root: str, options: dict[str, Any]) -> str:
    with Progress("synthetic world", 0, "renders") as progress:
        info = synthetic_world.ensure_world(Path(root), progress=progress.update, **options)
    get_run_logger().info("synthetic world ready in %s", root)
    return str(info.scene) if hasattr(info, "scene") else "0001"


@task(name="plan", cache_policy=NO_CACHE, tags=["aerial", "plan"])
def plan_task(root: str, place, trajectory):
    res = planning.plan_scene(Path(root), place, trajectory)
    if res.invalid:
        get_run_logger().warning("scene %s: the earlier project was invalid and is replaced: %s", place.scene,
                                 res.invalid)
    get_run_logger().info("scene %s: plan of %d cameras%s: %s", place.scene, res.cameras,
                          " (up to date)" if res.skipped else "", res.esp)
    return res


@task(name="earth-studio-ingest", cache_policy=NO_CACHE, tags=["aerial", "ingest"], retries=1)
def ingest_task(root: str, scene: str):
    res = earthstudio.ingest_scene(Path(root), scene)
    logger = get_run_logger()
    logger.info("scene %s: %d frames%s, %d skipped", scene, res.frames_written,
                " (up to date)" if res.skipped_scene else "", len(res.frames_skipped))
    problems = res.problems()  # a damaged video once, not once per missing frame
    for item, reason in problems[:20]:
        logger.warning("scene %s %s: %s", scene, item, reason)
    if len(problems) > 20:
        logger.warning("scene %s: %d more problems in the report", scene, len(problems) - 20)
    return res


@task(name="megadepth-preprocess", cache_policy=NO_CACHE, tags=["aerial", "megadepth"], retries=1)
def megadepth_task(md_root: str, scene: str, subscene: str, names: list[str], model: dict, out_dir: str) -> list:
    return [megadepth.preprocess_image(Path(md_root), scene, subscene, n, model.get(n), Path(out_dir))
            for n in names]


@task(name="collect-images", cache_policy=NO_CACHE, tags=["aerial", "sfm"], retries=1)
def collect_task(paths):
    return pipeline.collect_images(paths)


@task(name="features", cache_policy=NO_CACHE, tags=["aerial", "sfm"], retries=2)
def features_task(paths, cfg, names: list[str], part: tuple[int, int] | None):
    t0 = time.monotonic()
    pipeline.extract(paths, cfg, names, part)
    return time.monotonic() - t0


@task(name="merge-features", cache_policy=NO_CACHE, tags=["aerial", "sfm"], retries=1)
def merge_features_task(paths, n_parts: int):
    return pipeline.merge_feature_parts(paths, n_parts)


@task(name="pairs", cache_policy=NO_CACHE, tags=["aerial", "sfm"], retries=1)
def pairs_task(paths, cfg, info):
    return pipeline.make_pairs(paths, cfg, info)


@task(name="matches", cache_policy=NO_CACHE, tags=["aerial", "sfm"], retries=2)
def matches_task(paths, cfg, part: tuple[int, int] | None):
    t0 = time.monotonic()
    pipeline.match(paths, cfg, part)
    return time.monotonic() - t0


@task(name="merge-matches", cache_policy=NO_CACHE, tags=["aerial", "sfm"], retries=1)
def merge_matches_task(paths, n_parts: int):
    return pipeline.merge_match_parts(paths, n_parts)


@task(name="reference-triangulation", cache_policy=NO_CACHE, tags=["aerial", "sfm"], retries=1)
def reference_task(paths, cfg):
    res = pipeline.reference(paths, cfg)
    get_run_logger().info("scene %s reference: %s%s", paths.scene, res.counts, " (up to date)" if res.skipped else "")
    return res


@task(name="localization", cache_policy=NO_CACHE, tags=["aerial", "sfm"], retries=1)
def localize_task(paths, cfg, info):
    res = pipeline.localize(paths, cfg, info)
    get_run_logger().info("scene %s localization: %s%s", paths.scene, res.counts,
                          " (up to date)" if res.skipped else "")
    return res


@task(name="dense-gpu-probe", cache_policy=NO_CACHE, tags=["aerial", "dense", "gpu"], retries=1)
def gpu_capabilities_task():
    """What the GPU worker it lands on can run (submit it with the Dask resource ``GPU``)."""
    return backends.gpu_capabilities()


@task(name="dense-prepare", cache_policy=NO_CACHE, tags=["aerial", "dense"], retries=1)
def dense_prepare_task(paths, backend):
    return pipeline.prepare_dense(paths, backend)


@task(name="dense-step", cache_policy=NO_CACHE, tags=["aerial", "dense"], retries=1)
def dense_step_task(paths, backend, names: list[str], step: str):
    """One step of the dense backend over a batch of images (backends.DenseBackend.run_batch)."""
    match_worker_threads()
    first = f" from {names[0]}" if names else ""
    with Progress(f"scene {paths.scene} dense {step}{first}", len(names), "images") as progress:
        out = pipeline.dense_step(paths, backend, names, step, progress=progress.update)
    return {**out, "worker": worker_address()}


@task(name="dense-fuse", cache_policy=NO_CACHE, tags=["aerial", "dense"], retries=1)
def dense_fuse_task(paths, backend, names: list[str]):
    """Fusion (dense/fused.ply) and the final depth maps of the backend's steps."""
    out = pipeline.dense_fuse(paths, backend, names)
    get_run_logger().info("scene %s fusion: %s", paths.scene, out.get("fusion"))
    return {**out, "worker": worker_address()}


@task(name="export", cache_policy=NO_CACHE, tags=["aerial"], retries=1)
def export_task(paths):
    return pipeline.export_product(paths)


@task(name="covisibility-plan", cache_policy=NO_CACHE, tags=["aerial", "exports"], retries=1)
def covis_plan_task(product: str, work: str, ecfg):
    return covisibility.plan(Path(product), Path(work), ecfg.covisibility)


@task(name="covisibility-block", cache_policy=NO_CACHE, tags=["aerial", "exports"], retries=1)
def covis_block_task(block, ecfg):
    t0 = time.monotonic()
    covisibility.run(block, ecfg.covisibility)
    return time.monotonic() - t0


@task(name="training-export-scene", cache_policy=NO_CACHE, tags=["aerial", "exports"], retries=1)
def training_scene_task(export: str, paths, plan, ecfg, features: dict):
    return training_export.export_scene(Path(export), paths.scene, paths.product, training_export.reference_names(paths.scene_dir), plan,
                          ecfg, features, ground_truth=paths.ground_truth)


@task(name="training-export-index", cache_policy=NO_CACHE, tags=["aerial", "exports"], retries=1)
def training_index_task(export: str, ecfg):
    return training_export.export_dataset(Path(export), None, ecfg)


@task(name="evaluate", cache_policy=NO_CACHE, tags=["aerial"])
def evaluate_task(paths, queries: list[str]):
    return evaluate.evaluate_scene(paths.product, paths.ground_truth, queries)
