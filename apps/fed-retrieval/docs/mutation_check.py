"""Mutation check: each change below breaks one formula or switch of the app; the default
tests must fail on every one. The file is restored after each mutation.

    .venv/bin/python apps/fed-retrieval/docs/mutation_check.py
"""

import subprocess
import sys
from pathlib import Path

APP = Path(__file__).resolve().parents[1]
PKG = APP / "fedretrieval"
UNITS = str(APP / "tests" / "test_units.py")
APPT = str(APP / "tests" / "test_app.py")

MUTATIONS = [
    ("hinge sign flipped", "model.py", "F.relu(margin - (c * e)", "F.relu(margin + (c * e)", UNITS),
    ("hinge not squared", "model.py", ".pow(2).mean()", ".mean()", UNITS),
    (
        "batch softmax summed, not averaged",
        "model.py",
        "return F.cross_entropy(s, torch.arange(len(c), device=c.device))",
        "return F.cross_entropy(s, torch.arange(len(c), device=c.device), reduction='sum')",
        UNITS,
    ),
    (
        "global softmax label off by one",
        "model.py",
        "/ temperature, labels - 1)",
        "/ temperature, labels)",
        UNITS,
    ),
    (
        "spreadout keeps the diagonal",
        "model.py",
        "off = m * (1.0 - torch.eye",
        "off = m * (1.0 + 0 * torch.eye",
        UNITS,
    ),
    ("cross spreadout dropped", "model.py", " + spreadout(c @ e.T))", ")", UNITS),
    (
        "spreadout lambda 0.01",
        "model.py",
        "SPREADOUT_LAMBDA = 0.001",
        "SPREADOUT_LAMBDA = 0.01",
        UNITS,
    ),
    (
        "ties counted for the label",
        "model.py",
        "out.append((s >= true).sum(1))",
        "out.append(1 + (s > true).sum(1))",
        UNITS,
    ),
    ("padding not masked", "model.py", "mask = (context > 0)", "mask = (context >= 0)", UNITS),
    (
        "context window off by one",
        "data.py",
        "prev = items[max(0, j - max_context) : j]",
        "prev = items[max(0, j - max_context) : j + 1]",
        UNITS,
    ),
    (
        "timeline not sorted by time",
        "data.py",
        "np.lexsort((ratings.item, ratings.time, ratings.user))",
        "np.lexsort((ratings.time, ratings.item, ratings.user))",
        UNITS,
    ),
    (
        "client mean not weighted by examples",
        "task.py",
        ".double() * w",
        ".double() * 1",
        APPT + "::test_client_step_is_the_example_weighted_mean_of_its_users",
    ),
    (
        "IID switch ignored",
        "task.py",
        'bool(cfg.method.flag("iid", False))',
        "False",
        APPT + "::test_iid_control_trains_on_shuffled_examples",
    ),
    (
        "batch softmax temperature multiplied",
        "model.py",
        "s = (c @ e.T) / temperature",
        "s = (c @ e.T) * temperature",
        UNITS,
    ),
    (
        "global softmax temperature dropped",
        "model.py",
        "F.cross_entropy((c @ table.T) / temperature, labels - 1)",
        "F.cross_entropy((c @ table.T), labels - 1)",
        UNITS,
    ),
    (
        "temperature not passed to the batch-softmax loss",
        "model.py",
        "    return batch_softmax(c, e, opts.temperature)\n",
        "    return batch_softmax(c, e)\n",
        UNITS,
    ),
    (
        "table spreadout dropped from the hinge loss",
        "model.py",
        "out = out + table_spreadout(model, opts.table_spreadout_lambda)",
        "out = out",
        UNITS,
    ),
    (
        "table spreadout keeps the diagonal",
        "model.py",
        "return lam * (full - diag)",
        "return lam * (full - 0 * diag)",
        UNITS,
    ),
    (
        "run-config temperature ignored",
        "task.py",
        'cfg["temperature"]',
        "1.0",
        APPT + "::test_loss_options_come_from_the_run_config",
    ),
]


def main() -> int:
    missed = []
    for name, fname, old, new, target in MUTATIONS:
        path = PKG / fname
        text = path.read_text()
        assert text.count(old) >= 1, f"{name}: pattern not found in {fname}"
        path.write_text(text.replace(old, new, 1))
        try:
            p = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", target],
                capture_output=True,
                text=True,
            )
        finally:
            path.write_text(text)
        caught = p.returncode != 0
        print(f"{'caught' if caught else 'MISSED'}: {name}", flush=True)
        if not caught:
            missed.append(name)
    print(f"{len(MUTATIONS) - len(missed)}/{len(MUTATIONS)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
