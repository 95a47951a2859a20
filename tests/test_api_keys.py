"""API keys for the OpenAI-compatible API: hashed, tied to an account, issued and revoked
from the command line and the admin console (issue 13, item 12)."""

from types import SimpleNamespace

import gradio as gr
import pytest
from fastapi.testclient import TestClient

from assistant.openai_api import build_api
from test_cli import cli


@pytest.fixture
def accounts(store):
    store.create_user("root", "root-password", is_admin=True)
    store.create_user("alice", "alice-password")
    return store


def api(store):
    engine = SimpleNamespace(auth_headers={}, model_name="fake-model")
    return TestClient(build_api(engine, lambda user: None, store.user_for_api_key, store=store))


def models(client, key):
    return client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code


def test_a_key_is_stored_hashed_and_stops_with_its_account_or_when_revoked(accounts, tmp_path):
    key_id, key = accounts.issue_api_key("alice", label="laptop", created_by="root")
    assert len(key) >= 40
    assert key.encode() not in (tmp_path / "assistant.db").read_bytes()  # only its hash is kept
    assert accounts.user_for_api_key(key) == "alice"
    client = api(accounts)
    assert models(client, key) == 200
    assert models(client, key[:-1] + ("A" if key[-1] != "A" else "B")) == 401
    accounts.set_disabled("alice", True)
    assert models(client, key) == 401  # a disabled account's key stops at once
    accounts.set_disabled("alice", False)
    assert models(client, key) == 200
    accounts.revoke_api_key(key_id)
    assert models(client, key) == 401
    assert [k["label"] for k in accounts.api_keys("alice")] == ["laptop"]
    assert accounts.api_keys("alice")[0]["revoked_utc"]
    with pytest.raises(Exception, match="No user"):
        accounts.issue_api_key("nobody")


def test_keys_from_the_command_line(tmp_path):
    from store import Store

    store = Store(tmp_path / "assistant.db")
    store.create_user("alice", "alice-password")
    r = cli(tmp_path, "keys", "add", "alice", "--label", "script")
    assert r.returncode == 0, r.stderr
    key = r.stdout.split("key: ")[1].split()[0]
    assert store.user_for_api_key(key) == "alice"
    listing = cli(tmp_path, "keys", "list").stdout
    assert "alice" in listing and "script" in listing and key not in listing
    key_id = store.api_keys("alice")[0]["id"]
    assert cli(tmp_path, "keys", "revoke", key_id).returncode == 0
    assert store.user_for_api_key(key) is None
    assert cli(tmp_path, "keys", "revoke", "no-such-key").returncode == 3
    assert cli(tmp_path, "keys", "add", "nobody").returncode == 3
    r = cli(tmp_path, "serve", "--api-keys", "keys.txt")  # the plain-text file of before
    assert r.returncode == 1 and "app.py keys add NAME" in r.stderr


def test_keys_from_the_admin_console(accounts):
    from test_control import FakeRouter
    from loop.control import Controller
    from ui.admin_page import AdminPage

    page = AdminPage(Controller(accounts, FakeRouter(), adapter_of=None, launcher=None))
    with pytest.raises(gr.Error, match="admin"):
        page.issue_key("alice", "mine", SimpleNamespace(username="alice"))
    with pytest.raises(gr.Error, match="admin"):
        page.keys_table(SimpleNamespace(username="alice"))
    shown, table = page.issue_key("alice", "notebook", SimpleNamespace(username="root"))
    key = shown["value"]
    assert accounts.user_for_api_key(key) == "alice"
    assert list(table["user"]) == ["alice"] and key not in table.to_string()
    key_id = table["id"][0]
    with pytest.raises(gr.Error, match="admin"):
        page.revoke_key(key_id, SimpleNamespace(username="alice"))
    assert accounts.user_for_api_key(key) == "alice"
    page.revoke_key(key_id, SimpleNamespace(username="root"))
    assert accounts.user_for_api_key(key) is None
    with pytest.raises(gr.Error, match="No API key"):
        page.revoke_key("nope", SimpleNamespace(username="root"))
