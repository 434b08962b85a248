"""The MMEarth output format, as constants: the h5 datasets, band names and dtypes,
no-data values and the JSON files of the original MMEarth-data release (README.md,
"The multimodal flow" and "Output").

Everything that describes *what* the dataset looks like lives here, so the
stages (sources, conversion, statistics) agree on one definition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# --------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------
BIOMES: tuple[str, ...] = (
    "Tundra",
    "Tropical & Subtropical Moist Broadleaf Forests",
    "Mediterranean Forests, Woodlands & Scrub",
    "Deserts & Xeric Shrublands",
    "Temperate Grasslands, Savannas & Shrublands",
    "Boreal Forests/Taiga",
    "Temperate Conifer Forests",
    "Temperate Broadleaf & Mixed Forests",
    "Montane Grasslands & Shrublands",
    "Mangroves",
    "Flooded Grasslands & Savannas",
    "Tropical & Subtropical Grasslands, Savannas & Shrublands",
    "Tropical & Subtropical Dry Broadleaf Forests",
    "Tropical & Subtropical Coniferous Forests",
)
BIOME_INDEX: dict[str, int] = {name: i for i, name in enumerate(BIOMES)}
#: Biomes present in RESOLVE that MMEarth does not sample.
UNSAMPLED_BIOMES: frozenset[str] = frozenset({"Rock & Ice", "N/A"})
N_BIOMES = len(BIOMES)  # 14
N_ECOREGIONS = 846

# --------------------------------------------------------------------------
# Per-tile GeoTIFF stack: band groups in file order (as the original export)
# --------------------------------------------------------------------------
#: Keys of tile_info["BANDS"], in the order their bands appear in the GeoTIFF.
STACK_GROUPS: tuple[str, ...] = (
    "sentinel2",
    "sentinel1_asc",
    "sentinel1_desc",
    "aster",
    "dynamic_world",
    "canopy_height_eth",
    "esa_worldcover",
)

#: Sentinel-2 band names as exported, per product (original config order:
#: spectral bands resampled bilinear, then the nearest-resampled masks).
S2_BANDS_L2A: tuple[str, ...] = (
    "B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8A", "B8", "B9", "B11", "B12",
    "MSK_CLDPRB", "SCL", "QA60",
)
S2_BANDS_L1C: tuple[str, ...] = (
    "B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8A", "B8", "B9", "B10", "B11", "B12",
    "QA60",
)
S2_SPECTRAL: tuple[str, ...] = (
    "B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8A", "B8", "B9", "B10", "B11", "B12",
)
S1_POLARISATIONS: tuple[str, ...] = ("VV", "VH", "HH", "HV")
ASTER_BANDS: tuple[str, ...] = ("elevation", "slope")
DYNAMIC_WORLD_BANDS: tuple[str, ...] = ("label",)
CANOPY_BANDS: tuple[str, ...] = ("height", "std")
WORLDCOVER_BANDS: tuple[str, ...] = ("Map",)

#: ESA WorldCover v100 class codes.
WORLDCOVER_CLASSES: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
#: Dynamic World V1 labels 0..8 (water, trees, grass, flooded_vegetation,
#: crops, shrub_and_scrub, built, bare, snow_and_ice); stored +1 in the h5.
DYNAMIC_WORLD_CLASSES: tuple[int, ...] = tuple(range(9))
#: Sentinel-2 L2A scene classification codes 0..11.
SCL_CLASSES: tuple[int, ...] = tuple(range(12))

#: ERA5-Land monthly aggregate bands, in the order of each era5 4-vector.
ERA5_BANDS: tuple[str, ...] = (
    "temperature_2m", "temperature_2m_min", "temperature_2m_max", "total_precipitation_sum",
)
S2_TYPES: tuple[str, ...] = ("l2a", "l1c")


def band_description(group: str, band: str) -> str:
    """Name written into the GeoTIFF band description for a band of a group."""
    return f"{group}/{band}"


def stack_band_descriptions(bands: dict[str, list[str] | None]) -> list[str]:
    """File-order band descriptions implied by a tile_info ``BANDS`` dict."""
    out: list[str] = []
    for group in STACK_GROUPS:
        for band in bands.get(group) or ():
            out.append(band_description(group, band))
    return out


# --------------------------------------------------------------------------
# The HDF5 datasets
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class H5Dataset:
    name: str
    channels: int  # 0 for 1-D per-row vectors handled specially (metadata)
    dtype: np.dtype
    spatial: bool  # (N, C, S, S) if True else (N, C)
    fill: float | int | None  # value written where data is missing


H5_DATASETS: tuple[H5Dataset, ...] = (
    H5Dataset("sentinel2", 13, np.dtype("uint16"), True, 0),
    H5Dataset("sentinel2_cloudmask", 1, np.dtype("uint16"), True, 65535),
    H5Dataset("sentinel2_cloudprod", 1, np.dtype("uint16"), True, 65535),
    H5Dataset("sentinel2_scl", 1, np.dtype("uint8"), True, 255),
    H5Dataset("sentinel1", 8, np.dtype("float32"), True, float("-inf")),
    # int16 cannot hold the readers' -inf: missing elevation is written as -32768.
    H5Dataset("aster", 2, np.dtype("int16"), True, -32768),
    H5Dataset("era5", 12, np.dtype("float32"), False, float("nan")),
    H5Dataset("dynamic_world", 1, np.dtype("uint8"), True, 0),
    # Quirk kept from the original: no-data "255" in an int8 dataset, which
    # wraps to -1 (np.int8(255) in the original code).
    H5Dataset("canopy_height_eth", 2, np.dtype("int8"), True, -1),
    # The training reader treats 0 as no-data (the download code used 255).
    H5Dataset("esa_worldcover", 1, np.dtype("uint8"), True, 0),
    H5Dataset("lat", 2, np.dtype("float32"), False, float("-inf")),
    H5Dataset("lon", 2, np.dtype("float32"), False, float("-inf")),
    H5Dataset("month", 2, np.dtype("float32"), False, float("-inf")),
    H5Dataset("biome", N_BIOMES, np.dtype("uint8"), False, None),
    H5Dataset("eco_region", N_ECOREGIONS, np.dtype("uint16"), False, None),
)
H5_BY_NAME: dict[str, H5Dataset] = {d.name: d for d in H5_DATASETS}
METADATA_DTYPE = np.dtype([("tile_id", "S100"), ("S2_type", "S10")])

#: Statistics keys of NAME_band_stats.json -> (h5 dataset, no-data value).
STATS_KEYS: dict[str, tuple[str, float]] = {
    "sentinel2_l1c": ("sentinel2", 0),
    "sentinel2_l2a": ("sentinel2", 0),
    "sentinel2_cloudmask": ("sentinel2_cloudmask", 65535),
    "sentinel2_cloudprod": ("sentinel2_cloudprod", 65535),
    "sentinel1": ("sentinel1", float("-inf")),
    "aster": ("aster", -32768),
    "canopy_height_eth": ("canopy_height_eth", -1),
    "era5": ("era5", float("nan")),
    "lat": ("lat", float("-inf")),
    "lon": ("lon", float("-inf")),
    "month": ("month", float("-inf")),
}

# --------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------
SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


def check_tile_id(tile_id: object, where: str = "") -> str:
    """Return tile_id if it is a safe file name, else raise ValueError naming it."""
    from tasks.common import checks

    try:  # the shared rule for names that become paths, then the stricter character set of tile ids
        checks.plain_name(tile_id, "tile_id", where=where)
    except checks.InputError:
        tile_id_ok = False
    else:
        tile_id_ok = True
    if not tile_id_ok or not SAFE_ID.match(tile_id) or tile_id in (".", ".."):
        loc = f"{where}: " if where else ""
        raise ValueError(
            f"{loc}tile_id {tile_id!r} is not a safe file name; use 1-100 letters, "
            "digits, '_', '-' or '.' (no path separators, not '.' or '..')"
        )
    return tile_id


def check_dataset_name(name: str) -> str:
    if not re.match(r"^data_[A-Za-z0-9_.-]+$", name or ""):
        raise ValueError(
            f"dataset name {name!r} must start with 'data_' and contain only letters, "
            "digits, '_', '-', '.' (readers find the files by the data_* glob)"
        )
    return name
