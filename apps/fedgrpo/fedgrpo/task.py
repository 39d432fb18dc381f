"""FedGRPO app: run-config schema, the server's LoRA policy, the domain clients' data and scoring,
the FedAvg-SFT client step and the evaluation harness.

- client ``k`` is an expert of domain ``k % 3`` (the ``domain`` partitioner) and holds its own
  labelled examples of that domain (:func:`client_items`, used by FedAvg-SFT);
- the server holds the policy, the unlabelled training prompts (:func:`round_prompts`, a mix of
  the domains), the small labelled auxiliary set of the confidence graph (:func:`aux_set`) and,
  as the experiment's harness, the test questions (:func:`test_items`);
- the policy is the base model (tiny random LLaMA for the tests, SmolLM2-135M-Instruct cached by
  ``python -m fedgrpo.prepare``) with a LoRA adapter; the reference policy of the KL term is the
  base model (adapter disabled).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedgrpo import domains as D
from flowerbed.common import config as C
from flowerbed.common import llm
from flowerbed.common.partition import generated_partitioner, register_partitioner
from flowerbed.common.seeding import derive_seed
from flowerbed.common.train import get_device
from flowerbed.strategies.fedgrpo import AuxSet, grpo_loss

SCHEMA: dict[str, C.Option] = C.compose(
    C.SCHEDULE,
    {"partitioner": C.DATA["partitioner"]},
    C.DEVICE,
    C.RESULTS,
    {
        "method": C.Option("fedgrpo-graph"),  # choices from the method table
        "model": C.Option("smollm2-135m", choices=llm.MODELS, help="tiny (tests) | smollm2-135m"),
        "num-experts": C.Option(2, C.positive, "M: experts per prompt > 0"),
        "group-size": C.Option(4, C.positive, "G: completions per expert > 0"),
        "prompts-per-round": C.Option(4, C.positive, "training prompts per round > 0"),
        "max-new-tokens": C.Option(24, C.positive, "tokens per completion > 0"),
        "shots": C.Option(1, lambda v: 0 <= v <= len(DEMOS), "demonstrations in the prompt, 0..3"),
        "warmup-steps": C.Option(0, C.non_negative, "server SFT steps on the auxiliary set >= 0"),
        "temperature": C.Option(1.0, C.positive, "sampling temperature > 0"),
        "top-p": C.Option(0.95, lambda v: 0 < v <= 1, "nucleus sampling in (0, 1]"),
        "lr": C.Option(1e-4, C.positive, "AdamW learning rate of the LoRA adapter > 0"),
        "beta": C.Option(1e-4, C.non_negative, "KL weight >= 0"),
        "eps-low": C.Option(0.2, C.unit_interval, "clip range below 1, in [0, 1]"),
        "eps-high": C.Option(0.3, C.non_negative, "clip range above 1 >= 0"),
        "policy-iterations": C.Option(1, C.positive, "mu: updates per generation batch > 0"),
        "scale-rewards": C.Option(False, help="divide advantages by the group std (authors: no)"),
        "mask-truncated": C.Option(True, help="leave completions without EOS out of the loss"),
        "ood-error": C.Option(0.3, C.unit_interval, "a client's wrong-verdict rate off-domain"),
        "aux-per-domain": C.Option(10, C.positive, "auxiliary questions per domain > 0"),
        "eval-per-domain": C.Option(20, C.positive, "test questions per domain > 0"),
        "eval-every": C.Option(1, C.positive, "evaluate every n rounds (and rounds 0, last) > 0"),
        "client-examples": C.Option(64, C.positive, "labelled examples per client > 0"),
        "sft-steps": C.Option(4, C.positive, "FedAvg-SFT: local steps per round > 0"),
        "batch-size": C.Option(8, C.positive, "FedAvg-SFT: examples per step > 0"),
        "lora-rank": C.Option(8, C.positive, "LoRA rank > 0"),
        "lora-alpha": C.Option(16.0, C.positive, "LoRA alpha > 0"),
    },
    num_server_rounds=8,
    partitioner="domain",
)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
TEST_SEED, AUX_SEED = 0x7E57, 0xA0C5  # fixed: the same test and auxiliary sets in every run
SYSTEM = "Reply with the final answer only, inside <answer></answer> tags."
#: the prompt's demonstrations (``shots``): one per domain, outside every generator's range (so
#: never a training, auxiliary or test question); the answer in the format the reward checks
DEMOS = (
    ("What is 6 + 7?", "13"),
    ("How many grams are in 12 kilograms?", "12000"),
    ("What day of the week is 20 days after Friday?", "Thursday"),
)
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ <>/?+-:.\n"


# Client ``k`` of ``K`` is an expert of domain ``k % 3`` (:func:`own_domain`; no data set behind
# it: every client generates its own domain's examples from its seed).
register_partitioner("domain", generated_partitioner)


def parse_config(run_config) -> C.RunConfig:
    """Validate the run config (one line naming a bad key or value) and resolve ``method``."""
    from fedgrpo.methods import METHODS

    return C.parse(
        run_config, {**SCHEMA, "method": METHODS.option("fedgrpo-graph")}, methods=METHODS
    )


# ---------------------------------------------------------------------------- data
def own_domain(pid: int) -> int:
    return pid % len(D.DOMAINS)


@lru_cache(maxsize=8)
def test_items(per_domain: int) -> tuple[tuple[tuple[str, str], ...], ...]:
    """Per domain, the held-out test questions with answers (fixed seed)."""
    return tuple(
        tuple(D.items(k, per_domain, derive_seed(TEST_SEED, k))) for k in range(len(D.DOMAINS))
    )


def _wrong(answer: str) -> str:
    if answer in D.DAYS:
        return D.DAYS[(D.DAYS.index(answer) + 1) % 7]
    return str(int(answer) + 1)


def aux_set(per_domain: int) -> AuxSet:
    """The server's auxiliary set: per question a correct and a wrong well-formed answer."""
    qs, doms, comps = [], [], []
    for k in range(len(D.DOMAINS)):
        for q, a in D.items(k, per_domain, derive_seed(AUX_SEED, k)):
            qs.append(q)
            doms.append(k)
            comps.append([f"<answer>{a}</answer>", f"<answer>{_wrong(a)}</answer>"])
    return AuxSet(qs, doms, comps, len(D.DOMAINS))


