"""``python -m fedgrpo.measure``: does the policy give GRPO a learning signal? (no federation)

For a run config (``--set key=value``, e.g. ``shots=1 max-new-tokens=32 warmup-steps=20``) it
builds the server's policy (after the warm-up, if any), samples ``G * M`` completions for
``--prompts`` training prompts exactly as round 1 would, scores them with the exact reward, and
prints the format rate, accuracy, truncated fraction, mean reward and the fraction of prompts
whose rewards are not all equal (their group-relative advantages are not all 0); with
``--eval N`` also the greedy format rate and accuracy on the first ``N`` test questions of each
domain. Prints one JSON line at the end (``--out`` also writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from flwr.common.config import parse_config_args

from fedgrpo import domains as D
from fedgrpo import task
from flowerbed.common.seeding import derive_seed


def overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs (TOML values, strings quoted) as Flower's ``--run-config`` parses them;
    a key given twice keeps its last value."""
    return {k: v for pair in pairs for k, v in parse_config_args([pair]).items()}


def signal(cfg, questions: list[str], completions: list[list[str]]) -> dict:
    """Format rate, accuracy, mean reward and the fraction of prompts with unequal rewards."""
    fmt, acc, rew, varied = [], [], [], 0
    per = {name: [] for name in D.NAMES}
    for q, group in zip(questions, completions, strict=True):
        r = D.exact_rewards(q, group)
        want = D.solve(q)
        fmt += [D.format_reward(c) for c in group]
        acc += [float(D.same_answer(D.extract_answer(c), want)) for c in group]
        rew += list(r)
        varied += int(np.ptp(r) > 0)
        per[D.NAMES[D.domain_of(q)]] += acc[-len(group) :]
    return {
        "format": float(np.mean(fmt)),
        "accuracy": float(np.mean(acc)),
        "reward_mean": float(np.mean(rew)),
        "varied_prompts": varied / len(questions),
        **{f"acc_{k}": float(np.mean(v)) for k, v in per.items() if v},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--set", nargs="*", default=[], help='run-config overrides key=value ("x" for strings)'
    )
    ap.add_argument("--prompts", type=int, default=6, help="training prompts to sample")
    ap.add_argument("--eval", type=int, default=0, help="greedy test questions per domain")
    ap.add_argument("--show", type=int, default=2, help="completions to print")
    ap.add_argument("--out", default="", help="also write the JSON line here")
    args = ap.parse_args(argv)
    over = overrides(args.set)
    cfg = task.parse_config(over)
    t0 = time.perf_counter()
    policy = task.LoraPolicy(cfg)
    task.warmup(cfg, policy)
    t1 = time.perf_counter()
    questions = task.round_prompts({**cfg, "prompts-per-round": args.prompts}, 1)
    n = cfg["num-experts"] * cfg["group-size"]
    print(f"[measure] sampling {n} completions for {len(questions)} prompts...", flush=True)
    ids = policy.sample(questions, n, derive_seed(cfg["seed"], 1, 0x6E))
    comps = [[policy.codec.decode(c) for c in g] for g in ids]
    trunc = [policy.codec.eos not in c for g in ids for c in g]
    t2 = time.perf_counter()
    out = {"config": over, "prompts": len(questions), "completions_per_prompt": n}
    out.update(signal(cfg, questions, comps))
    out.update(truncated=float(np.mean(trunc)), sample_s=round(t2 - t1, 1))
    out["warmup_s"] = round(t1 - t0, 1)
    for q, g in list(zip(questions, comps, strict=True))[: args.show]:
        print(f"[measure] {q!r}: {g[:3]!r}", flush=True)
    if args.eval:
        m = task.evaluator({**cfg, "eval-per-domain": args.eval}, policy)(0, policy.arrays())
        out.update({f"greedy_{k}": round(v, 4) for k, v in m.items()})
        out["eval_s"] = round(time.perf_counter() - t2, 1)
    line = json.dumps(out)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return out


if __name__ == "__main__":
    main()
