"""The README table from a folder of FedDistr/baseline runs: ``python -m feddistr.report DIR``.

Collects every ``results.json`` below ``DIR`` (e.g. the sweep folders of ``flowerbed-run -m``),
groups them by partition and method, and prints a Markdown table of test accuracy (mean +/- std
over seeds) and total bytes communicated: FedDistr (one round), FedAvg / FedProx after 1, 10 and
50 rounds (read from the per-round record of one 50-round run; a run still in progress counts
for the rounds it has reached) and centralized training. ``n`` is the number of seeds per cell.
It also writes ``DIR/feddistr_table.md``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

COLUMNS = [  # (header, method, accuracy key, bytes key)
    ("FedDistr (1 round)", "feddistr", "accuracy", "bytes_total"),
    ("FedAvg @1", "fedavg", "accuracy_r1", "bytes_total_r1"),
    ("FedAvg @10", "fedavg", "accuracy_r10", "bytes_total_r10"),
    ("FedAvg @50", "fedavg", "accuracy_r50", "bytes_total_r50"),
    ("FedAvg @last round reached", "fedavg", "accuracy_last", "bytes_total_last"),
    ("FedProx @50", "fedprox", "accuracy_r50", "bytes_total_r50"),
    ("Centralized", "centralized", "accuracy", "bytes_total"),
]
PARTITIONS = ("disentangled", "near", "entangled")


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0
    return f"{m:.3f} ± {sd:.3f}"


def _bytes(values: list[float]) -> str:
    if not values:
        return "-"
    m = sum(values) / len(values)
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if m >= f:
            return f"{m / f:.3g} {unit}"
    return f"{m:.0f} B"


def per_round(rec: dict) -> dict:
    """``accuracy_r<R>`` / ``bytes_total_r<R>`` (R = 1, 10, 50) from a FedAvg/FedProx run's
    per-round record (also for a run still in progress: rounds not reached are absent)."""
    out, cum = {}, 0
    for row in sorted(rec.get("rounds", []), key=lambda r: r["round"]):
        if row["round"] < 1:
            continue
        cum += row.get("bytes_sent", 0) + row.get("bytes_received", 0)
        if "server_accuracy" in row:
            out["accuracy_last"], out["bytes_total_last"] = row["server_accuracy"], cum
            out["round_last"] = row["round"]
            if row["round"] in (1, 10, 50):
                out[f"accuracy_r{row['round']}"] = row["server_accuracy"]
                out[f"bytes_total_r{row['round']}"] = cum
    return out


def table(folder: str | Path) -> str:
    runs = defaultdict(list)
    for p in sorted(Path(folder).rglob("results.json")):
        rec = json.loads(p.read_text())
        if rec.get("app") != "feddistr":
            continue
        c = rec["config"]
        if c["method"] in ("fedavg", "fedprox"):
            runs[(c["partition"], c["method"])].append(per_round(rec))
        elif "final" in rec.get("extra", {}):
            runs[(c["partition"], c["method"])].append(rec["extra"]["final"])
    cols = [col for col in COLUMNS if any(m == col[1] for _, m in runs)]
    lines = [
        "| partition | " + " | ".join(h for h, *_ in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for part in PARTITIONS:
        if not any(p == part for p, _ in runs):
            continue
        accs, byts = [], []
        for _, method, ak, bk in cols:
            finals = [f for f in runs.get((part, method), []) if ak in f]
            note = f" (n={len(finals)})" if finals else ""
            if ak == "accuracy_last" and finals:
                note = (
                    f" (n={len(finals)}, round {', '.join(str(f['round_last']) for f in finals)})"
                )
            accs.append(_ms([f[ak] for f in finals]) + note)
            byts.append(_bytes([f[bk] for f in finals]))
        lines.append(f"| {part}: accuracy | " + " | ".join(accs) + " |")
        lines.append(f"| {part}: bytes | " + " | ".join(byts) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    args = ap.parse_args(argv)
    text = table(args.folder)
    (Path(args.folder) / "feddistr_table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
