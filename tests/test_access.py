"""Who gets what from a running page (served by ui.server.launch over the fake engine):
exports, sessions, sign-in. Findings of the audit in issue 13."""

import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from feedback_scenario import SAME, TopicEmbedder, build_scenario
from live_app import click, live_app, signed_in
from tuning.export import export_files_for_admin, export_for_admin
from tuning.pairs import PairConfig
from ui.signin import Policy


@pytest.fixture
def accounts(store):
    store.create_user("root", "root-password", is_admin=True)
    store.create_user("mallory", "mallory-password")
    return store


def test_export_files_are_not_served_to_non_admins_or_anyone(accounts, engine, tmp_path):
    """Audit item 1: any signed-in user could GET /gradio_api/file=data/exports/<stamp>/..."""
    build_scenario(accounts)
    data_dir = tmp_path / "data"
    folder, _ = export_for_admin(accounts, data_dir, PairConfig(), TopicEmbedder(SAME))
    paths = sorted(folder.iterdir())
    assert any(p.name == "pairs_train.jsonl" for p in paths)
    made = []

    def exporter():  # what app.py wires, with the test's embedder
        made.append(export_files_for_admin(accounts, data_dir, PairConfig(), TopicEmbedder(SAME)))
        return made[-1]

    with live_app(accounts, engine, exporter=exporter) as url:
        mallory = signed_in(url, "mallory", "mallory-password")
        root = signed_in(url, "root", "root-password")
        anonymous = httpx.Client(base_url=url, timeout=30)
        for path in paths:
            for who, refused in ((mallory, 403), (anonymous, 401), (root, 403)):  # nobody, admins included
                r = who.get(f"/gradio_api/file={path}")
                assert r.status_code == refused, (path.name, r.status_code)
                assert "alice" not in r.text

        assert click(mallory, "export")["success"] is False  # the console refuses non-admins
        assert made == []
        done = click(root, "export")
        assert done["success"], done
        urls = {Path(f["path"]).name: f["url"] for f in done["output"]["data"][0]}
        assert {"pairs_train.jsonl", "summary.json"} <= set(urls)
        got = root.get(urls["pairs_train.jsonl"])
        written = next(Path(f) for f in made[-1] if Path(f).name == "pairs_train.jsonl")
        assert got.status_code == 200 and got.text == written.read_text()
        # The address is Gradio's cache: a secret-seeded 64-hex hash, nothing under the data folder.
        assert str(data_dir) not in urls["pairs_train.jsonl"]
        assert re.search(r"/[0-9a-f]{64}/pairs_train.jsonl$", urls["pairs_train.jsonl"])


def counted(monkeypatch, store, delay_s=0.0):
    """Wrap the store's password check (before launch): records names, optionally slow."""
    real, calls = store.verify_password, []

    def verify(name, password):
        calls.append(name)
        time.sleep(delay_s)  # blocks its thread, as scrypt does
        return real(name, password)

    monkeypatch.setattr(store, "verify_password", verify)
    return calls


def test_a_slow_password_check_does_not_stall_signed_in_users(accounts, engine, monkeypatch):
    """Audit item 2: scrypt ran on Gradio's event loop, so wrong passwords stalled every page."""
    counted(monkeypatch, accounts, delay_s=1.5)
    with live_app(accounts, engine) as url:
        mallory = signed_in(url, "mallory", "mallory-password")
        attempt = threading.Thread(target=lambda: httpx.post(
            f"{url}/login", data={"username": "root", "password": "wrong-password"}, timeout=30))
        attempt.start()
        time.sleep(0.3)  # the check is running now
        start = time.monotonic()
        assert mallory.get("/config").status_code == 200
        took = time.monotonic() - start
        attempt.join()
        assert took < 0.8, f"a signed-in request waited {took:.2f} s behind a password check"


def test_a_burst_of_wrong_passwords_is_cut_off_fast_and_the_right_one_works_after_the_wait(accounts, engine, monkeypatch):
    """Audit item 2: thirty wrong passwords in two seconds were all checked, and the right
    one was accepted at once after."""
    calls = counted(monkeypatch, accounts)
    # A 3 s first wait instead of 1 s: on a loaded machine five password checks plus the
    # sixth request took over a second, so the sixth was checked (400) before this wait.
    with live_app(accounts, engine, policy=Policy(base_delay_s=3.0)) as url:
        codes, slowest_refusal = [], 0.0
        for _ in range(30):
            start = time.monotonic()
            r = httpx.post(f"{url}/login", data={"username": "root", "password": "wrong-password"}, timeout=30)
            codes.append(r.status_code)
            if r.status_code == 429:
                slowest_refusal = max(slowest_refusal, time.monotonic() - start)
                retry_after = int(r.headers["Retry-After"])
        assert codes == [400] * 5 + [429] * 25
        assert calls == ["root"] * 5  # refusals never reached the password check
        # Refused at once, not held open until the 3 s wait is over (which would tie up a
        # server thread per attacker's request). The bound is not a speed target: under CI
        # on a machine running 2-3x slow a refusal took 0.23 s, over the 0.2 s once here;
        # that none reached the password check is asserted above, by count.
        assert slowest_refusal < 1.0 and 1 <= retry_after <= 3
        r = httpx.post(f"{url}/login", data={"username": "root", "password": "root-password"}, timeout=30)
        assert r.status_code == 429  # the right password waits too: it is not a way to probe
        r = httpx.post(f"{url}/login", data={"username": "mallory", "password": "mallory-password"}, timeout=30)
        assert r.status_code == 429  # so does any name from this address
        time.sleep(retry_after)
        assert signed_in(url, "root", "root-password")


def test_a_password_change_or_a_disabled_account_ends_its_sessions(accounts, engine):
    """Audit item 4: an old cookie kept working after `users passwd`, and a disabled user
    could still chat."""
    with live_app(accounts, engine) as url:
        mallory = signed_in(url, "mallory", "mallory-password")
        other_tab = signed_in(url, "mallory", "mallory-password")
        root = signed_in(url, "root", "root-password")
        assert mallory.get("/config").status_code == 200
        accounts.set_password("mallory", "a-new-password")
        for old in (mallory, other_tab):
            assert old.get("/config").status_code == 401
            assert old.post("/gradio_api/queue/join", json={"data": [], "fn_index": 0, "session_hash": "x"}).status_code == 401
        assert signed_in(url, "mallory", "a-new-password").get("/config").status_code == 200

        assert root.get("/config").status_code == 200
        accounts.set_disabled("root", True)
        assert root.get("/config").status_code == 401
        assert httpx.post(f"{url}/login", data={"username": "root", "password": "root-password"}).status_code == 400
        accounts.set_disabled("root", False)
        assert root.get("/config").status_code == 401  # ended, not paused
        assert signed_in(url, "root", "root-password").get("/config").status_code == 200


def test_sign_out_still_ends_the_session(accounts, engine):
    """Gradio's /logout deletes from the token map; ui.sessions.Sessions must keep that."""
    with live_app(accounts, engine) as url:
        mallory = signed_in(url, "mallory", "mallory-password")
        replayed = httpx.Client(base_url=url, cookies=dict(mallory.cookies), timeout=30)  # a copy, kept
        assert replayed.get("/config").status_code == 200
        assert mallory.get("/logout").status_code in (200, 302)
        assert replayed.get("/config").status_code == 401
