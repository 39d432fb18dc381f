"""Drive the real ``flwr run`` CLI against a SuperLink that we start and stop ourselves.

``flwr run`` on a ``:local:`` federation leaves a detached SuperLink running and installs the
app's dependencies at run time; both are traps for scripts and CI. :func:`flwr_run` instead starts
``flower-superlink --simulation --disable-runtime-dependency-installation`` on free loopback ports
with a private ``FLWR_HOME``, points a federation at it, runs ``flwr run <app> --stream``, and
stops the SuperLink's whole process group by PID when done (also on error or Ctrl-C).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until ``proc`` listens on loopback ``port``; clear error if it exits or times out."""
    name = Path(str(proc.args[0])).name
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{name} did not open port {port} in {timeout}s")


def stop_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the process group of ``proc`` (it was started with its own session), then KILL."""
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # children may outlive the leader
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def flwr_home_config(control: str, num_supernodes: int, num_cpus: float, num_gpus: float) -> str:
    # Flower reads a whole number of CPUs as an int ("2.0" fails with a TypeError)
    num_cpus = int(num_cpus) if float(num_cpus).is_integer() else num_cpus
    return (
        '[superlink]\ndefault = "sim"\n\n[superlink.sim]\n'
        f'address = "{control}"\ninsecure = true\n'
        f"options.num-supernodes = {num_supernodes}\n"
        f"options.backend.client-resources.num-cpus = {num_cpus}\n"
        f"options.backend.client-resources.num-gpus = {num_gpus}\n"
    )


@contextlib.contextmanager
def simulation_superlink(num_supernodes: int = 2, num_cpus: float = 1, num_gpus: float = 0.0):
    """Start a simulation SuperLink; yield ``(env, home)`` for ``flwr`` commands; stop it."""
    home = Path(tempfile.mkdtemp(prefix="flwr-home-"))
    http = free_port()  # one HTTP port serves the Fleet, Control and Runtime APIs
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_worker_niceness": os.environ.get("RAY_worker_niceness", "0"),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    (home / "config.toml").write_text(
        flwr_home_config(f"127.0.0.1:{http}", num_supernodes, num_cpus, num_gpus)
    )
    log = open(home / "superlink.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(http),
            "--database",
            str(home / "state.db"),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=home,
    )
    try:
        wait_port(http, proc)
        yield env, home
    finally:
        stop_group(proc)
        log.close()


def flwr_run(
    app: str | Path,
    run_config: dict[str, Any] | None = None,
    num_supernodes: int = 2,
    num_cpus: float = 1,
    num_gpus: float = 0.0,
    timeout: float = 900,
) -> subprocess.CompletedProcess:
    """``flwr run <app> sim --stream --run-config ...`` against a private SuperLink.

    Returns the completed ``flwr`` process (its stdout has the streamed logs). The SuperLink and
    everything it started are stopped before returning.

    Raises
    ------
    ValueError
        An unknown key or a bad value (one line naming it), before anything starts.
    """
    from flowerbed.simulation.runner import validate

    # Flower's own check of the keys answers only "Invalid run configuration": name the key (and
    # a bad value) in one line before a SuperLink starts
    path = validate(str(app), dict(run_config or {}))
    cmd = [str(BIN / "flwr"), "run", str(path), "sim", "--stream"]
    if run_config:
        cmd += ["--run-config", " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())]
    with simulation_superlink(num_supernodes, num_cpus, num_gpus) as (env, home):
        pyproject = (path / "pyproject.toml").read_bytes()
        try:
            return subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=home
            )
        finally:  # flwr run may rewrite the app's pyproject.toml; keep the committed one
            if (path / "pyproject.toml").read_bytes() != pyproject:
                (path / "pyproject.toml").write_bytes(pyproject)


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace('"', '\\"') + '"'
    return repr(v)
