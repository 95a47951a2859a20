"""KTO: lone thumbs up and down teach too, in the same optimisation loop as DPO and SFT.

A vote is TRL's unpaired record: ``{"prompt": [messages], "completion": [assistant
message], "label": True (up) | False (down), ...}`` (``tuning.pairs.Unpaired``). The loss
is TRL 1.16's ``KTOTrainer`` with ``loss_type="kto"`` (Ethayarajh et al. 2024, eq. 7):

    r       = log pi(y|x) - log pi_ref(y|x)                         (summed over answer tokens)
    z0      = clamp(mean over the batch of log pi(y'|x) - log pi_ref(y'|x), min=0), no gradient
              where y' is another example's answer (completions rotated by one in the batch)
    loss(up)   = desirable_weight   * (1 - sigmoid(beta * (r - z0)))
    loss(down) = undesirable_weight * (1 - sigmoid(beta * (z0 - r)))

averaged over the batch; the reference is the model with its LoRA adapter switched off.
An optional NLL term on the up-voted answers (``kto_nll_weight``) plays the part the NLL
term on chosen plays for DPO. A job with both pairs and lone votes (``objective`` "auto")
takes DPO steps on batches of pairs and KTO steps on batches of votes, shuffled together
(``tuning.dpo.optimise`` with ``kind_of``): each example counts once per epoch, so the
epoch's loss is the sum of the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import TrainConfig
from .dpo import (TokenizedPair, autocast_on, collate, optimise, pad_id, pair_items, pair_loss, sequence_logps,
                  with_reference)
from .sft import TokenizedExample, collate_examples, tokenize_example

# -- which objective ----------------------------------------------------------------------


def choose_objective(setting: str, pairs: list, votes: list) -> str:
    """The objective a feedback job trains, from ``TrainConfig.objective`` and its training
    data: "dpo" (pairs only), "kto" (votes only, or everything as votes) or "dpo+kto"."""
    if setting in ("dpo", "kto"):
        return setting
    if pairs and votes:
        return "dpo+kto"
    return "kto" if votes else "dpo"


def pairs_as_votes(pairs: list[dict]) -> list[dict]:
    """Each pair as two votes, its chosen answer up and its rejected answer down (TRL's
    conversion of paired data to unpaired); ids keep the pair's id with a +/- suffix."""
    out = []
    for p in pairs:
        for side, label in (("chosen", True), ("rejected", False)):
            out.append({**{k: v for k, v in p.items() if k not in ("chosen", "rejected")},
                        "id": f"{p.get('id')}{'+' if label else '-'}", "completion": p[side], "label": label})
    return out


def objective_data(objective: str, pairs: list, eval_pairs: list, votes: list, eval_votes: list) -> tuple:
    """(pairs, eval_pairs, votes, eval_votes) as ``objective`` trains and gates on them: DPO
    leaves lone votes out, KTO on everything turns each pair into two votes."""
    if objective == "dpo":
        return list(pairs), list(eval_pairs), [], []
    if objective == "kto":
        return [], [], list(votes) + pairs_as_votes(pairs), list(eval_votes) + pairs_as_votes(eval_pairs)
    return list(pairs), list(eval_pairs), list(votes), list(eval_votes)


def data_problem(objective: str, pairs: list, eval_pairs: list, votes: list, eval_votes: list) -> str | None:
    """Why a job with this objective and data cannot train and be gated, or None."""
    if objective == "dpo":
        if not pairs:
            return "there are no training pairs"
        if not eval_pairs:
            return "there are no held-out pairs for the evaluation gate"
    elif objective == "kto":
        if not votes:
            return "there are no training votes (nor pairs) for KTO"
        if not eval_votes:
            return "there are no held-out votes for the evaluation gate"
    elif not (eval_pairs or eval_votes):
        return "there are no held-out pairs or votes for the evaluation gate"
    return None


def vote_counts(votes: list[dict]) -> dict:
    return {"up": sum(bool(v["label"]) for v in votes), "down": sum(not v["label"] for v in votes)}


