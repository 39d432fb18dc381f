"""FedBone: federated multi-task learning by split learning and conflict-aware aggregation.

Chen, Zhang, Jiang, Chen, Gao and Huang, "FedBone: Towards Large-Scale Federated Multi-Task
Learning", Journal of Computer Science and Technology 39(5):1040-1057, 2024 (arXiv:2306.17465).
No official code; only the abstracts and third-party summaries were available
(``../shared/papers/fedbone.md``).

Each client holds a patch embedding, a task-adaptation module and a task head; the server holds
the large general model G. One split step (:meth:`FedBone.run_round` runs ``steps`` of them per
round, every client in each exchange, so the heterogeneous tasks run concurrently):

``train.embed``
    every client sends the patch embeddings ``e_k`` of its batch (embeddings up);
``train.head``
    the server runs ``F_k = G(e_k)`` and sends ``F_k`` (features down); the client runs its
    adaptation module and head, its task loss, backward, steps them and replies ``dL_k/dF_k``
    (feature gradients up);
``train.back``
    the server backpropagates each ``dL_k/dF_k`` through G (one gradient ``g_k`` of G's weights
    per client, kept apart) and sends ``dL_k/de_k`` (embedding gradients down); the client steps
    its patch embedding. The server combines the ``g_k`` with :func:`gp_aggregate` and takes one
    optimizer step on G.

At the end of a round, ``train.evalembed`` / ``train.evalhead`` evaluate every client's task on
its held-out images through the same split (per-task metrics, averaged per key).

GPAggregation (:func:`gp_aggregate`), From the paper (via summaries) unless marked:

1. attention rescaling against the history of aggregated gradients
   (:func:`attention_weights`, **Reconstruction**: ``alpha = softmax_k(cos(g_k, h))`` with ``h``
   an exponential moving average of past aggregated gradients, ``g_k <- K alpha_k g_k``;
   ``alpha_k = 1/K`` when there is no history);
2. conflict test: ``g_i`` and ``g_j`` conflict when ``cos(g_i, g_j) < 0``
   (:func:`conflict_rate` is the share of pairs in conflict);
3. PCGrad projection (Yu et al., NeurIPS 2020, :func:`pcgrad`): for each ``i``, against every
   other ``j`` in a seeded random order, ``g_i <- g_i - (g_i . g_j / ||g_j||^2) g_j`` when
   ``g_i . g_j < 0`` (``g_j`` the original, not the projected, gradient, as in PCGrad);
4. the mean of the results is the gradient of one optimizer step on G.

The server's G is an injected :class:`GeneralModel` (the app's model code), so this module needs
no model library. Replies are validated with named reasons (:func:`check_tensor`): a rejected
reply is left out of the step, its client contributes no gradient to G.
"""

from __future__ import annotations

from collections.abc import Sequence
from logging import INFO, WARNING
from typing import Protocol as TypingProtocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log

from flowerbed.common.protocol import PhasedStrategy, Protocol, RoundOutcome, wait_for_nodes
from flowerbed.common.seeding import derive_seed, sample_partitions
from flowerbed.strategies.fedavg import query_partitions

EMBED, HEAD, BACK = "train.embed", "train.head", "train.back"
EVAL_EMBED, EVAL_HEAD = "train.evalembed", "train.evalhead"
STEP_PHASES = (EMBED, HEAD, BACK)
COMPUTE_KEY = "compute-s"


class FedBoneError(RuntimeError):
    """A round in which no client returned a valid feature gradient (G cannot step)."""


# ---------------------------------------------------------------------------- GPAggregation
def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def attention_weights(grads: Sequence[np.ndarray], history: np.ndarray | None) -> np.ndarray:
    """Attention of each client gradient to the history (Reconstruction).

    Parameters
    ----------
    grads : sequence of 1-D arrays
        The clients' gradients ``g_k`` of the general model (flattened).
    history : 1-D array or None
        The history of aggregated gradients (an EMA of past steps' aggregates); None before the
        first step.

    Returns
    -------
    np.ndarray
        ``alpha_k = exp(c_k) / sum_j exp(c_j)`` with ``c_k = cos(g_k, history)``: positive,
        summing to one, larger for gradients aligned with the history; ``1/K`` each without
        history.
    """
    k = len(grads)
    if k == 0:
        raise ValueError("attention_weights: no gradient")
    if history is None or not np.any(history):
        return np.full(k, 1.0 / k)
    c = np.array([_cos(g, history) for g in grads])
    e = np.exp(c - c.max())
    return e / e.sum()


