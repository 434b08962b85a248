"""Post-processing: GeoTIFF stacks -> ``NAME.h5`` rows, statistics and splits.

Every tile goes through :func:`pack_tile`: read its stack once (digest and grid checked
against what was recorded when it was written), centre-crop, map bands to the h5
datasets, gzip-compress every row as one HDF5 chunk, and take its statistics (exact sums,
:mod:`~tasks.multimodal.stats`: the same bytes however tiles are grouped). Two ways put the
tiles in the h5:

* :func:`pack_to_h5`, post-processing a known list of tiles in one pass: processes (forked
  from this one: no start-up) pack tiles while the calling process, the single writer, puts
  each tile's chunks in its row of datasets made for every tile up front, and adds up the
  statistics. No part files, no second pass; used for post-processing alone up to
  :data:`LOCAL_PACK_MAX_TILES` tiles.
* In parts, as the flow runs it beside the fetch: :func:`pack_partition` (on any Dask
  worker, or in local threads with :func:`pack_partitions_local`; one contiguous slice of
  the tile list) writes ``work/parts/part_NNNNN.npz`` (compressed chunks, offsets, tile
  ids, per-tile problems, statistics) atomically; a stack that is not the one written is
  reported in ``PartResult.integrity`` so the flow fetches the tile again. A part whose
  inputs did not change (same tiles, same stack files, same tile_info, same settings) is
  re-used by later runs. Then :func:`assemble_h5` (one writer) creates ``NAME.h5`` and
  appends every part's pre-compressed chunks with ``write_direct_chunk``, so compression
  ran on all workers and the writer only copies bytes. Memory is bounded by one part,
  whatever N is.

Both give the same h5 (datasets, attributes, every chunk's bytes) and the same statistics.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tasks.common.atomic import atomic_path, write_json_atomic
from tasks.multimodal import schema
from tasks.multimodal.layout import DatasetLayout
from tasks.multimodal.stacks import StackIntegrityError, read_verified_stack, strict_json_value
from tasks.multimodal.schema import H5_DATASETS, METADATA_DTYPE, N_BIOMES, N_ECOREGIONS
from tasks.multimodal.sources.base import StackReadError
from tasks.multimodal.stats import ExactStats, StatsAccumulator, tile_stats

log = logging.getLogger(__name__)

PART_FORMAT = 4  # bump when the part content changes, so old parts are stale

try:  # ISA-L deflate: zlib-compatible streams, ~10x faster than zlib level 4
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - isal is a declared dependency
    _isal_zlib = None


@dataclass(frozen=True)
class Compression:
    """How chunks are gzip(deflate)-compressed. Any codec yields standard zlib
    streams that HDF5's gzip filter (and so every reader) decodes."""

    codec: str = "isal"  # "isal" or "zlib"
    level: int = 1  # isal: 0..3, zlib: 1..9

    def compressor(self):
        if self.codec == "isal" and _isal_zlib is not None:
            level = min(max(self.level, 0), 3)
            return lambda b: _isal_zlib.compress(b, level)
        level = min(max(self.level, 1), 9)
        return lambda b: zlib.compress(b, level)

    @property
    def h5_level(self) -> int:
        """compression_opts recorded in the file (informational for readers)."""
        return min(max(self.level, 1), 9)


class TileProblem(Exception):
    """A stack that does not match its tile_info; reported, never silently dropped."""


# --------------------------------------------------------------------------
# One tile
# --------------------------------------------------------------------------
def _centre_crop(data: np.ndarray, size: int) -> np.ndarray:
    _, h, w = data.shape
    if h < size or w < size:
        raise TileProblem(f"stack is {h}x{w} pixels, smaller than the image size {size}")
    y0, x0 = (h - size) // 2, (w - size) // 2
    return data[:, y0:y0 + size, x0:x0 + size]


