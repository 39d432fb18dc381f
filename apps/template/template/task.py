"""Template app: run-config schema, model, data, the client step and the evaluations.

Copy ``apps/template`` to ``apps/<name>``, rename the package, then change what the method
changes: the schema's app options, the model, the client step, and the method table
(``methods.py``), whose paper row names the strategy in ``strategies/<name>.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord

from flowerbed.common import config as C
from flowerbed.common.client import local_sgd, partition_of, partition_tensors, sgd_step
from flowerbed.common.data import load_dataset
from flowerbed.common.models import build_model
from flowerbed.common.records import load_record, to_record
from flowerbed.common.seeding import derive_seed, set_seed
from flowerbed.common.train import evaluate, get_device

#: every key of the app, from the shared fragments; app options go in the dict
SCHEMA: dict[str, C.Option] = C.compose(
    *C.STANDARD,
    C.PARTICIPATION,  # participation-gap evaluation (flowerbed.common.participation), off
    {"method": C.Option("fedavg")},  # choices from the method table
    num_server_rounds=3,
    dataset="digits",
    partitioner="iid",
    lr=0.1,
)


def parse_config(run_config) -> C.RunConfig:
    """Validate the run config (one line naming a bad key or value) and resolve ``method``."""
    from template.methods import METHODS

    return C.parse(run_config, {**SCHEMA, "method": METHODS.option("fedavg")}, methods=METHODS)


def _bundle(cfg):
    return load_dataset(cfg["dataset"], cfg["data-dir"] or None, mmap=True)


def make_model(cfg: dict[str, Any]) -> torch.nn.Module:
    """The model, initialised from the run seed (identical in every process)."""
    bundle = _bundle(cfg)
    set_seed(derive_seed(cfg["seed"], 0xFFFF))
    return build_model("mlp", bundle.input_shape, bundle.num_classes)


def client_data(cfg: dict[str, Any], partition_id: int, num_partitions: int):
    """This partition's train split ``(x, y, num_classes)`` (memory-mapped dataset)."""
    return partition_tensors(cfg, partition_id, num_partitions)


def _train_kwargs(cfg) -> dict[str, Any]:
    return {"epochs": cfg["local-epochs"], "batch_size": cfg["batch-size"], "lr": cfg["lr"]}


def client_train(msg, context, cfg):
    """The client step of every method here: the shared SGD step (FedAvg, FedProx, local-only)."""
    pid, n = partition_of(context)
    x, y, _ = client_data(cfg, pid, n)
    return sgd_step(
        msg, context, make_model(cfg), x, y, cfg["seed"], cfg["device"], **_train_kwargs(cfg)
    )


def initial_arrays(cfg) -> ArrayRecord:
    return to_record(make_model(cfg))


def evaluator(cfg):
    """``evaluate(arrays) -> {"loss", "accuracy"}`` on the dataset's test split."""
    bundle = _bundle(cfg)
    x, y = torch.from_numpy(bundle.x_test.copy()), torch.from_numpy(bundle.y_test.copy())
    model, device = make_model(cfg), get_device(cfg["device"])
    return lambda arrays: evaluate(load_record(model, arrays), x, y, device=device)


def central_fit(cfg, num_partitions: int):
    """``fit(round, arrays)`` of the centralized baseline: one pass of the SGD step over the
    pooled partitions (the same data the clients hold), seeded by (seed, round). The pooled
    data is gathered at the first call (only the centralized method calls it)."""
    pooled: list[torch.Tensor] = []

    def fit(server_round: int, arrays: ArrayRecord):
        if not pooled:
            parts = [client_data(cfg, p, num_partitions) for p in range(num_partitions)]
            pooled.extend([torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])])
        x, y = pooled
        model = make_model(cfg)
        seed = derive_seed(cfg["seed"], 0xCE, server_round)
        new, metrics = local_sgd(
            model, arrays, x, y, seed, device=cfg["device"], **_train_kwargs(cfg)
        )
        return new, {k: v for k, v in metrics.items() if k != "train-time-s"}

    return fit


def local_evaluate(cfg, arrays, partition_id: int, num_partitions: int, part: str):
    """The model ``arrays`` on this partition's ``part`` (participation gap: ``train``,
    ``val`` or ``unpart``, :func:`flowerbed.common.client.partition_tensors`)."""
    x, y, num_classes = partition_tensors(cfg, partition_id, num_partitions, part)
    if len(x) == 0:
        return {"num-examples": 0}
    model = load_record(make_model(cfg), arrays)
    device = get_device(cfg["device"])  # class-correct: per-class hits for the gap rows
    return {**evaluate(model, x, y, device=device, num_classes=num_classes), "num-examples": len(x)}
