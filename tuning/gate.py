"""The evaluation gate: a new version must beat the live one on data it was not trained on,
and must not lose what users had.

``measure`` measures one version on the held-out pairs and the regression set (the
trainer's ``_evaluate`` runs it for the candidate and the live version on the same data,
answers generated greedily and unpadded, as the server answers: ``tuning.generation``);
``decide`` (pure, unit-tested on made-up numbers) turns the two sets of metrics into a
verdict with one line per check:

- preference accuracy: the share of held-out pairs whose implicit DPO reward margin (below)
  is positive, TRL's held-out ``rewards/accuracies``; it must beat the live version's. The
  base model scores 0 by construction (its margins are 0). The plain likelihood accuracies
  are stored beside it but not gated on: summed log-probabilities favour the shorter answer
  whatever the model learned (the base scored 1.0 on "one-sentence answers" pairs);
- reward margin: the mean implicit DPO reward margin ``beta * ((log pi(c) - log pi(r)) -
  (log pi_base(c) - log pi_base(r)))`` must beat the live version's, and the per-pair
  improvement must not be luck (a one-sided sign test over pairs, p <= max_p_value);
- behaviour: log-probabilities can improve while nothing users read changes (seen here:
  held-out accuracy 1.00 and 0 of 32 answers with the taught phrase). So the candidate's
  greedy answers to the held-out prompts must have moved toward what the chosen answers
  have and the rejected ones lack (``behaviour``): the token pairs that tell the two groups
  apart (an opening every edit adds, the sentence breaks of answers users cut, a list's
  line breaks) score each answer from -1 to +1, and the candidate's must score above the
  live version's, on more prompts than luck would give. (Two measures came before it and
  both passed versions that learned nothing: word distance to each chosen answer, and
  the word pairs of each pair's own two answers, which any rewording moved "away from the
  rejected answer".)
- regression set: ``REGRESSION`` (facts and instructions the base answers right; see its
  comment) checked for expected words; the candidate may not be worse than the live
  version by more than ``regression_tolerance`` of the set at 95% confidence (a one-sided
  non-inferiority test on the paired answers, ``noninferior``), so one flaky answer does
  not refuse a good version and a real regression does;
- fluency: every answer the gate generated is checked for damage users notice
  (``damage``: repeated words, another language, a stock apology); the candidate may not
  damage more answers than the live version, by the same non-inferiority test;
- answer length: the mean generated length may not drift more than max_length_drift from
  the live version's, unless it moved toward the length of the chosen answers (a
  preference for shorter answers legitimately halves them; DPO's verbosity does not);
- users agree: a check of the job's pairs rather than of the version (``users_agree``):
  refused when some users cut answers and others lengthen them, each with a quarter of the
  pairs, since one version cannot follow both.

A version trained on lone votes alone (KTO, ``tuning.kto``) has no held-out pairs: it is
judged on held-out votes instead (``measure_kto``, ``decide_kto``: vote accuracy, vote
margin, behaviour) and by the same regression-set, fluency and length checks; see the
section "KTO versions" below. SFT versions: ``measure_sft``, ``decide_sft``.

An admin may promote a version that failed; the Controller (``loop.control``) records who and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
import statistics
import time
from dataclasses import dataclass, field

import torch

from assistant.engine import Sampling

from .dpo import ReferenceCache, pad_id, sequence_logps, tokenize_pair
from .generation import AnswerCache, greedy_answers


@dataclass(frozen=True)
class Golden:
    prompt: str
    # Any of these (case-insensitive, as whole words) in the answer counts as right.
    expect: tuple[str, ...]
    kind: str = "fact"  # "fact", "instruction" or "refusal"


# The regression set: questions the base SmolLM2-135M-Instruct answers right greedily in
# float32 and in bfloat16, with and without the served frequency penalty (63 kept of 152
# candidates; at penalty 0.5 "How many hours are in a day?" lost its "24" and "the closest
# star" became Proxima Centauri, so those two went; tests/integration/test_dpo_embedded.py
# checks the base still gets every one), facts and instructions, and that it still answers
# right after changes that teach nothing: 8 random rank-16 updates of every projection,
# each changing as many of these answers' wording as a trained adapter does (41.5 of 63
# against 42; bench/regression_stability.py). 11 of the 63 flipped in at least one copy
# ("What is the capital of France?" in 3 of 8, "Which planet is known as the Red Planet?"
# in 3): FRAGILE below. The preference suite's versions, taught good feedback and bad
# alike, had lost mostly these (bananas in 7 of 9 versions, the greeting and the Red Planet
# in 5), so they measured luck more than harm. 52 remain. A version that loses them has
# lost something users had. No refusals: the base model refused none of 14 harmful
# requests tried, so there is nothing of that kind to keep yet; a larger model's set
# should add them (kind "refusal").
REGRESSION = (
    Golden('What is the capital of Japan?', ('Tokyo',), 'fact'),
    Golden('What is the capital of Germany?', ('Berlin',), 'fact'),
    Golden('What is the capital of the United Kingdom?', ('London',), 'fact'),
    Golden('What is the capital of Russia?', ('Moscow',), 'fact'),
    Golden('What is the capital of China?', ('Beijing',), 'fact'),
    Golden('What is the capital of Egypt?', ('Cairo',), 'fact'),
    Golden('What is the capital of Canada?', ('Ottawa',), 'fact'),
    Golden('What is the capital of Greece?', ('Athens',), 'fact'),
    Golden('What is the capital of Ireland?', ('Dublin',), 'fact'),
    Golden('What is the capital of Austria?', ('Vienna',), 'fact'),
    Golden('What is the capital of Norway?', ('Oslo',), 'fact'),
    Golden('How many days are in a week?', ('7', 'seven'), 'fact'),
    Golden('What is the boiling point of water in Celsius?', ('100',), 'fact'),
    Golden('What is the chemical symbol for water?', ('H2O',), 'fact'),
    Golden('What is the chemical symbol for gold?', ('Au',), 'fact'),
    Golden('What is the largest ocean on Earth?', ('Pacific',), 'fact'),
    Golden('What is the opposite of hot?', ('cold',), 'fact'),
    Golden('What is the opposite of up?', ('down',), 'fact'),
    Golden('What is the opposite of day?', ('night',), 'fact'),
    Golden('What language is spoken in Spain?', ('Spanish',), 'fact'),
    Golden('What language is spoken in Germany?', ('German',), 'fact'),
    Golden('Who wrote Romeo and Juliet?', ('Shakespeare',), 'fact'),
    Golden('What color is the sky on a clear day?', ('blue',), 'fact'),
    Golden('What is the largest mammal?', ('whale',), 'fact'),
    Golden('What organ pumps blood through the body?', ('heart',), 'fact'),
    Golden('What is the main language spoken in Brazil?', ('Portuguese',), 'fact'),
    Golden('What currency is used in Japan?', ('yen',), 'fact'),
    Golden('How many sides does a triangle have?', ('3', 'three'), 'fact'),
    Golden('In which continent is Kenya?', ('Africa',), 'fact'),
    Golden('What is the longest river in Africa?', ('Nile',), 'fact'),
    Golden('What is the chemical symbol for sodium?', ('Na',), 'fact'),
    Golden('What is the chemical symbol for iron?', ('Fe',), 'fact'),
    Golden('What is the opposite of big?', ('small', 'little'), 'fact'),
    Golden('What is the opposite of fast?', ('slow',), 'fact'),
    Golden('What is the opposite of light?', ('dark', 'darkness', 'heavy'), 'fact'),
    Golden('What is the opposite of open?', ('close', 'closed', 'shut'), 'fact'),
    Golden('What is the opposite of young?', ('old',), 'fact'),
    Golden('What is the opposite of wet?', ('dry',), 'fact'),
    Golden('What language is spoken in Japan?', ('Japanese',), 'fact'),
    Golden('What language is spoken in China?', ('Chinese', 'Mandarin'), 'fact'),
    Golden('What language is spoken in Portugal?', ('Portuguese',), 'fact'),
    Golden('What language is spoken in Russia?', ('Russian',), 'fact'),
    Golden('Write the number twelve in digits.', ('12',), 'instruction'),
    Golden('Complete the sentence: The early bird catches the...', ('worm',), 'instruction'),
    Golden('List the three primary colors.', ('red',), 'instruction'),
    Golden("What is the plural of 'mouse'?", ('mice',), 'instruction'),
    Golden("Give me an antonym for 'happy'.", ('sad', 'unhappy'), 'instruction'),
    Golden('Convert 1 kilometer to meters.', ('1000', '1,000'), 'instruction'),
    Golden('Say hello in French.', ('bonjour',), 'instruction'),
    Golden('Say hello in Spanish.', ('hola',), 'instruction'),
    Golden('What is the capital of France? Answer in one word.', ('Paris',), 'instruction'),
    Golden('Summarize in one sentence: The cat sat on the mat all day.', ('cat',), 'instruction'),
)

# Right in the base but not in every perturbed copy (see above): flipped by changes
# that teach nothing, so they would refuse good versions for nothing. Kept for
# bench/regression_stability.py and for reading; not gated on.
FRAGILE = (
    Golden('What is the capital of France?', ('Paris',), 'fact'),
    Golden('What is 2 + 2?', ('4', 'four'), 'fact'),
    Golden('What gas do plants absorb from the air?', ('carbon dioxide', 'CO2'), 'fact'),
    Golden('Which planet is known as the Red Planet?', ('Mars',), 'fact'),
    Golden('What language is spoken in France?', ('French',), 'fact'),
    Golden('What color are bananas when they are ripe?', ('yellow',), 'fact'),
    Golden('How many sides does a square have?', ('4', 'four'), 'fact'),
    Golden('What language is spoken in Italy?', ('Italian',), 'fact'),
    Golden("Translate 'hello' into Spanish.", ('hola',), 'instruction'),
    Golden('Write a greeting in one short sentence.', ('hello', 'hi', 'welcome', 'good'), 'instruction'),
    Golden('Write a haiku about the sea.', ('sea', 'wave', 'ocean', 'shore', 'tide'), 'instruction'),
)
GOLDEN = REGRESSION  # the name older records and settings use


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
    golden: tuple[Golden, ...] = REGRESSION
    # Non-inferiority margins (shares of the answers checked): the candidate may be this
    # much worse than the live version at 95% confidence. On the 52 regression prompts with
    # nothing gained, 2 newly wrong answers pass and 3 refuse (at 0.08, 2 refused there).
    regression_tolerance: float = 0.09
    fluency_tolerance: float = 0.08
    # Long enough for a complete short answer (the goldens need ~10-20 tokens); longer
    # answers cost generation time for every version evaluated.
    max_new_tokens: int = 64
    # The held-out prompts are answered as far as their chosen (up-voted) answers reach,
    # at least max_new_tokens and at most this: the server's answer length
    # (assistant.engine.Sampling), so that what users asked for at the end of an answer (a
    # closing sentence after 90 tokens) is read, not cut off at max_new_tokens.
    max_answer_tokens: int = Sampling().max_new_tokens
    # The server's frequency penalty (assistant.engine.Sampling), so that the gate's greedy
    # answers are the ones users get at temperature 0.
    frequency_penalty: float = Sampling().frequency_penalty
    # Held-out prompts answered for the length check (generation is the gate's slow part).
    max_length_prompts: int = 32
    # Rows per teacher-forced forward (log-probabilities of pairs and votes: full logits).
    batch_size: int = 8
    # Prompts answered per batch. Decoding a small model on a CPU is bound by the time per
    # decode step, not by its arithmetic, so a wider batch answers more for that time:
    # the regression set's 52 answers (64 tokens, the embedded model with a LoRA adapter,
    # float32, 2 cores) took 51 s in batches of 8, 30 s of 16, 21 s of 32 and 16 s of 64,
    # the same answers each time (greedy in float32 does not depend on the batch:
    # tests/integration/test_generation_embedded.py).
    answer_batch_size: int = 64

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
                   max_length: int = 512, cache: ReferenceCache | None = None) -> tuple[list[float], list[float]]:
    """Per pair: log pi(chosen) - log pi(rejected) summed over answer tokens, and the same
    difference of per-token means.

    Runs in the model's own dtype: the trainer casts it to the machine's serving format.
    Scores the answers in batches of ``2 * batch_size`` sequences of similar length
    (``tuning.dpo.token_logps``). ``cache``: where a fixed model's token log-probabilities
    of these answers are kept (the base's or the live version's, ``tuning.trainer.Kept``):
    kept ones are read, the rest scored, and the file then holds these pairs' answers only.
    """
    from .dpo import kept_logps, token_logps

    items = [tokenize_pair(tokenizer, p, max_length) for p in pairs]
    sides = [(it.prompt, it.chosen) for it in items] + [(it.prompt, it.rejected) for it in items]

    def score(missing):
        with model.disable_adapter() if adapter_off else contextlib.nullcontext():
            return token_logps(model, missing, pad_id(tokenizer), False, batch_size=2 * batch_size, alone=True)

    keys, table = kept_logps(sides, cache, str(next(model.parameters()).dtype).removeprefix("torch."), score)
    n = len(items)
    summed, per_token = [], []
    for i in range(n):
        c, r = table[keys[i]].double(), table[keys[n + i]].double()
        summed.append(float(c.sum() - r.sum()))
        per_token.append(float(c.sum() / max(len(c), 1) - r.sum() / max(len(r), 1)))
    return summed, per_token


def golden_passes(answer: str, golden: Golden) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(e)}(?!\w)", answer, re.IGNORECASE) for e in golden.expect)


def answer_distance(answer: str, target: str) -> float:
    """1 - difflib's similarity ratio over the two texts' words (case-folded): 0 for the
    same words in the same order, 1 for nothing in common."""
    a, b = re.findall(r"\w+", answer.lower()), re.findall(r"\w+", target.lower())
    if not a and not b:
        return 0.0
    return 1.0 - difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


# The tokens markers are made of: words, each punctuation mark, line breaks.
MARKER_TOKEN = re.compile(r"\w+|[^\w\s]|\n")


def _bigrams(text: str) -> set:
    """The answer's pairs of neighbouring tokens (case-folded ``MARKER_TOKEN``s): what a
    list's "- " lines, an opening's "!" or a sentence break add shows."""
    t = MARKER_TOKEN.findall(text.lower())
    return set(zip(t, t[1:])) if len(t) > 1 else {(x,) for x in t}


# A token pair marks what users want when the share of preferred answers (chosen, up-voted)
# holding it and the share of the others (rejected, down-voted) differ by at least
# MARKER_GAP, and at least MARKER_MIN_ANSWERS answers hold it: a phrase every edit opens
# with (gap 1.0), the sentence breaks of long answers when users cut them to one sentence.
# What one answer says about its own question marks nothing.
MARKER_GAP = 0.25
MARKER_MIN_ANSWERS = 3


def preference_markers(judged: list[tuple[str, bool]], reference: list[str] = ()) -> dict[tuple, float]:
    """What users' feedback asks for, as token pairs weighted from -1 to 1: the share of
    preferred answers (label True) that hold the pair minus the share of the others, kept
    when at least MARKER_GAP apart. With one label only, the other side is ``reference``
    (the live version's answers to the same prompts). Empty when nothing tells them apart."""
    good = [_bigrams(a) for a, lab in judged if lab]
    bad = [_bigrams(a) for a, lab in judged if not lab]
    if not good:
        good = [_bigrams(a) for a in reference]
    elif not bad:
        bad = [_bigrams(a) for a in reference]
    if not good or not bad:
        return {}
    held: dict[tuple, int] = {}
    for pairs in good + bad:
        for b in pairs:
            held[b] = held.get(b, 0) + 1
    markers = {}
    for b, n in held.items():
        w = sum(b in x for x in good) / len(good) - sum(b in x for x in bad) / len(bad)
        if n >= MARKER_MIN_ANSWERS and abs(w) >= MARKER_GAP:
            markers[b] = round(w, 4)
    return markers


def marker_score(answer: str, markers: dict[tuple, float]) -> float:
    """Where an answer sits between the other side (-1: it holds every marker of the
    rejected or down-voted answers and none of the preferred ones) and the preferred side
    (+1), by the weighted markers it holds."""
    total = sum(abs(w) for w in markers.values())
    if not total:
        return 0.0
    have = _bigrams(answer)
    return sum(w for b, w in markers.items() if b in have) / total


def behaviour(candidate: list[dict], live: list[dict], judged: list[tuple[str, bool]],
              config: "GateConfig", what: str) -> dict:
    """The gate's behaviour check: did what users read move the way their feedback asks?

    ``candidate`` and ``live``: per held-out pair or vote, the version's greedy answer to its
    prompt (``{"answer": ...}``), same rows, same order. ``judged``: the held-out answers
    users judged, (text, preferred?). Those give the markers (``preference_markers``), in
    two sides: what the preferred answers add (an opening, a list's line breaks) and what
    they cut (the sentence breaks of answers cut to one sentence). Each side that carries at
    least a quarter of the markers' weight, or that a quarter of the preferred answers ask
    for, must move the preferred way: the candidate's
    answers hold more of what is added (or less of what is cut) than the live version's,
    on average and on more rows than luck would give (the sign test over the rows that
    changed, p <= max_p_value).

    Why markers of the groups, and why both sides: votes and pairs are on the live
    version's own answers, so any rewording moves an answer away from the rejected or
    down-voted one, and drops the word pairs the rejected answers share. Versions that
    learned nothing passed that way twice here: a thumbs-only "opening" version (0/32
    answers opening with the phrase), judged per vote by word distance, and a version taught
    reversed answers (0/32 reversed), judged per pair by the word pairs only one side had.
    One answer's own words never become markers (MARKER_MIN_ANSWERS), and the added side
    cannot be reached by rewording."""
    markers = preference_markers(judged, [lv["answer"] for lv in live])
    if not markers:
        return {"check": "behaviour", "passed": False,
                "detail": f"no token pair tells the preferred {what} answers from the others: nothing to check the "
                          "answers against"}
    total = sum(abs(w) for w in markers.values())
    sides, verdicts = [], []
    for side, sign in (("what they add", 1), ("what they cut", -1)):
        these = {b: abs(w) for b, w in markers.items() if w * sign > 0}
        weight = sum(these.values())
        if not weight:
            continue

        def held(answer: str) -> float:
            have = _bigrams(answer)
            return sum(w for b, w in these.items() if b in have) / weight

        # Each side that matters must move: rewording alone drops the rejected answers' word
        # pairs (the cut side) but adds nothing users added. A side matters when it carries a
        # quarter of the weight, or when a quarter of the preferred answers ask for it (they
        # hold half its weight, or for cuts, half of what the others hold): "two users want
        # it cut to a sentence, two want it said twice in other words" is asked-for on both
        # sides, though the many cut sentence breaks outweigh the few added words.
        pref = [held(t) for t, good in judged if good]
        others = [held(t) for t, good in judged if not good] or [held(lv["answer"]) for lv in live]
        floor = sum(others) / len(others) / 2
        asked = [h >= 0.5 for h in pref] if sign > 0 else [h <= floor for h in pref] if floor > 0 else []
        if weight < 0.25 * total and sum(asked) < 0.25 * max(len(pref), 1):
            continue

        c_h, l_h = [held(c["answer"]) for c in candidate], [held(lv["answer"]) for lv in live]
        moved = [(c - lv) * sign for c, lv in zip(c_h, l_h)]
        better, worse = sum(m > 0 for m in moved), sum(m < 0 for m in moved)
        p = sign_test_p(better, better + worse)
        c_mean, l_mean = sum(c_h) / len(c_h), sum(l_h) / len(l_h)
        # A live version that already answers the preferred way (a later round) can only be
        # matched: within 0.05 of all (adds) or none (cuts), a candidate as close passes.
        there = (min(c_mean, l_mean) >= 0.95) if sign > 0 else (max(c_mean, l_mean) <= 0.05)
        ok = (sum(moved) > 0 and p <= config.max_p_value) or there
        top = sorted(these, key=lambda b: (-these[b], b))[:3]
        words = ", ".join("'" + " ".join(b).replace("\n", "\\n") + "'" for b in top)
        sides.append(f"{side} ({len(these)} token pairs such as {words}): held {c_mean:.2f} vs live {l_mean:.2f}, "
                     f"moved the preferred way on {better}, the other way on {worse} of {len(moved)} (p={p:.3g})"
                     + (", both already there" if there else ""))
        verdicts.append(ok)
    c_score = sum(marker_score(c["answer"], markers) for c in candidate) / len(candidate)
    l_score = sum(marker_score(lv["answer"], markers) for lv in live) / len(live)
    return {"check": "behaviour", "passed": bool(verdicts and all(verdicts)),
            "detail": f"in the preferred {what} answers, {'; '.join(sides)} (each must move the preferred way, "
                      f"sign test p <= {config.max_p_value}); on the preferred side overall {c_score:+.3f} vs live "
                      f"{l_score:+.3f} (-1 .. +1)",
            "value": round(c_score, 3), "live": round(l_score, 3),
            "threshold": f"what the preferred answers add held more, what they cut held less, on enough answers to rule "
                         f"out luck (sign test p <= {config.max_p_value})"}


# Users pull opposite ways when some cut their answers and others lengthen them: one version
# cannot follow both. A user pulls one way when the median length ratio of their pairs
# (chosen words / rejected words, over at least DIRECTION_MIN_PAIRS pairs) is beyond
# DIRECTION_RATIO or below its inverse; the feedback contradicts itself when the users
# pulling each way hold at least DIRECTION_SHARE of the pairs. Seen in the gate benchmark:
# two users cut every answer to a sentence, two said it twice ("In other words, ..."); the
# version followed the cutting half, and the behaviour check, which reads what an answer
# says in the first max_new_tokens, could not see what the lengthening half asked for.
DIRECTION_RATIO = 1.25
DIRECTION_MIN_PAIRS = 3
DIRECTION_SHARE = 0.25


def length_directions(pairs: list[dict]) -> dict[str, dict]:
    """Per user (the chosen answer's), how their pairs change an answer's length: the number
    of pairs, the median ratio of chosen to rejected words, and the way it pulls ("shorter",
    "longer", or None)."""
    ratios: dict[str, list[float]] = {}
    for p in pairs:
        chosen, rejected = len(_text(p["chosen"]).split()), len(_text(p["rejected"]).split())
        ratios.setdefault(str(p.get("user_id")), []).append(max(chosen, 1) / max(rejected, 1))
    out = {}
    for user, rs in ratios.items():
        median = statistics.median(rs)
        way = None
        if len(rs) >= DIRECTION_MIN_PAIRS:
            way = "longer" if median >= DIRECTION_RATIO else "shorter" if median <= 1 / DIRECTION_RATIO else None
        out[user] = {"pairs": len(rs), "ratio": round(median, 3), "way": way}
    return out


def users_agree(pairs: list[dict]) -> dict:
    """The gate's check that the job's feedback (training and held-out pairs) does not pull
    answers two ways at once: some users cutting them, others lengthening them, each with a
    quarter of the pairs (``length_directions``). Not a judgement of the version: of what it
    was asked to learn."""
    users = length_directions(pairs)
    total = sum(u["pairs"] for u in users.values()) or 1
    ways = {}
    for way in ("shorter", "longer"):
        mine = {name: u for name, u in users.items() if u["way"] == way}
        ways[way] = {"users": len(mine), "pairs": sum(u["pairs"] for u in mine.values()),
                     "ratio": statistics.median(u["ratio"] for u in mine.values()) if mine else None,
                     "names": sorted(mine, key=lambda n: -mine[n]["pairs"])}
    split = all(w["pairs"] >= DIRECTION_SHARE * total for w in ways.values())

    def said(way: str) -> str:
        w = ways[way]
        verb = "cut answers" if way == "shorter" else "lengthen answers"
        return f"{w['users']} user{'s' * (w['users'] != 1)} ({w['pairs']} pairs) {verb}" + (f" to {w['ratio']:.2f}x their words" if w["ratio"] else "")

    detail = f"{said('shorter')}, {said('longer')}, of {len(users)} user{'s' * (len(users) != 1)} and {total} pairs"
    if split:  # who, so that an admin can look at their feedback (one user with many edits can be one side)
        names = {w: ", ".join(ways[w]["names"][:5]) + (" ..." if len(ways[w]["names"]) > 5 else "") for w in ways}
        detail += (f"; users pull answers opposite ways, and one version cannot follow both (shorter: {names['shorter']}; "
                   f"longer: {names['longer']})")
    return {"check": "users agree", "passed": not split, "detail": detail,
            "value": f"{ways['shorter']['pairs']} shorter / {ways['longer']['pairs']} longer pairs",
            "threshold": f"not both ways with {DIRECTION_SHARE:.0%} of the pairs each (a user pulls a way when their "
                         f"median length ratio is beyond {DIRECTION_RATIO}x or below 1/{DIRECTION_RATIO}x)"}


_STOPWORDS = {
    "English": {"the", "is", "a", "of", "and", "to", "in", "it", "you", "that", "for", "are", "with", "this", "on", "be", "can", "i"},
    "French": {"le", "la", "les", "des", "est", "et", "une", "un", "du", "vous", "je", "pas", "pour", "que", "qui", "dans", "sur", "bien", "sûr", "c'est", "nous"},
    "Spanish": {"el", "los", "las", "es", "y", "una", "del", "que", "para", "por", "con", "muy", "está", "sí", "como", "pero"},
    "German": {"der", "die", "das", "und", "ist", "nicht", "ein", "eine", "ich", "sie", "mit", "auf", "für", "zu", "wir"},
}
_APOLOGY = re.compile(r"\b(i'?m sorry|i am sorry|i apologi[sz]e|sorry for (any|the) (confusion|misunderstanding)|as an ai\b)", re.I)


def damage(answer: str) -> str | None:
    """What a reader would call broken in an answer to an English prompt, or None:
    the same words over and over, another language, a stock apology."""
    words = re.findall(r"[\w'’]+", answer.lower())
    for i in range(len(words) - 3):
        if words[i] == words[i + 1] == words[i + 2] == words[i + 3]:
            return f"repeats {words[i]!r}"
    # Four words three times over: a 64-token answer of the base model repeats three-word
    # phrases ("a day is") now and then, which readers do not notice; this they do.
    grams = [" ".join(words[i : i + 4]) for i in range(len(words) - 3)]
    if grams:
        top = max(set(grams), key=grams.count)
        if grams.count(top) >= 3:
            return f"repeats {top!r}"
    letters = [c for c in answer if c.isalpha()]
    if letters and sum(not c.isascii() for c in letters) / len(letters) > 0.3:
        return "not in English (another script)"
    counts = {lang: sum(w in stop for w in words) for lang, stop in _STOPWORDS.items()}
    lang = max((k for k in counts if k != "English"), key=counts.get)
    if counts[lang] >= 2 and counts[lang] > counts["English"]:
        return f"in {lang}"
    if _APOLOGY.search(answer):
        return "stock apology"
    return None


def noninferior(losses: int, gains: int, n: int, tolerance: float) -> tuple[bool, float]:
    """Is the candidate at most ``tolerance`` worse than the live version, at 95% confidence?

    Paired answers: ``losses`` the live version had right and the candidate not, ``gains``
    the other way round, of ``n``. The difference in the share right is (losses - gains)/n;
    returns (upper one-sided 95% bound <= tolerance, that bound), with the Wald interval for
    paired proportions (variance ((losses + gains)/n - d**2)/n)."""
    if n == 0:
        return True, 0.0
    d = (losses - gains) / n
    var = max((losses + gains) / n - d * d, 0.0) / n
    upper = d + 1.6449 * math.sqrt(var)
    return upper <= tolerance, upper


def measure(model, tokenizer, eval_pairs: list[dict], base_logratios: list[float], *,
            adapter_off: bool, beta: float, config: GateConfig, max_length: int = 512,
            cache: AnswerCache | None = None, held_cache: AnswerCache | None = None,
            scores: ReferenceCache | None = None) -> dict:
    """One version's gate metrics; the active adapter is the version (or none: the base).
    For a version that does not change (the live one), what is kept of it
    (``tuning.trainer.Kept``): ``cache`` its regression answers, ``held_cache`` its answers to
    the held-out prompts, ``scores`` its log-probabilities of the held-out pairs' answers.
    Records the seconds its log-ratios and its answers took."""
    t0 = time.monotonic()
    lr, per_token = pair_logratios(model, tokenizer, eval_pairs, adapter_off=adapter_off,
                                   batch_size=config.batch_size, max_length=max_length, cache=scores)
    t1 = time.monotonic()
    margins = [beta * (a - b) for a, b in zip(lr, base_logratios)]
    reach = answer_reach(tokenizer, [_text(p["chosen"]) for p in eval_pairs], config)
    by_prompt, answered = _answer_all(model, tokenizer, eval_pairs, config, adapter_off, reach, cache, held_cache)
    seconds = {"log-ratios": round(t1 - t0, 1), "answers": round(time.monotonic() - t1, 1)}
    # Each held-out pair whose prompt was answered: the answer beside the pair's two sides,
    # cut to as far as the answers were read (for the behaviour check).
    pair_answers = [{"answer": answer, "chosen": _cut(tokenizer, _text(p["chosen"]), reach),
                     "rejected": _cut(tokenizer, _text(p["rejected"]), reach)}
                    for p in eval_pairs if (answer := by_prompt.get(_key(p["prompt"]))) is not None]
    n = len(lr)
    return {
        "pairs": n,
        "preference_accuracy": round(sum(m > 0 for m in margins) / n, 4) if n else None,
        "reward_margin": round(sum(margins) / n, 4) if n else None,
        "likelihood_accuracy": round(sum(x > 0 for x in lr) / n, 4) if n else None,
        "likelihood_accuracy_per_token": round(sum(x > 0 for x in per_token) / n, 4) if n else None,
        "logratios": [round(x, 4) for x in lr],
        **answered,
        "chosen_tokens": _mean([min(len(tokenizer(_text(p["chosen"]))["input_ids"]), reach)
                                for p in eval_pairs]),
        "answer_reach": reach,
        "pair_answers": pair_answers,
        "seconds": seconds,
    }


def answer_reach(tokenizer, wanted: list[str], config: GateConfig) -> int:
    """How many tokens of each held-out answer the gate reads: as far as the longest answer
    users chose (``wanted``), within [max_new_tokens, max_answer_tokens]. A preference at
    the end of an answer (a closing sentence) is otherwise invisible to the behaviour
    check, and a version that learned it early, by cutting answers short, looks best."""
    longest = max((len(tokenizer(t)["input_ids"]) for t in wanted), default=0)
    return max(config.max_new_tokens, min(longest, config.max_answer_tokens))


def regression_answers(model, tokenizer, config: GateConfig, adapter_off: bool,
                       cache: AnswerCache | None = None) -> list[tuple[str, int]]:
    """Greedy answers, as served, to the regression set (``max_new_tokens``), read from
    ``cache`` where the same model answered them before: what every gate asks the live
    version, and what ``tuning.prepare`` answers ahead while the machine is idle."""
    golden_convs = [[{"role": "user", "content": g.prompt}] for g in config.golden]
    return greedy_answers(model, tokenizer, golden_convs, max_new_tokens=config.max_new_tokens, cache=cache,
                          batch_size=config.answer_batch_size, adapter_off=adapter_off,
                          frequency_penalty=config.frequency_penalty)


def _answer_all(model, tokenizer, rows: list[dict], config: GateConfig, adapter_off: bool,
                reach: int | None = None, cache: AnswerCache | None = None,
                held_cache: AnswerCache | None = None) -> tuple[dict, dict]:
    """Greedy answers, as served, to the regression set (``max_new_tokens``) and to the
    rows' distinct prompts (at most ``config.max_length_prompts``, ``reach`` tokens:
    ``answer_reach``), read from ``cache`` and ``held_cache`` where kept. Returns (answer
    by prompt key, the metrics every measure records: the regression verdicts, mean answer
    tokens, damaged answers, answers)."""
    prompts: list[list[dict]] = []
    for r in rows:
        if r["prompt"] not in prompts and len(prompts) < config.max_length_prompts:
            prompts.append(r["prompt"])
    golden_convs = [[{"role": "user", "content": g.prompt}] for g in config.golden]
    reach = reach or config.max_new_tokens
    kw = dict(batch_size=config.answer_batch_size, adapter_off=adapter_off, frequency_penalty=config.frequency_penalty)
    if reach == config.max_new_tokens and cache is None and held_cache is None:  # one batched pass, as before
        answers = greedy_answers(model, tokenizer, golden_convs + prompts, max_new_tokens=reach, **kw)
    else:  # greedy in float32: batching apart changes no answer (tuning.generation)
        # The regression set's answers are kept beside the models (``cache``), the users'
        # prompts' in the data folder (``held_cache``).
        answers = regression_answers(model, tokenizer, config, adapter_off, cache)
        answers += greedy_answers(model, tokenizer, prompts, max_new_tokens=reach, cache=held_cache, **kw)
    golden = {g.prompt: {"answer": a, "passed": golden_passes(a, g), "kind": g.kind}
              for g, (a, _) in zip(config.golden, answers)}
    held = answers[len(golden_convs):]
    return {_key(c): a for c, (a, _) in zip(prompts, held)}, {
        "golden": golden,
        "golden_passed": sum(g["passed"] for g in golden.values()),
        "golden_total": len(golden),
        "mean_answer_tokens": _mean([t for _, t in held]),
        "damaged": {c[-1]["content"]: why for c, (a, _) in zip(golden_convs + prompts, answers) if (why := damage(a))},
        "answered": len(answers),
        "answers": [{"prompt": c[-1]["content"], "answer": a} for c, (a, _) in zip(prompts, held)],
    }


def _key(prompt: list[dict]) -> str:
    return repr([(m.get("role"), m.get("content")) for m in prompt])


def _text(messages) -> str:
    return messages if isinstance(messages, str) else "".join(m.get("content", "") for m in messages)


def _cut(tokenizer, text: str, tokens: int) -> str:
    return tokenizer.decode(tokenizer(text)["input_ids"][:tokens], skip_special_tokens=True)


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 2) if xs else None


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

    c_a, l_a = candidate.get("pair_answers") or [], live.get("pair_answers") or []
    if c_a and len(c_a) == len(l_a):
        checks.append(behaviour(c_a, l_a, [(x["chosen"], True) for x in c_a] + [(x["rejected"], False) for x in c_a],
                                config, "held-out pair"))
    else:
        check("behaviour", False, "no held-out answers to compare with the chosen ones")

    prompts = [q for q in live["golden"] if q in candidate["golden"]]
    losses = sum(live["golden"][q]["passed"] and not candidate["golden"][q]["passed"] for q in prompts)
    gains = sum(candidate["golden"][q]["passed"] and not live["golden"][q]["passed"] for q in prompts)
    ok, upper = noninferior(losses, gains, len(prompts), config.regression_tolerance)
    lost = [q for q in prompts if live["golden"][q]["passed"] and not candidate["golden"][q]["passed"]]
    check("regression set", ok,
          f"{candidate['golden_passed']}/{candidate['golden_total']} right vs live {live['golden_passed']}/{live['golden_total']}; "
          f"{losses} lost, {gains} gained: worse by at most {max(upper, 0):.1%} (95%), limit {config.regression_tolerance:.0%}"
          + (f"; now wrong: {', '.join(lost[:5])}" + (" ..." if len(lost) > 5 else "") if lost else ""),
          value=f"{candidate['golden_passed']}/{candidate['golden_total']}",
          live=f"{live['golden_passed']}/{live['golden_total']}",
          threshold=f"worse by at most {config.regression_tolerance:.0%} at 95% confidence")

    c_dam, l_dam = candidate.get("damaged") or {}, live.get("damaged") or {}
    n = candidate.get("answered") or live.get("answered") or 0
    d_losses, d_gains = len(set(c_dam) - set(l_dam)), len(set(l_dam) - set(c_dam))
    ok, upper = noninferior(d_losses, d_gains, n, config.fluency_tolerance)
    new = [f"{q!r}: {c_dam[q]}" for q in c_dam if q not in l_dam]
    check("fluency", ok,
          f"{len(c_dam)} damaged answers of {n} vs live {len(l_dam)}: worse by at most {max(upper, 0):.1%} (95%), "
          f"limit {config.fluency_tolerance:.0%}" + (f"; newly damaged: {'; '.join(new[:3])}" if new else ""),
          value=f"{len(c_dam)}/{n} damaged", live=f"{len(l_dam)}/{n} damaged",
          threshold=f"worse by at most {config.fluency_tolerance:.0%} at 95% confidence")

    cl, ll, target = candidate["mean_answer_tokens"], live["mean_answer_tokens"], candidate.get("chosen_tokens")
    if not cl or not ll:
        check("answer length", False, "no answers to measure")
    else:
        drift = cl / ll - 1
        toward = target is not None and abs(cl - target) < abs(ll - target)
        check("answer length", abs(drift) <= config.max_length_drift or toward,
              f"{cl:.1f} vs live {ll:.1f} tokens ({drift:+.0%}, limit +-{config.max_length_drift:.0%}"
              + (f" unless toward the chosen answers' {target:.1f}" if target is not None else "") + ")",
              value=cl, live=ll, threshold=f"{ll * (1 - config.max_length_drift):.1f}-{ll * (1 + config.max_length_drift):.1f} tokens "
              f"(+-{config.max_length_drift:.0%} of live)" + (f", or closer to the chosen answers' {target:.1f}" if target is not None else ""))
    return GateResult(all(c["passed"] for c in checks), checks)


