"""Aerial-ground scenes flow (AerialMegaDepth).

Stages: planning (camera paths for the places given: ``plans/<scene>.esp`` to render in
Earth Studio and ``plans/<scene>.plan.json``) -> synthetic world (embedded default,
rendered from its own plan, only when no data is given)
-> Earth Studio ingest per scene -> MegaDepth preprocessing per image
-> features (fanned out) -> pairs (poses, retrieval) -> matches (fanned out)
-> reference triangulation -> localization of the photos -> dense depth
(GPU PatchMatch on GPU-tagged workers, else the CPU backend, per image)
-> export of ``localized_dense_metric/`` -> training exports (covisibility blocks over
the workers, scene info, pair lists, index) -> accuracy (when ground truth exists)
-> a report per scene. Scenes run side by side; every stage is skipped on a
rerun when its outputs are complete.

    python -m flows.aerial                                   # the embedded synthetic world
    python -m flows.aerial --root /data/aerial --megadepth /data/MegaDepth \\
        --scene-list megadepth_image_list_v0.npz --scenes 0001 0002
    python -m flows.aerial --root /data/aerial --places places.yaml --plan-only   # plans only

A scene that fails makes the command exit with status 1 after the other scenes finish.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.aerial import layout as L
from tasks.common.atomic import write_json_atomic
from tasks.common.report import RunReport
from tasks.common.cli import EXIT_CONFIG, ConfigError, build, merge, parse_sets
from tasks.common.runlock import EXIT_BUSY, OutputBusy, exclusive_output
from tasks.common.runtime import DaskSettings, load_dask_block, local_prefect_server, make_task_runner
from tasks.common.forms import grouped_titles


#: Named pipeline configurations (tasks.aerial.pipeline.CONFS) and dense backends, as form choices.
PipelineName = Literal["sift+mnn", "superpoint+superglue"]
DenseBackend = Literal["auto", "cpu", "gpu"]


class AerialConfig(BaseModel):
    """Where the inputs are and where the outputs go (paths as the contract's layout)."""

    # a misspelt key is an error, never silently ignored; form labels read "Group · field"
    model_config = ConfigDict(extra="forbid", field_title_generator=grouped_titles({
        "Inputs": ["root", "megadepth", "megadepth_out", "scene_list", "scenes"],
        "Synthetic world": ["synthetic", "world_options"],
        "Pipeline": ["pipeline", "dense_backend", "pipeline_options"],
        "Cluster": ["image_batch", "dense_batch", "fan_out", "dask", "dask_block"],
        "Planning": ["places", "trajectory", "trajectory_options", "plan_only"],
        "Training exports": ["exports"],
    }))

    root: str = Field("output/aerial", description="Earth Studio root: downloaded_data/ in, data/<scene>/ out")
    megadepth: str | None = Field(None, description="raw MegaDepth root (default ROOT/megadepth)")
    megadepth_out: str | None = Field(None, description="processed MegaDepth (default ROOT/megadepth_processed)")
    scene_list: str | None = Field(None, description="scene list (.npz as the original, or JSON/YAML); "
                                                     "default MEGADEPTH/scene_list.json")
    scenes: list[str] | None = Field(None, description="only these scene ids (default: every scene with an export)")
    synthetic: bool = Field(True, description="generate the embedded synthetic world into ROOT if it has no data")
    world_options: dict[str, Any] = Field(default_factory=dict, description="synthetic world settings "
                                          "(seed, n_aerial, n_ground, size, ...)")
    image_batch: int = Field(8, ge=1, description="MegaDepth images per Dask task")
    pipeline: PipelineName = Field(
        "sift+mnn", description="named configuration of the SfM and dense stages: sift+mnn (pycolmap SIFT, "
        "mutual nearest neighbours, VLAD retrieval; offline, CPU) or superpoint+superglue (the paper's: "
        "SuperPoint, SuperGlue, NetVLAD through hloc, which must be installed with its weights)")
    dense_backend: DenseBackend = Field(
        "auto", description="depth maps: auto (GPU PatchMatch when a Dask worker declares the resource GPU, "
        "else CPU), cpu (OpenCV semi-global matching) or gpu (PatchMatch; falls back to CPU, saying so, "
        "when no worker has a GPU)")
    pipeline_options: dict[str, Any] = Field(default_factory=dict, description="overrides of the pipeline's "
                                             "settings, e.g. {\"retrieval_num\": 30, \"dense\": {\"num_sources\": 6}}")
    dense_batch: int = Field(4, ge=1, description="images per CPU dense task")
    fan_out: int | None = Field(None, ge=1, description="parts for features/matching (default: Dask workers)")
    places: str | None = Field(None, description="places to plan (JSON/YAML list of scene, latitude, longitude, "
                                                 "ground_altitude, radius): writes ROOT/plans/<scene>.esp and .plan.json")
    trajectory: str = Field("spiral+streets", description="named trajectory configuration of the planning stage "
                                                          "(tasks.aerial.plan.TRAJECTORIES)")
    trajectory_options: dict[str, Any] = Field(default_factory=dict, description="overrides of that trajectory, "
                                               "e.g. {'frames': 150, 'fov': 40, 'spiral_altitudes': [400, 60]}")
    plan_only: bool = Field(False, description="only plan: render the .esp projects in Earth Studio, then rerun")
    exports: dict[str, Any] = Field(default_factory=dict, description="training exports settings "
                                    "(tasks.aerial.training_export.ExportConfig), e.g. {'root': '/data/train', "
                                    "'covisibility': {'rel_tolerance': 0.1}}")
    dask: DaskSettings = Field(default_factory=DaskSettings, description="where the tasks run")
    dask_block: str | None = Field(None, description="name of a saved DaskCluster block; overrides dask")

    def dask_settings(self) -> DaskSettings:
        """The cluster this run uses: the saved ``dask_block`` if named, else ``dask``."""
        return load_dask_block(self.dask_block) if self.dask_block else self.dask

    @model_validator(mode="after")
    def _cross_field(self) -> "AerialConfig":
        from tasks.aerial import pipeline as PL

        try:
            PL.get_config(self.pipeline, **self.pipeline_options)
        except (KeyError, TypeError, ValueError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise ValueError(f"pipeline {self.pipeline!r} with pipeline_options {self.pipeline_options}: {msg}") from None
        if self.scenes is not None and not all(isinstance(x, str) and x.strip() for x in self.scenes):
            raise ValueError(f"scenes {self.scenes} must be non-empty scene ids such as '0001'")
        return self

    def check_inputs(self) -> None:
        """Check the root, MegaDepth folder and scene list this configuration names; raise one
        :class:`ConfigError` naming the path on the first mistake. Cheap: run it before starting any
        server or cluster."""
        from tasks.aerial import megadepth

        p = self.paths()
        has_data = (p["root"] / L.DOWNLOADED).is_dir()
        if not has_data and not self.synthetic and not self.places:
            raise ConfigError(f"root {p['root']}: no downloaded_data/ folder with Earth Studio exports "
                              "(<scene>.json + <scene>.mp4); point root at them (or allow the synthetic world)")
        if has_data:
            exports = L.downloaded_scenes(p["root"])
            unknown = sorted(set(self.scenes or []) - set(exports))
            if unknown:
                raise ConfigError(f"scenes {unknown} have no Earth Studio export in {p['root'] / 'downloaded_data'}"
                                  f" (exports: {exports[:10]}); fix scenes or the root")
        if self.megadepth and not p["megadepth"].is_dir():
            raise ConfigError(f"megadepth {p['megadepth']}: not a folder; give the raw MegaDepth root")
        if self.scene_list or p["scene_list"].exists():
            try:
                entries = megadepth.load_scene_list(p["scene_list"])
            except (OSError, ValueError) as exc:
                raise ConfigError(f"scene_list: {exc}") from None
            if self.scenes and has_data and not {e.scene for e in entries} & set(self.scenes):
                raise ConfigError(f"scene_list {p['scene_list']} has no entry for scenes {self.scenes}; "
                                  "check the scene ids")

    def paths(self) -> dict[str, Path]:
        root = Path(self.root).expanduser().resolve()
        md = Path(self.megadepth).expanduser().resolve() if self.megadepth else L.default_megadepth(root)
        return {
            "root": root, "megadepth": md,
            "megadepth_out": Path(self.megadepth_out).expanduser().resolve() if self.megadepth_out
            else L.default_megadepth_out(root),
            "scene_list": Path(self.scene_list).expanduser().resolve() if self.scene_list else L.default_scene_list(md),
        }


# --------------------------------------------------------------------------
# tasks: thin wrappers
# --------------------------------------------------------------------------
@task(name="synthetic-world", cache_policy=NO_CACHE, tags=["aerial"])
def world_task(root: str, options: dict[str, Any]) -> str:
    from tasks.aerial.synthetic_world import ensure_world

    info = ensure_world(Path(root), **options)
    get_run_logger().info("synthetic world ready in %s", root)
    return str(info.scene) if hasattr(info, "scene") else "0001"


@task(name="plan", cache_policy=NO_CACHE, tags=["aerial", "plan"])
def plan_task(root: str, place, trajectory):
    from tasks.aerial.plan import plan_scene

    res = plan_scene(Path(root), place, trajectory)
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

    _match_worker_threads()
    return {**PL.dense_depths_cpu(paths, cfg, names), "worker": _worker_address()}


@task(name="dense-patchmatch", cache_policy=NO_CACHE, tags=["aerial", "dense", "cpu"], retries=1)
def dense_patch_match_task(paths, cfg, names: list[str], phase: str):
    from tasks.aerial import pipeline as PL

    _match_worker_threads()
    return {**PL.dense_patch_match(paths, cfg, names, phase), "worker": _worker_address()}


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

    return {**PL.dense_depths_gpu(paths, cfg, names), "worker": _worker_address()}


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
                          ecfg, features)


@task(name="training-export-index", cache_policy=NO_CACHE, tags=["aerial", "exports"], retries=1)
def training_index_task(export: str, ecfg):
    from tasks.aerial import training_export as T

    return T.export_dataset(Path(export), None, ecfg)


@task(name="evaluate", cache_policy=NO_CACHE, tags=["aerial"])
def evaluate_task(paths, queries: list[str]):
    from tasks.aerial.evaluate import evaluate_scene

    return evaluate_scene(paths.product, paths.ground_truth, queries)


def _match_worker_threads() -> None:
    """OpenCV's and numba's thread pools as wide as this Dask worker's thread count: with one
    worker process per core, one thread each, so concurrent tasks do not oversubscribe the
    cores."""
    try:
        import cv2
        from distributed import get_worker

        n = max(1, int(get_worker().state.nthreads))
    except Exception:  # noqa: BLE001 - not on a Dask worker: leave the defaults
        return
    cv2.setNumThreads(n)
    import numba

    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except Exception:  # noqa: BLE001 - not on a Dask worker
        return None


def gpu_workers() -> list[str]:
    """Addresses of the Dask workers that declare the resource ``GPU`` (none when the
    flow does not run on a Dask task runner)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    client = getattr(getattr(ctx, "task_runner", None), "client", None) if ctx else None
    if client is None:
        return []
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return sorted(a for a, w in workers.items() if (w.get("resources") or {}).get("GPU", 0) >= 1)


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


def _results(futs: dict, reports: dict, stage: str) -> dict:
    """Wait for ``{future: scene}``; failures become problems of their scene."""
    out: dict = {}
    for fut in as_completed(list(futs)):
        s = futs[fut]
        try:
            out.setdefault(s, []).append(fut.result())
        except Exception as exc:  # noqa: BLE001 - one scene never sinks the others
            reports[s].problem(s, stage, f"{type(exc).__name__}: {exc}")
            out.setdefault(s, []).append(exc)
    return out


def pipeline_settings(config: "AerialConfig"):
    """The named pipeline configuration with the run's overrides; ``dense_backend`` sets the
    dense backend unless ``pipeline_options.dense.backend`` names one explicitly."""
    from tasks.aerial import pipeline as PL

    options = dict(config.pipeline_options)
    options["dense"] = {"backend": config.dense_backend, **(options.get("dense") or {})}
    return PL.get_config(config.pipeline, **options)


def run_scene_stages(config: "AerialConfig", p: dict, scenes: list[str], reports: dict) -> dict[str, Any]:
    """Features -> ... -> evaluation for every scene, scenes side by side."""
    import dask

    from tasks.aerial import pipeline as PL

    logger = get_run_logger()
    cfg = pipeline_settings(config)
    if cfg.backend == "hloc" and not PL.hloc_available():
        raise RuntimeError(f"pipeline {cfg.name!r} needs hloc (pip install from "
                           "https://github.com/cvg/Hierarchical-Localization); use 'sift+mnn' without it")
    paths = {s: PL.scene_paths(p["root"], s, p["megadepth_out"], cfg) for s in scenes}
    alive = [s for s in scenes if (paths[s].reference_empty / "images.txt").exists()]
    parts = config.fan_out or _n_workers()

    def failed(s, res):
        return any(isinstance(r, Exception) for r in res.get(s, []))

    def timed(stage, fn):
        t0 = time.monotonic()
        out = fn()
        for s in alive:
            reports[s].timings[stage] = time.monotonic() - t0
        return out

    # images
    res = timed("collect", lambda: _results({collect_task.submit(paths[s]): s for s in alive}, reports, "collect"))
    infos = {s: res[s][0] for s in alive if not failed(s, res)}
    for s, info in infos.items():
        reports[s].counts["photos to localize"] = len(info["queries"])
        for name, why in info["problems"].items():
            reports[s].problem(name, "collect", why)
    alive = list(infos)

    # features, fanned out
    def features():
        futs = {}
        for s in alive:
            names = PL.missing_features(paths[s], infos[s]["reference"] + sorted(infos[s]["queries"]))
            n = max(1, min(parts, len(names) // 8)) if cfg.backend == "builtin" else 1
            if not names:
                continue
            if n == 1:
                futs[features_task.submit(paths[s], cfg, names, None)] = s
            else:
                fs = [features_task.submit(paths[s], cfg, names, (i, n)) for i in range(n)]
                futs[merge_features_task.submit(paths[s], n, wait_for=fs)] = s
        return _results(futs, reports, "features")
    res = timed("features", features)
    alive = [s for s in alive if not failed(s, res)]
    for s in alive:
        missing = PL.missing_features(paths[s], sorted(infos[s]["queries"]))
        for name in missing:
            reports[s].problem(name, "features", "no features (unreadable image)")

    res = timed("pairs", lambda: _results({pairs_task.submit(paths[s], cfg, infos[s]): s for s in alive},
                                          reports, "pairs"))
    alive = [s for s in alive if not failed(s, res)]
    for s in alive:
        reports[s].counts.update(res[s][0])

    def matches():
        futs = {}
        for s in alive:
            n = parts if cfg.backend == "builtin" else 1
            if n == 1:
                futs[matches_task.submit(paths[s], cfg, None)] = s
            else:
                fs = [matches_task.submit(paths[s], cfg, (i, n)) for i in range(n)]
                futs[merge_matches_task.submit(paths[s], n, wait_for=fs)] = s
        return _results(futs, reports, "matches")
    res = timed("matches", matches)
    alive = [s for s in alive if not failed(s, res)]

    res = timed("reference", lambda: _results({reference_task.submit(paths[s], cfg): s for s in alive},
                                              reports, "reference"))
    alive = [s for s in alive if not failed(s, res)]
    for s in alive:
        reports[s].counts.update(res[s][0].counts)

    res = timed("localization", lambda: _results({localize_task.submit(paths[s], cfg, infos[s]): s for s in alive},
                                                 reports, "localization"))
    alive = [s for s in alive if not failed(s, res)]
    for s in alive:
        r = res[s][0]
        reports[s].counts.update({k: v for k, v in r.counts.items() if "seconds" not in k})
        for name, why in r.problems.items():
            reports[s].problem(name, "localization", why)

    # dense: the backend follows the cluster
    backend, why = resolve_dense_backend(cfg.dense.backend, gpu_workers())
    logger.info(why)
    res = timed("dense-prepare", lambda: _results({dense_prepare_task.submit(paths[s], cfg): s for s in alive},
                                                  reports, "dense"))
    alive = [s for s in alive if not failed(s, res)]
    dense_names = {s: res[s][0] for s in alive}

    def dense():
        futs = {}
        for s in alive:
            reports[s].notes.append(why)
            reports[s].counts["dense backend"] = backend
            names = dense_names[s]
            batches = [names[i:i + config.dense_batch] for i in range(0, len(names), config.dense_batch)]
            if backend == "gpu":
                with dask.annotate(resources={"GPU": 1}):
                    futs[dense_gpu_task.submit(paths[s], cfg, names)] = s
            elif cfg.dense.cpu_method == "sgbm":
                for b in batches:
                    futs[dense_cpu_task.submit(paths[s], cfg, b)] = s
            else:  # PatchMatch: photometric maps of all, then the geometric pass, then fusion + export
                phot = [dense_patch_match_task.submit(paths[s], cfg, b, "photometric") for b in batches]
                geom = [dense_patch_match_task.submit(paths[s], cfg, b, "geometric", wait_for=phot)
                        for b in batches] if cfg.dense.pm_geom_iterations > 0 else phot
                for f in phot + (geom if geom is not phot else []):
                    futs[f] = s
                futs[dense_finish_task.submit(paths[s], cfg, names, wait_for=geom)] = s
        return _results(futs, reports, "dense")
    res = timed("dense", dense)
    workers_used: dict[str, set] = {}
    for s in alive:
        ok = [r for r in res.get(s, []) if not isinstance(r, Exception)]
        failures = {k: v for r in ok for k, v in r.get("failures", {}).items()}
        for name, why_ in failures.items():
            reports[s].problem(name, "dense", why_)
        done = [r for r in ok if r.get("finish")] or ok  # PatchMatch: the export's stats count
        reports[s].counts["depth maps"] = sum(len(r.get("stats", {})) for r in done)
        workers_used[s] = {r.get("worker") for r in ok} - {None}
    alive = [s for s in alive if not failed(s, res)]
    if backend == "cpu" and cfg.dense.cpu_method == "sgbm":
        res = timed("fusion", lambda: _results({fuse_task.submit(paths[s], cfg): s for s in alive}, reports, "fusion"))
    res = timed("export", lambda: _results({export_task.submit(paths[s]): s for s in alive}, reports, "export"))
    alive = [s for s in alive if not failed(s, res)]
    for s in alive:
        reports[s].counts.update(res[s][0])
        reports[s].outputs["product"] = str(paths[s].product)

    run_training_exports(config, p, paths, alive, reports, cfg)

    with_gt = [s for s in alive if (paths[s].ground_truth / "sparse").is_dir()]
    res = timed("evaluate", lambda: _results({evaluate_task.submit(paths[s], sorted(infos[s]["queries"])): s
                                              for s in with_gt}, reports, "evaluate"))
    accuracy = {s: res[s][0] for s in with_gt if not failed(s, res)}
    return {"paths": paths, "accuracy": accuracy, "backend": backend, "dense workers": workers_used,
            "config": cfg.name}


def run_training_exports(config: "AerialConfig", p: dict, paths: dict, scenes: list[str], reports: dict, cfg) -> None:
    """Scene info, dense covisibility (candidate pairs in blocks over the workers), pair
    lists and layouts per scene, then the dataset index (tasks/aerial/training_export.py)."""
    from tasks.aerial import training_export as T

    ecfg = T.export_config(**config.exports)
    export = Path(ecfg.root).expanduser().resolve() if ecfg.root else p["root"] / "training"
    features = {"pipeline": cfg.name, "features": cfg.features, "matcher": cfg.matcher,
                "retrieval": cfg.retrieval, "sfm folder": paths[scenes[0]].sfm.name if scenes else None,
                "dense backend": reports[scenes[0]].counts.get("dense backend") if scenes else None}
    t0 = time.monotonic()
    plans = _results({covis_plan_task.submit(str(paths[s].product), str(T.covisibility_work(export, s)), ecfg): s
                      for s in scenes}, reports, "covisibility")
    plans = {s: r[0] for s, r in plans.items() if not isinstance(r[0], Exception)}
    futs = {covis_block_task.submit(pl, k, ecfg): s for s, pl in plans.items() for k in pl.missing_blocks()}
    blocks = _results(futs, reports, "covisibility")
    ok = [s for s in plans if not any(isinstance(r, Exception) for r in blocks.get(s, []))]
    for s in ok:
        reports[s].counts.update({f"covisibility {k}": v for k, v in plans[s].counts.items()})
        reports[s].timings["covisibility"] = time.monotonic() - t0
    t1 = time.monotonic()
    done = _results({training_scene_task.submit(str(export), paths[s], plans[s], ecfg, features): s for s in ok},
                    reports, "training export")
    for s, r in done.items():
        if not isinstance(r[0], Exception):
            reports[s].timings["training export"] = time.monotonic() - t1
            reports[s].outputs["training export"] = str(export)
            reports[s].counts.update({f"pairs {k}": v["pairs"] for k, v in r[0]["ranges"].items()})
    if done:
        try:
            training_index_task(str(export), ecfg)
        except Exception as exc:  # noqa: BLE001 - the scenes' files stay; the index is rebuilt next run
            for s in done:
                reports[s].problem("index.json", "training export", f"{type(exc).__name__}: {exc}")


def _n_workers() -> int:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    client = getattr(getattr(ctx, "task_runner", None), "client", None) if ctx else None
    if client is None:
        return 1
    return max(1, len(client.scheduler_info(n_workers=-1)["workers"]))


# --------------------------------------------------------------------------
# the flow
# --------------------------------------------------------------------------
def _dask_settings(parameters: dict[str, Any]) -> DaskSettings:
    """The cluster of a run, from its own ``config`` parameter (local, deployed or scheduled alike)."""
    config = parameters.get("config")
    if not isinstance(config, AerialConfig):
        config = AerialConfig.model_validate(config or {})
    return config.dask_settings()


@flow(name="aerial", task_runner=make_task_runner(settings_from=_dask_settings), log_prints=True)
@exclusive_output(lambda config=None: (config or AerialConfig()).paths()["root"], "aerial root")
def aerial_flow(config: AerialConfig = AerialConfig()) -> dict[str, Any]:
    from tasks.aerial import megadepth

    logger = get_run_logger()
    p = config.paths()
    plans = run_planning(config, p["root"]) if config.places else {}
    plan_failed = {s: f"plan: {r['error']}" for s, r in plans.items() if "error" in r}
    if config.plan_only:
        return {"root": str(p["root"]), "plans": plans, "scenes": {}, "failed": plan_failed}
    if config.synthetic and not config.places and not (p["root"] / L.DOWNLOADED).is_dir():
        world_task(str(p["root"]), config.world_options)
    exports = L.downloaded_scenes(p["root"])
    scenes = [s for s in exports if not config.scenes or s in config.scenes]
    waiting = sorted(s for s, r in plans.items() if "error" not in r and s not in exports)
    for s in waiting:
        logger.info("scene %s is planned but not rendered yet: import %s in Earth Studio, render, and put "
                    "%s.mp4 and %s.json in %s", s, plans[s]["esp"], s, s, p["root"] / "downloaded_data")
    if not scenes and plans:  # planned, nothing rendered yet: the plans are the result
        return {"root": str(p["root"]), "plans": plans, "scenes": {}, "failed": plan_failed}
    if not scenes:
        raise FileNotFoundError(f"{p['root'] / 'downloaded_data'}: no Earth Studio export (<scene>.json + .mp4)")
    reports: dict[str, RunReport] = {s: RunReport(title=f"aerial scene {s}") for s in scenes}

    # 1. Earth Studio ingest, one task per scene
    t0 = time.monotonic()
    ingest_futs = {ingest_task.submit(str(p["root"]), s): s for s in scenes}
    ingested: dict[str, Any] = {}
    for fut in as_completed(list(ingest_futs)):
        s = ingest_futs[fut]
        try:
            res = fut.result()
        except Exception as exc:  # one bad scene never sinks the others
            reports[s].problem(s, "ingest", f"{type(exc).__name__}: {exc}")
            reports[s].counts["frames"] = 0
            continue
        ingested[s] = res
        reports[s].counts.update({"video frames": res.video_frames, "camera entries": res.camera_entries,
                                  "frames": res.frames_written, "frames skipped": len(res.frames_skipped)})
        for item, reason in res.problems():
            reports[s].problem(f"{s} video" if item == "video" else item, "ingest", reason)
        if res.plan_check:
            reports[s].notes.append(plan_check_note(res.plan_check))
            if not plan_check_ok(res.plan_check):
                reports[s].problem(f"{s} plan", "ingest", plan_check_note(res.plan_check))
    for r in reports.values():
        r.timings["ingest"] = time.monotonic() - t0

    # 2. MegaDepth preprocessing, parallel over images
    t0 = time.monotonic()
    entries = megadepth.load_scene_list(p["scene_list"]) if p["scene_list"].exists() else []
    if not entries:
        logger.warning("no scene list at %s: MegaDepth preprocessing skipped", p["scene_list"])
    md_futs = {}
    for e in entries:
        if e.scene not in reports:
            continue
        try:
            model = megadepth.read_sparse_model(p["megadepth"], e.scene, e.subscene)
        except Exception as exc:
            reports[e.scene].problem(f"{e.scene}/{e.subscene}", "megadepth", f"{type(exc).__name__}: {exc}")
            continue
        for i in range(0, len(e.images), config.image_batch):
            names = e.images[i:i + config.image_batch]
            sub = {n: model[n] for n in names if n in model}
            fut = megadepth_task.submit(str(p["megadepth"]), e.scene, e.subscene, names, sub, str(p["megadepth_out"]))
            md_futs[fut] = e
    for fut in as_completed(list(md_futs)):
        e = md_futs[fut]
        counts = reports[e.scene].counts
        try:
            results = fut.result()
        except Exception as exc:
            reports[e.scene].problem(f"{e.scene}/{e.subscene}", "megadepth", f"{type(exc).__name__}: {exc}")
            continue
        for r in results:
            key = f"megadepth {r.status}"
            counts[key] = counts.get(key, 0) + 1
            if r.status == "failed":
                reports[e.scene].problem(r.name, "megadepth", r.reason)
    for r in reports.values():
        r.timings["megadepth"] = time.monotonic() - t0

    # 3. features -> pairs -> matches -> reference -> localization -> dense -> export -> accuracy
    staged = run_scene_stages(config, p, list(ingested), reports)

    # 4. report per scene: counts, accuracy and a picture
    from tasks.aerial.evaluate import summary_rows, summary_table

    out: dict[str, Any] = {"root": str(p["root"]), "scenes": {}, "dense backend": staged["backend"],
                           "pipeline": staged["config"],
                           "dense workers": {s: sorted(w for w in ws if w) for s, ws in staged["dense workers"].items()}}
    from tasks.aerial.stale import clear_stale, mark_stale

    failed: dict[str, str] = {}
    for s, report in reports.items():
        why = scene_failure(s, report)
        product = report.outputs.get("product")
        if product:
            clear_stale(product)
        if s in ingested:
            clear_stale(L.SceneLayout(p["root"], s).scene_dir)
        if why:
            failed[s] = why
            current = [Path(product)] if product else []
            for path in mark_stale(p["root"], s, why, ingest_failed=s not in ingested, current=current):
                report.problem(path, "stale", "made by an earlier run and marked STALE: this run failed for the "
                                              "scene, so it does not reflect the current inputs")
    out["failed"] = {**plan_failed, **failed}
    out["plans"] = plans
    for s, report in reports.items():
        acc = staged["accuracy"].get(s)
        table = None
        if acc:
            table = summary_table(acc)
            report.notes.append("accuracy against ground truth:\n" + "\n".join(
                f"  {m}: {v} (goal {g})" for m, v, g in summary_rows(acc)))
            write_json_atomic(L.SceneLayout(p["root"], s).accuracy, acc, indent=1)
            report.extra["accuracy"] = {"poses": {k: v for k, v in acc["poses"].items() if k != "per photo"},
                                        "depth": {k: v for k, v in acc["depth"].items() if k != "per image"}}
        png = scene_picture(p, s, staged["paths"].get(s), acc)
        layout = L.SceneLayout(p["root"], s)
        report.outputs.update({"footage": str(layout.footage), "metadata": str(layout.metadata),
                               "ingest record": str(layout.ingest_record),
                               "reference model": str(layout.reference_empty),
                               "megadepth": str(p["megadepth_out"] / s)})
        report.write(layout.scene_dir, png, png_name=layout.overview.name)
        report.publish(key=f"aerial-{s}", map_png=png)
        if table:
            from prefect.artifacts import create_table_artifact

            create_table_artifact(key=f"aerial-{s}-accuracy", table=table,
                                  description=f"scene {s}: accuracy against ground truth")
        out["scenes"][s] = {**report.to_dict(), "accuracy": acc}
        logger.info("scene %s: %s", s, json.dumps(report.counts))
    return out


def _misses(per: dict) -> list[str]:
    from tasks.aerial.evaluate import DEPTH_GOALS, _depth_misses

    return _depth_misses(per, DEPTH_GOALS["photos"]) if per.get("pixels") else ["no depth"]


def run_planning(config: AerialConfig, root: Path) -> dict[str, dict[str, Any]]:
    """The planning stage for every place: ``{scene: {"esp", "plan", "cameras"} or {"error"}}``.
    A bad place or trajectory is reported for its scene; the other places are still planned."""
    from tasks.aerial import plan as planning

    logger = get_run_logger()
    errors: list[tuple[str, str]] = []
    places = planning.load_places(config.places, errors=errors)
    out: dict[str, dict[str, Any]] = {scene: {"error": why} for scene, why in errors}
    try:
        trajectory = planning.get_trajectory(config.trajectory, **config.trajectory_options)
    except planning.PlanError as exc:
        for pl in places:
            out[pl.scene] = {"error": str(exc)}
        places = []
    futs = {plan_task.submit(str(root), pl, trajectory): pl.scene for pl in places}
    for fut in as_completed(list(futs)):
        scene = futs[fut]
        try:
            res = fut.result()
            out[scene] = {"esp": str(res.esp), "plan": str(res.plan), "cameras": res.cameras}
        except Exception as exc:  # noqa: BLE001 - one bad place never sinks the others
            out[scene] = {"error": f"{type(exc).__name__}: {exc}"}
    for scene, r in sorted(out.items()):
        if "error" in r:
            logger.error("scene %s: not planned: %s", scene, r["error"])
    return out


def plan_check_ok(check: dict[str, Any], position_m: float = 1.0, rotation_deg: float = 0.2) -> bool:
    """An export lies on its plan: every camera within ``position_m`` and ``rotation_deg``."""
    if "error" in check or not check.get("cameras compared"):
        return False
    return (check["max position difference m"] <= position_m and check["max rotation difference deg"] <= rotation_deg
            and check["max fov difference deg"] <= 0.01)


def plan_check_note(check: dict[str, Any]) -> str:
    if "error" in check:
        return f"the scene's plan could not be read: {check['error']}"
    verdict = "matches" if plan_check_ok(check) else "DIFFERS FROM"
    return (f"Earth Studio export {verdict} its plan: {check['cameras compared']} of {check['planned cameras']} "
            f"planned cameras compared, worst {check['max position difference m']:.3g} m, "
            f"{check['max rotation difference deg']:.3g} deg, fov {check['max fov difference deg']:.3g} deg"
            + ("" if plan_check_ok(check) else "; check the Earth Studio import (altitudes, camera target) by eye"))


def scene_failure(scene: str, report: RunReport) -> str | None:
    """Why a scene counts as failed (exit status 1), None when it did not: a stage failed for
    the whole scene, no product was made, or its video is damaged."""
    whole = [f"{p['stage']}: {p['reason']}" for p in report.problems
             if p["item"] in (scene, f"{scene} video")]
    if whole:
        return "; ".join(whole)
    if not report.outputs.get("product"):
        return "no product was made"
    return None


def scene_picture(p: dict[str, Path], scene: str, sp=None, acc: dict | None = None) -> bytes | None:
    """A ground photo, its depth map, and the registered photos' cameras over the reference
    cameras (top-down, ENU). Before the dense stage: an aerial frame instead of the depth. With
    the accuracy (``acc``), the depth's title gives its coverage of the true surface next to its
    accuracy and says which goals are missed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from tasks.aerial.earthstudio import read_record

    meta = read_record(p["root"], scene)
    if meta is None:
        return None
    frames = meta.get("frames") or []
    product = sp.product if sp is not None else None
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), dpi=90, layout="constrained")
    try:
        photo = depth = None
        model = None
        if product is not None and (product / "sparse-txt" / "images.txt").exists():
            import pycolmap

            from tasks.aerial.dense import depth_path, read_depth_h5

            model = pycolmap.Reconstruction(str(product / "sparse-txt"))
            ref = {f["name"] for f in frames}
            photos = sorted(im.name for im in model.images.values() if im.name not in ref)
            best = -1.0
            for name in photos:  # the photo with the most depth
                if depth_path(product / "depths", name).exists():
                    d = read_depth_h5(depth_path(product / "depths", name))
                    if (d > 0).mean() > best:
                        best, photo, depth = float((d > 0).mean()), product / "images" / name, d
        if photo is not None:
            axes[0].imshow(plt.imread(photo))
            axes[0].set_title(f"ground photo {photo.name}")
            d = np.where(depth > 0, depth, np.nan)
            lo, hi = np.nanpercentile(d, [2, 98]) if np.isfinite(d).any() else (0.0, 1.0)
            im = axes[1].imshow(d, cmap="turbo", vmin=lo, vmax=hi)
            title = f"its depth (m), {100 * best:.0f} % of pixels; white: unknown"
            per = ((acc or {}).get("depth") or {}).get("per image", {}).get(photo.name)
            miss = _misses(per) if per else []
            if per and per.get("pixels"):
                title = (f"its depth (m): coverage {100 * per['coverage']:.0f} % of the true surface, AbsRel "
                         f"{per['absrel']:.3f}, {100 * per['within_1.25']:.0f} % within 1.25x\n"
                         + ("goals met" if not miss else "MISSED: " + "; ".join(miss)) + "; white: unknown")
            axes[1].set_title(title, fontsize=9, color="firebrick" if miss else "black")
            fig.colorbar(im, ax=axes[1], shrink=0.8)
        else:
            photos = sorted((p["megadepth_out"] / scene).glob("*/*.jpg"))
            photos = [x for x in photos if x.suffixes[-2:] != [".jpg", ".exr"]]
            if photos:
                axes[0].imshow(plt.imread(photos[0]))
                axes[0].set_title(f"ground {photos[0].name}")
            if frames:
                img = plt.imread(L.SceneLayout(p["root"], scene).footage / frames[len(frames) // 2]["name"])
                axes[1].imshow(img)
                axes[1].set_title(f"aerial {frames[len(frames) // 2]['name']}")
        if frames:
            pos = np.array([f["position_enu"] for f in frames])
            fwd = np.array([np.array(f["cam2world"])[:3, 2] for f in frames])
            axes[2].scatter(pos[:, 0], pos[:, 1], c="tab:blue", s=12, label="reference (Earth Studio)")
            axes[2].quiver(pos[:, 0], pos[:, 1], fwd[:, 0], fwd[:, 1], angles="xy", scale=25, width=0.003,
                           color="tab:blue")
        if model is not None:
            ref = {f["name"] for f in frames}
            reg = [im for im in model.images.values() if im.name not in ref and im.has_pose]
            if reg:
                c = np.array([im.projection_center() for im in reg])
                z = np.array([im.cam_from_world().rotation.matrix()[2] for im in reg])
                axes[2].scatter(c[:, 0], c[:, 1], c="tab:red", s=18, label=f"registered photos ({len(reg)})")
                axes[2].quiver(c[:, 0], c[:, 1], z[:, 0], z[:, 1], angles="xy", scale=25, width=0.004,
                               color="tab:red")
        axes[2].set_aspect("equal")
        axes[2].set_xlabel("east (m)")
        axes[2].set_ylabel("north (m)")
        axes[2].set_title("cameras, top-down")
        axes[2].legend(loc="best", fontsize=8)
        for ax in axes[:2]:
            ax.axis("off")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()
    finally:
        plt.close(fig)


def parse_args(argv: list[str] | None = None) -> AerialConfig:
    """The configuration from the flags and ``--set`` overrides (raises :class:`ConfigError`)."""
    ap = argparse.ArgumentParser(prog="python -m flows.aerial", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="output/aerial")
    ap.add_argument("--megadepth")
    ap.add_argument("--megadepth-out")
    ap.add_argument("--scene-list")
    ap.add_argument("--scenes", nargs="*")
    ap.add_argument("--workers", type=int, help="local Dask workers (as --set dask.n_workers=N)")
    ap.add_argument("--pipeline", default="sift+mnn", help="sift+mnn (default, CPU) or superpoint+superglue (hloc)")
    ap.add_argument("--dense-backend", choices=["auto", "cpu", "gpu"], default="auto",
                    help="auto: GPU PatchMatch when a Dask worker declares GPU, else CPU")
    ap.add_argument("--no-synthetic", action="store_true", help="never generate the synthetic world")
    ap.add_argument("--places", help="places to plan (JSON/YAML list: scene, latitude, longitude, ground_altitude, "
                                     "radius): writes ROOT/plans/<scene>.esp and <scene>.plan.json")
    ap.add_argument("--trajectory", default="spiral+streets",
                    help="named trajectory configuration: spiral+streets (default), spiral, orbit, streets")
    ap.add_argument("--trajectory-options", type=json.loads, default={},
                    help='JSON overrides of the trajectory, e.g. \'{"frames": 150, "fov": 40}\'')
    ap.add_argument("--plan-only", action="store_true",
                    help="only the planning stage: render the plans in Earth Studio, then run again")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any field (VALUE parsed as JSON when possible), e.g. dask.n_workers=2 "
                         "or dask_block=slurm")
    a = ap.parse_args(argv)
    if a.plan_only and not a.places:
        ap.error("--plan-only needs --places")
    values: dict[str, Any] = {
        "root": a.root, "megadepth": a.megadepth, "megadepth_out": a.megadepth_out, "scene_list": a.scene_list,
        "scenes": a.scenes or None, "synthetic": not a.no_synthetic, "pipeline": a.pipeline,
        "dense_backend": a.dense_backend, "places": a.places,
        "trajectory": a.trajectory, "trajectory_options": a.trajectory_options, "plan_only": a.plan_only}
    if a.workers is not None:
        values["dask"] = {"n_workers": a.workers}
    return build(AerialConfig, merge(values, parse_sets(a.set)))


def main(argv: list[str] | None = None) -> int:
    try:  # every setting and input path checked before any server or cluster starts
        config = parse_args(argv)
        config.check_inputs()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    with local_prefect_server() as server:
        print(f"Prefect API: {server.url}  (UI: {server.ui_url})", flush=True)
        try:
            result = aerial_flow(config=config)
        except OutputBusy as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BUSY
    print(f"\nAerial outputs under {result['root']}")
    for scene, r in sorted(result.get("plans", {}).items()):
        print(f"  plan {scene}: " + (f"NOT PLANNED: {r['error']}" if "error" in r else
                                     f"{r['cameras']} cameras, Earth Studio project {r['esp']}"))
    if not result["scenes"]:
        if result.get("plans"):
            print("Import each .esp in Earth Studio (File > Import > Earth Studio Project), check the first one by "
                  "eye, render the video and the 3D camera tracking JSON (Global), put <scene>.mp4 and <scene>.json "
                  f"in {Path(result['root']) / 'downloaded_data'}, and run the flow again (without --plan-only).")
        return 1 if result["failed"] else 0
    print(f"pipeline {result['pipeline']}, dense backend: {result['dense backend']}")
    from tasks.aerial.evaluate import summary_rows

    for scene, rep in result["scenes"].items():
        print(f"  scene {scene}: " + ", ".join(f"{k} {v}" for k, v in rep["counts"].items()))
        if rep.get("outputs", {}).get("product"):
            print(f"    product: {rep['outputs']['product']}")
        for prob in rep.get("problems", [])[:10]:
            print(f"    problem: {prob['item']} ({prob['stage']}): {prob['reason']}")
        if rep.get("accuracy"):
            print("    accuracy against ground truth:")
            for m, v, g in summary_rows(rep["accuracy"]):
                print(f"      {m:<34} {v:<60} goal {g}")
    for scene, why in result.get("failed", {}).items():
        print(f"FAILED scene {scene}: {why}", file=sys.stderr)
    return 1 if result.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
