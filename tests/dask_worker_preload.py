"""Preload for the `dask worker` processes of the external test cluster (tests/test_runtime_runs.py).

Records every task a worker starts (its resource restrictions) in
``$FACTORY_TEST_RECORD_DIR/<worker name>.jsonl`` (with the SLURM job id of a worker that runs
as a SLURM job, tests/test_slurm.py). On a worker started with
``FACTORY_TEST_GPU_STANDIN=1`` and no CUDA build of pycolmap, the GPU dense
call (PatchMatch, CUDA only) is replaced by the CPU backend, so that the test
can check where GPU-tagged tasks land on a machine without a GPU; nowhere else.
"""

from __future__ import annotations

import json
import os
import time

from distributed import WorkerPlugin


class RecordTasks(WorkerPlugin):
    name = "record-tasks"

    def setup(self, worker):
        self.worker = worker
        self.path = os.path.join(os.environ["FACTORY_TEST_RECORD_DIR"], f"{worker.name}.jsonl")

    def transition(self, key, start, finish, **kwargs):
        if finish != "executing":
            return
        ts = self.worker.state.tasks.get(key)
        rec = {"key": str(key), "resources": dict(getattr(ts, "resource_restrictions", None) or {}),
               "slurm_job": os.environ.get("SLURM_JOB_ID"), "t": time.time()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")


def _gpu_standin() -> None:
    from tasks.aerial.dense import backends

    if backends.colmap_has_cuda() or backends.numba_cuda_available():
        return  # a real GPU: the real GPU method runs (backends.select_backend)

    def run_batch(self, workspace, depth_dir, names, step, progress=None):
        cpu = backends.PatchMatchBackend(self.config)
        out = backends.merge_dense_results([cpu.run_batch(workspace, depth_dir, names, s) for s in cpu.steps()])
        with open(os.path.join(os.environ["FACTORY_TEST_RECORD_DIR"], "gpu-standin.jsonl"), "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), "names": list(names)}) + "\n")
        return out

    # this worker says it has COLMAP's CUDA PatchMatch, whose maps the CPU PatchMatch makes here
    backends.colmap_has_cuda = lambda: True
    backends.ColmapCudaBackend.run_batch = run_batch
    backends.ColmapCudaBackend.fuse = lambda self, w, d, n: backends.PatchMatchBackend(self.config).fuse(w, d, n)


async def dask_setup(worker):
    if os.environ.get("FACTORY_TEST_GPU_STANDIN") == "1":
        _gpu_standin()
    await worker.plugin_add(RecordTasks(), name=RecordTasks.name)
