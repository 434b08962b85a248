"""MegaDepth (v1) preprocessing: stage 2 of the aerial pipeline (README, "The aerial flow").

For every image of a scene list entry ``(scene, subscene, [names])`` this reads

* the sparse model ``<md>/MegaDepth_v1_SfM/<scene>/sparse/manhattan/<subscene>/`` (COLMAP
  text, SIMPLE_RADIAL cameras, world-to-camera poses),
* the dense image ``<md>/phoenix/S6/zl548/MegaDepth_v1/<scene>/dense<subscene>/imgs/<name>``,
* the depth ``.../dense<subscene>/depths/<stem>.h5`` (dataset ``depth``, 0 = unknown),

and writes ``<out>/<scene>/<subscene>/<name>.jpg`` (RGB JPEG, quality 95),
``<name>.exr`` (float32 depth, same size) and ``<name>.npz`` (``intrinsics`` 3x3,
``cam2world`` 4x4), as DUSt3R's ``datasets_preprocess/preprocess_megadepth.py`` does for
AerialMegaDepth.

Geometry (pixel convention: COLMAP's, i.e. pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``
and its centre is at ``(j + 0.5, i + 0.5)``; the image centre is ``(W/2, H/2)``):

1. The sparse model's cameras are the photos' own (SIMPLE_RADIAL: ``f, cx, cy, k`` at the
   original photo's size); the dense images are already undistorted, so their pinhole ``K`` is
   derived from that camera as DUSt3R's MegaDepth preprocessing does:
   ``cv2.getOptimalNewCameraMatrix(K, distortion, camera size, alpha=0, newImgSize=dense
   size, centerPrincipalPoint=True)`` (no blank pixels, principal point at the centre; OpenCV's
   pixel convention converted to COLMAP's around the call). A
   camera without distortion whose size is the dense image's keeps its ``K`` as it is (the
   crop below centres its principal point). ``cam2world`` is the inverse of the image's
   world-to-camera pose. Camera models OpenCV's distortion cannot express (fisheye) fail
   the image with a reason.
2. Symmetric crop around the principal point: half-sizes
   ``hw = floor(min(cx, W - cx))``, ``hh = floor(min(cy, H - cy))``, window origin
   ``x0 = round(cx - hw)``, ``y0 = round(cy - hh)``, size ``2hw x 2hh``. The new principal
   point is set to exactly the centre of the window (``hw, hh``); this moves it by at most
   half a source pixel when ``cx``/``cy`` are not whole or half-whole numbers (for MegaDepth
   they are ``W/2, H/2`` and nothing moves).
3. Downscale (never upscale) so that the result fits in 800x600 (landscape, ``w >= h``) or
   600x800 (portrait), keeping the aspect: ``s = min(1, 800/w, 600/h)`` (swapped for
   portrait), new size ``round(w s) x round(h s)``. The image is resized with
   ``cv2.INTER_AREA``; the depth by exact nearest-neighbour sampling of pixel centres
   (output pixel ``j`` takes source pixel ``floor((j + 0.5) w / w')``), so depth values are
   never blended. The intrinsics are scaled per axis by ``w'/w`` and ``h'/h`` (so ``fx`` and
   ``fy`` may differ by the rounding of the size), and ``cx = w'/2``, ``cy = h'/2`` exactly.

Every output file is written atomically (:mod:`tasks.common.atomic`), the npz last: an image is done when its npz loads and the jpg and exr exist.
Problems of one image (missing files, image absent from the sparse model, depth size
different from the image) give an :class:`ImageResult` with status ``"failed"`` and a reason
naming the file; nothing is raised for them.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")

import json
import math
import pickle
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, NamedTuple

import cv2
import numpy as np
import pycolmap
import yaml

try:  # numpy 2
    from numpy._core import multiarray as numpy_multiarray
except ImportError:  # numpy 1
    from numpy.core import multiarray as numpy_multiarray

from tasks.aerial import geometry
from tasks.common import checks
from tasks.aerial.dense.io import read_depth_h5
from tasks.common import trusted
from tasks.common.atomic import atomic_path, write_npz_atomic
from tasks.common.fingerprint import fingerprint

#: Output size limits (long side, short side).
MAX_LONG_SIDE = 800
MAX_SHORT_SIDE = 600
JPEG_QUALITY = 95

Status = Literal["done", "skipped", "failed"]


@dataclass(frozen=True)
class SceneEntry:
    """One entry of the scene list: a MegaDepth scene, its sub-model and image names."""

    scene: str
    subscene: str
    images: list[str] = field(default_factory=list)


class ModelEntry(NamedTuple):
    """What the sparse model says about one image (picklable)."""

    K: np.ndarray  # 3x3 float64, COLMAP pixel convention
    cam2world: np.ndarray  # 4x4 float64
    size: tuple[int, int]  # (W, H) of the camera
    #: OpenCV distortion coefficients (k1, k2, p1, p2[, k3, k4, k5, k6]) of the camera; () none;
    #: None: a camera model OpenCV cannot undistort (its name in ``model``)
    distortion: tuple[float, ...] | None = ()
    model: str = "SIMPLE_PINHOLE"


@dataclass
class ImageResult:
    """Outcome of preprocessing one image."""

    scene: str
    subscene: str
    name: str
    status: Status
    reason: str = ""
    size: tuple[int, int] | None = None  # (w, h) of the written image
    outputs: tuple[str, str, str] | None = None  # (jpg, exr, npz)


# --------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------


def sparse_model_dir(md_root: str | os.PathLike, scene: str, subscene: str) -> Path:
    """``<md>/MegaDepth_v1_SfM/<scene>/sparse/manhattan/<subscene>`` (ids checked: plain names)."""
    return checks.safe_join(Path(md_root) / "MegaDepth_v1_SfM", scene, "sparse", "manhattan", subscene,
                            what="scene/subscene id", where=f"scene {scene}/{subscene}")


def dense_dir(md_root: str | os.PathLike, scene: str, subscene: str) -> Path:
    """``<md>/phoenix/S6/zl548/MegaDepth_v1/<scene>/dense<subscene>`` (ids checked: plain names)."""
    return checks.safe_join(Path(md_root) / "phoenix" / "S6" / "zl548" / "MegaDepth_v1", scene, f"dense{subscene}",
                            what="scene/subscene id", where=f"scene {scene}/{subscene}")


def raw_image_path(md_root: str | os.PathLike, scene: str, subscene: str, name: str) -> Path:
    """Path of a raw dense MegaDepth image (``name`` from images.txt / the scene list: a plain name)."""
    return checks.safe_join(dense_dir(md_root, scene, subscene) / "imgs", name, what="image name",
                            where=f"scene {scene}/{subscene}")


def raw_depth_path(md_root: str | os.PathLike, scene: str, subscene: str, name: str) -> Path:
    """Path of a raw MegaDepth depth map (``depths/<stem>.h5``)."""
    checks.plain_name(name, "image name", where=f"scene {scene}/{subscene}")
    return checks.safe_join(dense_dir(md_root, scene, subscene) / "depths", Path(name).stem + ".h5",
                            what="image name", where=f"scene {scene}/{subscene}")


def output_paths(out_dir: str | os.PathLike, scene: str, subscene: str, name: str) -> tuple[Path, Path, Path]:
    """``(<name>.jpg, <name>.exr, <name>.npz)`` under ``<out>/<scene>/<subscene>/`` (every id and
    name a plain name, so nothing is written outside ``out_dir``)."""
    where = f"scene {scene}/{subscene}"
    folder = checks.safe_join(out_dir, scene, subscene, what="scene/subscene id", where=where)
    checks.plain_name(name, "image name", where=where)  # named as the input names it
    return tuple(checks.safe_join(folder, f"{name}{ext}", what="image name", where=where)  # type: ignore[return-value]
                 for ext in (".jpg", ".exr", ".npz"))


# --------------------------------------------------------------------------------------
# Scene list
# --------------------------------------------------------------------------------------


def _norm_scene(value: Any) -> str:
    """MegaDepth scene ids are 4-digit folder names; integers get zero-padded."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):04d}"
    text = str(value).strip()
    if not text:
        raise ValueError("empty scene id")
    return checks.plain_name(text, "scene id")


