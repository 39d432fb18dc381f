"""Mixed FL app: run-config schema, the blending split, model, the client step, the server's data
loader and loss ``f_c``, the centralized baselines and the evaluation on the inference
distribution.

Blending scenario (the paper's use case; the split is a RECONSTRUCTION of its setup): the
clients hold only the classes ``0 .. client-classes - 1`` of the training split, the server's
datacenter data (``server-examples`` images, disjoint from the clients') holds the missing classes
(``server-classes = missing``) or all of them (``all``); the inference distribution is the whole
test split (every class).
"""

from __future__ import annotations

import math
import time
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from flowerbed.common import config as C
from flowerbed.common.client import call_seed, local_sgd, partition_of
from flowerbed.common.data import load_dataset
from flowerbed.common.models import build_model
from flowerbed.common.partition import partition_indices
from flowerbed.common.records import config_get, load_record, reply, to_record
from flowerbed.common.seeding import derive_seed, set_seed
from flowerbed.common.train import evaluate, get_device, train
from flowerbed.strategies.mixed_fl import (
    CLIENT_GRAD,
    SERVER_GRAD,
    UPLOAD_KEY,
    WC_KEY,
    WF_KEY,
    client_direction,
)

SCHEMA: dict[str, C.Option] = C.compose(
    *C.STANDARD,
    {
        "method": C.Option("parallel"),  # choices from the method table (mixedfl.methods)
        "client-classes": C.Option(7, lambda v: 1 <= v <= 9, "classes 0..k-1 on clients, 1..9"),
        "server-classes": C.Option(
            "missing", choices=("missing", "all"), help="server data: missing classes | all"
        ),
        "server-examples": C.Option(3000, C.positive, "server (datacenter) examples > 0"),
        "local-steps": C.Option(5, C.positive, "client SGD steps per round K > 0"),
        "server-steps": C.Option(5, C.positive, "server SGD steps per round K_c > 0"),
        "server-grad-batch": C.Option(1024, C.positive, "server batch of g_c > 0"),
        "w-f": C.Option(0.7, C.non_negative, "federated loss weight >= 0"),
        "w-c": C.Option(0.3, C.non_negative, "centralized loss weight >= 0"),
        "server-lr": C.Option(1.0, C.positive, "server learning rate eta_s > 0"),
        # offloading scenario (methods offload, offload-baseline; mixedfl.offload)
        "offload-users": C.Option(0, C.non_negative, "MovieLens-100K users kept (0 = all) >= 0"),
        "embedding-dim": C.Option(16, C.positive, "item embedding width > 0"),
        "spreadout-lambda": C.Option(1e-3, C.non_negative, "lambda of f_c = spreadout >= 0"),
    },
    num_server_rounds=50,
    fraction_train=0.25,
    dataset="fashion_mnist",
    partitioner="dirichlet",
    alpha=0.5,
    lr=0.1,
)

SERVER_SEED, CENTRAL_SEED, MODEL_SEED = 0x5E, 0xCE, 0xFFFF


def parse_config(run_config) -> C.RunConfig:
    """Validate the run config (one line naming a bad key or value) and resolve ``method``."""
    from mixedfl.methods import METHODS

    cfg = C.parse(run_config, {**SCHEMA, "method": METHODS.option("parallel")}, methods=METHODS)
    if cfg["w-f"] + cfg["w-c"] == 0:
        raise C.ConfigError("run config w-f=0, w-c=0: the weights cannot both be 0")
    return cfg


def _bundle(cfg):
    return load_dataset(cfg["dataset"], cfg["data-dir"] or None, mmap=True)


