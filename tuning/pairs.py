"""Preference data from chat feedback: paired preferences, unpaired labelled answers, a split.

    from tuning.pairs import PairConfig, build_preferences
    data = build_preferences(store)            # all-MiniLM-L6-v2 groups paraphrased prompts
    data.train_pairs, data.eval_pairs          # {prompt, chosen, rejected} + provenance
    print(format_summary(data.summary))        # what was built, what was dropped and why

Exports: ``python -m tuning.export --data-dir data`` (see tuning.export).

Signals, each pair carrying the ids of the answers it came from:
- ``edit``: the user's rewrite is chosen over the answer it replaced. When the token limit
  cut that answer (``finish_reason`` "length") and the edit keeps all of it up to its
  unfinished last sentence, drops that sentence and goes on differently (a closing
  sentence, say), the rejected side is the answer ended after its last whole sentence
  (``ended_before_cut``): the unfinished sentence was the limit's doing, not something the
  user rejected. (Measured on the preference suite's closing at 256 tokens, 34 of 106
  pairs: it did not stop that version from closing early, 38.2 vs 38.7 words.)
- ``vote``: an up-voted answer over a down-voted one to the same prompt group (the same
  conversation state, with paraphrased last messages counted as the same; see
  tuning.grouping). The prompt is the chosen answer's.
- ``retry``: within one user turn, an up-voted answer over an unvoted retry sibling, or the
  answer the user kept (the one shown, unvoted) over a down-voted sibling.
Votes with no partner become unpaired examples ``{prompt, completion, label}``.

Rules, in order: opted-out conversations and withdrawn answers are never read (the store
enforces it); votes that contradict each other (up and down on the same answer, or on the
same wording of an answer within one prompt group) are dropped; then pairs whose two sides
say the same thing (the same words, case and punctuation aside, laid out the same way: an
answer made a list is a difference, "Rome" -> "Rome." is not), pairs contradicted by a
reverse pair in the same group, near-duplicates (same group, same normalized chosen and
rejected), pairs beyond the per-group cap and beyond the per-user cap are dropped, each
counted by reason in the summary.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

from .embeddings import Embedder, MiniLMEmbedder
from store.rows import hash_prompt

from .grouping import group_prompts, normalize
from .split import assign_splits

SIGNALS = ("edit", "vote", "retry")  # also the precedence when duplicates collapse


@dataclass(frozen=True)
class PairConfig:
    # Cosine similarity of last user messages (same persona and history) at or above which
    # two prompts are one. Measured with all-MiniLM-L6-v2 here: paraphrases score 0.90-0.97
    # ("What is the capital of France?" / "Which city is the capital of France?" 0.94),
    # different questions sharing words up to 0.89 ("What is 2+2?" / "What is 2+3?") and
    # 0.86 (translate into Spanish / into French). Merging different questions makes false
    # pairs and false contradictions; missing a paraphrase only loses a pairing: err high.
    same_prompt_similarity: float = 0.90
    # Paraphrases ask about the same numbers; "2+2" and "2+3" embed close but differ.
    numbers_must_match: bool = True
    # Longer last messages are grouped by exact text only: long pastes are rarely
    # paraphrased, the model truncates at 256 tokens anyway, and they dominate embedding time.
    max_embed_chars: int = 1000
    # Pairs (and, separately, unpaired examples) kept per user, newest first. Enough for a
    # real contribution (128 on-policy pairs moved generations here), small enough that
    # one tireless rater cannot define the model's taste.
    per_user_cap: int = 500
    # Pairs kept per prompt group: up x down votes on one popular question multiply, and one
    # question should not outweigh hundreds of others. Same-state pairs are kept first.
    per_group_cap: int = 32
    # Share of records held out for evaluation: the newest whole conversations and prompt
    # groups (see tuning.split), so nothing evaluated was trained on.
    eval_fraction: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Pair:
    """One preference in TRL's conversational form, with where it came from."""

    id: str  # content hash of prompt, chosen and rejected: stable across rebuilds
    prompt: list[dict]  # the exact messages the chosen answer was generated from
    chosen: list[dict]  # [{"role": "assistant", "content": ...}]
    rejected: list[dict]
    signal: str  # 'edit' | 'vote' | 'retry'
    chosen_answer_id: str
    rejected_answer_id: str
    conversation_id: str  # the chosen answer's
    rejected_conversation_id: str  # differs from conversation_id only for paraphrase votes
    user_id: str  # the chosen answer's user
    rejected_user_id: str
    group_id: str
    created_utc: str  # the newest piece of feedback behind the pair
    split: str = "train"  # 'train' | 'eval'


