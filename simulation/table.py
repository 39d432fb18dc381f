"""Sweep tables and plots from ``results.json`` files.

::

    python -m flowerbed.simulation.table outputs/multirun/fedavg/<stamp>            # all metrics
    python -m flowerbed.simulation.table <dir> --metrics accuracy --rows alpha --plot server_accuracy

Rows are the run-config keys that differ between the runs (``seed`` and ``results-dir``
excluded) or those given with ``--rows``; each cell is mean +/- std over the seeds of a final
metric (``extra.final`` of each results file; std is the sample std, n-1). ``summary.md`` and
``<metric>.png`` (the per-round metric against round, mean over seeds with a +/- std band) are
written into the folder. A Hydra multirun of ``flowerbed-run`` does this at the end
(:class:`SweepTable`).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

IGNORED = {"seed", "results-dir"}


def collect(folder: str | Path) -> list[dict[str, Any]]:
    """Every ``results.json`` below ``folder`` (sorted by path)."""
    return [json.loads(p.read_text()) for p in sorted(Path(folder).rglob("results.json"))]


def varying_keys(runs: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for r in runs for k in r["config"]} - IGNORED)
    return [k for k in keys if len({json.dumps(r["config"].get(k)) for r in runs}) > 1]


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, sd


def summarize(
    runs: list[dict[str, Any]], rows: list[str] | None = None, metrics: list[str] | None = None
) -> tuple[list[str], list[str], list[tuple[tuple, dict[str, tuple[float, float, int]]]]]:
    """Group runs by ``rows`` keys; mean/std/n over seeds for each final metric."""
    rows = list(rows) if rows else varying_keys(runs)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[tuple(r["config"].get(k) for k in rows)].append(r)
    if not metrics:
        metrics = sorted(
            {
                k
                for r in runs
                for k, v in r["extra"].get("final", {}).items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
    out = []
    for key in sorted(groups, key=lambda t: [str(x) for x in t]):
        cells = {}
        for m in metrics:
            vals = [
                float(r["extra"]["final"][m])
                for r in groups[key]
                if m in r["extra"].get("final", {})
            ]
            if vals:
                cells[m] = (*mean_std(vals), len(vals))
        out.append((key, cells))
    return rows, list(metrics), out


def markdown(rows, metrics, table, digits: int = 4) -> str:
    head = "| " + " | ".join([*rows, *metrics, "seeds"]) + " |"
    sep = "|" + "---|" * (len(rows) + len(metrics) + 1)
    lines = [head, sep]
    for key, cells in table:
        vals = [
            f"{cells[m][0]:.{digits}f} ± {cells[m][1]:.{digits}f}" if m in cells else "–"
            for m in metrics
        ]
        n = max((c[2] for c in cells.values()), default=0)
        lines.append("| " + " | ".join([*map(str, key), *vals, str(n)]) + " |")
    return "\n".join(lines)


def plot(runs, rows: list[str], metric: str, path: Path) -> Path | None:
    """Per-round ``metric`` against round, one line per group (mean over seeds, std band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[tuple(r["config"].get(k) for k in rows)].append(r)
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for key, rs in sorted(groups.items(), key=lambda kv: [str(x) for x in kv[0]]):
        series = [{row["round"]: row[metric] for row in r["rounds"] if metric in row} for r in rs]
        rounds = sorted(set.intersection(*(set(s) for s in series))) if series else []
        if not rounds:
            continue
        stats = [mean_std([s[t] for s in series]) for t in rounds]
        m = [a for a, _ in stats]
        sd = [b for _, b in stats]
        label = ", ".join(f"{k}={v}" for k, v in zip(rows, key, strict=True)) or "run"
        ax.plot(rounds, m, label=label)
        ax.fill_between(rounds, [a - b for a, b in stats], [a + b for a, b in stats], alpha=0.2)
        drawn = drawn or bool(sd)
    if not ax.lines:
        plt.close(fig)
        return None
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render(
    folder: str | Path,
    rows: list[str] | None = None,
    metrics: list[str] | None = None,
    plot_metric: str = "server_accuracy",
) -> str:
    """Write ``summary.md`` (and ``<plot_metric>.png``) into ``folder``; return the table."""
    folder = Path(folder)
    runs = collect(folder)
    if not runs:
        raise FileNotFoundError(f"no results.json below {str(folder)!r}")
    rows_, metrics_, table = summarize(runs, rows, metrics)
    md = markdown(rows_, metrics_, table)
    (folder / "summary.md").write_text(md + "\n")
    png = plot(runs, rows_, plot_metric, folder / f"{plot_metric}.png")
    print(md)
    print(f"[flowerbed] table -> {folder / 'summary.md'}" + (f", plot -> {png}" if png else ""))
    return md


try:  # Hydra callback, used by conf/config.yaml
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[misc,assignment]


class SweepTable(Callback):
    """At the end of a multirun, render the sweep folder's table and plot."""

    def on_multirun_end(self, config, **kwargs) -> None:
        t = config.get("table", {}) or {}
        try:
            render(
                config.hydra.sweep.dir,
                list(t.get("rows", []) or []) or None,
                list(t.get("metrics", []) or []) or None,
            )
        except FileNotFoundError as e:
            print(f"[flowerbed] no table: {e}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--rows", default="", help="comma-separated config keys")
    ap.add_argument("--metrics", default="", help="comma-separated final metrics")
    ap.add_argument("--plot", default="server_accuracy", help="per-round metric to plot")
    a = ap.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x] or None  # noqa: E731
    render(a.folder, split(a.rows), split(a.metrics), a.plot)


if __name__ == "__main__":
    main()
