"""Configuration of the multimodal flow, with named presets (as hloc's confs).

A :class:`MultimodalConfig` is the single parameter of the flow, so the
Prefect UI renders it as a form and deployments store it as JSON. Named
presets live in :data:`CONFIGS`; ``python -m flows.multimodal --config NAME``
picks one and ``--set key=value`` overrides fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from tasks.multimodal import schema


class DaskSettings(BaseModel):
    """Where tasks run (see tasks.common.runtime.DaskConfig)."""

    address: str | None = Field(None, description="existing Dask scheduler, e.g. tcp://host:8786")
    cluster_class: str | None = Field(None, description="cluster class import path, e.g. dask_jobqueue.SLURMCluster")
    cluster_kwargs: dict[str, Any] = Field(default_factory=dict)
    adapt_kwargs: dict[str, Any] | None = None
    n_workers: int | None = Field(None, description="local workers (default: CPU count)")
    threads_per_worker: int = 1
    memory_limit: str | None = None
    gpus_per_worker: int | None = Field(None, description="Dask GPU resource per worker (default: detect)")

    def to_runtime(self):
        from tasks.common.runtime import DaskConfig

        return DaskConfig(**self.model_dump())


class MultimodalConfig(BaseModel):
    """Everything the MMEarth flow needs to build one dataset."""

    name: str = Field("data_embedded_v001", description="dataset name; must start with data_")
    output_dir: str = Field("output", description="parent folder; the dataset goes to OUTPUT_DIR/NAME")
    # tiles
    regions: str | None = Field(None, description="ecoregion polygons GeoJSON (default: the embedded regions)")
    eco_labels: str | None = Field(None, description="{ecoregion name: index} JSON (default: derived from the regions)")
    tiles_geojson: str | None = Field(None, description="use this tiles GeoJSON instead of sampling")
    tile_sampler: Literal["local", "earthengine"] = Field(
        "local", description="local: points in the regions GeoJSON; earthengine: randomPoints in RESOLVE/ECOREGIONS/2017")
    n_tiles: int = Field(256, ge=1)
    sampling_mode: Literal[0, 1, 2] = Field(0, description="0: biome equal, ecoregion by area; 1: biome equal, ecoregion equal; 2: ecoregion equal")
    tile_size_m: float = Field(1300.0, gt=0)
    seed: int = 0
    batch: int = 0
    # stacks
    source: Literal["synthetic", "earthengine"] = "synthetic"
    source_options: dict[str, Any] = Field(
        default_factory=dict,
        description="source settings; earthengine: project, credentials_block or secret_block, url, timeout_s "
                    "(never put a key here: flow parameters are stored by Prefect)")
    request_ceiling: int = Field(40, ge=1, description="Earth Engine concurrent requests allowed for the project")
    request_limit_name: str = Field("earthengine-requests", description="Prefect global concurrency limit name")
    fetch_batch_size: int = Field(16, ge=1, description="tiles per fetch task")
    fetch_threads: int = Field(1, ge=1, description="tiles fetched concurrently inside one fetch task")
    fetch_slots: int | None = Field(
        None, ge=1, description="request slots a fetch task leases (default fetch_threads, at most request_ceiling); "
                                "fetch tasks running at once x fetch_slots should not exceed request_ceiling")
    fetch_retries: int = Field(3, ge=0, description="Prefect retries of a fetch task whose tiles failed transiently")
    fetch_retry_delay_s: float = Field(4.0, ge=0, description="first retry delay; doubles each retry, with jitter")
    tasks_in_flight: int = Field(
        32, ge=1, description="fetch (and pack) tasks submitted at once; the flow holds at most this many futures "
                              "(a bounded window), so its memory does not grow with the tiles")
    stack_compress: str | None = Field(None, description="GeoTIFF compression of stacks (None, deflate, zstd, ...)")
    # post-processing
    image_size: int = Field(128, ge=8, description="128, or 64 for the MMEarth64 variant")
    part_size: int = Field(64, ge=1, description="tiles per packing partition")
    keep_parts: bool = Field(False, description="keep packed partitions after the h5 is written (uses as much disk again)")
    compression_codec: Literal["isal", "zlib"] = "isal"
    compression_level: int = Field(1, ge=0, le=9)
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_seed: int = 42
    dask: DaskSettings = Field(default_factory=DaskSettings)
    dask_block: str | None = Field(None, description="name of a saved DaskCluster block; overrides dask")

    def dask_settings(self) -> DaskSettings:
        if self.dask_block:
            from blocks.dask_cluster import DaskCluster

            return DaskCluster.load(self.dask_block).to_settings()
        return self.dask

    @field_validator("source_options")
    @classmethod
    def _no_secrets(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in v if any(w in k.lower() for w in ("key", "secret", "token", "password", "credential"))
               and k not in ("credentials_block", "secret_block")]
        if bad:
            raise ValueError(f"source_options {bad} look like credentials; flow parameters are stored and shown by "
                             "Prefect: save the key in an EarthEngineCredentials block and pass credentials_block")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return schema.check_dataset_name(v)

    @property
    def dataset_dir(self) -> Path:
        return Path(self.output_dir).expanduser().resolve() / self.name


CONFIGS: dict[str, dict[str, Any]] = {
    # The embedded default: synthetic source over the shipped regions.
    "default": {},
    # MMEarth64: 64 px images.
    "mmearth64": {"name": "data_embedded_v001_64", "image_size": 64},
    # Real Earth Engine: one request slot per fetching thread, up to the ceiling.
    # (2 workers x 1 fetch task x 20 slots = the default ceiling of 40; 28 threads keep 20 slots busy)
    "earthengine": {"name": "data_ee_v001", "source": "earthengine", "fetch_batch_size": 200, "fetch_threads": 28,
                    "fetch_slots": 20, "dask": {"n_workers": 2, "threads_per_worker": 1}},
    # A few tiles, for a quick look.
    "smoke": {"name": "data_smoke", "n_tiles": 24, "fetch_batch_size": 4, "part_size": 8},
}


def get_config(preset: str = "default", **overrides: Any) -> MultimodalConfig:
    """The named configuration ``preset`` with ``overrides`` applied (nested dicts merge)."""
    if preset not in CONFIGS:
        raise KeyError(f"unknown configuration {preset!r}; choose one of {sorted(CONFIGS)}")
    merged = dict(CONFIGS[preset])
    for k, v in overrides.items():
        merged[k] = {**merged[k], **v} if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return MultimodalConfig(**merged)
