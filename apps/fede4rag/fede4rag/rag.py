"""A small local RAG example (Reconstruction: the paper's RAG generation step, on our pairs):
retrieve a Wikipedia summary with the (federated) retriever, then let SmolLM2-135M-Instruct
answer a fill-in-the-blank question about it.

The questions (deterministic, no network, no randomness):

1. take the held-out pairs of the run (:attr:`~fede4rag.data.Pairs.test_index`, never trained
   on) in order;
2. in the pair's passage, find the first sentence that holds a number (:data:`NUMBER`: digits,
   with thousands commas and a decimal part); a pair without one gives no question;
3. the **answer** is that number, the **cloze** is the sentence with every occurrence of it
   replaced by ``____``; the question shows the pair's query (the first sentence of the
   summary: it names the subject) and the cloze;
4. the retriever gets the pair's query (the retrieval task of the app), the reader gets the
   question and, as context, the ``top-k`` retrieved summaries (``title: passage``).

Conditions: ``none`` (no context: the model's own knowledge), ``oracle`` (the gold passage),
and one per retriever (the pretrained encoder, a run's ``checkpoint.npz``). Metric:
**answer-contains** (the generated text holds the number as a whole token; commas ignored),
plus the retriever's Hit@k on the same questions. Greedy decoding, so the numbers repeat.

Example (a retriever from a run with ``checkpoint=true``)::

    python -m fede4rag.rag --run-config "max-docs=1000" \\
        --retriever fede4rag=../../outputs/<run>/checkpoint.npz --out rag.json
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fede4rag.data import Pairs, sentences

NUMBER = re.compile(r"(?<![\w.,])(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)(?![\w,]\d)")
BLANK = "____"
INSTRUCTION = "Fill in the blank with a number. Answer with the number only."


@dataclass(frozen=True)
class Question:
    """One fill-in-the-blank question about the passage of pair ``pair``."""

    pair: int
    query: str
    cloze: str
    answer: str

    def text(self) -> str:
        return f"{self.query}\n{self.cloze}\n{INSTRUCTION}"


def make_question(pair: int, query: str, passage: str) -> Question | None:
    """The question of one pair (steps 2-3 of the module docstring), or None."""
    for sent in sentences(passage):
        m = NUMBER.search(sent)
        if m:
            num = m.group(1)
            cloze = re.sub(rf"(?<![\w.,]){re.escape(num)}(?![\w,]\d)", BLANK, sent)
            return Question(pair, query, cloze, num)
    return None


def questions(pairs: Pairs, limit: int = 0) -> list[Question]:
    """The questions of the held-out pairs, in order (the first ``limit``; 0 = all)."""
    out = []
    for i in pairs.test_index.tolist():
        q = make_question(i, pairs.queries[i], pairs.passages[i])
        if q is not None:
            out.append(q)
    return out[:limit] if limit > 0 else out


def contains_answer(generated: str, answer: str) -> bool:
    """The number ``answer`` is a whole token of ``generated`` (thousands commas ignored)."""
    plain = answer.replace(",", "")
    text = generated.replace(",", "")
    return re.search(rf"(?<![\d.]){re.escape(plain)}(?![\d]|\.\d)", text) is not None


def top_k(q_emb: torch.Tensor, p_emb: torch.Tensor, k: int) -> np.ndarray:
    """Indices of the ``k`` best passages per query by cosine score (best first; ties: lower
    index first)."""
    scores = (q_emb @ p_emb.T).double().numpy()
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k]


def context_of(pairs: Pairs, index: Sequence[int]) -> str:
    """The retrieved summaries as the reader's context: ``title: passage`` per line."""
    return "\n".join(f"{pairs.titles[i]}: {pairs.passages[i]}" for i in index)


def prompt(question: Question, context: str | None) -> str:
    """The user turn: the context (if any), then the question."""
    head = f"Context:\n{context}\n\n" if context else ""
    return head + question.text()


# ---------------------------------------------------------------------------- the reader
class Reader:
    """Greedy answers from a causal LM: SmolLM2-135M-Instruct from the repository's cache
    (``common/llm.py``: chat template) or, for the tests, the tiny random LLaMA with a character
    tokenizer."""

    def __init__(self, name: str, max_new_tokens: int = 12, seed: int = 0) -> None:
        from flowerbed.common import llm

        self.chat = name != llm.TINY
        self.max_new_tokens = int(max_new_tokens)
        if self.chat:
            self.tok = llm.load_tokenizer()
            self.model = llm.load_smollm2()
            self.eos, self.pad = self.tok.eos_token_id, self.tok.pad_token_id
        else:
            self.tok = llm.CharTokenizer("0123456789 ,.abcdefghijklmnopqrstuvwxyz_:\n")
            self.model = llm.tiny_llama(seed, vocab_size=self.tok.vocab_size)
            self.eos, self.pad = llm.CharTokenizer.EOS, llm.CharTokenizer.PAD

    def ids(self, text: str) -> list[int]:
        if self.chat:
            msgs = [{"role": "user", "content": text}]
            ids = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return self.tok.encode(text.lower())

    @torch.no_grad()
    def answer(self, texts: Sequence[str], batch: int = 8) -> list[str]:
        out = []
        for s in range(0, len(texts), batch):
            rows = [self.ids(t) for t in texts[s : s + batch]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[self.pad] * (width - len(r)) + r for r in rows])
            att = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            gen = self.model.generate(
                input_ids=ids,
                attention_mask=att,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.pad,
                eos_token_id=self.eos,
            )[:, width:]
            for row in gen.tolist():
                if self.eos in row:
                    row = row[: row.index(self.eos)]
                out.append(
                    self.tok.decode(row, skip_special_tokens=True)
                    if self.chat
                    else self.tok.decode(row)
                )
        return out


