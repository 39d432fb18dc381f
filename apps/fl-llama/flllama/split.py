"""The split LLaMA of FL-LLaMA: blocks A / B / C, mask compression, hidden-state noise, the
gradient hand-offs and split generation (greedy, or temperature + top-p sampling) with a KV cache
on both sides.

Zhang et al., "A Federated Splitting Framework for LLMs: Security, Efficiency, and
Adaptability" (FL-LLaMA / FedSEA-LLaMA), arXiv:2505.15683; the split follows the authors' code
(TAP-LLM/SplitFedLLM, ``FL-LLaMA/``):

- **A** (client): token embedding + decoder layers ``0 .. p-1``;
- **B** (server): decoder layers ``p .. N-q-1``;
- **C** (client): decoder layers ``N-q .. N-1`` + final norm + LM head.

Each block has its own LoRA adapter on q/k/v/o (:func:`add_lora` puts one on every layer; a
block's adapter is the LoRA parameters of its layers, :func:`block_lora`). Inputs are LEFT padded;
only the per-sample non-pad token counts cross the wire (*attention-mask compression*): each side
rebuilds the padding mask, the 4-D causal mask and the position ids from the counts
(:func:`padding_mask`, :func:`causal_mask`, :func:`position_ids`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


class SplitError(ValueError):
    """A split that cannot be made (p + q >= number of layers, p or q < 1)."""


# ---------------------------------------------------------------------------- masks from counts
def padding_mask(counts: torch.Tensor, length: int) -> torch.Tensor:
    """The (left-padding) attention mask ``(b, length)`` of 0/1 from the non-pad counts."""
    counts = torch.as_tensor(counts, dtype=torch.long).reshape(-1, 1)
    cols = torch.arange(length, device=counts.device).reshape(1, -1)
    return (cols >= length - counts).long()


def position_ids(counts: torch.Tensor, length: int, offset: int = 0) -> torch.Tensor:
    """Position ids ``(b, length)``: 0 at each sample's first real token (pads get 0), as
    ``attention_mask.cumsum(-1) - 1`` clamped at 0 (what Hugging Face's ``generate`` uses).

    ``offset`` > 0 gives the positions of the last ``length`` tokens of a sequence of
    ``offset + length`` tokens (decoding with a cache)."""
    counts = torch.as_tensor(counts, dtype=torch.long).reshape(-1, 1)
    total = offset + length
    cols = torch.arange(offset, total, device=counts.device).reshape(1, -1)
    return (cols - (total - counts)).clamp(min=0)


def causal_mask(
    counts: torch.Tensor, q_len: int, kv_len: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Additive 4-D mask ``(b, 1, q_len, kv_len)``: the last ``q_len`` queries of a sequence of
    ``kv_len`` tokens see the real (non-pad) keys up to themselves; 0 = attend, dtype min = not.

    A padded query row sees nothing real: it keeps its own key so that softmax stays finite
    (its output is never used: no real query attends to a pad key and pads carry no label).
    """
    counts = torch.as_tensor(counts, dtype=torch.long).reshape(-1, 1, 1, 1)
    q = torch.arange(kv_len - q_len, kv_len, device=counts.device).reshape(1, 1, -1, 1)
    k = torch.arange(kv_len, device=counts.device).reshape(1, 1, 1, -1)
    allowed = (k <= q) & ((k >= kv_len - counts) | (k == q))
    out = torch.zeros(allowed.shape, dtype=dtype, device=counts.device)
    return out.masked_fill(~allowed, torch.finfo(dtype).min)


def counts_of(mask: torch.Tensor) -> torch.Tensor:
    """Non-pad token counts per sample of a 0/1 attention mask (what crosses the wire)."""
    return mask.long().sum(-1)


# ---------------------------------------------------------------------------- noise
def noise_std(sigma: float, mean_abs: bool) -> float:
    """Standard deviation of the hidden-state noise for the setting ``sigma``.

    ``mean_abs`` False: std = sigma. ``mean_abs`` True (the authors' code): std = sigma *
    sqrt(pi/2), so that E|noise| = sigma (for N(0, s^2), E|x| = s * sqrt(2/pi)).
    """
    return float(sigma) * (math.sqrt(math.pi / 2.0) if mean_abs else 1.0)


def add_noise(h: torch.Tensor, sigma: float, mean_abs: bool, seed: int) -> torch.Tensor:
    """``h + N(0, noise_std(sigma, mean_abs)^2)``, drawn from a generator seeded with ``seed``."""
    if sigma <= 0:
        return h
    gen = torch.Generator().manual_seed(int(seed) % (2**63))
    eps = torch.randn(h.shape, generator=gen, dtype=torch.float32).to(h.device, h.dtype)
    return h + noise_std(sigma, mean_abs) * eps


def private_grad(
    grad: torch.Tensor, counts: torch.Tensor, clip: float, multiplier: float, seed: int
) -> torch.Tensor:
    """Gradient DP on what the client sends back (dL/dh_B, ``(b, L, d)``; the authors' option):
    each sample's gradient ``grad[i]`` is clipped to L2 norm <= ``clip`` (scaled by
    min(1, clip / ||grad[i]||)), then Gaussian noise of std ``multiplier * clip`` is added to
    every entry at the sample's real (non-pad) positions, drawn from a generator seeded with
    ``seed``. ``clip`` <= 0: the gradient is returned unchanged."""
    if clip <= 0:
        return grad
    norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    out = grad * (clip / norms).clamp(max=1.0).reshape(-1, 1, 1)
    if multiplier > 0:
        gen = torch.Generator().manual_seed(int(seed) % (2**63))
        eps = torch.randn(grad.shape, generator=gen, dtype=torch.float32).to(grad.device)
        real = padding_mask(counts.to(grad.device), grad.shape[1]).unsqueeze(-1)
        out = out + float(multiplier) * float(clip) * eps.to(grad.dtype) * real
    return out


# ---------------------------------------------------------------------------- LoRA
def add_lora(model: nn.Module, rank: int, alpha: float, seed: int) -> nn.Module:
    """``model`` with a LoRA adapter (peft) on q/k/v/o of every decoder layer; the base weights
    are frozen. LoRA's A matrices are drawn from ``seed``, its B matrices start at 0."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(int(seed))
    cfg = LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=list(LORA_TARGETS))
    return get_peft_model(model, cfg)


def layer_of(name: str) -> int | None:
    """Decoder layer index of a parameter name (None: not in a decoder layer)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def block_lora(model: nn.Module, layers: Iterable[int]) -> dict[str, torch.Tensor]:
    """The LoRA parameters of the decoder ``layers`` (a block's adapter), detached copies."""
    want = set(layers)
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if "lora_" in n and layer_of(n) in want
    }


