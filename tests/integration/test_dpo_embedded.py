"""DPO on the embedded SmolLM2-135M with a learnable synthetic preference, through the real store.

Users ask questions, get the model's own greedy answer (on-policy, logged with log_answer)
and edit it down to its first sentence. After one training run the new version must
*generate* one-sentence answers to most held-out questions, score the held-out pairs clearly
better than the base, keep its answers fluent and no longer than users chose; the
regression set shows what brevity cost (see the assertion's comment). A version trained on
noise (half the users cut answers to one sentence, half lengthen one-sentence answers
back) must be refused.
"""

from __future__ import annotations

import random
from dataclasses import asdict

import pytest

from tuning.config import TrainConfig
from tuning.gate import GateConfig
from tuning.pairs import PairConfig, build_preferences
from tuning.synthetic import first_sentence, is_one_sentence, prompts
from tuning.trainer import train_adapter

pytestmark = pytest.mark.slow

N_TRAIN, N_HELD = 64, 24
# The CI recipe: r=16 all-linear, DPO + NLL over whole answers, lr 2e-4, 1 epoch, batch 4,
# on 64 pairs (16 steps). Until 2026-12-06 it was lr 1e-4 for 2 epochs (32 steps); halved
# because CI may land on an AVX2-only CPU that runs a training step up to 5x slower (README,
# "Tests"). Side by side (2026-12-06, Intel Xeon avx2/avx512f/avx512_bf16, 2 cores,
# float32): one-sentence held-out answers 24/24 both (base 1/24), mean tokens 58.4 -> 19.6
# vs 18.1, regression set 51/52 both, both passed by the gate; the noise version refused by
# both; the two tests 289 s vs 199 s. The default recipe now counts only the edited tokens
# (dpo_tokens and nll_tokens "edit"/"both"), which teaches additive edits (preference suite)
# but taught brevity to only 12 of these 24 held-out answers from 64 pairs (31/32 from 95
# pairs in the suite; not yet told apart from the reference computed once, also new): this
# test keeps the recipe it was measured with, without the replayed general answers
# (replay=0) that feedback jobs train beside the pairs since 2026-12-01. The reference's
# log-probabilities are computed once before training (the default): the same numbers as a
# no-grad forward at every step (tests/test_dpo.py), without that forward at each step.
RECIPE = TrainConfig(learning_rate=2e-4, epochs=1, dpo_tokens="answer", nll_tokens="answer", reference="once", replay=0)
# The default gate: teaching brevity halves answer length on purpose, and the length check
# lets answers move toward the chosen answers' length.
GATE = GateConfig()
ANSWER_TOKENS = 48


