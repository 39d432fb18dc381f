"""TofDistillation on mock replies: the flowchart wire form and its named rejections, the merge
with a malformed reply left out, FedAvg over adapters by hand, local-only, the share switch."""

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flowerbed.common.protocol import Protocol
from flowerbed.common.testing import FakeGrid, mock_reply
from flowerbed.strategies.tof_distillation import (
    END,
    FLOWCHART_KEY,
    START,
    Flowchart,
    FlowchartError,
    TofDistillation,
    check_adapter,
    check_flowchart,
)

TASKS = ("s", "t")
C1 = Flowchart(
    {("s", START, "", "", "a"): 1, ("s", "a", "", "x", "b"): 2, ("s", "b", "", "y", END): 1}
)
C2 = Flowchart({("s", "a", "", "z", "b"): 3, ("t", "q", "", "r", END): 1})


def _chart_reply(text, node=1):
    return mock_reply(RecordDict({FLOWCHART_KEY: ConfigRecord({"edges": text})}), node_id=node)


@pytest.mark.parametrize(
    "text,reason",
    [
        ("{not json", "flowchart is not valid JSON"),
        ('{"a": 1}', "flowchart is not a list of edges"),
        ('[["s", "a", "", "x", "b"]]', "edge 0 is not [task, intent, condition, action, next, n]"),
        ('[["s", "a", "", "x", "b", 0]]', "edge 0: count 0 is not a positive integer"),
        ('[["s", "a", "", "x", "b", 1.5]]', "edge 0: count 1.5 is not a positive integer"),
        ('[["s", "a", "", "x", "b", true]]', "edge 0: count True is not a positive integer"),
        ('[["s", "a", "", 7, "b", 1]]', "edge 0: labels must be strings of <= 64 chars"),
        (json.dumps([["s", "a" * 65, "", "x", "b", 1]]), "labels must be strings of <= 64"),
        ('[["s", "a", "", "x", "b", 1], ["u", "a", "", "x", "b", 1]]', "edge 1: unknown task 'u'"),
        ("[]", "empty flowchart"),
    ],
)
def test_malformed_flowcharts_have_named_reasons(text, reason):
    assert reason in check_flowchart(_chart_reply(text), TASKS)


def test_flowchart_reply_without_its_record():
    assert check_flowchart(mock_reply(RecordDict()), TASKS) == "no ConfigRecord 'flowchart'"
    bad = mock_reply(RecordDict({FLOWCHART_KEY: ConfigRecord({"edges": 3})}))
    assert check_flowchart(bad, TASKS) == "ConfigRecord 'flowchart' has no string 'edges'"
    assert check_flowchart(_chart_reply(C1.to_json()), TASKS) is None
    with pytest.raises(FlowchartError, match="not valid JSON"):
        Flowchart.from_json("x")


def test_merge_is_the_sum_and_the_majority_resolves_a_conflict():
    m = Flowchart.merge([C1, C2])
    assert m.counts[("s", "a", "", "x", "b")] == 2 and m.counts[("s", "a", "", "z", "b")] == 3
    assert m.rules("s")[0][("a", "")] == ("z", ("b",))  # 3 > 2
    assert C1.rules("s")[0][("a", "")] == ("x", ("b",))
    assert m.edges() == {
        ("s", START, "", "", "a"),
        ("s", "a", "", "z", "b"),
        ("s", "b", "", "y", END),
        ("t", "q", "", "r", END),
    }
    assert m.serialize("s") == "a -> z\nb -> y"


W = {"lora_A": np.zeros((2, 3), np.float32), "lora_B": np.zeros((3, 2), np.float32)}


def _adapter(value):
    return ArrayRecord({k: Array(np.full_like(v, value)) for k, v in W.items()})


class ScriptedGrid(FakeGrid):
    """Three nodes: flowchart replies (node 3's malformed) and adapter replies (values and
    weights per node, node 3 optionally NaN); every message it gets is kept."""

    def __init__(self, values, weights, nan_node=None):
        super().__init__([1, 2, 3])
        self.values, self.weights, self.nan_node = values, weights, nan_node
        self.sent: list[Message] = []

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            self.sent.append(m)
            node = m.metadata.dst_node_id
            if m.metadata.message_type == "train.flowchart":
                text = {1: C1.to_json(), 2: C2.to_json(), 3: '[["s", "a", "", "x", "b", -4]]'}
                content = RecordDict(
                    {
                        FLOWCHART_KEY: ConfigRecord({"edges": text[node]}),
                        "metrics": MetricRecord({"num-selected": node}),
                    }
                )
            else:
                v = np.nan if node == self.nan_node else self.values[node]
                content = RecordDict(
                    {
                        "arrays": _adapter(v),
                        "metrics": MetricRecord(
                            {"num-examples": self.weights[node], "loss": float(node)}
                        ),
                    }
                )
            out.append(Message(content=content, reply_to=m))
        return out


