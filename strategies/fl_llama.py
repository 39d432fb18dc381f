"""FL-LLaMA: federated split fine-tuning of a LLaMA model, as a phased protocol.

Zhang, Zhang, Zheng, Wang, Tong, Dong, Zheng, "A Federated Splitting Framework for LLMs:
Security, Efficiency, and Adaptability" (FL-LLaMA; later versions FedSEA-LLaMA),
arXiv:2505.15683; the protocol follows the authors' code (TAP-LLM/SplitFedLLM, ``FL-LLaMA/``),
itself on Flower with three client phases per step.

Each client holds block A (embedding + first p layers) and block C (last q layers, norm, head),
the server block B (the middle), each with its own LoRA adapter. One split step
(:meth:`FLLlama.run_round` runs ``sync_steps`` of them per round) is three exchanges:

``train.forward``
    the client runs A on its batch (plus optional Gaussian noise) and sends the hidden states and,
    with attention-mask compression, only the per-sample non-pad counts (else the 4-D mask and
    the position ids); the first exchange of a round carries the global A/C adapter;
``train.c``
    the server runs B and sends h_B; the client runs C, the loss, backward, an optimizer step on
    C and replies dL/dh_B;
``train.a``
    the server backpropagates through B (optimizer step on B) and sends dL/dh_A; the client
    backpropagates through A and steps A.

After the round's steps, ``train.sync`` collects the clients' A/C adapters and averages them
FedAvg-style (Flower's ``aggregate_arrayrecords``, weighted by ``num-examples``).

Parallel modes (the paper's appendix): ``sequential`` (clients take turns, B steps after each),
``client-batch`` (every client's phase in one exchange; the server concatenates the hidden
states into one batch, one B forward/backward/step) and ``server-hierarchical`` (every client's
phase in one exchange; one B replica per client, replicas averaged at the end of each round).

The server's B is an injected :class:`ServerBlock` (the app's model code), so this module needs
no model library. Replies are validated with named reasons (:func:`check_hidden`,
:func:`check_grad`, :func:`check_lora`): a rejected reply is left out of the step and never
reaches B or the global adapters.
"""

from __future__ import annotations

from collections.abc import Sequence
from logging import INFO, WARNING
from typing import Protocol as TypingProtocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from flowerbed.common.protocol import PhasedStrategy, Protocol, RoundOutcome, wait_for_nodes
from flowerbed.common.records import check_arrays

FORWARD, BACK_C, BACK_A, SYNC = "train.forward", "train.c", "train.a", "train.sync"
MODES = ("sequential", "client-batch", "server-hierarchical")


class FLLlamaError(RuntimeError):
    """No client completed the round's adapter sync: there is nothing to average."""


class ServerBlock(TypingProtocol):
    """The server's block B (one replica per client in ``server-hierarchical`` mode)."""

    def forward(self, h: np.ndarray, counts: np.ndarray, replica: int = 0) -> np.ndarray:
        """h_B of ``h`` (b, L, d) with masks rebuilt from ``counts``; keeps the graph."""

    def backward(self, grad: np.ndarray, replica: int = 0) -> np.ndarray:
        """Backprop ``grad`` = dL/dh_B of the last forward, optimizer step; returns dL/dh_A."""

    def lora(self) -> ArrayRecord:
        """B's adapter (replica 0)."""

    def set_lora(self, record: ArrayRecord) -> None:
        """Load B's adapter into every replica."""

    def average_replicas(self, weights: Sequence[float]) -> None:
        """FedAvg of the replicas' adapters (server-hierarchical), loaded into all of them."""


# ---------------------------------------------------------------------------- wire format
def np_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of numpy arrays (C-contiguous copies where needed)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def hidden_record(h: np.ndarray, counts: np.ndarray, compressed: bool) -> ArrayRecord:
    """What crosses with a hidden state: ``h`` and the counts, or (without compression) the
    additive 4-D causal mask ``(b, 1, L, L)`` float32 and the position ids ``(b, L)`` int64,
    the tensors the authors' uncompressed protocol sends."""
    h = np.ascontiguousarray(h, dtype=np.float32)
    counts = np.asarray(counts, dtype=np.int64)
    if compressed:
        return np_record({"h": h, "counts": counts})
    b, length = h.shape[0], h.shape[1]
    cols = np.arange(length)
    real = cols[None, :] >= (length - counts)[:, None]  # (b, L)
    allowed = (cols[None, :, None] >= cols[None, None, :]) & real[:, None, :]
    mask = np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None]
    pos = np.clip(cols[None, :] - (length - counts)[:, None], 0, None).astype(np.int64)
    return np_record({"h": h, "mask": mask, "position-ids": pos.reshape(b, length)})


