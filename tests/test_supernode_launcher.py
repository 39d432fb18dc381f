"""The SuperNode launcher caps Flower's SuperNode sleeps and shortens its object-pull backoff."""

from __future__ import annotations

import functools
import time

import pytest


def test_patch_caps_the_supernode_loop_sleeps(monkeypatch):
    import flwr.supernode.start_client_internal as sci

    from flowerbed.simulation import supernode

    monkeypatch.setattr(sci, "time", sci.time)
    monkeypatch.setattr(sci, "pull_objects", sci.pull_objects)
    supernode.patch(0.05)
    t0 = time.perf_counter()
    sci.time.sleep(3)  # Flower's idle wait
    assert time.perf_counter() - t0 < 1.0
    assert sci.time.time() == pytest.approx(time.time(), abs=1.0)  # the rest is the time module
    assert isinstance(sci.pull_objects, functools.partial)
    assert sci.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 0.5}
    supernode.patch(0.05)  # idempotent: not wrapped twice
    assert not isinstance(sci.pull_objects.func, functools.partial)
    with pytest.raises(ValueError, match="--poll 0"):
        supernode.patch(0)


def test_deployment_starts_the_launcher_or_flower_unchanged(tmp_path):
    from flowerbed.simulation.deploy import Deployment

    with pytest.raises(ValueError, match="supernode_poll=0"):
        Deployment(tmp_path / "a", tls=False, auth=False, supernode_poll=0)
    d = Deployment(tmp_path / "b", tls=False, auth=False)
    assert d.supernode_poll == 0.2  # the launcher with capped waits unless asked
    d = Deployment(tmp_path / "c", tls=False, auth=False, supernode_poll=None)
    assert d.supernode_poll is None  # Flower's flower-supernode unchanged


def test_superlink_state_in_memory_unless_a_database_is_given(tmp_path):
    from flowerbed.simulation.deploy import Deployment

    cmd = Deployment(tmp_path / "a", tls=False, auth=False).superlink_cmd()
    assert "--database" not in cmd  # Flower's in-memory LinkState
    db = tmp_path / "b" / "superlink.db"
    cmd = Deployment(tmp_path / "b", tls=False, auth=False, database=db).superlink_cmd()
    assert cmd[cmd.index("--database") + 1] == str(db)