# -- SFT versions (method "sft": an admin's data set, no preference pairs) ---------------------
#
# The preference checks need pairs an SFT data set does not have, so an SFT version is
# judged on what it was trained for and what it must not lose:
# - domain: the data set's held-out questions (paraphrases kept out of training), answered
#   greedily; right when the answer holds one of the row's ``expect`` words, or, without
#   them, when its words are within DOMAIN_DISTANCE of the reference answer's. The share
#   right must beat the live version's, by more questions gained than lost beyond luck
#   (the sign test over the questions whose verdict changed);
# - regression set and fluency: ``decide``'s own checks, unchanged, on the same answers.

# An answer within this word distance of the reference (``answer_distance``) counts as
# right when the row names no expected words: about half its words in the same order.
DOMAIN_DISTANCE = 0.5


def domain_passes(answer: str, row: dict) -> bool:
    """Is ``answer`` right for a held-out data set row (``expect`` words, else closeness)?"""
    expect = row.get("expect")
    if expect:
        return golden_passes(answer, Golden(_text(row["messages"][:-1]), tuple(expect)))
    return answer_distance(answer, row["messages"][-1]["content"]) <= DOMAIN_DISTANCE


def measure_sft(model, tokenizer, heldout: list[dict], *, adapter_off: bool, config: GateConfig,
                cache: AnswerCache | None = None) -> dict:
    """One version's answers to the regression set and the held-out domain questions; the
    same keys ``decide`` reads (preference figures None: there are no pairs)."""
    golden_convs = [[{"role": "user", "content": g.prompt}] for g in config.golden]
    domain_convs = [r["messages"][:-1] for r in heldout]
    kw = dict(max_new_tokens=config.max_new_tokens, batch_size=config.answer_batch_size, adapter_off=adapter_off,
              frequency_penalty=config.frequency_penalty)  # as served, like the DPO measure
    # The regression set's answers may be kept (``cache``); the data set's questions are not.
    answers = (regression_answers(model, tokenizer, config, adapter_off, cache)
               + greedy_answers(model, tokenizer, domain_convs, **kw))
    golden = {g.prompt: {"answer": a, "passed": golden_passes(a, g), "kind": g.kind}
              for g, (a, _) in zip(config.golden, answers)}
    held = answers[len(golden_convs):]
    domain = {r["id"]: {"prompt": r["messages"][-2]["content"], "answer": a, "passed": domain_passes(a, r)}
              for r, (a, _) in zip(heldout, held)}
    damaged = {c[-1]["content"]: why for c, (a, _) in zip(golden_convs + domain_convs, answers) if (why := damage(a))}
    return {
        "method": "sft",
        "pairs": 0, "preference_accuracy": None, "reward_margin": None, "logratios": [],
        "golden": golden,
        "golden_passed": sum(g["passed"] for g in golden.values()),
        "golden_total": len(golden),
        "domain": domain,
        "domain_passed": sum(d["passed"] for d in domain.values()),
        "domain_total": len(domain),
        "domain_share": round(sum(d["passed"] for d in domain.values()) / len(domain), 4) if domain else None,
        "mean_answer_tokens": _mean([t for _, t in held]),
        "damaged": damaged,
        "answered": len(answers),
        "answers": [{"prompt": d["prompt"], "answer": d["answer"]} for d in domain.values()],
    }


