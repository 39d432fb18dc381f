"""Run a flowerbed app in this process on Flower's simulation engine (Ray backend).

This is what ``flwr run <app> <local federation>`` does inside its SuperLink, without starting
a SuperLink, a CLI round trip and a separate ServerApp process: the ServerApp runs in a thread of
this process and the ClientApps in Ray actors. Both apps get the app's ``pyproject.toml`` config
fused with ``overrides`` (as with ``flwr run --run-config``).

It uses ``flwr.simulation.run_simulation._run_simulation`` (a private function, pinned by the
``flwr<1.43`` requirement); ``flwr run`` remains the supported path and is tested end to end.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def app_dir(name_or_path: str) -> Path:
    """``apps/<name>`` (or a path to an app folder); clear error if it is not an app."""
    p = Path(name_or_path)
    if not (p / "pyproject.toml").exists():
        p = REPO_ROOT / "apps" / name_or_path
    if not (p / "pyproject.toml").exists():
        known = sorted(
            d.name for d in (REPO_ROOT / "apps").iterdir() if (d / "pyproject.toml").exists()
        )
        raise ValueError(f"unknown app {name_or_path!r}; known: {', '.join(known)}")
    return p.resolve()


def app_config(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(default run config, components) from an app's ``pyproject.toml``."""
    from flwr.common.config import get_project_config

    project = get_project_config(path)
    app = project["tool"]["flwr"]["app"]
    from flwr.common.config import flatten_dict

    return flatten_dict(app.get("config", {})), app["components"]


def fused_config(app: str, overrides: dict[str, Any] | None) -> tuple[Path, dict[str, Any]]:
    """(app folder, its pyproject run config with ``overrides`` applied), as ``flwr run
    --run-config`` fuses them; an override key the app does not declare is a one-line error."""
    path = app_dir(app)
    defaults, _ = app_config(path)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown run config key {unknown[0]!r} for app {path.name!r}; "
            f"valid keys: {', '.join(sorted(defaults))}"
        )
    return path, {**defaults, **overrides}


def load_components(path: Path) -> tuple[Any, Any]:
    """Import the app's ServerApp and ClientApp objects (the app folder goes on sys.path)."""
    _, comps = app_config(path)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

    def load(ref: str):
        mod, attr = ref.split(":")
        return getattr(importlib.import_module(mod), attr)

    return load(comps["serverapp"]), load(comps["clientapp"])


def backend_config(
    num_cpus: float = 1, num_gpus: float = 0.0, ray_address: str = "", actor_max_restarts: int = 0
) -> dict:
    """Ray backend config; a GPU request on a machine without one falls back to CPU, loudly.

    ``actor_max_restarts`` (0: Ray's default, no restart; -1: always) lets Ray restart a
    ClientApp actor whose process died (e.g. ``os._exit`` in a ClientApp): the call that was
    running fails with an error reply, later calls run on the restarted actor. Without it a dead
    actor fails every later call it is given.
    """
    gpus = float(num_gpus)
    if gpus > 0:
        import torch

        if not torch.cuda.is_available():
            logging.getLogger("flowerbed").warning(
                "client-resources num-gpus=%s asked for, but no CUDA GPU is present: "
                "running the virtual clients on CPU",
                gpus,
            )
            gpus = 0.0
    init_args: dict[str, Any] = {
        "logging_level": "error",
        "log_to_driver": True,
        "include_dashboard": False,  # saves ~1 s of start-up and a process per run
    }
    if ray_address:
        init_args["address"] = ray_address
    resources: dict[str, Any] = {"num_cpus": float(num_cpus), "num_gpus": gpus}
    if actor_max_restarts:
        resources["max_restarts"] = int(actor_max_restarts)  # passed to ActorClass.options()
    return {
        "client_resources": resources,
        "init_args": init_args,
    }


