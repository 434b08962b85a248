"""Local features in hloc's HDF5 layout: SIFT (DoG) with pycolmap on the CPU.

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

Writers are atomic (temporary file in the same folder, then ``os.replace``) and
stages resumable: names already in the output are skipped. Work is committed in
chunk files (``.<file>.chunk-*.h5``) merged at the end, so an interrupted run
loses at most one chunk and a rerun picks the chunks up. One writer per output
file at a time; to fan out over worker processes, :func:`extract_features_parts` writes one part file per worker and
:func:`merge_features` merges them (atomic, idempotent).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np

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
}

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


# ----------------------------------------------------------------------------- h5 helpers


def _fsync(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    except OSError:  # pragma: no cover - best effort
        pass


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


@contextmanager
def atomic_h5(path: Path, base: Path | None = None):
    """Yield an h5py.File on a temporary file next to ``path``; on success fsync it and
    ``os.replace`` it onto ``path``. ``base``: copy this file in first (append mode)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        if base is not None and Path(base).exists():
            shutil.copyfile(base, tmp)
            mode = "a"
        else:
            mode = "w"
        with h5py.File(str(tmp), mode, libver="latest") as fd:
            yield fd
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def h5_names(path: Path) -> list[str]:
    """Names of the groups that hold at least one dataset (hloc's ``list_h5_names``), sorted."""
    path = Path(path)
    if not path.exists():
        return []
    names: set[str] = set()
    with h5py.File(str(path), "r", libver="latest") as fd:

        def visit(_, obj):
            if isinstance(obj, h5py.Dataset):
                names.add(obj.parent.name.strip("/"))

        fd.visititems(visit)
    names.discard("")
    return sorted(names)


def list_names(feature_path: Path) -> list[str]:
    """Image names in a features (or global-features) file, sorted."""
    return h5_names(feature_path)


def _copy_group(src: h5py.File, dst: h5py.File, name: str) -> None:
    parent, _, leaf = name.rpartition("/")
    target = dst.require_group(parent) if parent else dst
    src.copy(src[name], target, name=leaf)


def merge_h5(parts: Sequence[Path], dest: Path, overwrite: bool = False, remove_parts: bool = False,
             equivalents: Callable[[str], Iterable[str]] | None = None) -> Path:
    """Merge the keyed groups of ``parts`` into ``dest``, atomically and idempotently.

    Keys already in ``dest`` (or any of ``equivalents(key)``) are kept unless
    ``overwrite``; among parts the first holding a key wins. Nothing is written
    when there is nothing new. Root attributes of parts are added where ``dest``
    lacks them. ``remove_parts`` deletes the part files after a successful merge.
    """
    dest = Path(dest)
    parts = [Path(p) for p in parts if Path(p).exists() and Path(p).resolve() != dest.resolve()]
    existing = set(h5_names(dest))
    equiv = equivalents or (lambda k: (k,))
    taken: set[str] = set()
    plan: list[tuple[Path, str]] = []
    for part in parts:
        for key in h5_names(part):
            alts = set(equiv(key)) | {key}
            if alts & taken:
                continue
            if not overwrite and alts & existing:
                continue
            plan.append((part, key))
            taken |= alts
    if plan:
        replaced = set()
        if overwrite:
            for _, key in plan:
                replaced |= (set(equiv(key)) | {key}) & existing
        base = dest if dest.exists() and not replaced else None
        with atomic_h5(dest, base=base) as out:
            if base is None and dest.exists():
                with h5py.File(str(dest), "r", libver="latest") as old:
                    for k, v in old.attrs.items():
                        out.attrs[k] = v
                    for key in sorted(existing - replaced):
                        _copy_group(old, out, key)
            by_part: dict[Path, list[str]] = {}
            for part, key in plan:
                by_part.setdefault(part, []).append(key)
            for part, keys in by_part.items():
                with h5py.File(str(part), "r", libver="latest") as src:
                    for k, v in src.attrs.items():
                        if k not in out.attrs:
                            out.attrs[k] = v
                    for key in keys:
                        _copy_group(src, out, key)
        logger.info("merged %d entries from %d part(s) into %s", len(plan), len(parts), dest)
    if remove_parts:
        for p in parts:
            p.unlink(missing_ok=True)
    return dest


