"""Checks of a finished dataset folder against the contract (shared by flow tests)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import rasterio

from tasks.multimodal import schema
from tests.contract_rows import assert_rows_equal, expected_rows
from tests.mmearth_reader import Reader


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (RFC 8259): strict parsers reject it")


def strict_json(text: str):
    """``json.loads`` as a strict parser (JavaScript's JSON.parse, serde_json, jq) reads:
    bare NaN / Infinity / -Infinity tokens are an error."""
    return json.loads(text, parse_constant=_no_constant)


def check_dataset(out: Path, name: str, n: int, S: int = 128) -> None:
    """The h5's every dataset (shape, dtype, chunks, gzip), no-data handling, and each row
    aligned with metadata, tile_info and the tile's own GeoTIFF; then the training reader."""
    tile_info = strict_json((out / f"{name}_tile_info.json").read_text())
    with h5py.File(out / f"{name}.h5", "r") as f:
        assert set(f) == {d.name for d in schema.H5_DATASETS} | {"metadata"}
        for d in schema.H5_DATASETS:
            ds = f[d.name]
            assert ds.shape == ((n, d.channels, S, S) if d.spatial else (n, d.channels)), d.name
            assert ds.dtype == d.dtype, d.name
            assert ds.chunks == (1,) + ds.shape[1:] and ds.compression == "gzip", d.name
        meta = f["metadata"][:]
        assert meta.dtype == schema.METADATA_DTYPE
        ids = [m["tile_id"].decode() for m in meta]
        assert len(set(ids)) == n
        for row, tid in enumerate(ids):
            info = tile_info[tid]
            assert not info["NO_DATA"]
            assert meta[row]["S2_type"].decode() == info["S2_type"]
            lat, lon = math.radians(info["lat"]), math.radians(info["lon"])
            np.testing.assert_allclose(f["lat"][row], [math.sin(lat), math.cos(lat)], rtol=1e-6)
            np.testing.assert_allclose(f["lon"][row], [math.sin(lon), math.cos(lon)], rtol=1e-6, atol=1e-7)
            m = int(info["S2_DATE"][5:7])
            np.testing.assert_allclose(f["month"][row], [math.sin(2 * math.pi * m / 12), math.cos(2 * math.pi * m / 12)], atol=1e-6)
            assert f["biome"][row].argmax() == info["biome"] and f["biome"][row].sum() == 1
            assert f["eco_region"][row].argmax() == info["eco_region"] and f["eco_region"][row].sum() == 1
            era = info["era5"]
            # a value the source lacks is NaN in the h5 and null in the strict-JSON tile_info
            want_era = [np.nan if v is None else v for v in era["month1"] + era["month2"] + era["year"]]
            np.testing.assert_allclose(f["era5"][row], want_era, rtol=1e-6)
            # no-data handling per the contract
            s1 = f["sentinel1"][row]
            for o, orbit in enumerate(("asc", "desc")):
                present = info["BANDS"][f"sentinel1_{orbit}"] or []
                for p, pol in enumerate(schema.S1_POLARISATIONS):
                    assert np.all(np.isneginf(s1[4 * o + p])) == (pol not in present), (tid, orbit, pol)
            if info["S2_type"] == "l1c":
                assert np.all(f["sentinel2_cloudprod"][row] == 65535)
                assert np.all(f["sentinel2_scl"][row] == 255)
            else:
                assert not f["sentinel2"][row, 10].any()  # no B10 in L2A
            dw = f["dynamic_world"][row]
            assert dw.max() <= 9  # label + 1; 0 where a tile's year has no Dynamic World image
            assert set(np.unique(f["esa_worldcover"][row])) <= set(schema.WORLDCOVER_CLASSES)
            # the row is the centre crop of the tile's own GeoTIFF
            with rasterio.open(out / "tiles" / f"{tid}.tif") as src:
                data, names = src.read(), list(src.descriptions)
            # against an independent statement of the format, not the product's converter
            assert_rows_equal({d.name: f[d.name][row] for d in schema.H5_DATASETS},
                              expected_rows(data, names, info, S), tid)
            nan_s2 = np.isnan(data[:13]).any()
            if nan_s2:  # missing S2 pixels are the no-data value 0, and excluded from stats
                assert (f["sentinel2"][row] == 0).any()
    splits = strict_json((out / f"{name}_splits.json").read_text())
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == list(range(n))
    stats = strict_json((out / f"{name}_band_stats.json").read_text())
    assert set(stats) == set(schema.STATS_KEYS)
    for split in ("train", "val", "test"):
        reader = Reader(out, split)
        for i in range(len(reader)):
            item = reader[i]
            assert item["sentinel2"].shape == (13, S, S)
            assert item["id"] in tile_info
