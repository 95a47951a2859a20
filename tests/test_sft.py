"""Supervised fine-tuning on an admin's data set, through the same job row, registry and gate
as DPO versions, on the tiny checkpoint: lineage recorded, the SFT gate's checks, refusals."""

import json
import threading

import pytest

from tiny import save_tiny_checkpoint
from tuning.config import TrainConfig
from tuning.gate import GateConfig, Golden, decide_sft

ADMIN = "root"
# The job's flow is under test here; the real-model SFT test
# (tests/integration/test_sft_embedded.py) trains in the machine's own format. The tiny
# checkpoint is initialised at 0.3 (tiny.tiny_model): at transformers' 0.02 no token could
# pass ~2% probability, and whether greedy answers said "zed" after training depended on
# the number format and the CPU's kernels (it failed in float32, and in bf16 on AVX2
# kernels, with loss 4.72 -> 4.16). At 0.3: loss 5.8 -> 0.8 and 6/6 held out in float32
# and bf16, AVX512 and AVX2 kernels, seeds 0 and 1 (2026-12-02, AMD EPYC). It answers every
# general question with random characters now, so the first job replays none (with 128:
# 760 steps; with 8, their tokens outweighed the domain's and held-out answers stayed
# random); the second job replays its parent's answers.
TINY = ["--set", "dtype=float32", "--set", "epochs=40", "--set", "rank=8", "--set", "alpha=16", "--set", "learning_rate=0.02", "--set", "replay=0", "--priority", "normal"]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's ops are microseconds; two threads on a busy 2-core machine wait a
    scheduler slice at every op (11 ms per linear layer was seen), so these run on one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-chat", initializer_range=0.3)


@pytest.fixture
def data(tmp_path, store):
    store.create_user(ADMIN, "root-password", is_admin=True)
    store.create_user("mallory", "mallory-password")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"code {i}?", "completion": f"zed {i % 3}."}) + "\n" for i in range(24)))
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"the code {i}?", "completion": f"zed {i % 3}.", "expect": ["zed"]}) + "\n"
                            for i in range(6)))
    return tmp_path, train, held


def main(data_dir, checkpoint, *args):
    from app import main as app_main

    return app_main(["--data-dir", str(data_dir), *args, "--model", str(checkpoint)])


