"""Dense depth for a registered scene: step 3 of the aerial contract (shared/contracts/aerial.md).

Two backends behind one interface, both starting from a workspace made by
:func:`prepare_workspace` (``images/<name>`` and ``sparse/`` with pinhole cameras):

* **gpu**: COLMAP PatchMatch stereo with geometric consistency and stereo fusion through
  pycolmap (needs a CUDA build, ``pycolmap-cuda12``), exactly what the original pipeline ran;
  :func:`dense_gpu` then converts each ``stereo/depth_maps/<name>.geometric.bin`` to
  ``depths/<stem>.h5``.
* **cpu**: honest multi-view stereo built from OpenCV pieces (:func:`depth_cpu`). For a
  reference image and each of its source views (:func:`select_sources`): when the epipole lies
  well outside the reference view (sideways motion, e.g. an orbiting aerial camera) the pair is
  rectified from the known relative pose, disparities come from ``cv2.StereoSGBM`` with a
  left-right consistency check, they are converted to metric depth in the rectified frame and
  mapped back onto the reference pixel grid (the depth along the reference z axis, not the
  rectified one); otherwise (forward motion, e.g. a low pass along a street) a multi-direction
  plane sweep (fronto-parallel and ground planes, NCC, winner-take-all) gives the estimate. The
  per-source depth maps are then fused: per pixel the median of the estimates that agree within
  ``rel_tolerance``, kept only where at least ``min_consistent`` agree.

Geometry conventions: COLMAP's (``x_cam = R x_world + t``; camera x right, y down, z forward;
the centre of pixel ``(row i, column j)`` is at ``(j + 0.5, i + 0.5)``). OpenCV functions take
pixel *indices* (centre at integer coordinates), so every homography handed to OpenCV is wrapped
in the half-pixel shifts. Depth is the z coordinate in the reference camera (metres in a metric
model), 0 where unknown.

Rectification is computed here (not with ``cv2.stereoRectify``) for two reasons: OpenCV picks a
*vertical* rectification whenever the baseline has a larger y than x component, which SGBM cannot
use, and its ``alpha`` cropping does not know which parts of the two views overlap. The rectified
frame has its x axis along the baseline (so the source always lies to the right and disparities
are positive), its z axis is the mean viewing direction made orthogonal to the baseline, and both
rectified views share one focal length and row grid (the reference's working focal length);
the map from reference pixel to rectified pixel is the homography ``K_rect @ R_rect @ K_ref^-1``
(the ``P1[:, :3] @ R1 @ K^-1`` of OpenCV's formulation).

File formats: depth ``<stem>.h5`` with dataset ``depth`` (float32, gzip); COLMAP dense arrays
(``.bin``: ASCII ``width&height&channels&`` then little-endian float32 values, channel planes of
row-major rows, i.e. column-major ``(width, height, channels)``); ``fused.ply`` binary little
endian with ``x y z`` float and ``red green blue`` uchar vertices.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, Sequence

import cv2
import h5py
import numpy as np
import pycolmap

from tasks.common.atomic import atomic_path

log = logging.getLogger(__name__)

CUDA_MESSAGE = "pycolmap is built without CUDA: install pycolmap-cuda12 on GPU workers"

#: Camera models whose zero-distortion special case is an ideal pinhole.
_PERSPECTIVE_MODELS = {"SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV", "FULL_OPENCV",
                       "SIMPLE_DIVISION", "DIVISION", "FOV"}
_ZERO_DISTORTION = 1e-6  # |k| below this counts as no distortion
_FOCAL_EQUAL_REL = 1e-4  # fx, fy within this relative difference become one focal length

# ----------------------------------------------------------------------------- config


@dataclass
class DenseConfig:
    """Settings of the dense stage (both backends; the CPU ones are prefixed where ambiguous)."""

    backend: str = "auto"  # "cpu" | "gpu" | "auto" (the caller resolves "auto")
    num_sources: int = 4  # neighbouring views per reference image
    max_image_size: int = 2000  # as the original PatchMatch setting (long side, pixels)
    min_consistent: int = 2  # CPU fusion: number of per-source estimates that must agree
    rel_tolerance: float = 0.03  # CPU fusion: relative depth agreement
    # --- source selection (both backends)
    min_triangulation_angle: float = 3.0  # degrees
    max_triangulation_angle: float = 40.0  # degrees
    max_view_angle: float = 60.0  # degrees between the principal axes
    max_scale_ratio: float = 2.0  # pose-only fallback: apparent scale of the scene in the two views
    # --- CPU backend
    cpu_max_image_size: int | None = None  # working size of the CPU stereo (None: max_image_size)
    min_baseline_angle: float = 30.0  # degrees between baseline and reference axis (epipole well outside)
    candidate_factor: int = 3  # consider num_sources * candidate_factor ranked candidates
    sgbm_block_size: int = 3
    sgbm_uniqueness: int = 5
    sgbm_speckle_window: int = 100
    sgbm_speckle_range: int = 2
    sgbm_mode: str = "3way"  # "3way" | "sgbm" (5 paths) | "hh" (8 paths, more memory)
    max_disparities: int = 256  # cap of numDisparities (multiple of 16)
    fallback_disparity_fraction: float = 0.25  # no depth prior: search 0 .. fraction * width
    prior_near_pad: float = 1.5  # disparity search from the prior: nearest depth = zmin / near_pad
    prior_far_pad: float | None = None  # farthest depth = zmax * far_pad (None: infinity)
    min_pair_scale: float = 0.35  # a pair whose disparity range exceeds max_disparities is matched smaller
    lr_max_diff: float = 1.0  # left-right check tolerance (pixels)
    min_texture: float = 0.0  # local grey std (5x5) below which a pixel is not matched (0: off)
    max_rect_factor: float = 1.6  # rectified extent cap, in units of the working image's long side
    sweep_fallback: bool = True  # plane sweep for pairs that cannot be rectified (forward motion)
    sweep_max_size: int = 480  # plane sweep (forward-motion pairs): working long side
    sweep_window: int = 9  # NCC window (pixels)
    sweep_step_px: float = 1.0  # plane spacing: at most this pixel motion between planes
    sweep_max_planes: int = 128
    sweep_ground: bool = True  # also sweep horizontal (ground) planes
    sweep_min_ncc: float = 0.6
    sweep_min_margin: float = 0.1  # best NCC minus the best NCC of clearly different depths
    sweep_min_std: float = 2.0  # grey-level std in the window below which NCC is not trusted
    sweep_min_center_std: float = 1.0  # 3x3 grey std a pixel needs (0: off)
    sweep_sigma_px: float = 0.5  # assumed matching precision (pixels) for the conditioning test
    sweep_max_rel_error: float = 0.02  # drop pixels whose depth would be less precise than this
    depth_min: float | None = None  # optional manual depth range (both backends)
    depth_max: float | None = None
    # --- GPU backend
    geom_consistency: bool = True
    gpu_index: str = "-1"
    fusion_min_num_pixels: int = 5
    patch_match_extra: dict = field(default_factory=dict)  # extra PatchMatchOptions attributes

    def cpu_size(self) -> int:
        return int(self.cpu_max_image_size or self.max_image_size)


class DenseError(RuntimeError):
    """A dense step could not run for one image (the message says why)."""


# ----------------------------------------------------------------------------- names & files


def image_stem(name: str) -> str:
    """``name`` without its last suffix (``"0001_000.jpeg" -> "0001_000"``,
    ``"123_o.jpg.jpg" -> "123_o.jpg"``); folders in the name are kept."""
    p = PurePosixPath(name)
    return str(p.with_name(p.stem)) if p.suffix else str(p)


def depth_path(depth_dir: Path, name: str) -> Path:
    return Path(depth_dir) / f"{image_stem(name)}.h5"


def write_depth_h5(path: Path, depth: np.ndarray) -> Path:
    """Write ``depth`` (HxW, metres, 0 = unknown) as dataset ``depth``, float32, gzip, atomically."""
    path = Path(path)
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"{path}: depth must be 2-D, got shape {depth.shape}")
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("depth", data=depth, compression="gzip", compression_opts=4)
    return path


def read_depth_h5(path: Path | str) -> np.ndarray:
    """The ``depth`` dataset of an HDF5 file as float32."""
    with h5py.File(path, "r") as f:
        return np.asarray(f["depth"][()], dtype=np.float32)


def read_colmap_array(path: Path | str) -> np.ndarray:
    """Read a COLMAP dense ``.bin`` array (depth/normal map): ``HxW`` for one channel, else ``HxWxC``."""
    data = Path(path).read_bytes()
    pos, fields = 0, []
    for _ in range(3):
        amp = data.index(b"&", pos)
        fields.append(int(data[pos:amp].decode("ascii").strip()))
        pos = amp + 1
    width, height, channels = fields
    if width <= 0 or height <= 0 or channels <= 0:
        raise ValueError(f"{path}: bad COLMAP array header {fields}")
    n = width * height * channels
    arr = np.frombuffer(data, dtype="<f4", count=n, offset=pos) if len(data) - pos >= 4 * n else None
    if arr is None:
        raise ValueError(f"{path}: truncated COLMAP array ({len(data) - pos} bytes for {n} floats)")
    arr = arr.reshape((width, height, channels), order="F").transpose(1, 0, 2)
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    return arr[:, :, 0] if channels == 1 else arr


def write_colmap_array(path: Path | str, array: np.ndarray) -> Path:
    """Write ``HxW`` or ``HxWxC`` float32 data in COLMAP's dense ``.bin`` format (atomic)."""
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"array must be HxW or HxWxC, got {a.shape}")
    height, width, channels = a.shape
    header = f"{width}&{height}&{channels}&".encode("ascii")
    body = np.asarray(a.transpose(1, 0, 2), dtype="<f4").tobytes(order="F")
    with atomic_path(path, suffix=".bin") as tmp:
        tmp.write_bytes(header + body)
    return Path(path)


