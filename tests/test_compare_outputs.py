"""bench/compare_outputs.py: the tool that shows a refactor left the data files unchanged."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import h5py
import numpy as np

_SPEC = importlib.util.spec_from_file_location("compare_outputs",
                                               Path(__file__).parents[1] / "bench" / "compare_outputs.py")
compare_outputs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(compare_outputs)


def _tree(root: Path, value: float, chunks: tuple[int, int] | None, keys_order: list[str]) -> Path:
    (root / "ds" / "logs").mkdir(parents=True)
    with h5py.File(root / "ds" / "d.h5", "w") as f:
        f.create_dataset("x", data=np.full((4, 4), value, np.float32), chunks=chunks)
        f.attrs["name"] = "d"
    (root / "ds" / "stats.json").write_text(json.dumps({k: 1 for k in keys_order}))
    (root / "ds" / "logs" / "run.log").write_text(f"started at {value}\n")
    (root / "ds" / "report.json").write_text(json.dumps({"wall_s": value}))
    return root


def test_equal_content_passes_and_a_changed_value_fails(tmp_path, capsys):
    a = _tree(tmp_path / "a", 1.0, None, ["x", "y"])
    b = _tree(tmp_path / "b", 1.0, (2, 2), ["y", "x"])  # other chunking and key order: same content
    assert compare_outputs.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "same_content: 2" in out and "records_differ: 0" in out

    c = _tree(tmp_path / "c", 2.0, None, ["x", "y"])  # a changed value: the h5 differs, records are listed only
    assert compare_outputs.main([str(a), str(c)]) == 1
    out = capsys.readouterr().out
    assert "ds/d.h5 (h5 content differs in ['x'])" in out
    assert "records_differ: 2" in out and "DIFFER" in out


def test_a_missing_data_file_fails(tmp_path):
    a = _tree(tmp_path / "a", 1.0, None, ["x"])
    b = _tree(tmp_path / "b", 1.0, None, ["x"])
    (b / "ds" / "stats.json").unlink()
    assert compare_outputs.main([str(a), str(b)]) == 1


def test_rerun_keys_are_told_apart_from_data(tmp_path, capsys):
    """A stage's rerun key (digest of its inputs and settings) may change while its data do not;
    a changed array beside it is a difference."""
    for name, key, depth in (("a", "k1", 1.0), ("b", "k2", 1.0), ("c", "k2", 2.0)):
        d = tmp_path / name
        d.mkdir()
        np.savez(d / "part.npz", depth=np.full(3, depth), key=np.array(key))
        (d / "scene.json").write_text(json.dumps({"key": key, "pairs": [1, 2]}))
    assert compare_outputs.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "equal but for rerun keys" in capsys.readouterr().out
    assert compare_outputs.main([str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    assert "part.npz (npz arrays differ in ['depth', 'key'])" in capsys.readouterr().out
