"""The clients' character language models: n-gram (orders 2-4) and a tiny GRU.

Both are models of the symbols of :data:`ALPHABET` (space, apostrophe, a-z) plus the end of
sentence ``EOS``; ``BOS`` pads the context only. Both give, for a list of texts, a padded table of
per-character log-probabilities (:meth:`NGramLM.table`, :meth:`GRULM.table`), the input of the
server's merges (:mod:`flowerbed.strategies.match_merge`).

**N-gram** (:class:`NGramLM`): counts of every k-gram, k = 1..n, with ``n - 1`` BOS of left
context; the probability is interpolated additive (Dirichlet-prior) smoothing, recursive over the
orders::

    P_0(c)       = 1 / V                              (V = 29 predictable symbols)
    P_k(c | h)   = (C(h c) + kappa P_{k-1}(c | h')) / (C(h) + kappa)

with ``h`` the last ``k - 1`` symbols, ``h'`` the last ``k - 2`` and ``C(h) = sum_c C(h c)``. It is
sent as the sorted k-gram codes and their counts, per order (:meth:`NGramLM.arrays`).

**GRU** (:class:`GRULM`): embedding 16, one GRU layer of 64 units, a linear head over the
symbols (BOS masked); trained with Adam on the client's sentences, seeded by
(seed, partition, round). It is sent as its state dict.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord

BOS, EOS = 0, 1
ALPHABET = " '" + "abcdefghijklmnopqrstuvwxyz"
SYMBOLS = 2 + len(ALPHABET)  # BOS, EOS, then the alphabet: 30
V = SYMBOLS - 1  # what can be predicted (not BOS): 29
_INDEX = {c: i + 2 for i, c in enumerate(ALPHABET)}
_NOT_KEPT = re.compile(r"[^a-z' ]+")
NGRAM, NEURAL = 0, 1  # the metric lm-kind of an upload
KIND_NAMES = {NGRAM: "ngram", NEURAL: "neural"}


def normalise(text: str) -> str:
    """Lower case ASCII letters, apostrophes and single spaces (accents stripped, anything else
    becomes a space)."""
    t = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return " ".join(_NOT_KEPT.sub(" ", t).split())


def encode(text: str) -> list[int]:
    """Symbol ids of a normalised text (unknown characters are skipped), without BOS/EOS."""
    return [_INDEX[c] for c in text if c in _INDEX]


def _positions(texts: Sequence[str], t_max: int, order: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ctx, tgt)``: for every text and position ``t < t_max`` the ``order - 1`` previous
    symbols (BOS-padded) and the target symbol (EOS at the end; -1 past it)."""
    ctx = np.full((len(texts), t_max, max(order - 1, 0)), BOS, dtype=np.int64)
    tgt = np.full((len(texts), t_max), -1, dtype=np.int64)
    for i, text in enumerate(texts):
        seq = encode(text)[: t_max - 1] + [EOS]
        padded = [BOS] * (order - 1) + seq
        for t, c in enumerate(seq):
            tgt[i, t] = c
            if order > 1:
                ctx[i, t] = padded[t : t + order - 1]
    return ctx, tgt


# ---------------------------------------------------------------------------- n-gram
def _code(symbols: np.ndarray) -> np.ndarray:
    """Base-SYMBOLS code of each row of k symbols (the last axis)."""
    code = np.zeros(symbols.shape[:-1], dtype=np.int64)
    for j in range(symbols.shape[-1]):
        code = code * SYMBOLS + symbols[..., j]
    return code