# -- the loss -----------------------------------------------------------------------------


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    labels: torch.Tensor,
    policy_kl: torch.Tensor,
    reference_kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO loss per example, as TRL's KTOTrainer computes it.

    ``policy``, ``reference``: (B,) summed log-probabilities of each example's answer;
    ``labels``: (B,) bool, True = desirable; ``policy_kl``, ``reference_kl``: (B,) the same
    for the mismatched prompt/answer sequences. Returns (losses (B,), rewards (B,) = beta *
    (policy - reference), detached, the reference point z0: a detached scalar >= 0).
    """
    kl = (policy_kl - reference_kl).mean().detach().clamp(min=0)
    logratios = policy - reference
    up = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    down = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(labels, up, down), beta * logratios.detach(), kl


# -- tokens -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedVote:
    prompt: list[int]
    answer: list[int]
    label: bool
    # Per answer token, 1 where the NLL term stresses it (``kto_nll_tokens="both"``: what
    # up-voted answers add, ``added_tokens``); None: no stress.
    stress: tuple[int, ...] | None = None


def tokenize_vote(tokenizer, vote: dict, max_length: int, added: dict | None = None) -> TokenizedVote:
    """The prompt as the server sent it and the voted answer's tokens (``tokenize_example``);
    with ``added`` (token pairs up-voted answers add, ``tuning.gate.preference_markers``),
    an up-voted answer's tokens that spell them are marked to stress (``added_tokens``)."""
    ex = tokenize_example(tokenizer, {"messages": list(vote["prompt"]) + list(vote["completion"])}, max_length)
    stress = added_tokens(tokenizer, ex.answer, added) if added and vote["label"] else None
    return TokenizedVote(ex.prompt, ex.answer, bool(vote["label"]), stress)


def vote_markers(votes: list[dict]) -> dict:
    """The token pairs that up-voted answers add: those much commoner in them than in the
    down-voted ones (``tuning.gate.preference_markers``, positive side), as the gate's
    behaviour check reads them. Empty with one label only."""
    from .gate import _text, preference_markers

    judged = [(_text(v["completion"]), bool(v["label"])) for v in votes]
    return {b: w for b, w in preference_markers(judged).items() if w > 0}


def added_tokens(tokenizer, answer: list[int], added: dict) -> tuple[int, ...] | None:
    """Per answer token, 1 where it spells one of the ``added`` token pairs (and the token
    after, as ``tuning.dpo.edited_tokens`` marks the one after an edit): the vote's
    counterpart of a pair's edited tokens, found in the text since a vote has no partner
    answer to compare with. None when the answer holds none."""
    from .gate import MARKER_TOKEN

    text, ends = "", []
    for j in range(len(answer)):  # where each model token ends in the decoded answer
        text = tokenizer.decode(answer[: j + 1], skip_special_tokens=True)
        ends.append(len(text))
    words = [(m.group().lower(), m.start(), m.end()) for m in MARKER_TOKEN.finditer(text)]
    spans = [(a[1], b[2]) for a, b in zip(words, words[1:]) if (a[0], b[0]) in added]
    if not spans:
        return None
    marks, start = [0] * len(answer), 0
    for j, end in enumerate(ends):
        if any(start < hi and end > lo for lo, hi in spans):
            marks[j] = 1
            if j + 1 < len(marks):
                marks[j + 1] = 1
        start = end
    return tuple(marks)


def collate_votes(items: list[TokenizedVote], pad_id: int, max_length: int = 10**9) -> dict[str, torch.Tensor]:
    """The B votes, then B mismatched sequences (prompt i with answer i-1, TRL's rotation),
    in one right-padded batch of 2B rows: input_ids, attention_mask, completion_mask (2B, T),
    and labels (B,). With one vote the mismatched sequence is the vote itself, as in TRL."""
    rotated = items[-1:] + items[:-1]
    kl = [TokenizedExample(it.prompt, other.answer[: max(1, max_length - len(it.prompt))])
          for it, other in zip(items, rotated)]
    batch = collate_examples([TokenizedExample(it.prompt, it.answer) for it in items] + kl, pad_id)
    batch["labels"] = torch.tensor([it.label for it in items], dtype=torch.bool)
    if any(it.stress for it in items):  # the NLL term's stressed tokens, as a pair's nll_mask
        nll_mask = torch.zeros((len(items), batch["input_ids"].shape[1]), dtype=torch.long)
        for i, it in enumerate(items):
            if it.stress:
                nll_mask[i, len(it.prompt) : len(it.prompt) + len(it.stress)] = torch.tensor(it.stress)
        batch["nll_mask"] = nll_mask
    return batch


