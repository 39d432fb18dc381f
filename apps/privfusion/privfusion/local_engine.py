"""Run the PrivFusion ServerApp and ClientApp code in one process, without Ray or a SuperLink.

:class:`LocalGrid` implements the two Grid calls the app uses (``get_node_ids`` and
``send_and_receive``) by calling the ClientApp object directly (Flower's own dispatch on the
message type: ``train.local``, ``train.align``, ``train.fuse``, ``train``), with one persistent
``Context`` per node (``partition-id``/``num-partitions`` in its node config, ``state`` kept
across steps). The ServerApp's ``main`` runs unchanged on it, so the protocol, the parties' code,
the evaluation and the results file are exactly the app's; only the transport is left out.

It exists for the results sweep (``python -m privfusion.sweep``): on the shared 2-core machine one
Ray-backed run took 1-3 minutes, mostly Ray start-up and starved actors. The Flower paths
(``run_app``, ``flwr run``) are exercised by the smoke and end-to-end tests.
"""

from __future__ import annotations

import traceback
from typing import Any

from flwr.app import Context, Error, Message, RecordDict

from flowerbed.common.testing import FakeGrid
from flowerbed.simulation.inprocess import app_config, app_dir, load_components


class LocalGrid(FakeGrid):
    """A Grid whose nodes are the ClientApp called in this process.

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
        from privfusion.client_app import app

        replies = []
        for msg in messages:
            ctx = self.contexts[msg.metadata.dst_node_id]
            try:
                rep = app(msg, ctx)
            except Exception as e:  # as Flower does: an error reply, the run goes on
                reason = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
                rep = Message(Error(code=0, reason=reason), reply_to=msg)
            replies.append(rep)
        return replies


def run_local(overrides: dict[str, Any], num_nodes: int) -> dict[str, Any]:
    """Run the app's ServerApp ``main`` on a :class:`LocalGrid`; return the run config."""
    path = app_dir("privfusion")
    defaults, _ = app_config(path)
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"unknown run config key {unknown[0]!r} for app 'privfusion'")
    config = {**defaults, **overrides}
    load_components(path)
    from privfusion.server_app import main

    grid = LocalGrid(config, num_nodes)
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    return config
