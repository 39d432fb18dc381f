"""Test helpers and the project's pytest plugin.

- mock reply Messages and a fake Grid for strategy unit tests (no Ray, no network);
- :func:`app_path` (put ``apps/<name>`` on ``sys.path``, as Flower does when it loads an app);
- :data:`TINY_FEDAVG`, a FedAvg run config small enough for a test;
- the autouse fixture that sends every run's outputs into the test's temporary folder.

pytest loads this module as a plugin (``-p flowerbed.common.testing`` in ``pyproject.toml``), so
the library's tests (``tests/``), the strategies' (``strategies/*_test.py``) and every app's
(``apps/<name>/tests/``) share it without a conftest of their own.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)


def mock_reply(
    content: RecordDict | None = None,
    node_id: int = 1,
    message_type: str = MessageType.TRAIN,
    error: str | None = None,
) -> Message:
    """A reply Message from node ``node_id`` carrying ``content`` (or an error reason)."""
    meta = Metadata(
        run_id=1,
        message_id=f"m{node_id}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    if error is not None:
        return Message(metadata=meta, error=Error(code=0, reason=error))
    return Message(metadata=meta, content=content or RecordDict())


def train_reply(
    arrays: dict[str, np.ndarray], num_examples: int, node_id: int = 1, **metrics: float
) -> Message:
    """A training reply with ``arrays`` and metrics (``num-examples`` included)."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": num_examples, **metrics}),
        }
    )
    return mock_reply(content, node_id=node_id)


def node_context(
    partition_id: int,
    num_partitions: int,
    run_config: dict | None = None,
    state: RecordDict | None = None,
):
    """The Context of a ClientApp call on the node holding ``partition_id`` (node id = pid + 1),
    for calling a ClientApp function directly in a test."""
    from flwr.app import Context

    return Context(
        run_id=1,
        node_id=partition_id + 1,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict() if state is None else state,
        run_config=dict(run_config or {}),
    )


class FakeGrid:
    """The part of a Grid that strategies' ``configure_*`` use: node ids (no network).

    Also sets Flower's task identity so that strategies can build outgoing Messages in tests.
    """

    def __init__(self, node_ids: list[int]):
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.task_id = 1
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


class ScriptGrid(FakeGrid):
    """A FakeGrid that answers from a script: ``handlers[node][message_type](content) ->
    RecordDict``; node ``n`` is partition ``n - 1``. Every scripted message is kept in ``sent`` as
    ``(message_type, node, content)``. A ``query`` message without a handler (the partition-id
    query of client sampling) gets ``partition-id = n - 1`` and ``num-partitions`` (default: the
    number of nodes) and is not kept.
    """

    def __init__(self, handlers, num_partitions: int | None = None):
        super().__init__(sorted(handlers))
        self.handlers = handlers
        self.num_partitions = len(handlers) if num_partitions is None else int(num_partitions)
        self.sent: list = []

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import MetricRecord

        out = []
        for m in messages:
            node, kind = m.metadata.dst_node_id, m.metadata.message_type
            if kind == "query" and kind not in self.handlers[node]:
                metrics = {"partition-id": node - 1, "num-partitions": self.num_partitions}
                content = RecordDict({"metrics": MetricRecord(metrics)})
            else:
                self.sent.append((kind, node, m.content))
                content = self.handlers[node][kind](m.content)
            out.append(mock_reply(content, node_id=node, message_type=kind))
        return out


# ---------------------------------------------------------------------------- pytest plugin
REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

#: a FedAvg run small enough for a test: sklearn's digits, an MLP, 5 local steps per client
TINY_FEDAVG = {
    "dataset": "digits",
    "model": "mlp",
    "partitioner": "iid",
    "local-steps": 5,
    "batch-size": 32,
}


def app_path(name: str) -> Path:
    """Put ``apps/<name>`` on sys.path (as Flower does when it loads the app) and return it."""
    path = REPO / "apps" / name
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return path


@pytest.fixture(autouse=True)
def _outputs(tmp_path, monkeypatch):
    """Runs started by a test write their results under the test's tmp folder."""
    monkeypatch.setenv("FLOWERBED_OUTPUTS", str(tmp_path / "outputs"))
    yield
