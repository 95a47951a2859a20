"""Prompt groups: which logged prompts count as the same question for pairing.

Two prompts are the same when everything before the last user message (persona and
history) is identical and the last user messages say the same thing: the same words after
normalising case and punctuation, or, for messages up to ``max_embed_chars``, sentence
embeddings at least ``same_prompt_similarity`` apart by cosine (and, optionally, the same
numbers). Only the last message is embedded: history holds sampled answers, so two
conversations rarely share it exactly, and a persona or earlier turn that differs really
does change what a good answer is.

Clustering is greedy by first appearance: each message joins the most similar earlier
group leader above the threshold, or leads a new group. Unlike linking every similar pair,
this does not chain ("boil an egg" ~ "boil an egg long" ~ "fry an egg") and a group's id
(a hash of its context and its oldest wording) stays the same as new data arrives.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass

import numpy as np

from store.rows import hash_prompt

from .embeddings import Embedder

_WORD = re.compile(r"\w+")
_NUMBER = re.compile(r"\d+")


def normalize(text: str) -> str:
    """Case, punctuation and spacing removed: 'What's 2+2?' and 'whats 2 2' are one text."""
    return " ".join(_WORD.findall(text.casefold()))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Grouping:
    group_of: dict[str, str]  # prompt hash (store.rows.hash_prompt, as answers.prompt_hash) -> group id
    groups: int
    merged_by_embedding: int  # distinct wordings that joined another wording's group
    texts_embedded: int
    embed_seconds: float


def _split(prompt: list[dict]) -> tuple[str, str]:
    """(hash of the context before the last user message, that message's text)."""
    if prompt and prompt[-1].get("role") == "user":
        return hash_prompt(prompt[:-1]), prompt[-1]["content"]
    return hash_prompt(prompt), ""


def group_prompts(
    prompts: list[list[dict]],
    embedder: Embedder,
    similarity: float,
    max_embed_chars: int,
    numbers_must_match: bool,
) -> Grouping:
    """Group prompts given oldest first (the order decides which wording leads a group)."""
    # context hash -> normalized text -> (first original text, prompt hashes)
    buckets: dict[str, dict[str, tuple[str, list[str]]]] = {}
    for prompt in prompts:
        key = hash_prompt(prompt)
        context, text = _split(prompt)
        wordings = buckets.setdefault(context, {})
        wordings.setdefault(normalize(text), (text, []))[1].append(key)

    # Embed, in one batch, only wordings that have a short neighbour in the same context.
    to_embed: list[str] = []
    for wordings in buckets.values():
        short = [t for norm, (t, _) in wordings.items() if len(t) <= max_embed_chars]
        if len(short) > 1:
            to_embed.extend(short)
    start = time.perf_counter()
    vectors = embedder(to_embed) if to_embed else np.zeros((0, 1), dtype=np.float32)
    embed_seconds = time.perf_counter() - start
    vector_of = dict(zip(to_embed, vectors))

    group_of: dict[str, str] = {}
    groups = merged = 0
    for context, wordings in buckets.items():
        leaders = _Leaders(similarity, numbers_must_match)
        for norm, (text, keys) in wordings.items():
            leader = leaders.find(text, vector_of.get(text))
            if leader is None:
                leader = _sha(context + "\n" + norm)[:16]
                leaders.add(leader, text, vector_of.get(text))
                groups += 1
            else:
                merged += 1
            for key in keys:
                group_of[key] = "g" + leader
    return Grouping(group_of, groups, merged, len(to_embed), embed_seconds)


class _Leaders:
    """Group leaders of one context, searched by cosine similarity."""

    def __init__(self, similarity: float, numbers_must_match: bool):
        self.similarity = similarity
        self.numbers_must_match = numbers_must_match
        self.ids: list[str] = []
        self.numbers: list[tuple[str, ...]] = []
        self._matrix: np.ndarray | None = None  # [capacity, dim]; the first len(ids) rows used

    def find(self, text: str, vector: np.ndarray | None) -> str | None:
        if vector is None or not self.ids:
            return None
        sims = self._matrix[: len(self.ids)] @ vector  # [leaders]
        close = np.flatnonzero(sims >= self.similarity)
        numbers = tuple(sorted(_NUMBER.findall(text)))
        for i in close[np.argsort(-sims[close], kind="stable")]:
            if not self.numbers_must_match or self.numbers[i] == numbers:
                return self.ids[i]
        return None

    def add(self, leader: str, text: str, vector: np.ndarray | None) -> None:
        if vector is None:
            return  # a long or lone wording: matched by exact text only
        n = len(self.ids)
        if self._matrix is None or n == len(self._matrix):
            grown = np.zeros((max(16, 2 * n), len(vector)), dtype=np.float32)
            if self._matrix is not None:
                grown[:n] = self._matrix
            self._matrix = grown
        self._matrix[n] = vector
        self.ids.append(leader)
        self.numbers.append(tuple(sorted(_NUMBER.findall(text))))
