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
