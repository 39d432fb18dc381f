"""Match-and-merge app: the LMs by hand, domains, simulated N-best lists, the client step called
directly, a run of every method on a test grid (no Ray) asserting on results.json, one `flwr run`
end to end, and the real pocketsphinx N-best lists when pocketsphinx and espeak-ng are present."""

import json
import shutil

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from flowerbed.common.config import ConfigError, check_pyproject
from flowerbed.common.testing import app_path, mock_reply, node_context

APP = app_path("match-and-merge")

from matchmerge import client_app, nbest, task  # noqa: E402
from matchmerge import domains as D  # noqa: E402
from matchmerge.lm import (  # noqa: E402
    EOS,
    GRULM,
    SYMBOLS,
    NGramLM,
    V,
    encode,
    load_lm,
    normalise,
)
from matchmerge.methods import METHODS  # noqa: E402

#: a run small enough for a test: 7 clients, 200 sentences each, 5 GRU steps, 3 + 4 utterances
TINY = {
    "train-sentences": 200,
    "gru-steps": 5,
    "dev-per-domain": 3,
    "test-per-domain": 4,
    "budget": 120,
    "population": 8,
    "generations": 10,
    "episodes": 60,
}


def test_pyproject_defaults_are_the_schema_defaults():
    assert check_pyproject(APP, task.SCHEMA) == []


def test_bad_key_or_value_is_one_line():
    with pytest.raises(ConfigError, match=r"^unknown run config key 'rounds'; valid keys: "):
        task.parse_config({"rounds": 1})
    with pytest.raises(ConfigError, match=r"method='magic': must be one of rmma, gmma, am-only"):
        task.parse_config({"method": "magic"})
    with pytest.raises(ConfigError, match=r"^run config lm-plan='ngram9,gru': "):
        task.parse_config({"lm-plan": "ngram9,gru"})
    assert task.lm_specs("ngram2, gru") == [("ngram", 2), ("gru", 0)]


# ---------------------------------------------------------------------------- n-gram by hand
def test_text_normalisation():
    assert normalise("Zoë's  CAFÉ, 1999!") == "zoe's cafe"
    assert encode("ab") == [encode("a")[0], encode("b")[0]] and encode("a")[0] > EOS


def test_ngram_probabilities_by_hand():
    lm = NGramLM.train(["ab"], order=2, kappa=1.0)
    a, b, z = encode("abz")
    # unigrams: a, b, EOS once each (3); P1(a) = (1 + 1/29) / (3 + 1) = 30/116
    p1_a = (1 + 1 / V) / 4
    assert p1_a == pytest.approx(30 / 116)
    ctx = np.array([[0], [a], [a], [z]])
    tgt = np.array([a, b, z, a])
    # P2(a|BOS) = (1 + P1(a)) / (1 + 1); P2(b|a) alike; P2(z|a) = (0 + P1(z)) / 2 with
    # P1(z) = (1/29) / 4; an unseen context falls back to P1: P2(a|z) = P1(a)
    want = [146 / 232, 146 / 232, 1 / 232, 30 / 116]
    np.testing.assert_allclose(lm.prob(ctx, tgt), want)
    np.testing.assert_allclose(np.exp(lm.table(["ab"], 4)), [[146 / 232] * 3 + [1.0]])


@pytest.mark.parametrize("order", [2, 3, 4])
def test_ngram_is_normalised_for_every_context(order):
    lm = NGramLM.train(["the cat sat", "a cat", "that"], order=order, kappa=0.5)
    rng = np.random.default_rng(order)
    for _ in range(5):
        ctx = rng.integers(0, SYMBOLS, size=order - 1)
        targets = np.arange(1, SYMBOLS)  # every symbol but BOS
        p = lm.prob(np.tile(ctx, (len(targets), 1)), targets)
        assert p.sum() == pytest.approx(1.0)
    # seen text is more likely under the LM than a scrambled one
    good, bad = lm.table(["the cat"], 9).sum(), lm.table(["tca eht"], 9).sum()
    assert good > bad + 5


