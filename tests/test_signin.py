"""Sign-in checks without a server: the password check's cost, the backoff, sessions."""

import asyncio
import hashlib
import threading

import pytest
from fastapi import HTTPException

import store.passwords as passwords
from ui.signin import PEER, Backoff, Policy, SignIn


def run_loop(coro):
    """``asyncio.run`` on a thread of its own: other tests in the session (Gradio's) can
    leave an event loop marked running on the main thread, which asyncio.run refuses.
    Returns (result, the loop's thread id)."""
    out = {}

    def main():
        out["thread"] = threading.get_ident()
        out["result"] = asyncio.run(coro)

    t = threading.Thread(target=main)
    t.start()
    t.join()
    return out["result"], out["thread"]


def test_unknown_and_known_names_cost_one_scrypt_of_the_same_size(store, monkeypatch):
    """Audit item 9: an unknown name took two scrypt runs (83 ms vs 42 ms), telling which
    names exist. Now every check runs exactly one, with the same parameters."""
    store.create_user("alice", "alice-password")
    store.create_user("olga", "olga-password")
    store.set_disabled("olga", True)
    calls = []
    real = hashlib.scrypt

    def counting(password, **kw):
        calls.append((kw["n"], kw["r"], kw["p"], kw["dklen"]))
        return real(password, **kw)

    monkeypatch.setattr(passwords.hashlib, "scrypt", counting)
    passwords.dummy_hash()  # made once per process; not part of any check
    for name, password, ok in [("alice", "alice-password", True), ("alice", "wrong-password", False),
                               ("nobody", "whatever-pw", False), ("olga", "olga-password", False)]:
        calls.clear()
        assert store.verify_password(name, password) is ok
        assert calls == [(passwords.N, passwords.R, passwords.P, 32)], name


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_backoff_five_free_then_doubling_capped_and_refusals_do_not_count():
    clock = Clock()
    b = Backoff(Policy(), clock)
    for _ in range(4):
        assert b.wait_s("alice", "10.0.0.9") == 0
        b.failed("alice", "10.0.0.9")
    assert b.wait_s("alice", "10.0.0.9") == 0
    b.failed("alice", "10.0.0.9")  # the 5th
    assert b.wait_s("alice", "10.0.0.9") == 1.0
    assert b.wait_s("alice", "10.0.0.77") == 1.0  # the account waits from anywhere
    assert b.wait_s("bob", "10.0.0.9") == 1.0  # and the address waits for any name
    waits = []
    for _ in range(10):
        clock.now += b.wait_s("alice", "10.0.0.9")
        b.failed("alice", "10.0.0.9")
        waits.append(b.wait_s("alice", "10.0.0.9"))
    assert waits == [2, 4, 8, 16, 32, 64, 120, 120, 120, 120]
    before = b.wait_s("alice", "10.0.0.9")
    clock.now += 1  # refused attempts in the wait change nothing
    assert b.wait_s("alice", "10.0.0.9") == before - 1
    clock.now += 3600 + 120  # forgotten an hour after the last failure
    assert b.wait_s("alice", "10.0.0.9") == 0


def test_a_success_clears_and_its_address_is_exempt_from_the_accounts_wait():
    clock = Clock()
    b = Backoff(Policy(), clock)
    b.succeeded("alice", "10.0.0.1")  # alice signed in from home before
    for n in range(8):  # an attacker tries alice's name from many addresses
        b.failed("alice", f"10.9.0.{n}")
    assert b.wait_s("alice", "10.9.0.99") > 0  # a new address waits
    assert b.wait_s("alice", "10.0.0.1") == 0  # alice at home does not
    b.succeeded("alice", "10.0.0.1")
    assert b.wait_s("alice", "10.9.0.99") == 0  # a success clears the account's failures


def test_ipv6_addresses_count_per_64():
    clock = Clock()
    b = Backoff(Policy(), clock)
    for n in range(5):
        b.failed(f"user{n}", f"2001:db8:1:2::{n + 1}")
    assert b.wait_s("someone", "2001:db8:1:2:ffff::9") == 1.0
    assert b.wait_s("someone", "2001:db8:1:3::1") == 0


def test_the_check_runs_off_the_event_loop_and_refusals_skip_scrypt():
    seen = []

    def verify(name, password):
        seen.append(threading.get_ident())
        return password == "right-password"

    signin = SignIn(verify, Policy(), Clock())

    async def attempts():
        PEER.set("10.0.0.5")
        results = [await signin.check("alice", "wrong") for _ in range(5)]
        with pytest.raises(HTTPException) as refused:
            await signin.check("alice", "right-password")
        return results, refused.value

    (results, refused), loop_thread = run_loop(attempts())
    assert results == [False] * 5
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert len(seen) == 5 and loop_thread not in seen  # the 6th never ran scrypt


def test_sessions_end_after_a_week_a_password_change_or_when_disabled(store):
    from ui.sessions import SESSION_MAX_AGE_S, Sessions

    store.create_user("alice", "alice-password")
    clock = Clock()
    sessions = Sessions(store, clock=clock)
    sessions["t1"] = "alice"
    clock.now += SESSION_MAX_AGE_S - 1
    assert sessions.get("t1") == "alice"
    sessions["t2"] = "alice"
    clock.now += 2
    assert sessions.get("t1") is None and "t1" not in sessions  # a week old: over
    assert sessions.get("t2") == "alice"
    store.set_password("alice", "another-password")
    assert sessions.get("t2") is None
    sessions["t3"] = "alice"  # signed in with the new password
    assert sessions.get("t3") == "alice"
    store.set_disabled("alice", True)
    assert sessions.get("t3") is None
    assert sessions.get("never-issued") is None


def test_attempts_beyond_the_waiting_room_are_refused_at_once():
    release = threading.Event()
    signin = SignIn(lambda name, password: release.wait(10) and False, Policy(checks_at_once=1, max_waiting=1), Clock())

    async def attempts():
        PEER.set("10.0.0.5")
        running = [asyncio.create_task(signin.check(f"user{n}", "wrong")) for n in range(2)]
        await asyncio.sleep(0.1)  # one checking, one waiting for the thread
        with pytest.raises(HTTPException) as refused:
            await signin.check("user2", "wrong")
        release.set()
        return await asyncio.gather(*running), refused.value

    (results, refused), _ = run_loop(attempts())
    assert results == [False, False]
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
