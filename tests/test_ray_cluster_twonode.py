"""The simulation runner attaches to an existing two-node Ray cluster on loopback.

``ray.cluster_utils.Cluster`` (Ray's own multi-node test utility) starts a head node and a
second node (separate raylets, one CPU each) on this machine; ``run_app(..., ray_address=...)``
joins it as a driver, exactly as on a real cluster (docs/cluster.md). With one CPU per virtual
client, the two ClientApp actors cannot both sit on one node, so a finished run whose actors
lived on two node ids shows that clients were spread over the cluster.
"""

import json

import pytest

from flowerbed.common.testing import TINY_FEDAVG

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

TINY = {**TINY_FEDAVG, "num-server-rounds": 2}


def _actor_nodes() -> dict[str, list[str]]:
    """node id -> states of every ClientAppActor the cluster's GCS knows (alive or dead)."""
    from ray._private.state import actors  # GCS table; the public state API needs a dashboard

    out: dict[str, list[str]] = {}
    for a in actors().values():
        if a.get("ActorClassName", "").endswith("ClientAppActor"):
            node = a.get("Address", {}).get("NodeID") or a.get("NodeID") or "?"
            out.setdefault(node, []).append(a.get("State", "?"))
    return out


def test_run_spreads_clients_over_two_ray_nodes(tmp_path):
    from flowerbed.simulation.inprocess import run_app

    if ray.is_initialized():
        ray.shutdown()
    small = {"object_store_memory": 80 * 1024**2}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, **small},
    )
    try:
        cluster.add_node(num_cpus=1, **small)
        cluster.wait_for_nodes()
        out = tmp_path / "run"
        run_app(
            "fedavg",
            {**TINY, "results-dir": str(out)},
            num_supernodes=4,
            num_cpus=1,
            ray_address=cluster.address,
        )
        rec = json.loads((out / "results.json").read_text())
        rounds = {r["round"]: r for r in rec["rounds"]}
        assert sorted(rounds) == [0, 1, 2], rounds
        assert rounds[2]["num_train_replies"] == 4 and rounds[2]["num_failures"] == 0, rounds[2]
        assert rec["extra"]["final"]["accuracy"] > rounds[0]["server_accuracy"], rounds

        # the run's driver disconnected (RayBackend.terminate calls ray.shutdown); reconnect
        # to read the cluster's actor table before the cluster goes away
        ray.init(address=cluster.address, logging_level="error")
        nodes = _actor_nodes()
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(alive) == 2, ray.nodes()
        assert set(nodes) == alive, (nodes, alive)  # ClientApp actors ran on both nodes
        assert sum(len(v) for v in nodes.values()) == 2, nodes  # one actor per CPU
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
