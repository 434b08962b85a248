"""Aerial-ground scenes flow (AerialMegaDepth).

Stages: planning (camera paths for the places given: ``plans/<scene>.esp`` to render in
Earth Studio and ``plans/<scene>.plan.json``) -> synthetic world (embedded default,
rendered from its own plan, only when no data is given) -> per scene, each scene on its
own (a slow or failed scene holds nobody): Earth Studio ingest and MegaDepth
preprocessing -> features (fanned out) -> pairs (poses, retrieval) -> matches (fanned
out) -> reference triangulation -> localization of the photos -> dense depth (GPU
PatchMatch on GPU-tagged workers, else the CPU method, in batches over the workers) ->
export of ``localized_dense_metric/`` -> training exports (covisibility blocks over the
workers, scene info, pair lists) -> accuracy (when ground truth exists); then the
training index and a report per scene. Every stage is skipped on a rerun when its
outputs are complete.

    python -m flows.aerial                                   # the embedded synthetic world
    python -m flows.aerial --config smoke                    # a tiny synthetic world
    python -m flows.aerial --root /data/aerial --megadepth /data/MegaDepth \\
        --scene-list megadepth_image_list_v0.npz --scenes 0001 0002
    python -m flows.aerial --config sgbm                     # SGBM instead of the CPU PatchMatch
    python -m flows.aerial --root /data/aerial --places places.yaml --plan-only   # plans only

A scene that fails makes the command exit with status 1 after the other scenes finish.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
from prefect import flow, get_run_logger

from tasks.aerial import layout, megadepth, pipeline, training_export
from tasks.aerial import plan as planning
from tasks.aerial.config import CONFIGS, AerialConfig, export_root, export_settings, pipeline_settings, trajectory_settings
from tasks.aerial.dense.backends import DenseBackend, Selection, resolve_dense_backend, select_backend
from tasks.aerial.evaluate import summary_rows
from tasks.aerial.report import finish_scene, record_dense, record_ingest, record_localization, record_megadepth
from tasks.aerial.synthetic_world import MARKER
from tasks.aerial.tasks import (collect_task, covis_block_task, covis_plan_task, dense_fuse_task, dense_prepare_task,
                                dense_step_task, evaluate_task, export_task, features_task, gpu_capabilities_task,
                                ingest_task, localize_task, matches_task, megadepth_task, merge_features_task,
                                merge_matches_task, pairs_task, plan_task, reference_task, training_index_task,
                                training_scene_task, world_task)
from tasks.common.cli import Alias, parse_config
from tasks.common.progress import Progress
from tasks.common.report import RunReport, StageFailed, counts_table
from tasks.common.runlock import exclusive_output
from tasks.common.runtime import gpu_workers, make_task_runner, run_local, worker_count
from tasks.common.window import in_thread, run_each


@flow(name="aerial", task_runner=make_task_runner(settings_from=AerialConfig.dask_settings_of), log_prints=True)
@exclusive_output(lambda config=None: (config or AerialConfig()).paths()["root"], "aerial root")
def aerial_flow(config: AerialConfig = AerialConfig()) -> dict[str, Any]:
    """Plan the places given, then build every scene of ``config.root`` (see the module's docstring)."""
    p = config.paths()
    plans = plan_places(config, p["root"]) if config.places else {}
    planned = {"root": str(p["root"]), "plans": plans, "scenes": {},
               "failed": {s: f"plan: {r['error']}" for s, r in plans.items() if "error" in r}}
    if config.plan_only:
        return planned
    config.check_inputs()  # a deployment's or the UI's run too: a root without data is an error, not a world
    if config.builds_world():
        world_task(str(p["root"]), config.world_options)
    scenes = select_scenes(config, p["root"], plans)
    if not scenes:  # planned, nothing rendered yet: the plans are the result
        return planned
    run = SceneRun.start(config)
    synthetic = synthetic_note(p["root"])
    reports = {s: RunReport(title=f"aerial scene {s}" + (" (SYNTHETIC world)" if synthetic else ""),
                            notes=[synthetic] if synthetic else [], extra={"synthetic": bool(synthetic)})
               for s in scenes}
    outs: dict[str, SceneOut] = {}
    run_each(lambda s: in_thread(scene_pipeline, run, s, reports[s], name=f"aerial-scene-{s}"), scenes,
             on_result=outs.__setitem__,
             on_error=lambda s, exc: reports[s].problem(s, "pipeline", f"{type(exc).__name__}: {exc}"))
    write_training_index(run, reports, [s for s, o in outs.items() if o.training])
    return summarize(run, planned, reports, outs)


# --------------------------------------------------------------------------
# one scene: its stages in order, each started when the scene's previous one is done
# --------------------------------------------------------------------------
@dataclass
class SceneRun:
    """What every scene of a run shares: settings and the scene list's entries."""

    config: AerialConfig
    root: Path
    megadepth_root: Path
    megadepth_out: Path
    cfg: pipeline.PipelineConfig
    entries: dict[str, list[megadepth.SceneEntry]]
    exports: training_export.ExportConfig
    export_root: Path
    parts: int  # parts of the fanned-out stages (features, matching): fan_out or the Dask workers

    @classmethod
    def start(cls, config: AerialConfig) -> "SceneRun":
        p = config.paths()
        cfg = pipeline_settings(config)
        if cfg.backend == "hloc" and not pipeline.hloc_available():
            raise RuntimeError(f"pipeline {cfg.name!r} needs hloc (pip install from "
                               "https://github.com/cvg/Hierarchical-Localization); use 'sift+mnn' without it")
        entries: dict[str, list] = {}
        for e in megadepth.load_scene_list(p["scene_list"]) if p["scene_list"].exists() else []:
            entries.setdefault(e.scene, []).append(e)
        if not entries:
            get_run_logger().warning("no scene list at %s: MegaDepth preprocessing skipped", p["scene_list"])
        ecfg = export_settings(config)
        export = export_root(config)
        # asked here, in the flow's thread: this starts the run's Dask client once, before the scenes'
        # threads submit their tasks
        workers = worker_count()
        return cls(config, p["root"], p["megadepth"], p["megadepth_out"], cfg, entries, ecfg, export,
                   config.fan_out or workers)

    def paths(self, scene: str) -> pipeline.ScenePaths:
        return pipeline.scene_paths(self.root, scene, self.megadepth_out, self.cfg)


@dataclass
class SceneOut:
    """What a scene's pipeline hands back to the flow."""

    paths: pipeline.ScenePaths
    ingested: bool = False
    dense: DenseBackend | None = None  # the backend its dense stage ran
    dense_workers: set[str] | None = None
    training: bool = False
    accuracy: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def scene_pipeline(run: SceneRun, s: str, report: RunReport) -> SceneOut:
    """Every stage of scene ``s``; a failed stage is the scene's problem and ends the scene."""
    out = SceneOut(paths=run.paths(s))
    with contextlib.suppress(StageFailed):  # its problem is in the report; later stages are skipped
        scene_stages(run, s, report, out)
    return out


def scene_stages(run: SceneRun, s: str, report: RunReport, out: SceneOut) -> None:
    cfg, sp = run.cfg, out.paths
    stage = lambda name, problem_stage=None: report.stage(name, s, problem_stage)  # noqa: E731
    photos = submit_megadepth(run, s, report)  # the photos are preprocessed while the frames are extracted
    try:
        with stage("ingest"):
            record_ingest(report, s, ingest_task.submit(str(run.root), s).result())
        out.ingested = True
    except StageFailed:
        report.counts["frames"] = 0
    with stage("megadepth"):
        run_each(lambda x: x[1], photos, on_result=lambda _x, results: record_megadepth(report, results),
                 on_error=lambda x, exc: report.problem(x[0], "megadepth", f"{type(exc).__name__}: {exc}"),
                 progress=Progress(f"scene {s} megadepth", len(photos), "batches"))
    if not out.ingested or not (sp.reference_empty / "images.txt").exists():
        return

    with stage("collect"):
        info = out.info = collect_task.submit(sp).result()
    report.counts["photos to localize"] = len(info["queries"])
    for name, why in info["problems"].items():
        report.problem(name, "collect", why)
    parts = run.parts
    with stage("features"):
        names = pipeline.missing_features(sp, info["reference"] + sorted(info["queries"]))
        if names:
            n = max(1, min(parts, len(names) // 8)) if cfg.backend == "builtin" else 1
            in_parts(features_task, merge_features_task, n, sp, cfg, names,
                     progress=Progress(f"scene {s} features", n, "parts"))
    for name in pipeline.missing_features(sp, sorted(info["queries"])):
        report.problem(name, "features", "no features (unreadable image)")
    with stage("pairs"):
        report.counts.update(pairs_task.submit(sp, cfg, info).result())
    with stage("matches"):
        n = parts if cfg.backend == "builtin" else 1
        in_parts(matches_task, merge_matches_task, n, sp, cfg, progress=Progress(f"scene {s} matches", n, "parts"))
    with stage("reference"):
        report.counts.update(reference_task.submit(sp, cfg).result().counts)
    with stage("localization"):
        res = localize_task.submit(sp, cfg, info).result()
    record_localization(report, res)

    with stage("dense-prepare", "dense"):
        selection = select_dense_backend(cfg)  # the cluster as it is now
        out.dense = selection.backend
        get_run_logger().info("scene %s: %s", s, selection.why)
        report.notes.append(selection.why)
        report.counts["dense backend"] = out.dense.device  # the report's table (display only)
        images = dense_prepare_task.submit(sp, out.dense).result()
    with stage("dense"):
        done, failed = [], []
        futs = submit_dense(sp, out.dense, images)
        run_each(lambda f: f, futs, on_result=lambda _f, r: done.append(r), on_error=lambda _f, exc: failed.append(exc),
                 progress=Progress(f"scene {s} dense ({len(images)} images)", len(futs), "tasks"))
        out.dense_workers = record_dense(report, done)
        for exc in failed[1:]:
            report.problem(s, "dense", f"{type(exc).__name__}: {exc}")
        if failed:
            raise failed[0]
    with stage("export"):
        report.counts.update(export_task.submit(sp).result())
        report.outputs["product"] = str(sp.product)

    with contextlib.suppress(StageFailed):  # a failed export is reported; the accuracy is still measured
        out.training = training_exports(run, s, report, out)
    if (sp.ground_truth / "sparse").is_dir():
        with stage("evaluate"):
            out.accuracy = evaluate_task.submit(sp, sorted(info["queries"])).result()


def select_dense_backend(cfg: pipeline.PipelineConfig) -> Selection:
    """The dense backend for the workers the run has now (:func:`tasks.aerial.dense.backends.select_backend`
    decides; a GPU worker, when there is one, is asked what it can run)."""
    def ask_gpu_worker():
        with dask.annotate(resources={"GPU": 1}):
            return gpu_capabilities_task.submit().result()

    return select_backend(cfg.dense, gpu_workers(), capabilities=ask_gpu_worker)


def submit_dense(sp: pipeline.ScenePaths, backend: DenseBackend, names: list[str]) -> list:
    """The dense tasks of one scene, as futures: each step of ``backend`` over its batches (a step
    waits for the previous one), then its fusion (the last future), every task with the backend's
    Dask resources (``GPU`` for the GPU methods)."""
    resources = dask.annotate(resources=backend.resources) if backend.resources else contextlib.nullcontext()
    futs: list = []
    previous: list = []
    with resources:
        for step in backend.steps():
            previous = [dense_step_task.submit(sp, backend, batch, step, wait_for=previous)
                        for batch in backend.batches(names)]
            futs += previous
        return futs + [dense_fuse_task.submit(sp, backend, names, wait_for=previous)]


def submit_megadepth(run: SceneRun, s: str, report: RunReport) -> list[tuple[str, Any]]:
    """The MegaDepth preprocessing tasks of scene ``s`` (``image_batch`` images each), as
    ``(scene/subscene, future)``; an unreadable sparse model is the sub-scene's problem."""
    futs = []
    for e in run.entries.get(s, []):
        try:
            model = megadepth.read_sparse_model(run.megadepth_root, e.scene, e.subscene)
        except Exception as exc:  # noqa: BLE001 - one sub-scene; the others go on
            report.problem(f"{e.scene}/{e.subscene}", "megadepth", f"{type(exc).__name__}: {exc}")
            continue
        for i in range(0, len(e.images), run.config.image_batch):
            names = e.images[i:i + run.config.image_batch]
            sub = {n: model[n] for n in names if n in model}
            futs.append((f"{e.scene}/{e.subscene}", megadepth_task.submit(
                str(run.megadepth_root), e.scene, e.subscene, names, sub, str(run.megadepth_out))))
    return futs


def in_parts(task, merge_task, n: int, sp, *args, progress: Progress | None = None) -> Any:
    """``task`` over ``n`` parts on the workers, then ``merge_task`` of the parts (one call when n == 1);
    ``progress`` counts the parts. A failed part fails the stage (the first error is raised)."""
    if n == 1:
        try:
            return task.submit(sp, *args, None).result()
        finally:
            if progress is not None:
                progress.advance(1)
                progress.close()
    parts = [task.submit(sp, *args, (i, n)) for i in range(n)]
    failed: list[BaseException] = []
    run_each(lambda f: f, parts, on_result=lambda _f, _r: None, on_error=lambda _f, exc: failed.append(exc),
             progress=progress)
    if failed:
        raise failed[0]
    return merge_task.submit(sp, n, wait_for=parts).result()


def training_exports(run: SceneRun, s: str, report: RunReport, out: SceneOut) -> bool:
    """Scene info, dense covisibility (candidate pairs in blocks over the workers), pair lists and
    layouts of scene ``s`` (``tasks/aerial/training_export.py``); True when written."""
    sp, ecfg = out.paths, run.exports
    with report.stage("covisibility", s):
        plan = covis_plan_task.submit(str(sp.product), str(training_export.covisibility_work(run.export_root, s)), ecfg).result()
        failed: list[BaseException] = []
        blocks = plan.missing_blocks()
        run_each(lambda k: covis_block_task.submit(plan.block(k), ecfg), blocks,
                 on_result=lambda _k, _r: None, on_error=lambda _k, exc: failed.append(exc),
                 window=max(2, 2 * run.parts), progress=Progress(f"scene {s} covisibility", len(blocks), "blocks"))
        if failed:
            raise failed[0]
        report.counts.update({f"covisibility {k}": v for k, v in plan.counts.items()})
    features = {"pipeline": run.cfg.name, "features": run.cfg.features, "matcher": run.cfg.matcher,
                "retrieval": run.cfg.retrieval, "sfm folder": sp.sfm.name,
                "dense backend": out.dense.device if out.dense else None}  # index.json's key
    with report.stage("training export", s):
        res = training_scene_task.submit(str(run.export_root), sp, plan, ecfg, features).result()
        report.outputs["training export"] = str(run.export_root)
        if res.get("picture"):
            report.outputs["covisibility picture"] = str(run.export_root / res["picture"])
        report.counts.update({f"pairs {k}": v["pairs"] for k, v in res["ranges"].items()})
    return True


# --------------------------------------------------------------------------
# the run's own stages: planning, scene selection, training index, summary
# --------------------------------------------------------------------------
def plan_places(config: AerialConfig, root: Path) -> dict[str, dict[str, Any]]:
    """The planning stage for every place: ``{scene: {"esp", "plan", "cameras"} or {"error"}}``.
    A bad place or trajectory is reported for its scene; the other places are still planned."""
    errors: list[tuple[str, str]] = []
    places = planning.load_places(config.places, errors=errors)
    out: dict[str, dict[str, Any]] = {scene: {"error": why} for scene, why in errors}
    try:
        trajectory = trajectory_settings(config)
    except planning.PlanError as exc:
        out.update({pl.scene: {"error": str(exc)} for pl in places})
        places = []
    run_each(lambda pl: plan_task.submit(str(root), pl, trajectory), places,
             on_result=lambda pl, res: out.__setitem__(pl.scene, {"esp": str(res.esp), "plan": str(res.plan),
                                                                  "cameras": res.cameras,
                                                                  **({"replaced invalid project": res.invalid}
                                                                     if res.invalid else {})}),
             on_error=lambda pl, exc: out.__setitem__(pl.scene, {"error": f"{type(exc).__name__}: {exc}"}))
    for scene, r in sorted(out.items()):
        if "error" in r:
            get_run_logger().error("scene %s: not planned: %s", scene, r["error"])
    return out


def select_scenes(config: AerialConfig, root: Path, plans: dict[str, dict[str, Any]]) -> list[str]:
    """The scenes with an Earth Studio export (only ``config.scenes`` if given); planned scenes
    not rendered yet are listed in the log with what to do."""
    exports = layout.downloaded_scenes(root)
    for s in sorted(s for s, r in plans.items() if "error" not in r and s not in exports):
        get_run_logger().info("scene %s is planned but not rendered yet: import %s in Earth Studio, render, and "
                              "put %s.mp4 and %s.json in %s", s, plans[s]["esp"], s, s, root / layout.DOWNLOADED)
    scenes = [s for s in exports if not config.scenes or s in config.scenes]
    if not scenes and not plans:
        raise FileNotFoundError(f"{root / 'downloaded_data'}: no Earth Studio export (<scene>.json + .mp4)")
    return scenes


def write_training_index(run: SceneRun, reports: dict[str, RunReport], done: list[str]) -> None:
    """The training dataset's index over every exported scene (rebuilt next run if it fails)."""
    if not done:
        return
    try:
        index = training_index_task(str(run.export_root), run.exports)
        for s, why in (index.get("scenes left out") or {}).items() if isinstance(index, dict) else ():
            if s in reports:
                reports[s].problem("index.json", "training export", f"left out of the index: {why}")
    except Exception as exc:  # noqa: BLE001 - the scenes' files stay; the index is rebuilt next run
        for s in done:
            reports[s].problem("index.json", "training export", f"{type(exc).__name__}: {exc}")


def summarize(run: SceneRun, planned: dict[str, Any], reports: dict[str, RunReport],
              outs: dict[str, SceneOut]) -> dict[str, Any]:
    """Each scene's report, picture and artifacts (written here, one scene after the other), and
    the run's result."""
    logger = get_run_logger()
    devices = sorted({o.dense.device for o in outs.values() if o.dense})
    result: dict[str, Any] = {
        **planned, "pipeline": run.cfg.name,
        "dense_backend": ", ".join(devices) or resolve_dense_backend(run.cfg.dense.backend, gpu_workers())[0],
        "dense_workers": {s: sorted(o.dense_workers) for s, o in outs.items() if o.dense_workers is not None}}
    result["synthetic"] = synthetic_note(run.root)
    for s, report in reports.items():
        o = outs.get(s) or SceneOut(paths=run.paths(s))
        why = finish_scene(run.root, run.megadepth_out, s, report, o.paths, o.accuracy, o.ingested)
        if why:
            result["failed"][s] = why
        result["scenes"][s] = {**report.to_dict(), "accuracy": o.accuracy}
        logger.info("scene %s (all counts in %s):\n%s", s, report.outputs.get("report"),
                    "\n".join(counts_table(report.counts)))
    return result


def synthetic_note(root: Path) -> str:
    """What the report, its artifact and the terminal say when ``root`` holds the embedded
    synthetic world (its completion marker); "" for real data."""
    if not (Path(root) / MARKER).exists():
        return ""
    return (f"SYNTHETIC world: {root} holds the embedded synthetic world rendered by this project "
            "(footage, photos and ground truth made up, not Earth Studio or MegaDepth data)")


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------
#: The flags the README documents, each a shorthand for ``--set KEY=...``.
ALIASES = (
    Alias("--root", "root", "Earth Studio root (downloaded_data/ in, data/ out)"),
    Alias("--megadepth", "megadepth", "raw MegaDepth root"),
    Alias("--megadepth-out", "megadepth_out", "processed MegaDepth"),
    Alias("--scene-list", "scene_list", "scene list (.npz as the original, JSON or YAML)"),
    Alias("--scenes", "scenes", "only these scene ids", kind="list"),
    Alias("--workers", "dask.n_workers", "local Dask workers", kind="int"),
    Alias("--pipeline", "pipeline", "sift+mnn (default, CPU), aliked+lightglue (learned, offline; the learned extra) "
          "or superpoint+superglue (hloc)"),
    Alias("--dense-backend", "pipeline_options.dense.backend", "auto (GPU PatchMatch when a Dask worker declares GPU), cpu, gpu"),
    Alias("--synthetic", "synthetic", "build the synthetic world into ROOT when it has no data (the default run "
                                      "builds it only in output/aerial)", kind="const", const=True),
    Alias("--no-synthetic", "synthetic", "never generate the synthetic world", kind="const", const=False),
    Alias("--places", "places", "places to plan (JSON/YAML list: scene, latitude, longitude, ground_altitude, "
                                "radius)"),
    Alias("--trajectory", "trajectory", "named trajectory: spiral+streets (default), spiral, orbit, streets"),
    Alias("--trajectory-options", "trajectory_options", 'JSON overrides of the trajectory, e.g. \'{"frames": 150}\'',
          kind="json"),
    Alias("--plan-only", "plan_only", "only the planning stage (needs --places)", kind="const", const=True),
)


def parse_args(argv: list[str] | None = None) -> AerialConfig:
    """``--config NAME`` (tasks.aerial.config.CONFIGS), the documented flags, then ``--set``
    overrides (raises :class:`ConfigError`)."""
    return parse_config(argv, prog="python -m flows.aerial", description=__doc__, configs=CONFIGS, aliases=ALIASES)


def main(argv: list[str] | None = None) -> int:
    return run_local(argv, parse_args, aerial_flow, finish, folder_of=lambda config: config.paths()["root"])


def finish(result: dict[str, Any]) -> int:
    """Print the outcome; exit 1 when a scene failed (after the others finished)."""
    print_result(result)
    return 1 if result.get("failed") else 0


def print_result(result: dict[str, Any]) -> None:
    print(f"\nAerial outputs under {result['root']}")
    for scene, r in sorted(result.get("plans", {}).items()):
        print(f"  plan {scene}: " + (f"NOT PLANNED: {r['error']}" if "error" in r else
                                     f"{r['cameras']} cameras, Earth Studio project {r['esp']}"))
    if not result["scenes"]:
        if result.get("plans"):
            print("Import each .esp in Earth Studio (File > Import > Earth Studio Project), check the first one by "
                  "eye, render the video and the 3D camera tracking JSON (Global), put <scene>.mp4 and <scene>.json "
                  f"in {Path(result['root']) / 'downloaded_data'}, and run the flow again (without --plan-only).")
        return
    if result.get("synthetic"):
        print(f"  {result['synthetic']}")
    print(f"pipeline {result['pipeline']}, dense backend: {result['dense_backend']}")
    for scene, rep in result["scenes"].items():
        outputs = rep.get("outputs", {})
        print(f"  scene {scene}:")
        print("\n".join(counts_table(rep["counts"], indent="    ")))
        for label, key in (("product", "product"), ("report", "report"), ("picture", "picture"),
                           ("covisibility picture", "covisibility picture"), ("training export", "training export")):
            if outputs.get(key):
                print(f"    {label}: {outputs[key]}")
        for prob in rep.get("problems", [])[:10]:
            print(f"    problem: {prob['item']} ({prob['stage']}): {prob['reason']}")
        if rep.get("accuracy"):
            print("    accuracy against ground truth:")
            for m, v, g in summary_rows(rep["accuracy"]):
                print(f"      {m:<34} {v:<60} goal {g}")
    for scene, why in result.get("failed", {}).items():
        print(f"FAILED scene {scene}: {why}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