@dataclass(frozen=True)
class Unpaired:
    """A vote with no partner, in the unpaired form {prompt, completion, label}."""

    id: str
    prompt: list[dict]
    completion: list[dict]
    label: bool  # True: up-voted
    answer_id: str
    conversation_id: str
    user_id: str
    group_id: str
    created_utc: str
    split: str = "train"


@dataclass
class PreferenceData:
    pairs: list[Pair]
    unpaired: list[Unpaired]
    summary: dict = field(default_factory=dict)

    @property
    def train_pairs(self) -> list[Pair]:
        return [p for p in self.pairs if p.split == "train"]

    @property
    def eval_pairs(self) -> list[Pair]:
        return [p for p in self.pairs if p.split == "eval"]

    @property
    def train_unpaired(self) -> list[Unpaired]:
        return [u for u in self.unpaired if u.split == "train"]

    @property
    def eval_unpaired(self) -> list[Unpaired]:
        return [u for u in self.unpaired if u.split == "eval"]


def _record_id(*parts) -> str:
    """A pair's or unpaired example's id: a hash of its prompt and answer texts, so the same
    record keeps its id across rebuilds. Not ``store.rows.hash_prompt``'s form (this one
    has json.dumps' default separators and keeps 20 hex digits) because versions record
    the ids of the pairs they trained on (``adapters.pair_ids_json``): a new form would
    silently give every recorded pair another id. tests/test_rows.py pins it."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def build_preferences(store, config: PairConfig = PairConfig(), embedder: Embedder | None = None) -> PreferenceData:
    """Read the feedback in ``store`` (a store.Store) and turn it into preference data."""
    start = time.perf_counter()
    feedback = store.training_feedback()
    answers: list[dict] = feedback["answers"]
    grouping = group_prompts(
        [a["prompt"] for a in answers],
        embedder or MiniLMEmbedder(),
        config.same_prompt_similarity,
        config.max_embed_chars,
        config.numbers_must_match,
    )
    for a in answers:
        a["group_id"] = grouping.group_of[hash_prompt(a["prompt"])]
        # The store keeps canonical JSON (sorted keys); exports read better role-first.
        a["prompt"] = [{"role": m["role"], "content": m["content"], **m} for m in a["prompt"]]
        a["norm"] = normalize(a["content"])
        a["form"] = a["norm"] + "\x00" + layout(a["content"])

    dropped_votes = _settle_votes(answers)
    candidates = _edit_pairs(answers) + _vote_pairs(answers) + _retry_pairs(answers)
    pairs, dropped_pairs = _filter_pairs(candidates, config)
    in_candidates = {a["id"] for c in candidates for a in c[:2]}
    unpaired, dropped_unpaired = _unpaired(answers, in_candidates, config)
    pairs, unpaired, split_note = assign_splits(pairs, unpaired, config.eval_fraction)

    summary = {
        "read": {
            "answers": len(answers),
            "votes": sum(len(a["votes"]) for a in answers),
            "users": len({a["user_id"] for a in answers}),
            "prompt_groups": grouping.groups,
            "paraphrases_merged": grouping.merged_by_embedding,
        },
        "left_out": {"opted_out": feedback["opted_out"], "withdrawn": feedback["withdrawn"],
                     "disabled": feedback.get("disabled", {"answers": 0, "votes": 0})},
        "dropped_votes": {"contradictory": dropped_votes},
        "candidates": dict(Counter(c[2] for c in candidates)),
        "pairs": {
            "total": len(pairs),
            "by_signal": {s: sum(p.signal == s for p in pairs) for s in SIGNALS},
            "train": sum(p.split == "train" for p in pairs),
            "eval": sum(p.split == "eval" for p in pairs),
        },
        "dropped_pairs": dropped_pairs,
        "unpaired": {
            "total": len(unpaired),
            "up": sum(u.label for u in unpaired),
            "down": sum(not u.label for u in unpaired),
            "train": sum(u.split == "train" for u in unpaired),
            "eval": sum(u.split == "eval" for u in unpaired),
        },
        "dropped_unpaired": dropped_unpaired,
        "split": split_note,
        "timing": {
            "seconds": round(time.perf_counter() - start, 3),
            "embedding_seconds": round(grouping.embed_seconds, 3),
            "texts_embedded": grouping.texts_embedded,
        },
        "config": config.to_dict(),
    }
    return PreferenceData(pairs, unpaired, summary)


# -- votes -------------------------------------------------------------------------


def _settle_votes(answers: list[dict]) -> int:
    """Give each answer ``label`` (+1, -1 or None); returns how many votes were dropped.

    Up and down on the same answer, or on the same wording within one prompt group (one
    user liked "Paris." where another disliked it), say nothing about which is better.
    """
    signs: dict[tuple[str, str], set[int]] = defaultdict(set)
    for a in answers:
        for v in a["votes"]:
            signs[(a["group_id"], a["norm"])].add(v["value"])
    dropped = 0
    for a in answers:
        values = {v["value"] for v in a["votes"]}
        if len(signs[(a["group_id"], a["norm"])]) > 1:
            dropped += len(a["votes"])
            a["label"] = None
        else:
            a["label"] = values.pop() if values else None
        a["feedback_utc"] = max([a["created_utc"]] + [v["created_utc"] for v in a["votes"]])
    return dropped


# -- candidate pairs: (chosen answer, rejected answer, signal) --------------------


def _edit_pairs(answers: list[dict]) -> list[tuple]:
    by_id = {a["id"]: a for a in answers}
    return [
        (a, by_id[a["edited_from_id"]], "edit")
        for a in answers
        if a["source"] == "edit" and a["edited_from_id"] in by_id
    ]


def _vote_pairs(answers: list[dict]) -> list[tuple]:
    ups, downs = defaultdict(list), defaultdict(list)
    for a in answers:
        if a["label"] == 1:
            ups[a["group_id"]].append(a)
        elif a["label"] == -1:
            downs[a["group_id"]].append(a)
    return [(u, d, "vote") for g in ups for u in ups[g] for d in downs.get(g, [])]


def _retry_pairs(answers: list[dict]) -> list[tuple]:
    """Within one user turn: up-voted over unvoted sibling; kept (shown) over down-voted.

    The rejected side is always a generated answer, never an answer linked to the chosen
    one by an edit (an edit already says which of the two the user preferred).
    """
    turns = defaultdict(list)
    for a in answers:
        turns[a["message_id"]].append(a)
    out = []
    for siblings in turns.values():
        for c in siblings:
            for r in siblings:
                if r is c or r["source"] != "model" or c["edited_from_id"] == r["id"] or r["edited_from_id"] == c["id"]:
                    continue
                if (c["label"] == 1 and r["label"] is None) or (
                    c["shown"] and c["label"] is None and r["label"] == -1
                ):
                    out.append((c, r, "retry"))
    return out


# -- filtering ---------------------------------------------------------------------


_LINE_MARK = re.compile(r"\s*(?:([-*\u2022+])|(\d+)[.)]|(#+)|(>))\s")


def layout(text: str) -> str:
    """How a text is laid out, apart from its words: one mark per non-empty line ("-" for a
    bullet, "1." for a numbered item, "#" for a heading, ">" for a quote, "" for plain
    text), and where blank lines split paragraphs. "A. B." and "- A.\n- B." have the same
    words (``normalize``) and different layouts; "Rome" and "Rome." have the same of both."""
    marks = []
    for line in text.strip().splitlines():
        if not line.strip():
            marks.append("\n")
            continue
        m = _LINE_MARK.match(line)
        marks.append("" if m is None else "-" if m[1] else "1." if m[2] else "#" if m[3] else ">")
    return "|".join(marks)


def _filter_pairs(candidates: list[tuple], config: PairConfig) -> tuple[list[Pair], dict]:
    """``form`` (words and layout) tells the sides apart, not ``norm`` (words) alone: an edit
    that only lays an answer out as a list keeps every word, and the layout is what the
    user asked for (the preference suite's "list": 54 of 118 such edits were dropped as
    saying nothing before)."""
    dropped = Counter({k: 0 for k in ("no_difference", "contradictory", "duplicate", "group_cap", "user_cap")})

    def key(c):
        return (c[0]["group_id"], c[0]["form"], c[1]["form"])

    def when(c):
        return max(c[0]["feedback_utc"], c[1]["feedback_utc"])

    kept = []
    for c in candidates:
        if c[0]["form"] == c[1]["form"]:
            dropped["no_difference"] += 1
        else:
            kept.append(c)
    directions = {key(c) for c in kept}
    contradicted = {k for k in directions if (k[0], k[2], k[1]) in directions}
    dropped["contradictory"] = sum(key(c) in contradicted for c in kept)
    kept = [c for c in kept if key(c) not in contradicted]

    # Near-duplicates: keep the strongest signal, then the oldest (stable as data grows).
    best: dict[tuple, tuple] = {}
    for c in sorted(kept, key=lambda c: (SIGNALS.index(c[2]), when(c), c[0]["id"], c[1]["id"])):
        if key(c) in best:
            dropped["duplicate"] += 1
        else:
            best[key(c)] = c

    by_group = defaultdict(list)
    for c in best.values():
        by_group[c[0]["group_id"]].append(c)
    capped = []
    for group in by_group.values():
        group.sort(key=lambda c: (when(c), c[0]["id"], c[1]["id"]), reverse=True)  # newest first
        group.sort(key=lambda c: (c[0]["prompt_hash"] != c[1]["prompt_hash"], SIGNALS.index(c[2])))
        capped.extend(group[: config.per_group_cap])
        dropped["group_cap"] += max(0, len(group) - config.per_group_cap)

    per_user: Counter = Counter()
    pairs = []
    for c in sorted(capped, key=lambda c: (when(c), c[0]["id"], c[1]["id"]), reverse=True):
        users = {c[0]["user_id"], c[1]["user_id"]}
        if any(per_user[u] >= config.per_user_cap for u in users):
            dropped["user_cap"] += 1
            continue
        per_user.update(users)
        pairs.append(_pair(*c, created=when(c)))
    pairs.sort(key=lambda p: (p.created_utc, p.id))
    return pairs, dict(dropped)


# A sentence ends at . ! or ? before white space; a list's "2." (one or two digits) does not.
SENTENCE_END = re.compile(r"(?<!\b\d)(?<!\b\d\d)[.!?](?=\s)")


def whole_sentences(text: str) -> str:
    """``text`` (stripped) up to the end of its last whole sentence; all of it when it ends
    a sentence or holds no sentence end."""
    text = text.strip()
    if text.endswith((".", "!", "?")):
        return text
    ends = [m.end() for m in SENTENCE_END.finditer(text)]
    return text[: ends[-1]] if ends else text


def ended_before_cut(edit: str, answer: dict) -> str:
    """The answer an edit is compared with: ``answer["content"]``, or, when the token limit
    cut it and the edit keeps it up to its last whole sentence but not its unfinished
    tail, the answer ended after that sentence (see the module's ``edit`` signal)."""
    text = answer["content"]
    if answer.get("finish_reason") != "length":
        return text
    whole = whole_sentences(text)
    # An edit that only drops the unfinished sentence asks for the answer to end there.
    if whole != text.strip() and edit.startswith(whole) and edit.strip() != whole and not edit.startswith(text.rstrip()):
        return whole
    return text


def _pair(chosen: dict, rejected: dict, signal: str, created: str) -> Pair:
    return Pair(
        id=_record_id(chosen["prompt"], chosen["content"], rejected["content"]),
        prompt=chosen["prompt"],
        chosen=_assistant(chosen["content"]),
        rejected=_assistant(ended_before_cut(chosen["content"], rejected) if signal == "edit" else rejected["content"]),
        signal=signal,
        chosen_answer_id=chosen["id"],
        rejected_answer_id=rejected["id"],
        conversation_id=chosen["conversation_id"],
        rejected_conversation_id=rejected["conversation_id"],
        user_id=chosen["user_id"],
        rejected_user_id=rejected["user_id"],
        group_id=chosen["group_id"],
        created_utc=created,
    )


def _unpaired(answers: list[dict], in_pairs: set[str], config: PairConfig) -> tuple[list[Unpaired], dict]:
    """Votes whose answer is in no candidate pair, deduplicated and capped per user."""
    dropped = {"duplicate": 0, "user_cap": 0}
    seen: set[tuple] = set()
    lone = []
    for a in sorted(answers, key=lambda a: (a["feedback_utc"], a["id"])):
        if a["label"] is None or a["id"] in in_pairs:
            continue
        k = (a["group_id"], a["norm"], a["label"])
        if k in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(k)
        lone.append(a)
    per_user: Counter = Counter()
    out = []
    for a in sorted(lone, key=lambda a: (a["feedback_utc"], a["id"]), reverse=True):
        if per_user[a["user_id"]] >= config.per_user_cap:
            dropped["user_cap"] += 1
            continue
        per_user[a["user_id"]] += 1
        out.append(
            Unpaired(
                id=_record_id(a["prompt"], a["content"], a["label"] == 1),
                prompt=a["prompt"],
                completion=_assistant(a["content"]),
                label=a["label"] == 1,
                answer_id=a["id"],
                conversation_id=a["conversation_id"],
                user_id=a["user_id"],
                group_id=a["group_id"],
                created_utc=a["feedback_utc"],
            )
        )
    out.sort(key=lambda u: (u.created_utc, u.id))
    return out, dropped


def format_summary(summary: dict) -> str:
    """The summary as a few lines an admin can read."""
    read, left, pairs, unp = summary["read"], summary["left_out"], summary["pairs"], summary["unpaired"]
    by_signal = ", ".join(f"{n} {s}" for s, n in pairs["by_signal"].items())
    dropped = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in summary["dropped_pairs"].items() if n) or "none"
    dropped_u = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in summary["dropped_unpaired"].items() if n) or "none"
    split, timing = summary["split"], summary["timing"]
    return "\n".join(
        [
            f"Read {read['answers']} answers with feedback ({read['votes']} votes) from "
            f"{read['users']} users in {read['prompt_groups']} prompt groups "
            f"({read['paraphrases_merged']} paraphrased wordings merged).",
            f"Left out: {left['opted_out']['answers']} answers and {left['opted_out']['votes']} votes in "
            f"{left['opted_out']['conversations']} conversations marked not for training; "
            f"{left['withdrawn']['answers']} withdrawn answers ({left['withdrawn']['votes']} votes); "
            f"{left.get('disabled', {}).get('answers', 0)} answers and {left.get('disabled', {}).get('votes', 0)} votes "
            "by disabled accounts.",
            f"Contradictory votes dropped: {summary['dropped_votes']['contradictory']}.",
            f"Pairs: {pairs['total']} ({by_signal}); train {pairs['train']}, eval {pairs['eval']}.",
            f"Pairs dropped: {dropped}.",
            f"Unpaired examples: {unp['total']} ({unp['up']} up, {unp['down']} down); "
            f"train {unp['train']}, eval {unp['eval']}. Dropped: {dropped_u}.",
            f"Split: {split['components']} independent components (largest {split['largest_component']} "
            f"records); eval {split['eval_records']} of target {split['eval_target']}"
            + (f", {split['too_big_for_eval']} too big to hold out" if split["too_big_for_eval"] else "")
            + ".",
            f"Took {timing['seconds']:.1f} s ({timing['embedding_seconds']:.1f} s embedding "
            f"{timing['texts_embedded']} texts).",
        ]
    )
