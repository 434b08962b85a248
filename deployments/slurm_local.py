"""A single-node SLURM cluster on this machine, for trying the flows on SLURM and for the tests.

Debian's ``slurm-wlm`` (22.05) and ``munge`` (``apt-get install slurm-wlm munge``; root):
``munged``, ``slurmctld`` and ``slurmd`` run with their configuration, state and logs in one
folder, on loopback, on free ports, as the user who starts them. The node declares one fake GPU
(generic resource ``gpu``: ``GresTypes=gpu``, node ``Gres=gpu:1``, ``gres.conf`` with
``AutoDetect=off`` and a placeholder device file), so a job that asks ``--gres=gpu:1`` is
scheduled as on a GPU node (it gets no GPU, of course). There is no accounting database:
finished jobs are listed in ``jobcomp.log`` (``JobCompType=jobcomp/filetxt``) instead of
``sacct``.

Try it::

    python -m deployments.slurm_local            # prints SLURM_CONF=...; Ctrl-C stops everything
    export SLURM_CONF=/tmp/slurm-.../slurm.conf  # in another shell
    sinfo; sbatch --wrap hostname; squeue

Library use (tests/test_slurm.py)::

    with local_slurm() as slurm:      # SLURM_CONF is set in os.environ while it runs
        slurm.squeue()

On exit every job is cancelled, every daemon and job step process it started is stopped, and
the folder is removed (unless it was given).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

NODE = "factory1"
PARTITION = "debug"
#: what the node declares (``SlurmdParameters=config_overrides`` lets it declare more CPUs than
#: the machine has, so a 2-core machine runs a CPU worker job and a GPU worker job at once)
NODE_CPUS = 4
NODE_MEMORY_MB = 16000
#: environment variable that marks the daemons (and the job steps they start) of one cluster
MARK = "FACTORY_SLURM_CLUSTER"
APT_HINT = "install them with: apt-get install -y slurm-wlm munge (as root)"


class SlurmUnavailable(RuntimeError):
    """The SLURM or munge programs are missing, or the daemons did not come up."""


def missing_programs() -> list[str]:
    """The programs this needs that are not installed (empty when all are there)."""
    need = ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "scontrol"]
    return [p for p in need if not shutil.which(p, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]


def _which(p: str) -> str:
    return shutil.which(p, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or p


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def slurm_conf(folder: Path, ctld_port: int, slurmd_port: int, user: str) -> str:
    host = socket.gethostname()
    return f"""\
