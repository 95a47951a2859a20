"""Several app replicas on one PostgreSQL database: no rating lost, one training job, one
live version, and a clear message when the database cannot be used.

Each ``Store`` below is its own set of connections, as another app process would hold;
the rating test also writes from separate processes. The store's behaviour on both
databases is tests/test_store.py's.
"""

import subprocess
import sys
import threading
import time

import pytest

from assistant.engine import Adapter
from loop.control import Conflict, Controller, LoopConfig
from store import DatabaseUnavailable, JobConflict, Store
from store.postgres import redact

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent

_VOTER = """
import sys
sys.path.insert(0, {root!r})
from store import Store
store = Store(sys.argv[1])
for i in range(int(sys.argv[3])):
    store.rate(sys.argv[2], "alice", 1 if i % 2 else -1, f"{{sys.argv[4]}}-{{i}}")
"""


def _answer(store):
    cid = store.create_conversation("alice")
    mid = store.add_message(cid, "alice", "hi")
    return store.log_answer(message_id=mid, user_id="alice", prompt=[{"role": "user", "content": "hi"}],
                            content="hello", model="m")


def test_ratings_from_two_processes_and_many_threads_all_land(pg_url):
    store = Store(pg_url)
    aid = _answer(store)
    procs = [subprocess.Popen([sys.executable, "-c", _VOTER.format(root=str(ROOT)), pg_url, aid, "100", f"p{n}"],
                              stderr=subprocess.PIPE) for n in range(2)]
    errors = []

    def vote(n):  # and threads of a third process (this one), each store its own connections
        try:
            other = Store(pg_url)
            for i in range(25):
                other.rate(aid, "alice", 1, f"t{n}-{i}")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=vote, args=(n,)) for n in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-2000:]
    assert errors == []
    assert store.count("ratings") == 2 * 100 + 4 * 25
    comments = {r["comment"] for r in store.rows("ratings")}
    assert len(comments) == 300  # every one of them, none written twice


def test_one_training_job_across_replicas(pg_url):
    """Eight replicas press retrain at the same moment: one job is queued, seven refused."""
    stores = [Store(pg_url) for _ in range(8)]
    start, outcomes = threading.Barrier(len(stores)), []

    def press(store):
        start.wait()
        try:
            outcomes.append(store.queue_job("root", {}))
        except JobConflict as e:
            outcomes.append(e)

    threads = [threading.Thread(target=press, args=(s,)) for s in stores]
    [t.start() for t in threads]
    [t.join() for t in threads]
    queued = [o for o in outcomes if isinstance(o, str)]
    assert len(queued) == 1 and len(outcomes) == 8
    assert [j["id"] for j in stores[0].jobs()] == queued
    with pytest.raises(JobConflict):  # and later, from another process's store
        Store(pg_url).queue_job("root", {})
    stores[3].update_job(queued[0], status="succeeded")
    assert stores[5].queue_job("root", {})  # the slot is free again


def test_replicas_opening_a_new_database_together_migrate_it_once(pg_url):
    errors = []

    def open_it():
        try:
            Store(pg_url)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    from store.migrations import MIGRATIONS

    rows = Store(pg_url).db.execute("SELECT name FROM _migrations ORDER BY name").fetchall()
    assert [r[0] for r in rows] == sorted(m.name for m in MIGRATIONS._migrations)


def test_the_same_migrations_make_the_same_tables_on_both(pg_url, tmp_path):
    lite, pg = Store(tmp_path / "a.db"), Store(pg_url)

    def sqlite_tables():
        names = [r[0] for r in lite.db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE '\\_%' ESCAPE '\\' "
            "AND name NOT LIKE 'sqlite_%'").fetchall()]
        return {n: [c[1] for c in lite.db.execute(f"PRAGMA table_info({n})").fetchall()] for n in names}

    pg_tables = {n: pg.db.columns(n) for n in pg.db.table_names() if not n.startswith("_")}
    assert pg_tables == sqlite_tables()
    views = pg.db.execute("SELECT table_name FROM information_schema.views WHERE table_schema = 'public'").fetchall()
    assert [v[0] for v in views] == ["current_ratings"]


