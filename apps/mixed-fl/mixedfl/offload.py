"""Mixed FL offloading scenario: MovieLens-100K users as clients, an item embedding table, the
spreadout regulariser as ``f_c`` (computed at the server with ``offload``, on every client with
``offload-baseline``; the strategy is :mod:`flowerbed.strategies.mixed_fl_offload`).

RECONSTRUCTION of the paper's use case (the paper note's offline variant):

- data: MovieLens-100K (from the recbole wheel, :mod:`flowerbed.common.movielens`); the first
  ``offload-users`` user ids (0 = all 943); node ``p`` of ``n`` holds the users ``p, p + n, ...``
  (one user per node when ``n`` = the users). Each user's items sorted by time; the last one is
  held out (the test example: context = the 10 items before it); the others give the training
  examples: position ``j >= 1`` -> context = the previous <= 10 items (padded with 0), label =
  item ``j`` (the pipeline of fed-retrieval's authors, one held-out item per user);
- model: the item table ``T`` (``1,683 x embedding-dim``, row 0 = padding, uniform +-0.05),
  nothing else; a context is the L2-normalised mean of its items' rows; ``f_i`` is the squared
  hinge on the positives ``mean_b max(0, 0.9 - cos(c_b, t_label_b))^2`` (margin 0.9 from
  fed-retrieval's authors): it only pulls, so the table needs ``f_c``, the push of
  :func:`flowerbed.common.embedding.spreadout_sq` (``lam`` = ``spreadout-lambda``);
- a client with ``offload`` builds a table of only its rows (ids remapped to ``1..n``) and
  steps on ``f_i``; with ``offload-baseline`` it gets the whole table and steps on
  ``w_f f_i + w_c f_c`` (the objective the server combines in ``offload``);
- client compute (per round, in the reply's metrics): SGD steps (measured), rows with a non-zero
  gradient summed over the steps (measured), and FLOPs counted analytically:
  :func:`hinge_flops` per example, :func:`flowerbed.common.embedding.spreadout_flops` per step
  with the regulariser, ``2 d`` per updated row;
- evaluation (server): recall@10 and mean rank of each user's held-out item among all items by
  cosine (ties count against it), ``f_f`` (mean hinge over all training examples) and ``f_c``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, Message

from flowerbed.common.client import call_seed, partition_of
from flowerbed.common.embedding import spreadout_flops, spreadout_sq
from flowerbed.common.movielens import load_ml100k, user_timelines
from flowerbed.common.records import config_get, reply
from flowerbed.common.seeding import derive_seed, set_seed
from flowerbed.strategies.mixed_fl_offload import IDS, LAMBDA_KEY, ROWS, TABLE, WC_KEY, WF_KEY

MAX_CONTEXT = 10
MARGIN = 0.9
MODEL_SEED = 0xFFFF


@dataclass(frozen=True)
class Examples:
    """``context`` (n, 10) item ids (0 = pad) and ``label`` (n,) item ids."""

    context: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def rows(self) -> np.ndarray:
        """The item ids these examples use (sorted, unique, no padding), as int32."""
        ids = np.unique(np.concatenate([self.context.ravel(), self.label]))
        return ids[ids > 0].astype(np.int32)


def _examples(items: np.ndarray, positions: range) -> Examples:
    ctx = np.zeros((len(positions), MAX_CONTEXT), dtype=np.int64)
    for r, j in enumerate(positions):
        prev = items[max(0, j - MAX_CONTEXT) : j]
        ctx[r, : len(prev)] = prev
    return Examples(ctx, np.asarray([items[j] for j in positions], dtype=np.int64))


@dataclass(frozen=True)
class Users:
    """The run's users: training examples per user, the held-out test examples, ``num_items``."""

    train: dict[int, Examples]
    test: Examples
    num_items: int


