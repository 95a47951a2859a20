"""A store that looks like a few weeks of use, for the admin console's tests: votes over
several days on the base model and two versions, a finished job that produced v2 (refused by
the gate) after v1 (passed, live), and gate records shaped as ``tuning.trainer._evaluate``
writes them (checks with value, live and threshold; golden and held-out answers of both
sides). Hostile text sits in prompts, answers and comments, as users and models can write it."""

from __future__ import annotations

import datetime as dt

from test_control import _version

HOSTILE = '<img src=x onerror="alert(1)"> ${value} {{value}}'

GOLDEN = {
    "What is the capital of France?": ("The capital of France is Paris.", "The capital of France is Paris.", True, True),
    "How many days are in a week?": ("There are 7 days in a week.", "A week has several days.", True, False),
    "What is 2 + 2?": ("2 + 2 equals 4.", "4.", True, True),
}
HELD_OUT = {
    "How do plants make food?": ("Plants make food through photosynthesis, a process that uses sunlight, water and air.",
                                 "Plants make food through photosynthesis. Hope this helps!"),
    "Why is the sky blue?": ("The sky is blue because air scatters blue light more than red light.",
                             "The sky is blue because air scatters blue light. Hope this helps!"),
    HOSTILE: ("I cannot show images.", "I cannot show images. " + HOSTILE),
}


def gate_record(live_version: int | None, passed: bool) -> dict:
    """An ``eval_json``: the candidate's metrics and answers, ``live`` the same for the live version."""
    def side(which: int) -> dict:
        golden = {q: {"answer": v[which], "passed": v[2 + which]} for q, v in GOLDEN.items()}
        return {"golden": golden, "golden_passed": sum(g["passed"] for g in golden.values()), "golden_total": len(golden),
                "answers": [{"prompt": q, "answer": v[which]} for q, v in HELD_OUT.items()]}

    cand, live = side(1), side(0)
    if passed:  # the candidate kept every golden answer
        cand = {**cand, "golden": live["golden"], "golden_passed": live["golden_passed"]}
    cand.update(preference_accuracy=0.875, reward_margin=1.62, mean_answer_tokens=18.5, pairs=8)
    live.update(preference_accuracy=0.0, reward_margin=0.0, mean_answer_tokens=31.0, pairs=8)
    checks = [
        {"check": "preference accuracy", "passed": True, "detail": "0.875 vs live 0.000", "value": 0.875, "live": 0.0,
         "threshold": "above 0.000"},
        {"check": "reward margin", "passed": True, "detail": "1.620 vs live 0.000; better on 8/8 pairs (p=0.0039)",
         "value": 1.62, "live": 0.0, "threshold": "above 0.000, better on enough pairs to rule out luck (sign test p <= 0.05)"},
        {"check": "golden prompts", "passed": passed,
         "detail": "3/3 vs live 3/3" if passed else "2/3 vs live 3/3; now wrong: How many days are in a week?",
         "value": f"{cand['golden_passed']}/3", "live": "3/3", "threshold": "every golden prompt the live version answers right"},
        {"check": "answer length", "passed": True, "detail": "18.5 vs live 31.0 tokens (-40%, limit +-50%)",
         "value": 18.5, "live": 31.0, "threshold": "15.5-46.5 tokens (+-50% of live)"},
        # A check this console has never heard of, without the optional keys: shown from its detail.
        {"check": "toxicity screen", "passed": True, "detail": "0 of 3 answers flagged"},
    ]
    return {**cand, "live_version": live_version, "live": live, "checks": checks, "passed": passed}


def _at(store, table: str, row_id: str, when: dt.datetime) -> None:
    store.db.execute(f"UPDATE {table} SET created_utc = ? WHERE id = ?", [when.isoformat(), row_id])


def vote(store, user: str, version: int | None, value: int, when: dt.datetime, text: str = "a", comment=None) -> None:
    cid = store.create_conversation(user)
    mid = store.add_message(cid, user, HOSTILE if comment else "q")
    aid = store.log_answer(message_id=mid, user_id=user, prompt=[], content=text, model="m",
                           adapter_name=f"v{version}" if version else None, adapter_version=version)
    store.rate(aid, user, value, comment=comment)
    store.db.execute("UPDATE ratings SET created_utc = ? WHERE answer_id = ?", [when.isoformat(), aid])


def job_row(store, *, version: int | None, status: str, steps: int = 16, done: int | None = None,
            phase: str = "training", started_minutes_ago: float = 6.0) -> str:
    """A job with a per-step history as the trainer writes it."""
    now = dt.datetime.now(dt.timezone.utc)
    started = now - dt.timedelta(minutes=started_minutes_ago)
    done = steps if done is None else done
    history = [{"step": s, "loss": round(1.69 * 0.93 ** s, 4), "reward_accuracy": min(1.0, 0.25 + s / steps),
                "reward_margin": round(0.12 * s, 4), "seconds": 20.0 * s} for s in range(1, done + 1)]
    progress = {"phase": phase, "step": done, "steps": steps, "history": history, "seconds": 20.0 * done,
                "phases": [["loading", 2.0], ["training", 9.0]], **(history[-1] if history else {})}
    job = store.queue_job("root", {"epochs": 2})
    fields = {"status": status, "started_utc": started.isoformat(), "progress_json": progress,
              "heartbeat_utc": now.isoformat()}
    if status not in ("queued", "running"):
        fields["finished_utc"] = now.isoformat()
        fields["config_json"] = {"epochs": 2, "pairs": 24}
    if version:
        fields["adapter_version"] = version
    store.update_job(job, **fields)
    return job


def seed(store) -> None:
    """Three weeks of votes, v1 live (passed), v2 trained afterwards and refused."""
    now = dt.datetime.now(dt.timezone.utc)
    store.create_user("root", "root-password", is_admin=True)
    store.create_user("alice", "alice-password")
    for d in range(6, 0, -1):  # votes on six days: base first, then v1 once it went live
        day = now - dt.timedelta(days=d)
        version = None if d > 3 else 1
        for i in range(3 + d):
            vote(store, f"u{i}", version, 1 if i % 3 else -1, day)
    # Today, a seventh day: an hour ago, or midnight when it is not yet 1:00 UTC (an hour
    # before 00:20 is yesterday, a day the loop above already filled; a CI run at 00:19
    # counted six days).
    today = max(now - dt.timedelta(hours=1), now.replace(hour=0, minute=0, second=0, microsecond=0))
    vote(store, "alice", 1, -1, today, text="Paris is in Italy. " + HOSTILE, comment=HOSTILE)
    _version(store, 1, gate=True)
    store.update_adapter(1, eval_json=gate_record(None, True), pair_ids_json=[f"p{i}" for i in range(12)],
                         metrics_json={"loss": 0.41, "first_loss": 1.69, "steps": 8, "eval_pairs": 8},
                         config_json={"learning_rate": 5e-5, "epochs": 2, "rank": 16, "beta": 0.1},
                         train_seconds=212.0, trainable_params=4884480, trainable_share=0.035,
                         cost_json={"estimated_usd": 0.0059, "full_finetune_usd": 0.0079})
    store.record_promotion(1, "root", "passed the gate")
    _version(store, 2, gate=False)
    ev2 = gate_record(1, False)
    ev2.update(preference_accuracy=0.93, reward_margin=2.4, mean_answer_tokens=16.0)
    store.update_adapter(2, eval_json=ev2, pair_ids_json=[f"p{i}" for i in range(24)],
                         metrics_json={"loss": 0.22, "first_loss": 1.69, "steps": 16, "eval_pairs": 8})
    job_row(store, version=2, status="succeeded")
