"""ServerApp-side helpers: output folders, centralized evaluation, running a strategy with a
results file and per-round progress."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flowerbed.common.data import REPO_ROOT
from flowerbed.common.results import ResultsWriter

INFO = 20


def output_dir(setting: str, app: str) -> Path:
    """Resolve the run's output folder.

    An absolute ``setting`` is used as is. A relative one (or empty) is placed under
    ``$FLOWERBED_OUTPUTS`` if set, else ``<repo>/outputs`` when flowerbed runs from a checkout,
    else ``./outputs``; empty means ``<app>/<timestamp>``.
    """
    if setting and Path(setting).is_absolute():
        return Path(setting)
    base = os.environ.get("FLOWERBED_OUTPUTS")
    if base:
        root = Path(base)
    elif (REPO_ROOT / "pyproject.toml").exists():
        root = REPO_ROOT / "outputs"
    else:
        root = Path.cwd() / "outputs"
    return root / (setting or f"{app}/{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


class _PollingGrid:
    """A deployment Grid whose ``send_and_receive`` polls for replies every ``interval`` s.

    Flower's ``HttpGrid.send_and_receive`` (the ServerApp's Grid in a deployment) sleeps 3 s
    between two pulls of replies, so a round ends up to 3 s after its last reply arrived. This
    does the same push and pull through the Grid's public ``push_messages`` /
    ``pull_messages``, with a shorter sleep; everything else is the wrapped Grid's.

    A reply can be listed by the SuperLink before all its arrays have arrived there; Flower's
    ``HttpGrid`` then retries after 1 s, 2 s, ... (at most 10 s). The first wrap binds shorter
    backoff arguments (50 ms doubling to at most 0.5 s) to ``pull_objects`` in
    ``flwr.superlink.grid.http_grid``, in this (ServerApp) process only; the calls are the same.
    """

    def __init__(self, grid: Grid, interval: float = 0.1):
        self._grid, self._interval = grid, interval
        import functools

        http = sys.modules["flwr.superlink.grid.http_grid"]
        if not isinstance(http.pull_objects, functools.partial):
            http.pull_objects = functools.partial(
                http.pull_objects, initial_backoff=0.05, backoff_cap=0.5
            )

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None):
        pending = set(self._grid.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list = []
        while timeout is None or time.time() < end:
            got = list(self._grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending:
                break
            time.sleep(self._interval)
        return replies


def polling_grid(grid: Grid, interval: float = 0.1) -> Grid:
    """``grid`` wrapped in :class:`_PollingGrid` if it is Flower's ``HttpGrid``, else itself."""
    http = sys.modules.get("flwr.superlink.grid.http_grid")
    if http is not None and isinstance(grid, getattr(http, "HttpGrid", ())):
        return _PollingGrid(grid, interval)  # type: ignore[return-value]
    return grid


def run_strategy(
    strategy: Strategy,
    grid: Grid,
    initial_arrays: ArrayRecord,
    num_rounds: int,
    writer: ResultsWriter,
    train_config: ConfigRecord | None = None,
    evaluate_config: ConfigRecord | None = None,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    timeout: float = 3600,
) -> Result:
    """``strategy.start(...)`` that writes ``results.json`` after every round and logs progress.

    Per round the file gets: the server-side evaluation metrics, the strategy's ``history`` row
    (bytes sent/received, failures) when it has one, and the round's wall time. Client-side
    train/evaluate metrics are merged in at the end.
    """
    t_last = [time.perf_counter()]
    # Flower's in-memory Grid (simulation) polls for replies every 0.1 s; with rounds of a few
    # seconds that is a visible share of the round. Poll every 10 ms instead.
    if hasattr(grid, "pull_interval"):
        grid.pull_interval = min(grid.pull_interval, 0.01)
    grid = polling_grid(grid)

    def _eval(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        t_eval = time.perf_counter()
        res = evaluate_fn(server_round, arrays) if evaluate_fn else None
        now = time.perf_counter()
        row: dict[str, Any] = {
            "round_time_s": round(now - t_last[0], 4),
            "eval_time_s": round(now - t_eval, 4),
            "t_end": round(time.time(), 3),  # wall clock, to line rounds up with client logs
        }
        t_last[0] = now
        history = getattr(strategy, "history", {})
        if server_round in history:
            row.update(history[server_round])
        if res is not None:
            row.update({f"server_{k}": v for k, v in res.items()})
        writer.add_round(server_round, **row)
        shown = ", ".join(
            f"{k}={v:.4f}" for k, v in (res or {}).items() if isinstance(v, int | float)
        )
        log(
            INFO,
            "[flowerbed] round %d/%d %s (%.2f s)",
            server_round,
            num_rounds,
            shown,
            row["round_time_s"],
        )
        return res

    result = strategy.start(
        grid=grid,
        initial_arrays=initial_arrays,
        num_rounds=num_rounds,
        timeout=timeout,
        train_config=train_config,
        evaluate_config=evaluate_config,
        evaluate_fn=_eval,
    )
    for rnd, m in result.train_metrics_clientapp.items():
        writer.add_round(rnd, **{f"train_{k}": v for k, v in m.items()})
    for rnd, m in result.evaluate_metrics_clientapp.items():
        writer.add_round(rnd, **{f"client_{k}": v for k, v in m.items()})
    history = getattr(strategy, "history", {})
    for rnd, row in history.items():  # rounds whose evaluation was skipped
        writer.add_round(rnd, **row)
    totals = {
        "bytes_sent": sum(r.get("bytes_sent", 0) for r in history.values()),
        "bytes_received": sum(r.get("bytes_received", 0) for r in history.values()),
    }
    writer.set("totals", totals)
    writer.write(final=True)
    return result
