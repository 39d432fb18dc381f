"""The label-based client synthesis of Yuan et al. (ICLR 2022): equal-size clients, each with
its own label mix (partitioner ``label-dirichlet``).

Yuan, Morningstar, Ning, Singhal, "What Do We Mean by Generalization in Federated Learning?",
ICLR 2022; the authors' code (google-research/federated, ``generalization/synthesization/
dirichlet.py``, after Hsu et al. 2019, arXiv:1909.06335). Kept out of
:mod:`flowerbed.common.partition` so that importing the registry does not import
flwr-datasets.
"""

from __future__ import annotations

import numpy as np
from flwr_datasets.partitioner import InnerDirichletPartitioner, Partitioner


class LabelDirichletPartitioner(Partitioner):
    """Equal-size clients with per-client label mixes ``Dir(alpha * prior)``.

    The label-based synthesis of Yuan et al., "What Do We Mean by Generalization in Federated
    Learning?" (ICLR 2022; the authors' ``synthesize_by_dirichlet_over_labels``, after Hsu et
    al. 2019): every client gets ``n // C`` examples (here the ``n % C`` left over go one each
    to the first clients, so no example is dropped) and draws its labels from its own
    multinomial ``~ Dir(alpha * prior)``, ``prior`` the labels' relative frequencies; an
    exhausted label is removed from every client's multinomial. ``alpha`` is the *total*
    concentration (the authors' ``concentration_factor``): ``alpha -> 0`` gives one-label
    clients, ``alpha -> inf`` the prior on every client. Unlike Flower's
    :class:`~flwr_datasets.partitioner.DirichletPartitioner` (per-label shares over clients,
    unequal client sizes), the client sizes are equal.

    The drawing is Flower's :class:`~flwr_datasets.partitioner.InnerDirichletPartitioner`
    (sample by sample: a random client that is not full, a label from its multinomial), built
    on the first request with the sizes and the concentration vector of the dataset it is given.

    Parameters
    ----------
    num_partitions : int
        Number of clients ``C``.
    alpha : float
        Total concentration ``> 0`` (per-label concentration ``alpha * prior``).
    partition_by : str, default "label"
        The label column; its values must be ``0 .. K-1``.
    seed : int, default 42
        Seeds the multinomials and the drawing.

    Notes
    -----
    At small ``alpha`` (e.g. 0.1: 0.01 per label) a drawn multinomial is exactly 0 (float
    underflow) on every label but one; once that label is exhausted the client's renormalized
    multinomial is 0/0, and both the authors' code and ``InnerDirichletPartitioner`` stop
    (NaN probabilities). Here every drawn probability is floored at :data:`FLOOR` before
    normalizing, so such a client continues with the labels left (about uniformly over them);
    a label of probability ``<= FLOOR`` is otherwise never drawn in practice.
    """

    def __init__(
        self, num_partitions: int, alpha: float, partition_by: str = "label", seed: int = 42
    ) -> None:
        super().__init__()
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self._num_partitions = int(num_partitions)
        self.alpha, self.partition_by, self.seed = float(alpha), partition_by, seed
        self._inner = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def sizes_and_concentration(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Client sizes (``n // C``, the first ``n % C`` one more) and ``alpha * prior``."""
        classes, counts = np.unique(labels, return_counts=True)
        if not np.array_equal(classes, np.arange(len(classes))):
            raise ValueError(f"labels must be 0..K-1 with every label present, got {classes}")
        n, c = len(labels), self._num_partitions
        sizes = np.full(c, n // c, dtype=np.int64)
        sizes[: n % c] += 1
        return sizes, self.alpha * counts / n

    def load_partition(self, partition_id: int):
        if not 0 <= partition_id < self._num_partitions:
            raise ValueError(f"partition_id {partition_id} not in [0, {self._num_partitions})")
        if self._inner is None:
            sizes, conc = self.sizes_and_concentration(np.asarray(self.dataset[self.partition_by]))
            inner = InnerDirichletPartitioner(
                partition_sizes=sizes,
                partition_by=self.partition_by,
                alpha=conc,
                shuffle=True,
                seed=self.seed,
            )
            inner._rng = _FlooredDirichlet(inner._rng)  # see _FlooredDirichlet
            inner.dataset = self.dataset
            self._inner = inner
        return self._inner.load_partition(partition_id)


#: lower bound of a drawn label probability (see :class:`LabelDirichletPartitioner`)
FLOOR = 1e-12


class _FlooredDirichlet:
    """A ``numpy.random.Generator`` whose ``dirichlet`` draws are floored at :data:`FLOOR` and
    renormalized; every other call goes to the wrapped generator (same stream)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng

    def dirichlet(self, alpha, size=None):
        p = np.maximum(self._rng.dirichlet(alpha, size), FLOOR)
        return p / p.sum(axis=-1, keepdims=True)

    def __getattr__(self, name):
        return getattr(self._rng, name)
