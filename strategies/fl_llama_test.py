"""FL-LLaMA protocol on mock replies: validation reasons, wire format (mask compression bytes by
hand), client-batch padding, and whole rounds on a fake grid with a toy linear block B (h_B = 2
h_A): rejected replies never reach B or the average, the A/C average is FedAvg by hand, each
mode calls B as it should."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from flowerbed.common.protocol import Protocol
from flowerbed.common.records import wire_nbytes
from flowerbed.common.testing import FakeGrid, mock_reply
from flowerbed.strategies.fl_llama import (
    BACK_A,
    BACK_C,
    FORWARD,
    SYNC,
    FLLlama,
    FLLlamaError,
    check_grad,
    check_hidden,
    check_lora,
    counts_from_record,
    hidden_record,
    np_record,
    pad_left,
    unpad_split,
)

D = 4


def _hidden_reply(h, counts, compressed=True, node_id=1):
    rec = hidden_record(h, counts, compressed)
    return mock_reply(RecordDict({"hidden": rec}), node_id=node_id)


def test_check_hidden_names_shape_nan_and_counts():
    h = np.zeros((2, 5, D), np.float32)
    assert check_hidden(_hidden_reply(h, [3, 5]), D) is None
    assert check_hidden(_hidden_reply(h, [3, 5], compressed=False), D) is None
    bad = np.zeros((2, 5, D + 1), np.float32)
    assert check_hidden(_hidden_reply(bad, [3, 5]), D) == (
        "hidden state has shape (2, 5, 5), expected (batch, tokens, 4)"
    )
    nan = h.copy()
    nan[1, 2, 0] = np.nan
    assert check_hidden(_hidden_reply(nan, [3, 5]), D) == "hidden state contains NaN/Inf"
    assert check_hidden(_hidden_reply(h, [0, 5]), D) == "non-pad counts [0, 5] outside 1..5"
    assert check_hidden(_hidden_reply(h, [3, 6]), D) == "non-pad counts [3, 6] outside 1..5"
    assert check_hidden(_hidden_reply(h, [3]), D) == "counts have shape (1,), expected (2,)"
    assert check_hidden(mock_reply(RecordDict()), D) == "no ArrayRecord 'hidden'"


def test_check_grad_and_lora():
    g = mock_reply(
        RecordDict(
            {"grad": np_record({"g": np.zeros((2, 5, D))}), "metrics": MetricRecord({"loss": 1.0})}
        )
    )
    assert check_grad(g, (2, 5, D)) is None
    assert check_grad(g, (2, 6, D)) == "gradient has shape (2, 5, 4), expected (2, 6, 4)"
    g.content["grad"] = np_record({"g": np.full((2, 5, D), np.inf)})
    assert check_grad(g, (2, 5, D)) == "gradient contains NaN/Inf"
    ref = np_record({"w": np.zeros(3, np.float32)})
    ok = mock_reply(RecordDict({"lora": ref, "metrics": MetricRecord({"num-examples": 3})}))
    assert check_lora(ok, ref) is None
    bad = mock_reply(
        RecordDict(
            {
                "lora": np_record({"w": np.array([0, np.nan, 0], np.float32)}),
                "metrics": MetricRecord({"num-examples": 3}),
            }
        )
    )
    assert check_lora(bad, ref).startswith("adapter: ")


def test_uncompressed_record_carries_the_mask_and_positions_and_costs_what_is_computed():
    b, length = 3, 6
    counts = np.array([2, 6, 4])
    h = np.random.default_rng(0).normal(size=(b, length, D)).astype(np.float32)
    full = hidden_record(h, counts, compressed=False)
    small = hidden_record(h, counts, compressed=True)
    assert counts_from_record(full).tolist() == counts.tolist()
    mask = full["mask"].numpy()
    assert mask.shape == (b, 1, length, length)
    # sample 0: 2 real tokens at the end, its last query sees only keys 4 and 5
    assert (mask[0, 0, -1] == 0).tolist() == [False] * 4 + [True] * 2
    assert full["position-ids"].numpy()[0].tolist() == [0, 0, 0, 0, 0, 1]
    # by hand: the mask (b*L*L float32) and position ids (b*L int64) replace the counts (b int64)
    extra = b * length * length * 4 + b * length * 8 - b * 8
    diff = wire_nbytes(RecordDict({"hidden": full})) - wire_nbytes(RecordDict({"hidden": small}))
    assert extra <= diff <= extra + 200  # + keys and protobuf framing of one more array


def test_pad_left_and_split_back():
    a = np.ones((1, 2, D))
    b = 2 * np.ones((2, 4, D))
    batch, lengths = pad_left([a, b])
    assert batch.shape == (3, 4, D) and lengths == [2, 4]
    assert (batch[0, :2] == 0).all() and (batch[0, 2:] == 1).all()
    back = unpad_split(batch, [1, 2], lengths)
    assert np.array_equal(back[0], a) and np.array_equal(back[1], b)


# ---------------------------------------------------------------------------- whole rounds
class ToyBlock:
    """h_B = 2 h_A per replica; records calls; its "adapter" is one scalar per replica."""

    def __init__(self):
        self.calls = []
        self.w = {0: 1.0}

    def forward(self, h, counts, replica=0):
        self.calls.append(("forward", h.shape, replica))
        return 2 * h

    def backward(self, grad, replica=0):
        self.calls.append(("backward", grad.shape, replica))
        self.w[replica] = self.w.get(replica, self.base) + float(grad.sum())
        return 2 * grad

    def lora(self):
        return np_record({"b.w": np.array([self.w[0]], np.float32)})

    def set_lora(self, record):
        self.base = float(record["b.w"].numpy()[0])
        self.w = dict.fromkeys(self.w, self.base)

    def average_replicas(self, weights):
        self.calls.append(("average", len(weights), None))
        avg = float(np.mean([self.w.get(i, self.w[0]) for i in range(len(weights))]))
        self.w = dict.fromkeys(self.w, avg)


class ToyGrid(FakeGrid):
    """Clients answer each phase: node 1 has 2 samples of 3 tokens, node 2 one of 5; ``bad``
    maps a node to a phase where it replies with NaN."""

    def __init__(self, bad=None, examples=None):
        super().__init__([1, 2])
        self.bad = bad or {}
        self.examples = examples or {1: 10, 2: 30}
        self.grads_a = {}
        self.lora_seen = []  # (node, step, the A/C adapter a train.forward carried)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            n, t = m.metadata.dst_node_id, m.metadata.message_type
            b, length = (2, 3) if n == 1 else (1, 5)
            bad = self.bad.get(n) == t
            if t == FORWARD:
                if "lora" in m.content.array_records:
                    w = float(m.content["lora"]["a.w"].numpy()[0])
                    self.lora_seen.append((n, int(m.content["config"]["step"]), w))
                h = np.full((b, length, D), np.nan if bad else float(n), np.float32)
                c = RecordDict({"hidden": hidden_record(h, [length] * b, True)})
            elif t == BACK_C:
                hb = m.content["hidden"]["h"].numpy()
                g = np.full(hb.shape, np.nan if bad else 0.5, np.float32)
                c = RecordDict(
                    {"grad": np_record({"g": g}), "metrics": MetricRecord({"loss": float(n)})}
                )
            elif t == BACK_A:
                self.grads_a[n] = m.content["grad"]["g"].numpy()
                c = RecordDict({"metrics": MetricRecord({"done": 1})})
            else:
                w = np.array([float(n)], np.float32)
                c = RecordDict(
                    {
                        "lora": np_record({"a.w": w}),
                        "metrics": MetricRecord({"num-examples": self.examples[n]}),
                    }
                )
            out.append(Message(content=c, reply_to=m))
        return out


def _round(mode, grid, steps=1, sync_every=0):
    block = ToyBlock()
    s = FLLlama(block, D, mode=mode, sync_steps=steps, sync_every=sync_every)
    arrays = np_record({"a.w": np.zeros(1, np.float32), "b.w": np.ones(1, np.float32)})
    proto = Protocol(grid)
    proto.current_round = 1
    out = s.run_round(proto, 1, arrays, ConfigRecord(), ConfigRecord())
    return s, block, out, proto


def test_sequential_round_fedavg_of_adapters_by_hand():
    grid = ToyGrid()
    s, block, out, proto = _round("sequential", grid)
    # A/C adapter: (10 * 1 + 30 * 2) / 40 = 1.75; B's adapter is the server's own
    assert out.arrays["a.w"].numpy()[0] == pytest.approx(1.75)
    assert [c[0] for c in block.calls] == ["forward", "backward", "forward", "backward"]
    assert out.train_metrics["loss"] == pytest.approx(1.5)  # mean of the clients' losses
    phases = proto.rounds[1]["phases"]
    assert phases[FORWARD]["calls"] == 2 and phases[SYNC]["num_replies"] == 2
    # dL/dh_A = 2 * dL/dh_B = 1.0 reached each client
    assert sorted(grid.grads_a) == [1, 2] and all(
        np.allclose(g, 1.0) for g in grid.grads_a.values()
    )


def test_client_batch_calls_b_once_on_the_padded_concatenation():
    grid = ToyGrid()
    s, block, out, _ = _round("client-batch", grid)
    assert block.calls == [("forward", (3, 5, D), 0), ("backward", (3, 5, D), 0)]
    assert grid.grads_a[1].shape == (2, 3, D) and grid.grads_a[2].shape == (1, 5, D)
    assert np.allclose(grid.grads_a[1], 1.0) and np.allclose(grid.grads_a[2], 1.0)


def test_hierarchical_uses_one_replica_per_client_and_averages_them():
    s, block, out, _ = _round("server-hierarchical", ToyGrid())
    assert ("forward", (2, 3, D), 0) in block.calls and ("forward", (1, 5, D), 1) in block.calls
    assert block.calls[-1] == ("average", 2, None)
    # from 1.0, replica 0 got the sum of 0.5 over 2*3*4 entries (+12), replica 1 over 1*5*4
    # (+10): averaged (13 + 11) / 2
    assert out.arrays["b.w"].numpy()[0] == pytest.approx(12.0)


@pytest.mark.parametrize("mode", ["sequential", "client-batch", "server-hierarchical"])
def test_nan_hidden_state_is_rejected_and_never_reaches_b(mode):
    grid = ToyGrid(bad={2: FORWARD})
    s, block, out, proto = _round(mode, grid)
    forwards = [c for c in block.calls if c[0] == "forward"]
    assert forwards and all(c[1][0] == 2 for c in forwards)  # only node 1's 2 samples
    reasons = proto.rounds[1]["phases"][FORWARD]["failure_reasons"]
    assert reasons == ["node 2: rejected, hidden state contains NaN/Inf"]
    assert s.history[1]["num_rejected"] == 1 and 2 not in grid.grads_a


def test_nan_gradient_is_rejected_and_b_gets_no_gradient_from_it():
    grid = ToyGrid(bad={2: BACK_C})
    s, block, out, proto = _round("sequential", grid)
    assert [c[0] for c in block.calls] == ["forward", "backward", "forward"]
    assert "gradient contains NaN/Inf" in proto.rounds[1]["phases"][BACK_C]["failure_reasons"][0]


def test_no_valid_adapter_is_a_named_error():
    grid = ToyGrid(examples={1: 0, 2: 0})
    with pytest.raises(FLLlamaError, match="no valid adapter in train.sync"):
        _round("sequential", grid)


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="mode 'ring'"):
        FLLlama(ToyBlock(), D, mode="ring")


@pytest.mark.parametrize("mode", ["sequential", "client-batch"])
def test_sync_every_step_sends_the_average_to_the_next_step(mode):
    """sync_every = 1: the A/C adapters are averaged after each step and the next step's
    train.forward carries the average ((10 * 1 + 30 * 2) / 40 = 1.75); by default (0) only the
    round's first step carries an adapter and train.sync runs once."""
    grid = ToyGrid()
    s, _, out, proto = _round(mode, grid, steps=3, sync_every=1)
    assert sorted(grid.lora_seen) == [
        (1, 0, 0.0),
        (1, 1, 1.75),
        (1, 2, 1.75),
        (2, 0, 0.0),
        (2, 1, 1.75),
        (2, 2, 1.75),
    ]
    assert proto.rounds[1]["phases"][SYNC]["calls"] == 3
    assert out.arrays["a.w"].numpy()[0] == pytest.approx(1.75)
    grid = ToyGrid()
    _, _, _, proto = _round(mode, grid, steps=3)
    assert sorted(grid.lora_seen) == [(1, 0, 0.0), (2, 0, 0.0)]
    assert proto.rounds[1]["phases"][SYNC]["calls"] == 1
    grid = ToyGrid()
    _, _, _, proto = _round(mode, grid, steps=4, sync_every=2)
    assert sorted(grid.lora_seen) == [(1, 0, 0.0), (1, 2, 1.75), (2, 0, 0.0), (2, 2, 1.75)]
    assert proto.rounds[1]["phases"][SYNC]["calls"] == 2


def test_negative_sync_every_is_named():
    with pytest.raises(ValueError, match="sync_every -1"):
        FLLlama(ToyBlock(), D, sync_every=-1)
