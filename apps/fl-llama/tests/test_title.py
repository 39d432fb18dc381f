"""FL-LLaMA's second task, summary -> title generation (``task = "title"``): the examples are
built deterministically, the loss mask covers exactly the title's tokens and its end token,
exact match and token F1 by hand, the harness's generated titles are cut at the end token, and
an in-process run on the tiny model reports both metrics and learns."""

import json

import numpy as np
import pytest
import torch

from flowerbed.common.config import ConfigError
from flowerbed.common.testing import app_path

APP = app_path("fl-llama")

from flllama import data as D  # noqa: E402
from flllama import task  # noqa: E402

# the tiny schedule of test_fl_llama_app.py, on the title task with short generated titles
TINY = dict(model="tiny", task="title", lr=5e-3, **{"num-server-rounds": 2, "sync-steps": 3})
TINY.update({"max-chars": 40, "eval-samples": 8, "title-tokens": 6})


def test_title_examples_are_deterministic_and_only_the_title_is_scored():
    tok, rows = D.CharTokenizer(), D.load_summaries()
    idx = [3, 70, 1500]
    a = D.make_batch(tok, rows, idx, 40, "title")
    b = D.make_batch(tok, rows, idx, 40, "title")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for row, i in enumerate(idx):
        title, text, _ = rows[i]
        target = tok.title_target(title)
        assert target == tok.prompt(title, len(title))[:-1] + [tok.SEP]  # chars + end token
        scored = a["labels"][row][a["labels"][row] != -100].tolist()
        assert scored == target and len(scored) == len(title) + 1
        # the scored tokens are the sequence's last ones; the prompt (summary) is never scored
        n = int(a["counts"][row])
        seq = a["input_ids"][row, -n:].tolist()
        assert seq == tok.title_prompt(text, 40) + target
        assert (a["labels"][row, : a["labels"].shape[1] - len(target)] == -100).all()
        assert tok.decode(target) == title.lower()
    with pytest.raises(D.TaskDataError, match="task 'tag': one of topic, title"):
        D.make_batch(tok, rows, idx, 40, "tag")
    with pytest.raises(ConfigError, match=r"task='tag': must be one of topic, title"):
        task.parse_config({"task": "tag"})
    # the client's batches of the title task: seeded by (seed, client, round, step), topic split
    cfg = task.parse_config(TINY)
    c1, c2 = task.client_batch(cfg, 1, 3, 2, 0), task.client_batch(cfg, 1, 3, 2, 0)
    assert torch.equal(c1["labels"], c2["labels"]) and {int(t) % 3 for t in c1["topic"]} == {1}


def test_exact_match_and_token_f1_by_hand():
    # normalised words: lower case, punctuation removed
    assert D.normalize("The Cat-sat!") == ["the", "cat", "sat"]
    assert D.title_scores("The cat!", "the Cat") == (1.0, 1.0)
    # shared words 2 ("cat", "sat"): precision 2/3, recall 2/3 -> F1 2/3
    assert D.title_scores("the cat sat", "cat sat down") == (0.0, pytest.approx(2 / 3))
    # 3 gold words: precision 1/1, recall 1/3 -> F1 2 * 1 * (1/3) / (4/3) = 0.5
    assert D.title_scores("paris", "Paris, Texas (city)") == (0.0, pytest.approx(0.5))
    # precision 1/2, recall 1/1 -> F1 2 * 0.5 * 1 / 1.5 = 2/3
    assert D.title_scores("paris texas", "Paris") == (0.0, pytest.approx(2 / 3))
    # multisets: "a a b" vs "a b b" share one a and one b
    assert D.title_scores("a a b", "a b b") == (0.0, pytest.approx(2 / 3))
    assert D.title_scores("dog", "cat") == (0.0, 0.0)
    assert D.title_scores("", "cat") == (0.0, 0.0)
    assert D.cut_at([5, 6, 13, 7, 13], 13) == [5, 6] and D.cut_at([5, 6], 13) == [5, 6]
    pairs = [("the cat sat", "cat sat down"), ("Paris", "paris"), ("dog", "cat")]
    got = task.title_metrics(pairs)
    assert got["exact_match"] == pytest.approx(1 / 3)
    assert got["token_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_generated_titles_are_cut_at_the_end_token_and_decoded(monkeypatch):
    cfg = task.parse_config(TINY)
    idx = task.eval_indices(cfg)[:3]
    tok, rows = D.CharTokenizer(), D.load_summaries()
    calls = []

    def fake(client, server, ids, counts, n, **kw):
        calls.append(n)
        a, b = tok.title_target("ab c"), tok.title_target("x")
        out = [a + [20] * n, b + a + [20] * n, [16] * (n + 5)]
        return torch.tensor([r[:n] for r in out[: len(ids)]])

    monkeypatch.setattr(task, "split_generate", fake)
    got = task.generated_titles({**cfg, "title-tokens": 6}, None, idx)
    assert calls == [6]
    # row 0: "ab c" + end; row 1: "x" + end + ... (cut); row 2: no end in 6 tokens: all kept
    assert [p for p, _ in got] == ["ab c", "x", "cccccc"]
    assert [g for _, g in got] == [rows[int(i)][0] for i in idx]


def test_title_run_in_process_reports_exact_match_and_f1_and_learns(tmp_path):
    from flowerbed.simulation.local import run_local

    out = tmp_path / "title"
    run_local("fl-llama", {**TINY, "results-dir": str(out)}, num_supernodes=2)
    rec = json.loads((out / "results.json").read_text())
    rounds = {r["round"]: r for r in rec["rounds"]}
    assert sorted(rounds) == [0, 1, 2] and rounds[1]["num_rejected"] == 0
    for r in rounds.values():
        assert 0 <= r["server_exact_match"] <= r["server_token_f1"] + 1e-12 <= 1 + 1e-12
        assert "server_accuracy" not in r  # the topic metric is not computed for titles
    assert rounds[2]["server_loss"] < rounds[0]["server_loss"] - 0.05
    assert np.isfinite(rounds[2]["loss"])
