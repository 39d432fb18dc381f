"""FedGRPO app: config, the domain tasks and rewards by hand, the clients called directly, every
method run on a test grid (no Ray) on the tiny model asserting on results.json, one `flwr run`."""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, MessageType, RecordDict

from flowerbed.common.config import ConfigError, check_pyproject
from flowerbed.common.testing import app_path, mock_reply, node_context
from flowerbed.strategies.fedgrpo import check_rewards, score_content

APP = app_path("fedgrpo")

from fedgrpo import client_app, task  # noqa: E402
from fedgrpo import domains as D  # noqa: E402

#: the smallest run that still exercises every phase (tiny model, 8-token completions)
TINY = {
    "model": "tiny",
    "num-server-rounds": 2,
    "prompts-per-round": 3,
    "group-size": 2,
    "max-new-tokens": 8,
    "eval-per-domain": 2,
    "client-examples": 8,
    "sft-steps": 2,
    "batch-size": 4,
    "mask-truncated": False,
}


def test_pyproject_defaults_are_the_schema_defaults():
    assert check_pyproject(APP, task.SCHEMA) == []


def test_bad_key_or_value_is_one_line():
    with pytest.raises(ConfigError, match=r"^unknown run config key 'rounds'; valid keys: "):
        task.parse_config({"rounds": 1})
    with pytest.raises(ConfigError, match=r"method='grpo': must be one of fedgrpo-graph"):
        task.parse_config({"method": "grpo"})
    with pytest.raises(ConfigError, match=r"ood-error=2.0"):
        task.parse_config({"ood-error": 2.0})


# ---------------------------------------------------------------------------- domains
def test_domains_solve_their_own_questions_only():
    assert D.DOMAINS[0].solve("What is 12 x 3?") == "36"
    assert D.DOMAINS[0].solve("What is 50 - 17?") == "33"
    assert D.DOMAINS[1].solve("How many minutes are in 3 hours?") == "180"
    assert D.DOMAINS[2].solve("What day of the week is 9 days before Monday?") == "Saturday"
    assert D.DOMAINS[1].solve("What is 12 x 3?") is None
    assert D.DOMAINS[0].solve("How many minutes are in 3 hours?") is None
    # generated deterministically, and every generated answer is the solver's
    assert D.items(2, 5, 7) == D.items(2, 5, 7) and D.items(2, 5, 7) != D.items(2, 5, 8)
    for k in range(3):
        assert all(D.solve(q) == a and D.domain_of(q) == k for q, a in D.items(k, 20, 1))


def test_reward_weights_by_hand():
    q = "What is 2 + 3?"
    got = D.exact_rewards(q, ["<answer>5</answer>", " <answer>6</answer>", "5", "<answer>5"])
    # 8 acc + 1 format + 1 tag-count: right 10, wrong 2, bare 0, one tag of two 0.5
    np.testing.assert_allclose(got, [10.0, 2.0, 0.0, 0.5])
    assert D.exact_rewards(q, ["<answer>5</answer><answer>5</answer>"])[0] == 8.0  # tags twice
    assert D.same_answer(" thursday.", "Thursday")


def test_expert_rewards_are_exact_in_the_domain_and_noisy_outside():
    q, comps = "What is 2 + 3?", ["<answer>5</answer>", "<answer>6</answer>"] * 50
    exact = D.exact_rewards(q, comps)
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(D.expert_rewards(q, comps, 0, 0.3, rng), exact)
    np.testing.assert_allclose(D.expert_rewards(q, comps, 1, 0.0, rng), exact)
    flipped = D.expert_rewards(q, comps, 1, 1.0, rng)
    np.testing.assert_allclose(flipped, 12.0 - exact)  # every verdict wrong: 10 <-> 2
    noisy = D.expert_rewards(q, comps, 2, 0.3, rng)
    assert 0.15 < np.mean(noisy != exact) < 0.45


def test_aux_set_has_a_right_and_a_wrong_answer_per_question():
    aux = task.aux_set(3)
    assert len(aux.questions) == 9 and aux.domains == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for q, c in zip(aux.questions, aux.completions, strict=True):
        np.testing.assert_allclose(D.exact_rewards(q, c), [10.0, 2.0])


def test_round_prompts_are_seeded_mixed_and_not_test_questions():
    cfg = task.parse_config({"prompts-per-round": 6, "eval-per-domain": 20})
    a, b = task.round_prompts(cfg, 1), task.round_prompts(cfg, 1)
    assert a == b and a != task.round_prompts(cfg, 2)
    assert sorted(D.domain_of(q) for q in a) == [0, 0, 1, 1, 2, 2]
    test = {q for dom in task.test_items(20) for q, _ in dom}
    assert not test & set(a + task.round_prompts(cfg, 2))


