"""The gate's decisions on made-up metrics, promotion with overrides, the cost estimate."""

import pytest

from tuning.config import TrainConfig
from tuning.cost import estimate_cost
from tuning.gate import (GateConfig, Golden, answer_distance, answer_reach, damage, decide, length_directions, marker_score, noninferior,
                         preference_markers, sign_test_p, users_agree)


TOPICS = [f"{x} {y}" for x in ("red", "old", "tall", "quiet") for y in
          ("volcano", "river", "glacier", "comet", "desert", "forest", "island", "canyon")]
# The held-out pairs: the live version's answers as shown, and users' edits adding an opening.
SHOWN = [f"A {t} is a place people often study. It can change over time." for t in TOPICS]
EDITED = ["Great question! " + a for a in SHOWN]


def metrics(acc, margin, logratios, golden=(True,) * 60, length=40.0, answers=EDITED, damaged=(), chosen_tokens=None,
            chosen=EDITED, rejected=SHOWN):
    n = len(logratios)
    return {
        "preference_accuracy": acc,
        "reward_margin": margin,
        "logratios": list(logratios),
        "golden": {f"q{i}": {"answer": "", "passed": ok} for i, ok in enumerate(golden)},
        "golden_passed": sum(golden),
        "golden_total": len(golden),
        "mean_answer_tokens": length,
        "chosen_tokens": chosen_tokens,
        "pair_answers": [{"answer": a, "chosen": c, "rejected": r} for a, c, r in zip(answers[:n], chosen, rejected)],
        "damaged": {q: "stock apology" for q in damaged},
        "answered": len(golden) + n,
    }


LIVE = metrics(0.45, 0.0, [0.0] * 32, answers=SHOWN)


def failed(result):
    return {c["check"] for c in result.checks if not c["passed"]}


def test_a_clearly_better_version_passes():
    result = decide(metrics(0.95, 2.1, [5.0] * 30 + [-1.0] * 2), LIVE)
    assert result.passed, result.summary()
    assert [c["check"] for c in result.checks] == ["preference accuracy", "reward margin", "behaviour", "regression set",
                                                   "fluency", "answer length"]
    assert "30/32" in result.checks[1]["detail"]
    # What the console's verdict card shows for each check: the value, the live version's, the bar.
    acc, margin, behaviour, golden, fluency, length = result.checks
    assert (acc["value"], acc["live"], acc["threshold"]) == (0.95, 0.45, "above 0.450")
    assert (margin["value"], margin["live"]) == (2.1, 0.0) and "p <= 0.05" in margin["threshold"]
    assert (behaviour["value"], behaviour["live"]) == (1.0, 0.0) and "rule out luck" in behaviour["threshold"]
    assert (golden["value"], golden["live"]) == ("60/60", "60/60") and "9%" in golden["threshold"]
    assert (fluency["value"], fluency["live"]) == ("0/92 damaged", "0/92 damaged")
    assert (length["value"], length["live"], length["threshold"]) == (40.0, 40.0, "20.0-60.0 tokens (+-50% of live)")


def test_noise_that_happens_to_raise_the_mean_is_refused_by_the_sign_test():
    # A few big wins lift the mean margin, but only 17 of 32 pairs improved: luck.
    noisy = metrics(0.5, 0.3, [4.0] * 17 + [-0.5] * 15)
    result = decide(noisy, LIVE)
    assert failed(result) == {"reward margin"}, result.summary()
    assert "17/32" in result.summary()


def test_accuracy_must_beat_the_live_version():
    assert "preference accuracy" in failed(decide(metrics(0.45, 2.0, [5.0] * 32), LIVE))
    assert "preference accuracy" in failed(decide(metrics(0.5, 2.0, [5.0] * 32), LIVE, GateConfig(min_accuracy_gain=0.1)))
    # Matching a live version that is already perfect is as good as it gets.
    perfect = metrics(1.0, 3.0, [5.0] * 32)
    assert decide(metrics(1.0, 3.5, [6.0] * 32), perfect).passed


