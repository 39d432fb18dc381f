"""Scripted deployment on loopback: CA + certificates, a SuperLink with TLS and SuperNode
authentication, SuperNodes with their partition ids, ``flwr run`` of an app, and the stop of every
process it started (by PID, with their children), also on Ctrl-C or failure.

Also the process helpers other tests use (:func:`stop_tree`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time


def descendants(pid: int) -> list[int]:
    """PIDs of all (recursive) children of ``pid`` (empty if it is gone)."""
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def stop_tree(proc: subprocess.Popen, grace: float = 10.0, extra: list[int] = ()) -> None:
    """Stop ``proc``, its process group and every descendant (collected before the stop).

    SIGTERM first, SIGKILL after ``grace`` seconds for whatever is left. Processes that moved to
    their own process group (Ray's services, ``flower-superexec`` children) are found through the
    process tree, so nothing started under ``proc`` outlives it.
    """
    import psutil

    pids = [proc.pid, *descendants(proc.pid), *extra]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        if sig == signal.SIGTERM:
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(0.2)
                if all(_gone(p) for p in pids):
                    break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True
