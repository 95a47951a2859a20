"""The real app on the embedded SmolLM2 model, driven through Gradio's Python client."""

import sqlite3
import urllib.error

import pytest
from gradio_client import Client

from servers import running_app, still_running, vllm_processes_of
from store import Store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(tmp_path_factory, embedded_model):
    data = tmp_path_factory.mktemp("app-data")
    users = Store(data / "assistant.db")
    users.create_user("alice", "alice-password")
    users.create_user("bob", "bob-password")
    with running_app(
        data, "--models-dir", str(embedded_model.parent), "--temperature", "0", "--max-new-tokens", "48",
        "--context-tokens", "512", timeout_s=420,  # vLLM start-up on a busy 2-core machine
    ) as url:
        vllm = vllm_processes_of(data)
        assert vllm, "the default engine is vLLM, started by the app"
        yield url, data
    # The app started vLLM and must have stopped it (the whole process tree) on the way out.
    assert not still_running(vllm, wait_s=10)


def test_chat_rate_retry_edit_land_in_the_database(app):
    url, data = app
    client = Client(url, verbose=False, auth=("alice", "alice-password"))
    answer = client.predict(message="What is the capital of France?", api_name="/chat")
    assert answer["done"] and "Paris" in answer["text"]
    assert answer["model"] == "SmolLM2-135M-Instruct · base"
    aid = answer["answer_id"]

    client.predict(answer_id=aid, value=1, comment="", api_name="/rate")
    client.predict(answer_id=aid, value=-1, comment="too short", api_name="/rate")
    retried = client.predict(answer_id=aid, api_name="/retry")
    edited = client.predict(answer_id=retried["answer_id"], text="Paris, on the Seine.", api_name="/edit")
    with pytest.raises(Exception, match="No answer"):
        client.predict(answer_id="01NOSUCHANSWER0000000000000", value=1, comment="", api_name="/rate")

    db = sqlite3.connect(data / "assistant.db")
    db.row_factory = sqlite3.Row
    answers = db.execute("select * from answers order by created_utc").fetchall()
    assert [a["source"] for a in answers] == ["model", "model", "edit"]
    first, sibling, edit = answers
    assert first["model"] == "SmolLM2-135M-Instruct" and first["adapter_version"] is None
    assert first["message_id"] == sibling["message_id"] == edit["message_id"]
    assert first["prompt_hash"] == sibling["prompt_hash"]
    assert edit["edited_from_id"] == sibling["id"] and edit["content"] == "Paris, on the Seine."
    assert '"temperature":0.0' in first["sampling_json"] and first["latency_ms"] > 0
    ratings = db.execute("select value, comment from ratings order by created_utc").fetchall()
    assert [tuple(r) for r in ratings] == [(1, None), (-1, "too short")]
    history = client.predict(conversation_id=answer["conversation_id"], api_name="/history")
    assert history[-1]["answer"] == "Paris, on the Seine."


def test_long_input_is_trimmed_and_answered(app):
    url, _ = app
    client = Client(url, verbose=False, auth=("alice", "alice-password"))
    long_text = "Please summarise this. " + "The quick brown fox jumps over the lazy dog. " * 200
    answer = client.predict(message=long_text, api_name="/chat")
    assert answer["done"] and answer["answer_id"]
    assert "too long for the model's context" in answer["notice"]
    with pytest.raises(Exception, match="empty"):
        client.predict(message="   ", api_name="/chat")


def test_sign_in_is_required_and_users_see_only_their_own(app):
    import urllib.error
    import urllib.request

    url, _ = app
    with pytest.raises(Exception):
        Client(url, verbose=False, auth=("alice", "wrong-password"))
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "/gradio_api/info")
    assert e.value.code == 401
    alice = Client(url, verbose=False, auth=("alice", "alice-password"))
    mine = alice.predict(message="Hello", api_name="/chat")
    bob = Client(url, verbose=False, auth=("bob", "bob-password"))
    with pytest.raises(Exception, match="No conversation"):
        bob.predict(conversation_id=mine["conversation_id"], api_name="/history")
    with pytest.raises(Exception, match="No answer"):
        bob.predict(answer_id=mine["answer_id"], value=-1, comment="", api_name="/rate")


def test_a_logged_out_session_cookie_is_refused(app):
    import http.cookiejar
    import urllib.parse
    import urllib.request

    url, _ = app
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    form = urllib.parse.urlencode({"username": "alice", "password": "alice-password"}).encode()
    opener.open(url + "/login", data=form)
    cookies = [(c.name, c.value) for c in jar]
    assert any(name.startswith("access-token") for name, _ in cookies)
    assert opener.open(url + "/gradio_api/info").status == 200
    opener.open(url + "/logout")
    # Replay the old cookie, as someone who copied it before the logout would.
    replay = urllib.request.Request(url + "/gradio_api/info", headers={"Cookie": "; ".join(f"{n}={v}" for n, v in cookies)})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(replay)
    assert e.value.code == 401