@pytest.fixture(scope="module")
def on_policy(embedded_model):
    """The base model's greedy answers to the questions (what users were shown), for the
    questions it answers in more than one sentence (the others leave nothing to cut)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from assistant.precision import machine_format
    from tuning.generation import greedy_answers

    qs = prompts()
    tok = AutoTokenizer.from_pretrained(embedded_model)
    model = AutoModelForCausalLM.from_pretrained(embedded_model, dtype=machine_format().torch_dtype())  # as the app serves here
    answers = greedy_answers(model, tok, [[{"role": "user", "content": q}] for q in qs], max_new_tokens=ANSWER_TOKENS,
                             batch_size=64)
    usable = [(i, q, a) for i, (q, (a, _)) in enumerate(zip(qs, answers)) if first_sentence(a) != a]
    held = [(q, a) for i, q, a in usable if i % 5 == 0][:N_HELD]
    train = [(q, a) for i, q, a in usable if i % 5 != 0][:N_TRAIN]
    assert len(held) == N_HELD and len(train) == N_TRAIN
    return train + held, len(train)


def log_feedback(store, shown: list[tuple[str, str]], model_name: str, noise: bool = False) -> None:
    """Each question in its own conversation by one of four users, answered, then edited."""
    rng = random.Random(7)
    for i, (question, answer) in enumerate(shown):
        user = f"user{i % 4}"
        cid = store.create_conversation(user)
        mid = store.add_message(cid, user, question)
        prompt = [{"role": "user", "content": question}]
        shown_answer, wanted = answer, first_sentence(answer)
        if noise and rng.random() < 0.5:  # this user wants the longer answer back
            shown_answer, wanted = wanted, shown_answer
        aid = store.log_answer(message_id=mid, user_id=user, prompt=prompt, content=shown_answer, model=model_name)
        store.edit_answer(aid, user, wanted)


def train_on(tmp_path, embedded_model, on_policy, noise: bool):
    from store import Store

    shown, n_train = on_policy
    store = Store(tmp_path / "assistant.db")
    log_feedback(store, shown, embedded_model.name, noise=noise)
    # The real pair builder: edits become pairs, and its split holds out the newest
    # conversations (the held-out questions, logged last) with no prompt group on both sides.
    data = build_preferences(store, PairConfig(eval_fraction=(len(shown) - n_train) / len(shown)))
    train, held = [asdict(p) for p in data.train_pairs], [asdict(p) for p in data.eval_pairs]
    assert data.summary["pairs"]["by_signal"]["edit"] >= len(shown) - 4, data.summary
    assert len(held) >= 0.8 * (len(shown) - n_train) and not {p["prompt"][-1]["content"] for p in train} & {
        p["prompt"][-1]["content"] for p in held}
    assert all(isinstance(p["prompt"], list) and p["chosen"][0]["role"] == "assistant" for p in train)
    lines = []
    result = train_adapter(train, held, store=store, data_dir=tmp_path, base_model_dir=embedded_model,
                           config=RECIPE, gate_config=GATE, created_by="test", progress=lines.append)
    assert result.status == "succeeded", result.error
    return store, result, lines


def test_a_learnable_preference_changes_what_the_model_says(tmp_path, embedded_model, on_policy):
    store, result, lines = train_on(tmp_path, embedded_model, on_policy, noise=False)
    row = store.adapter(result.version)
    ev = row["eval_json"]
    base = ev["live"]  # nothing promoted yet: the live version is the base model
    print("\ngate:", ev["summary"])
    for key in ("preference_accuracy", "reward_margin", "likelihood_accuracy", "likelihood_accuracy_per_token"):
        print(f"{key}: base {base[key]} new {ev[key]}")
    for a in ev["answers"][:4]:
        print(" ", a["prompt"], "->", a["answer"])

    # The regression set holds questions the base answers right (this checks it stays true).
    assert base["golden_passed"] == base["golden_total"], base["golden"]
    base_short = sum(is_one_sentence(a["answer"]) for a in base["answers"])
    short = sum(is_one_sentence(a["answer"]) for a in ev["answers"])
    print(f"one-sentence held-out answers: base {base_short}/{len(base['answers'])}, new {short}/{len(ev['answers'])}; "
          f"mean tokens {base['mean_answer_tokens']} -> {ev['mean_answer_tokens']}")
    # Scores: clearly above the base on held-out pairs (the base's reward accuracy is 0).
    assert ev["preference_accuracy"] >= 0.9 and ev["reward_margin"] > 0.5
    # ... and on plain per-token likelihood, which the base can score on: clearly above it,
    # or at the top. Measured 0.58 -> 1.0 on answers made in float32; in bfloat16 (the same
    # kind of Xeon, 2026-12-07, AMX usable) the base already scored 0.79, and 1.0 is the most.
    assert ev["likelihood_accuracy_per_token"] >= min(base["likelihood_accuracy_per_token"] + 0.25, 1.0)
    # Behaviour: one-sentence answers to most held-out questions, goldens still right.
    assert short >= 0.75 * len(ev["answers"]) and short >= base_short + 0.5 * len(ev["answers"]), ev["answers"]
    assert ev["mean_answer_tokens"] < base["mean_answer_tokens"]
    checks = {c["check"]: c for c in ev["checks"]}
    assert checks["fluency"]["passed"] and checks["answer length"]["passed"], ev["summary"]
    # The behaviour check (word distance to the chosen answers) is weak for a preference
    # that only cuts: the chosen answer is the start of the base's own answer, so the base
    # is already close to it (measured 0.462 vs live 0.525, closer on 13 of 24): printed,
    # not asserted. The length check is what sees brevity.
    print("behaviour:", checks["behaviour"]["detail"])
    # One-sentence answers cost facts: the simulated user keeps the first sentence, and the
    # model learns to stop there also where the fact comes later ("How many hours are in a
    # day?" lost its "24"). The 65-prompt regression set sees it (measured on the EPYC in
    # bfloat16: 58/65 vs 65/65, refused); the 9-prompt golden set it replaced kept 9/9. The
    # gate's verdict follows the regression check, and a catastrophe is ruled out here.
    assert ev["golden_passed"] >= ev["golden_total"] - 10, ev["golden"]
    assert result.gate.passed == bool(row["gate_passed"]), ev["summary"]
    # Progress reached whoever started it, step by step.
    steps = [r for r in lines if "loss" in r and r.get("phase") == "training"]
    assert steps[-1]["step"] == steps[-1]["steps"] == RECIPE.epochs * N_TRAIN // RECIPE.batch_size


def test_a_version_trained_on_noise_is_refused(tmp_path, embedded_model, on_policy):
    store, result, _ = train_on(tmp_path, embedded_model, on_policy, noise=True)
    ev = store.adapter(result.version)["eval_json"]
    print("\ngate:", ev["summary"])
    assert not result.gate.passed and store.adapter(result.version)["gate_passed"] == 0
    assert not next(c for c in ev["checks"] if c["check"] == "reward margin")["passed"]
    from assistant.engine import Adapter
    from loop.control import Conflict, Controller

    store.create_user("root", "root-password", is_admin=True)
    router = type("NoEngine", (), {"set_live": lambda *a: None, "set_canary": lambda *a: None})()
    c = Controller(store, router, adapter_of=lambda v: Adapter("x", "x", v), launcher=lambda j: None)
    with pytest.raises(Conflict, match="did not pass"):
        c.promote("root", result.version)
    assert store.live_version() is None
