"""The multimodal dataset layout has one owner (tasks/multimodal/layout.py), and the pieces of
the multimodal run (tasks/multimodal/run.py) that need no Prefect: fetch batches, partitions,
the run's verdict."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from tasks.common.report import RunReport
from tasks.multimodal import convert, stacks, tiles as tiles_mod
from tasks.multimodal.layout import DatasetLayout
from tasks.multimodal.run import fetch_batches, part_spec, partitions, run_failure

ROOT = Path(__file__).resolve().parents[1]
#: the layout's file names (what a module other than the layout must not spell)
OUTPUT_NAMES = (".h5", "_band_stats.json", "_splits.json", "_tile_info.json", "_tiles.geojson", "stacks_index.jsonl",
                "h5_manifest.json", "ee_tiles_key.json", "report_problems.jsonl", "report.json",
                "tiles_contact_sheet.png", "tiles_map.png")
#: path joins outside the layout, each with why it is not a dataset path the layout should own
ALLOWED_JOINS = {
    # the regions shipped with the code (an input, not a dataset file)
    ("tasks/multimodal/tiles.py", "'data'"), ("tasks/multimodal/tiles.py", "'regions_default.geojson'"),
    # convert.pack_partition / part_key name the files inside the folders they are handed (the
    # layout's stacks and parts folders); convert's internals are left to the packing work
    ("tasks/multimodal/convert.py", "f'{tid}.tif'"), ("tasks/multimodal/convert.py", "f'part_{spec.index:05d}.npz'"),
}


def _modules() -> list[Path]:
    return [ROOT / "flows" / "multimodal.py"] + sorted((ROOT / "tasks" / "multimodal").rglob("*.py"))


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def test_only_the_layout_builds_dataset_paths():
    """No module of the multimodal flow other than tasks/multimodal/layout.py joins a path
    with a literal name (``folder / "x"``, ``folder / f"{id}.json"``) or spells one of the
    dataset's file names: every output path comes from DatasetLayout."""
    layout_module = ROOT / "tasks" / "multimodal" / "layout.py"
    assert layout_module.is_file()
    found = []
    for path in _modules():
        if path == layout_module:
            continue
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and (
                    isinstance(node.right, ast.JoinedStr)
                    or (isinstance(node.right, ast.Constant) and isinstance(node.right.value, str))):
                if (rel, ast.unparse(node.right)) not in ALLOWED_JOINS:
                    found.append(f"{rel}:{node.lineno}: joins a path with {ast.unparse(node.right)}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs \
                    and node.value.endswith(OUTPUT_NAMES):
                found.append(f"{rel}:{node.lineno}: spells the file name {node.value!r}")
    assert not found, "dataset paths built outside tasks/multimodal/layout.py:\n" + "\n".join(found)


def test_layout_paths():
    layout = DatasetLayout(Path("/out/data_x"))
    assert layout.name == "data_x"
    assert layout.h5 == Path("/out/data_x/data_x.h5")
    assert layout.tile_info == Path("/out/data_x/data_x_tile_info.json")
    assert layout.tile_json("t1") == Path("/out/data_x/work/tile_info/t1.json")
    assert layout.stack("t1") == Path("/out/data_x/tiles/t1.tif")
    assert layout.stacks_index == Path("/out/data_x/work/stacks_index.jsonl")
    assert [p.name for p in DatasetLayout(Path("/d"), "data_y").dataset_files()] == [
        "data_y.h5", "data_y_band_stats.json", "data_y_splits.json", "data_y_tile_info.json"]
    assert layout.torchgeo_view("data_1M_v001") == Path("/out/torchgeo/data_1M_v001")


def _table(states: list[int]) -> stacks.TileStates:
    table = stacks.TileStates(np.array([b"t%d" % i for i in range(len(states))]))
    table.state[:] = states
    return table


def test_partitions_are_fixed_by_position_and_hold_the_done_tiles():
    table = _table([1, 0, 1, 2, 0, 0, 1])  # done, missing, done, no data, missing, missing, done
    compression = convert.Compression()
    specs = list(partitions(table, 3, 16, compression))
    assert [(s.index, s.tile_ids) for s in specs] == [(0, ["t0", "t2"]), (2, ["t6"])]
    assert part_spec(table, 1, 3, 16, compression) is None  # no done tile among positions 3..5
    assert specs[0].key != part_spec(table, 0, 3, 32, compression).key  # the key follows the image size


def test_run_failure_says_why(tmp_path):
    report = RunReport("t", problems_file=tmp_path / "problems.jsonl")  # the flow streams its problems
    every_failed = _table([0, 0, 1])
    assert "every tile this run tried to fetch failed (2 of 2" in run_failure(report, 2, 0, every_failed, 1)
    assert run_failure(report, 2, 1, every_failed, 1) is None
    assert run_failure(report, 0, 0, _table([2, 2]), 0).startswith("no tile gave a row (2 no data")
    report.problem("t0", "fetch", "OSError: [Errno 28] No space left on device")
    assert run_failure(report, 2, 1, every_failed, 1).startswith("the disk is full: 1 problem(s)")


@pytest.mark.parametrize("restricted", [False, True])
def test_fetch_batches_skip_settled_tiles(tmp_path, restricted):
    regions, _ = tiles_mod.load_regions_split(tiles_mod.DEFAULT_REGIONS)
    path = tmp_path / "t.geojson"
    tiles_mod.write_tiles_stream(tiles_mod.iter_sample_tiles(regions, tiles_mod.eco_region_index(regions), 6, 0,
                                                             seed=1), path)
    ids = [t.tile_id for chunk in tiles_mod.iter_tiles(path) for t in chunk]
    table = _table([1, 0, 0, 0, 2, 0])
    batches = list(fetch_batches(path, table, 2, {ids[3], ids[4]} if restricted else None))
    positions = [p for ps, _ in batches for p in ps]
    assert positions == ([3] if restricted else [1, 2, 3, 5])  # position 4 has no data: never fetched
    assert all(len(ps) <= 2 for ps, _ in batches)
    assert [t.tile_id for _, batch in batches for t in batch] == [ids[p] for p in positions]


def test_fetch_retry_policy_is_set_once():
    """The fetch's retries come from the configuration through one function; the task itself
    sets none, and no other module of the flow sets a retry delay."""
    from tasks.multimodal.tasks import fetch_batch_task, fetch_task

    assert fetch_batch_task.retries == 0
    task = fetch_task(3, 4.0)
    assert task.retries == 3 and task.retry_delay_seconds == [4.0, 8.0, 16.0] and task.retry_jitter_factor == 0.5
    assert fetch_task(0, 1.0).retries == 0
    setters = [p.relative_to(ROOT).as_posix() for p in _modules() if "retry_delay_seconds" in p.read_text()]
    assert setters == ["tasks/multimodal/tasks.py"]
