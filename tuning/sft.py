"""Supervised fine-tuning of the LoRA adapter on an admin's data set: a short loop beside
``tuning.dpo.train_loop``, sharing its tokenisation (the chat template's answer tokens,
``_completion_ids``) and its scoring (``sequence_logps``: the LM head only where an answer
token is predicted).

A row is ``{"id", "messages": [... , {"role": "assistant", ...}]}`` (tuning.dataset); the
loss is the mean negative log-likelihood of the last assistant message's tokens, end-of-turn
included, given everything before it, as the server will prompt: the chat template with its
generation prompt.

Beside the data set's rows, the job replays the starting model's own answers to general
questions (``replay_rows``; ``TrainConfig.replay``) and, by default, trains them toward its
top-32 next-token distributions rather than their tokens (``with_replay_reference``,
``sft_loss``): the version learns the domain and keeps answering as before elsewhere.

Why our own loop rather than TRL's SFTTrainer: the job machinery around it (progress rows
every step, cancel between steps, the machine's number format, the same AdamW + linear decay
+ clip 1.0 as the DPO loop) is already written for the DPO loop, and the loss is four
lines over ``sequence_logps``; SFTTrainer would need a dataset conversion, a callback for
progress and cancel, and its CPU defaults set one by one, as ``tuning.trl_trainer`` does
for DPO, and it computes the LM head over every position (prompt included).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import TrainConfig
from .dpo import (_completion_ids, answer_logits, answer_token_share, autocast_on, optimise, pad_id,
                  sequence_logps, to_device)
from .generation import answering_code, code_version, greedy_answers, keep, keep_tensors, read_kept, read_tensors
from .general import questions as general_questions
from .synthetic import prompts as open_prompts, spread

# What ``method: sft`` changes unless a setting says otherwise (tuning.train applies them
# before --set): DPO's 5e-5 for 2 epochs is tuned to nudge preferences, not to teach facts.
# Measured on SmolLM2-135M (the Quorvia set, 164 rows, 41 held-out paraphrases; bf16 on an
# AMD EPYC; README "Teaching it a domain"): with 128 replayed answers by KL (TrainConfig
# replay, replay_loss), 4 epochs learned 26/41 held-out questions and 6 epochs 31/41 (76%),
# the regression set 62/63; without replay, 4 epochs learned 26/41 but kept only 38/65.
# Batches of similar length (by_length): a data set's short rows (~50 tokens) beside replayed
# answers of up to ~270 padded to the longest in a mixed batch of 8 (1.67 padded tokens per
# real one on the 20-fact CI set, 1.10 grouped). Measured one after the other (2026-12-02,
# AMD EPYC avx512_bf16, bf16, 20 facts, 156 steps): 552 s of steps mixed, 367 s grouped;
# held-out 15/20 both, regression set 50/52 mixed, 52/52 grouped; gate passed both.
SFT_DEFAULTS = {"learning_rate": 5e-4, "epochs": 6, "batch_size": 8, "by_length": True}


@dataclass(frozen=True)
class TokenizedExample:
    prompt: list[int]
    answer: list[int]
    # For a replayed row with ``replay_loss="kl"``: the starting model's top-k next-token
    # log-probabilities at each answer position, (len(answer), k) ids and values.
    ref_ids: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None


# How many of the starting model's most likely next tokens a replayed position keeps for
# the distillation term: the top 32 of SmolLM2's 49k hold nearly all the probability of a
# greedy answer's next token, and (positions x 32) fits in a few MB for 256 rows.
REPLAY_TOP_K = 32


def tokenize_example(tokenizer, row: dict, max_length: int) -> TokenizedExample:
    """The prompt as the server sends it and the last answer's tokens; over ``max_length``
    keep the prompt's end and the answer's start (as ``tokenize_pair`` does). A row marked
    ``cut`` (an answer that was cut at a token limit) has no end-of-turn token to learn."""
    head, answer = row["messages"][:-1], row["messages"][-1:]
    prompt = tokenizer.apply_chat_template(head, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    ids = _completion_ids(tokenizer, head, answer)
    if row.get("cut") and ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    keep_prompt = max(max_length // 2, max_length - len(ids))
    prompt = prompt[-keep_prompt:]
    return TokenizedExample(prompt, ids[: max_length - len(prompt)])


def with_replay_reference(model, items: list[TokenizedExample], pad: int, autocast: bool,
                          top_k: int = REPLAY_TOP_K, batch_size: int = 16) -> list[TokenizedExample]:
    """``items`` with the model's top-k log-probabilities at each answer position, computed
    once before training, as the model is then (the base, or the parent version when the
    job continues one): the reference the ``kl`` replay loss holds the version to."""
    out = []
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast_on(model, autocast):
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            logits, rows, _ = answer_logits(model, to_device(collate_examples(chunk, pad), model))
            top = torch.log_softmax(logits.float(), dim=-1).topk(min(top_k, logits.shape[-1]), dim=-1)
            top, rows = type(top)((top.values.cpu(), top.indices.cpu())), rows.cpu()
            for j, it in enumerate(chunk):
                at = rows == j
                out.append(TokenizedExample(it.prompt, it.answer, top.indices[at].clone(), top.values[at].clone()))
    model.train(was_training)
    return out


def collate_examples(items: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and completion_mask, each (B, T); with
    reference rows (``with_replay_reference``) also ``replay`` (B,) and the reference's
    ``ref_ids``/``ref_logps`` for the replayed rows' answer positions, in order (P, k)."""
    width = max(len(it.prompt) + len(it.answer) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(items), width), dtype=torch.long)
    comp = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        n, p = len(it.prompt) + len(it.answer), len(it.prompt)
        ids[i, :n] = torch.tensor(it.prompt + it.answer)
        attn[i, :n] = 1
        comp[i, p:n] = 1
    batch = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}
    if any(it.ref_ids is not None for it in items):
        batch["replay"] = torch.tensor([it.ref_ids is not None for it in items])
        batch["ref_ids"] = torch.cat([it.ref_ids for it in items if it.ref_ids is not None])
        batch["ref_logps"] = torch.cat([it.ref_logps for it in items if it.ref_ids is not None])
    return batch


