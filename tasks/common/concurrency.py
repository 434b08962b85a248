"""Prefect global concurrency limits that must exist (never silently unlimited).

Prefect's ``concurrency()`` on a limit that does not exist only logs a warning
and runs unlimited. Flows that depend on a ceiling (Earth Engine's concurrent
request limit) call :func:`ensure_limit` at start (create or update,
idempotently) and take slots with :func:`slot`, which uses ``strict=True`` so
a missing limit is an error instead of a warning.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

# Prefect (and httpx, its HTTP client) is imported inside the functions that talk to it: the data sources that take slots (tasks/multimodal/sources) are library modules; importing
# prefect takes 5 s, httpx 0.6 s on the shared 2-core machine (python -X importtime), and
# tests/test_import_hygiene.py keeps the library Prefect-free.

log = logging.getLogger(__name__)


class MissingConcurrencyLimit(RuntimeError):
    pass


def ensure_limit(name: str, limit: int) -> None:
    """Create the global concurrency limit ``name`` or set it to ``limit`` (active)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    if limit < 1:
        raise ValueError(f"concurrency limit {name!r} must be >= 1, got {limit}")
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit)
        try:
            current = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound as exc:  # pragma: no cover - just created
            raise MissingConcurrencyLimit(f"could not create concurrency limit {name!r}") from exc
        if not current.active:
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active=True))
    log.info("concurrency limit %r set to %d", name, limit)


def read_limit(name: str) -> int | None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            return None


@contextlib.contextmanager
def slot(name: str, occupy: int = 1, timeout_seconds: float | None = None) -> Iterator[None]:
    """Hold ``occupy`` slots of the global limit ``name``; error if it does not exist."""
    from prefect.concurrency.sync import concurrency

    try:
        cm = concurrency(name, occupy=occupy, timeout_seconds=timeout_seconds, strict=True)
        cm.__enter__()
    except Exception as exc:
        if "not found" in str(exc).lower() or type(exc).__name__ == "ConcurrencySlotAcquisitionError":
            raise MissingConcurrencyLimit(
                f"Prefect concurrency limit {name!r} is missing (or unreachable: {exc}); "
                f"create it with tasks.common.concurrency.ensure_limit({name!r}, N) or "
                f"`prefect gcl create {name} --limit N`"
            ) from exc
        raise
    try:
        yield
    except BaseException as exc:
        if not cm.__exit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        cm.__exit__(None, None, None)


# --------------------------------------------------------------------------
# A process's slots of one limit, leased in sub-leases and shared by its batches
# --------------------------------------------------------------------------
class PrefectLessor:
    """Sub-leases of the Prefect global concurrency limit ``name`` (the lease API of
    Prefect 3: one HTTP call to acquire, one to release, one per renewal)."""

    def __init__(self, name: str, lease_duration_s: float = 300.0):
        self.name = name
        self.lease_duration_s = lease_duration_s

    def acquire(self, k: int, wait: bool, timeout_s: float | None = None, poll_s: float = 0.5):
        """A lease of ``k`` slots, or None when they are not free now (``wait=False``).
        ``wait=True`` polls every ``poll_s`` (not Prefect's Retry-After, which grows with
        how long slots are held: tens of seconds for batch leases) until ``timeout_s``."""
        import httpx
        from prefect.client.orchestration import get_client

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with get_client(sync_client=True) as client:
            while True:
                try:
                    resp = client.increment_concurrency_slots_with_lease(
                        names=[self.name], slots=k, mode="concurrency", lease_duration=self.lease_duration_s)
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code != 423:
                        raise
                    if not wait:
                        return None
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(f"{k} slot(s) of concurrency limit {self.name!r} not free within "
                                           f"{timeout_s:g}s") from None
                    time.sleep(poll_s * (0.5 + random.random()))
                    continue
                body = resp.json()
                if not body.get("limits"):
                    raise MissingConcurrencyLimit(
                        f"Prefect concurrency limit {self.name!r} is missing; create it with "
                        f"tasks.common.concurrency.ensure_limit({self.name!r}, N) or "
                        f"`prefect gcl create {self.name} --limit N`")
                return body["lease_id"]

    def renew(self, lease) -> None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            client.renew_concurrency_lease(lease_id=lease, lease_duration=self.lease_duration_s)

    def release(self, lease) -> None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(lease_id=lease)


