"""Benchmark: FedAvg through Flower (simulation and deployment) against a plain loop and stock Flower.

    python -m flowerbed.simulation.bench                 # both groups below
    python -m flowerbed.simulation.bench --scale         # + memory at 1000 virtual clients
    python -m flowerbed.simulation.bench --modes plain,inprocess --deploy-modes ""
    python -m flowerbed.simulation.bench --rounds 2 --repeat 1   # a quick functional run

Every mode runs the same workload (Fashion-MNIST, IID partitions, the FedAvg app's CNN, SGD with
batch 32 for one local epoch, server-side evaluation on the 10,000 test images after every
round) and each run is a fresh process (cold start). Two groups of modes:

Simulation group (``--modes``; ``--clients`` 100 clients, ``--per-round`` 10 sampled per round):
``plain`` (:mod:`flowerbed.simulation.plain`, a sequential loop, no Flower), ``inprocess``
(ServerApp thread + Ray actors, :func:`flowerbed.simulation.inprocess.run_app`), ``flwr`` (the
real ``flwr run`` CLI with a SuperLink, :func:`flowerbed.simulation.flwr_cli.flwr_run`) and
``stock`` (the same workload written the way Flower's quickstart writes it,
``simulation/stock_app``: data loaded and partitioned with flwr-datasets inside the ClientApp
call, Flower's own FedAvg, ``flwr run`` on a local SuperLink). Ray gets one actor with both cores
(``num_cpus=2``), so every mode trains the clients one after the other with the same torch
threads and the difference is framework cost, not parallelism.

Deployment group (``--deploy-modes``; ``--deploy-clients`` clients, all sampled every round):
``deploy`` (SuperLink + one SuperNode per client on loopback, TLS and SuperNode authentication,
:class:`flowerbed.simulation.deploy.Deployment`, ClientApps forked from a warm process, the
SuperNodes' waits capped at ``--supernode-poll`` 0.2 s, the SuperLink's state in memory unless
``--superlink-db``),
``deploy-spawn`` (the same with a fresh interpreter per ClientApp call, as Flower starts them),
``deploy-flower`` (Flower's own ``--isolation subprocess``), against ``inprocess`` and ``plain``
on the same clients. Each SuperNode gets cores // clients torch threads and the simulation's
actors the same share (``num_cpus`` = cores / clients), so both run all clients side by side
with the same threads.

Measured per mode:

- end to end: wall time from spawning the process to its exit;
- start-up: end to end minus the time spent in the rounds (imports, data, Ray or the SuperLink
  and SuperNodes, actors, initial evaluation, shutdown);
- steady round: mean wall time of rounds 2..R (training of the sampled clients, aggregation,
  evaluation on the test split); round 1 is left out as it includes actor warm-up;
- overhead per client call: (steady round of the mode - steady round of the plain loop) / calls
  per round;
- local SGD per call and per step: the ClientApps' own ``train-time-s`` (wall time of the local
  SGD loop) and ``steps``, mean over the steady rounds;
- peak memory: the maximum over time of the memory summed over the process and all its
  descendants (Ray's GCS, raylet and workers, the SuperLink, SuperNodes, ClientApps, ...), as
  PSS (shared pages split between the processes that map them; what the machine really spends)
  and as RSS (shared pages counted once per process); with a GPU (``nvidia-smi``), also GPU
  memory per process and GPU utilisation;
- deployed round breakdown (``deploy``, ``deploy-spawn``): the steady round cut, along the
  client whose reply came last, into the message's way to the ClientApp (SuperLink, the
  SuperNode's poll, the executor's), the ClientApp process start (fork, or interpreter and
  imports), Flower's runtime in the ClientApp (task input, message arrays, FAB install, app
  import), the call's own work besides training (partition, model, records), training, the
  reply's push, the ClientApp's exit, the reply's way to the ServerApp and the evaluation
  (:mod:`flowerbed.simulation.clientapp_exec` timings and the results file's ``t_end``).

Timed runs have nothing watching them; memory comes from one more run of each mode sampled
every 0.1 s, because reading ``/proc/<pid>/smaps_rollup`` of every process of a Ray tree costs
enough CPU to slow the rounds it is watching on 2 cores. Times are the median of ``--repeat``
runs per mode, interleaved (plain, inprocess, flwr, stock, plain, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROUNDS = 5
SIM_MODES = ("plain", "inprocess", "flwr", "stock")
DEPLOY_MODES = ("deploy", "deploy-spawn", "deploy-flower")
MODES = SIM_MODES + DEPLOY_MODES
STOCK_APP = Path(__file__).resolve().parent / "stock_app"


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


def stock_overrides(rounds: int, results_dir: str, fraction: float) -> dict:
    """The stock app's run config for the same workload (its keys are the quickstart's)."""
    return {
        "num-server-rounds": rounds,
        "fraction-train": fraction,
        "local-epochs": 1,
        "batch-size": 32,
        "lr": 0.1,
        "results-dir": results_dir,
    }


def actor_cpus(clients: int) -> float:
    """CPUs per actor so that ``clients`` actors run side by side (Ray's 0.0001 granularity)."""
    from flowerbed.common.threads import host_cpus

    return max(math.floor(host_cpus() / clients * 1e4) / 1e4, 1e-4)


# ---------------------------------------------------------------- child side
def child(
    mode: str,
    clients: int,
    per_round: int,
    rounds: int,
    out: str,
    num_cpus: float = 2,
    num_gpus: float = 0.0,
) -> None:
    t_start = time.time()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    res_dir = str(Path(out).parent / f"results-{mode}-{clients}")
    ov = overrides(rounds, res_dir, per_round / clients)
    phases: dict[str, float] = {}
    tasks: list[dict] = []
    if mode == "plain":
        from flowerbed.simulation.plain import run

        t_run = time.time()
        r = run(ov, clients, per_round)
        times, train = r["round_times"], r["train_times"]
        steps = r["steps"]
        acc = r["history"][rounds]["accuracy"]
        phases = {
            "imports": t_run - t_start + r["imports_s"],
            "initial evaluation": r["initial_eval_s"],
        }
        threads = None
    else:
        t_app = time.time()
        if mode == "inprocess":
            from flowerbed.simulation.inprocess import run_app

            timings: dict[str, float] = {}
            run_app(
                "fedavg",
                ov,
                num_supernodes=clients,
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                timings=timings,
            )
        elif mode in ("flwr", "stock"):
            from flowerbed.simulation.flwr_cli import flwr_run

            app, cfg = "fedavg", ov
            if mode == "stock":
                app, cfg = str(STOCK_APP), stock_overrides(rounds, res_dir, per_round / clients)
            p = flwr_run(app, cfg, num_supernodes=clients, num_cpus=num_cpus, num_gpus=num_gpus)
            if p.returncode != 0 or not (Path(res_dir) / "results.json").exists():
                raise SystemExit(p.stdout[-3000:] + p.stderr[-3000:])
        else:
            tasks = _deploy(mode, ov, clients, Path(out).parent / f"deploy-{mode}")
        rec = json.loads((Path(res_dir) / "results.json").read_text())
        rows = [r for r in rec["rounds"] if r["round"] >= 1]
        times = [r["round_time_s"] for r in rows]
        train = [r.get("train_train-time-s", 0.0) for r in rows]
        steps = [r.get("train_steps", 0.0) for r in rows]
        threads = rows[-1].get("train_torch-threads")
        acc = rec["extra"]["final"]["accuracy"]
        if mode == "inprocess":
            phases = {
                "imports": t_app - t_start + timings["imports_s"],
                "ray start": timings["ray_start_s"],
                "app import": timings["app_import_s"],
                "initial evaluation": rec["rounds"][0]["round_time_s"],
                "teardown": timings["simulation_s"] - rec["wall_time_s"],
            }
        if mode.startswith("deploy"):
            phases = {"initial evaluation": rec["rounds"][0].get("eval_time_s", 0.0)}
            tasks = {"tasks": tasks, "rounds": rec["rounds"]}
    out_rec = {
        "round_times": times,
        "train_times": train,
        "steps": steps,
        "threads": threads,
        "accuracy": acc,
        "phases": phases,
        "deploy": tasks,
    }
    out_rec["t_start"], out_rec["t_end"] = t_start, time.time()
    Path(out).write_text(json.dumps(out_rec))


def _deploy(mode: str, ov: dict, clients: int, workdir: Path) -> list[dict]:
    """One FedAvg run on a loopback deployment; returns the ClientApp tasks' timings."""
    from flowerbed.simulation.deploy import Deployment

    start = {"deploy": "warm", "deploy-spawn": "spawn", "deploy-flower": "flower"}[mode]
    shutil.rmtree(workdir, ignore_errors=True)
    poll = float(os.environ.get("FLOWERBED_BENCH_SUPERNODE_POLL", "0")) or None
    db = workdir / "superlink.db" if os.environ.get("FLOWERBED_BENCH_SUPERLINK_DB") else None
    with Deployment(
        workdir,
        clientapp_exec=start,
        timings=start != "flower",
        supernode_poll=poll if start != "flower" else None,
        database=db,
    ) as d:
        d.start_superlink()
        for i in range(clients):
            d.add_supernode(i, clients)
        p = d.run("fedavg", ov)
        if p.returncode != 0:
            raise SystemExit(p.stdout[-3000:] + p.stderr[-3000:])
        return d.task_timings()


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
        if arg == "flowerbed.simulation.clientapp_exec":
            return "clientapp-exec (ClientApps)"
        if arg == "flowerbed.simulation.supernode":
            return "flower-supernode"
    return Path(cmd[0]).name if cmd else p.name()


def _tree_memory(proc: psutil.Process) -> tuple[int, int, dict[str, int], dict[int, str]]:
    """(PSS, RSS, PSS per process label, label per PID) over ``proc`` and its descendants."""
    pss = rss = 0
    parts: dict[str, int] = {}
    labels: dict[int, str] = {}
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            label = _label(p, proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
        pss += info.pss
        rss += info.rss
        parts[label] = parts.get(label, 0) + info.pss
        labels[p.pid] = label
    return pss, rss, parts, labels


def gpu_sample() -> tuple[float, dict[int, int]] | None:
    """(GPU utilisation %, GPU MB per PID) from ``nvidia-smi``; None without a GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        util = subprocess.run(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
        apps = subprocess.run(
            [
                "nvidia-smi",
                "--query-compute-apps=pid,used_memory",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_gpu(util, apps)


def parse_gpu(util_csv: str, apps_csv: str) -> tuple[float, dict[int, int]] | None:
    """Parse ``nvidia-smi`` CSV output: mean utilisation over GPUs, memory (MB) per PID."""
    utils = [float(x) for x in util_csv.split() if x.strip().replace(".", "", 1).isdigit()]
    if not utils:
        return None
    mem: dict[int, int] = {}
    for line in apps_csv.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            mem[int(fields[0])] = mem.get(int(fields[0]), 0) + int(fields[1])
    return sum(utils) / len(utils), mem


def measure(
    mode: str,
    clients: int,
    per_round: int,
    rounds: int,
    tmp: Path,
    memory: bool = False,
    num_cpus: float = 2,
    num_gpus: float = 0.0,
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
        "--num-cpus",
        str(num_cpus),
        "--gpus",
        str(num_gpus),
        "--out",
        str(out),
    ]
    env = {**os.environ, "FLOWERBED_OUTPUTS": str(tmp)}
    t_spawn = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    peak: list = [0, 0, {}]
    gpu: dict = {"util": [], "mb": {}}
    done = threading.Event()

    def sample():
        while not done.is_set():
            pss, rss, parts, labels = _tree_memory(ps)
            if pss > peak[0]:
                peak[0], peak[2] = pss, parts
            peak[1] = max(peak[1], rss)
            g = gpu_sample()
            if g is not None:
                gpu["util"].append(g[0])
                for pid, mb in g[1].items():
                    if pid in labels:
                        key = f"{labels[pid]} (pid {pid})"
                        gpu["mb"][key] = max(gpu["mb"].get(key, 0), mb)
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
    steady_train = r["train_times"][1:] or r["train_times"]
    steady_steps = r["steps"][1:] or r["steps"]
    phases = {
        "python start": r["t_start"] - t_spawn,
        **r["phases"],
        "round 1 - steady round": times[0] - steady,
        "exit": e2e - (r["t_end"] - t_spawn),
    }
    step_ms = None
    if steady_steps and all(steady_steps):
        step_ms = (
            statistics.mean(t / n for t, n in zip(steady_train, steady_steps, strict=True)) * 1000
        )
    return {
        "mode": mode,
        "clients": clients,
        "e2e_s": e2e,
        "startup_s": e2e - sum(times),
        "steady_round_s": steady,
        "train_call_s": statistics.mean(steady_train) if steady_train else 0.0,
        "step_ms": step_ms,
        "threads": r.get("threads"),
        "phases": phases,
        "breakdown": deploy_breakdown(r["deploy"]) if r.get("deploy") else {},
        "peak_pss_mb": peak[0] / 2**20,
        "peak_rss_mb": peak[1] / 2**20,
        "peak_parts_mb": {k: round(v / 2**20) for k, v in peak[2].items()},
        "gpu_util_pct": statistics.mean(gpu["util"]) if gpu["util"] else None,
        "gpu_mb": gpu["mb"],
        "accuracy": r["accuracy"],
    }


BREAKDOWN = (
    ("to the ClientApp", "message to the executor: SuperLink, SuperNode's poll, executor's poll"),
    ("process start", "fork from the warm process, or interpreter start and imports"),
    ("task input", "Flower runtime: context, run and FAB from the SuperNode"),
    ("message arrays", "Flower runtime: the message's arrays from the SuperNode"),
    ("FAB install", "Flower runtime: unpack and check the app bundle"),
    ("app import", "Flower runtime: import the app's modules"),
    ("call, not training", "partition, model build, records"),
    ("training", "local SGD (train-time-s)"),
    ("reply push", "reply to the SuperNode"),
    ("ClientApp exit", "task status and context to the SuperNode, exit"),
    ("reply to ServerApp", "SuperNode's poll, SuperLink, ServerApp's poll, aggregation"),
    ("evaluation", "server-side evaluation on the test split"),
)


def deploy_breakdown(dep: dict) -> dict[str, float]:
    """Mean over the steady rounds of a deployed round's parts (seconds), which add up to it.

    Each round is followed along the ClientApp task whose reply came last: from the end of the
    previous round (the ServerApp's ``t_end``) to the task's acquisition by the executor, its
    process, Flower's runtime steps and the call, its end, and from there to the end of the
    round (reply to the ServerApp, aggregation, evaluation).
    """
    rounds = {r["round"]: r for r in dep["rounds"]}
    per_round: list[dict[str, float]] = []
    for rnd in sorted(rounds):
        if rnd < 2 or rnd - 1 not in rounds or "t_end" not in rounds[rnd]:
            continue
        tasks = [
            t
            for t in dep["tasks"]
            if t.get("round") == rnd and t.get("message_type") == "train" and "ready" in t
        ]
        if not tasks:
            continue
        t = max(tasks, key=lambda x: x["done"])
        start, end = rounds[rnd - 1]["t_end"], rounds[rnd]["t_end"]
        evaluation = rounds[rnd].get("eval_time_s", 0.0)
        inside = {
            "task input": t.get("pull_input_s", 0.0) - t.get("pull_arrays_s", 0.0),
            "message arrays": t.get("pull_arrays_s", 0.0),
            "FAB install": t.get("fab_install_s", 0.0),
            "app import": t.get("app_load_s", 0.0),
            "call, not training": t.get("call_s", 0.0) - t.get("train-time-s", 0.0),
            "training": t.get("train-time-s", 0.0),
            "reply push": t.get("push_reply_s", 0.0),
        }
        parts = {
            "to the ClientApp": t["acquired"] - start,
            "process start": t["ready"] - t["acquired"],
            **inside,
            "ClientApp exit": t["done"] - t["ready"] - sum(inside.values()),
            "reply to ServerApp": end - evaluation - t["done"],
            "evaluation": evaluation,
        }
        parts["round"] = end - start
        per_round.append(parts)
    if not per_round:
        return {}
    return {k: statistics.mean(p[k] for p in per_round) for k in per_round[0]}


def measure_modes(
    modes: list[str],
    clients: int,
    per_round: int,
    rounds: int,
    tmp: Path,
    repeat: int = 1,
    num_cpus: float = 2,
    num_gpus: float = 0.0,
) -> list[dict]:
    """Per mode: each time the median of ``repeat`` unobserved runs, memory from one sampled run.

    The repeats are interleaved (plain, inprocess, flwr, plain, ...) so that a slow phase of
    the machine does not fall on one mode only. The median, not the best run: Flower's round
    times vary more than the plain loop's (e.g. its engine picks up messages on a 100 ms
    cycle), and the best of a few runs would favour the mode with the larger spread.
    """
    kw = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(repeat):
        for m in modes:
            runs[m].append(measure(m, clients, per_round, rounds, tmp, **kw))
    rows = []
    for m in modes:
        by_e2e = sorted(runs[m], key=lambda r: r["e2e_s"])
        row = dict(by_e2e[(len(by_e2e) - 1) // 2])  # the median run's start-up phases are shown
        for key in ("e2e_s", "startup_s", "steady_round_s", "train_call_s"):
            row[key] = statistics.median(r[key] for r in runs[m])
        if all(r["step_ms"] is not None for r in runs[m]):
            row["step_ms"] = statistics.median(r["step_ms"] for r in runs[m])
        if row["breakdown"]:
            keys = row["breakdown"].keys()
            row["breakdown"] = {
                k: statistics.median(r["breakdown"][k] for r in runs[m] if r["breakdown"])
                for k in keys
            }
        for key in ("e2e_s", "steady_round_s"):
            row[key + "_all"] = [round(r[key], 2) for r in runs[m]]
        mem = measure(m, clients, per_round, rounds, tmp, memory=True, **kw)
        for key in ("peak_pss_mb", "peak_rss_mb", "peak_parts_mb", "gpu_util_pct", "gpu_mb"):
            row[key] = mem[key]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _fmt(v, spec: str, none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def report(rows: list[dict], per_round: int) -> str:
    """The simulation group's tables (plain loop, Flower's engine, flwr run, stock Flower)."""
    base = next(r for r in rows if r["mode"] == "plain" and r["clients"] == rows[0]["clients"])
    lines = [
        "| mode | clients | end to end (s) | start-up (s) | steady round (s) | overhead/call (ms)"
        " | local SGD/call (ms) | local SGD/step (ms) | peak PSS (MB) | peak RSS (MB) | final acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ov = "n/a"  # the plain loop ran with the first row's client count only
        if r["clients"] == base["clients"]:
            ov = f"{(r['steady_round_s'] - base['steady_round_s']) / per_round * 1000:.0f}"
        lines.append(
            f"| {r['mode']} | {r['clients']} | {r['e2e_s']:.1f} | {r['startup_s']:.1f} | "
            f"{r['steady_round_s']:.2f} | {ov} | {r['train_call_s'] * 1000:.0f} | "
            f"{_fmt(r.get('step_ms'), '.1f')} | "
            f"{r['peak_pss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['accuracy']:.4f} |"
        )
    lines += [
        "",
        f"| ratio to plain loop ({base['clients']} clients) | end to end | steady round "
        "| peak PSS | peak RSS |",
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
    stock = next((r for r in rows if r["mode"] == "stock"), None)
    if stock:
        lines += [
            "",
            "| stock Flower / flowerbed (same run) | end to end | steady round | local SGD/step"
            " | peak PSS |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            if r["mode"] not in ("inprocess", "flwr") or r["clients"] != stock["clients"]:
                continue
            sgd = "n/a"
            if r.get("step_ms") and stock.get("step_ms"):
                sgd = f"{stock['step_ms'] / r['step_ms']:.2f}x"
            lines.append(
                f"| stock / {r['mode']} | {stock['e2e_s'] / r['e2e_s']:.2f}x | "
                f"{stock['steady_round_s'] / r['steady_round_s']:.2f}x | {sgd} | "
                f"{stock['peak_pss_mb'] / r['peak_pss_mb']:.2f}x |"
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
    lines += _all_runs(rows)
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
    lines += _phases_and_memory(rows)
    return "\n".join(lines)


def _all_runs(rows: list[dict]) -> list[str]:
    return [
        f"- {r['mode']} ({r['clients']} clients): end to end {r['e2e_s_all']}, "
        f"steady round {r['steady_round_s_all']}"
        for r in rows
    ]


def _phases_and_memory(rows: list[dict]) -> list[str]:
    lines = ["", "start-up and shutdown (s, from the run with the median end to end):"]
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
    gpu = [r for r in rows if r.get("gpu_util_pct") is not None]
    if gpu:
        lines += ["", "GPU (nvidia-smi every 0.1 s): mean utilisation, peak memory per process:"]
        for r in gpu:
            mb = ", ".join(f"{k} {v} MB" for k, v in sorted(r["gpu_mb"].items()))
            lines.append(
                f"- {r['mode']} ({r['clients']} clients): {r['gpu_util_pct']:.0f}% ; {mb or '-'}"
            )
    return lines


def report_deploy(rows: list[dict]) -> str:
    """The deployment group's tables: deployed rounds against the in-process simulation."""
    lines = [
        "| mode | clients | torch threads | end to end (s) | start-up (s) | steady round (s) | "
        "local SGD/call (s) | local SGD/step (ms) | peak PSS (MB) | peak RSS (MB) | final acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['clients']} | {_fmt(r.get('threads'), '.0f', 'all')} | "
            f"{r['e2e_s']:.1f} | {r['startup_s']:.1f} | {r['steady_round_s']:.2f} | "
            f"{r['train_call_s']:.2f} | {_fmt(r.get('step_ms'), '.1f')} | "
            f"{r['peak_pss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['accuracy']:.4f} |"
        )
    sim = next((r for r in rows if r["mode"] == "inprocess"), None)
    if sim:
        lines += [
            "",
            "| ratio to inprocess (same clients) | steady round | local SGD/step | end to end "
            "| peak PSS |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            if not r["mode"].startswith("deploy"):
                continue
            sgd = "n/a"
            if r.get("step_ms") and sim.get("step_ms"):
                sgd = f"{r['step_ms'] / sim['step_ms']:.2f}x"
            lines.append(
                f"| {r['mode']} | {r['steady_round_s'] / sim['steady_round_s']:.2f}x | {sgd} | "
                f"{r['e2e_s'] / sim['e2e_s']:.2f}x | {r['peak_pss_mb'] / sim['peak_pss_mb']:.2f}x |"
            )
    broken = [r for r in rows if r.get("breakdown")]
    if broken:
        lines += [
            "",
            "a deployed steady round, along the client whose reply came last (s, mean of rounds "
            "2..R, median of the runs; the parts add up to the round):",
            "",
            "| part | what | " + " | ".join(r["mode"] for r in broken) + " |",
            "|---|---|" + "---|" * len(broken),
        ]
        for key, what in BREAKDOWN:
            vals = " | ".join(f"{r['breakdown'].get(key, 0.0):.2f}" for r in broken)
            lines.append(f"| {key} | {what} | {vals} |")
        lines.append(
            "| **round** | | "
            + " | ".join(f"**{r['breakdown']['round']:.2f}**" for r in broken)
            + " |"
        )
        lines.append(
            "| not training | round - training | "
            + " | ".join(
                f"{r['breakdown']['round'] - r['breakdown']['training']:.2f}" for r in broken
            )
            + " |"
        )
    lines += ["", "every timed run (s), the median of which is in the table:"]
    lines += _all_runs(rows)
    lines += _phases_and_memory(rows)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--modes", default="plain,inprocess,flwr,stock", help="simulation group ('' to skip)"
    )
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument(
        "--deploy-modes",
        default="inprocess,deploy,deploy-spawn",
        help="deployment group ('' to skip); plain, inprocess, deploy, deploy-spawn, deploy-flower",
    )
    ap.add_argument("--deploy-clients", type=int, default=3, help="SuperNodes (all sampled)")
    ap.add_argument(
        "--supernode-poll",
        type=float,
        default=0.2,
        help="deploy, deploy-spawn: cap (s) on the SuperNodes' waits "
        "(flowerbed.simulation.supernode, default 0.2); 0: Flower's flower-supernode",
    )
    ap.add_argument(
        "--superlink-db",
        action="store_true",
        help="deployment modes: the SuperLink's state in an SQLite file (default: in memory)",
    )
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--scale", action="store_true", help="also 1000 virtual clients (inprocess)")
    ap.add_argument(
        "--repeat", type=int, default=3, help="timed runs per mode (interleaved); median kept"
    )
    ap.add_argument(
        "--gpus", type=float, default=0.0, help="GPU per actor in the simulation modes (0.25)"
    )
    ap.add_argument("--child", default="")
    ap.add_argument("--num-cpus", type=float, default=2)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    if a.child:
        child(a.child, a.clients, a.per_round, a.rounds, a.out, a.num_cpus, a.gpus)
        return
    modes = [m for m in a.modes.split(",") if m]
    deploy_modes = [m for m in a.deploy_modes.split(",") if m]
    bad = [m for m in modes if m not in SIM_MODES] + [
        m for m in deploy_modes if m not in ("plain", "inprocess", *DEPLOY_MODES)
    ]
    if bad:
        ap.error(f"unknown mode {bad[0]!r}")
    if modes and "plain" not in modes:
        ap.error("the simulation group needs the plain mode (its reference)")
    if a.gpus > 0:
        import torch

        if not torch.cuda.is_available():
            print("[bench] --gpus asked for, but no CUDA GPU is present: CPU only", flush=True)
            a.gpus = 0.0
    tmp = Path(tempfile.mkdtemp(prefix="flowerbed-bench-"))
    # warm the dataset and partition caches so that no mode pays for decoding the IDX files
    from flowerbed.common.client import local_tensors

    out = []
    if modes:
        local_tensors("fashion_mnist", 0, a.clients, "iid", 0)
        if "stock" in modes:  # the stock app's one-time copy (the quickstart's Hub download)
            sys.path.insert(0, str(STOCK_APP))
            from stockfmnist.task import fashion_mnist

            from flowerbed.common.data import fmnist_dir

            for split in ("train", "test"):
                fashion_mnist(split, str(fmnist_dir()))
        rows = measure_modes(
            modes, a.clients, a.per_round, a.rounds, tmp, a.repeat, num_gpus=a.gpus
        )
        if a.scale:
            local_tensors("fashion_mnist", 0, 1000, "iid", 0)
            rows += measure_modes(["inprocess"], 1000, a.per_round, a.rounds, tmp, num_gpus=a.gpus)
        out.append(report(rows, a.per_round))
    if deploy_modes:
        # read by the child processes' _deploy (they inherit the environment)
        os.environ["FLOWERBED_BENCH_SUPERNODE_POLL"] = str(a.supernode_poll)
        os.environ["FLOWERBED_BENCH_SUPERLINK_DB"] = "1" if a.superlink_db else ""
        n = a.deploy_clients
        local_tensors("fashion_mnist", 0, n, "iid", 0)
        rows = measure_modes(deploy_modes, n, n, a.rounds, tmp, a.repeat, num_cpus=actor_cpus(n))
        out.append(report_deploy(rows))
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
