"""Prefect task wrappers of the aerial stages: retries, tags, logging; no logic.

The plain functions they call (``tasks/aerial/*.py``, ``tasks.aerial.pipeline``) are
tested without Prefect. The dense stage's backend choice and its submission (GPU
annotation, CPU batches, PatchMatch passes) sit here, next to the dense tasks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.common.runtime import match_worker_threads, worker_address


@task(name="synthetic-world", cache_policy=NO_CACHE, tags=["aerial"])
def world_task(root: str, options: dict[str, Any]) -> str:
    from tasks.aerial.synthetic_world import ensure_world
    from tasks.common.progress import Progress

    with Progress("synthetic world", 0, "renders") as progress:
        info = ensure_world(Path(root), progress=progress.update, **options)
    get_run_logger().info("synthetic world ready in %s", root)
    return str(info.scene) if hasattr(info, "scene") else "0001"


@task(name="plan", cache_policy=NO_CACHE, tags=["aerial", "plan"])
def plan_task(root: str, place, trajectory):
    from tasks.aerial.plan import plan_scene

    res = plan_scene(Path(root), place, trajectory)
    if res.invalid:
        get_run_logger().warning("scene %s: the earlier project was invalid and is replaced: %s", place.scene,
                                 res.invalid)
    get_run_logger().info("scene %s: plan of %d cameras%s: %s", place.scene, res.cameras,
                          " (up to date)" if res.skipped else "", res.esp)
    return res


@task(name="earth-studio-ingest", cache_policy=NO_CACHE, tags=["aerial", "ingest"], retries=1)
def ingest_task(root: str, scene: str):
    from tasks.aerial.earthstudio import ingest_scene

    res = ingest_scene(Path(root), scene)
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
    from tasks.aerial import megadepth

    return [megadepth.preprocess_image(Path(md_root), scene, subscene, n, model.get(n), Path(out_dir))
            for n in names]


@task(name="collect-images", cache_policy=NO_CACHE, tags=["aerial", "sfm"], retries=1)
def collect_task(paths):
    from tasks.aerial import pipeline as PL

    return PL.collect_images(paths)


@task(name="features", cache_policy=NO_CACHE, tags=["aerial", "sfm"], retries=2)
def features_task(paths, cfg, names: list[str], part: tuple[int, int] | None):
    from tasks.aerial import pipeline as PL

    t0 = time.monotonic()
    PL.extract(paths, cfg, names, part)
    return time.monotonic() - t0


@task(name="merge-features", cache_policy=NO_CACHE, tags=["aerial", "sfm"], retries=1)
def merge_features_task(paths, n_parts: int):
    from tasks.aerial import pipeline as PL

    return PL.merge_feature_parts(paths, n_parts)


@task(name="pairs", cache_policy=NO_CACHE, tags=["aerial", "sfm"], retries=1)
def pairs_task(paths, cfg, info):
    from tasks.aerial import pipeline as PL

    return PL.make_pairs(paths, cfg, info)


@task(name="matches", cache_policy=NO_CACHE, tags=["aerial", "sfm"], retries=2)
def matches_task(paths, cfg, part: tuple[int, int] | None):
    from tasks.aerial import pipeline as PL

    t0 = time.monotonic()
    PL.match(paths, cfg, part)
    return time.monotonic() - t0


@task(name="merge-matches", cache_policy=NO_CACHE, tags=["aerial", "sfm"], retries=1)
def merge_matches_task(paths, n_parts: int):
    from tasks.aerial import pipeline as PL

    return PL.merge_match_parts(paths, n_parts)


@task(name="reference-triangulation", cache_policy=NO_CACHE, tags=["aerial", "sfm"], retries=1)
def reference_task(paths, cfg):
    from tasks.aerial import pipeline as PL

    res = PL.reference(paths, cfg)
    get_run_logger().info("scene %s reference: %s%s", paths.scene, res.counts, " (up to date)" if res.skipped else "")
    return res


@task(name="localization", cache_policy=NO_CACHE, tags=["aerial", "sfm"], retries=1)
def localize_task(paths, cfg, info):
    from tasks.aerial import pipeline as PL

    res = PL.localize(paths, cfg, info)
    get_run_logger().info("scene %s localization: %s%s", paths.scene, res.counts,
                          " (up to date)" if res.skipped else "")
    return res


@task(name="dense-prepare", cache_policy=NO_CACHE, tags=["aerial", "dense"], retries=1)
def dense_prepare_task(paths, cfg):
    from tasks.aerial import pipeline as PL

    return PL.prepare_dense(paths, cfg)


@task(name="dense-cpu", cache_policy=NO_CACHE, tags=["aerial", "dense", "cpu"], retries=1)
def dense_cpu_task(paths, cfg, names: list[str]):
    """SGBM backend (depth h5 directly)."""
    from tasks.aerial import pipeline as PL

    match_worker_threads()
    return {**PL.dense_depths_cpu(paths, cfg, names), "worker": worker_address()}


@task(name="dense-patchmatch", cache_policy=NO_CACHE, tags=["aerial", "dense", "cpu"], retries=1)
def dense_patch_match_task(paths, cfg, names: list[str], phase: str):
    from tasks.aerial import pipeline as PL

    from tasks.common.progress import Progress

    match_worker_threads()
    first = f" from {names[0]}" if names else ""
    with Progress(f"scene {paths.scene} dense {phase}{first}", len(names), "images") as progress:
        out = PL.dense_patch_match(paths, cfg, names, phase, progress=progress.update)
    return {**out, "worker": worker_address()}


@task(name="dense-finish", cache_policy=NO_CACHE, tags=["aerial", "dense"], retries=1)
def dense_finish_task(paths, cfg, names: list[str]):
    """Fusion (pycolmap.stereo_fusion) and export of the CPU PatchMatch maps to depths/<stem>.h5."""
    from tasks.aerial import pipeline as PL

    out = PL.dense_finish(paths, cfg, names)
    get_run_logger().info("scene %s fusion: %s", paths.scene, out.get("fusion"))
    return {**out, "finish": True}


@task(name="dense-gpu", cache_policy=NO_CACHE, tags=["aerial", "dense", "gpu"], retries=1)
def dense_gpu_task(paths, cfg, names: list[str]):
    from tasks.aerial import pipeline as PL

    return {**PL.dense_depths_gpu(paths, cfg, names), "worker": worker_address()}


@task(name="dense-fuse", cache_policy=NO_CACHE, tags=["aerial", "dense"], retries=1)
def fuse_task(paths, cfg):
    from tasks.aerial import pipeline as PL

    return str(PL.fuse_cpu(paths, cfg))


@task(name="export", cache_policy=NO_CACHE, tags=["aerial"], retries=1)
def export_task(paths):
    from tasks.aerial import pipeline as PL

    return PL.export_product(paths)


@task(name="covisibility-plan", cache_policy=NO_CACHE, tags=["aerial", "exports"], retries=1)
def covis_plan_task(product: str, work: str, ecfg):
    from tasks.aerial import covisibility as C

    return C.plan(Path(product), Path(work), ecfg.covisibility)


@task(name="covisibility-block", cache_policy=NO_CACHE, tags=["aerial", "exports"], retries=1)
def covis_block_task(plan, index: int, ecfg):
    from tasks.aerial import covisibility as C

    t0 = time.monotonic()
    C.run_block(plan, index, ecfg.covisibility)
    return time.monotonic() - t0


@task(name="training-export-scene", cache_policy=NO_CACHE, tags=["aerial", "exports"], retries=1)
def training_scene_task(export: str, paths, plan, ecfg, features: dict):
    from tasks.aerial import training_export as T

    return T.export_scene(Path(export), paths.scene, paths.product, T.reference_names(paths.scene_dir), plan,
                          ecfg, features, ground_truth=paths.ground_truth)


@task(name="training-export-index", cache_policy=NO_CACHE, tags=["aerial", "exports"], retries=1)
def training_index_task(export: str, ecfg):
    from tasks.aerial import training_export as T

    return T.export_dataset(Path(export), None, ecfg)


@task(name="evaluate", cache_policy=NO_CACHE, tags=["aerial"])
def evaluate_task(paths, queries: list[str]):
    from tasks.aerial.evaluate import evaluate_scene

    return evaluate_scene(paths.product, paths.ground_truth, queries)


# --------------------------------------------------------------------------
# the dense stage: backend choice and submission
# --------------------------------------------------------------------------
def resolve_dense_backend(requested: str, gpus: list[str]) -> tuple[str, str]:
    """(backend, why). A GPU task is only ever submitted when a worker offers ``GPU``,
    so it can never wait for a worker that does not exist."""
    if requested == "cpu":
        return "cpu", "CPU backend requested"
    if gpus:
        return "gpu", f"GPU backend: {len(gpus)} worker(s) declare GPU ({', '.join(gpus)})"
    why = "no Dask worker declares the resource GPU"
    if requested == "gpu":
        return "cpu", f"GPU backend requested but {why}: CPU backend instead"
    return "cpu", f"CPU backend: {why}"


def submit_dense(paths, cfg, names: list[str], backend: str, batch: int) -> list:
    """The dense tasks of one scene, as futures: GPU PatchMatch as one task tagged with the Dask
    resource ``GPU``; SGBM in batches of ``batch`` images over the workers; CPU PatchMatch as
    photometric maps of every batch, then the geometric pass, then fusion + export (its last
    future is the ``finish`` one)."""
    import dask

    batches = [names[i:i + batch] for i in range(0, len(names), batch)]
    if backend == "gpu":
        with dask.annotate(resources={"GPU": 1}):
            return [dense_gpu_task.submit(paths, cfg, names)]
    if cfg.dense.cpu_method == "sgbm":
        return [dense_cpu_task.submit(paths, cfg, b) for b in batches]
    phot = [dense_patch_match_task.submit(paths, cfg, b, "photometric") for b in batches]
    geom = [dense_patch_match_task.submit(paths, cfg, b, "geometric", wait_for=phot)
            for b in batches] if cfg.dense.pm_geom_iterations > 0 else []
    return phot + geom + [dense_finish_task.submit(paths, cfg, names, wait_for=geom or phot)]


def needs_fusion_task(backend: str, cfg) -> bool:
    """SGBM's depths are fused by their own task; the PatchMatch paths fuse in their finish step."""
    return backend == "cpu" and cfg.dense.cpu_method == "sgbm"
