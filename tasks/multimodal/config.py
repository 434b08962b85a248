"""Configuration of the multimodal flow, with named presets (as hloc's confs).

A :class:`MultimodalConfig` is the single parameter of the flow, so the
Prefect UI renders it as a form and deployments store it as JSON. Named
configurations live in :data:`CONFIGS` (the one mechanism of :mod:`tasks.common.config`);
``python -m flows.multimodal --config NAME`` picks one and ``--set key=value`` overrides fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from tasks.common import checks
from tasks.common.cli import check_output_folder
from tasks.common.config import ConfigError, NamedConfigs
from tasks.common.flow_config import DaskBlockField, DaskField, FlowConfig
from tasks.common.forms import grouped_titles
from tasks.multimodal import schema
from tasks.multimodal import tiles

#: The sampling modes by name (the form shows these) and MMEarth's number of each.
SAMPLING_MODE_INDEX: dict[str, int] = {"biome-area": 0, "biome-equal": 1, "ecoregion-equal": 2}
SamplingModeName = Literal["biome-area", "biome-equal", "ecoregion-equal"]

STACK_RESOLUTION_M = 10.0  # metres per pixel of every stack (sources.base.Grid.for_tile)

__all__ = ["CONFIGS", "MultimodalConfig", "get_config"]


class MultimodalConfig(FlowConfig):
    """Everything the MMEarth flow needs to build one dataset (the rules and the cluster
    settings ``dask``/``dask_block``: :class:`tasks.common.flow_config.FlowConfig`)."""

    # form labels read "Group · field"
    model_config = ConfigDict(field_title_generator=grouped_titles({
        "Dataset": ["name", "output_dir"],
        "Tiles": ["regions", "eco_labels", "tiles_geojson", "tile_sampler", "n_tiles", "sampling_mode",
                  "tile_size_m", "seed", "batch"],
        "Stacks": ["source", "source_options", "request_ceiling", "request_rate", "request_limit_name",
                   "fetch_batch_size", "fetch_threads", "fetch_slots", "fetch_retries", "fetch_retry_delay_s", "tasks_in_flight",
                   "stack_compress"],
        "Packing": ["image_size", "part_size", "keep_parts", "compression_codec", "compression_level"],
        "Splits": ["split_fractions", "split_seed"],
        "Cluster": ["dask", "dask_block"],
    }))

    name: str = Field("data_embedded_v001", description="dataset name; must start with data_")
    output_dir: str = Field("output", description="parent folder; the dataset goes to OUTPUT_DIR/NAME")
    # tiles
    regions: str | None = Field(None, description="ecoregion polygons GeoJSON (default: the embedded regions)")
    eco_labels: str | None = Field(None, description="{ecoregion name: index} JSON (default: derived from the regions)")
    tiles_geojson: str | None = Field(None, description="use this tiles GeoJSON instead of sampling")
    tile_sampler: Literal["local", "earthengine"] = Field(
        "local", description="local: points in the regions GeoJSON; earthengine: randomPoints in RESOLVE/ECOREGIONS/2017")
    n_tiles: int = Field(256, ge=1, le=10_000_000, description="tiles to sample (1 to 10 million; MMEarth has 1.2 "
                                                                 "million)")
    sampling_mode: SamplingModeName = Field(
        "biome-area", description="how tiles are shared out (MMEarth's modes 0, 1, 2): "
        + "; ".join(f"{name} ({i}): {tiles.SAMPLING_MODES[i]}" for name, i in SAMPLING_MODE_INDEX.items()))
    tile_size_m: float = Field(1300.0, gt=0, le=10240.0, description="side of a square tile in metres (at 10 m per "
                               "pixel, 1280 m gives 128 px; at most 10240 m)")
    seed: int = Field(0, description="random seed of the tile sampling")
    batch: int = Field(0, description="sampling batch: another seed stream for adding tiles to a dataset")
    # stacks
    source: Literal["synthetic", "earthengine", "stac"] = Field(
        "synthetic", description="where stacks come from: synthetic (embedded, offline), earthengine (real data, "
                                 "an Earth Engine account) or stac (public COGs behind a STAC API, no account)")
    source_options: dict[str, Any] = Field(
        default_factory=dict,
        description="source settings; earthengine: project, credentials_block or secret_block, url, timeout_s; stac: "
                    "api_url (default Planetary Computer's), sign (default: on for Planetary Computer) "
                    "(never put a key here: flow parameters are stored by Prefect)")
    request_ceiling: int = Field(40, ge=1, description="concurrent requests allowed (Earth Engine: for the project; "
                                                       "stac: to the STAC API and COG hosts)")
    request_rate: float | None = Field(
        100.0, gt=0, description="Earth Engine requests per second for the project (its documented quota: 100/s); "
                                 "each worker process paces its requests at this rate times its share of "
                                 "request_ceiling's slots; empty: not paced")
    request_limit_name: str = Field("earthengine-requests", description="Prefect global concurrency limit name "
                                                                        "(the stac preset: stac-requests)")
    fetch_batch_size: int = Field(16, ge=1, le=100_000, description="tiles per fetch task (1-100000)")
    fetch_threads: int = Field(1, ge=1, le=256, description="tiles fetched concurrently inside one fetch task (1-256)")
    fetch_slots: int | None = Field(
        None, ge=1, description="request slots a Dask worker leases for its fetch tasks, shared by the tasks "
                                "running in it (default fetch_threads, at most request_ceiling); workers x "
                                "fetch_slots should not exceed request_ceiling")
    fetch_retries: int = Field(3, ge=0, le=20, description="Prefect retries of a fetch task whose tiles failed "
                                                           "transiently (0-20)")
    fetch_retry_delay_s: float = Field(4.0, ge=0, le=3600, description="first retry delay (0-3600 s); doubles each "
                                                                       "retry, with jitter")
    tasks_in_flight: int = Field(
        32, ge=1, le=10000, description="fetch (and pack) tasks submitted at once (1-10000); the flow keeps "
                                        "this many waiting, so more keeps a large cluster busy")
    stack_compress: str | None = Field(None, description="GeoTIFF compression of stacks (None, deflate, zstd, ...)")
    # post-processing
    image_size: int = Field(128, ge=8, le=1024, description="side of the dataset's images in pixels: 128, or 64 for "
                                                            "MMEarth64 (8-1024)")
    part_size: int = Field(64, ge=1, le=100_000, description="tiles per packing partition (1-100000)")
    keep_parts: bool = Field(False, description="keep packed partitions after the h5 is written (uses as much disk again)")
    compression_codec: Literal["isal", "zlib"] = Field(
        "isal", description="gzip encoder of the h5 rows: isal (same gzip streams, ~10x faster) or zlib")
    compression_level: int = Field(1, ge=0, le=9, description="gzip level of the h5 rows")
    split_fractions: tuple[float, float, float] = Field((0.8, 0.1, 0.1), description="train, val, test fractions "
                                                        "(each in [0, 1], summing to 1)")
    split_seed: int = Field(42, description="random seed of the splits")
    dask: DaskField
    dask_block: DaskBlockField = None

    @model_validator(mode="after")
    def _cross_field(self) -> "MultimodalConfig":
        fr = self.split_fractions
        if any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions {list(fr)} must be three non-negative fractions (train, val, "
                             f"test) that sum to 1 (they sum to {sum(fr):g})")
        pixels = int(round(self.tile_size_m / STACK_RESOLUTION_M))
        if self.image_size > pixels:
            raise ValueError(f"image_size {self.image_size} px does not fit a tile of {self.tile_size_m:g} m "
                             f"({pixels} px at {STACK_RESOLUTION_M:g} m/px): raise tile_size_m to at least "
                             f"{self.image_size * STACK_RESOLUTION_M:g} or lower image_size")
        if self.tile_sampler == "earthengine" and self.source != "earthengine":
            raise ValueError("tile_sampler=earthengine needs source=earthengine (its credentials and project)")
        if self.fetch_slots is not None and self.fetch_slots > self.request_ceiling:
            raise ValueError(f"fetch_slots {self.fetch_slots} exceeds request_ceiling {self.request_ceiling}: "
                             "one fetch task would wait forever for slots that do not exist")
        return self

    def check_inputs(self) -> None:
        """Read the input files this configuration names (regions, eco_labels, tiles) and raise one
        :class:`ConfigError` naming the file and field on the first mistake. Cheap: run it before
        starting any server or cluster."""
        try:
            regions, _ = tiles.load_regions_split(Path(self.regions) if self.regions
                                                      else tiles.DEFAULT_REGIONS)
            eco_index = tiles.eco_region_index(regions, self.eco_labels)
            if self.tiles_geojson:
                missing = sorted({t.eco_region for t in tiles.read_tiles_geojson(self.tiles_geojson)}
                                 - set(eco_index))
                if missing and self.tile_sampler != "earthengine":
                    raise ConfigError(f"{self.tiles_geojson}: ecoregion(s) {missing[:5]} have no index; "
                                      "pass eco_labels with a {name: index} mapping")
        except (ValueError, OSError) as exc:
            raise ConfigError(str(exc)) from None
        check_output_folder(self.dataset_dir, "output_dir")

    @field_validator("sampling_mode", mode="before")
    @classmethod
    def _mode_name(cls, v: Any) -> Any:
        """MMEarth's numbers (0, 1, 2) are accepted and stored by name."""
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool):
            names = {i: n for n, i in SAMPLING_MODE_INDEX.items()}
            if v not in names:
                raise ValueError(f"sampling_mode {v} must be one of {sorted(names)} or a name {list(SAMPLING_MODE_INDEX)}")
            return names[v]
        return v

    @property
    def sampling_mode_index(self) -> int:
        """The sampling mode as MMEarth's number (0, 1, 2)."""
        return SAMPLING_MODE_INDEX[self.sampling_mode]

    @field_validator("source_options")
    @classmethod
    def _no_secrets(cls, v: dict[str, Any]) -> dict[str, Any]:
        for k, x in v.items():  # numbers here (timeout_s, ...) follow the shared rule: finite, not booleans
            if isinstance(x, float):
                checks.number(x, f"source_options.{k}", lo=0)
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