def write_ply_points(path: Path | str, xyz: np.ndarray, rgb: np.ndarray | None = None) -> Path:
    """Binary little-endian PLY with ``x y z`` (float) and ``red green blue`` (uchar) vertices."""
    xyz = np.asarray(xyz, dtype=np.float32).reshape(-1, 3)
    rgb = np.full((len(xyz), 3), 255, np.uint8) if rgb is None else np.asarray(rgb, np.uint8).reshape(-1, 3)
    if len(rgb) != len(xyz):
        raise ValueError("xyz and rgb differ in length")
    vert = np.empty(len(xyz), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                     ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    vert["x"], vert["y"], vert["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    vert["red"], vert["green"], vert["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    header = ("ply\nformat binary_little_endian 1.0\n"
              f"element vertex {len(vert)}\n"
              "property float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n").encode("ascii")
    with atomic_path(path, suffix=".ply") as tmp:
        with open(tmp, "wb") as fh:
            fh.write(header)
            fh.write(vert.tobytes())
    return Path(path)


def read_ply_points(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """(xyz float32 Nx3, rgb uint8 Nx3) of a binary little-endian PLY written by
    :func:`write_ply_points` (or COLMAP: extra float/uchar properties are skipped)."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    lines = data[:end].decode("ascii").splitlines()
    if lines[0] != "ply" or "binary_little_endian" not in lines[1]:
        raise ValueError(f"{path}: not a binary little-endian PLY")
    n, props, in_vertex = 0, [], False
    types = {"float": "<f4", "float32": "<f4", "double": "<f8", "uchar": "u1", "uint8": "u1",
             "int": "<i4", "int32": "<i4", "uint": "<u4", "short": "<i2", "ushort": "<u2", "char": "i1"}
    for line in lines[2:]:
        parts = line.split()
        if parts[:1] == ["element"]:
            in_vertex = parts[1] == "vertex"
            if in_vertex:
                n = int(parts[2])
        elif parts[:1] == ["property"] and in_vertex:
            props.append((parts[2], types[parts[1]]))
    vert = np.frombuffer(data, dtype=np.dtype(props), count=n, offset=end)
    xyz = np.stack([vert["x"], vert["y"], vert["z"]], 1).astype(np.float32)
    rgb = np.stack([vert["red"], vert["green"], vert["blue"]], 1).astype(np.uint8)
    return xyz, rgb


# ----------------------------------------------------------------------------- workspace


def _pinhole_camera(cam: pycolmap.Camera, users: list[str]) -> tuple[str, list[float]]:
    """(model, params) of the equivalent SIMPLE_PINHOLE / PINHOLE camera; ValueError if distorted."""
    model = cam.model_name
    who = f"camera {cam.camera_id} ({model}, used by {', '.join(users[:3])}{'...' if len(users) > 3 else ''})"
    if model not in _PERSPECTIVE_MODELS:
        raise ValueError(f"{who} is not a pinhole-type model; the caller must undistort the images with "
                         "pycolmap.undistort_images before the dense stage")
    p = np.asarray(cam.params, float)
    extra = p[list(cam.extra_params_idxs())] if len(cam.extra_params_idxs()) else np.zeros(0)
    if extra.size and np.max(np.abs(extra)) > _ZERO_DISTORTION:
        raise ValueError(f"{who} has lens distortion {extra.tolist()}; the caller must undistort the images "
                         "with pycolmap.undistort_images before the dense stage")
    fx, fy = float(cam.focal_length_x), float(cam.focal_length_y)
    cx, cy = float(cam.principal_point_x), float(cam.principal_point_y)
    if abs(fx - fy) <= _FOCAL_EQUAL_REL * max(fx, fy):
        return "SIMPLE_PINHOLE", [0.5 * (fx + fy), cx, cy]
    return "PINHOLE", [fx, fy, cx, cy]


def _find_image(name: str, image_dirs: Mapping[str, Path] | Sequence[Path] | Path) -> Path | None:
    if isinstance(image_dirs, Mapping):
        loc = image_dirs.get(name)
        if loc is None:
            return None
        loc = Path(loc)
        if loc.is_file() and not (loc / name).exists():
            return loc
        return loc / name if (loc / name).is_file() else None
    dirs = [Path(image_dirs)] if isinstance(image_dirs, (str, os.PathLike)) else [Path(d) for d in image_dirs]
    for d in dirs:
        if (d / name).is_file():
            return d / name
    return None


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link ``src`` to ``dst`` (copy across file systems); atomic, skips a complete ``dst``."""
    if dst.exists():
        try:
            if os.path.samefile(src, dst) or dst.stat().st_size == src.stat().st_size:
                return
        except OSError:
            pass
    with atomic_path(dst, suffix=dst.suffix) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def prepare_workspace(reconstruction_dir: Path, image_dirs: Mapping[str, Path] | Sequence[Path] | Path,
                      workspace: Path, image_names: Iterable[str] | None = None) -> Path:
    """Make a COLMAP-style undistorted workspace: ``workspace/images/<name>`` (hard link or copy of
    each model image) and ``workspace/sparse/`` (binary model, cameras as SIMPLE_PINHOLE, or PINHOLE
    when fx != fy).

    ``image_dirs``: one folder, a list of folders searched in order, or a mapping
    ``{image name: folder}`` (a value may also be the image file itself). Cameras with real lens
    distortion raise ValueError naming the camera: undistort first with
    ``pycolmap.undistort_images``. Images that cannot be found are logged and left out of
    ``images/`` (the dense step then reports them as failures); their poses stay in the model.
    ``image_names`` limits which image files are placed (all model images by default).
    Idempotent: complete files already in place are kept; the model is rewritten atomically.
    """
    workspace = Path(workspace)
    rec = pycolmap.Reconstruction(str(reconstruction_dir))
    users: dict[int, list[str]] = {}
    for im in rec.images.values():
        users.setdefault(im.camera_id, []).append(im.name)
    for cid in sorted(rec.cameras):
        cam = rec.cameras[cid]
        model, params = _pinhole_camera(cam, sorted(users.get(cid, [])))
        if cam.model_name != model or not np.allclose(cam.params, params):
            cam.model = getattr(pycolmap.CameraModelId, model)
            cam.params = params

    wanted = None if image_names is None else set(image_names)
    missing = []
    for im in sorted(rec.images.values(), key=lambda i: i.name):
        if wanted is not None and im.name not in wanted:
            continue
        src = _find_image(im.name, image_dirs)
        if src is None:
            missing.append(im.name)
            continue
        _link_or_copy(src, workspace / "images" / im.name)
    if missing:
        log.warning("prepare_workspace: %d image(s) not found: %s", len(missing), ", ".join(missing[:5]))

    sparse = workspace / "sparse"
    tmp = workspace / ".sparse.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    rec.write(str(tmp))
    if sparse.exists():
        old = workspace / ".sparse.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(sparse, old)
        os.replace(tmp, sparse)
        shutil.rmtree(old)
    else:
        os.replace(tmp, sparse)
    _WS_CACHE.pop(str(workspace.resolve()), None)
    return workspace


# ----------------------------------------------------------------------------- geometry helpers


@dataclass
class _Cam:
    image_id: int
    name: str
    K: np.ndarray  # 3x3, full resolution, COLMAP pixel convention
    R: np.ndarray  # world -> camera
    t: np.ndarray
    width: int
    height: int

    @property
    def centre(self) -> np.ndarray:
        return -self.R.T @ self.t

    @property
    def axis(self) -> np.ndarray:
        return self.R[2]


def _posed_ids(rec: pycolmap.Reconstruction) -> list[int]:
    """Ids of the images with a pose (registered), sorted."""
    return sorted(i for i, im in rec.images.items() if im.has_pose)


def _cam(rec: pycolmap.Reconstruction, image_id: int) -> _Cam:
    im = rec.images[image_id]
    cam = rec.cameras[im.camera_id]
    m = np.asarray(im.cam_from_world().matrix(), float)
    return _Cam(image_id, im.name, np.asarray(cam.calibration_matrix(), float), m[:, :3], m[:, 3],
                int(cam.width), int(cam.height))


def _angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle (degrees) between vectors along the last axis."""
    na = np.linalg.norm(a, axis=-1)
    nb = np.linalg.norm(b, axis=-1)
    c = np.sum(a * b, axis=-1) / np.maximum(na * nb, 1e-12)
    return np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))


def _project(c: _Cam, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pixels Nx2, depth N) of world points."""
    xc = xyz @ c.R.T + c.t
    z = xc[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = (xc[:, :2] / z[:, None]) @ c.K[:2, :2].T + c.K[:2, 2]
    return uv, z


def _depth_prior(rec: pycolmap.Reconstruction, c: _Cam, min_points: int = 10) -> np.ndarray:
    """Depths (in camera ``c``) of the sparse points it sees (see :func:`_prior_points`)."""
    xyz = _prior_points(rec, c, min_points)
    if xyz is None or not len(xyz):
        return np.zeros(0)
    _, z = _project(c, xyz)
    return z[z > 0]


def _all_points(rec: pycolmap.Reconstruction) -> np.ndarray:
    """All 3D points of ``rec`` (Nx3), cached for the last model seen."""
    key = (id(rec), rec.num_points3D())
    hit = _POINTS_CACHE.get("last")
    if hit is not None and hit[0] == key and hit[1] is rec:
        return hit[2]
    xyz = np.array([p.xyz for p in rec.points3D.values()], float).reshape(-1, 3)
    _POINTS_CACHE["last"] = (key, rec, xyz)
    return xyz


_POINTS_CACHE: dict[str, tuple] = {}


def select_sources(rec: pycolmap.Reconstruction, image_id: int, k: int, min_angle_deg: float = 3.0,
                   max_angle_deg: float = 40.0, max_view_angle_deg: float = 60.0, max_scale_ratio: float = 2.0,
                   exclude: Iterable[int] = (), min_overlap: float = 0.25) -> list[int]:
    """Up to ``k`` source image ids for reference ``image_id``, best first; deterministic.

    1. Images sharing 3D points with the reference (``rec.points3D`` tracks), kept when the median
       triangulation angle of the shared points (angle at the point between the two camera centres)
       lies in ``[min_angle_deg, max_angle_deg]`` and the principal axes differ by at most
       ``max_view_angle_deg``; ranked by the number of shared points (as COLMAP's ``__auto__``).
    2. When fewer than ``k`` are found (e.g. a model with poses only, or images without
       observations), the rest is filled from the other images by geometry. Scene points seen by
       the reference (the sparse points projecting into it; for a pose-only model a grid of its
       pixels at a typical depth) must fall inside the candidate for at least ``min_overlap`` of
       them, their median triangulation angle must lie in the same range, the axes within
       ``max_view_angle_deg`` and the median apparent scale ratio of the scene in the two views
       within ``max_scale_ratio``; ranked by distance between the camera centres.
    """
    if k <= 0:
        return []
    ref = _cam(rec, image_id)
    excluded = set(exclude) | {image_id}
    chosen: list[int] = []

    # --- 1. shared 3D points
    im = rec.images[image_id]
    shared: dict[int, list[float]] = {}
    centres: dict[int, np.ndarray] = {}
    for p2 in im.points2D:
        if not p2.has_point3D():
            continue
        pt = rec.points3D[p2.point3D_id]
        xyz = np.asarray(pt.xyz, float)
        ray_r = ref.centre - xyz
        for el in pt.track.elements:
            j = el.image_id
            if j in excluded:
                continue
            if j not in centres:
                centres[j] = np.asarray(rec.images[j].projection_center(), float)
            shared.setdefault(j, []).append(float(_angle(ray_r, centres[j] - xyz)))
    ranked = []
    for j, angles in shared.items():
        med = float(np.median(angles))
        if not (min_angle_deg <= med <= max_angle_deg):
            continue
        cj = _cam(rec, j)
        if _angle(ref.axis, cj.axis) > max_view_angle_deg:
            continue
        ranked.append((-len(angles), abs(med - 0.5 * (min_angle_deg + max_angle_deg)), j))
    chosen = [j for *_, j in sorted(ranked)][:k]
    if len(chosen) >= k:
        return chosen

    # --- 2. geometric fallback: co-visibility of scene points seen by the reference
    pts = _scene_points(rec, ref)
    if pts is None:
        return chosen
    f_ref = float(np.sqrt(ref.K[0, 0] * ref.K[1, 1]))
    d_ref = np.linalg.norm(pts - ref.centre, axis=1)
    cands = []
    for j in _posed_ids(rec):
        if j in excluded or j in chosen:
            continue
        cj = _cam(rec, j)
        if _angle(ref.axis, cj.axis) > max_view_angle_deg:
            continue
        uv, z = _project(cj, pts)
        vis = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < cj.width) & (uv[:, 1] >= 0) & (uv[:, 1] < cj.height)
        if vis.mean() < min_overlap:
            continue
        tri = float(np.median(_angle(ref.centre - pts[vis], cj.centre - pts[vis])))
        if not (min_angle_deg <= tri <= max_angle_deg):
            continue
        f_j = float(np.sqrt(cj.K[0, 0] * cj.K[1, 1]))
        scale = float(np.median((f_j / np.linalg.norm(pts[vis] - cj.centre, axis=1)) / (f_ref / d_ref[vis])))
        if max(scale, 1.0 / scale) > max_scale_ratio:
            continue
        cands.append((float(np.linalg.norm(cj.centre - ref.centre)), j))
    chosen += [j for _, j in sorted(cands)][: k - len(chosen)]
    return chosen


def _scene_points(rec: pycolmap.Reconstruction, ref: _Cam, max_points: int = 300) -> np.ndarray | None:
    """Scene points seen by ``ref`` for source selection: the sparse points it sees (see
    :func:`_prior_points`), else a grid of its pixels at a typical depth (the median distance at
    which the other principal axes pass closest to its own, else 10 times the median distance to
    the other cameras)."""
    xyz = _prior_points(rec, ref)
    if xyz is not None and len(xyz):
        step = max(1, len(xyz) // max_points)
        return xyz[::step]
    others = [_cam(rec, j) for j in _posed_ids(rec) if j != ref.image_id]
    if not others:
        return None
    depths = []
    for c in others:
        d = c.centre - ref.centre
        a, b, cc = 1.0, ref.axis @ c.axis, 1.0
        den = a * cc - b * b
        if den < 1e-6:
            continue
        s_ = (cc * (d @ ref.axis) - b * (d @ c.axis)) / den
        u_ = (b * (d @ ref.axis) - a * (d @ c.axis)) / den
        if s_ > 0 and u_ > 0:
            depths.append(s_)
    if depths:
        depth = float(np.median(depths))
    else:
        depth = 10.0 * float(np.median([np.linalg.norm(c.centre - ref.centre) for c in others]))
    if depth <= 0:
        return None
    gu, gv = np.meshgrid(np.linspace(0.1, 0.9, 7) * ref.width, np.linspace(0.1, 0.9, 5) * ref.height)
    rays = np.stack([gu.ravel(), gv.ravel(), np.ones(gu.size)], 1) @ np.linalg.inv(ref.K).T
    return (rays * depth - ref.t) @ ref.R


# ----------------------------------------------------------------------------- CPU backend


class _Workspace:
    """Model and image cache of one workspace."""

    def __init__(self, path: Path):
        self.path = Path(path)
        sparse = self.path / "sparse"
        if not sparse.is_dir():
            raise FileNotFoundError(f"{sparse}: no sparse model; run prepare_workspace first")
        self.rec = pycolmap.Reconstruction(str(sparse))
        self.by_name = {self.rec.images[iid].name: iid for iid in _posed_ids(self.rec)}
        self.up = _up_vector(self.rec)
        self._lock = threading.Lock()
        self._images: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def image(self, name: str, max_size: int) -> tuple[np.ndarray, float]:
        """(BGR uint8 image at working size, scale) of a workspace image; raises when unreadable."""
        c = _cam(self.rec, self.by_name[name])
        scale = min(1.0, max_size / max(c.width, c.height))
        path = self.path / "images" / name
        try:
            st = path.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: image missing from the workspace") from None
        key = (name, max_size, st.st_mtime_ns, st.st_size)
        with self._lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key], scale
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise DenseError(f"{path}: cannot decode the image (corrupt or unsupported)")
        if img.shape[1] != c.width or img.shape[0] != c.height:
            raise DenseError(f"{path}: image is {img.shape[1]}x{img.shape[0]}, its camera says {c.width}x{c.height}")
        if scale < 1.0:
            size = (max(1, round(c.width * scale)), max(1, round(c.height * scale)))
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        with self._lock:
            self._images[key] = img
            while len(self._images) > 24:
                self._images.popitem(last=False)
        return img, scale


_WS_CACHE: dict[str, tuple[float, _Workspace]] = {}
_WS_LOCK = threading.Lock()


def _workspace(path: Path) -> _Workspace:
    """The cached :class:`_Workspace` of ``path`` (reloaded when its sparse model changes)."""
    path = Path(path)
    key = str(path.resolve())
    sparse = path / "sparse"
    stamp = max((p.stat().st_mtime_ns for p in sparse.glob("*")), default=0) if sparse.is_dir() else 0
    with _WS_LOCK:
        hit = _WS_CACHE.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    ws = _Workspace(path)
    with _WS_LOCK:
        while len(_WS_CACHE) >= 4:
            _WS_CACHE.pop(next(iter(_WS_CACHE)))
        _WS_CACHE[key] = (stamp, ws)
    return ws


def _scaled_K(K: np.ndarray, sx: float, sy: float) -> np.ndarray:
    return np.diag([sx, sy, 1.0]) @ K


def _cv_homography(H: np.ndarray) -> np.ndarray:
    """COLMAP-convention homography (pixel centres at +0.5) -> OpenCV index convention."""
    return np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]]) @ H @ np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])


