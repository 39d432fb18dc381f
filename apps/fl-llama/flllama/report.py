"""The FL-LLaMA results table: split training vs centralized LoRA, the sigma sweep and the bytes
per step with and without mask compression, from the ``results.json`` files of the runs.

    python -m flllama.report outputs/fl-llama-table [MORE FOLDERS]   # -> table.md + loss.png there
    python -m flllama.report --gap outputs/fl-llama-gap outputs/fl-llama-table   # -> gap.md
    python -m flllama.report --title outputs/fl-llama-title          # summary -> title: title.md

Every run under the folder (any depth) is one row: its method, sigma, mask compression, the
server-side evaluation (target loss and topic accuracy on the test examples) after the last
round, the ratio of that loss to the centralized run's with the same schedule (model, split,
steps, batch, lr, seed), and the bytes per split step of round 1 (the same batches in every run
of one schedule, so runs with fewer rounds compare on round 1). Runs of further folders are
added (e.g. other seeds' centralized and sigma-0 runs); a second table gives each setting's
mean ± std over its seeds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

SCHEDULE = ("model", "split-a", "split-c", "sync-steps", "batch-size", "lr", "max-chars", "seed")


def load_runs(folder: str | Path) -> list[dict]:
    """Every ``results.json`` under ``folder``, sorted by path."""
    return [json.loads(p.read_text()) for p in sorted(Path(folder).rglob("results.json"))]


def is_split(name: str) -> bool:
    """A split-training method (flag ``split`` of the method table); the others are the
    centralized reference."""
    from flllama.methods import METHODS

    return bool(METHODS[name].flag("split"))


def clients(run: dict) -> int | None:
    """Number of clients of a run: the split rounds' ``train_clients``; for centralized, the
    round-1 examples / (sync-steps x batch-size), i.e. the clients whose batches it pooled."""
    first = next((x for x in run["rounds"] if x["round"] == 1), {})
    if "train_clients" in first:
        return int(first["train_clients"])
    if "train_num-examples" in first:
        cfg = run["config"]
        return int(first["train_num-examples"]) // (cfg["sync-steps"] * cfg["batch-size"])
    return None


def _key(run: dict) -> tuple:
    cfg = run["config"]  # runs before the task option: the topic task
    return (*(cfg.get(k) for k in SCHEDULE), cfg.get("task", "topic"), clients(run))


def rows(runs: list[dict]) -> list[dict]:
    """One row per run: configuration, final evaluation, loss ratio to centralized, bytes."""
    central = {}
    for r in runs:
        if not is_split(r["config"]["method"]):
            central[(_key(r), r["config"]["num-server-rounds"])] = r
    out = []
    for r in runs:
        cfg, rounds = r["config"], r["rounds"]
        last = rounds[-1]
        ref = central.get((_key(r), cfg["num-server-rounds"]))
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
                "seed": cfg.get("seed"),
            }
        )
    # centralized first, then the split runs with compression by sigma, then without
    return sorted(
        out,
        key=lambda r: (
            is_split(r["method"]),
            r["mask-compression"] is False,
            r["sigma"] or 0,
            r["seed"] or 0,
        ),
    )


def seed_summary(table: list[dict]) -> str:
    """Markdown: the rows of :func:`rows` grouped by method, sigma, mask compression and
    rounds, over their seeds: final loss, ratio to centralized (same seed) and topic accuracy as
    mean ± sample std (ddof 1; the value alone for one seed)."""
    groups: dict[tuple, list[dict]] = {}
    for r in table:
        groups.setdefault((r["method"], r["sigma"], r["mask-compression"], r["rounds"]), []).append(
            r
        )
    lines = [
        "| method | sigma | mask compression | rounds | seeds | eval loss | loss / centralized "
        "| topic accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (method, sigma, compr, rounds), rs in groups.items():
        ratios = [r["ratio"] for r in rs if r["ratio"] is not None]
        lines.append(
            f"| {method} | {_fmt(sigma, 'g')} | {_fmt(compr)} | {rounds} "
            f"| {','.join(str(r['seed']) for r in rs)} | {_mean_std([r['loss'] for r in rs])} "
            f"| {_mean_std(ratios) if len(ratios) == len(rs) else '-'} "
            f"| {_mean_std([r['accuracy'] for r in rs])} |"
        )
    return "\n".join(lines) + "\n"


CONTROLS = ("sync-every", "client-lr-scale", "grad-dp-clip", "grad-dp-noise")


def _mean_std(v: list[float]) -> str:
    """``mean ± std`` (sample std, ddof 1) over seeds; the mean alone for one value."""
    if len(v) == 1:
        return f"{v[0]:.4f}"
    return f"{np.mean(v):.4f} ± {np.std(v, ddof=1):.4f}"


def gap_table(runs: list[dict]) -> str:
    """The split/centralized controls: one row per split run without hidden-state noise that
    has a centralized run of the same schedule, seed and number of clients (final evaluation
    loss, ratio), then per control setting (clients, sync-every, client-lr-scale, gradient DP)
    over its seeds: the ratio's mean ± sample standard deviation (ddof 1), min and max, and the
    split and centralized losses and the split accuracy as mean ± std."""
    central = {
        (_key(r), r["config"]["num-server-rounds"]): r
        for r in runs
        if not is_split(r["config"]["method"])
    }
    lines, groups = [], {}
    for r in runs:
        cfg = r["config"]
        ref = central.get((_key(r), cfg["num-server-rounds"]))
        if not is_split(cfg["method"]) or ref is None or cfg.get("sigma", 0) != 0:
            continue
        ctl = (
            clients(r),
            *(cfg.get(k, d) for k, d in zip(CONTROLS, (0, 1.0, 0.0, 0.0), strict=True)),
        )
        loss, cen = r["rounds"][-1]["server_loss"], ref["rounds"][-1]["server_loss"]
        acc = r["rounds"][-1]["server_accuracy"]
        groups.setdefault(ctl, []).append((loss / cen, loss, cen, acc))
        lines.append(
            f"| {ctl[0]} | {ctl[1]} | {ctl[2]:g} | {ctl[3]:g} / {ctl[4]:g} | {cfg['seed']} "
            f"| {loss:.4f} | {cen:.4f} | {loss / cen:.4f} "
            f"| {acc:.4f} | {r.get('git_commit', '')[:7]} |"
        )
    head = (
        "| clients | sync-every | client-lr-scale | grad DP clip / noise | seed | split loss "
        "| centralized loss | ratio | split accuracy | commit |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    summ = (
        "\n| clients | sync-every | client-lr-scale | grad DP clip / noise | seeds "
        "| ratio mean ± std | min | max | split loss | centralized loss | split accuracy |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows_ = []
    for c, v in sorted(groups.items(), key=lambda kv: tuple(map(float, kv[0]))):
        ratio, loss, cen, acc = (list(x) for x in zip(*v, strict=True))
        rows_.append(
            f"| {c[0]} | {c[1]} | {c[2]:g} | {c[3]:g} / {c[4]:g} | {len(v)} | {_mean_std(ratio)} "
            f"| {min(ratio):.4f} | {max(ratio):.4f} | {_mean_std(loss)} | {_mean_std(cen)} "
            f"| {_mean_std(acc)} |"
        )
    return head + "\n".join(lines) + "\n" + summ + "\n".join(rows_) + "\n"


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
        "| topic accuracy | loss / centralized | bytes per step (round 1) | wall s | seed | commit |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['method']} | {_fmt(r['sigma'], 'g')} | {_fmt(r['mask-compression'])} "
        f"| {r['rounds']} x {r['steps'] // r['rounds']} "
        f"| {_fmt(r['loss_round0'])} -> {_fmt(r['loss'])} | {_fmt(r['accuracy'])} "
        f"| {_fmt(r['ratio'])} | {_fmt(r['bytes_per_step'], ',.0f')} | {_fmt(r['wall_s'], '.0f')} "
        f"| {r['seed']} | {r['commit']} |"
        for r in table
    ]
    return head + "\n".join(lines) + "\n"


def title_table(runs: list[dict]) -> str:
    """Summary -> title runs (task ``title``): per run the evaluation loss (title tokens, round 0
    -> last), exact match and token F1 of the greedy titles after the last round, and the loss
    ratio to the centralized run of the same schedule and seed; centralized first."""
    runs = [r for r in runs if r["config"].get("task") == "title"]
    central = {_key(r): r for r in runs if not is_split(r["config"]["method"])}
    lines = [
        "| method | rounds x steps | eval loss (start -> end) | exact match | token F1 "
        "| loss / centralized | wall s | seed | commit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (is_split(r["config"]["method"]), r["config"]["seed"])):
        cfg, first, last = r["config"], r["rounds"][0], r["rounds"][-1]
        ref = central.get(_key(r))
        ratio = last["server_loss"] / ref["rounds"][-1]["server_loss"] if ref else None
        lines.append(
            f"| {cfg['method']} | {cfg['num-server-rounds']} x {cfg['sync-steps']} "
            f"| {first['server_loss']:.4f} -> {last['server_loss']:.4f} "
            f"| {last['server_exact_match']:.4f} | {last['server_token_f1']:.4f} "
            f"| {_fmt(ratio)} | {_fmt(r.get('wall_time_s'), '.0f')} | {cfg['seed']} "
            f"| {r.get('git_commit', '')[:7]} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    """Server-side evaluation loss against round, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        cfg = r["config"]
        label = f"{cfg['method']} s{cfg.get('seed')}"
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
    gap, title = "--gap" in args, "--title" in args
    args = [a for a in args if a not in ("--gap", "--title")]
    folder = Path(args[0] if args else "outputs/fl-llama-table")
    runs = [r for f in args[1:] for r in load_runs(f)] + load_runs(folder)
    if not runs:
        raise SystemExit(f"no results.json under {folder}")
    if gap:  # python -m flllama.report --gap FOLDER [MORE FOLDERS]: table into FOLDER/gap.md
        text = gap_table(runs)
        (folder / "gap.md").write_text(text)
        print(text + f"-> {folder / 'gap.md'}")
        return text
    if title:  # python -m flllama.report --title FOLDER: the title task into FOLDER/title.md
        text = title_table(runs)
        (folder / "title.md").write_text(text)
        print(text + f"-> {folder / 'title.md'}")
        return text
    runs = [r for r in runs if r["config"].get("task", "topic") == "topic"]
    table = rows(runs)
    text = markdown(table) + "\n" + seed_summary(table)
    (folder / "table.md").write_text(text)
    plot(runs, folder / "loss.png")
    print(text + f"-> {folder / 'table.md'}, {folder / 'loss.png'}")
    return text


if __name__ == "__main__":
    main()