class PoolShare:
    """One batch's part in a :class:`SlotPool`: ``threads`` threads that fetch
    ``tiles`` tiles, each tile holding at most one permit at a time."""

    def __init__(self, pool: SlotPool, slots: int, threads: int, tiles: int):
        self.pool, self.slots, self.threads, self.remaining = pool, slots, threads, tiles
        self.waiting = 0  # its threads waiting for a permit
        self.wake = threading.Condition(pool._lock)

    def demand(self) -> int:
        return min(self.remaining, self.threads)

    @contextlib.contextmanager
    def permit(self) -> Iterator[None]:
        """Hold one of the pool's slots (one request in flight)."""
        self.pool._take(self)
        try:
            self.pool._pace()
            yield
        finally:
            self.pool._give()

    def tile_done(self, n: int = 1) -> None:
        """``n`` tiles of the batch are finished: slots beyond what is left go back."""
        self.pool._done(self, n)


class SlotPool:
    """The slots of one global limit that a process holds, as sub-leases of ``chunk``
    slots, shared by every batch running in the process through a local count of
    permits; a request holds a permit while in flight.

    Invariant: permits handed out <= permits available <= slots held at Prefect (a
    sub-lease's permits are added after it is granted and taken out before it is
    released), so the global limit bounds every request. The pool holds
    ``min(max slots of its batches, sum over batches of min(tiles left, threads))``
    slots, rounded up to a sub-lease: as a batch drains, the slots nobody in the
    process can use any more go back to the limit (another process takes them), a
    second batch running in the process (a Dask worker with 2 threads) takes over
    its slots without a Prefect call, and the last batch to finish gives all back.
    Prefect calls: one per sub-lease acquired or released (a few per batch, none
    when batches overlap), and one renewal per sub-lease every ``renew_s``.
    """

    def __init__(self, lessor, chunk: int, poll_s: float = 0.5, timeout_s: float | None = None,
                 renew_s: float | None = None):
        self.lessor, self.chunk, self.poll_s, self.timeout_s = lessor, max(1, int(chunk)), poll_s, timeout_s
        self.renew_s = renew_s if renew_s is not None else getattr(lessor, "lease_duration_s", 300.0) / 3
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._leases: list[tuple[Any, int]] = []
        self.capacity = 0  # permits available (slots of the granted sub-leases)
        self.in_use = 0
        self._shares: list[PoolShare] = []
        self._acquiring = False
        self._next_try = 0.0
        self._backoff = poll_s
        self._renewer: threading.Thread | None = None
        self._stop_renew = threading.Event()
        self.calls = {"acquire": 0, "release": 0, "renew": 0, "refused": 0}
        self.rate_per_slot: float | None = None  # requests/s per slot held (None: not paced)
        self._pace_lock = threading.Lock()
        self._next_start = 0.0

    def set_rate(self, requests_per_s: float | None, ceiling: int) -> None:
        """Pace the process's requests at ``requests_per_s * slots held / ceiling``: the
        processes' shares of the limit's slots add up to at most ``ceiling``, so their rates
        add up to at most ``requests_per_s`` (a per-project rate such as Earth Engine's 100
        requests/s) without a call to Prefect per request. ``None``: not paced."""
        self.rate_per_slot = requests_per_s / max(1, ceiling) if requests_per_s else None

    def _pace(self) -> None:
        """Wait until this request may start: starts at least 1 / rate apart."""
        per_slot = self.rate_per_slot
        if not per_slot:
            return
        with self._pace_lock:
            now = time.monotonic()
            start = max(self._next_start, now)
            self._next_start = start + 1.0 / (per_slot * max(1, self.capacity))
        if start > now:
            time.sleep(start - now)

    # -- batches -----------------------------------------------------------
    @contextlib.contextmanager
    def share(self, slots: int, threads: int, tiles: int) -> Iterator[PoolShare]:
        """A batch's part of the pool for the ``with`` block. Entering waits (in the
        caller, so a missing limit or a timeout fails the batch) until the pool holds
        at least one sub-lease."""
        s = PoolShare(self, max(1, slots), max(1, threads), max(0, tiles))
        with self._cond:
            self._shares.append(s)
        try:
            self._ensure_one()
            yield s
        finally:
            with self._cond:
                self._shares.remove(s)
                self._cond.notify_all()
                self._wake_next()
            self._shrink()

    def _cap(self) -> int:
        return max((s.slots for s in self._shares), default=0)

    def _target(self) -> int:
        return min(self._cap(), sum(s.demand() for s in self._shares))

    def _ensure_one(self) -> None:
        while True:
            with self._cond:
                if self.capacity > 0:
                    return
                if self._acquiring:
                    self._cond.wait(self.poll_s)
                    continue
                self._acquiring = True
                k = min(self.chunk, max(1, self._cap()))
            self._acquire(k, wait=True)

    def _acquire(self, k: int, wait: bool) -> bool:
        """Ask the limit for a sub-lease of ``k`` (outside the lock); the caller set ``_acquiring``."""
        lease = None
        try:
            lease = self.lessor.acquire(k, wait=wait, timeout_s=self.timeout_s) if wait else \
                self.lessor.acquire(k, wait=False)
        except Exception as exc:
            if wait:
                raise
            log.warning("could not lease %d more slot(s): %s", k, exc)  # the batch goes on with what it holds
        finally:
            with self._cond:
                self._acquiring = False
                if lease is not None:
                    self._leases.append((lease, k))
                    self.capacity += k
                    self.calls["acquire"] += 1
                    self._backoff = self.poll_s
                else:  # the limit is full: ask again later, less often while it stays full
                    self.calls["refused"] += 1
                    self._next_try = time.monotonic() + self._backoff
                    self._backoff = min(2 * self._backoff, 8 * self.poll_s)
                self._cond.notify_all()
                for s in self._shares:
                    s.wake.notify_all()
        if lease is not None:
            self._start_renewer()
            self._shrink()  # the batches may have drained while it was granted
        return lease is not None

    # -- permits -----------------------------------------------------------
    def _take(self, share: PoolShare) -> None:
        while True:
            with self._cond:
                share.waiting += 1
                try:
                    while True:
                        if self.in_use < self.capacity and self._first_waiting() is share:
                            self.in_use += 1
                            return
                        want = self._target() - self.capacity
                        if want > 0 and not self._acquiring and time.monotonic() >= self._next_try:
                            self._acquiring = True
                            k = min(self.chunk, self._cap() - self.capacity)
                            break
                        share.wake.wait(self.poll_s)
                finally:
                    share.waiting -= 1
                    self._wake_next()
            self._acquire(k, wait=False)

    def _first_waiting(self) -> PoolShare | None:
        """The oldest batch with a thread waiting: free permits go to it first, so that
        batches running side by side in the process are staggered (the older one at full
        speed, the younger one taking the permits the older cannot use, all of them in its
        tail) instead of draining together."""
        return next((s for s in self._shares if s.waiting), None)

    def _wake_next(self) -> None:
        if self.in_use < self.capacity:
            first = self._first_waiting()
            if first is not None:
                first.wake.notify()

    def _give(self) -> None:
        with self._cond:
            self.in_use -= 1
            self._wake_next()  # one permit, one waiter of the oldest batch (every wait also times out)

    def _done(self, share: PoolShare, n: int) -> None:
        with self._cond:
            share.remaining = max(0, share.remaining - n)
        self._shrink()

    def _shrink(self) -> None:
        """Release the sub-leases that the batches can no longer use."""
        while True:
            with self._cond:
                if not self._leases:
                    return
                lease, k = self._leases[-1]
                keep = self.capacity - k
                if keep < self._target() or keep < self.in_use:
                    return
                self._leases.pop()
                self.capacity = keep  # taken out of the local count first: never more permits than slots
                self.calls["release"] += 1
                last = not self._leases
            try:
                self.lessor.release(lease)
            except Exception as exc:  # noqa: BLE001 - the lease expires on its own (lease_duration)
                log.warning("could not release a lease of %d slot(s) (it expires on its own): %s", k, exc)
            if last:
                self._stop_renew.set()

    # -- renewals ----------------------------------------------------------
    def _start_renewer(self) -> None:
        with self._cond:
            if self._renewer is not None and self._renewer.is_alive() and not self._stop_renew.is_set():
                return
            self._stop_renew = stop = threading.Event()
            self._renewer = threading.Thread(target=self._renew_loop, args=(stop,), daemon=True,
                                             name="slot-pool-renewal")
            self._renewer.start()

    def _renew_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.renew_s):
            with self._cond:
                leases = [lease for lease, _ in self._leases]
            for lease in leases:
                try:
                    self.lessor.renew(lease)
                    self.calls["renew"] += 1
                except Exception as exc:  # noqa: BLE001 - retried at the next round; the lease lasts 3 rounds
                    log.warning("could not renew a concurrency lease: %s", exc)


_pools: dict[str, SlotPool] = {}
_pools_lock = threading.Lock()


def shared_pool(name: str, chunk: int, timeout_s: float | None = None) -> SlotPool:
    """The process's :class:`SlotPool` of the Prefect limit ``name`` (created on first use)."""
    with _pools_lock:
        pool = _pools.get(name)
        if pool is None:
            pool = _pools[name] = SlotPool(PrefectLessor(name), chunk, timeout_s=timeout_s)
        return pool