def test_a_failed_migration_leaves_the_database_as_it_was(pg_url, monkeypatch):
    from sqlite_utils.migrations import Migrations

    from store import migrations as migrations_module

    before = Store(pg_url).db.table_names()
    broken = Migrations("assistant")
    broken._migrations.extend(migrations_module.MIGRATIONS._migrations)

    @broken()
    def m999_half_done(db):
        db["new_table"].create({"id": int}, pk="id")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("store.store.MIGRATIONS", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        Store(pg_url)
    monkeypatch.undo()
    assert Store(pg_url).db.table_names() == before


# -- replicas serve one live version -----------------------------------------------------


class Router:
    def __init__(self):
        self.live, self.canary = "unset", (None, 0.0, "")

    def set_live(self, adapter):
        self.live = adapter

    def set_canary(self, adapter, share, key):
        self.canary = (adapter, share, key)


def _replica(url):
    store = Store(url)
    router = Router()
    c = Controller(store, router, adapter_of=lambda v: Adapter(f"v{v}-{v:012x}", f"/a/{v}", v),
                   launcher=lambda job: None, config=LoopConfig())  # the app's own poll interval
    return c, router, store


def _within(seconds, check):
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if check():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds} s")


def test_a_promotion_rollback_or_canary_on_one_replica_is_served_by_the_other_within_2_s(pg_url):
    a, router_a, store = _replica(pg_url)
    store.create_user("root", "root-password", is_admin=True)
    for v in (1, 2):
        store.add_adapter({"version": v, "name": f"v{v}-{v:012x}", "content_hash": str(v), "base_model": "m@1",
                           "path": f"adapters/v{v}", "gate_passed": 1})
    b, router_b, _ = _replica(pg_url)
    a.start(), b.start()
    b.run_forever()
    try:
        a.promote("root", 1, "better")
        _within(2.0, lambda: router_b.live is not None and router_b.live != "unset" and router_b.live.version == 1)
        a.start_canary("root", 2, 0.25)
        _within(2.0, lambda: router_b.canary[0] is not None and router_b.canary[0].version == 2
                and router_b.canary[1] == 0.25)
        a.rollback("root", None, "back to base")
        _within(2.0, lambda: router_b.live is None)
    finally:
        b.stop()
    assert router_a.live is None and store.live_version() is None


def test_a_job_queued_on_one_replica_refuses_retrain_on_another(pg_url):
    a, _, store = _replica(pg_url)
    store.create_user("root", "root-password", is_admin=True)
    b, _, _ = _replica(pg_url)
    a.retrain("root")
    with pytest.raises(Conflict, match="still queued"):
        b.retrain("root")


# -- a database that cannot be used --------------------------------------------------------


def test_a_wrong_or_unreachable_database_says_so_without_the_password(pg_server):
    from servers import free_port

    with pytest.raises(DatabaseUnavailable, match="only postgresql://") as e:
        Store("mysql://root:hunter2@127.0.0.1/db")
    assert "hunter2" not in str(e.value)
    port = free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(DatabaseUnavailable, match=f"127.0.0.1:{port}") as e:
        Store(f"postgresql://assistant:hunter2@127.0.0.1:{port}/db")
    assert "hunter2" not in str(e.value) and "***" in str(e.value)
    assert time.monotonic() - start < 15
    with pytest.raises(DatabaseUnavailable, match="nosuchdb") as e:
        Store(f"{pg_server.replace('assistant@', 'assistant:hunter2@')}/nosuchdb")
    assert "hunter2" not in str(e.value)


