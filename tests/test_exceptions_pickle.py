"""Every exception class the project defines round-trips through pickle.

Dask sends a task's exception from the worker to the flow process with pickle; one
that cannot be unpickled turns into an unrelated error there ("AttributeError: 'str'
object has no attribute 'tile_id'") and a CRITICAL traceback, and the real reason is
lost. The classes are found by importing every module of the project (and checked
against a grep of the sources), so a new exception class is covered without editing
this file, unless its constructor takes other arguments than a message: then the
test asks for an example below.
"""

from __future__ import annotations

import importlib
import pickle
import pkgutil
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "tasks", "blocks", "deployments")


def _examples() -> dict[str, tuple]:
    """Constructor arguments for the classes whose ``__init__`` is their own."""
    from tasks.multimodal.stacks import TileOutcome

    outcome = TileOutcome("t1", "transient", "HTTP 503", None)
    outcome2 = TileOutcome("t2", "transient", "timed out", None)
    return {
        "tasks.multimodal.stacks.TransientTilesError": ([outcome, outcome2],),
        "tasks.multimodal.sources.base.SourceError": ("t1", "no image"),
        "tasks.multimodal.sources.base.NoDataError": ("t1", "no Sentinel-2 image"),
        "tasks.multimodal.sources.base.TransientSourceError": ("t1", "HTTP 503"),
        "tasks.multimodal.sources.base.UnknownEcoregionError": ("t1", "ecoregion 'X' not in the mapping"),
    }


def _modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        if not (ROOT / pkg / "__init__.py").exists():
            continue
        names.append(pkg)
        mod = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(mod.__path__, prefix=f"{pkg}."):
            names.append(info.name)
    return names


def _project_exceptions() -> dict[str, type]:
    found: dict[str, type] = {}
    for name in _modules():
        mod = importlib.import_module(name)
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, BaseException) \
                    and obj.__module__.split(".")[0] in PACKAGES:
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


EXCEPTIONS = _project_exceptions()


def test_every_exception_class_of_the_sources_is_found():
    """The import walk sees every ``class ...(...Error|Exception...)`` the sources define."""
    pattern = re.compile(r"^\s*class\s+(\w+)\s*\(([^)]*(Error|Exception|Failed|Problem)[^)]*)\)", re.M)
    names = set()
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            names.update(m.group(1) for m in pattern.finditer(path.read_text()))
    seen = {q.rsplit(".", 1)[1] for q in EXCEPTIONS}
    assert names, "the grep found no exception class"
    assert names <= seen, f"exception classes not imported by the walk: {sorted(names - seen)}"


@pytest.mark.parametrize("qualname", sorted(EXCEPTIONS))
def test_exception_round_trips_through_pickle(qualname):
    cls = EXCEPTIONS[qualname]
    examples = _examples()
    if qualname in examples:
        exc = cls(*examples[qualname])
    elif not any("__init__" in vars(c) for c in cls.__mro__ if c.__module__.split(".")[0] in PACKAGES):
        exc = cls("something went wrong in tile x")
    else:
        pytest.fail(f"{qualname} has its own __init__: add an example of its arguments to _examples()")
    exc.__cause__ = None
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls
    assert str(back) == str(exc)
    assert back.args == exc.args
    assert vars(back).keys() == vars(exc).keys()
    for k, v in vars(exc).items():
        assert getattr(back, k) == v, k