def decide_sft(candidate: dict, live: dict, config: GateConfig = GateConfig()) -> GateResult:
    """The verdict on an SFT version: the domain check, then ``decide``'s regression-set and
    fluency checks (both ``measure_sft`` results on the same questions)."""
    checks = []
    ids = [k for k in candidate.get("domain") or {} if k in (live.get("domain") or {})]
    if not ids:
        checks.append({"check": "domain", "passed": False,
                       "detail": "no held-out domain questions to measure on (add some with the data set: --heldout)"})
    else:
        c, lv = candidate["domain"], live["domain"]
        gains = sum(c[k]["passed"] and not lv[k]["passed"] for k in ids)
        losses = sum(lv[k]["passed"] and not c[k]["passed"] for k in ids)
        p = sign_test_p(gains, gains + losses)
        cs, ls = sum(c[k]["passed"] for k in ids) / len(ids), sum(lv[k]["passed"] for k in ids) / len(ids)
        wrong = [c[k]["prompt"] for k in ids if not c[k]["passed"]]
        checks.append({
            "check": "domain", "passed": cs > ls and p <= config.max_p_value,
            "detail": f"{cs:.0%} of {len(ids)} held-out domain questions right vs live {ls:.0%}; {gains} gained, "
                      f"{losses} lost (sign test p={p:.3g})" + (f"; still wrong: {'; '.join(wrong[:3])}" if wrong else ""),
            "value": round(cs, 4), "live": round(ls, 4),
            "threshold": f"above {ls:.0%}, with more questions gained than lost beyond luck (p <= {config.max_p_value})"})
    shared = decide(candidate, live, config)  # its regression-set and fluency checks, as for DPO versions
    checks += [c for c in shared.checks if c["check"] in ("regression set", "fluency")]
    return GateResult(all(c["passed"] for c in checks), checks)