def _to_dtype(x: np.ndarray, dtype: np.dtype, fill: float | int) -> np.ndarray:
    """Cast float pixels to ``dtype``: NaN -> ``fill``; integers rounded and clipped."""
    nan = np.isnan(x)
    has_nan = bool(nan.any())  # most bands have none: skip the masking passes (same result)
    if dtype.kind == "f":
        out = x.astype(dtype)
        if has_nan:
            out[nan] = fill
        return out
    info = np.iinfo(dtype)
    r = np.rint(np.where(nan, 0, x) if has_nan else x)
    out = np.clip(r, info.min, info.max, out=r).astype(dtype)
    if has_nan:
        out[nan] = fill
    return out


def tile_rows(
    data: np.ndarray, names: list[str], info: dict[str, Any], tile_id: str, image_size: int,
) -> dict[str, np.ndarray]:
    """Map one stack (B, H, W float32) and its tile_info entry to one row per h5 dataset.

    Raises :class:`TileProblem` when the stack does not match the bands its
    tile_info declares.
    """
    bands = info.get("BANDS")
    if not isinstance(bands, dict):
        raise TileProblem("tile_info has no BANDS dictionary")
    s2_type = info.get("S2_type")
    if s2_type not in schema.S2_TYPES:
        raise TileProblem(f"tile_info S2_type is {s2_type!r}, expected 'l2a' or 'l1c'")
    expected = schema.stack_band_descriptions(bands)
    if data.shape[0] != len(expected):
        raise TileProblem(f"stack has {data.shape[0]} bands but tile_info BANDS declares {len(expected)}")
    if any(names) and names != expected:
        bad = next(i for i, (a, b) in enumerate(zip(names, expected)) if a != b)
        raise TileProblem(
            f"band {bad + 1} of the stack is {names[bad]!r} but tile_info BANDS declares {expected[bad]!r}"
        )
    data = _centre_crop(data, image_size)
    S = image_size
    index = {name: i for i, name in enumerate(expected)}

    def band(group: str, name: str) -> np.ndarray | None:
        i = index.get(schema.band_description(group, name))
        return None if i is None else data[i]

    rows: dict[str, np.ndarray] = {}
    spec = schema.H5_BY_NAME

    s2 = np.zeros((13, S, S), np.uint16)
    for c, name in enumerate(schema.S2_SPECTRAL):
        b = band("sentinel2", name)
        if b is not None:
            s2[c] = _to_dtype(b, spec["sentinel2"].dtype, 0)
    rows["sentinel2"] = s2
    for ds, name in (("sentinel2_cloudmask", "QA60"), ("sentinel2_cloudprod", "MSK_CLDPRB"), ("sentinel2_scl", "SCL")):
        d = spec[ds]
        b = band("sentinel2", name)
        rows[ds] = (np.full((1, S, S), d.fill, d.dtype) if b is None else _to_dtype(b, d.dtype, d.fill)[None])

    s1 = np.full((8, S, S), -np.inf, np.float32)
    for o, orbit in enumerate(("asc", "desc")):
        for pol in bands.get(f"sentinel1_{orbit}") or ():
            if pol not in schema.S1_POLARISATIONS:
                raise TileProblem(f"sentinel1_{orbit} band {pol!r} is not one of {schema.S1_POLARISATIONS}")
            s1[4 * o + schema.S1_POLARISATIONS.index(pol)] = _to_dtype(band(f"sentinel1_{orbit}", pol), np.dtype("float32"), -np.inf)
    rows["sentinel1"] = s1

    for ds, group, names_ in (
        # the stack's own names in file order: ["elevation", "slope"], or the original's ["b1", "slope"]
        ("aster", "aster", tuple(bands.get("aster") or schema.ASTER_BANDS)),
        ("canopy_height_eth", "canopy_height_eth", schema.CANOPY_BANDS),
    ):
        d = spec[ds]
        out = np.full((d.channels, S, S), d.fill, d.dtype)
        for c, name in enumerate(names_):
            b = band(group, name)
            if b is not None:
                out[c] = _to_dtype(b, d.dtype, d.fill)
        rows[ds] = out
    dw = band("dynamic_world", "label")
    # the stack already holds label + 1 (shifted on Earth Engine, as the original); 0 = no data
    rows["dynamic_world"] = (np.zeros((1, S, S), np.uint8) if dw is None
                             else _to_dtype(dw, np.dtype("uint8"), 0)[None])
    wc = band("esa_worldcover", "Map")
    rows["esa_worldcover"] = (np.zeros((1, S, S), np.uint8) if wc is None
                              else _to_dtype(wc, np.dtype("uint8"), 0)[None])

    era5 = info.get("era5") or {}
    vec = []
    for part in ("month1", "month2", "year"):
        v = era5.get(part)
        vec.extend(v if isinstance(v, list) and len(v) == 4 else [math.nan] * 4)
    rows["era5"] = np.array([math.nan if x is None else x for x in vec], np.float32)

    try:
        lat, lon = float(info["lat"]), float(info["lon"])
        year, month, _ = (int(p) for p in str(info["S2_DATE"]).split("-"))
        biome, eco = int(info["biome"]), int(info["eco_region"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TileProblem(f"tile_info field missing or malformed: {exc}") from exc
    if not 1 <= month <= 12:
        raise TileProblem(f"tile_info S2_DATE {info['S2_DATE']!r} has no valid month")
    if not 0 <= biome < N_BIOMES:
        raise TileProblem(f"tile_info biome index {biome} outside 0..{N_BIOMES - 1}")
    if not 0 <= eco < N_ECOREGIONS:
        raise TileProblem(f"tile_info eco_region index {eco} outside 0..{N_ECOREGIONS - 1}")
    rows["lat"] = np.array([math.sin(math.radians(lat)), math.cos(math.radians(lat))], np.float32)
    rows["lon"] = np.array([math.sin(math.radians(lon)), math.cos(math.radians(lon))], np.float32)
    rows["month"] = np.array([math.sin(2 * math.pi * month / 12), math.cos(2 * math.pi * month / 12)], np.float32)
    one = np.zeros(N_BIOMES, np.uint8)
    one[biome] = 1
    rows["biome"] = one
    eco_one = np.zeros(N_ECOREGIONS, np.uint16)
    eco_one[eco] = 1
    rows["eco_region"] = eco_one
    return rows


#: the h5 datasets in the order a packed tile holds its compressed chunks (metadata last)
CHUNK_DATASETS: tuple[str, ...] = tuple(d.name for d in H5_DATASETS) + ("metadata",)


@dataclass
class PackedTile:
    """One tile ready for the writer: a compressed chunk per dataset (in
    :data:`CHUNK_DATASETS` order) and its statistics; or why it has no row."""

    tile_id: str
    chunks: list[bytes] = field(default_factory=list)
    stats: dict[str, ExactStats] = field(default_factory=dict)
    problem: str | None = None
    integrity: bool = False  # the problem is a stack that is not the one written


def pack_tile(tid: str, tiles_dir: Path, tile_info: Any, image_size: int, compress) -> PackedTile:
    """Read one stack (its digest and grid checked against its record), convert it to one row
    per h5 dataset, compress each row as one chunk and take its statistics. A stack that
    cannot be used (unreadable, not the one written, not matching its tile_info) gives a
    :class:`PackedTile` with ``problem`` set, not an exception."""
    info = tile_info.get(tid)
    if info is None:
        return PackedTile(tid, problem="no tile_info entry")
    try:
        data, descs = read_verified_stack(tiles_dir / f"{tid}.tif", info.get("STACK"))
        rows = tile_rows(data, descs, info, tid, image_size)
    except StackIntegrityError as exc:
        return PackedTile(tid, problem=str(exc), integrity=True)
    except (StackReadError, TileProblem) as exc:
        return PackedTile(tid, problem=str(exc))
    stats = tile_stats(rows, info["S2_type"])
    rows["metadata"] = np.array([(tid.encode(), info["S2_type"].encode())], METADATA_DTYPE)
    # bytes, not the arrays' buffers: ISA-L's stream for the same pixels was seen to differ
    # (both valid) when handed an array instead of bytes, and the chunks must be the same bytes
    chunks = [compress(np.ascontiguousarray(rows[n]).tobytes()) for n in CHUNK_DATASETS]
    return PackedTile(tid, chunks, stats)


# --------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------
@dataclass
class PartSpec:
    """One contiguous slice of the dataset's tile list."""

    index: int
    tile_ids: list[str]
    key: str | None = None  # what the content depends on (default: part_key of the files)


@dataclass
class PartResult:
    index: int
    path: str  # "" when not written (see pack_partition's defer_on_mismatch)
    n_rows: int
    problems: dict[str, str] = field(default_factory=dict)  # tile_id -> reason
    reused: bool = False
    integrity: dict[str, str] = field(default_factory=dict)  # tile_id -> stack not the one written


def _file_sig(path: Path) -> list[Any]:
    try:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    except FileNotFoundError:
        return [None, None]


def part_key(spec: PartSpec, tiles_dir: Path, tile_info: dict[str, Any], image_size: int,
             compression: Compression) -> str:
    """Hash of everything a part's content depends on."""
    h = hashlib.sha256()
    h.update(json.dumps([PART_FORMAT, image_size, compression.codec, compression.level]).encode())
    for tid in spec.tile_ids:
        h.update(json.dumps([tid, _file_sig(tiles_dir / f"{tid}.tif"), tile_info.get(tid)],
                            sort_keys=True, default=str).encode())
    return h.hexdigest()


def entries_part_key(tile_ids: list[str], entries: Any, image_size: int, compression: Compression) -> str:
    """Part key from the stacks index (fetch key and stack digest per tile): what a part's
    content depends on, without opening a file."""
    h = hashlib.sha256()
    h.update(json.dumps([PART_FORMAT, "index", image_size, compression.codec, compression.level]).encode())
    for tid in tile_ids:
        e = entries[tid]
        h.update(f"{tid}\0{e.key}\0{e.digest}\0{e.size}\n".encode())
    return h.hexdigest()


def pack_partition(
    spec: PartSpec, tiles_dir: str | Path, tile_info: Any, parts_dir: str | Path,
    image_size: int = 128, compression: Compression = Compression(), defer_on_mismatch: bool = False,
) -> PartResult:
    """Convert one slice of tiles into compressed h5 rows + statistics (see module doc).

    ``tile_info`` maps tile id -> tile JSON (a dict, or ``stacks.TileInfoDir`` that
    reads them on the worker). A stack whose digest or grid differs from its
    record is a problem and is listed in ``integrity``; with ``defer_on_mismatch``
    the part is then not written (``path`` is ""), for the caller fetches those
    tiles again and packs the part anew.
    """
    tiles_dir, parts_dir = Path(tiles_dir), Path(parts_dir)
    path = parts_dir / f"part_{spec.index:05d}.npz"
    key = spec.key or part_key(spec, tiles_dir, tile_info, image_size, compression)
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    problems = json.loads(str(z["problems"]))
                    return PartResult(spec.index, str(path), int(z["n_rows"]), problems, reused=True)
        except Exception as exc:  # unreadable part: rebuild it
            log.warning("part %s unreadable (%s); rebuilding", path, exc)

    compress = compression.compressor()
    chunks: dict[str, list[bytes]] = {n: [] for n in CHUNK_DATASETS}
    ids: list[str] = []
    problems: dict[str, str] = {}
    integrity: dict[str, str] = {}
    acc = StatsAccumulator()
    for tid in spec.tile_ids:
        packed = pack_tile(tid, tiles_dir, tile_info, image_size, compress)
        if packed.problem is not None:
            problems[tid] = packed.problem
            if packed.integrity:
                integrity[tid] = packed.problem
            continue
        acc.add_tile(packed.stats)
        for n, blob in zip(CHUNK_DATASETS, packed.chunks):
            chunks[n].append(blob)
        ids.append(tid)

    if integrity and defer_on_mismatch:
        return PartResult(spec.index, "", len(ids), problems, integrity=integrity)
    arrays: dict[str, np.ndarray] = {}
    for n, blobs in chunks.items():
        sizes = np.array([len(b) for b in blobs], np.int64)
        arrays[f"off_{n}"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        arrays[f"data_{n}"] = np.frombuffer(b"".join(blobs), np.uint8)
    arrays.update(acc.to_npz_dict())
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, key=np.array(key), n_rows=np.array(len(ids)), tile_ids=np.array(ids, dtype="U100"),
                     problems=np.array(json.dumps(problems)), **arrays)
    return PartResult(spec.index, str(path), len(ids), problems, integrity=integrity)


def make_partitions(tile_ids: list[str], part_size: int) -> list[PartSpec]:
    part_size = max(1, int(part_size))
    return [PartSpec(i, tile_ids[s:s + part_size]) for i, s in enumerate(range(0, len(tile_ids), part_size))]


#: Post-processing alone (stacks already on disk, no cluster running yet) of at most this many
#: tiles packs in local processes beside the single writer (:func:`pack_to_h5`: no part files,
#: no second pass; :func:`pack_partitions_local` packs parts in local threads) rather than on a
#: Dask cluster it would first have to start. Starting a local cluster (2 nannies + 2 spawned
#: workers, each importing numpy, h5py, rasterio and distributed) cost about 5 s of wall and 3-6 s
#: of CPU on the 2-core machine, and the scheduler about 1 ms of CPU a tile: at 1000 tiles that was
#: a third of the CPU of the whole stage (see docs/benchmarks.md, issue 25 part 3). Forked packing
#: processes start in milliseconds. Above this size (about 40 s of packing on 2 cores) the
#: cluster's start-up is under a tenth of the stage and a cluster can spread it over more machines.
LOCAL_PACK_MAX_TILES = 5000


def packs_locally(n_tiles: int) -> bool:
    """Whether post-processing ``n_tiles`` alone packs locally (see
    :data:`LOCAL_PACK_MAX_TILES`) instead of on a Dask cluster."""
    return n_tiles <= LOCAL_PACK_MAX_TILES


def pack_partitions_local(
    specs: list[PartSpec], tiles_dir: str | Path, tile_info: Any, parts_dir: str | Path, image_size: int = 128,
    compression: Compression = Compression(), threads: int = 2, defer_on_mismatch: bool = False,
) -> list[PartResult]:
    """:func:`pack_partition` of every spec in ``threads`` threads of this process, results in
    the order of ``specs`` (the same parts, byte for byte, as on Dask workers)."""
    def one(spec: PartSpec) -> PartResult:
        return pack_partition(spec, tiles_dir, tile_info, parts_dir, image_size, compression, defer_on_mismatch)

    with ThreadPoolExecutor(max(1, int(threads)), thread_name_prefix="pack") as pool:
        return list(pool.map(one, specs))


# --------------------------------------------------------------------------
# The single writer
# --------------------------------------------------------------------------
def create_datasets(f: h5py.File, n: int, image_size: int, compression: Compression,
                    attrs: dict[str, Any] | None = None) -> dict[str, h5py.Dataset]:
    """The h5's ``n``-row datasets with MMEarth's schema (one chunk per row, gzip), in
    :data:`CHUNK_DATASETS` order, and ``attrs`` as the file's attributes."""
    S = image_size
    f.attrs.update(attrs or {})
    dsets: dict[str, h5py.Dataset] = {}
    for d in H5_DATASETS:
        shape = (n, d.channels, S, S) if d.spatial else (n, d.channels)
        dsets[d.name] = f.create_dataset(
            d.name, shape=shape, dtype=d.dtype, chunks=(1,) + shape[1:],
            maxshape=None if n else (None,) + shape[1:],  # an empty dataset still opens
            compression="gzip", compression_opts=compression.h5_level,
            **({"fillvalue": d.fill} if d.fill is not None else {}),
        )
    dsets["metadata"] = f.create_dataset(
        "metadata", shape=(n,), dtype=METADATA_DTYPE, chunks=(1,), maxshape=None if n else (None,),
        compression="gzip", compression_opts=compression.h5_level,
    )
    return dsets


def assemble_h5(parts: list[PartResult], h5_path: str | Path, image_size: int = 128,
                compression: Compression = Compression(), attrs: dict[str, Any] | None = None) -> int:
    """Write ``NAME.h5`` from parts (in index order) with direct chunk writes, ``attrs`` as the
    file's attributes (e.g. the source and whether it is synthetic). Returns N."""
    parts = sorted(parts, key=lambda p: p.index)
    n = sum(p.n_rows for p in parts)
    h5_path = Path(h5_path)
    with atomic_path(h5_path) as tmp:
        with h5py.File(tmp, "w") as f:
            dsets = create_datasets(f, n, image_size, compression, attrs)
            row = 0
            for p in parts:
                with np.load(p.path, allow_pickle=False) as z:
                    k = int(z["n_rows"])
                    for name, ds in dsets.items():
                        off, data = z[f"off_{name}"], z[f"data_{name}"]
                        tail = (0,) * (ds.ndim - 1)
                        for i in range(k):
                            # a view of the part's bytes (h5py takes any buffer): no copy per chunk
                            ds.id.write_direct_chunk((row + i,) + tail, data[off[i]:off[i + 1]], 0)
                row += k
    return n


@dataclass
class WriteResult:
    """What :func:`pack_to_h5` wrote: the h5's rows (tile ids in row order), the tiles left out
    and why (``integrity``: those whose stack is not the one written), and the statistics."""

    tile_ids: list[str]
    problems: dict[str, str]
    integrity: dict[str, str]
    stats: StatsAccumulator

    @property
    def n_rows(self) -> int:
        return len(self.tile_ids)


def _pack_tile_guarded(tile_id: str, tiles_dir: Path, tile_info: Any, image_size: int, compress) -> PackedTile:
    """:func:`pack_tile`, with an unexpected error turned into this tile's problem (one bad tile
    never sinks the dataset)."""
    try:
        return pack_tile(tile_id, tiles_dir, tile_info, image_size, compress)
    except Exception as exc:  # noqa: BLE001 - reported per tile, the others go on
        return PackedTile(tile_id, problem=f"{type(exc).__name__}: {exc}")


#: tiles per task handed to a packing process (fewer round trips; the writer waits for at most this many)
PACK_CHUNK = 8


def _pack_tiles(tile_ids: list[str], tiles_dir: Path, tile_info: Any, image_size: int,
                compression: Compression) -> list[PackedTile]:
    """:func:`pack_tile` of a few tiles, in a packing process (what its task returns)."""
    compress = compression.compressor()
    return [_pack_tile_guarded(t, tiles_dir, tile_info, image_size, compress) for t in tile_ids]


def _process_pool(workers: int) -> ProcessPoolExecutor:
    """Packing processes: forked when this process runs no other thread (no start-up: the
    modules are already imported), else from a fork server (a forked child of a threaded
    process may inherit a lock another thread held)."""
    method = "fork" if threading.active_count() == 1 else "forkserver"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))


