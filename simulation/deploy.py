"""Scripted deployment on loopback: CA + certificates, a SuperLink with TLS and SuperNode
authentication, SuperNodes with their partition ids, ``flwr run`` of an app, and the stop of every
process it started (by PID, with their children), also on Ctrl-C or failure.

Two settings make a deployed round cost what a simulated one costs:

- threads: every SuperNode started here gets ``torch-threads`` = cores // SuperNodes (at least
  1) in its node config, and ``OMP_NUM_THREADS`` with the same value in its environment, so
  the ClientApps on this host share its cores instead of each using all of them
  (:mod:`flowerbed.common.threads`);
- ClientApp start (``clientapp_exec``): ``"warm"`` (default) runs each SuperNode with
  ``--isolation process`` and :mod:`flowerbed.simulation.clientapp_exec` beside it, which forks
  every ClientApp process from a process that has imported torch and flowerbed already;
  ``"spawn"`` is the same executor with a fresh interpreter per task; ``"flower"`` is Flower's
  default (``--isolation subprocess``: ``flower-superexec`` starts ``flwr-clientapp``);
- SuperNode waits (``supernode_poll``, default 0.2 s): each SuperNode runs through
  :mod:`flowerbed.simulation.supernode`, Flower's own ``flower-supernode`` with its idle poll of
  the SuperLink (3 s) and its other sleeps capped at that many seconds (None: Flower's
  ``flower-supernode`` unchanged);
- SuperLink state (``database``, default None): in memory, as ``flower-superlink`` keeps it
  without ``--database``; a path keeps it in SQLite, which costs the SuperLink more CPU per
  round (SQL writes for every message and object), taken from the ClientApps' cores on a
  loopback deployment.

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

from flowerbed.common.threads import host_share
from flowerbed.simulation.flwr_cli import _toml, free_port, wait_port

BIN = Path(sys.executable).parent
CLIENTAPP_EXEC = ("warm", "spawn", "flower")


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

    def __init__(
        self,
        workdir: Path | str,
        tls: bool = True,
        auth: bool = True,
        clientapp_exec: str = "warm",
        timings: bool = False,
        supernode_poll: float | None = 0.2,
        database: str | Path | None = None,
    ):
        """
        Parameters
        ----------
        workdir : str or Path
            Keys, certificates, logs, Flower's home (``flwr-home``).
        tls, auth : bool, default True
            TLS on the SuperLink's API and SuperNode authentication.
        clientapp_exec : {"warm", "spawn", "flower"}, default "warm"
            How each SuperNode starts its ClientApp processes (module docstring).
        timings : bool, default False
            With ``warm`` or ``spawn``: every ClientApp task appends its timings to
            ``<workdir>/timings-<partition>.jsonl``
            (:mod:`flowerbed.simulation.clientapp_exec`).
        supernode_poll : float or None, default 0.2
            Cap (s) on the SuperNodes' sleeps between looks at the SuperLink
            (:mod:`flowerbed.simulation.supernode`); None: Flower's ``flower-supernode`` as it is
            (3 s after every look that found no message).
        database : str or Path or None, default None
            The SuperLink's state: None keeps it in memory (Flower's default, ``InMemoryLinkState``);
            a path keeps it in that SQLite file (Flower's ``SqlLinkState``: the runs survive a
            SuperLink restart, at the cost of SQL writes for every message and object).
        """
        if clientapp_exec not in CLIENTAPP_EXEC:
            raise ValueError(
                f"clientapp_exec={clientapp_exec!r}: must be one of {', '.join(CLIENTAPP_EXEC)}"
            )
        self.dir = Path(workdir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tls, self.auth = tls, auth
        self.clientapp_exec, self.timings = clientapp_exec, timings
        if supernode_poll is not None and not supernode_poll > 0:
            raise ValueError(f"supernode_poll={supernode_poll}: must be > 0 seconds or None")
        self.supernode_poll = supernode_poll
        self.database = database
        self.secret: Path | None = None
        if tls and clientapp_exec != "flower":  # the executor authenticates to the Runtime API
            self.secret = self.dir / "superexec.secret"
            self.secret.write_bytes(os.urandom(32))
            self.secret.chmod(0o600)
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
    def _start(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        self.logs.append(log)
        proc = subprocess.Popen(
            cmd,
            env=env or self.env,
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

    def superlink_cmd(self) -> list[str]:
        """The ``flower-superlink`` command line of this deployment."""
        cmd = [
            str(BIN / "flower-superlink"),
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        if self.database is not None:
            cmd += ["--database", str(self.database)]
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
        return cmd

    def start_superlink(self, timeout: float = 120) -> subprocess.Popen:
        proc = self._start("superlink", self.superlink_cmd())
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
        self,
        partition_id: int,
        num_partitions: int,
        register: bool = True,
        key: bool = True,
        threads: int | None = None,
    ) -> subprocess.Popen:
        """Start a SuperNode for ``partition_id`` (its key registered first when asked).

        ``threads``: torch threads of its ClientApps; default ``cores // num_partitions`` (the
        loopback deployment runs every partition on this host). With ``clientapp_exec`` warm
        or spawn, the SuperNode runs with ``--isolation process`` and its executor is started
        beside it (``clientapp-exec-<partition>.log``).
        """
        name = f"supernode-{partition_id}"
        threads = threads or host_share(num_partitions)
        runtime_port = free_port()
        if self.supernode_poll is None:
            cmd = [str(BIN / "flower-supernode")]
        else:
            cmd = [sys.executable, "-m", "flowerbed.simulation.supernode"]
            cmd += ["--poll", str(self.supernode_poll)]
        cmd += [
            "--superlink",
            self.address,
            "--port",
            str(runtime_port),
            "--node-config",
            f"partition-id={partition_id} num-partitions={num_partitions} torch-threads={threads}",
        ]
        cmd += ["--root-certificates", str(self.pki["ca_cert"])] if self.tls else ["--insecure"]
        if key and self.auth:  # a key without TLS makes flower-supernode exit (code 303)
            priv, pub = make_node_key(self.dir / "keys", name)
            if register:
                self.register(pub)
            cmd += ["--auth-supernode-private-key", str(priv)]
        if self.clientapp_exec != "flower":
            cmd += ["--isolation", "process"]
            if self.secret:
                cmd += ["--superexec-auth-secret-file", str(self.secret)]
        env = {**self.env, "OMP_NUM_THREADS": str(threads)}
        node = self._start(name, cmd, env)
        if self.clientapp_exec != "flower":
            self._start(f"clientapp-exec-{partition_id}", self._exec_cmd(node, runtime_port), env)
        return node

    def _exec_cmd(self, node: subprocess.Popen, runtime_port: int) -> list[str]:
        """The :mod:`~flowerbed.simulation.clientapp_exec` command beside SuperNode ``node``."""
        part = node.args[node.args.index("--node-config") + 1].split()[0].split("=")[1]
        cmd = [sys.executable, "-m", "flowerbed.simulation.clientapp_exec"]
        cmd += ["--runtime-api-address", f"127.0.0.1:{runtime_port}", "--insecure"]
        cmd += ["--parent-pid", str(node.pid), "--start", self.clientapp_exec]
        if self.secret:
            cmd += ["--superexec-auth-secret-file", str(self.secret)]
        if self.timings:
            cmd += ["--timings", str(self.dir / f"timings-{part}.jsonl")]
        return cmd

    def task_timings(self) -> list[dict]:
        """Every ClientApp task's timings (``timings=True``), from all SuperNodes."""
        rows = []
        for f in sorted(self.dir.glob("timings-*.jsonl")):
            rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        return rows

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
    ap.add_argument(
        "--clientapp-exec",
        choices=CLIENTAPP_EXEC,
        default="warm",
        help="warm: ClientApps forked from a process with torch and flowerbed imported "
        "(default); spawn: a fresh interpreter per task; flower: Flower's subprocess isolation",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per SuperNode (default: cores // SuperNodes, at least 1)",
    )
    ap.add_argument(
        "--supernode-poll",
        type=float,
        default=0.2,
        help="cap (s) on the SuperNodes' waits between looks at the SuperLink (default 0.2; "
        "Flower's: 3 s when idle); 0: Flower's flower-supernode unchanged",
    )
    ap.add_argument(
        "--database",
        default=None,
        help="SQLite file for the SuperLink's state (survives a SuperLink restart); "
        "default: in memory, as Flower's flower-superlink",
    )
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
    threads = args.threads or host_share(args.num_supernodes)
    poll = args.supernode_poll or None
    with Deployment(
        workdir,
        tls=secure,
        auth=secure,
        clientapp_exec=args.clientapp_exec,
        supernode_poll=poll,
        database=args.database,
    ) as d:
        try:
            d.start_superlink()
            print(f"[flowerbed-deploy] SuperLink on {d.address} (TLS, SuperNode auth: {secure})")
            for i in range(args.num_supernodes):
                d.add_supernode(i, args.num_supernodes, threads=threads)
            print(
                f"[flowerbed-deploy] {args.num_supernodes} SuperNodes started "
                f"({threads} torch thread(s) each, ClientApp start: {args.clientapp_exec}, "
                f"SuperNode poll: {f'{poll} s' if poll else 'Flower'}, "
                f"SuperLink state: {args.database or 'in memory'})",
                flush=True,
            )
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