@lru_cache(maxsize=4)
def load_users(max_users: int) -> Users:
    """The first ``max_users`` user ids of MovieLens-100K (0 = all): for each, training examples
    from positions ``1 .. len-2`` of the timeline, the last item held out."""
    ratings = load_ml100k()
    per_user = user_timelines(ratings)
    users = sorted(per_user)[: max_users or None]
    train, test = {}, []
    for u in users:
        items = per_user[u]
        if len(items) < 3:
            continue
        train[u] = _examples(items, range(1, len(items) - 1))
        test.append(_examples(items, range(len(items) - 1, len(items))))
    ctx = np.concatenate([t.context for t in test])
    return Users(train, Examples(ctx, np.concatenate([t.label for t in test])), ratings.num_items)


def node_examples(max_users: int, partition_id: int, num_partitions: int) -> Examples:
    """Training examples of node ``partition_id``: users ``p, p + n, ...`` (sorted ids)."""
    users = load_users(max_users)
    mine = sorted(users.train)[partition_id::num_partitions]
    if not mine:
        return Examples(np.zeros((0, MAX_CONTEXT), np.int64), np.zeros(0, np.int64))
    parts = [users.train[u] for u in mine]
    return Examples(
        np.concatenate([p.context for p in parts]), np.concatenate([p.label for p in parts])
    )


# ---------------------------------------------------------------------------- model and losses
def initial_table(cfg) -> np.ndarray:
    """The table, uniform +-0.05 from the run seed (identical in every process); row 0 zeros."""
    gen = torch.Generator().manual_seed(derive_seed(cfg["seed"], MODEL_SEED))
    n = load_users(cfg["offload-users"]).num_items + 1
    t = torch.rand(n, cfg["embedding-dim"], generator=gen) * 0.1 - 0.05
    t[0] = 0.0
    return t.numpy()


def initial_arrays(cfg) -> ArrayRecord:
    return ArrayRecord({TABLE: Array(initial_table(cfg))})


