"""Checkpoint and resume for ServerApps: the global model and the strategy's state per round.

:class:`Checkpointed` wraps any Message-API strategy. Its ``start`` runs
:func:`flowerbed.common.protocol.round_loop` (the loop of every flowerbed strategy, phased ones
included), and after every completed round (training,
federated evaluation, server-side evaluation) writes ``<dir>/checkpoint.npz`` atomically (temp
file + ``os.replace``: a reader sees the previous or the new checkpoint, never half of one).
The file holds the global arrays (dtype and shape kept, so resuming is bitwise exact), the round,
and a JSON blob with the strategy chain's ``state_dict()`` (each wrapped strategy that has one),
the ``Result`` so far, and the server's RNG states (``random``, NumPy, torch).

With ``resume=True`` and a checkpoint present, ``start`` restores all of that and continues with
round ``k + 1``; clients get the same round numbers as in an uninterrupted run, and their seeds
come from (seed, partition, round), so the resumed run ends with exactly the same global model.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flowerbed.common.protocol import round_loop

FILENAME = "checkpoint.npz"
_STATE = "__state__"
_log = logging.getLogger("flowerbed")


# ---------------------------------------------------------------------- file format
def save_checkpoint(path: Path | str, server_round: int, arrays: ArrayRecord, state: dict) -> Path:
    """Write ``arrays`` + ``state`` (JSON-serialisable) for ``server_round`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blobs = {f"a/{k}": v.numpy() for k, v in arrays.items()}
    meta = {"round": int(server_round), "keys": list(arrays.keys()), "state": state}
    blobs[_STATE] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **blobs)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: Path | str) -> tuple[int, ArrayRecord, dict]:
    """``(round, arrays, state)`` from a file written by :func:`save_checkpoint`."""
    with np.load(Path(path), allow_pickle=False) as z:
        meta = json.loads(z[_STATE].tobytes().decode())
        arrays = ArrayRecord({k: Array(np.array(z[f"a/{k}"])) for k in meta["keys"]})
    return int(meta["round"]), arrays, meta["state"]


# ---------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Python, NumPy and torch global RNG states as JSON."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *[float(x) for x in np_state[2:]]],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), int(n[2]), int(n[3]), n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


# ---------------------------------------------------------------------- strategy wrapper
def strategy_chain(strategy: Any) -> list[Any]:
    """``[strategy, strategy.strategy, ...]`` (Flower's DP wrappers keep the inner one there)."""
    chain = []
    while strategy is not None and strategy not in chain:
        chain.append(strategy)
        strategy = getattr(strategy, "strategy", None)
    return chain


def _metrics(d: dict[int, MetricRecord]) -> dict[str, dict]:
    return {str(k): dict(v) for k, v in d.items()}


def _unmetrics(d: dict[str, dict]) -> dict[int, MetricRecord]:
    return {int(k): MetricRecord(v) for k, v in d.items()}


class Checkpointed(Strategy):
    """Run ``strategy`` with a checkpoint after every round and optional resume.

    Parameters
    ----------
    strategy : Strategy
        The strategy to run (any Message-API strategy; wrappers are walked through ``.strategy``
        and every object in the chain with ``state_dict``/``load_state_dict`` is saved).
    directory : str or Path
        Folder of ``checkpoint.npz``.
    resume : bool, default False
        Continue from the checkpoint in ``directory`` if there is one.
    on_resume : callable or None, default None
        ``on_resume(round)`` called after a checkpoint was restored (e.g. to reload results).
    """

    def __init__(
        self,
        strategy: Strategy,
        directory: str | Path,
        resume: bool = False,
        on_resume: Callable[[int], None] | None = None,
    ) -> None:
        self.strategy = strategy
        self.path = Path(directory) / FILENAME
        self.resume = resume
        self.on_resume = on_resume
        self.resumed_from: int | None = None

    # delegation ------------------------------------------------------------
    @property
    def history(self) -> dict:
        for s in strategy_chain(self.strategy):
            if isinstance(getattr(s, "history", None), dict):
                return s.history
        return {}

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round, arrays, config, grid):
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round, replies)

    # state -----------------------------------------------------------------
    def _state(self, result: Result) -> dict:
        chain = strategy_chain(self.strategy)
        return {
            "strategies": [s.state_dict() if hasattr(s, "state_dict") else None for s in chain],
            "result": {
                "train": _metrics(result.train_metrics_clientapp),
                "evaluate": _metrics(result.evaluate_metrics_clientapp),
                "server": _metrics(result.evaluate_metrics_serverapp),
            },
            "rng": rng_state(),
        }

    def _restore(self, state: dict, result: Result) -> None:
        chain = strategy_chain(self.strategy)
        for s, st in zip(chain, state["strategies"], strict=False):
            if st is not None and hasattr(s, "load_state_dict"):
                s.load_state_dict(st)
        result.train_metrics_clientapp.update(_unmetrics(state["result"]["train"]))
        result.evaluate_metrics_clientapp.update(_unmetrics(state["result"]["evaluate"]))
        result.evaluate_metrics_serverapp.update(_unmetrics(state["result"]["server"]))
        set_rng_state(state["rng"])

    # loop ------------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        after_round: Callable[[int, ArrayRecord, Result], None] | None = None,
    ) -> Result:
        """:func:`~flowerbed.common.protocol.round_loop` with a checkpoint per round (and resume).

        ``evaluate_fn`` and ``after_round`` are called as in the loop; on resume the rounds up to
        the checkpoint are not run again and ``evaluate_fn(0)`` is not repeated.
        """
        result = Result()
        arrays = initial_arrays
        first = 1
        if self.resume and self.path.exists():
            done, arrays, state = load_checkpoint(self.path)
            self._restore(state, result)
            result.arrays = arrays
            first = done + 1
            self.resumed_from = done
            _log.warning("resuming from %s: round %d completed", self.path, done)
            if self.on_resume:
                self.on_resume(done)

        def save(rnd: int, arrays: ArrayRecord, result: Result) -> None:
            if after_round is not None:
                after_round(rnd, arrays, result)
            if rnd > 0:
                save_checkpoint(self.path, rnd, arrays, self._state(result))

        t0 = time.time()
        result = round_loop(
            self.strategy,
            grid,
            arrays,
            num_rounds,
            timeout,
            train_config,
            evaluate_config,
            evaluate_fn,
            first_round=first,
            result=result,
            after_round=save,
        )
        _log.info("rounds %d..%d finished in %.2f s", first, num_rounds, time.time() - t0)
        return result
