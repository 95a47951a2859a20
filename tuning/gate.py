"""The evaluation gate: a new version must beat the live one on data it was not trained on.

``measure`` measures one version on the held-out pairs and golden prompts (the trainer's
``_evaluate`` runs it for the candidate and the live version on the same data);
``decide`` (pure, unit-tested on made-up numbers) turns the two sets of metrics into a
verdict with one line per check:

- preference accuracy: the share of held-out pairs whose implicit DPO reward margin (below)
  is positive, TRL's held-out ``rewards/accuracies``; it must beat the live version's. The
  base model scores 0 by construction (its margins are 0). The plain likelihood accuracies
  (chosen more likely than rejected, summed and per token) are stored beside it but not
  gated on: summed log-probabilities favour the shorter answer whatever the model learned
  (the base scored 1.0 on "one-sentence answers" pairs);
- reward margin: the mean implicit DPO reward margin ``beta * ((log pi(c) - log pi(r)) -
  (log pi_base(c) - log pi_base(r)))`` must beat the live version's, and the per-pair
  improvement must not be luck (a one-sided sign test over pairs, p <= max_p_value);
- golden prompts: every golden question the live version answers right (the answer is
  checked for an expected word) the candidate must answer right too;
- answer length: the mean generated length may not drift more than max_length_drift from
  the live version's (DPO is known to make answers longer).

An admin may promote a version that failed; the Controller (``loop.control``) records who and why.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .dpo import collate, sequence_logps, tokenize_pair
from .generation import greedy_answers


@dataclass(frozen=True)
class Golden:
    prompt: str
    # Any of these (case-insensitive) in the answer counts as right.
    expect: tuple[str, ...]


# Questions the base SmolLM2-135M-Instruct answers right greedily, in padded batches as the
# gate asks them (checked in tests/integration/test_dpo_embedded.py): facts and simple
# instructions. "How many hours are in a day?" was dropped: right alone, wrong when batched.
# A version that loses one of them has lost something users had.
GOLDEN = (
    Golden("What is the capital of France?", ("Paris",)),
    Golden("What is the capital of Japan?", ("Tokyo",)),
    Golden("What is the capital of Germany?", ("Berlin",)),
    Golden("What is 2 + 2?", ("4", "four")),
    Golden("How many days are in a week?", ("7", "seven")),
    Golden("What is the boiling point of water in Celsius?", ("100",)),
    Golden("What is the chemical symbol for water?", ("H2O",)),
    Golden("What is the opposite of hot?", ("cold",)),
    Golden("What language is spoken in Spain?", ("Spanish",)),
)


@dataclass(frozen=True)
class GateConfig:
    # "Beat" means strictly better; raise this to demand a clear gain. A live version
    # already at 1.0 can only be matched, and matching it then counts.
    min_accuracy_gain: float = 0.0
    # Sign test over held-out pairs: at 32 pairs, p <= 0.05 needs 22 or more improved
    # pairs. A version trained on noise improves about half of them by chance.
    max_p_value: float = 0.05
    # DPO's known verbosity shows as answers 1.5-2x longer; a +-50% band catches that and
    # leaves room for preferences that legitimately change length a little.
    max_length_drift: float = 0.5
    golden: tuple[Golden, ...] = GOLDEN
    # Long enough for a complete short answer (the goldens need ~10-20 tokens); longer
    # answers cost generation time for every version evaluated.
    max_new_tokens: int = 64
    # Held-out prompts answered for the length check (generation is the gate's slow part).
    max_length_prompts: int = 32
    batch_size: int = 8

    def to_dict(self) -> dict:
        """Every field, as recorded with each job and version (golden: ``{prompt, expect}``)."""
        return dataclasses.asdict(self)


@dataclass
class GateResult:
    passed: bool
    checks: list[dict] = field(default_factory=list)  # {"check", "passed", "detail"}

    def summary(self) -> str:
        return "; ".join(f"{c['check']}: {'ok' if c['passed'] else 'FAILED'} ({c['detail']})" for c in self.checks)


# -- measuring --------------------------------------------------------------------------


def pair_logratios(model, tokenizer, pairs: list[dict], *, adapter_off: bool, batch_size: int = 8,
                   max_length: int = 512) -> tuple[list[float], list[float]]:
    """Per pair: log pi(chosen) - log pi(rejected) summed over answer tokens, and the same
    difference of per-token means.

    Runs in the model's own dtype: the trainer casts it to the machine's serving format.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    items = [tokenize_pair(tokenizer, p, max_length) for p in pairs]
    summed: list[float] = []
    per_token: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            batch = collate(chunk, pad)
            with torch.inference_mode():
                if adapter_off:
                    with model.disable_adapter():
                        logps, counts = sequence_logps(model, batch)
                else:
                    logps, counts = sequence_logps(model, batch)
            n = len(chunk)
            means = logps / counts.clamp(min=1)
            summed += (logps[:n] - logps[n:]).tolist()
            per_token += (means[:n] - means[n:]).tolist()
    finally:
        model.train(was_training)
    return summed, per_token


def golden_passes(answer: str, golden: Golden) -> bool:
    low = answer.lower()
    return any(e.lower() in low for e in golden.expect)


