"""FedQual app: run-config schema, data with simulated annotation quality, model, local steps.

The same functions serve the ClientApp, the ServerApp (centralized baselines, evaluation) and
the SJAFFE cross-validation script, so all of them train identically.

RECONSTRUCTIONS (the paper's method section was not available): the quality estimate, the
calibration weight, the calibrated target, the aggregation weights, the corruption model and all
hyperparameter values; see the README.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message

from fedqual.ldl import (
    CORRUPTIONS,
    QUALITY_ESTIMATORS,
    calibrated_target,
    client_levels,
    corrupt,
    kl_loss,
    ldl_metrics,
    quality_score,
)
from flowerbed.common import config as C
from flowerbed.common.client import keep_local, local_sgd, partition_of, start_arrays
from flowerbed.common.data import DataError, available, load_dataset
from flowerbed.common.models import build_model
from flowerbed.common.partition import partition_indices
from flowerbed.common.records import config_get, load_record, reply, to_record
from flowerbed.common.seeding import derive_seed, set_seed
from flowerbed.common.train import get_device, train

SCHEMA: dict[str, C.Option] = C.compose(
    *C.STANDARD,
    {
        "method": C.Option("fedqual"),  # choices from the method table (fedqual.methods)
        "alpha-max": C.Option(0.5, C.unit_interval, "largest calibration weight, in [0, 1]"),
        "uniform-alpha": C.Option(0.3, C.unit_interval, "uniform-cal: every client's weight"),
        "reliability-power": C.Option(2.0, C.non_negative, "exponent of q_k in the weights, >= 0"),
        "quality-estimator": C.Option("corr", choices=QUALITY_ESTIMATORS),
        "corruption": C.Option("combined", choices=CORRUPTIONS),
        "corruption-level": C.Option(0.6, C.unit_interval, "corruption level in [0, 1]"),
        "corruption-spread": C.Option(0.5, C.unit_interval, "spread of levels in [0, 1]"),
        "clean-fraction": C.Option(0.4, C.unit_interval, "fraction of clean clients in [0, 1]"),
        "max-annotators": C.Option(50, C.positive, "annotators per sample at level 0, > 0"),
        "hidden": C.Option(256, C.positive, "hidden width > 0"),
        "layers": C.Option(1, C.non_negative, "hidden layers >= 0"),
        "weight-decay": C.Option(0.01, C.non_negative, "weight decay >= 0"),
    },
    num_server_rounds=20,
    dataset="ldl/SBU_3DFE",
    partitioner="iid",
    local_epochs=2,
    lr=0.001,
)


def parse_config(run_config) -> C.RunConfig:
    """Validate the run config (one-line :class:`~flowerbed.common.config.ConfigError`) and
    resolve ``method`` in the app's method table."""
    from fedqual.methods import METHODS

    cfg = C.parse(run_config, {**SCHEMA, "method": METHODS.option("fedqual")}, methods=METHODS)
    name = cfg["dataset"]
    if not name.startswith("ldl/"):
        raise DataError(f"dataset {name!r} is not a label-distribution set (expected ldl/<NAME>)")
    if not cfg["data-dir"] and name not in available():
        known = [n for n in available() if n.startswith("ldl/")]
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(known)}")
    return cfg


# ----------------------------------------------------------------------------- data
def bundle_of(cfg: dict[str, Any]):
    return load_dataset(cfg["dataset"], cfg["data-dir"] or None, mmap=True)


def levels_of(cfg: dict[str, Any], num_partitions: int) -> list[float]:
    """Hidden corruption level of every client (the server records it; clients never use it)."""
    return client_levels(
        num_partitions,
        cfg["clean-fraction"],
        cfg["corruption-level"],
        cfg["corruption-spread"],
        seed=derive_seed(cfg["seed"], 0xC1EA),
    )


def partitions_of(cfg: dict[str, Any], num_partitions: int) -> list[np.ndarray]:
    """Index arrays of the train split per client; one-line DataError if it cannot be met."""
    bundle = bundle_of(cfg)
    n = len(bundle.y_train)
    if num_partitions > n:
        raise DataError(
            f"num-partitions={num_partitions} is larger than the data ({n} train samples "
            f"of {cfg['dataset']})"
        )
    return partition_indices(
        bundle.hard_labels, num_partitions, cfg["partitioner"], seed=cfg["seed"], alpha=cfg["alpha"]
    )


def _data_key(cfg: dict[str, Any]) -> tuple:
    keys = ("dataset", "data-dir", "partitioner", "alpha", "corruption", "corruption-level")
    keys += ("corruption-spread", "clean-fraction", "max-annotators", "seed")
    return tuple(cfg[k] for k in keys)