def _norm_subscene(value: Any) -> str:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    text = str(value).strip()
    if not text:
        raise ValueError("empty subscene id")
    return checks.plain_name(text, "subscene id")


def _norm_images(value: Any) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"expected a list of image names, got {type(value).__name__}")
    names = []
    for item in value:
        if isinstance(item, bytes):
            item = item.decode()
        if not isinstance(item, (str, np.str_)) or not str(item).strip():
            raise ValueError(f"bad image name {item!r}")
        names.append(checks.plain_name(str(item), "image name"))
    return names


def _entries_from_mapping(data: Any, path: Path) -> list[SceneEntry]:
    entries = []
    for scene, subs in data.items():
        if not isinstance(subs, dict):
            raise ValueError(f"{path}: scene {scene!r}: expected a mapping subscene -> image list")
        for sub, images in subs.items():
            where = f"{path}: entry {scene!r}/{sub!r}"
            try:
                entries.append(SceneEntry(_norm_scene(scene), _norm_subscene(sub), _norm_images(images)))
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from exc
    return entries


def _entries_from_list(data: list, path: Path) -> list[SceneEntry]:
    entries = []
    for i, item in enumerate(data):
        where = f"{path}: entry #{i}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object with scene, subscene, images")
        missing = [k for k in ("scene", "subscene", "images") if k not in item]
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
        try:
            entries.append(
                SceneEntry(_norm_scene(item["scene"]), _norm_subscene(item["subscene"]),
                           _norm_images(item["images"]))
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
    return entries


_ID_TYPES = (str, np.str_, int, np.integer)


def _npz_globals() -> dict[tuple[str, str], Any]:
    """The only globals the original scene list's pickle refers to (numpy's object-array
    reconstruction), under numpy 1 and numpy 2 module names."""
    out: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "_reconstruct")] = numpy_multiarray._reconstruct
        out[(mod, "scalar")] = numpy_multiarray.scalar
    return out


