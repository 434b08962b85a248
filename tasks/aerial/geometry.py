"""Pose conventions of the aerial pipeline (shared/contracts/aerial.md, "Conventions").

* Scene frame: local ENU in metres, origin at the first frame's (lat, lon, alt),
  positions by geodetic-to-ENU (pymap3d).
* Camera-to-world rotation of a frame:
  ``R_ecef_to_enu(lat0, lon0) @ Rotation.from_euler('XYZ', [x, y, z], degrees=True)``,
  used directly as a COLMAP camera-to-world rotation (x right, y down, z forward).
* Intrinsics: SIMPLE_PINHOLE with ``f = height / (2 tan(fovVertical / 2))`` and the
  principal point at the image centre.
"""

from __future__ import annotations

import math

import numpy as np
import pymap3d
from scipy.spatial.transform import Rotation  # noqa: F401 (re-exported)


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
    return r_ecef_to_enu(lat0_deg, lon0_deg) @ Rotation.from_euler("XYZ", rotation_xyz_deg, degrees=True).as_matrix()


def euler_from_cam2world(r_c2w: np.ndarray, lat0_deg: float, lon0_deg: float) -> np.ndarray:
    """Inverse of :func:`cam2world_rotation`: Earth Studio 'XYZ' Euler angles (degrees)."""
    r_xyz = r_ecef_to_enu(lat0_deg, lon0_deg).T @ r_c2w
    return Rotation.from_matrix(r_xyz).as_euler("XYZ", degrees=True)


def geodetic_to_enu(lat, lon, alt, lat0: float, lon0: float, alt0: float) -> np.ndarray:
    """ENU coordinates (metres) of geodetic points relative to the origin (WGS84)."""
    e, n, u = pymap3d.geodetic2enu(lat, lon, alt, lat0, lon0, alt0)
    return np.stack([np.asarray(e, float), np.asarray(n, float), np.asarray(u, float)], axis=-1)


def enu_to_geodetic(enu: np.ndarray, lat0: float, lon0: float, alt0: float) -> np.ndarray:
    lat, lon, alt = pymap3d.enu2geodetic(enu[..., 0], enu[..., 1], enu[..., 2], lat0, lon0, alt0)
    return np.stack([np.asarray(lat, float), np.asarray(lon, float), np.asarray(alt, float)], axis=-1)


def enu_to_ecef(enu: np.ndarray, lat0: float, lon0: float, alt0: float) -> np.ndarray:
    x, y, z = pymap3d.enu2ecef(enu[..., 0], enu[..., 1], enu[..., 2], lat0, lon0, alt0)
    return np.stack([np.asarray(x, float), np.asarray(y, float), np.asarray(z, float)], axis=-1)


def ecef_to_geodetic(xyz: np.ndarray) -> np.ndarray:
    lat, lon, alt = pymap3d.ecef2geodetic(xyz[..., 0], xyz[..., 1], xyz[..., 2])
    return np.stack([np.asarray(lat, float), np.asarray(lon, float), np.asarray(alt, float)], axis=-1)


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
    return Rotation.from_euler("ZXZ", [-pan_deg, tilt_deg, -roll_deg], degrees=True).as_matrix() @ R_DOWN


def pan_tilt_roll_from_rotation(r_local: np.ndarray) -> tuple[float, float, float]:
    """Inverse of :func:`rotation_from_pan_tilt_roll`: (pan in [0, 360), tilt in [0, 180], roll in (-180, 180])."""
    import warnings

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