def sft_loss(model, batch: dict, autocast: bool) -> tuple[torch.Tensor, float]:
    """Mean loss per answer token over the batch, and the share of answer tokens the model
    already ranks first (how much of the answers it would say greedily). The loss is the
    answer tokens' NLL, except at replayed rows with a reference (``batch["replay"]``):
    there, the KL divergence from the reference's top-k next-token distribution
    (renormalised over those k) to the model's, at every answer position."""
    with autocast_on(model, autocast):
        if "replay" not in batch:
            logps, counts = sequence_logps(model, batch)
            return -logps.sum() / counts.sum().clamp(min=1), float(torch.exp(logps.detach().sum() / counts.sum().clamp(min=1)))
        logits, rows, targets = answer_logits(model, batch)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (M, V)
    token_logps = logp.gather(1, targets.unsqueeze(1)).squeeze(1)  # (M,)
    replayed = batch["replay"][rows]  # (M,) positions in a replayed row, in collate's order
    ref = torch.log_softmax(batch["ref_logps"], dim=-1)  # (P, k): renormalised over the top k
    kl = (ref.exp() * (ref - logp[replayed].gather(1, batch["ref_ids"]))).sum(1)  # (P,)
    loss = (-token_logps[~replayed].sum() + kl.sum()) / max(len(rows), 1)
    return loss, float(torch.exp(token_logps.detach().mean()))


# Replayed answers are cut here: long enough for most of an ordinary answer, short enough
# that answering 64 questions costs about a minute on two cores. A cut answer trains
# without its end-of-turn token (``cut``), so it does not teach stopping mid-sentence.
REPLAY_TOKENS = 96


