"""Shared test fixtures: app import paths, a private output folder, no telemetry."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


# a FedAvg run small enough for a test: sklearn's digits, an MLP, 5 local steps per client
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
