"""PatchMatch source selection (tasks/aerial/dense/views.py: select_sources_covering) costs per
reference O(candidates + track observations) Python operations, not O(candidates x points): the
benchmark of issue 23 (bench/bench_aerial_scale.py) found the per-image cost growing ~N^1.6 at a
fixed number of points per image (0.0085 / 0.053 / 0.55 CPU s per image at 64 / 250 / 1000 images
of a synthetic scene) from a Python membership test of every candidate against every point's track.
The count below is of hashes of image ids, deterministic: no timing is asserted."""

import numpy as np

from tasks.aerial.dense import views

HASHES = [0]


class ImageId(int):
    """An image id that counts how often it is hashed (a set or dict membership test)."""

    def __hash__(self):
        HASHES[0] += 1
        return int.__hash__(self)


class _Pose:
    def __init__(self, m):
        self._m = m

    def matrix(self):
        return self._m


class _Image:
    def __init__(self, iid, m, centre):
        self.image_id, self.camera_id, self.has_pose, self.name = iid, 1, True, f"im{int(iid):04d}.jpg"
        self.cam_from_world = _Pose(m)
        self._c = centre
        self.points2D = []

    def projection_center(self):
        return self._c


class _Camera:
    width, height = 480, 360

    def calibration_matrix(self):
        return np.array([[400.0, 0, 240], [0, 400.0, 180], [0, 0, 1]])


class _Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def _look_at(c, target):
    z = target - c
    z /= np.linalg.norm(z)
    x = np.cross(z, [0, 0, 1.0])
    x /= np.linalg.norm(x)
    return np.hstack([np.stack([x, np.cross(z, x), z]), (-np.stack([x, np.cross(z, x), z]) @ c)[:, None]])


def _scene(n: int, points_per_image: int = 20, track_len: int = 4):
    """``n`` cameras on a spiral around a block of points, each point observed (its track) by the
    first ``track_len`` cameras of a shuffled order that see it: a duck-typed pycolmap.Reconstruction."""
    rng = np.random.default_rng(n)
    rec = _Obj(cameras={1: _Camera()}, images={}, points3D={})
    K = rec.cameras[1].calibration_matrix()
    t = np.linspace(0, 6 * np.pi, n)
    for k in range(n):
        c = np.array([80 * np.cos(t[k]), 80 * np.sin(t[k]), 30 + 40 * k / n])
        iid = ImageId(k + 1)
        rec.images[iid] = _Image(iid, _look_at(c, rng.normal(0, 5, 3)), c)
    ids = list(rec.images)
    xyz = np.c_[rng.uniform(-40, 40, (points_per_image * n, 2)), rng.uniform(0, 20, points_per_image * n)]
    for p, x in enumerate(xyz):
        seen = []
        for i in rng.permutation(len(ids)):
            m = rec.images[ids[i]].cam_from_world.matrix()
            q = m[:, :3] @ x + m[:, 3]
            u, v = (K @ q)[:2] / q[2] if q[2] > 0 else (-1, -1)
            if 0 <= u < 480 and 0 <= v < 360:
                seen.append(ids[i])
            if len(seen) >= track_len:
                break
        if len(seen) >= 2:
            rec.points3D[p + 1] = _Obj(xyz=x, track=_Obj(elements=[_Obj(image_id=i) for i in seen]))
            for i in seen:
                rec.images[i].points2D.append(_Obj(point3D_id=p + 1, has_point3D=lambda: True))
    return rec


def test_source_selection_does_not_test_every_candidate_against_every_point():
    rec = _scene(120)
    ref = next(iter(rec.images))
    n_points = len(rec.points3D)
    elements = sum(len(p.track.elements) for p in rec.points3D.values())
    HASHES[0] = 0
    chosen = views.select_sources_covering(rec, ref, 6)
    hashes = HASHES[0]
    assert len(chosen) == 6 and ref not in chosen and len(set(chosen)) == 6
    # with the fix about 4 000 here; before it, a test per candidate and point in front
    assert hashes < 2 * (len(rec.images) + elements), (hashes, len(rec.images), n_points, elements)
