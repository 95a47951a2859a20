"""The DPO objective and our own short training loop over a peft LoRA model.

A pair is TRL's conversational record: ``{"prompt": [messages], "chosen": [assistant
message], "rejected": [assistant message], ...}``. The reference model is the same model
with its adapter switched off (``with model.disable_adapter():``), so no second copy of
the weights is held.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import random
import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .config import TrainConfig, epochs_for


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
    # Which chosen tokens the NLL term counts (1/0 per token); None: all of them.
    nll: tuple[int, ...] | None = None
    # Which chosen and rejected tokens the DPO log-ratios count (TrainConfig.dpo_tokens
    # "edit"); None: all answer tokens.
    dpo: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    # The reference's summed log-probabilities of (chosen, rejected), when computed once
    # before training (TrainConfig.reference="once"); None: computed at every step.
    ref: tuple[float, float] | None = None
    # (chosen position, token) pairs the unlikelihood term pushes down there: at a sentence
    # start the user kept, the first token of the text they added at the end
    # (TrainConfig.unlike_kept_starts, :func:`kept_unlikes`); None: none.
    unlike: tuple[tuple[int, int], ...] | None = None


def edited_tokens(chosen: list[int], rejected: list[int]) -> tuple[int, ...]:
    """1 for each chosen token the user's edit put there, 0 for those kept from the rejected
    answer: tokens inserted or replaced and the one token after them (how the answer goes
    on after the edit: the end-of-turn after an added closing, which otherwise was said
    again and again), and the token that follows a deletion (what is now said instead of
    the cut text, e.g. the end-of-turn after a shortened answer). An
    on-policy rejected answer is what the model already says, so its kept tokens carry
    little to learn; a phrase added to a 60-token answer is 4 tokens of 60 in a per-token
    mean and was learned 0/32 that way (bench/preference_suite.py). All ones if nothing differs."""
    marks = [0] * len(chosen)
    ops = difflib.SequenceMatcher(None, rejected, chosen, autojunk=False).get_opcodes()
    for tag, _i1, _i2, j1, j2 in ops:
        if tag in ("replace", "insert"):
            marks[j1 : j2 + 1] = [1] * (min(j2 + 1, len(chosen)) - j1)  # and what follows the edit
        elif tag == "delete" and j1 < len(chosen):
            marks[j1] = 1
    return tuple(marks) if any(marks) else tuple([1] * len(chosen))


def kept_starts(tokenizer, chosen: list[int], marks: tuple[int, ...]) -> tuple[int, ...]:
    """``marks`` (``edited_tokens``) plus 1 for each kept chosen token that begins a sentence
    after another one and comes before text the edit put there: where the user went on
    with the answer instead of adding that text (``TrainConfig.nll_kept_starts``). An added
    closing sentence otherwise raises its first word after every sentence end, and the
    version closed after two sentences where users kept four. A sentence ends where the
    pair builder says (``tuning.pairs.SENTENCE_END``: . ! or ? before white space, not a
    list's "2."), so a decimal's or a numbered line's digits are not a sentence start."""
    from .pairs import SENTENCE_END

    out = list(marks)
    last = max((j for j, m in enumerate(marks) if m), default=-1)
    pieces = [tokenizer.decode([t]) for t in chosen[:last]]
    starts = list(accumulate(map(len, pieces), initial=0))
    for m in SENTENCE_END.finditer("".join(pieces)):
        j = bisect_left(starts, m.end())  # the first token after the end's punctuation
        if 0 < j < last and not marks[j] and not marks[j - 1]:
            out[j] = 1
    return tuple(out)


def kept_unlikes(chosen: list[int], marks: tuple[int, ...], kept: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """(position, token) for each sentence start the user kept (``kept``, from
    :func:`kept_starts`, beyond ``marks``) before the last run of tokens the edit put there,
    with that run's first token: where the user went on, the text they added at the end (a
    closing's first word, or the end-of-turn of an answer they cut short) should not come
    yet (``TrainConfig.unlike_kept_starts``). Stressing the kept start alone left the
    version closing about two sentences early on answers of 100 words and more."""
    last = max((j for j, m in enumerate(marks) if m), default=-1)
    first = last
    while first > 0 and marks[first - 1]:
        first -= 1
    if first <= 0:
        return ()
    return tuple((j, chosen[first]) for j in range(first) if kept[j] and not marks[j])


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


def tokenize_pair(tokenizer, pair: dict, max_length: int, nll_tokens: str = "answer",
                  dpo_tokens: str = "answer", kept: bool = False, unlike: bool = False,
                  tail: int = 0) -> TokenizedPair:
    """Chat-template a pair; over ``max_length`` keep the prompt's end and the answers' start.
    ``nll_tokens="edit"`` marks the chosen tokens the NLL term counts (:func:`edited_tokens`;
    with ``kept``, also :func:`kept_starts`); ``unlike`` lists :func:`kept_unlikes`.
    ``tail`` > 0 (with ``dpo_tokens="edit"``): the chosen answer ends ``tail`` tokens after
    its last edited one (``TrainConfig.chosen_tail``)."""
    prompt = tokenizer.apply_chat_template(
        pair["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    chosen = _completion_ids(tokenizer, pair["prompt"], pair["chosen"])
    rejected = _completion_ids(tokenizer, pair["prompt"], pair["rejected"])
    longest = max(len(chosen), len(rejected))
    keep_prompt = max(max_length // 2, max_length - longest)
    prompt = prompt[-keep_prompt:]
    room = max_length - len(prompt)
    chosen, rejected = chosen[:room], rejected[:room]
    need = nll_tokens != "answer" or dpo_tokens == "edit" or unlike
    edited = edited_tokens(chosen, rejected) if need else None
    starts = kept_starts(tokenizer, chosen, edited) if (kept and nll_tokens != "answer") or unlike else None
    nll = None
    if nll_tokens != "answer":
        nll = starts if kept else edited
    marks = None
    if dpo_tokens == "edit":
        cut = edited_tokens(rejected, chosen)
        # With edit marks nothing reads the rejected answer past its last marked token (the
        # DPO term counts only marked tokens; NLL and unlikelihood are the chosen answer's),
        # and under causal attention what comes after changes nothing before: it is not
        # computed. An added opening leaves one rejected token (its first) to score.
        end = max((i for i, m in enumerate(cut) if m), default=len(cut) - 1) + 1
        if tail > 0:  # past this only the whole-answer NLL mean reads the chosen answer
            keep = max(i for i, m in enumerate(edited) if m) + 1 + tail
            chosen, edited = chosen[:keep], edited[:keep]
            nll = nll[:keep] if nll is not None else None
        rejected, marks = rejected[:end], (edited, cut[:end])
    return TokenizedPair(prompt, chosen, rejected, nll, marks,
                         unlike=kept_unlikes(chosen, edited, starts) if unlike else None)


def collate(items: list[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen sequences then rejected ones, right-padded, in one batch of 2B rows.

    Returns input_ids, attention_mask and completion_mask, each (2B, T); completion_mask
    marks the answer tokens whose log-probabilities count; nll_mask (B, T) the chosen
    tokens the NLL term counts.
    """
    seqs, masks, nll = [], [], []
    for side in ("chosen", "rejected"):
        for it in items:
            answer = getattr(it, side)
            seqs.append(it.prompt + answer)
            masks.append([0] * len(it.prompt) + [1] * len(answer))
            if side == "chosen":
                nll.append([0] * len(it.prompt) + list(it.nll if it.nll is not None else [1] * len(answer)))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    comp = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        comp[i, : len(m)] = torch.tensor(m)
    nll_mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, m in enumerate(nll):
        nll_mask[i, : len(m)] = torch.tensor(m)
    batch = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp, "nll_mask": nll_mask}
    if items and all(it.dpo is not None for it in items):
        dpo_mask = torch.zeros_like(comp)
        for side in (0, 1):
            for k, it in enumerate(items):
                row, marks = side * len(items) + k, it.dpo[side]
                dpo_mask[row, len(it.prompt) : len(it.prompt) + len(marks)] = torch.tensor(marks)
        batch["dpo_mask"] = dpo_mask
    if any(it.unlike for it in items):  # chosen rows: the token to push down at a position, else -1
        unlike_ids = torch.full((len(seqs), width), -1, dtype=torch.long)
        for k, it in enumerate(items):
            for j, token in it.unlike or ():
                unlike_ids[k, len(it.prompt) + j] = token
        batch["unlike_ids"] = unlike_ids
    if items and all(it.ref is not None for it in items):
        batch["ref_logps"] = torch.tensor([it.ref[0] for it in items] + [it.ref[1] for it in items])
    return batch


def pad_id(tokenizer) -> int:
    """The token batches are padded with: the tokenizer's pad token, else its end-of-turn."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: dict, model) -> dict:
    """The batch's tensors where the model is (its GPU under torchrun with NCCL; else a no-op)."""
    device = device_of(model)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast_on(model, enabled: bool):
    """bf16 autocast (``dtype`` "bfloat16") on the model's kind of device."""
    return torch.autocast(device_of(model).type, dtype=torch.bfloat16, enabled=enabled)


def sequence_key(prompt: list[int], answer: list[int]) -> str:
    """A scored sequence's name in a ``ReferenceCache``: the hash of its tokens (prompt, answer)."""
    return hashlib.sha256(json.dumps([prompt, answer]).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ReferenceCache:
    """Where the reference's log-probabilities of the pairs' answers are kept, token by token,
    so the next job from the same start reads them instead of scoring every pair again (a
    forward pass over both answers of every pair: about 95 s of a 259-pair job on AVX2
    kernels in float32, 2026-12-07). ``tuning.prepare`` scores the store's pairs ahead while
    the machine is idle; a job scores only what is new.

    ``folder``: in the data folder (``DataPaths.references``), not beside the models: the
    numbers come from users' answers. One file per start (``tuning.sft.starting_point``),
    format and scoring code, holding only the sequences of the last job or preparation, so a
    conversation marked "don't use" or a disabled account's pair leaves it at the next one.
    A sequence is named by the hash of its tokens (``sequence_key``)."""

    folder: Path
    start: dict

    def file(self, dtype: str) -> Path:
        from .generation import code_version

        key = json.dumps({"start": self.start, "dtype": dtype, "code": code_version(__file__)}, sort_keys=True)
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def read(self, dtype: str) -> dict[str, torch.Tensor]:
        """The kept sequences' token log-probabilities (name -> (answer length,) float32);
        empty when none are kept or the file is damaged (said: then all are scored again)."""
        from .generation import read_tensors

        kept = read_tensors(self.file(dtype), lambda t: all(v.dtype == torch.float32 and v.dim() == 1 for v in t.values()),
                            "scoring the pairs again")
        return kept or {}

    def keep(self, dtype: str, table: dict[str, torch.Tensor]) -> None:
        """Replace the kept sequences with ``table`` (written whole, then renamed); a folder
        that cannot be written only costs the reuse."""
        from .generation import keep_tensors

        keep_tensors(self.file(dtype), table, "scores the pairs again")


def token_logps(model, sequences: list[tuple[list[int], list[int]]], pad_id: int, autocast: bool,
                batch_size: int = 16, alone: bool = False) -> list[torch.Tensor]:
    """Each (prompt, answer) sequence's answer-token log-probabilities under ``model`` as it
    is (no gradient), float32 (len(answer),), in batches of similar length (sorted: little
    padding). With several processes each rank scores every size-th batch and the ranks add
    up one flat table, so each has them all; ``alone``: this process scores them all and
    waits for no other (the gate, which runs on the leader only)."""
    from . import distributed
    from .sft import TokenizedExample, collate_examples

    world = distributed.World() if alone else distributed.start()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    offsets = [0, *accumulate(len(a) for _, a in sequences)]
    flat = torch.zeros(offsets[-1], dtype=torch.float32)
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast_on(model, autocast):
        for b in range(0, len(order), batch_size):
            if (b // batch_size) % world.size != world.rank:
                continue
            idx = order[b : b + batch_size]
            chunk = [TokenizedExample(*sequences[i]) for i in idx]
            batch = to_device(collate_examples(chunk, pad_id), model)
            logits, rows, targets = answer_logits(model, batch)
            lp = (logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=1)).float().cpu()
            rows = rows.cpu()
            for r, i in enumerate(idx):
                flat[offsets[i] : offsets[i + 1]] = lp[rows == r]
    model.train(was_training)
    if not alone:
        flat = distributed.sum_across(flat)
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(sequences))]


def kept_logps(sides: list[tuple[list[int], list[int]]], cache: ReferenceCache | None, dtype: str,
               score: Callable[[list], list[torch.Tensor]]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Each (prompt, answer) side's name (``sequence_key``) and a table of their token
    log-probabilities: those ``cache`` keeps for ``dtype`` with the right length are read,
    the others scored once each by ``score(sides)``; the cache then holds these sides and
    nothing else. The pairs' reference (``with_reference``) and the gate's fixed versions
    (``tuning.gate.pair_logratios``) both keep their scores this way."""
    keys = [sequence_key(*side) for side in sides]
    length = {k: len(answer) for k, (_, answer) in zip(keys, sides)}
    read = cache.read(dtype) if cache is not None else {}
    table = {k: v for k, v in read.items() if length.get(k) == v.shape[0]}
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    missing = [k for k in first if k not in table]
    if missing:
        table.update(zip(missing, score([sides[first[k]] for k in missing])))
    if cache is not None and (missing or len(read) != len(table)):
        cache.keep(dtype, {k: table[k] for k in first})
    return keys, table


def with_reference(model, items: list[TokenizedPair], pad_id: int, autocast: bool,
                   cache: ReferenceCache | None = None) -> list[TokenizedPair]:
    """The items with the reference's log-probabilities attached (adapter off, no gradient),
    computed once instead of again at every step: each answer's token log-probabilities,
    summed over the tokens the DPO term counts (``dpo``'s marks, else the whole answer).
    With ``cache``, sequences kept there (``tuning.prepare``, an earlier job) are read and
    only the others scored; the cache then holds these items' sequences and nothing else.
    With several processes every rank scores every sequence's share (no cache: the ranks
    must agree on what is scored)."""
    import dataclasses

    from . import distributed

    if distributed.start().several:
        cache = None
    sides = [(it.prompt, it.chosen) for it in items] + [(it.prompt, it.rejected) for it in items]

    def score(missing):
        with model.disable_adapter():
            return token_logps(model, missing, pad_id, autocast)

    keys, table = kept_logps(sides, cache, "bfloat16" if autocast else "float32", score)
    n, out = len(items), []
    for i, it in enumerate(items):
        ref = []
        for side in (0, 1):
            lp = table[keys[side * n + i]].double()
            marks = it.dpo[side] if it.dpo is not None else None
            ref.append(float(lp.sum() if marks is None else (lp[: len(marks)] * torch.tensor(marks, dtype=torch.float64)).sum()))
        out.append(dataclasses.replace(it, ref=(ref[0], ref[1])))
    return out


# A prefix every row of a batch shares (the chat template's system prompt and the opening of
# the user's turn: 24 tokens of SmolLM2's ~36-token prompts) is computed once, not once per
# row, when it is at least this long (answer_logits).
SHARED_PREFIX_MIN = 8


def shared_prefix(batch: dict) -> int:
    """How many leading tokens every row of ``batch`` has in common, up to the position
    before the earliest answer token (that position's output is scored, so it stays in
    the rows); 0 below ``SHARED_PREFIX_MIN``. ``batch["prefix"]``, when set, is that of a
    whole batch this one is a process's share of (``common_prefix``): every share then
    splits its rows where one process would, and computes the same numbers."""
    ids, comp = batch["input_ids"], batch["completion_mask"]
    if not comp.any():
        return 0
    first_answer = int(comp.float().argmax(1)[comp.any(1)].min())
    if "prefix" in batch:
        n = batch["prefix"]
    elif ids.shape[0] < 2:
        return 0
    else:
        same = (ids[:, :first_answer] == ids[:1, :first_answer]).all(0)  # (first_answer,)
        n = int(same.float().cumprod(0).sum())
    n = min(n, first_answer - 1)
    return n if n >= SHARED_PREFIX_MIN else 0


def common_prefix(items: list) -> int | None:
    """The leading tokens the items' prompts share, at most the shortest prompt's length
    less one (``shared_prefix`` of their batch); None for items without a prompt."""
    prompts = [getattr(it, "prompt", None) for it in items]
    if not prompts or any(p is None for p in prompts):
        return None
    most = max(0, min(len(p) for p in prompts) - 1)
    return next((i for i in range(most) if any(p[i] != prompts[0][i] for p in prompts)), most)


# What one more forward pass costs on a CPU beside the tokens it computes (the ops of 30
# layers and their LoRA factors), in tokens: rows are grouped by length (answer_logits) only
# where the padding a group saves is worth more. Measured on SmolLM2-135M, 2 cores, AVX2
# kernels, float32: one forward and backward per row instead of per batch cost about 0.19 s
# a pass more, about 48 tokens' work (2026-12-07, Intel Xeon).
PASS_TOKENS = 48


def row_groups(lengths: list[int], overhead: int | None = None) -> list[list[int]]:
    """The rows (indices into ``lengths``) in groups of similar length that cost the fewest
    tokens computed, each group padded to its longest row, plus ``overhead`` per group
    (``PASS_TOKENS`` by default)."""
    overhead = PASS_TOKENS if overhead is None else overhead
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    size = [lengths[r] for r in order]
    best, cut = [0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):
            cost = best[i] + (j - i) * size[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def covering_rows(ids: torch.Tensor, lengths: list[int], comp: torch.Tensor) -> dict[int, int]:
    """{row: another row} for each row whose tokens, all but its last, begin another row
    that is computed (not itself covered): every position that predicts one of its tokens
    has the same context there, so the same hidden states, and the row need not run. Such
    rows: the rejected answer of an added closing (the chosen answer up to where the
    closing begins, then its end-of-turn), the chosen answer of a shortened one (the
    rejected answer's start, then its end-of-turn), and the one token left of a rejected
    answer after an added opening."""
    order = sorted(range(len(lengths)), key=lambda r: -lengths[r])
    run: list[int] = []
    host: dict[int, int] = {}
    for r in order:
        need = lengths[r] - 1
        c = next((c for c in run if lengths[c] >= need and torch.equal(ids[r, :need], ids[c, :need])), None)
        if c is None or not comp[r].any():
            run.append(r)
        else:
            host[r] = c
    return host


def answer_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits at the M positions that predict an answer token (``completion_mask``):
    (M, V) float32 logits, (M,) the sequence each belongs to, (M,) the tokens they predict.
    The backbone runs on the batch, the LM head only at those positions.

    Two savings, each the same numbers as one padded batch (``tests/test_dpo.py``):
    - a prefix all rows share (``shared_prefix``: the chat template's system prompt and
      the opening of the user's turn) runs once, and each row goes on from its keys and
      values (gradients flow back through them);
    - the rows run in groups of similar length (``row_groups``), each cut to its longest
      row: a batch of replayed answers of 18 and 96 tokens, short chosen answers beside
      long rejected ones (a shortened answer), a rejected answer cut after its last marked
      token (an added opening) are not all padded to the longest and computed;
    - a row whose context is another row's (``covering_rows``: the rejected answer of an
      added closing, all but its end-of-turn, is its chosen answer's start) does not run:
      its positions are read from that row's hidden states."""
    from transformers import DynamicCache

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(lm, lm.base_model_prefix)
    ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    prefix = shared_prefix(batch)
    kv = None
    if prefix:
        kv = backbone(input_ids=ids[:1, :prefix], attention_mask=attn[:1, :prefix], use_cache=True).past_key_values
        kv = [(layer.keys, layer.values) for layer in kv.layers]
    lengths = attn.sum(1).tolist()  # right-padded: a row's tokens are its first ``length``
    host = covering_rows(ids, lengths, comp)
    run = [r for r in range(ids.shape[0]) if r not in host]
    states: dict = {}
    for group in row_groups([lengths[r] - prefix for r in run]):
        group = [run[g] for g in group]
        width, at = max(lengths[r] for r in group), torch.tensor(group, device=ids.device)
        past = None
        if kv is not None:
            past = DynamicCache([(k.expand(len(group), -1, -1, -1), v.expand(len(group), -1, -1, -1)) for k, v in kv],
                                config=lm.config)
        hidden = backbone(input_ids=ids[at, prefix:width], attention_mask=attn[at, :width], past_key_values=past,
                          use_cache=past is not None).last_hidden_state  # (rows, width - prefix, H)
        # Position t predicts token t+1; the hidden states start at position ``prefix``.
        states.update((r, hidden[j]) for j, r in enumerate(group))
    # A covered row reads its host's states: the same context up to its last token.
    picked = [states[host.get(r, r)][: max(n - 1 - prefix, 0)][comp[r, prefix + 1 : n].bool()] for r, n in enumerate(lengths)]
    mask = comp[:, 1:].bool()  # (N, T-1)
    rows = mask.nonzero()[:, 0]  # (M,) which sequence each scored position belongs to, in row order as picked
    logits = lm.get_output_embeddings()(torch.cat(picked)).float()  # (M, V)
    return logits, rows, ids[:, 1:][mask]


def sequence_logps(model, batch: dict[str, torch.Tensor], nll: bool = False):
    """Summed log-probabilities of the completion tokens and their count, each (N,); with
    ``nll`` also the NLL term's sums and counts, the unmasked sums, and the batch's mean
    unlikelihood ``-log(1 - p)`` of its ``unlike_ids`` (a scalar, 0 without any).

    Runs the backbone, then the LM head only at the M positions that predict an answer
    token: (M, V) logits instead of (N, T, V), as TRL's fused LM head does. With a 49k
    vocabulary the head is a fifth of the model's work per token, and about half the
    tokens of a pair are prompt. For plain causal LMs (no logit soft-capping or scaling).
    """
    logits, rows, targets = answer_logits(model, batch)
    mask = batch["completion_mask"][:, 1:].bool()
    lse = torch.logsumexp(logits, dim=1)  # (M,)
    token_logps = logits.gather(1, targets.unsqueeze(1)).squeeze(1) - lse
    n = batch["input_ids"].shape[0]
    counts = mask.sum(1).to(token_logps.dtype)
    whole = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    sums = whole
    if "dpo_mask" in batch:  # the log-ratios count only what tells the two answers apart
        w = batch["dpo_mask"][:, 1:][mask].to(token_logps.dtype)
        sums = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps * w)
    if not nll:
        return sums, counts
    # The NLL term's tokens (rows of nll_mask are the first sequences of the batch).
    marks = torch.zeros_like(batch["completion_mask"])
    marks[: batch["nll_mask"].shape[0]] = batch["nll_mask"]
    w = marks[:, 1:][mask].to(token_logps.dtype)  # (M,)
    nll_sums = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps * w)
    nll_counts = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, w)
    unlike = token_logps.new_zeros(())
    if "unlike_ids" in batch:
        # The ids sit at the token the position predicts, like the targets (shifted by one).
        ids = batch["unlike_ids"][:, 1:][mask]  # (M,), -1 where nothing is pushed down
        at = ids >= 0
        if at.any():
            lp = logits[at].gather(1, ids[at].unsqueeze(1)).squeeze(1) - lse[at]
            unlike = -torch.log1p(-lp.exp().clamp(max=1 - 1e-6)).mean()
    return sums, counts, nll_sums, nll_counts, whole, unlike


@dataclass
class StepStats:
    loss: float
    dpo_loss: float
    nll: float
    reward_accuracy: float
    reward_margin: float
    chosen_reward: float
    rejected_reward: float
    unlike: float = 0.0


def pair_loss(model, batch: dict, beta: float, nll_weight: float, autocast: bool,
              nll_tokens: str = "answer", unlike_weight: float = 0.0) -> tuple[torch.Tensor, StepStats]:
    """Forward the reference (adapter off, no grad) and the policy; DPO + NLL on chosen."""
    n = batch["input_ids"].shape[0] // 2
    ctx = autocast_on(model, autocast)
    if "ref_logps" in batch:  # computed once before training (with_reference)
        ref_logps = batch["ref_logps"]
    else:
        with torch.no_grad(), model.disable_adapter(), ctx:
            ref_logps, _ = sequence_logps(model, batch)
    with ctx:
        logps, counts, nll_sums, nll_counts, whole, unlike = sequence_logps(model, batch, nll=True)
    losses, cr, rr = dpo_loss(logps[:n], logps[n:], ref_logps[:n], ref_logps[n:], beta)
    # NLL per chosen token (TRL's "sft" term): long answers do not outweigh short ones. Its
    # tokens are the whole chosen answer, or with nll_tokens="edit" only what the edit
    # changed, or with "both" the sum of the two means (the edit stressed, in its context).
    per_edit = nll_sums[:n] / nll_counts[:n].clamp(min=1)
    if nll_tokens == "both":
        per_edit = per_edit + whole[:n] / counts[:n].clamp(min=1)
    nll = -per_edit.mean()
    loss = losses.mean() + nll_weight * nll + unlike_weight * unlike
    margin = cr - rr
    return loss, StepStats(
        loss=float(loss.detach()), dpo_loss=float(losses.detach().mean()), nll=float(nll.detach()),
        reward_accuracy=float((margin > 0).float().mean()), reward_margin=float(margin.mean()),
        chosen_reward=float(cr.mean()), rejected_reward=float(rr.mean()), unlike=float(unlike.detach()),
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
    replay=None,
    reference_cache: ReferenceCache | None = None,
) -> dict:
    """Train the model's active LoRA adapter on ``pairs``; return the run's metrics.

    Calls ``progress`` after every step with step, steps, epoch, loss, reward accuracy and
    margin, seconds; raises :class:`Cancelled` between steps once ``should_stop()`` is true.
    ``replay`` (``tuning.sft.Replay``) adds the replayed rows' KL to every step;
    ``reference_cache`` keeps the pairs' reference for the next job (``with_reference``).
    """
    torch.manual_seed(config.seed)
    extra = early_close_pairs(pairs) if config.early_close else []
    items = pair_items(tokenizer, pairs + extra, config)
    pad = pad_id(tokenizer)
    if config.reference == "once":
        items = with_reference(model, items, pad, config.dtype == "bfloat16", reference_cache)

    def step_loss(batch: dict) -> tuple[torch.Tensor, dict]:
        loss, stats = pair_loss(model, batch, config.beta, config.nll_weight, config.dtype == "bfloat16",
                                config.nll_tokens, config.unlike_kept_starts)
        return loss, vars(stats)

    history, _ = optimise(model, items, collate, pad, step_loss, config, progress, should_stop, replay=replay)
    return {**summarize(history), "early_close_pairs": len(extra)} if config.early_close else summarize(history)


def pair_items(tokenizer, pairs: list[dict], config: TrainConfig) -> list[TokenizedPair]:
    """The pairs tokenized as ``config`` trains them."""
    return [tokenize_pair(tokenizer, p, config.max_length, config.nll_tokens, config.dpo_tokens,
                          config.nll_kept_starts, config.unlike_kept_starts > 0, config.chosen_tail) for p in pairs]


def early_close_pairs(pairs: list[dict]) -> list[dict]:
    """For each pair whose chosen answer is its rejected answer (two or more sentences) with
    text added after it, a pair with the same chosen answer against that text added after
    the rejected answer's first sentence (``TrainConfig.early_close``): the user kept every
    sentence, so closing after the first is worse. Built in training only; the pairs the
    store keeps and the gate's held-out pairs are the users' own."""
    from .pairs import SENTENCE_END

    out = []
    for p in pairs:
        chosen, rejected = p["chosen"][-1]["content"].strip(), p["rejected"][-1]["content"].strip()
        added = chosen[len(rejected):].strip()
        if not rejected or not chosen.startswith(rejected) or not added:
            continue
        ends = [m.end() for m in SENTENCE_END.finditer(rejected + " ")]
        if len(ends) < 2:
            continue
        early = f"{rejected[: ends[0]]} {added}"
        out.append({**p, "id": f"{p.get('id', '')}:early-close",
                    "rejected": [*p["rejected"][:-1], {**p["rejected"][-1], "content": early}]})
    return out


def optimise(model, items: list, collate_fn, pad: int, step_loss, config: TrainConfig,
             progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
             kind_of: Callable[[object], str] | None = None,
             weigh: Callable[[list, list], float] | None = None,
             replay=None) -> tuple[list[dict], int]:
    """The optimisation loop every objective shares: AdamW with linear decay to zero, shuffled
    batches of ``config.batch_size`` for ``config.epochs`` ("auto": ``epochs_for`` the
    number of items), gradient clipping, a stop check between steps (:class:`Cancelled`)
    and a progress row after each. ``step_loss(batch)`` returns (loss, the step's figures,
    "loss" among them); ``collate_fn(items, pad)`` makes a batch. With ``kind_of`` (item ->
    kind), no batch mixes kinds: each kind is shuffled and cut into batches of its own, and
    the batches are shuffled together (a job with DPO pairs and KTO votes: each step is one
    loss, each example seen once per epoch).

    Under a launcher with several processes (``tuning.distributed``) each rank computes the
    loss of its share of every batch, scaled by ``weigh(share, batch)`` (its share of the
    items by default; SFT weighs by answer tokens), the gradients are summed across ranks,
    and every rank steps alike; the rows are the whole batch's figures, on every rank, and
    the leader's ``should_stop`` stops them all.

    ``replay`` (``tuning.sft.Replay``): each step also backpropagates ``replay.weight`` times
    the loss of the next ``replay.per_step`` replayed rows (a shuffled order, cycled), split
    across ranks by answer tokens like SFT rows, and its row gets ``replay_kl``. Returns
    (per-step rows, steps per epoch)."""
    from . import distributed

    world = distributed.start()
    rng = random.Random(config.seed)
    if kind_of is None:
        per_epoch = math.ceil(len(items) / config.batch_size)
    else:
        sizes = Counter(kind_of(it) for it in items)
        per_epoch = sum(math.ceil(n / config.batch_size) for n in sizes.values())
    epochs = epochs_for(config, len(items))
    steps = per_epoch * epochs
    params = [p for p in model.parameters() if p.requires_grad]
    distributed.same_start(params)
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    replay_order = list(range(len(replay.items))) if replay is not None else []
    random.Random(config.seed + 1).shuffle(replay_order)
    model.train()
    history: list[dict] = []
    start = time.monotonic()
    step = 0
    for epoch in range(epochs):
        batches = _batches(items, config.batch_size, rng, kind_of, config.by_length)
        for b, chosen in enumerate(batches):
            if distributed.agree(should_stop is not None and should_stop()):
                raise Cancelled(f"cancelled at step {step} of {steps}")
            opt.zero_grad(set_to_none=True)
            if world.several:
                mine = distributed.split(chosen, world)
                share = [items[i] for i in mine]
                weight = (weigh or _item_share)(share, [items[i] for i in chosen]) if mine else 0.0
                stats = None
                if mine:
                    batch = collate_fn(share, pad)
                    prefix = common_prefix([items[i] for i in chosen])  # the whole batch's (shared_prefix)
                    if prefix is not None:
                        batch["prefix"] = prefix
                    loss, stats = step_loss(to_device(batch, model))
                    (loss * weight).backward()
                if replay_order:
                    kl = _replay_backward(model, replay, replay_order, step, world)
                    stats = None if stats is None else {**stats, "replay_kl": kl}
                distributed.sum_gradients(params)
                stats = distributed.combine(weight, stats)
            else:
                loss, stats = step_loss(to_device(collate_fn([items[i] for i in chosen], pad), model))
                loss.backward()
                if replay_order:
                    stats = {**stats, "replay_kl": _replay_backward(model, replay, replay_order, step, world)}
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


def _replay_backward(model, replay, order: list[int], step: int, world) -> float | None:
    """Backpropagate ``replay.weight`` x the replayed rows' loss for ``step`` (this rank's
    share, weighed by answer tokens); that loss (this rank's share), or None without a share."""
    from . import distributed

    n = len(order)
    chosen = [order[(step * replay.per_step + j) % n] for j in range(min(replay.per_step, n))]
    mine = distributed.split(chosen, world) if world.several else chosen
    if not mine:
        return None
    share = [replay.items[i] for i in mine]
    weight = answer_token_share(share, [replay.items[i] for i in chosen])
    loss = replay.loss(model, share, common_prefix([replay.items[i] for i in chosen]) if world.several else None)
    (loss * replay.weight * weight).backward()
    return float(loss.detach())


def _item_share(share: list, batch: list) -> float:
    return len(share) / len(batch)


def answer_token_share(share: list, batch: list) -> float:
    """A rank's share of a batch of SFT rows by answer tokens: their loss is a mean over
    the batch's answer tokens (``weigh`` for ``optimise``; replayed rows alike)."""
    return sum(len(it.answer) for it in share) / max(1, sum(len(it.answer) for it in batch))


def _length(item) -> int:
    answers = [len(getattr(item, k)) for k in ("chosen", "rejected", "answer", "completion") if hasattr(item, k)]
    return len(getattr(item, "prompt", ())) + max(answers, default=0)


def _batches(items: list, size: int, rng: random.Random, kind_of=None, by_length: bool = False) -> list[list[int]]:
    """One epoch's batches of item indices, shuffled; of one kind each when ``kind_of`` is
    given. With ``by_length``, each run of 8 batches' worth of shuffled items (of one kind)
    is sorted by length before it is cut into batches (as transformers' group_by_length
    does), so a batch pads to a similar length, and the batches' order is shuffled again."""
    order = list(range(len(items)))
    rng.shuffle(order)
    groups: dict = {}
    for i in order:
        groups.setdefault(kind_of(items[i]) if kind_of is not None else None, []).append(i)
    batches = []
    for idx in groups.values():
        if by_length:
            chunk = size * 8
            idx = [i for c in range(0, len(idx), chunk)
                   for i in sorted(idx[c : c + chunk], key=lambda i: _length(items[i]), reverse=True)]
        batches += [idx[i : i + size] for i in range(0, len(idx), size)]
    if kind_of is not None or by_length:
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
        **({"replay_kl": mean("replay_kl")} if all(r.get("replay_kl") is not None for r in last) else {}),
        "seconds": history[-1]["seconds"],
        "seconds_per_step": round(history[-1]["seconds"] / len(history), 3),
    }
