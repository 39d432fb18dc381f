"""FedE4RAG strategy tests on mock replies: the CKKS aggregate equals the plaintext mean on
small vectors, the server holds only ciphertexts and a public context, malformed encrypted
replies are rejected with a named reason, and the plaintext mean is unweighted."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flowerbed.common.protocol import Protocol
from flowerbed.common.testing import mock_reply, train_reply
from flowerbed.strategies import fede4rag as F

TEMPLATE = ArrayRecord(
    {"w": Array(np.zeros((2, 3), np.float32)), "b": Array(np.zeros(2, np.float32))}
)


@pytest.fixture(scope="module")
def ctx():
    return F.new_context(8192)


@pytest.fixture(scope="module")
def public(ctx):
    import tenseal as ts

    return ts.context_from(F.public_bytes(ctx))


def _arrays(seed):
    rng = np.random.default_rng(seed)
    return ArrayRecord(
        {
            "w": Array(rng.normal(size=(2, 3)).astype(np.float32)),
            "b": Array(rng.normal(size=2).astype(np.float32)),
        }
    )


def test_encrypted_sum_decrypts_to_the_plain_mean(ctx, public):
    ups = [_arrays(s) for s in range(3)]
    enc = F.add_ciphertexts(public, [F.encrypt_arrays(ctx, a) for a in ups])
    mean = F.decrypt_mean(ctx, enc, ConfigRecord({"he-count": 3}), TEMPLATE)
    for k in ("w", "b"):
        ref = np.mean([a[k].numpy() for a in ups], axis=0)
        assert mean[k].numpy().shape == ref.shape
        np.testing.assert_allclose(mean[k].numpy(), ref, atol=1e-6)
    # the count divides: a wrong count is a different model
    wrong = F.decrypt_mean(ctx, enc, ConfigRecord({"he-count": 2}), TEMPLATE)
    assert not np.allclose(wrong["w"].numpy(), mean["w"].numpy())
    with pytest.raises(F.HEError, match="he-count=0"):
        F.decrypt_mean(ctx, enc, ConfigRecord({}), TEMPLATE)


def test_public_context_cannot_decrypt(ctx, public):
    assert ctx.is_private() and not public.is_private()
    enc = F.encrypt_arrays(ctx, _arrays(0))
    with pytest.raises(ValueError, match="secret_key"):
        F.load_ciphertext(public, enc).decrypt()


class EncryptingGrid:
    """Nodes that answer the setup with the public context and train by adding ``delta[node]``
    to the received model (decrypted when it comes encrypted); the evaluator reports the sum of
    the model's entries as ``mrr``."""

    def __init__(self, ctx, deltas):
        self.ctx, self.deltas, self.seen = ctx, deltas, []

    def get_node_ids(self):
        return sorted(self.deltas)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            node, c = m.metadata.dst_node_id, m.content
            self.seen.append(m)
            if m.metadata.message_type == F.SETUP:
                rd = RecordDict({"he": ConfigRecord({"public-context": F.public_bytes(self.ctx)})})
            else:
                if "enc" in c.array_records:
                    model = F.decrypt_mean(self.ctx, c["enc"], c["config"], TEMPLATE)
                else:
                    model = c["arrays"]
                if m.metadata.message_type == "evaluate":
                    total = float(F.flatten(model).sum())
                    rd = RecordDict({"metrics": MetricRecord({"mrr": total})})
                else:
                    new = ArrayRecord(
                        {k: Array(model[k].numpy() + self.deltas[node]) for k in model}
                    )
                    rd = RecordDict(
                        {
                            "enc": F.encrypt_arrays(self.ctx, new),
                            "metrics": MetricRecord({"num-examples": 1, "loss": float(node)}),
                        }
                    )
            out.append(Message(content=rd, reply_to=m))
        return out


