"""Write-then-rename helpers (tasks/common/atomic.py)."""

from __future__ import annotations

import stat

import pytest

from tasks.common.atomic import atomic_path, remove_partials, write_json_atomic


def test_written_file_has_ordinary_permissions(tmp_path):
    """A product file is readable by the group/others as any new file would be (the
    temporary file's 0600 from mkstemp is not carried over)."""
    plain = tmp_path / "plain.txt"
    plain.write_text("made by open()")
    expected = stat.S_IMODE(plain.stat().st_mode)
    path = write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert stat.S_IMODE(path.stat().st_mode) == expected
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"1")
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == expected


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "c.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / ".d.txt.abc.partial.txt").write_text("left by a killed run")
    assert remove_partials(tmp_path) == 1 and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- one scheme, every variant

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from tasks.common.atomic import (  # noqa: E402
    atomic_dir,
    atomic_h5,
    link_atomic,
    write_npz_atomic,
    writer_alive,
)

_KILLED_WRITER = """
import os, sys
from pathlib import Path
from tasks.common.atomic import atomic_dir, atomic_h5, atomic_path
out = Path(sys.argv[1])
kind = sys.argv[2]
if kind == "file":
    cm = atomic_path(out / "a.bin")
elif kind == "dir":
    cm = atomic_dir(out / "folder")
else:
    cm = atomic_h5(out / "f.h5")
with cm as tmp:
    if kind == "file":
        tmp.write_bytes(b"half")
    elif kind == "dir":
        (tmp / "x.txt").write_text("half")
    else:
        tmp.create_dataset("d", data=[1, 2, 3])
        tmp.flush()
    os._exit(9)  # killed mid-write: no cleanup runs
"""


@pytest.mark.parametrize("kind", ["file", "dir", "h5"])
def test_killed_writer_leaves_only_a_partial_that_the_cleanup_removes(tmp_path, kind):
    """A writer killed mid-write (no exception handler runs) leaves one ``.NAME.*.partial*``
    entry and no target; the cleanup removes it because its process is gone."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    rc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(tmp_path), kind], env=env).returncode
    assert rc == 9
    left = sorted(p.name for p in tmp_path.iterdir())
    target = {"file": "a.bin", "dir": "folder", "h5": "f.h5"}[kind]
    assert len(left) == 1 and left[0].startswith(f".{target}.") and ".partial" in left[0], left
    assert not writer_alive(left[0])
    assert remove_partials(tmp_path) == 1
    assert list(tmp_path.iterdir()) == []


def test_cleanup_spares_live_writers_and_filters_by_target(tmp_path):
    (tmp_path / "sub").mkdir()
    dead = f".a.h5.{'x' * 3}-999999999-abc.partial.h5"  # another host's: kept while young
    (tmp_path / dead).write_text("x")
    (tmp_path / "sub" / ".c.txt.old.partial.txt").write_text("x")  # untagged: removable
    with atomic_path(tmp_path / "b.txt") as live:
        live.write_text("being written")
        assert writer_alive(live.name)
        assert remove_partials(tmp_path, "b.txt") == 0 and live.exists()  # our own process writes it
    assert remove_partials(tmp_path) == 0  # the foreign-host entry is young
    assert remove_partials(tmp_path, "nomatch*", recursive=True) == 0
    assert remove_partials(tmp_path, "c.txt*", recursive=True) == 1
    assert remove_partials(tmp_path, max_foreign_age_s=0) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["b.txt", "sub"]


def test_folder_replaced_whole_or_kept(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "keep").mkdir()
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "keep"]
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "b.txt").write_text("2")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "keep"]  # the old folder, untouched
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # replaced, nothing of the old one
    with atomic_dir(out, merge=True) as tmp:
        (tmp / "b.txt").write_text("3")
        (tmp / "c").mkdir()
    assert sorted(p.name for p in out.iterdir()) == ["b.txt", "c"] and (out / "b.txt").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left
    plain = tmp_path / "plain"
    plain.mkdir()
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_h5_write_and_append(tmp_path):
    path = tmp_path / "f.h5"
    with atomic_h5(path) as fd:
        fd.create_dataset("a", data=np.arange(3))
    with atomic_h5(path, base=path) as fd:
        fd.create_dataset("b", data=np.arange(2))
    with pytest.raises(RuntimeError):
        with atomic_h5(path, base=path) as fd:
            fd.create_dataset("c", data=np.arange(2))
            raise RuntimeError("interrupted")
    with h5py.File(path, "r") as fd:
        assert sorted(fd) == ["a", "b"] and fd["b"][()].tolist() == [0, 1]
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w"):
        pass
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    write_npz_atomic(tmp_path / "z.npz", x=np.ones(2))
    with np.load(tmp_path / "z.npz") as z:
        assert z["x"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5", "plain.h5", "z.npz"]


def test_links(tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("data")
    link_atomic(Path("src.txt"), tmp_path / "rel.txt")
    assert os.readlink(tmp_path / "rel.txt") == "src.txt" and (tmp_path / "rel.txt").read_text() == "data"
    link_atomic(src, tmp_path / "hard.txt", kind="hardlink")
    assert os.path.samefile(src, tmp_path / "hard.txt")
    (tmp_path / "other.txt").write_text("other")
    link_atomic(tmp_path / "other.txt", tmp_path / "hard.txt", kind="hardlink")  # replaced
    assert (tmp_path / "hard.txt").read_text() == "other"
    with pytest.raises(ValueError, match="kind"):
        link_atomic(src, tmp_path / "x", kind="junction")
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]