def load_lora(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (a block's adapter) into ``model``'s LoRA parameters."""
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise KeyError(f"LoRA parameter {missing[0]!r} is not in the model")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(torch.as_tensor(t, dtype=params[n].dtype))


def average_lora(
    adapters: list[dict[str, torch.Tensor]], weights: list[float]
) -> dict[str, torch.Tensor]:
    """FedAvg of client adapters: sum_k w_k * lora_k / sum_k w_k, parameter by parameter."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("average_lora: the weights sum to 0")
    return {
        n: sum(float(w) * a[n] for a, w in zip(adapters, weights, strict=True)) / total
        for n in adapters[0]
    }


# ---------------------------------------------------------------------------- the split model
def base_of(model: nn.Module) -> nn.Module:
    """The ``LlamaForCausalLM`` inside a peft wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


class SplitLlama:
    """Blocks A / B / C of one ``LlamaForCausalLM`` (LoRA'd or not), split at ``p`` and ``q``.

    Both sides build the same object; a client uses :meth:`forward_a` / :meth:`forward_c` and
    ``a_layers`` / ``c_layers``, the server :meth:`forward_b` and ``b_layers``.

    Parameters
    ----------
    model : nn.Module
        A ``LlamaForCausalLM``, possibly wrapped by peft.
    p, q : int
        Decoder layers in A (after the embedding) and in C (before the norm and head), >= 1 each,
        p + q < number of layers (B keeps at least one).
    """

    def __init__(self, model: nn.Module, p: int, q: int) -> None:
        self.model = model
        self.lm = base_of(model)
        self.config = self.lm.config
        n = int(self.config.num_hidden_layers)
        if p < 1 or q < 1 or p + q >= n:
            raise SplitError(f"split p={p}, q={q}: need p >= 1, q >= 1, p + q < {n} layers")
        self.p, self.q, self.n = int(p), int(q), n
        self.a_layers = range(0, p)
        self.b_layers = range(p, n - q)
        self.c_layers = range(n - q, n)
        self.hidden_size = int(self.config.hidden_size)

    # ------------------------------------------------------------------ blocks
    def _layers(self, h, layers, counts, offset, cache):
        length = h.shape[1]
        pos = position_ids(counts, length, offset).to(h.device)
        mask = causal_mask(counts, length, offset + length, h.dtype).to(h.device)
        rope = self.lm.model.rotary_emb(h, position_ids=pos)
        for i in layers:
            h = self.lm.model.layers[i](
                h,
                attention_mask=mask,
                position_ids=pos,
                position_embeddings=rope,
                cache=cache,
                use_cache=cache is not None,
            )
        return h

    def forward_a(self, input_ids, counts, offset: int = 0, cache=None) -> torch.Tensor:
        """Client: embedding + layers ``0..p-1``; ``(b, L, d)`` hidden states."""
        h = self.lm.model.embed_tokens(input_ids)
        return self._layers(h, self.a_layers, counts, offset, cache)

    def forward_b(self, h, counts, offset: int = 0, cache=None) -> torch.Tensor:
        """Server: layers ``p..N-q-1``, masks rebuilt from ``counts``."""
        return self._layers(h, self.b_layers, counts, offset, cache)

    def forward_c(self, h, counts, offset: int = 0, cache=None) -> torch.Tensor:
        """Client: layers ``N-q..N-1``, final norm and LM head; ``(b, L, vocab)`` logits."""
        h = self._layers(h, self.c_layers, counts, offset, cache)
        return self.lm.lm_head(self.lm.model.norm(h))

    def new_cache(self):
        """An empty KV cache for one side (each block keeps its own)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.config)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over the labelled tokens (label -100 = not scored):
    L = - sum_{t in target} log p(y_t | y_<t) / |target|, logits at t predict token t + 1."""
    logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    target = labels[:, 1:].reshape(-1)
    return nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="mean")


def split_step(
    split_client: SplitLlama,
    split_server: SplitLlama,
    input_ids: torch.Tensor,
    counts: torch.Tensor,
    labels: torch.Tensor,
    sigma: float = 0.0,
    mean_abs: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """One split forward/backward in one process, with the hand-offs of the protocol (every
    tensor that crosses the wire is detached): A -> (noise) -> B -> C + loss, then dL/dh_B back
    to B and dL/dh_A back to A. Gradients accumulate in both models' LoRA parameters.

    Returns the crossing tensors: ``h_a`` (sent, noised), ``h_b``, ``grad_b``, ``grad_a``,
    ``loss``.
    """
    h_a = split_client.forward_a(input_ids, counts)
    sent = add_noise(h_a.detach(), sigma, mean_abs, seed)
    # server
    h_in = sent.clone().requires_grad_(True)
    h_b = split_server.forward_b(h_in, counts)
    # client
    hb_in = h_b.detach().clone().requires_grad_(True)
    loss = lm_loss(split_client.forward_c(hb_in, counts), labels)
    loss.backward()
    grad_b = hb_in.grad.detach()
    # server
    h_b.backward(grad_b)
    grad_a = h_in.grad.detach()
    # client
    h_a.backward(grad_a)
    return {"h_a": sent, "h_b": h_b.detach(), "grad_b": grad_b, "grad_a": grad_a, "loss": loss}


# ---------------------------------------------------------------------------- generation
def top_p_keep(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus of each row of ``probs`` (..., V): True for the smallest set of most probable
    tokens whose total mass is >= ``top_p`` (a token is kept when the mass of the tokens before it
    in decreasing order is < ``top_p``; the most probable token is always kept)."""
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
    sorted_p = probs.gather(-1, order)
    before = sorted_p.cumsum(-1) - sorted_p
    keep_sorted = before < top_p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token ``(b, 1)`` from the last position's logits ``(b, V)``: greedy (argmax) when
    ``temperature`` <= 0, else a draw from softmax(logits / temperature) restricted to the top-p
    nucleus (:func:`top_p_keep`) and renormalised, with ``generator`` (CPU)."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.float().cpu() / float(temperature), -1)
    probs = torch.where(top_p_keep(probs, top_p), probs, torch.zeros_like(probs))
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator).to(logits.device)


@torch.no_grad()
def split_generate(
    client: SplitLlama,
    server: SplitLlama,
    input_ids: torch.Tensor,
    counts: torch.Tensor,
    max_new_tokens: int,
    use_cache: bool = True,
    sent: list | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> torch.Tensor:
    """Generation through the split model (A, C on the client, B on the server): greedy when
    ``temperature`` <= 0 (the default), else temperature + top-p sampling (the paper: 0.1 and
    0.95) drawn on the client from a generator seeded with ``seed`` (:func:`next_token`).

    With ``use_cache`` both sides keep a KV cache: after the prefill only the new token's hidden
    state ``(b, 1, d)`` and the counts cross each way. Without it, every step sends the whole
    sequence's hidden states. ``sent`` (a list) collects the hidden-state shapes that crossed
    client -> server, for tests and byte counts. Returns the new tokens ``(b, max_new_tokens)``.
    """
    counts = torch.as_tensor(counts, dtype=torch.long).clone()
    gen = torch.Generator().manual_seed(int(seed) % (2**63))
    ids = input_ids
    ca = client.new_cache() if use_cache else None
    cb = server.new_cache() if use_cache else None
    cc = client.new_cache() if use_cache else None
    new = []
    step_in, offset = ids, 0
    for _ in range(int(max_new_tokens)):
        h = client.forward_a(step_in, counts, offset, ca)
        if sent is not None:
            sent.append(tuple(h.shape))
        h = server.forward_b(h, counts, offset, cb)
        logits = client.forward_c(h, counts, offset, cc)
        tok = next_token(logits[:, -1, :], temperature, top_p, gen)
        new.append(tok)
        ids = torch.cat([ids, tok], dim=1)
        counts = counts + 1
        if use_cache:
            offset, step_in = ids.shape[1] - 1, tok
        else:
            step_in = ids
    return torch.cat(new, dim=1)


@torch.no_grad()
def unsplit_generate(model: nn.Module, input_ids, counts, max_new_tokens: int) -> torch.Tensor:
    """Greedy generation with the whole (unsplit) model, full recomputation each step with the
    tokenizer-style mask and position ids: the reference for :func:`split_generate`."""
    counts = torch.as_tensor(counts, dtype=torch.long).clone()
    ids = input_ids
    new = []
    for _ in range(int(max_new_tokens)):
        length = ids.shape[1]
        out = model(
            input_ids=ids,
            attention_mask=padding_mask(counts, length),
            position_ids=position_ids(counts, length),
        )
        tok = out.logits[:, -1, :].argmax(-1, keepdim=True)
        new.append(tok)
        ids = torch.cat([ids, tok], dim=1)
        counts = counts + 1
    return torch.cat(new, dim=1)