def test_rounds_under_ckks_equal_the_plain_mean_and_the_server_holds_ciphertexts(ctx):
    from flowerbed.common.testing import FakeGrid

    FakeGrid([1])  # task identity for building messages
    grid = EncryptingGrid(ctx, {1: 0.5, 2: 1.0, 3: 3.0})
    proto = Protocol(grid)
    s = F.EncryptedMean(num_values=8)
    init = ArrayRecord(
        {"w": Array(np.ones((2, 3), np.float32)), "b": Array(np.zeros(2, np.float32))}
    )
    proto.current_round = 1  # as round_loop does
    out1 = s.run_round(proto, 1, init, ConfigRecord(), ConfigRecord())
    # plain mean after round 1: init + mean(delta) = init + 1.5; evaluator sums 8 entries
    assert out1.arrays is None  # the server has no plaintext model to return
    assert out1.server_metrics["mrr"] == pytest.approx(6 * 2.5 + 2 * 1.5, abs=1e-5)
    proto.current_round = 2
    out2 = s.run_round(proto, 2, init, ConfigRecord(), ConfigRecord())
    assert out2.server_metrics["mrr"] == pytest.approx(6 * 4.0 + 2 * 3.0, abs=1e-5)
    assert out2.train_metrics["loss"] == pytest.approx(2.0) and out2.train_metrics["he-add-s"] > 0
    # what the server holds: a public context, a ciphertext (uint8) and a count, nothing else
    assert not s.public.is_private()
    assert list(s.encrypted_sum.keys()) == ["ciphertext"]
    assert s.encrypted_sum["ciphertext"].numpy().dtype == np.uint8 and s.count == 3
    with pytest.raises(ValueError, match="secret_key"):
        F.load_ciphertext(s.public, s.encrypted_sum).decrypt()
    # from round 2 on, the clients receive only the encrypted sum
    r2 = [m for m in grid.seen if m.metadata.message_type == "train"][3:]
    assert all(set(m.content.array_records) == {"enc"} for m in r2)
    assert all(m.content["config"]["he-count"] == 3 and m.content["config"]["he"] for m in r2)
    assert proto.rounds[1]["phases"]["train"]["bytes_received"] > 3 * 8 * 1000  # ciphertexts
    # the evaluator is told whose updates the sum holds (for the simulation's audit)
    ev = [m for m in grid.seen if m.metadata.message_type == "evaluate"]
    assert [m.metadata.dst_node_id for m in ev] == [1, 1]
    assert list(ev[-1].content["config"]["he-nodes"]) == [1, 2, 3]


def test_malformed_encrypted_replies_are_rejected_with_a_reason(ctx, public):
    s = F.EncryptedMean(num_values=8)
    s.public = public

    def rep(array_records, metrics=None):
        rd = RecordDict({"metrics": MetricRecord(metrics or {"num-examples": 1})})
        for k, v in array_records.items():
            rd[k] = v
        return mock_reply(rd)

    good = F.encrypt_arrays(ctx, _arrays(0))
    assert s.check_update(rep({"enc": good})) is None
    assert "expected only ArrayRecord 'enc'" in s.check_update(rep({"arrays": _arrays(0)}))
    assert "expected only ArrayRecord 'enc'" in s.check_update(
        rep({"enc": good, "arrays": _arrays(0)})
    )
    junk = ArrayRecord({"ciphertext": Array(np.arange(50, dtype=np.uint8))})
    assert "ciphertext does not deserialize" in s.check_update(rep({"enc": junk}))
    floats = ArrayRecord({"ciphertext": Array(np.zeros(4, np.float32))})
    assert "1-D uint8" in s.check_update(rep({"enc": floats}))
    short = F.encrypt_arrays(ctx, ArrayRecord({"b": Array(np.zeros(3, np.float32))}))
    assert s.check_update(rep({"enc": short})) == "ciphertext holds 3 values, expected 8"
    assert "not finite" in s.check_update(
        rep({"enc": good}, {"num-examples": 1, "loss": float("nan")})
    )
    # a setup reply carrying the secret key is refused
    secret = mock_reply(
        RecordDict({"he": ConfigRecord({"public-context": ctx.serialize(save_secret_key=True)})})
    )
    assert s.check_setup(secret) == "the context carries the secret key"
    assert (
        s.check_setup(mock_reply(RecordDict()))
        == "no ConfigRecord 'he' with bytes 'public-context'"
    )


def test_plain_mean_is_unweighted():
    s = F.make_plain_mean({"seed": 0, "min-train-replies": 1})
    init = ArrayRecord({"x": Array(np.zeros(2, np.float32))})
    s._global = init
    reps = [
        train_reply({"x": np.array([1.0, 1.0], np.float32)}, 10, node_id=1, **{"unit-weight": 1}),
        train_reply({"x": np.array([4.0, 7.0], np.float32)}, 1000, node_id=2, **{"unit-weight": 1}),
    ]
    arrays, _ = s.aggregate_train(1, reps)
    np.testing.assert_allclose(arrays["x"].numpy(), [2.5, 4.0])  # not weighted by num-examples