def round_prompts(cfg, server_round: int) -> list[str]:
    """The round's training prompts: the domains in turn, questions drawn from (seed, round,
    index), none of them a test question."""
    test = {q for dom in test_items(cfg["eval-per-domain"]) for q, _ in dom}
    out = []
    for i in range(cfg["prompts-per-round"]):
        k = (server_round * cfg["prompts-per-round"] + i) % len(D.DOMAINS)
        rng = np.random.default_rng(derive_seed(cfg["seed"], server_round, i, 0x7A))
        q, _ = D.DOMAINS[k].make(rng)
        while q in test:
            q, _ = D.DOMAINS[k].make(rng)
        out.append(q)
    return out


def client_items(cfg, pid: int) -> list[tuple[str, str]]:
    """Client ``pid``'s own labelled examples of its domain (seeded by (seed, pid))."""
    return D.items(own_domain(pid), cfg["client-examples"], derive_seed(cfg["seed"], pid, 0x5F7))


# ---------------------------------------------------------------------------- model
class Codec:
    """Prompts to token ids and ids to text, for the tiny character model or SmolLM2's chat
    template."""

    def __init__(self, name: str) -> None:
        self.chat = name != llm.TINY
        if self.chat:
            self.tok = llm.load_tokenizer()
            self.eos, self.pad = self.tok.eos_token_id, self.tok.pad_token_id
        else:
            self.tok = llm.CharTokenizer(ALPHABET)
            self.eos, self.pad = llm.CharTokenizer.EOS, llm.CharTokenizer.PAD

    @property
    def vocab_size(self) -> int:
        return self.tok.vocab_size

    def prompt(self, question: str, shots: int = 0) -> list[int]:
        """The prompt's token ids: the system instruction, the first ``shots`` of :data:`DEMOS`
        as earlier turns (question, answer in tags), then ``question``."""
        demos = DEMOS[:shots]
        if self.chat:
            msgs = [{"role": "system", "content": SYSTEM}]
            for q, a in demos:
                msgs.append({"role": "user", "content": q})
                msgs.append({"role": "assistant", "content": f"<answer>{a}</answer>"})
            msgs.append({"role": "user", "content": question})
            ids = self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        head = "".join(f"Q: {q}\nA: <answer>{a}</answer>\n" for q, a in demos)
        return self.tok.encode(f"{head}Q: {question}\nA:")

    def encode(self, text: str) -> list[int]:
        if self.chat:
            return list(self.tok.encode(text, add_special_tokens=False))
        return self.tok.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.eos in ids:
            ids = ids[: ids.index(self.eos)]
        if self.chat:
            return self.tok.decode(ids, skip_special_tokens=True)
        return self.tok.decode(ids)


