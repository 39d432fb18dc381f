"""The protocol layer: phases, validation, bytes (one definition), failures, the round loop."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from flowerbed.common.protocol import (
    PhasedStrategy,
    Protocol,
    ProtocolError,
    RoundOutcome,
    round_loop,
    wait_for_nodes,
)
from flowerbed.common.records import wire_nbytes
from flowerbed.common.results import ResultsWriter
from flowerbed.common.server import run_strategy
from flowerbed.common.testing import FakeGrid
from flowerbed.strategies.fedavg import FedAvg


def _arrays(value: float, n: int = 4) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full((n,), value, np.float32))})


class EchoGrid(FakeGrid):
    """A grid whose nodes answer in-process: node ``i`` replies with its arrays times ``i``
    (``num-examples`` = i); nodes in ``fail`` raise, nodes in ``silent`` never answer."""

    def __init__(self, node_ids, fail=(), silent=(), bad=()):
        super().__init__(node_ids)
        self.fail, self.silent, self.bad = set(fail), set(silent), set(bad)
        self.sent: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            self.sent.append(m)
            node = m.metadata.dst_node_id
            if node in self.silent:
                continue
            if node in self.fail:
                rep = Message(Error(code=0, reason="ValueError: boom"), reply_to=m)
            else:
                w = m.content["arrays"]["w"].numpy() * node
                if node in self.bad:
                    w = w.copy()
                    w[0] = np.nan
                content = RecordDict(
                    {
                        "arrays": ArrayRecord({"w": Array(w.astype(np.float32))}),
                        "metrics": MetricRecord({"num-examples": node}),
                    }
                )
                rep = Message(content=content, reply_to=m)
            rep.metadata.__dict__["_src_node_id"] = node
            out.append(rep)
        return out


def _finite(msg: Message) -> str | None:
    return None if np.isfinite(msg.content["arrays"]["w"].numpy()).all() else "arrays not finite"


def test_exchange_counts_bytes_per_direction_with_wire_nbytes():
    grid = EchoGrid([1, 2, 3])
    proto = Protocol(grid)
    content = RecordDict({"arrays": _arrays(1.0), "config": ConfigRecord({"x": 1})})
    rep = proto.broadcast("upload", content, [1, 2, 3], server_round=4)
    assert rep.num_sent == 3 and sorted(rep.by_node()) == [1, 2, 3]
    assert rep.bytes_sent == 3 * wire_nbytes(content)
    assert rep.bytes_received == sum(wire_nbytes(m.content) for m in rep.replies)
    row = proto.rounds[4]
    assert row["bytes_sent"] == rep.bytes_sent and row["bytes_received"] == rep.bytes_received
    ph = row["phases"]["upload"]
    assert (ph["calls"], ph["num_sent"], ph["num_replies"], ph["num_failures"]) == (1, 3, 3, 0)
    # a second call of the same phase in the same round adds up
    proto.exchange("upload", {2: content}, server_round=4)
    assert proto.rounds[4]["phases"]["upload"]["calls"] == 2
    assert proto.rounds[4]["bytes_sent"] == 4 * wire_nbytes(content)
    assert proto.totals() == {
        "bytes_sent": proto.rounds[4]["bytes_sent"],
        "bytes_received": proto.rounds[4]["bytes_received"],
    }


def test_failures_are_recorded_with_reasons():
    grid = EchoGrid([1, 2, 3, 4], fail=[2], silent=[3], bad=[4])
    proto = Protocol(grid, timeout=5)
    rep = proto.broadcast("p", RecordDict({"arrays": _arrays(1.0)}), [1, 2, 3, 4], validate=_finite)
    assert [m.metadata.src_node_id for m in rep.replies] == [1]
    assert "ValueError: boom" in rep.failures[2]
    assert rep.failures[3] == "no reply within 5 s"
    assert rep.failures[4] == "rejected, arrays not finite"
    ph = proto.rounds[0]["phases"]["p"]
    assert ph["num_failures"] == 3 and len(ph["failure_reasons"]) == 3
    # a rejected reply's bytes still crossed the wire; an error reply's content is empty
    assert rep.bytes_received > wire_nbytes(rep.replies[0].content)


def test_wait_for_nodes_names_the_shortfall():
    assert wait_for_nodes(FakeGrid([3, 1]), min_nodes=2) == [1, 3]
    with pytest.raises(ProtocolError, match="1 node\\(s\\) connected within 0 s, 2 needed"):
        wait_for_nodes(FakeGrid([1]), min_nodes=2, timeout=0)


class TwoPhase(PhasedStrategy):
    """A two-phase round: every node scales the model (phase a), node 1 alone again (phase b);
    the new model is the mean of phase a's replies."""

    def summary(self) -> None:
        pass

    def run_round(self, protocol, server_round, arrays, train_config, evaluate_config):
        nodes = wait_for_nodes(protocol.grid)
        a = protocol.broadcast("a", RecordDict({"arrays": arrays}), nodes)
        protocol.exchange("b", {1: RecordDict({"arrays": arrays})})
        mean = np.mean([m.content["arrays"]["w"].numpy() for m in a.replies], axis=0)
        return RoundOutcome(
            arrays=ArrayRecord({"w": Array(mean.astype(np.float32))}),
            train_metrics=MetricRecord({"replies": len(a.replies)}),
        )


