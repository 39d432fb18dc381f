"""TOF distillation app: run-config schema, the clients' private data and flowcharts, the student
(LoRA over a small LM), its training and the evaluation with simulated users.

- client ``k`` (the ``task`` partitioner) serves ``tasks-per-client`` tasks, ``k % 4`` and the
  next ones, so every task is shared by several clients; its dialogues are private and seeded by
  (run seed, partition id) (:func:`client_data`);
- the student is the base model (a tiny random LLaMA with a character tokenizer in the tests,
  SmolLM2-135M-Instruct cached by ``python -m tofdistill.prepare``) with a LoRA adapter on the
  attention projections; it predicts the next system action (a short string) from the prompt of
  :func:`tofdistill.simulate.prompt`;
- the server's harness holds the held-out simulated users (fixed seed, every task).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from flowerbed.common import config as C
from flowerbed.common import llm
from flowerbed.common.partition import generated_partitioner, register_partitioner
from flowerbed.common.seeding import derive_seed
from flowerbed.common.train import get_device
from flowerbed.strategies.tof_distillation import Flowchart
from tofdistill import domains as D
from tofdistill import flowchart as F
from tofdistill import selection as S
from tofdistill import simulate as M
from tofdistill.words import WordTokenizer

#: LoRA target sets: ``qv`` (the note's reading) or every linear layer of the LLaMA blocks
LORA_TARGETS = {
    "qv": ["q_proj", "v_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
#: how the student's action is read: free greedy generation, or the service's action with the
#: highest likelihood (Reconstruction)
DECODERS = ("generate", "score")

SCHEMA: dict[str, C.Option] = C.compose(
    C.SCHEDULE,
    {"partitioner": C.DATA["partitioner"]},
    C.DEVICE,
    C.RESULTS,
    {
        "method": C.Option("tof-fed"),  # choices from the method table
        "model": C.Option("smollm2-135m", choices=llm.MODELS, help="tiny (tests) | smollm2-135m"),
        "tasks-per-client": C.Option(2, lambda v: 1 <= v <= len(D.TASKS), "tasks in [1, 4]"),
        "dialogues-per-task": C.Option(24, C.positive, "private dialogues per task > 0"),
        "utterance-noise": C.Option(0.3, C.unit_interval, "noisy-utterance rate in [0, 1]"),
        "agent-error": C.Option(0.1, C.unit_interval, "wrong-action rate of the human agents"),
        "selection": C.Option("lp", choices=S.SOLVERS, help="lp | greedy | ilp"),
        "synthetic-per-task": C.Option(40, C.positive, "synthetic dialogues per task > 0"),
        "local-steps": C.Option(8, C.positive, "AdamW steps per client and round > 0"),
        "batch-size": C.Option(8, C.positive, "examples per step > 0"),
        "lr": C.Option(2e-4, C.positive, "AdamW learning rate of the adapter > 0"),
        "lora-rank": C.Option(8, C.positive, "LoRA rank > 0"),
        "lora-alpha": C.Option(16.0, C.positive, "LoRA alpha > 0"),
        "lora-targets": C.Option("qv", choices=tuple(LORA_TARGETS), help="qv | all"),
        "decode": C.Option("generate", choices=DECODERS, help="generate | score"),
        "max-new-tokens": C.Option(8, C.positive, "tokens generated per action > 0"),
        "eval-users": C.Option(10, C.positive, "simulated users per task > 0"),
        "extra-turns": C.Option(2, C.non_negative, "turns a user allows beyond its goal >= 0"),
        "eval-every": C.Option(0, C.non_negative, "evaluate every n rounds (0: last round)"),
    },
    num_server_rounds=3,
    partitioner="task",
)

TEST_SEED = 0x7E57  # the held-out simulated users: the same in every run
#: trained in full (and averaged) for the tiny model only: its tied random embedding/head (std
#: 0.02, width 32) caps every logit at ~0.6, so LoRA alone cannot make any token likely
TINY_FULL = ("embed_tokens", "lm_head")


# Client ``k`` of ``K`` serves tasks ``k % 4, (k + 1) % 4, ...`` (``tasks-per-client``,
# :func:`client_tasks`); no data set behind it: every client generates its own dialogues from
# its seed.
register_partitioner("task", generated_partitioner)


def parse_config(run_config) -> C.RunConfig:
    """Validate the run config (one line naming a bad key or value) and resolve ``method``."""
    from tofdistill.methods import METHODS

    return C.parse(run_config, {**SCHEMA, "method": METHODS.option("tof-fed")}, methods=METHODS)


# ---------------------------------------------------------------------------- client data
def client_tasks(pid: int, per_client: int) -> list[str]:
    return [D.TASKS[(pid + j) % len(D.TASKS)] for j in range(per_client)]


@lru_cache(maxsize=32)
def _client(seed, pid, per_client, per_task, noise, agent_error, selection):
    tasks = client_tasks(pid, per_client)
    dialogues = D.private_dialogues(
        tasks, per_task, derive_seed(seed, pid, 0xD1A), noise, agent_error
    )
    sets, costs = [d.labels() for d in dialogues], [d.cost for d in dialogues]
    chosen = S.select(sets, costs, selection, derive_seed(seed, pid, 0x5E1))
    chart = F.construct(dialogues[j] for j in chosen)
    stats = {
        "num-selected": len(chosen),
        "selected-cost": float(sum(costs[j] for j in chosen)),
        "total-cost": float(sum(costs)),
        **F.quality(chart, tasks),
    }
    return tasks, dialogues, chart, stats


def client_data(cfg, pid: int):
    """``(tasks, private dialogues, flowchart from the selected ones, selection and flowchart
    statistics)`` of client ``pid`` (seeded by (seed, pid))."""
    return _client(
        cfg["seed"],
        pid,
        cfg["tasks-per-client"],
        cfg["dialogues-per-task"],
        cfg["utterance-noise"],
        cfg["agent-error"],
        cfg["selection"],
    )


def chart_text(chart: Flowchart | None, guided: bool):
    """``task -> prompt text of the chart`` (None when unguided or the chart lacks the task)."""
    known = set(chart.tasks) if chart is not None else set()
    cache: dict[str, str] = {}

    def text(task: str) -> str | None:
        if not guided or task not in known:
            return None
        if task not in cache:
            cache[task] = chart.serialize(task)
        return cache[task]

    return text


def examples(dialogues, texts) -> list[tuple[str, str]]:
    """``(prompt, target)`` for every system turn of ``dialogues``."""
    return [(M.prompt(s, texts(s.task)), M.target(a)) for d in dialogues for s, a in M.states(d)]


# ---------------------------------------------------------------------------- the student
class Codec:
    """Text to ids and back: SmolLM2's tokenizer, or the word tokenizer of the tiny model."""

    def __init__(self, name: str) -> None:
        if name == llm.TINY:
            self.tok = WordTokenizer()
            self.eos, self.pad = WordTokenizer.EOS, WordTokenizer.PAD
            self._encode = self.tok.encode
        else:
            self.tok = llm.load_tokenizer()
            self.eos, self.pad = self.tok.eos_token_id, self.tok.pad_token_id

            def enc(text: str) -> list[int]:
                return list(self.tok.encode(text, add_special_tokens=False))

            self._encode = enc

    @property
    def vocab_size(self) -> int:
        return self.tok.vocab_size

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.eos in ids:
            ids = ids[: ids.index(self.eos)]
        if isinstance(self.tok, WordTokenizer):
            return self.tok.decode(ids)
        return self.tok.decode(ids, skip_special_tokens=True)


