"""FedAvg (flowerbed) with mock replies: averaging, rejection of bad replies, accounting."""

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from flowerbed.common.testing import FakeGrid, mock_reply, train_reply
from flowerbed.strategies.fedavg import FedAvg

W = np.zeros((2, 2), np.float32)


def _configured(**kw) -> FedAvg:
    s = FedAvg(min_available_nodes=1, min_train_nodes=1, **kw)
    msgs = list(
        s.configure_train(1, ArrayRecord({"w": Array(W)}), ConfigRecord(), FakeGrid([1, 2, 3]))
    )
    assert len(msgs) == 3 and all(m.content["config"]["server-round"] == 1 for m in msgs)
    return s


def test_weighted_average_of_valid_replies():
    s = _configured()
    replies = [
        train_reply({"w": np.full((2, 2), 1.0, np.float32)}, 1, node_id=1),
        train_reply({"w": np.full((2, 2), 5.0, np.float32)}, 3, node_id=2),
    ]
    arrays, metrics = s.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), 4.0))  # (1*1 + 3*5) / 4
    assert s.history[1]["num_train_replies"] == 2 and s.history[1]["num_rejected"] == 0


def test_average_is_bitwise_independent_of_arrival_order_and_timing_metrics():
    rng = np.random.default_rng(0)
    ws = [
        (rng.normal(size=(2, 2)) * 10.0 ** rng.integers(-3, 4)).astype(np.float32) for _ in range(6)
    ]
    results = []
    for order, seconds in (([0, 1, 2, 3, 4, 5], 0.1), ([5, 3, 1, 0, 4, 2], 0.7)):
        s = _configured()
        replies = [
            train_reply({"w": ws[i]}, 7 + i, node_id=i + 1, **{"train-time-s": seconds * (i + 1)})
            for i in order
        ]
        arrays, _ = s.aggregate_train(1, replies)
        results.append(arrays["w"].numpy())
    assert results[0].tobytes() == results[1].tobytes()


def test_bad_replies_are_rejected_and_never_averaged():
    s = _configured()
    nan = np.ones((2, 2), np.float32)
    nan[0, 1] = np.nan
    replies = [
        train_reply({"w": np.full((2, 2), 2.0, np.float32)}, 10, node_id=1),
        train_reply({"w": nan}, 10, node_id=2),
        train_reply({"w": np.ones((3, 2), np.float32)}, 10, node_id=3),
        train_reply({"w": np.ones((2, 2), np.float64)}, 10, node_id=4),
        train_reply({"w": np.full((2, 2), np.inf, np.float32)}, 10, node_id=5),
        train_reply({"w": np.ones((2, 2), np.float32)}, 0, node_id=6),  # zero weight
        mock_reply(error="ClientApp raised: boom", node_id=7),
    ]
    arrays, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), 2.0))
    h = s.history[1]
    assert h["num_rejected"] == 5 and h["num_failures"] == 1 and h["num_train_replies"] == 1
    reasons = " ".join(h["failure_reasons"])
    for needle in ("NaN", "shape (3, 2)", "dtype float64", "Inf", "not a finite positive", "boom"):
        assert needle in reasons


def test_too_few_valid_replies_keep_the_model():
    s = _configured(min_train_replies=2)
    arrays, metrics = s.aggregate_train(1, [train_reply({"w": np.ones((2, 2), np.float32)}, 5)])
    assert arrays is None and metrics is None


def test_update_norm_bound():
    s = _configured(max_update_norm=1.0)
    replies = [
        train_reply({"w": np.full((2, 2), 0.1, np.float32)}, 1, node_id=1),
        train_reply({"w": np.full((2, 2), 50.0, np.float32)}, 1, node_id=2),
    ]
    arrays, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), 0.1), rtol=1e-6)
    assert s.history[1]["num_rejected"] == 1


def test_update_norm_bound_is_the_distance_to_a_non_zero_global_model():
    s = FedAvg(min_available_nodes=1, min_train_nodes=1, max_update_norm=1.0)
    g = ArrayRecord({"w": Array(np.full((2, 2), 10.0, np.float32))})
    list(s.configure_train(1, g, ConfigRecord(), FakeGrid([1, 2])))
    replies = [
        # norm 20.2 but distance 0.2 to the global model: kept
        train_reply({"w": np.full((2, 2), 10.1, np.float32)}, 1, node_id=1),
        # norm 0.2 but distance 19.8: rejected
        train_reply({"w": np.full((2, 2), 0.1, np.float32)}, 1, node_id=2),
    ]
    arrays, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), 10.1), rtol=1e-6)
    assert s.history[1]["num_rejected"] == 1


def test_evaluate_aggregation_skips_bad_metrics():
    s = FedAvg()
    good = mock_reply(
        RecordDict({"metrics": MetricRecord({"accuracy": 0.5, "num-examples": 10})}),
        node_id=1,
        message_type=MessageType.EVALUATE,
    )
    bad = mock_reply(
        RecordDict({"metrics": MetricRecord({"accuracy": float("nan"), "num-examples": 10})}),
        node_id=2,
        message_type=MessageType.EVALUATE,
    )
    agg = s.aggregate_evaluate(1, [good, bad])
    assert agg["accuracy"] == 0.5 and s.history[1]["num_rejected"] == 1


def test_seeded_sampling_is_by_partition_id():
    # partition ids answered by a fake grid: node 10+i holds partition i
    class QueryGrid(FakeGrid):
        def send_and_receive(self, messages, timeout=None):
            out = []
            for m in messages:
                pid = m.metadata.dst_node_id - 10
                content = RecordDict({"metrics": MetricRecord({"partition-id": pid})})
                out.append(mock_reply(content, node_id=m.metadata.dst_node_id))
            return out

    from flowerbed.common.seeding import sample_partitions

    grid = QueryGrid([10 + i for i in range(20)])
    s = FedAvg(fraction_train=0.25, min_train_nodes=1, min_available_nodes=1, sample_seed=7)
    msgs = s.configure_train(3, ArrayRecord({"w": Array(W)}), ConfigRecord(), grid)
    got = sorted(m.metadata.dst_node_id - 10 for m in msgs)
    assert got == sample_partitions(7, 3, 20, 5)