def _border_rays(K: np.ndarray, width: int, height: int, n: int = 33) -> np.ndarray:
    """Camera rays (z = 1) through ``n`` points along each image edge."""
    s = np.linspace(0.0, 1.0, n)
    pts = np.concatenate([
        np.stack([s * width, np.zeros(n)], 1), np.stack([s * width, np.full(n, height)], 1),
        np.stack([np.zeros(n), s * height], 1), np.stack([np.full(n, width), s * height], 1)])
    return np.c_[pts, np.ones(len(pts))] @ np.linalg.inv(K).T


def _rect_extent(rays_rect: np.ndarray, f: float, cap: float) -> tuple[float, float, float, float] | None:
    """(x0, x1, y0, y1) of rectified-plane coordinates (principal point at 0) of the border rays,
    clipped to [-cap, cap]; None when the view looks away from the rectified axis."""
    z = rays_rect[:, 2]
    ok = z > 0.05 * np.linalg.norm(rays_rect, axis=1)
    if ok.mean() < 0.5:
        return None
    x = f * rays_rect[ok, 0] / z[ok]
    y = f * rays_rect[ok, 1] / z[ok]
    if not ok.all():  # part of the border turns away: the view extends without bound there
        return (-cap, cap, -cap, cap)
    return (float(np.clip(x.min(), -cap, cap)), float(np.clip(x.max(), -cap, cap)),
            float(np.clip(y.min(), -cap, cap)), float(np.clip(y.max(), -cap, cap)))


