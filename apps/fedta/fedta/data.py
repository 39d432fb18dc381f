"""Data layout of the FedTA app on Fashion-MNIST: disjoint slices and class-incremental streams.

The Fashion-MNIST train split (60,000 images) is shuffled once with flowerbed's FIXED split
seed :data:`flowerbed.common.data.SPLIT_SEED` (independent of the run seed, so every run and seed shares one backbone
checkpoint and the slices never overlap) and cut, by index, into

1. ``pretrain``: the first ``pretrain-size`` shuffled images: the backbone's pre-training data;
2. ``surrogate``: the next images, ``surrogate-per-class`` of each class: the server's SIKF set;
3. ``pool``: everything after: the clients' data.

Clients (Reconstruction of the paper's private/public layout for 10 classes): the pool is split by
the run config's ``partitioner`` (:func:`flowerbed.common.partition.partition_indices`); the
default, ``per-class-dirichlet`` (:class:`PerClassDirichletPartitioner`, registered here), splits
the first ``samples-per-class`` pool images of every class among the clients in
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
from flwr_datasets.partitioner import Partitioner

from flowerbed.common.data import SPLIT_SEED, DataError, load_dataset
from flowerbed.common.partition import partition_indices, register_partitioner
from flowerbed.common.seeding import derive_seed

DATASET = "fashion_mnist"
PARTITIONER = "per-class-dirichlet"


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


class PerClassDirichletPartitioner(Partitioner):
    """Per class, the first ``samples_per_class`` rows of that class split over the partitions
    in Dirichlet(``alpha``) proportions, at least ``min_samples`` each (:func:`dirichlet_counts`,
    one generator per class seeded by ``(seed, class)``); rows beyond that are left out.

    Parameters
    ----------
    num_partitions : int
        Number of partitions (clients).
    alpha : float
        Dirichlet concentration.
    samples_per_class : int
        Rows of each class handed out.
    min_samples : int
        Minimum rows of each class per partition.
    seed : int
        Run seed.
    partition_by : str, default "label"
        Column with the class labels.
    """

    def __init__(
        self,
        num_partitions: int,
        alpha: float,
        samples_per_class: int,
        min_samples: int,
        seed: int,
        partition_by: str = "label",
    ) -> None:
        super().__init__()
        self._num_partitions = num_partitions
        self.alpha = alpha
        self.samples_per_class = samples_per_class
        self.min_samples = min_samples
        self.seed = seed
        self.partition_by = partition_by
        self._rows: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def _split(self) -> list[np.ndarray]:
        labels = np.asarray(self.dataset[self.partition_by])
        out: list[list[np.ndarray]] = [[] for _ in range(self._num_partitions)]
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            if len(rows) < self.samples_per_class:
                raise DataError(
                    f"samples-per-class={self.samples_per_class}: class {c} has only "
                    f"{len(rows)} client images"
                )
            rng = np.random.default_rng(derive_seed(self.seed, int(c), 0xD1C))
            counts = dirichlet_counts(
                self.samples_per_class, self._num_partitions, self.alpha, self.min_samples, rng
            )
            bounds = np.concatenate([[0], np.cumsum(counts)])
            for i in range(self._num_partitions):
                out[i].append(rows[bounds[i] : bounds[i + 1]])
        return [np.sort(np.concatenate(p)) for p in out]

    def load_partition(self, partition_id: int):
        """The rows of partition ``partition_id``."""
        if self._rows is None:
            self._rows = self._split()
        return self.dataset.select(self._rows[partition_id])


@register_partitioner(PARTITIONER)
def _per_class_dirichlet(num_partitions: int, seed: int, **kw) -> PerClassDirichletPartitioner:
    return PerClassDirichletPartitioner(
        num_partitions,
        alpha=float(kw.get("alpha", 0.5)),
        samples_per_class=int(kw.get("samples_per_class", 300)),
        min_samples=int(kw.get("min_samples", 10)),
        seed=seed,
    )


@lru_cache(maxsize=4)
def client_indices(
    data_dir: str,
    pretrain_size: int,
    surrogate_per_class: int,
    num_clients: int,
    partitioner: str,
    seed: int,
    **options,
) -> tuple[dict[int, np.ndarray], ...]:
    """Per client, ``{class: train indices}``: the pool split by the registered ``partitioner``
    (disjoint between clients; ``options`` go to its factory)."""
    b = bundle(data_dir)
    y = np.asarray(b.y_train)
    pool = slices(data_dir, pretrain_size, surrogate_per_class)["pool"]
    parts = partition_indices(y[pool], num_clients, partitioner, seed=seed, **options)
    out = []
    for rows in parts:
        idx = pool[rows]
        out.append({c: np.sort(idx[y[idx] == c]) for c in range(b.num_classes)})
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


def surrogate(cfg) -> torch.Tensor:
    """The server's SIKF surrogate images (the ``surrogate`` slice)."""
    s = slices(cfg["data-dir"], cfg["pretrain-size"], cfg["surrogate-per-class"])
    return tensors_at(cfg["data-dir"], s["surrogate"])[0]
