"""Mixed FL: a centralized (server-side) loss trained jointly with the federated one.

Augenstein, Hard, Ning, Singhal, Kale, Partridge and Mathews, "Mixed Federated Learning: Joint
Decentralized and Centralized Learning", arXiv:2205.13655 (2022).

The model minimises ``f(x) = w_f f_f(x) + w_c f_c(x)``: ``f_f`` the mean of the clients' losses on
their own data, ``f_c`` a loss the coordinating server computes on its datacenter data (From the
paper; the two weights ``w_f``, ``w_c`` as separate hyperparameters are a RECONSTRUCTION: the
paper's exact weighting was not available). Three algorithms, one per value of ``algorithm``:

- ``parallel`` (PARALLEL TRAINING, Algorithm 1; From the paper: "a round of FedAvg in parallel
  with steps of centralized training"). Step detail RECONSTRUCTION: the clients run FedAvg's local
  SGD on ``f_i`` and send ``Delta_i``; the server runs ``K_c`` SGD steps on ``f_c`` from ``x^t``
  (``Delta_c = z - x^t``); ``Delta = w_f mean_i Delta_i + w_c Delta_c``
  (:func:`parallel_delta`), ``x^{t+1} = x^t + eta_s Delta`` (:func:`apply_delta`).
- ``1-way`` (1-WAY GRADIENT TRANSFER, Algorithm 2; RECONSTRUCTION): the server computes
  ``g_c = grad f_c(x^t)`` on a large server batch and sends it with the model (the ArrayRecord
  ``server-grad``: one extra model-sized download, counted by the protocol layer); every local
  step of a client uses ``w_f grad f_i(y) + w_c g_c`` (:func:`client_direction`);
  ``Delta = mean_i Delta_i``.
- ``2-way`` (2-WAY GRADIENT TRANSFER; RECONSTRUCTION, low confidence): as 1-way, and each client
  also uploads ``g_i = grad f_i(x^t)`` (the ArrayRecord ``client-grad``: the gradient of its first
  local step, taken at ``x^t``, so no extra client compute); the server's ``K_c`` steps use
  ``w_c grad f_c(z) + w_f g_f`` with ``g_f`` the weighted mean of the ``g_i``
  (:func:`server_direction`), and the two sides are combined as in PARALLEL TRAINING
  (:func:`parallel_delta`: both sides now step on the whole objective).

The averaging of the clients' models (and of their gradients) is Flower's
(:class:`flowerbed.strategies.fedavg.FedAvg`, whose guards also reject malformed replies: a 2-way
reply without a well-formed ``client-grad`` is rejected with its reason and never averaged). The
server's own data and loss stay in the app: the strategy calls a :class:`ServerData`
(``gradient`` and ``steps``).

:attr:`MixedFL.history` holds per round the algorithm, the server's steps and the norms of the
federated and centralized deltas (``results.json``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from flowerbed.strategies.fedavg import FedAvg

ALGORITHMS = ("parallel", "1-way", "2-way")
#: message keys: the server's gradient (down), a client's gradient at x^t (up), the config keys
SERVER_GRAD = "server-grad"
CLIENT_GRAD = "client-grad"
ALGORITHM_KEY = "mixed-algorithm"
WF_KEY, WC_KEY = "w-f", "w-c"
UPLOAD_KEY = "upload-grad"  # train config: the client adds ``client-grad`` to its reply (2-way)

Direction = Callable[[Mapping[str, Any]], Mapping[str, Any]]


class MixedFLError(ValueError):
    """A Mixed FL setting that cannot run (unknown algorithm, negative weight, no server data)."""


# ---------------------------------------------------------------------------- the combinations
def parallel_delta(
    client_delta: Mapping[str, Any], server_delta: Mapping[str, Any], w_f: float, w_c: float
) -> dict[str, Any]:
    """PARALLEL TRAINING's (and 2-WAY's) combined update ``w_f Delta_f + w_c Delta_c``.

    Parameters
    ----------
    client_delta : mapping of str to array
        ``Delta_f = mean_i Delta_i``, the clients' averaged model change.
    server_delta : mapping of str to array
        ``Delta_c = z - x^t``, the change of the server's ``K_c`` central steps.
    w_f, w_c : float
        Weights of the federated and the centralized loss.

    Returns
    -------
    dict of str to array
        ``Delta`` per key (numpy arrays or torch tensors, as given).
    """
    _same_keys(client_delta, server_delta)
    return {k: w_f * client_delta[k] + w_c * server_delta[k] for k in client_delta}


def client_direction(
    local_grad: Mapping[str, Any], server_grad: Mapping[str, Any], w_f: float, w_c: float
) -> dict[str, Any]:
    """A client's step direction in 1-WAY and 2-WAY: ``w_f grad f_i(y) + w_c g_c``.

    ``g_c`` is the server's gradient at ``x^t`` (fixed during the round: it is stale by up to
    ``K - 1`` local steps, as in the paper's description of Algorithm 2).
    """
    _same_keys(local_grad, server_grad)
    return {k: w_f * local_grad[k] + w_c * server_grad[k] for k in local_grad}


def server_direction(
    central_grad: Mapping[str, Any], federated_grad: Mapping[str, Any], w_f: float, w_c: float
) -> dict[str, Any]:
    """The server's step direction in 2-WAY: ``w_c grad f_c(z) + w_f g_f`` (``g_f``: the clients'
    weighted mean gradient at ``x^t``, RECONSTRUCTION)."""
    _same_keys(central_grad, federated_grad)
    return {k: w_c * central_grad[k] + w_f * federated_grad[k] for k in central_grad}


def apply_delta(x: Mapping[str, Any], delta: Mapping[str, Any], server_lr: float) -> dict:
    """The server optimiser (SGD): ``x^{t+1} = x^t + eta_s Delta``."""
    _same_keys(x, delta)
    return {k: x[k] + server_lr * delta[k] for k in x}


def _same_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    if set(a) != set(b):
        raise MixedFLError(f"keys differ: {sorted(set(a) ^ set(b))[:3]}")


# ---------------------------------------------------------------------------- the server side
class ServerData(Protocol):
    """The server's data loader and loss ``f_c`` (the app provides it).

    ``gradient(round, arrays)`` is ``grad f_c`` at ``arrays`` on a large server batch, one array
    per trainable parameter. ``steps(round, arrays, direction)`` runs the server's ``K_c`` SGD
    steps from ``arrays``, each with the step direction ``direction(grad f_c(z))``, and returns
    the new model (all of its arrays).
    """

    def gradient(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord: ...

    def steps(
        self, server_round: int, arrays: ArrayRecord, direction: Direction
    ) -> ArrayRecord: ...


def _np(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _record(arrays: Mapping[str, np.ndarray], like: ArrayRecord) -> ArrayRecord:
    """``arrays`` as an ArrayRecord with the dtypes of ``like`` (same key order)."""
    return ArrayRecord(
        {k: Array(np.asarray(arrays[k]).astype(like[k].numpy().dtype)) for k in like.keys()}
    )


def _norm(arrays: Mapping[str, np.ndarray]) -> float:
    return float(
        np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays.values()))
    )


class MixedFL(FedAvg):
    """Mixed FL (PARALLEL TRAINING, 1-WAY or 2-WAY GRADIENT TRANSFER) on FedAvg's rounds.

    Parameters
    ----------
    server_data : ServerData
        The server's data and loss ``f_c`` (gradient at ``x^t``, central steps).
    algorithm : {"parallel", "1-way", "2-way"}, default "parallel"
        Which of the paper's algorithms.
    w_f, w_c : float, default 0.5, 0.5
        Weights of the federated and the centralized loss (>= 0, not both 0).
    server_lr : float, default 1.0
        ``eta_s`` of the server optimiser (SGD on ``Delta``).
    **kwargs
        Passed to :class:`flowerbed.strategies.fedavg.FedAvg` (sampling, guards).

    Raises
    ------
    MixedFLError
        Unknown algorithm, a negative weight, both weights 0, or ``server_lr`` <= 0.
    """

    extra_arrayrecords = (CLIENT_GRAD,)

    def __init__(
        self,
        server_data: ServerData,
        algorithm: str = "parallel",
        w_f: float = 0.5,
        w_c: float = 0.5,
        server_lr: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise MixedFLError(f"algorithm={algorithm!r}: must be one of {', '.join(ALGORITHMS)}")
        if w_f < 0 or w_c < 0 or w_f + w_c == 0:
            raise MixedFLError(f"w_f={w_f!r}, w_c={w_c!r}: weights >= 0, not both 0")
        if server_lr <= 0:
            raise MixedFLError(f"server_lr={server_lr!r}: must be > 0")
        super().__init__(**kwargs)
        self.server_data = server_data
        self.algorithm = algorithm
        self.w_f, self.w_c = float(w_f), float(w_c)
        self.server_lr = float(server_lr)
        self._server_grad: ArrayRecord | None = None

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t├──> Mixed FL: algorithm %s", self.algorithm)
        log(INFO, "\t│\t├── w_f = %g, w_c = %g", self.w_f, self.w_c)
        log(INFO, "\t│\t└── server_lr = %g", self.server_lr)
        super().summary()

    @property
    def sends_server_grad(self) -> bool:
        return self.algorithm != "parallel"

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages plus the algorithm, the weights and (1-way, 2-way) ``g_c``."""
        config[ALGORITHM_KEY] = self.algorithm
        config[WF_KEY], config[WC_KEY] = self.w_f, self.w_c
        config[UPLOAD_KEY] = self.algorithm == "2-way"
        self._server_grad = None
        if self.sends_server_grad:
            self._server_grad = self.server_data.gradient(server_round, arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def message_record(self, arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
        """The model and config, with ``server-grad`` in 1-way and 2-way rounds."""
        content = super().message_record(arrays, config)
        if self._server_grad is not None and config.get(ALGORITHM_KEY) is not None:
            content[SERVER_GRAD] = self._server_grad
        return content

    def check_reply(self, msg: Message, is_train: bool) -> str | None:
        """FedAvg's checks; in 2-way also a ``client-grad`` with ``g_c``'s keys, shapes, dtypes
        and only finite values."""
        why = super().check_reply(msg, is_train)
        if why is not None or not is_train or self.algorithm != "2-way":
            return why
        from flowerbed.common.records import check_arrays

        if CLIENT_GRAD not in msg.content.array_records:
            return f"2-way reply without the ArrayRecord {CLIENT_GRAD!r}"
        why = check_arrays(msg.content[CLIENT_GRAD], self._server_grad)
        return None if why is None else f"{CLIENT_GRAD}: {why}"

    def aggregate_arrays(self, server_round: int, contents: list[RecordDict]) -> ArrayRecord:
        """Flower's weighted mean of the valid clients' models, combined with the server's side
        by the algorithm (the contents reaching here passed :meth:`check_reply`)."""
        models = [_only(c, self.arrayrecord_key) for c in contents]
        mean_model = super().aggregate_arrays(server_round, models)
        x = _np(self._global)
        client_delta = {k: mean_model[k].numpy() - x[k] for k in x}
        row = self.history.setdefault(server_round, {})
        row.update(algorithm=self.algorithm, client_delta_norm=_norm(client_delta))
        if self.algorithm == "1-way":
            delta = client_delta
        else:
            if self.algorithm == "parallel":
                direction: Direction = dict
            else:
                grads = [_only(c, CLIENT_GRAD, rename=self.arrayrecord_key) for c in contents]
                g_f = _np(super().aggregate_arrays(server_round, grads))
                row["client_grad_norm"] = _norm(g_f)

                def direction(g_c):
                    return server_direction(g_c, _as(g_f, g_c), self.w_f, self.w_c)

            z = _np(self.server_data.steps(server_round, self._global, direction))
            server_delta = {k: z[k] - x[k] for k in x}
            row["server_delta_norm"] = _norm(server_delta)
            delta = parallel_delta(client_delta, server_delta, self.w_f, self.w_c)
        return _record(apply_delta(x, delta, self.server_lr), self._global)


def _only(content: RecordDict, key: str, rename: str | None = None) -> RecordDict:
    """``content`` with one ArrayRecord (``key``, stored as ``rename``) and its metrics: Flower's
    averaging sums every ArrayRecord of a reply by array name."""
    out = RecordDict({rename or key: content[key]})
    for name, rec in content.metric_records.items():
        out[name] = rec
    return out


def _as(arrays: Mapping[str, np.ndarray], like: Mapping[str, Any]) -> dict[str, Any]:
    """``arrays`` as the type of ``like``'s values (torch tensors on their device, or numpy)."""
    first = next(iter(like.values()), None)
    if first is None or isinstance(first, np.ndarray):
        return dict(arrays)
    import torch

    return {k: torch.as_tensor(arrays[k], device=like[k].device, dtype=like[k].dtype) for k in like}
