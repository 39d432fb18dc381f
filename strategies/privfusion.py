"""PrivFusion: one-shot, differentially private fusion of pre-trained models by decentralized
federated graph matching, as a phased protocol on the server relay.

Chen, Chen, Jiang, Zhang, Dai, Huang, Yan, Ye (+ Yan, Lu), "Differentially Private Pre-Trained
Model Fusion using Decentralized Federated Graph Matching", arXiv:2311.03396; journal version
"PrivFusion", IEEE TKDE 36(12), 2024.

Only the paper's abstract was available; the protocol below is the RECONSTRUCTION of
``apps/privfusion`` (its README says what was filled in). The server holds no model and makes no
decision of the protocol: it relays packages between parties (peer-to-peer transfers in a
deployment). One round has three phases (:meth:`PrivFusion.run_round`):

``train.local``
    every party trains its model with DP-SGD and releases its weights and its perturbed
    class-conditional activation statistics (``weights``, ``acts``), plus the privacy it spent
    (metric ``eps_spent``; a party without privacy reports ``-1``, i.e. infinity);
``train.align``
    the fusing (reference) party's package is relayed to every other party, which matches its
    neurons to it and releases its aligned weights (``weights``, metric ``moved_neurons``);
``train.fuse``
    the aligned models are relayed to the fusing party, which averages them with its own and
    trains the perturbation filter adapter with DP-SGD; it releases the fused model (``fused``),
    the adapter model (``adapted``, if any) and the adapter's privacy (metric ``eps_adapter``).

Replies are validated with named reasons (:func:`check_package`, :func:`check_aligned`,
:func:`check_fused`): a rejected party is left out of the fusion. Per-party epsilon
(sequential composition: DP-SGD + activations, + adapter for the fusing party) is kept in
:attr:`PrivFusion.epsilons`. The round's arrays are the fused model; the experiment's evaluation
harness (each party's model, ensemble, plain averaging, matched, PrivFusion) is an injected
callable, since no party would evaluate on the global test split in a deployment.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log

from flowerbed.common.protocol import PhasedStrategy, Protocol, RoundOutcome, wait_for_nodes
from flowerbed.common.records import check_arrays

PARTITION_KEY = "partition-id"
LOCAL, ALIGN, FUSE = "train.local", "train.align", "train.fuse"

#: ``evaluate(parties, fused, adapted) -> metrics``: the app's evaluation harness.
Evaluator = Callable[[Mapping[int, ArrayRecord], ArrayRecord, "ArrayRecord | None"], Mapping]


class PrivFusionError(RuntimeError):
    """The fusing party did not return a valid package or fused model: nothing can be fused."""


def released_epsilon(value: float) -> float:
    """A reported epsilon: records carry finite numbers, a negative one means no privacy (inf)."""
    return math.inf if float(value) < 0 else float(value)


def party_epsilons(
    spent: Mapping[int, float], fusing_party: int, adapter: float = 0.0
) -> dict[int, float]:
    """Per-party epsilon by sequential composition: each party's released ``spent`` (DP-SGD +
    activations), plus ``adapter`` for the fusing party (inf stays inf).

    Parameters
    ----------
    spent : mapping of int to float
        Partition id -> reported ``eps_spent`` (negative = no privacy).
    fusing_party : int
        Partition id of the fusing party.
    adapter : float, default 0.0
        Reported ``eps_adapter`` of the fusing party (negative = no privacy).
    """
    eps = {pid: released_epsilon(v) for pid, v in spent.items()}
    if fusing_party in eps:
        eps[fusing_party] += released_epsilon(adapter)
    return eps


def _has_partition(msg: Message) -> str | None:
    if "metrics" not in msg.content.metric_records:
        return "no MetricRecord 'metrics'"
    if PARTITION_KEY not in msg.content["metrics"]:
        return f"metrics lack {PARTITION_KEY!r}"
    return None


def check_package(msg: Message, reference: ArrayRecord) -> str | None:
    """Why a ``train.local`` reply must be left out (None: valid).

    The weights must have the model's keys, shapes and dtypes and be finite
    (:func:`~flowerbed.common.records.check_arrays`); the activation statistics must be finite.
    """
    why = _has_partition(msg)
    if why:
        return why
    recs = msg.content.array_records
    for key in ("weights", "acts"):
        if key not in recs:
            return f"no ArrayRecord {key!r}"
    why = check_arrays(recs["weights"], reference)
    if why:
        return f"weights: {why}"
    if not all(np.isfinite(a.numpy()).all() for a in recs["acts"].values()):
        return "activation statistics contain NaN/Inf"
    return None


def check_aligned(msg: Message, reference: ArrayRecord) -> str | None:
    """Why a ``train.align`` reply must be left out (None: valid)."""
    why = _has_partition(msg)
    if why:
        return why
    if "weights" not in msg.content.array_records:
        return "no ArrayRecord 'weights'"
    why = check_arrays(msg.content["weights"], reference)
    return f"aligned weights: {why}" if why else None


def check_fused(msg: Message, reference: ArrayRecord) -> str | None:
    """Why a ``train.fuse`` reply must be rejected (None: valid)."""
    why = _has_partition(msg)
    if why:
        return why
    recs = msg.content.array_records
    if "fused" not in recs:
        return "no ArrayRecord 'fused'"
    why = check_arrays(recs["fused"], reference)
    if why:
        return f"fused model: {why}"
    if "adapted" in recs:
        why = check_arrays(recs["adapted"], None)
        if why:
            return f"adapted model: {why}"
    return None


class PrivFusion(PhasedStrategy):
    """The PrivFusion relay: local DP training, alignment to the reference, fusion + adapter.

    Parameters
    ----------
    fusing_party : int, default 0
        Partition id of the reference / fusing party.
    evaluate : callable or None, default None
        ``evaluate(parties, fused, adapted) -> metrics``: the evaluation harness (``parties``:
        partition id -> released weights; ``fused``: the fused model; ``adapted``: the fused
        model with the adapter, or None). Its metrics are the round's server-side metrics.
    min_nodes : int, default 1
        Nodes that must be connected before ``train.local`` is sent.

    Attributes
    ----------
    epsilons : dict of int to float
        Per-party epsilon spent in the last round (:func:`party_epsilons`).
    parties : dict of int to dict
        Per-party metrics of ``train.local`` (partition id -> metrics).
    history : dict of int to dict
        Per round: parties fused, left out (with reasons in the protocol row), neurons moved.
    """

    def __init__(
        self, fusing_party: int = 0, evaluate: Evaluator | None = None, min_nodes: int = 1
    ) -> None:
        self.fusing_party = int(fusing_party)
        self.evaluate = evaluate
        self.min_nodes = int(min_nodes)
        self.epsilons: dict[int, float] = {}
        self.parties: dict[int, dict] = {}
        self.history: dict[int, dict] = {}

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t└──> PrivFusion (relay: train.local -> train.align -> train.fuse):")
        log(INFO, "\t\t├── fusing_party: %d", self.fusing_party)
        log(INFO, "\t\t└── min_nodes: %d", self.min_nodes)

    def run_round(
        self,
        protocol: Protocol,
        server_round: int,
        arrays: ArrayRecord,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
    ) -> RoundOutcome:
        """The three phases from the model template ``arrays`` (keys, shapes, dtypes).

        Raises
        ------
        PrivFusionError
            If the fusing party's package or fused model is missing or invalid.
        """
        nodes = wait_for_nodes(protocol.grid, self.min_nodes)
        train_config["server-round"] = server_round
        local = protocol.broadcast(
            LOCAL,
            RecordDict({"config": train_config}),
            nodes,
            message_type=LOCAL,
            validate=lambda m: check_package(m, arrays),
        )
        packages = {int(m.content["metrics"][PARTITION_KEY]): m for m in local.replies}
        fp = self.fusing_party
        if fp not in packages:
            raise PrivFusionError(
                f"fusing-party={fp} did not return a valid package (valid parties: "
                f"{sorted(packages)}; failures: {local.failures})"
            )
        pids = sorted(packages)
        ref = packages[fp]
        ref_node = ref.metadata.src_node_id
        self.parties = {p: dict(packages[p].content["metrics"]) for p in pids}

        # the reference package goes to every other party, which aligns its model to it
        ref_package = RecordDict({"weights": ref.content["weights"], "acts": ref.content["acts"]})
        align = protocol.exchange(
            ALIGN,
            {packages[p].metadata.src_node_id: ref_package for p in pids if p != fp},
            message_type=ALIGN,
            validate=lambda m: check_aligned(m, arrays),
        )
        aligned = {int(m.content["metrics"][PARTITION_KEY]): m for m in align.replies}

        # the aligned models go to the fusing party, which fuses them with its own and adapts
        content = RecordDict(
            {f"aligned.{p}": m.content["weights"] for p, m in sorted(aligned.items())}
        )
        fuse = protocol.exchange(
            FUSE, {ref_node: content}, message_type=FUSE, validate=lambda m: check_fused(m, arrays)
        )
        if not fuse.replies:
            raise PrivFusionError(f"fusing party {fp} failed in {FUSE}: {fuse.failures}")
        fc = fuse.replies[0].content
        fm = fc["metrics"]
        self.epsilons = party_epsilons(
            {p: self.parties[p]["eps_spent"] for p in pids}, fp, fm.get("eps_adapter", 0.0)
        )
        fused = fc["fused"]
        adapted = fc["adapted"] if "adapted" in fc.array_records else None
        failures = {**local.failures, **align.failures, **fuse.failures}
        for node, why in sorted(failures.items()):
            log(WARNING, "[privfusion] node %d left out: %s", node, why)
        self.history[server_round] = {
            "parties": len(pids),
            "aligned_parties": len(aligned),
            "fused_models": int(fm.get("fused_models", len(aligned) + 1)),
            "moved_neurons": sum(int(m.content["metrics"]["moved_neurons"]) for m in align.replies),
            "num_failures": len(failures),
            "epsilon_max": max(self.epsilons.values()),
        }
        server = None
        if self.evaluate is not None:
            weights = {p: packages[p].content["weights"] for p in pids}
            server = MetricRecord(dict(self.evaluate(weights, fused, adapted)))
        train_metrics = MetricRecord(
            {
                "parties": len(pids),
                "num-examples": sum(int(m["num-examples"]) for m in self.parties.values()),
            }
        )
        return RoundOutcome(arrays=fused, train_metrics=train_metrics, server_metrics=server)

    def final_metrics(self) -> dict[str, float]:
        """Per-party epsilon and the largest one (for the results' ``final``)."""
        if not self.epsilons:
            return {}
        return {
            **{f"party{p}_epsilon": e for p, e in sorted(self.epsilons.items())},
            "epsilon_max": max(self.epsilons.values()),
        }