# written by deployments/slurm_local.py: one node on loopback, everything under {folder}
ClusterName=factory
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge/munge.socket
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={folder}/log/jobcomp.log
MinJobAge=30
KillWait=5
InactiveLimit=0
Waittime=0
GresTypes=gpu
NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} Gres=gpu:1 State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class LocalSlurm:
    """A running single-node cluster: its folder, configuration and the daemons it started."""

    folder: Path
    conf: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """A SLURM command (``sinfo``, ``squeue``, ``scontrol`` ...) against this cluster; its stdout."""
        r = subprocess.run([_which(args[0]), *args[1:]], env=self.env, capture_output=True, text=True,
                           timeout=timeout, check=False)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def squeue(self) -> list[dict[str, str]]:
        """The jobs SLURM knows now: id, name, state, reason."""
        out = self.run("squeue", "-h", "-o", "%i|%j|%T|%r")
        return [dict(zip(("id", "name", "state", "reason"), line.split("|"))) for line in out.splitlines() if line]

    def finished_jobs(self) -> list[dict[str, str]]:
        """Finished jobs (``jobcomp.log``: JobId, JobName, JobState, ...), oldest first."""
        path = self.folder / "log" / "jobcomp.log"
        rows = []
        for line in path.read_text().splitlines() if path.exists() else []:
            rec = {}
            for part in line.split():
                k, _, v = part.partition("=")
                rec[k] = v
            rows.append(rec)
        return rows

    def log_tail(self, n: int = 40) -> str:
        out = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            p = self.folder / "log" / name
            if p.exists():
                out.append(f"--- {name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(out)

    # ---------------------------------------------------------------- stop
    def cancel_all(self, timeout: float = 60) -> None:
        """Cancel every job and wait until SLURM lists none."""
        with contextlib.suppress(Exception):
            self.run("scancel", "--full", "--user", _user(), check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self.squeue():
                    return
            except Exception:  # noqa: BLE001 - controller gone: nothing to wait for
                return
            time.sleep(0.5)

    def _job_step_processes(self):
        """Processes started by this cluster's slurmd (job steps and what they run): they carry
        :data:`MARK`, or descend from a ``slurmstepd`` that does."""
        found = {}
        for p in psutil.process_iter(["pid", "name"]):
            with contextlib.suppress(psutil.Error):
                if p.info["name"] and p.info["name"].startswith("slurmstepd") and \
                        p.environ().get(MARK) == str(self.folder):
                    found[p.pid] = p
                    for c in p.children(recursive=True):
                        found[c.pid] = c
        return list(found.values())

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons (slurmd, slurmctld, munged) and any job step left."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.cancel_all()
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        left = self._job_step_processes()
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(left, timeout=10)


def _user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def _wait(pred, timeout: float, what: str, cluster: LocalSlurm) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        for name, p in cluster.procs.items():
            if p.poll() is not None:
                raise SlurmUnavailable(f"{name} exited ({p.returncode}) while waiting for {what}:\n"
                                       f"{cluster.log_tail()}")
        if time.monotonic() > deadline:
            raise SlurmUnavailable(f"timed out after {timeout:.0f} s waiting for {what}:\n{cluster.log_tail()}")
        time.sleep(0.3)


def _node_idle(cluster: LocalSlurm) -> bool:
    try:
        out = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10).split()
    except subprocess.TimeoutExpired:
        return False
    return out == ["idle"]


@contextlib.contextmanager
def local_slurm(folder: str | Path | None = None, start_timeout: float = 60) -> Iterator[LocalSlurm]:
    """Start munged, slurmctld and slurmd (configuration, state and logs under ``folder``, a new
    temporary folder by default); yield once the node is idle, with ``SLURM_CONF`` set in
    ``os.environ``; on exit cancel the jobs, stop every process and restore the environment."""
    missing = missing_programs()
    if missing:
        raise SlurmUnavailable(f"not installed: {', '.join(missing)}; {APT_HINT}")
    own = folder is None
    # short path: the munge socket's path must fit a Unix socket address (108 bytes)
    folder = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp") if own else folder).resolve()
    for sub in ("munge", "state", "spool", "log"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(folder / "munge", 0o700)
    key = folder / "munge" / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    (folder / "fake-gpu0").touch()  # the GPU's "device file": slurmd only checks that it exists
    ctld_port, slurmd_port = _free_ports(2)
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, ctld_port, slurmd_port, _user()))
    (folder / "gres.conf").write_text(f"AutoDetect=off\nNodeName={NODE} Name=gpu File={folder}/fake-gpu0\n")
    cluster = LocalSlurm(folder=folder, conf=conf)
    env = dict(os.environ, SLURM_CONF=str(conf), **{MARK: str(folder)})
    saved = os.environ.get("SLURM_CONF")

    def start(name: str, args: list[str]) -> None:
        log = open(folder / "log" / f"{name}.out", "wb")
        cluster.procs[name] = subprocess.Popen([_which(name), *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True)

    try:
        start("munged", ["--foreground", "--force", f"--socket={folder}/munge/munge.socket",
                         f"--key-file={key}", f"--pid-file={folder}/munge/munged.pid",
                         f"--log-file={folder}/log/munged.log", f"--seed-file={folder}/munge/munged.seed"])
        _wait(lambda: (folder / "munge" / "munge.socket").exists(), start_timeout, "munged", cluster)
        start("slurmctld", ["-D", "-i", "-f", str(conf)])
        _wait(lambda: cluster.run("scontrol", "ping", check=False, timeout=10).count("UP") >= 1,
              start_timeout, "slurmctld", cluster)
        start("slurmd", ["-D", "-f", str(conf), "-N", NODE])
        _wait(lambda: _node_idle(cluster), start_timeout, f"node {NODE} to be idle", cluster)
        os.environ["SLURM_CONF"] = str(conf)
        yield cluster
    finally:
        cluster.stop()
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        if own:
            shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deployments.slurm_local", description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", help="configuration, state and logs here (kept); default: a temporary folder, removed")
    args = ap.parse_args(argv)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        with local_slurm(args.folder) as slurm:
            print(f"SLURM is up: node {NODE} ({NODE_CPUS} CPUs, gres gpu:1), partition {PARTITION}", flush=True)
            print(f"export SLURM_CONF={slurm.conf}", flush=True)
            print(f"logs: {slurm.folder / 'log'}; Ctrl-C stops the cluster and cancels its jobs", flush=True)
            while not stop:
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except SlurmUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("SLURM stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