def _rows(batch: dict, start: int, stop: int, keys=("input_ids", "attention_mask", "completion_mask")) -> dict:
    rows = {k: batch[k][start:stop] for k in keys}
    if "prefix" in batch:  # the whole batch's shared prefix (tuning.dpo.shared_prefix)
        rows["prefix"] = batch["prefix"]
    return rows


@dataclass
class VoteStats:
    loss: float
    kto_loss: float
    nll: float
    kl: float
    desirable_reward: float | None
    undesirable_reward: float | None
    reward_margin: float | None  # mean desirable minus mean undesirable reward (TRL's rewards/margins)


def vote_loss(model, batch: dict, config: TrainConfig, autocast: bool,
              nll_scale: float = 1.0) -> tuple[torch.Tensor, VoteStats]:
    """Forward the reference (adapter off) on votes and mismatched sequences, the policy on
    the mismatched ones without gradient (TRL's KL estimate), then the policy on the votes.
    ``nll_scale`` multiplies the NLL term (a rank's share of a batch, ``train_kto``)."""
    labels = batch["labels"]
    n = labels.shape[0]
    ctx = autocast_on(model, autocast)
    with torch.no_grad(), model.disable_adapter(), ctx:
        ref, _ = sequence_logps(model, _rows(batch, 0, 2 * n))
    with torch.no_grad(), ctx:
        policy_kl, _ = sequence_logps(model, _rows(batch, n, 2 * n))
    with ctx:
        if "nll_mask" in batch:
            logps, counts, stress_sums, stress_counts, _, _ = sequence_logps(
                model, _rows(batch, 0, n, ("input_ids", "attention_mask", "completion_mask", "nll_mask")), nll=True)
        else:
            logps, counts = sequence_logps(model, _rows(batch, 0, n))
    losses, rewards, kl = kto_loss(logps, ref[:n], labels, policy_kl, ref[n:], config.kto_beta,
                                   config.desirable_weight, config.undesirable_weight)
    kto = losses.mean()
    if labels.any():  # NLL per token on the up-voted answers, as DPO's on chosen
        per_token = logps / counts.clamp(min=1)
        if "nll_mask" in batch:  # plus the mean over what up-votes add (0 for an answer without it)
            per_token = per_token + stress_sums / stress_counts.clamp(min=1)
        nll = -per_token[labels].mean()
    else:
        nll = torch.zeros((), dtype=logps.dtype, device=logps.device)
    loss = kto + config.kto_nll_weight * nll_scale * nll
    up = float(rewards[labels].mean()) if labels.any() else None
    down = float(rewards[~labels].mean()) if (~labels).any() else None
    return loss, VoteStats(
        loss=float(loss.detach()), kto_loss=float(kto.detach()), nll=float(nll.detach()), kl=float(kl),
        desirable_reward=up, undesirable_reward=down,
        reward_margin=None if up is None or down is None else up - down,
    )


# -- the loop -----------------------------------------------------------------------------


