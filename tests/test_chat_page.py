"""The page's handlers, driven as Gradio would call them, over the fake engine."""

from types import SimpleNamespace

import gradio as gr
import pytest

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