def measure(model, tokenizer, eval_pairs: list[dict], base_logratios: list[float], *,
            adapter_off: bool, beta: float, config: GateConfig, max_length: int = 512) -> dict:
    """One version's gate metrics; the active adapter is the version (or none: the base)."""
    lr, per_token = pair_logratios(model, tokenizer, eval_pairs, adapter_off=adapter_off,
                                   batch_size=config.batch_size, max_length=max_length)
    margins = [beta * (a - b) for a, b in zip(lr, base_logratios)]
    prompts: list[list[dict]] = []
    for p in eval_pairs:
        if p["prompt"] not in prompts and len(prompts) < config.max_length_prompts:
            prompts.append(p["prompt"])
    golden_convs = [[{"role": "user", "content": g.prompt}] for g in config.golden]
    answers = greedy_answers(model, tokenizer, golden_convs + prompts, max_new_tokens=config.max_new_tokens,
                             batch_size=config.batch_size * 2, adapter_off=adapter_off)
    golden = {g.prompt: {"answer": a, "passed": golden_passes(a, g)} for g, (a, _) in zip(config.golden, answers)}
    held = answers[len(golden_convs):]
    n = len(lr)
    return {
        "pairs": n,
        "preference_accuracy": round(sum(m > 0 for m in margins) / n, 4) if n else None,
        "reward_margin": round(sum(margins) / n, 4) if n else None,
        "likelihood_accuracy": round(sum(x > 0 for x in lr) / n, 4) if n else None,
        "likelihood_accuracy_per_token": round(sum(x > 0 for x in per_token) / n, 4) if n else None,
        "logratios": [round(x, 4) for x in lr],
        "golden": golden,
        "golden_passed": sum(g["passed"] for g in golden.values()),
        "golden_total": len(golden),
        "mean_answer_tokens": round(sum(t for _, t in held) / len(held), 2) if held else None,
        "answers": [{"prompt": c[-1]["content"], "answer": a} for c, (a, _) in zip(prompts, held)],
    }


# -- deciding ---------------------------------------------------------------------------


def sign_test_p(wins: int, n: int) -> float:
    """One-sided P(at least ``wins`` of ``n`` fair coin flips come up heads): the sign test."""
    from scipy.stats import binomtest

    if n == 0:  # no pairs: no evidence (binomtest needs at least one trial)
        return 1.0
    return float(binomtest(wins, n, 0.5, alternative="greater").pvalue)


def decide(candidate: dict, live: dict, config: GateConfig = GateConfig()) -> GateResult:
    """The verdict on ``candidate`` against ``live``; both are ``measure`` results on the same data."""
    checks = []

    def check(name: str, ok: bool, detail: str, **shown) -> None:
        # shown: value, live, threshold, for the console's verdict card (missing when not measured)
        checks.append({"check": name, "passed": bool(ok), "detail": detail, **shown})

    ca, la = candidate["preference_accuracy"], live["preference_accuracy"]
    if ca is None or la is None:
        check("preference accuracy", False, "no held-out pairs to measure on")
    else:
        ok = ca > la + config.min_accuracy_gain or (la >= 1.0 and ca >= 1.0)
        check("preference accuracy", ok, f"{ca:.3f} vs live {la:.3f}", value=ca, live=la,
              threshold=f"above {la + config.min_accuracy_gain:.3f}" + (" (or both 1.0)" if la >= 1.0 else ""))

    cm, lm = candidate["reward_margin"], live["reward_margin"]
    c_lr, l_lr = candidate.get("logratios") or [], live.get("logratios") or []
    wins = sum(c > l for c, l in zip(c_lr, l_lr))
    p = sign_test_p(wins, len(c_lr))
    if cm is None or lm is None:
        check("reward margin", False, "no held-out pairs to measure on")
    else:
        ok = cm > lm and p <= config.max_p_value
        check("reward margin", ok, f"{cm:.3f} vs live {lm:.3f}; better on {wins}/{len(c_lr)} pairs (p={p:.3g})",
              value=cm, live=lm, threshold=f"above {lm:.3f}, better on enough pairs to rule out luck (sign test p <= {config.max_p_value})")

    lost = [q for q, g in live["golden"].items() if g["passed"] and not candidate["golden"].get(q, {}).get("passed")]
    check("golden prompts", not lost,
          f"{candidate['golden_passed']}/{candidate['golden_total']} vs live {live['golden_passed']}/{live['golden_total']}"
          + (f"; now wrong: {', '.join(lost)}" if lost else ""),
          value=f"{candidate['golden_passed']}/{candidate['golden_total']}",
          live=f"{live['golden_passed']}/{live['golden_total']}",
          threshold="every golden prompt the live version answers right")

    cl, ll = candidate["mean_answer_tokens"], live["mean_answer_tokens"]
    if not cl or not ll:
        check("answer length", False, "no answers to measure")
    else:
        drift = cl / ll - 1
        check("answer length", abs(drift) <= config.max_length_drift,
              f"{cl:.1f} vs live {ll:.1f} tokens ({drift:+.0%}, limit +-{config.max_length_drift:.0%})",
              value=cl, live=ll, threshold=f"{ll * (1 - config.max_length_drift):.1f}-{ll * (1 + config.max_length_drift):.1f} tokens "
              f"(+-{config.max_length_drift:.0%} of live)")
    return GateResult(all(c["passed"] for c in checks), checks)
