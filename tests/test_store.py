import sqlite3
import threading

import pytest

from store import InvalidFeedback, NotFound, Store
from store import migrations as migrations_module
from store.rows import hash_prompt

PROMPT = [{"role": "user", "content": "hi"}]


@pytest.fixture
def store(store_on_each):
    """Every test of the store's behaviour runs on both databases; the tests below that
    take ``sqlite_store`` are about the file itself (WAL, its mode, its migrations table)."""
    return store_on_each


@pytest.fixture
def sqlite_store(tmp_path):
    return Store(tmp_path / "assistant.db")


def _integrity_errors():
    import psycopg

    return (sqlite3.IntegrityError, psycopg.IntegrityError)


def _answer(store, user="alice", content="hello", conversation=None):
    cid = conversation or store.create_conversation(user, system_prompt="Be brief.")
    mid = store.add_message(cid, user, "hi")
    aid = store.log_answer(
        message_id=mid, user_id=user, prompt=PROMPT, content=content, model="m",
        adapter_name="v3-abc", adapter_version=3, sampling={"temperature": 0.7}, latency_ms=12.5,
    )
    return cid, mid, aid


def test_answer_is_logged_with_its_model_version(store):
    cid, mid, aid = _answer(store)
    row = store.answer(aid, "alice")
    assert row["model"] == "m" and row["adapter_version"] == 3 and row["adapter_name"] == "v3-abc"
    assert row["prompt_hash"] == hash_prompt(PROMPT)
    assert row["conversation_id"] == cid and row["message_id"] == mid
    assert store.conversation(cid, "alice")["title"] == "hi"


def test_changing_a_vote_replaces_it_but_keeps_history(store):
    _, _, aid = _answer(store)
    store.rate(aid, "alice", 1)
    store.rate(aid, "alice", -1, "wrong city")
    assert store.current_rating(aid, "alice") == -1
    rows = list(store.rows("ratings"))
    assert [r["value"] for r in rows] == [1, -1]
    assert rows[-1]["comment"] == "wrong city"
    store.comment(aid, "alice", "also rude")
    assert store.current_rating(aid, "alice") == -1


def test_rating_a_missing_answer_writes_nothing(store):
    with pytest.raises(NotFound):
        store.rate("01NOSUCHANSWER", "alice", 1)
    with pytest.raises(InvalidFeedback):
        _, _, aid = _answer(store)
        store.rate(aid, "alice", 5)
    assert store.count("ratings") == 0


def test_users_cannot_touch_each_others_rows(store):
    cid, mid, aid = _answer(store, user="alice")
    with pytest.raises(NotFound):
        store.rate(aid, "mallory", -1)
    with pytest.raises(NotFound):
        store.turns(cid, "mallory")
    with pytest.raises(NotFound):
        store.edit_answer(aid, "mallory", "pwned")
    with pytest.raises(NotFound):
        store.add_message(cid, "mallory", "hello")
    assert store.conversations("mallory") == []
    assert store.count("ratings") == 0 and store.count("answers") == 1


def test_retry_siblings_edit_and_undo(store):
    cid, mid, first = _answer(store, content="first")
    second = store.log_answer(message_id=mid, user_id="alice", prompt=PROMPT, content="second", model="m")
    assert store.turns(cid, "alice")[-1].answer["id"] == second
    edit = store.edit_answer(second, "alice", "what I wanted")
    shown = store.turns(cid, "alice")[-1].answer
    assert shown["id"] == edit and shown["source"] == "edit" and shown["edited_from_id"] == second
    assert shown["prompt_hash"] == store.answer(first, "alice")["prompt_hash"]
    store.withdraw_answer(edit, "alice")
    assert store.turns(cid, "alice")[-1].answer["id"] == second
    assert len(store.answers_to(mid, "alice")) == 3  # nothing is deleted
    with pytest.raises(InvalidFeedback):
        store.edit_answer(second, "alice", "   ")


def test_next_message_follows_the_answer_shown(store):
    cid, mid, aid = _answer(store)
    m2 = store.add_message(cid, "alice", "and then?")
    assert store.message(m2, "alice")["parent_answer_id"] == aid


def test_opt_out_is_recorded(store):
    cid, _, _ = _answer(store)
    store.update_conversation(cid, "alice", exclude_from_training=True)
    assert store.conversation(cid, "alice")["exclude_from_training"] == 1