def ensure_h5(path: Path) -> Path:
    """Create an empty HDF5 file at ``path`` (atomically) when there is none."""
    path = Path(path)
    if not path.exists():
        with atomic_h5(path):
            pass
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True


def clean_stale_tmp(path: Path) -> int:
    """Remove temporary files left next to ``path`` (or its chunk files) by killed
    writers (their pid no longer runs). Returns how many were removed."""
    path = Path(path)
    if not path.parent.exists():
        return 0
    removed = 0
    for pattern in (f".{path.name}.*.tmp", f"..{path.name}.chunk-*.tmp"):
        for p in path.parent.glob(pattern):
            try:
                pid = int(p.name.rsplit(".", 2)[-2].split("-")[0])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                p.unlink(missing_ok=True)
                removed += 1
    return removed


def chunk_glob(path: Path) -> list[Path]:
    """Leftover chunk files of an interrupted run writing ``path``."""
    path = Path(path)
    if not path.parent.exists():
        return []
    return sorted(path.parent.glob(f".{path.name}.chunk-*.h5"))


def resume_chunks(path: Path, overwrite: bool) -> list[Path]:
    """Start a resumable writer of ``path``: clear dead writers' temporaries, then the
    chunk files a previous run left (to reuse; deleted instead when ``overwrite``)."""
    clean_stale_tmp(path)
    leftovers = chunk_glob(path)
    if overwrite:
        for p in leftovers:
            p.unlink(missing_ok=True)
        return []
    return leftovers


def chunk_path(path: Path, keys: Sequence[str]) -> Path:
    digest = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:16]
    return path.with_name(f".{path.name}.chunk-{digest}.h5")


def part_paths(path: Path, n_parts: int) -> list[Path]:
    """The part files of a fan-out over ``n_parts`` workers writing ``path``."""
    path = Path(path)
    return [path.with_name(f"{path.stem}.part-{i:03d}-of-{n_parts:03d}{path.suffix}") for i in range(n_parts)]


def split_even(items: Sequence, n_parts: int) -> list[list]:
    """Split ``items`` into ``n_parts`` contiguous, nearly equal blocks (deterministic)."""
    if n_parts < 1:
        raise ValueError("n_parts must be >= 1")
    bounds = np.linspace(0, len(items), n_parts + 1).round().astype(int)
    return [list(items[bounds[i]:bounds[i + 1]]) for i in range(n_parts)]