@lru_cache(maxsize=2)
def codec(name: str) -> Codec:
    return Codec(name)


def lora_model(cfg):
    """The base model with a fresh LoRA adapter (A from ``derive_seed(seed, 0x10A)``, B = 0)."""
    base = llm.build_model(cfg["model"], cfg["seed"], vocab_size=codec(cfg["model"]).vocab_size)
    seed = derive_seed(cfg["seed"], 0x10A)
    model = llm.with_lora(base, cfg["lora-rank"], cfg["lora-alpha"], LORA_TARGETS, seed)
    return model.to(get_device(cfg["device"]))


def lora_state(model) -> ArrayRecord:
    return ArrayRecord(
        {
            n: Array(p.detach().cpu().numpy().copy())
            for n, p in model.named_parameters()
            if "lora_" in n
        }
    )


def load_lora(model, arrays: ArrayRecord) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, a in arrays.items():
            params[n].copy_(torch.from_numpy(a.numpy()).to(params[n].device))


def _pad_batch(prompts: list[list[int]], completions: list[list[int]], pad: int, device):
    """Left-padded prompts followed by right-padded completions: ids, attention mask, position
    ids, and the completion positions (start index of the completions)."""
    lp = max(len(p) for p in prompts)
    lc = max(max(len(c) for c in completions), 1)
    n = len(prompts)
    ids = torch.full((n, lp + lc), pad, dtype=torch.long)
    att = torch.zeros((n, lp + lc), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, lp - len(p) : lp] = torch.tensor(p)
        att[i, lp - len(p) : lp] = 1
        if c:
            ids[i, lp : lp + len(c)] = torch.tensor(c)
            att[i, lp : lp + len(c)] = 1
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), att.to(device), pos.to(device), lp


def completion_logp(model, prompts, completions, pad: int, device) -> tuple[torch.Tensor, ...]:
    """Per-token log-probabilities (n, Lc) of the completions given the prompts, and their mask."""
    ids, att, pos, lp = _pad_batch(prompts, completions, pad, device)
    logits = model(input_ids=ids, attention_mask=att, position_ids=pos).logits
    logits = logits[:, lp - 1 : -1].float()
    target = ids[:, lp:]
    logp = torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]
    return logp, att[:, lp:].to(logp.dtype)


