"""KTO: the loss against hand-computed values and TRL's formula, the vote batches, training on
votes alone and on votes with pairs, and which objective a job picks."""

import math

import pytest
import torch
import torch.nn.functional as F

from tiny import tiny_model, tiny_tokenizer, toy_pairs
from tuning.config import TrainConfig
from tuning.dpo import Cancelled
from tuning.kto import (choose_objective, collate_votes, data_problem, kto_loss, pairs_as_votes, tokenize_vote,
                        train_kto)


def toy_votes(n: int, start: int = 0, prefix: str = "v") -> list[dict]:
    """Votes with a learnable preference: 'yes' answers up-voted, 'no' answers down-voted."""
    out = []
    for i in range(start, start + n):
        up = i % 2 == 0
        out.append({"id": f"{prefix}{i:04d}", "prompt": [{"role": "user", "content": f"question {i}?"}],
                    "completion": [{"role": "assistant", "content": f"{'yes' if up else 'no'} {i % 10}{'.' if up else '!'}"}],
                    "label": up, "created_utc": f"2026-11-28T11:{i % 60:02d}:00+00:00"})
    return out


def trl_kto(policy, reference, labels, policy_kl, reference_kl, beta, dw, uw):
    """TRL 1.16 KTOTrainer._compute_loss, loss_type "kto", copied line for line (single process)."""
    kl = (policy_kl - reference_kl).mean().detach()
    kl = kl.mean().clamp(min=0)
    chosen_idx = torch.nonzero(labels, as_tuple=False).view(-1)
    rejected_idx = torch.nonzero(~labels, as_tuple=False).view(-1)
    chosen_logratios = policy.index_select(0, chosen_idx) - reference.index_select(0, chosen_idx)
    chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))
    rejected_logratios = policy.index_select(0, rejected_idx) - reference.index_select(0, rejected_idx)
    rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))
    return torch.cat((dw * chosen_losses, uw * rejected_losses), 0).nanmean()


def test_loss_matches_hand_computed_values():
    labels = torch.tensor([True, False])
    # Rewards r = policy - reference = [1, -1]; mismatched pairs average 0: z0 = 0.
    # up: 1 - sigmoid(0.5 * (1 - 0)); down: 1 - sigmoid(0.5 * (0 + 1)); both 0.377541.
    losses, rewards, kl = kto_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]), labels,
                                   torch.tensor([-4.0, -6.0]), torch.tensor([-5.0, -5.0]), beta=0.5)
    assert kl.item() == 0
    assert losses.tolist() == pytest.approx([1 - 1 / (1 + math.exp(-0.5))] * 2, abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.5, -0.5])
    # z0 = mean(2, 0) = 1: the up-voted answer is now only at the reference point (0.5),
    # the down-voted one is further below it: 1 - sigmoid(0.5 * (1 + 1)) = 0.268941.
    losses, _, kl = kto_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]), labels,
                             torch.tensor([-3.0, -5.0]), torch.tensor([-5.0, -5.0]), beta=0.5)
    assert kl.item() == 1
    assert losses.tolist() == pytest.approx([0.5, 1 - 1 / (1 + math.exp(-1))], abs=1e-6)
    # A negative KL estimate is clamped at 0; weights scale each side.
    losses, _, kl = kto_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]), labels,
                             torch.tensor([-7.0, -7.0]), torch.tensor([-5.0, -5.0]), beta=0.5,
                             desirable_weight=2.0, undesirable_weight=0.5)
    assert kl.item() == 0
    assert losses.tolist() == pytest.approx([2 * 0.3775407, 0.5 * 0.3775407], abs=1e-6)


def test_loss_equals_trls_formula_on_random_batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = 6
        policy, reference = -20 * torch.rand(n, generator=g), -20 * torch.rand(n, generator=g)
        policy_kl, reference_kl = -20 * torch.rand(n, generator=g), -20 * torch.rand(n, generator=g)
        labels = torch.rand(n, generator=g) > 0.4
        beta, dw, uw = 0.1 + torch.rand(1, generator=g).item(), 1.0, 1.33
        ours, _, _ = kto_loss(policy, reference, labels, policy_kl, reference_kl, beta, dw, uw)
        assert ours.mean().item() == pytest.approx(trl_kto(policy, reference, labels, policy_kl, reference_kl,
                                                           beta, dw, uw).item(), abs=1e-6)


