"""The dense workspace (COLMAP's undistorted layout) and its per-task state."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import cv2
import numpy as np
import pycolmap

from tasks.aerial.dense.config import DenseError
from tasks.aerial.dense.views import _cam, _posed_ids, _up_vector
from tasks.common.atomic import atomic_dir, link_atomic

log = logging.getLogger(__name__)

#: Camera models whose zero-distortion special case is an ideal pinhole.
_PERSPECTIVE_MODELS = {"SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV", "FULL_OPENCV",
                       "SIMPLE_DIVISION", "DIVISION", "FOV"}
_ZERO_DISTORTION = 1e-6  # |k| below this counts as no distortion
_FOCAL_EQUAL_REL = 1e-4  # fx, fy within this relative difference become one focal length

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
    link_atomic(src, dst, kind="hardlink")


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

    with atomic_dir(workspace / "sparse") as tmp:
        rec.write(str(tmp))
    return workspace


class Workspace:
    """The model of one workspace and a small cache of its images at working size: the state of
    one dense task, made by the caller and passed explicitly (never cached globally)."""

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


def open_workspace(workspace: "Workspace | Path | str") -> Workspace:
    """``workspace`` itself when it is a :class:`Workspace`, else a new one for that folder."""
    return workspace if isinstance(workspace, Workspace) else Workspace(Path(workspace))