def replay_questions(count: int) -> list[str]:
    """The ``count`` general questions a job replays: short facts and instructions first
    (``tuning.general.questions``, about 100), then open questions spread over
    ``tuning.synthetic.prompts`` (definitions, tips, whys)."""
    facts = general_questions()
    return spread(facts, min(count, len(facts))) + spread(open_prompts(), max(0, count - len(facts)))


def replay_rows(model, tokenizer, count: int, max_new_tokens: int = REPLAY_TOKENS,
                progress: Callable[[int, int], None] | None = None, batch_size: int = 32) -> list[dict]:
    """``count`` general questions (``replay_questions``), each with the model's own greedy
    answer as it is now: SFT rows (``id`` "replay-N", ``cut`` when the answer hit the token
    limit) that hold the version to its starting behaviour outside the domain. An empty
    answer is not replayed. ``progress(answered, count)`` after each batch: on a 2-core CPU
    without fast kernels the answers take minutes, before the first training step. Batches
    of 32: 64 answers of 96 tokens by the embedded model took 42 s in batches of 16, 34 s of
    32 and 31 s of 64 (2026-12-06, Intel Xeon, 2 cores, float32), the same answers."""
    picked = replay_questions(count)
    if not picked:
        return []
    convs = [[{"role": "user", "content": q}] for q in picked]
    answers: list[tuple[str, int]] = []
    for i in range(0, len(convs), batch_size):
        answers += greedy_answers(model, tokenizer, convs[i : i + batch_size], max_new_tokens=max_new_tokens,
                                  batch_size=batch_size)
        if progress is not None:
            progress(len(answers), len(convs))
    return [{"id": f"replay-{i}", "messages": c + [{"role": "assistant", "content": text}],
             "cut": tokens >= max_new_tokens}
            for i, (c, (text, tokens)) in enumerate(zip(convs, answers)) if text]


@dataclass(frozen=True)
class ReplayCache:
    """Where a job keeps the replayed answers of the model it starts from, so the next job
    from the same start (a retrain after a refused version, an SFT job after a DPO one, every
    job on a fresh install of the same base) reads them instead of answering again: minutes
    on a 2-core CPU without fast kernels (128 answers took 390 s on AVX2 kernels in float32).

    ``folder``: beside the prepared base models (``<models>/.replay``), shared by every data
    folder using them. ``start``: what the starting model is (``starting_point``): the base
    folder's files and, for a job continuing a version, the hash of that version's weights.
    The answers are keyed by the start, the number format, the questions and the token
    limit; anything else (a changed file, another parent) answers again."""

    folder: Path
    start: dict

    def file(self, config: TrainConfig, questions: list[str], max_new_tokens: int) -> Path:
        key = json.dumps({"start": self.start, "dtype": config.dtype, "questions": questions,
                          "max_new_tokens": max_new_tokens, "code": answering_code()}, sort_keys=True)
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"

    def reference_file(self, config: TrainConfig, items: list[TokenizedExample], top_k: int = REPLAY_TOP_K) -> Path:
        """Where the starting model's top-k reference for these tokenized replayed rows is
        kept (``with_replay_reference``: a forward pass over every row, about 36 s for 128
        rows on AVX2 kernels in float32): keyed by the start, the format, the rows' tokens,
        k and the code that computes it."""
        rows = hashlib.sha256(json.dumps([[it.prompt, it.answer] for it in items]).encode()).hexdigest()
        key = json.dumps({"start": self.start, "dtype": config.dtype, "rows": rows, "top_k": top_k,
                          "code": reference_code()}, sort_keys=True)
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.reference.safetensors"

    def read(self, path: Path) -> list[dict] | None:
        """The rows kept at ``path``, or None when absent or not rows (then they are answered again)."""
        return read_kept(path, lambda rows: isinstance(rows, list) and all(
            isinstance(r, dict) and isinstance(r.get("id"), str) and isinstance(r.get("cut"), bool)
            and isinstance(r.get("messages"), list) and len(r["messages"]) == 2
            and all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("user", "assistant")
                    for m in r["messages"]) for r in rows))


