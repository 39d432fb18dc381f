"""Scripted deployment on loopback: CA + certificates, a SuperLink with TLS and SuperNode
authentication, SuperNodes with their partition ids, ``flwr run`` of an app, and the stop of every
process it started (by PID, with their children), also on Ctrl-C or failure.

Also the process helpers other tests use (:func:`stop_tree`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flowerbed.simulation.flwr_cli import _toml, free_port, wait_port

BIN = Path(sys.executable).parent


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


# ---------------------------------------------------------------------- keys and certificates
def make_pki(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> dict:
    """A CA and a SuperLink server certificate for ``hosts`` (PEM files in ``directory``)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def write_key(key, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flowerbed test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {
        "ca_cert": directory / "ca.crt",
        "ca_key": directory / "ca.key",
        "server_cert": directory / "server.pem",
        "server_key": directory / "server.key",
    }
    paths["ca_cert"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    write_key(ca_key, paths["ca_key"])
    paths["server_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_key(key, paths["server_key"])
    return paths


def make_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """An EC P-384 key pair for SuperNode authentication: (private, public), OpenSSH format."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = directory / f"{name}.key", directory / f"{name}.pub"
    priv.write_bytes(  # flower-supernode reads an OpenSSH private key
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    priv.chmod(0o600)
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    return priv, pub


# ---------------------------------------------------------------------- the deployment
class Deployment:
    """SuperLink (TLS + SuperNode auth) and SuperNodes on loopback; every process stopped on exit.

    Use as a context manager::

        with Deployment(workdir) as d:
            d.start_superlink()
            for i in range(3):
                d.add_supernode(i, 3)
            d.run("fedavg", {"num-server-rounds": 2})
    """

    def __init__(self, workdir: Path | str, tls: bool = True, auth: bool = True):
        self.dir = Path(workdir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tls, self.auth = tls, auth
        self.procs: list[subprocess.Popen] = []
        self.logs: list = []
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.pki = make_pki(self.dir / "certs") if tls else {}
        self.home = self.dir / "flwr-home"
        self.home.mkdir(exist_ok=True)
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        sec = f'address = "{self.address}"\n'
        sec += f'root-certificates = "{self.pki["ca_cert"]}"\n' if tls else "insecure = true\n"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n{sec}'
        )

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # processes ------------------------------------------------------------
    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        self.logs.append(log)
        proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.dir,
        )
        self.procs.append(proc)
        return proc

    def log_text(self, name: str) -> str:
        p = self.dir / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def start_superlink(self, timeout: float = 120) -> subprocess.Popen:
        cmd = [
            str(BIN / "flower-superlink"),
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--database",
            str(self.dir / "superlink.db"),
        ]
        if self.tls:
            cmd += [
                "--ssl-ca-certfile",
                str(self.pki["ca_cert"]),
                "--ssl-certfile",
                str(self.pki["server_cert"]),
                "--ssl-keyfile",
                str(self.pki["server_key"]),
            ]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        proc = self._start("superlink", cmd)
        wait_port(self.port, proc, timeout)
        return proc

    def register(self, public_key: Path) -> str:
        """``flwr supernode register <key> deploy``; returns the CLI output."""
        p = subprocess.run(
            [str(BIN / "flwr"), "supernode", "register", str(public_key), "deploy"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.dir,
        )
        if p.returncode != 0:
            raise RuntimeError(
                f"flwr supernode register failed: {p.stdout[-800:]}{p.stderr[-800:]}"
            )
        return p.stdout

    def add_supernode(
        self, partition_id: int, num_partitions: int, register: bool = True, key: bool = True
    ) -> subprocess.Popen:
        """Start a SuperNode for ``partition_id`` (its key registered first when asked)."""
        name = f"supernode-{partition_id}"
        cmd = [
            str(BIN / "flower-supernode"),
            "--superlink",
            self.address,
            "--port",
            str(free_port()),
            "--node-config",
            f"partition-id={partition_id} num-partitions={num_partitions}",
        ]
        cmd += ["--root-certificates", str(self.pki["ca_cert"])] if self.tls else ["--insecure"]
        if key:
            priv, pub = make_node_key(self.dir / "keys", name)
            if register and self.auth:
                self.register(pub)
            cmd += ["--auth-supernode-private-key", str(priv)]
        return self._start(name, cmd)

    def node_ids(self) -> list[int]:
        """Node ids the SuperLink lists (``flwr supernode ls``)."""
        p = subprocess.run(
            [str(BIN / "flwr"), "supernode", "ls", "deploy", "--format", "json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.dir,
        )
        try:
            data = json.loads(p.stdout[p.stdout.index("{") :])
        except ValueError:
            return []
        return [int(n["node-id"]) for n in data.get("nodes", []) if "node-id" in n]

    def run(self, app: str, run_config: dict | None = None, timeout: float = 900):
        """``flwr run <app> deploy --stream``; returns the CompletedProcess."""
        from flowerbed.simulation.inprocess import app_dir

        path = app_dir(app)
        cmd = [str(BIN / "flwr"), "run", str(path), "deploy", "--stream"]
        if run_config:
            cmd += ["--run-config", " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())]
        pyproject = (path / "pyproject.toml").read_bytes()
        try:
            return subprocess.run(
                cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.dir
            )
        finally:
            if (path / "pyproject.toml").read_bytes() != pyproject:
                (path / "pyproject.toml").write_bytes(pyproject)

    def pids(self) -> list[int]:
        """PIDs of every process started, with their descendants (for checks)."""
        out = []
        for p in self.procs:
            out += [p.pid, *descendants(p.pid)]
        return out

    def stop(self) -> None:
        """Stop SuperNodes first, then the SuperLink, each with its whole process tree."""
        for proc in reversed(self.procs):
            stop_tree(proc)
        for log in self.logs:
            log.close()
        self.logs = []


def main(argv: list[str] | None = None) -> int:
    """``python -m flowerbed.simulation.deploy``: the whole loopback deployment, one command."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="flowerbed-deploy",
        description="CA + certificates, SuperLink (TLS, SuperNode auth), SuperNodes, flwr run; "
        "every process stopped by PID at the end (also on Ctrl-C or failure).",
    )
    ap.add_argument("--app", default="fedavg")
    ap.add_argument("--num-supernodes", type=int, default=3)
    ap.add_argument("--run-config", default="", help='"k=v k2=v2" (TOML values)')
    ap.add_argument("--workdir", default="", help="keys, certificates, logs (default: temp dir)")
    ap.add_argument("--insecure", action="store_true", help="no TLS, no auth (local trials)")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args(argv)
    import tempfile

    import tomllib

    run_config = {}
    for item in args.run_config.split():
        k, _, v = item.partition("=")
        run_config[k] = tomllib.loads(f"x = {v}")["x"]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="flowerbed-deploy-"))

    def _term(signum, frame):  # SIGTERM -> same cleanup path as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    secure = not args.insecure
    print(f"[flowerbed-deploy] workdir {workdir}", flush=True)
    with Deployment(workdir, tls=secure, auth=secure) as d:
        try:
            d.start_superlink()
            print(f"[flowerbed-deploy] SuperLink on {d.address} (TLS, SuperNode auth: {secure})")
            for i in range(args.num_supernodes):
                d.add_supernode(i, args.num_supernodes)
            print(f"[flowerbed-deploy] {args.num_supernodes} SuperNodes started", flush=True)
            p = d.run(args.app, run_config, timeout=args.timeout)
            sys.stdout.write(p.stdout[-4000:])
            sys.stderr.write(p.stderr[-2000:])
            print(f"[flowerbed-deploy] flwr run exited with {p.returncode}", flush=True)
            return p.returncode
        except KeyboardInterrupt:
            print("[flowerbed-deploy] interrupted: stopping every process", flush=True)
            return 130
        finally:
            print(f"[flowerbed-deploy] stopping {len(d.pids())} processes", flush=True)


if __name__ == "__main__":
    sys.exit(main())
