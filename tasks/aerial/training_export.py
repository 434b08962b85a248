"""Training-ready files from the scene products: what matcher and 3D-model training code
reads next to MegaDepth-style data (see ``docs/training_exports.md`` for the layout and
which reader opens which file).

Per scene (:func:`export_scene`), from ``localized_dense_metric/`` (``images/``,
``depths/<stem>.h5``, ``sparse-txt/``) and the dense covisibility
(``tasks/aerial/covisibility.py``), under the export root ``EXPORT`` (default
``<root>/training``); every path stored in a file is relative to ``EXPORT``:

* ``scene_info/<scene>.npz``: D2-Net's scene info as glue-factory's MegaDepth dataset
  reads it (``np.load(..., allow_pickle=True)``);
* ``covisibility/<scene>.npz``: the dense covisibility matrix and its settings;
* ``pair_infos/<scene>_<lo>_<hi>.npz``: LoFTR/DKM-style scene info with ``pair_infos``;
* ``images/<scene>/<name>``, ``depths/<scene>/<stem>.h5``: the product's files (hard
  links), the layout glue-factory and D2-Net read (``image_subpath``/``depth_subpath``);
* ``aerialmegadepth/<scene>/sfm_output_localization/sfm_superpoint+superglue/
  localized_dense_metric``: a link to the product under the folder name that
  AerialMegaDepth's ``preprocess_aerialmegadepth.py`` has fixed in its code;
* ``dust3r/<scene>/0/<name>.jpg|.exr|.npz``: DUSt3R's MegaDepth layout;
* ``pictures/<scene>_covisibility.png``.

Dataset level (:func:`export_dataset`): ``index.json``, ``dust3r/all_metadata.npz``
(plain arrays) and ``aerialmegadepth_pairs.npz`` (the ``--precomputed_pairs`` file).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pycolmap
import scipy.sparse

from tasks.aerial import covisibility
from tasks.aerial import geometry
from tasks.aerial.covisibility import CovisibilityConfig
from tasks.aerial.dense import image_stem, read_depth_h5
from tasks.aerial.evaluate import gt_depth_on_grid
from tasks.aerial.layout import PRODUCT, REFERENCE_EMPTY, WORK
from tasks.common import trusted
from tasks.common.atomic import PARTIAL, atomic_path, link_atomic, write_bytes_atomic, write_json_atomic, write_npz_atomic
from tasks.common.fingerprint import fingerprint
from tasks.common.forms import setting

#: The folder name AerialMegaDepth's preprocessing script reads (fixed in its code).
AMD_SFM_FOLDER = "sfm_superpoint+superglue"
#: Version of the files' formats: part of every scene's key, so a rerun rewrites files an
#: older version wrote (v2: pair_infos as pickled dicts, the segmentation PNGs).
FORMAT = "geodata-factory training exports v2"
#: Pair kinds, as stored next to every pair list.
KINDS = {0: "aerial-aerial", 1: "aerial-ground", 2: "ground-ground"}
log = logging.getLogger(__name__)
DUST3R_SUBSCENE = "0"  # one model per scene: MegaDepth's first (and only) sub-model
#: ``--output_dir`` of AerialMegaDepth's preprocessing under EXPORT: its sample DUSt3R loader
#: ``MegaDepthAerial`` finds the segmentation by replacing this name with SEGMENTATION in ROOT.
AMD_PROCESSED = "megadepth_aerial_processed"
SEGMENTATION = "megadepth_aerial_processed_segmentation"
#: ADE20k labels (0-based, as InternImage/mmseg write them): the loader zeroes depth where sky.
ADE20K_SKY = 2
#: every pixel not known to be sky: mmseg's ignore index ("other"), which no reader masks.
SEG_UNKNOWN = 255


@dataclass
class ExportConfig:
    """Settings of the training exports (flow: ``--set``-style ``exports`` overrides)."""

    root: str | None = setting(None, "folder of the training exports (default: ROOT/training)")
    covisibility: CovisibilityConfig = setting(help="dense covisibility of every image pair",
                                               factory=CovisibilityConfig)
    ranges: tuple[tuple[float, float], ...] = setting(
        ((0.1, 0.3), (0.3, 0.5), (0.5, 0.7)), "overlap ranges [low, high) of the pair lists: one list of "
                                              "image pairs per range")
    pair_score: str = setting("min", "overlap score of a pair from its two directions: min, mean or max")
    score_matrix: str = setting("covisibility", "which overlap the score uses: covisibility (pixels of one image "
                                                "that the other sees at the same depth) or known (pixels landing "
                                                "on holes of the other depth map left out)")
    dust3r: bool = setting(True, "also write the DUSt3R layout (a jpg, exr and npz per image)")
    dust3r_max_depth: float = setting(2000.0, "depths beyond this many metres are written as 0 (no depth) in the "
                                              "DUSt3R layout, as AerialMegaDepth's preprocessing")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        return fingerprint(self.to_dict(), length=16)


def export_config(**overrides) -> ExportConfig:
    cfg = ExportConfig()
    for k, v in overrides.items():
        if k == "covisibility" and isinstance(v, dict):
            cfg.covisibility = CovisibilityConfig(**{**asdict(cfg.covisibility), **v})
        elif hasattr(cfg, k):
            setattr(cfg, k, tuple(tuple(r) for r in v) if k == "ranges" else v)
        else:
            raise KeyError(f"unknown export setting {k!r}; choose one of {sorted(asdict(cfg))}")
    if cfg.pair_score not in ("min", "mean", "max"):
        raise ValueError(f"export setting pair_score={cfg.pair_score!r}: use min, mean or max")
    tol = cfg.covisibility.rel_tolerance
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol <= 1:
        raise ValueError(f"export setting covisibility.rel_tolerance={tol!r}: use a number in (0, 1] "
                         "(0.1: depths agree within 10 %)")
    if cfg.score_matrix not in ("covisibility", "known"):
        raise ValueError(f"export setting score_matrix={cfg.score_matrix!r}: use covisibility or known")
    return cfg


# ----------------------------------------------------------------------------- scene info (D2-Net)


def _object_array(items: list) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for k, x in enumerate(items):
        out[k] = x
    return out


def scene_info(product: Path, views: list[covisibility.View], image_paths: list[str | None],
               depth_paths: list[str | None]) -> dict[str, np.ndarray]:
    """D2-Net's scene info (``megadepth_utils/preprocess_scene.py``) of the product's
    images, in ``views`` order:

    * ``overlap_matrix``: |shared 3D points| / min(#points of i, #points of j), symmetric,
      -1 where either image lacks image or depth (``preprocess_scene.py``'s definition);
    * ``scale_ratio_matrix``: sqrt(area_i / area_j) of the bounding boxes of the shared
      observations, -1 where undefined;
    * ``angles``: degrees between the principal axes (third rows of R);
    * ``n_points3D``, ``points3D_id_to_2D`` ({id: [x, y]}), ``points3D_id_to_ndepth``
      ({id: z / mean focal}), as D2-Net's undistorted-MegaDepth variant that glue-factory's
      released scene info comes from; ``fact_x``/``fact_y`` are 1 (images as stored).
    """
    rec = pycolmap.Reconstruction(str(Path(product) / "sparse-txt"))
    by_name = {im.name: im for im in rec.images.values()}
    n = len(views)
    id2d: list[dict[int, list[float]]] = []
    ndepth: list[dict[int, float]] = []
    axes = np.zeros((n, 3))
    for k, v in enumerate(views):
        im = by_name[v.name]
        obs = {int(p.point3D_id): [float(p.xy[0]), float(p.xy[1])] for p in im.points2D if p.has_point3D()}
        id2d.append(obs)
        R, t = v.w2c[:3, :3], v.w2c[:3, 3]
        f = 0.5 * (v.K[0, 0] + v.K[1, 1])
        nd = {}
        for pid in obs:
            nd[pid] = float((R[2] @ rec.points3D[pid].xyz + t[2]) / f)
        ndepth.append(nd)
        axes[k] = R[2]
    angles = np.rad2deg(np.arccos(np.clip(axes @ axes.T, -1, 1)))
    # shared points of every pair through the image x point incidence matrix
    pids = sorted({p for o in id2d for p in o})
    col = {p: c for c, p in enumerate(pids)}
    rows = [k for k, o in enumerate(id2d) for _ in o]
    cols = [col[p] for o in id2d for p in o]
    A = scipy.sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, max(1, len(pids))))
    shared = (A @ A.T).tocoo()
    counts = np.array([len(o) for o in id2d])
    usable = np.array([image_paths[k] is not None and depth_paths[k] is not None for k in range(n)])
    overlap = np.full((n, n), -1.0)
    scale = np.full((n, n), -1.0)
    overlap[np.ix_(usable, usable)] = 0.0
    np.fill_diagonal(overlap, -1.0)  # D2-Net leaves the diagonal at -1
    for i, j, s in zip(shared.row, shared.col, shared.data):
        if i >= j or not (usable[i] and usable[j]):
            continue
        denom = min(counts[i], counts[j])
        overlap[i, j] = overlap[j, i] = s / denom if denom else 0.0
        common = id2d[i].keys() & id2d[j].keys()
        p1 = np.array([id2d[i][q] for q in common])
        p2 = np.array([id2d[j][q] for q in common])
        a1 = np.ptp(p1[:, 0]) * np.ptp(p1[:, 1])
        a2 = np.ptp(p2[:, 0]) * np.ptp(p2[:, 1])
        if a1 > 0 and a2 > 0:
            scale[i, j] = np.sqrt(a1 / a2)
            scale[j, i] = np.sqrt(a2 / a1)
    return {
        "image_paths": _object_array(list(image_paths)),
        "depth_paths": _object_array(list(depth_paths)),
        "intrinsics": _object_array([v.K.copy() for v in views]),
        "poses": _object_array([v.w2c.copy() for v in views]),
        "overlap_matrix": overlap,
        "scale_ratio_matrix": scale,
        "angles": angles,
        "n_points3D": np.array(counts, dtype=np.int64),
        "points3D_id_to_2D": _object_array(id2d),
        "points3D_id_to_ndepth": _object_array(ndepth),
        "fact_x": _object_array([1.0] * n),
        "fact_y": _object_array([1.0] * n),
    }


# ----------------------------------------------------------------------------- pairs


def pair_scores(cov: np.ndarray, how: str = "min") -> np.ndarray:
    """Symmetric score per pair from the two directions (``-1`` stays ``-1``)."""
    a, b = cov, cov.T
    s = {"min": np.minimum, "max": np.maximum}.get(how, lambda x, y: 0.5 * (x + y))(a, b)
    s = np.where((a < 0) | (b < 0), -1.0, s)
    np.fill_diagonal(s, -1.0)
    return s


def pair_kinds(is_aerial: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """0 aerial-aerial, 1 aerial-ground, 2 ground-ground."""
    a = np.asarray(is_aerial, bool)
    return np.where(a[i] & a[j], 0, np.where(a[i] | a[j], 1, 2)).astype(np.uint8)


def pairs_in_range(score: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(i, j), i < j, with ``lo < score <= hi`` (glue-factory's convention)."""
    iu, ju = np.triu_indices(len(score), 1)
    s = score[iu, ju]
    keep = (s > lo) & (s <= hi)
    return np.stack([iu[keep], ju[keep]], axis=1)


def central_matches(id2d: list[dict], i: int, j: int) -> np.ndarray:
    """Shared sparse observations of a pair, (x_i, y_i, x_j, y_j) float32, as LoFTR's
    ``pair_infos`` carry them."""
    common = sorted(id2d[i].keys() & id2d[j].keys())
    if not common:
        return np.zeros((0, 4), np.float32)
    return np.array([id2d[i][q] + id2d[j][q] for q in common], np.float32)


def write_pair_infos(path: Path, **fields: Any) -> Path:
    """A LoFTR/DKM scene index as LoFTR's released ``scene_info_*/<scene>_<lo>_<hi>.npz``
    are: a pickled ``dict`` (not an ``np.savez`` zip), so that ``np.load(path,
    allow_pickle=True)`` returns the dict itself and LoFTR's ``MegaDepthDataset`` can
    ``del scene_info['pair_infos']`` from it (an ``NpzFile`` does not support deletion)."""
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            pickle.dump(dict(fields), fh, protocol=4)
    return Path(path)


def read_pair_infos(path: Path) -> dict[str, Any]:
    """The one reader of :func:`write_pair_infos`' files, as LoFTR opens them."""
    out = np.load(path, allow_pickle=True)
    if not isinstance(out, dict):
        raise ValueError(f"{path}: not a LoFTR scene index (a pickled dict); export the scene again")
    return out


# ----------------------------------------------------------------------------- layout


def _link_file(src: Path, dst: Path) -> None:
    link_atomic(src, dst, kind="hardlink")


def _symlink_dir(target: Path, link: Path) -> None:
    """A relative symbolic link (the export can be moved with the root)."""
    link_atomic(Path(os.path.relpath(target, Path(link).parent)), link)


def aerialmegadepth_layout(export: Path, scene: str, product: Path) -> Path:
    """``EXPORT/aerialmegadepth/<scene>/sfm_output_localization/sfm_superpoint+superglue/``
    with ``localized_dense_metric`` (and ``localized_dense``, the name in some versions of
    the script) linking to the product (relative links: the export can be moved with
    the root)."""
    base = Path(export) / "aerialmegadepth" / scene / WORK / AMD_SFM_FOLDER
    for name in (PRODUCT, "localized_dense"):
        _symlink_dir(Path(product), base / name)
    return base


def dust3r_layout(export: Path, scene: str, product: Path, views: list[covisibility.View], max_depth: float,
                  previous: dict[str, Any] | None = None) -> list[str]:
    """``EXPORT/dust3r/<scene>/0/<name>.jpg`` (the image's bytes), ``.exr`` (float32
    depth, beyond ``max_depth`` set to 0) and ``.npz`` (``intrinsics`` 3x3, ``cam2world``
    4x4): what AerialMegaDepth's preprocessing writes and DUSt3R's readers load. Images
    without depth are left out (DUSt3R needs all three files). Returns the names written.
    An ``.exr`` newer than its depth is kept only when it matches ``previous`` (the scene's
    last record of its files, :mod:`tasks.common.trusted`)."""
    os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")  # read when OpenCV first writes an EXR
    export = Path(export)
    out = export / "dust3r" / scene / DUST3R_SUBSCENE
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for v in views:
        if v.depth_file is None:
            continue
        jpg, exr, npz = (out / f"{v.name}{ext}" for ext in (".jpg", ".exr", ".npz"))
        _link_file(Path(product) / "images" / v.name, jpg)
        rel = exr.relative_to(export).as_posix()
        kept = (previous is not None and rel in previous and exr.exists()
                and exr.stat().st_mtime_ns >= v.depth_file.stat().st_mtime_ns
                and trusted.matches(export, {rel: previous[rel]}))
        if not kept:
            d = read_depth_h5(v.depth_file)
            d[d > max_depth] = 0.0
            with atomic_path(exr, suffix=".exr") as tmp:
                if not cv2.imwrite(str(tmp), d.astype(np.float32)):
                    raise OSError(f"{tmp}: cv2 could not write EXR (set OPENCV_IO_ENABLE_OPENEXR=1)")
        write_npz_atomic(npz, intrinsics=v.K.astype(np.float32), cam2world=geometry.invert_pose(v.w2c).astype(np.float32))
        names.append(v.name)
    return names


def sky_masks(views: list[covisibility.View], ground_truth: Path | None) -> dict[str, np.ndarray]:
    """Per image name, the pixels known to be sky, on the product image's grid: where the
    synthetic world's ground truth (``ground_truth/sparse`` + ``depths/<stem>.h5``, 0 where
    a ray hits nothing) has no surface. Images without a ground truth get none: a pixel
    without depth in the product is a hole of the reconstruction as often as sky."""
    if ground_truth is None or not (Path(ground_truth) / "sparse").is_dir():
        return {}
    gt = pycolmap.Reconstruction(str(Path(ground_truth) / "sparse"))
    by = {im.name: im for im in gt.images.values()}
    out = {}
    for v in views:
        g, f = by.get(v.name), Path(ground_truth) / "depths" / f"{Path(v.name).stem}.h5"
        if g is None or not f.exists():
            continue
        d = read_depth_h5(f)
        # -1 marks the ground truth's sky, so that 0 stays "outside the raw image" (unknown)
        on_grid = gt_depth_on_grid(np.where(d > 0, d, -1.0).astype(np.float32),
                                   np.asarray(gt.cameras[g.camera_id].calibration_matrix()), v.K,
                                   (v.height, v.width))
        out[v.name] = on_grid < 0
    return out


def segmentation_layout(export: Path, scene: str, views: list[covisibility.View], ground_truth: Path | None) -> dict[str, int]:
    """``EXPORT/megadepth_aerial_processed_segmentation/<scene>/<name>.png`` per image: the
    per-image segmentation AerialMegaDepth's ``MegaDepthAerial`` loader reads
    unconditionally (``<ROOT>_segmentation/<scene>/<name>.png``, 8-bit, ADE20k labels; it
    zeroes the depth where the label is 2, sky). :data:`ADE20K_SKY` where
    :func:`sky_masks` knows the pixel is sky, :data:`SEG_UNKNOWN` elsewhere. Returns
    counts (images, images with a known sky, sky pixels)."""
    out = Path(export) / SEGMENTATION / scene
    skies = sky_masks(views, ground_truth)
    counts = {"images": 0, "with ground truth": 0, "sky pixels": 0}
    for v in views:
        label = np.full((v.height, v.width), SEG_UNKNOWN, np.uint8)
        sky = skies.get(v.name)
        if sky is not None:
            label[sky] = ADE20K_SKY
            counts["with ground truth"] += 1
            counts["sky pixels"] += int(sky.sum())
        ok, png = cv2.imencode(".png", label)
        if not ok:  # pragma: no cover - cv2 always encodes uint8
            raise OSError(f"{out / v.name}.png: cv2 could not encode PNG")
        write_bytes_atomic(out / f"{v.name}.png", png.tobytes())
        counts["images"] += 1
    return counts


# ----------------------------------------------------------------------------- picture


def picture(views: list[covisibility.View], cov: np.ndarray, is_aerial: np.ndarray, score: np.ndarray, product: Path,
            scene: str, tol: float) -> tuple[bytes, dict[str, Any] | None]:
    """The covisibility matrix (aerial frames first) and the aerial-ground pair of highest
    score with the photo's covisible pixels and where they land in the frame."""
    # matplotlib only when a picture is drawn (pyplot: 2.5 s to import on the shared 2-core machine)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.r_[np.nonzero(is_aerial)[0], np.nonzero(~is_aerial)[0]]
    # fixed margins: constrained/tight layouts cost seconds per picture on a busy machine
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), dpi=80, gridspec_kw={"width_ratios": [1, 1.3, 1.3]})
    # titles on two short lines each, with room above the axes: one line ran past the figure's edge
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.08, top=0.86, wspace=0.12)
    shown = None
    try:
        m = np.where(cov[np.ix_(order, order)] < 0, np.nan, cov[np.ix_(order, order)])
        im = axes[0].imshow(m, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        na = int(is_aerial.sum())
        for x in (na - 0.5,):
            axes[0].axhline(x, color="w", lw=0.8)
            axes[0].axvline(x, color="w", lw=0.8)
        axes[0].set_title(f"scene {scene}: covisibility i->j\n({na} aerial, {len(views) - na} ground; "
                          "white: no depth)", fontsize=9)
        axes[0].set_xlabel("j")
        axes[0].set_ylabel("i")
        fig.colorbar(im, ax=axes[0], shrink=0.8, pad=0.02)
        ag = np.where(np.outer(~is_aerial, is_aerial), score, -1.0)
        if ag.size and ag.max() > 0:
            g, a = np.unravel_index(np.argmax(ag), ag.shape)
            vg, va = views[g], views[a]
            dg, da = read_depth_h5(vg.depth_file), read_depth_h5(va.depth_file)
            rc, uv = covisibility.covisible_pixels(vg, dg, va, da, tol)
            img_g = plt.imread(Path(product) / "images" / vg.name)
            img_a = plt.imread(Path(product) / "images" / va.name)
            axes[1].imshow(img_g)
            mask = np.zeros(dg.shape, bool)
            mask[rc[:, 0], rc[:, 1]] = True
            axes[1].imshow(np.ma.masked_where(~mask, mask), cmap="autumn", alpha=0.45, vmin=0, vmax=1)
            axes[1].set_title(f"ground {vg.name}:\ncovisible pixels ({100 * cov[g, a]:.0f} % of its depth)",
                              fontsize=9)
            axes[2].imshow(img_a)
            step = max(1, len(uv) // 3000)
            axes[2].scatter(uv[::step, 0], uv[::step, 1], s=1, c="orange", alpha=0.5)
            axes[2].set_title(f"aerial {va.name}: where they land\n(score {score[g, a]:.2f}, "
                              f"{100 * cov[a, g]:.0f} % of the frame's depth seen back)", fontsize=9)
            shown = {"ground": vg.name, "aerial": va.name, "score": float(score[g, a]),
                     "ground->aerial": float(cov[g, a]), "aerial->ground": float(cov[a, g])}
        else:
            axes[1].set_title("no aerial-ground pair with overlap")
        for ax in axes[1:]:
            ax.axis("off")
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue(), shown
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- per scene


def reference_names(scene_dir: Path) -> set[str]:
    """Names of the aerial (Earth Studio) images: those of the reference model."""
    ref = Path(scene_dir) / WORK / REFERENCE_EMPTY
    if not (ref / "images.txt").exists():
        return set()
    return {im.name for im in pycolmap.Reconstruction(str(ref)).images.values()}


def covisibility_work(export: Path, scene: str) -> Path:
    return Path(export) / "work" / scene


def export_scene(export: Path, scene: str, product: Path, aerial: set[str], plan: covisibility.Plan,
                 config: ExportConfig, features: dict[str, Any] | None = None,
                 ground_truth: Path | None = None) -> dict[str, Any]:
    """Every per-scene file (see the module docstring) from the product and the computed
    covisibility blocks of ``plan``. Returns the scene's entry of the dataset index.
    Skipped (the entry read back) when the entry's key matches the product, the settings,
    the ground truth and the features, and every file matches the entry's record of it
    (``files``: :mod:`tasks.common.trusted`); otherwise exported again, the files of images
    no longer in the product removed. ``ground_truth``: the synthetic world's
    ``ground_truth/<scene>`` (sky in the segmentation), None for real scenes. Raises
    :class:`EmptyScene` for a product without a registered image."""
    export = Path(export)
    product = Path(product)
    # the ground truth's depths decide the segmentation's sky
    gt_depths = Path(ground_truth) / "depths" if ground_truth else None
    gt = fingerprint(None, gt_depths, pattern="*.h5", length=12) if gt_depths and gt_depths.is_dir() else "none"
    key = f"{FORMAT}-{plan.key}-{config.fingerprint()}-{gt}-{json.dumps(features or {}, sort_keys=True)}"
    entry_path = export / "work" / scene / "scene.json"
    old = _read_entry(entry_path)
    if not plan.views:
        entry_path.unlink(missing_ok=True)  # the index no longer lists what the scene had
        raise EmptyScene(f"scene {scene}: the product {product} has no registered image (sparse-txt/images.txt); "
                         "nothing to export: check the scene's dense and export stages")
    if old.get("key") == key:
        bad = trusted.problems(export, old.get("files"))
        if not bad:
            aerialmegadepth_layout(export, scene, product)  # links only: remade if deleted
            return {**old, "skipped": True}
        log.warning("scene %s: training files changed since they were written (%s%s); exporting the scene again",
                    scene, "; ".join(bad[:3]), f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    views = plan.views
    strict, known = covisibility.matrices(plan)
    cov = strict if config.score_matrix == "covisibility" else known
    n = len(views)
    is_aerial = np.array([v.name in aerial for v in views])
    image_paths: list[str | None] = []
    depth_paths: list[str | None] = []
    for v in views:
        src = product / "images" / v.name
        if src.exists():
            rel = f"images/{scene}/{v.name}"
            _link_file(src, export / rel)
            image_paths.append(rel)
        else:
            image_paths.append(None)
        if v.depth_file is not None and image_paths[-1] is not None:
            rel = f"depths/{scene}/{image_stem(Path(v.name).name)}.h5"
            _link_file(v.depth_file, export / rel)
            depth_paths.append(rel)
        else:
            depth_paths.append(None)
    info = scene_info(product, views, image_paths, depth_paths)
    names = np.array([v.name for v in views])
    write_npz_atomic(export / "scene_info" / f"{scene}.npz", **info)
    score = pair_scores(cov, config.pair_score)
    write_npz_atomic(export / "covisibility" / f"{scene}.npz", names=names, is_aerial=is_aerial, covisibility=strict,
           known=known, score_matrix=np.str_(config.score_matrix), score=score.astype(np.float32), candidates=np.asarray(plan.pairs, np.int32).reshape(-1, 2),
           rel_tolerance=np.float64(config.covisibility.rel_tolerance),
           stride=np.int64(config.covisibility.stride), pair_score=np.str_(config.pair_score))
    id2d = list(info["points3D_id_to_2D"])
    ranges = {}
    for lo, hi in config.ranges:
        ij = pairs_in_range(score, lo, hi)
        pi = np.empty((len(ij), 3), dtype=object)
        for m, (i, j) in enumerate(ij):
            pi[m, 0] = (int(i), int(j))
            pi[m, 1] = float(score[i, j])
            pi[m, 2] = central_matches(id2d, int(i), int(j))
        kinds = pair_kinds(is_aerial, ij[:, 0], ij[:, 1]) if len(ij) else np.zeros(0, np.uint8)
        fname = f"{scene}_{lo:g}_{hi:g}.npz"
        write_pair_infos(export / "pair_infos" / fname, image_paths=info["image_paths"],
                         depth_paths=info["depth_paths"], intrinsics=info["intrinsics"], poses=info["poses"],
                         pair_infos=pi, pair_kinds=kinds)
        ranges[f"{lo:g}-{hi:g}"] = {"file": f"pair_infos/{fname}", "pairs": int(len(ij)),
                                    "aerial-ground": int((kinds == 1).sum())}
    aerialmegadepth_layout(export, scene, product)
    previous = old.get("files") if isinstance(old.get("files"), dict) else None
    dust3r_names = (dust3r_layout(export, scene, product, views, config.dust3r_max_depth, previous)
                    if config.dust3r else [])
    segmentation = segmentation_layout(export, scene, views, ground_truth)
    png, shown = picture(views, cov, is_aerial, score, product, scene, config.covisibility.rel_tolerance)
    write_bytes_atomic(export / "pictures" / f"{scene}_covisibility.png", png)
    iu = np.triu_indices(n, 1)
    s = score[iu]
    entry = {
        "scene": scene, "images": n, "aerial images": int(is_aerial.sum()),
        "images with depth": int(sum(d is not None for d in depth_paths)),
        "product": os.path.relpath(product, export), "scene_info": f"scene_info/{scene}.npz",
        "covisibility": f"covisibility/{scene}.npz", "picture": f"pictures/{scene}_covisibility.png",
        "aerialmegadepth": f"aerialmegadepth/{scene}", "dust3r images": len(dust3r_names),
        "segmentation": {"folder": f"{SEGMENTATION}/{scene}", **segmentation},
        "pairs": {**plan.counts, "with overlap": int((s > 0).sum())}, "ranges": ranges,
        "picture pair": shown, "features": features or {}, "key": key,
    }
    entry["files"] = _scene_record(export, scene, entry, views, image_paths, depth_paths, dust3r_names)
    removed = _prune(export, scene, entry["files"])
    if removed:
        log.info("scene %s: %d training files of images no longer in the product removed", scene, removed)
    write_json_atomic(entry_path, entry, indent=1)  # last: the record of the files above
    return entry


class EmptyScene(ValueError):
    """A product without any registered image: the scene is reported and left out."""


def _read_entry(path: Path) -> dict[str, Any]:
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none, or half-written by a killed run: the scene is exported again
    return old if isinstance(old, dict) else {}


#: The folders that hold one scene's files only (pruned to the scene's record).
def _scene_folders(export: Path, scene: str) -> list[Path]:
    return [export / "images" / scene, export / "depths" / scene, export / "dust3r" / scene / DUST3R_SUBSCENE,
            export / SEGMENTATION / scene]


def is_partial(f: Path) -> bool:
    """A temporary file of :func:`tasks.common.atomic.atomic_path` (a writer's, not the scene's)."""
    return f.name.startswith(".") and PARTIAL in f.name


def _scene_record(export: Path, scene: str, entry: dict[str, Any], views: list[covisibility.View],
                  image_paths: list[str | None], depth_paths: list[str | None], dust3r_names: list[str]) -> dict:
    """The record (:mod:`tasks.common.trusted`) of every file this export of the scene
    wrote: content digests of the files made here, sizes of the links to the product's
    files (a hard link shares the product's bytes)."""
    made = [entry["scene_info"], entry["covisibility"], entry["picture"]]
    made += [r["file"] for r in entry["ranges"].values()]
    made += [f"{SEGMENTATION}/{scene}/{v.name}.png" for v in views]
    dust = f"dust3r/{scene}/{DUST3R_SUBSCENE}"
    made += [f"{dust}/{n}{ext}" for n in dust3r_names for ext in (".exr", ".npz")]
    links = [p for p in image_paths + depth_paths if p is not None] + [f"{dust}/{n}.jpg" for n in dust3r_names]
    return {**trusted.record(export, links, content=False), **trusted.record(export, made)}


def _prune(export: Path, scene: str, record: dict[str, Any]) -> int:
    """Remove the files of the scene's own folders that the new record does not list (links
    to photos that dropped out of the product, their depths, DUSt3R files, segmentations)."""
    n = 0
    for folder in _scene_folders(export, scene):
        if not folder.is_dir():
            continue
        for f in sorted(folder.rglob("*")):
            if f.is_file() and f.relative_to(export).as_posix() not in record and not is_partial(f):
                f.unlink()
                n += 1
    return n


# ----------------------------------------------------------------------------- dataset level


def _pairs_struct(rows: list[tuple[int, int, int, float]]) -> np.ndarray:
    dt = np.dtype([("scene_id", np.int32), ("im1_id", np.int32), ("im2_id", np.int32), ("score", np.float32)])
    return np.array(rows, dtype=dt) if rows else np.zeros(0, dtype=dt)


def scene_entries(export: Path) -> list[dict[str, Any]]:
    """The index entries of every scene exported under ``export`` (this run's and earlier
    runs'): ``work/<scene>/scene.json``."""
    out = []
    for f in sorted((Path(export) / "work").glob("*/scene.json")):
        try:
            out.append(json.loads(f.read_text()))
        except ValueError:
            continue  # half-written by a killed run: the scene is exported again next time
    return out


def _trusted_entries(export: Path, entries: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The entries whose covisibility file (what the index reads) matches the scene's record;
    the others are left out of the index with the reason (the scene's next export writes
    them again), so one damaged scene never breaks the index of the others."""
    ok, left_out = [], {}
    for e in entries:
        scene = str(e.get("scene"))
        rel = e.get("covisibility")
        rec = e.get("files") if isinstance(e.get("files"), dict) else {}
        bad = trusted.problems(export, {rel: rec[rel]} if rel in rec else None)
        if bad:
            why = "; ".join(bad) if rel in rec else "no record of its files (exported by an older version)"
            left_out[scene] = f"{why}: run the scene again to export it"
            log.warning("scene %s left out of the training index: %s", scene, left_out[scene])
        else:
            ok.append(e)
    return ok, left_out


def export_dataset(export: Path, entries: list[dict[str, Any]] | None, config: ExportConfig,
                   min_score: float | None = None) -> dict[str, Any]:
    """``index.json``, ``dust3r/all_metadata.npz`` and ``aerialmegadepth_pairs.npz`` over
    every exported scene (``entries``, default :func:`scene_entries`): pairs with a score above ``min_score`` (default: the lowest
    range's lower bound), with ``pair_kind`` (0 aerial-aerial, 1 aerial-ground, 2
    ground-ground) alongside."""
    export = Path(export)
    entries = scene_entries(export) if entries is None else entries
    entries, left_out = _trusted_entries(export, entries)
    lo = min(r[0] for r in config.ranges) if min_score is None else min_score
    scenes, images, images_scene, rows, kinds = [], [], [], [], []
    d_scenes, d_images, d_rows = [], [], []
    for e in sorted(entries, key=lambda x: x["scene"]):
        scene = e["scene"]
        with np.load(export / e["covisibility"]) as z:
            names, is_aerial, score = list(z["names"]), z["is_aerial"], z["score"]
        sid = len(scenes)
        scenes.append(scene)
        base = len(images)
        images.extend(names)
        images_scene.extend([scene] * len(names))
        ij = pairs_in_range(score, lo, 1.0)
        k = pair_kinds(is_aerial, ij[:, 0], ij[:, 1]) if len(ij) else np.zeros(0, np.uint8)
        rows.extend((sid, base + int(i), base + int(j), float(score[i, j])) for i, j in ij)
        kinds.extend(k.tolist())
        # DUSt3R: only images with all three files (those with depth)
        dust = export / "dust3r" / scene / DUST3R_SUBSCENE
        have = [n for n in names if (dust / f"{n}.npz").exists()]
        if have:
            dsid = len(d_scenes)
            d_scenes.append(f"{scene} {DUST3R_SUBSCENE}")
            dbase = len(d_images)
            d_images.extend(have)
            pos = {n: dbase + m for m, n in enumerate(have)}
            d_rows.extend((dsid, pos[names[i]], pos[names[j]], float(score[i, j])) for i, j in ij
                          if names[i] in pos and names[j] in pos)
    kinds_a = np.asarray(kinds, np.uint8)
    write_npz_atomic(export / "aerialmegadepth_pairs.npz", scenes=np.array(scenes, dtype=object),
           images=np.array(images, dtype=object), images_scene_name=np.array(images_scene, dtype=object),
           pairs=_pairs_struct(rows), pair_kind=kinds_a, kind_names=np.array([KINDS[k] for k in sorted(KINDS)]))
    if config.dust3r:
        write_npz_atomic(export / "dust3r" / "all_metadata.npz", scenes=np.array(d_scenes, dtype=str),
               images=np.array(d_images, dtype=str), pairs=_pairs_struct(d_rows))
    features = {json.dumps(e.get("features", {}), sort_keys=True) for e in entries}
    index = {
        "format": FORMAT, "root": ".",
        "scenes": {e["scene"]: e for e in entries},
        "scenes left out": left_out,
        "features used": [json.loads(f) for f in sorted(features)],
        "settings": config.to_dict(),
        "aerialmegadepth_pairs": {"file": "aerialmegadepth_pairs.npz", "pairs": len(rows),
                                  "aerial-ground": int((kinds_a == 1).sum()), "min score (exclusive)": lo},
        "dust3r": {"file": "dust3r/all_metadata.npz", "pairs": len(d_rows)} if config.dust3r else None,
        "readers": {
            "glue-factory": {"data_dir": ".", "info_dir": "scene_info/", "image_subpath": "images/",
                             "depth_subpath": "depths/"},
            "d2-net": {"scene_info_path": "scene_info", "base_path": "."},
            "loftr": {"root_dir": ".", "npz_root": "pair_infos"},
            # preprocess_aerialmegadepth.py's arguments (its current get_parser), then its
            # sample loader MegaDepthAerial on the output (segmentation: SEGMENTATION/)
            "aerialmegadepth": {"--megadepth_aerial_dir": "aerialmegadepth",
                                "--precomputed_pairs": "aerialmegadepth_pairs.npz",
                                "--output_dir": AMD_PROCESSED,
                                "MegaDepthAerial": {"ROOT": AMD_PROCESSED,
                                                    "split_file": "../aerialmegadepth_pairs.npz"}},
            "dust3r": {"ROOT": "dust3r"},
        },
    }
    write_json_atomic(export / "index.json", index, indent=1)
    return index


__all__ = ["ExportConfig", "export_config", "scene_info", "pair_scores", "pair_kinds", "pairs_in_range",
           "central_matches", "aerialmegadepth_layout", "dust3r_layout", "picture", "reference_names",
           "covisibility_work", "export_scene", "sky_masks", "segmentation_layout", "SEGMENTATION",
           "AMD_PROCESSED", "write_pair_infos", "read_pair_infos", "export_dataset", "scene_entries", "AMD_SFM_FOLDER", "KINDS"]
