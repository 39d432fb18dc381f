"""Run the FedQual ServerApp and ClientApp code in one process, without Ray or a SuperLink.

:class:`LocalGrid` implements the two Grid calls the app uses (``get_node_ids`` and
``send_and_receive``) by calling the ClientApp's ``train`` function directly, with one persistent
``Context`` per node (``partition-id``/``num-partitions`` in its node config, ``state`` kept
across rounds). The ServerApp's ``main`` runs unchanged on it, so the strategy, the client step,
the evaluation and the results file are exactly the app's; only the transport is left out.

It exists because on a shared 2-core machine one Ray-backed run of 20 rounds took minutes
(actors starved of CPU), while this path takes seconds. The Flower paths (``run_app``,
``flwr run``) are exercised by the smoke and end-to-end tests.
"""

from __future__ import annotations

import traceback
from typing import Any

from flwr.app import Context, Error, Message, MessageType, RecordDict

from flowerbed.common.testing import FakeGrid
from flowerbed.simulation.inprocess import app_config, app_dir, load_components


class LocalGrid(FakeGrid):
    """A Grid whose nodes are ClientApp functions called in this process.

    Parameters
    ----------
    run_config : dict
        The run config every node sees.
    num_nodes : int
        Number of nodes (partition ids ``0 .. num_nodes - 1``, node ids ``1 .. num_nodes``).
    """

    def __init__(self, run_config: dict[str, Any], num_nodes: int):
        super().__init__(list(range(1, num_nodes + 1)))
        self.contexts = {
            nid: Context(
                run_id=1,
                node_id=nid,
                node_config={"partition-id": nid - 1, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for nid in self.node_ids
        }

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        from fedqual.client_app import train

        replies = []
        for msg in messages:
            ctx = self.contexts[msg.metadata.dst_node_id]
            try:
                if msg.metadata.message_type != MessageType.TRAIN:
                    raise ValueError(f"message type {msg.metadata.message_type!r} not served")
                rep = train(msg, ctx)
            except Exception as e:  # as Flower does: an error reply, the run goes on
                reason = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
                rep = Message(Error(code=0, reason=reason), reply_to=msg)
            replies.append(rep)
        return replies


def run_local(overrides: dict[str, Any], num_nodes: int = 5) -> dict[str, Any]:
    """Run the app's ServerApp ``main`` on a :class:`LocalGrid`; return the run config."""
    path = app_dir("fedqual")
    defaults, _ = app_config(path)
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"unknown run config key {unknown[0]!r} for app 'fedqual'")
    config = {**defaults, **overrides}
    load_components(path)
    from fedqual.server_app import main

    grid = LocalGrid(config, num_nodes)
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    return config
