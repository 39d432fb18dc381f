"""FedAvg app: run-config schema, model, and the local train / central evaluation steps.

The same functions serve the ClientApp, the ServerApp and the benchmark's plain loop, so all
three train identically.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from flwr.app import ArrayRecord

from flowerbed.common import config as C
from flowerbed.common import faults
from flowerbed.common.client import local_tensors
from flowerbed.common.data import load_dataset
from flowerbed.common.models import MODELS, build_model
from flowerbed.common.partition import SCHEMES
from flowerbed.common.records import load_record, to_record
from flowerbed.common.seeding import derive_seed, set_seed
from flowerbed.common.train import evaluate, get_device, train


def _id_list(v: str) -> bool:
    try:
        faults.parse_ids(v)
    except ValueError:
        return False
    return True


SCHEMA: dict[str, C.Option] = {
    "num-server-rounds": C.Option(30, C.positive, "number of rounds, > 0"),
    "fraction-train": C.Option(1.0, lambda v: 0 < v <= 1, "fraction in (0, 1]"),
    "fraction-evaluate": C.Option(0.0, C.unit_interval, "fraction in [0, 1]"),
    "strategy": C.Option("fedavg", choices=("fedavg", "fedprox")),
    "proximal-mu": C.Option(0.01, C.non_negative, "FedProx mu >= 0"),
    "dataset": C.Option("fashion_mnist"),
    "data-dir": C.Option(""),
    "partitioner": C.Option("dirichlet", choices=SCHEMES),
    "alpha": C.Option(0.5, C.positive, "Dirichlet alpha > 0"),
    "classes-per-partition": C.Option(2, C.positive, "classes per client > 0"),
    "model": C.Option("cnn", choices=MODELS),
    "local-epochs": C.Option(1, C.positive, "local epochs > 0"),
    "local-steps": C.Option(0, C.non_negative, "step cap >= 0 (0 = none)"),
    "batch-size": C.Option(64, C.positive, "batch size > 0"),
    "lr": C.Option(0.1, C.positive, "learning rate > 0"),
    "momentum": C.Option(0.0, C.unit_interval, "momentum in [0, 1]"),
    "max-update-norm": C.Option(0.0, C.non_negative, "norm bound >= 0 (0 = off)"),
    "min-train-replies": C.Option(1, C.positive, "minimum valid replies > 0"),
    "seed": C.Option(42),
    "results-dir": C.Option(""),
    "device": C.Option("auto", choices=("auto", "cpu", "cuda")),
    # --- fault tolerance, checkpoints, privacy (all off by default)
    "round-timeout": C.Option(3600.0, C.positive, "seconds to wait for replies per round > 0"),
    "fault-mode": C.Option("none", choices=faults.MODES),
    "fault-rate": C.Option(0.0, C.unit_interval, "fraction of client calls failing in [0, 1]"),
    "fault-partitions": C.Option("", _id_list, "comma-separated partition ids"),
    "fault-rounds": C.Option("", _id_list, "comma-separated round numbers"),
    "fault-hang-s": C.Option(0.0, C.non_negative, "hang seconds >= 0 (0 = round-timeout + 5)"),
    "checkpoint": C.Option(False, help="write a checkpoint after every round"),
    "resume": C.Option(False, help="continue from the checkpoint in results-dir"),
    "dp-noise-multiplier": C.Option(0.0, C.non_negative, "noise multiplier >= 0 (0 = no DP)"),
    "dp-clipping-norm": C.Option(1.0, C.positive, "clipping norm > 0"),
    "dp-delta": C.Option(1e-5, lambda v: 0 < v < 1, "delta in (0, 1)"),
    # --- secure aggregation (Flower's SecAgg+, legacy workflow; fedavg/secagg.py)
    "secagg": C.Option(False, help="aggregate with SecAgg+ instead of the plain strategy"),
    "secagg-num-shares": C.Option(
        1.0, lambda v: 0 < v <= 1 or (v > 2 and v == int(v)), "fraction in (0, 1] or count > 2"
    ),
    "secagg-reconstruction-threshold": C.Option(
        0.67, lambda v: 0 < v <= 1 or (v >= 2 and v == int(v)), "fraction in (0, 1] or count >= 2"
    ),
    "secagg-clipping-range": C.Option(8.0, C.positive, "clipping range > 0"),
    "secagg-quantization-range": C.Option(
        4194304, lambda v: 1 < v < 2**32, "quantization range in (1, 2**32)"
    ),
    "secagg-max-weight": C.Option(0.0, C.non_negative, "max client weight >= 0 (0 = auto)"),
}


def parse_config(run_config) -> dict[str, Any]:
    """Validate the run config (one-line :class:`~flowerbed.common.config.ConfigError`)."""
    cfg = C.parse(run_config, SCHEMA)
    from flowerbed.common.data import available

    if cfg["dataset"] not in available():
        from flowerbed.common.data import DataError

        raise DataError(f"unknown dataset {cfg['dataset']!r}; known: {', '.join(available())}")
    if cfg["secagg"]:
        clash = [
            f"{k}={cfg[k]}"
            for k in ("dp-noise-multiplier", "max-update-norm", "fraction-evaluate")
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
    return local_tensors(
        cfg["dataset"],
        partition_id,
        num_partitions,
        cfg["partitioner"],
        cfg["seed"],
        alpha=cfg["alpha"],
        classes_per_partition=cfg["classes-per-partition"],
        data_dir=cfg["data-dir"],
    )


def local_train(
    cfg: dict[str, Any],
    arrays: ArrayRecord,
    partition_id: int,
    num_partitions: int,
    server_round: int,
) -> tuple[ArrayRecord, dict[str, float]]:
    """One client's local update from the global ``arrays``; seeded by (seed, pid, round)."""
    x, y, num_classes = client_data(cfg, partition_id, num_partitions)
    model = load_record(make_model(cfg, x.shape[1:], num_classes), arrays)
    gen = set_seed(derive_seed(cfg["seed"], partition_id, server_round))
    mu = cfg["proximal-mu"] if cfg["strategy"] == "fedprox" else 0.0
    t0 = time.perf_counter()
    stats = train(
        model,
        x,
        y,
        epochs=cfg["local-epochs"],
        batch_size=cfg["batch-size"],
        lr=cfg["lr"],
        momentum=cfg["momentum"],
        max_steps=cfg["local-steps"] or None,
        proximal_mu=mu,
        generator=gen,
        device=get_device(cfg["device"]),
    )
    stats["train-time-s"] = time.perf_counter() - t0  # wall time of the local SGD alone
    return to_record(model), {**stats, "num-examples": len(x)}


def local_evaluate(cfg, arrays, partition_id, num_partitions) -> dict[str, float]:
    x, y, num_classes = client_data(cfg, partition_id, num_partitions)
    model = load_record(make_model(cfg, x.shape[1:], num_classes), arrays)
    return {**evaluate(model, x, y, device=get_device(cfg["device"])), "num-examples": len(x)}


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
    from flowerbed.common.partition import label_histograms as hist
    from flowerbed.common.partition import partition_indices

    bundle = load_dataset(cfg["dataset"], cfg["data-dir"] or None, mmap=True)
    parts = partition_indices(
        bundle.hard_labels,
        num_partitions,
        cfg["partitioner"],
        seed=cfg["seed"],
        alpha=cfg["alpha"],
        classes_per_partition=cfg["classes-per-partition"],
    )
    return hist(bundle.hard_labels, parts, bundle.num_classes).tolist()
