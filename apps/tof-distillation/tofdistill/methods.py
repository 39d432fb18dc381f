"""The TOF distillation app's method table: the run-config key ``method``.

| method | kind | what it is |
|---|---|---|
| ``tof-fed`` | reconstruction | flowcharts merged on the server, FedAvg over the student's LoRA adapter trained on synthetic dialogues, flowchart-guided prompts |
| ``tof-fed-unguided`` | ablation | the same without the flowchart in the prompt |
| ``tof-local`` | baseline | local-only distillation: each client's own flowchart, its own adapter |
| ``tof-local-unguided`` | ablation | local-only without the flowchart in the prompt |
| ``pooled-raw`` | baseline | non-private upper bound: all raw dialogues pooled on the server, guided |
| ``pooled-raw-unguided`` | baseline | the same without the flowchart in the prompt |

Flags: ``guided`` (the serialized flowchart in the student's prompt), ``share`` (merge the
flowcharts and synthesize from the merged one), ``aggregate`` (FedAvg over the adapters).
"""

from flowerbed.common.methods import Method, MethodTable
from flowerbed.strategies.baselines import make_centralized
from flowerbed.strategies.tof_distillation import TofDistillation
from tofdistill.domains import TASKS


def make_tof(cfg, evaluate_each=None, **_):
    """:class:`TofDistillation` from the run config's flags."""
    return TofDistillation(
        TASKS,
        share=cfg.method.flag("share"),
        aggregate=cfg.method.flag("aggregate"),
        evaluate_each=evaluate_each,
        min_replies=cfg["min-train-replies"],
    )


def _row(name, kind, help, guided, share=True, aggregate=True, strategy=make_tof):
    flags = {"guided": guided, "share": share, "aggregate": aggregate}
    return Method(name, kind, help, strategy=strategy, flags=flags)


METHODS = MethodTable(
    _row(
        "tof-fed",
        "reconstruction",
        "TOF distillation (Hong et al., WWW 2026): merged flowcharts, FedAvg over the student's "
        "LoRA adapter on synthetic dialogues, flowchart-guided prompts (Reconstruction)",
        guided=True,
    ),
    _row("tof-fed-unguided", "ablation", "tof-fed without the flowchart in the prompt", False),
    _row(
        "tof-local",
        "baseline",
        "local-only distillation: own flowchart, own adapter, guided",
        True,
        share=False,
        aggregate=False,
    ),
    _row(
        "tof-local-unguided",
        "ablation",
        "local-only distillation without the flowchart in the prompt",
        False,
        share=False,
        aggregate=False,
    ),
    _row(
        "pooled-raw",
        "baseline",
        "non-private upper bound: every raw dialogue pooled and trained on the server (no "
        "message), guided by the chart built from all of them",
        True,
        strategy=make_centralized,
    ),
    _row(
        "pooled-raw-unguided",
        "baseline",
        "pooled raw dialogues without the flowchart in the prompt",
        False,
        strategy=make_centralized,
    ),
)
