"""The ``Source`` interface: one call per tile returns its stack and tile_info entry.

A source (the embedded ``synthetic`` one, Earth Engine later) implements
:meth:`Source.fetch`. The caller (the stacks stage) owns the file writing, so
every source gets the same atomic GeoTIFF writer and the same skip/resume
logic. Sources signal outcomes with two distinct exceptions:

* :class:`NoDataError` - permanent: nothing exists for this tile (no
  Sentinel-2 image, invalid geometry). Recorded, never retried.
* :class:`TransientSourceError` - temporary (rate limit, 5xx, timeout,
  dropped connection). The tile is retried by Prefect task retries.
"""

from __future__ import annotations

import abc
import contextlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import rasterio
from affine import Affine
from rasterio.errors import RasterioError

from tasks.common.atomic import atomic_path
from tasks.common.concurrency import shared_pool, slot
from tasks.multimodal import schema
from tasks.multimodal.tile import Grid, Tile  # noqa: F401  (a source's fetch takes both)


class SourceError(Exception):
    """Base of the errors a source raises for one tile."""

    def __init__(self, tile_id: str, reason: str):
        super().__init__(f"tile {tile_id}: {reason}")
        self.tile_id = tile_id
        self.reason = reason

    def __reduce__(self):
        # Exception pickles as cls(*self.args), and args is the one formatted message:
        # rebuild from the constructor's own arguments (it crosses Dask's process boundary)
        return type(self), (self.tile_id, self.reason), self.__dict__


class NoDataError(SourceError):
    """Permanent: the source has no data for this tile. Never retried."""


class TransientSourceError(SourceError):
    """Temporary failure: retry the tile later."""


class UnknownEcoregionError(SourceError, ValueError):
    """The tile's ecoregion is not in the source's ecoregion index mapping: a
    configuration error (neither no-data nor temporary); the tile is reported as
    failed and fetched again by a run with a mapping that lists it."""


@dataclass
class TileStack:
    """What a source returns for one tile.

    ``data`` is (bands, H, W) float32 in the order of
    ``schema.stack_band_descriptions(info["BANDS"])``; NaN marks missing pixels.
    ``info`` is the tile_info entry (S2_DATE, S2_type, CRS, lat, lon, biome,
    eco_region, NO_DATA, BANDS, era5, ...).
    """

    tile_id: str
    data: np.ndarray
    crs: str
    transform: Affine
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def band_descriptions(self) -> list[str]:
        return schema.stack_band_descriptions(self.info["BANDS"])

    def validate(self) -> None:
        names = self.band_descriptions
        if self.data.ndim != 3 or self.data.shape[0] != len(names):
            raise ValueError(
                f"tile {self.tile_id}: stack has shape {self.data.shape} but BANDS lists "
                f"{len(names)} bands"
            )


class BatchSession:
    """What :meth:`Source.session` yields: ``bind()`` (call it, once per fetching thread)
    and ``tile_done()`` (once per finished tile). Default: both do nothing."""

    def __call__(self) -> None:
        pass

    def tile_done(self) -> None:
        pass


#: a batch's slots are leased in about this many sub-leases (each released when no longer usable)
SUBLEASES = 4
#: per thread: the batch's share of the process's slot pool that the thread works for
_thread_share = threading.local()


class PooledBatchSession(BatchSession):
    """A batch's share of the process's :class:`~tasks.common.concurrency.SlotPool`: each
    fetching thread binds to it, so that its requests take the share's permits
    (:func:`request_slot`)."""

    def __init__(self, share):
        self.share = share

    def __call__(self) -> None:  # run by each thread of the batch
        _thread_share.share = self.share

    def tile_done(self) -> None:
        self.share.tile_done()


