"""Stopping the subprocesses that tests start in a session of their own (`start_new_session=True`), so that a
signal reaches the whole process group (a Celery worker's pool children, uvicorn's workers)."""

from __future__ import annotations

import os
import signal
import subprocess


def kill_process_group(proc: subprocess.Popen) -> None:
    """SIGKILL the group, as an OOM kill or a lost node would, and reap the leader."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stop_process_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the group and wait up to `timeout` seconds for the leader, then SIGKILL it; nothing if it has exited."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_process_group(proc)
