"""flowerbed.common.llm: cache paths, the tiny LLaMA, the character tokenizer, a named error when
the model is not prepared."""

from pathlib import Path

import pytest
import torch

from flowerbed.common import llm


def test_cache_path_is_the_shared_one(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWERBED_CACHE", str(tmp_path))
    assert llm.cache_root() == tmp_path
    # the path fl-llama used first: an already converted copy is reused by every app
    assert llm.smollm2_dir() == tmp_path / "fl-llama" / "smollm2-135m-instruct"
    monkeypatch.delenv("FLOWERBED_CACHE")
    assert llm.cache_root() == Path.home() / ".cache" / "flowerbed"


def test_not_prepared_is_a_named_error(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWERBED_CACHE", str(tmp_path))
    with pytest.raises(llm.ModelNotPrepared, match="no converted model"):
        llm.load_smollm2()
    with pytest.raises(llm.ModelNotPrepared, match="no converted tokenizer"):
        llm.load_tokenizer()
    with pytest.raises(ValueError, match="model 'gpt9': one of tiny, smollm2-135m"):
        llm.build_model("gpt9", 0)


def test_tiny_llama_is_seeded_and_sized():
    a, b, c = llm.tiny_llama(1), llm.tiny_llama(1), llm.tiny_llama(2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert a.config.num_hidden_layers == 4 and a.config.hidden_size == 32
    assert llm.build_model(llm.TINY, 1, vocab_size=40).config.vocab_size == 40


def test_char_tokenizer_round_trip():
    tok = llm.CharTokenizer("ab <>/")
    assert tok.vocab_size == 9
    ids = tok.encode("a<b>z")
    assert ids == [3, 6, 4, 7, tok.UNK]  # a=3 b=4 " "=5 <=6 >=7 /=8
    assert tok.decode([tok.PAD, *ids[:4], tok.EOS, 3]) == "a<b>"  # pads skipped, stops at EOS
    with pytest.raises(ValueError, match="repeated"):
        llm.CharTokenizer("aa")


def test_with_lora_seeded_b_zero_on_targets():
    def adapter(seed):
        m = llm.with_lora(llm.tiny_llama(0), rank=2, alpha=4, targets=("q_proj",), seed=seed)
        return {n: p.detach().clone() for n, p in m.named_parameters() if "lora_" in n}

    a, b, c = adapter(5), adapter(5), adapter(6)
    assert a and all("q_proj" in n for n in a)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a if "lora_A" in n)
    assert all(torch.count_nonzero(a[n]) == 0 for n in a if "lora_B" in n)