class _Refused(Exception):
    pass


class _SceneListUnpickler(pickle.Unpickler):
    """Admits numpy arrays and scalars, dicts, tuples, lists, strings and numbers; refuses
    every other object (a pickle can name any callable and run it while loading)."""

    _allowed = _npz_globals()

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise _Refused(f"{module}.{name}")
        return obj


def _sniff_not_zip(path: Path, head: bytes) -> str:
    """What a file that is not a zip archive is, for the error message."""
    if head.startswith(b"\x93NUMPY"):
        return "a single .npy array, not an .npz archive; save it with np.savez(path, data=...)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        first = text.strip().splitlines()[0][:80] if text.strip() else ""
        if text.startswith("version https://git-lfs"):
            return ("a Git LFS pointer (a text file), not the archive itself: fetch it with `git lfs pull` "
                    "or download megadepth_image_list_v0.npz again")
        if not text.strip():
            return "empty (blank text), not an npz archive"
        return (f"a text file, not an npz archive (first line: {first!r}); if it is a JSON or YAML scene list, "
                "name it .json or .yaml")
    return (f"not an npz archive and not text (it starts with bytes {head[:8].hex(' ')}): it is corrupt or of "
            "another kind; download megadepth_image_list_v0.npz again")


#: The largest ``data.npy`` a scene list may declare (uncompressed). The original
#: megadepth_image_list_v0.npz lists MegaDepth's ~130k images (a few MB pickled); 256 MB is a
#: generous margin, and what a hostile file can make the reader allocate at most.
SCENE_LIST_MAX_BYTES = 256 * 1024 * 1024


