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


# -- the whole API over a mocked vLLM (httpx.MockTransport): what reaches the model server --

KEY = "alice-key-0123456789"


class FakeVLLM:
    """What build_api needs of a VLLMEngine; requests go to the MockTransport."""

    model_name = "fake-model"
    auth_headers = {"Authorization": "Bearer upstream-key"}

    def __init__(self):
        from assistant.vllm_replicas import Replica

        self.replica = Replica("http://vllm.test", "upstream-key")
        self.inflight = 0
        self.failures = []

    def acquire(self, adapter):
        from assistant.vllm_replicas import Lease

        self.inflight += 1
        return Lease(adapter or Adapter("fake-model", "", 0), self.replica)

    def release(self, lease, failed=None):
        self.inflight -= 1
        if failed is not None:
            self.failures.append(failed)


@pytest.fixture
def api(tmp_path):
    import httpx
    from fastapi.testclient import TestClient

    from assistant.chat import GenerationSlots
    from assistant.openai_api import ApiLimits, build_api

    sent = []

    def vllm(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append(body)
        if body["stream"]:
            return httpx.Response(200, stream=httpx.ByteStream(STREAM), headers={"content-type": "text/event-stream"})
        choices = [{"index": i, "message": {"role": "assistant", "content": f"answer {i}"}, "finish_reason": "stop"}
                   for i in range(body.get("n", 1))]
        return httpx.Response(200, json={"choices": choices, "usage": {"completion_tokens": 2}})

    store = Store(tmp_path / "a.db")
    engine = FakeVLLM()
    slots = GenerationSlots()  # shared with the chat page in the app
    app = build_api(engine, lambda user: None, {KEY: "alice"}.get, store=store,
                    limits=ApiLimits(max_new_tokens=64), transport=httpx.MockTransport(vllm), slots=slots)
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as client:
        client.slots = slots
        yield client, sent, store, engine


def ask(**fields):
    return {"model": "anything", "messages": [{"role": "user", "content": "Hi"}], **fields}


def test_a_chunked_body_over_the_limit_is_refused_while_it_is_read(api):
    from assistant.openai_api import ApiLimits

    client, sent, store, engine = api
    piece = b" " * 65536

    def chunked():  # no Content-Length: the audit's 5 MB body sent in pieces
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield piece
        yield b'"}]}'

    r = client.post("/v1/chat/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and f"{ApiLimits().max_body_bytes:,} bytes" in r.json()["detail"]
    assert sent == [] and store.count("messages") == 0 and engine.inflight == 0
    r = client.post("/v1/chat/completions", content=b"x" * 2_000_000)  # with Content-Length: refused unread
    assert r.status_code == 413 and sent == []


def test_only_supported_fields_reach_vllm_and_n_and_max_tokens_are_clamped(api):
    client, sent, store, _ = api
    r = client.post("/v1/chat/completions", json=ask(n=500, max_tokens=100_000, temperature=0.5, seed=7,
                                                       frobnicate={"x": 1}, user="someone", logit_bias={"1": 100}))
    assert r.status_code == 200 and len(r.json()["choices"]) == 4
    (body,) = sent
    assert body == {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], "n": 4,
                    "max_tokens": 64, "temperature": 0.5, "seed": 7, "stream": False}
    assert store.count("answers") == 4  # not 500
    client.post("/v1/chat/completions", json=ask(max_completion_tokens=10))
    client.post("/v1/chat/completions", json=ask())
    assert (sent[1]["max_tokens"], sent[2]["max_tokens"]) == (10, 64)  # the server's limit by default
    assert "max_completion_tokens" not in sent[1]


@pytest.mark.parametrize("field, value", [
    ("prompt_logprobs", 5), ("logprobs", True), ("top_logprobs", 3), ("response_format", {"type": "json_object"}),
    ("structured_outputs", {"regex": "a+"}), ("guided_json", {"type": "object"}), ("guided_regex", "a+"),
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
])
def test_logprobs_structured_output_and_tools_are_refused_by_name(api, field, value):
    client, sent, store, _ = api
    r = client.post("/v1/chat/completions", json=ask(**{field: value}))
    assert r.status_code == 400 and f"'{field}'" in r.json()["detail"]
    assert sent == [] and store.count("messages") == 0


def test_the_chat_pages_text_limits_apply(api):
    client, sent, _, _ = api
    too_long = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 100_001}]})
    assert too_long.status_code == 400 and "the limit is 100,000" in too_long.json()["detail"]
    persona = client.post("/v1/chat/completions", json={"messages": [
        {"role": "system", "content": "x" * 4_001}, {"role": "user", "content": "Hi"}]})
    assert persona.status_code == 400 and "the limit is 4,000" in persona.json()["detail"]
    tool = client.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "Hi"}]})
    assert tool.status_code == 400 and "role" in tool.json()["detail"]
    bad = client.post("/v1/chat/completions", json=ask(n="many"))
    assert bad.status_code == 400 and sent == []


def test_a_user_with_two_answers_generating_on_the_page_gets_429_from_the_api(api):
    client, sent, store, engine = api
    with client.slots.hold("alice"), client.slots.hold("alice"):  # two chat page answers streaming
        r = client.post("/v1/chat/completions", json=ask())
        assert r.status_code == 429 and "You already have 2 answers being written" in r.json()["detail"]
        assert sent == [] and store.count("messages") == 0
    assert client.post("/v1/chat/completions", json=ask()).status_code == 200
    streamed = client.post("/v1/chat/completions", json=ask(stream=True))
    assert streamed.status_code == 200 and b"the capital" in streamed.content and engine.inflight == 0
    with client.slots.hold("alice"), client.slots.hold("alice"):
        pass  # every API request gave its place back


def test_a_server_that_does_not_answer_gets_503_and_is_reported_to_the_engine(tmp_path):
    """The engine marks that server down (VLLMEngine.release with failed), so the client's
    retry goes to another server of the pool."""
    import httpx
    from fastapi.testclient import TestClient

    from assistant.openai_api import build_api

    def down(request: httpx.Request) -> httpx.Response:
        assert str(request.url) == "http://vllm.test/v1/chat/completions"  # the lease's server
        raise httpx.ConnectError("connection refused")

    engine = FakeVLLM()
    app = build_api(engine, lambda user: None, {KEY: "alice"}.get, store=Store(tmp_path / "a.db"),
                    transport=httpx.MockTransport(down))
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as client:
        r = client.post("/v1/chat/completions", json=ask(stream=True))
    assert r.status_code == 503 and "not answering" in r.json()["detail"]
    assert engine.inflight == 0 and [type(e) for e in engine.failures] == [httpx.ConnectError]
