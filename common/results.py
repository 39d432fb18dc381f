"""The results file every run writes: ``results.json``.

Contents: the run config, the git commit, package versions, per-round metrics (server and client
side), wall time, and bytes sent and received per round. Written atomically (temp file + rename)
after every round, so a killed run leaves its last complete state.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from flowerbed.common.data import REPO_ROOT

PACKAGES = ("flwr", "flwr-datasets", "torch", "torchvision", "numpy", "ray", "opacus", "flowerbed")


def git_commit(path: Path | str = REPO_ROOT) -> str:
    """The commit of the repository at ``path`` (with ``-dirty`` if it has local changes)."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--verify", "-q", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty and sha else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES + extra:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (no half-written file is ever visible)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class ResultsWriter:
    """Collects a run's record and writes ``<out_dir>/results.json``.

    Parameters
    ----------
    out_dir : str or Path
        Folder of the run (created).
    config : dict
        The run config (written verbatim).
    app : str
        App name.
    """

    def __init__(self, out_dir: str | Path, config: dict[str, Any], app: str):
        self.out_dir = Path(out_dir)
        self.t0 = time.perf_counter()
        self.record: dict[str, Any] = {
            "app": app,
            "config": dict(config),
            "git_commit": git_commit(),
            "versions": versions(),
            "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "rounds": [],
            "extra": {},
        }

    @property
    def path(self) -> Path:
        return self.out_dir / "results.json"

    def add_round(self, server_round: int, **metrics: Any) -> None:
        """Record (or update) the metrics of ``server_round``; writes the file."""
        rounds = self.record["rounds"]
        row = next((r for r in rounds if r["round"] == server_round), None)
        if row is None:
            row = {"round": server_round}
            rounds.append(row)
            rounds.sort(key=lambda r: r["round"])
        row.update(_plain(metrics))
        self.write()

    def set(self, key: str, value: Any) -> None:
        """Store an extra field (e.g. label histograms, final metrics)."""
        self.record["extra"][key] = _plain(value)

    def write(self, final: bool = False) -> Path:
        self.record["wall_time_s"] = round(time.perf_counter() - self.t0, 3)
        if final:
            self.record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_text(self.path, json.dumps(self.record, indent=1))
        return self.path


def _plain(v: Any) -> Any:
    """Convert numpy scalars/arrays and records to JSON-friendly values."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if hasattr(v, "tolist"):
        return v.tolist()
    if hasattr(v, "items"):
        return {str(k): _plain(x) for k, x in v.items()}
    return v
