"""The DPO loss, log-prob gathering and our training loop, on a tiny in-process model."""

import math

import pytest
import torch

from tiny import tiny_model, tiny_tokenizer, toy_pairs
from tuning.config import TrainConfig
from tuning.dpo import Cancelled, collate, dpo_loss, edited_tokens, pair_loss, sequence_logps, tokenize_pair, train_loop


def moved_lora(tok):
    """The tiny model with a LoRA adapter whose B factors are not zero: the policy differs
    from the reference, so the DPO term has a gradient (seeded: the same adapter each time)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_model(len(tok)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model


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


def test_a_batch_runs_its_shared_prefix_once_and_its_rows_in_groups_of_similar_length(monkeypatch):
    """answer_logits: the prefix every row shares (the chat template's opening) runs once and
    the rows go on from its keys and values; the rows run in groups of similar length, each
    cut to its longest row, where the padding saved is worth another pass. The same
    log-probabilities and gradients as one padded batch computed whole."""
    from tuning import dpo

    assert dpo.row_groups([10, 200, 12, 190], overhead=48) == [[0, 2], [3, 1]]
    assert dpo.row_groups([10, 200, 12, 190], overhead=1000) == [[0, 2, 3, 1]]  # a pass costs more than the padding
    assert dpo.row_groups([50, 52, 51], overhead=48) == [[0, 2, 1]]
    tok = tiny_tokenizer()
    model = moved_lora(tok)
    pairs = toy_pairs(3)
    for i, p in enumerate(pairs):  # chosen answers much shorter than rejected ones
        p["rejected"] = [{"role": "assistant", "content": "no, " * (30 + 3 * i) + "it is not."}]
    batch = collate([tokenize_pair(tok, p, 512) for p in pairs], tok.pad_token_id)
    prefix = dpo.shared_prefix(batch)
    first_answer = int(batch["completion_mask"][0].float().argmax())
    assert dpo.SHARED_PREFIX_MIN <= prefix < first_answer
    widths = []
    backbone = model.get_base_model().model
    real = backbone.forward
    monkeypatch.setattr(backbone, "forward", lambda **kw: widths.append(kw["input_ids"].shape[1]) or real(**kw))

    def run(share: bool):
        monkeypatch.setattr(dpo, "SHARED_PREFIX_MIN", 8 if share else 10**6)
        monkeypatch.setattr(dpo, "PASS_TOKENS", 48 if share else 10**6)
        model.zero_grad()
        logps, counts = sequence_logps(model, batch)
        logps.sum().backward()
        return logps.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    whole = run(share=False)
    assert widths == [batch["input_ids"].shape[1]]
    apart = run(share=True)
    longest = batch["attention_mask"].sum(1)
    assert widths[1:] == [prefix, int(longest[:3].max()) - prefix, int(longest[3:].max()) - prefix]
    assert torch.allclose(apart[0], whole[0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(apart[1], whole[1]))


def test_a_rejected_answer_that_the_chosen_one_only_extends_is_read_from_the_chosen_row(monkeypatch):
    """answer_logits: with an added closing the rejected answer is the chosen one's start
    and its end-of-turn; with an added opening, under edit marks, it is one token after the
    prompt. Neither row runs (covering_rows): the chosen row's hidden states give the same
    log-probabilities and gradients as computing them."""
    from tuning import dpo

    tok = tiny_tokenizer()
    model = moved_lora(tok)
    pairs = toy_pairs(3)
    for i, p in enumerate(pairs):
        answer = "it is " + "so, " * (5 + 4 * i) + "done."
        p["rejected"] = [{"role": "assistant", "content": answer}]
        added = answer + " Anything else?" if i < 2 else "Sure! " + answer  # two closings, one opening
        p["chosen"] = [{"role": "assistant", "content": added}]
    items = [tokenize_pair(tok, p, 512, dpo_tokens="edit") for p in pairs]
    assert len(items[2].rejected) == 1  # the opening's rejected answer: its first token
    batch = collate(items, tok.pad_token_id)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert dpo.covering_rows(batch["input_ids"], lengths, batch["completion_mask"]) == {3: 0, 4: 1, 5: 2}
    rows = []
    backbone = model.get_base_model().model
    real = backbone.forward
    monkeypatch.setattr(backbone, "forward", lambda **kw: rows.append(kw["input_ids"].shape[0]) or real(**kw))

    def run(cover: bool):
        if not cover:
            monkeypatch.setattr(dpo, "covering_rows", lambda *a: {})
        model.zero_grad()
        logps, counts = sequence_logps(model, batch)
        logps.sum().backward()
        return logps.detach(), counts, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    read = run(cover=True)
    assert sum(rows[1:]) == 3  # after the shared prefix, the three chosen rows only
    rows.clear()
    computed = run(cover=False)
    assert sum(rows[1:]) == 6
    assert torch.equal(read[1], computed[1])
    assert torch.allclose(read[0], computed[0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(read[2], computed[2]))
    # A row that only looks alike (another token before its last) still runs.
    other = batch["input_ids"].clone()
    other[3, lengths[3] - 2] = (other[3, lengths[3] - 2] + 1) % len(tok)
    assert 3 not in dpo.covering_rows(other, lengths, batch["completion_mask"])


def test_edited_tokens_mark_what_the_edit_changed():
    # An added opening: the inserted tokens, nothing of the kept answer.
    assert edited_tokens([9, 8, 1, 2, 3, 0], [1, 2, 3, 0]) == (1, 1, 1, 0, 0, 0)
    # An added closing: the new tokens and the end-of-turn after them.
    assert edited_tokens([1, 2, 3, 7, 7, 0], [1, 2, 3, 0]) == (0, 0, 0, 1, 1, 1)
    # A cut (shorter answer): the end-of-turn now said where the cut text was.
    assert edited_tokens([1, 2, 0], [1, 2, 5, 6, 0]) == (0, 0, 1)
    # A replaced word, and the word after it.
    assert edited_tokens([1, 4, 3, 0], [1, 2, 3, 0]) == (0, 1, 1, 0)
    # Nothing differs (should not reach training): every token counts, never none.
    assert edited_tokens([1, 2, 0], [1, 2, 0]) == (1, 1, 1)


def test_edit_nll_counts_only_the_edited_tokens():
    tok = tiny_tokenizer()
    model = tiny_model(len(tok)).eval()
    pair = {"prompt": [{"role": "user", "content": "q?"}], "chosen": [{"role": "assistant", "content": "Great question! yes 0."}],
            "rejected": [{"role": "assistant", "content": "yes 0."}]}
    full, edit = tokenize_pair(tok, pair, 512), tokenize_pair(tok, pair, 512, nll_tokens="edit")
    assert full.nll is None and edit.chosen == full.chosen and edit.rejected == full.rejected
    marked = [t for t, m in zip(edit.chosen, edit.nll) if m]
    assert "Great question!" in tok.decode(marked) and "0" not in tok.decode(marked)
    with torch.no_grad():
        logps, counts, nll_sums, nll_counts, _, _ = sequence_logps(model, collate([edit], tok.pad_token_id), nll=True)
        plain = sequence_logps(model, collate([full], tok.pad_token_id), nll=True)
    assert nll_counts[0].item() == sum(edit.nll) < counts[0].item()
    assert plain[3][0].item() == counts[0].item() and plain[2][0].item() == pytest.approx(logps[0].item(), abs=1e-5)
    assert nll_counts[1].item() == 0  # the rejected row never enters the NLL term
    # The DPO part of the loss does not depend on which tokens the NLL counts.
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    _, s_full = pair_loss(lora, collate([full], tok.pad_token_id), 0.1, 1.0, False)
    _, s_edit = pair_loss(lora, collate([edit], tok.pad_token_id), 0.1, 1.0, False)
    assert s_full.dpo_loss == pytest.approx(s_edit.dpo_loss, abs=1e-6) and s_full.nll != pytest.approx(s_edit.nll)


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


@pytest.mark.parametrize("reference", ["once", "step"])
def test_trl_trainer_optimises_the_same_objective(lora_model, reference, monkeypatch):
    from trl import DPOTrainer

    from tuning.trl_trainer import train_trl

    passes = []  # reference "once" is TRL's own pass over the pairs before the first step
    own = DPOTrainer._precompute_ref_logps
    monkeypatch.setattr(DPOTrainer, "_precompute_ref_logps", lambda self, *a, **k: passes.append(1) or own(self, *a, **k))
    model, tok = lora_model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = []
    config = TrainConfig(rank=4, alpha=8, learning_rate=5e-3, epochs=3, batch_size=4, dtype="float32",
                         reference=reference).replace(trainer="trl")
    metrics = train_trl(model, tok, toy_pairs(16), config, progress=rows.append)
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert rows[0]["reward_margin"] == pytest.approx(0, abs=1e-3)  # step 1: policy == reference
    assert metrics["steps"] == 12 and metrics["reward_accuracy"] > 0.9
    assert len(passes) == (reference == "once")
    assert list(model.peft_config) == ["default"]


def test_trl_trainer_records_what_it_computes_and_refuses_what_it_cannot(lora_model):
    from tuning.config import TRL_RECIPE
    from tuning.trl_trainer import train_trl

    # Asked for alone, trainer "trl" takes what TRL's DPOTrainer computes, so the job's
    # recorded settings say what ran (no edited tokens, no replay), not our loop's defaults.
    config = TrainConfig().replace(trainer="trl")
    assert {k: config.to_dict()[k] for k in TRL_RECIPE} == TRL_RECIPE
    assert TrainConfig().replace(trainer="trl", learning_rate=2e-4).replay == 0
    assert config.replace(trainer="loop").trainer == "loop"
    # One of our loop's settings asked for with it: refused by name, not ignored.
    for setting in [{"replay": 64}, {"dpo_tokens": "edit"}, {"nll_kept_starts": True}, {"unlike_kept_starts": 1.0},
                    {"by_length": True}, {"nll_tokens": "both"}]:
        with pytest.raises(ValueError, match=f"our loop's only: {next(iter(setting))}="):
            TrainConfig().replace(trainer="trl", **setting)
    # ... in the words --set takes (true, not Python's True).
    with pytest.raises(ValueError, match="only: nll_kept_starts=true.*sets dpo_tokens=answer.*nll_kept_starts=false"):
        TrainConfig().replace(trainer="trl", nll_kept_starts=True)
    with pytest.raises(ValueError, match="our loop's only: replay=32"):
        config.replace(replay=32)
    with pytest.raises(ValueError, match="SFT job trains in our own loop"):
        TrainConfig().replace(method="sft", dataset="a" * 64, trainer="trl")
    # A config built around replace() (the dataclass itself is not checked) is refused by
    # the trainer before any step.
    model, tok = lora_model
    with pytest.raises(ValueError, match="does not apply dpo_tokens=edit"):
        train_trl(model, tok, toy_pairs(4), TrainConfig(rank=4, alpha=8, trainer="trl"))


def test_reference_computed_once_gives_the_same_losses_as_at_every_step(lora_model):
    model, tok = lora_model
    base = TrainConfig(rank=4, alpha=8, learning_rate=5e-3, epochs=2, batch_size=4, dtype="float32")
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    per_step, once = [], []
    train_loop(model, tok, toy_pairs(8), base, progress=per_step.append)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[n])
    train_loop(model, tok, toy_pairs(8), base.replace(reference="once"), progress=once.append)
    assert len(per_step) == len(once) == 4
    for a, b in zip(per_step, once):
        assert b["dpo_loss"] == pytest.approx(a["dpo_loss"], abs=1e-4)
        assert b["reward_margin"] == pytest.approx(a["reward_margin"], abs=1e-4)
    assert once[-1]["dpo_loss"] < once[0]["dpo_loss"]  # and it still learns


def test_the_pairs_reference_is_kept_and_only_new_answers_are_scored(lora_model, tmp_path, monkeypatch, capsys):
    """tuning.dpo.ReferenceCache: the reference's token log-probabilities of the pairs'
    answers are kept by start and format; the next call reads them and scores only new
    sequences, with the same numbers as scoring everything (edit marks and all); the file
    then holds only that call's sequences; a damaged file is said and scored again."""
    from tuning import dpo

    model, tok = lora_model
    config = TrainConfig(rank=4, alpha=8, dtype="float32", dpo_tokens="edit")
    pad = dpo.pad_id(tok)
    items = dpo.pair_items(tok, toy_pairs(8), config)
    assert all(it.dpo is not None for it in items)
    scored = []
    real = dpo.token_logps
    monkeypatch.setattr(dpo, "token_logps", lambda m, seqs, *a, **k: scored.append(len(seqs)) or real(m, seqs, *a, **k))
    fresh = dpo.with_reference(model, items, pad, False)
    cache = dpo.ReferenceCache(tmp_path / "references", {"base": "tiny"})
    first = dpo.with_reference(model, items[:6], pad, False, cache)
    sequences = len({dpo.sequence_key(it.prompt, a) for it in items[:6] for a in (it.chosen, it.rejected)})
    assert scored == [2 * len(items), sequences] and cache.file("float32").exists()
    again = dpo.with_reference(model, items, pad, False, cache)
    new = len({dpo.sequence_key(it.prompt, a) for it in items for a in (it.chosen, it.rejected)}) - sequences
    assert scored[2:] == [new] and new > 0, "kept answers were scored again"
    flat = lambda rows: [x for it in rows for x in it.ref]  # noqa: E731
    assert flat(again) == pytest.approx(flat(fresh), abs=1e-5) and flat(first) == pytest.approx(flat(fresh[:6]), abs=1e-5)
    # Not the same start or format: nothing read. Fewer pairs: the file keeps only theirs.
    assert dpo.ReferenceCache(cache.folder, {"base": "other"}).read("float32") == {}
    assert cache.read("bfloat16") == {}
    dpo.with_reference(model, items[:2], pad, False, cache)
    assert scored[3:] == [] and len(cache.read("float32")) < sequences, "kept answers were scored again"
    cache.file("float32").write_bytes(b"damaged")
    dpo.with_reference(model, items[:2], pad, False, cache)
    assert scored[3] > 0 and "not readable; scoring the pairs again" in capsys.readouterr().out
    assert len(cache.read("float32")) == scored[3]


def test_the_gates_held_out_log_ratios_are_the_ones_it_computes_whether_kept_or_not(lora_model, tmp_path, monkeypatch,
                                                                                    capsys):
    """tuning.gate.pair_logratios: the same log-ratios as summing each answer's token
    log-probabilities one pair at a time (unpadded), kept or not; with a cache (what the
    gate keeps of a fixed version, tuning.trainer.Kept) the next call reads them, with the
    adapter on or off as asked; a damaged file is said and scored again."""
    import torch

    from tuning import dpo
    from tuning.gate import pair_logratios

    model, tok = lora_model
    with torch.no_grad():  # a LoRA that changes answers: adapter on and off must differ
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)
    pairs = toy_pairs(6)
    one = []
    for p in pairs:  # each pair alone, no padding, no cache
        it = dpo.tokenize_pair(tok, p, 512)
        lp = dpo.token_logps(model, [(it.prompt, it.chosen), (it.prompt, it.rejected)], dpo.pad_id(tok), False, alone=True)
        one.append(float(lp[0].double().sum() - lp[1].double().sum()))
    scored = []
    real = dpo.token_logps
    monkeypatch.setattr(dpo, "token_logps", lambda m, seqs, *a, **k: scored.append(len(seqs)) or real(m, seqs, *a, **k))
    on, _ = pair_logratios(model, tok, pairs, adapter_off=False, batch_size=4)
    assert on == pytest.approx(one, abs=1e-4) and scored == [12]
    cache = dpo.ReferenceCache(tmp_path / "held-out", {"version": "v1"})
    assert pair_logratios(model, tok, pairs, adapter_off=False, cache=cache)[0] == pytest.approx(one, abs=1e-4)
    assert pair_logratios(model, tok, pairs, adapter_off=False, cache=cache)[0] == pytest.approx(one, abs=1e-4)
    assert scored == [12, 12], "kept log-probabilities were scored again"
    off = pair_logratios(model, tok, pairs, adapter_off=True)[0]
    assert off != pytest.approx(one, abs=1e-3), "the adapter off scored as on"
    cache.file("float32").write_bytes(b"damaged")
    assert pair_logratios(model, tok, pairs, adapter_off=False, cache=cache)[0] == pytest.approx(one, abs=1e-4)
    assert scored[-1] == 12 and "not readable; scoring the pairs again" in capsys.readouterr().out


