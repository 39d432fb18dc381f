"""FedIDM app: run-config schema, model, data, the client steps (shared SGD step, plus the
condensed synthetic set of FedIDM), the server-side training on condensed / root data, and the
stability and detection numbers of a run.

The attacks are the shared suite (:mod:`flowerbed.common.attacks`, run-config fragment
``ATTACK``): label flipping in the client step here, model poisoning by the server-side wrapper.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

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
    C.ATTACK,
    C.PARTICIPATION,  # participation-gap evaluation (issue 16), off by default
    {
        "method": C.Option("fedidm"),  # choices from the method table (fedidm.methods)
        "model": C.Option("mlp", choices=MODELS),
        "local-steps": C.Option(20, C.non_negative, "step cap >= 0 (0 = none)"),
        # --- FedIDM (Reconstruction, see README)
        "ipc": C.Option(5, C.positive, "synthetic images per class per client > 0"),
        "dm-steps": C.Option(50, C.positive, "distribution-matching iterations > 0"),
        "dm-lr": C.Option(1.0, C.positive, "pixel learning rate of distribution matching > 0"),
        "dm-embed-dim": C.Option(128, C.positive, "width of the random embedders > 0"),
        "server-steps": C.Option(10, C.positive, "SGD steps of g_0 on the condensed set > 0"),
        "tau-cos": C.Option(0.0, lambda v: -1 <= v <= 1, "cosine threshold in [-1, 1]"),
        "mad-c": C.Option(5.0, C.non_negative, "loss threshold median + c * MAD, c >= 0"),
        "clip": C.Option(False, help="clip accepted updates to ||g_0||"),
        "fallback": C.Option("condensed", choices=("condensed", "keep"), help="all rejected"),
        "rectify": C.Option("client", choices=("client", "sample", "none"), help="rectification"),
        "finetune": C.Option(True, help="server trains the aggregate on the condensed set"),
        "finetune-from": C.Option(1, C.positive, "first round of finetune > 0 (2: not round 1)"),
        # --- baselines
        "root-size": C.Option(100, C.positive, "FLTrust clean root set size > 0"),
        "trim-beta": C.Option(0.2, lambda v: 0 <= v < 0.5, "FedTrimmedAvg beta in [0, 0.5)"),
    },
    num_server_rounds=30,
    dataset="fashion_mnist",
    partitioner="dirichlet",
    alpha=0.5,
    lr=0.05,
)


def parse_config(run_config) -> C.RunConfig:
    """Validate the run config (one line naming a bad key or value) and resolve ``method``."""
    from fedidm.methods import METHODS

    return C.parse(run_config, {**SCHEMA, "method": METHODS.option("fedidm")}, methods=METHODS)


def _bundle(cfg):
    return load_dataset(cfg["dataset"], cfg["data-dir"] or None, mmap=True)


def make_model(cfg: dict[str, Any]) -> torch.nn.Module:
    """The model, initialised from the run seed (identical in every process)."""
    bundle = _bundle(cfg)
    set_seed(derive_seed(cfg["seed"], 0xFFFF))
    return build_model(cfg["model"], tuple(bundle.input_shape), bundle.num_classes)


def initial_arrays(cfg) -> ArrayRecord:
    return to_record(make_model(cfg))


def train_kwargs(cfg) -> dict[str, Any]:
    return {
        "epochs": cfg["local-epochs"],
        "batch_size": cfg["batch-size"],
        "lr": cfg["lr"],
        "max_steps": cfg["local-steps"] or None,
    }


def client_data(cfg, context):
    """This node's train split, labels flipped when it is a label-flip attacker."""
    pid, n = partition_of(context)
    x, y, num_classes = partition_tensors(cfg, pid, n)
    return x, poison_labels(cfg, pid, n, y, num_classes), num_classes


def client_train(msg, context, cfg):
    """The client step of the baselines: the shared SGD step on this partition."""
    x, y, _ = client_data(cfg, context)
    return sgd_step(
        msg, context, make_model(cfg), x, y, cfg["seed"], cfg["device"], **train_kwargs(cfg)
    )


