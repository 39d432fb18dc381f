"""Semantic client synthesis: label-balanced clients with coherent features (partitioner
``semantic``).

Yuan et al., "What Do We Mean by Generalization in Federated Learning?", ICLR 2022, Appendix D,
and the authors' code (google-research/federated, ``generalization/synthesization``):

1. embed every example with a network trained on other data (the paper: an ImageNet
   EfficientNet; here :func:`embeddings`: a small MLP, or a small CNN for ``semantic-cnn``,
   trained on the dataset's *test* split (``semantic-pixels``: PCA of the raw pixels), which the partitioned train split never sees,
   cached under ``$FLOWERBED_CACHE/semantic``);
2. for each label, fit a Gaussian mixture with one component per client (scikit-learn's
   ``GaussianMixture``, diagonal covariance, ``reg_covar = 1e-4``, seeded) and assign every
   example of the label to its most likely component;
3. match the components across labels (progressive optimal matching): a random anchor label,
   then label after label (random order) the Hungarian assignment
   (``scipy.optimize.linear_sum_assignment``) of its components to those of the previously
   matched label minimising the total KL divergence between the Gaussians;
4. client ``c`` = the union over labels of the components matched to ``c``: every client holds
   every label, and its examples of different labels are alike in feature space.

:class:`SemanticPartitioner` is a :class:`flwr_datasets.partitioner.Partitioner` (it works on any
``datasets.Dataset`` with a ``label`` column and embeddings aligned with its rows, or with an
``idx`` column into them, as :mod:`flowerbed.common.partition` builds). The registered factory
``semantic`` takes ``dataset`` and ``data_dir`` (passed by
:func:`flowerbed.common.partition.data_options`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import numpy as np
from flwr_datasets.partitioner import Partitioner

from flowerbed.common.data import DataError, cache_dir, load_dataset
from flowerbed.common.seeding import derive_seed


def kl_diag_gaussians(m0: np.ndarray, v0: np.ndarray, m1: np.ndarray, v1: np.ndarray) -> float:
    """``KL(N(m0, diag v0) || N(m1, diag v1))``."""
    return float(0.5 * np.sum(np.log(v1 / v0) + (v0 + (m0 - m1) ** 2) / v1 - 1.0))


def kl_matrix(means0, vars0, means1, vars1) -> np.ndarray:
    """``K[i, j] = KL(component i of the first mixture || component j of the second)``."""
    c0, c1 = len(means0), len(means1)
    return np.array(
        [
            [kl_diag_gaussians(means0[i], vars0[i], means1[j], vars1[j]) for j in range(c1)]
            for i in range(c0)
        ]
    )


def match_components(
    means: dict[int, np.ndarray], variances: dict[int, np.ndarray], seed: int
) -> dict[int, np.ndarray]:
    """Progressive optimal matching of per-label mixture components.

    ``means[y]``, ``variances[y]``: shape ``(C, d)`` for label ``y``. Returns ``{y: perm}``
    with ``perm[c]`` the component of label ``y`` that client ``c`` gets: the anchor label
    (first of a seeded permutation of the labels) keeps its order; each next label is matched
    to the previous one by the Hungarian algorithm on the KL divergence.
    """
    from scipy.optimize import linear_sum_assignment

    labels = sorted(means)
    order = [
        labels[i] for i in np.random.default_rng(derive_seed(seed, 0x4A7C)).permutation(len(labels))
    ]
    anchor = order[0]
    perm = {anchor: np.arange(len(means[anchor]))}
    prev = anchor
    for y in order[1:]:
        # client c holds component perm[prev][c] of the previous label
        cost = kl_matrix(
            means[prev][perm[prev]], variances[prev][perm[prev]], means[y], variances[y]
        )
        rows, cols = linear_sum_assignment(cost)
        p = np.empty(len(rows), dtype=np.int64)
        p[rows] = cols
        perm[y] = p
        prev = y
    return perm


class SemanticPartitioner(Partitioner):
    """Label-balanced, semantically coherent partitions (see the module docstring).

    Parameters
    ----------
    num_partitions : int
        Number of clients ``C`` (components per label).
    embeddings : np.ndarray or callable
        ``(n, d)`` features, or a function returning them (called once, on the first
        partition asked). Row ``i`` belongs to the dataset's row ``i``, or, when the dataset
        has an ``idx`` column, to the rows whose ``idx`` is ``i``.
    seed : int, default 42
        Seeds the mixtures (per label) and the matching order.
    partition_by : str, default "label"
        The label column.
    reg_covar : float, default 1e-4
        Added to the diagonal covariances (the authors' value).
    max_fit_rows : int, default 10000
        Rows per label used to fit a mixture (the authors' cap); all rows are assigned.
    """

    def __init__(
        self,
        num_partitions: int,
        embeddings: np.ndarray | Callable[[], np.ndarray],
        seed: int = 42,
        partition_by: str = "label",
        reg_covar: float = 1e-4,
        max_fit_rows: int = 10000,
    ) -> None:
        super().__init__()
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
        self._num_partitions = int(num_partitions)
        self._embeddings = embeddings
        self.seed, self.partition_by = seed, partition_by
        self.reg_covar, self.max_fit_rows = reg_covar, max_fit_rows
        self._parts: list[np.ndarray] | None = None
        self.matching: dict[int, np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def load_partition(self, partition_id: int):
        if not 0 <= partition_id < self._num_partitions:
            raise ValueError(f"partition_id {partition_id} not in [0, {self._num_partitions})")
        if self._parts is None:
            self._parts = self._partition()
        return self.dataset.select(self._parts[partition_id])

    def _features(self) -> np.ndarray:
        z = self._embeddings() if callable(self._embeddings) else self._embeddings
        z = np.asarray(z, dtype=np.float64)
        if "idx" in self.dataset.column_names:
            z = z[np.asarray(self.dataset["idx"])]
        if len(z) != len(self.dataset):
            raise ValueError(f"{len(z)} embeddings for {len(self.dataset)} rows")
        return z

    def _partition(self) -> list[np.ndarray]:
        from sklearn.mixture import GaussianMixture

        labels = np.asarray(self.dataset[self.partition_by])
        z = self._features()
        c = self._num_partitions
        rows, means, variances = {}, {}, {}
        for y in np.unique(labels):
            y = int(y)
            idx = np.flatnonzero(labels == y)
            if len(idx) < c:
                raise ValueError(f"label {y} has {len(idx)} examples < {c} partitions")
            rng = np.random.default_rng(derive_seed(self.seed, y, 0x6A11))
            fit = (
                idx
                if len(idx) <= self.max_fit_rows
                else rng.choice(idx, self.max_fit_rows, replace=False)
            )
            gmm = GaussianMixture(
                n_components=c,
                covariance_type="diag",
                reg_covar=self.reg_covar,
                random_state=derive_seed(self.seed, y) % 2**31,
            ).fit(z[fit])
            rows[y] = (idx, gmm.predict(z[idx]))
            means[y], variances[y] = gmm.means_, gmm.covariances_
        self.matching = match_components(means, variances, self.seed)
        parts: list[list[np.ndarray]] = [[] for _ in range(c)]
        for y, (idx, comp) in rows.items():
            for client, k in enumerate(self.matching[y]):
                parts[client].append(idx[comp == k])
        return [np.sort(np.concatenate(p)) for p in parts]


# ----------------------------------------------------------------------------- embeddings
#: the embedders :func:`embeddings` can train (``mlp`` is the default of ``semantic``)
EMBEDDERS = ("mlp", "cnn", "pixels")


def embeddings(
    dataset: str,
    data_dir: str | None = None,
    dim: int = 32,
    epochs: int = 5,
    embedder: str = "mlp",
) -> np.ndarray:
    """Features of ``dataset``'s train split, ``(n_train, dim)`` float32, cached on disk.

    A small network is trained for ``epochs`` epochs on the dataset's test split (held out
    from the train split that gets partitioned; seed fixed), its last hidden layer embeds the
    train split, and PCA (fit on the train embeddings) reduces it to ``dim`` dimensions.
    ``embedder``: ``mlp`` (``input -> 256 -> 64 -> classes``; the 64 units) or ``cnn`` (two
    3x3 conv + 2x2 max-pool blocks, 32 and 64 channels, then ``-> 128 -> classes``; the 128
    units); ``pixels``: no network, PCA of the raw inputs. Built once per (dataset, data_dir, dim, epochs, embedder) into
    ``$FLOWERBED_CACHE/semantic/`` (``python -m flowerbed.common.semantic <dataset> [cnn]``
    builds it ahead of a run), printing its progress.
    """
    if embedder not in EMBEDDERS:
        raise DataError(f"semantic embedder {embedder!r}: must be one of {', '.join(EMBEDDERS)}")
    key = f"{dataset}|{data_dir or ''}|{dim}|{epochs}|v1"  # the mlp's key, as before
    if embedder != "mlp":
        key += f"|{embedder}"
    tag = hashlib.sha1(key.encode()).hexdigest()[:10]
    path = cache_dir() / "semantic" / f"{dataset.replace('/', '_')}-{tag}.npy"
    if path.exists():
        return np.load(path)
    z = _build_embeddings(dataset, data_dir, dim, epochs, embedder)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, z)
    os.replace(tmp, path)
    return z


def _embedder_body(embedder: str, input_shape: tuple[int, ...]):
    """The embedding network without its classification head, and its output width."""
    from torch import nn

    if embedder == "mlp":
        d_in = int(np.prod(input_shape))
        body = nn.Sequential(
            nn.Flatten(), nn.Linear(d_in, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU()
        )
        return body, 64
    channels, height, width = input_shape
    flat = 64 * (height // 4) * (width // 4)
    body = nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 128),
        nn.ReLU(),
    )
    return body, 128


def _build_embeddings(
    dataset: str, data_dir: str | None, dim: int, epochs: int, embedder: str = "mlp"
) -> np.ndarray:
    import torch
    from torch import nn

    bundle = load_dataset(dataset, data_dir, mmap=True)
    if bundle.kind != "classification":
        raise DataError(f"semantic partitioner: {dataset!r} has no integer labels")
    if embedder == "pixels":  # no network: PCA of the raw inputs
        h = np.asarray(bundle.x_train, dtype=np.float32).reshape(len(bundle.x_train), -1)
        return _pca(h, dim, dataset)
    if embedder == "cnn" and len(bundle.input_shape) != 3:
        raise DataError(
            f"semantic embedder 'cnn' needs (C, H, W) images, {dataset!r} has "
            f"inputs of shape {bundle.input_shape}"
        )
    torch.manual_seed(derive_seed(0, 0x5E3A))
    body, width = _embedder_body(embedder, tuple(bundle.input_shape))
    net = nn.Sequential(body, nn.Linear(width, bundle.num_classes))
    shape = (-1,) if embedder == "mlp" else tuple(bundle.input_shape)
    x = torch.from_numpy(
        np.asarray(bundle.x_test, dtype=np.float32).reshape(len(bundle.x_test), *shape)
    )
    y = torch.from_numpy(np.asarray(bundle.y_test, dtype=np.int64))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(derive_seed(0, 0x5E3B))
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), 128):
            b = perm[i : i + 128]
            loss = nn.functional.cross_entropy(net(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss) * len(b)
        print(
            f"[semantic] {embedder} embedder epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f}",
            flush=True,
        )
    xtr = np.asarray(bundle.x_train, dtype=np.float32).reshape(len(bundle.x_train), *shape)
    with torch.no_grad():
        h = np.concatenate(
            [body(torch.from_numpy(xtr[i : i + 4096])).numpy() for i in range(0, len(xtr), 4096)]
        )
    return _pca(h, dim, dataset)


def _pca(h: np.ndarray, dim: int, dataset: str) -> np.ndarray:
    """``h`` mean-centred and reduced to ``dim`` principal components (float32)."""
    from sklearn.decomposition import PCA

    dim = min(dim, h.shape[1])
    z = PCA(n_components=dim, random_state=0).fit_transform(h - h.mean(0))
    print(f"[semantic] embedded {len(z)} examples of {dataset} into {dim} dims", flush=True)
    return z.astype(np.float32)


def semantic_factory(
    num_partitions: int, seed: int, embedder: str = "mlp", **kw
) -> SemanticPartitioner:
    """Factory of the registered partitioners ``semantic`` (``embedder="mlp"``) and
    ``semantic-cnn`` / ``semantic-pixels`` (``embedder="cnn"`` / ``"pixels"``); needs
    ``dataset``."""
    if not kw.get("dataset"):
        name = "semantic" if embedder == "mlp" else f"semantic-{embedder}"
        raise DataError(
            f"partitioner {name!r} needs the dataset: pass "
            f"**flowerbed.common.partition.data_options({name!r}, dataset, data_dir)"
        )
    dataset, data_dir = kw["dataset"], kw.get("data_dir") or None
    return SemanticPartitioner(
        num_partitions, lambda: embeddings(dataset, data_dir, embedder=embedder), seed=seed
    )


if __name__ == "__main__":  # build the embeddings ahead of a run
    import sys

    name = sys.argv[1] if len(sys.argv) > 1 else "fashion_mnist"
    print(embeddings(name, embedder=sys.argv[2] if len(sys.argv) > 2 else "mlp").shape)