#: Named configurations (``--config NAME``), one line each; fields not given are the defaults.
CONFIGS = NamedConfigs("configuration", MultimodalConfig, {
    # The embedded default: synthetic source over the shipped regions.
    "default": {},
    # MMEarth64: 64 px images.
    "mmearth64": {"name": "data_embedded_v001_64", "image_size": 64},
    # Real Earth Engine: 2 workers x 20 slots = the default ceiling of 40; 28 threads per task keep 20 slots
    # busy; 2 Dask threads per worker, so that a second fetch task takes over the slots of a draining one.
    "earthengine": {"name": "data_ee_v001", "source": "earthengine", "fetch_batch_size": 200, "fetch_threads": 28,
                    "fetch_slots": 20, "dask": {"n_workers": 2, "threads_per_worker": 2}},
    # Public COGs behind a STAC API (Planetary Computer by default; source_options.api_url for another):
    # 2 workers x 8 slots = a ceiling of 16 requests in flight; 12 threads per task keep 8 slots busy.
    "stac": {"name": "data_stac_v001", "source": "stac", "request_limit_name": "stac-requests", "request_ceiling": 16,
             "fetch_batch_size": 32, "fetch_threads": 12, "fetch_slots": 8, "dask": {"n_workers": 2, "threads_per_worker": 2}},
    # A few tiles, for a quick look.
    "smoke": {"name": "data_smoke", "n_tiles": 24, "fetch_batch_size": 4, "part_size": 8},
})

#: The named configuration ``name`` (default: "default") with overrides (nested dicts merge).
get_config = CONFIGS.build