def starting_point(base_model_dir: Path, parent: Path | None = None) -> dict:
    """What a job starts from, for ``ReplayCache``: each file of the base folder (path, size,
    modification time) and the sha256 of the parent version's files (weights, configuration)."""
    base = Path(base_model_dir).resolve()
    files = sorted([str(p.relative_to(base)), p.stat().st_size, p.stat().st_mtime_ns]
                   for p in base.rglob("*") if p.is_file())
    out: dict = {"base": str(base), "files": files}
    if parent is not None:
        h = hashlib.sha256()
        for f in sorted(p for p in Path(parent).rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(parent)}\0".encode() + f.read_bytes())
        out["parent"] = h.hexdigest()
    return out


def cached_replay_rows(model, tokenizer, config: TrainConfig, cache: ReplayCache | None,
                       progress: Callable[[dict], None] | None = None) -> list[dict]:
    """``replay_rows`` for ``config.replay`` questions, read from ``cache`` when the same
    start answered them before, else answered (reporting ``replay_answered`` of
    ``replay_total`` to ``progress``) and kept there."""
    def answered(done: int, total: int) -> None:
        if progress is not None:
            progress({"phase": "training", "replay_answered": done, "replay_total": total})

    path = cache.file(config, replay_questions(config.replay), REPLAY_TOKENS) if cache else None
    rows = cache.read(path) if cache else None
    if rows is not None:
        answered(len(rows), len(rows))
        return rows
    rows = replay_rows(model, tokenizer, config.replay, progress=answered)
    if cache:
        keep(path, rows)
    return rows


@dataclass
class Replay:
    """Replayed rows with their reference (:func:`prepare_replay`), trained beside another
    objective: each step of ``tuning.dpo.optimise`` also takes the next ``per_step`` of
    them (cycling through a shuffled order) and adds ``weight`` times their loss (the mean
    KL per answer position, :func:`sft_loss`) to the step's gradient."""

    items: list[TokenizedExample]
    per_step: int
    weight: float
    pad: int
    autocast: bool

    def loss(self, model, share: list[TokenizedExample], prefix: int | None = None) -> torch.Tensor:
        """``prefix``: the shared prefix of the step's rows when ``share`` is a process's part
        of them (``tuning.dpo.shared_prefix``)."""
        batch = collate_examples(share, self.pad)
        if prefix is not None:
            batch["prefix"] = prefix
        return sft_loss(model, to_device(batch, model), self.autocast)[0]


def prepare_replay(model, tokenizer, config: TrainConfig, cache: ReplayCache | None = None,
                   progress: Callable[[dict], None] | None = None) -> list[TokenizedExample]:
    """``config.replay`` general questions answered by the model as it starts
    (:func:`cached_replay_rows`), tokenized, with the top-k reference when ``replay_loss``
    is "kl" (one forward pass per 16 rows, kept in ``cache`` beside the answers: it too
    depends only on the start)."""
    if not config.replay:
        return []
    replay = cached_replay_rows(model, tokenizer, config, cache, progress)
    pad = pad_id(tokenizer)
    replayed = [tokenize_example(tokenizer, r, config.max_length) for r in replay]
    if config.replay_loss == "kl" and replayed:
        path = cache.reference_file(config, replayed) if cache else None
        kept = read_reference(path, replayed) if path else None
        if kept is not None:
            return kept
        replayed = with_replay_reference(model, replayed, pad, config.dtype == "bfloat16")
        if path:
            keep_reference(path, replayed)
    return replayed


def reference_code() -> str:
    """What else decides a kept reference: the files that tokenize and score the rows
    (``tuning.generation.code_version``)."""
    from . import dpo

    return code_version(__file__, dpo.__file__)


