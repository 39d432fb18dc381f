"""FL-LLaMA experiment scripts on the tiny LLaMA: the inversion attack (decoder by hand, accuracy
falls with sigma), the results table (ratio and bytes by hand) and the benchmark's arithmetic
and output structure (never a timing)."""

import math

import numpy as np
import pytest
import torch

from flowerbed.common.testing import app_path

APP = app_path("fl-llama")

from flllama import attack as A  # noqa: E402
from flllama import bench, experiments, privacy, report  # noqa: E402
from flllama import data as D  # noqa: E402
from flllama.model import tiny_llama  # noqa: E402
from flllama.split import SplitLlama, noise_std  # noqa: E402


# ---------------------------------------------------------------------------- attack
def test_decoder_inverts_exact_embeddings():
    """States equal to the tokens' own embeddings: the ridge map is ~identity and the
    nearest-embedding read-out gives every token back."""
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(20, 6, generator=gen)
    ids = torch.randint(0, 20, (200,), generator=gen)
    w = A.fit_decoder(emb[ids], emb[ids], ridge=1e-9)
    torch.testing.assert_close(w[:6], torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(w[6], torch.zeros(6, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.equal(A.decode(emb[ids], w, emb, chunk=7), ids)


def test_decoder_learns_a_linear_map():
    """States = tokens' embeddings through an invertible linear map plus an offset: the fitted
    decoder undoes it (accuracy 1)."""
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(30, 8, generator=gen)
    m = torch.randn(8, 8, generator=gen) + 3 * torch.eye(8)
    ids = torch.randint(0, 30, (300,), generator=gen)
    h = emb[ids] @ m + 0.5
    w = A.fit_decoder(h, emb[ids], ridge=1e-9)
    test = torch.arange(30)
    assert torch.equal(A.decode(emb[test] @ m + 0.5, w, emb), test)


@pytest.fixture(scope="module")
def tiny_attack():
    model = tiny_llama(0).eval()
    attacker, victim = A.batches(D.CharTokenizer(), 48, 12, 60, seed=3)
    return model, attacker, victim


def test_attack_uses_disjoint_topics(tiny_attack):
    _, attacker, victim = tiny_attack
    assert set(attacker["topic"].tolist()).isdisjoint(victim["topic"].tolist())


def test_attack_accuracy_falls_with_sigma(tiny_attack):
    """Without noise the tiny A output (p = 1) is inverted well; the accuracy falls at every
    larger sigma and is near 0 at sigma = 0.1 (tiny embeddings have std 0.02). Fails if the
    noise is not applied to the states or its scale is dropped."""
    model, attacker, victim = tiny_attack
    split = SplitLlama(model, 1, 1)
    acc = [A.attack(split, attacker, victim, s, seed=5) for s in (0.0, 0.02, 0.05, 0.1)]
    assert acc[0] > 0.6
    assert all(a > b for a, b in zip(acc[:-1], acc[1:], strict=True))
    assert acc[3] < 0.1


def test_attack_noise_is_the_protocol_noise(tiny_attack):
    """The victim's states the decoder sees = A's output + the training noise (std
    sigma*sqrt(pi/2) by default), at the real positions only."""
    model, _, victim = tiny_attack
    split = SplitLlama(model, 1, 1)
    h, real = A.hidden_states(split, victim)
    assert int(real.sum()) == int(victim["counts"].sum())
    clean = A.noised(h, real, 0.0, True, 9)
    noisy = A.noised(h, real, 0.5, True, 9)
    std = float((noisy - clean).std())
    assert std == pytest.approx(noise_std(0.5, True), rel=0.05)


# ---------------------------------------------------------------------------- results table
def _run(method, sigma, compression, loss, bytes_step, rounds=2):
    cfg = {
        "method": method,
        "sigma": sigma,
        "mask-compression": compression,
        "num-server-rounds": rounds,
        "sync-steps": 3,
        **{k: 1 for k in report.SCHEDULE if k != "sync-steps"},
    }
    rs = [{"round": 0, "server_loss": 5.0, "server_accuracy": 0.1}]
    rs += [
        {
            "round": r,
            "server_loss": loss + (rounds - r),
            "server_accuracy": 0.5,
            "bytes_per_step": bytes_step * r,
        }
        for r in range(1, rounds + 1)
    ]
    return {"config": cfg, "rounds": rs, "git_commit": "abcdef0123", "wall_time_s": 3.0}


def test_report_ratio_and_bytes_by_hand():
    runs = [
        _run("centralized", 0.0, True, 2.0, 0),
        _run("split-sequential", 0.0, True, 2.1, 100),
        _run("split-sequential", 0.0, False, 9.0, 700, rounds=1),
    ]
    rows = report.rows(runs)
    assert rows[0]["ratio"] == pytest.approx(1.0) and rows[0]["bytes_per_step"] is None
    assert rows[1]["ratio"] == pytest.approx(2.1 / 2.0)
    assert rows[1]["bytes_per_step"] == 100  # round 1, not the last round (200)
    assert rows[2]["ratio"] is None  # no centralized run with 1 round
    assert rows[2]["bytes_per_step"] == 700
    text = report.markdown(rows)
    assert "| split-sequential | 0 | off | 1 x 3 |" in text
    assert "| 1.0500 |" in text


def test_title_table_ratio_and_metrics_by_hand():
    """Task title: split 2.5 / centralized 2.0 -> 1.2500, the last round's exact match and F1;
    a topic run of the same schedule is left out (and never is a title run's reference)."""
    runs = []
    for method, loss, em, f1 in (
        ("centralized", 2.0, 0.5, 0.75),
        ("split-sequential", 2.5, 0.25, 0.5),
    ):
        r = _run(method, 0.0, True, loss, 10)
        r["config"]["task"] = "title"
        for x in r["rounds"]:
            x["server_exact_match"], x["server_token_f1"] = em, f1
        runs.append(r)
    runs.append(_run("centralized", 0.0, True, 1.0, 0))  # topic task: not in the title table
    text = report.title_table(runs)
    lines = text.splitlines()
    assert len(lines) == 4
    assert (
        lines[2]
        == "| centralized | 2 x 3 | 5.0000 -> 2.0000 | 0.5000 | 0.7500 | 1.0000 | 3 | 1 | abcdef0 |"
    )
    assert lines[3] == (
        "| split-sequential | 2 x 3 | 5.0000 -> 2.5000 | 0.2500 | 0.5000 | 1.2500 | 3 | 1 | abcdef0 |"
    )


def test_report_seed_summary_by_hand():
    """Each setting over its seeds, ratios to the centralized run of the same seed: split
    2.2 / 2.0 and 1.3 / 1.0 -> 1.2000 ± 0.1414 (sample std); losses 1.75 ± 0.6364."""
    runs = []
    for seed, cen, split in ((1, 2.0, 2.2), (2, 1.0, 1.3)):
        for method, loss in (("centralized", cen), ("split-sequential", split)):
            runs.append(_run(method, 0.0, True, loss, 10))
            runs[-1]["config"]["seed"] = seed
    runs.append(_run("split-sequential", 0.1, True, 3.0, 10))  # seed 1 only, sigma 0.1
    text = report.seed_summary(report.rows(runs))
    assert "| centralized | - | - | 2 | 1,2 | 1.5000 ± 0.7071 | 1.0000 ± 0.0000 |" in text
    assert (
        "| split-sequential | 0 | on | 2 | 1,2 | 1.7500 ± 0.6364 | 1.2000 ± 0.1414 "
        "| 0.5000 ± 0.0000 |"
    ) in text
    assert "| split-sequential | 0.1 | on | 2 | 1 | 3.0000 | 1.5000 | 0.5000 |" in text


def test_gap_table_pairs_by_clients_and_seed_and_averages_ratios_by_hand():
    def run(method, loss, k, seed=1, **cfg):
        r = _run(method, 0.0, True, loss, 10)
        r["config"].update({"seed": seed, "batch-size": 2, **cfg})
        first = r["rounds"][1]
        if method == "centralized":
            first["train_num-examples"] = k * 3 * 2  # k clients' batches of 2, 3 steps
        else:
            first["train_clients"] = k
        return r

    runs = [
        run("centralized", 2.0, 2),
        run("centralized", 4.0, 1),
        run("centralized", 1.0, 2, seed=2),
        run("split-sequential", 2.2, 2),
        run("split-sequential", 4.0, 1),
        run("split-sequential", 1.3, 2, seed=2),
        run("split-sequential", 2.1, 2, **{"client-lr-scale": 2.0}),
        run("split-sequential", 9.0, 3),  # no centralized run with 3 clients: left out
    ]
    assert [report.clients(r) for r in runs[:2]] == [2, 1]
    text = report.gap_table(runs)
    assert "| 1 | 0 | 1 | 0 / 0 | 1 | 4.0000 | 4.0000 | 1.0000 |" in text
    assert "| 2 | 0 | 1 | 0 / 0 | 2 | 1.3000 | 1.0000 | 1.3000 |" in text
    # 2 clients, defaults: ratios 1.1 (seed 1) and 1.3 (seed 2): mean 1.2, sample std
    # sqrt(((-0.1)^2 + 0.1^2) / (2 - 1)) = 0.1414 (ddof 0 would give 0.1000); split losses
    # 2.2 and 1.3: 1.75 ± 0.6364; centralized 2.0 and 1.0: 1.5 ± 0.7071; accuracy 0.5 both
    assert (
        "| 2 | 0 | 1 | 0 / 0 | 2 | 1.2000 ± 0.1414 | 1.1000 | 1.3000 | 1.7500 ± 0.6364 "
        "| 1.5000 ± 0.7071 | 0.5000 ± 0.0000 |"
    ) in text
    # one seed: the value alone
    assert "| 2 | 0 | 2 | 0 / 0 | 1 | 1.0500 | 1.0500 | 1.0500 | 2.1000 | 2.0000 | 0.5000 |" in text
    assert "9.0000" not in text


# ---------------------------------------------------------------------------- one command
def test_experiments_plan_has_every_readme_sweep_and_keeps_finished_ones(tmp_path):
    """The one command: the table's five sweeps (centralized, sigma 0 / 0.02,0.05 / 0.1, no
    compression), the controls at seeds 43,44 and the gradient-DP noise sweep, each on the
    README's schedule; a sweep whose folder already holds one results.json per job is kept."""
    steps = experiments.plan(tmp_path)
    cmds = [" ".join(c) for c, _ in steps]
    assert len(steps) == len(experiments.SWEEPS) and not any(d for _, d in steps)
    for c in cmds:
        assert all(o in c for o in experiments.COMMON) and " -m " in c
    table = [c for c in cmds if "fl-llama-table" in c]
    assert len(table) == 7 and sum("method=centralized" in c for c in table) == 1
    for seed in (43, 44):  # the sigma sweep again at the gap sweeps' seeds
        assert any(f"sigma=0.02,0.05,0.1 seed={seed} " in c for c in table)
    assert [c for c, _ in experiments.plan(tmp_path, match="sigma-s4")] == [
        c for c in (c for c, _ in steps) if "sigma-s4" in " ".join(c)
    ]
    assert any("sigma=0.02,0.05" in c for c in table) and any("sigma=0.1 " in c for c in table)
    assert any("mask-compression=false" in c for c in table)
    assert sum("seed=43,44" in c for c in cmds) == 4  # centralized, split, sync-every 1, lr x2
    assert any("grad-dp-noise=0.05,0.1,0.3" in c and "grad-dp-clip=0.04" in c for c in cmds)
    gdp = [c for c, _ in experiments.plan(tmp_path, ("gdp",))]
    assert gdp == [c for c, _ in steps if "grad-dp-clip=0.04" in " ".join(c)] and len(gdp) == 3

    ov = ("seed=43,44", "++run_config.sigma=0.02,0.05,0.1", "app=fl-llama")
    assert experiments.jobs(ov) == 6
    folder = tmp_path / "fl-llama-gap" / "split-gdp2"
    for i in range(2):
        (folder / str(i)).mkdir(parents=True)
        (folder / str(i) / "results.json").write_text("{}")
    assert not experiments.plan(tmp_path, ("gdp",))[1][1]  # 2 of 3 runs: not done
    (folder / "2").mkdir()
    (folder / "2" / "results.json").write_text("{}")
    assert experiments.plan(tmp_path, ("gdp",))[1][1]
    title = [" ".join(c) for c, _ in experiments.plan(tmp_path, ("title",))]
    assert len(title) == 2 and all("task=title" in c for c in title)
    assert sum("method=centralized" in c for c in title) == 1  # vs split-sequential, seed 42
    with pytest.raises(SystemExit, match="unknown group 'x'"):
        experiments.main(["--only", "x", "--out", str(tmp_path)])


# ---------------------------------------------------------------------------- privacy
def test_gradient_dp_rdp_uses_replace_one_sensitivity_by_hand():
    """z = 1: std 1 x C, sensitivity 2 C -> multiplier 0.5 -> RDP alpha / (2 x 0.25) = 2 alpha
    per release; 3 releases add up."""
    np.testing.assert_allclose(privacy.releases_rdp(1.0, 1, orders=(2.0, 3.0)), [4.0, 6.0])
    np.testing.assert_allclose(privacy.releases_rdp(1.0, 3, orders=(2.0, 3.0)), [12.0, 18.0])
    np.testing.assert_allclose(privacy.releases_rdp(0.5, 1, orders=(2.0,)), [16.0])
    with pytest.raises(ValueError, match="noise must be > 0"):
        privacy.releases_rdp(0.0, 1)


def test_gradient_dp_epsilon_by_hand():
    """epsilon(alpha) = rdp - (ln delta + ln alpha) / (alpha - 1) + ln((alpha - 1) / alpha), at
    z = 1, one release, delta 1e-5: alpha 2 -> 14.13, alpha 3 -> 6 + 10.4143 / 2 - 0.4055 =
    10.8017, alpha 4 -> 11.09: the minimum over the grid is at alpha 3."""
    eps, order = privacy.epsilon(1.0, 1, 1e-5)
    assert order == 3.0
    by_hand = 6 - (math.log(1e-5) + math.log(3)) / 2 + math.log(2 / 3)
    assert eps == pytest.approx(by_hand, abs=1e-9) and by_hand == pytest.approx(10.8017, abs=1e-4)
    assert privacy.epsilon(1.0, 0)[0] == 0.0
    # more noise, fewer releases: smaller epsilon
    assert privacy.epsilon(0.3, 1)[0] > eps > privacy.epsilon(3.0, 1)[0]
    assert privacy.epsilon(1.0, 2)[0] > eps


def test_max_releases_counts_the_runs_batches():
    """One step: every example at most once (drawn without replacement); the count over a run
    is the most frequent index of the seeded batches."""
    assert privacy.max_releases(42, 2, 1, 1, 4) == 1
    from flllama.task import client_pool

    seen = {}
    for pid in range(2):
        for rnd in (1, 2):
            for step in range(3):
                for i in D.batch_indices(client_pool(pid, 2), 50, 7, pid, rnd, step).tolist():
                    seen[i] = seen.get(i, 0) + 1
    assert privacy.max_releases(7, 2, 2, 3, 50) == max(seen.values()) > 1


# ---------------------------------------------------------------------------- benchmark
def test_bench_train_seconds_leave_out_round0_and_eval():
    res = {
        "rounds": [
            {"round": 0, "round_time_s": 7.0, "eval_time_s": 7.0},
            {"round": 1, "round_time_s": 5.0, "eval_time_s": 1.5},
            {"round": 2, "round_time_s": 4.0, "eval_time_s": 1.0},
        ]
    }
    assert bench.train_seconds(res) == pytest.approx(6.5)


def test_bench_modes_table_ratios():
    times = {("centralized", 2): 2.0, ("split-sequential", 2): 3.0, ("split-hierarchical", 2): 1.0}
    text = bench.modes_table(times, [2])
    assert "| split-sequential | 2 | 3.00 | 1.50 | 1.80 |" in text  # paper 689.2 / 381.9
    assert "| split-hierarchical | 2 | 1.00 | 0.50 | 0.91 |" in text  # 348.2 / 381.9


def test_bench_decode_runs_on_tiny():
    rows = bench.decode_speed("tiny", [3], 1, 1, repeat=1)
    assert [r["new_tokens"] for r in rows] == [3]
    assert {"tok_s_cache", "tok_s_nocache", "speedup", "prompt_tokens"} <= set(rows[0])
    assert "| 3 |" in bench.decode_table(rows)


@pytest.mark.slow
def test_bench_modes_runs_on_tiny(tmp_path):
    """Every mode and centralized through a fresh runner process (tiny model, 2 clients)."""
    args = bench.parser().parse_args(
        [
            "--part",
            "modes",
            "--model",
            "tiny",
            "--clients",
            "2",
            "--total-batches",
            "2",
            "--max-chars",
            "30",
            "--launcher",
            "local",
            "--out",
            str(tmp_path),
        ]
    )
    text = bench.bench_modes(args)
    for m in ("centralized", *bench.MODES):
        assert f"| {m} | 2 |" in text
