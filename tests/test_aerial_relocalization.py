"""The second localization pass's geometry (tasks.aerial.relocalization): the MegaDepth model
tied to the aerial frame by the verified photos, and pairs from the photos' mapped poses that
leave out the look-alike frames on the wrong side."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from tasks.aerial import relocalization


def pose(rotation: np.ndarray, centre) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = centre
    return out


def looking(direction_deg: float, centre) -> np.ndarray:
    """A camera at ``centre`` looking horizontally towards azimuth ``direction_deg`` (z forward,
    y down: a ground photo)."""
    a = np.deg2rad(direction_deg)
    z = np.array([np.cos(a), np.sin(a), 0.0])
    y = np.array([0.0, 0.0, -1.0])
    return pose(np.stack([np.cross(y, z), y, z], axis=1), centre)


#: MegaDepth's frame: the aerial frame turned, scaled by 1/40 and moved (as a MegaDepth model is).
TRUE_ROT = Rotation.from_euler("zyx", [130.0, 20.0, -35.0], degrees=True).as_matrix()
TRUE_SCALE, TRUE_T = 40.0, np.array([-240.0, -80.0, -298.0])


def to_megadepth(c2w: np.ndarray) -> np.ndarray:
    """The MegaDepth cam2world of a camera whose aerial cam2world is ``c2w``."""
    return pose(TRUE_ROT.T @ c2w[:3, :3], TRUE_ROT.T @ (c2w[:3, 3] - TRUE_T) / TRUE_SCALE)


@pytest.fixture()
def photos():
    rng = np.random.default_rng(0)
    return {f"p{i}.jpg": looking(rng.uniform(0, 360), rng.uniform(-20, 20, 3) * [1, 1, 0.05]) for i in range(6)}


def test_the_similarity_is_recovered_and_maps_other_photos(photos):
    priors = {n: to_megadepth(c) for n, c in photos.items()}
    registered = {n: photos[n] for n in ["p0.jpg", "p1.jpg", "p2.jpg"]}
    align, why = relocalization.align_priors(registered, priors, diagonal=100.0, max_centre_share=0.05,
                                             max_rotation_deg=5.0)
    assert align is not None, why
    assert align.scale == pytest.approx(TRUE_SCALE, rel=1e-6) and align.max_centre_residual_m < 1e-6
    for n in ["p3.jpg", "p4.jpg", "p5.jpg"]:  # not registered: mapped where they truly stand
        np.testing.assert_allclose(align.cam2world(priors[n]), photos[n], atol=1e-6)


def test_no_alignment_from_too_few_or_disagreeing_photos(photos):
    priors = {n: to_megadepth(c) for n, c in photos.items()}
    align, why = relocalization.align_priors({n: photos[n] for n in ["p0.jpg", "p1.jpg"]}, priors, 100.0, 0.05, 5.0)
    assert align is None and "< 3" in why
    moved = {n: photos[n].copy() for n in ["p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg"]}
    moved["p3.jpg"][:3, 3] += [15.0, 0.0, 0.0]  # one registration 15 m off: the alignment is not trusted
    align, why = relocalization.align_priors(moved, priors, 100.0, 0.05, 5.0)
    assert align is None and "from where its MegaDepth pose puts it" in why
    turned = {n: photos[n].copy() for n in ["p0.jpg", "p1.jpg", "p2.jpg"]}
    turned["p2.jpg"][:3, :3] = Rotation.from_euler("z", 180, degrees=True).as_matrix() @ turned["p2.jpg"][:3, :3]
    align, why = relocalization.align_priors(turned, priors, 100.0, 0.05, 5.0)
    assert align is None and "turned" in why


def test_prior_pairs_keep_the_frames_that_look_the_same_way():
    """Ground-level frames on a ring, half looking east and half west (the realistic world's
    layout, where the west-looking frames see a facade like the east-looking ones'): a photo
    looking east is paired only with the east-looking frames, nearest first."""
    frames = {f"f{i:02d}.jpeg": looking(0.0 if i % 2 == 0 else 180.0, [i * 5.0, 0.0, 0.0]) for i in range(10)}
    photo = looking(10.0, [21.0, 3.0, 0.0])
    align = relocalization.PriorAlignment(1.0, np.eye(3), np.zeros(3), [], 0.0, 0.0)
    got = relocalization.prior_pairs(align, {"p.jpg": photo}, frames, num=3, max_angle_deg=75.0)
    assert got == [("p.jpg", "f04.jpeg"), ("p.jpg", "f06.jpeg"), ("p.jpg", "f02.jpeg")]
    with pytest.raises(ValueError, match="name of a reference frame"):
        relocalization.prior_pairs(align, {"f00.jpeg": photo}, frames, num=3, max_angle_deg=75.0)
