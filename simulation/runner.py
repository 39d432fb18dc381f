"""The Hydra-configured experiment runner.

One Hydra job = one Flower simulation of one app (``conf/config.yaml`` documents every key)::

    flowerbed-run                                              # FedAvg demo, app defaults
    flowerbed-run app=fedavg partitioner=iid ++run_config.num-server-rounds=5
    flowerbed-run -m ++run_config.alpha=0.1,0.5,1.0 seed=0,1,2   # sweep: table + plot at the end
    flowerbed-run resources=gpu                                # 0.25 GPU per virtual client
    flowerbed-run launcher=flwr                                # through the real `flwr run` CLI
    flowerbed-run launcher=local                               # same app code, no Ray (fast sweeps)

Each job writes ``results.json`` into its Hydra output folder; a multirun ends with
``summary.md`` (mean +/- std over seeds of every final metric, by the swept keys) and
``accuracy.png`` (metric against round) in the sweep folder (:mod:`flowerbed.simulation.table`).
The run config is validated against the app's schema before anything starts: a malformed value or
an unknown key stops the job with one line naming it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from flowerbed.simulation.inprocess import app_config, fused_config, run_app

log = logging.getLogger("flowerbed.runner")


def validate(app: str, overrides: dict[str, Any]) -> Path:
    """Check ``overrides`` against the app's pyproject keys and its ``task.SCHEMA``."""
    path, merged = fused_config(app, overrides)
    _, comps = app_config(path)
    pkg = comps["serverapp"].split(".")[0]
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    task = importlib.import_module(f"{pkg}.task")
    if hasattr(task, "parse_config"):
        task.parse_config(merged)
    elif hasattr(task, "SCHEMA"):
        from flowerbed.common.config import parse

        parse(merged, task.SCHEMA)
    return path


def run_job(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run one simulation for ``cfg``; return the final metrics from its results file."""
    overrides = {str(k): v for k, v in OmegaConf.to_container(cfg.run_config).items()}
    overrides["seed"] = int(cfg.seed)
    overrides["results-dir"] = str(out_dir.resolve())
    validate(cfg.app.name, overrides)
    t0 = time.perf_counter()
    if cfg.launcher == "inprocess":
        run_app(
            cfg.app.name,
            overrides,
            num_supernodes=int(cfg.app.num_supernodes),
            num_cpus=float(cfg.resources.num_cpus),
            num_gpus=float(cfg.resources.num_gpus),
            ray_address=str(cfg.ray_address),
            verbose=bool(cfg.verbose),
        )
    elif cfg.launcher == "local":
        from flowerbed.simulation.local import run_local

        run_local(
            cfg.app.name,
            overrides,
            num_supernodes=int(cfg.app.num_supernodes),
            num_cpus=float(cfg.resources.num_cpus),  # the actors' torch threads: same numbers
        )
    elif cfg.launcher == "flwr":
        from flowerbed.simulation.flwr_cli import flwr_run

        proc = flwr_run(
            cfg.app.name,
            overrides,
            num_supernodes=int(cfg.app.num_supernodes),
            num_cpus=float(cfg.resources.num_cpus),
            num_gpus=float(cfg.resources.num_gpus),
        )
        if proc.returncode != 0:
            raise RuntimeError(f"flwr run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    else:
        raise ValueError(f"launcher={cfg.launcher!r}: must be inprocess, local or flwr")
    results = out_dir / "results.json"
    if not results.exists():
        raise RuntimeError(f"the run wrote no {results} (see the log above)")
    final = json.loads(results.read_text())["extra"].get("final", {})
    shown = ", ".join(f"{k}={v:.4f}" for k, v in final.items() if isinstance(v, int | float))
    print(
        f"[flowerbed] {cfg.app.name} seed={cfg.seed}: {shown} "
        f"({time.perf_counter() - t0:.1f} s) -> {results}",
        flush=True,
    )
    return final


@hydra.main(
    config_path=str(Path(__file__).resolve().parent / "conf"),
    config_name="config",
    version_base=None,
)
def _main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        final = run_job(cfg, out_dir)
    except ValueError as e:  # ConfigError, DataError, unknown app or key: one line, exit 2
        print(f"flowerbed-run: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if HydraConfig.get().mode.name == "RUN":  # single run: its own table and accuracy plot
        from flowerbed.simulation.table import render

        render(out_dir)
    acc = final.get("accuracy")
    return float(acc) if isinstance(acc, int | float) else None


def main() -> None:
    """Console entry point (``flowerbed-run``); bad input ends with one line and exit code 2."""
    _main()


if __name__ == "__main__":
    main()
