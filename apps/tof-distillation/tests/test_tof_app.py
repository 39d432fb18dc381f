"""TOF distillation app: config, the clients called directly, every method run on a test grid (no
Ray) with the tiny model asserting on results.json, one `flwr run`, and a slow learning check."""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, MessageType, RecordDict

from flowerbed.common.config import ConfigError, check_pyproject
from flowerbed.common.testing import app_path, mock_reply, node_context
from flowerbed.strategies.tof_distillation import FLOWCHART_KEY, check_flowchart, read_flowchart

APP = app_path("tof-distillation")

from tofdistill import client_app, task  # noqa: E402
from tofdistill import domains as D  # noqa: E402
from tofdistill.methods import METHODS  # noqa: E402

#: the smallest run that exercises every phase (tiny model, 2 tokens per action)
TINY = {
    "model": "tiny",
    "num-server-rounds": 2,
    "dialogues-per-task": 8,
    "synthetic-per-task": 4,
    "local-steps": 2,
    "batch-size": 4,
    "eval-users": 1,
    "max-new-tokens": 2,
}


def test_pyproject_defaults_are_the_schema_defaults():
    assert check_pyproject(APP, task.SCHEMA) == []


def test_bad_key_or_value_is_one_line():
    with pytest.raises(ConfigError, match=r"^unknown run config key 'rounds'; valid keys: "):
        task.parse_config({"rounds": 1})
    with pytest.raises(
        ConfigError, match=r"method='tof': must be one of tof-fed, tof-fed-unguided"
    ):
        task.parse_config({"method": "tof"})
    with pytest.raises(ConfigError, match=r"selection='best': must be one of lp, greedy, ilp"):
        task.parse_config({"selection": "best"})
    with pytest.raises(ConfigError, match=r"tasks-per-client=5"):
        task.parse_config({"tasks-per-client": 5})


def test_method_table_flags():
    assert METHODS["tof-fed"].flags == {"guided": True, "share": True, "aggregate": True}
    assert METHODS["tof-fed-unguided"].flag("guided") is False
    assert METHODS["tof-local"].flag("share") is False and not METHODS["tof-local"].flag(
        "aggregate"
    )
    assert {m.kind for m in METHODS.values()} == {"reconstruction", "ablation", "baseline"}


def test_task_partitioner_shares_every_task_between_two_clients():
    assert task.client_tasks(0, 2) == ["order_tracking", "refund"]
    assert task.client_tasks(3, 2) == ["account_reset", "order_tracking"]
    owners = [t for k in range(4) for t in task.client_tasks(k, 2)]
    assert all(owners.count(t) == 2 for t in D.TASKS)


def _cfg(**over):
    return {k: str(v) if isinstance(v, bool) else v for k, v in {**TINY, **over}.items()}


def test_flowchart_client_sends_a_valid_chart_of_its_tasks_and_no_dialogue():
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    msg = mock_reply(content, message_type="train.flowchart")
    reply = client_app.flowchart(msg, node_context(1, 4, run_config=_cfg()))
    assert check_flowchart(reply, D.TASKS) is None
    chart = read_flowchart(reply.content)
    assert chart.tasks == ("hotel_booking", "refund")
    m = reply.content["metrics"]
    assert 0 < m["num-selected"] < 16 and m["selected-cost"] < m["total-cost"]
    assert m["node_coverage"] > 0.9 and m["edge_precision"] == 1.0 and m["edge_recall"] < 1.0
    # no utterance of the client's dialogues is in the reply: only labels and counts
    texts = {t.text for d in task.client_data(task.parse_config(_cfg()), 1)[1] for t in d.turns}
    wire = reply.content[FLOWCHART_KEY]["edges"]
    assert not any(len(t) > 8 and t in wire for t in texts)


def test_train_client_is_seeded_uses_the_received_chart_and_moves_the_adapter():
    cfg = task.parse_config(_cfg())
    init = task.initial_arrays(cfg)
    chart = task.client_data(cfg, 2)[2]

    def call(rnd, with_chart=False, method="tof-fed"):
        content = RecordDict({"arrays": init, "config": ConfigRecord({"server-round": rnd})})
        if with_chart:
            content[FLOWCHART_KEY] = chart.record()
        msg = mock_reply(content, message_type=MessageType.TRAIN)
        ctx = node_context(0, 4, run_config=_cfg(method=method))
        return client_app.train(msg, ctx).content

    a, b = call(1), call(1)
    assert all(np.array_equal(a["arrays"][k].numpy(), b["arrays"][k].numpy()) for k in init)
    assert any(not np.array_equal(a["arrays"][k].numpy(), init[k].numpy()) for k in init)
    # client 0 (order_tracking, refund) given client 2's chart (hotel, account): no task in
    # common, so it has no synthetic dialogue; with its own chart it has 8
    with pytest.raises(ValueError, match=r"client 0: the flowchart has none of its tasks"):
        call(1, with_chart=True)
    own = call(1)["metrics"]["num-examples"]
    assert own == sum(len(d.turns) for d in _own_synthetic(cfg, 0))
    unguided = call(1, method="tof-fed-unguided")
    assert unguided["metrics"]["num-examples"] == own
    assert any(
        not np.array_equal(unguided["arrays"][k].numpy(), a["arrays"][k].numpy()) for k in init
    )  # the flowchart in the prompt changes what is learned


