"""FL-LLaMA benchmark: training wall time of the three parallel modes against centralized LoRA
(beside the paper's appendix Table 7), and split decode speed with and without the KV cache.

    python -m flllama.bench                          # both parts, SmolLM2-135M (cached model)
    python -m flllama.bench --model tiny --total-batches 8 --tokens 8,16   # quick functional run
    python -m flllama.bench --part modes --clients 2,4,8 --launcher inprocess
    python -m flllama.bench --part decode --tokens 32,128,256

(a) ``modes``: every run is a fresh ``flowerbed-run`` process (one Flower simulation) with the
same total number of training batches, ``--total-batches``, split evenly over the K clients as
in the paper (Table 7: 1000 samples whatever the number of clients): each client does
``total / K`` steps in one round (``sync-steps``). The time is the round's wall time minus its
server-side evaluation (``round_time_s - eval_time_s`` of ``results.json``, so start-up, model
loading and evaluation are left out); the centralized baseline trains on the same batches. The
table gives each mode's time divided by the centralized time of the same K next to the paper's
ratio (689.2 / 630.0-488.6 / 348.2-86.4 s against 381.9 s).

(b) ``decode``: greedy generation of N new tokens through the split model (A and C on the
"client", B on the "server", one process) with and without the KV cache of
:func:`flllama.split.split_generate`; tokens per second and the speed-up (the paper reports up to
8x). Each setting is timed ``--repeat`` times after one warm-up, the median is kept.

Timings depend on the machine: run on a quiet one. Tests run this on the tiny model and check
only the structure of the output, never a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# From the paper, appendix Table 7 (total seconds, ReCoRD, 1000 samples)
PAPER_CENTRAL = 381.9
PAPER = {
    ("split-sequential", 2): 689.2,
    ("split-client-batch", 2): 630.0,
    ("split-client-batch", 4): 542.2,
    ("split-client-batch", 8): 488.6,
    ("split-hierarchical", 2): 348.2,
    ("split-hierarchical", 4): 173.5,
    ("split-hierarchical", 8): 86.4,
}
MODES = ("split-sequential", "split-client-batch", "split-hierarchical")


def train_seconds(results: dict) -> float:
    """Training wall time of a run: sum over rounds >= 1 of round time minus evaluation time."""
    return float(
        sum(r["round_time_s"] - r.get("eval_time_s", 0.0) for r in results["rounds"] if r["round"])
    )


def run_one(method: str, clients: int, args, out: Path) -> float:
    """One fresh ``flowerbed-run`` process; returns its training seconds."""
    steps = max(args.total_batches // clients, 1)
    cmd = [
        sys.executable,
        "-m",
        "flowerbed.simulation.runner",
        "app=fl-llama",
        f"launcher={args.launcher}",
        f"app.num_supernodes={clients}",
        f"resources.num_cpus={args.num_cpus}",
        f"hydra.run.dir={out}",
        f"++run_config.method={method}",
        f"++run_config.model={args.model}",
        "++run_config.num-server-rounds=1",
        f"++run_config.sync-steps={steps}",
        f"++run_config.batch-size={args.batch_size}",
        f"++run_config.max-chars={args.max_chars}",
        f"++run_config.split-a={args.p}",
        f"++run_config.split-c={args.q}",
        "++run_config.eval-samples=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = out / "results.json"
    if proc.returncode or not path.exists():
        raise RuntimeError(
            f"{method} K={clients} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return train_seconds(json.loads(path.read_text()))


def modes_table(times: dict[tuple[str, int], float], clients: list[int]) -> str:
    """Markdown: each mode's seconds and ratio to centralized (same K) beside the paper's."""
    lines = [
        "| mode | clients | train s | ratio to centralized | paper ratio (Table 7) |",
        "|---|---|---|---|---|",
    ]
    for k in clients:
        central = times[("centralized", k)]
        lines.append(f"| centralized | {k} | {central:.2f} | 1.00 | 1.00 |")
        for m in MODES:
            if (m, k) not in times:
                continue
            paper = PAPER.get((m, k))
            ratio = f"{paper / PAPER_CENTRAL:.2f}" if paper else "-"
            lines.append(
                f"| {m} | {k} | {times[m, k]:.2f} | {times[m, k] / central:.2f} | {ratio} |"
            )
    return "\n".join(lines)


def bench_modes(args) -> str:
    clients = [int(c) for c in args.clients.split(",")]
    times: dict[tuple[str, int], float] = {}
    root = Path(args.out) / "modes"
    for k in clients:
        for m in ("centralized", *MODES):
            t0 = time.perf_counter()
            times[m, k] = run_one(m, k, args, root / f"{m}-{k}")
            print(
                f"[bench] {m} K={k}: train {times[m, k]:.2f} s "
                f"(process {time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
    return modes_table(times, clients)


def decode_speed(model_name: str, tokens: list[int], p: int, q: int, repeat: int) -> list[dict]:
    """Tokens/s of split greedy decoding with and without the KV cache, per number of tokens."""
    import torch

    from flllama import data as D
    from flllama.model import TINY, build_model, task_tokenizer_source
    from flllama.split import SplitLlama, split_generate

    torch.manual_seed(0)
    model = build_model(model_name, 0).eval()
    split = SplitLlama(model, p, q)
    tok = (
        D.CharTokenizer()
        if model_name == TINY
        else D.HFTaskTokenizer(task_tokenizer_source(model_name))
    )
    batch = D.make_batch(tok, D.load_summaries(), [0], 160)
    ids, counts = batch["input_ids"], batch["counts"]
    out = []
    for n in tokens:
        row = {"new_tokens": n, "prompt_tokens": int(counts[0])}
        for cache in (True, False):
            split_generate(split, split, ids, counts, 2, use_cache=cache)  # warm-up
            secs = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                split_generate(split, split, ids, counts, n, use_cache=cache)
                secs.append(time.perf_counter() - t0)
            row["tok_s_cache" if cache else "tok_s_nocache"] = n / statistics.median(secs)
        row["speedup"] = row["tok_s_cache"] / row["tok_s_nocache"]
        print(
            f"[bench] decode {n} tokens: {row['tok_s_cache']:.1f} tok/s with cache, "
            f"{row['tok_s_nocache']:.1f} without ({row['speedup']:.2f}x)",
            flush=True,
        )
        out.append(row)
    return out


def decode_table(rows: list[dict]) -> str:
    lines = [
        "| new tokens | prompt tokens | tok/s with KV cache | tok/s without | speed-up |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['new_tokens']} | {r['prompt_tokens']} | {r['tok_s_cache']:.1f} "
        f"| {r['tok_s_nocache']:.1f} | {r['speedup']:.2f}x |"
        for r in rows
    ]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("modes", "decode", "all"), default="all")
    ap.add_argument("--model", default="smollm2-135m", help="a model value of the run config")
    ap.add_argument("--clients", default="2,4,8")
    ap.add_argument("--total-batches", type=int, default=16, help="batches of the whole run")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-chars", type=int, default=160)
    ap.add_argument("--p", type=int, default=1, help="layers in A (Table 7: A = C = 1)")
    ap.add_argument("--q", type=int, default=1, help="layers in C")
    ap.add_argument("--launcher", default="inprocess", help="inprocess (Ray actors) | local")
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per virtual client")
    ap.add_argument("--tokens", default="32,128,256", help="new tokens of the decode part")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="outputs/fl-llama-bench")
    return ap


def main(argv: list[str] | None = None) -> str:
    args = parser().parse_args(argv)
    parts = []
    if args.part in ("modes", "all"):
        parts.append(bench_modes(args))
    if args.part in ("decode", "all"):
        tokens = [int(t) for t in args.tokens.split(",")]
        parts.append(decode_table(decode_speed(args.model, tokens, args.p, args.q, args.repeat)))
    text = "\n\n".join(parts)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench.md").write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
