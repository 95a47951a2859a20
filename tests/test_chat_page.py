"""The page's handlers, driven as Gradio would call them, over the fake engine."""

from types import SimpleNamespace

import gradio as gr
import pytest

from ui import display
from ui.chat_page import ChatPage, strip_footer


@pytest.fixture
def page(service):
    return ChatPage(service)


def req(user="alice"):
    return SimpleNamespace(username=user)


def send(page, text, state, user="alice"):
    outs = list(page.on_send(text, "", state, req(user)))
    return outs[-1]


def messages_of(update):
    return update["value"]


def test_send_streams_and_shows_the_model_version(page, engine):
    engine.enqueue("Hello there friend")
    outs = list(page.on_send("hi", "Be kind.", {}, req()))
    partials = [messages_of(o[0]) for o in outs]
    assert any(p[-1]["content"].startswith("Hello there") and "friend" not in p[-1]["content"] for p in partials)
    chat, box, state, notice, _ = outs[-1]
    last = messages_of(chat)[-1]
    assert last["role"] == "assistant" and strip_footer(last["content"]) == "Hello there friend"
    assert "model: fake-model · base" in last["content"]
    assert box == "" and state["conversation_id"]
    assert engine.history[-1]["messages"][0] == {"role": "system", "content": "Be kind."}


def test_empty_message_warns_and_sends_nothing(page, engine, store):
    with pytest.warns(UserWarning, match="empty"):
        outs = list(page.on_send("  ", "", {}, req()))
    assert engine.history == [] and store.count("messages") == 0
    assert outs[-1][1] != ""  # the text box keeps what the user typed


def test_like_then_same_thumb_clears_and_dislike_asks_for_a_comment(page, store):
    state = send(page, "hi", {})[2]
    aid = state["index"][1][1]
    chat, state, comment, row = page.on_like(state, SimpleNamespace(index=1, liked=True), req())
    assert store.current_rating(aid, "alice") == 1 and chat["feedback_value"] == ["Like"]
    chat, state, comment, row = page.on_like(state, SimpleNamespace(index=1, liked=True), req())
    assert store.current_rating(aid, "alice") == 0
    chat, state, comment, row = page.on_like(state, SimpleNamespace(index=1, liked=False), req())
    assert store.current_rating(aid, "alice") == -1 and row["visible"] is True
    page.on_comment("Wrong answer", state, req())
    assert list(store.rows("ratings"))[-1]["comment"] == "Wrong answer"
    # undo the dislike: the vote before it (cleared) comes back
    page.on_undo(state, req())
    assert store.current_rating(aid, "alice") == 0


def test_rating_a_user_message_is_refused(page):
    state = send(page, "hi", {})[2]
    with pytest.raises(gr.Error):
        page.on_like(state, SimpleNamespace(index=0, liked=True), req())


def test_retry_adds_a_sibling_and_undo_brings_back_the_first(page, engine, store):
    engine.enqueue("first answer", "second answer")
    state = send(page, "hi", {})[2]
    outs = list(page.on_retry(state, SimpleNamespace(index=1), req()))
    state = outs[-1][2]
    assert strip_footer(messages_of(outs[-1][0])[-1]["content"]) == "second answer"
    assert store.count("answers") == 2
    chat, state = page.on_undo(state, req())
    assert strip_footer(messages_of(chat)[-1]["content"]) == "first answer"
    assert store.count("answers") == 2  # withdrawn, not deleted


def test_edit_keeps_original_and_marks_the_edit(page, store):
    state = send(page, "hi", {})[2]
    original = state["index"][1][1]
    edited = "What I wanted.\n\n<sub>model: fake-model · base</sub>"
    chat, state = page.on_edit(state, SimpleNamespace(index=1, value=edited, previous_value=""), req())
    shown = messages_of(chat)[-1]["content"]
    assert strip_footer(shown) == "What I wanted." and "edited by you" in shown
    new = state["index"][1][1]
    assert store.answer(new, "alice")["edited_from_id"] == original
    assert store.answer(original, "alice")["content"] != "What I wanted."


def test_conversations_are_per_user(page, store):
    state = send(page, "alice's secret", {}, user="alice")[2]
    assert page._conversation_choices("bob") == []
    with pytest.raises(gr.Error):
        page.on_pick(state["conversation_id"], {}, req("bob"))
    chat, st, persona, opt = page.on_pick(state["conversation_id"], {}, req("alice"))
    assert messages_of(chat)[0]["content"] == "alice's secret"


def test_api_endpoints_use_ids(page, store):
    final = list(page.api_chat("hello", "", "", req()))[-1]
    assert final["done"] and final["answer_id"]
    assert page.api_rate(final["answer_id"], -1, "bad", req())["previous"] is None
    with pytest.raises(gr.Error, match="No answer"):
        page.api_rate("01NOPE", 1, "", req())
    with pytest.raises(gr.Error, match="No answer"):
        page.api_rate(final["answer_id"], 1, "", req("mallory"))
    with pytest.raises(gr.Error, match="empty"):
        list(page.api_chat("", "", "", req()))
    again = list(page.api_retry(final["answer_id"], req()))[-1]
    edit = page.api_edit(again["answer_id"], "Better.", req())
    history = page.api_history(final["conversation_id"], req())
    assert history[-1]["answer_id"] == edit["answer_id"] and history[-1]["answer"] == "Better."
    assert store.count("ratings") == 1