def test_phased_strategy_runs_through_the_round_loop():
    grid = EchoGrid([1, 2])
    seen = []
    result = TwoPhase().start(
        grid,
        _arrays(1.0),
        num_rounds=2,
        evaluate_fn=lambda rnd, arr: seen.append((rnd, float(arr["w"].numpy()[0]))) or None,
    )
    # round 1: mean(1*1, 1*2) = 1.5; round 2: mean(1.5, 3.0) = 2.25
    assert seen == [(0, 1.0), (1, 1.5), (2, 2.25)]
    np.testing.assert_allclose(result.arrays["w"].numpy(), 2.25)
    assert result.train_metrics_clientapp[2]["replies"] == 2
    # node 1 got phases a and b in each round, node 2 only a
    assert [m.metadata.dst_node_id for m in grid.sent] == [1, 2, 1, 1, 2, 1]


def test_run_strategy_writes_protocol_rows_for_a_flower_strategy(tmp_path):
    """FedAvg (Flower's round through the protocol grid): per-round bytes in results.json are
    the wire size of what was sent and received, the same definition as a phased strategy's."""
    import json

    grid = EchoGrid([1, 2, 3])
    writer = ResultsWriter(tmp_path, {}, app="t")
    strategy = FedAvg(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0)
    result = run_strategy(strategy, grid, _arrays(1.0), 2, writer, train_config=ConfigRecord({}))
    # weighted mean of i * w with weights i: (1 + 4 + 9) / 6
    np.testing.assert_allclose(result.arrays["w"].numpy()[0], (14 / 6) ** 2, rtol=1e-6)
    rows = {r["round"]: r for r in json.loads(writer.path.read_text())["rounds"]}
    assert len(grid.sent) == 6  # 3 per round, no evaluation messages
    assert rows[1]["bytes_sent"] == sum(wire_nbytes(m.content) for m in grid.sent[:3])
    assert rows[1]["phases"]["train"]["num_replies"] == 3
    assert rows[1]["num_train_replies"] == 3  # the strategy's own history row is merged
    totals = json.loads(writer.path.read_text())["extra"]["totals"]
    assert totals["bytes_sent"] == rows[1]["bytes_sent"] + rows[2]["bytes_sent"]


def test_round_loop_resumes_from_a_later_round():
    grid = EchoGrid([2])
    rounds = []
    round_loop(
        TwoPhase(),
        grid,
        _arrays(1.0),
        num_rounds=3,
        first_round=3,
        after_round=lambda rnd, arrays, result: rounds.append(rnd),
    )
    assert rounds == [3]  # no initial evaluation, rounds 1-2 not run again


class PushPullGrid(EchoGrid):
    """A grid with Flower's push/pull interface: a reply becomes visible only after its node's
    number of polls (node ``i`` after ``i`` polls); nodes in ``silent`` never answer."""

    def __init__(self, node_ids, silent=()):
        super().__init__(node_ids, silent=silent)
        self.polls = 0
        self._replies: dict[str, Message] = {}

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"id{len(self.sent)}-{i}"
            for rep in EchoGrid.send_and_receive(self, [m]):
                rep.metadata.__dict__["_reply_to_message_id"] = m.metadata.message_id
                self._replies[m.metadata.message_id] = rep
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        self.polls += 1
        ready = [
            self._replies.pop(i)
            for i in list(message_ids)
            if i in self._replies and self._replies[i].metadata.src_node_id <= self.polls
        ]
        return ready

    def send_and_receive(self, messages, *, timeout=None):  # the protocol must not use it
        raise AssertionError("send_and_receive called on a push/pull grid")