@lru_cache(maxsize=16)
def _client_data(key: tuple, partition_id: int, num_partitions: int):
    cfg = dict(
        zip(
            (
                "dataset",
                "data-dir",
                "partitioner",
                "alpha",
                "corruption",
                "corruption-level",
                "corruption-spread",
                "clean-fraction",
                "max-annotators",
                "seed",
            ),
            key,
            strict=True,
        )
    )
    bundle = bundle_of(cfg)
    idx = partitions_of(cfg, num_partitions)[partition_id]
    level = levels_of(cfg, num_partitions)[partition_id]
    clean = np.asarray(bundle.y_train[idx], dtype=np.float32)
    rng = np.random.default_rng(derive_seed(cfg["seed"], partition_id, 0xBAD))
    noisy = corrupt(clean, level, cfg["corruption"], rng, max_annotators=cfg["max-annotators"])
    x = torch.from_numpy(np.array(bundle.x_train[idx], dtype=np.float32))
    return x, torch.from_numpy(noisy), torch.from_numpy(clean), level


def client_data(cfg: dict[str, Any], partition_id: int, num_partitions: int):
    """``(x, y_annotated, y_clean, level)`` of one client; cached per process.

    ``y_annotated`` are the distributions the client trains on (corrupted at its hidden
    ``level``); ``y_clean`` and ``level`` are for the centralized-clean baseline and the records.
    """
    return _client_data(_data_key(cfg), partition_id, num_partitions)


# ----------------------------------------------------------------------------- model
def make_model(cfg: dict[str, Any], in_features: int, num_classes: int) -> torch.nn.Module:
    """The MLP, initialised from the run seed (identical on every process)."""
    set_seed(derive_seed(cfg["seed"], 0xFFFF))
    hidden = (cfg["hidden"],) * cfg["layers"]
    return build_model("mlp", (int(in_features),), int(num_classes), hidden=hidden)


def initial_arrays(cfg: dict[str, Any]) -> ArrayRecord:
    bundle = bundle_of(cfg)
    return to_record(make_model(cfg, bundle.x_train.shape[1], bundle.num_classes))


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, device=None) -> np.ndarray:
    """Predicted distributions ``softmax(model(x))`` as a numpy array."""
    device = device or get_device()
    model.to(device).eval()
    out = [
        torch.softmax(model(x[i : i + 2048].to(device)), 1).cpu() for i in range(0, len(x), 2048)
    ]
    return torch.cat(out).numpy().astype(np.float64)


def train_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """The local training of the run config for :func:`flowerbed.common.train.train`: Adam
    (``lr``, L2 ``weight-decay``) on ``KL(target || softmax(model(x)))``."""
    lr, weight_decay = cfg["lr"], cfg["weight-decay"]
    return {
        "epochs": cfg["local-epochs"],
        "batch_size": cfg["batch-size"],
        "loss_fn": kl_loss,
        "optimizer": lambda params: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay),
    }


def calibration_weight(
    quality: float, q_ref: float, alpha_max: float, uniform: float | None = None
) -> float:
    """``alpha_k = alpha_max * clip(1 - q_k / q_ref, 0, 1)``; 0 without a reference (RECONSTR.).

    ``uniform`` (the uniform-calibration baseline): that same weight for every client, whatever
    its quality; still 0 without a reference (round 1, no anchor yet).
    """
    if q_ref <= 0:
        return 0.0
    if uniform is not None:
        return float(uniform)
    return float(alpha_max * np.clip(1.0 - quality / q_ref, 0.0, 1.0))


