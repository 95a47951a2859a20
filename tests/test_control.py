"""The admin loop's decisions, over a fake router and launcher."""

import datetime as dt

import pytest

from assistant.adapters import InvalidAdapter
from assistant.engine import Adapter
from store.actors import CANARY_MONITOR, SCHEDULER, STARTUP_CHECK
from loop.canary import CanaryConfig
from loop.control import Conflict, Controller, LoopConfig, Refused


class FakeRouter:
    def __init__(self):
        self.live = "unset"
        self.canary = (None, 0.0, "")

    def set_live(self, adapter):
        self.live = adapter

    def set_canary(self, adapter, share, key):
        self.canary = (adapter, share, key)


def _version(store, v, gate=True):
    store.add_adapter({
        "version": v, "name": f"v{v}-{v:012x}", "content_hash": str(v), "base_model": "m@1",
        "path": f"adapters/v{v}", "gate_passed": int(gate),
    })


@pytest.fixture
def loop(store):
    store.create_user("root", "root-password", is_admin=True)
    store.create_user("alice", "alice-password")
    launched = []
    router = FakeRouter()
    c = Controller(
        store, router, adapter_of=lambda v: Adapter(f"v{v}-{v:012x}", f"/a/{v}", v),
        launcher=launched.append, config=LoopConfig(canary=CanaryConfig(min_votes=5)),
    )
    return c, router, launched


def test_non_admins_are_refused_everything(loop, store):
    c, router, launched = loop
    _version(store, 1)
    for action in (
        lambda: c.retrain("alice"), lambda: c.promote("alice", 1), lambda: c.rollback("alice", None),
        lambda: c.start_canary("alice", 1, 0.5), lambda: c.stop_canary("alice"), lambda: c.retrain(None),
    ):
        with pytest.raises(Refused):
            action()
    assert launched == [] and store.promotions() == [] and router.live == "unset"


def test_no_name_passes_for_the_app_itself(loop, store):
    """The loop's own actions are no actor a caller can name: neither the system actors
    (no account holds them) nor the bare names older rows recorded them under."""
    c, router, launched = loop
    store.db["users"].insert({"name": "scheduler", "password_hash": "x", "is_admin": 0, "disabled": 0,
                              "created_utc": "2026-01-01T00:00:00+00:00"})  # an account from before the prefix
    for actor in ("scheduler", "canary-monitor", "startup-check", SCHEDULER, CANARY_MONITOR, STARTUP_CHECK):
        for action in (lambda: c.retrain(actor), lambda: c.stop_canary(actor), lambda: c.promote(actor, None)):
            with pytest.raises(Refused):
                action()
    assert launched == [] and store.promotions() == [] and store.jobs() == []


def test_one_training_job_at_a_time(loop, store):
    c, _, launched = loop
    job = c.retrain("root", {"epochs": 1})
    assert launched == [job] and store.job(job)["status"] == "queued"
    with pytest.raises(Conflict, match="still queued"):
        c.retrain("root")
    store.update_job(job, status="running")
    with pytest.raises(Conflict, match="still running"):
        c.retrain("root")
    c.cancel("root", job)
    assert store.job(job)["cancel_requested"] == 1
    store.update_job(job, status="cancelled")
    assert len(launched) == 1 and c.retrain("root") != job


def test_a_job_with_a_rank_serving_would_refuse_is_refused_before_it_is_queued(loop, store):
    c, _, launched = loop
    with pytest.raises(Conflict, match="rank 48 exceeds the served LoRA rank limit"):
        c.retrain("root", {"rank": 48})
    assert launched == [] and store.jobs() == []


def test_promote_needs_the_gate_or_a_recorded_override(loop, store):
    c, router, _ = loop
    _version(store, 1, gate=True)
    _version(store, 2, gate=False)
    c.promote("root", 1, "gate passed")
    assert router.live.version == 1 and store.live_version() == 1
    with pytest.raises(Conflict, match="did not pass"):
        c.promote("root", 2)
    with pytest.raises(Conflict, match="needs a reason"):
        c.promote("root", 2, " ", override=True)
    c.promote("root", 2, "users asked for it", override=True)
    row = store.promotions()[0]
    assert (row["version"], row["actor"], row["gate_override"], row["reason"]) == (2, "root", 1, "users asked for it")


def test_rollback_to_any_earlier_version_or_base_is_one_click(loop, store):
    c, router, _ = loop
    _version(store, 1)
    _version(store, 2)
    c.promote("root", 1)
    c.promote("root", 2)
    c.rollback("root", 1)
    assert router.live.version == 1 and store.live_version() == 1
    c.rollback("root", None)
    assert router.live is None and store.live_version() is None
    assert [p["actor"] for p in store.promotions()] == ["root"] * 4


