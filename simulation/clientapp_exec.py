"""A SuperExec for ``flower-supernode --isolation process`` whose ClientApps start warm.

In its default ``subprocess`` isolation a SuperNode starts ``flower-superexec``, which asks the
SuperNode's Runtime API for a task once a second and starts a fresh ``flwr-clientapp`` process
for every message: each ClientApp call pays the Python start and the imports of Flower's
runtime, torch, flowerbed and the app again. With ``--isolation process`` the SuperNode leaves
its tasks to an executor started separately; this module is one, with two ways to start a
ClientApp:

``warm`` (default)
    One long-lived process per SuperNode imports Flower's ClientApp runtime, torch, numpy and
    flowerbed's library once, runs a few steps of training on a tiny model (:func:`warm_torch`)
    and, for each task, forks a child that runs Flower's own
    ``run_clientapp`` with the task's token. The ClientApp still runs in a process of its own
    (an exception, a crash or ``os._exit`` ends that process only; its memory is returned after
    every call; the app's own modules are imported from the installed FAB, as Flower does), but
    starts in milliseconds. The warm process starts no thread and never touches CUDA before it
    forks, so the children may use threads and the GPU.
``spawn``
    A fresh interpreter per task, as Flower's SuperExec does: the reference for what ``warm``
    saves, with the same timings.

The executor asks for tasks every ``--poll`` seconds (0.1 by default; Flower's SuperExec: 1 s)
while no ClientApp of its SuperNode runs (a SuperNode hands out one message at a time), so it
costs no CPU during training.

With ``--timings FILE`` every task appends one JSON line (wall-clock times, seconds): when the
task was acquired, when its process was ready (after the fork, or after the interpreter start
and imports), the time in Flower's runtime to pull the message (``pull_input_s``), install the
FAB (``fab_install_s``) and import the app (``app_load_s``), the ClientApp call (``call_s``) and,
from its reply, ``train-time-s`` and ``steps``, the push of the reply (``push_reply_s``) and the
end (``done``). :mod:`flowerbed.simulation.bench` turns them into the breakdown of a deployed
round. Only timing wrappers are added around Flower's functions; the calls are Flower's own.

Usage (what :class:`flowerbed.simulation.deploy.Deployment` runs for each SuperNode)::

    flower-supernode --isolation process --port 9094 ... &
    python -m flowerbed.simulation.clientapp_exec --runtime-api-address 127.0.0.1:9094 \\
        --insecure --parent-pid <supernode pid>
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# imported once by the warm process before it forks (never CUDA, never a thread)
PRELOAD = (
    "numpy",
    "torch",
    "flwr.app",
    "flwr.clientapp",
    "flwr.supernode.runtime.run_clientapp",
    "flowerbed.common.client",
    "flowerbed.common.data",
    "flowerbed.common.models",
    "flowerbed.common.partition",
    "flowerbed.common.records",
    "flowerbed.common.seeding",
    "flowerbed.common.threads",
    "flowerbed.common.train",
)
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"


def warm_torch() -> None:
    """A few SGD and Adam steps of a tiny conv net on CPU, with one thread, before any fork.

    Torch pays a one-time cost the first time a process trains (lazy imports and
    initialisation in autograd and ``torch.optim``): a fresh process's first local epoch runs
    slower per step than its later ones. A simulation actor
    pays it in round 1 only; a ClientApp forked from a cold process would pay it every round.
    Paid here once, the forked children inherit the initialised state. Uses one intra-op thread
    (no OpenMP pool is created: the children set their own thread count) and never CUDA.
    """
    import torch
    from torch import nn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)
        )
        x, y = torch.randn(4, 1, 8, 8, generator=gen), torch.tensor([0, 1, 2, 0])
        for opt in (torch.optim.SGD(net.parameters(), lr=0.1), torch.optim.Adam(net.parameters())):
            for _ in range(3):
                opt.zero_grad()
                nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def runtime_client(
    address: str, insecure: bool, root_certificates: str | None, secret: bytes | None
):
    """A Runtime API client of the SuperNode, as Flower's SuperExec builds it."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret:
        from flwr.supercore.interceptors.http.superexec_auth import SuperExecAuthHttpInterceptor

        interceptors.append(
            SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={ACQUIRE_METHOD})
        )
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(root_certificates, insecure),
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


# ------------------------------------------------------------------------------ one task
class _TimedApp:
    """Wraps the loaded ClientApp: times the call, notes the round and the reply's metrics."""

    def __init__(self, app, rec: dict[str, Any]):
        self.app, self.rec = app, rec

    def __call__(self, message, context):
        self.rec["message_type"] = message.metadata.message_type
        cfg = message.content.config_records.get("config") if message.has_content() else None
        if cfg is not None and "server-round" in cfg:
            self.rec["round"] = int(cfg["server-round"])
        self.rec["partition_id"] = context.node_config.get("partition-id")
        t = time.time()
        try:
            reply = self.app(message=message, context=context)
        finally:
            self.rec["call_s"] = time.time() - t
        if reply.has_content() and "metrics" in reply.content.metric_records:
            metrics = reply.content["metrics"]
            for key in ("train-time-s", "steps", "torch-threads"):
                if key in metrics:
                    self.rec[key] = metrics[key]
        return reply


def _instrument(rc, rec: dict[str, Any]) -> None:
    """Time Flower's steps in ``run_clientapp`` (module globals it looks up at call time)."""

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                rec[name] = rec.get(name, 0.0) + time.time() - t

        return wrapper

    rc.pull_task_input = timed("pull_input_s", rc.pull_task_input)
    rc.pull_and_inflate_object_from_tree = timed(
        "pull_arrays_s", rc.pull_and_inflate_object_from_tree
    )
    rc.install_from_fab = timed("fab_install_s", rc.install_from_fab)
    rc.push_message = timed("push_reply_s", rc.push_message)
    get_load = rc.get_load_client_app_fn

    def get_load_timed(*args, **kwargs):
        load = get_load(*args, **kwargs)

        def load_timed(*a, **k):
            t = time.time()
            app = load(*a, **k)
            rec["app_load_s"] = time.time() - t
            return _TimedApp(app, rec)

        return load_timed

    rc.get_load_client_app_fn = get_load_timed


