"""ClientApp-side helpers: partition identity, local data, per-call seeds."""

from __future__ import annotations

from functools import lru_cache

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowerbed.common.data import load_dataset
from flowerbed.common.partition import partition_indices
from flowerbed.common.seeding import derive_seed

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"


def partition_of(context: Context) -> tuple[int, int]:
    """``(partition_id, num_partitions)`` from the node config (simulation or SuperNode)."""
    try:
        return int(context.node_config[PARTITION_ID]), int(context.node_config[NUM_PARTITIONS])
    except KeyError as e:
        raise ValueError(
            f"node config lacks {e.args[0]!r}: start the SuperNode with "
            '--node-config "partition-id=<i> num-partitions=<n>"'
        ) from None


def call_seed(context: Context, msg: Message, run_seed: int) -> int:
    """Seed of one ClientApp call: (run seed, partition id, server round), not spawn order."""
    pid, _ = partition_of(context)
    rnd = 0
    if "config" in msg.content.config_records:
        rnd = int(msg.content["config"].get("server-round", 0))
    return derive_seed(run_seed, pid, rnd)


@lru_cache(maxsize=8)
def local_tensors(
    dataset: str,
    partition_id: int,
    num_partitions: int,
    scheme: str,
    seed: int,
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    data_dir: str = "",
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This partition's train split as tensors ``(x, y, num_classes)``; cached per process.

    The dataset is memory-mapped (shared by all processes), only the partition is copied.
    """
    bundle = load_dataset(dataset, data_dir or None, mmap=True)
    parts = partition_indices(
        bundle.hard_labels,
        num_partitions,
        scheme,
        seed=seed,
        alpha=alpha,
        classes_per_partition=classes_per_partition,
    )
    idx = parts[partition_id]
    x = torch.from_numpy(bundle.x_train[idx].copy())
    y = torch.from_numpy(bundle.y_train[idx].copy())
    return x, y, bundle.num_classes


def add_partition_query(app: ClientApp) -> None:
    """Register a ``query`` handler that answers with the node's partition id.

    Used by strategies with seeded, partition-aware sampling (``sample_seed``).
    """

    @app.query()
    def _partition_query(msg: Message, context: Context) -> Message:
        pid, n = partition_of(context)
        content = RecordDict({"metrics": MetricRecord({PARTITION_ID: pid, NUM_PARTITIONS: n})})
        return Message(content=content, reply_to=msg)
