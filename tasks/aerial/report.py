"""The aerial flow's report of a scene: counts and problems of each stage's result, the
accuracy table, the picture (``overview.png``), stale markers, and the files and
Prefect artifacts they go to. Plain functions over a :class:`RunReport`; the flow
(``flows/aerial.py``) calls them as each scene's stages finish.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap

from tasks.aerial.dense import depth_path, read_depth_h5
from tasks.aerial.earthstudio import read_record
from tasks.aerial.evaluate import DEPTH_GOALS, _depth_misses, summary_rows, summary_table
from tasks.aerial.layout import SceneLayout
from tasks.aerial.stale import clear_stale, mark_stale
from tasks.common.atomic import write_json_atomic
from tasks.common.report import RunReport


def record_ingest(report: RunReport, scene: str, res) -> None:
    """Counts and problems of the Earth Studio ingest (``tasks.aerial.earthstudio.IngestResult``)."""
    report.counts.update({"video frames": res.video_frames, "camera entries": res.camera_entries,
                          "frames": res.frames_written, "frames skipped": len(res.frames_skipped)})
    for item, reason in res.problems():
        report.problem(f"{scene} video" if item == "video" else item, "ingest", reason)
    report.notes.extend(getattr(res, "notes", None) or [])
    if res.plan_check:
        report.notes.append(plan_check_note(res.plan_check))
        if not plan_check_ok(res.plan_check):
            report.problem(f"{scene} plan", "ingest", plan_check_note(res.plan_check))


def record_megadepth(report: RunReport, results: list) -> None:
    """Counts (``megadepth <status>``) and failures of one batch of MegaDepth preprocessing."""
    for r in results:
        key = f"megadepth {r.status}"
        report.counts[key] = report.counts.get(key, 0) + 1
        if r.status == "failed":
            report.problem(r.name, "megadepth", r.reason)


def record_localization(report: RunReport, res) -> None:
    """Counts of the localization (``tasks.aerial.reconstruction.StageResult``), each photo it could
    not register or rejected after registration as a problem with the reason, and the
    registration listing (``report.json``'s ``registration``): each registered photo with its
    inlier count and inlier ratio (and ``by prior`` when the second chance registered it,
    :func:`~tasks.aerial.verification.register_from_priors`), each rejected one with its reason."""
    report.counts.update({k: v for k, v in res.counts.items() if "seconds" not in k})
    for name, why in res.problems.items():
        report.problem(name, "localization", why)
    listing = report.extra.setdefault("registration", {"registered": {}, "rejected": {}})
    for name, v in sorted(res.details.items()):
        if v.get("status") == "registered":
            listing["registered"][name] = {"inliers": v["inliers"], "inlier ratio": round(v["inlier ratio"], 3),
                                           **({"by prior": True} if v.get("by prior") else {})}
        else:
            listing["rejected"][name] = v.get("reason", "rejected")
    if res.details:
        inliers = sorted(v["inliers"] for v in listing["registered"].values())
        report.notes.append(
            f"localization: {len(listing['registered'])} photo(s) registered and verified"
            + (f" (inliers: fewest {inliers[0]}, median {inliers[len(inliers) // 2]})" if inliers else "")
            + (f", {n_prior} of them from their MegaDepth pose (second chance)"
               if (n_prior := sum("by prior" in v for v in listing["registered"].values())) else "")
            + f", {len(listing['rejected'])} rejected after registration (report.json: registration)")


def record_dense(report: RunReport, results: list[dict[str, Any]]) -> set[str]:
    """Per-image failures and the depth-map count of a scene's dense tasks; the workers they ran on."""
    for r in results:
        for name, why in r.get("failures", {}).items():
            report.problem(name, "dense", why)
    done = [r for r in results if r.get("finish")] or results  # PatchMatch: the export's stats count
    report.counts["depth maps"] = sum(len(r.get("stats", {})) for r in done)
    return {r.get("worker") for r in results} - {None}


def finish_scene(root: Path, megadepth_out: Path, scene: str, report: RunReport, sp, acc: dict | None,
                 ingested: bool) -> str | None:
    """The end of a scene: stale markers (set when it failed, cleared when it did not), its
    accuracy (``accuracy.json``, the notes, the table artifact), ``report.json`` and
    ``overview.png`` in ``data/<scene>/``, and the Prefect artifacts. Returns why the scene
    failed, or None."""
    why = scene_failure(scene, report)
    product = report.outputs.get("product")
    if product:
        clear_stale(product)
    if ingested:
        clear_stale(SceneLayout(root, scene).scene_dir)
    if why:
        current = [Path(product)] if product else []
        for path in mark_stale(root, scene, why, ingest_failed=not ingested, current=current):
            report.problem(path, "stale", "made by an earlier run and marked STALE: this run failed for the "
                                          "scene, so it does not reflect the current inputs")
    table = None
    if acc:
        table = summary_table(acc)
        report.notes.append("accuracy against ground truth:\n" + "\n".join(
            f"  {m}: {v} (goal {g})" for m, v, g in summary_rows(acc)))
        write_json_atomic(SceneLayout(root, scene).accuracy, acc, indent=1)
        report.extra["accuracy"] = {"poses": {k: v for k, v in acc["poses"].items() if k != "per photo"},
                                    "depth": {k: v for k, v in acc["depth"].items() if k != "per image"}}
    png = scene_picture({"root": root, "megadepth_out": megadepth_out}, scene, sp, acc)
    layout = SceneLayout(root, scene)
    report.outputs.update({"footage": str(layout.footage), "metadata": str(layout.metadata),
                           "ingest record": str(layout.ingest_record), "reference model": str(layout.reference_empty),
                           "megadepth": str(megadepth_out / scene)})
    report.write(layout.scene_dir, png, png_name=layout.overview.name)
    report.publish(key=f"aerial-{scene}", map_png=png)
    if table:
        # Prefect only here, in a flow run (this module is Prefect-free: importing prefect takes 5 s
        # on the shared 2-core machine, python -X importtime)
        from prefect.artifacts import create_table_artifact

        create_table_artifact(key=f"aerial-{scene}-accuracy", table=table,
                              description=f"scene {scene}: accuracy against ground truth")
    return why


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
    # matplotlib only when a picture is drawn (pyplot: 2.5 s to import on the shared 2-core machine)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = read_record(p["root"], scene)
    if meta is None:
        return None
    frames = meta.get("frames") or []
    product = sp.product if sp is not None else None
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), dpi=90, layout="constrained")
    try:
        photo = depth = None
        spread = ""
        model = None
        if product is not None and (product / "sparse-txt" / "images.txt").exists():
            model = pycolmap.Reconstruction(str(product / "sparse-txt"))
            ref = {f["name"] for f in frames}
            photos = sorted(im.name for im in model.images.values() if im.name not in ref)
            per_image = ((acc or {}).get("depth") or {}).get("per image", {})
            covered = {}  # photo -> its depth's coverage (of the true surface when measured)
            for name in photos:
                if depth_path(product / "depths", name).exists():
                    measured = per_image.get(name) or {}
                    covered[name] = float(measured["coverage"]) if measured.get("pixels") else \
                        float((read_depth_h5(depth_path(product / "depths", name)) > 0).mean())
            typical = typical_photo(covered)
            if typical is not None:  # a typical photo (median coverage), not the best
                photo = product / "images" / typical
                depth = read_depth_h5(depth_path(product / "depths", typical))
                spread = (f"median coverage of {len(covered)} photos (worst {100 * min(covered.values()):.0f} %, "
                          f"best {100 * max(covered.values()):.0f} %)")
        if photo is not None:
            axes[0].imshow(plt.imread(photo))
            axes[0].set_title(f"ground photo {photo.name}\n{spread}", fontsize=9)
            d = np.where(depth > 0, depth, np.nan)
            lo, hi = np.nanpercentile(d, [2, 98]) if np.isfinite(d).any() else (0.0, 1.0)
            im = axes[1].imshow(d, cmap="turbo", vmin=lo, vmax=hi)
            title = f"its depth (m), {100 * float((depth > 0).mean()):.0f} % of pixels; white: unknown"
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
                img = plt.imread(SceneLayout(p["root"], scene).footage / frames[len(frames) // 2]["name"])
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


def typical_photo(coverage: dict[str, float]) -> str | None:
    """The photo of median coverage (the lower median of an even count; ties by name), the one
    the overview shows: what a typical photo's depth looks like, not the best one's."""
    if not coverage:
        return None
    ranked = sorted(coverage, key=lambda name: (coverage[name], name))
    return ranked[(len(ranked) - 1) // 2]


def _misses(per: dict) -> list[str]:
    return _depth_misses(per, DEPTH_GOALS["photos"]) if per.get("pixels") else ["no depth"]
