"""PrivFusion relay with mock replies: phases, routing, validation reasons, epsilon bookkeeping."""

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flowerbed.common.protocol import Protocol
from flowerbed.common.testing import ScriptGrid, mock_reply
from flowerbed.strategies.privfusion import (
    ALIGN,
    FUSE,
    LOCAL,
    PrivFusion,
    PrivFusionError,
    check_package,
    party_epsilons,
    released_epsilon,
)

TEMPLATE = ArrayRecord({"0.weight": Array(np.zeros((2, 3), np.float32))})


def _arrays(value: float, shape=(2, 3), dtype=np.float32) -> ArrayRecord:
    return ArrayRecord({"0.weight": Array(np.full(shape, value, dtype))})


def _acts(value: float = 0.5) -> ArrayRecord:
    return ArrayRecord({"act.0": Array(np.full((2, 2), value, np.float32))})


def _party(pid: int, weight: float, eps: float, acts: float = 0.5, adapter: float = 0.3):
    def local(_):
        return RecordDict(
            {
                "weights": _arrays(weight),
                "acts": _acts(acts),
                "metrics": MetricRecord(
                    {"partition-id": pid, "eps_spent": eps, "num-examples": 10 * (pid + 1)}
                ),
            }
        )

    def align(content):
        # the aligned model is the received reference + own weight (visible to the test)
        ref = float(content["weights"]["0.weight"].numpy()[0, 0])
        return RecordDict(
            {
                "weights": _arrays(ref + weight),
                "metrics": MetricRecord({"partition-id": pid, "moved_neurons": pid}),
            }
        )

    def fuse(content):
        models = [content[k]["0.weight"].numpy() for k in sorted(content.array_records)]
        own = np.full((2, 3), weight, np.float32)
        fused = np.mean([*models, own], axis=0)
        return RecordDict(
            {
                "fused": ArrayRecord({"0.weight": Array(fused.astype(np.float32))}),
                "adapted": ArrayRecord({"up": Array(np.ones(2, np.float32))}),
                "metrics": MetricRecord(
                    {"partition-id": pid, "eps_adapter": adapter, "fused_models": len(models) + 1}
                ),
            }
        )

    return {LOCAL: local, ALIGN: align, FUSE: fuse}


def _run(grid, **kw):
    seen = {}

    def evaluate(parties, fused, adapted):
        seen.update(parties=dict(parties), fused=fused, adapted=adapted)
        return {"privfusion_accuracy": 0.5}

    s = PrivFusion(evaluate=evaluate, **kw)
    proto = Protocol(grid)
    proto.current_round = 1
    out = s.run_round(proto, 1, TEMPLATE, ConfigRecord(), ConfigRecord())
    return s, proto, out, seen


def test_released_and_composed_epsilon_hand_computed():
    assert math.isinf(released_epsilon(-1.0)) and released_epsilon(2.5) == 2.5
    assert released_epsilon(0.0) == 0.0  # a zero budget is not "no privacy"
    # fusing party 1: 3.6 + 0.4 = 4.0; the others keep what they reported
    assert party_epsilons({0: 3.5, 1: 3.6, 2: -1.0}, 1, 0.4) == {0: 3.5, 1: 4.0, 2: math.inf}
    assert party_epsilons({0: 3.5}, 0, -1.0) == {0: math.inf}  # adapter without privacy