def test_the_app_stops_at_start_with_that_message(pg_server, tmp_path):
    bad = f"{pg_server.replace('assistant@', 'assistant:hunter2@')}/nosuchdb"
    for args in (["--database", bad, "users", "list"], ["--database", bad, "serve", "--engine", "hf"]):
        out = subprocess.run([sys.executable, str(ROOT / "app.py"), "--data-dir", str(tmp_path), *args],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 1, out.stderr[-2000:]
        assert "error: Cannot open the database postgresql://assistant:***@" in out.stderr
        assert "nosuchdb" in out.stderr and "hunter2" not in out.stdout + out.stderr


def test_the_cli_works_on_the_database_it_is_given(pg_url, tmp_path):
    run = lambda *args, **kw: subprocess.run(  # noqa: E731
        [sys.executable, str(ROOT / "app.py"), "--data-dir", str(tmp_path), "--database", pg_url, *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT, **kw)
    assert run("users", "add", "alice", "--password-stdin", input="long enough pw\n").returncode == 0
    assert [u["name"] for u in Store(pg_url).users()] == ["alice"]
    assert "alice" in run("users", "list").stdout
    assert not (tmp_path / "assistant.db").exists()  # nothing went to the SQLite file


def test_redact_keeps_everything_but_the_password():
    assert redact("postgresql://u:p%40ss@h:5432/db?sslmode=require") == "postgresql://u:***@h:5432/db?sslmode=require"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact("postgresql://u:a@b@h/db") == "postgresql://u:***@h/db"  # an @ left unencoded


def test_a_malformed_url_libpq_would_quote_is_reported_without_the_password():
    with pytest.raises(DatabaseUnavailable) as e:  # libpq: unexpected spaces found in "<password>"
        Store("postgresql://u:hunter 2@[::1/db")
    assert "hunter" not in str(e.value) and "***" in str(e.value)


def test_a_training_process_gets_the_database_in_its_environment_not_its_command_line(store, tmp_path, monkeypatch):
    """``ps`` shows every command line on the machine: a password in the URL must not be there."""
    from assistant.config import ServeConfig
    from assistant.paths import DATABASE_ENV
    from loop import jobs

    seen = {}

    class Started:
        pid = 4242

        def wait(self):
            return 0

    def popen(cmd, **kw):
        seen.update(cmd=cmd, env=kw.get("env"))
        return Started()

    monkeypatch.setattr(jobs.subprocess, "Popen", popen)
    url = "postgresql://assistant:hunter2@db.internal/assistant"
    job = store.queue_job("root", {})
    store.update_job(job, status="succeeded")  # so the watcher has nothing to do
    jobs.launcher(ServeConfig(data_dir=tmp_path, database=url, pause_training_at=0), [], store)(job)
    assert "hunter2" not in " ".join(seen["cmd"]) and seen["env"][DATABASE_ENV] == url


def test_a_lock_held_too_long_or_a_lost_connection_is_the_error_chat_already_reports(pg_url, monkeypatch):
    """assistant.chat turns sqlite3.OperationalError into "could not be saved, try again";
    PostgreSQL's lock timeout and a dropped connection arrive as that, and the next call
    opens a new connection."""
    import sqlite3

    import psycopg

    monkeypatch.setattr("store.postgres.LOCK_TIMEOUT_S", 1)
    store = Store(pg_url)
    aid = _answer(store)
    with psycopg.connect(pg_url) as other:
        other.execute("LOCK TABLE ratings IN EXCLUSIVE MODE")
        with pytest.raises(sqlite3.OperationalError, match="lock timeout"):
            store.rate(aid, "alice", 1)
    store.rate(aid, "alice", 1)
    with psycopg.connect(pg_url, autocommit=True) as admin:  # the server drops this thread's connection
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid != pg_backend_pid()")
    with pytest.raises(sqlite3.OperationalError):
        store.rate(aid, "alice", -1)
    store.rate(aid, "alice", -1)
    assert store.current_rating(aid, "alice") == -1