# ---------------------------------------------------------------------------- the split
def blending_split(
    labels: np.ndarray, client_classes: int, server_classes: str, server_examples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(client_pool, server_idx)``: indices of the training split.

    The server draws ``server_examples`` images (seeded by the run seed) among the classes
    ``>= client_classes`` (``missing``) or among all (``all``); the clients' pool is every other
    image of the classes ``< client_classes``. The two never overlap.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(derive_seed(seed, SERVER_SEED))
    eligible = np.flatnonzero(
        labels >= client_classes if server_classes == "missing" else labels >= 0
    )
    server = np.sort(rng.choice(eligible, min(server_examples, len(eligible)), replace=False))
    taken = np.zeros(len(labels), bool)
    taken[server] = True
    pool = np.flatnonzero((labels < client_classes) & ~taken)
    return pool, server


@lru_cache(maxsize=4)
def _split(dataset, data_dir, client_classes, server_classes, server_examples, seed):
    bundle = load_dataset(dataset, data_dir or None, mmap=True)
    return blending_split(bundle.hard_labels, client_classes, server_classes, server_examples, seed)


def split_of(cfg) -> tuple[np.ndarray, np.ndarray]:
    """:func:`blending_split` with the run config's keys (cached per process)."""
    return _split(
        cfg["dataset"],
        cfg["data-dir"],
        cfg["client-classes"],
        cfg["server-classes"],
        cfg["server-examples"],
        cfg["seed"],
    )


def _tensors(cfg, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    bundle = _bundle(cfg)
    return torch.from_numpy(bundle.x_train[idx].copy()), torch.from_numpy(
        bundle.y_train[idx].copy()
    )


def client_indices(cfg, partition_id: int, num_partitions: int) -> np.ndarray:
    """Training-split indices of one client: the partitioner over the clients' pool."""
    pool, _ = split_of(cfg)
    labels = _bundle(cfg).hard_labels[pool]
    parts = partition_indices(
        labels,
        num_partitions,
        cfg["partitioner"],
        seed=cfg["seed"],
        alpha=cfg["alpha"],
        classes_per_partition=cfg["classes-per-partition"],
    )
    return pool[parts[partition_id]]


def client_data(cfg, partition_id: int, num_partitions: int):
    return _tensors(cfg, client_indices(cfg, partition_id, num_partitions))


def server_tensors(cfg):
    """The server's datacenter data ``(x, y)``."""
    return _tensors(cfg, split_of(cfg)[1])


# ---------------------------------------------------------------------------- model
def make_model(cfg: dict[str, Any]) -> torch.nn.Module:
    """The MLP, initialised from the run seed (identical in every process)."""
    bundle = _bundle(cfg)
    set_seed(derive_seed(cfg["seed"], MODEL_SEED))
    return build_model("mlp", bundle.input_shape, bundle.num_classes)


def initial_arrays(cfg) -> ArrayRecord:
    return to_record(make_model(cfg))


def _epochs(steps: int, batch_size: int, n: int) -> int:
    """Epochs enough for ``steps`` steps (``train`` stops at ``max_steps``)."""
    return max(1, math.ceil(steps * batch_size / max(n, 1)))


class _Counting:
    """Cross-entropy that counts the examples it sees (client compute per round)."""

    def __init__(self) -> None:
        self.examples = 0

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.examples += len(y)
        return torch.nn.functional.cross_entropy(out, y)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters()}


def _set_grads(model: torch.nn.Module, grads) -> None:
    for n, p in model.named_parameters():
        p.grad = grads[n]


# ---------------------------------------------------------------------------- client step
def client_train(msg: Message, context, cfg) -> Message:
    """The client step of every federated method here: ``local-steps`` SGD steps from the
    received model, seeded by (seed, partition, round).

    With ``server-grad`` in the message (1-way, 2-way) each step's gradient is
    ``w_f grad f_i + w_c g_c`` (:func:`flowerbed.strategies.mixed_fl.client_direction`); with
    ``upload-grad`` (2-way) the reply also carries ``client-grad``, the raw gradient of the first
    step (taken at the received model ``x^t``). The metrics give the client compute: examples
    through forward and backward (``client-examples``), SGD steps and the wall time of training.
    """
    pid, n = partition_of(context)
    x, y = client_data(cfg, pid, n)
    conf = msg.content.config_records.get("config")
    device = get_device(cfg["device"])
    model = load_record(make_model(cfg), msg.content["arrays"]).to(device)
    g_c = None
    if SERVER_GRAD in msg.content.array_records:
        g_c = {
            k: torch.from_numpy(v.numpy().copy()).to(device)
            for k, v in msg.content[SERVER_GRAD].items()
        }
    w_f, w_c = config_get(conf, WF_KEY, 1.0), config_get(conf, WC_KEY, 0.0)
    upload = config_get(conf, UPLOAD_KEY, False)
    first: dict[str, torch.Tensor] = {}

    def before_step(m: torch.nn.Module) -> None:
        if upload and not first:
            first.update({k: g.detach().cpu().clone() for k, g in _grads(m).items()})
        if g_c is not None:
            _set_grads(m, client_direction(_grads(m), g_c, w_f, w_c))

    loss_fn = _Counting()
    gen = set_seed(call_seed(context, msg, cfg["seed"]))
    t0 = time.perf_counter()
    stats = train(
        model,
        x,
        y,
        epochs=_epochs(cfg["local-steps"], cfg["batch-size"], len(x)),
        batch_size=cfg["batch-size"],
        lr=cfg["lr"],
        max_steps=cfg["local-steps"],
        loss_fn=loss_fn,
        generator=gen,
        device=device,
        before_step=before_step if (g_c is not None or upload) else None,
    )
    content = reply(
        to_record(model),
        **{
            "num-examples": len(x),
            "train-loss": stats["train_loss"],
            "client-steps": stats["steps"],
            "client-examples": loss_fn.examples,
            "train-time-s": time.perf_counter() - t0,
        },
    )
    if upload:
        content[CLIENT_GRAD] = to_record(first)
    return Message(content=content, reply_to=msg)


# ---------------------------------------------------------------------------- server side
class ServerSide:
    """The server's data loader and loss ``f_c`` (cross-entropy on the datacenter data), as
    :class:`flowerbed.strategies.mixed_fl.ServerData` wants it."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.x, self.y = server_tensors(cfg)
        self.model = make_model(cfg)
        self.device = get_device(cfg["device"])

    def gradient(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """``g_c = grad f_c(x^t)`` on ``server-grad-batch`` server examples (seeded by round)."""
        model = load_record(self.model, arrays).to(self.device).train()
        gen = torch.Generator().manual_seed(
            derive_seed(self.cfg["seed"], SERVER_SEED, server_round)
        )
        k = min(self.cfg["server-grad-batch"], len(self.x))
        idx = torch.randperm(len(self.x), generator=gen)[:k]
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(
            model(self.x[idx].to(self.device)), self.y[idx].to(self.device)
        )
        loss.backward()
        return to_record({n: g.detach() for n, g in _grads(model).items()})

    def steps(self, server_round: int, arrays: ArrayRecord, direction) -> ArrayRecord:
        """``server-steps`` SGD steps on ``f_c`` from ``arrays``, each along
        ``direction(grad f_c)``, seeded by (seed, round)."""
        model = load_record(self.model, arrays).to(self.device)

        def before_step(m: torch.nn.Module) -> None:
            _set_grads(m, direction(_grads(m)))

        steps, bs = self.cfg["server-steps"], self.cfg["batch-size"]
        train(
            model,
            self.x,
            self.y,
            epochs=_epochs(steps, bs, len(self.x)),
            batch_size=bs,
            lr=self.cfg["lr"],
            max_steps=steps,
            generator=set_seed(derive_seed(self.cfg["seed"], CENTRAL_SEED, server_round)),
            device=self.device,
            before_step=before_step,
        )
        return to_record(model)


def central_fit(cfg, num_partitions: int, data: str):
    """``fit(round, arrays)`` of the centralized baselines: ``server-steps`` SGD steps per round
    on the server's data (``data = "server"``) or on everything, the clients' partitions and the
    server's data pooled (``"all"``: the oracle). Gathered at the first call."""
    pooled: list[torch.Tensor] = []

    def fit(server_round: int, arrays: ArrayRecord):
        if not pooled:
            idx = [split_of(cfg)[1]]
            if data == "all":
                idx += [client_indices(cfg, p, num_partitions) for p in range(num_partitions)]
            pooled.extend(_tensors(cfg, np.concatenate(idx)))
        x, y = pooled
        steps, bs = cfg["server-steps"], cfg["batch-size"]
        new, metrics = local_sgd(
            make_model(cfg),
            arrays,
            x,
            y,
            derive_seed(cfg["seed"], CENTRAL_SEED, server_round),
            device=cfg["device"],
            epochs=_epochs(steps, bs, len(x)),
            batch_size=bs,
            lr=cfg["lr"],
            max_steps=steps,
        )
        return new, {k: v for k, v in metrics.items() if k != "train-time-s"}

    return fit


# ---------------------------------------------------------------------------- evaluation
def evaluator(cfg):
    """``evaluate(arrays)`` on the inference distribution (the whole test split): loss,
    accuracy, and the accuracy on the clients' classes and on the others."""
    bundle = _bundle(cfg)
    x, y = torch.from_numpy(bundle.x_test.copy()), torch.from_numpy(bundle.y_test.copy())
    seen = y < cfg["client-classes"]
    model, device = make_model(cfg), get_device(cfg["device"])

    def run(arrays: ArrayRecord) -> dict[str, float]:
        load_record(model, arrays)
        out = evaluate(model, x, y, device=device)
        out["accuracy-client-classes"] = evaluate(model, x[seen], y[seen], device=device)[
            "accuracy"
        ]
        out["accuracy-other-classes"] = evaluate(model, x[~seen], y[~seen], device=device)[
            "accuracy"
        ]
        return out

    return run
