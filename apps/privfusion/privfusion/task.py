"""PrivFusion app: run-config schema, models, DP-SGD training (Opacus), the hybrid local DP
mechanism, the perturbation filter adapter, and evaluation helpers.

Shared by the ClientApp (parties) and the ServerApp (relay + evaluation harness).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from scipy.stats import norm
from torch import nn

from flowerbed.common import config as C
from flowerbed.common.client import partition_of, partition_tensors, sgd_step
from flowerbed.common.data import DataError, load_dataset
from flowerbed.common.models import MLP
from flowerbed.common.records import load_record, to_record
from flowerbed.common.seeding import derive_seed, set_seed
from flowerbed.common.train import evaluate, get_device
from privfusion.matching import MATCHERS, average_layers

# RDP orders of the accountant: Opacus' defaults extended to large orders, so that the small
# budgets of the activation/adapter shares (epsilon < 0.3 at delta ~ 1e-6) can be certified.
# The large orders are sparse: the RDP of an integer order a costs O(a) to evaluate, and a dense
# grid up to 1024 made the noise calibration take ~10 s per training on this machine.
RDP_ALPHAS = (
    [1 + x / 10.0 for x in range(1, 100)]
    + list(range(12, 64))
    + [64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024]
)


def _hidden_ok(v: str) -> bool:
    try:
        return len(_hidden(v)) >= 1 and all(h > 0 for h in _hidden(v))
    except ValueError:
        return False


def _hidden(v: str) -> tuple[int, ...]:
    return tuple(int(s) for s in v.split(",") if s.strip())


SCHEMA: dict[str, C.Option] = C.compose(
    C.SCHEDULE,
    C.DATA,
    C.DEVICE,
    C.RESULTS,
    {
        "method": C.Option("privfusion"),  # choices from the method table (privfusion.methods)
        "max-samples": C.Option(0, C.non_negative, "cap on each party's samples >= 0 (0 = all)"),
        "test-samples": C.Option(0, C.non_negative, "cap on test samples >= 0 (0 = all)"),
        "hidden": C.Option("32,16", _hidden_ok, 'comma-separated hidden widths, e.g. "32,16"'),
        "local-epochs": C.Option(5, C.positive, "local epochs > 0"),
        "batch-size": C.Option(128, C.positive, "batch size > 0"),
        "lr": C.Option(0.2, C.positive, "learning rate > 0"),
        "momentum": C.Option(0.0, lambda v: 0 <= v < 1, "momentum in [0, 1)"),
        "epsilon": C.Option(8.0, C.non_negative, "per-party budget >= 0 (0 = no privacy)"),
        "delta": C.Option(1e-5, lambda v: 0 < v < 1, "delta in (0, 1)"),
        "act-frac": C.Option(0.1, lambda v: 0 < v < 1, "share of the budget in (0, 1)"),
        "adapter-frac": C.Option(0.1, lambda v: 0 <= v < 1, "share of the budget in [0, 1)"),
        "max-grad-norm": C.Option(1.0, C.positive, "DP-SGD clipping norm > 0"),
        "act-samples": C.Option(2000, C.positive, "records for activation statistics > 0"),
        "matcher": C.Option("hungarian", choices=MATCHERS),
        "act-weight": C.Option(0.5, C.non_negative, "weight of the activation affinity >= 0"),
        "fusing-party": C.Option(0, C.non_negative, "partition id of the fusing party >= 0"),
        "adapter-rank": C.Option(4, C.non_negative, "adapter rank >= 0 (0 = no adapter)"),
        "adapter-epochs": C.Option(1, C.positive, "adapter epochs > 0"),
        "adapter-lr": C.Option(0.1, C.positive, "adapter learning rate > 0"),
        "fedavg-epochs": C.Option(1, C.positive, "FedAvg local epochs > 0"),
        "fedavg-lr": C.Option(0.2, C.positive, "FedAvg learning rate > 0"),
    },
    num_server_rounds=10,
    alpha=1.0,
)


def parse_config(run_config, num_parties: int | None = None) -> C.RunConfig:
    """Validate the run config (one-line :class:`~flowerbed.common.config.ConfigError`).

    With ``num_parties`` (known to the ServerApp once the nodes are up, and to every ClientApp
    from its node config) ``fusing-party`` is checked against it too; both call this before any
    work.
    """
    from privfusion.methods import METHODS

    cfg = C.parse(run_config, {**SCHEMA, "method": METHODS.option("privfusion")}, methods=METHODS)
    if num_parties is not None and cfg["fusing-party"] >= num_parties:
        raise C.ConfigError(
            f"run config fusing-party = {cfg['fusing-party']}: must be a partition id below the "
            f"number of parties ({num_parties})"
        )
    if cfg["act-frac"] + cfg["adapter-frac"] >= 1:
        raise C.ConfigError(
            f"run config act-frac + adapter-frac = {cfg['act-frac'] + cfg['adapter-frac']}: "
            "must be < 1 (the rest is the DP-SGD budget)"
        )
    cfg["hidden-sizes"] = _hidden(cfg["hidden"])
    return cfg


def budget(cfg: dict[str, Any], fusing: bool) -> dict[str, float]:
    """Split of one party's (epsilon, delta) budget; ``inf`` everywhere when epsilon = 0.

    Sequential composition: eps = eps_sgd + eps_act (+ eps_adapter for the fusing party),
    delta split in the same proportions.
    """
    if cfg["epsilon"] == 0:
        return {k: math.inf for k in ("sgd", "act", "adapter")} | {
            f"delta_{k}": 0.0 for k in ("sgd", "act", "adapter")
        }
    fa = cfg["act-frac"]
    fd = cfg["adapter-frac"] if fusing and cfg["adapter-rank"] > 0 else 0.0
    fs = 1.0 - fa - fd
    e, d = cfg["epsilon"], cfg["delta"]
    return {
        "sgd": fs * e,
        "act": fa * e,
        "adapter": fd * e,
        "delta_sgd": fs * d,
        "delta_act": fa * d,
        "delta_adapter": fd * d,
    }


# ------------------------------------------------------------------ data and models
def party_data(cfg: dict[str, Any], pid: int, num_parties: int):
    """This party's train split ``(x, y, num_classes)`` (capped at ``max-samples``)."""
    x, y, nc = partition_tensors(cfg, pid, num_parties)
    if cfg["max-samples"] and len(x) > cfg["max-samples"]:
        g = torch.Generator().manual_seed(derive_seed(cfg["seed"], pid, 0x5A))
        idx = torch.randperm(len(x), generator=g)[: cfg["max-samples"]]
        x, y = x[idx], y[idx]
    return x, y, nc