def test_lora_on_top_layers_only(tmp_path):
    from tuning.trainer import load_for_training
    from tiny import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "m")
    model, _ = load_for_training(folder, TrainConfig(rank=4, alpha=8, lora_layers=1), None, tmp_path)
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_" in n}
    total = model.get_base_model().config.num_hidden_layers
    assert layers == {total - 1}


def test_length_grouped_batches_cover_every_item_once_with_less_padding():
    import random as _random

    from tuning.dpo import TokenizedPair, _batches

    rng = _random.Random(0)
    items = [TokenizedPair([1] * 5, [2] * n, [3] * (n // 2 + 1)) for n in [rng.randrange(1, 300) for _ in range(64)]]
    width = lambda bs: sum(max(5 + len(items[i].chosen) for i in b) * len(b) for b in bs)  # noqa: E731
    plain, grouped = _batches(items, 4, _random.Random(1)), _batches(items, 4, _random.Random(1), by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(64)) and len(grouped) == len(plain) == 16
    assert width(grouped) < 0.8 * width(plain)


def test_edit_dpo_counts_only_what_tells_the_answers_apart():
    tok = tiny_tokenizer()
    pair = {"prompt": [{"role": "user", "content": "q?"}], "chosen": [{"role": "assistant", "content": "Great question! yes 0."}],
            "rejected": [{"role": "assistant", "content": "yes 0."}]}
    item = tokenize_pair(tok, pair, 512, dpo_tokens="edit")
    chosen_marks, rejected_marks = item.dpo
    assert "Great question!" in tok.decode([t for t, m in zip(item.chosen, chosen_marks) if m])
    # The rejected answer's first token is what was said instead of the added opening; the
    # rest of it is the chosen answer's too and is not pushed down.
    assert rejected_marks[0] == 1 and sum(rejected_marks) <= 2
    model = tiny_model(len(tok)).eval()
    batch = collate([item], tok.pad_token_id)
    with torch.no_grad():
        masked, counts = sequence_logps(model, batch)
        whole, _ = sequence_logps(model, collate([tokenize_pair(tok, pair, 512)], tok.pad_token_id))
    assert masked[1].item() > whole[1].item()  # fewer (negative) terms counted
    assert counts.tolist() == [len(item.chosen), len(item.rejected)]

    # Past its last marked token the rejected answer is not computed (nothing counts it there):
    # the same loss and gradients as with the whole rejected answer, its later tokens unmarked.
    import dataclasses

    full = tokenize_pair(tok, pair, 512).rejected
    assert len(item.rejected) == max(i for i, m in enumerate(rejected_marks) if m) + 1 < len(full)
    whole_item = dataclasses.replace(item, rejected=full, dpo=(chosen_marks, rejected_marks + (0,) * (len(full) - len(item.rejected))))
    lora = moved_lora(tok)
    grads = []
    for it in (item, whole_item):
        lora.zero_grad()
        loss, _ = pair_loss(lora, collate([it], tok.pad_token_id), 0.1, 1.0, False, "both")
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in lora.parameters() if p.requires_grad]))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


