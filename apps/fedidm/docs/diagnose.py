"""FedIDM diagnosis on one fixed setting (README "Diagnosis"): Fashion-MNIST, 20 clients,
Dirichlet 0.5, 30 % malicious (first 6 partitions), seed 0, a few rounds; for each variant of
FedIDM's Reconstruction options and each attack: final accuracy, detection precision / recall,
and the per-round cosine to g_0 and loss rise of benign vs malicious clients.

    .venv/bin/python apps/fedidm/docs/diagnose.py NAME ATTACK [key=value ...]

writes outputs/fedidm_diag/NAME-ATTACK/results.json and prints one summary line;
``--table`` prints the table of every run under outputs/fedidm_diag.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path("outputs/fedidm_diag")
BASE = {"num-server-rounds": 8, "seed": 0, "attack-fraction": 0.3}


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v, v)


def summarise(rec: dict) -> dict:
    """Accuracy, detection, and the benign / malicious cosine and rise (means over rounds)."""
    rows = [r for r in rec["rounds"] if r["round"] > 0 and "cos" in r]
    out = {"acc": rec["extra"]["final"]["accuracy"]}
    for k in ("detect_precision", "detect_recall"):
        out[k] = rec["extra"]["final"].get(k, float("nan"))
    for key in ("cos", "rise"):
        ben, mal = [], []
        for r in rows:
            bad = {str(n) for n in r.get("malicious_nodes", [])}
            for n, v in r[key].items():
                (mal if n in bad else ben).append(v)
        out[f"{key}_benign"] = float(np.mean(ben)) if ben else float("nan")
        out[f"{key}_mal"] = float(np.mean(mal)) if mal else float("nan")
    out["benign_rejected"] = int(
        sum(len(set(r["rejected_nodes"]) - set(r.get("malicious_nodes", []))) for r in rows)
    )
    return out


def table() -> None:
    print(
        "| run | options | commit | acc | precision | recall | benign rejected (sum over rounds) | cos benign | cos mal "
        "| rise benign | rise mal |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for f in sorted(ROOT.glob("*/results.json")):
        rec = json.loads(f.read_text())
        if "final" not in rec["extra"]:  # still running
            continue
        s = summarise(rec)
        cfg = {k: rec["config"].get(k) for k in ("mad-c", "rectify", "finetune")}
        print(
            f"| {f.parent.name} | {cfg} | {rec['git_commit'][:7]} | {s['acc']:.4f} | {s['detect_precision']:.3f} "
            f"| {s['detect_recall']:.3f} | {s['benign_rejected']} | {s['cos_benign']:.3f} "
            f"| {s['cos_mal']:.3f} | {s['rise_benign']:.4f} | {s['rise_mal']:.4f} |"
        )


def main(argv: list[str]) -> None:
    if argv[:1] == ["--table"]:
        table()
        return
    from flowerbed.simulation.local import run_local

    name, attack, *kv = argv
    over = {**BASE, "attack": attack, **{k: _value(v) for k, v in (a.split("=", 1) for a in kv)}}
    out = ROOT / f"{name}-{attack}"
    run_local("fedidm", {**over, "results-dir": str(out.resolve())}, num_supernodes=20)
    s = summarise(json.loads((out / "results.json").read_text()))
    print(name, attack, json.dumps({k: round(v, 4) for k, v in s.items()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