def test_round_routes_reference_and_fuses_aligned_models():
    grid = ScriptGrid({1: _party(0, 1.0, 3.5), 2: _party(1, 2.0, 3.6), 3: _party(2, 4.0, 3.7)})
    s, proto, out, seen = _run(grid, fusing_party=1)
    kinds = [k for k, _, _ in grid.sent]
    assert kinds == [LOCAL] * 3 + [ALIGN] * 2 + [FUSE]
    # train.align goes to the two non-fusing parties with the fusing party's package (2.0)
    aligns = [(n, c) for k, n, c in grid.sent if k == ALIGN]
    assert [n for n, _ in aligns] == [1, 3]
    for _, c in aligns:
        assert float(c["weights"]["0.weight"].numpy()[0, 0]) == 2.0
        assert float(c["acts"]["act.0"].numpy()[0, 0]) == 0.5
    # train.fuse goes to the fusing party's node with the aligned models 2+1 and 2+4
    ((node, content),) = [(n, c) for k, n, c in grid.sent if k == FUSE]
    assert node == 2 and sorted(content.array_records) == ["aligned.0", "aligned.2"]
    # fused = mean(3, 6, own 2) = 11/3: the round's arrays are the fused model
    np.testing.assert_allclose(out.arrays["0.weight"].numpy(), np.full((2, 3), 11 / 3), rtol=1e-6)
    assert seen["fused"] is out.arrays and seen["adapted"] is not None
    assert sorted(seen["parties"]) == [0, 1, 2]
    assert out.server_metrics["privfusion_accuracy"] == 0.5
    assert out.train_metrics["num-examples"] == 10 + 20 + 30
    # epsilon: the fusing party adds its adapter's 0.3, the others do not
    assert s.epsilons == pytest.approx({0: 3.5, 1: 3.9, 2: 3.7})
    assert s.final_metrics()["epsilon_max"] == pytest.approx(3.9)
    h = s.history[1]
    assert h["parties"] == 3 and h["aligned_parties"] == 2 and h["moved_neurons"] == 0 + 2
    assert h["fused_models"] == 3 and h["num_failures"] == 0
    assert h["epsilon_max"] == pytest.approx(3.9)  # the largest per-party sum, not the smallest
    assert s.final_metrics()["party2_epsilon"] == pytest.approx(3.7)
    row = proto.rounds[1]
    assert list(row["phases"]) == [LOCAL, ALIGN, FUSE]
    assert row["bytes_sent"] == sum(p["bytes_sent"] for p in row["phases"].values()) > 0


def test_invalid_packages_are_left_out_with_named_reasons():
    grid = ScriptGrid(
        {
            1: _party(0, 1.0, 3.5),
            2: _party(1, float("nan"), 3.6),  # NaN weights
            3: _party(2, 4.0, 3.7, acts=float("inf")),  # Inf activation statistics
        }
    )
    s, proto, out, seen = _run(grid, fusing_party=0)
    failures = proto.rounds[1]["phases"][LOCAL]["failure_reasons"]
    assert any("node 2: rejected, weights: array '0.weight' contains NaN" in r for r in failures), (
        failures
    )
    assert any("node 3: rejected, activation statistics contain NaN/Inf" in r for r in failures)
    assert [k for k, _, _ in grid.sent].count(ALIGN) == 0  # nobody left to align
    np.testing.assert_allclose(out.arrays["0.weight"].numpy(), 1.0)  # own model only
    assert sorted(seen["parties"]) == [0] and s.history[1]["num_failures"] == 2
    assert s.epsilons == pytest.approx({0: 3.8})


def test_shape_mismatch_and_missing_records_are_named():
    good = _party(0, 1.0, 3.5)[LOCAL](None)
    assert check_package(mock_reply(good), TEMPLATE) is None
    bad = RecordDict({**good, "weights": _arrays(1.0, shape=(3, 3))})
    assert "shape (3, 3), expected (2, 3)" in check_package(mock_reply(bad), TEMPLATE)
    no_acts = RecordDict({k: v for k, v in good.items() if k != "acts"})
    assert check_package(mock_reply(no_acts), TEMPLATE) == "no ArrayRecord 'acts'"


def test_fusing_party_without_valid_package_stops_the_round():
    grid = ScriptGrid({1: _party(0, 1.0, 3.5), 2: _party(1, float("nan"), 3.6)})
    with pytest.raises(PrivFusionError, match="fusing-party=1 did not return a valid package"):
        _run(grid, fusing_party=1)
    assert [k for k, _, _ in grid.sent] == [LOCAL, LOCAL]  # nothing relayed
