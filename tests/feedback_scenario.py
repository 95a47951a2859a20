"""A feedback database with every signal the app records, built through the store's API.

Used by tests/test_pairs.py and tests/test_export.py. ``TopicEmbedder`` is a fake,
deterministic embedder: texts declared the same topic get identical vectors (cosine 1),
every other text its own orthogonal one (cosine 0).
"""

from __future__ import annotations

import numpy as np

from tuning.grouping import normalize


class TopicEmbedder:
    def __init__(self, same: dict[str, str] | None = None, dim: int = 256):
        self.same = {normalize(k): normalize(v) for k, v in (same or {}).items()}
        self.dim = dim
        self.topics: dict[str, int] = {}
        self.calls: list[list[str]] = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            topic = self.same.get(normalize(t), normalize(t))
            out[i, self.topics.setdefault(topic, len(self.topics)) % self.dim] = 1.0
        return out


def ask(store, user, text, answers, *, system="", conversation=None):
    """One user turn with answers (the 2nd and later are retries); returns (conv, [ids])."""
    cid = conversation or store.create_conversation(user, system_prompt=system)
    history = []
    for turn in store.turns(cid, user):
        if turn.answer is not None:
            history += [
                {"role": "user", "content": turn.message["content"]},
                {"role": "assistant", "content": turn.answer["content"]},
            ]
    prompt = ([{"role": "system", "content": system}] if system else []) + history
    prompt = prompt + [{"role": "user", "content": text}]
    mid = store.add_message(cid, user, text)
    ids = [
        store.log_answer(message_id=mid, user_id=user, prompt=prompt, content=a, model="m")
        for a in answers
    ]
    return cid, ids


# Paraphrases the fake embedder puts together. "What is 2+3?" embeds like "What is 2+2?",
# as MiniLM nearly does (0.89): only the numbers guard keeps them apart.
SAME = {
    "Which city is the capital of France?": "What is the capital of France?",
    "What is 2+3?": "What is 2+2?",
}

NOISY_TOPICS = ["owls", "bees", "cats", "frogs", "whales", "ants"]


def build_scenario(store) -> dict:
    """Fill ``store``; returns the answer ids by name. Comments say what each part tests."""
    ids: dict[str, str] = {}
    # Vote: up and down on retry siblings of one turn.
    _, (ids["A1"], ids["A2"]) = ask(store, "alice", "What is the capital of France?", ["Paris.", "Lyon, I think."])
    store.rate(ids["A1"], "alice", 1)
    store.rate(ids["A2"], "alice", -1)
    # Vote across conversations and users: a paraphrase is the same prompt.
    _, (ids["B1"],) = ask(store, "bob", "Which city is the capital of France?", ["The capital of France is Paris."])
    store.rate(ids["B1"], "bob", 1)
    # Retry: the up-voted sibling over the unvoted one.
    _, (ids["E1"], ids["E2"]) = ask(store, "alice", "How do I boil an egg?", ["Put it in water.", "Boil water, add the egg for 8 minutes, then cool it."])
    store.rate(ids["E2"], "alice", 1)
    # Retry: the kept (shown, unvoted) answer over the down-voted one.
    _, (ids["H1"], ids["H2"]) = ask(store, "carol", "Write a haiku about autumn", ["Leaves.", "Red leaves drift and fall / the maple lets go / quiet ground"])
    store.rate(ids["H1"], "carol", -1)
    # Edit: the rewrite over the original.
    _, (ids["T1"],) = ask(store, "carol", "Translate 'good morning' into Spanish", ["Bonjour"])
    ids["T2"] = store.edit_answer(ids["T1"], "carol", "Buenos días")
    # Withdrawn: an undone retry (with its vote) and an undone edit are not feedback.
    _, (ids["R1"], ids["R2"]) = ask(store, "bob", "Explain recursion simply", ["A function that calls itself.", "Recursion is recursion."])
    store.rate(ids["R2"], "bob", -1)
    store.withdraw_answer(ids["R2"], "bob")
    ids["R3"] = store.edit_answer(ids["R1"], "bob", "A function that solves a problem by calling itself on a smaller one.")
    store.withdraw_answer(ids["R3"], "bob")
    # Unpaired: lone votes; similar embeddings but different numbers stay apart.
    _, (ids["P4"],) = ask(store, "carol", "What is 2+2?", ["4"])
    store.rate(ids["P4"], "carol", 1)
    _, (ids["P6"],) = ask(store, "bob", "What is 2+3?", ["6"])
    store.rate(ids["P6"], "bob", -1)
    # Contradictory votes: the same wording up-voted by one user, down-voted by another.
    _, (ids["C_red_a"],) = ask(store, "alice", "Name a primary colour", ["Red."])
    store.rate(ids["C_red_a"], "alice", 1)
    _, (ids["C_red_b"],) = ask(store, "bob", "Name a primary colour", ["Red"])
    store.rate(ids["C_red_b"], "bob", -1)
    # Contradictory pairs: Whiskers over Tom for alice, Tom over Whiskers for bob.
    _, (ids["K1"], ids["K2"]) = ask(store, "alice", "Suggest a name for a cat", ["Whiskers", "Tom"])
    store.rate(ids["K1"], "alice", 1)
    _, (ids["K3"], ids["K4"]) = ask(store, "bob", "Suggest a name for a cat", ["Tom", "Whiskers"])
    store.rate(ids["K3"], "bob", 1)
    # Opted out: would pair with the France group, but dave said not for training.
    dave, (ids["D1"], ids["D2"]) = ask(store, "dave", "What is the capital of France?", ["Marseille", "Paris is the capital."])
    store.rate(ids["D1"], "dave", -1)
    store.rate(ids["D2"], "dave", 1)
    store.update_conversation(dave, "dave", exclude_from_training=True)
    # Near-duplicates: the same preference asked twice; one pair survives.
    _, (ids["S1"], ids["S2"]) = ask(store, "carol", "Give me a synonym for happy", ["Joyful.", "Sad."])
    store.rate(ids["S1"], "carol", 1)
    store.rate(ids["S2"], "carol", -1)
    _, (ids["S3"], ids["S4"]) = ask(store, "carol", "give me a synonym for HAPPY!", ["joyful", "sad"])
    store.rate(ids["S3"], "carol", 1)
    store.rate(ids["S4"], "carol", -1)
    # No difference: an edit that only adds a full stop.
    _, (ids["I1"],) = ask(store, "bob", "Capital of Italy?", ["Rome"])
    ids["I2"] = store.edit_answer(ids["I1"], "bob", "Rome.")
    # One noisy user: six vote pairs in one conversation; the per-user cap keeps the newest.
    conv = None
    for topic in NOISY_TOPICS:
        conv, (up, down) = ask(store, "noisy", f"Tell me a fact about {topic}", [f"A fact about {topic}.", "No."], conversation=conv)
        store.rate(up, "noisy", 1)
        store.rate(down, "noisy", -1)
        ids[f"N_{topic}"], ids[f"N_{topic}_no"] = up, down
    # A changed mind counts once: alice's newest vote on E1 is "cleared".
    store.rate(ids["E1"], "alice", -1)
    store.rate(ids["E1"], "alice", 0)
    return ids