def _unique(items: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for x in items:
        x = x.as_posix() if isinstance(x, Path) else str(x)
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


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


def extract_image(extractor: SiftExtractor, path: Path, preprocessing: Mapping[str, Any],
                  as_half: bool = False) -> tuple[dict[str, np.ndarray], np.float32]:
    """Features of one image file, mapped to the original resolution as hloc does.
    Returns (predictions, keypoint uncertainty)."""
    pre = {**DEFAULT_PREPROCESSING, **preprocessing}
    # DoG works on one channel (hloc asserts it; its SIFT confs all read grayscale)
    raw = read_image(path, grayscale=True)
    image, original = preprocess(raw, pre)
    pred = extractor(image)
    size = np.array(image.shape[:2][::-1])
    scales = (original / size).astype(np.float32)
    pred["keypoints"] = ((pred["keypoints"] + 0.5) * scales[None] - 0.5).astype(np.float32)
    pred["scales"] = (pred["scales"] * scales.mean()).astype(np.float32)
    uncertainty = np.float32(DETECTION_NOISE * scales.mean())  # float32 scalar, as in hloc
    pred["image_size"] = original
    if as_half:
        for k in pred:
            if pred[k].dtype == np.float32:
                pred[k] = pred[k].astype(np.float16)
    return pred, uncertainty


def _write_preds(fd: h5py.File, name: str, pred: Mapping[str, np.ndarray], uncertainty: np.float32) -> None:
    if name in fd:
        del fd[name]
    grp = fd.create_group(name)
    for k, v in pred.items():
        grp.create_dataset(k, data=v)
    grp["keypoints"].attrs["uncertainty"] = uncertainty


# ----------------------------------------------------------------------------- public API


def extract_features(conf: Mapping[str, Any], image_dir: Path | Mapping[str, Path], names: Sequence[str],
                     feature_path: Path, overwrite: bool = False, *, as_half: bool = False,
                     chunk_size: int = 16, skip_paths: Sequence[Path] = ()) -> Path:
    """Extract SIFT features of ``names`` into ``feature_path`` (hloc layout).

    Resumable: names already in ``feature_path`` (or in any of ``skip_paths``) are
    skipped unless ``overwrite``; finished chunks of an interrupted run are reused.
    Every write is atomic. Returns ``feature_path``.
    """
    feature_path = Path(feature_path)
    names = _unique(names)
    leftovers = resume_chunks(feature_path, overwrite)
    if overwrite:
        done: set[str] = set()
    else:
        done = set(h5_names(feature_path))
        for p in [*leftovers, *map(Path, skip_paths)]:
            done |= set(h5_names(p))
    todo = [n for n in names if n not in done]
    for n in todo:
        p = image_path(image_dir, n)
        if not p.exists():
            raise ValueError(f"Image {n} does not exist: {p}.")
    if not todo and not leftovers:
        logger.info("features: nothing to extract for %s", feature_path.name)
        return ensure_h5(feature_path)

    model_conf = conf.get("model", {})
    preprocessing = conf.get("preprocessing", {})
    extractor = SiftExtractor(model_conf) if todo else None
    chunks = list(leftovers)
    for start in range(0, len(todo), max(1, chunk_size)):
        block = todo[start:start + max(1, chunk_size)]
        cpath = chunk_path(feature_path, block)
        with atomic_h5(cpath) as fd:
            for n in block:
                pred, unc = extract_image(extractor, image_path(image_dir, n), preprocessing, as_half=as_half)
                _write_preds(fd, n, pred, unc)
        chunks.append(cpath)
    merge_features(chunks, feature_path, overwrite=overwrite, remove_parts=True)
    logger.info("features: extracted %d image(s) into %s", len(todo), feature_path)
    return feature_path


def feature_parts_plan(names: Sequence[str], feature_path: Path, n_parts: int,
                       overwrite: bool = False) -> list[tuple[Path, list[str]]]:
    """Split the names still missing from ``feature_path`` into ``n_parts`` blocks:
    [(part file, names)]. Deterministic for a given final file."""
    names = _unique(names)
    done = set() if overwrite else set(h5_names(feature_path))
    todo = [n for n in names if n not in done]
    return list(zip(part_paths(feature_path, n_parts), split_even(todo, n_parts)))


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
    return merge_h5(parts, feature_path, overwrite=overwrite, remove_parts=remove_parts)


def read_keypoints(feature_path: Path, name: str, return_uncertainty: bool = False):
    """(N, 2) keypoints in hloc's convention (COLMAP minus 0.5), as stored."""
    with h5py.File(str(feature_path), "r", libver="latest") as fd:
        dset = fd[name]["keypoints"]
        kp = dset[()]
        unc = dset.attrs.get("uncertainty")
    return (kp, unc) if return_uncertainty else kp


def read_descriptors(feature_path: Path, name: str) -> np.ndarray:
    """(D, N) descriptors, as stored (transposed, hloc's layout)."""
    with h5py.File(str(feature_path), "r", libver="latest") as fd:
        return fd[name]["descriptors"][()]


def read_image_size(feature_path: Path, name: str) -> tuple[int, int]:
    """(width, height) of the original image."""
    with h5py.File(str(feature_path), "r", libver="latest") as fd:
        w, h = fd[name]["image_size"][()]
    return int(w), int(h)