class NGramLM:
    """A character n-gram with interpolated additive smoothing (module docstring).

    Parameters
    ----------
    order : int
        n (1..6).
    counts : list of (codes, counts)
        Per order k = 1..n: the sorted codes of the k-grams seen and their counts (> 0).
    kappa : float, default 1.0
        The smoothing mass ``kappa`` (> 0).
    """

    kind = "ngram"

    def __init__(self, order: int, counts: list[tuple[np.ndarray, np.ndarray]], kappa: float = 1.0):
        self.order = int(order)
        self.kappa = float(kappa)
        self.name = f"ngram{self.order}"
        self.codes = [np.asarray(c, dtype=np.int64) for c, _ in counts]
        self.counts = [np.asarray(n, dtype=np.float64) for _, n in counts]
        # C(h) = sum_c C(h c): the k-gram counts summed by their context code (code // SYMBOLS)
        self.ctx_codes, self.ctx_counts = [], []
        for codes, n in zip(self.codes, self.counts, strict=True):
            ctx, inv = np.unique(codes // SYMBOLS, return_inverse=True)
            tot = np.zeros(len(ctx))
            np.add.at(tot, inv, n)
            self.ctx_codes.append(ctx)
            self.ctx_counts.append(tot)

    @classmethod
    def train(cls, sentences: Sequence[str], order: int, kappa: float = 1.0) -> NGramLM:
        """Count the k-grams (k = 1..order) of ``sentences`` (normalised text)."""
        texts = list(sentences)
        t_max = max((len(s) for s in texts), default=0) + 1
        ctx, tgt = _positions(texts, t_max, order)
        keep = tgt >= 0
        grams = np.concatenate([ctx, tgt[..., None]], axis=-1)[keep]  # (positions, order)
        counts = []
        for k in range(1, order + 1):
            codes, n = np.unique(_code(grams[:, order - k :]), return_counts=True)
            counts.append((codes, n.astype(np.float64)))
        return cls(order, counts, kappa)

    @staticmethod
    def _lookup(keys: np.ndarray, codes: np.ndarray, values: np.ndarray) -> np.ndarray:
        if len(codes) == 0:
            return np.zeros(keys.shape)
        i = np.clip(np.searchsorted(codes, keys), 0, len(codes) - 1)
        return np.where(codes[i] == keys, values[i], 0.0)

    def prob(self, ctx: np.ndarray, tgt: np.ndarray) -> np.ndarray:
        """``P_n(tgt | ctx)`` for arrays of contexts ``(..., n-1)`` and targets ``(...)``."""
        p = np.full(tgt.shape, 1.0 / V)
        for k in range(1, self.order + 1):
            h = ctx[..., self.order - k :] if k > 1 else ctx[..., :0]
            gram = _code(np.concatenate([h, tgt[..., None]], axis=-1))
            c_hc = self._lookup(gram, self.codes[k - 1], self.counts[k - 1])
            c_h = self._lookup(gram // SYMBOLS, self.ctx_codes[k - 1], self.ctx_counts[k - 1])
            p = (c_hc + self.kappa * p) / (c_h + self.kappa)
        return p

    def table(self, texts: Sequence[str], t_max: int) -> np.ndarray:
        """``(len(texts), t_max)`` per-character log-probabilities (EOS included, 0 after)."""
        ctx, tgt = _positions(texts, t_max, self.order)
        keep = tgt >= 0
        p = self.prob(ctx, np.where(keep, tgt, EOS))
        return np.where(keep, np.log(p), 0.0)

    def arrays(self) -> ArrayRecord:
        rec = {}
        for k, (codes, n) in enumerate(zip(self.codes, self.counts, strict=True), start=1):
            rec[f"codes-{k}"] = Array(codes)
            rec[f"counts-{k}"] = Array(n)
        return ArrayRecord(rec)

    def metrics(self) -> dict:
        return {"lm-kind": NGRAM, "order": self.order, "kappa": self.kappa}

    @classmethod
    def from_arrays(cls, arrays: ArrayRecord, meta: MetricRecord) -> NGramLM:
        """The n-gram of an upload; ValueError naming what is wrong."""
        order = int(meta.get("order", 0))
        kappa = float(meta.get("kappa", 0.0))
        if not 1 <= order <= 6:
            raise ValueError(f"n-gram order {order} not in 1..6")
        if not kappa > 0:
            raise ValueError(f"kappa {kappa} must be > 0")
        want = {f"{w}-{k}" for k in range(1, order + 1) for w in ("codes", "counts")}
        if set(arrays.keys()) != want:
            raise ValueError(f"n-gram arrays {sorted(arrays.keys())}, expected {sorted(want)}")
        counts = []
        for k in range(1, order + 1):
            codes, n = arrays[f"codes-{k}"].numpy(), arrays[f"counts-{k}"].numpy()
            if codes.ndim != 1 or codes.shape != n.shape:
                raise ValueError(f"order {k}: codes {codes.shape} and counts {n.shape} differ")
            if not np.issubdtype(codes.dtype, np.integer):
                raise ValueError(f"order {k}: codes are not integers")
            if codes.size and (codes.min() < 0 or codes.max() >= SYMBOLS**k):
                raise ValueError(f"order {k}: a code outside [0, {SYMBOLS}^{k})")
            if codes.size > 1 and np.any(np.diff(codes) <= 0):
                raise ValueError(f"order {k}: codes not sorted and unique")
            if not np.all(np.isfinite(n)) or np.any(n <= 0):
                raise ValueError(f"order {k}: counts must be finite and > 0")
            counts.append((codes, n))
        return cls(order, counts, kappa)


# ---------------------------------------------------------------------------- GRU
class CharGRU(torch.nn.Module):
    def __init__(self, hidden: int = 64, embed: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(SYMBOLS, embed)
        self.gru = torch.nn.GRU(embed, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, SYMBOLS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the next symbol ``(B, T, SYMBOLS)``; BOS never predicted."""
        logits = self.head(self.gru(self.embed(x))[0])
        logits[..., BOS] = float("-inf")
        return torch.log_softmax(logits, dim=-1)


def _batch(texts: Sequence[str], t_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (BOS + symbols) and targets (symbols + EOS, -1 on padding), ``(B, t_max)``."""
    _, tgt = _positions(texts, t_max, 1)
    inp = np.full(tgt.shape, BOS, dtype=np.int64)
    inp[:, 1:] = np.where(tgt[:, :-1] >= 0, tgt[:, :-1], BOS)
    return torch.from_numpy(inp), torch.from_numpy(tgt)


class GRULM:
    """A character GRU language model (module docstring)."""

    kind = "neural"

    def __init__(self, model: CharGRU) -> None:
        self.model = model.eval()
        self.name = f"gru{model.gru.hidden_size}"

    @classmethod
    def train(
        cls,
        sentences: Sequence[str],
        seed: int,
        steps: int = 200,
        batch_size: int = 32,
        lr: float = 3e-3,
        hidden: int = 64,
        max_len: int = 160,
        device: str | torch.device = "cpu",
        log_every: int = 0,
    ) -> GRULM:
        """Adam on random batches of ``sentences`` for ``steps`` steps (seeded by ``seed``)."""
        torch.manual_seed(int(seed))
        model = CharGRU(hidden).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        texts = [s[: max_len - 1] for s in sentences]
        rng = np.random.default_rng(int(seed))
        for step in range(int(steps)):
            pick = rng.choice(len(texts), size=min(batch_size, len(texts)), replace=False)
            chunk = [texts[i] for i in pick]
            inp, tgt = _batch(chunk, max(len(s) for s in chunk) + 1)
            inp, tgt = inp.to(device), tgt.to(device)
            logp = model(inp)
            mask = tgt >= 0
            loss = -logp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0][mask].mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if log_every and (step + 1) % log_every == 0:
                print(
                    f"[matchmerge] GRU step {step + 1}/{steps} loss {loss.item():.3f}", flush=True
                )
        return cls(model.cpu())

    @torch.no_grad()
    def table(self, texts: Sequence[str], t_max: int) -> np.ndarray:
        out = np.zeros((len(texts), t_max))
        for i in range(0, len(texts), 256):
            inp, tgt = _batch(texts[i : i + 256], t_max)
            logp = self.model(inp).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
            out[i : i + 256] = torch.where(tgt >= 0, logp, 0.0).double().numpy()
        return out

    def arrays(self) -> ArrayRecord:
        return ArrayRecord(
            {k: Array(v.detach().numpy()) for k, v in self.model.state_dict().items()}
        )

    def metrics(self) -> dict:
        return {"lm-kind": NEURAL, "hidden": self.model.gru.hidden_size}

    @classmethod
    def from_arrays(cls, arrays: ArrayRecord, meta: MetricRecord) -> GRULM:
        """The GRU of an upload; ValueError naming a missing key or a wrong shape."""
        hidden = int(meta.get("hidden", 0))
        if not 1 <= hidden <= 1024:
            raise ValueError(f"GRU hidden size {hidden} not in 1..1024")
        model = CharGRU(hidden)
        want = model.state_dict()
        if set(arrays.keys()) != set(want):
            raise ValueError(f"GRU arrays {sorted(arrays.keys())}, expected {sorted(want)}")
        state = {}
        for k, ref in want.items():
            a = arrays[k].numpy()
            if tuple(a.shape) != tuple(ref.shape):
                raise ValueError(
                    f"GRU array {k!r} has shape {a.shape}, expected {tuple(ref.shape)}"
                )
            state[k] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        model.load_state_dict(state)
        return cls(model)


def load_lm(arrays: ArrayRecord, meta: MetricRecord):
    """The LM of an upload reply (the strategy's loader)."""
    kind = int(meta["lm-kind"])
    return NGramLM.from_arrays(arrays, meta) if kind == NGRAM else GRULM.from_arrays(arrays, meta)
