"""The README's detection table (issue #15: "detection precision and recall for FedIDM and
FLTrust"): per method, malicious fraction and attack, from every ``results.json`` below the
given folders (Dirichlet alpha and number of rounds as found; runs without attack skipped):

- ``precision`` / ``recall``: mean ± std over seeds of ``final.detect_precision`` /
  ``final.detect_recall`` (each the mean over the rounds of one run; a round that rejects no
  one counts as precision 1.0, the convention of :func:`flowerbed.common.attacks.detection`);
- ``pooled``: the counts of :func:`fedidm.task.detection_counts` summed over rounds and seeds,
  precision tp / (tp + fp) and recall tp / (tp + fn) of all rejections together;
- ``benign rejected``: fp / benign updates (share of the benign updates thrown away).

    .venv/bin/python apps/fedidm/docs/detection_table.py FOLDER [FOLDER ...]

Reads only; runs nothing. A (method, fraction, attack, alpha, rounds, seed) cell found twice is
counted once (the later path) and named on stderr.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedidm.experiments import detection_row as row  # noqa: E402

from flowerbed.simulation.table import collect  # noqa: E402


def runs(folders: list[str]) -> dict[tuple, dict]:
    """(method, fraction, attack, alpha, rounds) -> seed -> results of the detecting runs."""
    out: dict[tuple, dict] = defaultdict(dict)
    for folder in folders:
        for r in collect(folder):
            c, final = r["config"], r["extra"].get("final", {})
            if c.get("attack", "none") == "none" or "detect_precision" not in final:
                continue
            key = (c["method"], c["attack-fraction"], c["attack"], c["alpha"])
            key += (c["num-server-rounds"],)
            if c["seed"] in out[key]:
                print(f"duplicate {key} seed {c['seed']}: later one kept", file=sys.stderr)
            out[key][c["seed"]] = r
    return out


def table(folders: list[str]) -> list[str]:
    out = [
        "| method | fraction | attack | alpha | precision (mean of rounds) | recall (mean of rounds)"
        " | pooled precision | pooled recall | tp / fp / fn | benign rejected | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    found = runs(folders)
    for key in sorted(found, key=lambda k: (k[0], k[1], k[3], k[2], k[4])):
        method, fraction, attack, alpha, rounds = key
        d = row(found[key])
        (p, ps), (q, qs) = d["precision"], d["recall"]
        out.append(
            f"| {method} | {fraction:.0%} | {attack} | {alpha} | {p:.3f} ± {ps:.3f} | "
            f"{q:.3f} ± {qs:.3f} | {d['pooled_precision']:.3f} | {d['pooled_recall']:.3f} | "
            f"{d['tp']} / {d['fp']} / {d['fn']} | {d['benign_rejected']:.3f} | "
            f"{','.join(map(str, d['seeds']))}"
            + (f" ({rounds} rounds)" if rounds != 10 else "")
            + " |"
        )
    return out


if __name__ == "__main__":
    print("\n".join(table(sys.argv[1:])))