def read_npz_scene_list(path: str | os.PathLike) -> Any:
    """The ``data`` object of the original's scene list npz, read without running code.

    ``np.load(..., allow_pickle=True)`` would unpickle whatever the file holds (a crafted
    file runs its payload); here the pickle may only build what the original holds (a dict
    of tuples of strings to lists of strings, numpy arrays of those). Raises ``ValueError``
    naming the file: refused content, a text file named .npz, a corrupt archive."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if not head.startswith(b"PK"):
        raise ValueError(f"{path}: {_sniff_not_zip(path, head)}")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if "data.npy" not in names:
                raise ValueError(f"{path}: no 'data' array (has {[n[:-4] if n.endswith('.npy') else n for n in names]})")
            # the declared sizes first: a deflate bomb is refused before it is expanded
            checks.check_npy_member(zf, "data.npy", max_bytes=SCENE_LIST_MAX_BYTES, where=str(path))
            with zf.open("data.npy") as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
                if not dtype.hasobject:
                    count = checks.check_npy_shape(shape, dtype.itemsize, available=zf.getinfo("data.npy").file_size,
                                                   member="data.npy", where=str(path))
                    arr = np.frombuffer(fh.read(count * dtype.itemsize), dtype=dtype, count=count)
                    return arr.reshape(shape, order="F" if fortran else "C")
                try:
                    obj = _SceneListUnpickler(fh).load()
                except _Refused as r:
                    raise ValueError(
                        f"{path}: refused: the scene list's pickle asks for {r}, which a scene list never holds "
                        "(only a dict {(scene_id, subscene_id): [image names]}); nothing was loaded, because "
                        "unpickling it could run code. Use the original megadepth_image_list_v0.npz, or a "
                        "JSON/YAML scene list") from None
                except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError,
                        IndexError, KeyError) as exc:
                    raise ValueError(f"{path}: corrupt scene list: its 'data' pickle does not load "
                                     f"({type(exc).__name__}: {exc}); download it again") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise ValueError(f"{path}: corrupt npz archive ({type(exc).__name__}: {exc}); the file is incomplete "
                         "or damaged: download megadepth_image_list_v0.npz again") from None
    if isinstance(obj, np.ndarray) and obj.shape == ():
        obj = obj.item()
    return obj


def load_scene_list(path: str | os.PathLike) -> list[SceneEntry]:
    """Load a scene list in any of the accepted forms, in the file's order.

    * the original ``megadepth_image_list_v0.npz``: ``np.load(path, allow_pickle=True)['data']
      .item()`` is ``{(scene_id, subscene_id): [image names]}``;
    * JSON (or YAML) list ``[{"scene": "0001", "subscene": "0", "images": [...]}]``;
    * JSON or YAML mapping ``{"0001": {"0": [...]}}``.

    Integer scene ids are zero-padded to 4 digits, subscene ids become ``str(int)``. YAML is
    read with every scalar as a string so ids like ``0010`` keep their digits.
    Raises ``FileNotFoundError``/``ValueError`` naming the file (and the entry).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scene list not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        data = read_npz_scene_list(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: 'data' is a {type(data).__name__}, expected a dict "
                             "{(scene_id, subscene_id): [image names]}")
        entries = []
        for key, images in data.items():
            where = f"{path}: entry {key!r}"
            if not isinstance(key, tuple) or len(key) != 2 or not all(isinstance(k, _ID_TYPES) for k in key):
                raise ValueError(f"{where}: key must be (scene_id, subscene_id), strings or integers")
            if not isinstance(images, (list, tuple, np.ndarray)):
                raise ValueError(f"{where}: expected a list of image names, got {type(images).__name__}")
            try:
                entries.append(SceneEntry(_norm_scene(key[0]), _norm_subscene(key[1]), _norm_images(images)))
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from exc
        return entries

    text = path.read_text()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON: {exc}") from exc
    elif suffix in (".yaml", ".yml"):
        try:
            data = yaml.load(text, Loader=yaml.BaseLoader)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: invalid YAML: {exc}") from exc
    else:
        raise ValueError(f"{path}: unknown scene list format (expected .npz, .json, .yaml or .yml)")
    if isinstance(data, list):
        return _entries_from_list(data, path)
    if isinstance(data, dict):
        return _entries_from_mapping(data, path)
    raise ValueError(f"{path}: expected a list or a mapping at the top level, got {type(data).__name__}")


