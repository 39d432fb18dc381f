"""Data layout of the FedTA app on Fashion-MNIST: disjoint slices and class-incremental streams.

The Fashion-MNIST train split (60,000 images) is shuffled once with the FIXED seed
:data:`SPLIT_SEED` (independent of the run seed, so every run and seed shares one backbone
checkpoint and the slices never overlap) and cut, by index, into

1. ``pretrain``: the first ``pretrain-size`` shuffled images: the backbone's pre-training data;
2. ``surrogate``: the next images, ``surrogate-per-class`` of each class: the server's SIKF set;
3. ``pool``: everything after: the clients' data.

Clients (Reconstruction of the paper's private/public layout for 10 classes): for every class,
the first ``samples-per-class`` pool images of that class are split among the clients in
Dirichlet(``alpha``) proportions (at least ``min-samples`` each, run seed), so every client holds
every class, in skewed amounts (spatial heterogeneity). Each client draws its own random order of
the classes (``task-order = "random"``; "same" gives every client the order 0..9) and learns them
as ``num-tasks`` tasks of ``classes-per-task`` classes (temporal heterogeneity; clients train
different classes at the same time). Local test sets come from the official test split: the first
``test-per-class`` test images of each class (after a fixed shuffle), restricted to the classes
the client has seen.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from flowerbed.common.data import DataError, load_dataset
from flowerbed.common.seeding import derive_seed

SPLIT_SEED = 0xFED7A  # fixed: the pre-training / surrogate / client slices never move
DATASET = "fashion_mnist"


def bundle(data_dir: str = ""):
    return load_dataset(DATASET, data_dir or None, mmap=True)


@lru_cache(maxsize=4)
def slices(data_dir: str, pretrain_size: int, surrogate_per_class: int) -> dict[str, np.ndarray]:
    """Disjoint index arrays into the train split: ``pretrain``, ``surrogate``, ``pool``."""
    b = bundle(data_dir)
    y = np.asarray(b.y_train)
    n = len(y)
    if pretrain_size + surrogate_per_class * b.num_classes >= n:
        raise DataError(
            f"pretrain-size={pretrain_size} plus the surrogate set leave no client data "
            f"({n} train images)"
        )
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    pretrain = perm[:pretrain_size]
    rest = perm[pretrain_size:]
    sur = np.concatenate(
        [rest[y[rest] == c][:surrogate_per_class] for c in range(b.num_classes)]
    ).astype(np.int64)
    pool = np.setdiff1d(rest, sur, assume_unique=True)
    pool = rest[np.isin(rest, pool)]  # keep the shuffled order
    return {"pretrain": np.sort(pretrain), "surrogate": np.sort(sur), "pool": pool}


def dirichlet_counts(
    total: int, num_clients: int, alpha: float, min_samples: int, rng: np.random.Generator
) -> np.ndarray:
    """Split ``total`` samples over clients: ``min_samples`` each plus Dirichlet shares."""
    spare = total - num_clients * min_samples
    if spare < 0:
        raise DataError(
            f"samples-per-class={total} cannot give {num_clients} clients min-samples="
            f"{min_samples} each"
        )
    p = rng.dirichlet(np.full(num_clients, alpha))
    counts = np.floor(p * spare).astype(int)
    counts[np.argmax(p)] += spare - counts.sum()
    return counts + min_samples


@lru_cache(maxsize=4)
def client_indices(
    data_dir: str,
    pretrain_size: int,
    surrogate_per_class: int,
    num_clients: int,
    samples_per_class: int,
    min_samples: int,
    alpha: float,
    seed: int,
) -> tuple[dict[int, np.ndarray], ...]:
    """Per client, ``{class: train indices}`` from the pool (disjoint between clients)."""
    b = bundle(data_dir)
    y = np.asarray(b.y_train)
    pool = slices(data_dir, pretrain_size, surrogate_per_class)["pool"]
    out: list[dict[int, np.ndarray]] = [{} for _ in range(num_clients)]
    for c in range(b.num_classes):
        idx = pool[y[pool] == c]
        if len(idx) < samples_per_class:
            raise DataError(
                f"samples-per-class={samples_per_class}: class {c} has only {len(idx)} "
                "client images"
            )
        rng = np.random.default_rng(derive_seed(seed, c, 0xD1C))
        counts = dirichlet_counts(samples_per_class, num_clients, alpha, min_samples, rng)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for i in range(num_clients):
            out[i][c] = np.sort(idx[bounds[i] : bounds[i + 1]])
    return tuple(out)


def task_stream(
    seed: int, partition_id: int, num_classes: int, num_tasks: int, per_task: int, order: str
) -> list[list[int]]:
    """The client's tasks: ``num_tasks`` lists of ``per_task`` classes."""
    if num_tasks * per_task > num_classes:
        raise DataError(
            f"num-tasks={num_tasks} x classes-per-task={per_task} exceeds {num_classes} classes"
        )
    if order == "random":
        classes = np.random.default_rng(derive_seed(seed, partition_id, 0x7A5C)).permutation(
            num_classes
        )
    else:
        classes = np.arange(num_classes)
    return [[int(c) for c in classes[t * per_task : (t + 1) * per_task]] for t in range(num_tasks)]


def train_tensors(
    data_dir: str, per_client: dict[int, np.ndarray], classes: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of ``classes`` from one client's indices."""
    b = bundle(data_dir)
    idx = np.sort(np.concatenate([per_client[c] for c in classes]))
    return torch.from_numpy(np.asarray(b.x_train[idx])), torch.from_numpy(
        np.asarray(b.y_train[idx])
    )


@lru_cache(maxsize=2)
def _test_index(data_dir: str, per_class: int) -> dict[int, np.ndarray]:
    b = bundle(data_dir)
    y = np.asarray(b.y_test)
    perm = np.random.default_rng(SPLIT_SEED + 1).permutation(len(y))
    return {c: np.sort(perm[y[perm] == c][:per_class]) for c in range(b.num_classes)}


def test_tensors(
    data_dir: str, per_class: int, classes: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The local test set of ``classes`` (from the official test split)."""
    b = bundle(data_dir)
    index = _test_index(data_dir, per_class)
    idx = np.sort(np.concatenate([index[c] for c in classes]))
    return torch.from_numpy(np.asarray(b.x_test[idx])), torch.from_numpy(np.asarray(b.y_test[idx]))


def tensors_at(data_dir: str, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Train-split images and labels at ``idx`` (pre-training and surrogate slices)."""
    b = bundle(data_dir)
    idx = np.sort(idx)
    return torch.from_numpy(np.asarray(b.x_train[idx])), torch.from_numpy(
        np.asarray(b.y_train[idx])
    )
