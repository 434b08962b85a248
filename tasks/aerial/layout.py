"""The aerial scene layout, from ``downloaded_data/`` to ``ground_truth/``: the one place
that says where each file of a scene lives.

::

    <root>/downloaded_data/<scene>.mp4, <scene>.json     Earth Studio export (input)
    <root>/plans/<scene>.plan.json, <scene>.esp          planning stage
    <root>/data/<scene>/
        footage/<scene>_<NNN>.jpeg                       ingest: frames
        <scene>.json                                     ingest: the export, aligned to the frames
        ingest.json                                      ingest: the project's record
        report.json, accuracy.json, overview.png         per-scene results
        sfm_output_localization/                         work folder (SceneLayout.work)
            reference_empty/                             Earth Studio poses, no points
            images/  images.json                         frames and processed photos by model name
            <features>.h5  <retrieval>.h5                hloc layout (tasks/aerial/io.py)
            pairs-reference-poses.txt  pairs-query-retrieval.txt  pairs-query-poses.txt
            pairs-query-all.txt  pairs-all.txt
            <matches>.h5
            sfm_<tag>[-<hash>]/                          triangulated reference (+ database.db)
                localized_model_mapper_metric/           reference + registered photos, metric ENU
                dense/                                   dense workspace
                localized_dense_metric/                  the product: images/ depths/ sparse-txt/
    <root>/ground_truth/<scene>/sparse, depths/          ground truth (synthetic world)
    <megadepth_out>/<scene>/<subscene>/<name>.jpg|.exr|.npz   processed MegaDepth photos

:class:`SceneLayout` holds what does not depend on the pipeline configuration (ingest,
plans, ground truth, the work folder); :class:`ScenePaths` adds the files named after the
configuration actually used (:meth:`tasks.aerial.pipeline.PipelineConfig.folder_names`,
documented in docs/aerial_layout.md): the default configuration writes
``sfm_sift+mnn/``, as the original's layout; a configuration whose settings differ from
its named configuration gets ``sfm_<tag>-<hash>/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tasks.common import checks

DOWNLOADED = "downloaded_data"
PLANS = "plans"
DATA = "data"
GROUND_TRUTH = "ground_truth"
WORK = "sfm_output_localization"
REFERENCE_EMPTY = "reference_empty"
LOCALIZED = "localized_model_mapper_metric"
DENSE = "dense"
PRODUCT = "localized_dense_metric"
RECORD_NAME = "ingest.json"


def default_megadepth_out(root: str | Path) -> Path:
    """Where processed MegaDepth photos go when not told: ``<root>/megadepth_processed``."""
    return Path(root) / "megadepth_processed"


def default_megadepth(root: str | Path) -> Path:
    """The raw MegaDepth tree when not told: ``<root>/megadepth`` (the synthetic world's)."""
    return Path(root) / "megadepth"


def default_scene_list(megadepth: str | Path) -> Path:
    """The scene list when not told: ``<megadepth>/scene_list.json``."""
    return Path(megadepth) / "scene_list.json"


def downloaded_scenes(root: str | Path) -> list[str]:
    """Scene ids with an Earth Studio camera export in ``<root>/downloaded_data/``, sorted."""
    return sorted(p.stem for p in (Path(root) / DOWNLOADED).glob("*.json"))


@dataclass(frozen=True)
class SceneLayout:
    """Where a scene's files live, whatever the pipeline configuration."""

    root: Path
    scene: str

    def __post_init__(self) -> None:
        # every per-scene path is made here: a scene id (from a file name, a scene list, a places
        # file or the settings) must be a plain name, so that no path leaves the root
        checks.plain_name(self.scene, "scene id")

    # ---- inputs
    @property
    def downloaded(self) -> Path:
        return Path(self.root) / DOWNLOADED

    @property
    def video(self) -> Path:
        return self.downloaded / f"{self.scene}.mp4"

    @property
    def camera_export(self) -> Path:
        """Earth Studio's 3D camera tracking JSON."""
        return self.downloaded / f"{self.scene}.json"

    @property
    def plan_json(self) -> Path:
        return Path(self.root) / PLANS / f"{self.scene}.plan.json"

    @property
    def plan_esp(self) -> Path:
        return Path(self.root) / PLANS / f"{self.scene}.esp"

    # ---- ingest and per-scene results
    @property
    def scene_dir(self) -> Path:
        return Path(self.root) / DATA / self.scene

    @property
    def footage(self) -> Path:
        return self.scene_dir / "footage"

    @property
    def metadata(self) -> Path:
        """The Earth Studio export as the original's frame extraction leaves it."""
        return self.scene_dir / f"{self.scene}.json"

    @property
    def ingest_record(self) -> Path:
        return self.scene_dir / RECORD_NAME

    @property
    def report(self) -> Path:
        return self.scene_dir / "report.json"

    @property
    def accuracy(self) -> Path:
        return self.scene_dir / "accuracy.json"

    @property
    def overview(self) -> Path:
        return self.scene_dir / "overview.png"

    # ---- work folder, shared by every configuration
    @property
    def work(self) -> Path:
        return self.scene_dir / WORK

    @property
    def reference_empty(self) -> Path:
        return self.work / REFERENCE_EMPTY

    @property
    def images(self) -> Path:
        return self.work / "images"

    @property
    def image_list(self) -> Path:
        return self.work / "images.json"

    @property
    def pairs_reference(self) -> Path:
        return self.work / "pairs-reference-poses.txt"

    @property
    def pairs_retrieval(self) -> Path:
        return self.work / "pairs-query-retrieval.txt"

    @property
    def pairs_query(self) -> Path:
        return self.work / "pairs-query-poses.txt"

    @property
    def pairs_query_all(self) -> Path:
        return self.work / "pairs-query-all.txt"

    @property
    def pairs_all(self) -> Path:
        return self.work / "pairs-all.txt"

    def products(self) -> list[Path]:
        """The final products of this scene from any pipeline configuration."""
        return sorted(p for p in self.work.glob(f"*/{PRODUCT}") if p.is_dir())

    # ---- ground truth (the synthetic world writes it)
    @property
    def ground_truth(self) -> Path:
        return Path(self.root) / GROUND_TRUTH / self.scene

    @property
    def gt_sparse(self) -> Path:
        return self.ground_truth / "sparse"

    @property
    def gt_depths(self) -> Path:
        return self.ground_truth / "depths"


@dataclass(frozen=True)
class ScenePaths(SceneLayout):
    """:class:`SceneLayout` plus the files named after the pipeline configuration."""

    megadepth_out: Path = Path("megadepth_processed")
    features_name: str = "feats-sift-colmap"
    retrieval_name: str = "global-feats-vlad"
    matches_name: str = "feats-sift-colmap_matches-NN-mutual-ratio.8_pairs-all"
    sfm_name: str = "sfm_sift+mnn"

    @property
    def megadepth_scene(self) -> Path:
        """Processed MegaDepth photos of the scene: ``<megadepth_out>/<scene>/<subscene>/``."""
        return Path(self.megadepth_out) / self.scene

    @property
    def features(self) -> Path:
        return self.work / f"{self.features_name}.h5"

    @property
    def global_features(self) -> Path:
        return self.work / f"{self.retrieval_name}.h5"

    @property
    def matches(self) -> Path:
        return self.work / f"{self.matches_name}.h5"

    @property
    def sfm(self) -> Path:
        return self.work / self.sfm_name

    @property
    def localized(self) -> Path:
        return self.sfm / LOCALIZED

    @property
    def dense(self) -> Path:
        return self.sfm / DENSE

    @property
    def product(self) -> Path:
        return self.sfm / PRODUCT


def scene_paths(root: str | Path, scene: str, megadepth_out: str | Path | None, config) -> ScenePaths:
    """The paths of ``scene`` under ``root`` for a pipeline configuration (anything with a
    ``folder_names()`` mapping ``features``, ``retrieval``, ``matches``, ``sfm`` to names)."""
    names: Mapping[str, str] = config.folder_names()
    md = Path(megadepth_out) if megadepth_out is not None else default_megadepth_out(root)
    return ScenePaths(Path(root), scene, md, features_name=names["features"], retrieval_name=names["retrieval"],
                      matches_name=names["matches"], sfm_name=names["sfm"])
