"""The ServerApp's deployment Grid wrapper (common/server.py): the same push and pull as
Flower's ``HttpGrid.send_and_receive``, polling every 0.1 s instead of 3 s; other Grids are
left as they are."""

from __future__ import annotations

import types

from flwr.superlink.grid.http_grid import HttpGrid

from flowerbed.common import server
from flowerbed.common.server import polling_grid


class _FakeHttpGrid(HttpGrid):
    """An HttpGrid whose replies to the pushed messages arrive one per pull."""

    def __init__(self):  # no SuperLink: only push / pull are used
        self.pulls = 0
        self.ids: list[str] = []

    def push_messages(self, messages):
        self.ids = [f"m{i}" for i, _ in enumerate(messages)]
        return list(self.ids)

    def pull_messages(self, message_ids):
        self.pulls += 1
        pending = sorted(message_ids)
        if not pending:
            return []
        meta = types.SimpleNamespace(reply_to_message_id=pending[0])
        return [types.SimpleNamespace(metadata=meta)]

    def get_node_ids(self):
        return [1, 2, 3]


def test_replies_are_pulled_until_all_arrived_with_a_short_interval(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(server.time, "sleep", sleeps.append)
    raw = _FakeHttpGrid()
    grid = polling_grid(raw, interval=0.01)
    assert grid is not raw and grid.get_node_ids() == [1, 2, 3]  # the rest is the Grid's
    replies = grid.send_and_receive([object(), object(), object()], timeout=None)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert raw.pulls == 3 and sleeps == [0.01, 0.01]  # Flower's HttpGrid: [3, 3]


def test_timeout_returns_what_arrived_and_other_grids_are_untouched():
    raw = _FakeHttpGrid()
    raw.pull_messages = lambda ids: []  # nothing ever arrives
    replies = polling_grid(raw, interval=0.01).send_and_receive([object()], timeout=0.1)
    assert replies == []
    other = object()
    assert polling_grid(other) is other
