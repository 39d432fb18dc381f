"""The dual encoder, the four losses and the global retrieval metrics.

From the authors' code (Ning et al., "Learning Federated Representations and Recommendations
with Limited Negatives", arXiv:2108.07931; ``dual_encoder/`` of google-research/federated), as
summarised in ``../shared/papers/fed-retrieval.md``:

- one item embedding table shared by both towers (row 0 = padding, masked);
- context tower: bag of items (masked mean of the context items' embeddings) -> Dense(d, ReLU);
  label tower: the label item's embedding; both outputs L2-normalised (cosine similarity);
- losses on ``C`` (B x d, normalised contexts), ``E`` (B x d, normalised labels),
  ``S = C E^T``:

  * batch softmax: ``mean_b CE(S[b, :], b)`` (the other labels of the batch are the negatives);
  * global softmax: ``mean_b CE(C[b] T^T, label_b)`` over the whole normalised item table ``T``;
  * hinge on positives: ``mean_b max(0, 0.9 - S[b, b])^2`` (never pushes negatives apart);
  * spreadout of a square matrix ``M``: ``sp(M) = sqrt(sum_ij M_ij^2 - sum_i M_ii^2)``, the
    Frobenius norm of its off-diagonal part, applied as ``lambda * (sp(C C^T) + sp(E E^T) +
    sp(S))`` (context, label and cross spreadout, every lambda 0.001);
  * the losses of the paper's runs: ``batch-softmax``, ``global-softmax``, ``hinge-spreadout``
    (hinge + spreadout) and ``batch-softmax-spreadout``.

- metrics: the rank of the true item among all items by ``C T^T`` (1 = best; ties counted
  against it), global recall@K = fraction of rank <= K, and the mean rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flowerbed.common.embedding import spreadout_sq

EMBEDDING_DIM = 16
HINGE_MARGIN = 0.9
SPREADOUT_LAMBDA = 0.001


class DualEncoder(nn.Module):
    """Dual encoder with a shared item embedding (the authors' bag-of-items model).

    Parameters
    ----------
    num_items : int
        Largest item id; the table has ``num_items + 1`` rows (row 0 = padding).
    dim : int, default 16
        Embedding and context-tower width.
    """

    def __init__(self, num_items: int, dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        self.item_embedding = nn.Embedding(num_items + 1, dim)
        nn.init.uniform_(self.item_embedding.weight, -0.05, 0.05)  # Keras' Embedding default
        self.context_dense = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.context_dense.weight)  # Keras' Dense default
        nn.init.zeros_(self.context_dense.bias)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """Normalised context embeddings ``(B, dim)`` of item-id contexts ``(B, L)`` (0 = pad)."""
        mask = (context > 0).unsqueeze(-1).to(self.item_embedding.weight.dtype)
        bag = (self.item_embedding(context) * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return F.normalize(F.relu(self.context_dense(bag)), dim=-1)

    def items(self, ids: torch.Tensor) -> torch.Tensor:
        """Normalised embeddings of item ids (the label tower)."""
        return F.normalize(self.item_embedding(ids), dim=-1)

    def table(self) -> torch.Tensor:
        """The normalised embeddings of every item, ``(num_items, dim)``: row ``i`` is id
        ``i + 1``."""
        return F.normalize(self.item_embedding.weight[1:], dim=-1)


# ---------------------------------------------------------------------------- losses
def batch_softmax(c: torch.Tensor, e: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """In-batch softmax: example ``b``'s label is class ``b`` among the batch's labels, on the
    logits ``C E^T / temperature`` (1 = the authors': no temperature)."""
    s = (c @ e.T) / temperature
    return F.cross_entropy(s, torch.arange(len(c), device=c.device))


def global_softmax(
    c: torch.Tensor, table: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Full softmax over every item of ``table`` (row ``i`` = item id ``i + 1``), on the logits
    ``C T^T / temperature``."""
    return F.cross_entropy((c @ table.T) / temperature, labels - 1)


def hinge_positive(c: torch.Tensor, e: torch.Tensor, margin: float = HINGE_MARGIN) -> torch.Tensor:
    """Squared hinge on the positive pairs only: ``mean_b max(0, margin - <c_b, e_b>)^2``."""
    return F.relu(margin - (c * e).sum(-1)).pow(2).mean()


def spreadout(m: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of the off-diagonal part of the square matrix ``m``.

    The square root is taken of at least 1e-12 (a batch of one has no off-diagonal entry; the
    gradient of sqrt at 0 is infinite)."""
    off = m * (1.0 - torch.eye(len(m), device=m.device, dtype=m.dtype))
    return off.pow(2).sum().clamp_min(1e-12).sqrt()


def spreadout_terms(c: torch.Tensor, e: torch.Tensor, lam: float = SPREADOUT_LAMBDA):
    """``lam * (sp(C C^T) + sp(E E^T) + sp(C E^T))``: context, label and cross spreadout."""
    return lam * (spreadout(c @ c.T) + spreadout(e @ e.T) + spreadout(c @ e.T))


LossFn = Callable[..., torch.Tensor]


def _batch_softmax(c, e, labels, model, opts):
    return batch_softmax(c, e, opts.temperature)


def _global_softmax(c, e, labels, model, opts):
    return global_softmax(c, model.table(), labels, opts.temperature)


def _hinge_spreadout(c, e, labels, model, opts):
    """Hinge + batch spreadout, plus the whole-table spreadout when its weight is > 0 (the
    hinge pulls only; the table term is its one push that does not depend on the batch)."""
    out = hinge_positive(c, e) + spreadout_terms(c, e, opts.spreadout_lambda)
    if opts.table_spreadout_lambda:
        out = out + table_spreadout(model, opts.table_spreadout_lambda)
    return out


def _batch_softmax_spreadout(c, e, labels, model, opts):
    return batch_softmax(c, e, opts.temperature) + spreadout_terms(c, e, opts.spreadout_lambda)


#: ``loss(c, e, labels, model, opts)`` by run-config name (the ``loss`` flag of the method table)
LOSSES: dict[str, LossFn] = {
    "batch-softmax": _batch_softmax,
    "global-softmax": _global_softmax,
    "hinge-spreadout": _hinge_spreadout,
    "batch-softmax-spreadout": _batch_softmax_spreadout,
}
#: the losses whose per-example value does not depend on the other examples of the batch
#: (spreadout is a batch term, but it only pushes apart; the paper calls these batch-insensitive)
BATCH_INSENSITIVE = ("global-softmax", "hinge-spreadout")


@dataclass(frozen=True)
class LossOptions:
    """Settings of the losses.

    Attributes
    ----------
    temperature : float, default 1.0
        Divides the softmax logits (batch and global softmax); 1 = the authors' (none). The
        hinge works on the cosine itself, with its margin 0.9.
    spreadout_lambda : float, default 0.001
        Weight of each batch spreadout term (context, label, cross): the authors' 0.001.
    table_spreadout_lambda : float, default 0.0
        Weight of :func:`table_spreadout`, added to ``hinge-spreadout`` only (0 = off, as in the
        issue; the authors' documented run sets their table regulariser to 0.001 for every
        loss; measured here, it lowered batch softmax + spreadout's recall).
    """

    temperature: float = 1.0
    spreadout_lambda: float = SPREADOUT_LAMBDA
    table_spreadout_lambda: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def loss_for(
    name: str, model: DualEncoder, opts: LossOptions | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(model(context), labels)`` for :func:`flowerbed.common.train.train`."""
    fn, opts = LOSSES[name], opts or LossOptions()
    return lambda c, labels: fn(c, model.items(labels), labels, model, opts)


def table_spreadout(model: DualEncoder, lam: float) -> torch.Tensor:
    """The authors' embedding regulariser ``lam * sp(T T^T)`` on the whole normalised item
    table ``T`` (padding row excluded): batch-insensitive, it pushes every pair of items apart
    whatever the batch holds.

    Computed without the ``V x V`` matrix by :func:`flowerbed.common.embedding.spreadout_sq`
    (``||T^T T||_F^2 - sum_i ||t_i||^4``, a ``d x d`` Gram matrix): the same value as
    ``spreadout(T @ T.T)`` in ``O(V d^2)`` instead of ``O(V^2 d)``."""
    return lam * spreadout_sq(model.table(), normalize=False).clamp_min(1e-12).sqrt()


# ---------------------------------------------------------------------------- metrics
@torch.no_grad()
def ranks(
    model: DualEncoder, context: torch.Tensor, labels: torch.Tensor, batch_size: int = 2048
) -> torch.Tensor:
    """Rank (1 = best) of each true label among all items by ``C T^T``: the number of items
    scoring at least as high as it (ties count against it, so a collapsed model whose scores
    are all equal ranks every label last, not first)."""
    model.eval()
    table = model.table()
    out = []
    for i in range(0, len(labels), batch_size):
        c = model(context[i : i + batch_size])
        s = c @ table.T
        true = s.gather(1, (labels[i : i + batch_size] - 1).unsqueeze(1))
        out.append((s >= true).sum(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def retrieval_metrics(
    model: DualEncoder, context: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Global recall@K over all items and the mean rank."""
    r = ranks(model, context, labels).double()
    out = {f"recall@{k}": float((r <= k).double().mean()) for k in ks}
    out["mean-rank"] = float(r.mean())
    return out
