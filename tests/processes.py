"""Processes the operations tests start as an operator would (a worker, `serve`): the
environment pointing at the session's server, a log file, a wait for a line in it, and a
clean stop of the whole process group. Shared by test_operations.py, test_ui.py and
test_runtime_runs.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def server_env(server=None, **extra: str) -> dict[str, str]:
    """This environment with the project importable and, given a server, its API URL."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    if server is not None:
        env["PREFECT_API_URL"] = server.url
    return env


def start_logged(args: list[str], log: Path, env: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen:
    """``python args...`` in its own process group, stdout and stderr into ``log``."""
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_for_line(proc: subprocess.Popen, log: Path, text: str, timeout: float = 300) -> None:
    """Until ``text`` appears in ``log``; fails with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {text!r} from {proc.args}:\n{log.read_text()[-4000:]}"
        time.sleep(1)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 60) -> None:
    """Stop the process group of ``proc`` with ``sig`` (SIGKILL after ``timeout`` seconds)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
