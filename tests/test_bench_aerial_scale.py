"""bench/bench_aerial_scale.py: its bookkeeping (issue 23 item 2). No timing is asserted: the
tests check that the pipeline's own stage blocks are what the benchmark measures, that a child
process's CPU and the files a stage writes land in that stage, and the slopes and flags."""

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    if str(ROOT / "bench") not in sys.path:  # the bench imports benchlib beside it
        sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_aerial_scale", ROOT / "bench" / "bench_aerial_scale.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_aerial_scale"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_probe_measures_the_pipelines_own_stages(monkeypatch, tmp_path):
    """The benchmark wraps RunReport.stage (the blocks the flow times in report.json): a stage's
    row has the report's name and wall time, the CPU of a child process that ran in it, and the
    bytes written under the root during it; a stage that fails still gets its row."""
    from tasks.aerial import synthetic_world
    from tasks.common.report import RunReport, StageFailed

    bench = _load_bench()
    monkeypatch.setattr(RunReport, "stage", RunReport.stage)  # restored after the test
    monkeypatch.setattr(synthetic_world, "ensure_world", synthetic_world.ensure_world)
    finished = []
    probe = bench.Probe(tmp_path, period=60, on_stage=lambda: finished.append(len(probe.stages)))  # samples at
    # the stage boundaries and when asked; on_stage: a stopped run keeps the stages it finished
    bench.instrument(probe)
    report = RunReport(title="t")
    with report.stage("ingest", "s"):
        (tmp_path / "frames.bin").write_bytes(b"x" * 1000)
    with report.stage("features", "s"):
        child = subprocess.Popen([sys.executable, "-c", "import sys\nn = sum(range(3 * 10**6))\nsys.stdin.read()"],
                                 stdin=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while psutil.Process(child.pid).cpu_times().user < 0.05 and time.monotonic() < deadline:
                time.sleep(0.05)
            probe.sample()
        finally:
            child.communicate(b"")
    with pytest.raises(StageFailed), report.stage("matches", "s"):
        raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt), probe.segment("dense"):  # a run stopped midway
        raise KeyboardInterrupt
    assert probe.stages[-1]["stopped"] and finished == [1, 2, 3, 4]
    rec = {"n": 3, "report": {"timings": report.timings, "counts": {}}, "probe": probe.stages}
    rows = bench.stage_rows(rec)
    assert list(rows) == ["ingest", "features", "matches"] == list(report.timings)  # not the stopped one
    assert rows["ingest"]["bytes"] == 1000 and rows["features"]["bytes"] == 0
    assert rows["features"]["cpu_s"] >= 0.05  # the child's CPU, counted in the stage it ran in
    assert {k: r["wall_s"] for k, r in rows.items()} == report.timings  # the pipeline's own wall times
    assert rows["features"]["peak_rss_sum"] > 0


def _record(n, cpu, pairs, covis):
    return {"n": n, "n_aerial": n * 3 // 4, "n_ground": n // 4, "size": [64, 48], "exit": 0, "wall_s": 1.0,
            "cpu_s": sum(cpu.values()), "peak_rss_sum": 1e9, "bytes": 1e6, "prefect_server_cpu_s": 0.0,
            "probe": [{"stage": s, "wall_s": c, "cpu_s": c, "peak_rss_sum": 1e8, "peak_rss_one": 1e8,
                       "bytes": 10 * n} for s, c in cpu.items()],
            "report": {"timings": {s: c / 2 for s, c in cpu.items()},
                       "counts": {"reference pairs": pairs, "retrieval pairs": 0, "photo pairs": 0,
                                  "covisibility candidate pairs": covis, "frames": n}}}


def test_slopes_flags_and_tables(tmp_path):
    """Slopes are exact for power laws; a stage growing as N^2 while its pairs grow as N is
    flagged, one growing as its pairs (even N^2) is not; the tables name every stage; the
    written JSON reads back; the extrapolation follows the last slope."""
    bench = _load_bench()
    records = []
    for n in (64, 256, 1024):
        cpu = {"features": 0.5 * n, "matches": 0.01 * n * n, "dense": 3.0 * n, "covisibility": 0.01 * n * n}
        records.append(_record(n, cpu, pairs=n * n // 8, covis=5 * n))
    fit = bench.analyze(records[::-1])  # any order in
    assert fit["n"] == [64, 256, 1024]
    assert fit["stages"]["features"]["cpu_s"]["slopes"] == pytest.approx([1.0, 1.0])
    assert fit["stages"]["matches"]["cpu_s"]["slopes"] == pytest.approx([2.0, 2.0])
    assert fit["pairs"]["matched pairs"]["slopes"] == pytest.approx([2.0, 2.0])
    assert fit["pairs"]["covisibility candidate pairs"]["slopes"] == pytest.approx([1.0, 1.0])
    assert fit["stages"]["features"]["wall_s"]["values"] == [16, 64, 256]  # report.json's timings
    assert [f["stage"] for f in fit["flagged"]] == ["covisibility", "covisibility"]
    assert fit["flagged"][0]["cpu_slope"] == pytest.approx(2.0) and fit["flagged"][0]["pairs_slope"] == pytest.approx(1)
    for i, r in enumerate(records):
        (tmp_path / f"point-{r['n']:05d}.json").write_text(json.dumps(r))
    back = bench.write_outputs(tmp_path, bench.load_records(tmp_path))
    assert back["flagged"] == fit["flagged"]
    md = (tmp_path / "scale.md").read_text()
    for s in ("features", "matches", "dense", "covisibility", "EXTRAPOLATION"):
        assert s in md
    assert json.loads((tmp_path / "scale.json").read_text())["fit"]["n"] == [64, 256, 1024]
    assert bench.extrapolate(bench.analyze(records[:2]), 1024)["dense"] == pytest.approx(3.0 * 1024)
    assert math.isnan(bench.slope(64, 0.0, 256, 1.0))  # a stage that took nothing has no slope


def test_pairs_of_a_stopped_run_come_from_its_pairs_files(tmp_path):
    """A run stopped before its report.json still has its pairs: read from the pairs files."""
    bench = _load_bench()
    work = tmp_path / "data" / "0001" / "sfm_output_localization"
    work.mkdir(parents=True)
    (work / "pairs-reference-poses.txt").write_text("a b\na c\nb c\n")
    (work / "pairs-query-retrieval.txt").write_text("q a\n")
    (work / "pairs-query-poses.txt").write_text("")
    (work / "pairs-all.txt").write_text("a b\na c\nb c\nq a\n")  # the union: not counted again
    files = bench.pairs_in_files(tmp_path)
    assert files == {"reference pairs": 3, "retrieval pairs": 1, "photo pairs": 0}
    assert bench.pair_counts({"report": {"counts": {}}, "pairs_files": files})["matched pairs"] == 4
    # report.json's counts win when the run finished
    assert bench.pair_counts({"report": {"counts": {"reference pairs": 7}}, "pairs_files": files}) == {
        "reference pairs": 7, "matched pairs": 7}
