"""The DPO objective and our own short training loop over a peft LoRA model.

A pair is TRL's conversational record: ``{"prompt": [messages], "chosen": [assistant
message], "rejected": [assistant message], ...}``. The reference model is the same model
with its adapter switched off (``with model.disable_adapter():``), so no second copy of
the weights is held.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .config import TrainConfig


class Cancelled(Exception):
    """The run was asked to stop; nothing it made is kept."""


# -- the loss -----------------------------------------------------------------------------


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO loss per pair.

    All inputs are (B,) summed log-probabilities of the completion tokens. Returns
    (losses, chosen_rewards, rejected_rewards), each (B,): the implicit reward of an answer
    is ``beta * (log pi(y|x) - log pi_ref(y|x))`` and the loss is
    ``-log sigmoid(chosen_reward - rejected_reward)``: log 2 when policy equals reference.
    """
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


# -- tokens -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def _completion_ids(tokenizer, prompt: list[dict], answer: list[dict]) -> list[int]:
    """Token ids the chat template gives the answer after the prompt, through its end-of-turn."""
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)["input_ids"]
    if full[: len(head)] == head:
        ids = full[len(head) :]
    else:  # a template that re-renders earlier turns: fall back to the content + EOS
        ids = tokenizer(answer[0]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    # Cut after the end-of-turn token: what follows it (a newline) is template padding.
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
    return ids


def tokenize_pair(tokenizer, pair: dict, max_length: int) -> TokenizedPair:
    """Chat-template a pair; over ``max_length`` keep the prompt's end and the answers' start."""
    prompt = tokenizer.apply_chat_template(
        pair["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    chosen = _completion_ids(tokenizer, pair["prompt"], pair["chosen"])
    rejected = _completion_ids(tokenizer, pair["prompt"], pair["rejected"])
    longest = max(len(chosen), len(rejected))
    keep_prompt = max(max_length // 2, max_length - longest)
    prompt = prompt[-keep_prompt:]
    room = max_length - len(prompt)
    return TokenizedPair(prompt, chosen[:room], rejected[:room])


def collate(items: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen sequences then rejected ones, right-padded, in one batch of 2B rows.

    Returns input_ids, attention_mask and completion_mask, each (2B, T); completion_mask
    marks the answer tokens whose log-probabilities count.
    """
    seqs, masks = [], []
    for side in ("chosen", "rejected"):
        for it in items:
            answer = getattr(it, side)
            seqs.append(it.prompt + answer)
            masks.append([0] * len(it.prompt) + [1] * len(answer))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    comp = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        comp[i, : len(m)] = torch.tensor(m)
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the completion tokens and their count, each (N,).

    Runs the backbone, then the LM head only at the M positions that predict an answer
    token: (M, V) logits instead of (N, T, V), as TRL's fused LM head does. With a 49k
    vocabulary the head is a fifth of the model's work per token, and about half the
    tokens of a pair are prompt. For plain causal LMs (no logit soft-capping or scaling).
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(lm, lm.base_model_prefix)
    hidden = backbone(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state  # (N, T, H)
    mask = batch["completion_mask"][:, 1:].bool()  # (N, T-1): position t predicts token t+1
    rows = mask.nonzero()[:, 0]  # (M,) which sequence each scored position belongs to
    logits = lm.get_output_embeddings()(hidden[:, :-1][mask]).float()  # (M, V)
    targets = batch["input_ids"][:, 1:][mask]  # (M,)
    token_logps = logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=1)
    n = batch["input_ids"].shape[0]
    sums = torch.zeros(n, dtype=token_logps.dtype).index_add(0, rows, token_logps)
    return sums, mask.sum(1).to(token_logps.dtype)


@dataclass
class StepStats:
    loss: float
    dpo_loss: float
    nll: float
    reward_accuracy: float
    reward_margin: float
    chosen_reward: float
    rejected_reward: float


def pair_loss(model, batch: dict, beta: float, nll_weight: float, autocast: bool) -> tuple[torch.Tensor, StepStats]:
    """Forward the reference (adapter off, no grad) and the policy; DPO + NLL on chosen."""
    n = batch["input_ids"].shape[0] // 2
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with torch.no_grad(), model.disable_adapter(), ctx:
        ref_logps, _ = sequence_logps(model, batch)
    with ctx:
        logps, counts = sequence_logps(model, batch)
    losses, cr, rr = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta)
    # NLL per chosen token (TRL's "sft" term): long answers do not outweigh short ones.
    nll = -(logps[:n] / counts[:n].clamp(min=1)).mean()
    loss = losses.mean() + nll_weight * nll
    margin = cr - rr
    return loss, StepStats(
        loss=float(loss.detach()), dpo_loss=float(losses.detach().mean()), nll=float(nll.detach()),
        reward_accuracy=float((margin > 0).float().mean()), reward_margin=float(margin.mean()),
        chosen_reward=float(cr.mean()), rejected_reward=float(rr.mean()),
    )


# -- the loop -----------------------------------------------------------------------------

Progress = Callable[[dict], None]


def train_loop(
    model,
    tokenizer,
    pairs: list[dict],
    config: TrainConfig,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Train the model's active LoRA adapter on ``pairs``; return the run's metrics.

    Calls ``progress`` after every step with step, steps, epoch, loss, reward accuracy and
    margin, seconds; raises :class:`Cancelled` between steps once ``should_stop()`` is true.
    """
    torch.manual_seed(config.seed)
    items = [tokenize_pair(tokenizer, p, config.max_length) for p in pairs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def step_loss(batch: dict) -> tuple[torch.Tensor, dict]:
        loss, stats = pair_loss(model, batch, config.beta, config.nll_weight, config.dtype == "bfloat16")
        return loss, vars(stats)

    history, _ = optimise(model, items, collate, pad, step_loss, config, progress, should_stop)
    return summarize(history)


def optimise(model, items: list, collate_fn, pad: int, step_loss, config: TrainConfig,
             progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
             kind_of: Callable[[object], str] | None = None) -> tuple[list[dict], int]:
    """The optimisation loop every objective shares: AdamW with linear decay to zero, shuffled
    batches of ``config.batch_size`` for ``config.epochs``, gradient clipping, a stop check
    between steps (:class:`Cancelled`) and a progress row after each. ``step_loss(batch)``
    returns (loss, the step's figures, "loss" among them); ``collate_fn(items, pad)`` makes
    a batch. With ``kind_of`` (item -> kind), no batch mixes kinds: each kind is shuffled
    and cut into batches of its own, and the batches are shuffled together (a job with DPO
    pairs and KTO votes: each step is one loss, each example seen once per epoch).
    Returns (per-step rows, steps per epoch)."""
    rng = random.Random(config.seed)
    if kind_of is None:
        per_epoch = math.ceil(len(items) / config.batch_size)
    else:
        sizes = Counter(kind_of(it) for it in items)
        per_epoch = sum(math.ceil(n / config.batch_size) for n in sizes.values())
    steps = per_epoch * config.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    model.train()
    history: list[dict] = []
    start = time.monotonic()
    step = 0
    for epoch in range(config.epochs):
        batches = _batches(items, config.batch_size, rng, kind_of)
        for b, chosen in enumerate(batches):
            if should_stop is not None and should_stop():
                raise Cancelled(f"cancelled at step {step} of {steps}")
            batch = collate_fn([items[i] for i in chosen], pad)
            loss, stats = step_loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
            opt.step()
            sched.step()
            step += 1
            row = {"step": step, "steps": steps, "epoch": epoch + (b + 1) / per_epoch, **stats,
                   "grad_norm": grad_norm, "seconds": round(time.monotonic() - start, 2)}
            if not all(math.isfinite(v) for v in (row["loss"], grad_norm)):
                raise FloatingPointError(f"loss or gradient became non-finite at step {step}")
            history.append(row)
            if progress is not None:
                progress(row)
    model.eval()
    return history, per_epoch


def _batches(items: list, size: int, rng: random.Random, kind_of) -> list[list[int]]:
    """One epoch's batches of item indices, shuffled; of one kind each when ``kind_of`` is given."""
    order = list(range(len(items)))
    rng.shuffle(order)
    if kind_of is None:
        return [order[i : i + size] for i in range(0, len(order), size)]
    by_kind: dict[str, list[int]] = {}
    for i in order:
        by_kind.setdefault(kind_of(items[i]), []).append(i)
    batches = [idx[i : i + size] for idx in by_kind.values() for i in range(0, len(idx), size)]
    rng.shuffle(batches)
    return batches


def summarize(history: list[dict]) -> dict:
    """Run metrics from per-step rows: the last epoch's means, first-step loss, totals."""
    if not history:
        return {"steps": 0}
    last = history[-max(1, len(history) // max(1, int(math.ceil(history[-1]["epoch"])))):]
    mean = lambda key: round(sum(r[key] for r in last) / len(last), 5)  # noqa: E731
    return {
        "steps": len(history),
        "first_loss": round(history[0]["loss"], 5),
        "first_dpo_loss": round(history[0]["dpo_loss"], 5),
        "loss": mean("loss"),
        "dpo_loss": mean("dpo_loss"),
        "nll": mean("nll"),
        "reward_accuracy": mean("reward_accuracy"),
        "reward_margin": mean("reward_margin"),
        "seconds": history[-1]["seconds"],
        "seconds_per_step": round(history[-1]["seconds"] / len(history), 3),
    }