def _packed_in_order(tile_ids: list[str], tiles_dir: Path, tile_info: Any, image_size: int,
                     compression: Compression, workers: int, processes: bool = True) -> Iterator[PackedTile]:
    """:func:`pack_tile` of every tile in ``workers`` processes (``processes=False``: threads
    of this process), yielded in the order of ``tile_ids``, a few tasks of :data:`PACK_CHUNK`
    tiles per worker ahead of the consumer (bounded memory). Packing holds the GIL for most
    of its time (opening a GeoTIFF, numpy's small reductions, the statistics), so threads use
    about 1.5 of 2 cores and processes 2. If a packing process dies (a crash in a library on
    some stack), the tiles not yet packed go on in threads of this process."""
    workers = max(1, int(workers))
    chunks = iter([tile_ids[i:i + PACK_CHUNK] for i in range(0, len(tile_ids), PACK_CHUNK)])
    pool = _process_pool(workers) if processes else ThreadPoolExecutor(workers, thread_name_prefix="pack")
    pending: deque = deque()
    try:
        def submit(part: list[str]) -> None:
            pending.append((part, pool.submit(_pack_tiles, part, tiles_dir, tile_info, image_size, compression)))

        for part in itertools.islice(chunks, 3 * workers):
            submit(part)
        while pending:
            part, fut = pending.popleft()
            try:
                packed = fut.result()
            except BrokenProcessPool:
                rest = part + [t for p, _ in pending for t in p] + [t for p in chunks for t in p]
                log.warning("a packing process died; the %d tiles left are packed in threads", len(rest))
                pending.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                yield from _packed_in_order(rest, tiles_dir, tile_info, image_size, compression, workers, False)
                return
            nxt = next(chunks, None)
            if nxt is not None:
                submit(nxt)
            yield from packed
    finally:  # the writer stopped (an error, or closed early): drop what has not started
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def pack_to_h5(tile_ids: list[str], tiles_dir: str | Path, tile_info: Any, h5_path: str | Path,
               image_size: int = 128, compression: Compression = Compression(), workers: int = 2,
               attrs: dict[str, Any] | None = None, processes: bool = True) -> WriteResult:
    """Post-processing in one pass, with no part files: ``workers`` processes (or threads) pack tiles
    (:func:`pack_tile`: read, check, convert, compress, statistics) while this thread, the
    single writer, puts each tile's chunks into ``NAME.h5`` as soon as it is its row's turn,
    into datasets made for every tile up front, and adds its statistics (exact sums: the same
    bytes as packing in parts and merging them). Rows follow ``tile_ids``; a tile that cannot
    be used is left out and reported. The h5 is written under a temporary name and renamed
    when complete; when tiles were left out it is first copied, chunk by chunk, into datasets
    of the right length, so it has the same layout as :func:`assemble_h5`'s. On an error the
    temporary file is removed and an existing ``h5_path`` is left as it was; so it is when no
    tile gave a row (a good dataset is never replaced by an empty one)."""
    tiles_dir, h5_path = Path(tiles_dir), Path(h5_path)
    result = WriteResult([], {}, {}, StatsAccumulator())
    try:
        _write_h5(tile_ids, tiles_dir, tile_info, h5_path, image_size, compression, workers, processes, attrs, result)
    except _KeepExisting:
        pass
    return result


