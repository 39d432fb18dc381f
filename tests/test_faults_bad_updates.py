"""Bad updates against every strategy in ``flowerbed.strategies``: wrong shapes, wrong dtype, NaN,
Inf, absurd norm, missing/extra keys are rejected with a logged reason and never averaged.

The strategies are found at test time (every Strategy subclass defined in a module of
``flowerbed.strategies``), so a strategy added later is covered without editing this file. A
strategy that cannot be built with its default arguments, or whose replies are not the plain
single-ArrayRecord model replies crafted here, is skipped with the reason.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

import flowerbed.strategies as strategies_pkg
from flowerbed.common.checkpoint import strategy_chain
from flowerbed.common.testing import FakeGrid, mock_reply

SHAPES = {"w": (3, 2), "b": (2,)}


def _strategy_classes() -> list[type]:
    found = {}
    for mod in pkgutil.iter_modules(strategies_pkg.__path__):
        if mod.name.endswith("_test"):
            continue
        module = importlib.import_module(f"flowerbed.strategies.{mod.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(cls, Strategy)
                and cls.__module__ == module.__name__
                and not inspect.isabstract(cls)
            ):
                found[f"{mod.name}.{cls.__name__}"] = cls
    return [found[k] for k in sorted(found)]


CLASSES = _strategy_classes()


def test_every_strategy_module_is_found():
    names = {c.__name__ for c in CLASSES}
    assert {"FedAvg", "DPFedAvg"} <= names, names


def _arrays(value: float = 0.0, **over) -> dict[str, np.ndarray]:
    out = {k: np.full(s, value, np.float32) for k, s in SHAPES.items()}
    out.update(over)
    return out


def _reply(arrays: dict[str, np.ndarray], n: int, node: int):
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            # "quality" is read by quality-weighted strategies, ignored by the others
            "metrics": MetricRecord({"num-examples": n, "train_loss": 0.5, "quality": 0.5}),
        }
    )
    return mock_reply(content, node_id=node)


def _bad_replies():
    nan = _arrays(0.1)
    nan["w"][1, 1] = np.nan
    inf = _arrays(0.1)
    inf["b"][0] = -np.inf
    return {
        "wrong shape": (_reply(_arrays(0.1, w=np.zeros((2, 3), np.float32)), 10, 11), "shape"),
        "wrong dtype": (_reply(_arrays(0.1, w=np.zeros((3, 2), np.float64)), 10, 12), "dtype"),
        "NaN": (_reply(nan, 10, 13), "NaN"),
        "Inf": (_reply(inf, 10, 14), "Inf"),
        "absurd norm": (_reply(_arrays(1e6), 10, 15), "norm"),
        "missing key": (_reply({"w": np.zeros((3, 2), np.float32)}, 10, 16), "keys differ"),
        "extra key": (_reply(_arrays(0.1, z=np.zeros(1, np.float32)), 10, 17), "keys differ"),
    }


def _build(cls):
    try:
        s = cls()
    except TypeError as e:
        pytest.skip(
            f"{cls.__name__} cannot be built with default arguments ({e}); its replies are not "
            "the single model ArrayRecord crafted here (e.g. FedTA's carry 'arrays' + 'protos')"
        )
    for inner in strategy_chain(s):
        for attr, val in (
            ("min_available_nodes", 1),
            ("min_train_nodes", 1),
            ("max_update_norm", 100.0),
            ("min_train_replies", 1),
        ):
            if hasattr(inner, attr):
                setattr(inner, attr, val)
    return s


def _aggregate(s, replies):
    global_ = ArrayRecord({k: Array(v) for k, v in _arrays(0.0).items()})
    list(s.configure_train(1, global_, ConfigRecord(), FakeGrid([11, 12, 13, 14, 15, 16, 17])))
    np.random.seed(0)  # DP noise identical between the two aggregations compared
    return s.aggregate_train(1, replies)


def _history(s) -> dict:
    for inner in strategy_chain(s):
        if isinstance(getattr(inner, "history", None), dict):
            return inner.history
    return {}


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad_kind", list(_bad_replies()))
def test_bad_update_rejected_and_not_averaged(cls, bad_kind):
    good = [_reply(_arrays(0.2), 10, 1), _reply(_arrays(0.4), 30, 2)]
    ref = _build(cls)
    ref_arrays, _ = _aggregate(ref, list(good))
    if ref_arrays is None or _history(ref).get(1, {}).get("num_rejected", 0):
        pytest.skip(
            f"{cls.__name__} does not accept the crafted single-ArrayRecord replies "
            f"({_history(ref).get(1, {}).get('failure_reasons')}): not ArrayRecord-model based"
        )
    bad, needle = _bad_replies()[bad_kind]
    s = _build(cls)
    handler = _Capture()
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(handler)
    try:
        arrays, _ = _aggregate(s, [good[0], bad, good[1]])
    finally:
        flwr_logger.removeHandler(handler)
    assert arrays is not None
    for k in SHAPES:  # exactly the aggregate of the good replies: the bad one never counted
        np.testing.assert_array_equal(arrays[k].numpy(), ref_arrays[k].numpy())
        assert np.isfinite(arrays[k].numpy()).all()
    h = _history(s)[1]
    assert h["num_rejected"] == 1 and h["num_train_replies"] == 2
    reason = " ".join(h["failure_reasons"])
    assert needle in reason, reason
    assert any("rejected reply" in line and needle in line for line in handler.lines)
