"""Compare two output folders file by file: what a refactor changed in the data a run writes.

    python bench/compare_outputs.py BEFORE/output AFTER/output [--show 20]

Every file is compared byte for byte (sha256). A file whose bytes differ is compared by content
where the format allows it: HDF5 (every dataset's dtype, shape and values, every attribute),
JSON (parsed, key order ignored; rerun keys, the digests of a stage's inputs and settings, are
reported apart), npz (every array), SQLite (every table's rows, sorted), GeoTIFF (pixels,
transform, CRS, tags through rasterio).
Files are sorted into

- data: what training code or the next stage reads (h5, statistics, splits, tile_info, stacks,
  sparse models, depth maps, fused points, training exports, images): a difference here is a
  changed result and makes the exit status 1;
- run records: files that say when and how a run went (logs, report.json, run locks, progress,
  pictures, Prefect's database, the resume bookkeeping with file mtimes): listed, never a
  failure, because they hold times and paths.

Exit status: 0 when every data file is byte-identical or equal in content, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

#: path parts and suffixes of files that record a run rather than its data
RECORD_PARTS = {"logs", ".prefect", "__pycache__"}
RECORD_SUFFIXES = {".log", ".png", ".jpg.lock", ".lock", ".svg", ".html"}
RECORD_NAMES = {"report.json", "report.md", "run.json", "runlock.json", "problems.json", "progress.json",
                # resume bookkeeping of the multimodal run: file mtimes, lines in completion order
                "h5_manifest.json", "stacks_index.jsonl",
                # the synthetic world's record: its root folder and render times
                "world_info.json",
                # a stage's completion marker: the digest of its inputs and settings (a rerun key)
                ".complete"}


def is_record(rel: Path) -> bool:
    """Whether ``rel`` is a run record (times, paths, pictures) rather than data."""
    if RECORD_PARTS & set(rel.parts):
        return True
    if rel.name in RECORD_NAMES or rel.name.startswith((".run", ".lock")):
        return True
    return rel.suffix.lower() in RECORD_SUFFIXES and not _is_dataset_image(rel)


def _is_dataset_image(rel: Path) -> bool:
    # images that are data: MegaDepth photos, Earth Studio frames, segmentation PNGs of exports
    return any(p in rel.parts for p in ("megadepth", "megadepth_processed", "downloaded_data", "images",
                                        "footage")) or "segmentation" in str(rel)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _h5_content(path: Path) -> dict[str, object]:
    import h5py

    out: dict[str, object] = {}

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset):
            data = obj[()]
            out[name] = (str(obj.dtype), obj.shape, hashlib.sha256(np.ascontiguousarray(data).tobytes()
                                                                     if isinstance(data, np.ndarray)
                                                                     else repr(data).encode()).hexdigest())
        out[name + "@attrs"] = sorted((k, repr(v)) for k, v in obj.attrs.items())

    with h5py.File(path, "r") as f:
        out["/@attrs"] = sorted((k, repr(v)) for k, v in f.attrs.items())
        f.visititems(visit)
    return out


def _tif_content(path: Path) -> object:
    import rasterio

    with rasterio.open(path) as src:
        data = src.read()
        return (str(src.crs), tuple(src.transform), src.tags(), [src.tags(i + 1) for i in range(src.count)],
                src.nodata, src.descriptions, data.dtype.str, data.shape,
                hashlib.sha256(data.tobytes()).hexdigest())


#: JSON fields that are rerun bookkeeping (digests of a stage's inputs and settings, so a rerun knows
#: what to redo): they change with any setting or input file's time, not with the data
RERUN_KEYS = {"key", "signature", "inputs"}


def _without_rerun_keys(doc: object) -> object:
    if isinstance(doc, dict):
        return {k: _without_rerun_keys(v) for k, v in doc.items() if k not in RERUN_KEYS}
    if isinstance(doc, list):
        return [_without_rerun_keys(v) for v in doc]
    return doc


def _npz_content(path: Path) -> dict[str, object]:
    with np.load(path, allow_pickle=True) as z:  # our own outputs (LoFTR's index files are pickled dicts)
        return {k: (z[k].dtype.str, z[k].shape, hashlib.sha256(repr(z[k].tolist()).encode() if z[k].dtype == object
                                                                  else np.ascontiguousarray(z[k]).tobytes()).hexdigest())
                for k in z.files}


def _sqlite_content(path: Path) -> dict[str, str]:
    import sqlite3

    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [t for (t,) in con.execute("select name from sqlite_master where type='table'")]
        return {t: hashlib.sha256(repr(sorted(map(repr, con.execute(f'select * from "{t}"')))).encode()).hexdigest()
                for t in tables}
    finally:
        con.close()


def same_content(a: Path, b: Path) -> tuple[bool, str]:
    """Whether two files with different bytes hold the same content, and how that was judged."""
    suffix = a.suffix.lower()
    try:
        if suffix in (".h5", ".hdf5"):
            ca, cb = _h5_content(a), _h5_content(b)
            diff = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
            return not diff, "h5 content" + (f" differs in {diff[:5]}" if diff else " equal")
        if suffix in (".json", ".geojson"):
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            if ja == jb:
                return True, "json content equal"
            if _without_rerun_keys(ja) == _without_rerun_keys(jb):
                return True, "json content equal but for rerun keys (" + ", ".join(sorted(RERUN_KEYS)) + ")"
            return False, "json content differs"
        if suffix == ".npz":
            na, nb = _npz_content(a), _npz_content(b)
            diff = sorted(k for k in set(na) | set(nb) if na.get(k) != nb.get(k))
            if diff and not set(diff) - RERUN_KEYS:
                return True, f"npz arrays equal but for rerun keys ({', '.join(diff)})"
            return not diff, "npz arrays " + (f"differ in {diff[:5]}" if diff else "equal")
        if suffix == ".db":
            da, db = _sqlite_content(a), _sqlite_content(b)
            diff = sorted(k for k in set(da) | set(db) if da.get(k) != db.get(k))
            return not diff, "database rows " + (f"differ in {diff[:5]}" if diff else "equal (sorted per table)")
        if suffix in (".tif", ".tiff"):
            ta, tb = _tif_content(a), _tif_content(b)
            return ta == tb, "raster content " + ("equal" if ta == tb else "differs")
    except Exception as exc:  # noqa: BLE001 - a file we cannot parse is compared by bytes only
        return False, f"unreadable for content comparison: {type(exc).__name__}: {exc}"
    return False, "bytes differ"


def files(root: Path) -> dict[Path, Path]:
    return {p.relative_to(root): p for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def compare(before: Path, after: Path) -> dict[str, list]:
    fa, fb = files(before), files(after)
    out: dict[str, list] = {k: [] for k in ("identical", "same_content", "differs", "only_before", "only_after",
                                           "records_differ")}
    for rel in sorted(set(fa) | set(fb)):
        record = is_record(rel)
        if rel not in fb:
            out["records_differ" if record else "only_before"].append(str(rel))
            continue
        if rel not in fa:
            out["records_differ" if record else "only_after"].append(str(rel))
            continue
        if fa[rel].stat().st_size == fb[rel].stat().st_size and sha256(fa[rel]) == sha256(fb[rel]):
            out["identical"].append(str(rel))
            continue
        if record:
            out["records_differ"].append(str(rel))
            continue
        ok, how = same_content(fa[rel], fb[rel])
        out["same_content" if ok else "differs"].append(f"{rel} ({how})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--show", type=int, default=20, help="list at most this many paths per class")
    args = ap.parse_args(argv)
    result = compare(args.before, args.after)
    for cls, paths in result.items():
        print(f"{cls}: {len(paths)}")
        if cls != "identical":
            for p in paths[: args.show]:
                print(f"    {p}")
            if len(paths) > args.show:
                print(f"    ... {len(paths) - args.show} more")
    bad = result["differs"] or result["only_before"] or result["only_after"]
    print("data files: " + ("DIFFER" if bad else "all byte-identical or equal in content"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
