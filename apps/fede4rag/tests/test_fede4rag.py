"""FedE4RAG app: the pair builder, the loss and the metrics against hand-computed values, the
encoder split, the client step called directly, a run of every method on a test grid (no Ray)
asserting on results.json, plaintext vs CKKS, and one `flwr run` end to end."""

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from flowerbed.common.config import ConfigError, check_pyproject
from flowerbed.common.testing import app_path, mock_reply, node_context

APP = app_path("fede4rag")

from fede4rag import client_app, data, model, task  # noqa: E402
from fede4rag.methods import METHODS  # noqa: E402

TINY = {"model": "tiny", "max-docs": 300, "local-steps": 3, "lr": 0.01, "optimizer": "adamw"}


def test_pyproject_defaults_are_the_schema_defaults():
    assert check_pyproject(APP, task.SCHEMA) == []


def test_bad_key_or_value_is_one_line():
    with pytest.raises(ConfigError, match=r"^unknown run config key 'rounds'"):
        task.parse_config({"rounds": 1})
    with pytest.raises(ConfigError, match=r"method='fedmagic': must be one of fede4rag"):
        task.parse_config({"method": "fedmagic"})
    with pytest.raises(ConfigError, match=r"batch-size=1: in-batch InfoNCE needs > 1"):
        task.parse_config({"batch-size": 1})
    with pytest.raises(ConfigError, match=r"checkpoint=true: not with he=true"):
        task.parse_config({"checkpoint": True, "he": True})


# ---------------------------------------------------------------------------- pairs
RECORDS = [
    {
        "title": "Beta",
        "extract": "Beta is a letter. It follows Alpha in the Greek alphabet order.",
        "topic": "T2",
    },
    {
        "title": "Alpha",
        "extract": "Alpha is a letter. It is the first letter of the Greek alphabet.",
        "topic": "T1",
    },
    {"title": "Gamma", "extract": "Gamma is a letter with one sentence only.", "topic": "T1"},
    {"title": "Delta", "extract": "Delta is a letter. Short.", "topic": "T2"},
]


def test_pair_builder_by_hand():
    p = data.build_pairs(RECORDS)
    # sorted by title; Gamma (one sentence) and Delta (rest < 40 characters) are dropped
    assert p.titles == ("Alpha", "Beta")
    assert p.queries == ("Alpha is a letter.", "Beta is a letter.")
    assert p.passages[0] == "It is the first letter of the Greek alphabet."
    assert p.topic_names == ("T1", "T2") and p.topics.tolist() == [0, 1]
    assert data.sentences("A b. C d? E f! g h. 3 is. x") == ["A b.", "C d?", "E f! g h.", "3 is. x"]


def _same(a, b) -> bool:
    return (a.titles, a.queries, a.passages, a.topic_names) == (
        b.titles,
        b.queries,
        b.passages,
        b.topic_names,
    ) and np.array_equal(a.topics, b.topics)


def test_real_pairs_deterministic_held_out_and_split_by_topic():
    a, b = data.build_pairs(RECORDS), data.build_pairs(list(reversed(RECORDS)))
    assert _same(a, b)  # input order does not matter
    p = data.load_pairs(300)
    assert _same(p, data.load_pairs.__wrapped__(300))  # rebuilt from the file: the same pairs
    assert len(p) > 250 and p.test_index.tolist() == list(range(0, len(p), 10))
    parts = [data.client_pairs(p, k, 5, "topic-groups", 0) for k in range(5)]
    flat = np.concatenate(parts)
    assert sorted(flat.tolist()) == p.train_index.tolist()  # every training pair, once
    assert not set(flat.tolist()) & set(p.test_index.tolist())  # held-out never trained on
    topics = [set(p.topics[i].tolist()) for i in parts]
    assert all(t for t in topics) and sum(len(t) for t in topics) == len(set.union(*topics))
    # largest topic first to the least-loaded client (hand example)
    assert data.TopicGroups.assign(np.array([0, 0, 0, 1, 1, 2]), 2) == {0: 0, 1: 1, 2: 1}