# -- hostile input (issue 7) -------------------------------------------------------------

HOSTILE = [
    "'); DROP TABLE answers;--",
    "<script>alert(1)</script><img src=x onerror=alert(2)> **bold** [link](javascript:alert(3))",
    "\x1b[31mred\x1b[0m \x1b]0;title\x07 bell\x07 backspace\x08 tab\tform\x0cfeed",
    "Robert'); DELETE FROM ratings WHERE 1=1; -- " + "x" * 50_000,
]


def snapshot(store):
    tables = [r[0] for r in store.db.execute("select name from sqlite_master where type in ('table', 'view') order by name")]
    return tables, {t: list(store.rows(t)) for t in ("conversations", "messages", "answers", "ratings")}


@pytest.mark.parametrize("text", HOSTILE, ids=["sql", "html", "escapes", "huge-sql"])
def test_hostile_text_is_stored_verbatim_and_shown_as_text(page, store, engine, text):
    tables_before, _ = snapshot(store)
    engine.enqueue(text)  # the model may answer with it too
    chat, _, state, _, _ = send(page, text, {})
    shown = messages_of(chat)
    assert shown[0] == {"role": "user", "content": text}  # handed to the Chatbot unchanged; it renders text
    # the answer's images and tags are escaped for display (ui.display) and read back as typed
    assert strip_footer(shown[1]["content"]) == display.shown(text)
    assert display.as_typed(strip_footer(shown[1]["content"])) == text
    assert [m["content"] for m in engine.history[-1]["messages"]][-1].endswith(text[-1000:])
    aid = state["index"][1][1]
    chat, state, _, _ = page.on_like(state, SimpleNamespace(index=1, liked=False), req())
    comment = text[:2000]
    page.on_comment(comment, state, req())
    chat, state = page.on_edit(state, SimpleNamespace(index=1, value=text + " (edited)", previous_value=""), req())
    assert store.message(state["index"][0][1], "alice")["content"] == text
    assert store.answer(aid, "alice")["content"] == text
    assert list(store.rows("ratings"))[-1]["comment"] == comment
    assert display.as_typed(strip_footer(messages_of(chat)[1]["content"])) == text + " (edited)"
    assert page.api_history(state["conversation_id"], req())[0]["message"] == text
    tables_after, rows = snapshot(store)
    assert tables_after == tables_before  # nothing dropped, nothing added
    assert (len(rows["messages"]), len(rows["answers"]), len(rows["ratings"])) == (1, 2, 2)


BAD_CHARS = {"nul": ("hello\x00world", "NUL character"), "surrogate": ("hello \ud800 world", "not valid Unicode")}


@pytest.mark.parametrize("kind", BAD_CHARS)
def test_nul_and_lone_surrogates_are_refused_everywhere_and_nothing_is_written(page, store, engine, kind):
    bad, says = BAD_CHARS[kind]
    final = list(page.api_chat("hello", "", "", req()))[-1]
    aid, cid = final["answer_id"], final["conversation_id"]
    _, before = snapshot(store)
    calls = len(engine.history)
    with pytest.warns(UserWarning, match=says):
        list(page.on_send(bad, "", {}, req()))  # a new chat: no empty conversation is left behind
    with pytest.warns(UserWarning, match=says):
        list(page.on_send("fine", bad, {}, req()))  # in the persona
    for attempt in (
        lambda: list(page.api_chat(bad, "", "", req())),
        lambda: list(page.api_chat(bad, cid, "", req())),
        lambda: list(page.api_chat("fine", "", bad, req())),
        lambda: page.api_rate(aid, -1, bad, req()),
        lambda: page.api_comment(aid, bad, req()),
        lambda: page.api_edit(aid, bad, req()),
    ):
        with pytest.raises(gr.Error, match=says):
            attempt()
    assert snapshot(store)[1] == before and len(engine.history) == calls


def test_huge_comments_and_edits_are_refused_with_the_limit(page, store):
    from assistant.chat import MAX_COMMENT_CHARS, MAX_EDIT_CHARS

    final = list(page.api_chat("hello", "", "", req()))[-1]
    aid = final["answer_id"]
    page.api_rate(aid, -1, "", req())
    _, before = snapshot(store)
    with pytest.raises(gr.Error, match=f"{MAX_COMMENT_CHARS:,}"):
        page.api_comment(aid, "y" * (MAX_COMMENT_CHARS + 1), req())
    with pytest.raises(gr.Error, match=f"{MAX_COMMENT_CHARS:,}"):  # not cut short silently
        page.api_rate(aid, -1, "y" * (MAX_COMMENT_CHARS + 1), req())
    with pytest.raises(gr.Error, match=f"{MAX_EDIT_CHARS:,}"):
        page.api_edit(aid, "z" * (MAX_EDIT_CHARS + 1), req())
    with pytest.raises(gr.Error, match="limit"):
        list(page.api_chat("w" * (MAX_EDIT_CHARS + 1), final["conversation_id"], "", req()))
    assert snapshot(store)[1] == before


