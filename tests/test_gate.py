"""The gate's decisions on made-up metrics, promotion with overrides, the cost estimate."""

import pytest

from tuning.config import TrainConfig
from tuning.cost import estimate_cost
from tuning.gate import GateConfig, Golden, answer_distance, damage, decide, noninferior, sign_test_p, toward_chosen


def metrics(acc, margin, logratios, golden=(True,) * 60, length=40.0, distance=0.3, damaged=(), chosen_tokens=None,
            toward=None):
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
        "chosen_distance": list(distance) if isinstance(distance, (list, tuple)) else [distance] * n,
        **({"toward_chosen": list(toward) if isinstance(toward, (list, tuple)) else [toward] * n} if toward is not None else {}),
        "damaged": {q: "stock apology" for q in damaged},
        "answered": len(golden) + n,
    }


LIVE = metrics(0.45, 0.0, [0.0] * 32, distance=0.6)


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
    assert (behaviour["value"], behaviour["live"]) == (0.3, 0.6) and "below 0.600" in behaviour["threshold"]
    assert (golden["value"], golden["live"]) == ("60/60", "60/60") and "8%" in golden["threshold"]
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
    assert decide(metrics(1.0, 3.5, [6.0] * 32, distance=0.2), perfect).passed


def lose(k, n=60):
    return (False,) * k + (True,) * (n - k)


def test_the_regression_set_forgives_a_flaky_answer_and_refuses_a_real_regression():
    better = (0.95, 2.0, [5.0] * 32)
    assert decide(metrics(*better, golden=lose(1)), LIVE).passed
    assert decide(metrics(*better, golden=lose(2)), LIVE).passed
    result = decide(metrics(*better, golden=lose(3)), LIVE)
    assert failed(result) == {"regression set"}
    assert "now wrong: q0, q1, q2" in result.summary() and "limit 8%" in result.summary()
    # What the live version already gets wrong is not held against the candidate, and a
    # gain offsets a loss.
    live = metrics(0.45, 0.0, [0.0] * 32, golden=lose(5), distance=0.6)
    assert decide(metrics(*better, golden=lose(5)), live).passed
    assert decide(metrics(*better, golden=(True,) * 3 + (False,) * 3 + (True,) * 54), live).passed


def test_noninferior():
    assert noninferior(0, 0, 60, 0.08) == (True, 0.0)
    assert noninferior(2, 0, 60, 0.08)[0] and not noninferior(3, 0, 60, 0.08)[0]
    assert noninferior(3, 3, 60, 0.08)[0]  # as many gained as lost
    assert not noninferior(10, 0, 60, 0.08)[0] and noninferior(0, 0, 0, 0.08)[0]


def test_answers_that_did_not_move_toward_the_chosen_ones_fail_whatever_the_likelihoods_say():
    # The audit's version: held-out accuracy 1.00 and a big margin, answers unchanged.
    stuck = metrics(1.0, 2.76, [5.0] * 32, distance=0.6)
    assert failed(decide(stuck, LIVE)) == {"behaviour"}
    assert "closer on 0, farther on 0 of 32" in decide(stuck, LIVE).summary()
    # Closer on average thanks to a few pairs, but farther on most: refused.
    few = metrics(0.95, 2.0, [5.0] * 32, distance=[0.0] * 10 + [0.7] * 22)
    assert failed(decide(few, LIVE)) == {"behaviour"}
    assert decide(metrics(0.95, 2.0, [5.0] * 32, distance=[0.2] * 30 + [0.7] * 2), LIVE).passed


def test_damaged_answers_fail_the_fluency_check():
    better = (0.95, 2.0, [5.0] * 32)
    assert decide(metrics(*better, damaged=("a",)), LIVE).passed
    result = decide(metrics(*better, damaged=tuple("abcdefg")), LIVE)
    assert failed(result) == {"fluency"} and "newly damaged" in result.summary()
    live = metrics(0.45, 0.0, [0.0] * 32, distance=0.6, damaged=tuple("abcdefg"))
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


def test_config_overrides_are_checked_by_name_and_type():
    c = TrainConfig().replace(epochs=1, learning_rate=1e-4)
    assert (c.epochs, c.learning_rate) == (1, 1e-4) and TrainConfig().epochs == 2
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


def test_toward_chosen_counts_what_tells_the_two_answers_apart():
    shown = "A volcano is a mountain where lava comes out. It can be dangerous to live near one."
    opening = "Great question! " + shown
    assert toward_chosen(shown, opening, shown) == 0.0
    assert toward_chosen("Great question! A volcano is an opening in the crust.", opening, shown) == 1.0  # reworded rest
    short = "A volcano is a mountain where lava comes out."
    assert toward_chosen(shown, short, shown) == -1.0
    assert toward_chosen(short, short, shown) == 0.0
    closing = short + " I hope this helps."
    assert toward_chosen(short + " I hope this helps.", closing, shown) == 1.0
    assert -1.0 < toward_chosen(shown + " I hope this helps.", closing, shown) < 1.0  # added, but did not cut


def test_behaviour_by_the_chosen_side_measure():
    live = metrics(0.45, 0.0, [0.0] * 32, distance=0.6, toward=0.0)
    # Learned the opening on 30 of 32 pairs while the rest of each answer was reworded
    # (whole-answer distance went up): passes.
    learned = metrics(0.95, 2.0, [5.0] * 32, distance=0.7, toward=[1.0] * 30 + [0.0] * 2)
    result = decide(learned, live)
    assert result.passed, result.summary()
    behaviour = result.checks[2]
    assert (behaviour["value"], behaviour["live"]) == (0.938, 0.0) and "toward the chosen answer on 30, away on 0" in behaviour["detail"]
    # The audit's version by this measure: nothing moved.
    assert failed(decide(metrics(1.0, 2.76, [5.0] * 32, toward=0.0), live)) == {"behaviour"}
    # A few pairs moved a lot, more moved away: refused.
    few = metrics(0.95, 2.0, [5.0] * 32, toward=[1.0] * 10 + [-0.2] * 22)
    assert failed(decide(few, live)) == {"behaviour"}
