"""Runs that go wrong as a whole: a full disk, every tile failing, an unreadable tile JSON.

A run that produced nothing it was asked for exits non-zero (``RunFailed``) and never
replaces a good dataset with an empty one; a tile JSON that cannot be read is fetched
again, never dropped from ``NAME_tile_info.json``; ``report_problems.jsonl`` holds the
problems of the last run only. Thread task runner (monkeypatches reach the tasks), a
small world: six tiles of 30 px, 16 px images.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import h5py
import pytest

from tasks.multimodal.layout import DatasetLayout

pytestmark = pytest.mark.usefixtures("prefect_server")


def _files(out: Path, name: str) -> dict[str, bytes]:
    return {p: (out / p).read_bytes() for p in
            (f"{name}.h5", f"{name}_tile_info.json", f"{name}_band_stats.json", f"{name}_splits.json")}


def _problems(out: Path) -> list[dict]:
    """This run's problems: report_problems.jsonl, absent (and not named by report.json) when
    the run had none."""
    path = out / "report_problems.jsonl"
    named = json.loads((out / "report.json").read_text()).get("problems_file")
    assert (named is not None) == path.exists(), (named, path.exists())
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_failed_runs_exit_non_zero_and_keep_the_good_dataset(tmp_path, monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.multimodal import multimodal_flow
    from tasks.common.report import RunFailed
    from tasks.multimodal import stacks
    from tasks.multimodal.config import MultimodalConfig
    from tasks.multimodal.sources.synthetic import SyntheticSource

    cfg = MultimodalConfig(name="data_failures", output_dir=str(tmp_path), n_tiles=6, fetch_batch_size=2,
                           part_size=3, tile_size_m=300.0, image_size=16, tasks_in_flight=2, fetch_retries=1,
                           fetch_retry_delay_s=0.01, source_options={"missing_orbit_rate": 0.0})
    out = cfg.dataset_dir

    def run():
        return multimodal_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=2))(config=cfg)

    first = run()
    rows = first["counts"]["rows in h5"]
    assert rows == 6 and _problems(out) == []
    good = _files(out, cfg.name)

    # 1. a full disk: every stack write fails with ENOSPC
    for tif in (out / "tiles").glob("*.tif"):
        tif.unlink()

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(stacks, "write_stack", disk_full)
        with pytest.raises(RunFailed, match="disk is full"):
            run()
    assert _files(out, cfg.name) == good  # the good dataset is not replaced by a 0-row one
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["rows in h5"] == 0 and report["counts"]["fetch failed"] == 6
    assert sum("No space left on device" in p["reason"] for p in _problems(out)) == 6

    # 2. every tile fails (not a disk problem): non-zero, dataset kept, last run's problems only
    def broken(self, tile, grid):
        raise RuntimeError("source broken")

    with monkeypatch.context() as m:
        m.setattr(SyntheticSource, "fetch", broken)
        with pytest.raises(RunFailed, match="every tile this run tried to fetch failed"):
            run()
    assert _files(out, cfg.name) == good
    problems = _problems(out)
    assert problems and not any("No space" in p["reason"] for p in problems)
    assert sum("source broken" in p["reason"] for p in problems) == 6

    # 3. fixed: the dataset comes back, and the problems file forgets the failed runs
    again = run()
    assert again["counts"]["rows in h5"] == rows and again["counts"]["fetched this run"] == 6
    assert not any("source broken" in p["reason"] for p in _problems(out))
    assert run()["counts"]["fetched this run"] == 0
    assert _problems(out) == []  # a run without problems leaves no file, never stale lines

    # 4. an unreadable tile JSON is fetched again, never dropped from NAME_tile_info.json
    with h5py.File(out / f"{cfg.name}.h5") as f:
        ids = [m[0].decode() for m in f["metadata"][:]]
    victim = ids[2]
    (DatasetLayout(out).tile_info_dir / f"{victim}.json").write_text('{"S2_DATE": "2019-')
    third = run()
    assert third["counts"]["fetched this run"] == 1 and third["counts"]["rows in h5"] == rows
    info = json.loads((out / f"{cfg.name}_tile_info.json").read_text())
    assert set(ids) <= set(info) and len(info) == rows
    reasons = [p["reason"] for p in _problems(out) if p["item"] == victim]
    assert reasons and "unreadable" in reasons[0] and "fetched again" in reasons[0]


def test_tile_info_is_not_written_without_a_row_s_entry(tmp_path):
    """Written while a JSON of an h5 row cannot be read: refused (the file is kept), and the
    unreadable tiles not in the h5 are listed for the report."""
    from tasks.multimodal import stacks

    folder = DatasetLayout(tmp_path).tile_info_dir
    folder.mkdir(parents=True)
    for t in ("a", "b", "c"):
        (folder / f"{t}.json").write_text(json.dumps({"S2_type": "l2a"}))
    path = tmp_path / "data_t_tile_info.json"
    assert stacks.write_tile_info_json(path, ["a", "b", "c"], tmp_path, in_h5=lambda t: True) == 3
    before = path.read_bytes()
    (folder / "b.json").write_text("{")
    (folder / "c.json").write_text("[1, 2]")
    unreadable: list[str] = []
    with pytest.raises(stacks.TileInfoLost, match="b"):
        stacks.write_tile_info_json(path, ["a", "b", "c"], tmp_path, unreadable, in_h5=lambda t: t == "b")
    assert path.read_bytes() == before and unreadable == ["b", "c"]
    unreadable.clear()
    assert stacks.write_tile_info_json(path, ["a", "b", "c"], tmp_path, unreadable, in_h5=lambda t: False) == 1
    assert unreadable == ["b", "c"]


def test_cli_exits_1_with_one_line_when_the_run_failed(monkeypatch, capsys):
    import flows.multimodal as fm
    from tasks.common.report import RunFailed

    def failing(*a, **k):
        raise RunFailed("every tile this run tried to fetch failed (6 of 6; see report)")

    monkeypatch.setattr(fm, "run_local", failing)
    assert fm.main([]) == 1
    err = capsys.readouterr().err
    assert err == "error: every tile this run tried to fetch failed (6 of 6; see report)\n"
