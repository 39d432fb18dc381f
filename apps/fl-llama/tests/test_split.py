"""FL-LLaMA split model on a tiny random LLaMA (4 layers, hidden 32, vocab 64): split == unsplit
(loss, gradients, greedy generation), KV cache == no cache, masks rebuilt from counts, the noise
scale, gradient DP by hand, LoRA averaging by hand, top-p / temperature sampling on hand-made logits."""

import copy
import math

import pytest
import torch

from flowerbed.common.testing import app_path

app_path("fl-llama")

from flllama.model import tiny_llama  # noqa: E402
from flllama.split import (  # noqa: E402
    SplitError,
    SplitLlama,
    add_lora,
    add_noise,
    average_lora,
    block_lora,
    causal_mask,
    layer_of,
    lm_loss,
    next_token,
    noise_std,
    padding_mask,
    position_ids,
    private_grad,
    split_generate,
    split_step,
    top_p_keep,
    unsplit_generate,
)

L = 8
COUNTS = torch.tensor([5, 8, 3])


def _lora_model(seed=0):
    m = add_lora(tiny_llama(seed), rank=4, alpha=8, seed=seed)
    with torch.no_grad():  # LoRA B starts at 0: make the adapters matter
        for i, (n, p) in enumerate(m.named_parameters()):
            if "lora_B" in n:  # seeded by position: hash(n) changes with every interpreter
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(i))
    return m


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (3, L), generator=g)
    pad = padding_mask(COUNTS, L) == 0
    ids[pad] = 0
    labels = ids.clone()
    labels[pad] = -100
    labels[torch.arange(3), L - COUNTS] = -100  # the first real token has no context
    return ids, labels


def test_padding_mask_and_positions_by_hand():
    assert padding_mask(torch.tensor([2, 4]), 4).tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert position_ids(torch.tensor([2, 4]), 4).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    # decoding the 5th token of a sequence whose first 2 were pads: position 2
    assert position_ids(torch.tensor([3]), 1, offset=4).tolist() == [[2]]


def test_causal_mask_from_counts_by_hand():
    m = causal_mask(torch.tensor([2]), 3, 3)[0, 0] == 0  # True = attend
    # row 0 is a pad (sees only itself), rows 1, 2 see real keys 1..row
    assert m.tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    # one decode step after the prefill: the new query sees every real key
    d = causal_mask(torch.tensor([3]), 1, 4)[0, 0] == 0
    assert d.tolist() == [[False, True, True, True]]


def test_mask_rebuilt_from_counts_equals_the_tokenizers_mask():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate("a b c d e f g".split())}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", padding_side="left")
    enc = tok(["a b", "a b c d e", "g"], padding=True, return_tensors="pt")
    counts = enc["attention_mask"].sum(-1)
    assert counts.tolist() == [2, 5, 1]
    rebuilt = padding_mask(counts, enc["input_ids"].shape[1])
    assert torch.equal(rebuilt, enc["attention_mask"])


def test_split_equals_unsplit_loss_and_gradients():
    ref = _lora_model()
    client, server = copy.deepcopy(ref), copy.deepcopy(ref)
    ids, labels = _batch()
    out = ref(
        input_ids=ids, attention_mask=padding_mask(COUNTS, L), position_ids=position_ids(COUNTS, L)
    )
    loss = lm_loss(out.logits, labels)
    loss.backward()
    sc, ss = SplitLlama(client, 1, 1), SplitLlama(server, 1, 1)
    got = split_step(sc, ss, ids, COUNTS, labels)
    assert abs(got["loss"].item() - loss.item()) < 1e-6
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    side = {0: client, 1: server, 2: server, 3: client}
    checked = 0
    for owner in (client, server):
        for n, p in owner.named_parameters():
            if p.requires_grad and side[layer_of(n)] is owner:
                assert torch.allclose(p.grad, want[n], atol=1e-6), n
                assert want[n].abs().max() > 1e-4, n  # not trivially zero
                checked += 1
    assert checked == 4 * 4 * 2  # 4 layers x q/k/v/o x (lora_A, lora_B)
    # the client never computed B's gradient, the server never A's or C's
    assert all(p.grad is None for n, p in client.named_parameters() if layer_of(n) in (1, 2))
    assert all(p.grad is None for n, p in server.named_parameters() if layer_of(n) in (0, 3))