def test_live_version_survives_a_restart(loop, store):
    c, _, _ = loop
    _version(store, 1)
    c.promote("root", 1)
    fresh_router = FakeRouter()
    Controller(store, fresh_router, adapter_of=c.adapter_of, launcher=lambda j: None).restore()
    assert fresh_router.live.version == 1
    checked = []
    started = FakeRouter()
    warnings = Controller(store, started, adapter_of=lambda v: checked.append(v) or c.adapter_of(v),
                          launcher=lambda j: None).start()
    assert warnings == [] and started.live.version == 1 and checked == [1]  # validated once at start


def test_a_live_version_damaged_while_stopped_is_rolled_back_at_start(loop, store):
    c, _, _ = loop
    for v in (1, 2, 3):
        _version(store, v)
    c.promote("root", 1)
    c.promote("root", 2)
    c.start_canary("root", 3, 0.2)
    c.promote("root", 3)  # ends the canary of 3
    c.start_canary("root", 1, 0.2)
    damaged = {3, 1}

    def adapter_of(v):
        if v in damaged:
            raise InvalidAdapter("finite weights", f"v{v} has NaN in layer 0")
        return Adapter(f"v{v}-{v:012x}", f"/a/{v}", v)

    router = FakeRouter()
    warnings = Controller(store, router, adapter_of=adapter_of, launcher=lambda j: None).start()
    assert router.live.version == 2 and router.canary == (None, 0.0, "")  # v1 (NaN) skipped
    assert warnings == [
        "canary v1 stopped at start: adapter refused (finite weights): v1 has NaN in layer 0",
        "automatic rollback at start from v3 to v2: adapter refused (finite weights): v3 has NaN in layer 0",
    ]
    last = store.latest_promotion("live")
    assert (last["version"], last["actor"]) == (2, STARTUP_CHECK) and "NaN" in last["reason"]

    damaged.add(2)  # nothing earlier validates: the base model serves
    router = FakeRouter()
    _version(store, 4)
    c.promote("root", 4)
    damaged.add(4)
    Controller(store, router, adapter_of=adapter_of, launcher=lambda j: None).start()
    assert router.live is None and store.live_version() is None


def _vote(store, user, version, value):
    cid = store.create_conversation(user)
    mid = store.add_message(cid, user, "q")
    aid = store.log_answer(message_id=mid, user_id=user, prompt=[], content="a", model="m",
                           adapter_name=f"v{version}" if version else None, adapter_version=version)
    store.rate(aid, user, value)


def test_canary_rolls_back_by_itself_when_clearly_worse(loop, store):
    c, router, _ = loop
    _version(store, 1)
    _version(store, 2)
    c.promote("root", 1)
    c.start_canary("root", 2, 0.3, "try v2")
    adapter, share, key = router.canary
    assert adapter.version == 2 and share == 0.3 and key
    assert c.check_canary() is not None and router.canary[1] == 0.3  # no votes yet: no verdict
    for i in range(12):
        _vote(store, f"l{i}", 1, 1)
        _vote(store, f"c{i}", 2, -1 if i < 10 else 1)
    verdict = c.check_canary()
    assert verdict.clearly_worse
    assert router.canary == (None, 0.0, "")
    last = store.latest_promotion("canary")
    assert last["share"] == 0 and last["actor"] == CANARY_MONITOR and "automatic rollback" in last["reason"]


def test_canary_keeps_running_when_not_worse(loop, store):
    c, router, _ = loop
    _version(store, 1)
    _version(store, 2)
    c.promote("root", 1)
    c.start_canary("root", 2, 0.5)
    for i in range(12):
        _vote(store, f"l{i}", 1, 1 if i % 2 else -1)
        _vote(store, f"c{i}", 2, 1)
    assert not c.check_canary().clearly_worse and router.canary[1] == 0.5
    c.promote("root", 2, "canary won")
    assert router.canary[1] == 0.0 and router.live.version == 2


def test_schedule_is_off_by_default_and_fires_on_new_feedback(loop, store):
    c, _, launched = loop
    assert c.due() is None and c.tick() is None
    c.config = LoopConfig(retrain_min_new_feedback=3)
    for i in range(3):
        _vote(store, f"u{i}", None, 1)
    assert "3 new pieces of feedback" in c.due()
    job = c.tick()
    assert launched == [job] and store.job(job)["created_by"] == SCHEDULER
    assert c.tick() is None  # one job at a time, never queued twice
    c.config = LoopConfig(retrain_every_hours=1)
    store.update_job(job, status="succeeded")
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)
    assert "1 h since the last job" in c.due(later)


