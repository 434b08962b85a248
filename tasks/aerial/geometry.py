"""Camera maths of the aerial pipeline: pose conventions, poses of COLMAP images, projection.

The one module for camera helpers; the stages (ingest, pairs, reconstruction, dense,
covisibility, evaluation) import them from here. Conventions (as the original
AerialMegaDepth pipeline computes them; README "The aerial flow"):

* Scene frame: local ENU in metres, origin at the first frame's (lat, lon, alt),
  positions by geodetic-to-ENU (pymap3d).
* Camera-to-world rotation of a frame:
  ``R_ecef_to_enu(lat0, lon0) @ Rotation.from_euler('XYZ', [x, y, z], degrees=True)``,
  used directly as a COLMAP camera-to-world rotation (x right, y down, z forward).
* Intrinsics: SIMPLE_PINHOLE with ``f = height / (2 tan(fovVertical / 2))`` and the
  principal point at the image centre.
* Poses are COLMAP's: ``x_cam = R x_world + t`` (world-to-camera ``[R | t]``, "w2c");
  camera x right, y down, z forward; the centre of pixel ``(row i, column j)`` is at
  ``(j + 0.5, i + 0.5)``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

# pymap3d, scipy and pycolmap are imported where used: the camera helpers the dense stage needs import
# with numpy alone (bench/gpu_check.sh runs the dense stage on a machine that may lack pymap3d and scipy;
# measured on the shared 2-core machine, python -X importtime: scipy.spatial.transform 0.9-1.9 s,
# pymap3d 0.5 s, pycolmap 0.8 s against 0.4 s for numpy);
# ``geometry.Rotation`` (scipy's) and ``geometry.pymap3d`` stay available to callers, on first use


def __getattr__(name: str):
    if name == "Rotation":
        from scipy.spatial.transform import Rotation

        return Rotation
    if name == "pymap3d":
        import pymap3d

        return pymap3d
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def r_ecef_to_enu(lat0_deg: float, lon0_deg: float) -> np.ndarray:
    """Rotation taking ECEF vectors to the local ENU axes at (lat0, lon0)."""
    lat, lon = math.radians(lat0_deg), math.radians(lon0_deg)
    sl, cl = math.sin(lat), math.cos(lat)
    so, co = math.sin(lon), math.cos(lon)
    return np.array([
        [-so, co, 0.0],
        [-sl * co, -sl * so, cl],
        [cl * co, cl * so, sl],
    ])


def cam2world_rotation(rotation_xyz_deg, lat0_deg: float, lon0_deg: float) -> np.ndarray:
    """Camera-to-world (ENU) rotation of an Earth Studio frame from its Euler angles."""
    from scipy.spatial.transform import Rotation

    return r_ecef_to_enu(lat0_deg, lon0_deg) @ Rotation.from_euler("XYZ", rotation_xyz_deg, degrees=True).as_matrix()


def euler_from_cam2world(r_c2w: np.ndarray, lat0_deg: float, lon0_deg: float) -> np.ndarray:
    """Inverse of :func:`cam2world_rotation`: Earth Studio 'XYZ' Euler angles (degrees)."""
    from scipy.spatial.transform import Rotation

    r_xyz = r_ecef_to_enu(lat0_deg, lon0_deg).T @ r_c2w
    return Rotation.from_matrix(r_xyz).as_euler("XYZ", degrees=True)


def geodetic_to_enu(lat, lon, alt, lat0: float, lon0: float, alt0: float) -> np.ndarray:
    """ENU coordinates (metres) of geodetic points relative to the origin (WGS84)."""
    import pymap3d

    e, n, u = pymap3d.geodetic2enu(lat, lon, alt, lat0, lon0, alt0)
    return np.stack([np.asarray(e, float), np.asarray(n, float), np.asarray(u, float)], axis=-1)


def enu_to_geodetic(enu: np.ndarray, lat0: float, lon0: float, alt0: float) -> np.ndarray:
    import pymap3d

    lat, lon, alt = pymap3d.enu2geodetic(enu[..., 0], enu[..., 1], enu[..., 2], lat0, lon0, alt0)
    return np.stack([np.asarray(lat, float), np.asarray(lon, float), np.asarray(alt, float)], axis=-1)


def enu_to_ecef(enu: np.ndarray, lat0: float, lon0: float, alt0: float) -> np.ndarray:
    import pymap3d

    x, y, z = pymap3d.enu2ecef(enu[..., 0], enu[..., 1], enu[..., 2], lat0, lon0, alt0)
    return np.stack([np.asarray(x, float), np.asarray(y, float), np.asarray(z, float)], axis=-1)


def focal_from_fov(height: int, fov_vertical_deg: float) -> float:
    return height / (2.0 * math.tan(math.radians(fov_vertical_deg) / 2.0))


def fov_from_focal(height: int, focal: float) -> float:
    return math.degrees(2.0 * math.atan(height / (2.0 * focal)))


def look_at(position: np.ndarray, target: np.ndarray, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """COLMAP-convention camera-to-world rotation (x right, y down, z forward) looking
    from ``position`` at ``target`` in ENU."""
    z = np.asarray(target, float) - np.asarray(position, float)
    z /= np.linalg.norm(z)
    x = np.cross(z, np.asarray(up, float))
    if np.linalg.norm(x) < 1e-9:  # looking straight up/down: pick north as image "up"
        x = np.cross(z, np.array([0.0, 1.0, 0.0]))
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    return np.stack([x, y, z], axis=1)


# Earth Studio's camera rotation in a project (.esp): pan (heading, degrees clockwise
# from north), tilt (0 = looking straight down, 90 = at the horizon) and roll, in the
# local ENU frame at the camera.  With pan = tilt = roll = 0 the camera looks straight
# down with the top of the image towards north (x east, y south, z down).  Then
# ``R_local = Rz(-pan) @ Rx(tilt) @ Rz(-roll) @ R_DOWN``: tilt raises the view towards
# north about the east axis, pan turns it clockwise seen from above, roll turns the
# image about the viewing direction.
R_DOWN = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])


def rotation_from_pan_tilt_roll(pan_deg: float, tilt_deg: float, roll_deg: float = 0.0) -> np.ndarray:
    """COLMAP camera-to-world rotation in the camera's own local ENU frame."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("ZXZ", [-pan_deg, tilt_deg, -roll_deg], degrees=True).as_matrix() @ R_DOWN