def domain_kept(candidate: dict, live: dict, config: GateConfig = GateConfig()) -> dict:
    """For a DPO version whose parent or live version learned a domain (an SFT data set): a
    check that it still answers the data set's held-out questions, by the regression set's
    non-inferiority test. ``candidate`` and ``live`` are ``measure_sft`` results."""
    c, lv = candidate.get("domain") or {}, live.get("domain") or {}
    ids = [k for k in c if k in lv]
    losses = sum(lv[k]["passed"] and not c[k]["passed"] for k in ids)
    gains = sum(c[k]["passed"] and not lv[k]["passed"] for k in ids)
    ok, upper = noninferior(losses, gains, len(ids), config.regression_tolerance)
    right, was = sum(c[k]["passed"] for k in ids), sum(lv[k]["passed"] for k in ids)
    return {"check": "domain kept", "passed": bool(ok),
            "detail": f"{right}/{len(ids)} held-out domain questions right vs live {was}/{len(ids)}; {losses} lost, {gains} "
                      f"gained: worse by at most {max(upper, 0):.1%} (95%), limit {config.regression_tolerance:.0%}",
            "value": f"{right}/{len(ids)}", "live": f"{was}/{len(ids)}",
            "threshold": f"worse by at most {config.regression_tolerance:.0%} at 95% confidence"}


