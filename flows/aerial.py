"""Aerial-ground scenes flow (AerialMegaDepth), part 1: inputs and first stages.

Stages so far: synthetic world (embedded default, only when no data is given)
-> Earth Studio ingest per scene (frames, aligned metadata, empty reference
model) -> MegaDepth preprocessing per image (parallel on Dask) -> a report per
scene. Registration and dense reconstruction are the next stages.

    python -m flows.aerial                                   # the embedded synthetic world
    python -m flows.aerial --root /data/aerial --megadepth /data/MegaDepth \\
        --scene-list megadepth_image_list_v0.npz --scenes 0001 0002
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from pydantic import BaseModel, Field

from tasks.common.report import RunReport
from tasks.common.runtime import DaskConfig, local_prefect_server, make_task_runner


class AerialConfig(BaseModel):
    """Where the inputs are and where the outputs go (paths as the contract's layout)."""

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
    n_workers: int | None = None

    def paths(self) -> dict[str, Path]:
        root = Path(self.root).expanduser().resolve()
        md = Path(self.megadepth).expanduser().resolve() if self.megadepth else root / "megadepth"
        return {
            "root": root, "megadepth": md,
            "megadepth_out": Path(self.megadepth_out).expanduser().resolve() if self.megadepth_out
            else root / "megadepth_processed",
            "scene_list": Path(self.scene_list).expanduser().resolve() if self.scene_list else md / "scene_list.json",
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


@task(name="earth-studio-ingest", cache_policy=NO_CACHE, tags=["aerial", "ingest"], retries=1)
def ingest_task(root: str, scene: str):
    from tasks.aerial.earthstudio import ingest_scene

    res = ingest_scene(Path(root), scene)
    logger = get_run_logger()
    logger.info("scene %s: %d frames%s, %d skipped", scene, res.frames_written,
                " (up to date)" if res.skipped_scene else "", len(res.frames_skipped))
    for idx, reason in sorted(res.frames_skipped.items(), key=lambda kv: int(kv[0]))[:20]:
        logger.warning("scene %s frame %s: %s", scene, idx, reason)
    return res


@task(name="megadepth-preprocess", cache_policy=NO_CACHE, tags=["aerial", "megadepth"], retries=1)
def megadepth_task(md_root: str, scene: str, subscene: str, names: list[str], model: dict, out_dir: str) -> list:
    from tasks.aerial import megadepth

    return [megadepth.preprocess_image(Path(md_root), scene, subscene, n, model.get(n), Path(out_dir))
            for n in names]


# --------------------------------------------------------------------------
# the flow
# --------------------------------------------------------------------------
@flow(name="aerial", task_runner=make_task_runner(), log_prints=True)
def aerial_flow(config: AerialConfig = AerialConfig()) -> dict[str, Any]:
    from tasks.aerial import megadepth

    logger = get_run_logger()
    p = config.paths()
    if config.synthetic and not (p["root"] / "downloaded_data").is_dir():
        world_task(str(p["root"]), config.world_options)
    exports = sorted(x.stem for x in (p["root"] / "downloaded_data").glob("*.json"))
    scenes = [s for s in exports if not config.scenes or s in config.scenes]
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
        for idx, reason in res.frames_skipped.items():
            reports[s].problem(f"frame {idx}", "ingest", reason)
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

    # 3. report per scene: counts and a picture
    out: dict[str, Any] = {"root": str(p["root"]), "scenes": {}}
    for s, report in reports.items():
        png = scene_picture(p, s)
        folder = p["root"] / "data" / s
        report.outputs.update({"footage": str(folder / "footage"), "metadata": str(folder / f"{s}.json"),
                               "reference model": str(folder / "sfm_output_localization" / "reference_empty"),
                               "megadepth": str(p["megadepth_out"] / s)})
        report.write(folder, png, png_name="overview.png")
        report.publish(key=f"aerial-{s}", map_png=png)
        out["scenes"][s] = report.to_dict()
        logger.info("scene %s: %s", s, json.dumps(report.counts))
    return out


def scene_picture(p: dict[str, Path], scene: str) -> bytes | None:
    """An aerial frame, a processed ground photo and a top-down plot of the reference cameras."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    meta_path = p["root"] / "data" / scene / f"{scene}.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    frames = meta.get("frames") or []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), dpi=90)
    try:
        if frames:
            img = plt.imread(p["root"] / "data" / scene / "footage" / frames[len(frames) // 2]["name"])
            axes[0].imshow(img)
            axes[0].set_title(f"aerial {frames[len(frames) // 2]['name']}")
        photos = sorted((p["megadepth_out"] / scene).glob("*/*.jpg"))
        photos = [x for x in photos if x.suffixes[-2:] != [".jpg", ".exr"]]
        if photos:
            axes[1].imshow(plt.imread(photos[0]))
            axes[1].set_title(f"ground {photos[0].name}")
        if frames:
            pos = np.array([f["position_enu"] for f in frames])
            fwd = np.array([np.array(f["cam2world"])[:3, 2] for f in frames])
            sc = axes[2].scatter(pos[:, 0], pos[:, 1], c=pos[:, 2], cmap="viridis", s=14)
            axes[2].quiver(pos[:, 0], pos[:, 1], fwd[:, 0], fwd[:, 1], angles="xy", scale=25, width=0.003)
            axes[2].set_aspect("equal")
            axes[2].set_xlabel("east (m)")
            axes[2].set_ylabel("north (m)")
            axes[2].set_title("reference cameras (colour: up, m)")
            fig.colorbar(sc, ax=axes[2], shrink=0.8)
        for ax in axes[:2]:
            ax.axis("off")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()
    finally:
        plt.close(fig)


def parse_args(argv: list[str] | None = None) -> AerialConfig:
    ap = argparse.ArgumentParser(prog="python -m flows.aerial", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="output/aerial")
    ap.add_argument("--megadepth")
    ap.add_argument("--megadepth-out")
    ap.add_argument("--scene-list")
    ap.add_argument("--scenes", nargs="*")
    ap.add_argument("--workers", type=int)
    ap.add_argument("--no-synthetic", action="store_true", help="never generate the synthetic world")
    a = ap.parse_args(argv)
    return AerialConfig(root=a.root, megadepth=a.megadepth, megadepth_out=a.megadepth_out, scene_list=a.scene_list,
                        scenes=a.scenes or None, synthetic=not a.no_synthetic, n_workers=a.workers)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    with local_prefect_server() as server:
        print(f"Prefect API: {server.url}  (UI: {server.ui_url})", flush=True)
        runner = make_task_runner(DaskConfig(n_workers=config.n_workers))
        result = aerial_flow.with_options(task_runner=runner)(config=config)
    print(f"\nAerial outputs under {result['root']}")
    for scene, rep in result["scenes"].items():
        print(f"  scene {scene}: " + ", ".join(f"{k} {v}" for k, v in rep["counts"].items()))
        print(f"    {Path(result['root']) / 'data' / scene}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
