"""The FL-LLaMA results table: split training vs centralized LoRA, the sigma sweep and the bytes
per step with and without mask compression, from the ``results.json`` files of the runs.

    python -m flllama.report outputs/fl-llama-table          # -> table.md + loss.png there

Every run under the folder (any depth) is one row: its method, sigma, mask compression, the
server-side evaluation (target loss and topic accuracy on the test examples) after the last
round, the ratio of that loss to the centralized run's with the same schedule (model, split,
steps, batch, lr, seed), and the bytes per split step of round 1 (the same batches in every run
of one schedule, so runs with fewer rounds compare on round 1).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SCHEDULE = ("model", "split-a", "split-c", "sync-steps", "batch-size", "lr", "max-chars", "seed")


def load_runs(folder: str | Path) -> list[dict]:
    """Every ``results.json`` under ``folder``, sorted by path."""
    return [json.loads(p.read_text()) for p in sorted(Path(folder).rglob("results.json"))]


def is_split(name: str) -> bool:
    """A split-training method (flag ``split`` of the method table); the others are the
    centralized reference."""
    from flllama.methods import METHODS

    return bool(METHODS[name].flag("split"))


def _key(cfg: dict) -> tuple:
    return tuple(cfg.get(k) for k in SCHEDULE)


def rows(runs: list[dict]) -> list[dict]:
    """One row per run: configuration, final evaluation, loss ratio to centralized, bytes."""
    central = {}
    for r in runs:
        if not is_split(r["config"]["method"]):
            central[(_key(r["config"]), r["config"]["num-server-rounds"])] = r
    out = []
    for r in runs:
        cfg, rounds = r["config"], r["rounds"]
        last = rounds[-1]
        ref = central.get((_key(cfg), cfg["num-server-rounds"]))
        first = next((x for x in rounds if x["round"] == 1), {})
        split = is_split(cfg["method"])
        out.append(
            {
                "method": cfg["method"],
                "sigma": cfg["sigma"] if split else None,
                "mask-compression": cfg["mask-compression"] if split else None,
                "rounds": cfg["num-server-rounds"],
                "steps": cfg["num-server-rounds"] * cfg["sync-steps"],
                "loss": last.get("server_loss"),
                "accuracy": last.get("server_accuracy"),
                "loss_round0": rounds[0].get("server_loss"),
                "ratio": (last["server_loss"] / ref["rounds"][-1]["server_loss"]) if ref else None,
                "bytes_per_step": first.get("bytes_per_step") if split else None,
                "commit": r.get("git_commit", "")[:7],
                "wall_s": r.get("wall_time_s"),
            }
        )
    # centralized first, then the split runs with compression by sigma, then without
    return sorted(
        out,
        key=lambda r: (
            is_split(r["method"]),
            r["mask-compression"] is False,
            r["sigma"] or 0,
        ),
    )


def _fmt(v, spec: str = ".4f") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "on" if v else "off"
    return format(v, spec) if isinstance(v, float) else str(v)


def markdown(table: list[dict]) -> str:
    """The rows as a Markdown table (loss ratio = split loss / centralized loss)."""
    head = (
        "| method | sigma | mask compression | rounds x steps | eval loss (start -> end) "
        "| topic accuracy | loss / centralized | bytes per step (round 1) | wall s | commit |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['method']} | {_fmt(r['sigma'], 'g')} | {_fmt(r['mask-compression'])} "
        f"| {r['rounds']} x {r['steps'] // r['rounds']} "
        f"| {_fmt(r['loss_round0'])} -> {_fmt(r['loss'])} | {_fmt(r['accuracy'])} "
        f"| {_fmt(r['ratio'])} | {_fmt(r['bytes_per_step'], ',.0f')} | {_fmt(r['wall_s'], '.0f')} "
        f"| {r['commit']} |"
        for r in table
    ]
    return head + "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    """Server-side evaluation loss against round, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        cfg = r["config"]
        label = cfg["method"]
        if is_split(cfg["method"]):
            label += f" sigma={cfg['sigma']:g}" + ("" if cfg["mask-compression"] else " no-compr.")
        xs = [x["round"] for x in r["rounds"] if "server_loss" in x]
        ax.plot(xs, [x["server_loss"] for x in r["rounds"] if "server_loss" in x], label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("eval loss (target tokens)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    args = sys.argv[1:] if argv is None else argv
    folder = Path(args[0] if args else "outputs/fl-llama-table")
    runs = load_runs(folder)
    if not runs:
        raise SystemExit(f"no results.json under {folder}")
    text = markdown(rows(runs))
    (folder / "table.md").write_text(text)
    plot(runs, folder / "loss.png")
    print(text + f"-> {folder / 'table.md'}, {folder / 'loss.png'}")
    return text


if __name__ == "__main__":
    main()