@contextlib.contextmanager
def pooled_session(limit_name: str, threads: int, slots: int | None, ceiling: int | None, tiles: int | None,
                   timeout_s: float | None, rate: float | None = None) -> Iterator[PooledBatchSession]:
    """Request slots of the Prefect limit ``limit_name`` for a batch of ``tiles`` tiles: up
    to ``slots`` (default ``threads``, at most ``ceiling``) slots, held by the worker
    process's :class:`~tasks.common.concurrency.SlotPool` as sub-leases of about a quarter
    of them and shared by the threads of every batch running in the process: each request
    holds one while in flight (:func:`request_slot`), so the global ceiling bounds every
    request. As the batch drains (fewer tiles left than slots held), the sub-leases no batch
    of the process can use go back to the limit; a second batch running in the process (2
    Dask threads per worker) uses them without a Prefect call. A few Prefect calls per
    batch, none per tile. ``rate``: requests/s for the whole limit (paced per process,
    :meth:`~tasks.common.concurrency.SlotPool.set_rate`; None: not paced)."""
    occupy = max(1, min(slots or threads, ceiling or threads))
    pool = shared_pool(limit_name, chunk=-(-occupy // SUBLEASES), timeout_s=timeout_s)
    pool.set_rate(rate, ceiling or occupy)
    with pool.share(occupy, threads, tiles if tiles is not None else 1 << 62) as share:
        try:
            yield PooledBatchSession(share)
        finally:
            _thread_share.share = None  # the calling thread, if it fetched itself


@contextlib.contextmanager
def request_slot(limit_name: str, timeout_s: float | None) -> Iterator[None]:
    """Hold one request's slot: a permit of the calling thread's batch share (bound by
    :class:`PooledBatchSession`), or outside a batch session one slot of the Prefect limit."""
    share = getattr(_thread_share, "share", None)
    if share is None:
        with slot(limit_name, timeout_seconds=timeout_s):
            yield
    else:
        with share.permit():
            yield


class Source(abc.ABC):
    """A provider of per-tile multimodal stacks."""

    #: short name recorded in tile_info["SOURCE"]
    name: str = "abstract"
    #: made-up data (no real observation): said in report.json, the report artifact, the
    #: terminal summary and the h5's attributes
    synthetic: bool = False
    #: ecoregion name -> MMEarth index (tile_info "eco_region"); None gives 0 to every tile
    eco_index: dict[str, int] | None = None

    def eco_region_index(self, tile: Tile) -> int:
        """The tile's ecoregion index (the one lookup of every source); raises
        :class:`UnknownEcoregionError` for a name the mapping lacks."""
        if self.eco_index is None:
            return 0
        try:
            return int(self.eco_index[tile.eco_region])
        except KeyError:
            raise UnknownEcoregionError(
                tile.tile_id, f"ecoregion {tile.eco_region!r} is not in the ecoregion index mapping; pass "
                "eco_labels with a {name: index} mapping that lists it") from None

    def check(self) -> None:
        """Fail fast before any tile is attempted (credentials, configuration)."""

    def cache_key(self) -> str:
        """Settings besides the tile that change what :meth:`fetch` returns; a tile
        fetched under another key is fetched again."""
        return ""

    def take_rate_limited(self, tile_id: str) -> int:
        """How many "429 Too many requests" answers the tile's requests met since the last
        call for it (the count is then cleared); reported by the flow. Default: 0."""
        return 0

    def session(self, threads: int, slots: int | None = None, tiles: int | None = None):
        """Context for fetching a batch of ``tiles`` tiles with ``threads`` threads, at most
        ``slots`` of them in a request at once (e.g. leasing request slots for the batch).
        It yields a :class:`BatchSession`: each fetching thread calls it once before
        fetching, and the batch calls its ``tile_done()`` as each tile finishes (so that
        slots the batch can no longer use go back). Default: nothing to set up."""
        return contextlib.nullcontext(BatchSession())

    @abc.abstractmethod
    def fetch(self, tile: Tile, grid: Grid) -> TileStack:
        """Return the stack of one tile on ``grid`` or raise a :class:`SourceError`."""


# --------------------------------------------------------------------------
# GeoTIFF I/O shared by every source
# --------------------------------------------------------------------------
@contextlib.contextmanager
def open_stack(path: str | Path, mode: str = "r", **profile: Any) -> Iterator[Any]:
    """``rasterio.open`` for a stack in a tiles folder (every read and write of one goes
    through here).

    GDAL lists a file's whole folder when it opens it (to find side-car files), and also
    when it creates one over an existing file (the atomic write's temporary name): in a
    folder of N stacks every open then costs O(N), measured 1 -> 4 ms per write from 1000
    to 12 000 tiles, about 30 ms at 100 000. Stacks have no side-car files, so the listing
    is turned off (``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR``): flat at about 0.9 ms."""
    with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"), rasterio.open(path, mode, **profile) as ds:
        yield ds


def write_stack(path: str | Path, stack: TileStack, compress: str | None = None) -> Path:
    """Write a stack as a float32 GeoTIFF with band descriptions, atomically."""
    stack.validate()
    path = Path(path)
    bands, h, w = stack.data.shape
    profile = dict(
        driver="GTiff", width=w, height=h, count=bands, dtype="float32",
        crs=stack.crs, transform=stack.transform, nodata=float("nan"),
        interleave="band",
    )
    if compress and compress.lower() != "none":
        profile["compress"] = compress
    with atomic_path(path) as tmp:
        with open_stack(tmp, "w", **profile) as dst:
            dst.write(stack.data.astype(np.float32, copy=False))
            for i, name in enumerate(stack.band_descriptions, start=1):
                dst.set_band_description(i, name)
            dst.update_tags(TILE_ID=stack.tile_id, SOURCE=str(stack.info.get("SOURCE", "")))
    return path


class StackReadError(Exception):
    """A tiles/<id>.tif that cannot be read or is incomplete."""


def read_stack(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read a GeoTIFF stack fully; return (float32 array (B,H,W), band descriptions).

    Raises :class:`StackReadError` naming the file for corrupt or truncated files.
    """
    path = Path(path)
    try:
        with open_stack(path) as src:
            data = src.read(out_dtype=np.float32)
            names = [d or "" for d in src.descriptions]
    except (RasterioError, OSError, ValueError) as exc:
        raise StackReadError(f"{path}: cannot read GeoTIFF ({exc}); delete it so it is fetched again") from exc
    return data, names