# ---------------------------------------------------------------------------- condensation
def condense(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    ipc: int,
    steps: int,
    lr: float,
    seed: int,
    embed_dim: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """Distribution matching (Zhao & Bilen's DM, as FedDM uses it; Reconstruction for FedIDM).

    ``ipc`` synthetic images per class present in ``y``, initialised from random real images of
    the class, moved by SGD on the pixels (``lr``) to minimise
    ``sum_c || mean phi(x_c) - mean phi(s_c) ||^2`` with a fresh random embedder
    ``phi(v) = relu(v W)``, ``W ~ N(0, 1/d)``, at every step; pixels are kept in the range of
    the real data. Seeded by ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    xf = x.reshape(len(x), -1).float()
    classes = [c for c in range(num_classes) if bool((y == c).any())]
    syn, labels = [], []
    for c in classes:
        idx = torch.nonzero(y == c).flatten()
        pick = idx[torch.randint(len(idx), (ipc,), generator=gen)]
        syn.append(xf[pick].clone())
        labels += [c] * ipc
    s = torch.cat(syn).requires_grad_(True)
    lab = torch.tensor(labels)
    opt = torch.optim.SGD([s], lr=lr, momentum=0.5)
    d, lo, hi = xf.shape[1], float(xf.min()), float(xf.max())
    for _ in range(steps):
        w = torch.randn(d, embed_dim, generator=gen) / math.sqrt(d)
        loss = torch.zeros(())
        for c in classes:
            real = xf[y == c]
            if len(real) > 256:
                real = real[torch.randint(len(real), (256,), generator=gen)]
            loss = (
                loss + ((real @ w).relu().mean(0) - (s[lab == c] @ w).relu().mean(0)).pow(2).sum()
            )
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            s.clamp_(lo, hi)
    shape = (len(lab), *x.shape[1:])
    return s.detach().reshape(shape).numpy().astype(np.float32), lab.numpy().astype(np.int64)


def client_train_idm(msg, context, cfg):
    """FedIDM's client step: the shared SGD step, plus this node's condensed synthetic set
    (``synthetic``: ``x``, ``y``), seeded by (seed, partition, round)."""
    x, y, num_classes = client_data(cfg, context)
    out = sgd_step(
        msg, context, make_model(cfg), x, y, cfg["seed"], cfg["device"], **train_kwargs(cfg)
    )
    pid, _ = partition_of(context)
    rnd = int(msg.content["config"].get("server-round", 0))
    sx, sy = condense(
        x,
        y,
        num_classes,
        cfg["ipc"],
        cfg["dm-steps"],
        cfg["dm-lr"],
        derive_seed(cfg["seed"], pid, rnd, 0xD1),
        cfg["dm-embed-dim"],
    )
    out.content["synthetic"] = ArrayRecord({"x": Array(sx), "y": Array(sy)})
    return out


# ---------------------------------------------------------------------------- server side
def server_fns(cfg):
    """``(train_fn, loss_fn, predict_fn)`` of FedIDM's server (torch, on the run's device)."""
    model, device = make_model(cfg), get_device(cfg["device"])

    def train_fn(server_round, arrays, x, y):
        seed = derive_seed(cfg["seed"], 0x1D, server_round)
        kw = {**train_kwargs(cfg), "max_steps": cfg["server-steps"], "epochs": 10**6}
        new, _ = local_sgd(
            model,
            arrays,
            torch.from_numpy(x),
            torch.from_numpy(y),
            seed,
            device=cfg["device"],
            **kw,
        )
        return new

    def loss_fn(arrays, x, y):
        return evaluate(
            load_record(model, arrays), torch.from_numpy(x), torch.from_numpy(y), device=device
        )["loss"]

    def predict_fn(arrays, x):
        m = load_record(model, arrays).to(device).eval()
        with torch.no_grad():
            return m(torch.from_numpy(x).to(device)).argmax(1).cpu().numpy()

    return train_fn, loss_fn, predict_fn


def root_update(cfg):
    """FLTrust's ``server_update(round, arrays)``: the local SGD step on a clean root set of
    ``root-size`` train images drawn by the seed."""
    bundle = _bundle(cfg)
    rng = np.random.default_rng(derive_seed(cfg["seed"], 0x7007))
    idx = np.sort(rng.choice(len(bundle.y_train), size=cfg["root-size"], replace=False))
    x, y = (
        torch.from_numpy(bundle.x_train[idx].copy()),
        torch.from_numpy(bundle.y_train[idx].copy()),
    )
    model = make_model(cfg)

    def server_update(server_round, arrays):
        seed = derive_seed(cfg["seed"], 0x7007, server_round)
        new, _ = local_sgd(model, arrays, x, y, seed, device=cfg["device"], **train_kwargs(cfg))
        return new

    return server_update


def evaluator(cfg):
    """``evaluate(arrays) -> {"loss", "accuracy"}`` on the dataset's test split."""
    bundle = _bundle(cfg)
    x, y = torch.from_numpy(bundle.x_test.copy()), torch.from_numpy(bundle.y_test.copy())
    model, device = make_model(cfg), get_device(cfg["device"])
    return lambda arrays: evaluate(load_record(model, arrays), x, y, device=device)


def run_summary(accuracies: list[float], history: dict[int, dict], last: int = 10) -> dict:
    """Final accuracy, the std of the accuracy over the last ``last`` rounds (stability), and
    the mean detection precision / recall over the rounds that report them."""
    out = {"acc_std_last10": float(np.std(accuracies[-last:])) if accuracies else float("nan")}
    for key in ("detect_precision", "detect_recall"):
        vals = [r[key] for r in history.values() if key in r]
        if vals:
            out[key] = float(np.mean(vals))
    return out


def detection_counts(rounds: list[dict]) -> dict[str, int]:
    """Detection counts pooled over the rounds of one run (rows of ``results.json`` that carry
    ``rejected_nodes`` and ``malicious_nodes``): true positives (attackers rejected), false
    positives (benign clients rejected), false negatives (attackers accepted), and the number of
    attacker / benign updates seen. Unlike the per-round mean in ``final`` (a round that rejects
    no one has precision 1.0), these give precision = tp / (tp + fp) over all rejections."""
    out = dict.fromkeys(("tp", "fp", "fn", "attacker_updates", "benign_updates", "rounds"), 0)
    for r in rounds:
        if "rejected_nodes" not in r or "malicious_nodes" not in r:
            continue
        rejected, bad = set(r["rejected_nodes"]), set(r["malicious_nodes"])
        seen = r.get("num_train_replies", len(bad))
        out["tp"] += len(rejected & bad)
        out["fp"] += len(rejected - bad)
        out["fn"] += len(bad - rejected)
        out["attacker_updates"] += len(bad)
        out["benign_updates"] += seen - len(bad)
        out["rounds"] += 1
    return out
