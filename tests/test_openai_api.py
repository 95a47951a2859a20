"""The OpenAI-compatible API's parts that need no model: reading answers back, logging them."""

import json

import pytest

from assistant.engine import Adapter
from assistant.openai_api import Answers, log_exchange, plain_messages
from store import Store


def sse(*events) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


STREAM = sse(
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
    {"choices": [{"index": 0, "delta": {"content": "Paris is "}}]},
    {"choices": [{"index": 0, "delta": {"content": "the capital."}, "finish_reason": "stop"}]},
    {"choices": [], "usage": {"completion_tokens": 5}},
)


@pytest.mark.parametrize("piece", [1, 7, 64, len(STREAM)])
def test_a_stream_is_read_back_whatever_pieces_the_network_cut_it_into(piece):
    answers = Answers()
    for i in range(0, len(STREAM), piece):
        answers.feed(STREAM[i: i + piece])
    assert answers.complete() == [("Paris is the capital.", "stop", 5)]
    assert answers.first_token_s is not None


def test_a_stream_cut_short_has_no_finished_answer():
    answers = Answers()
    answers.feed(STREAM[: STREAM.index(b"the capital")])
    assert answers.complete() == []


def test_json_answers_with_several_choices():
    answers = Answers()
    answers.from_json({"choices": [{"index": 0, "message": {"content": "a"}, "finish_reason": "stop"},
                                   {"index": 1, "message": {"content": "b"}, "finish_reason": "length"}],
                       "usage": {"completion_tokens": 9}})
    assert answers.complete() == [("a", "stop", None), ("b", "length", None)]  # tokens are for both


def test_messages_are_reduced_to_text_and_unstorable_text_is_refused():
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi "},
                                                      {"type": "image_url", "image_url": {"url": "x"}},
                                                      {"type": "text", "text": "there"}]},
                         {"role": "assistant", "content": None}]}
    assert plain_messages(body) == [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": ""}]
    for bad in ([{"role": "user", "content": "a\x00b"}], [{"role": "user", "content": "\ud800"}], ["text"],
                [{"content": "no role"}]):
        with pytest.raises(ValueError):
            plain_messages({"messages": bad})


def test_an_exchange_is_logged_into_the_users_history(tmp_path):
    store = Store(tmp_path / "a.db")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Spain?"}]
    answers = Answers()
    answers.from_json({"choices": [{"index": 0, "message": {"content": "Madrid."}, "finish_reason": "stop"}],
                       "usage": {"completion_tokens": 3}})
    log_exchange(store, "smol", "alice", messages, {"temperature": 0.2, "max_tokens": 9}, Adapter("v3-abc", "/x", 3),
                 answers)
    (conv,) = store.conversations("alice")
    assert conv["title"] == "API: And of Spain?" and conv["system_prompt"] == "Be brief."
    (turn,) = store.turns(conv["id"], "alice")
    assert turn.message["content"] == "And of Spain?"
    a = turn.answer
    assert (a["content"], a["model"], a["adapter_name"], a["adapter_version"]) == ("Madrid.", "smol", "v3-abc", 3)
    assert json.loads(a["prompt_json"]) == messages  # the whole context the model saw, for training
    assert json.loads(a["sampling_json"]) == {"temperature": 0.2, "max_tokens": 9, "via": "openai-api"}
    assert (a["completion_tokens"], a["finish_reason"]) == (3, "stop")
    assert store.conversations("bob") == []


def test_an_unfinished_answer_keeps_the_message_only(tmp_path):
    store = Store(tmp_path / "a.db")
    log_exchange(store, "smol", "alice", [{"role": "user", "content": "Hello?"}], {}, None, Answers())
    (conv,) = store.conversations("alice")
    (turn,) = store.turns(conv["id"], "alice")
    assert turn.message["content"] == "Hello?" and turn.answer is None