def pan_tilt_roll_from_rotation(r_local: np.ndarray) -> tuple[float, float, float]:
    """Inverse of :func:`rotation_from_pan_tilt_roll`: (pan in [0, 360), tilt in [0, 180], roll in (-180, 180])."""
    from scipy.spatial.transform import Rotation

    m = np.asarray(r_local, float) @ R_DOWN.T
    with warnings.catch_warnings():  # straight down (tilt 0): pan and roll are one angle, scipy warns
        warnings.simplefilter("ignore", UserWarning)
        a, b, c = Rotation.from_matrix(m).as_euler("ZXZ", degrees=True)
    pan, tilt, roll = -a, b, -c
    return float(pan % 360.0), float(tilt), float((roll + 180.0) % 360.0 - 180.0)


def local_rotation(r_c2w_frame: np.ndarray, frame_lat: float, frame_lon: float, lat: float, lon: float) -> np.ndarray:
    """A camera-to-world rotation given in the ENU frame at (frame_lat, frame_lon), re-expressed
    in the local ENU frame at the camera's own (lat, lon)."""
    return r_ecef_to_enu(lat, lon) @ r_ecef_to_enu(frame_lat, frame_lon).T @ np.asarray(r_c2w_frame, float)


# ----------------------------------------------------------------------------- COLMAP poses


def cam_from_world(image) -> np.ndarray:
    """World-to-camera ``[R | t]`` (3x4, float64) of a posed ``pycolmap.Image`` (pycolmap 3.11+
    exposes ``cam_from_world`` as a method, older versions as a property)."""
    pose = image.cam_from_world
    pose = pose() if callable(pose) else pose
    return np.asarray(pose.matrix(), dtype=np.float64)


def w2c_matrix(image) -> np.ndarray:
    """World-to-camera 4x4 of a posed ``pycolmap.Image``."""
    m = np.eye(4)
    m[:3] = cam_from_world(image)
    return m


