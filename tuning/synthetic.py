"""A learnable synthetic preference, for the end-to-end tests and the benchmark.

"Users prefer one-sentence answers": the rejected answer is the model's own greedy answer
(on-policy, as real feedback is), the chosen one is its first sentence (what a user's edit
that deletes the rest would say). Whether a version learned it is judged on what it
*generates* (``is_one_sentence``), not only on its scores.

Measured first, on SmolLM2-135M with 64 pairs x 2 epochs: "answers end with a sign-off"
did not move generations. Chosen = answer cut at its last full sentence + "Hope this
helps!" (lr 5e-5): 0 of 24 held-out answers changed. Chosen = first sentence + the sign-off
(lr 1e-4): answers halved to one sentence, but 0 of 24 carried the sign-off. Ending sooner
is learned from a few dozen pairs; new words at the end need more data or steps.
"""

from __future__ import annotations

import re


_THINGS = [
    "volcano", "rainbow", "noun", "glacier", "comet", "desert", "vaccine", "battery",
    "compass", "telescope", "thermometer", "calendar", "library", "museum", "bridge",
    "river", "forest", "island", "planet", "robot", "recipe", "poem", "budget", "habit",
    "password", "browser", "spreadsheet", "microscope", "magnet", "hurricane", "tornado",
    "coral reef", "bicycle", "piano", "marathon", "garden", "passport", "airport",
    "sandwich", "umbrella",
]
_ACTIVITIES = [
    "sleeping better", "learning a language", "saving money", "staying focused",
    "cooking rice", "running a first 5k", "writing an email", "keeping plants alive",
    "reading more books", "drinking more water", "waking up early", "packing a suitcase",
    "studying for an exam", "making new friends", "cleaning a kitchen", "taking notes",
    "staying warm in winter", "learning to draw", "speaking in public", "staying calm",
    "walking a dog", "baking bread", "planning a trip", "organizing a desk",
    "starting to exercise", "learning to swim", "remembering names", "painting a room",
    "growing tomatoes", "writing a story",
]
_WHYS = [
    "Why do leaves change color in autumn?", "Why do birds migrate?", "Why do cats purr?",
    "Why do we need sleep?", "Why is the sea salty?", "Why does bread rise?",
    "Why does ice float on water?", "Why do onions make us cry?", "Why do stars twinkle?",
    "Why do we yawn?", "Why do dogs wag their tails?", "Why does metal feel cold?",
    "Why do apples turn brown?", "Why do bees make honey?", "Why do we get hiccups?",
    "Why do clouds float?", "Why do plants need sunlight?", "Why do people snore?",
    "Why do bubbles pop?", "Why do rivers flow to the sea?",
]


def prompts() -> list[str]:
    """About 150 varied user questions, none of them a golden prompt of the gate."""
    qs = [f"What is a {t}?" for t in _THINGS]
    qs += [f"Give me one tip for {a}." for a in _ACTIVITIES]
    qs += _WHYS
    qs += [f"Describe a {t} in simple words." for t in _THINGS]
    qs += [f"How do I get better at {a}?" for a in _ACTIVITIES[:20]]
    return qs


# Short facts and instructions, and more open questions: what a deployment's users also ask
# (``mixed_prompts``). None is a question of the gate's regression set or fragile set, nor of
# the general questions jobs replay (``tuning.general``), nor the same fact asked in other
# words: other countries, elements, words and sums (tests/test_gate.py checks the first
# three).
_NEW_CAPITALS = ["Vietnam", "Indonesia", "Colombia", "Ukraine", "Iceland", "New Zealand", "Morocco", "Cuba",
                 "Nigeria", "the Czech Republic", "Romania", "Croatia", "the Philippines", "Pakistan", "Venezuela",
                 "Ethiopia"]