# --------------------------------------------------------------------------------------
# Sparse model
# --------------------------------------------------------------------------------------


def read_sparse_model(md_root: str | os.PathLike, scene: str, subscene: str) -> dict[str, ModelEntry]:
    """Read a scene's sparse model: image name -> ``ModelEntry(K, cam2world, (W, H))``.

    ``K`` is the camera's calibration matrix (distortion ignored), ``cam2world`` the inverse
    of the image's world-to-camera pose. Raises ``FileNotFoundError`` when the folder or its
    files are missing, ``ValueError`` when pycolmap cannot parse them.
    """
    folder = sparse_model_dir(md_root, scene, subscene)
    if not folder.is_dir():
        raise FileNotFoundError(f"sparse model folder not found: {folder}")
    try:
        rec = pycolmap.Reconstruction(str(folder))
    except Exception as exc:
        raise ValueError(f"cannot read sparse model {folder}: {exc}") from exc
    out: dict[str, ModelEntry] = {}
    for image in rec.images.values():
        if not image.has_pose:
            continue
        cam = rec.cameras[image.camera_id]
        c2w = geometry.cam2world_matrix(image)
        K = np.asarray(cam.calibration_matrix(), dtype=np.float64)
        model = str(cam.model.name)
        out[image.name] = ModelEntry(K, c2w, (int(cam.width), int(cam.height)),
                                     distortion_coefficients(model, [float(v) for v in cam.params]), model)
    return out


#: COLMAP camera models and their OpenCV distortion coefficients from COLMAP's parameter list.
_OPENCV_DISTORTION = {
    "SIMPLE_PINHOLE": lambda p: (),
    "PINHOLE": lambda p: (),
    "SIMPLE_RADIAL": lambda p: (p[3], 0.0, 0.0, 0.0),  # f, cx, cy, k
    "RADIAL": lambda p: (p[3], p[4], 0.0, 0.0),  # f, cx, cy, k1, k2
    "OPENCV": lambda p: tuple(p[4:8]),  # fx, fy, cx, cy, k1, k2, p1, p2
    "FULL_OPENCV": lambda p: tuple(p[4:12]),  # ... k1, k2, p1, p2, k3, k4, k5, k6
}


def distortion_coefficients(model: str, params: list[float]) -> tuple[float, ...] | None:
    """OpenCV distortion coefficients of a COLMAP camera (``()`` when it has none, all zero
    included), or None for a model OpenCV's pinhole undistortion cannot express."""
    rule = _OPENCV_DISTORTION.get(model)
    if rule is None:
        return None
    coeffs = tuple(float(v) for v in rule(params))
    return coeffs if any(coeffs) else ()


