"""Request slots of the Earth Engine source: a batch gives back the slots it can no longer
use as it drains, a second batch in the process takes them over, and no request ever runs
without a held slot of the (fake) global limit. No Prefect, no Earth Engine: the limit is
a fake lessor, the requests are sleeps inside ``_request_slot``."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

import tasks.multimodal.sources.base as sources_base
import tasks.multimodal.sources.earthengine as ee_mod
from tasks.common.concurrency import SlotPool
from tasks.multimodal import stacks
from tasks.multimodal.sources.base import NoDataError, Tile


class FakeLimit:
    """A global concurrency limit of ``ceiling`` slots: the lessor of a :class:`SlotPool`
    and, for the per-batch lease of the old design, a ``slot()`` context."""

    def __init__(self, ceiling: int):
        self.ceiling = ceiling
        self.lock = threading.Lock()
        self.held = 0
        self.max_held = 0
        self.leases: dict[int, int] = {}
        self.ids = itertools.count()
        self.history: list[int] = []  # slots held after each change
        self.in_flight = 0
        self.max_in_flight = 0
        self.violations: list[tuple[int, int]] = []  # (in flight, held) when a request ran without a slot
        self.calls = 0
        self.requests: list[tuple[str, str]] = []  # (batch, "start"/"end") in order
        self.events: list[str] = []

    def acquire(self, k: int, wait: bool, timeout_s: float | None = None):
        while True:
            with self.lock:
                self.calls += 1
                if self.held + k <= self.ceiling:
                    lease = next(self.ids)
                    self.leases[lease] = k
                    self.held += k
                    self.max_held = max(self.max_held, self.held)
                    self.history.append(self.held)
                    return lease
            if not wait:
                return None
            time.sleep(0.005)

    def release(self, lease) -> None:
        with self.lock:
            self.calls += 1
            self.held -= self.leases.pop(lease)
            self.history.append(self.held)

    def renew(self, lease) -> None:
        pass

    @contextlib.contextmanager
    def slot(self, name, occupy=1, timeout_seconds=None):  # the signature of tasks.common.concurrency.slot
        lease = self.acquire(occupy, wait=True)
        try:
            yield
        finally:
            self.release(lease)

    def request(self, batch: str, seconds: float) -> None:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self.in_flight > self.held:
                self.violations.append((self.in_flight, self.held))
            self.requests.append((batch, "start"))
        time.sleep(seconds)
        with self.lock:
            self.in_flight -= 1
            self.requests.append((batch, "end"))


@dataclass(repr=False)
class SlowSource(ee_mod.EarthEngineSource):
    """Two requests per tile (0.4 : 1.5 like computeValue : computePixels, scaled down),
    each inside the source's own ``_request_slot``; the tile then has no data (no stack
    to write)."""

    limit: Any = None
    fail_every: int = 0

    def fetch(self, tile, grid):
        batch = tile.tile_id.split("-")[0]
        for seconds in (0.008, 0.03):
            with self._request_slot():
                self.limit.request(batch, seconds)
        if self.fail_every and int(tile.tile_id.split("-")[1]) % self.fail_every == 0:
            raise RuntimeError("unexpected failure of the tile")
        raise NoDataError(tile.tile_id, "no image (test)")


def _tiles(batch: str, n: int) -> list[Tile]:
    out = []
    for i in range(n):
        lon, lat, d = 8.5 + i / 50, 50.5, 0.006
        ring = [[lon - d, lat - d], [lon + d, lat - d], [lon + d, lat + d], [lon - d, lat + d], [lon - d, lat - d]]
        out.append(Tile(f"{batch}-{i:03d}", "Temperate Broadleaf & Mixed Forests",
                        "Western European broadleaf forests", lon, lat, {"type": "Polygon", "coordinates": [ring]}))
    return out


@pytest.fixture
def limit(monkeypatch):
    """A fake limit behind both the per-request ``slot`` and the process's slot pools."""
    fake = FakeLimit(ceiling=4)
    pools: dict[str, SlotPool] = {}

    def shared_pool(name, chunk, timeout_s=None):
        return pools.setdefault(name, SlotPool(fake, chunk, poll_s=0.01, timeout_s=timeout_s))

    monkeypatch.setattr(ee_mod, "slot", fake.slot)
    monkeypatch.setattr(sources_base, "slot", fake.slot)
    monkeypatch.setattr(sources_base, "shared_pool", shared_pool)
    fake.pools = pools
    return fake


