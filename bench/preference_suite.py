"""The preference suite: kinds of preference a user teaches by editing answers, each taught
through the real store, pair builder, trainer and gate, and checked on held-out questions.

    .venv/bin/python bench/preference_suite.py                    # every kind, defaults
    .venv/bin/python bench/preference_suite.py --kinds opening closing --edits 128
    .venv/bin/python bench/preference_suite.py --thumbs --edits 128   # a thumbs-only deployment (KTO)

For each kind: 4 users ask questions (``tuning.synthetic.mixed_prompts``: definitions, tips,
whys, short facts and instructions), see the base model's
greedy answer (on-policy, as the app shows it) and edit it by the kind's rewrite rule; the
store's feedback becomes pairs (``build_preferences``), one job trains with the default
recipe (``TrainConfig()``) and the default gate decides (``GateConfig()``). Then the
version and the base answer 32 held-out questions (never asked in training) greedily in
float32, and the kind's checker counts the answers that follow the preference. Prints one
table. Not a test: nothing is asserted.

``--thumbs``: a deployment where users only vote. Each user sees one answer per question and
votes it up when it follows the preference, down when not; nobody edits, so there are no
pairs and the job trains by KTO (``objective`` auto) and is judged by the KTO gate. The
base model rarely follows a preference on its own, so half the answers shown are the
kind's rewrite of the base answer (standing in for the sampled answers that happen to
follow it) and half the base answer itself. At most 256 votes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tuning.pairs import whole_sentences  # noqa: E402
from tuning.synthetic import QUESTION_SETS, first_sentence, is_one_sentence, spread  # noqa: E402

OPENING = "Great question!"
CLOSING = "I hope this helps."
QUESTION = "Would you like to know more?"


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def _whole_sentences(answer: str) -> str:
    """The answer without a last sentence cut off by the token limit (a user adding a
    closing sentence also ends the answer properly); its line breaks kept as they were."""
    return whole_sentences(answer)


def _as_list(answer: str) -> str:
    return "\n".join(f"- {s}" for s in _sentences(_whole_sentences(answer))[:4])


def _is_list(answer: str) -> bool:
    lines = [ln for ln in answer.strip().splitlines() if ln.strip()]
    return len(lines) >= 2 and all(ln.lstrip().startswith(("- ", "* ", "• ")) for ln in lines)


@dataclass(frozen=True)
class Kind:
    name: str
    rewrite: Callable[[str], str]  # the user's edit of a shown answer
    follows: Callable[[str], bool]  # does an answer follow the preference?
    # Bad feedback the gate must refuse: rewrite takes (answer, edit number) and may return
    # None (that user does not edit).
    bad: bool = False

    def edit(self, answer: str, i: int) -> str | None:
        """The ``i``-th user's edit of ``answer`` (None: that user does not edit)."""
        return self.rewrite(answer, i) if self.bad else self.rewrite(answer)


FILLER = "This is an important point to remember."


def _flipped(answer: str, i: int) -> str:
    """Labels flipped: the "preferred" answer is the shown one made worse (its words in reverse order)."""
    return " ".join(reversed(answer.split()))


def _padded(answer: str, i: int) -> str:
    """Length hacking: the same answer padded with an empty sentence, three times."""
    return f"{answer.strip()} {FILLER} {FILLER} {FILLER}"