# ---------------------------------------------------------------------------- clients
def test_scoring_client_replies_one_scalar_per_completion_and_nothing_else():
    qs = ["What is 12 x 3?", "How many minutes are in 3 hours?"]
    comps = [["<answer>36</answer>", "<answer>35</answer>"], ["<answer>180</answer>", "x"]]
    content = score_content(1, qs, comps)
    ctx = node_context(0, 6, run_config={"ood-error": 1.0})  # client 0: arithmetic
    reply = client_app.score_completions(mock_reply(content), ctx)
    assert check_rewards(reply, 4) is None
    # arithmetic exact; units always wrong off-domain (ood-error 1): 10 -> 2, 0 -> 8
    assert reply.content["rewards"]["r"] == [10.0, 2.0, 2.0, 8.0]


def test_sft_client_step_is_seeded_and_moves_the_adapter():
    cfg = {k: str(v) if isinstance(v, bool) else v for k, v in TINY.items()}
    init = task.LoraPolicy(task.parse_config(cfg)).arrays()

    def call(rnd, arrays=init):
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd})})
        msg = mock_reply(content, message_type=MessageType.TRAIN)
        return client_app.train(msg, node_context(1, 3, run_config=cfg)).content

    a, b = call(1), call(1)
    assert all(np.array_equal(a["arrays"][k].numpy(), b["arrays"][k].numpy()) for k in init)
    assert any(not np.array_equal(a["arrays"][k].numpy(), init[k].numpy()) for k in init)
    assert a["metrics"]["num-examples"] == 8


# ---------------------------------------------------------------------------- learning signal
def test_prompt_shows_the_answer_format_with_the_demonstrations():
    c = task.Codec("tiny")
    q = "What is 12 x 3?"
    assert c.tok.decode(c.prompt(q, 0)) == "Q: What is 12 x 3?\nA:"
    one = c.tok.decode(c.prompt(q, 1))
    assert one == "Q: What is 6 + 7?\nA: <answer>13</answer>\nQ: What is 12 x 3?\nA:"
    assert c.tok.decode(c.prompt(q, 3)).count("<answer>") == 3
    # the policy uses the run's `shots` (default 1: the measured cheapest learning signal)
    policy = task.LoraPolicy(task.parse_config({"model": "tiny"}))
    assert policy.prompt(q) == c.prompt(q, 1)
    # each demonstration is right (reward 10) and is never a generated question
    for k, (dq, da) in enumerate(task.DEMOS):
        assert D.domain_of(dq) == k and D.exact_rewards(dq, [f"<answer>{da}</answer>"])[0] == 10
        assert all(dq != g for seed in range(5) for g, _ in D.items(k, 400, seed))


def test_warmup_trains_the_adapter_on_the_auxiliary_set_only(monkeypatch):
    cfg = task.parse_config({**TINY, "warmup-steps": 2})
    init = task.LoraPolicy(cfg).arrays()
    a, b = task.LoraPolicy(cfg), task.LoraPolicy(cfg)
    la, lb = task.warmup(cfg, a, log=lambda _: None), task.warmup(cfg, b, log=lambda _: None)
    assert len(la) == 2 and la == lb  # seeded
    moved = [not np.array_equal(a.arrays()[k].numpy(), init[k].numpy()) for k in init]
    assert any(moved)
    assert all(np.array_equal(a.arrays()[k].numpy(), b.arrays()[k].numpy()) for k in init)
    # no warm-up by default
    c = task.LoraPolicy(task.parse_config(TINY))
    assert task.warmup(task.parse_config(TINY), c) == []
    assert all(np.array_equal(c.arrays()[k].numpy(), init[k].numpy()) for k in init)
    # the data: the server's auxiliary questions with their answers, never a client's examples
    seen = []
    monkeypatch.setattr(
        task, "sft_steps", lambda cfg, model, data, steps, rng: seen.append(data) or [0.0]
    )
    task.warmup(cfg, c, log=lambda _: None)
    aux = task.aux_set(cfg["aux-per-domain"])
    assert [q for q, _ in seen[0]] == aux.questions
    assert all(D.solve(q) == ans for q, ans in seen[0])


def test_sft_steps_train_on_the_runs_prompt(monkeypatch):
    cfg = task.parse_config({**TINY, "shots": 2})
    policy, seen, real = task.LoraPolicy(cfg), [], task.completion_logp

    def spy(model, prompts, completions, pad, device):
        seen.append((prompts, completions))
        return real(model, prompts, completions, pad, device)

    monkeypatch.setattr(task, "completion_logp", spy)
    task.sft_steps(cfg, policy.model, [("What is 2 + 3?", "5")], 1, np.random.default_rng(0))
    c = task.codec("tiny")
    assert seen == [([c.prompt("What is 2 + 3?", 2)], [c.encode("<answer>5</answer>") + [c.eos]])]


