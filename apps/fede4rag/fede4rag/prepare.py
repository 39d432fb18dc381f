"""Build the frozen-encoder features of a MiniLM run once, into ``$FLOWERBED_CACHE/fede4rag/``
(the tokenised pairs run through the layers below ``train-layers``; a run loads them memory
mapped). Prints its progress. Example::

    python -m fede4rag.prepare --run-config "max-docs=1000 train-layers=1"
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> None:
    from fede4rag.task import feature_path, features, parse_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-config", default="", help='"key=value key=value" as for flwr run')
    args = ap.parse_args(argv)
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
