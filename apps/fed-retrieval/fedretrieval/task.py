"""fed-retrieval: run-config schema, the user partitioner, the client step, the server-side
evaluation on held-out users and the centralized baseline.

Users are the clients. The ``user`` partitioner gives node ``p`` of ``n`` the train users
``p, p + n, p + 2n, ...`` (in the seeded order of the split): with as many nodes as train users
(754 on MovieLens-100K) each node is one user. With fewer nodes a node hosts several users and
trains each of them separately from the received model (one epoch, batch 16, SGD lr 0.01, seed
from (run seed, partition, round, user)); it replies with their example-weighted mean and their
total count, which is exactly what FedAvg over those users would average, so the server's Adam
step is the same as with one user per node.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message
from flwr_datasets.partitioner import Partitioner

from fedretrieval import data as D
from fedretrieval.model import (
    EMBEDDING_DIM,
    SPREADOUT_LAMBDA,
    DualEncoder,
    LossOptions,
    loss_for,
    retrieval_metrics,
)
from flowerbed.common import config as C
from flowerbed.common.client import local_sgd, partition_of
from flowerbed.common.partition import partition_indices, register_partitioner
from flowerbed.common.records import config_get, load_record, reply, to_record
from flowerbed.common.seeding import derive_seed, set_seed


class UserPartitioner(Partitioner):
    """Partition ``p`` of ``n`` = the examples of users ``p, p + n, ...`` in order of first
    appearance of the ``label`` column (here: the user id of each example)."""

    def __init__(self, num_partitions: int) -> None:
        super().__init__()
        self._num_partitions = num_partitions

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def load_partition(self, partition_id: int):
        users = np.asarray(self.dataset["label"])
        _, first = np.unique(users, return_index=True)
        mine = users[np.sort(first)][partition_id :: self._num_partitions]
        return self.dataset.select(np.flatnonzero(np.isin(users, mine)).tolist())


@register_partitioner("user")
def _user(num_partitions: int, seed: int, **_):
    return UserPartitioner(num_partitions)


#: every key of the app: the shared schedule, training, device and results fragments, the
#: shared ``partitioner`` and ``data-dir`` keys, and the app's own options
SCHEMA: dict[str, C.Option] = C.compose(
    C.SCHEDULE,
    C.TRAIN,
    C.DEVICE,
    C.RESULTS,
    {k: C.DATA[k] for k in ("partitioner", "data-dir")},
    {
        "method": C.Option("hinge-spreadout"),  # choices from the method table
        "source": C.Option(
            "ml-100k", choices=tuple(D.SOURCES), help="ml-100k (offline) | ml-1m (network)"
        ),
        "max-users": C.Option(0, C.non_negative, "keep the first N user ids (0 = all) >= 0"),
        "max-examples-per-user": C.Option(300, C.positive, "examples per user > 0"),
        "embedding-dim": C.Option(EMBEDDING_DIM, C.positive, "embedding width > 0"),
        "temperature": C.Option(1.0, C.positive, "softmax logits / temperature > 0 (1 = none)"),
        "spreadout-lambda": C.Option(
            SPREADOUT_LAMBDA, C.non_negative, "weight of each spreadout term >= 0"
        ),
        "table-spreadout-lambda": C.Option(
            0.0,
            C.non_negative,
            "whole-item-table spreadout weight >= 0 (hinge-spreadout; 0 = off)",
        ),
        "server-lr": C.Option(1.0, C.positive, "server Adam learning rate > 0"),
        "server-beta1": C.Option(0.9, lambda v: 0 <= v < 1, "Adam beta1 in [0, 1)"),
        "server-beta2": C.Option(0.999, lambda v: 0 <= v < 1, "Adam beta2 in [0, 1)"),
        "server-tau": C.Option(1e-3, C.positive, "Adam epsilon (Flower's tau) > 0"),
    },
    num_server_rounds=20,
    partitioner="user",
    batch_size=16,
    lr=0.01,
)


def parse_config(run_config) -> C.RunConfig:
    """Validate the run config (one line naming a bad key or value) and resolve ``method``."""
    from fedretrieval.methods import METHODS

    schema = {**SCHEMA, "method": METHODS.option("hinge-spreadout")}
    return C.parse(run_config, schema, methods=METHODS)


def split_of(cfg) -> D.Split:
    """The train / validation / test users' examples of this run (IID control by the method)."""
    return D.load_split(
        cfg["source"],
        cfg["seed"],
        bool(cfg.method.flag("iid", False)),
        cfg["max-users"],
        cfg["data-dir"],
        cfg["max-examples-per-user"],
    )


