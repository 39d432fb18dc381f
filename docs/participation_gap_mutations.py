"""Mutation check of the participation-gap code (a dev tool): a copy of ``common/`` and of the
analysis script in a flowerbed shim at /tmp/pgshim (``strategies`` and ``simulation``
symlinked to this worktree); each mutation is applied to the copy, the copy of
``tests/test_participation.py`` run, the file restored. A mutation is "caught" when the test
file fails. The worktree itself is never changed (runs may be going on beside it).

    /work/bin/cpu-slot .venv/bin/python docs/participation_gap_mutations.py [NAME-PART ...]

(with arguments: only the mutations whose name contains one of them, e.g. ``label-dirichlet
semantic``; those run their own test file, ``tests/test_partition.py`` or
``tests/test_semantic.py``)
"""

from __future__ import annotations

import contextlib
import os
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
LDIR = "flowerbed/common/label_dirichlet.py"
SEM = "flowerbed/common/semantic.py"
PTEST = "tests/test_partition.py"
STEST = "tests/test_semantic.py"
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
    # label-based synthesis and the semantic embedder option (their own test files)
    (
        "label-dirichlet: concentration alpha / prior",
        LDIR,
        "self.alpha * counts / n",
        "self.alpha * n / counts",
        PTEST,
    ),
    (
        "label-dirichlet: concentration not x alpha",
        LDIR,
        "self.alpha * counts / n",
        "counts / n",
        PTEST,
    ),
    ("label-dirichlet: remainder dropped", LDIR, "sizes[: n % c] += 1", "pass", PTEST),
    (
        "label-dirichlet: no floor",
        LDIR,
        "np.maximum(self._rng.dirichlet(alpha, size), FLOOR)",
        "self._rng.dirichlet(alpha, size)",
        PTEST,
    ),
    (
        "semantic-cnn: factory ignores the embedder",
        SEM,
        "lambda: embeddings(dataset, data_dir, embedder=embedder)",
        "lambda: embeddings(dataset, data_dir)",
        STEST,
    ),
    (
        "semantic: embedder in the mlp cache key",
        SEM,
        'if embedder != "mlp":\n        key +=',
        "if True:\n        key +=",
        STEST,
    ),
]


def build_shim() -> None:
    """The shim: ``common`` and the analysis script copied (they get mutated), the rest linked."""
    if SHIM.exists():
        shutil.rmtree(SHIM)
    no_cache = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "common", PKG / "common", ignore=no_cache)  # makes PKG too
    (PKG / "__init__.py").touch()
    for rel in ("tests/test_participation.py", PTEST, STEST, DOCS):
        (SHIM / rel).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / rel, SHIM / rel)
    for linked in ("strategies", "simulation"):  # read only by the tests
        os.symlink(REPO / linked, PKG / linked)


@contextlib.contextmanager
def mutated(rel: str, old: str, new: str):
    """``rel`` of the shim with ``old`` replaced by ``new`` (exactly one occurrence), restored
    on exit."""
    path = SHIM / rel
    original = path.read_text()
    if original.count(old) != 1:
        raise ValueError(f"{rel}: {old!r} occurs {original.count(old)} times, not once")
    path.write_text(original.replace(old, new))
    try:
        yield
    finally:
        path.write_text(original)


def tests_pass(test: pathlib.Path = TEST) -> tuple[bool, str]:
    """Run a test file of the shim (default: the participation tests); (passed, pytest's
    last line)."""
    proc = subprocess.run(
        [
            str(REPO / ".venv/bin/python"),
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            str(test),
        ],
        env={"PYTHONPATH": str(SHIM), "PATH": "/usr/bin:/bin", "HOME": "/root"},
        cwd=SHIM,
        capture_output=True,
        text=True,
    )
    lines = proc.stdout.strip().splitlines() or [proc.stderr[-200:]]
    return proc.returncode == 0, lines[-1]


def main(only: list[str]) -> int:
    """Every mutation, or those whose name contains one of ``only``."""
    chosen = [m for m in M if not only or any(o in m[0] for o in only)]
    build_shim()
    for test in sorted(
        {SHIM / (m[4] if len(m) > 4 else "tests/test_participation.py") for m in chosen}
    ):
        ok, last = tests_pass(test)
        print(f"unmutated {test.name}:", last, flush=True)
        if not ok:
            print("the unmutated tests fail: no mutation check")
            return 1
    missed = []
    for name, rel, old, new, *test in chosen:
        with mutated(rel, old, new):
            survived, last = tests_pass(SHIM / test[0] if test else TEST)
        if survived:
            missed.append(name)
        print(f"{'MISSED' if survived else 'caught'} | {name} | {last}", flush=True)
    print(f"{len(chosen) - len(missed)}/{len(chosen)} caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
