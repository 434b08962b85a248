"""Verification of the localized photos: a photo registered with a wrong pose poisons the
training data and is worse than a photo left out, so every registered photo must pass

* its 2D-3D evidence: the number of its keypoints whose verified matches lead to a 3D point
  of the model and that reproject within ``abs_pose_max_error`` under its pose (inliers), and
  their share of those candidate correspondences (the inlier ratio); the mean reprojection
  error of its observations;
* the plausibility of its pose against the aerial scene (the triangulated reference): its
  centre inside the horizontal extent of the reference points (with a margin), above the
  ground (a low percentile of the reference points' height) and well below the aerial
  frames, and the points it observes in front of it, within the scene;
* its orientation against its own MegaDepth pose: the MegaDepth model turned onto the aerial
  frame the way most photos agree on must give the photo the orientation it was registered
  with (a repeated or symmetric facade registers a photo turned round, with plenty of inliers).

Photos that fail are deregistered (their observations removed) and the checks repeat, since
a rejected photo may have carried points other photos were registered on. Plain functions of
a ``pycolmap.Reconstruction``, its database and the thresholds (:class:`AcceptConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pycolmap

from tasks.aerial import geometry, io
from tasks.common.forms import setting


@dataclass
class AcceptConfig:
    """Thresholds that a registered photo must meet to be kept (the rest are rejected and reported)."""

    accept_min_inliers: int = setting(
        20, "Fewest 2D-3D correspondences a registered photo needs that agree with its pose (the mapper "
            "registers from 15); a photo with fewer is rejected (a lucky pose from few matches is the usual "
            "false registration).")
    accept_min_inlier_ratio: float = setting(
        0.25, "Smallest share of a photo's 2D-3D candidate correspondences (its verified matches to points "
              "of the model) that must agree with its pose; repeated facades and foreign places give "
              "many candidates that disagree.")
    accept_max_reprojection_error: float = setting(
        3.0, "Largest mean reprojection error (pixels) of a registered photo's observations.")
    accept_extent_margin: float = setting(
        0.25, "How far outside the aerial scene's horizontal extent (the reference points, as a share of "
              "its diagonal) a photo's camera may stand.")
    accept_min_height_m: float = setting(
        -2.0, "Lowest camera height above the ground (metres; the ground is a low percentile of the "
              "reference points) of a registered photo; below it the pose is under the ground.")
    accept_max_height_share: float = setting(
        0.5, "Highest camera height above the ground of a registered photo, as a share of the aerial "
             "frames' median height: ground photos are taken near the ground.")
    accept_max_orientation_disagreement_deg: float = setting(
        5.0, "Largest rotation (degrees) between a photo's registered orientation and the one its own "
             "MegaDepth pose gives, once the MegaDepth model is turned onto the aerial frame the way most "
             "photos agree on (needs 3 photos that agree); a repeated or symmetric facade registers a photo "
             "turned round, which this catches.")
    # realistic world, 48 frames + 30 photos: right photos 0.1-1.7 m from the fit, the two false ones
    # (6.7 and 5.4 m off the truth) 7.3 and 5.6 m, on a 455 m diagonal: 0.02 let both pass
    accept_max_position_disagreement: float = setting(
        0.008, "Largest distance, as a share of the aerial scene's diagonal, between a photo's registered "
              "camera centre and the one its own MegaDepth pose gives, once the MegaDepth model is scaled, "
              "turned and moved onto the aerial frame the way most photos agree on (needs 3 photos that "
              "agree); a photo registered on imprecise or look-alike structure can keep its orientation and "
              "still stand metres away, which this catches.")
    accept_min_front_share: float = setting(
        0.95, "Smallest share of the 3D points a photo observes that must lie in front of it and within "
              "the scene (twice its diagonal): a photo must look at the reconstructed surface.")
    prior_registration: bool = setting(
        True, "Give the photos the mapper did not register, or registered wrongly, a second chance: the pose "
              "their MegaDepth pose predicts once their subscene is aligned on its verified photos, kept when "
              "enough of their 2D-3D matches agree with it and it passes the checks above.")
    # realistic world, 48 frames + 40 photos: at the predicted pose 0.11-0.55 of a true photo's candidates
    # agree, 0 of a distractor's 89-266
    prior_min_inlier_ratio: float = setting(
        0.1, "Prior registration: smallest share of the photo's 2D-3D candidates that must reproject within "
             "the pose threshold under the predicted pose. Lower than accept_min_inlier_ratio because the pose "
             "is not fitted to these matches: by chance a candidate lands within 12 px of it about once in "
             "a thousand (a distractor's: none of 89-266), while the candidates include the matches to "
             "look-alike facades that made the mapper fail.")
    prior_pairs_num: int = setting(
        10, "Prior registration: aerial frames matched anew with each photo given a second chance, the ones "
            "that see most of the model's points from its predicted pose (retrieval may have paired it with "
            "look-alike facades elsewhere); 0: only the matches made before.")


@dataclass
class SceneFrame:
    """What the plausibility checks compare a pose with: the aerial scene's extent and heights."""

    lo: np.ndarray  # (2,) east/north lower corner of the reference points (2nd percentile)
    hi: np.ndarray  # (2,) upper corner (98th percentile)
    ground: float  # height of the ground: 5th percentile of the reference points' up coordinate
    aerial_height: float  # median height of the aerial frames above the ground

    @property
    def diagonal(self) -> float:
        return float(np.linalg.norm(self.hi - self.lo))


