"""The FedTA app's method table: the run-config key ``method``.

| method | kind | what it is |
|---|---|---|
| ``fedta`` | paper | FedTA: prompt pool + tail anchors + prototypes; server SIKF + BGPS |
| ``fedta-no-ta`` | ablation | FedTA without tail anchors (prototypes of the prompted features) |
| ``fedta-no-sikf`` | ablation | FedTA, server averages the prompt pools instead of SIKF |
| ``fedta-no-bgps`` | ablation | FedTA, server takes the mean prototype per class (no BGPS, no freezing) |
| ``fedta-warmup`` | reconstruction | FedTA, BGPS freezes only from server round ``bgps-start-round`` |
| ``l2p`` | baseline | L2P-style prompt pool + head, FedAvg-averaged (our small re-creation) |
| ``fedvit`` | baseline | frozen ViT, linear head only, FedAvg-averaged (our small re-creation) |
| ``fedavg`` | baseline | FedAvg (McMahan et al., AISTATS 2017): the whole ViT + head fine-tuned |

Every row runs on the continual schedule of :mod:`flowerbed.strategies.fedta` (FedTA rows:
:class:`~flowerbed.strategies.fedta.FedTA`; baselines:
:class:`~flowerbed.strategies.fedta.ContinualFedAvg`). Flags read by the app: ``prototypes``
(FedTA's client), ``ta``, ``sikf``, ``bgps`` (its switches), ``run-warmup`` (BGPS freezes only
from server round ``bgps-start-round``: the run-level warm-up of the third-party schedule "Thr
from round 20", a Reconstruction), ``prompts``, ``head``, ``finetune`` (the shared parameters of a
baseline).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fedta.client_app import baseline_step, fedta_step
from fedta.task import NUM_CLASSES
from flowerbed.common.methods import Method, MethodTable
from flowerbed.strategies.baselines import baseline_methods, guard_kwargs
from flowerbed.strategies.fedta import ContinualFedAvg, FedTA


def schedule_kwargs(cfg) -> dict[str, Any]:
    """The continual schedule and FedAvg's guards from the run config."""
    return {
        "num_tasks": cfg["num-tasks"],
        "rounds_per_task": cfg["rounds-per-task"],
        "bgps_warmup": cfg["bgps-warmup"],
        **guard_kwargs(cfg),
    }


def make_fedta(cfg, backbone, x_surrogate, **_: Any) -> FedTA:
    """:class:`FedTA` with the row's SIKF / BGPS switches and BGPS warm-up."""
    return FedTA(
        backbone=backbone,
        x_surrogate=x_surrogate,
        num_classes=NUM_CLASSES,
        top_n=cfg["top-n"],
        use_sikf=cfg.method.flag("sikf"),
        sikf_steps=cfg["sikf-steps"],
        sikf_lr=cfg["sikf-lr"],
        use_bgps=cfg.method.flag("bgps"),
        bgps_thr=cfg["bgps-thr"],
        seed=cfg["seed"],
        bgps_start_round=cfg["bgps-start-round"] if cfg.method.flag("run-warmup") else 1,
        **schedule_kwargs(cfg),
    )


def make_continual_fedavg(cfg, **_: Any) -> ContinualFedAvg:
    """FedAvg on the continual schedule (the baselines)."""
    return ContinualFedAvg(**schedule_kwargs(cfg))


FEDTA = {"prototypes": True, "ta": True, "sikf": True, "bgps": True, "run-warmup": False}


def _fedta(name: str, kind: str, help: str, **flags: bool) -> Method:
    return Method(name, kind, help, make_fedta, fedta_step, {**FEDTA, **flags})


def _baseline(name: str, help: str, **flags: bool) -> Method:
    return Method(name, "baseline", help, make_continual_fedavg, baseline_step, flags)


METHODS = MethodTable(
    _fedta("fedta", "paper", "FedTA: prompt pool + tail anchors + prototypes; SIKF + BGPS"),
    _fedta("fedta-no-ta", "ablation", "FedTA without tail anchors", ta=False),
    _fedta("fedta-no-sikf", "ablation", "FedTA, prompt pools averaged instead of SIKF", sikf=False),
    _fedta("fedta-no-bgps", "ablation", "FedTA, mean prototype per class, no BGPS", bgps=False),
    _fedta(
        "fedta-warmup",
        "reconstruction",
        "FedTA, BGPS freezes only from server round bgps-start-round (run-level warm-up)",
        **{"run-warmup": True},
    ),
    _baseline("l2p", "L2P-style prompt pool + head, FedAvg (re-creation)", prompts=True, head=True),
    _baseline("fedvit", "frozen ViT, linear head only, FedAvg (re-creation)", head=True),
    *(
        replace(row, strategy=make_continual_fedavg, help=f"{row.help}: whole ViT + head")
        for row in baseline_methods("fedavg", client=baseline_step, head=True, finetune=True)
    ),
)