def invert_pose(m: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 (or 3x4) pose, as 4x4: w2c <-> c2w."""
    m = np.asarray(m, dtype=np.float64)
    r, t = m[:3, :3], m[:3, 3]
    out = np.eye(4)
    out[:3, :3] = r.T
    out[:3, 3] = -r.T @ t
    return out


def cam2world_matrix(image) -> np.ndarray:
    """Camera-to-world 4x4 of a posed ``pycolmap.Image``."""
    return invert_pose(cam_from_world(image))


def centre(image) -> np.ndarray:
    """Projection centre (world) of a posed ``pycolmap.Image``."""
    return np.asarray(image.projection_center(), dtype=np.float64)


def cam2world_from_model(model_dir) -> dict[str, np.ndarray]:
    """Camera-to-world 4x4 poses of the registered images of a COLMAP model, by name
    (image id order)."""
    import pycolmap

    rec = pycolmap.Reconstruction(str(model_dir))
    return {rec.images[i].name: cam2world_matrix(rec.images[i]) for i in sorted(rec.images)
            if rec.images[i].has_pose}


def relative_pose(w2c_a: np.ndarray, w2c_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R, t) taking camera-a coordinates to camera-b coordinates (contiguous arrays)."""
    b = np.eye(4)
    b[:3] = np.asarray(w2c_b, float)[:3]
    m = b @ invert_pose(w2c_a)
    return np.ascontiguousarray(m[:3, :3]), np.ascontiguousarray(m[:3, 3])


def rotation_error_deg(r_est: np.ndarray, r_gt: np.ndarray) -> float:
    """Angle (degrees) of the rotation taking ``r_gt`` to ``r_est``."""
    c = (np.trace(np.asarray(r_est).T @ np.asarray(r_gt)) - 1.0) / 2.0
    return math.degrees(math.acos(float(np.clip(c, -1.0, 1.0))))


def angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle (degrees) between vectors along the last axis."""
    na = np.linalg.norm(a, axis=-1)
    nb = np.linalg.norm(b, axis=-1)
    c = np.sum(a * b, axis=-1) / np.maximum(na * nb, 1e-12)
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


def project(K: np.ndarray, R: np.ndarray, t: np.ndarray, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pixels Nx2 in COLMAP's convention, depth N) of world points ``xyz`` (Nx3) seen by the
    pinhole camera ``K [R | t]``."""
    xc = np.asarray(xyz, float) @ np.asarray(R).T + np.asarray(t)
    z = xc[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = (xc[:, :2] / z[:, None]) @ np.asarray(K)[:2, :2].T + np.asarray(K)[:2, 2]
    return uv, z


def backproject(depth: np.ndarray, K: np.ndarray, w2c: np.ndarray, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """World points of the pixels with depth (z along the camera axis; pixel centres at +0.5,
    COLMAP's convention), and their (row, col)."""
    rows, cols = np.nonzero(depth[::stride, ::stride] > 0)
    rows, cols = rows * stride, cols * stride
    z = depth[rows, cols].astype(np.float64)
    x = (cols + 0.5 - K[0, 2]) / K[0, 0] * z
    y = (rows + 0.5 - K[1, 2]) / K[1, 1] * z
    cam = np.stack([x, y, z], axis=1)
    R, t = w2c[:3, :3], w2c[:3, 3]
    return (cam - t) @ R, np.stack([rows, cols], axis=1)


def fundamental_from_poses(k0: np.ndarray, w2c0: np.ndarray, k1: np.ndarray, w2c1: np.ndarray) -> np.ndarray:
    """Fundamental matrix (x1^T F x0 = 0) of two calibrated cameras with known poses."""
    p0, p1 = np.asarray(w2c0, float)[:3], np.asarray(w2c1, float)[:3]
    r = p1[:, :3] @ p0[:, :3].T
    t = p1[:, 3] - r @ p0[:, 3]
    tx = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    return np.linalg.inv(k1).T @ tx @ r @ np.linalg.inv(k0)


def epipolar_errors(f_mat: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distances (px) of x0 to the epipolar lines of x1 and of x1 to those of x0."""
    h0 = np.concatenate([x0, np.ones((len(x0), 1))], axis=1)
    h1 = np.concatenate([x1, np.ones((len(x1), 1))], axis=1)
    l1 = h0 @ f_mat.T
    l0 = h1 @ f_mat
    d1 = np.abs(np.sum(l1 * h1, axis=1)) / np.linalg.norm(l1[:, :2], axis=1).clip(1e-12)
    d0 = np.abs(np.sum(l0 * h0, axis=1)) / np.linalg.norm(l0[:, :2], axis=1).clip(1e-12)
    return d0, d1