def test_tiny_student_trains_its_embeddings_and_head_in_full():
    cfg = task.parse_config(_cfg())
    init = task.initial_arrays(cfg)
    v = task.codec("tiny").vocab_size
    full = [k for k in init if any(m in k for m in task.TINY_FULL)]
    # the embeddings and the head travel with the LoRA tensors, whole (V x width), and move
    assert {m for m in task.TINY_FULL if any(m in k for k in full)} == set(task.TINY_FULL)
    assert all(init[k].numpy().shape[0] == v for k in full)
    assert any("lora_A" in k for k in init) and any("lora_B" in k for k in init)
    new, _ = task.client_fit(cfg, 0, 1, init, None)
    assert all(not np.array_equal(new[k].numpy(), init[k].numpy()) for k in full)


def _own_synthetic(cfg, pid):
    from tofdistill import simulate as M

    from flowerbed.common.seeding import derive_seed

    tasks, _, chart, _ = task.client_data(cfg, pid)
    return M.synthesize(
        chart, tasks, cfg["synthetic-per-task"], derive_seed(cfg["seed"], pid, 0x5D)
    )


def test_guided_prompts_carry_the_chart_of_the_service_only():
    cfg = task.parse_config(_cfg())
    chart = task.client_data(cfg, 0)[2]
    guided, plain = task.chart_text(chart, True), task.chart_text(chart, False)
    assert guided("refund") == chart.serialize("refund") and "offer_refund" in guided("refund")
    assert guided("hotel_booking") is None and plain("refund") is None


# ---------------------------------------------------------------------------- runs
def _run(tmp_path, method, nodes=4, **over):
    from flowerbed.simulation.local import run_local

    out = tmp_path / method
    run_local(
        "tof-distillation", {**TINY, "method": method, "results-dir": str(out), **over}, nodes
    )
    rec = json.loads((out / "results.json").read_text())
    return rec, {r["round"]: r for r in rec["rounds"]}


def test_federated_run_merges_sends_adapters_and_evaluates(tmp_path):
    rec, rounds = _run(tmp_path, "tof-fed")
    assert sorted(rounds) == [0, 1, 2]
    r1, r2 = rounds[1], rounds[2]
    assert r1["phases"]["flowchart"]["num_replies"] == 4 and "flowchart" not in r2["phases"]
    assert r1["num_flowcharts"] == 4 and r1["merged_edges"] > 30
    assert r1["phases"]["train"]["num_replies"] == r2["phases"]["train"]["num_replies"] == 4
    adapter = sum(a.numpy().nbytes for a in task.initial_arrays(task.parse_config(TINY)).values())
    assert r2["phases"]["train"]["bytes_received"] > 4 * adapter
    # the merged chart goes down with the adapter: more bytes sent than received per round
    assert r2["phases"]["train"]["bytes_sent"] > r2["phases"]["train"]["bytes_received"]
    assert "server_success" not in r1 and "server_success" in r2  # the last round only
    final = rec["extra"]["final"]
    for key in ("success", "inform", "action_accuracy", "turns", "chart_edge_recall"):
        assert key in final
    # merging the four clients' charts recalls more ground-truth edges than a client's own
    assert final["chart_edge_recall"] > final["flowchart_edge_recall"]
    assert final["chart_edge_precision"] == 1.0 and 0 < final["flowchart_num-selected"] < 16


def test_local_only_run_averages_nothing(tmp_path):
    rec, rounds = _run(tmp_path, "tof-local", nodes=2, **{"num-server-rounds": 1})
    r1 = rounds[1]
    assert r1["phases"]["train"]["num_replies"] == 2
    # no merged chart goes down: what is sent is the adapter (and config) only
    assert r1["phases"]["train"]["bytes_sent"] < r1["phases"]["train"]["bytes_received"] + 400
    final = rec["extra"]["final"]
    assert "chart_edge_recall" not in final and "success" in final


def test_pooled_raw_sends_nothing(tmp_path):
    rec, rounds = _run(tmp_path, "pooled-raw-unguided", **{"num-server-rounds": 1})
    assert rec["extra"]["totals"]["bytes_sent"] == rec["extra"]["totals"]["bytes_received"] == 0
    # the pooled chart is built from every raw dialogue (agent errors resolved away)
    final = rec["extra"]["final"]
    assert final["chart_node_coverage"] > 0.9 and final["chart_edge_precision"] == 1.0
    assert rounds[1]["train_num-examples"] > 0


@pytest.mark.e2e
def test_flwr_run_end_to_end(tmp_path):
    from flowerbed.simulation.flwr_cli import flwr_run

    out = tmp_path / "e2e"
    p = flwr_run(
        "tof-distillation",
        {**TINY, "num-server-rounds": 1, "results-dir": str(out)},
        num_supernodes=2,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads((out / "results.json").read_text())
    rounds = {r["round"]: r for r in rec["rounds"]}
    assert sorted(rounds) == [0, 1]
    assert rounds[1]["phases"]["flowchart"]["num_replies"] == 2
    assert rounds[1]["phases"]["train"]["num_replies"] == 2 and "success" in rec["extra"]["final"]


#: the tiny model's learning configuration (the slow check and the README's tiny table)
LEARN = {
    "num-server-rounds": 3,
    "synthetic-per-task": 30,
    "local-steps": 20,
    "batch-size": 16,
    "lr": 1e-2,
    "eval-users": 4,
    "decode": "score",
}


@pytest.mark.slow
def test_tiny_student_learns_the_actions(tmp_path):
    """The tiny student, trained on the merged chart's synthetic dialogues, predicts most next
    actions; the same student untrained (the initial adapter) does not."""
    rec, _ = _run(tmp_path, "tof-fed-unguided", **LEARN)
    trained = rec["extra"]["final"]["action_accuracy"]
    cfg = task.parse_config({**TINY, **LEARN, "method": "tof-fed-unguided"})
    untrained = task.evaluate(cfg, task.initial_arrays(cfg), None)["action_accuracy"]
    assert untrained < 0.2 < 0.45 < trained, (untrained, trained)