def lose(k, n=60):
    return (False,) * k + (True,) * (n - k)


def test_the_regression_set_forgives_a_flaky_answer_and_refuses_a_real_regression():
    better = (0.95, 2.0, [5.0] * 32)
    assert decide(metrics(*better, golden=lose(1)), LIVE).passed
    assert decide(metrics(*better, golden=lose(2)), LIVE).passed
    result = decide(metrics(*better, golden=lose(3)), LIVE)
    assert failed(result) == {"regression set"}
    assert "now wrong: q0, q1, q2" in result.summary() and "limit 9%" in result.summary()
    # What the live version already gets wrong is not held against the candidate, and a
    # gain offsets a loss.
    live = metrics(0.45, 0.0, [0.0] * 32, golden=lose(5), answers=SHOWN)
    assert decide(metrics(*better, golden=lose(5)), live).passed
    assert decide(metrics(*better, golden=(True,) * 3 + (False,) * 3 + (True,) * 54), live).passed


def test_noninferior():
    assert noninferior(0, 0, 60, 0.08) == (True, 0.0)
    assert noninferior(2, 0, 60, 0.08)[0] and not noninferior(3, 0, 60, 0.08)[0]
    assert noninferior(3, 3, 60, 0.08)[0]  # as many gained as lost
    assert not noninferior(10, 0, 60, 0.08)[0] and noninferior(0, 0, 0, 0.08)[0]


def test_answers_that_did_not_move_toward_the_chosen_ones_fail_whatever_the_likelihoods_say():
    # The audit's version: held-out accuracy 1.00 and a big margin, answers unchanged.
    stuck = metrics(1.0, 2.76, [5.0] * 32, answers=SHOWN)
    assert failed(decide(stuck, LIVE)) == {"behaviour"}
    assert "the preferred way on 0, the other way on 0 of 32" in decide(stuck, LIVE).summary()
    # The opening on 3 answers of 32: not enough to rule out luck.
    few = metrics(0.95, 2.0, [5.0] * 32, answers=EDITED[:3] + SHOWN[3:])
    assert failed(decide(few, LIVE)) == {"behaviour"}
    assert decide(metrics(0.95, 2.0, [5.0] * 32, answers=EDITED[:30] + SHOWN[30:]), LIVE).passed
    # Reworded answers without the opening: no closer to what users asked for.
    reworded = metrics(1.0, 2.76, [5.0] * 32, answers=[f"People study the {t}; it changes." for t in TOPICS])
    assert failed(decide(reworded, LIVE)) == {"behaviour"}


def test_damaged_answers_fail_the_fluency_check():
    better = (0.95, 2.0, [5.0] * 32)
    assert decide(metrics(*better, damaged=("a",)), LIVE).passed
    result = decide(metrics(*better, damaged=tuple("abcdefg")), LIVE)
    assert failed(result) == {"fluency"} and "newly damaged" in result.summary()
    live = metrics(0.45, 0.0, [0.0] * 32, answers=SHOWN, damaged=tuple("abcdefg"))
    assert decide(metrics(*better, damaged=tuple("abcdefg")), live).passed


def test_damage():
    assert damage("The capital of France is Paris.") is None
    assert damage("Paris " * 40) == "repeats 'paris'"
    assert damage("It is a day, it is a day, it is a day.").startswith("repeats")
    assert damage("A day is 24 hours. A day is long. A day is a unit.") is None  # three words thrice: common, unnoticed
    assert damage("Bien sûr, la capitale de la France est Paris.") == "in French"
    assert damage("Oh, I'm sorry for any misunderstanding. A week has seven days.") == "stock apology"
    assert damage("東京は日本の首都です。") == "not in English (another script)"
    assert damage("Hola! The word for hello in Spanish is hola.") is None