def test_writes_from_many_threads_all_land(store):
    _, _, aid = _answer(store)
    errors = []

    def vote(i):
        try:
            for j in range(20):
                store.rate(aid, "alice", 1 if j % 2 else -1)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=vote, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    assert store.count("ratings") == 160


def test_wal_and_busy_timeout(sqlite_store):
    store = sqlite_store
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000


def _schema_at(path, stop_before=None):
    import sqlite_utils

    db = sqlite_utils.Database(path)
    migrations_module.MIGRATIONS.apply(db, stop_before=stop_before)
    db.close()


@pytest.mark.parametrize("step", range(len(migrations_module.MIGRATIONS._migrations)))
def test_upgraded_file_ends_with_the_fresh_schema(tmp_path, step):
    names = [m.name for m in migrations_module.MIGRATIONS._migrations]
    old = tmp_path / "old.db"
    _schema_at(old, stop_before=names[step])  # a file made by an older release
    upgraded = Store(old)
    fresh = Store(tmp_path / "fresh.db")
    assert upgraded.schema() == fresh.schema()


def test_documented_schema_matches_migrations(sqlite_store):
    store = sqlite_store
    from pathlib import Path

    doc = Path(__file__).resolve().parent.parent / "docs" / "schema.sql"
    assert doc.read_text() == store.schema(), "regenerate with: python -m store.schema > docs/schema.sql"


def test_failed_migration_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    from sqlite_utils.migrations import Migrations

    path = tmp_path / "a.db"
    before = Store(path).schema()
    broken = Migrations("assistant")
    for m in migrations_module.MIGRATIONS._migrations:
        broken._migrations.append(m)

    @broken()
    def m999_half_done(db):
        db["new_table"].create({"id": int}, pk="id")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("store.store.MIGRATIONS", broken)
    with pytest.raises(RuntimeError):
        Store(path)
    monkeypatch.undo()
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
    assert "new_table" not in tables
    assert Store(path).schema() == before


def _adapter_row(store, version, **extra):
    row = {
        "version": version, "name": f"v{version}-abc{version}", "content_hash": f"h{version}",
        "base_model": "m@1", "path": f"adapters/v{version}", "config_json": {"r": 16},
        "pair_ids_json": ["p1", "p2"],
    }
    row.update(extra)
    return store.add_adapter(row)


def test_adapter_versions_jobs_and_promotions(store):
    assert store.next_adapter_version() == 1 and store.live_version() is None
    _adapter_row(store, 1)
    assert store.next_adapter_version() == 2
    assert store.adapter(1)["config_json"] == {"r": 16}
    with pytest.raises(_integrity_errors()):
        _adapter_row(store, 2, name="v1-abc1")  # a name is never reused
    with pytest.raises(NotFound):
        store.record_promotion(7, "admin")
    store.record_promotion(1, "admin", "better on the gate")
    assert store.live_version() == 1
    store.record_promotion(None, "admin", "rollback to base")
    assert store.live_version() is None
    assert [p["version"] for p in store.promotions()] == [None, 1]
    # A replica whose clock runs an hour fast promoted first; the newer write still wins.
    import store.registry as registry

    real = registry.utc_now
    registry.utc_now = lambda: "2099-01-01T00:00:00.000000Z"
    try:
        store.record_promotion(1, "admin", "from a replica whose clock is ahead")
    finally:
        registry.utc_now = real
    store.record_promotion(None, "admin", "rollback, from a replica on time")
    assert store.live_version() is None and store.promotions()[0]["reason"] == "rollback, from a replica on time"

    job = store.create_job("admin", {"epochs": 2})
    store.update_job(job, status="running", progress_json={"step": 3, "loss": 0.5})
    assert store.job(job)["progress_json"]["step"] == 3
    assert [j["id"] for j in store.jobs("running")] == [job]


