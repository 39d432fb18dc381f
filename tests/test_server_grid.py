"""The protocol layer on a deployment Grid (Flower's ``HttpGrid``): the same push and pull as
``HttpGrid.send_and_receive``, but polling from 10 ms up to 0.2 s instead of every 3 s, and the
short backoff bound to Flower's ``pull_objects``; other Grids are left as they are."""

from __future__ import annotations

import functools
import types

from flwr.superlink.grid import http_grid
from flwr.superlink.grid.http_grid import HttpGrid

from flowerbed.common import protocol
from flowerbed.common.protocol import Protocol


class _FakeHttpGrid(HttpGrid):
    """An HttpGrid whose replies to the pushed messages arrive one per pull."""

    def __init__(self):  # no SuperLink: only push / pull are used
        self.pulls = 0

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        pending = sorted(message_ids)
        if not pending:
            return []
        meta = types.SimpleNamespace(
            reply_to_message_id=pending[0], src_node_id=int(pending[0][1:]) + 1
        )
        return [types.SimpleNamespace(metadata=meta, has_error=lambda: False, content=None)]


def _msg(node: int):
    from flwr.app import Message, RecordDict

    from flowerbed.common.testing import FakeGrid

    FakeGrid([node])  # sets Flower's task identity, so that a Message can be built
    return Message(content=RecordDict(), dst_node_id=node, message_type="train")


def test_replies_are_pulled_until_all_arrived_with_short_sleeps(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(protocol.time, "sleep", sleeps.append)
    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)  # restored after
    grid = _FakeHttpGrid()
    proto = Protocol(grid, poll_s=0.01, max_poll_s=0.2)
    replies = proto._transport("train", 1, [_msg(1), _msg(2), _msg(3)], timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert grid.pulls == 3 and sleeps == [0.01, 0.01]  # Flower's HttpGrid: [3, 3]
    # the short backoff is bound to Flower's pull_objects, in this process
    assert isinstance(http_grid.pull_objects, functools.partial)
    assert http_grid.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 0.5}


def test_timeout_returns_what_arrived(monkeypatch):
    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)
    grid = _FakeHttpGrid()
    grid.pull_messages = lambda ids: []  # nothing ever arrives
    assert Protocol(grid, poll_s=0.01)._transport("train", 1, [_msg(1)], timeout=0.1) == []