def test_noise_changes_the_loss_but_not_the_hand_off_shapes():
    m = _lora_model()
    ids, labels = _batch()
    s = SplitLlama(m, 1, 1)
    a = split_step(s, s, ids, COUNTS, labels)
    m.zero_grad()
    b = split_step(s, s, ids, COUNTS, labels, sigma=0.5, seed=3)
    assert a["h_a"].shape == b["h_a"].shape == (3, L, 32)
    assert abs(a["loss"].item() - b["loss"].item()) > 1e-4


@pytest.mark.parametrize("p,q", [(1, 1), (2, 1), (1, 2)])
def test_split_greedy_generation_equals_unsplit_and_cache_equals_no_cache(p, q):
    m = _lora_model(p * 10 + q)
    ids, _ = _batch()
    s = SplitLlama(m, p, q)
    want = unsplit_generate(m, ids, COUNTS, 8)
    sent = []
    cached = split_generate(s, s, ids, COUNTS, 8, use_cache=True, sent=sent)
    plain = split_generate(s, s, ids, COUNTS, 8, use_cache=False)
    assert torch.equal(cached, want) and torch.equal(plain, want)
    # after the prefill only the new token's hidden state crosses
    assert sent[0] == (3, L, 32) and all(sh == (3, 1, 32) for sh in sent[1:])


