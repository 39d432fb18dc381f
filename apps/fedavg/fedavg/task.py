"""FedAvg app: run-config schema, model, and the local train / central evaluation steps.

The same functions serve the ClientApp, the ServerApp and the benchmark's plain loop, so all
three train identically.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord

from flowerbed.common import config as C
from flowerbed.common.attacks import poison_labels
from flowerbed.common.client import local_sgd, partition_of, partition_tensors, sgd_step
from flowerbed.common.data import load_dataset
from flowerbed.common.models import MODELS, build_model
from flowerbed.common.records import load_record, to_record
from flowerbed.common.seeding import derive_seed, set_seed
from flowerbed.common.train import evaluate, get_device

SCHEMA: dict[str, C.Option] = C.compose(
    *C.STANDARD,
    C.FAULTS,
    C.ATTACK,  # Byzantine attacks (flowerbed.common.attacks), off by default
    C.PARTICIPATION,  # participation-gap evaluation (flowerbed.common.participation), off
    {
        "method": C.Option("fedavg"),  # choices from the method table (fedavg.methods)
        "model": C.Option("cnn", choices=MODELS),
        "local-steps": C.Option(0, C.non_negative, "step cap >= 0 (0 = none)"),
        "momentum": C.Option(0.0, C.unit_interval, "momentum in [0, 1]"),
        "max-update-norm": C.Option(0.0, C.non_negative, "norm bound >= 0 (0 = off)"),
        # --- central DP (Flower's server-side fixed clipping + Gaussian noise)
        "dp-noise-multiplier": C.Option(0.0, C.non_negative, "noise multiplier >= 0 (0 = no DP)"),
        "dp-clipping-norm": C.Option(1.0, C.positive, "clipping norm > 0"),
        "dp-delta": C.Option(1e-5, lambda v: 0 < v < 1, "delta in (0, 1)"),
        # --- secure aggregation (Flower's SecAgg+, legacy workflow; fedavg/secagg.py)
        "secagg": C.Option(False, help="aggregate with SecAgg+ instead of the plain strategy"),
        "secagg-num-shares": C.Option(
            1.0,
            lambda v: 0 < v <= 1 or (v > 2 and v == int(v)),
            "fraction in (0, 1] or count > 2",
        ),
        "secagg-reconstruction-threshold": C.Option(
            0.67,
            lambda v: 0 < v <= 1 or (v >= 2 and v == int(v)),
            "fraction in (0, 1] or count >= 2",
        ),
        "secagg-clipping-range": C.Option(8.0, C.positive, "clipping range > 0"),
        "secagg-quantization-range": C.Option(
            4194304, lambda v: 1 < v < 2**32, "quantization range in (1, 2**32)"
        ),
        "secagg-max-weight": C.Option(0.0, C.non_negative, "max client weight >= 0 (0 = auto)"),
    },
    num_server_rounds=30,
    batch_size=64,
    lr=0.1,
)


def parse_config(run_config) -> C.RunConfig:
    """Validate the run config (one-line :class:`~flowerbed.common.config.ConfigError`) and
    resolve ``method`` in the app's method table."""
    from fedavg.methods import METHODS

    cfg = C.parse(run_config, {**SCHEMA, "method": METHODS.option("fedavg")}, methods=METHODS)
    if cfg["secagg"]:
        clash = [
            f"{k}={cfg[k]}"
            for k in (
                "dp-noise-multiplier",
                "max-update-norm",
                "fraction-evaluate",
                "unparticipating-fraction",
            )
            if cfg[k] > 0
        ] + [k for k in ("checkpoint", "resume") if cfg[k]]
        if clash:
            raise C.ConfigError(f"secagg=true cannot be combined with {clash[0]}")
    if cfg["fault-hang-s"] == 0:
        cfg["fault-hang-s"] = cfg["round-timeout"] + 5.0
    return cfg


def make_model(cfg: dict[str, Any], input_shape, num_classes: int) -> torch.nn.Module:
    """The model, initialised from the run seed (identical on every process)."""
    set_seed(derive_seed(cfg["seed"], 0xFFFF))
    return build_model(cfg["model"], tuple(input_shape), num_classes)


