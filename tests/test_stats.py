import pytest

from store import Store


@pytest.fixture
def store(store_on_each):  # the console's figures, on SQLite and on PostgreSQL
    return store_on_each


def _rated(store: Store, user: str, version, value, content="a", comment=None):
    cid = store.create_conversation(user)
    mid = store.add_message(cid, user, "q")
    aid = store.log_answer(
        message_id=mid, user_id=user, prompt=[{"role": "user", "content": "q"}], content=content,
        model="m", adapter_name=None if version is None else f"v{version}-x", adapter_version=version,
    )
    store.rate(aid, user, value, comment)
    return aid


def test_thumbs_up_rate_per_version_uses_current_votes_of_model_answers(store):
    _rated(store, "u1", None, 1)
    _rated(store, "u2", None, -1)
    a = _rated(store, "u3", 1, -1)
    store.rate(a, "u3", 1)  # changed their mind: counts once, as up
    _rated(store, "u4", 1, 1)
    cleared = _rated(store, "u5", 1, 1)
    store.rate(cleared, "u5", 0)  # cleared votes do not count
    edit = store.edit_answer(_rated(store, "u6", 1, 1), "u6", "mine")
    store.rate(edit, "u6", -1)  # a vote on the user's own edit is not the version's
    rows = {r["version"]: r for r in store.thumbs_up_by_version()}
    assert (rows[None]["up"], rows[None]["down"], rows[None]["rate"]) == (1, 1, 0.5)
    assert (rows[1]["up"], rows[1]["down"], rows[1]["rate"]) == (3, 0, 1.0)


def test_latest_downvotes_show_comments_and_days_are_counted(store):
    _rated(store, "u1", None, -1, content="wrong", comment="it said Lyon")
    _rated(store, "u2", None, 1)
    down = store.latest_downvotes()
    assert len(down) == 1 and down[0]["comment"] == "it said Lyon" and down[0]["answer"] == "wrong"
    days = store.ratings_per_day()
    assert len(days) == 1 and (days[0]["up"], days[0]["down"]) == (1, 1)
    assert store.feedback_count_since(None) == 2


def test_scheduled_retraining_counts_only_feedback_training_would_read(store):
    opted_out = _rated(store, "u1", None, 1)
    store.update_conversation(store.answer(opted_out, "u1")["conversation_id"], "u1", exclude_from_training=True)
    for i in range(50):  # the audit's 50 flips of one thumb in an opted-out conversation
        store.rate(opted_out, "u1", -1 if i % 2 else 1)
    store.edit_answer(opted_out, "u1", "an edit nobody may train on")
    assert store.feedback_count_since(None) == 0

    flipped = _rated(store, "u2", None, 1)
    for i in range(49):
        store.rate(flipped, "u2", 1 if i % 2 else -1)
    assert store.feedback_count_since(None) == 1  # toggled 50 times, one current vote

    cleared = _rated(store, "u3", None, 1)
    store.rate(cleared, "u3", 0)
    undone = store.edit_answer(_rated(store, "u4", None, 0), "u4", "undone edit")
    store.withdraw_answer(undone, "u4")
    assert store.feedback_count_since(None) == 1

    store.edit_answer(flipped, "u2", "kept edit")
    since = store.rows("ratings").__next__()["created_utc"]
    assert store.feedback_count_since(None) == 2 and store.feedback_count_since(since) == 2
    assert store.feedback_count_since("9999") == 0