def train_kto(
    model,
    tokenizer,
    pairs: list[dict],
    votes: list[dict],
    config: TrainConfig,
    progress: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    replay=None,
    reference_cache=None,
) -> dict:
    """Train the model's active LoRA adapter by KTO on ``votes`` and, when ``pairs`` are
    given, by DPO on them in the same run (steps of one kind each); the run's metrics.

    ``progress`` gets a row after every step, with ``objective`` "kto" or "dpo" and that
    loss's figures; raises ``tuning.dpo.Cancelled`` between steps once ``should_stop()``."""
    torch.manual_seed(config.seed)
    items: list = pair_items(tokenizer, pairs, config)
    pad = pad_id(tokenizer)
    autocast = config.dtype == "bfloat16"
    if items and config.reference == "once":
        items = with_reference(model, items, pad, autocast, reference_cache)
    added = vote_markers(votes) if config.kto_nll_tokens == "both" else {}
    items += [tokenize_vote(tokenizer, v, config.max_length, added) for v in votes]

    def kind(item) -> str:
        return "dpo" if isinstance(item, TokenizedPair) else "kto"

    def collate_any(chunk: list, pad_id: int) -> dict:
        if kind(chunk[0]) == "dpo":
            return {**collate(chunk, pad_id), "objective": "dpo"}
        return {**collate_votes(chunk, pad_id, config.max_length), "objective": "kto"}

    def step_loss(batch: dict) -> tuple[torch.Tensor, dict]:
        if batch.pop("objective") == "dpo":
            loss, stats = pair_loss(model, batch, config.beta, config.nll_weight, autocast, config.nll_tokens,
                                    config.unlike_kept_starts)
        else:
            loss, stats = vote_loss(model, batch, config, autocast, share["nll_scale"])
        return loss, {"objective": "kto" if isinstance(stats, VoteStats) else "dpo", **vars(stats)}

    # With several processes (tuning.distributed) a rank's loss is scaled by its share of the
    # batch's votes, but the NLL term is a mean over the batch's up-votes: scaled by their
    # share instead, the ranks' gradients add up to one process's. (z0 is still each share's.)
    share = {"nll_scale": 1.0}

    def weigh(mine: list, whole: list) -> float:
        weight = len(mine) / len(whole)
        ups = sum(bool(getattr(it, "label", False)) for it in whole)
        mine_up = sum(bool(getattr(it, "label", False)) for it in mine)
        share["nll_scale"] = (mine_up / ups) / weight if mine_up else 1.0
        return weight

    history, per_epoch = optimise(model, items, collate_any, pad, step_loss, config, progress, should_stop,
                                  kind_of=kind, weigh=weigh, replay=replay)
    return summarize_mixed(history, per_epoch)


def summarize_mixed(history: list[dict], per_epoch: int) -> dict:
    """Run metrics from per-step rows of one or both kinds: first-step loss, the last
    epoch's mean of each figure over the steps that have it, totals."""
    if not history:
        return {"steps": 0}
    last = history[-per_epoch:]

    def mean(key: str, rows: list[dict]) -> float | None:
        xs = [r[key] for r in rows if r.get(key) is not None]
        return round(sum(xs) / len(xs), 5) if xs else None

    out = {"steps": len(history), "first_loss": round(history[0]["loss"], 5), "loss": mean("loss", last),
           "kto_steps": sum(r["objective"] == "kto" for r in history),
           "dpo_steps": sum(r["objective"] == "dpo" for r in history)}
    kto_rows = [r for r in last if r["objective"] == "kto"]
    if kto_rows:
        first = next(r for r in history if r["objective"] == "kto")
        out.update({"first_kto_loss": round(first["kto_loss"], 5), "kto_loss": mean("kto_loss", kto_rows),
                    "kto_nll": mean("nll", kto_rows), "kl": mean("kl", kto_rows),
                    "desirable_reward": mean("desirable_reward", kto_rows),
                    "undesirable_reward": mean("undesirable_reward", kto_rows),
                    "vote_reward_margin": mean("reward_margin", kto_rows)})
    dpo_rows = [r for r in last if r["objective"] == "dpo"]
    if dpo_rows:
        first = next(r for r in history if r["objective"] == "dpo")
        out.update({"first_dpo_loss": round(first["dpo_loss"], 5), "dpo_loss": mean("dpo_loss", dpo_rows),
                    "nll": mean("nll", dpo_rows), "reward_accuracy": mean("reward_accuracy", dpo_rows),
                    "reward_margin": mean("reward_margin", dpo_rows)})
    if all(r.get("replay_kl") is not None for r in last):
        out["replay_kl"] = mean("replay_kl", last)
    out["seconds"] = history[-1]["seconds"]
    out["seconds_per_step"] = round(history[-1]["seconds"] / len(history), 3)
    return out
