"""MovieLens next-item timelines for federated retrieval (users as clients).

The pipeline is the one of the authors' code (Ning et al., arXiv:2108.07931, ``dual_encoder/``
in google-research/federated), read for ``../shared/papers/fed-retrieval.md``:

1. every rating is an implicit positive; each user's items are sorted by timestamp;
2. users with fewer than ``min_timeline_length`` (3) items are dropped;
3. each position ``j >= 1`` of a timeline gives one example: context = the previous
   ``max_context_length`` (10) items, left-aligned and padded with id 0, label = item ``j``;
   at most ``max_examples_per_user`` (300) examples per user (the first ones in time);
4. users are split 0.8 / 0.1 / 0.1 into train / validation / test clients by a seeded
   permutation of the user ids, so evaluation is on users never trained on;
5. the IID control shuffles the train examples across train users, keeping each user's count.

Sources: MovieLens-100K from the ``recbole==1.2.1`` wheel (found with
``importlib.util.find_spec``, recbole is never imported; offline; the loader is
:mod:`flowerbed.common.movielens`) and MovieLens-1M, the paper's
set, from GroupLens (:func:`load_ml1m`, needs the network; not run here).
"""

from __future__ import annotations

import io
import urllib.request
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from flowerbed.common.data import DataError, cache_dir
from flowerbed.common.movielens import (  # moved there; re-exported here
    Ratings,
    load_ml100k,
    ml100k_dir,  # noqa: F401
    user_timelines,
)
from flowerbed.common.seeding import derive_seed

MAX_CONTEXT = 10
MIN_TIMELINE = 3
MAX_EXAMPLES_PER_USER = 300
ML1M_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"


@dataclass(frozen=True)
class Examples:
    """Examples of a set of users: ``context`` (n, 10) int64, ``label`` (n,), ``user`` (n,)."""

    context: np.ndarray
    label: np.ndarray
    user: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def users(self) -> np.ndarray:
        """The users, in order of first appearance."""
        _, first = np.unique(self.user, return_index=True)
        return self.user[np.sort(first)]

    def of_user(self, u: int) -> Examples:
        m = self.user == u
        return Examples(self.context[m], self.label[m], self.user[m])


@dataclass(frozen=True)
class Split:
    """Train / validation / test examples (disjoint users) and the item vocabulary size."""

    train: Examples
    val: Examples
    test: Examples
    num_items: int


def load_ml1m(data_dir: str | None = None, download: bool = True) -> Ratings:  # pragma: no cover
    """MovieLens-1M (6,040 users, 3,952 movies): ``ratings.dat`` (``UserID::MovieID::Rating::
    Timestamp``) from ``data_dir`` or GroupLens (downloaded once into the flowerbed cache).
    Needs the network the first time; not run on these machines."""
    root = Path(data_dir) if data_dir else cache_dir() / "ml-1m"
    path = root / "ratings.dat"
    if not path.exists():
        if not download:
            raise DataError(f"MovieLens-1M: {path} not found (and download=False)")
        with urllib.request.urlopen(ML1M_URL, timeout=60) as r:
            zipfile.ZipFile(io.BytesIO(r.read())).extractall(root.parent)
    raw = np.loadtxt(path, delimiter="::", dtype=np.int64, usecols=(0, 1, 3))
    return Ratings(raw[:, 0], raw[:, 1], raw[:, 2], 3952)


SOURCES = {"ml-100k": load_ml100k, "ml-1m": load_ml1m}


def timelines(
    ratings: Ratings,
    users: np.ndarray | None = None,
    max_context: int = MAX_CONTEXT,
    min_length: int = MIN_TIMELINE,
    max_examples: int = MAX_EXAMPLES_PER_USER,
) -> Examples:
    """The examples of ``users`` (all users if None), user by user in the given order.

    Each timeline is sorted by time (ties by item id, so the order does not depend on the file);
    position ``j >= 1`` gives context ``items[max(0, j - max_context):j]`` padded with 0 on the
    right to ``max_context`` and label ``items[j]``; users with fewer than ``min_length`` items
    give nothing; at most ``max_examples`` examples (the first ``max_examples`` positions).
    """
    per_user = user_timelines(ratings)
    ctx, lab, who = [], [], []
    for user in per_user if users is None else users:
        items = per_user.get(int(user), np.empty(0, np.int64))
        if len(items) < min_length:
            continue
        n = min(len(items) - 1, max_examples)
        c = np.zeros((n, max_context), dtype=np.int64)
        for j in range(1, n + 1):
            prev = items[max(0, j - max_context) : j]
            c[j - 1, : len(prev)] = prev
        ctx.append(c)
        lab.append(items[1 : n + 1])
        who.append(np.full(n, int(user), dtype=np.int64))
    if not ctx:
        return Examples(
            np.zeros((0, max_context), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        )
    return Examples(np.concatenate(ctx), np.concatenate(lab), np.concatenate(who))


def split_users(
    users: np.ndarray, seed: int, fractions: tuple[float, float] = (0.8, 0.1)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / validation / test users: a permutation of the sorted ids seeded by ``seed``,
    cut at ``fractions`` (train, validation; the rest is test)."""
    rng = np.random.default_rng(derive_seed(seed, 0x05E5))
    perm = rng.permutation(np.unique(users))
    a = int(round(fractions[0] * len(perm)))
    b = a + int(round(fractions[1] * len(perm)))
    return perm[:a], perm[a:b], perm[b:]


def shuffle_across_users(ex: Examples, seed: int) -> Examples:
    """The IID control: the examples permuted across users, each user keeping its count (the
    ``user`` column is unchanged, the (context, label) pairs move)."""
    perm = np.random.default_rng(derive_seed(seed, 0x11D)).permutation(len(ex))
    return Examples(ex.context[perm], ex.label[perm], ex.user)


@lru_cache(maxsize=4)
def load_split(
    source: str,
    seed: int,
    iid: bool = False,
    max_users: int = 0,
    data_dir: str = "",
    max_examples: int = MAX_EXAMPLES_PER_USER,
) -> Split:
    """The split of ``source`` for ``seed`` (cached per process).

    ``iid``: train examples shuffled across train users (:func:`shuffle_across_users`).
    ``max_users`` > 0 keeps only the first ``max_users`` ids (tiny configs in tests).
    """
    if source not in SOURCES:
        raise DataError(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
    r = SOURCES[source](data_dir or None)
    if max_users:
        keep = r.user <= np.unique(r.user)[:max_users][-1]
        r = Ratings(r.user[keep], r.item[keep], r.time[keep], r.num_items)
    tr, va, te = split_users(r.user, seed)
    train = timelines(r, tr, max_examples=max_examples)
    if iid:
        train = shuffle_across_users(train, seed)
    val, test = (timelines(r, u, max_examples=max_examples) for u in (va, te))
    return Split(train, val, test, r.num_items)