def _source(limit: FakeLimit, **kw) -> SlowSource:
    src = SlowSource(project="p", ceiling=limit.ceiling, **kw)
    src.limit = limit
    return src


def test_a_draining_batch_gives_back_its_slots_and_never_exceeds_the_ceiling(limit, tmp_path):
    """24 tiles, 8 threads, 4 slots (one sub-lease each): while the last tiles run, the
    batch holds fewer slots; the old design held all 4 until the batch returned."""
    out = stacks.fetch_batch(_tiles("a", 24), _source(limit), tmp_path, threads=8, slots=4)
    assert [o.status for o in out] == ["no_data"] * 24
    assert not limit.violations, "a request ran without a held slot"
    assert limit.max_held <= 4 and limit.max_in_flight == 4  # the ceiling is filled, never exceeded
    assert limit.held == 0 and not limit.leases  # nothing leaked
    # the tail: 3, 2, 1 slots held while fewer tiles than slots remained (old design: 4 -> 0 at once)
    tail = limit.history[limit.history.index(4):]
    assert [h for h in tail if 0 < h < 4] == [3, 2, 1], limit.history
    # a few limit calls per batch, not per tile: 4 sub-leases in, 4 out
    assert limit.calls == 8


def test_a_second_batch_takes_over_the_slots_of_a_draining_one(limit, tmp_path):
    """Two batches in one process (a Dask worker with 2 threads), each wanting the whole
    ceiling: the second runs requests while the first still runs (old design: it waited
    for the first to return all its slots), and both share the same 4 slots."""
    src = _source(limit)
    results: dict[str, list] = {}
    started = threading.Event()

    def run(batch: str) -> None:
        if batch == "b":
            started.wait()
        results[batch] = stacks.fetch_batch(_tiles(batch, 20), src, tmp_path, threads=6, slots=4)
        limit.events.append(f"{batch} returned")

    first = threading.Thread(target=run, args=("a",))
    second = threading.Thread(target=run, args=("b",))
    first.start()
    second.start()
    while not any(r == ("a", "end") for r in limit.requests):
        time.sleep(0.001)
    started.set()
    first.join(30)
    second.join(30)
    assert len(results["a"]) == len(results["b"]) == 20
    assert not limit.violations and limit.max_held <= 4 and limit.held == 0
    a_last_end = max(i for i, r in enumerate(limit.requests) if r == ("a", "end"))
    b_first = limit.requests.index(("b", "start"))
    assert b_first < a_last_end, "the second batch waited for the first to return every slot"
    # while both batches had tiles left the 4 slots were never given back: one lease round only
    assert limit.calls == 8, limit.calls


def test_slots_come_back_when_tiles_fail(limit, tmp_path):
    """A tile failing with an unexpected error still counts as finished: the batch drains,
    gives every slot back and reports the failures."""
    out = stacks.fetch_batch(_tiles("c", 12), _source(limit, fail_every=3), tmp_path, threads=5, slots=4)
    assert sorted(o.status for o in out).count("failed") == 4
    assert limit.held == 0 and not limit.leases and not limit.violations


def test_pool_without_a_first_lease_fails_the_batch(tmp_path):
    """Entering a batch waits for one sub-lease in the caller: an error there (missing
    limit, timeout) fails the batch, and nothing is left leased."""

    class Refusing(FakeLimit):
        def acquire(self, k, wait, timeout_s=None):
            raise TimeoutError("no slot within 0s")

    fake = Refusing(4)
    pool = SlotPool(fake, 2, poll_s=0.01)
    with pytest.raises(TimeoutError), pool.share(4, 4, 10):
        pass
    assert pool.capacity == 0 and pool.in_use == 0 and not pool._shares


def test_requests_are_paced_at_the_request_rate(limit, tmp_path):
    """``request_rate`` (Earth Engine's requests/s per project): a batch of 48 requests
    that 4 slots would run at ~200/s starts them at most 40/s (the process holds the
    whole ceiling, so its share is the whole rate); never faster, within 5 %."""
    starts: list[float] = []
    real = limit.request

    def timed(batch, seconds):
        starts.append(time.monotonic())
        real(batch, seconds)
    limit.request = timed
    stacks.fetch_batch(_tiles("r", 24), _source(limit, request_rate=40.0), tmp_path, threads=8, slots=4)
    assert len(starts) == 48 and not limit.violations
    starts.sort()
    for i in range(len(starts) - 10):  # any 10 consecutive gaps last at least 10 / 40 s
        assert starts[i + 10] - starts[i] >= 10 / 40.0 * 0.95, (i, starts[i + 10] - starts[i])