@lru_cache(maxsize=2)
def codec(name: str) -> Codec:
    return Codec(name)


def student(cfg):
    """Base model + a LoRA adapter (A drawn from ``derive_seed(seed, 0x70F)``, B = 0); the tiny
    model also trains its embeddings and head in full (:data:`TINY_FULL`)."""
    base = llm.build_model(cfg["model"], cfg["seed"], vocab_size=codec(cfg["model"]).vocab_size)
    seed = derive_seed(cfg["seed"], 0x70F)
    targets = LORA_TARGETS[cfg["lora-targets"]]
    full = TINY_FULL if cfg["model"] == llm.TINY else None
    model = llm.with_lora(base, cfg["lora-rank"], cfg["lora-alpha"], targets, seed, full)
    return model.to(get_device(cfg["device"]))


_KEYS = ("model", "seed", "lora-rank", "lora-alpha", "lora-targets", "device")


@lru_cache(maxsize=2)
def _student(key: tuple):
    return student(dict(key))


def cached_student(cfg):
    """One student per process and configuration (its adapter is overwritten per call)."""
    return _student(tuple((k, cfg[k]) for k in _KEYS))


def adapter(model) -> ArrayRecord:
    """The LoRA adapter's tensors (peft's state dict of the adapter)."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model)
    return ArrayRecord({k: Array(v.detach().cpu().numpy().copy()) for k, v in sorted(sd.items())})


def set_adapter(model, arrays: ArrayRecord) -> None:
    from peft import set_peft_model_state_dict

    sd = {k: torch.from_numpy(a.numpy().copy()) for k, a in arrays.items()}
    set_peft_model_state_dict(model, sd)


def initial_arrays(cfg) -> ArrayRecord:
    return adapter(student(cfg))


def _batch(c: Codec, pairs, device):
    """Right-padded ``prompt + target + EOS``; labels only on the target and EOS."""
    seqs, labels = [], []
    for p, t in pairs:
        pi, ti = c.encode(p), c.encode(t) + [c.eos]
        seqs.append(pi + ti)
        labels.append([-100] * len(pi) + ti)
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), c.pad, dtype=torch.long)
    lab = torch.full((len(seqs), n), -100, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(lb)] = torch.tensor(lb)
        att[i, : len(s)] = 1
    return ids.to(device), att.to(device), lab.to(device)


def fine_tune(cfg, arrays: ArrayRecord, pairs, steps: int, seed: int):
    """``steps`` AdamW steps of next-token cross-entropy on the targets of ``pairs`` from the
    adapter ``arrays`` (batches drawn from ``seed``); returns the new adapter and the mean loss."""
    model = cached_student(cfg)
    set_adapter(model, arrays)
    c = codec(cfg["model"])
    dev = get_device(cfg["device"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        idx = rng.choice(len(pairs), size=min(cfg["batch-size"], len(pairs)), replace=False)
        ids, att, lab = _batch(c, [pairs[i] for i in idx], dev)
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.item()))
    model.eval()
    return adapter(model), float(np.mean(losses)) if losses else 0.0


def lm_policy(cfg, model, texts, batch: int = 16) -> M.Policy:
    """The student as a policy (``decode``): ``generate``, greedy decoding of at most
    ``max-new-tokens`` tokens, the action being the first word of the first line of the
    completion; or ``score``, :func:`score_policy`."""
    if cfg["decode"] == "score":
        return score_policy(cfg, model, texts)
    c = codec(cfg["model"])
    dev = get_device(cfg["device"])

    @torch.no_grad()
    def act(states) -> list[str]:
        out = []
        for i in range(0, len(states), batch):
            prompts = [c.encode(M.prompt(s, texts(s.task))) for s in states[i : i + batch]]
            n = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), n), c.pad, dtype=torch.long)
            att = torch.zeros((len(prompts), n), dtype=torch.long)
            for j, p in enumerate(prompts):
                ids[j, n - len(p) :] = torch.tensor(p)
                att[j, n - len(p) :] = 1
            gen = model.generate(
                input_ids=ids.to(dev),
                attention_mask=att.to(dev),
                max_new_tokens=cfg["max-new-tokens"],
                do_sample=False,
                pad_token_id=c.pad,
                eos_token_id=c.eos,
            )[:, n:]
            for row in gen.tolist():
                words = c.decode(row).split("\n")[0].split()
                out.append(words[0] if words else "")
        return out

    return act


@torch.no_grad()
def target_logprobs(model, c: Codec, pairs, device, batch: int = 64) -> np.ndarray:
    """``log p(target + EOS | prompt)`` under ``model`` for every ``(prompt, target)``: the sum
    of the log-probabilities of the target's tokens and the end of sequence (the tokens the loss
    of :func:`fine_tune` is on)."""
    out = []
    for i in range(0, len(pairs), batch):
        ids, att, lab = _batch(c, pairs[i : i + batch], device)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, :-1], -1)
        gold = lab[:, 1:]
        mask = gold != -100
        tok = logp.gather(-1, gold.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out.append((tok * mask).sum(1).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def score_policy(cfg, model, texts) -> M.Policy:
    """The student as a ranker (Reconstruction; the paper's student generates free text): the
    action of the state's service (its public action inventory, :func:`domains.actions`) with
    the highest :func:`target_logprobs`; ties go to the first in sorted order."""
    c = codec(cfg["model"])
    dev = get_device(cfg["device"])

    def act(states) -> list[str]:
        rows, spans = [], []
        for s in states:
            p, cands = M.prompt(s, texts(s.task)), D.actions(s.task)
            spans.append((len(rows), cands))
            rows += [(p, M.target(a)) for a in cands]
        lp = target_logprobs(model, c, rows, dev)
        return [cands[int(np.argmax(lp[k : k + len(cands)]))] for k, cands in spans]

    return act


# ---------------------------------------------------------------------------- client steps
def client_flowchart(cfg, pid: int) -> tuple[Flowchart, dict]:
    """What client ``pid`` sends in the flowchart phase: its chart and its statistics."""
    _, _, chart, stats = client_data(cfg, pid)
    return chart, stats


def client_fit(cfg, pid: int, server_round: int, arrays: ArrayRecord, chart: Flowchart | None):
    """Local distillation: synthetic dialogues of the client's tasks from ``chart`` (the merged
    one) or from its own chart, then :func:`fine_tune`; ``(adapter, metrics)``."""
    tasks, _, own, _ = client_data(cfg, pid)
    chart = own if chart is None else chart
    syn = M.synthesize(chart, tasks, cfg["synthetic-per-task"], derive_seed(cfg["seed"], pid, 0x5D))
    pairs = examples(syn, chart_text(chart, cfg.method.flag("guided")))
    if not pairs:
        raise ValueError(f"client {pid}: the flowchart has none of its tasks {tasks}")
    new, loss = fine_tune(
        cfg, arrays, pairs, cfg["local-steps"], derive_seed(cfg["seed"], pid, server_round, 0x7A)
    )
    return new, {"loss": loss, "num-examples": len(pairs)}


# ---------------------------------------------------------------------------- server side
def due(cfg, server_round: int) -> bool:
    """Whether the harness evaluates after ``server_round``."""
    every, last = cfg["eval-every"], cfg["num-server-rounds"]
    return server_round == last or (every > 0 and server_round > 0 and server_round % every == 0)


def evaluate(cfg, arrays: ArrayRecord, chart: Flowchart | None) -> dict:
    """The student with adapter ``arrays`` against the held-out simulated users of every task,
    guided by ``chart`` when the method is guided: success, inform, turns, per-task success and
    next-action accuracy."""
    model = cached_student(cfg)
    set_adapter(model, arrays)
    model.eval()
    policy = lm_policy(cfg, model, chart_text(chart, cfg.method.flag("guided")))
    goals = M.test_goals(D.TASKS, cfg["eval-users"], TEST_SEED)
    out = M.simulate(policy, goals, cfg["utterance-noise"], cfg["extra-turns"])
    out["action_accuracy"] = M.action_accuracy(policy, goals, cfg["utterance-noise"])
    return out


class PooledRaw:
    """The non-private upper bound: every client's raw dialogues pooled on the server, the chart
    constructed from all of them, the student fine-tuned there (``local-steps`` x clients steps
    per round, as many examples as the federation's clients see together)."""

    def __init__(self, cfg, num_nodes: int) -> None:
        self.cfg, self.num_nodes = cfg, num_nodes
        self._pairs: list | None = None
        self.chart: Flowchart | None = None

    def _data(self):
        if self._pairs is None:
            dialogues = [d for p in range(self.num_nodes) for d in client_data(self.cfg, p)[1]]
            self.chart = F.construct(dialogues)
            texts = chart_text(self.chart, self.cfg.method.flag("guided"))
            self._pairs = examples(dialogues, texts)
        return self._pairs

    def fit(self, server_round: int, arrays: ArrayRecord):
        pairs = self._data()
        steps = self.cfg["local-steps"] * self.num_nodes
        seed = derive_seed(self.cfg["seed"], 0xCE, server_round)
        new, loss = fine_tune(self.cfg, arrays, pairs, steps, seed)
        return new, {"loss": loss, "num-examples": len(pairs)}

    def serving_chart(self) -> Flowchart | None:
        self._data()
        return self.chart
