"""The flows' Dask workers as SLURM jobs: ``dask_jobqueue.SLURMCluster`` plus GPU worker jobs.

Use it as the ``dask.cluster_class`` (or a ``DaskCluster`` block's), its keyword arguments in
``cluster_kwargs``::

    DaskCluster(cluster_class="tasks.common.slurm.SLURMCluster",
                cluster_kwargs={"queue": "cpu", "account": "geo", "walltime": "04:00:00",
                                "cores": 8, "memory": "32GB", "n_workers": 4,  # workers
                                "gpu_jobs": 1, "gpu_job_kwargs": {"queue": "gpu"}}).save("slurm")

Every keyword of ``dask_jobqueue.SLURMCluster`` works as documented there (``queue`` is the
partition, ``account``, ``walltime``, ``job_extra_directives``, ``job_script_prologue``,
``log_directory``, ``interface`` ...). ``n_workers`` counts the CPU workers (jobs x ``processes``). Added here:

* ``gpu_jobs`` (default 0): that many more jobs, each asking SLURM for a GPU
  (``--gres=gpu:1``; ``gpu_job_kwargs`` overrides any job keyword for them, e.g. another
  partition or more memory) and starting its Dask worker with ``--resources GPU=1``: the GPU
  stages' tasks (tagged with the Dask resource ``GPU``) run there and only there. The GPU jobs
  stay while the cluster lives; ``adapt`` and ``scale`` size the CPU jobs (their counts include
  the GPU jobs, as Dask's adaptive scaling counts every worker).
* ``start_timeout`` (seconds, default 600; ``None`` waits forever): the cluster waits this long
  for its first CPU worker and every GPU worker to connect, then stops with
  :class:`JobsNotStarted` naming each job SLURM has not started and the reason ``squeue`` gives
  (e.g. a drained node: ``PENDING (reason: ReqNodeNotAvail ...)``), and cancels its jobs. A job
  ``sbatch`` refuses (a partition, account or GPU count that does not exist) stops it at once,
  with SLURM's message and the job script. A GPU job runs one Dask worker process
  (``processes=1`` unless ``gpu_job_kwargs`` says otherwise).

Print the job scripts a saved block's settings (or any ``cluster_kwargs``) submit, submitting nothing::

    python -m tasks.common.slurm --print-job-script --block slurm
    python -m tasks.common.slurm --print-job-script --cluster-kwargs '{"queue": "cpu", "cores": 8,
        "memory": "32GB", "walltime": "04:00:00", "gpu_jobs": 1, "gpu_job_kwargs": {"queue": "gpu"}}'
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any


def _import_jobqueue():
    """``import dask_jobqueue`` without what its ``runner`` module does on import:
    ``signal.signal(SIGINT, lambda *_: sys.exit())`` (dask-jobqueue 0.9.0), which replaces the
    flow process's Ctrl-C handling (KeyboardInterrupt) and raises ValueError outside the main
    thread, so the import failed where a flow runs in a thread."""
    if "dask_jobqueue" in sys.modules:
        return sys.modules["dask_jobqueue"]
    real = signal.signal
    main = threading.current_thread() is threading.main_thread()
    saved = signal.getsignal(signal.SIGINT) if main else None
    signal.signal = lambda sig, handler: signal.getsignal(sig)  # type: ignore[assignment]
    try:
        import dask_jobqueue
    finally:
        signal.signal = real
        if main and saved is not None and signal.getsignal(signal.SIGINT) is not saved:
            real(signal.SIGINT, saved)
    return dask_jobqueue


dask_jobqueue = _import_jobqueue()
from dask_jobqueue.slurm import SLURMJob  # noqa: E402 - after the guarded import above
from dask.utils import parse_bytes
from distributed.core import Status
from distributed.utils import NoOpAwaitable

log = logging.getLogger(__name__)

GPU_DIRECTIVES = ["--gres=gpu:1"]
GPU_WORKER_ARGS = ["--resources", "GPU=1"]


class JobsNotStarted(RuntimeError):
    """SLURM did not start the cluster's worker jobs within ``start_timeout``."""


