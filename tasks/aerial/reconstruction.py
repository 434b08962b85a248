"""Reference triangulation and query localization with pycolmap, in-process.

Steps 1 and 2 of what the original AerialMegaDepth pipeline did per scene (README, "The
aerial flow", stage 4):

1. :func:`triangulate_reference`: a COLMAP database from the empty reference model
   (Earth Studio poses), the reference features and matches imported from hloc-layout
   HDF5 files, two-view geometry *from the known poses* (a match is kept when its
   epipolar distance is below ``ref_max_epipolar_error`` pixels in both images, as
   hloc's ``triangulation.geometric_verification``), then ``pycolmap.triangulate_points``
   with the poses held fixed.
2. :func:`localize_queries`: the ground photos are added to a copy of that database
   (SIMPLE_PINHOLE cameras from the processed intrinsics), their matches to the
   reference and to each other imported and geometrically verified
   (``pycolmap.verify_matches``), then the incremental mapper is resumed from the
   triangulated reference with the existing frames fixed and the intrinsics not
   refined (``localized_model_mapper_metric`` in the original), so every registered
   photo gets a pose in the reference's metric ENU frame.

Every stage writes into a temporary folder and renames it when complete; a rerun
skips a stage whose output folder is complete (see :func:`model_complete`).
Keypoints in the hloc files have their origin at the centre of the top-left pixel;
COLMAP's at its corner, hence the +0.5 on import (as hloc).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import h5py
import numpy as np
import pycolmap

from tasks.aerial import geometry
from tasks.aerial import io as hloc_io
from tasks.aerial.verification import AcceptConfig, verify_registrations
from tasks.common.atomic import atomic_dir, remove_partials, write_json_atomic
from tasks.common.fingerprint import fingerprint
from tasks.common.forms import setting

log = logging.getLogger(__name__)


@dataclass
class SfMConfig(AcceptConfig):
    """Settings of the reference triangulation and the query localization (with the
    verification thresholds of the localized photos, :class:`AcceptConfig`)."""

    ref_max_epipolar_error: float = setting(
        4.0, "a match between two reference frames is kept when each point lies within this many pixels of "
             "the epipolar line given by the known camera poses")
    ref_min_matches: int = setting(15, "reference frame pairs with fewer pose-consistent matches are dropped")
    min_tri_angle: float = setting(1.5, "smallest angle in degrees between the rays of a triangulated point; "
                                        "points seen at a smaller angle are not triangulated or are filtered out")
    verify_min_inliers: int = setting(15, "matches a photo pair needs after geometric verification to be used")
    verify_max_error: float = setting(4.0, "RANSAC threshold of the geometric verification of photo pairs, in "
                                           "pixels")
    abs_pose_min_num_inliers: int = setting(15, "inlier matches a photo needs to be localized in the model")
    abs_pose_max_error: float = setting(12.0, "RANSAC threshold of a photo's pose estimation, in pixels")
    max_reg_trials: int = setting(5, "times COLMAP tries to localize a photo before giving up on it")
    num_threads: int = setting(-1, "CPU threads of the triangulation and localization (-1: all)")
    seed: int = setting(0, "random seed of RANSAC and of the VLAD vocabulary (same seed, same result)")


@dataclass
class StageResult:
    """What a stage did: counts, seconds, and per-item problems."""

    output: Path
    counts: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: bool = False
    problems: dict[str, str] = field(default_factory=dict)
    #: per item figures (the localization: each photo's verification, ``VERIFICATION_FILE``)
    details: dict[str, dict] = field(default_factory=dict)


#: The localization's verdict on each photo it registered (figures, status, reason), in its model folder.
VERIFICATION_FILE = "verification.json"


# ----------------------------------------------------------------------------- helpers


def model_complete(path: Path, fp: str | None = None) -> bool:
    """A model folder written by this module is complete when its marker exists (and,
    given ``fp``, records the same fingerprint: inputs and settings unchanged)."""
    marker = Path(path) / ".complete"
    if not marker.exists() or not any((Path(path) / f"images{e}").exists() for e in (".bin", ".txt")):
        return False
    return fp is None or marker.read_text().strip() == fp


@contextmanager
def _model_dir(out: Path, fp: str) -> Iterator[Path]:
    """A temporary folder for a stage's model; on success its files move into ``out``
    (keeping ``out``'s other subfolders: the triangulated reference folder holds the later
    stages), the ``.complete`` marker removed first and written last. Leftovers of killed
    runs are removed first."""
    out = Path(out)
    remove_partials(out.parent, out.name)
    with atomic_dir(out, merge=True) as tmp:
        yield tmp
        (out / ".complete").unlink(missing_ok=True)  # the body succeeded: the old model goes now
    (out / ".complete").write_text(fp + "\n")


def write_database_from_model(rec: pycolmap.Reconstruction, db_path: Path) -> dict[str, int]:
    """A new COLMAP database with the model's cameras, rigs, frames and images (same ids)."""
    db_path.unlink(missing_ok=True)
    db = pycolmap.Database.open(str(db_path))
    try:
        for cam in rec.cameras.values():
            db.write_camera(cam, use_camera_id=True)
        for rig in rec.rigs.values():
            db.write_rig(rig, use_rig_id=True)
        for frame in rec.frames.values():
            db.write_frame(frame, use_frame_id=True)
        for image in rec.images.values():
            db.write_image(image, use_image_id=True)
    finally:
        db.close()
    return {im.name: im.image_id for im in rec.images.values()}