# -- KTO versions (objective "kto": lone thumbs up and down, no pairs) --------------------------
#
# Held-out votes (whole conversations and prompt groups kept out of training, tuning.split)
# take the place of held-out pairs. The implicit KTO reward of an answer is ``kto_beta *
# (log pi(y|x) - log pi_base(y|x))``; the base scores 0 on every vote by construction.
# - vote accuracy: the share of (up, down) combinations of held-out votes where the
#   up-voted answer has the higher reward (``vote_separation``; the base scores 0.5), DPO's
#   preference accuracy for votes; it must beat the live version's. Blind to a shift of
#   every reward alike (the NLL term raises down-voted answers in the same style too);
# - vote margin: mean up minus mean down reward (TRL's rewards/margins) must beat the live
#   version's, and each vote's reward, signed and centred, must improve on more votes than
#   luck would (the sign test over votes);
# - behaviour: what users read must move the way the votes ask (``behaviour``): the
#   token pairs that tell up-voted answers from down-voted ones as groups (an opening every
#   up-voted answer has; the connecting words of the long answers users voted down) score
#   the greedy answers to the held-out prompts, and the candidate's must score above the
#   live version's, on average and on more prompts than luck would give;
# - regression set, fluency, answer length: ``decide``'s checks, unchanged (the length
#   target is the up-voted answers' length).
# A job with pairs and votes is gated as a DPO version, plus the two vote checks when it
# has held-out votes (``vote_checks``).