def test_ngram_upload_round_trip_and_named_rejections():
    lm = NGramLM.train(["the cat sat", "a cat"], order=3, kappa=1.0)
    again = load_lm(lm.arrays(), MetricRecord(lm.metrics()))
    texts = ["the cat", "a sat"]
    np.testing.assert_array_equal(again.table(texts, 12), lm.table(texts, 12))
    meta = MetricRecord(lm.metrics())

    def bad(**change):
        arrays = lm.arrays()
        for k, v in change.items():
            arrays[k.replace("_", "-")] = type(arrays["codes-1"])(np.asarray(v))
        with pytest.raises(ValueError) as e:
            NGramLM.from_arrays(arrays, meta)
        return str(e.value)

    assert "not sorted" in bad(codes_2=lm.codes[1][::-1].copy())
    assert "counts must be finite and > 0" in bad(counts_1=-lm.counts[0])
    assert "outside" in bad(codes_1=lm.codes[0] + SYMBOLS)
    assert "differ" in bad(counts_3=lm.counts[2][:-1])
    with pytest.raises(ValueError, match="order 9"):
        NGramLM.from_arrays(lm.arrays(), MetricRecord({**lm.metrics(), "order": 9}))


# ---------------------------------------------------------------------------- GRU
def test_gru_learns_its_text_and_round_trips():
    text = ["abab abab", "abab ab", "ab abab"] * 4
    untrained = GRULM.train(text, seed=1, steps=1, lr=1e-9)
    trained = GRULM.train(text, seed=1, steps=60, lr=0.02)
    assert trained.table(text[:1], 10).sum() > untrained.table(text[:1], 10).sum() + 5
    # per-character distributions: every row of the head sums to one over the symbols
    with __import__("torch").no_grad():
        inp = __import__("torch").zeros((1, 3), dtype=__import__("torch").long)
        np.testing.assert_allclose(trained.model(inp).exp().sum(-1).numpy(), 1.0, rtol=1e-5)
    again = load_lm(trained.arrays(), MetricRecord(trained.metrics()))
    np.testing.assert_allclose(again.table(text[:2], 10), trained.table(text[:2], 10))
    # seeded: the same seed gives the same weights
    twin = GRULM.train(text, seed=1, steps=60, lr=0.02)
    np.testing.assert_array_equal(twin.table(text[:2], 10), trained.table(text[:2], 10))
    arrays = trained.arrays()
    arrays["head.bias"] = type(arrays["head.bias"])(np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match="'head.bias' has shape"):
        load_lm(arrays, MetricRecord(trained.metrics()))


# ---------------------------------------------------------------------------- data
def test_domains_are_fixed_and_speech_never_in_the_lm_text():
    dev, test = D.speech_sets(7, 3, 4)
    assert len(dev) == 21 and len(test) == 28
    assert {d for d, _ in dev} == set(range(7))
    assert not {s for _, s in dev} & {s for _, s in test}
    for d in range(7):
        dom = D.domain(d)
        assert not set(dom.speech) & set(dom.text)
        assert all(20 <= len(s) <= 80 for s in dom.speech)
    assert D.speech_sets(7, 3, 4) == (dev, test)


def test_simulated_nbest_lists():
    items = [(0, "the cat sat on the mat"), (1, "a dog ran in the park today")]
    nb = nbest.simulate(items, seed=3, set_id=0, n=10, am_noise=0.0)
    assert nb.am.shape == (2, 10) and nb.refs == [s for _, s in items]
    for hs in nb.hyps:
        assert len(set(hs)) == len(hs)
    # without noise the acoustic score is minus the edit distance: the 1-best is the oracle
    np.testing.assert_allclose(nb.am[nb.valid], -nb.edits[nb.valid])
    again = nbest.simulate(items, seed=3, set_id=0, n=10, am_noise=0.0)
    assert again.hyps == nb.hyps
    other = nbest.simulate(items, seed=4, set_id=0, n=10, am_noise=0.0)
    assert other.hyps != nb.hyps
    noisy = nbest.simulate([(0, "the cat sat on the mat")] * 200, seed=1, set_id=0)
    ref_in = np.mean([r in h for r, h in zip(noisy.refs, noisy.hyps, strict=True)])
    assert 0.38 < ref_in < 0.62  # sim-ref-rate 0.5
    acoustic = noisy.cer_of(np.argmax(noisy.am, axis=1))["all"]
    assert acoustic > noisy.oracle()["all"] + 0.01  # the AM's 1-best is often wrong