def gpu_job_kwargs(job_kwargs: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job keywords of a GPU worker job: the CPU jobs' keywords, ``--gres=gpu:1`` added to the
    directives (unless the overrides' directives ask for a GPU already) and ``--resources GPU=1``
    to the worker's arguments, then ``overrides`` on top."""
    kw = copy.deepcopy(job_kwargs)
    over = dict(overrides or {})
    directives = list(kw.get("job_extra_directives") or []) + list(over.pop("job_extra_directives", []) or [])
    if not any("gres=gpu" in d or "gpus" in d for d in directives):
        directives += GPU_DIRECTIVES
    args = list(kw.get("worker_extra_args") or []) + list(over.pop("worker_extra_args", []) or [])
    if "--resources" not in args:
        args += GPU_WORKER_ARGS
    kw.update(over)
    kw["job_extra_directives"] = directives
    kw["worker_extra_args"] = args
    if "processes" not in over:
        kw["processes"] = 1  # one Dask worker process per GPU job: GPU=1 is one GPU's worth of work
    if "job_name" not in over:
        kw["job_name"] = f"{kw.get('job_name') or 'dask-worker'}-gpu"
    return kw


class _SLURMJob(SLURMJob):
    """``SLURMJob`` that keeps why its ``sbatch`` failed (Dask only logs it), for the cluster's
    report, and is ``closed`` once cancelled."""

    submit_errors: dict[str, str] = {}

    async def start(self):
        try:
            await super().start()
        except Exception as exc:
            _SLURMJob.submit_errors[str(self.name)] = f"{type(exc).__name__}: {exc}".strip()[:1000]
            self.status = Status.failed  # nothing to cancel (the cluster's close checks it)
            raise

    async def close(self):
        """scancel the job, then say so: dask-jobqueue's ``Job.close`` leaves the status
        ``running``, and distributed's cluster close asserts that every job it started is closed
        (it failed with ``AssertionError: Status.running`` closing a cluster one of whose jobs sbatch
        had refused)."""
        await super().close()
        self.status = Status.closed


class SLURMCluster(dask_jobqueue.SLURMCluster):
    """``dask_jobqueue.SLURMCluster`` with ``gpu_jobs`` GPU worker jobs and a ``start_timeout``
    (see the module's documentation)."""

    job_cls = _SLURMJob

    def __init__(self, *args: Any, gpu_jobs: int = 0, gpu_job_kwargs: dict[str, Any] | None = None,
                 start_timeout: float | None = 600, n_workers: int = 0, **kwargs: Any):
        if gpu_jobs < 0 or n_workers < 0:
            raise ValueError("SLURMCluster: gpu_jobs and n_workers must be >= 0")
        self._gpu_overrides = dict(gpu_job_kwargs or {})
        self._gpu_names: list[str] = []
        super().__init__(*args, n_workers=0, **kwargs)
        for old in [k for k in _SLURMJob.submit_errors if k.startswith(f"{self._name}-")]:
            del _SLURMJob.submit_errors[old]  # an earlier cluster's of the same name
        self._gpu_kwargs = globals()["gpu_job_kwargs"](self._job_kwargs, self._gpu_overrides)
        for i in range(gpu_jobs):
            name = f"{self._name}-gpu-{i}"
            self._gpu_names.append(name)
            self.worker_spec[name] = {"cls": self.job_cls, "options": self._gpu_kwargs}
        self.scale(n_workers + gpu_jobs)
        if start_timeout is not None and (n_workers or gpu_jobs):
            try:
                self._wait_for_jobs(start_timeout, need_cpu=n_workers > 0)
            except BaseException:
                self.close()
                raise

    # ------------------------------------------------------------------ scaling
    def scale(self, n: int | None = None, jobs: int = 0, memory: Any = None, cores: Any = None):
        """``n`` workers in all (as Dask's adaptive scaling counts): the GPU jobs stay (until the
        cluster closes), CPU jobs make up the rest. The GPU entries are never taken out of
        ``worker_spec``, not even for a moment: the event loop's thread reads it concurrently
        (taking them out and back in here once left the GPU job unsubmitted)."""
        if self.status in (Status.closing, Status.closed) or not self._gpu_names:
            return super().scale(n, jobs=jobs, memory=memory, cores=cores)
        if n is not None:
            jobs = math.ceil(max(0, n - len(self._gpu_names)) / self._dummy_job.worker_processes)
        if memory is not None:
            jobs = max(jobs, math.ceil(parse_bytes(memory) / self._memory_per_worker()))
        if cores is not None:
            jobs = max(jobs, math.ceil(cores / self._threads_per_worker()))
        cpu = [k for k in self.worker_spec if k not in self._gpu_names]
        if len(cpu) > jobs:
            up = {str(v.get("name")) for v in self.scheduler_info.get("workers", {}).values()}
            for k in [k for k in cpu if str(k) not in up][::-1] + [k for k in cpu if str(k) in up][::-1]:
                if len(cpu) <= jobs:
                    break
                del self.worker_spec[k]
                cpu.remove(k)
        while len(cpu) < jobs:
            new = self.new_worker_spec()
            self.worker_spec.update(new)
            cpu.extend(new)
        self.loop.add_callback(self._correct_state)
        if self.asynchronous:
            return NoOpAwaitable()
        return None

    async def scale_down(self, workers):
        """Adaptive scaling retires CPU workers only (the GPU jobs stay)."""
        gpu_addrs = {a for a, w in self.scheduler_info.get("workers", {}).items() if w.get("name") in self._gpu_names}
        return await super().scale_down([w for w in workers if w not in self._gpu_names and w not in gpu_addrs])

    # ------------------------------------------------------------------ scripts
    def job_scripts(self) -> dict[str, str]:
        """The job script of a CPU worker job and of a GPU worker job (``gpu_jobs`` or not)."""
        return {"cpu": self.job_script(),
                "gpu": SLURMJob(self.scheduler.address, name="dummy-name", **self._gpu_kwargs).job_script()}

    # ------------------------------------------------------------------ start
    def job_ids(self) -> dict[str, str | None]:
        """Worker name -> SLURM job id (None while not submitted)."""
        return {str(name): getattr(job, "job_id", None) for name, job in list(self.workers.items())}

    def _rejected(self, need_cpu: bool) -> bool:
        """Whether sbatch refused every job of a kind the cluster needs (waiting cannot help)."""
        errors = _SLURMJob.submit_errors
        cpu = [str(n) for n in self.worker_spec if n not in self._gpu_names]
        return (any(n in errors for n in self._gpu_names)
                or (need_cpu and bool(cpu) and all(n in errors for n in cpu)))

    def _connected(self) -> set[str]:
        return {str(w.get("name")) for w in self.scheduler_info.get("workers", {}).values()}

    def _wait_for_jobs(self, timeout: float, need_cpu: bool) -> None:
        deadline = time.monotonic() + timeout
        while True:
            up = self._connected()
            gpu_ok = all(n in up for n in self._gpu_names)
            cpu_ok = not need_cpu or any(n not in self._gpu_names for n in up)
            if gpu_ok and cpu_ok:
                return
            if time.monotonic() > deadline or self._rejected(need_cpu):
                break
            time.sleep(0.5)
        ids = self.job_ids()
        states = _squeue_states([i for i in ids.values() if i])
        lines = []
        for name in sorted(set(self.worker_spec) | set(ids)):
            if str(name) in up:
                continue
            kind = "GPU" if name in self._gpu_names else "CPU"
            jid = ids.get(str(name))
            if not jid:
                why = _SLURMJob.submit_errors.get(str(name))
                lines.append(f"  {kind} worker {name}: not submitted ("
                             f"{'sbatch failed: ' + why if why else 'sbatch has not answered yet'})")
            else:
                state, reason = states.get(jid, ("not in squeue", "ended before its worker connected; "
                                                 "see its output file (log_directory)"))
                lines.append(f"  {kind} worker {name}: SLURM job {jid} {state} (reason: {reason})")
        rejected = sorted({("gpu" if n in self._gpu_names else "cpu") for n in self.worker_spec
                           if str(n) in _SLURMJob.submit_errors})
        scripts = self.job_scripts()
        shown = "".join(f"\nThe {k.upper()} worker job script SLURM rejected:\n{scripts[k]}" for k in rejected)
        head = ("SLURM rejected the Dask worker jobs" if rejected else
                f"SLURM did not start the Dask worker jobs within start_timeout={timeout:g} s")
        raise JobsNotStarted(
            f"{head} "
            f"({len(up)} worker(s) connected; needed: {'a CPU worker' if need_cpu else ''}"
            f"{' and ' if need_cpu and self._gpu_names else ''}"
            f"{str(len(self._gpu_names)) + ' GPU worker(s)' if self._gpu_names else ''}):\n" + "\n".join(lines)
            + "\nCheck the partition, account, GPUs and limits asked for (`python -m tasks.common.slurm "
              "--print-job-script`), `sinfo` for drained or down nodes, or raise start_timeout; "
              "the cluster's jobs were cancelled." + shown)


def _squeue_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """Job id -> (state, reason) from ``squeue``; empty when it cannot be asked."""
    if not job_ids or not shutil.which("squeue"):
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%r"], capture_output=True,
                             text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    rows = (line.split("|") for line in out.splitlines() if line.count("|") == 2)
    return {i: (s, r) for i, s, r in rows}


def print_job_scripts(cluster_kwargs: dict[str, Any], out=None) -> None:
    """Print the job scripts ``SLURMCluster(**cluster_kwargs)`` submits, submitting nothing (a
    scheduler runs for a moment on loopback; its address in the scripts is a placeholder)."""
    out = out or sys.stdout
    kw = dict(cluster_kwargs)
    gpu_jobs = int(kw.pop("gpu_jobs", 0) or 0)
    kw.update(n_workers=0, gpu_jobs=0, start_timeout=None)
    opts = dict(kw.get("scheduler_options") or {})
    opts.update(dashboard=False, dashboard_address="127.0.0.1:0", host="127.0.0.1")  # loopback, a free port
    kw["scheduler_options"] = opts
    with SLURMCluster(**kw) as cluster:
        addr = cluster.scheduler.address
        scripts = cluster.job_scripts()
    n_cpu = cluster_kwargs.get("n_workers", 0)
    out.write(f"# CPU worker job (n_workers={n_cpu} of them; adapt_kwargs may change that)\n")
    out.write(scripts["cpu"].replace(addr, "<scheduler-address>"))
    out.write(f"\n# GPU worker job (gpu_jobs={gpu_jobs} of them)\n")
    out.write(scripts["gpu"].replace(addr, "<scheduler-address>").rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tasks.common.slurm",
                                 description="Print the SLURM job scripts of SLURMCluster settings (nothing is submitted).")
    ap.add_argument("--print-job-script", action="store_true", required=True,
                    help="print the CPU and the GPU worker job scripts")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--block", help="a saved DaskCluster block (needs the Prefect API: PREFECT_API_URL)")
    src.add_argument("--cluster-kwargs", help="the cluster_kwargs as JSON")
    args = ap.parse_args(argv)
    if args.block:
        # Prefect (the block) only for --block: --cluster-kwargs prints without it (prefect: 5 s to import)
        from blocks.dask_cluster import DaskCluster

        settings = DaskCluster.load(args.block).to_settings()
        if settings.cluster_class not in ("tasks.common.slurm.SLURMCluster", "dask_jobqueue.SLURMCluster"):
            ap.error(f"block {args.block!r}: cluster_class is {settings.cluster_class!r}, not a SLURM cluster")
        kwargs = settings.cluster_kwargs
    else:
        try:
            kwargs = json.loads(args.cluster_kwargs)
        except json.JSONDecodeError as exc:
            ap.error(f"--cluster-kwargs is not JSON: {exc}")
    print_job_scripts(kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
