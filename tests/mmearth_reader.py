"""What MMEarth's training reader (``MMEarthDataset`` + ``create_MMEearth_args``)
does with a dataset folder, in numpy (the original needs torch).

Files are found by glob (exactly one of each), each split index is a row of
the h5, the row's ``metadata`` tile_id keys ``tile_info`` (``S2_type`` picks
``sentinel2_l1c``/``sentinel2_l2a`` band statistics), continuous modalities
are normalised with ``band_stats`` mean/std, class maps are remapped, and
no-data values become NaN / -1.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

# MMEarth-train MODALITIES.NO_DATA_VAL
NO_DATA_VAL = {
    "sentinel2": 0, "sentinel2_cloudmask": 65535, "sentinel2_cloudprod": 65535, "sentinel2_scl": 255,
    "sentinel1": float("-inf"), "aster": float("-inf"), "canopy_height_eth": 255, "dynamic_world": 0,
    "esa_worldcover": 255, "lat": float("-inf"), "lon": float("-inf"), "month": float("-inf"),
    "era5": float("inf"), "biome": 255, "eco_region": 255,
}
CLASSIFICATION = {"dynamic_world", "esa_worldcover", "biome", "eco_region", "sentinel2_scl", "sentinel2_cloudmask"}


def single_glob(root: Path, pattern: str) -> Path:
    files = list(root.glob(pattern))
    assert len(files) == 1, f"expected exactly one {pattern} in {root}, found {files}"
    return files[0]


class Reader:
    def __init__(self, root: Path, split: str = "train"):
        self.h5 = h5py.File(single_glob(root, "data_*.h5"), "r")
        self.indices = json.loads(single_glob(root, "data_*_splits.json").read_text())[split]
        self.tile_info = json.loads(single_glob(root, "data_*_tile_info.json").read_text())
        self.band_stats = json.loads(single_glob(root, "data_*_band_stats.json").read_text())

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        row = self.indices[idx]
        name = self.h5["metadata"][row][0].decode("utf-8")
        l2a = self.tile_info[name]["S2_type"] == "l2a"
        out: dict[str, np.ndarray] = {"id": name}
        for modality in ("sentinel2", "sentinel1", "aster", "canopy_height_eth", "era5", "lat", "lon", "month",
                         "dynamic_world", "esa_worldcover", "biome", "eco_region", "sentinel2_scl"):
            data = np.array(self.h5[modality][row, ...]).astype(np.float64)
            key = ("sentinel2_l2a" if l2a else "sentinel2_l1c") if modality == "sentinel2" else modality
            if modality not in ("biome", "eco_region", "dynamic_world", "esa_worldcover", "sentinel2_scl"):
                means = np.array(self.band_stats[key]["mean"])
                stds = np.array(self.band_stats[key]["std"])
                raw = data
                if modality in ("era5", "lat", "lon", "month"):
                    data = (data - means) / stds
                else:
                    data = (data - means[:, None, None]) / stds[:, None, None]
                data = np.where(raw == NO_DATA_VAL[modality], np.nan, data)
            if modality == "dynamic_world":
                data = np.where(data == 0, np.nan, data - 1)
                data = np.where(data > 8, np.nan, data)
            if modality == "esa_worldcover":
                old = [10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100]
                new = np.full_like(data, np.nan)
                for i, o in enumerate(old):
                    new[data == o] = i
                data = new
            if modality in CLASSIFICATION:
                data = np.where(np.isnan(data), -1, data).astype(np.int64)
            else:
                data = data.astype(np.float32)
            out[modality] = data
        return out