def contexts(table: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """L2-normalised masked mean of the context items' rows, ``(B, d)``."""
    mask = (context > 0).unsqueeze(-1).to(table.dtype)
    bag = (table[context] * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return F.normalize(bag, dim=-1)


def hinge(table: torch.Tensor, context: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """``f_i``: ``mean_b max(0, 0.9 - cos(c_b, t_label_b))^2``."""
    c = contexts(table, context)
    e = F.normalize(table[label], dim=-1)
    return F.relu(MARGIN - (c * e).sum(-1)).pow(2).mean()


def hinge_flops(batch: int, dim: int, context: int = MAX_CONTEXT) -> int:
    """Analytic FLOPs of :func:`hinge` on a batch, forward and backward (3x the forward): the
    masked mean (``(L + 1) d``), two normalisations (``4 d`` each), the cosine (``2 d``), the
    hinge (~3)."""
    return 3 * batch * ((context + 1) * dim + 8 * dim + 2 * dim + 3)


# ---------------------------------------------------------------------------- client side
def client_ids(msg: Message, context, cfg) -> Message:
    """``offload.ids``: the ids of the rows this node's examples use."""
    pid, n = partition_of(context)
    ex = node_examples(cfg["offload-users"], pid, n)
    content = reply(**{"num-examples": len(ex)})
    content[IDS] = ArrayRecord({IDS: Array(ex.rows())})
    return Message(content=content, reply_to=msg)


def client_train(msg: Message, context, cfg) -> Message:
    """``local-steps`` SGD steps (batch ``batch-size``, ``lr``) seeded by (seed, partition,
    round). With ``rows`` in the message (offload) on the received rows only, loss ``f_i``;
    with the whole ``arrays`` (baseline) on ``w_f f_i + w_c f_c``. Replies ``rows`` (the shape
    received) and the client compute."""
    pid, n = partition_of(context)
    ex = node_examples(cfg["offload-users"], pid, n)
    conf = msg.content.config_records.get("config")
    ctx, lab = torch.from_numpy(ex.context), torch.from_numpy(ex.label)
    offload = ROWS in msg.content.array_records
    if offload:
        ids = msg.content[ROWS][IDS].numpy()
        sent = msg.content[ROWS][ROWS].numpy()
        table = torch.from_numpy(np.concatenate([np.zeros((1, sent.shape[1]), sent.dtype), sent]))
        # global id -> local row (1..n); ids this node did not ask for map to padding
        local = np.zeros(int(max(ids.max(), ex.rows().max(initial=0))) + 1, dtype=np.int64)
        local[ids] = np.arange(1, len(ids) + 1)
        ctx, lab = torch.from_numpy(local[ex.context]), torch.from_numpy(local[ex.label])
        w_f, w_c, lam = 1.0, 0.0, 0.0
    else:
        table = torch.from_numpy(msg.content["arrays"][TABLE].numpy().copy())
        w_f, w_c = config_get(conf, WF_KEY, 1.0), config_get(conf, WC_KEY, 0.0)
        lam = config_get(conf, LAMBDA_KEY, 0.0)
    table = table.clone().requires_grad_(True)
    gen = set_seed(call_seed(context, msg, cfg["seed"]))
    bs, d = cfg["batch-size"], table.shape[1]
    flops = rows_touched = steps = 0
    loss_sum = 0.0
    t0 = time.perf_counter()
    while steps < cfg["local-steps"] and len(ex):
        for idx in torch.randperm(len(ex), generator=gen).split(bs):
            if steps == cfg["local-steps"]:
                break
            table.grad = None
            loss = w_f * hinge(table, ctx[idx], lab[idx])
            flops += hinge_flops(len(idx), d)
            if w_c and lam:
                loss = loss + w_c * lam * spreadout_sq(table[1:])
                flops += spreadout_flops(table.shape[0] - 1, d)
            loss.backward()
            with torch.no_grad():
                table.grad[0] = 0.0  # the padding row never moves
                touched = int((table.grad != 0).any(-1).sum())
                table -= cfg["lr"] * table.grad
            rows_touched += touched
            flops += 2 * touched * d
            steps += 1
            loss_sum += loss.item()
    out = table.detach().numpy()[1:] if offload else table.detach().numpy()
    content = reply(
        **{
            "num-examples": len(ex),
            "train-loss": loss_sum / max(steps, 1),
            "client-steps": steps,
            "client-rows": rows_touched,
            "client-flops": flops,
            "train-time-s": time.perf_counter() - t0,
        }
    )
    content[ROWS] = ArrayRecord({ROWS: Array(np.ascontiguousarray(out))})
    return Message(content=content, reply_to=msg)


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def ranks(table: torch.Tensor, context: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Rank (1 = best) of each label among all items by cosine; ties count against it."""
    scores = contexts(table, context) @ F.normalize(table[1:], dim=-1).T
    true = scores.gather(1, (label - 1).unsqueeze(1))
    return (scores >= true).sum(1)


def evaluator(cfg):
    """``evaluate(arrays)``: recall@10 and mean rank on the held-out items, ``f_f`` (mean hinge
    over every training example of the run's users), ``f_c`` and ``w_f f_f + w_c f_c``."""
    users = load_users(cfg["offload-users"])
    test = torch.from_numpy(users.test.context), torch.from_numpy(users.test.label)
    ctx = torch.from_numpy(np.concatenate([e.context for e in users.train.values()]))
    lab = torch.from_numpy(np.concatenate([e.label for e in users.train.values()]))

    def run(arrays: ArrayRecord) -> dict[str, float]:
        t = torch.from_numpy(arrays[TABLE].numpy().astype(np.float64))
        r = ranks(t, *test).double()
        with torch.no_grad():
            f_f = float(hinge(t, ctx, lab))
            f_c = float(cfg["spreadout-lambda"] * spreadout_sq(t[1:]))
        return {
            "recall@10": float((r <= 10).double().mean()),
            "mean-rank": float(r.mean()),
            "f_f": f_f,
            "f_c": f_c,
            "objective": cfg["w-f"] * f_f + cfg["w-c"] * f_c,
        }

    return run