def test_push_pull_transport_polls_until_all_replies_or_the_timeout(capsys):
    grid = PushPullGrid([1, 2, 3])
    proto = Protocol(grid, poll_s=0.001, max_poll_s=0.002, progress_s=0.0)
    rep = proto.broadcast("slow", RecordDict({"arrays": _arrays(1.0)}), [1, 2, 3])
    assert sorted(rep.by_node()) == [1, 2, 3] and not rep.failures and grid.polls >= 3
    grid = PushPullGrid([1, 2], silent=[2])
    proto = Protocol(grid, timeout=0.05, poll_s=0.001, max_poll_s=0.005)
    rep = proto.broadcast("lost", RecordDict({"arrays": _arrays(1.0)}), [1, 2])
    assert sorted(rep.by_node()) == [1] and rep.failures == {2: "no reply within 0.05 s"}


def test_checkpoint_and_resume_work_for_a_phased_strategy(tmp_path):
    """A phased strategy under Checkpointed: 2 rounds, then resumed to 3, ends where an
    uninterrupted 3-round run ends (round 3 starts from round 2's checkpointed model)."""
    from flowerbed.common.checkpoint import FILENAME, Checkpointed, load_checkpoint

    Checkpointed(TwoPhase(), tmp_path / "a").start(EchoGrid([1, 2]), _arrays(1.0), num_rounds=2)
    assert load_checkpoint(tmp_path / "a" / FILENAME)[0] == 2
    resumed = Checkpointed(TwoPhase(), tmp_path / "a", resume=True)
    grid = EchoGrid([1, 2])
    out = resumed.start(grid, _arrays(1.0), num_rounds=3)
    assert resumed.resumed_from == 2 and len(grid.sent) == 3  # only round 3 was run
    full = TwoPhase().start(EchoGrid([1, 2]), _arrays(1.0), num_rounds=3)
    assert out.arrays["w"].numpy().tobytes() == full.arrays["w"].numpy().tobytes()


def test_a_first_round_where_every_client_errors_stops_the_run(tmp_path):
    """Every call of round 1 an error reply: a named error after round 1 (not 3 rounds on the
    initial model), the reason in results.json; one working client keeps the run going."""
    import json

    from flowerbed.common.server import ClientsFailedError

    grid = EchoGrid([1, 2, 3], fail=[1, 2, 3])
    writer = ResultsWriter(tmp_path, {}, app="t")
    strategy = FedAvg(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0)
    with pytest.raises(ClientsFailedError, match="round 1 failed.*ValueError: boom"):
        run_strategy(strategy, grid, _arrays(1.0), 3, writer, train_config=ConfigRecord({}))
    assert len(grid.sent) == 3  # round 1 only
    rec = json.loads(writer.path.read_text())
    assert [r["round"] for r in rec["rounds"] if r["round"] > 0] == [1]
    assert "ValueError: boom" in rec["extra"]["aborted"]
    assert "finished_at" in rec

    grid = EchoGrid([1, 2, 3], fail=[1, 2])
    strategy = FedAvg(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0)
    writer = ResultsWriter(tmp_path / "b", {}, app="t")
    run_strategy(strategy, grid, _arrays(1.0), 3, writer, train_config=ConfigRecord({}))
    assert len(grid.sent) == 9


@pytest.mark.parametrize(
    "reasons, want",
    [
        (["node 1: error DataError: no rows", "node 2: error DataError: no rows"], "DataError"),
        (["node 1: error DataError: x", "node 2: no reply within 5 s"], None),  # a timeout
        (["node 1: error DataError: x", "node 2: rejected, arrays not finite"], None),
        (["node 1: error InjectedFault: injected fault"] * 2, None),  # fault-mode on purpose
    ],
)
def test_first_round_failure_counts_only_error_replies(reasons, want):
    from flowerbed.common.server import first_round_failure

    row = {"phases": {"train": {"num_sent": 2, "num_replies": 2, "num_failures": 2}}}
    row["phases"]["train"]["failure_reasons"] = reasons
    got = first_round_failure(row)
    assert (got is None) if want is None else (want in got)
    row["phases"]["train"].update(num_failures=1)  # one valid reply: not a broken run
    assert first_round_failure(row) is None