class LoraPolicy:
    """The server's policy (:class:`flowerbed.strategies.fedgrpo.Policy`): sampling with
    ``temperature`` / ``top-p``, GRPO updates of the LoRA adapter with AdamW."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.codec = codec(cfg["model"])
        self.device = get_device(cfg["device"])
        self.model = lora_model(cfg)
        params = [p for n, p in self.model.named_parameters() if "lora_" in n]
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
        self._ids: dict[tuple[str, str], list[int]] = {}

    def prompt(self, question: str) -> list[int]:
        return self.codec.prompt(question, self.cfg["shots"])

    @torch.no_grad()
    def sample(self, questions: Sequence[str], n: int, seed: int | None) -> list[list[list[int]]]:
        """``n`` completions (token ids, EOS included when generated) per question; greedy when
        ``seed`` is None."""
        self.model.eval()
        prompts = [self.prompt(q) for q in questions for _ in range(n)]
        ids, att, _, lp = _pad_batch(prompts, [[] for _ in prompts], self.codec.pad, self.device)
        ids, att = ids[:, :lp], att[:, :lp]
        kw = {"do_sample": False}
        if seed is not None:
            torch.manual_seed(int(seed))
            kw = {
                "do_sample": True,
                "temperature": self.cfg["temperature"],
                "top_p": self.cfg["top-p"],
                "top_k": 0,
            }
        out = self.model.generate(
            input_ids=ids,
            attention_mask=att,
            max_new_tokens=self.cfg["max-new-tokens"],
            pad_token_id=self.codec.pad,
            eos_token_id=self.codec.eos,
            **kw,
        )[:, lp:].cpu()
        seqs = []
        for row in out.tolist():
            if self.codec.eos in row:
                row = row[: row.index(self.codec.eos) + 1]
            seqs.append(row)
        return [seqs[i * n : (i + 1) * n] for i in range(len(questions))]

    def generate(self, questions: Sequence[str], n: int, seed: int) -> list[list[str]]:
        ids = self.sample(questions, n, seed)
        out = []
        for q, group in zip(questions, ids, strict=True):
            texts = []
            for c in group:
                t = self.codec.decode(c)
                self._ids[(q, t)] = c
                texts.append(t)
            out.append(texts)
        return out

    def update(self, questions, completions, advantages, seed) -> dict[str, float]:
        """``policy-iterations`` AdamW steps of :func:`grpo_loss` on all the round's completions."""
        prompts, comps, adv, trunc = [], [], [], []
        for q, cs, a in zip(questions, completions, advantages, strict=True):
            for c, ai in zip(cs, a, strict=True):
                ids = self._ids.get((q, c)) or self.codec.encode(c) + [self.codec.eos]
                prompts.append(self.prompt(q))
                comps.append(ids)
                adv.append(float(ai))
                trunc.append(self.codec.eos not in ids)
        self._ids.clear()
        a = torch.tensor(adv, dtype=torch.float32, device=self.device)
        self.model.train()
        with torch.no_grad():
            old, mask = completion_logp(self.model, prompts, comps, self.codec.pad, self.device)
            with self.model.disable_adapter():
                ref, _ = completion_logp(self.model, prompts, comps, self.codec.pad, self.device)
        if self.cfg["mask-truncated"]:
            mask = mask * (~torch.tensor(trunc, device=self.device))[:, None].to(mask.dtype)
        stats: dict[str, float] = {}
        for _ in range(self.cfg["policy-iterations"]):
            logp, _ = completion_logp(self.model, prompts, comps, self.codec.pad, self.device)
            loss, stats = grpo_loss(
                logp,
                old,
                ref,
                a,
                mask,
                self.cfg["eps-low"],
                self.cfg["eps-high"],
                self.cfg["beta"],
            )
            self.opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            stats["loss"] = float(loss.item())
        stats["truncated_fraction"] = float(np.mean(trunc)) if trunc else 0.0
        self.model.eval()
        return stats

    def arrays(self) -> ArrayRecord:
        return lora_state(self.model)


# ---------------------------------------------------------------------------- clients
def score(cfg, pid: int, server_round: int, questions, completions, group_size: int) -> list:
    """Client ``pid``'s rewards for its groups (exact in its own domain, noisy elsewhere)."""
    rng = np.random.default_rng(derive_seed(cfg["seed"], pid, server_round, 0x5C))
    out: list[float] = []
    for i, q in enumerate(questions):
        group = completions[i * group_size : (i + 1) * group_size]
        r = D.expert_rewards(q, group, own_domain(pid), cfg["ood-error"], rng)
        out.extend(float(v) for v in r)
    return out


