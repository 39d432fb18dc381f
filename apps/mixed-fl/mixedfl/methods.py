"""The Mixed FL app's method table: the paper's three algorithms, then the baselines of the
blending comparison (FedAvg on the clients' data, server-only, the oracle), then the offloading
scenario (the spreadout regulariser at the server, and the baseline that computes it on every
client; flag ``scenario = "offload"``)."""

from __future__ import annotations

from flowerbed.common.methods import Method, MethodTable
from flowerbed.strategies.baselines import baseline_methods, guard_kwargs, make_centralized
from flowerbed.strategies.mixed_fl import MixedFL
from flowerbed.strategies.mixed_fl_offload import make_offload
from mixedfl import offload
from mixedfl.task import client_train


def make_mixed(cfg, server_data, algorithm: str, **_) -> MixedFL:
    """:class:`~flowerbed.strategies.mixed_fl.MixedFL` from the run config."""
    return MixedFL(
        server_data,
        algorithm=algorithm,
        w_f=cfg["w-f"],
        w_c=cfg["w-c"],
        server_lr=cfg["server-lr"],
        **guard_kwargs(cfg),
    )


def _mixed(name: str, kind: str, help: str) -> Method:
    return Method(
        name,
        kind,
        help,
        strategy=lambda cfg, **ctx: make_mixed(cfg, algorithm=name, **ctx),
        client=client_train,
        flags={"server-data": True},
    )


METHODS = MethodTable(
    _mixed("parallel", "paper", "PARALLEL TRAINING: FedAvg round and K_c server steps, combined"),
    _mixed("1-way", "paper", "1-WAY GRADIENT TRANSFER: g_c sent down, added to every client step"),
    _mixed(
        "2-way",
        "reconstruction",
        "2-WAY GRADIENT TRANSFER: 1-way plus client gradients up, added to the server steps",
    ),
    *baseline_methods("fedavg", client=client_train),
    Method(
        "server-only",
        "baseline",
        "centralized on the server's datacenter data only (no messages)",
        strategy=make_centralized,
        flags={"central-data": "server"},
    ),
    Method(
        "oracle",
        "baseline",
        "centralized on everything: the clients' data and the server's pooled (no messages)",
        strategy=make_centralized,
        flags={"central-data": "all"},
    ),
    Method(
        "offload",
        "paper",
        "offloading: spreadout f_c on the item table at the server; clients get and return "
        "only their own rows (PARALLEL TRAINING, sparse)",
        strategy=lambda cfg, **ctx: make_offload(cfg, mode="offload", **ctx),
        client=offload.client_train,
        flags={"scenario": "offload"},
    ),
    Method(
        "offload-baseline",
        "baseline",
        "no offloading: every client downloads the whole item table and adds the spreadout "
        "f_c to its loss (FedAvg)",
        strategy=lambda cfg, **ctx: make_offload(cfg, mode="baseline", **ctx),
        client=offload.client_train,
        flags={"scenario": "offload"},
    ),
)