def test_answer_distance():
    assert answer_distance("Paris is the capital.", "paris is the capital") == 0.0
    assert answer_distance("abc", "xyz") == 1.0
    near = answer_distance("Hi there! Paris is the capital.", "Paris is the capital.")
    assert 0 < near < answer_distance("A week is a magical number.", "Paris is the capital.")


def test_answers_that_grow_or_shrink_too_much_fail_unless_toward_the_chosen_length():
    better = (0.95, 2.0, [5.0] * 32)
    assert failed(decide(metrics(*better, length=70.0), LIVE)) == {"answer length"}
    assert failed(decide(metrics(*better, length=15.0), LIVE)) == {"answer length"}
    assert decide(metrics(*better, length=55.0), LIVE).passed
    assert not decide(metrics(*better, length=55.0), LIVE, GateConfig(max_length_drift=0.2)).passed
    # Users chose 12-token answers: halving the length is what they asked for ...
    assert decide(metrics(*better, length=15.0, chosen_tokens=12.0), LIVE).passed
    # ... and doubling it while they chose short ones is DPO's verbosity.
    assert failed(decide(metrics(*better, length=80.0, chosen_tokens=12.0), LIVE)) == {"answer length"}


def test_sign_test():
    assert sign_test_p(32, 32) == pytest.approx(2**-32)
    assert sign_test_p(16, 32) > 0.5
    assert sign_test_p(22, 32) < 0.05 < sign_test_p(21, 32)
    # Known values: sum(comb(n, k) for k >= wins) / 2**n, what the gate computed by hand before.
    for (wins, n), p in {(22, 32): 0.025051229866221547, (21, 32): 0.055092082591727376,
                         (16, 32): 0.5699749670457095, (8, 10): 0.0546875, (0, 5): 1.0}.items():
        assert sign_test_p(wins, n) == pytest.approx(p, rel=1e-9), (wins, n)
    assert sign_test_p(0, 0) == 1.0


def test_cost_estimate_uses_measured_seconds_and_the_work_ratio():
    cost = estimate_cost(train_seconds=360.0, price_per_hour=0.5, total_params=135_000_000, trainable=4_900_000)
    assert cost["estimated_usd"] == pytest.approx(0.05)
    assert cost["full_finetune_seconds"] == pytest.approx(480.0)  # 8N / 6N per token
    assert cost["full_finetune_usd"] == pytest.approx(0.5 * 480 / 3600, abs=1e-6)
    assert cost["full_finetune_state_gb"] > cost["lora_state_gb"]


def test_epochs_auto_runs_two_passes_over_a_small_job_and_one_over_a_large_one():
    from tuning.config import epochs_for

    auto = TrainConfig()
    assert [epochs_for(auto, n) for n in (16, 106, 128, 129, 256)] == [2, 2, 2, 1, 1]
    assert epochs_for(auto.replace(epochs=3), 256) == 3  # a number set is a number run
    assert TrainConfig().replace(epochs=3).replace(epochs="auto").epochs == "auto"
    assert TrainConfig().replace(epochs=2.0).epochs == 2  # JSON numbers
    for bad in ("two", 1.5, 0, True):
        with pytest.raises(ValueError, match="epochs"):
            TrainConfig().replace(epochs=bad)


def test_config_overrides_are_checked_by_name_and_type():
    c = TrainConfig().replace(epochs=1, learning_rate=1e-4)
    assert (c.epochs, c.learning_rate) == (1, 1e-4) and TrainConfig().epochs == "auto"
    with pytest.raises(ValueError, match="Unknown training setting"):
        TrainConfig().replace(epoch=1)
    with pytest.raises(ValueError, match="number"):
        TrainConfig().replace(beta="high")
    with pytest.raises(ValueError, match="max_rank"):
        TrainConfig().replace(rank=128)