# ---------------------------------------------------------------------------- client
def test_client_uploads_its_lm():
    cfg = {**TINY}
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    rep = client_app.train(mock_reply(content), node_context(2, 7, cfg)).content
    meta = rep["metrics"]
    assert meta["partition-id"] == 2 and meta["domain"] == 2 and meta["lm-kind"] == 0
    assert meta["order"] == 4 and meta["num-examples"] == 200
    lm = load_lm(rep["lm"], meta)
    assert lm.name == "ngram4"
    gru = client_app.train(mock_reply(content), node_context(5, 7, cfg)).content
    assert gru["metrics"]["lm-kind"] == 1 and load_lm(gru["lm"], gru["metrics"]).kind == "neural"
    same = client_app.train(mock_reply(content), node_context(5, 7, cfg)).content
    assert all(
        np.array_equal(gru["lm"][k].numpy(), same["lm"][k].numpy()) for k in gru["lm"]
    )  # seeded by (seed, partition, round)


# ---------------------------------------------------------------------------- smoke run
def _run(tmp_path, method, **over):
    from flowerbed.simulation.local import run_local

    out = tmp_path / method
    run_local("match-and-merge", {**TINY, "method": method, "results-dir": str(out), **over}, 7)
    return json.loads((out / "results.json").read_text())


def test_every_method_runs_on_simulated_nbest(tmp_path):
    recs = {m: _run(tmp_path, m) for m in METHODS.names}
    finals = {m: r["extra"]["final"] for m, r in recs.items()}
    for m, f in finals.items():
        assert {f"cer-{d}" for d in D.SHORT} <= set(f), m
        assert 0.0 <= f["cer"] < 0.5
        row = recs[m]["rounds"][1]
        assert row["uploads_kept"] == 7 and row["phases"]["upload"]["num_replies"] == 7
        assert row["bytes_received"] > 0
        assert row["test_oracle_cer"]["all"] <= f["cer"] + 1e-12
    assert finals["am-only"]["evaluations"] == 0 and finals["uniform"]["evaluations"] == 0
    assert finals["best-single"]["evaluations"] == 7
    for m in ("gmma", "rmma"):
        assert 0 < finals[m]["evals-to-converge"] <= finals[m]["evaluations"] <= 120
        # the searches see the singles' space and more: never worse on dev than the AM alone
        assert finals[m]["dev-cer"] <= finals["am-only"]["dev-cer"]
    # the LMs help: the best single LM beats the acoustic 1-best on dev
    assert finals["best-single"]["dev-cer"] < finals["am-only"]["dev-cer"]
    # seeded: the same run twice gives the same numbers
    again = _run(tmp_path / "again", "rmma")["extra"]["final"]
    assert again == finals["rmma"]


@pytest.mark.e2e
def test_flwr_run_end_to_end(tmp_path):
    from flowerbed.simulation.flwr_cli import flwr_run

    out = tmp_path / "e2e"
    over = {**TINY, "num-domains": 2, "lm-plan": "ngram3,gru", "results-dir": str(out)}
    p = flwr_run("match-and-merge", over, num_supernodes=2)
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads((out / "results.json").read_text())
    final = rec["extra"]["final"]
    assert [r["round"] for r in rec["rounds"]] == [0, 1]
    assert rec["rounds"][1]["uploads_kept"] == 2 and 0 <= final["cer"] < 0.5
    assert {"cer-people", "cer-biology"} <= set(final) and final["evaluations"] > 0


# ---------------------------------------------------------------------------- pocketsphinx
HAVE_ASR = shutil.which("espeak-ng") is not None and __import__("importlib").util.find_spec(
    "pocketsphinx"
)


@pytest.mark.skipif(not HAVE_ASR, reason="pocketsphinx or espeak-ng not installed")
def test_pocketsphinx_nbest_of_synthesised_speech():
    from matchmerge import prepare

    nb = prepare.recognise([(0, "the cat sat on the mat")], n=10)
    assert len(nb) == 1 and 1 <= len(nb.hyps[0]) <= 10
    assert np.isfinite(nb.am[0, : len(nb.hyps[0])]).all()
    assert nb.am[0, 0] == np.max(nb.am[0, : len(nb.hyps[0])])  # best first
    assert len(set(nb.hyps[0])) == len(nb.hyps[0])  # distinct hypotheses
    assert all(h == normalise(h) for h in nb.hyps[0])  # normalised like the references
    # pocketsphinx hears espeak-ng badly (README: 68 % CER on the test lists); some hypothesis
    # must still share characters with the sentence, and the oracle is no worse than the 1-best
    assert nb.oracle()["all"] <= nb.cer_of(np.array([0]))["all"] < 1.0
