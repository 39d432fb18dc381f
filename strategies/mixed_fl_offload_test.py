"""Mixed FL offloading on fixed tensors and mock replies: the sparse FedAvg of row deltas, the
server's spreadout step by hand, the rows each client receives, the combination w_f Δ_f + w_c Δ_c,
named rejections, and the baseline's full-table exchange."""

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flowerbed.common.protocol import Protocol
from flowerbed.common.testing import ScriptGrid, mock_reply
from flowerbed.strategies.mixed_fl_offload import (
    IDS,
    IDS_TYPE,
    ROWS,
    TABLE,
    OffloadedSpreadout,
    OffloadError,
    check_ids,
    check_rows,
    scatter_mean_rows,
    spreadout_steps,
)

R = 1 / math.sqrt(2)
#: padding row, then unit rows (1,0), (r,r), (0,1): spreadout gradient by hand in the tests
TABLE3 = np.array([[0, 0], [1, 0], [R, R], [0, 1]], dtype=np.float32)


def _metrics(n: int) -> MetricRecord:
    return MetricRecord({"num-examples": n, "client-flops": 100 * n, "client-steps": 1})


def _client(ids, shift, n=1, bad=None):
    """Asks for ``ids``; returns the received rows + ``shift`` (or a malformed reply)."""

    def ask(_):
        return RecordDict(
            {
                IDS: ArrayRecord({IDS: Array(np.asarray(ids, np.int32))}),
                "metrics": MetricRecord({"num-examples": n}),
            }
        )

    def train(content):
        rows = content[ROWS][ROWS].numpy() if ROWS in content.array_records else None
        if rows is None:  # baseline: the whole table
            rows = content["arrays"][TABLE].numpy()
        out = (rows + shift).astype(np.float32)
        if bad == "nan":
            out[0, 0] = np.nan
        if bad == "shape":
            out = np.concatenate([out, out])
        return RecordDict({ROWS: ArrayRecord({ROWS: Array(out)}), "metrics": _metrics(n)})

    return {IDS_TYPE: ask, "train": train}


def _round(strategy, grid, table=TABLE3):
    protocol = Protocol(grid)
    protocol.current_round = 1
    arrays = ArrayRecord({TABLE: Array(table.copy())})
    out = strategy.run_round(protocol, 1, arrays, ConfigRecord(), ConfigRecord())
    return out, protocol


def _strategy(mode="offload", **kw):
    args = dict(w_f=0.5, w_c=0.5, spreadout_lambda=0.0, server_steps=0, lr=0.1)
    args.update(kw)
    return OffloadedSpreadout(mode, **args)


def test_scatter_mean_rows_hand_computed():
    # A: rows 1, 2 moved by 1, 2 (weight 1); B: rows 2, 3 moved by 4, 6 (weight 3); total 4
    parts = [
        (np.array([1, 2]), np.array([[1.0, 1.0], [2.0, 2.0]]), 1.0),
        (np.array([2, 3]), np.array([[4.0, 4.0], [6.0, 6.0]]), 3.0),
    ]
    got = scatter_mean_rows((4, 2), parts)
    want = np.array([[0, 0], [0.25, 0.25], [3.5, 3.5], [4.5, 4.5]])
    np.testing.assert_allclose(got, want)
    with pytest.raises(OffloadError, match="no positive weight"):
        scatter_mean_rows((4, 2), [])


def test_spreadout_step_by_hand():
    # grad of sum_{i!=j} cos^2 at unit rows: 4 sum_j (n_k.n_j) n_j, projected on the tangent:
    # row (1,0): (2,2) -> (0,2); row (r,r): radial -> 0; row (0,1): (2,2) -> (2,0)
    z = spreadout_steps(TABLE3, lam=1.0, steps=1, lr=0.1)
    want = np.array([[0, 0], [1, -0.2], [R, R], [-0.2, 1]], dtype=np.float32)
    np.testing.assert_allclose(z, want, atol=1e-6)
    np.testing.assert_array_equal(spreadout_steps(TABLE3, lam=1.0, steps=0, lr=0.1), TABLE3)


def test_offload_round_sends_only_the_clients_rows_and_averages_them():
    grid = ScriptGrid({1: _client([1, 2], 1.0), 2: _client([3], 2.0)})
    out, protocol = _round(_strategy(), grid)
    sent = {node: c for kind, node, c in grid.sent if kind == "train"}
    np.testing.assert_array_equal(sent[1][ROWS][IDS].numpy(), [1, 2])
    np.testing.assert_array_equal(sent[1][ROWS][ROWS].numpy(), TABLE3[[1, 2]])
    np.testing.assert_array_equal(sent[2][ROWS][ROWS].numpy(), TABLE3[[3]])
    assert "arrays" not in sent[1].array_records  # never the whole table
    # Δ_f = (rows 1, 2: 1/2; row 3: 2/2), Δ_c = 0 (no server step): x + 0.5 Δ_f
    want = TABLE3 + np.array([[0, 0], [0.25, 0.25], [0.25, 0.25], [0.5, 0.5]], np.float32)
    np.testing.assert_allclose(out.arrays[TABLE].numpy(), want, atol=1e-6)
    phases = protocol.rounds[1]["phases"]
    assert set(phases) == {"offload.ids", "train"}
    assert out.train_metrics["num-examples"] == 2


