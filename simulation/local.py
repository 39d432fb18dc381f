"""Run an app's ServerApp and ClientApp in one process, sequentially, without Ray.

:class:`LocalGrid` serves the Grid calls a ServerApp makes (``get_node_ids``,
``send_and_receive``, ``create_message``) by calling the app's ``ClientApp`` object directly, with
one persistent ``Context`` per node (``partition-id``/``num-partitions`` in its node config,
``state`` kept across rounds). The app code, the strategy, the message contents, the failure
handling (an exception becomes an error reply, as in Flower) and the results file are the
app's own; only the transport and Ray's process placement are left out.

It is the runner's ``launcher=local``: the fastest way to run sweeps of small models on a
laptop or a shared CPU machine, where Ray actors would compete for the same cores. Flower's own
paths (``launcher=inprocess`` and ``launcher=flwr``) are what the apps' smoke and end-to-end
tests exercise.

Same results as Flower's engine: the ClientApp calls run with the torch thread count a Ray actor
of ``num_cpus`` CPUs gets (``max(floor(num_cpus), 1)``), because matrix products summed by a
different number of threads can differ in the last bits; with that, a run gives bitwise the
same global model as ``launcher=inprocess`` with the same seed and ``num_cpus``
(``tests/test_local_engine_equal.py``).
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict

from flowerbed.common.testing import FakeGrid
from flowerbed.simulation.inprocess import fused_config, load_components


class LocalGrid(FakeGrid):
    """A Grid whose ``num_nodes`` nodes are one ClientApp called in this process.

    Parameters
    ----------
    client_app : flwr.clientapp.ClientApp
        The app's ClientApp object.
    run_config : dict
        The run config every node sees.
    num_nodes : int
        Nodes; node ``i + 1`` holds partition ``i``.
    threads : int or None, default None
        torch threads during the ClientApp calls (None: this process's setting); the driver's
        own setting is restored after each batch of calls.
    """

    def __init__(
        self, client_app, run_config: dict[str, Any], num_nodes: int, threads: int | None = None
    ):
        super().__init__(list(range(1, num_nodes + 1)))
        self.client_app = client_app
        self.threads = threads
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

    def create_message(self, content, message_type, dst_node_id, group_id="", ttl=None):
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        import torch

        driver_threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        replies = []
        try:
            for msg in messages:
                ctx = self.contexts[msg.metadata.dst_node_id]
                try:
                    rep = self.client_app(msg, ctx)
                except Exception as e:  # as in Flower: an error reply, the run goes on
                    reason = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
                    rep = Message(Error(code=0, reason=reason), reply_to=msg)
                replies.append(rep)
        finally:
            torch.set_num_threads(driver_threads)
        return replies


def run_local(
    app: str,
    overrides: dict[str, Any] | None = None,
    num_supernodes: int = 10,
    num_cpus: float = 1,
):
    """Run ``app`` with ``overrides`` on a :class:`LocalGrid`; return the fused run config.

    ``num_cpus``: the CPUs of the Ray actor whose thread count the ClientApp calls use (the
    runner's ``resources.num_cpus``), so that the run matches ``launcher=inprocess`` bitwise.
    """
    path, config = fused_config(app, overrides)
    server_app, client_app = load_components(path)
    grid = LocalGrid(client_app, config, num_supernodes, threads=max(1, math.floor(num_cpus)))
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    server_app(grid, ctx)
    return config
