"""Benchmark: FedAvg through Flower's simulation engine against a plain sequential loop.

    python -m flowerbed.simulation.bench                 # 100 clients, 10 per round, 5 rounds
    python -m flowerbed.simulation.bench --scale         # + memory at 1000 virtual clients
    python -m flowerbed.simulation.bench --modes plain,inprocess,flwr

Both sides run the FedAvg app's own task functions (same data, model, seeds, sampled clients
and local steps) and each is started as a fresh process (cold start). Measured per mode:

- end to end: wall time from spawning the process to its exit;
- start-up: end to end minus the time spent in the 5 rounds (imports, data, Ray, actors,
  initial evaluation, shutdown);
- steady round: mean wall time of rounds 2..R (training of the sampled clients, aggregation,
  evaluation on the test split); round 1 is left out as it includes actor warm-up;
- overhead per client call: (steady round of the mode - steady round of the plain loop) / calls
  per round;
- peak memory: the maximum over time of the memory summed over the process and all its
  descendants (Ray's GCS, raylet and workers, the SuperLink, ...), as PSS (shared pages split
  between the processes that map them; what the machine really spends) and as RSS (shared pages
  counted once per process).

Timed runs have nothing watching them; memory comes from one more run of each mode sampled
every 0.1 s, because reading ``/proc/<pid>/smaps_rollup`` of every process of a Ray tree costs
enough CPU to slow the rounds it is watching on 2 cores.

Modes: ``plain`` (:mod:`flowerbed.simulation.plain`), ``inprocess`` (ServerApp thread + Ray
actors, :func:`flowerbed.simulation.inprocess.run_app`), ``flwr`` (the real ``flwr run`` CLI
with a SuperLink, :func:`flowerbed.simulation.flwr_cli.flwr_run`). Ray gets one actor with both
cores (``num_cpus=2``), so Flower and the plain loop train the clients one after the other with
the same torch threads and the difference is framework cost, not parallelism.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROUNDS = 5


def overrides(rounds: int, results_dir: str, fraction: float) -> dict:
    return {
        "num-server-rounds": rounds,
        "fraction-train": fraction,
        "partitioner": "iid",
        "local-epochs": 1,
        "batch-size": 32,
        "results-dir": results_dir,
        "seed": 0,
    }


# ---------------------------------------------------------------- child side
def child(mode: str, clients: int, per_round: int, rounds: int, out: str) -> None:
    t_start = time.time()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    res_dir = str(Path(out).parent / f"results-{mode}-{clients}")
    ov = overrides(rounds, res_dir, per_round / clients)
    phases: dict[str, float] = {}
    if mode == "plain":
        from flowerbed.simulation.plain import run

        t_run = time.time()
        r = run(ov, clients, per_round)
        times, train = r["round_times"], r["train_times"]
        acc = r["history"][rounds]["accuracy"]
        phases = {
            "imports": t_run - t_start + r["imports_s"],
            "initial evaluation": r["initial_eval_s"],
        }
    else:
        t_app = time.time()
        if mode == "inprocess":
            from flowerbed.simulation.inprocess import run_app

            timings: dict[str, float] = {}
            run_app("fedavg", ov, num_supernodes=clients, num_cpus=2, timings=timings)
        else:
            from flowerbed.simulation.flwr_cli import flwr_run

            p = flwr_run("fedavg", ov, num_supernodes=clients, num_cpus=2)
            if p.returncode != 0:
                raise SystemExit(p.stderr[-3000:])
        rec = json.loads((Path(res_dir) / "results.json").read_text())
        rows = [r for r in rec["rounds"] if r["round"] >= 1]
        times = [r["round_time_s"] for r in rows]
        train = [r.get("train_train-time-s", 0.0) for r in rows]
        acc = rec["extra"]["final"]["accuracy"]
        if mode == "inprocess":
            phases = {
                "imports": t_app - t_start + timings["imports_s"],
                "ray start": timings["ray_start_s"],
                "app import": timings["app_import_s"],
                "initial evaluation": rec["rounds"][0]["round_time_s"],
                "teardown": timings["simulation_s"] - rec["wall_time_s"],
            }
    out_rec = {"round_times": times, "train_times": train, "accuracy": acc, "phases": phases}
    out_rec["t_start"], out_rec["t_end"] = t_start, time.time()
    Path(out).write_text(json.dumps(out_rec))


# ---------------------------------------------------------------- parent side
def _label(p: psutil.Process, root: psutil.Process) -> str:
    """A short name for a process of the tree: driver, ray::X, gcs_server, dashboard.py, ..."""
    if p.pid == root.pid:
        return "driver"
    cmd = p.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split()[0].split(".")[0]
    for arg in cmd[:3]:
        if arg.endswith(".py") or "flower-" in arg or "flwr-" in arg:
            return Path(arg).name
    return Path(cmd[0]).name if cmd else p.name()


def _tree_memory(proc: psutil.Process) -> tuple[int, int, dict[str, int]]:
    """(PSS, RSS, PSS per process label) summed over ``proc`` and its descendants."""
    pss = rss = 0
    parts: dict[str, int] = {}
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            label = _label(p, proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
        pss += info.pss
        rss += info.rss
        parts[label] = parts.get(label, 0) + info.pss
    return pss, rss, parts


def measure(
    mode: str, clients: int, per_round: int, rounds: int, tmp: Path, memory: bool = False
) -> dict:
    """One cold run of ``mode``: times, or (``memory=True``) peak memory sampled every 0.1 s."""
    out = tmp / f"{mode}-{clients}.json"
    cmd = [
        sys.executable,
        "-m",
        "flowerbed.simulation.bench",
        "--child",
        mode,
        "--clients",
        str(clients),
        "--per-round",
        str(per_round),
        "--rounds",
        str(rounds),
        "--out",
        str(out),
    ]
    env = {**os.environ, "FLOWERBED_OUTPUTS": str(tmp)}
    t_spawn = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    peak: list = [0, 0, {}]
    done = threading.Event()

    def sample():
        while not done.is_set():
            pss, rss, parts = _tree_memory(ps)
            if pss > peak[0]:
                peak[0], peak[2] = pss, parts
            peak[1] = max(peak[1], rss)
            done.wait(0.1)

    th = threading.Thread(target=sample, daemon=True) if memory else None
    if th:
        th.start()
    _, err = proc.communicate()
    e2e = time.perf_counter() - t0
    done.set()
    if th:
        th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} with {clients} clients failed:\n{err.decode()[-3000:]}")
    r = json.loads(out.read_text())
    times = r["round_times"]
    steady = sum(times[1:]) / max(len(times) - 1, 1)
    phases = {
        "python start": r["t_start"] - t_spawn,
        **r["phases"],
        "round 1 - steady round": times[0] - steady,
        "exit": e2e - (r["t_end"] - t_spawn),
    }
    return {
        "mode": mode,
        "clients": clients,
        "e2e_s": e2e,
        "startup_s": e2e - sum(times),
        "steady_round_s": steady,
        "train_call_s": sum(r["train_times"][1:]) / max(len(times) - 1, 1),
        "phases": phases,
        "peak_pss_mb": peak[0] / 2**20,
        "peak_rss_mb": peak[1] / 2**20,
        "peak_parts_mb": {k: round(v / 2**20) for k, v in peak[2].items()},
        "accuracy": r["accuracy"],
    }


def measure_modes(
    modes: list[str], clients: int, per_round: int, rounds: int, tmp: Path, repeat: int = 1
) -> list[dict]:
    """Per mode: each time the median of ``repeat`` unobserved runs, memory from one sampled run.

    The repeats are interleaved (plain, inprocess, flwr, plain, ...) so that a slow phase of
    the machine does not fall on one mode only. The median, not the best run: Flower's round
    times vary more than the plain loop's (e.g. its engine picks up messages on a 100 ms
    cycle), and the best of a few runs would favour the mode with the larger spread.
    """
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(repeat):
        for m in modes:
            runs[m].append(measure(m, clients, per_round, rounds, tmp))
    rows = []
    for m in modes:
        by_e2e = sorted(runs[m], key=lambda r: r["e2e_s"])
        row = dict(by_e2e[(len(by_e2e) - 1) // 2])  # the median run's start-up phases are shown
        for key in ("e2e_s", "startup_s", "steady_round_s", "train_call_s"):
            row[key] = statistics.median(r[key] for r in runs[m])
        for key in ("e2e_s", "steady_round_s"):
            row[key + "_all"] = [round(r[key], 2) for r in runs[m]]
        mem = measure(m, clients, per_round, rounds, tmp, memory=True)
        for key in ("peak_pss_mb", "peak_rss_mb", "peak_parts_mb"):
            row[key] = mem[key]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def report(rows: list[dict], per_round: int) -> str:
    base = next(r for r in rows if r["mode"] == "plain" and r["clients"] == rows[0]["clients"])
    lines = [
        "| mode | clients | end to end (s) | start-up (s) | steady round (s) | overhead/call (ms)"
        " | local SGD/call (ms) | peak PSS (MB) | peak RSS (MB) | final acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ov = "n/a"  # the plain loop ran with the first row's client count only
        if r["clients"] == base["clients"]:
            ov = f"{(r['steady_round_s'] - base['steady_round_s']) / per_round * 1000:.0f}"
        lines.append(
            f"| {r['mode']} | {r['clients']} | {r['e2e_s']:.1f} | {r['startup_s']:.1f} | "
            f"{r['steady_round_s']:.2f} | {ov} | {r['train_call_s'] * 1000:.0f} | "
            f"{r['peak_pss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['accuracy']:.4f} |"
        )
    lines += [
        "",
        "| ratio to plain loop (100 clients) | end to end | steady round | peak PSS | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["mode"] == "plain" or r["clients"] != base["clients"]:
            continue
        lines.append(
            f"| {r['mode']} | {r['e2e_s'] / base['e2e_s']:.2f}x | "
            f"{r['steady_round_s'] / base['steady_round_s']:.2f}x | "
            f"{r['peak_pss_mb'] / base['peak_pss_mb']:.2f}x | "
            f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x |"
        )
    scale = [r for r in rows if r["mode"] == "inprocess"]
    if len(scale) > 1:
        a, b = scale[0], scale[-1]
        lines += [
            "",
            f"memory {a['clients']} -> {b['clients']} virtual clients (inprocess): "
            f"PSS {a['peak_pss_mb']:.0f} -> {b['peak_pss_mb']:.0f} MB "
            f"({b['peak_pss_mb'] / a['peak_pss_mb']:.2f}x)",
        ]
    lines += ["", "every timed run (s), the median of which is in the table:"]
    for r in rows:
        lines.append(
            f"- {r['mode']} ({r['clients']} clients): end to end {r['e2e_s_all']}, "
            f"steady round {r['steady_round_s_all']}"
        )
    lines += ["", "where the steady-round overhead per call goes (ms):"]
    for r in rows:
        if r["mode"] == "plain" or r["clients"] != base["clients"]:
            continue
        ov = (r["steady_round_s"] - base["steady_round_s"]) / per_round * 1000
        sgd = (r["train_call_s"] - base["train_call_s"]) * 1000
        lines.append(
            f"- {r['mode']}: {ov:.0f} = local SGD slower in the actor {sgd:.0f}"
            f" + messages, Ray calls and polling {ov - sgd:.0f}"
        )
    lines += ["", "start-up and shutdown (s, from the run with the median end to end):"]
    for r in rows:
        lines.append(
            f"- {r['mode']} ({r['clients']} clients): "
            + ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items())
        )
    lines += ["", "peak PSS by process (MB, at the sample where the total peaked):"]
    for r in rows:
        parts = sorted(r.get("peak_parts_mb", {}).items(), key=lambda kv: -kv[1])
        lines.append(
            f"- {r['mode']} ({r['clients']} clients): " + ", ".join(f"{k} {v}" for k, v in parts)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="plain,inprocess,flwr")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--scale", action="store_true", help="also 1000 virtual clients (inprocess)")
    ap.add_argument(
        "--repeat", type=int, default=3, help="timed runs per mode (interleaved); median kept"
    )
    ap.add_argument("--child", default="")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    if a.child:
        child(a.child, a.clients, a.per_round, a.rounds, a.out)
        return
    tmp = Path(tempfile.mkdtemp(prefix="flowerbed-bench-"))
    # warm the dataset and partition caches so that no mode pays for decoding the IDX files
    from flowerbed.common.client import local_tensors

    local_tensors("fashion_mnist", 0, a.clients, "iid", 0)
    modes = [m for m in a.modes.split(",") if m]
    rows = measure_modes(modes, a.clients, a.per_round, a.rounds, tmp, a.repeat)
    if a.scale:
        local_tensors("fashion_mnist", 0, 1000, "iid", 0)
        rows += measure_modes(["inprocess"], 1000, a.per_round, a.rounds, tmp)
    print(report(rows, a.per_round))


if __name__ == "__main__":
    main()