def import_keypoints(db: pycolmap.Database, name_to_id: dict[str, int], feature_path: Path,
                     names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Write the keypoints of ``names`` (default: all of ``name_to_id``) into ``db``;
    returns them, in COLMAP's pixel convention."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(feature_path, "r") as f:
        for name in (names if names is not None else name_to_id):
            kp = hloc_io.read_keypoints_colmap(f, name, feature_path)
            db.write_keypoints(name_to_id[name], kp)
            out[name] = kp
    return out


def import_matches(db: pycolmap.Database, pairs: Iterable[tuple[str, str]], name_to_id: dict[str, int],
                   match_path: Path, unknown: str | None = None) -> list[tuple[str, str, int, int, np.ndarray]]:
    """Write the matches of every distinct pair into ``db``; returns ``(a, b, id_a, id_b,
    matches)`` per pair written. A pair naming an image not in ``name_to_id`` raises with
    ``unknown`` as the explanation, or is skipped when ``unknown`` is None."""
    seen: set[tuple[int, int]] = set()
    out = []
    for a, b in pairs:
        if a not in name_to_id or b not in name_to_id:
            if unknown is not None:
                raise KeyError(f"pair {a} {b}: {unknown}")
            continue
        ia, ib = name_to_id[a], name_to_id[b]
        key = (min(ia, ib), max(ia, ib))
        if ia == ib or key in seen:
            continue
        seen.add(key)
        m, _ = hloc_io.read_matches(match_path, a, b)
        db.write_matches(ia, ib, m.astype(np.uint32))
        out.append((a, b, ia, ib, m))
    return out


# ----------------------------------------------------------------------------- stage 1


def triangulate_reference(reference_empty: Path, image_dir: Path, feature_path: Path, match_path: Path,
                          pairs_path: Path, out_dir: Path, config: SfMConfig = SfMConfig(),
                          overwrite: bool = False) -> StageResult:
    """Triangulate the reference frames' matches with their Earth Studio poses held fixed.

    Writes ``out_dir`` (binary model + ``database.db``, the database the localization
    starts from)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    fp = fingerprint(config, reference_empty, feature_path, match_path, pairs_path)
    if not overwrite and model_complete(out_dir, fp):
        rec = pycolmap.Reconstruction(str(out_dir))
        return StageResult(out_dir, {"reference images": rec.num_reg_images(), "reference points": rec.num_points3D()},
                           skipped=True)
    rec = pycolmap.Reconstruction(str(reference_empty))
    with _model_dir(out_dir, fp) as tmp:
        db_path = tmp / "database.db"
        name_to_id = write_database_from_model(rec, db_path)
        pairs = hloc_io.read_pairs(pairs_path)
        kept_pairs = 0
        kept_matches = 0
        db = pycolmap.Database.open(str(db_path))
        try:
            kps = import_keypoints(db, name_to_id, feature_path)
            written = import_matches(db, pairs, name_to_id, match_path,
                                     unknown=f"in {pairs_path}, names an image that is not in {reference_empty}")
            for a, b, ia, ib, m in written:
                if len(m) == 0:
                    continue
                im_a, im_b = rec.images[ia], rec.images[ib]
                f_mat = geometry.fundamental_from_poses(rec.cameras[im_a.camera_id].calibration_matrix(), geometry.cam_from_world(im_a),
                                                 rec.cameras[im_b.camera_id].calibration_matrix(), geometry.cam_from_world(im_b))
                d0, d1 = geometry.epipolar_errors(f_mat, kps[a][m[:, 0]], kps[b][m[:, 1]])
                inl = m[(d0 < config.ref_max_epipolar_error) & (d1 < config.ref_max_epipolar_error)]
                if len(inl) < config.ref_min_matches:
                    continue
                tvg = pycolmap.TwoViewGeometry()
                tvg.config = pycolmap.TwoViewGeometryConfiguration.CALIBRATED
                tvg.F = f_mat
                tvg.inlier_matches = inl.astype(np.uint32)
                db.write_two_view_geometry(ia, ib, tvg)
                kept_pairs += 1
                kept_matches += len(inl)
        finally:
            db.close()
        opts = _pipeline_options(config)
        opts.fix_existing_frames = True
        tri = pycolmap.triangulate_points(rec, str(db_path), str(image_dir), str(tmp), clear_points=True,
                                          options=opts, refine_intrinsics=False)
        tri.write(str(tmp))
    errors = [p.error for p in tri.points3D.values()]
    return StageResult(out_dir, {
        "reference images": tri.num_reg_images(), "reference pairs": len(written),
        "reference pairs verified": kept_pairs, "reference matches verified": kept_matches,
        "reference points": tri.num_points3D(),
        "reference reprojection error px": float(np.mean(errors)) if errors else float("nan"),
    }, seconds=time.perf_counter() - t0)


def _pipeline_options(config: SfMConfig) -> pycolmap.IncrementalPipelineOptions:
    opts = pycolmap.IncrementalPipelineOptions()
    opts.num_threads = config.num_threads
    opts.random_seed = config.seed
    opts.ba_refine_focal_length = False
    opts.ba_refine_principal_point = False
    opts.ba_refine_extra_params = False
    opts.mapper.filter_min_tri_angle = config.min_tri_angle
    opts.triangulation.min_angle = config.min_tri_angle
    opts.extract_colors = True
    # every image of the database, also those without verified pairs: the models we
    # resume from hold them, and the mapper's cache must know every image they hold
    opts.load_all_images = True
    return opts


# ----------------------------------------------------------------------------- stage 2


@dataclass
class Query:
    """A ground photo to localize: its name in the model and its pinhole intrinsics."""

    name: str
    width: int
    height: int
    K: np.ndarray  # 3x3
    cam2world: np.ndarray | None = None  # 4x4, its MegaDepth pose (verification compares orientations)
    frame: str = ""  # the MegaDepth model (subscene) cam2world belongs to: each has its own frame


def query_camera(q: Query, camera_id: int) -> pycolmap.Camera:
    """SIMPLE_PINHOLE (the contract's five numbers): f is the mean of fx and fy, which the
    preprocessing makes differ only by the rounding of the downscaled size."""
    fx, fy = float(q.K[0, 0]), float(q.K[1, 1])
    if abs(fx - fy) > 0.01 * max(fx, fy):
        raise ValueError(f"{q.name}: intrinsics fx={fx:.2f} fy={fy:.2f} differ by more than 1 %; "
                         "SIMPLE_PINHOLE cannot represent them (re-run the MegaDepth preprocessing)")
    return pycolmap.Camera(model="SIMPLE_PINHOLE", width=q.width, height=q.height,
                           params=[(fx + fy) / 2.0, float(q.K[0, 2]), float(q.K[1, 2])], camera_id=camera_id)


def localize_queries(reference: Path, queries: list[Query], image_dir: Path, feature_path: Path, match_path: Path,
                     pairs_path: Path, out_dir: Path, config: SfMConfig = SfMConfig(),
                     overwrite: bool = False,
                     prior_matcher: tuple[str, Callable[[list[tuple[str, str]], Path], Path]] | None = None
                     ) -> StageResult:
    """Register the ground photos into the triangulated reference (its frames fixed).

    ``pairs_path`` lists query-reference and query-query pairs. ``prior_matcher``: (its name,
    f(pairs, matches file) -> matches file), the matcher of the second chance's new pairs
    (:func:`tasks.aerial.verification.register_from_priors`; kept as ``matches-prior.h5``).
    Writes ``out_dir``: the merged model (binary) in the reference's metric frame and its database."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    fp = fingerprint({"sfm": asdict(config), "prior matcher": prior_matcher[0] if prior_matcher else None,
                      "queries": [[q.name, q.width, q.height, np.asarray(q.K).tolist()]
                                                         + ([np.asarray(q.cam2world).tolist(), q.frame]
                                                            if q.cam2world is not None else [])
                                                         for q in queries]},
                     Path(reference) / ".complete", feature_path, match_path, pairs_path)
    if not overwrite and model_complete(out_dir, fp):
        rec = pycolmap.Reconstruction(str(out_dir))
        verdict = _read_verification(out_dir)
        return StageResult(out_dir, _localization_counts(rec, queries, verdict), skipped=True,
                           problems=_verification_problems(verdict), details=verdict)
    ref = pycolmap.Reconstruction(str(reference))
    with _model_dir(out_dir, fp) as tmp:
        db_path = tmp / "database.db"
        shutil.copyfile(Path(reference) / "database.db", db_path)
        problems: dict[str, str] = {}
        name_to_id = {im.name: im.image_id for im in ref.images.values()}
        next_cam = max(ref.cameras) + 1 if ref.cameras else 1
        next_id = max(name_to_id.values()) + 1 if name_to_id else 1
        next_rig = max(ref.rigs) + 1 if ref.rigs else 1
        next_frame = max(ref.frames) + 1 if ref.frames else 1
        db = pycolmap.Database.open(str(db_path))
        q_names = []
        try:
            with h5py.File(feature_path, "r") as ff:
                for q in queries:
                    if q.name in name_to_id:
                        raise ValueError(f"query {q.name} has the name of a reference image; rename it")
                    if q.name not in ff:
                        problems[q.name] = f"no features in {feature_path.name} (unreadable image?)"
                        continue
                    cam = query_camera(q, next_cam)
                    db.write_camera(cam, use_camera_id=True)
                    rig = pycolmap.Rig(rig_id=next_rig)
                    rig.add_ref_sensor(cam.sensor_id)
                    db.write_rig(rig, use_rig_id=True)
                    frame = pycolmap.Frame(frame_id=next_frame, rig_id=next_rig)
                    frame.add_data_id(pycolmap.data_t(cam.sensor_id, next_id))
                    db.write_frame(frame, use_frame_id=True)
                    image = pycolmap.Image(name=q.name, camera_id=next_cam, image_id=next_id, frame_id=next_frame)
                    db.write_image(image, use_image_id=True)
                    name_to_id[q.name] = next_id
                    q_names.append(q.name)
                    next_cam, next_id, next_rig, next_frame = next_cam + 1, next_id + 1, next_rig + 1, next_frame + 1
            import_keypoints(db, name_to_id, feature_path, q_names)
            # pairs with an image without features are skipped: reported above
            valid_pairs = [(a, b) for a, b, *_ in import_matches(db, hloc_io.read_pairs(pairs_path), name_to_id, match_path)]
        finally:
            db.close()
        if not q_names:  # nothing to register: the merged model is the reference
            ref.write(str(tmp))
            write_json_atomic(tmp / VERIFICATION_FILE, {}, indent=1)
            return StageResult(out_dir, _localization_counts(ref, queries), seconds=time.perf_counter() - t0,
                               problems=problems)
        pairs_tmp = tmp / "pairs-verify.txt"
        hloc_io.write_pairs(pairs_tmp, valid_pairs)
        t_verify = time.perf_counter()
        vopts = pycolmap.TwoViewGeometryOptions()
        vopts.min_num_inliers = config.verify_min_inliers
        vopts.ransac.max_error = config.verify_max_error
        vopts.ransac.random_seed = config.seed
        pycolmap.verify_matches(str(db_path), str(pairs_tmp), options=vopts)
        t_verify = time.perf_counter() - t_verify

        opts = _pipeline_options(config)
        opts.fix_existing_frames = True
        opts.multiple_models = False
        opts.min_model_size = 1
        opts.mapper.abs_pose_min_num_inliers = config.abs_pose_min_num_inliers
        opts.mapper.abs_pose_max_error = config.abs_pose_max_error
        opts.mapper.max_reg_trials = config.max_reg_trials
        opts.mapper.abs_pose_refine_focal_length = False
        opts.mapper.abs_pose_refine_extra_params = False
        work = tmp / "mapper"
        work.mkdir()
        t_map = time.perf_counter()
        models = pycolmap.incremental_mapping(str(db_path), str(image_dir), str(work), options=opts,
                                              input_path=str(reference))
        t_map = time.perf_counter() - t_map
        if not models:
            raise RuntimeError(f"{out_dir}: the mapper returned no model (reference {reference})")
        rec = max(models.values(), key=lambda r: r.num_reg_images())
        shutil.rmtree(work)
        _check_reference_fixed(ref, rec)
        # every registered photo is verified; those that fail are deregistered before the model is written
        t_accept = time.perf_counter()
        priors = {q.name: np.asarray(q.cam2world) for q in queries if q.cam2world is not None}
        match_more = (lambda pairs: prior_matcher[1](pairs, tmp / "matches-prior.h5")) if prior_matcher else None
        verdict = verify_registrations(rec, ref, db_path, q_names, config.abs_pose_max_error, config, priors=priors,
                                       prior_frames={q.name: q.frame for q in queries}, match_more=match_more)
        t_accept = time.perf_counter() - t_accept
        rec.write(str(tmp))
        write_json_atomic(tmp / VERIFICATION_FILE, verdict, indent=1)
        registered = {im.name for im in rec.images.values() if im.has_pose}
        for name in q_names:
            if name not in registered and name not in verdict:
                problems[name] = "not registered (too few verified matches to the reference or to registered photos)"
        problems.update(_verification_problems(verdict))
    counts = _localization_counts(rec, queries, verdict)
    counts.update({"verification seconds": t_verify, "mapper seconds": t_map, "acceptance seconds": t_accept,
                   "query pairs": len(valid_pairs)})
    return StageResult(out_dir, counts, seconds=time.perf_counter() - t0, problems=problems, details=verdict)