def test_chosen_tail_ends_the_chosen_answer_after_its_last_edited_token_and_changes_only_the_whole_answer_mean():
    """TrainConfig.chosen_tail: an added opening keeps ``tail`` chosen tokens after its last
    edited one; the DPO and edit marks, the unlikelihood positions and the DPO log-ratios
    are those of the whole pair (what comes later changes nothing before it); an added
    closing, edited at its end, keeps all of it."""
    tok = tiny_tokenizer()
    answer = "yes it is, " * 12 + "so."
    opening = {"prompt": [{"role": "user", "content": "q?"}], "chosen": [{"role": "assistant", "content": "Great question! " + answer}],
               "rejected": [{"role": "assistant", "content": answer}]}
    closing = {**opening, "chosen": [{"role": "assistant", "content": answer + " Anything else?"}]}
    args = dict(nll_tokens="both", dpo_tokens="edit", kept=True, unlike=True)
    whole, cut = (tokenize_pair(tok, opening, 512, **args, tail=t) for t in (0, 3))
    last = max(i for i, m in enumerate(whole.dpo[0]) if m)
    assert len(cut.chosen) == last + 1 + 3 < len(whole.chosen)
    assert cut.chosen == whole.chosen[: len(cut.chosen)] and cut.rejected == whole.rejected
    assert cut.dpo == (whole.dpo[0][: len(cut.chosen)], whole.dpo[1]) and sum(cut.dpo[0]) == sum(whole.dpo[0])
    assert cut.nll == whole.nll[: len(cut.chosen)] and cut.unlike == whole.unlike
    ends = [tokenize_pair(tok, closing, 512, **args, tail=t) for t in (0, 3)]
    assert ends[0] == ends[1]
    model = tiny_model(len(tok)).eval()
    with torch.no_grad():
        a = sequence_logps(model, collate([whole], tok.pad_token_id), nll=True)
        b = sequence_logps(model, collate([cut], tok.pad_token_id), nll=True)
    assert torch.allclose(a[0], b[0], atol=1e-5)  # the DPO log-ratios' sums
    assert torch.allclose(a[2], b[2], atol=1e-5)  # the edit mean's sums
    assert b[1][0] < a[1][0]  # the whole-answer mean reads fewer tokens
    with pytest.raises(ValueError, match="chosen_tail"):
        TrainConfig(chosen_tail=-1).check()


