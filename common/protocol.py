"""The protocol layer: message phases, replies, bytes, timing, failures and the round loop.

Every strategy of flowerbed runs on this layer, whatever its protocol:

- **one round = one train (+ evaluate) exchange** (FedAvg, FedQual, FedTA...): a Flower
  :class:`~flwr.serverapp.strategy.Strategy` with ``configure_train`` / ``aggregate_train``;
  :func:`round_loop` runs Flower's round (the same steps as ``Strategy.start``) over a
  :class:`ProtocolGrid`;
- **several phases per round, one-shot protocols, relays, per-batch split learning**
  (FedDistr, PrivFusion, FL-LLaMA...): a :class:`PhasedStrategy` whose :meth:`run_round` sends
  phases with :meth:`Protocol.exchange` / :meth:`Protocol.broadcast`.

Either way :class:`Protocol` is the transport: it sends a phase to a set of nodes, collects the
replies with a timeout, validates them (``validate(msg) -> reason or None``), counts bytes with
the one definition of :func:`flowerbed.common.records.wire_nbytes` per direction and phase, times
the phase, records failures (error replies, missing replies, rejected replies) with their reasons,
and keeps one row per round (``Protocol.rounds``) that :func:`flowerbed.common.server.run_strategy`
writes into ``results.json``. A phase that runs longer than ``progress_s`` prints its progress on
the console (replies so far, seconds), so a long client-side step is never silent.

Checkpoint/resume (:class:`flowerbed.common.checkpoint.Checkpointed`) and the fault options
(``round-timeout``, ``min-train-replies``, fault injection in the ClientApps) work the same on both
kinds, because both run through :func:`round_loop`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flowerbed.common.records import wire_nbytes

Validator = Callable[[Message], "str | None"]


class ProtocolError(RuntimeError):
    """A phase that cannot go on (no node connected, too few valid replies)."""


# ---------------------------------------------------------------------------- phase results
@dataclass
class PhaseReport:
    """What one phase gave: valid replies, failures with reasons, bytes and time.

    Attributes
    ----------
    phase : str
        Name of the phase (the message type for Flower's train/evaluate/query).
    server_round : int
        Round the phase belongs to.
    replies : list of Message
        Replies without error that passed validation, in node-id order.
    failures : dict of int to str
        ``{node_id: reason}`` for error replies, missing replies and rejected ones.
    num_sent, bytes_sent, bytes_received : int
        Messages sent, and serialised bytes per direction (:func:`wire_nbytes`).
    time_s : float
        Wall time of the phase.
    """

    phase: str
    server_round: int
    replies: list[Message] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)
    num_sent: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    time_s: float = 0.0

    def by_node(self) -> dict[int, Message]:
        """The valid replies keyed by their source node id."""
        return {m.metadata.src_node_id: m for m in self.replies}


_ROOT_CAUSE = re.compile(r"^\s*([\w.]+(?:Error|Exception|Fault|Exit): \S.*)$")


def error_summary(reason: str, width: int = 140) -> str:
    """Short error text: the innermost ``SomeError: message`` line of a traceback (the root cause
    of a wrapped Ray/ClientApp error) followed by the start of the full reason."""
    reason = str(reason)
    causes = [m.group(1) for ln in reason.splitlines() if (m := _ROOT_CAUSE.match(ln))]
    head = reason[:width].replace("\n", " ")
    if causes and causes[-1][:40] not in head:
        return f"{causes[-1][:width]} [{head}]"
    return head


def wait_for_nodes(
    grid: Grid, min_nodes: int = 1, settle_s: float = 0.0, timeout: float = 300.0
) -> list[int]:
    """The connected node ids, once at least ``min_nodes`` are up and the set was stable for
    ``settle_s`` seconds (one-shot protocols leave out a node that connects late).

    Raises
    ------
    ProtocolError
        If fewer than ``min_nodes`` connected within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    nodes: list[int] = []
    stable_since = time.monotonic()
    while True:
        now = sorted(grid.get_node_ids())
        if now != nodes:
            nodes, stable_since = now, time.monotonic()
        if len(nodes) >= min_nodes and time.monotonic() - stable_since >= settle_s:
            return nodes
        if time.monotonic() > deadline:
            raise ProtocolError(
                f"{len(nodes)} node(s) connected within {timeout:.0f} s, {min_nodes} needed"
            )
        time.sleep(0.2)


# ---------------------------------------------------------------------------- the transport
class Protocol:
    """Sends phases over a Grid and keeps the per-round, per-phase record.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid (simulation, deployment, or a test grid with ``send_and_receive``).
    timeout : float, default 3600
        Seconds a phase waits for its replies (the run config's ``round-timeout``).
    progress_s : float, default 10
        A phase still running after this many seconds prints its progress, again every
        ``progress_s`` seconds, and once more when it ends.
    poll_s : float, default 0.01
        First interval between polls for replies; it grows by half up to ``max_poll_s`` while
        nothing arrives (Flower's in-memory grid polls every 0.1 s, its HTTP grid every 3 s).
    max_poll_s : float, default 0.2
        Longest interval between polls.
    """

    def __init__(
        self,
        grid: Grid,
        timeout: float = 3600.0,
        progress_s: float = 10.0,
        poll_s: float = 0.01,
        max_poll_s: float = 0.2,
    ) -> None:
        self.grid = grid
        self.timeout = timeout
        self.progress_s = progress_s
        self.poll_s = poll_s
        self.max_poll_s = max_poll_s
        self.current_round = 0
        self.rounds: dict[int, dict[str, Any]] = {}
        _short_http_backoff(grid)

    # ------------------------------------------------------------------ records
    def round_row(self, server_round: int) -> dict[str, Any]:
        """``{"bytes_sent", "bytes_received", "phases": {phase: {...}}}`` of a round."""
        return self.rounds.setdefault(
            server_round, {"bytes_sent": 0, "bytes_received": 0, "phases": {}}
        )

    def totals(self) -> dict[str, int]:
        """Bytes sent and received over the whole run."""
        return {
            "bytes_sent": sum(r["bytes_sent"] for r in self.rounds.values()),
            "bytes_received": sum(r["bytes_received"] for r in self.rounds.values()),
        }

    def _record(self, rep: PhaseReport) -> None:
        row = self.round_row(rep.server_round)
        row["bytes_sent"] += rep.bytes_sent
        row["bytes_received"] += rep.bytes_received
        ph = row["phases"].setdefault(
            rep.phase,
            {
                "calls": 0,
                "num_sent": 0,
                "num_replies": 0,
                "num_failures": 0,
                "bytes_sent": 0,
                "bytes_received": 0,
                "time_s": 0.0,
            },
        )
        ph["calls"] += 1
        ph["num_sent"] += rep.num_sent
        ph["num_replies"] += len(rep.replies)
        ph["num_failures"] += len(rep.failures)
        ph["bytes_sent"] += rep.bytes_sent
        ph["bytes_received"] += rep.bytes_received
        ph["time_s"] = round(ph["time_s"] + rep.time_s, 4)
        if rep.failures:
            reasons = ph.setdefault("failure_reasons", [])
            reasons.extend(f"node {n}: {why}"[:300] for n, why in sorted(rep.failures.items()))
            del reasons[50:]  # a long run of failures keeps its first 50 reasons

    # ------------------------------------------------------------------ phases
    def exchange(
        self,
        phase: str,
        contents: Mapping[int, RecordDict],
        message_type: str = MessageType.TRAIN,
        validate: Validator | None = None,
        timeout: float | None = None,
        server_round: int | None = None,
    ) -> PhaseReport:
        """Send ``contents[node]`` to each node, collect and validate the replies.

        Parameters
        ----------
        phase : str
            Name of the phase in ``results.json`` and on the console.
        contents : mapping of int to RecordDict
            What each node receives.
        message_type : str, default "train"
            Flower message type (``"train"``, ``"evaluate"``, ``"query"``, or
            ``"train.<action>"`` for a ClientApp function registered as ``@app.train("<action>")``).
        validate : callable or None, default None
            ``validate(reply) -> reason or None``; a reply with a reason is rejected and recorded.
        timeout : float or None, default None
            Seconds to wait (default: the protocol's ``timeout``).
        server_round : int or None, default None
            Round of the phase (default: the protocol's ``current_round``).
        """
        messages = [
            Message(content=c, dst_node_id=int(n), message_type=message_type)
            for n, c in contents.items()
        ]
        return self._phase(phase, messages, validate, timeout, server_round)

    def broadcast(
        self,
        phase: str,
        content: RecordDict,
        node_ids: Iterable[int],
        message_type: str = MessageType.TRAIN,
        validate: Validator | None = None,
        timeout: float | None = None,
        server_round: int | None = None,
    ) -> PhaseReport:
        """:meth:`exchange` with the same ``content`` for every node of ``node_ids``."""
        return self.exchange(
            phase,
            {int(n): content for n in node_ids},
            message_type,
            validate,
            timeout,
            server_round,
        )

    def send_and_receive(
        self, messages: Iterable[Message], timeout: float | None = None, phase: str | None = None
    ) -> list[Message]:
        """Flower's ``Grid.send_and_receive`` with the record kept: every reply, errors included,
        is returned (strategies do their own validation); used by :class:`ProtocolGrid`."""
        messages = list(messages)
        if not messages:
            return []
        name = phase or messages[0].metadata.message_type
        rep = self._phase(name, messages, None, timeout, None, keep_errors=True)
        return rep.replies

    def _phase(
        self,
        phase: str,
        messages: list[Message],
        validate: Validator | None,
        timeout: float | None,
        server_round: int | None,
        keep_errors: bool = False,
    ) -> PhaseReport:
        rnd = self.current_round if server_round is None else server_round
        timeout = self.timeout if timeout is None else timeout
        rep = PhaseReport(phase, rnd, num_sent=len(messages))
        t0 = time.perf_counter()
        sizes: dict[int, int] = {}  # a content sent to many nodes is serialised once
        for m in messages:
            key = id(m.content)
            if key not in sizes:
                sizes[key] = wire_nbytes(m.content)
            rep.bytes_sent += sizes[key]
        dst = {m.metadata.dst_node_id for m in messages}
        replies = self._transport(phase, rnd, messages, timeout)
        answered = set()
        for msg in sorted(replies, key=lambda m: m.metadata.src_node_id):
            node = msg.metadata.src_node_id
            answered.add(node)
            if msg.has_error():
                rep.failures[node] = f"error {error_summary(msg.error.reason)}"
                if keep_errors:
                    rep.replies.append(msg)
                continue
            rep.bytes_received += wire_nbytes(msg.content)
            why = validate(msg) if validate is not None else None
            if why is not None:
                rep.failures[node] = f"rejected, {why}"
                log(WARNING, "round %d, %s: rejected reply from node %d: %s", rnd, phase, node, why)
                continue
            rep.replies.append(msg)
        for node in sorted(dst - answered):
            rep.failures[node] = f"no reply within {timeout:g} s"
        rep.time_s = time.perf_counter() - t0
        self._record(rep)
        return rep

    def _transport(
        self, phase: str, rnd: int, messages: list[Message], timeout: float
    ) -> list[Message]:
        grid = self.grid
        if not (hasattr(grid, "push_messages") and hasattr(grid, "pull_messages")):
            return list(grid.send_and_receive(messages, timeout=timeout))  # test/local grids
        pending = set(grid.push_messages(messages))
        n = len(pending)
        t0 = time.monotonic()
        next_report = t0 + self.progress_s
        wait = self.poll_s
        out: list[Message] = []
        while pending:
            got = list(grid.pull_messages(pending))
            if got:
                out.extend(got)
                pending.difference_update(m.metadata.reply_to_message_id for m in got)
                wait = self.poll_s
            now = time.monotonic()
            if now >= next_report and pending:
                log(
                    INFO,
                    "[flowerbed] round %d, %s: %d/%d replies after %.0f s",
                    rnd,
                    phase,
                    n - len(pending),
                    n,
                    now - t0,
                )
                next_report = now + self.progress_s
            if not pending or now - t0 >= timeout:
                break
            time.sleep(min(wait, max(0.0, t0 + timeout - now)))
            wait = min(wait * 1.5, self.max_poll_s)
        elapsed = time.monotonic() - t0
        if elapsed >= self.progress_s:
            log(
                INFO,
                "[flowerbed] round %d, %s: %d/%d replies in %.1f s",
                rnd,
                phase,
                n - len(pending),
                n,
                elapsed,
            )
        return out


def _short_http_backoff(grid: Grid) -> None:
    """In a deployment (Flower's ``HttpGrid``), pull a reply's objects with a short backoff.

    A reply can be listed by the SuperLink before all its arrays have arrived there; Flower's
    ``HttpGrid.pull_messages`` then retries ``pull_objects`` after 1 s, 2 s, ... (at most 10 s).
    The first protocol on an HttpGrid binds shorter backoff arguments (50 ms doubling to at most
    0.5 s) to ``pull_objects`` in ``flwr.superlink.grid.http_grid``, in this (ServerApp) process
    only; the calls are the same.
    """
    import functools
    import sys

    http = sys.modules.get("flwr.superlink.grid.http_grid")
    if http is None or not isinstance(grid, getattr(http, "HttpGrid", ())):
        return
    if not isinstance(http.pull_objects, functools.partial):
        http.pull_objects = functools.partial(
            http.pull_objects, initial_backoff=0.05, backoff_cap=0.5
        )


class ProtocolGrid:
    """A Grid whose ``send_and_receive`` goes through a :class:`Protocol` (bytes, time,
    failures and progress recorded per phase); everything else is the wrapped grid's.

    A Flower strategy run on it needs no change: :func:`round_loop` hands it to
    ``configure_train`` and sends its messages through it.
    """

    def __init__(self, grid: Grid, protocol: Protocol) -> None:
        self._grid = grid
        self.protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    @property
    def run(self) -> Any:
        """The grid's run (a test or local grid has none: a stand-in with ``run_id`` 0)."""
        run = getattr(self._grid, "run", None)
        if run is None:
            from types import SimpleNamespace

            return SimpleNamespace(run_id=0)
        return run

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        return self.protocol.send_and_receive(messages, timeout=timeout)


def protocol_grid(grid: Grid, timeout: float = 3600.0) -> ProtocolGrid:
    """``grid`` itself if it is a :class:`ProtocolGrid`, else one around it."""
    if isinstance(grid, ProtocolGrid):
        return grid
    return ProtocolGrid(grid, Protocol(grid, timeout=timeout))


# ---------------------------------------------------------------------------- strategies
@dataclass
class RoundOutcome:
    """What a round of a :class:`PhasedStrategy` produced.

    ``arrays`` None keeps the global model; ``server_metrics`` set replaces the server-side
    ``evaluate_fn`` for this round (e.g. local-only training, evaluated per client).
    """

    arrays: ArrayRecord | None = None
    train_metrics: MetricRecord | None = None
    evaluate_metrics: MetricRecord | None = None
    server_metrics: MetricRecord | None = None


class PhasedStrategy(Strategy):
    """Base class of strategies whose round is a sequence of message phases.

    A subclass implements :meth:`run_round` with :meth:`Protocol.exchange` /
    :meth:`Protocol.broadcast` calls and :meth:`summary`; ``start`` (Flower's entry point) runs
    the rounds with :func:`round_loop`, so such a strategy is started like any Flower strategy.
    Flower's ``configure_*`` / ``aggregate_*`` are not used by a phased round and return nothing.
    """

    def run_round(
        self,
        protocol: Protocol,
        server_round: int,
        arrays: ArrayRecord,
        train_config: ConfigRecord,
        evaluate_config: ConfigRecord,
    ) -> RoundOutcome:
        """Run the phases of ``server_round`` from the global ``arrays``."""
        raise NotImplementedError

    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []

    def aggregate_train(self, server_round, replies):
        return None, None

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run ``num_rounds`` rounds of :meth:`run_round` (see :func:`round_loop`)."""
        return round_loop(
            self,
            grid,
            initial_arrays,
            num_rounds,
            timeout,
            train_config,
            evaluate_config,
            evaluate_fn,
        )


def standard_round(
    strategy: Strategy,
    grid: ProtocolGrid,
    server_round: int,
    arrays: ArrayRecord,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    timeout: float,
) -> RoundOutcome:
    """One round of a Flower strategy, the steps of ``Strategy.start``: train, aggregate,
    federated evaluation (server-side evaluation is the loop's)."""
    replies = grid.send_and_receive(
        strategy.configure_train(server_round, arrays, train_config, grid), timeout=timeout
    )
    new, train_metrics = strategy.aggregate_train(server_round, replies)
    current = new if new is not None else arrays
    replies = grid.send_and_receive(
        strategy.configure_evaluate(server_round, current, evaluate_config, grid), timeout=timeout
    )
    evaluate_metrics = strategy.aggregate_evaluate(server_round, replies)
    return RoundOutcome(new, train_metrics, evaluate_metrics)


def round_loop(
    strategy: Strategy,
    grid: Grid,
    initial_arrays: ArrayRecord,
    num_rounds: int,
    timeout: float = 3600.0,
    train_config: ConfigRecord | None = None,
    evaluate_config: ConfigRecord | None = None,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    first_round: int = 1,
    result: Result | None = None,
    after_round: Callable[[int, ArrayRecord, Result], None] | None = None,
) -> Result:
    """THE round loop of flowerbed, for every strategy.

    Per round: the strategy's round (:meth:`PhasedStrategy.run_round`, or Flower's
    train / aggregate / evaluate steps through a :class:`ProtocolGrid`), then the server-side
    evaluation, then ``after_round(round, arrays, result)`` (the results file, a checkpoint).
    ``evaluate_fn(0, initial_arrays)`` runs before round 1 as in Flower; ``first_round > 1``
    continues a resumed run (``result`` holds what came before).
    """
    pgrid = protocol_grid(grid, timeout)
    protocol = pgrid.protocol
    train_config = ConfigRecord() if train_config is None else train_config
    evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
    result = Result() if result is None else result
    arrays = initial_arrays
    if first_round == 1:
        log(INFO, "Starting %s:", type(strategy).__name__)
        strategy.summary()
        if evaluate_fn:
            res = evaluate_fn(0, initial_arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        if after_round is not None:
            after_round(0, arrays, result)
    phased = isinstance(strategy, PhasedStrategy)
    for rnd in range(first_round, num_rounds + 1):
        protocol.current_round = rnd
        if phased:
            out = strategy.run_round(
                protocol, rnd, arrays, ConfigRecord(dict(train_config)), evaluate_config
            )
        else:
            out = standard_round(
                strategy, pgrid, rnd, arrays, train_config, evaluate_config, timeout
            )
        if out.arrays is not None:
            result.arrays = arrays = out.arrays
        if out.train_metrics is not None:
            result.train_metrics_clientapp[rnd] = out.train_metrics
        if out.evaluate_metrics is not None:
            result.evaluate_metrics_clientapp[rnd] = out.evaluate_metrics
        server = out.server_metrics
        if server is None and evaluate_fn:
            server = evaluate_fn(rnd, arrays)
        if server is not None:
            result.evaluate_metrics_serverapp[rnd] = server
        if after_round is not None:
            after_round(rnd, arrays, result)
    if result.arrays is None or len(result.arrays) == 0:
        result.arrays = arrays
    return result