def counts_from_record(rec: ArrayRecord) -> np.ndarray:
    """Per-sample non-pad counts: sent as is, or read from the last row of the 4-D mask."""
    if "counts" in rec:
        return rec["counts"].numpy().astype(np.int64)
    return (rec["mask"].numpy()[:, 0, -1, :] == 0).sum(-1).astype(np.int64)


def check_hidden(msg: Message, hidden_size: int) -> str | None:
    """Why a ``train.forward`` reply must be rejected (None: valid).

    The hidden state must be ``(b, L, hidden_size)`` float and finite; the counts (or the mask
    and position ids) must describe the same ``b`` samples of ``L`` tokens, each 1..L.
    """
    if "hidden" not in msg.content.array_records:
        return "no ArrayRecord 'hidden'"
    rec = msg.content["hidden"]
    if "h" not in rec:
        return "hidden record lacks 'h'"
    shape = tuple(rec["h"].shape)
    if len(shape) != 3 or shape[2] != hidden_size or shape[0] < 1 or shape[1] < 1:
        return f"hidden state has shape {shape}, expected (batch, tokens, {hidden_size})"
    h = rec["h"].numpy()
    if not np.issubdtype(h.dtype, np.floating):
        return f"hidden state has dtype {h.dtype}, expected float"
    if not np.isfinite(h).all():
        return "hidden state contains NaN/Inf"
    b, length = shape[0], shape[1]
    if "counts" in rec:
        if tuple(rec["counts"].shape) != (b,):
            return f"counts have shape {tuple(rec['counts'].shape)}, expected ({b},)"
    elif "mask" in rec and "position-ids" in rec:
        if tuple(rec["mask"].shape) != (b, 1, length, length):
            return (
                f"mask has shape {tuple(rec['mask'].shape)}, expected ({b}, 1, {length}, {length})"
            )
        if tuple(rec["position-ids"].shape) != (b, length):
            return f"position ids have shape {tuple(rec['position-ids'].shape)}"
    else:
        return "hidden record has neither 'counts' nor 'mask' + 'position-ids'"
    counts = counts_from_record(rec)
    if counts.min() < 1 or counts.max() > length:
        return f"non-pad counts {counts.tolist()} outside 1..{length}"
    return None


def check_grad(msg: Message, shape: tuple[int, ...]) -> str | None:
    """Why a ``train.c`` reply must be rejected: no gradient, wrong shape, NaN/Inf, no loss."""
    if "grad" not in msg.content.array_records or "g" not in msg.content["grad"]:
        return "no gradient 'grad'/'g'"
    got = tuple(msg.content["grad"]["g"].shape)
    if got != tuple(shape):
        return f"gradient has shape {got}, expected {tuple(shape)}"
    if not np.isfinite(msg.content["grad"]["g"].numpy()).all():
        return "gradient contains NaN/Inf"
    metrics = msg.content.metric_records.get("metrics")
    if metrics is None or "loss" not in metrics or not np.isfinite(float(metrics["loss"])):
        return "no finite metric 'loss'"
    return None


def check_lora(msg: Message, reference: ArrayRecord) -> str | None:
    """Why a ``train.sync`` reply must be left out of the average (keys, shapes, finiteness)."""
    if "lora" not in msg.content.array_records:
        return "no ArrayRecord 'lora'"
    metrics = msg.content.metric_records.get("metrics")
    if metrics is None or float(metrics.get("num-examples", 0)) <= 0:
        return "no positive metric 'num-examples'"
    why = check_arrays(msg.content["lora"], reference)
    return f"adapter: {why}" if why else None