# ---------------------------------------------------------------------------- loss and metrics
def test_info_nce_by_hand():
    s = torch.tensor([[0.5, 0.1], [0.2, 0.4]])
    row0 = math.log(math.exp(0.5) + math.exp(0.1)) - 0.5
    row1 = math.log(math.exp(0.2) + math.exp(0.4)) - 0.4
    assert float(model.info_nce(s)) == pytest.approx((row0 + row1) / 2, abs=1e-6)
    t = 0.5  # temperature divides the logits
    row0 = math.log(math.exp(1.0) + math.exp(0.2)) - 1.0
    row1 = math.log(math.exp(0.4) + math.exp(0.8)) - 0.8
    assert float(model.info_nce(s, t)) == pytest.approx((row0 + row1) / 2, abs=1e-6)


def test_distillation_loss_by_hand():
    sk = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    sg = torch.tensor([[0.5, 0.0], [0.0, 0.5]], requires_grad=True)
    assert float(model.distillation(sk, sg)) == pytest.approx(0.125)  # (0.25 + 0.25) / 4
    nce = float(model.info_nce(sk))
    loss, parts = model.fede4rag_loss(sk, sg, lam=100.0)
    assert float(loss) == pytest.approx(nce + 12.5, abs=1e-5)
    assert parts == pytest.approx({"infonce": nce, "distill": 0.125})
    loss.backward()
    # d/dS_k of 100 * mean((S_k - S_g)^2) = 100 * 2 (S_k - S_g) / 4 on the diagonal: 25 more
    # than the InfoNCE gradient; the teacher gets none
    sk2 = sk.detach().clone().requires_grad_(True)
    model.info_nce(sk2).backward()
    assert (sk.grad - sk2.grad).diagonal().tolist() == pytest.approx([25.0, 25.0])
    assert sg.grad is None
    lam0, _ = model.fede4rag_loss(sk, sg, lam=0.0)
    assert float(lam0) == pytest.approx(nce)


def test_retrieval_metrics_on_a_hand_made_ranking():
    # 3 queries (unit vectors), a pool of 4 passages: score(q_i, p_j) = table[i][j]
    table = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.5, 0.4, 0.0, 0.0], [0.9, 0.8, 0.7, 0.1]])
    # gold passages 0, 1, 3 rank 0, 1 and 3 (passages scored strictly higher)
    m = model.retrieval_metrics(torch.eye(3), table.T.contiguous(), np.array([0, 1, 3]))
    assert m["hit@1"] == pytest.approx(1 / 3) and m["hit@5"] == 1.0 and m["hit@10"] == 1.0
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 3)
    # hit@k counts ranks below k: gold 3 of query 2 has rank 3, inside hit@5, outside hit@3
    assert model.retrieval_metrics(
        torch.eye(3), table.T.contiguous(), np.array([0, 1, 3]), ks=(3,)
    )["hit@3"] == pytest.approx(2 / 3)
    # a tie with the gold passage does not push it down
    tie = torch.tensor([[0.5, 0.5]])
    assert model.retrieval_metrics(torch.eye(1), tie.T.contiguous(), np.array([1]))["hit@1"] == 1.0


def test_split_encoder_equals_the_whole_model():
    cfg = task.parse_config(TINY)
    enc = task.make_encoder(cfg)
    ids, mask = model.HashTokenizer()(["a b c d", "e f"], 8)
    h = enc.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    ref = torch.nn.functional.normalize(
        (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1
    )
    got = enc.embed(enc.frozen(ids, mask), mask)
    assert torch.allclose(got, ref, atol=1e-5)
    assert set(enc.to_record().keys()) == {
        k for k in enc.bert.state_dict() if "layer.1." in k
    } or all(k.startswith("0.") for k in enc.to_record().keys())
    whole = task.make_encoder(task.parse_config({**TINY, "train-layers": 0}))
    assert any("embeddings" in k for k in whole.to_record().keys())
    assert len(whole.to_record()) > len(enc.to_record())


# ---------------------------------------------------------------------------- the client step
def _call(cfg_over, arrays, rnd, pid=0, state=None):
    ctx = node_context(pid, 3, run_config={**TINY, **cfg_over}, state=state)
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd})})
    return client_app.train(mock_reply(content), ctx).content


def _vec(rec):
    return np.concatenate([rec[k].numpy().ravel() for k in rec])


