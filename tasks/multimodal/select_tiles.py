"""Tile selection stage: which tiles a run covers, written once to ``NAME_tiles.geojson``.

Three ways, by configuration:

* ``tiles_geojson`` given: the user's tiles file, validated (file, feature,
  tile_id and field named in every error); its ecoregions must have an index.
* ``tile_sampler="earthengine"``: ``randomPoints`` in RESOLVE/ECOREGIONS/2017
  (:mod:`tasks.multimodal.tiles_ee`). The sample is deterministic, so when the
  tiles file exists with the same sampling key (``work/ee_tiles_key.json``) it
  is re-used without asking Earth Engine again.
* otherwise: the local sampler over the regions GeoJSON, streamed to the file
  an ecoregion at a time.

Later stages read the tiles back in chunks (:func:`tasks.multimodal.tiles.iter_tiles`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.common.atomic import write_json_atomic
from tasks.multimodal import tiles as tiles_mod
from tasks.multimodal.layout import DatasetLayout

log = logging.getLogger(__name__)


@dataclass
class TileSelection:
    """What the selection stage leaves for the others."""

    path: Path  # NAME_tiles.geojson (one feature a line)
    n_tiles: int
    eco_index: dict[str, int]  # ecoregion name -> MMEarth index, for the source
    regions: list[tiles_mod.Region] = field(default_factory=list)  # outlines for the map (local regions)
    notes: list[str] = field(default_factory=list)  # for the report
    how: str = "sampled"  # "given", "sampled", "sampled on Earth Engine", "re-used Earth Engine sample"


def select_tiles(config: Any, dataset_dir: Path, sampler_source: Any = None) -> TileSelection:
    """Select the tiles of ``config`` (a ``MultimodalConfig``) and write the tiles GeoJSON
    exactly once (not at all when an Earth Engine sample is re-used).

    ``sampler_source``: the Earth Engine source the ``earthengine`` sampler asks
    (built from the configuration by the caller); unused otherwise.
    """
    layout = DatasetLayout(dataset_dir, config.name)
    out = layout.tiles_geojson
    regions_path = Path(config.regions) if config.regions else tiles_mod.DEFAULT_REGIONS
    regions, skipped = tiles_mod.load_regions_split(regions_path)
    notes = [f"region {r.eco_region} ({r.biome}) skipped: its biome is not sampled by MMEarth" for r in skipped]

    if config.tiles_geojson:
        eco_index = tiles_mod.eco_region_index(regions, config.eco_labels)
        tiles = tiles_mod.read_tiles_geojson(config.tiles_geojson)
        missing = sorted({t.eco_region for t in tiles} - set(eco_index))
        if missing:
            raise ValueError(f"{config.tiles_geojson}: ecoregion(s) {missing[:5]} have no index; "
                             "pass eco_labels with a {name: index} mapping")
        n = tiles_mod.write_tiles_stream(tiles, out)
        return TileSelection(out, n, eco_index, regions, notes, "given")

    if config.tile_sampler == "earthengine":
        if config.source != "earthengine" or sampler_source is None:
            raise ValueError("tile_sampler=earthengine needs source=earthengine (its credentials and project)")
        # lazy: the Earth Engine sampler's module (with the Earth Engine source) adds 0.3-0.5 s
        # (measured) to the start of every run that samples locally
        from tasks.multimodal.tiles_ee import sample_tiles_ee

        key_path = layout.ee_tiles_key
        key = {"n_tiles": config.n_tiles, "mode": config.sampling_mode_index, "tile_size_m": config.tile_size_m,
               "seed": config.seed, "batch": config.batch, "eco_labels": config.eco_labels}
        try:
            previous = json.loads(key_path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if out.exists() and isinstance(previous, dict) and previous.get("key") == key:
            # the same deterministic sample as last time: no need to ask Earth Engine again
            n = sum(len(c) for c in tiles_mod.iter_tiles(out))
            log.info("re-using the Earth Engine tile sample in %s", out)
            return TileSelection(out, n, dict(previous["eco_index"]), [], notes, "re-used Earth Engine sample")
        labels = tiles_mod.load_eco_index(config.eco_labels) if config.eco_labels else None
        tiles, eco_index = sample_tiles_ee(sampler_source, config.n_tiles, config.sampling_mode_index, labels,
                                           config.tile_size_m, config.seed, config.batch)
        n = tiles_mod.write_tiles_stream(tiles, out)
        write_json_atomic(key_path, {"key": key, "eco_index": eco_index})
        return TileSelection(out, n, eco_index, [], notes, "sampled on Earth Engine")

    eco_index = tiles_mod.eco_region_index(regions, config.eco_labels)
    chunks = tiles_mod.iter_sample_tiles(regions, eco_index, config.n_tiles, config.sampling_mode_index,
                                         tile_size_m=config.tile_size_m, seed=config.seed, batch=config.batch)
    n = tiles_mod.write_tiles_stream(chunks, out)
    return TileSelection(out, n, eco_index, regions, notes, "sampled")