def sft_steps(cfg, model, data, steps: int, rng: np.random.Generator) -> list[float]:
    """``steps`` AdamW steps (a fresh optimiser, lr ``lr``) of next-token loss on the LoRA
    adapter: batches of ``batch-size`` of the (question, answer) pairs ``data``, drawn by ``rng``,
    target ``<answer>X</answer>`` + EOS after the prompt. Returns the losses."""
    c = codec(cfg["model"])
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    dev = get_device(cfg["device"])
    model.train()
    losses = []
    for _ in range(steps):
        idx = rng.choice(len(data), size=min(cfg["batch-size"], len(data)), replace=False)
        prompts = [c.prompt(data[i][0], cfg["shots"]) for i in idx]
        comps = [c.encode(f"<answer>{data[i][1]}</answer>") + [c.eos] for i in idx]
        logp, mask = completion_logp(model, prompts, comps, c.pad, dev)
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.item()))
    model.eval()
    return losses


def warmup(cfg, policy: LoraPolicy, log=print) -> list[float]:
    """RECONSTRUCTION (format warm-up): ``warmup-steps`` SFT steps of the server's policy on the
    server's own auxiliary set (question, correct answer), before the first round; never on a
    client's data. Batches from ``derive_seed(seed, 0x3A)``."""
    steps = cfg["warmup-steps"]
    if steps == 0:
        return []
    aux = aux_set(cfg["aux-per-domain"])
    data = [(q, D.solve(q)) for q in aux.questions]
    rng = np.random.default_rng(derive_seed(cfg["seed"], 0x3A))
    losses = sft_steps(cfg, policy.model, data, steps, rng)
    log(
        f"[fedgrpo] warm-up: {steps} SFT steps on {len(data)} auxiliary items, loss "
        f"{losses[0]:.3f} -> {losses[-1]:.3f}"
    )
    return losses


def sft_step(cfg, pid: int, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, dict]:
    """FedAvg-SFT: ``sft-steps`` AdamW steps of next-token loss on the client's own examples
    (:func:`sft_steps`), batches drawn from (seed, pid, round)."""
    model = _client_model(cfg)
    load_lora(model, arrays)
    data = client_items(cfg, pid)
    rng = np.random.default_rng(derive_seed(cfg["seed"], pid, server_round, 0x5F))
    losses = sft_steps(cfg, model, data, cfg["sft-steps"], rng)
    return lora_state(model), {"loss": float(np.mean(losses)), "num-examples": len(data)}


@lru_cache(maxsize=1)
def _cached_model(key: tuple):
    cfg = dict(key)
    return lora_model(cfg)


def _client_model(cfg):
    keys = ("model", "seed", "lora-rank", "lora-alpha", "device")
    return _cached_model(tuple((k, cfg[k]) for k in keys))


# ---------------------------------------------------------------------------- harness
def evaluator(cfg, policy: LoraPolicy | None = None):
    """``evaluate(round, arrays) -> metrics`` (None: a round that is not evaluated, see
    ``eval-every``): greedy answers to the test questions, exact-match
    accuracy per domain (``acc_<domain>``), overall ``accuracy``, ``format`` rate and mean exact
    ``reward``."""
    tests = test_items(cfg["eval-per-domain"])

    def evaluate(server_round: int, arrays: ArrayRecord) -> dict | None:
        last = server_round == cfg["num-server-rounds"]
        if server_round % cfg["eval-every"] and not last:
            return None
        p = policy if policy is not None else LoraPolicy(cfg)
        if len(arrays):
            load_lora(p.model, arrays)
        out, hits, fmt, rew = {}, 0, 0.0, 0.0
        n = 0
        for k, name in enumerate(D.NAMES):
            qs = [q for q, _ in tests[k]]
            comps = p.sample(qs, 1, None)
            right = 0
            for (q, a), group in zip(tests[k], comps, strict=True):
                text = p.codec.decode(group[0])
                right += D.same_answer(D.extract_answer(text), a)
                fmt += D.format_reward(text)
                rew += float(D.exact_rewards(q, [text])[0])
            out[f"acc_{name}"] = right / len(qs)
            hits += right
            n += len(qs)
        out.update(accuracy=hits / n, format=fmt / n, reward=rew / n)
        return out

    return evaluate