def vote_logratios(model, tokenizer, votes: list[dict], *, adapter_off: bool, batch_size: int = 8,
                   max_length: int = 512) -> list[float]:
    """Per vote: log pi(answer | prompt) summed over the answer's tokens, in the model's dtype."""
    from .kto import tokenize_vote
    from .sft import TokenizedExample, collate_examples

    pad = pad_id(tokenizer)
    items = [tokenize_vote(tokenizer, v, max_length) for v in votes]
    out: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(items), batch_size):
            batch = collate_examples([TokenizedExample(it.prompt, it.answer) for it in items[i : i + batch_size]], pad)
            with torch.inference_mode():
                if adapter_off:
                    with model.disable_adapter():
                        logps, _ = sequence_logps(model, batch)
                else:
                    logps, _ = sequence_logps(model, batch)
            out += logps.tolist()
    finally:
        model.train(was_training)
    return out


def measure_votes(model, tokenizer, votes: list[dict], base_logratios: list[float], *, adapter_off: bool,
                  beta: float, config: GateConfig, max_length: int = 512) -> dict:
    """One version's implicit rewards on held-out votes: vote accuracy and margin, and each
    vote's signed reward (for the sign test)."""
    lps = vote_logratios(model, tokenizer, votes, adapter_off=adapter_off, batch_size=config.batch_size,
                         max_length=max_length)
    rewards = [beta * (lp - b) for lp, b in zip(lps, base_logratios)]
    return {"votes": len(votes), "votes_up": sum(bool(v["label"]) for v in votes),
            **vote_separation(rewards, [bool(v["label"]) for v in votes])}