def conflict_rate(grads: Sequence[np.ndarray]) -> float:
    """Share of the ``K(K-1)/2`` client pairs whose gradients conflict (``cos < 0``); 0 for
    fewer than two gradients."""
    k = len(grads)
    if k < 2:
        return 0.0
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    return sum(_cos(grads[i], grads[j]) < 0 for i, j in pairs) / len(pairs)


def pcgrad(grads: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """PCGrad projection of conflicting gradients (Yu et al., NeurIPS 2020, Algorithm 1).

    For each ``i``, against every ``j != i`` in a random order (``rng``):
    ``g_i <- g_i - (g_i . g_j / ||g_j||^2) g_j`` when ``g_i . g_j < 0``, with ``g_j`` the
    original gradient. Gradients that conflict with no other are returned unchanged.
    """
    orig = [np.asarray(g, dtype=np.float64) for g in grads]
    out = []
    for i, g in enumerate(orig):
        p = g.copy()
        others = [j for j in range(len(orig)) if j != i]
        for j in rng.permutation(others) if others else []:
            dot = float(np.dot(p, orig[j]))
            nn = float(np.dot(orig[j], orig[j]))
            if dot < 0 and nn > 0:
                p = p - (dot / nn) * orig[j]
        out.append(p)
    return out


def gp_aggregate(
    grads: Sequence[np.ndarray],
    history: np.ndarray | None,
    attention: bool = True,
    projection: bool = True,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, dict]:
    """GPAggregation: attention rescaling, conflict projection, mean.

    Parameters
    ----------
    grads : sequence of 1-D arrays
        The clients' gradients of the general model.
    history : 1-D array or None
        History of aggregated gradients (see :func:`attention_weights`).
    attention : bool, default True
        Rescale ``g_k <- K alpha_k g_k`` (False: plain gradients).
    projection : bool, default True
        PCGrad projection of conflicting pairs (False: none).
    rng : numpy Generator or None, default None
        Order of the projections (default: seed 0).

    Returns
    -------
    (np.ndarray, dict)
        The aggregated gradient (float64) and ``{"conflict_rate", "alpha", "pc_change",
        "pc_cos", "cancel", "cos"}``: the conflict rate of the gradients that are projected
        (after rescaling, which keeps the signs of the cosines), the attention weights and
        :func:`projection_effect` of those gradients (computed with or without ``projection``).
    """
    if not grads:
        raise ValueError("gp_aggregate: no gradient")
    k = len(grads)
    gs = [np.asarray(g, dtype=np.float64) for g in grads]
    alpha = attention_weights(gs, history) if attention else np.full(k, 1.0 / k)
    if attention:
        gs = [k * a * g for a, g in zip(alpha, gs, strict=True)]
    rate = conflict_rate(gs)
    plain = np.mean(gs, axis=0)
    # the projection is computed for every method (the diagnostics below); without the switch
    # its result is not used (the rng drives nothing else, so the runs are unchanged)
    projected = np.mean(pcgrad(gs, rng if rng is not None else np.random.default_rng(0)), axis=0)
    info = {"conflict_rate": rate, "alpha": alpha.tolist()}
    info.update(projection_effect(gs, plain, projected))
    return (projected if projection else plain), info


def pairwise_cosines(grads: Sequence[np.ndarray]) -> list[float]:
    """``cos(g_i, g_j)`` of every pair ``i < j`` in the order (0, 1), (0, 2), ..., (1, 2), ...
    (0 for a zero gradient, as :func:`conflict_rate`)."""
    k = len(grads)
    return [_cos(grads[i], grads[j]) for i in range(k) for j in range(i + 1, k)]


def projection_effect(
    grads: Sequence[np.ndarray], plain: np.ndarray, projected: np.ndarray
) -> dict[str, float | list[float]]:
    """How much PCGrad changes one step (the diagnostics of why projection does or does not help).

    Parameters
    ----------
    grads : sequence of 1-D arrays
        The gradients that are (or would be) projected.
    plain, projected : 1-D arrays
        Their plain mean and the mean of their PCGrad projections.

    Returns
    -------
    dict
        ``pc_change = ||projected - plain|| / ||plain||`` (the relative size of the change
        projection makes to the step; 0 when ``plain`` is zero), ``pc_cos = cos(projected,
        plain)``, ``cancel = ||plain|| / mean_k ||g_k||`` (1 when the clients agree, near 0 when
        their gradients cancel) and ``cos``, the pairwise cosines (:func:`pairwise_cosines`).
    """
    norm = float(np.linalg.norm(plain))
    mean_norm = float(np.mean([np.linalg.norm(g) for g in grads]))
    return {
        "pc_change": float(np.linalg.norm(projected - plain)) / norm if norm > 0 else 0.0,
        "pc_cos": _cos(projected, plain),
        "cancel": norm / mean_norm if mean_norm > 0 else 0.0,
        "cos": pairwise_cosines(grads),
    }


def update_history(history: np.ndarray | None, g: np.ndarray, beta: float) -> np.ndarray:
    """EMA of aggregated gradients: ``h <- beta h + (1 - beta) g`` (``g`` itself at the first
    step; ``beta = 0`` keeps only the last aggregate, the paper note's default)."""
    if history is None:
        return np.asarray(g, dtype=np.float64).copy()
    return beta * history + (1.0 - beta) * np.asarray(g, dtype=np.float64)


def step_diagnostics(diags: Sequence[dict]) -> dict:
    """A round's per-step projection diagnostics (the ``diag`` of each step) as results.json
    keys: ``pc_change_steps``, ``pc_cos_steps``, ``cancel_steps`` (one value per step),
    ``cos_steps`` (the pairwise cosines of each step), ``grad_norm_steps`` (each client's
    ``||g_k||`` per step), and ``grad_tasks`` / ``pair_tasks`` (the task of each gradient and of
    each pair, ``"a|b"``, from the last step: the order of the lists above)."""
    if not diags:
        return {}

    def r4(v):
        return [round(float(x), 4) for x in v]

    tasks = diags[-1]["tasks"]
    k = len(tasks)
    return {
        "pc_change_steps": r4(d["pc_change"] for d in diags),
        "pc_cos_steps": r4(d["pc_cos"] for d in diags),
        "cancel_steps": r4(d["cancel"] for d in diags),
        "cos_steps": [r4(d["cos"]) for d in diags],
        "grad_norm_steps": [r4(d["grad_norm"]) for d in diags],
        "grad_tasks": list(tasks),
        "pair_tasks": [f"{tasks[i]}|{tasks[j]}" for i in range(k) for j in range(i + 1, k)],
    }


def mean_by_key(records: Sequence[RecordDict], weight_key: str = "num-examples") -> MetricRecord:
    """Per-key weighted mean of the ``metrics`` of replies that need not share their keys (each
    client reports its own task's metric); ``weight_key`` summed. Usable as Flower FedAvg's
    ``evaluate_metrics_aggr_fn`` / ``train_metrics_aggr_fn``."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    total = 0.0
    for rec in records:
        m = rec["metrics"]
        w = float(m.get(weight_key, 1))
        total += w
        for key, v in m.items():
            if key == weight_key or not isinstance(v, int | float):
                continue
            sums[key] = sums.get(key, 0.0) + w * float(v)
            weights[key] = weights.get(key, 0.0) + w
    out = {k: sums[k] / weights[k] for k in sorted(sums) if weights[k] > 0}
    out[weight_key] = total
    return MetricRecord(out)


# ---------------------------------------------------------------------------- wire format
def tensor_record(**arrays: np.ndarray) -> ArrayRecord:
    """An ArrayRecord of float32 numpy arrays."""
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()}
    )


def check_tensor(
    msg: Message, record: str, shape: tuple[int, ...] | None, tail: tuple[int, ...] | None = None
) -> str | None:
    """Why a reply carrying the tensor ``record``/``t`` must be rejected (None: valid).

    ``shape`` is the exact expected shape (a feature gradient has the shape of the features
    sent); ``tail`` the expected shape after the batch axis (embeddings of any batch size).
    The tensor must be float and finite, the reply's metric ``loss`` (if present) finite.
    """
    if record not in msg.content.array_records or "t" not in msg.content[record]:
        return f"no tensor '{record}'/'t'"
    arr = msg.content[record]["t"]
    got = tuple(arr.shape)
    if shape is not None and got != tuple(shape):
        return f"{record} has shape {got}, expected {tuple(shape)}"
    if tail is not None and (len(got) != len(tail) + 1 or got[1:] != tuple(tail) or got[0] < 1):
        return f"{record} has shape {got}, expected (batch, {', '.join(map(str, tail))})"
    a = arr.numpy()
    if a.dtype.kind != "f":
        return f"{record} has dtype {a.dtype}, expected float"
    if not np.isfinite(a).all():
        return f"{record} contains NaN/Inf"
    metrics = msg.content.metric_records.get("metrics")
    if metrics is not None and "loss" in metrics and not np.isfinite(float(metrics["loss"])):
        return "loss is not finite"
    return None


# ---------------------------------------------------------------------------- the server's G
class GeneralModel(TypingProtocol):
    """The server's general model G."""

    embed_shape: tuple[int, ...]
    """Shape of one sample's patch embedding (what the clients send)."""

    def forward(self, key: int, e: np.ndarray, train: bool = True) -> np.ndarray:
        """Features ``G(e)``; with ``train`` the graph is kept under ``key`` for backward."""

    def backward(self, key: int, grad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Backprop ``grad`` = dL/dF of ``key``'s forward: (flat gradient of G, dL/de)."""

    def step(self, grad: np.ndarray) -> None:
        """One optimizer step on G with the flat gradient ``grad``."""

    def arrays(self) -> ArrayRecord:
        """G's weights."""

    def set_arrays(self, record: ArrayRecord) -> None:
        """Load G's weights."""


# ---------------------------------------------------------------------------- the strategy
class FedBone(PhasedStrategy):
    """Per-batch split learning of a general model with GPAggregation.

    Parameters
    ----------
    general : GeneralModel
        The server's general model G (its weights are the global arrays).
    steps : int, default 10
        Split steps per round.
    attention : bool, default True
        Attention rescaling against the history (False: the projection-only ablation).
    projection : bool, default True
        PCGrad projection of conflicting pairs (False with ``attention`` False: plain gradient
        averaging).
    history_beta : float, default 0.0
        EMA factor of the history of aggregated gradients (0: the last aggregate).
    seed : int, default 0
        Run seed; the projection order of a step is seeded by (seed, round, step).
    min_nodes : int, default 1
        Nodes that must be connected before a round starts.
    fraction_train : float, default 1.0
        Share of the connected clients that train in a round (at least one): every step of the
        round exchanges with the same sample, drawn by partition id from (seed, round)
        (:func:`~flowerbed.common.seeding.sample_partitions`, as flowerbed's FedAvg); every
        client is evaluated.

    Attributes
    ----------
    history : dict of int to dict
        Per round: ``conflict_rate`` (mean over steps) and ``conflict_rate_steps`` (per step),
        ``loss`` per task, ``num_rejected``, ``bytes_per_step`` (both directions, evaluation
        excluded), ``client_compute_s_per_step`` (seconds measured inside the clients' phase
        functions, mean over clients), ``num_sampled`` and, below fraction 1,
        ``sampled_partitions`` (the partitions that trained).
    """

    def __init__(
        self,
        general: GeneralModel,
        steps: int = 10,
        attention: bool = True,
        projection: bool = True,
        history_beta: float = 0.0,
        seed: int = 0,
        min_nodes: int = 1,
        fraction_train: float = 1.0,
    ) -> None:
        if not 0.0 <= history_beta < 1.0:
            raise ValueError(f"history_beta={history_beta}: must be in [0, 1)")
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train={fraction_train}: must be in (0, 1]")
        self.general = general
        self.steps = int(steps)
        self.attention = bool(attention)
        self.projection = bool(projection)
        self.history_beta = float(history_beta)
        self.seed = int(seed)
        self.min_nodes = int(min_nodes)
        self.fraction_train = float(fraction_train)
        self._pids: dict[int, int] = {}
        self.grad_history: np.ndarray | None = None
        self.history: dict[int, dict] = {}

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t└──> FedBone split learning (train.embed -> train.head -> train.back):")
        log(INFO, "\t\t├── steps per round: %d", self.steps)
        log(INFO, "\t\t├── attention rescaling: %s", self.attention)
        log(INFO, "\t\t├── PCGrad projection: %s", self.projection)
        log(INFO, "\t\t├── fraction of clients per round: %g", self.fraction_train)
        log(INFO, "\t\t└── history EMA beta: %g", self.history_beta)

    def state_dict(self) -> dict:
        """The history of aggregated gradients (checkpoints)."""
        return {"grad_history": self.grad_history}

    def load_state_dict(self, state: dict) -> None:
        self.grad_history = state.get("grad_history")

    # ------------------------------------------------------------------ sampling
    def sample(self, protocol: Protocol, nodes: list[int], rnd: int) -> list[int]:
        """The nodes that train in round ``rnd``: ``max(1, int(len(nodes) * fraction_train))``
        of them, chosen by partition id from (seed, round); all of them at fraction 1."""
        k = max(1, int(len(nodes) * self.fraction_train))
        if k >= len(nodes):
            return list(nodes)
        if not set(nodes) <= set(self._pids):  # one query per node, once
            self._pids = query_partitions(protocol.grid, nodes)[0]
        by_pid = {p: n for n, p in self._pids.items() if n in nodes}
        present = sorted(by_pid)
        if not present:
            return list(nodes)
        pos = sample_partitions(self.seed, rnd, len(present), min(k, len(present)))
        return sorted(by_pid[present[i]] for i in pos)

    # ------------------------------------------------------------------ one step
    def _embeddings(self, protocol: Protocol, phase: str, nodes: list[int], cfg: ConfigRecord):
        """Ask ``nodes`` for their patch embeddings; shape ``(batch, *embed_shape)``, finite."""
        tail = tuple(self.general.embed_shape)
        return protocol.exchange(
            phase,
            {n: RecordDict({"config": cfg}) for n in nodes},
            message_type=phase,
            validate=lambda m: check_tensor(m, "embed", None, tail),
        )

    def _step(self, protocol: Protocol, nodes: list[int], rnd: int, step: int) -> dict:
        cfg = ConfigRecord({"server-round": rnd, "step": step})
        up = self._embeddings(protocol, EMBED, nodes, cfg)
        got = up.by_node()
        order = [n for n in nodes if n in got]
        compute = {n: float(got[n].content["metrics"].get(COMPUTE_KEY, 0.0)) for n in order}
        feats = {n: self.general.forward(n, got[n].content["embed"]["t"].numpy()) for n in order}
        head = protocol.exchange(
            HEAD,
            {n: RecordDict({"config": cfg, "features": tensor_record(t=feats[n])}) for n in order},
            message_type=HEAD,
            validate=lambda m: check_tensor(m, "grad", feats[m.metadata.src_node_id].shape),
        )
        back = head.by_node()
        grads, de, losses, tasks = {}, {}, {}, {}
        for n in order:
            if n not in back:
                continue
            metrics = back[n].content["metrics"]
            grads[n], de[n] = self.general.backward(n, back[n].content["grad"]["t"].numpy())
            compute[n] += float(metrics.get(COMPUTE_KEY, 0.0))
            task = str(back[n].content["config"]["task"]) if "config" in back[n].content else ""
            tasks[n] = task
            losses.setdefault(f"loss_{task}" if task else "loss", []).append(float(metrics["loss"]))
        info = {"conflict_rate": float("nan"), "rejected": len(up.failures) + len(head.failures)}
        if grads:
            rng = np.random.default_rng(derive_seed(self.seed, rnd, step, 0xB0E))
            keys = sorted(grads)
            g, agg = gp_aggregate(
                [grads[n] for n in keys],
                self.grad_history,
                self.attention,
                self.projection,
                rng,
            )
            self.general.step(g)
            self.grad_history = update_history(self.grad_history, g, self.history_beta)
            info["conflict_rate"] = agg["conflict_rate"]
            info["diag"] = {
                "pc_change": agg["pc_change"],
                "pc_cos": agg["pc_cos"],
                "cancel": agg["cancel"],
                "cos": agg["cos"],
                "grad_norm": [float(np.linalg.norm(grads[n])) for n in keys],
                "tasks": [tasks[n] for n in keys],
            }
            down = protocol.exchange(
                BACK,
                {n: RecordDict({"config": cfg, "grad": tensor_record(t=de[n])}) for n in de},
                message_type=BACK,
            )
            for m in down.replies:
                n = m.metadata.src_node_id
                compute[n] += float(m.content["metrics"].get(COMPUTE_KEY, 0.0))
        info["losses"] = {k: float(np.mean(v)) for k, v in losses.items()}
        info["compute"] = float(np.mean(list(compute.values()))) if compute else 0.0
        info["num_grads"] = len(grads)
        return info

    # ------------------------------------------------------------------ evaluation
    def evaluate_clients(self, protocol: Protocol, nodes: list[int], rnd: int) -> MetricRecord:
        """Every client's task metric on its held-out images, through the split (no update)."""
        cfg = ConfigRecord({"server-round": rnd})
        got = self._embeddings(protocol, EVAL_EMBED, nodes, cfg).by_node()
        feats = {
            n: self.general.forward(n, m.content["embed"]["t"].numpy(), train=False)
            for n, m in got.items()
        }
        res = protocol.exchange(
            EVAL_HEAD,
            {
                n: RecordDict({"config": cfg, "features": tensor_record(t=f)})
                for n, f in feats.items()
            },
            message_type=EVAL_HEAD,
        )
        return mean_by_key([m.content for m in res.replies])

    # ------------------------------------------------------------------ one round
    def run_round(
        self,
        protocol: Protocol,
        server_round: int,
        arrays: ArrayRecord,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
    ) -> RoundOutcome:
        """``steps`` split steps with GPAggregation, then the clients' evaluation.

        Raises
        ------
        FedBoneError
            If no step of the round had a valid feature gradient.
        """
        nodes = wait_for_nodes(protocol.grid, self.min_nodes)
        sampled = self.sample(protocol, nodes, server_round)
        self.general.set_arrays(arrays)
        rates, computes, rejected, steps_done = [], [], 0, 0
        losses: dict[str, list[float]] = {}
        diags: list[dict] = []
        for step in range(self.steps):
            info = self._step(protocol, sampled, server_round, step)
            rejected += info["rejected"]
            if info["num_grads"]:
                steps_done += 1
                rates.append(info["conflict_rate"])
                computes.append(info["compute"])
                diags.append(info["diag"])
                for k, v in info["losses"].items():
                    losses.setdefault(k, []).append(v)
        if not steps_done:
            raise FedBoneError(f"round {server_round}: no valid feature gradient in any step")
        if rejected:
            log(WARNING, "[fedbone] round %d: %d rejected replies", server_round, rejected)
        phases = protocol.round_row(server_round)["phases"]
        step_bytes = sum(
            phases[p]["bytes_sent"] + phases[p]["bytes_received"]
            for p in STEP_PHASES
            if p in phases
        )
        row = {
            "steps": steps_done,
            "conflict_rate": float(np.mean(rates)),
            "conflict_rate_steps": [round(r, 4) for r in rates],
            "num_rejected": rejected,
            "bytes_per_step": step_bytes / steps_done,
            "client_compute_s_per_step": float(np.mean(computes)),
            "num_sampled": len(sampled),
        }
        if len(sampled) < len(nodes):
            row["sampled_partitions"] = sorted(self._pids[n] for n in sampled if n in self._pids)
        row.update({k: float(np.mean(v)) for k, v in losses.items()})
        row.update(step_diagnostics(diags))
        evaluated = self.evaluate_clients(protocol, nodes, server_round)
        self.history[server_round] = row
        train = MetricRecord(
            {"conflict_rate": row["conflict_rate"], "num-examples": steps_done * len(sampled)}
        )
        return RoundOutcome(
            arrays=self.general.arrays(), train_metrics=train, evaluate_metrics=evaluated
        )
