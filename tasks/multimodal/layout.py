"""The multimodal dataset layout: the one place that says where each file of a dataset lives
(the twin of :mod:`tasks.aerial.layout`).

::

    <output_dir>/<NAME>/                     the dataset folder (MultimodalConfig.dataset_dir)
        NAME.h5                              the dataset: one row per tile (one writer)
        NAME_band_stats.json                 band statistics
        NAME_splits.json                     train/val/test row indices
        NAME_tile_info.json                  every tile's metadata (streamed from work/tile_info/)
        NAME_tiles.geojson                   the tiles of the run (one feature a line)
        report.json, tiles_map.png           the run's report (tasks.common.report.RunReport.write)
        report_problems.jsonl                every problem of the run, one a line
        tiles_contact_sheet.png              a sample of the tiles, every modality
        tiles/<tile_id>.tif                  the fetched stacks
        work/
            tile_info/<tile_id>.json         a tile's entry plus its fetch bookkeeping
            stacks_index.jsonl               the finished tiles (fetch key, size, mtime, digest)
            parts/part_NNNNN.npz             packed partitions (kept with keep_parts)
            h5_manifest.json                 what the h5 was assembled from
            ee_tiles_key.json                the Earth Engine sample's key (re-used when it matches)
    <output_dir>/torchgeo/<release>/         TorchGeo view: links named as TorchGeo opens them

The work files do not depend on the dataset's name, so ``DatasetLayout(folder)`` serves the
stages that only know the folder; the name defaults to the folder's name, which is what the
flow writes (``output_dir/NAME``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WORK = "work"
STACKS = "tiles"
TILE_INFO = "tile_info"
PARTS = "parts"
#: the packed partitions' file names (written by tasks.multimodal.convert.pack_partition)
PART_GLOB = "part_*.npz"
#: the suffixes after NAME of the four files TorchGeo's ``MMEarth`` opens
DATASET_SUFFIXES = (".h5", "_band_stats.json", "_splits.json", "_tile_info.json")
TORCHGEO = "torchgeo"
#: the run's report, in the dataset folder
REPORT = "report.json"


@dataclass(frozen=True)
class DatasetLayout:
    """Where the files of the dataset in ``root`` live; ``name``: the dataset's name (default
    the folder's name)."""

    root: Path
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        if not self.name:
            object.__setattr__(self, "name", self.root.name)

    # ---- the dataset's files, named after the dataset
    @property
    def h5(self) -> Path:
        return self.root / f"{self.name}.h5"

    @property
    def band_stats(self) -> Path:
        return self.root / f"{self.name}_band_stats.json"

    @property
    def splits(self) -> Path:
        return self.root / f"{self.name}_splits.json"

    @property
    def tile_info(self) -> Path:
        return self.root / f"{self.name}_tile_info.json"

    @property
    def tiles_geojson(self) -> Path:
        return self.root / f"{self.name}_tiles.geojson"

    def dataset_files(self) -> list[Path]:
        """The four files a reader (MMEarth's, TorchGeo's) opens, in :data:`DATASET_SUFFIXES` order."""
        return [self.root / (self.name + suffix) for suffix in DATASET_SUFFIXES]

    # ---- the run's report
    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def problems(self) -> Path:
        return self.root / "report_problems.jsonl"

    @property
    def tiles_map(self) -> Path:
        return self.root / "tiles_map.png"

    @property
    def contact_sheet(self) -> Path:
        return self.root / "tiles_contact_sheet.png"

    # ---- stacks and the work folder
    @property
    def stacks(self) -> Path:
        return self.root / STACKS

    def stack(self, tile_id: str) -> Path:
        return self.stacks / f"{tile_id}.tif"

    @property
    def work(self) -> Path:
        return self.root / WORK

    @property
    def tile_info_dir(self) -> Path:
        return self.work / TILE_INFO

    def tile_json(self, tile_id: str) -> Path:
        return self.tile_info_dir / f"{tile_id}.json"

    @property
    def parts(self) -> Path:
        return self.work / PARTS

    def part_files(self) -> list[Path]:
        """The packed partitions on disk."""
        return sorted(self.parts.glob(PART_GLOB))

    @property
    def stacks_index(self) -> Path:
        return self.work / "stacks_index.jsonl"

    @property
    def h5_manifest(self) -> Path:
        return self.work / "h5_manifest.json"

    @property
    def ee_tiles_key(self) -> Path:
        return self.work / "ee_tiles_key.json"

    def folders(self) -> list[Path]:
        """The folders a run writes into (made at its start)."""
        return [self.root, self.stacks, self.tile_info_dir, self.parts]

    # ---- TorchGeo's view
    def torchgeo_view(self, release: str, root: str | Path | None = None) -> Path:
        """The folder of the TorchGeo view under ``release``'s name: ``root/<release>``,
        by default ``<output_dir>/torchgeo/<release>``."""
        return (Path(root) if root is not None else self.root.parent / TORCHGEO) / release