def test_split_generation_equals_hf_generate():
    m = tiny_llama(5)
    ids, _ = _batch()
    s = SplitLlama(m, 1, 2)
    got = split_generate(s, s, ids, COUNTS, 6)
    out = m.generate(
        input_ids=ids,
        attention_mask=padding_mask(COUNTS, L),
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert torch.equal(got, out[:, L:])


def test_bad_split_points_are_named():
    with pytest.raises(SplitError, match=r"p=2, q=2: need p >= 1, q >= 1, p \+ q < 4 layers"):
        SplitLlama(tiny_llama(0), 2, 2)
    with pytest.raises(SplitError):
        SplitLlama(tiny_llama(0), 0, 1)


def test_noise_std_and_mean_abs_variant():
    assert noise_std(0.1, False) == 0.1
    assert noise_std(0.1, True) == pytest.approx(0.1 * math.sqrt(math.pi / 2))
    h = torch.zeros(400, 500)
    e = add_noise(h, 0.05, mean_abs=False, seed=1)
    assert e.std().item() == pytest.approx(0.05, rel=0.01)
    e = add_noise(h, 0.05, mean_abs=True, seed=1)
    assert e.abs().mean().item() == pytest.approx(0.05, rel=0.01)  # E|noise| = sigma
    assert torch.equal(add_noise(h, 0.05, True, 1), e)  # seeded
    assert not torch.equal(add_noise(h, 0.05, True, 2), e)
    assert add_noise(h, 0.0, True, 1) is h


def test_block_lora_and_average_by_hand():
    m = _lora_model()
    s = SplitLlama(m, 1, 1)
    a = block_lora(m, s.a_layers)
    assert a and all(layer_of(n) == 0 for n in a)
    assert len(block_lora(m, s.b_layers)) == 2 * len(a)
    x = {"w": torch.tensor([1.0, 2.0])}
    y = {"w": torch.tensor([4.0, 8.0])}
    got = average_lora([x, y], [1, 3])  # (1*x + 3*y) / 4
    assert torch.allclose(got["w"], torch.tensor([3.25, 6.5]))
    with pytest.raises(ValueError, match="sum to 0"):
        average_lora([x], [0])


# ---------------------------------------------------------------------------- sampling
PROBS = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 0.5 (1), 0.3 (3), 0.15 (2), 0.05 (0)


@pytest.mark.parametrize(
    "top_p,kept",
    [(0.3, [1]), (0.5, [1]), (0.6, [1, 3]), (0.75, [1, 3]), (0.9, [1, 3, 2]), (1.0, [0, 1, 2, 3])],
)
def test_top_p_keeps_the_smallest_prefix_whose_mass_reaches_p(top_p, kept):
    """By hand: the nucleus is the smallest set of most probable tokens with mass >= p (0.5
    alone reaches 0.5; 0.5 + 0.3 = 0.8 reaches 0.6 and 0.75; 0.95 reaches 0.9)."""
    keep = top_p_keep(PROBS, top_p)
    assert torch.nonzero(keep[0]).flatten().sort().values.tolist() == sorted(kept)


def test_sampling_draws_only_from_the_nucleus_in_proportion():
    """top-p 0.75 keeps tokens 1 and 3 (0.5, 0.3): renormalised 0.625 / 0.375; temperature 1
    leaves the probabilities as they are. Fails if the nucleus or the renormalisation is off."""
    logits = PROBS.log().repeat(4000, 1)
    tok = next_token(logits, 1.0, 0.75, torch.Generator().manual_seed(0)).flatten()
    assert set(tok.tolist()) == {1, 3}
    assert (tok == 1).float().mean().item() == pytest.approx(0.625, abs=0.03)
    # temperature 0.5 sharpens: p ~ p^2 -> 0.25 / (0.25 + 0.09) = 0.735 for token 1
    tok = next_token(logits, 0.5, 1.0, torch.Generator().manual_seed(1)).flatten()
    assert (tok == 1).float().mean().item() == pytest.approx(0.25 / 0.365, abs=0.03)


def test_temperature_to_zero_is_greedy_and_same_seed_same_tokens():
    m = _lora_model(3)
    ids, _ = _batch()
    s = SplitLlama(m, 1, 1)
    greedy = split_generate(s, s, ids, COUNTS, 8)
    assert torch.equal(split_generate(s, s, ids, COUNTS, 8, temperature=1e-4, top_p=0.95), greedy)
    logits = torch.randn(50, 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(next_token(logits, 1e-4, 0.95, torch.Generator()), logits.argmax(-1, True))
    a = split_generate(s, s, ids, COUNTS, 8, temperature=1.5, top_p=0.95, seed=7)
    b = split_generate(s, s, ids, COUNTS, 8, temperature=1.5, top_p=0.95, seed=7, use_cache=False)
    c = split_generate(s, s, ids, COUNTS, 8, temperature=1.5, top_p=0.95, seed=8)
    assert torch.equal(a, b)  # same seed, same tokens (with or without the cache)
    assert not torch.equal(a, c) and not torch.equal(a, greedy)


# ---------------------------------------------------------------------------- gradient DP
def test_private_grad_clips_each_sample_by_hand():
    """Per-sample norms 0.02, 0.5 and 0.08 with clip 0.04: sample 0 untouched, samples 1 and 2
    scaled to norm 0.04 (by 0.08 and 0.5); no noise at multiplier 0; clip 0 = off."""
    g = torch.zeros(3, 2, 2)
    g[0, 1] = torch.tensor([0.012, 0.016])  # norm 0.02
    g[1, 0] = torch.tensor([0.3, 0.4])  # norm 0.5
    g[2, 1] = torch.tensor([0.0, 0.08])  # norm 0.08
    out = private_grad(g, torch.tensor([2, 2, 1]), 0.04, 0.0, seed=0)
    torch.testing.assert_close(out[0], g[0])
    torch.testing.assert_close(out[1, 0], torch.tensor([0.024, 0.032]))
    torch.testing.assert_close(out[2, 1], torch.tensor([0.0, 0.04]))
    assert (out.flatten(1).norm(dim=1) <= 0.04 + 1e-7).all()
    assert private_grad(g, torch.tensor([2, 2, 1]), 0.0, 1.0, seed=0) is g


def test_private_grad_noise_std_is_multiplier_times_clip_at_real_positions():
    """Clip 0.04, multiplier 1.5: noise std 0.06 on the real positions, none on the pads; the
    sample's clipped gradient underneath; seeded. Fails if the noise is dropped or its scale
    (sigma * C) changed, or if the clip is skipped."""
    b, length, d = 4, 10, 300
    counts = torch.tensor([10, 6, 3, 8])
    g = torch.zeros(b, length, d)
    g[:, -1, 0] = 2.0  # norm 2 each: clipped to 0.04
    out = private_grad(g, counts, 0.04, 1.5, seed=3)
    real = padding_mask(counts, length).bool()
    clean = private_grad(g, counts, 0.04, 0.0, seed=3)
    noise = out - clean
    assert noise[real].std().item() == pytest.approx(0.06, rel=0.02)
    assert noise[~real].abs().max().item() == 0.0
    assert clean[:, -1, 0].tolist() == pytest.approx([0.04] * b)
    assert torch.equal(private_grad(g, counts, 0.04, 1.5, seed=3), out)
    assert not torch.equal(private_grad(g, counts, 0.04, 1.5, seed=4), out)