def read_reference(path: Path, items: list[TokenizedExample]) -> list[TokenizedExample] | None:
    """``items`` with the reference kept at ``path`` (``keep_reference``), or None when absent
    or not that reference (a row missing or of another shape: said, then computed again)."""
    def valid(kept: dict) -> bool:
        return len(kept) == 2 * len(items) and all(
            f"{i}.ids" in kept and f"{i}.logps" in kept and kept[f"{i}.ids"].shape == kept[f"{i}.logps"].shape
            and kept[f"{i}.ids"].shape[0] == len(it.answer) and kept[f"{i}.ids"].dtype == torch.long
            and kept[f"{i}.logps"].dtype == torch.float32 for i, it in enumerate(items))

    kept = read_tensors(path, valid, "computing it again")
    if kept is None:
        return None
    return [TokenizedExample(it.prompt, it.answer, kept[f"{i}.ids"], kept[f"{i}.logps"]) for i, it in enumerate(items)]


def keep_reference(path: Path, items: list[TokenizedExample]) -> None:
    """Write the rows' reference at ``path`` (safetensors, whole, then renamed); a folder that
    cannot be written only costs the reuse."""
    tensors = {}
    for i, it in enumerate(items):
        tensors[f"{i}.ids"], tensors[f"{i}.logps"] = it.ref_ids, it.ref_logps
    keep_tensors(path, tensors, "computes it again")


def replay_for(model, tokenizer, config: TrainConfig, progress: Callable[[dict], None] | None = None,
               cache: ReplayCache | None = None) -> Replay | None:
    """The replay a preference job (DPO, KTO) trains beside its feedback; None when
    ``config.replay`` is 0."""
    if not config.replay:
        return None
    items = prepare_replay(model, tokenizer, config, cache, progress)
    if progress is not None and items:
        progress({"phase": "training", "replay_rows": len(items)})
    return Replay(items, config.replay_per_step, config.replay_weight, pad_id(tokenizer),
                  config.dtype == "bfloat16") if items else None


def train_sft(model, tokenizer, rows: list[dict], config: TrainConfig,
              progress: Callable[[dict], None] | None = None,
              should_stop: Callable[[], bool] | None = None, replay_cache: ReplayCache | None = None) -> dict:
    """Train the model's active LoRA adapter on ``rows`` and ``config.replay`` replayed
    answers of the model as it starts (:func:`replay_rows`); the run's metrics.

    ``progress`` gets a row after every step (step, steps, epoch, loss, token_prob: the
    geometric mean probability of the answer tokens, seconds); raises :class:`Cancelled`
    between steps once ``should_stop()`` is true (``tuning.dpo.Cancelled``)."""
    torch.manual_seed(config.seed)
    replayed = prepare_replay(model, tokenizer, config, replay_cache, progress)
    if progress is not None and replayed:
        progress({"phase": "training", "replay_rows": len(replayed)})
    pad = pad_id(tokenizer)
    items = [tokenize_example(tokenizer, r, config.max_length) for r in rows] + replayed

    def step_loss(batch: dict) -> tuple[torch.Tensor, dict]:
        loss, token_prob = sft_loss(model, batch, config.dtype == "bfloat16")
        return loss, {"loss": float(loss.detach()), "token_prob": token_prob}

    history, per_epoch = optimise(model, items, collate_examples, pad, step_loss, config, progress, should_stop,
                                  weigh=answer_token_share)
    last = history[-per_epoch:] if history else []
    return {
        "steps": len(history),
        "first_loss": round(history[0]["loss"], 5) if history else None,
        "loss": round(sum(r["loss"] for r in last) / len(last), 5) if last else None,
        "token_prob": round(sum(r["token_prob"] for r in last) / len(last), 5) if last else None,
        "seconds": history[-1]["seconds"] if history else 0.0,
        "seconds_per_step": round(history[-1]["seconds"] / len(history), 3) if history else None,
        "examples": len(rows),
        "replay_rows": len(replayed),
    }