def test_data(cfg: dict[str, Any]):
    bundle = load_dataset(cfg["dataset"], cfg["data-dir"] or None, mmap=True)
    x, y = bundle.x_test, bundle.y_test
    if cfg["test-samples"]:
        x, y = x[: cfg["test-samples"]], y[: cfg["test-samples"]]
    return torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)), bundle


def make_model(cfg: dict[str, Any], input_shape, num_classes: int, init_seed: int) -> MLP:
    """The MLP, initialised from ``init_seed`` (each party has its own: neurons permuted)."""
    set_seed(init_seed)
    return MLP(math.prod(input_shape), num_classes, hidden=cfg["hidden-sizes"])


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def layers_of(model: nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(W, b), ...]`` of the MLP's linear layers as float64 numpy arrays."""
    return [
        (m.weight.detach().cpu().double().numpy(), m.bias.detach().cpu().double().numpy())
        for m in linears(model)
    ]


def set_layers(model: nn.Module, layers: list[tuple[np.ndarray, np.ndarray]]) -> nn.Module:
    with torch.no_grad():
        for m, (w, b) in zip(linears(model), layers, strict=True):
            m.weight.copy_(torch.as_tensor(np.asarray(w), dtype=torch.float32))
            m.bias.copy_(torch.as_tensor(np.asarray(b), dtype=torch.float32))
    return model