class _KeepExisting(Exception):
    """No tile gave a row and ``NAME.h5`` exists: it is kept, not replaced by an empty one."""


def _write_h5(tile_ids: list[str], tiles_dir: Path, tile_info: Any, h5_path: Path, image_size: int,
              compression: Compression, workers: int, processes: bool, attrs: dict[str, Any] | None,
              result: WriteResult) -> None:
    """:func:`pack_to_h5`'s single writer (fills ``result``)."""
    with atomic_path(h5_path) as tmp:
        with h5py.File(tmp, "w") as f:
            dsets = create_datasets(f, len(tile_ids), image_size, compression, attrs)
            targets = [(dsets[n].id, (0,) * (dsets[n].ndim - 1)) for n in CHUNK_DATASETS]
            packing = contextlib.closing(
                _packed_in_order(tile_ids, tiles_dir, tile_info, image_size, compression, workers, processes))
            with packing as in_order:  # closed (its workers stopped) when the writer stops, even on an error
                for packed in in_order:
                    if packed.problem is not None:
                        result.problems[packed.tile_id] = packed.problem
                        if packed.integrity:
                            result.integrity[packed.tile_id] = packed.problem
                        continue
                    row = (result.n_rows,)
                    for (ds, tail), blob in zip(targets, packed.chunks):
                        ds.write_direct_chunk(row + tail, blob, 0)
                    result.stats.add_tile(packed.stats)
                    result.tile_ids.append(packed.tile_id)
        if not result.n_rows and h5_path.exists():  # a good dataset is never replaced by 0 rows
            raise _KeepExisting
        if result.n_rows < len(tile_ids):
            _copy_rows(tmp, result.n_rows, image_size, compression)


