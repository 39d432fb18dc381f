"""N-best lists of the server's dev and test sentences, from one of two sources.

``simulated`` (SYNTHETIC, the default of the tests and the fallback): each sentence's list holds
``N`` distinct hypotheses; with probability ``ref-rate`` one of them is the reference itself, the
others are corruptions with ``1 + Poisson(edits-per-10-chars x len / 10)`` character edits of
an acoustically plausible kind (:func:`corrupt`: a letter replaced by one of its confusion group,
a letter dropped or doubled, a space dropped or inserted). The acoustic score of a hypothesis is
``-am-scale x edit_distance(ref, hyp) + Normal(0, am-noise)``: better hypotheses score higher on
average, but the noise makes the acoustic 1-best wrong often, which an LM can repair. Everything
is seeded by (run seed, set, utterance).

``pocketsphinx`` (real): the lists made by ``python -m matchmerge.prepare`` (espeak-ng speech,
the pocketsphinx en-US acoustic model with its 3-gram LM, ``N`` best) and cached under
``$FLOWERBED_CACHE/match-and-merge``; :func:`load_cached` reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flowerbed.common.data import cache_dir
from flowerbed.common.seeding import derive_seed
from flowerbed.strategies.match_merge import NBestSet, edit_distance
from matchmerge import domains as D

CONFUSIONS = ("aeiouy", "bp", "dt", "gkcq", "fv", "sz", "mn", "lr", "wv", "hj", "x")
_GROUP = {c: g for g in CONFUSIONS for c in g}
LETTERS = "abcdefghijklmnopqrstuvwxyz"


class NBestNotPrepared(RuntimeError):
    """The pocketsphinx N-best lists are not in the cache (run ``python -m matchmerge.prepare``)."""


def corrupt(text: str, edits: int, rng: np.random.Generator) -> str:
    """``text`` with ``edits`` random edits of an acoustically plausible kind (module docstring)."""
    s = list(text)
    for _ in range(edits):
        if not s:
            s.append(LETTERS[int(rng.integers(26))])
            continue
        i = int(rng.integers(len(s)))
        kind = rng.random()
        c = s[i]
        if kind < 0.5 and c in _GROUP and len(_GROUP[c]) > 1:
            s[i] = str(rng.choice([x for x in _GROUP[c] if x != c]))
        elif kind < 0.5:
            s[i] = LETTERS[int(rng.integers(26))]
        elif kind < 0.7:
            del s[i]
        elif kind < 0.85:
            s.insert(i, c if c != " " else LETTERS[int(rng.integers(26))])
        elif c == " ":
            del s[i]
        else:
            s.insert(i, " ")
    return " ".join("".join(s).split())


def simulate(
    items: list[tuple[int, str]],
    seed: int,
    set_id: int,
    n: int = 10,
    ref_rate: float = 0.5,
    edits_per_10: float = 0.3,
    am_scale: float = 1.0,
    am_noise: float = 2.0,
) -> NBestSet:
    """SYNTHETIC N-best lists of ``items`` = ``[(domain, sentence)]`` (module docstring)."""
    refs, hyps, am, doms = [], [], np.full((len(items), n), -np.inf), []
    for u, (d, ref) in enumerate(items):
        rng = np.random.default_rng(derive_seed(seed, set_id, u, 0xAB))
        have = [ref] if rng.random() < ref_rate else []
        tries = 0
        while len(have) < n and tries < 20 * n:
            tries += 1
            k = 1 + int(rng.poisson(edits_per_10 * len(ref) / 10))
            h = corrupt(ref, k, rng)
            if h and h != ref and h not in have:
                have.append(h)
        order = rng.permutation(len(have))
        have = [have[i] for i in order]
        for j, h in enumerate(have):
            am[u, j] = -am_scale * edit_distance(ref, h) + rng.normal(0.0, am_noise)
        refs.append(ref)
        hyps.append(have)
        doms.append(d)
    return NBestSet(refs, hyps, am, np.asarray(doms), D.SHORT)


def cache_folder() -> Path:
    return cache_dir() / "match-and-merge"


def cache_file(dev: int, test: int, n: int) -> Path:
    return cache_folder() / f"nbest-dev{dev}-test{test}-n{n}.json"


def to_json(nb: NBestSet) -> dict:
    return {
        "refs": nb.refs,
        "hyps": nb.hyps,
        "am": [[float(x) for x in row[: len(h)]] for row, h in zip(nb.am, nb.hyps, strict=True)],
        "domains": [int(d) for d in nb.domains],
        "domain_names": list(nb.domain_names),
    }


def from_json(rec: dict, n: int) -> NBestSet:
    am = np.full((len(rec["refs"]), n), -np.inf)
    for u, row in enumerate(rec["am"]):
        am[u, : len(row)] = row
    return NBestSet(
        rec["refs"], rec["hyps"], am, np.asarray(rec["domains"]), tuple(rec["domain_names"])
    )


def load_cached(dev: int, test: int, n: int, num_domains: int) -> tuple[NBestSet, NBestSet]:
    """The cached pocketsphinx ``(dev, test)`` lists of the first ``num_domains`` domains."""
    path = cache_file(dev, test, n)
    if not path.exists():
        raise NBestNotPrepared(
            f"{path} missing: run `python -m matchmerge.prepare --dev {dev} --test {test}` "
            "(needs pocketsphinx and espeak-ng)"
        )
    rec = json.loads(path.read_text())
    out = []
    for part in ("dev", "test"):
        r = rec[part]
        keep = [i for i, d in enumerate(r["domains"]) if d < num_domains]
        sub = {k: [r[k][i] for i in keep] for k in ("refs", "hyps", "am", "domains")}
        out.append(from_json({**sub, "domain_names": r["domain_names"]}, n))
    return out[0], out[1]


def nbest_sets(cfg) -> tuple[NBestSet, NBestSet]:
    """The run's ``(dev, test)`` N-best sets (``nbest-source`` of the run config)."""
    k, dev, test, n = (
        cfg["num-domains"],
        cfg["dev-per-domain"],
        cfg["test-per-domain"],
        cfg["nbest"],
    )
    if cfg["nbest-source"] == "pocketsphinx":
        return load_cached(dev, test, n, k)
    dev_items, test_items = D.speech_sets(k, dev, test)
    opts = {
        "n": n,
        "ref_rate": cfg["sim-ref-rate"],
        "edits_per_10": cfg["sim-edits"],
        "am_scale": cfg["sim-am-scale"],
        "am_noise": cfg["sim-am-noise"],
    }
    return (
        simulate(dev_items, cfg["seed"], 0, **opts),
        simulate(test_items, cfg["seed"], 1, **opts),
    )
