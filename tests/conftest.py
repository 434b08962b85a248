"""Shared fixtures: one real local Prefect server for the tests that run flows."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

# Prefect configures its console logging when ``prefect.main`` is first imported (``from prefect
# import flow``), binding its handler to the sys.stderr of that moment. Imported here, before any
# test runs, that is pytest's session capture; a first import inside a ``capsys`` test would bind
# it to that test's stream, closed after the test ("I/O operation on closed file" in every later
# flow's log, seen with test_config_checks.py + test_stack_integrity.py run on their own).
import prefect.main  # noqa: E402,F401


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A loopback Prefect server (SQLite in a temp PREFECT_HOME) for the session."""
    from tasks.common.runtime import local_prefect_server

    saved = os.environ.pop("PREFECT_API_URL", None)
    try:
        with local_prefect_server(home=tmp_path_factory.mktemp("prefect-home")) as server:
            yield server
    finally:
        if saved is not None:
            os.environ["PREFECT_API_URL"] = saved