def test_an_sft_job_trains_gates_and_registers_a_version_with_its_data_sets_lineage(data, store, checkpoint, capsys):
    tmp, train, held = data
    assert main(tmp, checkpoint, "train", "--sft", str(train), "--heldout", str(held), "--as", ADMIN, *TINY) == 0
    out = capsys.readouterr().out
    assert "24 training rows, 6 held-out rows" in out and "registered" in out
    (job,) = store.jobs()
    row = store.adapter(job["adapter_version"])
    digest = row["config_json"]["dataset"]
    assert job["status"] == "succeeded" and job["created_by"] == ADMIN
    assert row["config_json"]["method"] == "sft" and (tmp / "datasets" / f"{digest}.jsonl").is_file()
    assert row["config_json"]["dataset_lineage"]["rows"] == 24 and row["config_json"]["dataset_lineage"]["heldout_rows"] == 6
    assert row["config_json"]["batch_size"] == 8  # SFT's own defaults (tuning.sft.SFT_DEFAULTS) under --set
    assert row["config_json"]["by_length"] is True  # a data set's short rows are not padded to replayed ones
    assert row["config_json"]["learning_rate"] == 0.02
    assert len(row["pair_ids_json"]) == 24 and row["parent_version"] is None
    ev = row["eval_json"]
    assert [c["check"] for c in ev["checks"]] == ["domain", "regression set", "fluency"]
    assert ev["domain_total"] == 6 and ev["live"]["domain_total"] == 6
    assert ev["domain_passed"] > ev["live"]["domain_passed"], (ev["domain"], {k: row["metrics_json"].get(k) for k in ("first_loss", "loss", "steps", "replay_rows", "token_prob")})  # the tiny model learns "zed"
    # 24 rows, no replay (TINY), 8 to a batch, 40 epochs
    replayed = row["metrics_json"]["replay_rows"]
    assert row["config_json"]["replay"] == 0 and replayed == 0
    assert row["metrics_json"]["steps"] == -(-(24 + replayed) // 8) * 40
    assert row["metrics_json"]["loss"] < row["metrics_json"]["first_loss"]

    # The console's path: a job queued with the data set's hash, run as the app's launcher;
    # and the next version continues from the first (parent recorded).
    version = row["version"]
    queued = store.queue_job(ADMIN, {"method": "sft", "dataset": digest, "continue_from": version})
    assert main(tmp, checkpoint, "train", "--as", "system:launcher", "--job", queued, "--priority", "normal") == 0
    second = store.adapter(store.job(queued)["adapter_version"])
    assert second["parent_version"] == version and second["config_json"]["dataset"] == digest
    assert second["config_json"]["epochs"] == 6 and second["config_json"]["by_length"] is True  # SFT_DEFAULTS
    # the parent says "zed" to everything: its answers are replayed, so they all count
    assert second["metrics_json"]["steps"] == -(-(24 + second["metrics_json"]["replay_rows"]) // 8) * 6
    assert second["metrics_json"]["replay_rows"] > replayed

    # DPO from feedback continues from the SFT version: parent recorded, and its gate also
    # checks that the domain's held-out questions stay answered.
    from tiny import toy_pairs

    pairs, held_pairs = tmp / "pairs.jsonl", tmp / "held_pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in toy_pairs(8)))
    held_pairs.write_text("".join(json.dumps(p) + "\n" for p in toy_pairs(4, start=100, prefix="e")))
    assert main(tmp, checkpoint, "train", "--pairs", str(pairs), "--eval-pairs", str(held_pairs), "--as", ADMIN,
                "--set", f"continue_from={second['version']}", "--set", "epochs=1", "--priority", "normal") == 0
    dpo = store.adapter(store.jobs()[0]["adapter_version"])
    assert dpo["parent_version"] == second["version"] and dpo["config_json"]["method"] == "dpo"
    kept = dpo["eval_json"]["checks"][-1]
    assert kept["check"] == "domain kept" and dpo["eval_json"]["domain_total"] == 6, kept
    assert dpo["eval_json"]["checks"][0]["check"] == "preference accuracy"  # the DPO gate's own checks first


def test_a_refused_data_set_trains_nothing_and_says_why(data, store, checkpoint, capsys):
    tmp, train, held = data
    train.write_text(train.read_text() + json.dumps({"prompt": "code 1?", "completion": "zed 1."}) + "\n")
    assert main(tmp, checkpoint, "train", "--sft", str(train), "--as", ADMIN, *TINY) == 2
    out = capsys.readouterr().out
    assert "duplicate" in out and "REFUSED" in out
    assert store.jobs() == [] and not (tmp / "datasets").exists()
    assert main(tmp, checkpoint, "dataset", "check", str(train), "--as", ADMIN) == 3


def test_only_admins_check_add_or_train_on_data_sets(data, store, checkpoint, capsys):
    tmp, train, held = data
    for args in (["dataset", "check", str(train)], ["dataset", "add", str(train)], ["train", "--sft", str(train)]):
        assert main(tmp, checkpoint, *args, "--as", "mallory", *(TINY if args[0] == "train" else [])) == 3
        captured = capsys.readouterr()
        assert "not an admin" in captured.err or "needs an admin" in captured.err
        assert "training rows" not in captured.out  # the file was never read
    assert store.jobs() == [] and not (tmp / "datasets").exists()
    assert main(tmp, checkpoint, "dataset", "add", str(train), "--heldout", str(held), "--as", ADMIN) == 0
    assert "added as" in capsys.readouterr().out and len(list((tmp / "datasets").glob("*.jsonl"))) == 1


def test_an_sft_job_cancelled_keeps_nothing(data, store, checkpoint):
    from tuning.dataset import load_dataset, read_dataset, store_dataset
    from tuning.trainer import train_adapter

    tmp, train, held = data
    digest = store_dataset(tmp, read_dataset(train, held))
    rows, heldout = load_dataset(tmp, digest)
    stop = threading.Event()
    stop.set()
    result = train_adapter(rows, heldout, store=store, data_dir=tmp, base_model_dir=checkpoint,
                           config=TrainConfig(method="sft", dataset=digest, rank=4, alpha=8, dtype="float32"),
                           gate_config=GateConfig(golden=(Golden("code 1?", ("zed",)),), max_new_tokens=8), cancel=stop)
    assert result.status == "cancelled" and store.adapters() == []
    assert [p.name for p in (tmp / "adapters").iterdir()] == []


def test_settings_name_a_data_set_by_hash_never_by_path():
    with pytest.raises(ValueError, match="needs dataset"):
        TrainConfig().replace(method="sft")
    with pytest.raises(ValueError, match="needs dataset"):
        TrainConfig().replace(method="sft", dataset="/etc/passwd")
    with pytest.raises(ValueError, match="for method 'sft'"):
        TrainConfig().replace(dataset="a" * 64)
    assert TrainConfig().replace(method="sft", dataset="a" * 64).method == "sft"


def _sft_result(domain: list[bool], golden: list[bool], damaged: int = 0) -> dict:
    return {
        "preference_accuracy": None, "reward_margin": None, "mean_answer_tokens": 5.0,
        "domain": {f"q{i}": {"prompt": f"q{i}", "answer": "", "passed": p} for i, p in enumerate(domain)},
        "golden": {f"g{i}": {"answer": "", "passed": p} for i, p in enumerate(golden)},
        "golden_passed": sum(golden), "golden_total": len(golden),
        "damaged": {f"g{i}": "repeats" for i in range(damaged)}, "answered": len(domain) + len(golden),
    }


def test_the_sft_gate_wants_the_domain_learned_and_the_regression_set_kept():
    base = _sft_result([False] * 20, [True] * 60)
    ok = decide_sft(_sft_result([True] * 15 + [False] * 5, [True] * 59 + [False]), base)
    assert ok.passed and [c["check"] for c in ok.checks] == ["domain", "regression set", "fluency"]
    assert "75% of 20" in ok.checks[0]["detail"]
    lost = decide_sft(_sft_result([True] * 15 + [False] * 5, [True] * 50 + [False] * 10), base)
    assert not lost.passed and not lost.checks[1]["passed"]
    luck = decide_sft(_sft_result([True] * 2 + [False] * 18, [True] * 60), base)
    assert not luck.passed and not luck.checks[0]["passed"]  # 2 gained could be luck
    broken = decide_sft(_sft_result([True] * 15 + [False] * 5, [True] * 60, damaged=20), base)
    assert not broken.passed and not broken.checks[2]["passed"]
    none = decide_sft(_sft_result([], [True] * 60), _sft_result([], [True] * 60))
    assert not none.passed and "no held-out domain questions" in none.checks[0]["detail"]


def test_replayed_answers_are_the_starting_models_own_on_general_questions(checkpoint):
    """tuning.sft.replay_rows: the model's greedy answers to general questions none of which
    is in the gate's regression set; an answer cut at the token limit trains without its
    end-of-turn token, a finished one with it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuning.gate import REGRESSION
    from tuning.generation import greedy_answers
    from tuning.sft import replay_rows, tokenize_example

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = replay_rows(model, tok, 10, max_new_tokens=3)
    asked = [r["messages"][0]["content"] for r in rows]
    assert len(set(asked)) == len(asked) and not set(asked) & {g.prompt for g in REGRESSION}
    expected = greedy_answers(model, tok, [r["messages"][:1] for r in rows], max_new_tokens=3)
    assert [r["messages"][1]["content"] for r in rows] == [a for a, _ in expected]
    assert [r["cut"] for r in rows] == [n >= 3 for _, n in expected]
    assert replay_rows(model, tok, 0) == []
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "zed zed"}]}
    whole, cut = tokenize_example(tok, row, 64), tokenize_example(tok, {**row, "cut": True}, 64)
    assert whole.answer[-1] == tok.eos_token_id and cut.answer == whole.answer[:-1]
    with pytest.raises(ValueError, match="replay"):
        TrainConfig(replay=500).check()


def test_replayed_answers_are_kept_for_the_next_job_from_the_same_start(checkpoint, tmp_path, monkeypatch, capsys):
    """tuning.sft.ReplayCache: a job answers the replayed questions once per start (base
    files, parent version's weights), format, questions and token limit, reporting how far
    it got; the next job from the same start reads them. A changed start answers again; a
    damaged file is answered again and replaced; an unwritable folder only costs the reuse.
    The replayed rows' reference is kept and read back the same way."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuning import sft

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    calls = []
    real = sft.greedy_answers
    monkeypatch.setattr(sft, "greedy_answers", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    config = TrainConfig(replay=40)
    cache = sft.ReplayCache(tmp_path / ".replay", sft.starting_point(checkpoint))
    seen = []
    first = sft.prepare_replay(model, tok, config, cache, seen.append)
    assert calls == [32, 8] and [(r["replay_answered"], r["replay_total"]) for r in seen] == [(32, 40), (40, 40)]
    again = sft.prepare_replay(model, tok, config, cache)
    assert calls == [32, 8], "the same start answered the questions again"
    assert [(i.prompt, i.answer) for i in again] == [(i.prompt, i.answer) for i in first]
    assert all(torch.equal(a.ref_logps, b.ref_logps) for a, b in zip(again, first))

    questions = sft.replay_questions(40)
    here = cache.file(config, questions, sft.REPLAY_TOKENS)
    model.save_pretrained(tmp_path / "v1")
    others = [sft.ReplayCache(cache.folder, sft.starting_point(checkpoint, tmp_path / "v1")).file(config, questions, 96),
              cache.file(config.replace(dtype="bfloat16"), questions, 96), cache.file(config, questions[:39], 96),
              cache.file(config, questions, 64)]
    assert len({here, *others}) == 5
    (checkpoint / "notes.txt").write_text("a changed base folder")
    try:
        assert sft.ReplayCache(cache.folder, sft.starting_point(checkpoint)).file(config, questions, 96) != here
    finally:
        (checkpoint / "notes.txt").unlink()

    here.write_text('[{"id": "replay-0", "messages": "not a conversation"}]')
    damaged = sft.prepare_replay(model, tok, config, cache)
    assert calls == [32, 8, 32, 8] and "not readable; answering again" in capsys.readouterr().out
    assert [i.answer for i in damaged] == [i.answer for i in first] and cache.read(here) is not None

    # The reference (a forward pass over every row) is kept beside the answers and read back
    # exactly; another format, k or set of rows is another file; a damaged one is computed again.
    scored = []
    real_ref = sft.with_replay_reference
    monkeypatch.setattr(sft, "with_replay_reference", lambda m, items, *a, **k: scored.append(len(items)) or real_ref(m, items, *a, **k))
    ref = cache.reference_file(config, first)
    assert ref.exists() and ref != cache.reference_file(config.replace(dtype="bfloat16"), first)
    assert cache.reference_file(config, first[:-1]) != ref and cache.reference_file(config, first, top_k=8) != ref
    read = sft.prepare_replay(model, tok, config, cache)
    assert scored == [], "the same start scored the replayed rows again"
    assert all(torch.equal(a.ref_ids, b.ref_ids) and torch.equal(a.ref_logps, b.ref_logps) for a, b in zip(read, first))
    from safetensors.torch import load_file, save_file

    tensors = load_file(ref)
    tensors["0.ids"] = tensors["0.ids"][:-1]
    save_file(tensors, ref)
    again = sft.prepare_replay(model, tok, config, cache)
    assert scored == [len(first)] and "kept reference" in capsys.readouterr().out
    assert all(torch.equal(a.ref_logps, b.ref_logps) for a, b in zip(again, first))
    ref.write_bytes(b"not safetensors")
    sft.prepare_replay(model, tok, config, cache)
    assert scored == [len(first)] * 2 and "kept reference" in capsys.readouterr().out

    blocked = sft.ReplayCache(tmp_path / "a-file", cache.start)
    blocked.folder.write_text("")
    rows = sft.cached_replay_rows(model, tok, config, blocked)
    assert len(rows) == len(first) and "not kept" in capsys.readouterr().out


def test_kl_replay_holds_the_version_to_the_starting_models_distribution(checkpoint):
    """replay_loss="kl": replayed rows train toward the starting model's top-k next-token
    distribution, computed once. At the start the loss on a replayed row is only the mass
    outside the top k (-log of the kept share: the model is its own reference); a job with
    it trains and its loss falls."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuning.sft import collate_examples, sft_loss, tokenize_example, train_sft, with_replay_reference

    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "zed zed"}]}
    (item,) = with_replay_reference(model, [tokenize_example(tok, row, 64)], tok.eos_token_id, False, top_k=8)
    assert item.ref_ids.shape == item.ref_logps.shape == (len(item.answer), 8)
    loss, _ = sft_loss(model, collate_examples([item], tok.eos_token_id), False)
    kept = torch.logsumexp(item.ref_logps, dim=-1)  # log of the top 8's share at each position
    assert float(loss.detach()) == pytest.approx(float(-kept.mean()), abs=1e-4)

    rows = [{"id": f"d{i}", "messages": [{"role": "user", "content": f"code {i}?"},
                                         {"role": "assistant", "content": "zed 1."}]} for i in range(8)]
    config = TrainConfig(learning_rate=0.02, epochs=20, batch_size=8, replay=8, replay_loss="kl")
    metrics = train_sft(model, tok, rows, config)
    assert metrics["replay_rows"] >= 0 and metrics["loss"] < metrics["first_loss"]
    with pytest.raises(ValueError, match="replay_loss"):
        TrainConfig(replay_loss="mse").check()
