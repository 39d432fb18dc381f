"""Real N-best lists: espeak-ng speech of the dev and test sentences, recognised by pocketsphinx.

``python -m matchmerge.prepare [--dev 20 --test 40 --n 10 --domains 7]`` synthesises every dev
and test sentence of :func:`matchmerge.domains.speech_sets` with Debian's ``espeak-ng`` (voice
en-us, 22.05 kHz, resampled to 16 kHz), decodes it with the PyPI ``pocketsphinx`` en-US acoustic
model, its 3-gram LM and CMU dictionary, and keeps the ``N`` best distinct hypotheses
(normalised like the references) with their pocketsphinx scores in natural-log units (the
acoustic model and pocketsphinx's own LM together: the hybrid system's first pass). The lists
are cached under ``$FLOWERBED_CACHE/match-and-merge/`` (:func:`matchmerge.nbest.cache_file`);
every utterance is appended to a ``.partial.jsonl`` file as it is decoded, so an interrupted
run (``--max-seconds``) continues where it stopped. Progress is printed every 10 utterances.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import time
import wave
from functools import lru_cache

import numpy as np

from flowerbed.strategies.match_merge import NBestSet
from matchmerge import domains as D
from matchmerge import nbest as NB
from matchmerge.lm import normalise

RATE = 16000


class ASRMissing(RuntimeError):
    """espeak-ng or pocketsphinx is not installed (simulation/setup.sh installs both)."""


def speak(text: str) -> np.ndarray:
    """16 kHz int16 samples of ``text`` spoken by espeak-ng (voice en-us)."""
    if shutil.which("espeak-ng") is None:
        raise ASRMissing("espeak-ng not found (apt-get install espeak-ng; simulation/setup.sh)")
    wav = subprocess.run(
        ["espeak-ng", "-v", "en-us", "--stdout", text], check=True, capture_output=True
    ).stdout
    with wave.open(io.BytesIO(wav)) as w:
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float64)
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(RATE, rate)
    y = resample_poly(x, RATE // g, rate // g)
    return np.clip(y, -32768, 32767).astype(np.int16)


@lru_cache(maxsize=1)
def decoder():
    try:
        from pocketsphinx import Decoder
    except ImportError as e:
        raise ASRMissing("pocketsphinx not installed (pip install -e '.[asr]')") from e
    return Decoder(samprate=RATE, loglevel="ERROR")


def decode(samples: np.ndarray, n: int) -> tuple[list[str], list[float]]:
    """The ``n`` best distinct normalised hypotheses and their scores (nats), best first."""
    d = decoder()
    d.start_utt()
    d.process_raw(samples.tobytes(), full_utt=True)
    d.end_utt()
    logmath = d.get_logmath()
    best: dict[str, float] = {}
    for i, h in enumerate(d.nbest()):
        if i >= 20 * n:
            break
        if h is None:  # pocketsphinx yields None for a path it cannot back-trace
            continue
        text = normalise(h.hypstr)
        score = float(logmath.log_to_ln(logmath.log(h.score)))
        if text not in best or score > best[text]:
            best[text] = score
    if not best:  # no lattice: the first pass's hypothesis
        h = d.hyp()
        best[normalise(h.hypstr) if h is not None else ""] = 0.0
    ranked = sorted(best.items(), key=lambda kv: -kv[1])[:n]
    return [t for t, _ in ranked], [s for _, s in ranked]


def recognise(items: list[tuple[int, str]], n: int = 10, log=None) -> NBestSet:
    """The pocketsphinx N-best set of ``items`` = ``[(domain, sentence)]``."""
    hyps, scores = [], []
    t0 = time.time()
    for i, (_, ref) in enumerate(items):
        h, s = decode(speak(ref), n)
        hyps.append(h)
        scores.append(s)
        if log and (i + 1) % 10 == 0:
            log(f"{i + 1}/{len(items)} utterances, {time.time() - t0:.0f} s")
    return _nbest(items, hyps, scores, n)


def _nbest(items, hyps, scores, n: int) -> NBestSet:
    am = np.full((len(items), n), -np.inf)
    for u, s in enumerate(scores):
        am[u, : len(s)] = s
    return NBestSet([s for _, s in items], hyps, am, [d for d, _ in items], D.SHORT)


def prepare(
    dev: int = 20,
    test: int = 40,
    n: int = 10,
    domains: int = 7,
    max_seconds: float = float("inf"),
    force: bool = False,
    log=print,
) -> bool:
    """Build (or continue) the cached lists; True when the cache file is complete."""
    path = NB.cache_file(dev, test, n)
    if path.exists() and not force:
        log(f"[matchmerge.prepare] cached: {path}")
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.jsonl")
    if force and partial.exists():
        partial.unlink()
    dev_items, test_items = D.speech_sets(domains, dev, test)
    items = [("dev", i, x) for i, x in enumerate(dev_items)]
    items += [("test", i, x) for i, x in enumerate(test_items)]
    done = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            r = json.loads(line)
            done[(r["set"], r["i"])] = r
    todo = [it for it in items if (it[0], it[1]) not in done]
    log(f"[matchmerge.prepare] {len(items)} utterances, {len(done)} cached, {len(todo)} to do")
    t0 = time.time()
    with partial.open("a") as f:
        for k, (part, i, (_, ref)) in enumerate(todo):
            if time.time() - t0 > max_seconds:
                log(f"[matchmerge.prepare] stopped after {max_seconds:.0f} s; run again to go on")
                return False
            h, s = decode(speak(ref), n)
            r = {"set": part, "i": i, "ref": ref, "hyps": h, "am": s}
            f.write(json.dumps(r) + "\n")
            f.flush()
            done[(part, i)] = r
            if (k + 1) % 10 == 0 or k + 1 == len(todo):
                rate = (time.time() - t0) / (k + 1)
                log(
                    f"[matchmerge.prepare] {k + 1}/{len(todo)} utterances, "
                    f"{time.time() - t0:.0f} s, ~{rate * (len(todo) - k - 1):.0f} s left",
                )
    out = {}
    for part, its in (("dev", dev_items), ("test", test_items)):
        rows = [done[(part, i)] for i in range(len(its))]
        nb = _nbest(its, [r["hyps"] for r in rows], [r["am"] for r in rows], n)
        out[part] = NB.to_json(nb)
        log(
            f"[matchmerge.prepare] {part}: {len(nb)} utterances, pocketsphinx 1-best CER "
            f"{nb.cer_of(np.argmax(nb.am, axis=1))['all']:.4f}, oracle {nb.oracle()['all']:.4f}"
        )
    from flowerbed.common.results import versions

    out["meta"] = {"espeak-ng": _espeak_version(), **versions(("pocketsphinx",))}
    path.write_text(json.dumps(out))
    partial.unlink()
    log(f"[matchmerge.prepare] wrote {path}")
    return True


def _espeak_version() -> str:
    p = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True)
    return p.stdout.strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m matchmerge.prepare", description=__doc__)
    ap.add_argument("--dev", type=int, default=20, help="dev utterances per domain")
    ap.add_argument("--test", type=int, default=40, help="test utterances per domain")
    ap.add_argument("--n", type=int, default=10, help="N of the N-best lists")
    ap.add_argument("--domains", type=int, default=7)
    ap.add_argument("--max-seconds", type=float, default=float("inf"), help="stop after this")
    ap.add_argument("--force", action="store_true", help="decode again")
    a = ap.parse_args(argv)
    ok = prepare(a.dev, a.test, a.n, a.domains, a.max_seconds, a.force)
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
