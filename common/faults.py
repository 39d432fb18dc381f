"""Fault injection for ClientApps, driven by run-config keys (tests and soak runs only).

A ClientApp calls :func:`maybe_inject` at the start of a training call. Whether the call fails is
a function of ``(seed, partition id, server round)`` only (not of spawn order or node id), so a
faulty run is reproducible in simulation and in deployment. The modes are:

- ``raise``: the ClientApp raises :class:`InjectedFault` (Flower turns it into an error reply);
- ``hang``: the ClientApp sleeps ``hang_s`` seconds (set it past the ServerApp's round timeout,
  so the reply arrives too late and is dropped);
- ``exit``: the ClientApp process dies with ``os._exit(17)`` mid-round (no reply at all);
- ``mixed``: one of the three, chosen per (seed, partition, round);
- ``none``: no fault (the default).

Which calls fail: with ``partitions`` set (e.g. ``"1,3"``) every call of those partitions fails in
the rounds ``rounds`` (e.g. ``"2,3"``; empty means all rounds); otherwise each call fails with
probability ``rate``.
"""

from __future__ import annotations

import logging
import os
import random
import time

from flowerbed.common.config import FAULT_MODES as MODES
from flowerbed.common.seeding import derive_seed

_CONCRETE = ("raise", "hang", "exit")
EXIT_CODE = 17
_SALT = 0xFA17


class InjectedFault(RuntimeError):
    """The exception a ``raise`` fault throws."""


def parse_ids(text: str) -> set[int]:
    """``"1, 3"`` -> ``{1, 3}``; empty -> empty set. Clear error on junk."""
    out = set()
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.add(int(part))
        except ValueError:
            raise ValueError(f"fault id list {text!r}: {part!r} is not an integer") from None
    return out


def fault_for(
    mode: str,
    rate: float,
    seed: int,
    partition_id: int,
    server_round: int,
    partitions: str = "",
    rounds: str = "",
) -> str | None:
    """The fault (``raise``/``hang``/``exit``) of this call, or None."""
    if mode not in MODES:
        raise ValueError(f"fault mode {mode!r}; known: {', '.join(MODES)}")
    if mode == "none":
        return None
    rng = random.Random(derive_seed(seed, _SALT, partition_id, server_round))
    pids, rnds = parse_ids(partitions), parse_ids(rounds)
    if pids:
        hit = partition_id in pids and (not rnds or server_round in rnds)
    else:
        hit = (not rnds or server_round in rnds) and rng.random() < rate
    if not hit:
        return None
    return rng.choice(_CONCRETE) if mode == "mixed" else mode


def inject(fault: str | None, hang_s: float, where: str = "") -> None:
    """Carry out ``fault`` (no-op for None)."""
    if fault is None:
        return
    log = logging.getLogger("flowerbed")
    if fault == "raise":
        raise InjectedFault(f"injected fault: exception {where}")
    if fault == "hang":
        log.warning("injected fault: hanging %.1f s %s", hang_s, where)
        time.sleep(hang_s)
        return
    if fault == "exit":
        log.warning("injected fault: process exit %s", where)
        os._exit(EXIT_CODE)
    raise ValueError(f"unknown fault {fault!r}")


def maybe_inject(cfg: dict, partition_id: int, server_round: int) -> str | None:
    """Inject the fault the run config ``cfg`` assigns to this call (keys ``fault-*``)."""
    fault = fault_for(
        cfg.get("fault-mode", "none"),
        cfg.get("fault-rate", 0.0),
        cfg["seed"],
        partition_id,
        server_round,
        cfg.get("fault-partitions", ""),
        cfg.get("fault-rounds", ""),
    )
    inject(fault, cfg.get("fault-hang-s", 0.0), f"(partition {partition_id}, round {server_round})")
    return fault
