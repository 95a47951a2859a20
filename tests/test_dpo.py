"""The DPO loss, log-prob gathering and our training loop, on a tiny in-process model."""

import math

import pytest
import torch

from tiny import tiny_model, tiny_tokenizer, toy_pairs
from tuning.config import TrainConfig
from tuning.dpo import Cancelled, collate, dpo_loss, sequence_logps, tokenize_pair, train_loop


def test_equal_policy_and_reference_give_log_2():
    x = torch.tensor([-5.0, -12.0, -0.3])
    losses, cr, rr = dpo_loss(x, x - 1, x, x - 1, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))
    assert torch.all(cr == 0) and torch.all(rr == 0)


def test_loss_and_rewards_match_hand_computed_values():
    # chosen reward 0.5 * (-1 - -2) = 0.5, rejected 0.5 * (-3 - -2) = -0.5, margin 1:
    # loss = -log sigmoid(1) = log(1 + e^-1) = 0.313262
    losses, cr, rr = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert cr.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)
    # The wrong way round costs more: margin -1 gives log(1 + e) = 1.313262.
    losses, _, _ = dpo_loss(torch.tensor([-3.0]), torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.e), abs=1e-6)


def test_loss_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), 0.1)
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)


def test_sequence_logps_count_only_answer_tokens():
    tok = tiny_tokenizer()
    model = tiny_model(len(tok)).eval()
    item = tokenize_pair(tok, toy_pairs(1)[0], max_length=512)
    assert tok.decode(item.chosen) == "yes 0.<|im_end|>"  # answer through end-of-turn, no template newline
    batch = collate([item], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 2  # chosen row, then rejected row
    with torch.no_grad():
        logps, counts = sequence_logps(model, batch)
        full = torch.log_softmax(model(batch["input_ids"][:1]).logits[0], -1)
    seq = item.prompt + item.chosen
    want = sum(full[t - 1, seq[t]].item() for t in range(len(item.prompt), len(seq)))
    assert logps[0].item() == pytest.approx(want, abs=1e-4)
    assert counts.tolist() == [len(item.chosen), len(item.rejected)]


def test_long_pairs_keep_the_end_of_the_prompt():
    tok = tiny_tokenizer()
    pair = toy_pairs(1)[0]
    pair["prompt"] = [{"role": "user", "content": "x" * 300 + " the real question?"}]
    item = tokenize_pair(tok, pair, max_length=64)
    assert len(item.prompt) + max(len(item.chosen), len(item.rejected)) <= 64
    assert "real question?" in tok.decode(item.prompt)


@pytest.fixture
def lora_model():
    from peft import LoraConfig, get_peft_model

    tok = tiny_tokenizer()
    model = get_peft_model(tiny_model(len(tok)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return model, tok


def test_training_changes_lora_weights_only_and_learns_the_preference(lora_model):
    model, tok = lora_model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = []
    config = TrainConfig(rank=4, alpha=8, learning_rate=5e-3, epochs=3, batch_size=4, dtype="float32")
    metrics = train_loop(model, tok, toy_pairs(16), config, progress=rows.append)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # B starts at zero: the adapter now does something
    assert rows[0]["step"] == 1 and rows[-1]["step"] == rows[-1]["steps"] == 12
    assert rows[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)  # B = 0: policy == reference
    assert metrics["reward_accuracy"] > 0.9 and metrics["reward_margin"] > 0
    assert metrics["dpo_loss"] < rows[0]["dpo_loss"]


def test_training_stops_between_steps_when_asked(lora_model):
    model, tok = lora_model
    seen = []
    with pytest.raises(Cancelled, match="step 2"):
        train_loop(model, tok, toy_pairs(16), TrainConfig(rank=4, dtype="float32"), progress=seen.append,
                   should_stop=lambda: len(seen) >= 2)
    assert len(seen) == 2


def test_trl_trainer_optimises_the_same_objective(lora_model):
    from tuning.trl_trainer import train_trl

    model, tok = lora_model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = []
    config = TrainConfig(rank=4, alpha=8, learning_rate=5e-3, epochs=3, batch_size=4, dtype="float32", trainer="trl")
    metrics = train_trl(model, tok, toy_pairs(16), config, progress=rows.append)
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert rows[0]["reward_margin"] == pytest.approx(0, abs=1e-3)  # step 1: policy == reference
    assert metrics["steps"] == 12 and metrics["reward_accuracy"] > 0.9
    assert list(model.peft_config) == ["default"]
