"""The whole loop in the real app, as its users and admins drive it over HTTP.

A user chats and edits answers; a non-admin is refused every admin action; an admin
retrains (a second retrain is refused while the first runs), watches the job finish,
promotes the new version and the user's next answer comes from it; a canary splits users
as configured and is rolled back by itself when clearly worse; a rollback returns to the
base model; after a restart the promoted version is live again.
"""

import time

import pytest
from gradio_client import Client

from assistant.serving import in_canary
from servers import running_app
from store import Store
from store.actors import CANARY_MONITOR

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?", "How do plants make food?", "What is a prime number?",
    "Why is the sky blue?", "What does a CPU do?", "How do vaccines work?", "What is gravity?",
    "Who wrote Hamlet?", "What is the boiling point of water?", "How far is the Moon?",
    "What is photosynthesis?", "What causes rain?",
]
CANARY_USERS = 40  # at 50%, fewer than 8 on a side has odds of about 1 in 25,000


def client(url, user):
    return Client(url, verbose=False, auth=(user, f"{user}-password"))


def test_feedback_to_live_version_and_back(tmp_path, embedded_model):
    data = tmp_path / "data"
    store = Store(data / "assistant.db")
    for name in ["alice", "bob", *(f"u{i}" for i in range(CANARY_USERS))]:
        store.create_user(name, f"{name}-password")
    store.create_user("root", "root-password", is_admin=True)
    # float32 serving: the format whose greedy answers the gate reproduces token for token
    # (the gate evaluates in float32; a bfloat16 server may differ at near-ties).
    common = ["--models-dir", str(embedded_model.parent), "--temperature", "0", "--max-new-tokens", "24", "--dtype", "float32",
              # The loop is under test here, not the recipe: 16 replayed general answers, not 128
              # (answering 128 before the first step took 390 s on AVX2 kernels in float32).
              "--train-set", "epochs=1", "--train-set", "max_length=256", "--train-set", "replay=16",
              "--canary-min-votes", "8"]

    with running_app(data, *common, timeout_s=420) as url:
        alice, bob, root = client(url, "alice"), client(url, "bob"), client(url, "root")
        for q in QUESTIONS:
            answer = alice.predict(message=q, api_name="/chat")
            assert answer["model"].endswith("· base")
            alice.predict(answer_id=answer["answer_id"], text=answer["text"].split(".")[0] + ". Hope this helps!", api_name="/edit")

        for name, kwargs in [
            ("/admin_retrain", {"settings": ""}), ("/admin_cancel", {}), ("/admin_versions", {}),
            ("/admin_job", {}), ("/admin_promote", {"version": "v1"}), ("/admin_rollback", {"version": "base model"}),
            ("/admin_canary", {"version": "v1", "percent": 10}), ("/admin_stop_canary", {}),
            ("/admin_compare", {"version": "v1"}),
        ]:
            with pytest.raises(Exception, match="needs an admin"):
                bob.predict(**kwargs, api_name=name)
        assert store.jobs() == [] and store.promotions() == []

        job = root.predict(settings="", api_name="/admin_retrain")
        with pytest.raises(Exception, match="still"):
            root.predict(settings="", api_name="/admin_retrain")
        deadline = time.monotonic() + 900
        seen_progress = False
        while time.monotonic() < deadline:
            status = root.predict(api_name="/admin_job")
            seen_progress |= "step" in (status.get("progress_json") or {})
            if status["status"] not in ("queued", "running"):
                break
            time.sleep(2)
        assert status["id"] == job["id"] and status["status"] == "succeeded", status
        assert seen_progress and status["adapter_version"] == 1
        versions = root.predict(api_name="/admin_versions")
        v1 = next(v for v in versions if v["version"] == "v1")
        assert v1["pairs"] >= 8 and v1["cost $"] is not None
        # A tenth of the pairs is held out (2 of 12 here). On fewer than 5 the sign test cannot
        # reach p <= 0.05 (all better gives p = 2**-n), so the gate fails on the reward margin
        # whatever was learned, and the admin promotes with an override below.
        row = store.adapter(1)
        assert row["metrics_json"]["eval_pairs"] < 5 and v1["gate"] == "failed"
        assert "reward margin" in {c["check"] for c in row["eval_json"]["checks"] if not c["passed"]}

        root.predict(version="v1", reason="e2e test", override=True, api_name="/admin_promote")
        after = alice.predict(message="What is the capital of France?", api_name="/chat")
        assert "· v1 (v1-" in after["model"]
        # The gate judged the answers users get: v1 served greedily by vLLM says what the
        # gate recorded for it (the gate's answers run to 64 tokens, the app's to 24 here).
        recorded = row["eval_json"]["golden"]
        for q in list(recorded)[:8]:
            served = alice.predict(message=q, api_name="/chat")
            assert "· v1 (v1-" in served["model"]
            assert recorded[q]["answer"].strip().startswith(served["text"].strip()), (q, served["text"], recorded[q])

        # Canary: v1 live, base model as the candidate is impossible, so promote back to base
        # and make v1 the canary for half of the users.
        root.predict(version="base model", reason="back to base", api_name="/admin_rollback")
        assert alice.predict(message="Hi", api_name="/chat")["model"].endswith("· base")
        root.predict(version="v1", percent=50, api_name="/admin_canary")
        key = store.latest_promotion("canary")["id"]
        on_canary, answers = 0, {}
        for i in range(CANARY_USERS):
            user = f"u{i}"
            c = client(url, user)
            answer = c.predict(message="Say hello.", api_name="/chat")
            expect_canary = in_canary(user, key, 0.5)
            assert ("· v1 (" in answer["model"]) == expect_canary, (user, answer["model"])
            on_canary += expect_canary
            answers[user] = (c, answer["answer_id"], expect_canary)
        # Votes only after every user was served: the monitor may (rightly) roll back mid-way.
        # Users like the live (base) answers and dislike the candidate's: clearly worse.
        for c, answer_id, on in answers.values():
            c.predict(answer_id=answer_id, value=-1 if on else 1, comment="", api_name="/rate")
        assert 8 <= on_canary <= 32
        for _ in range(30):  # the control loop checks every 2 s
            if store.latest_promotion("canary")["share"] == 0:
                break
            time.sleep(1)
        last = store.latest_promotion("canary")
        assert last["share"] == 0 and last["actor"] == CANARY_MONITOR, last
        assert client(url, "u0").predict(message="Hi", api_name="/chat")["model"].endswith("· base")

        root.predict(version="v1", reason="for the restart check", override=True, api_name="/admin_promote")

    # After a restart (the lighter hf engine is enough to check what is live) v1 serves.
    with running_app(data, *common, "--engine", "hf") as url:
        assert "· v1 (v1-" in client(url, "alice").predict(message="Hello", api_name="/chat")["model"]