def vote_separation(rewards: list[float], labels: list[bool]) -> dict:
    """How well implicit rewards separate up from down votes, blind to a shift that moves
    every answer alike (the NLL term on up-voted answers makes the model likelier to say
    anything in their style, down-voted answers included; KTO itself judges against a
    moving reference point, not against 0).

    With both labels: accuracy = the share of (up, down) vote combinations whose up-voted
    answer has the higher reward (ties half; 0.5 for the base, whose rewards are all 0),
    margin = mean up reward - mean down reward (TRL's rewards/margins), and each vote's
    reward signed by its label after subtracting the midpoint of the two means (the
    per-vote figures the sign test compares). With one label there is no shift to remove:
    rewards are signed as they are, accuracy is the share on the vote's side of 0."""
    n = len(rewards)
    if n == 0:
        return {"vote_accuracy": None, "vote_margin": None, "vote_signed_rewards": []}
    up = [r for r, lab in zip(rewards, labels) if lab]
    down = [r for r, lab in zip(rewards, labels) if not lab]
    if up and down:
        mid = (sum(up) / len(up) + sum(down) / len(down)) / 2
        signed = [(r - mid) * (1 if lab else -1) for r, lab in zip(rewards, labels)]
        wins = sum((u > d) + 0.5 * (u == d) for u in up for d in down)
        accuracy, margin = wins / (len(up) * len(down)), sum(up) / len(up) - sum(down) / len(down)
    else:
        signed = [r * (1 if lab else -1) for r, lab in zip(rewards, labels)]
        accuracy, margin = sum(s > 0 for s in signed) / n, sum(signed) / n
    return {"vote_accuracy": round(accuracy, 4), "vote_margin": round(margin, 4),
            "vote_signed_rewards": [round(s, 5) for s in signed]}