def _copy_rows(h5: Path, n: int, image_size: int, compression: Compression) -> None:
    """Replace ``h5`` (a temporary file) by a copy holding its first ``n`` rows, chunk by chunk."""
    with atomic_path(h5) as tmp, h5py.File(h5, "r") as src, h5py.File(tmp, "w") as dst:
        dsets = create_datasets(dst, n, image_size, compression, dict(src.attrs))
        for name, ds in dsets.items():
            source = src[name].id
            tail = (0,) * (ds.ndim - 1)
            for i in range(n):
                mask, blob = source.read_direct_chunk((i,) + tail)
                ds.id.write_direct_chunk((i,) + tail, blob, mask)


def part_summary(part: PartResult) -> dict[str, Any]:
    """What the dataset needs from a part once its chunks are in the h5."""
    with np.load(part.path, allow_pickle=False) as z:
        stats = StatsAccumulator.from_npz(z)
        return {
            "index": part.index, "key": str(z["key"]), "n_rows": int(z["n_rows"]),
            "tile_ids": [str(t) for t in z["tile_ids"]], "problems": json.loads(str(z["problems"])),
            "stats": stats.to_state(),
        }


def merge_stats(summaries: list[dict[str, Any]]) -> StatsAccumulator:
    """Merge the statistics of part summaries (exact sums: any order gives the same bytes)."""
    acc = StatsAccumulator()
    for s in summaries:
        acc = acc.merge(StatsAccumulator.from_state(s["stats"]))
    return acc


