"""Hidden-state inversion attack on FL-LLaMA's block A output, against the noise sigma and the
split depth p.

    python -m flllama.attack                                  # SmolLM2-135M, p 1,2,4 x sigma 0..0.1
    python -m flllama.attack --model tiny --train 64 --eval 16   # quick

Threat model (the paper's, appendix: a colluding client hands its data to the server): the
colluding party holds its own examples (client 0 of a 2-client topic split: disjoint topics from
the victim, client 1) and block A (the clients share A's adapter). It computes A's output on its
own prompts, adds the protocol's noise (it knows sigma; std = sigma*sqrt(pi/2) as in training,
``noise-mean-abs``), and fits a decoder from a hidden state to the token at that position. The
decoder is a ridge regression from h_A (d) to the token's input embedding (d), in closed form,
followed by a nearest-embedding read-out over the whole vocabulary (argmin ||W h - e_v||). It
is then applied to the victim's noised hidden states (what the server receives); the score is
the token accuracy over the victim's real (non-pad) prompt positions.

What is From the paper: the colluding-client threat model, accuracy against sigma and p. What is
a Reconstruction: the decoder (the paper trains a LLaMA-based decoder; here a linear map and a
nearest-embedding read-out, a weaker but closed-form attacker), the data (the Wikipedia topic
task) and block A at its pretrained weights (LoRA at initialisation adds 0).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from flllama import data as D
from flllama.split import SplitLlama, add_noise
from flowerbed.common.seeding import derive_seed


def hidden_states(split: SplitLlama, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A's output at the real positions of ``batch``: ``(n, d)`` states and ``(n,)`` token ids."""
    with torch.no_grad():
        h = split.forward_a(batch["input_ids"], batch["counts"])
    length = h.shape[1]
    real = torch.arange(length).reshape(1, -1) >= (length - batch["counts"].reshape(-1, 1))
    return h, real


def noised(h: torch.Tensor, real: torch.Tensor, sigma: float, mean_abs: bool, seed: int):
    """The noised states at the real positions (the noise of the protocol, ``add_noise``)."""
    return add_noise(h, sigma, mean_abs, seed)[real].float()