def run_app(
    app: str,
    overrides: dict[str, Any] | None = None,
    num_supernodes: int = 10,
    num_cpus: float = 1,
    num_gpus: float = 0.0,
    ray_address: str = "",
    verbose: bool = False,
    actor_max_restarts: int = 0,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Run ``app`` with ``overrides`` on ``num_supernodes`` virtual clients; return its config.

    ``timings``, if given, receives the seconds spent importing Flower's simulation engine
    (``imports_s``), starting Ray (``ray_start_s``), importing the apps (``app_import_s``) and in
    Flower's simulation (``simulation_s``: the ServerApp, then the teardown of the simulation
    engine and ``ray.shutdown``).

    Raises
    ------
    ValueError
        Unknown app, or an override key the app does not declare (before anything starts).
    """
    t_entry = time.perf_counter()
    from flwr.app import Context, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    path, config = fused_config(app, overrides)
    overrides = dict(overrides or {})
    if num_supernodes < 1:
        raise ValueError(f"num_supernodes={num_supernodes}: must be >= 1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray starts workers with niceness +15 by default: in a simulation the actors ARE the
    # workload, so give them the priority of the process that started them.
    os.environ.setdefault("RAY_worker_niceness", "0")
    backend = backend_config(num_cpus, num_gpus, ray_address, actor_max_restarts)
    t0 = time.perf_counter()
    if not ray_address:
        cpus = len(os.sched_getaffinity(0))  # what Ray detects on this node
        start_local_ray(
            path,
            backend["init_args"],
            num_actors=max(1, int(cpus // max(num_cpus, 1e-9))),
            threads_per_actor=max(1, math.floor(num_cpus)),
        )
    t1 = time.perf_counter()
    server_app, client_app = load_components(path)
    t2 = time.perf_counter()
    run = Run.create_empty(run_id=abs(hash((str(path), os.getpid()))) % (2**62))
    run.override_config = overrides
    run.primary_task_id = 1
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id = 1  # as _run_simulation does for a run it creates itself
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    ctx = Context(
        run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(config)
    )
    _run_simulation(
        num_supernodes=num_supernodes,
        exit_event=_exit_event(),
        client_app=client_app,
        server_app=server_app,
        backend_name="ray",
        backend_config=backend,
        server_app_context=ctx,
        app_dir=str(path),
        run=run,
        is_app=True,
        verbose_logging=verbose,
    )
    if timings is not None:
        timings.update(
            imports_s=t0 - t_entry,
            ray_start_s=t1 - t0,
            app_import_s=t2 - t1,
            simulation_s=time.perf_counter() - t2,
        )
    return config


def start_local_ray(
    path: Path, init_args: dict[str, Any], num_actors: int, threads_per_actor: int
) -> None:
    """Start the local Ray node before the app is imported here, with the ClientApp preloaded.

    Flower's backend starts Ray only when it is not running yet, after the ServerApp's imports,
    and hands the app folder to the workers through a ``runtime_env``; an actor with a runtime
    env cannot use the workers Ray prestarts, so a fresh worker is spawned and only imports the
    ClientApp (torch, ...) when the first message arrives. Here the folder goes on the workers'
    ``PYTHONPATH`` instead, and Ray's ``preload_python_modules`` makes the prestarted workers
    import the ClientApp module while this process is still importing the ServerApp.

    A preloaded torch fixes its thread pool before Ray assigns the actor and sets
    ``OMP_NUM_THREADS`` to the actor's CPUs, so the workers get that value (``threads_per_actor``,
    Ray's rule: ``max(floor(num_cpus), 1)``) from the start, unless the user set it; this
    process keeps its own setting.
    """
    import ray

    if ray.is_initialized():
        return
    _, comps = app_config(path)
    entries = [str(path), *sys.path, *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(e for e in entries if e))
    system_config = {
        "preload_python_modules": [comps["clientapp"].split(":")[0]],
        # prestart (and keep idle) only as many workers as the pool will have actors
        "num_workers_soft_limit": num_actors,
    }
    user_threads = os.environ.get("OMP_NUM_THREADS")
    if user_threads is None:
        os.environ["OMP_NUM_THREADS"] = str(threads_per_actor)  # inherited by Ray's workers
    try:
        with _without_autoscaler_monitor():
            ray.init(**init_args, _system_config=system_config)
    finally:
        if user_threads is None:
            del os.environ["OMP_NUM_THREADS"]


@contextlib.contextmanager
def _without_autoscaler_monitor():
    """Skip Ray's autoscaler monitor while a local single-node Ray starts.

    A simulation on one machine never autoscales, yet ``ray.init`` starts the monitor anyway
    (``ray start`` has ``--no-monitor``, ``ray.init`` has no such switch): one more Python
    process importing Ray (~50 MB), and ``ray.shutdown`` waits its 1 s grace period for it. Ray's
    node-start hook (a private method) is replaced for the duration of ``ray.init`` only; if
    Ray no longer has it, nothing changes.
    """
    from ray._private import node

    original = getattr(node.Node, "start_monitor", None)
    if original is None:
        yield
        return
    node.Node.start_monitor = lambda self: None
    try:
        yield
    finally:
        node.Node.start_monitor = original


def _exit_event():
    from flwr.supercore.telemetry import EventType

    return EventType.PYTHON_API_RUN_SIMULATION_LEAVE
