"""Torch threads per ClientApp: each ClientApp uses its share of the machine, not all of it.

Several ClientApps that each run torch with its default thread count (one thread per core) on
the same cores oversubscribe them (three deployed SuperNodes on two cores ran local SGD several
times slower per step than a simulation actor). :func:`fit_threads`, called on the first line of a
ClientApp handler, sets torch's intra-op thread count from, in this order:

1. the node config key ``torch-threads`` (``flower-supernode --node-config "partition-id=0
   num-partitions=3 torch-threads=1"``; :mod:`flowerbed.simulation.deploy` sets it to
   :func:`host_share` for the SuperNodes it starts on one host);
2. the environment variable ``FLOWERBED_TORCH_THREADS`` (for SuperNodes started by hand);
3. inside a Ray actor (Flower's simulation engine): the actor's CPUs, ``max(floor(num_cpus),
   1)``, the rule Ray itself uses for ``OMP_NUM_THREADS``;
4. otherwise nothing is changed (torch's default, or ``OMP_NUM_THREADS`` if it was set).

A call costs a dictionary lookup and, when the count already fits, no torch call at all.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from typing import Any

NODE_CONFIG_KEY = "torch-threads"
ENV_VAR = "FLOWERBED_TORCH_THREADS"


def host_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` as a fallback)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def host_share(num_processes: int, cpus: int | None = None) -> int:
    """Threads per process when ``num_processes`` ClientApps share this host: cores // n, >= 1.

    Parameters
    ----------
    num_processes : int
        ClientApps (SuperNodes, actors) that train at the same time on this host.
    cpus : int or None, default None
        Cores to share; :func:`host_cpus` if None.

    Returns
    -------
    int
        ``max(1, cpus // num_processes)``.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes}: must be >= 1")
    return max(1, (cpus or host_cpus()) // num_processes)


def _positive_int(value: Any, where: str) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{where}={value!r}: expected a positive integer") from None
    if n < 1:
        raise ValueError(f"{where}={value!r}: expected a positive integer")
    return n


def ray_actor_cpus() -> float | None:
    """CPUs Ray assigned to this process if it is a Ray actor or task, else None.

    Ray is not imported here: a process that has not imported it is not a Ray worker.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        ctx = ray.get_runtime_context()
        if ctx.get_actor_id() is None and ctx.get_task_id() is None:
            return None  # the driver
        return float(ctx.get_assigned_resources().get("CPU", 0.0))
    except Exception:  # noqa: BLE001 - not inside a worker, or an older Ray API
        return None


def threads_for(node_config: Mapping[str, Any] | None = None) -> int | None:
    """The torch thread count this ClientApp should use, or None to leave torch's setting.

    Parameters
    ----------
    node_config : mapping or None
        ``context.node_config`` of the ClientApp call.

    Returns
    -------
    int or None
        From ``torch-threads`` in the node config, else ``FLOWERBED_TORCH_THREADS``, else the
        Ray actor's CPUs (``max(floor(cpus), 1)``), else None.

    Raises
    ------
    ValueError
        A ``torch-threads`` or ``FLOWERBED_TORCH_THREADS`` value that is not a positive integer
        (the message names it).
    """
    if node_config and NODE_CONFIG_KEY in node_config:
        return _positive_int(node_config[NODE_CONFIG_KEY], f"node config {NODE_CONFIG_KEY}")
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _positive_int(env, ENV_VAR)
    cpus = ray_actor_cpus()
    if cpus is not None:
        return max(1, math.floor(cpus))
    return None


def fit_threads(context: Any = None) -> int:
    """Set torch's thread count for this ClientApp call (see the module docstring).

    Parameters
    ----------
    context : flwr.app.Context or None
        The call's context (its ``node_config`` is read); None reads only the environment and
        Ray.

    Returns
    -------
    int
        torch's intra-op thread count after the call.
    """
    import torch

    n = threads_for(getattr(context, "node_config", None))
    if n is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()
