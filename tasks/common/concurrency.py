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
from collections.abc import Iterator

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
