"""Several rounds: a simulated user with a hidden preference edits each answer toward it,
the loop retrains from all feedback so far, the gate decides, a passed version goes live.

    .venv/bin/python bench/rounds_bench.py --kind opening --rounds 3
    .venv/bin/python bench/rounds_bench.py --kind closing --set learning_rate=2e-4

Each round, 4 users ask a fresh set of questions (``tuning.synthetic.mixed_prompts``:
definitions, tips, whys, short facts and instructions; each round's set taken evenly across
them and disjoint from every other round's; ``--questions plain``: the first of
``tuning.synthetic.prompts`` in order, as before 2026-12-06) and read the live version's greedy answer (float32, as the gate
generates; the base model before any version is live); each user edits every answer by
the preference's rewrite rule (``bench/preference_suite.py``). Measured per round, on that
round's answers: the share that already follow the preference, and the mean edit distance
between the answer shown and the user's edit (words, Levenshtein, the measure of PRELUDE /
CIPHER, Gao et al. 2024). Then one job trains from all feedback so far through the real
store, pair builder, trainer and gate (``TrainConfig`` defaults unless ``--set``), and a
version the gate passes is promoted. After the last round one more set of questions
measures where the user ends up. The gap closed after round r is
``1 - distance(r + 1) / distance(1)``: 0 when nothing was learned, 1 when the user no
longer edits. Prints one table. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from preference_suite import GOOD, KINDS, greedy  # noqa: E402
from tuning.synthetic import QUESTION_SETS, spread  # noqa: E402


def edit_distance(answer: str, edit: str) -> int:
    """Words inserted, deleted or replaced to turn the answer into the user's edit."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.distance(answer.split(), edit.split())


def answers_of(model_dir: Path, data: Path, store, version: int | None, questions: list[str], tokens: int) -> list[str]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from assistant.paths import DataPaths

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if version is not None:
        model = PeftModel.from_pretrained(model, DataPaths(data).version_folder(store.adapter(version)))
    return greedy(model, tok, questions, tokens)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", default="opening", choices=GOOD, help="the user's hidden preference")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-round", type=int, default=28, help="questions each round (4 users)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--questions", choices=list(QUESTION_SETS), default="mixed",
                   help="what users ask: 'mixed' (default): every round's set spread over definitions, tips, whys, "
                        "short facts and instructions; 'plain': definitions, tips and whys in order")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a TrainConfig setting")
    p.add_argument("--promote-refused", action="store_true",
                   help="promote every version the job made, as an admin overriding the gate would (the table says which)")
    p.add_argument("--models-dir", type=Path, default=Path(os.environ.get("ASSISTANT_MODELS_DIR", ROOT / "data" / "models")))
    a = p.parse_args()

    from assistant.model_files import prepare_embedded_model
    from assistant.paths import DataPaths
    from assistant.precision import machine_format
    from store import Store
    from tuning.config import TrainConfig
    from tuning.gate import GateConfig
    from tuning.pairs import PairConfig, build_preferences
    from tuning.train import _value
    from tuning.trainer import train_adapter

    settings = {k: _value(v) for k, v in (s.split("=", 1) for s in a.set)}
    kind = KINDS[a.kind]
    model_dir = prepare_embedded_model(a.models_dir)
    # The preference suite's 32 held-out questions are never used here.
    pool = QUESTION_SETS[a.questions]()[32:]
    sets = a.rounds + 1
    need = a.per_round * sets
    if need > len(pool):
        p.error(f"{sets} sets of {a.per_round} questions need {need}; there are {len(pool)}")
    # Round r asks every sets-th question from the r-th on, spread over that stride, so every
    # round's users ask each shape of question the pool has (mixed); plain keeps the old order.
    rounds_q = ([spread(pool[i::sets], a.per_round) for i in range(sets)] if a.questions == "mixed"
                else [pool[i * a.per_round:(i + 1) * a.per_round] for i in range(sets)])
    rows: list[dict] = []
    live: int | None = None
    with tempfile.TemporaryDirectory(prefix="rounds-") as tmp:
        data = Path(tmp)
        store = Store(DataPaths(data).database)
        for r in range(1, sets + 1):
            questions = rounds_q[r - 1]
            shown = answers_of(model_dir, data, store, live, questions, a.tokens)
            # A user edits only answers that do not follow the preference yet.
            edits = [x if kind.follows(x) else kind.rewrite(x) for x in shown]
            row = {
                "round": r, "live": f"v{live}" if live else "base",
                "follows": sum(map(kind.follows, shown)), "answers": len(shown),
                "edit_distance": round(sum(edit_distance(x, e) for x, e in zip(shown, edits)) / len(shown), 2),
                "words": round(sum(len(x.split()) for x in shown) / len(shown), 1),
            }
            if r <= a.rounds:  # the users' feedback of this round, then a job on all of it
                for i, (q, x, e) in enumerate(zip(questions, shown, edits)):
                    user = f"user{i % 4}"
                    cid = store.create_conversation(user)
                    mid = store.add_message(cid, user, q)
                    aid = store.log_answer(message_id=mid, user_id=user, prompt=[{"role": "user", "content": q}],
                                           content=x, model=model_dir.name, adapter_version=live,
                                           adapter_name=store.adapter(live)["name"] if live else None)
                    if e.strip() != x.strip():
                        store.edit_answer(aid, user, e)
                prefs = build_preferences(store, PairConfig())
                train = [asdict(x) for x in prefs.train_pairs]
                held = [asdict(x) for x in prefs.eval_pairs]
                t = time.monotonic()
                result = train_adapter(train, held, store=store, data_dir=data, base_model_dir=model_dir,
                                       config=TrainConfig().replace(**settings), gate_config=GateConfig(),
                                       created_by="bench")
                row.update({"pairs": f"{len(train)}/{len(held)}", "job_s": round(time.monotonic() - t)})
                if result.status != "succeeded":
                    row["gate"] = f"job failed: {result.error}"
                elif result.gate.passed:
                    store.record_promotion(result.version, "bench", "rounds benchmark: the gate passed it")
                    live = result.version
                    row["gate"] = f"v{result.version} passed, promoted"
                else:
                    row["gate"] = f"v{result.version} refused: " + ", ".join(
                        c["check"] for c in result.gate.checks if not c["passed"])
                    row["why"] = [f"{c['check']}: {c['detail']}" for c in result.gate.checks if not c["passed"]]
                    if a.promote_refused:
                        store.record_promotion(result.version, "bench", "rounds benchmark: promoted over the gate",
                                               gate_override=True)
                        live = result.version
                        row["gate"] += " (promoted over it)"
            if r > 1:  # how the answers the round's users saw (the live version's) were edited
                row["examples"] = [{"shown": x, "edit": e} for x, e in zip(shown[:2], edits[:2])]
            rows.append(row)
            print(json.dumps(row), flush=True)
    first = rows[0]["edit_distance"] or 1
    print(f"\n{time.strftime('%Y-%m-%d')}; preference '{a.kind}'; training in {machine_format().describe()}; "
          f"answers greedy in float32, {a.tokens} tokens; {a.questions} questions, {a.per_round} a round; TrainConfig {settings or 'defaults'}, default GateConfig")
    print("| round | answered by | follows the preference | mean edit distance (words) | gap closed | words "
          "| pairs trained/held-out | the round's job |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | --- | --- |")
    for row in rows:
        closed = 1 - row["edit_distance"] / first
        print(f"| {row['round']} | {row['live']} | {row['follows']}/{row['answers']} | {row['edit_distance']} "
              f"| {closed:.0%} | {row['words']} | {row.get('pairs', '')} | {row.get('gate', '(measured only)')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