def test_training_refuses_a_rank_that_serving_would_refuse():
    """One limit (assistant.limits): a rank the vLLM server and promotion refuse never trains."""
    from assistant.config import ServeConfig
    from assistant.limits import MAX_LORA_RANK
    from assistant.vllm_server import VLLMServerConfig

    assert TrainConfig().max_rank == ServeConfig().max_lora_rank == MAX_LORA_RANK
    assert VLLMServerConfig(model_path="m", served_name="m").max_lora_rank == MAX_LORA_RANK
    assert TrainConfig().replace(rank=MAX_LORA_RANK).rank == MAX_LORA_RANK
    with pytest.raises(ValueError, match="served LoRA rank limit"):
        TrainConfig().replace(rank=48)
    with pytest.raises(ValueError, match="served LoRA rank limit"):  # raising the limit is no way round it
        TrainConfig().replace(rank=48, max_rank=64)


def test_the_gate_config_records_every_field():
    import dataclasses
    import json

    config = GateConfig(min_accuracy_gain=0.1, max_p_value=0.01, max_length_drift=0.3, golden=(Golden("q?", ("a", "b")),),
                        max_new_tokens=16, max_length_prompts=5, batch_size=2)
    recorded = json.loads(json.dumps(config.to_dict()))  # as stored in config_json
    assert set(recorded) == {f.name for f in dataclasses.fields(GateConfig)}
    assert recorded["golden"] == [{"prompt": "q?", "expect": ["a", "b"], "kind": "fact"}]
    for f in dataclasses.fields(GateConfig):
        if f.name != "golden":
            assert recorded[f.name] == getattr(config, f.name), f.name


def test_markers_are_what_the_edits_add_or_cut_across_pairs():
    def markers(edit):
        return preference_markers([(edit(a), True) for a in SHOWN] + [(a, False) for a in SHOWN])

    # An opening: its words and "!"; a cut to one sentence: the sentence break and what follows.
    assert markers(lambda a: "Great question! " + a) == {("great", "question"): 1.0, ("question", "!"): 1.0,
                                                          ("!", "a"): 1.0}
    short = markers(lambda a: a.split(". ")[0] + ".")
    assert short == {(".", "it"): -1.0, ("it", "can"): -1.0, ("can", "change"): -1.0, ("change", "over"): -1.0,
                     ("over", "time"): -1.0, ("time", "."): -1.0}
    assert marker_score(SHOWN[0], short) == -1.0 and marker_score("A red volcano is a place.", short) == 0.0
    # A list: line breaks and dashes, which words alone do not see.
    bullets = markers(lambda a: "\n".join("- " + x for x in a.split(". ")))
    assert {("\n", "-"), ("-", "a"), ("-", "it")} <= set(bullets) and (".", "it") in bullets
    # Reversed words: what they turn around, not the topic of each answer.
    flipped = markers(lambda a: " ".join(reversed(a.split())))
    assert flipped[("a", "is")] == 1.0 and flipped[("is", "a")] == -1.0
    assert not any(t.split()[-1] in b for b in flipped for t in TOPICS)


def test_a_version_taught_reversed_answers_that_only_reworded_is_refused_for_behaviour():
    # Found by the gate benchmark: edits reversed every answer's words ("bad: flipped"); the
    # version said 0/32 answers reversed but, reworded, held fewer of the shown answers' word
    # pairs, and the per-pair measure called that moving toward the chosen side.
    reversed_ = [" ".join(reversed(a.split())) for a in SHOWN]
    live = metrics(0.45, 0.0, [0.0] * 32, answers=SHOWN, chosen=reversed_)
    reworded = metrics(0.95, 2.0, [5.0] * 32, answers=[f"People study the {t}; it changes." for t in TOPICS],
                       chosen=reversed_)
    result = decide(reworded, live)
    assert failed(result) == {"behaviour"}, result.summary()
    assert "'a is'" in result.checks[2]["detail"] and "what they add" in result.checks[2]["detail"]
    learned = metrics(0.95, 2.0, [5.0] * 32, answers=reversed_, chosen=reversed_)
    assert decide(learned, live).passed


