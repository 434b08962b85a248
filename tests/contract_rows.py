"""An independent, plain-numpy statement of the MMEarth h5 row format, used to check
the product's converter (``tasks.multimodal.convert``) rather than comparing it with
itself. Written from the format description only (README "Output" and
``docs``-level contract): it does not import the product's schema or converter.

Per tile, from its GeoTIFF stack (band descriptions ``<group>/<band>``, float32, NaN
where a source had no pixel) and its tile_info entry:

* centre crop to S x S;
* sentinel2 (13 x uint16): B1 B2 B3 B4 B5 B6 B7 B8A B8 B9 B10 B11 B12, rounded; a band the
  product lacks (B10 in L2A) and NaN pixels are 0;
* sentinel2_cloudmask (QA60), sentinel2_cloudprod (MSK_CLDPRB, L2A only) uint16, no-data
  65535; sentinel2_scl (SCL, L2A only) uint8, no-data 255;
* sentinel1 (8 x float32): asc VV VH HH HV, desc VV VH HH HV; missing orbit or
  polarisation and NaN pixels are -inf;
* aster (elevation, slope) int16, no-data -32768 (int16 holds no -inf);
* dynamic_world uint8: the stack's label + 1 as stored, no-data 0;
* canopy_height_eth (height, std) int8, no-data -1 (the original's 255, wrapped);
* esa_worldcover uint8, no-data 0;
* era5 (12 x float32): month1, month2, year 4-vectors of tile_info, NaN where missing;
* lat, lon: (sin, cos) of the degrees; month: (sin, cos)(2 pi m / 12) of S2_DATE's month;
* biome (14 x uint8), eco_region (846 x uint16): one-hot of the tile_info indices.
"""

from __future__ import annotations

import math

import numpy as np

S2_ORDER = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8A", "B8", "B9", "B10", "B11", "B12"]
POLS = ["VV", "VH", "HH", "HV"]

#: dataset -> (dtype, no-data value written for a missing pixel)
NO_DATA = {
    "sentinel2": ("uint16", 0),
    "sentinel2_cloudmask": ("uint16", 65535),
    "sentinel2_cloudprod": ("uint16", 65535),
    "sentinel2_scl": ("uint8", 255),
    "sentinel1": ("float32", -np.inf),
    "aster": ("int16", -32768),
    "dynamic_world": ("uint8", 0),
    "canopy_height_eth": ("int8", -1),
    "esa_worldcover": ("uint8", 0),
}


def _pixels(values: np.ndarray | None, dataset: str, shape: tuple[int, int]) -> np.ndarray:
    """One channel: rounded half to even and saturated (integer types) or as is (float),
    the no-data value where NaN or absent."""
    dtype, fill = NO_DATA[dataset]
    if values is None:
        return np.full(shape, fill, dtype)
    v = np.asarray(values, np.float64)
    missing = np.isnan(v)
    if np.dtype(dtype).kind != "f":
        lo, hi = np.iinfo(dtype).min, np.iinfo(dtype).max
        v = np.minimum(np.maximum(np.round(np.where(missing, 0.0, v)), lo), hi)
    return np.where(missing, fill, v).astype(dtype)


def expected_rows(data: np.ndarray, names: list[str], info: dict, size: int) -> dict[str, np.ndarray]:
    h, w = data.shape[1:]
    top, left = (h - size) // 2, (w - size) // 2
    crop = {name: data[i, top:top + size, left:left + size] for i, name in enumerate(names)}
    shape = (size, size)

    def band(group: str, name: str):
        return crop.get(f"{group}/{name}")

    rows: dict[str, np.ndarray] = {}
    rows["sentinel2"] = np.stack([_pixels(band("sentinel2", b), "sentinel2", shape) for b in S2_ORDER])
    rows["sentinel2_cloudmask"] = _pixels(band("sentinel2", "QA60"), "sentinel2_cloudmask", shape)[None]
    l2a = info["S2_type"] == "l2a"
    rows["sentinel2_cloudprod"] = _pixels(band("sentinel2", "MSK_CLDPRB") if l2a else None,
                                          "sentinel2_cloudprod", shape)[None]
    rows["sentinel2_scl"] = _pixels(band("sentinel2", "SCL") if l2a else None, "sentinel2_scl", shape)[None]
    rows["sentinel1"] = np.stack([_pixels(band(f"sentinel1_{orbit}", pol), "sentinel1", shape)
                                  for orbit in ("asc", "desc") for pol in POLS])
    # elevation is "elevation" (synthetic source) or the asset's "b1" (Earth Engine, the original's name)
    elevation = band("aster", "elevation")
    rows["aster"] = np.stack([_pixels(band("aster", "b1") if elevation is None else elevation, "aster", shape),
                              _pixels(band("aster", "slope"), "aster", shape)])
    rows["dynamic_world"] = _pixels(band("dynamic_world", "label"), "dynamic_world", shape)[None]
    rows["canopy_height_eth"] = np.stack([_pixels(band("canopy_height_eth", b), "canopy_height_eth", shape)
                                          for b in ("height", "std")])
    rows["esa_worldcover"] = _pixels(band("esa_worldcover", "Map"), "esa_worldcover", shape)[None]
    era = info.get("era5") or {}
    vec = []
    for part in ("month1", "month2", "year"):
        v = era.get(part)
        vec += [math.nan if x is None else x for x in v] if v and len(v) == 4 else [math.nan] * 4
    rows["era5"] = np.array(vec, np.float32)
    lat, lon = math.radians(info["lat"]), math.radians(info["lon"])
    m = int(info["S2_DATE"].split("-")[1])
    rows["lat"] = np.array([math.sin(lat), math.cos(lat)], np.float32)
    rows["lon"] = np.array([math.sin(lon), math.cos(lon)], np.float32)
    rows["month"] = np.array([math.sin(2 * math.pi * m / 12), math.cos(2 * math.pi * m / 12)], np.float32)
    rows["biome"] = np.eye(14, dtype=np.uint8)[info["biome"]]
    rows["eco_region"] = np.eye(846, dtype=np.uint16)[info["eco_region"]]
    return rows


def assert_rows_equal(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], where: str = "") -> None:
    """Every dataset of the contract, exactly (float vectors to float32 rounding)."""
    assert set(expected) <= set(actual), sorted(set(expected) - set(actual))
    for name, exp in expected.items():
        got = np.asarray(actual[name])
        assert got.dtype == exp.dtype, f"{where} {name}: dtype {got.dtype} != {exp.dtype}"
        assert got.shape == exp.shape, f"{where} {name}: shape {got.shape} != {exp.shape}"
        if name in ("era5", "lat", "lon", "month"):
            np.testing.assert_allclose(got, exp, rtol=1e-6, atol=1e-7, err_msg=f"{where} {name}")
        else:
            np.testing.assert_array_equal(got, exp, err_msg=f"{where} {name}")
