"""The second localization pass: the photos' own MegaDepth poses, tied to the aerial frame by
the photos the first pass registered and verification kept, choose the aerial frames every
photo is matched with.

Retrieval pairs a ground photo with the aerial frames that look most alike, and on real and
realistic data many of them show another building with the same facade (measured on the
realistic world: about half of the retrieved frames see none of the photo's surface, and
their pairs pass geometric verification with 15-64 inliers), so the mapper registers some
photos turned round (verification rejects them) and loses others. Once a few photos are
registered and verified, the MegaDepth model's similarity to the aerial frame follows from
their camera centres (``pycolmap.estimate_sim3d``, checked against their orientations);
every photo's MegaDepth pose then says where it stands in the aerial frame, and its pairs
become the aerial frames nearest to that pose whose viewing directions are within
``max_angle`` (hloc's ``pairs_from_poses``, as the reference frames are paired), which
drops the look-alike frames on the wrong side. The localization then runs again on those
pairs (and the photo-photo pairs); verification judges its result as it judged the first.

Plain functions of poses, a ``pycolmap.Reconstruction`` and the first pass's verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pycolmap

from tasks.aerial import geometry, pairs
from tasks.aerial.verification import rotation_deg


@dataclass
class PriorAlignment:
    """The similarity that maps the MegaDepth model onto the aerial frame (``aerial = scale *
    rotation @ megadepth + translation``) and the photos it was estimated from."""

    scale: float
    rotation: np.ndarray  # 3x3
    translation: np.ndarray  # (3,)
    photos: list[str]
    #: largest distance between a photo's registered centre and its mapped MegaDepth centre (m)
    max_centre_residual_m: float
    #: largest angle between a photo's registered orientation and its mapped MegaDepth one (deg)
    max_rotation_residual_deg: float

    def cam2world(self, prior: np.ndarray) -> np.ndarray:
        """A MegaDepth cam2world (4x4) in the aerial frame."""
        out = np.eye(4)
        out[:3, :3] = self.rotation @ np.asarray(prior)[:3, :3]
        out[:3, 3] = self.scale * self.rotation @ np.asarray(prior)[:3, 3] + self.translation
        return out

    def summary(self) -> dict[str, Any]:
        return {"photos": self.photos, "scale": self.scale, "max centre residual m": self.max_centre_residual_m,
                "max rotation residual deg": self.max_rotation_residual_deg}


def verified_poses(rec: pycolmap.Reconstruction, verdict: dict[str, dict]) -> dict[str, np.ndarray]:
    """cam2world (4x4, aerial frame) of the photos of ``rec`` that verification kept."""
    return {im.name: geometry.cam2world_matrix(im) for im in rec.images.values()
            if im.has_pose and verdict.get(im.name, {}).get("status") == "registered"}


def align_priors(registered: dict[str, np.ndarray], priors: dict[str, np.ndarray], diagonal: float,
                 max_centre_share: float, max_rotation_deg: float,
                 min_photos: int = 3) -> tuple[PriorAlignment | None, str]:
    """The MegaDepth-to-aerial similarity from the verified photos (``registered``: their
    cam2world in the aerial frame) that have a prior (MegaDepth cam2world), and why there is
    none when there is none: fewer than ``min_photos`` photos, or one of them farther than
    ``max_centre_share`` of the aerial scene's ``diagonal`` from where the similarity puts it,
    or turned more than ``max_rotation_deg`` from it (the MegaDepth model and the
    registrations disagree: no second pass rather than pairs from a wrong alignment)."""
    names = sorted(n for n in registered if n in priors)
    if len(names) < min_photos:
        return None, f"{len(names)} verified photos with a MegaDepth pose (< {min_photos})"
    src = np.array([np.asarray(priors[n], np.float64)[:3, 3] for n in names])
    tgt = np.array([np.asarray(registered[n], np.float64)[:3, 3] for n in names])
    sim = pycolmap.estimate_sim3d(src, tgt)
    if sim is None:
        return None, "the verified photos' centres do not determine a similarity (collinear or coincident)"
    m = np.asarray(sim.matrix(), np.float64)
    scale = float(np.cbrt(np.linalg.det(m[:, :3])))
    if not scale > 0:
        return None, "the similarity between the MegaDepth model and the aerial frame is degenerate"
    align = PriorAlignment(scale, m[:, :3] / scale, m[:, 3], names, 0.0, 0.0)
    mapped = {n: align.cam2world(priors[n]) for n in names}
    align.max_centre_residual_m = max(float(np.linalg.norm(mapped[n][:3, 3] - np.asarray(registered[n])[:3, 3]))
                                      for n in names)
    align.max_rotation_residual_deg = max(rotation_deg(mapped[n][:3, :3], np.asarray(registered[n])[:3, :3])
                                          for n in names)
    if align.max_centre_residual_m > max_centre_share * diagonal:
        return None, (f"a verified photo stands {align.max_centre_residual_m:.1f} m from where its MegaDepth pose "
                      f"puts it (> {max_centre_share} x the scene's {diagonal:.0f} m)")
    if align.max_rotation_residual_deg > max_rotation_deg:
        return None, (f"a verified photo is turned {align.max_rotation_residual_deg:.1f} deg from its mapped "
                      f"MegaDepth orientation (> {max_rotation_deg})")
    return align, ""


def prior_pairs(align: PriorAlignment, priors: dict[str, np.ndarray], reference_c2w: dict[str, np.ndarray],
                num: int, max_angle_deg: float) -> list[tuple[str, str]]:
    """Each photo of ``priors`` with the ``num`` reference frames nearest to its mapped
    MegaDepth pose whose viewing directions differ by less than ``max_angle_deg`` (hloc's
    ``pairs_from_poses`` over the reference frames only), photo first."""
    out: list[tuple[str, str]] = []
    for name in sorted(priors):
        if name in reference_c2w:
            raise ValueError(f"photo {name} has the name of a reference frame; rename it")
        poses = {name: align.cam2world(priors[name]), **reference_c2w}
        out.extend(pairs.pairs_from_poses(poses, num, max_angle_deg, queries=[name]))
    return out


__all__ = ["PriorAlignment", "verified_poses", "align_priors", "prior_pairs"]