def _one_noisy_user(answer: str, i: int) -> str | None:
    """One user of four edits, into noise (cut mid-word, letters swapped); the others do not edit."""
    if i % 4:
        return None
    cut = answer[: max(8, len(answer) // 3)]
    return "".join(c.upper() if k % 3 == 0 else c for k, c in enumerate(cut[::-1]))


def _contradictory(answer: str, i: int) -> str:
    """Two users want one sentence; the other two want the answer repeated at more length."""
    return first_sentence(answer) if i % 4 < 2 else f"{answer.strip()} In other words, {answer.strip()}"


def _reversed(answer: str) -> bool:  # a reversed answer starts with what was its last word
    words = answer.split()
    return bool(words) and words[0].endswith((".", "!", "?"))


def _noisy(answer: str) -> bool:  # capitals inside words, as the noisy user typed them
    return any(w[1:] != w[1:].lower() and w[1:] != w[1:].upper() for w in answer.split())


KINDS = {k.name: k for k in [
    Kind("shorter", first_sentence, is_one_sentence),
    Kind("opening", lambda a: f"{OPENING} {a.strip()}", lambda a: a.strip().startswith(OPENING)),
    Kind("closing", lambda a: f"{_whole_sentences(a)} {CLOSING}", lambda a: a.strip().endswith(CLOSING)),
    Kind("list", _as_list, _is_list),
    Kind("question", lambda a: f"{first_sentence(a)} {QUESTION}", lambda a: a.strip().endswith(QUESTION)),
    Kind("bad: flipped", _flipped, _reversed, bad=True),
    Kind("bad: length hacking", _padded, lambda a: FILLER in a, bad=True),
    Kind("bad: one noisy user", _one_noisy_user, _noisy, bad=True),
    Kind("bad: contradictory users", _contradictory, is_one_sentence, bad=True),
]}
GOOD = [k for k, v in KINDS.items() if not v.bad]
BAD = [k for k, v in KINDS.items() if v.bad]


def greedy(model, tokenizer, questions: list[str], tokens: int, frequency_penalty: float = 0.0) -> list[str]:
    from tuning.generation import greedy_answers

    return [a for a, _ in greedy_answers(model, tokenizer, [[{"role": "user", "content": q}] for q in questions],
                                         max_new_tokens=tokens, frequency_penalty=frequency_penalty)]


MAX_VOTES = 256


def run_kind(kind: Kind, model_dir: Path, shown: list[tuple[str, str]], held_q: list[str], base_held: list[str],
             work: Path, tokens: int, settings: dict, thumbs: bool = False, held_tokens: int | None = None,
             penalty: float = 0.0, prepared: bool = False) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from assistant.paths import DataPaths
    from store import Store
    from tuning.config import TrainConfig
    from tuning.gate import GateConfig
    from tuning.pairs import PairConfig, build_preferences
    from tuning.trainer import train_adapter

    data = work / kind.name
    store = Store(DataPaths(data).database)
    tok = AutoTokenizer.from_pretrained(model_dir)
    for i, (question, answer) in enumerate(shown):
        user = f"user{i % 4}"
        cid = store.create_conversation(user)
        mid = store.add_message(cid, user, question)
        if thumbs:  # one answer shown, one vote: up when it follows the preference
            answer = kind.rewrite(answer) if i % 2 == 0 else answer
        # Cut by the token limit, as the app records it (re-tokenized text: within a few
        # tokens of the limit; answers that ended by themselves here stop 20 or more short).
        cut = len(tok(answer)["input_ids"]) >= tokens - 4
        aid = store.log_answer(message_id=mid, user_id=user, prompt=[{"role": "user", "content": question}],
                               content=answer, model=model_dir.name, finish_reason="length" if cut else "stop")
        if thumbs:
            store.rate(aid, user, 1 if kind.follows(answer) else -1)
            continue
        edit = kind.edit(answer, i)
        if edit is not None and edit.strip() != answer.strip():
            store.edit_answer(aid, user, edit)
    ahead = None
    if prepared:  # what the app does while idle once feedback grew (loop.jobs.Preparer)
        from tuning.prepare import prepare

        t0 = time.monotonic()
        ahead = {**prepare(store, data, model_dir, TrainConfig().replace(**settings), GateConfig()),
                 "seconds": round(time.monotonic() - t0, 1)}
    prefs = build_preferences(store, PairConfig())
    train, held = [asdict(p) for p in prefs.train_pairs], [asdict(p) for p in prefs.eval_pairs]
    votes, held_votes = [asdict(u) for u in prefs.train_unpaired], [asdict(u) for u in prefs.eval_unpaired]
    start = time.monotonic()
    marks: dict = {}  # job seconds when the first and the last step ended, and the phases

    def progress(row: dict) -> None:
        if row.get("phase") == "training" and "step" in row and "loss" in row:  # later rows keep the last step's keys
            marks.setdefault("first step", row["job_seconds"])
            marks["last step"] = row["job_seconds"]
        marks["phases"] = row.get("phases", [])

    result = train_adapter(train, held, store=store, data_dir=data, base_model_dir=model_dir,
                           config=TrainConfig().replace(**settings), gate_config=GateConfig(), created_by="bench",
                           votes=votes, eval_votes=held_votes, progress=progress)
    job_s = time.monotonic() - start
    if result.status != "succeeded":
        return {"kind": kind.name, "error": result.error}
    row = store.adapter(result.version)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      DataPaths(data).version_folder(row))
    answers = greedy(model, tok, held_q, held_tokens or tokens, penalty)
    ev = row["eval_json"]
    words = lambda xs: round(sum(len(x.split()) for x in xs) / len(xs), 1)  # noqa: E731
    return {
        "kind": kind.name, "edits": len(shown), "train pairs": len(train), "held-out pairs": len(held),
        "objective": row["metrics_json"].get("objective"), "train votes": len(votes), "held-out votes": len(held_votes),
        "up": row["metrics_json"].get("votes_up"), "down": row["metrics_json"].get("votes_down"),
        "base follows": sum(map(kind.follows, base_held)), "version follows": sum(map(kind.follows, answers)),
        "held-out": len(held_q), "words base": words(base_held), "words version": words(answers),
        # where the preference puts the length: the users' rule applied to the base's held-out answers
        "words edit": words([a if e is None else e for a, e in ((a, kind.edit(a, i)) for i, a in enumerate(base_held))]),
        "regression": f"{ev['golden_passed']}/{ev['golden_total']} (live {ev['live']['golden_passed']})",
        "gate": "passed" if result.gate.passed else "refused: " + ", ".join(
            c["check"] for c in result.gate.checks if not c["passed"]),
        "steps": row["metrics_json"].get("steps"), "train s": row["train_seconds"], "job s": round(job_s),
        # where the job's time went: loading and the replayed answers and the reference pass before
        # the first step ended, the steps, then saving and the gate ("evaluating")
        "phases": marks.get("phases"), "first step s": marks.get("first step"), "last step s": marks.get("last step"),
        **({"prepared ahead": ahead} if ahead else {}),
        "gate s": ev.get("seconds"),  # the base's log-ratios, each version's log-ratios and answers
        "examples": [f"{q} -> {a[:100]}" for q, a in zip(held_q[:2], answers[:2])],
        "answers": answers,
        # held-out answers that do not follow, by their ends (where a closing would be)
        "misses": [f"{q} -> ...{a[-90:]}" for q, a in zip(held_q, answers) if not kind.follows(a)][:4],
        "refused because": [c["detail"] for c in result.gate.checks if not c["passed"]],
        "now wrong": {q: g["answer"][:120] for q, g in ev["golden"].items()
                      if not g["passed"] and ev["live"]["golden"].get(q, {}).get("passed")},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", nargs="+", default=GOOD, choices=list(KINDS) + ["good", "bad"],
                   help="kinds to teach (default: the good ones); 'bad' adds the corrupted feedback the gate must refuse")
    p.add_argument("--edits", type=int, default=128, help="edited (or, with --thumbs, voted) answers per kind (4 users)")
    p.add_argument("--thumbs", action="store_true",
                   help=f"users only vote (up when an answer follows the preference): KTO, at most {MAX_VOTES} votes")
    p.add_argument("--held-out", type=int, default=32)
    p.add_argument("--questions", choices=list(QUESTION_SETS), default="mixed",
                   help="what users ask in training: 'mixed' (default since 2026-12-06): the edits spread over "
                        "definitions, tips, whys, short facts and instructions (tuning.synthetic.mixed_prompts); "
                        "'plain': the first questions of tuning.synthetic.prompts (definitions, tips, whys), "
                        "as the runs before 2026-12-06")
    p.add_argument("--tokens", type=int, default=64, help="tokens per shown and held-out answer")
    p.add_argument("--held-out-tokens", type=int, default=None,
                   help="tokens per held-out answer of the version (default: --tokens). The users' edits of "
                        "--tokens answers plus what they add can be longer than --tokens (the app serves 256): a "
                        "version that answers at their length is cut before an added closing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a TrainConfig setting for every kind, as app.py train takes it")
    p.add_argument("--cache", type=Path, default=None,
                   help="keep the base model's greedy answers here and reuse them on the next run")
    p.add_argument("--served", action="store_true",
                   help="the version's held-out answers with the server's frequency penalty (assistant.engine.Sampling), "
                        "as users get them greedily; default: plain greedy, as every run before 2026-12-07")
    p.add_argument("--answers", type=Path, default=None,
                   help="write each kind's held-out questions, the base's and the version's answers here (JSON)")
    p.add_argument("--prepared", action="store_true",
                   help="before each job, run tuning.prepare on the users' store, as the app does while idle "
                        "(replayed answers, the pairs' reference, the live version's regression answers); "
                        "the row says what it did and how long it took")
    p.add_argument("--models-dir", type=Path, default=Path(os.environ.get("ASSISTANT_MODELS_DIR", ROOT / "data" / "models")))
    a = p.parse_args()
    if a.thumbs and a.edits > MAX_VOTES:
        p.error(f"--thumbs takes at most {MAX_VOTES} votes (--edits)")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from assistant.model_files import prepare_embedded_model
    from assistant.precision import machine_format

    from tuning.train import _value

    settings = {k: _value(v) for k, v in (s.split("=", 1) for s in a.set)}
    from assistant.engine import Sampling

    penalty = Sampling().frequency_penalty if a.served else 0.0
    a.kinds = [k for name in a.kinds for k in ({"good": GOOD, "bad": BAD}.get(name) or [name])]
    if a.thumbs and any(KINDS[k].bad for k in a.kinds):
        p.error("--thumbs teaches the good kinds only")
    model_dir = prepare_embedded_model(a.models_dir)
    qs = QUESTION_SETS[a.questions]()
    held_q, pool = qs[: a.held_out], qs[a.held_out :]
    train_q = spread(pool, a.edits) if a.questions == "mixed" else pool[: a.edits]
    key = f"{a.tokens}/{a.held_out}/{a.edits}" + ("/mixed" if a.questions == "mixed" else "")
    cached = json.loads(a.cache.read_text()) if a.cache and a.cache.exists() else {}
    base = []  # the base model, loaded once and only when something must be answered

    def base_answers(questions: list[str], frequency_penalty: float = 0.0) -> list[str]:
        if not base:
            base.append((AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                         AutoTokenizer.from_pretrained(model_dir)))
        return greedy(*base[0], questions, a.tokens, frequency_penalty)

    if cached.get("key") == key:
        shown_answers, base_held = cached["shown"], cached["base_held"]
    else:
        shown_answers, base_held = base_answers(train_q), base_answers(held_q)
        if a.cache:
            a.cache.write_text(json.dumps({"key": key, "shown": shown_answers, "base_held": base_held}))
    if a.served:  # the base's held-out answers as served too (the users' shown answers stay as cached)
        base_held = base_answers(held_q, penalty)
    base.clear()
    shown = list(zip(train_q, shown_answers))
    rows = []
    with tempfile.TemporaryDirectory(prefix="preference-suite-") as tmp:
        for name in a.kinds:
            rows.append(run_kind(KINDS[name], model_dir, shown, held_q, base_held, Path(tmp), a.tokens, settings,
                                 a.thumbs, a.held_out_tokens, penalty, a.prepared))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "answers"}), flush=True)
    if a.answers:
        a.answers.write_text(json.dumps({r["kind"]: [{"question": q, "base": b, "version": v} for q, b, v in
                                                     zip(held_q, base_held, r["answers"])]
                                         for r in rows if "answers" in r}, indent=1))
    fmt = machine_format(settings.get("dtype", "auto"))
    print(f"\n{time.strftime('%Y-%m-%d')}; training in {fmt.describe()}; held-out answers greedy in float32"
          + (f" with the server's frequency penalty {penalty}" if penalty else "") + ", "
          f"{a.tokens} tokens (the version's: {a.held_out_tokens or a.tokens}); TrainConfig {settings or 'defaults'}, default GateConfig")
    data_col = "votes -> train (up/down)/held-out votes" if a.thumbs else "edits -> train/held-out pairs"
    print(f"| preference | {data_col} | follows: base | follows: version | words base -> version (users' edit) "
          "| regression set | gate | steps, train s (job with gate) |")
    print("| --- | --- | ---: | ---: | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['kind']} | job failed: {r['error']} | | | | | | |")
            continue
        data = (f"{r['edits']} -> {r['train votes']} ({r['up']}/{r['down']})/{r['held-out votes']}, {r['objective']}"
                if a.thumbs else f"{r['edits']} -> {r['train pairs']}/{r['held-out pairs']}")
        print(f"| {r['kind']} | {data} | {r['base follows']}/{r['held-out']} "
              f"| {r['version follows']}/{r['held-out']} | {r['words base']} -> {r['words version']} (edit {r['words edit']}) "
              f"| {r['regression']} | {r['gate']} | {r['steps']}, {r['train s']:.0f} ({r['job s']}) |")
    judged = [(r, KINDS[r["kind"]].bad) for r in rows if "error" not in r]
    good = [r for r, bad in judged if not bad]
    bad = [r for r, bad in judged if bad]
    print(f"\nThe gate passed {sum(r['gate'] == 'passed' for r in good)} of {len(good)} versions taught by good feedback "
          f"and refused {sum(r['gate'] != 'passed' for r in bad)} of {len(bad)} taught by bad feedback.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