def test_evaluator_skips_rounds_between_eval_every():
    cfg = task.parse_config({**TINY, "eval-every": 5, "num-server-rounds": 7, "eval-per-domain": 1})
    evaluate = task.evaluator(cfg, task.LoraPolicy(cfg))
    arrays = task.LoraPolicy(cfg).arrays()
    assert evaluate(3, arrays) is None
    assert {"accuracy", "format"} <= set(evaluate(5, arrays)) and evaluate(7, arrays) is not None


# ---------------------------------------------------------------------------- runs
def _run(tmp_path, method, nodes=6, **over):
    from flowerbed.simulation.local import run_local

    out = tmp_path / method
    run_local("fedgrpo", {**TINY, "method": method, "results-dir": str(out), **over}, nodes)
    rec = json.loads((out / "results.json").read_text())
    return rec, {r["round"]: r for r in rec["rounds"]}


def test_graph_run_routes_to_the_domain_experts_and_counts_the_floats(tmp_path):
    rec, rounds = _run(tmp_path, "fedgrpo-graph")
    assert sorted(rounds) == [0, 1, 2]
    r1 = rounds[1]
    graph = np.array(r1["graph"])  # partition x domain; client k is an expert of domain k % 3
    assert graph.shape == (6, 3)
    assert all(graph[k, k % 3] == 1.0 and graph[k].min() < 1.0 for k in range(6))
    # the two experts of each prompt's domain scored it: exact rewards
    assert r1["reward_error"] == 0.0 and rounds[2]["reward_error"] == 0.0
    assert r1["phases"]["probe"]["num_replies"] == 6 and "probe" not in rounds[2]["phases"]
    assert r1["phases"]["score"]["num_failures"] == 0
    final = rec["extra"]["final"]
    assert final["floats_up_per_prompt"] == 4  # M x G = 2 x 2
    # 4 floats + the record's framing, per prompt: far less than the adapter (below)
    assert 16 < final["bytes_up_per_prompt"] < 400
    assert {"acc_arithmetic", "acc_units", "acc_dates", "before_accuracy"} <= set(final)


def test_random_and_central_runs(tmp_path):
    rec, rounds = _run(tmp_path, "fedgrpo-random")
    assert "probe" not in rounds[1]["phases"]
    assert rounds[1]["reward_error"] + rounds[2]["reward_error"] > 0.0  # non-experts misjudge
    rec, rounds = _run(tmp_path, "grpo-central")
    assert rec["extra"]["totals"]["bytes_sent"] == rec["extra"]["totals"]["bytes_received"] == 0
    assert rounds[1]["reward_error"] == 0.0 and rounds[1]["prompts_used"] == 3


def test_fedavg_sft_run_sends_the_adapter(tmp_path):
    rec, rounds = _run(tmp_path, "fedavg-sft", nodes=3)
    adapter = sum(
        a.numpy().nbytes for a in task.LoraPolicy(task.parse_config(TINY)).arrays().values()
    )
    assert rounds[1]["phases"]["train"]["num_replies"] == 3
    assert rounds[1]["bytes_received"] > 3 * adapter  # every client sends its adapter back
    assert rounds[1]["server_accuracy"] >= 0.0


@pytest.mark.e2e
def test_flwr_run_end_to_end(tmp_path):
    from flowerbed.simulation.flwr_cli import flwr_run

    out = tmp_path / "e2e"
    p = flwr_run(
        "fedgrpo",
        {**TINY, "num-server-rounds": 1, "num-experts": 1, "results-dir": str(out)},
        num_supernodes=3,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads((out / "results.json").read_text())
    rounds = {r["round"]: r for r in rec["rounds"]}
    assert sorted(rounds) == [0, 1]
    # one expert per domain (3 clients, M = 1): the graph routes each prompt to it
    assert rounds[1]["phases"]["score"]["num_replies"] == 3 and rounds[1]["reward_error"] == 0.0


def test_table_command_runs_missing_cells_and_resumes(tmp_path, capsys):
    from fedgrpo import table

    sets = [f"{k}={json.dumps(v)}" for k, v in TINY.items()]  # TOML values
    args = ["--out", str(tmp_path), "--methods", "fedgrpo-graph", "--seeds", "3", "--nodes", "3"]
    text = table.main([*args, "--set", *sets, "num-server-rounds=1", "num-experts=1"])  # last wins
    res = tmp_path / "fedgrpo-graph" / "seed3" / "results.json"
    rec = json.loads(res.read_text())
    assert rec["config"]["seed"] == 3 and rec["config"]["num-server-rounds"] == 1
    row = text.splitlines()[2]
    assert row.startswith("| `fedgrpo-graph` | 3 | ")
    assert table.derived(rec)["reward_error_mean"] == 0.0  # graph: the domain experts scored
    stamp = res.stat().st_mtime_ns
    assert table.main([*args, "--limit", "1"]) == text and res.stat().st_mtime_ns == stamp