def test_offload_combines_the_server_step_with_weight_w_c():
    # clients return their rows unchanged (Δ_f = 0): x + w_c (z - x), z one spreadout step
    grid = ScriptGrid({1: _client([1, 2], 0.0), 2: _client([3], 0.0)})
    s = _strategy(w_f=0.7, w_c=0.3, spreadout_lambda=1.0, server_steps=1)
    out, _ = _round(s, grid)
    want = np.array([[0, 0], [1, -0.06], [R, R], [-0.06, 1]], dtype=np.float32)
    np.testing.assert_allclose(out.arrays[TABLE].numpy(), want, atol=1e-6)
    row = s.history[1]
    assert row["f_c_after"] < row["f_c_before"] and row["server_flops"] > 0


@pytest.mark.parametrize("bad", ["nan", "shape"])
def test_malformed_rows_are_rejected_and_never_averaged(bad):
    grid = ScriptGrid({1: _client([1, 2], 1.0), 2: _client([3], 5.0, bad=bad)})
    out, protocol = _round(_strategy(w_f=1.0, w_c=0.0), grid)
    new = out.arrays[TABLE].numpy()
    np.testing.assert_allclose(new[3], TABLE3[3])  # node 2's row untouched
    np.testing.assert_allclose(new[1], TABLE3[1] + 1.0)  # node 1 alone
    reasons = protocol.rounds[1]["phases"]["train"]["failure_reasons"]
    want = "NaN or Inf" if bad == "nan" else "(2, 2), expected float32 (1, 2)"
    assert len(reasons) == 1 and "rejected" in reasons[0] and want in reasons[0]


def test_bad_ids_are_named():
    def msg(ids, n=1):
        content = RecordDict({"metrics": MetricRecord({"num-examples": n})})
        if ids is not None:
            content[IDS] = ArrayRecord({IDS: Array(np.asarray(ids))})
        return mock_reply(content)

    assert check_ids(msg(np.array([1, 3], np.int32)), 3) is None
    assert "no ArrayRecord" in check_ids(msg(None), 3)
    assert "int32" in check_ids(msg(np.array([1, 3], np.int64)), 3)
    assert "strictly increasing" in check_ids(msg(np.array([3, 1], np.int32)), 3)
    assert "1..3" in check_ids(msg(np.array([1, 4], np.int32)), 3)
    assert "1..3" in check_ids(msg(np.array([0, 1], np.int32)), 3)
    assert "weight" in check_ids(msg(np.array([1], np.int32), n=0), 3)
    rows = RecordDict(
        {
            ROWS: ArrayRecord({ROWS: Array(np.zeros((2, 2), np.float32))}),
            "metrics": MetricRecord({"num-examples": 1}),
        }
    )
    assert check_rows(mock_reply(rows), (2, 2), np.float32) is None
    assert "expected float32 (3, 2)" in check_rows(mock_reply(rows), (3, 2), np.float32)


def test_baseline_sends_the_whole_table_and_takes_the_weighted_mean():
    grid = ScriptGrid({1: _client([1], 1.0, n=1), 2: _client([1], 4.0, n=3)})
    out, protocol = _round(_strategy("baseline", server_lr=1.0), grid)
    sent = [c for kind, _, c in grid.sent if kind == "train"]
    assert all(c["arrays"][TABLE].numpy().shape == TABLE3.shape for c in sent)
    assert set(protocol.rounds[1]["phases"]) == {"train"}  # no ids phase
    # weighted mean of the deltas: (1 * 1 + 3 * 4) / 4 = 3.25 on every row
    np.testing.assert_allclose(out.arrays[TABLE].numpy(), TABLE3 + 3.25, atol=1e-6)


def test_offload_downloads_far_fewer_bytes_than_the_baseline():
    table = np.random.default_rng(0).normal(size=(1001, 16)).astype(np.float32)
    rows = []
    for mode in ("offload", "baseline"):
        grid = ScriptGrid({1: _client(list(range(1, 51)), 0.0), 2: _client([7, 9], 0.0)})
        _, protocol = _round(_strategy(mode), grid, table)
        rows.append(protocol.rounds[1])
    off, base = rows
    assert off["bytes_sent"] < 0.1 * base["bytes_sent"]
    assert off["bytes_received"] < 0.1 * base["bytes_received"]


def test_bad_settings_are_named():
    with pytest.raises(OffloadError, match="mode='both'"):
        _strategy("both")
    with pytest.raises(OffloadError, match="w_f=0"):
        _strategy(w_f=0.0, w_c=0.0)
    with pytest.raises(OffloadError, match="fraction_train=0"):
        _strategy(fraction_train=0.0)