def test_client_step_seeded_and_the_switches_change_what_they_name():
    cfg = task.parse_config(TINY)
    init = task.initial_arrays(cfg)
    a = _call({"method": "fedavg-infonce"}, init, 1)
    b = _call({"method": "fedavg-infonce"}, init, 1)
    assert np.array_equal(_vec(a["arrays"]), _vec(b["arrays"]))  # (seed, partition, round)
    assert a["metrics"]["distill"] == 0.0 and a["metrics"]["unit-weight"] == 1
    # fede4rag with lambda: the distillation term is computed and changes the update
    c = _call({"method": "fede4rag-reset"}, init, 1)
    assert not np.array_equal(_vec(a["arrays"]), _vec(c["arrays"]))
    assert c["metrics"]["distill"] > 0
    assert c["metrics"]["loss"] == pytest.approx(
        c["metrics"]["infonce"] + 100 * c["metrics"]["distill"], rel=1e-5
    )
    # lambda is the only difference: lambda = 0 gives FedAvg-InfoNCE's update exactly
    z = _call({"method": "fede4rag-reset", "lambda": 0.0}, init, 1)
    assert np.array_equal(_vec(a["arrays"]), _vec(z["arrays"]))
    d = _call({"method": "fedavg-infonce"}, init, 2)  # another round: other batches
    assert not np.array_equal(_vec(a["arrays"]), _vec(d["arrays"]))


def test_persistent_student_continues_from_its_own_model():
    cfg = task.parse_config(TINY)
    init = task.initial_arrays(cfg)
    other = _call({"method": "fedavg-infonce"}, init, 1, pid=1)["arrays"]  # another "global"
    state = RecordDict()
    r1 = _call({"method": "fede4rag"}, init, 1, state=state)["arrays"]
    r2 = _call({"method": "fede4rag"}, other, 2, state=state)["arrays"]
    # round 2 started from the client's own round-1 model; `other` is only the teacher
    ref_state = RecordDict({task.STUDENT: r1})
    ref = _call({"method": "fede4rag"}, other, 2, state=ref_state)["arrays"]
    assert np.array_equal(_vec(r2), _vec(ref))
    reset = _call({"method": "fede4rag-reset"}, other, 2, state=RecordDict({task.STUDENT: r1}))
    assert not np.array_equal(_vec(reset["arrays"]), _vec(r2))  # reset starts from `other`


# ---------------------------------------------------------------------------- runs
def _run(tmp_path, name, **over):
    from flowerbed.simulation.local import run_local

    out = tmp_path / name
    run_local("fede4rag", {**TINY, "num-server-rounds": 2, "results-dir": str(out), **over}, 3)
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("method", METHODS.names)
def test_every_method_runs(tmp_path, method):
    rec = _run(tmp_path, method, method=method)
    rounds = {r["round"]: r for r in rec["rounds"]}
    assert sorted(rounds) == [0, 1, 2]
    final = rec["extra"]["final"]
    assert 0 <= final["hit@1"] <= final["hit@5"] <= final["hit@10"] <= 1
    assert final["mrr"] > 0 and np.isfinite(final["ndcg@10"])
    if method == "centralized":
        assert rec["extra"]["totals"]["bytes_sent"] == 0
    else:
        assert rounds[1]["phases"]["train"]["num_replies"] == 3
        n = 8544  # floats of the tiny encoder's top layer
        assert rounds[1]["bytes_received"] > 3 * 4 * n


def test_he_aggregate_equals_plain_and_server_sees_only_ciphertexts(tmp_path):
    plain = _run(tmp_path, "plain", method="fede4rag")
    audit = tmp_path / "audit"
    he = _run(tmp_path, "he", method="fede4rag", he=True, **{"he-audit-dir": str(audit)})
    fp, fh = plain["extra"]["final"], he["extra"]["final"]
    for k in ("hit@1", "hit@5", "hit@10", "mrr", "ndcg@10", "drift"):
        assert fh[k] == pytest.approx(fp[k], abs=1e-6)
    # the evaluator's audit of every round: CKKS mean vs plain mean of the same updates
    for r in (1, 2):
        err = {x["round"]: x for x in he["rounds"]}[r]["server_he-max-abs-err"]
        assert 0 < err <= 1e-6  # CKKS is approximate, but within 1e-6
    assert "he-max-abs-err" not in fp
    assert not any(audit.rglob("*.npy"))  # the evaluator removed the plaintext files
    r1 = {r["round"]: r for r in he["rounds"]}[1]
    assert set(r1["phases"]) == {"train.hesetup", "train", "evaluate"}
    assert r1["phases"]["train"]["num_replies"] == 3
    # ciphertexts are far larger than the floats they hold
    p1 = {r["round"]: r for r in plain["rounds"]}[1]
    assert r1["phases"]["train"]["bytes_received"] > 10 * p1["bytes_received"]
    assert r1["train_he-encrypt-s"] > 0 and r1["train_he-add-s"] > 0


