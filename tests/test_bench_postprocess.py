"""bench/bench_postprocess.py times post-processing as the flow runs it (issue 25 part 3)."""

import argparse
import importlib.util
import sys
from pathlib import Path

import dask
import distributed
import pytest

ROOT = Path(__file__).resolve().parents[1]


class _ClusterSeen(Exception):
    pass


def _load_bench():
    if str(ROOT / "bench") not in sys.path:  # the bench imports benchlib beside it
        sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_postprocess", ROOT / "bench" / "bench_postprocess.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_postprocess"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_bench_cluster_has_the_flow_workers_malloc_settings(monkeypatch, tmp_path):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers unless told not to;
    every flow's cluster is told not to (tasks.common.runtime), and packing costs about 40 %
    more CPU with it (12.8 vs 18.0 ms a tile measured). The benchmark must start its
    cluster with the same settings, or it times something the flow never runs."""
    bench = _load_bench()
    seen = {}

    def fake_cluster(*args, **kwargs):
        seen["env"] = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
        seen["log"] = dask.config.get("distributed.admin.low-level-log-length")
        raise _ClusterSeen

    monkeypatch.setattr(distributed, "LocalCluster", fake_cluster)
    monkeypatch.delenv("FACTORY_DASK_MALLOC_TRIM", raising=False)
    monkeypatch.delenv("DASK_DISTRIBUTED__ADMIN__LOW_LEVEL_LOG_LENGTH", raising=False)
    args = argparse.Namespace(codec="isal", level=1, workers=1, image_size=16, part_size=4, runner="dask")
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 65536,
                          "distributed.admin.low-level-log-length": 1000}):
        with pytest.raises(_ClusterSeen):
            bench.post_process(args, tmp_path, [], {}, {})
    assert seen["env"].get("MALLOC_TRIM_THRESHOLD_") is None
    assert seen["log"] == 50


def test_bench_packs_a_small_n_in_local_threads_without_a_cluster(monkeypatch, tmp_path):
    """Post-processing alone decides where it packs in one place (convert.packs_locally): a
    small N packs in local threads, with no Dask cluster to start; the output is complete."""
    import h5py

    from tasks.multimodal import convert

    bench = _load_bench()

    def no_cluster(*args, **kwargs):
        raise AssertionError("a Dask cluster was started for a small N")

    monkeypatch.setattr(distributed, "LocalCluster", no_cluster)
    ids, info = bench.build_stacks(tmp_path, 3)
    assert convert.packs_locally(len(ids))
    args = argparse.Namespace(codec="isal", level=1, workers=2, image_size=128, part_size=2, runner="auto")
    phases = {}
    n, _, _ = bench.post_process(args, tmp_path, ids, info, phases)
    assert n == 3 and "pack" in phases
    with h5py.File(tmp_path / "data_bench.h5", "r") as f:
        assert [m["tile_id"].decode() for m in f["metadata"][:]] == ids
    assert (tmp_path / "data_bench_band_stats.json").exists()