def layers_to_arrays(layers, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for i, (w, b) in enumerate(layers):
        out[f"{prefix}{i}.weight"] = np.asarray(w, dtype=np.float32)
        out[f"{prefix}{i}.bias"] = np.asarray(b, dtype=np.float32)
    return out


def arrays_to_layers(arrays: dict[str, np.ndarray], prefix: str = "") -> list:
    n = sum(1 for k in arrays if k.startswith(prefix) and k.endswith(".weight"))
    return [
        (
            np.asarray(arrays[f"{prefix}{i}.weight"], np.float64),
            np.asarray(arrays[f"{prefix}{i}.bias"], np.float64),
        )
        for i in range(n)
    ]


# ------------------------------------------------------------------ DP-SGD (Opacus)
def sgd_train(
    module: nn.Module,
    params: list[nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    target_epsilon: float = math.inf,
    delta: float = 1e-5,
    max_grad_norm: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Train ``params`` of ``module`` on ``(x, y)``; DP-SGD with Opacus if ``target_epsilon`` is
    finite (RDP accountant, Poisson sampling, flat per-sample clipping at ``max_grad_norm``);
    otherwise plain SGD with the batch gradient's norm clipped at ``max_grad_norm``.

    Returns ``epsilon`` (spent, from Opacus' accountant at ``delta``; inf without DP),
    ``noise_multiplier``, ``sample_rate``, ``steps`` and ``train_loss``.
    """
    from torch.utils.data import DataLoader, TensorDataset

    gen = set_seed(seed)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=min(batch_size, len(x)), shuffle=True, generator=gen
    )
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    engine = None
    model = module
    if math.isfinite(target_epsilon):
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        model, opt, loader = engine.make_private_with_epsilon(
            module=module,
            optimizer=opt,
            data_loader=loader,
            target_epsilon=target_epsilon,
            target_delta=delta,
            epochs=epochs,
            max_grad_norm=max_grad_norm,
            alphas=RDP_ALPHAS,
        )
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    steps, total = 0, 0.0
    for _ in range(epochs):
        for xb, yb in loader:
            if len(xb) == 0:  # Poisson sampling can draw an empty batch
                continue
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            if engine is None:  # no privacy: the same clipping bound on the batch gradient, no
                # noise (keeps the large DP-SGD learning rate stable without DP)
                nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            steps += 1
            total += float(loss.detach())
    info = {"steps": steps, "train_loss": total / max(steps, 1)}
    if engine is None:
        return info | {"epsilon": math.inf, "noise_multiplier": 0.0, "sample_rate": 0.0}
    info |= {
        "epsilon": float(engine.accountant.get_epsilon(delta, alphas=RDP_ALPHAS)),
        "noise_multiplier": float(opt.noise_multiplier),
        "sample_rate": float(1.0 / len(loader)),
        "accountant_steps": int(sum(h[2] for h in engine.accountant.history)),
    }
    if hasattr(model, "remove_hooks"):  # the GradSampleModule's hooks on ``module``
        model.remove_hooks()
    return info


def train_party(cfg: dict[str, Any], pid: int, num_parties: int) -> tuple[MLP, dict[str, float]]:
    """Party ``pid``'s local model (own init seed, own data), DP-SGD at its ``sgd`` budget."""
    x, y, nc = party_data(cfg, pid, num_parties)
    if len(x) < 2:
        raise DataError(f"party {pid} has {len(x)} samples; use fewer parties or more data")
    model = make_model(cfg, x.shape[1:], nc, derive_seed(cfg["seed"], pid, 1))
    b = budget(cfg, pid == cfg["fusing-party"])
    info = sgd_train(
        model,
        list(model.parameters()),
        x,
        y,
        epochs=cfg["local-epochs"],
        batch_size=cfg["batch-size"],
        lr=cfg["lr"],
        momentum=cfg["momentum"],
        target_epsilon=b["sgd"],
        delta=b["delta_sgd"],
        max_grad_norm=cfg["max-grad-norm"],
        seed=derive_seed(cfg["seed"], pid, 2),
    )
    return model, info | {"num-examples": len(x)}


# ------------------------------------------------------------------ activation statistics (LDP)
def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest sigma of the Gaussian mechanism that is (epsilon, delta)-DP for L2
    ``sensitivity`` (analytic Gaussian mechanism, Balle & Wang, ICML 2018, Thm 8).
    """
    if not math.isfinite(epsilon):
        return 0.0

    def delta_of(s: float) -> float:
        a = sensitivity / (2 * s)
        b = epsilon * s / sensitivity
        return float(norm.cdf(a - b) - math.exp(epsilon) * norm.cdf(-a - b))

    lo, hi = 1e-6 * sensitivity, sensitivity
    while delta_of(hi) > delta:
        hi *= 2
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@torch.no_grad()
def hidden_activations(model: MLP, x: torch.Tensor) -> list[torch.Tensor]:
    """Post-ReLU activations of each hidden layer, ``[(n, h_l), ...]``."""
    out, h = [], x.flatten(1)
    lin = linears(model)
    for m in lin[:-1]:
        h = torch.relu(m(h))
        out.append(h)
    return out


def activation_stats(
    model: MLP,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    num_samples: int,
    epsilon: float,
    delta: float,
    seed: int,
) -> tuple[list[np.ndarray], np.ndarray, dict[str, float]]:
    """Perturbed class-conditional activation profiles of a party's hidden neurons.

    On ``m = min(num_samples, n)`` of the party's own records: each record's activation vector of
    each hidden layer is normalised to unit L2 norm and added to the row of its class; the class
    counts are kept too. One record changes the released sums by at most
    ``sqrt(L + 1)`` in L2 (add/remove neighbours; ``L`` layers plus the count), so Gaussian noise of
    the analytic Gaussian mechanism at ``(epsilon, delta)`` and that sensitivity is added to
    every sum and count. Returns per layer a ``(h_l, num_classes)`` array: neuron ``a``'s noisy mean
    activation per class (counts floored at 1), and the noisy class counts (released too: the
    matcher uses them to leave out classes a party has (almost) no records of, whose noisy means
    are pure noise).
    """
    g = torch.Generator().manual_seed(seed)
    m = min(num_samples, len(x))
    idx = torch.randperm(len(x), generator=g)[:m]
    acts = hidden_activations(model, x[idx])
    labels = y[idx].numpy()
    sens = math.sqrt(len(acts) + 1)
    sigma = analytic_gaussian_sigma(epsilon, delta, sens)
    rng = np.random.default_rng(seed)
    onehot = np.eye(num_classes)[labels]  # (m, C)
    counts = onehot.sum(0) + (rng.normal(0.0, sigma, num_classes) if sigma else 0.0)
    counts = np.maximum(counts, 1.0)
    out = []
    for a in acts:
        a = (a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)).double().numpy()
        s = a.T @ onehot  # (h, C) per-class sums
        if sigma:
            s = s + rng.normal(0.0, sigma, size=s.shape)
        out.append(s / counts[None, :])
    info = {"act_sigma": sigma, "act_samples": m, "act_sensitivity": sens}
    return out, counts, info


def reliable_classes(counts_a, counts_b, sigma: float, min_count: float = 5.0) -> np.ndarray:
    """Classes whose noisy activation means are informative in both packages.

    A class is kept when both parties' noisy counts are at least ``max(min_count, 3 * sigma)``:
    with fewer records the released mean is dominated by the Gaussian noise (its standard
    deviation is ``sigma / count`` against activations of unit-norm vectors). Post-processing of
    released values only (``sigma`` follows from the public run config).
    """
    thr = max(min_count, 3.0 * sigma)
    return (np.asarray(counts_a) >= thr) & (np.asarray(counts_b) >= thr)


def act_sigma(cfg: dict[str, Any], num_layers: int) -> float:
    """Noise std of the released activation sums (public: follows from the run config)."""
    b = budget(cfg, fusing=False)
    return analytic_gaussian_sigma(b["act"], b["delta_act"], math.sqrt(num_layers + 1))


# ------------------------------------------------------------------ perturbation filter adapter
class AdaptedMLP(nn.Module):
    """Fused MLP (frozen) with a low-rank residual adapter after each hidden layer.

    ``h <- h + up(down(h))`` with ``down: h_l -> r``, ``up: r -> h_l``, ``up`` initialised to
    zero, so the adapter starts as the identity. Only the adapters are trained.
    """

    def __init__(self, base: MLP, rank: int):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        lin = linears(base)
        self.down = nn.ModuleList(nn.Linear(m.out_features, rank, bias=False) for m in lin[:-1])
        self.up = nn.ModuleList(nn.Linear(rank, m.out_features, bias=False) for m in lin[:-1])
        for u in self.up:
            nn.init.zeros_(u.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin = linears(self.base)
        h = x.flatten(1)
        for m, d, u in zip(lin[:-1], self.down, self.up, strict=True):
            h = torch.relu(m(h))
            h = h + u(d(h))
        return lin[-1](h)


def train_adapter(
    cfg: dict[str, Any], fused: MLP, pid: int, num_parties: int
) -> tuple[nn.Module, dict[str, float]]:
    """Train the adapter on the fusing party's own data, DP-SGD at its ``adapter`` budget."""
    x, y, _ = party_data(cfg, pid, num_parties)
    model = AdaptedMLP(fused, cfg["adapter-rank"])
    b = budget(cfg, fusing=True)
    params = [p for p in model.parameters() if p.requires_grad]
    info = sgd_train(
        model,
        params,
        x,
        y,
        epochs=cfg["adapter-epochs"],
        batch_size=cfg["batch-size"],
        lr=cfg["adapter-lr"],
        target_epsilon=b["adapter"],
        delta=b["delta_adapter"],
        max_grad_norm=cfg["max-grad-norm"],
        seed=derive_seed(cfg["seed"], pid, 3),
    )
    return model, info


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    model.eval()
    return torch.cat([torch.softmax(model(x[i : i + batch]), 1) for i in range(0, len(x), batch)])


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    return float((probs.argmax(1) == y).float().mean())


# ------------------------------------------------------------------ records, harness, baseline
def layers_record(layers) -> ArrayRecord:
    """``[(W, b), ...]`` as the ArrayRecord the protocol releases (``"<i>.weight"``, float32)."""
    return ArrayRecord({k: torch.from_numpy(v) for k, v in layers_to_arrays(layers).items()})


def record_layers(record: ArrayRecord) -> list[tuple[np.ndarray, np.ndarray]]:
    """Inverse of :func:`layers_record` (float64 layers)."""
    return arrays_to_layers({k: v.numpy() for k, v in record.items()})


def initial_arrays(cfg: dict[str, Any], one_shot: bool) -> ArrayRecord:
    """The server's model template (init seed 0): layer arrays for the one-shot protocol (the
    strategy checks replies against it), the state dict for the FedAvg baseline."""
    bundle = load_dataset(cfg["dataset"], cfg["data-dir"] or None, mmap=True)
    model = make_model(cfg, bundle.input_shape, bundle.num_classes, 0)
    return layers_record(layers_of(model)) if one_shot else to_record(model)


def global_evaluator(cfg: dict[str, Any]):
    """``evaluate_fn(round, arrays)`` of the FedAvg baseline on the test split."""
    x, y, bundle = test_data(cfg)
    model = make_model(cfg, bundle.input_shape, bundle.num_classes, 0)
    device = get_device(cfg["device"])

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        return MetricRecord(evaluate(load_record(model, arrays), x, y, device=device))

    return evaluate_fn


def fusion_evaluator(cfg: dict[str, Any]):
    """The experiment's evaluation harness on the test split (injected into the strategy):
    each party's released model, the output ensemble (mean of softmax outputs), plain weight
    averaging without matching, matched fusion, and PrivFusion (matched fusion + adapter)."""
    x, y, bundle = test_data(cfg)

    def model_of(layers) -> MLP:
        return set_layers(make_model(cfg, bundle.input_shape, bundle.num_classes, 0), layers)

    def evaluate_fusion(parties, fused: ArrayRecord, adapted: ArrayRecord | None):
        pids = sorted(parties)
        layers = [record_layers(parties[p]) for p in pids]
        probs = [predict_proba(model_of(ls), x) for ls in layers]
        party_acc = {p: accuracy(pr, y) for p, pr in zip(pids, probs, strict=True)}
        matched = model_of(record_layers(fused))
        matched_acc = accuracy(predict_proba(matched, x), y)
        fusion_acc = matched_acc
        if adapted is not None:
            model = load_record(AdaptedMLP(matched, cfg["adapter-rank"]), adapted)
            fusion_acc = accuracy(predict_proba(model, x), y)
        return {
            "privfusion_accuracy": fusion_acc,
            "matched_accuracy": matched_acc,
            "averaging_accuracy": accuracy(predict_proba(model_of(average_layers(layers)), x), y),
            "ensemble_accuracy": accuracy(sum(probs) / len(probs), y),
            "party_best_accuracy": max(party_acc.values()),
            "party_mean_accuracy": float(np.mean(list(party_acc.values()))),
            **{f"party{p}_accuracy": a for p, a in party_acc.items()},
        }

    return evaluate_fusion


def fedavg_client(msg, context, cfg: dict[str, Any]):
    """The FedAvg baseline's client step: the shared SGD step (plain SGD, no clipping, seeded
    by (seed, partition, round)) from the global model on this party's data."""
    pid, n = partition_of(context)
    x, y, nc = party_data(cfg, pid, n)
    model = make_model(cfg, x.shape[1:], nc, 0)
    sgd = {"epochs": cfg["fedavg-epochs"], "lr": cfg["fedavg-lr"], "momentum": cfg["momentum"]}
    batch = cfg["batch-size"]
    return sgd_step(msg, context, model, x, y, cfg["seed"], cfg["device"], batch_size=batch, **sgd)