def merge_part_stats(parts: list[PartResult]) -> StatsAccumulator:
    return merge_stats([part_summary(p) for p in parts])


def read_manifest(h5_path: Path, manifest_path: Path, keys: list[str]) -> list[dict[str, Any]] | None:
    """The part summaries ``h5_path`` was built from, if it was built from exactly
    the parts ``keys`` and is unchanged since; else None."""
    if not h5_path.exists() or not manifest_path.exists():
        return None
    try:
        m = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    parts = m.get("parts") or []
    if [p.get("key") for p in parts] != keys or m.get("h5_size") != h5_path.stat().st_size \
            or m.get("h5_mtime_ns") != h5_path.stat().st_mtime_ns:
        return None
    return parts


def write_manifest(h5_path: Path, manifest_path: Path, summaries: list[dict[str, Any]]) -> None:
    st = h5_path.stat()
    write_json_atomic(manifest_path, {"h5_size": st.st_size, "h5_mtime_ns": st.st_mtime_ns,
                                      "parts": sorted(summaries, key=lambda s: s["index"])})


# --------------------------------------------------------------------------
# Splits and the small JSON outputs
# --------------------------------------------------------------------------
def make_splits(n: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 42) -> dict[str, list[int]]:
    """Random train/val/test row indices (each sorted), as the original's splits.json."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions {fractions} must be three non-negative numbers summing to 1")
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(fractions[0] * n)
    n_val = int(fractions[1] * n)
    return {
        "train": sorted(int(i) for i in perm[:n_train]),
        "val": sorted(int(i) for i in perm[n_train:n_train + n_val]),
        "test": sorted(int(i) for i in perm[n_train + n_val:]),
    }


def write_dataset_jsons(out_dir: Path, name: str, tile_info: dict[str, Any] | None, band_stats: dict[str, Any],
                        splits: dict[str, list[int]]) -> dict[str, Path]:
    layout = DatasetLayout(out_dir, name)
    paths = {"tile_info": layout.tile_info, "band_stats": layout.band_stats, "splits": layout.splits}
    if tile_info is not None:  # None: the caller streams it (stacks.write_tile_info_json)
        write_json_atomic(paths["tile_info"], strict_json_value(tile_info), allow_nan=False)
    # strict JSON: every value is a finite number (ChannelStats.to_json); a NaN would fail here
    write_json_atomic(paths["band_stats"], band_stats, allow_nan=False)
    write_json_atomic(paths["splits"], splits)
    return paths