def _round(strategy, grid, rnd=1):
    protocol = Protocol(grid)
    protocol.current_round = rnd
    return protocol, strategy.run_round(
        protocol, rnd, _adapter(0.0), ConfigRecord(), ConfigRecord()
    )


def test_federated_round_merges_valid_charts_and_averages_by_num_examples():
    grid = ScriptedGrid({1: 1.0, 2: 4.0, 3: 10.0}, {1: 1, 2: 3, 3: 4})
    s = TofDistillation(TASKS)
    protocol, out = _round(s, grid)
    # node 3's chart (count -4) is rejected and never merged
    assert sorted(s.charts) == [1, 2] and s.merged == Flowchart.merge([C1, C2])
    ph = protocol.rounds[1]["phases"]
    assert ph["flowchart"]["num_failures"] == 1
    assert "count -4 is not a positive integer" in ph["flowchart"]["failure_reasons"][0]
    assert s.history[1]["flowchart_num-selected"] == 1.5  # mean over the two valid replies
    # FedAvg by num-examples: (1*1 + 3*4 + 4*10) / 8 = 6.625
    np.testing.assert_allclose(out.arrays["lora_A"].numpy(), 6.625)
    assert out.train_metrics["loss"] == pytest.approx(2.0)
    # the merged chart went out with every train message
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train) == 3
    got = Flowchart.from_json(train[0].content[FLOWCHART_KEY]["edges"])
    assert got == s.merged and "local-only" not in train[0].content["config"]
    # a second round does not ask for flowcharts again
    protocol, _ = _round(s, grid, rnd=2)
    assert "flowchart" not in protocol.rounds[2]["phases"]


def test_a_nan_adapter_is_rejected_and_never_averaged():
    grid = ScriptedGrid({1: 1.0, 2: 4.0, 3: 10.0}, {1: 1, 2: 3, 3: 4}, nan_node=3)
    s = TofDistillation(TASKS)
    protocol, out = _round(s, grid)
    np.testing.assert_allclose(out.arrays["lora_A"].numpy(), (1 * 1 + 3 * 4) / 4)
    assert s.history[1]["num_rejected"] == 1 and s.history[1]["num_train_replies"] == 2
    reasons = protocol.rounds[1]["phases"]["train"]["failure_reasons"]
    assert reasons == ["node 3: rejected, array 'lora_A' contains NaN"]


def test_too_few_valid_adapters_keep_the_global_one():
    grid = ScriptedGrid({1: 1.0, 2: 4.0, 3: 10.0}, {1: 1, 2: 3, 3: 4}, nan_node=3)
    _, out = _round(TofDistillation(TASKS, min_replies=3), grid)
    assert out.arrays is None


def test_local_only_keeps_each_adapter_and_evaluates_it_with_its_own_chart():
    grid = ScriptedGrid({1: 1.0, 2: 4.0, 3: 10.0}, {1: 1, 2: 3, 3: 4})
    seen = []

    def each(rnd, arrays, chart):
        seen.append((float(arrays["lora_A"].numpy()[0, 0]), chart))
        return {"success": float(arrays["lora_A"].numpy()[0, 0])}

    s = TofDistillation(TASKS, share=False, aggregate=False, evaluate_each=each)
    _, out = _round(s, grid)
    assert out.arrays is None  # nothing averaged
    assert out.server_metrics["success"] == pytest.approx((1.0 + 4.0 + 10.0) / 3)
    assert seen[0] == (1.0, C1) and seen[1] == (4.0, C2)
    assert seen[2][1] == Flowchart()  # node 3's chart was rejected: it serves without one
    train = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert all(FLOWCHART_KEY not in m.content.config_records for m in train)
    assert all(m.content["config"]["local-only"] is True for m in train)
    assert s.serving_chart() is None


def test_check_adapter_reasons():
    ref = _adapter(0.0)

    def reply(arrays, n):
        content = RecordDict({"metrics": MetricRecord({"num-examples": n})})
        if arrays is not None:
            content["arrays"] = arrays
        return mock_reply(content)

    assert check_adapter(reply(None, 3), ref) == "no ArrayRecord 'arrays'"
    assert "'num-examples'=0" in check_adapter(reply(_adapter(1.0), 0), ref)
    short = ArrayRecord({"lora_A": Array(W["lora_A"])})
    assert "lora_B" in check_adapter(reply(short, 3), ref)
    assert check_adapter(reply(_adapter(1.0), 3), ref) is None
