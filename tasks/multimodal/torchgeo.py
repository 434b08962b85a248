"""A TorchGeo-ready view of a dataset: links under a release name.

TorchGeo's ``MMEarth(root, subset)`` opens only the release names: it joins
``root / filenames[subset]`` with ``filenames[subset] + ".h5"``, ``"_band_stats.json"``,
``"_splits.json"`` and ``"_tile_info.json"``, where ``filenames`` is
``{"MMEarth": "data_1M_v001", "MMEarth64": "data_1M_v001_64", "MMEarth100k":
"data_100k_v001"}``. A dataset named otherwise gets a second folder
``<root>/<release name>/`` whose four files are relative symbolic links to the
dataset's own (no copy; the pair stays valid when the output folder is moved
as a whole). The view lives outside the dataset folder, because MMEarth's
training reader globs ``data_*.h5`` there and needs exactly one.

    python -m tasks.multimodal.torchgeo output/data_mine            # -> output/torchgeo/data_1M_v001/
    python -m tasks.multimodal.torchgeo output/data_mine --subset MMEarth100k --root /data/tg

then ``torchgeo.datasets.MMEarth(root="output/torchgeo", subset="MMEarth")``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import h5py

from tasks.common.atomic import link_atomic
from tasks.multimodal.layout import DATASET_SUFFIXES, DatasetLayout

#: TorchGeo's ``MMEarth.filenames``
TORCHGEO_FILENAMES: dict[str, str] = {
    "MMEarth": "data_1M_v001",
    "MMEarth64": "data_1M_v001_64",
    "MMEarth100k": "data_100k_v001",
}
class TorchGeoViewError(ValueError):
    """The dataset folder or the subset cannot give a TorchGeo view (says which and why)."""


def default_subset(dataset_dir: Path) -> str:
    """``MMEarth64`` for a 64-pixel dataset, else ``MMEarth`` (both 128-pixel releases
    read the same; pass ``MMEarth100k`` to use that name)."""
    with h5py.File(DatasetLayout(dataset_dir).h5, "r") as f:
        size = f["sentinel2"].shape[-1]
    return "MMEarth64" if size == 64 else "MMEarth"


def torchgeo_view(dataset_dir: str | Path, subset: str | None = None, root: str | Path | None = None) -> Path:
    """Make ``root/<release name of subset>/`` hold links named as TorchGeo opens them to
    the four files of ``dataset_dir`` (``NAME.h5``, ``NAME_band_stats.json``, ...).
    ``root`` defaults to ``<dataset_dir's parent>/torchgeo``. Returns the view folder;
    pass ``root`` and ``subset`` to ``torchgeo.datasets.MMEarth``."""
    dataset_dir = Path(dataset_dir).resolve()
    layout = DatasetLayout(dataset_dir)
    missing = [path.name for path in layout.dataset_files() if not path.is_file()]
    if missing:
        raise TorchGeoViewError(f"{dataset_dir} is not a finished dataset: {', '.join(missing)} missing "
                                f"(run python -m flows.multimodal first)")
    subset = subset or default_subset(dataset_dir)
    if subset not in TORCHGEO_FILENAMES:
        raise TorchGeoViewError(f"subset {subset!r}: TorchGeo's MMEarth knows {sorted(TORCHGEO_FILENAMES)}")
    release = TORCHGEO_FILENAMES[subset]
    view = layout.torchgeo_view(release, Path(root).resolve() if root is not None else None)
    if view == dataset_dir:
        raise TorchGeoViewError(f"{dataset_dir} already has the release name {release}: TorchGeo reads it as it is "
                                f"(root={dataset_dir.parent})")
    view.mkdir(parents=True, exist_ok=True)
    # the files TorchGeo's ``MMEarth._verify`` requires, by suffix after the name
    for path, suffix in zip(layout.dataset_files(), DATASET_SUFFIXES):
        link_atomic(Path(os.path.relpath(path, view)), view / (release + suffix))
    return view


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.multimodal.torchgeo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset_dir", help="the dataset folder (output_dir/NAME)")
    p.add_argument("--subset", choices=sorted(TORCHGEO_FILENAMES),
                   help="TorchGeo subset name (default: MMEarth64 for 64-pixel tiles, else MMEarth)")
    p.add_argument("--root", help="where the release-named folder goes (default: <output_dir>/torchgeo)")
    args = p.parse_args(argv)
    try:
        view = torchgeo_view(args.dataset_dir, args.subset, args.root)
    except (TorchGeoViewError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    subset = next(k for k, v in TORCHGEO_FILENAMES.items() if v == view.name)
    print(f"{view}\nTorchGeo: MMEarth(root={str(view.parent)!r}, subset={subset!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
