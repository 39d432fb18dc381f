"""Seeds derived from (run seed, partition id, round), never from spawn order."""

from __future__ import annotations

import random

import numpy as np
import torch


def derive_seed(run_seed: int, *keys: int) -> int:
    """A 32-bit seed that depends only on ``run_seed`` and ``keys``.

    ``derive_seed(s, partition_id, server_round)`` is the same in every process, whatever the
    order in which Ray started the actors or scheduled the calls.
    """
    ss = np.random.SeedSequence([int(run_seed) & 0xFFFFFFFF, *(int(k) & 0xFFFFFFFF for k in keys)])
    return int(ss.generate_state(1)[0])


def set_seed(seed: int) -> torch.Generator:
    """Seed python, numpy and torch globally; return a torch Generator with the same seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def sample_partitions(seed: int, server_round: int, num_partitions: int, k: int) -> list[int]:
    """The ``k`` partition ids sampled in ``server_round`` (sorted), a function of the seed only.

    Used by :class:`flowerbed.strategies.fedavg.FedAvg` (``sample_seed``) and by the benchmark's
    plain loop, so both train exactly the same clients in every round.
    """
    rng = np.random.default_rng(derive_seed(seed, server_round, 0x5A4D))
    return sorted(int(i) for i in rng.choice(num_partitions, size=k, replace=False))