def test_no_markers_no_pass():
    same = metrics(0.95, 2.0, [5.0] * 32, chosen=SHOWN)
    result = decide(same, metrics(0.45, 0.0, [0.0] * 32, answers=SHOWN, chosen=SHOWN))
    assert failed(result) == {"behaviour"} and "no token pair tells" in result.checks[2]["detail"]


def test_contradictory_users_ask_for_both_sides_and_one_side_learned_is_refused():
    # Found by the gate benchmark: two users cut answers to one sentence, two said them twice
    # "in other words"; the version answered in one sentence (32/32) and passed, since the
    # many cut word pairs outweighed the few added ones. Half the edits ask for each side.
    long = [a + " It is worth a visit and it is often quiet there." for a in SHOWN]
    edits = [a.split(". ")[0] + "." if i % 2 else f"{a} In other words, {a}" for i, a in enumerate(long)]
    live = metrics(0.45, 0.0, [0.0] * 32, answers=long, chosen=edits, rejected=long)
    one_side = metrics(0.95, 2.0, [5.0] * 32, answers=[a.split(". ")[0] + "." for a in long], chosen=edits,
                       rejected=long)
    result = decide(one_side, live)
    assert failed(result) == {"behaviour"}, result.summary()
    assert "what they add" in result.checks[2]["detail"] and "what they cut" in result.checks[2]["detail"]


def _pairs(user: str, n: int, chosen_words: int, rejected_words: int) -> list[dict]:
    return [{"user_id": user, "chosen": [{"role": "assistant", "content": " ".join(["w"] * chosen_words)}],
             "rejected": [{"role": "assistant", "content": " ".join(["w"] * rejected_words)}]} for _ in range(n)]


def test_users_cutting_and_users_lengthening_answers_are_refused_as_contradictory():
    # The gate benchmark's contradictory users: two cut answers to a sentence, two say them twice.
    pairs = _pairs("a", 14, 10, 40) + _pairs("b", 14, 12, 40) + _pairs("c", 14, 80, 40) + _pairs("d", 14, 82, 40)
    check = users_agree(pairs)
    assert not check["passed"]
    assert "2 users (28 pairs) cut answers to 0.28x" in check["detail"] and "2 users (28 pairs) lengthen" in check["detail"]
    assert "opposite ways" in check["detail"]
    assert length_directions(pairs)["c"] == {"pairs": 14, "ratio": 2.0, "way": "longer"}


def test_users_who_all_cut_or_who_barely_change_length_agree():
    assert users_agree(_pairs("a", 20, 10, 40) + _pairs("b", 20, 12, 40))["passed"]  # all shorter
    assert "of 1 user and 20 pairs" in users_agree(_pairs("a", 20, 10, 40))["detail"]
    # An opening or a closing changes length little: no user pulls either way.
    mild = _pairs("a", 10, 44, 40) + _pairs("b", 10, 36, 40)
    assert users_agree(mild)["passed"] and {u["way"] for u in length_directions(mild).values()} == {None}
    # One lengthening user with a tenth of the pairs does not make the rest contradictory.
    assert users_agree(_pairs("a", 30, 10, 40) + _pairs("b", 3, 90, 40))["passed"]
    # Two pairs say nothing about a user's way; the median, not one outlier, sets it.
    assert length_directions(_pairs("a", 2, 90, 40))["a"]["way"] is None
    assert length_directions(_pairs("a", 4, 40, 40) + _pairs("a", 1, 400, 40))["a"]["way"] is None


def test_a_user_with_both_ways_in_equal_measure_pulls_neither_way():
    # Retries and votes between two sampled answers: longer and shorter at random.
    pairs = _pairs("a", 10, 20, 40) + _pairs("a", 10, 40, 20) + _pairs("b", 10, 20, 40) + _pairs("b", 10, 40, 20)
    assert users_agree(pairs)["passed"]