def fit_decoder(h: torch.Tensor, targets: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge regression ``W`` (d+1, d) from ``[h, 1]`` to ``targets`` (the tokens' embeddings):
    W = (X^T X + ridge * n * I)^-1 X^T T, the bias not penalised."""
    x = torch.cat([h.double(), torch.ones(len(h), 1, dtype=torch.float64)], 1)
    reg = torch.eye(x.shape[1], dtype=torch.float64) * ridge * len(h)
    reg[-1, -1] = 0.0
    return torch.linalg.solve(x.T @ x + reg, x.T @ targets.double())


def decode(h: torch.Tensor, w: torch.Tensor, emb: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Token ids: the nearest input embedding (L2) to ``[h, 1] @ W``, over the whole vocab."""
    x = torch.cat([h.double(), torch.ones(len(h), 1, dtype=torch.float64)], 1)
    e = emb.float()  # the vocab-wide distances in float32 (the map itself in float64)
    sq = (e * e).sum(1)
    out = []
    for s in range(0, len(x), chunk):
        z = (x[s : s + chunk] @ w).float()
        out.append((2 * z @ e.T - sq).argmax(1))  # argmin ||z - e||^2
    return torch.cat(out)


def attack(
    split: SplitLlama,
    attacker: dict,
    victim: dict,
    sigma: float,
    *,
    seed: int,
    mean_abs: bool = True,
    ridge: float = 1e-3,
) -> float:
    """Token accuracy of the inversion decoder on the victim's noised A outputs.

    The attacker fits the decoder on its own ``attacker`` batch, noised with ``sigma`` (noise
    seed ``derive_seed(seed, 0)``); the victim's states carry the victim's own noise
    (``derive_seed(seed, 1)``)."""
    emb = split.lm.model.embed_tokens.weight.detach()
    h_att, real_att = hidden_states(split, attacker)
    x = noised(h_att, real_att, sigma, mean_abs, derive_seed(seed, 0))
    ids = attacker["input_ids"][real_att]
    w = fit_decoder(x, emb[ids], ridge)
    h_vic, real_vic = hidden_states(split, victim)
    y = noised(h_vic, real_vic, sigma, mean_abs, derive_seed(seed, 1))
    pred = decode(y, w, emb)
    return float((pred == victim["input_ids"][real_vic]).double().mean())


def batches(tok, n_train: int, n_eval: int, max_chars: int, seed: int) -> tuple[dict, dict]:
    """The attacker's prompts (client 0 of 2, topic split) and the victim's (client 1): disjoint
    topics, drawn with ``derive_seed(seed, partition)``."""
    from flllama.task import client_pool

    out = []
    for pid, n in ((0, n_train), (1, n_eval)):
        pool = client_pool(pid, 2)
        idx = D.batch_indices(pool, n, seed, pid, 0xA77)
        b = D.make_batch(tok, D.load_summaries(), idx, max_chars)
        # the prompt only (the target is the label the server never sees in A's output anyway)
        out.append(b)
    return out[0], out[1]


def sweep(model, tok, ps, sigmas, n_train, n_eval, max_chars, seed, log=print) -> list[dict]:
    """Accuracy for every (p, sigma); q = 1 (C does not matter to the attack)."""
    attacker, victim = batches(tok, n_train, n_eval, max_chars, seed)
    rows = []
    for p in ps:
        split = SplitLlama(model, p, 1)
        for s in sigmas:
            acc = attack(split, attacker, victim, s, seed=derive_seed(seed, p))
            log(f"[attack] p={p} sigma={s:g}: token accuracy {acc:.4f}")
            rows.append({"p": p, "sigma": s, "accuracy": acc})
    return rows


def magnitudes(model, tok, ps, n: int, max_chars: int, seed: int) -> list[dict]:
    """Mean and median |h_A| over the real positions of the victim's ``n`` prompts, per p:
    the scale the noise (E|noise| = sigma) is set against."""
    _, victim = batches(tok, 1, n, max_chars, seed)
    out = []
    for p in ps:
        h, real = hidden_states(SplitLlama(model, p, 1), victim)
        x = h[real].abs()
        out.append({"p": p, "mean_abs": float(x.mean()), "median_abs": float(x.median())})
    return out


def table(rows: list[dict]) -> str:
    ps = sorted({r["p"] for r in rows})
    sigmas = sorted({r["sigma"] for r in rows})
    acc = {(r["p"], r["sigma"]): r["accuracy"] for r in rows}
    head = "| p \\ sigma | " + " | ".join(f"{s:g}" for s in sigmas) + " |\n"
    head += "|---" * (len(sigmas) + 1) + "|\n"
    return head + "\n".join(
        f"| {p} | " + " | ".join(f"{acc[p, s]:.4f}" for s in sigmas) + " |" for p in ps
    )


def main(argv: list[str] | None = None) -> str:
    from flllama.model import TINY, build_model, task_tokenizer_source

    ap = argparse.ArgumentParser(description="FL-LLaMA hidden-state inversion attack")
    ap.add_argument("--model", default="smollm2-135m", help="a model value of the run config")
    ap.add_argument("--p", default="1,2,4", help="split depths (layers in A)")
    ap.add_argument("--sigmas", default="0,0.02,0.05,0.1")
    ap.add_argument("--train", type=int, default=256, help="attacker's prompts")
    ap.add_argument("--eval", type=int, default=64, help="victim's prompts")
    ap.add_argument("--max-chars", type=int, default=160)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default="outputs/fl-llama-attack")
    ap.add_argument("--stats", action="store_true", help="print mean/median |h_A| per p only")
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    commit = subprocess.run(  # the code that runs: the commit at the start
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    torch.manual_seed(a.seed)
    model = build_model(a.model, a.seed).eval()
    tok = (
        D.CharTokenizer() if a.model == TINY else D.HFTaskTokenizer(task_tokenizer_source(a.model))
    )
    ps = [int(p) for p in a.p.split(",")]
    if a.stats:
        att, vic = batches(tok, a.train, a.eval, a.max_chars, a.seed)
        print(f"positions: attacker {int(att['counts'].sum())}, victim {int(vic['counts'].sum())}")
        for r in magnitudes(model, tok, ps, a.eval, a.max_chars, a.seed):
            print(f"p={r['p']}: mean |h_A| {r['mean_abs']:.3f}, median {r['median_abs']:.3f}")
        return ""
    rows = sweep(
        model,
        tok,
        ps,
        [float(s) for s in a.sigmas.split(",")],
        a.train,
        a.eval,
        a.max_chars,
        a.seed,
    )
    text = table(rows) + f"\n\n(`python -m flllama.attack {' '.join(argv)}`, commit {commit})"
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "attack.md").write_text(text + "\n")
    np.save(
        Path(a.out) / "attack.npy", np.asarray([[r["p"], r["sigma"], r["accuracy"]] for r in rows])
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
