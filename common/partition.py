"""Partitioning of local arrays with flwr-datasets' partitioners, behind an open registry.

The partitioners operate on a tiny Hugging Face ``Dataset`` holding only the labels (column
``label``) and the row index (column ``idx``), so the arrays themselves are never copied: a
partition is an index array into the :class:`~flowerbed.common.data.DataBundle`'s train split.

Any :class:`flwr_datasets.partitioner.Partitioner` subclass can be registered under a name with
:func:`register_partitioner` (an app registers its own, e.g. FedDistr's disentangled splits); the
run-config key ``partitioner`` takes any registered name. Built in:

``iid``            :class:`flwr_datasets.partitioner.IidPartitioner`
``dirichlet``      :class:`flwr_datasets.partitioner.DirichletPartitioner` (``alpha``)
``pathological``   :class:`flwr_datasets.partitioner.PathologicalPartitioner`
                   (``classes_per_partition``)
``shard``          :class:`flwr_datasets.partitioner.ShardPartitioner` (``shards_per_partition``)
``label-dirichlet`` :class:`flowerbed.common.label_dirichlet.LabelDirichletPartitioner`: equal-size clients, each with its own
                   label mix drawn from Dir(``alpha`` x class prior) (Yuan et al., ICLR 2022,
                   the authors' label-based synthesis), on
                   :class:`flwr_datasets.partitioner.InnerDirichletPartitioner`
``semantic``       :class:`flowerbed.common.semantic.SemanticPartitioner` (Yuan et al., ICLR
                   2022: per-label Gaussian mixtures on embeddings, matched across labels);
                   it reads the data itself, so callers pass :func:`data_options`
``semantic-cnn``   the same with a small CNN embedder instead of the MLP
``semantic-pixels`` the same on PCA of the raw pixels (no embedding network)

Apps whose clients generate or read their own data from (seed, partition id) (no array data set
behind the partitions) register :func:`generated_partitioner` under their name: it carries only
the number of partitions, and the app says what partition id ``k`` holds.

A factory gets ``(num_partitions, seed, **options)`` (every option the caller passed: ``alpha``,
``classes_per_partition``, an app's own) and returns a partitioner; it ignores the options it
does not use.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from flowerbed.common.data import DataError, cache_dir

PartitionerFactory = Callable[..., "object"]
_REGISTRY: dict[str, PartitionerFactory] = {}


def register_partitioner(name: str, factory: PartitionerFactory | None = None):
    """Register ``factory(num_partitions, seed, **options) -> Partitioner`` under ``name``.

    Usable as a decorator (``@register_partitioner("disentangled")``) or a call. Registering
    the same name again with another factory is an error (two apps must not disagree on a name).
    """

    def add(f: PartitionerFactory) -> PartitionerFactory:
        if name in _REGISTRY and _REGISTRY[name] is not f:  # the same factory again is fine
            old = _REGISTRY[name]
            if (old.__module__, old.__qualname__) != (f.__module__, f.__qualname__):
                raise ValueError(f"partitioner {name!r} is already registered by {old.__module__}")
        _REGISTRY[name] = f
        return f

    return add if factory is None else add(factory)


class GeneratedPartitioner:
    """The partitioner of an app whose clients make their own data from (seed, partition id).

    No data set behind it and no randomness: it only carries ``num_partitions`` so that the
    run config's ``partitioner`` key and the participation layer work as for the array apps;
    the app maps a partition id to its share (e.g. domain ``k % 3``).
    """

    def __init__(self, num_partitions: int) -> None:
        self.num_partitions = int(num_partitions)


def generated_partitioner(num_partitions: int, seed: int, **_) -> GeneratedPartitioner:
    """Factory of :class:`GeneratedPartitioner` (register it under the app's own name)."""
    return GeneratedPartitioner(num_partitions)


def partitioner_factory(name: str) -> PartitionerFactory:
    """The factory registered under ``name`` (to register it under another name as well)."""
    if name not in _REGISTRY:
        raise DataError(f"unknown partitioner {name!r}; known: {', '.join(partitioners())}")
    return _REGISTRY[name]


def partitioners() -> tuple[str, ...]:
    """The registered partitioner names."""
    return tuple(sorted(_REGISTRY))


@register_partitioner("iid")
def _iid(num_partitions: int, seed: int, **_):
    from flwr_datasets.partitioner import IidPartitioner

    return IidPartitioner(num_partitions=num_partitions)


@register_partitioner("dirichlet")
def _dirichlet(num_partitions: int, seed: int, **kw):
    from flwr_datasets.partitioner import DirichletPartitioner

    return DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=float(kw.get("alpha", 0.5)),
        min_partition_size=int(kw.get("min_partition_size", 10)),
        self_balancing=bool(kw.get("self_balancing", False)),
        seed=seed,
    )


@register_partitioner("pathological")
def _pathological(num_partitions: int, seed: int, **kw):
    from flwr_datasets.partitioner import PathologicalPartitioner

    return PathologicalPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        num_classes_per_partition=int(kw.get("classes_per_partition", 2)),
        seed=seed,
    )


@register_partitioner("shard")
def _shard(num_partitions: int, seed: int, **kw):
    from flwr_datasets.partitioner import ShardPartitioner

    return ShardPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        num_shards_per_partition=int(kw.get("shards_per_partition", 2)),
        seed=seed,
    )


@register_partitioner("label-dirichlet")
def _label_dirichlet(num_partitions: int, seed: int, **kw):
    from flowerbed.common.label_dirichlet import LabelDirichletPartitioner

    return LabelDirichletPartitioner(num_partitions, alpha=float(kw.get("alpha", 0.5)), seed=seed)