def make_model(cfg) -> DualEncoder:
    """The dual encoder, initialised from the run seed (identical in every process)."""
    set_seed(derive_seed(cfg["seed"], 0xFFFF))
    return DualEncoder(split_of(cfg).num_items, cfg["embedding-dim"])


def initial_arrays(cfg) -> ArrayRecord:
    return to_record(make_model(cfg))


def _tensors(ex: D.Examples) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(ex.context), torch.from_numpy(ex.label)


def loss_options(cfg) -> LossOptions:
    """The loss settings of the run config (``temperature``, ``spreadout-lambda``,
    ``table-spreadout-lambda``)."""
    return LossOptions(cfg["temperature"], cfg["spreadout-lambda"], cfg["table-spreadout-lambda"])


def _sgd(cfg, model, arrays, ex, seed):
    x, y = _tensors(ex)
    return local_sgd(
        model,
        arrays,
        x,
        y,
        seed,
        device=cfg["device"],
        loss_fn=loss_for(cfg.method.flag("loss"), model, loss_options(cfg)),
        epochs=cfg["local-epochs"],
        batch_size=cfg["batch-size"],
        lr=cfg["lr"],
    )


def client_train(msg: Message, context, cfg) -> Message:
    """Each user of this node trains from the received model; the reply is their
    example-weighted mean (= FedAvg over the users), ``num-examples`` their total."""
    pid, n = partition_of(context)
    train = split_of(cfg).train
    idx = partition_indices(train.user, n, cfg["partitioner"], seed=cfg["seed"])[pid]
    mine = D.Examples(train.context[idx], train.label[idx], train.user[idx])
    rnd = int(config_get(msg.content.config_records.get("config"), "server-round", 0))
    model, received = make_model(cfg), msg.content["arrays"]
    total, loss_sum, acc = 0, 0.0, None
    for user in mine.users():
        ex = mine.of_user(int(user))
        seed = derive_seed(cfg["seed"], pid, rnd, int(user))
        new, metrics = _sgd(cfg, model, received, ex, seed)
        w = len(ex)
        sd = {k: torch.from_numpy(v.numpy()).double() * w for k, v in new.items()}
        acc = sd if acc is None else {k: acc[k] + sd[k] for k in acc}
        total += w
        loss_sum += metrics["train_loss"] * w
    mean = {k: (v / total).float() for k, v in acc.items()}
    out = reply(
        to_record(mean),
        **{"num-examples": total, "train_loss": loss_sum / total, "users": len(mine.users())},
    )
    return Message(content=out, reply_to=msg)


def evaluator(cfg):
    """``evaluate(arrays)``: global recall@{1,5,10} and mean rank on the test users
    (``val-`` prefixed: on the validation users)."""
    split = split_of(cfg)
    test, val = _tensors(split.test), _tensors(split.val)
    model = make_model(cfg)

    def evaluate(arrays: ArrayRecord) -> dict[str, float]:
        load_record(model, arrays)
        out = retrieval_metrics(model, *test)
        out.update({f"val-{k}": v for k, v in retrieval_metrics(model, *val).items()})
        return out

    return evaluate


def central_fit(cfg):
    """``fit(round, arrays)`` of the centralized rows: one epoch of the same SGD (batch 16,
    lr 0.01, the same loss) over the pooled train users' examples, seeded by (seed, round)."""
    model = make_model(cfg)

    def fit(server_round: int, arrays: ArrayRecord):
        seed = derive_seed(cfg["seed"], 0xCE, server_round)
        new, metrics = _sgd(cfg, model, arrays, split_of(cfg).train, seed)
        return new, {k: v for k, v in metrics.items() if k != "train-time-s"}

    return fit


def describe(cfg) -> dict[str, Any]:
    """Sizes of the run's data (for the results file)."""
    s = split_of(cfg)
    return {
        "num_items": s.num_items,
        "train_users": len(s.train.users()),
        "train_examples": len(s.train),
        "val_users": len(s.val.users()),
        "test_users": len(s.test.users()),
        "test_examples": len(s.test),
    }