# ---------------------------------------------------------------------------- evaluation
def evaluate(
    pairs: Pairs,
    qs: Sequence[Question],
    retrieved: dict[str, np.ndarray],
    answer: Callable[[Sequence[str]], list[str]],
    log=print,
) -> dict[str, dict]:
    """Answer-contains accuracy of every condition: ``none``, ``oracle`` and one per entry of
    ``retrieved`` (``name -> top-k pair indices per question``), with each retriever's Hit@k
    on these questions; ``answers`` keeps the generated texts."""
    conds: dict[str, list[str | None]] = {
        "none": [None] * len(qs),
        "oracle": [context_of(pairs, [q.pair]) for q in qs],
    }
    for name, idx in retrieved.items():
        conds[name] = [context_of(pairs, row) for row in idx]
    out = {}
    for name, contexts in conds.items():
        t0 = time.perf_counter()
        texts = answer([prompt(q, c) for q, c in zip(qs, contexts, strict=True)])
        hits = [contains_answer(t, q.answer) for t, q in zip(texts, qs, strict=True)]
        row = {"answer-contains": float(np.mean(hits)), "n": len(qs), "answers": texts}
        if name in retrieved:
            gold = np.array([q.pair for q in qs])
            row["hit@k"] = float(np.mean((retrieved[name] == gold[:, None]).any(1)))
        out[name] = row
        log(
            f"[fede4rag.rag] {name}: answer-contains {row['answer-contains']:.3f} "
            f"({sum(hits)}/{len(qs)}) in {time.perf_counter() - t0:.0f} s"
        )
    return out


def retriever_embeddings(cfg, arrays, qs: Sequence[Question], pairs: Pairs):
    """Query and pool embeddings of the questions' pairs under the trained subset ``arrays``
    (None: the pretrained encoder)."""
    from fede4rag.task import embed_index, make_encoder

    enc = make_encoder(cfg)
    if arrays is not None:
        enc.load(arrays)
    q = embed_index(cfg, enc, "q", np.array([x.pair for x in qs]))
    p = embed_index(cfg, enc, "p", np.arange(len(pairs)))
    return q, p


def main(argv: list[str] | None = None) -> None:
    from fede4rag.data import load_pairs
    from fede4rag.task import parse_config
    from flowerbed.common.checkpoint import load_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-config", default="", help='"key=value ..." as for flwr run')
    ap.add_argument(
        "--retriever",
        action="append",
        default=[],
        help="NAME=checkpoint.npz of a run (repeatable); the pretrained encoder is always added",
    )
    ap.add_argument("--reader", default="smollm2-135m", help="smollm2-135m | tiny")
    ap.add_argument("--questions", type=int, default=0, help="first N questions (0 = all)")
    ap.add_argument("--top-k", type=int, default=1, help="summaries given as context")
    ap.add_argument("--out", default="", help="write the results (JSON) here")
    args = ap.parse_args(argv)
    cfg = parse_config(dict(item.split("=", 1) for item in args.run_config.split()))
    pairs = load_pairs(int(cfg["max-docs"]))
    qs = questions(pairs, args.questions)
    print(f"[fede4rag.rag] {len(qs)} questions from {len(pairs.test_index)} held-out pairs")
    sources: dict[str, object] = {"pretrained": None}
    for item in args.retriever:
        name, path = item.split("=", 1)
        rnd, arrays, _ = load_checkpoint(path)
        print(f"[fede4rag.rag] retriever {name}: {path} (round {rnd})")
        sources[name] = arrays
    retrieved = {}
    for name, arrays in sources.items():
        q, p = retriever_embeddings(cfg, arrays, qs, pairs)
        retrieved[name] = top_k(q, p, args.top_k)
    t0 = time.perf_counter()
    reader = Reader(args.reader)
    print(f"[fede4rag.rag] reader {args.reader} loaded in {time.perf_counter() - t0:.0f} s")
    res = evaluate(pairs, qs, retrieved, reader.answer)
    res["_setting"] = {
        "run-config": dict(cfg),
        "retrievers": args.retriever,
        "reader": args.reader,
        "top-k": args.top_k,
        "questions": [q.__dict__ for q in qs],
    }
    print("| condition | answer-contains | retriever Hit@k |")
    print("|---|---|---|")
    for name, row in res.items():
        if not name.startswith("_"):
            hit = f"{row['hit@k']:.3f}" if "hit@k" in row else "-"
            print(f"| {name} | {row['answer-contains']:.3f} ({row['n']}) | {hit} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
