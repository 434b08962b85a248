"""A tile and its pixel grid: what the sampler produces and every source fetches.

:class:`Tile` is one feature of the tiles GeoJSON (tile_id, biome and
ecoregion names, centroid, square polygon in EPSG:4326, side in metres);
:class:`Grid` is the stack's pixel grid of a tile (its UTM zone, 10 m pixels,
centred on the centroid, snapped to whole pixels). Neither depends on a source,
so sampling does not import the sources package.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine


@dataclass(frozen=True)
class Tile:
    """One tile of the tiles GeoJSON."""

    tile_id: str
    biome: str  # biome name (one of schema.BIOMES)
    eco_region: str  # ecoregion name
    lon: float  # centroid, degrees
    lat: float
    geometry: dict[str, Any]  # GeoJSON Polygon (EPSG:4326)
    tile_size_m: float = 1300.0

    @property
    def utm_crs(self) -> str:
        """EPSG code of the UTM zone of the centroid (WGS84 / UTM)."""
        zone = int((self.lon + 180.0) // 6.0) % 60 + 1
        return f"EPSG:{(32600 if self.lat >= 0 else 32700) + zone}"


@dataclass(frozen=True)
class Grid:
    """The pixel grid of a tile: UTM CRS, 10 m pixels, ``size`` x ``size`` pixels,
    centred on the tile centroid and snapped to whole pixels."""

    crs: str
    transform: Affine
    size: int

    @property
    def resolution(self) -> float:
        return float(self.transform.a)

    @classmethod
    def for_tile(cls, tile: Tile, resolution: float = 10.0) -> "Grid":
        crs = tile.utm_crs
        x, y = _from_lonlat(crs).transform(tile.lon, tile.lat)
        size = int(round(tile.tile_size_m / resolution))
        half = size * resolution / 2.0
        x0 = np.floor((x - half) / resolution) * resolution
        y1 = np.ceil((y + half) / resolution) * resolution
        return cls(crs=crs, transform=Affine(resolution, 0.0, x0, 0.0, -resolution, y1), size=size)


@functools.lru_cache(maxsize=256)
def _from_lonlat(crs: str):
    """One (thread-safe) pyproj Transformer per UTM zone: building one costs ~4 ms, a
    rerun over 100 000 tiles would spend minutes on that alone."""
    from pyproj import Transformer

    return Transformer.from_crs("EPSG:4326", crs, always_xy=True)
