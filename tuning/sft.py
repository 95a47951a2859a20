"""Supervised fine-tuning of the LoRA adapter on an admin's data set: a short loop beside
``tuning.dpo.train_loop``, sharing its tokenisation (the chat template's answer tokens,
``_completion_ids``) and its scoring (``sequence_logps``: the LM head only where an answer
token is predicted).

A row is ``{"id", "messages": [... , {"role": "assistant", ...}]}`` (tuning.dataset); the
loss is the mean negative log-likelihood of the last assistant message's tokens, end-of-turn
included, given everything before it, as the server will prompt: the chat template with its
generation prompt.

Why our own loop rather than TRL's SFTTrainer: the job machinery around it (progress rows
every step, cancel between steps, the machine's number format, the same AdamW + linear decay
+ clip 1.0 as the DPO loop) is already written for the DPO loop, and the loss is four
lines over ``sequence_logps``; SFTTrainer would need a dataset conversion, a callback for
progress and cancel, and its CPU defaults set one by one, as ``tuning.trl_trainer`` does
for DPO, and it computes the LM head over every position (prompt included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import TrainConfig
from .dpo import _completion_ids, autocast_on, optimise, sequence_logps

# What ``method: sft`` changes unless a setting says otherwise (tuning.train applies them
# before --set): DPO's 5e-5 for 2 epochs is tuned to nudge preferences, not to teach facts.
# Measured with these on SmolLM2-135M (tests/integration/test_sft_embedded.py, 164 rows):
# held-out domain questions 0% -> 63%, but the regression set 65/65 -> 38/65, so the gate
# refused the version. Not yet a recipe that keeps general knowledge; see that test.
SFT_DEFAULTS = {"learning_rate": 5e-4, "epochs": 4, "batch_size": 8}


@dataclass(frozen=True)
class TokenizedExample:
    prompt: list[int]
    answer: list[int]


def tokenize_example(tokenizer, row: dict, max_length: int) -> TokenizedExample:
    """The prompt as the server sends it and the last answer's tokens; over ``max_length``
    keep the prompt's end and the answer's start (as ``tokenize_pair`` does)."""
    head, answer = row["messages"][:-1], row["messages"][-1:]
    prompt = tokenizer.apply_chat_template(head, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    ids = _completion_ids(tokenizer, head, answer)
    keep_prompt = max(max_length // 2, max_length - len(ids))
    prompt = prompt[-keep_prompt:]
    return TokenizedExample(prompt, ids[: max_length - len(prompt)])


def collate_examples(items: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and completion_mask, each (B, T)."""
    width = max(len(it.prompt) + len(it.answer) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    comp = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        n, p = len(it.prompt) + len(it.answer), len(it.prompt)
        ids[i, :n] = torch.tensor(it.prompt + it.answer)
        attn[i, :n] = 1
        comp[i, p:n] = 1
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}


def sft_loss(model, batch: dict, autocast: bool) -> tuple[torch.Tensor, float]:
    """Mean NLL per answer token over the batch, and the share of answer tokens the model
    already ranks first (how much of the answers it would say greedily)."""
    with autocast_on(model, autocast):
        logps, counts = sequence_logps(model, batch)
    return -logps.sum() / counts.sum().clamp(min=1), float(torch.exp(logps.detach().sum() / counts.sum().clamp(min=1)))


def train_sft(model, tokenizer, rows: list[dict], config: TrainConfig,
              progress: Callable[[dict], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> dict:
    """Train the model's active LoRA adapter on ``rows``; the run's metrics.

    ``progress`` gets a row after every step (step, steps, epoch, loss, token_prob: the
    geometric mean probability of the answer tokens, seconds); raises :class:`Cancelled`
    between steps once ``should_stop()`` is true (``tuning.dpo.Cancelled``)."""
    torch.manual_seed(config.seed)
    items = [tokenize_example(tokenizer, r, config.max_length) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def step_loss(batch: dict) -> tuple[torch.Tensor, dict]:
        loss, token_prob = sft_loss(model, batch, config.dtype == "bfloat16")
        return loss, {"loss": float(loss.detach()), "token_prob": token_prob}

    def tokens(share: list, batch: list) -> float:  # the loss is a mean over the batch's answer tokens
        return sum(len(it.answer) for it in share) / max(1, sum(len(it.answer) for it in batch))

    history, per_epoch = optimise(model, items, collate_examples, pad, step_loss, config, progress, should_stop,
                                  weigh=tokens)
    last = history[-per_epoch:] if history else []
    return {
        "steps": len(history),
        "first_loss": round(history[0]["loss"], 5) if history else None,
        "loss": round(sum(r["loss"] for r in last) / len(last), 5) if last else None,
        "token_prob": round(sum(r["token_prob"] for r in last) / len(last), 5) if last else None,
        "seconds": history[-1]["seconds"] if history else 0.0,
        "seconds_per_step": round(history[-1]["seconds"] / len(history), 3) if history else None,
        "examples": len(rows),
    }