def test_forged_requests_with_another_users_ids_are_refused(page, store, engine):
    first = list(page.api_chat("alice's secret", "", "", req("alice")))[-1]
    aid, cid = first["answer_id"], first["conversation_id"]
    page.api_rate(aid, 1, "", req("alice"))
    retry = list(page.api_retry(aid, req("alice")))[-1]["answer_id"]
    _, before = snapshot(store)
    calls = len(engine.history)
    mallory = req("mallory")
    for forged in (
        lambda: page.api_rate(aid, -1, "", mallory),
        lambda: page.api_rate(retry, 0, "", mallory),
        lambda: page.api_comment(aid, "pwned", mallory),
        lambda: page.api_edit(aid, "pwned", mallory),
        lambda: page.api_undo_answer(retry, mallory),
        lambda: list(page.api_retry(aid, mallory)),
        lambda: page.api_history(cid, mallory),
        lambda: list(page.api_chat("let me in", cid, "", mallory)),
    ):
        with pytest.raises(gr.Error, match="No (answer|conversation)") as e:
            forged()
        assert "secret" not in str(e.value)
    assert snapshot(store)[1] == before and len(engine.history) == calls
    assert store.conversations("mallory") == []
    assert page.api_history(cid, req("alice"))[0]["answer_id"] == retry  # alice's view is unchanged


def test_ticking_dont_train_before_the_first_message_excludes_the_new_conversation(page, engine, store):
    """The box can be ticked on an empty new chat; the conversation the first message
    creates must carry that choice, and training must not read it."""
    from tuning.pairs import build_preferences

    engine.enqueue("excluded answer", "included answer")
    excluded = list(page.on_send("keep this out of training", "", {}, req(), True))[-1][2]["conversation_id"]
    included = list(page.on_send("fine to train on", "", {}, req(), False))[-1][2]["conversation_id"]
    assert store.conversation(excluded, "alice")["exclude_from_training"] == 1
    assert store.conversation(included, "alice")["exclude_from_training"] == 0
    for conversation_id in (excluded, included):
        (turn,) = store.turns(conversation_id, "alice")
        store.rate(turn.answer["id"], "alice", 1)
    data = build_preferences(store)
    used = {r.conversation_id for r in data.train_unpaired + data.eval_unpaired}
    assert used == {included}


def test_a_locked_database_on_a_new_chat_and_on_the_training_box_is_said_and_the_box_shows_the_truth(
        tmp_path, engine, monkeypatch):
    import sqlite3

    import store.store as store_module
    from assistant.chat import ChatService
    from assistant.engine import Sampling
    from store import Store

    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.2)
    db = Store(tmp_path / "a.db")
    page = ChatPage(ChatService(store=db, engine=engine, sampling=Sampling(max_new_tokens=32)))
    state = send(page, "hello", {})[2]
    cid = state["conversation_id"]
    lock = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # another writer holding the lock past the busy timeout

    with pytest.warns(UserWarning, match=r"The new conversation could not be saved: the database said \"database is locked\""):
        outs = list(page.on_send("first message of a new chat", "", {}, req(), True))
    assert outs[-1][1] != "" and db.count("conversations") == 1  # the text stays in the box

    with pytest.warns(UserWarning, match="Your training choice could not be saved"):
        box = page.on_opt_out(True, state, req())
    assert box["value"] is False  # the box shows what is stored: still trainable
    lock.rollback()
    assert db.conversation(cid, "alice")["exclude_from_training"] == 0
    assert page.on_opt_out(True, state, req())["value"] is True
    assert db.conversation(cid, "alice")["exclude_from_training"] == 1
    with pytest.raises(gr.Error, match="could not be saved"):
        lock.execute("BEGIN IMMEDIATE")
        try:
            list(page.api_chat("new chat over the API", "", "", req()))
        finally:
            lock.rollback()


def test_a_third_answer_at_once_is_refused_with_a_clear_message_on_the_page_and_the_api(page, store):
    first = page.on_send("one", "", {}, req())
    next(first)
    cid = next(first)[2]["conversation_id"]
    second = page.api_chat("two", cid, "", req())
    next(second)  # two answers streaming for alice
    with pytest.warns(UserWarning, match="You already have 2 answers being written"):
        outs = list(page.on_send("three", "", {"conversation_id": cid}, req()))
    assert outs[-1][1] != ""  # the text stays in the box
    with pytest.raises(gr.Error, match="You already have 2 answers being written"):
        list(page.api_chat("three", cid, "", req()))
    assert [t.message["content"] for t in store.turns(cid, "alice")] == ["one", "two"]
    assert send(page, "hello", {}, user="bob")[2]["conversation_id"]  # bob is not held up
