"""MMEarth's training reader, ported line by line to numpy (the original needs torch):
``MMEarthDataset.__getitem__`` and ``create_MMEearth_args`` of MMEarth-train's
``mmearth_dataset.py``, with the constants of its ``MODALITIES.py``.

It is kept faithful, quirks included, so that the tests see what a user's training
code sees on our output:

* continuous modalities are normalised with band_stats mean/std *first*; the no-data
  comparison runs on the normalised values afterwards, so only -inf (sentinel1, lat, lon,
  month) and NaN survive as missing; sentinel2 0, aster -32768 and canopy -1 come out
  as ordinary normalised numbers (in the release too: its int8 canopy cannot hold the
  255 the reader compares with);
* esa_worldcover is remapped 10..100 -> 0..10 *before* the no-data (0) comparison, so
  tree cover (10) and no-data both come out as -1;
* dynamic_world 0 -> NaN, 1..9 -> 0..8, then classes become int64 with NaN -> -1.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np

# MMEarth-train MODALITIES.py
NO_DATA_VAL = {
    "sentinel2": 0, "sentinel2_cloudmask": 65535, "sentinel2_cloudprod": 65535, "sentinel2_scl": 255,
    "sentinel1": float("-inf"), "aster": float("-inf"), "canopy_height_eth": 255, "dynamic_world": 0,
    "esa_worldcover": 0, "lat": float("-inf"), "lon": float("-inf"), "month": float("-inf"),
    "era5": np.nan, "biome": 255, "eco_region": 65535,
}
MODALITIES_FULL = {
    "sentinel2": ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8A", "B8", "B9", "B10", "B11", "B12"],
    "sentinel2_cloudmask": ["QA60"], "sentinel2_cloudprod": ["MSK_CLDPRB"], "sentinel2_scl": ["SCL"],
    "sentinel1": ["asc_VV", "asc_VH", "asc_HH", "asc_HV", "desc_VV", "desc_VH", "desc_HH", "desc_HV"],
    "aster": ["elevation", "slope"],
    "era5": ["prev_month_avg_temp", "prev_month_min_temp", "prev_month_max_temp", "prev_month_total_precip",
             "curr_month_avg_temp", "curr_month_min_temp", "curr_month_max_temp", "curr_month_total_precip",
             "year_avg_temp", "year_min_temp", "year_max_temp", "year_total_precip"],
    "dynamic_world": ["landcover"], "canopy_height_eth": ["height", "std"], "lat": ["sin", "cos"],
    "lon": ["sin", "cos"], "biome": ["biome"], "eco_region": ["eco_region"], "month": ["sin_month", "cos_month"],
    "esa_worldcover": ["map"],
}
MODALITY_TASK = {
    "sentinel2": "regression_map", "sentinel1": "regression_map", "aster": "regression_map",
    "canopy_height_eth": "regression_map", "lat": "regression", "lon": "regression", "month": "regression",
    "era5": "regression", "esa_worldcover": "segmentation", "dynamic_world": "segmentation",
    "biome": "classification", "eco_region": "classification",
}
#: MODALITIES.OUT_MODALITIES (the pretraining targets)
OUT_MODALITIES = {
    "sentinel2": ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8A", "B8", "B9", "B11", "B12"],
    "sentinel1": "all", "aster": "all", "era5": "all", "dynamic_world": "all", "canopy_height_eth": "all",
    "lat": "all", "lon": "all", "biome": "all", "eco_region": "all", "month": "all", "esa_worldcover": "all",
}
#: every modality the reader can load (it has no MODALITY_TASK for the S2 masks)
ALL_MODALITIES = {m: "all" for m in MODALITY_TASK}


def get_single_glob_file(data_root: Path, pattern: str) -> Path:
    file = list(Path(data_root).glob(pattern))
    assert len(file) < 2, f"too many {pattern} files at {data_root}"
    assert len(file) > 0, f"no {pattern} files at {data_root}"
    return file[0]


class Reader:
    """``MMEarthDataset(create_MMEearth_args(root, modalities), split)``."""

    def __init__(self, root: Path, split: str = "train", modalities: dict | None = None):
        self.data_path = get_single_glob_file(root, "data_*.h5")
        self.splits_path = get_single_glob_file(root, "data_*_splits.json")
        self.tile_info = json.loads(get_single_glob_file(root, "data_*_tile_info.json").read_text())
        self.norm_stats = json.loads(get_single_glob_file(root, "data_*_band_stats.json").read_text())
        self.modalities = modalities or ALL_MODALITIES
        self.modalities_full = MODALITIES_FULL
        self.indices = json.loads(Path(self.splits_path).read_text())[split]
        self.data_full = h5py.File(self.data_path, "r")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        return_dict: dict = OrderedDict()
        name = self.data_full["metadata"][self.indices[idx]][0].decode("utf-8")
        l2a = self.tile_info[name]["S2_type"] == "l2a"
        for modality in self.modalities.keys():
            if self.modalities[modality] == "all":
                modality_idx = list(range(len(self.modalities_full[modality])))
            else:
                modality_idx = [self.modalities_full[modality].index(m) for m in self.modalities[modality]]
            if modality in ("biome", "eco_region"):
                data = np.array(self.data_full[modality][self.indices[idx], ...])
            else:
                data = np.array(self.data_full[modality][self.indices[idx], modality_idx, ...])
            modality_ = ("sentinel2_l2a" if l2a else "sentinel2_l1c") if modality == "sentinel2" else modality
            if modality not in ("biome", "eco_region", "dynamic_world", "esa_worldcover"):
                means = np.array(self.norm_stats[modality_]["mean"])[modality_idx]
                stds = np.array(self.norm_stats[modality_]["std"])[modality_idx]
                if modality in ("era5", "lat", "lon", "month"):
                    data = (data - means) / stds
                else:
                    data = (data - means[:, None, None]) / stds[:, None, None]
            if modality == "dynamic_world":
                data = np.where(data == NO_DATA_VAL[modality], np.nan, data)
                for old, new in zip([1, 2, 3, 4, 5, 6, 7, 8, 9, np.nan], [0, 1, 2, 3, 4, 5, 6, 7, 8, np.nan]):
                    data = np.where(data == old, new, data)
                data = np.where(data > 8, np.nan, data)
            if modality == "esa_worldcover":
                for old, new in zip([10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100, 255],
                                    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 255]):
                    data = np.where(data == old, new, data)
                data = np.where(data > 10, np.nan, data)
            data = (np.where(data == NO_DATA_VAL[modality], np.nan, data) if modality != "dynamic_world" else data)
            if MODALITY_TASK[modality] in ("classification", "segmentation"):
                data = np.where(np.isnan(data), -1, data).astype(np.dtype("int64"))
            else:
                data = data.astype(np.dtype("float32"))
            return_dict[modality] = data
        return_dict["id"] = name
        return return_dict


def torchgeo_normalize(data: np.ndarray, band_stats: dict, modality: str, tile_info: dict,
                       mode: str = "z-score") -> np.ndarray:
    """TorchGeo ``MMEarth._preprocess_modality`` for the continuous modalities with every
    band (its default): the S2 key by ``S2_type``, ``_normalize_modality`` (z-score or
    min-max with the band_stats), then its no-data value -> NaN. ``modality``: one of
    TorchGeo's names (``sentinel1_asc``/``sentinel1_desc`` read the h5's sentinel1
    channels 0-3 / 4-7 and the ``sentinel1`` statistics)."""
    no_data = {"sentinel2": 0, "sentinel1_asc": float("-inf"), "sentinel1_desc": float("-inf"),
               "aster": float("-inf"), "canopy_height_eth": 255, "lat": float("-inf"), "lon": float("-inf"),
               "month": float("-inf"), "era5": float("inf")}
    # _select_indices_for_modality: sentinel1_desc's bands are channels 4-7 of the h5's
    # sentinel1 and of the sentinel1 statistics alike
    indices = list(range(4, 8)) if modality == "sentinel1_desc" else \
        list(range(4)) if modality == "sentinel1_asc" else list(range(data.shape[0]))
    data = data[indices, ...].astype(np.float32)
    key = modality
    if modality == "sentinel2":
        key = "sentinel2_l2a" if tile_info["S2_type"] == "l2a" else "sentinel2_l1c"
    stats_key = "sentinel1" if "sentinel1" in key else key
    if mode == "z-score":
        mean = np.array(band_stats[stats_key]["mean"])[indices, ...]
        std = np.array(band_stats[stats_key]["std"])[indices, ...]
        data = (data - mean[:, None, None]) / std[:, None, None] if data.ndim == 3 else (data - mean) / std
    else:
        lo = np.array(band_stats[stats_key]["min"])[indices, ...]
        hi = np.array(band_stats[stats_key]["max"])[indices, ...]
        data = ((data - lo[:, None, None]) / (hi[:, None, None] - lo[:, None, None]) if data.ndim == 3
                else (data - lo) / (hi - lo))
    return np.where(data == no_data[modality], np.nan, data)