def pad_left(parts: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Concatenate ``(b_i, L_i, d)`` arrays along the batch, left-padding with zeros to the
    longest ``L`` (client-batch mode); returns the batch and each part's ``L_i``."""
    length = max(p.shape[1] for p in parts)
    out = [
        np.concatenate([np.zeros((p.shape[0], length - p.shape[1], p.shape[2]), p.dtype), p], 1)
        for p in parts
    ]
    return np.concatenate(out, 0), [p.shape[1] for p in parts]


def unpad_split(batch: np.ndarray, sizes: Sequence[int], lengths: Sequence[int]) -> list:
    """Inverse of :func:`pad_left`: the parts of ``batch`` with their own lengths."""
    out, start = [], 0
    for b, length in zip(sizes, lengths, strict=True):
        out.append(np.ascontiguousarray(batch[start : start + b, batch.shape[1] - length :]))
        start += b
    return out


# ---------------------------------------------------------------------------- the strategy
class FLLlama(PhasedStrategy):
    """The FL-LLaMA split-training protocol.

    Parameters
    ----------
    server : ServerBlock
        The server's block B (its adapter keys are the global arrays' B part).
    hidden_size : int
        Width of the hidden states (validation).
    mode : str, default "sequential"
        ``sequential``, ``client-batch`` or ``server-hierarchical``.
    sync_steps : int, default 1
        Split steps per round; the A/C adapters (and B replicas) are averaged after them.
    sync_every : int, default 0
        Also average the A/C adapters (and B replicas) after every ``sync_every`` steps inside
        a round (the next step's ``train.forward`` carries the average); 0: only at the end of
        the round. ``sync_every = 1`` averages after every step (a control of the
        split/centralized gap).
    min_nodes : int, default 1
        Nodes that must be connected before a round starts.

    Attributes
    ----------
    history : dict of int to dict
        Per round: mean / first / last step loss, steps, rejected replies, bytes per step.
    """

    def __init__(
        self,
        server: ServerBlock,
        hidden_size: int,
        mode: str = "sequential",
        sync_steps: int = 1,
        min_nodes: int = 1,
        sync_every: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
        self.server = server
        self.hidden_size = int(hidden_size)
        self.mode = mode
        self.sync_steps = int(sync_steps)
        if int(sync_every) < 0:
            raise ValueError(f"sync_every {sync_every}: must be >= 0")
        self.sync_every = int(sync_every)
        self.min_nodes = int(min_nodes)
        self.history: dict[int, dict] = {}
        self.step_losses: list[float] = []

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t└──> FL-LLaMA split training (train.forward -> train.c -> train.a):")
        log(INFO, "\t\t├── mode: %s", self.mode)
        log(INFO, "\t\t├── sync_steps: %d", self.sync_steps)
        log(INFO, "\t\t├── sync_every: %d (0: end of round)", self.sync_every)
        log(INFO, "\t\t└── hidden_size: %d", self.hidden_size)

    # ------------------------------------------------------------------ one step
    def _step(self, protocol, nodes, rnd, step, client_lora) -> tuple[list[float], int]:
        """One split step for ``nodes`` (one exchange per phase); the losses and rejections."""
        cfg = ConfigRecord({"server-round": rnd, "step": step})
        content = {"config": cfg}
        if client_lora is not None:
            content["lora"] = client_lora
        fwd = protocol.exchange(
            FORWARD,
            {n: RecordDict(content) for n in nodes},
            message_type=FORWARD,
            validate=lambda m: check_hidden(m, self.hidden_size),
        )
        got = fwd.by_node()
        order = [n for n in nodes if n in got]
        if not order:
            return [], len(fwd.failures)
        hs = [got[n].content["hidden"]["h"].numpy().astype(np.float32) for n in order]
        counts = [counts_from_record(got[n].content["hidden"]) for n in order]
        # ---- server forward through B
        if self.mode == "client-batch":
            batch, lengths = pad_left(hs)
            hb = self.server.forward(batch, np.concatenate(counts), 0)
            sizes = [h.shape[0] for h in hs]
            outs = unpad_split(hb, sizes, lengths)
        else:
            outs = [
                self._forward_one(h, c, nodes.index(n))
                for n, h, c in zip(order, hs, counts, strict=True)
            ]
        shape = {n: o.shape for n, o in zip(order, outs, strict=True)}
        back = protocol.exchange(
            BACK_C,
            {
                n: RecordDict({"config": cfg, "hidden": np_record({"h": o})})
                for n, o in zip(order, outs, strict=True)
            },
            message_type=BACK_C,
            validate=lambda m: check_grad(m, shape[m.metadata.src_node_id]),
        )
        grads = back.by_node()
        losses = [float(grads[n].content["metrics"]["loss"]) for n in order if n in grads]
        # ---- server backward through B; a rejected reply contributes no gradient
        zero = {n: np.zeros_like(o) for n, o in zip(order, outs, strict=True)}
        g = {n: grads[n].content["grad"]["g"].numpy() if n in grads else zero[n] for n in order}
        if self.mode == "client-batch":
            if grads:
                batch, _ = pad_left([g[n] for n in order])
                ga = unpad_split(self.server.backward(batch, 0), sizes, lengths)
            else:
                ga = []
            grad_a = dict(zip(order, ga, strict=False))
        elif self.mode == "sequential":
            grad_a = {n: self.server.backward(g[n], 0) for n in order if n in grads}
        else:
            grad_a = {n: self.server.backward(g[n], nodes.index(n)) for n in order if n in grads}
        if grad_a:
            protocol.exchange(
                BACK_A,
                {
                    n: RecordDict({"config": cfg, "grad": np_record({"g": ga_n})})
                    for n, ga_n in grad_a.items()
                    if n in grads
                },
                message_type=BACK_A,
            )
        return losses, len(fwd.failures) + len(back.failures)

    def _forward_one(self, h, counts, index):
        replica = index if self.mode == "server-hierarchical" else 0
        return self.server.forward(h, counts, replica)

    def _sync(self, protocol, nodes, server_round, reference) -> tuple[ArrayRecord, int, int]:
        """``train.sync``: FedAvg of the clients' A/C adapters (B replicas averaged too in
        server-hierarchical mode); the average, its examples and the rejected replies."""
        sync = protocol.broadcast(
            SYNC,
            RecordDict({"config": ConfigRecord({"server-round": server_round})}),
            nodes,
            message_type=SYNC,
            validate=lambda m: check_lora(m, reference),
        )
        if not sync.replies:
            raise FLLlamaError(f"round {server_round}: no valid adapter in {SYNC}: {sync.failures}")
        for node, why in sorted(sync.failures.items()):
            log(WARNING, "[fl-llama] node %d left out of the average: %s", node, why)
        records = [
            RecordDict({"lora": m.content["lora"], "metrics": m.content["metrics"]})
            for m in sync.replies
        ]
        if self.mode == "server-hierarchical":
            self.server.average_replicas([1.0] * len(nodes))
        n_ex = sum(int(m.content["metrics"]["num-examples"]) for m in sync.replies)
        return aggregate_arrayrecords(records, "num-examples"), n_ex, len(sync.failures)

    # ------------------------------------------------------------------ one round
    def run_round(
        self,
        protocol: Protocol,
        server_round: int,
        arrays: ArrayRecord,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
    ) -> RoundOutcome:
        """``sync_steps`` split steps, then the A/C adapter average (and B replicas').

        Raises
        ------
        FLLlamaError
            If no client returns a valid adapter in ``train.sync``.
        """
        nodes = wait_for_nodes(protocol.grid, self.min_nodes)
        b_keys = set(self.server.lora().keys())
        client_lora = ArrayRecord({k: v for k, v in arrays.items() if k not in b_keys})
        self.server.set_lora(ArrayRecord({k: v for k, v in arrays.items() if k in b_keys}))
        losses: list[float] = []
        rejected = 0
        lora: ArrayRecord | None = client_lora
        for step in range(self.sync_steps):
            if self.mode == "sequential":
                step_losses = []
                for n in nodes:
                    ls, rej = self._step(protocol, [n], server_round, step, lora)
                    step_losses += ls
                    rejected += rej
            else:
                step_losses, rej = self._step(protocol, nodes, server_round, step, lora)
                rejected += rej
            if step_losses:
                losses.append(float(np.mean(step_losses)))
                self.step_losses.append(losses[-1])
            lora = None
            last = step == self.sync_steps - 1
            if last or (self.sync_every and (step + 1) % self.sync_every == 0):
                averaged, n_ex, rej = self._sync(protocol, nodes, server_round, client_lora)
                rejected += rej
                lora = averaged  # the next step starts from the average
        new = ArrayRecord({**dict(averaged.items()), **dict(self.server.lora().items())})
        phases = protocol.round_row(server_round)["phases"]
        step_bytes = sum(
            phases[p]["bytes_sent"] + phases[p]["bytes_received"]
            for p in (FORWARD, BACK_C, BACK_A)
            if p in phases
        )
        self.history[server_round] = {
            "steps": len(losses),
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "loss_first_step": losses[0] if losses else float("nan"),
            "loss_last_step": losses[-1] if losses else float("nan"),
            "num_rejected": rejected,
            "bytes_per_step": step_bytes / max(len(losses), 1),  # both ways, sync excluded
        }
        metrics = MetricRecord(
            {
                "loss": self.history[server_round]["loss"],
                "num-examples": n_ex,
                "clients": len(nodes),
            }
        )
        return RoundOutcome(arrays=new, train_metrics=metrics)