def measure_kto(model, tokenizer, votes: list[dict], base_logratios: list[float], *, adapter_off: bool,
                beta: float, config: GateConfig, max_length: int = 512, cache: AnswerCache | None = None) -> dict:
    """One version's gate metrics for a KTO version: ``measure_votes``, plus greedy answers
    to the regression set and the held-out votes' prompts (the keys ``decide`` reads)."""
    out = measure_votes(model, tokenizer, votes, base_logratios, adapter_off=adapter_off, beta=beta,
                        config=config, max_length=max_length)
    ups = [v for v in votes if v["label"]]
    reach = answer_reach(tokenizer, [_text(v["completion"]) for v in ups], config)
    by_prompt, answered = _answer_all(model, tokenizer, votes, config, adapter_off, reach, cache)
    # Per vote whose prompt was answered: the answer beside the voted one (cut to as far as
    # the answers were read) and the vote, for the behaviour check (``behaviour``).
    vote_answers = [{"answer": answer, "voted": _cut(tokenizer, _text(v["completion"]), reach),
                     "up": bool(v["label"])}
                    for v in votes if (answer := by_prompt.get(_key(v["prompt"]))) is not None]
    return {
        **out,
        "method": "kto",
        "pairs": 0, "preference_accuracy": None, "reward_margin": None, "logratios": [],
        **answered,
        "chosen_tokens": _mean([min(len(tokenizer(_text(v["completion"]))["input_ids"]), reach)
                                for v in ups]),
        "answer_reach": reach,
        "vote_answers": vote_answers,
    }


def vote_checks(candidate: dict, live: dict, config: GateConfig = GateConfig()) -> list[dict]:
    """The "vote accuracy" and "vote margin" checks (``measure_votes`` results on the same votes)."""
    checks = []
    ca, la = candidate.get("vote_accuracy"), live.get("vote_accuracy")
    if ca is None or la is None:
        checks.append({"check": "vote accuracy", "passed": False, "detail": "no held-out votes to measure on"})
        checks.append({"check": "vote margin", "passed": False, "detail": "no held-out votes to measure on"})
        return checks
    ok = ca > la + config.min_accuracy_gain or (la >= 1.0 and ca >= 1.0)
    checks.append({"check": "vote accuracy", "passed": bool(ok),
                   "detail": f"{ca:.3f} vs live {la:.3f}: the share of up/down combinations of {candidate['votes']} "
                             f"held-out votes ({candidate['votes_up']} up) where the up-voted answer has the higher "
                             "reward" + ("" if 0 < candidate["votes_up"] < candidate["votes"] else
                                         " (one label only: the share on the vote's side of the base)"),
                   "value": ca, "live": la,
                   "threshold": f"above {la + config.min_accuracy_gain:.3f}" + (" (or both 1.0)" if la >= 1.0 else "")})
    cm, lm = candidate["vote_margin"], live["vote_margin"]
    c_s, l_s = candidate.get("vote_signed_rewards") or [], live.get("vote_signed_rewards") or []
    wins = sum(c > lv for c, lv in zip(c_s, l_s))
    p = sign_test_p(wins, len(c_s))
    checks.append({"check": "vote margin", "passed": bool(cm > lm and p <= config.max_p_value),
                   "detail": f"{cm:.3f} vs live {lm:.3f}; better on {wins}/{len(c_s)} votes (p={p:.3g})",
                   "value": cm, "live": lm,
                   "threshold": f"above {lm:.3f}, better on enough votes to rule out luck (sign test p <= {config.max_p_value})"})
    return checks


def decide_kto(candidate: dict, live: dict, config: GateConfig = GateConfig()) -> GateResult:
    """The verdict on a KTO version: the vote checks, behaviour on the held-out votes, then
    ``decide``'s regression-set, fluency and answer-length checks (``measure_kto`` results)."""
    checks = vote_checks(candidate, live, config)
    c_a, l_a = candidate.get("vote_answers") or [], live.get("vote_answers") or []
    if c_a and len(c_a) == len(l_a):
        checks.append(behaviour(c_a, l_a, [(x["voted"], x["up"]) for x in c_a], config, "held-out voted"))
    else:
        checks.append({"check": "behaviour", "passed": False, "detail": "no held-out answers to compare with the voted ones"})
    shared = decide(candidate, live, config)
    checks += [c for c in shared.checks if c["check"] in ("regression set", "fluency", "answer length")]
    return GateResult(all(c["passed"] for c in checks), checks)