# ----------------------------------------------------------------------------- client steps
def local_train(
    cfg: C.RunConfig,
    arrays: ArrayRecord,
    partition_id: int,
    num_partitions: int,
    server_round: int,
    q_ref: float = 0.0,
    alpha_max: float = 0.0,
    proximal_mu: float = 0.0,
    uniform_alpha: float | None = None,
) -> tuple[ArrayRecord, dict[str, float]]:
    """One client's update from ``arrays``; FedQual calibration when the method's row has the
    ``calibrate`` flag.

    The quality ``q_k`` is estimated with the received model on the client's own annotations,
    before training; ``alpha_k`` follows from ``q_k``, the server's reference ``q_ref`` and its
    ``alpha_max`` (or is the server's ``uniform_alpha`` for every client: the uniform-calibration
    baseline). Training is the shared loop (:func:`flowerbed.common.client.local_sgd`) with
    the KL loss and Adam (:func:`train_kwargs`), seeded by (seed, partition, round).
    """
    x, y, _, _ = client_data(cfg, partition_id, num_partitions)
    device = get_device(cfg["device"])
    model = load_record(make_model(cfg, x.shape[1], y.shape[1]), arrays)
    p_g = predict(model, x, device)
    quality = quality_score(y.numpy(), p_g, cfg["quality-estimator"])
    alpha = 0.0
    if cfg.method.flag("calibrate", False):
        alpha = calibration_weight(quality, q_ref, alpha_max, uniform_alpha)
    target = calibrated_target(y, torch.from_numpy(p_g).float(), alpha) if alpha > 0 else y
    seed = derive_seed(cfg["seed"], partition_id, server_round)
    out, stats = local_sgd(
        model, arrays, x, target, seed, proximal_mu, device=cfg["device"], **train_kwargs(cfg)
    )
    metrics = {
        "train_loss": stats["train_loss"],
        "quality": quality,
        "alpha": alpha,
        "partition-id": partition_id,
        "num-examples": len(x),
    }
    return out, metrics


def client_step(msg: Message, context: Context, cfg: C.RunConfig) -> Message:
    """The ClientApp's training step of every federated row (FedQual, its ablations, FedAvg,
    FedProx, local-only), with the server's settings read from the train config:

    - ``q-ref`` / ``alpha-max``: FedQual's calibration reference and largest weight (absent: 0);
    - ``uniform-alpha``: the uniform-calibration baseline's one weight for all (absent: none);
    - ``proximal-mu``: sent by Flower's FedProx (absent: 0);
    - ``local-only`` (:class:`~flowerbed.strategies.baselines.LocalOnly`): the client continues
      from its own model (:func:`~flowerbed.common.client.start_arrays` / ``keep_local``).
    """
    pid, n = partition_of(context)
    conf = msg.content["config"]
    arrays, metrics = local_train(
        cfg,
        start_arrays(msg, context),
        pid,
        n,
        int(conf["server-round"]),
        q_ref=float(config_get(conf, "q-ref", 0.0)),
        alpha_max=float(config_get(conf, "alpha-max", 0.0)),
        proximal_mu=float(config_get(conf, "proximal-mu", 0.0)),
        uniform_alpha=float(conf["uniform-alpha"]) if "uniform-alpha" in conf else None,
    )
    keep_local(msg, context, arrays)
    return Message(content=reply(arrays, **metrics), reply_to=msg)


# ----------------------------------------------------------------------------- evaluation
def test_tensors(cfg: dict[str, Any]) -> tuple[torch.Tensor, np.ndarray]:
    """The clean test split (never corrupted)."""
    bundle = bundle_of(cfg)
    return torch.from_numpy(np.array(bundle.x_test, dtype=np.float32)), np.array(bundle.y_test)


def central_evaluator(cfg: dict[str, Any]):
    """``evaluate_fn(arrays) -> six LDL measures`` on the clean test split."""
    x, y = test_tensors(cfg)
    model = make_model(cfg, x.shape[1], y.shape[1])
    device = get_device(cfg["device"])

    def evaluate_fn(arrays: ArrayRecord) -> dict[str, float]:
        return ldl_metrics(y, predict(load_record(model, arrays), x, device))

    return evaluate_fn


def pooled_data(cfg: dict[str, Any], num_partitions: int, clean: bool):
    """All clients' data in one set (the centralized baselines)."""
    parts = [client_data(cfg, p, num_partitions) for p in range(num_partitions)]
    x = torch.cat([p[0] for p in parts])
    y = torch.cat([p[2] if clean else p[1] for p in parts])
    return x, y


def central_fit(cfg: C.RunConfig, num_partitions: int):
    """``fit(server_round, arrays) -> (arrays, metrics)`` of the centralized rows
    (:class:`~flowerbed.strategies.baselines.Centralized`): ``local-epochs`` epochs of the
    shared loop over the pooled data, clean labels when the row has the ``clean`` flag. The
    data is pooled at the first call."""
    state: dict[str, Any] = {}

    def fit(server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, dict[str, float]]:
        if not state:
            x, y = pooled_data(cfg, num_partitions, clean=cfg.method.flag("clean", False))
            state.update(x=x, y=y, model=make_model(cfg, x.shape[1], y.shape[1]))
        model = load_record(state["model"], arrays)
        stats = train(
            model,
            state["x"],
            state["y"],
            generator=set_seed(derive_seed(cfg["seed"], 0xCE, server_round)),
            device=get_device(cfg["device"]),
            **train_kwargs(cfg),
        )
        return to_record(model), {"train_loss": stats["train_loss"]}

    return fit