#: partitioners that need the dataset itself (its features), not only the labels
DATA_AWARE: set[str] = {"semantic", "semantic-cnn", "semantic-pixels"}


def data_options(scheme: str, dataset: str, data_dir: str | None = "") -> dict:
    """The options a data-aware partitioner needs (``dataset``, ``data_dir``); ``{}`` for the
    others, so their cache keys do not change. Pass them to :func:`partition_indices`."""
    if scheme not in DATA_AWARE:
        return {}
    return {"dataset": dataset, "data_dir": data_dir or ""}


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str = "iid",
    seed: int = 42,
    **kwargs,
) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into ``num_partitions`` index arrays.

    Parameters
    ----------
    labels : np.ndarray
        Integer labels, shape ``(n,)``.
    num_partitions : int
        Number of partitions (clients); must be in ``[1, n]``.
    scheme : str, default "iid"
        A registered partitioner name (:func:`partitioners`).
    seed : int, default 42
        Seed of the partitioner (the partition is a function of the seed only).
    **kwargs
        Options passed to the partitioner's factory: ``alpha`` (0.5), ``min_partition_size``
        (10), ``self_balancing`` (False), ``classes_per_partition`` (2), ``shards_per_partition``
        (2), or a registered partitioner's own.

    Raises
    ------
    DataError
        If the request cannot be met (more partitions than samples, an unknown scheme, a
        Dirichlet draw that cannot give every partition ``min_partition_size`` samples).
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not isinstance(num_partitions, int | np.integer) or num_partitions < 1:
        raise DataError(f"num_partitions must be a positive integer, got {num_partitions!r}")
    if num_partitions > n:
        raise DataError(f"num_partitions={num_partitions} is larger than the data ({n} samples)")
    if scheme not in _REGISTRY:
        raise DataError(f"unknown partitioner {scheme!r}; known: {', '.join(partitioners())}")
    min_size = int(kwargs.get("min_partition_size", 10)) if scheme == "dirichlet" else 1
    if num_partitions * min_size > n:
        raise DataError(
            f"partition scheme {scheme!r} cannot be met: {num_partitions} partitions x "
            f"min_partition_size={min_size} > {n} samples"
        )
    desc = f"{num_partitions}|{scheme}|{seed}|{sorted(kwargs.items())}"
    key = hashlib.sha1(np.ascontiguousarray(labels).tobytes() + desc.encode()).hexdigest()[:16]
    if key not in _MEMO:
        _MEMO.clear()  # one partitioning per process is kept in memory
        _MEMO[key] = _load_or_compute(key, labels, num_partitions, scheme, seed, kwargs)
    return [a.copy() for a in _MEMO[key]]


_MEMO: dict[str, list[np.ndarray]] = {}


def _load_or_compute(key, labels, num_partitions, scheme, seed, kwargs) -> list[np.ndarray]:
    """Partitions from the disk cache (computed once, shared by all processes of a run)."""
    path = cache_dir() / "partitions" / f"{key}.npz"
    if path.exists():
        with np.load(path) as z:
            return [z[f"p{i}"] for i in range(num_partitions)]
    parts = _compute(labels, num_partitions, scheme, seed, kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **{f"p{i}": p for i, p in enumerate(parts)})
    os.replace(tmp, path)
    return parts


def _compute(labels, num_partitions, scheme, seed, kwargs) -> list[np.ndarray]:
    from datasets import Dataset

    ds = Dataset.from_dict({"label": labels.astype(np.int64), "idx": np.arange(len(labels))})
    part = _REGISTRY[scheme](num_partitions, seed, **kwargs)
    part.dataset = ds
    out = []
    try:
        for pid in range(num_partitions):
            out.append(np.asarray(part.load_partition(pid)["idx"], dtype=np.int64))
    except ValueError as e:  # flwr-datasets signals unmet constraints with ValueError
        raise DataError(
            f"partition scheme {scheme!r} with {num_partitions} partitions cannot be met "
            f"on {len(labels)} samples ({kwargs or 'defaults'}): {e}"
        ) from e
    if any(len(p) == 0 for p in out):
        empty = [i for i, p in enumerate(out) if len(p) == 0]
        raise DataError(
            f"partition scheme {scheme!r} left partitions {empty} empty "
            f"({num_partitions} partitions of {len(labels)} samples)"
        )
    return out


def label_histograms(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-partition label counts, shape ``(num_partitions, num_classes)``."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def save_histograms(path: str | Path, hist: np.ndarray) -> None:
    """Write the label histograms as JSON (one row per partition)."""
    Path(path).write_text(json.dumps({"label_histograms": hist.tolist()}))


def _semantic(num_partitions: int, seed: int, **kw):
    from flowerbed.common.semantic import semantic_factory

    return semantic_factory(num_partitions, seed, **kw)


def _semantic_cnn(num_partitions: int, seed: int, **kw):
    from flowerbed.common.semantic import semantic_factory

    return semantic_factory(num_partitions, seed, embedder="cnn", **kw)


register_partitioner("semantic", _semantic)
register_partitioner("semantic-cnn", _semantic_cnn)


def _semantic_pixels(num_partitions: int, seed: int, **kw):
    from flowerbed.common.semantic import semantic_factory

    return semantic_factory(num_partitions, seed, embedder="pixels", **kw)


register_partitioner("semantic-pixels", _semantic_pixels)