def test_he_audit_error_by_hand(tmp_path):
    cfg = task.parse_config({"he": True, "he-audit-dir": str(tmp_path)})
    ups = {1: [1.0, 2.0, 3.0], 2: [3.0, 2.0, 0.0], 7: [100.0, 100.0, 100.0]}
    for node, v in ups.items():  # node 7 wrote a file but its reply was not in the sum
        task.write_audit(cfg, 4, node, ArrayRecord({"x": Array(np.array(v, np.float32))}))
    conf = ConfigRecord({"server-round": 4, "he-nodes": [1, 2]})
    # plain mean [2, 2, 1.5]; the "decrypted" mean is off by 0.25 at the last entry
    err = task.he_audit_error(cfg, conf, np.array([2.0, 2.0, 1.75]))
    assert err == pytest.approx(0.25)
    assert not (tmp_path / "r4").exists()  # the round's plaintext files are removed
    with pytest.raises(ConfigError, match="he-audit-dir set: needs he=true"):
        task.parse_config({"he-audit-dir": str(tmp_path)})


def test_drift_by_hand():
    start = np.array([3.0, 4.0])  # norm 5
    moved = ArrayRecord({"a": Array(np.array([3.0], np.float32)), "b": Array(np.array([7.0]))})
    assert task.drift(moved, start) == pytest.approx(3.0 / 5.0)
    cfg = task.parse_config(TINY)
    assert task.evaluator(cfg)(task.initial_arrays(cfg))["drift"] == 0.0


@pytest.mark.e2e
def test_flwr_run_end_to_end(tmp_path):
    from flowerbed.simulation.flwr_cli import flwr_run

    out = tmp_path / "e2e"
    p = flwr_run(
        "fede4rag", {**TINY, "num-server-rounds": 1, "results-dir": str(out)}, num_supernodes=2
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in rec["rounds"]] == [0, 1] and rec["extra"]["final"]["mrr"] > 0


# ---------------------------------------------------------------------------- slow (MiniLM)
MINILM = {
    "model": "minilm",
    "max-docs": 1000,
    "local-steps": 10,
    "optimizer": "adamw",
    "lr": 1e-4,
    "temperature": 0.05,
}


@pytest.mark.slow
def test_minilm_centralized_infonce_improves_over_the_pretrained_encoder(tmp_path):
    """Fine-tuning the top layer on the pooled pairs raises the held-out MRR above the
    pretrained all-MiniLM-L6-v2 (round 0); ~3 minutes on 2 CPU cores."""
    from flowerbed.simulation.local import run_local

    out = tmp_path / "central"
    over = {**MINILM, "method": "centralized", "num-server-rounds": 2, "results-dir": str(out)}
    run_local("fede4rag", over, 5)
    rounds = {r["round"]: r for r in json.loads((out / "results.json").read_text())["rounds"]}
    assert rounds[2]["server_mrr"] > rounds[0]["server_mrr"]


@pytest.mark.slow
def test_minilm_ckks_run_equals_the_plaintext_run(tmp_path):
    """One FedE4RAG round on MiniLM's top layer, with and without CKKS: the same metrics."""
    from flowerbed.simulation.local import run_local

    finals = []
    for he in (False, True):
        out = tmp_path / f"he{he}"
        run_local(
            "fede4rag", {**MINILM, "num-server-rounds": 1, "he": he, "results-dir": str(out)}, 5
        )
        finals.append(json.loads((out / "results.json").read_text())["extra"]["final"])
    for k in ("hit@1", "hit@10", "mrr", "ndcg@10"):
        assert finals[1][k] == pytest.approx(finals[0][k], abs=1e-6)