def test_the_loop_answers_ahead_between_jobs_and_stops_that_before_one_starts(loop, store):
    """The control loop asks the preparer (loop.jobs.Preparer) every round unless a job is
    due, and stops it before launching a job, so the two never answer side by side."""
    c, _, launched = loop
    calls = []

    class Preparer:
        def poll(self):
            calls.append(("poll", len(launched)))

        def stop(self):
            calls.append(("stop", len(launched)))

    c.preparer = Preparer()
    assert c.tick() is None and calls == [("poll", 0)]
    job = c.retrain("root")
    assert launched == [job] and calls == [("poll", 0), ("stop", 0)]  # stopped before the launch
    c.config = LoopConfig(retrain_min_new_feedback=1)
    store.update_job(job, status="succeeded")
    _vote(store, "u0", None, 1)
    due = c.tick()
    assert due and launched == [job, due] and calls[-1] == ("stop", 1)  # a scheduled job: no poll that round


def test_promotions_from_another_process_reach_the_router(loop, store):
    c, router, _ = loop
    _version(store, 1)
    c.restore()
    assert router.live is None and c.sync() is False
    # The command line runs its own controller on the same database, with no engine.
    cli = Controller(store, FakeRouter(), adapter_of=c.adapter_of, launcher=lambda j: None)
    cli.promote("root", 1, "from cron")
    assert c.sync() is True and router.live.version == 1
    assert c.sync() is False


def _hold_write_lock(path):
    import sqlite3

    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holding the lock past the busy timeout
    return other


def test_a_promotion_that_cannot_be_recorded_leaves_serving_as_it_was(tmp_path, monkeypatch):
    import sqlite3

    import store.store as store_module
    from store import Store

    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.2)
    db = Store(tmp_path / "a.db")
    db.create_user("root", "root-password", is_admin=True)
    _version(db, 1)
    _version(db, 2)
    router = FakeRouter()
    c = Controller(db, router, adapter_of=lambda v: Adapter(f"v{v}-{v:012x}", f"/a/{v}", v), launcher=lambda j: None)
    c.promote("root", 1)
    c.start_canary("root", 2, 0.2)
    lock = _hold_write_lock(tmp_path / "a.db")
    for action in (lambda: c.promote("root", 2, "try"), lambda: c.rollback("root", None),
                   lambda: c.stop_canary("root")):
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            action()
    lock.rollback()
    assert router.live.version == 1 and db.live_version() == 1  # serving and the log agree
    assert router.canary[0].version == 2 and db.latest_promotion("canary")["share"] == 0.2


def test_a_switch_that_fails_after_recording_is_undone_in_the_log(loop, store):
    c, router, _ = loop
    _version(store, 1)
    _version(store, 2)
    c.promote("root", 1)

    def refuse(adapter):
        raise RuntimeError("the model server refused the adapter")

    router.set_live = refuse
    with pytest.raises(RuntimeError, match="refused"):
        c.promote("root", 2, "try")
    assert store.live_version() == 1 and router.live.version == 1
    undo, attempt = store.promotions()[:2]
    assert (attempt["version"], attempt["reason"]) == (2, "try")
    assert undo["version"] == 1 and undo["actor"] == "root"
    assert undo["reason"].startswith("undone: v2 was recorded live but could not be served")


def test_rollback_goes_only_to_versions_that_were_live(loop, store):
    c, router, _ = loop
    _version(store, 1)
    _version(store, 2, gate=False)  # failed the gate, never live
    _version(store, 3)  # passed the gate, never live
    c.promote("root", 1)
    for never_live in (2, 3):
        with pytest.raises(Conflict, match=f"v{never_live} was never live.*promote it"):
            c.rollback("root", never_live, "")
    assert router.live.version == 1 and [p["version"] for p in store.promotions()] == [1]
    c.rollback("root", None)  # the base model served before anything was promoted
    c.rollback("root", 1)
    assert router.live.version == 1 and store.live_version() == 1


def test_a_canary_that_cannot_be_served_is_recorded_stopped(loop, store):
    c, router, _ = loop
    _version(store, 1)

    def refuse(adapter, share, key):
        raise RuntimeError("the model server refused the adapter")

    router.set_canary = refuse
    with pytest.raises(RuntimeError, match="refused"):
        c.start_canary("root", 1, 0.2, "try v1")
    last = store.latest_promotion("canary")
    assert last["share"] == 0 and last["reason"].startswith("undone: the canary could not be served")