def initial_arrays(cfg: dict[str, Any]) -> ArrayRecord:
    bundle = load_dataset(cfg["dataset"], cfg["data-dir"] or None, mmap=True)
    return to_record(make_model(cfg, bundle.input_shape, bundle.num_classes))


def client_data(cfg: dict[str, Any], partition_id: int, num_partitions: int):
    """This partition's train split ``(x, y, num_classes)`` (memory-mapped dataset)."""
    return partition_tensors(cfg, partition_id, num_partitions)


def train_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """The local SGD settings of the run config (:func:`flowerbed.common.train.train`)."""
    return {
        "epochs": cfg["local-epochs"],
        "batch_size": cfg["batch-size"],
        "lr": cfg["lr"],
        "momentum": cfg["momentum"],
        "max_steps": cfg["local-steps"] or None,
    }


def local_train(
    cfg: dict[str, Any],
    arrays: ArrayRecord,
    partition_id: int,
    num_partitions: int,
    server_round: int,
    proximal_mu: float = 0.0,
) -> tuple[ArrayRecord, dict[str, float]]:
    """One client's local update from the global ``arrays``; seeded by (seed, pid, round).

    The ClientApp's step (:func:`client_train`) and the benchmark's plain loop both train
    through :func:`flowerbed.common.client.local_sgd`, so they train identically."""
    x, y, num_classes = client_data(cfg, partition_id, num_partitions)
    model = make_model(cfg, x.shape[1:], num_classes)
    seed = derive_seed(cfg["seed"], partition_id, server_round)
    return local_sgd(
        model, arrays, x, y, seed, proximal_mu, device=cfg["device"], **train_kwargs(cfg)
    )


def client_train(msg, context, cfg: dict[str, Any]):
    """The ClientApp's training step (FedAvg, FedProx): the shared SGD step on this partition."""
    pid, n = partition_of(context)
    x, y, num_classes = client_data(cfg, pid, n)
    y = poison_labels(cfg, pid, n, y, num_classes)  # attack = label-flip, malicious partitions
    model = make_model(cfg, x.shape[1:], num_classes)
    return sgd_step(msg, context, model, x, y, cfg["seed"], cfg["device"], **train_kwargs(cfg))


def local_evaluate(
    cfg, arrays, partition_id, num_partitions, part: str = "train", per_class: bool = False
) -> dict[str, Any]:
    """The model ``arrays`` on this partition's ``part`` (:func:`partition_tensors`);
    ``per_class``: also the correct examples per class (participation-gap rows)."""
    x, y, num_classes = partition_tensors(cfg, partition_id, num_partitions, part)
    if len(x) == 0:
        return {"num-examples": 0}
    model = load_record(make_model(cfg, x.shape[1:], num_classes), arrays)
    device = get_device(cfg["device"])
    metrics = evaluate(model, x, y, device=device, num_classes=num_classes if per_class else 0)
    return {**metrics, "num-examples": len(x)}


def central_evaluator(cfg: dict[str, Any]):
    """``evaluate_fn(round, arrays)`` on the dataset's test split."""
    bundle = load_dataset(cfg["dataset"], cfg["data-dir"] or None, mmap=True)
    x, y = torch.from_numpy(bundle.x_test.copy()), torch.from_numpy(bundle.y_test.copy())
    model = make_model(cfg, bundle.input_shape, bundle.num_classes)
    device = get_device(cfg["device"])

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        return evaluate(load_record(model, arrays), x, y, device=device)

    return evaluate_fn


def label_histograms(cfg: dict[str, Any], num_partitions: int) -> list[list[int]]:
    """Per-client label counts of this run's partitioning (saved in the results file)."""
    from flowerbed.common.partition import data_options, partition_indices
    from flowerbed.common.partition import label_histograms as hist

    bundle = load_dataset(cfg["dataset"], cfg["data-dir"] or None, mmap=True)
    parts = partition_indices(
        bundle.hard_labels,
        num_partitions,
        cfg["partitioner"],
        seed=cfg["seed"],
        alpha=cfg["alpha"],
        classes_per_partition=cfg["classes-per-partition"],
        **data_options(cfg["partitioner"], cfg["dataset"], cfg["data-dir"]),
    )
    return hist(bundle.hard_labels, parts, bundle.num_classes).tolist()