def _read_verification(model_dir: Path) -> dict[str, dict]:
    path = Path(model_dir) / VERIFICATION_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _verification_problems(verdict: dict[str, dict]) -> dict[str, str]:
    return {name: f"rejected after registration: {v['reason']}" for name, v in verdict.items()
            if v.get("status") == "rejected"}


def _localization_counts(rec: pycolmap.Reconstruction, queries: list[Query],
                         verdict: dict[str, dict] | None = None) -> dict[str, float]:
    names = {q.name for q in queries}
    reg = [im for im in rec.images.values() if im.has_pose and im.name in names]
    errors = [p.error for p in rec.points3D.values()]
    return {"photos attempted": len(names), "photos registered": len(reg),
            "photos rejected": sum(v.get("status") == "rejected" for v in (verdict or {}).values()),
            "points": rec.num_points3D(),
            "mean reprojection error px": float(np.mean(errors)) if errors else float("nan")}


def _check_reference_fixed(ref: pycolmap.Reconstruction, rec: pycolmap.Reconstruction, tol: float = 1e-6) -> None:
    by_name = {im.name: im for im in rec.images.values()}
    for im in ref.images.values():
        new = by_name.get(im.name)
        if new is None or not new.has_pose:
            raise RuntimeError(f"reference frame {im.name} lost its pose in the localization")
        if not np.allclose(geometry.cam_from_world(im), geometry.cam_from_world(new), atol=tol * max(1.0, np.abs(geometry.centre(im)).max())):
            raise RuntimeError(f"reference frame {im.name} moved in the localization (frames must stay fixed)")


__all__ = ["SfMConfig", "AcceptConfig", "VERIFICATION_FILE", "StageResult", "Query", "triangulate_reference", "localize_queries", "model_complete",
           "import_keypoints", "import_matches", "write_database_from_model", "query_camera", "fingerprint"]