def run_task(args: argparse.Namespace, token: str, rec: dict[str, Any]) -> int:
    """Run one ClientApp execution with Flower's ``run_clientapp``; return its exit code."""
    import flwr.supernode.runtime.run_clientapp as rc
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    # The executor hands the task over as soon as the SuperNode has created it, which can be
    # before the SuperNode has pulled the message's arrays from the SuperLink; Flower's
    # ClientApp then waits 1 s, 2 s, ... between tries. Retry every 50 ms instead (same calls).
    rc.pull_and_inflate_object_from_tree = functools.partial(
        rc.pull_and_inflate_object_from_tree, initial_backoff=0.05, backoff_cap=0.5
    )
    if args.timings:
        _instrument(rc, rec)
    code = 0
    try:
        rc.run_clientapp(
            runtime_api_address=args.runtime_api_address,
            token=token,
            insecure=args.insecure,
            certificates=validate_and_resolve_root_certificates(
                args.root_certificates, args.insecure
            ),
            parent_pid=os.getppid(),
            runtime_dependency_install=False,
        )
    except SystemExit as e:  # flwr_exit ends every run with sys.exit
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        rec["done"] = time.time()
        rec["exit_code"] = code
        if args.timings:
            _append(args.timings, rec)
    return code


def _append(path: str, rec: dict[str, Any]) -> None:
    line = (json.dumps(rec) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)  # one write on an O_APPEND file: lines never interleave
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ the executor
def _fork_task(args: argparse.Namespace, token: str, rec: dict[str, Any]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child: a ClientApp process, warm
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        rec["ready"] = time.time()
        rec["pid"] = os.getpid()
        code = run_task(args, token, rec)
    except BaseException:  # noqa: BLE001 - never return into the executor's loop
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _spawn_task(args: argparse.Namespace, token: str, rec: dict[str, Any]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flowerbed.simulation.clientapp_exec", *args.argv, "--task"]
    env = {**os.environ, "FLOWERBED_TASK_TOKEN": token, "FLOWERBED_TASK_REC": json.dumps(rec)}
    return subprocess.Popen(cmd, env=env)


def serve(args: argparse.Namespace) -> None:
    """Ask the SuperNode for ClientApp tasks and start each one (warm fork or fresh spawn)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    if args.start == "warm":
        for mod in PRELOAD:
            importlib.import_module(mod)
        warm_torch()
    secret = (
        Path(args.superexec_auth_secret_file).read_bytes()
        if args.superexec_auth_secret_file
        else None
    )
    client = runtime_client(args.runtime_api_address, args.insecure, args.root_certificates, secret)
    children: dict[int, Any] = {}
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print(f"[clientapp-exec] {args.start} executor for {args.runtime_api_address}", flush=True)
    try:
        while not stop and _alive(args.parent_pid):
            for pid in list(children):  # reap finished ClientApp processes
                proc = children[pid]
                done = proc.poll() is not None if proc else os.waitpid(pid, os.WNOHANG)[0] == pid
                if done:
                    del children[pid]
            if children:
                # A SuperNode hands out its next message only after this one's reply: no need
                # to ask (an HTTP call) while the ClientApp runs; watch it instead (a syscall).
                time.sleep(0.02)
                continue
            res = client.AcquireTask(request)
            if res.HasField("task") and res.token:
                rec = {"acquired": time.time(), "task_id": res.task.task_id, "start": args.start}
                if args.start == "warm":
                    children[_fork_task(args, res.token, rec)] = None
                else:
                    proc = _spawn_task(args, res.token, rec)
                    children[proc.pid] = proc
                continue  # there may be more
            time.sleep(args.poll)
    finally:
        client.close()
        for pid in children:  # a ClientApp still running ends with its executor
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _task_main(args: argparse.Namespace) -> int:
    """``--task``: the fresh interpreter of one spawned task (token from the environment)."""
    rec = json.loads(os.environ.pop("FLOWERBED_TASK_REC"))
    token = os.environ.pop("FLOWERBED_TASK_TOKEN")
    rec["interpreter"] = _process_start_time()
    for mod in PRELOAD:  # what flwr-clientapp and the app import in a fresh process
        importlib.import_module(mod)
    rec["ready"] = time.time()
    rec["pid"] = os.getpid()
    return run_task(args, token, rec)


def _process_start_time() -> float:
    """Wall-clock time this process was started (from /proc, 10 ms resolution), or now."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="clientapp-exec",
        description="SuperExec for flower-supernode --isolation process: ClientApps forked "
        "from a warm process (or spawned fresh), Flower's run_clientapp in each.",
    )
    ap.add_argument("--runtime-api-address", default="127.0.0.1:9094")
    ap.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API")
    ap.add_argument("--root-certificates", default=None)
    ap.add_argument("--superexec-auth-secret-file", default=None)
    ap.add_argument("--parent-pid", type=int, default=None, help="exit when this process ends")
    ap.add_argument("--start", choices=("warm", "spawn"), default="warm")
    ap.add_argument("--poll", type=float, default=0.1, help="seconds between task requests")
    ap.add_argument("--timings", default="", help="append one JSON line per task to this file")
    ap.add_argument("--task", action="store_true", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = [a for a in argv if a != "--task"]
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if args.task:
        return _task_main(args)
    serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