def scene_frame(reference: pycolmap.Reconstruction) -> SceneFrame:
    """The extent of the triangulated reference (metric ENU: x east, y north, z up)."""
    pts = np.array([p.xyz for p in reference.points3D.values()])
    centres = np.array([geometry.centre(im) for im in reference.images.values() if im.has_pose])
    if len(pts) < 10:  # no surface to speak of: the frames' footprint
        pts = centres
    lo, hi = np.percentile(pts[:, :2], 2, axis=0), np.percentile(pts[:, :2], 98, axis=0)
    ground = float(np.percentile(pts[:, 2], 5))
    aerial = float(np.median(centres[:, 2]) - ground) if len(centres) else float("inf")
    return SceneFrame(lo, hi, ground, aerial)


def _projection(rec: pycolmap.Reconstruction, image) -> tuple[np.ndarray, np.ndarray]:
    """(K, cam_from_world 3x4) of a registered image (pinhole cameras: the product's)."""
    return rec.cameras[image.camera_id].calibration_matrix(), geometry.cam_from_world(image)


def _reproject(k: np.ndarray, cfw: np.ndarray, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (N, 2) in COLMAP's convention, depths (N,)) of world points."""
    cam = xyz @ cfw[:, :3].T + cfw[:, 3]
    z = cam[:, 2]
    uv = cam @ k.T
    with np.errstate(divide="ignore", invalid="ignore"):
        return uv[:, :2] / uv[:, 2:3], z


def correspondences(rec: pycolmap.Reconstruction, db: pycolmap.Database, image_id: int,
                    registered: set[int], with_ids: bool = False):
    """The photo's 2D-3D candidates: (its keypoint indices (M,), 3D points (M, 3)) from the inlier
    matches of its verified pairs with the registered images whose matched keypoint has a 3D point
    (``with_ids``: and the points' ids (M,))."""
    idx, xyz, ids = [], [], []
    for other in registered:
        if other == image_id or not db.exists_two_view_geometry(image_id, other):
            continue
        inl = np.asarray(db.read_two_view_geometry(image_id, other).inlier_matches).reshape(-1, 2)
        if not len(inl):
            continue
        im_o = rec.images[other]
        for a, b in inl:
            p2 = im_o.points2D[int(b)]
            if p2.has_point3D():
                idx.append(int(a))
                xyz.append(rec.points3D[p2.point3D_id].xyz)
                ids.append(int(p2.point3D_id))
    out = np.asarray(idx, np.int64), np.asarray(xyz, np.float64).reshape(-1, 3)
    return (*out, np.asarray(ids, np.int64)) if with_ids else out


def check_photo(rec: pycolmap.Reconstruction, db: pycolmap.Database, image, frame: SceneFrame,
                registered: set[int], max_error: float, cfg: AcceptConfig,
                extra: tuple[np.ndarray, np.ndarray] | None = None, fitted: bool = True) -> dict[str, Any]:
    """The figures of one registered photo and, when it fails, ``reason``. ``extra``: more 2D-3D
    candidates (keypoint indices, points) than its verified matches give; ``fitted`` False: its pose
    was not estimated from its observations (a prior registration): their mean reprojection error is
    reported but not held to ``accept_max_reprojection_error`` (its evidence is its inliers), and its
    inlier ratio is held to ``prior_min_inlier_ratio``."""
    k, cfw = _projection(rec, image)
    centre = geometry.centre(image)
    kp = np.array([p.xy for p in image.points2D]).reshape(-1, 2)
    idx, xyz = correspondences(rec, db, image.image_id, registered)
    if extra is not None and len(extra[0]):
        idx, xyz = np.r_[idx, extra[0]], np.vstack([xyz, extra[1]])
    if len(idx):
        uv, z = _reproject(k, cfw, xyz)
        err = np.linalg.norm(uv - kp[idx], axis=1)
        ok = (z > 0) & (err < max_error)
        inliers = len(np.unique(idx[ok]))  # a keypoint counts once
        candidates = len(np.unique(idx))
    else:
        inliers = candidates = 0
    obs = [(p.xy, rec.points3D[p.point3D_id].xyz) for p in image.points2D if p.has_point3D()]
    if obs:
        o_xy = np.array([o[0] for o in obs])
        o_xyz = np.array([o[1] for o in obs])
        uv, z = _reproject(k, cfw, o_xyz)
        reproj = float(np.mean(np.linalg.norm(uv - o_xy, axis=1)))
        front = float(np.mean((z > 0) & (z < 2 * max(frame.diagonal, 1.0))))
    else:
        reproj, front = float("nan"), 0.0
    height = float(centre[2] - frame.ground)
    outside = float(np.max(np.r_[frame.lo - centre[:2], centre[:2] - frame.hi, 0.0]))
    out = {"inliers": int(inliers), "candidates": int(candidates),
           "inlier ratio": inliers / candidates if candidates else 0.0, "reprojection error px": reproj,
           "height above ground m": height, "outside extent m": outside, "front share": front}
    reasons = []
    if inliers < cfg.accept_min_inliers:
        reasons.append(f"{inliers} 2D-3D inliers < {cfg.accept_min_inliers}")
    min_ratio = cfg.accept_min_inlier_ratio if fitted else cfg.prior_min_inlier_ratio
    if candidates and out["inlier ratio"] < min_ratio:
        reasons.append(f"inlier ratio {out['inlier ratio']:.2f} < {min_ratio}")
    if fitted and not reproj <= cfg.accept_max_reprojection_error:
        reasons.append(f"mean reprojection error {reproj:.2f} px > {cfg.accept_max_reprojection_error}")
    if outside > cfg.accept_extent_margin * frame.diagonal:
        reasons.append(f"camera {outside:.1f} m outside the aerial scene's extent (> {cfg.accept_extent_margin} "
                       f"x {frame.diagonal:.0f} m)")
    if height < cfg.accept_min_height_m:
        reasons.append(f"camera {-height:.1f} m below the ground")
    if height > cfg.accept_max_height_share * frame.aerial_height:
        reasons.append(f"camera {height:.1f} m above the ground, too high for a ground photo (> "
                       f"{cfg.accept_max_height_share} x the aerial frames' {frame.aerial_height:.0f} m)")
    if front < cfg.accept_min_front_share:
        reasons.append(f"only {100 * front:.0f} % of its points lie in front of it within the scene: it does not "
                       "look at the reconstructed surface")
    if reasons:
        out["reason"] = "; ".join(reasons)
    return out


def rotation_deg(a: np.ndarray, b: np.ndarray) -> float:
    """The angle (degrees) of the rotation between two 3x3 rotation matrices."""
    return float(np.degrees(np.arccos(np.clip((np.trace(a @ b.T) - 1) / 2, -1.0, 1.0))))


def orientation_outliers(world_from_cam: dict[str, np.ndarray], prior_cam2world: dict[str, np.ndarray],
                         max_deg: float, min_agree: int = 2) -> dict[str, float]:
    """``{photo: disagreement in degrees}`` of the photos whose registered orientation disagrees with
    their prior (MegaDepth) orientation by more than ``max_deg`` once the prior's frame is turned onto
    the model's by the alignment most photos agree on. Each photo gives one alignment
    (``R_model @ R_prior^T``); the one that the most others agree with (within ``max_deg``) wins
    when at least ``min_agree`` photos agree and no group of as many other photos agrees on another
    alignment (false registrations rarely agree with each other; measured on the realistic world:
    4 true photos agreeing and 4 wrong ones each turned differently; with kornia 0.9.2's ALIKED,
    2 true photos agreeing and 3 wrong ones). Without such a group, among two photos or more, no
    photo's orientation is confirmed and every one is an outlier (``nan``): a wrong pose is worse
    than a photo left out. A single photo has nothing to be compared with (empty)."""
    names = sorted(n for n in world_from_cam if n in prior_cam2world)
    if len(names) < 2:
        return {}
    best = orientation_consensus(world_from_cam, prior_cam2world, max_deg, min_agree)
    if best is None:
        return {n: float("nan") for n in names}
    return {n: d for n in names if (d := rotation_deg(world_from_cam[n] @ prior_cam2world[n].T, best)) > max_deg}


#: Most photo pairs whose scale-and-shift fit :func:`position_outliers` tries (all pairs up to
#: about 90 photos; above, a seeded sample, as RANSAC does: with a quarter of the photos right, a
#: sample of 4000 holds about 250 pairs of right photos).
MAX_POSITION_FITS = 4000


def _fit_scale(p: np.ndarray, c: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, float]:
    """(scale, mean of p, mean of c, spread of p) of the least-squares fit ``c = s (p - pm) + cm``
    (N x 3 each); the spread (sum of squares about the mean) is 0 when every p is at one place."""
    pm, cm = p.mean(axis=0), c.mean(axis=0)
    den = float(np.sum((p - pm) ** 2))
    return float(np.sum((p - pm) * (c - cm)) / max(den, 1e-12)), pm, cm, den


def _by_subscene(names, prior_frames: dict[str, str]) -> dict[str, list[str]]:
    """``names`` grouped by their MegaDepth subscene (``prior_frames``; absent: one group), sorted."""
    groups: dict[str, list[str]] = {}
    for n in sorted(names):
        groups.setdefault(str(prior_frames.get(n, "")), []).append(n)
    return groups


def position_outliers(centres: dict[str, np.ndarray], prior_centres: dict[str, np.ndarray], rotation: np.ndarray,
                      max_dist: float, min_agree: int = 2) -> dict[str, float]:
    """``{photo: distance}`` of the photos whose registered centre lies farther than ``max_dist``
    from their prior (MegaDepth) centre mapped onto the model by ``rotation`` (the orientation
    consensus, prior frame to model) and the scale and shift most photos agree on. Each pair of
    photos gives a scale and a shift (``c = s R p + t``); the one that the most photos agree
    with (within ``max_dist``) wins when at least ``min_agree`` photos agree and no group of as many
    other photos agrees on another fit; otherwise no photo's position is confirmed and every one is
    an outlier (``nan``). Two photos always agree with the fit of the pair (empty)."""
    names = sorted(n for n in centres if n in prior_centres)
    if len(names) < 2:
        return {}
    c = np.array([np.asarray(centres[n], np.float64) for n in names])
    p = np.array([np.asarray(rotation, np.float64) @ np.asarray(prior_centres[n], np.float64) for n in names])
    fits: list[tuple[int, int, np.ndarray]] = []  # (i, j, which photos agree with the fit of photos i and j)
    n = len(names)
    if n * (n - 1) // 2 <= MAX_POSITION_FITS:
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    else:  # a fixed (seeded) sample of distinct pairs, as RANSAC draws: the work stays linear in the photos
        draw = np.random.default_rng(0).integers(0, n, size=(4 * MAX_POSITION_FITS, 2))
        pairs = list(dict.fromkeys((int(min(a, b)), int(max(a, b))) for a, b in draw if a != b))[:MAX_POSITION_FITS]
    for i, j in pairs:
        span = np.linalg.norm(p[i] - p[j])
        if span <= 1e-9:
            continue
        scale = float(np.linalg.norm(c[i] - c[j]) / span)
        shift = np.mean([c[i] - scale * p[i], c[j] - scale * p[j]], axis=0)
        fits.append((i, j, np.linalg.norm(c - (scale * p + shift), axis=1) <= max_dist))
    if not fits:  # every prior centre at one place: nothing to fit
        return {}
    agree = max(fits, key=lambda f: int(f[2].sum()))[2]
    # the others' largest group (fits of two photos outside the winner's): a tie confirms nobody
    rival = max((int((f[2] & ~agree).sum()) for f in fits if not agree[f[0]] and not agree[f[1]]), default=0)
    if agree.sum() < min_agree or rival >= agree.sum():
        return {n: float("nan") for n in names}
    # refit on the photos that agree (least squares scale and shift), then judge every photo
    scale, pm, cm, _ = _fit_scale(p[agree], c[agree])
    dist = np.linalg.norm(c - (scale * (p - pm) + cm), axis=1)
    return {n: float(d) for n, d in zip(names, dist) if d > max_dist}


def orientation_consensus(world_from_cam: dict[str, np.ndarray], prior_cam2world: dict[str, np.ndarray],
                          max_deg: float, min_agree: int = 2) -> np.ndarray | None:
    """The rotation from the prior frame to the model that most photos agree on (see
    :func:`orientation_outliers`), or None without a consensus."""
    names = sorted(n for n in world_from_cam if n in prior_cam2world)
    if len(names) < min_agree:
        return None
    align = {n: world_from_cam[n] @ prior_cam2world[n].T for n in names}
    support = {a: {b for b in names if rotation_deg(align[a], align[b]) <= max_deg} for a in names}
    best = max(names, key=lambda n: (len(support[n]), n))
    # the others' largest group (of photos outside the winner's): a tie means no verdict
    rival = max((len(support[n] - support[best]) for n in names if n not in support[best]), default=0)
    if len(support[best]) < min_agree or rival >= len(support[best]):
        return None
    # the consensus is the mean of the group, not its best-supported member: one photo's alignment
    # carries that photo's own error (measured on the realistic world at 48 frames + 30 photos: the
    # winner was a photo 2.1 deg off, which let a photo 6.5 deg off pass at 4.6 deg; against the mean
    # of its group it stood 6.1 deg away); the group is taken again around the mean, twice
    from scipy.spatial.transform import Rotation

    rot = align[best]
    group = sorted(support[best])
    for _ in range(2):
        rot = Rotation.from_matrix(np.stack([align[n] for n in group])).mean().as_matrix()
        group = [n for n in names if rotation_deg(align[n], rot) <= max_deg] or group
    return rot


def prior_disagreements(images: dict[str, Any], priors: dict[str, np.ndarray], prior_frames: dict[str, str],
                        cfg: AcceptConfig, diagonal: float) -> dict[str, str]:
    """``{photo: why}`` of the registered ``images`` (name: pycolmap image with a pose) whose pose
    disagrees with their MegaDepth pose (``priors``: cam2world) once the MegaDepth model is turned
    (:func:`orientation_outliers`), then scaled and moved (:func:`position_outliers`) onto the model
    the way most of them agree. Each MegaDepth model (``prior_frames``: photo -> subscene; a scene's
    subscenes are separate reconstructions, ``sparse/manhattan/<subscene>``, each in its own frame)
    is aligned on its own photos: the photos of a second subscene are not judged against the
    first's alignment. A photo without a prior is not judged here."""
    whys: dict[str, str] = {}
    for names in _by_subscene([n for n in images if n in priors], prior_frames).values():
        current = {n: geometry.cam_from_world(images[n])[:, :3].T for n in names}
        prior_rot = {n: np.asarray(priors[n])[:3, :3] for n in names}
        turned = orientation_outliers(current, prior_rot, cfg.accept_max_orientation_disagreement_deg)
        whys.update({name: (f"orientation {deg:.0f} deg away from its MegaDepth pose, where the other photos "
                            f"agree (> {cfg.accept_max_orientation_disagreement_deg})" if not np.isnan(deg) else
                            "orientation not confirmed: no group of registered photos agrees with their MegaDepth "
                            "poses more than another (a tie, or no two agree)") for name, deg in turned.items()})
        rotation = orientation_consensus(current, prior_rot, cfg.accept_max_orientation_disagreement_deg)
        if rotation is None:
            continue
        # the position check judges the photos whose orientation agrees
        upright = [n for n in names if n not in turned]
        moved = position_outliers({n: geometry.centre(images[n]) for n in upright},
                                  {n: np.asarray(priors[n])[:3, 3] for n in upright}, rotation,
                                  cfg.accept_max_position_disagreement * diagonal)
        for name, dist in moved.items():
            whys[name] = (f"camera {dist:.1f} m away from where its MegaDepth pose puts it, where the other "
                          f"photos agree (> {cfg.accept_max_position_disagreement} x the scene's "
                          f"{diagonal:.0f} m)" if not np.isnan(dist) else
                          "position not confirmed: no group of registered photos agrees with their "
                          "MegaDepth positions more than another")
    return whys


def point_table(rec: pycolmap.Reconstruction, among: set[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's points for :func:`frames_seen`, read once: their coordinates (N, 3), and per
    observation by an image of ``among`` the point's row and the image's id (E,), (E,)."""
    ids = list(rec.points3D.keys())
    xyz = np.array([rec.points3D[i].xyz for i in ids], np.float64).reshape(-1, 3)
    rows, images = [], []
    for row, pid in enumerate(ids):
        for el in rec.points3D[pid].track.elements:
            if el.image_id in among:
                rows.append(row)
                images.append(el.image_id)
    return xyz, np.asarray(rows, np.int64), np.asarray(images, np.int64)


def frames_seen(table: tuple[np.ndarray, np.ndarray, np.ndarray], camera: pycolmap.Camera, cfw: np.ndarray,
                num: int) -> list[int]:
    """The ``num`` images that observe most of the points (``table``, :func:`point_table`) that
    project into ``camera`` at pose ``cfw`` (3x4 cam_from_world), in front of it: the frames that
    see what a camera there would see. Most first."""
    xyz, rows, images = table
    if not len(rows) or num <= 0:
        return []
    uv, z = _reproject(camera.calibration_matrix(), cfw, xyz)
    inside = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 1] >= 0) & (uv[:, 0] < camera.width) & (uv[:, 1] < camera.height)
    found, count = np.unique(images[inside[rows]], return_counts=True)
    order = np.lexsort((found, -count))[:num]
    return [int(i) for i in found[order]]


def matched_points(rec: pycolmap.Reconstruction, name: str, others: list[int], match_path: Path | None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 2D-3D candidates of photo ``name`` from its matches (``match_path``, not verified) with the
    images ``others`` of ``rec``: its keypoint indices (M,), the points (M, 3) and their ids (M,), for
    the matched keypoints of the others that have a point."""
    idx, xyz, ids = [], [], []
    for other in others:
        im_o = rec.images[other]
        for a, b in io.read_matches(match_path, name, im_o.name)[0]:
            p2 = im_o.points2D[int(b)]
            if p2.has_point3D():
                idx.append(int(a))
                xyz.append(rec.points3D[p2.point3D_id].xyz)
                ids.append(int(p2.point3D_id))
    return np.asarray(idx, np.int64), np.asarray(xyz, np.float64).reshape(-1, 3), np.asarray(ids, np.int64)


def _subscene_alignments(rec: pycolmap.Reconstruction, priors: dict[str, np.ndarray], prior_frames: dict[str, str],
                         cfg: AcceptConfig) -> dict[str, tuple[np.ndarray, float, np.ndarray, np.ndarray]]:
    """Each MegaDepth subscene's alignment onto the model from its photos posed in ``rec`` (at least 3
    that agree): (rotation, scale, prior mean, model mean) with model centre = scale * (rotation @
    prior centre - prior mean) + model mean (:func:`orientation_consensus`, :func:`_fit_scale`)."""
    by_name = {im.name: im for im in rec.images.values()}
    out = {}
    for sub, group in _by_subscene([n for n, im in by_name.items() if im.has_pose and n in priors],
                                   prior_frames).items():
        rotation = orientation_consensus({n: geometry.cam_from_world(by_name[n])[:, :3].T for n in group},
                                         {n: np.asarray(priors[n])[:3, :3] for n in group},
                                         cfg.accept_max_orientation_disagreement_deg) if len(group) >= 3 else None
        if rotation is None:
            continue
        scale, pm, cm, spread = _fit_scale(np.array([rotation @ np.asarray(priors[n])[:3, 3] for n in group]),
                                           np.array([geometry.centre(by_name[n]) for n in group]))
        if spread > 1e-12:
            out[sub] = (rotation, scale, pm, cm)
    return out


def register_from_priors(rec: pycolmap.Reconstruction, db: pycolmap.Database, names: list[str],
                         priors: dict[str, np.ndarray], prior_frames: dict[str, str], cfg: AcceptConfig,
                         max_error: float, frame: SceneFrame,
                         match_more: Callable[[list[tuple[str, str]]], Path] | None = None) -> dict[str, dict[str, Any]]:
    """Second chance for the photos ``names`` that are in ``rec`` without a pose (not registered, or
    deregistered by verification): within each MegaDepth subscene with at least 3 verified photos,
    the subscene's alignment onto the model (:func:`_subscene_alignments`) predicts the photo's pose
    from its MegaDepth pose. ``match_more`` (pairs -> a matches file) matches the photo with the
    ``prior_pairs_num`` aerial frames that see what the predicted pose sees (:func:`frames_seen`;
    retrieval may have paired it with look-alike facades only). The predicted pose is kept when at
    least ``accept_min_inliers`` of its 2D-3D candidates (verified matches and these new ones), and
    a share ``prior_min_inlier_ratio`` of them, reproject within ``max_error`` under it and it passes
    :func:`check_photo`; the inliers become observations. The pose is not re-estimated from these
    matches: the aerial points a photo sees are mostly one facade tens of metres away, where a pose
    fitted to them trades rotation for translation (realistic world: poses fitted to 60-250 inliers
    3.5-23 deg off, the prediction 0.2 deg). Returns per photo tried its figures and ``status``
    ("registered" with ``by prior``, or "rejected" with ``reason``)."""
    by_name = {im.name: im for im in rec.images.values()}
    alignment = _subscene_alignments(rec, priors, prior_frames, cfg)
    reference = {i for i, x in rec.images.items() if x.has_pose and x.name not in priors}
    tries: dict[str, np.ndarray] = {}
    for name in names:
        im = by_name.get(name)
        if im is None or im.has_pose or name not in priors:
            continue
        fit = alignment.get(str(prior_frames.get(name, "")))
        if fit is None:
            continue
        rotation, scale, pm, cm = fit
        r_wfc = rotation @ np.asarray(priors[name])[:3, :3]
        centre = scale * (rotation @ np.asarray(priors[name])[:3, 3] - pm) + cm
        tries[name] = np.hstack([r_wfc.T, (-r_wfc.T @ centre)[:, None]])
    extra_pairs: dict[str, list[int]] = {}
    if match_more is not None and cfg.prior_pairs_num > 0 and tries:
        table = point_table(rec, reference)
        for name, cfw in tries.items():
            im = by_name[name]
            seen = frames_seen(table, rec.cameras[im.camera_id], cfw, cfg.prior_pairs_num)
            extra_pairs[name] = [i for i in seen if not db.exists_two_view_geometry(im.image_id, i)]
    more = [(n, rec.images[i].name) for n, ids in extra_pairs.items() for i in ids]
    match_path = match_more(more) if more else None
    out: dict[str, dict[str, Any]] = {}
    for name, cfw in tries.items():
        im = by_name[name]
        registered = {i for i, x in rec.images.items() if x.has_pose}
        idx, xyz, pids = correspondences(rec, db, im.image_id, registered, with_ids=True)
        e_idx, e_xyz, e_pids = matched_points(rec, name, extra_pairs.get(name, []), match_path)
        extra = (e_idx, e_xyz)
        idx, xyz, pids = np.r_[idx, e_idx], np.vstack([xyz, e_xyz]), np.r_[pids, e_pids]
        kp = np.array([p.xy for p in im.points2D]).reshape(-1, 2)
        camera = rec.cameras[im.camera_id]
        if len(idx):
            uv, z = _reproject(camera.calibration_matrix(), cfw, xyz)
            err = np.where(z > 0, np.linalg.norm(uv - kp[idx], axis=1), np.inf)
        else:
            err = np.zeros(0)
        inliers, candidates = len(np.unique(idx[err < max_error])), len(np.unique(idx))
        if inliers < cfg.accept_min_inliers or inliers < cfg.prior_min_inlier_ratio * candidates:
            out[name] = {"status": "rejected", "inliers": inliers, "candidates": candidates,
                         "reason": f"prior registration: {inliers} of its {candidates} 2D-3D candidates agree with "
                                   f"the pose its MegaDepth pose predicts (needs {cfg.accept_min_inliers} and a share "
                                   f"of {cfg.prior_min_inlier_ratio})"}
            continue
        rec.frames[im.frame_id].rig_from_world = pycolmap.Rigid3d(cfw)  # trivial rigs: the camera's pose
        rec.register_frame(im.frame_id)
        used: set[int] = set()
        for j in np.argsort(err):  # each inlier keypoint observes its closest point, once
            if err[j] >= max_error:
                break
            k, pid = int(idx[j]), int(pids[j])
            if k in used or im.points2D[k].has_point3D() or \
                    any(el.image_id == im.image_id for el in rec.points3D[pid].track.elements):
                continue
            rec.add_observation(pid, pycolmap.TrackElement(im.image_id, k))
            used.add(k)
        registered.add(im.image_id)
        figures = check_photo(rec, db, rec.images[im.image_id], frame, registered, max_error, cfg, extra=extra,
                              fitted=False)
        if "reason" in figures:
            rec.deregister_frame(im.frame_id)
            out[name] = {"status": "rejected", **figures, "reason": f"prior registration: {figures['reason']}"}
        else:
            out[name] = {"status": "registered", "by prior": True, **figures}
    return out


def verify_registrations(rec: pycolmap.Reconstruction, reference: pycolmap.Reconstruction, db_path: Path,
                         queries: list[str], max_error: float, cfg: AcceptConfig,
                         priors: dict[str, np.ndarray] | None = None,
                         max_rounds: int = 5, prior_frames: dict[str, str] | None = None,
                         match_more: Callable[[list[tuple[str, str]]], Path] | None = None) -> dict[str, dict[str, Any]]:
    """Check every registered photo of ``queries`` in ``rec``; deregister (in place) those that
    fail and check the rest again, until none fails. ``priors``: each photo's own cam2world
    (MegaDepth's; see :func:`prior_disagreements`), ``prior_frames``: the MegaDepth model (subscene)
    each prior belongs to (absent: one model); ``match_more``: see :func:`register_from_priors`.
    Returns per photo its figures, and ``status`` "registered" or "rejected" (with ``reason``)."""
    frame = scene_frame(reference)
    by_name = {im.name: im for im in rec.images.values()}
    result: dict[str, dict[str, Any]] = {}
    db = pycolmap.Database.open(str(db_path))
    try:
        for _ in range(max_rounds):
            registered = {im.image_id for im in rec.images.values() if im.has_pose}
            failed = []
            for name in queries:
                im = by_name.get(name)
                if im is None or im.image_id not in registered:
                    continue
                figures = check_photo(rec, db, rec.images[im.image_id], frame, registered, max_error, cfg)
                result[name] = {"status": "rejected" if "reason" in figures else "registered", **figures}
                if "reason" in figures:
                    failed.append(im)
            if priors:
                # the consensus is taken among the photos that passed the checks above (those that
                # failed go anyway: a wrong pose among them must not outvote or tie the right ones)
                failing = {im.name for im in failed}
                current = {n: by_name[n] for n in queries
                           if n in by_name and by_name[n].image_id in registered and n not in failing}
                whys = prior_disagreements(current, priors, prior_frames or {}, cfg, frame.diagonal)
                for name, why in whys.items():
                    v = result[name]
                    v["reason"] = f"{v['reason']}; {why}" if "reason" in v else why
                    if v["status"] != "rejected":
                        v["status"] = "rejected"
                        failed.append(by_name[name])
            if not failed:
                break
            for im in failed:
                rec.deregister_frame(rec.images[im.image_id].frame_id)
        if priors and cfg.prior_registration:
            # a second chance from the photos' MegaDepth poses (register_from_priors); a photo the mapper
            # never registered keeps its "not registered" unless this registers it
            second = register_from_priors(rec, db, queries, priors, prior_frames or {}, cfg, max_error, frame,
                                          match_more=match_more)
            for name, v in second.items():
                if v["status"] == "registered":
                    result[name] = v
                elif name in result:
                    result[name]["reason"] = f"{result[name]['reason']}; {v['reason']}"
    finally:
        db.close()
    return result


__all__ = ["AcceptConfig", "SceneFrame", "scene_frame", "check_photo", "correspondences", "orientation_outliers",
           "orientation_consensus", "position_outliers", "point_table", "frames_seen", "matched_points", "prior_disagreements", "register_from_priors",
           "rotation_deg", "verify_registrations"]
