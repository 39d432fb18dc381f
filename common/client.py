"""ClientApp-side helpers: partition identity, local data, per-call seeds, and the shared local
SGD step of the FedAvg-shaped baselines (FedAvg, FedProx, local-only)."""

from __future__ import annotations

from functools import lru_cache

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flowerbed.common.data import load_dataset
from flowerbed.common.partition import data_options, partition_indices
from flowerbed.common.seeding import derive_seed

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
#: train-config key of :class:`flowerbed.strategies.baselines.LocalOnly`: continue from this
#: client's own model (kept in ``context.state``) instead of the global one
LOCAL_ONLY = "local-only"
LOCAL_MODEL = "local-model"


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
    part: str = "all",
    unparticipating_fraction: float = 0.0,
    val_fraction: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This partition's train split as tensors ``(x, y, num_classes)``; cached per process.

    The dataset is memory-mapped (shared by all processes), only the partition is copied.
    ``part`` selects the rows of the participation split
    (:func:`flowerbed.common.participation.split_of`: ``all``, ``train``, ``val``, ``unpart``);
    with ``unparticipating_fraction = 0`` (the default) ``train`` is the whole partition.
    """
    bundle = load_dataset(dataset, data_dir or None, mmap=True)
    parts = partition_indices(
        bundle.hard_labels,
        num_partitions,
        scheme,
        seed=seed,
        alpha=alpha,
        classes_per_partition=classes_per_partition,
        **data_options(scheme, dataset, data_dir),
    )
    idx = parts[partition_id]
    if part != "all":
        from flowerbed.common.participation import split_of

        split_cfg = {
            "unparticipating-fraction": unparticipating_fraction,
            "val-fraction": val_fraction,
            "seed": seed,
        }
        idx = split_of(split_cfg, idx, partition_id, num_partitions, part)
    x = torch.from_numpy(bundle.x_train[idx].copy())
    y = torch.from_numpy(bundle.y_train[idx].copy())
    return x, y, bundle.num_classes


def partition_tensors(
    cfg, partition_id: int, num_partitions: int, part: str = "train"
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`local_tensors` with the keys of the shared ``DATA`` fragment of the run config
    (``dataset``, ``data-dir``, ``partitioner``, ``alpha``, ``classes-per-partition``, ``seed``).

    ``part`` (default ``train``: what the client trains on) is a part of the participation split
    when the run config has the ``PARTICIPATION`` fragment turned on
    (``unparticipating-fraction > 0``: a participating client's train slice); without it, or
    with it off, ``train`` is the whole partition, as before.
    """
    return local_tensors(
        cfg["dataset"],
        partition_id,
        num_partitions,
        cfg["partitioner"],
        cfg["seed"],
        alpha=cfg["alpha"],
        classes_per_partition=cfg["classes-per-partition"],
        data_dir=cfg["data-dir"],
        part=part,
        unparticipating_fraction=float(cfg.get("unparticipating-fraction", 0.0)),
        val_fraction=float(cfg.get("val-fraction", 0.2)),
    )


def split_label_counts(cfg, partition_id: int, num_partitions: int):
    """``label_counts(part)`` for :func:`flowerbed.common.participation.evaluate_splits`: the
    label histogram (one count per class) of this partition's ``part``, from
    :func:`partition_tensors` (cached, so no second copy of the data)."""

    def label_counts(part: str) -> list[int]:
        _, y, num_classes = partition_tensors(cfg, partition_id, num_partitions, part)
        return torch.bincount(y.long().flatten(), minlength=num_classes).tolist()

    return label_counts


def gap_evaluate(msg: Message, context: Context, cfg, model_fn) -> Message:
    """The reply to a participation-gap evaluation (:mod:`flowerbed.common.participation`) for
    an app whose data is :func:`partition_tensors` and whose model is ``model_fn()`` (a torch
    classifier the received arrays load into): accuracy, loss, number of examples, label
    histogram and correct examples per class of each split of this client (part-train /
    part-val, or all of an unparticipating client's data)."""
    from flowerbed.common.participation import evaluate_splits
    from flowerbed.common.records import load_record, reply
    from flowerbed.common.train import evaluate, get_device

    pid, n = partition_of(context)
    arrays = msg.content["arrays"]

    def score(part: str) -> dict:
        x, y, num_classes = partition_tensors(cfg, pid, n, part)
        if len(x) == 0:
            return {"num-examples": 0}
        model = load_record(model_fn(), arrays)
        dev = get_device(cfg["device"])
        return {
            **evaluate(model, x, y, device=dev, num_classes=num_classes),
            "num-examples": len(x),
        }

    metrics = evaluate_splits(cfg, pid, n, score, label_counts=split_label_counts(cfg, pid, n))
    return Message(content=reply(None, **metrics), reply_to=msg)


