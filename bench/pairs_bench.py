"""Benchmark: build preference data from 10,000 rated answers, embeddings included.

    .venv/bin/python bench/pairs_bench.py                  # fill a temp store, then build
    .venv/bin/python bench/pairs_bench.py --answers 2000   # smaller
    .venv/bin/python bench/pairs_bench.py --db /tmp/b.db   # keep (or reuse) the filled file

The store is filled through its own API (conversations with personas, 1-3 turns, retries,
edits, undone answers, opted-out conversations, paraphrased and unique questions, one
noisy user) in a child process, so the peak RSS printed is the build's alone (the Python
interpreter, sentence-transformers and all-MiniLM-L6-v2 included). Prints the time in
total and for embeddings, peak RSS and the pair counts. Timings on a shared CPU are noisy:
read them as figures, not as a pass/fail.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SUBJECTS = [
    "photosynthesis", "the French Revolution", "black holes", "compound interest", "the water cycle",
    "machine learning", "the Roman Empire", "climate change", "DNA replication", "supply and demand",
    "the stock market", "quantum computing", "volcanoes", "the immune system", "inflation",
    "plate tectonics", "the internet", "vaccines", "electric cars", "the moon landing",
    "sourdough bread", "the Pythagorean theorem", "jazz music", "the Great Wall of China", "honey bees",
    "solar panels", "the printing press", "earthquakes", "coral reefs", "blockchain",
]
TEMPLATES = [
    "What is {s}?", "Can you explain {s}?", "Tell me about {s}.", "Explain {s} to me.",
    "I'd like to know about {s}.", "what's {s}", "Give me an overview of {s}.", "Describe {s} briefly.",
]
VERBS = ["fix", "clean", "paint", "cook", "plan", "sort", "store", "measure", "build", "choose"]
NOUNS = ["bike", "garden", "kitchen", "budget", "trip", "closet", "desk", "fence", "soup", "playlist",
         "resume", "aquarium", "roof", "laptop", "party", "lawn", "library", "shelf", "tent", "car"]
EXTRAS = ["on a budget", "quickly", "for a beginner", "with kids", "in winter", "without tools",
          "in a small flat", "for the first time", "step by step", "safely"]
PERSONAS = ["", "", "", "You are a concise assistant.", "You are a friendly tutor."]
FOLLOW_UPS = ["Can you say more?", "Why?", "Give me an example.", "Shorter, please."]


def _question(rng: random.Random) -> str:
    if rng.random() < 0.5:  # a common question in one of several wordings
        return rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS))
    return f"How do I {rng.choice(VERBS)} a {rng.choice(NOUNS)} {rng.choice(EXTRAS)}?"


def _answer(rng: random.Random, question: str) -> str:
    words = question.rstrip("?.").split()
    return " ".join(rng.choice(words) for _ in range(rng.randint(8, 40))).capitalize() + "."


def fill(path: str, rated_target: int, seed: int = 0) -> dict:
    """Chat and give feedback through the store API until ``rated_target`` answers are rated."""
    from store import Store

    rng = random.Random(seed)
    store = Store(path)
    users = [f"user{i:02d}" for i in range(40)]
    rated = answers = conversations = 0
    while rated < rated_target:
        user = "noisy" if rng.random() < 0.15 else rng.choice(users)
        persona = rng.choice(PERSONAS)
        cid = store.create_conversation(user, system_prompt=persona)
        conversations += 1
        history: list[dict] = []
        for turn in range(rng.choice([1, 1, 1, 2, 2, 3])):
            text = _question(rng) if turn == 0 else rng.choice(FOLLOW_UPS)
            prompt = ([{"role": "system", "content": persona}] if persona else []) + history
            prompt = prompt + [{"role": "user", "content": text}]
            mid = store.add_message(cid, user, text)
            ids = [
                store.log_answer(message_id=mid, user_id=user, prompt=prompt, content=_answer(rng, text), model="m")
                for _ in range(2 if rng.random() < 0.3 else 1)  # a retry
            ]
            answers += len(ids)
            for aid in ids:
                if rng.random() < 0.85 and rated < rated_target:
                    store.rate(aid, user, 1 if rng.random() < 0.55 else -1)
                    rated += 1
            shown = ids[-1]
            if rng.random() < 0.08:
                shown = store.edit_answer(ids[-1], user, _answer(rng, text) + " (edited)")
            if len(ids) > 1 and rng.random() < 0.05:
                store.withdraw_answer(ids[-1], user)  # undo the retry
                shown = ids[0]
            history += [{"role": "user", "content": text},
                        {"role": "assistant", "content": store.answer(shown, user)["content"]}]
        if rng.random() < 0.02:
            store.update_conversation(cid, user, exclude_from_training=True)
    return {"conversations": conversations, "answers": answers, "rated": rated}


def _fill_child(path: str, rated: int, queue) -> None:
    start = time.perf_counter()
    counts = fill(path, rated)
    queue.put({**counts, "seconds": time.perf_counter() - start})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--answers", type=int, default=10_000, help="rated answers to create")
    p.add_argument("--db", default=None, help="database file to fill (reused if it exists)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for embedding (0: torch's default)")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = None
    if a.db is None:
        # Filling goes through the store API, one commit per call: tmpfs keeps that quick.
        tmp = tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
        a.db = str(Path(tmp.name) / "assistant.db")
    if not Path(a.db).exists():
        queue = mp.get_context("spawn").Queue()
        child = mp.get_context("spawn").Process(target=_fill_child, args=(a.db, a.answers, queue))
        child.start()
        filled = queue.get()
        child.join()
        print(f"filled: {filled['conversations']} conversations, {filled['answers']} answers, "
              f"{filled['rated']} rated, in {filled['seconds']:.0f} s (store API)")

    from store import Store
    from tuning.embeddings import MiniLMEmbedder
    from tuning.pairs import PairConfig, build_preferences, format_summary

    store = Store(a.db)
    embedder = MiniLMEmbedder(threads=a.threads or None)
    # Cold: a fresh process pays for importing sentence-transformers and loading the model.
    # Warm: the same build again in a process that already has them (a long-lived admin).
    for run in ("cold", "warm"):
        start = time.perf_counter()
        data = build_preferences(store, PairConfig(), embedder)
        total = time.perf_counter() - start
        s = data.summary
        if run == "cold":
            print(format_summary(s))
        print(f"build_preferences ({run}): {total:.1f} s total, {s['timing']['embedding_seconds']:.1f} s "
              f"embedding {s['timing']['texts_embedded']} texts")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_mib:.0f} MiB (interpreter, store, sentence-transformers and model included)")
    print(f"pairs {s['pairs']['total']} {s['pairs']['by_signal']}, unpaired {s['unpaired']['total']}, "
          f"dropped {s['dropped_pairs']}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