def dense_intrinsics(entry: ModelEntry | tuple, dense_size: tuple[int, int]) -> np.ndarray:
    """Pinhole ``K`` of the dense (undistorted) image of ``dense_size`` (W, H) made from the
    sparse camera ``entry`` (module doc, step 1). Raises ``ValueError`` for a camera model
    that cannot be undistorted."""
    entry = ModelEntry(*entry)
    if entry.distortion is None:
        raise ValueError(f"camera model {entry.model} is not supported (fisheye); MegaDepth's cameras are "
                         "SIMPLE_RADIAL, and RADIAL, OPENCV, FULL_OPENCV and the pinhole models are read")
    size = (int(entry.size[0]), int(entry.size[1]))
    dense_size = (int(dense_size[0]), int(dense_size[1]))
    if not entry.distortion and size == dense_size:
        return np.asarray(entry.K, np.float64)
    dist = np.asarray(entry.distortion if entry.distortion else (0.0, 0.0, 0.0, 0.0), np.float64)
    # OpenCV puts pixel centres at whole numbers, COLMAP (and this module) at half numbers
    shift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    k_cv = np.linalg.inv(shift) @ np.asarray(entry.K, np.float64)
    k_new, _ = cv2.getOptimalNewCameraMatrix(k_cv, dist, size, 0.0, newImgSize=dense_size, centerPrincipalPoint=True)
    return shift @ np.asarray(k_new, np.float64)


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------