def test_replayed_answers_hold_a_dpo_version_to_what_it_said_elsewhere():
    """TrainConfig.replay in a feedback job: each DPO step also trains the KL from the starting
    model's distribution on replayed general answers (tuning.sft.Replay). The same DPO run
    with replay ends closer to the starting model on those answers than without, and still
    learns the preference."""
    import copy

    from tuning.sft import Replay, collate_examples, sft_loss, tokenize_example, with_replay_reference

    tok = tiny_tokenizer()
    from peft import LoraConfig, get_peft_model

    start = get_peft_model(tiny_model(len(tok)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    rows = [{"messages": [{"role": "user", "content": f"what is {w}?"}, {"role": "assistant", "content": f"{w} is a word."}]}
            for w in ("sky", "sea", "sun", "moon", "tree", "rock", "wind", "rain")]
    pad = tok.eos_token_id
    items = with_replay_reference(start, [tokenize_example(tok, r, 64) for r in rows], pad, False, top_k=8)

    def replay_loss(model) -> float:
        with torch.no_grad():
            return float(sft_loss(model, collate_examples(items, pad), False)[0])

    config = TrainConfig(rank=4, alpha=8, learning_rate=5e-3, epochs=3, batch_size=4, dtype="float32")
    before = replay_loss(start)
    plain, held = copy.deepcopy(start), copy.deepcopy(start)
    train_loop(plain, tok, toy_pairs(16), config)
    steps: list[dict] = []
    metrics = train_loop(held, tok, toy_pairs(16), config, progress=steps.append,
                         replay=Replay(items, per_step=4, weight=5.0, pad=pad, autocast=False))
    assert all(r["replay_kl"] is not None for r in steps)
    assert steps[0]["replay_kl"] == pytest.approx(before, abs=0.05)  # the first rows, before any update
    assert metrics["reward_accuracy"] > 0.9 and metrics["replay_kl"] is not None
    drift_plain, drift_held = replay_loss(plain) - before, replay_loss(held) - before
    assert drift_plain > 0.05, "the DPO run alone should move the replayed answers' distribution"
    assert drift_held < drift_plain / 2, (drift_held, drift_plain)


def test_replay_settings_are_checked():
    with pytest.raises(ValueError, match="replay_per_step"):
        TrainConfig(replay_per_step=0).check()
    with pytest.raises(ValueError, match="replay_weight"):
        TrainConfig(replay_weight=-1).check()


def _pair(rejected: str, chosen: str, i: int = 0) -> dict:
    return {"id": f"p{i}", "prompt": [{"role": "user", "content": f"question {i}?"}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "signal": "edit"}


def test_an_edit_that_adds_a_closing_also_trains_against_closing_after_the_first_sentence(lora_model):
    """TrainConfig.early_close: an edit that only adds text after the whole answer gets a
    second pair, the same chosen answer against the added text after the answer's first
    sentence; other edits (a cut, an opening, a one-sentence answer, a list) get none."""
    from tuning.dpo import early_close_pairs

    added = _pair("Paris is the capital. It is on the Seine. It has museums.",
                  "Paris is the capital. It is on the Seine. It has museums. I hope this helps.")
    (extra,) = early_close_pairs([added])
    assert extra["chosen"] == added["chosen"] and extra["prompt"] == added["prompt"]
    assert extra["rejected"][-1]["content"] == "Paris is the capital. I hope this helps."
    assert extra["id"] == "p0:early-close" and added["rejected"][-1]["content"].endswith("museums.")  # the user's pair unchanged
    assert early_close_pairs([
        _pair("One sentence only.", "One sentence only. I hope this helps."),  # nothing to close early
        _pair("Paris is the capital. It is on the Seine.", "Paris is the capital."),  # a cut
        _pair("Paris is the capital. It is big.", "Great question! Paris is the capital. It is big."),  # an opening
        _pair("1. Eat well\n2. Sleep", "1. Eat well\n2. Sleep\nI hope this helps."),  # "1." ends no sentence
        _pair("Paris is the capital. It is big.", "Paris is the capital. It is big."),  # no edit
    ]) == []

    model, tok = lora_model
    config = TrainConfig(rank=4, alpha=8, learning_rate=5e-3, epochs=1, batch_size=4, dtype="float32", early_close=True)
    rows = []
    metrics = train_loop(model, tok, [added, *toy_pairs(3)], config, progress=rows.append)
    assert metrics["early_close_pairs"] == 1 and rows[-1]["steps"] == 2  # 5 pairs, 4 to a step
    assert "early_close_pairs" not in train_loop(model, tok, toy_pairs(4), config.replace(early_close=False))
    with pytest.raises(ValueError, match="early_close must be true or false"):
        TrainConfig().replace(early_close="yes")


def test_kept_starts_stress_where_the_user_went_on_before_an_added_closing():
    tok = tiny_tokenizer()
    ask = [{"role": "user", "content": "q?"}]

    def marks(chosen: str, rejected: str, kept: bool) -> tuple[list[int], set[int]]:
        item = tokenize_pair(tok, {"prompt": ask, "chosen": [{"role": "assistant", "content": chosen}],
                                   "rejected": [{"role": "assistant", "content": rejected}]}, 512, "both", "edit", kept)
        return item.chosen, {j for j, m in enumerate(item.nll) if m}

    body = "yes it is. no, 2.5 is not. 1. yes again."
    ids, plain = marks(f"{body} Hope it helps.", body, False)
    _, kept = marks(f"{body} Hope it helps.", body, True)
    # One token per character here: added, the token after each of the first two sentence
    # ends (the user went on there); not after the decimal's or the numbered line's point;
    # the third end is where the closing was added, already marked.
    after_ends = {body.index("is. ") + 3, body.index("not. ") + 4}
    assert kept - plain == after_ends and plain <= kept
    assert not kept & {body.index("2.5") + 2, body.index("1. ") + 2}
    assert tok.decode([ids[j] for j in sorted(plain)]).strip().startswith("Hope it helps.")
    # An opening or a cut puts nothing of the user's before kept sentences: edited_tokens' marks alone.
    for chosen in (f"Great question! {body}", "yes 0."):
        assert marks(chosen, body, True)[1] == marks(chosen, body, False)[1]
    with pytest.raises(ValueError, match="nll_kept_starts must be true or false"):
        TrainConfig().replace(nll_kept_starts="yes")


def test_unlikelihood_pushes_the_added_closing_down_where_the_user_went_on():
    tok = tiny_tokenizer()
    ask = [{"role": "user", "content": "q?"}]
    body = "yes it is. no, 2.5 is not. 1. yes again."

    def item(chosen: str, rejected: str = body, unlike: bool = True):
        return tokenize_pair(tok, {"prompt": ask, "chosen": [{"role": "assistant", "content": chosen}],
                                   "rejected": [{"role": "assistant", "content": rejected}]}, 512, "both", "edit",
                             True, unlike)

    closed = item(f"{body} Hope it helps.")
    # One token per character: at the two kept sentence starts (not the decimal's or the
    # numbered line's), the first token the user added (the closing's, after the body).
    first = len(body)
    assert tok.decode(closed.chosen[first:]).startswith(" Hope it helps.")
    assert closed.unlike == ((body.index("is. ") + 3, closed.chosen[first]), (body.index("not. ") + 4, closed.chosen[first]))
    # A cut answer: its end-of-turn is what must not come at the sentence starts it kept.
    cut = item("yes it is. no, 2.5 is not.")
    assert cut.unlike == ((body.index("is. ") + 3, tok.eos_token_id),)
    # An opening adds nothing at the end, and off means off.
    assert item(f"Great question! {body}").unlike == ()
    assert item(f"{body} Hope it helps.", unlike=False).unlike is None

    # The term is -log(1 - p) of those tokens at those positions, averaged, added to the
    # loss at its weight.
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(len(tok)), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).eval()
    batch = collate([closed], tok.pad_token_id)
    assert batch["unlike_ids"][1].eq(-1).all()  # the rejected row pushes nothing down
    *_, unlike = sequence_logps(model, batch, nll=True)
    with torch.no_grad():
        probs = torch.softmax(model(batch["input_ids"][:1]).logits[0].float(), -1)
    at = [(len(closed.prompt) + j, t) for j, t in closed.unlike]
    want = sum(-math.log(1 - probs[pos - 1, t].item()) for pos, t in at) / len(at)
    assert unlike.item() == pytest.approx(want, rel=1e-4)
    loss_off, _ = pair_loss(model, batch, 0.1, 1.0, False, "both", 0.0)
    loss_on, stats = pair_loss(model, batch, 0.1, 1.0, False, "both", 2.0)
    assert loss_on.item() == pytest.approx(loss_off.item() + 2.0 * want, rel=1e-4) and stats.unlike == pytest.approx(want, rel=1e-4)
    with pytest.raises(ValueError, match="unlike_kept_starts must be 0"):
        TrainConfig().replace(unlike_kept_starts=-1)