def test_users_passwords_are_hashed_and_checked(store):
    from store import UserError

    store.create_user("alice", "correct horse", is_admin=False)
    store.create_user("root", "admin password", is_admin=True)
    raw = store.db.execute("select password_hash from users where name='alice'").fetchone()[0]
    assert "correct horse" not in raw and raw.startswith("scrypt$")
    assert store.verify_password("alice", "correct horse")
    assert not store.verify_password("alice", "wrong")
    assert not store.verify_password("nobody", "correct horse")
    assert store.is_admin("root") and not store.is_admin("alice") and not store.is_admin(None)
    with pytest.raises(UserError, match="already exists"):
        store.create_user("alice", "another password")
    with pytest.raises(UserError, match="at least"):
        store.create_user("bob", "short")
    with pytest.raises(UserError):
        store.create_user("../etc", "long enough pw")
    store.set_password("alice", "new password!")
    assert store.verify_password("alice", "new password!")
    assert all("password_hash" not in u for u in store.users())


def test_no_account_can_take_the_name_of_one_of_the_apps_own_actors(store):
    from store import UserError
    from store.actors import CANARY_MONITOR, LAUNCHER, SCHEDULER, STARTUP_CHECK, is_system

    for name in (SCHEDULER, CANARY_MONITOR, STARTUP_CHECK, LAUNCHER, "scheduler", "canary-monitor", "startup-check"):
        with pytest.raises(UserError):
            store.create_user(name, "long enough pw")
    assert store.users() == []
    assert is_system(SCHEDULER) and not is_system("scheduler") and not is_system(None)
    # Rows written before the prefix still read as they were written.
    store.record_promotion(None, "canary-monitor", "automatic rollback: older row")
    assert store.promotions()[0]["actor"] == "canary-monitor" and store.live_version() is None


def _hold_lock(store):
    """Another connection that holds the lock writers need: SQLite's write lock, or on
    PostgreSQL an exclusive lock on every table plus the store's write lock."""
    if store.url is None:
        other = sqlite3.connect(store.path, timeout=1)
        other.execute("BEGIN IMMEDIATE")
        return other
    import psycopg

    from store.postgres import WRITE_LOCK

    other = psycopg.connect(store.url)
    other.execute("LOCK TABLE ratings, messages, conversations IN EXCLUSIVE MODE")
    other.execute("SELECT pg_advisory_xact_lock(%s)", [WRITE_LOCK])
    return other


def test_a_writer_holding_the_lock_for_seconds_delays_but_loses_nothing(store):
    """Another process (a backup, a training job) locks the file; votes wait, then land."""
    import time

    _, _, aid = _answer(store)
    other = _hold_lock(store)
    done = []

    def vote():
        store.rate(aid, "alice", 1)
        done.append(time.monotonic())

    t = threading.Thread(target=vote)
    start = time.monotonic()
    t.start()
    time.sleep(2.0)
    assert not done  # still waiting for the lock, not failed
    other.rollback()
    other.close()
    t.join(timeout=10)
    assert done and done[0] - start >= 2.0
    assert store.current_rating(aid, "alice") == 1


def test_a_new_message_waits_for_another_writer_instead_of_failing(store):
    """Seen under load (bench/load_test.py): chats failed at once with "database is locked"
    while another connection wrote, the 15 s busy timeout notwithstanding."""
    import time

    cid = store.create_conversation("alice")
    other = _hold_lock(store)  # another writer (a vote, a training job) holds the lock
    outcome = []

    def send():
        try:
            outcome.append(store.add_message(cid, "alice", "hi"))
        except sqlite3.OperationalError as e:
            outcome.append(e)

    t = threading.Thread(target=send)
    t.start()
    time.sleep(1.0)
    assert not outcome  # waiting for the lock, not failed
    other.rollback()
    other.close()
    t.join(timeout=10)
    assert len(outcome) == 1 and isinstance(outcome[0], str), outcome
    assert [turn.message["id"] for turn in store.turns(cid, "alice")] == outcome
    assert store.conversation(cid, "alice")["title"] == "hi"


def test_the_database_and_its_wal_files_are_readable_by_the_owner_only(tmp_path):
    """Audit item 12: the file was created 0644, readable by every local user."""
    import os
    import stat

    store = Store(tmp_path / "new.db")
    store.create_user("alice", "alice-password")  # a write: the -wal and -shm files exist
    for name in ("new.db", "new.db-wal", "new.db-shm"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name
    old = tmp_path / "old.db"
    Store(old).db.conn.close()
    os.chmod(old, 0o644)  # a file made before this change
    Store(old)
    assert stat.S_IMODE(os.stat(old).st_mode) == 0o600