def crop_window(K: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """Symmetric window ``(x0, y0, w, h)`` around the principal point (see module doc)."""
    cx, cy = float(K[0, 2]), float(K[1, 2])
    hw = int(math.floor(min(cx, width - cx) + 1e-9))
    hh = int(math.floor(min(cy, height - cy) + 1e-9))
    if hw <= 0 or hh <= 0:
        raise ValueError(f"principal point ({cx}, {cy}) is on or outside the {width}x{height} image border")
    x0 = min(max(int(round(cx - hw)), 0), width - 2 * hw)
    y0 = min(max(int(round(cy - hh)), 0), height - 2 * hh)
    return x0, y0, 2 * hw, 2 * hh


def target_size(width: int, height: int) -> tuple[int, int]:
    """Size fitting 800x600 (landscape) or 600x800 (portrait), aspect kept, never upscaled."""
    if width >= height:
        s = min(1.0, MAX_LONG_SIDE / width, MAX_SHORT_SIDE / height)
    else:
        s = min(1.0, MAX_SHORT_SIDE / width, MAX_LONG_SIDE / height)
    return max(1, int(round(width * s))), max(1, int(round(height * s)))


def processed_intrinsics(K: np.ndarray, crop_size: tuple[int, int], new_size: tuple[int, int]) -> np.ndarray:
    """Intrinsics after the centred crop (size ``crop_size``) and the resize to ``new_size``."""
    (w, h), (nw, nh) = crop_size, new_size
    sx, sy = nw / w, nh / h
    K2 = np.array(K, dtype=np.float64, copy=True)
    K2[0, 0] *= sx
    K2[0, 1] *= sx
    K2[1, 1] *= sy
    K2[0, 2] = nw / 2.0
    K2[1, 2] = nh / 2.0
    return K2


def resize_nearest(array: np.ndarray, new_size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize sampling source pixel centres (values are never blended)."""
    h, w = array.shape[:2]
    nw, nh = new_size
    xs = np.minimum(((np.arange(nw) + 0.5) * (w / nw)).astype(np.int64), w - 1)
    ys = np.minimum(((np.arange(nh) + 0.5) * (h / nh)).astype(np.int64), h - 1)
    return array[ys[:, None], xs[None, :]]


# --------------------------------------------------------------------------------------
# Per image
# --------------------------------------------------------------------------------------


#: Version of the processing: part of every image's inputs key (a change redoes every image).
PROCESSING_VERSION = 1


def inputs_key(img_path: Path, depth_path: Path, model_entry: ModelEntry | tuple) -> str:
    """What one processed image depends on: the raw photo and depth (name, size, mtime: a
    replaced file changes it), the image's camera and pose in the sparse model, and the
    processing settings."""
    K, cam2world, size, distortion, _ = ModelEntry(*model_entry)
    settings = {"version": PROCESSING_VERSION, "max": [MAX_LONG_SIDE, MAX_SHORT_SIDE], "jpeg": JPEG_QUALITY,
                "K": np.asarray(K, float).round(9).tolist(), "cam2world": np.asarray(cam2world, float).round(9).tolist(),
                "size": list(size)}
    if distortion:  # a distorted camera's dense K differs: it is part of the key (none: keys as before)
        settings["distortion"] = [round(float(v), 12) for v in distortion]
    return fingerprint(settings, img_path, depth_path)


def _load_npz_ok(path: Path, key: str | None = None) -> dict | None:
    """The npz's record of its jpg/exr (``{}`` for outputs written before records) when it
    loads, has K and pose, and (``key`` given) was made from those inputs; else None."""
    try:
        with np.load(path) as npz:
            ok = (np.asarray(npz["intrinsics"]).shape == (3, 3) and np.asarray(npz["cam2world"]).shape == (4, 4))
            if key is not None:
                ok = ok and "inputs" in npz.files and str(npz["inputs"]) == key
            rec = json.loads(str(npz["outputs"])) if "outputs" in npz.files else {}
        return rec if ok else None
    except Exception:
        return None


def is_done(out_dir: str | os.PathLike, scene: str, subscene: str, name: str, key: str | None = None) -> bool:
    """True when the npz (written last) loads, records the inputs ``key`` (when given) and
    the jpg and exr match its record of them (:mod:`tasks.common.trusted`): a replaced raw
    photo or depth, a truncated or deleted output, all redo the image."""
    jpg, exr, npz = output_paths(out_dir, scene, subscene, name)
    if not (npz.is_file() and jpg.is_file() and exr.is_file()):
        return False
    rec = _load_npz_ok(npz, key)
    if rec is None:
        return False
    return trusted.matches(jpg.parent, rec) if (rec or key is not None) else True


def _write_cv2(path: Path, array: np.ndarray, params: list[int]) -> None:
    with atomic_path(path) as tmp:  # the temporary name keeps the extension cv2 needs
        if not cv2.imwrite(str(tmp), array, params):
            raise OSError(f"cv2.imwrite failed for {tmp}")


def _read_depth(path: Path) -> np.ndarray:
    """A raw MegaDepth depth (dataset ``depth``; HxW or HxWx1), non-finite values as 0."""
    depth = read_depth_h5(path)
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2:
        raise ValueError(f"depth in {path} has shape {depth.shape}, expected 2-D")
    depth[~np.isfinite(depth)] = 0.0
    return depth


def preprocess_image(
    md_root: str | os.PathLike,
    scene: str,
    subscene: str,
    name: str,
    model_entry: ModelEntry | tuple | None,
    out_dir: str | os.PathLike,
) -> ImageResult:
    """Preprocess one MegaDepth image (picklable arguments; safe to run on Dask workers).

    ``model_entry`` is the image's :class:`ModelEntry` from :func:`read_sparse_model`, or
    ``None`` when the image is not in the sparse model (reported as failed). Returns status
    ``"done"``, ``"skipped"`` (outputs already complete) or ``"failed"`` with a reason.
    """
    try:
        jpg, exr, npz = output_paths(out_dir, scene, subscene, name)
    except checks.InputError as exc:  # a name that is not a plain file name: this image fails, alone
        return ImageResult(scene, subscene, name, "failed", reason=str(exc))
    res = ImageResult(scene, subscene, name, "failed", outputs=(str(jpg), str(exr), str(npz)))
    img_path = raw_image_path(md_root, scene, subscene, name)
    depth_path = raw_depth_path(md_root, scene, subscene, name)
    key = (inputs_key(img_path, depth_path, model_entry)
           if model_entry is not None and img_path.is_file() and depth_path.is_file() else None)
    # without its inputs (gone from the raw tree) a complete output is still kept
    if is_done(out_dir, scene, subscene, name, key):
        res.status = "skipped"
        return res
    if model_entry is None:
        res.reason = (f"image {name} not in sparse model "
                      f"{sparse_model_dir(md_root, scene, subscene)}")
        return res
    entry = ModelEntry(*model_entry)
    cam2world = entry.cam2world
    if not img_path.is_file():
        res.reason = f"missing image {img_path}"
        return res
    if not depth_path.is_file():
        res.reason = f"missing depth {depth_path}"
        return res
    # EXIF orientation must not be applied: the depth and the model use the stored layout.
    image = cv2.imread(str(img_path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        res.reason = f"cannot decode image {img_path}"
        return res
    try:
        depth = _read_depth(depth_path)
    except Exception as exc:
        res.reason = f"cannot read depth {depth_path}: {exc}"
        return res
    H, W = image.shape[:2]
    if depth.shape != (H, W):
        res.reason = f"depth {depth_path} has size {depth.shape[1]}x{depth.shape[0]}, image {img_path} is {W}x{H}"
        return res
    try:
        K = dense_intrinsics(entry, (W, H))
        x0, y0, w, h = crop_window(K, W, H)
    except ValueError as exc:
        res.reason = f"{img_path}: {exc}"
        return res
    image = image[y0:y0 + h, x0:x0 + w]
    depth = depth[y0:y0 + h, x0:x0 + w]
    nw, nh = target_size(w, h)
    if (nw, nh) != (w, h):
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        depth = resize_nearest(depth, (nw, nh))
    K2 = processed_intrinsics(K, (w, h), (nw, nh))
    try:
        jpg.parent.mkdir(parents=True, exist_ok=True)
        _write_cv2(jpg, np.ascontiguousarray(image), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        _write_cv2(exr, np.ascontiguousarray(depth, dtype=np.float32),
                   [cv2.IMWRITE_EXR_TYPE, cv2.IMWRITE_EXR_TYPE_FLOAT])
        # last: the npz records the inputs and the two files above (checked before reuse)
        write_npz_atomic(npz, intrinsics=K2, cam2world=np.asarray(cam2world, dtype=np.float64), inputs=np.str_(key or ""),
                         outputs=np.str_(json.dumps(trusted.record(jpg.parent, [jpg, exr], content=False))))
    except Exception as exc:
        res.reason = f"cannot write outputs for {name} in {jpg.parent}: {exc}"
        return res
    res.status = "done"
    res.size = (nw, nh)
    return res


# --------------------------------------------------------------------------------------
# Per scene
# --------------------------------------------------------------------------------------


def image_jobs(
    md_root: str | os.PathLike, entry: SceneEntry, out_dir: str | os.PathLike,
    model: dict[str, ModelEntry] | None = None,
) -> list[tuple[str, str, str, str, ModelEntry | None, str]]:
    """Picklable argument tuples for :func:`preprocess_image`, one per image of ``entry``.

    Reads the sparse model once (unless given); meant for fanning out on Dask.
    """
    if model is None:
        model = read_sparse_model(md_root, entry.scene, entry.subscene)
    return [(str(md_root), entry.scene, entry.subscene, name, model.get(name), str(out_dir))
            for name in entry.images]


def preprocess_scene(
    md_root: str | os.PathLike, entry: SceneEntry, out_dir: str | os.PathLike, workers: int | None = None,
) -> list[ImageResult]:
    """Preprocess all images of one scene list entry, in order.

    ``workers`` > 1 uses a thread pool (OpenCV and h5py release the GIL); the default is a
    plain loop. A missing or unreadable sparse model fails every image with that reason.
    """
    try:
        jobs = image_jobs(md_root, entry, out_dir)
    except (FileNotFoundError, ValueError) as exc:
        return [ImageResult(entry.scene, entry.subscene, name, "failed", reason=str(exc)) for name in entry.images]
    if workers is not None and workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda job: preprocess_image(*job), jobs))
    return [preprocess_image(*job) for job in jobs]
