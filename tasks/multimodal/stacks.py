"""Stacks stage: for each tile, ask a :class:`Source` for its stack and write it.

Layout under the dataset folder ``NAME/`` (every path from :class:`tasks.multimodal.layout.DatasetLayout`):

* ``tiles/<tile_id>.tif`` - the stack (written atomically by ``write_stack``)
* ``work/tile_info/<tile_id>.json`` - the tile's tile_info entry plus
  ``FETCH_KEY`` and ``STACK`` (what identifies the GeoTIFF written: its
  CRC-32 (BLAKE2b-128 in records before 2026-12-07, see :data:`DIGESTS`) and byte
  size, and its grid: CRS, transform, size),
  written after the stack. A tile counts as done only when the JSON exists
  with the current fetch key and the GeoTIFF is the one recorded (or the JSON
  says ``NO_DATA``, a permanent outcome). Anything else is fetched again, so
  a crash at any point leaves nothing a later run would trust.
* ``work/stacks_index.jsonl`` - one line per finished tile (fetch key, state,
  size, mtime and digest of the stack), appended by the flow as batches
  finish and compacted at the start of each run. A rerun reads it in one
  pass and only ``stat``s each GeoTIFF; a tile missing from it, or whose file
  size/mtime changed, gets the full check (JSON, digest, grid). The packing
  stage checks size and digest again on the bytes it reads
  (:func:`read_verified_stack`), so a stack changed in place with its mtime
  kept is still caught there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.io import MemoryFile
from rasterio.windows import Window

from tasks.common.atomic import atomic_path, write_json_atomic
from tasks.multimodal import schema
from tasks.multimodal.layout import DatasetLayout
from tasks.multimodal.sources.base import (NoDataError, Source, StackReadError, TileStack, TransientSourceError,
                                           open_stack, write_stack)
from tasks.multimodal.tile import Grid, Tile

try:  # ISA-L's CRC-32: the same values as zlib's, about 10x faster
    from isal.isal_zlib import crc32 as _crc32_of
except ImportError:  # pragma: no cover - isal is a declared dependency
    from zlib import crc32 as _crc32_of

#: per-tile JSON fields that are fetch bookkeeping, not part of the dataset's tile_info
BOOKKEEPING = ("FETCH_KEY", "STACK")

log = logging.getLogger(__name__)


class Entry(NamedTuple):
    """A finished tile as the index records it (a tuple: ~0.3 KB a tile in memory)."""

    state: str  # "done" or "no_data"
    key: str  # fetch key
    size: int = -1  # stack bytes
    mtime_ns: int = -1
    digest: str = ""  # the stack's content digest from its record (done) or the no-data reason (no_data)


@dataclass
class TileOutcome:
    tile_id: str
    status: str  # "fetched", "skipped" (already done), "no_data", "failed", "transient"
    reason: str = ""
    entry: Entry | None = None  # set for fetched, skipped and no_data: what the index records
    rate_limited: int = 0  # "429 Too many requests" answers met on the way (this and earlier tries)


class StackIntegrityError(StackReadError):
    """A stack whose bytes or grid differ from what was recorded when it was written."""


def _crc32(data: bytes) -> str:
    return f"{_crc32_of(data):08x}"


def _blake2b(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


#: the content checks a ``STACK`` record may hold (field -> (name in messages, function)),
#: the one written first. CRC-32 (ISA-L's, 0.03 ms for a 1.5 MB stack) with the byte size
#: tells a stack from any other or a damaged copy as gzip and zip do; BLAKE2b-128 (1.7 ms, 15 % of
#: packing a tile) is what records written before 2026-12-07 hold, and is still checked.
DIGESTS: dict[str, tuple[str, Any]] = {"crc32": ("CRC-32", _crc32), "blake2b": ("BLAKE2b", _blake2b)}


def record_digest(record: dict[str, Any]) -> tuple[str, str] | None:
    """``(field, value)`` of the content digest a ``STACK`` record holds (None: none)."""
    for name in DIGESTS:
        if isinstance(record.get(name), str):
            return name, record[name]
    return None


def stack_record(tif: Path, stack: TileStack) -> dict[str, Any]:
    """What identifies the stack just written to ``tif``: content digest, size and grid."""
    raw = tif.read_bytes()
    _, h, w = stack.data.shape
    name = next(iter(DIGESTS))
    return {name: DIGESTS[name][1](raw), "bytes": len(raw), "crs": str(stack.crs),
            "transform": [float(v) for v in list(stack.transform)[:6]], "width": int(w), "height": int(h)}


def _grid_problem(src, record: dict[str, Any]) -> str | None:
    if (src.width, src.height) != (record["width"], record["height"]):
        return f"is {src.width}x{src.height} pixels, {record['width']}x{record['height']} when written"
    if src.crs is None or src.crs != CRS.from_user_input(record["crs"]):
        return f"CRS is {src.crs}, {record['crs']} when written"
    if not src.transform.almost_equals(Affine(*record["transform"]), precision=1e-6):
        return (f"transform origin is ({src.transform.c:.1f}, {src.transform.f:.1f}), "
                f"({record['transform'][2]:.1f}, {record['transform'][5]:.1f}) when written (another tile's stack?)")
    return None


def read_verified_stack(tif: str | Path, record: dict[str, Any] | None) -> tuple[np.ndarray, list[str]]:
    """Read a stack (bytes read once) after checking its size and digest against ``record``
    (the ``STACK`` field of its tile JSON; when they differ, its grid too, to say whether it is
    another tile's stack). Raises :class:`StackIntegrityError`
    on a mismatch, :class:`StackReadError` if unreadable. Without a record (stacks from
    before records were kept) only readability is checked."""
    tif = Path(tif)
    try:
        raw = tif.read_bytes()
    except OSError as exc:
        raise StackReadError(f"{tif}: cannot read GeoTIFF ({exc}); delete it so it is fetched again") from exc
    reasons: list[str] = []
    if record is not None:
        digest = record_digest(record)
        if len(raw) != record["bytes"]:
            reasons.append(f"is {len(raw)} bytes, {record['bytes']} when written")
        elif digest is None:
            reasons.append(f"its record has no content digest (one of {', '.join(DIGESTS)})")
        elif DIGESTS[digest[0]][1](raw) != digest[1]:
            reasons.append(f"content differs from what was written ({DIGESTS[digest[0]][0]} digest mismatch)")
    try:
        # GTIFF_DIRECT_IO: an uncompressed stack is copied straight into the array instead of
        # through GDAL's block cache (0.4-0.5 ms a stack less, the same pixels); GDAL ignores
        # it for compressed stacks
        with rasterio.Env(GTIFF_DIRECT_IO="YES"), MemoryFile(raw) as mem, mem.open() as src:
            if reasons:  # say what else differs (another tile's stack?); bytes that match their
                # digest are the ones written, whose grid the record holds: nothing more to check
                g = _grid_problem(src, record)
                if g:
                    reasons.append(g)
            else:
                return src.read(out_dtype=np.float32), [d or "" for d in src.descriptions]
    except (RasterioError, OSError, ValueError) as exc:
        if not reasons:
            raise StackReadError(f"{tif}: cannot read GeoTIFF ({exc}); delete it so it is fetched again") from exc
        reasons.append("unreadable")
    raise StackIntegrityError(f"{tif}: " + "; ".join(reasons))


class StackIndex:
    """``work/stacks_index.jsonl``: the finished tiles, read in one pass (see module doc).
    Only the flow process writes it."""

    def __init__(self, out_dir: Path):
        self.path = DatasetLayout(out_dir).stacks_index

    def read_table(self) -> "_IndexTable":
        """The index in one pass, as compact arrays (see :class:`_IndexTable`)."""
        return _IndexTable.from_lines(self.path)

    @staticmethod
    def _line(tile_id: str, e: Entry) -> str:
        return json.dumps({"id": tile_id, "state": e.state, "key": e.key, "bytes": e.size,
                           "mtime_ns": e.mtime_ns, "digest": e.digest}) + "\n"

    def rewrite(self, entries: Iterable[tuple[str, Entry]]) -> None:
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", encoding="utf-8") as fh:
                for tid, e in entries:
                    fh.write(self._line(tid, e))

    def append(self, items: Iterable[tuple[str, Entry]]) -> None:
        lines = [self._line(tid, e) for tid, e in items]
        if lines:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write("".join(lines))


class _IndexTable:
    """The stacks index read into sorted arrays (about 100 B a tile) with a lookup by
    tile id; the last line of a tile wins (a later line is a later outcome)."""

    def __init__(self, ids: np.ndarray, table: TileStates):
        self.order = np.argsort(ids, kind="stable")
        self.sorted_ids = ids[self.order]
        self.table = table

    @classmethod
    def from_lines(cls, path: Path, block: int = 50000) -> "_IndexTable":
        parts: list[TileStates] = []
        rows: list[tuple[str, Entry]] = []

        def flush() -> None:
            part = TileStates(np.array([tid.encode() for tid, _ in rows], dtype="S"))
            for i, (_, e) in enumerate(rows):
                part.set(i, e)
            parts.append(part)
            rows.clear()

        try:
            fh = open(path, encoding="utf-8")
        except FileNotFoundError:
            fh = None
        if fh is not None:
            with fh:
                for line in fh:  # a line cut by a crash is skipped: that tile gets the full check
                    try:
                        d = json.loads(line)
                        rows.append((d["id"], Entry(d["state"], d["key"], d.get("bytes", -1), d.get("mtime_ns", -1),
                                                    d.get("digest", ""))))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue
                    if len(rows) >= block:
                        flush()
        if rows or not parts:
            flush()
        table = _concat(parts)
        return cls(table.ids, table)

    def __len__(self) -> int:
        return len(self.sorted_ids)

    def get(self, tile_id: str) -> Entry | None:
        if not len(self.sorted_ids):
            return None
        k = tile_id.encode()
        i = int(np.searchsorted(self.sorted_ids, k, side="right")) - 1  # the last line of this id
        if i < 0 or self.sorted_ids[i] != k:
            return None
        return self.table.entry(int(self.order[i]))


class TransientTilesError(Exception):
    """Some tiles of a batch failed transiently; raising it makes Prefect retry the batch
    (tiles already written are skipped on the retry)."""

    def __init__(self, outcomes: list[TileOutcome]):
        self.outcomes = outcomes
        sample = "; ".join(f"{o.tile_id}: {o.reason}" for o in outcomes[:3])
        super().__init__(f"{len(outcomes)} tile(s) failed transiently ({sample})")

    def __reduce__(self):
        # Exception pickles as cls(*self.args), i.e. with the message for ``outcomes``:
        # rebuild from the outcomes (Dask sends it from the worker when retries run out)
        return type(self), (self.outcomes,), self.__dict__


def fetch_key(source: Source, tile: Tile, grid: Grid) -> str:
    """What a tile's stack depends on: the source and its settings, the tile, the grid."""
    blob = json.dumps(
        [source.name, source.cache_key(), tile.tile_id, tile.geometry,
         tile.biome, tile.eco_region, grid.crs, list(grid.transform)[:6], grid.size],
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def stack_is_complete(tif: Path, bands: dict[str, Any], size: int | None = None) -> str | None:
    """Return None if ``tif`` is a complete stack declaring ``bands``, else the reason."""
    expected = schema.stack_band_descriptions(bands)
    try:
        with open_stack(tif) as src:
            if src.count != len(expected):
                return f"has {src.count} bands, tile_info declares {len(expected)}"
            if any(src.descriptions) and list(src.descriptions) != expected:
                return "band names differ from tile_info BANDS"
            if size is not None and (src.width, src.height) != (size, size):
                return f"is {src.width}x{src.height}, expected {size}x{size}"
            # reading the last row of the last band detects a truncated file
            src.read(src.count, window=Window(0, src.height - 1, src.width, 1))
    except (RasterioError, OSError) as exc:
        return f"unreadable ({exc})"
    return None


def tile_check(tile: Tile, key: str, layout: DatasetLayout, size: int | None,
               why: dict[str, str] | None = None) -> Entry | None:
    """The full check of one tile (JSON, fetch key, stack digest and grid): its index
    entry if it needs no fetching, else None (and, with ``why``, the reason a stack on
    record failed the check in ``why[tile_id]``)."""
    meta = layout.tile_json(tile.tile_id)
    try:
        info = json.loads(meta.read_text())
        if not isinstance(info, dict):
            raise ValueError(f"a JSON {type(info).__name__}, not an object")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError included
        if why is not None:  # its metadata would be lost from NAME_tile_info.json: fetched again
            why[tile.tile_id] = f"{meta} unreadable ({type(exc).__name__}: {exc})"
        return None
    if info.get("FETCH_KEY") != key:
        return None
    if info.get("NO_DATA"):
        return Entry("no_data", key, digest=str(info.get("NO_DATA_REASON", "")))
    tif = layout.stack(tile.tile_id)
    record = info.get("STACK")
    problem = stack_is_complete(tif, info.get("BANDS") or {}, size)
    if problem is None and isinstance(record, dict):
        try:
            read_verified_stack(tif, record)
        except StackReadError as exc:
            problem = str(exc)
    if problem is not None:
        if why is not None:
            why[tile.tile_id] = problem if str(tif) in problem else f"{tif} {problem}"
        return None
    return _entry(tif, key, record if isinstance(record, dict) else None)


def _entry(tif: Path, key: str, record: dict[str, Any] | None) -> Entry | None:
    try:
        st = tif.stat()
    except OSError:
        return None
    digest = record_digest(record) if record else None
    return Entry("done", key, st.st_size, st.st_mtime_ns, digest[1] if digest else "")


def fetch_tile(tile: Tile, source: Source, out_dir: Path, compress: str | None = None,
               force: bool = False) -> TileOutcome:
    """Fetch one tile unless it is already done (``force``: fetch anyway). Never raises
    for a tile's own failure."""
    layout = DatasetLayout(out_dir)
    schema.check_tile_id(tile.tile_id)
    grid = Grid.for_tile(tile)
    key = fetch_key(source, tile, grid)
    if not force:
        e = tile_check(tile, key, layout, grid.size)
        if e is not None and e.state == "done":
            return TileOutcome(tile.tile_id, "skipped", entry=e)
        if e is not None:
            return TileOutcome(tile.tile_id, "no_data", e.digest, entry=e)
    meta = layout.tile_json(tile.tile_id)
    try:
        stack = source.fetch(tile, grid)
    except NoDataError as exc:
        info = {
            "NO_DATA": True, "NO_DATA_REASON": exc.reason, "lat": tile.lat, "lon": tile.lon,
            "SOURCE": source.name, "FETCH_KEY": key,
        }
        write_json_atomic(meta, info)
        return TileOutcome(tile.tile_id, "no_data", exc.reason, entry=Entry("no_data", key, digest=exc.reason),
                           rate_limited=source.take_rate_limited(tile.tile_id))
    except TransientSourceError as exc:
        return TileOutcome(tile.tile_id, "transient", exc.reason)
    except Exception as exc:  # one bad tile never sinks the batch
        log.exception("tile %s failed", tile.tile_id)
        return TileOutcome(tile.tile_id, "failed", f"{type(exc).__name__}: {exc}",
                           rate_limited=source.take_rate_limited(tile.tile_id))
    tif = write_stack(layout.stack(tile.tile_id), stack, compress=compress)
    record = stack_record(tif, stack)
    write_json_atomic(meta, {**stack.info, "FETCH_KEY": key, "STACK": record})
    return TileOutcome(tile.tile_id, "fetched", entry=_entry(tif, key, record),
                       rate_limited=source.take_rate_limited(tile.tile_id))


def fetch_batch(tiles: list[Tile], source: Source, out_dir: Path, compress: str | None = None,
                threads: int = 1, slots: int | None = None, progress=None, force: bool = False) -> list[TileOutcome]:
    """Fetch a batch of tiles (``threads`` at a time); raise :class:`TransientTilesError`
    if any failed transiently, after every tile of the batch was tried."""
    threads = max(1, min(threads, len(tiles)))
    done = [0]
    lock = threading.Lock()

    def one(t: Tile) -> TileOutcome:
        try:
            o = fetch_tile(t, source, out_dir, compress, force)
        finally:
            session.tile_done()  # slots the batch can no longer use go back as it drains
        if progress is not None:
            with lock:
                done[0] += 1
                progress(done[0], len(tiles))
        return o

    with source.session(threads, slots, tiles=len(tiles)) as session:
        bind = session
        if threads > 1:
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fetch", initializer=bind) as pool:
                outcomes = list(pool.map(one, tiles))
        else:
            bind()
            outcomes = [one(t) for t in tiles]
    transient = [o for o in outcomes if o.status == "transient"]
    if transient:
        raise TransientTilesError(transient)
    return outcomes


#: tile states, by their code in :class:`TileStates`
STATES = ("missing", "done", "no_data")
_CODE = {name: i for i, name in enumerate(STATES)}


class TileStates:
    """What a run knows of each tile, by the tile's position in the tiles file, in
    compact arrays (about 100 B a tile): its state and, for a finished tile, its index
    entry (fetch key, stack size and mtime, stack digest). No-data reasons are kept for
    the no-data tiles only. Replaces dicts of strings and tuples (about 0.5 KB a tile).
    Also a read-only mapping tile_id -> :class:`Entry` of the finished tiles."""

    def __init__(self, ids: np.ndarray):
        n = len(ids)
        self.ids = np.asarray(ids, dtype="S") if n else np.zeros(0, "S1")
        self.state = np.zeros(n, np.uint8)
        self.key = np.zeros(n, "S32")
        self.size = np.full(n, -1, np.int64)
        self.mtime_ns = np.full(n, -1, np.int64)
        self.digest = np.zeros(n, "S32")
        self.no_data_reason: dict[int, str] = {}
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """Bytes the table holds: its arrays and the no-data reasons (about 50 B each
        beside their text)."""
        arrays = (self.ids, self.state, self.key, self.size, self.mtime_ns, self.digest)
        return sum(a.nbytes for a in arrays) + sum(50 + len(r) for r in self.no_data_reason.values())

    def tile_id(self, pos: int) -> str:
        return self.ids[pos].decode()

    def set(self, pos: int, e: Entry | None) -> None:
        if e is None:
            self.state[pos] = 0
            self.no_data_reason.pop(pos, None)
            return
        self.state[pos] = _CODE[e.state]
        self.key[pos] = e.key.encode()
        self.size[pos], self.mtime_ns[pos] = e.size, e.mtime_ns
        if e.state == "no_data":
            self.no_data_reason[pos] = e.digest
        else:
            self.digest[pos] = e.digest.encode()

    def state_of(self, pos: int) -> str:
        return STATES[self.state[pos]]

    def entry(self, pos: int) -> Entry | None:
        code = int(self.state[pos])
        if code == 0:
            return None
        digest = self.no_data_reason.get(pos, "") if code == 2 else self.digest[pos].decode()
        return Entry(STATES[code], self.key[pos].decode(), int(self.size[pos]), int(self.mtime_ns[pos]), digest)

    def count(self, name: str) -> int:
        return int(np.count_nonzero(self.state == _CODE[name]))

    def positions(self, *names: str) -> np.ndarray:
        """Positions (ascending) of the tiles in any of the states ``names``."""
        return np.flatnonzero(np.isin(self.state, [_CODE[n] for n in names]))

    def tile_ids(self, *names: str) -> list[str]:
        return [self.ids[p].decode() for p in self.positions(*names)]

    def finished(self) -> Iterator[tuple[str, Entry]]:
        """(tile_id, entry) of every finished tile, in file order."""
        for p in self.positions("done", "no_data"):
            yield self.ids[p].decode(), self.entry(int(p))  # type: ignore[misc]

    def pos_of(self, tile_id: str) -> int:
        if self._order is None:
            self._order = np.argsort(self.ids, kind="stable")
        k = tile_id.encode()
        i = int(np.searchsorted(self.ids, k, sorter=self._order))
        if i < len(self.ids) and self.ids[self._order[i]] == k:
            return int(self._order[i])
        raise KeyError(tile_id)

    def __getitem__(self, tile_id: str) -> Entry:
        e = self.entry(self.pos_of(tile_id))
        if e is None:
            raise KeyError(tile_id)
        return e

    def as_dicts(self) -> tuple[dict[str, str], dict[str, Entry]]:
        """``(states, entries)`` as plain dicts (small runs, tests)."""
        states = {self.ids[p].decode(): STATES[c] for p, c in enumerate(self.state)}
        return states, dict(self.finished())


def decide(tiles: Iterable[Tile], source: Source, out_dir: Path,
           why: dict[str, str] | None = None) -> tuple[dict[str, str], dict[str, Entry], dict[str, int]]:
    """:func:`decide_states` over a list of tiles, as ``(states, entries, counts)`` dicts:
    ``states`` maps every tile to 'done', 'no_data' or 'missing'; ``entries`` holds the
    index entry of each finished tile."""
    table, counts = decide_states([list(tiles)], source, out_dir, why)
    states, entries = table.as_dicts()
    return states, entries, counts


def decide_states(tile_chunks: Iterable[list[Tile]], source: Source, out_dir: Path,
                  why: dict[str, str] | None = None) -> tuple[TileStates, dict[str, int]]:
    """What to fetch, for tiles given in chunks (in file order): ``(TileStates, counts)``.
    ``why`` receives, for each tile whose stack failed the check, the reason.

    One pass over the index plus one ``stat`` per done tile; the full check
    (:func:`tile_check`) only for tiles the index does not vouch for. The index is
    then rewritten with exactly the finished tiles, in file order.
    """
    out_dir = Path(out_dir)
    layout = DatasetLayout(out_dir)
    index = StackIndex(out_dir)
    known = index.read_table()
    counts = {"indexed": len(known), "full checks": 0}
    parts: list[TileStates] = []
    for chunk in tile_chunks:
        found = []
        for i, t in enumerate(chunk):
            grid = Grid.for_tile(t)
            key = fetch_key(source, t, grid)
            e = known.get(t.tile_id)
            ok = False
            if e is not None and e.key == key:
                if e.state == "no_data":
                    ok = True
                else:
                    try:
                        st = os.stat(layout.stack(t.tile_id))
                        ok = st.st_size == e.size and st.st_mtime_ns == e.mtime_ns
                    except OSError:
                        ok = False
                # its JSON must read too: it becomes the tile's NAME_tile_info.json entry
                ok = ok and read_tile_info(t.tile_id, out_dir) is not None
            if not ok:
                counts["full checks"] += 1
                e = tile_check(t, key, layout, grid.size, why)
            if e is not None:
                found.append((i, e))
        part = TileStates(np.array([t.tile_id.encode() for t in chunk], dtype="S"))
        for i, e in found:
            part.set(i, e)
        parts.append(part)
    table = _concat(parts)
    del known, parts
    index.rewrite(table.finished())
    return table, counts


def _concat(parts: list[TileStates]) -> TileStates:
    if not parts:
        return TileStates(np.zeros(0, "S1"))
    if len(parts) == 1:
        return parts[0]
    out = TileStates(np.concatenate([p.ids for p in parts]))
    for name in ("state", "key", "size", "mtime_ns", "digest"):
        setattr(out, name, np.concatenate([getattr(p, name) for p in parts]))
    offset = 0
    for p in parts:
        out.no_data_reason.update({offset + k: v for k, v in p.no_data_reason.items()})
        offset += len(p)
    return out


def read_tile_info(tile_id: str, out_dir: Path) -> dict[str, Any] | None:
    """One tile's JSON (with the bookkeeping fields), or None (missing or unreadable)."""
    try:
        info = json.loads(DatasetLayout(out_dir).tile_json(tile_id).read_text())
    except (OSError, ValueError):  # JSONDecodeError, UnicodeDecodeError included
        return None
    return info if isinstance(info, dict) else None


class TileInfoDir:
    """Read-only mapping tile_id -> tile JSON over ``work/tile_info`` (read on access),
    so a pack task carries a folder name instead of its tiles' tile_info."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = str(out_dir)

    def get(self, tile_id: str, default: Any = None) -> Any:
        info = read_tile_info(tile_id, Path(self.out_dir))
        return default if info is None else info

    def __getitem__(self, tile_id: str) -> Any:
        info = self.get(tile_id)
        if info is None:
            raise KeyError(tile_id)
        return info


class TileInfoLost(RuntimeError):
    """Tiles with a row in the h5 whose JSON cannot be read: NAME_tile_info.json would lack
    their entries (the readers look every row's tile up in it), so it is not written."""


def published_tile_info(tile_ids: Iterable[str], out_dir: Path,
                        unreadable: list[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(tile_id, tile_info entry) of every tile with a JSON, fetch bookkeeping removed;
    the ids of tiles whose JSON is missing or unreadable go to ``unreadable``."""
    for tid in tile_ids:
        info = read_tile_info(tid, out_dir)
        if info is None:
            if unreadable is not None:
                unreadable.append(tid)
            continue
        for k in BOOKKEEPING:
            info.pop(k, None)
        yield tid, info


def load_tile_info(tile_ids: list[str], out_dir: Path) -> dict[str, dict[str, Any]]:
    """Merge the per-tile JSON files into the tile_info dict (fetch bookkeeping removed)."""
    return dict(published_tile_info(tile_ids, out_dir))


def strict_json_value(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, Infinity) replaced by None, so that it
    is strict JSON (the original writes Earth Engine's missing values as null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json_value(v) for v in obj]
    return obj


def write_tile_info_json(path: Path, tile_ids: Iterable[str], out_dir: Path,
                         unreadable: list[str] | None = None, in_h5=None) -> int:
    """Write ``NAME_tile_info.json`` streamed from the per-tile JSONs, one tile in memory
    at a time; byte-identical to ``json.dumps(load_tile_info(...))`` with non-finite
    numbers written as null (strict JSON). Returns the count. The ids of tiles whose JSON
    cannot be read go to ``unreadable``; if ``in_h5(tile_id)`` says one of them has a row
    in the h5, :class:`TileInfoLost` is raised and ``path`` is left as it was."""
    n = 0
    missing: list[str] = []
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("{")
            for tid, info in published_tile_info(tile_ids, out_dir, missing):
                fh.write((", " if n else "") + json.dumps(tid) + ": "
                         + json.dumps(strict_json_value(info), allow_nan=False))
                n += 1
            fh.write("}")
            fh.flush()
            os.fsync(fh.fileno())
        if unreadable is not None:
            unreadable.extend(missing)
        lost = [t for t in missing if in_h5 is not None and in_h5(t)]
        if lost:
            raise TileInfoLost(f"{len(lost)} tile(s) with a row in the h5 have no readable JSON in "
                               f"{DatasetLayout(out_dir).tile_info_dir} ({', '.join(lost[:5])}); "
                               f"{path.name} not written; run again to fetch them again")
    return n
