"""Thumbs alone teach: a store holding only lone up and down votes trains a KTO version of the
embedded SmolLM2-135M through the job's entry point (``tuning.train.run``, what ``app.py
train`` and the app's launcher run), and the version is registered with its objective,
its vote counts and the KTO gate's verdict.

Thirty-two users' questions, one answer each, one vote each: short answers (one sentence)
up-voted, long rambling ones down-voted, no question asked twice, so the pair builder makes
no pair and every vote is a lone one. The real pair builder (all-MiniLM-L6-v2 grouping, the
split) holds out the newest votes. The job uses a short recipe (one epoch, lr 1e-4) and a
small regression set so the test fits CI on two cores; the figures below are from one run.
"""

from __future__ import annotations

import time

import pytest

from tuning.gate import REGRESSION, GateConfig
from tuning.synthetic import prompts

pytestmark = pytest.mark.slow

N_VOTES = 32


def short(question: str) -> str:
    return f"In short: {question.rstrip('?').lower()} comes down to a few simple steps."


def long(question: str) -> str:
    return (f"Great question! When it comes to {question.rstrip('?').lower()}, there are many different factors "
            "to consider, and each of them matters. Let me walk you through all of them one by one in detail. "
            "First of all, it is important to understand the background before anything else.")


def log_votes(store) -> None:
    for i, question in enumerate(prompts()[:N_VOTES]):
        user = f"user{i % 4}"
        cid = store.create_conversation(user)
        mid = store.add_message(cid, user, question)
        up = i % 2 == 0
        aid = store.log_answer(message_id=mid, user_id=user, prompt=[{"role": "user", "content": question}],
                               content=short(question) if up else long(question), model="SmolLM2-135M-Instruct")
        store.rate(aid, user, 1 if up else -1)


def test_thumbs_only_feedback_trains_a_kto_version_through_the_job(tmp_path, embedded_model, monkeypatch, capsys):
    from loop import reports
    from store import Store
    from tuning import trainer
    from tuning.train import parser, run

    store = Store(tmp_path / "assistant.db")
    store.create_user("root", "root-password", is_admin=True)
    log_votes(store)
    # A smaller gate than the default (8 regression questions, 32-token answers): the
    # checks are the same, the generation time fits CI.
    monkeypatch.setitem(trainer.train_adapter.__kwdefaults__, "gate_config",
                        GateConfig(golden=REGRESSION[:8], max_new_tokens=32, max_length_prompts=8))
    started = time.monotonic()
    code = run(parser().parse_args([
        "--data-dir", str(tmp_path), "--as", "root", "--model", str(embedded_model), "--priority", "normal",
        "--set", "epochs=1", "--set", "learning_rate=0.0001"]))
    out = capsys.readouterr().out
    with capsys.disabled():
        print(out[-4000:], f"{time.monotonic() - started:.0f} s", sep="\n")
    assert code == 0, out
    assert "training by KTO on" in out and "step 1/" in out and "KTO " in out
    (job,) = store.jobs()
    row = store.adapter(job["adapter_version"])
    m, ev = row["metrics_json"], row["eval_json"]
    assert m["objective"] == "kto" and m["pairs"] == 0 and m["votes"] + ev["votes"] == N_VOTES
    assert m["votes_up"] > 0 and m["votes_down"] > 0 and m["kto_steps"] == m["steps"] > 0
    assert job["config_json"]["objective"] == "kto" and len(row["pair_ids_json"]) == m["votes"]
    assert [c["check"] for c in ev["checks"]] == ["vote accuracy", "vote margin", "behaviour", "regression set",
                                                  "fluency", "answer length"]
    # Learned, on votes it never saw: up-voted answers gained more reward than down-voted
    # ones (the base scores margin 0 and accuracy 0.5 by construction). Only 4 votes are
    # held out (the default 10%), too few for the sign test: the verdict is printed.
    assert ev["live"]["vote_margin"] == 0 and ev["vote_margin"] > 0, ev["summary"]
    assert m["vote_reward_margin"] > 0  # and on the training batches
    assert row["gate_passed"] == int(ev["passed"])
    sentence = reports.job_view(job, row)["sentence"]
    with capsys.disabled():
        print(sentence)
    assert sentence.startswith(f"v{row['version']} trained by KTO on {m['votes']} votes (")
