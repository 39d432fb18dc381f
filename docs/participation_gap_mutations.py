"""Mutation check of the participation-gap code (a dev tool): a copy of ``common/`` and of the
analysis script in a flowerbed shim at /tmp/pgshim (``strategies`` and ``simulation``
symlinked to this worktree); each mutation is applied to the copy, the copy of
``tests/test_participation.py`` run, the file restored. A mutation is "caught" when the test
file fails. The worktree itself is never changed (runs may be going on beside it).

    /work/bin/cpu-slot .venv/bin/python docs/participation_gap_mutations.py
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
SHIM = pathlib.Path("/tmp/pgshim")
PKG = SHIM / "flowerbed"
TEST = SHIM / "tests" / "test_participation.py"
PART = "flowerbed/common/participation.py"
TRAIN = "flowerbed/common/train.py"
DOCS = "docs/participation_gap_clients.py"
M = [
    # (name, file, old, new)
    ("weighted mean: / sum(n) -> / clients", PART, "/ w.sum())", "/ len(w))"),
    (
        "weighted participation gap sign",
        PART,
        'wmeans["part-val"] - wmeans["unpart"]',
        'wmeans["unpart"] - wmeans["part-val"]',
    ),
    (
        "weighted out-of-sample gap sign",
        PART,
        'wmeans["part-train"] - wmeans["part-val"]',
        'wmeans["part-val"] - wmeans["part-train"]',
    ),
    ("label entropy in nats", PART, "np.log2(p)", "np.log(p)"),
    (
        "label counts not checked against n",
        PART,
        "if n is not None and sum(counts) != n:",
        "if False:",
    ),
    ("class hits not bounded by counts", PART, "0 <= h <= c for", "0 <= h for"),
    (
        "partition id not from the server's map",
        PART,
        "pid = self._pids.get(msg.metadata.src_node_id, -1)",
        "pid = -1",
    ),
    (
        "split size = client total",
        PART,
        'out[f"{name}-num-examples"] = n_part',
        'out[f"{name}-num-examples"] = total',
    ),
    (
        "class-correct counts every example",
        TRAIN,
        "torch.bincount(yb[hit].long().cpu()",
        "torch.bincount(yb.long().cpu()",
    ),
    (
        "analysis: residual = gap + label mix",
        DOCS,
        '"residual": gap - mix',
        '"residual": gap + mix',
    ),
    (
        "analysis: label-mix sign",
        DOCS,
        "mix = e[~is_unpart].mean() - e[is_unpart].mean()",
        "mix = e[is_unpart].mean() - e[~is_unpart].mean()",
    ),
    (
        "analysis: permutation p one-sided the wrong way",
        DOCS,
        "(np.abs(perm) >= abs(gap) - 1e-12)",
        "(np.abs(perm) <= abs(gap) - 1e-12)",
    ),
]


def main() -> int:
    shutil.rmtree(SHIM, ignore_errors=True)
    PKG.mkdir(parents=True)
    (PKG / "__init__.py").write_text("")
    for name in ("strategies", "simulation"):
        (PKG / name).symlink_to(REPO / name)
    shutil.copytree(REPO / "common", PKG / "common", ignore=shutil.ignore_patterns("__pycache__"))
    (SHIM / "tests").mkdir()
    shutil.copy(REPO / "tests" / "test_participation.py", TEST)
    (SHIM / "docs").mkdir()
    shutil.copy(REPO / DOCS, SHIM / DOCS)
    env = {"PYTHONPATH": str(SHIM), "PATH": "/usr/bin:/bin", "HOME": "/root"}
    cmd = [str(REPO / ".venv/bin/python"), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    base = subprocess.run([*cmd, str(TEST)], env=env, capture_output=True, text=True, cwd=SHIM)
    print("unmutated:", base.stdout.strip().splitlines()[-1], flush=True)
    if base.returncode != 0:
        print("the unmutated tests fail: no mutation check")
        return 1
    caught = 0
    for name, rel, old, new in M:
        path = SHIM / rel
        clean = path.read_text()
        assert clean.count(old) == 1, name
        path.write_text(clean.replace(old, new))
        try:
            r = subprocess.run([*cmd, str(TEST)], env=env, capture_output=True, text=True, cwd=SHIM)
        finally:
            path.write_text(clean)
        ok = r.returncode != 0
        caught += ok
        last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-200:]
        print(f"{'caught' if ok else 'MISSED'} | {name} | {last}", flush=True)
    print(f"{caught}/{len(M)} caught")
    return 0 if caught == len(M) else 1


if __name__ == "__main__":
    sys.exit(main())
