"""ServerApp-side helpers: output folders and running a strategy with a results file and
per-round progress."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from flowerbed.common.data import REPO_ROOT
from flowerbed.common.protocol import protocol_grid, round_loop
from flowerbed.common.results import ResultsWriter

INFO = 20


class ClientsFailedError(RuntimeError):
    """Every client call of the first round returned an error: the run cannot make progress
    (e.g. a partition that cannot be drawn, a missing data set on every node)."""


def first_round_failure(row: Mapping[str, Any]) -> str | None:
    """The first error reason when every call of a round failed with an error reply, else None.

    Timeouts and rejected replies do not count (a slow or malicious client is not a broken run),
    nor do injected faults (``fault-mode``: failing every call is then deliberate).
    """
    phases = row.get("phases") or {}
    calls = [ph for ph in phases.values() if ph.get("num_sent", 0) > 0]
    if not calls or any(ph.get("num_failures", 0) < ph["num_sent"] for ph in calls):
        return None  # at least one valid reply
    reasons = [r for ph in calls for r in ph.get("failure_reasons", [])]
    if not reasons:
        return None
    causes = [r.split(": ", 1)[-1] for r in reasons]  # drop the "node <id>: " prefix
    if not all(c.startswith("error ") for c in causes) or any("InjectedFault" in c for c in causes):
        return None
    return causes[0][len("error ") :]


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
    """Run ``strategy`` on the protocol layer, writing ``results.json`` after every round.

    Works for every strategy: Flower's and flowerbed's one-exchange strategies, phased ones
    (:class:`~flowerbed.common.protocol.PhasedStrategy`) and a
    :class:`~flowerbed.common.checkpoint.Checkpointed` wrapper around either. Per round the file
    gets the round's wall time, the protocol's row (bytes sent / received, per phase: messages,
    replies, failures with reasons, bytes, seconds), the strategy's ``history`` row when it has
    one (rejections, method-specific values), the server-side evaluation (``server_*``) and the
    aggregated client metrics (``train_*``, ``client_*``); ``totals`` holds the run's bytes.

    Raises
    ------
    ClientsFailedError
        When every call of round 1 came back as an error (see :func:`first_round_failure`):
        the run stops there, with the reason in ``results.json`` (``extra.aborted``), instead of
        running every remaining round on the initial model.
    """
    from flowerbed.common.checkpoint import Checkpointed

    pgrid = protocol_grid(grid, timeout)
    protocol = pgrid.protocol
    t_last = [time.perf_counter()]
    t_eval = [0.0]

    def timed_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        t0 = time.perf_counter()
        res = evaluate_fn(server_round, arrays) if evaluate_fn else None
        t_eval[0] = time.perf_counter() - t0
        return res

    def after_round(server_round: int, arrays: ArrayRecord, result: Result) -> None:
        now = time.perf_counter()
        row: dict[str, Any] = {
            "round_time_s": round(now - t_last[0], 4),
            "eval_time_s": round(t_eval[0], 4),  # the server-side evaluation of this round
            "t_end": round(time.time(), 3),  # wall clock, to line rounds up with client logs
        }
        t_last[0] = now
        if server_round in protocol.rounds:
            row.update(protocol.rounds[server_round])
        history = getattr(strategy, "history", {})
        if server_round in history:
            row.update(history[server_round])
        for prefix, metrics in (
            ("server_", result.evaluate_metrics_serverapp),
            ("train_", result.train_metrics_clientapp),
            ("client_", result.evaluate_metrics_clientapp),
        ):
            row.update({f"{prefix}{k}": v for k, v in metrics.get(server_round, {}).items()})
        writer.add_round(server_round, **row)
        if server_round == 1 and (why := first_round_failure(row)) is not None:
            msg = f"every client call of round 1 failed, stopping: {why}"
            writer.set("aborted", msg)
            writer.set("totals", protocol.totals())
            writer.write(final=True)
            raise ClientsFailedError(msg)
        shown = ", ".join(
            f"{k}={v:.4f}"
            for k, v in result.evaluate_metrics_serverapp.get(server_round, {}).items()
            if isinstance(v, int | float)
        )
        log(
            INFO,
            "[flowerbed] round %d/%d %s (%.2f s)",
            server_round,
            num_rounds,
            shown,
            row["round_time_s"],
        )

    evaluate = timed_evaluate if evaluate_fn else None
    args = (initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate)
    if isinstance(strategy, Checkpointed):
        result = strategy.start(pgrid, *args, after_round=after_round)
    else:
        result = round_loop(strategy, pgrid, *args, after_round=after_round)
    writer.set("totals", protocol.totals())
    writer.write(final=True)
    return result


def run_method(
    strategy: Strategy,
    grid: Grid,
    cfg: Mapping[str, Any],
    writer: ResultsWriter,
    initial_arrays: ArrayRecord,
    evaluate_fn: Callable[[int, ArrayRecord], Mapping[str, Any] | None] | None = None,
    num_rounds: int | None = None,
) -> Result:
    """:func:`run_strategy` with the run config's schedule: ``num-server-rounds`` rounds (or
    ``num_rounds``, e.g. 1 for a one-shot method), ``round-timeout``; ``evaluate_fn(round,
    arrays)`` may return a plain dict of metrics."""

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        res = evaluate_fn(server_round, arrays)
        return None if res is None else MetricRecord(dict(res))

    return run_strategy(
        strategy,
        grid,
        initial_arrays,
        num_rounds or int(cfg["num-server-rounds"]),
        writer,
        train_config=ConfigRecord({}),
        evaluate_fn=evaluate if evaluate_fn is not None else None,
        timeout=float(cfg["round-timeout"]),
    )


def with_options(strategy: Strategy, cfg: Mapping[str, Any], writer: ResultsWriter, num_nodes: int):
    """``strategy`` with the shared run-config options applied, in this order:

    - central DP (``dp-noise-multiplier`` > 0, apps that declare it):
      :class:`~flowerbed.strategies.dpfedavg.DPFedAvg` around it, calibrated on the number of
      clients sampled per round;
    - checkpoint / resume (``checkpoint``, ``resume``):
      :class:`~flowerbed.common.checkpoint.Checkpointed` around that, writing into the run's
      folder; on resume the rows of ``results.json`` up to the checkpoint are kept.
    """
    if cfg.get("dp-noise-multiplier", 0.0) > 0:
        from flowerbed.strategies.dpfedavg import DPFedAvg

        fraction = float(cfg.get("fraction-train", 1.0))
        sampled = min(max(int(num_nodes * fraction), 1), num_nodes)
        strategy = DPFedAvg(
            strategy,
            noise_multiplier=cfg["dp-noise-multiplier"],
            clipping_norm=cfg["dp-clipping-norm"],
            num_sampled_clients=sampled,
            population_size=num_nodes,
            delta=cfg["dp-delta"],
        )
    if cfg.get("checkpoint") or cfg.get("resume"):
        from flowerbed.common.checkpoint import Checkpointed

        previous = []
        if cfg.get("resume") and writer.path.exists():
            previous = json.loads(writer.path.read_text()).get("rounds", [])

        def on_resume(done: int) -> None:
            writer.record["rounds"] = [r for r in previous if r["round"] <= done]
            writer.set("resumed_from_round", done)

        strategy = Checkpointed(strategy, writer.out_dir, resume=cfg["resume"], on_resume=on_resume)
    return strategy


def finish(
    writer: ResultsWriter,
    final: Mapping[str, Any],
    label: str,
    headline: str,
    strategy: Strategy | None = None,
) -> Path:
    """Write ``final`` (the metrics the runner's tables read) and print the run's last line.

    With ``strategy``: the DP epsilon (when a strategy of the chain reports one) goes into
    ``final`` and the failed calls (errors, timeouts, rejections) into ``totals``.
    """
    final = dict(final)
    if strategy is not None:
        from flowerbed.common.checkpoint import strategy_chain

        for s in strategy_chain(strategy):
            if hasattr(s, "epsilon"):
                final["dp_epsilon"] = s.epsilon()
                break
        history = getattr(strategy, "history", {})
        totals = writer.record["extra"].get("totals", {})
        totals["num_failed_calls"] = sum(
            r.get("num_failures", 0) + r.get("num_timeouts", 0) + r.get("num_rejected", 0)
            for r in history.values()
        )
        writer.set("totals", totals)
    writer.set("final", final)
    path = writer.write(final=True)
    value = final.get(headline, float("nan"))
    print(f"[flowerbed] {label}: final {headline} {value:.4f} -> {path}", flush=True)
    return path