_NEW_LANGUAGES = ["Vietnam", "Iran", "Israel", "Iceland", "Romania", "Ukraine"]
_NEW_SYMBOLS = ["zinc", "tin", "mercury", "sulfur", "neon", "chlorine", "uranium", "platinum"]
_NEW_OPPOSITES = ["inside", "true", "win", "north", "asleep", "buy", "question", "remember"]
_QUICK = [
    "How many planets are in the solar system?", "What is the smallest planet in the solar system?",
    "How many players are on a soccer team?", "How many strings does a violin have?",
    "What is the hardest natural substance?", "Which animal has a trunk?", "What do caterpillars turn into?",
    "How many bones are in the adult human body?", "Who discovered penicillin?", "Who painted The Starry Night?",
    "Who invented the telephone?", "What is the main ingredient in guacamole?", "How many seconds are in a minute?",
    "What is the closest star to Earth?", "How many wheels does a tricycle have?", "What do pandas mostly eat?",
    "Translate 'please' into German.", "Say goodnight in Italian.", "Write the number seventy in digits.",
    "Convert 3 kilograms to grams.", "Convert 5 minutes to seconds.", "Give me a synonym for 'quick'.",
    "Spell the word 'rhythm'.", "Name three colors of the rainbow.", "Name two planets.",
    "Complete the sentence: Better late than...", "Rewrite in the plural: The cat sleeps.", "Is 9 a prime number?",
    "What is 7 + 8?", "What is 9 times 4?", "What is 50 minus 15?",
    "Sort these words alphabetically: pear, apple, mango.", "What is the plural of 'leaf'?",
    "Summarize in one sentence: The children played in the park until it got dark.",
]
_WORKS = ["compass", "telescope", "thermometer", "battery", "magnet", "microscope", "bicycle", "piano", "vaccine",
          "calendar", "bridge", "volcano", "rainbow", "hurricane", "glacier"]


def mixed_prompts() -> list[str]:
    """``prompts`` first (so its first questions stay the preference suite's held-out ones),
    then short facts and instructions (capitals, languages, symbols, opposites, sums,
    translations) and more open questions: about 330 in all, for benchmarks whose users
    ask what a deployment's users ask, not definitions, tips and whys alone."""
    qs = prompts()
    qs += [f"What is the capital of {c}?" for c in _NEW_CAPITALS]
    qs += [f"What language is spoken in {c}?" for c in _NEW_LANGUAGES]
    qs += [f"What is the chemical symbol for {e}?" for e in _NEW_SYMBOLS]
    qs += [f"What is the opposite of {w}?" for w in _NEW_OPPOSITES]
    qs += _QUICK
    qs += [f"How does a {t} work?" for t in _WORKS]
    qs += [f"What are the benefits of {a}?" for a in _ACTIVITIES]
    qs += [f"What should I know before {a}?" for a in _ACTIVITIES]
    qs += [f"What are common mistakes when {a}?" for a in _ACTIVITIES]
    return qs


# What a benchmark's users ask, by the name its ``--questions`` flag takes: ``mixed`` (the
# default since 2026-12-06) or ``plain`` (definitions, tips and whys, as the runs before).
QUESTION_SETS = {"mixed": mixed_prompts, "plain": prompts}


def spread(pool: list[str], count: int) -> list[str]:
    """``count`` questions taken evenly across ``pool`` (all of it when it has no more), so
    that a small set still holds every shape of question the pool has."""
    return [pool[i * len(pool) // count] for i in range(count)] if count < len(pool) else list(pool)


# A sentence ends at . ! or ? before a space or the end, except the number that opens a
# numbered line ("1. Rinse the rice."): before 2026-12-07 the "shorter" users of
# bench/preference_suite.py cut "...mistakes to avoid:\n\n1. Rinse..." to "...avoid:\n\n1.",
# and "1." alone counted as one sentence.
_SENTENCE_END = re.compile(r"(?<!^\d)(?<!^\d\d)[.!?](?=\s|$)", re.M)


def first_sentence(answer: str) -> str:
    """The answer up to and including its first sentence end (all of it if it has none)."""
    end = _SENTENCE_END.search(answer)
    return answer[: end.end()].strip() if end else answer.strip()


def is_one_sentence(answer: str) -> bool:
    """One complete sentence and nothing after it."""
    text = answer.strip()
    ends = list(_SENTENCE_END.finditer(text))
    return len(ends) == 1 and ends[0].end() == len(text)