def test_a_refusal_for_disagreement_names_the_users_on_each_side():
    check = users_agree(_pairs("ann", 10, 10, 40) + _pairs("bob", 12, 90, 40) + _pairs("cy", 3, 9, 40))
    assert not check["passed"] and "(shorter: ann, cy; longer: bob)" in check["detail"]


def test_the_gate_reads_held_out_answers_as_far_as_the_chosen_ones_reach():
    from tests.tiny import tiny_tokenizer

    tok, config = tiny_tokenizer(), GateConfig(max_new_tokens=64, max_answer_tokens=256)
    # Short chosen answers (a cut to one sentence): the regression set's 64 tokens are enough.
    assert answer_reach(tok, ["Paris.", "Yes, it is."], config) == 64
    # A closing sentence after a 150-token answer is read, up to the served length.
    assert answer_reach(tok, ["x" * 150 + " I hope this helps.", "short"], config) == 169
    assert answer_reach(tok, ["x" * 900], config) == 256
    assert answer_reach(tok, [], config) == 64


def test_the_regression_set_is_answered_at_its_length_and_held_out_prompts_at_their_reach(monkeypatch):
    import tuning.gate as gate
    from tests.tiny import tiny_tokenizer

    calls = []

    def fake_greedy(model, tokenizer, convs, *, max_new_tokens, **kw):
        calls.append((len(convs), max_new_tokens))
        return [("answer " * (max_new_tokens // 8), max_new_tokens)] * len(convs)

    monkeypatch.setattr(gate, "greedy_answers", fake_greedy)
    config = GateConfig(golden=(Golden("2+2?", ("4",)),) * 3)
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}]} for i in range(5)]
    by_prompt, answered = gate._answer_all(None, tiny_tokenizer(), rows, config, False, 200)
    assert calls == [(3, 64), (5, 200)] and answered["mean_answer_tokens"] == 200 and len(by_prompt) == 5
    calls.clear()
    gate._answer_all(None, tiny_tokenizer(), rows, config, False, 64)  # one pass when the lengths agree
    assert calls == [(8, 64)]


def test_benchmark_users_never_ask_a_regression_or_replayed_question():
    """The preference suite's users ask tuning.synthetic.mixed_prompts; a regression prompt
    among them would be trained on and then judged, and a replayed one would be held to the
    starting model's answer while users edit it."""
    from tuning.gate import FRAGILE, REGRESSION
    from tuning.general import questions
    from tuning.synthetic import mixed_prompts, prompts

    asked = mixed_prompts()
    assert len(set(asked)) == len(asked) >= 288  # 256 edits beside 32 held-out questions
    assert asked[: len(prompts())] == prompts()  # the held-out questions stay the first ones
    assert not set(asked) & {g.prompt for g in REGRESSION + FRAGILE}
    assert not set(asked) & set(questions())


def test_the_benchmark_users_first_sentence_is_not_a_list_number():
    """The "shorter" users keep the first sentence: the number opening a numbered line is
    not one (they cut "...avoid:\n\n1. Rinse..." to "...avoid:\n\n1." before), a number
    ending a sentence is."""
    from tuning.synthetic import first_sentence, is_one_sentence

    listed = "There are mistakes to avoid:\n\n1. Rinse the rice. It helps.\n2. Soak it."
    assert first_sentence(listed) == "There are mistakes to avoid:\n\n1. Rinse the rice."
    assert first_sentence("12. Twelve is enough. More.") == "12. Twelve is enough."
    assert not is_one_sentence("1.") and not is_one_sentence("A list:\n1.")
    assert is_one_sentence("One plus one is 2.") and is_one_sentence("Paris is the capital of France.")
    assert not is_one_sentence("It is 12. Then more.")