def add_partition_query(app: ClientApp) -> None:
    """Register a ``query`` handler that answers with the node's partition id.

    Used by strategies with seeded, partition-aware sampling (``sample_seed``).
    """

    @app.query()
    def _partition_query(msg: Message, context: Context) -> Message:
        pid, n = partition_of(context)
        content = RecordDict({"metrics": MetricRecord({PARTITION_ID: pid, NUM_PARTITIONS: n})})
        return Message(content=content, reply_to=msg)


def start_arrays(msg: Message, context: Context) -> ArrayRecord:
    """The arrays a training call starts from: the received global model, or, with
    ``local-only`` in the train config (:class:`flowerbed.strategies.baselines.LocalOnly`), this
    node's own model kept in ``context.state`` (the received one in the first round)."""
    from flowerbed.common.records import config_get

    local = bool(config_get(msg.content.config_records.get("config"), LOCAL_ONLY, False))
    if local and LOCAL_MODEL in context.state.array_records:
        return context.state[LOCAL_MODEL]
    return msg.content["arrays"]


def keep_local(msg: Message, context: Context, arrays: ArrayRecord) -> None:
    """Keep ``arrays`` as this node's own model when the call is ``local-only``."""
    from flowerbed.common.records import config_get

    if config_get(msg.content.config_records.get("config"), LOCAL_ONLY, False):
        context.state[LOCAL_MODEL] = arrays


def local_sgd(
    model: torch.nn.Module,
    arrays: ArrayRecord,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    proximal_mu: float = 0.0,
    device: str = "auto",
    **train_kwargs,
) -> tuple[ArrayRecord, dict[str, float]]:
    """Local SGD from ``arrays`` on ``(x, y)`` with the generator seeded by ``seed``.

    Returns the new arrays and the metrics (training loss and accuracy, ``train-time-s``: the
    wall time of the SGD alone, ``num-examples``). Used by :func:`sgd_step` and by the
    benchmark's plain loop, so both train identically.
    """
    import time

    from flowerbed.common.records import load_record, to_record
    from flowerbed.common.seeding import set_seed
    from flowerbed.common.train import get_device, train

    load_record(model, arrays)
    gen = set_seed(seed)
    t0 = time.perf_counter()
    stats = train(
        model,
        x,
        y,
        proximal_mu=proximal_mu,
        generator=gen,
        device=get_device(device),
        **train_kwargs,
    )
    stats["train-time-s"] = time.perf_counter() - t0
    return to_record(model), {**stats, "num-examples": len(x)}


def sgd_step(
    msg: Message,
    context: Context,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    run_seed: int,
    device: str = "auto",
    **train_kwargs,
) -> Message:
    """The client step of FedAvg, FedProx and local-only, for every app: local SGD from the
    received model (:func:`local_sgd`), the reply carrying the new arrays and the metrics.

    - seeded by (run seed, partition id, server round) (:func:`call_seed`);
    - FedProx: the proximal weight is the ``proximal-mu`` the server put in the train config
      (Flower's FedProx strategy sends it; absent means 0);
    - local-only (``local-only`` in the config): starts from this node's own model kept in
      ``context.state`` (the received one in the first round) and keeps the result there.

    Parameters
    ----------
    msg, context : Message, Context
        The ClientApp call.
    model : torch.nn.Module
        The model (any weights: the received arrays are loaded into it).
    x, y : torch.Tensor
        This node's training data.
    run_seed : int
        The run config's ``seed``.
    device : str, default "auto"
        ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    **train_kwargs
        Passed to :func:`flowerbed.common.train.train` (``epochs``, ``batch_size``, ``lr``,
        ``momentum``, ``max_steps``...).
    """
    from flowerbed.common.records import config_get, reply

    conf = msg.content.config_records.get("config")
    arrays, metrics = local_sgd(
        model,
        start_arrays(msg, context),
        x,
        y,
        call_seed(context, msg, run_seed),
        proximal_mu=float(config_get(conf, "proximal-mu", 0.0)),
        device=device,
        **train_kwargs,
    )
    keep_local(msg, context, arrays)
    return Message(content=reply(arrays, **metrics), reply_to=msg)