def _sgbm(cfg: DenseConfig, min_disp: int, num_disp: int) -> Any:
    bs = int(cfg.sgbm_block_size) | 1
    mode = {"sgbm": cv2.StereoSGBM_MODE_SGBM, "3way": cv2.StereoSGBM_MODE_SGBM_3WAY,
            "hh": cv2.StereoSGBM_MODE_HH}[cfg.sgbm_mode.lower()]
    return cv2.StereoSGBM_create(minDisparity=int(min_disp), numDisparities=int(num_disp), blockSize=bs,
                                 P1=8 * 3 * bs * bs, P2=32 * 3 * bs * bs, disp12MaxDiff=-1, preFilterCap=31,
                                 uniquenessRatio=int(cfg.sgbm_uniqueness),
                                 speckleWindowSize=int(cfg.sgbm_speckle_window),
                                 speckleRange=int(cfg.sgbm_speckle_range), mode=mode)


def _texture_mask(img: np.ndarray, min_std: float) -> np.ndarray:
    g = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float32)
    m = cv2.blur(g, (5, 5))
    v = cv2.blur(g * g, (5, 5)) - m * m
    return v > min_std * min_std


def _pair_depth(ws: _Workspace, ref: _Cam, src: _Cam, cfg: DenseConfig, prior_xyz: np.ndarray | None,
                info: dict) -> np.ndarray | None:
    """Depth of the reference (full resolution, z in the reference camera, NaN = none) from one
    rectified stereo pair with ``src``; None when the pair cannot be rectified usefully."""
    info["method"] = "rectified"
    size = cfg.cpu_size()
    img_r, s_r = ws.image(ref.name, size)
    img_s, s_s = ws.image(src.name, size)
    Kr = _scaled_K(ref.K, img_r.shape[1] / ref.width, img_r.shape[0] / ref.height)
    Ks = _scaled_K(src.K, img_s.shape[1] / src.width, img_s.shape[0] / src.height)

    base = src.centre - ref.centre
    b = float(np.linalg.norm(base))
    if b < 1e-9:
        return None
    ex = base / b
    if min(_angle(ex, ref.axis), _angle(-ex, ref.axis)) < cfg.min_baseline_angle:
        info["reason"] = "epipole inside the reference view"
        return None
    z0 = ref.axis + src.axis
    z0 = z0 - (z0 @ ex) * ex
    if np.linalg.norm(z0) < 1e-6:
        return None
    ez = z0 / np.linalg.norm(z0)
    ey = np.cross(ez, ex)
    R_rect = np.stack([ex, ey, ez])  # world -> rectified (both views)
    R_rl = R_rect @ ref.R.T  # reference camera -> rectified
    R_rs = R_rect @ src.R.T
    f = float(np.sqrt(Kr[0, 0] * Kr[1, 1]))

    # --- disparity range at the working scale: d_true = f b / Z_rect (Z_rect: rectified depth)
    zz = np.zeros(0)
    if prior_xyz is not None and len(prior_xyz):
        zz = ((prior_xyz - ref.centre) @ R_rect.T)[:, 2]
        zz = zz[zz > 0]
    if cfg.depth_min:
        d_hi = f * b / cfg.depth_min
    elif zz.size >= 5:
        d_hi = f * b / (float(np.percentile(zz, 2)) / cfg.prior_near_pad)
    else:
        d_hi = cfg.fallback_disparity_fraction * img_r.shape[1]
    if cfg.depth_max:
        d_lo = f * b / cfg.depth_max
    elif cfg.prior_far_pad and zz.size >= 5:
        d_lo = f * b / (float(np.percentile(zz, 98)) * cfg.prior_far_pad)
    else:
        d_lo = 0.0  # up to infinity (distant terrain, horizon)
    d_lo, d_hi = max(0.0, d_lo - 2.0), d_hi + 2.0
    max_nd = max(16, int(cfg.max_disparities) // 16 * 16)
    # a range wider than max_nd: match this pair at a coarser scale (down to min_pair_scale)
    s_pair = float(np.clip(max_nd / max(d_hi - d_lo, 1e-6), cfg.min_pair_scale, 1.0))
    if s_pair < 0.999:
        img_r = cv2.resize(img_r, (max(16, round(img_r.shape[1] * s_pair)), max(16, round(img_r.shape[0] * s_pair))),
                           interpolation=cv2.INTER_AREA)
        img_s = cv2.resize(img_s, (max(16, round(img_s.shape[1] * s_pair)), max(16, round(img_s.shape[0] * s_pair))),
                           interpolation=cv2.INTER_AREA)
        Kr = _scaled_K(ref.K, img_r.shape[1] / ref.width, img_r.shape[0] / ref.height)
        Ks = _scaled_K(src.K, img_s.shape[1] / src.width, img_s.shape[0] / src.height)
        s_eff = float(np.sqrt(Kr[0, 0] * Kr[1, 1])) / f
        f, d_lo, d_hi = f * s_eff, d_lo * s_eff, d_hi * s_eff
    if d_hi - d_lo > max_nd:  # still too wide: keep the window around the median prior disparity
        mid = f * b / float(np.median(zz)) if zz.size else 0.5 * (d_lo + d_hi)
        d_lo = max(0.0, mid - max_nd / 2)
        d_hi = d_lo + max_nd
    num_disp = int(min(max_nd, max(16, math.ceil((d_hi - d_lo) / 16.0) * 16)))
    info["pair_scale"] = round(s_pair, 3)

    cap = cfg.max_rect_factor * max(img_r.shape[:2])
    ext_l = _rect_extent(_border_rays(Kr, img_r.shape[1], img_r.shape[0]) @ R_rl.T, f, cap)
    ext_r = _rect_extent(_border_rays(Ks, img_s.shape[1], img_s.shape[0]) @ R_rs.T, f, cap)
    if ext_l is None or ext_r is None:
        info["reason"] = "views turn away from the rectified axis"
        return None
    y0, y1 = max(ext_l[2], ext_r[2]), min(ext_l[3], ext_r[3])
    if y1 - y0 < 16:
        info["reason"] = "no common rows"
        return None
    xl0, xl1 = ext_l[0], ext_l[1]
    # d_obs = x_l - x_r = d_true + (cx_l - cx_r); choose cx_r so that d_obs starts at 0
    pad = num_disp
    cx_l = pad - xl0
    cx_r = cx_l + d_lo
    cy = -y0
    width = int(math.ceil(pad + (xl1 - xl0) + num_disp))
    height = int(math.ceil(y1 - y0))
    K_l = np.array([[f, 0, cx_l], [0, f, cy], [0, 0, 1.0]])
    K_r = np.array([[f, 0, cx_r], [0, f, cy], [0, 0, 1.0]])
    H_l = K_l @ R_rl @ np.linalg.inv(Kr)
    H_r = K_r @ R_rs @ np.linalg.inv(Ks)
    rect_l = cv2.warpPerspective(img_r, _cv_homography(H_l), (width, height), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT)
    rect_r = cv2.warpPerspective(img_s, _cv_homography(H_r), (width, height), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT)
    ones_l = np.full(img_r.shape[:2], 255, np.uint8)
    ones_r = np.full(img_s.shape[:2], 255, np.uint8)
    mask_l = cv2.warpPerspective(ones_l, _cv_homography(H_l), (width, height), flags=cv2.INTER_NEAREST) > 0
    mask_r = cv2.warpPerspective(ones_r, _cv_homography(H_r), (width, height), flags=cv2.INTER_NEAREST) > 0
    mask_l = cv2.erode(mask_l.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    mask_r = cv2.erode(mask_r.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0

    sgbm = _sgbm(cfg, 0, num_disp)
    disp_l = sgbm.compute(rect_l, rect_r).astype(np.float32) / 16.0
    disp_r = sgbm.compute(rect_r[:, ::-1].copy(), rect_l[:, ::-1].copy()).astype(np.float32)[:, ::-1] / 16.0
    valid = (disp_l >= 0) & mask_l
    info["sgbm_valid"] = round(float(valid.sum() / max(1, mask_l.sum())), 3)
    if cfg.min_texture > 0:
        valid &= _texture_mask(rect_l, cfg.min_texture)
    # left-right check: the right view's disparity at x - d must agree
    xs = np.arange(width, dtype=np.float32)[None, :] - disp_l
    xi = np.rint(xs).astype(np.int64)
    inside = (xi >= 0) & (xi < width)
    xi = np.clip(xi, 0, width - 1)
    rows = np.arange(height)[:, None]
    d_back = disp_r[rows, xi]
    valid &= inside & mask_r[rows, xi] & (d_back >= 0) & (np.abs(d_back - disp_l) <= cfg.lr_max_diff)
    d_true = disp_l - (cx_l - cx_r)  # f b / Z_rect
    valid &= d_true > 0.25
    disp = np.where(valid, d_true, 0.0).astype(np.float32)
    info["num_disparities"] = num_disp
    info["rect_size"] = (width, height)
    info["rect_valid"] = round(float(valid.sum() / max(1, mask_l.sum())), 3)

    # --- back onto the full-resolution reference grid
    H_full = K_l @ R_rl @ np.linalg.inv(ref.K)
    uu, vv = np.meshgrid(np.arange(ref.width) + 0.5, np.arange(ref.height) + 0.5)
    pix = np.stack([uu, vv, np.ones_like(uu)], -1)
    q = pix @ H_full.T
    mx = (q[..., 0] / q[..., 2] - 0.5).astype(np.float32)
    my = (q[..., 1] / q[..., 2] - 0.5).astype(np.float32)
    d_near = cv2.remap(disp, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    d_lin = cv2.remap(disp, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    w_lin = cv2.remap(valid.astype(np.float32), mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                      borderValue=0)
    use_lin = (w_lin > 0.999) & (np.abs(d_lin - d_near) < 1.0)
    d = np.where(use_lin, d_lin, d_near)
    ray_z = (pix @ np.linalg.inv(ref.K).T @ R_rl.T)[..., 2]  # rectified z of the reference ray with z_ref = 1
    with np.errstate(divide="ignore", invalid="ignore"):
        z_rect = f * b / d
        depth = z_rect / ray_z
    ok = (d > 0) & (ray_z > 0) & np.isfinite(depth) & (depth > 0) & (q[..., 2] > 0)
    return np.where(ok, depth, np.nan).astype(np.float32)


def _to_full_grid(est: np.ndarray, ref: _Cam) -> np.ndarray:
    """Nearest-neighbour map of a working-scale reference map onto the full-resolution grid."""
    h, w = est.shape
    if (h, w) == (ref.height, ref.width):
        return est
    mx = ((np.arange(ref.width) + 0.5) * (w / ref.width) - 0.5).astype(np.float32)
    my = ((np.arange(ref.height) + 0.5) * (h / ref.height) - 0.5).astype(np.float32)
    mx, my = np.meshgrid(mx, my)
    return cv2.remap(est, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)


def _up_vector(rec: pycolmap.Reconstruction) -> np.ndarray:
    """World up direction: the mean of the cameras' up axes (-y; photos and video are taken
    upright), which for a metric ENU model is close to +z."""
    ups = [-_cam(rec, j).R[1] for j in _posed_ids(rec)]
    u = np.sum(ups, axis=0)
    n = float(np.linalg.norm(u))
    return u / n if n > 1e-9 else np.array([0.0, 0.0, 1.0])


def _sweep_family(gr: np.ndarray, gs: np.ndarray, A: np.ndarray, B: np.ndarray, pix: np.ndarray,
                  w_lo: float, w_hi: float, cfg: DenseConfig) -> dict | None:
    """One plane family ``H(w) = A + w B`` (reference pixel -> source pixel), ``w`` from ``w_lo`` to
    ``w_hi``: per pixel the best zero-mean NCC, the margin to the best clearly different plane, the
    refined ``w`` and the relative precision of the resulting depth."""
    h, w = gr.shape

    def project(wv):
        q = pix @ A.T + np.asarray(wv)[..., None] * (pix @ B.T)
        with np.errstate(divide="ignore", invalid="ignore"):
            return q[..., 0] / q[..., 2], q[..., 1] / q[..., 2], q[..., 2]

    xn, yn, dn = project(w_hi)
    xf, yf, df = project(w_lo)
    span = np.hypot(xn - xf, yn - yf)
    span = span[(dn > 0) & (df > 0) & np.isfinite(span)]
    if span.size < 0.01 * h * w:
        return None
    n_planes = int(np.clip(math.ceil(float(np.percentile(span, 95)) / cfg.sweep_step_px) + 1, 16,
                           cfg.sweep_max_planes))
    win = (int(cfg.sweep_window) | 1,) * 2
    kernel = np.ones(win, np.uint8)
    mr = cv2.boxFilter(gr, -1, win, borderType=cv2.BORDER_REFLECT)
    vr = cv2.boxFilter(gr * gr, -1, win, borderType=cv2.BORDER_REFLECT) - mr * mr
    best = np.full((h, w), -np.inf, np.float32)
    second = np.full((h, w), -1.0, np.float32)
    best_k = np.full((h, w), -10, np.int32)
    prev = np.full((h, w), np.nan, np.float32)
    nxt = np.full((h, w), np.nan, np.float32)
    last = np.full((h, w), np.nan, np.float32)
    ones_s = np.full(gs.shape, 255, np.uint8)
    gap = max(2, n_planes // 32)
    row3 = (pix @ A.T)[..., 2], (pix @ B.T)[..., 2]
    min_var = cfg.sweep_min_std ** 2
    for k, wk in enumerate(np.linspace(w_lo, w_hi, n_planes)):
        Hcv = _cv_homography(A + wk * B)
        warped = cv2.warpPerspective(gs, Hcv, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        inside = cv2.warpPerspective(ones_s, Hcv, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        ms = cv2.boxFilter(warped, -1, win, borderType=cv2.BORDER_REFLECT)
        vs = cv2.boxFilter(warped * warped, -1, win, borderType=cv2.BORDER_REFLECT) - ms * ms
        cov = cv2.boxFilter(gr * warped, -1, win, borderType=cv2.BORDER_REFLECT) - mr * ms
        with np.errstate(invalid="ignore", divide="ignore"):
            ncc = cov / np.sqrt(np.maximum(vr * vs, 1e-3))
        ncc[((row3[0] + wk * row3[1]) <= 0) | (cv2.erode(inside, kernel) == 0) | ~(vs > min_var)] = np.nan
        just = best_k == k - 1
        nxt[just] = ncc[just]
        upd = ncc > best
        far_old = upd & (best_k < k - gap)  # the old best becomes the best clearly different plane
        second[far_old] = np.maximum(second[far_old], best[far_old])
        stay = ~upd & (best_k < k - gap) & (ncc > second)
        second[stay] = ncc[stay]
        prev[upd] = last[upd]
        nxt[upd] = np.nan
        best[upd] = ncc[upd]
        best_k[upd] = k
        last = ncc
    with np.errstate(invalid="ignore", divide="ignore"):
        den = 2.0 * (2.0 * best - prev - nxt)
        delta = np.where(np.isfinite(den) & (den > 1e-6), (nxt - prev) / den, 0.0)
    delta = np.clip(delta, -0.5, 0.5)
    wsol = w_lo + (w_hi - w_lo) * (best_k + delta) / max(1, n_planes - 1)
    x0, y0, d0 = project(wsol)
    dw = 1e-3 * (w_hi - w_lo)
    x1, y1, _ = project(wsol + dw)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel_err = cfg.sweep_sigma_px / (np.hypot(x1 - x0, y1 - y0) / dw * np.abs(wsol))
    ok = ((best >= cfg.sweep_min_ncc) & (best - second >= cfg.sweep_min_margin) & (best_k > 0)
          & (best_k < n_planes - 1) & (vr > min_var) & (d0 > 0) & np.isfinite(rel_err)
          & (rel_err <= cfg.sweep_max_rel_error))
    return {"best": np.where(ok, best, -np.inf), "w": wsol, "ok": ok, "planes": n_planes}


def _pair_depth_sweep(ws: _Workspace, ref: _Cam, src: _Cam, cfg: DenseConfig, prior_xyz: np.ndarray | None,
                      info: dict) -> np.ndarray | None:
    """Depth of the reference from one source by multi-direction plane sweeping (as for urban
    street-level video): fronto-parallel planes of the reference and horizontal (ground) planes,
    each family uniform in inverse distance; zero-mean NCC over a square window; per pixel the best
    plane over both families, with parabolic refinement within its family. Used for pairs that
    cannot be rectified usefully (forward motion: the epipole lies in the image). Pixels that are
    untextured, ambiguous (a clearly different plane scores almost as well), poorly conditioned
    (too little parallax for ``sweep_max_rel_error``) or with a low NCC are NaN."""
    info["method"] = "sweep"
    size = min(cfg.cpu_size(), int(cfg.sweep_max_size))
    img_r, _ = ws.image(ref.name, size)
    img_s, _ = ws.image(src.name, size)
    h, w = img_r.shape[:2]
    Kr = _scaled_K(ref.K, w / ref.width, h / ref.height)
    Ks = _scaled_K(src.K, img_s.shape[1] / src.width, img_s.shape[0] / src.height)
    gr = cv2.cvtColor(img_r, cv2.COLOR_BGR2GRAY).astype(np.float32)
    gs = cv2.cvtColor(img_s, cv2.COLOR_BGR2GRAY).astype(np.float32)
    R_sr = src.R @ ref.R.T
    t_sr = src.t - R_sr @ ref.t
    b = float(np.linalg.norm(t_sr))
    if b < 1e-9:
        return None
    Kr_inv = np.linalg.inv(Kr)
    A = Ks @ R_sr @ Kr_inv
    uu, vv = np.meshgrid(np.arange(w, dtype=np.float64) + 0.5, np.arange(h, dtype=np.float64) + 0.5)
    pix = np.stack([uu, vv, np.ones_like(uu)], -1)
    rays = pix @ Kr_inv.T  # z = 1
    xr = None if prior_xyz is None or not len(prior_xyz) else prior_xyz @ ref.R.T + ref.t  # reference frame
    ahead = float(-(R_sr.T @ t_sr)[2])  # how far the source sits in front of the reference

    families = []
    # fronto-parallel planes z = 1 / w
    zz = np.zeros(0) if xr is None else xr[:, 2][xr[:, 2] > 0]
    if cfg.depth_min:
        z_near = float(cfg.depth_min)
    elif zz.size >= 5:
        z_near = float(np.percentile(zz, 2)) / cfg.prior_near_pad
    else:  # nearer points would be seen under more than the largest triangulation angle
        z_near = b / math.tan(math.radians(max(cfg.max_triangulation_angle, 1.0)))
    z_near = max(z_near, 1.25 * ahead)  # nearer planes lie behind the source
    if cfg.depth_max:
        w_far = 1.0 / float(cfg.depth_max)
    elif cfg.prior_far_pad and zz.size >= 5:
        w_far = 1.0 / (float(np.percentile(zz, 98)) * cfg.prior_far_pad)
    else:
        w_far = 0.0  # the plane at infinity
    if 1.0 / z_near > w_far:
        families.append(("fronto", np.array([0.0, 0.0, 1.0]), w_far, 1.0 / z_near))
    # ground planes n . X = d below the camera (n: world down in the reference frame)
    if cfg.sweep_ground and xr is not None:
        n_down = ref.R @ (-ws.up)
        dd = xr @ n_down
        dd = dd[dd > 0]
        if dd.size >= 5:
            d_lo = float(np.percentile(dd, 2)) / cfg.prior_near_pad
            d_hi = float(np.percentile(dd, 98)) * cfg.prior_near_pad
            families.append(("ground", n_down, 1.0 / d_hi, 1.0 / d_lo))
    if not families:
        info["reason"] = "no depth range"
        return None

    best = np.full((h, w), -np.inf, np.float32)
    depth = np.full((h, w), np.nan, np.float32)
    if cfg.sweep_min_center_std > 0:  # against foreground fattening onto untextured background (sky)
        m3 = cv2.blur(gr, (3, 3))
        flat = (cv2.blur(gr * gr, (3, 3)) - m3 * m3) < cfg.sweep_min_center_std ** 2
        best[flat] = np.inf  # nothing can win there
    planes = {}
    for name, n_ref, w_lo, w_hi in families:
        B = Ks @ np.outer(t_sr, n_ref) @ Kr_inv
        fam = _sweep_family(gr, gs, A, B, pix, w_lo, w_hi, cfg)
        if fam is None:
            continue
        planes[name] = fam["planes"]
        with np.errstate(invalid="ignore", divide="ignore"):
            z = 1.0 / (fam["w"] * (rays @ n_ref))
        take = fam["ok"] & (fam["best"] > best) & np.isfinite(z) & (z > 0)
        best[take] = fam["best"][take]
        depth[take] = z[take]
    if not planes:
        info["reason"] = "the source does not see the reference's scene"
        return None
    info["num_planes"] = planes
    info["rect_valid"] = round(float(np.isfinite(depth).mean()), 3)
    return _to_full_grid(depth, ref)


def fuse_depths(estimates: np.ndarray, rel_tolerance: float, min_consistent: int) -> tuple[np.ndarray, np.ndarray]:
    """Fuse per-source depth maps ``(n, H, W)`` (NaN or 0 = none): per pixel, the estimate with
    the most others within ``rel_tolerance`` (relative) defines the agreeing set, the result is
    the set's median where it has at least ``min_consistent`` members, else 0.
    Returns (depth HxW float32, number of agreeing estimates HxW)."""
    e = np.asarray(estimates, np.float32)
    if e.ndim != 3 or e.shape[0] == 0:
        raise ValueError("estimates must be (n, H, W) with n >= 1")
    e = np.where(np.isfinite(e) & (e > 0), e, np.nan)
    n = e.shape[0]
    counts = np.zeros(e.shape, np.int16)
    for i in range(n):
        for j in range(n):
            with np.errstate(invalid="ignore"):
                counts[i] += np.abs(e[i] - e[j]) <= rel_tolerance * e[i]
    best = np.argmax(counts, axis=0)
    ref_val = np.take_along_axis(e, best[None], 0)[0]
    with np.errstate(invalid="ignore"):
        member = np.abs(e - ref_val[None]) <= rel_tolerance * ref_val[None]
    n_agree = member.sum(0)
    srt = np.sort(np.where(member, e, np.nan), axis=0)  # NaN sort last
    lo = np.clip((n_agree - 1) // 2, 0, n - 1)[None]
    hi = np.clip(n_agree // 2, 0, n - 1)[None]
    med = 0.5 * (np.take_along_axis(srt, lo, 0)[0] + np.take_along_axis(srt, hi, 0)[0])
    keep = (n_agree >= max(1, min_consistent)) & np.isfinite(med)
    return np.where(keep, med, 0.0).astype(np.float32), np.where(keep, n_agree, 0).astype(np.int16)


def depth_cpu(workspace: Path, image_name: str, config: DenseConfig | None = None,
              info: dict | None = None) -> np.ndarray:
    """CPU multi-view depth of one workspace image: float32 HxW (full image size), metres along the
    camera z axis, 0 = unknown. ``info`` (optional dict) receives the sources used and per-pair
    diagnostics. Raises FileNotFoundError / DenseError when the reference image cannot be read."""
    cfg = config or DenseConfig()
    ws = _workspace(Path(workspace))
    if image_name not in ws.by_name:
        raise DenseError(f"{image_name}: not in the workspace model {ws.path / 'sparse'}")
    info = {} if info is None else info
    rec = ws.rec
    ref = _cam(rec, ws.by_name[image_name])
    ws.image(image_name, cfg.cpu_size())  # raises for a missing / corrupt reference
    unusable = {iid for iid in _posed_ids(rec) if not (ws.path / "images" / rec.images[iid].name).is_file()}
    cands = select_sources(rec, ref.image_id, max(1, cfg.num_sources) * max(1, cfg.candidate_factor),
                           cfg.min_triangulation_angle, cfg.max_triangulation_angle, cfg.max_view_angle,
                           cfg.max_scale_ratio, exclude=unusable)
    prior = _prior_points(rec, ref)
    estimates, pairs = [], []
    for j in cands:
        if len(estimates) >= cfg.num_sources:
            break
        src = _cam(rec, j)
        pinfo: dict = {"source": src.name}
        try:
            est = _pair_depth(ws, ref, src, cfg, prior, pinfo)
            if est is None and cfg.sweep_fallback:
                pinfo["rectify"] = pinfo.pop("reason", "not rectifiable")
                est = _pair_depth_sweep(ws, ref, src, cfg, prior, pinfo)
        except (FileNotFoundError, DenseError, cv2.error) as exc:  # a bad source only loses that pair
            pinfo["reason"] = str(exc)
            est = None
        pairs.append(pinfo)
        if est is not None:
            pinfo["valid"] = float(np.isfinite(est).mean())
            estimates.append(est)
    info["sources"] = [p["source"] for p in pairs if "valid" in p]
    info["pairs"] = pairs
    if not estimates:
        info["note"] = "no usable source view"
        return np.zeros((ref.height, ref.width), np.float32)
    depth, _ = fuse_depths(np.stack(estimates), cfg.rel_tolerance, cfg.min_consistent)
    return depth


def _prior_points(rec: pycolmap.Reconstruction, c: _Cam, min_points: int = 10) -> np.ndarray | None:
    """World points seen by ``c`` (its observations, else model points projecting into it)."""
    im = rec.images[c.image_id]
    ids = [p.point3D_id for p in im.points2D if p.has_point3D()]
    if len(ids) >= min_points:
        return np.array([rec.points3D[i].xyz for i in ids], float)
    if not rec.points3D:
        return None
    xyz = _all_points(rec)
    uv, z = _project(c, xyz)
    ok = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < c.width) & (uv[:, 1] >= 0) & (uv[:, 1] < c.height)
    return xyz[ok] if ok.sum() >= 5 else None


def _existing_depth(path: Path, shape: tuple[int, int] | None) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        d = read_depth_h5(path)
    except Exception:  # noqa: BLE001 - unreadable: recompute
        return None
    if shape is not None and d.shape != shape:
        return None
    return d


def run_dense(workspace: Path, image_names: list[str] | None, config: DenseConfig | None,
              depth_dir: Path) -> dict:
    """CPU backend over images of a workspace (all model images by default, sorted by name).

    Writes ``depth_dir/<stem>.h5`` per image; an image whose file already exists and loads with the
    right size is skipped (resumable). Returns ``{"stats": {name: {"valid_fraction", "seconds",
    "sources", "skipped"}}, "failures": {name: reason}}``; one bad image never stops the others."""
    cfg = config or DenseConfig()
    workspace, depth_dir = Path(workspace), Path(depth_dir)
    ws = _workspace(workspace)
    names = sorted(ws.by_name) if image_names is None else list(image_names)
    stats: dict[str, dict] = {}
    failures: dict[str, str] = {}
    for name in names:
        t0 = time.perf_counter()
        out = depth_path(depth_dir, name)
        shape = None
        if name in ws.by_name:
            c = _cam(ws.rec, ws.by_name[name])
            shape = (c.height, c.width)
        old = _existing_depth(out, shape)
        if old is not None:
            stats[name] = {"valid_fraction": float((old > 0).mean()), "seconds": time.perf_counter() - t0,
                           "sources": [], "skipped": True}
            continue
        info: dict = {}
        try:
            depth = depth_cpu(workspace, name, cfg, info=info)
            write_depth_h5(out, depth)
        except Exception as exc:  # noqa: BLE001 - one image never sinks the others
            failures[name] = f"{type(exc).__name__}: {exc}"
            log.warning("dense cpu: %s failed: %s", name, failures[name])
            continue
        stats[name] = {"valid_fraction": float((depth > 0).mean()), "seconds": time.perf_counter() - t0,
                       "sources": info.get("sources", []), "skipped": False}
        if "note" in info:
            stats[name]["note"] = info["note"]
    return {"stats": stats, "failures": failures}


def fused_point_cloud_cpu(workspace: Path, depth_dir: Path, output: Path | None = None,
                          image_names: list[str] | None = None, stride: int = 2) -> Path:
    """Back-project the depth maps of ``depth_dir`` (every ``stride``-th pixel) into the model frame
    and write ``fused.ply`` (default ``workspace/fused.ply``), coloured from the images."""
    ws = _workspace(Path(workspace))
    output = Path(output) if output is not None else Path(workspace) / "fused.ply"
    names = sorted(ws.by_name) if image_names is None else list(image_names)
    xyz_all, rgb_all = [], []
    for name in names:
        p = depth_path(Path(depth_dir), name)
        if name not in ws.by_name or not p.is_file():
            continue
        c = _cam(ws.rec, ws.by_name[name])
        d = read_depth_h5(p)[::stride, ::stride]
        vv, uu = np.nonzero(d > 0)
        if vv.size == 0:
            continue
        z = d[vv, uu].astype(float)
        u = uu * stride + 0.5
        v = vv * stride + 0.5
        rays = np.stack([u, v, np.ones_like(u)], 1) @ np.linalg.inv(c.K).T
        xyz = (rays * z[:, None] - c.t) @ c.R  # R^T (x_cam - t)
        img = cv2.imread(str(Path(workspace) / "images" / name), cv2.IMREAD_COLOR)
        if img is not None and img.shape[:2] == (c.height, c.width):
            rgb = img[vv * stride, uu * stride][:, ::-1]
        else:
            rgb = np.full((len(z), 3), 200, np.uint8)
        xyz_all.append(xyz.astype(np.float32))
        rgb_all.append(rgb.astype(np.uint8))
    xyz = np.concatenate(xyz_all) if xyz_all else np.zeros((0, 3), np.float32)
    rgb = np.concatenate(rgb_all) if rgb_all else np.zeros((0, 3), np.uint8)
    return write_ply_points(output, xyz, rgb)


# ----------------------------------------------------------------------------- GPU backend


def write_stereo_config(workspace: Path, config: DenseConfig | None = None,
                        image_names: list[str] | None = None) -> dict[str, list[str]]:
    """COLMAP's undistorted layout for PatchMatch: ``stereo/{depth_maps,normal_maps,
    consistency_graphs}/``, ``stereo/patch-match.cfg`` (per image: its name, then its sources)
    and ``stereo/fusion.cfg`` (image names). Sources are explicit names from
    :func:`select_sources` (COLMAP's ``__auto__`` needs shared sparse points, which a pose-only
    model lacks). Images without a file or without any source are left out. Returns
    ``{reference name: [source names]}``."""
    cfg = config or DenseConfig()
    workspace = Path(workspace)
    ws = _workspace(workspace)
    rec = ws.rec
    posed = _posed_ids(rec)
    present = {iid for iid in posed if (workspace / "images" / rec.images[iid].name).is_file()}
    absent = set(posed) - present
    names = sorted(ws.by_name) if image_names is None else list(image_names)
    problems: dict[str, list[str]] = {}
    for name in names:
        iid = ws.by_name.get(name)
        if iid is None or iid not in present:
            continue
        src = select_sources(rec, iid, cfg.num_sources, cfg.min_triangulation_angle, cfg.max_triangulation_angle,
                             cfg.max_view_angle, cfg.max_scale_ratio, exclude=absent)
        if src:
            problems[name] = [rec.images[j].name for j in src]
    stereo = workspace / "stereo"
    for sub in ("depth_maps", "normal_maps", "consistency_graphs"):
        (stereo / sub).mkdir(parents=True, exist_ok=True)
    for name in problems:  # image names may contain folders
        for sub in ("depth_maps", "normal_maps", "consistency_graphs"):
            (stereo / sub / name).parent.mkdir(parents=True, exist_ok=True)
    pm = "".join(f"{n}\n{', '.join(s)}\n" for n, s in problems.items())
    with atomic_path(stereo / "patch-match.cfg", suffix=".cfg") as tmp:
        tmp.write_text(pm)
    with atomic_path(stereo / "fusion.cfg", suffix=".cfg") as tmp:
        tmp.write_text("".join(f"{n}\n" for n in problems))
    return problems


def _global_depth_range(rec: pycolmap.Reconstruction, cfg: DenseConfig) -> tuple[float, float] | None:
    """Depth range for PatchMatch when some image has no observed sparse point (COLMAP would stop
    with "You must manually set the minimum and maximum depth"): the config's, else the range of
    every model point seen in front of any camera, padded."""
    if cfg.depth_min and cfg.depth_max:
        return float(cfg.depth_min), float(cfg.depth_max)
    lo, hi = math.inf, 0.0
    for iid in _posed_ids(rec):
        pr = _depth_prior(rec, _cam(rec, iid))
        if pr.size:
            a, b = np.percentile(pr, [1, 99])
            lo, hi = min(lo, a), max(hi, b)
    if hi <= 0:
        return None
    return float(lo / cfg.prior_near_pad), float(hi * (cfg.prior_far_pad or 10.0))


def export_colmap_depths(workspace: Path, depth_dir: Path, image_names: list[str] | None = None,
                         kind: str = "geometric") -> dict:
    """Convert ``stereo/depth_maps/<name>.<kind>.bin`` to ``depth_dir/<stem>.h5`` (resized to the
    image size with nearest-neighbour sampling when PatchMatch ran at a smaller ``max_image_size``).
    Returns ``{"stats": ..., "failures": ...}`` like :func:`run_dense`."""
    workspace, depth_dir = Path(workspace), Path(depth_dir)
    ws = _workspace(workspace)
    names = sorted(ws.by_name) if image_names is None else list(image_names)
    stats, failures = {}, {}
    for name in names:
        t0 = time.perf_counter()
        src = workspace / "stereo" / "depth_maps" / f"{name}.{kind}.bin"
        try:
            if name not in ws.by_name:
                raise DenseError(f"{name}: not in the workspace model")
            if not src.is_file():
                raise FileNotFoundError(f"{src}: no depth map (no source view, or PatchMatch failed)")
            d = read_colmap_array(src)
            if d.ndim != 2:
                raise DenseError(f"{src}: expected one channel, got {d.shape}")
            c = _cam(ws.rec, ws.by_name[name])
            if d.shape != (c.height, c.width):
                d = cv2.resize(d, (c.width, c.height), interpolation=cv2.INTER_NEAREST)
            d = np.where(np.isfinite(d) & (d > 0), d, 0).astype(np.float32)
            write_depth_h5(depth_path(depth_dir, name), d)
        except Exception as exc:  # noqa: BLE001
            failures[name] = f"{type(exc).__name__}: {exc}"
            continue
        stats[name] = {"valid_fraction": float((d > 0).mean()), "seconds": time.perf_counter() - t0,
                       "skipped": False}
    return {"stats": stats, "failures": failures}


def dense_gpu(workspace: Path, config: DenseConfig | None, depth_dir: Path,
              image_names: list[str] | None = None) -> dict:
    """GPU backend: COLMAP PatchMatch stereo (``max_image_size``, geometric consistency), stereo
    fusion to ``workspace/fused.ply``, then every ``<name>.geometric.bin`` to ``depth_dir/<stem>.h5``.
    Raises RuntimeError when pycolmap has no CUDA."""
    if not getattr(pycolmap, "has_cuda", False):
        raise RuntimeError(CUDA_MESSAGE)
    cfg = config or DenseConfig()
    workspace = Path(workspace)
    problems = write_stereo_config(workspace, cfg, image_names)
    if not problems:
        raise DenseError(f"{workspace}: no image has a source view; nothing for PatchMatch to do")
    rec = _workspace(workspace).rec
    opts = pycolmap.PatchMatchOptions()
    opts.max_image_size = int(cfg.max_image_size)
    opts.geom_consistency = bool(cfg.geom_consistency)
    opts.gpu_index = str(cfg.gpu_index)
    opts.min_triangulation_angle = float(min(1.0, cfg.min_triangulation_angle))
    for k, v in cfg.patch_match_extra.items():
        setattr(opts, k, v)
    needs_range = any(rec.images[rec_id].num_points3D == 0 for rec_id in rec.images
                      if rec.images[rec_id].name in problems)
    if needs_range or (cfg.depth_min and cfg.depth_max):
        rng = _global_depth_range(rec, cfg)
        if rng is None:
            raise DenseError("the model has images without sparse points and no depth range: set "
                             "DenseConfig.depth_min / depth_max")
        opts.depth_min, opts.depth_max = rng
    opts.allow_missing_files = True  # a source without maps (PatchMatch failed on it) is skipped, not fatal
    t0 = time.perf_counter()
    pycolmap.patch_match_stereo(str(workspace), options=opts)
    kind = "geometric" if cfg.geom_consistency else "photometric"
    maps = workspace / "stereo"
    done = [n for n in problems if (maps / "depth_maps" / f"{n}.{kind}.bin").is_file()
            and (maps / "normal_maps" / f"{n}.{kind}.bin").is_file()]
    with atomic_path(maps / "fusion.cfg", suffix=".cfg") as tmp:  # fusion reads every listed map
        tmp.write_text("".join(f"{n}\n" for n in done))
    fopts = pycolmap.StereoFusionOptions()
    fopts.max_image_size = int(cfg.max_image_size)
    fopts.min_num_pixels = int(min(cfg.fusion_min_num_pixels, len(problems) + 1))
    if done:
        pycolmap.stereo_fusion(str(workspace / "fused.ply"), str(workspace), input_type=kind, options=fopts,
                               output_type="ply")
    seconds = time.perf_counter() - t0
    out = export_colmap_depths(workspace, depth_dir, list(problems), kind=kind)
    per = seconds / max(1, len(problems))
    for s in out["stats"].values():
        s["seconds"] += per
    for name in (image_names or sorted(_workspace(workspace).by_name)):
        if name not in problems and name not in out["failures"]:
            out["failures"][name] = "no source view (or image missing): PatchMatch skipped it"
    return out


__all__ = [
    "DenseConfig", "DenseError", "CUDA_MESSAGE", "image_stem", "depth_path", "prepare_workspace", "select_sources",
    "depth_cpu", "fuse_depths", "run_dense", "fused_point_cloud_cpu", "write_depth_h5", "read_depth_h5",
    "read_colmap_array", "write_colmap_array", "write_ply_points", "read_ply_points", "write_stereo_config",
    "export_colmap_depths", "dense_gpu",
]
