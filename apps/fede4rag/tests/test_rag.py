"""The local RAG example: question builder and answer check by hand, top-k retrieval on a
hand-made pool, the evaluation with a stub reader (what each condition gets as context), the
tiny reader, and the retriever's embeddings against the app's evaluator."""

import json

import numpy as np
import pytest
import torch

from flowerbed.common.testing import app_path

APP = app_path("fede4rag")

from fede4rag import data, rag, task  # noqa: E402

TINY = {"model": "tiny", "max-docs": 300}


def test_question_by_hand():
    q = rag.make_question(
        3, "Acme is a firm.", "It makes tools. It was founded in 2004 by Bo, in 2004 exactly. Then."
    )
    assert q == rag.Question(
        3, "Acme is a firm.", "It was founded in ____ by Bo, in ____ exactly.", "2004"
    )
    assert q.text() == f"Acme is a firm.\n{q.cloze}\n{rag.INSTRUCTION}"
    assert rag.make_question(0, "A.", "Over 1,500 species live here. 7 more.").answer == "1,500"
    assert rag.make_question(0, "A.", "It had 9.2 million people.").answer == "9.2"
    assert rag.make_question(0, "A.", "No digits in this passage at all.") is None
    # a digit inside a word is not a number of its own
    assert rag.make_question(0, "A.", "The B52 flew. It had 4 engines.").answer == "4"


def test_answer_contains_whole_numbers_only():
    assert rag.contains_answer("It was 2004.", "2004")
    assert rag.contains_answer("1500 species", "1,500")
    assert rag.contains_answer("about 1,500", "1500")
    assert not rag.contains_answer("12004", "2004")
    assert not rag.contains_answer("20041", "2004")
    assert not rag.contains_answer("2004.5", "2004")
    assert not rag.contains_answer("9.25 million", "9.2")
    assert not rag.contains_answer("I do not know", "7")


def test_top_k_on_a_hand_made_pool():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    # scores row 0: [0, 1, 0.6] -> 1, 2, 0; row 1: [1, 0, 0.8] -> 0, 2, 1
    assert rag.top_k(q, p, 2).tolist() == [[1, 2], [0, 2]]
    assert rag.top_k(q, p, 1).tolist() == [[1], [0]]


def _pairs(n=12):
    passages = [f"Passage {i} has no digits here at all." for i in range(n)]
    passages[0] = "It began in 1999. Then it grew."
    passages[1] = "It had 42 members in the training pair."
    passages[10] = "Its tower is 310 metres high. It is old."
    return data.Pairs(
        titles=tuple(f"T{i}" for i in range(n)),
        queries=tuple(f"Subject {i} is a thing." for i in range(n)),
        passages=tuple(passages),
        topics=np.zeros(n, dtype=np.int64),
        topic_names=("x",),
    )


def test_questions_come_from_held_out_pairs_only():
    qs = rag.questions(_pairs())
    assert [(q.pair, q.answer) for q in qs] == [(0, "1999"), (10, "310")]  # pair 1 is training
    assert rag.questions(_pairs(), limit=1) == qs[:1]


def test_evaluate_gives_each_condition_its_context():
    pairs = _pairs()
    qs = rag.questions(pairs)
    seen = {}

    def stub(texts):  # answers the first number of the context, "unknown" without context
        out = []
        for t in texts:
            seen.setdefault("prompts", []).append(t)
            if not t.startswith("Context:"):
                out.append("unknown")
                continue
            ctx = t.split("\n\n", 1)[0]
            m = rag.NUMBER.search(ctx)
            out.append(m.group(1) if m else "unknown")
        return out

    right = np.array([[0], [10]])  # the gold passages
    wrong = np.array([[10], [3]])  # pair 10 for question 0 (another number), pair 3 (none)
    res = rag.evaluate(pairs, qs, {"good": right, "bad": wrong}, stub, log=lambda *_: None)
    assert res["none"]["answer-contains"] == 0.0
    assert res["oracle"]["answer-contains"] == 1.0
    assert res["good"]["answer-contains"] == 1.0 and res["good"]["hit@k"] == 1.0
    assert res["bad"]["answer-contains"] == 0.0 and res["bad"]["hit@k"] == 0.0
    assert res["oracle"]["answers"] == ["1999", "310"]
    assert "hit@k" not in res["none"]
    # the no-retrieval prompt is the question alone; a retrieved context is "title: passage"
    assert seen["prompts"][0] == qs[0].text()
    assert seen["prompts"][2] == f"Context:\nT0: {pairs.passages[0]}\n\n{qs[0].text()}"
    # top-2 contexts: both summaries, one per line; Hit@k counts the gold one anywhere
    two = np.array([[10, 0], [3, 4]])
    res = rag.evaluate(pairs, qs, {"two": two}, stub, log=lambda *_: None)
    assert res["two"]["hit@k"] == 0.5
    assert rag.context_of(pairs, [10, 0]) == f"T10: {pairs.passages[10]}\nT0: {pairs.passages[0]}"


def test_tiny_reader_is_greedy_and_answers_every_question():
    reader = rag.Reader("tiny", max_new_tokens=4, seed=1)
    texts = ["Context:\nt0: it began in 1999.\n\nwhen?", "when?", "a"]
    a, b = reader.answer(texts, batch=2), reader.answer(texts, batch=3)
    assert len(a) == 3 and all(isinstance(x, str) for x in a)
    assert a == b  # greedy, and left padding does not change an answer


def test_retriever_embeddings_agree_with_the_app_evaluator():
    cfg = task.parse_config(TINY)
    pairs = data.load_pairs(300)
    arrays = task.initial_arrays(cfg)
    qs = [rag.Question(int(i), "", "", "") for i in pairs.test_index]
    q, p = rag.retriever_embeddings(cfg, arrays, qs, pairs)
    assert q.shape[0] == len(qs) and p.shape[0] == len(pairs)
    top1 = rag.top_k(q, p, 1)[:, 0]
    hit1 = float(np.mean(top1 == pairs.test_index))
    assert abs(hit1 - task.evaluator(cfg)(arrays)["hit@1"]) < 1e-9
    # a trained subset changes the embeddings (the checkpoint is really loaded)
    moved = {k: torch.from_numpy(v.numpy() + 0.5) for k, v in arrays.items()}
    from flowerbed.common.records import to_record

    q2, _ = rag.retriever_embeddings(cfg, to_record(moved), qs, pairs)
    assert not torch.allclose(q, q2)


def test_a_run_checkpoint_is_the_retriever_of_its_final_metrics(tmp_path):
    from flowerbed.common.checkpoint import load_checkpoint
    from flowerbed.simulation.local import run_local

    cfg = {**TINY, "local-steps": 3, "lr": 0.01, "optimizer": "adamw", "num-server-rounds": 2}
    out = tmp_path / "run"
    run_local("fede4rag", {**cfg, "results-dir": str(out), "checkpoint": True}, 3)
    final = json.loads((out / "results.json").read_text())["extra"]["final"]
    rnd, arrays, _ = load_checkpoint(out / "checkpoint.npz")
    assert rnd == 2
    cfg = task.parse_config(cfg)
    pairs = data.load_pairs(300)
    qs = [rag.Question(int(i), "", "", "") for i in pairs.test_index]
    q, p = rag.retriever_embeddings(cfg, arrays, qs, pairs)
    hit1 = float(np.mean(rag.top_k(q, p, 1)[:, 0] == pairs.test_index))
    assert hit1 == pytest.approx(final["hit@1"], abs=1e-9)
    assert task.evaluator(cfg)(arrays)["mrr"] == pytest.approx(final["mrr"], abs=1e-9)