def test_the_reference_point_carries_no_gradient():
    policy = torch.tensor([-2.0, -2.0], requires_grad=True)
    policy_kl = torch.tensor([-1.0, -1.0], requires_grad=True)
    losses, _, _ = kto_loss(policy, torch.tensor([-2.0, -2.0]), torch.tensor([True, False]), policy_kl,
                            torch.tensor([-2.0, -2.0]), beta=0.1)
    losses.sum().backward()
    assert policy_kl.grad is None or torch.all(policy_kl.grad == 0)
    assert policy.grad[0] < 0 < policy.grad[1]  # up-voted answer pushed up, down-voted down


def test_vote_batches_pair_each_prompt_with_another_answer():
    tok = tiny_tokenizer()
    items = [tokenize_vote(tok, v, 512) for v in toy_votes(3)]
    batch = collate_votes(items, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6 and batch["labels"].tolist() == [True, False, True]
    text = lambda row: tok.decode(batch["input_ids"][row][batch["attention_mask"][row].bool()])  # noqa: E731
    answer = lambda row: tok.decode(batch["input_ids"][row][batch["completion_mask"][row].bool()])  # noqa: E731
    assert "question 0?" in text(0) and answer(0) == "yes 0.<|im_end|>"
    # The mismatched rows: prompt i with answer i-1 (TRL rotates completions by one).
    assert "question 0?" in text(3) and answer(3) == "yes 2.<|im_end|>"
    assert "question 1?" in text(4) and answer(4) == "yes 0.<|im_end|>"


@pytest.fixture
def lora_model():
    from peft import LoraConfig, get_peft_model

    tok = tiny_tokenizer()
    model = get_peft_model(tiny_model(len(tok)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return model, tok


def test_votes_alone_train_lora_weights_and_separate_up_from_down(lora_model):
    model, tok = lora_model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = []
    config = TrainConfig(rank=4, alpha=8, learning_rate=5e-3, epochs=3, batch_size=4, dtype="float32",
                         kto_nll_weight=0.0)
    metrics = train_kto(model, tok, [], toy_votes(16), config, progress=rows.append)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert rows[0]["objective"] == "kto" and rows[-1]["step"] == rows[-1]["steps"] == 12
    assert rows[0]["kto_loss"] == pytest.approx(0.5, abs=1e-4)  # B = 0: policy == reference, z0 = 0
    assert rows[0]["kl"] == 0
    assert metrics["kto_steps"] == 12 and metrics["dpo_steps"] == 0
    assert metrics["kto_loss"] < 0.5 and metrics["vote_reward_margin"] > 0
    assert metrics["desirable_reward"] > metrics["undesirable_reward"]


def test_up_votes_can_stress_what_they_add_over_the_down_voted_answers(lora_model):
    """kto_nll_tokens="both": the NLL term also averages over the tokens that spell what
    up-voted answers add (the gate's markers), as a pair's edited tokens are stressed."""
    from tuning.kto import VoteStats, vote_loss, vote_markers

    model, tok = lora_model
    votes = toy_votes(12)
    for v in votes:
        if v["label"]:
            v["completion"] = [{"role": "assistant", "content": "Great question! " + v["completion"][0]["content"]}]
    added = vote_markers(votes)
    assert {("great", "question"), ("question", "!"), ("!", "yes")} <= set(added)
    assert vote_markers(votes[::2]) == {}  # up-votes only: nothing to contrast them with
    up, down = tokenize_vote(tok, votes[0], 512, added), tokenize_vote(tok, votes[1], 512, added)
    stressed = "".join(tok.decode([t]) for t, m in zip(up.answer, up.stress) if m)
    assert stressed.strip() == "Great question! yes" and down.stress is None
    assert tokenize_vote(tok, votes[0], 512).stress is None
    batch = collate_votes([up, down], tok.pad_token_id)
    assert batch["nll_mask"][0].sum() == sum(up.stress) and batch["nll_mask"][1].sum() == 0
    config = TrainConfig(dtype="float32", kto_nll_tokens="both")
    _, both = vote_loss(model, batch, config, autocast=False)
    _, plain = vote_loss(model, collate_votes([tokenize_vote(tok, votes[0], 512), down], tok.pad_token_id), config,
                         autocast=False)
    assert isinstance(both, VoteStats) and both.nll > plain.nll > 0 and both.kto_loss == pytest.approx(plain.kto_loss)
    metrics = train_kto(model, tok, [], votes, TrainConfig(rank=4, alpha=8, learning_rate=5e-3, epochs=1, batch_size=4,
                                                           dtype="float32", kto_nll_tokens="both"))
    assert metrics["kto_steps"] == 3 and math.isfinite(metrics["kto_loss"])
    with pytest.raises(ValueError, match="kto_nll_tokens"):
        TrainConfig().replace(kto_nll_tokens="edit")


def test_pairs_and_votes_train_in_one_run_with_batches_of_one_kind(lora_model):
    model, tok = lora_model
    rows = []
    config = TrainConfig(rank=4, alpha=8, learning_rate=5e-3, epochs=1, batch_size=4, dtype="float32")
    metrics = train_kto(model, tok, toy_pairs(8), toy_votes(6), config, progress=rows.append)
    # 8 pairs -> 2 DPO steps, 6 votes -> 2 KTO steps (4 + 2): one loss per step.
    assert sorted(r["objective"] for r in rows) == ["dpo", "dpo", "kto", "kto"]
    assert all(("dpo_loss" in r) == (r["objective"] == "dpo") and ("kto_loss" in r) == (r["objective"] == "kto")
               for r in rows)
    assert metrics["dpo_steps"] == metrics["kto_steps"] == 2
    # Step 1 starts from policy == reference, whichever loss it takes.
    first = rows[0]
    assert (first["dpo_loss"] if first["objective"] == "dpo" else first["kto_loss"]) == pytest.approx(
        math.log(2) if first["objective"] == "dpo" else 0.5, abs=1e-4)


def test_votes_training_stops_between_steps_when_asked(lora_model):
    model, tok = lora_model
    seen = []
    with pytest.raises(Cancelled, match="step 1"):
        train_kto(model, tok, [], toy_votes(8), TrainConfig(rank=4, dtype="float32"), progress=seen.append,
                  should_stop=lambda: len(seen) >= 1)


def test_auto_picks_what_the_data_supports():
    pairs, votes = toy_pairs(2), toy_votes(2)
    assert choose_objective("auto", pairs, []) == "dpo"
    assert choose_objective("auto", [], votes) == "kto"
    assert choose_objective("auto", pairs, votes) == "dpo+kto"
    assert choose_objective("auto", [], []) == "dpo"  # and the job fails: no training pairs
    assert choose_objective("dpo", pairs, votes) == "dpo" and choose_objective("kto", pairs, []) == "kto"
    assert data_problem("dpo", [], [], votes, votes) == "there are no training pairs"
    assert data_problem("kto", [], [], votes, []) == "there are no held-out votes for the evaluation gate"
    assert data_problem("dpo+kto", pairs, [], votes, votes) is None
    assert data_problem("dpo+kto", pairs, [], votes, []) is not None


def test_kto_on_everything_splits_each_pair_into_an_up_and_a_down_vote():
    votes = pairs_as_votes(toy_pairs(1))
    assert [(v["id"], v["label"], v["completion"][0]["content"]) for v in votes] == [
        ("p0000+", True, "yes 0."), ("p0000-", False, "no 0!")]
    assert all("chosen" not in v and "rejected" not in v and v["prompt"] == toy_pairs(1)[0]["prompt"] for v in votes)


def test_settings_are_checked():
    assert TrainConfig().objective == "auto"
    assert TrainConfig().replace(objective="kto", kto_beta=0.2).kto_beta == 0.2
    with pytest.raises(ValueError, match="objective must be"):
        TrainConfig().replace(objective="orpo")
    with pytest.raises(ValueError, match="DPO only"):
        TrainConfig().replace(objective="kto", trainer="trl")
    with pytest.raises(ValueError, match="kto_beta"):
        TrainConfig().replace(kto_beta=0)


# -- whole jobs on the tiny checkpoint ------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-chat")


JOB = TrainConfig(rank=4, alpha=8, learning_rate=5e-3, epochs=2, batch_size=4, dtype="float32")


def gate_config():
    from tuning.gate import GateConfig, Golden

    return GateConfig(golden=(Golden("question 1?", ("yes",)),), max_new_tokens=8, max_length_prompts=4)


def test_a_votes_only_job_trains_kto_and_is_gated_on_held_out_votes(store, tmp_path, checkpoint):
    from tuning.trainer import train_adapter

    result = train_adapter([], [], votes=toy_votes(16), eval_votes=toy_votes(8, start=100, prefix="e"), store=store,
                           data_dir=tmp_path, base_model_dir=checkpoint, config=JOB, gate_config=gate_config())
    assert result.status == "succeeded", result.error
    row = store.adapter(result.version)
    m, ev = row["metrics_json"], row["eval_json"]
    assert (m["objective"], m["votes"], m["votes_up"], m["votes_down"], m["pairs"]) == ("kto", 16, 8, 8, 0)
    assert m["kto_steps"] == 8 and m["dpo_steps"] == 0 and row["pair_ids_json"] == [v["id"] for v in toy_votes(16)]
    job = store.job(result.job_id)["config_json"]
    assert (job["objective"], job["votes"], job["eval_votes"]) == ("kto", 16, 8)
    assert [c["check"] for c in ev["checks"]] == ["vote accuracy", "vote margin", "behaviour", "regression set",
                                                  "fluency", "answer length"]
    assert ev["live"]["vote_margin"] == 0 and ev["live"]["vote_accuracy"] == 0.5  # the base against itself
    assert ev["votes"] == 8 and ev["vote_margin"] > 0  # the learnable preference shows on held-out votes
    assert row["gate_passed"] == int(result.gate.passed)


def test_pairs_and_votes_make_one_job_with_both_losses_and_both_gates(store, tmp_path, checkpoint):
    from tuning.trainer import train_adapter

    result = train_adapter(toy_pairs(8), toy_pairs(4, start=100, prefix="e"), votes=toy_votes(8),
                           eval_votes=toy_votes(4, start=200, prefix="f"), store=store, data_dir=tmp_path,
                           base_model_dir=checkpoint, config=JOB, gate_config=gate_config())
    assert result.status == "succeeded", result.error
    row = store.adapter(result.version)
    m = row["metrics_json"]
    assert (m["objective"], m["pairs"], m["votes"], m["dpo_steps"], m["kto_steps"]) == ("dpo+kto", 8, 8, 4, 4)
    checks = [c["check"] for c in row["eval_json"]["checks"]]
    assert checks[:6] == ["preference accuracy", "reward margin", "behaviour", "regression set", "fluency",
                          "answer length"] and checks[6:] == ["vote accuracy", "vote margin", "users agree"]


def test_objective_dpo_ignores_lone_votes_and_kto_takes_pairs_as_votes(store, tmp_path, checkpoint):
    from tuning.trainer import train_adapter

    common = dict(votes=toy_votes(4), eval_votes=toy_votes(2, start=200, prefix="f"), store=store, data_dir=tmp_path,
                  base_model_dir=checkpoint, gate_config=gate_config())
    dpo = train_adapter(toy_pairs(4), toy_pairs(2, start=100, prefix="e"), config=JOB.replace(objective="dpo", epochs=1),
                        **common)
    m = store.adapter(dpo.version)["metrics_json"]
    assert (m["objective"], m["votes"], m["pairs"]) == ("dpo", 0, 4) and "kto_steps" not in m
    kto = train_adapter(toy_pairs(4), toy_pairs(2, start=100, prefix="e"), config=JOB.replace(objective="kto", epochs=1),
                        **common)
    row = store.adapter(kto.version)
    m = row["metrics_json"]
    assert (m["objective"], m["votes"], m["votes_up"], m["pairs"], m["kto_steps"]) == ("kto", 12, 6, 0, 3)
    assert row["pair_ids_json"] == [p["id"] for p in toy_pairs(4)] + [v["id"] for v in toy_votes(4)]
    assert row["eval_json"]["votes"] == 6  # 2 held-out votes + 2 held-out pairs as 4 votes


def test_held_out_votes_must_not_be_training_votes(store, tmp_path, checkpoint):
    from tuning.trainer import train_adapter

    result = train_adapter([], [], votes=toy_votes(8), eval_votes=toy_votes(2), store=store, data_dir=tmp_path,
                           base_model_dir=checkpoint, config=JOB, gate_config=gate_config())
    assert result.status == "failed" and "held-out" in result.error


# -- thumbs in a real store, through the job's entry point ----------------------------------


def thumbs_store(store) -> dict:
    """Sixteen lone votes ('yes' answers up, 'no' answers down, one conversation each), and
    votes that must not train: opted out, cleared, on a withdrawn retry, a duplicate."""
    from feedback_scenario import ask

    kept = {}
    for i in range(16):
        up = i % 2 == 0
        _, (a,) = ask(store, f"u{i % 4}", f"question {i}?", [f"{'yes' if up else 'no'} {i}{'.' if up else '!'}"])
        store.rate(a, f"u{i % 4}", 1 if up else -1)
        kept[a] = up
    cid, (a,) = ask(store, "dave", "question 90?", ["yes 90."])
    store.rate(a, "dave", 1)
    store.update_conversation(cid, "dave", exclude_from_training=True)
    _, (a,) = ask(store, "erin", "question 91?", ["no 91!"])
    store.rate(a, "erin", -1)
    store.rate(a, "erin", 0)  # cleared
    _, (a, b) = ask(store, "erin", "question 92?", ["no 92!", "yes 92."])
    store.rate(b, "erin", 1)
    store.withdraw_answer(b, "erin")  # an undone retry: its vote goes with it
    _, (a,) = ask(store, "frank", "question 0?", ["yes 0."])  # the same wording, up again
    store.rate(a, "frank", 1)
    return kept


def test_votes_are_selected_as_pairs_are(store):
    from feedback_scenario import TopicEmbedder

    from tuning.pairs import PairConfig, build_preferences

    kept = thumbs_store(store)
    data = build_preferences(store, PairConfig(eval_fraction=0.25), TopicEmbedder())
    assert data.pairs == []
    assert {u.answer_id: u.label for u in data.unpaired} == kept  # none of the excluded ones, one of the duplicates
    assert data.summary["dropped_unpaired"]["duplicate"] == 1
    text = repr(data.unpaired)
    assert not any(f"question {n}" in text for n in (90, 91, 92))  # opted out, cleared, withdrawn
    assert len(data.eval_unpaired) == 4 and len(data.train_unpaired) == 12
    # A prompt group (question 0 asked twice) is on one side only.
    assert {u.split for u in data.unpaired if u.prompt[-1]["content"] == "question 0?"} == {"train"}


def test_a_thumbs_only_store_trains_a_kto_version_through_the_job_entry_point(store, tmp_path, checkpoint, monkeypatch,
                                                                            capsys):
    from feedback_scenario import TopicEmbedder

    import tuning.pairs
    from loop import reports
    from tuning.train import parser, run

    monkeypatch.setattr(tuning.pairs, "MiniLMEmbedder", TopicEmbedder)  # no sentence model in fast tests
    thumbs_store(store)
    store.create_user("root", "root-password", is_admin=True)
    code = run(parser().parse_args(["--data-dir", str(tmp_path), "--as", "root", "--model", str(checkpoint),
                                    "--priority", "normal", "--set", "learning_rate=0.005", "--set", "rank=4",
                                    "--set", "alpha=8", "--set", "dtype=float32", "--set", "epochs=1"]))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "training by KTO on 14 votes, gate on 2 held-out votes" in out
    (job,) = store.jobs()
    row = store.adapter(job["adapter_version"])
    assert (row["metrics_json"]["objective"], row["metrics_json"]["votes"]) == ("kto", 14)
    assert job["config_json"]["objective"] == "kto"
    sentence = reports.job_view(job, row)["sentence"]
    assert sentence.startswith(f"v{row['version']} trained by KTO on 14 votes (")


# -- the KTO gate's verdict on made-up figures ----------------------------------------------


TOPICS = ["volcano", "river", "glacier", "comet", "desert", "forest", "island", "canyon", "harbour", "meadow",
          "planet", "tunnel", "bridge", "castle", "market", "garden", "library", "airport", "museum", "temple",
          "lighthouse", "vineyard", "stadium", "factory"]
# The live version's answers to the 24 held-out prompts, and what users voted on: up when an
# answer opened with the phrase they like, down on the live version's own answers.
LIVE = [f"A {t} is a place people often study. It can change over time and it matters to many of them." for t in TOPICS]
LABELS = [True, False] * 12
OPENING = [("Great question! " + a) if up else a for a, up in zip(LIVE, LABELS)]
SHORTER = [a.split(". ")[0] + "." if up else a for a, up in zip(LIVE, LABELS)]


def kto_metrics(signed, answers=LIVE, labels=LABELS, voted=OPENING, golden=(True,) * 60, length=40.0,
                chosen_tokens=None):
    n = len(signed)
    return {
        "votes": n, "votes_up": sum(labels), "vote_accuracy": sum(s > 0 for s in signed) / n,
        "vote_margin": sum(signed) / n, "vote_signed_rewards": list(signed),
        "vote_answers": [{"answer": a, "voted": v, "up": up} for a, v, up in zip(answers, voted, labels)],
        "preference_accuracy": None, "reward_margin": None, "logratios": [],
        "golden": {f"q{i}": {"answer": "", "passed": ok} for i, ok in enumerate(golden)},
        "golden_passed": sum(golden), "golden_total": len(golden),
        "mean_answer_tokens": length, "chosen_tokens": chosen_tokens, "damaged": {}, "answered": len(golden) + n,
    }


BASE = {**kto_metrics([0.0] * 24), "vote_accuracy": 0.5}  # what the base scores


def test_vote_separation_ignores_a_shift_of_every_reward():
    from tuning.gate import vote_separation

    labels = [True, True, False, False]
    sep = vote_separation([0.3, 0.1, -0.1, -0.3], labels)
    assert (sep["vote_accuracy"], sep["vote_margin"]) == (1.0, 0.4)
    assert sep["vote_signed_rewards"] == [0.3, 0.1, 0.1, 0.3]
    shifted = vote_separation([1.3, 1.1, 0.9, 0.7], labels)  # everything likelier, down-voted answers too
    assert shifted == sep
    assert vote_separation([0.0] * 4, labels)["vote_accuracy"] == 0.5  # the base: all ties
    # One label only: no shift to remove, the share on the vote's side of the base.
    assert vote_separation([0.2, -0.1], [True, True]) == {"vote_accuracy": 0.5, "vote_margin": 0.05,
                                                          "vote_signed_rewards": [0.2, -0.1]}


def test_vote_markers_are_what_the_up_voted_answers_share_and_the_down_voted_lack():
    from tuning.gate import marker_score, preference_markers

    opening = preference_markers(list(zip(OPENING, LABELS)))
    # Each answer's own words mark nothing.
    assert opening == {("great", "question"): 1.0, ("question", "!"): 1.0, ("!", "a"): 1.0}
    assert marker_score(OPENING[0], opening) == 1.0 and marker_score(LIVE[0], opening) == 0.0
    shorter = preference_markers(list(zip(SHORTER, LABELS)))
    assert all(w == -1.0 for w in shorter.values()) and {(".", "it"), ("it", "can")} <= set(shorter)
    assert marker_score(LIVE[0], shorter) == -1.0 and marker_score(SHORTER[0], shorter) == 0.0
    # Up-votes only: the other side is the live version's answers; nothing to tell: no markers.
    assert preference_markers([(a, True) for a in OPENING[::2]], LIVE[::2]) == opening
    assert preference_markers([(a, False) for a in LIVE], LIVE) == {}


def test_the_kto_gate_passes_a_version_that_separates_votes_and_moves_answers():
    from tuning.gate import decide_kto

    # Rewards on the vote's side on 22 of 24 votes; every answer now opens the way users like.
    good = kto_metrics([0.5] * 22 + [-0.2] * 2, ["Great question! " + a for a in LIVE])
    result = decide_kto(good, BASE)
    assert result.passed, result.summary()
    assert [c["check"] for c in result.checks] == ["vote accuracy", "vote margin", "behaviour", "regression set",
                                                   "fluency", "answer length"]
    assert "22/24 votes" in result.checks[1]["detail"] and result.checks[2]["value"] == 1.0
    assert "the preferred way on 24, the other way on 0 of 24" in result.checks[2]["detail"]
    assert "'great question'" in result.checks[2]["detail"]
    # Users voted up the short answers: the version answers in one sentence.
    short = kto_metrics([0.5] * 24, [a.split(". ")[0] + "." for a in LIVE], voted=SHORTER)
    result = decide_kto(short, {**BASE, "vote_answers": kto_metrics([0.0] * 24, voted=SHORTER)["vote_answers"]})
    assert result.passed, result.summary()


def test_the_kto_gate_refuses_luck_scores_without_behaviour_and_lost_facts():
    from tuning.gate import decide_kto

    failed = lambda r: {c["check"] for c in r.checks if not c["passed"]}  # noqa: E731
    # A few big rewards lift the mean, but only 13 of 24 votes moved the right way.
    assert "vote margin" in failed(decide_kto(kto_metrics([3.0] * 13 + [-0.5] * 11), BASE))
    # Scores separate, but the answers did not move.
    stuck = kto_metrics([0.5] * 24)
    assert failed(decide_kto(stuck, BASE)) == {"behaviour"}
    # Found by the thumbs-only benchmark: a version that reworded every answer and learned no
    # opening (0/32) had moved away from every down-voted answer and passed on word distance.
    reworded = kto_metrics([0.5] * 24, [f"People study the {t}, which changes over time." for t in TOPICS])
    assert failed(decide_kto(reworded, BASE)) == {"behaviour"}
    # The opening on 2 answers of 24: not enough to rule out luck.
    two = kto_metrics([0.5] * 24, ["Great question! " + a if i < 2 else a for i, a in enumerate(LIVE)])
    result = decide_kto(two, BASE)
    assert failed(result) == {"behaviour"} and "the preferred way on 2, the other way on 0 of 24" in result.checks[2]["detail"]
    # The wrong way: the live version opened with the phrase, the candidate stopped.
    opener = {**BASE, "vote_answers": kto_metrics([0.0] * 24, ["Great question! " + a for a in LIVE])["vote_answers"]}
    assert failed(decide_kto(stuck, opener)) == {"behaviour"}
    # Facts lost: the regression set refuses it, as for any version.
    forgetful = kto_metrics([0.5] * 24, ["Great question! " + a for a in LIVE], golden=(True,) * 50 + (False,) * 10)
    assert failed(decide_kto(forgetful, BASE)) == {"regression set"}
    # No held-out votes: nothing to measure, refused with the reason.
    empty = {**BASE, "vote_accuracy": None, "vote_margin": None, "vote_answers": [], "votes": 0}
    result = decide_kto(empty, empty)
    assert not result.passed and "no held-out votes" in result.checks[0]["detail"]


def test_votes_with_trls_trainer_fail_the_job_with_the_reason(store, tmp_path, checkpoint):
    from tuning.trainer import train_adapter

    result = train_adapter([], [], votes=toy_votes(4), eval_votes=toy_votes(2, start=100, prefix="e"), store=store,
                           data_dir=tmp_path, base_model_dir=checkpoint, config=JOB.replace(trainer="trl"),
                           gate_config=gate_config())
    assert result.status == "failed" and "DPO only" in result.error and store.adapters() == []
