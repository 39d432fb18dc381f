"""TOF distillation: task-oriented flowcharts merged on the server, then a student language model
distilled federatedly from flowchart-generated dialogues.

Hong et al., "Orchestration-Free Customer Service Automation: A Privacy-Preserving and
Flowchart-Guided Framework", The ACM Web Conference (WWW) 2026, arXiv:2602.15377. Only the
abstract and introduction are available: what is sent and how the server combines it is a
Reconstruction (see ``apps/tof-distillation/README.md``).

The server side here:

- :class:`Flowchart`: a client's flowchart as counted edges ``(task, intent, condition, action,
  next)``; :meth:`Flowchart.merge` is the union of the clients' edges with summed counts, and
  :meth:`Flowchart.rules` resolves conflicts (several actions for one ``(intent, condition)``) by
  a documented rule;
- :func:`check_flowchart`: why a client's flowchart reply must be rejected (named reasons), so a
  malformed reply never enters the merge;
- :class:`TofDistillation`: a phased strategy. Round 1 opens with a ``flowchart`` phase (every
  client builds its flowchart from its own selected dialogues and sends it; raw dialogues never
  leave the client); the server merges them. Every round then has a ``train`` phase: the clients
  fine-tune the student's LoRA adapter on synthetic dialogues generated from the merged flowchart
  (``share``) or from their own (local-only), and the server averages the adapters with Flower's
  FedAvg rule (``aggregate_arrayrecords``, weights ``num-examples``) or, local-only, keeps each
  client's own and reports the mean of their evaluations.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from flowerbed.common.client import LOCAL_ONLY
from flowerbed.common.protocol import PhasedStrategy, Protocol, RoundOutcome, wait_for_nodes
from flowerbed.common.records import check_arrays

START, END = "START", "END"
FLOWCHART_KEY = "flowchart"  # ConfigRecord of the flowchart phase's reply / the train config
EDGES = "edges"  # its JSON string: [[task, intent, condition, action, next, count], ...]
MAX_EDGES, MAX_LABEL = 5000, 64

Edge = tuple[str, str, str, str, str]


class FlowchartError(ValueError):
    """A flowchart that cannot be parsed (the named reason is the message)."""


class Flowchart:
    """Counted flowchart edges ``(task, intent, condition, action, next) -> count``.

    ``condition`` is ``""`` or ``"key=value"`` (the database state the step branches on); the
    edge ``(task, "START", "", "", intent)`` counts the dialogues opened by ``intent``.

    Parameters
    ----------
    counts : mapping of Edge to int, default {}
        The edges and how many extracted tuples support each.
    """

    def __init__(self, counts: Mapping[Edge, int] | None = None) -> None:
        self.counts: Counter[Edge] = Counter(dict(counts or {}))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Flowchart) and self.counts == other.counts

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(sorted({e[0] for e in self.counts}))

    @classmethod
    def merge(cls, charts: Iterable[Flowchart]) -> Flowchart:
        """The union of ``charts``' edges, counts summed (the server's merge)."""
        out: Counter[Edge] = Counter()
        for c in charts:
            out.update(c.counts)
        return cls(out)

    def rules(self, task: str) -> tuple[dict[tuple[str, str], tuple[str, tuple[str, ...]]], str]:
        """``({(intent, condition): (action, next intents)}, start intent)`` of ``task``.

        Conflict rule: for an ``(intent, condition)`` with several actions the action wins by
        total count, then by the count of its edges that move on to another intent, then
        alphabetically; a self-loop (the user repeated the step: the answer
        did not serve) is never a transition. The start is the most frequent opening intent
        (ties: alphabetically first).
        """
        by_step: dict[tuple[str, str], Counter] = {}
        moves: dict[tuple[str, str], Counter] = {}
        nexts: dict[tuple[str, str, str], set[str]] = {}
        starts: Counter[str] = Counter()
        for (t, intent, cond, action, nxt), n in self.counts.items():
            if t != task:
                continue
            if intent == START:
                starts[nxt] += n
                continue
            by_step.setdefault((intent, cond), Counter())[action] += n
            if nxt != intent:
                moves.setdefault((intent, cond), Counter())[action] += n
                nexts.setdefault((intent, cond, action), set()).add(nxt)
        rules = {}
        for step, acts in by_step.items():
            mv = moves.get(step, Counter())
            action = min(acts, key=lambda a: (-acts[a], -mv[a], a))
            rules[step] = (action, tuple(sorted(nexts.get((*step, action), ()))))
        start = min(starts, key=lambda s: (-starts[s], s)) if starts else ""
        return rules, start

    def edges(self) -> set[Edge]:
        """The resolved edges (after :meth:`rules`), START edge included: what is compared with
        a ground truth."""
        out: set[Edge] = set()
        for task in self.tasks:
            rules, start = self.rules(task)
            if start:
                out.add((task, START, "", "", start))
            for (intent, cond), (action, nexts) in rules.items():
                out |= {(task, intent, cond, action, n) for n in nexts}
        return out

    def serialize(self, task: str) -> str:
        """The prompt text of ``task``'s chart: one line ``intent [condition] -> action`` per
        step, sorted (the flowchart-guided prompt)."""
        rules, _ = self.rules(task)
        lines = []
        for (intent, cond), (action, _) in sorted(rules.items()):
            lines.append(f"{intent}{f' [{cond}]' if cond else ''} -> {action}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ wire
    def to_json(self) -> str:
        return json.dumps([[*e, int(n)] for e, n in sorted(self.counts.items())])

    @classmethod
    def from_json(cls, text: str, tasks: Iterable[str] | None = None) -> Flowchart:
        """Parse the wire form; :class:`FlowchartError` names what is wrong."""
        try:
            rows = json.loads(text)
        except (TypeError, ValueError):
            raise FlowchartError("flowchart is not valid JSON") from None
        if not isinstance(rows, list):
            raise FlowchartError("flowchart is not a list of edges")
        if len(rows) > MAX_EDGES:
            raise FlowchartError(f"{len(rows)} edges > {MAX_EDGES}")
        known = None if tasks is None else set(tasks)
        counts: Counter[Edge] = Counter()
        for i, row in enumerate(rows):
            if not (isinstance(row, list) and len(row) == 6):
                raise FlowchartError(f"edge {i} is not [task, intent, condition, action, next, n]")
            *labels, n = row
            if not all(isinstance(s, str) and len(s) <= MAX_LABEL for s in labels):
                raise FlowchartError(f"edge {i}: labels must be strings of <= {MAX_LABEL} chars")
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise FlowchartError(f"edge {i}: count {n!r} is not a positive integer")
            if known is not None and labels[0] not in known:
                raise FlowchartError(f"edge {i}: unknown task {labels[0]!r}")
            counts[tuple(labels)] += n
        return cls(counts)

    def record(self) -> ConfigRecord:
        return ConfigRecord({EDGES: self.to_json()})


def read_flowchart(content: RecordDict, tasks: Iterable[str] | None = None) -> Flowchart:
    """The flowchart a message carries (``content["flowchart"]["edges"]``)."""
    if FLOWCHART_KEY not in content.config_records:
        raise FlowchartError(f"no ConfigRecord {FLOWCHART_KEY!r}")
    rec = content[FLOWCHART_KEY]
    if EDGES not in rec or not isinstance(rec[EDGES], str):
        raise FlowchartError(f"ConfigRecord {FLOWCHART_KEY!r} has no string {EDGES!r}")
    return Flowchart.from_json(rec[EDGES], tasks)


def check_flowchart(msg: Message, tasks: Iterable[str]) -> str | None:
    """Why the flowchart reply ``msg`` must be rejected (or None)."""
    try:
        chart = read_flowchart(msg.content, tasks)
    except FlowchartError as e:
        return str(e)
    if not chart.counts:
        return "empty flowchart"
    return None


def check_adapter(msg: Message, reference: ArrayRecord) -> str | None:
    """Why the adapter reply ``msg`` must be rejected: no ``arrays``, keys / shapes / dtypes
    unlike the global adapter, non-finite values, or no finite positive ``num-examples``."""
    content = msg.content
    if "arrays" not in content.array_records:
        return "no ArrayRecord 'arrays'"
    metrics = content.metric_records.get("metrics")
    n = None if metrics is None else metrics.get("num-examples")
    if isinstance(n, bool) or not isinstance(n, int | float) or not np.isfinite(n) or n <= 0:
        return f"weight 'num-examples'={n!r} is not a finite positive number"
    return check_arrays(content["arrays"], reference)


class TofDistillation(PhasedStrategy):
    """Flowchart merge and federated distillation of a student's LoRA adapter.

    Parameters
    ----------
    tasks : iterable of str
        The service tasks a flowchart may name (a reply naming another is rejected).
    share : bool, default True
        Merge the clients' flowcharts and send the merged one with every train message (the
        clients synthesize from it); False: each client synthesizes from its own.
    aggregate : bool, default True
        FedAvg over the adapters (Flower's weighted mean by ``num-examples``); False: local-only,
        every client continues its own adapter (``local-only`` in the train config) and the
        round's server metrics are the mean of ``evaluate_each`` over the clients.
    evaluate_each : callable or None, default None
        ``evaluate_each(round, arrays, flowchart) -> metrics or None`` of one client's adapter
        with its own flowchart (local-only only).
    min_replies : int, default 1
        Valid replies a phase needs; with fewer the global adapter (and the merge) is kept.
    """

    def __init__(
        self,
        tasks: Iterable[str],
        share: bool = True,
        aggregate: bool = True,
        evaluate_each: Callable[[int, ArrayRecord, Flowchart], Mapping | None] | None = None,
        min_replies: int = 1,
    ) -> None:
        self.tasks = tuple(tasks)
        self.share = share
        self.aggregate = aggregate
        self.evaluate_each = evaluate_each
        self.min_replies = min_replies
        self.charts: dict[int, Flowchart] = {}
        self.merged: Flowchart | None = None
        self.history: dict[int, dict] = {}

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t├──> TofDistillation: flowchart merge + distillation of a LoRA adapter")
        log(INFO, "\t├──> share merged flowchart: %s", self.share)
        log(INFO, "\t├──> aggregate (FedAvg): %s", self.aggregate)
        log(INFO, "\t└──> min_replies: %d", self.min_replies)

    def serving_chart(self) -> Flowchart | None:
        """The flowchart the server serves with: the merged one when it is shared (None before
        the merge, and local-only, where each client serves with its own)."""
        return self.merged if self.share else None

    # ------------------------------------------------------------------ phases
    def collect_flowcharts(self, protocol: Protocol, server_round: int, nodes) -> dict:
        """The ``flowchart`` phase: every client's flowchart, validated, then merged."""
        content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
        rep = protocol.broadcast(
            "flowchart",
            content,
            nodes,
            message_type="train.flowchart",
            validate=lambda m: check_flowchart(m, self.tasks),
        )
        for msg in rep.replies:
            self.charts[msg.metadata.src_node_id] = read_flowchart(msg.content, self.tasks)
        row: dict = {"num_flowcharts": len(self.charts)}
        if len(self.charts) >= max(self.min_replies, 1):
            self.merged = Flowchart.merge(self.charts[n] for n in sorted(self.charts))
            row["merged_edges"] = len(self.merged.edges())
        stats = [m.content["metrics"] for m in rep.replies if "metrics" in m.content.metric_records]
        for key in sorted(set.intersection(*(set(s) for s in stats)) if stats else ()):
            row[f"flowchart_{key}"] = float(np.mean([s[key] for s in stats]))
        return row

    def run_round(
        self,
        protocol: Protocol,
        server_round: int,
        arrays: ArrayRecord,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
    ) -> RoundOutcome:
        """Round 1: the flowchart phase; every round: the train phase and its aggregation."""
        nodes = wait_for_nodes(protocol.grid)
        row = self.history.setdefault(server_round, {})
        if not self.charts:
            row.update(self.collect_flowcharts(protocol, server_round, nodes))
        train_config["server-round"] = server_round
        if not self.aggregate:
            train_config[LOCAL_ONLY] = True
        content = RecordDict({"arrays": arrays, "config": train_config})
        if self.share and self.merged is not None:
            content[FLOWCHART_KEY] = self.merged.record()
        rep = protocol.broadcast(
            "train", content, nodes, validate=lambda m: check_adapter(m, arrays)
        )
        good = rep.replies
        row["num_train_replies"] = len(good)
        row["num_rejected"] = sum("rejected" in why for why in rep.failures.values())
        if len(good) < max(self.min_replies, 1):
            return RoundOutcome()
        contents = [m.content for m in good]
        loss = [float(c["metrics"].get("loss", np.nan)) for c in contents]
        train = MetricRecord({"loss": float(np.nanmean(loss)) if loss else 0.0})
        if self.aggregate:
            return RoundOutcome(
                arrays=aggregate_arrayrecords(contents, "num-examples"), train_metrics=train
            )
        if self.evaluate_each is None:
            return RoundOutcome(train_metrics=train)
        per = []
        for m in good:
            chart = self.charts.get(m.metadata.src_node_id, Flowchart())
            res = self.evaluate_each(server_round, m.content["arrays"], chart)
            if res is not None:
                per.append(dict(res))
        if not per:
            return RoundOutcome(train_metrics=train)
        keys = sorted(set.intersection(*(set(p) for p in per)))
        mean = MetricRecord({k: float(np.mean([p[k] for p in per])) for k in keys})
        return RoundOutcome(train_metrics=train, server_metrics=mean)
